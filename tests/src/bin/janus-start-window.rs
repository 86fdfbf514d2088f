//! The start-window benchmark: `janus-start-window --agent PATH [--gated-starts N]
//! [--starts N] [--rescan-starts N] [--workdir DIR]`. Prints one table; exits 1 when a start was never
//! refused, 2 on bad arguments. `janus-start-window first-read PATH OUT` is the process
//! each container runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use janus_tests::start_window::{self, Options};

const USAGE: &str = "usage: janus-start-window --agent PATH [--gated-starts N] [--starts N] \
    [--rescan-starts N] [--workdir DIR]";

fn parse(mut args: impl Iterator<Item = String>) -> Result<Options> {
    let mut o = Options {
        agent: PathBuf::new(),
        starts: 100,
        rescan_starts: 20,
        gated_starts: 100,
        workdir: std::env::temp_dir(),
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--agent" => o.agent = PathBuf::from(value()?),
            "--starts" => o.starts = value()?.parse().context("--starts")?,
            "--rescan-starts" => o.rescan_starts = value()?.parse().context("--rescan-starts")?,
            "--gated-starts" => o.gated_starts = value()?.parse().context("--gated-starts")?,
            "--workdir" => o.workdir = PathBuf::from(value()?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.agent.as_os_str().is_empty() {
        bail!("--agent is required");
    }
    Ok(o)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("first-read") {
        let paths: Vec<String> = args.skip(1).collect();
        let [path, out] = &paths[..] else {
            eprintln!("usage: janus-start-window first-read PATH OUT");
            return ExitCode::from(2);
        };
        return match start_window::first_read(path.as_ref(), out.as_ref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("first-read: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("janus-start-window: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match start_window::run(&opts) {
        Ok(report) => {
            print!("{}", report.render());
            let never = report
                .rows
                .iter()
                .flat_map(|r| &r.windows)
                .any(Option::is_none);
            if never {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("janus-start-window: {e:#}");
            ExitCode::FAILURE
        }
    }
}
