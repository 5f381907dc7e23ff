//! Measurements the benchmarks share: one failover trial on a running cluster, timestamps from
//! the daemons' logs, resident memory and CPU of a daemon.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::arp;
use super::cluster::*;
use super::topo::*;

pub struct Trial {
    /// From the failure to the successor's first gratuitous ARP on the wire (tcpdump's clock).
    pub failover_ms: f64,
    /// The longest gap between the client's ping replies around the event.
    pub outage_ms: f64,
    /// ARP probes answered by two MACs.
    pub doubles: usize,
    /// Under a flood (`failover_trial_with`): connections opened and refused or failed per
    /// second, admin requests per second.
    pub flood: Option<(f64, f64, f64)>,
}

/// The value after `name` on the bench's command line (`--trials 3`).
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Median and maximum (NaN for no values).
pub fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() - 1])
}

/// Seconds since midnight (UTC) of a tracing timestamp at the start of a log line
/// (`2026-11-26T15:24:34.785991Z ...`).
pub fn log_time(line: &str) -> Option<f64> {
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

/// A Unix time as seconds since midnight (UTC), to compare with `log_time`.
pub fn day_time(unix: f64) -> f64 {
    unix.rem_euclid(86_400.0)
}

/// One failure of `target` (the active node) on a running cluster: `how` is KILL or TERM (a
/// signal to its daemon), CUT (every link down) or CORDON (`egressd node cordon` through the
/// CLI of the successor's node, with `token`). Measures the successor's first gratuitous ARP,
/// the client's ping outage and ARP probes answered twice. The cluster is left as the failure
/// left it.
pub fn failover_trial(c: &mut Cluster, target: &str, how: &str, token: &std::path::Path) -> Trial {
    failover_trial_with(c, target, how, token, false)
}

/// `failover_trial`, with `flood`: the flood of `flood.rs` on every node's peer and admin ports
/// from 1.5 s before the failure to the end of the measurement.
pub fn failover_trial_with(
    c: &mut Cluster,
    target: &str,
    how: &str,
    token: &std::path::Path,
    flood: bool,
) -> Trial {
    let successor = name(c.index(target) + 1);
    let succ_mac = arp::mac_text(arp::mac(&c.topo.nodes[c.index(&successor)], "eth1"));

    let cap = c.topo.start_arp_capture("wan");
    let pings = c.topo.dir.path().join(format!("ping-{}.txt", unix_now()));
    super::tools::need("ping");
    let mut ping = super::tools::cmd("ip");
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
    let ping_child = c.topo.lab.spawn_raw(ping);
    let prober = c.prober();
    let flooding = flood.then(|| super::flood::Flood::start(c));
    std::thread::sleep(Duration::from_millis(if flood { 1500 } else { 700 }));

    let t0 = unix_now();
    match how {
        "CUT" => c.cut_links(target),
        "CORDON" => {
            let out = cli_with_token(c, c.index(&successor), &["node", "cordon", target], token);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        sig => c.signal(target, sig),
    }
    wait_for("successor active", WAIT, || {
        c.topo.active(c.index(&successor), GW).as_deref() == Some(successor.as_str())
            && c.topo.node_holds(c.index(&successor), GW)
    });
    std::thread::sleep(Duration::from_millis(700));
    let probes = prober.stop();
    let flood = flooding.map(super::flood::Flood::stop);
    signal(c.topo.lab.child(ping_child), "TERM");
    let _ = c.topo.lab.child(ping_child).wait();

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

/// The egressd CLI in node `i`'s namespace, with the admin token for mutations.
pub fn cli_with_token(
    c: &Cluster,
    i: usize,
    args: &[&str],
    token: &std::path::Path,
) -> std::process::Output {
    let token = token.display().to_string();
    let mut full = args.to_vec();
    if !matches!(args.first(), Some(&"status" | &"get")) {
        full.extend(["--token-file", &token]);
    }
    c.topo.cli(i, &full)
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of /proc/pid/stat, 12 and 13 after the name.
    get(11) + get(12)
}

/// The clock ticks per second of `/proc/pid/stat`.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
