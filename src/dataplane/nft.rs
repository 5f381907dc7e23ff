//! egressd's nftables tables: structure through the `nft` command (native syntax), elements
//! through hand-built netlink batches on a persistent socket (`nfnl.rs`).
//!
//! The SNAT table (family `inet`, name from the config, default `egressd`), generation `G`:
//!
//! ```text
//! table inet egressd {
//!   counter seen { }                      # new connections classified
//!   counter not_snated { }                # ... that no policy selected
//!   counter dropped { }                   # packets of a gateway no node can take here: dropped
//!   counter redirected { }                # packets of a gateway active elsewhere: redirected
//!   map sel4_G { type ipv4_addr . ipv4_addr : verdict; flags interval; }   # cell → jump c4_G_K
//!   set m4_G_K_<id> { type ipv4_addr . ipv4_addr; flags interval; }   # the cell's pieces of <id>
//!   chain c4_G_K { ip saddr . ip daddr @m4_G_K_<id> goto g4_<id> }    # a rule per gateway
//!   ... one chain per cell, one set per gateway of the cell, and the same for IPv6
//!   (sel6_G, m6_G_K_<id>, c6_G_K)
//!   chain g4_<id> { meta mark set meta mark and 0xffff or 0x00010000 accept }  # active here
//!   chain g4_<id2> { iifname "egressd0" counter name "dropped" drop    # active on the member
//!                    meta mark set ... or 0x80020000 ct mark set ct mark or 0x01000000
//!                    counter name "redirected" accept }  # slot 2
//!   chain g4_<id3> { counter name "dropped" drop }   # active nowhere, or this node has no lease
//!   chain snat_by_mark { meta nfproto ipv4 snat ip to meta mark and 0xffff0000 map { 0x00010000 : 203.0.113.50 } }
//!   chain prerouting_G {
//!     type filter hook prerouting priority mangle; policy accept;
//!     fib daddr type { local, broadcast, multicast } accept   # not a client's egress traffic
//!     ct state new counter name "seen"      # (ct: see below)
//!     ip saddr . ip daddr vmap @sel4_G
//!     ip6 saddr . ip6 daddr vmap @sel6_G
//!     ct state new counter name "not_snated"
//!   }
//!   chain postrouting_G { type nat hook postrouting priority srcnat; policy accept;
//!     fib saddr type local accept; jump snat_by_mark }
//!   chain overlay_G { type filter hook forward priority mangle; policy accept;
//!     ct mark and 0x01000000 != 0 meta mark and 0xffff0000 != 0 meta mark and 0x80000000 == 0
//!       ct status and snat == 0 counter name "dropped" drop   # redirected, now active here
//!     oifname "egressd0" tcp flags syn tcp option maxseg size set rt mtu
//!     oifname "egressd0" meta mark set meta mark and 0xffff }
//!   # with dataplane.tcp_on_policy_change = "reset" (`conntrack.rs`): TCP connections the
//!   # conntrack sweeper ended, answered with a reset; not generational, kept by replaces
//!   set ended4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; }
//!   set ended6 { ... }
//!   chain ended { type filter hook forward priority filter; policy accept; ... reject with tcp reset }
//! }
//! ```
//!
//! The classification (which gateway's policy wins a packet, `crate::policy`) is the same on
//! every node and runs before the routing decision, on every packet. Which gateways are active
//! here, and where the others are active, lives only in the gateway chains (`g4_<id>`,
//! `g6_<id>`, `<id>` from the gateway's name) and the SNAT chain, which are not generational:
//! they say it with the packet mark (bits `overlay::MARK_MASK`). An active gateway's mark is its
//! rank among the gateways active here, which `snat_by_mark` maps to its source address; a
//! standby's is the redirect bit with the active member's overlay slot, which an `ip rule` sends
//! into the overlay to that member (`overlay.rs`). A takeover, a release or a failover elsewhere
//! rewrites a few small chains in one `nft` transaction, whatever the number of policies.
//!
//! The cells (`shard.rs`) tile the (source, destination) plane; the selector map sends a packet
//! to its cell's chain, whose sets hold the elements (or the pieces of elements) of that cell,
//! one set per gateway. Why cells: the kernel's set backend for concatenated ranges deletes an
//! element in time linear in its set's size (~5 µs per element here), so one change in a single
//! 100 000-element map cost ~90 ms; with cells of at most a few hundred elements it costs a few
//! milliseconds. Lookups stay a map lookup and one set lookup per gateway of the cell (usually
//! one) whatever the number of policies. Why sets, not a verdict map per cell: the kernel
//! re-validates every jump and goto element reachable from a base chain on each commit that
//! adds one, which at 300 000 elements cost every delta that added a piece ~16 ms. A delta that
//! puts a piece of a gateway into a cell without a set for it first adds the set and its rule
//! (empty, so nothing changes until the elements' batch commits).
//!
//! A packet no element matches (no policy, or an excluded destination) falls through untouched.
//! A node that is not active for a gateway never forwards its policies' traffic with the
//! client's own address: it redirects it to the active node, or, when no node is active, this
//! node has no lease (it cannot know who is), or the packet came through the overlay already
//! (two nodes with stale views must not bounce it), drops it. The nat chain sees only the first
//! packet of each connection; connections this node SNATed while it held the gateway keep their
//! translation (conntrack) until they end. The `ct` in the classification chain is what turns
//! connection tracking on in the namespace (a nat chain alone does not; only a `snat` rule or a
//! `ct` expression does): without it, a node holding no gateway never ran its nat chain at all.
//!
//! Changes:
//! - **delta** (the usual case): the element pieces that differ, deleted and added in one
//!   netlink batch = one kernel transaction, whatever cells they touch.
//! - **full replace** (first apply, after any error, or when a delta would overfill a cell or
//!   cost more than a reload): (1) `nft` creates generation G+1's maps and chains, unreferenced;
//!   (2) one netlink batch loads all their elements; (3) one `nft` transaction adds G+1's base
//!   chain and deletes every other chain and map of the table (generation G, or whatever a
//!   crashed or older egressd left). Packets see the switch in (3) only, atomically; a failure
//!   in (1)–(3) leaves the old generation in force, and the new one is deleted again.
//!
//! Every nft script and netlink batch is one kernel transaction: a rejected element leaves the
//! previous state untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Display, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use serde_json::Value;

use super::conntrack::{ENDED_CHAIN, ENDED_SET4, ENDED_SET6};
use super::nfnl::{self, Batch, Data, Element, KeyBytes, Op};
use super::overlay;
use super::runner::NftRunner;
use super::shard::{Partition, Rect};
use super::watch::{Count, Manifest, TableSpec};
use super::{Error, Firewall, Result};
use super::{Role, Roles};
use crate::policy::{FamilyDiff, GwId, SnatElement, SnatMap};

/// Named counter: new connections through the chain.
pub const COUNTER_SEEN: &str = "seen";
/// Named counter: new connections no element matched.
pub const COUNTER_NOT_SNATED: &str = "not_snated";
/// Named counter: packets of a gateway not active here, dropped (no active node, this node
/// cut off from the leader, or they arrived redirected already).
pub const COUNTER_DROPPED: &str = "dropped";
/// Named counter: packets of a gateway active elsewhere, redirected to the active node.
pub const COUNTER_REDIRECTED: &str = "redirected";
/// The chain that SNATs by the mark the gateway chains set (not generational).
const SNAT_CHAIN: &str = "snat_by_mark";

/// Elements per cell when the cells are (re)computed.
pub const CELL_TARGET: usize = 512;
/// A delta that would leave a cell with more elements than this is done as a full replace
/// instead (which recomputes the cells): deleting from a cell costs ~5 µs per element in it.
pub const CELL_MAX: usize = 2048;
/// A full replace costs about as much as this many element deletions on top of its elements
/// (three nft runs, ~50 ms, against ~5 µs per element in a deleted element's cell).
const FULL_REPLACE_FIXED: usize = 10_000;

/// An address family's address type as nft and the kernel see it.
trait NftAddr: Copy + Ord + Display + FromStr + KeyBytes + Send + Sync + 'static {
    /// "4" or "6": the suffix of the family's map and chain names.
    const V: &'static str;
    /// `ip` or `ip6`.
    const PROTO: &'static str;
    /// `ipv4_addr` or `ipv6_addr`.
    const TYPE: &'static str;
    const MAX: u128;
    fn to_u128(self) -> u128;
    fn from_u128(v: u128) -> Self;

    /// The last address of `self/len`.
    fn prefix_last(self, len: u32) -> Option<Self> {
        let bits = Self::MAX.count_ones();
        if len > bits {
            return None;
        }
        let host = Self::MAX.checked_shr(len).unwrap_or(0);
        Some(Self::from_u128(self.to_u128() | host))
    }
}

impl NftAddr for Ipv4Addr {
    const V: &'static str = "4";
    const PROTO: &'static str = "ip";
    const TYPE: &'static str = "ipv4_addr";
    const MAX: u128 = u32::MAX as u128;
    fn to_u128(self) -> u128 {
        u128::from(u32::from(self))
    }
    fn from_u128(v: u128) -> Self {
        Ipv4Addr::from(v as u32)
    }
}

impl NftAddr for Ipv6Addr {
    const V: &'static str = "6";
    const PROTO: &'static str = "ip6";
    const TYPE: &'static str = "ipv6_addr";
    const MAX: u128 = u128::MAX;
    fn to_u128(self) -> u128 {
        u128::from(self)
    }
    fn from_u128(v: u128) -> Self {
        Ipv6Addr::from(v)
    }
}

fn rect<A: NftAddr>(e: &SnatElement<A>) -> Rect {
    (
        (e.src.0.to_u128(), e.src.1.to_u128()),
        (e.dst.0.to_u128(), e.dst.1.to_u128()),
    )
}

/// The set of cell `cell`'s pieces that go to gateway `gw`.
fn set_name<A: NftAddr>(generation: u64, cell: usize, gw: GwId) -> String {
    format!("m{}_{generation}_{cell}_{gw}", A::V)
}

fn chain_name<A: NftAddr>(generation: u64, cell: usize) -> String {
    format!("c{}_{generation}_{cell}", A::V)
}

fn selector_name<A: NftAddr>(generation: u64) -> String {
    format!("sel{}_{generation}", A::V)
}

fn base_chain_name(generation: u64) -> String {
    format!("postrouting_{generation}")
}

fn prerouting_name(generation: u64) -> String {
    format!("prerouting_{generation}")
}

fn overlay_chain_name(generation: u64) -> String {
    format!("overlay_{generation}")
}

/// The generation a name of ours carries (`m4_7_12` → 7), if it is one of ours.
fn generation_of(name: &str) -> Option<u64> {
    let mut parts = name.split('_');
    let kind = parts.next()?;
    let known = [
        "postrouting",
        "prerouting",
        "overlay",
        "sel4",
        "sel6",
        "m4",
        "m6",
        "c4",
        "c6",
    ];
    if !known.contains(&kind) {
        return None;
    }
    parts.next()?.parse().ok()
}

/// One address family as installed: its cells, and per cell the gateways it has a set for with
/// the number of pieces in each (the elements are `Installed::map`'s).
#[derive(Debug, Clone)]
struct Family<A> {
    partition: Partition,
    sets: Vec<BTreeMap<GwId, usize>>,
    family: std::marker::PhantomData<A>,
}

impl<A: NftAddr> Family<A> {
    /// Cells computed for `elements` (sorted, as `SnatMap` keeps them).
    fn build(elements: &[SnatElement<A>]) -> Family<A> {
        let mut rects: Vec<Rect> = elements.iter().map(rect).collect();
        rects.sort_unstable();
        let partition = if rects.is_empty() {
            Partition::whole(A::MAX)
        } else {
            Partition::build(&rects, CELL_TARGET, A::MAX)
        };
        let mut sets: Vec<BTreeMap<GwId, usize>> = vec![BTreeMap::new(); partition.len()];
        for e in elements {
            partition.pieces(rect(e), |c, _| *sets[c].entry(e.to).or_default() += 1);
        }
        Family {
            partition,
            sets,
            family: std::marker::PhantomData,
        }
    }

    /// Generation `g`'s cell chains.
    fn chains(&self, g: u64) -> impl Iterator<Item = String> + '_ {
        (0..self.sets.len()).map(move |c| chain_name::<A>(g, c))
    }

    /// Generation `g`'s cell sets.
    fn set_names(&self, g: u64) -> impl Iterator<Item = String> + '_ {
        self.sets
            .iter()
            .enumerate()
            .flat_map(move |(c, gws)| gws.keys().map(move |gw| set_name::<A>(g, c, *gw)))
    }

    /// The pieces of `elements`, grouped by cell.
    fn pieces<'e>(
        &self,
        elements: impl IntoIterator<Item = &'e SnatElement<A>>,
    ) -> BTreeMap<usize, Vec<(Rect, GwId)>> {
        let mut out: BTreeMap<usize, Vec<(Rect, GwId)>> = BTreeMap::new();
        for e in elements {
            self.partition
                .pieces(rect(e), |c, r| out.entry(c).or_default().push((r, e.to)));
        }
        out
    }
}

/// Elements per kernel transaction when a full replace loads a new generation's maps.
/// Nothing references those maps until the switch, so the load needs no atomicity of its own.
/// Parts keep nftables' commit lock, which the fence writes need too, from being held for a
/// whole 100 000-element load (~0.7 s here), and bound how long one CPU stays in the kernel: on
/// a kernel without preemption (`PREEMPT_NONE`, as this machine's) a part's insert into the
/// interval maps runs to its end whatever else waits for that CPU. With parts of 8 192, three
/// daemons loading 100 000 CIDRs at once on two cores starved their own RPCs (appends not
/// answered within 37.5 ms, reports late) and the leader failed the active node over at start
/// (2 in 1 trial); with 2 048, none (1 trial, then 3 trials of every scale-bench row), and the
/// load took no longer.
const LOAD_PART: usize = 2048;

type Pieces = BTreeMap<usize, Vec<(Rect, GwId)>>;

/// `pieces4` and `pieces6` (per cell) cut into parts of about [`LOAD_PART`] elements, whole
/// cells each; at least one part (the selectors go with the first).
fn load_parts(pieces4: &Pieces, pieces6: &Pieces) -> Vec<(Pieces, Pieces)> {
    let mut parts: Vec<(Pieces, Pieces)> = vec![Default::default()];
    let mut size = 0;
    for (v6, pieces) in [(false, pieces4), (true, pieces6)] {
        for (cell, list) in pieces {
            if size >= LOAD_PART {
                parts.push(Default::default());
                size = 0;
            }
            if let Some(part) = parts.last_mut() {
                let to = if v6 { &mut part.1 } else { &mut part.0 };
                to.insert(*cell, list.clone());
                size += list.len();
            }
        }
    }
    parts
}

/// Adds `pieces` (per cell) of generation `g` to `batch`.
fn add_pieces<A: NftAddr>(
    batch: &mut Batch,
    op: Op,
    table: &str,
    generation: u64,
    pieces: &BTreeMap<usize, Vec<(Rect, GwId)>>,
) {
    for (cell, list) in pieces {
        for (gw, rects) in by_gateway(list) {
            batch.elements(
                op,
                nfnl::NFPROTO_INET,
                table,
                &set_name::<A>(generation, *cell, gw),
                rects.into_iter().map(|((s0, s1), (d0, d1))| Element {
                    key: (A::from_u128(s0), Some(A::from_u128(d0))),
                    key_end: Some((A::from_u128(s1), Some(A::from_u128(d1)))),
                    data: Data::None,
                    timeout_ms: None,
                    interval_end: false,
                }),
            );
        }
    }
}

/// A cell's pieces grouped by the gateway they go to.
fn by_gateway(list: &[(Rect, GwId)]) -> BTreeMap<GwId, Vec<Rect>> {
    let mut out: BTreeMap<GwId, Vec<Rect>> = BTreeMap::new();
    for (r, gw) in list {
        out.entry(*gw).or_default().push(*r);
    }
    out
}

/// The node-wide count of every drop of a gateway chain.
const DROP_RULE_COUNT: &str = "counter name \"dropped\"";

/// What a gateway chain did with a packet, counted per gateway (named counters
/// `<action>_<gateway id>`, read by `gateway_counters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Marked for SNAT here (every packet of the connections this node translates).
    Snated,
    /// Redirected to the active node.
    Redirected,
    /// Dropped: no node can take it (none active, this node has no lease, or the active one is
    /// not reachable through the overlay).
    Dropped,
    /// Dropped: it came through the overlay to a node that is not active (stale views).
    Looped,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::Snated,
        Action::Redirected,
        Action::Dropped,
        Action::Looped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Snated => "snated",
            Action::Redirected => "redirected",
            Action::Dropped => "dropped",
            Action::Looped => "looped",
        }
    }
}

/// The named counter of `action` for gateway `id`.
fn gw_counter(action: Action, id: GwId) -> String {
    format!("{}_{id}", action.name())
}

/// Packets and bytes per gateway and action since the counters were made.
pub type GatewayCounters = BTreeMap<GwId, BTreeMap<Action, (u64, u64)>>;

/// Adds the per-gateway counters of `id` to `script` (`add` leaves existing ones as they are).
fn add_gw_counters(script: &mut String, t: &str, id: GwId) {
    for a in Action::ALL {
        let _ = writeln!(script, "add counter inet {t} {}", gw_counter(a, id));
    }
}

/// The mark an active gateway's chain sets for the SNAT chain: its rank among the gateways
/// active here, in the bits `overlay::MARK_MASK` (the redirect bit clear).
fn snat_mark(rank: usize) -> u32 {
    (rank as u32 + 1) << 16
}

/// Sets the mark bits egressd owns to `mark`, keeping the others'.
fn set_mark(mark: u32) -> String {
    format!(
        "meta mark set meta mark and {:#010x} or {mark:#010x}",
        !overlay::MARK_MASK
    )
}

/// The rules (one per line) of every gateway chain of `ids` and of the SNAT chain, for `roles`
/// (a gateway without a role drops). An active gateway's chains mark its packets with its rank,
/// which the SNAT chain maps to its address; a standby's redirect to the active node's slot
/// unless the packet came through the overlay already (never redirected twice: with stale views
/// two nodes could otherwise bounce it), else drop. All of it is computed from one `roles`, so
/// that a rank in a gateway chain always means the same gateway in the SNAT chain: every
/// transaction writes every chain whose rules change.
fn role_texts(roles: &Roles, ids: &BTreeSet<GwId>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let active: BTreeMap<GwId, usize> = roles
        .iter()
        .filter(|(_, r)| r.v4.is_some() || r.v6.is_some())
        .enumerate()
        .map(|(rank, (id, _))| (*id, rank))
        .collect();
    let standby = |id: GwId, role: &Role| {
        let drop = format!(
            "{DROP_RULE_COUNT} counter name \"{}\" drop",
            gw_counter(Action::Dropped, id)
        );
        match role.redirect {
            Some(slot) => format!(
                "iifname \"{}\" {DROP_RULE_COUNT} counter name \"{}\" drop\n\
                 {} ct mark set ct mark or {:#010x} counter name \"{COUNTER_REDIRECTED}\" \
                 counter name \"{}\" accept",
                overlay::DEVICE,
                gw_counter(Action::Looped, id),
                set_mark(overlay::redirect_mark(slot)),
                overlay::CT_REDIRECTED,
                gw_counter(Action::Redirected, id)
            ),
            None => drop,
        }
    };
    let mut snat4 = Vec::new();
    let mut snat6 = Vec::new();
    for id in ids {
        let role = roles.get(id).copied().unwrap_or_default();
        let rank = active.get(id).copied();
        let mark = |has: bool| match rank {
            // `accept` ends the classification (the base chain's last rule counts what no
            // policy selected); the nat hook still comes.
            Some(r) if has => format!(
                "{} counter name \"{}\" accept",
                set_mark(snat_mark(r)),
                gw_counter(Action::Snated, *id)
            ),
            // Active here without an address of this family: no node translates it.
            Some(_) => standby(*id, &Role::default()),
            None => standby(*id, &role),
        };
        out.insert(gw_chain::<Ipv4Addr>(*id), mark(role.v4.is_some()));
        out.insert(gw_chain::<Ipv6Addr>(*id), mark(role.v6.is_some()));
        if let Some(r) = rank {
            if let Some(a) = role.v4 {
                snat4.push(format!("{:#010x} : {a}", snat_mark(r)));
            }
            if let Some(a) = role.v6 {
                snat6.push(format!("{:#010x} : {a}", snat_mark(r)));
            }
        }
    }
    let mut snat = Vec::new();
    let mask = overlay::MARK_MASK;
    if !snat4.is_empty() {
        snat.push(format!(
            "meta nfproto ipv4 snat ip to meta mark and {mask:#010x} map {{ {} }}",
            snat4.join(", ")
        ));
    }
    if !snat6.is_empty() {
        snat.push(format!(
            "meta nfproto ipv6 snat ip6 to meta mark and {mask:#010x} map {{ {} }}",
            snat6.join(", ")
        ));
    }
    out.insert(SNAT_CHAIN.to_owned(), snat.join("\n"));
    out
}

/// The script that gives `chain` exactly `rules` (one per line).
fn chain_script(s: &mut String, t: &str, chain: &str, rules: &str) {
    let _ = writeln!(s, "flush chain inet {t} {chain}");
    for r in rules.lines() {
        let _ = writeln!(s, "add rule inet {t} {chain} {r}");
    }
}

/// The chain of gateway `id` for family `A`: `g4_<id>` or `g6_<id>`.
fn gw_chain<A: NftAddr>(id: GwId) -> String {
    format!("g{}_{id}", A::V)
}

/// The gateway id a chain name of ours carries (`g4_00112233aabbccdd`), if it is one.
fn gw_of(name: &str) -> Option<GwId> {
    gw_id(
        name.strip_prefix("g4_")
            .or_else(|| name.strip_prefix("g6_"))?,
    )
}

/// A gateway id as our names write it (16 hex digits).
fn gw_id(hex: &str) -> Option<GwId> {
    (hex.len() == 16)
        .then(|| u64::from_str_radix(hex, 16).ok().map(GwId))
        .flatten()
}

/// Adds the selector elements of `partition` (cell rectangle → jump to the cell's chain).
fn add_selector<A: NftAddr>(
    batch: &mut Batch,
    table: &str,
    generation: u64,
    partition: &Partition,
) {
    let chains: Vec<(Rect, String)> = partition
        .cells()
        .map(|(c, r)| (r, chain_name::<A>(generation, c)))
        .collect();
    batch.elements(
        Op::Add { exclusive: true },
        nfnl::NFPROTO_INET,
        table,
        &selector_name::<A>(generation),
        chains
            .iter()
            .map(|(((s0, s1), (d0, d1)), chain)| Element::<A> {
                key: (A::from_u128(*s0), Some(A::from_u128(*d0))),
                key_end: Some((A::from_u128(*s1), Some(A::from_u128(*d1)))),
                data: Data::Jump(chain),
                timeout_ms: None,
                interval_end: false,
            }),
    );
}

/// Up to this many cell map elements, a full replace is one `nft` transaction.
const ONE_SCRIPT_MAX: usize = 2048;

/// Generation `g`'s selector and cell map elements of one family, in nft's syntax.
fn elements_script<A: NftAddr>(
    s: &mut String,
    t: &str,
    g: u64,
    partition: &Partition,
    pieces: &BTreeMap<usize, Vec<(Rect, GwId)>>,
) {
    let key = |((s0, s1), (d0, d1)): Rect| {
        format!(
            "{} . {}",
            Range((A::from_u128(s0), A::from_u128(s1))),
            Range((A::from_u128(d0), A::from_u128(d1)))
        )
    };
    let mut add = |map: &str, elements: Vec<String>| {
        for part in elements.chunks(256) {
            let _ = writeln!(s, "add element inet {t} {map} {{ {} }}", part.join(", "));
        }
    };
    add(
        &selector_name::<A>(g),
        partition
            .cells()
            .map(|(c, r)| format!("{} : jump {}", key(r), chain_name::<A>(g, c)))
            .collect(),
    );
    for (cell, list) in pieces {
        for (gw, rects) in by_gateway(list) {
            add(
                &set_name::<A>(g, *cell, gw),
                rects.into_iter().map(key).collect(),
            );
        }
    }
}

/// Refuses a range whose end is before its start (the kernel would reject it with a less
/// helpful message), naming the element as nft would print it.
fn validate<A: NftAddr>(elements: &[SnatElement<A>]) -> Result<()> {
    for e in elements {
        if e.src.0 > e.src.1 || e.dst.0 > e.dst.1 {
            return Err(Error::Nft {
                op: "check elements",
                detail: format!(
                    "Range has zero or negative size: {} . {} : {}",
                    Range(e.src),
                    Range(e.dst),
                    e.to
                ),
            });
        }
    }
    Ok(())
}

/// Refuses a map whose elements overlap, naming two of them. The kernel refuses an overlap
/// within one set, but a cell holds one set per gateway: elements of two gateways that overlap
/// would both go in, and the first rule would win. `map` is sorted, and `compile` makes the
/// source ranges of any two elements equal or disjoint, so it is enough that neighbouring
/// elements in `map` are apart (`pairs`: all of them, or those around a delta's additions):
/// with the same sources, destinations in order; else sources in order.
fn disjoint<'a, A: NftAddr + 'a>(
    mut pairs: impl Iterator<Item = (&'a SnatElement<A>, &'a SnatElement<A>)>,
) -> Result<()> {
    let apart = |a: &SnatElement<A>, b: &SnatElement<A>| {
        if a.src == b.src {
            a.dst.1 < b.dst.0
        } else {
            a.src.1 < b.src.0
        }
    };
    match pairs.find(|(a, b)| !apart(a, b)) {
        None => Ok(()),
        Some((a, b)) => Err(Error::Nft {
            op: "check elements",
            detail: format!(
                "overlapping elements: {} . {} : {} and {} . {} : {}",
                Range(a.src),
                Range(a.dst),
                a.to,
                Range(b.src),
                Range(b.dst),
                b.to
            ),
        }),
    }
}

/// The pairs of neighbours in `map` (sorted) that each element of `added` (in `map`) is in.
fn neighbours<'a, A: NftAddr>(
    map: &'a [SnatElement<A>],
    added: &'a [SnatElement<A>],
) -> impl Iterator<Item = (&'a SnatElement<A>, &'a SnatElement<A>)> {
    added
        .iter()
        .filter_map(|e| map.binary_search(e).ok())
        .flat_map(move |i| [i.checked_sub(1).map(|p| p..i + 1), Some(i..i + 2)])
        .flatten()
        .filter_map(move |r| match map.get(r) {
            Some([a, b]) => Some((a, b)),
            _ => None,
        })
}

/// What this struct last installed successfully; `None` in `NftFirewall` means "unknown", so the
/// next apply replaces everything.
#[derive(Debug, Clone)]
struct Installed {
    generation: u64,
    v4: Family<Ipv4Addr>,
    v6: Family<Ipv6Addr>,
    /// The map installed (shared with the caller: an unchanged map costs no comparison).
    map: Arc<SnatMap>,
}

/// The two named counters (new connections, i.e. packets through the nat chain).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NftCounters {
    /// New connections (IPv4 and IPv6) that went through egressd's postrouting chain.
    pub seen: u64,
    /// Of those, the ones no map element matched.
    pub not_snated: u64,
    /// Packets of a gateway not active here, dropped.
    pub dropped: u64,
    /// Packets of a gateway active elsewhere, redirected to the active node.
    pub redirected: u64,
}

impl NftCounters {
    /// New connections SNATed here: those a policy selected less the dropped and redirected
    /// packets. Exact on the active node (it redirects nothing, and drops only the first packet
    /// of a connection); a standby's drops and redirects count every packet, so there it
    /// underestimates (saturating at 0).
    pub fn snated(&self) -> u64 {
        self.seen
            .saturating_sub(self.not_snated)
            .saturating_sub(self.dropped)
            .saturating_sub(self.redirected)
    }
}

/// A chain or set of egressd's table, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Object {
    /// `chain`, `set` or `map`.
    kind: &'static str,
    name: String,
}

/// The nftables [`Firewall`]: owns the `inet` table of its name and nothing else.
#[derive(Debug)]
pub struct NftFirewall {
    table: String,
    nft: NftRunner,
    installed: Option<Installed>,
    next_generation: u64,
    full_replaces: u64,
    /// Gateways whose chains exist, when known.
    chains: Option<BTreeSet<GwId>>,
    /// The rules the gateway chains and the SNAT chain hold (see `role_texts`), when known.
    written: Option<BTreeMap<String, String>>,
    /// The table holds the sets of ended TCP connections and the chain that resets their
    /// packets (`dataplane.tcp_on_policy_change = "reset"`, see `conntrack.rs`).
    ended: bool,
}

/// Checks that `name` can be written into an nft script as a table name as is: a letter, then
/// letters, digits or underscores, at most 64 characters. Config validation can call this so
/// that a bad name is refused at startup rather than at the first apply.
pub fn validate_table_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::Nft {
            op: "validate table name",
            detail: format!(
                "{name:?} is not a valid table name: expected a letter followed by up to 63 \
                 letters, digits or underscores"
            ),
        })
    }
}

/// Whether nft's native syntax can name `name` as is (it has no quoting for chain names).
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl NftFirewall {
    /// The daemon's firewall: runs `nft` from `PATH` and opens its netlink socket in this
    /// process's network namespace; table `inet <table>`.
    pub fn new(table: &str) -> NftFirewall {
        NftFirewall::build(table, NftRunner::new())
    }

    /// The same inside network namespace `netns` (as `ip netns` names it). For tests and
    /// benchmarks.
    pub fn in_netns(table: &str, netns: &str) -> NftFirewall {
        NftFirewall::build(table, NftRunner::in_netns(netns))
    }

    fn build(table: &str, nft: NftRunner) -> NftFirewall {
        NftFirewall {
            table: table.to_owned(),
            nft,
            installed: None,
            next_generation: 1,
            full_replaces: 0,
            chains: None,
            written: None,
            ended: false,
        }
    }

    /// With `on`, the table also answers the packets of the TCP connections the conntrack
    /// sweeper ended with a reset.
    pub fn with_ended(mut self, on: bool) -> NftFirewall {
        self.ended = on;
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// How many kernel transactions (nft scripts and netlink batches) this struct has sent,
    /// successful or not. A delta is one; a full replace is three.
    pub fn transactions(&self) -> u64 {
        self.nft.transactions()
    }

    /// How many full replaces `apply` has started.
    pub fn full_replaces(&self) -> u64 {
        self.full_replaces
    }

    /// The number of cells of the installed IPv4 and IPv6 maps, when known.
    pub fn cells(&self) -> Option<(usize, usize)> {
        self.installed
            .as_ref()
            .map(|i| (i.v4.partition.len(), i.v6.partition.len()))
    }

    /// The chains, sets and maps of egressd's inet table (empty when there is no table).
    async fn list_objects(&self) -> Result<Vec<Object>> {
        let objects = self
            .nft
            .list_objects("list objects", nfnl::NFPROTO_INET, &self.table)
            .await?;
        Ok(objects
            .into_iter()
            .map(|(kind, name)| Object { kind, name })
            .collect())
    }

    /// Replaces everything in the inet table with generation `G+1` holding exactly `map`: in
    /// one transaction when the map is small, else in the three steps of the module
    /// documentation. `with_create` goes into the first (or only) transaction.
    async fn full_replace(&mut self, map: &Arc<SnatMap>, with_create: &str) -> Result<()> {
        self.installed = None;
        self.full_replaces += 1;
        validate(&map.v4)?;
        validate(&map.v6)?;
        disjoint(map.v4.windows(2).map(|w| (&w[0], &w[1])))?;
        disjoint(map.v6.windows(2).map(|w| (&w[0], &w[1])))?;
        let existing = self.list_objects().await?;
        let generation = existing
            .iter()
            .filter_map(|o| generation_of(&o.name))
            .max()
            .map_or(self.next_generation, |g| self.next_generation.max(g + 1));
        self.next_generation = generation + 1;
        let v4 = Family::build(&map.v4);
        let v6 = Family::build(&map.v6);

        let create = self.create_script(generation, &v4, &v6, with_create);
        let t = self.table.clone();
        let pieces4 = v4.pieces(map.v4.iter());
        let pieces6 = v6.pieces(map.v6.iter());
        let count =
            |p: &BTreeMap<usize, Vec<(Rect, GwId)>>| p.values().map(Vec::len).sum::<usize>();
        let switch = self.switch_script(generation, &existing);
        let mut in_one = false;
        if count(&pieces4) + count(&pieces6) <= ONE_SCRIPT_MAX {
            // One `nft` run, one transaction: a repair or first install of a small table
            // saves a process start and a netlink batch (about 10 ms of the ~50 a repair at
            // 1 000 policies takes), and there is no half-built generation to clean up.
            let mut one = create.clone();
            elements_script::<Ipv4Addr>(&mut one, &t, generation, &v4.partition, &pieces4);
            elements_script::<Ipv6Addr>(&mut one, &t, generation, &v6.partition, &pieces6);
            one.push_str(&switch);
            match self.nft.transaction("replace maps", &one).await {
                Ok(()) => in_one = true,
                // A table made dormant from outside wakes up only in a transaction of its
                // own, before base chains can be added to it: the steps below do that.
                Err(e) => tracing::debug!(error = %e, "one-transaction replace refused; in steps"),
            }
        }
        if !in_one {
            self.nft.transaction("create maps", &create).await?;
            let (p4, p6) = (v4.partition.clone(), v6.partition.clone());
            let loaded = self
                .nft
                .send_batches("load elements", move || {
                    let add = Op::Add { exclusive: true };
                    let mut batches = Vec::new();
                    for (n, (cells4, cells6)) in load_parts(&pieces4, &pieces6).iter().enumerate() {
                        let mut b = Batch::new();
                        if n == 0 {
                            add_selector::<Ipv4Addr>(&mut b, &t, generation, &p4);
                            add_selector::<Ipv6Addr>(&mut b, &t, generation, &p6);
                        }
                        add_pieces::<Ipv4Addr>(&mut b, add, &t, generation, cells4);
                        add_pieces::<Ipv6Addr>(&mut b, add, &t, generation, cells6);
                        batches.push(b);
                    }
                    batches
                })
                .await;
            let switched = match loaded {
                Ok(()) => self.nft.transaction("switch maps", &switch).await,
                Err(e) => Err(e),
            };
            if let Err(e) = switched {
                // The old generation is still in force; drop the new one (if this fails too,
                // the next full replace deletes it).
                let cleanup = self.drop_script(generation, &v4, &v6);
                if let Err(c) = self.nft.transaction("drop new maps", &cleanup).await {
                    tracing::warn!(error = %c, "could not delete the maps of a failed replace");
                }
                return Err(e);
            }
        }
        self.installed = Some(Installed {
            generation,
            v4,
            v6,
            map: map.clone(),
        });
        Ok(())
    }

    /// Step 1 of a full replace: the table (if missing), the counters, `with_create` (the
    /// gateway chains, when they are written afresh: the cell chains go to them), and
    /// generation `g`'s selectors, cell sets and cell chains, referenced by nothing yet.
    fn create_script(
        &self,
        g: u64,
        v4: &Family<Ipv4Addr>,
        v6: &Family<Ipv6Addr>,
        with_create: &str,
    ) -> String {
        let t = &self.table;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "add table inet {t}\n\
             add counter inet {t} {COUNTER_SEEN}\n\
             add counter inet {t} {COUNTER_NOT_SNATED}\n\
             add counter inet {t} {COUNTER_DROPPED}\n\
             add counter inet {t} {COUNTER_REDIRECTED}\n\
             add chain inet {t} {SNAT_CHAIN}"
        );
        s.push_str(with_create);
        create_family(&mut s, t, g, v4);
        create_family(&mut s, t, g, v6);
        if self.ended {
            s.push_str(&ended_script(t));
        }
        s
    }

    /// Step 3: generation `g`'s base chains, and every other chain and map of the table gone.
    /// Rules go first (they hold the references to maps and chains), then maps (whose jump
    /// elements hold references to chains), then chains.
    ///
    /// Classification happens in `prerouting` (a filter chain), before the routing decision, so
    /// that a standby's redirect mark can choose the route to the active node; it sees every
    /// packet, but destinations of this node (its addresses, the overlay's own VXLAN packets,
    /// broadcast and multicast such as neighbour discovery) are never a client's egress
    /// traffic. The nat chain SNATs by the mark. `overlay` drops a packet of a gateway active
    /// here whose connection this node redirected as a standby (conntrack mark
    /// `overlay::CT_REDIRECTED`) and is not translated: the nat chain sees only a connection's
    /// first packet, so such a connection would otherwise leave with the client's address once
    /// this node took the gateway over (the conntrack sweeper deletes such entries, but TCP ones
    /// are kept by default and the sweep comes after the takeover). Connections that began
    /// before a policy selected them are not redirected ones: they keep their old translation
    /// (`dataplane.tcp_on_policy_change`). It also fits redirected TCP connections to
    /// the overlay's smaller MTU and clears the redirect mark once the route is chosen: the
    /// VXLAN device routes its outer packet with the inner packet's mark, which would send it
    /// back into the overlay.
    fn switch_script(&self, g: u64, existing: &[Object]) -> String {
        let t = &self.table;
        let (pre, post, ovl) = (
            prerouting_name(g),
            base_chain_name(g),
            overlay_chain_name(g),
        );
        let keep = !overlay::MARK_MASK;
        let (mask, redirect, ct_redirected) = (
            overlay::MARK_MASK,
            overlay::REDIRECT,
            overlay::CT_REDIRECTED,
        );
        let dev = overlay::DEVICE;
        let mut s = format!(
            "add chain inet {t} {pre} {{ type filter hook prerouting priority mangle; policy accept; }}\n\
             add rule inet {t} {pre} fib daddr type {{ local, broadcast, multicast }} accept\n\
             add rule inet {t} {pre} ct state new counter name \"{COUNTER_SEEN}\"\n\
             add rule inet {t} {pre} ip saddr . ip daddr vmap @{}\n\
             add rule inet {t} {pre} ip6 saddr . ip6 daddr vmap @{}\n\
             add rule inet {t} {pre} ct state new counter name \"{COUNTER_NOT_SNATED}\"\n\
             add chain inet {t} {post} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             add rule inet {t} {post} fib saddr type local accept\n\
             add rule inet {t} {post} jump {SNAT_CHAIN}\n\
             add chain inet {t} {ovl} {{ type filter hook forward priority mangle; policy accept; }}\n\
             add rule inet {t} {ovl} ct mark and {ct_redirected:#010x} != 0 meta mark and {mask:#010x} != 0 \
               meta mark and {redirect:#010x} == 0 ct status and snat == 0 counter name \"{COUNTER_DROPPED}\" drop\n\
             add rule inet {t} {ovl} oifname \"{dev}\" tcp flags syn tcp option maxseg size set rt mtu\n\
             add rule inet {t} {ovl} oifname \"{dev}\" meta mark set meta mark and {keep:#010x}\n",
            selector_name::<Ipv4Addr>(g),
            selector_name::<Ipv6Addr>(g),
        );
        // Objects named so that nft's syntax cannot name them (made through JSON by someone
        // else) are left alone; if they hold a reference to ours, this transaction fails and
        // says so.
        // The gateways' chains are not generational: the new maps point at them too.
        let old: Vec<&Object> = existing
            .iter()
            .filter(|o| plain_name(&o.name) && gw_of(&o.name).is_none() && o.name != SNAT_CHAIN)
            // Not generational either; kept only while wanted (see `create_script`).
            .filter(|o| !(self.ended && is_ended(&o.name)))
            .collect();
        for o in old.iter().filter(|o| o.kind == "chain") {
            let _ = writeln!(s, "flush chain inet {t} {}", o.name);
        }
        for o in old.iter().filter(|o| o.kind != "chain") {
            let _ = writeln!(s, "delete {} inet {t} {}", o.kind, o.name);
        }
        for o in old.iter().filter(|o| o.kind == "chain") {
            let _ = writeln!(s, "delete chain inet {t} {}", o.name);
        }
        s
    }

    /// Deletes generation `g`'s unreferenced objects again (after a failed replace): the cell
    /// chains' rules first (they refer to the sets), then the maps and sets, then the chains.
    fn drop_script(&self, g: u64, v4: &Family<Ipv4Addr>, v6: &Family<Ipv6Addr>) -> String {
        let t = &self.table;
        let mut s = String::new();
        let chains: Vec<String> = v4.chains(g).chain(v6.chains(g)).collect();
        for c in &chains {
            let _ = writeln!(s, "flush chain inet {t} {c}");
        }
        for m in [selector_name::<Ipv4Addr>(g), selector_name::<Ipv6Addr>(g)] {
            let _ = writeln!(s, "delete map inet {t} {m}");
        }
        for set in v4.set_names(g).chain(v6.set_names(g)) {
            let _ = writeln!(s, "delete set inet {t} {set}");
        }
        for c in &chains {
            let _ = writeln!(s, "delete chain inet {t} {c}");
        }
        s
    }

    /// The elements now in the kernel's maps (read back with `nft -j list table`), in terms of
    /// the elements this struct installed: an installed element whose pieces are all present
    /// (under the kernel's own selector cells) is reported as itself; any other piece as is.
    /// So the result equals the applied map (sorted) exactly when the kernel holds exactly its
    /// pieces.
    pub async fn list_elements(&self) -> Result<SnatMap> {
        let out = self
            .nft
            .run(
                "list table",
                &["-j", "list", "table", "inet", &self.table],
                None,
            )
            .await?;
        let listing = parse_listing(&out).map_err(|detail| Error::Nft {
            op: "list table",
            detail,
        })?;
        let installed = self.installed.as_ref();
        Ok(SnatMap {
            v4: reassemble(&listing.v4, installed.map(|i| i.map.v4.as_slice())),
            v6: reassemble(&listing.v6, installed.map(|i| i.map.v6.as_slice())),
        })
    }

    /// Reads the named counters of the table (`seen`, `not_snated`, `dropped`, `redirected`).
    pub async fn counters(&self) -> Result<NftCounters> {
        let listed = self
            .nft
            .list_counters(nfnl::NFPROTO_INET, &self.table)
            .await?;
        counters_of(&listed).map_err(|detail| Error::Nft {
            op: "list counters",
            detail,
        })
    }

    /// The per-gateway counters (see `Action`).
    pub async fn read_gateway_counters(&self) -> Result<GatewayCounters> {
        let listed = self
            .nft
            .list_counters(nfnl::NFPROTO_INET, &self.table)
            .await?;
        Ok(gateway_counters_of(&listed))
    }

    /// A delta from `old` to `map` in one batch, or `Err(None)` when a full replace is the
    /// better way (a cell would overfill, or the deletions would cost more than a reload).
    fn plan_delta(
        &self,
        old: &Installed,
        map: &SnatMap,
    ) -> std::result::Result<Option<DeltaPlan>, Option<Error>> {
        // Both maps are sorted: a linear merge, no set of 100 000 elements built per change.
        let diff = old.map.diff(map);
        if diff.is_empty() {
            return Ok(None);
        }
        let d4 = FamilyDelta::new(&old.v4, &diff.v4)?;
        let d6 = FamilyDelta::new(&old.v6, &diff.v6)?;
        disjoint(neighbours(&map.v4, &diff.v4.add)).map_err(Some)?;
        disjoint(neighbours(&map.v6, &diff.v6.add)).map_err(Some)?;
        let cost = d4.delete_cost + d6.delete_cost;
        if cost > map.len() + FULL_REPLACE_FIXED {
            return Err(None);
        }
        Ok(Some(DeltaPlan { v4: d4, v6: d6 }))
    }
}

fn is_ended(name: &str) -> bool {
    [ENDED_CHAIN, ENDED_SET4, ENDED_SET6].contains(&name)
}

/// The sets of ended TCP connections and the chain that answers their packets with a reset
/// (anything but a fresh SYN: a new connection that happens to reuse the tuple passes). At the
/// forward hook, before NAT's postrouting: the packet never leaves, and its conntrack entry,
/// unconfirmed, goes with it. Idempotent: the sets keep their elements, the chain is rewritten.
fn ended_script(t: &str) -> String {
    let reset = "tcp flags & (syn | ack) != syn reject with tcp reset";
    format!(
        "add set inet {t} {ENDED_SET4} {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; flags timeout; }}\n\
         add set inet {t} {ENDED_SET6} {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; flags timeout; }}\n\
         add chain inet {t} {ENDED_CHAIN} {{ type filter hook forward priority filter; policy accept; }}\n\
         flush chain inet {t} {ENDED_CHAIN}\n\
         add rule inet {t} {ENDED_CHAIN} ip saddr . tcp sport . ip daddr . tcp dport @{ENDED_SET4} {reset}\n\
         add rule inet {t} {ENDED_CHAIN} ip6 saddr . tcp sport . ip6 daddr . tcp dport @{ENDED_SET6} {reset}\n"
    )
}

/// A family's selector map, and per cell a chain with one rule per gateway of the cell: a
/// lookup in the cell's set of that gateway's pieces, then `goto` the gateway's chain. Sets
/// without data, not one verdict map per cell: the kernel re-validates every jump and goto
/// element reachable from the base chains on each commit that adds one, which at 300 000
/// elements was ~16 ms of every delta that added a piece.
fn create_family<A: NftAddr>(s: &mut String, t: &str, g: u64, fam: &Family<A>) {
    let ty = A::TYPE;
    let _ = writeln!(
        s,
        "add map inet {t} {} {{ type {ty} . {ty} : verdict; flags interval; }}",
        selector_name::<A>(g)
    );
    for (c, gws) in fam.sets.iter().enumerate() {
        let ch = chain_name::<A>(g, c);
        let _ = writeln!(s, "add chain inet {t} {ch}");
        for gw in gws.keys() {
            cell_set::<A>(s, t, &ch, &set_name::<A>(g, c, *gw), gw_chain::<A>(*gw));
        }
    }
}

/// The sets of `new` (cell, gateway) with the rule in the cell's chain that looks them up.
fn new_sets_script<A: NftAddr>(s: &mut String, t: &str, g: u64, new: &[(usize, GwId)]) {
    for (c, gw) in new {
        cell_set::<A>(
            s,
            t,
            &chain_name::<A>(g, *c),
            &set_name::<A>(g, *c, *gw),
            gw_chain::<A>(*gw),
        );
    }
}

/// Set `set` of a cell, and the rule of its chain `ch` that sends its pieces to `to`.
fn cell_set<A: NftAddr>(s: &mut String, t: &str, ch: &str, set: &str, to: String) {
    let (ty, proto) = (A::TYPE, A::PROTO);
    let _ = writeln!(
        s,
        "add set inet {t} {set} {{ type {ty} . {ty}; flags interval; }}\n\
         add rule inet {t} {ch} {proto} saddr . {proto} daddr @{set} goto {to}"
    );
}

/// One family's change: pieces to delete and to add, per cell, the sets to create first (a
/// gateway new to a cell), and the resulting set sizes.
#[derive(Debug)]
struct FamilyDelta {
    delete: BTreeMap<usize, Vec<(Rect, GwId)>>,
    add: BTreeMap<usize, Vec<(Rect, GwId)>>,
    new_sets: Vec<(usize, GwId)>,
    sets: Vec<BTreeMap<GwId, usize>>,
    /// Sum over deleted pieces of the size of their set: what the deletions cost the kernel.
    delete_cost: usize,
}

impl FamilyDelta {
    fn new<A: NftAddr>(
        old: &Family<A>,
        diff: &FamilyDiff<A>,
    ) -> std::result::Result<FamilyDelta, Option<Error>> {
        validate(&diff.add).map_err(Some)?;
        let delete = old.pieces(diff.delete.iter());
        let add = old.pieces(diff.add.iter());
        let mut sets = old.sets.clone();
        let mut delete_cost = 0;
        for (c, list) in &delete {
            for (_, gw) in list {
                // Every deleted piece was installed, so its set exists.
                let n = sets[*c].get_mut(gw).ok_or(None)?;
                delete_cost += *n;
                *n = n.saturating_sub(1);
            }
        }
        let mut new_sets = Vec::new();
        for (c, list) in &add {
            for (_, gw) in list {
                let n = sets[*c].entry(*gw).or_insert_with(|| {
                    new_sets.push((*c, *gw));
                    0
                });
                *n += 1;
                if *n > CELL_MAX {
                    return Err(None);
                }
            }
        }
        Ok(FamilyDelta {
            delete,
            add,
            new_sets,
            sets,
            delete_cost,
        })
    }
}

#[derive(Debug)]
struct DeltaPlan {
    v4: FamilyDelta,
    v6: FamilyDelta,
}

impl NftFirewall {
    /// Makes the kernel's classification maps equal `map`: a delta when possible, else a full
    /// replace (see the module documentation). Every gateway `map` names has its chains.
    async fn apply_map(&mut self, map: &Arc<SnatMap>) -> Result<()> {
        let Some(old) = self.installed.take() else {
            return self.full_replace(map, "").await;
        };
        let plan = match self.plan_delta(&old, map) {
            Ok(None) => {
                self.installed = Some(old);
                return Ok(());
            }
            Ok(Some(plan)) => plan,
            // A bad element: nothing was sent, the kernel still holds `old`.
            Err(Some(e)) => {
                self.installed = Some(old);
                return Err(e);
            }
            Err(None) => return self.full_replace(map, "").await,
        };
        let DeltaPlan { v4: d4, v6: d6 } = plan;
        let (t, g) = (self.table.clone(), old.generation);
        // Until the batch is known to have committed, the kernel's state is not known: `old`
        // stays dropped on any error, so that the next apply replaces everything.
        if !d4.new_sets.is_empty() || !d6.new_sets.is_empty() {
            // Empty sets behind rules that match nothing yet: the batch below is still what
            // changes the classification, in one transaction.
            let mut script = String::new();
            new_sets_script::<Ipv4Addr>(&mut script, &t, g, &d4.new_sets);
            new_sets_script::<Ipv6Addr>(&mut script, &t, g, &d6.new_sets);
            self.nft.transaction("add cell sets", &script).await?;
        }
        let (del4, add4, del6, add6) = (d4.delete, d4.add, d6.delete, d6.add);
        self.nft
            .send_batch("update elements", move || {
                let mut b = Batch::new();
                // Deletes first: an element whose target changed is deleted and re-added with the
                // same key, which must not collide with the old one.
                add_pieces::<Ipv4Addr>(&mut b, Op::Delete, &t, g, &del4);
                add_pieces::<Ipv6Addr>(&mut b, Op::Delete, &t, g, &del6);
                add_pieces::<Ipv4Addr>(&mut b, Op::Add { exclusive: true }, &t, g, &add4);
                add_pieces::<Ipv6Addr>(&mut b, Op::Add { exclusive: true }, &t, g, &add6);
                b
            })
            .await?;
        self.installed = Some(Installed {
            map: map.clone(),
            generation: g,
            v4: Family {
                partition: old.v4.partition,
                sets: d4.sets,
                family: std::marker::PhantomData,
            },
            v6: Family {
                partition: old.v6.partition,
                sets: d6.sets,
                family: std::marker::PhantomData,
            },
        });
        Ok(())
    }

    /// Creates the chains of the gateways in `ids` that do not have them yet and rewrites every
    /// gateway chain (and the SNAT chain) whose rules `roles` change, in one transaction: a new
    /// chain is made holding its role, and a takeover, a release or a new redirect target is one
    /// `nft` run whatever the number of policies. When what the table holds is unknown, every
    /// chain is written afresh.
    async fn write_roles(&mut self, roles: &Roles, ids: &BTreeSet<GwId>) -> Result<()> {
        let have = self.chains.clone().unwrap_or_default();
        let all: BTreeSet<GwId> = have.union(ids).copied().collect();
        let want = role_texts(roles, &all);
        let t = &self.table;
        let mut script = String::new();
        let fresh = self.chains.is_none() || self.written.is_none();
        if fresh {
            let _ = writeln!(
                script,
                "add table inet {t}\nadd counter inet {t} {COUNTER_DROPPED}\n\
                 add counter inet {t} {COUNTER_REDIRECTED}\nadd chain inet {t} {SNAT_CHAIN}"
            );
        }
        for id in all.iter().filter(|id| fresh || !have.contains(id)) {
            add_gw_counters(&mut script, t, *id);
            for c in [gw_chain::<Ipv4Addr>(*id), gw_chain::<Ipv6Addr>(*id)] {
                let _ = writeln!(script, "add chain inet {t} {c}");
            }
        }
        let old = if fresh {
            BTreeMap::new()
        } else {
            self.written.clone().unwrap_or_default()
        };
        for (chain, rules) in &want {
            if fresh || old.get(chain) != Some(rules) {
                chain_script(&mut script, t, chain, rules);
            }
        }
        if script.is_empty() {
            return Ok(());
        }
        self.chains = None;
        self.written = None;
        self.nft.transaction("set gateway roles", &script).await?;
        self.chains = Some(all);
        self.written = Some(want);
        Ok(())
    }

    /// Installs everything when nothing in the kernel is known (the start, after an error, after
    /// a change from outside): the gateway chains with their roles go into the transaction that
    /// creates the maps, so that this costs two `nft` runs and one netlink batch instead of five
    /// runs and a batch (an `nft` run costs ~10 ms here: this is most of a repair's time).
    async fn replace_all(
        &mut self,
        map: &Arc<SnatMap>,
        roles: &Roles,
        ids: &BTreeSet<GwId>,
    ) -> Result<()> {
        self.chains = None;
        self.written = None;
        let t = &self.table;
        let mut script = String::new();
        for id in ids {
            add_gw_counters(&mut script, t, *id);
            // `add chain` leaves an existing chain as it is; the rules are flushed first.
            for c in [gw_chain::<Ipv4Addr>(*id), gw_chain::<Ipv6Addr>(*id)] {
                let _ = writeln!(script, "add chain inet {t} {c}");
            }
        }
        let want = role_texts(roles, ids);
        for (chain, rules) in &want {
            chain_script(&mut script, t, chain, rules);
        }
        self.full_replace(map, &script).await?;
        self.chains = Some(ids.clone());
        self.written = Some(want);
        Ok(())
    }

    /// Deletes the chains of gateways that are gone (no element names them any more).
    async fn drop_chains(&mut self, keep: &BTreeSet<GwId>) -> Result<()> {
        let Some(have) = self.chains.clone() else {
            return Ok(());
        };
        let gone: Vec<GwId> = have.difference(keep).copied().collect();
        if gone.is_empty() {
            return Ok(());
        }
        let t = &self.table;
        let mut script = String::new();
        for id in &gone {
            for c in [gw_chain::<Ipv4Addr>(*id), gw_chain::<Ipv6Addr>(*id)] {
                let _ = writeln!(
                    script,
                    "flush chain inet {t} {c}\ndelete chain inet {t} {c}"
                );
            }
            for a in Action::ALL {
                let _ = writeln!(script, "delete counter inet {t} {}", gw_counter(a, *id));
            }
        }
        self.chains = None;
        self.nft
            .transaction("delete gateway chains", &script)
            .await?;
        self.chains = Some(have.intersection(keep).copied().collect());
        if let Some(w) = self.written.as_mut() {
            w.retain(|chain, _| gw_of(chain).is_none_or(|id| keep.contains(&id)));
        }
        Ok(())
    }
}

impl Firewall for NftFirewall {
    async fn apply(&mut self, map: &Arc<SnatMap>, roles: &Roles) -> Result<()> {
        validate_table_name(&self.table)?;
        // Chains first: elements can only name chains that exist.
        let mut ids: BTreeSet<GwId> = roles.keys().copied().collect();
        ids.extend(map.v4.iter().map(|e| e.to));
        ids.extend(map.v6.iter().map(|e| e.to));
        if self.installed.is_none() {
            return self.replace_all(map, roles, &ids).await;
        }
        let before = self.chains.clone();
        self.write_roles(roles, &ids).await?;
        if self
            .installed
            .as_ref()
            .is_none_or(|i| !Arc::ptr_eq(&i.map, map) && *i.map != **map)
            && let Err(e) = self.apply_map(map).await
        {
            // The elements were refused as a whole: the chains made for them are unused.
            if let Some(before) = before
                && let Err(c) = self.drop_chains(&before).await
            {
                tracing::warn!(error = %c, "could not delete the chains of a failed change");
            }
            return Err(e);
        }
        self.drop_chains(&ids).await
    }

    fn manifest(&self) -> Option<Manifest> {
        let i = self.installed.as_ref()?;
        self.chains.as_ref()?;
        // Unknown roles: what the gateway chains hold is not known either.
        let written = self.written.as_ref()?;
        let g = i.generation;
        let mut spec = TableSpec {
            family: nfnl::NFPROTO_INET,
            name: self.table.clone(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
        };
        // See `switch_script`: local accept, counter, two vmaps, counter; local accept, SNAT
        // jump; MSS clamp, mark cleared.
        spec.chains.insert(prerouting_name(g), 5);
        spec.chains.insert(base_chain_name(g), 2);
        spec.chains.insert(overlay_chain_name(g), 3);
        family_spec(&mut spec, g, &i.v4);
        family_spec(&mut spec, g, &i.v6);
        // The gateway chains and the SNAT chain: as `role_texts` wrote them.
        for (chain, rules) in written {
            spec.chains.insert(chain.clone(), rules.lines().count());
        }
        if self.ended {
            // Elements come and expire with ended connections: their number is not checked.
            spec.chains.insert(ENDED_CHAIN.to_owned(), 2);
            spec.sets.insert(ENDED_SET4.to_owned(), Count::Any);
            spec.sets.insert(ENDED_SET6.to_owned(), Count::Any);
        }
        Some(Manifest { tables: vec![spec] })
    }

    fn forget(&mut self) {
        self.installed = None;
        self.chains = None;
        self.written = None;
    }

    async fn gateway_counters(&self) -> Result<GatewayCounters> {
        self.read_gateway_counters().await
    }

    async fn remove(&mut self) -> Result<()> {
        validate_table_name(&self.table)?;
        self.installed = None;
        self.chains = None;
        self.written = None;
        // `add` then `delete` in one transaction: succeeds whether or not the table exists,
        // without parsing nft's "No such file or directory" message.
        let t = &self.table;
        let script = format!("add table inet {t}\ndelete table inet {t}\n");
        self.nft.transaction("delete table", &script).await
    }
}

/// One family's maps and cell chains of generation `g`, as `fam` installed them.
fn family_spec<A: NftAddr>(spec: &mut TableSpec, g: u64, fam: &Family<A>) {
    spec.sets
        .insert(selector_name::<A>(g), Count::Exactly(fam.partition.len()));
    for (c, gws) in fam.sets.iter().enumerate() {
        for (gw, n) in gws {
            spec.sets
                .insert(set_name::<A>(g, c, *gw), Count::Exactly(*n));
        }
        spec.chains.insert(chain_name::<A>(g, c), gws.len());
    }
}

/// An inclusive range written as nft wants it: `a` when it is one address, else `a-b`.
struct Range<A>((A, A));

impl<A: NftAddr> Display for Range<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = self.0;
        if a == b {
            write!(f, "{a}")
        } else {
            write!(f, "{a}-{b}")
        }
    }
}

/// The cells and pieces of one family as the kernel holds them.
#[derive(Debug)]
struct Listed<A> {
    /// Selector elements: cell rectangle → cell number (from the jump target's name).
    cells: Vec<(Rect, usize)>,
    /// Cell number → the pieces in its map.
    pieces: BTreeMap<usize, Vec<SnatElement<A>>>,
}

impl<A> Default for Listed<A> {
    fn default() -> Self {
        Listed {
            cells: Vec::new(),
            pieces: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Listing {
    v4: Listed<Ipv4Addr>,
    v6: Listed<Ipv6Addr>,
}

/// Splits `c4_7_12` (or a set's `m4_7_12_<gateway id>`) into ("4", 7, 12).
fn cell_of(name: &str) -> Option<(&str, u64, usize)> {
    let mut parts = name.split('_');
    let kind = parts.next()?;
    let v = kind.get(1..)?;
    let g = parts.next()?.parse().ok()?;
    let c = parts.next()?.parse().ok()?;
    Some((v, g, c))
}

/// The parsers of nft's JSON output, for the fuzz targets (`fuzz/`): they read what an `nft`
/// process printed, so they must refuse anything else with an error, never panic. Not an API.
#[doc(hidden)]
pub fn fuzz_parsers(text: &str) {
    let _ = parse_listing(text);
}

/// Parses `nft -j list table` output of egressd's inet table: the newest generation's selector
/// maps and cell sets.
fn parse_listing(text: &str) -> std::result::Result<Listing, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("bad JSON from nft: {e}"))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no \"nftables\" array in nft's output")?;
    let maps: Vec<&Value> = items
        .iter()
        .filter_map(|i| i.get("map").or_else(|| i.get("set")))
        .collect();
    let name = |m: &Value| {
        m.get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let generation = maps.iter().filter_map(|m| generation_of(&name(m))).max();
    let mut out = Listing::default();
    let Some(generation) = generation else {
        return Ok(out);
    };
    for m in maps {
        let n = name(m);
        if generation_of(&n) != Some(generation) {
            continue;
        }
        let elems = match m.get("elem") {
            None => continue,
            Some(e) => e.as_array().ok_or("\"elem\" is not an array")?,
        };
        if n.starts_with("sel") {
            for elem in elems {
                let (rect, target) =
                    parse_selector(elem).map_err(|e| format!("map {n}, element {elem}: {e}"))?;
                let (v, _, cell) =
                    cell_of(&target).ok_or(format!("map {n}: unexpected jump to {target}"))?;
                match v {
                    "4" => out.v4.cells.push((rect, cell)),
                    _ => out.v6.cells.push((rect, cell)),
                }
            }
        } else if let Some((v, _, cell)) = cell_of(&n) {
            let to = n
                .rsplit_once('_')
                .and_then(|(_, id)| gw_id(id))
                .ok_or(format!("set {n}: no gateway id in its name"))?;
            for elem in elems {
                let bad = |e: String| format!("set {n}, element {elem}: {e}");
                match v {
                    "4" => out
                        .v4
                        .pieces
                        .entry(cell)
                        .or_default()
                        .push(parse_elem(elem, to).map_err(bad)?),
                    _ => out
                        .v6
                        .pieces
                        .entry(cell)
                        .or_default()
                        .push(parse_elem(elem, to).map_err(bad)?),
                }
            }
        }
    }
    Ok(out)
}

/// A map element of nft's JSON listing, `[{"concat": [src, dst]}, value]`, in its parts.
fn concat_pair(elem: &Value) -> std::result::Result<(&Value, &Value, &Value), String> {
    let pair = elem.as_array().ok_or("not a [key, value] pair")?;
    let [key, value] = pair.as_slice() else {
        return Err("not a [key, value] pair".to_owned());
    };
    let (src, dst) = concat_key(key)?;
    Ok((src, dst, value))
}

/// A key of nft's JSON listing, `{"concat": [src, dst]}`, in its parts.
fn concat_key(key: &Value) -> std::result::Result<(&Value, &Value), String> {
    let parts = key
        .get("concat")
        .and_then(Value::as_array)
        .ok_or("key is not a concatenation")?;
    let [src, dst] = parts.as_slice() else {
        return Err("key does not have two parts".to_owned());
    };
    Ok((src, dst))
}

/// One selector element: its rectangle and the chain it jumps to.
fn parse_selector(elem: &Value) -> std::result::Result<(Rect, String), String> {
    let (src, dst, value) = concat_pair(elem)?;
    let target = value
        .get("jump")
        .and_then(|j| j.get("target"))
        .and_then(Value::as_str)
        .ok_or("value is not a jump")?;
    // Parse as IPv6 if it is one, else IPv4; the rectangle is in u128 either way.
    let span = |v: &Value| -> std::result::Result<(u128, u128), String> {
        match parse_range::<Ipv4Addr>(v) {
            Ok((a, b)) => Ok((a.to_u128(), b.to_u128())),
            Err(_) => parse_range::<Ipv6Addr>(v).map(|(a, b)| (a.to_u128(), b.to_u128())),
        }
    };
    Ok(((span(src)?, span(dst)?), target.to_owned()))
}

fn intersect(a: Rect, b: Rect) -> Option<Rect> {
    let s = (a.0.0.max(b.0.0), a.0.1.min(b.0.1));
    let d = (a.1.0.max(b.1.0), a.1.1.min(b.1.1));
    (s.0 <= s.1 && d.0 <= d.1).then_some((s, d))
}

/// The listed pieces in terms of `installed` elements; see [`NftFirewall::list_elements`].
fn reassemble<A: NftAddr>(
    listed: &Listed<A>,
    installed: Option<&[SnatElement<A>]>,
) -> Vec<SnatElement<A>> {
    let mut pool: BTreeSet<(usize, SnatElement<A>)> = listed
        .pieces
        .iter()
        .flat_map(|(c, list)| list.iter().map(move |e| (*c, *e)))
        .collect();
    let mut out = Vec::new();
    let mut cells = listed.cells.clone();
    cells.sort_unstable();
    for e in installed.into_iter().flatten() {
        let r = rect(e);
        let expected: Vec<(usize, SnatElement<A>)> = cells
            .iter()
            .filter_map(|(cell_rect, c)| {
                let ((s0, s1), (d0, d1)) = intersect(r, *cell_rect)?;
                Some((
                    *c,
                    SnatElement {
                        src: (A::from_u128(s0), A::from_u128(s1)),
                        dst: (A::from_u128(d0), A::from_u128(d1)),
                        to: e.to,
                    },
                ))
            })
            .collect();
        if !expected.is_empty() && expected.iter().all(|p| pool.contains(p)) {
            for p in &expected {
                pool.remove(p);
            }
            out.push(*e);
        }
    }
    out.extend(pool.into_iter().map(|(_, e)| e));
    out.sort();
    out
}

/// A cell set element (its key), of the set of gateway `to`.
fn parse_elem<A: NftAddr>(elem: &Value, to: GwId) -> std::result::Result<SnatElement<A>, String> {
    let (src, dst) = concat_key(elem)?;
    Ok(SnatElement {
        src: parse_range(src)?,
        dst: parse_range(dst)?,
        to,
    })
}

/// One part of a key: `"a"`, `{"prefix": {"addr": "a", "len": n}}` or `{"range": ["a", "b"]}`.
fn parse_range<A: NftAddr>(v: &Value) -> std::result::Result<(A, A), String> {
    if let Some(s) = v.as_str() {
        let a = parse_addr(s)?;
        return Ok((a, a));
    }
    if let Some(p) = v.get("prefix") {
        let addr = p
            .get("addr")
            .and_then(Value::as_str)
            .ok_or("prefix without addr")?;
        let len = p
            .get("len")
            .and_then(Value::as_u64)
            .ok_or("prefix without len")?;
        let a: A = parse_addr(addr)?;
        let len = u32::try_from(len).map_err(|_| format!("bad prefix length {len}"))?;
        let b = a
            .prefix_last(len)
            .ok_or_else(|| format!("bad prefix length {len}"))?;
        return Ok((a, b));
    }
    if let Some(r) = v.get("range").and_then(Value::as_array)
        && let [a, b] = r.as_slice()
    {
        let a = parse_addr(a.as_str().ok_or("range bound is not a string")?)?;
        let b = parse_addr(b.as_str().ok_or("range bound is not a string")?)?;
        return Ok((a, b));
    }
    Err(format!("unexpected key part {v}"))
}

fn parse_addr<A: NftAddr>(s: &str) -> std::result::Result<A, String> {
    s.parse().map_err(|_| format!("bad address {s:?}"))
}

/// The table's own counters among `listed` (name, packets, bytes).
fn counters_of(listed: &[(String, u64, u64)]) -> std::result::Result<NftCounters, String> {
    let packets = |name: &str| listed.iter().find(|(n, _, _)| n == name).map(|c| c.1);
    match (
        packets(COUNTER_SEEN),
        packets(COUNTER_NOT_SNATED),
        packets(COUNTER_DROPPED),
    ) {
        (Some(seen), Some(not_snated), Some(dropped)) => Ok(NftCounters {
            seen,
            not_snated,
            dropped,
            // A table of an egressd from before redirects has no such counter.
            redirected: packets(COUNTER_REDIRECTED).unwrap_or(0),
        }),
        _ => Err("the table lacks egressd's counters".to_owned()),
    }
}

/// The per-gateway counters among `listed` (name, packets, bytes); other counters are skipped.
fn gateway_counters_of(listed: &[(String, u64, u64)]) -> GatewayCounters {
    let mut out = GatewayCounters::new();
    for (name, packets, bytes) in listed {
        let Some((action, id)) = Action::ALL.iter().find_map(|a| {
            let hex = name.strip_prefix(a.name())?.strip_prefix('_')?;
            let id = (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())??;
            Some((*a, GwId(id)))
        }) else {
            continue;
        };
        out.entry(id)
            .or_default()
            .insert(action, (*packets, *bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of a load hold every cell once, in order, whole, and none is much larger than
    /// [`LOAD_PART`]; an empty load is one (empty) part, for the selectors.
    #[test]
    fn a_load_is_cut_into_parts_of_whole_cells() {
        let cells = |sizes: &[usize]| -> Pieces {
            sizes
                .iter()
                .enumerate()
                .map(|(c, n)| (c, vec![(((0, 0), (0, 0)), GwId(1)); *n]))
                .collect()
        };
        assert_eq!(load_parts(&Pieces::new(), &Pieces::new()).len(), 1);
        let p4 = cells(&[512; 200]);
        let p6 = cells(&[3000, 7000, 100]);
        let parts = load_parts(&p4, &p6);
        assert!(parts.len() >= 14, "{} parts", parts.len());
        let total = |f: &dyn Fn(&(Pieces, Pieces)) -> &Pieces| -> Vec<usize> {
            parts.iter().flat_map(|p| f(p).keys().copied()).collect()
        };
        assert_eq!(total(&|p| &p.0), (0..200).collect::<Vec<_>>());
        assert_eq!(total(&|p| &p.1), vec![0, 1, 2]);
        for (a, b) in &parts {
            let n: usize = a.values().chain(b.values()).map(Vec::len).sum();
            assert!(n < LOAD_PART + 7000, "{n}");
            assert!(a.values().chain(b.values()).all(|l| !l.is_empty()));
        }
        assert_eq!(
            parts
                .iter()
                .flat_map(|(a, b)| a.values().chain(b.values()))
                .map(Vec::len)
                .sum::<usize>(),
            512 * 200 + 10_100
        );
    }

    fn v4_range(s: (&str, &str), d: (&str, &str), to: &str) -> SnatElement<Ipv4Addr> {
        let p = |x: &str| -> Ipv4Addr { x.parse().unwrap() };
        SnatElement {
            src: (p(s.0), p(s.1)),
            dst: (p(d.0), p(d.1)),
            to: GwId::of(to),
        }
    }

    fn v4(s: &str, d: (&str, &str), to: &str) -> SnatElement<Ipv4Addr> {
        let p = |x: &str| -> Ipv4Addr { x.parse().unwrap() };
        SnatElement {
            src: (p(s), p(s)),
            dst: (p(d.0), p(d.1)),
            to: GwId::of(to),
        }
    }

    #[test]
    fn create_and_switch_scripts() {
        let fw = NftFirewall::new("egressd");
        // Two IPv4 cells (one gateway in the first, two in the second), one empty IPv6 cell.
        let v4 = Family::<Ipv4Addr> {
            partition: Partition::whole(Ipv4Addr::MAX),
            sets: vec![
                BTreeMap::from([(GwId(1), 3)]),
                BTreeMap::from([(GwId(1), 1), (GwId(2), 2)]),
            ],
            family: std::marker::PhantomData,
        };
        let v6 = Family::<Ipv6Addr>::build(&[]);
        let s = fw.create_script(7, &v4, &v6, "add chain inet egressd g4_0000000000000002\n");
        assert!(s.starts_with("add table inet egressd\nadd counter inet egressd seen\n"));
        assert!(s.contains(
            "add map inet egressd sel4_7 { type ipv4_addr . ipv4_addr : verdict; flags interval; }"
        ));
        assert!(s.contains(
            "add chain inet egressd c4_7_1\n\
             add set inet egressd m4_7_1_0000000000000001 { type ipv4_addr . ipv4_addr; flags interval; }\n\
             add rule inet egressd c4_7_1 ip saddr . ip daddr @m4_7_1_0000000000000001 goto g4_0000000000000001\n\
             add set inet egressd m4_7_1_0000000000000002 { type ipv4_addr . ipv4_addr; flags interval; }\n\
             add rule inet egressd c4_7_1 ip saddr . ip daddr @m4_7_1_0000000000000002 goto g4_0000000000000002\n"
        ));
        assert!(!s.contains("m4_7_0_0000000000000002"));
        // The gateway chains the cell chains go to come first.
        assert!(
            s.find("add chain inet egressd g4_0000000000000002")
                < s.find("add chain inet egressd c4_7_0")
        );
        assert!(s.contains("add chain inet egressd c6_7_0\n"));
        assert!(!s.contains("m6_7_0"));
        let d = fw.drop_script(7, &v4, &v6);
        let pos = |needle: &str| d.find(needle).unwrap_or_else(|| panic!("{needle} in {d}"));
        assert!(
            pos("flush chain inet egressd c4_7_1")
                < pos("delete set inet egressd m4_7_1_0000000000000002")
        );
        assert!(
            pos("delete set inet egressd m4_7_1_0000000000000002")
                < pos("delete chain inet egressd c4_7_1")
        );
        assert!(pos("delete map inet egressd sel6_7") < pos("delete chain inet egressd c6_7_0"));

        let old = [
            Object {
                kind: "chain",
                name: "postrouting".into(),
            },
            Object {
                kind: "map",
                name: "snat4".into(),
            },
            Object {
                kind: "chain",
                name: "c4_6_0".into(),
            },
            Object {
                kind: "set",
                name: "odd name".into(),
            },
            Object {
                kind: "chain",
                name: "g4_00112233aabbccdd".into(),
            },
        ];
        let s = fw.switch_script(7, &old);
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        assert!(
            pos("add chain inet egressd postrouting_7 { type nat hook postrouting")
                < pos("flush chain inet egressd postrouting\n")
        );
        assert!(pos("vmap @sel4_7") < pos("vmap @sel6_7"));
        assert!(pos("flush chain inet egressd c4_6_0") < pos("delete map inet egressd snat4"));
        assert!(
            pos("delete map inet egressd snat4") < pos("delete chain inet egressd postrouting\n")
        );
        assert!(!s.contains("odd name"));
        assert!(
            !s.contains("g4_00112233aabbccdd"),
            "gateway chains stay: {s}"
        );
    }

    #[test]
    fn gateway_chains_are_named_by_id() {
        let id = GwId(0x0011_2233_aabb_ccdd);
        assert_eq!(gw_chain::<Ipv4Addr>(id), "g4_00112233aabbccdd");
        assert_eq!(gw_chain::<Ipv6Addr>(id), "g6_00112233aabbccdd");
        assert_eq!(gw_of("g6_00112233aabbccdd"), Some(id));
        assert_eq!(gw_of("g4_0011"), None);
        assert_eq!(gw_of("c4_1_2"), None);
    }

    #[test]
    fn names_and_generations() {
        assert_eq!(generation_of("m4_12_3"), Some(12));
        assert_eq!(generation_of("postrouting_5"), Some(5));
        assert_eq!(generation_of("sel6_9"), Some(9));
        assert_eq!(generation_of("postrouting"), None);
        assert_eq!(generation_of("snat4"), None);
        assert_eq!(generation_of("leftover_3"), None);
        assert_eq!(cell_of("c6_12_3"), Some(("6", 12, 3)));
        assert!(plain_name("c4_1_0") && plain_name("leftover"));
        assert!(!plain_name("odd name") && !plain_name("a\"b") && !plain_name(""));
    }

    #[test]
    fn bad_ranges_are_named() {
        let e = v4("10.0.0.1", ("1.0.0.9", "1.0.0.1"), "192.0.2.1");
        let err = validate(&[e]).unwrap_err().to_string();
        assert!(
            err.contains("Range has zero or negative size: 10.0.0.1 . 1.0.0.9-1.0.0.1"),
            "{err}"
        );
    }

    #[test]
    fn delta_plans() {
        // Two gateways in every cell.
        let els: Vec<_> = (0..3000u32)
            .map(|i| SnatElement {
                src: (Ipv4Addr::from(i), Ipv4Addr::from(i)),
                dst: (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST),
                to: GwId(1 + u64::from(i % 2)),
            })
            .collect();
        let fam = Family::build(&els);
        assert_eq!(fam.partition.len(), 3000usize.div_ceil(CELL_TARGET));
        assert_eq!(
            fam.sets.iter().flat_map(BTreeMap::values).sum::<usize>(),
            3000
        );
        assert!(fam.sets.iter().all(|m| m.len() == 2));
        let installed = Installed {
            generation: 1,
            v4: fam,
            v6: Family::build(&[]),
            map: Arc::new(SnatMap {
                v4: els.clone(),
                v6: vec![],
            }),
        };
        let fw = NftFirewall::new("egressd");
        // One element replaced: a small delta, touching one or two cells.
        let mut m = SnatMap {
            v4: els.clone(),
            v6: vec![],
        };
        m.v4[1500].to = GwId(2);
        let plan = fw.plan_delta(&installed, &m).unwrap().unwrap();
        assert_eq!(plan.v4.delete.values().map(Vec::len).sum::<usize>(), 1);
        assert_eq!(plan.v4.add.values().map(Vec::len).sum::<usize>(), 1);
        let cell = *plan.v4.add.keys().next().unwrap();
        assert_eq!(
            plan.v4.sets[cell][&GwId(2)],
            installed.v4.sets[cell][&GwId(2)] + 1
        );
        assert_eq!(
            plan.v4.sets[cell][&GwId(1)],
            installed.v4.sets[cell][&GwId(1)] - 1
        );
        assert!(plan.v4.new_sets.is_empty());
        // A gateway new to a cell: its set (and rule) is made first.
        m.v4[1500].to = GwId(3);
        let plan = fw.plan_delta(&installed, &m).unwrap().unwrap();
        assert_eq!(plan.v4.new_sets, [(cell, GwId(3))]);
        assert_eq!(plan.v4.sets[cell][&GwId(3)], 1);
        // Unchanged: nothing to do.
        let same = SnatMap {
            v4: els.clone(),
            v6: vec![],
        };
        assert!(fw.plan_delta(&installed, &same).unwrap().is_none());
        // Many new elements in one cell: a full replace recomputes the cells.
        let mut grown = same.clone();
        grown.v4.extend((0..CELL_MAX as u32).map(|i| SnatElement {
            src: (Ipv4Addr::from(1 << 30 | i), Ipv4Addr::from(1 << 30 | i)),
            dst: (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST),
            to: GwId(1),
        }));
        assert!(matches!(fw.plan_delta(&installed, &grown), Err(None)));
        let gw1 = |m: &SnatMap| m.v4.iter().filter(|e| e.to == GwId(1)).count();
        assert_eq!(gw1(&grown), 1500 + CELL_MAX);
        // Deleting most elements costs more than reloading the rest.
        let shrunk = SnatMap {
            v4: els[..100].to_vec(),
            v6: vec![],
        };
        assert!(matches!(fw.plan_delta(&installed, &shrunk), Err(None)));
        // A reversed range is refused before anything is sent.
        let mut bad = same.clone();
        bad.v4
            .push(v4("10.0.9.9", ("1.0.0.9", "1.0.0.1"), "192.0.2.1"));
        assert!(matches!(fw.plan_delta(&installed, &bad), Err(Some(_))));
    }

    #[test]
    fn table_names() {
        assert!(validate_table_name("egressd").is_ok());
        assert!(validate_table_name("egress_d2").is_ok());
        for bad in ["", "1x", "a b", "a;b", "a}", "a\nb"] {
            assert!(validate_table_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_listing_and_reassembles() {
        let json = r#"{"nftables": [{"metainfo": {}},
          {"map": {"family": "inet", "name": "sel4_3", "elem": [
            [{"concat": [{"range": ["0.0.0.0", "10.0.0.255"]}, {"prefix": {"addr": "0.0.0.0", "len": 0}}]}, {"jump": {"target": "c4_3_0"}}],
            [{"concat": [{"range": ["10.0.1.0", "255.255.255.255"]}, {"prefix": {"addr": "0.0.0.0", "len": 0}}]}, {"jump": {"target": "c4_3_1"}}]]}},
          {"set": {"family": "inet", "name": "m4_3_0_6694f83c9f476da3", "elem": [
            {"concat": ["10.0.0.1", {"prefix": {"addr": "0.0.0.0", "len": 0}}]}]}},
          {"set": {"family": "inet", "name": "m4_3_0_f53eea05fa9e492d", "elem": [
            {"concat": [{"range": ["10.0.0.200", "10.0.0.255"]}, {"range": ["1.0.0.0", "1.0.0.5"]}]}]}},
          {"set": {"family": "inet", "name": "m4_3_1_f53eea05fa9e492d", "elem": [
            {"concat": [{"prefix": {"addr": "10.0.1.0", "len": 24}}, {"range": ["1.0.0.0", "1.0.0.5"]}]}]}},
          {"set": {"family": "inet", "name": "m4_3_1_2948ed61c9c9a154", "elem": [
            {"concat": ["10.9.9.9", "9.9.9.9"]}]}},
          {"set": {"family": "inet", "name": "m4_2_0_2948ed61c9c9a154", "elem": [
            {"concat": ["10.7.7.7", "9.9.9.9"]}]}},
          {"map": {"family": "inet", "name": "sel6_3"}}]}"#;
        let listing = parse_listing(json).unwrap();
        assert_eq!(listing.v4.cells.len(), 2);
        assert_eq!(
            listing.v4.pieces.values().map(Vec::len).sum::<usize>(),
            4,
            "generation 2 is ignored"
        );
        // Installed: one element split by the cell boundary, one whole, and one that the kernel
        // lacks; the kernel has an extra piece.
        let split = v4_range(
            ("10.0.0.200", "10.0.1.255"),
            ("1.0.0.0", "1.0.0.5"),
            "1.2.3.5",
        );
        let whole = v4("10.0.0.1", ("0.0.0.0", "255.255.255.255"), "1.2.3.4");
        let missing = v4("10.8.8.8", ("0.0.0.0", "255.255.255.255"), "1.2.3.4");
        let installed = [whole, split, missing];
        let got = reassemble(&listing.v4, Some(&installed[..]));
        let extra = v4("10.9.9.9", ("9.9.9.9", "9.9.9.9"), "1.2.3.6");
        let mut want = vec![split, whole, extra];
        want.sort();
        assert_eq!(got, want);
        // Without knowledge of what was installed, the pieces as they are.
        assert_eq!(reassemble(&listing.v4, None).len(), 4);

        let bad = r#"{"nftables": [{"set": {"name": "m4_1_0_2948ed61c9c9a15", "elem": []}}]}"#;
        assert!(parse_listing(bad).unwrap_err().contains("no gateway id"));
        let empty = parse_listing(r#"{"nftables": [{"map": {"name": "sel4_1"}}]}"#).unwrap();
        assert!(empty.v4.pieces.is_empty());
        assert_eq!(
            Ipv6Addr::UNSPECIFIED.prefix_last(0),
            Some(Ipv6Addr::from(u128::MAX))
        );
        assert_eq!(
            "10.1.2.3".parse::<Ipv4Addr>().unwrap().prefix_last(32),
            Some("10.1.2.3".parse().unwrap())
        );
    }

    #[test]
    fn role_texts_mark_snat_redirect_and_drop_consistently() {
        let (a, b, c, d) = (GwId::of("a"), GwId::of("b"), GwId::of("c"), GwId::of("d"));
        let mut roles = Roles::new();
        roles.insert(
            a,
            Role {
                v4: Some("192.0.2.1".parse().unwrap()),
                ..Role::default()
            },
        );
        roles.insert(
            b,
            Role {
                redirect: Some(2),
                ..Role::default()
            },
        );
        roles.insert(c, Role::default());
        let ids: BTreeSet<GwId> = [a, b, c, d].into_iter().collect();
        let t = role_texts(&roles, &ids);
        // Active: its rank in the mark, and the SNAT chain maps that rank to its address.
        assert_eq!(
            t[&gw_chain::<Ipv4Addr>(a)],
            format!(
                "meta mark set meta mark and 0x0000ffff or 0x00010000 counter name \"snated_{a}\" \
                 accept"
            )
        );
        let drop =
            |id: GwId| format!("counter name \"dropped\" counter name \"dropped_{id}\" drop");
        assert_eq!(
            t[SNAT_CHAIN],
            "meta nfproto ipv4 snat ip to meta mark and 0xffff0000 map { 0x00010000 : 192.0.2.1 }"
        );
        // Active without an IPv6 address: its IPv6 traffic is dropped, not redirected.
        assert_eq!(t[&gw_chain::<Ipv6Addr>(a)], drop(a));
        // Active elsewhere: what came through the overlay is dropped, the rest redirected.
        assert_eq!(
            t[&gw_chain::<Ipv4Addr>(b)],
            format!(
                "iifname \"egressd0\" counter name \"dropped\" counter name \"looped_{b}\" drop\n\
                 meta mark set meta mark and 0x0000ffff or 0x80020000 ct mark set ct mark or \
                 0x01000000 counter name \"redirected\" counter name \"redirected_{b}\" accept"
            )
        );
        assert_eq!(t[&gw_chain::<Ipv6Addr>(b)], t[&gw_chain::<Ipv4Addr>(b)]);
        // Nowhere, or not a gateway at all: dropped.
        for id in [c, d] {
            assert_eq!(t[&gw_chain::<Ipv4Addr>(id)], drop(id));
        }
        // A second active gateway gets the next rank; no active one leaves the SNAT chain empty.
        roles.insert(
            c,
            Role {
                v6: Some("2001:db8::1".parse().unwrap()),
                ..Role::default()
            },
        );
        let t = role_texts(&roles, &ids);
        let (mark_a, mark_c) = if a < c {
            ("0x00010000", "0x00020000")
        } else {
            ("0x00020000", "0x00010000")
        };
        assert!(t[&gw_chain::<Ipv4Addr>(a)].contains(&format!("{mark_a} counter")));
        assert!(t[&gw_chain::<Ipv6Addr>(c)].contains(&format!("{mark_c} counter")));
        assert!(t[SNAT_CHAIN].contains(&format!("{mark_a} : 192.0.2.1 }}")));
        assert!(t[SNAT_CHAIN].contains(&format!("{mark_c} : 2001:db8::1 }}")));
        assert_eq!(role_texts(&Roles::new(), &ids)[SNAT_CHAIN], "");
    }

    #[test]
    fn reads_counters() {
        let c = |n: &str, p: u64, b: u64| (n.to_owned(), p, b);
        let listed = [c("seen", 7, 900), c("not_snated", 2, 0), c("dropped", 1, 0)];
        let n = counters_of(&listed).unwrap();
        assert_eq!((n.seen, n.not_snated, n.dropped, n.snated()), (7, 2, 1, 4));
        assert!(DROP_RULE_COUNT.contains(&format!("\"{COUNTER_DROPPED}\"")));
        assert!(counters_of(&[]).is_err());
        let (a, b) = (GwId::of("a"), GwId::of("b"));
        let g = gateway_counters_of(&[
            c("seen", 7, 9),
            c(&format!("redirected_{a}"), 3, 180),
            c(&format!("dropped_{b}"), 1, 60),
            c("dropped_zz", 1, 60),
        ]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[&a][&Action::Redirected], (3, 180));
        assert_eq!(g[&b][&Action::Dropped], (1, 60));
    }
}
