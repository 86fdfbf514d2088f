//! The reconcile core: which pods each JanusGuard selects, which agent holds them, and
//! making the agents hold exactly that.
//!
//! [`Core::sync_guard`] pushes one guard to the agents of the nodes its pods run on and
//! lifts it from pods it no longer selects; [`Core::sync_all`] lists every agent first, so
//! that what an agent holds but no guard wants (a guard deleted while the controller was
//! away) is removed and what an agent lost (it restarted) is pushed again. Every agent call
//! is idempotent, so more than one replica may run at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use janus_api::agent_v1::{
    ApplyGuardRequest, ContainerPhase, GuardRef, GuardStatus, PodRef, Removal,
};
use janus_api::holding::{spec_digest, Holding, HoldingKey};
use janus_api::GuardPolicy;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Resource, ResourceExt};

use crate::agents::{discover, AgentPool, ItemFailure, Listing};
use crate::crd::{Condition, JanusGuard, JanusGuardStatus};
use crate::denials::{DenialEvents, PodDenials};
use crate::index::{self, PodIndex};
use crate::metrics::Metrics;
use crate::pod::PodView;

type Key = HoldingKey;

/// How many agents are called at once.
const CONCURRENCY: usize = 32;

pub struct Core {
    pub client: kube::Client,
    pub guards: Store<JanusGuard>,
    pub pods: Store<PodView>,
    pub slices: Store<EndpointSlice>,
    pub agents: AgentPool,
    pub metrics: Arc<Metrics>,
    /// What each node's agent holds, as last listed or applied, by node.
    holdings: Mutex<BTreeMap<String, NodeHoldings>>,
    /// The status last written on each guard, by UID: the store's copy lags behind the
    /// controller's own writes, and a pass must not write the same status again.
    /// guard UID -> (the resourceVersion the store showed when it was written, status).
    written: Mutex<BTreeMap<String, (Option<String>, JanusGuardStatus)>>,
    /// The pods of `pods`, by namespace and label.
    pub(crate) index: Mutex<PodIndex>,
    /// What each agent's start gate was last told.
    pub(crate) told: crate::gate::Told,
    /// Pods or guards changed: the agents' words may have.
    pub gates_changed: tokio::sync::Notify,
    pub(crate) namespace_modes: crate::gate::NamespaceModes,
    pub(crate) telling: tokio::sync::Mutex<()>,
    denial_events: DenialEvents,
}

/// What one node's agent holds, as last listed or applied.
#[derive(Default)]
struct NodeHoldings {
    /// The digest of the agent's last listing while `held` is still exactly that listing:
    /// a change the controller makes to `held` forgets it.
    digest: Option<String>,
    held: BTreeMap<Key, Arc<GuardStatus>>,
}

/// A running pod a guard selects; what its node's agent should hold is the plan's guard on
/// its containers ([`Plan::request`]), made only when it must be sent.
struct Wanted {
    node: String,
    key: Key,
    pod: Arc<PodView>,
}

/// What one guard wants this pass: its pods, or why it wants none.
struct Plan<'a> {
    guard: &'a JanusGuard,
    gref: GuardRef,
    spec_json: String,
    digest: String,
    wanted: Vec<Wanted>,
    problems: Problems,
    /// `enforce`, `monitor`, or `mixed` when subjects override the guard's mode; None for
    /// an invalid guard.
    mode: Option<&'static str>,
}

impl<'a> Plan<'a> {
    fn new(guard: &'a JanusGuard, pods: &PodIndex) -> Plan<'a> {
        let gref = GuardRef {
            namespace: guard.namespace().unwrap_or_default(),
            name: guard.name_any(),
            uid: guard.uid().unwrap_or_default(),
            generation: guard.meta().generation.unwrap_or(0),
        };
        let spec_json = guard.spec.to_json();
        let policy = policy_of(guard);
        let mut problems = Problems::default();
        let (wanted, mode) = match &policy {
            Ok(p) => (
                wanted(&gref, p, pods),
                Some(p.mode().map_or("mixed", |m| m.name())),
            ),
            Err(e) => {
                problems.add("InvalidSpec", e.clone());
                (Vec::new(), None)
            }
        };
        Plan {
            guard,
            digest: spec_digest(&spec_json),
            gref,
            spec_json,
            wanted,
            problems,
            mode,
        }
    }

    /// Whether `held` is exactly what `w` wants (the spec by its digest, whatever
    /// generation the agent reports).
    fn is_held(&self, w: &Wanted, held: &GuardStatus) -> bool {
        let wanted = Holding {
            guard_uid: &self.gref.uid,
            spec_digest: &self.digest,
            containers: w.pod.container_ids().collect(),
        };
        Holding::of_status(held) == wanted
    }

    /// What `w`'s node's agent is sent.
    fn request(&self, w: &Wanted) -> ApplyGuardRequest {
        ApplyGuardRequest {
            guard: Some(self.gref.clone()),
            pod: Some(PodRef {
                uid: w.key.pod_uid.clone(),
                namespace: self.gref.namespace.clone(),
                name: w.pod.name_any(),
                container_ids: w.pod.container_ids().map(str::to_owned).collect(),
            }),
            spec_json: self.spec_json.clone(),
            spec_digest: self.digest.clone(),
        }
    }
}

/// A stored guard's policy, or why it has none.
pub(crate) fn policy_of(guard: &JanusGuard) -> Result<GuardPolicy, String> {
    let (name, namespace) = (guard.name_any(), guard.namespace().unwrap_or_default());
    let spec: janus_api::JanusGuardSpec =
        serde_json::from_str(&guard.spec.to_json()).map_err(|e| e.to_string())?;
    GuardPolicy::from_spec(&name, &namespace, &spec).map_err(|errs| {
        errs.0
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// The pods a guard selects that are bound to a node and have not finished: a pod is
/// pushed as soon as the scheduler places it, before any of its containers exists, so that
/// its node's agent holds the guard when the first one (an init container, often) starts.
fn wanted(gref: &GuardRef, policy: &GuardPolicy, pods: &PodIndex) -> Vec<Wanted> {
    pods.selected(&gref.namespace, &policy.selector)
        .into_iter()
        .filter(|p| p.meta().deletion_timestamp.is_none() && !p.finished())
        .filter_map(|pod| {
            Some(Wanted {
                node: pod.node()?.to_owned(),
                key: HoldingKey {
                    guard_namespace: gref.namespace.clone(),
                    guard_name: gref.name.clone(),
                    pod_uid: pod.node_uid()?,
                },
                pod,
            })
        })
        .collect()
}

/// What one pod's agent answered, or why it did not: (Degraded reason, message).
type Outcome = Result<Arc<GuardStatus>, (&'static str, String)>;

/// Which pod an outcome is of, as this controller's plan names it: what an agent says of
/// itself (its status's pod name) names nothing on the guard, so a compromised node cannot
/// put its denials on another pod.
#[derive(Debug, Clone)]
struct Reached {
    node: String,
    pod: String,
}

impl Reached {
    fn of(w: &Wanted) -> Reached {
        Reached {
            node: w.node.clone(),
            pod: w.pod.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// What went wrong for a guard, by reason, for its Degraded condition and Events.
#[derive(Debug, Default)]
struct Problems(BTreeMap<&'static str, Vec<String>>);

/// How many problems a Degraded message spells out, and how long each may be: a failure
/// on thousands of pods (or an agent's long answer) must not make a status the API server
/// refuses, which would leave the guard showing its last one.
const PROBLEMS_SHOWN: usize = 10;
const PROBLEM_CHARS: usize = 256;

impl Problems {
    fn add(&mut self, reason: &'static str, message: String) {
        self.0.entry(reason).or_default().push(message);
    }

    /// The first [`PROBLEMS_SHOWN`], each cut to [`PROBLEM_CHARS`], and how many more.
    fn summary(&self) -> String {
        let all: Vec<&String> = self.0.values().flatten().collect();
        let mut out = all
            .iter()
            .take(PROBLEMS_SHOWN)
            .map(|m| match m.char_indices().nth(PROBLEM_CHARS) {
                Some((end, _)) => format!("{}…", &m[..end]),
                None => m.to_string(),
            })
            .collect::<Vec<_>>()
            .join("; ");
        if all.len() > PROBLEMS_SHOWN {
            out.push_str(&format!("; and {} more", all.len() - PROBLEMS_SHOWN));
        }
        out
    }
}

/// The default window of denial Events.
pub const DENIAL_WINDOW: Duration = Duration::from_secs(60);

/// What a guard's status says of its pods.
struct Tally {
    guarded: i64,
    pending: usize,
    selected: usize,
    denials: Denials,
}

/// A guard's denials over its pods, for its status and Events.
#[derive(Default)]
struct Denials {
    total: PodDenials,
    /// The Events due.
    due: Vec<crate::denials::Due>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("updating the status of {0}: {1}")]
    Status(String, #[source] kube::Error),
}

impl Core {
    pub fn new(
        client: kube::Client,
        guards: Store<JanusGuard>,
        pods: Store<PodView>,
        slices: Store<EndpointSlice>,
        agents: AgentPool,
        metrics: Arc<Metrics>,
    ) -> Core {
        Core {
            client,
            guards,
            pods,
            slices,
            agents,
            metrics,
            holdings: Mutex::new(BTreeMap::new()),
            written: Mutex::new(BTreeMap::new()),
            index: Mutex::new(PodIndex::default()),
            told: crate::gate::Told::default(),
            gates_changed: tokio::sync::Notify::new(),
            namespace_modes: crate::gate::NamespaceModes::default(),
            telling: tokio::sync::Mutex::new(()),
            denial_events: DenialEvents::new(DENIAL_WINDOW),
        }
    }

    /// At most one denial Event per guard and pod per `window` (`--denial-event-window`).
    pub fn with_denial_window(mut self, window: Duration) -> Core {
        self.denial_events = DenialEvents::new(window);
        self
    }

    fn held(&self, node: &str, key: &Key) -> Option<Arc<GuardStatus>> {
        self.holdings
            .lock()
            .expect("holdings lock")
            .get(node)
            .and_then(|h| h.held.get(key).cloned())
    }

    /// Every guard an agent holds whose key and status satisfy `pred`, as a removal of
    /// that guard UID from that node.
    fn held_where(&self, pred: impl Fn(&Key, &GuardStatus) -> bool) -> Vec<(String, Removal)> {
        self.holdings
            .lock()
            .expect("holdings lock")
            .iter()
            .flat_map(|(node, h)| {
                h.held
                    .iter()
                    .filter(|(k, s)| pred(k, s))
                    .map(move |(k, s)| {
                        let removal = Removal {
                            key: Some(k.into()),
                            guard_uid: s.guard_uid.clone(),
                        };
                        (node.clone(), removal)
                    })
            })
            .collect()
    }

    fn hold(&self, node: &str, key: Key, status: Option<Arc<GuardStatus>>) {
        let mut h = self.holdings.lock().expect("holdings lock");
        let node = h.entry(node.to_owned()).or_default();
        node.digest = None;
        match status {
            Some(s) => node.held.insert(key, s),
            None => node.held.remove(&key),
        };
    }

    /// Waits until guards, pods and agents have been listed: before that a guard selects
    /// nothing, and every held guard looks unwanted. False when a store's watch is gone.
    pub async fn ready(&self) -> bool {
        futures::future::try_join3(
            self.guards.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.slices.wait_until_ready(),
        )
        .await
        .is_ok()
    }

    /// Pushes `guard` to the agents of its pods' nodes, lifts it from pods it no longer
    /// selects, and records the outcome in its status.
    pub async fn sync_guard(&self, guard: &JanusGuard) -> Result<(), Error> {
        self.sync_guards(&[guard]).await
    }

    /// [`Core::sync_guard`] for many guards at once: every node's agent gets one batched
    /// call for all of them (and one to lift what they no longer select), and only what
    /// differs from what it holds.
    async fn sync_guards(&self, guards: &[&JanusGuard]) -> Result<(), Error> {
        let endpoints = discover(self.slices.state().iter().map(|s| &**s));
        let mut plans: Vec<Plan> = {
            let mut index = self.index.lock().expect("index lock");
            index.sync(&self.pods.state());
            guards.iter().map(|g| Plan::new(g, &index)).collect()
        };

        // What each node's agent must be sent; what is current is an outcome already.
        let mut outcomes: Vec<Vec<(Reached, Outcome)>> = vec![Vec::new(); plans.len()];
        let mut lacking: Vec<(usize, &Wanted)> = Vec::new();
        {
            let holdings = self.holdings.lock().expect("holdings lock");
            for (i, plan) in plans.iter().enumerate() {
                for w in &plan.wanted {
                    if !endpoints.contains_key(&w.node) {
                        let msg = format!("no agent found on node {}", w.node);
                        outcomes[i].push((Reached::of(w), Err(("AgentUnreachable", msg))));
                        continue;
                    }
                    // What the agent holds is repaired unless it is exactly what is wanted.
                    match holdings.get(&w.node).and_then(|h| h.held.get(&w.key)) {
                        Some(held) if plan.is_held(w, held) => {
                            outcomes[i].push((Reached::of(w), Ok(held.clone())));
                        }
                        _ => lacking.push((i, w)),
                    }
                }
            }
        }
        // A guard deleted since this pass read the store is not pushed again: the lift of
        // its delete event may have run already.
        let live: Vec<bool> = plans
            .iter()
            .map(|p| {
                let stored = self.guards.get(&ObjectRef::from_obj(p.guard));
                stored.is_some_and(|g| g.uid() == p.guard.uid())
            })
            .collect();
        let mut sends: BTreeMap<String, Vec<(usize, Key, ApplyGuardRequest)>> = BTreeMap::new();
        for (i, w) in lacking.into_iter().filter(|(i, _)| live[*i]) {
            let item = (i, w.key.clone(), plans[i].request(w));
            sends.entry(w.node.clone()).or_default().push(item);
        }
        let pushed: Vec<(usize, Reached, Outcome)> = stream::iter(sends)
            .map(|(node, items)| self.push(&endpoints, node, items))
            .buffer_unordered(CONCURRENCY)
            .flat_map(stream::iter)
            .collect()
            .await;
        for (i, at, outcome) in pushed {
            outcomes[i].push((at, outcome));
        }

        // Lift the guards from pods they no longer select, wherever an agent holds them.
        let wanted: BTreeSet<&Key> = plans
            .iter()
            .flat_map(|p| p.wanted.iter().map(|w| &w.key))
            .collect();
        // An invalid guard keeps what was pushed for it while it was valid: it is refused
        // loudly (InvalidSpec), not turned into no guard at all.
        let synced: BTreeSet<(&str, &str)> = plans
            .iter()
            .filter(|p| p.mode.is_some())
            .map(|p| (p.gref.namespace.as_str(), p.gref.name.as_str()))
            .collect();
        let stale = self.held_where(|k, _| {
            synced.contains(&(k.guard_namespace.as_str(), k.guard_name.as_str()))
                && !wanted.contains(k)
        });
        for (node, key, why) in self.remove_all(&endpoints, stale).await {
            let plan = plans
                .iter_mut()
                .find(|p| p.gref.namespace == key.guard_namespace && p.gref.name == key.guard_name);
            if let Some(plan) = plan {
                let msg = format!("pod {} on node {node}: {why}", key.pod_uid);
                plan.problems.add("LiftFailed", msg);
            }
        }

        // Made before they are polled: a closure over `Plan<'_>` in the stream is not
        // general enough for the controller's Send bound.
        let reports: Vec<_> = plans
            .into_iter()
            .zip(outcomes)
            .zip(live)
            .filter_map(|(report, live)| live.then_some(report))
            .map(|(plan, outcomes)| self.report(plan, outcomes))
            .collect();
        let reports: Vec<Result<(), Error>> = stream::iter(reports)
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        reports.into_iter().collect()
    }

    /// Sends one node's agent what it lacks, in batched calls; each item's outcome.
    async fn push(
        &self,
        endpoints: &BTreeMap<String, String>,
        node: String,
        items: Vec<(usize, Key, ApplyGuardRequest)>,
    ) -> Vec<(usize, Reached, Outcome)> {
        let addr = &endpoints[&node];
        let (meta, reqs): (Vec<(usize, Key, String)>, Vec<ApplyGuardRequest>) = items
            .into_iter()
            .map(|(i, key, r)| {
                let pod = r.pod.as_ref().map(|p| p.name.clone()).unwrap_or_default();
                ((i, key, pod), r)
            })
            .unzip();
        let results = self.agents.apply_many(addr, reqs).await;
        meta.into_iter()
            .zip(results)
            .map(|((i, key, pod), result)| {
                let outcome = match result {
                    Ok(status) => {
                        self.metrics.guards_pushed.inc();
                        let status = Arc::new(status);
                        self.hold(&node, key, Some(status.clone()));
                        Ok(status)
                    }
                    Err(ItemFailure::Refused(e)) => {
                        self.metrics.errors.with_label_values(&["apply"]).inc();
                        Err((
                            "ApplyFailed",
                            format!("pod {pod}: agent {addr}: {}", e.message),
                        ))
                    }
                    Err(ItemFailure::Call(e)) => {
                        let (kind, reason) = if e.unreachable() {
                            ("agent_unreachable", "AgentUnreachable")
                        } else {
                            ("apply", "ApplyFailed")
                        };
                        self.metrics.errors.with_label_values(&[kind]).inc();
                        Err((reason, format!("pod {pod}: {e}")))
                    }
                };
                let at = Reached {
                    node: node.clone(),
                    pod,
                };
                (i, at, outcome)
            })
            .collect()
    }

    /// One guard's status from its pods' outcomes.
    async fn report(&self, plan: Plan<'_>, outcomes: Vec<(Reached, Outcome)>) -> Result<(), Error> {
        let mut problems = plan.problems;
        let mut guarded = 0;
        let mut pending = 0;
        let mut denials = Denials::default();
        for (
            Reached {
                node,
                pod: pod_name,
            },
            result,
        ) in &outcomes
        {
            match result {
                Err((reason, message)) => problems.add(reason, message.clone()),
                Ok(status) => {
                    let pod = PodDenials::of(status, pod_name, chrono::Utc::now());
                    if let Some(due) = self.denial_events.due(
                        &plan.gref.uid,
                        pod_name,
                        &pod,
                        std::time::Instant::now(),
                    ) {
                        denials.due.push(due);
                    }
                    denials.total.add(pod);
                    for w in &status.warnings {
                        problems.add("UnsupportedEvent", format!("{w} on node {node}"));
                    }
                    let mut all = !status.containers.is_empty();
                    for c in &status.containers {
                        if c.phase == ContainerPhase::Failed as i32 {
                            problems.add(
                                "ContainerFailed",
                                format!(
                                    "pod {pod_name} container {} on node {node}: {}",
                                    c.container_id, c.reason
                                ),
                            );
                        }
                        all &= c.phase == ContainerPhase::Enforced as i32;
                    }
                    if all {
                        guarded += 1;
                    } else {
                        pending += 1;
                    }
                }
            }
        }
        for msgs in problems.0.values_mut() {
            msgs.sort();
            msgs.dedup();
        }
        let due = std::mem::take(&mut denials.due);
        let tally = Tally {
            guarded,
            pending,
            selected: outcomes.len(),
            denials,
        };
        let updated = self
            .update_status(plan.guard, tally, &problems, plan.mode)
            .await;
        for due in due {
            if !self.event(plan.guard, "Denied", &due.note).await {
                self.denial_events.unsent(due);
            }
        }
        updated
    }

    /// Removes what `removals` name from the agents that hold it, one batched call per node;
    /// each only if the agent holds it under the same guard UID. What could not be removed:
    /// (node, key, why).
    async fn remove_all(
        &self,
        endpoints: &BTreeMap<String, String>,
        removals: Vec<(String, Removal)>,
    ) -> Vec<(String, Key, String)> {
        let mut by_node: BTreeMap<String, Vec<Removal>> = BTreeMap::new();
        for (node, r) in removals {
            by_node.entry(node).or_default().push(r);
        }
        stream::iter(by_node)
            .map(|(node, items)| async move {
                let keys: Vec<Key> = items.iter().filter_map(|r| r.key.as_ref()).map(Key::from).collect();
                let Some(addr) = endpoints.get(&node) else {
                    // The agent is gone; whatever it held went with it.
                    for key in keys {
                        self.hold(&node, key, None);
                    }
                    return Vec::new();
                };
                let uids: Vec<String> = items.iter().map(|r| r.guard_uid.clone()).collect();
                match self.agents.remove_many(addr, items).await {
                    Ok(_) => {
                        for (key, uid) in keys.into_iter().zip(uids) {
                            tracing::info!(node, guard = %key.guard_name, namespace = %key.guard_namespace, pod = %key.pod_uid, "guard lifted");
                            // Unless what is remembered there since is another guard UID's.
                            let current = self.held(&node, &key).is_some_and(|s| s.guard_uid == uid);
                            if current {
                                self.hold(&node, key, None);
                            }
                        }
                        Vec::new()
                    }
                    Err(e) => {
                        self.metrics.errors.with_label_values(&["remove"]).inc();
                        tracing::warn!(node, error = %e, "lifting guards");
                        let why = e.to_string();
                        keys.into_iter().map(|k| (node.clone(), k, why.clone())).collect()
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .flat_map(stream::iter)
            .collect()
            .await
    }

    /// The guards a change of `pod` can concern: those of its namespace whose selector
    /// picks it now, and those an agent holds on it (which it may have left).
    pub fn guards_touched_by(&self, pod: &PodView) -> Vec<ObjectRef<JanusGuard>> {
        let uid = pod.node_uid().unwrap_or_default();
        let holders: BTreeSet<(String, String)> = self
            .held_where(|k, _| k.pod_uid == uid)
            .into_iter()
            .filter_map(|(_, r)| r.key)
            .map(|k| (k.guard_namespace, k.guard_name))
            .collect();
        self.guards
            .state()
            .iter()
            .filter(|g| g.namespace() == pod.namespace())
            .filter(|g| {
                index::selector_of(g).is_some_and(|s| s.matches(pod.labels()))
                    || holders.contains(&(g.namespace().unwrap_or_default(), g.name_any()))
            })
            .map(|g| ObjectRef::from_obj(&**g))
            .collect()
    }

    /// Lifts a guard the API server just deleted from every agent that holds it, at once
    /// rather than at the next periodic pass. Only what carries the deleted guard's UID:
    /// a guard created again under its name may already be pushed. What the controller
    /// does not know to be held (it restarted since) the periodic pass lifts.
    pub async fn lift_deleted(&self, guard: &JanusGuard) {
        let (ns, name) = (guard.namespace().unwrap_or_default(), guard.name_any());
        let uid = guard.uid().unwrap_or_default();
        let keys = self.held_where(|k, s| {
            k.guard_namespace == ns && k.guard_name == name && s.guard_uid == uid
        });
        self.written.lock().expect("written lock").remove(&uid);
        tracing::info!(namespace = %ns, guard = %name, pods = keys.len(), "guard deleted: lifting it");
        let endpoints = discover(self.slices.state().iter().map(|s| &**s));
        self.remove_all(&endpoints, keys).await;
    }

    /// Lists every agent, removes what no guard wants, and syncs every guard.
    pub async fn sync_all(&self) -> Result<(), Error> {
        let endpoints = discover(self.slices.state().iter().map(|s| &**s));
        self.metrics.agents.set(endpoints.len() as i64);
        let known: Vec<(String, String, Option<String>)> = {
            let h = self.holdings.lock().expect("holdings lock");
            endpoints
                .iter()
                .map(|(node, addr)| {
                    let digest = h.get(node).and_then(|n| n.digest.clone());
                    (node.clone(), addr.clone(), digest)
                })
                .collect()
        };
        let listed: Vec<(String, Result<Listing, String>)> = stream::iter(known)
            .map(|(node, addr, digest)| async move {
                let listed = self.agents.list(&addr, digest.as_deref()).await;
                (node, listed.map_err(|e| e.to_string()))
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut reachable = 0;
        {
            let mut h = self.holdings.lock().expect("holdings lock");
            h.retain(|node, _| endpoints.contains_key(node));
            for (node, result) in listed {
                match result {
                    // What is remembered is still what the agent holds.
                    Ok(Listing::Unchanged) => reachable += 1,
                    Ok(Listing::Full { guards, digest }) => {
                        reachable += 1;
                        let held = guards
                            .into_iter()
                            .filter_map(|mut s| Some((s.key.take()?.into(), Arc::new(s))))
                            .collect();
                        h.insert(node, NodeHoldings { digest, held });
                    }
                    Err(e) => {
                        self.metrics
                            .errors
                            .with_label_values(&["agent_unreachable"])
                            .inc();
                        tracing::warn!(node, error = %e, "listing an agent's guards");
                        h.remove(&node);
                    }
                }
            }
        }
        self.metrics.agents_reachable.set(reachable);
        let state = self.guards.state();
        let guards: Vec<&JanusGuard> = state.iter().map(|g| &**g).collect();
        let existing: BTreeSet<(&str, &str)> = guards
            .iter()
            .map(|g| {
                (
                    g.metadata.namespace.as_deref().unwrap_or_default(),
                    g.metadata.name.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        let uids: BTreeSet<String> = guards.iter().filter_map(|g| g.uid()).collect();
        self.written
            .lock()
            .expect("written lock")
            .retain(|uid, _| uids.contains(uid));
        // Denial windows of pods that still exist, under guards that still exist (a guard's
        // pods are in its namespace).
        let namespace_of: BTreeMap<String, &str> = guards
            .iter()
            .filter_map(|g| Some((g.uid()?, g.metadata.namespace.as_deref()?)))
            .collect();
        let pods = self.pods.state();
        let pods: BTreeSet<(&str, &str)> = pods
            .iter()
            .filter_map(|p| {
                Some((
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?,
                ))
            })
            .collect();
        self.denial_events.retain(|g, p| {
            namespace_of
                .get(g)
                .is_some_and(|ns| pods.contains(&(*ns, p)))
        });
        let orphans = self.held_where(|k, _| {
            !existing.contains(&(k.guard_namespace.as_str(), k.guard_name.as_str()))
        });
        self.remove_all(&endpoints, orphans).await;
        self.sync_guards(&guards).await
    }

    async fn update_status(
        &self,
        guard: &JanusGuard,
        tally: Tally,
        problems: &Problems,
        mode: Option<&str>,
    ) -> Result<(), Error> {
        let Tally {
            guarded,
            pending,
            selected,
            denials,
        } = tally;
        let uid = guard.uid().unwrap_or_default();
        // The store's copy, unless it is still the one this controller last wrote over:
        // then what it wrote. A status anyone else wrote since is the store's, and is
        // corrected if it differs.
        let rv = guard.meta().resource_version.clone();
        let written = self
            .written
            .lock()
            .expect("written lock")
            .get(&uid)
            .cloned();
        let old = match written {
            Some((over, status)) if over == rv => status,
            _ => guard.status.clone().unwrap_or_default(),
        };
        let now = chrono_now();
        let condition = |type_: &str, status: bool, reason: &str, message: String| {
            let status = if status { "True" } else { "False" }.to_owned();
            let since = old
                .conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: type_.into(),
                status,
                reason: reason.into(),
                message,
                last_transition_time: since,
            }
        };
        let degraded = match problems.0.iter().next() {
            Some((reason, _)) => condition("Degraded", true, reason, problems.summary()),
            None => condition("Degraded", false, "AsExpected", String::new()),
        };
        let failed = selected - guarded as usize - pending;
        let ready = if problems.0.contains_key("InvalidSpec") {
            condition(
                "Ready",
                false,
                "InvalidSpec",
                "the guard is not valid".into(),
            )
        } else if guarded as usize == selected {
            condition(
                "Ready",
                true,
                "Guarded",
                format!("{guarded} of {selected} selected pods guarded"),
            )
        } else {
            condition(
                "Ready",
                false,
                if failed > 0 { "Failed" } else { "Pending" },
                format!("{guarded} of {selected} selected pods guarded"),
            )
        };
        let status = JanusGuardStatus {
            conditions: vec![ready, degraded.clone()],
            pods_guarded: guarded,
            observed_generation: guard.meta().generation,
            mode: mode.map(str::to_owned),
            denials: Some(i64::try_from(denials.total.count).unwrap_or(i64::MAX))
                .filter(|n| *n > 0),
            last_denial: denials.total.last,
        };
        if status == old {
            return Ok(());
        }
        let ns = guard.namespace().unwrap_or_default();
        let name = guard.name_any();
        let api: Api<JanusGuard> = Api::namespaced(self.client.clone(), &ns);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .map_err(|e| Error::Status(format!("{ns}/{name}"), e))?;
        self.written
            .lock()
            .expect("written lock")
            .insert(uid, (rv, status.clone()));
        let was_degraded = old
            .conditions
            .iter()
            .find(|c| c.type_ == "Degraded")
            .map(|c| (c.status.as_str(), c.message.as_str()));
        if degraded.status == "True" && was_degraded != Some(("True", degraded.message.as_str())) {
            self.event(guard, &degraded.reason, &degraded.message).await;
        }
        Ok(())
    }

    /// A Warning Event on the guard (one per reason and note: the API server counts
    /// repeats); failing to record one is logged, not fatal.
    /// Records an Event on `guard`; whether the API server took it.
    async fn event(&self, guard: &JanusGuard, reason: &str, note: &str) -> bool {
        use kube::runtime::events::{Event, EventType, Recorder, Reporter};
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: "janus-controller".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(crate::denials::cut(note, 1024)),
            action: "Reconcile".into(),
            secondary: None,
        };
        let published = recorder.publish(&event, &guard.object_ref(&())).await;
        if let Err(e) = &published {
            tracing::warn!(error = %e, "recording an event");
        }
        published.is_ok()
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
