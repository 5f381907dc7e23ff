//! Running flows through one gateway node while its policies change (issue 17): a UDP flow on
//! one socket, TCP connections, and the node's conntrack entries. Shared by
//! `tests/e2e_flows.rs` and `benches/flows.rs`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use egressd::dataplane::conntrack::{Conntrack, Flow};

use super::arp::enter_netns;
use super::cluster::{GW, lab_gateway};
use super::heal::{self, TOKEN};
use super::topo::*;

pub const WAIT: Duration = Duration::from_secs(10);
/// The running UDP flow: from the client's port to the server's.
pub const FLOW_SPORT: u16 = 40001;
pub const FLOW_DPORT: u16 = 9999;
/// The TCP server's port.
pub const TCP_PORT: u16 = 7000;

/// The lab's gateway, and one policy for the other client (its flows are translated to the VIP
/// throughout: they must never be touched).
pub fn config(topo: &Topo, dataplane: &str) -> String {
    let other = format!(
        r#"
[[policy]]
name = "other"
egress_gateway_name = "{GW}"
source_cidrs = ["{CLIENT_OTHER_IP}/32"]
destination_cidrs = ["{SERVER_IP}/32"]
"#
    );
    heal::node_config(topo, dataplane, &format!("{}{other}", lab_gateway()))
}

/// The policy the tests add, change and delete: the client toward the server, through the
/// lab's gateway, minus `excluded`.
pub fn policy(excluded: &[&str]) -> String {
    let excluded: Vec<String> = excluded.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "[[policy]]\nname = \"p\"\negress_gateway_name = \"{GW}\"\n\
         source_cidrs = [\"{CLIENT_IP}/32\"]\ndestination_cidrs = [\"203.0.113.0/24\"]\n\
         excluded_cidrs = [{}]\n",
        excluded.join(", ")
    )
}

/// Starts one node with `dataplane` lines in its `[dataplane]` and waits until it holds the
/// gateway. Unreplied UDP entries normally go after 30 s; the node keeps them 10 minutes, so
/// that the entries the tests count do not expire on their own.
pub fn start(tag: &str, dataplane: &str) -> heal::Node {
    let mut topo = Topo::new(tag, 1);
    let gw = topo.nodes[0].clone();
    topo.lab.exec(
        &gw,
        [
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_udp_timeout=600",
        ],
    );
    let token = topo.dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("token mode");
    let cfg = topo.write_config(0, &config(&topo, dataplane));
    let daemon = topo.start_egressd(0, &cfg);
    let node = heal::Node {
        topo,
        gw,
        daemon,
        big: false,
    };
    wait_for("VIP held", WAIT, || {
        node.topo.holds(&node.gw, "eth1", VIP) && node.topo.node_holds(0, GW)
    });
    node
}

/// `egressd apply -f` of `toml` on the node; panics when it fails.
pub fn apply(node: &heal::Node, toml: &str) {
    let path = node.topo.dir.path().join("apply.toml");
    std::fs::write(&path, toml).expect("apply file");
    cli_ok(node, "apply", &["apply", "-f", &path.display().to_string()]);
}

/// `egressd delete policy NAME` on the node; panics when it fails.
pub fn delete_policy(node: &heal::Node, name: &str) {
    cli_ok(node, "delete", &["delete", "policy", name]);
}

/// The CLI on the node with the admin token; panics, naming `what`, when it fails.
fn cli_ok(node: &heal::Node, what: &str, args: &[&str]) {
    let token = node.topo.dir.path().join("token").display().to_string();
    let mut full = args.to_vec();
    full.extend(["--token-file", &token]);
    let out = node.topo.cli(0, &full);
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every conntrack entry of the node.
pub fn entries(node: &heal::Node) -> Vec<Flow> {
    let mut ct = Conntrack::open(Some(&node.gw)).expect("ctnetlink socket");
    let mut out = Vec::new();
    ct.dump(|f| out.push(f)).expect("conntrack dump");
    out
}

/// One datagram the server received: when, and from which source.
pub type Got = (Instant, Ipv4Addr);

/// A UDP flow on one socket: the client sends a datagram every `interval` from `src` to `dst`,
/// and the server records the source each arrives with.
pub struct UdpFlow {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub got: Arc<Mutex<Vec<Got>>>,
}

impl UdpFlow {
    pub fn start(
        client_ns: &str,
        src: SocketAddrV4,
        server_ns: &str,
        dst: SocketAddrV4,
        interval: Duration,
    ) -> UdpFlow {
        let stop = Arc::new(AtomicBool::new(false));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = {
            let (ns, stop, got) = (server_ns.to_string(), stop.clone(), got.clone());
            std::thread::spawn(move || {
                enter_netns(&ns);
                let sock = UdpSocket::bind(dst).expect("flow server");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                ready_tx.send(()).expect("ready");
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((_, std::net::SocketAddr::V4(from))) = sock.recv_from(&mut buf) {
                        got.lock().expect("lock").push((Instant::now(), *from.ip()));
                    }
                }
            })
        };
        ready_rx.recv().expect("flow server ready");
        let sender = {
            let (ns, stop) = (client_ns.to_string(), stop.clone());
            std::thread::spawn(move || {
                enter_netns(&ns);
                let sock = UdpSocket::bind(src).expect("flow client");
                while !stop.load(Ordering::SeqCst) {
                    // The first datagrams may meet no route or neighbour yet: not an error.
                    let _ = sock.send_to(b"flow", dst);
                    std::thread::sleep(interval);
                }
            })
        };
        UdpFlow {
            stop,
            threads: vec![receiver, sender],
            got,
        }
    }

    /// The source of the last datagram the server received.
    pub fn last_source(&self) -> Option<Ipv4Addr> {
        self.got.lock().expect("lock").last().map(|g| g.1)
    }

    /// When the first datagram from `source` arrived after `since`.
    pub fn first_from(&self, source: Ipv4Addr, since: Instant) -> Option<Instant> {
        self.got
            .lock()
            .expect("lock")
            .iter()
            .find(|(t, s)| *t >= since && *s == source)
            .map(|g| g.0)
    }

    /// Waits until the server receives the flow's datagrams from `source` (liveness bound
    /// `WAIT`; the time it takes is the benchmark's figure).
    pub fn wait_source(&self, source: &str, what: &str, log: impl Fn() -> String) {
        let want: Ipv4Addr = source.parse().expect("address");
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            if self.last_source() == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "{what}: the running flow's datagrams still arrive from {:?}, not {source}\n{}",
            self.last_source(),
            log()
        );
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP echo server in `ns` on `addr`, answering each line with the peer address it sees.
pub fn start_tcp_echo(ns: &str, addr: SocketAddrV4) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        let listener = TcpListener::bind(addr).expect("tcp server");
        ready_tx.send(()).expect("ready");
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let peer = c
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(format!("{peer}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    ready_rx.recv().expect("tcp server ready");
}

/// A TCP connection from the client's namespace, made on a thread that stays there: each
/// `ask` sends a byte and returns the server's answer (the address it sees), or the error.
pub struct TcpClient {
    ask: std::sync::mpsc::Sender<()>,
    answer: std::sync::mpsc::Receiver<std::io::Result<String>>,
    pub local_port: u16,
}

impl TcpClient {
    pub fn connect(ns: &str, src: Ipv4Addr, dst: SocketAddrV4) -> TcpClient {
        let (ask_tx, ask_rx) = std::sync::mpsc::channel::<()>();
        let (ans_tx, ans_rx) = std::sync::mpsc::channel();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        std::thread::spawn(move || {
            enter_netns(&ns);
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            sock.bind(&SocketAddrV4::new(src, 0).into()).expect("bind");
            sock.connect_timeout(&dst.into(), WAIT).expect("connect");
            let mut s: TcpStream = sock.into();
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
            port_tx.send(port).expect("port");
            while ask_rx.recv().is_ok() {
                let mut buf = [0u8; 64];
                let r = s
                    .write_all(b"?")
                    .and_then(|()| s.read(&mut buf))
                    .map(|n| String::from_utf8_lossy(&buf[..n]).trim().to_string());
                if ans_tx.send(r).is_err() {
                    break;
                }
            }
        });
        let local_port = port_rx.recv().expect("connected");
        TcpClient {
            ask: ask_tx,
            answer: ans_rx,
            local_port,
        }
    }

    pub fn ask(&self) -> std::io::Result<String> {
        self.ask.send(()).expect("client thread");
        self.answer.recv().expect("client thread")
    }
}

/// Sends one datagram from each of `n` sockets of `src` (ports the kernel picks) to `dst`, from
/// namespace `ns`: `n` conntrack entries on the gateway, cheaply.
pub fn spray(ns: &str, src: Ipv4Addr, dst: SocketAddrV4, n: usize) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        for _ in 0..n {
            let sock = UdpSocket::bind(SocketAddrV4::new(src, 0)).expect("spray socket");
            sock.send_to(b"x", dst).expect("spray");
        }
    })
    .join()
    .expect("spray thread");
}

/// Sends one datagram from `src` (one socket) to each port of `ports` on `dst`, from namespace
/// `ns`: one conntrack entry per port on the gateway. Paced so that the queues on the way do
/// not drop them.
pub fn spray_ports(ns: &str, src: SocketAddrV4, dst: Ipv4Addr, ports: std::ops::Range<u16>) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns);
        let sock = UdpSocket::bind(src).expect("spray socket");
        for (i, port) in ports.enumerate() {
            // ENOBUFS on a full queue: wait and send again.
            while sock.send_to(b"x", SocketAddrV4::new(dst, port)).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if i % 200 == 199 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .join()
    .expect("spray thread");
}

/// The node's `flows` events after sequence number `after`: (seq, message).
pub fn flow_events(node: &heal::Node, after: u64) -> Vec<(u64, String)> {
    node.events()
        .iter()
        .filter(|e| e["kind"] == "flows")
        .filter_map(|e| {
            let seq = e["seq"].as_u64()?;
            (seq > after).then(|| (seq, e["message"].as_str().unwrap_or("").to_string()))
        })
        .collect()
}

/// (deleted, examined, milliseconds in all, milliseconds reading) of a `flows` event's message
/// ("... deleted N stale conntrack entries (udp N) of M in X ms (read in Y ms) ...").
pub fn sweep_figures(message: &str) -> Option<(usize, usize, f64, f64)> {
    let rest = message.split("deleted ").nth(1)?;
    let deleted = rest.split_whitespace().next()?.parse().ok()?;
    let rest = rest.split(" of ").nth(1)?;
    let mut words = rest.split_whitespace();
    let examined = words.next()?.parse().ok()?;
    let ms = words.nth(1)?.parse().ok()?;
    let read = rest
        .split("read in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((deleted, examined, ms, read))
}

pub fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("address")
}

/// Strict conntrack in every node's namespace: no mid-stream pick-up of TCP connections, and
/// packets conntrack finds invalid are dropped before egressd's chains see them.
pub fn strict_conntrack(topo: &Topo) {
    for ns in &topo.nodes {
        topo.lab.exec(
            ns,
            ["sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"],
        );
        topo.lab.exec(
            ns,
            [
                "nft",
                "add table inet strict; add chain inet strict invalid_drop { type filter hook forward \
                 priority -10; policy accept; }; add rule inet strict invalid_drop ct state invalid drop",
            ],
        );
        let out = topo
            .lab
            .exec(ns, ["sysctl", "-n", "net.netfilter.nf_conntrack_tcp_loose"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }
}
