//! What the agent's integration tests share: requests to `janus-agent serve`, and a free
//! loopback address to serve on.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};

use janus_api::agent_v1::{ApplyGuardRequest, GuardRef, PodRef};

/// A loopback address nobody listens on.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An ApplyGuard of guard `namespace/name` (generation 1) with `spec_json` for pod
/// `pod_uid` and its containers, containerd IDs.
pub fn apply(
    namespace: &str,
    name: &str,
    pod_uid: &str,
    containers: &[&str],
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
            container_ids: containers
                .iter()
                .map(|c| format!("containerd://{c}"))
                .collect(),
        }),
        spec_json: spec_json.into(),
        spec_digest: String::new(),
    }
}

/// Denies opening `/data/secret`.
pub const DENY_SECRET: &str = r#"{"subjects":[{"deny":["/data/secret"],"events":["open"]}]}"#;
