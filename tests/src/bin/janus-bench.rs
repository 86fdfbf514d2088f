//! The benchmark: `janus-bench --agent PATH [--backend auto|bpf|fanotify] [--iterations N]
//! [--rounds N] [--seconds S] [--threads 2,4] [--window-runs N] [--workdir DIR]`. Prints one
//! table; exits 1 when the agent misses a target, 2 on bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use janus_tests::bench::{self, Options};

const USAGE: &str = "usage: janus-bench --agent PATH [--backend auto|bpf|fanotify] \
    [--iterations N] [--rounds N] [--seconds S] [--threads 2,4] [--window-runs N] [--workdir DIR]";

fn parse() -> Result<Options> {
    let mut o = Options {
        agent: PathBuf::new(),
        backend: None,
        iterations: 20_000,
        rounds: 5,
        duration: Duration::from_millis(500),
        threads: vec![2, 4],
        window_runs: 4,
        workdir: std::env::temp_dir(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--agent" => o.agent = PathBuf::from(value()?),
            "--backend" => o.backend = Some(value()?),
            "--iterations" => o.iterations = value()?.parse().context("--iterations")?,
            "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
            "--seconds" => {
                o.duration = Duration::from_secs_f64(value()?.parse().context("--seconds")?)
            }
            "--threads" => {
                o.threads = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--threads")?
            }
            "--window-runs" => o.window_runs = value()?.parse().context("--window-runs")?,
            "--workdir" => o.workdir = PathBuf::from(value()?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.agent.as_os_str().is_empty() {
        bail!("--agent is required");
    }
    if o.iterations == 0 || o.rounds == 0 || o.threads.contains(&0) {
        bail!("--iterations, --rounds and --threads must be positive");
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("janus-bench: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench::run(&opts) {
        Ok(report) => {
            print!("{}", report.render());
            if report.all_pass() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("janus-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
