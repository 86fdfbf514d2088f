//! The BPF LSM backend: the kernel decides guarded opens and reads itself (`janus-ebpf`),
//! and the agent fills its maps and logs the decisions it reports through a ring buffer.
//!
//! Which guards it cannot express, and so leaves to fanotify ([`GuardError::Unsupported`]):
//! a guarded path that does not exist when the guard starts (the maps are keyed by inode),
//! a second guard on a mount namespace that already has one, and more rules or targets
//! than the maps hold.

mod audit;
pub mod btf;
pub mod rules;
mod share;

use std::collections::{HashMap as StdHashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::Lsm;
use aya::{Btf, Ebpf, EbpfLoader};
use janus_api::logformat::Process;
use janus_api::{Event, Mode, RuleSet, Verdict};
use janus_common::{
    Decision, InodeKey, Offsets, Rule, Scope, DECISION_AUDIT, DECISION_IS_DIR, DECISION_MONITOR,
    DECISION_TOO_DEEP, DECISION_VIA_CUT, DECISION_VIA_DETACHED, EV_ACCESS, EV_EXEC, EV_LINK,
    EV_MODIFY, EV_OPEN, EV_RENAME, MAX_NAMES, MAX_RULES, MAX_SCOPES, NAME_LEN, SCOPE_MONITOR,
    SCOPE_WATCHED, VERDICT_DENY,
};

// The programs' event values are `janus_api::Event`'s: checked here, not by comment.
const _: () = assert!(
    Event::Open as usize == EV_OPEN
        && Event::Access as usize == EV_ACCESS
        && Event::Exec as usize == EV_EXEC
        && Event::Modify as usize == EV_MODIFY
        && Event::Rename as usize == EV_RENAME
        && Event::Link as usize == EV_LINK
        && Event::ALL.len() == EV_LINK + 1
);

use crate::decisions::{Entry, LogContext, LogSender};
use crate::metrics::{DecisionCounters, Metrics};
use crate::resolve::{self, ContainerRoot, FileId, TargetRoot};

pub const BACKEND: &str = "bpf";

/// Whether the build embedded the BPF object (`cargo xtask build-ebpf` had produced it).
pub const EMBEDDED: bool = cfg!(janus_bpf_embedded);

#[cfg(janus_bpf_embedded)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("JANUS_EBPF_OBJ_PATH"));
#[cfg(not(janus_bpf_embedded))]
static OBJECT: &[u8] = &[];

const LSM_LIST: &str = "/sys/kernel/security/lsm";
const PROGRAMS: [&str; 8] = [
    "file_open",
    "file_permission",
    "mmap_file",
    "file_mprotect",
    "path_rename",
    "path_link",
    "inode_rename",
    "inode_link",
];
/// Programs whose absence loses only a log line's ` via `, never a refusal; in the order
/// of the programs' `NAMED` map (rename, link).
const NAMING_ONLY: [&str; 2] = ["path_rename", "path_link"];

/// `--backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// BPF LSM where the kernel allows it, else fanotify.
    #[default]
    Auto,
    Bpf,
    Fanotify,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the BPF backend was not compiled in (run `cargo xtask build-ebpf` before building the agent)")]
    NotCompiledIn,
    #[error("the BPF LSM is not active: {LSM_LIST} lists {0:?} (boot with lsm=...,bpf)")]
    LsmInactive(String),
    #[error("cannot read {LSM_LIST}: {0}")]
    LsmList(std::io::Error),
    #[error("kernel BTF: {0:#}")]
    Btf(anyhow::Error),
    #[error("loading the BPF programs: {0}")]
    Load(String),
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The guard is valid but this backend cannot enforce it; fanotify should.
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
    #[error("updating BPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// What the ring reader needs to turn a decision record into a log line.
struct GuardEntry {
    ctx: Arc<LogContext>,
    counters: DecisionCounters,
    /// The guard's rule keys, with the path each was resolved from.
    paths: StdHashMap<InodeKey, Vec<u8>>,
    scope: u32,
    /// The target's root directory, its key in `ROOTS`.
    root: InodeKey,
    /// Since when the guard is lifted or replaced: kept a while for the records the ring
    /// still holds, then forgotten.
    retired: Option<Instant>,
    share: share::Share,
}

impl GuardEntry {
    /// Counts the decisions whose record the kernel dropped since the last look.
    fn count_lost(&mut self, shares: &share::Shares) {
        for (verdict, event, mode, n) in shares.lost_since(&mut self.share) {
            self.counters.inc_by(verdict, event, mode, n);
            self.ctx.lost(verdict, n);
        }
    }
}

/// How long a lifted guard's entry stays for records still in the ring.
const RETIRED_FOR: Duration = Duration::from_secs(10);

struct Maps {
    scopes: HashMap<MapData, u32, Scope>,
    roots: HashMap<MapData, InodeKey, u32>,
    rules: HashMap<MapData, InodeKey, Rule>,
    shares: share::Shares,
    capacity: Capacity,
    rule_count: u32,
    next_guard: u32,
}

/// How many entries the kernel maps hold, set when the programs are loaded. The maps are
/// preallocated, so this is kernel memory the node spends whether used or not (about 100
/// bytes an entry, BENCHMARKS.md); a target that does not fit goes to fanotify, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::Args)]
pub struct Capacity {
    /// Rule map entries for the node: one per guarded path of each target, and per file
    /// with other names below a guarded directory.
    #[arg(long = "bpf-max-rules", default_value_t = MAX_RULES,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub rules: u32,
    /// Targets (a guard on one container) the BPF backend holds at once.
    #[arg(long = "bpf-max-targets", default_value_t = MAX_SCOPES,
          value_parser = clap::value_parser!(u32).range(1..=1 << 16))]
    pub targets: u32,
}

impl Capacity {
    /// Entries of the programs' `TALLIES` and `DRAINED`: a target's share of the decision
    /// ring outlives it while its lifted guard is kept (`RETIRED_FOR`).
    fn share_slots(self) -> u32 {
        2 * self.targets
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            rules: MAX_RULES,
            targets: MAX_SCOPES,
        }
    }
}

impl Maps {
    /// Inserts a guard's rules, its root and, last, its scope (until then the kernel ignores
    /// the rules); all or nothing: on an error, the map holds what it held before. `old` are
    /// the keys of the guard it replaces on the same scope: its rules are overwritten in
    /// place, the scope entry then names the new guard, and the keys only it had go last,
    /// so every object either guard covers is decided all along.
    fn place(
        &mut self,
        rules: &StdHashMap<InodeKey, Rule>,
        root: InodeKey,
        scope_id: u32,
        scope: Scope,
        old: &HashSet<InodeKey>,
    ) -> Result<(), GuardError> {
        let mut undo = Vec::with_capacity(rules.len());
        let mut result = Ok(());
        for (key, rule) in rules {
            let before = self.rules.get(key, 0).ok();
            if let Err(e) = self.rules.insert(key, rule, 0) {
                result = Err(map_error("RULES")(e));
                break;
            }
            undo.push((*key, before));
        }
        let root_before = self.roots.get(&root, 0).ok();
        if result.is_ok() {
            result = self
                .roots
                .insert(root, scope_id, 0)
                .map_err(map_error("ROOTS"));
        }
        if result.is_ok() {
            result = self
                .scopes
                .insert(scope_id, scope, 0)
                .map_err(map_error("SCOPES"));
        }
        if result.is_err() {
            for (key, before) in undo {
                let _ = match before {
                    Some(rule) => self.rules.insert(key, rule, 0),
                    None => self.rules.remove(&key),
                };
            }
            let _ = match root_before {
                Some(s) => self.roots.insert(root, s, 0),
                None => self.roots.remove(&root),
            };
            return result;
        }
        // Counted by what the map did: a guard's keys include names that have no rule.
        self.rule_count += undo.iter().filter(|(_, before)| before.is_none()).count() as u32;
        for key in old.iter().filter(|k| !rules.contains_key(k)) {
            if self.rules.remove(key).is_ok() {
                self.rule_count -= 1;
            }
        }
        Ok(())
    }
}

/// The loaded, attached programs. Dropping it (or [`Enforcer::shutdown`]) detaches them.
pub struct Enforcer {
    ebpf: Mutex<Option<Ebpf>>,
    maps: Arc<Mutex<Maps>>,
    guards: Arc<Mutex<StdHashMap<u32, GuardEntry>>>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// Starts the backend `choice` asks for and logs once which one runs and why the other
/// does not. `None` means fanotify only. `--backend bpf` fails when BPF cannot run.
pub fn select(
    choice: BackendChoice,
    capacity: Capacity,
    metrics: &Arc<Metrics>,
    log: &LogSender,
) -> anyhow::Result<Option<Enforcer>> {
    for b in [BACKEND, crate::fanotify::target::BACKEND] {
        metrics.backend_info.with_label_values(&[b]).set(0);
    }
    if !EMBEDDED {
        tracing::info!("the BPF backend was not compiled in; only fanotify is available");
    }
    let started = match choice {
        BackendChoice::Fanotify => {
            tracing::info!(
                backend = "fanotify",
                reason = "--backend fanotify",
                "enforcement backend"
            );
            None
        }
        BackendChoice::Bpf => Some(
            Enforcer::start(capacity, metrics.clone(), log.clone())
                .map_err(|e| anyhow::anyhow!("--backend bpf: {e}"))?,
        ),
        BackendChoice::Auto => match Enforcer::start(capacity, metrics.clone(), log.clone()) {
            Ok(e) => Some(e),
            Err(why) => {
                tracing::info!(backend = "fanotify", reason = %why, "enforcement backend: BPF LSM unavailable, falling back to fanotify");
                None
            }
        },
    };
    let in_use = if started.is_some() {
        tracing::info!(backend = BACKEND, "enforcement backend: BPF LSM programs attached; guards BPF cannot express go to fanotify");
        BACKEND
    } else {
        crate::fanotify::target::BACKEND
    };
    metrics.backend_info.with_label_values(&[in_use]).set(1);
    Ok(started)
}

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
pub fn kernel_offsets() -> anyhow::Result<Offsets> {
    use btf::Expect::{Int, Pointer, Struct};
    let raw = std::fs::read("/sys/kernel/btf/vmlinux")
        .map_err(|e| anyhow::anyhow!("reading /sys/kernel/btf/vmlinux: {e}"))?;
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

/// An error with its causes, one line (aya's load error keeps errno in its source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string().trim_end().trim_end_matches(':').to_owned();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(s.to_string().trim_end().trim_end_matches(':'));
        source = s.source();
    }
    out
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
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "raising RLIMIT_MEMLOCK");
    }
}

/// The kernel's identity of an inode from what `stat` gives in user space: its `(st_dev,
/// st_ino)`, in the kernel's `dev_t` encoding.
fn stat_key(id: FileId, scope: u32) -> InodeKey {
    InodeKey {
        ino: id.ino,
        dev: InodeKey::kernel_dev(libc::major(id.dev), libc::minor(id.dev)),
        scope,
    }
}

/// The files below the guarded directories `dirs` that have more than one name, with the
/// name they have there: a hard link elsewhere, made before the guard, is a name whose walk
/// up never meets the directory.
fn linked_files(
    dirs: Vec<(std::os::fd::OwnedFd, janus_api::GuardPath)>,
    scope: u32,
) -> Vec<(InodeKey, janus_api::GuardPath)> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = dirs;
    while let Some((dir, path)) = stack.pop() {
        resolve::for_each_entry(dir.as_fd(), |name, fd| {
            let (Ok(st), Some(p)) = (resolve::statx(fd.as_fd()), path.join(name)) else {
                return;
            };
            // A bind mount onto a descendant must not loop the walk.
            if !seen.insert(FileId::of(&st)) || resolve::on_kernel_fs(fd.as_fd()) {
                return;
            }
            if resolve::is_dir(&st) {
                stack.push((fd, p));
            } else if st.stx_nlink > 1 {
                out.push((stat_key(FileId::of(&st), scope), p));
            }
        });
    }
    out
}

/// How a map update failed, naming the map.
fn map_error(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> GuardError {
    move |source| GuardError::Map { map, source }
}

/// The programs' aya-log records (a fail-closed deny, say), through `log` into the agent's
/// own diagnostics on stderr.
fn read_bpf_log(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!(error = %e, "the BPF programs' diagnostics (aya-log) are not read");
            return;
        }
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no async runtime: the BPF programs' diagnostics (aya-log) are not read");
        return;
    };
    runtime.spawn(async move {
        use tokio::io::{unix::AsyncFd, Interest};
        // SAFETY: the AsyncFd owns the logger, which owns the descriptor: it stays open for
        // as long as it is registered.
        let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
        let Ok(mut logger) = registered else {
            return;
        };
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
}

impl Enforcer {
    /// Loads and attaches the programs; an error says why this kernel cannot run them.
    pub fn start(
        capacity: Capacity,
        metrics: Arc<Metrics>,
        log: LogSender,
    ) -> Result<Enforcer, StartError> {
        if !EMBEDDED {
            return Err(StartError::NotCompiledIn);
        }
        lsm_active()?;
        raise_memlock_limit();
        let t0 = Instant::now();
        let offsets = kernel_offsets().map_err(StartError::Btf)?;
        let kernel_btf = Btf::from_sys_fs().map_err(|e| StartError::Btf(e.into()))?;
        tracing::debug!(elapsed = ?t0.elapsed(), ?offsets, "read the kernel's BTF");
        let load = |e: &dyn std::fmt::Display| StartError::Load(e.to_string());
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&kernel_btf))
            .override_global("OFFSETS", &offsets, true)
            .map_max_entries("RULES", capacity.rules)
            .map_max_entries("SCOPES", capacity.targets)
            .map_max_entries("ROOTS", capacity.targets)
            .map_max_entries("TALLIES", capacity.share_slots())
            .map_max_entries("DRAINED", capacity.share_slots())
            .load(OBJECT)
            .map_err(|e| load(&e))?;
        read_bpf_log(&mut ebpf);
        for name in PROGRAMS {
            let program: &mut Lsm = ebpf
                .program_mut(name)
                .ok_or_else(|| StartError::Load(format!("no {name} program in the object")))?
                .try_into()
                .map_err(|e| load(&e))?;
            let attached = program
                .load(name, &kernel_btf)
                .map_err(|e| StartError::Load(format!("{name}: {}", chain(&e))))
                .and_then(|()| {
                    program
                        .attach()
                        .map(drop)
                        .map_err(|e| StartError::Load(format!("attaching {name}: {e:#}")))
                });
            match attached {
                Ok(()) => {
                    tracing::debug!(program = name, elapsed = ?t0.elapsed(), "attached");
                    if let Some(i) = NAMING_ONLY.iter().position(|n| *n == name) {
                        // The inode hooks leave the record of a monitored move to it.
                        let mut named: Array<_, u32> = ebpf
                            .map_mut("NAMED")
                            .ok_or_else(|| StartError::Load("no NAMED map in the object".into()))?
                            .try_into()
                            .map_err(|e| load(&e))?;
                        named.set(i as u32, 1, 0).map_err(|e| load(&e))?;
                    }
                }
                // The inode hooks refuse the same moves; these only add the name used.
                Err(e) if NAMING_ONLY.contains(&name) => tracing::warn!(
                    program = name,
                    error = %e,
                    "refused moves and links are logged without the name used \
                     (the kernel needs CONFIG_SECURITY_PATH and 5.19 or later)"
                ),
                Err(e) => return Err(e),
            }
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| StartError::Load(format!("no {name} map in the object")))
        };
        let scopes = HashMap::try_from(take(&mut ebpf, "SCOPES")?).map_err(|e| load(&e))?;
        let roots = HashMap::try_from(take(&mut ebpf, "ROOTS")?).map_err(|e| load(&e))?;
        let rules = HashMap::try_from(take(&mut ebpf, "RULES")?).map_err(|e| load(&e))?;
        let ring = RingBuf::try_from(take(&mut ebpf, "DECISIONS")?).map_err(|e| load(&e))?;
        let dropped = PerCpuArray::try_from(take(&mut ebpf, "DROPPED")?).map_err(|e| load(&e))?;
        let tallies = Array::try_from(take(&mut ebpf, "TALLIES")?).map_err(|e| load(&e))?;
        let drained = Array::try_from(take(&mut ebpf, "DRAINED")?).map_err(|e| load(&e))?;

        let maps = Arc::new(Mutex::new(Maps {
            scopes,
            roots,
            rules,
            shares: share::Shares::new(tallies, drained),
            capacity,
            rule_count: 0,
            next_guard: 1,
        }));
        let guards = Arc::new(Mutex::new(StdHashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (maps, guards) = (maps.clone(), guards.clone());
            let (stop, metrics) = (stop.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("bpf-decisions".into())
                .spawn(move || read_loop(ring, dropped, (&maps, &guards), &stop, &metrics, &log))
                .map_err(|e| load(&e))?
        };
        Ok(Enforcer {
            ebpf: Mutex::new(Some(ebpf)),
            maps,
            guards,
            metrics,
            stop,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Enforces `guard` on the mount namespace of `pid` in the kernel; returns the id that
    /// [`Enforcer::remove`] takes, and whether it took the place of the guard `replacing`
    /// (the same target's, on the same mount namespace) in the maps, with no moment
    /// between the two; that guard is then retired and must not be removed.
    pub fn guard(
        &self,
        ctx: Arc<LogContext>,
        at: &TargetRoot,
        replacing: Option<u32>,
    ) -> Result<(u32, bool), GuardError> {
        let guard = ctx.guard.clone();
        let pid = at.pid;
        let root = ContainerRoot::open(at)?;
        let scope_id = u32::try_from(root.mnt_ns)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| GuardError::Unsupported(format!("pid {pid}: no mount namespace")))?;
        let mut table = rules::Table::default();
        let mut resolved = Vec::new();
        let mut dirs = Vec::new();
        for rule in RuleSet::from_policy(&guard).rules() {
            let (fd, canonical) = root.resolve(&rule.path).map_err(|e| match e {
                resolve::ResolveError::Path { ref error, .. }
                    if error.kind() == std::io::ErrorKind::NotFound =>
                {
                    GuardError::Unsupported(format!(
                        "{e} (BPF keys rules by inode, so guarded paths must exist)"
                    ))
                }
                e => e.into(),
            })?;
            let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| {
                GuardError::Resolve(resolve::ResolveError::Path {
                    path: rule.path.clone(),
                    error: e.into(),
                })
            })?;
            let at = rules::Resolved {
                key: stat_key(
                    FileId {
                        dev: st.st_dev,
                        ino: st.st_ino,
                    },
                    scope_id,
                ),
                is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
                path: canonical.as_bytes().to_vec(),
            };
            table.add(&guard, rule, &at);
            resolved.push(janus_api::decide::Rule {
                path: canonical.clone(),
                ..rule.clone()
            });
            if at.is_dir {
                dirs.push((fd, canonical));
            }
        }
        let resolved = RuleSet::new(resolved);
        for (key, path) in linked_files(dirs, scope_id) {
            let at = rules::Resolved {
                key,
                is_dir: false,
                path: path.as_bytes().to_vec(),
            };
            table.add_linked(&guard, &resolved, &at);
            table.paths.entry(key).or_insert(at.path);
        }
        let owners = at.owners()?.map(|p| p as u32);
        let root_key = stat_key(root.root_id(), 0);

        let mut maps = self.maps.lock().expect("maps lock");
        let mut guards = self.guards.lock().expect("guards lock");
        let now = Instant::now();
        guards.retain(|_, g| {
            let kept = g
                .retired
                .is_none_or(|t| now.duration_since(t) < RETIRED_FOR);
            if !kept {
                g.count_lost(&maps.shares);
                maps.shares.close(&g.share);
            }
            kept
        });
        // The guard replaced in place: the same target's, still on this mount namespace.
        let replaced = replacing.and_then(|id| {
            guards
                .get(&id)
                .filter(|g| g.scope == scope_id && g.retired.is_none())
        });
        let old: HashSet<InodeKey> = match replaced {
            Some(g) => g.paths.keys().copied().collect(),
            None if maps.scopes.get(&scope_id, 0).is_ok() => {
                return Err(GuardError::Unsupported(format!(
                    "mount namespace {scope_id} of pid {pid} already has a guard in BPF"
                )))
            }
            None => HashSet::new(),
        };
        let replaced = replaced.is_some();
        // While both are in the maps, the new keys come on top of the old.
        let needed = table.rules.keys().filter(|k| !old.contains(k)).count() as u32;
        let held =
            guards.values().filter(|g| g.retired.is_none()).count() as u32 - u32::from(replaced);
        let cap = maps.capacity;
        if maps.rule_count + needed > cap.rules || held >= cap.targets {
            // Full maps are a sizing fault the operator must see, not a partial guard: the
            // target goes to fanotify whole, and the failure is counted.
            self.metrics
                .placement_failures
                .with_label_values(&[BACKEND, "map"])
                .inc();
            return Err(GuardError::Unsupported(format!(
                "the BPF maps are full: {needed} rules with {} of {} used (--bpf-max-rules), \
                 {held} of {} targets held (--bpf-max-targets)",
                maps.rule_count, cap.rules, cap.targets
            )));
        }
        let guard_id = maps.next_guard;
        maps.next_guard += 1;
        let mut flags = 0;
        if guard.monitors_only() {
            flags |= SCOPE_MONITOR;
        }
        if guard.mode() != Some(Mode::Enforce) {
            flags |= SCOPE_WATCHED;
        }
        let placed = maps.shares.open().and_then(|share| {
            let scope = Scope {
                guard_id,
                owners,
                flags,
                slot: share.slot(),
            };
            match maps.place(&table.rules, root_key, scope_id, scope, &old) {
                Ok(()) => Ok(share),
                Err(e) => {
                    maps.shares.close(&share);
                    Err(e)
                }
            }
        });
        let share = match placed {
            Ok(share) => share,
            Err(e) => {
                self.metrics
                    .placement_failures
                    .with_label_values(&[BACKEND, "map"])
                    .inc();
                return Err(e);
            }
        };
        if replaced {
            if let Some(g) = replacing.and_then(|id| guards.get_mut(&id)) {
                g.retired = Some(now);
            }
        }
        guards.insert(
            guard_id,
            GuardEntry {
                counters: self
                    .metrics
                    .decision_counters(&guard.name, &guard.namespace, BACKEND),
                ctx,
                paths: table.paths,
                scope: scope_id,
                root: root_key,
                retired: None,
                share,
            },
        );
        Ok((guard_id, replaced))
    }

    /// Lifts a guard: the scope goes first, so the kernel stops deciding for it before its
    /// rules disappear.
    pub fn remove(&self, guard_id: u32) {
        let mut maps = self.maps.lock().expect("maps lock");
        let mut guards = self.guards.lock().expect("guards lock");
        // A guard replaced in place is retired already: its scope is its successor's.
        let Some(entry) = guards.get_mut(&guard_id).filter(|g| g.retired.is_none()) else {
            return;
        };
        entry.retired = Some(Instant::now());
        if let Err(e) = maps.scopes.remove(&entry.scope) {
            tracing::error!(guard = %entry.ctx.guard.name, error = %e, "removing a BPF scope");
        }
        // Another guard on the same root may have taken the entry over since.
        if maps
            .roots
            .get(&entry.root, 0)
            .is_ok_and(|s| s == entry.scope)
        {
            let _ = maps.roots.remove(&entry.root);
        }
        for key in entry.paths.keys() {
            if maps.rules.remove(key).is_ok() {
                maps.rule_count -= 1;
            }
        }
    }

    /// Detaches the programs and stops the reader once it has drained the ring.
    pub fn shutdown(&self) {
        drop(self.ebpf.lock().expect("ebpf lock").take());
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.lock().expect("reader lock").take() {
            let _ = r.join();
        }
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Records the reader takes from the ring before it tells the programs what it has read:
/// a flood that keeps the ring from emptying must not leave the shares unaccounted.
const READ_BATCH: usize = 1024;

/// How often at most the reader looks at every target's tally while records are dropped,
/// and how long after the last drop it looks once more (a tally's add may be seen after
/// the `DROPPED` that follows it).
const RECOUNT_EVERY: Duration = Duration::from_millis(100);

fn read_loop(
    mut ring: RingBuf<MapData>,
    dropped: PerCpuArray<MapData, u64>,
    (maps, guards): (&Mutex<Maps>, &Mutex<StdHashMap<u32, GuardEntry>>),
    stop: &AtomicBool,
    metrics: &Metrics,
    log: &LogSender,
) {
    let mut audit = None;
    let mut dropped_seen = 0u64;
    // When the tallies are to be read next, while drops are news; and `DROPPED` then.
    let mut recount: Option<Instant> = None;
    let mut recounted_at = 0u64;
    // Records read, by slot.
    let mut read = vec![0u64; maps.lock().expect("maps lock").shares.slots()];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        // SAFETY: the ring's descriptor lives as long as `ring`.
        let fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(200u16));
        for _ in 0..READ_BATCH {
            let Some(item) = ring.next() else {
                break;
            };
            if item.len() < std::mem::size_of::<Decision>() {
                metrics
                    .internal_errors
                    .with_label_values(&[BACKEND, "short_record"])
                    .inc();
                continue;
            }
            // SAFETY: Decision is plain data and the record is at least that long.
            let d: Decision = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            // Read, whatever it holds: it was charged to its slot.
            let Some(n) = read.get_mut(d.slot as usize) else {
                metrics
                    .internal_errors
                    .with_label_values(&[BACKEND, "corrupt_record"])
                    .inc();
                continue;
            };
            *n += 1;
            handle(&d, guards, metrics, log, &mut audit);
        }
        let total: u64 = dropped.get(&0, 0).map_or(0, |c| c.iter().sum());
        let now = Instant::now();
        if total > dropped_seen {
            metrics.bpf_events_dropped.inc_by(total - dropped_seen);
            dropped_seen = total;
            recount.get_or_insert(now);
        }
        let mut maps = maps.lock().expect("maps lock");
        let mut guards = guards.lock().expect("guards lock");
        maps.shares.tell(&read);
        if recount.is_some_and(|at| now >= at) {
            for g in guards.values_mut() {
                g.count_lost(&maps.shares);
            }
            // Again while drops come, and once more after the last; then not until the next.
            recount = (dropped_seen != recounted_at).then_some(now + RECOUNT_EVERY);
            recounted_at = dropped_seen;
        }
        drop((maps, guards));
        if stopping {
            return;
        }
        std::thread::sleep(Duration::from_millis(0));
    }
}

fn handle(
    d: &Decision,
    guards: &Mutex<StdHashMap<u32, GuardEntry>>,
    metrics: &Metrics,
    log: &LogSender,
    audit: &mut Option<audit::AuditLog>,
) {
    let guards = guards.lock().expect("guards lock");
    let Some(g) = guards.get(&d.guard_id) else {
        metrics
            .internal_errors
            .with_label_values(&[BACKEND, "unknown_guard"])
            .inc();
        return;
    };
    let Ok(event) = Event::try_from(d.event) else {
        metrics
            .internal_errors
            .with_label_values(&[BACKEND, "corrupt_record"])
            .inc();
        return;
    };
    let verdict = if d.verdict == VERDICT_DENY {
        Verdict::Deny
    } else {
        Verdict::Allow
    };
    let mode = if d.flags & DECISION_MONITOR != 0 {
        Mode::Monitor
    } else {
        Mode::Enforce
    };
    let path = decision_path(d, g.paths.get(&d.rule).map(Vec::as_slice));
    let name = via_path(d, &path);
    g.counters.inc(verdict, event, mode);
    if d.flags & DECISION_AUDIT != 0 {
        send_audit(
            audit,
            metrics,
            &g.ctx,
            d,
            (verdict, event, mode),
            &path,
            name.as_deref(),
        );
    }
    log.send(Entry {
        ctx: g.ctx.clone(),
        verdict,
        event,
        path,
        name,
        is_dir: d.flags & DECISION_IS_DIR != 0,
        subject: (d.flags & DECISION_TOO_DEEP == 0).then_some(usize::from(d.subject)),
        process: Process {
            pid: d.tgid as i32,
            ppid: (d.ppid != 0).then_some(d.ppid as i32),
            uid: Some(d.uid),
            gid: Some(d.gid),
            comm: Some(d.comm.iter().take_while(|b| **b != 0).copied().collect()),
            exe: None,
        },
        mode,
    });
}

fn send_audit(
    audit: &mut Option<audit::AuditLog>,
    metrics: &Metrics,
    ctx: &LogContext,
    d: &Decision,
    (verdict, event, mode): (Verdict, Event, Mode),
    path: &[u8],
    via: Option<&[u8]>,
) {
    if audit.is_none() {
        *audit = audit::AuditLog::open().ok();
    }
    let mut text = format!(
        "janus: response={} mode={} event={} guard={}/{} pod={} pid={} path=",
        verdict.as_lower(),
        mode,
        event.kernel_name(),
        ctx.guard.namespace,
        ctx.guard.name,
        ctx.pod,
        d.tgid
    )
    .into_bytes();
    // Hex like the kernel's own audit fields, so any byte is safe in the record.
    let hex = |bytes: &[u8]| -> Vec<u8> {
        bytes
            .iter()
            .flat_map(|b| format!("{b:02X}").into_bytes())
            .collect()
    };
    text.extend(hex(path));
    if let Some(via) = via {
        text.extend_from_slice(b" via=");
        text.extend(hex(via));
    }
    let sent = audit.as_mut().map(|a| a.send(&text));
    if !matches!(sent, Some(Ok(()))) {
        metrics
            .internal_errors
            .with_label_values(&[BACKEND, "audit"])
            .inc();
    }
}

/// Appends `/` and a name as the programs copy it (NUL-terminated), marked `…` where the
/// program found it longer than the field (bit `i` of `cut`).
fn push_walked(path: &mut Vec<u8>, n: &[u8; NAME_LEN], cut: u8, i: usize) {
    let len = n.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    if path.last() != Some(&b'/') {
        path.push(b'/');
    }
    path.extend_from_slice(&n[..len]);
    if cut & (1 << i) != 0 {
        path.extend_from_slice("…".as_bytes());
    }
}

/// The container path of the decided file: the deciding rule's path, then the names met
/// on the walk up below it.
fn decision_path(d: &Decision, rule_path: Option<&[u8]>) -> Vec<u8> {
    let depth = usize::from(d.depth);
    let mut path = match rule_path {
        Some(p) if d.flags & DECISION_TOO_DEEP == 0 => p.to_vec(),
        _ => b"/...".to_vec(),
    };
    if depth > MAX_NAMES || d.flags & DECISION_TOO_DEEP != 0 {
        path.extend_from_slice(b"/...");
    }
    for i in (0..depth.min(MAX_NAMES)).rev() {
        push_walked(&mut path, &d.names[i], d.names_cut, i);
    }
    path
}

/// The path the task used (`{via}`), where the kernel gave it and it is not `path`. A path
/// longer than the names kept starts with `/...`, and is taken as `path` when it reached the
/// root and is `path`'s ending; one that did not lead to the process's root starts with
/// `(detached)` and is always given.
fn via_path(d: &Decision, path: &[u8]) -> Option<Vec<u8>> {
    let n = usize::from(d.via_len).min(MAX_NAMES);
    if n == 0 {
        return None;
    }
    let mut via = Vec::new();
    for i in (0..n).rev() {
        push_walked(&mut via, &d.via[i], d.via_cut, i);
    }
    let (cut, detached) = (
        d.flags & DECISION_VIA_CUT != 0,
        d.flags & DECISION_VIA_DETACHED != 0,
    );
    if !detached && (via == path || cut && path.ends_with(&via)) {
        return None;
    }
    if cut {
        via.splice(0..0, b"/...".iter().copied());
    }
    if detached {
        via.splice(0..0, b"(detached)".iter().copied());
    }
    Some(via)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(depth: u8, names: &[&str]) -> Decision {
        let mut d: Decision = unsafe { std::mem::zeroed() };
        d.depth = depth;
        for (i, n) in names.iter().enumerate() {
            d.names[i][..n.len()].copy_from_slice(n.as_bytes());
        }
        d
    }

    #[test]
    fn paths_join_rule_and_walked_names() {
        let d = record(2, &["f", "sub", "data"]);
        assert_eq!(decision_path(&d, Some(b"/data")), b"/data/sub/f");
        assert_eq!(decision_path(&record(0, &["x"]), Some(b"/x")), b"/x");
        assert_eq!(decision_path(&record(1, &["a"]), Some(b"/")), b"/a");
    }

    fn with_via(mut d: Decision, via: &[&str], cut: bool) -> Decision {
        d.via_len = via.len() as u8;
        for (i, n) in via.iter().enumerate() {
            d.via[i][..n.len()].copy_from_slice(n.as_bytes());
        }
        if cut {
            d.flags |= DECISION_VIA_CUT;
        }
        d
    }

    #[test]
    fn the_name_used_is_given_where_it_differs() {
        let d = record(1, &["plain"]);
        let path = decision_path(&d, Some(b"/data/d1"));
        let same = with_via(d, &["plain", "d1", "data"], false);
        assert_eq!(via_path(&same, &path), None);
        let moved = with_via(d, &["plain", "moved", "data"], false);
        assert_eq!(
            via_path(&moved, &path).as_deref(),
            Some(&b"/data/moved/plain"[..])
        );
        // Cut short: the same ending is the same name, another is given with its cut.
        assert_eq!(via_path(&with_via(d, &["plain", "d1"], true), &path), None);
        assert_eq!(
            via_path(&with_via(d, &["plain", "m"], true), &path).as_deref(),
            Some(&b"/.../m/plain"[..])
        );
        // Not known (a hook without a mount).
        assert_eq!(via_path(&with_via(d, &[], false), &path), None);
        // Not leading to the root: always given, marked, even where it looks the same.
        let mut detached = with_via(d, &["plain", "d1", "data"], false);
        detached.flags |= DECISION_VIA_DETACHED;
        assert_eq!(
            via_path(&detached, &path).as_deref(),
            Some(&b"(detached)/data/d1/plain"[..])
        );
    }

    #[test]
    fn names_longer_than_the_field_are_marked_cut() {
        let long = "n".repeat(NAME_LEN - 1);
        let mut d = record(1, &[long.as_str()]);
        // 63 bytes fit: no mark.
        assert_eq!(
            decision_path(&d, Some(b"/data")),
            format!("/data/{long}").into_bytes()
        );
        d.names_cut = 1;
        assert_eq!(
            decision_path(&d, Some(b"/data")),
            format!("/data/{long}…").into_bytes()
        );
        // A link named by the long name and more is not taken for the guarded name, and
        // the guarded name itself is.
        let guarded = format!("/data/{long}").into_bytes();
        let same = with_via(record(0, &[]), &[long.as_str(), "data"], false);
        assert_eq!(via_path(&same, &guarded), None);
        let mut linked = same;
        linked.via_cut = 1;
        assert_eq!(
            via_path(&linked, &guarded),
            Some(format!("/data/{long}…").into_bytes())
        );
    }

    #[test]
    fn a_cut_path_that_did_not_reach_the_root_is_given() {
        let d = record(1, &["plain"]);
        let path = decision_path(&d, Some(b"/data/d1"));
        let mut v = with_via(d, &["plain", "d1"], true);
        v.flags |= DECISION_VIA_DETACHED;
        assert_eq!(
            via_path(&v, &path).as_deref(),
            Some(&b"(detached)/.../d1/plain"[..])
        );
    }

    #[test]
    fn backing_bit_follows_the_kernel_version() {
        assert_eq!(backing_fmode("6.1.0-28-cloud-amd64"), 1 << 29);
        assert_eq!(backing_fmode("6.12.9"), 1 << 25);
    }
}
