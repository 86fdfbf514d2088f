//! The agent's set of guarded targets, whatever drives it (the command line or the API).

use std::sync::{Arc, Mutex};

use janus_api::GuardPolicy;

use crate::decisions::LogSender;
use crate::fanotify::target::{StartError, TargetSpec};
use crate::fanotify::{self, TargetHandle};
use crate::metrics::Metrics;
use crate::state::{Phase, TargetState};

pub struct Agent {
    metrics: Arc<Metrics>,
    log: LogSender,
    node: String,
    targets: Mutex<Vec<TargetHandle>>,
}

impl Agent {
    pub fn new(metrics: Arc<Metrics>, log: LogSender, node: String) -> Agent {
        Agent {
            metrics,
            log,
            node,
            targets: Mutex::new(Vec::new()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Starts enforcing `guard` on `pid`.
    pub fn guard(&self, guard: Arc<GuardPolicy>, pid: i32, pod: String) -> Result<(), StartError> {
        let handle = fanotify::start(
            TargetSpec {
                guard,
                pid,
                pod,
                node: self.node.clone(),
            },
            self.metrics.clone(),
            self.log.clone(),
        )?;
        self.targets.lock().expect("targets lock").push(handle);
        Ok(())
    }

    pub fn states(&self) -> Vec<TargetState> {
        self.targets
            .lock()
            .expect("targets lock")
            .iter()
            .map(TargetHandle::state)
            .collect()
    }

    /// Ready once every target has placed its marks (or is gone).
    pub fn ready(&self) -> bool {
        self.states().iter().all(|s| s.phase != Phase::Pending)
    }

    /// Lifts every guard.
    pub fn shutdown(&self) {
        let targets = std::mem::take(&mut *self.targets.lock().expect("targets lock"));
        for t in targets {
            t.stop();
        }
    }
}
