//! `/metrics`, `/healthz`, `/readyz` and `/state` on one address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
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

async fn state(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    axum::Json(agent.states())
}
