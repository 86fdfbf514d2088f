//! `--backend auto` on a kernel that refuses BPF LSM programs (this machine's: EPERM), or
//! on a build without the BPF object, must fall back to fanotify, say why in one line and
//! still enforce; `--backend bpf` must refuse to start instead. Needs root.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GUARD: &str = r#"apiVersion: januscontroller.clustergarage.io/v1alpha1
kind: JanusGuard
metadata: {name: fallback, namespace: default}
spec:
  selector: {matchLabels: {app: x}}
  subjects:
  - deny: [DIR/secret]
    events: [open]
"#;

fn agent(backend: &str, guard: &std::path::Path, pid: u32) -> Child {
    Command::new(env!("CARGO_BIN_EXE_janus-agent"))
        .args(["guard", "--backend", backend, "--file"])
        .arg(guard)
        .args(["--pid", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting janus-agent")
}

#[test]
fn auto_falls_back_to_fanotify_and_bpf_alone_refuses() {
    let dir = std::env::temp_dir().join(format!("janus-fallback-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("secret")).unwrap();
    std::fs::write(dir.join("secret/f"), "x").unwrap();
    let guard = dir.join("guard.yaml");
    std::fs::write(&guard, GUARD.replace("DIR", dir.to_str().unwrap())).unwrap();
    let mut target = Command::new("sleep").arg("60").spawn().unwrap();

    // auto: falls back, guards with fanotify, and the guard is enforced.
    let mut auto = agent("auto", &guard, target.id());
    let mut stderr = auto.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    let guarding = |t: &str| {
        t.lines()
            .any(|l| l.contains(" guarding") && l.contains("fanotify"))
    };
    while !guarding(&text) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Err(_) => panic!("no fanotify guarding line within 30 s; stderr:\n{text}"),
        }
    }
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
    // applies to this process too, once fanotify has placed its marks.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::File::open(dir.join("secret/f")) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => break,
            other => assert!(
                Instant::now() < deadline,
                "fanotify must enforce the guard after the fallback (got {other:?})"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(auto.id() as i32, libc::SIGTERM) };
    assert!(auto.wait().unwrap().success());

    // bpf: refuses to start here, naming why.
    let out = agent("bpf", &guard, target.id())
        .wait_with_output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--backend bpf must fail here; stderr:\n{err}"
    );
    assert!(err.contains("--backend bpf:"), "stderr:\n{err}");

    target.kill().ok();
    target.wait().ok();
    std::fs::remove_dir_all(&dir).ok();
}
