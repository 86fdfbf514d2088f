//! The JanusGuard resource as users write it ([`guard`]), validated once into a typed
//! policy ([`policy`]) whose decision rules ([`decide`]) and log lines ([`logformat`])
//! every enforcement backend shares.

pub mod decide;
#[cfg(feature = "diagnostics")]
pub mod diagnostics;
pub mod guard;
#[cfg(feature = "grpc")]
pub mod holding;
pub mod logformat;
pub mod policy;

pub use decide::{Decision, RuleSet, Verdict};
pub use guard::{JanusGuard, JanusGuardSpec, LabelSelector, Subject};
pub use logformat::{LogRecord, LogTemplate};
pub use policy::{Event, EventSet, GuardPath, GuardPolicy, Mode, SubjectPolicy, ValidationErrors};

/// The agent's gRPC API, `janus.agent.v1`, generated from `proto/janus/agent/v1/agent.proto`.
#[cfg(feature = "grpc")]
pub mod agent_v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("janus.agent.v1");
}
