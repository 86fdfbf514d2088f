//! The start gate wired through NRI: `janus-agent serve --nri-socket` registers with a real
//! containerd 1.7 (scripts/setup-containerd-nri.sh) as an NRI plugin, and pods run through
//! its CRI as the kubelet runs them get the gate's hook from the agent alone. Needs root
//! and that containerd.

use std::path::{Path, PathBuf};

use janus_tests::agent::{http_get, sum_series, Serve, STARTUP};
use janus_tests::cri::{self, Pod};
use janus_tests::wait;

mod support;
use support::DENY_SECRET;

const AGENT: &str = env!("CARGO_BIN_EXE_janus-agent");

/// A test's directory, with `data/secret` to bind into its containers at `/data`.
fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("janus-nri-{name}-test"));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("secret"), "the secret\n").unwrap();
    (dir, data)
}

fn metric(addr: std::net::SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").unwrap();
    sum_series(&body, series)
}

/// An agent with the guard denying `/data/secret` held for pod `uid` (pushed at scheduling,
/// with the controller's word on the pod), no other way to find containers than the gate,
/// and `more` arguments; (agent, metrics address).
async fn agent(dir: &Path, uid: &str, more: &[&str]) -> (Serve, std::net::SocketAddr) {
    let metrics = support::free_addr();
    let metrics_arg = metrics.to_string();
    let mut args = vec![
        "--metrics-addr",
        metrics_arg.as_str(),
        "--cgroup-root",
        "/nonexistent",
    ];
    args.extend_from_slice(&support::NO_RESCAN);
    args.extend_from_slice(more);
    let (agent, mut client) = support::serve_plain_with(dir, &args).await;
    let apply = support::apply("default", "secret", uid, &[], DENY_SECRET);
    client.apply_guard(apply).await.unwrap();
    client
        .set_pods(support::word(uid, &["secret"], &[]))
        .await
        .unwrap();
    (agent, metrics)
}

/// The container's first instruction reads the denied file (its error on stdout: this
/// containerd's CRI log keeps only stdout of a process that ends at once).
const READ: [&str; 3] = ["/bin/sh", "-c", "exec cat /data/secret 2>&1"];

#[tokio::test(flavor = "multi_thread")]
async fn pods_run_through_nri_have_their_first_read_refused() {
    // One test: the plugin adds its hook to every container the runtime creates, so the
    // control runs before it registers.
    let (dir, data) = scratch("gated");
    let uid = format!("6a7e0000-aaaa-4000-8000-{:012x}", std::process::id());
    let containerd = Path::new(cri::NRI_CONTAINERD);
    let logs = dir.join("logs");
    let mounts = [(data.as_path(), "/data")];

    // The control: the guard held, the agent not registered over NRI. Nothing gates the
    // start, and the first read wins.
    {
        let (_agent, metrics) = agent(&dir, &uid, &[]).await;
        let (code, output) = Pod::once(containerd, &uid, "nri-ungated", &logs, &READ, &mounts)
            .await
            .unwrap();
        assert!(
            code == 0 && output.contains("the secret"),
            "(exit {code}) {output}"
        );
        assert_eq!(metric(metrics, "janus_nri_registered"), 0.0);
        assert_eq!(
            metric(metrics, r#"janus_gate_total{outcome="guarded"}"#),
            0.0
        );
    }

    let (_agent, metrics) = agent(
        &dir,
        &uid,
        &["--nri-socket", cri::NRI_SOCKET, "--nri-hook", AGENT],
    )
    .await;
    wait::until(
        "the agent to register with containerd over NRI",
        STARTUP,
        || (metric(metrics, "janus_nri_registered") == 1.0).then_some(()),
    )
    .unwrap();
    let mut pod = Pod::run(containerd, &uid, "nri-gated", &logs)
        .await
        .unwrap();
    // An init container, then an app container restarted again and again, as the kubelet
    // runs them: each one's first instruction reads the denied file.
    const STARTS: u32 = 100;
    for i in 0..STARTS {
        let (name, attempt) = if i == 0 { ("init", 0) } else { ("app", i) };
        let (code, output) = pod
            .run_to_exit(name, attempt, &READ, &mounts)
            .await
            .unwrap();
        assert!(
            code != 0 && output.contains("Operation not permitted"),
            "start {i} ({name}) read the denied file or failed otherwise (exit {code}):\n{output}"
        );
    }
    pod.remove().await.unwrap();
    let added = r#"janus_nri_containers_total{outcome="hook_added"}"#;
    assert_eq!(metric(metrics, added), f64::from(STARTS));
    let guarded = r#"janus_gate_total{outcome="guarded"}"#;
    assert_eq!(metric(metrics, guarded), f64::from(STARTS));

    // The runtime restarts: the agent says it is not registered, registers again once the
    // runtime is back, and the next start is gated again.
    stop_containerd();
    wait::until("the agent to see containerd go", STARTUP, || {
        (metric(metrics, "janus_nri_registered") == 0.0).then_some(())
    })
    .unwrap();
    let setup = std::process::Command::new("bash")
        .arg(cri::NRI_SETUP)
        .status()
        .unwrap();
    assert!(setup.success());
    wait::until("the agent to register again", STARTUP, || {
        (metric(metrics, "janus_nri_registered") == 1.0).then_some(())
    })
    .unwrap();
    let (code, output) = Pod::once(containerd, &uid, "nri-again", &logs, &READ, &mounts)
        .await
        .unwrap();
    assert!(
        code != 0 && output.contains("Operation not permitted"),
        "(exit {code}) {output}"
    );
    assert_eq!(metric(metrics, guarded), f64::from(STARTS + 1));
}

/// Stops the NRI containerd (SIGTERM) and waits until it is gone.
fn stop_containerd() {
    let pid: i32 = std::fs::read_to_string(cri::NRI_CONTAINERD_PID)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait::until("containerd to stop", STARTUP, || {
        nix::sys::signal::kill(pid, None).is_err().then_some(())
    })
    .unwrap();
}
