//! Integration tests of the BPF LSM backend, run as root inside `cargo xtask vm-test`
//! (the host kernel refuses BPF LSM programs). Each scenario starts targets (processes in a
//! mount namespace of their own, chrooted into a prepared root), runs
//! `janus-agent guard --backend bpf` on them and checks what the targets see (EPERM or
//! content) and what the agent logs.
//!
//! Prints `PASS <scenario> (<seconds> s)` / `FAIL <scenario>: <why> (<seconds> s)` and exits
//! non-zero if any failed. Single-threaded on purpose: each scenario runs in a forked
//! process group under a deadline ([`janus_tests::isolate`]), and targets and openers are
//! forked children.

mod target;

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use janus_tests::agent::{http_get, sum_series};
use janus_tests::isolate;
use target::{Opened, Target};

const AGENT: &str = "/bin/janus-agent";

type Scenario = fn() -> Result<()>;
const WORK: &str = "/tmp/bpf-vm";

/// A scenario that has not finished by then is killed and fails; the agent's own waits are
/// 240 s, so this is only reached by a step that would otherwise block for ever.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let scenarios: [(&str, Scenario); 19] = [
        ("deny", deny),
        ("allow-longest-path", allow_longest_path),
        ("recursion", recursion),
        ("owner", owner),
        ("modify", modify),
        ("symlink-out-of-root", symlink_out_of_root),
        ("overlay-two-roots", overlay_two_roots),
        ("fail-closed-depth", fail_closed_depth),
        ("load", load),
        ("full-ring", full_ring),
        ("fair-ring", fair_ring),
        ("log-format", log_format),
        ("fallback-to-fanotify", fallback_to_fanotify),
        ("audit", audit),
        ("full-maps", full_maps),
        ("exchange", exchange),
        ("reapply", reapply),
        ("monitor-to-enforce", monitor_to_enforce),
        ("names", names),
    ];
    let mut failed = 0;
    for (name, f) in scenarios {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let started = Instant::now();
        let outcome = isolate::run(SCENARIO_DEADLINE, f);
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("PASS {name} ({took:.1} s)"),
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e:#} ({took:.1} s)");
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A fresh directory tree under WORK with `files` (paths relative to it).
fn tree(name: &str, files: &[&str]) -> Result<PathBuf> {
    let root = Path::new(WORK).join(name);
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    for f in files {
        let p = root.join(f);
        fs::create_dir_all(p.parent().unwrap())?;
        fs::write(&p, format!("content of {f}"))?;
    }
    Ok(root)
}

fn guard_yaml(subjects: &str) -> String {
    format!(
        "apiVersion: januscontroller.clustergarage.io/v1alpha1\nkind: JanusGuard\n\
         metadata: {{name: vm, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: vm}}}}\n  subjects:\n{subjects}"
    )
}

/// `janus-agent guard --backend bpf` on one target, with stdout and stderr in files.
struct Agent {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    metrics: SocketAddr,
}

impl Agent {
    fn start(name: &str, yaml: &str, pid: i32) -> Result<Agent> {
        Agent::start_with(name, yaml, &[pid], &[])
    }

    /// The agent on every process of `pids`, with `extra` arguments.
    fn start_with(name: &str, yaml: &str, pids: &[i32], extra: &[&str]) -> Result<Agent> {
        let dir = Path::new(WORK).join(format!("agent-{name}"));
        fs::create_dir_all(&dir)?;
        let file = dir.join("guard.yaml");
        fs::write(&file, yaml)?;
        let (out, err) = (dir.join("stdout"), dir.join("stderr"));
        let metrics = janus_tests::agent::free_addr()?;
        let child = Command::new(AGENT)
            .args([
                "guard",
                "--backend",
                "bpf",
                "--pod",
                "vm-pod",
                "--node",
                "vm",
            ])
            .arg("--file")
            .arg(&file)
            .args(
                pids.iter()
                    .flat_map(|p| ["--pid".to_owned(), p.to_string()]),
            )
            .args(extra)
            .args(["--metrics-addr", &metrics.to_string()])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(fs::File::create(&err)?)
            .spawn()
            .context("starting janus-agent")?;
        let mut agent = Agent {
            child,
            out,
            err,
            metrics,
        };
        agent.wait_for(
            |_, err| err.contains("guarding") && err.contains("bpf"),
            "its guarding line",
        )?;
        Ok(agent)
    }

    /// Waits (deadline 240 s: under TCG the agent's start, BTF parsing and the
    /// verifier take a while, about 45 s on 6.1) until `cond(stdout, stderr)` holds.
    fn wait_for(&mut self, cond: impl Fn(&str, &str) -> bool, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let (out, err) = (self.stdout(), self.stderr());
            if cond(&out, &err) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("agent exited ({status}) before {what}; stderr:\n{err}");
            }
            if Instant::now() > deadline {
                bail!("no {what} within 240 s; stdout:\n{out}\nstderr:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn stdout(&self) -> String {
        fs::read_to_string(&self.out).unwrap_or_default()
    }
    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn expect_line(&mut self, line: &str) -> Result<()> {
        self.wait_for(
            |out, _| out.lines().any(|l| l.trim_end() == line.trim_end()),
            &format!("log line {line:?}"),
        )
    }

    fn stop(mut self) -> Result<String> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        ensure!(
            status.success(),
            "agent exited with {status}: {}",
            self.stderr()
        );
        Ok(self.stdout())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn deny() -> Result<()> {
    let root = tree("deny", &["secret/a", "public/b"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "deny",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n    tags: {team: vm}\n"),
        t.pid,
    )?;
    ensure!(
        t.child_open("/secret/a", false)? == Opened::Eperm,
        "/secret/a must be denied"
    );
    ensure!(
        t.child_open("/public/b", false)? == Opened::Ok,
        "/public/b must open"
    );
    // A host process is outside the target's mount namespace: never affected.
    fs::read(root.join("secret/a")).context("host read of the guarded file")?;
    agent.expect_line("<DENY> OPEN_PERM file '/secret/a' (vm-pod:vm) team=vm")?;
    let out = agent.stop()?;
    ensure!(
        !out.contains("/public/b"),
        "unguarded files must not be logged:\n{out}"
    );
    ensure!(
        out.lines().count() == 1,
        "exactly one decision expected:\n{out}"
    );
    ensure!(
        t.child_open("/secret/a", false)? == Opened::Ok,
        "the guard must lift on exit"
    );
    Ok(())
}

fn allow_longest_path() -> Result<()> {
    let root = tree("allow", &["secret/ok/f", "secret/no"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "allow",
        &guard_yaml(
            "  - deny: [/secret]\n    events: [open]\n  - allow: [/secret/ok]\n    events: [open]\n",
        ),
        t.pid,
    )?;
    ensure!(
        t.child_open("/secret/ok/f", false)? == Opened::Ok,
        "longer allow must win"
    );
    ensure!(
        t.child_open("/secret/no", false)? == Opened::Eperm,
        "deny must hold"
    );
    agent.expect_line("<ALLOW> OPEN_PERM file '/secret/ok/f' (vm-pod:vm) ")?;
    agent.expect_line("<DENY> OPEN_PERM file '/secret/no' (vm-pod:vm) ")?;
    agent.stop()?;
    Ok(())
}

fn recursion() -> Result<()> {
    let root = tree("recursion", &["secret/sub/deeper/f"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "recursion",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n"),
        t.pid,
    )?;
    ensure!(
        t.child_open("/secret/sub/deeper/f", false)? == Opened::Eperm,
        "deep file"
    );
    ensure!(
        t.child_open("/secret/sub", false)? == Opened::Eperm,
        "subdirectory"
    );
    // Created after the guard started: covered at once (the kernel walks up at open).
    fs::create_dir_all(root.join("secret/new/dir"))?;
    fs::write(root.join("secret/new/dir/g"), "x")?;
    ensure!(
        t.child_open("/secret/new/dir/g", false)? == Opened::Eperm,
        "new file"
    );
    agent.expect_line("<DENY> OPEN_PERM file '/secret/new/dir/g' (vm-pod:vm) ")?;
    agent.expect_line("<DENY> OPEN_PERM directory '/secret/sub' (vm-pod:vm) ")?;
    agent.stop()?;
    Ok(())
}

fn owner() -> Result<()> {
    let root = tree("owner", &["owned/f"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "owner",
        &guard_yaml("  - deny: [/owned]\n    events: [open]\n    autoAllowOwner: true\n"),
        t.pid,
    )?;
    ensure!(
        t.self_open("/owned/f", false)? == Opened::Ok,
        "the owner must be allowed"
    );
    ensure!(
        t.child_open("/owned/f", false)? == Opened::Eperm,
        "others must be denied"
    );
    agent.expect_line("<ALLOW> OPEN_PERM file '/owned/f' (vm-pod:vm) ")?;
    agent.expect_line("<DENY> OPEN_PERM file '/owned/f' (vm-pod:vm) ")?;
    agent.stop()?;
    Ok(())
}

fn modify() -> Result<()> {
    let root = tree("modify", &["conf/f"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "modify",
        &guard_yaml("  - deny: [/conf]\n    events: [modify]\n"),
        t.pid,
    )?;
    ensure!(
        t.child_open("/conf/f", false)? == Opened::Ok,
        "reading must be allowed"
    );
    ensure!(
        t.child_open("/conf/f", true)? == Opened::Eperm,
        "writing must be denied"
    );
    agent.expect_line("<DENY> MODIFY_PERM file '/conf/f' (vm-pod:vm) ")?;
    agent.stop()?;
    Ok(())
}

fn symlink_out_of_root() -> Result<()> {
    // The container's /link points at an absolute path that also exists on the host:
    // the guard must land on the container's file, never on the host's.
    let host = tree("symlink-host", &["hostsecret"])?;
    let root = tree("symlink", &[])?;
    let inside = root.join(host.strip_prefix("/")?).join("hostsecret");
    fs::create_dir_all(inside.parent().unwrap())?;
    fs::write(&inside, "container's own")?;
    std::os::unix::fs::symlink(host.join("hostsecret"), root.join("link"))?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "symlink",
        &guard_yaml("  - deny: [/link]\n    events: [open]\n"),
        t.pid,
    )?;
    let in_container = format!("{}/hostsecret", host.display());
    ensure!(
        t.child_open(&in_container, false)? == Opened::Eperm,
        "container's file"
    );
    let mut s = String::new();
    fs::File::open(host.join("hostsecret"))?.read_to_string(&mut s)?;
    ensure!(s == "content of hostsecret", "host file must be untouched");
    agent.expect_line(&format!(
        "<DENY> OPEN_PERM file '{in_container}' (vm-pod:vm) "
    ))?;
    agent.stop()?;
    Ok(())
}

fn overlay_two_roots() -> Result<()> {
    let base = tree("overlay", &["lower/data/f", "lower/other"])?;
    let mut roots = Vec::new();
    for i in 1..=2 {
        let (upper, work, merged) = (
            base.join(format!("upper{i}")),
            base.join(format!("work{i}")),
            base.join(format!("merged{i}")),
        );
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d)?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.join("lower").display(),
            upper.display(),
            work.display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .status()?;
        ensure!(st.success(), "mounting overlay {i}");
        roots.push(merged);
    }
    let result = (|| {
        let t1 = Target::start(&roots[0])?;
        let t2 = Target::start(&roots[1])?;
        let mut agent = Agent::start(
            "overlay",
            &guard_yaml("  - deny: [/data/f]\n    events: [open, access]\n"),
            t1.pid,
        )?;
        ensure!(
            t1.child_open("/data/f", false)? == Opened::Eperm,
            "guarded root"
        );
        ensure!(
            t2.child_open("/data/f", false)? == Opened::Ok,
            "the other pod's root"
        );
        ensure!(
            t1.child_open("/other", false)? == Opened::Ok,
            "unguarded file"
        );
        agent.expect_line("<DENY> OPEN_PERM file '/data/f' (vm-pod:vm) ")?;
        let out = agent.stop()?;
        // One open, one decision: the backing file's second file_open is not decided.
        ensure!(
            out.lines().count() == 1,
            "exactly one decision expected:\n{out}"
        );
        Ok(())
    })();
    for r in &roots {
        let _ = Command::new("umount").arg(r).status();
    }
    result
}

fn fail_closed_depth() -> Result<()> {
    let mut rel = String::from("deep");
    for _ in 0..60 {
        rel.push_str("/d");
    }
    let file = format!("{rel}/f");
    let root = tree("depth", &[&file, "deep/shallow"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "depth",
        &guard_yaml("  - allow: [/deep]\n    events: [open]\n"),
        t.pid,
    )?;
    ensure!(
        t.child_open("/deep/shallow", false)? == Opened::Ok,
        "shallow allow"
    );
    ensure!(
        t.child_open(&format!("/{file}"), false)? == Opened::Eperm,
        "a walk that runs out of depth must deny"
    );
    agent.wait_for(
        |out, _| out.contains("<DENY> OPEN_PERM file '/..."),
        "fail-closed deny line",
    )?;
    // The program says so itself, through aya-log, in the agent's diagnostics.
    agent.wait_for(
        |_, err| err.contains("ancestors above an opened file; denied to tgid"),
        "the program's aya-log warning",
    )?;
    agent.stop()?;
    Ok(())
}

fn load() -> Result<()> {
    let root = tree("load", &["secret/f", "public/f"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "load",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n"),
        t.pid,
    )?;
    // 960 denials: within one target's share of the log writer (1,024 waiting), so that
    // none may be dropped however far the writer falls behind.
    const WORKERS: u32 = 8;
    const OPENS: u32 = 120;
    let (denied, allowed) = t.child_load("/secret/f", "/public/f", WORKERS, OPENS)?;
    ensure!(
        denied == WORKERS * OPENS,
        "denied {denied} of {}",
        WORKERS * OPENS
    );
    ensure!(
        allowed == WORKERS * OPENS,
        "allowed {allowed} of {}",
        WORKERS * OPENS
    );
    let want = (WORKERS * OPENS) as usize;
    agent.wait_for(
        |out, _| out.lines().filter(|l| l.starts_with("<DENY>")).count() == want,
        "every denial logged",
    )?;
    agent.stop()?;
    Ok(())
}

/// The agent stops reading decisions (SIGSTOP): the ring buffer fills, every open still
/// gets the kernel's answer, and every decision is counted, the ones whose record the ring
/// could not hold too, and each as a line written or a line dropped.
fn full_ring() -> Result<()> {
    let root = tree("full-ring", &["secret/f"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "full-ring",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n"),
        t.pid,
    )?;
    agent.signal(libc::SIGSTOP);
    // Two denied opens per round, far more than the ring's 4 MiB holds.
    const WORKERS: u32 = 4;
    const OPENS: u32 = 2000;
    let total = 2 * WORKERS * OPENS;
    let (denied, opened) = t.child_load("/secret/f", "/secret/f", WORKERS, OPENS)?;
    agent.signal(libc::SIGCONT);
    ensure!(
        denied == WORKERS * OPENS && opened == 0,
        "with the ring full: denied {denied}, opened {opened} of {}",
        WORKERS * OPENS
    );
    let addr = agent.metrics;
    agent.wait_for(
        |out, _| every_decision_counted(addr, out, total),
        "every open counted as a decision, and as a line written or dropped",
    )?;
    agent.stop()?;
    Ok(())
}

/// Whether `total` denials (all of them) are counted as decisions and as denials, some
/// records were dropped by the kernel, and each is a line of `out` or a dropped line.
fn every_decision_counted(addr: SocketAddr, out: &str, total: u32) -> bool {
    let total = f64::from(total);
    let lines = out.lines().filter(|l| l.starts_with("<DENY>")).count() as f64;
    let counts = [
        "janus_decisions_total{backend=\"bpf\"",
        "janus_denials_total{",
        "janus_bpf_events_dropped_total",
        "janus_log_lines_dropped_total{",
    ]
    .map(|series| metric(addr, series).unwrap_or(f64::NAN));
    let [decisions, denials, kernel_dropped, lines_dropped] = counts;
    decisions == total && denials == total && kernel_dropped > 0.0 && lines + lines_dropped == total
}

/// One target floods denials while the agent reads nothing (SIGSTOP): the kernel stops
/// taking its records once the ring is half full, so a second target's denials made after
/// the flood still reach the log, every one; and every decision of both is counted.
fn fair_ring() -> Result<()> {
    let (a, b) = (
        tree("fair-ring-a", &["secret/flood"])?,
        tree("fair-ring-b", &["secret/quiet"])?,
    );
    let (a, b) = (Target::start(&a)?, Target::start(&b)?);
    let yaml = guard_yaml("  - deny: [/secret]\n    events: [open]\n");
    let mut agent = Agent::start_with("fair-ring", &yaml, &[a.pid, b.pid], &[])?;
    agent.wait_for(
        |_, err| err.matches("guarding").count() >= 2,
        "both targets guarded",
    )?;
    agent.signal(libc::SIGSTOP);
    // Two denied opens per round: 16,000 records, four times what the ring holds.
    const WORKERS: u32 = 4;
    const OPENS: u32 = 2000;
    let (denied, opened) = a.child_load("/secret/flood", "/secret/flood", WORKERS, OPENS)?;
    ensure!(
        denied == WORKERS * OPENS && opened == 0,
        "flood: denied {denied}, opened {opened} of {}",
        WORKERS * OPENS
    );
    const QUIET: u32 = 50;
    let (denied, opened) = b.child_load("/secret/quiet", "/secret/quiet", 1, QUIET)?;
    ensure!(
        denied == QUIET && opened == 0,
        "quiet: denied {denied}, opened {opened} of {QUIET}"
    );
    agent.signal(libc::SIGCONT);
    let total = 2 * (WORKERS * OPENS + QUIET);
    let addr = agent.metrics;
    agent.wait_for(
        |out, _| {
            let quiet = out
                .lines()
                .filter(|l| l.contains("'/secret/quiet'"))
                .count();
            quiet == 2 * QUIET as usize && every_decision_counted(addr, out, total)
        },
        "every denial of the quiet target logged, and every decision of both counted",
    )?;
    agent.stop()?;
    Ok(())
}

/// BPF maps sized for one target: the second goes to fanotify whole, the failure counted and
/// named, and both are enforced (a full map is never a partial guard).
fn full_maps() -> Result<()> {
    let files = ["secret/f", "public/f"];
    let (a, b) = (tree("full-maps-a", &files)?, tree("full-maps-b", &files)?);
    let (a, b) = (Target::start(&a)?, Target::start(&b)?);
    // Targets for one: the second of two goes to fanotify.
    let deny_secret = guard_yaml("  - deny: [/secret]\n    events: [open]\n");
    let opens_of = |t| [(t, "/secret/f", true), (t, "/public/f", false)];
    let opens = [opens_of(&a), opens_of(&b)].concat();
    over_capacity(&deny_secret, &[a.pid, b.pid], "--bpf-max-targets", &opens)?;
    // Rules for one, and a guard of two paths: the target goes to fanotify whole.
    let deny_two = guard_yaml("  - deny: [/secret/f, /public/f]\n    events: [open]\n");
    let opens = [(&a, "/secret/f", true), (&a, "/public/f", true)];
    over_capacity(&deny_two, &[a.pid], "--bpf-max-rules", &opens)
}

/// `yaml` on `pids` with the maps sized 1 by `flag`: the agent names the flag and counts one
/// full-map placement, and every open of `opens` (target, path, denied) is answered right.
fn over_capacity(
    yaml: &str,
    pids: &[i32],
    flag: &str,
    opens: &[(&Target, &str, bool)],
) -> Result<()> {
    let mut agent = Agent::start_with(&format!("full{flag}"), yaml, pids, &[flag, "1"])?;
    agent.wait_for(
        |_, err| err.contains(flag) && err.matches("guarding").count() >= pids.len(),
        "the target over capacity on fanotify, with the reason",
    )?;
    for (t, path, denied) in opens {
        let want = if *denied { Opened::Eperm } else { Opened::Ok };
        ensure!(
            t.child_open(path, false)? == want,
            "{path} in pid {}: expected {want:?}",
            t.pid
        );
    }
    let full = metric(
        agent.metrics,
        "janus_placement_failures_total{backend=\"bpf\",kind=\"map\"}",
    )?;
    ensure!(full == 1.0, "one full-map placement counted, got {full}");
    agent.stop()?;
    Ok(())
}

/// A rule's own directory may be renamed (its rule goes with it); swapping what lies below
/// it with a file outside (`RENAME_EXCHANGE`, one call of `path_rename` for both ways) is
/// refused either way round, and the line names the guarded path and the name used.
fn exchange() -> Result<()> {
    let root = tree("exchange", &["secret/a", "public/b"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "exchange",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n"),
        t.pid,
    )?;
    ensure!(
        t.child_rename("/secret", "/hidden", 0)? == Opened::Ok,
        "renaming the guarded directory itself must work"
    );
    for (from, to) in [("/hidden/a", "/public/b"), ("/public/b", "/hidden/a")] {
        ensure!(
            t.child_rename(from, to, libc::RENAME_EXCHANGE)? == Opened::Eperm,
            "exchanging {from} with {to} must be refused"
        );
    }
    ensure!(
        t.child_open("/hidden/a", false)? == Opened::Eperm,
        "/hidden/a must still be denied"
    );
    let line = "<DENY> RENAME_PERM file '/secret/a' via '/hidden/a' (vm-pod:vm)";
    agent.wait_for(
        |out, _| out.lines().filter(|l| l.trim_end() == line).count() == 2,
        "both refusals logged with the name used",
    )?;
    agent.stop()?;
    Ok(())
}

/// The guard file edited and applied again (SIGHUP) twenty times while children of the
/// target open the denied file in a loop: each new guard takes the old one's place in the
/// maps and its share of the ring, so every open is refused, and the target stays in BPF.
fn reapply() -> Result<()> {
    let root = tree("reapply", &["secret/f", "public/f"])?;
    let t = Target::start(&root)?;
    let yaml = |round: usize| {
        guard_yaml(&format!(
            "  - deny: [/secret]\n    events: [open]\n    tags: {{round: r{round}}}\n"
        ))
    };
    // Room for one target (and two shares of the ring): each apply must hand the target's
    // share to the next, or the third within 10 s would find none and leave BPF.
    let mut agent = Agent::start_with("reapply", &yaml(0), &[t.pid], &["--bpf-max-targets", "1"])?;
    let file = Path::new(WORK).join("agent-reapply/guard.yaml");
    let stop = std::sync::atomic::AtomicBool::new(false);
    const ROUNDS: usize = 20;
    let (denied, allowed, tries) = std::thread::scope(|s| -> Result<(u32, u32, u32)> {
        let reader = s.spawn(|| -> Result<(u32, u32, u32)> {
            let (mut denied, mut allowed, mut tries) = (0, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (d, a) = t.child_load("/secret/f", "/public/f", 2, 50)?;
                (denied, allowed, tries) = (denied + d, allowed + a, tries + 2 * 50);
            }
            Ok((denied, allowed, tries))
        });
        // `n` applies done, and opens refused under the last: opens go on between any two.
        let applied = |out: &str, err: &str, n: usize| {
            let tag = format!("round=r{n}");
            err.matches("SIGHUP: guards applied again").count() == n
                && out.lines().filter(|l| l.trim_end().ends_with(&tag)).count() >= 2
        };
        for round in 1..=ROUNDS {
            agent.wait_for(
                |out, err| applied(out, err, round - 1),
                "opens under the last apply",
            )?;
            fs::write(&file, yaml(round))?;
            agent.signal(libc::SIGHUP);
        }
        agent.wait_for(
            |out, err| applied(out, err, ROUNDS),
            "opens under the last apply",
        )?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().expect("the reader")
    })?;
    ensure!(
        denied == tries && allowed == tries,
        "of {tries} opens each, {denied} of /secret/f refused and {allowed} of /public/f allowed"
    );
    let err = agent.stderr();
    ensure!(
        !err.contains("with fanotify"),
        "the re-applied guard left BPF:\n{err}"
    );
    agent.stop()?;
    Ok(())
}

/// A guard in monitor mode lets reads of its denied file through and logs each as
/// `<DENY (monitor)>`; switched to enforce (the file edited, SIGHUP) while children read in
/// a loop, every read begun once the switch is applied is refused, and the target stays in
/// BPF.
fn monitor_to_enforce() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let root = tree("monitor-to-enforce", &["secret/f", "public/f"])?;
    let t = Target::start(&root)?;
    let yaml = |mode: &str| {
        guard_yaml("  - deny: [/secret]\n    events: [open]\n")
            .replace("spec:\n", &format!("spec:\n  mode: {mode}\n"))
    };
    let mut agent = Agent::start("monitor-to-enforce", &yaml("monitor"), t.pid)?;
    let file = Path::new(WORK).join("agent-monitor-to-enforce/guard.yaml");
    ensure!(
        t.child_open("/secret/f", false)? == Opened::Ok,
        "a guard in monitor mode must refuse nothing"
    );
    agent.wait_for(
        |out, _| {
            out.lines()
                .any(|l| l.trim_end() == "<DENY (monitor)> OPEN_PERM file '/secret/f' (vm-pod:vm)")
        },
        "the would-be denial logged",
    )?;
    let (switched, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    // (refused, tries) of the batches begun before and after the switch was applied.
    type Counts = ((u32, u32), (u32, u32));
    let (before, after) = std::thread::scope(|s| -> Result<Counts> {
        let reader = s.spawn(|| -> Result<Counts> {
            let (mut before, mut after) = ((0, 0), (0, 0));
            while !stop.load(Relaxed) {
                let late = switched.load(Relaxed);
                let (refused, _) = t.child_load("/secret/f", "/public/f", 2, 20)?;
                let counts: &mut (u32, u32) = if late { &mut after } else { &mut before };
                *counts = (counts.0 + refused, counts.1 + 40);
            }
            Ok((before, after))
        });
        let lines = |out: &str, start: &str| out.lines().filter(|l| l.starts_with(start)).count();
        agent.wait_for(
            |out, _| lines(out, "<DENY (monitor)>") >= 40,
            "reads under monitor",
        )?;
        fs::write(&file, yaml("enforce"))?;
        agent.signal(libc::SIGHUP);
        agent.wait_for(
            |_, err| err.contains("SIGHUP: guards applied again"),
            "the switch applied",
        )?;
        switched.store(true, Relaxed);
        agent.wait_for(|out, _| lines(out, "<DENY> ") >= 200, "reads under enforce")?;
        stop.store(true, Relaxed);
        reader.join().expect("the reader")
    })?;
    ensure!(
        before.1 > 0 && before.0 < before.1,
        "under monitor reads must go through: {before:?} (refused, tries)"
    );
    ensure!(
        after.1 > 0 && after.0 == after.1,
        "every read begun after the switch must be refused: {after:?} (refused, tries)"
    );
    let err = agent.stderr();
    ensure!(
        !err.contains("with fanotify"),
        "the switched guard left BPF:\n{err}"
    );
    agent.stop()?;
    Ok(())
}

/// Names as lines give them: a guarded name of 63 bytes (what a record holds) whole, with no
/// name used; a hard link named by it and more, cut (`…`) after ` via `, never taken for
/// it; a path of more names than a record keeps, by its last ones.
fn names() -> Result<()> {
    // The most a record holds of one name (janus_common::NAME_LEN, less its NUL).
    let long = "n".repeat(63);
    let deep = "secret/1/2/3/4/5/6/7/8/9/leaf";
    let root = tree("names", &[&format!("data/{long}"), deep])?;
    fs::hard_link(
        root.join(format!("data/{long}")),
        root.join(format!("data/{long}-link")),
    )?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "names",
        &guard_yaml(&format!(
            "  - deny: [/data/{long}, /secret]\n    events: [open]\n"
        )),
        t.pid,
    )?;
    for path in [
        format!("/data/{long}"),
        format!("/data/{long}-link"),
        format!("/{deep}"),
    ] {
        ensure!(
            t.child_open(&path, false)? == Opened::Eperm,
            "{path} must be denied"
        );
    }
    agent.expect_line(&format!("<DENY> OPEN_PERM file '/data/{long}' (vm-pod:vm)"))?;
    agent.expect_line(&format!(
        "<DENY> OPEN_PERM file '/data/{long}' via '/data/{long}…' (vm-pod:vm)"
    ))?;
    agent.expect_line("<DENY> OPEN_PERM file '/secret/.../3/4/5/6/7/8/9/leaf' (vm-pod:vm)")?;
    agent.stop()?;
    Ok(())
}

/// The sum of the agent's samples whose series starts with `series`.
fn metric(addr: SocketAddr, series: &str) -> Result<f64> {
    let (status, body) = http_get(addr, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    Ok(sum_series(&body, series))
}

fn log_format() -> Result<()> {
    let root = tree("log-format", &["secret/a"])?;
    let t = Target::start(&root)?;
    let yaml = guard_yaml("  - deny: [/secret]\n    events: [open]\n")
        + "  logFormat: '{allow}|{event}|{ftype}|{path}|{file}|{guard}|{pod}|{node}'\n";
    let mut agent = Agent::start("log-format", &yaml, t.pid)?;
    ensure!(t.child_open("/secret/a", false)? == Opened::Eperm, "denied");
    agent.expect_line("DENY|OPEN_PERM|file|/secret/a|a|vm|vm-pod|vm")?;
    agent.stop()?;
    Ok(())
}

/// A guard BPF cannot express (its path does not exist yet: BPF keys rules by inode) goes
/// to fanotify, which enforces it once the file appears.
fn fallback_to_fanotify() -> Result<()> {
    let root = tree("fallback", &["other/f"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "fallback",
        &guard_yaml("  - deny: [/later/x]\n    events: [open]\n"),
        t.pid,
    )?;
    agent.wait_for(
        |_, err| err.contains("enforcing it with fanotify"),
        "the fallback to fanotify",
    )?;
    fs::create_dir_all(root.join("later"))?;
    fs::write(root.join("later/x"), "later")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.child_open("/later/x", false)? != Opened::Eperm {
        ensure!(Instant::now() < deadline, "/later/x not denied within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.expect_line("<DENY> OPEN_PERM file '/later/x' (vm-pod:vm) ")?;
    ensure!(
        metric(agent.metrics, "janus_decisions_total{backend=\"fanotify\"")? >= 1.0,
        "counted under fanotify"
    );
    let reason = "janus_bpf_fallbacks_total{reason=\"path_missing\"}";
    ensure!(metric(agent.metrics, reason)? == 1.0, "{reason} is not 1");
    let (status, state) = http_get(agent.metrics, "/state")?;
    ensure!(
        status == 200 && state.contains("enforced by fanotify, not BPF (path_missing)"),
        "/state does not say why the target is on fanotify: {state}"
    );
    agent.stop()?;
    Ok(())
}

/// `audit: true` under BPF: the agent writes an AUDIT_USER_AVC record, which the kernel,
/// with no audit daemon listening, prints to its log.
fn audit() -> Result<()> {
    let root = tree("audit", &["secret/a"])?;
    let t = Target::start(&root)?;
    let mut agent = Agent::start(
        "audit",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n    audit: true\n"),
        t.pid,
    )?;
    ensure!(t.child_open("/secret/a", false)? == Opened::Eperm, "denied");
    let path: String = "/secret/a".bytes().map(|b| format!("{b:02X}")).collect();
    let record = "janus: response=deny mode=enforce event=OPEN_PERM guard=default/vm pod=vm-pod";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = kernel_log()?;
        let found = log.lines().any(|l| {
            l.contains("type=1107") && l.contains(record) && l.contains(&format!("path={path}"))
        });
        if found {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no audit record within 30 s; kernel log ends:\n{}",
            log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        metric(
            agent.metrics,
            "janus_internal_errors_total{backend=\"bpf\",kind=\"audit\""
        )? == 0.0,
        "an audit record failed"
    );
    agent.expect_line("<DENY> OPEN_PERM file '/secret/a' (vm-pod:vm) ")?;
    agent.stop()?;
    Ok(())
}

/// Every record of the kernel's log buffer, read from /dev/kmsg without waiting.
fn kernel_log() -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut kmsg = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .context("opening /dev/kmsg")?;
    let mut log = String::new();
    let mut record = [0u8; 8192];
    loop {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => log.push_str(&String::from_utf8_lossy(&record[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // A record overwritten while we read: the next read goes on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) => return Err(e).context("reading /dev/kmsg"),
        }
    }
    Ok(log)
}
