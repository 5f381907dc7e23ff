//! Established connections survive an unplanned failover (issue 13). Three real daemons with
//! real conntrackd (`conntrack_sync = true`), strict conntrack on every node
//! (`nf_conntrack_tcp_loose = 0`, invalid packets dropped): a TCP session and a UDP flow from
//! the client through the next hop and the VIP go on, with the VIP as their source, after
//! kill -9 of the active node's daemon and after the fail-back to it. The control: the same
//! without `conntrack_sync`, where the TCP session dies (so the first test fails if the
//! replication breaks). Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::flows::{
    FLOW_DPORT, FLOW_SPORT, TCP_PORT, TcpClient, UdpFlow, ip, start_tcp_echo, strict_conntrack,
};
use common::netns::require_root;
use common::topo::*;

/// The lab's cluster, strict, with the gateway's `conntrack_sync` as given.
fn start(tag: &str, sync: bool) -> Cluster {
    let c = Cluster::launch_edited(tag, 3, "", "", strict_conntrack, |_, body| {
        if !sync {
            return body;
        }
        let with = "node_selector = { egress = \"\" }\nconntrack_sync = true\n";
        let edited = body.replacen("node_selector = { egress = \"\" }\n", with, 1);
        assert_ne!(edited, body, "the gateway table was found");
        edited
    });
    c.wait_active("gw1");
    c
}

/// Whether the session still answers, with the VIP as its source at the server, within
/// `limit`: each ask waits 2 s for the answer (TCP retransmits meanwhile); a late answer to an
/// earlier ask counts too. An error other than a timeout (a reset) ends it at once.
fn answers(tcp: &TcpClient, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        match tcp.ask() {
            Ok(a) if a.contains(VIP) => return Ok(started.elapsed()),
            Ok(a) => return Err(format!("answered {a:?}: not from the VIP")),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if started.elapsed() > limit {
                    return Err(format!("no answer for {:?}", started.elapsed()));
                }
            }
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
}

/// The flows of one trial: a TCP session and a UDP flow (every 5 ms) from the client through
/// the gateway, both translated to the VIP.
fn flows(c: &Cluster) -> (TcpClient, UdpFlow) {
    let (client, server) = (c.topo.client.clone(), c.topo.server.clone());
    start_tcp_echo(&server, SocketAddrV4::new(ip(SERVER_IP), TCP_PORT));
    let tcp = TcpClient::connect(
        &client,
        ip(CLIENT_IP),
        SocketAddrV4::new(ip(SERVER_IP), TCP_PORT),
    );
    answers(&tcp, WAIT).unwrap_or_else(|e| panic!("before the failover: {e}\n{}", c.logs()));
    let udp = UdpFlow::start(
        &client,
        SocketAddrV4::new(ip(CLIENT_IP), FLOW_SPORT),
        &server,
        SocketAddrV4::new(ip(SERVER_IP), FLOW_DPORT),
        Duration::from_millis(5),
    );
    udp.wait_source(VIP, "before the failover", || c.logs());
    (tcp, udp)
}

/// The replicated entries node `i` received (its status), 0 when it says nothing.
fn external_entries(c: &Cluster, i: usize) -> u64 {
    c.topo.status(i).map_or(0, |s| {
        s["dataplane"]["conntrack_sync"]["external"]
            .as_u64()
            .unwrap_or(0)
    })
}

/// conntrackd's own logs (in each node's `data_dir`).
fn conntrackd_logs(c: &Cluster) -> String {
    (0..3)
        .map(|i| {
            let path = c
                .topo
                .dir
                .path()
                .join(format!("data-{}/conntrackd/conntrackd.log", name(i)));
            format!(
                "---- conntrackd of {} ----\n{}",
                name(i),
                std::fs::read_to_string(path).unwrap_or_default()
            )
        })
        .collect()
}

/// Kills the active node's daemon, waits for gw2 to hold the gateway, and returns when.
fn kill_gw1(c: &mut Cluster) -> Instant {
    let killed = Instant::now();
    c.signal("gw1", "KILL");
    c.wait_active_among(&[1, 2], "gw2");
    killed
}

#[test]
fn established_flows_survive_failover_and_failback_with_conntrack_sync() {
    if !require_root("established_flows_survive_failover_and_failback_with_conntrack_sync") {
        return;
    }
    let mut c = start("ctsync", true);
    let (tcp, udp) = flows(&c);
    // The standbys hold the active node's flows (the TCP session's and the UDP flow's entries).
    let end = Instant::now() + WAIT;
    while !(external_entries(&c, 1) >= 2 && external_entries(&c, 2) >= 2) {
        assert!(
            Instant::now() < end,
            "the standbys did not receive the flows: {:?}\n{}\n{}",
            (0..3)
                .map(|i| c
                    .topo
                    .status(i)
                    .map(|s| s["dataplane"]["conntrack_sync"].clone()))
                .collect::<Vec<_>>(),
            conntrackd_logs(&c),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let killed = kill_gw1(&mut c);
    let stall = answers(&tcp, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after kill -9 of gw1: {e}\n{}", c.logs()));
    eprintln!(
        "failover: gw2 active {:?} after kill -9; the TCP session answered {stall:?} later",
        killed.elapsed() - stall
    );
    wait_for("the UDP flow through gw2", WAIT, || {
        udp.first_from(ip(VIP), killed + Duration::from_millis(50))
            .is_some()
    });
    // gw2 committed the replicated entries before taking over, and says so.
    let s = c.topo.status(1).expect("gw2 status");
    let sync = &s["dataplane"]["conntrack_sync"];
    assert_eq!(sync["state"], "running", "{sync}");
    assert!(sync["commits"].as_u64() >= Some(1), "{sync}");
    assert!(sync["last_commit_entries"].as_u64() >= Some(2), "{sync}");
    // One link per peer, each running.
    let peers: Vec<&str> = sync["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter(|p| p["state"] == "running")
        .filter_map(|p| p["peer"].as_str())
        .collect();
    assert_eq!(peers, ["gw1", "gw3"], "{sync}");
    let metrics = c.topo.lab.try_exec(
        &c.topo.nodes[1],
        ["curl", "-s", "http://127.0.0.1:7481/metrics"],
    );
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("egressd_conntrack_sync_commit_seconds_count ") >= 1.0
            && value("egressd_conntrack_sync_committed_entries_total ") >= 2.0,
        "{metrics}"
    );
    // The takeover's conntrack sweep (issue 17) found the committed entries translated to the
    // VIP, as the table decides, and deleted none of them.
    for protocol in ["udp", "tcp"] {
        let series = format!(
            "egressd_conntrack_deleted_total{{reason=\"policy_change\",protocol=\"{protocol}\"}} "
        );
        assert_eq!(value(&series), 0.0, "{metrics}");
    }

    // Fail-back: gw1 comes back, takes the gateway again (preemption), and the flows go on.
    wait_for("gw2's replication sends the flows back", WAIT, || {
        external_entries(&c, 2) >= 2
    });
    let cfg = c.configs[0].clone();
    c.children[0] = Some(c.topo.start_egressd(0, &cfg));
    wait_for("gw1 received the flows", WAIT, || {
        external_entries(&c, 0) >= 2
    });
    let back = Instant::now();
    c.wait_active("gw1");
    answers(&tcp, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("after the fail-back to gw1: {e}\n{}", c.logs()));
    wait_for("the UDP flow through gw1 again", WAIT, || {
        udp.first_from(ip(VIP), back + Duration::from_millis(500))
            .is_some()
    });
    // Throughout, the server saw the flow from the VIP only.
    let sources: std::collections::BTreeSet<Ipv4Addr> =
        udp.got.lock().expect("lock").iter().map(|g| g.1).collect();
    assert_eq!(sources, [ip(VIP)].into(), "{}", c.logs());
}

#[test]
fn without_conntrack_sync_strict_conntrack_ends_the_session() {
    if !require_root("without_conntrack_sync_strict_conntrack_ends_the_session") {
        return;
    }
    let mut c = start("ctnosync", false);
    let (tcp, _udp) = flows(&c);
    let s = c.topo.status(1).expect("gw2 status");
    assert_eq!(s["dataplane"]["conntrack_sync"]["state"], "off", "{s}");
    kill_gw1(&mut c);
    let r = answers(&tcp, Duration::from_secs(6));
    assert!(
        r.is_err(),
        "the session survived without replication: the strict setup does not test what it \
         should\n{}",
        c.logs()
    );
}
