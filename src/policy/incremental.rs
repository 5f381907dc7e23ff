//! Incremental compilation: a change of a few policies recompiles only the source ranges those
//! policies cover, with only the policies whose sources reach into them.
//!
//! Why that is exact: the outcome at a source address depends only on the policies whose sources
//! contain it. A change of policy `p` can change outcomes only inside `p`'s sources (old and new);
//! everywhere else the previous rows stay. Inside, the rows are recompiled from the policies that
//! reach in, clipped to the changed spans, and spliced in; adjacent rows with equal outcomes are
//! merged again, so the result is the one a full compile gives (a property test checks it).
//!
//! A policy with many destinations keeps its effective destinations cached, so that adding a
//! small policy next to a 100 000-CIDR one does not recompute the big one's pieces.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use imbl::OrdMap;
use imbl::ordmap::DiffItem;

use super::{
    Family, Piece, Row, SnatElement, SnatMap, compile_family, effective_destinations, flatten,
    flatten_v4, flatten_v6, middle,
};
use crate::model::Policy;
use ipnet::IpNet;

/// Policies with at least this many destination and exclusion CIDRs keep their effective
/// destinations between compiles (smaller ones are cheaper to recompute than to keep). The
/// tests use the cache for nearly every policy.
#[cfg(not(test))]
const CACHE_FROM: usize = 64;
#[cfg(test)]
const CACHE_FROM: usize = 2;

/// What the last [`Compiler::update`] did, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompileStats {
    /// Everything was compiled (first compile, or a change of more than a few policies).
    pub full: bool,
    /// Policies added, changed or removed (or whose gateway appeared or disappeared).
    pub changed: usize,
    /// Policies compiled again because their sources reach into the changed ranges.
    pub recompiled: usize,
}

struct Cached {
    policy: Arc<Policy>,
    pieces: [Arc<Vec<Piece>>; 2],
}

/// The compiled classification map with what it was compiled from.
#[derive(Default)]
pub struct Compiler {
    compiled: bool,
    policies: OrdMap<String, Arc<Policy>>,
    gateways: BTreeSet<String>,
    /// Rows per family: `[v4, v6]`.
    rows: [Vec<Row>; 2],
    index: [SourceIndex; 2],
    map: Arc<SnatMap>,
    big: HashMap<String, Cached>,
    last: CompileStats,
}

fn family_index(fam: Family) -> usize {
    match fam {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// Sorted, disjoint, non-adjacent union of `ranges`.
fn union(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if last.1.checked_add(1).is_none_or(|next| lo <= next) => {
                last.1 = last.1.max(hi);
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// A value over a range of positions, as `splice` moves it: a compiled row (a source range
/// and its outcome) or a piece of a policy's destinations (a range and its prefix length).
trait Ranged: Sized {
    fn range(&self) -> (u128, u128);
    /// The same value over `range` (a part of its own).
    fn over(&self, range: (u128, u128)) -> Self;
    /// Extends `self` over `next` when `next` starts right after it with an equal value.
    fn absorb(&mut self, next: &Self) -> bool;
}

impl Ranged for Row {
    fn range(&self) -> (u128, u128) {
        self.0
    }

    fn over(&self, range: (u128, u128)) -> Self {
        (range, Arc::clone(&self.1))
    }

    fn absorb(&mut self, next: &Self) -> bool {
        let ((_, hi), outcome) = self;
        let adjacent = hi.checked_add(1) == Some(next.0.0);
        if adjacent && (Arc::ptr_eq(outcome, &next.1) || **outcome == *next.1) {
            *hi = next.0.1;
            return true;
        }
        false
    }
}

impl Ranged for Piece {
    fn range(&self) -> (u128, u128) {
        (self.lo, self.hi)
    }

    fn over(&self, (lo, hi): (u128, u128)) -> Self {
        Piece { lo, hi, ..*self }
    }

    fn absorb(&mut self, next: &Self) -> bool {
        if self.len == next.len && self.hi.checked_add(1) == Some(next.lo) {
            self.hi = next.hi;
            return true;
        }
        false
    }
}

/// Pushes `item`, merged into the last one when adjacent with an equal value.
fn push_merged<T: Ranged>(out: &mut Vec<T>, item: T) {
    if !out.last_mut().is_some_and(|prev| prev.absorb(&item)) {
        out.push(item);
    }
}

/// The parts of `[lo, hi]` outside `spans` (sorted, disjoint; those ending before `lo` already
/// skipped), in order.
fn outside((lo, hi): (u128, u128), spans: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut parts = Vec::new();
    let mut from = Some(lo);
    let mut spans = spans.iter();
    while let Some(start) = from {
        match spans.next() {
            Some(&(a, b)) if a <= hi => {
                if a > start {
                    parts.push((start, a - 1));
                }
                from = if b >= hi { None } else { Some(b + 1) };
            }
            _ => {
                parts.push((start, hi));
                from = None;
            }
        }
    }
    parts
}

/// `old` without what lies inside `spans`, plus `fresh` (values inside `spans`), sorted, with
/// adjacent values that are equal merged. One pass; outcomes are shared, not copied.
fn splice<T: Ranged>(
    old: impl IntoIterator<Item = T>,
    spans: &[(u128, u128)],
    fresh: Vec<T>,
) -> Vec<T> {
    let old = old.into_iter();
    let mut out: Vec<T> = Vec::with_capacity(old.size_hint().0 + fresh.len());
    let mut fresh = fresh.into_iter().peekable();
    let mut k = 0;
    for item in old {
        let (lo, hi) = item.range();
        while k < spans.len() && spans[k].1 < lo {
            k += 1;
        }
        for range in outside((lo, hi), &spans[k..]) {
            while let Some(f) = fresh.next_if(|f| f.range().0 < range.0) {
                push_merged(&mut out, f);
            }
            push_merged(&mut out, item.over(range));
        }
    }
    for f in fresh {
        push_merged(&mut out, f);
    }
    out
}

/// [`splice`] on the part of `rows` the (non-empty) `spans` can touch, and the same change on
/// `elements`, the flattened `rows`: the cost follows the change, not the map (at 100 000
/// policies, flattening the whole map again was most of a one-policy change). The slice takes
/// one untouched row on each side, so that merges across its edges happen as in a full splice;
/// rows beyond those keep their neighbours, whose outer edges and outcomes do not change.
fn splice_local<A: Ord + Copy>(
    rows: &mut Vec<Row>,
    elements: &mut Vec<SnatElement<A>>,
    spans: &[(u128, u128)],
    fresh: Vec<Row>,
    conv: impl Fn(u128) -> A + Copy,
) {
    let (Some(first), Some(last)) = (spans.first(), spans.last()) else {
        return;
    };
    let a = rows.partition_point(|r| r.0.1 < first.0).saturating_sub(1);
    let b = (rows.partition_point(|r| r.0.0 <= last.1) + 1).min(rows.len());
    let (ea, eb) = match (rows.get(a), b.checked_sub(1).and_then(|l| rows.get(l))) {
        (Some(lo), Some(hi)) if a < b => (
            elements.partition_point(|e| e.src.0 < conv(lo.0.0)),
            elements.partition_point(|e| e.src.0 <= conv(hi.0.1)),
        ),
        _ => (0, 0),
    };
    let old: Vec<Row> = rows.drain(a..b).collect();
    let mid = splice(old, spans, fresh);
    elements.splice(ea..eb, flatten(&mid, conv));
    rows.splice(a..a, mid);
}

/// At most this many destination and exclusion CIDRs changed between two versions of a cached
/// policy for its pieces to be updated rather than computed whole.
const FEW_CHANGED: usize = 64;

/// The pieces of `after` in `fam`, from `old`, the pieces of `before` (the same policy before a
/// change), when the two differ by at most [`FEW_CHANGED`] destination and exclusion CIDRs
/// (compared as lists: what lies between their common beginning and end). `None` when more
/// changed.
///
/// Why that is exact: a position's piece depends only on the destinations and exclusions that
/// contain it, so outside the ranges of the changed CIDRs nothing changed; inside, the pieces
/// are computed from `after`'s CIDRs that meet those ranges, clipped, and spliced in, and
/// adjacent pieces of equal specificity are merged again. A property test checks it against
/// computing them whole. A one-CIDR edit of a 100 000-CIDR policy thus costs a scan of its
/// lists, not a sort of 200 000 events.
fn updated_destinations(
    before: &Policy,
    after: &Policy,
    old: &Arc<Vec<Piece>>,
    fam: Family,
) -> Option<Arc<Vec<Piece>>> {
    let (d0, d1) = middle(&before.destination_cidrs, &after.destination_cidrs);
    let (e0, e1) = middle(&before.excluded_cidrs, &after.excluded_cidrs);
    if d0.len() + d1.len() + e0.len() + e1.len() > FEW_CHANGED {
        return None;
    }
    let spans = union(
        [d0, d1, e0, e1]
            .into_iter()
            .flatten()
            .filter_map(|n| fam.range(n))
            .collect(),
    );
    if spans.is_empty() {
        return Some(old.clone());
    }
    let meets = |n: &IpNet| {
        fam.range(n).is_some_and(|(lo, hi)| {
            let k = spans.partition_point(|s| s.1 < lo);
            spans.get(k).is_some_and(|s| s.0 <= hi)
        })
    };
    let near = Policy {
        name: String::new(),
        egress_gateway_name: String::new(),
        source_cidrs: Vec::new(),
        destination_cidrs: after
            .destination_cidrs
            .iter()
            .copied()
            .filter(meets)
            .collect(),
        excluded_cidrs: after.excluded_cidrs.iter().copied().filter(meets).collect(),
    };
    // The fresh pieces, clipped to the spans.
    let mut fresh: Vec<Piece> = Vec::new();
    for p in effective_destinations(&near, fam) {
        let k = spans.partition_point(|s| s.1 < p.lo);
        for &(a, b) in spans[k..].iter().take_while(|s| s.0 <= p.hi) {
            fresh.push(Piece {
                lo: p.lo.max(a),
                hi: p.hi.min(b),
                len: p.len,
            });
        }
    }
    Some(Arc::new(splice(old.iter().copied(), &spans, fresh)))
}

/// Every policy's source ranges in one family, for "which policies reach into these spans".
#[derive(Default)]
struct SourceIndex {
    by_range: BTreeMap<(u128, u128), Vec<Arc<Policy>>>,
}

impl SourceIndex {
    fn insert(&mut self, p: &Arc<Policy>, fam: Family) {
        for r in p.source_cidrs.iter().filter_map(|n| fam.range(n)) {
            let list = self.by_range.entry(r).or_default();
            if !list.iter().any(|q| q.name == p.name) {
                list.push(p.clone());
            }
        }
    }

    fn remove(&mut self, p: &Policy, fam: Family) {
        for r in p.source_cidrs.iter().filter_map(|n| fam.range(n)) {
            if let Some(list) = self.by_range.get_mut(&r) {
                list.retain(|q| q.name != p.name);
                if list.is_empty() {
                    self.by_range.remove(&r);
                }
            }
        }
    }

    /// The policies with a source range meeting one of `spans`, in rank (name) order. A range
    /// that meets a span either starts inside it or contains its first address; source ranges
    /// are CIDRs, so the latter are among the few prefixes of that address.
    fn reaching(&self, spans: &[(u128, u128)], fam: Family) -> Vec<Arc<Policy>> {
        let mut out: Vec<Arc<Policy>> = Vec::new();
        let bits = fam.bits() as u32;
        for &(a, b) in spans {
            for (_, list) in self.by_range.range((a, 0)..=(b, u128::MAX)) {
                out.extend(list.iter().cloned());
            }
            for len in 0..bits {
                let host_bits = bits - len;
                let size_mask = if host_bits >= 128 {
                    u128::MAX
                } else {
                    (1u128 << host_bits) - 1
                };
                let lo = a & !size_mask;
                if lo < a
                    && let Some(list) = self.by_range.get(&(lo, lo | size_mask))
                {
                    out.extend(list.iter().cloned());
                }
            }
        }
        out.sort_by(|x, y| x.name.cmp(&y.name));
        out.dedup_by(|x, y| x.name == y.name);
        out
    }
}

impl Compiler {
    pub fn new() -> Compiler {
        Compiler::default()
    }

    /// The map as last compiled.
    pub fn map(&self) -> &Arc<SnatMap> {
        &self.map
    }

    pub fn last(&self) -> CompileStats {
        self.last
    }

    /// The classification map for `policies` with `gateways` existing, compiled from the
    /// previous one where only a few policies changed. Returns the same `Arc` when nothing did.
    pub fn update(
        &mut self,
        policies: &OrdMap<String, Arc<Policy>>,
        gateways: &BTreeSet<String>,
    ) -> Arc<SnatMap> {
        if self.compiled && self.policies.ptr_eq(policies) && self.gateways == *gateways {
            return self.map.clone();
        }
        let full = !self.compiled || self.changes_are_many(policies, gateways);
        let mut touched = if full {
            self.reindex(policies);
            [Vec::new(), Vec::new()]
        } else {
            self.note_changes(policies, gateways)
        };

        let Compiler {
            rows, index, big, ..
        } = self;
        let mut pieces = |p: &Arc<Policy>, fam: Family| -> Arc<Vec<Piece>> {
            if p.destination_cidrs.len() + p.excluded_cidrs.len() < CACHE_FROM {
                big.remove(&p.name);
                return Arc::new(effective_destinations(p, fam));
            }
            if let Some(c) = big.get(&p.name).filter(|c| Arc::ptr_eq(&c.policy, p)) {
                return c.pieces[family_index(fam)].clone();
            }
            let before = big.get(&p.name);
            let pieces = [Family::V4, Family::V6].map(|f| {
                before
                    .and_then(|c| updated_destinations(&c.policy, p, &c.pieces[family_index(f)], f))
                    .unwrap_or_else(|| Arc::new(effective_destinations(p, f)))
            });
            let out = pieces[family_index(fam)].clone();
            big.insert(
                p.name.clone(),
                Cached {
                    policy: p.clone(),
                    pieces,
                },
            );
            out
        };
        let mut recompiled = 0;
        let mut map = SnatMap::clone(&self.map);
        for fam in [Family::V4, Family::V6] {
            let i = family_index(fam);
            if full {
                let all: Vec<Arc<Policy>> = policies.values().cloned().collect();
                recompiled = all.len();
                rows[i] = compile_family(&all, &mut pieces, gateways, fam, None);
            } else {
                let spans = union(std::mem::take(&mut touched[i]));
                if spans.is_empty() {
                    continue; // this family's elements stay as they are
                }
                let reach = index[i].reaching(&spans, fam);
                recompiled += reach.len();
                let fresh = compile_family(&reach, &mut pieces, gateways, fam, Some(&spans));
                match fam {
                    Family::V4 => splice_local(&mut rows[i], &mut map.v4, &spans, fresh, |x| {
                        Ipv4Addr::from(x as u32)
                    }),
                    Family::V6 => {
                        splice_local(&mut rows[i], &mut map.v6, &spans, fresh, Ipv6Addr::from)
                    }
                }
                continue;
            }
            match fam {
                Family::V4 => map.v4 = flatten_v4(&rows[i]),
                Family::V6 => map.v6 = flatten_v6(&rows[i]),
            }
        }
        if full {
            // What the cache holds for policies that are gone stays out of the next compile.
            self.big.retain(|name, c| {
                policies
                    .get(name)
                    .is_some_and(|p| Arc::ptr_eq(p, &c.policy))
            });
        }
        self.compiled = true;
        self.policies = policies.clone();
        self.gateways = gateways.clone();
        self.map = Arc::new(map);
        self.last = CompileStats {
            full,
            changed: self.last.changed,
            recompiled,
        };
        self.map.clone()
    }

    /// Whether so many policies changed that one pass over everything is cheaper than splicing.
    fn changes_are_many(
        &mut self,
        policies: &OrdMap<String, Arc<Policy>>,
        gateways: &BTreeSet<String>,
    ) -> bool {
        let limit = policies.len() / 8 + 256;
        let mut changed = self.policies.diff(policies).take(limit + 1).count();
        let appeared: BTreeSet<&String> = self.gateways.symmetric_difference(gateways).collect();
        if !appeared.is_empty() {
            changed += policies
                .values()
                .filter(|p| appeared.contains(&p.egress_gateway_name))
                .count();
        }
        self.last.changed = changed;
        changed > limit
    }

    /// Rebuilds the source index from scratch (before a full compile).
    fn reindex(&mut self, policies: &OrdMap<String, Arc<Policy>>) {
        self.index = Default::default();
        for p in policies.values() {
            for fam in [Family::V4, Family::V6] {
                self.index[family_index(fam)].insert(p, fam);
            }
        }
    }

    /// Brings the source index up to date with `policies` and returns, per family, the source
    /// ranges whose outcome may have changed.
    fn note_changes(
        &mut self,
        policies: &OrdMap<String, Arc<Policy>>,
        gateways: &BTreeSet<String>,
    ) -> [Vec<(u128, u128)>; 2] {
        let mut touched: [Vec<(u128, u128)>; 2] = [Vec::new(), Vec::new()];
        let mut note = |p: &Policy| {
            for fam in [Family::V4, Family::V6] {
                touched[family_index(fam)]
                    .extend(p.source_cidrs.iter().filter_map(|n| fam.range(n)));
            }
        };
        for d in self.policies.diff(policies) {
            let (old, new) = match d {
                DiffItem::Add(_, p) => (None, Some(p)),
                DiffItem::Remove(_, p) => (Some(p), None),
                DiffItem::Update { old, new } => (Some(old.1), Some(new.1)),
            };
            if let Some(p) = old {
                note(p);
                // An updated policy keeps its entry: its new pieces are computed from the old
                // ones where only a few of its CIDRs changed (`updated_destinations`).
                if new.is_none() {
                    self.big.remove(&p.name);
                }
                for fam in [Family::V4, Family::V6] {
                    self.index[family_index(fam)].remove(p, fam);
                }
            }
            if let Some(p) = new {
                note(p);
                for fam in [Family::V4, Family::V6] {
                    self.index[family_index(fam)].insert(p, fam);
                }
            }
        }
        // A gateway that appeared or disappeared changes the outcome of its policies' sources.
        let appeared: BTreeSet<&String> = self.gateways.symmetric_difference(gateways).collect();
        if !appeared.is_empty() {
            for p in policies.values() {
                if appeared.contains(&p.egress_gateway_name) {
                    note(p);
                }
            }
        }
        touched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile;
    use ipnet::IpNet;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn v4(a: u32, len: u8) -> IpNet {
        IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), len).unwrap()
    }

    /// Small address space (10.0.0.0/24 and around) so that ranges overlap often.
    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            6 => (0u32..256, 26u8..=32).prop_map(|(a, l)| v4(0x0a00_0000 + a, l).trunc()),
            1 => (0u32..4, 22u8..26).prop_map(|(a, l)| v4(0x0a00_0000 + (a << 8), l).trunc()),
            1 => Just("0.0.0.0/0".parse().unwrap()),
            1 => (0u16..4).prop_map(|a| format!("fd00::{a}/127").parse::<IpNet>().unwrap().trunc()),
        ]
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            prop::sample::select(vec!["a", "b", "c", "d", "e", "f", "g", "h"]),
            prop::sample::select(vec!["g0", "g1", "g2"]),
            prop::collection::vec(arb_net(), 1..3),
            prop::collection::vec(arb_net(), 1..4),
            prop::collection::vec(arb_net(), 0..2),
        )
            .prop_map(|(name, gw, s, d, e)| Policy {
                name: name.into(),
                egress_gateway_name: gw.into(),
                source_cidrs: s,
                destination_cidrs: d,
                excluded_cidrs: e,
            })
    }

    #[derive(Debug, Clone)]
    enum Step {
        Put(Policy),
        Remove(usize),
        Gateways(Vec<&'static str>),
        /// One CIDR added to or taken out of a policy's destinations or exclusions (as
        /// `egressd policy add-cidrs`/`remove-cidrs` do).
        Edit(usize, Edit),
    }

    #[derive(Debug, Clone)]
    struct Edit {
        excluded: bool,
        add: Option<IpNet>,
        remove_at: usize,
    }

    fn arb_edit() -> impl Strategy<Value = Edit> {
        (any::<bool>(), prop::option::of(arb_net()), 0usize..8).prop_map(
            |(excluded, add, remove_at)| Edit {
                excluded,
                add,
                remove_at,
            },
        )
    }

    impl Edit {
        fn apply(&self, p: &Policy) -> Policy {
            let mut p = p.clone();
            let list = if self.excluded {
                &mut p.excluded_cidrs
            } else {
                &mut p.destination_cidrs
            };
            match self.add {
                Some(n) if !list.contains(&n) => list.push(n),
                Some(_) => {}
                None if list.len() > 1 => {
                    list.remove(self.remove_at % list.len());
                }
                None => {}
            }
            p
        }
    }

    fn arb_step() -> impl Strategy<Value = Step> {
        prop_oneof![
            5 => arb_policy().prop_map(Step::Put),
            2 => (0usize..8).prop_map(Step::Remove),
            1 => prop::sample::subsequence(vec!["g0", "g1", "g2"], 0..=3).prop_map(Step::Gateways),
            4 => (0usize..8, arb_edit()).prop_map(|(i, e)| Step::Edit(i, e)),
        ]
    }

    fn gws(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// After every step, the incremental map equals a full compile of the same policies.
        #[test]
        fn incremental_equals_full(
            start in prop::collection::vec(arb_policy(), 0..6),
            steps in prop::collection::vec(arb_step(), 1..12),
        ) {
            let mut policies: OrdMap<String, Arc<Policy>> =
                start.into_iter().map(|p| (p.name.clone(), Arc::new(p))).collect();
            let mut gateways = gws(&["g0", "g1"]);
            let mut c = Compiler::new();
            c.update(&policies, &gateways);
            for step in steps {
                match step {
                    Step::Put(p) => {
                        policies.insert(p.name.clone(), Arc::new(p));
                    }
                    Step::Remove(i) => {
                        if let Some(k) = policies.keys().nth(i).cloned() {
                            policies.remove(&k);
                        }
                    }
                    Step::Gateways(g) => gateways = gws(&g),
                    Step::Edit(i, e) => {
                        if let Some(p) = policies.values().nth(i).cloned() {
                            policies.insert(p.name.clone(), Arc::new(e.apply(&p)));
                        }
                    }
                }
                let got = c.update(&policies, &gateways);
                let list: Vec<Policy> = policies.values().map(|p| (**p).clone()).collect();
                let want = compile(&list, &gateways);
                prop_assert_eq!(&*got, &want);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// A cached policy's pieces updated for a few changed CIDRs equal the pieces computed
        /// whole, in both families, after every edit.
        #[test]
        fn updated_pieces_equal_pieces_computed_whole(
            start in arb_policy(),
            more in prop::collection::vec(arb_net(), 0..24),
            edits in prop::collection::vec(arb_edit(), 1..10),
        ) {
            let mut p = start;
            for n in more {
                if !p.destination_cidrs.contains(&n) {
                    p.destination_cidrs.push(n);
                }
            }
            let mut pieces = [Family::V4, Family::V6].map(|f| Arc::new(effective_destinations(&p, f)));
            for e in edits {
                let next = e.apply(&p);
                for (i, f) in [Family::V4, Family::V6].into_iter().enumerate() {
                    let got = updated_destinations(&p, &next, &pieces[i], f)
                        .expect("a one-CIDR edit is few");
                    prop_assert_eq!(&*got, &effective_destinations(&next, f), "{:?} {:?}", f, e);
                    pieces[i] = got;
                }
                p = next;
            }
        }
    }

    #[test]
    fn many_changed_cidrs_are_computed_whole() {
        let p = |n: u32| Policy {
            name: "big".into(),
            egress_gateway_name: "g0".into(),
            source_cidrs: vec![v4(0x0a00_0000, 24)],
            destination_cidrs: (0..n).map(|i| v4(0x0b00_0000 + (i << 8), 24)).collect(),
            excluded_cidrs: vec![],
        };
        let (a, b) = (p(10), p(10 + FEW_CHANGED as u32 + 1));
        let old = Arc::new(effective_destinations(&a, Family::V4));
        assert!(updated_destinations(&a, &b, &old, Family::V4).is_none());
        let c = p(11);
        let got = updated_destinations(&a, &c, &old, Family::V4).unwrap();
        assert_eq!(*got, effective_destinations(&c, Family::V4));
        // Nothing changed in this family: the same pieces, not a copy.
        let v6 = Arc::new(effective_destinations(&a, Family::V6));
        assert!(Arc::ptr_eq(
            &updated_destinations(&a, &c, &v6, Family::V6).unwrap(),
            &v6
        ));
    }

    #[test]
    fn unchanged_input_returns_the_same_map() {
        let mut policies = OrdMap::new();
        let p = Policy {
            name: "a".into(),
            egress_gateway_name: "g0".into(),
            source_cidrs: vec![v4(0x0a00_0000, 24)],
            destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            excluded_cidrs: vec![],
        };
        policies.insert("a".to_string(), Arc::new(p));
        let mut c = Compiler::new();
        let m1 = c.update(&policies, &gws(&["g0"]));
        let m2 = c.update(&policies.clone(), &gws(&["g0"]));
        assert!(Arc::ptr_eq(&m1, &m2));
        assert!(c.last().full);
    }

    #[test]
    fn one_change_among_many_recompiles_only_its_neighbours() {
        let mut policies: OrdMap<String, Arc<Policy>> = (0..10_000u32)
            .map(|i| {
                let p = Policy {
                    name: format!("p{i:05}"),
                    egress_gateway_name: "g0".into(),
                    source_cidrs: vec![v4(0x0a00_0000 + 2 * i, 32)],
                    destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                    excluded_cidrs: vec![],
                };
                (p.name.clone(), Arc::new(p))
            })
            .collect();
        let gateways = gws(&["g0", "g1"]);
        let mut c = Compiler::new();
        c.update(&policies, &gateways);
        let mut p = (*policies["p00042"]).clone();
        p.egress_gateway_name = "g1".into();
        policies.insert(p.name.clone(), Arc::new(p));
        let got = c.update(&policies, &gateways);
        let stats = c.last();
        assert!(!stats.full);
        assert_eq!((stats.changed, stats.recompiled), (1, 1));
        let list: Vec<Policy> = policies.values().map(|p| (**p).clone()).collect();
        assert_eq!(*got, compile(&list, &gateways));
    }

    /// Figures, not assertions: `cargo test --release --lib incremental::tests::perf_100k --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn perf_100k() {
        use std::time::Instant;
        let gateways = gws(&["g0", "g1"]);
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        // Many small policies: 100 000 /32 sources to 0.0.0.0/0.
        let mut policies: OrdMap<String, Arc<Policy>> = (0..100_000u32)
            .map(|i| {
                let p = Policy {
                    name: format!("p{i:06}"),
                    egress_gateway_name: "g0".into(),
                    source_cidrs: vec![v4(0x0a00_0000 + 2 * i, 32)],
                    destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                    excluded_cidrs: vec![],
                };
                (p.name.clone(), Arc::new(p))
            })
            .collect();
        let mut c = Compiler::new();
        let t = Instant::now();
        c.update(&policies, &gateways);
        println!("sources shape, full compile: {:?}", t.elapsed());
        let mut times = vec![];
        for r in 0..21u32 {
            let p = Policy {
                name: format!("new{r}"),
                egress_gateway_name: "g1".into(),
                source_cidrs: vec![v4(0x0b00_0000 + r, 32)],
                destination_cidrs: vec!["203.0.113.0/24".parse().unwrap()],
                excluded_cidrs: vec![],
            };
            policies.insert(p.name.clone(), Arc::new(p));
            let t = Instant::now();
            c.update(&policies, &gateways);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "sources shape, one policy added: median {:.2} ms ({:?})",
            median(times),
            c.last()
        );

        // One policy with 100 000 destination CIDRs.
        let big = Policy {
            name: "big".into(),
            egress_gateway_name: "g0".into(),
            source_cidrs: vec!["10.100.0.0/16".parse().unwrap()],
            destination_cidrs: (0..100_000u32)
                .map(|i| v4(0x2000_0000 + (i << 9), 24))
                .collect(),
            excluded_cidrs: vec![],
        };
        let mut policies: OrdMap<String, Arc<Policy>> = OrdMap::new();
        policies.insert("big".into(), Arc::new(big));
        let mut c = Compiler::new();
        let t = Instant::now();
        let m = c.update(&policies, &gateways);
        println!(
            "destinations shape, full compile: {:?}, {} elements",
            t.elapsed(),
            m.len()
        );
        assert_eq!(m.len(), 100_000);
        let mut added = vec![];
        let mut grown = vec![];
        for r in 0..11u32 {
            let p = Policy {
                name: format!("new{r}"),
                egress_gateway_name: "g1".into(),
                source_cidrs: vec!["10.100.0.0/16".parse().unwrap()],
                destination_cidrs: vec![v4(0xc000_0000 + (r << 8), 24)],
                excluded_cidrs: vec![],
            };
            policies.insert(p.name.clone(), Arc::new(p));
            let t = Instant::now();
            c.update(&policies, &gateways);
            added.push(t.elapsed().as_secs_f64() * 1e3);
            let mut b = (*policies["big"]).clone();
            b.destination_cidrs.push(v4(0xd000_0000 + (r << 8), 24));
            policies.insert("big".into(), Arc::new(b));
            let t = Instant::now();
            c.update(&policies, &gateways);
            grown.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "destinations shape: a one-CIDR policy added with the same source: median {:.2} ms; one CIDR added to the big policy: median {:.2} ms ({:?}, {} elements)",
            median(added),
            median(grown),
            c.last(),
            c.map().len()
        );
    }
}
