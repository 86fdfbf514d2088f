use clap::{Parser, Subcommand};
use janus_api::diagnostics::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "janus-agent",
    version,
    about = "Janus node agent: guards file access in containers"
)]
struct Cli {
    /// Diagnostics on stderr as text or JSON. Decision lines on stdout follow each guard's logFormat.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce the guards in a file on the given processes until SIGINT or SIGTERM.
    Guard(janus_agent::standalone::GuardArgs),
    /// Serve the gRPC API (janus.agent.v1) through which the controller places guards on
    /// this node's pods.
    Serve(Box<janus_agent::serve::ServeArgs>),
    /// The start gate, as an OCI runtime hook (createRuntime): reads the container's state on
    /// stdin and exits 0 once the node's agent guards the container (docs/operations.md).
    Hook(janus_agent::hook::HookArgs),
    /// Copies this binary where the runtime's hook configuration names it (the DaemonSet's
    /// init container does, on every node).
    InstallHook(janus_agent::hook::InstallArgs),
}

/// Every permission event being answered holds a descriptor, and so does every directory
/// under a guarded one: take the hard descriptor limit, as any process may.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // The runtime waits on the hook: no threads, no diagnostics set-up.
        Command::Hook(args) => janus_agent::hook::run(args),
        Command::InstallHook(args) => janus_agent::hook::install(args),
        Command::Guard(args) => on_runtime(cli.log_format, || janus_agent::standalone::run(args)),
        // Before any thread starts: setns changes the calling thread only.
        Command::Serve(args) => janus_agent::pods::join_host_cgroup_namespace()
            .map_err(anyhow::Error::from)
            .and_then(|()| on_runtime(cli.log_format, || janus_agent::serve::run(*args))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("janus-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a long-lived command on an async runtime, with diagnostics on stderr.
fn on_runtime<F: std::future::Future<Output = anyhow::Result<()>>>(
    log_format: LogFormat,
    command: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    raise_nofile_limit();
    diagnostics::init(log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("building the runtime");
    runtime.block_on(command())
}
