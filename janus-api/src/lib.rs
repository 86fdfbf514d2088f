//! The JanusGuard resource as users write it ([`guard`]), validated once into a typed
//! policy ([`policy`]) whose decision rules ([`decide`]) and log lines ([`logformat`])
//! every enforcement backend shares.

pub mod decide;
pub mod guard;
pub mod logformat;
pub mod policy;

pub use decide::{Decision, RuleSet, Verdict};
pub use guard::{JanusGuard, JanusGuardSpec, LabelSelector, Subject};
pub use logformat::{LogRecord, LogTemplate};
pub use policy::{Event, EventSet, GuardPath, GuardPolicy, SubjectPolicy, ValidationErrors};
