//! Validation of a [`JanusGuard`](crate::JanusGuard) into a typed [`GuardPolicy`]. Every
//! string the user wrote is checked here, once; nothing downstream looks at strings again.

use std::collections::BTreeMap;
use std::fmt;

use crate::guard::{JanusGuard, JanusGuardSpec, LabelSelector};
use crate::logformat::{LogTemplate, DEFAULT_LOG_FORMAT};

/// A file-system event a guard can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    /// `open`: FAN_OPEN_PERM, or `file_open` under BPF.
    Open,
    /// `access`: a read (FAN_ACCESS_PERM, or `file_permission` for read under BPF).
    Access,
    /// `exec`: FAN_OPEN_EXEC_PERM, or an open for execution under BPF.
    Exec,
    /// `modify`: an open for writing or a write. fanotify cannot tell these apart from reads.
    Modify,
    /// A rename that would take an object out of the deny covering it: refused by the BPF
    /// backend whatever the guard's events, never written in a guard.
    Rename,
    /// A hard link that would do the same.
    Link,
}

impl Event {
    /// Every event, in the order of their values (`janus_common::EV_*`).
    pub const ALL: [Event; 6] = [
        Event::Open,
        Event::Access,
        Event::Exec,
        Event::Modify,
        Event::Rename,
        Event::Link,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Event::Open => "open",
            Event::Access => "access",
            Event::Exec => "exec",
            Event::Modify => "modify",
            Event::Rename => "rename",
            Event::Link => "link",
        }
    }

    /// The name the kernel gives the permission event, as logged by `{event}`.
    pub fn kernel_name(self) -> &'static str {
        match self {
            Event::Open => "OPEN_PERM",
            Event::Access => "ACCESS_PERM",
            Event::Exec => "OPEN_EXEC_PERM",
            Event::Modify => "MODIFY_PERM",
            Event::Rename => "RENAME_PERM",
            Event::Link => "LINK_PERM",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A value that is no event: a corrupt record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no event has the value {0}")]
pub struct UnknownEvent(pub u8);

impl TryFrom<u8> for Event {
    type Error = UnknownEvent;

    fn try_from(v: u8) -> Result<Event, UnknownEvent> {
        Event::ALL
            .get(usize::from(v))
            .copied()
            .ok_or(UnknownEvent(v))
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a subject's denials are enforced or only reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The kernel is told the decision.
    #[default]
    Enforce,
    /// Every decision is made, logged and counted, and the kernel is told to allow: what a
    /// guard would refuse is seen before it refuses anything.
    Monitor,
}

impl Mode {
    /// Every mode, as `spec.mode` spells it.
    pub const ALL: [Mode; 2] = [Mode::Enforce, Mode::Monitor];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
        }
    }

    fn parse(raw: &str, field: &str, errors: &mut ValidationErrors) -> Mode {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == raw)
            .unwrap_or_else(|| {
                errors.push(
                    field,
                    format!("unknown mode {raw:?}; expected enforce or monitor"),
                );
                Mode::Enforce
            })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Event`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EventSet(u8);

impl EventSet {
    pub const EMPTY: EventSet = EventSet(0);
    /// What `all` means: every event the original Janus listed.
    pub const ALL_KEYWORD: EventSet = EventSet(Event::Open.bit() | Event::Access.bit());

    pub fn contains(self, e: Event) -> bool {
        self.0 & e.bit() != 0
    }
    pub fn insert(&mut self, e: Event) {
        self.0 |= e.bit();
    }
    pub fn remove(&mut self, e: Event) {
        self.0 &= !e.bit();
    }
    pub fn union(self, other: EventSet) -> EventSet {
        EventSet(self.0 | other.0)
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = Event> {
        Event::ALL.into_iter().filter(move |e| self.contains(*e))
    }
}

impl FromIterator<Event> for EventSet {
    fn from_iter<I: IntoIterator<Item = Event>>(iter: I) -> Self {
        let mut set = EventSet::EMPTY;
        for e in iter {
            set.insert(e);
        }
        set
    }
}

/// An absolute path inside a container, normalised: no `.`, `..`, empty components or
/// trailing slash. Stored as bytes because the kernel's paths need not be UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuardPath(Vec<u8>);

impl GuardPath {
    pub fn parse(raw: &str) -> Result<GuardPath, String> {
        if raw.contains('\0') {
            return Err(format!("path must not contain NUL: {raw:?}"));
        }
        if !raw.starts_with('/') {
            return Err(format!("path must be absolute: {raw:?}"));
        }
        let mut normal = Vec::with_capacity(raw.len());
        for component in raw.split('/') {
            match component {
                "" | "." => {}
                ".." => return Err(format!("path must not contain '..': {raw:?}")),
                c => {
                    normal.push(b'/');
                    normal.extend_from_slice(c.as_bytes());
                }
            }
        }
        if normal.is_empty() {
            normal.push(b'/');
        }
        Ok(GuardPath(normal))
    }

    /// A path already in kernel form (absolute, normalised), e.g. from resolving a symlink.
    pub fn from_kernel(bytes: Vec<u8>) -> Option<GuardPath> {
        let ok = bytes.first() == Some(&b'/')
            && !bytes.contains(&0)
            && (bytes.len() == 1
                || (!bytes.ends_with(b"/")
                    && bytes[1..]
                        .split(|b| *b == b'/')
                        .all(|c| !c.is_empty() && c != b"." && c != b"..")));
        ok.then_some(GuardPath(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// Whether `path` is this path or lies below it.
    pub fn covers(&self, path: &[u8]) -> bool {
        let me = self.0.as_slice();
        me == b"/"
            || path == me
            || (path.len() > me.len() && path.starts_with(me) && path[me.len()] == b'/')
    }

    /// `name` below this path; None for a name that is not one component (empty, `.`,
    /// `..`, or holding `/` or NUL), as no directory entry is.
    pub fn join(&self, name: &[u8]) -> Option<GuardPath> {
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return None;
        }
        let mut p = self.0.clone();
        if p != b"/" {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        GuardPath::from_kernel(p)
    }

    /// The path relative to `/`, for resolving inside a container root.
    pub fn relative(&self) -> &[u8] {
        &self.0[1..]
    }
}

impl fmt::Display for GuardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// A validated subject.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectPolicy {
    pub allow: Vec<GuardPath>,
    pub deny: Vec<GuardPath>,
    /// Every event the subject asks for, including ones a backend may not support.
    pub events: EventSet,
    pub only_dir: bool,
    pub auto_allow_owner: bool,
    pub audit: bool,
    /// `{tags}` prints them as `key=value` pairs joined by commas, sorted by key.
    pub tags: BTreeMap<String, String>,
    /// The subject's own `mode`, else the guard's.
    pub mode: Mode,
}

/// A validated label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// A selector as written, validated alone (fields named under `spec.selector`).
    pub fn from_raw(raw: &LabelSelector) -> Result<Selector, ValidationErrors> {
        let mut errors = ValidationErrors::default();
        let selector = validate_selector(raw, &mut errors);
        if errors.is_empty() {
            Ok(selector)
        } else {
            Err(errors)
        }
    }

    /// Kubernetes semantics: every label and every expression must match; an empty selector
    /// matches everything.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| match r {
                Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
                Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

/// The most allow and deny paths one guard may list, all subjects together: every path is a
/// mark, a rule and a line of `/state` on every node the guard reaches, so a guard cannot be
/// made to cost an agent without bound.
pub const MAX_PATHS: usize = 1024;

/// A guard ready to enforce.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Selector,
    pub subjects: Vec<SubjectPolicy>,
    pub log_format: LogTemplate,
    /// Whether a selected pod's container starts when the start gate cannot enforce the
    /// guard on it in time (`onGateFailure: failOpen`); None: as its namespace says, closed
    /// unless it says otherwise.
    pub start_on_gate_failure: Option<bool>,
}

/// Whether `mode` (`onGateFailure`, or a namespace's label of that name) lets a container
/// start when the start gate fails.
pub fn gate_failure(mode: &str) -> Result<bool, String> {
    match mode {
        "failClosed" => Ok(false),
        "failOpen" => Ok(true),
        other => Err(format!("{other:?}: must be failClosed or failOpen")),
    }
}

impl GuardPolicy {
    pub fn from_guard(guard: &JanusGuard) -> Result<GuardPolicy, ValidationErrors> {
        let namespace = guard.metadata.namespace.as_deref().unwrap_or("default");
        let mut errors = ValidationErrors::default();
        if guard.metadata.name.is_empty() {
            errors.push("metadata.name", "must not be empty".into());
        }
        match GuardPolicy::from_spec(&guard.metadata.name, namespace, &guard.spec) {
            Ok(policy) if errors.is_empty() => Ok(policy),
            Ok(_) => Err(errors),
            Err(more) => {
                errors.0.extend(more.0);
                Err(errors)
            }
        }
    }

    pub fn from_spec(
        name: &str,
        namespace: &str,
        spec: &JanusGuardSpec,
    ) -> Result<GuardPolicy, ValidationErrors> {
        let mut errors = ValidationErrors::default();
        let selector = match &spec.selector {
            Some(selector) => validate_selector(selector, &mut errors),
            None => {
                errors.push(
                    "spec.selector",
                    "is required (`{}` selects every pod of the namespace)".into(),
                );
                Selector::default()
            }
        };
        if spec.subjects.is_empty() {
            errors.push("spec.subjects", "at least one subject is required".into());
        }
        let paths: usize = spec
            .subjects
            .iter()
            .map(|s| s.allow.len() + s.deny.len())
            .sum();
        if paths > MAX_PATHS {
            errors.push(
                "spec.subjects",
                format!("{paths} paths in all; a guard may list at most {MAX_PATHS}"),
            );
        }
        let mode = spec
            .mode
            .as_deref()
            .map_or(Mode::Enforce, |m| Mode::parse(m, "spec.mode", &mut errors));
        let subjects = spec
            .subjects
            .iter()
            .enumerate()
            .map(|(i, s)| validate_subject(i, s, mode, &mut errors))
            .collect();
        let log_format =
            match LogTemplate::parse(spec.log_format.as_deref().unwrap_or(DEFAULT_LOG_FORMAT)) {
                Ok(t) => t,
                Err(e) => {
                    errors.push("spec.logFormat", e);
                    LogTemplate::default()
                }
            };
        let start_on_gate_failure = match spec.on_gate_failure.as_deref() {
            None => None,
            Some(mode) => gate_failure(mode)
                .map_err(|e| errors.push("spec.onGateFailure", e))
                .ok(),
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(GuardPolicy {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            selector,
            subjects,
            log_format,
            start_on_gate_failure,
        })
    }

    /// Whether any subject can refuse (deny paths, enforced): then an internal error
    /// refuses too, else it allows.
    pub fn can_refuse(&self) -> bool {
        self.subjects
            .iter()
            .any(|s| !s.deny.is_empty() && s.mode == Mode::Enforce)
    }

    /// Whether the guard has deny paths and every one is in monitor mode: then nothing it
    /// does may refuse, not even what would fail closed.
    pub fn monitors_only(&self) -> bool {
        !self.can_refuse()
            && self
                .subjects
                .iter()
                .any(|s| !s.deny.is_empty() && s.mode == Mode::Monitor)
    }

    /// The mode of every subject, or `None` when they differ.
    pub fn mode(&self) -> Option<Mode> {
        let first = self.subjects.first().map_or(Mode::Enforce, |s| s.mode);
        self.subjects
            .iter()
            .all(|s| s.mode == first)
            .then_some(first)
    }
}

fn parse_events(raw: &[String], field: &str, errors: &mut ValidationErrors) -> EventSet {
    if raw.is_empty() {
        return EventSet::ALL_KEYWORD;
    }
    let mut set = EventSet::EMPTY;
    for (j, name) in raw.iter().enumerate() {
        match name.as_str() {
            "all" => set = set.union(EventSet::ALL_KEYWORD),
            "open" => set.insert(Event::Open),
            "access" => set.insert(Event::Access),
            "exec" => set.insert(Event::Exec),
            "modify" => set.insert(Event::Modify),
            other => errors.push(
                format!("{field}[{j}]"),
                format!("unknown event {other:?}; expected one of open, access, exec, modify, all"),
            ),
        }
    }
    set
}

fn validate_subject(
    i: usize,
    subject: &crate::guard::Subject,
    guard_mode: Mode,
    errors: &mut ValidationErrors,
) -> SubjectPolicy {
    let field = format!("spec.subjects[{i}]");
    let mut paths = |list: &[String], which: &str| -> Vec<GuardPath> {
        list.iter()
            .enumerate()
            .filter_map(|(j, raw)| {
                GuardPath::parse(raw)
                    .map_err(|e| errors.push(format!("{field}.{which}[{j}]"), e))
                    .ok()
            })
            .collect()
    };
    let allow = paths(&subject.allow, "allow");
    let deny = paths(&subject.deny, "deny");
    if subject.allow.is_empty() && subject.deny.is_empty() {
        errors.push(
            field.clone(),
            "at least one allow or deny path is required".into(),
        );
    }
    for (j, d) in deny.iter().enumerate() {
        if allow.contains(d) {
            errors.push(
                format!("{field}.deny[{j}]"),
                format!("path {:?} is also listed in allow", d.to_string()),
            );
        }
    }
    let events = parse_events(&subject.events, &format!("{field}.events"), errors);
    for (k, v) in &subject.tags {
        // Tags end up inside log lines: a newline would let a guard author forge lines.
        if k.chars().chain(v.chars()).any(char::is_control) || k.is_empty() {
            errors.push(
                format!("{field}.tags.{k}"),
                "tag keys must be non-empty and tags must not contain control characters".into(),
            );
        }
    }
    let mode = subject.mode.as_deref().map_or(guard_mode, |m| {
        Mode::parse(m, &format!("{field}.mode"), errors)
    });
    SubjectPolicy {
        allow,
        deny,
        events,
        only_dir: subject.only_dir,
        auto_allow_owner: subject.auto_allow_owner,
        audit: subject.audit,
        tags: subject.tags.clone(),
        mode,
    }
}

fn validate_selector(raw: &LabelSelector, errors: &mut ValidationErrors) -> Selector {
    let mut match_expressions = Vec::new();
    for (i, e) in raw.match_expressions.iter().enumerate() {
        let field = format!("spec.selector.matchExpressions[{i}]");
        let needs_values = matches!(e.operator.as_str(), "In" | "NotIn");
        if needs_values && e.values.is_empty() {
            errors.push(
                format!("{field}.values"),
                format!("operator {} needs at least one value", e.operator),
            );
        }
        if !needs_values && !e.values.is_empty() {
            errors.push(
                format!("{field}.values"),
                format!("operator {} takes no values", e.operator),
            );
        }
        let (k, vs) = (e.key.clone(), e.values.clone());
        match e.operator.as_str() {
            "In" => match_expressions.push(Requirement::In(k, vs)),
            "NotIn" => match_expressions.push(Requirement::NotIn(k, vs)),
            "Exists" => match_expressions.push(Requirement::Exists(k)),
            "DoesNotExist" => match_expressions.push(Requirement::DoesNotExist(k)),
            other => errors.push(
                format!("{field}.operator"),
                format!("unknown operator {other:?}; expected In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
    Selector {
        match_labels: raw.match_labels.clone(),
        match_expressions,
    }
}

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where, e.g. `spec.subjects[0].deny[0]`.
    pub field: String,
    pub message: String,
}

/// Every problem found in a guard, so a user fixes them all in one go.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    fn push(&mut self, field: impl Into<String>, message: String) {
        self.0.push(FieldError {
            field: field.into(),
            message,
        });
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}
