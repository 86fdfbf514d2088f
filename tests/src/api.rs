//! Requests to `janus-agent serve`'s gRPC API, as the controller makes them, and a client
//! that makes them from synchronous test code.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use janus_api::agent_v1::agent_client::AgentClient;
use janus_api::agent_v1::{
    ApplyGuardRequest, GuardRef, GuardStatus, ListGuardsRequest, PodRef, SetPodsRequest,
};
use tonic::transport::Channel;

/// Far beyond what a call takes even under TCG; reached only by an agent that hangs.
const CALL_DEADLINE: Duration = Duration::from_secs(120);

/// An ApplyGuard of guard `namespace/name` (generation 1) with `spec_json` for pod `pod_uid`
/// (named `web-1`) and its containers, as the kubelet reports their IDs
/// (`containerd://<id>`).
pub fn apply_request(
    namespace: &str,
    name: &str,
    pod_uid: &str,
    container_ids: &[String],
    spec_json: &str,
) -> ApplyGuardRequest {
    ApplyGuardRequest {
        guard: Some(GuardRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: "guard-uid".into(),
            generation: 1,
        }),
        pod: Some(PodRef {
            uid: pod_uid.into(),
            namespace: namespace.into(),
            name: "web-1".into(),
            container_ids: container_ids.to_vec(),
        }),
        spec_json: spec_json.into(),
        spec_digest: String::new(),
    }
}

/// A plaintext client of the agent at `addr`, each call under a deadline.
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: AgentClient<Channel>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let inner = rt
            .block_on(AgentClient::connect(format!("http://{addr}")))
            .with_context(|| format!("connecting to the agent at {addr}"))?;
        Ok(Client { rt, inner })
    }

    /// Applies `req`; the status the agent answers with.
    pub fn apply(&mut self, req: ApplyGuardRequest) -> Result<GuardStatus> {
        let call = self.inner.apply_guard(req);
        let reply = self
            .rt
            .block_on(async { tokio::time::timeout(CALL_DEADLINE, call).await })
            .context("ApplyGuard timed out")??;
        reply.into_inner().status.context("ApplyGuard: no status")
    }

    /// Tells the agent its node's pods.
    pub fn set_pods(&mut self, req: SetPodsRequest) -> Result<()> {
        let call = self.inner.set_pods(req);
        self.rt
            .block_on(async { tokio::time::timeout(CALL_DEADLINE, call).await })
            .context("SetPods timed out")??;
        Ok(())
    }

    /// Every guard the agent holds.
    pub fn list(&mut self) -> Result<Vec<GuardStatus>> {
        let call = self.inner.list_guards(ListGuardsRequest::default());
        let reply = self
            .rt
            .block_on(async { tokio::time::timeout(CALL_DEADLINE, call).await })
            .context("ListGuards timed out")??;
        Ok(reply.into_inner().guards)
    }
}
