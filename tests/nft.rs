//! `NftFirewall` against a real kernel, each test in its own network namespace (root only).

// `Lab::spawn` takes `mut cmd` without needing it (tests/common is not this file's to fix).
#[allow(unused_mut)]
mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{Lab, require_root};
use egressd::dataplane::Firewall;
use egressd::dataplane::nft::NftFirewall;
use egressd::policy::{SnatElement, SnatMap};

fn nft_cmd(ns: &str) -> Vec<String> {
    ["ip", "netns", "exec", ns, "nft"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn fw(ns: &str) -> NftFirewall {
    NftFirewall::with_command("egressd", nft_cmd(ns))
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
        to: ip4(to),
    }
}

fn e6(src: (&str, &str), dst: (&str, &str), to: &str) -> SnatElement<Ipv6Addr> {
    SnatElement {
        src: (ip6(src.0), ip6(src.1)),
        dst: (ip6(dst.0), ip6(dst.1)),
        to: ip6(to),
    }
}

const ANY4: (&str, &str) = ("0.0.0.0", "255.255.255.255");

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
    fw.apply(&map_a()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_a());
    assert_eq!(fw.transactions(), 1);
    fw.apply(&map_a()).await.unwrap();
    assert_eq!(fw.transactions(), 1, "an unchanged map must not call nft");
    // The same elements in another order are the same map.
    let mut shuffled = map_a();
    shuffled.v4.reverse();
    fw.apply(&shuffled).await.unwrap();
    assert_eq!(fw.transactions(), 1);
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
    fw.apply(&map_a()).await.unwrap();
    let handle = table_handle(&lab, &ns);
    fw.apply(&map_b()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
    assert_eq!(fw.transactions(), 2);
    assert_eq!(
        table_handle(&lab, &ns),
        handle,
        "an element change must not replace the table"
    );
    // And back, and to empty, and from empty.
    fw.apply(&map_a()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_a());
    fw.apply(&SnatMap::default()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), SnatMap::default());
    fw.apply(&map_b()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
    assert_eq!(fw.transactions(), 5);
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
    let mut cmd = Command::new("ip");
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
    fw.apply(&map_a()).await.unwrap();
    assert_eq!(snapshot(&lab), before, "after apply");
    fw.apply(&map_b()).await.unwrap();
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
    old.apply(&map_a()).await.unwrap();
    lab.exec(
        &ns,
        [
            "nft",
            "add chain inet egressd leftover { type filter hook output priority 0; }",
        ],
    );
    drop(old);
    let mut fresh = fw(&ns);
    fresh.apply(&map_b()).await.unwrap();
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
    fw.apply(&map_a()).await.unwrap();
    assert_eq!(egressd_tables(&lab, &ns), 1);
    fw.remove().await.unwrap();
    assert_eq!(egressd_tables(&lab, &ns), 0);
    fw.remove().await.unwrap();
    // After a remove, apply rebuilds the table.
    fw.apply(&map_b()).await.unwrap();
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
    fw.apply(&map_a()).await.unwrap();
    let before = text(&lab, &ns, &["list", "ruleset"]);
    let handle = table_handle(&lab, &ns);

    // A reversed range (nft: "Range has zero or negative size"), on the incremental path.
    let mut bad = map_b();
    bad.v4.push(e4(("10.0.9.9", "10.0.9.1"), ANY4, "192.0.2.1"));
    let err = fw.apply(&bad).await.unwrap_err().to_string();
    assert!(err.contains("Range has zero or negative size"), "{err}");
    assert!(err.contains("10.0.9.9-10.0.9.1"), "{err}");
    assert_eq!(text(&lab, &ns, &["list", "ruleset"]), before);

    // After a failure the next apply is a full replace; a failing one keeps the old table too.
    let err = fw.apply(&bad).await.unwrap_err().to_string();
    assert!(err.contains("Range has zero or negative size"), "{err}");
    assert_eq!(text(&lab, &ns, &["list", "ruleset"]), before);
    assert_eq!(table_handle(&lab, &ns), handle);

    // The same key twice with different targets: the kernel refuses the second.
    let mut dup = map_a();
    dup.v4.push(e4(("10.0.0.1", "10.0.0.1"), ANY4, "192.0.2.7"));
    let err = fw.apply(&dup).await.unwrap_err().to_string();
    assert!(err.contains("File exists"), "{err}");
    assert_eq!(text(&lab, &ns, &["list", "ruleset"]), before);

    // A good map then goes through (as a full replace).
    fw.apply(&map_b()).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), map_b());
    assert_ne!(table_handle(&lab, &ns), handle);
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
    fw.apply(&a).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), a);
    let mut b = a.clone();
    b.v6.remove(0);
    b.v6.push(e6(("fd00:3::1", "fd00:3::1"), any6, "2001:db8::4"));
    b.v6[0].to = ip6("2001:db8::99");
    let b = sorted(b);
    fw.apply(&b).await.unwrap();
    assert_eq!(fw.list_elements().await.unwrap(), b);
    assert_eq!(fw.transactions(), 2);
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
    fw.apply(&SnatMap {
        v4: vec![e4(
            ("10.201.0.2", "10.201.0.2"),
            ("10.202.0.0", "10.202.0.255"),
            "10.202.0.1",
        )],
        v6: vec![],
    })
    .await
    .unwrap();

    let mut server = Command::new("socat");
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

    // Removing the table stops the SNAT.
    fw.remove().await.unwrap();
    assert_eq!(seen_from("10.201.0.2"), "10.201.0.2", "after remove");
}

/// The fence: the kernel answers ARP (IPv4) and neighbour solicitations (IPv6) for a managed
/// address only while it is leased, and stops by itself when the lease runs out.
#[tokio::test]
async fn fence_answers_only_while_leased_ipv4_and_ipv6() {
    if !require_root("fence_answers_only_while_leased_ipv4_and_ipv6") {
        return;
    }
    let mut lab = Lab::new("fence");
    let holder = lab.ns("holder");
    let peer = lab.ns("peer");
    lab.veth(&holder, "eth0", &peer, "eth0");
    for (ns, v4, v6) in [
        (&holder, "10.203.0.1/24", "2001:db8:203::1/64"),
        (&peer, "10.203.0.2/24", "2001:db8:203::2/64"),
    ] {
        lab.exec(ns, ["ip", "addr", "add", v4, "dev", "eth0"]);
        lab.exec(ns, ["ip", "addr", "add", v6, "dev", "eth0", "nodad"]);
    }
    lab.exec(
        &holder,
        ["ip", "addr", "add", "10.203.0.50/32", "dev", "eth0"],
    );
    lab.exec(
        &holder,
        [
            "ip",
            "addr",
            "add",
            "2001:db8:203::50/128",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    let vips: std::collections::BTreeSet<std::net::IpAddr> = ["10.203.0.50", "2001:db8:203::50"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let reachable = |ip: &str| {
        // Forget what the peer learnt, so that every try resolves the address afresh.
        lab.try_exec(&peer, ["ip", "neigh", "flush", "dev", "eth0"]);
        lab.try_exec(&peer, ["ping", "-c", "1", "-W", "1", ip])
            .status
            .success()
    };
    let mut f = fw(&holder);

    f.lease(&vips, &Default::default(), Instant::now())
        .await
        .unwrap();
    assert!(
        !reachable("10.203.0.50"),
        "no lease: ARP must not be answered"
    );
    assert!(
        !reachable("2001:db8:203::50"),
        "no lease: NS must not be answered"
    );
    assert!(
        reachable("10.203.0.1"),
        "the host's own address is not fenced"
    );
    assert!(
        reachable("2001:db8:203::1"),
        "the host's own address is not fenced"
    );

    f.lease(&vips, &vips, Instant::now() + Duration::from_secs(3))
        .await
        .unwrap();
    assert!(reachable("10.203.0.50"));
    assert!(reachable("2001:db8:203::50"));

    // A short lease runs out by itself, without another call.
    f.lease(&vips, &vips, Instant::now() + Duration::from_millis(300))
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !reachable("10.203.0.50"),
        "an expired lease must not be answered"
    );
    assert!(
        !reachable("2001:db8:203::50"),
        "an expired lease must not be answered"
    );

    f.remove().await.unwrap();
    let rules = lab.exec(&holder, ["nft", "list", "ruleset"]);
    assert!(String::from_utf8_lossy(&rules.stdout).trim().is_empty());
}
