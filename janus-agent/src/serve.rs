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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use janus_api::agent_v1::agent_server::{Agent as AgentApi, AgentServer};
use janus_api::agent_v1::{
    ApplyGuardRequest, ApplyGuardResponse, ContainerPhase, ContainerStatus, GuardKey, GuardRef,
    GuardStatus, ListGuardsRequest, ListGuardsResponse, RemoveGuardRequest, RemoveGuardResponse,
};
use janus_api::{GuardPolicy, JanusGuardSpec};
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::fanotify::target::{unsupported_warnings, BACKEND};
use crate::pods::{self, ContainerId};
use crate::state::{Phase, TargetState};
use crate::{decisions, fanotify, http, metrics::Metrics, tls};

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
    /// Enforcement backend: BPF LSM where the kernel allows it (auto), or one of them.
    #[arg(long, value_enum, default_value_t = crate::bpf::BackendChoice::Auto)]
    pub backend: crate::bpf::BackendChoice,
    #[command(flatten)]
    pub tls: tls::TlsArgs,
}

/// (guard namespace, guard name, pod UID).
type Key = (String, String, String);

fn key_of(k: &GuardKey) -> Key {
    (
        k.guard_namespace.clone(),
        k.guard_name.clone(),
        k.pod_uid.clone(),
    )
}

struct HeldContainer {
    /// As the controller sent it.
    raw: String,
    id: ContainerId,
    /// The init process guarded, once found.
    pid: Option<i32>,
    /// Why guarding the current init failed; retried when the init changes.
    failure: Option<String>,
    /// Found in the pod's cgroup by the agent, not yet listed by the controller.
    adopted: bool,
}

struct Held {
    guard_uid: String,
    generation: i64,
    pod_name: String,
    spec_json: String,
    policy: Arc<GuardPolicy>,
    warnings: Vec<String>,
    containers: Vec<HeldContainer>,
    /// When a process of the pod was last seen on this node (None: never yet).
    last_seen: Option<Instant>,
    /// The containers in the pod's cgroup since it was first seen here (its sandbox among
    /// them). One that appears later is a container that restarted (under a new ID) or an
    /// ephemeral one: it is guarded at once, before the controller hears of it.
    baseline: Option<BTreeSet<ContainerId>>,
}

impl Held {
    /// Whether this is the guard `guard` names, at its generation, with this spec: a guard
    /// created again under its name (another UID) is not, whatever its spec.
    fn holds_spec(&self, guard: &GuardRef, spec_json: &str) -> bool {
        self.guard_uid == guard.uid
            && self.generation == guard.generation
            && self.spec_json == spec_json
    }
}

/// Every guard this node holds, and the agent that enforces them.
pub struct Guards {
    agent: Arc<Agent>,
    node: String,
    gone_after: Duration,
    held: Mutex<BTreeMap<Key, Held>>,
}

fn target_key(k: &Key, container: &str) -> String {
    format!("{}/{}/{}/{}", k.0, k.1, k.2, container)
}

impl Guards {
    pub fn new(agent: Arc<Agent>, node: String, gone_after: Duration) -> Guards {
        Guards {
            agent,
            node,
            gone_after,
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// Creates or replaces the guard; a repeated identical request changes nothing.
    pub fn apply(&self, req: ApplyGuardRequest) -> Result<GuardStatus, Status> {
        let guard = req
            .guard
            .ok_or_else(|| Status::invalid_argument("guard: required"))?;
        let pod = req
            .pod
            .ok_or_else(|| Status::invalid_argument("pod: required"))?;
        for (field, value) in [
            ("guard.namespace", &guard.namespace),
            ("guard.name", &guard.name),
            ("pod.uid", &pod.uid),
        ] {
            if value.is_empty() {
                return Err(Status::invalid_argument(format!("{field}: required")));
            }
        }
        let key = (guard.namespace.clone(), guard.name.clone(), pod.uid.clone());
        let containers = pod
            .container_ids
            .iter()
            .map(|raw| {
                raw.parse::<ContainerId>()
                    .map(|id| HeldContainer {
                        raw: raw.clone(),
                        id,
                        pid: None,
                        failure: None,
                        adopted: false,
                    })
                    .map_err(|e| Status::invalid_argument(format!("pod.container_ids: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut held = self.held.lock().expect("guards lock");
        if let Some(h) = held.get(&key) {
            let same_containers = h
                .containers
                .iter()
                .map(|c| &c.raw)
                .eq(pod.container_ids.iter());
            let unchanged = h.holds_spec(&guard, &req.spec_json) && same_containers;
            let older = h.guard_uid == guard.uid && guard.generation < h.generation;
            if unchanged || older {
                return Ok(self.status(&key, h));
            }
        }
        let spec: JanusGuardSpec = serde_json::from_str(&req.spec_json)
            .map_err(|e| Status::invalid_argument(format!("spec_json: {e}")))?;
        let policy =
            GuardPolicy::from_spec(&guard.name, &guard.namespace, &spec).map_err(|errors| {
                let list: Vec<String> = errors
                    .0
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect();
                Status::invalid_argument(list.join("; "))
            })?;
        let mut containers = containers;
        let mut baseline = None;
        if let Some(old) = held.remove(&key) {
            if old.holds_spec(&guard, &req.spec_json) {
                // Only the containers changed: those that stay keep their targets.
                baseline = old.baseline;
                let mut before = old.containers;
                for c in &mut containers {
                    if let Some(i) = before.iter().position(|o| o.raw == c.raw) {
                        *c = HeldContainer {
                            adopted: false,
                            ..before.swap_remove(i)
                        };
                    }
                }
                for o in before {
                    if o.adopted && o.pid.is_some() {
                        // Running, and not listed yet by a controller that has not seen it.
                        containers.push(o);
                    } else if o.pid.is_some() {
                        self.agent.remove(&target_key(&key, &o.raw));
                    }
                }
            } else {
                self.lift(&key, &old);
            }
        }
        let mut h = Held {
            guard_uid: guard.uid,
            generation: guard.generation,
            pod_name: pod.name,
            spec_json: req.spec_json,
            warnings: unsupported_warnings(&policy),
            policy: Arc::new(policy),
            containers,
            last_seen: None,
            baseline,
        };
        let scan = pods::scan(&wanted(&key, &h));
        self.sync(&key, &mut h, &scan, Instant::now());
        tracing::info!(guard = %key.1, namespace = %key.0, pod = %h.pod_name, generation = h.generation, "guard applied");
        let status = self.status(&key, &h);
        held.insert(key, h);
        self.count(&held);
        Ok(status)
    }

    /// Lifts the guard; false when it was not held.
    pub fn remove(&self, key: &GuardKey) -> bool {
        let key = key_of(key);
        let mut held = self.held.lock().expect("guards lock");
        let removed = held.remove(&key);
        if let Some(h) = &removed {
            self.lift(&key, h);
            tracing::info!(guard = %key.1, namespace = %key.0, pod = %h.pod_name, "guard removed");
        }
        self.count(&held);
        removed.is_some()
    }

    pub fn list(&self) -> Vec<GuardStatus> {
        let held = self.held.lock().expect("guards lock");
        held.iter().map(|(k, h)| self.status(k, h)).collect()
    }

    /// One pass over /proc for every held container: guards new inits, releases exited
    /// ones and lifts the guards of pods gone from this node.
    pub fn rescan(&self) {
        let mut held = self.held.lock().expect("guards lock");
        let all: Vec<(String, ContainerId)> = held.iter().flat_map(|(k, h)| wanted(k, h)).collect();
        if all.is_empty() {
            return;
        }
        let scan = pods::scan(&all);
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
                tracing::info!(guard = %k.1, namespace = %k.0, pod = %h.pod_name, "pod gone from this node; guard lifted");
            }
        }
        self.count(&held);
    }

    fn sync(&self, k: &Key, h: &mut Held, scan: &pods::Scan, now: Instant) {
        if scan.pods_present.contains(&k.2) {
            h.last_seen = Some(now);
        }
        if let Some(found) = scan.containers.get(&k.2) {
            let baseline = h.baseline.get_or_insert_with(|| found.clone());
            for id in found.difference(baseline) {
                if !h.containers.iter().any(|c| c.id == *id) {
                    tracing::info!(guard = %k.1, namespace = %k.0, pod = %h.pod_name, container = %id, "a new container in the pod (a restart or an ephemeral container): guarding it");
                    h.containers.push(HeldContainer {
                        raw: id.to_string(),
                        id: id.clone(),
                        pid: None,
                        failure: None,
                        adopted: true,
                    });
                }
            }
            baseline.extend(found.iter().cloned());
        }
        for c in &mut h.containers {
            let tkey = target_key(k, &c.raw);
            match scan.inits.get(&c.id) {
                Some(&pid) if c.pid == Some(pid) => {}
                Some(&pid) => {
                    c.pid = Some(pid);
                    c.failure = match self.agent.add(
                        &tkey,
                        h.policy.clone(),
                        pid,
                        h.pod_name.clone(),
                    ) {
                        Ok(()) => {
                            tracing::info!(guard = %k.1, namespace = %k.0, pod = %h.pod_name, container = %c.raw, pid, "guarding container");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(guard = %k.1, namespace = %k.0, container = %c.raw, pid, error = %e, "cannot guard container");
                            Some(e.to_string())
                        }
                    };
                }
                None => {
                    if c.pid.take().is_some() {
                        self.agent.remove(&tkey);
                    }
                    c.failure = None;
                }
            }
        }
        // An adopted container that ended is gone for good: a restart has yet another ID.
        h.containers.retain(|c| !(c.adopted && c.pid.is_none()));
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
                let (phase, reason) = match (&c.failure, c.pid, state) {
                    (Some(f), _, _) => (ContainerPhase::Failed, f.clone()),
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
                    pid: c.pid.unwrap_or(0),
                    // The agent picks a backend per guard: say which one this container got.
                    backend: state.map_or(BACKEND, |s| s.backend).into(),
                }
            })
            .collect();
        GuardStatus {
            key: Some(GuardKey {
                guard_namespace: k.0.clone(),
                guard_name: k.1.clone(),
                pod_uid: k.2.clone(),
            }),
            generation: h.generation,
            guard_uid: h.guard_uid.clone(),
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

fn wanted(k: &Key, h: &Held) -> Vec<(String, ContainerId)> {
    h.containers
        .iter()
        .map(|c| (k.2.clone(), c.id.clone()))
        .collect()
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
        let status = blocking(move || guards.apply(req)).await??;
        Ok(Response::new(ApplyGuardResponse {
            status: Some(status),
        }))
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

    async fn list_guards(
        &self,
        _request: Request<ListGuardsRequest>,
    ) -> Result<Response<ListGuardsResponse>, Status> {
        let guards = self.0.clone();
        let list = blocking(move || guards.list()).await?;
        Ok(Response::new(ListGuardsResponse {
            guards: list,
            node: self.0.node.clone(),
        }))
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let shutdown = crate::standalone::Shutdown::listen()?;
    let tls = tls::server_config(&args.tls)?;
    // Fail in one clear line before serving if the kernel will not let us guard.
    fanotify::PermGroup::new()?;
    let metrics = Arc::new(Metrics::new());
    let (log, writer) = decisions::start(Box::new(std::io::stdout()), metrics.log_dropped.clone());
    let node = args.node.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "-".into())
    });
    let agent = Arc::new(Agent::new(metrics, log, node.clone(), args.backend)?);
    let guards = Arc::new(Guards::new(
        agent.clone(),
        node,
        Duration::from_secs(args.pod_gone_after_secs),
    ));
    let result = serve(&args, tls, agent.clone(), guards, shutdown).await;
    agent.shutdown();
    writer.finish();
    result
}

async fn serve(
    args: &ServeArgs,
    tls: Option<tonic::transport::ServerTlsConfig>,
    agent: Arc<Agent>,
    guards: Arc<Guards>,
    shutdown: crate::standalone::Shutdown,
) -> anyhow::Result<()> {
    if let Some(addr) = args.metrics_addr {
        let bound = http::serve(addr, agent)
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
                if tokio::task::spawn_blocking(move || g.rescan())
                    .await
                    .is_err()
                {
                    tracing::error!("rescan task failed");
                }
            }
        })
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<Service>>().await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "serving janus.agent.v1");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("TLS configuration")?;
    }
    let result = server
        .add_service(health_service)
        .add_service(AgentServer::new(Service(guards)))
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
            spec_json: format!(r#"{{"subjects":[{{"deny":["{path}"]}}]}}"#),
        }
    }

    fn guards() -> Guards {
        let metrics = Arc::new(Metrics::new());
        let (log, _writer) =
            decisions::start(Box::new(std::io::sink()), metrics.log_dropped.clone());
        let agent = Agent::new(
            metrics,
            log,
            "node-a".into(),
            crate::bpf::BackendChoice::Fanotify,
        )
        .expect("an agent without BPF");
        Guards::new(Arc::new(agent), "node-a".into(), Duration::from_secs(30))
    }

    fn held_path(g: &Guards) -> String {
        let held = g.held.lock().unwrap();
        let h = held.values().next().expect("one guard held");
        h.policy.subjects[0].deny[0].to_string()
    }

    #[test]
    fn an_older_generation_of_the_held_guard_changes_nothing() {
        let g = guards();
        assert_eq!(g.apply(request("uid-1", 2, "/new")).unwrap().generation, 2);
        // A replica whose cache lags sends generation 1 of the same guard.
        let status = g.apply(request("uid-1", 1, "/old")).unwrap();
        assert_eq!((status.generation, status.guard_uid.as_str()), (2, "uid-1"));
        assert_eq!(held_path(&g), "/new");
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
