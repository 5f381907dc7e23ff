//! The fence against a real kernel (root only): answered only while leased, every lease element
//! ends at its absolute wall-clock end, and no announcement of an unleased address leaves.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use common::arp::enter_netns;
use common::netns::{Lab, require_root};
use egressd::clock;
use egressd::dataplane::fence::{Fence, NftFence};

/// A holder and a peer on one link; the holder has 10.203.0.50 and 2001:db8:203::50.
fn lab(tag: &str) -> (Lab, String, String) {
    let mut lab = Lab::new(tag);
    let holder = lab.ns("holder");
    let peer = lab.ns("peer");
    lab.veth(&holder, "eth0", &peer, "eth0");
    for (ns, v4, v6) in [
        (&holder, "10.203.0.1/24", "2001:db8:203::1/64"),
        (&peer, "10.203.0.2/24", "2001:db8:203::2/64"),
    ] {
        lab.exec(ns, ["ip", "addr", "add", v4, "dev", "eth0"]);
        lab.exec(ns, ["ip", "addr", "add", v6, "dev", "eth0", "nodad"]);
    }
    lab.exec(
        &holder,
        ["ip", "addr", "add", "10.203.0.50/32", "dev", "eth0"],
    );
    lab.exec(
        &holder,
        [
            "ip",
            "addr",
            "add",
            "2001:db8:203::50/128",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    (lab, holder, peer)
}

fn vips() -> BTreeSet<IpAddr> {
    ["10.203.0.50", "2001:db8:203::50"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn eth0() -> BTreeSet<String> {
    ["eth0".to_string()].into_iter().collect()
}

/// Whether the peer gets an answer from `ip` (a fresh neighbour resolution each time).
fn reachable(lab: &Lab, peer: &str, ip: &str) -> bool {
    lab.try_exec(peer, ["ip", "neigh", "flush", "dev", "eth0"]);
    let out = lab.try_exec(peer, ["ping", "-c", "1", "-W", "1", ip]);
    // ping: 0 = answered, 1 = no answer; anything else means it could not try, which must never
    // pass for "not answered".
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "ping {ip} could not run: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn leases(until: Duration) -> BTreeMap<IpAddr, Duration> {
    vips().into_iter().map(|a| (a, until)).collect()
}

/// The kernel answers ARP (IPv4) and neighbour solicitations (IPv6) for a managed address only
/// while it is leased, and stops by itself when the lease runs out.
#[tokio::test]
async fn fence_answers_only_while_leased_ipv4_and_ipv6() {
    if !require_root("fence_answers_only_while_leased_ipv4_and_ipv6") {
        return;
    }
    let (lab, holder, peer) = lab("fence");
    let mut f = NftFence::in_netns("egressd", &holder);
    f.rebuild(&vips(), &eth0()).await.unwrap();
    assert!(
        !reachable(&lab, &peer, "10.203.0.50"),
        "no lease: ARP must not be answered"
    );
    assert!(
        !reachable(&lab, &peer, "2001:db8:203::50"),
        "no lease: NS must not be answered"
    );
    assert!(
        reachable(&lab, &peer, "10.203.0.1"),
        "the host's own address is not fenced"
    );
    assert!(
        reachable(&lab, &peer, "2001:db8:203::1"),
        "the host's own address is not fenced"
    );

    f.write(&leases(clock::now() + Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(reachable(&lab, &peer, "10.203.0.50"));
    assert!(reachable(&lab, &peer, "2001:db8:203::50"));
    // A renewal replaces the element (twice, to go through the delete of a renewed one).
    f.write(&leases(clock::now() + Duration::from_secs(6)))
        .await
        .unwrap();
    f.write(&leases(clock::now() + Duration::from_secs(7)))
        .await
        .unwrap();
    assert!(reachable(&lab, &peer, "10.203.0.50"));

    // A short lease runs out by itself, without another call.
    f.write(&leases(clock::now() + Duration::from_millis(300)))
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !reachable(&lab, &peer, "10.203.0.50"),
        "an expired lease must not be answered"
    );
    assert!(
        !reachable(&lab, &peer, "2001:db8:203::50"),
        "an expired lease must not be answered"
    );
    // Writing after expiry (the old elements may have timed out) works, and revoking too.
    f.write(&leases(clock::now() + Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(reachable(&lab, &peer, "10.203.0.50"));
    f.write(&BTreeMap::new()).await.unwrap();
    assert!(
        !reachable(&lab, &peer, "10.203.0.50"),
        "a revoked lease must not be answered"
    );

    f.remove().await.unwrap();
    let rules = lab.exec(&holder, ["nft", "list", "ruleset"]);
    assert!(String::from_utf8_lossy(&rules.stdout).trim().is_empty());
}

/// `nft list set arp egressd <set>` in `ns`.
fn arp_set(lab: &Lab, ns: &str, set: &str) -> String {
    let out = lab.exec(ns, ["nft", "list", "set", "arp", "egressd", set]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes one lease element for 10.203.0.50 by hand (ARP and netdev tables): `[0, end)` on the
/// wall clock, with a timeout of `timeout_ms`. Returns the set's name.
fn write_element(holder: &str, end: Duration, timeout_ms: u64) -> String {
    use egressd::dataplane::fence::lease_set;
    use egressd::dataplane::nfnl::{self, Batch, Data, Element, Op, Socket, WallTime};
    let set = lease_set("10.203.0.50".parse().unwrap());
    let mut b = Batch::new();
    // The ARP table answers requests; the egress hook lets the answer (and announcements) out.
    for family in [nfnl::NFPROTO_ARP, nfnl::NFPROTO_NETDEV] {
        let bound = |at: u64, interval_end: bool| Element {
            key: (WallTime(at), None),
            key_end: None,
            data: Data::None,
            timeout_ms: (!interval_end).then_some(timeout_ms),
            interval_end,
        };
        b.elements(
            Op::Add { exclusive: false },
            family,
            "egressd",
            &set,
            [bound(0, false), bound(end.as_nanos() as u64, true)],
        );
    }
    Socket::open(Some(holder)).unwrap().send(b).unwrap();
    set
}

/// An element whose timeout is long but whose wall-clock end has passed is not answered: the end
/// is absolute, so a daemon paused between computing an element and writing it (which makes the
/// timeout too long by the pause) cannot extend its lease.
#[tokio::test]
async fn a_lease_element_ends_at_its_absolute_end_whatever_its_timeout() {
    if !require_root("a_lease_element_ends_at_its_absolute_end_whatever_its_timeout") {
        return;
    }
    let (lab, holder, peer) = lab("fabs");
    let mut f = NftFence::in_netns("egressd", &holder);
    f.rebuild(&vips(), &eth0()).await.unwrap();
    // What a writer paused for 5 s right before sending would have sent: the timeout computed
    // before the pause (6.5 s), the absolute end 1.5 s after the write.
    let set = write_element(&holder, clock::wall() + Duration::from_millis(1500), 6500);
    assert!(
        reachable(&lab, &peer, "10.203.0.50"),
        "leased until its end"
    );
    std::thread::sleep(Duration::from_millis(1600));
    let listing = arp_set(&lab, &holder, &set);
    assert!(
        listing.contains("elements = {"),
        "the element is still there: {listing}"
    );
    assert!(
        !reachable(&lab, &peer, "10.203.0.50"),
        "past its absolute end, the element must not be answered"
    );
}

/// The other bound: an element whose wall-clock end is far away (a wall clock stepped back makes
/// it so) is answered only until its timeout. The timeout sits on the interval's start element;
/// this checks that the kernel ends the whole interval with it.
#[tokio::test]
async fn a_lease_element_ends_at_its_timeout_whatever_its_wall_clock_end() {
    if !require_root("a_lease_element_ends_at_its_timeout_whatever_its_wall_clock_end") {
        return;
    }
    let (lab, holder, peer) = lab("ftmo");
    let mut f = NftFence::in_netns("egressd", &holder);
    f.rebuild(&vips(), &eth0()).await.unwrap();
    let set = write_element(&holder, clock::wall() + Duration::from_secs(3600), 1500);
    assert!(
        reachable(&lab, &peer, "10.203.0.50"),
        "leased until its timeout"
    );
    std::thread::sleep(Duration::from_millis(1600));
    let listing = arp_set(&lab, &holder, &set);
    assert!(
        !listing.contains("elements = {"),
        "a timed-out element is not listed: {listing}"
    );
    assert!(
        !reachable(&lab, &peer, "10.203.0.50"),
        "past its timeout, the element must not be answered"
    );
}

/// Sends one gratuitous ARP for `ip` from `ns`'s eth0, as the daemon does (a packet socket).
fn send_garp(ns: &str, ip: &str) {
    let ns = ns.to_string();
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    std::thread::spawn(move || {
        enter_netns(&ns);
        let index = nix_ifindex("eth0");
        let mac = common::arp::mac(&ns, "eth0");
        // The fence drops the frame on its way out, and the send reports ENOBUFS for it.
        let _ = egressd::dataplane::announce::send_garp(index, mac, ip);
    })
    .join()
    .unwrap();
}

fn nix_ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// A packet-socket frame never passes the `arp` output hook, so an unleased node could announce
/// a VIP that is already on its successor. The fence's egress hook (netdev family) sees every
/// frame that leaves the interface: an announcement for an unleased address does not leave.
#[tokio::test]
async fn announcements_of_an_unleased_address_never_leave() {
    if !require_root("announcements_of_an_unleased_address_never_leave") {
        return;
    }
    let (mut lab, holder, peer) = lab("fgarp");
    let cap = tempfile::NamedTempFile::new().unwrap();
    let mut tcpdump = common::tools::cmd("ip");
    tcpdump
        .args([
            "netns", "exec", &peer, "tcpdump", "-l", "-n", "-i", "eth0", "arp",
        ])
        .stdout(cap.reopen().unwrap())
        .stderr(std::process::Stdio::null());
    common::tools::need("tcpdump");
    lab.spawn_raw(tcpdump);
    std::thread::sleep(Duration::from_millis(500));
    let seen = |n: usize| -> usize {
        std::thread::sleep(Duration::from_millis(300));
        let text = std::fs::read_to_string(cap.path()).unwrap();
        let count = text
            .lines()
            .filter(|l| l.contains("10.203.0.50 tell 10.203.0.50"))
            .count();
        assert!(count >= n, "{count} < {n}: {text}");
        count
    };
    let mut f = NftFence::in_netns("egressd", &holder);
    // Control: without the egress hook (no devices), the unleased announcement leaves — what
    // the fence of earlier versions let through.
    f.rebuild(&vips(), &BTreeSet::new()).await.unwrap();
    send_garp(&holder, "10.203.0.50");
    let before = seen(1);
    // With the egress hook: not leased, nothing leaves.
    f.rebuild(&vips(), &eth0()).await.unwrap();
    send_garp(&holder, "10.203.0.50");
    assert_eq!(
        seen(before),
        before,
        "an unleased announcement left the host"
    );
    // Leased: it leaves.
    f.write(&leases(clock::now() + Duration::from_secs(5)))
        .await
        .unwrap();
    send_garp(&holder, "10.203.0.50");
    let leased = seen(before + 1);
    // Lease over: nothing leaves again.
    f.write(&BTreeMap::new()).await.unwrap();
    send_garp(&holder, "10.203.0.50");
    assert_eq!(
        seen(leased),
        leased,
        "an announcement after the lease left the host"
    );
}
