//! The time to reconcile 5,000 pods across 100 nodes and 200 guards, and 20,000 pods across
//! 500 nodes and 1,000 guards, and the controller's memory while doing it. Agents are
//! in-memory gRPC servers on loopback, the API is kube's mock; each size's baseline row is
//! the same pass with no guards (listing its agents). Each size runs in a process of its
//! own, and its agents in another, so that the memory measured is the controller's (with its
//! stores and the mock API).
//!
//! cargo bench -p janus-controller --bench reconcile

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use janus_controller::agents::AgentPool;
use janus_controller::metrics::Metrics;
use janus_controller::reconcile::Core;
use serde_json::json;
use support::{guard, pod, FakeAgent, MockApi, Stores};

/// (nodes, pods, guards)
const SIZES: [(usize, usize, usize); 2] = [(100, 5_000, 200), (500, 20_000, 1_000)];

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        let i = args.iter().position(|a| a == name)?;
        args[i + 1].parse::<usize>().ok()
    };
    if let Some(n) = arg("--agents") {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(serve_agents(n));
        return;
    }
    if let Some(i) = arg("--size") {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(run(SIZES[i]));
        return;
    }
    println!(
        "| size | pass | time | agent calls | API writes | RSS after (MiB) | peak RSS (MiB) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for i in 0..SIZES.len() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--size", &i.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

/// `n` fake agents in this process (the agents' side, kept out of the controller's
/// memory): prints each one's address, then, for each line read on stdin, the calls and the
/// holdings of all of them; ends at end of input.
async fn serve_agents(n: usize) {
    let mut agents = Vec::new();
    for _ in 0..n {
        let a = FakeAgent::default();
        println!("{}", a.serve().await);
        agents.push(a);
    }
    tokio::task::spawn_blocking(move || {
        for _ in std::io::stdin().lines().map_while(Result::ok) {
            let calls: usize = agents.iter().map(|a| a.calls.load(Ordering::SeqCst)).sum();
            let held: usize = agents.iter().map(|a| a.held.lock().unwrap().len()).sum();
            println!("{calls} {held}");
        }
    })
    .await
    .unwrap();
}

/// The agents' process, asked for (calls, holdings).
struct Agents {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Agents {
    fn start(n: usize) -> (Agents, Vec<std::net::SocketAddr>) {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--agents", &n.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let addrs = (0..n)
            .map(|_| {
                let mut line = String::new();
                out.read_line(&mut line).unwrap();
                line.trim().parse().unwrap()
            })
            .collect();
        (Agents { child, out }, addrs)
    }

    fn counts(&mut self) -> (usize, usize) {
        use std::io::{BufRead, Write};
        writeln!(self.child.stdin.as_mut().unwrap()).unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let (calls, held) = line.trim().split_once(' ').unwrap();
        (calls.parse().unwrap(), held.parse().unwrap())
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run((nodes, pods, guards): (usize, usize, usize)) {
    let (client, api) = MockApi::start();
    let mut stores = Stores::new();
    let (mut agents, addrs) = Agents::start(nodes);
    let names: Vec<String> = (0..nodes).map(|n| format!("node-{n}")).collect();
    let refs: Vec<(&str, std::net::SocketAddr)> =
        names.iter().map(String::as_str).zip(addrs).collect();
    stores.agents(&refs);
    let core = Arc::new(Core::new(
        client,
        stores.guards.0.clone(),
        stores.pods.0.clone(),
        stores.slices.0.clone(),
        AgentPool::new(None, Duration::from_secs(10)),
        Arc::new(Metrics::new()),
    ));
    let writes = || api.seen.lock().unwrap().len();
    let size = format!("{pods} pods, {nodes} nodes, {guards} guards");
    let pass = |name: &str, took: Duration, calls: usize, writes: usize| {
        let (rss, peak) = memory();
        println!(
            "| {size} | {name} | {:.1} ms | {calls} | {writes} | {rss:.1} | {peak:.1} |",
            took.as_secs_f64() * 1e3
        );
    };

    // Connects to every agent, so that no row but this one's pays for it.
    core.sync_all().await.unwrap();
    let t = Instant::now();
    core.sync_all().await.unwrap();
    let took = t.elapsed();
    pass(
        &format!("baseline: list {nodes} agents, no guards"),
        took,
        agents.counts().0,
        writes(),
    );

    for i in 0..pods {
        let id = format!("containerd://{i:064x}");
        stores.pod(pod(
            &format!("pod-{i}"),
            &format!("node-{}", i % nodes),
            json!({"app": format!("app-{}", i % guards)}),
            "Running",
            &[&id],
        ));
    }
    for g in 0..guards {
        stores.guard(guard(
            &format!("guard-{g}"),
            1,
            json!({"selector": {"matchLabels": {"app": format!("app-{g}")}},
                   "subjects": [{"deny": ["/etc/secret"], "allow": ["/etc/secret/ok"], "events": ["open"]}]}),
        ));
    }
    let (c0, w0) = (agents.counts().0, writes());
    let t = Instant::now();
    core.sync_all().await.unwrap();
    let took = t.elapsed();
    let (c1, held) = agents.counts();
    assert_eq!(held, pods, "every pod guarded once");
    pass("cold: push every pod", took, c1 - c0, writes() - w0);

    // The first pass after a push lists every agent whole: what the controller knows of
    // them it learned from its own calls, not from a listing with a digest. From then on
    // an agent whose holdings did not change answers only that.
    for name in [
        "after the push: list whole and compare",
        "steady: list (unchanged) and compare",
    ] {
        let (c0, w0) = (agents.counts().0, writes());
        let t = Instant::now();
        core.sync_all().await.unwrap();
        let took = t.elapsed();
        pass(name, took, agents.counts().0 - c0, writes() - w0);
    }

    // A pod event: the one guard that selects the pod is synced (its pods found through
    // the index, compared with what their agents hold).
    let one = stores.guards.0.state().into_iter().next().unwrap();
    let (c0, w0) = (agents.counts().0, writes());
    let t = Instant::now();
    core.sync_guard(&one).await.unwrap();
    let took = t.elapsed();
    pass(
        "pod event: sync the guard selecting it",
        took,
        agents.counts().0 - c0,
        writes() - w0,
    );
}
