//! Runs the scenario table against a backend: `janus-scenarios --agent PATH [--backend B]
//! [--workdir DIR]`. Prints one line per scenario and a summary; exits 1 if any failed.

use std::path::PathBuf;
use std::process::ExitCode;

use janus_tests::scenarios::Runner;

fn main() -> ExitCode {
    let mut agent = None;
    let mut backend = None;
    let mut workdir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--backend" => backend = args.next(),
            "--workdir" => workdir = args.next().map(PathBuf::from).unwrap_or(workdir),
            other => {
                eprintln!("janus-scenarios: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(agent) = agent else {
        eprintln!(
            "usage: janus-scenarios --agent PATH [--backend auto|bpf|fanotify] [--workdir DIR]"
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
        workdir: &workdir,
    };
    let results = runner.run_all();
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    for (name, r) in &results {
        match r {
            Ok(()) => println!("scenario {name}: ok"),
            Err(e) => println!("scenario {name}: FAILED: {e:#}"),
        }
    }
    println!(
        "scenarios: {} passed, {failed} failed",
        results.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
