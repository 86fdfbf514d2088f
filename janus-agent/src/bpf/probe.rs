//! What the running kernel offers the programs: the BPF LSM, the struct layout they read
//! (from its BTF), and the memory limit older kernels charge maps to.

use super::btf;
use super::StartError;
use janus_common::Offsets;

pub(super) const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// Whether `bpf` is among the active LSMs, mounting securityfs first when it is not.
pub fn lsm_active() -> Result<(), StartError> {
    if !std::path::Path::new(LSM_LIST).exists() {
        // Best effort: a container may not be allowed to mount; reading then says why.
        let _ = nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    let list = std::fs::read_to_string(LSM_LIST).map_err(StartError::LsmList)?;
    let list = list.trim();
    if list.split(',').any(|l| l == "bpf") {
        Ok(())
    } else {
        Err(StartError::LsmInactive(list.to_owned()))
    }
}

/// Reads the struct layout the programs need from the running kernel's BTF.
pub fn kernel_offsets() -> Result<Offsets, btf::BtfError> {
    use btf::Expect::{Int, Pointer, Struct};
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    let raw = std::fs::read(VMLINUX).map_err(|source| btf::BtfError::Read {
        path: VMLINUX,
        source,
    })?;
    let b = btf::Btf::parse(&raw)?;
    let f_path = b.member_offset("file", "f_path", Struct)?;
    let d_name = b.member_offset("dentry", "d_name", Struct)?;
    let mnt_ns = b.member_offset("mnt_namespace", "ns", Struct)?;
    let fs_root = b.member_offset("fs_struct", "root", Struct)?;
    let path_mnt = b.member_offset("path", "mnt", Pointer)?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(Offsets {
        file_f_mode: b.member_offset("file", "f_mode", Int(4))?,
        file_f_flags: b.member_offset("file", "f_flags", Int(4))?,
        file_f_inode: b.member_offset("file", "f_inode", Pointer)?,
        file_dentry: f_path + b.member_offset("path", "dentry", Pointer)?,
        dentry_parent: b.member_offset("dentry", "d_parent", Pointer)?,
        dentry_inode: b.member_offset("dentry", "d_inode", Pointer)?,
        dentry_name: d_name + b.member_offset("qstr", "name", Pointer)?,
        inode_mode: b.member_offset("inode", "i_mode", Int(2))?,
        inode_ino: b.member_offset("inode", "i_ino", Int(8))?,
        inode_sb: b.member_offset("inode", "i_sb", Pointer)?,
        sb_dev: b.member_offset("super_block", "s_dev", Int(4))?,
        task_nsproxy: b.member_offset("task_struct", "nsproxy", Pointer)?,
        nsproxy_mnt_ns: b.member_offset("nsproxy", "mnt_ns", Pointer)?,
        mnt_ns_inum: mnt_ns + b.member_offset("ns_common", "inum", Int(4))?,
        fmode_backing: backing_fmode(&release),
        task_fs: b.member_offset("task_struct", "fs", Pointer)?,
        fs_root_dentry: fs_root + b.member_offset("path", "dentry", Pointer)?,
        vma_vm_file: b.member_offset("vm_area_struct", "vm_file", Pointer)?,
        file_mnt: f_path + path_mnt,
        fs_root_mnt: fs_root + path_mnt,
        path_mnt,
        mount_mnt: b.member_offset("mount", "mnt", Struct)?,
        mount_parent: b.member_offset("mount", "mnt_parent", Pointer)?,
        mount_mountpoint: b.member_offset("mount", "mnt_mountpoint", Pointer)?,
        vfsmount_root: b.member_offset("vfsmount", "mnt_root", Pointer)?,
        task_real_parent: b.member_offset("task_struct", "real_parent", Pointer)?,
        task_tgid: b.member_offset("task_struct", "tgid", Int(4))?,
    })
}

/// The f_mode bit of overlayfs' internal backing files: FMODE_NOACCOUNT up to 6.5,
/// FMODE_BACKING from 6.6 (where the value moved).
fn backing_fmode(release: &str) -> u32 {
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) >= (6, 6) {
        1 << 25
    } else {
        1 << 29
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, whose default (8 MiB or less)
/// the maps can exceed; later kernels charge the memory cgroup and ignore it. Needs
/// CAP_SYS_RESOURCE; without it a load that needed it fails and says so.
pub(super) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "raising RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_bit_follows_the_kernel_version() {
        assert_eq!(backing_fmode("6.1.0-28-cloud-amd64"), 1 << 29);
        assert_eq!(backing_fmode("6.12.9"), 1 << 25);
    }
}
