//! The agent guarding a real containerd container (runc, its own namespaces and cgroup).
//! Needs root and a running containerd (scripts/setup-containerd.sh).

use std::path::Path;

use janus_tests::agent::{Agent, AgentConfig};
use janus_tests::containerd::Container;
use janus_tests::scenarios::{guard_yaml, populate};
use janus_tests::target::{Access, Root, BUSYBOX};

#[test]
fn a_containerd_container_is_guarded() {
    let dir = std::env::temp_dir().join("janus-containerd-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let root = Root::new(&dir, "rootfs").unwrap();
    populate(&root).unwrap();
    let id = format!("janus-agent-test-{}", std::process::id());
    let container = Container::run(&root, &id, None, &[BUSYBOX, "sleep", "600"]).unwrap();
    assert_eq!(
        container.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
        Access::Ok("secret".into())
    );
    // A process of the container can make a user and mount namespace of its own, whose
    // mounts are copies of the container's under new IDs; it reads the file before the guard.
    let nested = [
        BUSYBOX,
        "unshare",
        "-U",
        "-r",
        "-m",
        BUSYBOX,
        "cat",
        "/data/secret",
    ];
    assert_eq!(
        container.exec(&nested).unwrap(),
        Access::Ok("secret".into())
    );
    let agent = Agent::start(
        &AgentConfig {
            bin: Path::new(env!("CARGO_BIN_EXE_janus-agent")),
            guard: &guard_yaml(
                "containerd",
                "  - deny: [/data]\n    allow: [/data/public]\n    tags: {runtime: containerd}\n",
            ),
            pids: &[container.pid()],
            pod: &id,
            node: "node-a",
            extra: &[],
        },
        &dir.join("agent"),
    )
    .unwrap();
    assert_eq!(
        container.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
        Access::Denied
    );
    assert_eq!(
        container
            .exec(&[BUSYBOX, "cat", "/data/sub/deep/file"])
            .unwrap(),
        Access::Denied
    );
    assert_eq!(
        container.exec(&[BUSYBOX, "cat", "/data/public"]).unwrap(),
        Access::Ok("public".into())
    );
    agent
        .wait_line("the container's deny line", |l| {
            l == format!("<DENY> OPEN_PERM file '/data/secret' ({id}:node-a) runtime=containerd")
        })
        .unwrap();
    // ... and is still the container's: the guard holds there too.
    assert_eq!(container.exec(&nested).unwrap(), Access::Denied);
    // The host reaches the same inodes through its own mounts: not the container's access.
    assert_eq!(
        std::fs::read(root.host("/data/secret")).unwrap(),
        b"secret\n"
    );
    assert!(agent.stop().unwrap().success());
    assert_eq!(
        container.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
        Access::Ok("secret".into())
    );
}
