//! Repair of egressd's nftables after outside changes (issue 16), measured (root only; `cargo
//! bench --bench heal`). One node holding a `VirtualIPAddress` gateway, with 1 000 (and 100 000)
//! policies, a client opening a new UDP flow every millisecond to the server through it (plus one
//! long flow), and each outside change made `--trials` times (default 20):
//! - **SNAT back**: as the traffic saw it, from the first to the last new flow that reached the
//!   server with the client's own address, plus one probe interval (1 ms); 0 when none leaked.
//!   This starts at the kernel's commit of the outside change, not at the start of the `nft`
//!   that made it.
//! - **repaired**: the repair event's own figure, from the notification of the change to the end
//!   of the repair (the conntrack clean-up of flows begun un-NATed included).
//! - **leaked**: datagrams that reached the server with the client's address per trial (new
//!   flows' first and second datagrams, the long flow's), and those sent after the repair event
//!   (the target is none).
//!
//! Trials are spaced beyond `watch::FIGHT`, so that no repair backs off. Then the CPU the
//! watcher thread (`nft-watch`) and the whole daemon use over `--idle` seconds (default 30) of
//! idle running (lease renewals, about 20 a second, go on: each is a notification the watcher
//! reads and judges own). Prints markdown tables.
//!
//! Options: `--sizes 1000,100000`, `--trials N`, `--idle SECONDS`, `--changes a,b` (names as in
//! the table's first column, e.g. `flush,table`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::bench::{arg, stats, ticks_per_second};
use common::heal::*;

/// One kind of outside change.
struct Change {
    key: &'static str,
    what: &'static str,
    part: Part,
    act: fn(&Node),
}

fn changes() -> Vec<Change> {
    vec![
        Change {
            key: "flush",
            what: "`nft flush ruleset`",
            part: Part::Snat,
            act: |n| n.nft("flush ruleset"),
        },
        Change {
            key: "table",
            what: "`nft delete table inet egressd`",
            part: Part::Snat,
            act: |n| n.nft("delete table inet egressd"),
        },
        Change {
            key: "chain",
            what: "delete the base chain",
            part: Part::Snat,
            act: |n| {
                let chain = object_named(&n.terse_ruleset(), "chain", "postrouting_");
                n.nft_file("del", &format!("delete chain inet egressd {chain}\n"));
            },
        },
        Change {
            key: "set",
            what: "delete a cell set (and its chain's rules)",
            part: Part::Snat,
            act: |n| {
                let set = object_named(&n.terse_ruleset(), "set", "m4_");
                let chain = cell_chain(&set);
                n.nft_file(
                    "del",
                    &format!("flush chain inet egressd {chain}\ndelete set inet egressd {set}\n"),
                );
            },
        },
        Change {
            key: "arp",
            what: "`nft delete table arp egressd`",
            part: Part::Fence,
            act: |n| n.nft("delete table arp egressd"),
        },
        Change {
            key: "reload",
            what: "`nft -f` of a file beginning with `flush ruleset`",
            part: Part::Snat,
            act: |n| {
                n.nft_file(
                    "nftables",
                    &format!("#!/usr/sbin/nft -f\nflush ruleset\n{FOREIGN}"),
                )
            },
        },
    ]
}

/// "… SNAT back 41.3 ms after the change …" in a repair event.
fn event_ms(message: &str) -> f64 {
    message
        .split(" back ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or(f64::NAN)
}

struct Row {
    size: usize,
    what: &'static str,
    back_ms: Vec<f64>,
    repaired_ms: Vec<f64>,
    leaked: Vec<f64>,
    after: usize,
}

/// The CPU ticks of the thread of `pid` named `name`, and of the whole process.
fn ticks(pid: u32, name: &str) -> (u64, u64) {
    let read = |path: String| {
        let stat = std::fs::read_to_string(path).unwrap_or_default();
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r).to_string();
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    };
    let mut thread = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                thread += read(t.path().join("stat").display().to_string());
            }
        }
    }
    (thread, read(format!("/proc/{pid}/stat")))
}

fn main() {
    if !common::netns::require_root("bench heal") {
        return;
    }
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "1000".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let trials: usize = arg("--trials").and_then(|t| t.parse().ok()).unwrap_or(20);
    let idle: u64 = arg("--idle").and_then(|t| t.parse().ok()).unwrap_or(30);
    let only: Option<Vec<String>> =
        arg("--changes").map(|c| c.split(',').map(String::from).collect());
    let gap = egressd::dataplane::watch::FIGHT + Duration::from_millis(300);
    let mut rows = Vec::new();
    let mut cpu = Vec::new();
    for &size in &sizes {
        // `size` policies in all: the client's and size - 1 others.
        let started = Instant::now();
        let mut node = Node::start_within(
            &format!("bh{size}"),
            size.saturating_sub(1),
            Duration::from_secs(900),
        );
        eprintln!(
            "{size} policies: gateway held after {:?}",
            started.elapsed()
        );
        for c in changes() {
            if only.as_ref().is_some_and(|o| !o.iter().any(|k| k == c.key)) {
                continue;
            }
            let mut row = Row {
                size,
                what: c.what,
                back_ms: Vec::new(),
                repaired_ms: Vec::new(),
                leaked: Vec::new(),
                after: 0,
            };
            for t in 0..trials {
                std::thread::sleep(gap);
                let o = outside_change(&node, c.what, c.part, c.act);
                let l = &o.leaks;
                let back = match (l.first_first, l.last_first) {
                    (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e3 + 1.0,
                    _ => 0.0,
                };
                eprintln!(
                    "{size} {} #{t}: SNAT back {back:.1} ms, event {:.1} ms, leaked {} (after \
                     the repair {}), received {}",
                    c.key,
                    event_ms(&o.message),
                    l.first + l.second + l.long,
                    l.after,
                    l.received
                );
                row.back_ms.push(back);
                row.repaired_ms.push(event_ms(&o.message));
                row.leaked.push((l.first + l.second + l.long) as f64);
                row.after += l.after;
            }
            rows.push(row);
        }
        // Idle: no change, renewals go on.
        std::thread::sleep(gap);
        let pid = node.topo.lab.child(node.daemon).id();
        let hz = ticks_per_second();
        let (w0, p0) = ticks(pid, "nft-watch");
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(idle));
        let (w1, p1) = ticks(pid, "nft-watch");
        let secs = t0.elapsed().as_secs_f64();
        cpu.push((
            size,
            (w1 - w0) as f64 / hz / secs * 100.0,
            (p1 - p0) as f64 / hz / secs * 100.0,
            secs,
        ));
        // The daemon's log, to read what a slow trial did.
        let kept = std::env::temp_dir().join(format!("egressd-bench-heal-{size}.log"));
        if std::fs::write(&kept, node.topo.log(0)).is_ok() {
            eprintln!("{size} policies: the daemon's log is in {}", kept.display());
        }
        drop(node);
    }
    println!(
        "\n| policies | outside change | SNAT back (traffic), median / max | repair event, median \
         / max | leaked datagrams per trial, median / max | leaked after the repair (all trials) |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let (bm, bx) = stats(r.back_ms.clone());
        let (em, ex) = stats(r.repaired_ms.clone());
        let (lm, lx) = stats(r.leaked.clone());
        println!(
            "| {} | {} | {bm:.1} / {bx:.1} ms | {em:.1} / {ex:.1} ms | {lm:.0} / {lx:.0} | {} |",
            r.size, r.what, r.after
        );
    }
    println!(
        "\n{trials} trials per row; a new flow every 1 ms. \"SNAT back\": first to last new flow \
         seen un-NATed by the server, + 1 ms; \"repair event\": notification to repair done \
         (conntrack clean-up included), as the event reports it."
    );
    println!("\n| policies | idle CPU, watcher thread | idle CPU, whole daemon | over |");
    println!("|---|---|---|---|");
    for (size, w, p, secs) in cpu {
        println!("| {size} | {w:.2} % | {p:.2} % | {secs:.0} s |");
    }
}
