//! A target: one guard on one container, as either backend is given it to enforce.

use std::sync::Arc;

use crate::decisions::LogContext;
use crate::resolve::TargetRoot;

pub struct TargetSpec {
    /// The guard, and what its records name the target by.
    pub ctx: Arc<LogContext>,
    /// The container: its process and root.
    pub root: TargetRoot,
    /// What the target's state says of how it is enforced (why BPF left it to fanotify).
    pub warnings: Vec<String>,
}
