//! An ARP prober that runs inside a lab namespace (on a thread moved there with setns): every
//! `interval` it asks who has the VIP and records every MAC that answers, so a test can prove that
//! no two nodes answered at once — what the LAN sees, not only what `ip addr` says.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

const ETH_P_ARP: u16 = 0x0806;

/// One probe: when it was sent and the MACs that answered within the interval.
#[derive(Debug, Clone)]
pub struct Probe {
    pub at: Instant,
    pub answered_by: BTreeSet<[u8; 6]>,
}

pub struct ArpProber {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Probe>>>,
}

impl ArpProber {
    /// Starts probing `target` from `iface` (whose address is `sender`) in namespace `ns`.
    pub fn start(
        ns: &str,
        iface: &str,
        sender: Ipv4Addr,
        target: Ipv4Addr,
        interval: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, iface) = (ns.to_string(), iface.to_string());
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            enter_netns(&ns);
            probe_loop(&iface, sender, target, interval, &flag)
        });
        ArpProber {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> Vec<Probe> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .map(|h| h.join().expect("prober thread"))
            .unwrap_or_default()
    }
}

impl Drop for ArpProber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Moves the calling thread into network namespace `ns` (only this thread).
pub fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns");
    // SAFETY: setns on a valid namespace fd affects only the calling thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

fn probe_loop(
    iface: &str,
    sender: Ipv4Addr,
    target: Ipv4Addr,
    interval: Duration,
    stop: &AtomicBool,
) -> Vec<Probe> {
    // /sys shows the namespace that mounted it, not this thread's: ask the kernel instead.
    let sock = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ETH_P_ARP.to_be()))),
    )
    .expect("packet socket");
    let cname = std::ffi::CString::new(iface).expect("iface name");
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index != 0, "no interface {iface} in the prober's namespace");
    let mac = mac_of(&sock, iface);
    bind(&sock, index);
    sock.set_read_timeout(Some(Duration::from_millis(1)))
        .expect("timeout");
    let frame = request(mac, sender, target);
    let mut probes = Vec::new();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 128];
    let read_reply = |buf: &mut [std::mem::MaybeUninit<u8>]| -> Option<[u8; 6]> {
        let n = sock.recv(buf).ok()?;
        // SAFETY: recv initialised the first n bytes.
        let b: Vec<u8> = buf[..n]
            .iter()
            .map(|x| unsafe { x.assume_init() })
            .collect();
        let is_reply = n >= 42
            && b[12..14] == [0x08, 0x06]
            && b[20..22] == [0, 2]
            && b[28..32] == target.octets();
        is_reply.then(|| {
            let mut m = [0u8; 6];
            m.copy_from_slice(&b[22..28]);
            m
        })
    };
    while !stop.load(Ordering::SeqCst) {
        // Whatever is still queued answered an earlier probe (this thread may have been
        // descheduled past its window): give it to that probe, not to the next one.
        sock.set_nonblocking(true).expect("nonblocking");
        while let Ok(n) = sock.peek(&mut buf) {
            if n == 0 {
                break;
            }
            if let (Some(m), Some(last)) = (read_reply(&mut buf), probes.last_mut()) {
                let last: &mut Probe = last;
                last.answered_by.insert(m);
            }
        }
        sock.set_nonblocking(false).expect("blocking");
        let at = Instant::now();
        send(&sock, index, &frame);
        let mut answered_by = BTreeSet::new();
        while at.elapsed() < interval {
            if let Some(m) = read_reply(&mut buf) {
                answered_by.insert(m);
            }
        }
        probes.push(Probe { at, answered_by });
    }
    probes
}

fn mac_of(sock: &Socket, iface: &str) -> [u8; 6] {
    // SAFETY: ifreq is plain data; SIOCGIFHWADDR fills ifr_hwaddr for the named interface.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in iface.bytes().enumerate().take(15) {
            req.ifr_name[i] = b as libc::c_char;
        }
        let r = libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req);
        assert_eq!(r, 0, "SIOCGIFHWADDR {iface}");
        let data = req.ifr_ifru.ifru_hwaddr.sa_data;
        let mut mac = [0u8; 6];
        for i in 0..6 {
            mac[i] = data[i] as u8;
        }
        mac
    }
}

fn bind(sock: &Socket, index: u32) {
    // SAFETY: sockaddr_ll is plain data, filled before use.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ARP.to_be();
        sll.sll_ifindex = index as i32;
        let r = libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "bind packet socket");
    }
}

fn request(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes());
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes());
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&sender.octets());
    f[38..42].copy_from_slice(&target.octets());
    f
}

fn send(sock: &Socket, index: u32, frame: &[u8]) {
    // SAFETY: sockaddr_ll is plain data, filled before use; the frame outlives the call.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ARP.to_be();
        sll.sll_ifindex = index as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
    }
}

/// Probes in which more than one MAC answered.
pub fn double_answers(probes: &[Probe]) -> Vec<&Probe> {
    probes.iter().filter(|p| p.answered_by.len() > 1).collect()
}

/// Reads the MAC of `iface` in `ns`.
/// `aa:bb:cc:dd:ee:ff`, as tcpdump and `ip neigh` print a MAC.
pub fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn mac(ns: &str, iface: &str) -> [u8; 6] {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", iface])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    let s = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("link/ether in ip link output");
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).expect("mac hex");
    }
    mac
}
