//! Containers run by runc itself from a bundle of ours, as a CRI runtime runs a pod's:
//! the kubelet's cgroup path, the CRI's annotations, and OCI hooks.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::target::Root;

/// A bundle: `config.json` beside a root file system, for one container ID.
pub struct Bundle {
    dir: PathBuf,
    id: String,
}

/// An OCI hook: an absolute path and its argv.
pub struct Hook<'a> {
    pub path: &'a Path,
    pub args: &'a [&'a str],
}

/// What runc reported of a container run to its end.
pub struct Ran {
    pub success: bool,
    pub output: String,
}

impl Bundle {
    /// A bundle in `dir` for container `id` of pod `pod_uid` (namespace `default`), in the
    /// cgroup the kubelet's cgroupfs driver gives it, running `argv` in `root`, with
    /// `create_runtime` as its createRuntime hook.
    pub fn new(
        dir: &Path,
        root: &Root,
        id: &str,
        pod_uid: &str,
        argv: &[&str],
        create_runtime: Option<Hook<'_>>,
    ) -> Result<Bundle> {
        for d in ["/proc", "/dev", "/sys", "/tmp"] {
            root.mkdir(d)?;
        }
        let dir = dir.join(id);
        std::fs::create_dir_all(&dir)?;
        let out = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&dir)
            .output()
            .context("running runc spec")?;
        if !out.status.success() && !dir.join("config.json").exists() {
            bail!("runc spec: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
        config["root"] = json!({ "path": root.dir(), "readonly": false });
        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(argv);
        config["linux"]["cgroupsPath"] = json!(format!("/kubepods/besteffort/pod{pod_uid}/{id}"));
        config["annotations"] = json!({
            "io.kubernetes.cri.sandbox-uid": pod_uid,
            "io.kubernetes.cri.sandbox-namespace": "default",
            "io.kubernetes.cri.container-type": "container",
        });
        if let Some(hook) = create_runtime {
            config["hooks"] = json!({
                "createRuntime": [{ "path": hook.path, "args": hook.args }],
            });
        }
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
        Ok(Bundle {
            dir,
            id: id.to_owned(),
        })
    }

    /// Runs the container to its end with `runc run`, and removes it.
    pub fn run(&self) -> Result<Ran> {
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.id])
            .output();
        let out = Command::new("runc")
            .args(["run", "--bundle"])
            .arg(&self.dir)
            .arg(&self.id)
            .stdin(Stdio::null())
            .output()
            .context("running runc run")?;
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.id])
            .output();
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(Ran {
            success: out.status.success(),
            output,
        })
    }
}
