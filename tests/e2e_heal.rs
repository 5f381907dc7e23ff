//! Outside changes of egressd's nftables tables are repaired at once, loudly (issue 16).
//!
//! One node holding a `VirtualIPAddress` gateway, a client sending UDP to the server through it
//! (a new flow every millisecond, and one long flow), and something outside changing the node's
//! ruleset: `nft flush ruleset`, `nft delete table inet egressd`, a chain or a map deleted, the
//! ARP fence table deleted, a `systemctl restart nftables`-style reload of a file that begins
//! with `flush ruleset`. For each: the server sees the VIP again, the repair event and counter
//! appear, the packets that reached the server with the client's own address in the window are
//! counted (none after the repair), a foreign table is untouched, and the fence holds only the
//! leases the node holds. Root only: skips loudly otherwise, fails instead when EGRESSD_E2E=1.

mod common;

use std::time::{Duration, Instant};

use common::heal::{self, *};
use common::netns::require_root;
use common::topo::*;

/// Makes one outside change while the probe runs (see `common::heal::outside_change`) and
/// checks what the server saw.
fn outside_change(node: &Node, what: &str, part: Part, act: impl FnOnce(&Node)) -> Outcome {
    let o = heal::outside_change(node, what, part, act);
    eprintln!("{what}: {o:?}");
    if o.leaks.after > 0 {
        eprintln!("--- egressd's log\n{}", node.topo.log(0));
    }
    // The probe ran throughout, and what was sent after the repair reached the server
    // translated: the server sees the VIP again, and nothing leaves with the client's address.
    assert!(
        o.leaks.received > 100,
        "{what}: the probe did not run: {o:?}"
    );
    assert!(
        o.leaks.translated_after > 10,
        "{what}: nothing translated after the repair: {o:?}"
    );
    assert_eq!(
        o.leaks.after, 0,
        "{what}: packets left un-NATed after the repair: {o:?}"
    );
    assert!(
        o.repaired_after < BOUND,
        "{what}: repaired after {:?}",
        o.repaired_after
    );
    o
}

/// The fence answers for the node's VIP and next hop, and for nothing else. (A lease element
/// that expired before its renewal is the fence working, and a loaded machine may show it
/// briefly: the set is read until it is whole.)
fn fence_holds_the_leases(node: &Node, what: &str) {
    let mut last = Vec::new();
    wait_for(&format!("the fence's leases after {what}"), WAIT, || {
        last = node.arp_leases();
        assert!(
            last.iter().all(|l| leases().contains(l)),
            "{what}: the fence answers for {last:?}"
        );
        last == leases()
    });
}

/// The repair counter of one of egressd's tables.
fn repairs_of(node: &Node, object: &str) -> f64 {
    node.metric(&format!(
        "egressd_dataplane_repairs_total{{object=\"{object}\"}}"
    ))
}

/// Checks that the SNAT table was repaired after `what`: the event names it, the counter
/// counts it, and the fence still answers only for the VIP the node holds.
fn assert_snat_repaired(node: &Node, what: &str, o: &Outcome, expect: &str) {
    assert!(
        o.message.starts_with("data plane repaired: ") && o.message.contains(expect),
        "{what}: unexpected repair event: {}",
        o.message
    );
    assert!(
        repairs_of(node, "inet egressd") >= 1.0,
        "{what}: the counter did not move"
    );
    fence_holds_the_leases(node, what);
    assert!(node.topo.log(0).contains("repairing"), "{what}: no warning");
}

#[test]
fn nft_flush_ruleset_is_repaired() {
    if !require_root("nft_flush_ruleset_is_repaired") {
        return;
    }
    let node = Node::start("hflush", 0);
    let o = outside_change(&node, "nft flush ruleset", Part::Snat, |n| {
        n.nft("flush ruleset")
    });
    assert_snat_repaired(
        &node,
        "flush",
        &o,
        "table inet egressd was removed from outside (by nft",
    );
    assert!(repairs_of(&node, "arp egressd") >= 1.0);
    // The flush removed the operator's table too: egressd does not bring back what is not its.
    assert!(
        !node.ruleset().contains("table ip foreign"),
        "{}",
        node.ruleset()
    );
    assert!(node.ruleset().contains("table arp egressd"));
}

#[test]
fn deleted_inet_table_is_repaired() {
    if !require_root("deleted_inet_table_is_repaired") {
        return;
    }
    let node = Node::start("hdeltab", 0);
    let foreign = node.foreign();
    let o = outside_change(&node, "nft delete table inet egressd", Part::Snat, |n| {
        n.nft_file("del", "delete table inet egressd\n")
    });
    assert_snat_repaired(&node, "delete table", &o, "table inet egressd was removed");
    assert_eq!(node.foreign(), foreign, "the foreign table was touched");
    // The fence was not touched: no repair of it.
    assert_eq!(repairs_of(&node, "arp egressd"), 0.0);
}

#[test]
fn deleted_base_chain_is_repaired() {
    if !require_root("deleted_base_chain_is_repaired") {
        return;
    }
    let node = Node::start("hdelch", 0);
    let foreign = node.foreign();
    let chain = object_named(&node.terse_ruleset(), "chain", "postrouting_");
    let o = outside_change(&node, "delete chain", Part::Snat, |n| {
        n.nft_file("del", &format!("delete chain inet egressd {chain}\n"))
    });
    assert_snat_repaired(
        &node,
        "delete chain",
        &o,
        &format!("chain inet egressd {chain}"),
    );
    assert_eq!(node.foreign(), foreign);
}

/// The chain that SNATs by mark holds no map elements and is not generational: emptying it
/// (every active gateway's traffic would leave untranslated) is seen and repaired.
#[test]
fn flushed_snat_by_mark_chain_is_repaired() {
    if !require_root("flushed_snat_by_mark_chain_is_repaired") {
        return;
    }
    let node = Node::start("hsnatm", 0);
    let foreign = node.foreign();
    let o = outside_change(&node, "flush chain", Part::Snat, |n| {
        n.nft("flush chain inet egressd snat_by_mark")
    });
    assert_snat_repaired(&node, "flush snat_by_mark", &o, "snat_by_mark");
    wait_for("SNAT by mark back", WAIT, || {
        node.gateway_snat().as_deref() == Some(VIP)
    });
    assert_eq!(node.foreign(), foreign);
}

#[test]
fn deleted_cell_set_is_repaired() {
    if !require_root("deleted_cell_set_is_repaired") {
        return;
    }
    let node = Node::start("hdelmap", 0);
    let foreign = node.foreign();
    let ruleset = node.terse_ruleset();
    // A set in use cannot be deleted: the rule that uses it goes in the same transaction.
    let set = object_named(&ruleset, "set", "m4_");
    let chain = cell_chain(&set);
    let o = outside_change(&node, "delete set", Part::Snat, |n| {
        n.nft_file(
            "del",
            &format!("flush chain inet egressd {chain}\ndelete set inet egressd {set}\n"),
        )
    });
    assert_snat_repaired(
        &node,
        "delete set",
        &o,
        &format!("set inet egressd {set} was deleted"),
    );
    assert_eq!(node.foreign(), foreign);
}

#[test]
fn deleted_arp_fence_table_is_repaired() {
    if !require_root("deleted_arp_fence_table_is_repaired") {
        return;
    }
    let node = Node::start("hdelarp", 0);
    let foreign = node.foreign();
    let o = outside_change(&node, "nft delete table arp egressd", Part::Fence, |n| {
        n.nft("delete table arp egressd")
    });
    assert!(
        o.message
            .contains("table arp egressd was removed from outside (by nft"),
        "{}",
        o.message
    );
    // SNAT was never missing.
    assert_eq!(o.leaks.first + o.leaks.second + o.leaks.long, 0, "{o:?}");
    assert!(repairs_of(&node, "arp egressd") >= 1.0);
    assert_eq!(repairs_of(&node, "inet egressd"), 0.0);
    // Back with the leases the node holds.
    fence_holds_the_leases(&node, "delete table arp");
    assert_eq!(node.foreign(), foreign);
}

/// What `systemctl restart nftables` does with Debian's packaging: `nft -f /etc/nftables.conf`,
/// a file that begins with `flush ruleset`.
#[test]
fn reload_of_a_flushing_ruleset_file_is_repaired() {
    if !require_root("reload_of_a_flushing_ruleset_file_is_repaired") {
        return;
    }
    let node = Node::start("hreload", 0);
    let foreign = node.foreign();
    let o = outside_change(&node, "nft -f nftables.conf", Part::Snat, |n| {
        n.nft_file(
            "nftables",
            &format!("#!/usr/sbin/nft -f\nflush ruleset\n{FOREIGN}"),
        )
    });
    assert_snat_repaired(
        &node,
        "reload",
        &o,
        "table inet egressd was removed from outside",
    );
    assert!(repairs_of(&node, "arp egressd") >= 1.0);
    // The file's table is there as the file has it, untouched by egressd.
    assert_eq!(node.foreign(), foreign);
}

/// egressd's own writes (lease renewals many times a second, the fence's elements) are not
/// outside changes.
#[test]
fn own_writes_are_not_repaired() {
    if !require_root("own_writes_are_not_repaired") {
        return;
    }
    let node = Node::start("hidle", 0);
    let renewals = |n: &Node| n.status()["lease"]["renewals"].as_u64().unwrap_or(0);
    let before = renewals(&node);
    std::thread::sleep(Duration::from_secs(6));
    let after = renewals(&node);
    assert!(
        after > before + 20,
        "too few renewals to tell: {before} -> {after}"
    );
    assert!(node.repairs().is_empty(), "{:?}", node.repairs());
    assert_eq!(repairs_of(&node, "inet egressd"), 0.0);
    assert_eq!(repairs_of(&node, "arp egressd"), 0.0);
    assert!(!node.topo.log(0).contains("from outside"));
    // The backstop check ran meanwhile (every 5 s) and found nothing either.
    assert!(node.status()["ready"].as_bool().unwrap_or(false));
}

/// A repair of the fence never puts back a lease the node does not hold.
#[test]
fn fence_repair_puts_back_no_lease_not_held() {
    if !require_root("fence_repair_puts_back_no_lease_not_held") {
        return;
    }
    let node = Node::start("hnolease", 0);
    let token = node.topo.dir.path().join("token").display().to_string();
    let out = node
        .topo
        .cli(0, &["node", "cordon", "gw1", "--token-file", &token]);
    assert!(out.status.success(), "{out:?}");
    wait_for("VIP released", WAIT, || {
        !node.topo.holds(&node.gw, "eth1", VIP) && node.arp_leases().is_empty()
    });
    let before = node.repairs().len();
    node.nft("delete table arp egressd");
    wait_for("the fence repair", WAIT, || node.repairs().len() > before);
    assert!(node.ruleset().contains("table arp egressd"));
    assert!(node.arp_leases().is_empty(), "{:?}", node.arp_leases());
    std::thread::sleep(Duration::from_millis(500));
    assert!(node.arp_leases().is_empty(), "{:?}", node.arp_leases());
    assert!(!node.topo.holds(&node.gw, "eth1", VIP));
}

/// Something that keeps deleting egressd's table is not fought in a loop: the repairs back off
/// (the log says so), and meanwhile /readyz and the status say not converged and claim no
/// gateway held.
#[test]
fn repeated_deletions_back_off_and_say_not_converged() {
    if !require_root("repeated_deletions_back_off_and_say_not_converged") {
        return;
    }
    let node = Node::start("hfight", 0);
    let curl = |path: &str| {
        let out = node.topo.lab.try_exec(
            &node.gw,
            [
                "curl",
                "-s",
                "--max-time",
                "2",
                &format!("http://127.0.0.1:7481{path}"),
            ],
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut seen_not_ready = None;
    let mut seen_held_during = false;
    for round in 0..3 {
        let before = node.repairs().len();
        let t0 = Instant::now();
        node.nft("delete table inet egressd");
        while node.repairs().len() == before {
            assert!(t0.elapsed() < WAIT, "round {round}: no repair");
            if round > 0 && seen_not_ready.is_none() {
                let r = curl("/readyz");
                if r.contains("not converged") {
                    seen_not_ready = Some(r);
                    let s: serde_json::Value =
                        serde_json::from_str(&curl("/v1/status")).unwrap_or_default();
                    seen_held_during = s["dataplane"]["held_gateways"]
                        .as_array()
                        .is_none_or(|a| !a.is_empty());
                }
            }
        }
        eprintln!("round {round}: repaired after {:?}", t0.elapsed());
    }
    // Repairs closer than 2 s to the previous one start 250 ms after its start, then 500 ms.
    // A repair started at its event's time less what it took (the event says).
    let started: Vec<f64> = node
        .repairs()
        .iter()
        .map(|(at, m)| {
            let took = m
                .split("the repair took ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|t| t.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no duration in {m}"));
            *at as f64 - took
        })
        .collect();
    assert_eq!(started.len(), 3, "{:?}", node.repairs());
    // Event times are whole milliseconds.
    assert!(
        started[1] - started[0] >= 249.0,
        "not backed off: {started:?}"
    );
    assert!(
        started[2] - started[1] >= 499.0,
        "the backoff did not grow: {started:?}"
    );
    let why = seen_not_ready.expect("/readyz never said not converged during a backoff");
    assert!(
        why.contains("table inet egressd was removed from outside"),
        "{why}"
    );
    assert!(
        !seen_held_during,
        "the status claimed the gateway held while SNAT was missing"
    );
    assert!(node.topo.log(0).contains("repairs back off"));
    node.wait_held();
    assert!(curl("/readyz").starts_with("ready"));
}

/// A table made dormant keeps its objects but hooks nothing: SNAT stops as if it were deleted.
#[test]
fn dormant_inet_table_is_repaired() {
    if !require_root("dormant_inet_table_is_repaired") {
        return;
    }
    let node = Node::start("hdorm", 0);
    let o = outside_change(&node, "table made dormant", Part::Snat, |n| {
        n.nft_file("dormant", "add table inet egressd { flags dormant; }\n")
    });
    assert_snat_repaired(
        &node,
        "dormant",
        &o,
        "table inet egressd was made dormant from outside",
    );
    assert!(!node.terse_ruleset().contains("dormant"));
}
