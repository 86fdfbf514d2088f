//! Finding a pod's containers on this node from cgroup membership.
//!
//! Every process names its cgroups in `/proc/PID/cgroup` (one line per v1 hierarchy, `0::`
//! for v2). A container's cgroup ends in its ID, whatever the layout:
//! - kubelet, cgroupfs driver: `/kubepods[/burstable|/besteffort]/pod<uid>/<id>`
//! - kubelet, systemd driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope`, `docker-<id>.scope`)
//! - plain containerd (`ctr run`) puts a container at `/<namespace>/<id>`, in no pod: never
//!   guarded through the API.
//!
//! A container is only ever looked for below the cgroup of the pod a request names (the pod
//! UID in the path, as the kubelet lays it out): an ID that names a host unit
//! (`init.scope`, `kubelet.service`), a container outside any pod, or another pod's
//! container is not that pod's container, and a request naming one is refused
//! ([`misplaced`]).
//!
//! Membership alone does not make a process the container's: runc, `kubectl exec` and
//! `ctr task exec` enter the cgroup too. The container's own process is its init: of the
//! members in the outermost PID namespace among them (the fewest `NSpid` entries), the one
//! that is PID 1 there, else the earliest started. A process of the container that makes a
//! PID namespace of its own (`unshare -pf`) is PID 1 of a deeper one and never wins, whatever
//! its PID. That process is also the owner that `autoAllowOwner` allows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::pin::{PinnedProcess, ProcDir};
use crate::resolve::ResolveError;

/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`, fixed by the kernel).
const INITIAL_CGROUP_NS: u64 = 0xEFFF_FFFB;

/// `/proc/PID/cgroup` names cgroups relative to the reader's cgroup namespace. containerd
/// gives every unprivileged container a private one on cgroup v2, where the agent would
/// see another pod's container as `/../../pod<uid>/<id>`, with no kubepods in it, and find
/// nothing. The agent joins the initial one, through the first process it can see in it
/// (PID 1 with hostPID), so that every path is the kubelet's. Must run before any other
/// thread starts: setns changes the calling thread only.
pub fn join_host_cgroup_namespace() -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let ns_of = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/cgroup")).map(|m| m.ino());
    match ns_of("self") {
        Ok(INITIAL_CGROUP_NS) => return Ok(()),
        Ok(_) => {}
        // No cgroup namespaces in this kernel: paths are the host's already.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let failed = |what: String| {
        std::io::Error::other(format!(
            "{what}; in a cgroup namespace of its own, the agent finds no container by its cgroup"
        ))
    };
    let host = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .find(|pid| ns_of(pid).ok() == Some(INITIAL_CGROUP_NS))
        .ok_or_else(|| {
            failed("no process in the host's cgroup namespace is visible (hostPID?)".into())
        })?;
    let ns = std::fs::File::open(format!("/proc/{host}/ns/cgroup"))?;
    // SAFETY: setns with a namespace descriptor we hold open.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(failed(format!(
            "joining the host's cgroup namespace (/proc/{host}/ns/cgroup): {e}"
        )));
    }
    tracing::info!(through = %host, "joined the host's cgroup namespace");
    Ok(())
}

/// A container ID as the kubelet reports it, `<runtime>://<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId {
    pub runtime: Runtime,
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl Runtime {
    fn prefix(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
        }
    }

    /// The prefix a systemd scope of this runtime's containers carries.
    fn scope_prefix(self) -> &'static str {
        match self {
            Runtime::Containerd => "cri-containerd-",
            Runtime::CriO => "crio-",
            Runtime::Docker => "docker-",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContainerIdError {
    #[error("container ID {0:?} lacks a runtime prefix (containerd://, cri-o://, docker://)")]
    NoPrefix(String),
    #[error("container ID {0:?}: unknown runtime {1:?}")]
    UnknownRuntime(String, String),
    #[error("container ID {0:?}: the ID must be non-empty and contain no '/'")]
    BadId(String),
}

impl std::str::FromStr for ContainerId {
    type Err = ContainerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (runtime, id) = s
            .split_once("://")
            .ok_or_else(|| ContainerIdError::NoPrefix(s.into()))?;
        let runtime = match runtime {
            "containerd" => Runtime::Containerd,
            "cri-o" => Runtime::CriO,
            "docker" => Runtime::Docker,
            other => return Err(ContainerIdError::UnknownRuntime(s.into(), other.into())),
        };
        if id.is_empty() || id.contains('/') || id.contains('\0') {
            return Err(ContainerIdError::BadId(s.into()));
        }
        Ok(ContainerId {
            runtime,
            id: id.into(),
        })
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.runtime.prefix(), self.id)
    }
}

impl ContainerId {
    /// The container whose cgroup is `child`, the component right below a pod's cgroup;
    /// `runtime` is the runtime of the pod's other containers, for the cgroupfs layout whose
    /// names do not say it. None for CRI-O's conmon, which is not a container.
    fn from_pod_child(child: &str, runtime: Runtime) -> Option<ContainerId> {
        let scoped = [Runtime::Containerd, Runtime::CriO, Runtime::Docker]
            .into_iter()
            .find_map(|r| Some((r, child.strip_prefix(r.scope_prefix())?)));
        let (runtime, id) = match scoped {
            Some((r, rest)) => (r, rest.strip_suffix(".scope").unwrap_or(rest)),
            None => (runtime, child),
        };
        if id.is_empty() || id.starts_with("conmon") {
            return None;
        }
        Some(ContainerId {
            runtime,
            id: id.into(),
        })
    }

    /// Whether a cgroup path's last component is this container's cgroup.
    fn is_leaf(&self, leaf: &str) -> bool {
        leaf == self.id || ContainerId::from_pod_child(leaf, self.runtime).as_ref() == Some(self)
    }
}

/// The pod UID a cgroup path names, in either kubelet layout, and the component below the
/// pod's cgroup (a container's, when there is one).
fn pod_of(path: &str) -> Option<(String, Option<&str>)> {
    let mut in_kubepods = false;
    let mut components = path.split('/');
    while let Some(component) = components.next() {
        if component.starts_with("kubepods") {
            in_kubepods = true;
        }
        if !in_kubepods {
            continue;
        }
        if let Some(uid) = pod_uid(component) {
            return Some((uid, components.next().filter(|c| !c.is_empty())));
        }
    }
    None
}

/// The UID of the pod whose cgroup is named `component`, in either kubelet layout
/// (`pod<uid>`, `kubepods-<qos>-pod<uid_with_underscores>.slice`).
pub fn pod_uid(component: &str) -> Option<String> {
    match component.strip_suffix(".slice") {
        Some(slice) => slice
            .rsplit_once("-pod")
            .map(|(_, uid)| uid.replace('_', "-")),
        None => component.strip_prefix("pod").map(str::to_owned),
    }
}

/// Whether process `pid` runs in a root other than its parent's. runc places a container's
/// init in the container's cgroup before it pivots into the container's root; until then
/// its root is the runtime's (its parent's: runc, then the shim that reaps it), where the
/// guard's paths name the node's files, not the container's. Of a container's processes,
/// only its init is in a root other than its parent's (unless one `chroot`s). False when
/// either root cannot be read: a parent that is exiting (runc's first process, right after
/// it made the init) would otherwise pass an init still in the runtime's root. Never waits:
/// the agent looks again once the runtime's shim has taken the child over.
pub fn rooted(pid: i32) -> bool {
    ProcDir::open("/proc", pid).is_ok_and(|dir| dir.rooted())
}

/// Process `pid`, when it runs in `container`'s cgroup in pod `pod_uid`'s.
pub fn member(pid: i32, container: &ContainerId, pod_uid: &str) -> Option<Member> {
    member_of(ProcDir::open("/proc", pid).ok()?, container, pod_uid)
}

/// [`member`], for the process `dir` was opened for.
pub fn member_of(dir: ProcDir, container: &ContainerId, pod_uid: &str) -> Option<Member> {
    let pid = dir.pid();
    let p = read_proc(dir)?;
    let inside = p.cgroups.iter().any(|path| {
        pod_of(path)
            .is_some_and(|(uid, leaf)| uid == pod_uid && leaf.is_some_and(|l| container.is_leaf(l)))
    });
    inside.then_some(Member {
        process: Process {
            pid,
            start: p.start,
        },
        dir: p.dir,
    })
}

/// One process as the scan saw it.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    /// Cgroup paths, one per hierarchy.
    cgroups: Vec<String>,
    /// Whether the process is PID 1 of its own PID namespace.
    ns_init: bool,
    /// How deep its PID namespace is (the number of `NSpid` entries): a PID namespace a
    /// container process makes for itself (`unshare -pf`) is deeper than the container's.
    ns_depth: usize,
    /// Start time in clock ticks since boot: the tie-break for containers sharing the host's
    /// PID namespace, where no process is a namespace's PID 1.
    start: u64,
    /// In a root other than its parent's ([`rooted`]): only such a process can be a
    /// container's init, whose parent is its runtime.
    rooted: bool,
    /// Its parent (0: none).
    ppid: i32,
    /// Its `/proc/PID`, through which it was read: kept for a pod's processes, one of which
    /// may be chosen as an init and pinned.
    dir: Option<Arc<ProcDir>>,
}

/// What one pass over /proc found for the containers and pods asked about.
#[derive(Debug, Default)]
pub struct Scan {
    /// The init process of each container found: those asked about, and every other
    /// container in the cgroup of a pod asked about. Not there while the runtime is still
    /// setting the container up (no member in a root of its own yet).
    pub inits: BTreeMap<ContainerId, i32>,
    /// Pods with at least one process on this node, by their pod cgroup or a container.
    pub pods_present: BTreeSet<String>,
    /// Some process could not be read for want of descriptors: what the reading misses
    /// may be there.
    pub incomplete: bool,
    /// The containers found in each pod's cgroup (its sandbox among them), by pod UID.
    pub containers: BTreeMap<String, BTreeSet<ContainerId>>,
    /// The processes of each container found, by PID, with their start times.
    pub members: BTreeMap<ContainerId, BTreeMap<i32, u64>>,
    /// The directory each init was read through.
    init_dirs: BTreeMap<ContainerId, Arc<ProcDir>>,
}

/// A process, by its PID and its start time (clock ticks since boot): a PID the kernel
/// gives again to another process is another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Process {
    pub pid: i32,
    pub start: u64,
}

impl Scan {
    /// Whether `p` is still a process of `container`.
    pub fn runs(&self, container: &ContainerId, p: Process) -> bool {
        self.members
            .get(container)
            .and_then(|m| m.get(&p.pid))
            .is_some_and(|start| *start == p.start)
    }

    /// The init of `container`, if found.
    pub fn init(&self, container: &ContainerId) -> Option<Member> {
        let pid = *self.inits.get(container)?;
        let start = *self.members.get(container)?.get(&pid)?;
        Some(Member {
            process: Process { pid, start },
            dir: self.init_dirs.get(container).cloned(),
        })
    }
}

/// A container's process as one reading of /proc found it.
#[derive(Debug, Clone)]
pub struct Member {
    pub process: Process,
    /// The `/proc/PID` it was read through.
    dir: Option<Arc<ProcDir>>,
}

impl Member {
    /// Pins the process read: refused once it has ended, whoever has its PID since.
    pub fn pin(&self) -> Result<PinnedProcess, ResolveError> {
        let pid = self.process.pid;
        let dir = self.dir.clone().ok_or_else(|| ResolveError::Pin {
            pid,
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "not read from /proc"),
        })?;
        PinnedProcess::hold(self.process, dir)
    }
}

/// One reading of /proc, made when first asked and shared by every question after it: a
/// batch of requests reads /proc once, not once per request.
#[derive(Default)]
pub struct Procs(std::sync::OnceLock<(Vec<Proc>, bool)>);

impl Procs {
    fn get(&self) -> &[Proc] {
        &self.0.get_or_init(|| read_procs("/proc")).0
    }

    /// The containers of the given pods (each with the runtime that runs them), as this
    /// reading found them.
    pub fn scan(&self, pods: &[(String, Runtime)]) -> Scan {
        let mut scan = scan_procs(self.get(), pods);
        scan.incomplete = self.0.get().is_some_and(|(_, exhausted)| *exhausted);
        scan
    }

    /// See [`misplaced_in`].
    pub fn misplaced(&self, pod_uid: &str, ids: &[ContainerId]) -> Option<(ContainerId, String)> {
        misplaced_in(self.get(), pod_uid, ids)
    }
}

fn scan_procs(procs: &[Proc], pods: &[(String, Runtime)]) -> Scan {
    let mut out = Scan::default();
    // The runtime of each pod's containers, for cgroup names that do not say it.
    let runtimes: BTreeMap<&str, Runtime> =
        pods.iter().map(|(pod, r)| (pod.as_str(), *r)).collect();
    let mut members: BTreeMap<ContainerId, Vec<&Proc>> = BTreeMap::new();
    for p in procs {
        for path in &p.cgroups {
            if let Some((uid, child)) = pod_of(path) {
                if let Some(&runtime) = runtimes.get(uid.as_str()) {
                    let cid = child.and_then(|c| ContainerId::from_pod_child(c, runtime));
                    if let Some(cid) = cid {
                        out.containers
                            .entry(uid.clone())
                            .or_default()
                            .insert(cid.clone());
                        add_member(&mut members, cid, p);
                    }
                    out.pods_present.insert(uid);
                }
            }
        }
    }
    for (cid, m) in &members {
        out.members
            .insert(cid.clone(), m.iter().map(|p| (p.pid, p.start)).collect());
    }
    for (cid, m) in members {
        // The runtime's own processes (runc's, before its init pivots into the container's
        // root) are members too, in an outer PID namespace: not the init. Nor is a process
        // whose parent is the container's (one that `chroot`s is in a root of its own): the
        // init's parent is the runtime's shim, outside the container.
        let pids: BTreeSet<i32> = m.iter().map(|p| p.pid).collect();
        let init = m
            .iter()
            .filter(|p| p.rooted && !pids.contains(&p.ppid))
            .min_by_key(|p| (p.ns_depth, !p.ns_init, p.start, p.pid));
        if let Some(p) = init {
            out.inits.insert(cid.clone(), p.pid);
            if let Some(dir) = &p.dir {
                out.init_dirs.insert(cid, dir.clone());
            }
        }
    }
    out
}

/// A container `ids` names that runs on this node, but nowhere below the cgroup of pod
/// `pod_uid`, with a cgroup it was found in: a request that names it for that pod would
/// guard a process that is not the pod's. (A cgroup elsewhere that merely ends in the ID of
/// a container that is found in the pod is left alone: it is never matched, and refusing
/// for it would let whoever can name a cgroup keep a pod from being guarded.)
fn misplaced_in(
    procs: &[Proc],
    pod_uid: &str,
    ids: &[ContainerId],
) -> Option<(ContainerId, String)> {
    let mut inside = BTreeSet::new();
    let mut outside = BTreeMap::new();
    for p in procs {
        for path in &p.cgroups {
            let leaf = path.rsplit('/').next().unwrap_or_default();
            for cid in ids.iter().filter(|c| c.is_leaf(leaf)) {
                let in_pod = pod_of(path).is_some_and(|(uid, child)| {
                    uid == pod_uid
                        && child.and_then(|c| ContainerId::from_pod_child(c, cid.runtime))
                            == Some(cid.clone())
                });
                if in_pod {
                    inside.insert(cid);
                } else {
                    outside.entry(cid).or_insert(path);
                }
            }
        }
    }
    outside
        .into_iter()
        .find(|(cid, _)| !inside.contains(cid))
        .map(|(cid, path)| (cid.clone(), path.clone()))
}

fn add_member<'p>(
    members: &mut BTreeMap<ContainerId, Vec<&'p Proc>>,
    cid: ContainerId,
    p: &'p Proc,
) {
    let m = members.entry(cid).or_default();
    if !m.iter().any(|q| q.pid == p.pid) {
        m.push(p);
    }
}

/// Every process under `proc_root`, and whether one could not be opened for want of
/// descriptors (then any of them may be missing, the init among them).
fn read_procs(proc_root: &str) -> (Vec<Proc>, bool) {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return (Vec::new(), true);
    };
    let mut exhausted = false;
    let procs = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| match ProcDir::open(proc_root, pid) {
            // Held for a process that can be an init only: a reading holds no more.
            Ok(dir) => read_proc(dir).map(|p| Proc {
                dir: p.dir.filter(|_| p.rooted),
                ..p
            }),
            Err(e) => {
                exhausted |= matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                None
            }
        })
        .collect();
    (procs, exhausted)
}

/// None when the process vanished mid-read: it is simply not there. Read through its
/// directory, held open: every field is that one process's, even if its PID is given again
/// meanwhile.
fn read_proc(dir: ProcDir) -> Option<Proc> {
    let pid = dir.pid();
    let cgroup = dir.read("cgroup").ok()?;
    let cgroups: Vec<String> = String::from_utf8_lossy(&cgroup)
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_owned))
        .collect();
    let status = dir.read("status").ok()?;
    let nspid: Vec<String> = String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|ids| ids.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let ns_init = nspid.len() > 1 && nspid.last().map(String::as_str) == Some("1");
    let (ppid, start) = dir.stat().ok()?;
    // Only a pod's processes can be a container's init.
    let in_pod = cgroups.iter().any(|c| c.contains("kubepods"));
    let rooted = in_pod && dir.rooted_under(ppid);
    Some(Proc {
        pid,
        cgroups,
        ns_init,
        ns_depth: nspid.len(),
        start,
        rooted,
        ppid,
        dir: Some(Arc::new(dir)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_in_its_parents_root_or_gone_is_not_rooted() {
        assert!(!rooted(std::process::id() as i32));
        assert!(!rooted(i32::MAX));
    }

    /// runc's first process joins the cgroup in the host's PID namespace and root; the init
    /// it makes is PID 1 of the container's, and pivots later.
    #[test]
    fn a_container_being_set_up_has_no_init_until_one_is_in_its_own_root() {
        let c = cid("containerd://abc");
        let path = "/kubepods/besteffort/podu/abc";
        let runc = Proc {
            ns_depth: 1,
            rooted: false,
            ..proc(10, &[path], false, 1)
        };
        let init = |rooted| Proc {
            rooted,
            ..proc(11, &[path], true, 2)
        };
        let scan = |procs: &[Proc]| scan_procs(procs, &[("u".into(), c.runtime)]);
        let s = scan(&[runc.clone(), init(false)]);
        assert_eq!(s.inits.get(&c), None);
        assert!(s.containers["u"].contains(&c));
        // A child of the init that `chroot`s is in a root of its own, and still not the init.
        let chrooted = Proc {
            ppid: 11,
            ..proc(12, &[path], false, 3)
        };
        let s = scan(&[runc.clone(), init(false), chrooted]);
        assert_eq!(s.inits.get(&c), None);
        let s = scan(&[runc, init(true)]);
        let init = s.init(&c).map(|m| m.process);
        assert_eq!(init, Some(Process { pid: 11, start: 2 }));
        // A process is its PID and its start: the same PID started again is another.
        assert!(s.runs(&c, Process { pid: 10, start: 1 }));
        assert!(!s.runs(&c, Process { pid: 11, start: 3 }));
        assert!(!s.runs(&cid("containerd://other"), Process { pid: 11, start: 2 }));
    }

    fn cid(s: &str) -> ContainerId {
        s.parse().unwrap()
    }

    fn proc(pid: i32, cgroups: &[&str], ns_init: bool, start: u64) -> Proc {
        Proc {
            pid,
            cgroups: cgroups.iter().map(|s| s.to_string()).collect(),
            ns_init,
            ns_depth: 2,
            start,
            rooted: true,
            ppid: 0,
            dir: None,
        }
    }

    #[test]
    fn container_ids_need_a_known_runtime() {
        assert_eq!(cid("containerd://abc").runtime, Runtime::Containerd);
        assert_eq!(cid("cri-o://abc").runtime, Runtime::CriO);
        assert_eq!(cid("docker://abc").to_string(), "docker://abc");
        assert!(matches!(
            "abc".parse::<ContainerId>(),
            Err(ContainerIdError::NoPrefix(_))
        ));
        assert!(matches!(
            "rkt://abc".parse::<ContainerId>(),
            Err(ContainerIdError::UnknownRuntime(..))
        ));
        assert!(matches!(
            "containerd://a/../b".parse::<ContainerId>(),
            Err(ContainerIdError::BadId(_))
        ));
    }

    #[test]
    fn every_layout_is_recognised() {
        let id = "0123abcd";
        let uid = "1111-2222";
        let layouts = [
            ("containerd", format!("12:memory:/kubepods/burstable/pod{uid}/{id}")),
            ("containerd", format!("0::/kubepods/pod{uid}/{id}")),
            (
                "containerd",
                format!("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1111_2222.slice/cri-containerd-{id}.scope"),
            ),
            (
                "cri-o",
                format!("0::/kubepods.slice/kubepods-pod1111_2222.slice/crio-{id}.scope"),
            ),
            (
                "docker",
                format!("4:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1111_2222.slice/docker-{id}.scope"),
            ),
        ];
        for (runtime, path) in layouts {
            let c = cid(&format!("{runtime}://{id}"));
            let procs = [proc(40, &[path.splitn(3, ':').nth(2).unwrap()], true, 5)];
            let s = scan_procs(&procs, &[(uid.into(), c.runtime)]);
            assert_eq!(s.inits.get(&c), Some(&40), "{path}");
            assert!(s.pods_present.contains(uid), "{path}");
        }
        // Plain containerd, as `ctr run` makes it: in no pod, so in nobody's pod.
        let c = cid("containerd://e2e-1");
        let s = scan_procs(
            &[proc(7, &["/default/e2e-1"], true, 1)],
            &[("p".into(), c.runtime)],
        );
        assert!(s.inits.is_empty() && s.pods_present.is_empty());
    }

    #[test]
    fn a_container_is_found_only_below_the_pod_it_is_asked_for() {
        let procs = [
            proc(1, &["/init.scope"], false, 0),
            proc(2, &["/system.slice/kubelet.service"], false, 1),
            proc(3, &["/kubepods/besteffort/podother/victim"], true, 2),
            proc(4, &["/kubepods/besteffort/podmine/mine"], true, 3),
        ];
        for (id, at) in [
            ("containerd://init.scope", "/init.scope"),
            (
                "containerd://kubelet.service",
                "/system.slice/kubelet.service",
            ),
            (
                "containerd://victim",
                "/kubepods/besteffort/podother/victim",
            ),
        ] {
            let c = cid(id);
            let s = scan_procs(&procs, &[("mine".into(), c.runtime)]);
            assert!(!s.inits.contains_key(&c), "{id} found in pod mine");
            assert_eq!(
                misplaced_in(&procs, "mine", std::slice::from_ref(&c)),
                Some((c, at.to_owned()))
            );
        }
        let mine = cid("containerd://mine");
        assert_eq!(
            misplaced_in(&procs, "mine", std::slice::from_ref(&mine)),
            None
        );
        // CRI-O under the cgroupfs driver names a container's cgroup `crio-<id>`, no scope.
        let crio = [proc(5, &["/kubepods/besteffort/podother/crio-x"], true, 4)];
        let x = cid("cri-o://x");
        assert_eq!(
            misplaced_in(&crio, "mine", std::slice::from_ref(&x)),
            Some((x, "/kubepods/besteffort/podother/crio-x".to_owned()))
        );
        let s = scan_procs(&procs, &[("mine".into(), mine.runtime)]);
        assert_eq!(s.inits.get(&mine), Some(&4));
        // A decoy cgroup elsewhere named after a container that is in the pod changes
        // nothing: the request stands, and only the pod's own process is the container.
        let mut decoyed = procs.to_vec();
        decoyed.push(proc(
            6,
            &["/kubepods/besteffort/podother/victim/mine"],
            false,
            4,
        ));
        assert_eq!(
            misplaced_in(&decoyed, "mine", std::slice::from_ref(&mine)),
            None
        );
        let s = scan_procs(&decoyed, &[("mine".into(), mine.runtime)]);
        assert_eq!(s.inits.get(&mine), Some(&4));
        // The systemd driver's scope names the container too.
        let scoped = [proc(
            5,
            &["/kubepods.slice/kubepods-podaa_bb.slice/cri-containerd-x1.scope"],
            true,
            1,
        )];
        let x1 = cid("containerd://x1");
        assert_eq!(
            misplaced_in(&scoped, "aa-bb", std::slice::from_ref(&x1)),
            None
        );
        assert!(misplaced_in(&scoped, "cc-dd", std::slice::from_ref(&x1)).is_some());
    }

    #[test]
    fn the_namespace_init_wins_over_runc_and_exec() {
        let c = cid("containerd://x");
        let procs = [
            proc(10, &["/kubepods/podp/x"], false, 1), // runc, earliest
            proc(11, &["/kubepods/podp/x"], true, 2),  // the container's init
            proc(12, &["/kubepods/podp/x"], false, 3), // an exec'd shell
            proc(13, &["/kubepods/podp/conmon-x"], true, 0),
        ];
        let s = scan_procs(&procs, &[("p".into(), c.runtime)]);
        assert_eq!(s.inits.get(&c), Some(&11));
        // Sharing the host's PID namespace: the earliest process.
        let procs = [
            proc(21, &["/kubepods/podp/x"], false, 9),
            proc(20, &["/kubepods/podp/x"], false, 4),
        ];
        let s = scan_procs(&procs, &[("p".into(), c.runtime)]);
        assert_eq!(s.inits.get(&c), Some(&20));
        // A process of the container that made its own PID namespace is PID 1 there, with
        // a lower PID and an earlier start than the real init: it is still not the init.
        let decoy = Proc {
            ns_depth: 3,
            ..proc(5, &["/kubepods/podp/x"], true, 0)
        };
        let procs = [decoy.clone(), proc(11, &["/kubepods/podp/x"], true, 2)];
        let s = scan_procs(&procs, &[("p".into(), c.runtime)]);
        assert_eq!(s.inits.get(&c), Some(&11));
        // Sharing the pod's PID namespace (the pause process is its PID 1): the earliest
        // process of the container's own depth, not the decoy's namespace init.
        let procs = [decoy, proc(30, &["/kubepods/podp/x"], false, 7)];
        let s = scan_procs(&procs, &[("p".into(), c.runtime)]);
        assert_eq!(s.inits.get(&c), Some(&30));
    }

    #[test]
    fn a_pod_is_present_through_its_sandbox_while_a_container_restarts() {
        let c = cid("containerd://gone");
        let procs = [proc(5, &["/kubepods/podu-1/pause"], true, 1)];
        let s = scan_procs(&procs, &[("u-1".into(), c.runtime)]);
        assert!(!s.inits.contains_key(&c));
        assert!(s.pods_present.contains("u-1"));
        // The sandbox is one of the pod's containers, with the pod's runtime.
        assert_eq!(
            s.containers["u-1"],
            BTreeSet::from([cid("containerd://pause")])
        );
        let s = scan_procs(&procs, &[("u-2".into(), c.runtime)]);
        assert!(s.pods_present.is_empty());
    }

    #[test]
    fn every_container_in_a_pods_cgroup_is_found() {
        let listed = cid("cri-o://old");
        let pod = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1111_2222.slice";
        let procs = [
            proc(30, &[&format!("{pod}/crio-old.scope")], true, 1),
            // Restarted under a new ID; crun puts it in a sub-cgroup of its scope.
            proc(31, &[&format!("{pod}/crio-new.scope/container")], true, 2),
            // conmon watches a container but is not one.
            proc(32, &[&format!("{pod}/crio-conmon-new.scope")], false, 2),
        ];
        let s = scan_procs(&procs, &[("1111-2222".into(), listed.runtime)]);
        let found = BTreeSet::from([listed.clone(), cid("cri-o://new")]);
        assert_eq!(s.containers["1111-2222"], found);
        assert_eq!(s.inits.get(&cid("cri-o://new")), Some(&31));
        assert_eq!(s.inits.get(&listed), Some(&30));
        // cgroupfs names the container by ID alone: the pod's runtime applies.
        let procs = [proc(40, &["/kubepods/besteffort/podu-3/fresh"], true, 1)];
        let s = scan_procs(&procs, &[("u-3".into(), cid("docker://stale").runtime)]);
        assert_eq!(s.inits.get(&cid("docker://fresh")), Some(&40));
    }

    #[test]
    fn this_process_is_found_in_the_real_proc() {
        let me = std::process::id() as i32;
        let (procs, exhausted) = read_procs("/proc");
        assert!(!exhausted);
        assert!(procs.iter().any(|p| p.pid == me && !p.cgroups.is_empty()));
    }
}
