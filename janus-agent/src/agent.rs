//! The agent's set of guarded targets, whatever drives it (the command line or the API).

use std::collections::BTreeMap;
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
    /// Targets the API manages, by a key the caller chooses (`serve`: guard, pod, container).
    keyed: Mutex<BTreeMap<String, TargetHandle>>,
}

impl Agent {
    pub fn new(metrics: Arc<Metrics>, log: LogSender, node: String) -> Agent {
        Agent {
            metrics,
            log,
            node,
            targets: Mutex::new(Vec::new()),
            keyed: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Starts enforcing `guard` on `pid`.
    pub fn guard(&self, guard: Arc<GuardPolicy>, pid: i32, pod: String) -> Result<(), StartError> {
        let handle = self.start(guard, pid, pod)?;
        self.targets.lock().expect("targets lock").push(handle);
        Ok(())
    }

    fn start(
        &self,
        guard: Arc<GuardPolicy>,
        pid: i32,
        pod: String,
    ) -> Result<TargetHandle, StartError> {
        fanotify::start(
            TargetSpec {
                guard,
                pid,
                pod,
                node: self.node.clone(),
            },
            self.metrics.clone(),
            self.log.clone(),
        )
    }

    /// Starts enforcing `guard` on `pid` under `key`, replacing (and lifting) whatever the
    /// key held. On error the key holds nothing.
    pub fn add(
        &self,
        key: &str,
        guard: Arc<GuardPolicy>,
        pid: i32,
        pod: String,
    ) -> Result<(), StartError> {
        self.remove(key);
        let handle = self.start(guard, pid, pod)?;
        self.keyed
            .lock()
            .expect("targets lock")
            .insert(key.to_owned(), handle);
        Ok(())
    }

    /// Lifts the guard held under `key`; false if there was none.
    pub fn remove(&self, key: &str) -> bool {
        let handle = self.keyed.lock().expect("targets lock").remove(key);
        let held = handle.is_some();
        if let Some(h) = handle {
            h.stop();
        }
        held
    }

    /// The state of each keyed target.
    pub fn keyed_states(&self) -> BTreeMap<String, TargetState> {
        self.keyed
            .lock()
            .expect("targets lock")
            .iter()
            .map(|(k, h)| (k.clone(), h.state()))
            .collect()
    }

    pub fn states(&self) -> Vec<TargetState> {
        let mut states: Vec<TargetState> = self
            .targets
            .lock()
            .expect("targets lock")
            .iter()
            .map(TargetHandle::state)
            .collect();
        states.extend(self.keyed_states().into_values());
        states
    }

    /// Ready once every target has placed its marks (or is gone).
    pub fn ready(&self) -> bool {
        self.states().iter().all(|s| s.phase != Phase::Pending)
    }

    /// Lifts every guard.
    pub fn shutdown(&self) {
        let targets = std::mem::take(&mut *self.targets.lock().expect("targets lock"));
        let keyed = std::mem::take(&mut *self.keyed.lock().expect("targets lock"));
        for t in targets.into_iter().chain(keyed.into_values()) {
            t.stop();
        }
    }
}
