//! `janus-agent serve` through its gRPC API, with containerd containers placed in a pod's
//! cgroup as the kubelet places them. Needs root and a running containerd.

use std::time::Duration;

use janus_api::agent_v1::agent_client::AgentClient;
use janus_api::agent_v1::{
    apply_result, ApplyGuardsRequest, ApplyResult, ContainerPhase, GuardKey, ListGuardsRequest,
    Removal, RemoveGuardsRequest,
};
use janus_tests::agent::Serve;
use janus_tests::containerd::Container;
use janus_tests::scenarios::populate;
use janus_tests::target::{Access, Root, BUSYBOX};
use janus_tests::wait;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

mod support;
use support::DENY_SECRET;

#[tokio::test(flavor = "multi_thread")]
async fn a_container_restarted_under_a_new_id_is_guarded_by_the_agent_alone() {
    let dir = std::env::temp_dir().join("janus-serve-restart-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "rootfs").unwrap();
    populate(&root).unwrap();
    let me = std::process::id();
    let pod_uid = format!("0000-aaaa-{me}");
    let (first, second) = (
        format!("janus-restart-1-{me}"),
        format!("janus-restart-2-{me}"),
    );
    // As the kubelet's cgroupfs driver places a pod's containers.
    let cgroup = |id: &str| format!("/kubepods/besteffort/pod{pod_uid}/{id}");
    let sleep = [BUSYBOX, "sleep", "600"];
    let running = Container::run(&root, &first, Some(&cgroup(&first)), &sleep).unwrap();

    let addr = support::free_addr();
    let args = [
        "--insecure-plaintext",
        "--backend",
        "fanotify",
        "--rescan-interval-ms",
        "200",
    ];
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_janus-agent"));
    let _agent = Serve::start(bin, addr, &args, &dir, "agent").unwrap();
    // The standard gRPC health service says the API serves.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let check = health
        .check(HealthCheckRequest {
            service: "janus.agent.v1.Agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.status, ServingStatus::Serving as i32);
    let mut client = AgentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let apply =
        |container: &str| support::apply("default", "restart", &pod_uid, &[container], DENY_SECRET);
    client.apply_guard(apply(&first)).await.unwrap();
    support::wait_denied(&running);

    // The container restarts: the kubelet makes a new one, under a new ID, in the same pod.
    // Nobody tells the agent.
    drop(running);
    let restarted = Container::run(&root, &second, Some(&cgroup(&second)), &sleep).unwrap();
    support::wait_denied(&restarted);
    let listed = client
        .list_guards(ListGuardsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let containers = &listed.guards[0].containers;
    let new = containers
        .iter()
        .find(|c| c.container_id == format!("containerd://{second}"))
        .unwrap_or_else(|| panic!("the new container is not listed: {containers:?}"));
    assert_eq!(new.phase, ContainerPhase::Enforced as i32);
    assert_eq!(new.pid, restarted.pid());

    // The controller catches up and lists the new ID: the container keeps its guard (no
    // lift and re-mark), the old ID goes.
    let guarded = || {
        let log = std::fs::read_to_string(dir.join("agent.err")).unwrap();
        log.lines()
            .filter(|l| l.contains("guarding container") && l.contains(&second))
            .count()
    };
    let guarded_before = guarded();
    let status = support::applied(&mut client, apply(&second)).await;
    let ids: Vec<&str> = status
        .containers
        .iter()
        .map(|c| c.container_id.as_str())
        .collect();
    assert_eq!(ids, [format!("containerd://{second}")]);
    assert_eq!(status.containers[0].phase, ContainerPhase::Enforced as i32);
    assert_eq!(
        guarded(),
        guarded_before,
        "re-guarded on the catch-up apply"
    );
    assert_eq!(
        restarted.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
        Access::Denied
    );
}

/// An attacker who can call the API names, for a pod it invents, the cgroup leaf of a host
/// unit and another pod's container. Both are refused, nothing is held, and both processes
/// keep reading the file the invented guard denies.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_outside_the_named_pods_cgroup_is_refused() {
    let dir = std::env::temp_dir().join("janus-serve-scope-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "rootfs").unwrap();
    populate(&root).unwrap();
    let me = std::process::id();
    let sleep = [BUSYBOX, "sleep", "600"];
    // A host unit, as systemd places one, and a container of another pod.
    let unit = format!("janus-host-{me}.service");
    let host = Container::run(
        &root,
        &format!("janus-host-{me}"),
        Some(&format!("/system.slice/{unit}")),
        &sleep,
    )
    .unwrap();
    let victim_id = format!("janus-victim-{me}");
    let victim = Container::run(
        &root,
        &victim_id,
        Some(&format!("/kubepods/besteffort/pod1111-{me}/{victim_id}")),
        &sleep,
    )
    .unwrap();
    for c in [&host, &victim] {
        assert_eq!(
            c.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
            Access::Ok("secret".into())
        );
    }

    let (_agent, mut client) = support::serve_plain(&dir).await;
    for (leaf, cgroup) in [
        (unit.clone(), format!("/system.slice/{unit}")),
        (
            victim_id.clone(),
            format!("/kubepods/besteffort/pod1111-{me}/{victim_id}"),
        ),
    ] {
        let err = client
            .apply_guard(support::apply(
                "attacker",
                "grab",
                &format!("2222-{me}"),
                &[&leaf],
                DENY_SECRET,
            ))
            .await
            .expect_err("a container outside the pod is refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains(&format!("runs in cgroup {cgroup}"))
                && err.message().contains("nothing guarded"),
            "{}",
            err.message()
        );
    }
    let listed = client
        .list_guards(ListGuardsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.guards.is_empty(), "{:?}", listed.guards);
    for c in [&host, &victim] {
        assert_eq!(
            c.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
            Access::Ok("secret".into())
        );
    }

    // In one batch, the refused item is refused alone: the other is applied.
    let grab = support::apply(
        "attacker",
        "grab",
        &format!("2222-{me}"),
        &[&victim_id],
        DENY_SECRET,
    );
    let own = support::apply(
        "default",
        "own",
        &format!("1111-{me}"),
        &[&victim_id],
        DENY_SECRET,
    );
    let keys: Vec<GuardKey> = [&grab, &own]
        .iter()
        .map(|r| GuardKey {
            guard_namespace: r.guard.as_ref().unwrap().namespace.clone(),
            guard_name: r.guard.as_ref().unwrap().name.clone(),
            pod_uid: r.pod.as_ref().unwrap().uid.clone(),
        })
        .collect();
    let results = client
        .apply_guards(ApplyGuardsRequest {
            items: vec![grab, own],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    match &results[..] {
        [ApplyResult {
            outcome: Some(apply_result::Outcome::Error(e)),
        }, ApplyResult {
            outcome: Some(apply_result::Outcome::Status(s)),
        }] => {
            assert_eq!(
                e.code,
                tonic::Code::PermissionDenied as i32,
                "{}",
                e.message
            );
            assert_eq!(s.key.as_ref().unwrap().guard_name, "own");
        }
        other => panic!("{other:?}"),
    }
    support::wait_denied(&victim);
    // A removal is for one guard UID: another one held under the key stays.
    let removal = |uid: &str| -> Vec<Removal> {
        keys.iter()
            .map(|k| Removal {
                key: Some(k.clone()),
                guard_uid: uid.into(),
            })
            .collect()
    };
    let removed = client
        .remove_guards(RemoveGuardsRequest {
            items: removal("another-uid"),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, [false, false]);
    assert_eq!(
        victim.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
        Access::Denied
    );
    let removed = client
        .remove_guards(RemoveGuardsRequest {
            items: removal("guard-uid"),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed, [false, true]);
    assert_eq!(
        victim.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
        Access::Ok("secret".into())
    );
}

/// The agent in a private cgroup namespace rooted in a pod's cgroup, as containerd starts an
/// unprivileged container on cgroup v2: other pods' cgroups then read `/../../pod<uid>/<id>`.
/// It joins the host's cgroup namespace and still finds and guards the container.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_in_its_own_cgroup_namespace_finds_containers() {
    let (dir, _root, pod_uid, id, container) = support::pod_container("cgroupns", "3333");
    let me = std::process::id();
    // The agent's own pod cgroup, in every hierarchy, and a wrapper that enters it and a
    // new cgroup namespace before it execs the agent.
    let agent_cgroup = format!("kubepods/besteffort/pod4444-{me}/agent");
    let wrapper = dir.join("in-pod-cgroupns.sh");
    std::fs::write(
        &wrapper,
        format!(
            r#"#!/bin/sh
set -e
for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [ -e "$h/cgroup.procs" ] || continue
    d="${{h}}{agent_cgroup}"
    mkdir -p "$d"
    # cpuset (v1) admits no process until its parent's CPUs and memory nodes are copied in.
    for f in cpuset.cpus cpuset.mems; do
        p="${{h}}"
        for c in $(echo "{agent_cgroup}" | tr / ' '); do
            p="$p$c/"
            [ -e "$p$f" ] && [ -z "$(cat "$p$f")" ] && cat "$(dirname "$p")/$f" > "$p$f"
        done
    done
    echo $$ > "$d/cgroup.procs"
done
grep -q kubepods /proc/self/cgroup
exec unshare --cgroup {agent} "$@"
"#,
            agent = env!("CARGO_BIN_EXE_janus-agent"),
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let addr = support::free_addr();
    let args = [
        "--insecure-plaintext",
        "--backend",
        "fanotify",
        "--rescan-interval-ms",
        "200",
    ];
    let agent = Serve::start(&wrapper, addr, &args, &dir, "agent").unwrap();
    // It runs in that cgroup, in a namespace of its own: without joining the host's, the
    // container's cgroup would read relative to it.
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", agent.pid())).unwrap();
    assert!(cgroups.contains(&agent_cgroup), "{cgroups}");
    let mut client = AgentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = support::applied(
        &mut client,
        support::apply("default", "cgns", &pod_uid, &[&id], DENY_SECRET),
    )
    .await;
    assert_eq!(status.containers[0].pid, container.pid(), "{status:?}");
    support::wait_denied(&container);
    drop(agent);
    drop(container);
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let pod = h.path().join(format!("kubepods/besteffort/pod4444-{me}"));
        let _ = std::fs::remove_dir(pod.join("agent"));
        let _ = std::fs::remove_dir(pod);
    }
}

/// A guard applied again with a changed spec, twenty times, while a process of the
/// container reads the denied file in a loop: every new target is placed before the old one
/// is lifted, so no read succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn no_read_succeeds_across_re_applies() {
    let (dir, root, pod_uid, id, container) = support::pod_container("reapply", "0000-cccc");
    let container = std::sync::Arc::new(container);

    let (_agent, mut client) = support::serve_plain(&dir).await;
    let spec = |round: usize| {
        format!(
            r#"{{"selector":{{}},"subjects":[{{"deny":["/data/secret"],"events":["open"],"tags":{{"round":"{round}"}}}}]}}"#
        )
    };
    let apply = |round: usize| support::apply("default", "reapply", &pod_uid, &[&id], &spec(round));
    client.apply_guard(apply(0)).await.unwrap();
    support::wait_denied(&container);

    let reader = support::LoopReader::start(container.clone(), &root);
    for round in 1..=20 {
        // Reads go on between every two applies.
        reader.wait_tries(2);
        let status = support::applied(&mut client, apply(round)).await;
        assert_eq!(
            status.containers[0].phase,
            ContainerPhase::Enforced as i32,
            "round {round}: {status:?}"
        );
    }
    let tries = reader.stop();
    assert!(
        tries.len() > 20,
        "the reader must have run across the re-applies: {tries:?}"
    );
    assert!(
        tries.iter().all(|&(read, _)| !read),
        "reads succeeded across re-applies: {tries:?}"
    );
    // Each refused read is a denial, and the count goes on across the re-applies (the
    // controller reports it; it must never go back).
    let listed = client
        .list_guards(ListGuardsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let denials = listed.guards[0].containers[0].denials;
    // The last refusal may be counted just after its read returned.
    assert!(
        denials + 1 >= tries.len() as u64,
        "{denials} denials counted for {} refused reads",
        tries.len()
    );
}

/// A guard rolled out in monitor mode refuses nothing and logs each would-be denial; the
/// controller switches it to enforce while a process of the container reads in a loop, and
/// every read begun after the switch's apply returned is refused.
#[tokio::test(flavor = "multi_thread")]
async fn every_read_after_a_switch_from_monitor_to_enforce_is_refused() {
    let (dir, root, pod_uid, id, container) = support::pod_container("monitor", "0000-dddd");
    let (_agent, mut client) = support::serve_plain(&dir).await;
    let spec = |mode: &str| {
        format!(
            r#"{{"selector":{{}},"mode":"{mode}","subjects":[{{"deny":["/data/secret"],"events":["open"]}}]}}"#
        )
    };
    let apply = |mode: &str| support::apply("default", "monitor", &pod_uid, &[&id], &spec(mode));
    client.apply_guard(apply("monitor")).await.unwrap();
    let logged = |start: &str| {
        std::fs::read_to_string(dir.join("agent.out"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(start) && l.contains("'/data/secret'"))
            .count()
    };
    // Every read goes through, and is logged as the denial it would have been.
    wait::until("a would-be denial logged", Duration::from_secs(10), || {
        let read = container.exec(&[BUSYBOX, "cat", "/data/secret"]).ok()?;
        assert_eq!(read, Access::Ok("secret".into()), "monitor mode refused");
        (logged("<DENY (monitor)> OPEN_PERM") > 0).then_some(())
    })
    .unwrap();

    let reader = support::LoopReader::start(std::sync::Arc::new(container), &root);
    reader.wait_tries(5);
    let status = support::applied(&mut client, apply("enforce")).await;
    assert_eq!(status.containers[0].phase, ContainerPhase::Enforced as i32);
    // Tries up to `done` had ended; the next may have begun before the switch.
    let done = reader.wait_tries(20);
    let tries = reader.stop();
    assert!(
        tries.iter().any(|&(read, n)| read && n <= done),
        "under monitor reads went through: {tries:?}"
    );
    let late: Vec<_> = tries.iter().filter(|&&(_, n)| n > done + 1).collect();
    assert!(
        late.len() >= 19,
        "too few reads after the switch: {tries:?}"
    );
    assert!(
        late.iter().all(|&&(read, _)| !read),
        "a read after the switch went through: {tries:?}"
    );
    assert!(logged("<DENY> OPEN_PERM") >= late.len());
}

/// The controller pushes a guard for a pod as soon as it is bound to this node, before any
/// of its containers exists. Each container that then appears in the pod's cgroup (the
/// sandbox first) is guarded by the agent alone, as soon as its cgroup is made (the rescan
/// is an hour away), and stays guarded when the guard changes before the controller has
/// heard of the container.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_pushed_at_scheduling_has_every_container_guarded() {
    let dir = std::env::temp_dir().join("janus-serve-scheduled-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let me = std::process::id();
    let pod_uid = format!("0000-eeee-{me}");
    let (sandbox_id, app_id) = (format!("janus-pause-{me}"), format!("janus-app-{me}"));
    let (_agent, mut client) = support::serve_plain_with(&dir, &support::NO_RESCAN).await;
    let spec = |round: usize| {
        format!(
            r#"{{"selector":{{}},"subjects":[{{"deny":["/data/secret"],"events":["open"],"tags":{{"round":"{round}"}}}}]}}"#
        )
    };
    let apply = |round: usize, ids: &[&str]| {
        support::apply("default", "sched", &pod_uid, ids, &spec(round))
    };
    let status = client
        .apply_guard(apply(0, &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(status.status.unwrap().containers.is_empty());

    let cgroup = |id: &str| format!("/kubepods/besteffort/pod{pod_uid}/{id}");
    let sleep = [BUSYBOX, "sleep", "600"];
    let roots: Vec<Root> = ["sandbox", "app"]
        .iter()
        .map(|name| {
            let root = Root::new(&dir, name).unwrap();
            populate(&root).unwrap();
            root
        })
        .collect();
    let sandbox =
        Container::run(&roots[0], &sandbox_id, Some(&cgroup(&sandbox_id)), &sleep).unwrap();
    let app = Container::run(&roots[1], &app_id, Some(&cgroup(&app_id)), &sleep).unwrap();
    support::wait_denied(&app);
    support::wait_denied(&sandbox);
    // Both listed as the agent's own finds, which the controller does not compare.
    let adopted = |status: &janus_api::agent_v1::GuardStatus| -> Vec<(String, bool, i32)> {
        let mut v: Vec<_> = status
            .containers
            .iter()
            .map(|c| (c.container_id.clone(), c.adopted, c.phase))
            .collect();
        v.sort();
        v
    };
    let enforced = ContainerPhase::Enforced as i32;
    let both = |app_adopted| {
        vec![
            (format!("containerd://{app_id}"), app_adopted, enforced),
            (format!("containerd://{sandbox_id}"), true, enforced),
        ]
    };
    let listed = client
        .list_guards(ListGuardsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adopted(&listed.guards[0]), both(true));

    // The guard changes before the controller lists any container: both stay guarded,
    // under the new spec.
    let status = client
        .apply_guard(apply(1, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adopted(&status.status.unwrap()), both(true));
    assert_eq!(
        app.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
        Access::Denied
    );
    // The controller hears of the app container and lists it.
    let status = client
        .apply_guard(apply(1, &[&app_id]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adopted(&status.status.unwrap()), both(false));
}

/// Without a start gate: a pod is pushed at scheduling, then its containers start, each
/// opening the denied file from its first instruction until refused. The rescan is an hour
/// away, so each refusal comes from the agent's watch on the cgroup tree. (How many starts
/// are refused from the first open is a race this test does not assert; `janus-start-window`
/// measures it.)
#[tokio::test(flavor = "multi_thread")]
async fn each_start_in_a_pod_pushed_at_scheduling_is_refused_without_a_rescan() {
    let dir = std::env::temp_dir().join("janus-serve-starts-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "rootfs").unwrap();
    populate(&root).unwrap();
    let (_agent, mut client) = support::serve_plain_with(&dir, &support::NO_RESCAN).await;
    // Opens until refused, at most 2,000 times (seconds of forks).
    let script = "n=0; while cat /data/secret >/dev/null 2>&1; do n=$((n+1)); \
                  [ $n -ge 2000 ] && break; done; echo $n > /tmp/opened";
    let me = std::process::id();
    for i in 0..10 {
        let pod_uid = format!("0000-ffff-{me}-{i}");
        let id = format!("janus-starts-{me}-{i}");
        client
            .apply_guard(support::apply(
                "default",
                "starts",
                &pod_uid,
                &[],
                DENY_SECRET,
            ))
            .await
            .unwrap();
        let _ = std::fs::remove_file(root.host("/tmp/opened"));
        let cgroup = format!("/kubepods/besteffort/pod{pod_uid}/{id}");
        janus_tests::containerd::run_to_end(&root, &id, &cgroup, &[BUSYBOX, "sh", "-c", script])
            .unwrap();
        let opened: u32 = std::fs::read_to_string(root.host("/tmp/opened"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(opened < 2000, "start {i} was never refused");
    }
}

/// The push arrives after the pod's container started, before the kubelet reported its ID:
/// the container is in the pod's cgroup, so it is the pod's and guarded at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_running_before_the_push_is_guarded_unlisted() {
    let (dir, _root, pod_uid, id, container) = support::pod_container("late", "0000-1111");
    let (_agent, mut client) = support::serve_plain(&dir).await;
    let status = support::applied(
        &mut client,
        support::apply("default", "late", &pod_uid, &[], DENY_SECRET),
    )
    .await;
    let listed: Vec<(&str, bool)> = status
        .containers
        .iter()
        .map(|c| (c.container_id.as_str(), c.adopted))
        .collect();
    assert_eq!(listed, [(format!("containerd://{id}").as_str(), true)]);
    support::wait_denied(&container);
}

/// A cgroup tree that cannot be watched (here: none at the path given) leaves new
/// containers to the rescan, and says so: the agent still starts and serves.
#[tokio::test(flavor = "multi_thread")]
async fn an_unwatchable_cgroup_tree_is_reported_not_fatal() {
    let dir = std::env::temp_dir().join("janus-serve-nowatch-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (addr, metrics) = (support::free_addr(), support::free_addr());
    let metrics_arg = metrics.to_string();
    let args = [
        "--insecure-plaintext",
        "--backend",
        "fanotify",
        "--cgroup-root",
        "/nonexistent/cgroup",
        "--metrics-addr",
        &metrics_arg,
    ];
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_janus-agent"));
    let _agent = Serve::start(bin, addr, &args, &dir, "agent").unwrap();
    let (code, body) = janus_tests::agent::http_get(metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        janus_tests::agent::sum_series(&body, "janus_cgroup_watch_failed"),
        1.0
    );
}

/// A guard that arrives while its pod's container is still being set up (its process in
/// the runtime's root, as runc's init is before `pivot_root`) is not placed there, where it
/// would name the node's files, and does not wait for the rescan (an hour away): the
/// container is guarded as soon as its process is in a root of its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_guard_pushed_while_its_container_is_set_up_waits_for_its_root() {
    let dir = std::env::temp_dir().join("janus-serve-settle-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "rootfs").unwrap();
    populate(&root).unwrap();
    let me = std::process::id();
    let (pod_uid, id) = (format!("0000-2222-{me}"), format!("janus-settle-{me}"));
    // As runc's init: in the container's cgroup, still in its parent's root, then in the
    // container's (`chroot` then stands for `pivot_root`).
    let script = format!(
        "read go; exec {BUSYBOX} chroot {} /bin/busybox sleep 600",
        root.dir().display()
    );
    let mut init = Killed(
        std::process::Command::new(BUSYBOX)
            .args(["sh", "-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = init.0.id() as i32;
    let hierarchy = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "/sys/fs/cgroup"
    } else {
        "/sys/fs/cgroup/pids"
    };
    let cgroup = format!("{hierarchy}/kubepods/besteffort/pod{pod_uid}/{id}");
    std::fs::create_dir_all(&cgroup).unwrap();
    std::fs::write(format!("{cgroup}/cgroup.procs"), pid.to_string()).unwrap();

    let (_agent, mut client) = support::serve_plain_with(&dir, &support::NO_RESCAN).await;
    let status = support::applied(
        &mut client,
        support::apply("default", "settle", &pod_uid, &[&id], DENY_SECRET),
    )
    .await;
    let c = &status.containers[0];
    assert_eq!(c.phase, ContainerPhase::Pending as i32, "{c:?}");
    assert!(c.reason.contains("runtime's root"), "{c:?}");
    assert_eq!(c.pid, 0);

    // The process moves into its root: guarded without a rescan or another push.
    use std::io::Write;
    init.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let enforced = loop {
        let listed = client
            .list_guards(ListGuardsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let c = listed.guards[0].containers[0].clone();
        if c.phase == ContainerPhase::Enforced as i32 {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "never guarded: {c:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(enforced.pid, pid);
    drop(init);
    let _ = std::fs::remove_dir(&cgroup);
}

/// A process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
