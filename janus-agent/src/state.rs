//! What the agent reports about each guarded target: `/state`, readiness, and (through the
//! API) the controller.

use serde::Serialize;

use crate::decisions::LastDenial;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Marks are being placed.
    Pending,
    Enforcing,
    /// The process exited; its marks are gone.
    Exited,
    /// A guarded path that exists could not be enforced (see its path state); retried
    /// every second.
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Pending,
        Phase::Enforcing,
        Phase::Exited,
        Phase::Failed,
    ];

    /// The `state` label of `janus_targets`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Enforcing => "enforcing",
            Phase::Exited => "exited",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "lowercase")]
pub enum PathStatus {
    Enforced,
    /// Does not exist (yet): retried every second.
    Missing(String),
    /// Not enforced by design, e.g. `onlyDir` on a file.
    Skipped(String),
    /// What the path named was moved away or removed and is still guarded where it is;
    /// whatever appears at the path is guarded too.
    Moved(String),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathState {
    pub subject: usize,
    /// As the guard wrote it.
    pub path: String,
    /// As the kernel reports it inside the container, symlinks resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    pub verdict: &'static str,
    #[serde(flatten)]
    pub status: PathStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetState {
    pub guard: String,
    pub namespace: String,
    pub pid: i32,
    pub pod: String,
    pub backend: &'static str,
    pub phase: Phase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Things the guard asks for that this backend does not enforce, said loudly.
    pub warnings: Vec<String>,
    pub marks: usize,
    /// How many times the guarded paths have been looked at again (fanotify, every second;
    /// 0 under BPF, which places its rules once).
    pub passes: u64,
    pub audit: bool,
    pub paths: Vec<PathState>,
    /// Accesses refused (or, in monitor mode, that would have been) since the target was
    /// placed, logged or not.
    pub denials: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_denial: Option<DenialBy>,
}

impl TargetState {
    /// A target of `guard` on `pid` as its backend starts it: no marks, paths or denials yet.
    pub fn new(
        guard: &janus_api::GuardPolicy,
        (pid, pod): (i32, String),
        backend: &'static str,
        phase: Phase,
        audit: bool,
    ) -> TargetState {
        TargetState {
            guard: guard.name.clone(),
            namespace: guard.namespace.clone(),
            pid,
            pod,
            backend,
            phase,
            reason: None,
            warnings: Vec::new(),
            marks: 0,
            passes: 0,
            audit,
            paths: Vec::new(),
            denials: 0,
            last_denial: None,
        }
    }
}

/// Who made a target's last logged denial, and when (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DenialBy {
    pub pid: i32,
    /// The executable's path, else the command name, as `{exe}` prints it; `?` unknown.
    pub by: String,
    pub at: String,
}

impl From<LastDenial> for DenialBy {
    fn from(d: LastDenial) -> DenialBy {
        let mut by = String::new();
        let name = d.process.exe.as_deref().or(d.process.comm.as_deref());
        match name {
            Some(n) => janus_api::logformat::escape_into(n, &mut by),
            None => by.push('?'),
        }
        DenialBy {
            pid: d.process.pid,
            by,
            at: jiff::Timestamp::try_from(d.at).map_or_else(|_| "?".into(), |t| t.to_string()),
        }
    }
}
