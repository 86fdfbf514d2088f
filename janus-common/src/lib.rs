//! Types that the BPF programs (`janus-ebpf`) and the agent both read: map keys and values,
//! the decision records of the ring buffer and the kernel struct offsets the loader fills in.
//!
//! Everything is `#[repr(C)]` with explicit padding, so both sides agree on every byte.

#![no_std]

/// Ancestors visited above the opened file before the walk gives up and denies.
pub const MAX_DEPTH: usize = 32;
/// Path components (nearest the file) a decision record carries for the log line.
pub const MAX_NAMES: usize = 8;
/// Bytes kept of each component name (NUL-terminated).
pub const NAME_LEN: usize = 64;
/// Entries of the rule map by default (the agent's `--bpf-max-rules` sets it at load):
/// every guarded path of every guard enforced in the kernel; 64 paths for each of 1,000
/// containers.
pub const MAX_RULES: u32 = 64 * 1024;
/// Mount namespaces (targets) enforced in the kernel at once by default
/// (`--bpf-max-targets`): twice the 1,000 containers of a busy node.
pub const MAX_SCOPES: u32 = 2048;
/// Bytes of the decision ring buffer: about 3,800 records, a burst the agent drains.
pub const RING_BYTES: u32 = 1 << 22;
/// Records of one guard on one target that may wait in the ring once it is half full: past
/// that, a flooding target's records are counted in its [`Tally`] and dropped, so that the
/// ring keeps room for every other target's.
pub const RING_SHARE: u64 = 256;
/// Slots of [`Tally::lost`]: one per event, verdict and mode ([`lost_slot`]).
pub const LOST_SLOTS: usize = 32;

/// What the kernel did with the records of the targets given one slot ([`Scope::slot`]): the
/// value of `TALLIES` there, which outlives a target's scope while the agent may still read
/// it. The programs only add to it (atomically), and the agent writes how many records of
/// the slot it has read at the same slot of `DRAINED`: the records waiting in the ring are
/// the difference. Neither is ever reset, so a slot given to another target goes on
/// counting right.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Records charged to the target: reserved in the ring.
    pub charged: u64,
    /// Decisions whose record was dropped (over the share, or the ring full), by
    /// [`lost_slot`]: counted here so that the agent's counts do not depend on the ring.
    pub lost: [u64; LOST_SLOTS],
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            charged: 0,
            lost: [0; LOST_SLOTS],
        }
    }
}

/// The slot of [`Tally::lost`] for event `ev` (`EV_*`), denied or not, monitored or not.
#[inline(always)]
pub const fn lost_slot(ev: usize, deny: bool, monitor: bool) -> usize {
    (ev << 2 | (deny as usize) << 1 | monitor as usize) & (LOST_SLOTS - 1)
}

/// Index of each event in [`Rule::events`]; the same order as `janus_api::Event`.
pub const EV_OPEN: usize = 0;
pub const EV_ACCESS: usize = 1;
pub const EV_EXEC: usize = 2;
pub const EV_MODIFY: usize = 3;
pub const EVENTS: usize = 4;
/// [`Decision::event`] of a rename or a hard link refused because it would take an object
/// out of the guard that covers it (no rule is keyed by these).
pub const EV_RENAME: usize = 4;
pub const EV_LINK: usize = 5;

/// [`EventRule::verdict`] values.
pub const VERDICT_NONE: u8 = 0;
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// [`EventRule::flags`].
pub const RULE_AUTO_ALLOW_OWNER: u8 = 1;
pub const RULE_AUDIT: u8 = 2;
/// The subject has onlyDir (the loader only keys directories for it).
pub const RULE_ONLY_DIR: u8 = 4;
/// The guarded inode is a directory: it covers what lies below it.
pub const RULE_IS_DIR: u8 = 8;
/// The subject is in monitor mode: its deny is recorded, and the access allowed.
pub const RULE_MONITOR: u8 = 16;

/// [`Decision::flags`].
pub const DECISION_AUDIT: u8 = 1;
/// A deny turned into an allow because the owner asked (autoAllowOwner).
pub const DECISION_BY_OWNER: u8 = 2;
/// The opened file is a directory.
pub const DECISION_IS_DIR: u8 = 4;
/// The ancestor walk ran out of depth, or a kernel read failed: denied without a rule
/// (fail closed).
pub const DECISION_TOO_DEEP: u8 = 8;
/// [`Decision::via`] holds the last `MAX_NAMES` names of a longer path used.
pub const DECISION_VIA_CUT: u8 = 16;
/// [`Decision::via`] holds the names walked up a path that did not lead to the task's root
/// (a detached mount, one outside its root, or a read that failed on the way).
pub const DECISION_VIA_DETACHED: u8 = 32;
/// A deny the kernel was not told: a subject in monitor mode, or a fail-closed denial in a
/// scope of [`SCOPE_MONITOR`].
pub const DECISION_MONITOR: u8 = 64;

/// [`Scope::flags`]: the guard's denies are all in monitor mode, so what would fail closed
/// (a walk out of depth, a kernel read that failed) is let through, and recorded as
/// monitored; as fanotify answers its errors.
pub const SCOPE_MONITOR: u32 = 1;
/// [`Scope::flags`]: the guard has subjects in monitor mode, so what its enforced rules let
/// through is also looked up among the monitored ones.
pub const SCOPE_WATCHED: u32 = 2;

/// Identity of an inode: the kernel's `super_block.s_dev` (kernel `dev_t` encoding,
/// `major << 20 | minor`) and `i_ino`, qualified by the scope (mount namespace) whose rule
/// it is, so two pods guarding one shared inode keep their own rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub ino: u64,
    pub dev: u32,
    pub scope: u32,
}

impl InodeKey {
    /// The kernel's internal `dev_t` from a user-space major and minor.
    pub const fn kernel_dev(major: u32, minor: u32) -> u32 {
        (major << 20) | (minor & 0xf_ffff)
    }
}

/// The rule of one guarded path for one event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRule {
    /// `VERDICT_*`; `VERDICT_NONE` when this path does not guard the event.
    pub verdict: u8,
    /// `RULE_*`.
    pub flags: u8,
    /// Index of the subject in its guard, for the log line's tags.
    pub subject: u16,
}

/// Value of the rule map: what a guarded inode says per event, for the enforced subjects
/// and for those in monitor mode apart. The loader merges the rules of one path so that
/// deny wins at equal length; longer paths win by being nearer to the file on the walk
/// up. The kernel's answer is the enforced rules' alone; a monitored deny only reports
/// what they let through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub events: [EventRule; EVENTS],
    /// The same for subjects in monitor mode (each with `RULE_MONITOR`).
    pub monitor: [EventRule; EVENTS],
}

const _: () = assert!(core::mem::size_of::<EventRule>() == 4);
const _: () = assert!(core::mem::size_of::<Rule>() == 2 * EVENTS * 4);
const _: () = assert!(core::mem::offset_of!(Rule, monitor) == EVENTS * 4);

/// Value of the scope map, keyed by mount namespace inode number: one enforced target.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// The agent's handle of the target (a guard on one container), echoed in decisions.
    pub target_id: u32,
    /// autoAllowOwner: the target's process and its parent (host tgids); 0 = none.
    pub owners: [u32; 2],
    /// `SCOPE_*`.
    pub flags: u32,
    /// The target's entry of `TALLIES` and `DRAINED`.
    pub slot: u32,
}

/// One decision, as the ring buffer carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub target_id: u32,
    pub scope: u32,
    pub tgid: u32,
    /// Index of the deciding subject.
    pub subject: u16,
    /// `EV_*`.
    pub event: u8,
    /// `VERDICT_ALLOW` or `VERDICT_DENY`.
    pub verdict: u8,
    /// `DECISION_*`.
    pub flags: u8,
    /// How many levels above the file the deciding rule sits (0: the file itself).
    pub depth: u8,
    /// How many names of the path used `via` holds (0: not known).
    pub via_len: u8,
    /// Bit `i`: `names[i]` was longer than the field, and is cut.
    pub names_cut: u8,
    /// Bit `i`: `via[i]` was longer than the field, and is cut.
    pub via_cut: u8,
    pub _pad: [u8; 3],
    /// The deciding rule's key (zero when `DECISION_TOO_DEEP`).
    pub rule: InodeKey,
    /// `names[i]` is the name of the i-th dentry on the walk up (0: the file), for the
    /// first `MAX_NAMES` levels; the agent appends `names[depth-1..0]` to the rule's path.
    pub names: [[u8; NAME_LEN]; MAX_NAMES],
    /// The path the task used, from the file up to its root across mounts: `via[i]` is
    /// the i-th name up, for `via_len` names.
    pub via: [[u8; NAME_LEN]; MAX_NAMES],
    /// The task, as the kernel knew it when deciding: its parent's tgid, and its real uid
    /// and gid in the initial user namespace.
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The target's share of the ring the record was charged to (`Scope::slot`).
    pub slot: u32,
    /// The task's `comm`, NUL-padded.
    pub comm: [u8; COMM_LEN],
}

/// `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;

// The record's layout is what the programs write and the agent reads: fixed here.
const _: () = assert!(lost_slot(EV_LINK, true, true) < LOST_SLOTS);
const _: () = assert!(core::mem::size_of::<Tally>() == 8 + 8 * LOST_SLOTS);
const _: () = assert!(core::mem::size_of::<Scope>() == 20);
const _: () = assert!(core::mem::size_of::<Decision>() == 72 + 2 * MAX_NAMES * NAME_LEN);
const _: () = assert!(core::mem::offset_of!(Decision, rule) == 24);
const _: () = assert!(core::mem::offset_of!(Decision, ppid) == 40 + 2 * MAX_NAMES * NAME_LEN);
const _: () = assert!(core::mem::offset_of!(Decision, comm) == 56 + 2 * MAX_NAMES * NAME_LEN);

/// Byte offsets of the kernel struct members the programs read, from the running
/// kernel's BTF (Rust BPF has no CO-RE). Set by the loader as the global `OFFSETS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub file_f_mode: u32,
    /// `file.f_flags` (open flags; `__FMODE_EXEC` marks an exec's open).
    pub file_f_flags: u32,
    pub file_f_inode: u32,
    /// `file.f_path.dentry`.
    pub file_dentry: u32,
    pub dentry_parent: u32,
    pub dentry_inode: u32,
    /// `dentry.d_name.name`.
    pub dentry_name: u32,
    pub inode_mode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    pub task_nsproxy: u32,
    pub nsproxy_mnt_ns: u32,
    /// `mnt_namespace.ns.inum`.
    pub mnt_ns_inum: u32,
    /// `FMODE_*` bit the kernel sets on overlayfs' internal backing files
    /// (`FMODE_NOACCOUNT` on 6.1, `FMODE_BACKING` later); 0 = unknown.
    pub fmode_backing: u32,
    pub task_fs: u32,
    /// `fs_struct.root.dentry`: the task's root directory.
    pub fs_root_dentry: u32,
    /// `vm_area_struct.vm_file`: the file a mapping maps (`file_mprotect`).
    pub vma_vm_file: u32,
    /// `file.f_path.mnt`.
    pub file_mnt: u32,
    /// `fs_struct.root.mnt`.
    pub fs_root_mnt: u32,
    /// `path.mnt`, for the paths the path hooks are given.
    pub path_mnt: u32,
    /// Where `struct vfsmount` sits in `struct mount` (the kernel's `real_mount`).
    pub mount_mnt: u32,
    pub mount_parent: u32,
    pub mount_mountpoint: u32,
    pub vfsmount_root: u32,
    /// `task_struct.real_parent` and `task_struct.tgid`: the decision's parent PID.
    pub task_real_parent: u32,
    pub task_tgid: u32,
}

impl Offsets {
    /// Whether the loader filled the offsets in (these members are never at offset 0).
    pub fn is_set(&self) -> bool {
        self.file_f_inode != 0 && self.inode_ino != 0 && self.dentry_parent != 0
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) plain data whose every bit pattern is valid, with explicit
    // padding fields.
    unsafe impl aya::Pod for super::InodeKey {}
    unsafe impl aya::Pod for super::Rule {}
    unsafe impl aya::Pod for super::Scope {}
    unsafe impl aya::Pod for super::Decision {}
    unsafe impl aya::Pod for super::Tally {}
    unsafe impl aya::Pod for super::Offsets {}
}
