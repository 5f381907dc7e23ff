//! The fence: the kernel answers for a managed address (ARP, NDP) and lets an announcement of it
//! leave only while the address holds a live lease element. The lease is the kernel's to enforce,
//! so a daemon that dies, hangs or is paused stops answering when its lease ends, whether or not
//! it ever runs again.
//!
//! Tables (`<t>` is `dataplane.nft_table`):
//!
//! ```text
//! table arp <t> {                       # ARP requests in, ARP out (the kernel's own replies)
//!   set managed { type ipv4_addr }                                       # every VIP/next hop
//!   set lease { typeof arp daddr ip . meta time; flags interval,timeout } # VIP . [start, end]
//!   chain input  { arp operation request arp daddr ip @managed
//!                  arp daddr ip . meta time != @lease drop }
//!   chain output { arp saddr ip @managed arp saddr ip . meta time != @lease drop }
//! }
//! table netdev <t> {                    # every frame that leaves the VIP interfaces, also the
//!   set managed, set lease as above     #   gratuitous ARPs egressd sends from a packet socket,
//!   chain egress { type filter hook egress devices = { <interfaces> } priority 0;
//!                  ether type arp arp saddr ip @managed arp saddr ip . meta time != @lease drop }
//! }
//! table ip6 <t> {                       # neighbour solicitations in, advertisements out
//!   set managed { typeof @th,64,128 }   # (the target address: bytes 8..23 of the message)
//!   set lease { typeof @th,64,128 . meta time; flags interval,timeout }
//!   chain input  { icmpv6 type nd-neighbor-solicit @th,64,128 @managed
//!                  @th,64,128 . meta time != @lease drop }
//!   chain output { icmpv6 type nd-neighbor-advert  @th,64,128 @managed
//!                  @th,64,128 . meta time != @lease drop }
//! }
//! ```
//!
//! A lease element covers a wall-clock interval (`meta time`, CLOCK_REALTIME) that ends at the
//! lease's end (see [`span`] for its start), and also carries a timeout of the lease's remaining
//! length. The absolute end means a daemon paused between computing an element and writing it
//! cannot extend the lease by the pause; the timeout means a wall clock stepped backwards cannot
//! either. Either bound ends the answer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::nfnl::{self, Batch, Data, Element, Op, Stamped};
use super::nft::validate_table_name;
use super::runner::NftRunner;
use super::watch::{Count, Manifest, TableSpec};
use super::{Error, Result};
use crate::lease::Time;

pub const MANAGED: &str = "managed";
pub const LEASE: &str = "lease";

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
    let mut s = format!(
        "add table arp {t}\n\
         delete table arp {t}\n\
         table arp {t} {{\n\
         \tset {MANAGED} {{ type ipv4_addr; }}\n\
         \tset {LEASE} {{ typeof arp daddr ip . meta time; flags interval,timeout; }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\tarp operation request arp daddr ip @{MANAGED} arp daddr ip . meta time != @{LEASE} drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\tarp saddr ip @{MANAGED} arp saddr ip . meta time != @{LEASE} drop\n\
         \t}}\n\
         }}\n\
         add table ip6 {t}\n\
         delete table ip6 {t}\n\
         table ip6 {t} {{\n\
         \tset {MANAGED} {{ typeof @th,64,128; }}\n\
         \tset {LEASE} {{ typeof @th,64,128 . meta time; flags interval,timeout; }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority 0; policy accept;\n\
         \t\ticmpv6 type nd-neighbor-solicit @th,64,128 @{MANAGED} @th,64,128 . meta time != @{LEASE} drop\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\ticmpv6 type nd-neighbor-advert @th,64,128 @{MANAGED} @th,64,128 . meta time != @{LEASE} drop\n\
         \t}}\n\
         }}\n\
         add table netdev {t}\n\
         delete table netdev {t}\n"
    );
    if !devices.is_empty() {
        let list = devices
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            s,
            "table netdev {t} {{\n\
             \tset {MANAGED} {{ type ipv4_addr; }}\n\
             \tset {LEASE} {{ typeof arp saddr ip . meta time; flags interval,timeout; }}\n\
             \tchain egress {{\n\
             \t\ttype filter hook egress devices = {{ {list} }} priority 0; policy accept;\n\
             \t\tether type arp arp saddr ip @{MANAGED} arp saddr ip . meta time != @{LEASE} drop\n\
             \t}}\n\
             }}\n"
        );
    }
    for ip in managed {
        match ip {
            IpAddr::V4(v4) => {
                let _ = writeln!(s, "add element arp {t} {MANAGED} {{ {v4} }}");
                if !devices.is_empty() {
                    let _ = writeln!(s, "add element netdev {t} {MANAGED} {{ {v4} }}");
                }
            }
            IpAddr::V6(v6) => {
                let _ = writeln!(
                    s,
                    "add element ip6 {t} {MANAGED} {{ 0x{:032x} }}",
                    u128::from(*v6)
                );
            }
        }
    }
    s
}

/// The wall-clock range `[start, end]` (ns since the epoch) an element's key holds.
type Span = (u64, u64);

/// The range a lease element ending at `end` covers when written at `now`: `[start, end']`
/// with `start` at least `STEP_NS` before `now` and `end'` at most `ROUND_NS` before `end`,
/// chosen so that it is the union of few prefixes (at most 12 for a lease under 1 s, instead
/// of about 30 for `[0, end]`). The kernel keeps such a concatenated range as one rule per
/// prefix and rebuilds them on every write (an active node writes every half lease): with
/// `[0, end]` that was 41 % of an idle active node's CPU.
/// A range that ends earlier is only ever safe. One that starts later than the epoch means
/// that a wall clock stepped back by more than `STEP_NS` stops the answer until the next
/// write, where `[0, end]` waited for the timeout (which ends it either way).
fn span(now: u64, end: u64) -> Span {
    /// The lease given up to leave the low bits out: about a millisecond.
    const ROUND_NS: u64 = 1 << 20;
    /// How far back the wall clock may step with the answer going on: about a second.
    const STEP_NS: u64 = 1 << 30;
    let x = end.saturating_add(1);
    let rounded = x & !(ROUND_NS - 1);
    // Past ends stay as they are (the element no longer matches anyway).
    let x = if rounded > now { rounded } else { x };
    if x <= now {
        return (0, end);
    }
    let from = now.saturating_sub(STEP_NS);
    // The smallest power of two 2^k >= x - from: [from, x) lies in at most two aligned blocks.
    let k = (64 - (x - from - 1).leading_zeros()).min(63);
    let block = (x >> k) << k;
    let start = if block <= from {
        block
    } else {
        block - (1 << k)
    };
    (start, x - 1)
}

/// The operations that delete the element `old`: re-added first (a no-op when present) so that
/// the delete cannot fail on an element that timed out meanwhile.
fn drop_steps(old: Span) -> [(Span, Op, Option<u64>); 2] {
    [
        (old, Op::Add { exclusive: false }, Some(1)),
        (old, Op::Delete, None),
    ]
}

/// Appends the operations on one address's lease elements: `(element span, op, timeout)`.
fn lease_ops(b: &mut Batch, t: &str, netdev: bool, ip: IpAddr, steps: &[(Span, Op, Option<u64>)]) {
    fn one<A: nfnl::KeyBytes>(
        b: &mut Batch,
        family: u8,
        t: &str,
        a: A,
        ((start, end), op, timeout_ms): (Span, Op, Option<u64>),
    ) {
        let element = Element::<Stamped<A>> {
            key: (Stamped(a, start), None),
            key_end: Some((Stamped(a, end), None)),
            data: Data::None,
            timeout_ms,
        };
        b.elements(op, family, t, LEASE, [element]);
    }
    for &step in steps {
        match ip {
            IpAddr::V4(a) => {
                one::<Ipv4Addr>(b, nfnl::NFPROTO_ARP, t, a, step);
                if netdev {
                    one::<Ipv4Addr>(b, nfnl::NFPROTO_NETDEV, t, a, step);
                }
            }
            IpAddr::V6(a) => one::<Ipv6Addr>(b, nfnl::NFPROTO_IPV6, t, a, step),
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
                    if !remaining.is_zero() {
                        let new = span(now_wall, wall_ns(crate::clock::wall_at(*until)));
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
        let v4 = managed.iter().filter(|a| a.is_ipv4()).count();
        let v6 = managed.len() - v4;
        let leased4 = self.written.keys().filter(|a| a.is_ipv4()).count();
        let leased6 = self.written.len() - leased4;
        let table = |family: u8, chains: &[&str], managed: usize, leased: usize| TableSpec {
            family,
            name: self.table.clone(),
            chains: chains.iter().map(|c| (c.to_string(), 1)).collect(),
            sets: [
                (MANAGED.to_string(), Count::Exactly(managed)),
                (LEASE.to_string(), Count::AtMost(leased)),
            ]
            .into_iter()
            .collect(),
        };
        let mut tables = vec![
            table(nfnl::NFPROTO_ARP, &["input", "output"], v4, leased4),
            table(nfnl::NFPROTO_IPV6, &["input", "output"], v6, leased6),
        ];
        if !devices.is_empty() {
            tables.push(table(nfnl::NFPROTO_NETDEV, &["egress"], v4, leased4));
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

    /// How many prefixes the kernel splits `[lo, hi]` into.
    fn prefixes(mut lo: u64, hi: u64) -> u32 {
        let mut n = 0;
        loop {
            // The largest aligned block starting at `lo` that ends by `hi`.
            let mut size: u128 = if lo == 0 {
                1 << 64
            } else {
                1 << lo.trailing_zeros()
            };
            while u128::from(lo) + size - 1 > u128::from(hi) {
                size >>= 1;
            }
            n += 1;
            let next = u128::from(lo) + size;
            if next > u128::from(hi) {
                return n;
            }
            lo = next as u64;
        }
    }

    proptest! {
        #[test]
        fn a_lease_span_starts_a_second_early_ends_at_most_a_millisecond_early_and_is_few_prefixes(
            now in 1_700_000_000_000_000_000u64..1_900_000_000_000_000_000,
            ms in 2u64..1000,
        ) {
            let end = now + ms * 1_000_000;
            let (start, last) = span(now, end);
            prop_assert!(start + (1 << 30) <= now, "{start} not a second before {now}");
            prop_assert!(last <= end && last >= end - (1 << 20), "{last} vs {end}");
            prop_assert!(prefixes(start, last) <= 12, "{}", prefixes(start, last));
        }
    }

    #[test]
    fn a_lease_span_from_the_epoch_was_many_prefixes() {
        // What the kernel kept per element before: [0, end].
        let end = 1_800_000_000_123_456_789u64;
        assert!(prefixes(0, end) > 20, "{}", prefixes(0, end));
        let (start, last) = span(end - 150_000_000, end);
        assert!(prefixes(start, last) <= 12);
        // An end already past is written as it is (it matches no future time either way).
        assert_eq!(span(end + 1, end), (0, end));
    }

    #[test]
    fn the_script_fences_every_managed_address_and_the_egress_devices() {
        let managed: BTreeSet<IpAddr> = ["198.18.0.50", "fd00::50"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let devices: BTreeSet<String> = ["eth1".to_string()].into_iter().collect();
        let s = script("egressd", &managed, &devices);
        assert!(
            s.contains("add element arp egressd managed { 198.18.0.50 }"),
            "{s}"
        );
        assert!(
            s.contains("add element netdev egressd managed { 198.18.0.50 }"),
            "{s}"
        );
        assert!(s.contains("0xfd000000000000000000000000000050"), "{s}");
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
