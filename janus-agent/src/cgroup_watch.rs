//! Learning of a pod's new container the moment its runtime makes the container's cgroup,
//! rather than at the next rescan: inotify on the kubelet's cgroup tree.
//!
//! The kubelet lays out `kubepods[.slice]/[<qos>/]<pod>/<container>` (see [`crate::pods`]);
//! every directory down to the pods' is watched, and a directory created in a pod's is a
//! container's. On cgroup v1 one hierarchy is watched (each holds the same tree). A watch
//! reaches one level, so each new QoS or pod directory is watched as it appears.
//!
//! The runtime makes the cgroup, moves its init process in, and only then pivots that
//! process into the container's root; [`Births::settled`] waits (bounded) for that before
//! the caller looks the container up, since a process still in the host's root cannot be
//! guarded yet ([`crate::pods::rooted`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fanotify::created::{CreateWatch, Created};
use crate::fanotify::group::AlignedBuf;
use crate::fanotify::FanotifyError;

#[derive(Debug, thiserror::Error)]
pub enum CgroupWatchError {
    #[error("watching the cgroup tree at {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: FanotifyError,
    },
    #[error("reading the cgroup tree's events: {0}")]
    Read(#[source] io::Error),
}

/// What a watched directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    /// The hierarchy's root, where `kubepods` appears.
    Root,
    /// `kubepods` or a QoS class below it.
    Kubepods,
    /// A pod's cgroup: what appears in it is a container's.
    Pod,
}

impl Level {
    /// What a directory `name` made in a directory of this level is, if it is watched.
    fn child(self, name: &str) -> Option<Level> {
        match self {
            Level::Root => name.starts_with("kubepods").then_some(Level::Kubepods),
            Level::Kubepods if crate::pods::pod_uid(name).is_some() => Some(Level::Pod),
            Level::Kubepods => (name.starts_with("kubepods")
                || matches!(name, "burstable" | "besteffort"))
            .then_some(Level::Kubepods),
            Level::Pod => None,
        }
    }
}

/// A container's cgroup, just made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Birth {
    pub pod_uid: String,
    pub cgroup: PathBuf,
}

/// The watch on one hierarchy's pod cgroups.
pub struct Births {
    watch: CreateWatch,
    hierarchy: PathBuf,
    dirs: HashMap<i32, (PathBuf, Level)>,
    /// Directories that could not be watched (a full inotify quota, say): their pods'
    /// containers wait for the rescan.
    unwatched: usize,
    buf: Box<AlignedBuf>,
}

/// The hierarchy to watch under the cgroup file system mounted at `root`: the root itself on
/// cgroup v2, else the first v1 hierarchy there (every one holds the kubelet's tree).
pub fn hierarchy(root: &Path) -> PathBuf {
    if root.join("cgroup.controllers").exists() {
        return root.to_owned();
    }
    ["pids", "memory", "cpu,cpuacct", "cpu", "systemd"]
        .iter()
        .map(|h| root.join(h))
        .find(|p| p.join("cgroup.procs").exists())
        .unwrap_or_else(|| root.to_owned())
}

impl Births {
    /// Watches the kubelet's tree below `hierarchy` as it is now and as it grows.
    pub fn new(hierarchy: &Path) -> Result<Births, CgroupWatchError> {
        let watch = CreateWatch::new().map_err(|source| CgroupWatchError::Watch {
            path: hierarchy.to_owned(),
            source,
        })?;
        let mut births = Births {
            watch,
            hierarchy: hierarchy.to_owned(),
            dirs: HashMap::new(),
            unwatched: 0,
            buf: AlignedBuf::boxed(),
        };
        // What runs already is found by the agent's first scan.
        births.add(hierarchy.to_owned(), Level::Root, &mut Vec::new());
        if births.dirs.is_empty() {
            return Err(CgroupWatchError::Watch {
                path: hierarchy.to_owned(),
                source: FanotifyError::Watch(io::Error::from(io::ErrorKind::NotFound)),
            });
        }
        if !births.dirs.values().any(|(_, l)| *l != Level::Root) {
            tracing::warn!(hierarchy = %hierarchy.display(), "no kubepods cgroup here yet: watching for one (a kubelet --cgroup-root below it is not followed)");
        }
        Ok(births)
    }

    /// Whether some directory of the tree could not be watched.
    pub fn incomplete(&self) -> bool {
        self.unwatched > 0
    }

    /// Watches `dir` and what it holds already, down to the pods' cgroups; the containers'
    /// cgroups found in those go to `born` (the runtime makes a pod's first one with the
    /// pod's, before the pod's can be watched).
    /// A directory that cannot be watched is logged and counted ([`Births::incomplete`]).
    fn add(&mut self, dir: PathBuf, level: Level, born: &mut Vec<Birth>) {
        let watched = std::fs::File::open(&dir)
            .map_err(FanotifyError::Watch)
            .and_then(|fd| self.watch.watch(fd.as_fd()));
        match watched {
            Ok(wd) => {
                self.dirs.insert(wd, (dir.clone(), level));
            }
            // Removed before it could be watched: nothing in it to learn of.
            Err(FanotifyError::Watch(e)) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a cgroup directory: its new containers wait for the rescan");
                self.unwatched += 1;
                return;
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.path().is_dir() {
                continue;
            }
            if let Some(name) = entry.file_name().to_str() {
                self.made(&dir, level, name, born);
            }
        }
    }

    /// Directory `name` appeared in `dir`, watched as `level`.
    fn made(&mut self, dir: &Path, level: Level, name: &str, born: &mut Vec<Birth>) {
        let path = dir.join(name);
        match level.child(name) {
            Some(child) => self.add(path, child, born),
            // CRI-O's monitor has a cgroup of its own in the pod: no container.
            None if level == Level::Pod && name.contains("conmon") => {}
            None if level == Level::Pod => {
                let pod = dir.file_name().and_then(|n| n.to_str());
                if let Some(pod_uid) = pod.and_then(crate::pods::pod_uid) {
                    born.push(Birth {
                        pod_uid,
                        cgroup: path,
                    });
                }
            }
            None => {}
        }
    }

    /// Waits (up to `timeout`) for containers' cgroups to be made; `None` when some may have
    /// gone unreported (the queue overflowed), so every held pod must be looked at again:
    /// the tree is walked again then, so that pods made meanwhile are watched.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Vec<Birth>>, CgroupWatchError> {
        let mut fds = [nix::poll::PollFd::new(
            self.watch.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) => return Ok(Some(Vec::new())),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Some(Vec::new())),
            Err(e) => return Err(CgroupWatchError::Read(e.into())),
        }
        let events = match self.watch.read(&mut self.buf) {
            Ok(events) => events,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(Vec::new())),
            Err(e) => return Err(CgroupWatchError::Read(e)),
        };
        let mut born = Vec::new();
        let mut complete = true;
        for event in events {
            match event {
                Created::Overflow => complete = false,
                Created::Entry {
                    parent,
                    name,
                    is_dir: true,
                    ..
                } => {
                    let Some((dir, level)) = self.dirs.get(&parent).cloned() else {
                        continue;
                    };
                    if let Ok(name) = String::from_utf8(name) {
                        self.made(&dir, level, &name, &mut born);
                    }
                }
                Created::Gone { wd } => {
                    self.dirs.remove(&wd);
                }
                _ => {}
            }
        }
        if !complete {
            // Watching a directory again gives its watch again: only new ones are added.
            self.unwatched = 0;
            self.add(self.hierarchy.clone(), Level::Root, &mut Vec::new());
        }
        Ok(complete.then_some(born))
    }
}

impl Birth {
    /// Waits (up to `timeout`) until a process of the container runs in a root of its own,
    /// reading its `cgroup.procs` every millisecond: neither joining a cgroup nor
    /// `pivot_root` can be waited on. False at the deadline.
    pub fn settled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let procs = self.cgroup.join("cgroup.procs");
        loop {
            let pids = std::fs::read_to_string(&procs).unwrap_or_default();
            if pids
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .any(crate::pods::rooted)
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubelets_layouts_are_followed_down_to_the_pods() {
        use Level::*;
        assert_eq!(Root.child("kubepods"), Some(Kubepods));
        assert_eq!(Root.child("kubepods.slice"), Some(Kubepods));
        assert_eq!(Root.child("system.slice"), None);
        assert_eq!(Kubepods.child("besteffort"), Some(Kubepods));
        assert_eq!(Kubepods.child("kubepods-burstable.slice"), Some(Kubepods));
        assert_eq!(Kubepods.child("pod1234-ab"), Some(Pod));
        assert_eq!(
            Kubepods.child("kubepods-besteffort-pod12_34.slice"),
            Some(Pod)
        );
        assert_eq!(Kubepods.child("cpu.stat"), None);
        assert_eq!(Pod.child("cri-containerd-abc.scope"), None);
    }

    /// A tree laid out as the kubelet's cgroupfs driver does, in a plain directory: a pod
    /// made after the watch began is followed, and a container made in it is reported.
    #[test]
    fn a_container_made_in_a_new_pod_is_reported() {
        let dir = std::env::temp_dir().join(format!("janus-births-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("kubepods/besteffort")).unwrap();
        let mut births = Births::new(&dir).unwrap();
        std::fs::create_dir_all(dir.join("kubepods/besteffort/pod42/c1")).unwrap();
        // The pod's directory is watched only once its creation is read: c1, made before
        // that, is found by the walk of the new pod; c2, made after, by the watch.
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.iter().any(|b: &Birth| b.cgroup.ends_with("c2")) {
            assert!(Instant::now() < deadline, "c2 not reported: {seen:?}");
            seen.extend(births.next(Duration::from_millis(100)).unwrap().unwrap());
            if births.dirs.values().any(|(_, l)| *l == Level::Pod) {
                std::fs::create_dir_all(dir.join("kubepods/besteffort/pod42/c2")).unwrap();
            }
        }
        let names: Vec<_> = seen.iter().map(|b| b.cgroup.file_name().unwrap()).collect();
        assert_eq!(names, ["c1", "c2"]);
        assert!(seen.iter().all(|b| b.pod_uid == "42"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
