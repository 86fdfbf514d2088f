//! Entries that appear in marked directories, so that they are marked in turn: a directory
//! because FAN_EVENT_ON_CHILD reaches one level only, a file because only a mark of its own
//! follows it when it is linked or moved elsewhere. And marked directories that move, so that
//! what is created in them later is still decided under their guarded path.
//!
//! inotify, not a fanotify group reporting FAN_CREATE: those need file handles (FID
//! reporting), which tmpfs before Linux 6.6 and overlayfs without `nfs_export` (every
//! container's root file system on such kernels) do not give. inotify works on every file
//! system and kernel; its watch descriptor, the same for every watch of one inode, is also
//! how the marked tree knows its directories.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::group::{AlignedBuf, FanotifyError};

/// The agent's one inotify instance, watching every marked directory.
pub struct CreateWatch {
    fd: OwnedFd,
}

/// What one read reported.
#[derive(Debug, PartialEq, Eq)]
pub enum Created {
    /// The queue overflowed: some creations went unreported.
    Overflow,
    /// `name` appeared (created, or moved in) in the directory watched as `parent`; a move
    /// has the `cookie` of its other half.
    Entry {
        parent: i32,
        name: Vec<u8>,
        is_dir: bool,
        cookie: u32,
    },
    /// `name` was moved out of the directory watched as `parent`.
    Left {
        parent: i32,
        name: Vec<u8>,
        cookie: u32,
    },
    /// The directory watched as `wd` was moved.
    Moved { wd: i32 },
    /// The watch `wd` is gone (its directory was removed, or the watch taken off).
    Gone { wd: i32 },
}

impl CreateWatch {
    pub fn new() -> Result<CreateWatch, FanotifyError> {
        // SAFETY: plain syscall with flags.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(FanotifyError::Watch(io::Error::last_os_error()));
        }
        // SAFETY: a descriptor the kernel just gave us.
        Ok(CreateWatch {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches the directory `dir` (held open, O_PATH will do); returns its watch
    /// descriptor, the same for every call on the same directory.
    pub fn watch(&self, dir: BorrowedFd<'_>) -> Result<i32, FanotifyError> {
        let path = format!("/proc/self/fd/{}\0", dir.as_raw_fd());
        // SAFETY: a NUL-terminated path and a valid inotify descriptor.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                path.as_ptr().cast(),
                libc::IN_CREATE
                    | libc::IN_MOVED_TO
                    | libc::IN_MOVED_FROM
                    | libc::IN_MOVE_SELF
                    | libc::IN_ONLYDIR,
            )
        };
        if wd < 0 {
            return Err(FanotifyError::Watch(io::Error::last_os_error()));
        }
        Ok(wd)
    }

    /// Takes the watch `wd` off.
    pub fn unwatch(&self, wd: i32) {
        // SAFETY: a valid inotify descriptor; a stale wd is refused with EINVAL, harmlessly.
        unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), wd) };
    }

    /// The entries reported since the last read (nothing if none: the descriptor does
    /// not block).
    pub fn read(&self, buf: &mut AlignedBuf) -> io::Result<Vec<Created>> {
        // SAFETY: reading into a buffer we own, of the length we pass.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.0.as_mut_ptr().cast(), buf.0.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(parse(&buf.0[..n as usize]))
    }
}

impl AsFd for CreateWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `struct inotify_event` records: wd, mask, cookie, len, then `len` bytes of name padded
/// with NULs.
fn parse(mut buf: &[u8]) -> Vec<Created> {
    const HEAD: usize = size_of::<libc::inotify_event>();
    let field = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let mut out = Vec::new();
    while buf.len() >= HEAD {
        let wd = field(buf, 0) as i32;
        let mask = field(buf, 4);
        let cookie = field(buf, 8);
        let len = field(buf, 12) as usize;
        let end = (HEAD + len).min(buf.len());
        let name = &buf[HEAD..end];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        if mask & libc::IN_Q_OVERFLOW != 0 {
            out.push(Created::Overflow);
        } else if mask & libc::IN_MOVE_SELF != 0 {
            out.push(Created::Moved { wd });
        } else if mask & libc::IN_IGNORED != 0 {
            out.push(Created::Gone { wd });
        } else if mask & libc::IN_MOVED_FROM != 0 && !name.is_empty() {
            out.push(Created::Left {
                parent: wd,
                name: name.to_vec(),
                cookie,
            });
        } else if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 && !name.is_empty() {
            out.push(Created::Entry {
                parent: wd,
                name: name.to_vec(),
                is_dir: mask & libc::IN_ISDIR != 0,
                cookie,
            });
        }
        buf = &buf[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, name: &[u8], padded: usize) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend(wd.to_ne_bytes());
        r.extend(mask.to_ne_bytes());
        r.extend(0u32.to_ne_bytes());
        r.extend((padded as u32).to_ne_bytes());
        let mut n = name.to_vec();
        n.resize(padded, 0);
        r.extend(n);
        r
    }

    #[test]
    fn records_are_parsed() {
        let mut buf = record(3, libc::IN_CREATE | libc::IN_ISDIR, b"new\xffdir", 16);
        buf.extend(record(3, libc::IN_CREATE, b"file", 16));
        buf.extend(record(4, libc::IN_MOVED_TO | libc::IN_ISDIR, b"moved", 8));
        buf.extend(record(4, libc::IN_MOVED_FROM, b"away", 8));
        buf.extend(record(4, libc::IN_MOVE_SELF, b"", 0));
        buf.extend(record(4, libc::IN_IGNORED, b"", 0));
        buf.extend(record(-1, libc::IN_Q_OVERFLOW, b"", 0));
        // A truncated record at the end is not read past.
        buf.extend(&record(5, libc::IN_CREATE | libc::IN_ISDIR, b"cut", 16)[..20]);
        let got = parse(&buf);
        let entry = |parent, name: &[u8], is_dir| Created::Entry {
            parent,
            name: name.to_vec(),
            is_dir,
            cookie: 0,
        };
        assert_eq!(
            got,
            [
                entry(3, b"new\xffdir", true),
                entry(3, b"file", false),
                entry(4, b"moved", true),
                Created::Left {
                    parent: 4,
                    name: b"away".to_vec(),
                    cookie: 0
                },
                Created::Moved { wd: 4 },
                Created::Gone { wd: 4 },
                Created::Overflow,
                entry(5, b"cut", true),
            ]
        );
    }
}
