//! End to end on this machine: the controller's reconcile core, driven by the mock API, makes
//! its mutual TLS material as on a first start (`--tls-auto`), talks mutual TLS over loopback
//! to a real `janus-agent serve`, which finds a real containerd container in its pod's cgroup
//! and guards it. Needs root and a running containerd (scripts/setup-containerd.sh).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use janus_api::agent_v1::{ApplyGuardRequest, GuardRef, PodRef};
use janus_controller::agents::AgentPool;
use janus_controller::metrics::Metrics;
use janus_controller::pki;
use janus_controller::reconcile::Core;
use janus_tests::containerd::Container;
use janus_tests::target::{Access, Root, BUSYBOX};
use serde_json::json;
use support::{agent_bin, eventually, free_port, guard, pod, start_agent, MockApi, Stores};

const PERIOD: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_reaches_a_real_container_over_mutual_tls() {
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let dir = std::env::temp_dir().join(format!("janus-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (client_api, api) = MockApi::start();
    let material = pki::bootstrap(client_api.clone(), "janus").await.unwrap();

    let root = Root::new(&dir, "rootfs").unwrap();
    root.write("/data/secret", b"secret\n").unwrap();
    let id = format!("janus-e2e-{}", std::process::id());
    // As the kubelet's cgroupfs driver places pod e2e-pod's container (UID pod-e2e-pod).
    let cgroup = format!("/kubepods/besteffort/podpod-e2e-pod/{id}");
    let container =
        Arc::new(Container::run(&root, &id, Some(&cgroup), &[BUSYBOX, "sleep", "600"]).unwrap());
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
    let mut agent = start_agent(
        &bin,
        &dir,
        &material,
        addr,
        0,
        &["--rescan-interval-ms", "200"],
    );

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
        AgentPool::new(Some(material.client_config()), Duration::from_secs(5)),
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

    // Whoever else got the controller's credentials replaces the spec with one that allows
    // everything, at a generation the controller's can never reach.
    let forger = AgentPool::new(Some(material.client_config()), Duration::from_secs(5));
    let forged = forger
        .apply_many(
            &addr.to_string(),
            vec![ApplyGuardRequest {
                guard: Some(GuardRef {
                    namespace: "default".into(),
                    name: "e2e".into(),
                    uid: "uid-e2e".into(),
                    generation: i64::MAX,
                }),
                pod: Some(PodRef {
                    uid: "pod-e2e-pod".into(),
                    namespace: "default".into(),
                    name: "e2e-pod".into(),
                    container_ids: vec![format!("containerd://{id}")],
                }),
                spec_json: r#"{"selector":{},"subjects":[{"allow":["/data/secret"]}]}"#.into(),
                spec_digest: String::new(),
            }],
        )
        .await
        .remove(0)
        .unwrap();
    assert_eq!(forged.generation, i64::MAX);
    let c = cat.clone();
    eventually(
        "the forged spec to allow",
        Duration::from_secs(20),
        move || c() == Access::Ok("secret".into()),
    )
    .await;
    // One periodic pass sees a digest it does not want and repairs it.
    core.sync_all().await.unwrap();
    let c = cat.clone();
    eventually(
        "EPERM again after one pass, with no other",
        Duration::from_secs(10),
        move || c() == Access::Denied,
    )
    .await;

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
    let _agent = start_agent(
        &bin,
        &dir,
        &material,
        addr,
        1,
        &["--rescan-interval-ms", "200"],
    );
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

    drop(container);
    let _ = std::fs::remove_dir_all(&dir);
}
