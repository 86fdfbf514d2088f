//! `--backend auto` on a kernel that refuses BPF LSM programs (this machine's: EPERM), or
//! on a build without the BPF object, must fall back to fanotify, say why in one line and
//! still enforce; `--backend bpf` must refuse to start instead. Needs root.

use std::path::Path;

use janus_tests::agent::{Agent, AgentConfig};
use janus_tests::scenarios::{guard_yaml, populate};
use janus_tests::target::{Access, Root, Target};

const AGENT: &str = env!("CARGO_BIN_EXE_janus-agent");

fn config<'a>(guard: &'a str, pids: &'a [i32], extra: &'a [&'a str]) -> AgentConfig<'a> {
    AgentConfig {
        bin: Path::new(AGENT),
        guard,
        pids,
        pod: "fallback-pod",
        node: "fallback-node",
        extra,
    }
}

#[test]
fn auto_falls_back_to_fanotify_and_bpf_alone_refuses() {
    let dir = std::env::temp_dir().join(format!("janus-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "fallback").unwrap();
    populate(&root).unwrap();
    let target = Target::start(&root).unwrap();
    let pids = [target.pid()];
    let guard = guard_yaml("fallback", "  - deny: [/data/secret]\n    events: [open]\n");

    // auto: falls back, guards with fanotify, and the guard is enforced.
    let mut auto = Agent::start(
        &config(&guard, &pids, &["--backend", "auto"]),
        &dir.join("auto"),
    )
    .unwrap();
    auto.wait_for("a fanotify guarding line", |_, err| {
        err.lines()
            .any(|l| l.contains(" guarding") && l.contains("fanotify"))
    })
    .unwrap();
    let text = auto.stderr();
    assert!(
        text.contains("falling back to fanotify"),
        "the fallback must be logged with its reason; stderr:\n{text}"
    );
    assert!(
        text.contains("not compiled in") || text.contains("loading") || text.contains("not active"),
        "the reason BPF did not run must be named; stderr:\n{text}"
    );
    assert_eq!(
        text.matches("falling back to fanotify").count(),
        1,
        "logged once; stderr:\n{text}"
    );
    assert_eq!(
        target.open_as_other("/data/secret", false).unwrap(),
        Access::Denied,
        "fanotify must enforce the guard after the fallback"
    );
    auto.finish().unwrap();

    // bpf: refuses to start here, naming why.
    let bpf = Agent::spawn(
        &config(&guard, &pids, &["--backend", "bpf"]),
        &dir.join("bpf"),
    )
    .unwrap();
    let err_dir = dir.join("bpf");
    let status = bpf.wait_exit().unwrap();
    let err = std::fs::read_to_string(err_dir.join("stderr")).unwrap();
    assert!(
        !status.success(),
        "--backend bpf must fail here; stderr:\n{err}"
    );
    assert!(err.contains("--backend bpf:"), "stderr:\n{err}");

    target.kill().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
