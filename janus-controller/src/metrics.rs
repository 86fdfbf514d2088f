//! The controller's Prometheus metrics, served on /metrics.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounterVec,
    pub agents_reachable: IntGauge,
    pub agents: IntGauge,
    pub guards_pushed: IntCounter,
    pub errors: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "janus_controller_reconciliations_total",
                "Reconciliations, by result (ok|error).",
            ),
            &["result"],
        )
        .expect("valid metric");
        for r in ["ok", "error"] {
            reconciliations.with_label_values(&[r]);
        }
        let agents_reachable = IntGauge::new(
            "janus_controller_agents_reachable",
            "Agents that answered the last periodic reconciliation.",
        )
        .expect("valid metric");
        let agents = IntGauge::new(
            "janus_controller_agents",
            "Agents known from the agent Service's EndpointSlices.",
        )
        .expect("valid metric");
        let guards_pushed = IntCounter::new(
            "janus_controller_guards_pushed_total",
            "ApplyGuard calls that an agent accepted.",
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "janus_controller_errors_total",
                "Errors, by kind (agent_unreachable|apply|remove|set_pods|status).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        // Every series exists from the start, so alerts and dashboards see 0, not nothing.
        for kind in ["agent_unreachable", "apply", "remove", "set_pods", "status"] {
            errors.with_label_values(&[kind]);
        }
        for c in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(agents_reachable.clone()),
            Box::new(agents.clone()),
            Box::new(guards_pushed.clone()),
            Box::new(errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            reconciliations,
            agents_reachable,
            agents,
            guards_pushed,
            errors,
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
