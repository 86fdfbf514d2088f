//! Janus BPF LSM programs: decide guarded opens and reads in the kernel.
//!
//! - `file_open` decides `open`, `exec` (the file is opened for execution) and `modify`
//!   (the file is opened for writing); `file_permission` decides `access` (a read) and
//!   `modify` (a write); `mmap_file` decides `access` for any mapping, and `file_mprotect`
//!   for one made readable or executable (a mapping's reads are page faults, which
//!   `file_permission` never sees).
//! - `path_rename` and `path_link` refuse a rename or a hard link that would take an
//!   object out of a deny that covers it from above: the walk up from its new name would
//!   not meet that rule. A rule keyed by the object itself goes wherever it goes.
//!   `inode_rename` and `inode_link` decide the same again for the kernel's own callers
//!   (overlayfs renaming in its upper layer), which pass no mount and so no name used.
//! - A decision also carries the path the task used (`via`): the walk up from the file
//!   across mounts to the task's root, as `d_path` renders it (which the kernel does not
//!   let `file_permission` call).
//! - Only tasks in a guarded mount namespace (`SCOPES`), or whose root directory is a guarded
//!   target's (`ROOTS`: a mount namespace made inside the container), are considered: host
//!   processes and other pods pay two map lookups and are never logged.
//! - The file is covered by its nearest ancestor (walking `d_parent` up to the superblock's
//!   root) that has a rule for the event in `RULES`: the longest guarded path wins, as in
//!   the fanotify backend; the loader merged equal paths so that deny wins there. A walk
//!   that runs out of depth, or a kernel read that fails, for a task in a guarded scope
//!   denies (fail closed).
//! - Every decision goes to the agent through `DECISIONS`; when the ring is full, or half
//!   full and the target already has its share (`RING_SHARE`) waiting, the decision stands,
//!   and its record is counted in the target's tally (`TALLIES`) and in `DROPPED` instead: one
//!   container's flood cannot take the ring from the others, nor make a count wrong.
//!
//! Rust BPF has no CO-RE, so the loader reads the kernel's struct layout from its BTF and
//! sets `OFFSETS` before loading.

#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic read-modify-write in `core` (no CAS), but
// the instruction set has an atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA},
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, generated,
    },
    macros::{lsm, map},
    maps::{ring_buf::RingBufEntry, Array, HashMap, PerCpuArray, RingBuf},
    programs::LsmContext,
};
use aya_log_ebpf::warn;
use janus_common::{
    lost_slot, Decision, EventRule, InodeKey, Offsets, Rule, Scope, Tally, COMM_LEN,
    DECISION_AUDIT, DECISION_BY_OWNER, DECISION_IS_DIR, DECISION_MONITOR, DECISION_TOO_DEEP,
    DECISION_VIA_CUT, DECISION_VIA_DETACHED, EVENTS, EV_ACCESS, EV_EXEC, EV_LINK, EV_MODIFY,
    EV_OPEN, EV_RENAME, MAX_DEPTH, MAX_NAMES, MAX_RULES, MAX_SCOPES, NAME_LEN, RING_BYTES,
    RING_SHARE, RULE_AUDIT, RULE_AUTO_ALLOW_OWNER, RULE_MONITOR, SCOPE_MONITOR, SCOPE_WATCHED,
    VERDICT_ALLOW, VERDICT_DENY, VERDICT_NONE,
};

/// Guarded mount namespaces, by `ns.inum`. Not preallocated: a preallocated entry the agent
/// replaces can be given out again at once, under a program still reading its fields one by
/// one; an allocated one stays until no program can be reading it.
#[map(name = "SCOPES")]
static SCOPES: HashMap<u32, Scope> = HashMap::with_max_entries(MAX_SCOPES, BPF_F_NO_PREALLOC);

/// Guarded mount namespaces again, by the identity of the target's root directory (scope
/// 0): a task of the container in a mount namespace of its own making (`unshare -m`) has
/// copies of its mounts but the same root.
#[map(name = "ROOTS")]
static ROOTS: HashMap<InodeKey, u32> = HashMap::with_max_entries(MAX_SCOPES, 0);

/// Guarded inodes of every scope.
#[map(name = "RULES")]
static RULES: HashMap<InodeKey, Rule> = HashMap::with_max_entries(MAX_RULES, 0);

#[map(name = "DECISIONS")]
static DECISIONS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// `[EV_RENAME - EV_RENAME]`, `[EV_LINK - EV_RENAME]`: 1 once the loader attached
/// `path_rename`, `path_link`. A move those let through (monitor mode) is then recorded
/// there, with the name used, and the `inode_*` hook that follows records nothing more.
#[map(name = "NAMED")]
static NAMED: Array<u32> = Array::with_max_entries(2, 0);

/// Records the ring buffer did not take (index 0).
#[map(name = "DROPPED")]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Each target's tally, at its slot (`Scope::slot`; the loader sizes both maps).
#[map(name = "TALLIES")]
static TALLIES: Array<Tally> = Array::with_max_entries(2 * MAX_SCOPES, 0);

/// How many of each target's records the agent has read, at its slot: the agent writes it.
#[map(name = "DRAINED")]
static DRAINED: Array<u64> = Array::with_max_entries(2 * MAX_SCOPES, 0);

#[no_mangle]
static OFFSETS: Offsets = Offsets {
    file_f_mode: 0,
    file_f_flags: 0,
    file_f_inode: 0,
    file_dentry: 0,
    dentry_parent: 0,
    dentry_inode: 0,
    dentry_name: 0,
    inode_mode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    task_nsproxy: 0,
    nsproxy_mnt_ns: 0,
    mnt_ns_inum: 0,
    fmode_backing: 0,
    task_fs: 0,
    fs_root_dentry: 0,
    vma_vm_file: 0,
    file_mnt: 0,
    fs_root_mnt: 0,
    path_mnt: 0,
    mount_mnt: 0,
    mount_parent: 0,
    mount_mountpoint: 0,
    vfsmount_root: 0,
    task_real_parent: 0,
    task_tgid: 0,
};

const EPERM: i32 = 1;
const FMODE_WRITE: u32 = 0x2;
const FMODE_EXEC: u32 = 0x20;
/// In `f_flags`: the open of an execve (what fanotify's OPEN_EXEC_PERM keys on).
const __FMODE_EXEC: u32 = 0x20;
const MAY_WRITE: i32 = 0x2;
const MAY_READ: i32 = 0x4;
const S_IFMT: u16 = 0o170000;
const S_IFDIR: u16 = 0o040000;
const PROT_READ: u64 = 0x1;
const PROT_EXEC: u64 = 0x4;
const RENAME_EXCHANGE: u32 = 0x2;
/// What a program returns: 0, or -EPERM for any refusal (the previous program's too). The
/// kernel (6.10 and later) checks that an LSM program's result is an error code, and an
/// answer carried in a register across calls is not known to be one.
#[inline(always)]
fn exit_code(r: i32) -> i32 {
    if r == 0 {
        0
    } else {
        -EPERM
    }
}

/// Steps of the walk for the name used: names (it keeps the last `MAX_NAMES`, and walks on to
/// find the root) and mounts crossed. Deeper, the path is given as not reaching the root.
const VIA_STEPS: usize = 3 * MAX_NAMES;
const _: () = assert!(MAX_NAMES.is_power_of_two());
const _: () = assert!(EVENTS.is_power_of_two());

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    exit_code(file_open_answer(ctx))
}

#[inline(always)]
fn file_open_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, file_open, struct file *file) + the previous program's return value.
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    let file: *const u8 = ctx.arg(0);
    let (c, mode) = match prepare(file) {
        Prep::Skip => return 0,
        Prep::Fail(r) => return r,
        Prep::Go(c, mode) => (c, mode),
    };
    // The order of fanotify's permission events: exec, then open; a write-open is also
    // a modify.
    let flags: u32 = read(file, c.off.file_f_flags).unwrap_or(0);
    if mode & FMODE_EXEC != 0 || flags & __FMODE_EXEC != 0 {
        let r = check(&ctx, &c, EV_EXEC);
        if r != 0 {
            return r;
        }
    }
    let r = check(&ctx, &c, EV_OPEN);
    if r != 0 || mode & FMODE_WRITE == 0 {
        return r;
    }
    check(&ctx, &c, EV_MODIFY)
}

#[lsm(hook = "file_permission")]
pub fn file_permission(ctx: LsmContext) -> i32 {
    exit_code(file_permission_answer(ctx))
}

#[inline(always)]
fn file_permission_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, file_permission, struct file *file, int mask) + previous retval.
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    let mask: i32 = ctx.arg(1);
    if mask & (MAY_READ | MAY_WRITE) == 0 {
        return 0;
    }
    let file: *const u8 = ctx.arg(0);
    let c = match prepare(file) {
        Prep::Skip => return 0,
        Prep::Fail(r) => return r,
        Prep::Go(c, _) => c,
    };
    if mask & MAY_READ != 0 {
        let r = check(&ctx, &c, EV_ACCESS);
        if r != 0 {
            return r;
        }
    }
    if mask & MAY_WRITE != 0 {
        return check(&ctx, &c, EV_MODIFY);
    }
    0
}

#[lsm(hook = "mmap_file")]
pub fn mmap_file(ctx: LsmContext) -> i32 {
    exit_code(mmap_file_answer(ctx))
}

#[inline(always)]
fn mmap_file_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, mmap_file, struct file *file, unsigned long reqprot,
    //          unsigned long prot, unsigned long flags) + previous retval.
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return retval;
    }
    let file: *const u8 = ctx.arg(0);
    map_check(&ctx, file)
}

#[lsm(hook = "file_mprotect")]
pub fn file_mprotect(ctx: LsmContext) -> i32 {
    exit_code(file_mprotect_answer(ctx))
}

#[inline(always)]
fn file_mprotect_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, file_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
    //          unsigned long prot) + previous retval.
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    let vma: *const u8 = ctx.arg(0);
    let prot: u64 = ctx.arg(2);
    if prot & (PROT_READ | PROT_EXEC) == 0 {
        return 0;
    }
    let off = offsets();
    if !off.is_set() {
        return 0;
    }
    let Ok(file) = read::<*const u8>(vma, off.vma_vm_file) else {
        return fail_if_scoped();
    };
    map_check(&ctx, file)
}

/// A mapping reads the file by page faults: it is decided as a read. Any mapping, even a
/// write-only or PROT_NONE one: a private writable mapping can be read on most
/// architectures, and a mapping's protection can be raised later (`file_mprotect` sees
/// overlayfs' backing file, not the container's, so it must not be the only check).
#[inline(always)]
fn map_check(ctx: &LsmContext, file: *const u8) -> i32 {
    if file.is_null() {
        return 0;
    }
    match prepare(file) {
        Prep::Skip => 0,
        Prep::Fail(r) => r,
        Prep::Go(c, _) => check(ctx, &c, EV_ACCESS),
    }
}

#[lsm(hook = "inode_rename")]
pub fn inode_rename(ctx: LsmContext) -> i32 {
    exit_code(inode_rename_answer(ctx))
}

#[inline(always)]
fn inode_rename_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, inode_rename, struct inode *old_dir, struct dentry *old_dentry,
    //          struct inode *new_dir, struct dentry *new_dentry) + previous retval. An
    // exchange calls it twice, once each way.
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return retval;
    }
    let old: *const u8 = ctx.arg(1);
    let new: *const u8 = ctx.arg(3);
    keep_in_guard(old, new, EV_RENAME, core::ptr::null())
}

#[lsm(hook = "inode_link")]
pub fn inode_link(ctx: LsmContext) -> i32 {
    exit_code(inode_link_answer(ctx))
}

#[inline(always)]
fn inode_link_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, inode_link, struct dentry *old_dentry, struct inode *dir,
    //          struct dentry *new_dentry) + previous retval.
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    let old: *const u8 = ctx.arg(0);
    let new: *const u8 = ctx.arg(2);
    keep_in_guard(old, new, EV_LINK, core::ptr::null())
}

#[lsm(hook = "path_rename")]
pub fn path_rename(ctx: LsmContext) -> i32 {
    exit_code(path_rename_answer(ctx))
}

#[inline(always)]
fn path_rename_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, path_rename, const struct path *old_dir, struct dentry *old_dentry,
    //          const struct path *new_dir, struct dentry *new_dentry, unsigned int flags)
    // + previous retval. Called once for an exchange (5.19+): both ways are checked here.
    let retval: i32 = ctx.arg(5);
    if retval != 0 {
        return retval;
    }
    let old: *const u8 = ctx.arg(1);
    let new: *const u8 = ctx.arg(3);
    let flags: u32 = ctx.arg(4);
    // A rename never crosses mounts: both names are on the old directory's.
    let mnt = path_mnt(ctx.arg(0));
    let r = keep_in_guard(old, new, EV_RENAME, mnt);
    if r != 0 || flags & RENAME_EXCHANGE == 0 {
        return r;
    }
    keep_in_guard(new, old, EV_RENAME, mnt)
}

#[lsm(hook = "path_link")]
pub fn path_link(ctx: LsmContext) -> i32 {
    exit_code(path_link_answer(ctx))
}

#[inline(always)]
fn path_link_answer(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, path_link, struct dentry *old_dentry, const struct path *new_dir,
    //          struct dentry *new_dentry) + previous retval.
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    let old: *const u8 = ctx.arg(0);
    let new: *const u8 = ctx.arg(2);
    // A link never crosses mounts: the old name is on the new directory's.
    keep_in_guard(old, new, EV_LINK, path_mnt(ctx.arg(1)))
}

/// The `vfsmount` of a `struct path`, or null if it cannot be read (then no name is given).
#[inline(always)]
fn path_mnt(path: *const u8) -> *const u8 {
    let off = offsets();
    read::<*const u8>(path, off.path_mnt).unwrap_or(core::ptr::null())
}

/// Refuses giving the object `old` the name `new` when it lies below a directory with a
/// deny rule and the new name would not: the walk up from it would no longer meet that
/// rule. (A rule keyed by the object itself goes wherever it goes, so it is not looked at.)
/// `mnt` is the mount both names are on, null when the hook has none.
#[inline(always)]
fn keep_in_guard(old: *const u8, new: *const u8, action: usize, mnt: *const u8) -> i32 {
    let off = offsets();
    if !off.is_set() {
        return 0;
    }
    let (scope, target_id, tgid, fail, slot) = match task_scope(off) {
        Prep::Skip => return 0,
        Prep::Fail(r) => return r,
        Prep::Go(c, _) => (c.scope, c.target_id, c.tgid, c.fail, c.slot),
    };
    let (Ok(old_parent), Ok(new_parent)) = (
        read::<*const u8>(old, off.dentry_parent),
        read::<*const u8>(new, off.dentry_parent),
    ) else {
        return fail;
    };
    // The enforced rules first: a move that takes an object out of one is refused.
    let (key, rule, depth, monitor) = match escape(off, old_parent, new_parent, scope, false) {
        Walk::Lost => return fail,
        Walk::Found(key, rule, depth) => (key, rule, depth, false),
        // Then the monitored ones: such a move is recorded, and let through.
        Walk::Root => match escape(off, old_parent, new_parent, scope, true) {
            Walk::Found(key, rule, depth) => (key, rule, depth, true),
            Walk::Root | Walk::Lost => return 0,
        },
    };
    if monitor && mnt.is_null() && NAMED.get((action - EV_RENAME) as u32) == Some(&1) {
        return 0;
    }
    let mut head = Head {
        target_id,
        scope,
        tgid,
        subject: rule.subject,
        event: action as u8,
        verdict: VERDICT_DENY,
        flags: if monitor { DECISION_MONITOR } else { 0 },
        // The object is one level below where the walk started.
        depth: depth as u8 + 1,
        rule: key,
    };
    if rule.flags & RULE_AUDIT != 0 {
        head.flags |= DECISION_AUDIT;
    }
    janus_record(&Made {
        head,
        leaf: old as u64,
        mnt: mnt as u64,
        watched: 0,
        owner: 0,
        slot,
    });
    if monitor {
        0
    } else {
        -EPERM
    }
}

/// Where a walk up ended.
enum Walk {
    /// At the root, without a hit.
    Root,
    /// A kernel read failed, or the walk ran out of depth: a hit cannot be ruled out.
    Lost,
    /// The rule's key, its first deny, and how far up it is.
    Found(InodeKey, EventRule, usize),
}

/// The enforced rules of an entry, or its monitored ones.
#[inline(always)]
fn slots(rule: &Rule, monitored: bool) -> &[EventRule; EVENTS] {
    if monitored {
        &rule.monitor
    } else {
        &rule.events
    }
}

/// Whether moving the object below `old_parent` to below `new_parent` takes it out of the
/// nearest directory denying it (among the enforced or the monitored rules): `Found` with
/// that deny if it does, `Root` if it does not.
#[inline(always)]
fn escape(
    off: &Offsets,
    old_parent: *const u8,
    new_parent: *const u8,
    scope: u32,
    monitored: bool,
) -> Walk {
    match nearest_deny(off, old_parent, scope, monitored) {
        Walk::Found(key, rule, depth) => match below(off, new_parent, scope, key, monitored) {
            Walk::Found(..) => Walk::Root,
            Walk::Lost | Walk::Root => Walk::Found(key, rule, depth),
        },
        other => other,
    }
}

/// The nearest directory at or above `dentry` with a deny rule for any event.
#[inline(always)]
fn nearest_deny(off: &Offsets, dentry: *const u8, scope: u32, monitored: bool) -> Walk {
    let mut dentry = dentry;
    let mut depth = 0;
    while depth < MAX_DEPTH {
        if let Some(key) = inode_key(off, dentry, scope) {
            if let Some(rule) = unsafe { RULES.get(&key) } {
                let e = slots(rule, monitored);
                let deny = if e[EV_OPEN].verdict == VERDICT_DENY {
                    e[EV_OPEN]
                } else if e[EV_ACCESS].verdict == VERDICT_DENY {
                    e[EV_ACCESS]
                } else if e[EV_EXEC].verdict == VERDICT_DENY {
                    e[EV_EXEC]
                } else {
                    e[EV_MODIFY]
                };
                if deny.verdict == VERDICT_DENY {
                    return Walk::Found(key, deny, depth);
                }
            }
        }
        let Ok(parent) = read::<*const u8>(dentry, off.dentry_parent) else {
            return Walk::Lost;
        };
        if parent == dentry || parent.is_null() {
            return Walk::Root;
        }
        dentry = parent;
        depth += 1;
    }
    Walk::Lost
}

/// Whether the inode `want` is at or above `dentry` with no other rule (of the same mode)
/// in between: a rule nearer the new name (an allow inside the deny) would decide for it
/// instead.
#[inline(always)]
fn below(off: &Offsets, dentry: *const u8, scope: u32, want: InodeKey, monitored: bool) -> Walk {
    let mut dentry = dentry;
    let mut depth = 0;
    while depth < MAX_DEPTH {
        if let Some(key) = inode_key(off, dentry, scope) {
            if key.ino == want.ino && key.dev == want.dev {
                return Walk::Found(key, EventRule::default(), depth);
            }
            if let Some(rule) = unsafe { RULES.get(&key) } {
                let e = slots(rule, monitored);
                if e[EV_OPEN].verdict
                    | e[EV_ACCESS].verdict
                    | e[EV_EXEC].verdict
                    | e[EV_MODIFY].verdict
                    != VERDICT_NONE
                {
                    return Walk::Lost;
                }
            }
        }
        let Ok(parent) = read::<*const u8>(dentry, off.dentry_parent) else {
            return Walk::Lost;
        };
        if parent == dentry || parent.is_null() {
            return Walk::Root;
        }
        dentry = parent;
        depth += 1;
    }
    Walk::Lost
}

/// The loader's offsets, read in place (a copy on the stack would count against the 512
/// bytes that a hook and the functions it calls share).
#[inline(always)]
fn offsets() -> &'static Offsets {
    // Through an opaque pointer, so the compiler does not fold the zeros the loader
    // overwrites.
    unsafe { &*core::hint::black_box(&raw const OFFSETS) }
}

#[inline(always)]
fn read<T>(base: *const u8, off: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(base.add(off as usize) as *const T) }
}

/// What every event of one hook call shares.
struct Call {
    off: &'static Offsets,
    scope: u32,
    target_id: u32,
    tgid: u32,
    owner: bool,
    is_dir: bool,
    /// What a failure to decide returns: -EPERM (fail closed), or 0 in a scope whose
    /// subjects all only monitor.
    fail: i32,
    /// The guard has subjects in monitor mode.
    watched: bool,
    /// Its share of the ring (`Scope::slot`).
    slot: u32,
    leaf: *const u8,
    /// The file's mount (null if unreadable: no name used is given).
    mnt: *const u8,
}

/// Whether a call is ours to decide.
enum Prep {
    /// No guarded scope, overlayfs' backing file, or the loader did not configure us.
    Skip,
    /// The task is in a guarded scope but a kernel read failed: the scope's `fail`.
    Fail(i32),
    Go(Call, u32),
}

/// The guarded scope of the current task, as a [`Call`] without a file.
#[inline(always)]
fn task_scope(off: &'static Offsets) -> Prep {
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Ok(nsproxy) = read::<*const u8>(task, off.task_nsproxy) else {
        return Prep::Skip;
    };
    if nsproxy.is_null() {
        // An exiting task.
        return Prep::Skip;
    }
    let Ok(mnt_ns) = read::<*const u8>(nsproxy, off.nsproxy_mnt_ns) else {
        return Prep::Skip;
    };
    let Ok(mut ns) = read::<u32>(mnt_ns, off.mnt_ns_inum) else {
        return Prep::Skip;
    };
    let scope = match unsafe { SCOPES.get(&ns) } {
        Some(scope) => scope,
        None => {
            let Some(n) = root_scope(task, off) else {
                return Prep::Skip;
            };
            ns = n;
            match unsafe { SCOPES.get(&ns) } {
                Some(scope) => scope,
                None => return Prep::Skip,
            }
        }
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    Prep::Go(
        Call {
            off,
            scope: ns,
            target_id: scope.target_id,
            tgid,
            owner: tgid == scope.owners[0] || tgid == scope.owners[1],
            is_dir: false,
            fail: if scope.flags & SCOPE_MONITOR != 0 {
                0
            } else {
                -EPERM
            },
            watched: scope.flags & SCOPE_WATCHED != 0,
            slot: scope.slot,
            leaf: core::ptr::null(),
            mnt: core::ptr::null(),
        },
        0,
    )
}

/// Fails a call closed when the current task is in a guarded scope.
#[inline(always)]
fn fail_if_scoped() -> i32 {
    match task_scope(offsets()) {
        Prep::Skip => 0,
        Prep::Fail(r) => r,
        Prep::Go(c, _) => c.fail,
    }
}

#[inline(always)]
fn prepare(file: *const u8) -> Prep {
    let off = offsets();
    if !off.is_set() {
        return Prep::Skip;
    }
    let Ok(mode) = read::<u32>(file, off.file_f_mode) else {
        return match task_scope(off) {
            Prep::Go(c, _) => Prep::Fail(c.fail),
            other => other,
        };
    };
    // overlayfs opens (and reads) a backing file behind each overlay file: the overlay
    // file was decided already, and the backing inode is not the guarded one.
    if off.fmode_backing != 0 && mode & off.fmode_backing != 0 {
        return Prep::Skip;
    }
    let mut c = match task_scope(off) {
        Prep::Go(c, _) => c,
        other => return other,
    };
    let Ok(leaf) = read::<*const u8>(file, off.file_dentry) else {
        return Prep::Fail(c.fail);
    };
    let Ok(inode) = read::<*const u8>(file, off.file_f_inode) else {
        return Prep::Fail(c.fail);
    };
    let Ok(imode) = read::<u16>(inode, off.inode_mode) else {
        return Prep::Fail(c.fail);
    };
    c.leaf = leaf;
    c.mnt = read::<*const u8>(file, off.file_mnt).unwrap_or(core::ptr::null());
    c.is_dir = imode & S_IFMT == S_IFDIR;
    Prep::Go(c, mode)
}

/// The scope whose target's root directory is the task's own, when its mount namespace is
/// not a guarded one.
#[inline(always)]
fn root_scope(task: *const u8, off: &Offsets) -> Option<u32> {
    let fs: *const u8 = read(task, off.task_fs).ok()?;
    if fs.is_null() {
        return None;
    }
    let root: *const u8 = read(fs, off.fs_root_dentry).ok()?;
    let key = inode_key(off, root, 0)?;
    unsafe { ROOTS.get(&key) }.copied()
}

/// Whether a rule refuses the caller: a deny, unless the owner asked and the rule lets it.
#[inline(always)]
fn refuses(rule: &EventRule, owner: bool) -> bool {
    rule.verdict == VERDICT_DENY && !(owner && rule.flags & RULE_AUTO_ALLOW_OWNER != 0)
}

/// Decides one event: walks up from the file to the nearest ancestor with an enforced rule
/// for it, which answers. Where it lets the access through and the guard has subjects in
/// monitor mode, a second walk finds the nearest monitored rule: if that one would refuse,
/// it is what the record says (and the access is still allowed).
///
/// A call, not inlined: a hook that decides two or three events (an exec, an open, a
/// write-open) goes on from the few states where it returns, not from one per path through
/// it; inlined, the verifier's work multiplied past 6.1's budget.
#[inline(never)]
fn check(ctx: &LsmContext, c: &Call, ev: usize) -> i32 {
    let off = c.off;
    let mut dentry = c.leaf;
    let mut hit = None;
    let mut depth = 0;
    while depth < MAX_DEPTH {
        if let Some(key) = inode_key(off, dentry, c.scope) {
            if let Some(rule) = unsafe { RULES.get(&key) } {
                let r = rule.events[ev];
                if r.verdict != VERDICT_NONE {
                    hit = Some((r, key));
                    break;
                }
            }
        }
        let Ok(parent) = read::<*const u8>(dentry, off.dentry_parent) else {
            // An ancestor we cannot read might deny: deny.
            return c.fail;
        };
        if parent == dentry || parent.is_null() {
            // The root: no enforced rule guards this file for this event.
            if !c.watched {
                return 0;
            }
            break;
        }
        dentry = parent;
        depth += 1;
    }
    // No record yet (the root was reached without a rule).
    let mut made = Made {
        head: head_of(c, ev),
        leaf: c.leaf as u64,
        mnt: c.mnt as u64,
        watched: 0,
        owner: u8::from(c.owner),
        slot: c.slot,
    };
    let head = &mut made.head;
    match hit {
        None if depth < MAX_DEPTH => {}
        None => {
            // Out of depth: an ancestor we did not reach might deny, so deny (fail closed).
            warn!(
                ctx,
                "janus: more than {} ancestors above an opened file; denied to tgid {} (fail closed)",
                MAX_DEPTH,
                c.tgid
            );
            head.verdict = VERDICT_DENY;
            head.flags |= DECISION_TOO_DEEP | DECISION_AUDIT;
            if c.fail == 0 {
                head.flags |= DECISION_MONITOR;
            }
        }
        Some((rule, key)) => decided_by(head, &rule, key, depth, c.owner),
    }
    let deny = head.verdict == VERDICT_DENY && head.flags & DECISION_MONITOR == 0;
    let answer = if deny { -EPERM } else { 0 };
    // The record is made by a function the verifier goes through once, on its own: inline,
    // it went through it once per state that reaches here, past 6.1's budget.
    made.watched = u8::from(!deny && c.watched);
    janus_record(&made);
    answer
}

/// The head of a record of event `ev` in call `c`, before any rule decided.
#[inline(always)]
fn head_of(c: &Call, ev: usize) -> Head {
    Head {
        target_id: c.target_id,
        scope: c.scope,
        tgid: c.tgid,
        subject: 0,
        event: ev as u8,
        verdict: VERDICT_NONE,
        flags: if c.is_dir { DECISION_IS_DIR } else { 0 },
        depth: MAX_DEPTH as u8,
        rule: InodeKey::default(),
    }
}

/// Fills `head` with what `rule` (at `key`, `depth` levels above the file) decides.
#[inline(always)]
fn decided_by(head: &mut Head, rule: &EventRule, key: InodeKey, depth: usize, owner: bool) {
    head.verdict = rule.verdict;
    if head.verdict == VERDICT_DENY && !refuses(rule, owner) {
        head.verdict = VERDICT_ALLOW;
        head.flags |= DECISION_BY_OWNER;
    }
    if rule.flags & RULE_AUDIT != 0 {
        head.flags |= DECISION_AUDIT;
    }
    if rule.flags & RULE_MONITOR != 0 {
        head.flags |= DECISION_MONITOR;
    }
    head.subject = rule.subject;
    head.depth = depth as u8;
    head.rule = key;
}

/// The nearest ancestor of `leaf` with a monitored rule for `ev`, and how far up it is;
/// `None` where there is none, or the walk cannot tell.
#[inline(always)]
fn nearest_monitored(
    off: &Offsets,
    leaf: *const u8,
    scope: u32,
    ev: usize,
) -> Option<(EventRule, InodeKey, usize)> {
    let mut dentry = leaf;
    let mut depth = 0;
    while depth < MAX_DEPTH {
        if let Some(key) = inode_key(off, dentry, scope) {
            if let Some(rule) = unsafe { RULES.get(&key) } {
                let mut m = rule.monitor[ev];
                if m.verdict != VERDICT_NONE {
                    // Whatever the map holds, a monitored rule never refuses.
                    m.flags |= RULE_MONITOR;
                    return Some((m, key, depth));
                }
            }
        }
        let parent = read::<*const u8>(dentry, off.dentry_parent).ok()?;
        if parent == dentry || parent.is_null() {
            return None;
        }
        dentry = parent;
        depth += 1;
    }
    None
}

/// The fixed part of a decision record.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Head {
    target_id: u32,
    scope: u32,
    tgid: u32,
    subject: u16,
    event: u8,
    verdict: u8,
    flags: u8,
    depth: u8,
    rule: InodeKey,
}

/// A decision made, as [`janus_record`] takes it: plain memory of a fixed size, which is what a
/// global function may be given (its pointers as numbers, read with `bpf_probe_read_kernel`).
#[repr(C)]
pub struct Made {
    head: Head,
    /// The file's dentry, where the names and the monitored rules' walk start.
    leaf: u64,
    /// Its mount (0 if unreadable: no name used is given).
    mnt: u64,
    /// 1: the enforced rules let it through and the guard has monitored subjects, whose
    /// nearest rule may be what the record says.
    watched: u8,
    /// 1: the task is the container's owner.
    owner: u8,
    /// The deciding target's slot in `TALLIES` and `DRAINED` (`Scope::slot`), as read with
    /// the decision: its scope may have been replaced since.
    slot: u32,
}

/// Writes the record of a decision to the ring: its head, the first `head.depth` names from
/// the leaf up (those below the rule: the agent knows the rule's own path), and the path used
/// on the mount. Where the enforced rules let the access through, the nearest monitored rule
/// may say otherwise first; with no rule at all there is nothing to record. When the ring has
/// no room for the guard's record, the decision stands and its loss is counted (`lost`).
///
/// A global function (exported, with BTF): the verifier checks it once, on its own, with
/// whatever `made` holds, instead of once per state of each hook that calls it.
#[no_mangle]
#[inline(never)]
pub extern "C" fn janus_record(made: *const Made) -> i32 {
    // SAFETY: the caller's stack, or null (which the verifier makes us check).
    let Some(made) = (unsafe { made.as_ref() }) else {
        return 0;
    };
    let mut head = made.head;
    let ev = usize::from(head.event);
    let (leaf, mnt) = (made.leaf as *const u8, made.mnt as *const u8);
    let off = offsets();
    // A move (`EV_RENAME`, `EV_LINK`) has no monitored rules of its own to walk. The mask
    // changes nothing below `EVENTS`, but puts the bound on the value that indexes (the
    // compiler would drop it, and the check above, from what it spills).
    if made.watched != 0 && ev < EVENTS {
        let ev = core::hint::black_box(ev) & (EVENTS - 1);
        if let Some((rule, key, depth)) = nearest_monitored(off, leaf, head.scope, ev) {
            if head.verdict == VERDICT_NONE || refuses(&rule, made.owner != 0) {
                head = Head {
                    subject: 0,
                    verdict: VERDICT_NONE,
                    flags: head.flags & DECISION_IS_DIR,
                    depth: MAX_DEPTH as u8,
                    rule: InodeKey::default(),
                    ..head
                };
                decided_by(&mut head, &rule, key, depth, made.owner != 0);
            }
        }
    }
    if head.verdict == VERDICT_NONE {
        // No rule for this file: no decision to record.
        return 0;
    }
    let Some(tally) = TALLIES.get_ptr_mut(made.slot) else {
        // Not a slot the agent gave (it sized the map): no share to charge.
        dropped();
        return 0;
    };
    let drained = DRAINED.get(made.slot).copied().unwrap_or(0);
    let Some(mut entry) = reserve(&head, tally, drained) else {
        return 0;
    };
    let rec = unsafe { &mut *entry.as_mut_ptr() };
    write_head(rec, &head);
    rec.slot = made.slot;
    write_task(rec);
    copy_names(off, rec, leaf);
    copy_via(off, rec, mnt, leaf);
    entry.submit(0);
    0
}

// 6.1 checks that every byte a global function is given was written, padding too; the
// compiler writes these whole today (explicit zeroed padding made it spill them, past the
// 512 bytes of stack the hook and its calls share), and the VM tests load them on 6.1.
const _: () = assert!(core::mem::size_of::<Head>() == 40);
const _: () = assert!(core::mem::size_of::<Made>() == 64);

/// A record for `head`'s decision in the ring, charged to its target; or `None` with the
/// loss counted: the ring is full, or half full with the target's share of it waiting. Runs
/// on other CPUs at the same moment may each find the share one short of full: a target can
/// pass it by as many records as runs race (without the fetch of an atomic add, which the
/// BPF processor version these programs are built for lacks).
#[inline(always)]
fn reserve(head: &Head, tally: *mut Tally, drained: u64) -> Option<RingBufEntry<Decision>> {
    // SAFETY: the map's value, which stays while the program runs.
    let charged = unsafe { core::ptr::read_volatile(&raw const (*tally).charged) };
    let admitted = charged.wrapping_sub(drained) < RING_SHARE
        || DECISIONS.query(BPF_RB_AVAIL_DATA.into()) < u64::from(RING_BYTES / 2);
    let entry = if admitted {
        DECISIONS.reserve::<Decision>(0)
    } else {
        None
    };
    match &entry {
        // Charged before the agent can read it: what it has read never runs ahead.
        // SAFETY: as above.
        Some(_) => unsafe { add(&raw mut (*tally).charged, 1) },
        None => lost(head, tally),
    }
    entry
}

/// Counts `head`'s decision, whose record the ring did not take, in its target's tally, then
/// the record in `DROPPED`: the reader looks at the tallies when `DROPPED` has grown.
#[inline(always)]
fn lost(head: &Head, tally: *mut Tally) {
    let slot = lost_slot(
        usize::from(head.event),
        head.verdict == VERDICT_DENY,
        head.flags & DECISION_MONITOR != 0,
    );
    // SAFETY: the map's value; `lost_slot` is below `LOST_SLOTS`.
    unsafe { add(&raw mut (*tally).lost[slot], 1) };
    dropped();
}

/// Adds `n` to `*at`, atomically: the programs of every CPU count on the same tally.
#[inline(always)]
unsafe fn add(at: *mut u64, n: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(at, n) };
}

/// Counts a record the ring did not take.
#[inline(always)]
fn dropped() {
    if let Some(n) = DROPPED.get_ptr_mut(0) {
        // SAFETY: the map's value, this CPU's; atomic, as a run that preempts this one
        // may count too.
        unsafe { add(n, 1) };
    }
}

#[inline(always)]
fn write_head(rec: &mut Decision, head: &Head) {
    rec.target_id = head.target_id;
    rec.scope = head.scope;
    rec.tgid = head.tgid;
    rec.subject = head.subject;
    rec.event = head.event;
    rec.verdict = head.verdict;
    rec.depth = head.depth;
    rec.rule = head.rule;
    rec.flags = head.flags;
}

/// Who made the access, from the task itself: it may be gone by the time the agent reads
/// the record. A failed read leaves 0, or an empty name.
#[inline(always)]
fn write_task(rec: &mut Decision) {
    let ids = bpf_get_current_uid_gid();
    rec.uid = ids as u32;
    rec.gid = (ids >> 32) as u32;
    // Read from the global, not from a copy of the offsets: the stack is small.
    let (parent_off, tgid_off) = unsafe {
        (
            core::ptr::read_volatile(&OFFSETS.task_real_parent),
            core::ptr::read_volatile(&OFFSETS.task_tgid),
        )
    };
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let mut parent: *const u8 = core::ptr::null();
    // SAFETY: helpers that write at most the given sizes into memory of that size; a
    // failed read zeroes its destination.
    unsafe {
        generated::bpf_get_current_comm(rec.comm.as_mut_ptr() as *mut c_void, COMM_LEN as u32);
        generated::bpf_probe_read_kernel(
            &mut parent as *mut *const u8 as *mut c_void,
            8,
            task.add(parent_off as usize) as *const c_void,
        );
        generated::bpf_probe_read_kernel(
            &mut rec.ppid as *mut u32 as *mut c_void,
            4,
            parent.add(tgid_off as usize) as *const c_void,
        );
    }
}

/// The names of the first `rec.depth` dentries from `leaf` up, for the log line; a name
/// that cannot be read is `?`, never what an earlier record left in the ring.
#[inline(always)]
fn copy_names(off: &Offsets, rec: &mut Decision, leaf: *const u8) {
    rec.names_cut = 0;
    let mut named = leaf;
    let mut i = 0;
    // The count is read from the record, untracked by the verifier (see `copy_via`).
    while i < MAX_NAMES && i < usize::from(unsafe { core::ptr::read_volatile(&rec.depth) }) {
        let name = read::<*const u8>(named, off.dentry_name).unwrap_or(core::ptr::null());
        if copy_name(&mut rec.names[i], name) == Some(true) {
            rec.names_cut |= 1 << i;
        }
        named = read::<*const u8>(named, off.dentry_parent).unwrap_or(core::ptr::null());
        i += 1;
    }
}

/// Copies a dentry's name into `dst`, NUL-terminated: whether it was longer than the field
/// holds, or `None` (and `?`) if it could not be read (a null `name` included).
#[inline(always)]
fn copy_name(dst: &mut [u8; NAME_LEN], name: *const u8) -> Option<bool> {
    let copied = unsafe {
        generated::bpf_probe_read_kernel_str(
            dst.as_mut_ptr() as *mut c_void,
            NAME_LEN as u32,
            name as *const c_void,
        )
    };
    if copied < 0 {
        dst[0] = b'?';
        dst[1] = 0;
        return None;
    }
    // A full field: the name goes on if the byte the NUL took the place of is not its end.
    Some(
        copied as usize == NAME_LEN
            && read::<u8>(name, (NAME_LEN - 1) as u32).is_ok_and(|b| b != 0),
    )
}

/// The names of the path the task used for `leaf` on mount `mnt`, from `leaf` up to the
/// task's root, stepping from a mount's root to where it is mounted as `d_path` does. Sets
/// `via_len` (0: not known) and, in `flags`, `DECISION_VIA_CUT` when more names lie above
/// the `MAX_NAMES` kept, and `DECISION_VIA_DETACHED` unless the walk reached the root (a
/// mount detached or outside the task's root, more than `VIA_STEPS` steps, a failed read).
///
/// The count of names lives in the record, not in a register: the verifier does not track
/// values in ring memory, so the states it meets at the loop's head differ by the step alone
/// (tracked counters would multiply them, past its budget).
#[inline(always)]
fn copy_via(off: &Offsets, rec: &mut Decision, mnt: *const u8, leaf: *const u8) {
    unsafe { core::ptr::write_volatile(&mut rec.via_len, 0) };
    rec.via_cut = 0;
    if mnt.is_null() {
        return;
    }
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let Ok(fs) = read::<*const u8>(task, off.task_fs) else {
        return;
    };
    let (Ok(root_mnt), Ok(root)) = (
        read::<*const u8>(fs, off.fs_root_mnt),
        read::<*const u8>(fs, off.fs_root_dentry),
    ) else {
        return;
    };
    rec.flags |= DECISION_VIA_DETACHED;
    let mut mnt = mnt;
    let mut dentry = leaf;
    let mut step = 0;
    while step < VIA_STEPS {
        step += 1;
        if dentry == root && mnt == root_mnt {
            rec.flags &= !DECISION_VIA_DETACHED;
            return;
        }
        let Ok(mnt_root) = read::<*const u8>(mnt, off.vfsmount_root) else {
            return;
        };
        if dentry == mnt_root {
            // `real_mount`: the `struct mount` around this `vfsmount`.
            let mount = (mnt as usize).wrapping_sub(off.mount_mnt as usize) as *const u8;
            let (Ok(parent), Ok(point)) = (
                read::<*const u8>(mount, off.mount_parent),
                read::<*const u8>(mount, off.mount_mountpoint),
            ) else {
                return;
            };
            if parent == mount {
                // The namespace's root, without meeting the task's: outside its root.
                return;
            }
            mnt = (parent as usize).wrapping_add(off.mount_mnt as usize) as *const u8;
            dentry = point;
            continue;
        }
        let (Ok(name), Ok(parent)) = (
            read::<*const u8>(dentry, off.dentry_name),
            read::<*const u8>(dentry, off.dentry_parent),
        ) else {
            return;
        };
        if parent == dentry {
            return;
        }
        let n = usize::from(unsafe { core::ptr::read_volatile(&rec.via_len) });
        if n >= MAX_NAMES {
            // Only the last names are kept; the walk goes on to tell whether the path
            // reaches the root.
            rec.flags |= DECISION_VIA_CUT;
        } else {
            // The verifier needs the bound on the register that indexes, which the compiler
            // may not be the one it checked: masked where the compiler cannot drop it.
            let n = core::hint::black_box(n) & (MAX_NAMES - 1);
            match copy_name(&mut rec.via[n], name) {
                None => return,
                Some(true) => rec.via_cut |= 1 << n,
                Some(false) => {}
            }
            unsafe { core::ptr::write_volatile(&mut rec.via_len, n as u8 + 1) };
        }
        dentry = parent;
    }
}

#[inline(always)]
fn inode_key(off: &Offsets, dentry: *const u8, scope: u32) -> Option<InodeKey> {
    let inode: *const u8 = read(dentry, off.dentry_inode).ok()?;
    if inode.is_null() {
        return None;
    }
    let ino: u64 = read(inode, off.inode_ino).ok()?;
    let sb: *const u8 = read(inode, off.inode_sb).ok()?;
    let dev: u32 = read(sb, off.sb_dev).ok()?;
    Some(InodeKey { ino, dev, scope })
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; never called.
    loop {}
}
