//! `--backend auto` on a kernel that refuses BPF LSM programs (this machine's: EPERM), or
//! on a build without the BPF object, must fall back to fanotify, say why in one line and
//! still enforce; `--backend bpf` must refuse to start instead. Needs root.

use std::path::Path;
use std::process::Command;

use janus_tests::agent::{Agent, AgentConfig};
use janus_tests::scenarios::guard_yaml;

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
    std::fs::create_dir_all(dir.join("secret")).unwrap();
    std::fs::write(dir.join("secret/f"), "x").unwrap();
    // A process named on the command line that shares the node's mounts and root: its
    // guard's paths are the node's.
    let mut target = Command::new("sleep").arg("60").spawn().unwrap();
    let pids = [target.id() as i32];
    let guard = guard_yaml(
        "fallback",
        &format!("  - deny: [{}/secret]\n    events: [open]\n", dir.display()),
    );

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
    // The target shares our mounts and the subject has no autoAllowOwner, so the guard
    // applies to this process too.
    let open = std::fs::File::open(dir.join("secret/f"));
    assert_eq!(
        open.as_ref().err().and_then(|e| e.raw_os_error()),
        Some(libc::EPERM),
        "fanotify must enforce the guard after the fallback (got {open:?})"
    );
    auto.finish().unwrap();

    // bpf: refuses to start here, naming why.
    let bpf = Agent::spawn(
        &config(&guard, &pids, &["--backend", "bpf"]),
        &dir.join("bpf"),
    )
    .unwrap();
    let status = bpf.wait_exit().unwrap();
    let err = std::fs::read_to_string(dir.join("bpf/stderr")).unwrap();
    assert!(
        !status.success(),
        "--backend bpf must fail here; stderr:\n{err}"
    );
    assert!(err.contains("--backend bpf:"), "stderr:\n{err}");

    target.kill().ok();
    target.wait().ok();
    std::fs::remove_dir_all(&dir).ok();
}
