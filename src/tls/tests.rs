use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::testutil::{TestPki, write};
use super::*;

/// Runs a TLS handshake over an in-memory pipe; returns (the server's result with the client's
/// names, the client's result after it has also read the server's first byte).
async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (Result<Vec<String>, String>, Result<(), String>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server_side = async move {
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(s)
            .await
            .map_err(|e| e.to_string())?;
        let names = client_names(tls.get_ref().1);
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(names)
    };
    let client_side = async move {
        let name = ServerName::try_from("10.0.0.1").map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        // In TLS 1.3 the server's verdict on the client certificate arrives after the client's
        // handshake is done: read once to see it.
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), async move {
        tokio::join!(server_side, client_side)
    })
    .await
    .expect("handshake finished")
}

fn load(files: &TlsFiles, name: &str) -> TlsMaterial {
    TlsMaterial::load(files, name).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn handshake_succeeds_for_the_expected_peer_and_the_server_learns_its_name() {
    let pki = TestPki::new();
    let gw1 = load(&pki.node("gw1"), "gw1");
    let gw2 = load(&pki.node("gw2"), "gw2");
    assert_eq!(gw1.summary().cert_names, vec!["gw1".to_owned()]);
    assert_eq!(gw1.summary().ca_subjects.len(), 1);

    // gw2 dials gw1 (by IP address) expecting gw1.
    let (server, client) = handshake(gw1.server_config(), gw2.client_config("gw1").unwrap()).await;
    assert_eq!(server, Ok(vec!["gw2".to_owned()]));
    assert_eq!(client, Ok(()));
}

#[tokio::test]
async fn client_refuses_a_server_with_another_nodes_name() {
    let pki = TestPki::new();
    let gw1 = load(&pki.node("gw1"), "gw1");
    let gw2 = load(&pki.node("gw2"), "gw2");
    // gw2 expects gw3 at this address, but gw1 answers: a valid certificate of the right CA
    // with the wrong name.
    let (_, client) = handshake(gw1.server_config(), gw2.client_config("gw3").unwrap()).await;
    let e = client.unwrap_err();
    assert!(
        e.contains("not valid for name \"gw3\"") && e.contains("gw1"),
        "{e}"
    );
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let pki = TestPki::new();
    let gw1 = load(&pki.node("gw1"), "gw1");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pki.ca.cert.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let anonymous = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            PeerVerifier::new(
                "gw1",
                Arc::new(roots),
                provider().signature_verification_algorithms,
            )
            .unwrap(),
        ))
        .with_no_client_auth();
    let (server, client) = handshake(gw1.server_config(), Arc::new(anonymous)).await;
    let e = server.unwrap_err();
    assert!(e.contains("certificate"), "{e}");
    assert!(client.is_err());
}

#[tokio::test]
async fn both_sides_refuse_a_certificate_of_another_ca() {
    let pki = TestPki::new();
    let stranger_pki = TestPki::new();
    let gw1 = load(&pki.node("gw1"), "gw1");
    // A "gw2" with a perfectly valid certificate for the right name, from another CA.
    let stranger = load(&stranger_pki.node("gw2"), "gw2");

    let (server, client) =
        handshake(gw1.server_config(), stranger.client_config("gw1").unwrap()).await;
    // The stranger refuses gw1 (unknown issuer) before it even presents its certificate.
    let e = client.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(server.is_err());

    // And gw1 refuses the stranger as a server.
    let stranger_gw1 = load(&stranger_pki.node("gw1"), "gw1");
    let gw2 = load(&pki.node("gw2"), "gw2");
    let (_, client) = handshake(
        stranger_gw1.server_config(),
        gw2.client_config("gw1").unwrap(),
    )
    .await;
    let e = client.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    // A client of the other CA that trusts our CA (so it gets as far as presenting its
    // certificate) is refused by our server.
    let mixed_files = TlsFiles {
        ca_file: pki.path("ca.pem"),
        ..stranger_pki.node("gw3")
    };
    // Its own certificate does not chain to the CA it trusts: loading says so...
    let e = TlsMaterial::load(&mixed_files, "gw3").unwrap_err();
    assert!(matches!(e, TlsError::NotOurs { .. }), "{e}");
    assert!(e.to_string().contains("gw3.pem"), "{e}");
    // ...so build that client by hand.
    let chain: Vec<_> = CertificateDer::pem_file_iter(&mixed_files.cert_file)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&mixed_files.key_file).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(chain_root(&pki)).unwrap();
    let rogue = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            PeerVerifier::new(
                "gw1",
                Arc::new(roots),
                provider().signature_verification_algorithms,
            )
            .unwrap(),
        ))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let (server, client) = handshake(gw1.server_config(), Arc::new(rogue)).await;
    let e = server.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(client.is_err());
}

fn chain_root(pki: &TestPki) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pki.ca.cert.as_bytes()).unwrap()
}

#[test]
fn a_key_file_readable_by_others_is_refused_naming_file_and_mode() {
    let pki = TestPki::new();
    let files = pki.node("gw1");
    std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = TlsMaterial::load(&files, "gw1").unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, TlsError::KeyPermissions { mode: 0o644, .. }),
        "{msg}"
    );
    assert!(msg.contains(&files.key_file.display().to_string()), "{msg}");
    assert!(msg.contains("0644") && msg.contains("chmod 600"), "{msg}");
    // Group-readable too.
    std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(
        TlsMaterial::load(&files, "gw1"),
        Err(TlsError::KeyPermissions { mode: 0o640, .. })
    ));
    std::fs::set_permissions(&files.key_file, std::fs::Permissions::from_mode(0o400)).unwrap();
    load(&files, "gw1");
}

#[test]
fn every_load_error_names_its_file() {
    let pki = TestPki::new();
    let good = pki.node("gw1");
    let other = pki.node("gw2");
    let check = |files: &TlsFiles, name: &str, file: &std::path::Path, needle: &str| {
        let e = TlsMaterial::load(files, name).unwrap_err().to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(e.contains(needle), "{needle:?} in {e}");
    };

    let missing = TlsFiles {
        ca_file: pki.path("nope.pem"),
        ..good.clone()
    };
    check(&missing, "gw1", &missing.ca_file, "No such file");

    let empty = pki.path("empty.pem");
    write(&empty, "", 0o644);
    let f = TlsFiles {
        ca_file: empty.clone(),
        ..good.clone()
    };
    check(&f, "gw1", &empty, "no PEM CERTIFICATE block");
    let f = TlsFiles {
        cert_file: empty.clone(),
        ..good.clone()
    };
    check(&f, "gw1", &empty, "no PEM CERTIFICATE block");
    let empty_key = pki.path("empty-key.pem");
    write(&empty_key, "", 0o600);
    let f = TlsFiles {
        key_file: empty_key.clone(),
        ..good.clone()
    };
    check(&f, "gw1", &empty_key, "no PEM PRIVATE KEY block");

    let garbage = pki.path("garbage.pem");
    write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        0o644,
    );
    let f = TlsFiles {
        ca_file: garbage.clone(),
        ..good.clone()
    };
    check(&f, "gw1", &garbage, "CA file");

    // gw1's certificate with gw2's key.
    let f = TlsFiles {
        key_file: other.key_file.clone(),
        ..good.clone()
    };
    check(&f, "gw1", &other.key_file, "does not belong");

    // gw2's files on the node called gw1.
    check(&other, "gw1", &other.cert_file, "this node is \"gw1\"");

    // A directory.
    let f = TlsFiles {
        ca_file: pki.dir.path().to_owned(),
        ..good.clone()
    };
    check(&f, "gw1", pki.dir.path(), "not a regular file");

    // Not a DNS name.
    let e = TlsMaterial::load(&good, "10.0.0.1").unwrap_err();
    assert!(matches!(e, TlsError::BadNodeName { .. }), "{e}");
}

#[tokio::test]
async fn reload_picks_up_a_rotated_certificate_and_a_failed_reload_keeps_the_old() {
    let pki = TestPki::new();
    let files = pki.node("gw1");
    let tls = PeerTls::load(files.clone(), "gw1").unwrap();
    let gw2 = load(&pki.node("gw2"), "gw2");

    let presented = |tls: &PeerTls| {
        let server = tls.server_config();
        let client = gw2.client_config("gw1").unwrap();
        async move {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let (srv, cli) = tokio::join!(
                tokio_rustls::TlsAcceptor::from(server).accept(s),
                tokio_rustls::TlsConnector::from(client)
                    .connect(ServerName::try_from("gw1").unwrap(), c)
            );
            srv.unwrap();
            cli.unwrap().get_ref().1.peer_certificates().unwrap()[0].clone()
        }
    };
    let first = presented(&tls).await;

    // Rotate: a new certificate and key for gw1 in place.
    pki.node("gw1");
    let summary = tls.reload().unwrap();
    assert_eq!(summary.cert_names, vec!["gw1".to_owned()]);
    let second = presented(&tls).await;
    assert_ne!(first, second, "new handshakes present the new certificate");
    assert_eq!(
        second.as_ref(),
        CertificateDer::from_pem_file(&files.cert_file)
            .unwrap()
            .as_ref()
    );

    // A broken file: the reload fails, says which file, and the old one stays in force.
    write(&files.ca_file, "garbage", 0o644);
    let e = tls.reload().unwrap_err();
    assert!(e.to_string().contains("ca.pem"), "{e}");
    assert_eq!(presented(&tls).await, second);
}

#[tokio::test]
async fn a_bundle_of_old_and_new_ca_accepts_both_during_a_rotation() {
    let old = TestPki::new();
    let new = TestPki::new();
    let bundle = format!("{}{}", old.ca.cert, new.ca.cert);

    // gw1 is already re-issued by the new CA, gw2 still has a certificate of the old one;
    // both trust the bundle.
    let gw1 = new.node("gw1");
    write(&gw1.ca_file, &bundle, 0o644);
    let gw2 = old.node("gw2");
    write(&gw2.ca_file, &bundle, 0o644);
    let gw1 = load(&gw1, "gw1");
    let gw2_tls = PeerTls::load(gw2.clone(), "gw2").unwrap();
    assert_eq!(gw1.summary().ca_subjects.len(), 2);

    let (s, c) = handshake(gw1.server_config(), gw2_tls.client_config("gw1").unwrap()).await;
    assert_eq!((s, c), (Ok(vec!["gw2".to_owned()]), Ok(())));
    let (s, c) = handshake(gw2_tls.server_config(), gw1.client_config("gw2").unwrap()).await;
    assert_eq!((s, c), (Ok(vec!["gw1".to_owned()]), Ok(())));

    // Without the bundle, a node that trusts only the old CA refuses gw1's new certificate...
    write(&gw2.ca_file, &old.ca.cert, 0o644);
    gw2_tls.reload().unwrap();
    let (_, c) = handshake(gw1.server_config(), gw2_tls.client_config("gw1").unwrap()).await;
    let e = c.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    // ...and a node whose own certificate is of the old CA cannot drop the old CA yet.
    write(&gw2.ca_file, &new.ca.cert, 0o644);
    let e = gw2_tls.reload().unwrap_err();
    assert!(matches!(e, TlsError::NotOurs { .. }), "{e}");
}

#[test]
fn client_configs_are_cached_per_peer_and_refuse_non_dns_names() {
    let pki = TestPki::new();
    let m = load(&pki.node("gw1"), "gw1");
    let a = m.client_config("gw2").unwrap();
    assert!(Arc::ptr_eq(&a, &m.client_config("gw2").unwrap()));
    assert!(!Arc::ptr_eq(&a, &m.client_config("gw3").unwrap()));
    assert!(matches!(
        m.client_config("10.0.0.2"),
        Err(TlsError::BadNodeName { .. })
    ));
}

#[test]
fn peer_identity_matches_names_case_insensitively() {
    let id = PeerIdentity {
        names: vec!["GW2".to_owned()],
        remote: "127.0.0.1:1".parse().unwrap(),
    };
    assert!(id.is("gw2"));
    assert_eq!(id.member_of(["gw1", "gw2"]), Some("gw2"));
    assert_eq!(id.member_of(["gw1", "gw3"]), None);
    assert_eq!(id.to_string(), "GW2 at 127.0.0.1:1");
}

// ---------------------------------------------------------------------------------------------
// The accept loop and the client, over loopback

mod over_loopback {
    use std::net::SocketAddr;
    use std::time::Instant;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::Extension;
    use axum::routing::post;

    use super::*;
    use crate::tls::client::{ClientError, PeerClient};
    use crate::tls::server::{ServeOptions, serve};

    fn router() -> Router {
        Router::new().route(
            "/whoami",
            post(
                |Extension(peer): Extension<PeerIdentity>, body: Bytes| async move {
                    format!("{} {}", peer.names.join(","), body.len())
                },
            ),
        )
    }

    /// Serves `router()` as node `files`; the sender stops it.
    async fn start(
        tls: PeerTls,
        options: ServeOptions,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, tls, router(), options, async move {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    fn client(files: TlsFiles, name: &str) -> PeerClient {
        PeerClient::new(
            PeerTls::load(files, name).unwrap(),
            Duration::from_millis(500),
            1 << 20,
        )
    }

    async fn whoami(
        client: &PeerClient,
        peer: &str,
        addr: SocketAddr,
    ) -> Result<(u16, String), ClientError> {
        let r = client
            .post(
                peer,
                &addr.to_string(),
                "/whoami",
                "text/plain",
                Bytes::from_static(b"hello"),
                Duration::from_secs(2),
            )
            .await?;
        Ok((
            r.status.as_u16(),
            String::from_utf8_lossy(&r.body).into_owned(),
        ))
    }

    #[tokio::test]
    async fn requests_carry_the_verified_peer_and_wrong_peers_are_refused() {
        let pki = TestPki::new();
        let gw1 = PeerTls::load(pki.node("gw1"), "gw1").unwrap();
        let members = Arc::new(std::sync::Mutex::new(vec![
            "gw1".to_owned(),
            "gw2".to_owned(),
        ]));
        let current = members.clone();
        let options = ServeOptions::default().members_only(move || current.lock().unwrap().clone());
        let (addr, stop, task) = start(gw1, options).await;

        // The right peer; twice, the second time over the pooled connection.
        let gw2 = client(pki.node("gw2"), "gw2");
        assert_eq!(
            whoami(&gw2, "gw1", addr).await.unwrap(),
            (200, "gw2 5".to_owned())
        );
        assert_eq!(
            whoami(&gw2, "gw1", addr).await.unwrap(),
            (200, "gw2 5".to_owned())
        );

        // gw2 expects gw3 at that address: refused during the handshake, by gw2.
        let e = whoami(&gw2, "gw3", addr).await.unwrap_err();
        assert!(matches!(e, ClientError::Tls { .. }), "{e}");
        assert!(e.is_unreachable());
        assert!(e.to_string().contains("not valid for name \"gw3\""), "{e}");

        // A certificate of the CA, but not a member: 403 with the reason, no handler.
        let gw9 = client(pki.node("gw9"), "gw9");
        let (status, body) = whoami(&gw9, "gw1", addr).await.unwrap();
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("gw9") && body.contains("not a member"),
            "{body}"
        );

        // A node of another CA: refused during the handshake.
        let stranger = client(TestPki::new().node("gw2"), "gw2");
        let e = whoami(&stranger, "gw1", addr).await.unwrap_err();
        assert!(matches!(e, ClientError::Tls { .. }), "{e}");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");

        // A client that presents no certificate at all (plain HTTPS, trusting the CA).
        let mut roots = RootCertStore::empty();
        roots.add(chain_root(&pki)).unwrap();
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                PeerVerifier::new(
                    "gw1",
                    Arc::new(roots),
                    provider().signature_verification_algorithms,
                )
                .unwrap(),
            ))
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(anonymous))
            .connect(ServerName::try_from("gw1").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"POST /whoami HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let e = tls.read_to_end(&mut buf).await.unwrap_err();
        assert!(e.to_string().contains("CertificateRequired"), "{e}");
        assert!(buf.is_empty());

        // gw2 is removed from the membership while its connection is pooled: its next request
        // on that same connection is refused.
        members.lock().unwrap().retain(|m| m != "gw2");
        let (status, body) = whoami(&gw2, "gw1", addr).await.unwrap();
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("gw2") && body.contains("not a member"),
            "{body}"
        );
        members.lock().unwrap().push("gw2".to_owned());
        assert_eq!(whoami(&gw2, "gw1", addr).await.unwrap().0, 200);

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("serve stops on shutdown")
            .unwrap();
        let e = whoami(&gw2, "gw1", addr).await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
    }

    #[tokio::test]
    async fn a_handshake_that_never_completes_times_out_and_connections_are_limited() {
        let pki = TestPki::new();
        let gw1 = PeerTls::load(pki.node("gw1"), "gw1").unwrap();
        let options = ServeOptions {
            handshake_timeout: Duration::from_millis(300),
            max_connections: 1,
            ..ServeOptions::default()
        };
        let (addr, _stop, _task) = start(gw1, options).await;

        // Connects and says nothing: closed once the handshake timeout has passed.
        let t = Instant::now();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // While it holds the only slot, another connection is closed at once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_millis(200), second.read(&mut b))
            .await
            .expect("the second connection is closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut b))
            .await
            .expect("the silent connection is closed");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
            "{waited:?}"
        );

        // The slot is free again: a real peer gets through.
        let gw2 = client(pki.node("gw2"), "gw2");
        assert_eq!(whoami(&gw2, "gw1", addr).await.unwrap().0, 200);
    }

    #[tokio::test]
    async fn the_client_gives_up_on_a_peer_that_never_completes_the_handshake() {
        let pki = TestPki::new();
        // Accepts TCP connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let gw2 = client(pki.node("gw2"), "gw2");
        let t = Instant::now();
        let e = whoami(&gw2, "gw1", addr).await.unwrap_err();
        assert!(matches!(e, ClientError::ConnectTimeout { .. }), "{e}");
        assert!(e.is_unreachable());
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );

        // Nothing listening: a connect error.
        drop(_hold);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = whoami(&gw2, "gw1", port).await.unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("refused"), "{e}");
    }

    #[tokio::test]
    async fn a_reload_applies_to_new_connections_of_a_running_server() {
        let pki = TestPki::new();
        let files = pki.node("gw1");
        let gw1 = PeerTls::load(files.clone(), "gw1").unwrap();
        let (addr, _stop, _task) = start(gw1.clone(), ServeOptions::default()).await;
        let tls2 = PeerTls::load(pki.node("gw2"), "gw2").unwrap();
        let connector = tls2.connector("gw1", Duration::from_secs(1));
        let presented = || async {
            let s = connector.connect(&addr.to_string()).await.unwrap();
            s.tls().peer_certificates().unwrap()[0].clone()
        };
        let before = presented().await;
        pki.node("gw1");
        gw1.reload().unwrap();
        let after = presented().await;
        assert_ne!(before, after);
    }
}
