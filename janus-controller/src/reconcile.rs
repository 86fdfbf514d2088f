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

use futures::stream::{self, StreamExt};
use janus_api::agent_v1::{ApplyGuardRequest, ContainerPhase, GuardRef, GuardStatus, PodRef};
use janus_api::holding::{spec_digest, Holding, HoldingKey};
use janus_api::GuardPolicy;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};

use crate::agents::{discover, AgentPool};
use crate::crd::{Condition, JanusGuard, JanusGuardStatus};
use crate::metrics::Metrics;

type Key = HoldingKey;

/// How many agents are called at once.
const CONCURRENCY: usize = 32;

pub struct Core {
    pub client: kube::Client,
    pub guards: Store<JanusGuard>,
    pub pods: Store<Pod>,
    pub slices: Store<EndpointSlice>,
    pub agents: AgentPool,
    pub metrics: Arc<Metrics>,
    /// What each node's agent holds, as last listed or applied: node -> key -> status.
    holdings: Mutex<BTreeMap<String, BTreeMap<Key, GuardStatus>>>,
}

/// A running pod a guard selects, and what to send its node's agent.
struct Wanted {
    node: String,
    request: ApplyGuardRequest,
}

/// What one pod's agent answered, or why it did not: (Degraded reason, message).
type Outcome = Result<GuardStatus, (&'static str, String)>;

/// What went wrong for a guard, by reason, for its Degraded condition and Events.
#[derive(Debug, Default)]
struct Problems(BTreeMap<&'static str, Vec<String>>);

impl Problems {
    fn add(&mut self, reason: &'static str, message: String) {
        self.0.entry(reason).or_default().push(message);
    }
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
        pods: Store<Pod>,
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
        }
    }

    /// The running pods `guard` selects, with the request each node's agent should get.
    fn wanted(&self, guard: &JanusGuard, policy: &GuardPolicy) -> Vec<Wanted> {
        let ns = guard.namespace().unwrap_or_default();
        let spec_json = guard.spec.to_json();
        let digest = spec_digest(&spec_json);
        let gref = GuardRef {
            namespace: ns.clone(),
            name: guard.name_any(),
            uid: guard.uid().unwrap_or_default(),
            generation: guard.meta().generation.unwrap_or(0),
        };
        self.pods
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
            .filter(|p| p.meta().deletion_timestamp.is_none())
            .filter(|p| policy.selector.matches(p.labels()))
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                if status.phase.as_deref() != Some("Running") {
                    return None;
                }
                let node = p.spec.as_ref()?.node_name.clone()?;
                let container_ids: Vec<String> = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .filter_map(|c| c.container_id.clone())
                    .filter(|id| !id.is_empty())
                    .collect();
                Some(Wanted {
                    node,
                    request: ApplyGuardRequest {
                        guard: Some(gref.clone()),
                        pod: Some(PodRef {
                            uid: p.uid()?,
                            namespace: ns.clone(),
                            name: p.name_any(),
                            container_ids,
                        }),
                        spec_json: spec_json.clone(),
                        spec_digest: digest.clone(),
                    },
                })
            })
            .collect()
    }

    fn held(&self, node: &str, key: &Key) -> Option<GuardStatus> {
        self.holdings
            .lock()
            .expect("holdings lock")
            .get(node)
            .and_then(|h| h.get(key).cloned())
    }

    /// (node, key) of every guard an agent holds whose key satisfies `pred`.
    fn held_where(&self, pred: impl Fn(&Key) -> bool) -> Vec<(String, Key)> {
        self.holdings
            .lock()
            .expect("holdings lock")
            .iter()
            .flat_map(|(node, held)| {
                held.keys()
                    .filter(|k| pred(k))
                    .map(move |k| (node.clone(), k.clone()))
            })
            .collect()
    }

    fn hold(&self, node: &str, key: Key, status: Option<GuardStatus>) {
        let mut h = self.holdings.lock().expect("holdings lock");
        let node = h.entry(node.to_owned()).or_default();
        match status {
            Some(s) => node.insert(key, s),
            None => node.remove(&key),
        };
    }

    /// Pushes `guard` to the agents of its pods' nodes, lifts it from pods it no longer
    /// selects, and records the outcome in its status.
    pub async fn sync_guard(&self, guard: &JanusGuard) -> Result<(), Error> {
        let ns = guard.namespace().unwrap_or_default();
        let name = guard.name_any();
        let api_spec: Result<janus_api::JanusGuardSpec, _> =
            serde_json::from_str(&guard.spec.to_json());
        let policy = api_spec.map_err(|e| e.to_string()).and_then(|s| {
            GuardPolicy::from_spec(&name, &ns, &s).map_err(|errs| {
                errs.0
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        });
        let mut problems = Problems::default();
        let wanted = match &policy {
            Ok(p) => self.wanted(guard, p),
            Err(e) => {
                problems.add("InvalidSpec", e.clone());
                Vec::new()
            }
        };
        let endpoints = discover(self.slices.state().iter().map(|s| &**s));
        let key_of = |pod_uid: &str| HoldingKey {
            guard_namespace: ns.clone(),
            guard_name: name.clone(),
            pod_uid: pod_uid.to_owned(),
        };
        let wanted_keys: BTreeSet<Key> = wanted
            .iter()
            .map(|w| key_of(w.request.pod.as_ref().map_or("", |p| p.uid.as_str())))
            .collect();

        let results: Vec<(String, Key, Outcome)> = stream::iter(wanted)
            .map(|w| {
                let (endpoints, key_of) = (&endpoints, &key_of);
                async move {
                    let pod = w.request.pod.clone().unwrap_or_default();
                    let key = key_of(&pod.uid);
                    let Some(addr) = endpoints.get(&w.node) else {
                        return (
                            w.node.clone(),
                            key,
                            Err((
                                "AgentUnreachable",
                                format!("no agent found on node {}", w.node),
                            )),
                        );
                    };
                    // What the agent holds is repaired unless it is exactly what is wanted
                    // (the spec by its digest, whatever generation the agent reports).
                    if let Some(held) = self.held(&w.node, &key) {
                        if Holding::of_status(&held) == Holding::of_request(&w.request) {
                            return (w.node, key, Ok(held));
                        }
                    }
                    let result = self.agents.apply(addr, w.request).await;
                    match result {
                        Ok(status) => {
                            self.metrics.guards_pushed.inc();
                            self.hold(&w.node, key.clone(), Some(status.clone()));
                            (w.node, key, Ok(status))
                        }
                        Err(e) => {
                            let (kind, reason) = if e.unreachable() {
                                ("agent_unreachable", "AgentUnreachable")
                            } else {
                                ("apply", "ApplyFailed")
                            };
                            self.metrics.errors.with_label_values(&[kind]).inc();
                            let message = format!("pod {}: {e}", pod.name);
                            (w.node, key, Err((reason, message)))
                        }
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;

        // Lift the guard from pods it no longer selects, wherever an agent holds it.
        let stale = self.held_where(|k| {
            k.guard_namespace == ns && k.guard_name == name && !wanted_keys.contains(k)
        });
        self.remove_all(&endpoints, stale).await;

        let mut guarded = 0;
        let mut pending = 0;
        for (node, _, result) in &results {
            match result {
                Err((reason, message)) => problems.add(reason, message.clone()),
                Ok(status) => {
                    for w in &status.warnings {
                        problems.add("UnsupportedEvent", format!("{w} on node {node}"));
                    }
                    let mut all = !status.containers.is_empty();
                    for c in &status.containers {
                        if c.phase == ContainerPhase::Failed as i32 {
                            problems.add(
                                "ContainerFailed",
                                format!(
                                    "pod {} container {} on node {node}: {}",
                                    status.pod_name, c.container_id, c.reason
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
        // `mixed` when subjects override the guard's mode.
        let mode = policy
            .as_ref()
            .ok()
            .map(|p| p.mode().map_or("mixed", |m| m.name()));
        self.update_status(guard, guarded, pending, results.len(), &problems, mode)
            .await
    }

    async fn remove_all(&self, endpoints: &BTreeMap<String, String>, keys: Vec<(String, Key)>) {
        stream::iter(keys)
            .for_each_concurrent(CONCURRENCY, |(node, key)| async move {
                let Some(addr) = endpoints.get(&node) else {
                    // The agent is gone; whatever it held went with it.
                    self.hold(&node, key, None);
                    return;
                };
                match self.agents.remove(addr, (&key).into()).await {
                    Ok(_) => {
                        tracing::info!(node, guard = %key.guard_name, namespace = %key.guard_namespace, pod = %key.pod_uid, "guard lifted");
                        self.hold(&node, key, None);
                    }
                    Err(e) => {
                        self.metrics.errors.with_label_values(&["remove"]).inc();
                        tracing::warn!(node, error = %e, "lifting a guard");
                    }
                }
            })
            .await;
    }

    /// Lifts a guard the API server just deleted from every agent that holds it, at once
    /// rather than at the next periodic pass. Only what carries the deleted guard's UID:
    /// a guard created again under its name may already be pushed. What the controller
    /// does not know to be held (it restarted since) the periodic pass lifts.
    pub async fn lift_deleted(&self, guard: &JanusGuard) {
        let (ns, name) = (guard.namespace().unwrap_or_default(), guard.name_any());
        let uid = guard.uid().unwrap_or_default();
        let keys: Vec<(String, Key)> = {
            let h = self.holdings.lock().expect("holdings lock");
            h.iter()
                .flat_map(|(node, held)| {
                    held.iter()
                        .filter(|(k, s)| {
                            k.guard_namespace == ns && k.guard_name == name && s.guard_uid == uid
                        })
                        .map(move |(k, _)| (node.clone(), k.clone()))
                })
                .collect()
        };
        tracing::info!(namespace = %ns, guard = %name, pods = keys.len(), "guard deleted: lifting it");
        let endpoints = discover(self.slices.state().iter().map(|s| &**s));
        self.remove_all(&endpoints, keys).await;
    }

    /// Lists every agent, removes what no guard wants, and syncs every guard.
    pub async fn sync_all(&self) -> Result<(), Error> {
        let endpoints = discover(self.slices.state().iter().map(|s| &**s));
        self.metrics.agents.set(endpoints.len() as i64);
        let listed: Vec<(String, Result<Vec<GuardStatus>, String>)> =
            stream::iter(endpoints.clone())
                .map(|(node, addr)| async move {
                    let listed = self.agents.list(&addr).await.map_err(|e| e.to_string());
                    (node, listed)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut reachable = 0;
        {
            let mut h = self.holdings.lock().expect("holdings lock");
            h.retain(|node, _| endpoints.contains_key(node));
            for (node, result) in &listed {
                match result {
                    Ok(list) => {
                        reachable += 1;
                        h.insert(
                            node.clone(),
                            list.iter()
                                .filter_map(|s| Some((s.key.as_ref()?.into(), s.clone())))
                                .collect(),
                        );
                    }
                    Err(e) => {
                        self.metrics
                            .errors
                            .with_label_values(&["agent_unreachable"])
                            .inc();
                        tracing::warn!(node, error = %e, "listing an agent's guards");
                        h.remove(node);
                    }
                }
            }
        }
        self.metrics.agents_reachable.set(reachable);
        let guards = self.guards.state();
        let existing: BTreeSet<(String, String)> = guards
            .iter()
            .map(|g| (g.namespace().unwrap_or_default(), g.name_any()))
            .collect();
        let orphans = self
            .held_where(|k| !existing.contains(&(k.guard_namespace.clone(), k.guard_name.clone())));
        self.remove_all(&endpoints, orphans).await;
        let mut first_error = None;
        for g in guards {
            if let Err(e) = self.sync_guard(&g).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn update_status(
        &self,
        guard: &JanusGuard,
        guarded: i64,
        pending: usize,
        selected: usize,
        problems: &Problems,
        mode: Option<&str>,
    ) -> Result<(), Error> {
        let old = guard.status.clone().unwrap_or_default();
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
            Some((reason, _)) => condition(
                "Degraded",
                true,
                reason,
                problems
                    .0
                    .values()
                    .flatten()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
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

    /// A Warning Event on the guard; failing to record one is logged, not fatal.
    async fn event(&self, guard: &JanusGuard, reason: &str, note: &str) {
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
            note: Some(note.chars().take(1024).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &guard.object_ref(&())).await {
            tracing::warn!(error = %e, "recording an event");
        }
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
