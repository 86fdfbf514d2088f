//! Who made an access: what the kernel's record does not hold, read from `/proc` by the log
//! writer after the answer, never by the answering thread.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use janus_api::logformat::Process;

/// `USER_HZ`: the unit of `starttime` in `/proc/PID/stat`, 100 on every Linux ABI.
const TICKS_PER_SEC: u64 = 100;

/// Time since boot (`CLOCK_BOOTTIME`, the clock of a process's start time).
pub fn since_boot() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Fills in what `p` lacks from `/proc/PID`, if the process that runs under that PID
/// started before `decided` (time since boot): a process that ended, and whose PID was
/// given again, leaves its fields unknown rather than taking a stranger's.
pub fn complete(p: &mut Process, decided: Duration) {
    let Some((ppid, started)) = stat(p.pid) else {
        return;
    };
    // Start times are in ticks: a process started in the decision's tick may be either.
    if started > decided.as_millis() as u64 / (1000 / TICKS_PER_SEC) + 1 {
        return;
    }
    let ids = (p.uid.is_none() || p.gid.is_none())
        .then(|| ids(p.pid))
        .flatten();
    let comm = p.comm.is_none().then(|| comm(p.pid)).flatten();
    let exe = p.exe.is_none().then(|| exe(p.pid)).flatten();
    // The PID may have been given again while these were read.
    if stat(p.pid).map(|(_, s)| s) != Some(started) {
        return;
    }
    p.ppid.get_or_insert(ppid);
    if let Some((uid, gid)) = ids {
        p.uid.get_or_insert(uid);
        p.gid.get_or_insert(gid);
    }
    p.comm = p.comm.take().or(comm);
    p.exe = p.exe.take().or(exe);
}

fn comm(pid: i32) -> Option<Vec<u8>> {
    let mut c = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    if c.last() == Some(&b'\n') {
        c.pop();
    }
    Some(c)
}

/// The executable as the process sees it: both links name paths from the same place (this
/// process's root, or the root of the mount namespace they are in), so below a root of its
/// own (a `chroot`), the root's path is taken off.
fn exe(pid: i32) -> Option<Vec<u8>> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let root = std::fs::read_link(format!("/proc/{pid}/root")).ok();
    let inside = root
        .as_deref()
        .filter(|r| *r != Path::new("/"))
        .and_then(|r| exe.strip_prefix(r).ok())
        .map(|rest| Path::new("/").join(rest));
    Some(inside.unwrap_or(exe).as_os_str().as_bytes().to_vec())
}

/// The parent PID and the start time (ticks since boot) from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(i32, u64)> {
    let raw = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    crate::resolve::stat_fields(&raw)
}

/// The real uid and gid from `/proc/PID/status`.
fn ids(pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let real = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((real("Uid:")?, real("Gid:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_read_whole() {
        let mut p = Process {
            pid: std::process::id() as i32,
            ..Process::default()
        };
        complete(&mut p, since_boot());
        assert_eq!(p.ppid, Some(std::os::unix::process::parent_id() as i32));
        // SAFETY: plain getters.
        assert_eq!(p.uid, Some(unsafe { libc::getuid() }));
        assert_eq!(p.gid, Some(unsafe { libc::getgid() }));
        assert!(p.comm.as_ref().is_some_and(|c| !c.is_empty()));
        let exe = std::env::current_exe().unwrap();
        assert_eq!(p.exe.as_deref(), Some(exe.as_os_str().as_bytes()));
    }

    #[test]
    fn a_process_younger_than_the_decision_is_not_taken_for_it() {
        let mut p = Process {
            pid: std::process::id() as i32,
            ..Process::default()
        };
        // Decided at boot: before this process started.
        complete(&mut p, Duration::ZERO);
        assert_eq!(
            p,
            Process {
                pid: p.pid,
                ..Process::default()
            }
        );
    }

    #[test]
    fn what_the_kernel_gave_is_kept() {
        let mut p = Process {
            pid: std::process::id() as i32,
            comm: Some(b"from-bpf".to_vec()),
            uid: Some(4242),
            ..Process::default()
        };
        complete(&mut p, since_boot());
        assert_eq!(p.comm.as_deref(), Some(&b"from-bpf"[..]));
        assert_eq!(p.uid, Some(4242));
        assert!(p.exe.is_some());
    }
}
