//! Marking guarded trees. FAN_EVENT_ON_CHILD covers one level, so every directory below a
//! guarded one carries its own mark, and directories that appear later are marked as the
//! create group reports them.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::dir::{Dir, Type};
use nix::fcntl::OFlag;
use nix::sys::fanotify::MaskFlags;
use nix::sys::stat::Mode;

use super::created::CreateWatch;
use super::group::{FanotifyError, PermGroup};
use crate::resolve::openat2;

struct MarkedDir {
    /// Kept open so that a name reported under it can be opened without a path lookup
    /// from the container root, which a concurrent rename could redirect.
    fd: OwnedFd,
    mask: MaskFlags,
}

pub struct Tree<'g> {
    perm: &'g PermGroup,
    create: &'g CreateWatch,
    /// By inotify watch descriptor: one per directory, whatever path reached it.
    dirs: HashMap<i32, MarkedDir>,
    files: HashSet<(u64, u64)>,
    /// Errors below a guarded root that did not stop the walk (a directory that vanished
    /// is not one).
    pub skipped: u64,
}

impl<'g> Tree<'g> {
    pub fn new(perm: &'g PermGroup, create: &'g CreateWatch) -> Tree<'g> {
        Tree {
            perm,
            create,
            dirs: HashMap::new(),
            files: HashSet::new(),
            skipped: 0,
        }
    }

    pub fn marks(&self) -> usize {
        self.dirs.len() + self.files.len()
    }

    /// Forgets the directories for which `exists` is false (removed ones). Their held
    /// descriptors pin them, so the kernel never drops their marks by itself, and a
    /// container that makes and removes directories in a loop would otherwise run the agent
    /// out of descriptors.
    pub fn prune(&mut self, exists: impl Fn(BorrowedFd<'_>) -> bool) {
        self.dirs.retain(|_, d| exists(d.fd.as_fd()));
    }

    /// Marks a resolved guarded path; a directory with everything below it.
    pub fn mark_root(
        &mut self,
        fd: OwnedFd,
        dev_ino: (u64, u64),
        is_dir: bool,
        mask: MaskFlags,
    ) -> Result<(), FanotifyError> {
        if !is_dir {
            self.perm.mark(fd.as_fd(), mask, false)?;
            self.files.insert(dev_ino);
            return Ok(());
        }
        self.mark_dir(fd, mask, true)
    }

    /// A directory entry appeared under a marked directory; marks it if it is a directory.
    /// Returns whether it was.
    pub fn on_created(&mut self, parent: i32, name: &[u8]) -> bool {
        let Some(parent) = self.dirs.get(&parent) else {
            return false;
        };
        let mask = parent.mask;
        // Gone already, or not a directory: nothing to mark.
        let Ok(child) = open_subdir(parent.fd.as_fd(), name) else {
            return false;
        };
        self.mark_dir(child, mask, false).is_ok()
    }

    fn mark_dir(
        &mut self,
        root: OwnedFd,
        mask: MaskFlags,
        strict: bool,
    ) -> Result<(), FanotifyError> {
        let mut stack = vec![root];
        let mut first = strict;
        while let Some(dir) = stack.pop() {
            let result = self.mark_one(dir, mask, &mut stack);
            match result {
                Err(e) if first => return Err(e),
                Err(e) => {
                    self.skipped += 1;
                    tracing::warn!(error = %e, "a directory under a guarded path could not be marked");
                }
                Ok(()) => {}
            }
            first = false;
        }
        Ok(())
    }

    fn mark_one(
        &mut self,
        dir: OwnedFd,
        mask: MaskFlags,
        stack: &mut Vec<OwnedFd>,
    ) -> Result<(), FanotifyError> {
        // Watched before listing: whatever is created meanwhile is reported.
        let key = self.create.watch(dir.as_fd())?;
        let mask = match self.dirs.get(&key) {
            Some(known) if known.mask.contains(mask) => return Ok(()),
            Some(known) => known.mask | mask,
            None => mask,
        };
        self.perm.mark(dir.as_fd(), mask, true)?;
        for_each_subdir(dir.as_fd(), |sub| stack.push(sub));
        self.dirs.insert(key, MarkedDir { fd: dir, mask });
        Ok(())
    }
}

/// Opens a subdirectory by name without following symlinks or leaving `parent`.
fn open_subdir(parent: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<OwnedFd> {
    openat2(
        parent,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

fn for_each_subdir(dir: BorrowedFd<'_>, mut f: impl FnMut(OwnedFd)) {
    // Listing opens the directory, a marked one: the answering thread lets the agent's own
    // opens through, so this must never run on that thread.
    let Ok(mut listing) = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    for entry in listing.iter().flatten() {
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if matches!(entry.file_type(), Some(Type::Directory) | None) {
            if let Ok(sub) = open_subdir(dir, name) {
                f(sub);
            }
        }
    }
}
