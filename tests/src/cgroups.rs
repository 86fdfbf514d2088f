//! Pods laid out in a cgroup v2 hierarchy as the kubelet lays them out, with real processes
//! moved into real cgroups: what `janus-agent serve` must find a pod's containers in on a
//! cgroup v2 node (the VM runs one; this machine's host is cgroup v1).

use std::fs;
use std::path::Path;

use anyhow::{ensure, Context, Result};

/// Where the VM mounts the cgroup v2 hierarchy.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup";

/// How the kubelet names a pod's cgroups: its `cgroupDriver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`.
    Systemd,
    /// `kubepods/besteffort/pod<uid>`.
    Cgroupfs,
}

/// The container runtime, which names a container's cgroup below the pod's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    /// Runs each container's monitor (conmon) in a cgroup of its own beside the container's
    /// (`conmon_cgroup = "pod"`): a member of the pod that is no container.
    CriO,
}

/// One node's cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub driver: Driver,
    pub runtime: Runtime,
}

impl Layout {
    pub const ALL: [Layout; 4] = [
        Layout::new(Driver::Systemd, Runtime::Containerd),
        Layout::new(Driver::Systemd, Runtime::CriO),
        Layout::new(Driver::Cgroupfs, Runtime::Containerd),
        Layout::new(Driver::Cgroupfs, Runtime::CriO),
    ];

    const fn new(driver: Driver, runtime: Runtime) -> Layout {
        Layout { driver, runtime }
    }

    /// `systemd-containerd`, `cgroupfs-cri-o`, ...
    pub fn name(&self) -> String {
        let driver = match self.driver {
            Driver::Systemd => "systemd",
            Driver::Cgroupfs => "cgroupfs",
        };
        format!("{driver}-{}", self.runtime_prefix())
    }

    fn runtime_prefix(&self) -> &'static str {
        match self.runtime {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
        }
    }

    /// The container ID as the kubelet reports it in the pod's status.
    pub fn container_id(&self, id: &str) -> String {
        format!("{}://{id}", self.runtime_prefix())
    }

    /// The pod's cgroup (a best-effort pod), relative to the hierarchy's root.
    fn pod(&self, uid: &str) -> String {
        match self.driver {
            Driver::Systemd => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            ),
            Driver::Cgroupfs => format!("kubepods/besteffort/pod{uid}"),
        }
    }

    /// Container `id`'s cgroup in pod `uid`.
    pub fn container(&self, uid: &str, id: &str) -> String {
        let leaf = match (self.driver, self.runtime) {
            (Driver::Systemd, Runtime::Containerd) => format!("cri-containerd-{id}.scope"),
            (Driver::Systemd, Runtime::CriO) => format!("crio-{id}.scope"),
            (Driver::Cgroupfs, Runtime::Containerd) => id.to_owned(),
            (Driver::Cgroupfs, Runtime::CriO) => format!("crio-{id}"),
        };
        format!("{}/{leaf}", self.pod(uid))
    }

    /// The cgroup of container `id`'s conmon, for CRI-O.
    pub fn monitor(&self, uid: &str, id: &str) -> Option<String> {
        let leaf = match (self.driver, self.runtime) {
            (_, Runtime::Containerd) => return None,
            (Driver::Systemd, Runtime::CriO) => format!("crio-conmon-{id}.scope"),
            (Driver::Cgroupfs, Runtime::CriO) => format!("crio-conmon-{id}"),
        };
        Some(format!("{}/{leaf}", self.pod(uid)))
    }
}

/// Whether `root` holds a cgroup v2 hierarchy.
pub fn is_v2(root: &Path) -> bool {
    root.join("cgroup.controllers").is_file()
}

/// Moves process `pid` into `cgroup` (relative to `root`), making the cgroup first.
pub fn enter(root: &Path, cgroup: &str, pid: i32) -> Result<()> {
    let dir = root.join(cgroup);
    fs::create_dir_all(&dir).with_context(|| format!("making cgroup {}", dir.display()))?;
    fs::write(dir.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("moving {pid} into {}", dir.display()))?;
    let now = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    ensure!(
        now.lines().any(|l| l == format!("0::/{cgroup}")),
        "{pid} is not in {cgroup} after the move: {now}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_the_kubelets() {
        let [systemd, crio, cgroupfs, cgroupfs_crio] = Layout::ALL;
        assert_eq!(
            systemd.container("1-2", "ab"),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/cri-containerd-ab.scope"
        );
        assert_eq!(
            crio.monitor("1-2", "ab").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/crio-conmon-ab.scope"
        );
        assert_eq!(
            cgroupfs.container("1-2", "ab"),
            "kubepods/besteffort/pod1-2/ab"
        );
        assert_eq!(cgroupfs.monitor("1-2", "ab"), None);
        assert_eq!(
            cgroupfs_crio.container("1-2", "ab"),
            "kubepods/besteffort/pod1-2/crio-ab"
        );
        assert_eq!(cgroupfs_crio.container_id("ab"), "cri-o://ab");
        assert_eq!(cgroupfs_crio.name(), "cgroupfs-cri-o");
    }
}
