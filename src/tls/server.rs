//! Serving an axum `Router` over mutual TLS: the accept loop.
//!
//! Each accepted TCP connection gets its own task, which
//! 1. completes the TLS handshake within [`ServeOptions::handshake_timeout`] (a client that
//!    connects and never finishes, or sends nothing, is dropped then), with the server
//!    configuration current at that moment ([`PeerTls::server_config`], so a reload applies to
//!    the next connection);
//! 2. reads the client's verified node name(s) ([`PeerIdentity`]); for every request it asks
//!    [`ServeOptions::authorize`] whether such a peer may talk to this node (so a member removed
//!    while connected is refused from its next request on); a refused request gets 403 with the
//!    reason and `Connection: close`, and no handler runs;
//! 3. serves HTTP/1.1 on the TLS stream with hyper, inserting the [`PeerIdentity`] and axum's
//!    `ConnectInfo<SocketAddr>` into every request's extensions.
//!
//! At most [`ServeOptions::max_connections`] connections (handshaking or established) are kept;
//! a connection beyond that is closed at once. When `shutdown` completes, the listener is closed
//! and every connection task is aborted.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::{PeerIdentity, PeerTls, client_names};

/// Decides whether a peer that completed the handshake may use this node's routes: `Ok(())`,
/// or `Err(reason)` (sent to the peer with 403, and logged).
pub type Authorize = Arc<dyn Fn(&PeerIdentity) -> Result<(), String> + Send + Sync>;

/// Knobs of [`serve`].
#[derive(Clone)]
pub struct ServeOptions {
    /// Longest time from accepting a connection to the end of its TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest time to receive a request's headers once the connection is up (hyper's
    /// `header_read_timeout`; it also bounds how long an idle keep-alive connection is kept).
    pub header_read_timeout: Duration,
    /// Most connections kept at once (handshaking or established).
    pub max_connections: usize,
    /// Membership check, asked for every request; `None` lets every certificate of the CA in.
    pub authorize: Option<Authorize>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: super::DEFAULT_HANDSHAKE_TIMEOUT,
            header_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
            authorize: None,
        }
    }
}

impl ServeOptions {
    /// Only peers whose certificate names one of the names `members()` returns (called for
    /// every request: the membership may change while the server runs).
    pub fn members_only<F, I>(mut self, members: F) -> Self
    where
        F: Fn() -> I + Send + Sync + 'static,
        I: IntoIterator<Item = String>,
    {
        self.authorize = Some(Arc::new(move |peer: &PeerIdentity| {
            let members: Vec<String> = members().into_iter().collect();
            if peer.member_of(members.iter().map(String::as_str)).is_some() {
                Ok(())
            } else {
                Err(format!(
                    "{peer} is not a member of this cluster (members: {})",
                    members.join(", ")
                ))
            }
        }));
        self
    }
}

/// Serves `router` on `listener` over mutual TLS until `shutdown` completes.
pub async fn serve<S>(
    listener: TcpListener,
    tls: PeerTls,
    router: Router,
    options: ServeOptions,
    shutdown: S,
) where
    S: Future<Output = ()> + Send,
{
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "peer listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                %remote,
                limit = options.max_connections,
                "peer listener: connection limit reached, closing a new connection"
            );
            drop(tcp);
            continue;
        };
        let tls = tls.clone();
        let router = router.clone();
        let options = options.clone();
        tasks.spawn(async move {
            serve_connection(tcp, remote, &tls, router, &options).await;
            drop(permit);
        });
    }
    tasks.shutdown().await;
}

/// Handshakes and serves one accepted connection (see the module documentation).
pub async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: &PeerTls,
    router: Router,
    options: &ServeOptions,
) {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let stream = match tokio::time::timeout(options.handshake_timeout, acceptor.accept(tcp)).await {
        Err(_) => {
            tracing::warn!(
                %remote,
                timeout = ?options.handshake_timeout,
                "peer TLS handshake did not complete in time; connection closed"
            );
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(%remote, error = %e, "peer TLS handshake refused");
            return;
        }
        Ok(Ok(s)) => s,
    };
    let identity = PeerIdentity {
        names: client_names(stream.get_ref().1),
        remote,
    };
    // Asked for every request, not once per connection: a member removed while its
    // connection stays up (heartbeats keep it busy) is refused from its next request on.
    let authorize = options.authorize.clone();
    let refused_once = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let refusal = authorize
            .as_ref()
            .and_then(|authorize| authorize(&identity).err());
        if let Some(reason) = &refusal
            && !refused_once.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(%remote, names = ?identity.names, %reason, "peer refused");
        }
        let router = router.clone();
        req.extensions_mut().insert(identity.clone());
        req.extensions_mut().insert(ConnectInfo(remote));
        async move {
            match refusal {
                Some(reason) => Ok::<_, Infallible>(forbidden(reason)),
                None => router.oneshot(req.map(Body::new)).await,
            }
        }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "peer connection ended with an error");
    }
}

fn forbidden(reason: String) -> Response<Body> {
    let body = serde_json::json!({ "error": reason }).to_string();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}
