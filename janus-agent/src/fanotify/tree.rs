//! Marking a guarded tree. Every directory and every file below a guarded path gets a mark
//! of its own, recorded with the guarded path it had when it was marked: a rename, a move or
//! a hard link gives it another name, not another guard. FAN_EVENT_ON_CHILD on directories
//! covers what is created in them until its own mark is placed.

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};

use janus_api::GuardPath;
use nix::sys::fanotify::MaskFlags;

use super::group::{FanotifyError, Reads};
use super::marks::{MarkTable, TargetId};
use crate::resolve::{self, for_each_entry, FileId};

/// An object marked for a target, under the guarded path it had then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: FileId,
    pub path: GuardPath,
    pub is_dir: bool,
    /// Its reads and page faults raise pre-content events.
    pub pre_content: bool,
}

/// Something below a guarded path that could not be marked or watched.
#[derive(Debug)]
pub struct Failure {
    pub what: String,
    pub error: FanotifyError,
}

/// The most objects one target marks: what a container can make in a writable guarded
/// directory must not grow the agent without bound. Past it the target fails, loudly.
pub const MAX_OBJECTS: usize = 64 * 1024;

/// One walk for one target: what it marked and what it could not.
pub struct Walk<'t> {
    pub table: &'t mut MarkTable,
    pub target: TargetId,
    pub mask: MaskFlags,
    pub found: Vec<Found>,
    /// Objects below the walk's root that could not be marked (vanishing ones are not).
    pub failures: Vec<Failure>,
    /// Objects this walk may still add to the target.
    budget: usize,
    /// Every object met, so that a bind mount onto a descendant cannot loop the walk.
    seen: HashSet<FileId>,
}

impl<'t> Walk<'t> {
    /// A walk for a target that holds `held` objects already.
    pub fn new(
        table: &'t mut MarkTable,
        target: TargetId,
        mask: MaskFlags,
        held: usize,
    ) -> Walk<'t> {
        Walk {
            table,
            target,
            mask,
            found: Vec::new(),
            failures: Vec::new(),
            budget: MAX_OBJECTS.saturating_sub(held),
            seen: HashSet::new(),
        }
    }

    /// Marks the object `fd` holds, known as `path`, and for a directory everything below
    /// it. An error marking `fd` itself is returned; errors below it are in `failures`.
    pub fn run(&mut self, fd: OwnedFd, path: GuardPath) -> Result<(), FanotifyError> {
        let mut stack = vec![(fd, path)];
        let mut root = true;
        while let Some((fd, path)) = stack.pop() {
            match self.one(fd, &path, &mut stack) {
                Err(e) if root => return Err(e),
                Err(error) => self.failures.push(Failure {
                    what: path.to_string(),
                    error,
                }),
                Ok(()) => {}
            }
            root = false;
        }
        Ok(())
    }

    fn one(
        &mut self,
        fd: OwnedFd,
        path: &GuardPath,
        stack: &mut Vec<(OwnedFd, GuardPath)>,
    ) -> Result<(), FanotifyError> {
        let st = resolve::statx(fd.as_fd()).map_err(FanotifyError::Stat)?;
        let id = FileId::of(&st);
        let is_dir = resolve::is_dir(&st);
        // A symlink's own inode is never opened: what it points at is guarded by its own
        // path, or not at all. Kernel file systems hold no files to guard.
        if u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFLNK
            || !self.seen.insert(id)
            || resolve::on_kernel_fs(fd.as_fd())
        {
            return Ok(());
        }
        if self.table.mask_of(self.target, id).is_none() {
            if self.budget == 0 {
                return Err(FanotifyError::TooMany(MAX_OBJECTS));
            }
            self.budget -= 1;
        }
        // Marked and watched before it is listed: whatever appears meanwhile is reported.
        let placed = self.table.mark(self.target, fd, id, is_dir, self.mask)?;
        if let Some(error) = placed.unwatched {
            self.failures.push(Failure {
                what: path.to_string(),
                error,
            });
        }
        self.found.push(Found {
            id,
            path: path.clone(),
            is_dir,
            pre_content: placed.reads == Reads::PreContent,
        });
        if let (true, Some(dir)) = (is_dir, self.table.fd(id)) {
            let failed = for_each_entry(dir, |name, fd| {
                if let Some(p) = path.join(name) {
                    stack.push((fd, p));
                }
            });
            for (name, error) in failed {
                self.failures.push(Failure {
                    what: format!("{path}/{}", String::from_utf8_lossy(&name)),
                    error: FanotifyError::Stat(error),
                });
            }
        }
        Ok(())
    }
}
