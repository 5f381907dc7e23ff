//! Who may speak the peer protocol, end to end in network namespaces with real daemons and
//! certificates made by `egressd tls`: strangers on the peer network are refused at the TLS
//! handshake (no certificate, another CA) or right after it (a certificate of the cluster CA
//! with a name that is no member), a node cannot pose as another, a node started on another
//! cluster's store is refused by the cluster id with both ids in the message, certificates are
//! rotated (a new CA, bundled during the change) with SIGHUP while the cluster runs, and member
//! changes are refused when they would leave no quorum — including the procedure to replace a
//! failed node. Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.

mod common;

use std::path::Path;
use std::time::Duration;

use common::arp;
use common::cluster::*;
use common::netns::require_root;
use common::topo::*;
use egressd::cluster::transport::{HELLO_PATH, PeerClient, TransportError};
use egressd::tls::{PeerTls, TlsFiles};

/// An address for a stranger on the peer network (the bridge in the `mgmt` namespace).
const STRANGER_IP: &str = "10.78.0.200";

/// The answer of `/cluster/hello` (the daemon's `Hello`, same fields in the same order).
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Hello {
    initialized: bool,
    cluster_id: Option<String>,
}

/// Puts an address on the peer network's bridge, for requests from a host that is no node.
fn add_stranger(topo: &Topo) {
    topo.lab.exec(
        &topo.mgmt,
        [
            "ip",
            "addr",
            "add",
            &format!("{STRANGER_IP}/24"),
            "dev",
            "br2",
        ],
    );
}

/// curl from the stranger's namespace: POST https://{name}:7480/cluster/hello at node `i`'s
/// peer address, verifying the server with `ca` (as `name`), presenting `cert` if given.
/// Returns (exit code, HTTP status, body and stderr).
fn curl_hello(
    topo: &Topo,
    i: usize,
    name: &str,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
) -> (i32, String, String) {
    let (rc, code, text, _) = curl_peer(topo, i, name, HELLO_PATH, ca, cert, &[]);
    (rc, code, text)
}

/// `curl_hello` for any `path`, with `extra` curl arguments (a body, a rate limit); also
/// returns how long curl took.
fn curl_peer(
    topo: &Topo,
    i: usize,
    name: &str,
    path: &str,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    extra: &[&str],
) -> (i32, String, String, f64) {
    let resolve = format!("{name}:7480:{}", node_mgmt_ip(i));
    let url = format!("https://{name}:7480{path}");
    let body = topo.dir.path().join("curl-body");
    let _ = std::fs::remove_file(&body);
    let mut args: Vec<String> = [
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-X",
        "POST",
        "-o",
        &body.display().to_string(),
        "-w",
        "%{http_code}",
        "--resolve",
        &resolve,
        "--cacert",
        &ca.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    if let Some((c, k)) = cert {
        args.extend([
            "--cert".into(),
            c.display().to_string(),
            "--key".into(),
            k.display().to_string(),
        ]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push(url);
    let t = std::time::Instant::now();
    let out = topo.lab.try_exec(&topo.mgmt, &args);
    let secs = t.elapsed().as_secs_f64();
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&body).unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), code, text, secs)
}

fn files(dir: &Path, name: &str) -> TlsFiles {
    let d = dir.join("tls");
    TlsFiles {
        ca_file: d.join("ca/ca.pem"),
        cert_file: d.join(format!("certs/{name}.pem")),
        key_file: d.join(format!("certs/{name}-key.pem")),
    }
}

/// egressd's own peer client, run from the stranger's namespace, holding `as_name`'s
/// certificate and asking node `i` for its hello while expecting it to be `expect`.
fn egressd_hello(topo: &Topo, as_name: &str, i: usize, expect: &str) -> Result<Hello, String> {
    let tls = PeerTls::load(files(topo.dir.path(), as_name), as_name).expect("load TLS files");
    let ns = topo.mgmt.clone();
    let addr = format!("{}:7480", node_mgmt_ip(i));
    let expect = expect.to_string();
    let as_name = as_name.to_string();
    std::thread::spawn(move || {
        arp::enter_netns(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let client = PeerClient::new(&as_name, Some(tls), std::sync::Arc::new(|| None));
            client
                .post::<_, Hello>(&expect, &addr, HELLO_PATH, &(), Duration::from_secs(3))
                .await
                .map_err(|e: TransportError| e.to_string())
        })
    })
    .join()
    .expect("client thread")
}

fn cluster_id(c: &Cluster, i: usize) -> Option<String> {
    c.topo.status(i)?["cluster"]["id"]
        .as_str()
        .map(String::from)
}

fn term(c: &Cluster, i: usize) -> Option<u64> {
    c.topo.status(i)?["cluster"]["term"].as_u64()
}

#[test]
fn strangers_are_refused_at_the_handshake_and_the_cluster_keeps_working() {
    if !require_root("strangers_are_refused_at_the_handshake_and_the_cluster_keeps_working") {
        return;
    }
    let mut c = Cluster::start("ptls", 3);
    add_stranger(&c.topo);
    let dir = c.topo.dir.path().to_path_buf();
    let ca = dir.join("tls/ca/ca.pem");
    let leader = c.leader();
    let term_before = term(&c, 0).expect("term");

    // Control: a member's certificate of the cluster CA gets an answer, so the refusals below
    // are the certificates' doing, not the network's.
    let gw3 = files(&dir, "gw3");
    let (rc, code, text) = curl_hello(
        &c.topo,
        0,
        "gw1",
        &ca,
        Some((&gw3.cert_file, &gw3.key_file)),
    );
    assert_eq!((rc, code.as_str()), (0, "200"), "member's request: {text}");
    let hello = egressd_hello(&c.topo, "gw3", 0, "gw1").expect("egressd client as gw3");
    assert!(hello.initialized, "{hello:?}");
    assert_eq!(hello.cluster_id, cluster_id(&c, 0), "{hello:?}");

    // No certificate: the handshake fails (TLS 1.3 reports it to the client at its first read).
    let (rc, code, text) = curl_hello(&c.topo, 0, "gw1", &ca, None);
    assert_ne!(rc, 0, "no certificate: {text}");
    assert_eq!(code, "000", "no certificate got an HTTP answer: {text}");
    assert!(text.contains("alert"), "no certificate: {text}");

    // A certificate of another CA, even with a member's name.
    let other = dir.join("other");
    common::topo::egressd_tls(&[
        "init-ca",
        "--out-dir",
        &other.join("ca").display().to_string(),
    ]);
    common::topo::egressd_tls(&[
        "issue",
        "gw2",
        "--ca-dir",
        &other.join("ca").display().to_string(),
        "--out-dir",
        &other.join("certs").display().to_string(),
    ]);
    let (oc, ok) = (other.join("certs/gw2.pem"), other.join("certs/gw2-key.pem"));
    let (rc, code, text) = curl_hello(&c.topo, 0, "gw1", &ca, Some((&oc, &ok)));
    assert_ne!(rc, 0, "another CA: {text}");
    assert_eq!(code, "000", "another CA got an HTTP answer: {text}");
    assert!(text.contains("alert"), "another CA: {text}");

    // The cluster CA, but a name that is no member: past the handshake, refused before any
    // handler runs.
    common::topo::issue_cert(&dir, "gw9", &[]);
    let gw9 = files(&dir, "gw9");
    let (rc, code, text) = curl_hello(
        &c.topo,
        0,
        "gw1",
        &ca,
        Some((&gw9.cert_file, &gw9.key_file)),
    );
    assert_eq!((rc, code.as_str()), (0, "403"), "non-member: {text}");
    assert!(text.contains("not a member"), "non-member: {text}");

    // Limits before trust. A non-member's 30 MiB append is refused on its headers; a
    // member's body over a route's limit gets 413; a trickled one 408 after the body timeout.
    let big = dir.join("big.bin");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(30 * 1024 * 1024))
        .expect("big body");
    let big_arg = format!("@{}", big.display());
    let (rc, code, text, secs) = curl_peer(
        &c.topo,
        0,
        "gw1",
        "/raft/append",
        &ca,
        Some((&gw9.cert_file, &gw9.key_file)),
        &["--data-binary", &big_arg],
    );
    assert_eq!(
        (rc, code.as_str()),
        (0, "403"),
        "non-member's large append: {text}"
    );
    eprintln!("non-member's 30 MiB append refused in {secs:.2} s");
    let medium = dir.join("medium.bin");
    std::fs::write(&medium, vec![0u8; 100 * 1024]).expect("medium body");
    let medium_arg = format!("@{}", medium.display());
    let member = Some((gw3.cert_file.as_path(), gw3.key_file.as_path()));
    let (_, code, text, _) = curl_peer(
        &c.topo,
        0,
        "gw1",
        "/raft/vote",
        &ca,
        member,
        // The answer comes before the body is read: without `Expect`, curl may still be
        // sending when the server closes, and reports the broken pipe instead of the 413.
        &["-H", "Expect: 100-continue", "--data-binary", &medium_arg],
    );
    assert_eq!(code, "413", "100 KiB vote: {text}");
    let (_, code, text, secs) = curl_peer(
        &c.topo,
        0,
        "gw1",
        "/cluster/write",
        &ca,
        member,
        &[
            "--max-time",
            "15",
            "--limit-rate",
            "2K",
            "--data-binary",
            &medium_arg,
        ],
    );
    assert_eq!(code, "408", "trickled write: {text}");
    assert!(secs < 10.0, "the trickled body was waited for {secs:.1} s");

    // A node cannot pose as another: gw1's address answers with gw1's certificate, which
    // egressd's client refuses when it expects gw2 there (as it would when gw1 took over
    // gw2's address), and so does curl.
    let e = egressd_hello(&c.topo, "gw3", 0, "gw2").expect_err("gw1 accepted as gw2");
    assert!(e.contains("gw2"), "{e}");
    let (rc, code, text) = curl_hello(
        &c.topo,
        0,
        "gw2",
        &ca,
        Some((&gw3.cert_file, &gw3.key_file)),
    );
    assert_ne!(rc, 0, "gw1 posing as gw2: {text}");
    assert_eq!(code, "000", "{text}");

    // The cluster kept working: same leader and term, the gateway where it was, and a
    // failover still happens.
    assert_eq!(c.leader(), leader);
    assert_eq!(term(&c, 0), Some(term_before), "{}", c.logs());
    c.assert_traffic_via_vip();
    c.signal("gw1", "KILL");
    c.wait_active_among(&[1, 2], "gw2");
    c.assert_traffic_via_vip();
    eprintln!("refusals: no certificate, another CA, non-member gw9 (403), gw1 posing as gw2: {e}");
}

/// A node started on the store of another cluster whose certificates come from the same CA
/// (two clusters set up with one CA and the same node names; a restored backup of the wrong
/// cluster): it has a member's name and a valid certificate, so only the cluster id tells them
/// apart. Both sides refuse, naming both ids, and the cluster carries on without it.
#[test]
fn a_node_on_another_clusters_store_is_refused_by_the_cluster_id() {
    if !require_root("a_node_on_another_clusters_store_is_refused_by_the_cluster_id") {
        return;
    }
    let mut c = Cluster::start("pcida", 3);
    let ours = cluster_id(&c, 0).expect("cluster id");
    c.ensure_leader_is_not("gw3");

    // Cluster B: the same names, certificates of the same CA, its own lab (same addresses).
    let tls_a = c.topo.dir.path().join("tls");
    let mut b = Cluster::start_prepared("pcidb", 3, "", "", |t| {
        let tls_b = t.dir.path().join("tls");
        std::fs::remove_dir_all(&tls_b).expect("B's own certificates");
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(&tls_a)
            .arg(&tls_b)
            .output()
            .expect("cp");
        assert!(out.status.success(), "{out:?}");
    });
    let mut theirs = None;
    wait_for("cluster B's id", WAIT, || {
        theirs = cluster_id(&b, 0);
        theirs.is_some()
    });
    let theirs = theirs.expect("id");
    assert_ne!(theirs, ours, "two clusters chose the same id");
    for i in 0..3 {
        b.signal(&name(i), "KILL");
    }
    let b_store = c.topo.dir.path().join("data-gw3-of-b");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(b.topo.dir.path().join("data-gw3"))
        .arg(&b_store)
        .output()
        .expect("cp");
    assert!(out.status.success(), "{out:?}");
    drop(b);

    // gw3 of cluster A restarts on B's gw3 store.
    c.signal("gw3", "KILL");
    let a_store = c.topo.dir.path().join("data-gw3");
    std::fs::remove_dir_all(&a_store).expect("gw3's store");
    std::fs::rename(&b_store, &a_store).expect("B's store in place");
    let cfg = c.configs[2].clone();
    c.children[2] = Some(c.topo.start_egressd(2, &cfg));

    // A's leader keeps sending gw3 heartbeats, and gw3 asks A's nodes for votes for B's Raft:
    // each receiver refuses by the id, naming both.
    let both = |log: &str| {
        log.lines()
            .any(|l| l.contains(&ours) && l.contains(&theirs) && l.contains("belongs to cluster"))
    };
    wait_for("gw3 (on B's store) refusing, naming both ids", WAIT, || {
        both(&c.topo.log(2))
    });
    let leader = c.leader();
    let li = c.index(&leader);
    wait_for("A's leader refusing, naming both ids", WAIT, || {
        both(&c.topo.log(li))
    });
    // Neither took anything from the other.
    // (Its status is published once its first round has run: wait for it.)
    let mut s = serde_json::Value::Null;
    wait_for("gw3's status naming B's cluster id", WAIT, || {
        s = c.topo.status(2).unwrap_or_default();
        !s["cluster"]["id"].is_null()
    });
    assert_eq!(s["cluster"]["id"].as_str(), Some(theirs.as_str()), "{s}");
    assert_eq!(cluster_id(&c, 0).as_deref(), Some(ours.as_str()));
    assert_eq!(c.leader(), leader);
    c.wait_active_among(&[0, 1], "gw1");
    c.assert_traffic_via_vip();
    let line = c
        .topo
        .log(li)
        .lines()
        .find(|l| l.contains("belongs to cluster"))
        .map(String::from)
        .unwrap_or_default();
    eprintln!("refusal on A's leader: {line}");
}

/// A CA rotation while the cluster runs, with SIGHUP only: bundle old+new CA, re-issue every
/// node's certificate from the new CA, then drop the old CA. Afterwards a certificate of the
/// old CA is refused, the new one accepted, and the cluster still fails over.
#[test]
fn certificates_rotate_with_sighup_while_the_cluster_runs() {
    if !require_root("certificates_rotate_with_sighup_while_the_cluster_runs") {
        return;
    }
    let mut c = Cluster::start("prot", 3);
    add_stranger(&c.topo);
    let dir = c.topo.dir.path().to_path_buf();
    let tls = dir.join("tls");
    let old_ca = std::fs::read_to_string(tls.join("ca/ca.pem")).expect("old CA");
    // Keep one certificate of the old CA for the check at the end.
    for f in ["gw3.pem", "gw3-key.pem"] {
        std::fs::copy(tls.join("certs").join(f), tls.join(format!("old-{f}"))).expect("copy");
    }
    // SIGHUP to every node, then wait until each has reloaded its peer TLS files `n` times in
    // all (a reload that failed would leave the count short).
    let hup_all = |c: &mut Cluster, n: usize| {
        for i in 0..3 {
            c.signal(&name(i), "HUP");
        }
        wait_for("every node reloading its TLS files", WAIT, || {
            (0..3).all(|i| c.topo.log(i).matches("peer TLS files reloaded").count() >= n)
        });
    };
    // As an operator should: the new file in place at once (a reader never sees half of it).
    let replace = |path: &Path, text: &str| {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    };
    let trusted = |c: &Cluster, i: usize| -> usize {
        c.topo
            .status(i)
            .and_then(|s| s["cluster"]["peer_tls"].as_str().map(String::from))
            .and_then(|t| {
                t.split("trusting ")
                    .nth(1)
                    .and_then(|r| r.split(' ').next())
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    };

    // 1. A new CA, bundled with the old one on every node.
    let new_ca_dir = dir.join("tls/ca2");
    common::topo::egressd_tls(&["init-ca", "--out-dir", &new_ca_dir.display().to_string()]);
    let new_ca = std::fs::read_to_string(new_ca_dir.join("ca.pem")).expect("new CA");
    replace(&tls.join("ca/ca.pem"), &format!("{old_ca}{new_ca}"));
    hup_all(&mut c, 1);
    wait_for("every node trusting two CAs", WAIT, || {
        (0..3).all(|i| trusted(&c, i) == 2)
    });

    // 2. Every node's certificate from the new CA (the same paths).
    for i in 0..3 {
        let certs = tls.join("certs").display().to_string();
        common::topo::egressd_tls(&[
            "issue",
            &name(i),
            "--ca-dir",
            &new_ca_dir.display().to_string(),
            "--out-dir",
            &certs,
            "--force",
        ]);
    }
    hup_all(&mut c, 2);

    // 3. The old CA goes.
    replace(&tls.join("ca/ca.pem"), &new_ca);
    hup_all(&mut c, 3);
    wait_for("every node trusting one CA", WAIT, || {
        (0..3).all(|i| trusted(&c, i) == 1)
    });
    for i in 0..3 {
        let log = c.topo.log(i);
        assert!(!log.contains("reload rejected"), "{}: {log}", name(i));
    }

    // New connections use the new files: the old CA's certificate is refused, the new one
    // accepted (curl verifies the server with the new CA: the node serves its new certificate).
    let ca = tls.join("ca/ca.pem");
    let (oc, ok) = (tls.join("old-gw3.pem"), tls.join("old-gw3-key.pem"));
    let (rc, code, text) = curl_hello(&c.topo, 0, "gw1", &ca, Some((&oc, &ok)));
    assert_ne!(rc, 0, "old CA's certificate after the rotation: {text}");
    assert_eq!(code, "000", "{text}");
    let gw3 = files(&dir, "gw3");
    let (rc, code, text) = curl_hello(
        &c.topo,
        0,
        "gw1",
        &ca,
        Some((&gw3.cert_file, &gw3.key_file)),
    );
    assert_eq!((rc, code.as_str()), (0, "200"), "new certificate: {text}");

    // The cluster works on new connections only: a failover makes every survivor dial anew.
    c.assert_traffic_via_vip();
    c.signal("gw1", "KILL");
    c.wait_active_among(&[1, 2], "gw2");
    c.assert_traffic_via_vip();
}

/// Member changes keep a quorum: with gw3 down, removing gw2 would leave {gw1, gw3} with one
/// live voter and is refused; removing the dead gw3 is fine. Then the documented replacement
/// of a failed node: gw3 comes back with an empty data_dir, `egressd member add` takes it in
/// and it becomes a voter again. And one voter change at a time: while an added member has not
/// caught up, removing a voter is refused.
#[test]
fn member_changes_keep_a_quorum_and_a_failed_node_is_replaced() {
    if !require_root("member_changes_keep_a_quorum_and_a_failed_node_is_replaced") {
        return;
    }
    let (token, admin) = admin_token("e2e-quorum-admin-token-0123");
    let mut c = Cluster::start_with("pquo", 3, &admin);
    c.ensure_leader_is_not("gw3");
    let token = token.path().display().to_string();
    let member = |c: &Cluster, args: &[&str]| {
        let mut full = vec!["member"];
        full.extend(args);
        full.extend(["--token-file", &token]);
        c.topo.cli(0, &full)
    };
    let voters = |c: &Cluster, i: usize| -> Vec<String> {
        let mut v: Vec<String> = c
            .topo
            .status(i)
            .and_then(|s| {
                s["cluster"]["voters"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default();
        v.sort();
        v
    };

    c.signal("gw3", "KILL");
    // Wait until the leader has noticed gw3 is silent.
    wait_for("gw3 seen dead", WAIT, || {
        c.topo.status(0).is_some_and(|s| {
            s["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["name"] == "gw3" && m["alive"] == serde_json::Value::Bool(false))
            })
        })
    });
    let out = member(&c, &["remove", "gw2"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "removing gw2 was accepted");
    assert!(err.contains("quorum"), "{err}");
    assert_eq!(voters(&c, 0), ["gw1", "gw2", "gw3"]);

    let out = member(&c, &["remove", "gw3"]);
    assert!(
        out.status.success(),
        "removing the dead gw3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("gw3 out of the voters", WAIT, || {
        voters(&c, 0) == ["gw1", "gw2"]
    });
    c.assert_traffic_via_vip();

    // Replacement: an empty data_dir, `member add`, start.
    std::fs::remove_dir_all(c.topo.dir.path().join("data-gw3")).expect("wipe gw3's store");
    let gw3 = format!("{}:7480", node_mgmt_ip(2));
    let out = member(&c, &["add", "gw3", &gw3]);
    assert!(
        out.status.success(),
        "adding gw3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = c.configs[2].clone();
    // The log file is appended to: look only at what this start writes.
    let logged_before = c.topo.log(2).len();
    c.children[2] = Some(c.topo.start_egressd(2, &cfg));
    wait_for("gw3 a voter again", WAIT, || {
        voters(&c, 0) == ["gw1", "gw2", "gw3"] && c.topo.leader(2).is_some()
    });
    let this_start = c.topo.log(2)[logged_before..].to_string();
    assert!(
        !this_start.contains("initialized a new cluster")
            && this_start.contains("waiting to be added"),
        "{this_start}"
    );
    // One voter change at a time: gw4 is added but never started, so it never catches up and
    // the change stays unfinished; removing a voter meanwhile is refused, and removing gw4
    // (which never voted) cancels it.
    let gw4 = format!("{}:7480", node_mgmt_ip(3));
    let out = member(&c, &["add", "gw4", &gw4]);
    assert!(
        out.status.success(),
        "adding gw4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = member(&c, &["remove", "gw2"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "removing gw2 while gw4 is pending");
    assert!(
        err.contains("previous member change is not finished"),
        "{err}"
    );
    let out = member(&c, &["remove", "gw4"]);
    assert!(
        out.status.success(),
        "removing the pending gw4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(voters(&c, 0), ["gw1", "gw2", "gw3"]);

    // And the cluster, three voters again, survives the loss of gw1.
    c.signal("gw1", "KILL");
    c.wait_active_among(&[1, 2], "gw2");
    c.assert_traffic_via_vip();
}
