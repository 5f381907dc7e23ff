//! The authenticated HTTP transport between egressd peers: Raft's RPCs and, through the same
//! generic pieces, the application RPCs egressd adds (node reports, forwarded writes).
//!
//! # Authentication
//!
//! The cluster state is not secret; what matters is its integrity and who may vote and append.
//! Every peer is configured with the same cluster secret and every request carries
//!
//! ```text
//! x-egressd-auth: t=<unix millis>,mac=<hex hmac-sha256(secret, METHOD "\n" PATH "\n" t "\n" BODY)>
//! ```
//!
//! The receiver recomputes the MAC, compares it in constant time and rejects a timestamp more
//! than [`MAX_SKEW`] away from its own clock. There is no nonce cache: a request replayed inside
//! the window is harmless, because
//! - Raft RPCs are idempotent by construction: a follower checks the vote (term, leader) and the
//!   log ids of every AppendEntries / InstallSnapshot / RequestVote, so a replayed request either
//!   repeats what was already done or is refused as stale;
//! - the application RPCs egressd adds are idempotent too: a node report replaces the previous
//!   report, and a forwarded write is a whole-value command (put, delete, cordon, …) whose second
//!   application changes nothing.
//!
//! The transport is plain HTTP: a peer on the path can read the traffic (the state is not
//! secret) but cannot forge or alter requests. Responses are not signed; a man in the middle can
//! answer for a peer, which at worst makes that peer look unreachable or behind.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, OriginalUri, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hmac::{Hmac, KeyInit, Mac};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

use super::{Member, NodeId, Raft, TypeConfig};

/// The request header carrying the timestamp and MAC.
pub const AUTH_HEADER: &str = "x-egressd-auth";
/// Largest accepted request body. Snapshots travel as JSON chunks (openraft's default chunk is
/// 3 MiB, a few times that as a JSON number array), so this leaves ample room.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Largest accepted distance between the signer's clock and the verifier's.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// Shortest accepted cluster secret.
pub const MIN_SECRET_LEN: usize = 16;
/// How long a client waits for a TCP connection to a peer. Short: failover speed depends on
/// noticing dead peers fast, and a live peer on a LAN answers a SYN in well under a millisecond.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// How long openraft waits before retrying a peer after [`Unreachable`]. openraft's default is
/// 500 ms, longer than the election timeout: a follower that the leader stops contacting for
/// that long (e.g. it just restarted) campaigns and disrupts the cluster. Shorter than the
/// smallest election timeout we use (150 ms); a refused connection costs next to nothing.
pub const PEER_BACKOFF: Duration = Duration::from_millis(100);

pub const APPEND_PATH: &str = "/raft/append";
/// The most an append carries when it holds more than one entry (see `append_entries`).
pub const APPEND_BUDGET_BYTES: usize = 64 * 1024;
pub const VOTE_PATH: &str = "/raft/vote";
pub const SNAPSHOT_PATH: &str = "/raft/snapshot";

type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------------------------
// Auth

/// The cluster secret, able to sign and verify requests. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    /// The HMAC keyed with the secret, cloned for every message.
    keyed: HmacSha256,
    key_len: usize,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("secret", &format_args!("<{} bytes>", self.key_len))
            .finish()
    }
}

/// A cluster secret that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the cluster secret file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the cluster secret {origin} is {len} bytes (after trimming whitespace); at least \
         {MIN_SECRET_LEN} are required, e.g. the output of `head -c 32 /dev/urandom | base64`, \
         the same on every node"
    )]
    TooShort { origin: String, len: usize },
    #[error("cannot key HMAC-SHA256 with the cluster secret: {0}")]
    Key(String),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing {AUTH_HEADER} header: this endpoint is for egressd peers configured with the \
         same cluster secret"
    )]
    Missing,
    #[error(
        "malformed {AUTH_HEADER} header ({0}): expected t=<unix millis>,mac=<hex hmac-sha256>; \
         is the peer an egressd of a compatible version?"
    )]
    Malformed(String),
    #[error(
        "bad signature: the peer's cluster secret differs from this node's (or the request was \
         altered in transit)"
    )]
    BadSignature,
    #[error(
        "timestamp skew: the request was signed at {signed_ms} ms since the epoch, this node's \
         clock says {now_ms} ms ({} ms apart, at most {} ms allowed); check the clocks (NTP) of \
         both nodes", signed_ms.abs_diff(*now_ms), MAX_SKEW.as_millis()
    )]
    Skew { signed_ms: u64, now_ms: u64 },
}

impl Auth {
    /// An `Auth` for the given secret; refuses one shorter than [`MIN_SECRET_LEN`] bytes.
    pub fn new(secret: &[u8]) -> Result<Self, SecretError> {
        Self::with_origin(secret, || "given".to_owned())
    }

    fn with_origin(secret: &[u8], origin: impl FnOnce() -> String) -> Result<Self, SecretError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort {
                origin: origin(),
                len: secret.len(),
            });
        }
        let keyed = <HmacSha256 as KeyInit>::new_from_slice(secret)
            .map_err(|e| SecretError::Key(e.to_string()))?;
        Ok(Auth {
            keyed,
            key_len: secret.len(),
        })
    }

    /// Reads the secret from a file, ignoring leading and trailing whitespace (so a trailing
    /// newline from `echo` or an editor does not matter).
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let raw = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::with_origin(raw.trim_ascii(), || format!("in {}", path.display()))
    }

    fn mac(&self, method: &str, path: &str, t_ms: u64, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(method.as_bytes());
        mac.update(b"\n");
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(t_ms.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// The header value for a request signed now.
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> String {
        self.sign_at(method, path, body, unix_millis())
    }

    /// The header value for a request signed at `t_ms` (milliseconds since the Unix epoch).
    pub fn sign_at(&self, method: &str, path: &str, body: &[u8], t_ms: u64) -> String {
        let tag = self.mac(method, path, t_ms, body).finalize().into_bytes();
        format!("t={t_ms},mac={}", hex_encode(&tag))
    }

    /// Checks a request's header value (`None` if the header is absent) against this node's clock.
    pub fn verify(
        &self,
        header: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), AuthError> {
        self.verify_at(header, method, path, body, unix_millis())
    }

    /// As [`Auth::verify`], with the verifier's clock reading `now_ms`.
    pub fn verify_at(
        &self,
        header: Option<&str>,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (t_ms, tag) = parse_header(header)?;
        // The MAC first: a request from a peer with another secret is reported as such even if
        // its clock is off too. The timestamp is covered by the MAC, so it is trustworthy after.
        self.mac(method, path, t_ms, body)
            .verify_slice(&tag)
            .map_err(|_| AuthError::BadSignature)?;
        if u128::from(t_ms.abs_diff(now_ms)) > MAX_SKEW.as_millis() {
            return Err(AuthError::Skew {
                signed_ms: t_ms,
                now_ms,
            });
        }
        Ok(())
    }
}

fn parse_header(header: &str) -> Result<(u64, Vec<u8>), AuthError> {
    let mut t = None;
    let mut mac = None;
    for part in header.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("t=") {
            t = Some(
                v.parse::<u64>()
                    .map_err(|e| AuthError::Malformed(format!("timestamp {v:?}: {e}")))?,
            );
        } else if let Some(v) = part.strip_prefix("mac=") {
            mac =
                Some(hex_decode(v).ok_or_else(|| {
                    AuthError::Malformed(format!("mac is not hexadecimal: {v:?}"))
                })?);
        }
    }
    match (t, mac) {
        (Some(t), Some(mac)) => Ok((t, mac)),
        (None, _) => Err(AuthError::Malformed("no t= field".to_owned())),
        (_, None) => Err(AuthError::Malformed("no mac= field".to_owned())),
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        // A clock before 1970 is broken; the skew check will say so.
        .unwrap_or(0)
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Bodies: MessagePack (see `codec`)

/// The content type of every peer RPC body.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// Bodies above this are decoded off the async threads (a 100 KB log entry, a snapshot chunk).
const BLOCKING_DECODE_BYTES: usize = 64 * 1024;

/// A MessagePack request body (extractor) or response (`IntoResponse`).
pub struct Msg<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for Msg<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send + 'static,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
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

// ---------------------------------------------------------------------------------------------
// Server side

/// Puts `router` behind the cluster-secret check: a request is buffered (at most
/// [`MAX_BODY_BYTES`]), verified, and passed on with its body re-attached; otherwise it is
/// answered with 401 and a JSON `{"error": "..."}` saying why, and no handler runs.
pub fn authenticated(router: Router, auth: Auth) -> Router {
    router
        .layer(middleware::from_fn_with_state(auth, require_auth))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

fn json_error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

async fn require_auth(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes: Bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "cannot read the request body (at most {MAX_BODY_BYTES} bytes accepted): {}",
                    error_chain(&e)
                ),
            );
        }
    };
    // Under `Router::nest` the URI is stripped of the prefix; the client signed the full path.
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map(|u| &u.0)
        .unwrap_or(&parts.uri);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let header = match parts.headers.get(AUTH_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return json_error(
                StatusCode::UNAUTHORIZED,
                AuthError::Malformed("not ASCII".to_owned()).to_string(),
            );
        }
    };
    if let Err(e) = auth.verify(header, parts.method.as_str(), path, &bytes) {
        tracing::warn!(%path, error = %e, "refused a peer request");
        return json_error(StatusCode::UNAUTHORIZED, e.to_string());
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The Raft RPC endpoints: POST [`APPEND_PATH`], [`VOTE_PATH`], [`SNAPSHOT_PATH`], each taking
/// the openraft request as JSON and answering the openraft `Result<Response, RaftError<..>>` as
/// JSON. Serve it behind [`authenticated`].
pub fn raft_routes(raft: Raft) -> Router {
    Router::new()
        .route(APPEND_PATH, post(append_handler))
        .route(VOTE_PATH, post(vote_handler))
        .route(SNAPSHOT_PATH, post(snapshot_handler))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(raft)
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
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("bad request path {0:?}: it must start with '/'")]
    InvalidPath(String),
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
    Unauthorized {
        addr: String,
        path: String,
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
    /// Whether the peer is down or not ours to talk to (no connection, or it refuses our
    /// credentials): retrying at once is pointless.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::Unauthorized { .. }
        )
    }
}

/// Joins an error and its sources: reqwest's own message ("error sending request") hides the
/// useful part ("Connection refused") in the source chain.
fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let m = src.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = src.source();
    }
    s
}

/// The client side of the peer transport: one pooled HTTP client shared by every connection,
/// signing every request. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PeerClient {
    inner: Arc<PeerClientInner>,
}

#[derive(Debug)]
struct PeerClientInner {
    http: reqwest::Client,
    auth: Auth,
}

impl PeerClient {
    pub fn new(auth: Auth) -> Result<Self, TransportError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Peers talk directly; an HTTP(S)_PROXY in the daemon's environment must not
            // capture cluster traffic.
            .no_proxy()
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| TransportError::Client(error_chain(&e)))?;
        Ok(PeerClient {
            inner: Arc::new(PeerClientInner { http, auth }),
        })
    }

    /// POSTs `req` as JSON to `http://{addr}{path}`, signed, and decodes the JSON answer.
    /// `timeout` bounds the whole exchange (connecting is bounded by [`CONNECT_TIMEOUT`] too).
    pub async fn post<Req, Resp>(
        &self,
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
        self.post_encoded(addr, path, body, timeout).await
    }

    /// `post` with a body already encoded.
    pub async fn post_encoded<Resp>(
        &self,
        addr: &str,
        path: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, TransportError>
    where
        Resp: DeserializeOwned + Send + 'static,
    {
        if !path.starts_with('/') {
            return Err(TransportError::InvalidPath(path.to_owned()));
        }
        let header = self.inner.auth.sign("POST", path, &body);
        let classify = |e: reqwest::Error| {
            if e.is_connect() {
                TransportError::Connect {
                    addr: addr.to_owned(),
                    detail: error_chain(&e),
                }
            } else if e.is_timeout() {
                TransportError::Timeout {
                    addr: addr.to_owned(),
                    path: path.to_owned(),
                    timeout,
                }
            } else {
                TransportError::Request {
                    addr: addr.to_owned(),
                    path: path.to_owned(),
                    detail: error_chain(&e),
                }
            }
        };
        let resp = self
            .inner
            .http
            .post(format!("http://{addr}{path}"))
            .header(AUTH_HEADER, header)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(classify)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(classify)?;
        if status == reqwest::StatusCode::UNAUTHORIZED {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(TransportError::Unauthorized {
                addr: addr.to_owned(),
                path: path.to_owned(),
                message,
            });
        }
        if !status.is_success() {
            let mut body = String::from_utf8_lossy(&bytes).into_owned();
            if body.len() > 512 {
                let mut cut = 512;
                while !body.is_char_boundary(cut) {
                    cut -= 1;
                }
                body.truncate(cut);
                body.push('…');
            }
            return Err(TransportError::Status {
                addr: addr.to_owned(),
                path: path.to_owned(),
                status: status.as_u16(),
                body,
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
}

impl Network {
    pub fn new(client: PeerClient) -> Self {
        Network { client }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerConnection {
        PeerConnection {
            client: self.client.clone(),
            target,
            member: node.clone(),
        }
    }
}

/// The connection to one peer (no socket of its own: the pooled client holds those).
#[derive(Debug)]
pub struct PeerConnection {
    client: PeerClient,
    target: NodeId,
    member: Member,
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
        let res: Result<Resp, RaftError<NodeId, E>> = self
            .client
            .post_encoded(&self.member.addr, path, body, option.soft_ttl())
            .await
            .map_err(|e| {
                let e = PeerError {
                    member: self.member.clone(),
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
        res.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.member.clone(),
                e,
            ))
        })
    }
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
        self.call_encoded(APPEND_PATH, body, &option).await
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
        self.call(VOTE_PATH, &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(PEER_BACKOFF))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef-cluster";
    const NOW: u64 = 1_700_000_000_000;

    fn auth() -> Auth {
        Auth::new(SECRET).unwrap()
    }

    #[test]
    fn valid_signature_is_accepted() {
        let a = auth();
        let h = a.sign_at("POST", "/raft/vote", b"{\"x\":1}", NOW);
        assert!(h.starts_with(&format!("t={NOW},mac=")), "{h}");
        a.verify_at(Some(&h), "POST", "/raft/vote", b"{\"x\":1}", NOW + 29_000)
            .unwrap();
        a.verify_at(Some(&h), "POST", "/raft/vote", b"{\"x\":1}", NOW - 29_000)
            .unwrap();
        // Signing now verifies now.
        let h = a.sign("POST", "/p", b"");
        a.verify(Some(&h), "POST", "/p", b"").unwrap();
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let other = Auth::new(b"another-secret-of-16+bytes").unwrap();
        let h = other.sign_at("POST", "/raft/vote", b"{}", NOW);
        let e = auth()
            .verify_at(Some(&h), "POST", "/raft/vote", b"{}", NOW)
            .unwrap_err();
        assert_eq!(e, AuthError::BadSignature);
        assert!(e.to_string().contains("cluster secret differs"), "{e}");
    }

    #[test]
    fn tampered_body_path_method_or_time_is_rejected() {
        let a = auth();
        let h = a.sign_at("POST", "/raft/append", b"{\"term\":1}", NOW);
        for (method, path, body) in [
            ("POST", "/raft/append", &b"{\"term\":2}"[..]),
            ("POST", "/raft/vote", &b"{\"term\":1}"[..]),
            ("PUT", "/raft/append", &b"{\"term\":1}"[..]),
        ] {
            let e = a.verify_at(Some(&h), method, path, body, NOW).unwrap_err();
            assert_eq!(e, AuthError::BadSignature, "{method} {path}");
        }
        // Moving the timestamp (to dodge the skew check) breaks the MAC.
        let moved = h.replace(&format!("t={NOW}"), &format!("t={}", NOW + 60_000));
        let e = a
            .verify_at(
                Some(&moved),
                "POST",
                "/raft/append",
                b"{\"term\":1}",
                NOW + 60_000,
            )
            .unwrap_err();
        assert_eq!(e, AuthError::BadSignature);
    }

    #[test]
    fn missing_header_is_rejected() {
        let e = auth()
            .verify_at(None, "POST", "/raft/vote", b"", NOW)
            .unwrap_err();
        assert_eq!(e, AuthError::Missing);
        assert!(
            e.to_string()
                .contains("egressd peers configured with the same cluster secret"),
            "{e}"
        );
    }

    #[test]
    fn malformed_header_is_rejected() {
        let a = auth();
        for h in ["", "t=1", "mac=00", "t=x,mac=00", "t=1,mac=zz", "t=1,mac=0"] {
            let e = a.verify_at(Some(h), "POST", "/", b"", NOW).unwrap_err();
            assert!(matches!(e, AuthError::Malformed(_)), "{h:?}: {e:?}");
            assert!(e.to_string().contains("malformed"), "{e}");
        }
        // Well-formed but of the wrong length.
        let e = a
            .verify_at(Some("t=1,mac=00"), "POST", "/", b"", NOW)
            .unwrap_err();
        assert_eq!(e, AuthError::BadSignature);
    }

    #[test]
    fn stale_or_future_timestamp_is_rejected() {
        let a = auth();
        for t in [NOW - 30_001, NOW + 30_001, 0] {
            let h = a.sign_at("POST", "/raft/vote", b"", t);
            let e = a
                .verify_at(Some(&h), "POST", "/raft/vote", b"", NOW)
                .unwrap_err();
            assert_eq!(
                e,
                AuthError::Skew {
                    signed_ms: t,
                    now_ms: NOW
                }
            );
            assert!(e.to_string().contains("timestamp skew"), "{e}");
            assert!(e.to_string().contains("NTP"), "{e}");
        }
    }

    #[test]
    fn short_or_empty_secret_is_refused() {
        let e = Auth::new(b"short").unwrap_err();
        assert!(e.to_string().contains("at least 16"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty-secret");
        std::fs::write(&empty, "  \n").unwrap();
        let e = Auth::from_file(&empty).unwrap_err().to_string();
        assert!(e.contains("empty-secret") && e.contains("0 bytes"), "{e}");

        let short = dir.path().join("short-secret");
        std::fs::write(&short, "abc\n").unwrap();
        let e = Auth::from_file(&short).unwrap_err().to_string();
        assert!(e.contains("short-secret") && e.contains("3 bytes"), "{e}");

        let missing = dir.path().join("no-such-file");
        let e = Auth::from_file(&missing).unwrap_err().to_string();
        assert!(e.contains("no-such-file"), "{e}");

        // Surrounding whitespace is not part of the secret.
        let good = dir.path().join("secret");
        std::fs::write(
            &good,
            format!("\n {} \n", std::str::from_utf8(SECRET).unwrap()),
        )
        .unwrap();
        let from_file = Auth::from_file(&good).unwrap();
        let h = auth().sign_at("POST", "/", b"", NOW);
        from_file
            .verify_at(Some(&h), "POST", "/", b"", NOW)
            .unwrap();
        assert!(!format!("{from_file:?}").contains("0123"));
    }

    #[test]
    fn hex_round_trip() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&bytes)).unwrap(), bytes);
        assert_eq!(hex_decode("ABcd").unwrap(), vec![0xab, 0xcd]);
    }

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        addr.to_string()
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Echo {
        n: u64,
    }

    #[tokio::test]
    async fn router_refuses_unauthenticated_and_passes_authenticated() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = Router::new().nest(
            "/app",
            Router::new()
                .route(
                    "/echo",
                    post(move |Msg(e): Msg<Echo>| {
                        let counted = counted.clone();
                        async move {
                            counted.fetch_add(1, Ordering::SeqCst);
                            Msg(Echo { n: e.n + 1 })
                        }
                    }),
                )
                .route(
                    "/sum",
                    post(|Msg(v): Msg<Vec<Echo>>| async move { Msg(Echo { n: v.len() as u64 }) }),
                ),
        );
        let addr = serve(authenticated(app, auth())).await;
        let url = format!("http://{addr}/app/echo");
        let raw = reqwest::Client::builder().no_proxy().build().unwrap();

        // No header at all.
        let r = raw
            .post(&url)
            .header("content-type", "application/json")
            .body("{\"n\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let body: serde_json::Value = r.json().await.unwrap();
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains("missing x-egressd-auth"), "{msg}");

        // Wrong secret, through the real client.
        let wrong = PeerClient::new(Auth::new(b"not-the-cluster-secret").unwrap()).unwrap();
        let e = wrong
            .post::<_, Echo>(&addr, "/app/echo", &Echo { n: 1 }, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, TransportError::Unauthorized { message, .. } if message.contains("bad signature")),
            "{e}"
        );
        assert!(e.is_unreachable());

        // Right secret, but a body altered after signing.
        let h = auth().sign("POST", "/app/echo", b"{\"n\":1}");
        let r = raw
            .post(&url)
            .header(AUTH_HEADER, h)
            .header("content-type", "application/json")
            .body("{\"n\":2}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no handler may run");

        // Right secret: through, with the body intact (the path is the full, nested one).
        let good = PeerClient::new(auth()).unwrap();
        let got: Echo = good
            .post(&addr, "/app/echo", &Echo { n: 41 }, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(got, Echo { n: 42 });
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // A large body (over axum's default 2 MB limit) gets through too.
        let big: Vec<Echo> = (0..1_000_000).map(|n| Echo { n }).collect();
        let got: Echo = good
            .post(&addr, "/app/sum", &big, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, Echo { n: 1_000_000 });
    }

    #[tokio::test]
    async fn client_classifies_errors() {
        let client = PeerClient::new(auth()).unwrap();
        // Nothing listens: refused, i.e. unreachable.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = client
            .post::<_, Echo>(
                &format!("127.0.0.1:{port}"),
                "/x",
                &Echo { n: 1 },
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Connect { .. }), "{e}");
        assert!(e.is_unreachable());
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");

        // A slow peer: a timeout, not "unreachable".
        let app = Router::new().route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Msg(Echo { n: 0 })
            }),
        );
        let addr = serve(authenticated(app, auth())).await;
        let e = client
            .post::<_, Echo>(&addr, "/slow", &Echo { n: 1 }, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }), "{e}");
        assert!(!e.is_unreachable());

        // 404 and undecodable answers.
        let e = client
            .post::<_, Echo>(&addr, "/nope", &Echo { n: 1 }, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(e, TransportError::Status { status: 404, .. }),
            "{e}"
        );
        let e = client
            .post::<_, Echo>(&addr, "relative", &Echo { n: 1 }, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, TransportError::InvalidPath(_)), "{e}");
    }

    #[tokio::test]
    async fn raft_network_maps_errors_for_openraft() {
        use openraft::Vote;

        let heartbeat = || AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: vec![],
        };
        let opt = || RPCOption::new(Duration::from_millis(500));
        let mut net = Network::new(PeerClient::new(auth()).unwrap());

        // Nothing listens: Unreachable, so openraft backs off.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let member = |addr: String| Member {
            name: "peer".to_owned(),
            addr,
        };
        let mut conn = net
            .new_client(7, &member(format!("127.0.0.1:{port}")))
            .await;
        let e = conn.append_entries(heartbeat(), opt()).await.unwrap_err();
        assert!(matches!(e, RPCError::Unreachable(_)), "{e}");
        assert!(e.to_string().contains("peer peer"), "{e}");

        // A peer with another secret: Unreachable too (retrying at once cannot help), and the
        // message says why.
        let other = Router::new().route(APPEND_PATH, post(|| async { "unreached" }));
        let addr = serve(authenticated(
            other,
            Auth::new(b"a-different-secret!!").unwrap(),
        ))
        .await;
        let mut conn = net.new_client(7, &member(addr)).await;
        let e = conn.append_entries(heartbeat(), opt()).await.unwrap_err();
        assert!(matches!(e, RPCError::Unreachable(_)), "{e}");
        assert!(e.to_string().contains("bad signature"), "{e}");

        // A peer answering something else (here 404): NetworkError.
        let addr = serve(authenticated(Router::new(), auth())).await;
        let mut conn = net.new_client(7, &member(addr)).await;
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
        let addr = serve(authenticated(remote, auth())).await;
        let mut conn = net.new_client(7, &member(addr)).await;
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

        // The transport's own cost (sign, HTTP on a pooled connection, verify, JSON both ways)
        // of an empty append, against a handler that answers at once.
        let mut lat = Vec::new();
        for _ in 0..200 {
            let t = std::time::Instant::now();
            let _ = conn.append_entries(heartbeat(), opt()).await;
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "empty append round trip on loopback: median {:?}, p99 {:?}",
            lat[100], lat[198]
        );
    }
}
