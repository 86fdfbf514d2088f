//! Mutual TLS for the agent's API (rustls through tonic): the agent serves with its
//! certificate and key and, given a CA, accepts only clients whose certificate that CA signed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// CA that signed the clients' certificates; clients without one are refused.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The agent's certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Serve without TLS: anyone who reaches the port can lift guards. For tests only.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure_plaintext: bool,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// The server's TLS settings; None when plaintext was asked for explicitly.
pub fn server_config(args: &TlsArgs) -> anyhow::Result<Option<ServerTlsConfig>> {
    if args.insecure_plaintext {
        tracing::warn!("serving the API without TLS (--insecure-plaintext)");
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        bail!(
            "--tls-cert and --tls-key are required (or --insecure-plaintext to serve without TLS)"
        );
    };
    let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    match &args.tls_ca {
        Some(ca) => config = config.client_ca_root(Certificate::from_pem(read(ca, "CA")?)),
        None => tracing::warn!("no --tls-ca: clients are not authenticated"),
    }
    Ok(Some(config))
}
