//! The BPF LSM backend: the kernel decides guarded opens and reads itself (`janus-ebpf`),
//! and the agent fills its maps and logs the decisions it reports through a ring buffer.
//!
//! Which guards it cannot express, and so leaves to fanotify ([`PlaceError::fallback`]):
//! a guarded path that does not exist when the guard starts (the maps are keyed by inode),
//! a second guard on a mount namespace that already has one, and more rules, targets or
//! shares of the decision ring than the maps hold.

mod audit;
pub mod btf;
mod load;
mod maps;
mod probe;
mod ring;
pub mod rules;
mod share;

pub use maps::Capacity;
pub use probe::{kernel_offsets, lsm_active};

use std::collections::{HashMap as StdHashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use aya::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya::Ebpf;
use janus_api::{Event, Mode, RuleSet};
use janus_common::{
    InodeKey, Scope, EV_ACCESS, EV_EXEC, EV_LINK, EV_MODIFY, EV_OPEN, EV_RENAME, SCOPE_MONITOR,
    SCOPE_WATCHED,
};

use crate::decisions::{LogContext, LogSender};
use crate::metrics::{DecisionCounters, Metrics};
use crate::resolve::{self, ContainerRoot, FileId};
use crate::target::TargetSpec;
use maps::{linked_files, stat_key, Maps, RETIRED_FOR};
use probe::LSM_LIST;
use ring::read_loop;

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

pub const BACKEND: &str = "bpf";

/// Whether the build embedded the BPF object (`cargo xtask build-ebpf` had produced it).
pub const EMBEDDED: bool = cfg!(janus_bpf_embedded);

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
    #[error("kernel BTF: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("kernel BTF, as aya reads it: {0}")]
    AyaBtf(#[source] aya::BtfError),
    #[error("loading the BPF object: {}", load::chain(.0))]
    Object(#[source] aya::EbpfError),
    #[error("loading the BPF programs: {name}: {}", load::chain(.source))]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {name}: {}", load::chain(.source))]
    Attach {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("no {0} in the BPF object")]
    Missing(&'static str),
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("starting the decision reader: {0}")]
    Reader(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("pid {pid}: no mount namespace")]
    NoMountNamespace { pid: i32 },
    #[error("{source} (BPF keys rules by inode, so guarded paths must exist)")]
    PathMissing {
        #[source]
        source: resolve::ResolveError,
    },
    #[error("mount namespace {scope} of pid {pid} already has a guard in BPF")]
    ScopeTaken { scope: u32, pid: i32 },
    #[error(
        "the BPF maps are full: {needed} rules with {used} of {rules} used (--bpf-max-rules), \
         {held} of {targets} targets held (--bpf-max-targets)"
    )]
    MapsFull {
        needed: u32,
        used: u32,
        rules: u32,
        held: u32,
        targets: u32,
    },
    #[error(
        "all {slots} shares of the decision ring are taken (by targets held, and lifted in \
         the last {} s)",
        RETIRED_FOR.as_secs()
    )]
    SharesTaken { slots: usize },
    #[error(transparent)]
    Resolve(#[from] resolve::ResolveError),
    #[error("updating BPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// Every value of [`PlaceError::fallback`], for the metric's series.
pub const FALLBACK_REASONS: [&str; 5] = [
    "no_mount_namespace",
    "path_missing",
    "scope_taken",
    "maps_full",
    "shares_taken",
];

impl PlaceError {
    /// Why fanotify should enforce the guard instead (`janus_bpf_fallbacks_total` and the
    /// target's state say it): the guard is valid, but this backend cannot hold it. `None`
    /// for a failure of the target itself.
    pub fn fallback(&self) -> Option<&'static str> {
        match self {
            PlaceError::NoMountNamespace { .. } => Some("no_mount_namespace"),
            PlaceError::PathMissing { .. } => Some("path_missing"),
            PlaceError::ScopeTaken { .. } => Some("scope_taken"),
            PlaceError::MapsFull { .. } => Some("maps_full"),
            PlaceError::SharesTaken { .. } => Some("shares_taken"),
            PlaceError::Resolve(_) | PlaceError::Map { .. } => None,
        }
    }
}

/// What the ring reader needs to turn a decision record into a log line.
struct TargetEntry {
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
    /// Its share of the decision ring; handed to the guard that replaced it in place.
    share: Option<share::Share>,
}

impl TargetEntry {
    /// Counts the decisions whose record the kernel dropped since the last look.
    fn count_lost(&mut self, shares: &share::Shares) {
        let Some(share) = &mut self.share else {
            return;
        };
        for (verdict, event, mode, n) in shares.lost_since(share) {
            self.counters.inc_by(verdict, event, mode, n);
            self.ctx.lost(verdict, n);
        }
    }
}

/// The loaded, attached programs. Dropping it (or [`Enforcer::shutdown`]) detaches them.
pub struct Enforcer {
    ebpf: Mutex<Option<Ebpf>>,
    maps: Arc<Mutex<Maps>>,
    targets: Arc<Mutex<StdHashMap<u32, TargetEntry>>>,
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
        let mut ebpf = load::attach(capacity)?;
        let scopes = load::map(&mut ebpf, "SCOPES", HashMap::try_from)?;
        let roots = load::map(&mut ebpf, "ROOTS", HashMap::try_from)?;
        let rules = load::map(&mut ebpf, "RULES", HashMap::try_from)?;
        let ring = load::map(&mut ebpf, "DECISIONS", RingBuf::try_from)?;
        let dropped = load::map(&mut ebpf, "DROPPED", PerCpuArray::try_from)?;
        let tallies = load::map(&mut ebpf, "TALLIES", Array::try_from)?;
        let drained = load::map(&mut ebpf, "DRAINED", Array::try_from)?;

        let maps = Arc::new(Mutex::new(Maps {
            scopes,
            roots,
            rules,
            shares: share::Shares::new(tallies, drained),
            capacity,
            rule_count: 0,
            next_target: 1,
        }));
        let targets = Arc::new(Mutex::new(StdHashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (maps, targets) = (maps.clone(), targets.clone());
            let (stop, metrics) = (stop.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("bpf-decisions".into())
                .spawn(move || read_loop(ring, dropped, (&maps, &targets), &stop, &metrics, &log))
                .map_err(StartError::Reader)?
        };
        Ok(Enforcer {
            ebpf: Mutex::new(Some(ebpf)),
            maps,
            targets,
            metrics,
            stop,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// Enforces `guard` on the mount namespace of `pid` in the kernel; returns the id that
    /// [`Enforcer::remove`] takes, and whether it took the place of the guard `replacing`
    /// (the same target's, on the same mount namespace) in the maps, with no moment
    /// between the two; that guard is then retired and must not be removed.
    pub fn place(
        &self,
        spec: &TargetSpec,
        replacing: Option<u32>,
    ) -> Result<(u32, bool), PlaceError> {
        let (ctx, at) = (spec.ctx.clone(), &spec.root);
        let guard = ctx.guard.clone();
        let pid = at.pid();
        let root = ContainerRoot::open(at)?;
        let scope_id = u32::try_from(root.mnt_ns)
            .ok()
            .filter(|&n| n != 0)
            .ok_or(PlaceError::NoMountNamespace { pid })?;
        let mut table = rules::Table::default();
        let mut resolved = Vec::new();
        let mut dirs = Vec::new();
        for rule in RuleSet::from_policy(&guard).rules() {
            let (fd, canonical) = root.resolve(&rule.path).map_err(|e| match e {
                resolve::ResolveError::Path { ref error, .. }
                    if error.kind() == std::io::ErrorKind::NotFound =>
                {
                    PlaceError::PathMissing { source: e }
                }
                e => e.into(),
            })?;
            let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| {
                PlaceError::Resolve(resolve::ResolveError::Path {
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
        let mut targets = self.targets.lock().expect("targets lock");
        let now = Instant::now();
        targets.retain(|_, g| {
            if g.retired
                .is_none_or(|t| now.duration_since(t) < RETIRED_FOR)
            {
                return true;
            }
            g.count_lost(&maps.shares);
            // Kept while records charged to its slot may still be in the ring.
            g.share.as_ref().is_some_and(|s| !maps.shares.close(s))
        });
        // The guard replaced in place: the same target's, still on this mount namespace.
        let replaced = replacing.and_then(|id| {
            targets
                .get(&id)
                .filter(|g| g.scope == scope_id && g.retired.is_none())
        });
        let old: HashSet<InodeKey> = match replaced {
            Some(g) => g.paths.keys().copied().collect(),
            None if maps.scopes.get(&scope_id, 0).is_ok() => {
                return Err(PlaceError::ScopeTaken {
                    scope: scope_id,
                    pid,
                })
            }
            None => HashSet::new(),
        };
        let replaced = replaced.is_some();
        // While both are in the maps, the new keys come on top of the old.
        let needed = table.rules.keys().filter(|k| !old.contains(k)).count() as u32;
        let held =
            targets.values().filter(|g| g.retired.is_none()).count() as u32 - u32::from(replaced);
        let cap = maps.capacity;
        if maps.rule_count + needed > cap.rules || held >= cap.targets {
            // Full maps are a sizing fault the operator must see, not a partial guard: the
            // target goes to fanotify whole, and the failure is counted.
            self.metrics
                .placement_failures
                .with_label_values(&[BACKEND, "map"])
                .inc();
            return Err(PlaceError::MapsFull {
                needed,
                used: maps.rule_count,
                rules: cap.rules,
                held,
                targets: cap.targets,
            });
        }
        let target_id = maps.next_target;
        maps.next_target += 1;
        let mut flags = 0;
        if guard.monitors_only() {
            flags |= SCOPE_MONITOR;
        }
        if guard.mode() != Some(Mode::Enforce) {
            flags |= SCOPE_WATCHED;
        }
        // The replaced guard's share of the ring goes to its successor: the same target's
        // records, counted in one slot (and a re-apply takes no new one).
        let mut predecessor = replacing
            .filter(|_| replaced)
            .and_then(|id| targets.get_mut(&id));
        let share = match predecessor.as_mut().and_then(|g| g.share.take()) {
            Some(share) => share,
            None => maps.shares.open().inspect_err(|_| {
                self.metrics
                    .placement_failures
                    .with_label_values(&[BACKEND, "map"])
                    .inc();
            })?,
        };
        let scope = Scope {
            target_id,
            owners,
            flags,
            slot: share.slot(),
        };
        if let Err(e) = maps.place(&table.rules, root_key, scope_id, scope, &old) {
            match predecessor {
                Some(g) => g.share = Some(share),
                None => {
                    maps.shares.close(&share);
                }
            }
            self.metrics
                .placement_failures
                .with_label_values(&[BACKEND, "map"])
                .inc();
            return Err(e);
        }
        if let Some(g) = predecessor {
            g.retired = Some(now);
        }
        targets.insert(
            target_id,
            TargetEntry {
                counters: self
                    .metrics
                    .decision_counters(&guard.name, &guard.namespace, BACKEND),
                ctx,
                paths: table.paths,
                scope: scope_id,
                root: root_key,
                retired: None,
                share: Some(share),
            },
        );
        Ok((target_id, replaced))
    }

    /// Lifts a guard: the scope goes first, so the kernel stops deciding for it before its
    /// rules disappear.
    pub fn remove(&self, target_id: u32) {
        let mut maps = self.maps.lock().expect("maps lock");
        let mut targets = self.targets.lock().expect("targets lock");
        // A guard replaced in place is retired already: its scope is its successor's.
        let Some(entry) = targets.get_mut(&target_id).filter(|g| g.retired.is_none()) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fallback_reason_has_its_series() {
        let missing = resolve::ResolveError::Path {
            path: janus_api::GuardPath::parse("/secret").unwrap(),
            error: std::io::ErrorKind::NotFound.into(),
        };
        let fallbacks = [
            PlaceError::NoMountNamespace { pid: 1 },
            PlaceError::PathMissing { source: missing },
            PlaceError::ScopeTaken { scope: 1, pid: 1 },
            PlaceError::MapsFull {
                needed: 1,
                used: 1,
                rules: 1,
                held: 1,
                targets: 1,
            },
            PlaceError::SharesTaken { slots: 1 },
        ];
        let reasons: Vec<_> = fallbacks.iter().filter_map(PlaceError::fallback).collect();
        assert_eq!(reasons, FALLBACK_REASONS);
    }
}
