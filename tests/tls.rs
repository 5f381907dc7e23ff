//! Peer TLS end to end on loopback: certificates made by `egressd tls init-ca` / `egressd tls
//! issue` (the real binary), served by `egressd::tls::server::serve` and requested with
//! `egressd::tls::client::PeerClient`, including a CA rotation with a bundled old+new CA.
//!
//! `tls_latency` (ignored; run it with
//! `cargo test --release --test tls -- --ignored --nocapture`) measures the handshake and the
//! latency of a small POST over TLS against plain HTTP.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Extension;
use axum::routing::post;
use egressd::tls::client::PeerClient;
use egressd::tls::server::{ServeOptions, serve};
use egressd::tls::{PeerIdentity, PeerTls, TlsFiles};

fn egressd(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_egressd"))
        .args(args)
        .output()
        .expect("run egressd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(args: &[&str]) -> String {
    let (success, text) = egressd(args);
    assert!(success, "egressd {args:?} failed: {text}");
    text
}

fn files(ca: &Path, dir: &Path, node: &str) -> TlsFiles {
    TlsFiles {
        ca_file: ca.to_owned(),
        cert_file: dir.join(format!("{node}.pem")),
        key_file: dir.join(format!("{node}-key.pem")),
    }
}

fn router() -> Router {
    Router::new().route(
        "/whoami",
        post(|Extension(peer): Extension<PeerIdentity>| async move { peer.names.join(",") }),
    )
}

async fn start(tls: PeerTls, options: ServeOptions) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        tls,
        router(),
        options,
        std::future::pending(),
    ));
    addr
}

async fn whoami(client: &PeerClient, peer: &str, addr: SocketAddr) -> Result<String, String> {
    let r = client
        .post(
            peer,
            &addr.to_string(),
            "/whoami",
            "text/plain",
            Bytes::new(),
            Duration::from_secs(2),
        )
        .await
        .map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&r.body).into_owned();
    if r.status.is_success() {
        Ok(body)
    } else {
        Err(format!("{}: {body}", r.status))
    }
}

#[tokio::test]
async fn certificates_from_the_tls_commands_authenticate_peers_through_a_ca_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca1, ca2, nodes) = (
        tmp.path().join("ca1"),
        tmp.path().join("ca2"),
        tmp.path().join("nodes"),
    );
    let s = |p: &Path| p.to_str().unwrap().to_owned();

    let out = ok(&["tls", "init-ca", "--out-dir", &s(&ca1)]);
    assert!(
        out.contains("ca.pem") && out.contains("ca-key.pem"),
        "{out}"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca1.join("ca-key.pem")), 0o600);
    for node in ["gw1", "gw2", "gw3"] {
        ok(&[
            "tls",
            "issue",
            node,
            "--ca-dir",
            &s(&ca1),
            "--out-dir",
            &s(&nodes),
        ]);
        assert_eq!(mode(&nodes.join(format!("{node}-key.pem"))), 0o600);
    }
    // Nothing is overwritten without --force.
    let (success, text) = egressd(&["tls", "init-ca", "--out-dir", &s(&ca1)]);
    assert!(!success && text.contains("--force"), "{text}");
    let (success, text) = egressd(&[
        "tls",
        "issue",
        "gw1",
        "--ca-dir",
        &s(&ca1),
        "--out-dir",
        &s(&nodes),
    ]);
    assert!(!success && text.contains("already exist"), "{text}");

    // A three-node cluster's identities; gw1 serves, members gw1..gw3.
    let bundle = tmp.path().join("bundle.pem");
    std::fs::copy(ca1.join("ca.pem"), &bundle).unwrap();
    let gw1 = PeerTls::load(files(&bundle, &nodes, "gw1"), "gw1").unwrap();
    let gw2 = PeerTls::load(files(&bundle, &nodes, "gw2"), "gw2").unwrap();
    let gw3 = PeerTls::load(files(&bundle, &nodes, "gw3"), "gw3").unwrap();
    let members = ServeOptions::default().members_only(|| ["gw1", "gw2", "gw3"].map(String::from));
    let addr = start(gw1.clone(), members).await;
    let c2 = PeerClient::new(gw2.clone(), Duration::from_secs(1), 1 << 20);
    let c3 = PeerClient::new(gw3.clone(), Duration::from_secs(1), 1 << 20);
    assert_eq!(whoami(&c2, "gw1", addr).await.unwrap(), "gw2");
    assert_eq!(whoami(&c3, "gw1", addr).await.unwrap(), "gw3");
    // gw3 at gw1's address is not gw3.
    let e = whoami(&c2, "gw3", addr).await.unwrap_err();
    assert!(e.contains("not valid for name \"gw3\""), "{e}");
    // A new connection (pool dropped; the TLS session may be resumed) is still identified.
    c2.forget("gw1");
    assert_eq!(whoami(&c2, "gw1", addr).await.unwrap(), "gw2");

    // CA rotation, step 1: a new CA, and every node trusts old + new (SIGHUP = reload()).
    ok(&["tls", "init-ca", "--out-dir", &s(&ca2)]);
    let both = format!(
        "{}{}",
        std::fs::read_to_string(ca1.join("ca.pem")).unwrap(),
        std::fs::read_to_string(ca2.join("ca.pem")).unwrap()
    );
    std::fs::write(&bundle, both).unwrap();
    for tls in [&gw1, &gw2, &gw3] {
        let summary = tls.reload().unwrap();
        assert_eq!(summary.ca_subjects.len(), 2, "{summary}");
    }
    // Step 2: nodes get certificates of the new CA one by one; old and new talk to each other.
    ok(&[
        "tls",
        "issue",
        "gw1",
        "--ca-dir",
        &s(&ca2),
        "--out-dir",
        &s(&nodes),
        "--force",
    ]);
    gw1.reload().unwrap();
    c2.forget("gw1");
    assert_eq!(whoami(&c2, "gw1", addr).await.unwrap(), "gw2");
    ok(&[
        "tls",
        "issue",
        "gw2",
        "--ca-dir",
        &s(&ca2),
        "--out-dir",
        &s(&nodes),
        "--force",
    ]);
    gw2.reload().unwrap();
    c2.forget("gw1");
    assert_eq!(whoami(&c2, "gw1", addr).await.unwrap(), "gw2");
    assert_eq!(whoami(&c3, "gw1", addr).await.unwrap(), "gw3");

    // Step 3 (once every node has a new certificate): drop the old CA. gw3 has not been
    // re-issued, so its reload refuses the new CA file and keeps the bundle.
    std::fs::copy(ca2.join("ca.pem"), &bundle).unwrap();
    gw1.reload().unwrap();
    let e = gw3.reload().unwrap_err().to_string();
    assert!(e.contains("gw3.pem"), "{e}");
    // gw1 now refuses gw3's old certificate on a new connection.
    c3.forget("gw1");
    let e = whoami(&c3, "gw1", addr).await.unwrap_err();
    assert!(e.contains("TLS with peer gw1"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Measurements

fn median_p99(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let p99 = v[(v.len() * 99 / 100).min(v.len() - 1)];
    (v[v.len() / 2], p99)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// One POST on a new HTTP/1.1 connection over `io`.
async fn one_post<I>(io: I, body: Bytes)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Full};
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = axum::http::Request::post("/raft/append")
        .header("host", "gw1")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.into_body().collect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --release -- --ignored --nocapture"]
async fn tls_latency() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    const N: usize = 1000;
    const WARMUP: usize = 50;
    let tmp = tempfile::tempdir().unwrap();
    let ca = egressd::tls::pki::new_ca(30).unwrap();
    let write = |name: &str, text: &str, mode: u32| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    write("ca.pem", &ca.cert, 0o644);
    for node in ["gw1", "gw2"] {
        let n = egressd::tls::pki::issue(node, &ca.cert, &ca.key, 30).unwrap();
        write(&format!("{node}.pem"), &n.cert, 0o644);
        write(&format!("{node}-key.pem"), &n.key, 0o600);
    }
    let ca_file = tmp.path().join("ca.pem");
    let gw1 = PeerTls::load(files(&ca_file, tmp.path(), "gw1"), "gw1").unwrap();
    let gw2 = PeerTls::load(files(&ca_file, tmp.path(), "gw2"), "gw2").unwrap();

    // A heartbeat-sized JSON body and answer.
    let body = Bytes::from(format!(
        "{{\"vote\":{{\"leader_id\":{{\"term\":7,\"node_id\":1}},\"committed\":true}},\
         \"prev_log_id\":{{\"leader_id\":{{\"term\":7,\"node_id\":1}},\"index\":123456}},\
         \"leader_commit\":{{\"leader_id\":{{\"term\":7,\"node_id\":1}},\"index\":123456}},\
         \"entries\":[],\"pad\":\"{}\"}}",
        "x".repeat(40)
    ));
    let app = || {
        Router::new().route(
            "/raft/append",
            post(|_b: Bytes| async { "{\"Ok\":{\"Success\":null}}" }),
        )
    };
    let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_listener.local_addr().unwrap();
    tokio::spawn(serve(
        tls_listener,
        gw1.clone(),
        app(),
        ServeOptions::default(),
        std::future::pending(),
    ));
    let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_addr = plain_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(plain_listener, app()).await.unwrap() });

    // Requests on established connections, the three clients interleaved (rotating order) so
    // that they see the same machine load.
    let tls_client = PeerClient::new(gw2.clone(), Duration::from_secs(1), 1 << 20);
    let tls_addr_s = tls_addr.to_string();
    let plain: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let plain_uri: axum::http::Uri = format!("http://{plain_addr}/raft/append").parse().unwrap();
    let reqwest = reqwest::Client::builder().no_proxy().build().unwrap();
    let plain_url = format!("http://{plain_addr}/raft/append");
    let mut lat: [Vec<Duration>; 3] = Default::default();
    for i in 0..N + WARMUP {
        for k in 0..3 {
            let which = (i + k) % 3;
            let t = Instant::now();
            match which {
                0 => {
                    let r = tls_client
                        .post(
                            "gw1",
                            &tls_addr_s,
                            "/raft/append",
                            "application/json",
                            body.clone(),
                            Duration::from_secs(2),
                        )
                        .await
                        .unwrap();
                    assert!(r.status.is_success());
                }
                1 => {
                    let req = axum::http::Request::post(plain_uri.clone())
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let r = plain.request(req).await.unwrap();
                    assert!(r.status().is_success());
                    r.into_body().collect().await.unwrap();
                }
                _ => {
                    let r = reqwest
                        .post(&plain_url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert!(r.status().is_success());
                    r.bytes().await.unwrap();
                }
            }
            if i >= WARMUP {
                lat[which].push(t.elapsed());
            }
        }
    }
    let mut rows: Vec<(String, Duration, Duration)> = Vec::new();
    let [a, b, c] = lat;
    for (label, v) in [
        ("POST, mutual TLS (PeerClient, hyper-util)", a),
        ("POST, plain HTTP (hyper-util)", b),
        ("POST, plain HTTP (reqwest, today's transport)", c),
    ] {
        let (m, p) = median_p99(v);
        rows.push((label.to_owned(), m, p));
    }

    // New connections: TCP connect + handshake (both sides' certificates verified), then one
    // POST, as a peer reconnecting after a restart does; interleaved likewise.
    const H: usize = 300;
    let full = {
        let mut c = (*gw2.client_config("gw1").unwrap()).clone();
        c.resumption = rustls::client::Resumption::disabled();
        std::sync::Arc::new(c)
    };
    let resumed = gw2.client_config("gw1").unwrap();
    let mut hs: [Vec<Duration>; 3] = Default::default();
    for i in 0..H + 10 {
        for k in 0..3 {
            let which = (i + k) % 3;
            let t = Instant::now();
            if which == 2 {
                let tcp = tokio::net::TcpStream::connect(plain_addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                one_post(hyper_util::rt::TokioIo::new(tcp), body.clone()).await;
            } else {
                let config = if which == 0 { &full } else { &resumed };
                let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(rustls::pki_types::ServerName::try_from("gw1").unwrap(), tcp)
                    .await
                    .unwrap();
                one_post(hyper_util::rt::TokioIo::new(tls), body.clone()).await;
            }
            if i >= 10 {
                hs[which].push(t.elapsed());
            }
        }
    }
    let [a, b, c] = hs;
    for (label, v) in [
        ("new connection + POST, mutual TLS (full handshake)", a),
        ("new connection + POST, mutual TLS (resumed session)", b),
        ("new connection + POST, plain HTTP", c),
    ] {
        let (m, p) = median_p99(v);
        rows.push((label.to_owned(), m, p));
    }

    println!(
        "\n{N} requests ({} byte body) / {H} new connections on loopback, 2 worker threads\n",
        body.len()
    );
    println!("| what | median | p99 |\n| --- | ---: | ---: |");
    for (what, m, p) in rows {
        println!("| {what} | {} | {} |", us(m), us(p));
    }
}
