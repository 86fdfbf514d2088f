//! What each node's start gate waits for: every pod bound to the node that has not
//! finished, with the guards that select it, or none. A container of a pod its agent has
//! no word on waits for the word rather than starting unguarded; one whose pod has no
//! guard starts at once.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use janus_api::agent_v1::{BoundPod, SetPodsRequest};
use janus_api::GuardPolicy;
use kube::ResourceExt;
use prost::Message;

use crate::agents::discover;
use crate::reconcile::{policy_of, Core};

/// What each node's agent was last told, by its digest: a pod event tells again only the
/// agents whose word it changed.
#[derive(Default)]
pub struct Told(std::sync::Mutex<BTreeMap<String, Vec<u8>>>);

/// The label a namespace sets its guards' start gate failure mode with, where a guard does
/// not set `onGateFailure`: `failClosed` or `failOpen`.
pub const NAMESPACE_LABEL: &str = "janus.clustergarage.io/on-gate-failure";

/// Each namespace's `on-gate-failure` label, read: whether its guards let a container start
/// when the gate fails; by namespace.
#[derive(Default)]
pub struct NamespaceModes(std::sync::Mutex<BTreeMap<String, bool>>);

/// Of two pods a node knows by one UID (a static pod's mirror, or an object that claims
/// to be one), what the gate waits for: every guard of both, failing open only if both do.
/// Guards of another namespace are not this one's: the first with guards keeps its own.
fn stricter(a: BoundPod, b: BoundPod) -> BoundPod {
    let (mut a, b) = match a.guards.is_empty() {
        true => (b, a),
        false => (a, b),
    };
    if a.namespace == b.namespace {
        a.guards.extend(b.guards);
        a.guards.sort();
        a.guards.dedup();
    }
    a.start_on_failure &= b.start_on_failure;
    a
}

/// How many agents are told at once.
const CONCURRENCY: usize = 32;

impl Core {
    /// Takes namespace `ns`'s labels (None: it is gone); true if its mode changed. A label
    /// that is neither mode is failClosed, and logged.
    pub fn set_namespace(&self, ns: &str, labels: Option<&BTreeMap<String, String>>) -> bool {
        let mode = labels.and_then(|l| l.get(NAMESPACE_LABEL)).map(|v| {
            janus_api::policy::gate_failure(v).unwrap_or_else(|e| {
                tracing::warn!(
                    namespace = ns,
                    label = NAMESPACE_LABEL,
                    "{e}; taken as failClosed"
                );
                false
            })
        });
        let mut modes = self.namespace_modes.0.lock().expect("modes lock");
        let old = match mode {
            Some(m) => modes.insert(ns.to_owned(), m),
            None => modes.remove(ns),
        };
        old != mode
    }

    /// Each node's bound pods with their guards, and the namespaces with a guard that fails
    /// closed (where a pod the agent has no word on does not start).
    fn words(&self) -> (BTreeMap<String, Vec<BoundPod>>, Vec<String>) {
        let policies: Vec<GuardPolicy> = self
            .guards
            .state()
            .iter()
            .filter_map(|g| policy_of(g).ok())
            .collect();
        let mut guards_of: BTreeMap<String, Vec<&GuardPolicy>> = BTreeMap::new();
        {
            let mut index = self.index.lock().expect("index lock");
            index.sync(&self.pods.state());
            for p in &policies {
                for pod in index.selected(&p.namespace, &p.selector) {
                    let uid = pod.uid().unwrap_or_default();
                    guards_of.entry(uid).or_default().push(p);
                }
            }
        }
        // A guard's own mode, else its namespace's, else closed.
        let modes = self.namespace_modes.0.lock().expect("modes lock").clone();
        let opens = |p: &GuardPolicy| {
            p.start_on_gate_failure
                .or_else(|| modes.get(&p.namespace).copied())
                .unwrap_or(false)
        };
        let closed: BTreeSet<String> = policies
            .iter()
            .filter(|p| !opens(p))
            .map(|p| p.namespace.clone())
            .chain(
                modes
                    .iter()
                    .filter(|(_, open)| !**open)
                    .map(|(ns, _)| ns.clone()),
            )
            .collect();
        // By node, then by the UID the node knows each pod by.
        let mut words: BTreeMap<String, BTreeMap<String, BoundPod>> = BTreeMap::new();
        for pod in self.pods.state() {
            let (Some(node), Some(uid)) = (pod.node(), pod.node_uid()) else {
                continue;
            };
            if pod.finished() {
                continue;
            }
            let guards = guards_of.remove(&pod.uid().unwrap_or_default());
            let guards = guards.unwrap_or_default();
            let bound = BoundPod {
                start_on_failure: guards.iter().all(|p| opens(p)),
                guards: guards.iter().map(|p| p.name.clone()).collect(),
                uid: uid.clone(),
                namespace: pod.namespace().unwrap_or_default(),
                name: pod.name_any(),
            };
            let pods = words.entry(node.to_owned()).or_default();
            match pods.remove(&uid) {
                Some(other) => pods.insert(uid, stricter(other, bound)),
                None => pods.insert(uid, bound),
            };
        }
        let words = words
            .into_iter()
            .map(|(node, pods)| (node, pods.into_values().collect()))
            .collect();
        (words, closed.into_iter().collect())
    }

    /// Tells each agent its node's word: every one when `again`, else those whose word
    /// changed since they were last told.
    pub async fn tell_agents(&self, again: bool) {
        // One telling at a time: a word computed earlier never reaches an agent after one
        // computed later.
        let _one = self.telling.lock().await;
        let endpoints = discover(self.slices.state().iter().map(|s| &**s));
        let (mut words, closed) = self.words();
        let sends: Vec<(String, String, SetPodsRequest, Vec<u8>)> = {
            let told = self.told.0.lock().expect("told lock");
            endpoints
                .into_iter()
                .filter_map(|(node, addr)| {
                    let word = SetPodsRequest {
                        pods: words.remove(&node).unwrap_or_default(),
                        closed_namespaces: closed.clone(),
                        node: node.clone(),
                    };
                    let digest = word.encode_to_vec();
                    let same = told.get(&node) == Some(&digest);
                    (again || !same).then_some((node, addr, word, digest))
                })
                .collect()
        };
        stream::iter(sends)
            .for_each_concurrent(CONCURRENCY, |(node, addr, word, digest)| async move {
                let mut told = match self.agents.set_pods(&addr, word).await {
                    Ok(()) => Some(digest),
                    Err(e) => {
                        self.metrics.errors.with_label_values(&["set_pods"]).inc();
                        tracing::warn!(node, error = %e, "telling an agent its node's pods");
                        None
                    }
                };
                let mut all = self.told.0.lock().expect("told lock");
                match told.take() {
                    Some(d) => all.insert(node, d),
                    None => all.remove(&node),
                };
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(namespace: &str, guards: &[&str], open: bool) -> BoundPod {
        BoundPod {
            uid: "u".into(),
            namespace: namespace.into(),
            name: "p".into(),
            guards: guards.iter().map(|g| g.to_string()).collect(),
            start_on_failure: open,
        }
    }

    /// A pod that claims another's UID can add to what its start waits for, never take away.
    #[test]
    fn two_pods_known_by_one_uid_wait_for_the_guards_of_both() {
        let claim = bound("other", &[], true);
        let victim = bound("team", &["web"], false);
        for (a, b) in [(claim.clone(), victim.clone()), (victim.clone(), claim)] {
            let both = stricter(a, b);
            assert_eq!(
                (both.namespace.as_str(), both.guards.as_slice()),
                ("team", &["web".to_string()][..])
            );
            assert!(!both.start_on_failure);
        }
        let same = stricter(bound("team", &["db"], true), victim);
        assert_eq!(same.guards, ["db", "web"]);
        assert!(!same.start_on_failure);
    }
}
