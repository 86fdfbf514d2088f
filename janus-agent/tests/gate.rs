//! The start gate: `janus-agent hook` as the createRuntime hook, answered by
//! `janus-agent serve`. Containers are run by the real containerd from the base spec
//! deploy/runtime makes, completed as the CRI plugin completes it (annotations, the
//! kubelet's cgroup path). Needs root and a running containerd.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use janus_api::agent_v1::agent_client::AgentClient;
use janus_tests::agent::{http_get, sum_series, Serve};
use janus_tests::containerd::GatedSpec;
use janus_tests::scenarios::populate;
use janus_tests::target::{Root, BUSYBOX};
use janus_tests::wait;
use tonic::transport::Channel;

mod support;
use support::DENY_SECRET;

const AGENT: &str = env!("CARGO_BIN_EXE_janus-agent");

/// A pod's directory and root, and a UID for it.
fn pod(name: &str) -> (PathBuf, Root, String) {
    let dir = std::env::temp_dir().join(format!("janus-gate-{name}-test"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "rootfs").unwrap();
    populate(&root).unwrap();
    let uid = format!("6a7e0000-{name}-{}", std::process::id());
    (dir, root, uid)
}

/// Sends `req` over a connection a child process made and exited after; the gate's answer.
fn request_from_exited_peer(socket: &Path, req: &janus_agent::hook::Request) -> String {
    use nix::sys::socket::{connect, socket as new_socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let fd = new_socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let addr = nix::sys::socket::UnixAddr::new(socket).unwrap();
    // SAFETY: the child only connects and exits, both async-signal-safe.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = i32::from(connect(fd.as_raw_fd(), &addr).is_err());
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
        }
    }
    let mut stream = std::os::unix::net::UnixStream::from(fd);
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    answer
}

/// An agent serving the gate, with its metrics; (agent, client, metrics address, socket).
async fn agent(
    dir: &Path,
    more: &[&str],
) -> (Serve, AgentClient<Channel>, std::net::SocketAddr, PathBuf) {
    let metrics = support::free_addr();
    let metrics_arg = metrics.to_string();
    let mut args = vec!["--metrics-addr", metrics_arg.as_str()];
    args.extend_from_slice(&support::NO_RESCAN);
    args.extend_from_slice(more);
    let (agent, client) = support::serve_plain_with(dir, &args).await;
    let (socket, _) = Serve::gate(dir, "agent");
    (agent, client, metrics, socket)
}

fn gate_total(metrics: std::net::SocketAddr, outcome: &str) -> f64 {
    let (_, body) = http_get(metrics, "/metrics").unwrap();
    sum_series(&body, &format!("janus_gate_total{{outcome=\"{outcome}\"}}"))
}

/// Runs container `id` of pod `uid` through containerd, gated by the agent at `socket`, its
/// first instruction reading the denied file: whether it succeeded, and what it printed.
fn first_read(dir: &Path, root: &Root, id: &str, uid: &str, socket: &Path) -> (bool, String) {
    let argv = [BUSYBOX, "cat", "/data/secret"];
    let mut spec = GatedSpec::new(dir, Path::new(AGENT), socket, root, &argv).unwrap();
    spec.run(id, uid).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_start_behind_the_gate_has_its_first_read_refused() {
    let (dir, root, uid) = pod("first-read");
    // No cgroup watch: what guards each container before it runs is the gate alone.
    let (_agent, mut client, metrics, socket) =
        agent(&dir, &["--cgroup-root", "/nonexistent"]).await;
    // Pushed at scheduling: the guard is held before any container of the pod exists.
    let apply = support::apply("default", "gate", &uid, &[], DENY_SECRET);
    client.apply_guard(apply).await.unwrap();
    client
        .set_pods(support::word(&uid, &["gate"], &[]))
        .await
        .unwrap();

    // Through containerd, from the base spec a node gets.
    let argv = [BUSYBOX, "cat", "/data/secret"];
    let mut spec = GatedSpec::new(&dir, Path::new(AGENT), &socket, &root, &argv).unwrap();
    // The pod's init container first, then its app container restarted again and again,
    // each under a new ID in the same pod.
    const STARTS: usize = 100;
    for i in 0..STARTS {
        let id = if i == 0 {
            format!("gate-init-{}", std::process::id())
        } else {
            format!("gate-app-{i}-{}", std::process::id())
        };
        let (success, output) = spec.run(&id, &uid).unwrap();
        assert!(
            !success && output.contains("Operation not permitted"),
            "start {i} ({id}) read the denied file or failed otherwise:\n{output}"
        );
    }
    assert_eq!(gate_total(metrics, "guarded"), STARTS as f64);
    assert_eq!(gate_total(metrics, "started_unguarded"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_with_no_guard_starts_at_once_and_reads() {
    let (dir, root, uid) = pod("no-guard");
    let (_agent, mut client, metrics, socket) = agent(&dir, &[]).await;
    client
        .set_pods(support::word(&uid, &[], &[]))
        .await
        .unwrap();
    let id = format!("gate-free-{}", std::process::id());
    let (success, output) = first_read(&dir, &root, &id, &uid, &socket);
    assert!(success, "{output}");
    assert_eq!(gate_total(metrics, "no_guard"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guard_that_does_not_arrive_keeps_the_container_from_starting() {
    let (dir, root, uid) = pod("late-guard");
    let (_agent, mut client, metrics, socket) = agent(&dir, &["--gate-within-secs", "1"]).await;
    // The controller says the pod has a guard, and never pushes it.
    client
        .set_pods(support::word(&uid, &["gate"], &[]))
        .await
        .unwrap();
    let id = format!("gate-late-{}", std::process::id());
    let (success, output) = first_read(&dir, &root, &id, &uid, &socket);
    assert!(!success, "the container ran:\n{output}");
    assert!(
        output.contains("guard default/gate not received"),
        "the runtime's error does not say why:\n{output}"
    );
    assert_eq!(gate_total(metrics, "refused"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_the_controller_never_named_fails_as_its_namespace_does() {
    let (dir, root, uid) = pod("unnamed");
    let (_agent, mut client, metrics, socket) = agent(&dir, &["--gate-within-secs", "1"]).await;
    // Another pod named; `default` has a guard that fails closed.
    client
        .set_pods(support::word("some-other-pod", &[], &["default"]))
        .await
        .unwrap();
    let id = format!("gate-unnamed-{}", std::process::id());
    let (success, output) = first_read(&dir, &root, &id, &uid, &socket);
    assert!(!success, "the container ran:\n{output}");
    assert!(output.contains("no word from the controller"), "{output}");
    // In a namespace with no such guard it starts, and is counted.
    client
        .set_pods(support::word("some-other-pod", &[], &[]))
        .await
        .unwrap();
    let (success, output) = first_read(&dir, &root, &id, &uid, &socket);
    assert!(success, "{output}");
    assert_eq!(gate_total(metrics, "refused"), 1.0);
    assert_eq!(gate_total(metrics, "started_unguarded"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_guards_only_a_process_of_the_named_container() {
    let (dir, _root, uid) = pod("spoof");
    let (_agent, mut client, _metrics, socket) = agent(&dir, &[]).await;
    let apply = support::apply("default", "gate", &uid, &[], DENY_SECRET);
    client.apply_guard(apply).await.unwrap();
    client
        .set_pods(support::word(&uid, &["gate"], &[]))
        .await
        .unwrap();
    // A request naming a process that is not the container's (this test's): refused, and
    // nothing is guarded on it.
    let req = janus_agent::hook::Request {
        pod_uid: uid.clone(),
        pod_namespace: "default".into(),
        container_id: "containerd://not-this-process".into(),
        pid: std::process::id() as i32,
        rootfs: "/".into(),
    };
    let answer = janus_agent::hook::ask(&socket, &req, Duration::from_secs(30)).unwrap();
    assert!(!answer.start, "{answer:?}");
    assert!(
        answer.reason.contains("is not a process of container"),
        "{answer:?}"
    );
    // Bytes that are no request: refused, the gate keeps serving.
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.write_all(b"\xff\x00 not json\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut raw, &mut answer).unwrap();
    assert!(answer.contains("\"start\":false"), "{answer}");
    let again = janus_agent::hook::ask(&socket, &req, Duration::from_secs(30)).unwrap();
    assert!(!again.start);

    // A running container's process, named by one its runtime did not start beside it (a
    // root with the socket mounted): refused before anything is guarded on it.
    let (_cdir, _croot, cuid, cid, running) = support::pod_container("gate-running", "6a7e0001");
    let theirs = janus_agent::hook::Request {
        pod_uid: cuid,
        pod_namespace: "default".into(),
        container_id: format!("containerd://{cid}"),
        pid: running.pid(),
        rootfs: "/tmp".into(),
    };
    let answer = janus_agent::hook::ask(&socket, &theirs, Duration::from_secs(30)).unwrap();
    assert!(!answer.start, "{answer:?}");
    assert!(
        answer.reason.contains("not a process its runtime set up"),
        "{answer:?}"
    );

    // A connection whose connecting process is gone (the hook's PID free to be given
    // again) when its request is read: refused, whoever holds the socket now.
    let answer = request_from_exited_peer(&socket, &theirs);
    assert!(answer.contains("\"start\":false"), "{answer}");
    assert!(answer.contains("exited before its request"), "{answer}");

    // Another node's word is refused.
    let mut other = support::word(&uid, &[], &[]);
    other.node = "node-b".into();
    let refused = client.set_pods(other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_the_agent_could_not_answer_is_recorded_and_counted() {
    let (dir, _root, uid) = pod("unreachable");
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), r#"{"root":{"path":"rootfs"}}"#).unwrap();
    let state = serde_json::json!({
        "ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 1,
        "bundle": bundle,
        "annotations": { "io.kubernetes.cri.sandbox-uid": uid },
    })
    .to_string();
    let (_, ungated) = Serve::gate(&dir, "agent");
    let hook = |socket: &str, unreachable: &str| {
        let mut child = Command::new(AGENT)
            .args(["hook", "--socket", socket, "--unreachable", unreachable])
            .arg("--ungated-dir")
            .arg(&ungated)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(state.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    // An agent reached that gives no answer (it stopped meanwhile): refused, whatever
    // `--unreachable` says.
    let mute = dir.join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&mute).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let cut = hook(mute.to_str().unwrap(), "start");
    assert!(!cut.status.success());
    assert!(String::from_utf8_lossy(&cut.stderr).contains("no answer"));
    let refused = hook("/nonexistent/agent.sock", "refuse");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot connect"));
    assert!(!ungated.exists(), "a refused start is no unguarded one");
    let started = hook("/nonexistent/agent.sock", "start");
    assert!(started.status.success());
    assert!(ungated.join("containerd-c1").exists());
    // The agent, once up, counts and reports it.
    let (agent, _client, metrics, _socket) = agent(&dir, &[]).await;
    assert_eq!(gate_total(metrics, "started_unguarded"), 1.0);
    assert!(!ungated.join("containerd-c1").exists());
    wait::until("the report in the log", Duration::from_secs(5), || {
        let err = std::fs::read_to_string(dir.join("agent.err")).ok()?;
        err.contains("the hook could not reach this agent")
            .then_some(())
    })
    .unwrap();
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_gates_by_the_word_it_kept() {
    let (dir, root, uid) = pod("kept-word");
    let (before, mut client, _, _) = agent(&dir, &["--gate-within-secs", "1"]).await;
    client
        .set_pods(support::word(&uid, &[], &[]))
        .await
        .unwrap();
    drop(before);
    // The controller has not told the new agent anything yet.
    let (_after, _client, metrics, socket) = agent(&dir, &["--gate-within-secs", "1"]).await;
    let id = format!("gate-kept-{}", std::process::id());
    let (success, output) = first_read(&dir, &root, &id, &uid, &socket);
    assert!(success, "{output}");
    assert_eq!(
        gate_total(metrics, "no_guard"),
        1.0,
        "the word was not kept"
    );
}
