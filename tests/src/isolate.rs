//! One test case in a process of its own, under a deadline: a case that hangs (a target
//! that never answers, an agent that never exits) is killed together with everything it
//! started and reported as a failure, and the cases after it still run. For the runners
//! that execute inside the VM, where one hung case would otherwise cost the whole boot.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// The longest failure message a case passes back (a pipe holds 64 KiB; a case must never
/// block on writing it).
const MAX_MESSAGE: usize = 16 * 1024;

/// Runs `case` in a forked child that leads a process group of its own, and waits at most
/// `within` for it. On time-out the whole group is killed. Call from a single-threaded
/// process: the child is a copy of this one.
pub fn run(within: Duration, case: impl FnOnce() -> Result<()>) -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: fds is an array of two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors that we own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller is single-threaded.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(read);
        // SAFETY: plain system calls in the child; _exit skips the parent's destructors.
        unsafe {
            libc::setpgid(0, 0);
            let code = match case() {
                Ok(()) => 0,
                Err(e) => {
                    let msg = format!("{e:#}");
                    let mut end = msg.len().min(MAX_MESSAGE);
                    while !msg.is_char_boundary(end) {
                        end -= 1;
                    }
                    let _ = std::fs::File::from(write).write_all(&msg.as_bytes()[..end]);
                    1
                }
            };
            libc::_exit(code)
        }
    }
    drop(write);
    // Both sides set the group, so that a kill on time-out cannot miss a process the child
    // started before its own setpgid ran.
    // SAFETY: our own child.
    unsafe { libc::setpgid(pid, pid) };
    let deadline = Instant::now() + within;
    let status = loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            0 => {
                kill_group(pid);
                // SAFETY: reaping our own, now killed, child.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
                bail!("no result within {within:?}: killed");
            }
            r if r == pid => break status,
            _ => bail!("waitpid: {}", std::io::Error::last_os_error()),
        }
    };
    // Targets and agents the case left behind.
    kill_group(pid);
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        return Ok(());
    }
    // Whatever the child wrote is in the pipe by now; processes it left behind may still
    // hold the write end, so read what is there without waiting for its end.
    let mut msg = Vec::new();
    let _ = std::fs::File::from(read).read_to_end(&mut msg);
    let msg = String::from_utf8_lossy(&msg);
    if libc::WIFSIGNALED(status) {
        bail!("killed by signal {}", libc::WTERMSIG(status));
    }
    if msg.is_empty() {
        bail!("exited with code {}", libc::WEXITSTATUS(status));
    }
    bail!("{msg}")
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) on a process group we created.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}
