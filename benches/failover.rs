//! Failover benchmark (root only; `cargo bench --bench failover`): three real daemons in network
//! namespaces, a client pinging the server through the gateway every 10 ms, tcpdump on the WAN,
//! and an ARP prober asking for the VIP every 10 ms. Per trial:
//! - failover time: from the kill (or SIGTERM) to the successor's first gratuitous ARP on the
//!   wire (sent only after its SNAT, address and ARP lease are in place), by tcpdump's clock;
//! - client outage: the longest gap between ping replies around the event;
//! - two holders: probes answered by two MACs (must be zero).
//!
//! Scenarios: all links of the active node cut (the host is gone) and kill -9 of its daemon (the
//! host's kernel still forwards until the successor's announcement moves the traffic), with the
//! active node a follower or the Raft leader, at the default and the fast profile; and a planned
//! handover (SIGTERM, and `egressd node cordon` through the CLI). Prints a table of
//! medians and maxima. Also: operator command latency (status, apply, delete through the CLI),
//! the commit-to-SNAT latency of a config change. `--admin-only`, `--planned-only` and
//! `--config-change-only` run one part; `--flood-compare` compares failover with and without a
//! flood of the peer and admin ports (`tests/common/flood.rs`; `EGRESSD_FLOOD_TRIALS`, default
//! 7); `--kill-follower-only` runs the one scenario (for comparisons across versions).
//! `EGRESSD_TRIALS` sets the trials per scenario (default 5). Sizes (10 000 and 100 000 policies) are
//! `benches/scale.rs`'s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::bench::*;
use common::cluster::*;
use common::topo::*;

/// Trials per scenario: 5, or `EGRESSD_TRIALS`.
fn trials_per_scenario() -> usize {
    std::env::var("EGRESSD_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Runs one trial on a fresh cluster: `leader` picks whether the active node is the Raft
/// leader; `how` is KILL or TERM (a signal to the daemon), CUT (every link of the node goes
/// down) or CORDON.
fn trial(tag: &str, extra: &str, leader: bool, how: &str) -> Trial {
    trial_with(tag, extra, leader, how, false)
}

/// `trial`, with `flood`: the flood of `tests/common/flood.rs` on every node's peer and admin
/// ports from 1.5 s before the failure to the end of the measurement.
fn trial_with(tag: &str, extra: &str, leader: bool, how: &str, flood: bool) -> Trial {
    let (token, admin) = admin_token(TOKEN);
    let mut c = Cluster::start_with(tag, 3, &format!("{extra}\n{admin}"));
    c.ensure_leader_is_not("gw3");
    let l = c.leader();
    let target = if leader {
        l.clone()
    } else {
        (0..3).map(name).find(|m| *m != l).expect("a follower")
    };
    c.make_active(&target);
    c.assert_traffic_via_vip();
    failover_trial_with(&mut c, &target, how, token.path(), flood)
}

const TOKEN: &str = "bench-admin-token-0123456789";

/// Operator round trips through the real CLI against a three-node cluster: `status` on the
/// leader and on a follower (which asks the leader for its view), and `apply` of one policy
/// sent to a follower (forwarded to the leader, answered once committed). Medians and maxima
/// in ms, process start included.
fn admin_latency(rounds: usize) -> Vec<(&'static str, f64, f64)> {
    let (token, extra) = admin_token(TOKEN);
    let mut c = Cluster::start_with("adm", 3, &extra);
    c.ensure_leader_is_not("gw3");
    let li = c.index(&c.leader());
    let fi = 2;
    let file = c.topo.dir.path().join("apply.toml");
    std::fs::write(
        &file,
        "[[policy]]\nname = \"bench\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.77.0.99/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\n",
    )
    .expect("apply file");
    let file = file.display().to_string();
    let time = |i: usize, args: &[&str]| {
        let t = std::time::Instant::now();
        let out = cli_with_token(&c, i, args, token.path());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed().as_secs_f64() * 1e3
    };
    let (mut sl, mut sf, mut ap, mut de) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        sl.push(time(li, &["status", "--json"]));
        sf.push(time(fi, &["status", "--json"]));
        ap.push(time(fi, &["apply", "-f", &file]));
        de.push(time(fi, &["delete", "policy", "bench"]));
    }
    let (a, b) = stats(sl);
    let (c1, d) = stats(sf);
    let (e, f) = stats(ap);
    let (g, h) = stats(de);
    vec![
        ("egressd status --json on the leader", a, b),
        (
            "egressd status --json on a follower (asks the leader)",
            c1,
            d,
        ),
        (
            "egressd apply -f (one policy) on a follower, until committed",
            e,
            f,
        ),
        ("egressd delete policy on a follower, until committed", g, h),
    ]
}

fn print_admin_latency() {
    let rounds = 20;
    println!("\n| operator command (real CLI, {rounds} rounds) | median | max |");
    println!("| --- | ---: | ---: |");
    for (what, m, x) in admin_latency(rounds) {
        println!("| {what} | {m:.1} ms | {x:.1} ms |");
    }
}

/// A policy change reloaded on the leader: from its commit (logged when the write returns) to
/// the active follower's SNAT map update (logged when nft returns). Median and max in ms.
fn config_change_latency(rounds: usize) -> (f64, f64) {
    let mut c = Cluster::start("cfg", 3);
    c.ensure_leader_is_not("gw3");
    let leader = c.leader();
    let active = (0..3).map(name).find(|m| *m != leader).expect("a follower");
    c.make_active(&active);
    let (li, ai) = (c.index(&leader), c.index(&active));
    let extra = "[[policy]]\nname = \"extra\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.77.0.99/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\n";
    let base = std::fs::read_to_string(&c.configs[li]).expect("config");
    let mut lat = Vec::new();
    for r in 0..rounds {
        let body = if r % 2 == 0 {
            format!("{base}{extra}")
        } else {
            base.clone()
        };
        std::fs::write(&c.configs[li], body).expect("config");
        let seen = c.topo.log(ai).matches("SNAT map updated").count();
        c.signal(&leader, "HUP");
        wait_for("change applied on the active node", WAIT, || {
            c.topo.log(ai).matches("SNAT map updated").count() > seen
        });
        let commit = c
            .topo
            .log(li)
            .lines()
            .rfind(|l| l.contains("committed the reloaded objects"))
            .and_then(log_time);
        let applied = c
            .topo
            .log(ai)
            .lines()
            .rfind(|l| l.contains("SNAT map updated"))
            .and_then(log_time);
        if let (Some(a), Some(b)) = (commit, applied) {
            lat.push((b - a) * 1e3);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stats(lat)
}

/// The planned handovers: (what, extra config, active is the leader, how).
const PLANNED: [(&str, &str, bool, &str); 2] = [
    (
        "SIGTERM (planned handover), default profile",
        "",
        false,
        "TERM",
    ),
    (
        "egressd node cordon (planned handover), default profile",
        "",
        false,
        "CORDON",
    ),
];

fn print_table(scenarios: &[(&str, &str, bool, &str)]) {
    println!(
        "\n| scenario | trials | failover to first GARP: median | max | client outage (10 ms ping): median | max | probes answered twice |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (k, (what, extra, leader, how)) in scenarios.iter().enumerate() {
        let n = trials_per_scenario();
        let trials: Vec<Trial> = (0..n)
            .map(|t| trial(&format!("fo{k}{t}"), extra, *leader, how))
            .collect();
        let (fm, fx) = stats(trials.iter().map(|t| t.failover_ms).collect());
        let (om, ox) = stats(trials.iter().map(|t| t.outage_ms).collect());
        let doubles: usize = trials.iter().map(|t| t.doubles).sum();
        println!(
            "| {what} | {n} | {fm:.0} ms | {fx:.0} ms | {om:.0} ms | {ox:.0} ms | {doubles} |"
        );
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED benches/failover.rs: needs root for network namespaces");
        return;
    }
    if std::env::args().any(|a| a == "--flood-compare") {
        flood_compare();
        return;
    }
    if std::env::args().any(|a| a == "--kill-follower-only") {
        print_table(&[(
            "kill -9, active is a follower, default profile",
            "",
            false,
            "KILL",
        )]);
        return;
    }
    if std::env::args().any(|a| a == "--admin-only") {
        print_admin_latency();
        return;
    }
    if std::env::args().any(|a| a == "--planned-only") {
        print_table(&PLANNED);
        return;
    }
    if std::env::args().any(|a| a == "--config-change-only") {
        let (m, x) = config_change_latency(10);
        println!(
            "config change committed -> applied on the active follower: median {m:.1} ms, max {x:.1} ms"
        );
        return;
    }
    let fast = "profile = \"fast\"";
    let scenarios = [
        (
            "links cut, active is a follower, default profile",
            "",
            false,
            "CUT",
        ),
        (
            "links cut, active is the leader, default profile",
            "",
            true,
            "CUT",
        ),
        (
            "kill -9, active is a follower, default profile",
            "",
            false,
            "KILL",
        ),
        (
            "kill -9, active is the leader, default profile",
            "",
            true,
            "KILL",
        ),
        (
            "links cut, active is a follower, fast profile",
            fast,
            false,
            "CUT",
        ),
        (
            "links cut, active is the leader, fast profile",
            fast,
            true,
            "CUT",
        ),
    ];
    let all: Vec<_> = scenarios.iter().chain(&PLANNED).copied().collect();
    print_table(&all);
    print_admin_latency();
    let (m, x) = config_change_latency(10);
    println!(
        "\nconfig change (one policy) committed on the leader -> SNAT updated on the active follower: median {m:.1} ms, max {x:.1} ms (10 rounds)"
    );
}

/// Failover (kill -9 of the active follower, default profile) without and with the flood of
/// `tests/common/flood.rs`, trials interleaved so that the machine's other load hits both alike.
fn flood_compare() {
    let trials: usize = std::env::var("EGRESSD_FLOOD_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
    for t in 0..trials {
        quiet.push(trial_with(&format!("fq{t}"), "", false, "KILL", false));
        flooded.push(trial_with(&format!("ff{t}"), "", false, "KILL", true));
    }
    println!(
        "\n| kill -9 of the active follower, default profile | trials | failover to first GARP: median | max | client outage: median | max | probes answered twice |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (what, v) in [("quiet", &quiet), ("under the flood", &flooded)] {
        let (fm, fx) = stats(v.iter().map(|t| t.failover_ms).collect());
        let (om, ox) = stats(v.iter().map(|t| t.outage_ms).collect());
        let doubles: usize = v.iter().map(|t| t.doubles).sum();
        println!(
            "| {what} | {} | {fm:.0} ms | {fx:.0} ms | {om:.0} ms | {ox:.0} ms | {doubles} |",
            v.len()
        );
    }
    let n = flooded.len().max(1) as f64;
    let (o, f, a) = flooded
        .iter()
        .filter_map(|t| t.flood)
        .fold((0.0, 0.0, 0.0), |acc, x| {
            (acc.0 + x.0, acc.1 + x.1, acc.2 + x.2)
        });
    println!(
        "\nflood (mean over trials): {:.0} connections/s opened, {:.0}/s refused or failed, {:.0} admin requests/s",
        o / n,
        f / n,
        a / n
    );
}
