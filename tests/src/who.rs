//! Who tried: a known process (its own uid and gid, alive while the agent writes the
//! record) is refused a file, and the decision names it in the guard's text format and in
//! `--decision-format json`, under whichever backend the runner tests.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::agent::{Agent, AgentConfig};
use crate::scenarios::{guard_yaml, populate, Runner};
use crate::target::{check, Root, Target, BUSYBOX};

const UID: u32 = 1234;
const GID: u32 = 4321;
/// A name that is not UTF-8, below the denied directory.
const ODD: &[u8] = b"/data/sub/odd\xff\nname";

impl Runner<'_> {
    /// Both formats, each with its own agent on a fresh target.
    pub fn who_tried(&self) -> Result<()> {
        self.who_tried_in("text")
            .context("--decision-format text")?;
        self.who_tried_in("json").context("--decision-format json")
    }

    fn who_tried_in(&self, format: &str) -> Result<()> {
        let name = format!("who-{format}");
        let root = Root::new(self.workdir, &name)?;
        populate(&root)?;
        root.write(ODD, b"odd\n")?;
        let target = Target::start(&root)?;
        let guard = guard_yaml(
            &name,
            "  - deny: [/data/secret, /data/sub]\n    events: [open]\n    \
             tags: {team: payments, tier: db}\n",
        )
        .replace(
            "\nspec:\n",
            "\nspec:\n  logFormat: \"{response} pid={pid} ppid={ppid} uid={uid} gid={gid} \
             comm={comm} exe={exe} container={container} '{path}' {tags}\"\n",
        );
        let mut args = self.agent_args.to_vec();
        args.extend(["--decision-format", format]);
        let agent = Agent::start(
            &AgentConfig {
                bin: self.agent_bin,
                guard: &guard,
                pids: &[target.pid()],
                pod: "who-pod",
                node: "who-node",
                extra: &args,
            },
            &self.workdir.join(format!("agent-{name}")),
        )?;
        let opener = Opener::start(&target)?;
        let pid = opener.pid();
        let me = std::process::id() as i32;
        if format == "text" {
            let want = format!(
                "DENY pid={pid} ppid={me} uid={UID} gid={GID} comm=busybox exe={BUSYBOX} \
                 container=? '/data/secret' team=payments,tier=db"
            );
            agent.wait_line(&format!("the line {want:?}"), |l| l == want)?;
        } else {
            let record = |path: &str| {
                let path = path.to_owned();
                move |l: &str| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .filter(|r| r["path"] == path.as_str())
                }
            };
            let line = agent.wait_line("a record of /data/secret", |l| {
                record("/data/secret")(l).is_some()
            })?;
            let r: Value = serde_json::from_str(&line)?;
            let time = r["time"].as_str().unwrap_or_default();
            ensure!(
                time.len() >= 20 && time.as_bytes()[10] == b'T' && time.ends_with('Z'),
                "time {time:?} is not RFC 3339 in UTC"
            );
            let want = json!({
                "guard": name, "namespace": "tests", "pod": "who-pod", "node": "who-node",
                "container": null, "verdict": "deny", "refused": true, "mode": "enforce",
                "event": "open", "kernel_event": "OPEN_PERM", "ftype": "file",
                "path": "/data/secret", "name": null, "subject": 0,
                "tags": {"team": "payments", "tier": "db"},
                "process": {"pid": pid, "ppid": me, "uid": UID, "gid": GID,
                            "comm": "busybox", "exe": BUSYBOX},
            });
            let mut got = r.clone();
            got.as_object_mut().map(|o| o.remove("time"));
            ensure!(got == want, "record {got}\nwanted {want}");
            // A name that is not UTF-8 comes back exactly from its base64 field.
            opener.open(ODD)?;
            let odd = String::from_utf8_lossy(ODD).into_owned();
            let line =
                agent.wait_line("a record of the odd name", |l| record(&odd)(l).is_some())?;
            let r: Value = serde_json::from_str(&line)?;
            let b64 = r["path_base64"].as_str().unwrap_or_default();
            ensure!(b64 == base64(ODD), "path_base64 {b64:?} of {ODD:?}");
        }
        // The target's state counts the denial and names who made it.
        let (_, body) = agent.get("/state")?;
        let state: Value = serde_json::from_str(&body)?;
        let t = state
            .as_array()
            .and_then(|a| a.first())
            .with_context(|| format!("no target in /state: {body}"))?;
        ensure!(
            t["denials"].as_u64().unwrap_or(0) >= 1 && t["last_denial"]["pid"] == pid,
            "/state does not show the denial by {pid}: {t}"
        );
        ensure!(
            t["last_denial"]["by"] == BUSYBOX,
            "/state names {} for the last denial",
            t["last_denial"]["by"]
        );
        drop(opener);
        let status = agent.stop()?;
        if !status.success() {
            bail!("the agent exited with {status}");
        }
        target.kill()
    }
}

/// A shell in the target, as uid 1234 and gid 4321, that opens what it is told to and
/// stays alive: the agent can read everything about it.
struct Opener(Child);

impl Opener {
    fn start(target: &Target) -> Result<Opener> {
        let mut cmd = target.command(&[
            BUSYBOX,
            "sh",
            "-c",
            "read x < /data/secret; while read -r p; do read y < \"$(printf \"$p\")\"; done",
        ])?;
        // After entering the target (the command's own pre_exec), which needs root.
        // SAFETY: only async-signal-safe system calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(GID))?;
                check(libc::setuid(UID))
            });
        }
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the opener")?;
        Ok(Opener(child))
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Has the shell open `path`, given as octal escapes so that any byte gets through.
    fn open(&self, path: &[u8]) -> Result<()> {
        let escaped: String = path.iter().map(|b| format!("\\{b:03o}")).collect();
        let mut stdin = self.0.stdin.as_ref().context("the opener's stdin")?;
        writeln!(stdin, "{escaped}")?;
        Ok(())
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
