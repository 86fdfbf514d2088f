//! End to end on this machine: the controller's reconcile core, driven by the mock API, talks
//! mutual TLS over loopback to a real `janus-agent serve`, which finds a real containerd
//! container by its cgroup and guards it. Needs root and a running containerd
//! (scripts/setup-containerd.sh).

mod support;

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use janus_controller::agents::AgentPool;
use janus_controller::metrics::Metrics;
use janus_controller::reconcile::Core;
use janus_tests::agent::Serve;
use janus_tests::containerd::Container;
use janus_tests::target::{Access, Root, BUSYBOX};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;
use support::{guard, pod, MockApi, Stores};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const PERIOD: Duration = Duration::from_secs(2);

/// A certificate and key, and the CA that signed them, as PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn new_ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn sign(ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> Pki {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, ca)
        .unwrap();
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn client_tls(p: &Pki) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&p.ca))
        .identity(Identity::from_pem(&p.cert, &p.key))
        .domain_name("janus-agent")
}

/// `janus-agent serve` with mutual TLS from `dir`, its output in `dir/agent-N.*`.
fn start_agent(bin: &Path, dir: &Path, addr: SocketAddr, n: usize) -> Serve {
    let mut args = vec![OsString::from("--rescan-interval-ms"), "200".into()];
    for (flag, file) in [
        ("--tls-ca", "ca.pem"),
        ("--tls-cert", "cert.pem"),
        ("--tls-key", "key.pem"),
    ] {
        args.extend([flag.into(), dir.join(file).into_os_string()]);
    }
    Serve::start(bin, addr, &args, dir, &format!("agent-{n}")).unwrap()
}

/// The agent binary, built if `cargo test` has not built it for this package.
fn agent_bin() -> PathBuf {
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

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `check` (off the async threads) until it holds, failing after `within`.
async fn eventually(
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_reaches_a_real_container_over_mutual_tls() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let dir = std::env::temp_dir().join(format!("janus-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = new_ca();
    let (server, client) = (sign(&ca, "janus-agent"), sign(&ca, "janus-controller"));
    std::fs::write(dir.join("ca.pem"), &server.ca).unwrap();
    std::fs::write(dir.join("cert.pem"), &server.cert).unwrap();
    std::fs::write(dir.join("key.pem"), &server.key).unwrap();

    let root = Root::new(&dir, "rootfs").unwrap();
    root.write("/data/secret", b"secret\n").unwrap();
    let id = format!("janus-e2e-{}", std::process::id());
    let container = Arc::new(Container::run(&root, &id, None, &[BUSYBOX, "sleep", "600"]).unwrap());
    let cat = {
        let c = container.clone();
        move || c.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap()
    };
    let c = cat.clone();
    eventually(
        "the container to read its file",
        Duration::from_secs(20),
        move || c() == Access::Ok("secret".into()),
    )
    .await;

    let bin = agent_bin();
    let addr = free_port();
    let mut agent = start_agent(&bin, &dir, addr, 0);

    let (client_api, api) = MockApi::start();
    let mut stores = Stores::new();
    stores.agents(&[("node-a", addr)]);
    let g = guard(
        "e2e",
        1,
        json!({"selector": {"matchLabels": {"app": "e2e"}},
               "subjects": [{"deny": ["/data/secret"], "events": ["open"]}]}),
    );
    stores.guard(g.clone());
    stores.pod(pod(
        "e2e-pod",
        "node-a",
        json!({"app": "e2e"}),
        "Running",
        &[&format!("containerd://{id}")],
    ));
    let core = Arc::new(Core::new(
        client_api,
        stores.guards.0.clone(),
        stores.pods.0.clone(),
        stores.slices.0.clone(),
        AgentPool::new(Some(client_tls(&client)), Duration::from_secs(5)),
        Arc::new(Metrics::new()),
    ));

    // Apply: the container's own open is refused.
    core.sync_guard(&g).await.unwrap();
    let c = cat.clone();
    eventually(
        "EPERM in the container",
        Duration::from_secs(20),
        move || c() == Access::Denied,
    )
    .await;
    // The status says so once the agent reports the container enforced.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        core.sync_all().await.unwrap();
        if api.status("e2e").is_some_and(|s| s["podsGuarded"] == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the pod guarded: {:?}",
            api.status("e2e")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(api.condition("e2e", "Ready").unwrap()["status"], "True");

    // Delete: access returns.
    stores.delete_guard(g.clone());
    core.sync_all().await.unwrap();
    let c = cat.clone();
    eventually(
        "access after the guard is deleted",
        Duration::from_secs(20),
        move || c() == Access::Ok("secret".into()),
    )
    .await;

    // Kill and restart the agent: the periodic pass puts the guard back within a period.
    stores.guard(g.clone());
    core.sync_all().await.unwrap();
    let c = cat.clone();
    eventually("EPERM again", Duration::from_secs(20), move || {
        c() == Access::Denied
    })
    .await;
    agent.kill();
    let c = cat.clone();
    eventually(
        "access once the agent is gone",
        Duration::from_secs(20),
        move || c() == Access::Ok("secret".into()),
    )
    .await;
    let periodic = {
        let core = core.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            loop {
                tick.tick().await;
                let _ = core.sync_all().await;
            }
        })
    };
    let _agent = start_agent(&bin, &dir, addr, 1);
    let restarted = Instant::now();
    let c = cat.clone();
    // One period, plus the time to find the container and place the marks.
    eventually(
        "EPERM after the agent restarted",
        PERIOD + Duration::from_secs(3),
        move || c() == Access::Denied,
    )
    .await;
    eprintln!(
        "guard back {:?} after the agent restarted",
        restarted.elapsed()
    );
    periodic.abort();

    // A client whose certificate another CA signed is refused, and so is plaintext.
    let rogue = sign(&new_ca(), "janus-controller");
    // It trusts the agent; the agent does not trust it.
    let rogue_tls = client_tls(&rogue).ca_certificate(Certificate::from_pem(&server.ca));
    let rogue_pool = AgentPool::new(Some(rogue_tls), Duration::from_secs(5));
    let err = rogue_pool
        .list(&addr.to_string())
        .await
        .expect_err("a rogue client is refused");
    eprintln!("rogue client: {err}");
    let plain = AgentPool::new(None, Duration::from_secs(5));
    assert!(
        plain.list(&addr.to_string()).await.is_err(),
        "plaintext is refused"
    );
    // The legitimate client still gets through.
    let ours = AgentPool::new(Some(client_tls(&client)), Duration::from_secs(5));
    assert_eq!(ours.list(&addr.to_string()).await.unwrap().len(), 1);

    drop(container);
    let _ = std::fs::remove_dir_all(&dir);
}
