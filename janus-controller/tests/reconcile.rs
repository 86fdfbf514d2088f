//! The reconcile core against kube's mock API (status patches, Events) and in-memory agents
//! over loopback gRPC: selection, label changes, pod and guard deletion, drift, status.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use janus_controller::agents::AgentPool;
use janus_controller::metrics::Metrics;
use janus_controller::pod::PodView;
use janus_controller::reconcile::Core;
use serde_json::json;
use support::{guard, pod, FakeAgent, MockApi, Stores};

struct World {
    stores: Stores,
    api: MockApi,
    core: Core,
    a: FakeAgent,
    b: FakeAgent,
}

async fn world() -> World {
    let (client, api) = MockApi::start();
    let mut stores = Stores::new();
    let (a, b) = (FakeAgent::default(), FakeAgent::default());
    let (addr_a, addr_b) = (a.serve().await, b.serve().await);
    stores.agents(&[("node-a", addr_a), ("node-b", addr_b)]);
    let core = Core::new(
        client,
        stores.guards.0.clone(),
        stores.pods.0.clone(),
        stores.slices.0.clone(),
        AgentPool::new(None, Duration::from_secs(2)),
        Arc::new(Metrics::new()),
    );
    World {
        stores,
        api,
        core,
        a,
        b,
    }
}

fn web_guard(generation: i64) -> janus_controller::crd::JanusGuard {
    guard(
        "web",
        generation,
        json!({
            "selector": {"matchLabels": {"app": "web"},
                         "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["canary"]}]},
            "subjects": [{"deny": ["/etc/secret"], "events": ["open"]}],
        }),
    )
}

/// web-1, running on node-a with container c1.
fn web_1() -> PodView {
    pod(
        "web-1",
        "node-a",
        json!({"app": "web"}),
        "Running",
        &["containerd://c1"],
    )
}

fn populate(w: &mut World) {
    w.stores.guard(web_guard(1));
    w.stores.pod(web_1());
    w.stores.pod(pod(
        "web-2",
        "node-b",
        json!({"app": "web"}),
        "Running",
        &["containerd://c2", "containerd://c3"],
    ));
    w.stores.pod(pod(
        "web-canary",
        "node-b",
        json!({"app": "web", "tier": "canary"}),
        "Running",
        &["containerd://c4"],
    ));
    // Not scheduled yet: no node to push to.
    w.stores.pod(pod(
        "web-unscheduled",
        "",
        json!({"app": "web"}),
        "Pending",
        &[],
    ));
    w.stores.pod(pod(
        "db-1",
        "node-a",
        json!({"app": "db"}),
        "Running",
        &["containerd://c5"],
    ));
}

/// A pod as an agent was told of it: its name, its guards, whether it starts on failure.
type Told = (String, Vec<String>, bool);

/// The last word `agent` was told: its pods, and the namespaces that fail closed.
fn last_word(agent: &FakeAgent) -> (Vec<Told>, Vec<String>) {
    let words = agent.words.lock().unwrap();
    let word = words.last().expect("told nothing");
    let pods = word
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.guards.clone(), p.start_on_failure))
        .collect();
    (pods, word.closed_namespaces.clone())
}

#[tokio::test]
async fn each_agent_is_told_every_pod_bound_to_its_node_with_its_guards_or_none() {
    let mut w = world().await;
    populate(&mut w);
    w.stores.pod(pod(
        "web-done",
        "node-a",
        json!({"app": "web"}),
        "Succeeded",
        &[],
    ));
    w.core.tell_agents(false).await;
    let none = Vec::<String>::new;
    let (pods, closed) = last_word(&w.a);
    assert_eq!(
        pods,
        [
            ("db-1".into(), none(), true),
            ("web-1".into(), vec!["web".to_string()], false),
        ]
    );
    assert_eq!(closed, ["default"]);
    let (pods, _) = last_word(&w.b);
    let names: Vec<&str> = pods.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["web-2", "web-canary"]);
    assert_eq!(pods[1].1, none(), "the canary is not selected");

    // Told again only where the word changed: a pod bound to node-b.
    w.stores.pod(pod(
        "web-3",
        "node-b",
        json!({"app": "web"}),
        "Pending",
        &[],
    ));
    w.core.tell_agents(false).await;
    assert_eq!(w.a.words.lock().unwrap().len(), 1);
    assert_eq!(w.b.words.lock().unwrap().len(), 2);
    assert!(last_word(&w.b).0.iter().any(|p| p.0 == "web-3"));

    // A guard that fails open lets its pods start when the gate fails, unless another
    // guard of theirs fails closed.
    w.stores.guard(guard(
        "db",
        1,
        json!({"selector": {"matchLabels": {"app": "db"}}, "onGateFailure": "failOpen",
               "subjects": [{"deny": ["/etc/secret"]}]}),
    ));
    w.core.tell_agents(true).await;
    let (pods, _) = last_word(&w.a);
    assert_eq!(pods[0], ("db-1".into(), vec!["db".to_string()], true));
    assert_eq!(
        w.b.words.lock().unwrap().len(),
        3,
        "told again, as a periodic pass does"
    );
}

#[tokio::test]
async fn a_namespace_label_sets_the_failure_mode_of_guards_that_do_not() {
    let mut w = world().await;
    populate(&mut w);
    let label = |mode: &str| {
        [(
            janus_controller::gate::NAMESPACE_LABEL.to_owned(),
            mode.to_owned(),
        )]
        .into()
    };
    assert!(w.core.set_namespace("default", Some(&label("failOpen"))));
    w.core.tell_agents(false).await;
    let (pods, closed) = last_word(&w.a);
    assert_eq!(pods[1], ("web-1".into(), vec!["web".to_string()], true));
    assert!(closed.is_empty(), "{closed:?}");
    // A guard's own mode wins over its namespace's.
    w.stores.guard(guard(
        "web",
        2,
        json!({"selector": {"matchLabels": {"app": "web"}}, "onGateFailure": "failClosed",
               "subjects": [{"deny": ["/etc/secret"]}]}),
    ));
    w.core.tell_agents(false).await;
    let (pods, closed) = last_word(&w.a);
    assert!(!pods[1].2);
    assert_eq!(closed, ["default"]);
    // A namespace that fails closed refuses pods not named in time, guards or not; a label
    // that is no mode is closed; the same label again changes nothing.
    assert!(w.core.set_namespace("quiet", Some(&label("open"))));
    assert!(!w.core.set_namespace("quiet", Some(&label("failClosed"))));
    w.core.tell_agents(false).await;
    assert_eq!(last_word(&w.a).1, ["default", "quiet"]);
    assert!(w.core.set_namespace("quiet", None));
}

#[tokio::test]
async fn a_pod_is_pushed_once_bound_before_its_containers_exist() {
    let mut w = world().await;
    w.stores.guard(web_guard(1));
    let labels = json!({"app": "web"});
    w.stores
        .pod(pod("web-bound", "node-a", labels.clone(), "Pending", &[]));
    w.stores
        .pod(pod("web-unscheduled", "", labels.clone(), "Pending", &[]));
    w.stores
        .pod(pod("web-done", "node-a", labels.clone(), "Succeeded", &[]));
    // Its init container runs; its app and ephemeral containers are reported too.
    let mut init: PodView = pod(
        "web-init",
        "node-b",
        labels,
        "Pending",
        &["containerd://app"],
    );
    let status = init.status.as_mut().unwrap();
    // A completed init container keeps its ID in the status: nothing runs to guard.
    status.init_container_statuses = serde_json::from_value(json!([
        {"containerID": "containerd://setup", "state": {"terminated": {"exitCode": 0}}},
        {"containerID": "containerd://init", "state": {"running": {}}},
    ]))
    .unwrap();
    status.ephemeral_container_statuses =
        serde_json::from_value(json!([{"containerID": "containerd://debug"}])).unwrap();
    w.stores.pod(init);
    w.core.sync_guard(&web_guard(1)).await.unwrap();

    assert_eq!(w.a.pods(), ["web/pod-web-bound"]);
    assert_eq!(w.b.pods(), ["web/pod-web-init"]);
    let held = w.a.held.lock().unwrap().clone();
    assert!(held.values().all(|s| s.containers.is_empty()), "{held:?}");
    let held = w.b.held.lock().unwrap().clone();
    let ids: Vec<&str> = held
        .values()
        .flat_map(|s| &s.containers)
        .map(|c| c.container_id.as_str())
        .collect();
    assert_eq!(
        ids,
        [
            "containerd://init",
            "containerd://app",
            "containerd://debug"
        ]
    );
    // Held, but not guarded until a container of it is enforced.
    let ready = w.api.condition("web", "Ready").unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "Pending");
    assert_eq!(ready["message"], "1 of 2 selected pods guarded");
}

/// An agent guards what it finds in a pod's cgroup beyond the IDs it was sent (the pod's
/// sandbox): that is no reason to push the pod again on every pass.
#[tokio::test]
async fn containers_an_agent_adopted_do_not_make_a_holding_stale() {
    let mut w = world().await;
    populate(&mut w);
    w.a.adopt.store(true, Ordering::SeqCst);
    w.b.adopt.store(true, Ordering::SeqCst);
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    let applies = || w.a.applies.load(Ordering::SeqCst) + w.b.applies.load(Ordering::SeqCst);
    let first = applies();
    assert_eq!(first, 2);
    w.core.sync_all().await.unwrap();
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    assert_eq!(applies(), first);
}

#[tokio::test]
async fn a_guard_reaches_exactly_the_running_pods_it_selects() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    assert_eq!(w.b.pods(), ["web/pod-web-2"]);
    let status = w.api.status("web").expect("a status patch");
    assert_eq!(status["podsGuarded"], 2);
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(w.api.condition("web", "Ready").unwrap()["status"], "True");
    assert_eq!(
        w.api.condition("web", "Degraded").unwrap()["status"],
        "False"
    );
    // Idempotent: nothing is pushed again, nothing patched again.
    let applies = w.a.applies.load(Ordering::SeqCst) + w.b.applies.load(Ordering::SeqCst);
    let patches = w.api.seen.lock().unwrap().len();
    // As the watch would deliver it: with the status just written.
    let mut current = web_guard(1);
    current.status = Some(serde_json::from_value(status).unwrap());
    w.core.sync_guard(&current).await.unwrap();
    assert_eq!(
        w.a.applies.load(Ordering::SeqCst) + w.b.applies.load(Ordering::SeqCst),
        applies
    );
    assert_eq!(w.api.seen.lock().unwrap().len(), patches);
}

#[tokio::test]
async fn every_selector_operator_selects_as_kubernetes_does() {
    let mut w = world().await;
    let g = guard(
        "ops",
        1,
        json!({
            "selector": {"matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "back"]},
                {"key": "env", "operator": "NotIn", "values": ["dev"]},
                {"key": "team", "operator": "Exists"},
                {"key": "canary", "operator": "DoesNotExist"},
            ]},
            "subjects": [{"deny": ["/etc/secret"]}],
        }),
    );
    w.stores.guard(g.clone());
    for (name, labels) in [
        (
            "all-fit",
            json!({"tier": "front", "env": "prod", "team": "a"}),
        ),
        ("no-env-fits-notin", json!({"tier": "back", "team": "b"})),
        ("tier-not-in", json!({"tier": "db", "team": "a"})),
        (
            "env-in-notin",
            json!({"tier": "back", "env": "dev", "team": "a"}),
        ),
        ("no-team", json!({"tier": "front"})),
        (
            "canary",
            json!({"tier": "front", "team": "a", "canary": "yes"}),
        ),
    ] {
        w.stores
            .pod(pod(name, "node-a", labels, "Running", &["containerd://c"]));
    }
    w.core.sync_guard(&g).await.unwrap();
    assert_eq!(w.a.pods(), ["ops/pod-all-fit", "ops/pod-no-env-fits-notin"]);
}

#[tokio::test]
async fn label_changes_and_pod_deletion_change_the_set() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    // web-2 leaves the selection; db-1 joins it.
    w.stores.pod(pod(
        "web-2",
        "node-b",
        json!({"app": "other"}),
        "Running",
        &["containerd://c2"],
    ));
    w.stores.pod(pod(
        "db-1",
        "node-a",
        json!({"app": "web"}),
        "Running",
        &["containerd://c5"],
    ));
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-db-1", "web/pod-web-1"]);
    assert!(w.b.pods().is_empty());
    w.stores.delete_pod(pod(
        "web-1",
        "node-a",
        json!({"app": "web"}),
        "Running",
        &[],
    ));
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-db-1"]);
    assert_eq!(w.api.status("web").unwrap()["podsGuarded"], 1);
}

#[tokio::test]
async fn a_changed_spec_is_pushed_again() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    let mut changed = web_guard(2);
    changed.spec = serde_json::from_value(json!({
        "selector": {"matchLabels": {"app": "web"}},
        "subjects": [{"deny": ["/etc/other"], "events": ["open"]}],
    }))
    .unwrap();
    w.stores.guard(changed.clone());
    w.core.sync_guard(&changed).await.unwrap();
    let digest = janus_api::holding::spec_digest(&changed.spec.to_json());
    let held = w.a.held.lock().unwrap();
    assert!(held
        .values()
        .all(|s| s.generation == 2 && s.spec_digest == digest));
    drop(held);
    assert_eq!(w.api.status("web").unwrap()["observedGeneration"], 2);
}

#[tokio::test]
async fn a_mode_switch_is_pushed_and_shown_in_the_status() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    assert_eq!(w.api.status("web").unwrap()["mode"], "enforce");
    let with_mode = |generation, spec: serde_json::Value| {
        let mut g = web_guard(generation);
        g.spec = serde_json::from_value(spec).unwrap();
        g
    };
    let subjects = json!([{"deny": ["/etc/secret"], "events": ["open"]}]);
    let selector = json!({"matchLabels": {"app": "web"}});
    for (generation, spec, shown) in [
        (
            2,
            json!({"selector": selector, "subjects": subjects, "mode": "monitor"}),
            "monitor",
        ),
        (
            3,
            json!({"selector": selector, "mode": "monitor",
                   "subjects": [{"deny": ["/etc/secret"], "mode": "enforce"}, {"deny": ["/tmp/x"]}]}),
            "mixed",
        ),
        (
            4,
            json!({"selector": selector, "subjects": subjects, "mode": "enforce"}),
            "enforce",
        ),
    ] {
        let g = with_mode(generation, spec);
        let before = w.a.applies.load(Ordering::SeqCst);
        w.stores.guard(g.clone());
        w.core.sync_guard(&g).await.unwrap();
        assert!(
            w.a.applies.load(Ordering::SeqCst) > before,
            "{shown}: pushed again"
        );
        let digest = janus_api::holding::spec_digest(&g.spec.to_json());
        assert!(w
            .a
            .held
            .lock()
            .unwrap()
            .values()
            .all(|s| s.spec_digest == digest));
        let status = w.api.status("web").unwrap();
        assert_eq!(
            (
                status["mode"].as_str(),
                status["observedGeneration"].as_i64()
            ),
            (Some(shown), Some(generation))
        );
    }
}

/// Whatever generation an agent reports, a spec other than the controller's is replaced by
/// the next pass; one that is the controller's is left alone.
#[tokio::test]
async fn a_tampered_holding_is_repaired_whatever_its_generation() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    let pushed = w.a.applies.load(Ordering::SeqCst);
    for s in w.a.held.lock().unwrap().values_mut() {
        s.generation = i64::MAX;
        s.spec_digest = janus_api::holding::spec_digest(r#"{"subjects":[{"allow":["/"]}]}"#);
    }
    w.core.sync_all().await.unwrap();
    let repaired = w.a.applies.load(Ordering::SeqCst) - pushed;
    let digest = janus_api::holding::spec_digest(&web_guard(1).spec.to_json());
    {
        let held = w.a.held.lock().unwrap();
        assert_eq!(repaired, held.len(), "every tampered holding pushed again");
        assert!(held.values().all(|s| s.spec_digest == digest));
    }
    // The same spec reported at another generation is not pushed again.
    for s in w.a.held.lock().unwrap().values_mut() {
        s.generation = 7;
    }
    let before = w.a.applies.load(Ordering::SeqCst);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.applies.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn a_guard_created_again_under_its_name_is_pushed_again() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    // Deleted and created again within one period: generation 1 again, another UID.
    w.stores.delete_guard(web_guard(1));
    let mut again = web_guard(1);
    again.metadata.uid = Some("uid-web-again".into());
    w.stores.guard(again);
    w.core.sync_all().await.unwrap();
    let held = w.a.held.lock().unwrap();
    assert_eq!(held.len(), 1);
    assert!(held.values().all(|s| s.guard_uid == "uid-web-again"));
}

#[tokio::test]
async fn periodic_sync_lifts_deleted_guards_and_restores_restarted_agents() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    // The agent on node-b restarts and forgets; an agent holds a guard nobody wants.
    w.b.held.lock().unwrap().clear();
    w.a.held.lock().unwrap().insert(
        ("default".into(), "deleted-guard".into(), "pod-x".into()),
        janus_api::agent_v1::GuardStatus {
            key: Some(janus_api::agent_v1::GuardKey {
                guard_namespace: "default".into(),
                guard_name: "deleted-guard".into(),
                pod_uid: "pod-x".into(),
            }),
            ..Default::default()
        },
    );
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    assert_eq!(w.b.pods(), ["web/pod-web-2"]);
    // The guard is deleted: the next pass lifts it everywhere.
    w.stores.delete_guard(web_guard(1));
    w.core.sync_all().await.unwrap();
    assert!(w.a.pods().is_empty() && w.b.pods().is_empty());
}

#[tokio::test]
async fn unsupported_events_failures_and_unreachable_agents_degrade_the_guard() {
    let mut w = world().await;
    let modify = guard(
        "mod",
        1,
        json!({"selector": {"matchLabels": {"app": "web"}},
               "subjects": [{"allow": ["/data"], "events": ["modify"]}]}),
    );
    w.stores.guard(modify.clone());
    w.stores.pod(web_1());
    w.core.sync_guard(&modify).await.unwrap();
    let degraded = w.api.condition("mod", "Degraded").unwrap();
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "UnsupportedEvent");
    let msg = degraded["message"].as_str().unwrap();
    assert!(
        msg.contains("event modify not supported by the fanotify backend on node node-a"),
        "{msg}"
    );
    assert!(w
        .api
        .events()
        .iter()
        .any(|(r, n)| r == "UnsupportedEvent" && n.contains("node-a")));

    // A pod on a node whose agent does not answer.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let addr_a = w.stores.slices.0.state().iter().find_map(|s| {
        let ep = &s.endpoints[0];
        (ep.node_name.as_deref() == Some("node-a")).then(|| {
            format!(
                "{}:{}",
                ep.addresses[0],
                s.ports.as_ref().unwrap()[0].port.unwrap()
            )
        })
    });
    let addr_a: std::net::SocketAddr = addr_a.unwrap().parse().unwrap();
    w.stores.agents(&[("node-a", addr_a), ("node-c", dead)]);
    w.stores.pod(pod(
        "web-3",
        "node-c",
        json!({"app": "web"}),
        "Running",
        &["containerd://c9"],
    ));
    w.a.fail.store(true, Ordering::SeqCst);
    w.a.held.lock().unwrap().clear();
    w.core.sync_all().await.unwrap();
    let degraded = w.api.condition("mod", "Degraded").unwrap();
    let msg = degraded["message"].as_str().unwrap();
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(
        msg.contains("container containerd://c1 on node node-a: no such process"),
        "{msg}"
    );
    assert_eq!(w.api.condition("mod", "Ready").unwrap()["status"], "False");
    assert_eq!(w.api.status("mod").unwrap()["podsGuarded"], 0);
}

#[tokio::test]
async fn an_invalid_guard_is_reported_and_pushed_nowhere() {
    let mut w = world().await;
    let bad = guard("bad", 1, json!({"subjects": [{"events": ["open"]}]}));
    w.stores.guard(bad.clone());
    w.stores.pod(web_1());
    w.core.sync_guard(&bad).await.unwrap();
    assert!(w.a.pods().is_empty());
    let degraded = w.api.condition("bad", "Degraded").unwrap();
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(degraded["message"]
        .as_str()
        .unwrap()
        .contains("spec.subjects[0]"));
}

/// A guard that becomes invalid (stored before the schema refused what it has) is refused
/// loudly and keeps what was pushed for it while it was valid: no silent unguarding.
#[tokio::test]
async fn a_guard_that_becomes_invalid_keeps_its_holdings() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    let mut bare = web_guard(2);
    bare.spec.selector = None;
    w.stores.guard(bare.clone());
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    assert_eq!(w.b.pods(), ["web/pod-web-2"]);
    let ready = w.api.condition("web", "Ready").unwrap();
    assert_eq!(ready["reason"], "InvalidSpec");
}

/// A guard stored without a selector (created before the schema required one) selects
/// nothing: it is refused with the field named, and pushed nowhere.
#[tokio::test]
async fn a_guard_without_a_selector_is_refused_and_pushed_nowhere() {
    let mut w = world().await;
    let bare = guard("bare", 1, json!({"subjects": [{"deny": ["/etc/secret"]}]}));
    w.stores.guard(bare.clone());
    w.stores.pod(web_1());
    w.core.sync_guard(&bare).await.unwrap();
    assert!(w.a.pods().is_empty());
    let degraded = w.api.condition("bare", "Degraded").unwrap();
    assert_eq!(degraded["reason"], "InvalidSpec");
    let msg = degraded["message"].as_str().unwrap();
    assert!(msg.starts_with("spec.selector: is required"), "{msg}");

    // `{}` selects every pod of the namespace, as in Kubernetes.
    let all = guard(
        "all",
        1,
        json!({"selector": {}, "subjects": [{"deny": ["/etc/secret"]}]}),
    );
    w.stores.guard(all.clone());
    w.core.sync_guard(&all).await.unwrap();
    assert_eq!(w.a.pods(), ["all/pod-web-1"]);
}

/// A deleted guard is lifted from every agent at once, not at the next pass; a guard
/// created again under its name in the meantime keeps what was pushed for it.
#[tokio::test]
async fn a_deleted_guard_is_lifted_at_once_and_only_its_own_holdings() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    assert_eq!(w.b.pods(), ["web/pod-web-2"]);
    w.stores.delete_guard(web_guard(1));
    w.core.lift_deleted(&web_guard(1)).await;
    assert!(w.a.pods().is_empty() && w.b.pods().is_empty());

    // The guard is created again and its push reaches an agent while the old one's lift is
    // on its way (the controller still remembers the old UID there): the lift, meant for
    // the old UID, leaves the new guard in place.
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    for s in w.a.held.lock().unwrap().values_mut() {
        s.guard_uid = "uid-web-again".into();
    }
    w.core.lift_deleted(&web_guard(1)).await;
    assert_eq!(w.a.pods(), ["web/pod-web-1"], "the new guard was lifted");
    assert!(w.b.pods().is_empty());
    w.a.held.lock().unwrap().clear();

    // Created again, pushed, and then the first one's delete comes late: nothing lifted.
    let mut again = web_guard(1);
    again.metadata.uid = Some("uid-web-again".into());
    w.stores.guard(again.clone());
    w.core.sync_guard(&again).await.unwrap();
    w.core.lift_deleted(&web_guard(1)).await;
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    assert_eq!(w.b.pods(), ["web/pod-web-2"]);
}

/// Deleted while the controller was down: the next controller's first pass lifts it.
#[tokio::test]
async fn a_guard_deleted_while_the_controller_was_down_is_lifted_at_the_first_pass() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    // The controller stops; the guard is deleted; a new controller starts with stores that
    // never saw it, and knows nothing of what the agents hold.
    w.stores.delete_guard(web_guard(1));
    let restarted = Core::new(
        w.core.client.clone(),
        w.stores.guards.0.clone(),
        w.stores.pods.0.clone(),
        w.stores.slices.0.clone(),
        AgentPool::new(None, Duration::from_secs(2)),
        Arc::new(Metrics::new()),
    );
    restarted.sync_all().await.unwrap();
    assert!(w.a.pods().is_empty() && w.b.pods().is_empty());
}

/// Each node's agent gets one call per pass for every guard together, and none when it
/// holds what is wanted; nor does the API server get a status write.
#[tokio::test]
async fn a_pass_makes_one_batched_call_per_node_and_none_when_current() {
    let mut w = world().await;
    populate(&mut w);
    for g in ["db", "all"] {
        let selector = if g == "db" {
            json!({"matchLabels": {"app": "db"}})
        } else {
            json!({})
        };
        w.stores.guard(guard(
            g,
            1,
            json!({"selector": selector, "subjects": [{"deny": ["/etc/secret"]}]}),
        ));
    }
    w.core.sync_all().await.unwrap();
    // node-a: web-1 (web, all), db-1 (db, all); node-b: web-2, web-canary (all), web-2 (web).
    assert_eq!(w.a.applies.load(Ordering::SeqCst), 4);
    assert_eq!(w.a.calls.load(Ordering::SeqCst), 1);
    assert_eq!(w.b.applies.load(Ordering::SeqCst), 3);
    assert_eq!(w.b.calls.load(Ordering::SeqCst), 1);
    let writes = |w: &World| w.api.seen.lock().unwrap().len();
    let before = writes(&w);
    w.core.sync_all().await.unwrap();
    assert_eq!(
        w.a.calls.load(Ordering::SeqCst),
        1,
        "a call with nothing to push"
    );
    assert_eq!(w.b.calls.load(Ordering::SeqCst), 1);
    assert_eq!(writes(&w), before, "a status written with nothing changed");

    // The db guard is deleted while the controller is away: one batched lift on node-a.
    w.stores.delete_guard(guard(
        "db",
        1,
        json!({"selector": {}, "subjects": [{"deny": ["/etc/secret"]}]}),
    ));
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        w.a.pods(),
        ["all/pod-db-1", "all/pod-web-1", "web/pod-web-1"]
    );
}

/// An agent whose holdings did not change since its last listing answers only that; one
/// whose holdings changed behind the controller's back is listed whole, whatever changed.
#[tokio::test]
async fn an_unchanged_agent_answers_only_that_and_a_changed_one_is_listed_whole() {
    let mut w = world().await;
    populate(&mut w);
    // The push, then a listing whole (what the controller knew came from its own calls).
    w.core.sync_all().await.unwrap();
    w.core.sync_all().await.unwrap();
    let unchanged = |a: &FakeAgent| a.unchanged.load(Ordering::SeqCst);
    assert_eq!((unchanged(&w.a), unchanged(&w.b)), (0, 0));
    w.core.sync_all().await.unwrap();
    assert_eq!((unchanged(&w.a), unchanged(&w.b)), (1, 1));
    assert_eq!(w.api.condition("web", "Ready").unwrap()["status"], "True");

    // web-1's container fails on node-a: only its phase changes, and the status shows it.
    for s in w.a.held.lock().unwrap().values_mut() {
        s.containers[0].phase = janus_api::agent_v1::ContainerPhase::Failed as i32;
        s.containers[0].reason = "marks lost".into();
    }
    w.core.sync_all().await.unwrap();
    assert_eq!(unchanged(&w.a), 1, "a changed listing is sent whole");
    assert_eq!(unchanged(&w.b), 2);
    let degraded = w.api.condition("web", "Degraded").unwrap();
    assert_eq!(degraded["reason"], "ContainerFailed", "{degraded}");
    // node-b's agent restarts and forgets: its next listing differs, and it is repaired.
    w.b.held.lock().unwrap().clear();
    w.core.sync_all().await.unwrap();
    assert_eq!(unchanged(&w.b), 2);
    assert_eq!(w.b.pods(), ["web/pod-web-2"]);
}

/// A failure on many pods makes a bounded Degraded message that still says how many.
#[tokio::test]
async fn a_failure_on_many_pods_is_summed_up_not_spelled_out() {
    let mut w = world().await;
    w.stores.guard(web_guard(1));
    for i in 0..300 {
        let id = format!("containerd://f{i}");
        w.stores.pod(pod(
            &format!("web-{i}"),
            "node-a",
            json!({"app": "web"}),
            "Running",
            &[&id],
        ));
    }
    w.a.fail.store(true, Ordering::SeqCst);
    w.core.sync_all().await.unwrap();
    let degraded = w.api.condition("web", "Degraded").unwrap();
    assert_eq!(degraded["reason"], "ContainerFailed");
    let msg = degraded["message"].as_str().unwrap();
    assert!(msg.ends_with("; and 290 more"), "{msg}");
    assert!(msg.len() < 4096, "{} bytes", msg.len());
    assert_eq!(w.api.condition("web", "Ready").unwrap()["status"], "False");
}

/// A guard that could not be lifted from a pod it no longer selects says so on its status.
#[tokio::test]
async fn a_lift_that_fails_degrades_the_guard_until_it_succeeds() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.b.pods(), ["web/pod-web-2"]);
    // web-2 leaves the selector while node-b's agent refuses removals.
    w.b.refuse_removals.store(true, Ordering::SeqCst);
    w.stores.pod(pod(
        "web-2",
        "node-b",
        json!({"app": "other"}),
        "Running",
        &["containerd://c2", "containerd://c3"],
    ));
    w.core.sync_guard(&web_guard(1)).await.unwrap();
    let degraded = w.api.condition("web", "Degraded").unwrap();
    assert_eq!(degraded["reason"], "LiftFailed", "{degraded}");
    let msg = degraded["message"].as_str().unwrap();
    assert!(msg.contains("pod pod-web-2 on node node-b"), "{msg}");
    assert!(w.api.events().iter().any(|(r, _)| r == "LiftFailed"));
    w.b.refuse_removals.store(false, Ordering::SeqCst);
    w.core.sync_all().await.unwrap();
    assert!(w.b.pods().is_empty());
    assert_eq!(
        w.api.condition("web", "Degraded").unwrap()["status"],
        "False"
    );
}

/// A pass that read a guard before it was deleted does not push it again after.
#[tokio::test]
async fn a_guard_deleted_during_a_pass_is_not_pushed_again() {
    let mut w = world().await;
    w.stores.pod(web_1());
    // The pass holds this copy; the store no longer has the guard.
    let deleted = web_guard(1);
    w.core.sync_guard(&deleted).await.unwrap();
    assert!(w.a.pods().is_empty());
    assert!(w.api.status("web").is_none(), "no status written for it");
    // Under its name, a guard created again (another UID) is not this one either.
    let mut again = web_guard(1);
    again.metadata.uid = Some("uid-web-again".into());
    w.stores.guard(again);
    w.core.sync_guard(&deleted).await.unwrap();
    assert!(w.a.pods().is_empty());
}

/// A pod event concerns only the guards that select the pod, or hold it.
#[tokio::test]
async fn a_pod_event_touches_only_the_guards_that_select_or_hold_it() {
    let mut w = world().await;
    populate(&mut w);
    w.stores.guard(guard(
        "db",
        1,
        json!({"selector": {"matchLabels": {"app": "db"}}, "subjects": [{"deny": ["/x"]}]}),
    ));
    w.core.sync_all().await.unwrap();
    let names =
        |refs: Vec<kube::runtime::reflector::ObjectRef<janus_controller::crd::JanusGuard>>| {
            let mut v: Vec<String> = refs.into_iter().map(|r| r.name).collect();
            v.sort();
            v
        };
    let running = |name: &str, app: &str, id: &str| {
        pod(name, "node-a", json!({"app": app}), "Running", &[id])
    };
    assert_eq!(names(w.core.guards_touched_by(&web_1())), ["web"]);
    let db_1 = running("db-1", "db", "containerd://c5");
    assert_eq!(names(w.core.guards_touched_by(&db_1)), ["db"]);
    // web-1 is relabelled db: the db guard now selects it and the web guard still holds it.
    let moved = running("web-1", "db", "containerd://c1");
    assert_eq!(names(w.core.guards_touched_by(&moved)), ["db", "web"]);
    // A pod no guard selects or holds concerns none.
    let other = pod("other", "node-a", json!({"app": "other"}), "Running", &[]);
    assert!(w.core.guards_touched_by(&other).is_empty());
}

/// An agent of an earlier release, without the batched calls, is sent one call per pod.
#[tokio::test]
async fn an_agent_without_batched_calls_gets_one_call_per_pod() {
    let mut w = world().await;
    w.a.legacy.store(true, Ordering::SeqCst);
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    assert_eq!(w.a.calls.load(Ordering::SeqCst), 1, "one ApplyGuard");
    assert_eq!(w.api.condition("web", "Ready").unwrap()["status"], "True");
    w.stores.delete_guard(web_guard(1));
    w.core.lift_deleted(&web_guard(1)).await;
    assert!(w.a.pods().is_empty());
    assert_eq!(w.a.calls.load(Ordering::SeqCst), 2, "and one RemoveGuard");
    // It names no digest of its listing: it is listed whole at every pass.
    w.stores.guard(web_guard(1));
    for _ in 0..3 {
        w.core.sync_all().await.unwrap();
    }
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    assert_eq!(w.a.unchanged.load(Ordering::SeqCst), 0);
}

/// Adds `n` denials by `/usr/bin/cat` to every container the fake agent holds for `pod`.
fn deny(agent: &FakeAgent, pod: &str, n: u64, pid: i32, at: &str) {
    for s in agent.held.lock().unwrap().values_mut() {
        if s.pod_name != pod {
            continue;
        }
        for c in &mut s.containers {
            c.denials += n;
            c.last_denied_by = "/usr/bin/cat".into();
            c.last_denied_pid = pid;
            c.last_denied_at = at.into();
        }
    }
}

fn writes(api: &MockApi) -> usize {
    api.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method != "GET")
        .count()
}

#[tokio::test]
async fn a_burst_of_denials_is_one_event_and_a_count_not_a_write_each() {
    let mut w = world().await;
    populate(&mut w);
    w.core.sync_all().await.unwrap();
    assert_eq!(w.a.pods(), ["web/pod-web-1"]);
    let before = writes(&w.api);
    // 10,000 denials in web-1, seen over ten passes (a pass every few seconds).
    for i in 0..10 {
        deny(
            &w.a,
            "web-1",
            1_000,
            4000 + i,
            &format!("2026-12-04T11:00:{i:02}Z"),
        );
        w.core.sync_all().await.unwrap();
    }
    let denied: Vec<String> = w
        .api
        .events()
        .into_iter()
        .filter(|(reason, _)| reason == "Denied")
        .map(|(_, note)| note)
        .collect();
    // The first pass reports at once; the rest wait for the window (a minute).
    assert_eq!(
        denied,
        ["1000 denials in pod web-1, last by /usr/bin/cat pid 4000 at 2026-12-04T11:00:00.000Z"]
    );
    let status = w.api.status("web").unwrap();
    assert_eq!(status["denials"], 10_000);
    assert_eq!(
        status["lastDenial"],
        json!({"pod": "web-1", "by": "/usr/bin/cat", "pid": 4009, "at": "2026-12-04T11:00:09.000Z"})
    );
    // One Event and at most a status write per pass, not one per denial.
    assert!(
        writes(&w.api) - before <= 11,
        "{} writes",
        writes(&w.api) - before
    );
    // Passes with nothing new write nothing.
    let settled = writes(&w.api);
    w.core.sync_all().await.unwrap();
    assert_eq!(writes(&w.api), settled);
}

#[tokio::test]
async fn denials_held_back_are_reported_with_their_count_once_the_window_passed() {
    let World {
        mut stores,
        api,
        core,
        a,
        ..
    } = world().await;
    let core = core.with_denial_window(Duration::from_millis(300));
    stores.guard(web_guard(1));
    stores.pod(web_1());
    core.sync_all().await.unwrap();
    deny(&a, "web-1", 1, 7, "2026-12-04T11:00:00Z");
    core.sync_all().await.unwrap();
    deny(&a, "web-1", 9_999, 8, "2026-12-04T11:00:01Z");
    core.sync_all().await.unwrap();
    let denied = || {
        api.events()
            .into_iter()
            .filter(|(reason, _)| reason == "Denied")
            .map(|(_, note)| note)
            .collect::<Vec<_>>()
    };
    assert_eq!(denied().len(), 1);
    // Once the window has passed, the next pass says what was held back.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while denied().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{:?}", denied());
        tokio::time::sleep(Duration::from_millis(50)).await;
        core.sync_all().await.unwrap();
    }
    let notes = denied();
    assert!(
        notes[1].starts_with("9999 denials in pod web-1 in the last ")
            && notes[1].ends_with("last by /usr/bin/cat pid 8 at 2026-12-04T11:00:01.000Z"),
        "{notes:?}"
    );
}
