//! The controller's metrics, names and labels as janus-controller registers them, in the text
//! format, for checking queries where the controller itself is not at hand. Where it is, pass its
//! registry's rendering to [`crate::promql::check_queries`] instead: the check is the same.

/// Every controller metric with every label it carries.
pub const CONTROLLER_METRICS: &str = "\
# TYPE janus_controller_reconciliations_total counter
janus_controller_reconciliations_total{result=\"ok\"} 0
janus_controller_reconciliations_total{result=\"error\"} 0
# TYPE janus_controller_agents_reachable gauge
janus_controller_agents_reachable 0
# TYPE janus_controller_agents gauge
janus_controller_agents 0
# TYPE janus_controller_guards_pushed_total counter
janus_controller_guards_pushed_total 0
# TYPE janus_controller_errors_total counter
janus_controller_errors_total{kind=\"agent\"} 0
";
