//! `janus-agent guard`: enforce the guards of a file on given processes, no cluster needed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use janus_api::guard::parse_documents;
use janus_api::GuardPolicy;

use crate::agent::Agent;
use crate::{decisions, http, metrics::Metrics};

#[derive(Debug, clap::Args)]
pub struct GuardArgs {
    /// A YAML file of one or more JanusGuard documents.
    #[arg(long)]
    pub file: PathBuf,
    /// A process to guard; its parent and itself are the owner for autoAllowOwner.
    #[arg(long = "pid", required = true)]
    pub pids: Vec<i32>,
    /// What {pod} prints.
    #[arg(long, default_value = "-")]
    pub pod: String,
    /// What {node} prints; the host name by default.
    #[arg(long)]
    pub node: Option<String>,
    /// Serve /metrics, /healthz, /readyz and /state here.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub enforce: crate::agent::EnforceArgs,
}

/// Reads and validates every guard in `file`, naming the file, document and field of
/// each problem.
pub fn load_guards(file: &std::path::Path) -> anyhow::Result<Vec<Arc<GuardPolicy>>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let guards = parse_documents(&text).with_context(|| format!("{}", file.display()))?;
    let mut problems = Vec::new();
    let mut policies = Vec::new();
    for g in &guards {
        match GuardPolicy::from_guard(g) {
            Ok(p) => policies.push(Arc::new(p)),
            Err(errors) => problems.extend(errors.0.iter().map(|e| {
                format!(
                    "{}: guard {:?}: {}: {}",
                    file.display(),
                    g.metadata.name,
                    e.field,
                    e.message
                )
            })),
        }
    }
    if !problems.is_empty() {
        bail!("invalid guard, nothing guarded:\n{}", problems.join("\n"));
    }
    Ok(policies)
}

pub async fn run(args: GuardArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::listen()?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing a SIGHUP handler")?;
    let policies = load_guards(&args.file)?;
    let metrics = Arc::new(Metrics::new());
    let (log, writer) = decisions::start(Box::new(std::io::stdout()), args.enforce.decision_format);
    let node = args.node.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "-".into())
    });
    let agent = Arc::new(Agent::new(metrics, log, node, &args.enforce)?);
    let result = guard_all(&agent, &policies, &args.pids, &args.pod, args.metrics_addr).await;
    if result.is_ok() {
        let stop = shutdown.wait();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = hangup.recv() => reload(&agent, &args),
            }
        }
        tracing::info!("signal received; lifting guards");
    }
    agent.shutdown();
    writer.finish();
    result
}

async fn guard_all(
    agent: &Arc<Agent>,
    policies: &[Arc<GuardPolicy>],
    pids: &[i32],
    pod: &str,
    metrics_addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    for policy in policies {
        for &pid in pids {
            agent
                .guard(policy.clone(), pid, pod.to_owned())
                .with_context(|| format!("guard {:?} on pid {pid}", policy.name))?;
        }
    }
    if let Some(addr) = metrics_addr {
        let bound = http::serve(addr, agent.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%bound, "serving /metrics, /healthz, /readyz, /state");
    }
    Ok(())
}

/// SIGHUP: the file again. Each target's new guard is placed before its old one is lifted
/// (`Agent::add`), so editing a guard leaves no unguarded moment; a guard gone from the file
/// is lifted; a file that does not validate, or a guard that cannot be placed, keeps what
/// was enforced, and says so.
fn reload(agent: &Agent, args: &GuardArgs) {
    let policies = match load_guards(&args.file) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: the guards stay as they were");
            return;
        }
    };
    let mut kept = std::collections::HashSet::new();
    for policy in &policies {
        for &pid in &args.pids {
            kept.insert(Agent::key(policy, pid));
            if let Err(e) = agent.guard(policy.clone(), pid, args.pod.clone()) {
                tracing::error!(guard = %policy.name, pid, error = %e, "SIGHUP: this target keeps its guard as it was");
            }
        }
    }
    for key in agent.keyed_states().into_keys() {
        if !kept.contains(&key) {
            agent.remove(&key);
        }
    }
    tracing::info!(file = %args.file.display(), "SIGHUP: guards applied again");
}

/// SIGTERM and SIGINT, caught from the moment this is made: one that arrives while guards
/// are being placed still ends the agent with its guards lifted and exit 0.
pub(crate) struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    pub(crate) fn listen() -> anyhow::Result<Shutdown> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    pub(crate) async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
