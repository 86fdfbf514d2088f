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
    Serve(janus_agent::serve::ServeArgs),
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
    raise_nofile_limit();
    diagnostics::init(cli.log_format);
    if matches!(cli.command, Command::Serve(_)) {
        // Before any thread starts: setns changes the calling thread only.
        if let Err(e) = janus_agent::pods::join_host_cgroup_namespace() {
            eprintln!("janus-agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("building the runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Guard(args) => janus_agent::standalone::run(args).await,
            Command::Serve(args) => janus_agent::serve::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("janus-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
