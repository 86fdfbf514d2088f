//! One guard on one process under fanotify: what the answering thread reads to decide
//! ([`TargetShared`], its [`View`]) and what the marker thread keeps to place and follow the
//! marks ([`Marker`]).

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, RwLock};

use janus_api::decide::{Decision, Rule};
use janus_api::{Event, GuardPath, GuardPolicy, RuleSet, Verdict};

use super::group::{perm_mask, FanotifyError};
use super::marks::{MarkTable, TargetId};
use super::tree::{Failure, Found, Walk};
use super::{FastMap, FastSet};
use crate::decisions::LogContext;
use crate::metrics::{DecisionCounters, Metrics};
use crate::pin::PinnedProcess;
use crate::resolve::{self, ContainerRoot, FileId, ResolveError};
use crate::state::{PathState, PathStatus, Phase, TargetState};
use crate::target::TargetSpec;

pub const BACKEND: &str = "fanotify";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Fanotify(#[from] FanotifyError),
    #[error("the fanotify engine has stopped")]
    Stopped,
}

/// What the answering thread decides with, changed in place by the marker thread.
#[derive(Default)]
pub struct View {
    /// The rules with `access` also deciding the open: for objects whose page faults raise
    /// no event.
    pub rules: RuleSet,
    /// The rules as written: for files whose reads and page faults raise pre-content
    /// events (`pre_content`), where `access` is decided where it happens.
    pub exact: RuleSet,
    pub pre_content: FastSet<FileId>,
    /// Every object marked for this target, with the guarded path it was marked under (more
    /// than one for a file with several names in guarded trees).
    pub objects: FastMap<FileId, Vec<GuardPath>>,
    /// Marked directories by the path they have now, as the container sees it: an entry
    /// made in one after it moved is decided under the directory's guarded path until its
    /// own mark is placed.
    pub dirs: HashMap<Vec<u8>, GuardPath>,
    /// Mount IDs of the target's mount namespace, sorted.
    pub mounts: Vec<u64>,
}

/// A decision and the guarded path it was made on.
pub struct Decided {
    pub decision: Decision,
    pub path: GuardPath,
}

impl View {
    /// Decides `event` on object `id`, reached by the container path `name` (None when it
    /// cannot be rendered there): by the guarded path the object was marked under, else by
    /// its directory's, else by the name itself. Of several guarded paths, a refusal wins,
    /// then a would-be refusal (monitor mode).
    pub fn decide(
        &self,
        id: FileId,
        name: Option<&[u8]>,
        event: Event,
        is_owner: bool,
    ) -> Option<Decided> {
        let rules = if self.pre_content.contains(&id) {
            &self.exact
        } else {
            &self.rules
        };
        let decide = |p: &GuardPath| {
            let decision = rules.decide(p.as_bytes(), event, is_owner)?;
            Some(Decided {
                decision,
                path: p.clone(),
            })
        };
        if let Some(paths) = self.objects.get(&id) {
            let mut best: Option<Decided> = None;
            for d in paths.iter().filter_map(decide) {
                if best
                    .as_ref()
                    .is_none_or(|b| d.decision.rank() > b.decision.rank())
                {
                    best = Some(d);
                }
            }
            return best;
        }
        let name = name?;
        let under_dir = name.iter().rposition(|b| *b == b'/').and_then(|slash| {
            let parent = if slash == 0 {
                &b"/"[..]
            } else {
                &name[..slash]
            };
            self.dirs.get(parent)?.join(&name[slash + 1..])
        });
        match under_dir {
            Some(p) => decide(&p),
            None => decide(&GuardPath::from_kernel(name.to_vec())?),
        }
    }
}

/// A target as the answering thread sees it.
pub struct TargetShared {
    pub id: TargetId,
    pub root: ContainerRoot,
    /// The target process and its parent: the owner `autoAllowOwner` lets through.
    pub owners: [i32; 2],
    pub ctx: Arc<LogContext>,
    pub counters: DecisionCounters,
    /// The answer for an event the agent could not decide: the strictest the guard can give.
    pub on_error: Verdict,
    pub view: RwLock<View>,
    pub state: Mutex<TargetState>,
}

impl TargetShared {
    pub fn new(
        id: TargetId,
        spec: TargetSpec,
        metrics: &Metrics,
        audit: bool,
    ) -> Result<TargetShared, StartError> {
        let pid = spec.root.pid();
        let root = ContainerRoot::open(&spec.root)?;
        let owners = spec.root.owners()?;
        let guard = spec.ctx.guard.clone();
        let mut warnings = unsupported_warnings(&guard);
        for w in &warnings {
            tracing::warn!(guard = %guard.name, namespace = %guard.namespace, pid, "{w}");
        }
        // Logged where they were decided.
        warnings.extend(spec.warnings);
        Ok(TargetShared {
            id,
            owners,
            counters: metrics.decision_counters(&guard.name, &guard.namespace, BACKEND),
            on_error: if guard.can_refuse() {
                Verdict::Deny
            } else {
                Verdict::Allow
            },
            state: Mutex::new(TargetState {
                warnings,
                ..TargetState::new(
                    &guard,
                    (pid, spec.ctx.pod.clone()),
                    BACKEND,
                    Phase::Pending,
                    audit,
                )
            }),
            ctx: spec.ctx,
            root,
            view: RwLock::new(View::default()),
        })
    }

    pub fn guard(&self) -> &GuardPolicy {
        &self.ctx.guard
    }
}

pub fn unsupported_warnings(guard: &GuardPolicy) -> Vec<String> {
    guard
        .subjects
        .iter()
        .enumerate()
        .filter(|(_, s)| s.events.contains(Event::Modify))
        .map(|(i, _)| {
            format!(
                "spec.subjects[{i}].events: event \"modify\" is not enforced by the fanotify \
                 backend (fanotify cannot tell a write-open from a read-open); it needs the BPF backend"
            )
        })
        .collect()
}

/// One guarded path of the target.
struct PathSlot {
    /// The rule as written, less what fanotify cannot enforce (`modify`).
    rule: Rule,
    /// Every canonical path it has resolved to: what they named stays guarded when a symlink
    /// starts pointing elsewhere.
    resolved: Vec<GuardPath>,
    /// The object at the path when it was last resolved.
    current: Option<FileId>,
    state: PathState,
}

/// What the marker thread keeps of a target.
pub struct Marker {
    pub shared: Arc<TargetShared>,
    slots: Vec<PathSlot>,
    /// Objects below guarded paths that could not be marked in the last walk.
    failures: Vec<String>,
    /// Marks as last counted in `janus_marks`.
    published: usize,
}

/// A rule as fanotify enforces it: `modify` not at all (it is warned about).
fn fanotify_rule(rule: &Rule) -> Rule {
    let mut r = rule.clone();
    r.events.remove(Event::Modify);
    r
}

/// The rule for objects whose page faults raise no event: `access` decides the open too. A
/// read through a mapping raises no FAN_ACCESS_PERM, so a file whose reads are refused must
/// not be opened.
fn at_the_open(rule: &Rule) -> Rule {
    let mut r = rule.clone();
    if r.events.contains(Event::Access) {
        r.events.insert(Event::Open);
    }
    r
}

impl Marker {
    pub fn new(shared: Arc<TargetShared>) -> Marker {
        let slots = RuleSet::from_policy(shared.guard())
            .rules()
            .iter()
            .map(|r| PathSlot {
                state: PathState {
                    subject: r.subject,
                    path: r.path.to_string(),
                    resolved: None,
                    verdict: r.verdict.as_lower(),
                    status: PathStatus::Missing("not resolved yet".into()),
                },
                rule: fanotify_rule(r),
                resolved: Vec::new(),
                current: None,
            })
            .collect();
        Marker {
            shared,
            slots,
            failures: Vec::new(),
            published: 0,
        }
    }

    pub fn id(&self) -> TargetId {
        self.shared.id
    }

    /// Resolves every guarded path, marks what is new, forgets what was removed and reads
    /// the target's mounts again. Returns whether the mounts changed.
    pub fn refresh(&mut self, table: &mut MarkTable, metrics: &Metrics) -> bool {
        self.prune(table);
        if !self.failures.is_empty() {
            // Something below a guarded path could not be marked: walk everything again.
            self.failures.clear();
            for slot in &mut self.slots {
                slot.current = None;
            }
        }
        let mut found = Vec::new();
        for i in 0..self.slots.len() {
            self.resolve(i, table, &mut found, metrics);
        }
        let mounts = mount_ids(self.shared.root.process(), self.shared.root.setting_up());
        let exact: Vec<Rule> = self
            .slots
            .iter()
            .flat_map(|s| {
                s.resolved.iter().map(|p| Rule {
                    path: p.clone(),
                    ..s.rule.clone()
                })
            })
            .collect();
        let rules = RuleSet::new(exact.iter().map(at_the_open).collect());
        let exact = RuleSet::new(exact);
        let changed = {
            let mut view = self.shared.view.write().expect("view lock");
            view.rules = rules;
            view.exact = exact;
            add_found(&mut view, found);
            let changed = view.mounts != mounts;
            view.mounts = mounts;
            changed
        };
        self.on_moved(table);
        self.publish(metrics);
        self.shared.state.lock().expect("state lock").passes += 1;
        changed
    }

    fn resolve(
        &mut self,
        i: usize,
        table: &mut MarkTable,
        found: &mut Vec<Found>,
        metrics: &Metrics,
    ) {
        let target = self.shared.id;
        let only_dir = self.shared.guard().subjects[self.slots[i].rule.subject].only_dir;
        let slot = &mut self.slots[i];
        match self.shared.root.resolve(&slot.rule.path) {
            Err(e) => {
                slot.current = None;
                slot.state.resolved = None;
                slot.state.status = match &e {
                    ResolveError::Path { error, .. }
                        if error.kind() == std::io::ErrorKind::NotFound =>
                    {
                        if slot.resolved.is_empty() {
                            PathStatus::Missing("does not exist".into())
                        } else {
                            PathStatus::Moved(
                                "nothing is at the path now; what it named is still guarded \
                                 wherever it went, and whatever appears at the path will be"
                                    .into(),
                            )
                        }
                    }
                    e => PathStatus::Failed(e.to_string()),
                };
            }
            Ok((fd, canonical)) => {
                let Ok(st) = resolve::statx(fd.as_fd()) else {
                    return;
                };
                let id = FileId::of(&st);
                let is_dir = resolve::is_dir(&st);
                slot.state.resolved = Some(canonical.to_string());
                if !slot.resolved.contains(&canonical) {
                    slot.resolved.push(canonical.clone());
                }
                if slot.current == Some(id) && table.mask_of(target, id).is_some() {
                    return;
                }
                slot.current = Some(id);
                // The open too, for the objects whose page faults raise no event.
                let mask = perm_mask(at_the_open(&slot.rule).events);
                slot.state.status = if only_dir && !is_dir {
                    PathStatus::Skipped("not a directory (onlyDir)".into())
                } else if mask.is_empty() {
                    PathStatus::Skipped(
                        "no event of this subject is enforceable by fanotify".into(),
                    )
                } else {
                    let held = self.shared.view.read().expect("view lock").objects.len();
                    let mut walk = Walk::new(table, target, mask, held);
                    let result = walk.run(fd, canonical);
                    found.append(&mut walk.found);
                    let failures = std::mem::take(&mut walk.failures);
                    let status = match (&result, failures.first()) {
                        (Ok(()), None) => PathStatus::Enforced,
                        (Ok(()), Some(first)) => PathStatus::Failed(format!(
                            "{} objects at or below it could not be marked or watched, e.g. {}: {}",
                            failures.len(),
                            first.what,
                            first.error
                        )),
                        (Err(e), _) => PathStatus::Failed(e.to_string()),
                    };
                    if let Err(e) = &result {
                        count_failure(metrics, e);
                    }
                    for f in &failures {
                        count_failure(metrics, &f.error);
                    }
                    status
                };
                if matches!(slot.state.status, PathStatus::Failed(_)) {
                    // Walked again on the next pass.
                    slot.current = None;
                }
            }
        }
    }

    /// Makes the next refresh walk every guarded path again (entries went unreported).
    pub fn rewalk(&mut self) {
        for slot in &mut self.slots {
            slot.current = None;
        }
    }

    /// Marks what appeared in a marked directory `dir` (watched as `wd`) for this target.
    pub fn on_entry(
        &mut self,
        table: &mut MarkTable,
        dir: FileId,
        name: &[u8],
        metrics: &Metrics,
    ) -> usize {
        let target = self.shared.id;
        let (Some(mask), Some(dir_fd)) = (table.mask_of(target, dir), table.fd(dir)) else {
            return 0;
        };
        let (parents, held): (Vec<GuardPath>, usize) = {
            let view = self.shared.view.read().expect("view lock");
            (
                view.objects.get(&dir).cloned().unwrap_or_default(),
                view.objects.len(),
            )
        };
        let Some(path) = parents.first().and_then(|p| p.join(name)) else {
            return 0;
        };
        let fd = match resolve::open_entry(dir_fd, name) {
            Ok(fd) => fd,
            // Gone already (removed, or moved on: a move into a marked directory is
            // reported there).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
            Err(e) => {
                let error = FanotifyError::Stat(e);
                count_failure(metrics, &error);
                self.failures.push(format!("{path}: {error}"));
                self.publish(metrics);
                return 0;
            }
        };
        let mut walk = Walk::new(table, target, mask, held);
        let result = walk.run(fd, path.clone());
        let dirs_made = walk.found.iter().filter(|f| f.is_dir).count();
        if let Err(error) = result {
            walk.failures.push(Failure {
                what: path.to_string(),
                error,
            });
        }
        for f in walk.failures.drain(..) {
            count_failure(metrics, &f.error);
            self.failures.push(format!("{}: {}", f.what, f.error));
        }
        let mut found = std::mem::take(&mut walk.found);
        let dirs = self.dir_paths(table, &found);
        // A directory with several guarded names (moved in from elsewhere in the guard)
        // passes every one of them on: deny wins among them.
        let first = parents[0].as_bytes();
        let more: Vec<Found> = parents[1..]
            .iter()
            .flat_map(|other| {
                found.iter().filter_map(move |f| {
                    let rest = f.path.as_bytes().strip_prefix(first)?;
                    let mut p = other.as_bytes().to_vec();
                    p.extend_from_slice(rest);
                    Some(Found {
                        path: GuardPath::from_kernel(p)?,
                        ..f.clone()
                    })
                })
            })
            .collect();
        found.extend(more);
        {
            let mut view = self.shared.view.write().expect("view lock");
            add_found(&mut view, found);
            view.dirs.extend(dirs);
        }
        self.publish(metrics);
        dirs_made
    }

    /// `name` was moved out of the marked directory `dir` to somewhere no marked directory
    /// is. An object that was marked keeps its guard wherever it went; one that was not yet
    /// (moved out within a moment of its creation) is not guarded where it went: said in
    /// the log, counted, and the target is failed until the next pass.
    pub fn on_left(&mut self, dir: FileId, name: &[u8], metrics: &Metrics) {
        let escaped = {
            let view = self.shared.view.read().expect("view lock");
            let Some(path) = view
                .objects
                .get(&dir)
                .and_then(|p| p.first())
                .and_then(|p| p.join(name))
            else {
                return;
            };
            let marked = view.objects.values().any(|names| names.contains(&path));
            (!marked).then_some(path)
        };
        let Some(path) = escaped else { return };
        let g = self.shared.guard();
        tracing::warn!(guard = %g.name, namespace = %g.namespace, pid = self.shared.root.pid(), %path, "an entry was moved out of the guarded tree before it could be marked: it is not guarded where it went");
        metrics
            .placement_failures
            .with_label_values(&[BACKEND, "escaped"])
            .inc();
        self.failures.push(format!(
            "{path}: moved out of the guarded tree before it could be marked"
        ));
        self.publish(metrics);
    }

    /// The current container paths of every marked directory, after one of them moved.
    pub fn on_moved(&mut self, table: &MarkTable) {
        let dirs: Vec<Found> = {
            let view = self.shared.view.read().expect("view lock");
            view.objects
                .iter()
                .filter(|(id, _)| table.is_dir(**id))
                .filter_map(|(id, paths)| {
                    Some(Found {
                        id: *id,
                        path: paths.first()?.clone(),
                        is_dir: true,
                        pre_content: false,
                    })
                })
                .collect()
        };
        let fresh = self.dir_paths(table, &dirs);
        self.shared.view.write().expect("view lock").dirs = fresh.into_iter().collect();
    }

    /// (current container path, guarded path) of the directories among `found`.
    fn dir_paths(&self, table: &MarkTable, found: &[Found]) -> Vec<(Vec<u8>, GuardPath)> {
        let root = &self.shared.root;
        found
            .iter()
            .filter(|f| f.is_dir)
            .filter_map(|f| {
                let rendered = resolve::fd_path(table.fd(f.id)?).ok()?;
                let range = root.to_container(&rendered)?;
                Some((rendered[range].to_vec(), f.path.clone()))
            })
            .collect()
    }

    /// Forgets the objects that were removed: their held descriptors pin them, so the
    /// kernel never drops their marks by itself, and a container that makes and removes
    /// files in a loop would otherwise run the agent out of descriptors.
    fn prune(&mut self, table: &mut MarkTable) {
        let ids: Vec<FileId> = {
            let view = self.shared.view.read().expect("view lock");
            view.objects.keys().copied().collect()
        };
        let gone: HashSet<FileId> = ids
            .into_iter()
            .filter(|id| {
                table
                    .fd(*id)
                    .is_none_or(|fd| resolve::statx(fd).is_ok_and(|st| st.stx_nlink == 0))
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        for id in &gone {
            table.release(self.shared.id, *id);
        }
        let mut view = self.shared.view.write().expect("view lock");
        view.objects.retain(|id, _| !gone.contains(id));
        view.pre_content.retain(|id| !gone.contains(id));
    }

    /// Takes every mark of the target off (it exited, or its guard was lifted).
    pub fn release(&mut self, table: &mut MarkTable, metrics: &Metrics) {
        let ids: Vec<FileId> = {
            let mut view = self.shared.view.write().expect("view lock");
            view.dirs.clear();
            view.pre_content.clear();
            view.objects.drain().map(|(id, _)| id).collect()
        };
        for id in ids {
            table.release(self.shared.id, id);
        }
        self.set_marks(0, metrics);
        self.shared.state.lock().expect("state lock").marks = 0;
    }

    fn set_marks(&mut self, now: usize, metrics: &Metrics) {
        let g = self.shared.guard();
        metrics
            .marks
            .with_label_values(&[&g.name, &g.namespace])
            .add(now as i64 - self.published as i64);
        self.published = now;
    }

    fn publish(&mut self, metrics: &Metrics) {
        let marks = self.shared.view.read().expect("view lock").objects.len();
        self.set_marks(marks, metrics);
        let mut failed: Vec<String> = self
            .slots
            .iter()
            .filter(|p| matches!(p.state.status, PathStatus::Failed(_)))
            .map(|p| p.state.path.clone())
            .collect();
        if !self.failures.is_empty() {
            failed.push(format!(
                "{} objects created later could not be marked, e.g. {}",
                self.failures.len(),
                self.failures[0]
            ));
        }
        let mut st = self.shared.state.lock().expect("state lock");
        if st.phase == Phase::Exited {
            return;
        }
        st.marks = marks;
        st.paths = self.slots.iter().map(|p| p.state.clone()).collect();
        // Every pass has placed what it could: enforcing, unless something that exists
        // could not be marked.
        (st.phase, st.reason) = if failed.is_empty() {
            (Phase::Enforcing, None)
        } else {
            let reason = format!("not enforced, retried every second: {}", failed.join(", "));
            (Phase::Failed, Some(reason))
        };
    }

    /// The process exited: its marks go, and the state says so.
    pub fn exited(&mut self, table: &mut MarkTable, metrics: &Metrics) {
        self.release(table, metrics);
        let mut st = self.shared.state.lock().expect("state lock");
        st.phase = Phase::Exited;
        st.reason = Some(format!(
            "process {} exited; its marks were removed",
            self.shared.root.pid()
        ));
        tracing::info!(pid = self.shared.root.pid(), guard = %self.shared.guard().name, "target exited; guard lifted");
    }
}

fn count_failure(metrics: &Metrics, e: &FanotifyError) {
    metrics
        .placement_failures
        .with_label_values(&[BACKEND, e.kind()])
        .inc();
}

/// The most guarded paths kept for one object: renaming a directory back and forth must not
/// grow the agent. The first ones are the names the guard placed it under.
const MAX_NAMES_PER_OBJECT: usize = 8;

fn add_found(view: &mut View, found: Vec<Found>) {
    for f in found {
        if f.pre_content {
            view.pre_content.insert(f.id);
        } else {
            view.pre_content.remove(&f.id);
        }
        let paths = view.objects.entry(f.id).or_default();
        if !paths.contains(&f.path) && paths.len() < MAX_NAMES_PER_OBJECT {
            paths.push(f.path);
        }
    }
}

/// Mount IDs in the target's mount namespace, sorted, from its mountinfo; only those
/// mounted at or below `under` when given. Read by the marker thread, off the answering
/// thread, because reading a file there could wait on a mark.
fn mount_ids(process: &PinnedProcess, under: Option<&[u8]>) -> Vec<u64> {
    let text = process.read("mountinfo").unwrap_or_default();
    let below = |point: &[u8]| {
        under.is_none_or(|u| {
            point
                .strip_prefix(u)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
        })
    };
    let mut ids: Vec<u64> = text
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let mut fields = line.split(|b| *b == b' ');
            let id = fields.next()?;
            below(fields.nth(3)?).then_some(id)
        })
        .filter_map(|id| std::str::from_utf8(id).ok()?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use janus_api::{EventSet, Mode};

    fn view(rules: &[(&str, Verdict)]) -> View {
        View {
            rules: RuleSet::new(
                rules
                    .iter()
                    .map(|(p, v)| Rule {
                        path: GuardPath::parse(p).unwrap(),
                        verdict: *v,
                        subject: 0,
                        events: EventSet::ALL_KEYWORD,
                        auto_allow_owner: false,
                        mode: Mode::Enforce,
                    })
                    .collect(),
            ),
            ..View::default()
        }
    }

    /// A deny rule on /data/t4 for just these events.
    fn deny_t4(events: &[Event]) -> Rule {
        let mut e = EventSet::EMPTY;
        for ev in events {
            e.insert(*ev);
        }
        Rule {
            path: GuardPath::parse("/data/t4").unwrap(),
            verdict: Verdict::Deny,
            subject: 0,
            events: e,
            auto_allow_owner: false,
            mode: Mode::Enforce,
        }
    }

    const OBJ: FileId = FileId { dev: 1, ino: 42 };
    const NEW: FileId = FileId { dev: 1, ino: 43 };

    #[test]
    fn an_object_is_decided_by_the_path_it_was_guarded_under() {
        let mut v = view(&[("/data/d1", Verdict::Deny)]);
        v.objects
            .insert(OBJ, vec![GuardPath::parse("/data/d1/plain").unwrap()]);
        // Renamed and moved: the current name is unguarded, the object is not.
        let d = v
            .decide(OBJ, Some(b"/data/moved/plain"), Event::Open, false)
            .unwrap();
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert_eq!(d.path.as_bytes(), b"/data/d1/plain");
        // An object the guard never named is decided by its name.
        assert!(v.decide(NEW, Some(b"/tmp/x"), Event::Open, false).is_none());
        let d = v.decide(NEW, Some(b"/data/d1/new"), Event::Open, false);
        assert_eq!(d.unwrap().decision.verdict, Verdict::Deny);
    }

    #[test]
    fn a_new_entry_of_a_moved_directory_is_decided_under_its_guarded_path() {
        let mut v = view(&[("/data/d1", Verdict::Deny)]);
        v.dirs.insert(
            b"/data/moved".to_vec(),
            GuardPath::parse("/data/d1").unwrap(),
        );
        let d = v
            .decide(NEW, Some(b"/data/moved/fresh"), Event::Open, false)
            .unwrap();
        assert_eq!(d.path.as_bytes(), b"/data/d1/fresh");
        assert_eq!(d.decision.verdict, Verdict::Deny);
    }

    #[test]
    fn of_several_guarded_names_a_deny_wins() {
        let mut v = view(&[("/data", Verdict::Deny), ("/data/public", Verdict::Allow)]);
        v.objects.insert(
            OBJ,
            vec![
                GuardPath::parse("/data/public/x").unwrap(),
                GuardPath::parse("/data/secret-x").unwrap(),
            ],
        );
        let d = v.decide(OBJ, None, Event::Open, false).unwrap();
        assert_eq!(d.decision.verdict, Verdict::Deny);
        assert_eq!(d.path.as_bytes(), b"/data/secret-x");
    }

    #[test]
    fn an_access_rule_decides_the_open_unless_page_faults_raise_events() {
        let rule = deny_t4(&[Event::Access]);
        let mut v = View {
            rules: RuleSet::new(vec![at_the_open(&rule)]),
            exact: RuleSet::new(vec![rule]),
            ..View::default()
        };
        let file = GuardPath::parse("/data/t4/mm").unwrap();
        v.objects.insert(OBJ, vec![file.clone()]);
        v.objects.insert(NEW, vec![file]);
        v.pre_content.insert(NEW);
        // Its mapping's page faults would go unseen: refused at the open.
        let d = v.decide(OBJ, None, Event::Open, false).unwrap();
        assert_eq!(d.decision.verdict, Verdict::Deny);
        // Pre-content events see them: opened, its reads refused.
        assert!(v.decide(NEW, None, Event::Open, false).is_none());
        let d = v.decide(NEW, None, Event::Access, false).unwrap();
        assert_eq!(d.decision.verdict, Verdict::Deny);
    }

    #[test]
    fn under_fanotify_an_access_rule_also_decides_the_open() {
        let rule = deny_t4(&[Event::Access, Event::Modify]);
        let r = at_the_open(&fanotify_rule(&rule));
        assert!(r.events.contains(Event::Open) && r.events.contains(Event::Access));
        assert!(!r.events.contains(Event::Modify));
    }
}
