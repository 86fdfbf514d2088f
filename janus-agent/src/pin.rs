//! A container's init, held from the moment it is chosen.
//!
//! A PID is only a number: once its process ends the kernel gives it again, and a reader of
//! `/proc/PID` would then read a stranger. So the chosen process (its PID and the start time
//! the scan or the start gate saw) is pinned at once: a pidfd, and its `/proc/PID` directory
//! opened while the pidfd says the process still runs. Every later lookup of the target's
//! root, namespaces, parent and mounts goes through that directory, which the kernel ties to
//! the process it was opened for: once that process ends, lookups in it fail, they never
//! reach whoever has the PID next.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::pods::Process;
use crate::resolve::{self, FileId, ResolveError};

/// A process's `/proc/PID` directory, held open: what is read through it is that process's,
/// or nothing once it has been reaped.
#[derive(Debug)]
pub struct ProcDir {
    pid: i32,
    dir: OwnedFd,
}

impl ProcDir {
    /// Opens `PROC_ROOT/PID`.
    pub fn open(proc_root: &str, pid: i32) -> io::Result<ProcDir> {
        let dir = resolve::open_path(
            None,
            format!("{proc_root}/{pid}").as_bytes(),
            libc::O_DIRECTORY,
        )?;
        Ok(ProcDir { pid, dir })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The process's root directory; None once it is gone or hides it.
    pub fn root(&self) -> Option<FileId> {
        let fd = self.open_at("root", 0).ok()?;
        resolve::statx(fd.as_fd()).ok().map(|st| FileId::of(&st))
    }

    /// Whether the process runs in a root other than its parent's: a container's init,
    /// whose parent is its runtime ([`crate::pods::rooted`]).
    pub fn rooted(&self) -> bool {
        self.stat().is_ok_and(|(ppid, _)| self.rooted_under(ppid))
    }

    /// [`ProcDir::rooted`], with the parent `ppid` already read.
    pub fn rooted_under(&self, ppid: i32) -> bool {
        match (self.root(), resolve::process_root(ppid)) {
            (Some(mine), Some(theirs)) => mine != theirs,
            _ => false,
        }
    }

    /// Opens `name` in the directory (O_PATH and `extra`).
    pub fn open_at(&self, name: &str, extra: libc::c_int) -> io::Result<OwnedFd> {
        resolve::open_path(Some(self.dir.as_fd()), name.as_bytes(), extra)
    }

    /// Reads `name` in the directory.
    pub fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a NUL-terminated name relative to a directory descriptor we hold.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this descriptor.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut out = Vec::new();
        io::Read::read_to_end(&mut file, &mut out)?;
        Ok(out)
    }

    /// The parent PID and start time.
    pub fn stat(&self) -> Result<(i32, u64), ResolveError> {
        let pid = self.pid;
        let stat = self
            .read("stat")
            .map_err(|error| ResolveError::Stat { pid, error })?;
        resolve::stat_fields(&stat).ok_or_else(|| ResolveError::Stat {
            pid,
            error: io::Error::new(io::ErrorKind::InvalidData, "no ppid or start time"),
        })
    }
}

/// A process held by a pidfd, with the `/proc/PID` directory it was chosen through.
#[derive(Debug)]
pub struct PinnedProcess {
    process: Process,
    pidfd: OwnedFd,
    dir: Arc<ProcDir>,
}

impl PinnedProcess {
    /// Pins `process`, chosen from what was read through `dir`: refused once it has ended.
    pub fn hold(process: Process, dir: Arc<ProcDir>) -> Result<PinnedProcess, ResolveError> {
        let pid = process.pid;
        let pidfd = pidfd_open(pid).map_err(|error| ResolveError::Pin { pid, error })?;
        // The directory still reads after the pidfd was opened: its process had the PID
        // then, so the pidfd is that process's.
        let (_, start) = dir.stat().map_err(|_| ResolveError::Replaced {
            pid,
            start: process.start,
        })?;
        let pinned = PinnedProcess {
            process,
            pidfd,
            dir,
        };
        if start != process.start || !pinned.runs() {
            return Err(ResolveError::Replaced {
                pid,
                start: process.start,
            });
        }
        Ok(pinned)
    }

    /// Pins whatever runs under `pid` now: for a PID given on the command line.
    pub fn pin_pid(pid: i32) -> Result<PinnedProcess, ResolveError> {
        let dir = ProcDir::open("/proc", pid).map_err(|error| ResolveError::Pin { pid, error })?;
        let (_, start) = dir.stat()?;
        PinnedProcess::hold(Process { pid, start }, Arc::new(dir))
    }

    pub fn pid(&self) -> i32 {
        self.process.pid
    }

    pub fn process(&self) -> Process {
        self.process
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the process has not exited.
    pub fn runs(&self) -> bool {
        runs(self.pidfd.as_fd())
    }

    /// Opens `name` in the process's `/proc` directory (O_PATH and `extra`).
    pub fn open(&self, name: &str, extra: libc::c_int) -> io::Result<OwnedFd> {
        self.dir.open_at(name, extra)
    }

    /// Reads `name` in the process's `/proc` directory.
    pub fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.dir.read(name)
    }

    /// The inode of one of the process's namespaces (`ns/mnt`, `ns/pid`).
    pub fn ns_inode(&self, ns: &str) -> Option<u64> {
        let fd = self.open(&format!("ns/{ns}"), 0).ok()?;
        nix::sys::stat::fstat(fd.as_fd()).ok().map(|st| st.st_ino)
    }

    /// The parent PID and start time.
    pub fn stat(&self) -> Result<(i32, u64), ResolveError> {
        self.dir.stat()
    }

    /// Whether the process has entered a root other than its parent's (its runtime's).
    pub fn rooted(&self) -> bool {
        self.dir.rooted()
    }

    /// The process's root directory; None once it is gone or hides it.
    pub fn root(&self) -> Option<FileId> {
        self.dir.root()
    }
}

/// Whether the process behind `pidfd` has not exited: its pidfd is not readable yet.
pub fn runs(pidfd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 0
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep")
    }

    /// Tests that ask for a PID again, one at a time: each would take the other's.
    static PID_REUSE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A process under `pid`, which the kernel gave before: the PID is asked for by setting
    /// the last PID given (root only), which other forks on the machine can race.
    fn reuse(pid: i32) -> std::process::Child {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
                .expect("ns_last_pid (root)");
            let mut c = child();
            if c.id() as i32 == pid {
                return c;
            }
            c.kill().expect("kill");
            c.wait().expect("reap");
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} not given again"
            );
        }
    }

    #[test]
    fn a_pinned_process_is_never_read_through_its_pid_given_again() {
        let _one = PID_REUSE.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = child();
        let pid = first.id() as i32;
        let p = PinnedProcess::pin_pid(pid).expect("pin");
        assert!(p.runs());
        assert_eq!(p.stat().expect("stat").0, std::process::id() as i32);
        assert!(p.ns_inode("mnt").is_some());
        first.kill().expect("kill");
        first.wait().expect("reap");
        let mut second = reuse(pid);
        // The PID runs a stranger now, maybe started in the same clock tick: nothing is read
        // of it through the pin.
        assert!(!p.runs());
        assert!(p.stat().is_err());
        assert!(p.open("root", libc::O_DIRECTORY).is_err());
        assert!(p.ns_inode("mnt").is_none());
        second.kill().expect("kill");
        second.wait().expect("reap");
    }

    #[test]
    fn a_process_chosen_and_ended_before_it_is_pinned_is_refused_whoever_has_its_pid() {
        let _one = PID_REUSE.lock().unwrap_or_else(|e| e.into_inner());
        let mut first = child();
        let pid = first.id() as i32;
        // Chosen from what was read through its directory, as a scan chooses an init.
        let dir = Arc::new(ProcDir::open("/proc", pid).expect("proc dir"));
        let (_, start) = dir.stat().expect("stat");
        let chosen = Process { pid, start };
        first.kill().expect("kill");
        first.wait().expect("reap");
        let mut second = reuse(pid);
        let err = PinnedProcess::hold(chosen, dir.clone()).expect_err("another process");
        assert!(matches!(err, ResolveError::Replaced { .. }), "{err}");
        // What the PID runs now is pinned as itself.
        assert!(PinnedProcess::pin_pid(pid).expect("pin").runs());
        second.kill().expect("kill");
        second.wait().expect("reap");
        let err = PinnedProcess::hold(chosen, dir).expect_err("gone");
        assert!(matches!(err, ResolveError::Pin { .. }), "{err}");
    }

    #[test]
    fn a_containers_owner_is_its_init_alone_and_a_named_process_shares_it_with_its_parent() {
        use crate::resolve::TargetRoot;
        let mut c = child();
        let pid = c.id() as i32;
        let me = std::process::id() as i32;
        let named = TargetRoot::process(PinnedProcess::pin_pid(pid).expect("pin"));
        assert_eq!(named.owners().expect("owners"), [pid, me]);
        // A container's init has the runtime or its shim for a parent, whose PID is given
        // again once it exits: never an owner.
        let init = TargetRoot::container(Arc::new(PinnedProcess::pin_pid(pid).expect("pin")), None);
        assert_eq!(init.owners().expect("owners"), [pid, pid]);
        c.kill().expect("kill");
        c.wait().expect("reap");
    }
}
