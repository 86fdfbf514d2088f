//! The node-scale benchmark: `janus-scale-bench --agent PATH [--containers N] [--rounds N]
//! [--iterations N] [--seconds S] [--workdir DIR] [--backend fanotify|bpf] [--log-format F]`.
//! Prints one table; exits 1 when the agent misses a target, 2 on bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use janus_tests::scale::{self, Options};

const USAGE: &str = "usage: janus-scale-bench --agent PATH [--containers N] [--rounds N] \
    [--iterations N] [--seconds S] [--workdir DIR] [--backend fanotify|bpf] [--log-format F]";

fn parse() -> Result<Options> {
    let mut o = Options {
        agent: PathBuf::new(),
        containers: 1000,
        rounds: 3,
        iterations: 5000,
        duration: Duration::from_millis(500),
        workdir: std::env::temp_dir(),
        backend: "fanotify".into(),
        log_format: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--agent" => o.agent = PathBuf::from(value()?),
            "--containers" => o.containers = value()?.parse().context("--containers")?,
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--iterations" => o.iterations = value()?.parse().context("--iterations")?,
            "--seconds" => {
                o.duration = Duration::from_secs_f64(value()?.parse().context("--seconds")?)
            }
            "--workdir" => o.workdir = PathBuf::from(value()?),
            "--backend" => o.backend = value()?,
            "--log-format" => o.log_format = Some(value()?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.agent.as_os_str().is_empty() {
        bail!("--agent is required");
    }
    if o.backend != "fanotify" && o.backend != "bpf" {
        bail!("--backend is fanotify or bpf");
    }
    if o.rounds == 0 || o.iterations == 0 {
        bail!("--rounds and --iterations must be positive");
    }
    Ok(o)
}

/// The benchmark holds a few descriptors per container (its namespaces and root): more than
/// a default soft limit of 1,024 allows at 1,000 containers. Root may raise both limits.
fn raise_nofile_limit() {
    let limit = libc::rlimit {
        rlim_cur: 1 << 16,
        rlim_max: 1 << 16,
    };
    // SAFETY: setrlimit with a valid struct; on failure the default stays.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        eprintln!(
            "janus-scale-bench: raising RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() -> ExitCode {
    raise_nofile_limit();
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("janus-scale-bench: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match scale::run(&opts) {
        Ok(report) => {
            print!("{}", report.render());
            if report.all_pass() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("janus-scale-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
