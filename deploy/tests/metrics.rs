//! Every metric the alerts and the dashboard query exists, with the labels they use and the
//! label values they match exactly: on a real agent guarding a real process during allowed
//! and denied opens (as root), and for the controller against its own registry
//! (`janus_controller::metrics`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use janus_agent::agent::Agent;
use janus_agent::metrics::Metrics;
use janus_agent::{decisions, http};
use janus_deploy::promql::check_queries;
use janus_deploy::render::{self, documents, find, monitoring_queries};

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Cleanup(Child, PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queried_metrics_exist_on_a_running_agent() {
    assert!(
        is_root(),
        "this test guards a process with fanotify and must run as root (as scripts/test.sh does)"
    );
    let dir = std::env::temp_dir().join(format!("janus-deploy-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data/public")).unwrap();
    std::fs::write(dir.join("data/secret"), "secret").unwrap();
    std::fs::write(dir.join("data/public/file"), "public").unwrap();
    let target = Command::new("sleep").arg("600").spawn().unwrap();
    let pid = target.id() as i32;
    let _cleanup = Cleanup(target, dir.clone());

    let d = dir.display();
    let yaml = format!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
         metadata: {{name: metrics, namespace: tests}}\n\
         spec:\n  selector: {{matchLabels: {{app: t}}}}\n  subjects:\n\
         \x20 - deny: [{d}/data]\n    allow: [{d}/data/public]\n    events: [open, access]\n"
    );
    let guard = janus_api::guard::parse_documents(&yaml).unwrap().remove(0);
    let policy = Arc::new(janus_api::GuardPolicy::from_guard(&guard).unwrap());

    let metrics = Arc::new(Metrics::new());
    // As on an agent wired through NRI, whose alert is among those checked.
    metrics.register_nri();
    let (log, writer) = decisions::start(Box::new(std::io::sink()), Default::default());
    let agent = Arc::new(
        Agent::new(
            metrics,
            log,
            "node-a".into(),
            &janus_agent::agent::EnforceArgs {
                backend: janus_agent::bpf::BackendChoice::Auto,
                answer_threads: 2,
                bpf_capacity: janus_agent::bpf::Capacity::default(),
                decision_format: Default::default(),
            },
        )
        .unwrap(),
    );
    agent.guard(policy, pid, "pod-1".into()).unwrap();
    let addr = http::serve("127.0.0.1:0".parse().unwrap(), agent.clone())
        .await
        .unwrap();

    let result = tokio::task::spawn_blocking(move || {
        // The probes of the rendered DaemonSet answer 200 on the agent's metrics address.
        let objs = documents(&render::rendered("janus-k8s.yaml").unwrap()).unwrap();
        let ds = find(&objs, "DaemonSet", "janus-agent").unwrap();
        let c = &ds["spec"]["template"]["spec"]["containers"][0];
        for probe in ["livenessProbe", "readinessProbe"] {
            let path = c[probe]["httpGet"]["path"].as_str().unwrap().to_owned();
            wait_for(&format!("{probe} {path} to answer 200"), || {
                http_get(addr, &path).0 == 200
            });
        }

        // Guarded activity, by another process (the agent allows its own accesses): a
        // denied and an allowed open, a directory created later.
        let cat = |path: &str| Command::new("cat").arg(dir.join(path)).output().unwrap();
        let denied = cat("data/secret");
        assert!(
            !denied.status.success()
                && String::from_utf8_lossy(&denied.stderr).contains("Operation not permitted"),
            "{denied:?}"
        );
        let allowed = cat("data/public/file");
        assert_eq!(allowed.stdout, b"public", "{allowed:?}");
        Command::new("mkdir")
            .arg(dir.join("data/later"))
            .status()
            .unwrap();
        wait_for("the new directory to be marked", || {
            http_get(addr, "/metrics")
                .1
                .contains("janus_new_directories_total{")
        });

        let (status, text) = http_get(addr, "/metrics");
        assert_eq!(status, 200);
        text
    })
    .await;
    agent.shutdown();
    writer.finish();
    let text = result.unwrap();
    assert!(
        text.contains("response=\"deny\"") && text.contains("response=\"allow\""),
        "no decisions counted:\n{text}"
    );

    let queries = monitoring_queries().unwrap();
    assert!(
        queries.len() >= 20,
        "the alerts and dashboard lost queries: {}",
        queries.len()
    );
    let controller = janus_controller::metrics::Metrics::new().render();
    let problems = check_queries(&[&text, &controller], &queries);
    assert!(
        problems.is_empty(),
        "{}\n\nagent metrics:\n{text}\n\ncontroller metrics:\n{controller}",
        problems.join("\n")
    );
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}
