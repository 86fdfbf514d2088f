//! `janus-agent guard` as a real process: started on targets, read through its decision
//! lines and its HTTP endpoints, stopped with a signal.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait;

/// How long an agent gets to start enforcing, or to stop. Loading the BPF programs takes
/// about 45 s on 6.1 under the VM tests' emulated CPU, more when the host is busy (two VMs
/// share its two cores in CI); only a failing start waits this long.
pub const STARTUP: Duration = Duration::from_secs(180);

/// A running agent. Its stdout (decision lines) and stderr go to files in `dir`.
pub struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    pub addr: SocketAddr,
}

/// How to start one.
pub struct AgentConfig<'a> {
    pub bin: &'a Path,
    /// JanusGuard YAML.
    pub guard: &'a str,
    pub pids: &'a [i32],
    pub pod: &'a str,
    pub node: &'a str,
    /// Extra arguments after `guard ...` (e.g. `--backend bpf`).
    pub extra: &'a [&'a str],
}

impl Agent {
    /// Starts the agent and waits until `/readyz` says every subject is enforced.
    pub fn start(cfg: &AgentConfig<'_>, dir: &Path) -> Result<Agent> {
        let agent = Agent::spawn(cfg, dir)?;
        wait::until("the agent to report ready on /readyz", STARTUP, || {
            agent
                .get("/readyz")
                .ok()
                .filter(|(status, _)| *status == 200)
        })
        .with_context(|| format!("agent stderr:\n{}", agent.stderr()))?;
        Ok(agent)
    }

    /// Starts the agent without waiting for it.
    pub fn spawn(cfg: &AgentConfig<'_>, dir: &Path) -> Result<Agent> {
        fs::create_dir_all(dir)?;
        let guard_file = dir.join("guard.yaml");
        fs::write(&guard_file, cfg.guard)?;
        let addr = free_addr()?;
        let mut cmd = Command::new(cfg.bin);
        cmd.arg("guard").arg("--file").arg(&guard_file);
        for pid in cfg.pids {
            cmd.arg("--pid").arg(pid.to_string());
        }
        cmd.args(["--pod", cfg.pod, "--node", cfg.node])
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .args(cfg.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("stdout"))?)
            .stderr(fs::File::create(dir.join("stderr"))?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", cfg.bin.display()))?;
        Ok(Agent {
            child: Some(child),
            dir: dir.to_owned(),
            addr,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// What the agent's descriptors name now (`/proc/PID/fd`'s links): its files, and its
    /// kernel objects (`anon_inode:[fanotify]`, `anon_inode:inotify`).
    pub fn fd_links(&self) -> Result<Vec<PathBuf>> {
        let dir = format!("/proc/{}/fd", self.pid());
        let fds = fs::read_dir(&dir).with_context(|| format!("listing {dir}"))?;
        // A descriptor closed between the listing and its read is not held now.
        Ok(fds
            .flatten()
            .filter_map(|fd| fs::read_link(fd.path()).ok())
            .collect())
    }

    /// The decision lines written so far.
    pub fn lines(&self) -> Vec<String> {
        decision_lines(&self.dir)
    }

    pub fn stderr(&self) -> String {
        fs::read(self.dir.join("stderr"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until a decision line satisfies `pred`, and returns it.
    pub fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
        wait::until(what, Duration::from_secs(10), || {
            self.lines().into_iter().find(|l| pred(l))
        })
        .with_context(|| format!("decision lines so far:\n{}", self.lines().join("\n")))
    }

    /// Waits until `cond(stdout, stderr)` holds, failing at once if the agent exits.
    pub fn wait_for(&mut self, what: &str, cond: impl Fn(&str, &str) -> bool) -> Result<()> {
        wait::until(what, STARTUP, || {
            let (out, err) = (self.lines().join("\n"), self.stderr());
            if cond(&out, &err) {
                return Some(Ok(()));
            }
            let exited = self.child.as_mut()?.try_wait().ok().flatten()?;
            Some(Err(anyhow::anyhow!(
                "the agent exited ({exited}) before {what}; stderr:\n{err}"
            )))
        })
        .with_context(|| format!("agent stderr:\n{}", self.stderr()))?
    }

    /// Waits for a decision line that is `line` (trailing blanks aside).
    pub fn expect_line(&mut self, line: &str) -> Result<()> {
        self.wait_for(&format!("the line {line:?}"), |out, _| {
            out.lines().any(|l| l.trim_end() == line.trim_end())
        })
    }

    /// Sends `sig` to the agent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)?;
        Ok(())
    }

    /// Stops the agent, which must exit cleanly, and returns its decision lines.
    pub fn finish(self) -> Result<String> {
        let dir = self.dir.clone();
        let status = self.stop()?;
        if !status.success() {
            bail!(
                "the agent exited with {status}: {}",
                fs::read_to_string(dir.join("stderr")).unwrap_or_default()
            );
        }
        Ok(decision_lines(&dir).join("\n"))
    }

    /// GET `path` on the agent's HTTP address: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.addr, path)
    }

    /// The fewest passes any target has made over its guarded paths (`/state`).
    pub fn passes(&self) -> Result<u64> {
        let (_, body) = self.get("/state")?;
        let counts = body
            .match_indices("\"passes\":")
            .map(|(i, key)| {
                let digits: String = body[i + key.len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse::<u64>().context("a pass count")
            })
            .collect::<Result<Vec<u64>>>()?;
        match counts.into_iter().min() {
            Some(n) => Ok(n),
            None => bail!("no target in /state: {body}"),
        }
    }

    /// The value of the sample whose name and labels start with `series` (for example
    /// `janus_decisions_total{backend="fanotify",event="OPEN_PERM"`), summed over matches.
    pub fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = self.get("/metrics")?;
        Ok(sum_series(&body, series))
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        self.wait_exit()
    }

    /// Waits for the agent to exit (by itself: a bad guard file, say).
    pub fn wait_exit(mut self) -> Result<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let status = wait::until("the agent to exit", STARTUP, || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The decision lines an agent started in `dir` wrote, also once it has exited.
pub fn decision_lines(dir: &Path) -> Vec<String> {
    fs::read(dir.join("stdout"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A free loopback address for a process about to listen: bound, read and released.
/// The port is taken below the ephemeral range, so no connect (waiting for the listener,
/// say) can be handed the same port as its source and meet itself (TCP simultaneous open),
/// holding the port the listener is about to bind.
pub fn free_addr() -> Result<SocketAddr> {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .context("reading ip_local_port_range")?;
    let span = u32::from(low.saturating_sub(10_000)).max(1);
    // Each try of this process takes the next port, so two threads never pick the same one
    // between its release and their listeners' binds; each process starts elsewhere.
    static TRIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    (0..span)
        .map(|_| {
            let i = TRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            10_000 + (start.wrapping_add(i) % span) as u16
        })
        .find_map(|port| TcpListener::bind(("127.0.0.1", port)).ok())
        .context("no free port below the ephemeral range")?
        .local_addr()
        .map_err(Into::into)
}

/// `janus-agent serve` as a real process, killed on drop.
pub struct Serve(Child);

impl Serve {
    /// Starts `bin serve --listen ADDR --node node-a` with `args` after them, its output in
    /// `dir/NAME.out` and `dir/NAME.err`, and waits until it listens.
    pub fn start<S: AsRef<std::ffi::OsStr>>(
        bin: &Path,
        addr: SocketAddr,
        args: &[S],
        dir: &Path,
        name: &str,
    ) -> Result<Serve> {
        let (socket, ungated) = Serve::gate(dir, name);
        let child = Command::new(bin)
            .args(["serve", "--listen", &addr.to_string(), "--node", "node-a"])
            .arg("--gate-socket")
            .arg(&socket)
            .arg("--ungated-dir")
            .arg(&ungated)
            .arg("--gate-word-file")
            .arg(dir.join(format!("{name}-word.pb")))
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join(format!("{name}.out")))?)
            .stderr(fs::File::create(dir.join(format!("{name}.err")))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut serve = Serve(child);
        let err = dir.join(format!("{name}.err"));
        wait::until("the agent to listen", STARTUP, || {
            if let Ok(Some(status)) = serve.0.try_wait() {
                return Some(Err(status));
            }
            TcpStream::connect(addr).ok().map(Ok)
        })?
        .map_err(|status| {
            let stderr = fs::read_to_string(&err).unwrap_or_default();
            anyhow::anyhow!("the agent exited ({status}) before listening:\n{stderr}")
        })?;
        Ok(serve)
    }

    /// The start gate's socket and the hook's directory of unguarded starts of the agent
    /// [`Serve::start`] starts in `dir` as `name`: its own, beside any other agent's.
    pub fn gate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{name}.sock")),
            dir.join(format!("{name}-ungated")),
        )
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Kills the agent at once (no SIGTERM: as a crash would) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sums the samples of `body` (Prometheus text) whose series starts with `series`.
pub fn sum_series(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.0 GET, enough for the agent's endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let Some((_, body)) = resp.split_once("\r\n\r\n") else {
        bail!("no HTTP body");
    };
    Ok((status, body.to_owned()))
}
