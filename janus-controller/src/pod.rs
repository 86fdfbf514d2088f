//! The part of a Pod the controller reads, and all its watch keeps: the node, the phase, the
//! labels and the container IDs. kube's `Pod` is about 6 KiB however few fields are set;
//! with 20,000 pods in the store that alone passed 120 MiB.

use std::borrow::Cow;

use janus_api::holding::MAX_CONTAINERS;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PodView {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodViewSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PodViewStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_container_statuses: Vec<ContainerView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ephemeral_container_statuses: Vec<ContainerView>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ContainerStateView>,
}

/// Whether a container has ended: only that is kept of its state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerStateView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<Ended>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ended {}

/// The annotation a static pod's mirror carries the kubelet's UID of the pod in.
pub const MIRROR: &str = "kubernetes.io/config.mirror";

impl PodView {
    /// The node it is bound to, once the scheduler placed it.
    pub fn node(&self) -> Option<&str> {
        self.spec.as_ref()?.node_name.as_deref()
    }

    /// Whether all its containers ended for good: nothing of it runs or starts again.
    pub fn finished(&self) -> bool {
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        matches!(phase, Some("Succeeded" | "Failed"))
    }

    /// The IDs of its containers that have one and have not ended (init, app, then
    /// ephemeral), in the order of its status, at most [`MAX_CONTAINERS`] (an agent guards
    /// the rest as it finds them in the pod's cgroup). An init container that completed, or
    /// an ephemeral one that exited, keeps its ID in the status but has nothing to guard.
    pub fn container_ids(&self) -> impl Iterator<Item = &str> {
        self.status
            .iter()
            .flat_map(|s| {
                [
                    &s.init_container_statuses,
                    &s.container_statuses,
                    &s.ephemeral_container_statuses,
                ]
            })
            .flatten()
            .filter(|c| c.state.as_ref().is_none_or(|s| s.terminated.is_none()))
            .filter_map(|c| c.container_id.as_deref())
            .filter(|id| !id.is_empty())
            .take(MAX_CONTAINERS)
    }

    /// Drops what the watch delivers but nothing reads: managed fields and annotations can
    /// be most of a pod's metadata.
    pub fn trim(&mut self) {
        self.metadata.managed_fields = None;
        // A mirror is owned by its node: any other pod's claim to be one is not read.
        let node = self.node().map(str::to_owned);
        let mirror =
            self.metadata.owner_references.iter().flatten().any(|o| {
                o.kind == "Node" && o.api_version == "v1" && Some(&o.name) == node.as_ref()
            });
        let annotations = self.metadata.annotations.take().map(|mut a| {
            a.retain(|k, _| mirror && k == MIRROR);
            a
        });
        self.metadata.annotations = annotations.filter(|a| !a.is_empty());
        self.metadata.owner_references = None;
    }

    /// The UID its node's kubelet and runtime know it by (its cgroup's, the CRI's): a static
    /// pod's mirror in the API has a UID of its own and carries the kubelet's in
    /// [`MIRROR`]; any other pod, its own.
    pub fn node_uid(&self) -> Option<String> {
        let mirror = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIRROR));
        mirror.cloned().or_else(|| self.metadata.uid.clone())
    }
}

impl kube::Resource for PodView {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ephemeral containers can only be added to a pod: however many it has, the request
    /// stays within what an agent accepts, and the agent adopts the rest.
    #[test]
    fn at_most_max_containers_are_sent() {
        let ephemeral: Vec<_> = (0..MAX_CONTAINERS + 50)
            .map(|i| serde_json::json!({"containerID": format!("containerd://e{i}")}))
            .collect();
        let pod: PodView = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"ephemeralContainerStatuses": ephemeral},
        }))
        .unwrap();
        assert_eq!(pod.container_ids().count(), MAX_CONTAINERS);
    }

    #[test]
    fn a_static_pod_is_known_on_its_node_by_its_mirrors_annotation() {
        let mirror = serde_json::json!({
            "metadata": {"name": "etcd-node-a", "uid": "api-uid",
                         "annotations": {MIRROR: "0123abcd", "kubernetes.io/config.hash": "0123abcd", "big": "x"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "n"}]},
            "spec": {"nodeName": "node-a"},
        });
        // Any other pod may carry the annotation: not owned by its node, it is not read.
        let mut claim = mirror.clone();
        claim["metadata"]["ownerReferences"][0]["name"] = "node-b".into();
        let mut claim: PodView = serde_json::from_value(claim).unwrap();
        claim.trim();
        assert_eq!(claim.node_uid().as_deref(), Some("api-uid"));
        let mut pod: PodView = serde_json::from_value(mirror).unwrap();
        pod.trim();
        assert_eq!(pod.node_uid().as_deref(), Some("0123abcd"));
        assert_eq!(pod.metadata.annotations.as_ref().unwrap().len(), 1);
        pod.metadata.annotations = None;
        assert_eq!(pod.node_uid().as_deref(), Some("api-uid"));
    }

    #[test]
    fn a_pod_reads_into_the_view_and_the_rest_is_dropped() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "a", "uid": "u1", "labels": {"app": "web"},
                         "annotations": {"big": "x"}, "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "node-a", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "containerStatuses": [{"name": "c", "containerID": "containerd://abc",
                                              "image": "busybox", "imageID": "", "ready": true,
                                              "restartCount": 0}]},
        });
        let mut pod: PodView = serde_json::from_value(json).unwrap();
        pod.trim();
        assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("node-a"));
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(
            status.container_statuses[0].container_id.as_deref(),
            Some("containerd://abc")
        );
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        assert_eq!(pod.metadata.labels.unwrap()["app"], "web");
    }

    #[test]
    fn its_api_path_is_the_pods() {
        use kube::Resource;
        assert_eq!(
            PodView::url_path(&(), Some("a")),
            "/api/v1/namespaces/a/pods"
        );
        assert_eq!(PodView::api_version(&()), "v1");
    }
}
