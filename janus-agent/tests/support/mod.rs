//! What the agent's integration tests share: requests to `janus-agent serve`, and an agent
//! to send them to.

#![allow(dead_code)]

use std::net::SocketAddr;

use janus_api::agent_v1::{ApplyGuardRequest, BoundPod, SetPodsRequest};
use janus_tests::containerd::Container;
use janus_tests::scenarios::populate;
use janus_tests::target::{Access, Root, BUSYBOX};
use janus_tests::wait;

/// A loopback address nobody listens on.
pub fn free_addr() -> SocketAddr {
    janus_tests::agent::free_addr().unwrap()
}

/// An ApplyGuard of guard `namespace/name` (generation 1) with `spec_json` for pod
/// `pod_uid` and its containers, containerd IDs.
pub fn apply(
    namespace: &str,
    name: &str,
    pod_uid: &str,
    containers: &[&str],
    spec_json: &str,
) -> ApplyGuardRequest {
    let ids: Vec<String> = containers
        .iter()
        .map(|c| format!("containerd://{c}"))
        .collect();
    janus_tests::api::apply_request(namespace, name, pod_uid, &ids, spec_json)
}

/// Denies opening `/data/secret`.
pub const DENY_SECRET: &str =
    r#"{"selector":{},"subjects":[{"deny":["/data/secret"],"events":["open"]}]}"#;

/// A pod's container for test `name`: a fresh directory, a root with the standard files, and
/// `sleep` running in containerd under the pod's cgroup as the kubelet's cgroupfs driver
/// places it, the pod's UID starting with `uid` (hex, as the kubelet's are). Returns
/// (directory, root, pod UID, container ID, container).
pub fn pod_container(
    name: &str,
    uid: &str,
) -> (std::path::PathBuf, Root, String, String, Container) {
    let dir = std::env::temp_dir().join(format!("janus-serve-{name}-test"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "rootfs").unwrap();
    populate(&root).unwrap();
    let me = std::process::id();
    let pod_uid = format!("{uid}-{me}");
    let id = format!("janus-{name}-{me}");
    let cgroup = format!("/kubepods/besteffort/pod{pod_uid}/{id}");
    let container = Container::run(&root, &id, Some(&cgroup), &[BUSYBOX, "sleep", "600"]).unwrap();
    (dir, root, pod_uid, id, container)
}

/// Waits (10 s at most) until reading `/data/secret` in `container` is refused.
pub fn wait_denied(container: &Container) {
    wait::until(
        "the container to be denied",
        std::time::Duration::from_secs(10),
        || {
            (container.exec(&[BUSYBOX, "cat", "/data/secret"]).ok()? == Access::Denied)
                .then_some(())
        },
    )
    .unwrap();
}

/// `janus-agent serve` in plaintext with the fanotify backend, its files in `dir`, and a
/// client of its API.
pub async fn serve_plain(
    dir: &std::path::Path,
) -> (
    janus_tests::agent::Serve,
    janus_api::agent_v1::agent_client::AgentClient<tonic::transport::Channel>,
) {
    serve_plain_with(dir, &[]).await
}

/// The rescan an hour away: what the agent does at once is all a test sees.
pub const NO_RESCAN: [&str; 2] = ["--rescan-interval-ms", "3600000"];

/// [`serve_plain`] with more arguments.
pub async fn serve_plain_with(
    dir: &std::path::Path,
    more: &[&str],
) -> (
    janus_tests::agent::Serve,
    janus_api::agent_v1::agent_client::AgentClient<tonic::transport::Channel>,
) {
    let addr = free_addr();
    let mut args = vec!["--insecure-plaintext", "--backend", "fanotify"];
    args.extend_from_slice(more);
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_janus-agent"));
    let agent = janus_tests::agent::Serve::start(bin, addr, &args, dir, "agent").unwrap();
    let client = janus_api::agent_v1::agent_client::AgentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (agent, client)
}

/// A process of a container reading `/data/secret` in a loop until stopped: each try
/// appends `ok N` or `no N` to `/tmp/reads` in the container's root, then writes `N` to
/// `/tmp/progress`.
pub struct LoopReader {
    root: std::path::PathBuf,
    thread: std::thread::JoinHandle<anyhow::Result<Access>>,
}

impl LoopReader {
    pub fn start(container: std::sync::Arc<Container>, root: &Root) -> LoopReader {
        let thread = std::thread::spawn(move || {
            container.exec(&[
                BUSYBOX,
                "sh",
                "-c",
                "t=0; while [ ! -e /tmp/stop ]; do t=$((t+1)); \
                 if cat /data/secret >/dev/null 2>&1; then echo ok $t; else echo no $t; fi >>/tmp/reads; \
                 echo $t >/tmp/progress; done",
            ])
        });
        LoopReader {
            root: root.dir().to_owned(),
            thread,
        }
    }

    /// How many tries have ended (`None` before the first, or while the count is being
    /// rewritten).
    pub fn progress(&self) -> Option<u64> {
        std::fs::read_to_string(self.root.join("tmp/progress"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits (10 s at most) until `n` more tries have ended than had now; returns how many
    /// had.
    pub fn wait_tries(&self, n: u64) -> u64 {
        // The count is rewritten after each try: a read can meet the file empty.
        let now = wait::until(
            "the reader's count",
            std::time::Duration::from_secs(10),
            || self.progress(),
        )
        .unwrap();
        wait::until(
            "the reader to read on",
            std::time::Duration::from_secs(10),
            || self.progress().filter(|&p| p >= now + n),
        )
        .unwrap();
        now
    }

    /// Stops the loop; returns each try, in order: (whether it read, its number).
    pub fn stop(self) -> Vec<(bool, u64)> {
        std::fs::write(self.root.join("tmp/stop"), b"").unwrap();
        let out = self.thread.join().unwrap().unwrap();
        assert!(matches!(out, Access::Ok(_)), "the reader: {out:?}");
        std::fs::read_to_string(self.root.join("tmp/reads"))
            .unwrap()
            .lines()
            .map(|l| {
                let (read, n) = l.split_once(' ').expect("`ok N` or `no N`");
                (read == "ok", n.parse().expect("a try's number"))
            })
            .collect()
    }
}

/// Applies `req` through `client`; the status the agent answers with.
pub async fn applied(
    client: &mut janus_api::agent_v1::agent_client::AgentClient<tonic::transport::Channel>,
    req: ApplyGuardRequest,
) -> janus_api::agent_v1::GuardStatus {
    client
        .apply_guard(req)
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
}

/// The pod `uid` in namespace `default`, selected by `guards`, failing closed.
pub fn word(uid: &str, guards: &[&str], closed_namespaces: &[&str]) -> SetPodsRequest {
    SetPodsRequest {
        pods: vec![BoundPod {
            uid: uid.into(),
            namespace: "default".into(),
            name: "web-0".into(),
            guards: guards.iter().map(|g| g.to_string()).collect(),
            start_on_failure: false,
        }],
        closed_namespaces: closed_namespaces.iter().map(|n| n.to_string()).collect(),
        node: "node-a".into(),
    }
}
