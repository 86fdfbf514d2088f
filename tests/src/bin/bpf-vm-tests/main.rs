//! The BPF LSM backend's own tests, run as root inside `cargo xtask vm-test` (the host
//! kernel refuses BPF LSM programs), beside the scenario table that the VM runs under both
//! backends: what only the kernel side has (overlayfs's second open, the bounded walk, the
//! ring and its shares, the maps' capacity, rename and link refusals, re-applies in place,
//! audit records). Each scenario starts targets and agents with the harness the host tests
//! use ([`janus_tests::target`], [`janus_tests::agent`]) and checks what the targets see
//! and what the agent logs and counts.
//!
//! Prints `PASS <scenario> (<seconds> s)` / `FAIL <scenario>: <why> (<seconds> s)` and exits
//! non-zero if any failed. Each scenario runs in a forked process group under a deadline
//! ([`janus_tests::isolate`]).

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use janus_tests::agent::{http_get, sum_series, Agent, AgentConfig};
use janus_tests::isolate;
use janus_tests::scenarios;
use janus_tests::target::{Access, Root, Target};
use nix::sys::signal::Signal;

const AGENT: &str = "/bin/janus-agent";

type Scenario = fn() -> Result<()>;
const WORK: &str = "/tmp/bpf-vm";

/// A scenario that has not finished by then is killed and fails; the harness's own waits
/// are at most [`janus_tests::agent::STARTUP`], so this is only reached by a step that
/// would otherwise block for ever.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let scenarios: [(&str, Scenario); 13] = [
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

/// A fresh root under WORK with `files` (paths relative to it), each holding `content of
/// <path>`.
fn tree(name: &str, files: &[&str]) -> Result<Root> {
    fs::create_dir_all(WORK)?;
    let root = Root::new(Path::new(WORK), name)?;
    for f in files {
        root.write(format!("/{f}"), format!("content of {f}").as_bytes())?;
    }
    Ok(root)
}

fn guard_yaml(subjects: &str) -> String {
    scenarios::guard_yaml("vm", subjects)
}

/// `janus-agent guard --backend bpf` on `pids` (with `extra` arguments), once it guards
/// them in the kernel.
fn bpf_agent(name: &str, yaml: &str, pids: &[i32], extra: &[&str]) -> Result<Agent> {
    let mut args = vec!["--backend", "bpf"];
    args.extend_from_slice(extra);
    let mut agent = Agent::spawn(
        &AgentConfig {
            bin: Path::new(AGENT),
            guard: yaml,
            pids,
            pod: "vm-pod",
            node: "vm",
            extra: &args,
        },
        &Path::new(WORK).join(format!("agent-{name}")),
    )?;
    agent.wait_for("its guarding line", |_, err| {
        err.contains("guarding") && err.contains("bpf")
    })?;
    Ok(agent)
}

fn overlay_two_roots() -> Result<()> {
    // One lower layer, with busybox, under two overlays: two pods of one image.
    let lower = tree("overlay-lower", &["data/f", "other"])?;
    let base = Path::new(WORK).join("overlay");
    let _ = fs::remove_dir_all(&base);
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
            lower.dir().display(),
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
        let t1 = Target::start_in(&roots[0])?;
        let t2 = Target::start_in(&roots[1])?;
        let mut agent = bpf_agent(
            "overlay",
            &guard_yaml("  - deny: [/data/f]\n    events: [open, access]\n"),
            &[t1.pid()],
            &[],
        )?;
        ensure!(
            t1.open_as_other("/data/f", false)? == Access::Denied,
            "guarded root"
        );
        ensure!(
            t2.open_as_other("/data/f", false)? == Access::Ok(String::new()),
            "the other pod's root"
        );
        ensure!(
            t1.open_as_other("/other", false)? == Access::Ok(String::new()),
            "unguarded file"
        );
        agent.expect_line("<DENY> OPEN_PERM file '/data/f' (vm-pod:vm) ")?;
        let out = agent.finish()?;
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
    let mut agent = bpf_agent(
        "depth",
        &guard_yaml("  - allow: [/deep]\n    events: [open]\n"),
        &[t.pid()],
        &[],
    )?;
    ensure!(
        t.open_as_other("/deep/shallow", false)? == Access::Ok(String::new()),
        "shallow allow"
    );
    ensure!(
        t.open_as_other(&format!("/{file}"), false)? == Access::Denied,
        "a walk that runs out of depth must deny"
    );
    agent.wait_for("fail-closed deny line", |out, _| {
        out.contains("<DENY> OPEN_PERM file '/...")
    })?;
    // The program says so itself, through aya-log, in the agent's diagnostics.
    agent.wait_for("the program's aya-log warning", |_, err| {
        err.contains("ancestors above an opened file; denied to tgid")
    })?;
    agent.finish()?;
    Ok(())
}

fn load() -> Result<()> {
    let root = tree("load", &["secret/f", "public/f"])?;
    let t = Target::start(&root)?;
    let mut agent = bpf_agent(
        "load",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n"),
        &[t.pid()],
        &[],
    )?;
    // 960 denials: within one target's share of the log writer (1,024 waiting), so that
    // none may be dropped however far the writer falls behind.
    const WORKERS: u32 = 8;
    const OPENS: u32 = 120;
    let (denied, allowed) = t.load("/secret/f", "/public/f", WORKERS, OPENS)?;
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
    agent.wait_for("every denial logged", |out, _| {
        out.lines().filter(|l| l.starts_with("<DENY>")).count() == want
    })?;
    agent.finish()?;
    Ok(())
}

/// The agent stops reading decisions (SIGSTOP): the ring buffer fills, every open still
/// gets the kernel's answer, and every decision is counted, the ones whose record the ring
/// could not hold too, and each as a line written or a line dropped.
fn full_ring() -> Result<()> {
    let root = tree("full-ring", &["secret/f"])?;
    let t = Target::start(&root)?;
    let mut agent = bpf_agent(
        "full-ring",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n"),
        &[t.pid()],
        &[],
    )?;
    agent.signal(Signal::SIGSTOP)?;
    // Two denied opens per round, far more than the ring's 4 MiB holds.
    const WORKERS: u32 = 4;
    const OPENS: u32 = 2000;
    let total = 2 * WORKERS * OPENS;
    let (denied, opened) = t.load("/secret/f", "/secret/f", WORKERS, OPENS)?;
    agent.signal(Signal::SIGCONT)?;
    ensure!(
        denied == WORKERS * OPENS && opened == 0,
        "with the ring full: denied {denied}, opened {opened} of {}",
        WORKERS * OPENS
    );
    let addr = agent.addr;
    agent.wait_for(
        "every open counted as a decision, and as a line written or dropped",
        |out, _| every_decision_counted(addr, out, total),
    )?;
    agent.finish()?;
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
    let mut agent = bpf_agent("fair-ring", &yaml, &[a.pid(), b.pid()], &[])?;
    agent.wait_for("both targets guarded", |_, err| {
        err.matches("guarding").count() >= 2
    })?;
    agent.signal(Signal::SIGSTOP)?;
    // Two denied opens per round: 16,000 records, four times what the ring holds.
    const WORKERS: u32 = 4;
    const OPENS: u32 = 2000;
    let (denied, opened) = a.load("/secret/flood", "/secret/flood", WORKERS, OPENS)?;
    ensure!(
        denied == WORKERS * OPENS && opened == 0,
        "flood: denied {denied}, opened {opened} of {}",
        WORKERS * OPENS
    );
    const QUIET: u32 = 50;
    let (denied, opened) = b.load("/secret/quiet", "/secret/quiet", 1, QUIET)?;
    ensure!(
        denied == QUIET && opened == 0,
        "quiet: denied {denied}, opened {opened} of {QUIET}"
    );
    agent.signal(Signal::SIGCONT)?;
    let total = 2 * (WORKERS * OPENS + QUIET);
    let addr = agent.addr;
    agent.wait_for(
        "every denial of the quiet target logged, and every decision of both counted",
        |out, _| {
            let quiet = out
                .lines()
                .filter(|l| l.contains("'/secret/quiet'"))
                .count();
            quiet == 2 * QUIET as usize && every_decision_counted(addr, out, total)
        },
    )?;
    agent.finish()?;
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
    over_capacity(
        &deny_secret,
        &[a.pid(), b.pid()],
        "--bpf-max-targets",
        &opens,
    )?;
    // Rules for one, and a guard of two paths: the target goes to fanotify whole.
    let deny_two = guard_yaml("  - deny: [/secret/f, /public/f]\n    events: [open]\n");
    let opens = [(&a, "/secret/f", true), (&a, "/public/f", true)];
    over_capacity(&deny_two, &[a.pid()], "--bpf-max-rules", &opens)
}

/// `yaml` on `pids` with the maps sized 1 by `flag`: the agent names the flag and counts one
/// full-map placement, and every open of `opens` (target, path, denied) is answered right.
fn over_capacity(
    yaml: &str,
    pids: &[i32],
    flag: &str,
    opens: &[(&Target, &str, bool)],
) -> Result<()> {
    let mut agent = bpf_agent(&format!("full{flag}"), yaml, pids, &[flag, "1"])?;
    agent.wait_for(
        "the target over capacity on fanotify, with the reason",
        |_, err| err.contains(flag) && err.matches("guarding").count() >= pids.len(),
    )?;
    for (t, path, denied) in opens {
        let want = if *denied {
            Access::Denied
        } else {
            Access::Ok(String::new())
        };
        ensure!(
            t.open_as_other(path, false)? == want,
            "{path} in pid {}: expected {want:?}",
            t.pid()
        );
    }
    let full = metric(
        agent.addr,
        "janus_placement_failures_total{backend=\"bpf\",kind=\"map\"}",
    )?;
    ensure!(full == 1.0, "one full-map placement counted, got {full}");
    agent.finish()?;
    Ok(())
}

/// A rule's own directory may be renamed (its rule goes with it); swapping what lies below
/// it with a file outside (`RENAME_EXCHANGE`, one call of `path_rename` for both ways) is
/// refused either way round, and the line names the guarded path and the name used.
fn exchange() -> Result<()> {
    let root = tree("exchange", &["secret/a", "public/b"])?;
    let t = Target::start(&root)?;
    let mut agent = bpf_agent(
        "exchange",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n"),
        &[t.pid()],
        &[],
    )?;
    ensure!(
        t.rename_as_other("/secret", "/hidden", 0)? == Access::Ok(String::new()),
        "renaming the guarded directory itself must work"
    );
    for (from, to) in [("/hidden/a", "/public/b"), ("/public/b", "/hidden/a")] {
        ensure!(
            t.rename_as_other(from, to, libc::RENAME_EXCHANGE)? == Access::Denied,
            "exchanging {from} with {to} must be refused"
        );
    }
    ensure!(
        t.open_as_other("/hidden/a", false)? == Access::Denied,
        "/hidden/a must still be denied"
    );
    let line = "<DENY> RENAME_PERM file '/secret/a' via '/hidden/a' (vm-pod:vm)";
    agent.wait_for("both refusals logged with the name used", |out, _| {
        out.lines().filter(|l| l.trim_end() == line).count() == 2
    })?;
    agent.finish()?;
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
    let mut agent = bpf_agent("reapply", &yaml(0), &[t.pid()], &["--bpf-max-targets", "1"])?;
    let file = Path::new(WORK).join("agent-reapply/guard.yaml");
    let stop = std::sync::atomic::AtomicBool::new(false);
    const ROUNDS: usize = 20;
    let (denied, allowed, tries) = std::thread::scope(|s| -> Result<(u32, u32, u32)> {
        let reader = s.spawn(|| -> Result<(u32, u32, u32)> {
            let (mut denied, mut allowed, mut tries) = (0, 0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (d, a) = t.load("/secret/f", "/public/f", 2, 50)?;
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
            agent.wait_for("opens under the last apply", |out, err| {
                applied(out, err, round - 1)
            })?;
            fs::write(&file, yaml(round))?;
            agent.signal(Signal::SIGHUP)?;
        }
        agent.wait_for("opens under the last apply", |out, err| {
            applied(out, err, ROUNDS)
        })?;
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
    agent.finish()?;
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
    let mut agent = bpf_agent("monitor-to-enforce", &yaml("monitor"), &[t.pid()], &[])?;
    let file = Path::new(WORK).join("agent-monitor-to-enforce/guard.yaml");
    ensure!(
        t.open_as_other("/secret/f", false)? == Access::Ok(String::new()),
        "a guard in monitor mode must refuse nothing"
    );
    agent.wait_for("the would-be denial logged", |out, _| {
        out.lines()
            .any(|l| l.trim_end() == "<DENY (monitor)> OPEN_PERM file '/secret/f' (vm-pod:vm)")
    })?;
    let (switched, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    // (refused, tries) of the batches begun before and after the switch was applied.
    type Counts = ((u32, u32), (u32, u32));
    let (before, after) = std::thread::scope(|s| -> Result<Counts> {
        let reader = s.spawn(|| -> Result<Counts> {
            let (mut before, mut after) = ((0, 0), (0, 0));
            while !stop.load(Relaxed) {
                let late = switched.load(Relaxed);
                let (refused, _) = t.load("/secret/f", "/public/f", 2, 20)?;
                let counts: &mut (u32, u32) = if late { &mut after } else { &mut before };
                *counts = (counts.0 + refused, counts.1 + 40);
            }
            Ok((before, after))
        });
        let lines = |out: &str, start: &str| out.lines().filter(|l| l.starts_with(start)).count();
        agent.wait_for("reads under monitor", |out, _| {
            lines(out, "<DENY (monitor)>") >= 40
        })?;
        fs::write(&file, yaml("enforce"))?;
        agent.signal(Signal::SIGHUP)?;
        agent.wait_for("the switch applied", |_, err| {
            err.contains("SIGHUP: guards applied again")
        })?;
        switched.store(true, Relaxed);
        agent.wait_for("reads under enforce", |out, _| lines(out, "<DENY> ") >= 200)?;
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
    agent.finish()?;
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
        root.host(format!("/data/{long}")),
        root.host(format!("/data/{long}-link")),
    )?;
    let t = Target::start(&root)?;
    let mut agent = bpf_agent(
        "names",
        &guard_yaml(&format!(
            "  - deny: [/data/{long}, /secret]\n    events: [open]\n"
        )),
        &[t.pid()],
        &[],
    )?;
    for path in [
        format!("/data/{long}"),
        format!("/data/{long}-link"),
        format!("/{deep}"),
    ] {
        ensure!(
            t.open_as_other(&path, false)? == Access::Denied,
            "{path} must be denied"
        );
    }
    agent.expect_line(&format!("<DENY> OPEN_PERM file '/data/{long}' (vm-pod:vm)"))?;
    agent.expect_line(&format!(
        "<DENY> OPEN_PERM file '/data/{long}' via '/data/{long}…' (vm-pod:vm)"
    ))?;
    agent.expect_line("<DENY> OPEN_PERM file '/secret/.../3/4/5/6/7/8/9/leaf' (vm-pod:vm)")?;
    agent.finish()?;
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
    let mut agent = bpf_agent("log-format", &yaml, &[t.pid()], &[])?;
    ensure!(
        t.open_as_other("/secret/a", false)? == Access::Denied,
        "denied"
    );
    agent.expect_line("DENY|OPEN_PERM|file|/secret/a|a|vm|vm-pod|vm")?;
    agent.finish()?;
    Ok(())
}

/// A guard BPF cannot express (its path does not exist yet: BPF keys rules by inode) goes
/// to fanotify, which enforces it once the file appears.
fn fallback_to_fanotify() -> Result<()> {
    let root = tree("fallback", &["other/f"])?;
    let t = Target::start(&root)?;
    let mut agent = bpf_agent(
        "fallback",
        &guard_yaml("  - deny: [/later/x]\n    events: [open]\n"),
        &[t.pid()],
        &[],
    )?;
    agent.wait_for("the fallback to fanotify", |_, err| {
        err.contains("enforcing it with fanotify")
    })?;
    fs::create_dir_all(root.host("/later"))?;
    fs::write(root.host("/later/x"), "later")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.open_as_other("/later/x", false)? != Access::Denied {
        ensure!(Instant::now() < deadline, "/later/x not denied within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.expect_line("<DENY> OPEN_PERM file '/later/x' (vm-pod:vm) ")?;
    ensure!(
        metric(agent.addr, "janus_decisions_total{backend=\"fanotify\"")? >= 1.0,
        "counted under fanotify"
    );
    let reason = "janus_bpf_fallbacks_total{reason=\"path_missing\"}";
    ensure!(metric(agent.addr, reason)? == 1.0, "{reason} is not 1");
    let (status, state) = http_get(agent.addr, "/state")?;
    ensure!(
        status == 200 && state.contains("enforced by fanotify, not BPF (path_missing)"),
        "/state does not say why the target is on fanotify: {state}"
    );
    agent.finish()?;
    Ok(())
}

/// `audit: true` under BPF: the agent writes an AUDIT_USER_AVC record, which the kernel,
/// with no audit daemon listening, prints to its log.
fn audit() -> Result<()> {
    let root = tree("audit", &["secret/a"])?;
    let t = Target::start(&root)?;
    let mut agent = bpf_agent(
        "audit",
        &guard_yaml("  - deny: [/secret]\n    events: [open]\n    audit: true\n"),
        &[t.pid()],
        &[],
    )?;
    ensure!(
        t.open_as_other("/secret/a", false)? == Access::Denied,
        "denied"
    );
    let path: String = "/secret/a".bytes().map(|b| format!("{b:02X}")).collect();
    let record = "janus: response=deny mode=enforce event=OPEN_PERM guard=tests/vm pod=vm-pod";
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
            agent.addr,
            "janus_internal_errors_total{backend=\"bpf\",kind=\"audit\""
        )? == 0.0,
        "an audit record failed"
    );
    agent.expect_line("<DENY> OPEN_PERM file '/secret/a' (vm-pod:vm) ")?;
    agent.finish()?;
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
