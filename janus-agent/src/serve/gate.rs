//! The start gate's agent side: what the controller said of each pod bound to this node
//! ([`Word`]), and the answer to `janus-agent hook` ([`crate::hook`]) over a unix socket
//! only root can use: a pod's container runs once every guard of its pod is enforced on it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use janus_api::agent_v1::{BoundPod, SetPodsRequest};
use janus_api::holding::HoldingKey;
use prost::Message;

use super::{target_key, Guards, HeldContainer};
use crate::hook::{self, Answer, Request, Ungated};
use crate::pin::{self, PinnedProcess, ProcDir};
use crate::pods::{self, ContainerId};
use crate::resolve::TargetRoot;
use crate::state::Phase;

#[derive(Debug, Clone, clap::Args)]
pub struct GateArgs {
    /// Where the start gate answers `janus-agent hook`; only root may connect.
    #[arg(long, default_value = hook::SOCKET)]
    pub gate_socket: PathBuf,
    /// How long the gate waits for the controller's word on a pod and for its guards to be
    /// enforced on a container before the pod's failure mode decides.
    #[arg(long, default_value_t = 20)]
    pub gate_within_secs: u64,
    /// Whether a pod's container starts when the controller has never told this agent
    /// which pods it has (right after the agent started, or with no controller).
    #[arg(long, value_enum, default_value_t = hook::Unreachable::Start)]
    pub gate_without_word: hook::Unreachable,
    /// Where `janus-agent hook` records the containers it let start without an answer.
    #[arg(long, default_value = hook::UNGATED)]
    pub ungated_dir: PathBuf,
    /// Where the controller's last word is kept, for an agent that restarts to gate by it
    /// until the controller tells it again.
    #[arg(long, default_value = "/run/janus/word.pb")]
    pub gate_word_file: PathBuf,
}

/// The most characters of a reason the gate answers with.
const MAX_REASON: usize = 2048;

/// The most pods the controller may name: far above what a node runs.
pub const MAX_BOUND_PODS: usize = 8192;

/// What the controller last said of the pods bound to this node.
#[derive(Default)]
pub(super) struct Word {
    /// Bumped on every change a waiting gate may be waiting for: a word, a guard applied.
    pub(super) generation: u64,
    told: bool,
    pods: BTreeMap<String, BoundPod>,
    closed_namespaces: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WordError {
    #[error("pods: {0} pods; at most {MAX_BOUND_PODS}")]
    TooMany(usize),
    #[error("pods[{0}].uid: required")]
    NoUid(usize),
    #[error("node: {0:?} is not this agent's node ({1:?})")]
    OtherNode(String, String),
}

/// Why a container may not run as it is, and whether it runs anyway.
struct Failure {
    reason: String,
    start: bool,
}

impl Guards {
    /// Takes the controller's word on the pods bound to this node.
    pub fn set_pods(&self, req: SetPodsRequest) -> Result<(), WordError> {
        if req.pods.len() > MAX_BOUND_PODS {
            return Err(WordError::TooMany(req.pods.len()));
        }
        if let Some(i) = req.pods.iter().position(|p| p.uid.is_empty()) {
            return Err(WordError::NoUid(i));
        }
        if req.node != self.node {
            return Err(WordError::OtherNode(req.node, self.node.clone()));
        }
        tracing::info!(
            pods = req.pods.len(),
            guarded = req.pods.iter().filter(|p| !p.guards.is_empty()).count(),
            closed_namespaces = req.closed_namespaces.len(),
            "start gate: the controller's word on this node's pods"
        );
        self.take_word(req, true);
        Ok(())
    }

    /// Writes the word where a restarted agent finds it: whole, then named.
    fn keep(&self, req: &SetPodsRequest) {
        let path = &self.gate.word_file;
        let partial = path.with_extension("partial");
        let written = std::fs::write(&partial, req.encode_to_vec())
            .and_then(|()| std::fs::rename(&partial, path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "start gate: cannot keep the controller's word; an agent restart waits for it again");
        }
    }

    /// Takes the word kept by the agent that ran before, if it is this node's.
    pub fn load_word(&self) {
        let path = &self.gate.word_file;
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        match SetPodsRequest::decode(bytes.as_slice()) {
            Ok(req) if req.node == self.node && req.pods.len() <= MAX_BOUND_PODS => {
                tracing::info!(
                    pods = req.pods.len(),
                    "start gate: the controller's last word, as kept"
                );
                self.take_word(req, false);
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "start gate: a kept word not for this node, or too large; not taken")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "start gate: a kept word that does not decode; not taken")
            }
        }
    }

    /// Takes `req` as the word; `told` when the controller said it now (else it was kept): a
    /// pod a kept word does not name is one the controller may have bound since.
    fn take_word(&self, req: SetPodsRequest, told: bool) {
        let mut word = self.word.lock().expect("word lock");
        if told {
            // Under the lock: the file and the word taken are the same one.
            self.keep(&req);
        }
        word.told = told;
        word.pods = req.pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
        word.closed_namespaces = req.closed_namespaces.into_iter().collect();
        word.generation += 1;
        self.changed.notify_all();
    }

    /// Wakes the gates waiting for a guard to arrive.
    pub(super) fn notify_gates(&self) {
        self.word.lock().expect("word lock").generation += 1;
        self.changed.notify_all();
    }

    /// Waits until something changed since `generation`; false at `deadline`.
    fn wait_change(&self, generation: u64, deadline: Instant) -> bool {
        let word = self.word.lock().expect("word lock");
        let left = deadline.saturating_duration_since(Instant::now());
        let (word, _) = self
            .changed
            .wait_timeout_while(word, left, |w| w.generation == generation)
            .expect("word lock");
        word.generation != generation
    }

    /// The gate's answer for the container `req` names, counted.
    pub fn admit(&self, req: &Request, named: ProcDir) -> Answer {
        let (outcome, answer) = match self.admit_in(req, named) {
            Ok(None) => ("no_guard", Answer::started("")),
            Ok(Some(n)) => {
                tracing::info!(pod = %req.pod_uid, container = %req.container_id, guards = n, "start gate: container guarded before it runs");
                ("guarded", Answer::started(""))
            }
            Err(f) if f.start => {
                tracing::warn!(pod = %req.pod_uid, container = %req.container_id, reason = %f.reason, "start gate: container starts unguarded (its guards fail open)");
                ("started_unguarded", Answer::started(&f.reason))
            }
            Err(f) => {
                tracing::warn!(pod = %req.pod_uid, container = %req.container_id, reason = %f.reason, "start gate: container refused (its guards fail closed)");
                let answer = Answer {
                    start: false,
                    reason: f.reason,
                };
                ("refused", answer)
            }
        };
        self.agent
            .metrics()
            .gate
            .with_label_values(&[outcome])
            .inc();
        answer
    }

    /// How many guards now hold the container, or why it is not guarded.
    fn admit_in(&self, req: &Request, named: ProcDir) -> Result<Option<usize>, Failure> {
        let refuse = |reason: String| Failure {
            reason,
            start: false,
        };
        let id: ContainerId = req
            .container_id
            .parse()
            .map_err(|e| refuse(format!("container_id: {e}")))?;
        // The process is the named container's, in the named pod, before any answer: the
        // annotations it came by are the runtime's copy of what the pod's author wrote. Read
        // through the directory the sibling check read, so the process checked is the one
        // pinned.
        let member = pods::member_of(named, &id, &req.pod_uid).ok_or_else(|| {
            refuse(format!(
                "pid {} is not a process of container {id} in pod {}",
                req.pid, req.pod_uid
            ))
        })?;
        // Held from here on: the runtime's init, not whoever has its PID later.
        let process = Arc::new(member.pin().map_err(|e| refuse(e.to_string()))?);
        let deadline = Instant::now() + self.gate.within;
        let pod = match self.word_on(req, deadline) {
            Ok(pod) => pod,
            // No word in time, but guards held for the pod (pushed while the word was late):
            // those, failing closed unless each of them fails open.
            Err(no_word) => self.held_word(&req.pod_uid).ok_or(no_word)?,
        };
        let fail = |reason: String| Failure {
            reason,
            start: pod.start_on_failure,
        };
        // Every guard the word names, and every one held for the pod that it does not (a
        // word older than a guard's push).
        let mut keys: BTreeSet<HoldingKey> = pod
            .guards
            .iter()
            .map(|g| HoldingKey {
                guard_namespace: pod.namespace.clone(),
                guard_name: g.clone(),
                pod_uid: pod.uid.clone(),
            })
            .collect();
        keys.extend(
            self.held
                .lock()
                .expect("guards lock")
                .keys()
                .filter(|k| k.pod_uid == pod.uid)
                .cloned(),
        );
        if keys.is_empty() {
            return Ok(None);
        }
        // Every guard of the pod, held: the controller pushes them as it binds the pod.
        loop {
            let generation = self.word.lock().expect("word lock").generation;
            let missing: Vec<&HoldingKey> = {
                let held = self.held.lock().expect("guards lock");
                keys.iter().filter(|k| !held.contains_key(k)).collect()
            };
            let Some(k) = missing.first() else { break };
            if !self.wait_change(generation, deadline) {
                return Err(fail(format!(
                    "guard {}/{} not received for pod {} within {:?}",
                    k.guard_namespace, k.guard_name, pod.uid, self.gate.within
                )));
            }
        }
        let gated = Gated {
            process,
            rootfs: req.rootfs.clone(),
        };
        let mut targets = Vec::new();
        for k in &keys {
            targets.push(self.guard_gated(k, &id, &gated).map_err(&fail)?);
        }
        self.enforced(&targets, deadline).map_err(fail)?;
        Ok(Some(targets.len()))
    }

    /// What the controller said of the pod, waiting for it until `deadline`.
    fn word_on(&self, req: &Request, deadline: Instant) -> Result<BoundPod, Failure> {
        loop {
            let generation = {
                let word = self.word.lock().expect("word lock");
                if let Some(pod) = word.pods.get(&req.pod_uid) {
                    return Ok(pod.clone());
                }
                word.generation
            };
            if !self.wait_change(generation, deadline) {
                let word = self.word.lock().expect("word lock");
                let start = if word.closed_namespaces.contains(&req.pod_namespace) {
                    false
                } else if word.told {
                    true
                } else {
                    self.gate.without_word == hook::Unreachable::Start
                };
                return Err(Failure {
                    reason: format!(
                        "no word from the controller on pod {} within {:?}",
                        req.pod_uid, self.gate.within
                    ),
                    start,
                });
            }
        }
    }

    /// Guards the container under holding `k` on the process the gate named, pinned: the
    /// process the runtime started, whatever a scan would take for the init later.
    fn guard_gated(
        &self,
        k: &HoldingKey,
        id: &ContainerId,
        gated: &Gated,
    ) -> Result<String, String> {
        let mut held = self.held.lock().expect("guards lock");
        let h = held
            .get_mut(k)
            .ok_or_else(|| format!("guard {}/{} was lifted", k.guard_namespace, k.guard_name))?;
        let i = match h.containers.iter().position(|c| c.id == *id) {
            Some(i) => i,
            None => {
                h.containers
                    .push(HeldContainer::new(id.to_string(), id.clone(), true));
                h.containers.len() - 1
            }
        };
        let c = &mut h.containers[i];
        let tkey = target_key(k, &c.raw);
        let raw = c.raw.clone();
        let process = gated.process.clone();
        // Both pinned and running: the same PID and start are the same process.
        let same = c.init_process() == Some(process.process());
        match &c.init {
            Some(p) if same && p.runs() && c.failure.is_none() => return Ok(tkey),
            // A container runs once: one already guarded on a running process is not set up
            // again, whoever asks.
            Some(p)
                if !same
                    && p.runs()
                    && pods::member(p.pid(), id, &k.pod_uid).map(|m| m.process)
                        == Some(p.process()) =>
            {
                return Err(format!("container {id} runs already (pid {})", p.pid()));
            }
            _ => {}
        }
        c.init = Some(process.clone());
        c.gated = Some(gated.clone());
        c.settling = false;
        let at = root_of(Some(gated), process);
        let added = self
            .agent
            .add(&tkey, h.policy.clone(), at, h.pod_name.clone(), raw);
        // Retried at each rescan while the process runs; the gate waits for it until its
        // deadline.
        if let Err(e) = &added {
            tracing::warn!(guard = %k.guard_name, namespace = %k.guard_namespace, container = %id, error = %e, "start gate: cannot guard the container yet");
        }
        c.failure = added.err().map(|e| e.to_string());
        Ok(tkey)
    }

    /// The guards held for pod `uid`, as a word would name them; None when none is held.
    fn held_word(&self, uid: &str) -> Option<BoundPod> {
        let held = self.held.lock().expect("guards lock");
        let mine: Vec<(&HoldingKey, &super::Held)> =
            held.iter().filter(|(k, _)| k.pod_uid == uid).collect();
        let (first, _) = mine.first()?;
        Some(BoundPod {
            uid: uid.to_owned(),
            namespace: first.guard_namespace.clone(),
            name: String::new(),
            guards: mine.iter().map(|(k, _)| k.guard_name.clone()).collect(),
            start_on_failure: mine
                .iter()
                .all(|(_, h)| h.policy.start_on_gate_failure == Some(true)),
        })
    }

    /// Waits until every target in `keys` enforces.
    fn enforced(&self, keys: &[String], deadline: Instant) -> Result<(), String> {
        let mut pause = Duration::from_millis(1);
        loop {
            let states = self.agent.keyed_states();
            let mut waiting = None;
            for k in keys {
                // A failed target is placed again: failed only at the deadline.
                match states.get(k) {
                    Some(s) if s.phase == Phase::Enforcing => {}
                    Some(s) => {
                        let why = s.reason.as_deref().unwrap_or(s.phase.as_str());
                        waiting = Some(format!("{k}: {why}"));
                    }
                    None => waiting = Some(format!("{k}: not placed")),
                }
            }
            let Some(waiting) = waiting else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "not enforced within {:?}: {waiting}",
                    self.gate.within
                ));
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(16));
        }
    }

    /// Counts and reports the containers `janus-agent hook` let start because it could not
    /// reach this agent, and forgets their records.
    pub fn count_ungated(&self) {
        let Ok(dir) = std::fs::read_dir(&self.gate.ungated_dir) else {
            return;
        };
        // A record being written is a dotfile until it is whole.
        let records = dir
            .flatten()
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."));
        for entry in records {
            let path = entry.path();
            let record = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Ungated>(&b).ok());
            match record {
                Some(u) => {
                    tracing::warn!(pod = %u.request.pod_uid, container = %u.request.container_id, reason = %u.reason, at = u.at, "start gate: a container started unguarded: the hook could not reach this agent");
                }
                None => {
                    tracing::warn!(path = %path.display(), "start gate: an unreadable record of a container started unguarded");
                }
            }
            self.agent
                .metrics()
                .gate
                .with_label_values(&["started_unguarded"])
                .inc();
            let _ = std::fs::remove_file(&path);
        }
    }
}

impl Answer {
    fn started(reason: &str) -> Answer {
        Answer {
            start: true,
            reason: reason.to_owned(),
        }
    }
}

/// A container the start gate named: the runtime's init, and the directory that becomes
/// its root.
#[derive(Debug, Clone)]
pub(super) struct Gated {
    pub(super) process: Arc<PinnedProcess>,
    pub(super) rootfs: PathBuf,
}

/// Where `init` is guarded: the root the gate named while the runtime has not entered it
/// yet, else its own.
pub(super) fn root_of(gated: Option<&Gated>, init: Arc<PinnedProcess>) -> TargetRoot {
    let rootfs = gated
        .filter(|g| g.process.process() == init.process() && !init.rooted())
        .map(|g| g.rootfs.clone());
    TargetRoot::container(init, rootfs)
}

/// The gate's settings, as [`Guards`] keeps them.
pub(super) struct Gate {
    pub(super) within: Duration,
    pub(super) without_word: hook::Unreachable,
    pub(super) ungated_dir: PathBuf,
    pub(super) word_file: PathBuf,
}

impl From<&GateArgs> for Gate {
    fn from(a: &GateArgs) -> Gate {
        Gate {
            within: Duration::from_secs(a.gate_within_secs),
            without_word: a.gate_without_word,
            ungated_dir: a.ungated_dir.clone(),
            word_file: a.gate_word_file.clone(),
        }
    }
}

/// Serves the gate on `path` until the process exits: one thread per hook, each answered
/// on its own.
pub fn serve(path: &Path, guards: Arc<Guards>) -> anyhow::Result<()> {
    let listener = bind(path)?;
    tracing::info!(socket = %path.display(), "serving the start gate");
    std::thread::Builder::new()
        .name("gate".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let guards = guards.clone();
                let spawned = std::thread::Builder::new()
                    .name("gate-hook".into())
                    .spawn(move || answer(stream, &guards));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "start gate: no thread for a hook; it is not answered");
                }
            }
        })
        .context("starting the start gate's thread")?;
    Ok(())
}

/// Binds `path`, root only; a socket left by an agent that is gone is replaced, one another
/// agent still answers on is not.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if UnixStream::connect(path).is_ok() {
        anyhow::bail!("{}: another agent serves the start gate", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} root's only", path.display()))?;
    Ok(listener)
}

fn answer(stream: UnixStream, guards: &Guards) {
    let mut answer = match read_request(&stream) {
        Ok((req, named)) => guards.admit(&req, named),
        Err(reason) => {
            tracing::warn!(%reason, "start gate: a request refused");
            Answer {
                start: false,
                reason,
            }
        }
    };
    // The runtime shows it in an error message; the hook reads a bounded line.
    if let Some((cut, _)) = answer.reason.char_indices().nth(MAX_REASON) {
        answer.reason.truncate(cut);
        answer.reason.push('…');
    }
    let mut line = serde_json::to_vec(&answer).expect("an answer serializes");
    line.push(b'\n');
    if let Err(e) = (&stream).write_all(&line) {
        tracing::warn!(error = %e, "start gate: the hook went away before its answer");
    }
}

/// The request, and the `/proc` directory of the process it names.
fn read_request(stream: &UnixStream) -> Result<(Request, ProcDir), String> {
    let peer = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("peer credentials: {e}"))?;
    if peer.uid() != 0 {
        return Err(format!("uid {}: only root may ask the gate", peer.uid()));
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.take(hook::MAX_LINE))
        .read_line(&mut line)
        .map_err(|e| format!("reading the request: {e}"))?;
    let req: Request = serde_json::from_str(&line).map_err(|e| format!("the request: {e}"))?;
    if req.pid <= 0 {
        return Err(format!("pid: {} is no process", req.pid));
    }
    let parent_dirs = req
        .rootfs
        .components()
        .any(|c| c == std::path::Component::ParentDir);
    if !req.rootfs.is_absolute() || parent_dirs {
        return Err(format!(
            "rootfs: {} is not an absolute path without `..`",
            req.rootfs.display()
        ));
    }
    // The runtime runs its hooks beside the container's init, both its children, in its
    // own root: a process that asks for another's container (one of a running container,
    // or a root in a pod with the socket mounted) is neither. Both are read through their
    // `/proc` directories, never by PID again: a PID given to another process later is
    // not what was checked.
    let hook = peer_dir(stream, peer.pid())?;
    let named = ProcDir::open("/proc", req.pid).map_err(|e| format!("pid {}: {e}", req.pid))?;
    let parents = (hook.stat(), named.stat());
    let siblings = matches!(parents, (Ok((a, _)), Ok((b, _))) if a == b)
        && hook.root().is_some()
        && hook.root() == named.root();
    if !siblings {
        return Err(format!(
            "pid {}: not a process its runtime set up beside this hook (pid {})",
            req.pid,
            peer.pid()
        ));
    }
    Ok((req, named))
}

/// The connected hook's `/proc` directory: opened by the PID its credentials carry, while
/// the pidfd the kernel took of it at connect time says it runs. While it runs its PID is
/// no one else's, so the directory is the hook's.
fn peer_dir(stream: &UnixStream, pid: i32) -> Result<ProcDir, String> {
    use nix::errno::Errno;
    let gone = || format!("hook pid {pid}: exited before its request was read");
    let pidfd = match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd) {
        Ok(fd) => Some(fd),
        // Before Linux 6.5 there is no such pidfd: the PID alone, as the kernel gave it.
        Err(Errno::ENOPROTOOPT) => None,
        Err(Errno::ESRCH | Errno::EINVAL) => return Err(gone()),
        Err(e) => return Err(format!("hook pid {pid}: its pidfd: {e}")),
    };
    let runs = || pidfd.as_ref().is_none_or(|fd| pin::runs(fd.as_fd()));
    if !runs() {
        return Err(gone());
    }
    let dir = ProcDir::open("/proc", pid).map_err(|e| format!("hook pid {pid}: {e}"))?;
    if !runs() {
        return Err(gone());
    }
    Ok(dir)
}
