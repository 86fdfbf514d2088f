use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "janus-controller",
    version,
    about = "Janus controller: pushes JanusGuards to the node agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(janus_controller::run(args))
        }
    }
}
