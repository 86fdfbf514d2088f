//! A target: a forked process in a mount namespace of its own, chrooted into a prepared
//! root, that opens files on request, itself (the owner) or from forked children (not the
//! owner: their parent is the target, not the test).

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Ok,
    Eperm,
    Other(i32),
}

pub struct Target {
    pub pid: i32,
    cmd: std::fs::File,
    reply: std::fs::File,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is a valid array of two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Opens `path` and returns how it went, as a one-byte code.
fn try_open(path: &[u8], write: bool) -> u8 {
    let Ok(c) = CString::new(path) else { return 3 };
    let flags = if write {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    // SAFETY: c is NUL-terminated.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        0
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        1
    } else {
        2
    }
}

/// Renames `from` to `to` with `renameat2` flags, as a one-byte code like [`try_open`]'s.
fn try_rename(from: &[u8], to: &[u8], flags: u32) -> u8 {
    let (Ok(from), Ok(to)) = (CString::new(from), CString::new(to)) else {
        return 3;
    };
    // SAFETY: both paths are NUL-terminated.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        0
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
        1
    } else {
        2
    }
}

fn decode(code: u8) -> Opened {
    match code {
        0 => Opened::Ok,
        1 => Opened::Eperm,
        c => Opened::Other(c.into()),
    }
}

/// In a forked child: runs `f` in a grandchild and returns its exit code.
fn in_child(f: impl FnOnce() -> u8) -> u8 {
    // SAFETY: the caller is single-threaded (the target process).
    match unsafe { libc::fork() } {
        0 => unsafe { libc::_exit(f().into()) },
        pid if pid > 0 => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status) as u8
            } else {
                9
            }
        }
        _ => 9,
    }
}

impl Target {
    pub fn start(root: &Path) -> Result<Target> {
        let (cmd_r, cmd_w) = pipe()?;
        let (rep_r, rep_w) = pipe()?;
        let root_c = CString::new(root.as_os_str().as_encoded_bytes())?;
        // SAFETY: this test binary is single-threaded.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            drop(cmd_w);
            drop(rep_r);
            let code = serve(
                &root_c,
                std::fs::File::from(cmd_r),
                std::fs::File::from(rep_w),
            );
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        drop(cmd_r);
        drop(rep_w);
        let mut t = Target {
            pid,
            cmd: std::fs::File::from(cmd_w),
            reply: std::fs::File::from(rep_r),
        };
        // The target answers once it is in place.
        let mut ready = [0u8; 1];
        t.reply
            .read_exact(&mut ready)
            .context("target did not start")?;
        if ready[0] != b'R' {
            bail!("target failed to enter its root (code {})", ready[0]);
        }
        Ok(t)
    }

    fn request(&self, kind: u8, path: &str, write: bool, extra: &str) -> Result<Vec<u8>> {
        let line = format!("{} {} {} {}\n", kind as char, u8::from(write), path, extra);
        (&self.cmd).write_all(line.as_bytes())?;
        let mut len = [0u8; 4];
        (&self.reply).read_exact(&mut len)?;
        let mut buf = vec![0u8; u32::from_ne_bytes(len) as usize];
        (&self.reply).read_exact(&mut buf)?;
        Ok(buf)
    }

    /// The target itself (the owner) opens `path`.
    pub fn self_open(&self, path: &str, write: bool) -> Result<Opened> {
        Ok(decode(self.request(b'S', path, write, "")?[0]))
    }

    /// A child of the target (not the owner) opens `path`.
    pub fn child_open(&self, path: &str, write: bool) -> Result<Opened> {
        Ok(decode(self.request(b'C', path, write, "")?[0]))
    }

    /// A child of the target renames `from` to `to` with `renameat2` `flags`
    /// (`RENAME_EXCHANGE` swaps them).
    pub fn child_rename(&self, from: &str, to: &str, flags: u32) -> Result<Opened> {
        Ok(decode(
            self.request(b'R', from, false, &format!("{to} {flags}"))?[0],
        ))
    }

    /// `workers` children at once each open `denied` and `allowed` `opens` times; returns
    /// (EPERM count on denied, success count on allowed).
    pub fn child_load(
        &self,
        denied: &str,
        allowed: &str,
        workers: u32,
        opens: u32,
    ) -> Result<(u32, u32)> {
        let r = self.request(b'L', denied, false, &format!("{allowed} {workers} {opens}"))?;
        Ok((
            u32::from_ne_bytes(r[..4].try_into()?),
            u32::from_ne_bytes(r[4..8].try_into()?),
        ))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// The target's main loop (in the forked child).
fn serve(root: &CString, cmd: std::fs::File, mut reply: std::fs::File) -> i32 {
    // SAFETY: plain syscalls in a single-threaded child.
    let entered = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
            && libc::chroot(root.as_ptr()) == 0
            && libc::chdir(c"/".as_ptr()) == 0
    };
    if reply.write_all(if entered { b"R" } else { b"E" }).is_err() || !entered {
        return 1;
    }
    let mut lines = std::io::BufReader::new(cmd);
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::BufRead::read_line(&mut lines, &mut line).unwrap_or(0) == 0 {
            return 0;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (kind, write, path) = (parts[0], parts[1] == "1", parts[2].as_bytes().to_vec());
        let answer: Vec<u8> = match kind {
            "S" => vec![try_open(&path, write)],
            "C" => vec![in_child(|| try_open(&path, write))],
            "R" => {
                let flags = parts[4].parse().unwrap_or(0);
                vec![in_child(|| try_rename(&path, parts[3].as_bytes(), flags))]
            }
            _ => {
                let allowed = parts[3].as_bytes().to_vec();
                let workers: u32 = parts[4].parse().unwrap_or(1);
                let opens: u32 = parts[5].parse().unwrap_or(1);
                load(&path, &allowed, workers, opens)
            }
        };
        let mut msg = (answer.len() as u32).to_ne_bytes().to_vec();
        msg.extend(answer);
        if reply.write_all(&msg).is_err() {
            return 1;
        }
    }
}

/// Parallel openers; each reports its counts through a pipe.
fn load(denied: &[u8], allowed: &[u8], workers: u32, opens: u32) -> Vec<u8> {
    let Ok((r, w)) = pipe() else {
        return vec![0; 8];
    };
    let mut pids = Vec::new();
    for _ in 0..workers {
        // SAFETY: single-threaded.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let (mut d, mut a) = (0u32, 0u32);
            for _ in 0..opens {
                d += u32::from(try_open(denied, false) == 1);
                a += u32::from(try_open(allowed, false) == 0);
            }
            let mut msg = d.to_ne_bytes().to_vec();
            msg.extend(a.to_ne_bytes());
            let _ = (&std::fs::File::from(w.try_clone().expect("dup"))).write_all(&msg);
            // SAFETY: leaving the forked worker.
            unsafe { libc::_exit(0) };
        }
        pids.push(pid);
    }
    drop(w);
    let (mut d, mut a) = (0u32, 0u32);
    let mut r = std::fs::File::from(r);
    let mut buf = [0u8; 8];
    while r.read_exact(&mut buf).is_ok() {
        d += u32::from_ne_bytes(buf[..4].try_into().expect("4 bytes"));
        a += u32::from_ne_bytes(buf[4..].try_into().expect("4 bytes"));
    }
    for p in pids {
        // SAFETY: our own children.
        unsafe { libc::waitpid(p, std::ptr::null_mut(), 0) };
    }
    let mut out = d.to_ne_bytes().to_vec();
    out.extend(a.to_ne_bytes());
    out
}
