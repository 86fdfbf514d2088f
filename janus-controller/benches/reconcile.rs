//! The time to reconcile 5,000 pods across 100 nodes and 200 guards, and the controller's
//! memory while doing it. Agents are in-memory gRPC servers on loopback, the API is kube's
//! mock; the baseline row is the same pass with no guards (listing 100 agents).
//!
//! cargo bench -p janus-controller --bench reconcile

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use janus_controller::agents::AgentPool;
use janus_controller::metrics::Metrics;
use janus_controller::reconcile::Core;
use serde_json::json;
use support::{guard, pod, FakeAgent, MockApi, Stores};

const NODES: usize = 100;
const PODS: usize = 5_000;
const GUARDS: usize = 200;

/// Resident and peak resident memory of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |field: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

#[tokio::main]
async fn main() {
    let (client, _api) = MockApi::start();
    let mut stores = Stores::new();
    let mut agents = Vec::new();
    let mut addrs = Vec::new();
    for n in 0..NODES {
        let a = FakeAgent::default();
        addrs.push((format!("node-{n}"), a.serve().await));
        agents.push(a);
    }
    let refs: Vec<(&str, std::net::SocketAddr)> =
        addrs.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    stores.agents(&refs);
    let core = Arc::new(Core::new(
        client,
        stores.guards.0.clone(),
        stores.pods.0.clone(),
        stores.slices.0.clone(),
        AgentPool::new(None, Duration::from_secs(10)),
        Arc::new(Metrics::new()),
    ));
    let (rss0, _) = memory();

    let mut rows = Vec::new();
    let t = Instant::now();
    core.sync_all().await.unwrap();
    rows.push((
        "baseline: list 100 agents, no guards",
        t.elapsed(),
        memory(),
    ));

    for i in 0..PODS {
        let id = format!("containerd://{i:064x}");
        stores.pod(pod(
            &format!("pod-{i}"),
            &format!("node-{}", i % NODES),
            json!({"app": format!("app-{}", i % GUARDS)}),
            "Running",
            &[&id],
        ));
    }
    for g in 0..GUARDS {
        stores.guard(guard(
            &format!("guard-{g}"),
            1,
            json!({"selector": {"matchLabels": {"app": format!("app-{g}")}},
                   "subjects": [{"deny": ["/etc/secret"], "allow": ["/etc/secret/ok"], "events": ["open"]}]}),
        ));
    }
    let t = Instant::now();
    core.sync_all().await.unwrap();
    rows.push(("cold: push 5,000 pods x 200 guards", t.elapsed(), memory()));
    let held: usize = agents.iter().map(|a| a.held.lock().unwrap().len()).sum();
    assert_eq!(held, PODS, "every pod guarded once");

    let t = Instant::now();
    core.sync_all().await.unwrap();
    rows.push((
        "steady: list and compare, nothing to push",
        t.elapsed(),
        memory(),
    ));

    println!("Controller reconcile: {PODS} pods, {NODES} nodes, {GUARDS} guards (RSS before: {rss0:.1} MiB)");
    println!("| pass | time | RSS after (MiB) | peak RSS (MiB) |");
    println!("|---|---:|---:|---:|");
    for (name, time, (rss, peak)) in rows {
        println!(
            "| {name} | {:.1} ms | {rss:.1} | {peak:.1} |",
            time.as_secs_f64() * 1e3
        );
    }
}
