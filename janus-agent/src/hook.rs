//! `janus-agent hook`: the start gate, an OCI runtime hook (`createRuntime`). The runtime
//! runs it once the container's namespaces, cgroup and mounts exist and before it pivots
//! into the container's root, and waits for it: a container's first instruction comes
//! only after the node's agent said every guard of its pod is enforced on it.
//!
//! The hook reads the container's state on stdin, finds its pod by the CRI's annotations
//! and asks the agent over a unix socket only root can use. A container of no pod (the
//! runtime's own, `ctr run`) is not gated.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Where `janus-agent serve` answers the hook.
pub const SOCKET: &str = "/run/janus/agent.sock";
/// Where the hook leaves a record of each container it let start without the agent's word,
/// for the agent to count and report.
pub const UNGATED: &str = "/run/janus/ungated";

/// The runtime that runs the hook, and so which annotations name the pod: each copies the
/// pod's own annotations too, so only its own keys are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Containerd,
    CriO,
}

impl Runtime {
    /// (pod UID, pod namespace, container ID prefix).
    fn annotations(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Runtime::Containerd => (
                "io.kubernetes.cri.sandbox-uid",
                "io.kubernetes.cri.sandbox-namespace",
                "containerd",
            ),
            Runtime::CriO => (
                "io.kubernetes.pod.uid",
                "io.kubernetes.pod.namespace",
                "cri-o",
            ),
        }
    }
}

/// The most a request or an answer may be.
pub const MAX_LINE: u64 = 64 * 1024;

/// What the hook asks the agent: guard this container before it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub pod_uid: String,
    pub pod_namespace: String,
    /// As the kubelet reports it: "containerd://<id>", "cri-o://<id>".
    pub container_id: String,
    /// The container's init process, still in the runtime's root.
    pub pid: i32,
    /// The directory that becomes the container's root, in the init's mount namespace.
    pub rootfs: PathBuf,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Whether the container may run.
    pub start: bool,
    /// Why, when it runs unguarded or may not run.
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Unreachable {
    /// The container starts; the hook leaves a record the agent counts and reports.
    Start,
    /// The container does not start.
    Refuse,
}

#[derive(Debug, clap::Args)]
pub struct HookArgs {
    /// The runtime that runs the hook (deploy/runtime's configurations say).
    #[arg(long, value_enum, default_value_t = Runtime::Containerd)]
    pub runtime: Runtime,
    /// The agent's socket.
    #[arg(long, default_value = SOCKET)]
    pub socket: PathBuf,
    /// How long to wait for the agent's answer; the agent answers within its own
    /// `--gate-within`.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
    /// What becomes of a pod's container when the agent cannot be reached (not running
    /// yet, as while its own DaemonSet pod starts): it starts by default, and is recorded.
    /// An agent reached that gives no answer (it stopped meanwhile, or took longer than
    /// `--timeout-secs`) refuses it, whatever this says.
    #[arg(long, value_enum, default_value_t = Unreachable::Start)]
    pub unreachable: Unreachable,
    /// Where the records of containers started without the agent go.
    #[arg(long, default_value = UNGATED)]
    pub ungated_dir: PathBuf,
}

/// The container state the runtime writes on the hook's stdin (OCI runtime spec, "State").
#[derive(Debug, Deserialize)]
struct State {
    id: String,
    pid: i32,
    bundle: PathBuf,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Config {
    root: ConfigRoot,
}

#[derive(Debug, Deserialize)]
struct ConfigRoot {
    path: PathBuf,
}

/// The request for the container `state` describes; None when it is no pod's.
fn request(state: &State, runtime: Runtime) -> anyhow::Result<Option<Request>> {
    let (uid, ns, prefix) = runtime.annotations();
    let Some(uid) = state.annotations.get(uid) else {
        return Ok(None);
    };
    let config = state.bundle.join("config.json");
    let text = std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
    let config: Config = serde_json::from_slice(&text)
        .with_context(|| format!("{}: root.path", config.display()))?;
    Ok(Some(Request {
        pod_uid: uid.clone(),
        pod_namespace: state.annotations.get(ns).cloned().unwrap_or_default(),
        container_id: format!("{prefix}://{}", state.id),
        pid: state.pid,
        rootfs: state.bundle.join(config.root.path),
    }))
}

/// Asks the agent at `socket`.
pub fn ask(socket: &Path, req: &Request, timeout: Duration) -> Result<Answer, AskError> {
    let stream = UnixStream::connect(socket).map_err(AskError::Connect)?;
    exchange(stream, req, timeout).map_err(AskError::Answer)
}

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("no answer: {0}")]
    Answer(#[source] std::io::Error),
}

fn exchange(mut stream: UnixStream, req: &Request, timeout: Duration) -> std::io::Result<Answer> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_LINE)).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

/// Runs the hook: Ok when the container may start.
pub fn run(args: HookArgs) -> anyhow::Result<()> {
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(MAX_LINE * 16)
        .read_to_end(&mut stdin)
        .context("reading the container state on stdin")?;
    let state: State = serde_json::from_slice(&stdin).context("the container state on stdin")?;
    let Some(req) = request(&state, args.runtime)? else {
        return Ok(());
    };
    let timeout = Duration::from_secs(args.timeout_secs);
    let why = match ask(&args.socket, &req, timeout) {
        Ok(answer) if answer.start => {
            if !answer.reason.is_empty() {
                eprintln!(
                    "janus-agent: container {} starts unguarded: {}",
                    state.id, answer.reason
                );
            }
            return Ok(());
        }
        Ok(answer) => bail!("container {} may not start: {}", state.id, answer.reason),
        Err(e @ AskError::Answer(_)) => bail!(
            "container {} may not start: the agent at {}: {e}",
            state.id,
            args.socket.display()
        ),
        Err(e) => format!("the agent at {}: {e}", args.socket.display()),
    };
    match args.unreachable {
        Unreachable::Refuse => bail!("container {} may not start: {why}", state.id),
        Unreachable::Start => {
            eprintln!(
                "janus-agent: container {} starts unguarded: {why}",
                state.id
            );
            record(&args.ungated_dir, &req, &why);
            Ok(())
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The node's directory the runtime's hook configuration names (deploy/runtime).
    #[arg(long, default_value = "/opt/janus/bin")]
    pub to: PathBuf,
}

/// Copies this binary to `args.to` for the runtime to run as its hook: written beside and
/// renamed over the old one, so that a hook running the old binary never sees half a file.
pub fn install(args: InstallArgs) -> anyhow::Result<()> {
    let target = args.to.join("janus-agent");
    let partial = args.to.join(".janus-agent.partial");
    std::fs::create_dir_all(&args.to).with_context(|| format!("creating {}", args.to.display()))?;
    std::fs::copy("/proc/self/exe", &partial)
        .with_context(|| format!("copying this binary to {}", partial.display()))?;
    let file = std::fs::File::open(&partial)?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    file.sync_all()?;
    std::fs::rename(&partial, &target)
        .with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
    eprintln!("janus-agent: the start gate's hook is {}", target.display());
    Ok(())
}

/// A container that started without the agent's word, as the hook records it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ungated {
    #[serde(flatten)]
    pub request: Request,
    pub reason: String,
    /// Seconds since the epoch.
    pub at: u64,
}

fn record(dir: &Path, req: &Request, why: &str) {
    let at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let entry = Ungated {
        request: req.clone(),
        reason: why.to_owned(),
        at,
    };
    let name = req.container_id.replace("://", "-");
    // Written whole, then named: the agent never reads half a record.
    let partial = dir.join(format!(".{name}.partial"));
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::write(&partial, serde_json::to_vec(&entry)?)?;
        std::fs::rename(&partial, dir.join(&name))
    });
    if let Err(e) = written {
        eprintln!(
            "janus-agent: cannot record the unguarded start in {}: {e}",
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(annotations: &[(&str, &str)], bundle: &Path) -> State {
        State {
            id: "abc".into(),
            pid: 42,
            bundle: bundle.into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_pods_container_is_named_by_its_runtime_and_rooted_in_its_bundle() {
        let bundle = std::env::temp_dir().join(format!("janus-hook-{}", std::process::id()));
        std::fs::create_dir_all(&bundle).unwrap();
        std::fs::write(bundle.join("config.json"), r#"{"root":{"path":"rootfs"}}"#).unwrap();
        let containerd = [
            ("io.kubernetes.cri.sandbox-uid", "u-1"),
            ("io.kubernetes.cri.sandbox-namespace", "team"),
        ];
        let req = request(&state(&containerd, &bundle), Runtime::Containerd)
            .unwrap()
            .unwrap();
        assert_eq!(req.container_id, "containerd://abc");
        assert_eq!(
            (req.pod_uid.as_str(), req.pod_namespace.as_str()),
            ("u-1", "team")
        );
        assert_eq!(req.rootfs, bundle.join("rootfs"));
        std::fs::write(bundle.join("config.json"), r#"{"root":{"path":"/merged"}}"#).unwrap();
        let crio = [("io.kubernetes.pod.uid", "u-2")];
        let req = request(&state(&crio, &bundle), Runtime::CriO)
            .unwrap()
            .unwrap();
        assert_eq!(req.container_id, "cri-o://abc");
        assert_eq!(req.rootfs, Path::new("/merged"));
        // Only the runtime's own keys name a pod: a pod's author may set the other's.
        let theirs = request(&state(&crio, &bundle), Runtime::Containerd).unwrap();
        assert!(theirs.is_none());
        // No pod: nothing to gate, and the bundle is not read.
        let none = state(&[], Path::new("/nonexistent"));
        assert!(request(&none, Runtime::Containerd).unwrap().is_none());
        std::fs::remove_dir_all(&bundle).unwrap();
    }
}
