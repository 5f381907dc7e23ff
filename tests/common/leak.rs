//! Which client packets leave a gateway un-NATed: UDP from the client to the server through the
//! gateway, read by the server, which records the source address each datagram arrived with.
//!
//! Every `interval` the client opens a new flow (a new socket: a new conntrack entry, so a new
//! NAT decision) and sends its first datagram; `second_after` later it sends a second datagram
//! on that flow (a flow that began during an outage and goes on after it) and closes it. One
//! long flow (one socket throughout) sends a datagram every interval too.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::arp::enter_netns;

/// Which datagram of the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The first datagram of a new flow.
    First,
    /// The second datagram of a flow, `second_after` after its first.
    Second,
    /// The long flow's.
    Long,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::First => 0,
            Kind::Second => 1,
            Kind::Long => 2,
        }
    }

    fn of(b: u8) -> Kind {
        match b {
            0 => Kind::First,
            1 => Kind::Second,
            _ => Kind::Long,
        }
    }
}

/// One datagram the server received: its number, kind and source address.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub seq: u64,
    pub kind: Kind,
    pub from: Ipv4Addr,
}

pub struct LeakProbe {
    stop: Arc<AtomicBool>,
    sender: Option<JoinHandle<Vec<Instant>>>,
    receiver: Option<JoinHandle<Vec<Received>>>,
}

/// What the probe sent (the send time of datagram `seq` is `sent[seq]`) and what the server got.
pub struct LeakLog {
    pub sent: Vec<Instant>,
    pub got: Vec<Received>,
}

/// The client's datagrams that reached the server with `from` as their source, among those sent
/// in a window.
#[derive(Debug, Clone, Default)]
pub struct Leaks {
    /// First datagrams of new flows, and the send times of the first and the last one after the
    /// window's start (the traffic's view of when NAT went and came back).
    pub first: usize,
    pub first_first: Option<Duration>,
    pub last_first: Option<Duration>,
    pub second: usize,
    pub long: usize,
    /// Datagrams of any kind sent after `clean_from` (after the repair).
    pub after: usize,
    /// Datagrams the server received in the window, of any source (to see the probe ran).
    pub received: usize,
    /// Datagrams sent after `clean_from` that arrived with another source (translated).
    pub translated_after: usize,
}

impl LeakProbe {
    /// Starts the server side in `server_ns` (bound to `server`) and the client in `client_ns`
    /// (sending from `client`, the long flow from port `long_port`).
    pub fn start(
        client_ns: &str,
        client: Ipv4Addr,
        long_port: u16,
        server_ns: &str,
        server: SocketAddr,
        interval: Duration,
        second_after: Duration,
    ) -> LeakProbe {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = {
            let (ns, stop) = (server_ns.to_string(), stop.clone());
            std::thread::spawn(move || {
                enter_netns(&ns);
                let sock = UdpSocket::bind(server).expect("probe server");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                ready_tx.send(()).expect("ready");
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, SocketAddr::V4(from))) = sock.recv_from(&mut buf)
                        && n >= 9
                    {
                        got.push(Received {
                            seq: u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")),
                            kind: Kind::of(buf[8]),
                            from: *from.ip(),
                        });
                    }
                }
                got
            })
        };
        ready_rx.recv().expect("probe server ready");
        let sender = {
            let (ns, stop) = (client_ns.to_string(), stop.clone());
            std::thread::spawn(move || {
                enter_netns(&ns);
                let long = UdpSocket::bind((client, long_port)).expect("long flow");
                let mut open: VecDeque<(Instant, UdpSocket)> = VecDeque::new();
                let mut sent = Vec::new();
                let send = |sock: &UdpSocket, kind: Kind, sent: &mut Vec<Instant>| {
                    let seq = sent.len() as u64;
                    sent.push(Instant::now());
                    let mut msg = [0u8; 9];
                    msg[..8].copy_from_slice(&seq.to_be_bytes());
                    msg[8] = kind.byte();
                    // An unreachable server is a lost datagram, not an error.
                    let _ = sock.send_to(&msg, server);
                };
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    if let Ok(s) = UdpSocket::bind((client, 0)) {
                        send(&s, Kind::First, &mut sent);
                        open.push_back((Instant::now() + second_after, s));
                    }
                    while open.front().is_some_and(|(due, _)| *due <= Instant::now()) {
                        if let Some((_, s)) = open.pop_front() {
                            send(&s, Kind::Second, &mut sent);
                        }
                    }
                    send(&long, Kind::Long, &mut sent);
                    next += interval;
                    // After a stall, do not send a burst to catch up.
                    if next + interval < Instant::now() {
                        next = Instant::now();
                    }
                }
                sent
            })
        };
        LeakProbe {
            stop,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Stops sending, waits for the last datagrams, and returns the log.
    pub fn stop(mut self) -> LeakLog {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self
            .sender
            .take()
            .map(|h| h.join().expect("probe sender"))
            .unwrap_or_default();
        std::thread::sleep(Duration::from_millis(100));
        let got = self
            .receiver
            .take()
            .map(|h| h.join().expect("probe receiver"))
            .unwrap_or_default();
        LeakLog { sent, got }
    }
}

impl Drop for LeakProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl LeakLog {
    /// The datagrams sent from `start` on that arrived with source `from`; `after` counts those
    /// sent after `clean_from`.
    pub fn leaks(&self, from: Ipv4Addr, start: Instant, clean_from: Instant) -> Leaks {
        let mut l = Leaks::default();
        for r in &self.got {
            let Some(&at) = self.sent.get(r.seq as usize) else {
                continue;
            };
            if at < start {
                continue;
            }
            l.received += 1;
            if r.from != from {
                if at > clean_from {
                    l.translated_after += 1;
                }
                continue;
            }
            match r.kind {
                Kind::First => {
                    l.first += 1;
                    let d = at - start;
                    l.last_first = Some(l.last_first.map_or(d, |x| x.max(d)));
                    l.first_first = Some(l.first_first.map_or(d, |x| x.min(d)));
                }
                Kind::Second => l.second += 1,
                Kind::Long => l.long += 1,
            }
            if at > clean_from {
                l.after += 1;
            }
        }
        l
    }
}
