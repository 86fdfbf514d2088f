//! The Janus controller: watches JanusGuards, Pods and the agents' EndpointSlices, and keeps
//! every node's agent holding exactly the guards for the pods running there.

pub mod agents;
pub mod crd;
pub mod denials;
pub mod gate;
pub mod index;
pub mod metrics;
pub mod pki;
pub mod pod;
pub mod reconcile;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};

use crate::crd::JanusGuard;
use crate::pod::PodView;
use crate::reconcile::Core;

/// How many deleted guards are lifted at once.
const LIFTS_AT_ONCE: usize = 16;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Namespace of the agents' headless Service.
    #[arg(long, default_value = "janus")]
    pub agent_namespace: String,
    /// The agents' headless Service; its EndpointSlices say which agent runs on which node.
    #[arg(long, default_value = "janus-agent")]
    pub agent_service: String,
    /// Seconds between reconciliations that list every agent and fix drift both ways.
    #[arg(long, default_value_t = 30)]
    pub reconcile_period_secs: u64,
    /// Seconds between two Events on one guard about the denials in one pod (each says
    /// how many there were since the last); the agents' counts are read at each
    /// reconciliation.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub denial_event_window_secs: u64,
    /// Timeout of one call to an agent, in seconds.
    #[arg(long, default_value_t = 5)]
    pub agent_timeout_secs: u64,
    /// Serve /metrics and /healthz here.
    #[arg(long, default_value = "0.0.0.0:9702")]
    pub metrics_addr: SocketAddr,
    #[command(flatten)]
    pub tls: agents::TlsArgs,
}

/// Per-guard reconciliation, driven by kube's Controller (guard and pod changes).
async fn reconcile(guard: Arc<JanusGuard>, core: Arc<Core>) -> Result<Action, reconcile::Error> {
    // Before the pods and agents are listed a guard would select nothing: "0 of 0 guarded".
    if !core.ready().await {
        return Ok(Action::await_change());
    }
    let result = core.sync_guard(&guard).await;
    core.gates_changed.notify_one();
    let label = if result.is_ok() { "ok" } else { "error" };
    core.metrics
        .reconciliations
        .with_label_values(&[label])
        .inc();
    result.map(|()| Action::await_change())
}

fn error_policy(_: Arc<JanusGuard>, e: &reconcile::Error, core: Arc<Core>) -> Action {
    core.metrics.errors.with_label_values(&["status"]).inc();
    tracing::warn!(error = %e, "reconciliation failed");
    Action::requeue(Duration::from_secs(5))
}

/// The guards' watch: the store the controller reads, the guards it touches (the
/// controller's trigger), and each deleted guard as last known (what lifts it at once).
pub fn watch_guards(
    client: kube::Client,
) -> (
    reflector::Store<JanusGuard>,
    impl futures::Stream<Item = Result<JanusGuard, watcher::Error>> + Send,
    tokio::sync::mpsc::UnboundedReceiver<JanusGuard>,
) {
    let (guards, writer) = reflector::store::<JanusGuard>();
    let (deleted_tx, deleted) = tokio::sync::mpsc::unbounded_channel();
    let api: Api<JanusGuard> = Api::all(client);
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(guard) = event {
                let _ = deleted_tx.send(guard.clone());
            }
        })
        .touched_objects();
    (guards, events, deleted)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let tls = match args.tls.mode()? {
        agents::TlsMode::Files(config) => Some(config),
        agents::TlsMode::Auto => Some(
            pki::bootstrap(client.clone(), &args.agent_namespace)
                .await
                .context("making the mutual TLS material (--tls-auto)")?
                .client_config(),
        ),
        agents::TlsMode::Plaintext => None,
    };
    let metrics = Arc::new(metrics::Metrics::new());
    serve_metrics(args.metrics_addr, metrics.clone()).await?;

    let (pods, pod_writer) = reflector::store::<PodView>();
    let pod_api: Api<PodView> = Api::all(client.clone());
    let pod_events = watcher(pod_api, watcher::Config::default()).modify(PodView::trim);
    let pod_events = reflector::reflector(pod_writer, pod_events)
        .default_backoff()
        .touched_objects();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let slice_api: Api<EndpointSlice> = Api::namespaced(client.clone(), &args.agent_namespace);
    let slice_cfg = watcher::Config::default().labels(&format!(
        "kubernetes.io/service-name={}",
        args.agent_service
    ));
    let slice_events = reflector::reflector(slice_writer, watcher(slice_api, slice_cfg))
        .default_backoff()
        .touched_objects();

    let (guards, guard_events, mut deleted) = watch_guards(client.clone());
    let controller = Controller::for_stream(guard_events, guards.clone());
    let core = Arc::new(
        Core::new(
            client,
            guards.clone(),
            pods,
            slices,
            agents::AgentPool::new(tls, Duration::from_secs(args.agent_timeout_secs)),
            metrics,
        )
        .with_denial_window(Duration::from_secs(args.denial_event_window_secs)),
    );

    let period = Duration::from_secs(args.reconcile_period_secs.max(1));
    let periodic = {
        let core = core.clone();
        async move {
            // The first pass after a restart, as soon as the stores are listed, lifts the
            // guards deleted while the controller was down.
            if !core.ready().await {
                return;
            }
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let result = core.sync_all().await;
                // Every agent, again: one that restarted lost its word.
                core.tell_agents(true).await;
                let label = if result.is_ok() { "ok" } else { "error" };
                core.metrics
                    .reconciliations
                    .with_label_values(&[label])
                    .inc();
                if let Err(e) = result {
                    tracing::warn!(error = %e, "periodic reconciliation");
                }
            }
        }
    };
    let (lifter, mapper, core_for_gates) = (core.clone(), core.clone(), core.clone());
    let controller = controller
        .watches_stream(pod_events, move |pod: PodView| {
            mapper.gates_changed.notify_one();
            mapper.guards_touched_by(&pod)
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, core)
        .for_each(|_| async {});
    // Agents coming and going are handled by the periodic pass, which lists them all.
    let slices = slice_events.for_each(|_| async {});
    // Several at once: an agent that does not answer holds up only the lifts that need it.
    let lifts = async move {
        futures::stream::poll_fn(|cx| deleted.poll_recv(cx))
            .for_each_concurrent(LIFTS_AT_ONCE, |guard| {
                let lifter = &lifter;
                async move {
                    lifter.lift_deleted(&guard).await;
                    lifter.gates_changed.notify_one();
                }
            })
            .await
    };
    // A namespace's start gate failure mode, from its label.
    let modes = core_for_gates.clone();
    let ns_api: Api<PartialObjectMeta<Namespace>> = Api::all(modes.client.clone());
    let namespaces = watcher(ns_api, watcher::Config::default())
        .default_backoff()
        .for_each(move |event| {
            let changed = match event {
                Ok(watcher::Event::Apply(ns) | watcher::Event::InitApply(ns)) => {
                    modes.set_namespace(&ns.name_any(), Some(ns.labels()))
                }
                Ok(watcher::Event::Delete(ns)) => modes.set_namespace(&ns.name_any(), None),
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "watching namespaces");
                    false
                }
            };
            if changed {
                modes.gates_changed.notify_one();
            }
            async {}
        });
    // Pod and guard changes, told to the agents whose word they change; changes that come
    // while agents are being told are told together after.
    let teller = core_for_gates.clone();
    let tell = async move {
        loop {
            teller.gates_changed.notified().await;
            teller.tell_agents(false).await;
        }
    };
    tokio::select! {
        _ = tell => {}
        _ = namespaces => {}
        _ = controller => {}
        _ = slices => {}
        _ = periodic => {}
        _ = lifts => {}
    }
    Ok(())
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<metrics::Metrics>) -> anyhow::Result<()> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
