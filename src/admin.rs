//! The HTTP admin endpoint: health, readiness and status, and the maintenance mutations (cordon,
//! uncordon, labels), which require the bearer token of `admin.token_file` and return once the
//! change is committed.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::{Router, extract::DefaultBodyLimit};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info};

use crate::cluster::Command;
use crate::cluster::node::ClusterNode;
use crate::daemon::Status;

/// Largest request body the admin endpoint reads.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub status: watch::Receiver<Status>,
    pub node: Arc<ClusterNode>,
    /// The bearer token mutations need; `None`: mutations are refused.
    pub token: Option<Arc<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Committed {
    /// False when the cluster already was in the requested state.
    pub changed: bool,
}

/// A label change: `value: None` removes the label.
#[derive(Debug, Serialize, Deserialize)]
pub struct LabelChange {
    pub key: String,
    pub value: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status_json))
        .route("/v1/nodes/{name}/cordon", post(cordon))
        .route("/v1/nodes/{name}/uncordon", post(uncordon))
        .route("/v1/nodes/{name}/labels", post(label))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

pub async fn serve(listener: TcpListener, state: AdminState) {
    if let Err(e) = axum::serve(listener, router(state)).await {
        error!(error = %e, "admin endpoint stopped");
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let s = state.status.borrow().clone();
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

async fn status_json(State(state): State<AdminState>) -> Json<Status> {
    Json(state.status.borrow().clone())
}

/// Equal in constant time, so that the comparison does not tell how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = &state.token else {
        return Err((
            StatusCode::FORBIDDEN,
            "mutations are disabled: set admin.token_file in the configuration",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err((
            StatusCode::UNAUTHORIZED,
            "wrong admin token: use the token of admin.token_file",
        )),
        None => Err((
            StatusCode::UNAUTHORIZED,
            "missing 'Authorization: Bearer <token>': mutations need the admin token",
        )),
    }
}

/// Commits `cmd` for member `name` (which must be a cluster member).
async fn mutate(state: AdminState, headers: HeaderMap, name: &str, cmd: Command) -> Response {
    if let Err((status, message)) = authorize(&state, &headers) {
        return error(status, message);
    }
    let members = state.status.borrow().cluster.members.clone();
    if !members.iter().any(|m| m == name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no member named {name:?}; members: {}", members.join(", ")),
        );
    }
    let what = format!("{cmd:?}");
    match state.node.write(cmd).await {
        Ok(r) => {
            info!(node = name, change = %what, changed = r.changed, "maintenance change committed");
            Json(Committed { changed: r.changed }).into_response()
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not committed: {e:#}; retry once the cluster has a leader"),
        ),
    }
}

async fn cordon(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    mutate(state, headers, &name, Command::Cordon(name.clone())).await
}

async fn uncordon(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    mutate(state, headers, &name, Command::Uncordon(name.clone())).await
}

async fn label(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<LabelChange>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(change)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON body {\"key\": \"...\", \"value\": \"...\" or null}",
        );
    };
    if change.key.is_empty() {
        return error(StatusCode::BAD_REQUEST, "the label key must not be empty");
    }
    let cmd = Command::SetLabel {
        node: name.clone(),
        key: change.key,
        value: change.value,
    };
    mutate(state, headers, &name, cmd).await
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"secret-token", b"secret-token"));
        assert!(!same(b"secret-token", b"secret-tokeN"));
        assert!(!same(b"secret", b"secret-token"));
        assert!(!same(b"", b"x"));
    }
}
