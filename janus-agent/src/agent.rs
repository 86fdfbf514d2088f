//! The agent's set of guarded targets, whatever drives it (the command line or the API),
//! and the choice of backend for each: BPF LSM where it runs and can express the guard,
//! fanotify otherwise.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use janus_api::GuardPolicy;

use crate::bpf::{self, BackendChoice, Enforcer};
use crate::decisions::{DecisionFormat, LogContext, LogSender};
use crate::fanotify::target::StartError;
use crate::fanotify::{self, Engine, TargetHandle};
use crate::metrics::Metrics;
use crate::pin::PinnedProcess;
use crate::resolve::{ResolveError, TargetRoot};
use crate::state::{Phase, TargetState};
use crate::target::TargetSpec;

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Fanotify(#[from] StartError),
    #[error(transparent)]
    Bpf(#[from] bpf::PlaceError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
}

/// How the agent enforces, for `guard` and `serve` alike.
#[derive(Debug, Clone, clap::Args)]
pub struct EnforceArgs {
    /// Enforcement backend: BPF LSM where the kernel allows it (auto), or one of them.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Threads answering the node's one fanotify group, each with a thread beside it that
    /// names, closes and logs what it answered. One reads the largest batches: more answer
    /// fewer events per system call (BENCHMARKS.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub answer_threads: u8,
    #[command(flatten)]
    pub bpf_capacity: bpf::Capacity,
    /// How each decision is written to stdout: the guard's `logFormat` (text), or one JSON
    /// object per decision with every field (json; docs/decisions.md).
    #[arg(long, value_enum, default_value_t = DecisionFormat::Text)]
    pub decision_format: DecisionFormat,
}

#[cfg(test)]
impl EnforceArgs {
    /// fanotify only, as the fanotify backend's own tests want it.
    pub fn fanotify() -> EnforceArgs {
        EnforceArgs {
            backend: BackendChoice::Fanotify,
            answer_threads: 1,
            bpf_capacity: bpf::Capacity::default(),
            decision_format: DecisionFormat::Text,
        }
    }
}

/// One guard on one process.
enum Target {
    Fanotify(TargetHandle),
    /// Decided in the kernel; what `/state` reports is fixed when it starts.
    Bpf {
        id: u32,
        state: Box<TargetState>,
        ctx: Arc<LogContext>,
    },
}

impl Target {
    fn ctx(&self) -> &Arc<LogContext> {
        match self {
            Target::Fanotify(handle) => handle.ctx(),
            Target::Bpf { ctx, .. } => ctx,
        }
    }

    fn state(&self) -> TargetState {
        let mut state = match self {
            Target::Fanotify(handle) => handle.state(),
            Target::Bpf { state, .. } => (**state).clone(),
        };
        let ctx = self.ctx();
        state.denials = ctx.denials.count();
        state.last_denial = ctx.denials.last().map(Into::into);
        state
    }
}

pub struct Agent {
    metrics: Arc<Metrics>,
    node: String,
    bpf: Option<Enforcer>,
    /// The fanotify backend, for every target BPF does not take.
    fanotify: Mutex<Option<Engine>>,
    /// By a key the caller chooses (`serve`: guard, pod, container; standalone: guard, pid).
    targets: Mutex<BTreeMap<String, Target>>,
}

impl Agent {
    /// Starts the backends `how` asks for and logs which one runs and why.
    pub fn new(
        metrics: Arc<Metrics>,
        log: LogSender,
        node: String,
        how: &EnforceArgs,
    ) -> anyhow::Result<Agent> {
        // First: where the kernel refuses permission events, say so in one line before
        // anything is loaded.
        let fanotify = Engine::start(metrics.clone(), log.clone(), how.answer_threads.into())?;
        let bpf = bpf::select(how.backend, how.bpf_capacity, &metrics, &log)?;
        Ok(Agent {
            metrics,
            node,
            bpf,
            fanotify: Mutex::new(Some(fanotify)),
            targets: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Starts enforcing `guard` on `pid` until [`Agent::shutdown`].
    pub fn guard(&self, guard: Arc<GuardPolicy>, pid: i32, pod: String) -> Result<(), PlaceError> {
        let at = TargetRoot::process(PinnedProcess::pin_pid(pid)?);
        self.add(&Agent::key(&guard, pid), guard, at, pod, String::new())
    }

    /// The key [`Agent::guard`] holds `guard` on `pid` under.
    pub fn key(guard: &GuardPolicy, pid: i32) -> String {
        format!("{}/{}/{pid}", guard.namespace, guard.name)
    }

    /// Starts enforcing `guard` on `pid` under `key`, replacing whatever the key held: the
    /// old target is lifted only once the new one is in place (a BPF target on the same
    /// mount namespace is swapped in place in the maps), so a re-applied or changed guard
    /// leaves no unguarded moment. On error the key keeps what it held.
    pub fn add(
        &self,
        key: &str,
        guard: Arc<GuardPolicy>,
        at: TargetRoot,
        pod: String,
        container: String,
    ) -> Result<(), PlaceError> {
        // A re-applied or changed guard keeps counting where the target it replaces was: the
        // controller reports the count, which must not go back.
        let (in_bpf, denials) = {
            let targets = self.targets.lock().expect("targets lock");
            let old = targets.get(key);
            let in_bpf = match old {
                Some(Target::Bpf { id, .. }) => Some(*id),
                _ => None,
            };
            (in_bpf, old.map(|t| t.ctx().denials.clone()))
        };
        let counters = (
            self.metrics
                .log_dropped
                .with_label_values(&[&guard.name, &guard.namespace]),
            self.metrics
                .denials
                .with_label_values(&[&guard.name, &guard.namespace, &pod]),
        );
        let mut ctx = LogContext::new(guard, pod, self.node.clone(), container, counters);
        if let Some(denials) = denials {
            ctx.denials = denials;
        }
        let (target, swapped) = self.start(Arc::new(ctx), at, in_bpf)?;
        let old = self
            .targets
            .lock()
            .expect("targets lock")
            .insert(key.to_owned(), target);
        match old {
            // Its map entries are the new target's now.
            Some(Target::Bpf { .. }) if swapped => {}
            Some(old) => self.stop(old),
            None => {}
        }
        Ok(())
    }

    /// The new target, and whether it took the BPF guard `replacing`'s place in the maps.
    fn start(
        &self,
        ctx: Arc<LogContext>,
        at: TargetRoot,
        replacing: Option<u32>,
    ) -> Result<(Target, bool), PlaceError> {
        let pid = at.pid();
        let guard = ctx.guard.clone();
        let mut spec = TargetSpec {
            ctx,
            root: at,
            warnings: Vec::new(),
        };
        if let Some(enforcer) = &self.bpf {
            match enforcer.place(&spec, replacing) {
                Ok((id, swapped)) => {
                    tracing::info!(guard = %guard.name, pid, backend = bpf::BACKEND, "guarding");
                    let target = Target::Bpf {
                        id,
                        state: Box::new(bpf_state(&guard, pid, spec.ctx.pod.clone())),
                        ctx: spec.ctx,
                    };
                    return Ok((target, swapped));
                }
                Err(e) => {
                    let Some(reason) = e.fallback() else {
                        return Err(e.into());
                    };
                    tracing::warn!(guard = %guard.name, pid, reason, error = %e, "guard not expressible in BPF; enforcing it with fanotify");
                    self.metrics
                        .bpf_fallbacks
                        .with_label_values(&[reason])
                        .inc();
                    self.metrics
                        .backend_info
                        .with_label_values(&[fanotify::target::BACKEND])
                        .set(1);
                    let why = format!("enforced by fanotify, not BPF ({reason}): {e}");
                    spec.warnings.push(why);
                }
            }
        }
        let handle = self
            .fanotify
            .lock()
            .expect("fanotify lock")
            .as_ref()
            .ok_or(StartError::Stopped)?
            .add(spec)?;
        tracing::info!(guard = %guard.name, pid, backend = fanotify::target::BACKEND, "guarding");
        Ok((Target::Fanotify(handle), false))
    }

    /// Lifts the guard held under `key`; false if there was none.
    pub fn remove(&self, key: &str) -> bool {
        let mut targets = self.targets.lock().expect("targets lock");
        let Some(target) = targets.remove(key) else {
            return false;
        };
        let ctx = target.ctx().clone();
        let (guard, namespace) = (&ctx.guard.name, &ctx.guard.namespace);
        // The guard's metric series go with its last target on this node, so the series
        // stay as many as the guards held, however many come and go.
        let others: Vec<&Arc<LogContext>> = targets
            .values()
            .map(Target::ctx)
            .filter(|c| &c.guard.name == guard && &c.guard.namespace == namespace)
            .collect();
        let (last_of_guard, last_of_pod) =
            (others.is_empty(), !others.iter().any(|c| c.pod == ctx.pod));
        drop(targets);
        self.stop(target);
        if last_of_guard {
            self.metrics.forget_guard(guard, namespace);
        }
        if last_of_pod {
            self.metrics.forget_pod(guard, namespace, &ctx.pod);
        }
        true
    }

    fn stop(&self, target: Target) {
        match target {
            Target::Fanotify(handle) => handle.stop(),
            Target::Bpf { id, .. } => {
                if let Some(enforcer) = &self.bpf {
                    enforcer.remove(id);
                }
            }
        }
    }

    /// The state of each target, by key.
    pub fn keyed_states(&self) -> BTreeMap<String, TargetState> {
        self.targets
            .lock()
            .expect("targets lock")
            .iter()
            .map(|(k, t)| (k.clone(), t.state()))
            .collect()
    }

    pub fn states(&self) -> Vec<TargetState> {
        self.keyed_states().into_values().collect()
    }

    /// Ready once every target enforces every guarded path that exists (or is gone).
    pub fn ready(&self) -> bool {
        self.states()
            .iter()
            .all(|s| matches!(s.phase, Phase::Enforcing | Phase::Exited))
    }

    /// The metrics, with `janus_targets` counted from the targets as they are now.
    pub fn render_metrics(&self) -> String {
        let states = self.states();
        for phase in Phase::ALL {
            let n = states.iter().filter(|s| s.phase == phase).count();
            self.metrics
                .targets
                .with_label_values(&[phase.as_str()])
                .set(n as i64);
        }
        self.metrics.render()
    }

    /// Lifts every guard, then detaches the BPF programs.
    pub fn shutdown(&self) {
        let targets = std::mem::take(&mut *self.targets.lock().expect("targets lock"));
        for t in targets.into_values() {
            self.stop(t);
        }
        if let Some(engine) = self.fanotify.lock().expect("fanotify lock").take() {
            engine.shutdown();
        }
        if let Some(enforcer) = &self.bpf {
            enforcer.shutdown();
        }
    }
}

fn bpf_state(guard: &GuardPolicy, pid: i32, pod: String) -> TargetState {
    let audit = guard.subjects.iter().any(|s| s.audit);
    TargetState::new(guard, (pid, pod), bpf::BACKEND, Phase::Enforcing, audit)
}
