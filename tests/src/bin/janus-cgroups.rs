//! `janus-cgroups --agent PATH --backend bpf|fanotify [--workdir DIR]`, on a cgroup v2 node
//! (the VM): one `janus-agent serve` finds and guards the containers of pods laid out as the
//! kubelet lays them out with either cgroup driver, for containerd and for CRI-O (with its
//! conmon beside the container), each restarted once under a new ID that nobody tells the
//! agent; it refuses a request that names another pod's container; and behind its start
//! gate a container's first instruction is refused.
//!
//! Prints `PASS <case> (<seconds> s)` / `FAIL <case>: <why> (<seconds> s)` and exits 1 if
//! any failed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use std::io::Write;

use janus_api::agent_v1::{BoundPod, ContainerPhase, SetPodsRequest};
use janus_tests::agent::{free_addr, Serve};
use janus_tests::api::{apply_request, Client};
use janus_tests::cgroups::{self, Layout, CGROUP2_ROOT};
use janus_tests::scenarios::populate;
use janus_tests::target::{Access, Root, Starting, Target, BUSYBOX};
use janus_tests::wait;

/// Denies opening `/data/secret`.
const DENY_SECRET: &str =
    r#"{"selector":{},"subjects":[{"deny":["/data/secret"],"events":["open"]}]}"#;

/// How long the agent gets to find a container: its rescan runs every 200 ms here, but
/// placing a guard under TCG takes seconds.
const FIND: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let mut agent = None;
    let mut backend = None;
    let mut workdir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--backend" => backend = args.next(),
            "--workdir" => workdir = args.next().map(PathBuf::from).unwrap_or(workdir),
            other => {
                eprintln!("janus-cgroups: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(agent), Some(backend)) = (agent, backend) else {
        eprintln!("usage: janus-cgroups --agent PATH --backend bpf|fanotify [--workdir DIR]");
        return ExitCode::from(2);
    };
    match run(&agent, &backend, &workdir) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            println!("FAIL janus-cgroups: {e:#} (0.0 s)");
            ExitCode::FAILURE
        }
    }
}

/// Runs every case against one agent; how many failed.
fn run(agent: &Path, backend: &str, workdir: &Path) -> Result<u32> {
    let root = Path::new(CGROUP2_ROOT);
    ensure!(
        cgroups::is_v2(root),
        "{CGROUP2_ROOT} is not a cgroup v2 hierarchy"
    );
    println!("janus-cgroups: backend {backend}, cgroup v2");
    let dir = workdir.join(format!("janus-cgroups-{backend}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let addr: SocketAddr = free_addr()?;
    let args = [
        "--insecure-plaintext",
        "--backend",
        backend,
        "--rescan-interval-ms",
        "200",
    ];
    let _serve = Serve::start(agent, addr, &args, &dir, "agent")?;
    let mut client = Client::connect(addr)?;

    let mut failed = 0;
    let mut pods = Vec::new();
    for (i, layout) in Layout::ALL.into_iter().enumerate() {
        let name = layout.name();
        let started = Instant::now();
        match Pod::start(&dir, layout, i) {
            Ok(mut pod) => {
                let outcome = pod.guarded_through_a_restart(&mut client);
                report(&name, started, &outcome, &mut failed);
                pods.push(pod);
            }
            Err(e) => report(&name, started, &Err(e), &mut failed),
        }
    }
    // The other pod's container in the layout whose leaf (`crio-<id>`) has no scope suffix.
    let started = Instant::now();
    let outcome = match &pods[..] {
        [a, .., b] if b.layout == Layout::ALL[3] => {
            another_pods_container_is_refused(&mut client, a, b)
        }
        _ => Err(anyhow::anyhow!(
            "the pods of the first and the last layout did not start"
        )),
    };
    report("another-pods-container", started, &outcome, &mut failed);
    let started = Instant::now();
    let outcome = gated_first_read(&mut client, agent, &dir);
    report("gated-first-read", started, &outcome, &mut failed);
    Ok(failed)
}

/// Behind the start gate: a container set up as runc sets one up (its mount namespace made
/// and its root mounted, not entered) and held while `janus-agent hook` runs. Its first
/// instruction, reading the denied file, is refused.
fn gated_first_read(client: &mut Client, agent: &Path, dir: &Path) -> Result<()> {
    // cgroupfs and containerd: the hook names a container by containerd's ID.
    let layout = Layout::ALL[2];
    let uid = "6a7e0000-0000-4000-8000-000000000001";
    let root = Root::new(dir, "gated")?;
    populate(&root)?;
    client.apply(apply_request("default", "gated", uid, &[], DENY_SECRET))?;
    client.set_pods(SetPodsRequest {
        pods: vec![BoundPod {
            uid: uid.into(),
            namespace: "default".into(),
            name: "gated-0".into(),
            guards: vec!["gated".into()],
            start_on_failure: false,
        }],
        closed_namespaces: Vec::new(),
        node: "node-a".into(),
    })?;
    let id = container_id(9, 0);
    let starting = Starting::new(&root, &[BUSYBOX, "cat", "/data/secret"])?;
    cgroups::enter(
        Path::new(CGROUP2_ROOT),
        &layout.container(uid, &id),
        starting.pid(),
    )?;
    let bundle = dir.join("gated-bundle");
    std::fs::create_dir_all(&bundle)?;
    let config = serde_json::json!({ "root": { "path": root.dir() } });
    std::fs::write(bundle.join("config.json"), config.to_string())?;
    let state = serde_json::json!({
        "ociVersion": "1.0.2", "id": id, "status": "creating", "pid": starting.pid(),
        "bundle": bundle,
        "annotations": { "io.kubernetes.cri.sandbox-uid": uid },
    });
    let (socket, _) = Serve::gate(dir, "agent");
    let mut hook = Command::new(agent)
        .arg("hook")
        .arg("--socket")
        .arg(&socket)
        .args(["--unreachable", "refuse"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    hook.stdin
        .take()
        .context("piped")?
        .write_all(state.to_string().as_bytes())?;
    let answered = hook.wait_with_output()?;
    ensure!(
        answered.status.success(),
        "the hook refused: {}",
        String::from_utf8_lossy(&answered.stderr)
    );
    // The guard changes between the gate's answer and the first instruction: its new
    // target takes the old one's place on the process the gate named, before the runtime
    // has entered the container's root.
    let changed =
        r#"{"selector":{},"subjects":[{"deny":["/data/secret","/data/other"],"events":["open"]}]}"#;
    client.apply(apply_request("default", "gated", uid, &[], changed))?;
    let out = starting.start()?;
    ensure!(
        out.contains("Operation not permitted"),
        "the first read was not refused: {out}"
    );
    Ok(())
}

fn report(name: &str, started: Instant, outcome: &Result<()>, failed: &mut u32) {
    let took = started.elapsed().as_secs_f64();
    match outcome {
        Ok(()) => println!("PASS {name} ({took:.1} s)"),
        Err(e) => {
            *failed += 1;
            println!("FAIL {name}: {e:#} ({took:.1} s)");
        }
    }
}

/// A pod on this node: one container (a target in its own root, in the container's cgroup)
/// and, for CRI-O, its conmon.
struct Pod {
    layout: Layout,
    index: usize,
    uid: String,
    root: Root,
    /// The container's ID now (it changes on a restart) and its process.
    id: String,
    container: Target,
    _monitor: Option<Child>,
}

impl Pod {
    fn start(dir: &Path, layout: Layout, i: usize) -> Result<Pod> {
        let root = Root::new(dir, &layout.name())?;
        populate(&root)?;
        let uid = format!("0c9a{i:04}-5e1f-4d2b-9a7e-{:012}", std::process::id());
        let id = container_id(i, 1);
        // conmon starts first and stays: the earliest process in the pod's cgroup.
        let monitor = match layout.monitor(&uid, &id) {
            Some(cgroup) => {
                let conmon = Command::new(BUSYBOX)
                    .args(["sleep", "3600"])
                    .stdin(Stdio::null())
                    .spawn()?;
                cgroups::enter(Path::new(CGROUP2_ROOT), &cgroup, conmon.id() as i32)?;
                Some(conmon)
            }
            None => None,
        };
        let container = start_container(&root, &layout.container(&uid, &id))?;
        Ok(Pod {
            layout,
            index: i,
            uid,
            root,
            id,
            container,
            _monitor: monitor,
        })
    }

    fn request(&self, ids: &[&str]) -> janus_api::agent_v1::ApplyGuardRequest {
        let ids: Vec<String> = ids.iter().map(|id| self.layout.container_id(id)).collect();
        apply_request("default", "cgroups", &self.uid, &ids, DENY_SECRET)
    }

    /// Guarded once the agent is told; and again, by the agent alone, after the container
    /// restarts under a new ID.
    fn guarded_through_a_restart(&mut self, client: &mut Client) -> Result<()> {
        client.apply(self.request(&[&self.id]))?;
        self.wait_enforced(client)?;
        self.check_denied()?;

        // The kubelet restarts the container: a new process, under a new ID, in a new cgroup
        // of the same pod. Nobody tells the agent.
        let new_id = container_id(self.index, 2);
        let restarted = start_container(&self.root, &self.layout.container(&self.uid, &new_id))?;
        let old = std::mem::replace(&mut self.container, restarted);
        old.kill()?;
        self.id = new_id;
        self.wait_enforced(client)?;
        self.check_denied()
    }

    /// Waits until the agent lists the container's current ID as enforced on its process.
    fn wait_enforced(&self, client: &mut Client) -> Result<()> {
        let cid = self.layout.container_id(&self.id);
        let pid = self.container.pid();
        let mut last = None;
        let found = wait::until(&format!("{cid} enforced on pid {pid}"), FIND, || {
            let guards = match client.list() {
                Ok(g) => g,
                Err(e) => return Some(Err(e)),
            };
            let held = guards
                .into_iter()
                .find(|g| g.key.as_ref().is_some_and(|k| k.pod_uid == self.uid));
            let ok = held.as_ref().is_some_and(|g| {
                g.containers.iter().any(|c| {
                    c.container_id == cid
                        && c.phase == ContainerPhase::Enforced as i32
                        && c.pid == pid
                })
            });
            last = held;
            ok.then_some(Ok(()))
        });
        match found {
            Ok(r) => r,
            Err(e) => Err(e).context(format!("the agent holds: {last:?}")),
        }
    }

    fn check_denied(&self) -> Result<()> {
        let secret = self.container.cat("/data/secret")?;
        ensure!(secret == Access::Denied, "reading /data/secret: {secret:?}");
        let public = self.container.cat("/data/public")?;
        ensure!(
            public == Access::Ok("public".into()),
            "reading /data/public: {public:?}"
        );
        Ok(())
    }
}

/// A 64-hex-digit ID, as runtimes make them, for the `start`th container of pod `pod`.
fn container_id(pod: usize, start: usize) -> String {
    format!("{}{pod:02x}{start:02x}", "c0".repeat(30))
}

/// A target in `root`, moved into `cgroup`.
fn start_container(root: &Root, cgroup: &str) -> Result<Target> {
    let target = Target::start(root)?;
    cgroups::enter(Path::new(CGROUP2_ROOT), cgroup, target.pid())?;
    Ok(target)
}

/// Whoever can call the API names, for pod `a`, the container of pod `b`: refused, and
/// nothing of it is held.
fn another_pods_container_is_refused(client: &mut Client, a: &Pod, b: &Pod) -> Result<()> {
    let mut req = a.request(&[]);
    req.guard.as_mut().context("a guard")?.name = "borrowed".into();
    req.pod.as_mut().context("a pod")?.container_ids = vec![b.layout.container_id(&b.id)];
    match client.apply(req) {
        Ok(status) => bail!("applied: {status:?}"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains(&b.id),
                "refused, but not for the other pod's container: {msg}"
            );
        }
    }
    let held = client.list()?;
    ensure!(
        !held
            .iter()
            .any(|g| g.key.as_ref().is_some_and(|k| k.guard_name == "borrowed")),
        "a refused guard is held: {held:?}"
    );
    Ok(())
}
