//! Reaching the agents: each node's agent is found through the headless Service's
//! EndpointSlices (an endpoint's `nodeName` and the port named `grpc`), and called over gRPC
//! with the controller's client certificate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use janus_api::agent_v1::agent_client::AgentClient;
use janus_api::agent_v1::{
    apply_result, ApplyGuardRequest, ApplyGuardsRequest, GuardKey, GuardStatus, ItemError,
    ListGuardsRequest, RemoveGuardsRequest,
};
use janus_api::holding::{MAX_BATCH, MAX_BATCH_BYTES};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The name of the port the agent's Service gives its gRPC API.
pub const GRPC_PORT_NAME: &str = "grpc";

/// Node name -> the agent's address (`host:port`), from the Service's EndpointSlices.
/// Terminating endpoints are left out; an agent that is not ready yet is still called, since
/// it becomes ready only once it enforces what it was given.
pub fn discover<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for slice in slices {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(GRPC_PORT_NAME))
            .and_then(|p| p.port)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            let terminating = ep
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            let (Some(node), Some(addr), false) =
                (&ep.node_name, ep.addresses.first(), terminating)
            else {
                continue;
            };
            let host = if addr.contains(':') {
                format!("[{addr}]")
            } else {
                addr.clone()
            };
            out.insert(node.clone(), format!("{host}:{port}"));
        }
    }
    out
}

#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Make the mutual TLS material on first start and keep it in Secrets of the agents'
    /// namespace (`janus-ca`, `janus-agent-tls`); see `pki`.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key", "insecure_plaintext"])]
    pub tls_auto: bool,
    /// CA that signed the agents' certificates.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The controller's client certificate (PEM): clientAuth, with the name the agents
    /// accept (`janus-controller.janus.svc` by default).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The controller's client key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The name the agents' certificates carry (they are reached by IP address).
    #[arg(long, default_value = "janus-agent.janus.svc")]
    pub tls_server_name: String,
    /// Call the agents without TLS. For local development only.
    #[arg(long, conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure_plaintext: bool,
}

/// How the controller reaches the agents.
pub enum TlsMode {
    /// The operator's files.
    Files(ClientTlsConfig),
    /// Material the controller makes and keeps in Secrets.
    Auto,
    Plaintext,
}

impl TlsArgs {
    pub fn mode(&self) -> anyhow::Result<TlsMode> {
        if self.insecure_plaintext {
            tracing::warn!("calling the agents without TLS (--insecure-plaintext)");
            return Ok(TlsMode::Plaintext);
        }
        if self.tls_auto {
            return Ok(TlsMode::Auto);
        }
        let (Some(ca), Some(cert), Some(key)) = (&self.tls_ca, &self.tls_cert, &self.tls_key)
        else {
            anyhow::bail!(
                "--tls-auto, or --tls-ca, --tls-cert and --tls-key, are required \
                 (--insecure-plaintext for local development only)"
            );
        };
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(TlsMode::Files(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(ca)?))
                .identity(Identity::from_pem(read(cert)?, read(key)?))
                .domain_name(self.tls_server_name.clone()),
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent {addr} unreachable: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("agent {addr}: {}", .status.message())]
    Call { addr: String, status: tonic::Status },
    #[error("agent {addr} answered out of protocol: {what}")]
    Answer { addr: String, what: String },
}

impl AgentError {
    /// True when the agent was not reached at all, as opposed to refusing a request.
    pub fn unreachable(&self) -> bool {
        match self {
            AgentError::Connect { .. } => true,
            AgentError::Answer { .. } => false,
            AgentError::Call { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
        }
    }
}

/// gRPC clients of the agents, one channel per address, reused across reconciliations.
pub struct AgentPool {
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
    channels: Mutex<BTreeMap<String, Channel>>,
}

impl AgentPool {
    pub fn new(tls: Option<ClientTlsConfig>, timeout: Duration) -> AgentPool {
        AgentPool {
            tls,
            timeout,
            channels: Mutex::new(BTreeMap::new()),
        }
    }

    async fn client(&self, addr: &str) -> Result<AgentClient<Channel>, AgentError> {
        if let Some(ch) = self.channels.lock().expect("channels lock").get(addr) {
            return Ok(AgentClient::new(ch.clone()));
        }
        let connect = |source| AgentError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(connect)?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if let Some(tls) = &self.tls {
            ep = ep.tls_config(tls.clone()).map_err(connect)?;
        }
        let ch = ep.connect().await.map_err(connect)?;
        self.channels
            .lock()
            .expect("channels lock")
            .insert(addr.to_owned(), ch.clone());
        Ok(AgentClient::new(ch))
    }

    /// Forgets a channel after a failure so the next call reconnects (the agent may have
    /// restarted with a new address or certificate).
    fn forget(&self, addr: &str, e: &AgentError) {
        if e.unreachable() {
            self.channels.lock().expect("channels lock").remove(addr);
        }
    }

    async fn call<T, F, Fut>(&self, addr: &str, f: F) -> Result<T, AgentError>
    where
        F: FnOnce(AgentClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let result = match self.client(addr).await {
            Ok(c) => f(c)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|status| AgentError::Call {
                    addr: addr.to_owned(),
                    status,
                }),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            self.forget(addr, e);
        }
        result
    }

    pub async fn list(&self, addr: &str) -> Result<Vec<GuardStatus>, AgentError> {
        self.call(addr, |mut c| async move {
            c.list_guards(ListGuardsRequest {}).await
        })
        .await
        .map(|r| r.guards)
    }

    /// Applies `reqs` on one agent in as few ApplyGuards calls as fit its limits; one
    /// result per request, in order: the status, or why the agent refused that item.
    pub async fn apply_many(
        &self,
        addr: &str,
        reqs: Vec<ApplyGuardRequest>,
    ) -> Result<Vec<Result<GuardStatus, ItemError>>, AgentError> {
        let mut out = Vec::with_capacity(reqs.len());
        for items in batches(reqs) {
            let sent = items.len();
            let results = self
                .call(addr, |mut c| async move {
                    c.apply_guards(ApplyGuardsRequest { items }).await
                })
                .await?
                .results;
            if results.len() != sent {
                return Err(AgentError::Answer {
                    addr: addr.to_owned(),
                    what: format!("{} results for {sent} items", results.len()),
                });
            }
            out.extend(results.into_iter().map(|r| match r.outcome {
                Some(apply_result::Outcome::Status(s)) => Ok(s),
                Some(apply_result::Outcome::Error(e)) => Err(e),
                None => Err(ItemError {
                    code: tonic::Code::Unknown as i32,
                    message: "no outcome".into(),
                }),
            }));
        }
        Ok(out)
    }

    /// Removes `keys` from one agent; whether each was held, in order.
    pub async fn remove_many(
        &self,
        addr: &str,
        keys: Vec<GuardKey>,
    ) -> Result<Vec<bool>, AgentError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BATCH) {
            let keys = chunk.to_vec();
            let removed = self
                .call(addr, |mut c| async move {
                    c.remove_guards(RemoveGuardsRequest { keys }).await
                })
                .await?
                .removed;
            if removed.len() != chunk.len() {
                return Err(AgentError::Answer {
                    addr: addr.to_owned(),
                    what: format!("{} answers for {} keys", removed.len(), chunk.len()),
                });
            }
            out.extend(removed);
        }
        Ok(out)
    }
}

/// Splits requests into ApplyGuards calls of at most MAX_BATCH items that an agent decodes
/// (MAX_BATCH_BYTES, with room for the envelope).
fn batches(reqs: Vec<ApplyGuardRequest>) -> Vec<Vec<ApplyGuardRequest>> {
    use prost::Message;
    let budget = MAX_BATCH_BYTES - 64 * 1024;
    let mut out: Vec<Vec<ApplyGuardRequest>> = Vec::new();
    let mut bytes = 0;
    for r in reqs {
        let len = r.encoded_len() + 8;
        match out.last_mut() {
            Some(last) if last.len() < MAX_BATCH && bytes + len <= budget => {
                bytes += len;
                last.push(r);
            }
            _ => {
                bytes = len;
                out.push(vec![r]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(spec_bytes: usize) -> ApplyGuardRequest {
        ApplyGuardRequest {
            spec_json: "x".repeat(spec_bytes),
            ..Default::default()
        }
    }

    #[test]
    fn batches_fit_the_agents_limits() {
        let many: Vec<_> = (0..2500).map(|_| req(10)).collect();
        let sizes: Vec<usize> = batches(many).iter().map(Vec::len).collect();
        assert_eq!(sizes, [1000, 1000, 500]);
        // Specs at their limit: each call stays below what the agent decodes.
        let big: Vec<_> = (0..200).map(|_| req(64 * 1024)).collect();
        let split = batches(big);
        assert!(split.len() > 1);
        assert_eq!(split.iter().map(Vec::len).sum::<usize>(), 200);
        for b in &split {
            let bytes: usize = b.iter().map(|r| prost::Message::encoded_len(r) + 8).sum();
            assert!(bytes < MAX_BATCH_BYTES, "{bytes}");
        }
    }
}
