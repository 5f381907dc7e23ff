//! A flood against every node's peer and admin ports, for failover trials under attack
//! (`bench/run` / `cargo bench --bench failover -- --flood-compare`). From eight stranger addresses on the
//! peer network (no certificate): connections opened and held while sending a byte every
//! 200 ms (a slow handshake), and connections opened and dropped as fast as one thread per
//! node manages; with a member's certificate (gw3's, from the same stranger host: a
//! misbehaving member process): request bodies trickled at 10 bytes/s; on each node's admin
//! port: status requests in a loop and unauthenticated apply bodies that never finish.
//! Everything stops when the `Flood` is dropped.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use super::arp;
use super::cluster::*;
use super::topo::*;

const SOURCES: u8 = 8;
const HELD_PER_SOURCE: usize = 40;
const SLOW_MEMBERS_PER_NODE: usize = 8;

#[derive(Default)]
pub struct Counts {
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub admin_requests: AtomicU64,
}

pub struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counts: Arc<Counts>,
    started: Instant,
}

fn source(k: u8) -> String {
    format!("10.78.0.{}", 200 + k)
}

fn connect_from(src: &str, dst: SocketAddr) -> Option<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    let from: SocketAddr = format!("{src}:0").parse().ok()?;
    s.bind(&from.into()).ok()?;
    s.connect_timeout(&dst.into(), Duration::from_millis(200))
        .ok()?;
    let t: TcpStream = s.into();
    t.set_write_timeout(Some(Duration::from_millis(50))).ok()?;
    Some(t)
}

impl Flood {
    /// Adds the stranger addresses (once per lab) and starts the flood on nodes `0..n`.
    pub fn start(c: &Cluster) -> Flood {
        // SAFETY: raising this process's own open-file limit to its hard limit.
        unsafe {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
                l.rlim_cur = l.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            }
        }
        for k in 0..SOURCES {
            c.topo.lab.exec(
                &c.topo.mgmt,
                [
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", source(k)),
                    "dev",
                    "br2",
                ],
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let mut threads = Vec::new();
        let tls = egressd::tls::PeerTls::load(
            egressd::tls::TlsFiles {
                ca_file: c.topo.dir.path().join("tls/ca/ca.pem"),
                cert_file: c.topo.dir.path().join("tls/certs/gw3.pem"),
                key_file: c.topo.dir.path().join("tls/certs/gw3-key.pem"),
            },
            "gw3",
        )
        .expect("gw3's TLS files");
        for i in 0..c.n {
            let peer: SocketAddr = format!("{}:7480", node_mgmt_ip(i)).parse().expect("addr");
            let mgmt = c.topo.mgmt.clone();
            // Held slow handshakes.
            {
                let (stop, counts, mgmt) = (stop.clone(), counts.clone(), mgmt.clone());
                threads.push(std::thread::spawn(move || {
                    arp::enter_netns(&mgmt);
                    let mut held: Vec<TcpStream> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        held.retain_mut(|s| s.write_all(&[0x16]).is_ok());
                        for k in 0..SOURCES {
                            let from_k = held
                                .iter()
                                .filter(|s| {
                                    s.local_addr()
                                        .is_ok_and(|a| a.ip().to_string() == source(k))
                                })
                                .count();
                            for _ in from_k..HELD_PER_SOURCE {
                                match connect_from(&source(k), peer) {
                                    Some(s) => {
                                        counts.opened.fetch_add(1, Ordering::Relaxed);
                                        held.push(s)
                                    }
                                    None => {
                                        counts.failed.fetch_add(1, Ordering::Relaxed);
                                        break;
                                    }
                                }
                            }
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }));
            }
            // Churn: open, send garbage, drop.
            {
                let (stop, counts, mgmt) = (stop.clone(), counts.clone(), mgmt.clone());
                threads.push(std::thread::spawn(move || {
                    arp::enter_netns(&mgmt);
                    let mut k = 0u8;
                    while !stop.load(Ordering::Relaxed) {
                        k = (k + 1) % SOURCES;
                        match connect_from(&source(k), peer) {
                            Some(mut s) => {
                                counts.opened.fetch_add(1, Ordering::Relaxed);
                                let _ = s.write_all(&[0x16, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3]);
                            }
                            None => {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }));
            }
            // A member's trickled bodies.
            {
                let (stop, counts, mgmt) = (stop.clone(), counts.clone(), mgmt.clone());
                let cfg = tls.client_config(&name(i)).expect("client config");
                let server = rustls::pki_types::ServerName::try_from(name(i)).expect("name");
                threads.push(std::thread::spawn(move || {
                    arp::enter_netns(&mgmt);
                    type Conn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;
                    let mut held: Vec<Conn> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        held.retain_mut(|s| s.write_all(b"0").and_then(|()| s.flush()).is_ok());
                        while held.len() < SLOW_MEMBERS_PER_NODE && !stop.load(Ordering::Relaxed)
                        {
                            let Some(tcp) = connect_from(&source(0), peer) else {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            };
                            let Ok(conn) = rustls::ClientConnection::new(cfg.clone(), server.clone())
                            else {
                                break;
                            };
                            let mut s = rustls::StreamOwned::new(conn, tcp);
                            let head = "POST /cluster/write HTTP/1.1\r\nHost: peer\r\nContent-Type: application/msgpack\r\nContent-Length: 100000\r\n\r\n";
                            if s.write_all(head.as_bytes()).and_then(|()| s.flush()).is_ok() {
                                counts.opened.fetch_add(1, Ordering::Relaxed);
                                held.push(s);
                            } else {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }));
            }
            // The admin port, from inside the node's namespace.
            for kind in ["status", "slow-apply"] {
                let (stop, counts) = (stop.clone(), counts.clone());
                let ns = c.topo.nodes[i].clone();
                threads.push(std::thread::spawn(move || {
                    arp::enter_netns(&ns);
                    let admin: SocketAddr = "127.0.0.1:7481".parse().expect("addr");
                    let mut held: Vec<TcpStream> = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if kind == "status" {
                            if let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) {
                                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                                let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
                                let mut buf = Vec::new();
                                let _ = s.read_to_end(&mut buf);
                                counts.admin_requests.fetch_add(1, Ordering::Relaxed);
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        } else {
                            held.retain_mut(|s| s.write_all(b" ").is_ok());
                            while held.len() < 32 {
                                let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
                                    break;
                                };
                                let _ = s.set_write_timeout(Some(Duration::from_millis(50)));
                                let _ = s.write_all(b"POST /v1/apply HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 20000000\r\n\r\n");
                                counts.admin_requests.fetch_add(1, Ordering::Relaxed);
                                held.push(s);
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }));
            }
        }
        Flood {
            stop,
            threads,
            counts,
            started: Instant::now(),
        }
    }

    /// Stops the flood; returns (connections opened per second, refused or failed per second,
    /// admin requests per second).
    pub fn stop(mut self) -> (f64, f64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let s = self.started.elapsed().as_secs_f64();
        (
            self.counts.opened.load(Ordering::Relaxed) as f64 / s,
            self.counts.failed.load(Ordering::Relaxed) as f64 / s,
            self.counts.admin_requests.load(Ordering::Relaxed) as f64 / s,
        )
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
