//! The permission group through `nix::sys::fanotify` (typed flags), with our own event
//! reader: nix's reader allocates per call, and `fanotify-rs` turns paths into `String`s,
//! which panics on names that are not UTF-8.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use janus_api::{Event, EventSet};

/// The size we read events in; one read then takes up to ~2,700 permission events.
pub const READ_BUFFER: usize = 64 * 1024;
/// The most answers one `writev` carries, and so the most permission events one read
/// takes: a read's events are answered with one system call.
pub const RESPONSES_PER_WRITE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    #[error(
        "fanotify permission events need CAP_SYS_ADMIN in the initial user namespace \
         (a rootless node cannot run the fanotify backend): fanotify_init: {0}"
    )]
    NotPermitted(nix::Error),
    #[error("fanotify_init: {0}")]
    Init(nix::Error),
    #[error("fanotify_mark: {0}")]
    Mark(nix::Error),
    /// Watching a marked directory for new entries (inotify).
    #[error("inotify: {0}")]
    Watch(io::Error),
    #[error("statx: {0}")]
    Stat(io::Error),
    #[error("more than {0} objects below its guarded paths (a limit of the agent's)")]
    TooMany(usize),
}

impl FanotifyError {
    /// The `kind` label of `janus_placement_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            FanotifyError::Watch(_) => "watch",
            FanotifyError::Stat(_) => "stat",
            FanotifyError::TooMany(_) => "limit",
            _ => "mark",
        }
    }
}

/// Maps guard events to the permission-event mask that enforces them. `modify` has no
/// fanotify equivalent and is left out; callers report it.
pub fn perm_mask(events: EventSet) -> MaskFlags {
    let mut mask = MaskFlags::empty();
    if events.contains(Event::Open) {
        mask |= MaskFlags::FAN_OPEN_PERM;
    }
    if events.contains(Event::Access) {
        mask |= MaskFlags::FAN_ACCESS_PERM;
    }
    if events.contains(Event::Exec) {
        mask |= MaskFlags::FAN_OPEN_EXEC_PERM;
    }
    mask
}

/// `FAN_PRE_ACCESS` (Linux 6.14): before a read, or a page fault of a mapping, of a file
/// on a file system with pre-content events.
const FAN_PRE_ACCESS: u64 = 0x0010_0000;

/// The guard event a permission event answers, if it is one.
pub fn event_of(mask: u64) -> Option<Event> {
    if mask & FAN_PRE_ACCESS != 0 {
        return Some(Event::Access);
    }
    let mask = MaskFlags::from_bits_truncate(mask);
    if mask.contains(MaskFlags::FAN_OPEN_EXEC_PERM) {
        Some(Event::Exec)
    } else if mask.contains(MaskFlags::FAN_OPEN_PERM) {
        Some(Event::Open)
    } else if mask.contains(MaskFlags::FAN_ACCESS_PERM) {
        Some(Event::Access)
    } else {
        None
    }
}

/// A group that receives permission events and answers them.
pub struct PermGroup {
    fan: Fanotify,
    audit: bool,
    /// A pre-content group (Linux 6.14): files on file systems that support it can be
    /// marked for `FAN_PRE_ACCESS`, which sees page faults of mappings too.
    pre_content: bool,
}

/// How a file's mark came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// Reads and page faults raise `FAN_PRE_ACCESS`: `access` is decided where it happens.
    PreContent,
    /// Only `read` raises an event (`FAN_ACCESS_PERM`): a mapping's page faults do not, so
    /// `access` must also be decided at the open.
    ReadOnly,
}

impl PermGroup {
    pub fn new() -> Result<PermGroup, FanotifyError> {
        // An unlimited queue: a full bounded queue would drop events, and the kernel allows
        // what it drops. O_NONBLOCK on event fds: the kernel opening a FIFO for us must not
        // wait for a writer.
        let flags = InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::FAN_UNLIMITED_QUEUE
            | InitFlags::FAN_UNLIMITED_MARKS;
        let fd_flags = EventFFlags::O_RDONLY
            | EventFFlags::O_LARGEFILE
            | EventFFlags::O_CLOEXEC
            | EventFFlags::O_NONBLOCK;
        // A pre-content group where the kernel has one (6.14), else a content one;
        // FAN_ENABLE_AUDIT needs CAP_AUDIT_WRITE: without it guards still work, unaudited.
        let audit = InitFlags::from_bits_retain(libc::FAN_ENABLE_AUDIT);
        let mut last = nix::Error::EINVAL;
        for (class, pre_content) in [
            (InitFlags::FAN_CLASS_PRE_CONTENT, true),
            (InitFlags::FAN_CLASS_CONTENT, false),
        ] {
            for (extra, audit) in [(audit, true), (InitFlags::empty(), false)] {
                match Fanotify::init(flags | class | extra, fd_flags) {
                    Ok(fan) => {
                        return Ok(PermGroup {
                            fan,
                            audit,
                            pre_content,
                        })
                    }
                    Err(e @ (nix::Error::EPERM | nix::Error::EINVAL)) => last = e,
                    Err(e) => return Err(init_error(e)),
                }
            }
        }
        Err(init_error(last))
    }

    pub fn audit_enabled(&self) -> bool {
        self.audit
    }

    /// Marks `fd`'s inode; a directory mask also covers its direct children. A file whose
    /// reads are guarded is marked for pre-content reads where its file system has them.
    pub fn mark(
        &self,
        fd: BorrowedFd<'_>,
        mask: MaskFlags,
        dir: bool,
    ) -> Result<Reads, FanotifyError> {
        if self.pre_content && !dir && mask.contains(MaskFlags::FAN_ACCESS_PERM) {
            let pre = mask | MaskFlags::from_bits_retain(FAN_PRE_ACCESS);
            match self.mark_exactly(fd, pre, false) {
                Ok(()) => return Ok(Reads::PreContent),
                // tmpfs and overlayfs have no pre-content events.
                Err(FanotifyError::Mark(nix::Error::EOPNOTSUPP | nix::Error::EINVAL)) => {}
                Err(e) => return Err(e),
            }
        }
        self.mark_exactly(fd, mask, dir).map(|()| Reads::ReadOnly)
    }

    fn mark_exactly(
        &self,
        fd: BorrowedFd<'_>,
        mask: MaskFlags,
        dir: bool,
    ) -> Result<(), FanotifyError> {
        let (mask, flags) = if dir {
            (
                mask | MaskFlags::FAN_EVENT_ON_CHILD | MaskFlags::FAN_ONDIR,
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_ONLYDIR,
            )
        } else {
            (mask, MarkFlags::FAN_MARK_ADD)
        };
        self.fan
            .mark(flags, mask, fd, Some(held(fd).as_str()))
            .map_err(FanotifyError::Mark)
    }

    /// Takes `mask` off `fd`'s mark; with `whole`, the mark itself goes (a directory's
    /// FAN_EVENT_ON_CHILD with it).
    pub fn unmark(
        &self,
        fd: BorrowedFd<'_>,
        mask: MaskFlags,
        dir: bool,
        whole: bool,
    ) -> Result<(), FanotifyError> {
        let mut flags = MarkFlags::FAN_MARK_REMOVE;
        let mut mask = mask;
        if mask.contains(MaskFlags::FAN_ACCESS_PERM) && self.pre_content && !dir {
            mask |= MaskFlags::from_bits_retain(FAN_PRE_ACCESS);
        }
        if dir {
            flags |= MarkFlags::FAN_MARK_ONLYDIR;
            if whole {
                mask |= MaskFlags::FAN_EVENT_ON_CHILD | MaskFlags::FAN_ONDIR;
            }
        }
        self.fan
            .mark(flags, mask, fd, Some(held(fd).as_str()))
            .map_err(FanotifyError::Mark)
    }

    /// Reads at most [`RESPONSES_PER_WRITE`] events: their answers go in one `writev`.
    pub fn read<'b>(&self, buf: &'b mut AlignedBuf) -> io::Result<EventIter<'b>> {
        const MOST: usize = RESPONSES_PER_WRITE * size_of::<libc::fanotify_event_metadata>();
        read_into(self.fan.as_fd(), &mut buf.0[..MOST])
    }

    /// Removes every inode mark of the group.
    pub fn flush(&self) -> Result<(), FanotifyError> {
        self.fan
            .mark(
                MarkFlags::FAN_MARK_FLUSH,
                MaskFlags::empty(),
                self.fan.as_fd(),
                None::<&std::path::Path>,
            )
            .map_err(FanotifyError::Mark)
    }

    /// The answer to the event whose descriptor is `fd`, for [`PermGroup::respond_all`].
    pub fn response(
        &self,
        fd: BorrowedFd<'_>,
        allow: bool,
        audit: bool,
    ) -> libc::fanotify_response {
        let mut bits = if allow {
            libc::FAN_ALLOW
        } else {
            libc::FAN_DENY
        };
        if audit && self.audit {
            bits |= libc::FAN_AUDIT;
        }
        libc::fanotify_response {
            fd: fd.as_raw_fd(),
            response: bits,
        }
    }

    /// Writes every response, their descriptors still open; returns how many the kernel
    /// refused. fanotify takes one response per write, but the group has no write_iter,
    /// so writev hands it each record in turn: one system call answers a whole read,
    /// and every waiting opener is woken before any of them can take the CPU from us.
    /// A refused record ends the writev there; it is counted and the rest written again.
    pub fn respond_all(&self, responses: &[libc::fanotify_response]) -> usize {
        const CHUNK: usize = RESPONSES_PER_WRITE;
        const RECORD: usize = size_of::<libc::fanotify_response>();
        let mut failed = 0;
        let mut rest = responses;
        while !rest.is_empty() {
            let n = rest.len().min(CHUNK);
            let iov: [libc::iovec; CHUNK] = std::array::from_fn(|i| libc::iovec {
                iov_base: rest.get(i).map_or(std::ptr::null_mut(), |r| {
                    (r as *const libc::fanotify_response).cast_mut().cast()
                }),
                iov_len: RECORD,
            });
            // SAFETY: the first `n` iovecs point at records in `rest`, alive for the call.
            let written = unsafe { libc::writev(self.fan.as_raw_fd(), iov.as_ptr(), n as i32) };
            let done = if written > 0 {
                written as usize / RECORD
            } else {
                0
            };
            if done == 0 {
                // The first record was refused (its event is gone, say): skip it.
                failed += 1;
                rest = &rest[1..];
            } else {
                rest = &rest[done.min(rest.len())..];
            }
        }
        failed
    }
}

impl AsFd for PermGroup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fan.as_fd()
    }
}

/// The path that names exactly the object `fd` holds. fanotify_mark refuses O_PATH
/// descriptors as its object (EBADF), and O_PATH is how we hold guarded files: opening them
/// for reading could block (a FIFO) or wait on a permission event. The magic link jumps to
/// the held object, so no name in the container is looked up again.
fn held(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn init_error(e: nix::Error) -> FanotifyError {
    if e == nix::Error::EPERM {
        FanotifyError::NotPermitted(e)
    } else {
        FanotifyError::Init(e)
    }
}

/// A read buffer aligned for `fanotify_event_metadata`.
#[repr(C, align(8))]
pub struct AlignedBuf(pub [u8; READ_BUFFER]);

impl AlignedBuf {
    pub fn boxed() -> Box<AlignedBuf> {
        Box::new(AlignedBuf([0; READ_BUFFER]))
    }
}

fn read_into<'b>(fd: BorrowedFd<'_>, buf: &'b mut [u8]) -> io::Result<EventIter<'b>> {
    // SAFETY: reading into a buffer we own, of the length we pass.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(EventIter {
        buf: &buf[..n as usize],
    })
}

/// One event. Its file descriptor, if any, is owned and closed on drop, whatever happens.
pub struct RawEvent {
    pub mask: u64,
    pub pid: i32,
    pub fd: Option<OwnedFd>,
}

impl RawEvent {
    pub fn is_overflow(&self) -> bool {
        self.mask & libc::FAN_Q_OVERFLOW != 0
    }
}

/// Events in one read, parsed without copying.
pub struct EventIter<'b> {
    buf: &'b [u8],
}

impl<'b> Iterator for EventIter<'b> {
    type Item = RawEvent;

    fn next(&mut self) -> Option<RawEvent> {
        const META: usize = size_of::<libc::fanotify_event_metadata>();
        if self.buf.len() < META {
            return None;
        }
        // SAFETY: at least META bytes remain; the struct is plain data, read unaligned.
        let meta: libc::fanotify_event_metadata =
            unsafe { std::ptr::read_unaligned(self.buf.as_ptr().cast()) };
        let len = (meta.event_len as usize).clamp(META, self.buf.len());
        self.buf = &self.buf[len..];
        let fd = (meta.fd >= 0).then(|| {
            // SAFETY: the kernel installed this descriptor for us; nobody else owns it.
            unsafe { OwnedFd::from_raw_fd(meta.fd as RawFd) }
        });
        Some(RawEvent {
            mask: meta.mask,
            pid: meta.pid,
            fd,
        })
    }
}

impl Drop for EventIter<'_> {
    // Closes the descriptors of events nobody took, e.g. when answering stopped early.
    fn drop(&mut self) {
        for _ in self.by_ref() {}
    }
}
