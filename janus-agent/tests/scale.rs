//! One agent for a busy node: hundreds of targets in one permission group and one inotify
//! instance, guards placed while another process of uid 0 holds every fanotify group and
//! inotify instance the uid may have, and a full inotify watch quota failing its target
//! loudly. Run as root; the tests in this file change per-uid kernel state, so they take
//! turns.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use janus_api::agent_v1::agent_client::AgentClient;
use janus_api::agent_v1::ContainerPhase;
use janus_tests::agent::{Agent, AgentConfig, Serve};
use janus_tests::containerd::Container;
use janus_tests::scenarios::{guard_yaml, populate};
use janus_tests::target::{Access, Root, Target, BUSYBOX};
use janus_tests::wait;

mod support;
use support::DENY_SECRET;

const AGENT: &str = env!("CARGO_BIN_EXE_janus-agent");
static TURNS: Mutex<()> = Mutex::new(());

fn workdir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("janus-scale-tests").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `janus-agent guard` with `guard` on `pids`, fanotify only, enforcing.
fn fanotify_agent(dir: &Path, guard: &str, pids: &[i32]) -> Agent {
    Agent::start(
        &AgentConfig {
            bin: Path::new(AGENT),
            guard,
            pids,
            pod: "p",
            node: "n",
            extra: &["--backend", "fanotify"],
        },
        &dir.join("agent"),
    )
    .unwrap()
}

/// The kernel objects the agent holds, from its descriptors: (fanotify groups, inotify
/// instances).
fn kernel_objects(agent: &Agent) -> (usize, usize) {
    let links = agent.fd_links().unwrap();
    let count = |kind: &str| links.iter().filter(|l| l.as_os_str() == kind).count();
    (count("anon_inode:[fanotify]"), count("anon_inode:inotify"))
}

#[test]
fn three_hundred_targets_in_one_group() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 300;
    let dir = workdir("three-hundred");
    let mut roots = Vec::new();
    let mut targets = Vec::new();
    for i in 0..N {
        let root = Root::new(&dir, &format!("t{i}")).unwrap();
        populate(&root).unwrap();
        targets.push(Target::start(&root).unwrap());
        roots.push(root);
    }
    let pids: Vec<i32> = targets.iter().map(Target::pid).collect();
    let guard = guard_yaml(
        "many",
        "  - deny: [/data]\n    allow: [/data/public]\n    events: [open]\n",
    );
    let agent = fanotify_agent(&dir, &guard, &pids);
    assert_eq!(kernel_objects(&agent), (1, 1), "one group, one instance");
    for (i, t) in targets.iter().enumerate() {
        assert_eq!(t.cat("/data/secret").unwrap(), Access::Denied, "target {i}");
        assert_eq!(
            t.cat("/data/public").unwrap(),
            Access::Ok("public".into()),
            "target {i}"
        );
    }
    let enforcing = agent.metric("janus_targets{state=\"enforcing\"}").unwrap();
    assert_eq!(enforcing as usize, N);
    let denied = agent.metric("janus_decisions_total{backend=\"fanotify\",event=\"OPEN_PERM\",guard=\"many\",mode=\"enforce\",namespace=\"tests\",response=\"deny\"}").unwrap();
    assert_eq!(denied as usize, N, "one deny line per target");
}

/// fanotify groups and inotify instances the calling uid gets until the kernel refuses,
/// held until dropped; and the error that ended each.
fn hold_every_group_and_instance() -> (Vec<OwnedFd>, i32, i32) {
    let mut held = Vec::new();
    let fan_error = loop {
        // SAFETY: plain syscall with flags.
        let fd = unsafe { libc::fanotify_init(libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC, 0) };
        if fd < 0 {
            break std::io::Error::last_os_error().raw_os_error().unwrap();
        }
        // SAFETY: the kernel just gave us this descriptor.
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
        assert!(held.len() < 100_000, "no per-uid limit on fanotify groups?");
    };
    let in_error = loop {
        // SAFETY: plain syscall with flags.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            break std::io::Error::last_os_error().raw_os_error().unwrap();
        }
        // SAFETY: the kernel just gave us this descriptor.
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
        assert!(
            held.len() < 200_000,
            "no per-uid limit on inotify instances?"
        );
    };
    (held, fan_error, in_error)
}

#[tokio::test(flavor = "multi_thread")]
// The turn is held for the whole test on purpose: the other tests must not run meanwhile.
#[allow(clippy::await_holding_lock)]
async fn guards_are_placed_while_the_uids_groups_and_instances_are_all_taken() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = workdir("quota-hog");
    let me = std::process::id();
    let pod_uid = format!("5555-{me}");
    let mut containers = Vec::new();
    let mut roots = Vec::new();
    for i in 0..3 {
        let root = Root::new(&dir, &format!("c{i}")).unwrap();
        populate(&root).unwrap();
        let id = format!("janus-hog-{i}-{me}");
        let cgroup = format!("/kubepods/besteffort/pod{pod_uid}/{id}");
        containers
            .push(Container::run(&root, &id, Some(&cgroup), &[BUSYBOX, "sleep", "600"]).unwrap());
        roots.push(root);
    }
    let addr = support::free_addr();
    let args = ["--insecure-plaintext", "--backend", "fanotify"];
    let agent = Serve::start(Path::new(AGENT), addr, &args, &dir, "agent").unwrap();

    // Another process of uid 0 (a container running as root, say) takes everything.
    let (held, fan_error, in_error) = hold_every_group_and_instance();
    assert_eq!(
        fan_error,
        libc::EMFILE,
        "fanotify_init refused for another reason"
    );
    assert_eq!(
        in_error,
        libc::EMFILE,
        "inotify_init1 refused for another reason"
    );

    let mut client = AgentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let ids: Vec<&str> = containers.iter().map(|c| c.id.as_str()).collect();
    let status = support::applied(
        &mut client,
        support::apply("default", "hog", &pod_uid, &ids, DENY_SECRET),
    )
    .await;
    for c in &status.containers {
        assert_eq!(c.phase, ContainerPhase::Enforced as i32, "{c:?}");
    }
    for c in &containers {
        assert_eq!(
            c.exec(&[BUSYBOX, "cat", "/data/secret"]).unwrap(),
            Access::Denied
        );
        assert_eq!(
            c.exec(&[BUSYBOX, "cat", "/data/public"]).unwrap(),
            Access::Ok("public".into())
        );
    }
    drop(held);
    drop(agent);
}

/// `fs.inotify.max_user_watches`, set for the length of a test.
struct MaxWatches(String);

const MAX_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

impl MaxWatches {
    fn set(n: u64) -> MaxWatches {
        let before = std::fs::read_to_string(MAX_WATCHES).unwrap();
        std::fs::write(MAX_WATCHES, n.to_string()).unwrap();
        MaxWatches(before)
    }
}

impl Drop for MaxWatches {
    fn drop(&mut self) {
        std::fs::write(MAX_WATCHES, self.0.trim()).unwrap();
    }
}

#[test]
fn a_full_inotify_watch_quota_fails_the_target_until_it_has_room() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = workdir("watch-quota");
    let root = Root::new(&dir, "root").unwrap();
    populate(&root).unwrap();
    let target = Target::start(&root).unwrap();
    let guard = guard_yaml("watched", "  - deny: [/data]\n    events: [open]\n");
    let agent = fanotify_agent(&dir, &guard, &[target.pid()]);
    let failures = || {
        agent
            .metric("janus_placement_failures_total{backend=\"fanotify\",kind=\"watch\"}")
            .unwrap()
    };
    assert_eq!(failures(), 0.0);
    {
        // Every watch uid 0 may have is taken.
        let _full = MaxWatches::set(1);
        root.write("/data/new/dir/file", b"new\n").unwrap();
        // The new directories are marked (what is in them is refused) but cannot be
        // watched: what is created in them later would go unseen. Said, not hidden.
        wait::until("/readyz to answer 503", Duration::from_secs(10), || {
            (agent.get("/readyz").ok()?.0 == 503).then_some(())
        })
        .unwrap();
        let (_, state) = agent.get("/state").unwrap();
        assert!(state.contains("\"phase\":\"failed\""), "{state}");
        assert!(state.contains("inotify"), "{state}");
        assert!(failures() > 0.0);
        assert_eq!(target.cat("/data/new/dir/file").unwrap(), Access::Denied);
    }
    // Room again: the next pass places what was missing.
    wait::until("/readyz to answer 200", Duration::from_secs(10), || {
        (agent.get("/readyz").ok()?.0 == 200).then_some(())
    })
    .unwrap();
    root.write("/data/new/dir/later/file", b"later\n").unwrap();
    wait::until(
        "a file made after the quota cleared to be refused",
        Duration::from_secs(1),
        || (target.cat("/data/new/dir/later/file").ok()? == Access::Denied).then_some(()),
    )
    .unwrap();
}

/// A file made in a guarded directory and moved out before the agent could mark it is not
/// guarded where it went: the agent says so (a warning, a count, the target failed until
/// its next pass) rather than nothing. Made and moved through the node's view of the root,
/// in a loop until the agent is outrun once.
#[test]
fn an_entry_moved_out_before_it_was_marked_is_reported() {
    let _turn = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = workdir("escaped");
    let root = Root::new(&dir, "root").unwrap();
    populate(&root).unwrap();
    root.mkdir("/outside").unwrap();
    let target = Target::start(&root).unwrap();
    let guard = guard_yaml("escape", "  - deny: [/data]\n    events: [open]\n");
    let agent = fanotify_agent(&dir, &guard, &[target.pid()]);
    let escaped = || {
        agent
            .metric("janus_placement_failures_total{backend=\"fanotify\",kind=\"escaped\"}")
            .unwrap()
    };
    assert_eq!(escaped(), 0.0);
    let mut i = 0;
    wait::until("an escape to be reported", Duration::from_secs(20), || {
        i += 1;
        let inside = root.host(format!("/data/fresh-{i}"));
        std::fs::write(&inside, b"x").ok()?;
        std::fs::rename(&inside, root.host(format!("/outside/fresh-{i}"))).ok()?;
        (escaped() > 0.0).then_some(())
    })
    .unwrap();
    assert!(
        agent
            .stderr()
            .contains("moved out of the guarded tree before it could be marked"),
        "{}",
        agent.stderr()
    );
}
