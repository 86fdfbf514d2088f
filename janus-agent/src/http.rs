//! `/metrics`, `/healthz`, `/readyz` and `/state` on one address. `/state` lists every
//! guarded path of every pod on the node, so it answers loopback clients only (the agent
//! itself, `kubectl port-forward`); Prometheus and the kubelet's probes reach the rest.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::agent::Agent;

/// Binds `addr` (so a bad address fails the start) and serves in the background.
pub async fn serve(addr: SocketAddr, agent: Arc<Agent>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/state", get(state))
        .with_state(agent);
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        agent.render_metrics(),
    )
}

async fn readyz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    if agent.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "marking guarded paths, or a guarded path failed (see /state)\n",
        )
    }
}

async fn state(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(agent): State<Arc<Agent>>,
) -> axum::response::Response {
    if !peer.ip().is_loopback() {
        return (
            StatusCode::FORBIDDEN,
            "/state answers loopback clients only (kubectl port-forward)\n",
        )
            .into_response();
    }
    axum::Json(agent.states()).into_response()
}
