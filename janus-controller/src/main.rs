use clap::{Parser, Subcommand};
use janus_api::diagnostics::{self, LogFormat};

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

#[derive(Subcommand)]
enum Command {
    /// Print the JanusGuard CustomResourceDefinition (YAML).
    Crd,
    /// Run the controller.
    Run(Box<janus_controller::RunArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", janus_controller::crd::crd_yaml());
            Ok(())
        }
        Command::Run(args) => {
            diagnostics::init(cli.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(janus_controller::run(*args))
        }
    }
}
