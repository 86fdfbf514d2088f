//! Which pods a guard's selector can pick, found through an index by namespace and label
//! instead of matching every selector against every pod; and which guards a pod event
//! touches.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::pod::PodView;
use janus_api::policy::Selector;
use kube::ResourceExt;

use crate::crd::JanusGuard;

/// The pods of the store by namespace and by `(namespace, label, value)`, kept in step with
/// it by [`PodIndex::sync`]: a pod event syncs one guard, which must not cost an index of
/// every pod built again.
#[derive(Default)]
pub struct PodIndex {
    /// By UID: the pod as indexed (the store's own `Arc`, so a changed pod is a new one),
    /// and the sync that last saw it.
    pods: HashMap<String, (Arc<PodView>, u64)>,
    by_namespace: HashMap<String, HashSet<String>>,
    by_label: HashMap<(String, String, String), HashSet<String>>,
    syncs: u64,
}

impl PodIndex {
    /// Brings the index to `pods`, the store's state: indexes the pods that are new or
    /// changed since the last sync and drops those gone.
    pub fn sync(&mut self, pods: &[Arc<PodView>]) {
        self.syncs += 1;
        let now = self.syncs;
        let mut seen = 0;
        for pod in pods {
            let Some(uid) = pod.metadata.uid.as_deref() else {
                continue;
            };
            seen += 1;
            match self.pods.get_mut(uid) {
                Some((known, at)) if Arc::ptr_eq(known, pod) => *at = now,
                _ => {
                    if let Some((old, _)) = self.pods.insert(uid.to_owned(), (pod.clone(), now)) {
                        self.unindex(uid, &old);
                    }
                    self.index(uid, pod);
                }
            }
        }
        // Every pod indexed was seen (the usual case): none is gone.
        if self.pods.len() == seen {
            return;
        }
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, (_, seen))| *seen != now)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            if let Some((old, _)) = self.pods.remove(&uid) {
                self.unindex(&uid, &old);
            }
        }
    }

    fn index(&mut self, uid: &str, pod: &PodView) {
        let Some(ns) = pod.metadata.namespace.as_deref() else {
            return;
        };
        let ns_pods = self.by_namespace.entry(ns.to_owned()).or_default();
        ns_pods.insert(uid.to_owned());
        for (k, v) in pod.labels() {
            let key = (ns.to_owned(), k.clone(), v.clone());
            self.by_label.entry(key).or_default().insert(uid.to_owned());
        }
    }

    fn unindex(&mut self, uid: &str, pod: &PodView) {
        let Some(ns) = pod.metadata.namespace.as_deref() else {
            return;
        };
        if let Some(set) = self.by_namespace.get_mut(ns) {
            set.remove(uid);
            if set.is_empty() {
                self.by_namespace.remove(ns);
            }
        }
        for (k, v) in pod.labels() {
            let key = (ns.to_owned(), k.clone(), v.clone());
            if let Some(set) = self.by_label.get_mut(&key) {
                set.remove(uid);
                if set.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
    }

    /// The pods of `namespace` that `selector` selects: those of its rarest `matchLabels`
    /// pair, checked against the whole selector; every pod of the namespace when it names
    /// no label.
    pub fn selected(&self, namespace: &str, selector: &Selector) -> Vec<Arc<PodView>> {
        let empty = HashSet::new();
        let candidates = selector
            .match_labels
            .iter()
            .map(|(k, v)| {
                let key = (namespace.to_owned(), k.clone(), v.clone());
                self.by_label.get(&key).unwrap_or(&empty)
            })
            .min_by_key(|uids| uids.len())
            .unwrap_or_else(|| self.by_namespace.get(namespace).unwrap_or(&empty));
        candidates
            .iter()
            .filter_map(|uid| self.pods.get(uid))
            .map(|(pod, _)| pod)
            .filter(|p| selector.matches(p.labels()))
            .cloned()
            .collect()
    }
}

/// The selector of a stored guard, if it has a valid one. Made field by field: a pod event
/// asks it of every guard of the pod's namespace.
pub fn selector_of(guard: &JanusGuard) -> Option<Selector> {
    use crate::crd::Operator;
    let raw = guard.spec.selector.as_ref()?;
    let raw = janus_api::guard::LabelSelector {
        match_labels: raw.match_labels.clone(),
        match_expressions: raw
            .match_expressions
            .iter()
            .map(|r| janus_api::guard::LabelSelectorRequirement {
                key: r.key.clone(),
                operator: match r.operator {
                    Operator::In => "In",
                    Operator::NotIn => "NotIn",
                    Operator::Exists => "Exists",
                    Operator::DoesNotExist => "DoesNotExist",
                }
                .to_owned(),
                values: r.values.clone(),
            })
            .collect(),
    };
    Selector::from_raw(&raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Arc<PodView> {
        let mut p = PodView::default();
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("{ns}/{name}"));
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Arc::new(p)
    }

    fn names(pods: Vec<Arc<PodView>>) -> Vec<String> {
        let mut v: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_index_selects_what_matching_every_pod_selects() {
        let pods = vec![
            pod("a", "web-1", &[("app", "web"), ("tier", "front")]),
            pod("a", "web-2", &[("app", "web"), ("tier", "canary")]),
            pod("a", "db", &[("app", "db")]),
            pod("b", "web-3", &[("app", "web")]),
        ];
        let mut index = PodIndex::default();
        index.sync(&pods);
        let labels = |pairs: &[(&str, &str)]| Selector {
            match_labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            match_expressions: Vec::new(),
        };
        assert_eq!(
            names(index.selected("a", &labels(&[("app", "web")]))),
            ["web-1", "web-2"]
        );
        assert_eq!(
            names(index.selected("a", &labels(&[("app", "web"), ("tier", "canary")]))),
            ["web-2"]
        );
        assert_eq!(
            names(index.selected("a", &labels(&[("app", "none")]))),
            Vec::<String>::new()
        );
        // `{}`: every pod of the namespace, and only of it.
        assert_eq!(
            names(index.selected("a", &Selector::default())),
            ["db", "web-1", "web-2"]
        );
        let not_canary = Selector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![janus_api::policy::Requirement::NotIn(
                "tier".into(),
                vec!["canary".into()],
            )],
        };
        assert_eq!(names(index.selected("a", &not_canary)), ["db", "web-1"]);
    }

    #[test]
    fn a_sync_follows_relabels_deletions_and_new_pods() {
        let web = Selector {
            match_labels: [("app".to_owned(), "web".to_owned())].into(),
            match_expressions: Vec::new(),
        };
        let mut pods = vec![
            pod("a", "web-1", &[("app", "web")]),
            pod("a", "web-2", &[("app", "web")]),
        ];
        let mut index = PodIndex::default();
        index.sync(&pods);
        assert_eq!(names(index.selected("a", &web)), ["web-1", "web-2"]);
        // web-1 relabelled (a new object under the same UID), web-2 gone, web-3 new.
        pods[0] = pod("a", "web-1", &[("app", "db")]);
        pods[1] = pod("a", "web-3", &[("app", "web")]);
        index.sync(&pods);
        assert_eq!(names(index.selected("a", &web)), ["web-3"]);
        assert_eq!(
            names(index.selected("a", &Selector::default())),
            ["web-1", "web-3"]
        );
        // Nothing left of what is gone.
        index.sync(&[]);
        assert!(index.by_label.is_empty() && index.by_namespace.is_empty());
        assert!(index.pods.is_empty());
    }
}
