//! The fence: the kernel answers for a managed address (ARP, NDP) and lets an announcement of it
//! leave only while the address holds a live lease element. The lease is the kernel's to enforce,
//! so a daemon that dies, hangs or is paused stops answering when its lease ends, whether or not
//! it ever runs again.
//!
//! Tables (`<t>` is `dataplane.nft_table`, `<x>` a managed address in hex):
//!
//! ```text
//! table arp <t> {                       # ARP requests in, ARP out (the kernel's own replies)
//!   map managed { type ipv4_addr : verdict }           # every VIP/next hop: jump fence_<x>
//!   set lease_<x> { typeof meta time; flags interval,timeout }  # [start, end) while leased
//!   chain fence_<x> { meta time != @lease_<x> drop }
//!   chain input  { arp operation request arp daddr ip vmap @managed }
//!   chain output { arp saddr ip vmap @managed }
//! }
//! table netdev <t> {                    # every frame that leaves the VIP interfaces, also the
//!   map managed, sets and fence chains  #   gratuitous ARPs egressd sends from a packet socket
//!   chain egress { type filter hook egress devices = { <interfaces> } priority 0;
//!                  ether type arp arp saddr ip vmap @managed }
//! }
//! table ip6 <t> {                       # neighbour solicitations in, advertisements out
//!   map managed { typeof @th,64,128 : verdict }   # the target address: bytes 8..23
//!   sets and fence chains as above
//!   chain input  { icmpv6 type nd-neighbor-solicit @th,64,128 vmap @managed }
//!   chain output { icmpv6 type nd-neighbor-advert  @th,64,128 vmap @managed }
//! }
//! ```
//!
//! A lease element covers a wall-clock interval (`meta time`, CLOCK_REALTIME) that ends at the
//! lease's end (see [`span`] for its start), and also carries a timeout of the lease's remaining
//! length. The absolute end means a daemon paused between computing an element and writing it
//! cannot extend the lease by the pause; the timeout means a wall clock stepped backwards cannot
//! either. Either bound ends the answer.
//!
//! Each address has a set of its own because a set keyed by one field is an rbtree in the
//! kernel, where a renewal (delete one interval, add another) is a few tree operations; a set
//! keyed by `address . meta time` is a pipapo set, which every commit copies and whose delete
//! rewrites its lookup tables: that was about half of an idle active node's CPU.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use super::nfnl::{self, Batch, Data, Element, Op, WallTime};
use super::nft::validate_table_name;
use super::runner::NftRunner;
use super::watch::{Count, Manifest, TableSpec};
use super::{Error, Result};
use crate::lease::Time;

pub const MANAGED: &str = "managed";

/// The address in hex: what names its lease set and fence chain.
fn tag(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{:08x}", u32::from(a)),
        IpAddr::V6(a) => format!("{:032x}", u128::from(a)),
    }
}

/// The set that holds `ip`'s lease interval (in the ARP and netdev tables for an IPv4 address,
/// in the ip6 table for an IPv6 one).
pub fn lease_set(ip: IpAddr) -> String {
    format!("lease_{}", tag(ip))
}

fn fence_chain(ip: IpAddr) -> String {
    format!("fence_{}", tag(ip))
}

/// The fence, behind a trait so the agent runs the same against the kernel and a fake.
pub trait Fence: Send {
    /// Builds (or rebuilds) the fence tables for `managed` addresses, the egress hook on
    /// `devices` (the existing interfaces that may carry them), with no address leased: from
    /// here the kernel answers for none of them.
    fn rebuild(
        &mut self,
        managed: &BTreeSet<IpAddr>,
        devices: &BTreeSet<String>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Makes the lease elements exactly `leases`: each address answered for until its lease ends
    /// (on the lease clock), every other address not at all. One kernel transaction.
    fn write(&mut self, leases: &BTreeMap<IpAddr, Time>)
    -> impl Future<Output = Result<()>> + Send;
    /// What the tables were built for, `None` when they are not (known to be) in place.
    fn built(&self) -> Option<&(BTreeSet<IpAddr>, BTreeSet<String>)>;
    /// What the kernel should hold after the last successful build and write, for the watcher's
    /// check (`None`: not known, or nothing to check).
    fn manifest(&self) -> Option<Manifest> {
        None
    }
    /// The tables are not known to be in place any more (changed from outside): the next round
    /// rebuilds them, with no lease, then writes the leases held then.
    fn forget(&mut self) {}
    /// Deletes the fence tables (clean shutdown).
    fn remove(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// The nftables fence.
#[derive(Debug)]
pub struct NftFence {
    table: String,
    nft: NftRunner,
    built: Option<(BTreeSet<IpAddr>, BTreeSet<String>)>,
    /// The wall-clock range (ns since the epoch) of each element written, as its key holds it.
    written: BTreeMap<IpAddr, Span>,
}

impl NftFence {
    pub fn new(table: &str) -> NftFence {
        NftFence::with(table, NftRunner::new())
    }

    /// Inside network namespace `netns`, for tests.
    pub fn in_netns(table: &str, netns: &str) -> NftFence {
        NftFence::with(table, NftRunner::in_netns(netns))
    }

    fn with(table: &str, nft: NftRunner) -> NftFence {
        NftFence {
            table: table.to_owned(),
            nft,
            built: None,
            written: BTreeMap::new(),
        }
    }

    pub fn transactions(&self) -> u64 {
        self.nft.transactions()
    }
}

/// The script that replaces the fence tables.
pub fn script(t: &str, managed: &BTreeSet<IpAddr>, devices: &BTreeSet<String>) -> String {
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = managed.iter().partition(|a| a.is_ipv4());
    // The sets and chains of `addrs`, then the table's hooked chains.
    let body = |addrs: &[IpAddr], map_key: &str, hooked: &str| {
        let mut b = format!("\tmap {MANAGED} {{ {map_key} : verdict; }}\n");
        for ip in addrs {
            let (set, chain) = (lease_set(*ip), fence_chain(*ip));
            let _ = write!(
                b,
                "\tset {set} {{ typeof meta time; flags interval,timeout; }}\n\
                 \tchain {chain} {{\n\t\tmeta time != @{set} drop\n\t}}\n"
            );
        }
        b.push_str(hooked);
        b
    };
    let elements = |s: &mut String, family: &str, addrs: &[IpAddr]| {
        for ip in addrs {
            let key = match ip {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("0x{:032x}", u128::from(*a)),
            };
            let chain = fence_chain(*ip);
            let _ = writeln!(
                s,
                "add element {family} {t} {MANAGED} {{ {key} : jump {chain} }}"
            );
        }
    };
    // The input and output hooks: each looks the packet's address up in the map.
    let in_out = |input: &str, output: &str| {
        format!(
            "\tchain input {{\n\
             \t\ttype filter hook input priority 0; policy accept;\n\
             \t\t{input} vmap @{MANAGED}\n\
             \t}}\n\
             \tchain output {{\n\
             \t\ttype filter hook output priority 0; policy accept;\n\
             \t\t{output} vmap @{MANAGED}\n\
             \t}}\n"
        )
    };
    let arp = body(
        &v4,
        "type ipv4_addr",
        &in_out("arp operation request arp daddr ip", "arp saddr ip"),
    );
    let ip6 = body(
        &v6,
        "typeof @th,64,128",
        &in_out(
            "icmpv6 type nd-neighbor-solicit @th,64,128",
            "icmpv6 type nd-neighbor-advert @th,64,128",
        ),
    );
    let mut s = String::new();
    for family in ["arp", "ip6", "netdev"] {
        let _ = writeln!(s, "add table {family} {t}\ndelete table {family} {t}");
    }
    let _ = writeln!(s, "table arp {t} {{\n{arp}}}\ntable ip6 {t} {{\n{ip6}}}");
    elements(&mut s, "arp", &v4);
    elements(&mut s, "ip6", &v6);
    if !devices.is_empty() {
        let list = devices
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let netdev = body(
            &v4,
            "type ipv4_addr",
            &format!(
                "\tchain egress {{\n\
                 \t\ttype filter hook egress devices = {{ {list} }} priority 0; policy accept;\n\
                 \t\tether type arp arp saddr ip vmap @{MANAGED}\n\
                 \t}}\n"
            ),
        );
        let _ = writeln!(s, "table netdev {t} {{\n{netdev}}}");
        elements(&mut s, "netdev", &v4);
    }
    s
}

/// The wall-clock range `[start, end)` (ns since the epoch) of a lease element.
type Span = (u64, u64);

/// The range a lease element ending at `end` covers when written at `now`. It starts a second
/// before `now`, so that a wall clock stepped back by up to that much does not stop the answer
/// (one stepped back further stops it until the next write; the timeout ends the element
/// either way). `None` when the end is not after that start.
fn span(now: u64, end: u64) -> Option<Span> {
    /// How far back the wall clock may step with the answer going on.
    const STEP_NS: u64 = 1_000_000_000;
    let start = now.saturating_sub(STEP_NS);
    (end > start).then_some((start, end))
}

/// The operations that delete the element `old`: re-added first (a no-op when present) so that
/// the delete cannot fail on an element that timed out meanwhile.
fn drop_steps(old: Span) -> [(Span, Op, Option<u64>); 2] {
    [
        (old, Op::Add { exclusive: false }, Some(1)),
        (old, Op::Delete, None),
    ]
}

/// Appends the operations on one address's lease elements: `(element span, op, timeout)`. An
/// interval is two elements, its start (with the timeout) and its end.
fn lease_ops(b: &mut Batch, t: &str, netdev: bool, ip: IpAddr, steps: &[(Span, Op, Option<u64>)]) {
    let set = lease_set(ip);
    let families: &[u8] = match (ip, netdev) {
        (IpAddr::V4(_), true) => &[nfnl::NFPROTO_ARP, nfnl::NFPROTO_NETDEV],
        (IpAddr::V4(_), false) => &[nfnl::NFPROTO_ARP],
        (IpAddr::V6(_), _) => &[nfnl::NFPROTO_IPV6],
    };
    for &((start, end), op, timeout_ms) in steps {
        let bound = |at: u64, interval_end: bool| Element {
            key: (WallTime(at), None),
            key_end: None,
            data: Data::None,
            timeout_ms: if interval_end { None } else { timeout_ms },
            interval_end,
        };
        for &family in families {
            b.elements(op, family, t, &set, [bound(start, false), bound(end, true)]);
        }
    }
}

impl Fence for NftFence {
    async fn rebuild(
        &mut self,
        managed: &BTreeSet<IpAddr>,
        devices: &BTreeSet<String>,
    ) -> Result<()> {
        validate_table_name(&self.table)?;
        self.built = None;
        self.written.clear();
        let script = script(&self.table, managed, devices);
        self.nft.transaction("build fence", &script).await?;
        self.built = Some((managed.clone(), devices.clone()));
        Ok(())
    }

    async fn write(&mut self, leases: &BTreeMap<IpAddr, Time>) -> Result<()> {
        let Some((managed, devices)) = self.built.clone() else {
            return Err(Error::Nft {
                op: "lease",
                detail: "the fence tables are not built".into(),
            });
        };
        let t = self.table.clone();
        let netdev = !devices.is_empty();
        let previous = self.written.clone();
        let wanted: BTreeMap<IpAddr, Time> = leases
            .iter()
            .filter(|(a, _)| managed.contains(*a))
            .map(|(a, u)| (*a, *u))
            .collect();
        let record = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let out = record.clone();
        // Unknown until the batch commits: a failure makes the next write rebuild the tables.
        self.built = None;
        self.nft
            .send_batch("lease", move || {
                // Computed at the last moment, from the clocks read now: the wall-clock end is
                // absolute, so a pause before the kernel gets it cannot make it later.
                let now = crate::clock::now();
                let now_wall = wall_ns(crate::clock::wall_at(now));
                let mut b = Batch::new();
                let mut written = BTreeMap::new();
                for (ip, old) in &previous {
                    if !wanted.contains_key(ip) {
                        lease_ops(&mut b, &t, netdev, *ip, &drop_steps(*old));
                    }
                }
                for (ip, until) in &wanted {
                    let remaining = until.saturating_sub(now);
                    let mut steps = previous
                        .get(ip)
                        .map_or_else(Vec::new, |old| drop_steps(*old).to_vec());
                    let end = wall_ns(crate::clock::wall_at(*until));
                    if !remaining.is_zero()
                        && let Some(new) = span(now_wall, end)
                    {
                        steps.push((new, Op::Add { exclusive: false }, Some(ms_ceil(remaining))));
                        written.insert(*ip, new);
                    }
                    lease_ops(&mut b, &t, netdev, *ip, &steps);
                }
                if let Ok(mut w) = record.lock() {
                    *w = written;
                }
                b
            })
            .await?;
        self.written = out.lock().map(|w| w.clone()).unwrap_or_default();
        self.built = Some((managed, devices));
        Ok(())
    }

    fn built(&self) -> Option<&(BTreeSet<IpAddr>, BTreeSet<String>)> {
        self.built.as_ref()
    }

    fn manifest(&self) -> Option<Manifest> {
        let (managed, devices) = self.built.as_ref()?;
        let table = |family: u8, hooked: &[&str], v6: bool| {
            let addrs: Vec<IpAddr> = managed
                .iter()
                .filter(|a| a.is_ipv6() == v6)
                .copied()
                .collect();
            let mut chains: BTreeMap<String, usize> =
                hooked.iter().map(|c| (c.to_string(), 1)).collect();
            let mut sets = BTreeMap::from([(MANAGED.to_string(), Count::Exactly(addrs.len()))]);
            for ip in &addrs {
                chains.insert(fence_chain(*ip), 1);
                // An interval is two elements (start and end); one timed out may linger.
                let leased = if self.written.contains_key(ip) { 2 } else { 0 };
                sets.insert(lease_set(*ip), Count::AtMost(leased));
            }
            TableSpec {
                family,
                name: self.table.clone(),
                chains,
                sets,
            }
        };
        let mut tables = vec![
            table(nfnl::NFPROTO_ARP, &["input", "output"], false),
            table(nfnl::NFPROTO_IPV6, &["input", "output"], true),
        ];
        if !devices.is_empty() {
            tables.push(table(nfnl::NFPROTO_NETDEV, &["egress"], false));
        }
        Some(Manifest { tables })
    }

    fn forget(&mut self) {
        self.built = None;
        self.written.clear();
    }

    async fn remove(&mut self) -> Result<()> {
        validate_table_name(&self.table)?;
        self.built = None;
        self.written.clear();
        let t = &self.table;
        let script = format!(
            "add table arp {t}\ndelete table arp {t}\nadd table ip6 {t}\ndelete table ip6 {t}\n\
             add table netdev {t}\ndelete table netdev {t}\n"
        );
        self.nft.transaction("delete fence", &script).await
    }
}

fn wall_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Milliseconds, rounded up so that an element never ends before its absolute end does.
fn ms_ceil(d: Duration) -> u64 {
    let ms = d.as_millis();
    let ms = if Duration::from_millis(ms as u64) < d {
        ms + 1
    } else {
        ms
    };
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_lease_span_starts_a_second_early_and_ends_at_the_lease_end(
            now in 1_700_000_000_000_000_000u64..1_900_000_000_000_000_000,
            ns in 1u64..2_000_000_000,
        ) {
            let end = now + ns;
            prop_assert_eq!(span(now, end), Some((now - 1_000_000_000, end)));
        }
    }

    #[test]
    fn a_lease_span_that_would_be_empty_is_none() {
        let now = 1_800_000_000_123_456_789u64;
        assert_eq!(span(now, now - 1_000_000_000), None);
        assert_eq!(span(now, 0), None);
        // Near the epoch the start saturates at zero.
        assert_eq!(span(5, 10), Some((0, 10)));
    }

    #[test]
    fn the_script_fences_every_managed_address_and_the_egress_devices() {
        let managed: BTreeSet<IpAddr> = ["198.18.0.50", "fd00::50"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let devices: BTreeSet<String> = ["eth1".to_string()].into_iter().collect();
        let s = script("egressd", &managed, &devices);
        for family in ["arp", "netdev"] {
            let element = format!(
                "add element {family} egressd managed {{ 198.18.0.50 : jump fence_c6120032 }}"
            );
            assert!(s.contains(&element), "{s}");
        }
        assert!(
            s.contains("set lease_c6120032 { typeof meta time; flags interval,timeout; }"),
            "{s}"
        );
        assert!(s.contains("meta time != @lease_c6120032 drop"), "{s}");
        let v6 = "fd000000000000000000000000000050";
        assert!(
            s.contains(&format!(
                "add element ip6 egressd managed {{ 0x{v6} : jump fence_{v6} }}"
            )),
            "{s}"
        );
        assert_eq!(
            lease_set("fd00::50".parse().unwrap()),
            format!("lease_{v6}")
        );
        assert!(s.contains("devices = { \"eth1\" }"), "{s}");
        let none = script("egressd", &managed, &BTreeSet::new());
        assert!(!none.contains("table netdev egressd {"), "{none}");
        assert!(none.contains("delete table netdev egressd"), "{none}");
    }

    #[test]
    fn timeouts_round_up() {
        assert_eq!(ms_ceil(Duration::from_micros(1500)), 2);
        assert_eq!(ms_ceil(Duration::from_millis(3)), 3);
    }
}
