//! A client's view of the service: a UDP echo probe through the gateway. A thread in the client's
//! namespace sends a numbered datagram every `interval` (on an absolute schedule, so a late
//! wake-up does not stretch the interval), a thread in the server's namespace echoes it, and the
//! client records when each came back. Availability is the fraction of probes answered; an
//! outage is a run of unanswered probes.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::arp::enter_netns;

pub struct UdpProbe {
    stop_send: Arc<AtomicBool>,
    stop_rest: Arc<AtomicBool>,
    sender: Option<JoinHandle<Vec<Instant>>>,
    receiver: Option<JoinHandle<Vec<(u64, Instant)>>>,
    echo: Option<JoinHandle<()>>,
}

/// What the probe saw: when each probe was sent, and when (if) its echo came back.
pub struct ProbeLog {
    pub sent: Vec<Instant>,
    pub answered: Vec<Option<Instant>>,
}

impl UdpProbe {
    /// Probes `server` (an address of `server_ns`, where the echo binds) from `client` (an
    /// address of `client_ns`) every `interval`.
    pub fn start(
        client_ns: &str,
        client: SocketAddr,
        server_ns: &str,
        server: SocketAddr,
        interval: Duration,
    ) -> UdpProbe {
        let stop_send = Arc::new(AtomicBool::new(false));
        let stop_rest = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let echo = {
            let (ns, stop, ready) = (server_ns.to_string(), stop_rest.clone(), ready_tx.clone());
            std::thread::spawn(move || {
                enter_netns(&ns);
                let sock = UdpSocket::bind(server).expect("echo socket");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                ready.send(()).expect("ready");
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
        };
        ready_rx.recv().expect("echo ready");
        let (sock_tx, sock_rx) = std::sync::mpsc::channel();
        let receiver = {
            let (ns, stop, ready) = (client_ns.to_string(), stop_rest.clone(), ready_tx);
            std::thread::spawn(move || {
                enter_netns(&ns);
                let sock = UdpSocket::bind(client).expect("probe socket");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                sock_tx
                    .send(sock.try_clone().expect("clone"))
                    .expect("socket");
                ready.send(()).expect("ready");
                let mut got = Vec::new();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = sock.recv(&mut buf)
                        && n >= 8
                    {
                        let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                        got.push((seq, Instant::now()));
                    }
                }
                got
            })
        };
        ready_rx.recv().expect("receiver ready");
        let sock: UdpSocket = sock_rx.recv().expect("socket");
        let sender = {
            let stop = stop_send.clone();
            std::thread::spawn(move || {
                let mut sent = Vec::new();
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let seq = sent.len() as u64;
                    sent.push(Instant::now());
                    // An unreachable next hop is an unanswered probe, not an error.
                    let _ = sock.send_to(&seq.to_be_bytes(), server);
                    next += interval;
                    // After a stall, do not send a burst to catch up.
                    if next + interval < Instant::now() {
                        next = Instant::now();
                    }
                }
                sent
            })
        };
        UdpProbe {
            stop_send,
            stop_rest,
            sender: Some(sender),
            receiver: Some(receiver),
            echo: Some(echo),
        }
    }

    /// Stops sending, waits `grace` for the last echoes, and returns the log.
    pub fn stop(mut self, grace: Duration) -> ProbeLog {
        self.stop_send.store(true, Ordering::SeqCst);
        let sent = self
            .sender
            .take()
            .map(|h| h.join().expect("probe sender"))
            .unwrap_or_default();
        std::thread::sleep(grace);
        self.stop_rest.store(true, Ordering::SeqCst);
        let got = self
            .receiver
            .take()
            .map(|h| h.join().expect("probe receiver"))
            .unwrap_or_default();
        if let Some(h) = self.echo.take() {
            let _ = h.join();
        }
        let mut answered = vec![None; sent.len()];
        for (seq, at) in got {
            if let Some(slot) = answered.get_mut(seq as usize)
                && slot.is_none()
            {
                *slot = Some(at);
            }
        }
        ProbeLog { sent, answered }
    }
}

impl Drop for UdpProbe {
    fn drop(&mut self) {
        self.stop_send.store(true, Ordering::SeqCst);
        self.stop_rest.store(true, Ordering::SeqCst);
    }
}

impl ProbeLog {
    /// Fraction of probes answered.
    pub fn availability(&self) -> f64 {
        if self.sent.is_empty() {
            return 0.0;
        }
        self.answered.iter().filter(|a| a.is_some()).count() as f64 / self.sent.len() as f64
    }

    /// The longest outage: from the sending of the last answered probe before a run of
    /// unanswered ones to the sending of the next answered probe (or of the last probe). Returns
    /// (its length, when it started, the probes lost in it).
    pub fn worst_outage(&self) -> Option<(Duration, Instant, usize)> {
        let mut worst: Option<(Duration, Instant, usize)> = None;
        let mut note = |from: usize, to: usize, lost: usize| {
            let d = self.sent[to].duration_since(self.sent[from]);
            if lost > 0 && worst.is_none_or(|w| d > w.0) {
                worst = Some((d, self.sent[from], lost));
            }
        };
        // The index of the last answered probe (the first probe stands in before any).
        let mut prev: Option<usize> = None;
        for (i, a) in self.answered.iter().enumerate() {
            if a.is_some() {
                note(prev.unwrap_or(0), i, i - prev.map_or(0, |p| p + 1));
                prev = Some(i);
            }
        }
        if let Some(last) = self.sent.len().checked_sub(1) {
            note(
                prev.unwrap_or(0),
                last,
                last - prev.unwrap_or(0) + usize::from(prev.is_none()),
            );
        }
        worst
    }
}
