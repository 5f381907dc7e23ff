//! The transport between egressd peers: Raft's RPCs and, through the same generic pieces, the
//! application RPCs egressd adds (node reports, forwarded writes, the leader's view).
//!
//! # Trust
//!
//! Every peer connection is mutual TLS (`crate::tls`): a node proves its name with a
//! certificate of the cluster CA, in both directions, so requests *and* answers are
//! authenticated, bound to the two nodes, and cannot be replayed or altered (TLS does what the
//! HMAC of the versions before did for requests only). On top of that:
//! - only members may talk to a node (`tls::server::ServeOptions::authorize`, per request);
//! - every request and every answer carries the cluster's id ([`CLUSTER_HEADER`], see
//!   `ClusterState::cluster_id`): a node of another cluster whose certificate comes from the
//!   same CA (two clusters set up with one CA, a restored store of another cluster) is refused
//!   by the receiver, and its answers by the caller, with a message naming both ids;
//! - handlers that act for a node check that the caller *is* that node (a report for gw2 only
//!   from gw2's certificate).
//!
//! # Limits before trust
//!
//! Connections are admitted (total, per source, new per second) and handshaken off the threads
//! that run Raft (`tls::server`). A request is authorized and its cluster id checked on its
//! headers alone; only then is its body read, at most the route's limit ([`RouteLimits`]), within
//! [`BODY_TIMEOUT`]; and at most [`MAX_IN_FLIGHT`] requests are handled at once (more get 503 at
//! once instead of queueing behind them).
//!
//! A node of a one-node cluster without `[cluster.tls]` opens no peer endpoint and makes no
//! peer request (it has nobody to talk to).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, post};
use axum::{Extension, Json, Router};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{LogId, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use super::campaign::CampaignWatch;
use super::{Member, NodeId, Raft, TypeConfig};
use crate::lease::QuorumClock;
use crate::tls::PeerIdentity;
use crate::tls::client::ClientError;

/// The header carrying the sender's cluster id (requests) and the answering node's (answers).
pub const CLUSTER_HEADER: &str = "x-egressd-cluster";

/// How long a client waits for a new connection to a peer: TCP connect and TLS handshake.
/// Short: failover speed depends on noticing dead peers fast, and a live peer on a LAN
/// connects and handshakes in about a millisecond.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// How long openraft waits before retrying a peer after [`Unreachable`]. openraft's default is
/// 500 ms, longer than the election timeout: a follower that the leader stops contacting for
/// that long (e.g. it just restarted) campaigns and disrupts the cluster. Shorter than the
/// smallest election timeout we use (150 ms); a refused connection costs next to nothing.
pub const PEER_BACKOFF: Duration = Duration::from_millis(100);

pub const APPEND_PATH: &str = "/raft/append";
pub const VOTE_PATH: &str = "/raft/vote";
pub const SNAPSHOT_PATH: &str = "/raft/snapshot";
pub const REPORT_PATH: &str = "/cluster/report";
pub const HELLO_PATH: &str = "/cluster/hello";
pub const WRITE_PATH: &str = "/cluster/write";
pub const VIEW_PATH: &str = "/cluster/view";

/// The most an append carries when it holds more than one entry (see `append_entries`).
pub const APPEND_BUDGET_BYTES: usize = 64 * 1024;
/// The largest log entry a node proposes (encoded): larger changes are staged in parts
/// (`ClusterNode::write`), and a single object larger than this is refused. A 500-policy part
/// of the usual shape is about 25 KB; this leaves room for objects with long CIDR lists.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;
/// How long a large append (one entry over [`APPEND_BUDGET_BYTES`]) may take to be answered.
/// openraft gives every append one heartbeat interval and then sends it again; a follower
/// that needs longer to take a large entry (a loaded machine, a slow disk) would be sent it
/// again forever. The request goes on past that, and openraft's retry of the same append waits
/// for its answer instead of sending the entry again (see `append_entries`).
pub const LARGE_APPEND_TIMEOUT: Duration = Duration::from_secs(3);
/// The snapshot chunk size openraft is configured with (`snapshot_max_chunk_size`).
pub const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;

/// Per-route request body limits: each the largest legitimate body of the route with room for
/// its envelope, and nothing more (see the test `the_largest_legitimate_bodies_fit_the_limits`).
pub struct RouteLimits;

impl RouteLimits {
    /// One entry of up to [`MAX_ENTRY_BYTES`] (an append of several stays under the budget).
    pub const APPEND: usize = MAX_ENTRY_BYTES + 64 * 1024;
    /// A chunk's bytes travel as a MessagePack array of integers: up to two bytes each.
    pub const SNAPSHOT: usize = 2 * SNAPSHOT_CHUNK_BYTES + 64 * 1024;
    pub const VOTE: usize = 4 * 1024;
    /// A report: labels and every interface of the node.
    pub const REPORT: usize = 256 * 1024;
    /// A forwarded write is one entry's command.
    pub const WRITE: usize = MAX_ENTRY_BYTES + 64 * 1024;
    /// Hello and view requests have no body.
    pub const EMPTY: usize = 1024;
}

/// The longest a request body may take to arrive once its headers are in (a 1 MiB entry takes
/// milliseconds on a LAN; this allows a squeezed link of ~2 Mbit/s).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests handled at once by the peer endpoint; beyond it, 503 at once. Members send a few
/// at a time each.
pub const MAX_IN_FLIGHT: usize = 256;
/// The largest answer a client reads (the leader's view with many gateways).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The cluster id this node holds now, if any (`ClusterState::cluster_id`).
pub type ClusterIdFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Bodies: MessagePack (see `codec`)

/// The content type of every peer RPC body.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// Bodies above this are decoded off the async threads (a 100 KB log entry, a snapshot chunk).
const BLOCKING_DECODE_BYTES: usize = 64 * 1024;

/// `route` with a body limit of `limit` bytes: a declared `Content-Length` above it is refused
/// (413) on the headers, before hyper asks the client for the body — a client that sent
/// `Expect: 100-continue` then never sends it, and nobody's connection is reset halfway through
/// a body it is still sending —; a body without a declared length is cut at the limit while it
/// is read (`DefaultBodyLimit`, [`read_body`]).
pub fn limit_body<S>(route: MethodRouter<S>, limit: usize) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(
            move |req: Request, next: Next| async move {
                let declared = req
                    .headers()
                    .get(axum::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                match declared {
                    Some(n) if n > limit as u64 => json_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the body is {n} bytes; this route takes at most {limit}"),
                    ),
                    _ => next.run(req).await,
                }
            },
        ))
}

/// Reads a request body: at most the route's limit (`DefaultBodyLimit`), within
/// [`BODY_TIMEOUT`] in all (a slow sender does not hold a handler for long).
pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, Response> {
    use axum::extract::FromRequest;
    match tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(rejection)) => Err(json_error(
            rejection.status(),
            format!("cannot read the request body: {}", rejection.body_text()),
        )),
        Err(_) => Err(json_error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// A MessagePack request body (extractor) or response (`IntoResponse`).
pub struct Msg<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Msg<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send + 'static,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        let decoded = if bytes.len() > BLOCKING_DECODE_BYTES {
            tokio::task::spawn_blocking(move || super::codec::from_wire::<T>(&bytes))
                .await
                .map_err(|e| {
                    json_error(StatusCode::INTERNAL_SERVER_ERROR, format!("decoder: {e}"))
                })?
        } else {
            super::codec::from_wire::<T>(&bytes)
        };
        decoded.map(Msg).map_err(|e| {
            json_error(
                StatusCode::BAD_REQUEST,
                format!("cannot decode the request: {e}"),
            )
        })
    }
}

impl<T: Serialize> IntoResponse for Msg<T> {
    fn into_response(self) -> Response {
        match super::codec::to_wire(&self.0) {
            Ok(b) => ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], b).into_response(),
            Err(e) => json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the answer: {e}"),
            ),
        }
    }
}

pub fn json_error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

// ---------------------------------------------------------------------------------------------
// Server side

/// Says at most once per `every` per key (a peer, a source) that something was refused.
#[derive(Default)]
struct Quiet {
    last: Mutex<HashMap<String, Instant>>,
}

impl Quiet {
    fn should_log(&self, key: &str, every: Duration) -> bool {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.len() > 1024 {
            last.clear();
        }
        match last.get(key) {
            Some(t) if t.elapsed() < every => false,
            _ => {
                last.insert(key.to_owned(), Instant::now());
                true
            }
        }
    }
}

/// What the peer endpoint's guard layers need.
#[derive(Clone)]
pub struct Guard {
    /// This node's name, for messages.
    pub node: String,
    pub cluster_id: ClusterIdFn,
    in_flight: Arc<Semaphore>,
    quiet: Arc<Quiet>,
}

impl Guard {
    pub fn new(node: &str, cluster_id: ClusterIdFn) -> Self {
        Guard {
            node: node.to_owned(),
            cluster_id,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            quiet: Arc::new(Quiet::default()),
        }
    }
}

/// The message of a cluster id mismatch, seen from `here` (this node) about `there`.
pub fn other_cluster_message(here: &str, ours: &str, there: &str, theirs: &str) -> String {
    format!(
        "{there} belongs to cluster {theirs}, but {here} belongs to cluster {ours}: nodes of \
         different clusters do not talk to each other (two clusters whose certificates come \
         from one CA, or a node started on another cluster's store); give the node the store \
         of this cluster (or an empty data_dir, then `egressd member add` it), or point it at \
         its own cluster's peers"
    )
}

fn header_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(CLUSTER_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// Before any body is read: at most [`MAX_IN_FLIGHT`] requests at once, and the sender's
/// cluster id must be this node's (a sender or a receiver that has none yet — a new node, a
/// new cluster — passes). Every answer carries this node's id.
async fn guard_layer(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    let Ok(_slot) = guard.in_flight.clone().try_acquire_owned() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} is handling {MAX_IN_FLIGHT} requests already",
                guard.node
            ),
        );
    };
    let ours = (guard.cluster_id)();
    if let (Some(ours), Some(theirs)) = (&ours, header_id(req.headers()))
        && ours != theirs
    {
        let sender = req
            .extensions()
            .get::<PeerIdentity>()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "the sender".to_owned());
        let message = other_cluster_message(&guard.node, ours, &sender, theirs);
        if guard.quiet.should_log(&sender, Duration::from_secs(10)) {
            tracing::warn!(peer = %sender, ours = %ours, theirs = %theirs, "{message}");
        }
        let mut resp = json_error(StatusCode::FORBIDDEN, message);
        if let Ok(v) = HeaderValue::from_str(ours) {
            resp.headers_mut().insert(CLUSTER_HEADER, v);
        }
        return resp;
    }
    let mut resp = next.run(req).await;
    if let Some(ours) = ours
        && let Ok(v) = HeaderValue::from_str(&ours)
    {
        resp.headers_mut().insert(CLUSTER_HEADER, v);
    }
    resp
}

/// Puts the peer routes behind the guard (in-flight limit, cluster id). The routes set their
/// own body limits.
pub fn guarded(router: Router, guard: Guard) -> Router {
    router.layer(middleware::from_fn_with_state(guard, guard_layer))
}

/// The Raft RPC endpoints: POST [`APPEND_PATH`], [`VOTE_PATH`], [`SNAPSHOT_PATH`], each taking
/// the openraft request and answering the openraft `Result<Response, RaftError<..>>`, with
/// their body limits.
pub fn raft_routes(raft: Raft) -> Router {
    Router::new()
        .route(
            APPEND_PATH,
            limit_body(post(append_handler), RouteLimits::APPEND),
        )
        .route(VOTE_PATH, limit_body(post(vote_handler), RouteLimits::VOTE))
        .route(
            SNAPSHOT_PATH,
            limit_body(post(snapshot_handler), RouteLimits::SNAPSHOT),
        )
        .with_state(raft)
}

/// Whether the verified caller is `node` (for handlers that act for a node).
pub fn caller_is(peer: Option<&Extension<PeerIdentity>>, node: &str) -> Result<(), String> {
    match peer {
        Some(Extension(p)) if p.is(node) => Ok(()),
        Some(Extension(p)) => Err(format!("{p} may not speak for {node}")),
        None => Err(format!(
            "an unauthenticated caller may not speak for {node}"
        )),
    }
}

async fn append_handler(
    State(raft): State<Raft>,
    Msg(req): Msg<AppendEntriesRequest<TypeConfig>>,
) -> Msg<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>> {
    Msg(raft.append_entries(req).await)
}

async fn vote_handler(
    State(raft): State<Raft>,
    Msg(req): Msg<VoteRequest<NodeId>>,
) -> Msg<Result<VoteResponse<NodeId>, RaftError<NodeId>>> {
    Msg(raft.vote(req).await)
}

async fn snapshot_handler(
    State(raft): State<Raft>,
    Msg(req): Msg<InstallSnapshotRequest<TypeConfig>>,
) -> Msg<Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>> {
    Msg(raft.install_snapshot(req).await)
}

// ---------------------------------------------------------------------------------------------
// Client side

/// A failed peer request.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "this node has no [cluster.tls]: a one-node cluster without peer TLS talks to no peer \
         ({peer} at {addr})"
    )]
    NoTls { peer: String, addr: String },
    #[error("cannot encode the request for {path}: {source}")]
    Encode {
        path: String,
        source: super::codec::CodecError,
    },
    #[error("cannot connect to peer {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("peer {addr} did not answer {path} within {timeout:?}")]
    Timeout {
        addr: String,
        path: String,
        timeout: Duration,
    },
    #[error("request {path} to peer {addr} failed: {detail}")]
    Request {
        addr: String,
        path: String,
        detail: String,
    },
    #[error("peer {addr} refused {path}: {message}")]
    Refused {
        addr: String,
        path: String,
        message: String,
    },
    #[error("{message}")]
    OtherCluster {
        addr: String,
        ours: String,
        theirs: String,
        message: String,
    },
    #[error("peer {addr} answered {path} with HTTP {status}: {body}")]
    Status {
        addr: String,
        path: String,
        status: u16,
        body: String,
    },
    #[error("cannot decode peer {addr}'s answer to {path}: {source}")]
    Decode {
        addr: String,
        path: String,
        source: super::codec::CodecError,
    },
}

impl TransportError {
    /// Whether the peer is down or not ours to talk to (no connection, a failed handshake, it
    /// refuses us, another cluster): retrying at once is pointless.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. }
                | TransportError::Refused { .. }
                | TransportError::OtherCluster { .. }
                | TransportError::NoTls { .. }
        )
    }
}

/// The client side of the peer transport: pooled mutual-TLS connections per peer, shared by
/// every caller, each request carrying this node's cluster id. Cheap to clone.
#[derive(Clone)]
pub struct PeerClient {
    inner: Arc<PeerClientInner>,
}

struct PeerClientInner {
    node: String,
    tls: Option<crate::tls::client::PeerClient>,
    cluster_id: ClusterIdFn,
    quiet: Quiet,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("node", &self.inner.node)
            .field("tls", &self.inner.tls.is_some())
            .finish()
    }
}

fn truncated(bytes: &[u8]) -> String {
    let mut body = String::from_utf8_lossy(bytes).into_owned();
    if body.len() > 512 {
        let mut cut = 512;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body.truncate(cut);
        body.push('…');
    }
    body
}

fn error_message(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| truncated(bytes))
}

impl PeerClient {
    /// A client for node `node`; `tls: None` (a one-node cluster without `[cluster.tls]`)
    /// refuses every request.
    pub fn new(
        node: &str,
        tls: Option<crate::tls::PeerTls>,
        cluster_id: ClusterIdFn,
    ) -> PeerClient {
        PeerClient {
            inner: Arc::new(PeerClientInner {
                node: node.to_owned(),
                tls: tls.map(|t| {
                    crate::tls::client::PeerClient::new(t, CONNECT_TIMEOUT, MAX_RESPONSE_BYTES)
                }),
                cluster_id,
                quiet: Quiet::default(),
            }),
        }
    }

    /// Forgets the pooled connections to `peer` (it left the cluster).
    pub fn forget(&self, peer: &str) {
        if let Some(tls) = &self.inner.tls {
            tls.forget(peer);
        }
    }

    /// POSTs `req` (MessagePack) to `peer` at `addr`, and decodes the answer. `timeout` bounds
    /// the whole exchange (a new connection is bounded by [`CONNECT_TIMEOUT`] too).
    pub async fn post<Req, Resp>(
        &self,
        peer: &str,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned + Send + 'static,
    {
        let body = super::codec::to_wire(req).map_err(|source| TransportError::Encode {
            path: path.to_owned(),
            source,
        })?;
        self.post_encoded(peer, addr, path, body, timeout).await
    }

    /// `post` with a body already encoded.
    pub async fn post_encoded<Resp>(
        &self,
        peer: &str,
        addr: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, TransportError>
    where
        Resp: DeserializeOwned + Send + 'static,
    {
        let Some(tls) = &self.inner.tls else {
            return Err(TransportError::NoTls {
                peer: peer.to_owned(),
                addr: addr.to_owned(),
            });
        };
        let ours = (self.inner.cluster_id)();
        let mut headers = HeaderMap::new();
        if let Some(id) = &ours
            && let Ok(v) = HeaderValue::from_str(id)
        {
            headers.insert(HeaderName::from_static(CLUSTER_HEADER), v);
        }
        let resp = tls
            .post_with(
                peer,
                addr,
                path,
                CONTENT_TYPE,
                headers,
                Bytes::from(body),
                timeout,
            )
            .await
            .map_err(|e| match e {
                ClientError::Connect { .. }
                | ClientError::ConnectTimeout { .. }
                | ClientError::Tls { .. }
                | ClientError::Invalid { .. } => TransportError::Connect {
                    addr: addr.to_owned(),
                    detail: e.to_string(),
                },
                ClientError::Timeout { .. } => TransportError::Timeout {
                    addr: addr.to_owned(),
                    path: path.to_owned(),
                    timeout,
                },
                ClientError::Http { .. } => TransportError::Request {
                    addr: addr.to_owned(),
                    path: path.to_owned(),
                    detail: e.to_string(),
                },
            })?;
        // The answer of another cluster's node is not ours to use, whatever it says.
        if let (Some(ours), Some(theirs)) = (&ours, header_id(&resp.headers))
            && ours != theirs
        {
            let message = other_cluster_message(
                &self.inner.node,
                ours,
                &format!("peer {peer} at {addr}"),
                theirs,
            );
            if self.inner.quiet.should_log(peer, Duration::from_secs(10)) {
                tracing::warn!(peer, addr, ours = %ours, theirs = %theirs, "{message}");
            }
            return Err(TransportError::OtherCluster {
                addr: addr.to_owned(),
                ours: ours.clone(),
                theirs: theirs.to_owned(),
                message,
            });
        }
        let status = resp.status;
        let bytes = resp.body;
        if status == StatusCode::FORBIDDEN {
            let message = error_message(&bytes);
            if self.inner.quiet.should_log(peer, Duration::from_secs(10)) {
                tracing::warn!(peer, addr, path, %message, "a peer refused this node");
            }
            return Err(TransportError::Refused {
                addr: addr.to_owned(),
                path: path.to_owned(),
                message,
            });
        }
        if !status.is_success() {
            return Err(TransportError::Status {
                addr: addr.to_owned(),
                path: path.to_owned(),
                status: status.as_u16(),
                body: truncated(&bytes),
            });
        }
        let decode = move |bytes: Bytes| super::codec::from_wire::<Resp>(&bytes);
        let decoded = if bytes.len() > BLOCKING_DECODE_BYTES {
            tokio::task::spawn_blocking(move || decode(bytes))
                .await
                .map_err(|e| TransportError::Request {
                    addr: addr.to_owned(),
                    path: path.to_owned(),
                    detail: format!("the decoder failed: {e}"),
                })?
        } else {
            decode(bytes)
        };
        decoded.map_err(|source| TransportError::Decode {
            addr: addr.to_owned(),
            path: path.to_owned(),
            source,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// openraft network

/// openraft's network factory over [`PeerClient`].
#[derive(Clone, Debug)]
pub struct Network {
    client: PeerClient,
    campaigns: Arc<CampaignWatch>,
    acks: Acks,
}

/// Which voters accepted this node's leadership, and when it asked (see [`QuorumClock`]).
pub type Acks = Arc<Mutex<QuorumClock<NodeId>>>;

impl Network {
    /// `campaigns` learns what this node's vote requests are refused for, `acks` which
    /// appends were answered by a follower that accepted this node as leader.
    pub fn new(client: PeerClient, campaigns: Arc<CampaignWatch>, acks: Acks) -> Self {
        Network {
            client,
            campaigns,
            acks,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerConnection {
        PeerConnection {
            client: self.client.clone(),
            target,
            member: node.clone(),
            campaigns: self.campaigns.clone(),
            acks: self.acks.clone(),
            large: None,
        }
    }
}

/// The connection to one peer (no socket of its own: the pooled client holds those).
#[derive(Debug)]
pub struct PeerConnection {
    client: PeerClient,
    target: NodeId,
    member: Member,
    campaigns: Arc<CampaignWatch>,
    acks: Acks,
    /// The large append still on its way, which a retry of the same append waits for.
    large: Option<LargeAppend>,
}

type AppendResult =
    Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>>;

/// An append that openraft may send again: the same vote, position and entries (a log's
/// entries are consecutive, so the first and last id say which).
#[derive(Debug, Clone, PartialEq, Eq)]
struct AppendKey {
    vote: Vote<NodeId>,
    prev: Option<LogId<NodeId>>,
    last: Option<LogId<NodeId>>,
}

impl AppendKey {
    fn of(rpc: &AppendEntriesRequest<TypeConfig>) -> Self {
        AppendKey {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
            last: rpc.entries.last().map(|e| e.log_id),
        }
    }
}

#[derive(Debug)]
struct LargeAppend {
    key: AppendKey,
    bytes: usize,
    started: Instant,
    /// How many times openraft sent this append again while it was on its way.
    retries: u32,
    task: tokio::task::JoinHandle<AppendResult>,
}

impl Drop for PeerConnection {
    fn drop(&mut self) {
        // The replication stream is over (this node no longer leads, or the peer left).
        if let Some(l) = self.large.take() {
            l.task.abort();
        }
    }
}

impl PeerConnection {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned + Send + 'static,
        E: StdError + DeserializeOwned + Send + 'static,
    {
        let body = super::codec::to_wire(req).map_err(|e| {
            RPCError::Network(NetworkError::new(&PeerError {
                member: self.member.clone(),
                source: TransportError::Encode {
                    path: path.to_owned(),
                    source: e,
                },
            }))
        })?;
        self.call_encoded(path, body, option).await
    }

    /// Waits for a large append to be answered. When openraft stops waiting first (after a
    /// heartbeat interval), the append stays here, still on its way, for openraft's retry.
    async fn await_large(&mut self, large: LargeAppend) -> AppendResult {
        let large = self.large.insert(large);
        let res = (&mut large.task).await;
        let (bytes, took, retries) = (large.bytes, large.started.elapsed(), large.retries);
        self.large = None;
        if retries > 0 {
            tracing::info!(
                peer = %self.member.name,
                bytes,
                took_ms = took.as_millis() as u64,
                retries,
                ok = matches!(res, Ok(Ok(_))),
                "a large log entry took longer than a heartbeat interval to reach a follower; \
                 openraft's retries waited for it instead of sending it again"
            );
        }
        match res {
            Ok(answer) => answer,
            Err(e) => Err(RPCError::Network(NetworkError::new(&PeerError {
                member: self.member.clone(),
                source: TransportError::Request {
                    addr: self.member.addr.clone(),
                    path: APPEND_PATH.to_owned(),
                    detail: format!("the sending task ended: {e}"),
                },
            }))),
        }
    }

    async fn call_encoded<Resp, E>(
        &self,
        path: &str,
        body: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned + Send + 'static,
        E: StdError + DeserializeOwned + Send + 'static,
    {
        // soft_ttl: answer before openraft cancels the call at hard_ttl, so that the error is
        // ours (and classified) rather than a bare cancellation.
        post_to_peer(
            &self.client,
            &self.member,
            self.target,
            path,
            body,
            option.soft_ttl(),
        )
        .await
    }
}

async fn post_to_peer<Resp, E>(
    client: &PeerClient,
    member: &Member,
    target: NodeId,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
where
    Resp: DeserializeOwned + Send + 'static,
    E: StdError + DeserializeOwned + Send + 'static,
{
    let res: Result<Resp, RaftError<NodeId, E>> = client
        .post_encoded(&member.name, &member.addr, path, body, timeout)
        .await
        .map_err(|e| {
            let e = PeerError {
                member: member.clone(),
                source: e,
            };
            if e.source.is_unreachable() {
                RPCError::Unreachable(Unreachable::new(&e))
            } else {
                // Includes a request timeout on an established connection: the peer is alive
                // but slow. Backing off (Unreachable) would stop heartbeats to it for longer
                // than the election timeout; openraft treats its own timeouts the same way.
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
    res.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(target, member.clone(), e)))
}

/// Sends an encoded append and records the answer of a follower that took this node's vote.
async fn send_append(
    client: PeerClient,
    member: Member,
    target: NodeId,
    acks: Acks,
    vote: Vote<NodeId>,
    body: Vec<u8>,
    timeout: Duration,
) -> AppendResult {
    // Read before anything is sent: the follower's answer proves the leadership no earlier
    // than this.
    let sent = crate::clock::now();
    let resp: AppendEntriesResponse<NodeId> =
        post_to_peer(&client, &member, target, APPEND_PATH, body, timeout).await?;
    // Every answer but a higher vote means the follower took this vote as its own (a log
    // conflict is found after that): it votes for no later term before it answered.
    if vote.is_committed() && !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
        acks.lock().unwrap_or_else(PoisonError::into_inner).ack(
            vote.leader_id().get_term(),
            target,
            sent,
        );
    }
    Ok(resp)
}

/// A transport error with the peer's name, for openraft's logs.
#[derive(Debug, thiserror::Error)]
#[error("peer {}: {source}", member.name)]
struct PeerError {
    member: Member,
    source: TransportError,
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let key = AppendKey::of(&rpc);
        match self.large.take() {
            Some(mut large) if large.key == key => {
                large.retries += 1;
                return self.await_large(large).await;
            }
            // Another term: nobody will wait for the old append.
            Some(large) if large.key.vote != key.vote => large.task.abort(),
            // A heartbeat between openraft's retries of a large append goes beside it.
            other => self.large = other,
        }
        // openraft waits one heartbeat interval for an append: one that carries much must be
        // cut into smaller ones, or it would time out and be sent again forever.
        let entries = rpc.entries.len() as u64;
        let body = super::codec::to_wire(&rpc).map_err(|e| {
            RPCError::Network(NetworkError::new(&PeerError {
                member: self.member.clone(),
                source: TransportError::Encode {
                    path: APPEND_PATH.to_owned(),
                    source: e,
                },
            }))
        })?;
        if entries > 1 && body.len() > APPEND_BUDGET_BYTES {
            let hint = (entries * APPEND_BUDGET_BYTES as u64 / body.len() as u64).max(1);
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        let large = body.len() > APPEND_BUDGET_BYTES;
        let bytes = body.len();
        let send = send_append(
            self.client.clone(),
            self.member.clone(),
            self.target,
            self.acks.clone(),
            rpc.vote,
            body,
            if large {
                LARGE_APPEND_TIMEOUT
            } else {
                option.soft_ttl()
            },
        );
        if !large {
            return send.await;
        }
        // One large append on its way at a time: openraft moved on from the old one.
        if let Some(old) = self.large.take() {
            old.task.abort();
        }
        let large = LargeAppend {
            key,
            bytes,
            started: Instant::now(),
            retries: 0,
            task: tokio::spawn(send),
        };
        self.await_large(large).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(SNAPSHOT_PATH, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.campaigns.asking(rpc.vote.leader_id.term);
        let resp: VoteResponse<NodeId> = self.call(VOTE_PATH, &rpc, &option).await?;
        if !resp.vote_granted {
            self.campaigns
                .refused(rpc.vote.leader_id.term, resp.last_log_id, rpc.last_log_id);
        }
        Ok(resp)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(PEER_BACKOFF))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::tls::PeerTls;
    use crate::tls::server::{ServeOptions, serve};
    use crate::tls::testutil::TestPki;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Echo {
        n: u64,
    }

    fn fixed_id(id: Option<&str>) -> ClusterIdFn {
        let id = id.map(str::to_owned);
        Arc::new(move || id.clone())
    }

    /// Serves `router` as `name` behind the guard with cluster id `id`, members `members`.
    async fn serve_as(
        pki: &TestPki,
        name: &str,
        id: Option<&str>,
        members: &'static [&'static str],
        router: Router,
    ) -> SocketAddr {
        let tls = PeerTls::load(pki.node(name), name).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServeOptions::default()
            .members_only(move || members.iter().map(|m| m.to_string()).collect::<Vec<_>>());
        let router = guarded(router, Guard::new(name, fixed_id(id)));
        tokio::spawn(serve(
            listener,
            tls,
            router,
            options,
            std::future::pending(),
        ));
        addr
    }

    fn client_as(pki: &TestPki, name: &str, id: Option<&str>) -> PeerClient {
        PeerClient::new(
            name,
            Some(PeerTls::load(pki.node(name), name).unwrap()),
            fixed_id(id),
        )
    }

    fn echo_router(calls: Arc<AtomicUsize>) -> Router {
        Router::new().route(
            "/echo",
            post(move |Msg(e): Msg<Echo>| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Msg(Echo { n: e.n + 1 })
                }
            })
            .layer(DefaultBodyLimit::max(1024)),
        )
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[tokio::test]
    async fn members_of_one_cluster_talk_and_other_clusters_are_refused_both_ways() {
        let pki = TestPki::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let addr = serve_as(
            &pki,
            "gw1",
            Some(A),
            &["gw1", "gw2"],
            echo_router(calls.clone()),
        )
        .await
        .to_string();
        let t = Duration::from_secs(2);

        // Same cluster; and a node without an id yet (a new member) passes too.
        let gw2 = client_as(&pki, "gw2", Some(A));
        let got: Echo = gw2
            .post("gw1", &addr, "/echo", &Echo { n: 1 }, t)
            .await
            .unwrap();
        assert_eq!(got, Echo { n: 2 });
        let fresh = client_as(&pki, "gw2", None);
        let got: Echo = fresh
            .post("gw1", &addr, "/echo", &Echo { n: 2 }, t)
            .await
            .unwrap();
        assert_eq!(got, Echo { n: 3 });
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // A member's name and the same CA, but another cluster: refused by the receiver before
        // the handler, with both ids named.
        let stranger = client_as(&pki, "gw2", Some(B));
        let e = stranger
            .post::<_, Echo>("gw1", &addr, "/echo", &Echo { n: 1 }, t)
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::OtherCluster { .. }), "{e}");
        assert!(e.is_unreachable());
        let m = e.to_string();
        assert!(m.contains(A) && m.contains(B), "{m}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "no handler ran");

        // The caller refuses the answer of another cluster's node too (here the server has an
        // id and the answer carries it, the caller holds another).
        let b_server = serve_as(
            &pki,
            "gw3",
            Some(B),
            &["gw2", "gw3"],
            echo_router(calls.clone()),
        )
        .await
        .to_string();
        let e = gw2
            .post::<_, Echo>("gw3", &b_server, "/echo", &Echo { n: 1 }, t)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, TransportError::OtherCluster { ours, theirs, .. } if ours == A && theirs == B),
            "{e}"
        );

        // Not a member: 403 before the body is read.
        let gw9 = client_as(&pki, "gw9", Some(A));
        let e = gw9
            .post::<_, Echo>("gw1", &addr, "/echo", &Echo { n: 1 }, t)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, TransportError::Refused { message, .. } if message.contains("not a member")),
            "{e}"
        );
        // Another CA: the handshake fails.
        let other_ca = TestPki::new();
        let e = client_as(&other_ca, "gw2", Some(A))
            .post::<_, Echo>("gw1", &addr, "/echo", &Echo { n: 1 }, t)
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // A body over the route's limit: refused, no handler.
        let big = vec![7u8; 4096];
        let e = gw2
            .post::<_, Echo>("gw1", &addr, "/echo", &big, t)
            .await
            .unwrap_err();
        assert!(
            matches!(e, TransportError::Status { status: 413, .. }),
            "{e}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        // Without TLS a node talks to nobody.
        let none = PeerClient::new("solo", None, fixed_id(None));
        let e = none
            .post::<_, Echo>("gw1", &addr, "/echo", &Echo { n: 1 }, t)
            .await
            .unwrap_err();
        assert!(
            matches!(e, TransportError::NoTls { .. }) && e.is_unreachable(),
            "{e}"
        );
    }

    #[tokio::test]
    async fn raft_network_maps_errors_for_openraft() {
        use openraft::Vote;

        let pki = TestPki::new();
        let heartbeat = || AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![],
        };
        let opt = || RPCOption::new(Duration::from_millis(500));
        let mut net = Network::new(
            client_as(&pki, "gw1", Some(A)),
            Default::default(),
            Default::default(),
        );
        let member = |name: &str, addr: String| Member {
            name: name.to_owned(),
            addr,
        };

        // Nothing listens: Unreachable, so openraft backs off.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut conn = net
            .new_client(7, &member("gw2", format!("127.0.0.1:{port}")))
            .await;
        let e = conn.append_entries(heartbeat(), opt()).await.unwrap_err();
        assert!(matches!(e, RPCError::Unreachable(_)), "{e}");
        assert!(e.to_string().contains("peer gw2"), "{e}");

        // A node of another cluster: Unreachable too (retrying at once cannot help), and the
        // message says why.
        let other = Router::new().route(APPEND_PATH, post(|| async { "unreached" }));
        let addr = serve_as(&pki, "gw2", Some(B), &["gw1", "gw2"], other).await;
        let mut conn = net.new_client(7, &member("gw2", addr.to_string())).await;
        let e = conn.append_entries(heartbeat(), opt()).await.unwrap_err();
        assert!(matches!(e, RPCError::Unreachable(_)), "{e}");
        assert!(e.to_string().contains(B), "{e}");

        // A peer answering something else (here 404): NetworkError.
        let addr = serve_as(&pki, "gw3", Some(A), &["gw1"], Router::new()).await;
        let mut conn = net.new_client(7, &member("gw3", addr.to_string())).await;
        let e = conn.append_entries(heartbeat(), opt()).await.unwrap_err();
        assert!(matches!(e, RPCError::Network(_)), "{e}");

        // The remote Raft's own error comes back as RemoteError.
        let remote = Router::new().route(
            APPEND_PATH,
            post(|| async {
                let r: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
                    Err(RaftError::Fatal(openraft::error::Fatal::Stopped));
                Msg(r)
            }),
        );
        let addr = serve_as(&pki, "gw4", Some(A), &["gw1"], remote).await;
        let mut conn = net.new_client(7, &member("gw4", addr.to_string())).await;
        let e = conn.append_entries(heartbeat(), opt()).await.unwrap_err();
        match e {
            RPCError::RemoteError(r) => {
                assert_eq!(r.target, 7);
                assert!(matches!(
                    r.source,
                    RaftError::Fatal(openraft::error::Fatal::Stopped)
                ));
            }
            other => panic!("expected RemoteError, got {other}"),
        }

        // The transport's own cost (TLS on a pooled connection, MessagePack both ways) of an
        // empty append, against a handler that answers at once.
        let mut lat = Vec::new();
        for _ in 0..200 {
            let t = std::time::Instant::now();
            let _ = conn.append_entries(heartbeat(), opt()).await;
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "empty append round trip on loopback over mutual TLS: median {:?}, p99 {:?}",
            lat[100], lat[198]
        );
    }

    /// A follower that needs longer than a heartbeat interval to take a large entry gets it
    /// once, and openraft's retries (each given one heartbeat interval, then cancelled) wait for
    /// that one request instead of sending the entry again, until it is answered. Before, every
    /// retry sent the entry anew and was cancelled in turn: the entry never committed.
    #[tokio::test]
    async fn a_slow_follower_gets_a_large_entry_once_and_retries_wait_for_it() {
        use crate::cluster::Command;
        use crate::cluster::codec::Versioned;
        use openraft::{Entry, EntryPayload, Vote};

        let pki = TestPki::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let slow = Router::new().route(
            APPEND_PATH,
            limit_body(
                post(move |Msg(req): Msg<AppendEntriesRequest<TypeConfig>>| {
                    let calls = counted.clone();
                    async move {
                        // Heartbeats are answered at once, entries take long.
                        if !req.entries.is_empty() {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let r: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
                            Ok(AppendEntriesResponse::Success);
                        Msg(r)
                    }
                }),
                RouteLimits::APPEND,
            ),
        );
        let addr = serve_as(&pki, "gw2", Some(A), &["gw1"], slow).await;
        let mut net = Network::new(
            client_as(&pki, "gw1", Some(A)),
            Default::default(),
            Default::default(),
        );
        let member = Member {
            name: "gw2".into(),
            addr: addr.to_string(),
        };
        let mut conn = net.new_client(7, &member).await;
        let leader = openraft::CommittedLeaderId::new(3, 1);
        let policy = crate::model::Policy {
            name: "big".into(),
            egress_gateway_name: "vip".into(),
            source_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            destination_cidrs: (0..20_000u32)
                .map(|i| format!("100.{}.{}.0/24", i >> 8, i & 255).parse().unwrap())
                .collect(),
            excluded_cidrs: vec![],
        };
        let append = |index: u64| AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(openraft::LogId::new(leader, index - 1)),
            leader_commit: None,
            entries: vec![Entry {
                log_id: openraft::LogId::new(leader, index),
                payload: EntryPayload::Normal(Versioned(Command::Apply {
                    gateways: vec![],
                    policies: vec![policy.clone()],
                })),
            }],
        };
        assert!(
            crate::cluster::codec::to_wire(&append(10)).unwrap().len() > APPEND_BUDGET_BYTES,
            "the entry is a large one"
        );
        // As openraft's replication does: one heartbeat interval per attempt, then again, with
        // heartbeats (empty appends) in between.
        let heartbeat = Duration::from_millis(50);
        let empty = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(openraft::LogId::new(leader, 9)),
            leader_commit: None,
            entries: vec![],
        };
        let mut attempts = 0;
        let answer = loop {
            attempts += 1;
            assert!(attempts <= 100, "never answered");
            let call = conn.append_entries(append(10), RPCOption::new(heartbeat));
            if let Ok(r) = tokio::time::timeout(heartbeat, call).await {
                break r;
            }
            let beat = conn
                .append_entries(empty.clone(), RPCOption::new(heartbeat))
                .await;
            assert!(
                matches!(beat, Ok(AppendEntriesResponse::Success)),
                "a heartbeat beside the large append: {beat:?}"
            );
        };
        assert!(
            matches!(answer, Ok(AppendEntriesResponse::Success)),
            "{answer:?}"
        );
        assert!(attempts > 1, "the follower took longer than one attempt");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the entry was sent once");

        // The next append is another one: sent, not joined to the one answered.
        let answer = conn
            .append_entries(append(11), RPCOption::new(Duration::from_secs(2)))
            .await;
        assert!(
            matches!(answer, Ok(AppendEntriesResponse::Success)),
            "{answer:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// The body limits hold the largest legitimate payloads: an entry of the largest size a
    /// node proposes, a snapshot chunk of bytes that each take two in MessagePack, a vote, a
    /// report of a node with many interfaces; and a 500-policy part is far below an entry.
    #[test]
    fn the_largest_legitimate_bodies_fit_the_limits() {
        use crate::cluster::Command;
        use crate::cluster::codec::{Versioned, to_wire};
        use openraft::{Entry, EntryPayload, LogId, SnapshotMeta, Vote};

        let leader = openraft::CommittedLeaderId::new(3, 1);
        let entry = |cmd: Command| Entry::<TypeConfig> {
            log_id: LogId::new(leader, 10),
            payload: EntryPayload::Normal(Versioned(cmd)),
        };
        // A part of the largest apply: 500 policies of the scale tests' shape.
        let policies: Vec<crate::model::Policy> = (0..crate::cluster::node::OBJECTS_PER_ENTRY)
            .map(|i| crate::model::Policy {
                name: format!("src-{i:06}"),
                egress_gateway_name: "vip".into(),
                source_cidrs: vec![format!("10.100.{}.{}/32", i >> 8, i & 255).parse().unwrap()],
                destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                excluded_cidrs: vec![],
            })
            .collect();
        let part = Command::Stage {
            txn: u64::MAX,
            part: 199,
            command: Box::new(Command::Apply {
                gateways: vec![],
                policies,
            }),
        };
        let one_part = to_wire(&Versioned(part.clone())).unwrap().len();
        let append = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(leader, 9)),
            leader_commit: Some(LogId::new(leader, 9)),
            entries: vec![entry(part.clone())],
        };
        let append_len = to_wire(&append).unwrap().len();
        println!("a 500-policy part: {one_part} bytes; as an append {append_len} bytes");
        assert!(append_len + (MAX_ENTRY_BYTES - one_part) <= RouteLimits::APPEND);
        assert!(to_wire(&part).unwrap().len() <= RouteLimits::WRITE);

        // A snapshot chunk of bytes ≥ 128 (two bytes each in MessagePack).
        let chunk = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(leader, 100_000)),
                last_membership: Default::default(),
                snapshot_id: format!("{}-100000-{}", leader, u128::MAX),
            },
            offset: u64::MAX,
            data: vec![0xff; SNAPSHOT_CHUNK_BYTES],
            done: false,
        };
        let chunk_len = to_wire(&chunk).unwrap().len();
        println!(
            "a snapshot chunk: {chunk_len} bytes (limit {})",
            RouteLimits::SNAPSHOT
        );
        assert!(chunk_len <= RouteLimits::SNAPSHOT);
        assert!(
            chunk_len > RouteLimits::SNAPSHOT - 128 * 1024,
            "the limit fits the chunk"
        );

        let vote = VoteRequest::<NodeId> {
            vote: Vote::new(u64::MAX, u64::MAX),
            last_log_id: Some(LogId::new(leader, u64::MAX)),
        };
        assert!(to_wire(&vote).unwrap().len() * 8 <= RouteLimits::VOTE);

        // A node with 1 000 interfaces and 100 labels.
        let report = crate::cluster::controller::Report {
            node: "a-node-name-of-sixty-three-characters-aaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            interfaces: (0..1000)
                .map(|i| {
                    (
                        format!("interface{i:06}"),
                        crate::model::InterfaceState {
                            up: true,
                            primary_ipv4: Some("10.0.0.1".parse().unwrap()),
                        },
                    )
                })
                .collect(),
            labels: (0..100)
                .map(|i| (format!("example.com/label-{i:03}"), "a-value".repeat(9)))
                .collect(),
            ..Default::default()
        };
        let report_len = to_wire(&report).unwrap().len();
        println!("a report of 1 000 interfaces and 100 labels: {report_len} bytes");
        assert!(report_len <= RouteLimits::REPORT);
    }
}
