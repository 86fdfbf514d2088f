//! Which pods a guard's selector can pick, found through an index by namespace and label
//! instead of matching every selector against every pod; and which guards a pod event
//! touches.

use std::collections::HashMap;
use std::sync::Arc;

use crate::pod::PodView;
use janus_api::policy::Selector;
use kube::ResourceExt;

use crate::crd::JanusGuard;

/// The pods of one listing, by namespace and by `(namespace, label, value)`.
pub struct PodIndex<'a> {
    by_namespace: HashMap<&'a str, Vec<&'a PodView>>,
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a PodView>>,
}

impl<'a> PodIndex<'a> {
    pub fn new(pods: &'a [Arc<PodView>]) -> PodIndex<'a> {
        let mut index = PodIndex {
            by_namespace: HashMap::new(),
            by_label: HashMap::new(),
        };
        for pod in pods {
            let Some(ns) = pod.metadata.namespace.as_deref() else {
                continue;
            };
            index.by_namespace.entry(ns).or_default().push(pod);
            for (k, v) in pod.labels() {
                index
                    .by_label
                    .entry((ns, k.as_str(), v.as_str()))
                    .or_default()
                    .push(pod);
            }
        }
        index
    }

    /// The pods of `namespace` that `selector` selects: those of its rarest `matchLabels`
    /// pair, checked against the whole selector; every pod of the namespace when it names
    /// no label.
    pub fn selected(&self, namespace: &str, selector: &Selector) -> Vec<&'a PodView> {
        let candidates = selector
            .match_labels
            .iter()
            .map(|(k, v)| {
                self.by_label
                    .get(&(namespace, k.as_str(), v.as_str()))
                    .map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|pods| pods.len())
            .unwrap_or_else(|| {
                self.by_namespace
                    .get(namespace)
                    .map_or(&[][..], Vec::as_slice)
            });
        candidates
            .iter()
            .copied()
            .filter(|p| selector.matches(p.labels()))
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
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Arc::new(p)
    }

    fn names(pods: Vec<&PodView>) -> Vec<String> {
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
        let index = PodIndex::new(&pods);
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
}
