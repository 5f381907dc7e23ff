//! A three-node cluster at a realistic size, in network namespaces (root only): 10 000 policies
//! in every node's file. Timings are the benchmark's (`cargo bench --bench scale`); this test
//! checks that the cluster settles and stays settled, that the data plane holds every element,
//! and that a failover and a one-policy change work at this size.

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::netns::require_root;
use common::topo::*;

/// `wait_for`, with the nodes' logs in the failure.
fn wait(c: &Cluster, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > WAIT {
            panic!("timed out after {WAIT:?} waiting for {what}\n{}", c.logs());
        }
        // Gently: listing 10 000 elements costs nft a lot of CPU on a small machine.
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn term(c: &Cluster, i: usize) -> u64 {
    c.topo
        .status(i)
        .and_then(|s| s["cluster"]["term"].as_u64())
        .unwrap_or(0)
}

fn failovers(c: &Cluster, i: usize) -> u64 {
    c.topo
        .status(i)
        .and_then(|s| {
            s["gateways"].as_array()?.iter().find(|g| g["name"] == GW)?["failovers"].as_u64()
        })
        .unwrap_or(0)
}

#[test]
fn three_nodes_with_10k_policies_settle_fail_over_and_apply() {
    if !require_root("three_nodes_with_10k_policies_settle_fail_over_and_apply") {
        return;
    }
    let (token, extra) = admin_token("scale-test-admin-token-0123");
    let mut c = Cluster::start_full("scale", 3, &extra, &many_sources(10_000));
    c.assert_traffic_via_vip();
    // Two of the 10 000 sources (the first and the last policy's) on the client, routed back
    // to it by every node: their traffic leaves with the VIP.
    let sources = [many_sources_address(0), many_sources_address(9_999)];
    for src in &sources {
        c.topo.lab.exec(
            &c.topo.client,
            ["ip", "addr", "add", &format!("{src}/32"), "dev", "eth0"],
        );
    }
    for ns in &c.topo.nodes {
        c.topo.lab.exec(
            ns,
            ["ip", "route", "add", "10.100.0.0/14", "via", CLIENT_IP],
        );
    }
    let snated = |c: &Cluster| {
        sources
            .iter()
            .all(|s| c.topo.seen_source(s, SERVER_IP).as_deref() == Some(VIP))
    };
    wait(&c, "the first and the last policy SNATed on gw1", || {
        snated(&c)
    });

    // Every source is an element of its own (none are adjacent).
    let elements = c.topo.snat4_elements(&c.topo.nodes[0].clone());
    assert!(
        elements.is_some_and(|n| n >= 10_000),
        "gw1's kernel holds {elements:?} elements"
    );

    // Settled: for three seconds no election, no failover, gw1 holds the gateway throughout.
    let t0 = term(&c, 0);
    let f0 = failovers(&c, 0);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            c.topo.node_holds(0, GW),
            "gw1 lost the gateway\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(term(&c, 0), t0, "elections went on\n{}", c.logs());
    assert_eq!(
        failovers(&c, 0),
        f0,
        "the active node was failed over\n{}",
        c.logs()
    );

    // The seed is compacted away: a snapshot on every node past it, so that a new leader
    // never re-sends the seed's parts while it finds its followers' log position.
    let seeded = (0..3)
        .filter_map(|i| c.topo.status(i)?["cluster"]["applied_index"].as_u64())
        .min()
        .unwrap_or(0);
    wait(&c, "a snapshot on every node past the seed", || {
        (0..3).all(|i| {
            c.topo
                .status(i)
                .and_then(|s| s["cluster"]["snapshot_index"].as_u64())
                .is_some_and(|n| n > 0 && n + 50 >= seeded)
        })
    });

    // A failover of the active node at this size.
    c.ensure_leader_is_not("gw1");
    // A restart of gw1 above hands the role back to it (preemption): wait for that first.
    c.wait_active("gw1");
    c.signal("gw1", "KILL");
    c.wait_active("gw2");
    c.assert_traffic_via_vip();
    wait(&c, "the first and the last policy SNATed on gw2", || {
        snated(&c)
    });

    // One more policy through the API reaches the active node's kernel.
    let dir = c.topo.dir.path().to_path_buf();
    let file = dir.join("one.toml");
    std::fs::write(
        &file,
        format!(
            "[[policy]]\nname = \"one-more\"\negress_gateway_name = \"{GW}\"\n\
             source_cidrs = [\"{CLIENT_OTHER_IP}/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\n"
        ),
    )
    .expect("apply file");
    let tok = token.path().display().to_string();
    let out = c.topo.cli(
        1,
        &[
            "apply",
            "-f",
            &file.display().to_string(),
            "--token-file",
            &tok,
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&c, "the applied policy in gw2's kernel", || {
        c.topo
            .seen_source(CLIENT_OTHER_IP, SERVER_IP)
            .is_some_and(|s| s == VIP)
    });
}
