//! `NftFirewall` against a real kernel, each test in its own network namespace (root only).

// `Lab::spawn` takes `mut cmd` without needing it (tests/common is not this file's to fix).
#[allow(unused_mut)]
mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{Lab, require_root};
use egressd::dataplane::Firewall;
use egressd::dataplane::Roles;
use egressd::dataplane::nft::NftFirewall;
use egressd::policy::{GwId, SnatElement, SnatMap};

fn fw(ns: &str) -> NftFirewall {
    NftFirewall::in_netns("egressd", ns)
}

/// The addresses the tests' elements name as their target: each stands for a gateway active
/// here that SNATs to it (the gateway's id is derived from the address's text). All of them
/// exist in every test, as a cluster's gateways do, so that element changes never change the
/// set of gateway chains.
const TARGETS: &[&str] = &[
    "10.202.0.1",
    "192.0.2.1",
    "192.0.2.2",
    "192.0.2.3",
    "192.0.2.4",
    "192.0.2.5",
    "192.0.2.7",
    "192.0.2.9",
    "192.0.2.77",
    "2001:db8::1",
    "2001:db8::2",
    "2001:db8::3",
    "2001:db8::4",
    "2001:db8::7",
    "2001:db8::99",
];

fn roles() -> Roles {
    let mut roles = Roles::new();
    for a in TARGETS {
        let r = roles.entry(GwId::of(a)).or_default();
        match a.parse::<std::net::IpAddr>().unwrap() {
            std::net::IpAddr::V4(v4) => r.v4 = Some(v4),
            std::net::IpAddr::V6(v6) => r.v6 = Some(v6),
        }
    }
    roles
}

/// `Firewall::apply` with every test gateway active here, SNATing to its address.
async fn apply(fw: &mut NftFirewall, map: &SnatMap) -> egressd::dataplane::Result<()> {
    fw.apply(&std::sync::Arc::new(map.clone()), &roles()).await
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn e4(src: (&str, &str), dst: (&str, &str), to: &str) -> SnatElement<Ipv4Addr> {
    SnatElement {
        src: (ip4(src.0), ip4(src.1)),
        dst: (ip4(dst.0), ip4(dst.1)),
        to: GwId::of(to),
    }
}

fn e6(src: (&str, &str), dst: (&str, &str), to: &str) -> SnatElement<Ipv6Addr> {
    SnatElement {
        src: (ip6(src.0), ip6(src.1)),
        dst: (ip6(dst.0), ip6(dst.1)),
        to: GwId::of(to),
    }
}

const ANY4: (&str, &str) = ("0.0.0.0", "255.255.255.255");

/// `n` elements with consecutive single sources from `first`, each toward `dst`.
fn sources(n: u32, first: &str, dst: (&str, &str), to: &str) -> Vec<SnatElement<Ipv4Addr>> {
    let base = u32::from(ip4(first));
    (0..n)
        .map(|i| {
            let s = Ipv4Addr::from(base + i);
            SnatElement {
                src: (s, s),
                dst: (ip4(dst.0), ip4(dst.1)),
                to: GwId::of(to),
            }
        })
        .collect()
}

fn sorted(mut m: SnatMap) -> SnatMap {
    m.v4.sort();
    m.v6.sort();
    m
}

/// A map with a single address, a prefix-shaped range and an odd range on each side.
fn map_a() -> SnatMap {
    sorted(SnatMap {
        v4: vec![
            e4(("10.0.0.1", "10.0.0.1"), ANY4, "192.0.2.1"),
            e4(
                ("10.0.1.0", "10.0.1.255"),
                ("8.8.8.0", "8.8.8.255"),
                "192.0.2.2",
            ),
            e4(
                ("10.0.2.3", "10.0.2.9"),
                ("1.0.0.0", "1.0.0.5"),
                "192.0.2.3",
            ),
            e4(("10.0.3.1", "10.0.3.1"), ANY4, "192.0.2.1"),
        ],
        v6: vec![],
    })
}

/// `map_a` with one element removed, one added and one's target changed.
fn map_b() -> SnatMap {
    sorted(SnatMap {
        v4: vec![
            e4(("10.0.0.1", "10.0.0.1"), ANY4, "192.0.2.1"),
            e4(
                ("10.0.1.0", "10.0.1.255"),
                ("8.8.8.0", "8.8.8.255"),
                "192.0.2.9",
            ),
            e4(
                ("10.0.2.3", "10.0.2.9"),
                ("1.0.0.0", "1.0.0.5"),
                "192.0.2.3",
            ),
            e4(("10.0.4.0", "10.0.4.127"), ANY4, "192.0.2.4"),
        ],
        v6: vec![],
    })
}

fn text(lab: &Lab, ns: &str, args: &[&str]) -> String {
    let out = lab.exec(ns, std::iter::once("nft").chain(args.iter().copied()));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The table's handle: it changes when the table is replaced, not when elements change.
fn table_handle(lab: &Lab, ns: &str) -> u64 {
    let out = text(lab, ns, &["-j", "list", "table", "inet", "egressd"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|i| i.get("table")?.get("handle")?.as_u64())
        .unwrap()
}

fn egressd_tables(lab: &Lab, ns: &str) -> usize {
    text(lab, ns, &["list", "tables"])
        .lines()
        .filter(|l| l.trim() == "table inet egressd")
        .count()
}

#[tokio::test]
async fn apply_then_list_and_empty_diff() {
    if !require_root("apply_then_list_and_empty_diff") {
        return;
    }
    let mut lab = Lab::new("nftap");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    apply(&mut fw, &map_a()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_a());
    assert_eq!(fw.full_replaces(), 1);
    let after_first = fw.transactions();
    assert_eq!(
        after_first, 1,
        "a small map: the maps with the gateway chains and their roles, the elements and the \
         switch in one transaction"
    );
    apply(&mut fw, &map_a()).await.unwrap();
    assert_eq!(
        fw.transactions(),
        after_first,
        "an unchanged map must not touch the kernel"
    );
    // The same elements in another order are the same map.
    let mut shuffled = map_a();
    shuffled.v4.reverse();
    apply(&mut fw, &shuffled).await.unwrap();
    assert_eq!(fw.transactions(), after_first);
    let c = fw.counters().await.unwrap();
    assert_eq!(c.snated(), 0);
}

#[tokio::test]
async fn incremental_apply() {
    if !require_root("incremental_apply") {
        return;
    }
    let mut lab = Lab::new("nftinc");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    apply(&mut fw, &map_a()).await.unwrap();
    let handle = table_handle(&lab, &ns);
    let first = fw.transactions();
    apply(&mut fw, &map_b()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
    assert_eq!(
        fw.transactions(),
        first + 2,
        "a delta is one transaction, after one that adds the sets (and rules) of gateways new \
         to the cell"
    );
    assert_eq!(
        table_handle(&lab, &ns),
        handle,
        "an element change must not replace the table"
    );
    // And back, and to empty, and from empty.
    apply(&mut fw, &map_a()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_a());
    apply(&mut fw, &SnatMap::default()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), SnatMap::default());
    apply(&mut fw, &map_b()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
    // Emptied sets stay until the next full replace: each of these is one transaction.
    assert_eq!(fw.transactions(), first + 5);
    assert_eq!(fw.full_replaces(), 1);
    assert_eq!(table_handle(&lab, &ns), handle);
}

#[tokio::test]
async fn foreign_tables_untouched() {
    if !require_root("foreign_tables_untouched") {
        return;
    }
    // egressd owns `inet`, `arp` and `ip6` tables of its name; an `ip` one is somebody else's.
    let mut lab = Lab::new("nftfor");
    let ns = lab.ns("a");
    let foreign = "table inet foreign {\n\
                   \tset s { type ipv4_addr; elements = { 10.0.0.1 } }\n\
                   \tchain c { type filter hook input priority 0; policy accept; ip saddr @s counter; }\n\
                   }\n\
                   table ip nat {\n\
                   \tchain postrouting { type nat hook postrouting priority srcnat; policy accept;\n\
                   \t\tip saddr 10.9.0.0/16 masquerade; }\n\
                   }\n\
                   table ip egressd { chain c { type filter hook output priority 0; }; }\n";
    let mut cmd = common::tools::cmd("ip");
    cmd.args(["netns", "exec", &ns, "nft", "-f", "-"]);
    common_stdin(cmd, foreign);
    let snapshot = |lab: &Lab| {
        [
            text(lab, &ns, &["list", "table", "inet", "foreign"]),
            text(lab, &ns, &["list", "table", "ip", "nat"]),
            text(lab, &ns, &["list", "table", "ip", "egressd"]),
        ]
    };
    let before = snapshot(&lab);
    assert!(before[0].contains("10.0.0.1"));
    let mut fw = fw(&ns);
    apply(&mut fw, &map_a()).await.unwrap();
    assert_eq!(snapshot(&lab), before, "after apply");
    apply(&mut fw, &map_b()).await.unwrap();
    assert_eq!(snapshot(&lab), before, "after incremental apply");
    fw.remove().await.unwrap();
    assert_eq!(snapshot(&lab), before, "after remove");
    assert_eq!(egressd_tables(&lab, &ns), 0);
}

/// Runs `cmd` with `input` on stdin and panics when it fails.
fn common_stdin(mut cmd: Command, input: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn restart_replaces_stale_table() {
    if !require_root("restart_replaces_stale_table") {
        return;
    }
    let mut lab = Lab::new("nftrs");
    let ns = lab.ns("a");
    // A crashed run left its table, with elements of its own and an extra chain.
    let mut old = fw(&ns);
    apply(&mut old, &map_a()).await.unwrap();
    lab.exec(
        &ns,
        [
            "nft",
            "add chain inet egressd leftover { type filter hook output priority 0; }",
        ],
    );
    drop(old);
    let mut fresh = fw(&ns);
    apply(&mut fresh, &map_b()).await.unwrap();
    assert_eq!(egressd_tables(&lab, &ns), 1);
    assert_eq!(fresh.list_elements().await.unwrap(), map_b());
    let listing = text(&lab, &ns, &["list", "table", "inet", "egressd"]);
    assert!(!listing.contains("leftover"), "{listing}");
}

#[tokio::test]
async fn remove_and_remove_absent() {
    if !require_root("remove_and_remove_absent") {
        return;
    }
    let mut lab = Lab::new("nftrm");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    fw.remove().await.unwrap();
    apply(&mut fw, &map_a()).await.unwrap();
    assert_eq!(egressd_tables(&lab, &ns), 1);
    fw.remove().await.unwrap();
    assert_eq!(egressd_tables(&lab, &ns), 0);
    fw.remove().await.unwrap();
    // After a remove, apply rebuilds the table.
    apply(&mut fw, &map_b()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
}

#[tokio::test]
async fn bad_element_keeps_previous_ruleset() {
    if !require_root("bad_element_keeps_previous_ruleset") {
        return;
    }
    let mut lab = Lab::new("nftbad");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    apply(&mut fw, &map_a()).await.unwrap();
    let before = text(&lab, &ns, &["list", "ruleset"]);
    let handle = table_handle(&lab, &ns);

    // A reversed range, on the incremental path: refused before anything is sent, so the
    // installed state stays known and no full replace follows.
    let mut bad = map_b();
    bad.v4.push(e4(("10.0.9.9", "10.0.9.1"), ANY4, "192.0.2.1"));
    let sent = fw.transactions();
    let err = apply(&mut fw, &bad).await.unwrap_err().to_string();
    assert!(err.contains("Range has zero or negative size"), "{err}");
    assert!(err.contains("10.0.9.9-10.0.9.1"), "{err}");
    assert_eq!(text(&lab, &ns, &["list", "ruleset"]), before);
    assert_eq!(fw.transactions(), sent);

    // The same key twice with different targets: each would go into its gateway's own set,
    // where the kernel would not see the overlap, so it is refused before anything is sent,
    // naming both. On the delta path...
    let mut dup = map_a();
    dup.v4.push(e4(("10.0.0.1", "10.0.0.1"), ANY4, "192.0.2.7"));
    let dup = sorted(dup);
    let sent = fw.transactions();
    let err = apply(&mut fw, &dup).await.unwrap_err().to_string();
    assert!(err.contains("overlapping elements"), "{err}");
    assert!(err.contains("10.0.0.1 . 0.0.0.0-255.255.255.255"), "{err}");
    assert_eq!(fw.transactions(), sent);
    assert_eq!(text(&lab, &ns, &["list", "ruleset"]), before);
    // ... and on the full-replace path (a firewall that knows nothing of the table, as after a
    // restart).
    let mut fresh = NftFirewall::in_netns("egressd", &ns);
    let err = apply(&mut fresh, &dup).await.unwrap_err().to_string();
    assert!(err.contains("overlapping elements"), "{err}");
    assert_eq!(fresh.transactions(), 0);
    assert_eq!(text(&lab, &ns, &["list", "ruleset"]), before);
    // Overlapping, not equal: the same sources, destinations that overlap.
    let mut part = map_a();
    part.v4.push(e4(
        ("10.0.0.1", "10.0.0.1"),
        ("9.0.0.0", "9.0.0.255"),
        "192.0.2.7",
    ));
    let err = apply(&mut fw, &sorted(part)).await.unwrap_err().to_string();
    assert!(err.contains("overlapping elements"), "{err}");

    // A good map then goes through (a delta).
    let replaces = fw.full_replaces();
    apply(&mut fw, &map_b()).await.unwrap();
    assert_eq!(fw.full_replaces(), replaces);
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
    assert_eq!(table_handle(&lab, &ns), handle);
    assert_ne!(text(&lab, &ns, &["list", "ruleset"]), before);
}

/// A full replace of 20 000 elements loads them in several kernel transactions (nftables'
/// commit lock is not held for the whole load), and a failure in the last part still leaves
/// the old generation in force, byte for byte.
#[tokio::test]
async fn a_large_load_goes_in_parts_and_a_late_failure_keeps_the_old_generation() {
    if !require_root("a_large_load_goes_in_parts_and_a_late_failure_keeps_the_old_generation") {
        return;
    }
    let mut lab = Lab::new("nftpart");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    let big = sorted(SnatMap {
        v4: sources(20_000, "10.64.0.0", ANY4, "192.0.2.1"),
        v6: vec![],
    });
    apply(&mut fw, &big).await.unwrap();
    // The maps and chains (one nft run), the elements in parts, the switch (one nft run).
    assert!(fw.transactions() >= 5, "{} transactions", fw.transactions());
    assert_eq!(fw.list_elements().await.unwrap(), big);
    let before = text(&lab, &ns, &["list", "ruleset"]);

    // A chain of a name nft's syntax cannot write (made through JSON, so egressd leaves it
    // alone) jumps to a cell chain of the generation in force: a full replace (a firewall
    // that knows nothing of the table, as after a restart) loads every part, and then its
    // switch, which deletes the old generation, fails.
    let cell = before
        .lines()
        .find_map(|l| l.trim().strip_prefix("chain c4_"))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|n| format!("c4_{n}"))
        .unwrap();
    let odd = |op: &str, what: &str| {
        format!(
            r#"{{"nftables": [{{"{op}": {{"{what}": {{"family": "inet", "table": "egressd", "name": "odd name"}}}}}}]}}"#
        )
    };
    let jump = format!(
        r#"{{"nftables": [{{"add": {{"rule": {{"family": "inet", "table": "egressd", "chain": "odd name", "expr": [{{"jump": {{"target": "{cell}"}}}}]}}}}}}]}}"#
    );
    for json in [odd("add", "chain"), jump] {
        lab.exec(&ns, ["nft", "-j", &json]);
    }
    let before = text(&lab, &ns, &["list", "ruleset"]);
    let mut restarted = NftFirewall::in_netns("egressd", &ns);
    let err = apply(&mut restarted, &big).await.unwrap_err().to_string();
    assert!(err.contains("switch maps"), "{err}");
    assert_eq!(restarted.full_replaces(), 1);
    assert!(
        restarted.transactions() >= 5,
        "create, at least two parts, the switch and the clean-up: {} transactions",
        restarted.transactions()
    );
    assert_eq!(text(&lab, &ns, &["list", "ruleset"]), before);
    lab.exec(&ns, ["nft", "-j", &odd("flush", "chain")]);
    lab.exec(&ns, ["nft", "-j", &odd("delete", "chain")]);
    apply(&mut restarted, &big).await.unwrap();
    assert_eq!(restarted.list_elements().await.unwrap(), big);
}

#[tokio::test]
async fn ipv6_elements() {
    if !require_root("ipv6_elements") {
        return;
    }
    let mut lab = Lab::new("nft6");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    let any6 = ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
    let a = sorted(SnatMap {
        v4: map_a().v4,
        v6: vec![
            e6(("fd00::1", "fd00::1"), any6, "2001:db8::1"),
            e6(
                ("fd00:1::", "fd00:1::ffff"),
                ("2001:db8:100::", "2001:db8:100:0:ffff:ffff:ffff:ffff"),
                "2001:db8::2",
            ),
            e6(
                ("fd00:2::5", "fd00:2::9"),
                ("2001:db8::", "2001:db8::7"),
                "2001:db8::3",
            ),
        ],
    });
    apply(&mut fw, &a).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), a);
    let mut b = a.clone();
    b.v6.remove(0);
    b.v6.push(e6(("fd00:3::1", "fd00:3::1"), any6, "2001:db8::4"));
    b.v6[0].to = GwId::of("2001:db8::99");
    let b = sorted(b);
    apply(&mut fw, &b).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), b);
    assert_eq!(
        fw.transactions(),
        3,
        "full replace (one transaction for a small map), then one delta after the sets of the \
         two gateways new to the cell"
    );
    assert_eq!(fw.full_replaces(), 1);
}

/// client ns — gw ns (forwarding, egressd's table) — server ns. The server echoes the peer
/// address it sees; a mapped client source must arrive as the gateway's address, an unmapped
/// one unchanged.
#[tokio::test]
async fn real_packets_are_snated() {
    if !require_root("real_packets_are_snated") {
        return;
    }
    let mut lab = Lab::new("nftpk");
    let (cli, gw, srv) = lab.three_hop();
    lab.exec(&cli, ["ip", "addr", "add", "10.201.0.3/24", "dev", "eth0"]);
    // The route back lets the unmapped client's connection complete un-SNATed.
    lab.exec(
        &srv,
        ["ip", "route", "add", "10.201.0.0/24", "via", "10.202.0.1"],
    );

    let mut fw = fw(&gw);
    // The client's element among 3 000 others, so that it sits in a cell of its own in the
    // middle of the selector, not in the first or only one.
    let mut v4 = vec![e4(
        ("10.201.0.2", "10.201.0.2"),
        ("10.202.0.0", "10.202.0.255"),
        "10.202.0.1",
    )];
    v4.extend(sources(2000, "10.200.0.0", ANY4, "192.0.2.1"));
    v4.extend(sources(1000, "10.210.0.0", ANY4, "192.0.2.1"));
    let map = sorted(SnatMap { v4, v6: vec![] });
    apply(&mut fw, &map).await.unwrap();
    let (cells4, _) = fw.cells().unwrap();
    assert!(cells4 >= 4, "{cells4} cells");

    let mut server = common::tools::cmd("socat");
    server.args([
        "TCP-LISTEN:7000,bind=10.202.0.2,reuseaddr,fork",
        "SYSTEM:echo $SOCAT_PEERADDR",
    ]);
    lab.spawn(&srv, server);

    let seen_from = |source: &str| -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = lab.try_exec(
                &cli,
                [
                    "timeout",
                    "3",
                    "socat",
                    "-u",
                    &format!("TCP:10.202.0.2:7000,bind={source}"),
                    "-",
                ],
            );
            let peer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if out.status.success() && !peer.is_empty() {
                return peer;
            }
            // The listener may not be up yet.
            assert!(
                Instant::now() < deadline,
                "no answer from the server for {source}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(seen_from("10.201.0.2"), "10.202.0.1", "mapped source");
    assert_eq!(seen_from("10.201.0.3"), "10.201.0.3", "unmapped source");
    let c = fw.counters().await.unwrap();
    assert!(c.snated() >= 1, "{c:?}");
    assert!(c.not_snated >= 1, "{c:?}");
    assert_eq!(c.dropped, 0, "{c:?}");

    // The gateway is active elsewhere: its policy's connections are dropped, never forwarded
    // with the client's address; other traffic, and the node's own (its address is a policy
    // source here too), passes.
    let mut own = map.clone();
    own.v4.push(e4(
        ("10.202.0.1", "10.202.0.1"),
        ("10.202.0.0", "10.202.0.255"),
        "10.202.0.1",
    ));
    let own = sorted(own);
    let mut standby = roles();
    standby.insert(GwId::of("10.202.0.1"), Default::default());
    fw.apply(&std::sync::Arc::new(own.clone()), &standby)
        .await
        .unwrap();
    let attempt = |ns: &str, source: &str| {
        lab.try_exec(
            ns,
            [
                "timeout",
                "3",
                "socat",
                "-u",
                &format!("TCP:10.202.0.2:7000,bind={source},connect-timeout=1"),
                "-",
            ],
        )
    };
    let out = attempt(&cli, "10.201.0.2");
    assert!(
        !out.status.success() || out.stdout.is_empty(),
        "a standby forwarded a policy's connection: the server saw {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        seen_from("10.201.0.3"),
        "10.201.0.3",
        "unmapped source on a standby"
    );
    let out = attempt(&gw, "10.202.0.1");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "10.202.0.1",
        "the node's own connection"
    );
    let c = fw.counters().await.unwrap();
    assert!(c.dropped >= 1, "{c:?}");
    // Active here again: SNATed again.
    fw.apply(&std::sync::Arc::new(own), &roles()).await.unwrap();
    assert_eq!(
        seen_from("10.201.0.2"),
        "10.202.0.1",
        "mapped source, active again"
    );

    // Removing the table stops the SNAT.
    fw.remove().await.unwrap();
    assert_eq!(seen_from("10.201.0.2"), "10.201.0.2", "after remove");
}

/// Many elements over several cells, an element spanning every cell, and changes on both
/// sides of a cell boundary: each change is one transaction and the kernel holds exactly the
/// map's pieces.
#[tokio::test]
async fn sharded_maps_and_cell_boundaries() {
    if !require_root("sharded_maps_and_cell_boundaries") {
        return;
    }
    let mut lab = Lab::new("nftsh");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    let low = ("0.0.0.0", "127.255.255.255");
    let mut v4 = sources(3000, "10.64.0.0", low, "192.0.2.1");
    // From every source to 200.0.0.0/8, as `compile` writes it (source ranges equal or
    // disjoint): in each source's row, and in rows of its own below and above them. Pieces of
    // another gateway in every cell.
    let to200 = ("200.0.0.0", "200.255.255.255");
    let mut wide = sources(3000, "10.64.0.0", to200, "192.0.2.9");
    let below = e4(("0.0.0.0", "10.63.255.255"), to200, "192.0.2.9");
    let above = e4(("10.64.11.184", "255.255.255.255"), to200, "192.0.2.9");
    wide.extend([below, above]);
    v4.extend(wide.iter().copied());
    let any6 = ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff");
    let a = sorted(SnatMap {
        v4,
        v6: vec![e6(("fd00::1", "fd00::1"), any6, "2001:db8::1")],
    });
    apply(&mut fw, &a).await.unwrap();
    let (cells4, cells6) = fw.cells().unwrap();
    assert!(cells4 >= 5, "{cells4}");
    assert_eq!(cells6, 1);
    assert_eq!(fw.list_elements().await.unwrap(), a);
    let listing = text(&lab, &ns, &["list", "table", "inet", "egressd"]);
    let gw9 = format!("_{} {{", GwId::of("192.0.2.9"));
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.trim().starts_with("set m4_") && l.ends_with(&gw9))
            .count(),
        cells4,
        "a set of the wide policy's gateway in every cell"
    );
    assert_eq!(listing.matches(" . 200.0.0.0/8").count(), wide.len());

    // The wide policy's rows below and above the sources go (first and last cell), and the
    // elements on both sides of the first cell boundary change their target to a gateway new
    // to those cells: its sets first, then one transaction.
    let mut b = a.clone();
    b.v4.retain(|e| *e != below && *e != above);
    for e in b.v4.iter_mut() {
        let i = u32::from(e.src.0) - u32::from(ip4("10.64.0.0"));
        if i == 511 || i == 512 {
            e.to = GwId::of("192.0.2.77");
        }
    }
    b.v6.push(e6(("fd00::2", "fd00::2"), any6, "2001:db8::2"));
    let b = sorted(b);
    let before = fw.transactions();
    apply(&mut fw, &b).await.unwrap();
    assert_eq!(fw.transactions(), before + 2);
    assert_eq!(fw.full_replaces(), 1);
    assert_eq!(fw.list_elements().await.unwrap(), b);
    apply(&mut fw, &a).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), a);
    assert_eq!(fw.full_replaces(), 1);
}

/// A delta that touches two cells commits as one transaction or not at all; the next apply
/// after a failed one is a full replace that repairs whatever was changed behind egressd's back.
#[tokio::test]
async fn two_cell_delta_is_atomic_and_recovers() {
    if !require_root("two_cell_delta_is_atomic_and_recovers") {
        return;
    }
    let mut lab = Lab::new("nftat");
    let ns = lab.ns("a");
    let mut fw = fw(&ns);
    let a = sorted(SnatMap {
        v4: sources(1200, "10.64.0.0", ANY4, "192.0.2.1"),
        v6: vec![],
    });
    apply(&mut fw, &a).await.unwrap();
    assert!(fw.cells().unwrap().0 >= 2);
    // b: the first element (first cell) gone, one added beyond the last (last cell).
    let mut b = a.clone();
    b.v4.remove(0);
    b.v4.push(e4(("10.99.0.1", "10.99.0.1"), ANY4, "192.0.2.1"));
    let b = sorted(b);
    // Someone deletes the first element behind egressd's back: the delta's delete fails.
    let listing = text(&lab, &ns, &["list", "table", "inet", "egressd"]);
    let first_map = listing
        .split_whitespace()
        .find(|w| w.starts_with("m4_") && w.split('_').nth(2) == Some("0"))
        .unwrap()
        .to_owned();
    lab.exec(
        &ns,
        [
            "nft",
            &format!(
                "delete element inet egressd {first_map} {{ 10.64.0.0 . 0.0.0.0-255.255.255.255 }}"
            ),
        ],
    );
    let before = text(&lab, &ns, &["list", "table", "inet", "egressd"]);
    let sent = fw.transactions();
    let err = apply(&mut fw, &b).await.unwrap_err().to_string();
    assert_eq!(
        fw.transactions(),
        sent + 1,
        "one transaction for both cells"
    );
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(err.contains(&first_map), "{err}");
    let after = text(&lab, &ns, &["list", "table", "inet", "egressd"]);
    assert_eq!(
        after, before,
        "the addition in the other cell must not be there"
    );
    assert!(!after.contains("10.99.0.1"));
    // Recovery: a full replace.
    apply(&mut fw, &b).await.unwrap();
    assert_eq!(fw.full_replaces(), 2);
    assert_eq!(fw.list_elements().await.unwrap(), b);
    // And deltas again afterwards.
    apply(&mut fw, &a).await.unwrap();
    assert_eq!(fw.full_replaces(), 2);
    assert_eq!(fw.list_elements().await.unwrap(), a);
}

/// A table in the layout of an older egressd (one map per family, a `postrouting` chain) left
/// by a crash is replaced in one switch, nothing of it left.
#[tokio::test]
async fn replaces_an_older_layout() {
    if !require_root("replaces_an_older_layout") {
        return;
    }
    let mut lab = Lab::new("nftold");
    let ns = lab.ns("a");
    let old = "table inet egressd {\n\
               \tmap snat4 { type ipv4_addr . ipv4_addr : ipv4_addr; flags interval;\n\
               \t\telements = { 10.9.0.1 . 0.0.0.0/0 : 192.0.2.1 } }\n\
               \tmap snat6 { type ipv6_addr . ipv6_addr : ipv6_addr; flags interval; }\n\
               \tchain postrouting { type nat hook postrouting priority srcnat; policy accept;\n\
               \t\tcounter comment \"seen\"\n\
               \t\tsnat ip to ip saddr . ip daddr map @snat4\n\
               \t\tsnat ip6 to ip6 saddr . ip6 daddr map @snat6\n\
               \t\tcounter comment \"not-snated\"; }\n\
               }\n";
    let mut cmd = common::tools::cmd("ip");
    cmd.args(["netns", "exec", &ns, "nft", "-f", "-"]);
    common_stdin(cmd, old);
    let mut fw = fw(&ns);
    apply(&mut fw, &map_b()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
    let listing = text(&lab, &ns, &["list", "table", "inet", "egressd"]);
    assert!(
        !listing.contains("snat4") && !listing.contains("10.9.0.1"),
        "{listing}"
    );
    assert!(!listing.contains("chain postrouting {"), "{listing}");
    assert_eq!(egressd_tables(&lab, &ns), 1);
    assert_eq!(fw.counters().await.unwrap().seen, 0);
}
