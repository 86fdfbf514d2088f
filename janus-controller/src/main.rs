use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "janus-controller",
    version,
    about = "Janus controller: pushes JanusGuards to the node agents"
)]
struct Cli {
    /// Diagnostics on stderr as text or JSON (for log pipelines that parse them).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the JanusGuard CustomResourceDefinition (YAML).
    Crd,
    /// Run the controller.
    Run(janus_controller::RunArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", janus_controller::crd::crd_yaml());
            Ok(())
        }
        Command::Run(args) => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr);
            match cli.log_format {
                LogFormat::Text => builder.init(),
                LogFormat::Json => builder.json().init(),
            }
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(janus_controller::run(args))
        }
    }
}
