//! Passive capture of address claims on a lab bridge, and the check that claims of one address
//! never interleave between holders.
//!
//! A *claim* of an IPv4 address is any ARP frame whose sender protocol address is that address:
//! a gratuitous ARP, an ARP reply for it, or a request the holder sends from it. Every one of
//! them makes the neighbours learn "this address is at my MAC". tcpdump writes the frames
//! (pcap, packet-buffered) to a file the test opened; they are parsed byte by byte here, so no
//! text format of tcpdump's is relied on.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::netns::Lab;
use super::tools;

/// A running tcpdump writing every ARP frame seen on `dev` in `ns` to `path`.
pub struct Capture {
    pub path: PathBuf,
    child: usize,
}

impl Capture {
    /// Starts capturing and waits until tcpdump has written its file header (it is attached).
    pub fn start(lab: &mut Lab, ns: &str, dev: &str, path: &Path) -> Capture {
        Capture::start_filter(lab, ns, dev, path, "arp")
    }

    /// The same with another capture filter (tcpdump's syntax).
    pub fn start_filter(lab: &mut Lab, ns: &str, dev: &str, path: &Path, filter: &str) -> Capture {
        let file = std::fs::File::create(path).expect("capture file");
        tools::need("tcpdump");
        let mut cmd = tools::cmd("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            "tcpdump",
            "-i",
            dev,
            "-n",
            // Packets reach tcpdump at once (not a buffer block up to a second later), and are
            // written as they come: a capture stopped right after the traffic holds all of it.
            "--immediate-mode",
            "-U",
            "-s",
            "96",
            "-w",
            "-",
            filter,
        ])
        .stdout(file)
        .stderr(Stdio::null());
        let child = lab.spawn_raw(cmd);
        let start = std::time::Instant::now();
        while std::fs::metadata(path).map_or(0, |m| m.len()) < 24 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "tcpdump on {dev} in {ns} did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The header is written once the capture is activated; give the kernel's filter a
        // moment more.
        std::thread::sleep(Duration::from_millis(100));
        Capture {
            path: path.to_path_buf(),
            child,
        }
    }

    /// Stops tcpdump (SIGINT: it flushes and exits) and returns the file's path.
    pub fn stop(self, lab: &mut Lab) -> PathBuf {
        let child = lab.child(self.child);
        super::topo::signal(child, "INT");
        let start = std::time::Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.path
    }
}

/// One frame that claims the watched address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    /// Capture time, seconds since the Unix epoch.
    pub t: f64,
    /// The ARP sender hardware address (what the neighbours learn).
    pub mac: [u8; 6],
    /// The Ethernet source address of the frame.
    pub eth_src: [u8; 6],
    /// 1 request (a gratuitous ARP when the target is the address too), 2 reply.
    pub op: u16,
    /// A gratuitous ARP (sender and target address both the claimed one).
    pub gratuitous: bool,
}

/// Every claim of `ip` in a pcap file (Ethernet, microsecond or nanosecond timestamps), in
/// capture order. A truncated last record (the capture was killed mid-write) is ignored.
pub fn read_claims(path: &Path, ip: Ipv4Addr) -> Vec<Claim> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse_claims(&data, ip)
}

pub fn parse_claims(data: &[u8], ip: Ipv4Addr) -> Vec<Claim> {
    let mut out = Vec::new();
    if data.len() < 24 {
        return out;
    }
    let magic = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes"));
    let (le, nanos) = match magic {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        other => panic!("not a pcap file (magic {other:#x})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let v: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    let linktype = u32_at(data, 20);
    assert_eq!(
        linktype, 1,
        "capture is not Ethernet (link type {linktype})"
    );
    let mut at = 24;
    while at + 16 <= data.len() {
        let sec = u32_at(data, at);
        let frac = u32_at(data, at + 4);
        let incl = u32_at(data, at + 8) as usize;
        at += 16;
        if at + incl > data.len() {
            break;
        }
        let f = &data[at..at + incl];
        at += incl;
        // Ethernet II, ARP for IPv4 over Ethernet: sender MAC 22..28, sender IP 28..32,
        // target IP 38..42.
        if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[14..16] != [0, 1] || f[16..18] != [8, 0] {
            continue;
        }
        if f[28..32] != ip.octets() {
            continue;
        }
        let t = f64::from(sec) + f64::from(frac) / if nanos { 1e9 } else { 1e6 };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&f[22..28]);
        let mut eth_src = [0u8; 6];
        eth_src.copy_from_slice(&f[6..12]);
        out.push(Claim {
            t,
            mac,
            eth_src,
            op: u16::from_be_bytes([f[20], f[21]]),
            gratuitous: f[38..42] == ip.octets(),
        });
    }
    out
}

/// The source address of every IPv4 and IPv6 packet in a pcap file (Ethernet), in capture
/// order.
pub fn read_sources(path: &Path) -> Vec<std::net::IpAddr> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = Vec::new();
    for f in frames(&data) {
        match f.get(12..14) {
            Some([0x08, 0x00]) if f.len() >= 34 => {
                let a: [u8; 4] = f[26..30].try_into().expect("4 bytes");
                out.push(std::net::IpAddr::from(a));
            }
            Some([0x86, 0xdd]) if f.len() >= 54 => {
                let a: [u8; 16] = f[22..38].try_into().expect("16 bytes");
                out.push(std::net::IpAddr::from(a));
            }
            _ => {}
        }
    }
    out
}

/// The frames of a pcap file (Ethernet).
fn frames(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    if data.len() < 24 {
        return out;
    }
    let le = match u32::from_le_bytes(data[0..4].try_into().expect("4 bytes")) {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        other => panic!("not a pcap file (magic {other:#x})"),
    };
    let u32_at = |at: usize| {
        let v: [u8; 4] = data[at..at + 4].try_into().expect("4 bytes");
        if le {
            u32::from_le_bytes(v)
        } else {
            u32::from_be_bytes(v)
        }
    };
    assert_eq!(u32_at(20), 1, "capture is not Ethernet");
    let mut at = 24;
    while at + 16 <= data.len() {
        let incl = u32_at(at + 8) as usize;
        at += 16;
        if at + incl > data.len() {
            break;
        }
        out.push(&data[at..at + incl]);
        at += incl;
    }
    out
}

/// A claim made while another MAC was holding the address: `holder` claimed at `before` and
/// again at `after`, at most the window apart, and `intruder` claimed at `at` in between.
#[derive(Debug, Clone, PartialEq)]
pub struct Interleave {
    pub holder: [u8; 6],
    pub before: f64,
    pub after: f64,
    pub intruder: [u8; 6],
    pub at: f64,
}

/// The interleavings of `claims` (sorted by time here). A holder's claims no more than
/// `window` apart form one holding; another MAC's claim inside a holding is an interleaving.
/// After a new holder's first claim, so, no other MAC claims while the new holder goes on
/// claiming: claims come holder by holder. (A holder that falls silent for longer than
/// `window` ends its holding as far as this check can tell: the window must be shorter than
/// the fastest legitimate round trip of the role, away and back.)
pub fn interleavings(claims: &[Claim], window: Duration) -> Vec<Interleave> {
    let mut sorted = claims.to_vec();
    sorted.sort_by(|a, b| a.t.total_cmp(&b.t));
    let w = window.as_secs_f64();
    let mut last_of: BTreeMap<[u8; 6], usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (j, c) in sorted.iter().enumerate() {
        if let Some(&i) = last_of.get(&c.mac)
            && c.t - sorted[i].t <= w
        {
            for x in &sorted[i + 1..j] {
                if x.mac != c.mac {
                    out.push(Interleave {
                        holder: c.mac,
                        before: sorted[i].t,
                        after: c.t,
                        intruder: x.mac,
                        at: x.t,
                    });
                }
            }
        }
        last_of.insert(c.mac, j);
    }
    out
}

/// The claims compressed into runs of one MAC: (mac, first, last, claims).
pub fn runs(claims: &[Claim]) -> Vec<([u8; 6], f64, f64, usize)> {
    let mut sorted = claims.to_vec();
    sorted.sort_by(|a, b| a.t.total_cmp(&b.t));
    let mut out: Vec<([u8; 6], f64, f64, usize)> = Vec::new();
    for c in sorted {
        match out.last_mut() {
            Some(r) if r.0 == c.mac => {
                r.2 = c.t;
                r.3 += 1;
            }
            _ => out.push((c.mac, c.t, c.t, 1)),
        }
    }
    out
}
