//! Reaching the agents: each node's agent is found through the headless Service's
//! EndpointSlices (an endpoint's `nodeName` and the port named `grpc`), and called over gRPC
//! with the controller's client certificate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use janus_api::agent_v1::agent_client::AgentClient;
use janus_api::agent_v1::{
    apply_result, ApplyGuardRequest, ApplyGuardsRequest, GuardStatus, ItemError, ListGuardsRequest,
    Removal, RemoveGuardRequest, RemoveGuardsRequest, SetPodsRequest,
};
use janus_api::holding::MAX_BATCH_BYTES;
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
            AgentError::Call { status, .. } => unreachable(status),
        }
    }

    /// An agent of an earlier release, without the call.
    fn unimplemented(&self) -> bool {
        matches!(self, AgentError::Call { status, .. } if status.code() == tonic::Code::Unimplemented)
    }
}

fn unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

/// gRPC clients of the agents, one channel per address, reused across reconciliations.
pub struct AgentPool {
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
    channels: Mutex<BTreeMap<String, Channel>>,
}

/// An agent's answer to a listing.
#[derive(Debug)]
pub enum Listing {
    /// What it holds is what the caller's digest says.
    Unchanged,
    Full {
        guards: Vec<GuardStatus>,
        digest: Option<String>,
    },
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
        let known = self
            .channels
            .lock()
            .expect("channels lock")
            .get(addr)
            .cloned();
        let ch = match known {
            Some(ch) => ch,
            None => self.connect(addr).await?,
        };
        Ok(AgentClient::new(ch).max_decoding_message_size(MAX_ANSWER_BYTES))
    }

    async fn connect(&self, addr: &str) -> Result<Channel, AgentError> {
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
        Ok(ch)
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

    /// Tells the agent its node's bound pods and their guards.
    pub async fn set_pods(&self, addr: &str, word: SetPodsRequest) -> Result<(), AgentError> {
        self.call(addr, |mut c| async move { c.set_pods(word).await })
            .await
            .map(drop)
    }

    /// What the agent holds, or [`Listing::Unchanged`] when that is still what has the
    /// digest `known`.
    pub async fn list(&self, addr: &str, known: Option<&str>) -> Result<Listing, AgentError> {
        let unless_digest = known.unwrap_or_default().to_owned();
        let r = self
            .call(addr, |mut c| async move {
                c.list_guards(ListGuardsRequest { unless_digest }).await
            })
            .await?;
        Ok(if r.unchanged && known == Some(r.digest.as_str()) {
            Listing::Unchanged
        } else {
            Listing::Full {
                guards: r.guards,
                // An agent of an earlier release sends none: it is listed whole each time.
                digest: Some(r.digest).filter(|d| !d.is_empty()),
            }
        })
    }

    /// Applies `reqs` on one agent in as few ApplyGuards calls as fit the limits; one
    /// outcome per request, in order. A call that fails fails its own items only; an agent
    /// of an earlier release (no ApplyGuards) is sent one ApplyGuard per request.
    pub async fn apply_many(&self, addr: &str, reqs: Vec<ApplyGuardRequest>) -> Vec<ItemResult> {
        let mut out = Vec::with_capacity(reqs.len());
        for items in batches(reqs) {
            let sent = items.len();
            let singles = items.clone();
            let answer = self
                .call(addr, |mut c| async move {
                    c.apply_guards(ApplyGuardsRequest { items }).await
                })
                .await;
            match answer {
                Ok(r) if r.results.len() == sent => {
                    out.extend(r.results.into_iter().map(|r| match r.outcome {
                        Some(apply_result::Outcome::Status(s)) => Ok(s),
                        Some(apply_result::Outcome::Error(e)) => Err(ItemFailure::Refused(e)),
                        None => Err(ItemFailure::Refused(ItemError {
                            code: tonic::Code::Unknown as i32,
                            message: "no outcome".into(),
                        })),
                    }));
                }
                Ok(r) => {
                    let e = Arc::new(AgentError::Answer {
                        addr: addr.to_owned(),
                        what: format!("{} results for {sent} items", r.results.len()),
                    });
                    out.extend((0..sent).map(|_| Err(ItemFailure::Call(e.clone()))));
                }
                Err(e) if e.unimplemented() => {
                    for req in singles {
                        let one = self
                            .call(addr, |mut c| async move { c.apply_guard(req).await })
                            .await;
                        out.push(match one {
                            Ok(r) => Ok(r.status.unwrap_or_default()),
                            Err(AgentError::Call { status, .. }) if !unreachable(&status) => {
                                Err(ItemFailure::Refused(ItemError {
                                    code: status.code() as i32,
                                    message: status.message().to_owned(),
                                }))
                            }
                            Err(e) => Err(ItemFailure::Call(Arc::new(e))),
                        });
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    out.extend((0..sent).map(|_| Err(ItemFailure::Call(e.clone()))));
                }
            }
        }
        out
    }

    /// Removes `items` (key, guard UID) from one agent; whether each was held, in order.
    pub async fn remove_many(
        &self,
        addr: &str,
        items: Vec<Removal>,
    ) -> Result<Vec<bool>, AgentError> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH) {
            let items = chunk.to_vec();
            let answer = self
                .call(addr, |mut c| async move {
                    c.remove_guards(RemoveGuardsRequest { items }).await
                })
                .await;
            let removed = match answer {
                Ok(r) => r.removed,
                // An agent of an earlier release: one RemoveGuard each, without the UID.
                Err(e) if e.unimplemented() => {
                    let mut removed = Vec::with_capacity(chunk.len());
                    for r in chunk {
                        let req = RemoveGuardRequest { key: r.key.clone() };
                        let one = self
                            .call(addr, |mut c| async move { c.remove_guard(req).await })
                            .await?;
                        removed.push(one.removed);
                    }
                    removed
                }
                Err(e) => return Err(e),
            };
            if removed.len() != chunk.len() {
                return Err(AgentError::Answer {
                    addr: addr.to_owned(),
                    what: format!("{} answers for {} items", removed.len(), chunk.len()),
                });
            }
            out.extend(removed);
        }
        Ok(out)
    }
}

/// What became of one request of a batch.
pub type ItemResult = Result<GuardStatus, ItemFailure>;

#[derive(Debug, Clone)]
pub enum ItemFailure {
    /// The agent refused this item, as ApplyGuard would have.
    Refused(ItemError),
    /// The call that carried it failed, for every item it carried.
    Call(Arc<AgentError>),
}

/// Items per call the controller sends: well below MAX_BATCH, so that a call (one /proc
/// reading and the marks of each item) ends within the call timeout on a busy node.
const BATCH: usize = 250;
const _: () = assert!(BATCH <= janus_api::holding::MAX_BATCH);
/// Containers per call: each is a line of the answer, which must fit what the controller
/// decodes (MAX_ANSWER_BYTES).
const BATCH_CONTAINERS: usize = 8_000;
/// The largest answer the controller decodes: a batch's statuses with their containers.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Splits requests into ApplyGuards calls an agent decodes (MAX_BATCH_BYTES, with room for
/// the envelope) and whose answers the controller decodes.
fn batches(reqs: Vec<ApplyGuardRequest>) -> Vec<Vec<ApplyGuardRequest>> {
    use prost::Message;
    let budget = MAX_BATCH_BYTES - 64 * 1024;
    let mut out: Vec<Vec<ApplyGuardRequest>> = Vec::new();
    let (mut bytes, mut containers) = (0, 0);
    for r in reqs {
        let len = r.encoded_len() + 8;
        let n = r.pod.as_ref().map_or(0, |p| p.container_ids.len());
        match out.last_mut() {
            Some(last)
                if last.len() < BATCH
                    && bytes + len <= budget
                    && containers + n <= BATCH_CONTAINERS =>
            {
                bytes += len;
                containers += n;
                last.push(r);
            }
            _ => {
                (bytes, containers) = (len, n);
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

    fn pod_of(containers: usize) -> ApplyGuardRequest {
        ApplyGuardRequest {
            pod: Some(janus_api::agent_v1::PodRef {
                container_ids: vec!["containerd://x".into(); containers],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn batches_fit_the_agents_limits() {
        let many: Vec<_> = (0..2500).map(|_| req(10)).collect();
        let sizes: Vec<usize> = batches(many).iter().map(Vec::len).collect();
        assert_eq!(sizes, [250; 10]);
        // Specs at their limit: each call stays below what the agent decodes.
        let big: Vec<_> = (0..200).map(|_| req(64 * 1024)).collect();
        let split = batches(big);
        assert!(split.len() > 1);
        assert_eq!(split.iter().map(Vec::len).sum::<usize>(), 200);
        for b in &split {
            let bytes: usize = b.iter().map(|r| prost::Message::encoded_len(r) + 8).sum();
            assert!(bytes < MAX_BATCH_BYTES, "{bytes}");
        }
        // Pods of 128 containers: the answers stay below what the controller decodes.
        let wide: Vec<_> = (0..200).map(|_| pod_of(128)).collect();
        let sizes: Vec<usize> = batches(wide).iter().map(Vec::len).collect();
        assert_eq!(sizes, [62, 62, 62, 14]);
    }
}
