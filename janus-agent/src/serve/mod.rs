//! `janus-agent serve`: the node agent's gRPC API (`janus.agent.v1`), through which the
//! controller keeps this node holding exactly the guards for the pods running on it.
//!
//! A guard is held per (guard, pod); each of the pod's containers is found on this node by
//! its cgroup ([`crate::pods`]) and its init process guarded. A rescan every
//! `--rescan-interval-ms` re-guards a container that restarted (new init, same pod) and lifts
//! the guards of a pod that has had no process here for `--pod-gone-after-secs`, so the node
//! converges even while the controller is away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use janus_api::agent_v1::agent_server::{Agent as AgentApi, AgentServer};
use janus_api::agent_v1::{
    apply_result, ApplyGuardRequest, ApplyGuardResponse, ApplyGuardsRequest, ApplyGuardsResponse,
    ApplyResult, ContainerPhase, ContainerStatus, GuardKey, GuardStatus, ItemError,
    ListGuardsRequest, ListGuardsResponse, RemoveGuardRequest, RemoveGuardResponse,
    RemoveGuardsRequest, RemoveGuardsResponse, SetPodsRequest, SetPodsResponse,
};
use janus_api::holding::{self, Holding, HoldingKey, RequestError};
use janus_api::{GuardPolicy, JanusGuardSpec, ValidationErrors};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

pub mod gate;

use crate::agent::Agent;
use crate::fanotify::target::{unsupported_warnings, BACKEND};
use crate::pin::PinnedProcess;
use crate::pods::{self, ContainerId, ContainerIdError, Runtime};
use crate::state::{Phase, TargetState};
use crate::{decisions, http, metrics::Metrics, tls};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Where the gRPC API listens.
    #[arg(long, default_value = "0.0.0.0:9700")]
    pub listen: SocketAddr,
    /// This node's name, as {node} prints and ListGuards reports it; the host name by default.
    #[arg(long)]
    pub node: Option<String>,
    /// Serve /metrics, /healthz, /readyz and /state here.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// How often containers are looked up again (restarts, pods gone).
    #[arg(long, default_value_t = 1000)]
    pub rescan_interval_ms: u64,
    /// Lift a pod's guards once none of its processes has been seen for this long.
    #[arg(long, default_value_t = 30)]
    pub pod_gone_after_secs: u64,
    /// Where the node's cgroup file system is mounted: a pod's new container is guarded as
    /// soon as the runtime makes its cgroup here.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: std::path::PathBuf,
    /// The runtime of this node's containers, for a pod pushed before any of its containers
    /// has an ID (the kubelet's cgroupfs layout names a container by its bare ID).
    #[arg(long, value_enum, default_value = "containerd")]
    pub container_runtime: Runtime,
    #[command(flatten)]
    pub gate: gate::GateArgs,
    #[command(flatten)]
    pub nri: crate::nri::NriArgs,
    #[command(flatten)]
    pub enforce: crate::agent::EnforceArgs,
    #[command(flatten)]
    pub tls: tls::TlsArgs,
}

type Key = HoldingKey;

/// The most (guard, pod) holdings one agent takes: each costs marks or map entries, and
/// metric series per guard.
pub const MAX_HOLDINGS: usize = 8192;

/// Why an apply was refused; nothing is held for it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("pod.container_ids: {0}")]
    ContainerId(#[from] ContainerIdError),
    #[error("spec_json: {0}")]
    SpecJson(#[source] serde_json::Error),
    #[error("spec: {}", .0.0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
    Policy(ValidationErrors),
    #[error("pod.container_ids: {container} runs in cgroup {cgroup}, which is not below pod {pod}'s cgroup; nothing guarded")]
    NotInPod {
        container: ContainerId,
        cgroup: String,
        pod: String,
    },
    #[error("this agent holds {MAX_HOLDINGS} guards already (one per guard and pod)")]
    Full,
}

struct HeldContainer {
    /// As the controller sent it.
    raw: String,
    id: ContainerId,
    /// The init process guarded, once found: pinned while it runs in the container,
    /// whichever process a later scan would take for the init.
    init: Option<Arc<PinnedProcess>>,
    /// Why guarding the current init failed; retried when the init changes.
    failure: Option<String>,
    /// Found in the pod's cgroup by the agent, not yet listed by the controller.
    adopted: bool,
    /// Its init was found still in its runtime's root ([`pods::rooted`]).
    settling: bool,
    /// What the start gate named: the runtime's init, before it entered the container's
    /// root, and that root. Guarded on that process while it runs, whoever else a scan
    /// finds, under a changed spec too.
    gated: Option<gate::Gated>,
    /// The init a replaced spec guarded: guarded again under this one while it runs, not
    /// chosen afresh.
    kept: Option<Arc<PinnedProcess>>,
}

impl HeldContainer {
    /// The init guarded, as a process's identity.
    fn init_process(&self) -> Option<pods::Process> {
        self.init.as_ref().map(|p| p.process())
    }

    /// Not guarded yet.
    fn new(raw: String, id: ContainerId, adopted: bool) -> HeldContainer {
        HeldContainer {
            raw,
            id,
            init: None,
            failure: None,
            adopted,
            settling: false,
            gated: None,
            kept: None,
        }
    }
}

struct Held {
    guard_uid: String,
    generation: i64,
    pod_name: String,
    spec_digest: String,
    policy: Arc<GuardPolicy>,
    warnings: Vec<String>,
    containers: Vec<HeldContainer>,
    /// When a process of the pod was last seen on this node (None: never yet).
    last_seen: Option<Instant>,
}

impl Held {
    fn holding(&self) -> Holding<'_> {
        Holding {
            guard_uid: &self.guard_uid,
            spec_digest: &self.spec_digest,
            // As the controller compares: what it asked for, not what the agent adopted.
            containers: self
                .containers
                .iter()
                .filter(|c| !c.adopted)
                .map(|c| c.raw.as_str())
                .collect(),
        }
    }

    /// Whether this is the guard the request names with the same spec: a guard created again
    /// under its name (another UID) is not, whatever its spec.
    fn same_spec(&self, req: &Holding<'_>) -> bool {
        self.guard_uid == req.guard_uid && self.spec_digest == req.spec_digest
    }
}

/// Every guard this node holds, and the agent that enforces them.
pub struct Guards {
    agent: Arc<Agent>,
    node: String,
    gone_after: Duration,
    runtime: Runtime,
    held: Mutex<BTreeMap<Key, Held>>,
    /// What the controller said of this node's pods; `changed` wakes the start gates
    /// waiting on it or on `held`.
    word: Mutex<gate::Word>,
    changed: Condvar,
    gate: gate::Gate,
}

fn target_key(k: &Key, container: &str) -> String {
    format!("{k}/{container}")
}

impl Guards {
    pub fn new(
        agent: Arc<Agent>,
        node: String,
        gone_after: Duration,
        runtime: Runtime,
        gate: &gate::GateArgs,
    ) -> Guards {
        Guards {
            agent,
            node,
            gone_after,
            runtime,
            held: Mutex::new(BTreeMap::new()),
            word: Mutex::new(gate::Word::default()),
            changed: Condvar::new(),
            gate: gate.into(),
        }
    }

    /// Creates or replaces the guard; a repeated identical request changes nothing. A spec
    /// that differs from the one held replaces it whatever the generations say.
    pub fn apply(&self, req: ApplyGuardRequest) -> Result<GuardStatus, ApplyError> {
        self.apply_in(req, &pods::Procs::default())
    }

    /// [`Guards::apply`] with a reading of /proc that a batch shares.
    pub fn apply_in(
        &self,
        mut req: ApplyGuardRequest,
        procs: &pods::Procs,
    ) -> Result<GuardStatus, ApplyError> {
        holding::validate(&mut req)?;
        let (Some(guard), Some(pod)) = (req.guard.clone(), req.pod.clone()) else {
            unreachable!("validate checked guard and pod");
        };
        let key = HoldingKey {
            guard_namespace: guard.namespace.clone(),
            guard_name: guard.name.clone(),
            pod_uid: pod.uid.clone(),
        };
        let containers = pod
            .container_ids
            .iter()
            .map(|raw| {
                Ok(HeldContainer::new(
                    raw.clone(),
                    raw.parse::<ContainerId>()?,
                    false,
                ))
            })
            .collect::<Result<Vec<_>, ApplyError>>()?;
        let asked = Holding::of_request(&req);
        let mut held = self.held.lock().expect("guards lock");
        if let Some(h) = held.get(&key) {
            if h.holding() == asked {
                return Ok(self.status(&key, h));
            }
        } else if held.len() >= MAX_HOLDINGS {
            return Err(ApplyError::Full);
        }
        let spec: JanusGuardSpec =
            serde_json::from_str(&req.spec_json).map_err(ApplyError::SpecJson)?;
        let policy = GuardPolicy::from_spec(&guard.name, &guard.namespace, &spec)
            .map_err(ApplyError::Policy)?;
        let ids: Vec<ContainerId> = containers.iter().map(|c| c.id.clone()).collect();
        if let Some((container, cgroup)) = procs.misplaced(&pod.uid, &ids) {
            return Err(ApplyError::NotInPod {
                container,
                cgroup,
                pod: pod.uid,
            });
        }
        let mut containers = containers;
        // Under a changed spec, each container's new target takes its old one's place
        // (`Agent::add`: placed before the old is lifted); the old targets of containers
        // not guarded again are lifted after.
        let mut replaced = Vec::new();
        if let Some(old) = held.remove(&key) {
            let same = old.same_spec(&asked);
            for o in old.containers {
                match containers.iter().position(|c| c.raw == o.raw) {
                    // Only the containers changed: one that stays keeps its target.
                    Some(i) if same => {
                        containers[i] = HeldContainer {
                            adopted: false,
                            ..o
                        };
                    }
                    // Running, and not listed yet by a controller that has not seen it:
                    // kept, and guarded again under a changed spec.
                    None if o.adopted => {
                        if same {
                            containers.push(o);
                        } else {
                            containers.push(HeldContainer {
                                gated: o.gated.clone(),
                                kept: o.init.clone(),
                                ..HeldContainer::new(o.raw.clone(), o.id.clone(), true)
                            });
                            replaced.push(o);
                        }
                    }
                    _ if same => {
                        if o.init.is_some() {
                            self.agent.remove(&target_key(&key, &o.raw));
                        }
                    }
                    Some(i) => {
                        containers[i].gated = o.gated.clone();
                        containers[i].kept = o.init.clone();
                        replaced.push(o);
                    }
                    None => replaced.push(o),
                }
            }
        }
        let mut h = Held {
            guard_uid: guard.uid,
            generation: guard.generation,
            pod_name: pod.name,
            spec_digest: req.spec_digest.clone(),
            warnings: unsupported_warnings(&policy),
            policy: Arc::new(policy),
            containers,
            last_seen: None,
        };
        let scan = procs.scan(&[pod_of(&key, &h, self.runtime)]);
        self.sync(&key, &mut h, &scan, Instant::now());
        for o in replaced.iter().filter(|o| o.init.is_some()) {
            let again = h
                .containers
                .iter()
                .any(|c| c.raw == o.raw && c.init_process() == o.init_process());
            if !again {
                self.agent.remove(&target_key(&key, &o.raw));
            }
        }
        tracing::info!(guard = %key.guard_name, namespace = %key.guard_namespace, pod = %h.pod_name, generation = h.generation, digest = %h.spec_digest, "guard applied");
        let status = self.status(&key, &h);
        held.insert(key, h);
        self.count(&held);
        drop(held);
        self.notify_gates();
        Ok(status)
    }

    /// Lifts the guard; false when it was not held.
    pub fn remove(&self, key: &GuardKey) -> bool {
        self.remove_if(key, "")
    }

    /// Lifts the guard if the one held carries `guard_uid` (any, when empty): a guard
    /// created again under its name is not lifted by a removal meant for the old one.
    pub fn remove_if(&self, key: &GuardKey, guard_uid: &str) -> bool {
        let key = HoldingKey::from(key);
        let mut held = self.held.lock().expect("guards lock");
        let theirs = held
            .get(&key)
            .is_some_and(|h| guard_uid.is_empty() || h.guard_uid == guard_uid);
        let removed = if theirs { held.remove(&key) } else { None };
        if let Some(h) = &removed {
            self.lift(&key, h);
            tracing::info!(guard = %key.guard_name, namespace = %key.guard_namespace, pod = %h.pod_name, "guard removed");
        }
        self.count(&held);
        removed.is_some()
    }

    /// Guards pod `uid`'s containers that the runtime is still setting up as soon as their
    /// init is in its own root: scans again, backing off, while `ready` (given the time left)
    /// says it may be and one still is, until [`SETTLE_WITHIN`]. On a thread of its own.
    fn settle(self: &Arc<Guards>, uid: String, ready: impl Fn(Duration) -> bool + Send + 'static) {
        let guards = self.clone();
        let settle = move || {
            let deadline = Instant::now() + SETTLE_WITHIN;
            let mut pause = Duration::from_millis(1);
            while ready(deadline.saturating_duration_since(Instant::now())) {
                guards.rescan();
                if !guards.settling(&uid) || Instant::now() >= deadline {
                    return;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(128));
            }
        };
        let started = std::thread::Builder::new()
            .name("cgroup-settle".into())
            .spawn(settle);
        if let Err(e) = started {
            tracing::warn!(error = %e, "no thread to wait for a new container: looking at once");
            self.rescan();
        }
    }

    /// A guard that arrives while a container of its pod is being set up (pushed late)
    /// does not wait for the rescan: the container is guarded as soon as it can be.
    fn settle_if_needed(self: &Arc<Guards>, statuses: &[GuardStatus]) {
        for key in statuses.iter().filter_map(|s| s.key.as_ref()) {
            if self.settling(&key.pod_uid) {
                self.settle(key.pod_uid.clone(), |_| true);
            }
        }
    }

    /// Whether a container of pod `uid` was last seen being set up by its runtime.
    fn settling(&self, uid: &str) -> bool {
        let held = self.held.lock().expect("guards lock");
        held.iter()
            .filter(|(k, _)| k.pod_uid == uid)
            .any(|(_, h)| h.containers.iter().any(|c| c.settling))
    }

    /// Whether a guard is held for pod `uid`.
    pub fn holds_pod(&self, uid: &str) -> bool {
        let held = self.held.lock().expect("guards lock");
        held.keys().any(|k| k.pod_uid == uid)
    }

    pub fn list(&self) -> Vec<GuardStatus> {
        let held = self.held.lock().expect("guards lock");
        held.iter().map(|(k, h)| self.status(k, h)).collect()
    }

    /// One pass over /proc for every held container: guards new inits, releases exited
    /// ones and lifts the guards of pods gone from this node.
    pub fn rescan(&self) {
        let mut held = self.held.lock().expect("guards lock");
        let all: Vec<(String, Runtime)> = held
            .iter()
            .map(|(k, h)| pod_of(k, h, self.runtime))
            .collect();
        if all.is_empty() {
            return;
        }
        let scan = pods::Procs::default().scan(&all);
        let now = Instant::now();
        let mut gone = Vec::new();
        for (k, h) in held.iter_mut() {
            self.sync(k, h, &scan, now);
            if h.last_seen.is_some_and(|t| now - t > self.gone_after) {
                gone.push(k.clone());
            }
        }
        for k in gone {
            if let Some(h) = held.remove(&k) {
                self.lift(&k, &h);
                tracing::info!(guard = %k.guard_name, namespace = %k.guard_namespace, pod = %h.pod_name, "pod gone from this node; guard lifted");
            }
        }
        self.count(&held);
    }

    fn sync(&self, k: &Key, h: &mut Held, scan: &pods::Scan, now: Instant) {
        if scan.incomplete {
            // A process it missed may be an init: nothing is chosen, kept or lifted on it,
            // and the pod is not taken for gone.
            h.last_seen = Some(now);
            tracing::error!(guard = %k.guard_name, namespace = %k.guard_namespace, pod = %h.pod_name, "/proc could not be read whole (out of descriptors): the pod's containers are left as they were");
            self.agent.metrics().scans_incomplete.inc();
            return;
        }
        if scan.pods_present.contains(&k.pod_uid) {
            h.last_seen = Some(now);
        }
        let none = BTreeSet::new();
        let found = scan.containers.get(&k.pod_uid).unwrap_or(&none);
        // Every container in the pod's cgroup is the pod's: one the controller has not
        // listed (its sandbox, one that started before the kubelet reported it, a restart
        // under a new ID, an ephemeral one) is guarded at once.
        for id in found {
            if !h.containers.iter().any(|c| c.id == *id) {
                tracing::info!(guard = %k.guard_name, namespace = %k.guard_namespace, pod = %h.pod_name, container = %id, "a container of the pod not listed by the controller: guarding it");
                h.containers
                    .push(HeldContainer::new(id.to_string(), id.clone(), true));
            }
        }
        for c in &mut h.containers {
            let tkey = target_key(k, &c.raw);
            // Being set up by the runtime: guarded once its init is in its own root.
            c.settling = !scan.inits.contains_key(&c.id) && found.contains(&c.id);
            // The init guarded, or the runtime's init the start gate named, stays the
            // container's while it runs: a process that comes later (an exec's bootstrap,
            // one with a PID namespace of its own) never takes its place. A reading made
            // before the gate pinned it misses it: asked directly.
            let pinned = c
                .init
                .clone()
                .or_else(|| c.kept.take())
                .or_else(|| c.gated.as_ref().map(|g| g.process.clone()));
            let running = pinned.filter(|p| {
                let id = p.process();
                p.runs()
                    && (scan.runs(&c.id, id)
                        || pods::member(id.pid, &c.id, &k.pod_uid).map(|m| m.process) == Some(id))
            });
            let next = match running {
                Some(p) => {
                    c.settling = false;
                    // Guarded; or the gate's, lost to a changed spec or failed: again.
                    let same = c.init.as_ref().is_some_and(|i| Arc::ptr_eq(i, &p));
                    if same && (c.failure.is_none() || c.gated.is_none()) {
                        continue;
                    }
                    Some(Ok(p))
                }
                None => {
                    c.gated = None;
                    // Pinned as this reading found it: an init that ended since is refused,
                    // whoever has its PID now.
                    scan.init(&c.id).map(|m| m.pin().map(Arc::new))
                }
            };
            match next {
                Some(Ok(init)) => {
                    let pid = init.pid();
                    c.init = Some(init.clone());
                    let at = gate::root_of(c.gated.as_ref(), init);
                    c.failure = match self.agent.add(
                        &tkey,
                        h.policy.clone(),
                        at,
                        h.pod_name.clone(),
                        c.raw.clone(),
                    ) {
                        Ok(()) => {
                            tracing::info!(guard = %k.guard_name, namespace = %k.guard_namespace, pod = %h.pod_name, container = %c.raw, pid, "guarding container");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(guard = %k.guard_name, namespace = %k.guard_namespace, container = %c.raw, pid, error = %e, "cannot guard container");
                            Some(e.to_string())
                        }
                    };
                }
                Some(Err(e)) => {
                    let failure = Some(e.to_string());
                    if c.failure != failure {
                        tracing::warn!(guard = %k.guard_name, namespace = %k.guard_namespace, container = %c.raw, error = %e, "cannot pin the container's init");
                    }
                    self.agent.metrics().pin_failures.inc();
                    if c.init.take().is_some() {
                        self.agent.remove(&tkey);
                    }
                    c.failure = failure;
                }
                None => {
                    if c.init.take().is_some() {
                        self.agent.remove(&tkey);
                    }
                    c.failure = None;
                }
            }
        }
        // An adopted container that ended is gone for good: a restart has yet another ID.
        h.containers
            .retain(|c| !c.adopted || found.contains(&c.id) || c.init.is_some());
    }

    fn lift(&self, k: &Key, h: &Held) {
        for c in &h.containers {
            self.agent.remove(&target_key(k, &c.raw));
        }
    }

    fn status(&self, k: &Key, h: &Held) -> GuardStatus {
        let states = self.agent.keyed_states();
        let containers = h
            .containers
            .iter()
            .map(|c| {
                let state = states.get(&target_key(k, &c.raw));
                let last = state.and_then(|s| s.last_denial.as_ref());
                let (phase, reason) = match (&c.failure, &c.init, state) {
                    (Some(f), _, _) => (ContainerPhase::Failed, f.clone()),
                    (None, None, _) if c.settling => (
                        ContainerPhase::Pending,
                        "its init runs in its runtime's root still (not set up yet)".into(),
                    ),
                    (None, None, _) | (None, Some(_), None) => (
                        ContainerPhase::Pending,
                        format!("container not running on node {}", self.node),
                    ),
                    (None, Some(_), Some(s)) => match s.phase {
                        Phase::Enforcing => (ContainerPhase::Enforced, String::new()),
                        Phase::Pending => (ContainerPhase::Pending, "placing marks".into()),
                        Phase::Exited => (
                            ContainerPhase::Pending,
                            "container exited; waiting for it to restart".into(),
                        ),
                        Phase::Failed => (
                            ContainerPhase::Failed,
                            s.reason.clone().unwrap_or_else(|| "failed".into()),
                        ),
                    },
                };
                ContainerStatus {
                    container_id: c.raw.clone(),
                    phase: phase as i32,
                    reason,
                    pid: c.init.as_ref().map_or(0, |p| p.pid()),
                    // The agent picks a backend per guard: say which one this container got.
                    backend: state.map_or(BACKEND, |s| s.backend).into(),
                    adopted: c.adopted,
                    denials: state.map_or(0, |s| s.denials),
                    last_denied_by: last.map(|d| d.by.clone()).unwrap_or_default(),
                    last_denied_pid: last.map_or(0, |d| d.pid),
                    last_denied_at: last.map(|d| d.at.clone()).unwrap_or_default(),
                }
            })
            .collect();
        GuardStatus {
            key: Some(GuardKey::from(k)),
            generation: h.generation,
            guard_uid: h.guard_uid.clone(),
            spec_digest: h.spec_digest.clone(),
            pod_name: h.pod_name.clone(),
            containers,
            warnings: self.warnings(k, h, &states),
        }
    }

    /// What the backends enforcing this guard cannot do: the running targets' own warnings
    /// (none under BPF), or fanotify's before any container runs.
    fn warnings(&self, k: &Key, h: &Held, states: &BTreeMap<String, TargetState>) -> Vec<String> {
        let mut running = h
            .containers
            .iter()
            .filter_map(|c| states.get(&target_key(k, &c.raw)))
            .peekable();
        if running.peek().is_none() {
            return h.warnings.clone();
        }
        let mut warnings: Vec<String> = running.flat_map(|s| s.warnings.clone()).collect();
        warnings.sort();
        warnings.dedup();
        warnings
    }

    /// Sets janus_guards{state}: a guard is failed if any container failed, pending if any
    /// is pending, enforced otherwise.
    fn count(&self, held: &BTreeMap<Key, Held>) {
        let mut counts = BTreeMap::from([("enforced", 0), ("pending", 0), ("failed", 0)]);
        for (k, h) in held {
            let phases: Vec<i32> = self
                .status(k, h)
                .containers
                .iter()
                .map(|c| c.phase)
                .collect();
            let state = if phases.contains(&(ContainerPhase::Failed as i32)) {
                "failed"
            } else if phases.is_empty() || phases.contains(&(ContainerPhase::Pending as i32)) {
                "pending"
            } else {
                "enforced"
            };
            *counts.entry(state).or_default() += 1;
        }
        for (state, n) in counts {
            self.agent
                .metrics()
                .guards
                .with_label_values(&[state])
                .set(n);
        }
    }
}

/// The pod a holding guards, with the runtime of its containers: the one its containers'
/// IDs name, else `node` (this node's).
fn pod_of(k: &Key, h: &Held, node: Runtime) -> (String, Runtime) {
    let runtime = h.containers.first().map_or(node, |c| c.id.runtime);
    (k.pod_uid.clone(), runtime)
}

/// The tonic service over [`Guards`]; /proc scans and marking run off the async threads.
struct Service(Arc<Guards>);

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("agent task failed: {e}")))
}

#[tonic::async_trait]
impl AgentApi for Service {
    async fn apply_guard(
        &self,
        request: Request<ApplyGuardRequest>,
    ) -> Result<Response<ApplyGuardResponse>, Status> {
        let guards = self.0.clone();
        let req = request.into_inner();
        let status = blocking(move || {
            let status = guards.apply(req)?;
            guards.settle_if_needed(std::slice::from_ref(&status));
            Ok(status)
        })
        .await?
        .map_err(|e: ApplyError| Status::new(code_of(&e), e.to_string()))?;
        Ok(Response::new(ApplyGuardResponse {
            status: Some(status),
        }))
    }

    async fn apply_guards(
        &self,
        request: Request<ApplyGuardsRequest>,
    ) -> Result<Response<ApplyGuardsResponse>, Status> {
        let items = request.into_inner().items;
        within_batch(items.len())?;
        let guards = self.0.clone();
        let results = blocking(move || {
            let procs = pods::Procs::default();
            let mut held = Vec::new();
            let results = items
                .into_iter()
                .map(|req| ApplyResult {
                    outcome: Some(match guards.apply_in(req, &procs) {
                        Ok(status) => {
                            held.push(status.clone());
                            apply_result::Outcome::Status(status)
                        }
                        Err(e) => apply_result::Outcome::Error(ItemError {
                            code: code_of(&e) as i32,
                            message: e.to_string(),
                        }),
                    }),
                })
                .collect();
            guards.settle_if_needed(&held);
            results
        })
        .await?;
        Ok(Response::new(ApplyGuardsResponse { results }))
    }

    async fn remove_guards(
        &self,
        request: Request<RemoveGuardsRequest>,
    ) -> Result<Response<RemoveGuardsResponse>, Status> {
        let items = request.into_inner().items;
        within_batch(items.len())?;
        let guards = self.0.clone();
        let removed = blocking(move || {
            items
                .iter()
                .map(|r| {
                    r.key
                        .as_ref()
                        .is_some_and(|k| guards.remove_if(k, &r.guard_uid))
                })
                .collect()
        })
        .await?;
        Ok(Response::new(RemoveGuardsResponse { removed }))
    }

    async fn remove_guard(
        &self,
        request: Request<RemoveGuardRequest>,
    ) -> Result<Response<RemoveGuardResponse>, Status> {
        let key = request
            .into_inner()
            .key
            .ok_or_else(|| Status::invalid_argument("key: required"))?;
        let guards = self.0.clone();
        let removed = blocking(move || guards.remove(&key)).await?;
        Ok(Response::new(RemoveGuardResponse { removed }))
    }

    async fn set_pods(
        &self,
        request: Request<SetPodsRequest>,
    ) -> Result<Response<SetPodsResponse>, Status> {
        self.0
            .set_pods(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(SetPodsResponse {}))
    }

    async fn list_guards(
        &self,
        request: Request<ListGuardsRequest>,
    ) -> Result<Response<ListGuardsResponse>, Status> {
        let guards = self.0.clone();
        let unless = request.into_inner().unless_digest;
        let answer =
            blocking(move || holding::listing(guards.list(), guards.node.clone(), &unless)).await?;
        Ok(Response::new(answer))
    }
}

/// Refuses a batch of more than MAX_BATCH items.
fn within_batch(items: usize) -> Result<(), Status> {
    if items > holding::MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "items: {items} items; at most {}",
            holding::MAX_BATCH
        )));
    }
    Ok(())
}

/// The gRPC code a refused apply answers with, alone or as one item of a batch.
fn code_of(e: &ApplyError) -> tonic::Code {
    match e {
        ApplyError::NotInPod { .. } => tonic::Code::PermissionDenied,
        ApplyError::Full => tonic::Code::ResourceExhausted,
        _ => tonic::Code::InvalidArgument,
    }
}

/// The largest request the API decodes: a node's batch, which the controller splits to fit.
const MAX_MESSAGE_BYTES: usize = holding::MAX_BATCH_BYTES;

/// Refuses every call but the controller's identity's, and says so in the log and
/// `janus_api_refused_total`.
fn authorize(
    who: tls::ClientName,
    refused: prometheus::IntCounterVec,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let chain = req.peer_certs();
        match who.check(chain.as_deref().map(Vec::as_slice)) {
            Ok(()) => Ok(req),
            Err(refusal) => {
                refused.with_label_values(&[refusal.label()]).inc();
                tracing::warn!(peer = ?req.remote_addr(), reason = %refusal, "API call refused");
                Err(Status::permission_denied(format!(
                    "only the controller may call this agent: {refusal}"
                )))
            }
        }
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let shutdown = crate::standalone::Shutdown::listen()?;
    let tls = tls::server_config(&args.tls)?;
    let metrics = Arc::new(Metrics::new());
    let (log, writer) = decisions::start(Box::new(std::io::stdout()), args.enforce.decision_format);
    let node = args.node.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "-".into())
    });
    let agent = Arc::new(Agent::new(
        metrics.clone(),
        log,
        node.clone(),
        &args.enforce,
    )?);
    let guards = Arc::new(Guards::new(
        agent.clone(),
        node,
        Duration::from_secs(args.pod_gone_after_secs),
        args.container_runtime,
        &args.gate,
    ));
    guards.load_word();
    guards.count_ungated();
    gate::serve(&args.gate.gate_socket, guards.clone())?;
    crate::nri::spawn(&args.nri, &args.gate, metrics).context("starting the NRI plugin")?;
    let result = serve(&args, tls, agent.clone(), guards, shutdown).await;
    agent.shutdown();
    writer.finish();
    result
}

async fn serve(
    args: &ServeArgs,
    tls: Option<(tonic::transport::ServerTlsConfig, tls::ClientName)>,
    agent: Arc<Agent>,
    guards: Arc<Guards>,
    shutdown: crate::standalone::Shutdown,
) -> anyhow::Result<()> {
    if let Some(addr) = args.metrics_addr {
        let bound = http::serve(addr, agent.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%bound, "serving /metrics, /healthz, /readyz, /state");
    }
    let rescan = {
        let guards = guards.clone();
        let period = Duration::from_millis(args.rescan_interval_ms.max(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let g = guards.clone();
                let rescan = move || {
                    g.rescan();
                    g.count_ungated();
                };
                if tokio::task::spawn_blocking(rescan).await.is_err() {
                    tracing::error!("rescan task failed");
                }
            }
        })
    };
    watch_births(&args.cgroup_root, guards.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<Service>>().await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "serving janus.agent.v1");
    let mut server = tonic::transport::Server::builder();
    let api = AgentServer::new(Service(guards)).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let router = match tls {
        Some((config, who)) => server
            .tls_config(config)
            .context("TLS configuration")?
            .add_service(health_service)
            .add_service(InterceptedService::new(
                api,
                authorize(who, agent.metrics().api_refused.clone()),
            )),
        None => server.add_service(health_service).add_service(api),
    };
    let result = router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.wait(),
        )
        .await
        .context("serving the API");
    rescan.abort();
    tracing::info!("lifting guards");
    result
}

/// How long a new container's cgroup may stay without a process in a root of its own before
/// it is left to the periodic rescan.
const SETTLE_WITHIN: Duration = Duration::from_secs(5);

/// Guards a held pod's new container as soon as its runtime has made its cgroup and moved
/// its init into the container's root, instead of at the next rescan. A watch that cannot
/// be placed, whole or on some directory, is reported (`janus_cgroup_watch_failed`) and
/// leaves those containers to the rescan: it never keeps the agent from enforcing.
fn watch_births(root: &std::path::Path, guards: Arc<Guards>) {
    let failed = guards.agent.metrics().cgroup_watch_failed.clone();
    let metric = failed.clone();
    let hierarchy = crate::cgroup_watch::hierarchy(root);
    let mut births = match crate::cgroup_watch::Births::new(&hierarchy) {
        Ok(births) => births,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the cgroup tree: new containers are found by the periodic rescan only");
            failed.set(1);
            return;
        }
    };
    tracing::info!(hierarchy = %hierarchy.display(), "watching for new containers' cgroups");
    let watch = move || loop {
        let next = births.next(Duration::from_secs(1));
        failed.set(i64::from(births.incomplete()));
        match next {
            Ok(Some(born)) => {
                for birth in born.into_iter().filter(|b| guards.holds_pod(&b.pod_uid)) {
                    let uid = birth.pod_uid.clone();
                    guards.settle(uid, move |left| birth.settled(left));
                }
            }
            Ok(None) => {
                tracing::warn!("the cgroup watch overflowed: looking at every pod again");
                guards.rescan();
            }
            Err(e) => {
                tracing::error!(error = %e, "the cgroup watch failed: new containers are found by the periodic rescan only");
                failed.set(1);
                return;
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(watch)
    {
        tracing::error!(error = %e, "cannot start the cgroup watch: new containers are found by the periodic rescan only");
        metric.set(1);
    }
}

#[cfg(test)]
mod tests {
    use janus_api::agent_v1::{GuardRef, PodRef};

    use super::*;

    /// A pod whose container runs on no node here: applying it touches no kernel state.
    fn request(uid: &str, generation: i64, path: &str) -> ApplyGuardRequest {
        ApplyGuardRequest {
            guard: Some(GuardRef {
                namespace: "default".into(),
                name: "web".into(),
                uid: uid.into(),
                generation,
            }),
            pod: Some(PodRef {
                uid: "pod-uid-not-on-this-node".into(),
                namespace: "default".into(),
                name: "web-1".into(),
                container_ids: vec!["containerd://not-running-here".into()],
            }),
            spec_json: format!(r#"{{"selector":{{}},"subjects":[{{"deny":["{path}"]}}]}}"#),
            spec_digest: String::new(),
        }
    }

    fn guards() -> Guards {
        let metrics = Arc::new(Metrics::new());
        let (log, _writer) = decisions::start(Box::new(std::io::sink()), Default::default());
        let agent = Agent::new(
            metrics,
            log,
            "node-a".into(),
            &crate::agent::EnforceArgs::fanotify(),
        )
        .expect("an agent without BPF");
        Guards::new(
            Arc::new(agent),
            "node-a".into(),
            Duration::from_secs(30),
            Runtime::Containerd,
            &gate::GateArgs {
                gate_socket: "/nonexistent/agent.sock".into(),
                gate_within_secs: 1,
                gate_without_word: crate::hook::Unreachable::Start,
                ungated_dir: "/nonexistent/ungated".into(),
                gate_word_file: "/nonexistent/word.pb".into(),
            },
        )
    }

    fn held_path(g: &Guards) -> String {
        let held = g.held.lock().unwrap();
        let h = held.values().next().expect("one guard held");
        h.policy.subjects[0].deny[0].to_string()
    }

    #[test]
    fn a_different_spec_replaces_the_held_one_whatever_its_generation() {
        let g = guards();
        // Someone other than the controller placed a permissive spec at a forged generation.
        g.apply(request("uid-1", i64::MAX, "/forged")).unwrap();
        // The controller's push, at the guard's real generation, is not "older": it wins.
        let status = g.apply(request("uid-1", 2, "/real")).unwrap();
        assert_eq!(status.generation, 2);
        assert_eq!(held_path(&g), "/real");
        assert_eq!(
            status.spec_digest,
            janus_api::holding::spec_digest(r#"{"selector":{},"subjects":[{"deny":["/real"]}]}"#)
        );
        // The same spec again changes nothing.
        let again = g.apply(request("uid-1", 2, "/real")).unwrap();
        assert_eq!(again, status);
    }

    #[test]
    fn refused_requests_hold_nothing() {
        let g = guards();
        let mut r = request("uid-1", 1, "/x");
        r.spec_digest = "sha256:00".into();
        assert!(matches!(
            g.apply(r),
            Err(ApplyError::Request(RequestError::DigestMismatch { .. }))
        ));
        let many: Vec<String> = (0..=janus_api::policy::MAX_PATHS)
            .map(|i| format!(r#""/p{i}""#))
            .collect();
        let mut r = request("uid-1", 1, "/x");
        r.spec_json = format!(
            r#"{{"selector":{{}},"subjects":[{{"deny":[{}]}}]}}"#,
            many.join(",")
        );
        let e = g.apply(r).unwrap_err();
        assert!(
            e.to_string().contains("spec.subjects: 1025 paths in all"),
            "{e}"
        );
        assert!(g.list().is_empty());
    }

    #[test]
    fn a_guard_created_again_under_its_name_replaces_the_old_one() {
        let g = guards();
        g.apply(request("uid-1", 2, "/old")).unwrap();
        // Deleted and created again: generation 1 again, another UID, another spec.
        let status = g.apply(request("uid-2", 1, "/new")).unwrap();
        assert_eq!((status.generation, status.guard_uid.as_str()), (1, "uid-2"));
        assert_eq!(held_path(&g), "/new");
        assert_eq!(g.list().len(), 1);
        // Created again once more with the very same spec: still the new UID it reports.
        let status = g.apply(request("uid-3", 1, "/new")).unwrap();
        assert_eq!(status.guard_uid, "uid-3");
    }
}
