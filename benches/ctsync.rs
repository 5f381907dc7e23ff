//! Established connections across an unplanned failover and the fail-back (issue 13), egressd
//! beside keepalived (with and without conntrackd) in the same run (root only; `bench/run`, or
//! `cargo bench --bench ctsync -- [--trials N] [--sessions N]`).
//!
//! Every system gets the same lab (`tests/common/topo.rs`: client — LAN — three gateway nodes
//! — WAN — server, plus a peer network), the same flows and the same failure:
//! - **flows**: `--sessions` TCP sessions (default 5) from the client to an echo server, each
//!   sending one byte and waiting for the answer every 10 ms, all SNATed to the VIP;
//! - **failure**: every link of the active node (LAN, WAN, peer network) cut, with its daemons
//!   still running; 4 s later the links come back and the node, the preferred one, takes the
//!   gateway back (fail-back); 4 s after that the sessions are asked to answer within 10 s.
//!
//! Per session: whether it survived (answered after the fail-back, never reset), and the stall
//! of the failover and of the fail-back: the longest gap between two answers around each event.
//!
//! Systems: egressd with `conntrack_sync = true` and without (default timing profile);
//! keepalived 2.2 (Debian's package, VRRPv3 on the peer network — v2 rounds 0.1 s to 1 s —,
//! priorities 150/100/50, the VIP on
//! the WAN and the next hop on the LAN, SNAT in nftables) at `advert_int 1` and `0.1`, each with
//! conntrackd (FTFW, the same configuration egressd writes, driven by Debian's
//! `primary-backup.sh` from keepalived's notify hooks) and without. Each in loose conntrack
//! (the kernel's default) and strict (`nf_conntrack_tcp_loose = 0`, invalid packets dropped).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::arp::enter_netns;
use common::bench::arg;
use common::cluster::*;
use common::flows::{TCP_PORT, ip, start_tcp_echo, strict_conntrack};
use common::topo::*;

const CUT_FOR: Duration = Duration::from_secs(4);
const SETTLE: Duration = Duration::from_secs(4);

/// One TCP session asking every 10 ms; records when each answer came and whether it failed.
struct Session {
    answers: Arc<Mutex<Vec<Instant>>>,
    failed: Arc<Mutex<Option<String>>>,
}

struct Sessions {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    list: Vec<Session>,
}

impl Sessions {
    fn start(client: &str, n: usize) -> Sessions {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut list = Vec::new();
        for _ in 0..n {
            let answers = Arc::new(Mutex::new(Vec::new()));
            let failed = Arc::new(Mutex::new(None));
            let (ns, stop2, a, f) = (
                client.to_string(),
                stop.clone(),
                answers.clone(),
                failed.clone(),
            );
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            threads.push(std::thread::spawn(move || {
                enter_netns(&ns);
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                sock.bind(&SocketAddrV4::new(ip(CLIENT_IP), 0).into())
                    .expect("bind");
                let dst = SocketAddrV4::new(ip(SERVER_IP), TCP_PORT);
                if let Err(e) = sock.connect_timeout(&dst.into(), Duration::from_secs(5)) {
                    *f.lock().expect("lock") = Some(format!("connect: {e}"));
                    let _ = ready_tx.send(());
                    return;
                }
                let mut s: TcpStream = sock.into();
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .expect("timeout");
                let _ = ready_tx.send(());
                let mut buf = [0u8; 64];
                'outer: while !stop2.load(Ordering::SeqCst) {
                    if let Err(e) = s.write_all(b"?") {
                        *f.lock().expect("lock") = Some(format!("write: {e}"));
                        return;
                    }
                    // Wait for the answer (retransmissions happen meanwhile).
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) => {
                                *f.lock().expect("lock") = Some("closed".into());
                                return;
                            }
                            Ok(_) => break,
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) =>
                            {
                                if stop2.load(Ordering::SeqCst) {
                                    break 'outer;
                                }
                            }
                            Err(e) => {
                                *f.lock().expect("lock") = Some(format!("read: {e}"));
                                return;
                            }
                        }
                    }
                    a.lock().expect("lock").push(Instant::now());
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
            ready_rx.recv().expect("session started");
            list.push(Session { answers, failed });
        }
        Sessions {
            stop,
            threads,
            list,
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The longest gap between answers in [from, to] (counting from `from` to the first answer).
fn stall(answers: &[Instant], from: Instant, to: Instant) -> f64 {
    let mut last = from;
    let mut worst = Duration::ZERO;
    for &t in answers.iter().filter(|t| **t > from && **t <= to) {
        worst = worst.max(t - last);
        last = t;
    }
    worst = worst.max(to.saturating_duration_since(last));
    worst.as_secs_f64() * 1e3
}

#[derive(Default)]
struct Row {
    tried: usize,
    survived: usize,
    failover: Vec<f64>,
    failback: Vec<f64>,
    errors: Vec<String>,
}

/// One trial on a running lab: sessions, cut, restore, check.
fn trial(
    topo: &Topo,
    sessions: usize,
    cut: &dyn Fn(),
    restore: &dyn Fn(),
    back: &dyn Fn(),
    row: &mut Row,
) {
    let mut s = Sessions::start(&topo.client, sessions);
    std::thread::sleep(Duration::from_secs(1));
    let t_cut = Instant::now();
    cut();
    std::thread::sleep(CUT_FOR);
    let t_restore = Instant::now();
    restore();
    back();
    std::thread::sleep(SETTLE);
    let t_check = Instant::now();
    // Every session must answer again within 10 s of the check.
    let deadline = t_check + Duration::from_secs(10);
    while Instant::now() < deadline {
        let all = s.list.iter().all(|x| {
            x.failed.lock().expect("lock").is_some()
                || x.answers
                    .lock()
                    .expect("lock")
                    .last()
                    .is_some_and(|t| *t > t_check)
        });
        if all {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    s.stop();
    for x in &s.list {
        row.tried += 1;
        let answers = x.answers.lock().expect("lock").clone();
        let failed = x.failed.lock().expect("lock").clone();
        let alive = failed.is_none() && answers.last().is_some_and(|t| *t > t_check);
        if alive {
            row.survived += 1;
            row.failover.push(stall(&answers, t_cut, t_restore));
            row.failback.push(stall(&answers, t_restore, t_check));
        } else {
            row.errors
                .push(failed.unwrap_or_else(|| "no answer after the fail-back".into()));
        }
    }
}

fn run_egressd(sync: bool, strict_ct: bool, trials: usize, sessions: usize) -> Row {
    let tag = format!("bx{}{}", u8::from(sync), u8::from(strict_ct));
    let c = Cluster::launch_edited(
        &tag,
        3,
        "",
        "",
        |t| {
            if strict_ct {
                strict_conntrack(t)
            }
        },
        |_, body| {
            if sync {
                body.replacen(
                    "node_selector = { egress = \"\" }\n",
                    "node_selector = { egress = \"\" }\nconntrack_sync = true\n",
                    1,
                )
            } else {
                body
            }
        },
    );
    c.wait_active("gw1");
    start_tcp_echo(&c.topo.server, SocketAddrV4::new(ip(SERVER_IP), TCP_PORT));
    let mut row = Row::default();
    for _ in 0..trials {
        trial(
            &c.topo,
            sessions,
            &|| c.cut_links("gw1"),
            &|| c.restore_links("gw1"),
            &|| c.wait_active("gw1"),
            &mut row,
        );
    }
    row
}

/// keepalived (and conntrackd) in each node's namespace.
struct Keepalived {
    topo: Topo,
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn run_keepalived(
    conntrackd: bool,
    advert: &str,
    strict_ct: bool,
    trials: usize,
    sessions: usize,
) -> Row {
    let tag = format!(
        "bk{}{}{}",
        u8::from(conntrackd),
        if advert == "1" { "s" } else { "f" },
        u8::from(strict_ct)
    );
    let mut k = Keepalived {
        topo: Topo::new(&tag, 3),
    };
    if strict_ct {
        strict_conntrack(&k.topo);
    }
    let dir = k.topo.dir.path().to_path_buf();
    let example =
        std::fs::read_to_string("/usr/share/doc/conntrackd/examples/sync/primary-backup.sh")
            .expect("Debian's conntrackd example primary-backup.sh");
    for i in 0..3 {
        let ns = k.topo.nodes[i].clone();
        let node_dir = dir.join(format!("k{i}"));
        std::fs::create_dir_all(&node_dir).expect("dir");
        k.topo.lab.exec(
            &ns,
            [
                "nft",
                &format!(
                    "add table ip kad; add chain ip kad post {{ type nat hook postrouting \
                     priority 100; }}; add rule ip kad post ip saddr {CLIENT_IP} ip daddr \
                     203.0.113.0/24 oifname eth1 snat to {VIP}"
                ),
            ],
        );
        let mut notify = String::new();
        if conntrackd {
            // As egressd runs it: one conntrackd per peer (FTFW is a two-node protocol), each
            // driven by its own copy of Debian's primary-backup.sh.
            let members: Vec<String> = (0..3).map(name).collect();
            let mut wrapper = String::from("#!/bin/sh\n");
            for j in (0..3).filter(|j| *j != i) {
                let settings = egressd::dataplane::ctsync::Settings {
                    program: "/usr/sbin/conntrackd".into(),
                    dir: node_dir.join(name(j)),
                    address: ip(&node_mgmt_ip(i)),
                    interface: "eth2".into(),
                    peer: ip(&node_mgmt_ip(j)),
                    port: egressd::dataplane::ctsync::pair_port(3780, &members, &name(i), &name(j))
                        .expect("port"),
                    ignore: (0..3)
                        .map(|j| std::net::IpAddr::V4(ip(&node_mgmt_ip(j))))
                        .chain([std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)])
                        .collect(),
                };
                std::fs::create_dir_all(&settings.dir).expect("dir");
                write(&settings.config_path(), &settings.render());
                k.topo.lab.exec(
                    &ns,
                    [
                        "conntrackd",
                        "-C",
                        &settings.config_path().display().to_string(),
                        "-d",
                    ],
                );
                let script = example
                    .replace(
                        "CONNTRACKD_CONFIG=/etc/conntrackd/conntrackd.conf",
                        &format!("CONNTRACKD_CONFIG={}", settings.config_path().display()),
                    )
                    .replace(
                        "CONNTRACKD_LOCK=/var/lock/conntrack.lock",
                        &format!("CONNTRACKD_LOCK={}", settings.lock_path().display()),
                    );
                let path = settings.dir.join("primary-backup.sh");
                write(&path, &script);
                wrapper.push_str(&format!("sh {} \"$1\"\n", path.display()));
            }
            let path = node_dir.join("notify.sh");
            write(&path, &wrapper);
            k.topo
                .lab
                .exec(&ns, ["chmod", "755", &path.display().to_string()]);
            let p = path.display();
            notify = format!(
                "    notify_master \"{p} primary\"\n    notify_backup \"{p} backup\"\n    \
                 notify_fault \"{p} fault\"\n"
            );
        }
        let conf = node_dir.join("keepalived.conf");
        write(
            &conf,
            &format!(
                "global_defs {{\n    router_id gw{n}\n    vrrp_version 3\n}}\n\
                 vrrp_instance VI {{\n    state BACKUP\n    interface eth2\n    \
                 virtual_router_id 51\n    priority {prio}\n    advert_int {advert}\n    \
                 virtual_ipaddress {{\n        {VIP}/32 dev eth1\n        {NEXT_HOP}/32 dev eth0\n    \
                 }}\n{notify}}}\n",
                n = i + 1,
                prio = [150, 100, 50][i],
            ),
        );
        let log = std::fs::File::create(node_dir.join("keepalived.log")).expect("log");
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns, "keepalived", "-n", "-l", "-P", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(node_dir.join("k.pid"))
            .arg("-r")
            .arg(node_dir.join("v.pid"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        k.topo.lab.spawn_raw(cmd);
    }
    let holds = |t: &Topo, i: usize| t.holds(&t.nodes[i], "eth1", VIP);
    wait_for(
        "keepalived: gw1 holds the VIP",
        Duration::from_secs(30),
        || holds(&k.topo, 0),
    );
    start_tcp_echo(&k.topo.server, SocketAddrV4::new(ip(SERVER_IP), TCP_PORT));
    let port = "p-gw1";
    let set = |t: &Topo, state: &str| {
        for ns in [&t.lan, &t.wan, &t.mgmt] {
            t.lab.exec(ns, ["ip", "link", "set", port, state]);
        }
    };
    let mut row = Row::default();
    let topo = &k.topo;
    for _ in 0..trials {
        trial(
            topo,
            sessions,
            &|| set(topo, "down"),
            &|| set(topo, "up"),
            &|| {
                wait_for("keepalived: gw1 back", Duration::from_secs(30), || {
                    holds(topo, 0) && !holds(topo, 1)
                })
            },
            &mut row,
        );
    }
    row
}

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("!!! SKIPPED the ctsync benchmark: it builds network namespaces; run as root");
        return;
    }
    let trials: usize = arg("--trials").and_then(|s| s.parse().ok()).unwrap_or(3);
    let sessions: usize = arg("--sessions").and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut rows: Vec<(String, &str, Row)> = Vec::new();
    for strict_ct in [false, true] {
        let mode = if strict_ct { "strict" } else { "loose" };
        for sync in [true, false] {
            let name = format!(
                "egressd (default profile){}",
                if sync { " + conntrack_sync" } else { "" }
            );
            rows.push((name, mode, run_egressd(sync, strict_ct, trials, sessions)));
        }
        for advert in ["1", "0.1"] {
            for ctd in [true, false] {
                let name = format!(
                    "keepalived advert_int {advert}{}",
                    if ctd { " + conntrackd" } else { "" }
                );
                rows.push((
                    name,
                    mode,
                    run_keepalived(ctd, advert, strict_ct, trials, sessions),
                ));
            }
        }
    }
    println!(
        "\n{trials} trials x {sessions} TCP sessions (one byte each way every 10 ms); the active \
         node's links cut for {} s, then back (fail-back to it); stall = the longest gap between \
         a session's answers around the event, over the sessions that survived\n",
        CUT_FOR.as_secs()
    );
    println!(
        "| system | conntrack | survived / tried | failover stall, median / max (ms) | fail-back stall, median / max (ms) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    let fmt = |(m, x): (f64, f64)| {
        if m.is_nan() {
            "-".to_string()
        } else {
            format!("{m:.0} / {x:.0}")
        }
    };
    for (name, mode, r) in &rows {
        println!(
            "| {name} | {mode} | {} / {} | {} | {} |",
            r.survived,
            r.tried,
            fmt(common::bench::stats(r.failover.clone())),
            fmt(common::bench::stats(r.failback.clone())),
        );
    }
    for (name, mode, r) in &rows {
        let mut errors = r.errors.clone();
        errors.sort();
        errors.dedup();
        if !errors.is_empty() {
            eprintln!("{name} ({mode}): sessions lost: {errors:?}");
        }
    }
}
