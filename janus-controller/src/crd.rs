//! The JanusGuard custom resource as the API server sees it: the same fields as
//! [`janus_api::JanusGuardSpec`] (every manifest of the original Janus deserializes into
//! both), plus a schema that refuses at admission what the agent would refuse later:
//! no selector, relative paths or `..` components, unknown events, no subjects, a subject
//! without paths,
//! unknown `logFormat` specifiers, selector requirements whose values do not fit their
//! operator.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An absolute path with no `..` component (RE2, as the API server evaluates it).
pub const PATH_PATTERN: &str = r"^(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+|\.?))+$";

/// CEL rule of a subject: at least one path (the agent refuses a subject without any).
pub const SUBJECT_RULE: &str =
    "(has(self.allow) && size(self.allow) > 0) || (has(self.deny) && size(self.deny) > 0)";

/// CEL rule of a selector requirement: `In` and `NotIn` need values, `Exists` and
/// `DoesNotExist` take none, as in Kubernetes' own label selectors.
pub const REQUIREMENT_RULE: &str = "self.operator == 'In' || self.operator == 'NotIn' \
    ? has(self.values) && size(self.values) > 0 \
    : !has(self.values) || size(self.values) == 0";

/// A guard on files in the pods its selector picks: which paths to allow or deny, for which
/// events.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "januscontroller.clustergarage.io",
    version = "v1alpha1",
    kind = "JanusGuard",
    namespaced,
    status = "JanusGuardStatus",
    shortname = "jg",
    doc = "Guards files in the pods its selector picks: paths to allow or deny, for which events",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.podsGuarded"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Degraded","type":"string","jsonPath":".status.conditions[?(@.type==\"Degraded\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct JanusGuardSpec {
    /// Which pods of the namespace are guarded; required (`{}` selects every pod of the
    /// namespace). An object stored without one is refused by the controller too.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(required)]
    pub selector: Option<LabelSelector>,
    #[schemars(length(min = 1))]
    pub subjects: Vec<Subject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = janus_api::logformat::LOG_FORMAT_PATTERN))]
    pub log_format: Option<String>,
    /// `enforce` (the default) or `monitor`: every decision is made, logged and counted,
    /// but nothing is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mode_schema")]
    pub mode: Option<ModeName>,
    /// `failClosed` (the default) or `failOpen`: whether a selected pod's container starts
    /// when the node's start gate cannot enforce this guard on it in time. Closed, it does
    /// not start (the kubelet retries, with the reason in the pod's events); open, it
    /// starts unguarded and `janus_gate_total{outcome="started_unguarded"}` counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "gate_failure_schema")]
    pub on_gate_failure: Option<GateFailure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum GateFailure {
    FailClosed,
    FailOpen,
}

/// A plain string enum, as for `mode`.
fn gate_failure_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "string", "enum": ["failClosed", "failOpen"] })
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": SUBJECT_RULE,
    "message": "a subject needs at least one path in allow or deny",
}]))]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATH_PATTERN)))]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PATH_PATTERN)))]
    pub deny: Vec<String>,
    /// Omitted means `all` (open and access).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventName>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub only_dir: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_allow_owner: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub audit: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Overrides the guard's `mode` for this subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "mode_schema")]
    pub mode: Option<ModeName>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventName {
    All,
    Open,
    Access,
    Exec,
    Modify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    Enforce,
    Monitor,
}

/// The agent's modes, as a plain string enum: schemars would make an optional enum list
/// `null` among the values, which the API server's structural schemas do not take.
fn mode_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = janus_api::Mode::ALL.iter().map(|m| m.name()).collect();
    schemars::json_schema!({ "type": "string", "enum": names })
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": REQUIREMENT_RULE,
    "message": "values: In and NotIn need at least one, Exists and DoesNotExist take none",
}]))]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JanusGuardStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Selected pods whose every container is enforced.
    #[serde(default)]
    pub pods_guarded: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `enforce`, `monitor`, or `mixed` when subjects override the guard's mode; absent
    /// while the spec is not valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Accesses refused in the selected pods (or, in monitor mode, that would have been),
    /// as their agents count them since the guard was placed on each container: a
    /// restarted agent or container starts again from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<i64>,
    /// The latest of those denials that was logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_denial: Option<LastDenial>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastDenial {
    pub pod: String,
    /// The executable's path, else the command name; `?` when the process was gone
    /// before the agent could read it.
    pub by: String,
    pub pid: i32,
    /// RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
}

impl JanusGuardSpec {
    /// The spec in the agent's own types, through its JSON form (the wire format of
    /// `ApplyGuard`), so both sides read exactly the same document.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a spec serializes")
    }
}

/// The CustomResourceDefinition, as YAML.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&JanusGuard::crd()).expect("the CRD serializes")
}
