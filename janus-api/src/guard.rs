//! The `JanusGuard` custom resource (`januscontroller.clustergarage.io/v1alpha1`), field for
//! field as the original Janus documented it. These types only carry what the user wrote;
//! [`crate::policy`] turns them into something enforceable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const GROUP: &str = "januscontroller.clustergarage.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "januscontroller.clustergarage.io/v1alpha1";
pub const KIND: &str = "JanusGuard";

/// A whole JanusGuard document, as found in a manifest file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JanusGuard {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: JanusGuardSpec,
}

/// The part of Kubernetes object metadata a guard needs; the rest is accepted and ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

// Unknown fields are refused: in a security policy a misspelt `autoAllowOwnr` must be an
// error, not a guard that silently lacks the flag.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JanusGuardSpec {
    /// Required: a guard without one is refused rather than taken to select every pod of
    /// its namespace; `{}` says that explicitly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub subjects: Vec<Subject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// `enforce` (omitted) or `monitor`: decide and log, but let every access through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `failClosed` (omitted) or `failOpen`: whether a selected pod's container may start
    /// when the start gate cannot enforce this guard on it in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_gate_failure: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Omitted means `all`: the seed's `audit` example lists no events.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
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
    pub mode: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A Kubernetes label selector (`matchLabels`, `matchExpressions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document {index}: {error}")]
    Yaml {
        index: usize,
        error: serde_yaml::Error,
    },
    #[error("document {index}: kind is {kind:?}, expected {KIND:?}")]
    Kind { index: usize, kind: String },
    #[error("document {index}: apiVersion is {api_version:?}, expected {API_VERSION:?}")]
    ApiVersion { index: usize, api_version: String },
    #[error("no JanusGuard document found")]
    Empty,
}

/// Parses every YAML document in `text` as a JanusGuard; empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<JanusGuard>, ParseError> {
    let mut guards = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|error| ParseError::Yaml { index, error })?;
        if value.is_null() {
            continue;
        }
        let guard: JanusGuard =
            serde_yaml::from_value(value).map_err(|error| ParseError::Yaml { index, error })?;
        if guard.kind != KIND {
            return Err(ParseError::Kind {
                index,
                kind: guard.kind,
            });
        }
        if guard.api_version != API_VERSION {
            return Err(ParseError::ApiVersion {
                index,
                api_version: guard.api_version,
            });
        }
        guards.push(guard);
    }
    if guards.is_empty() {
        return Err(ParseError::Empty);
    }
    Ok(guards)
}
