//! The fanotify agent against this machine's real kernel: targets in their own mount
//! namespace and root, the agent as a real process. Run as root.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use janus_tests::agent::{Agent, AgentConfig, STARTUP};
use janus_tests::scenarios::{guard_yaml, populate, Runner};
use janus_tests::target::{Access, Root, Target, BUSYBOX};
use janus_tests::wait;

const AGENT: &str = env!("CARGO_BIN_EXE_janus-agent");
/// linux/capability.h
const CAP_SYS_ADMIN: libc::c_ulong = 21;
/// These are the fanotify backend's tests (its metrics, marks and warnings): on a kernel
/// that runs BPF LSM programs, `auto` would choose BPF.
const FANOTIFY: &[&str] = &["--backend", "fanotify"];

fn workdir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("janus-kernel-tests").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config<'a>(name: &'a str, guard: &'a str, pids: &'a [i32]) -> AgentConfig<'a> {
    AgentConfig {
        bin: Path::new(AGENT),
        guard,
        pids,
        pod: if name.is_empty() { "p" } else { "web-1" },
        node: "node-a",
        extra: FANOTIFY,
    }
}

/// A populated root, a target in it, and an agent guarding the target with `subjects`.
fn guarded(test: &str, subjects: &str) -> (Root, Target, Agent) {
    guarded_with(test, subjects, FANOTIFY)
}

/// [`guarded`], the agent started with `extra` after `guard ...`.
fn guarded_with(test: &str, subjects: &str, extra: &[&str]) -> (Root, Target, Agent) {
    let dir = workdir(test);
    let root = Root::new(&dir, "root").unwrap();
    populate(&root).unwrap();
    let target = Target::start(&root).unwrap();
    let guard = guard_yaml(test, subjects);
    let pids = [target.pid()];
    let cfg = AgentConfig {
        extra,
        ..config(test, &guard, &pids)
    };
    let agent = Agent::start(&cfg, &dir.join("agent")).unwrap();
    (root, target, agent)
}

/// `janus_targets{state}`.
fn targets(agent: &Agent, state: &str) -> f64 {
    agent
        .metric(&format!("janus_targets{{state=\"{state}\"}}"))
        .unwrap()
}

fn decisions(agent: &Agent, guard: &str, response: &str) -> f64 {
    agent
        .metric(&format!(
            "janus_decisions_total{{backend=\"fanotify\",event=\"OPEN_PERM\",guard=\"{guard}\",mode=\"enforce\",namespace=\"tests\",response=\"{response}\"}}"
        ))
        .unwrap()
}

fn run_table(name: &str, monitor: bool) -> usize {
    let dir = workdir(name);
    let results = Runner {
        agent_bin: Path::new(AGENT),
        agent_args: FANOTIFY,
        bpf: false,
        monitor,
        workdir: &dir,
    }
    .run_all();
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(name, r)| r.as_ref().err().map(|e| format!("{name}: {e:#}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    results.len()
}

/// Under fanotify: the record names the process in both formats, read after the answer.
#[test]
fn decision_records_name_who_tried() {
    let dir = workdir("who-tried");
    Runner {
        agent_bin: Path::new(AGENT),
        agent_args: FANOTIFY,
        bpf: false,
        monitor: false,
        workdir: &dir,
    }
    .who_tried()
    .unwrap();
}

#[test]
fn scenario_table() {
    let ran = run_table("scenario-table", false);
    assert!(ran >= 12, "the table shrank: {ran}");
}

/// Every deny case of the table once more with the guard in monitor mode: nothing is
/// refused, and each would-be denial is logged and counted as one.
#[test]
fn scenario_table_in_monitor_mode() {
    let ran = run_table("scenario-table-monitor", true);
    assert!(ran >= 12, "the table shrank: {ran}");
}

#[test]
fn decision_lines_and_metrics() {
    let (_root, target, agent) = guarded(
        "decision-lines",
        "  - deny: [/data]\n    allow: [/data/public]\n    events: [open]\n    tags: {team: payments, tier: gold}\n",
    );
    assert_eq!(target.cat("/data/secret").unwrap(), Access::Denied);
    assert_eq!(
        target.cat("/data/public").unwrap(),
        Access::Ok("public".into())
    );
    assert_eq!(
        target.exec(&[BUSYBOX, "ls", "/data/sub"]).unwrap(),
        Access::Denied
    );
    agent
        .wait_line("the deny line", |l| {
            l == "<DENY> OPEN_PERM file '/data/secret' (web-1:node-a) team=payments,tier=gold"
        })
        .unwrap();
    agent
        .wait_line("the allow line", |l| {
            l == "<ALLOW> OPEN_PERM file '/data/public' (web-1:node-a) team=payments,tier=gold"
        })
        .unwrap();
    agent
        .wait_line("the directory line", |l| {
            l.starts_with("<DENY> OPEN_PERM directory '/data/sub' ")
        })
        .unwrap();
    assert!(decisions(&agent, "decision-lines", "deny") >= 2.0);
    assert!(decisions(&agent, "decision-lines", "allow") >= 1.0);
    assert!(
        agent.metric("janus_marks{").unwrap() >= 3.0,
        "dirs below /data are marked"
    );
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn an_event_on_the_guarded_root_itself() {
    // The target is chrooted: its root renders to the agent as the root's host path with
    // nothing after it, and must be decided and logged as `/`.
    let (_root, target, agent) = guarded(
        "root-itself",
        "  - allow: [/]\n    deny: [/data]\n    events: [open]\n",
    );
    match target.exec(&[BUSYBOX, "ls", "/"]).unwrap() {
        Access::Ok(list) => assert!(list.contains("data"), "{list}"),
        other => panic!("ls /: {other:?}"),
    }
    agent
        .wait_line("the root's line", |l| {
            l == "<ALLOW> OPEN_PERM directory '/' (web-1:node-a)"
        })
        .unwrap();
    // The answering thread lives on: later events are still answered.
    assert_eq!(target.cat("/data/secret").unwrap(), Access::Denied);
    assert!(agent.stop().unwrap().success());
}

#[test]
fn names_that_are_not_utf8() {
    let (root, target, agent) = guarded("non-utf8", "  - deny: [/data]\n    events: [open]\n");
    let name = OsStr::from_bytes(b"/data/\xff\xfe-name");
    std::fs::write(root.host(name.as_bytes()), b"x").unwrap();
    let out = target
        .command(&[BUSYBOX, "cat"])
        .unwrap()
        .arg(name)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"));
    agent
        .wait_line("an escaped deny line", |l| {
            l.starts_with("<DENY> OPEN_PERM file '/data/\\xff\\xfe-name' ")
        })
        .unwrap();
    assert!(agent.stop().unwrap().success());
}

/// A guarded file renamed in the container and opened by its new name, decided by identity
/// by an agent writing `format` (`--decision-format`) with the guard's `log_format`: the
/// deny line or record.
fn renamed_and_opened(test: &str, format: &str, log_format: &str) -> String {
    let (_root, target, agent) = guarded_with(
        test,
        &format!("  - deny: [/data/secret]\n    events: [open]\n  logFormat: {log_format:?}\n"),
        &[FANOTIFY, &["--decision-format", format][..]].concat(),
    );
    let moved = target
        .exec(&[BUSYBOX, "mv", "/data/secret", "/data/moved"])
        .unwrap();
    assert!(matches!(moved, Access::Ok(_)), "{moved:?}");
    assert_eq!(target.cat("/data/moved").unwrap(), Access::Denied);
    let lines = agent.finish().unwrap();
    let denied: Vec<&str> = (lines.lines())
        .filter(|l| l.starts_with("<DENY>") || l.contains(r#""verdict":"deny""#))
        .collect();
    assert_eq!(denied.len(), 1, "{lines}");
    denied[0].to_owned()
}

#[test]
fn the_name_reached_by_is_shown_where_the_format_asks_for_it() {
    // Not asked for: the agent does not read it.
    let without = "<{response}> {event} '{path}' ({pod})";
    assert_eq!(
        renamed_and_opened("no-via-text", "text", without),
        "<DENY> OPEN_PERM '/data/secret' (web-1)"
    );
    assert_eq!(
        renamed_and_opened("name-text", "text", "<{response}> '{path}' as '{name}'"),
        "<DENY> '/data/secret' as '/data/moved'"
    );
    // A JSON record has every field, whatever the guard's format.
    let record: serde_json::Value =
        serde_json::from_str(&renamed_and_opened("no-via-json", "json", without)).unwrap();
    assert_eq!(record["path"], "/data/secret", "{record}");
    assert_eq!(record["name"], "/data/moved", "{record}");
}

/// Inodes the agent's fanotify groups hold marks on, as the kernel lists them.
fn marked_inodes(pid: i32) -> Vec<u64> {
    let mut inodes = Vec::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return inodes;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines().filter(|l| l.starts_with("fanotify ino:")) {
            let hex = line["fanotify ino:".len()..].split(' ').next().unwrap();
            inodes.push(u64::from_str_radix(hex, 16).unwrap());
        }
    }
    inodes
}

#[test]
fn a_symlink_out_of_the_container_never_guards_a_host_file() {
    let dir = workdir("symlink-escape");
    let host_secret = dir.join("host-secret");
    std::fs::write(&host_secret, b"host\n").unwrap();
    let root = Root::new(&dir, "root").unwrap();
    populate(&root).unwrap();
    // An absolute and a climbing escape: both must resolve inside the root.
    root.symlink("/data/escape", host_secret.to_str().unwrap())
        .unwrap();
    root.symlink("/data/climb", "../../../../../../../../host-secret")
        .unwrap();
    let target = Target::start(&root).unwrap();
    let guard = guard_yaml("symlink-escape", "  - deny: [/data/escape, /data/climb]\n");
    let agent = Agent::start(&config("", &guard, &[target.pid()]), &dir.join("agent")).unwrap();
    let host_ino = std::fs::metadata(&host_secret).unwrap().ino();
    assert!(!marked_inodes(agent.pid()).contains(&host_ino));
    let (_, state) = agent.get("/state").unwrap();
    assert!(state.contains(r#""status":"missing""#), "{state}");
    // The container's own files at the links' targets are what get guarded once they exist.
    root.write(host_secret.to_str().unwrap(), b"container copy\n")
        .unwrap();
    root.write("/host-secret", b"container copy\n").unwrap();
    wait::until(
        "the container's own copies to be guarded",
        Duration::from_secs(5),
        || {
            (target.cat("/data/escape").ok()? == Access::Denied
                && target.cat("/data/climb").ok()? == Access::Denied)
                .then_some(())
        },
    )
    .unwrap();
    assert!(!marked_inodes(agent.pid()).contains(&host_ino));
    assert_eq!(std::fs::read(&host_secret).unwrap(), b"host\n");
    assert!(agent.stop().unwrap().success());
}

#[test]
fn a_target_that_exits_loses_its_marks_and_the_agent_keeps_running() {
    let (_root, target, agent) = guarded("target-exits", "  - deny: [/data]\n");
    assert!(!marked_inodes(agent.pid()).is_empty());
    assert_eq!(targets(&agent, "enforcing"), 1.0);
    target.kill().unwrap();
    wait::until(
        "the target to be reported exited",
        Duration::from_secs(10),
        || {
            let (_, state) = agent.get("/state").ok()?;
            state.contains(r#""phase":"exited""#).then_some(())
        },
    )
    .unwrap();
    wait::until("the marks to go", Duration::from_secs(10), || {
        marked_inodes(agent.pid()).is_empty().then_some(())
    })
    .unwrap();
    assert_eq!(agent.metric("janus_marks{").unwrap(), 0.0);
    assert_eq!(targets(&agent, "enforcing"), 0.0);
    assert_eq!(targets(&agent, "exited"), 1.0);
    assert_eq!(agent.get("/healthz").unwrap().0, 200);
    assert!(agent.stop().unwrap().success());
}

#[test]
fn a_path_that_cannot_be_enforced_fails_the_target_until_it_can() {
    let dir = workdir("failed-path");
    let root = Root::new(&dir, "root").unwrap();
    populate(&root).unwrap();
    // A symlink loop: the path exists but resolves to nothing (ELOOP), unlike a missing one.
    root.symlink("/data/loop", "loop").unwrap();
    let target = Target::start(&root).unwrap();
    let guard = guard_yaml(
        "failed-path",
        "  - deny: [/data/loop]\n    events: [open]\n",
    );
    let agent = Agent::spawn(
        &config("failed-path", &guard, &[target.pid()]),
        &dir.join("agent"),
    )
    .unwrap();
    let failed = r#""phase":"failed""#;
    wait::until("the target to be reported failed", STARTUP, || {
        agent.get("/state").ok()?.1.contains(failed).then_some(())
    })
    .unwrap();
    assert_eq!(agent.get("/readyz").unwrap().0, 503);
    assert_eq!(targets(&agent, "failed"), 1.0);
    // Once the path is a file, the next pass enforces it.
    std::fs::remove_file(root.host("/data/loop")).unwrap();
    root.write("/data/loop", b"now a file\n").unwrap();
    wait::until("/readyz to answer 200", Duration::from_secs(5), || {
        (agent.get("/readyz").ok()?.0 == 200).then_some(())
    })
    .unwrap();
    assert_eq!(target.cat("/data/loop").unwrap(), Access::Denied);
    assert_eq!(targets(&agent, "failed"), 0.0);
    assert_eq!(targets(&agent, "enforcing"), 1.0);
    assert!(agent.stop().unwrap().success());
}

#[test]
fn removed_directories_are_forgotten() {
    let (root, _target, agent) = guarded("removed-dirs", "  - deny: [/data]\n    events: [open]\n");
    let marks = || agent.metric("janus_marks{").unwrap();
    let fds = || agent.fd_links().unwrap().len();
    let (marks_before, fds_before) = (marks(), fds());
    const N: usize = 300;
    for i in 0..N {
        root.mkdir(format!("/data/churn-{i}")).unwrap();
    }
    wait::until(
        "the new directories to be marked",
        Duration::from_secs(10),
        || (marks() >= marks_before + N as f64).then_some(()),
    )
    .unwrap();
    // Within a few transient descriptors (an event being answered, a listing).
    assert!(
        fds() + 5 >= fds_before + N,
        "each marked directory is held open"
    );
    for i in 0..N {
        std::fs::remove_dir(root.host(format!("/data/churn-{i}"))).unwrap();
    }
    wait::until(
        "the removed directories to be forgotten",
        Duration::from_secs(10),
        || (marks() == marks_before).then_some(()),
    )
    .unwrap();
    assert!(
        fds() < fds_before + 10,
        "{} descriptors, {fds_before} before",
        fds()
    );
    assert!(agent.stop().unwrap().success());
}

#[test]
fn sigterm_lifts_the_guards_and_exits_zero() {
    let (_root, target, agent) = guarded("sigterm", "  - deny: [/data/secret]\n");
    assert_eq!(target.cat("/data/secret").unwrap(), Access::Denied);
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        target.cat("/data/secret").unwrap(),
        Access::Ok("secret".into())
    );
}

#[test]
fn a_bad_guard_file_exits_non_zero_and_guards_nothing() {
    let dir = workdir("bad-guard");
    let root = Root::new(&dir, "root").unwrap();
    populate(&root).unwrap();
    let target = Target::start(&root).unwrap();
    let guard = guard_yaml(
        "bad",
        "  - deny: [/data/secret, data/secret]\n    events: [open, read]\n",
    );
    let agent = Agent::spawn(&config("", &guard, &[target.pid()]), &dir.join("agent")).unwrap();
    let status = agent.wait_exit().unwrap();
    assert!(!status.success());
    let stderr = std::fs::read_to_string(dir.join("agent/stderr")).unwrap();
    assert!(
        stderr.contains(r#"spec.subjects[0].deny[1]: path must be absolute: "data/secret""#),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"spec.subjects[0].events[1]: unknown event "read""#),
        "{stderr}"
    );
    assert!(stderr.contains("nothing guarded"), "{stderr}");
    assert_eq!(
        target.cat("/data/secret").unwrap(),
        Access::Ok("secret".into())
    );
}

#[test]
fn modify_is_refused_loudly_under_fanotify() {
    let (_root, target, agent) = guarded(
        "modify-warning",
        "  - deny: [/data/secret]\n    events: [open, modify]\n",
    );
    let warning = r#"event "modify" is not enforced by the fanotify backend"#;
    assert!(
        agent.stderr().contains(&warning.replace('"', "\\\"")) || agent.stderr().contains(warning),
        "{}",
        agent.stderr()
    );
    let (_, state) = agent.get("/state").unwrap();
    assert!(state.contains(&warning.replace('"', "\\\"")), "{state}");
    // The rest of the subject is still enforced.
    assert_eq!(target.cat("/data/secret").unwrap(), Access::Denied);
    assert!(agent.stop().unwrap().success());
}

#[test]
fn parallel_openers_are_all_answered() {
    parallel_openers("parallel-openers");
}

/// The agent and the openers on one CPU, as under a cpuset of one CPU: the settling thread
/// runs only where the answering thread does, and makes way for it. No line is lost or
/// doubled, no descriptor left open.
#[test]
fn parallel_openers_on_one_cpu_are_all_answered_and_logged() {
    let cpu = |set: &libc::cpu_set_t| {
        // SAFETY: a valid set of the size we pass, for this thread.
        let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    };
    // SAFETY: cpu_set_t is plain data; the kernel fills it, CPU_SET writes within it.
    let (mut before, mut one): (libc::cpu_set_t, libc::cpu_set_t) = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of_val(&before), &mut before),
            0
        );
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|c| libc::CPU_ISSET(*c, &before))
            .expect("a CPU this thread may run on");
        libc::CPU_SET(first, &mut one);
    }
    // The agent and the openers are this thread's children: they inherit its CPU.
    cpu(&one);
    let lines = parallel_openers("parallel-openers-one-cpu");
    cpu(&before);
    assert_eq!(lines, 2 * OPENERS * ROUNDS);
}

/// How many descriptors the agent holds of `/data/secret` and `/data/public`.
fn files_held(agent: &Agent) -> usize {
    (agent.fd_links().unwrap().iter())
        .filter(|p| p.ends_with("data/secret") || p.ends_with("data/public"))
        .count()
}

const OPENERS: usize = 4;
const ROUNDS: usize = 150;

/// `OPENERS` processes each open a denied and an allowed file `ROUNDS` times: every open
/// is answered and counted, and every event's descriptor closed. How many decision lines
/// the agent wrote.
fn parallel_openers(guard: &str) -> usize {
    let (_root, target, agent) = guarded(
        guard,
        "  - deny: [/data]\n    allow: [/data/public]\n    events: [open]\n",
    );
    let script = format!(
        "i=0; while [ $i -lt {ROUNDS} ]; do /bin/busybox cat /data/secret; /bin/busybox cat /data/public; i=$((i+1)); done 2>&1"
    );
    let held_before = files_held(&agent);
    let children: Vec<_> = (0..OPENERS)
        .map(|_| {
            target
                .command(&[BUSYBOX, "sh", "-c", &script])
                .unwrap()
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Every opener finishes: nothing hangs on an unanswered event (a hang fails the test
    // at the deadline instead of stalling the suite).
    let (tx, rx) = std::sync::mpsc::channel();
    for child in children {
        let tx = tx.clone();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
    }
    for _ in 0..OPENERS {
        let out = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("an opener did not finish within 60 s")
            .unwrap();
        assert!(out.status.success(), "{}", out.status);
        let out = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.matches("Operation not permitted").count(), ROUNDS);
        assert_eq!(out.matches("public").count(), ROUNDS);
    }
    let total = (OPENERS * ROUNDS) as f64;
    wait::until(
        "every decision to be counted",
        Duration::from_secs(5),
        || {
            (decisions(&agent, guard, "deny") == total
                && decisions(&agent, guard, "allow") == total)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: deny {} allow {} of {total}",
            decisions(&agent, guard, "deny"),
            decisions(&agent, guard, "allow")
        )
    });
    assert_eq!(agent.metric("janus_response_errors_total").unwrap(), 0.0);
    assert_eq!(agent.metric("janus_internal_errors_total").unwrap(), 0.0);
    assert_eq!(agent.metric("janus_log_lines_dropped_total").unwrap(), 0.0);
    // Every event's descriptor is closed once the events stop.
    wait::until(
        "the agent to close the events' descriptors",
        Duration::from_secs(5),
        || (files_held(&agent) == held_before).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {} held, {held_before} before", files_held(&agent)));
    // Written out in full once it has stopped.
    agent.finish().unwrap().lines().count()
}

#[test]
fn without_cap_sys_admin_it_says_so_in_one_line() {
    let dir = workdir("no-cap");
    let guard = dir.join("guard.yaml");
    std::fs::write(&guard, guard_yaml("no-cap", "  - deny: [/data]\n")).unwrap();
    let mut cmd = Command::new(AGENT);
    cmd.args(["guard", "--file"])
        .arg(&guard)
        .args(["--pid", &std::process::id().to_string()]);
    // SAFETY: prctl only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // Out of the bounding set, root's next program does not get it.
            if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("CAP_SYS_ADMIN"), "{stderr}");
    assert!(last.starts_with("janus-agent: "), "{stderr}");
}

/// An overlay mount, unmounted on drop.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lower: &Path, dir: &Path) -> Overlay {
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .unwrap();
        Overlay(merged)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Two pods of one image: their roots are overlays over the same lower layer, so the
/// guarded file has one backing inode. Guarding it in one must not guard it in the other.
#[test]
fn two_overlay_roots_over_one_lower_layer_are_guarded_apart() {
    let dir = workdir("overlay");
    let lower = Root::new(&dir, "lower").unwrap();
    populate(&lower).unwrap();
    let one = Overlay::mount(lower.dir(), &dir.join("pod-1"));
    let two = Overlay::mount(lower.dir(), &dir.join("pod-2"));
    let guarded = Target::start_in(&one.0).unwrap();
    let neighbour = Target::start_in(&two.0).unwrap();
    let guard = guard_yaml("overlay", "  - deny: [/data/secret]\n");
    let agent = Agent::start(&config("", &guard, &[guarded.pid()]), &dir.join("agent")).unwrap();
    assert_eq!(guarded.cat("/data/secret").unwrap(), Access::Denied);
    assert_eq!(
        neighbour.cat("/data/secret").unwrap(),
        Access::Ok("secret".into())
    );
    assert_eq!(
        std::fs::read(lower.host("/data/secret")).unwrap(),
        b"secret\n"
    );
    assert!(agent.stop().unwrap().success());
    drop((guarded, neighbour));
}

/// `access` is decided where the kernel sees it. On a file system with pre-content events
/// (ext4 from Linux 6.14) a file whose reads are denied can be opened, and its reads and a
/// mapping's page faults are refused; where a page fault raises no event (tmpfs, overlayfs,
/// older kernels) the open itself is refused.
#[test]
fn access_is_decided_where_the_kernel_sees_it() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let pre_content_kernel = (v.next().unwrap(), v.next().unwrap()) >= (6, 14);
    let subjects = "  - deny: [/data/secret]\n    events: [access]\n";
    let open_only = [BUSYBOX, "sh", "-c", "exec 3</data/secret && echo opened"];

    // The work directory: ext4 on this machine.
    let (_root, target, _agent) = guarded("access-ext4", subjects);
    assert_eq!(target.cat("/data/secret").unwrap(), Access::Denied);
    assert_eq!(target.map_read("/data/secret").unwrap(), Access::Denied);
    let opened = target.exec(&open_only).unwrap();
    if pre_content_kernel {
        assert_eq!(
            opened,
            Access::Ok("opened".into()),
            "pre-content events: the open is allowed"
        );
    } else {
        assert_eq!(opened, Access::Denied);
    }

    // A tmpfs root: no pre-content events whatever the kernel.
    let dir = workdir("access-tmpfs");
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: C strings for source, target and type.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "mounting a tmpfs");
    {
        let root = Root::new(&dir, "root").unwrap();
        populate(&root).unwrap();
        let target = Target::start(&root).unwrap();
        let guard = guard_yaml("access-tmpfs", subjects);
        let _agent =
            Agent::start(&config("t", &guard, &[target.pid()]), &dir.join("agent")).unwrap();
        assert_eq!(target.exec(&open_only).unwrap(), Access::Denied);
        assert_eq!(target.map_read("/data/secret").unwrap(), Access::Denied);
    }
    // SAFETY: a C string path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}
