//! The command-line client of the admin endpoint: HTTP, or HTTPS (`[admin.tls]`) verified
//! against a CA file. One connection per request (a CLI command makes a few), hyper directly,
//! rustls with the *ring* provider as everywhere in egressd.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Largest answer read (a status of a big cluster, a list of 100 000 policies).
const MAX_ANSWER: usize = 256 * 1024 * 1024;
/// How long one request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(60);

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

/// A client of one admin endpoint.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    authority: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl AdminClient {
    /// A client of the endpoint at `url` (`http://` or `https://`, host and port); an
    /// `https://` URL needs the CA the endpoint's certificate chains to.
    pub fn new(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .with_context(|| format!("admin URL {base:?} is not a URL"))?;
        let authority = uri
            .authority()
            .with_context(|| format!("admin URL {base:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let ca = ca_file.with_context(|| {
                    format!(
                        "the admin endpoint {base} is HTTPS: pass --ca-file with the CA its \
                         certificate chains to (or set admin.tls.ca_file in the config)"
                    )
                })?;
                let config = crate::tls::admin::client_config(ca)?;
                let name = ServerName::try_from(host.to_owned())
                    .with_context(|| format!("{host:?} as a TLS server name"))?;
                Some((config, name))
            }
            _ => bail!("admin URL {base:?}: expected http:// or https://"),
        };
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(AdminClient {
            base,
            authority,
            tls,
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(Method::GET, path, None, None).await
    }

    /// Sends a request; `token` goes as a bearer token, `json` as a JSON body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        json: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        tokio::time::timeout(TIMEOUT, self.exchange(method, path, token, json))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from {url} within {} s", TIMEOUT.as_secs()))?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        json: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        let unreachable = || format!("cannot reach the admin endpoint at {}", self.base);
        let tcp = TcpStream::connect(&self.authority)
            .await
            .with_context(unreachable)?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((config, name)) => Box::new(
                tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| {
                        format!("TLS with the admin endpoint at {} failed", self.base)
                    })?,
            ),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .with_context(unreachable)?;
        let driver = tokio::spawn(connection);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match json {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).context("building the request")?;
        let resp = sender.send_request(req).await.with_context(unreachable)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer from {}: {e}", self.base))?
            .to_bytes();
        driver.abort();
        Ok(Answer { status, body })
    }
}
