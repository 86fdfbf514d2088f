//! Diagnostics on stderr, as text or JSON, for both binaries: decision lines go to stdout
//! in each guard's `logFormat`, everything else goes through `tracing` here.

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per event, for log pipelines that parse them.
    Json,
}

/// Sends `tracing` events to stderr in `format`, at the level `RUST_LOG` sets (default
/// `info`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
