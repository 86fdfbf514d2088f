//! The floor: the least a fanotify permission listener can do. It marks the inodes the agent
//! marks with the same mask, reads events, allows every one of them and closes its
//! descriptor; no policy, no paths, no metrics, no log. What the agent costs beyond it is
//! the agent's own overhead.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// What to mark: a file, or a directory (whose mark also covers its direct children).
pub struct FloorMark {
    pub path: PathBuf,
    pub dir: bool,
}

/// What the floor did while it ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct Answered {
    pub events: u64,
    /// CPU time of the answering thread.
    pub cpu: Duration,
}

/// A running floor listener: one thread answering, stopped on drop.
pub struct Floor {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Answered>>,
}

impl Floor {
    /// Marks `marks` for `mask` (e.g. `FAN_OPEN_PERM`) in a new group and starts answering.
    pub fn start(marks: &[FloorMark], mask: u64) -> Result<Floor> {
        // As the agent's permission group: content class, unlimited queue, non-blocking
        // event descriptors.
        // SAFETY: plain syscall with integer arguments.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_CONTENT
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_UNLIMITED_QUEUE
                    | libc::FAN_UNLIMITED_MARKS,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC | libc::O_NONBLOCK) as u32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("fanotify_init (floor)");
        }
        // SAFETY: the kernel just gave us this descriptor.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        for m in marks {
            let (mask, flags) = if m.dir {
                (
                    mask | libc::FAN_EVENT_ON_CHILD | libc::FAN_ONDIR,
                    libc::FAN_MARK_ADD | libc::FAN_MARK_ONLYDIR,
                )
            } else {
                (mask, libc::FAN_MARK_ADD)
            };
            let path = CString::new(m.path.as_os_str().as_bytes())?;
            // SAFETY: a valid group descriptor and a C string path.
            let r = unsafe {
                libc::fanotify_mark(fan.as_raw_fd(), flags, mask, libc::AT_FDCWD, path.as_ptr())
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("fanotify_mark {} (floor)", m.path.display()));
            }
        }
        let stop = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("floor".into())
                .spawn(move || answer(&fan, &stop))?
        };
        Ok(Floor {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops answering (queued events are answered first) and says what it answered.
    pub fn stop(mut self) -> Result<Answered> {
        self.finish()
    }

    fn finish(&mut self) -> Result<Answered> {
        let Some(t) = self.thread.take() else {
            return Ok(Answered::default());
        };
        self.stop.write(1)?;
        match t.join() {
            Ok(n) => Ok(n),
            Err(_) => bail!("the floor's thread panicked"),
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn answer(fan: &OwnedFd, stop: &EventFd) -> Answered {
    #[repr(C, align(8))]
    struct Buf([u8; 64 * 1024]);
    const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
    let mut buf = Box::new(Buf([0; 64 * 1024]));
    let mut answered = 0u64;
    let mut stopping = false;
    loop {
        let mut fds = [
            PollFd::new(fan.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        if !stopping && fds[1].revents().is_some_and(|r| !r.is_empty()) {
            // No new events once the marks are gone; what is queued is still answered.
            // SAFETY: a valid group descriptor; FLUSH takes no path.
            unsafe {
                libc::fanotify_mark(
                    fan.as_raw_fd(),
                    libc::FAN_MARK_FLUSH,
                    0,
                    libc::AT_FDCWD,
                    std::ptr::null(),
                );
            }
            stopping = true;
        }
        // SAFETY: reading into a buffer we own, of the length we pass.
        let n = unsafe { libc::read(fan.as_raw_fd(), buf.0.as_mut_ptr().cast(), buf.0.len()) };
        if n <= 0 {
            if stopping {
                return Answered {
                    events: answered,
                    cpu: thread_cpu(),
                };
            }
            continue;
        }
        let mut rest = &buf.0[..n as usize];
        while rest.len() >= META {
            // SAFETY: at least META bytes remain; plain data, read unaligned.
            let meta: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
            rest = &rest[(meta.event_len as usize).clamp(META, rest.len())..];
            if meta.fd < 0 {
                continue;
            }
            let response = libc::fanotify_response {
                fd: meta.fd,
                response: libc::FAN_ALLOW,
            };
            // SAFETY: writing a response struct of the size we pass; then closing the
            // descriptor the kernel installed for us.
            unsafe {
                libc::write(
                    fan.as_raw_fd(),
                    (&response as *const libc::fanotify_response).cast(),
                    std::mem::size_of::<libc::fanotify_response>(),
                );
                libc::close(meta.fd);
            }
            answered += 1;
        }
    }
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    // SAFETY: timespec is plain data the kernel fills in.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
