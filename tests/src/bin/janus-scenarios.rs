//! Runs the scenario table against a backend: `janus-scenarios --agent PATH [--backend B]
//! [--mode enforce|monitor] [--workdir DIR] [--only SCENARIO]`. Prints one line per scenario and a summary; exits 1 if any failed.
//! Each scenario runs in a process group of its own under a deadline, so one that hangs
//! fails alone.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use janus_tests::isolate;
use janus_tests::scenarios::Runner;

/// Far beyond what a scenario takes even under TCG; reached only by a step that hangs.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(600);

fn main() -> ExitCode {
    let mut agent = None;
    let mut backend = None;
    let mut monitor = false;
    let mut workdir = std::env::temp_dir();
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--backend" => backend = args.next(),
            "--mode" => match args.next().as_deref() {
                Some("enforce") => monitor = false,
                Some("monitor") => monitor = true,
                other => {
                    eprintln!("janus-scenarios: --mode takes enforce or monitor, not {other:?}");
                    return ExitCode::from(2);
                }
            },
            "--workdir" => workdir = args.next().map(PathBuf::from).unwrap_or(workdir),
            "--only" => only = args.next(),
            other => {
                eprintln!("janus-scenarios: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(agent) = agent else {
        eprintln!(
            "usage: janus-scenarios --agent PATH [--backend auto|bpf|fanotify] \
             [--mode enforce|monitor] [--workdir DIR] [--only SCENARIO]"
        );
        return ExitCode::from(2);
    };
    let backend_args: Vec<&str> = match &backend {
        Some(b) => vec!["--backend", b.as_str()],
        None => Vec::new(),
    };
    let runner = Runner {
        agent_bin: &agent,
        agent_args: &backend_args,
        bpf: backend.as_deref() == Some("bpf"),
        monitor,
        workdir: &workdir,
    };
    println!(
        "janus-scenarios: backend {}, mode {}",
        backend.as_deref().unwrap_or("auto"),
        if monitor { "monitor" } else { "enforce" }
    );
    let (mut passed, mut failed) = (0, 0);
    // The table, then (enforcing) the decision records' fields in both formats.
    let who_tried = (!monitor).then_some("who-tried");
    let names = runner
        .applicable()
        .map(|s| s.name)
        .chain(who_tried)
        .filter(|n| only.as_deref().is_none_or(|o| o == *n));
    let table: Vec<_> = runner.applicable().collect();
    for name in names {
        let started = Instant::now();
        let outcome = isolate::run(SCENARIO_DEADLINE, || {
            match table.iter().find(|s| s.name == name) {
                Some(s) => runner.run(s),
                None => runner.who_tried(),
            }
        });
        let took = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("scenario {name}: ok ({took:.1} s)");
            }
            Err(e) => {
                failed += 1;
                println!("scenario {name}: FAILED: {e:#} ({took:.1} s)");
            }
        }
    }
    println!("scenarios: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
