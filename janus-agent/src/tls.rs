//! Mutual TLS for the agent's API (rustls through tonic). The agent serves with its
//! certificate and key, requires a client certificate that `--tls-ca` signed, and takes calls
//! only from the controller's identity: a DNS name in the client certificate's subject
//! alternative names (`--tls-client-name`). Any other certificate of the same CA, an agent's
//! among them, is refused, so one node's key does not command the other nodes' agents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The controller's identity the shipped manifests give it.
pub const CONTROLLER_NAME: &str = "janus-controller.janus.svc";

#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// CA that signed the controller's client certificate (PEM). Required with TLS.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The agent's certificate (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The agent's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The only client identity accepted: a DNS name the client certificate must carry.
    #[arg(long, default_value = CONTROLLER_NAME)]
    pub tls_client_name: String,
    /// Serve without TLS: anyone who reaches the port can lift guards. For local
    /// development only; no shipped manifest uses it.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure_plaintext: bool,
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// The server's TLS settings and who may call; None when plaintext was asked for explicitly.
pub fn server_config(args: &TlsArgs) -> anyhow::Result<Option<(ServerTlsConfig, ClientName)>> {
    if args.insecure_plaintext {
        tracing::warn!("serving the API without TLS (--insecure-plaintext): anyone who reaches the port can lift guards");
        return Ok(None);
    }
    let (Some(ca), Some(cert), Some(key)) = (&args.tls_ca, &args.tls_cert, &args.tls_key) else {
        bail!(
            "--tls-ca, --tls-cert and --tls-key are required: without a CA to check the \
             controller's certificate against, anyone could command the agent \
             (--insecure-plaintext serves without TLS, for local development only)"
        );
    };
    if args.tls_client_name.is_empty() {
        bail!("--tls-client-name: must not be empty");
    }
    let identity = Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    let config = ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(Certificate::from_pem(read(ca, "CA")?));
    Ok(Some((
        config,
        ClientName(args.tls_client_name.as_str().into()),
    )))
}

/// The client identity the API accepts.
#[derive(Debug, Clone)]
pub struct ClientName(Arc<str>);

/// Why a caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no client certificate")]
    NoCertificate,
    #[error("the client certificate cannot be read: {0}")]
    Unreadable(String),
    #[error("the client certificate names {names:?}, not {wanted:?}")]
    WrongIdentity { names: Vec<String>, wanted: String },
}

impl Refusal {
    /// The `reason` label of `janus_api_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::Unreadable(_) => "unreadable_certificate",
            Refusal::WrongIdentity { .. } => "wrong_identity",
        }
    }
}

impl ClientName {
    /// Whether the leaf of the peer's chain (already verified against the CA by rustls)
    /// carries the accepted name.
    pub fn check(
        &self,
        chain: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<(), Refusal> {
        let leaf = chain
            .and_then(|c| c.first())
            .ok_or(Refusal::NoCertificate)?;
        let names = dns_names(leaf.as_ref())?;
        if names.iter().any(|n| n.eq_ignore_ascii_case(&self.0)) {
            Ok(())
        } else {
            Err(Refusal::WrongIdentity {
                names,
                wanted: self.0.to_string(),
            })
        }
    }
}

fn dns_names(der: &[u8]) -> Result<Vec<String>, Refusal> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| Refusal::Unreadable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Refusal::Unreadable(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}
