//! The HTTP admin endpoint: health, readiness, metrics, status and events, and the mutations
//! (maintenance, apply, delete, members), which require the bearer token of
//! `admin.token_file`, are forwarded to the Raft leader and return once the change is
//! committed. `ROUTES` lists every route; `docs/openapi.json` documents the same list (a test
//! holds them together).
//!
//! Limits before trust: connections are admitted and (with `[admin.tls]`) handshaken by
//! `tls::server` on the endpoint's own thread; a mutation's token is checked on its headers
//! before its body is read; bodies are limited per route ([`APPLY_BODY_LIMIT`],
//! [`SMALL_BODY_LIMIT`]) and must arrive within `transport::BODY_TIMEOUT`; at most
//! [`MAX_IN_FLIGHT`] requests are handled at once (more get 503 at once).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{MethodRouter, delete, get, post};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{error, info};

use crate::cluster::Command;
use crate::cluster::node::ClusterNode;
use crate::cluster::state::ObjectRef;
use crate::config::rules::quote;
use crate::config::schema::{GatewaySpec, PolicySpec};
use crate::config::{self, BodyError};
use crate::events::Event;
use crate::metrics::Metrics;
use crate::secrets::TokenCell;
use crate::status::Status;

/// Largest `POST /v1/apply` body. The largest legitimate one is an apply of 100 000 policies:
/// 14.0 MB in JSON and 12.9 MB in TOML in the shape of the scale tests (test
/// `a_100_000_policy_apply_fits_the_body_limit`); this leaves room for longer names and lists.
pub const APPLY_BODY_LIMIT: usize = 24 * 1024 * 1024;
/// Largest body of every other route (a label change, a member).
pub const SMALL_BODY_LIMIT: usize = 64 * 1024;
/// Requests handled at once; beyond it, 503 at once.
pub const MAX_IN_FLIGHT: usize = 64;

#[derive(Clone)]
pub struct AdminState {
    pub status: watch::Receiver<Status>,
    pub node: Arc<ClusterNode>,
    /// The bearer token mutations need (re-read on SIGHUP); `None`: mutations are refused.
    pub token: TokenCell,
    pub metrics: Arc<Metrics>,
    /// The runtime the cluster member runs on: calls that talk to peers or to Raft run there,
    /// not on the endpoint's own thread.
    pub main: tokio::runtime::Handle,
}

/// `POST /v1/members`: a new member.
pub use crate::config::schema::MemberAdd;

#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Committed {
    /// False when the cluster already was in the requested state.
    pub changed: bool,
    /// Something the operator should know about the outcome (e.g. the node stays cordoned by
    /// Kubernetes after `uncordon`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A label change (`POST /v1/nodes/{name}/labels`): `value` null or left out removes the label.
pub use crate::config::schema::LabelChange;

/// The body of `POST /v1/apply` in JSON: the objects in the configuration file's shape (TOML in
/// the file's syntax is accepted with `Content-Type: application/toml`). Both are read by the
/// configuration's reader and rules (`config::parse_apply_body`).
pub use crate::config::schema::ApplySpec as ApplyRequest;

/// A committed object (in the configuration file's shape, so that it can be applied again) and
/// where it came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listed<T> {
    /// "file" (a node's configuration file), "api" (`egressd apply`) or "kubernetes" (the
    /// Kubernetes adapter).
    pub origin: String,
    pub object: T,
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Only events with a larger sequence number.
    pub since: Option<u64>,
    /// At most this many (the newest); default 100.
    pub limit: Option<usize>,
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

/// Every route of the endpoint: (method, path). `router` is built from this list and
/// `docs/openapi.json` must list the same.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/v1/status"),
    ("GET", "/v1/events"),
    ("POST", "/v1/nodes/{name}/cordon"),
    ("POST", "/v1/nodes/{name}/uncordon"),
    ("POST", "/v1/nodes/{name}/labels"),
    ("GET", "/v1/gateways"),
    ("GET", "/v1/policies"),
    ("POST", "/v1/apply"),
    ("DELETE", "/v1/gateways/{name}"),
    ("DELETE", "/v1/policies/{name}"),
    ("POST", "/v1/policies/{name}/cidrs"),
    ("POST", "/v1/members"),
    ("DELETE", "/v1/members/{name}"),
];

fn handler(method: &str, path: &str) -> Option<MethodRouter<AdminState>> {
    Some(match (method, path) {
        ("GET", "/healthz") => get(|| async { "ok\n" }),
        ("GET", "/readyz") => get(readyz),
        ("GET", "/metrics") => get(metrics),
        ("GET", "/v1/status") => get(status_json),
        ("GET", "/v1/events") => get(events),
        ("POST", "/v1/nodes/{name}/cordon") => post(cordon),
        ("POST", "/v1/nodes/{name}/uncordon") => post(uncordon),
        ("POST", "/v1/nodes/{name}/labels") => post(label),
        ("GET", "/v1/gateways") => get(list_gateways),
        ("GET", "/v1/policies") => get(list_policies),
        ("POST", "/v1/apply") => post(apply),
        ("DELETE", "/v1/gateways/{name}") => delete(delete_gateway),
        ("DELETE", "/v1/policies/{name}") => delete(delete_policy),
        ("POST", "/v1/policies/{name}/cidrs") => post(edit_policy_cidrs),
        ("POST", "/v1/members") => post(member_add),
        ("DELETE", "/v1/members/{name}") => delete(member_remove),
        _ => return None,
    })
}

/// The body limit of a route.
fn body_limit(path: &str) -> usize {
    if path == "/v1/apply" {
        APPLY_BODY_LIMIT
    } else {
        SMALL_BODY_LIMIT
    }
}

pub fn router(state: AdminState) -> Router {
    let mut r = Router::new();
    for (method, path) in ROUTES {
        if let Some(h) = handler(method, path) {
            let mut h = crate::cluster::transport::limit_body(h, body_limit(path));
            if *method != "GET" {
                // The token first (the outermost layer), before the body's size or any of its
                // bytes.
                h = h.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
            }
            r = r.route(path, h);
        }
    }
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    r.fallback(|method: Method, uri: axum::http::Uri| async move {
        error(
            StatusCode::NOT_FOUND,
            format!(
                "no route {method} {}; see docs/openapi.json",
                quote(&uri.to_string())
            ),
        )
    })
    .layer(DefaultBodyLimit::max(SMALL_BODY_LIMIT))
    .layer(middleware::from_fn(move |req: Request, next: Next| {
        let in_flight = in_flight.clone();
        async move {
            let Ok(_slot) = in_flight.try_acquire_owned() else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the admin endpoint is handling {MAX_IN_FLIGHT} requests already"),
                );
            };
            next.run(req).await
        }
    }))
    .with_state(state)
}

/// Serves the endpoint on `listener` (HTTPS with `tls`), with its connection limits. Run it on
/// a runtime of its own (the daemon does): then a flood of requests costs that runtime's
/// thread, not the one that carries Raft's heartbeats.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    tls: Option<crate::tls::admin::AdminTls>,
) {
    use crate::tls::server::{Acceptor, ServeOptions, serve_with};
    let acceptor = match tls {
        Some(t) => Acceptor::Server(t),
        None => Acceptor::Plain,
    };
    let options = ServeOptions {
        handshake_timeout: std::time::Duration::from_secs(2),
        header_read_timeout: std::time::Duration::from_secs(10),
        max_connections: 256,
        max_per_source: 64,
        new_per_source_per_sec: 200,
        authorize: None,
        edge: None,
        name: "admin",
    };
    serve_with(
        listener,
        acceptor,
        router(state),
        options,
        std::future::pending(),
    )
    .await;
    error!("admin endpoint stopped");
}

/// A request body, read after the checks of the headers: at most the route's limit, within
/// `transport::BODY_TIMEOUT`.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        crate::cluster::transport::read_body(req, state)
            .await
            .map(Body)
    }
}

/// Runs `fut` on the cluster member's runtime (it talks to peers or to Raft).
async fn on_main<T: Send + 'static>(
    state: &AdminState,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Response> {
    state.main.spawn(fut).await.map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request's task failed: {e}"),
        )
    })
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

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut status = state.status.borrow().clone();
    // The leader's view as of now (the board's copy is refreshed only now and then); a
    // follower's scrape asks nobody.
    if status.cluster.leader.as_deref() == Some(status.node.as_str()) {
        status.add_view(&state.node.local_view());
    }
    let text = state.metrics.scrape(&status, &state.node.applied().state);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The status, with what only the leader knows (eligibility, members' liveness) as the leader
/// sees it now: the board's copy of it is refreshed only now and then.
async fn status_json(State(state): State<AdminState>) -> Json<Status> {
    let mut s = state.status.borrow().clone();
    if s.cluster.leader.is_some() {
        let node = state.node.clone();
        if let Ok(Ok(view)) = on_main(&state, async move { node.leader_view().await }).await {
            s.add_view(&view);
        }
    }
    Json(s)
}

async fn events(State(state): State<AdminState>, Query(q): Query<EventsQuery>) -> Json<Vec<Event>> {
    Json(state.node.events.list(q.since, q.limit.unwrap_or(100)))
}

fn origin(state: &crate::cluster::ClusterState, r: ObjectRef) -> String {
    state.origin(&r).as_str().into()
}

async fn list_gateways(State(state): State<AdminState>) -> Json<Vec<Listed<GatewaySpec>>> {
    let st = state.node.applied().state;
    Json(
        st.gateways
            .values()
            .map(|g| Listed {
                origin: origin(&st, ObjectRef::Gateway(g.name.clone())),
                object: GatewaySpec::from(g),
            })
            .collect(),
    )
}

async fn list_policies(State(state): State<AdminState>) -> Json<Vec<Listed<PolicySpec>>> {
    let st = state.node.applied().state;
    Json(
        st.policies
            .values()
            .map(|p| Listed {
                origin: origin(&st, ObjectRef::Policy(p.name.clone())),
                object: PolicySpec::from(&**p),
            })
            .collect(),
    )
}

fn authorize(state: &AdminState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let Some(token) = state.token.get() else {
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
        Some(g) if token.matches(g.as_bytes()) => Ok(()),
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

/// Every mutation: the token, checked on the headers, before the body is read.
async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Err((status, message)) = authorize(&state, req.headers()) {
        return error(status, message);
    }
    next.run(req).await
}

/// Commits `cmd` for member `name` (which must be a cluster member).
async fn mutate(state: AdminState, name: &str, cmd: Command) -> Response {
    let members = state.status.borrow().cluster.members.clone();
    if !members.iter().any(|m| m == name) {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no member named {}; members: {}",
                quote(name),
                members.join(", ")
            ),
        );
    }
    commit(&state, cmd).await
}

/// Commits `cmd` through the leader; answers once it is committed, or why it was not.
async fn commit(state: &AdminState, cmd: Command) -> Response {
    let node = state.node.clone();
    let started = std::time::Instant::now();
    let written = match on_main(state, async move { node.write(cmd).await }).await {
        Ok(w) => w,
        Err(resp) => return resp,
    };
    match written {
        Ok(r) => match r.refused {
            Some(why) => error(
                StatusCode::CONFLICT,
                format!("refused, nothing changed: {why}"),
            ),
            None => {
                // What changed is the event line every node logs as it applies the command;
                // formatting the command here would copy a whole apply into the log.
                info!(
                    changed = r.changed,
                    index = r.index,
                    took_ms = started.elapsed().as_secs_f64() * 1e3,
                    "admin change committed"
                );
                Json(Committed {
                    changed: r.changed,
                    note: None,
                })
                .into_response()
            }
        },
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not committed: {e:#}; retry once the cluster has a leader"),
        ),
    }
}

/// A refused body: 400 when it cannot be read at all, 422 when it breaks the schema or a rule
/// (the message names each offending key).
fn refused(e: BodyError) -> Response {
    match e {
        BodyError::Syntax(m) => error(StatusCode::BAD_REQUEST, m),
        BodyError::Invalid(errors) => error(StatusCode::UNPROCESSABLE_ENTITY, errors.to_string()),
    }
}

async fn apply(State(state): State<AdminState>, headers: HeaderMap, Body(body): Body) -> Response {
    let toml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/toml"));
    let (gateways, policies) = match config::parse_apply_body(&body, toml, "request body") {
        Ok(objects) => objects,
        Err(e) => return refused(e),
    };
    // The configuration rules over the committed set with these objects are checked by the
    // state machine as it applies the command (so a race with another change cannot slip
    // past): a broken rule comes back as a refusal, 409.
    commit(&state, Command::Apply { gateways, policies }).await
}

/// CIDRs added to and removed from one policy: the change travels alone, not the policy (a
/// one-CIDR change of a 100 000-CIDR allow-list).
async fn edit_policy_cidrs(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Body(body): Body,
) -> Response {
    let (add, remove) = match config::parse_cidr_edit(&body, "request body") {
        Ok(edit) => edit,
        Err(e) => return refused(e),
    };
    if !state.node.applied().state.policies.contains_key(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no policy {}; see egressd get policies", quote(&name)),
        );
    }
    commit(
        &state,
        Command::EditPolicyCidrs {
            policy: name,
            add,
            remove,
        },
    )
    .await
}

async fn delete_object(state: AdminState, r: ObjectRef) -> Response {
    let st = state.node.applied().state;
    let (exists, known): (bool, Vec<&str>) = match &r {
        ObjectRef::Gateway(n) => (
            st.gateways.contains_key(n),
            st.gateways.keys().map(String::as_str).collect(),
        ),
        ObjectRef::Policy(n) => (
            st.policies.contains_key(n),
            st.policies.keys().map(String::as_str).collect(),
        ),
    };
    if !exists {
        const SHOWN: usize = 10;
        let (kind, name) = match &r {
            ObjectRef::Gateway(n) => ("gateway", n),
            ObjectRef::Policy(n) => ("policy", n),
        };
        let more = known.len().saturating_sub(SHOWN);
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no {kind} {}; committed: {}{}",
                quote(name),
                known[..known.len().min(SHOWN)].join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        );
    }
    let cmd = match r {
        ObjectRef::Gateway(n) => Command::DeleteGateway(n),
        ObjectRef::Policy(n) => Command::DeletePolicy(n),
    };
    commit(&state, cmd).await
}

async fn delete_gateway(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    delete_object(state, ObjectRef::Gateway(name)).await
}

async fn delete_policy(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    delete_object(state, ObjectRef::Policy(name)).await
}

async fn cordon(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    mutate(state, &name, Command::Cordon(name.clone())).await
}

async fn uncordon(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    let resp = mutate(state.clone(), &name, Command::Uncordon(name.clone())).await;
    let st = state.node.applied().state;
    if !resp.status().is_success() || !st.kube_nodes.get(&name).is_some_and(|k| k.unschedulable) {
        return resp;
    }
    // Committed, but the node stays cordoned: Kubernetes' reason is Kubernetes' to lift.
    let changed = match axum::body::to_bytes(resp.into_body(), 4096).await {
        Ok(b) => serde_json::from_slice::<Committed>(&b).is_ok_and(|c| c.changed),
        Err(_) => false,
    };
    Json(Committed {
        changed,
        note: Some(format!(
            "{name} stays cordoned: its Kubernetes Node is unschedulable (kubectl cordon); \
             `kubectl uncordon {name}` lifts that"
        )),
    })
    .into_response()
}

/// `egressd member add`: checked here for a message without a round trip, then by the leader
/// (format, one change at a time, quorum) and the state machine.
async fn member_add(State(state): State<AdminState>, Body(body): Body) -> Response {
    let add = match config::parse_member_add(&body, "request body") {
        Ok(a) => a,
        Err(e) => return refused(e),
    };
    commit(
        &state,
        Command::AddMember {
            name: add.name,
            address: add.address,
        },
    )
    .await
}

async fn member_remove(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    let members = &state.node.applied().state.members;
    if !members.contains_key(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "no member named {}; members: {}",
                quote(&name),
                members.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        );
    }
    commit(&state, Command::RemoveMember { name }).await
}

async fn label(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Body(body): Body,
) -> Response {
    let change = match config::parse_label_change(&body, "request body") {
        Ok(c) => c,
        Err(e) => return refused(e),
    };
    let cmd = Command::SetLabel {
        node: name.clone(),
        key: change.key,
        value: change.value,
    };
    mutate(state, &name, cmd).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_a_handler_and_the_openapi_document_lists_exactly_the_routes() {
        for (m, p) in ROUTES {
            assert!(handler(m, p).is_some(), "{m} {p} has no handler");
        }
        let doc: serde_json::Value = serde_json::from_str(include_str!("../docs/openapi.json"))
            .expect("docs/openapi.json is JSON");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for method in ops.as_object().expect("operations").keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        served.sort();
        assert_eq!(served, documented);
    }

    /// An apply of 100 000 policies in the shape of the scale tests, as the CLI sends it (JSON)
    /// and as TOML: both fit the limit, which is not many times larger.
    #[test]
    fn a_100_000_policy_apply_fits_the_body_limit() {
        let policies: Vec<PolicySpec> = (0..100_000u32)
            .map(|i| PolicySpec {
                name: format!("src-{i:06}"),
                egress_gateway_name: "vip".into(),
                source_cidrs: vec![format!(
                    "10.{}.{}.{}/32",
                    100 + (i >> 16),
                    (i >> 8) & 255,
                    i & 255
                )],
                destination_cidrs: vec!["0.0.0.0/0".into()],
                excluded_cidrs: vec![],
            })
            .collect();
        let json = serde_json::to_vec(&ApplyRequest {
            gateways: vec![],
            policies: policies.clone(),
        })
        .unwrap()
        .len();
        let toml: usize = policies
            .iter()
            .map(|p| {
                format!(
                    "[[policy]]\nname = \"{}\"\negress_gateway_name = \"{}\"\nsource_cidrs = \
                     [\"{}\"]\ndestination_cidrs = [\"0.0.0.0/0\"]\n",
                    p.name, p.egress_gateway_name, p.source_cidrs[0]
                )
                .len()
            })
            .sum();
        println!("100 000 policies: JSON {json} bytes, TOML {toml} bytes");
        assert!(json < APPLY_BODY_LIMIT && toml < APPLY_BODY_LIMIT);
        assert!(
            json.max(toml) * 3 > APPLY_BODY_LIMIT,
            "the limit is far above the largest"
        );
    }

    type Doc = serde_json::Value;

    fn openapi() -> Doc {
        serde_json::from_str(include_str!("../docs/openapi.json")).expect("docs/openapi.json")
    }

    /// A schema with its `$ref` followed.
    fn resolve<'a>(doc: &'a Doc, schema: &'a Doc) -> &'a Doc {
        match schema["$ref"].as_str() {
            Some(r) => {
                let name = r.trim_start_matches("#/components/schemas/");
                &doc["components"]["schemas"][name]
            }
            None => schema,
        }
    }

    /// Every way to add one unknown field `bogus_field` to `value`, an instance of `schema`:
    /// one variant per object of the body that is a struct (`additionalProperties: false`).
    /// Asserts that every object of a request body says whether it takes other keys.
    fn with_unknown_field(doc: &Doc, schema: &Doc, value: &Doc, at: &str) -> Vec<(String, Doc)> {
        let schema = resolve(doc, schema);
        let schema = match schema["oneOf"].as_array() {
            Some(alts) => alts
                .iter()
                .map(|a| resolve(doc, a))
                .find(|a| a["type"] == "object")
                .expect("an object alternative"),
            None => schema,
        };
        let mut out = Vec::new();
        match value {
            Doc::Object(map) => {
                match &schema["additionalProperties"] {
                    Doc::Bool(false) => {}
                    // A map (labels): its keys are data, not fields.
                    Doc::Object(_) => return out,
                    other => panic!("{at}: additionalProperties is {other}, not false"),
                }
                let mut v = map.clone();
                v.insert("bogus_field".into(), 1.into());
                out.push((at.to_string(), Doc::Object(v)));
                for (k, child) in map {
                    for (path, variant) in with_unknown_field(
                        doc,
                        &schema["properties"][k],
                        child,
                        &format!("{at}.{k}"),
                    ) {
                        let mut v = map.clone();
                        v.insert(k.clone(), variant);
                        out.push((path, Doc::Object(v)));
                    }
                }
            }
            Doc::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    for (path, variant) in
                        with_unknown_field(doc, &schema["items"], child, &format!("{at}[{i}]"))
                    {
                        let mut v = items.clone();
                        v[i] = variant;
                        out.push((path, Doc::Array(v)));
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// The TOML example with `bogus_field = 1` in one table at a time.
    fn toml_with_unknown_field(example: &str) -> Vec<String> {
        let lines: Vec<&str> = example.lines().collect();
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if line.starts_with('[') {
                let mut v = lines.clone();
                v.insert(i + 1, "bogus_field = 1");
                out.push(v.join("\n") + "\n");
            }
            // An inline table that is not a label map.
            if let Some(close) = line
                .rfind('}')
                .filter(|_| !line.starts_with("node_selector"))
            {
                let mut v: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                v[i] = format!("{}, bogus_field = 1 {}", &line[..close], &line[close..]);
                out.push(v.join("\n") + "\n");
            }
        }
        out
    }

    /// The documented `required` lists are what the reader requires: leaving out a required
    /// field is refused as missing, leaving out any other field is accepted.
    fn check_required(
        doc: &Doc,
        schema: &Doc,
        value: &Doc,
        parse: &dyn Fn(&Doc) -> Result<(), String>,
        root: &Doc,
        set: &dyn Fn(&Doc, Doc) -> Doc,
    ) {
        let schema = resolve(doc, schema);
        let schema = match schema["oneOf"].as_array() {
            Some(alts) => alts
                .iter()
                .map(|a| resolve(doc, a))
                .find(|a| a["type"] == "object")
                .unwrap(),
            None => schema,
        };
        let Doc::Object(map) = value else { return };
        if schema["additionalProperties"] != false {
            return;
        }
        // `required`, and the `then.required` of each `allOf` whose `if` matches the value
        // (the settings table of the mode).
        let names = |v: &Doc| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut required = names(&schema["required"]);
        for rule in schema["allOf"].as_array().into_iter().flatten() {
            let matches = rule["if"]["properties"]
                .as_object()
                .is_some_and(|ps| ps.iter().all(|(k, c)| map.get(k) == Some(&c["const"])));
            if matches {
                required.extend(names(&rule["then"]["required"]));
            }
        }
        for k in map.keys() {
            let mut v = map.clone();
            v.remove(k);
            let result = parse(&set(root, Doc::Object(v)));
            if required.contains(k) {
                let e = result.expect_err(k);
                assert!(e.contains(&format!("{k}: missing")), "{k}: {e}");
            } else {
                assert_eq!(result, Ok(()), "leaving out {k} is documented as allowed");
            }
        }
        for (k, child) in map {
            let sub_set = |r: &Doc, new: Doc| {
                let mut m = map.clone();
                m.insert(k.clone(), new);
                set(r, Doc::Object(m))
            };
            check_required(doc, &schema["properties"][k], child, parse, root, &sub_set);
        }
    }

    #[test]
    fn the_documented_request_bodies_say_which_fields_are_optional() {
        let doc = openapi();
        let apply =
            &doc["paths"]["/v1/apply"]["post"]["requestBody"]["content"]["application/json"];
        let parse = |v: &Doc| {
            crate::config::parse_json_objects(v.to_string().as_bytes(), "request body")
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let example = &apply["example"];
        assert_eq!(parse(example), Ok(()));
        // Down into the first gateway and the first policy of the example.
        for (list, schema) in [("gateways", "Gateway"), ("policies", "Policy")] {
            let item = &example[list][0];
            let set = |root: &Doc, new: Doc| {
                let mut r = root.clone();
                r[list] = Doc::Array(vec![new]);
                r
            };
            check_required(
                &doc,
                &doc["components"]["schemas"][schema],
                item,
                &parse,
                example,
                &set,
            );
        }
        let labels = &doc["paths"]["/v1/nodes/{name}/labels"]["post"]["requestBody"]["content"]["application/json"];
        let parse = |v: &Doc| {
            crate::config::parse_label_change(v.to_string().as_bytes(), "request body")
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let set = |_: &Doc, new: Doc| new;
        check_required(
            &doc,
            &labels["schema"],
            &labels["example"],
            &parse,
            &labels["example"],
            &set,
        );
    }

    /// Every documented request body, served by the real route table over a one-node cluster:
    /// the example is accepted, and the example with one unknown field added anywhere is refused
    /// (400/422, a JSON error naming the field) without any change to the committed state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_documented_body_with_an_unknown_field_is_refused_and_changes_nothing() {
        const TOKEN: &str = "unit-test-admin-token-0123";
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = crate::config::parse_str(
            &format!(
                "[node]\nname = \"t1\"\n[cluster]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n",
                dir.path().display()
            ),
            "test",
        )
        .unwrap();
        let node = ClusterNode::start(&cfg).await.unwrap();
        tokio::spawn(node.clone().run_controller());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while node.leader().is_none() {
            assert!(std::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // The member list the daemon seeds at start (the example adds a second member).
        node.write(Command::SeedMembers(vec![(
            "t1".into(),
            format!("127.0.0.1:{port}"),
        )]))
        .await
        .unwrap();
        let mut status = Status::default();
        status.cluster.members = vec!["t1".to_string()];
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, TOKEN).unwrap();
        std::fs::set_permissions(
            &token_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let state = AdminState {
            status: watch::channel(status).1,
            node: node.clone(),
            token: TokenCell::new(Some(crate::secrets::AdminToken::load(&token_file).unwrap())),
            metrics: Arc::new(Metrics::new()),
            main: tokio::runtime::Handle::current(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, state, None));

        let client = reqwest::Client::new();
        let doc = openapi();
        let mut bodies = 0;
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let Some(content) = op["requestBody"]["content"].as_object() else {
                    continue;
                };
                // A policy's route names the one the apply example (earlier in the list) made.
                let object = if path.starts_with("/v1/policies/") {
                    "api-pol"
                } else {
                    "t1"
                };
                let concrete = path.replace("{name}", object);
                for (media, body) in content {
                    let example = &body["example"];
                    assert!(!example.is_null(), "{method} {path} {media}: no example");
                    let (valid, variants): (String, Vec<(String, String)>) =
                        if media == "application/json" {
                            let variants = with_unknown_field(&doc, &body["schema"], example, "")
                                .into_iter()
                                .map(|(at, v)| (at, v.to_string()))
                                .collect();
                            (example.to_string(), variants)
                        } else {
                            let text = example.as_str().unwrap();
                            let variants = toml_with_unknown_field(text)
                                .into_iter()
                                .map(|v| (String::new(), v))
                                .collect();
                            (text.to_string(), variants)
                        };
                    assert!(!variants.is_empty());
                    let send = |body: String| {
                        client
                            .request(
                                method.to_uppercase().parse().unwrap(),
                                format!("{url}{concrete}"),
                            )
                            .bearer_auth(TOKEN)
                            .header("content-type", media.as_str())
                            .body(body)
                            .send()
                    };
                    let resp = send(valid).await.unwrap();
                    if concrete == "/v1/members" {
                        // A one-node cluster without [cluster.tls] cannot reach a new member:
                        // the leader refuses the addition (409), saying what is missing.
                        let code = resp.status().as_u16();
                        let e: ApiError = resp.json().await.expect("a JSON error");
                        assert!(
                            code == 409 && e.error.contains("[cluster.tls]"),
                            "{method} {path}: the example: {code} {}",
                            e.error
                        );
                    } else {
                        assert_eq!(
                            resp.status(),
                            200,
                            "{method} {path} {media}: the example: {}",
                            resp.text().await.unwrap()
                        );
                    }
                    for (at, variant) in variants {
                        let before = node.applied();
                        let resp = send(variant.clone()).await.unwrap();
                        let code = resp.status().as_u16();
                        let e: ApiError = resp.json().await.expect("a JSON error");
                        assert!(
                            code == 400 || code == 422,
                            "{method} {path} {media} with an unknown field at {at:?}: {code} {}",
                            e.error
                        );
                        assert!(
                            e.error.contains("bogus_field") && e.error.contains("unknown key"),
                            "{method} {path} {media} at {at:?}: {}",
                            e.error
                        );
                        let after = node.applied();
                        assert_eq!(after.index, before.index, "{variant}");
                        assert_eq!(after.state, before.state, "{variant}");
                        bodies += 1;
                    }
                }
            }
        }
        // apply (JSON: the body, 2 gateway levels + next_hop + settings, 1 policy; TOML: 4),
        // labels and a policy's CIDRs (the body, add, remove).
        assert!(bodies >= 13, "{bodies} bodies sent");
        node.raft.shutdown().await.unwrap();
    }
}
