//! The node-scale benchmark: one agent guarding 1 container, 1 guard × N containers and
//! 10 guards × N/10 containers, against the floor (a minimal fanotify listener marking the
//! same inodes) in the same run. Per setup: the time until every target is enforced, the
//! kernel marks and the agent's RSS, every container's deny and allow checked, decisions
//! per second on one container with 2 and 4 openers (unpinned, then with the listener's
//! threads and the openers on one core, and on two), and the guarded open's latency with
//! opener and listener pinned to the same core and to different ones.

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::agent::{Agent, AgentConfig};
use crate::bench::{self, Inside, Scratch};
use crate::floor::{Floor, FloorMark};
use crate::scenarios::guard_yaml;
use crate::target::{Root, Target};

pub struct Options {
    pub agent: PathBuf,
    pub containers: usize,
    pub rounds: usize,
    pub iterations: usize,
    pub duration: Duration,
    pub workdir: PathBuf,
    /// The agent's `--backend`: `fanotify`, or `bpf` (in the VM) to size the BPF maps.
    pub backend: String,
    /// The guards' `logFormat`; None: the default, which shows the name after ` via `.
    pub log_format: Option<String>,
}

/// Guards of the 10-guard setup: guard `k` denies `/data/s<k>` and allows `/data/public`.
const GUARDS: usize = 10;
const ALLOWED: &str = "/data/public";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// The floor marking one container's inodes.
    Floor1,
    /// The floor marking every container's.
    FloorN,
    /// The agent, one guard on one container.
    Agent1,
    /// The agent, one guard on every container.
    AgentN,
    /// The agent, ten guards on a tenth of the containers.
    AgentTen,
}

impl Setup {
    const ALL: [Setup; 5] = [
        Setup::Floor1,
        Setup::FloorN,
        Setup::Agent1,
        Setup::AgentN,
        Setup::AgentTen,
    ];

    fn name(self, n: usize) -> String {
        match self {
            Setup::Floor1 => "floor, 1 container".into(),
            Setup::FloorN => format!("floor, {n} containers"),
            Setup::Agent1 => "agent, 1 guard x 1".into(),
            Setup::AgentN => format!("agent, 1 guard x {n}"),
            Setup::AgentTen => format!("agent, {GUARDS} guards x {}", n / GUARDS),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Figures {
    enforced_after: Option<Duration>,
    kernel_marks: Option<f64>,
    rss_kib: Option<u64>,
    /// Kernel memory of the agent's BPF maps (their `memlock`), under BPF.
    bpf_map_kib: Option<u64>,
    /// (placement, openers, decisions/s)
    rates: Vec<(Placement, usize, f64)>,
    /// Median open+close ns of the guarded-allowed file: same core, cross core.
    same_core: f64,
    cross_core: f64,
}

pub struct Report {
    containers: usize,
    rounds: usize,
    backend: String,
    log_format: Option<String>,
    figures: Vec<(Setup, Vec<Figures>)>,
}

fn guard_docs(k: usize, log_format: Option<&str>) -> String {
    let format = log_format.map_or(String::new(), |f| format!("  logFormat: {f:?}\n"));
    guard_yaml(
        &format!("g{k}"),
        &format!("  - deny: [/data/s{k}]\n    allow: [{ALLOWED}]\n    events: [open]\n{format}"),
    )
}

pub fn run(o: &Options) -> Result<Report> {
    let n = o.containers;
    if n < GUARDS || n % GUARDS != 0 {
        bail!("--containers must be a multiple of {GUARDS}");
    }
    let scratch = Scratch::mount(
        o.workdir
            .join(format!("janus-scale-{}", std::process::id())),
    )?;
    let mut roots = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    for i in 0..n {
        let root = Root::new(scratch.dir(), &format!("c{i}"))?;
        root.write(ALLOWED, b"public\n")?;
        for k in 0..GUARDS {
            root.write(format!("/data/s{k}"), b"secret\n")?;
        }
        targets.push(Target::start(&root).with_context(|| format!("container {i}"))?);
        roots.push(root);
    }
    eprintln!("janus-scale-bench: {n} containers started");
    let insides: Vec<Inside> = targets.iter().map(Inside::of).collect::<Result<_>>()?;
    let pids: Vec<i32> = targets.iter().map(Target::pid).collect();
    let log_format = o.log_format.as_deref();
    let one_guard = guard_docs(0, log_format);
    let ten_guards: String = (0..GUARDS)
        .map(|k| guard_docs(k, log_format))
        .collect::<Vec<_>>()
        .join("---\n");
    let marks = |roots: &[Root]| -> Vec<FloorMark> {
        roots
            .iter()
            .flat_map(|r| {
                [
                    FloorMark {
                        path: r.host("/data"),
                        dir: true,
                    },
                    FloorMark {
                        path: r.host(ALLOWED),
                        dir: false,
                    },
                ]
            })
            .collect()
    };
    let mut figures: Vec<(Setup, Vec<Figures>)> =
        Setup::ALL.iter().map(|s| (*s, Vec::new())).collect();
    // BPF holds one guard per container (the other nine would be fanotify's): no ten-guard
    // setup there.
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|s| o.backend == "fanotify" || *s != Setup::AgentTen)
        .collect();
    for round in 0..o.rounds {
        for k in 0..setups.len() {
            let setup = setups[(round + k) % setups.len()];
            eprintln!(
                "janus-scale-bench: round {}/{}: {}",
                round + 1,
                o.rounds,
                setup.name(n)
            );
            let f = match setup {
                Setup::Floor1 | Setup::FloorN => {
                    let count = if setup == Setup::Floor1 { 1 } else { n };
                    let floor = Floor::start(&marks(&roots[..count]), libc::FAN_OPEN_PERM)?;
                    let tids = bench::threads_named("self", "floor")?;
                    let f = measure(&insides[0], &tids, o)?;
                    floor.stop()?;
                    f
                }
                Setup::Agent1 | Setup::AgentN | Setup::AgentTen => {
                    let (guard, pids, guards) = match setup {
                        Setup::Agent1 => (&one_guard, &pids[..1], 1),
                        Setup::AgentN => (&one_guard, &pids[..], 1),
                        _ => (&ten_guards, &pids[..n / GUARDS], GUARDS),
                    };
                    let dir = scratch.dir().join(format!("agent-{round}-{k}"));
                    let started = Instant::now();
                    let agent = Agent::start(
                        &AgentConfig {
                            bin: &o.agent,
                            guard,
                            pids,
                            pod: "bench",
                            node: "bench",
                            extra: &["--backend", &o.backend],
                        },
                        &dir,
                    )?;
                    let enforced_after = started.elapsed();
                    check_every(&insides[..pids.len()], guards)?;
                    // BPF decides in the opener's own context: no listener to pin.
                    let fanotify = o.backend == "fanotify";
                    let tids = if fanotify {
                        let pid = agent.pid().to_string();
                        let mut tids = Vec::new();
                        for name in AGENT_LISTENER {
                            tids.extend(bench::threads_named(&pid, name)?);
                        }
                        tids
                    } else {
                        Vec::new()
                    };
                    let mut f = measure(&insides[0], &tids, o)?;
                    f.enforced_after = Some(enforced_after);
                    f.kernel_marks = if fanotify {
                        Some(agent.metric("janus_kernel_marks")?)
                    } else {
                        None
                    };
                    f.rss_kib = Some(rss_kib(agent.pid())?);
                    if !fanotify {
                        f.bpf_map_kib = Some(bpf_map_kib(agent.pid())?);
                    }
                    let status = agent.stop()?;
                    if !status.success() {
                        bail!("the agent exited with {status}");
                    }
                    let _ = fs::remove_dir_all(&dir);
                    f
                }
            };
            figures
                .iter_mut()
                .find(|(s, _)| *s == setup)
                .expect("every setup")
                .1
                .push(f);
        }
    }
    drop(insides);
    drop(targets);
    Ok(Report {
        containers: n,
        rounds: o.rounds,
        backend: o.backend.clone(),
        log_format: o.log_format.clone(),
        figures,
    })
}

/// Every container's guarded files refused and its allowed file allowed, through its own
/// mounts, for each of the first `guards` guards.
fn check_every(insides: &[Inside], guards: usize) -> Result<()> {
    let allowed = CString::new(ALLOWED)?;
    let denied: Vec<CString> = (0..guards)
        .map(|k| CString::new(format!("/data/s{k}")))
        .collect::<Result<_, _>>()?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            for (i, inside) in insides.iter().enumerate() {
                inside
                    .enter()
                    .with_context(|| format!("entering container {i}"))?;
                bench::expect(bench::open_close(&allowed)?, false, &allowed)
                    .with_context(|| format!("container {i}"))?;
                for d in &denied {
                    bench::expect(bench::open_close(d)?, true, d)
                        .with_context(|| format!("container {i}"))?;
                }
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| bail!("the checker panicked"))
    })
}

/// The agent's threads that do a decision's work: the counterpart of the floor's one thread.
const AGENT_LISTENER: [&str; 3] = ["fanotify-answer", "fanotify-settle", "decision-log"];

/// Where the threads of a rate measurement run. Unpinned, the scheduler's placement of
/// two openers and a listener on two cores moves a rate by half between identical runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Wherever the scheduler puts them.
    Free,
    /// The listener's threads and the openers on one core: a decision's whole CPU cost,
    /// listener's and opener's, bounds the rate.
    OneCore,
    /// The listener's threads on one core, the openers on the other.
    CrossCore,
}

impl Placement {
    const ALL: [Placement; 3] = [Placement::Free, Placement::OneCore, Placement::CrossCore];

    fn name(self) -> &'static str {
        match self {
            Placement::Free => "",
            Placement::OneCore => ", one core",
            Placement::CrossCore => ", cross core",
        }
    }

    /// The openers' CPUs, the listener's being CPU 0 when pinned.
    fn openers(self) -> &'static [usize] {
        match self {
            Placement::Free => &[],
            Placement::OneCore => &[0],
            Placement::CrossCore => &[1],
        }
    }
}

/// Rates with 2 and 4 openers in each placement, then the latency of one opener on the
/// listener's core and on the other, the listener's threads `listener` on CPU 0.
fn measure(inside: &Inside, listener: &[i32], o: &Options) -> Result<Figures> {
    let pin_listener = |cpu: Option<usize>| -> Result<()> {
        for tid in listener {
            bench::pin(*tid, cpu)?;
        }
        Ok(())
    };
    let mut f = Figures::default();
    for placement in Placement::ALL {
        pin_listener((placement != Placement::Free).then_some(0))?;
        for threads in [2, 4] {
            let r = bench::rate(inside, ALLOWED, threads, o.duration, placement.openers())?;
            f.rates.push((placement, threads, r));
        }
    }
    let median_ns = |opener_cpu: usize| -> Result<f64> {
        let mut ns = bench::latencies(inside, &[(ALLOWED, false)], o.iterations, Some(opener_cpu))?;
        ns[0].sort_unstable();
        Ok(bench::percentile(&ns[0], 0.5))
    };
    f.same_core = median_ns(0)?;
    f.cross_core = median_ns(1)?;
    // Unpinned again for whatever follows.
    pin_listener(None)?;
    Ok(f)
}

/// The `memlock` of every BPF map the process holds, from its descriptors' fdinfo.
fn bpf_map_kib(pid: i32) -> Result<u64> {
    let mut bytes = 0;
    for fd in fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = fs::read_to_string(fd?.path()) else {
            continue;
        };
        if !info.lines().any(|l| l.starts_with("map_type:")) {
            continue;
        }
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("a BPF map's memlock")?;
    }
    Ok(bytes / 1024)
}

fn rss_kib(pid: i32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

impl Report {
    fn of(&self, setup: Setup) -> &[Figures] {
        &self
            .figures
            .iter()
            .find(|(s, _)| *s == setup)
            .expect("every setup")
            .1
    }

    fn median(&self, setup: Setup, pick: impl Fn(&Figures) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self.of(setup).iter().filter_map(pick).collect();
        (!v.is_empty()).then(|| bench::median(v))
    }

    fn rate(&self, setup: Setup, placement: Placement, threads: usize) -> Option<f64> {
        self.median(setup, |f| {
            f.rates
                .iter()
                .find(|(p, t, _)| (*p, *t) == (placement, threads))
                .map(|(_, _, r)| *r)
        })
    }

    /// (what, value, target, pass) of every target of the issue.
    fn targets(&self) -> Vec<(String, String, &'static str, bool)> {
        let n = self.containers;
        let mut rows = Vec::new();
        for (agent, floor) in [
            (Setup::Agent1, Setup::Floor1),
            (Setup::AgentN, Setup::FloorN),
        ] {
            for (placement, threads) in Placement::ALL.into_iter().flat_map(|p| [(p, 2), (p, 4)]) {
                let (Some(a), Some(f)) = (
                    self.rate(agent, placement, threads),
                    self.rate(floor, placement, threads),
                ) else {
                    continue;
                };
                let pct = 100.0 * a / f;
                rows.push((
                    format!(
                        "{} decisions/s vs floor, {threads} openers{}",
                        agent.name(n),
                        placement.name()
                    ),
                    format!("{pct:.1}%"),
                    "≥ 90%",
                    pct >= 90.0,
                ));
            }
        }
        for setup in [Setup::AgentN, Setup::AgentTen] {
            if let Some(rss) = self.median(setup, |f| f.rss_kib.map(|r| r as f64)) {
                let mib = rss / 1024.0;
                rows.push((
                    format!("{} agent RSS", setup.name(n)),
                    format!("{mib:.1} MiB"),
                    "< 64 MiB",
                    mib < 64.0,
                ));
            }
        }
        rows
    }

    pub fn all_pass(&self) -> bool {
        self.targets().iter().all(|t| t.3)
    }

    pub fn render(&self) -> String {
        let n = self.containers;
        let mut out = String::new();
        let format =
            (self.log_format.as_ref()).map_or(String::new(), |f| format!(", logFormat {f:?}"));
        let _ = writeln!(
            out,
            "janus-scale-bench: {n} containers, {} rounds, agent --backend {}{format}; figures \
             are medians over rounds",
            self.rounds, self.backend
        );
        let _ = writeln!(
            out,
            "{:<50} {:<28} {:>12}",
            "measurement", "setup", "median"
        );
        let mut row = |what: &str, setup: Setup, v: Option<f64>, unit: &str| {
            if let Some(v) = v {
                let _ = writeln!(out, "{what:<50} {:<28} {v:>12.0}{unit}", setup.name(n));
            }
        };
        for setup in [Setup::Agent1, Setup::AgentN, Setup::AgentTen] {
            row(
                "every target enforced after ms",
                setup,
                self.median(setup, |f| f.enforced_after.map(|d| d.as_secs_f64() * 1e3)),
                "",
            );
            row(
                "kernel marks (one fanotify group)",
                setup,
                self.median(setup, |f| f.kernel_marks),
                "",
            );
            row(
                "agent RSS KiB",
                setup,
                self.median(setup, |f| f.rss_kib.map(|r| r as f64)),
                "",
            );
            row(
                "BPF maps KiB (kernel memory)",
                setup,
                self.median(setup, |f| f.bpf_map_kib.map(|k| k as f64)),
                "",
            );
        }
        for placement in Placement::ALL {
            for threads in [2, 4] {
                for setup in Setup::ALL {
                    row(
                        &format!("decisions/s, {threads} openers{}", placement.name()),
                        setup,
                        self.rate(setup, placement, threads),
                        "",
                    );
                }
            }
        }
        for (what, pick) in [
            ("guarded open+close ns, same core", 0),
            ("guarded open+close ns, cross core", 1),
        ] {
            for setup in Setup::ALL {
                row(
                    what,
                    setup,
                    self.median(setup, |f| {
                        Some(if pick == 0 { f.same_core } else { f.cross_core })
                    }),
                    "",
                );
            }
        }
        for (what, value, target, pass) in self.targets() {
            let _ = writeln!(
                out,
                "{what:<68} {target:<10} {value:>10} {}",
                if pass { "PASS" } else { "FAIL" }
            );
        }
        out
    }
}
