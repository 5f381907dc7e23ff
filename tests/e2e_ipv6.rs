//! An IPv6 virtual IP in a three-node cluster: kill -9 of the active node's daemon (its host's
//! kernel keeps the addresses), and the successor takes over the VIP and the next hop. Clients
//! follow the unsolicited neighbour advertisements, and afterwards only the successor answers
//! neighbour solicitations for the VIP: the dead daemon's NDP lease has run out. A client that
//! routes through a standby is redirected to the active node and leaves with the IPv6 VIP.
//! Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.

mod common;

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use common::arp;
use common::capture::{Capture, read_sources};
use common::cluster::*;
use common::netns::require_root;
use common::topo::*;

const NEXT_HOP6: &str = "fd00:77::1";
const GW6: &str = "vip6";

fn wait_active6(c: &Cluster, node: &str) {
    let i = c.index(node);
    let start = Instant::now();
    while !(c
        .live()
        .all(|j| c.topo.active(j, GW6).as_deref() == Some(node))
        && c.topo.node_holds(i, GW6))
    {
        assert!(
            start.elapsed() < WAIT,
            "timed out waiting for {node} to hold {GW6}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ipv6_vip_fails_over_and_only_the_successor_answers() {
    if !require_root("ipv6_vip_fails_over_and_only_the_successor_answers") {
        return;
    }
    // A second gateway, IPv6, with an IPv6 next hop for the clients' route.
    let extra = format!(
        r#"
[[gateway]]
name = "{GW6}"
node_selector = {{ egress = "" }}
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = {{ ip = "{VIP6}", interfaces = ["eth1"] }}
[gateway.next_hop]
ip = "{NEXT_HOP6}"
interface = "eth0"

[[policy]]
name = "to-wan6"
egress_gateway_name = "{GW6}"
source_cidrs = ["{CLIENT6}/128"]
destination_cidrs = ["fd00:203::/64"]
"#
    );
    let mut c = Cluster::start_with("v6fo", 3, &extra);
    let server = c.topo.server.clone();
    c.topo.add_ipv6(NEXT_HOP6);
    // Neighbour advertisements on the WAN, with the sender's MAC.
    let na = c.topo.start_na_capture("na");

    // First, as this may restart gw1 (it then takes the VIP back: preemption is on).
    c.ensure_leader_is_not("gw1");
    wait_active6(&c, "gw1");
    let vip6: Ipv6Addr = VIP6.parse().expect("VIP6");
    wait_for("the server sees the IPv6 VIP through gw1", WAIT, || {
        c.topo.seen_source6() == Some(vip6)
    });

    // gw1's daemon dies; its kernel keeps the VIP, the next hop and forwarding.
    c.signal("gw1", "KILL");
    wait_active6(&c, "gw2");
    wait_for("the server sees the IPv6 VIP through gw2", WAIT, || {
        c.topo.seen_source6() == Some(vip6)
    });

    // The server forgets the VIP's MAC and asks again: only gw2 may answer, although gw1's
    // kernel still has the address.
    assert!(
        c.topo.holds(&c.topo.nodes[0], "eth1", VIP6),
        "the test needs gw1's kernel to keep the VIP after kill -9\n{}",
        c.logs()
    );
    let gw1_mac = arp::mac_text(arp::mac(&c.topo.nodes[0], "eth1"));
    let gw2_mac = arp::mac_text(arp::mac(&c.topo.nodes[1], "eth1"));
    std::thread::sleep(Duration::from_millis(300));
    let asked = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    c.topo
        .lab
        .exec(&server, ["ip", "-6", "neigh", "flush", "dev", "eth0"]);
    wait_for(
        "the server sees the IPv6 VIP after re-resolving it",
        WAIT,
        || c.topo.seen_source6() == Some(vip6),
    );
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&na).unwrap_or_default();
    let answers: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&format!("tgt is {VIP6}")))
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|t| t.parse::<f64>().ok())
                .is_some_and(|t| t >= asked)
        })
        .collect();
    assert!(
        answers.iter().any(|l| l.contains(&gw2_mac)),
        "gw2 must answer for the VIP\n{text}"
    );
    assert!(
        !answers.iter().any(|l| l.contains(&gw1_mac)),
        "gw1's daemon is dead: its kernel must no longer answer for the VIP\n{}",
        answers.join("\n")
    );
    let neigh = c
        .topo
        .lab
        .exec(&server, ["ip", "-6", "neigh", "show", VIP6]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(neigh.contains(&gw2_mac), "{neigh}");

    // The client routes through gw3, a standby that forwards IPv6: the policy's connection is
    // redirected to gw2 and leaves with the VIP, never with the client's address (the server's
    // route back goes through gw1's kernel, so a leaked connection would complete; a capture
    // on the server's link would show it).
    let forwarding = c.topo.lab.exec(
        &c.topo.nodes[2],
        ["sysctl", "-n", "net.ipv6.conf.all.forwarding"],
    );
    assert_eq!(
        String::from_utf8_lossy(&forwarding.stdout).trim(),
        "1",
        "the test needs gw3 to forward IPv6"
    );
    let (client, server) = (c.topo.client.clone(), c.topo.server.clone());
    let pcap = c.topo.dir.path().join("server6.pcap");
    let capture = Capture::start_filter(&mut c.topo.lab, &server, "eth0", &pcap, "ip6");
    let to_server = format!("{SERVER6}/128");
    let via = node_lan6(2);
    c.topo.lab.exec(
        &client,
        ["ip", "-6", "route", "replace", &to_server, "via", &via],
    );
    wait_for("gw3 redirects to gw2", WAIT, || {
        c.topo.gateway_redirect(&c.topo.nodes[2], GW) == Some(1)
    });
    let before = c.redirected(2);
    let seen = c.topo.seen_source6();
    assert_eq!(
        seen,
        Some(vip6),
        "through the standby gw3 the server saw {seen:?}"
    );
    assert!(c.redirected(2) > before, "gw3 did not count the redirect");
    let sources = read_sources(&capture.stop(&mut c.topo.lab));
    let client6: std::net::IpAddr = CLIENT6.parse().expect("ip");
    assert!(
        sources.contains(&vip6.into()),
        "the capture saw no packet from the VIP: {sources:?}"
    );
    assert_eq!(
        sources.iter().filter(|a| **a == client6).count(),
        0,
        "packets with the client's address reached the server's link"
    );
    c.topo
        .lab
        .exec(&client, ["ip", "-6", "route", "del", &to_server]);
    wait_for("the IPv6 VIP again through the next hop", WAIT, || {
        c.topo.seen_source6() == Some(vip6)
    });
}
