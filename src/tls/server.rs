//! Serving an axum `Router` with limits before trust: the accept loop of the peer listener
//! (mutual TLS) and of the admin endpoint (HTTP, or HTTPS with `[admin.tls]`).
//!
//! Each accepted TCP connection goes through, in order:
//! 1. **admission**, at once and before any byte is read: at most
//!    [`ServeOptions::max_connections`] connections at a time (handshaking or established), at
//!    most [`ServeOptions::max_per_source`] from one source address, and at most
//!    [`ServeOptions::new_per_source_per_sec`] new ones per second from one source (a token
//!    bucket with as much burst). A connection beyond a limit is closed without a handshake;
//! 2. the **TLS handshake** (unless the listener is plain HTTP), within
//!    [`ServeOptions::handshake_timeout`], with the server configuration current at that moment
//!    (a reload applies to the next connection). Steps 1 and 2 run on
//!    [`ServeOptions::edge`], a runtime of their own when given: a flood of connections or
//!    handshakes from strangers costs that runtime's thread, never the threads that carry
//!    Raft's heartbeats, votes and the nodes' reports;
//! 3. the established connection moves to the runtime that called [`serve_with`], where
//!    HTTP/1.1 is served with hyper: headers must arrive within
//!    [`ServeOptions::header_read_timeout`]; for every request, [`ServeOptions::authorize`]
//!    decides on the peer's verified name (so a member removed while connected is refused from
//!    its next request on) — a refused request gets 403 with the reason and
//!    `Connection: close`, and no handler runs, no body is read. Requests carry the
//!    [`PeerIdentity`] (peer listener) and axum's `ConnectInfo<SocketAddr>` in their extensions.
//!
//! Body limits and timeouts are the router's business (per route); see `cluster::transport`
//! and `admin`. When `shutdown` completes, the listener is closed and every connection task is
//! aborted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::admin::AdminTls;
use super::{PeerIdentity, PeerTls, client_names};

/// Decides whether a peer that completed the handshake may use this node's routes: `Ok(())`,
/// or `Err(reason)` (sent to the peer with 403, and logged).
pub type Authorize = Arc<dyn Fn(&PeerIdentity) -> Result<(), String> + Send + Sync>;

/// Knobs of [`serve`] and [`serve_with`].
#[derive(Clone)]
pub struct ServeOptions {
    /// Longest time from accepting a connection to the end of its TLS handshake.
    pub handshake_timeout: Duration,
    /// Longest time to receive a request's headers once the connection is up (hyper's
    /// `header_read_timeout`; it also bounds how long an idle keep-alive connection is kept).
    pub header_read_timeout: Duration,
    /// Most connections kept at once (handshaking or established).
    pub max_connections: usize,
    /// Most connections kept at once from one source address.
    pub max_per_source: usize,
    /// New connections accepted per second from one source address (with a burst of as many).
    pub new_per_source_per_sec: u32,
    /// Membership check, asked for every request; `None` lets every certificate of the CA in.
    pub authorize: Option<Authorize>,
    /// The runtime the accept loop and the TLS handshakes run on; `None`: the calling one.
    pub edge: Option<Handle>,
    /// Names the listener in logs ("peer", "admin").
    pub name: &'static str,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: super::DEFAULT_HANDSHAKE_TIMEOUT,
            header_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
            max_per_source: 256,
            new_per_source_per_sec: 1000,
            authorize: None,
            edge: None,
            name: "peer",
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

/// How a listener's connections are set up.
#[derive(Clone)]
pub enum Acceptor {
    /// Plain HTTP (the admin endpoint without `[admin.tls]`).
    Plain,
    /// Mutual TLS with the cluster's certificates (the peer listener).
    Peer(PeerTls),
    /// TLS with a server certificate only (the admin endpoint with `[admin.tls]`).
    Server(AdminTls),
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
    serve_with(listener, Acceptor::Peer(tls), router, options, shutdown).await;
}

/// A connection admitted, with its TLS set up, ready to be served.
struct Established {
    stream: Stream,
    remote: SocketAddr,
    identity: Option<PeerIdentity>,
    _admission: Admission,
}

/// Serves `router` on `listener` with `acceptor` until `shutdown` completes (see the module
/// documentation).
pub async fn serve_with<S>(
    listener: TcpListener,
    acceptor: Acceptor,
    router: Router,
    options: ServeOptions,
    shutdown: S,
) where
    S: Future<Output = ()> + Send,
{
    // Connections set up on another runtime are moved to this one before they are served.
    let moved = options.edge.is_some();
    let edge = options.edge.clone().unwrap_or_else(Handle::current);
    let (tx, mut rx) = mpsc::channel::<Established>(64);
    let accept = {
        let options = options.clone();
        // The listener's readiness is then driven by the edge runtime too.
        let std_listener = listener.into_std();
        edge.spawn(async move {
            let listener = match std_listener.and_then(TcpListener::from_std) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(listener = options.name, error = %e, "cannot take over the listener");
                    return;
                }
            };
            accept_loop(listener, acceptor, options, tx).await;
        })
    };
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            conn = rx.recv() => match conn {
                Some(c) => c,
                None => break,
            },
        };
        let mut conn = conn;
        if moved && let Err(e) = conn.stream.io_mut().rebind() {
            tracing::warn!(listener = options.name, remote = %conn.remote, error = %e, "cannot take over a connection");
            continue;
        }
        let router = router.clone();
        let options = options.clone();
        connections.spawn(async move {
            let Established {
                stream,
                remote,
                identity,
                _admission,
            } = conn;
            serve_http(stream, remote, identity, router, &options).await;
        });
    }
    accept.abort();
    connections.shutdown().await;
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Acceptor,
    options: ServeOptions,
    tx: mpsc::Sender<Established>,
) {
    let admission = Arc::new(Admissions::new(&options));
    let mut handshakes = JoinSet::new();
    loop {
        let (tcp, remote) = tokio::select! {
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(listener = options.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = match admission.admit(remote.ip()) {
            Ok(a) => a,
            Err(why) => {
                admission.refused(options.name, remote, why);
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let io = Io(Some(tcp));
        let tx = tx.clone();
        match &acceptor {
            Acceptor::Plain => {
                let _ = tx
                    .send(Established {
                        stream: Stream::Plain(io),
                        remote,
                        identity: None,
                        _admission: admitted,
                    })
                    .await;
            }
            Acceptor::Peer(tls) => {
                let config = tls.server_config();
                let options = options.clone();
                handshakes.spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let Some(stream) = handshake(acceptor, io, remote, &options).await else {
                        return;
                    };
                    let identity = PeerIdentity {
                        names: client_names(stream.get_ref().1),
                        remote,
                    };
                    let _ = tx
                        .send(Established {
                            stream: Stream::Tls(Box::new(stream)),
                            remote,
                            identity: Some(identity),
                            _admission: admitted,
                        })
                        .await;
                });
            }
            Acceptor::Server(tls) => {
                let config = tls.server_config();
                let options = options.clone();
                handshakes.spawn(async move {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let Some(stream) = handshake(acceptor, io, remote, &options).await else {
                        return;
                    };
                    let _ = tx
                        .send(Established {
                            stream: Stream::Tls(Box::new(stream)),
                            remote,
                            identity: None,
                            _admission: admitted,
                        })
                        .await;
                });
            }
        }
    }
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    io: Io,
    remote: SocketAddr,
    options: &ServeOptions,
) -> Option<tokio_rustls::server::TlsStream<Io>> {
    match tokio::time::timeout(options.handshake_timeout, acceptor.accept(io)).await {
        Err(_) => {
            tracing::debug!(
                listener = options.name,
                %remote,
                timeout = ?options.handshake_timeout,
                "TLS handshake did not complete in time; connection closed"
            );
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(listener = options.name, %remote, error = %e, "TLS handshake refused");
            None
        }
        Ok(Ok(s)) => Some(s),
    }
}

/// Serves HTTP/1.1 on an established connection.
async fn serve_http(
    stream: Stream,
    remote: SocketAddr,
    identity: Option<PeerIdentity>,
    router: Router,
    options: &ServeOptions,
) {
    // Asked for every request, not once per connection: a member removed while its
    // connection stays up (heartbeats keep it busy) is refused from its next request on.
    let authorize = options.authorize.clone();
    let refused_once = Arc::new(AtomicBool::new(false));
    let name = options.name;
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let refusal = match (&authorize, &identity) {
            (Some(authorize), Some(identity)) => authorize(identity).err(),
            (Some(_), None) => Some("no verified peer identity".to_owned()),
            (None, _) => None,
        };
        if let Some(reason) = &refusal
            && !refused_once.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(listener = name, %remote, %reason, "peer refused");
        }
        let router = router.clone();
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
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
        tracing::debug!(listener = name, %remote, error = %e, "connection ended with an error");
    }
}

/// Handshakes and serves one accepted connection on the calling runtime, without admission
/// limits (for tests and callers with an accept loop of their own).
pub async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: &PeerTls,
    router: Router,
    options: &ServeOptions,
) {
    let _ = tcp.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let Some(stream) = handshake(acceptor, Io(Some(tcp)), remote, options).await else {
        return;
    };
    let identity = PeerIdentity {
        names: client_names(stream.get_ref().1),
        remote,
    };
    serve_http(
        Stream::Tls(Box::new(stream)),
        remote,
        Some(identity),
        router,
        options,
    )
    .await;
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

// ---------------------------------------------------------------------------------------------
// Admission: connection limits, total and per source

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Total,
    PerSource,
    Rate,
}

struct Source {
    open: usize,
    tokens: f64,
    refilled: Instant,
}

struct Admissions {
    total: Arc<Semaphore>,
    max_total: usize,
    per_source: usize,
    rate: f64,
    sources: Arc<Mutex<HashMap<IpAddr, Source>>>,
    /// When each kind of refusal was last logged (one line per second at most).
    logged: Mutex<[Option<Instant>; 3]>,
}

/// A connection's place in the limits; given back when it closes.
struct Admission {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    sources: Arc<Mutex<HashMap<IpAddr, Source>>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = sources.get_mut(&self.ip) {
            s.open = s.open.saturating_sub(1);
        }
    }
}

/// Entries kept for sources with no open connection (their rate state), before pruning.
const SOURCES_KEPT: usize = 4096;

impl Admissions {
    fn new(options: &ServeOptions) -> Self {
        Admissions {
            total: Arc::new(Semaphore::new(options.max_connections.max(1))),
            max_total: options.max_connections.max(1),
            per_source: options.max_per_source.max(1),
            rate: f64::from(options.new_per_source_per_sec.max(1)),
            sources: Arc::new(Mutex::new(HashMap::new())),
            logged: Mutex::new([None; 3]),
        }
    }

    fn admit(&self, ip: IpAddr) -> Result<Admission, Refusal> {
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if sources.len() > SOURCES_KEPT {
            let rate = self.rate;
            // Forget sources with nothing open whose bucket is full again.
            sources.retain(|_, s| {
                s.open > 0 || s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate < rate
            });
        }
        let source = sources.entry(ip).or_insert(Source {
            open: 0,
            tokens: self.rate,
            refilled: now,
        });
        source.tokens = (source.tokens
            + now.duration_since(source.refilled).as_secs_f64() * self.rate)
            .min(self.rate);
        source.refilled = now;
        if source.tokens < 1.0 {
            return Err(Refusal::Rate);
        }
        if source.open >= self.per_source {
            return Err(Refusal::PerSource);
        }
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Total)?;
        source.tokens -= 1.0;
        source.open += 1;
        Ok(Admission {
            _permit: permit,
            ip,
            sources: self.sources.clone(),
        })
    }

    fn refused(&self, listener: &'static str, remote: SocketAddr, why: Refusal) {
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = &mut logged[why as usize];
        if slot.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *slot = Some(Instant::now());
        let (limit, what) = match why {
            Refusal::Total => (self.max_total as f64, "connections at once"),
            Refusal::PerSource => (
                self.per_source as f64,
                "connections at once from one source",
            ),
            Refusal::Rate => (self.rate, "new connections per second from one source"),
        };
        tracing::warn!(
            listener,
            %remote,
            limit,
            "connection limit reached ({what}); closing new connections (logged once a second)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Streams that can move between runtimes

/// A TCP stream that can be re-registered with another runtime's I/O driver after its
/// handshake (see [`Io::rebind`]).
struct Io(Option<TcpStream>);

impl Io {
    /// Moves the socket to the I/O driver of the calling runtime.
    fn rebind(&mut self) -> io::Result<()> {
        let tcp = self.0.take().ok_or_else(|| io::Error::other("no socket"))?;
        let std = tcp.into_std()?;
        self.0 = Some(TcpStream::from_std(std)?);
        Ok(())
    }

    fn tcp(&mut self) -> io::Result<&mut TcpStream> {
        self.0
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no socket"))
    }
}

impl AsyncRead for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(t) => Pin::new(t).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.tcp() {
            Ok(t) => Pin::new(t).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(t) => Pin::new(t).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(t) => Pin::new(t).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// An established connection: plain, or TLS over [`Io`].
enum Stream {
    Plain(Io),
    Tls(Box<tokio_rustls::server::TlsStream<Io>>),
}

impl Stream {
    fn io_mut(&mut self) -> &mut Io {
        match self {
            Stream::Plain(io) => io,
            Stream::Tls(tls) => tls.get_mut().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }
}

/// A runtime of its own on a thread of its own, for work that strangers can cause: accepting
/// connections and TLS handshakes (the peer listener), or a whole endpoint (the admin one).
/// `nice` lowers the thread's scheduling priority (0: as the others). Returns its handle; the
/// runtime lives as long as the process.
pub fn edge_runtime(name: &str, nice: i32) -> io::Result<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_name = name.to_owned();
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            if nice > 0 {
                crate::lower_thread_priority(&thread_name, nice);
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(std::future::pending::<()>());
        })?;
    rx.recv()
        .map_err(|_| io::Error::other("the runtime thread did not start"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(per_source: usize, rate: u32, total: usize) -> ServeOptions {
        ServeOptions {
            max_per_source: per_source,
            new_per_source_per_sec: rate,
            max_connections: total,
            ..ServeOptions::default()
        }
    }

    #[test]
    fn admission_limits_per_source_rate_and_total() {
        let a = Admissions::new(&options(2, 1000, 3));
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let first = a.admit(x).unwrap();
        let _second = a.admit(x).unwrap();
        assert_eq!(a.admit(x).err(), Some(Refusal::PerSource));
        let _third = a.admit(y).unwrap();
        assert_eq!(a.admit(y).err(), Some(Refusal::Total));
        // A closed connection gives its places back.
        drop(first);
        let _again = a.admit(x).unwrap();

        // The rate: a burst of `rate`, then refused until the bucket refills.
        let a = Admissions::new(&options(1000, 5, 1000));
        let held: Vec<_> = (0..5).map(|_| a.admit(x).unwrap()).collect();
        assert_eq!(a.admit(x).err(), Some(Refusal::Rate));
        // Another source is not affected.
        assert!(a.admit(y).is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(a.admit(x).is_ok(), "one token back after 200 ms at 5/s");
        drop(held);
    }
}
