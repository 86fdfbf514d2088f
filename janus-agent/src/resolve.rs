//! Finding a target's file system and the guarded paths in it, without ever leaving it: a
//! symlink in a container that points at `/etc/shadow` means the container's, not the host's.

use std::ffi::CString;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use janus_api::GuardPath;

use crate::pin::PinnedProcess;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("pid {pid}: cannot open /proc/{pid}/root: {error}")]
    Root { pid: i32, error: io::Error },
    #[error("pid {pid}: cannot read /proc/{pid}/stat: {error}")]
    Stat { pid: i32, error: io::Error },
    #[error("pid {pid}: cannot hold the process (pidfd, /proc/{pid}): {error}")]
    Pin { pid: i32, error: io::Error },
    #[error("pid {pid}: no longer the process chosen (started at tick {start}): it ended")]
    Replaced { pid: i32, start: u64 },
    #[error("{path}: {error}")]
    Path { path: GuardPath, error: io::Error },
    #[error("{path}: resolves outside the container's root as the agent sees it")]
    Outside { path: GuardPath },
}

/// A file system object's identity: what a guard follows, whatever its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(st: &libc::statx) -> FileId {
        FileId {
            dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
        }
    }
}

/// What the agent needs to know of an object it holds: type, links, identity and the mount
/// it was reached through. `statx` on the descriptor: no path is looked up, and nothing is
/// asked of the file system (AT_STATX_DONT_SYNC: a FUSE server that never answers cannot
/// hold up an answering thread).
pub fn statx(fd: BorrowedFd<'_>) -> io::Result<libc::statx> {
    // SAFETY: statx is plain data the kernel fills in.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty C path with AT_EMPTY_PATH, and a statx buffer.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE | libc::STATX_NLINK | libc::STATX_INO | libc::STATX_MNT_ID,
            &mut st,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

pub fn is_dir(st: &libc::statx) -> bool {
    u32::from(st.stx_mode) & libc::S_IFMT == libc::S_IFDIR
}

/// A target process, pinned, and where its container's files are.
#[derive(Debug, Clone)]
pub struct TargetRoot {
    pub process: Arc<PinnedProcess>,
    /// While the runtime sets the container up (a start gate runs before `pivot_root`),
    /// the directory that becomes its root, as the process's mount namespace names it;
    /// None once the process's root is the container's.
    pub rootfs: Option<std::path::PathBuf>,
    /// Whether the process's parent is an owner too ([`TargetRoot::owners`]).
    parent_owns: bool,
}

impl TargetRoot {
    /// A container's init: its parent is the runtime or its shim, outside the container,
    /// and no owner (a PID the runtime leaves when it exits would be given again).
    pub fn container(process: Arc<PinnedProcess>, rootfs: Option<std::path::PathBuf>) -> Self {
        TargetRoot {
            process,
            rootfs,
            parent_owns: false,
        }
    }

    /// A process named on the command line, which an init of its own (tini) may have
    /// started: its parent is an owner too.
    pub fn process(process: PinnedProcess) -> TargetRoot {
        TargetRoot {
            process: Arc::new(process),
            rootfs: None,
            parent_owns: true,
        }
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// The processes `autoAllowOwner` lets through: the target, and its parent where
    /// [`TargetRoot::process`] says so.
    pub fn owners(&self) -> Result<[i32; 2], ResolveError> {
        let pid = self.pid();
        Ok(match self.parent_owns && self.rootfs.is_none() {
            true => [pid, self.process.stat()?.0],
            false => [pid, pid],
        })
    }
}

/// A target process's root directory, held open.
pub struct ContainerRoot {
    process: Arc<PinnedProcess>,
    root: OwnedFd,
    /// How the kernel renders this root in our paths: empty when the target has a mount
    /// namespace of its own (its root then renders as `/`), else the host path of a chroot.
    prefix: Vec<u8>,
    /// Before the runtime pivots into it (a start gate), how the root renders until then:
    /// its path in the target's mount namespace.
    setup_prefix: Vec<u8>,
    /// Seen in the root since: the setup prefix is the node's path, no longer the root's.
    pivoted: std::sync::atomic::AtomicBool,
    /// Inode of the target's mount namespace, to tell containers apart in diagnostics.
    pub mnt_ns: u64,
    /// The root directory: a process whose root it is acts in the container, whatever mounts
    /// it reaches files through.
    root_id: FileId,
    /// The target's PID namespace, when it is not the agent's own.
    pid_ns: Option<u64>,
}

/// `NS_GET_PARENT` (linux/nsfs.h): the parent of a PID namespace.
const NS_GET_PARENT: libc::c_ulong = 0xb702;
/// PID namespaces nest at most 32 deep (MAX_PID_NS_LEVEL).
const MAX_PID_NS_DEPTH: usize = 33;

fn own_ns_inode(ns: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/self/ns/{ns}"))
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

impl ContainerRoot {
    pub fn open(at: &TargetRoot) -> Result<ContainerRoot, ResolveError> {
        let process = at.process.clone();
        let pid = process.pid();
        let mut root = process
            .open("root", libc::O_DIRECTORY)
            .map_err(|error| ResolveError::Root { pid, error })?;
        if let Some(rootfs) = &at.rootfs {
            // In the process's root: a symlink on the way (a distribution's /var/run)
            // resolves there, not in the agent's.
            let rel = rootfs.as_os_str().as_encoded_bytes();
            let rel = rel.strip_prefix(b"/").unwrap_or(rel);
            root = openat2(
                root.as_fd(),
                rel,
                libc::O_PATH | libc::O_DIRECTORY,
                libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
            )
            .map_err(|error| ResolveError::Root { pid, error })?;
        }
        let mnt_ns = process.ns_inode("mnt").unwrap_or(0);
        let own_ns = at.rootfs.is_some() && Some(mnt_ns) != own_ns_inode("mnt");
        let mut prefix =
            fd_path(root.as_fd()).map_err(|error| ResolveError::Root { pid, error })?;
        if prefix == b"/" {
            prefix.clear();
        }
        // A root in a mount namespace of its own renders as `/` once the runtime has
        // pivoted into it, before the container runs a single instruction; until then, as
        // its path there.
        let setup_prefix = match own_ns {
            true => std::mem::take(&mut prefix),
            false => Vec::new(),
        };
        let st = nix::sys::stat::fstat(root.as_fd()).map_err(|e| ResolveError::Root {
            pid,
            error: e.into(),
        })?;
        let pid_ns = process
            .ns_inode("pid")
            .filter(|ns| Some(*ns) != own_ns_inode("pid"));
        Ok(ContainerRoot {
            process,
            root,
            prefix,
            setup_prefix,
            pivoted: std::sync::atomic::AtomicBool::new(false),
            mnt_ns,
            root_id: FileId {
                dev: st.st_dev,
                ino: st.st_ino,
            },
            pid_ns,
        })
    }

    /// While the runtime has not pivoted into this root yet, where it is mounted in the
    /// target's mount namespace: only the mounts there are the container's (the others are
    /// the node's, copied, and gone once it pivots).
    pub fn setting_up(&self) -> Option<&[u8]> {
        use std::sync::atomic::Ordering;
        if self.setup_prefix.is_empty() || self.pivoted.load(Ordering::Relaxed) {
            return None;
        }
        if self.process.root() == Some(self.root_id) {
            // Once: a later chroot of the target's does not make it a set-up again.
            self.pivoted.store(true, Ordering::Relaxed);
            return None;
        }
        Some(self.setup_prefix.as_slice())
    }

    /// The target process, pinned.
    pub fn process(&self) -> &PinnedProcess {
        &self.process
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// The root directory's identity.
    pub fn root_id(&self) -> FileId {
        self.root_id
    }

    /// The target's PID namespace, when it is not the agent's own.
    pub fn pid_ns(&self) -> Option<u64> {
        self.pid_ns
    }

    /// Opens `path` (O_PATH) inside the root; symlinks resolve as they would in the
    /// container. Returns the descriptor and the canonical path the kernel will report.
    pub fn resolve(&self, path: &GuardPath) -> Result<(OwnedFd, GuardPath), ResolveError> {
        let err = |error| ResolveError::Path {
            path: path.clone(),
            error,
        };
        let rel = match path.relative() {
            b"" => &b"."[..],
            rel => rel,
        };
        let fd = openat2(
            self.root.as_fd(),
            rel,
            libc::O_PATH,
            libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(err)?;
        let rendered = fd_path(fd.as_fd()).map_err(err)?;
        let canonical = self
            .to_container(&rendered)
            .and_then(|r| GuardPath::from_kernel(rendered[r].to_vec()))
            .ok_or_else(|| ResolveError::Outside { path: path.clone() })?;
        Ok((fd, canonical))
    }

    /// Where, in a path as the kernel renders it to us, the path the container sees lies;
    /// `None` when it lies outside this root (a host process reaching the file another way).
    /// Always a range of `rendered` itself, so the answering thread can use it in place.
    pub fn to_container(&self, rendered: &[u8]) -> Option<Range<usize>> {
        if !self.setup_prefix.is_empty() && !self.pivoted.load(std::sync::atomic::Ordering::Relaxed)
        {
            match rendered.strip_prefix(self.setup_prefix.as_slice()) {
                Some(b"") => return Some(0..1),
                Some(rest) if rest.starts_with(b"/") => {
                    return Some(self.setup_prefix.len()..rendered.len())
                }
                _ => {}
            }
        }
        if self.prefix.is_empty() {
            return rendered.starts_with(b"/").then_some(0..rendered.len());
        }
        match rendered.strip_prefix(self.prefix.as_slice())? {
            // The root itself: the prefix's own leading `/` stands for it.
            b"" => rendered.starts_with(b"/").then_some(0..1),
            rest if rest.starts_with(b"/") => Some(self.prefix.len()..rendered.len()),
            _ => None,
        }
    }
}

/// A process's root directory, as a target's is compared with it: a process of the
/// container that made a mount namespace of its own (`unshare -m`) reaches files through
/// copies of its mounts, but keeps its root. None once it is gone.
pub fn process_root(pid: i32) -> Option<FileId> {
    let path = CString::new(format!("/proc/{pid}/root")).ok()?;
    // SAFETY: statx is plain data the kernel fills in.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statx buffer; nothing is asked of the file
    // system the root lies on.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_INO,
            &mut st,
        )
    };
    (r == 0).then(|| FileId::of(&st))
}

/// The PID namespace of `pid` and every one it is nested in, innermost first (empty once
/// the process is gone): a process that made a PID namespace of its own is still in its
/// container's.
pub fn pid_ns_chain(pid: i32) -> Vec<u64> {
    let mut chain = Vec::new();
    let Ok(file) = std::fs::File::open(format!("/proc/{pid}/ns/pid")) else {
        return chain;
    };
    let mut ns = OwnedFd::from(file);
    for _ in 0..MAX_PID_NS_DEPTH {
        match nix::sys::stat::fstat(ns.as_fd()) {
            Ok(st) => chain.push(st.st_ino),
            Err(_) => break,
        }
        // SAFETY: NS_GET_PARENT takes no argument and returns a new descriptor or -1.
        let parent = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_PARENT) };
        if parent < 0 {
            // The initial namespace has no parent.
            break;
        }
        // SAFETY: a descriptor the kernel just gave us.
        ns = unsafe { OwnedFd::from_raw_fd(parent) };
    }
    chain
}

/// Reads what `/proc/self/fd/N` links to: the kernel's path for an open file.
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = [0u8; libc::PATH_MAX as usize * 2];
    let n = fd_path_into(fd, &mut buf)?;
    Ok(buf[..n].to_vec())
}

/// [`fd_path`] into a caller's buffer, allocating nothing (the answering path uses it).
pub fn fd_path_into(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut link = [0u8; 32];
    let link = {
        use std::io::Write;
        let mut w = &mut link[..];
        write!(w, "/proc/self/fd/{}\0", fd.as_raw_fd())?;
        let len = 32 - w.len();
        &link[..len]
    };
    // SAFETY: `link` is NUL-terminated; `buf` is writable for its length.
    let n = unsafe { libc::readlink(link.as_ptr().cast(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n == buf.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "path too long"));
    }
    Ok(n)
}

/// `openat2` with the given resolve flags; `dir` None means the current directory.
pub fn openat2(
    dir: BorrowedFd<'_>,
    path: &[u8],
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; zero is valid for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    loop {
        // SAFETY: a NUL-terminated path and an open_how of the size we pass.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just gave us this descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let e = io::Error::last_os_error();
        // openat2 asks callers to retry RESOLVE_IN_ROOT lookups that raced a rename.
        if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Opens an absolute host path, or one relative to `dir`, with O_PATH and `extra` flags.
pub fn open_path(
    dir: Option<BorrowedFd<'_>>,
    path: &[u8],
    extra: libc::c_int,
) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC | extra) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The parent PID and the start time (ticks since boot) of a `/proc/PID/stat`.
pub fn stat_fields(stat: &[u8]) -> Option<(i32, u64)> {
    // The command name may contain anything, ')' included: the fields start after the last.
    let after = stat
        .iter()
        .rposition(|b| *b == b')')
        .map(|i| &stat[i + 1..])?;
    let fields: Vec<&str> = std::str::from_utf8(after)
        .ok()?
        .split_whitespace()
        .collect();
    // After the name: state (3), ppid (4), ..., starttime (22).
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Opens an entry of `parent` by name without following symlinks or leaving `parent`.
pub fn open_entry(parent: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<OwnedFd> {
    openat2(
        parent,
        name,
        libc::O_PATH | libc::O_NOFOLLOW,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

pub fn for_each_entry(
    dir: BorrowedFd<'_>,
    mut f: impl FnMut(&[u8], OwnedFd),
) -> Vec<(Vec<u8>, io::Error)> {
    // Listing opens the directory, perhaps a marked one: the fanotify answering thread lets
    // the agent's own opens through, so this must never run on that thread.
    use nix::dir::{Dir, Type};
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let mut failed = Vec::new();
    let mut listing = match Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(l) => l,
        Err(nix::Error::ENOENT) => return failed,
        Err(e) => {
            failed.push((b".".to_vec(), e.into()));
            return failed;
        }
    };
    for entry in listing.iter() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                failed.push((b".".to_vec(), e.into()));
                break;
            }
        };
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." || entry.file_type() == Some(Type::Symlink) {
            continue;
        }
        match open_entry(dir, name) {
            Ok(fd) => f(name, fd),
            // Gone already: nothing to mark.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => failed.push((name.to_vec(), e)),
        }
    }
    failed
}

/// Whether `fd` lies on a kernel file system (procfs, sysfs, cgroupfs) whose objects are no
/// files to guard: a guarded path made a symlink to `/` must not mark every process.
pub fn on_kernel_fs(fd: BorrowedFd<'_>) -> bool {
    match nix::sys::statfs::fstatfs(fd) {
        Ok(fs) => [
            nix::sys::statfs::PROC_SUPER_MAGIC,
            nix::sys::statfs::SYSFS_MAGIC,
            nix::sys::statfs::CGROUP_SUPER_MAGIC,
            nix::sys::statfs::CGROUP2_SUPER_MAGIC,
            nix::sys::statfs::DEBUGFS_MAGIC,
            nix::sys::statfs::SECURITYFS_MAGIC,
            nix::sys::statfs::BPF_FS_MAGIC,
        ]
        .contains(&fs.filesystem_type()),
        Err(_) => false,
    }
}
