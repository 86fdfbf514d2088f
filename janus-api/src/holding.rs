//! One guard held on one pod, as both sides of the agent API see it: the key it is held
//! under, the digest that says which spec it is, what makes two holdings the same, and the
//! bounds of a request. The agent and the controller use these same definitions, so they
//! cannot disagree about whether a holding needs repair.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::agent_v1::{ApplyGuardRequest, GuardKey, GuardStatus, ListGuardsResponse};

/// The largest `spec_json` an agent takes. A guard of [`crate::policy::MAX_PATHS`] paths of
/// ordinary length fits several times over.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// The most containers one pod may list (init, app, sidecar and ephemeral ones together).
pub const MAX_CONTAINERS: usize = 128;
/// The longest name, namespace, UID or container ID (a Kubernetes name is at most 253).
pub const MAX_FIELD_BYTES: usize = 253;
/// The most items one ApplyGuards or RemoveGuards call carries.
pub const MAX_BATCH: usize = 1000;
/// The largest ApplyGuards message an agent decodes; the controller splits a node's batch
/// to stay below it.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Which guard, on which pod.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HoldingKey {
    pub guard_namespace: String,
    pub guard_name: String,
    pub pod_uid: String,
}

impl From<&GuardKey> for HoldingKey {
    fn from(k: &GuardKey) -> Self {
        HoldingKey {
            guard_namespace: k.guard_namespace.clone(),
            guard_name: k.guard_name.clone(),
            pod_uid: k.pod_uid.clone(),
        }
    }
}

impl From<GuardKey> for HoldingKey {
    fn from(k: GuardKey) -> Self {
        HoldingKey {
            guard_namespace: k.guard_namespace,
            guard_name: k.guard_name,
            pod_uid: k.pod_uid,
        }
    }
}

impl From<&HoldingKey> for GuardKey {
    fn from(k: &HoldingKey) -> Self {
        GuardKey {
            guard_namespace: k.guard_namespace.clone(),
            guard_name: k.guard_name.clone(),
            pod_uid: k.pod_uid.clone(),
        }
    }
}

impl fmt::Display for HoldingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.guard_namespace, self.guard_name, self.pod_uid
        )
    }
}

/// `sha256:<hex>` of the spec's JSON bytes.
pub fn spec_digest(spec_json: &str) -> String {
    hex_digest(Sha256::digest(spec_json.as_bytes()).as_slice())
}

/// `sha256:<hex>` of a listing: of each status's encoding, in order. The agent and its
/// caller compare it to tell a listing that changed from one that did not; as it is made
/// from the statuses themselves, no change of them can leave it the same.
pub fn listing_digest(statuses: &[GuardStatus]) -> String {
    let mut hash = Sha256::new();
    for s in statuses {
        hash.update(prost::Message::encode_length_delimited_to_vec(s));
    }
    hex_digest(hash.finalize().as_slice())
}

/// The answer to a ListGuards: `statuses`, or only their digest when it is `unless_digest`.
pub fn listing(
    statuses: Vec<GuardStatus>,
    node: String,
    unless_digest: &str,
) -> ListGuardsResponse {
    let digest = listing_digest(&statuses);
    let unchanged = digest == unless_digest;
    ListGuardsResponse {
        guards: if unchanged { Vec::new() } else { statuses },
        node,
        digest,
        unchanged,
    }
}

fn hex_digest(hash: &[u8]) -> String {
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// What makes a holding the one wanted: the guard's UID (a guard created again under its
/// name is another guard), the spec by its digest, and the containers in order. The
/// generation is not part of it: it says how often a guard changed, not what it is, and a
/// generation can be forged higher; the digest cannot be matched by a different spec.
#[derive(Debug, PartialEq, Eq)]
pub struct Holding<'a> {
    pub guard_uid: &'a str,
    pub spec_digest: &'a str,
    pub containers: Vec<&'a str>,
}

impl<'a> Holding<'a> {
    /// What an agent reports holding for the containers it was asked to guard (not those it
    /// adopted on its own).
    pub fn of_status(s: &'a GuardStatus) -> Holding<'a> {
        Holding {
            guard_uid: &s.guard_uid,
            spec_digest: &s.spec_digest,
            containers: s
                .containers
                .iter()
                .filter(|c| !c.adopted)
                .map(|c| c.container_id.as_str())
                .collect(),
        }
    }

    /// What a request asks for; its digest must have been checked ([`validate`]) or set by
    /// the caller.
    pub fn of_request(r: &'a ApplyGuardRequest) -> Holding<'a> {
        Holding {
            guard_uid: r.guard.as_ref().map_or("", |g| g.uid.as_str()),
            spec_digest: &r.spec_digest,
            containers: r
                .pod
                .as_ref()
                .map(|p| p.container_ids.iter().map(String::as_str).collect())
                .unwrap_or_default(),
        }
    }
}

/// What is wrong with a request, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{0}: required")]
    Missing(&'static str),
    #[error("{field}: {len} bytes; at most {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("pod.container_ids: {0} containers; at most {MAX_CONTAINERS}")]
    TooManyContainers(usize),
    #[error("spec_digest: {given:?} is not the digest of spec_json ({actual})")]
    DigestMismatch { given: String, actual: String },
}

/// Checks the bounds and required fields of an apply request and fills in its digest when
/// the caller left it empty.
pub fn validate(req: &mut ApplyGuardRequest) -> Result<(), RequestError> {
    let guard = req.guard.as_ref().ok_or(RequestError::Missing("guard"))?;
    let pod = req.pod.as_ref().ok_or(RequestError::Missing("pod"))?;
    let fields = [
        ("guard.namespace", &guard.namespace, MAX_FIELD_BYTES),
        ("guard.name", &guard.name, MAX_FIELD_BYTES),
        ("guard.uid", &guard.uid, MAX_FIELD_BYTES),
        ("pod.uid", &pod.uid, MAX_FIELD_BYTES),
        ("pod.namespace", &pod.namespace, MAX_FIELD_BYTES),
        ("pod.name", &pod.name, MAX_FIELD_BYTES),
        ("spec_json", &req.spec_json, MAX_SPEC_BYTES),
    ];
    for (field, value, max) in fields {
        if value.len() > max {
            return Err(RequestError::TooLong {
                field,
                len: value.len(),
                max,
            });
        }
    }
    for (field, value) in [
        ("guard.namespace", &guard.namespace),
        ("guard.name", &guard.name),
        ("pod.uid", &pod.uid),
    ] {
        if value.is_empty() {
            return Err(RequestError::Missing(field));
        }
    }
    if pod.container_ids.len() > MAX_CONTAINERS {
        return Err(RequestError::TooManyContainers(pod.container_ids.len()));
    }
    if let Some(id) = pod.container_ids.iter().find(|c| c.len() > MAX_FIELD_BYTES) {
        return Err(RequestError::TooLong {
            field: "pod.container_ids",
            len: id.len(),
            max: MAX_FIELD_BYTES,
        });
    }
    let actual = spec_digest(&req.spec_json);
    if req.spec_digest.is_empty() {
        req.spec_digest = actual;
    } else if req.spec_digest != actual {
        return Err(RequestError::DigestMismatch {
            given: req.spec_digest.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_v1::{ContainerStatus, GuardRef, PodRef};

    #[test]
    fn an_adopted_container_is_not_part_of_what_was_asked() {
        let status = |adopted| GuardStatus {
            guard_uid: "u".into(),
            spec_digest: "d".into(),
            containers: vec![
                ContainerStatus {
                    container_id: "containerd://app".into(),
                    ..Default::default()
                },
                ContainerStatus {
                    container_id: "containerd://sandbox".into(),
                    adopted,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let (adopted, asked) = (status(true), status(false));
        assert_eq!(
            Holding::of_status(&adopted).containers,
            ["containerd://app"]
        );
        assert_eq!(Holding::of_status(&asked).containers.len(), 2);
    }

    #[test]
    fn a_listing_is_unchanged_only_when_every_status_is_the_same() {
        let held = GuardStatus {
            guard_uid: "u".into(),
            containers: vec![ContainerStatus {
                container_id: "containerd://c".into(),
                phase: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let digest = listing_digest(std::slice::from_ref(&held));
        let answer = listing(vec![held.clone()], "n".into(), &digest);
        assert!(answer.unchanged && answer.guards.is_empty() && answer.digest == digest);
        let mut failed = held.clone();
        failed.containers[0].phase = 3;
        let answer = listing(vec![failed], "n".into(), &digest);
        assert!(!answer.unchanged && answer.guards.len() == 1);
        // One more holding, or one fewer, is another listing.
        assert_ne!(listing_digest(&[held.clone(), held.clone()]), digest);
        assert_ne!(listing_digest(&[]), digest);
        // No digest named: the whole listing.
        assert!(!listing(vec![held], "n".into(), "").unchanged);
    }

    fn request() -> ApplyGuardRequest {
        ApplyGuardRequest {
            guard: Some(GuardRef {
                namespace: "default".into(),
                name: "g".into(),
                uid: "u".into(),
                generation: 1,
            }),
            pod: Some(PodRef {
                uid: "p".into(),
                namespace: "default".into(),
                name: "web-1".into(),
                container_ids: vec!["containerd://a".into()],
            }),
            spec_json: r#"{"selector":{},"subjects":[{"deny":["/x"]}]}"#.into(),
            spec_digest: String::new(),
        }
    }

    #[test]
    fn the_digest_is_filled_in_and_checked() {
        let mut r = request();
        validate(&mut r).unwrap();
        assert_eq!(r.spec_digest, spec_digest(&r.spec_json));
        assert!(r.spec_digest.starts_with("sha256:") && r.spec_digest.len() == 71);
        r.spec_json = r#"{"selector":{},"subjects":[{"allow":["/"]}]}"#.into();
        assert!(matches!(
            validate(&mut r),
            Err(RequestError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn bounds_name_the_field() {
        let mut r = request();
        r.spec_json = " ".repeat(MAX_SPEC_BYTES + 1);
        let e = validate(&mut r).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "spec_json: {} bytes; at most {MAX_SPEC_BYTES}",
                MAX_SPEC_BYTES + 1
            )
        );
        let mut r = request();
        r.pod.as_mut().unwrap().container_ids = vec!["containerd://a".into(); MAX_CONTAINERS + 1];
        assert_eq!(
            validate(&mut r),
            Err(RequestError::TooManyContainers(MAX_CONTAINERS + 1))
        );
        let mut r = request();
        r.guard.as_mut().unwrap().name = "n".repeat(254);
        assert!(validate(&mut r)
            .unwrap_err()
            .to_string()
            .starts_with("guard.name: 254 bytes"));
        let mut r = request();
        r.pod.as_mut().unwrap().uid.clear();
        assert_eq!(validate(&mut r), Err(RequestError::Missing("pod.uid")));
    }

    #[test]
    fn a_holding_is_the_same_only_with_the_same_uid_digest_and_containers() {
        let mut r = request();
        validate(&mut r).unwrap();
        let status = GuardStatus {
            guard_uid: "u".into(),
            spec_digest: r.spec_digest.clone(),
            generation: 99,
            containers: vec![crate::agent_v1::ContainerStatus {
                container_id: "containerd://a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        // The generation does not count.
        assert_eq!(Holding::of_status(&status), Holding::of_request(&r));
        let mut other = status.clone();
        other.spec_digest = spec_digest("{}");
        assert_ne!(Holding::of_status(&other), Holding::of_request(&r));
    }
}
