//! What the controller's tests share: kube's mock API (tower-test) answering status patches
//! and Events, stores filled by hand, and object builders.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use janus_controller::crd::JanusGuard;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use serde_json::{json, Value};

/// A request the mock API received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Value,
}

/// The mock API server: every request is recorded; a status patch is merged into the guard
/// it names and the guard returned; anything else is echoed back.
pub struct MockApi {
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl MockApi {
    pub fn start() -> (kube::Client, MockApi) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let guards: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let path = parts.uri.path().to_owned();
                record.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path: path.clone(),
                    body: body.clone(),
                });
                let reply = if path.ends_with("/status") {
                    let name = path.rsplit('/').nth(1).unwrap().to_owned();
                    let mut g = guards.lock().unwrap();
                    let obj = g.entry(name.clone()).or_insert_with(|| {
                        json!({
                            "apiVersion": "januscontroller.clustergarage.io/v1alpha1",
                            "kind": "JanusGuard",
                            "metadata": {"name": name, "namespace": "default"},
                            "spec": {"subjects": [{"deny": ["/x"]}]},
                        })
                    });
                    obj["status"] = body["status"].clone();
                    obj.clone()
                } else {
                    body
                };
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
        });
        (kube::Client::new(service, "default"), MockApi { seen })
    }

    /// The status last patched onto guard `name`.
    pub fn status(&self, name: &str) -> Option<Value> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| {
                s.method == "PATCH" && s.path.ends_with(&format!("/janusguards/{name}/status"))
            })
            .map(|s| s.body["status"].clone())
    }

    pub fn condition(&self, name: &str, type_: &str) -> Option<Value> {
        let status = self.status(name)?;
        status["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    /// Events recorded, as (reason, note).
    pub fn events(&self) -> Vec<(String, String)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == "POST" && s.path.ends_with("/events"))
            .map(|s| {
                (
                    s.body["reason"].as_str().unwrap_or_default().to_owned(),
                    s.body["note"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

/// A store and its writer, filled by the test as a watcher would.
pub struct Stores {
    pub guards: (Store<JanusGuard>, Writer<JanusGuard>),
    pub pods: (Store<Pod>, Writer<Pod>),
    pub slices: (Store<EndpointSlice>, Writer<EndpointSlice>),
}

impl Stores {
    pub fn new() -> Stores {
        Stores {
            guards: reflector::store(),
            pods: reflector::store(),
            slices: reflector::store(),
        }
    }
    pub fn guard(&mut self, g: JanusGuard) {
        self.guards.1.apply_watcher_event(&watcher::Event::Apply(g));
    }
    pub fn delete_guard(&mut self, g: JanusGuard) {
        self.guards
            .1
            .apply_watcher_event(&watcher::Event::Delete(g));
    }
    pub fn pod(&mut self, p: Pod) {
        self.pods.1.apply_watcher_event(&watcher::Event::Apply(p));
    }
    pub fn delete_pod(&mut self, p: Pod) {
        self.pods.1.apply_watcher_event(&watcher::Event::Delete(p));
    }
    /// The agent Service's EndpointSlice: node -> address.
    pub fn agents(&mut self, agents: &[(&str, std::net::SocketAddr)]) {
        // One slice per port: the test's agents listen on different ports.
        for (i, (node, addr)) in agents.iter().enumerate() {
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": format!("janus-agent-{i}"), "namespace": "janus",
                             "labels": {"kubernetes.io/service-name": "janus-agent"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [addr.ip().to_string()], "nodeName": node}],
                "ports": [{"name": "grpc", "port": addr.port(), "protocol": "TCP"}],
            }))
            .unwrap();
            self.slices
                .1
                .apply_watcher_event(&watcher::Event::Apply(slice));
        }
    }
}

pub fn guard(name: &str, generation: i64, spec: Value) -> JanusGuard {
    serde_json::from_value(json!({
        "apiVersion": "januscontroller.clustergarage.io/v1alpha1",
        "kind": "JanusGuard",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": generation},
        "spec": spec,
    }))
    .unwrap()
}

pub fn pod(name: &str, node: &str, labels: Value, phase: &str, containers: &[&str]) -> Pod {
    let statuses: Vec<Value> = containers
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"name": format!("c{i}"), "containerID": id, "image": "busybox", "imageID": "", "ready": true, "restartCount": 0}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("pod-{name}"), "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c0"}]},
        "status": {"phase": phase, "containerStatuses": statuses},
    }))
    .unwrap()
}

/// An agent that holds guards in memory and says every container is enforced (or, for
/// `fail`, failed), with the fanotify backend's warning for `modify`.
pub type Held = Arc<Mutex<BTreeMap<(String, String, String), GuardStatus>>>;

#[derive(Clone, Default)]
pub struct FakeAgent {
    pub held: Held,
    pub applies: Arc<std::sync::atomic::AtomicUsize>,
    pub fail: Arc<std::sync::atomic::AtomicBool>,
}

use janus_api::agent_v1::agent_server::{Agent, AgentServer};
use janus_api::agent_v1::*;
use std::sync::atomic::Ordering;

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn apply_guard(
        &self,
        r: tonic::Request<ApplyGuardRequest>,
    ) -> Result<tonic::Response<ApplyGuardResponse>, tonic::Status> {
        let r = r.into_inner();
        self.applies.fetch_add(1, Ordering::SeqCst);
        let g = r.guard.unwrap();
        let p = r.pod.unwrap();
        let phase = if self.fail.load(Ordering::SeqCst) {
            ContainerPhase::Failed
        } else {
            ContainerPhase::Enforced
        };
        let status = GuardStatus {
            key: Some(GuardKey {
                guard_namespace: g.namespace.clone(),
                guard_name: g.name.clone(),
                pod_uid: p.uid.clone(),
            }),
            generation: g.generation,
            guard_uid: g.uid.clone(),
            pod_name: p.name,
            containers: p
                .container_ids
                .iter()
                .map(|c| ContainerStatus {
                    container_id: c.clone(),
                    phase: phase as i32,
                    reason: if phase == ContainerPhase::Failed {
                        "no such process".into()
                    } else {
                        String::new()
                    },
                    pid: 1,
                    backend: "fanotify".into(),
                })
                .collect(),
            warnings: if r.spec_json.contains("modify") {
                vec!["event modify not supported by the fanotify backend".into()]
            } else {
                vec![]
            },
        };
        self.held
            .lock()
            .unwrap()
            .insert((g.namespace, g.name, p.uid), status.clone());
        Ok(tonic::Response::new(ApplyGuardResponse {
            status: Some(status),
        }))
    }

    async fn remove_guard(
        &self,
        r: tonic::Request<RemoveGuardRequest>,
    ) -> Result<tonic::Response<RemoveGuardResponse>, tonic::Status> {
        let k = r.into_inner().key.unwrap();
        let removed = self
            .held
            .lock()
            .unwrap()
            .remove(&(k.guard_namespace, k.guard_name, k.pod_uid))
            .is_some();
        Ok(tonic::Response::new(RemoveGuardResponse { removed }))
    }

    async fn list_guards(
        &self,
        _: tonic::Request<ListGuardsRequest>,
    ) -> Result<tonic::Response<ListGuardsResponse>, tonic::Status> {
        Ok(tonic::Response::new(ListGuardsResponse {
            guards: self.held.lock().unwrap().values().cloned().collect(),
            node: String::new(),
        }))
    }
}

impl FakeAgent {
    /// Serves on a loopback port, plaintext.
    pub async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = AgentServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        addr
    }

    pub fn pods(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .held
            .lock()
            .unwrap()
            .keys()
            .map(|k| format!("{}/{}", k.1, k.2))
            .collect();
        v.sort();
        v
    }
}
