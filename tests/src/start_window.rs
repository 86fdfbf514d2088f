//! How long a container of a guarded pod runs unguarded when it starts, with the start gate
//! and without: the guard is pushed when the pod is scheduled (before any container exists), then
//! containers start whose first instruction opens the denied file, and keep opening it
//! until refused. The window of a start is the time from its first open to its first
//! refused one (0 when the first is refused).
//!
//! Each container's process is this binary itself ([`first_read`]), copied into the
//! container's root with the shared libraries it needs, so that its times come from the
//! same monotonic clock as ours.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::agent::{free_addr, Serve};
use crate::api::{apply_request, Client};
use crate::containerd::{run_to_end, GatedSpec};
use crate::scenarios::populate;
use crate::target::Root;
use janus_api::agent_v1::{BoundPod, SetPodsRequest};

/// How long a container tries before it reports that it was never refused.
const GIVE_UP: Duration = Duration::from_secs(5);

/// Where the container's process writes what it saw, in its root.
const REPORT: &str = "/tmp/window";

/// The path the guard denies.
const SECRET: &str = "/data/secret";

const DENY_SECRET: &str =
    r#"{"selector":{},"subjects":[{"deny":["/data/secret"],"events":["open"]}]}"#;

pub struct Options {
    pub agent: PathBuf,
    /// Starts measured with the agent's cgroup watch.
    pub starts: usize,
    /// Starts measured with the periodic rescan alone (each waits up to a rescan period).
    pub rescan_starts: usize,
    /// Starts measured behind the start gate (no cgroup watch, no rescan to help).
    pub gated_starts: usize,
    pub workdir: PathBuf,
}

/// One way of learning of a new container, measured.
pub struct Row {
    pub how: &'static str,
    /// Window of each start, in µs; None for a start never refused.
    pub windows: Vec<Option<u64>>,
    /// Opens that succeeded, over every start.
    pub opened: u64,
}

impl Row {
    fn refused(&self) -> Vec<u64> {
        let mut w: Vec<u64> = self.windows.iter().flatten().copied().collect();
        w.sort_unstable();
        w
    }

    /// The `p`th percentile (nearest rank) of the windows of refused starts, in µs.
    fn percentile(&self, p: usize) -> Option<u64> {
        let w = self.refused();
        let rank = (w.len() * p).div_ceil(100).max(1);
        w.get(rank - 1).copied()
    }
}

pub struct Report {
    pub rows: Vec<Row>,
}

impl Report {
    pub fn render(&self) -> String {
        let ms = |v: Option<u64>| v.map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1e3));
        let mut out = String::from(
            "| learns of a new container by | starts | first open refused | never refused | window p50 | p99 | max | opens that succeeded |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let first = r.windows.iter().filter(|w| **w == Some(0)).count();
            let never = r.windows.iter().filter(|w| w.is_none()).count();
            out.push_str(&format!(
                "| {} | {} | {first} | {never} | {} | {} | {} | {} |\n",
                r.how,
                r.windows.len(),
                ms(r.percentile(50)),
                ms(r.percentile(99)),
                ms(r.refused().last().copied()),
                r.opened,
            ));
        }
        out
    }
}

/// The container's side: opens `path` until refused (or [`GIVE_UP`]) and writes to `out`
/// "FIRST REFUSED OPENED": the monotonic time of the first open and of the refused one, in
/// ns (0: never refused), and how many opens succeeded.
pub fn first_read(path: &Path, out: &Path) -> Result<()> {
    let first = now();
    let mut opened = 0u64;
    let refused = loop {
        let at = now();
        match std::fs::File::open(path) {
            Ok(_) => opened += 1,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => break at,
            Err(e) => bail!("opening {}: {e}", path.display()),
        }
        if at - first > GIVE_UP.as_nanos() as u64 {
            break 0;
        }
    };
    std::fs::write(out, format!("{first} {refused} {opened}\n"))?;
    Ok(())
}

/// CLOCK_MONOTONIC in ns: one clock for every process of the machine.
fn now() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

pub fn run(o: &Options) -> Result<Report> {
    let dir = o
        .workdir
        .join(format!("janus-start-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let root = Root::new(&dir, "rootfs")?;
    populate(&root)?;
    let exe = std::env::current_exe()?;
    install(&exe, &root)?;
    let no_cgroups = dir.join("no-cgroups");
    std::fs::create_dir_all(&no_cgroups)?;
    let mut rows = Vec::new();
    for (how, starts, cgroup_root, gated) in [
        (
            "the start gate (createRuntime hook)",
            o.gated_starts,
            no_cgroups.as_path(),
            true,
        ),
        (
            "its cgroup (inotify)",
            o.starts,
            Path::new("/sys/fs/cgroup"),
            false,
        ),
        (
            "the rescan (every 1 s)",
            o.rescan_starts,
            &no_cgroups,
            false,
        ),
    ] {
        if starts == 0 {
            continue;
        }
        let addr = free_addr()?;
        let root_arg = cgroup_root.to_str().context("cgroup root")?;
        let args = [
            "--insecure-plaintext",
            "--backend",
            "fanotify",
            "--cgroup-root",
            root_arg,
        ];
        let _agent = Serve::start(&o.agent, addr, &args, &dir, "agent")?;
        let mut client = Client::connect(addr)?;
        let argv = ["/janus-start-window", "first-read", SECRET, REPORT];
        let mut gate = match gated {
            true => {
                let (socket, _) = Serve::gate(&dir, "agent");
                Some(GatedSpec::new(&dir, &o.agent, &socket, &root, &argv)?)
            }
            false => None,
        };
        let mut row = Row {
            how,
            windows: Vec::new(),
            opened: 0,
        };
        for i in 0..starts {
            let (window, opened) = start(&mut client, &root, gate.as_mut(), i)?;
            row.windows.push(window);
            row.opened += opened;
        }
        rows.push(row);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(Report { rows })
}

/// One pod, pushed before its container starts (through `gate` when given); the
/// container's window and successful opens.
fn start(
    client: &mut Client,
    root: &Root,
    gate: Option<&mut GatedSpec>,
    i: usize,
) -> Result<(Option<u64>, u64)> {
    let me = std::process::id();
    let pod_uid = format!("0000-5555-{me}-{i}");
    let id = format!("janus-window-{me}-{i}");
    client.apply(apply_request(
        "default",
        "window",
        &pod_uid,
        &[],
        DENY_SECRET,
    ))?;
    let report = root.host(REPORT);
    let _ = std::fs::remove_file(&report);
    match gate {
        Some(spec) => {
            // The controller's word on the pod, as it tells the node's agent.
            client.set_pods(SetPodsRequest {
                pods: vec![BoundPod {
                    uid: pod_uid.clone(),
                    namespace: "default".into(),
                    name: format!("window-{i}"),
                    guards: vec!["window".into()],
                    start_on_failure: false,
                }],
                closed_namespaces: Vec::new(),
                node: "node-a".into(),
            })?;
            let (ran, output) = spec.run(&id, &pod_uid)?;
            if !ran {
                bail!("start {i}: the container did not run:\n{output}");
            }
        }
        None => {
            let cgroup = format!("/kubepods/besteffort/pod{pod_uid}/{id}");
            let argv = ["/janus-start-window", "first-read", SECRET, REPORT];
            run_to_end(root, &id, &cgroup, &argv)?;
        }
    }
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("start {i}: the container wrote no {REPORT}"))?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("start {i}: {text:?}"))?;
    let [first, refused, opened] = f[..] else {
        bail!("start {i}: {text:?}");
    };
    let window = (refused != 0).then(|| (refused - first) / 1000);
    Ok((if opened == 0 { Some(0) } else { window }, opened))
}

/// Copies `exe` to `/janus-start-window` in `root`, with the shared libraries `ldd` names
/// at their paths.
fn install(exe: &Path, root: &Root) -> Result<()> {
    std::fs::copy(exe, root.host("/janus-start-window"))?;
    let out = std::process::Command::new("ldd").arg(exe).output()?;
    for lib in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.host(lib);
        std::fs::create_dir_all(dest.parent().context("library path")?)?;
        std::fs::copy(lib, &dest).with_context(|| format!("copying {lib}"))?;
    }
    Ok(())
}
