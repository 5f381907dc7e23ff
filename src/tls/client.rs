//! HTTPS requests to peers over mutual TLS: a pooled hyper-util client per expected peer.
//!
//! [`PeerClient::post`] sends a request to the peer named `peer` at address `addr`; the
//! connection, if a new one is needed, is a TCP connect plus a TLS handshake with
//! [`PeerTls::client_config`]`(peer)` taken at that moment (so a reload applies to the next new
//! connection), both within [`PeerClient::connect_timeout`]. The server must prove that it is
//! `peer` (see [`super`]); the address is only where to find it. Connections are kept alive and
//! reused (HTTP/1.1, one request at a time per connection, more connections opened for
//! concurrent requests).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::PeerTls;

/// How long an unused pooled connection is kept: less than the servers' header read timeout
/// (which also closes idle connections), so that the client never sends a request on a
/// connection the server is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// A failed request to a peer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("peer {peer}: {detail}")]
    Invalid { peer: String, detail: String },
    #[error("cannot connect to peer {peer} at {addr}: {source}")]
    Connect {
        peer: String,
        addr: String,
        source: io::Error,
    },
    #[error("TLS with peer {peer} at {addr} failed: {detail}")]
    Tls {
        peer: String,
        addr: String,
        detail: String,
    },
    #[error(
        "peer {peer} at {addr}: no connection within {timeout:?} (TCP connect and TLS handshake)"
    )]
    ConnectTimeout {
        peer: String,
        addr: String,
        timeout: Duration,
    },
    #[error("peer {peer} at {addr} did not answer {path} within {timeout:?}")]
    Timeout {
        peer: String,
        addr: String,
        path: String,
        timeout: Duration,
    },
    #[error("peer {peer} at {addr}, {path}: {detail}")]
    Http {
        peer: String,
        addr: String,
        path: String,
        detail: String,
    },
}

impl ClientError {
    /// Whether the peer could not be reached or authenticated at all (as opposed to a slow or
    /// failing answer): retrying at once cannot help.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. }
                | ClientError::Tls { .. }
                | ClientError::ConnectTimeout { .. }
                | ClientError::Invalid { .. }
        )
    }
}

/// An answer: status, headers and the whole body.
#[derive(Debug, Clone)]
pub struct PeerResponse {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Bytes,
}

type HyperClient = Client<PeerConnector, Full<Bytes>>;

/// Pooled HTTPS clients to the peers, one per expected peer name. Cheap to clone.
#[derive(Clone)]
pub struct PeerClient {
    tls: PeerTls,
    connect_timeout: Duration,
    max_response_bytes: usize,
    clients: Arc<Mutex<HashMap<String, HyperClient>>>,
}

impl PeerClient {
    /// `connect_timeout` bounds the TCP connect plus the TLS handshake of a new connection;
    /// answers longer than `max_response_bytes` are refused.
    pub fn new(tls: PeerTls, connect_timeout: Duration, max_response_bytes: usize) -> Self {
        PeerClient {
            tls,
            connect_timeout,
            max_response_bytes,
            clients: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    fn client(&self, peer: &str) -> HyperClient {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients
            .entry(peer.to_owned())
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                    .build(PeerConnector {
                        tls: self.tls.clone(),
                        peer: Arc::from(peer),
                        timeout: self.connect_timeout,
                    })
            })
            .clone()
    }

    /// Forgets the pooled connections to `peer` (e.g. when it leaves the cluster).
    pub fn forget(&self, peer: &str) {
        self.clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(peer);
    }

    /// POSTs `body` (of `content_type`) to `https://{addr}{path}` on `peer`, and reads the whole
    /// answer, all within `timeout`.
    pub async fn post(
        &self,
        peer: &str,
        addr: &str,
        path: &str,
        content_type: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<PeerResponse, ClientError> {
        self.post_with(
            peer,
            addr,
            path,
            content_type,
            axum::http::HeaderMap::new(),
            body,
            timeout,
        )
        .await
    }

    /// [`PeerClient::post`] with more request headers.
    #[allow(clippy::too_many_arguments)]
    pub async fn post_with(
        &self,
        peer: &str,
        addr: &str,
        path: &str,
        content_type: &str,
        headers: axum::http::HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<PeerResponse, ClientError> {
        let http = |detail: String| ClientError::Http {
            peer: peer.to_owned(),
            addr: addr.to_owned(),
            path: path.to_owned(),
            detail,
        };
        if !path.starts_with('/') {
            return Err(http("the path must start with '/'".to_owned()));
        }
        let uri: Uri = format!("https://{addr}{path}")
            .parse()
            .map_err(|e| http(format!("bad address or path: {e}")))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .map_err(|e| http(format!("cannot build the request: {e}")))?;
        req.headers_mut().extend(headers);
        let client = self.client(peer);
        let limit = self.max_response_bytes;
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| self.classify(peer, addr, path, &e))?;
            let status = resp.status();
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, limit)
                .collect()
                .await
                .map_err(|e| http(format!("reading the answer (at most {limit} bytes): {e}")))?
                .to_bytes();
            Ok(PeerResponse {
                status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    peer: peer.to_owned(),
                    addr: addr.to_owned(),
                    path: path.to_owned(),
                    timeout,
                })
            })
    }

    fn classify(
        &self,
        peer: &str,
        addr: &str,
        path: &str,
        e: &hyper_util::client::legacy::Error,
    ) -> ClientError {
        if let Some(c) = find::<ConnectError>(e) {
            return match c {
                ConnectError::Invalid(detail) => ClientError::Invalid {
                    peer: peer.to_owned(),
                    detail: detail.clone(),
                },
                ConnectError::Tcp(source) => ClientError::Connect {
                    peer: peer.to_owned(),
                    addr: addr.to_owned(),
                    source: io::Error::new(source.kind(), source.to_string()),
                },
                ConnectError::Tls(detail) => ClientError::Tls {
                    peer: peer.to_owned(),
                    addr: addr.to_owned(),
                    detail: detail.clone(),
                },
                ConnectError::Timeout => ClientError::ConnectTimeout {
                    peer: peer.to_owned(),
                    addr: addr.to_owned(),
                    timeout: self.connect_timeout,
                },
            };
        }
        // In TLS 1.3 the server judges the client's certificate after the client has finished
        // its side of the handshake: a refusal arrives as an alert on the first read.
        if let Some(tls) = find_rustls(e) {
            return ClientError::Tls {
                peer: peer.to_owned(),
                addr: addr.to_owned(),
                detail: tls.to_string(),
            };
        }
        ClientError::Http {
            peer: peer.to_owned(),
            addr: addr.to_owned(),
            path: path.to_owned(),
            detail: error_chain(e),
        }
    }
}

fn find<'a, T: StdError + 'static>(e: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        // io::Error's source() skips its own payload: look inside.
        if let Some(t) = err
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<T>())
        {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

fn find_rustls<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    find::<rustls::Error>(e)
}

fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let m = err.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = err.source();
    }
    s
}

/// Why a new connection to a peer could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Tcp(io::Error),
    #[error("{0}")]
    Tls(String),
    #[error("timed out")]
    Timeout,
}

/// Makes the TCP + TLS connections of one peer's pool.
#[derive(Clone)]
pub struct PeerConnector {
    tls: PeerTls,
    peer: Arc<str>,
    timeout: Duration,
}

impl PeerConnector {
    /// Connects to `addr` and completes a TLS handshake that proves the server is the peer.
    pub async fn connect(&self, addr: &str) -> Result<PeerStream, ConnectError> {
        let config = self
            .tls
            .client_config(&self.peer)
            .map_err(|e| ConnectError::Invalid(e.to_string()))?;
        let name = ServerName::try_from(self.peer.to_string())
            .map_err(|e| ConnectError::Invalid(e.to_string()))?;
        let attempt = async {
            let tcp = TcpStream::connect(addr).await.map_err(ConnectError::Tcp)?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Tls(tls_detail(&e)))
        };
        let stream = tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| ConnectError::Timeout)??;
        Ok(PeerStream(TokioIo::new(stream)))
    }
}

fn tls_detail(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => t.to_string(),
        None => e.to_string(),
    }
}

impl tower::Service<Uri> for PeerConnector {
    type Response = PeerStream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<PeerStream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .ok_or_else(|| ConnectError::Invalid(format!("no address in {uri}")))?
                .as_str()
                .to_owned();
            this.connect(&addr).await
        })
    }
}

/// An established TLS connection to a peer.
pub struct PeerStream(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl PeerStream {
    /// The rustls connection state (negotiated parameters, the peer's certificates).
    pub fn tls(&self) -> &rustls::ClientConnection {
        self.0.inner().get_ref().1
    }
}

impl Connection for PeerStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl PeerTls {
    /// A connector for `peer` (see [`PeerConnector::connect`]), for callers that want the raw
    /// TLS stream rather than [`PeerClient`].
    pub fn connector(&self, peer: &str, timeout: Duration) -> PeerConnector {
        PeerConnector {
            tls: self.clone(),
            peer: Arc::from(peer),
            timeout,
        }
    }
}
