//! What the controller's tests share: kube's mock API (tower-test) answering status patches
//! and Events, stores filled by hand, and object builders.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use janus_controller::crd::JanusGuard;
use janus_controller::pod::PodView;
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
    secrets: Arc<Mutex<BTreeMap<String, Value>>>,
}

impl MockApi {
    pub fn start() -> (kube::Client, MockApi) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let guards: Arc<Mutex<BTreeMap<String, Value>>> = Arc::default();
        let secrets = Arc::new(Mutex::new(BTreeMap::<String, Value>::new()));
        let kept = secrets.clone();
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
                if path.contains("/secrets") {
                    let (status, reply) = secret_call(&kept, parts.method.as_str(), &path, body);
                    send.send_response(
                        Response::builder()
                            .status(status)
                            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
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
        (
            kube::Client::new(service, "default"),
            MockApi { seen, secrets },
        )
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

/// Secrets as the API server keeps them: created once (409 after), read (404 when absent),
/// replaced.
fn secret_call(
    secrets: &Mutex<BTreeMap<String, Value>>,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let mut secrets = secrets.lock().unwrap();
    let status = |code: u16, reason: &str| {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    };
    let named = path.rsplit_once("/secrets/").map(|(_, n)| n.to_owned());
    match (method, named) {
        ("POST", None) => {
            let name = body["metadata"]["name"].as_str().unwrap().to_owned();
            if secrets.contains_key(&name) {
                return (409, status(409, "AlreadyExists"));
            }
            let mut body = body;
            body["metadata"]["resourceVersion"] = json!("1");
            secrets.insert(name, body.clone());
            (201, body)
        }
        ("GET", Some(name)) => match secrets.get(&name) {
            Some(s) => (200, s.clone()),
            None => (404, status(404, "NotFound")),
        },
        ("PUT", Some(name)) => {
            let current = secrets
                .get(&name)
                .map(|s| s["metadata"]["resourceVersion"].clone());
            let version = &body["metadata"]["resourceVersion"];
            if current.as_ref() != Some(version) {
                return (409, status(409, "Conflict"));
            }
            let next = version.as_str().unwrap().parse::<u64>().unwrap() + 1;
            let mut body = body;
            body["metadata"]["resourceVersion"] = json!(next.to_string());
            secrets.insert(name, body.clone());
            (200, body)
        }
        (m, _) => panic!("unexpected secret call {m} {path}"),
    }
}

impl MockApi {
    /// Deletes a Secret, as `kubectl delete secret` would.
    pub fn forget_secret(&self, name: &str) {
        self.secrets.lock().unwrap().remove(name);
    }

    /// The requests of `method` to the Secrets API.
    pub fn secret_calls(&self, method: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.method == method && s.path.contains("/secrets"))
            .cloned()
            .collect()
    }
}

/// A store and its writer, filled by the test as a watcher would.
pub struct Stores {
    pub guards: (Store<JanusGuard>, Writer<JanusGuard>),
    pub pods: (Store<PodView>, Writer<PodView>),
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
    pub fn pod(&mut self, p: PodView) {
        self.pods.1.apply_watcher_event(&watcher::Event::Apply(p));
    }
    pub fn delete_pod(&mut self, p: PodView) {
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

/// A pod with `containers` as its app containers' IDs; bound to `node` unless it is empty.
pub fn pod(name: &str, node: &str, labels: Value, phase: &str, containers: &[&str]) -> PodView {
    let statuses: Vec<Value> = containers
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"name": format!("c{i}"), "containerID": id, "image": "busybox", "imageID": "", "ready": true, "restartCount": 0}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("pod-{name}"), "labels": labels},
        "spec": {"nodeName": (!node.is_empty()).then_some(node), "containers": [{"name": "c0"}]},
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
    /// Holdings applied, one by one or in batches.
    pub applies: Arc<std::sync::atomic::AtomicUsize>,
    /// Calls made (ApplyGuard, ApplyGuards, RemoveGuard, RemoveGuards; not ListGuards).
    pub calls: Arc<std::sync::atomic::AtomicUsize>,
    pub fail: Arc<std::sync::atomic::AtomicBool>,
    /// RemoveGuards fails (as an agent that times out would).
    pub refuse_removals: Arc<std::sync::atomic::AtomicBool>,
    /// ListGuards answered `unchanged`.
    pub unchanged: Arc<std::sync::atomic::AtomicUsize>,
    /// As an agent of an earlier release: no ApplyGuards or RemoveGuards.
    pub legacy: Arc<std::sync::atomic::AtomicBool>,
    /// Each holding also guards a container found in the pod's cgroup (its sandbox).
    pub adopt: Arc<std::sync::atomic::AtomicBool>,
    /// Each SetPods received, in order.
    pub words: Arc<Mutex<Vec<SetPodsRequest>>>,
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
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(ApplyGuardResponse {
            status: Some(self.apply(r.into_inner())),
        }))
    }

    async fn apply_guards(
        &self,
        r: tonic::Request<ApplyGuardsRequest>,
    ) -> Result<tonic::Response<ApplyGuardsResponse>, tonic::Status> {
        if self.legacy.load(Ordering::SeqCst) {
            return Err(tonic::Status::unimplemented("ApplyGuards"));
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let results = r
            .into_inner()
            .items
            .into_iter()
            .map(|item| ApplyResult {
                outcome: Some(apply_result::Outcome::Status(self.apply(item))),
            })
            .collect();
        Ok(tonic::Response::new(ApplyGuardsResponse { results }))
    }

    async fn remove_guards(
        &self,
        r: tonic::Request<RemoveGuardsRequest>,
    ) -> Result<tonic::Response<RemoveGuardsResponse>, tonic::Status> {
        if self.legacy.load(Ordering::SeqCst) {
            return Err(tonic::Status::unimplemented("RemoveGuards"));
        }
        if self.refuse_removals.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("removals refused"));
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        let removed = r
            .into_inner()
            .items
            .into_iter()
            .map(|r| {
                let k = r.key.unwrap();
                let key = (k.guard_namespace, k.guard_name, k.pod_uid);
                let theirs = held
                    .get(&key)
                    .is_some_and(|s| r.guard_uid.is_empty() || s.guard_uid == r.guard_uid);
                theirs && held.remove(&key).is_some()
            })
            .collect();
        Ok(tonic::Response::new(RemoveGuardsResponse { removed }))
    }

    async fn remove_guard(
        &self,
        r: tonic::Request<RemoveGuardRequest>,
    ) -> Result<tonic::Response<RemoveGuardResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let k = r.into_inner().key.unwrap();
        let removed = self
            .held
            .lock()
            .unwrap()
            .remove(&(k.guard_namespace, k.guard_name, k.pod_uid))
            .is_some();
        Ok(tonic::Response::new(RemoveGuardResponse { removed }))
    }

    async fn set_pods(
        &self,
        r: tonic::Request<SetPodsRequest>,
    ) -> Result<tonic::Response<SetPodsResponse>, tonic::Status> {
        self.words.lock().unwrap().push(r.into_inner());
        Ok(tonic::Response::new(SetPodsResponse {}))
    }

    async fn list_guards(
        &self,
        request: tonic::Request<ListGuardsRequest>,
    ) -> Result<tonic::Response<ListGuardsResponse>, tonic::Status> {
        let held = self.held.lock().unwrap().values().cloned().collect();
        if self.legacy.load(Ordering::SeqCst) {
            // No digest: the whole listing, whatever was asked.
            return Ok(tonic::Response::new(ListGuardsResponse {
                guards: held,
                ..Default::default()
            }));
        }
        let unless = request.into_inner().unless_digest;
        let answer = janus_api::holding::listing(held, String::new(), &unless);
        if answer.unchanged {
            self.unchanged.fetch_add(1, Ordering::SeqCst);
        }
        Ok(tonic::Response::new(answer))
    }
}

impl FakeAgent {
    fn apply(&self, r: ApplyGuardRequest) -> GuardStatus {
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
            spec_digest: janus_api::holding::spec_digest(&r.spec_json),
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
                    ..Default::default()
                })
                .chain(self.adopt.load(Ordering::SeqCst).then(|| ContainerStatus {
                    container_id: "containerd://sandbox".into(),
                    phase: ContainerPhase::Enforced as i32,
                    adopted: true,
                    ..Default::default()
                }))
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
        status
    }

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

/// The agent binary, built if `cargo test` has not built it for this package.
pub fn agent_bin() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", "janus-agent", "--bin", "janus-agent"])
        .status()
        .unwrap();
    assert!(status.success(), "building janus-agent");
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/e2e-HASH -> target/debug/janus-agent
    exe.parent().unwrap().parent().unwrap().join("janus-agent")
}

pub fn free_port() -> SocketAddr {
    janus_tests::agent::free_addr().unwrap()
}

/// Polls `check` (off the async threads) until it holds, failing after `within`.
pub async fn eventually(
    what: &str,
    within: Duration,
    check: impl Fn() -> bool + Send + Sync + 'static,
) {
    let check = Arc::new(check);
    let deadline = Instant::now() + within;
    loop {
        let c = check.clone();
        if tokio::task::spawn_blocking(move || c()).await.unwrap() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Secret `name` as the mock API holds it.
pub fn secret_field(api: &MockApi, name: &str, key: &str) -> String {
    let posted = api
        .secret_calls("POST")
        .into_iter()
        .chain(api.secret_calls("PUT"))
        .rfind(|s| s.body["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Secret {name} written"));
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(posted.body).unwrap();
    String::from_utf8(secret.data.unwrap()[key].0.clone()).unwrap()
}

/// `janus-agent serve` with the TLS flags the manifests give it, the agents' material of
/// `m` in `dir`, its output in `dir/agent-N.*`; `extra` after them.
pub fn start_agent(
    bin: &std::path::Path,
    dir: &std::path::Path,
    m: &janus_controller::pki::Material,
    addr: SocketAddr,
    n: usize,
    extra: &[&str],
) -> janus_tests::agent::Serve {
    std::fs::write(dir.join("ca.pem"), &m.ca).unwrap();
    std::fs::write(dir.join("cert.pem"), &m.agent.cert).unwrap();
    std::fs::write(dir.join("key.pem"), &m.agent.key).unwrap();
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    for (flag, file) in [
        ("--tls-ca", "ca.pem"),
        ("--tls-cert", "cert.pem"),
        ("--tls-key", "key.pem"),
    ] {
        args.extend([flag.into(), dir.join(file).into_os_string()]);
    }
    args.extend(extra.iter().map(Into::into));
    janus_tests::agent::Serve::start(bin, addr, &args, dir, &format!("agent-{n}")).unwrap()
}
