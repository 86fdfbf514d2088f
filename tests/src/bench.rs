//! The benchmark: what an open costs inside a target with no listener, under the floor (a
//! fanotify listener that allows everything, see [`crate::floor`]) and under the agent, and
//! how soon a new directory under a guarded one is enforced.
//!
//! Openers are threads of this process that entered the target as `kubectl exec` does
//! (its mount namespace and root): the agent decides only for opens made through the
//! target's own mounts. Each round measures every setup in turn, in a rotating order, and
//! the report gives the median over rounds, so that noise from a shared machine spreads
//! over all setups alike.

use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::agent::{Agent, AgentConfig};
use crate::floor::{Floor, FloorMark};
use crate::scenarios::guard_yaml;
use crate::target::{check, open_fd, Root, Target};

/// The guard under test: `/data` denied, `/data/public` allowed, `/srv` unguarded.
const SUBJECTS: &str = "  - deny: [/data]\n    allow: [/data/public]\n    events: [open]\n";
const UNGUARDED: &str = "/srv/plain";
const ALLOWED: &str = "/data/public";
const DENIED: &str = "/data/secret";
/// On a filesystem of its own that nothing ever marks: timed alongside the unguarded file,
/// it tells how fast opens were at that moment, whatever else ran on the machine.
const CONTROL: &str = "/control/plain";
/// How long the new-directory window may take before the run counts as a failure.
const WINDOW_LIMIT: Duration = Duration::from_secs(5);
/// What the agent issue requires of the window.
const WINDOW_TARGET: Duration = Duration::from_secs(1);

pub struct Options {
    pub agent: PathBuf,
    /// `--backend` for the agent; `None` leaves the agent's default.
    pub backend: Option<String>,
    /// Timed open+close calls per file, setup and round.
    pub iterations: usize,
    pub rounds: usize,
    /// How long each decisions-per-second measurement runs.
    pub duration: Duration,
    /// Parallel openers for the decisions-per-second rows.
    pub threads: Vec<usize>,
    /// New directories timed per round.
    pub window_runs: usize,
    /// Where the scratch tmpfs is mounted.
    pub workdir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// No listener at all.
    None,
    Floor,
    Agent,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::None, Setup::Floor, Setup::Agent];

    fn name(self) -> &'static str {
        match self {
            Setup::None => "no agent",
            Setup::Floor => "floor",
            Setup::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Unguarded,
    Allowed,
    Denied,
}

impl Case {
    const ALL: [Case; 3] = [Case::Unguarded, Case::Allowed, Case::Denied];

    fn path(self) -> &'static str {
        match self {
            Case::Unguarded => UNGUARDED,
            Case::Allowed => ALLOWED,
            Case::Denied => DENIED,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Case::Unguarded => "unguarded",
            Case::Allowed => "guarded-allowed",
            Case::Denied => "guarded-denied",
        }
    }

    /// Whether `setup` should refuse the open.
    fn denied_under(self, setup: Setup) -> bool {
        self == Case::Denied && setup == Setup::Agent
    }
}

/// One round's figures for one setup.
#[derive(Default)]
struct RoundFigures {
    /// (case, median ns, p99 ns).
    latency: Vec<(Case, f64, f64)>,
    /// (threads, opens per second) on the guarded-allowed file.
    rate: Vec<(usize, f64)>,
    /// The unguarded file's median over the control file's, timed in alternation.
    unguarded_vs_control: Option<f64>,
    /// CPU time the listener spent per decision over the latency and rate measurements,
    /// in ns: a figure that the noise of a shared machine hardly moves.
    cpu_per_decision: Option<f64>,
}

/// Everything measured, over all rounds.
pub struct Report {
    rounds: usize,
    iterations: usize,
    backend: String,
    /// [setup][round]
    figures: Vec<Vec<RoundFigures>>,
    windows: Vec<Duration>,
    threads: Vec<usize>,
}

/// Runs every round and returns the figures.
pub fn run(opts: &Options) -> Result<Report> {
    let scratch = Scratch::mount(
        opts.workdir
            .join(format!("janus-bench-{}", std::process::id())),
    )?;
    let root = Root::new(scratch.dir(), "bench")?;
    // Mounted before the target starts, so that its mount namespace has it too; unmounted
    // (dropped) before the root is removed.
    let control = Scratch::mount(
        root.host(CONTROL)
            .parent()
            .context("control dir")?
            .to_owned(),
    )?;
    fs::write(control.dir().join("plain"), b"control\n")?;
    root.write(UNGUARDED, b"plain\n")?;
    root.write(ALLOWED, b"public\n")?;
    root.write(DENIED, b"secret\n")?;
    let target = Target::start(&root)?;
    let inside = Inside::of(&target)?;
    let host_root = open_dir(root.dir())?;
    let guard = guard_yaml("bench", SUBJECTS);
    let backend_args: Vec<&str> = match &opts.backend {
        Some(b) => vec!["--backend", b.as_str()],
        None => Vec::new(),
    };
    // What the agent marks for this guard: the denied tree's directories and the allowed
    // file; the floor marks the same inodes for the same event.
    let floor_marks = [
        FloorMark {
            path: root.host("/data"),
            dir: true,
        },
        FloorMark {
            path: root.host(ALLOWED),
            dir: false,
        },
    ];
    let mut figures: Vec<Vec<RoundFigures>> = Setup::ALL.iter().map(|_| Vec::new()).collect();
    let mut windows = Vec::new();
    let mut backend = String::from("fanotify");
    for round in 0..opts.rounds {
        for k in 0..Setup::ALL.len() {
            let setup = Setup::ALL[(round + k) % Setup::ALL.len()];
            eprintln!(
                "janus-bench: round {}/{}: {}",
                round + 1,
                opts.rounds,
                setup.name()
            );
            let f = match setup {
                Setup::None => measure(&inside, setup, opts)?,
                Setup::Floor => {
                    let floor = Floor::start(&floor_marks, libc::FAN_OPEN_PERM)?;
                    let mut f = measure(&inside, setup, opts)?;
                    let answered = floor.stop()?;
                    f.cpu_per_decision =
                        Some(answered.cpu.as_nanos() as f64 / answered.events.max(1) as f64);
                    f
                }
                Setup::Agent => {
                    let dir = scratch.dir().join(format!("agent-{round}"));
                    let agent = Agent::start(
                        &AgentConfig {
                            bin: &opts.agent,
                            guard: &guard,
                            pids: &[target.pid()],
                            pod: "bench",
                            node: "bench",
                            extra: &backend_args,
                        },
                        &dir,
                    )?;
                    backend = agent_backend(&agent);
                    let before = agent_usage(&agent)?;
                    let mut f = measure(&inside, setup, opts)?;
                    let after = agent_usage(&agent)?;
                    f.cpu_per_decision = Some(
                        after.0.saturating_sub(before.0).as_nanos() as f64
                            / (after.1 - before.1).max(1.0),
                    );
                    for i in 0..opts.window_runs {
                        let name = format!("/data/new-{round}-{i}");
                        windows.push(
                            new_dir_window(&inside, &host_root, &name)
                                .with_context(|| format!("new-directory window for {name}"))?,
                        );
                    }
                    let status = agent.stop()?;
                    if !status.success() {
                        bail!("the agent exited with {status}");
                    }
                    // Its decision log only takes room.
                    let _ = fs::remove_dir_all(&dir);
                    f
                }
            };
            figures[index_of(setup)].push(f);
        }
    }
    drop(target);
    drop(control);
    Ok(Report {
        rounds: opts.rounds,
        iterations: opts.iterations,
        backend,
        figures,
        windows,
        threads: opts.threads.clone(),
    })
}

fn index_of(setup: Setup) -> usize {
    Setup::ALL
        .iter()
        .position(|s| *s == setup)
        .expect("a known setup")
}

/// The backend the agent reports running (`janus_backend_info`), fanotify if it does not say.
fn agent_backend(agent: &Agent) -> String {
    let Ok((_, body)) = agent.get("/metrics") else {
        return "fanotify".into();
    };
    body.lines()
        .filter(|l| l.starts_with("janus_backend_info{") && l.ends_with(" 1"))
        .find_map(|l| {
            let rest = &l[l.find("backend=\"")? + 9..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .unwrap_or_else(|| "fanotify".into())
}

/// The agent's CPU time so far (all its threads) and its decisions so far.
fn agent_usage(agent: &Agent) -> Result<(Duration, f64)> {
    let tasks = format!("/proc/{}/task", agent.pid());
    let mut cpu = Duration::ZERO;
    for task in fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
        // The first field of schedstat: time on a CPU, in ns.
        let stat = fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        if let Some(ns) = stat.split(' ').next().and_then(|n| n.parse().ok()) {
            cpu += Duration::from_nanos(ns);
        }
    }
    Ok((cpu, agent.metric("janus_decisions_total")?))
}

fn measure(inside: &Inside, setup: Setup, opts: &Options) -> Result<RoundFigures> {
    let mut f = RoundFigures::default();
    for case in Case::ALL {
        let mut paths = vec![(case.path(), case.denied_under(setup))];
        if case == Case::Unguarded {
            paths.push((CONTROL, false));
        }
        let mut ns = latencies(inside, &paths, opts.iterations, None)
            .with_context(|| format!("{} under {}", case.name(), setup.name()))?;
        for v in &mut ns {
            v.sort_unstable();
        }
        let m = percentile(&ns[0], 0.5);
        if let Some(control) = ns.get(1) {
            f.unguarded_vs_control = Some(m / percentile(control, 0.5));
        }
        f.latency.push((case, m, percentile(&ns[0], 0.99)));
    }
    if setup != Setup::None {
        for &threads in &opts.threads {
            f.rate
                .push((threads, rate(inside, ALLOWED, threads, opts.duration, &[])?));
        }
    }
    Ok(f)
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The target's mount namespace and root, entered by opener threads.
pub(crate) struct Inside {
    ns: OwnedFd,
    root: OwnedFd,
}

impl Inside {
    pub(crate) fn of(target: &Target) -> Result<Inside> {
        let pid = target.pid();
        Ok(Inside {
            ns: open_fd(&format!("/proc/{pid}/ns/mnt"), libc::O_RDONLY)?,
            root: open_dir(Path::new(&format!("/proc/{pid}/root")))?,
        })
    }

    /// Moves the calling thread into the target, as `kubectl exec` moves a process. Threads
    /// share their root and working directory unless they unshare them first, and setns
    /// refuses a mount namespace change while they are shared.
    pub(crate) fn enter(&self) -> Result<()> {
        // SAFETY: plain system calls on descriptors we hold and constant C strings; they
        // change only this thread's filesystem context once CLONE_FS is unshared.
        unsafe {
            check(libc::unshare(libc::CLONE_FS)).context("unshare(CLONE_FS)")?;
            check(libc::setns(self.ns.as_raw_fd(), libc::CLONE_NEWNS))
                .context("setns into the target's mount namespace")?;
            check(libc::fchdir(self.root.as_raw_fd())).context("fchdir to the target's root")?;
            check(libc::chroot(c".".as_ptr())).context("chroot")?;
            check(libc::chdir(c"/".as_ptr())).context("chdir")?;
        }
        Ok(())
    }
}

/// Opens and closes `path` once; whether it was refused with EPERM.
pub(crate) fn open_close(path: &CStr) -> Result<bool> {
    // SAFETY: a C string path; the descriptor is closed at once.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: a descriptor we just opened.
        unsafe { libc::close(fd) };
        return Ok(false);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        Ok(true)
    } else {
        Err(e).with_context(|| format!("open {}", path.to_string_lossy()))
    }
}

/// `n` timed open+close calls of each of `paths` (path, whether it must be refused) from
/// inside the target, in ns, after a warm-up. Several paths are timed in alternating
/// chunks, so that they see the machine in the same state.
pub(crate) fn latencies(
    inside: &Inside,
    paths: &[(&str, bool)],
    n: usize,
    cpu: Option<usize>,
) -> Result<Vec<Vec<u64>>> {
    const CHUNK: usize = 500;
    let paths: Vec<(CString, bool)> = paths
        .iter()
        .map(|(p, d)| Ok((CString::new(*p)?, *d)))
        .collect::<Result<_>>()?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<Vec<u64>>> {
            inside.enter()?;
            if cpu.is_some() {
                pin(0, cpu)?;
            }
            for (path, denied) in &paths {
                for _ in 0..(n / 10).max(100) {
                    expect(open_close(path)?, *denied, path)?;
                }
            }
            let mut ns: Vec<Vec<u64>> = paths.iter().map(|_| Vec::with_capacity(n)).collect();
            while ns[0].len() < n {
                let chunk = CHUNK.min(n - ns[0].len());
                for ((path, denied), ns) in paths.iter().zip(&mut ns) {
                    for _ in 0..chunk {
                        let t = Instant::now();
                        let refused = open_close(path)?;
                        ns.push(t.elapsed().as_nanos() as u64);
                        expect(refused, *denied, path)?;
                    }
                }
            }
            Ok(ns)
        })
        .join()
        .unwrap_or_else(|_| bail!("an opener panicked"))
    })
}

pub(crate) fn expect(refused: bool, denied: bool, path: &CStr) -> Result<()> {
    if refused != denied {
        bail!(
            "open {} was {}, expected it {}",
            path.to_string_lossy(),
            if refused { "refused" } else { "allowed" },
            if denied { "refused" } else { "allowed" }
        );
    }
    Ok(())
}

/// Opens per second of `path` by `threads` openers inside the target for `duration`, opener
/// `i` pinned to `cpus[i % cpus.len()]` (unpinned if `cpus` is empty).
pub(crate) fn rate(
    inside: &Inside,
    path: &str,
    threads: usize,
    duration: Duration,
    cpus: &[usize],
) -> Result<f64> {
    let path = CString::new(path)?;
    let start = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let elapsed = std::thread::scope(|s| -> Result<Duration> {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
                let (start, stop, total, path) = (&start, &stop, &total, &path);
                s.spawn(move || -> Result<()> {
                    let entered = inside.enter().and_then(|()| match cpu {
                        Some(_) => pin(0, cpu),
                        None => Ok(()),
                    });
                    start.wait();
                    entered?;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        expect(open_close(path)?, false, path)?;
                        n += 1;
                    }
                    total.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap_or_else(|_| bail!("an opener panicked"))?;
        }
        Ok(t.elapsed())
    })?;
    Ok(total.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64())
}

/// From a `mkdir` under the guarded directory, inside the target, to the first refused
/// open of a file in it. The file is made through the host's view of the root (an open the
/// agent does not decide), so that only the directory's marking is timed.
fn new_dir_window(inside: &Inside, host_root: &OwnedFd, dir: &str) -> Result<Duration> {
    let dir_c = CString::new(dir)?;
    let file = CString::new(format!("{dir}/file"))?;
    let host_file = CString::new(format!("{}/file", dir.trim_start_matches('/')))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Duration> {
            inside.enter()?;
            let t = Instant::now();
            // SAFETY: C strings and a directory descriptor we hold.
            unsafe {
                check(libc::mkdir(dir_c.as_ptr(), 0o755)).context("mkdir")?;
                let fd = libc::openat(
                    host_root.as_raw_fd(),
                    host_file.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                check(fd).context("creating the file")?;
                libc::close(fd);
            }
            loop {
                if open_close(&file)? {
                    return Ok(t.elapsed());
                }
                if t.elapsed() > WINDOW_LIMIT {
                    bail!("still allowed after {WINDOW_LIMIT:?}");
                }
                std::thread::yield_now();
            }
        })
        .join()
        .unwrap_or_else(|_| bail!("an opener panicked"))
    })
}

/// Pins thread `tid` (0: the calling thread) to `cpu`, or lets it run anywhere again
/// (`None`): on two cores, where the scheduler puts listener and opener decides a round
/// trip's latency as much as the listener does.
pub(crate) fn pin(tid: i32, cpu: Option<usize>) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let all = std::thread::available_parallelism().map_or(1, usize::from);
    for c in cpu.map_or(0..all, |c| c..c + 1) {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: a valid set of the size we pass.
    check(unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) })
        .with_context(|| format!("pinning thread {tid} to CPU {cpu:?}"))
}

/// The threads of process `pid` named `name` (their `comm`), once one has named itself (a
/// new thread sets its own name as it starts).
pub(crate) fn threads_named(pid: &str, name: &str) -> Result<Vec<i32>> {
    crate::wait::until(
        &format!("a thread {name:?} in process {pid}"),
        Duration::from_secs(5),
        || {
            let tids: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
                .ok()?
                .flatten()
                .filter(|e| {
                    fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
                })
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            (!tids.is_empty()).then_some(tids)
        },
    )
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    open_fd(
        path.to_str().context("a UTF-8 path")?,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    )
}

/// A tmpfs of our own for the roots: marks that other processes hold on the shared
/// filesystem under the work directory would otherwise tax every open we time.
pub(crate) struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub(crate) fn mount(dir: PathBuf) -> Result<Scratch> {
        fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let c = CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: C strings for source, target and type; no data.
        check(unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"mode=0755".as_ptr().cast(),
            )
        })
        .with_context(|| format!("mounting a tmpfs on {}", dir.display()))?;
        Ok(Scratch { dir })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: a C string path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

impl Report {
    /// The median over rounds of one latency figure (`p99` picks the 99th percentile).
    fn latency(&self, setup: Setup, case: Case, p99: bool) -> Option<f64> {
        let v: Vec<f64> = self.figures[index_of(setup)]
            .iter()
            .filter_map(|f| lookup_latency(f, case).map(|(m, p)| if p99 { p } else { m }))
            .collect();
        (!v.is_empty()).then(|| median(v))
    }

    fn rate(&self, setup: Setup, threads: usize) -> Option<f64> {
        let v: Vec<f64> = self.figures[index_of(setup)]
            .iter()
            .filter_map(|f| lookup_rate(f, threads))
            .collect();
        (!v.is_empty()).then(|| median(v))
    }

    /// The median over rounds of a per-round ratio `a / b`.
    fn ratio(
        &self,
        per_round: impl Fn(&RoundFigures, &RoundFigures) -> Option<f64>,
        a: Setup,
        b: Setup,
    ) -> f64 {
        median(
            self.figures[index_of(a)]
                .iter()
                .zip(&self.figures[index_of(b)])
                .filter_map(|(fa, fb)| per_round(fa, fb))
                .collect(),
        )
    }

    /// Whether the agent met every target.
    pub fn all_pass(&self) -> bool {
        self.targets().iter().all(|t| t.pass)
    }

    fn targets(&self) -> Vec<TargetRow> {
        let mut rows = Vec::new();
        for &threads in &self.threads {
            let pct = 100.0
                * self.ratio(
                    |a, f| Some(lookup_rate(a, threads)? / lookup_rate(f, threads)?),
                    Setup::Agent,
                    Setup::Floor,
                );
            rows.push(TargetRow {
                what: format!("agent decisions/s vs floor, {threads} openers"),
                value: format!("{pct:.1}%"),
                target: "≥ 90%",
                pass: pct >= 90.0,
            });
        }
        // Each setup's unguarded median is first divided by the control's from the same
        // moments: the machine's state drifts between setups by more than 5%.
        let over = 100.0
            * (self.ratio(
                |a, n| Some(a.unguarded_vs_control? / n.unguarded_vs_control?),
                Setup::Agent,
                Setup::None,
            ) - 1.0);
        rows.push(TargetRow {
            what: "unguarded open+close, agent vs no agent".into(),
            value: format!("{over:+.1}%"),
            target: "≤ +5%",
            pass: over <= 5.0,
        });
        // Judged only where measured (`--window-runs 0` asks for none).
        if let Some(max) = self.windows.iter().max().copied() {
            rows.push(TargetRow {
                what: format!("new-directory window (max of {})", self.windows.len()),
                value: format!("{} µs", max.as_micros()),
                target: "≤ 1 s",
                pass: max <= WINDOW_TARGET,
            });
        }
        rows
    }

    /// The table, one row per figure.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "janus-bench: {} rounds, {} timed opens per file and setup per round; \
             figures are medians over rounds",
            self.rounds, self.iterations
        );
        let _ = writeln!(
            out,
            "{:<42} {:<16} {:<9} {:<9} {:>12} {:>12}",
            "measurement", "file", "setup", "backend", "median", "p99 / max"
        );
        let backend_of = |setup: Setup| match setup {
            Setup::None => "-".to_owned(),
            Setup::Floor => "fanotify".to_owned(),
            Setup::Agent => self.backend.clone(),
        };
        for case in Case::ALL {
            for setup in Setup::ALL {
                let (Some(m), Some(p)) = (
                    self.latency(setup, case, false),
                    self.latency(setup, case, true),
                ) else {
                    continue;
                };
                let what = if case.denied_under(setup) {
                    "open+close ns (refused)"
                } else {
                    "open+close ns"
                };
                let _ = writeln!(
                    out,
                    "{:<42} {:<16} {:<9} {:<9} {:>12.0} {:>12.0}",
                    what,
                    case.name(),
                    setup.name(),
                    backend_of(setup),
                    m,
                    p
                );
            }
        }
        for &threads in &self.threads {
            for setup in [Setup::Floor, Setup::Agent] {
                if let Some(r) = self.rate(setup, threads) {
                    let _ = writeln!(
                        out,
                        "{:<42} {:<16} {:<9} {:<9} {:>12.0} {:>12}",
                        format!("decisions/s, {threads} openers"),
                        Case::Allowed.name(),
                        setup.name(),
                        backend_of(setup),
                        r,
                        "-"
                    );
                }
            }
        }
        for setup in [Setup::Floor, Setup::Agent] {
            let v: Vec<f64> = self.figures[index_of(setup)]
                .iter()
                .filter_map(|f| f.cpu_per_decision)
                .collect();
            if !v.is_empty() {
                let _ = writeln!(
                    out,
                    "{:<42} {:<16} {:<9} {:<9} {:>12.0} {:>12}",
                    "listener CPU ns per decision",
                    "guarded",
                    setup.name(),
                    backend_of(setup),
                    median(v),
                    "-"
                );
            }
        }
        let mut w = self.windows.clone();
        w.sort_unstable();
        if let (Some(max), false) = (w.last(), w.is_empty()) {
            let med = w[w.len() / 2];
            let _ = writeln!(
                out,
                "{:<42} {:<16} {:<9} {:<9} {:>12} {:>12}",
                format!("new-directory window µs ({} runs)", w.len()),
                "/data/new-*/file",
                "agent",
                self.backend,
                med.as_micros(),
                max.as_micros()
            );
        }
        for t in self.targets() {
            let _ = writeln!(
                out,
                "{:<42} {:<16} {:<9} {:<9} {:>12} {:>12}",
                t.what,
                format!("target {}", t.target),
                "agent",
                self.backend,
                t.value,
                if t.pass { "PASS" } else { "MISS" }
            );
        }
        out
    }
}

struct TargetRow {
    what: String,
    value: String,
    target: &'static str,
    pass: bool,
}

fn lookup_rate(f: &RoundFigures, threads: usize) -> Option<f64> {
    f.rate.iter().find(|(t, _)| *t == threads).map(|r| r.1)
}

/// (median, p99) of one round.
fn lookup_latency(f: &RoundFigures, case: Case) -> Option<(f64, f64)> {
    f.latency
        .iter()
        .find(|(c, _, _)| *c == case)
        .map(|&(_, m, p)| (m, p))
}
