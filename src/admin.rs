//! The HTTP admin endpoint (read-only so far): health, readiness and status.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::error;

use crate::daemon::Status;

pub fn router(status: watch::Receiver<Status>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status_json))
        .with_state(status)
}

pub async fn serve(listener: TcpListener, status: watch::Receiver<Status>) {
    if let Err(e) = axum::serve(listener, router(status)).await {
        error!(error = %e, "admin endpoint stopped");
    }
}

async fn readyz(State(status): State<watch::Receiver<Status>>) -> impl IntoResponse {
    let s = status.borrow().clone();
    if s.ready {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let why = if s.not_ready.is_empty() {
            "starting".to_string()
        } else {
            s.not_ready.join("; ")
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
    }
}

async fn status_json(State(status): State<watch::Receiver<Status>>) -> Json<Status> {
    Json(status.borrow().clone())
}
