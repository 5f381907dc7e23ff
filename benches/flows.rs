//! A policy change reaching running flows (issue 17), measured (root only; `cargo bench --bench
//! flows`). One node holding a `VirtualIPAddress` gateway; the client sends UDP to the server on
//! one socket every millisecond, which no policy selects at first. Each trial applies a policy
//! selecting it (`egressd apply`) and then deletes it (`egressd delete policy`):
//! - **apply → VIP**: from the start of the `egressd apply` process to the first datagram of
//!   the running flow that reaches the server with the VIP (the server's receive time; the
//!   probe's resolution is its 1 ms interval);
//! - **delete → own address**: the same for the deletion, back to the client's address;
//! - **sweep**: the daemon's own figures from its `flows` events: the conntrack entries deleted
//!   and the wall time of the sweep (a dump of every entry, then the deletions), summed over
//!   the sweeps one change caused (normally one).
//!
//! Rows: the running flow alone; with 100 000 other tracked flows that the change does not
//! reclassify (the other client's, one datagram each); and with 100 000 tracked flows that the
//! change does reclassify (the client's own, one datagram each: all deleted; sprayed again for
//! each trial). Options: `--trials N` (default 10; the last row uses min(N, 3)).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use common::bench::{arg, stats};
use common::flows::{self, *};
use common::topo::*;

/// Sprays 100 000 one-datagram flows from `src` toward the server's other address.
fn spray_100k(node: &common::heal::Node, src: &str) {
    for (sport, ports) in [(50001, 1..50001), (50002, 1..50001)] {
        spray_ports(
            &node.topo.client,
            SocketAddrV4::new(ip(src), sport),
            ip(SERVER_OTHER_IP),
            ports,
        );
    }
}

/// Waits until the running flow's datagrams arrive from `source` after `since`; the delay.
fn reached(flow: &UdpFlow, source: &str, since: Instant) -> f64 {
    let want = ip(source);
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if let Some(t) = flow.first_from(want, since) {
            return (t - since).as_secs_f64() * 1e3;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f64::NAN
}

/// The sweeps after event `after`, once they stop coming (none for 500 ms after the first):
/// the last event's number, and the entries deleted, the wall time and the time reading the
/// entries, summed over them.
fn sweeps(node: &common::heal::Node, after: u64) -> (u64, usize, f64, f64) {
    let end = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < end {
        let now = flow_events(node, after);
        if now.len() != seen.len() {
            seen = now;
            quiet_since = Instant::now();
        } else if !seen.is_empty() && quiet_since.elapsed() > Duration::from_millis(500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let figures: Vec<(usize, usize, f64, f64)> =
        seen.iter().filter_map(|(_, m)| sweep_figures(m)).collect();
    (
        seen.last().map_or(after, |e| e.0),
        figures.iter().map(|f| f.0).sum(),
        figures.iter().map(|f| f.2).sum(),
        figures.iter().map(|f| f.3).sum(),
    )
}

struct Row {
    what: &'static str,
    entries: usize,
    apply: Vec<f64>,
    delete: Vec<f64>,
    deleted: Vec<f64>,
    sweep_ms: Vec<f64>,
    /// The apply's sweeps alone, and their reading of the entries.
    apply_sweep_ms: Vec<f64>,
    read_ms: Vec<f64>,
}

fn main() {
    if !common::netns::require_root("bench flows") {
        return;
    }
    let trials: usize = arg("--trials").and_then(|t| t.parse().ok()).unwrap_or(10);
    let node = flows::start("bflows", "");
    let flow = UdpFlow::start(
        &node.topo.client,
        SocketAddrV4::new(ip(CLIENT_IP), FLOW_SPORT),
        &node.topo.server,
        SocketAddrV4::new(ip(SERVER_IP), FLOW_DPORT),
        Duration::from_millis(1),
    );
    flow.wait_source(CLIENT_IP, "start", || node.topo.log(0));
    // The takeover's own sweeps (the VIP became a local address) first.
    let (mut seq, _, _, _) = sweeps(&node, 0);
    let mut rows = Vec::new();
    for (what, spray) in [
        ("the running flow alone", None),
        (
            "+ 100 000 flows the change does not reclassify",
            Some(CLIENT_OTHER_IP),
        ),
        ("+ 100 000 flows the change reclassifies", Some(CLIENT_IP)),
    ] {
        let mut row = Row {
            what,
            entries: 0,
            apply: Vec::new(),
            delete: Vec::new(),
            deleted: Vec::new(),
            sweep_ms: Vec::new(),
            apply_sweep_ms: Vec::new(),
            read_ms: Vec::new(),
        };
        if spray == Some(CLIENT_OTHER_IP) {
            spray_100k(&node, CLIENT_OTHER_IP);
        }
        let n = if spray == Some(CLIENT_IP) {
            trials.min(3)
        } else {
            trials
        };
        for t in 0..n {
            if spray == Some(CLIENT_IP) {
                spray_100k(&node, CLIENT_IP);
            }
            row.entries = flows::entries(&node).len();
            let t0 = Instant::now();
            apply(&node, &policy(&[]));
            row.apply.push(reached(&flow, VIP, t0));
            let (s, deleted, ms, read) = sweeps(&node, seq);
            seq = s;
            row.deleted.push(deleted as f64);
            row.sweep_ms.push(ms);
            row.apply_sweep_ms.push(ms);
            row.read_ms.push(read);
            let t1 = Instant::now();
            delete_policy(&node, "p");
            row.delete.push(reached(&flow, CLIENT_IP, t1));
            let (s, _, ms, _) = sweeps(&node, seq);
            seq = s;
            row.sweep_ms.push(ms);
            eprintln!(
                "{what}, trial {t}: apply -> VIP {:.1} ms, delete -> own {:.1} ms, {deleted} \
                 deleted by the apply's sweep",
                row.apply[t], row.delete[t]
            );
        }
        rows.push(row);
    }

    println!(
        "| flows tracked | entries | apply → VIP, median / max | delete → own address, median / max | entries deleted by the apply's sweep (median) | sweep wall time, median / max | the apply's sweep: reading / all, medians |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let (am, ax) = stats(r.apply.clone());
        let (dm, dx) = stats(r.delete.clone());
        let (del, _) = stats(r.deleted.clone());
        let (sm, sx) = stats(r.sweep_ms.clone());
        let (rm, _) = stats(r.read_ms.clone());
        let (am2, _) = stats(r.apply_sweep_ms.clone());
        println!(
            "| {} ({} trials) | {} | {am:.1} / {ax:.1} ms | {dm:.1} / {dx:.1} ms | {del:.0} | {sm:.1} / {sx:.1} ms | {rm:.1} / {am2:.1} ms |",
            r.what,
            r.apply.len(),
            r.entries
        );
    }
}
