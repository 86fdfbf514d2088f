//! Real containers through containerd's `ctr`, from a root directory of ours: no image pull.
//! containerd must be running (scripts/setup-containerd.sh starts it).

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::target::{Access, Root};

/// A running container, killed and removed on drop.
pub struct Container {
    pub id: String,
    pid: i32,
}

impl Container {
    /// Runs `argv` in a new container whose root file system is `root`, in `cgroup` (a path
    /// such as the kubelet gives a pod's container) or containerd's default one.
    pub fn run(root: &Root, id: &str, cgroup: Option<&str>, argv: &[&str]) -> Result<Container> {
        for dir in ["/proc", "/dev", "/sys", "/tmp"] {
            root.mkdir(dir)?;
        }
        ctr(&["version"])
            .context("containerd is not answering: run scripts/setup-containerd.sh")?;
        // A container left by an earlier, interrupted run would make `ctr run` fail.
        remove(id);
        let rootfs = root.dir().to_str().context("root path is not UTF-8")?;
        let mut args = vec!["run", "-d"];
        if let Some(cgroup) = cgroup {
            args.extend(["--cgroup", cgroup]);
        }
        // `--rootfs` is a switch: the directory is the first argument.
        args.extend(["--rootfs", rootfs, id]);
        args.extend_from_slice(argv);
        ctr(&args)?;
        let mut container = Container {
            id: id.to_owned(),
            pid: 0,
        };
        let listing = ctr(&["task", "ls"])?;
        let pid = listing
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next()? == id).then(|| f.next()?.parse().ok())?
            })
            .next()
            .with_context(|| format!("no task {id} in:\n{listing}"))?;
        container.pid = pid;
        Ok(container)
    }

    /// The container's init process, as the host sees it.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Runs `argv` in the container with `ctr task exec`, as `kubectl exec` would.
    pub fn exec(&self, argv: &[&str]) -> Result<Access> {
        let exec_id = format!(
            "exec-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = Command::new("ctr")
            .args(["task", "exec", "--exec-id", &exec_id, &self.id])
            .args(argv)
            .output()
            .context("running ctr task exec")?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(if text.contains("Operation not permitted") {
            Access::Denied
        } else if out.status.success() {
            Access::Ok(text.trim_end().to_owned())
        } else {
            Access::Failed(text)
        })
    }
}

/// Runs `argv` in a new container as [`Container::run`] does, waits for it to end and removes
/// it.
pub fn run_to_end(root: &Root, id: &str, cgroup: &str, argv: &[&str]) -> Result<()> {
    for dir in ["/proc", "/dev", "/sys", "/tmp"] {
        root.mkdir(dir)?;
    }
    remove(id);
    let rootfs = root.dir().to_str().context("root path is not UTF-8")?;
    let mut args = vec!["run", "--rm", "--cgroup", cgroup, "--rootfs", rootfs, id];
    args.extend_from_slice(argv);
    ctr(&args).map(drop)
}

/// Runs container `id` to its end from the complete OCI spec at `spec` (`ctr run --config`,
/// as the CRI plugin hands containerd a spec made from its base runtime spec), and removes
/// it: whether it succeeded, and what it and containerd printed.
pub fn run_spec(id: &str, spec: &std::path::Path) -> Result<(bool, String)> {
    remove(id);
    let spec = spec.to_str().context("spec path is not UTF-8")?;
    let out = Command::new("ctr")
        .args(["run", "--rm", "--config", spec, id])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running ctr run")?;
    remove(id);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// Pod containers as containerd runs them on a node wired for the start gate: from the base
/// spec `deploy/runtime/containerd/make-base-spec.sh` makes, completed as the CRI plugin
/// completes it (root, process, the kubelet's cgroup path, the pod's annotations).
pub struct GatedSpec {
    spec: serde_json::Value,
    path: std::path::PathBuf,
}

impl GatedSpec {
    /// In `dir`, the hook being `agent` asking at `socket`, each container running `argv`
    /// in `root`.
    pub fn new(
        dir: &std::path::Path,
        agent: &std::path::Path,
        socket: &std::path::Path,
        root: &Root,
        argv: &[&str],
    ) -> Result<GatedSpec> {
        // The runtime runs the hook from its own working directory.
        let agent = &agent
            .canonicalize()
            .with_context(|| format!("{}", agent.display()))?;
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/runtime/containerd/make-base-spec.sh");
        let base = dir.join("base-spec.json");
        let made = Command::new("bash")
            .arg(&script)
            .arg(&base)
            .arg(agent)
            .stdout(std::process::Stdio::null())
            .output()
            .context("running make-base-spec.sh")?;
        if !made.status.success() {
            bail!(
                "make-base-spec.sh: {}",
                String::from_utf8_lossy(&made.stderr)
            );
        }
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&base)?)?;
        let hook = &mut spec["hooks"]["createRuntime"][0];
        if hook["path"] != agent.to_str().context("agent path is not UTF-8")? {
            bail!("the base spec's hook is not {}: {hook}", agent.display());
        }
        let args = hook["args"].as_array_mut().context("the hook's args")?;
        args.extend([
            "--socket".into(),
            socket.to_str().context("socket path")?.into(),
        ]);
        for d in ["/proc", "/dev", "/sys", "/tmp"] {
            root.mkdir(d)?;
        }
        spec["root"] = serde_json::json!({ "path": root.dir(), "readonly": false });
        spec["process"]["args"] = serde_json::json!(argv);
        Ok(GatedSpec {
            spec,
            path: dir.join("spec.json"),
        })
    }

    /// Runs container `id` of pod `pod_uid` (namespace `default`) to its end: whether it
    /// succeeded, and what it and containerd printed.
    pub fn run(&mut self, id: &str, pod_uid: &str) -> Result<(bool, String)> {
        self.spec["linux"]["cgroupsPath"] =
            format!("/kubepods/besteffort/pod{pod_uid}/{id}").into();
        self.spec["annotations"] = serde_json::json!({
            "io.kubernetes.cri.sandbox-uid": pod_uid,
            "io.kubernetes.cri.sandbox-namespace": "default",
        });
        std::fs::write(&self.path, serde_json::to_vec(&self.spec)?)?;
        run_spec(id, &self.path)
    }
}

static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for Container {
    fn drop(&mut self) {
        remove(&self.id);
    }
}

fn remove(id: &str) {
    let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
    // The task must be stopped before it can be deleted; `rm -f` waits for that.
    let _ = ctr(&["task", "rm", "-f", id]);
    let _ = ctr(&["container", "rm", id]);
}

fn ctr(args: &[&str]) -> Result<String> {
    let out = Command::new("ctr")
        .args(args)
        .output()
        .with_context(|| format!("running ctr {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
