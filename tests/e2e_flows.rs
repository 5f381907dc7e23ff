//! A policy change reaches flows that are already running (issue 17). One gateway node, a
//! client sending UDP to the server on one socket every 5 ms, TCP connections, and entries of
//! other flows: a policy added makes the running flow leave with the VIP, deleting it or adding
//! an exclusion gives it back its own address, running TCP connections keep their translation
//! (default) or are ended with a reset (`tcp_on_policy_change = "reset"`), and no other flow's
//! conntrack entry is deleted. Root only: skips loudly otherwise, fails instead when
//! EGRESSD_E2E=1.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddrV4;
use std::time::Duration;

use common::flows::{self, *};
use common::netns::require_root;
use common::topo::*;

fn deleted(node: &common::heal::Node, protocol: &str) -> f64 {
    node.metric(&format!(
        "egressd_conntrack_deleted_total{{reason=\"policy_change\",protocol=\"{protocol}\"}}"
    ))
}

/// The ids of the entries of flows no change here reclassifies: the other client's, toward the
/// server (translated to the VIP by policy `other` throughout) and toward another address of
/// the server's network (never translated).
fn others(node: &common::heal::Node) -> BTreeSet<u32> {
    let other = std::net::IpAddr::V4(ip(CLIENT_OTHER_IP));
    flows::entries(node)
        .iter()
        .filter(|f| f.orig.src == other)
        .map(|f| f.id)
        .collect()
}

#[test]
fn running_flows_follow_policy_changes_and_other_flows_are_untouched() {
    if !require_root("running_flows_follow_policy_changes_and_other_flows_are_untouched") {
        return;
    }
    let node = flows::start("flows", "");
    let log = || node.topo.log(0);
    let (client, server) = (node.topo.client.clone(), node.topo.server.clone());
    start_tcp_echo(&server, SocketAddrV4::new(ip(SERVER_IP), TCP_PORT));
    let tcp = TcpClient::connect(
        &client,
        ip(CLIENT_IP),
        SocketAddrV4::new(ip(SERVER_IP), TCP_PORT),
    );
    assert_eq!(tcp.ask().expect("tcp answer"), CLIENT_IP, "{}", log());
    for dst in [SERVER_IP, SERVER_OTHER_IP] {
        spray(
            &client,
            ip(CLIENT_OTHER_IP),
            SocketAddrV4::new(ip(dst), 9000),
            100,
        );
    }
    let before = others(&node);
    // A few of the first datagrams may wait for a neighbour and be dropped.
    assert!(before.len() >= 150, "{} other entries", before.len());

    let flow = UdpFlow::start(
        &client,
        SocketAddrV4::new(ip(CLIENT_IP), FLOW_SPORT),
        &server,
        SocketAddrV4::new(ip(SERVER_IP), FLOW_DPORT),
        Duration::from_millis(5),
    );
    flow.wait_source(CLIENT_IP, "no policy selects the flow", log);

    apply(&node, &policy(&[]));
    flow.wait_source(VIP, "policy added", log);
    // An established TCP connection keeps its translation (none) by default, and works.
    assert_eq!(tcp.ask().expect("tcp answer"), CLIENT_IP, "{}", log());

    delete_policy(&node, "p");
    flow.wait_source(CLIENT_IP, "policy deleted", log);

    apply(&node, &policy(&[]));
    flow.wait_source(VIP, "policy added again", log);
    apply(&node, &policy(&[&format!("{SERVER_IP}/32")]));
    flow.wait_source(CLIENT_IP, "exclusion added", log);
    assert_eq!(tcp.ask().expect("tcp answer"), CLIENT_IP, "{}", log());

    // Every other flow's entry is the one it had: none was deleted (or recreated).
    let after = others(&node);
    let gone: Vec<&u32> = before.difference(&after).collect();
    assert!(
        gone.is_empty(),
        "{} of {} other entries were deleted\n{}",
        gone.len(),
        before.len(),
        log()
    );
    // Four changes, each deleting the running flow's entry; the TCP connection was left alone.
    common::topo::wait_for("the sweeps counted", WAIT, || {
        deleted(&node, "udp") >= 4.0
            && node.metric("egressd_conntrack_tcp_kept_total") >= 2.0
            && node
                .events()
                .iter()
                .filter(|e| e["kind"] == "flows")
                .count()
                >= 4
    });
    assert_eq!(deleted(&node, "tcp"), 0.0, "{}", log());
}

#[test]
fn with_reset_a_running_tcp_connection_is_ended() {
    if !require_root("with_reset_a_running_tcp_connection_is_ended") {
        return;
    }
    let node = flows::start("flowsrst", "tcp_on_policy_change = \"reset\"");
    let log = || node.topo.log(0);
    let (client, server) = (node.topo.client.clone(), node.topo.server.clone());
    let dst = SocketAddrV4::new(ip(SERVER_IP), TCP_PORT);
    start_tcp_echo(&server, dst);
    let tcp = TcpClient::connect(&client, ip(CLIENT_IP), dst);
    assert_eq!(tcp.ask().expect("tcp answer"), CLIENT_IP, "{}", log());

    apply(&node, &policy(&[]));
    let mut answer = Ok(String::new());
    common::topo::wait_for("the connection ended", WAIT, || {
        answer = tcp.ask();
        answer.is_err()
    });
    let err = answer.expect_err("ended");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "the client must see a reset, not {err}\n{}",
        log()
    );
    // A new connection leaves with the VIP.
    let fresh = TcpClient::connect(&client, ip(CLIENT_IP), dst);
    assert_eq!(fresh.ask().expect("tcp answer"), VIP, "{}", log());
    common::topo::wait_for("the reset counted", WAIT, || deleted(&node, "tcp") >= 1.0);
    // The sets and the chain of ended connections are egressd's own: the watcher's backstop
    // check (every 5 s) finds the table as installed and repairs nothing.
    std::thread::sleep(egressd::dataplane::watch::BACKSTOP + Duration::from_secs(1));
    assert!(node.repairs().is_empty(), "{:?}\n{}", node.repairs(), log());
}
