//! Which target needs which mark, in the agent's one permission group and one inotify
//! instance. An inode that several targets guard (a volume two pods share, two guards on one
//! pod) carries one mark with the union of their events, narrowed or removed only when the
//! last of them lets go. Owned by the marker thread alone.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::sys::fanotify::MaskFlags;

use super::created::CreateWatch;
use super::group::{FanotifyError, PermGroup, Reads};
use crate::resolve::FileId;

/// One guard on one process, as the engine numbers it.
pub type TargetId = u64;

struct Marked {
    /// Held so that the mark can be changed or removed whatever the object's names are now
    /// (a renamed file cannot be found again by its old one).
    fd: OwnedFd,
    is_dir: bool,
    /// The inotify watch of a directory.
    wd: Option<i32>,
    /// How its reads are seen.
    reads: Reads,
    masks: BTreeMap<TargetId, MaskFlags>,
}

/// How a mark came out.
pub struct Placed {
    pub reads: Reads,
    /// A directory marked but not watched (the inotify watch quota): what is in it now is
    /// guarded, what would be created in it later would not be.
    pub unwatched: Option<FanotifyError>,
}

impl Marked {
    fn union(&self) -> MaskFlags {
        self.masks
            .values()
            .fold(MaskFlags::empty(), |all, m| all | *m)
    }
}

pub struct MarkTable {
    perm: Arc<PermGroup>,
    watch: CreateWatch,
    objects: HashMap<FileId, Marked>,
    by_wd: HashMap<i32, FileId>,
}

impl MarkTable {
    pub fn new(perm: Arc<PermGroup>, watch: CreateWatch) -> MarkTable {
        MarkTable {
            perm,
            watch,
            objects: HashMap::new(),
            by_wd: HashMap::new(),
        }
    }

    pub fn watch(&self) -> &CreateWatch {
        &self.watch
    }

    /// Marks `id` (held as `fd`) for `target`'s `mask`; a directory is also watched for what
    /// appears in it. A mark that cannot be placed is an error and leaves nothing behind; a
    /// directory that is marked but cannot be watched (the inotify watch quota) stays marked,
    /// so what is in it now is guarded, and the watch error is returned with it: what is
    /// created in it later would not be.
    pub fn mark(
        &mut self,
        target: TargetId,
        fd: OwnedFd,
        id: FileId,
        is_dir: bool,
        mask: MaskFlags,
    ) -> Result<Placed, FanotifyError> {
        if let Some(m) = self.objects.get_mut(&id) {
            let before = m.union();
            if !before.contains(mask) {
                m.reads = self.perm.mark(m.fd.as_fd(), before | mask, m.is_dir)?;
            }
            *m.masks.entry(target).or_insert(MaskFlags::empty()) |= mask;
            let reads = m.reads;
            if m.is_dir && m.wd.is_none() {
                // It could not be watched before: try again.
                match self.watch.watch(m.fd.as_fd()) {
                    Ok(wd) => {
                        m.wd = Some(wd);
                        self.by_wd.insert(wd, id);
                    }
                    Err(e) => {
                        return Ok(Placed {
                            reads,
                            unwatched: Some(e),
                        })
                    }
                }
            }
            return Ok(Placed {
                reads,
                unwatched: None,
            });
        }
        let reads = self.perm.mark(fd.as_fd(), mask, is_dir)?;
        let (wd, unwatched) = if is_dir {
            match self.watch.watch(fd.as_fd()) {
                Ok(wd) => (Some(wd), None),
                Err(e) => (None, Some(e)),
            }
        } else {
            (None, None)
        };
        if let Some(wd) = wd {
            self.by_wd.insert(wd, id);
        }
        self.objects.insert(
            id,
            Marked {
                fd,
                is_dir,
                wd,
                reads,
                masks: BTreeMap::from([(target, mask)]),
            },
        );
        Ok(Placed { reads, unwatched })
    }

    /// `target` no longer needs `id`: its events leave the mark, and the mark goes with the
    /// last target.
    pub fn release(&mut self, target: TargetId, id: FileId) {
        let Some(m) = self.objects.get_mut(&id) else {
            return;
        };
        let before = m.union();
        if m.masks.remove(&target).is_none() {
            return;
        }
        let after = m.union();
        if m.masks.is_empty() {
            let _ = self.perm.unmark(m.fd.as_fd(), before, m.is_dir, true);
            if let Some(wd) = m.wd {
                self.watch.unwatch(wd);
                self.by_wd.remove(&wd);
            }
            self.objects.remove(&id);
        } else if after != before {
            let _ = self
                .perm
                .unmark(m.fd.as_fd(), before.difference(after), m.is_dir, false);
        }
    }

    /// The directory watched as `wd`.
    pub fn dir_of(&self, wd: i32) -> Option<FileId> {
        self.by_wd.get(&wd).copied()
    }

    /// The watch `wd` went away by itself (its directory was removed).
    pub fn watch_gone(&mut self, wd: i32) {
        if let Some(id) = self.by_wd.remove(&wd) {
            if let Some(m) = self.objects.get_mut(&id) {
                m.wd = None;
            }
        }
    }

    pub fn fd(&self, id: FileId) -> Option<BorrowedFd<'_>> {
        self.objects.get(&id).map(|m| m.fd.as_fd())
    }

    pub fn is_dir(&self, id: FileId) -> bool {
        self.objects.get(&id).is_some_and(|m| m.is_dir)
    }

    /// The events `target` guards on `id`.
    pub fn mask_of(&self, target: TargetId, id: FileId) -> Option<MaskFlags> {
        self.objects.get(&id)?.masks.get(&target).copied()
    }

    /// The targets that hold `id`.
    pub fn holders(&self, id: FileId) -> Vec<TargetId> {
        self.objects
            .get(&id)
            .map(|m| m.masks.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Inodes marked in the group, whoever holds them.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Removes every mark (the agent is stopping).
    pub fn flush(&mut self) -> Result<(), FanotifyError> {
        for (_, m) in self.objects.drain() {
            if let Some(wd) = m.wd {
                self.watch.unwatch(wd);
            }
        }
        self.by_wd.clear();
        self.perm.flush()
    }
}
