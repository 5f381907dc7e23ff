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
//! the commit-to-SNAT latency of a config change, and the resident size of an idle node holding
//! 10 000 policies. `--admin-only`, `--planned-only`, `--config-change-only` and `--rss-only` run
//! one part.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/flood.rs"]
mod flood;

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::arp;
use common::cluster::*;
use common::topo::*;

const TRIALS: usize = 5;

struct Trial {
    failover_ms: f64,
    outage_ms: f64,
    doubles: usize,
    /// Under a flood: connections opened and refused per second, admin requests per second.
    flood: Option<(f64, f64, f64)>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Runs one trial: `leader` picks whether the active node is the Raft leader; `how` is KILL or
/// TERM (a signal to the daemon) or CUT (every link of the node goes down).
fn trial(tag: &str, extra: &str, leader: bool, how: &str) -> Trial {
    trial_with(tag, extra, leader, how, false)
}

/// `trial`, with `flood`: the flood of `support/flood.rs` on every node's peer and admin ports
/// from 1.5 s before the failure to the end of the measurement.
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
    let successor = name(c.index(&target) + 1);
    let succ_mac = arp::mac_text(arp::mac(&c.topo.nodes[c.index(&successor)], "eth1"));

    let cap = c.topo.start_arp_capture("wan");
    let pings = c.topo.dir.path().join("ping.txt");
    common::tools::need("ping");
    let mut ping = common::tools::cmd("ip");
    ping.args([
        "netns",
        "exec",
        &c.topo.client,
        "ping",
        "-D",
        "-n",
        "-i",
        "0.01",
        "-W",
        "1",
        "-I",
        CLIENT_IP,
        SERVER_IP,
    ])
    .stdout(std::fs::File::create(&pings).expect("ping log"))
    .stderr(Stdio::null());
    c.topo.lab.spawn_raw(ping);
    let prober = c.prober();
    let flooding = flood.then(|| flood::Flood::start(&c));
    std::thread::sleep(Duration::from_millis(if flood { 1500 } else { 700 }));

    let t0 = unix_now();
    if how == "CUT" {
        c.cut_links(&target);
    } else if how == "CORDON" {
        let out = cli(
            &c,
            c.index(&successor),
            &["node", "cordon", &target],
            token.path(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        c.signal(&target, how);
    }
    wait_for("successor active", WAIT, || {
        c.topo.active(c.index(&successor), GW).as_deref() == Some(successor.as_str())
            && c.topo.node_holds(c.index(&successor), GW)
    });
    std::thread::sleep(Duration::from_millis(700));
    let probes = prober.stop();
    let flood = flooding.map(flood::Flood::stop);

    let garp = format!("who-has {VIP} tell {VIP}");
    let text = std::fs::read_to_string(&cap).unwrap_or_default();
    let first_garp = text
        .lines()
        .filter(|l| l.contains(&garp) && l.contains(&succ_mac))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .find(|t| *t >= t0)
        .unwrap_or(f64::NAN);
    let replies: Vec<f64> = std::fs::read_to_string(&pings)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let outage = replies
        .windows(2)
        .filter(|w| w[1] >= t0 - 0.05)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max);
    Trial {
        failover_ms: (first_garp - t0) * 1e3,
        outage_ms: outage * 1e3,
        doubles: arp::double_answers(&probes).len(),
        flood,
    }
}

const TOKEN: &str = "bench-admin-token-0123456789";

/// The egressd CLI in node `i`'s namespace, with the admin token for mutations.
fn cli(c: &Cluster, i: usize, args: &[&str], token: &std::path::Path) -> std::process::Output {
    let token = token.display().to_string();
    let mut full = args.to_vec();
    if !matches!(args.first(), Some(&"status" | &"get")) {
        full.extend(["--token-file", &token]);
    }
    c.topo.cli(i, &full)
}

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
        let out = cli(&c, i, args, token.path());
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

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() - 1])
}

/// Seconds since midnight of a tracing timestamp at the start of a log line
/// (`2026-11-26T15:24:34.785991Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let t = line
        .split_whitespace()
        .next()?
        .split('T')
        .nth(1)?
        .trim_end_matches('Z');
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
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

fn idle_rss_with_policies(n: usize) -> u64 {
    let mut topo = Topo::new("rss", 1);
    let mut cfg = format!(
        r#"
[node]
name = "gw1"
labels = {{ egress = "" }}
[cluster]
listen = "127.0.0.1:7480"
data_dir = "{dir}/gw1"
[[gateway]]
name = "vip"
node_selector = {{ egress = "" }}
[gateway.source_ip]
mode = "VirtualIPAddress"
virtual_ip_address = {{ ip = "{VIP}", interfaces = ["eth1"] }}
"#,
        dir = topo.dir.path().display()
    );
    for i in 0..n {
        cfg.push_str(&format!(
            "[[policy]]\nname = \"p{i}\"\negress_gateway_name = \"vip\"\nsource_cidrs = [\"10.{}.{}.{}/32\"]\ndestination_cidrs = [\"0.0.0.0/0\"]\n",
            100 + i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    let path = topo.write_config(0, &cfg);
    let idx = topo.start_egressd(0, &path);
    // Consecutive /32 sources with one target merge into few map elements: wait for the log.
    wait_for("policies installed", Duration::from_secs(60), || {
        topo.log(0).contains("took over gateway")
    });
    std::thread::sleep(Duration::from_secs(3));
    let pid = topo.lab.child(idx).id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
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
        let trials: Vec<Trial> = (0..TRIALS)
            .map(|t| trial(&format!("fo{k}{t}"), extra, *leader, how))
            .collect();
        let (fm, fx) = stats(trials.iter().map(|t| t.failover_ms).collect());
        let (om, ox) = stats(trials.iter().map(|t| t.outage_ms).collect());
        let doubles: usize = trials.iter().map(|t| t.doubles).sum();
        println!(
            "| {what} | {TRIALS} | {fm:.0} ms | {fx:.0} ms | {om:.0} ms | {ox:.0} ms | {doubles} |"
        );
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED benches/failover.rs: needs root for network namespaces");
        return;
    }
    if std::env::args().any(|a| a == "--rss-only") {
        let rss = idle_rss_with_policies(10_000);
        println!(
            "idle single node with 10 000 policies: {:.1} MiB resident",
            rss as f64 / 1024.0
        );
        return;
    }
    if std::env::args().any(|a| a == "--flood-compare") {
        flood_compare();
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
    let rss = idle_rss_with_policies(10_000);
    println!(
        "\nresident size of an idle single node with 10 000 policies: {:.1} MiB",
        rss as f64 / 1024.0
    );
}

/// Failover (kill -9 of the active follower, default profile) without and with the flood of
/// `support/flood.rs`, trials interleaved so that the machine's other load hits both alike.
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
