//! One egressd node in network namespaces, with real packets: client — LAN — gateway — WAN —
//! server. Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.

mod common;

use std::time::Duration;

use common::netns::require_root;
use common::topo::*;

const WAIT: Duration = Duration::from_secs(10);

fn config(topo: &Topo) -> String {
    format!(
        r#"
[node]
name = "gw1"
labels = {{ "node-role.deckhouse.io/egress" = "" }}

[cluster]
listen = "127.0.0.1:7480"
peers = [{{ name = "gw1", address = "127.0.0.1:7480" }}]
data_dir = "{dir}/gw1"

[dataplane]
garp_count = 3

[[gateway]]
name = "vip"
node_selector = {{ "node-role.deckhouse.io/egress" = "" }}
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = {{ ip = "{VIP}", interfaces = ["eth1"] }}
[gateway.next_hop]
ip = "{NEXT_HOP}"
interface = "eth0"

[[gateway]]
name = "basic"
node_selector = {{ "node-role.deckhouse.io/egress" = "" }}
[gateway.source_ip]
mode = "PrimaryIPFromEgressGatewayNodeInterface"
primary_ip_from_egress_gateway_node_interface = {{ interface_name = "eth1" }}

# Everything to the server network leaves with the VIP, except 203.0.113.16/28 ...
[[policy]]
name = "to-wan"
egress_gateway_name = "vip"
source_cidrs = ["{CLIENT_IP}/32"]
destination_cidrs = ["203.0.113.0/24"]
excluded_cidrs = ["203.0.113.16/28"]

# ... but this more specific destination, inside that exclusion, leaves with the primary IP:
# one policy's exclusion never removes another policy's destination.
[[policy]]
name = "special"
egress_gateway_name = "basic"
source_cidrs = ["{CLIENT_IP}/32"]
destination_cidrs = ["{SERVER_OTHER_IP}/32"]
"#,
        dir = topo.dir.path().display()
    )
}

/// Starts the lab, the echo server and egressd, and waits until the VIP is held and both
/// gateways' SNAT elements are installed.
fn start(tag: &str) -> (Topo, usize) {
    let mut topo = Topo::new(tag, 1);
    topo.start_echo_server();
    let cfg = topo.write_config(0, &config(&topo));
    let child = topo.start_egressd(0, &cfg);
    let gw = topo.nodes[0].clone();
    wait_for("VIP and next hop held", WAIT, || {
        topo.holds(&gw, "eth1", VIP) && topo.holds(&gw, "eth0", NEXT_HOP)
    });
    wait_for("both gateways held", WAIT, || {
        topo.node_holds(0, "vip") && topo.node_holds(0, "basic")
    });
    wait_for("SNAT elements installed", WAIT, || {
        topo.snat4_elements(&gw).is_some_and(|n| n >= 2)
    });
    (topo, child)
}

fn assert_policies_apply(topo: &Topo) {
    let log = || topo.log(0);
    assert_eq!(
        topo.seen_source(CLIENT_IP, SERVER_IP).as_deref(),
        Some(VIP),
        "VirtualIPAddress mode: the server must see the VIP\n{}",
        log()
    );
    assert_eq!(
        topo.seen_source(CLIENT_IP, SERVER_OTHER_IP).as_deref(),
        Some(node_wan_ip(0).as_str()),
        "the more specific policy wins and PrimaryIP mode SNATs to eth1's primary address\n{}",
        log()
    );
    assert_eq!(
        topo.seen_source(CLIENT_IP, SERVER_EXCLUDED_IP).as_deref(),
        Some(CLIENT_IP),
        "an excluded destination is not SNATed\n{}",
        log()
    );
    assert_eq!(
        topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref(),
        Some(CLIENT_OTHER_IP),
        "a source outside every policy is not SNATed\n{}",
        log()
    );
}

#[test]
fn snat_follows_the_policies_and_the_vip_is_announced() {
    if !require_root("snat_follows_the_policies_and_the_vip_is_announced") {
        return;
    }
    let mut topo = Topo::new("snat", 1);
    topo.start_echo_server();
    let capture = topo.start_arp_capture("garp");
    let cfg = topo.write_config(0, &config(&topo));
    topo.start_egressd(0, &cfg);
    let gw = topo.nodes[0].clone();
    wait_for("VIP held", WAIT, || topo.holds(&gw, "eth1", VIP));
    wait_for("SNAT elements installed", WAIT, || {
        topo.snat4_elements(&gw).is_some_and(|n| n >= 2)
    });
    assert_policies_apply(&topo);

    // garp_count = 3: the whole burst reaches the LAN.
    let garp = format!("Request who-has {VIP} tell {VIP}");
    wait_for("three gratuitous ARPs for the VIP on the WAN", WAIT, || {
        std::fs::read_to_string(&capture).is_ok_and(|c| c.matches(&garp).count() >= 3)
    });
}

#[test]
fn sigterm_leaves_nothing_and_foreign_tables_are_untouched() {
    if !require_root("sigterm_leaves_nothing_and_foreign_tables_are_untouched") {
        return;
    }
    let mut topo = Topo::new("term", 1);
    let gw = topo.nodes[0].clone();
    topo.lab.exec(
        &gw,
        [
            "nft",
            "add table ip foreign; add chain ip foreign c_forward { type filter hook forward priority 0; policy accept; }; add rule ip foreign c_forward ip saddr 10.99.0.0/16 accept",
        ],
    );
    // Addresses that are not egressd's on the interfaces it manages: one in the VIP's subnet
    // (another service's VIP) and one of another subnet, as secondaries.
    const FOREIGN_VIP: &str = "203.0.113.51";
    const FOREIGN_OTHER: &str = "198.51.100.7";
    for (ip, dev) in [
        (FOREIGN_VIP, "eth1"),
        (FOREIGN_OTHER, "eth1"),
        (FOREIGN_OTHER, "eth0"),
    ] {
        topo.lab
            .exec(&gw, ["ip", "addr", "add", &format!("{ip}/32"), "dev", dev]);
    }
    let foreign_before = topo.ruleset(&gw);
    topo.start_echo_server();
    let cfg = topo.write_config(0, &config(&topo));
    let child = topo.start_egressd(0, &cfg);
    wait_for("VIP held", WAIT, || topo.holds(&gw, "eth1", VIP));
    assert!(topo.ruleset(&gw).contains("table ip foreign"));
    // A few rounds of the agent loop with the foreign addresses in place.
    std::thread::sleep(Duration::from_millis(1000));
    for (ip, dev) in [
        (FOREIGN_VIP, "eth1"),
        (FOREIGN_OTHER, "eth1"),
        (FOREIGN_OTHER, "eth0"),
    ] {
        assert!(
            topo.holds(&gw, dev, ip),
            "{ip} on {dev} removed while running"
        );
    }

    // One member, no peer: the overlay device and the two catch-all rules (IPv4, IPv6).
    assert_eq!(topo.overlay_objects(&gw), (true, 2));
    signal(topo.lab.child(child), "TERM");
    let status = topo.lab.child(child).wait().expect("wait for egressd");
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}\n{}",
        topo.log(0)
    );
    assert!(!topo.holds(&gw, "eth1", VIP), "VIP left behind");
    assert!(!topo.holds(&gw, "eth0", NEXT_HOP), "next hop left behind");
    assert_eq!(topo.snat4_elements(&gw), None, "egressd table left behind");
    assert_eq!(
        topo.overlay_objects(&gw),
        (false, 0),
        "overlay device or rules left behind"
    );
    assert_eq!(
        topo.ruleset(&gw),
        foreign_before,
        "the foreign table must be exactly as it was"
    );
    // The primary addresses are the host's, never egressd's; nor are the foreign ones.
    assert!(topo.holds(&gw, "eth1", &node_wan_ip(0)));
    for (ip, dev) in [
        (FOREIGN_VIP, "eth1"),
        (FOREIGN_OTHER, "eth1"),
        (FOREIGN_OTHER, "eth0"),
    ] {
        assert!(topo.holds(&gw, dev, ip), "{ip} on {dev} removed on stop");
    }
}

#[test]
fn restart_after_kill_replaces_instead_of_duplicating() {
    if !require_root("restart_after_kill_replaces_instead_of_duplicating") {
        return;
    }
    let (mut topo, child) = start("restart");
    let gw = topo.nodes[0].clone();
    let elements = topo.snat4_elements(&gw);
    signal(topo.lab.child(child), "KILL");
    let _ = topo.lab.child(child).wait();
    // A killed daemon leaves its state behind; the next start must adopt it, not add to it.
    assert!(topo.holds(&gw, "eth1", VIP));

    let cfg = topo.dir.path().join("gw1.toml");
    let child = topo.start_egressd(0, &cfg);
    wait_for("restarted daemon converged", WAIT, || {
        topo.log(0).matches("starting").count() >= 2 && topo.snat4_elements(&gw) == elements
    });
    // Give the restarted daemon many rounds to do anything it would wrongly do twice.
    std::thread::sleep(Duration::from_millis(2500));
    let ruleset = topo.ruleset(&gw);
    assert_eq!(
        ruleset.matches("table inet egressd").count(),
        1,
        "{ruleset}"
    );
    assert_eq!(ruleset.matches("chain postrouting").count(), 1, "{ruleset}");
    assert_eq!(ruleset.matches("chain prerouting").count(), 1, "{ruleset}");
    assert_eq!(
        topo.overlay_objects(&gw),
        (true, 2),
        "overlay rules duplicated"
    );
    assert_eq!(topo.snat4_elements(&gw), elements);
    let vips = topo
        .addresses(&gw, "eth1")
        .into_iter()
        .filter(|a| a == VIP)
        .count();
    assert_eq!(vips, 1, "VIP held exactly once");
    assert_policies_apply(&topo);

    signal(topo.lab.child(child), "TERM");
    let _ = topo.lab.child(child).wait();
    assert!(!topo.holds(&gw, "eth1", VIP));
    assert_eq!(topo.snat4_elements(&gw), None);
}

#[test]
fn interface_down_withdraws_and_up_restores() {
    if !require_root("interface_down_withdraws_and_up_restores") {
        return;
    }
    let (mut topo, _child) = start("ifdown");
    let gw = topo.nodes[0].clone();
    assert_policies_apply(&topo);

    topo.lab.exec(&gw, ["ip", "link", "set", "eth1", "down"]);
    wait_for("VIP and next hop withdrawn", WAIT, || {
        !topo.holds(&gw, "eth1", VIP) && !topo.holds(&gw, "eth0", NEXT_HOP)
    });
    // The classification stays (every node holds it); the gateways' chains stop SNATing.
    wait_for("SNAT withdrawn", WAIT, || {
        topo.gateway_snat(&gw, "vip").is_none() && topo.gateway_snat(&gw, "basic").is_none()
    });

    let capture = topo.start_arp_capture("garp-up");
    topo.lab.exec(&gw, ["ip", "link", "set", "eth1", "up"]);
    wait_for("VIP and next hop restored", WAIT, || {
        topo.holds(&gw, "eth1", VIP) && topo.holds(&gw, "eth0", NEXT_HOP)
    });
    wait_for("SNAT restored", WAIT, || {
        topo.gateway_snat(&gw, "vip").as_deref() == Some(VIP)
    });
    let garp = format!("Request who-has {VIP} tell {VIP}");
    wait_for("gratuitous ARP after the link came back", WAIT, || {
        std::fs::read_to_string(&capture).is_ok_and(|c| c.contains(&garp))
    });
    assert_policies_apply(&topo);
}

/// An IPv6 virtual IP end to end: the server sees the VIP, it finds the VIP's MAC by neighbour
/// solicitation (answered through egressd's NDP fence while the node holds the lease), and the
/// takeover sends unsolicited neighbour advertisements.
#[test]
fn ipv6_virtual_ip_end_to_end() {
    if !require_root("ipv6_virtual_ip_end_to_end") {
        return;
    }
    let mut topo = Topo::new("v6", 1);
    let gw = topo.nodes[0].clone();
    let server = topo.server.clone();
    topo.add_ipv6(&node_lan6(0));
    // Unsolicited neighbour advertisements (ICMPv6 type 136) on the WAN.
    let na = topo.start_na_capture("na");

    let cfg = format!(
        r#"
[node]
name = "gw1"
labels = {{ egress = "" }}
[cluster]
listen = "127.0.0.1:7480"
data_dir = "{dir}/gw1"
[dataplane]
garp_count = 3
[[gateway]]
name = "vip6"
node_selector = {{ egress = "" }}
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = {{ ip = "{VIP6}", interfaces = ["eth1"] }}
[[policy]]
name = "to-wan6"
egress_gateway_name = "vip6"
source_cidrs = ["{CLIENT6}/128"]
destination_cidrs = ["fd00:203::/64"]
"#,
        dir = topo.dir.path().display()
    );
    let path = topo.write_config(0, &cfg);
    topo.start_egressd(0, &path);
    wait_for("IPv6 VIP held", WAIT, || topo.holds(&gw, "eth1", VIP6));
    let vip6: std::net::Ipv6Addr = VIP6.parse().expect("VIP6");
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = topo.seen_source6();
    while last != Some(vip6) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        last = topo.seen_source6();
    }
    assert!(
        last == Some(vip6),
        "the server must see the IPv6 VIP, saw {last:?}\nruleset:\n{}\nserver neighbours: {}\nlog:\n{}",
        topo.ruleset(&gw),
        String::from_utf8_lossy(&topo.lab.try_exec(&server, ["ip", "-6", "neigh"]).stdout),
        topo.log(0)
    );
    wait_for(
        "unsolicited neighbour advertisements for the VIP",
        WAIT,
        || {
            std::fs::read_to_string(&na).is_ok_and(|t| {
                t.lines()
                    .filter(|l| l.contains(&format!("tgt is {VIP6}")))
                    .count()
                    >= 3
            })
        },
    );
    // The server learned the VIP's address from the node's answer to its solicitation.
    let out = topo.lab.exec(&server, ["ip", "-6", "neigh", "show", VIP6]);
    let neigh = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(neigh.contains("lladdr"), "{neigh}");
}

/// ARP probes from the server for `ip` over `d`: how many were answered.
fn arp_answers(topo: &Topo, ip: &str, d: Duration) -> usize {
    let prober = common::arp::ArpProber::start(
        &topo.server,
        "eth0",
        SERVER_IP.parse().expect("ip"),
        ip.parse().expect("ip"),
        Duration::from_millis(10),
    );
    std::thread::sleep(d);
    prober
        .stop()
        .iter()
        .filter(|p| !p.answered_by.is_empty())
        .count()
}

/// Hole 4 of issue 10: a node killed while holding a gateway created through the API (not in its
/// file) keeps the VIP as an address; a restart that then fails (here: the admin address cannot
/// be bound) must leave that VIP fenced — the start-up fence covers the store's committed
/// gateways and every address tagged as egressd's, not only the file's gateways.
#[test]
fn a_failed_start_leaves_every_held_address_fenced() {
    if !require_root("a_failed_start_leaves_every_held_address_fenced") {
        return;
    }
    const API_VIP: &str = "203.0.113.60";
    let mut topo = Topo::new("fencestart", 1);
    topo.start_echo_server();
    let token = topo.dir.path().join("token");
    std::fs::write(&token, "e2e-admin-token-0123456789\n").expect("token");
    // Private, or egressd refuses the token file (others could read it).
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod token");
    let admin = format!("\n[admin]\ntoken_file = \"{}\"\n", token.display());
    let cfg = topo.write_config(0, &(config(&topo) + &admin));
    let child = topo.start_egressd(0, &cfg);
    let gw = topo.nodes[0].clone();
    wait_for("VIP held", WAIT, || topo.node_holds(0, "vip"));
    let file = topo.dir.path().join("api.toml");
    std::fs::write(
        &file,
        format!(
            "[[gateway]]\nname = \"api\"\nnode_selector = {{ \"node-role.deckhouse.io/egress\" = \"\" }}\n\
             [gateway.source_ip]\nmode = \"VirtualIPAddress\"\n\
             virtual_ip_address = {{ ip = \"{API_VIP}\", interfaces = [\"eth1\"] }}\n"
        ),
    )
    .expect("apply file");
    let out = topo.cli(
        0,
        &[
            "apply",
            "-f",
            &file.display().to_string(),
            "--token-file",
            &token.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the API gateway held", WAIT, || {
        topo.node_holds(0, "api") && topo.holds(&gw, "eth1", API_VIP)
    });
    assert!(
        arp_answers(&topo, API_VIP, Duration::from_millis(300)) > 0,
        "the held API VIP is answered"
    );

    signal(topo.lab.child(child), "KILL");
    let _ = topo.lab.child(child).wait();
    assert!(
        topo.holds(&gw, "eth1", API_VIP),
        "kill -9 leaves the address"
    );

    // The same node, restarted with an admin address it cannot bind: it fails after the fence.
    let broken = config(&topo) + &admin + "listen = \"192.0.2.1:7481\"\n";
    let cfg = topo.write_config(0, &broken);
    let child = topo.start_egressd(0, &cfg);
    let status = topo.lab.child(child).wait().expect("wait");
    assert!(!status.success(), "the start must fail\n{}", topo.log(0));
    assert!(
        topo.log(0).contains("binding the admin endpoint"),
        "{}",
        topo.log(0)
    );
    assert!(
        topo.holds(&gw, "eth1", API_VIP),
        "the address is still on eth1"
    );
    for ip in [API_VIP, VIP] {
        assert_eq!(
            arp_answers(&topo, ip, Duration::from_millis(500)),
            0,
            "{ip} answered after a failed start\n{}",
            topo.ruleset(&gw)
        );
    }
    // Control: without the fence the kernel would answer for the address left on eth1 (its
    // replies leave through the netdev table's egress hook too).
    topo.lab
        .exec(&gw, ["nft", "delete", "table", "arp", "egressd"]);
    topo.lab
        .exec(&gw, ["nft", "delete", "table", "netdev", "egressd"]);
    assert!(
        arp_answers(&topo, API_VIP, Duration::from_millis(300)) > 0,
        "without the fence tables the kernel answers (the probe works)"
    );
}

/// A file whose objects the cluster refuses at the seed (here a gateway larger than one Raft
/// entry may be: an object that cannot be cut) is reported as refused, in the log and the
/// status; before, the node said the cluster "was seeded already" and ran with nothing.
#[test]
fn a_refused_seed_is_reported_not_taken_for_an_earlier_one() {
    if !require_root("a_refused_seed_is_reported_not_taken_for_an_earlier_one") {
        return;
    }
    let mut topo = Topo::new("seedref", 1);
    let selector: Vec<String> = (0..60_000u32)
        .map(|i| format!("\"node.example.org/k{i}\" = \"\""))
        .collect();
    let huge = format!(
        "\n[[gateway]]\nname = \"huge\"\nnode_selector = {{ {} }}\n[gateway.source_ip]\n\
         mode = \"PrimaryIPFromEgressGatewayNodeInterface\"\n\
         primary_ip_from_egress_gateway_node_interface = {{ interface_name = \"eth1\" }}\n",
        selector.join(", ")
    );
    let cfg = topo.write_config(0, &(config(&topo) + &huge));
    topo.start_egressd(0, &cfg);
    wait_for("the seed refused", WAIT, || {
        topo.status(0).is_some_and(|s| {
            s["config"]["last_reload_errors"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        })
    });
    let status = topo.status(0).unwrap_or_default();
    let errors = status["config"]["last_reload_errors"].to_string();
    assert!(
        errors.contains("refused by the cluster") && errors.contains("bytes encoded"),
        "{errors}"
    );
    let log = topo.log(0);
    assert!(!log.contains("seeded already"), "{log}");
    assert_eq!(status["cluster"]["policies"].as_u64(), Some(0), "{status}");
}

/// A start with 100 000 CIDRs (a debug build, a loaded CI machine) is slower than the others.
const BIG_WAIT: Duration = Duration::from_secs(60);

/// One policy with 100 000 destinations (over a megabyte encoded, more than one Raft entry
/// carries) is committed in fragments and reaches the kernel whole: its last destination, the
/// server, is in the last fragment, and the server sees the VIP.
#[test]
fn a_policy_with_100_000_destinations_is_committed_and_installed() {
    if !require_root("a_policy_with_100_000_destinations_is_committed_and_installed") {
        return;
    }
    let mut topo = Topo::new("bigpol", 1);
    topo.start_echo_server();
    // Every other /24, so that no two merge into one interval; the server last.
    let mut destinations: Vec<String> = (0..99_999u32)
        .map(|i| {
            let n = 2 * i;
            format!(
                "\"{}.{}.{}.0/24\"",
                11 + n / 65_536,
                (n / 256) % 256,
                n % 256
            )
        })
        .collect();
    destinations.push(format!("\"{SERVER_IP}/32\""));
    let big = format!(
        "\n[[policy]]\nname = \"big\"\negress_gateway_name = \"vip\"\nsource_cidrs = \
         [\"{CLIENT_OTHER_IP}/32\"]\ndestination_cidrs = [{}]\n",
        destinations.join(", ")
    );
    let cfg = topo.write_config(0, &(config(&topo) + &big));
    topo.start_egressd(0, &cfg);
    // `nft -j list` never finishes on a table this size while leases renew (each renewal
    // restarts its read): the daemon's own count, and traffic.
    wait_for("the big policy in the kernel", BIG_WAIT, || {
        topo.status(0).is_some_and(|s| {
            s["dataplane"]["snat_elements"]
                .as_u64()
                .is_some_and(|n| n >= 100_000)
        })
    });
    let status = topo.status(0).unwrap_or_default();
    assert_eq!(status["cluster"]["policies"].as_u64(), Some(3), "{status}");
    assert!(
        topo.log(0).contains("seeded the cluster"),
        "{}",
        topo.log(0)
    );
    wait_for("the VIP held", BIG_WAIT, || topo.node_holds(0, "vip"));
    assert_eq!(
        topo.seen_source(CLIENT_OTHER_IP, SERVER_IP).as_deref(),
        Some(VIP),
        "the policy's last destination, committed in its last fragment, is SNATed\n{}",
        topo.log(0)
    );
}
