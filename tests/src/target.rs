//! Targets: a process in its own mount namespace, chrooted into a directory of our making,
//! as a container's init is. Its root holds a static busybox, so the same code runs on the
//! host and inside the VM that tests the BPF backend.

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::wait;

/// Where the static busybox is found, on the host and in the VM.
pub const BUSYBOX: &str = "/bin/busybox";

/// How long one operation in a target may take: far beyond any answer an agent gives, so
/// reached only when a permission event goes unanswered, which then fails the test.
const OPERATION_DEADLINE: Duration = Duration::from_secs(30);

/// A directory that becomes a target's `/`, removed on drop.
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// A fresh root under `parent` with `/bin/busybox` and `/bin/sh`.
    pub fn new(parent: &Path, name: &str) -> Result<Root> {
        let dir = parent.join(format!("janus-{name}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        let root = Root { dir };
        root.mkdir("/bin")?;
        // A link, not a copy: while a copy is being written, a fork in another thread of
        // the test process inherits the write descriptor and exec fails with ETXTBSY.
        let dest = root.host("/bin/busybox");
        if fs::hard_link(BUSYBOX, &dest).is_err() {
            // Across file systems: one copy in `parent`, linked into each of its roots (a
            // thousand copies would not fit a small VM's memory).
            let shared = parent.join(".busybox");
            if !shared.exists() {
                let partial = parent.join(format!(".busybox.{}", std::process::id()));
                fs::copy(BUSYBOX, &partial)
                    .with_context(|| format!("copying {BUSYBOX} (install busybox-static)"))?;
                fs::rename(&partial, &shared)?;
            }
            fs::hard_link(&shared, &dest)
                .with_context(|| format!("linking {} into a root", shared.display()))?;
        }
        std::os::unix::fs::symlink("busybox", root.host("/bin/sh"))?;
        Ok(root)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host path of `path` inside this root (`path` is absolute inside it).
    pub fn host(&self, path: impl AsRef<[u8]>) -> PathBuf {
        let rel = path.as_ref().strip_prefix(b"/").unwrap_or(path.as_ref());
        self.dir.join(std::ffi::OsStr::from_bytes(rel))
    }

    pub fn mkdir(&self, path: impl AsRef<[u8]>) -> Result<()> {
        let p = self.host(path);
        fs::create_dir_all(&p).with_context(|| format!("mkdir {}", p.display()))
    }

    /// Writes a file, creating its directory.
    pub fn write(&self, path: impl AsRef<[u8]>, content: &[u8]) -> Result<()> {
        let p = self.host(path);
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&p, content).with_context(|| format!("writing {}", p.display()))
    }

    /// An executable shell script.
    pub fn script(&self, path: impl AsRef<[u8]>, body: &str) -> Result<()> {
        let p = self.host(path.as_ref());
        self.write(path, format!("#!/bin/busybox sh\n{body}\n").as_bytes())?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    pub fn symlink(&self, path: impl AsRef<[u8]>, to: &str) -> Result<()> {
        let p = self.host(path);
        std::os::unix::fs::symlink(to, &p).with_context(|| format!("symlink {}", p.display()))
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What an attempt to use a file came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// It worked; the output, if the operation reads.
    Ok(String),
    /// EPERM: what a guard's deny looks like.
    Denied,
    /// Anything else (a missing file, say), with what was printed.
    Failed(String),
}

impl Access {
    fn from_output(ok: bool, out: &str) -> Access {
        if out.contains("Operation not permitted") {
            Access::Denied
        } else if ok {
            Access::Ok(out.trim_end().to_owned())
        } else {
            Access::Failed(out.trim_end().to_owned())
        }
    }
}

/// A running target: a busybox shell that is PID `pid`, reads commands from us and runs the
/// ones we send in itself, so that it is the owner of what it opens.
pub struct Target {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Target {
    /// Starts a shell in a new mount namespace whose root is `root` (bind-mounted onto
    /// itself, so the container's files are reached through mounts of its own).
    pub fn start(root: &Root) -> Result<Target> {
        Target::start_in(root.dir())
    }

    /// [`Target::start`] in any directory that holds `/bin/busybox` (an overlay mount, say).
    pub fn start_in(dir: &Path) -> Result<Target> {
        let dir = CString::new(dir.as_os_str().as_bytes())?;
        let mut cmd = Command::new(BUSYBOX);
        cmd.args(["sh", "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                own_mount_namespace(&dir)?;
                check(libc::chroot(dir.as_ptr()))?;
                check(libc::chdir(c"/".as_ptr()))?;
                Ok(())
            });
        }
        // A copied busybox (across file systems) can still be held open for writing by
        // a fork elsewhere in the process for a moment: ETXTBSY passes.
        let mut child = wait::until(
            "busybox to be executable",
            Duration::from_secs(5),
            || match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => None,
                other => Some(other),
            },
        )?
        .context("starting a target (busybox sh in its own mount namespace)")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut target = Target {
            child,
            stdin,
            stdout,
        };
        // The shell answers once it runs inside its root.
        match target.owner_run("echo ready")? {
            Access::Ok(s) if s == "ready" => Ok(target),
            other => bail!("target did not start: {other:?}"),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Runs `snippet` in the target's own shell process (builtins only, so the owner itself
    /// opens the files) and reports what happened.
    pub fn owner_run(&mut self, snippet: &str) -> Result<Access> {
        const END: &str = "@@janus-rc=";
        writeln!(self.stdin, "{{ {snippet} ; }} 2>&1; echo \"{END}$?\"")
            .context("writing to the target")?;
        self.stdin.flush()?;
        let deadline = Instant::now() + OPERATION_DEADLINE;
        let mut out = String::new();
        loop {
            if self.stdout.buffer().is_empty() {
                readable_by(self.stdout.get_ref(), deadline)
                    .with_context(|| format!("the target running {snippet:?}"))?;
            }
            let mut line = String::new();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("target {} exited", self.pid());
            }
            if let Some(rc) = line.trim_end().strip_prefix(END) {
                return Ok(Access::from_output(rc == "0", &out));
            }
            out.push_str(&line);
        }
    }

    /// The owner reads the first line of `path` (the shell opens it itself).
    pub fn owner_read(&mut self, path: &str) -> Result<Access> {
        self.owner_run(&format!("read -r line < '{path}' && echo \"$line\""))
    }

    /// Runs `argv` as a new process that entered the target, as `kubectl exec` does: same
    /// mount namespace and root, not the owner.
    pub fn exec(&self, argv: &[&str]) -> Result<Access> {
        // On a thread, to bound it: opening the target's root and `spawn` (which waits for
        // the child's execve) both wait on the agent's answer if the root or the executable
        // is guarded.
        let (pid, args): (_, Vec<String>) =
            (self.pid(), argv.iter().map(|a| a.to_string()).collect());
        let ran = bounded(&format!("{argv:?} in the target"), move || {
            command_in(pid, &args).map(|mut c| c.output())
        })?;
        let out = match ran {
            Ok(Ok(out)) => out,
            // execve itself refused: an exec guard.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EPERM) => return Ok(Access::Denied),
            Ok(Err(e)) => return Err(e).context("running a command in the target"),
            Err(e) => return Err(e),
        };
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(Access::from_output(out.status.success(), &text))
    }

    /// Maps `path` for reading from inside the target and prints the mapping, by a process
    /// that is not the owner: the reads are page faults, which no read(2) hook sees. The
    /// process is a fork of this one that enters the target and never execs (a static
    /// helper is not at hand in every root), so it does only system calls.
    pub fn map_read(&self, path: &str) -> Result<Access> {
        let shown = path.to_owned();
        let path = CString::new(path)?;
        let mut cmd = self.command(&[BUSYBOX])?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: only async-signal-safe system calls, then _exit: nothing runs after a
        // fork that could take a lock another thread held.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut st: libc::stat = std::mem::zeroed();
                check(libc::fstat(fd, &mut st))?;
                let len = st.st_size as usize;
                if len == 0 {
                    libc::_exit(0);
                }
                let map = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE,
                    fd,
                    0,
                );
                if map == libc::MAP_FAILED {
                    return Err(std::io::Error::last_os_error());
                }
                // A page fault from user space: refused, it is a SIGBUS.
                std::ptr::read_volatile(map as *const u8);
                libc::write(1, map, len);
                libc::_exit(0);
            });
        }
        let out = match bounded(&format!("mapping {shown} in the target"), move || {
            cmd.output()
        })? {
            Ok(out) => out,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Ok(Access::Denied),
            Err(e) => return Err(e).context("mapping a file in the target"),
        };
        // A page fault refused (pre-content events) kills with SIGBUS.
        if std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(libc::SIGBUS) {
            return Ok(Access::Denied);
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(Access::from_output(out.status.success(), &text))
    }

    /// Opens `path` (for writing when `write`) from a process that entered the target and
    /// is not its owner: one open(2), no program run in the root.
    pub fn open_as_other(&self, path: &str, write: bool) -> Result<Access> {
        let path = CString::new(path)?;
        let flags = if write {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        self.syscall_as_other(move || open_close(&path, flags))
    }

    /// Renames `from` to `to` with renameat2 `flags` (`RENAME_EXCHANGE` swaps them), from a
    /// process that entered the target and is not its owner.
    pub fn rename_as_other(&self, from: &str, to: &str, flags: u32) -> Result<Access> {
        let (from, to) = (CString::new(from)?, CString::new(to)?);
        self.syscall_as_other(move || {
            // SAFETY: NUL-terminated paths.
            errno_of(unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    flags,
                )
            })
        })
    }

    /// One system call by a process that enters the target (not its owner) and exits with
    /// the errno `call` returns (0: it worked), bounded as `exec` is.
    fn syscall_as_other(
        &self,
        call: impl Fn() -> libc::c_int + Send + Sync + 'static,
    ) -> Result<Access> {
        let mut cmd = self.command(&[BUSYBOX])?;
        // SAFETY: only async-signal-safe system calls, then _exit.
        unsafe {
            cmd.pre_exec(move || libc::_exit(call().min(255)));
        }
        let status = bounded("a system call in the target", move || cmd.status())?
            .context("a process entering the target")?;
        Ok(match status.code() {
            Some(0) => Access::Ok(String::new()),
            Some(libc::EPERM) => Access::Denied,
            other => Access::Failed(match other {
                Some(errno) => std::io::Error::from_raw_os_error(errno).to_string(),
                None => format!("{status}"),
            }),
        })
    }

    /// `workers` processes that entered the target (none its owner) at once each open
    /// `denied` and `allowed` `opens` times: (EPERM answers on `denied`, opens of
    /// `allowed` that worked).
    pub fn load(
        &self,
        denied: &str,
        allowed: &str,
        workers: u32,
        opens: u32,
    ) -> Result<(u32, u32)> {
        let (denied, allowed) = (CString::new(denied)?, CString::new(allowed)?);
        let mut running = Vec::new();
        for _ in 0..workers {
            let mut cmd = self.command(&[BUSYBOX])?;
            cmd.stdout(Stdio::piped());
            let (denied, allowed) = (denied.clone(), allowed.clone());
            // SAFETY: only async-signal-safe system calls, then _exit.
            unsafe {
                cmd.pre_exec(move || {
                    let (mut refused, mut opened) = (0u32, 0u32);
                    for _ in 0..opens {
                        refused += u32::from(open_close(&denied, libc::O_RDONLY) == libc::EPERM);
                        opened += u32::from(open_close(&allowed, libc::O_RDONLY) == 0);
                    }
                    let mut counts = [0u8; 8];
                    counts[..4].copy_from_slice(&refused.to_ne_bytes());
                    counts[4..].copy_from_slice(&opened.to_ne_bytes());
                    libc::write(1, counts.as_ptr().cast(), counts.len());
                    libc::_exit(0)
                });
            }
            // At once: spawning waits for each to end (it never execs).
            running.push(std::thread::spawn(move || cmd.output()));
        }
        let (mut refused, mut opened) = (0, 0);
        for worker in running {
            let out = worker
                .join()
                .map_err(|_| anyhow::anyhow!("a load worker panicked"))?
                .context("a load worker")?;
            let counts: [u8; 8] = out
                .stdout
                .as_slice()
                .try_into()
                .context("a worker's counts")?;
            refused += u32::from_ne_bytes(counts[..4].try_into()?);
            opened += u32::from_ne_bytes(counts[4..].try_into()?);
        }
        Ok((refused, opened))
    }

    /// `cat path` from inside the target, by a process that is not the owner.
    pub fn cat(&self, path: &str) -> Result<Access> {
        self.exec(&[BUSYBOX, "cat", path])
    }

    /// A command that enters the target when spawned.
    pub fn command(&self, argv: &[&str]) -> Result<Command> {
        command_in(self.pid(), argv)
    }

    /// Ends the target and waits for it.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `f` on a thread of its own and waits for it at most [`OPERATION_DEADLINE`]:
/// opening a target's root, spawning a process that enters it and reading a guarded file
/// all wait on the agent's answer, which a broken agent never gives.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(OPERATION_DEADLINE) {
        Ok(v) => Ok(v),
        Err(_) => bail!("{what}: no result within {OPERATION_DEADLINE:?}"),
    }
}

/// The errno of a system call's result `r`, 0 if it worked. Async-signal-safe.
fn errno_of(r: libc::c_int) -> libc::c_int {
    match r {
        r if r < 0 => std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(255),
        _ => 0,
    }
}

/// Opens `path` with `flags` and closes it: the open's errno, 0 if it worked.
/// Async-signal-safe.
fn open_close(path: &std::ffi::CStr, flags: libc::c_int) -> libc::c_int {
    // SAFETY: a NUL-terminated path; the descriptor is ours to close.
    errno_of(unsafe {
        match libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) {
            fd if fd >= 0 => libc::close(fd),
            r => r,
        }
    })
}

/// A command that enters process `pid`'s mount namespace and root when spawned.
fn command_in<S: AsRef<std::ffi::OsStr>>(pid: i32, argv: &[S]) -> Result<Command> {
    let ns = open_fd(&format!("/proc/{pid}/ns/mnt"), libc::O_RDONLY)?;
    let root = open_fd(
        &format!("/proc/{pid}/root"),
        libc::O_RDONLY | libc::O_DIRECTORY,
    )?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null());
    // SAFETY: only async-signal-safe system calls between fork and exec. The
    // descriptors move into the closure and stay open until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS))?;
            check(libc::fchdir(root.as_raw_fd()))?;
            check(libc::chroot(c".".as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            Ok(())
        });
    }
    Ok(cmd)
}

/// Waits until `fd` has something to read, or fails once `deadline` has passed.
fn readable_by(fd: &impl AsRawFd, deadline: Instant) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer within {OPERATION_DEADLINE:?}");
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n > 0 => return Ok(()),
            0 => {}
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => bail!("poll: {}", std::io::Error::last_os_error()),
        }
    }
}

/// Between fork and exec: a mount namespace of the caller's own, with `dir` bind-mounted
/// onto itself, so that a root made of it is reached through mounts of its own.
fn own_mount_namespace(dir: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: plain syscall with an integer argument.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    let none = std::ptr::null();
    // SAFETY: NUL-terminated paths, no data.
    check(unsafe {
        libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // SAFETY: as above.
    check(unsafe {
        libc::mount(
            dir.as_ptr(),
            dir.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })
}

pub(crate) fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn open_fd(path: &str, flags: libc::c_int) -> Result<OwnedFd> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    Ok(f.into())
}

/// A container as its runtime sets it up: a process in a mount namespace of its own with its
/// root mounted but not entered, held before its first instruction until
/// [`Starting::start`], as runc holds it while its createRuntime hooks run. The process
/// waits in the node's busybox shell, then becomes (exec, same PID) busybox's `chroot`,
/// which enters the root and execs the container's command.
pub struct Starting {
    child: Child,
}

impl Starting {
    /// Sets up `root` for `argv`, which runs in it once started.
    pub fn new(root: &Root, argv: &[&str]) -> Result<Starting> {
        let dir = CString::new(root.dir().as_os_str().as_bytes())?;
        let mut cmd = Command::new(BUSYBOX);
        cmd.args(["sh", "-c", "read go && exec \"$0\" chroot \"$@\"", BUSYBOX])
            .arg(root.dir())
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || own_mount_namespace(&dir));
        }
        // Set up once spawned: the mounts are made before the shell runs.
        let child = cmd.spawn().context("setting up a container")?;
        Ok(Starting { child })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Lets it run its first instruction, and waits for its end: what it printed.
    pub fn start(mut self) -> Result<String> {
        self.child.stdin.take().expect("piped").write_all(b"go\n")?;
        let out = self.child.wait_with_output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(text)
    }
}
