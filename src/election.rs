//! The election: which eligible node is active for each gateway.
//!
//! Pure and deterministic: every node of the cluster runs it on the same committed input (node
//! states, gateways, the current assignment) and must reach the same answer, so there is no
//! randomness, no clock and no dependence on the order in which nodes are listed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Assignment, Gateway, InterfaceNeed, NodeName, NodeState, Selection};

/// Everything the election looks at.
#[derive(Debug, Clone, Copy)]
pub struct ElectionInput<'a> {
    /// Node states in any order. When a name appears twice, the first entry wins (the others are
    /// ignored), so a stale duplicate cannot make a node both eligible and ineligible.
    pub nodes: &'a [NodeState],
    /// Gateways in any order. When a name appears twice, the first entry wins.
    pub gateways: &'a [Gateway],
    /// The assignment in force; consulted for `preempt = false` stickiness and reported as
    /// `previous`.
    pub current: &'a Assignment,
}

/// The outcome of one election round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The new assignment: only gateways that have an active node.
    pub assignment: Assignment,
    /// Per gateway of the input, the explanation of the decision (for status and logs).
    pub gateways: BTreeMap<String, GatewayDecision>,
    /// Gateways that had an active node in `current` but are no longer configured, with that
    /// node: kept so that `changed()` reports their release too.
    pub removed: BTreeMap<String, NodeName>,
}

/// The decision for one gateway, with enough detail to explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayDecision {
    pub active: Option<NodeName>,
    /// The active node in `current`, if any.
    pub previous: Option<NodeName>,
    /// Eligible nodes in selection order (alphabetical or rendezvous). With `preempt = true` the
    /// active node is the first; with `preempt = false` a sticky holder may be further down.
    pub eligible: Vec<NodeName>,
    /// Every known node that is not eligible, with the first failing check.
    pub ineligible: BTreeMap<NodeName, Ineligible>,
}

/// Why a node cannot be active for a gateway. Checks run in the order of the variants and only
/// the first failure is reported, so the explanation is stable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Ineligible {
    SelectorMismatch { key: String },
    NotAlive,
    Cordoned,
    NotReady,
    InterfaceMissing { interface: String },
    InterfaceDown { interface: String },
    NoIpv4 { interface: String },
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::SelectorMismatch { key } => {
                write!(f, "label {key} missing or different")
            }
            Ineligible::NotAlive => f.write_str("not a live cluster member"),
            Ineligible::Cordoned => f.write_str("cordoned"),
            Ineligible::NotReady => f.write_str("daemon not ready"),
            Ineligible::InterfaceMissing { interface } => {
                write!(f, "interface {interface} missing")
            }
            Ineligible::InterfaceDown { interface } => write!(f, "interface {interface} down"),
            Ineligible::NoIpv4 { interface } => {
                write!(f, "interface {interface} has no IPv4 address")
            }
        }
    }
}

impl Decision {
    /// Gateways whose active node changes: `(gateway, from, to)`, in gateway-name order.
    /// Includes gateways that disappeared from the configuration (`to = None`).
    pub fn changed(&self) -> impl Iterator<Item = (&str, Option<&str>, Option<&str>)> {
        let configured = self.gateways.iter().filter_map(|(name, g)| {
            (g.previous != g.active).then_some((
                name.as_str(),
                g.previous.as_deref(),
                g.active.as_deref(),
            ))
        });
        let removed = self
            .removed
            .iter()
            .map(|(name, node)| (name.as_str(), Some(node.as_str()), None));
        configured.chain(removed)
    }
}

/// Why `node` cannot serve `gateway`, or `None` when it is eligible.
pub fn ineligibility(gateway: &Gateway, node: &NodeState) -> Option<Ineligible> {
    // Liveness first: what a silent node reported last (labels, interfaces) is not known to
    // hold any more, so any other reason would mislead.
    if !node.alive {
        return Some(Ineligible::NotAlive);
    }
    if let Some(key) = gateway.selector_mismatch(&node.labels) {
        return Some(Ineligible::SelectorMismatch {
            key: key.to_owned(),
        });
    }
    if node.cordoned {
        return Some(Ineligible::Cordoned);
    }
    if !node.ready {
        return Some(Ineligible::NotReady);
    }
    for (name, need) in gateway.required_interfaces() {
        let interface = name.to_owned();
        match node.interfaces.get(name) {
            None => return Some(Ineligible::InterfaceMissing { interface }),
            Some(st) if !st.up => return Some(Ineligible::InterfaceDown { interface }),
            Some(st) if need == InterfaceNeed::UpWithIpv4 && st.primary_ipv4.is_none() => {
                return Some(Ineligible::NoIpv4 { interface });
            }
            Some(_) => {}
        }
    }
    None
}

/// The rendezvous weight of `node` for `gateway`: sha256(gateway + "#" + node). Higher weight
/// comes first; when a node leaves, only the gateways it was first for move.
fn rendezvous_weight(gateway: &str, node: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(gateway.as_bytes());
    h.update(b"#");
    h.update(node.as_bytes());
    h.finalize().into()
}

/// Sorts eligible node names into the gateway's selection order.
fn order(gateway: &Gateway, names: &mut [&str]) {
    match gateway.selection {
        Selection::Alphabetical => names.sort_unstable(),
        Selection::Spread => names.sort_by_cached_key(|n| {
            (
                std::cmp::Reverse(rendezvous_weight(&gateway.name, n)),
                n.to_string(),
            )
        }),
    }
}

/// Runs one election round. See the module documentation for the guarantees.
pub fn elect(input: &ElectionInput) -> Decision {
    // First entry of a duplicated node name wins; the map also fixes the iteration order.
    let mut nodes: BTreeMap<&str, &NodeState> = BTreeMap::new();
    for n in input.nodes {
        nodes.entry(n.name.as_str()).or_insert(n);
    }

    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut assignment = Assignment::new();
    let mut gateways = BTreeMap::new();
    for gw in input.gateways {
        if !seen.insert(gw.name.as_str()) {
            continue;
        }
        let mut eligible: Vec<&str> = Vec::new();
        let mut ineligible = BTreeMap::new();
        for (name, node) in &nodes {
            match ineligibility(gw, node) {
                None => eligible.push(name),
                Some(why) => {
                    ineligible.insert((*name).to_owned(), why);
                }
            }
        }
        order(gw, &mut eligible);
        let previous = input.current.get(&gw.name).cloned();
        let sticky = previous
            .as_deref()
            .filter(|p| !gw.preempt && eligible.contains(p));
        let active = sticky
            .or_else(|| eligible.first().copied())
            .map(str::to_owned);
        if let Some(a) = &active {
            assignment.insert(gw.name.clone(), a.clone());
        }
        gateways.insert(
            gw.name.clone(),
            GatewayDecision {
                active,
                previous,
                eligible: eligible.into_iter().map(str::to_owned).collect(),
                ineligible,
            },
        );
    }
    let removed = input
        .current
        .iter()
        .filter(|(g, _)| !seen.contains(g.as_str()))
        .map(|(g, n)| (g.clone(), n.clone()))
        .collect();
    Decision {
        assignment,
        gateways,
        removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{InterfaceState, Labels, NextHop, SourceIp};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const ROLE: &str = "node-role.deckhouse.io/egress";

    fn role() -> Labels {
        [(ROLE.to_owned(), String::new())].into_iter().collect()
    }

    fn up(ip: bool) -> InterfaceState {
        InterfaceState {
            up: true,
            primary_ipv4: ip.then_some(Ipv4Addr::new(192, 0, 2, 1)),
        }
    }

    fn node(name: &str) -> NodeState {
        NodeState {
            name: name.to_owned(),
            labels: role(),
            cordoned: false,
            alive: true,
            ready: true,
            interfaces: [("eth0".to_owned(), up(true)), ("eth1".to_owned(), up(true))]
                .into_iter()
                .collect(),
        }
    }

    fn gw(name: &str, selection: Selection, preempt: bool) -> Gateway {
        Gateway {
            name: name.to_owned(),
            node_selector: role(),
            selection,
            preempt,
            source_ip: SourceIp::PrimaryIp {
                interface: "eth1".to_owned(),
            },
            next_hop: None,
            conntrack_sync: false,
        }
    }

    fn run(nodes: &[NodeState], gws: &[Gateway], current: &Assignment) -> Decision {
        elect(&ElectionInput {
            nodes,
            gateways: gws,
            current,
        })
    }

    fn reason(n: NodeState, g: Gateway) -> Option<Ineligible> {
        let d = run(
            std::slice::from_ref(&n),
            std::slice::from_ref(&g),
            &Assignment::new(),
        );
        d.gateways[&g.name].ineligible.get(&n.name).cloned()
    }

    #[test]
    fn every_reason_in_order() {
        let g = gw("g", Selection::Alphabetical, true);
        assert_eq!(reason(node("a"), g.clone()), None);

        let mut n = node("a");
        n.labels.clear();
        n.alive = false; // later checks fail too: the first reason wins
        assert_eq!(reason(n, g.clone()), Some(Ineligible::NotAlive));
        let mut n = node("a");
        n.labels.clear();
        n.cordoned = true;
        assert_eq!(
            reason(n, g.clone()),
            Some(Ineligible::SelectorMismatch { key: ROLE.into() })
        );
        let mut n = node("a");
        n.labels.insert(ROLE.into(), "x".into()); // empty value matches only empty
        assert!(matches!(
            reason(n, g.clone()),
            Some(Ineligible::SelectorMismatch { .. })
        ));

        let mut n = node("a");
        n.alive = false;
        n.cordoned = true;
        assert_eq!(reason(n, g.clone()), Some(Ineligible::NotAlive));

        let mut n = node("a");
        n.cordoned = true;
        n.ready = false;
        assert_eq!(reason(n, g.clone()), Some(Ineligible::Cordoned));

        let mut n = node("a");
        n.ready = false;
        n.interfaces.clear();
        assert_eq!(reason(n, g.clone()), Some(Ineligible::NotReady));

        let mut n = node("a");
        n.interfaces.remove("eth1");
        assert_eq!(
            reason(n, g.clone()),
            Some(Ineligible::InterfaceMissing {
                interface: "eth1".into()
            })
        );

        let mut n = node("a");
        n.interfaces.insert(
            "eth1".into(),
            InterfaceState {
                up: false,
                primary_ipv4: None,
            },
        );
        assert_eq!(
            reason(n, g.clone()),
            Some(Ineligible::InterfaceDown {
                interface: "eth1".into()
            })
        );

        let mut n = node("a");
        n.interfaces.insert("eth1".into(), up(false));
        assert_eq!(
            reason(n.clone(), g.clone()),
            Some(Ineligible::NoIpv4 {
                interface: "eth1".into()
            })
        );
        // A VIP gateway only needs the interface up.
        let mut vip = g.clone();
        vip.source_ip = SourceIp::VirtualIp {
            ip: "198.18.0.50".parse().unwrap(),
            interfaces: vec!["eth1".into()],
        };
        assert_eq!(reason(n.clone(), vip.clone()), None);
        // ... and the next-hop interface too.
        vip.next_hop = Some(NextHop {
            ip: "10.77.0.1".parse().unwrap(),
            interface: "eth9".into(),
        });
        assert_eq!(
            reason(n, vip),
            Some(Ineligible::InterfaceMissing {
                interface: "eth9".into()
            })
        );
    }

    #[test]
    fn display_texts() {
        let cases = [
            (
                Ineligible::SelectorMismatch { key: ROLE.into() },
                "label node-role.deckhouse.io/egress missing or different",
            ),
            (Ineligible::NotAlive, "not a live cluster member"),
            (Ineligible::Cordoned, "cordoned"),
            (Ineligible::NotReady, "daemon not ready"),
            (
                Ineligible::InterfaceMissing {
                    interface: "eth1".into(),
                },
                "interface eth1 missing",
            ),
            (
                Ineligible::InterfaceDown {
                    interface: "eth1".into(),
                },
                "interface eth1 down",
            ),
            (
                Ineligible::NoIpv4 {
                    interface: "eth1".into(),
                },
                "interface eth1 has no IPv4 address",
            ),
        ];
        for (r, text) in cases {
            assert_eq!(r.to_string(), text);
        }
        let json = serde_json::to_value(Ineligible::InterfaceDown {
            interface: "eth1".into(),
        })
        .unwrap();
        assert_eq!(json["reason"], "interface_down");
    }

    #[test]
    fn alphabetical_first_eligible_and_preemption() {
        let g = gw("g", Selection::Alphabetical, true);
        let nodes = [node("gw3"), node("gw1"), node("gw2")];
        let d = run(&nodes, std::slice::from_ref(&g), &Assignment::new());
        assert_eq!(d.assignment["g"], "gw1");
        assert_eq!(d.gateways["g"].eligible, ["gw1", "gw2", "gw3"]);
        assert_eq!(d.changed().collect::<Vec<_>>(), [("g", None, Some("gw1"))]);

        // gw1 cordoned: gw2 takes over.
        let mut n2 = nodes.clone();
        n2[1].cordoned = true;
        let d2 = run(&n2, std::slice::from_ref(&g), &d.assignment);
        assert_eq!(d2.assignment["g"], "gw2");
        assert_eq!(d2.gateways["g"].ineligible["gw1"], Ineligible::Cordoned);
        assert_eq!(
            d2.changed().collect::<Vec<_>>(),
            [("g", Some("gw1"), Some("gw2"))]
        );

        // gw1 back: preemption gives it the role back.
        let d3 = run(&nodes, std::slice::from_ref(&g), &d2.assignment);
        assert_eq!(d3.assignment["g"], "gw1");
    }

    #[test]
    fn no_preempt_keeps_eligible_holder() {
        let g = gw("g", Selection::Alphabetical, false);
        let nodes = [node("gw1"), node("gw2")];
        let current: Assignment = [("g".to_owned(), "gw2".to_owned())].into();
        let d = run(&nodes, std::slice::from_ref(&g), &current);
        assert_eq!(d.assignment["g"], "gw2");
        assert_eq!(d.changed().count(), 0);
        // Holder gone: falls back to the order.
        let d = run(&nodes[..1], std::slice::from_ref(&g), &current);
        assert_eq!(d.assignment["g"], "gw1");
        // Holder unknown as a node at all.
        let current: Assignment = [("g".to_owned(), "zz".to_owned())].into();
        assert_eq!(run(&nodes, &[g], &current).assignment["g"], "gw1");
    }

    #[test]
    fn none_eligible_and_removed_gateways() {
        let g = gw("g", Selection::Alphabetical, true);
        let mut n = node("gw1");
        n.ready = false;
        let current: Assignment = [
            ("g".to_owned(), "gw1".to_owned()),
            ("gone".to_owned(), "gw1".to_owned()),
        ]
        .into();
        let d = run(&[n], &[g], &current);
        assert!(d.assignment.is_empty());
        assert_eq!(d.gateways["g"].active, None);
        assert!(d.gateways["g"].eligible.is_empty());
        assert!(!d.gateways.contains_key("gone"));
        assert_eq!(
            d.changed().collect::<Vec<_>>(),
            [("g", Some("gw1"), None), ("gone", Some("gw1"), None)]
        );
    }

    #[test]
    fn duplicate_node_first_wins() {
        let g = gw("g", Selection::Alphabetical, true);
        let mut bad = node("gw1");
        bad.alive = false;
        let d = run(
            &[bad.clone(), node("gw1")],
            std::slice::from_ref(&g),
            &Assignment::new(),
        );
        assert!(d.assignment.is_empty());
        let d = run(&[node("gw1"), bad], &[g], &Assignment::new());
        assert_eq!(d.assignment["g"], "gw1");
    }

    #[test]
    fn spread_order_is_rendezvous() {
        let g = gw("g", Selection::Spread, true);
        let nodes: Vec<_> = ["a", "b", "c", "d"].into_iter().map(node).collect();
        let d = run(&nodes, std::slice::from_ref(&g), &Assignment::new());
        let mut expect = vec!["a", "b", "c", "d"];
        expect.sort_by_key(|n| std::cmp::Reverse(rendezvous_weight("g", n)));
        assert_eq!(d.gateways["g"].eligible, expect);
        assert_eq!(d.assignment["g"], expect[0]);
        // The weight is sha256 of "g#a".
        let direct: [u8; 32] = Sha256::digest(b"g#a").into();
        assert_eq!(rendezvous_weight("g", "a"), direct);
    }

    #[test]
    fn spread_actually_spreads() {
        let nodes: Vec<_> = (1..=5).map(|i| node(&format!("gw{i}"))).collect();
        let gws: Vec<_> = (0..100)
            .map(|i| gw(&format!("gateway-{i}"), Selection::Spread, true))
            .collect();
        let d = run(&nodes, &gws, &Assignment::new());
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for a in d.assignment.values() {
            *per.entry(a).or_default() += 1;
        }
        assert_eq!(per.len(), 5, "{per:?}");
        assert!(per.values().all(|&c| c >= 5), "{per:?}");
    }

    // ---- properties ----

    const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
    const GWS: [&str; 4] = ["g0", "g1", "g2", "g3"];

    fn arb_node() -> impl Strategy<Value = NodeState> {
        (
            0..NAMES.len(),
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.85),
            0..4u8,
        )
            .prop_map(|(i, labelled, alive, cordoned, ready, ifs)| {
                let mut n = node(NAMES[i]);
                if !labelled {
                    n.labels.clear();
                }
                n.alive = alive;
                n.cordoned = cordoned;
                n.ready = ready;
                match ifs {
                    0 => {}
                    1 => {
                        n.interfaces.remove("eth1");
                    }
                    2 => {
                        n.interfaces.insert(
                            "eth1".into(),
                            InterfaceState {
                                up: false,
                                primary_ipv4: None,
                            },
                        );
                    }
                    _ => {
                        n.interfaces.insert("eth1".into(), up(false));
                    }
                }
                n
            })
    }

    fn arb_gateway(i: usize) -> impl Strategy<Value = Gateway> {
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            move |(spread, preempt, vip, selector)| {
                let sel = if spread {
                    Selection::Spread
                } else {
                    Selection::Alphabetical
                };
                let mut g = gw(GWS[i], sel, preempt);
                if vip {
                    g.source_ip = SourceIp::VirtualIp {
                        ip: "198.18.0.50".parse().unwrap(),
                        interfaces: vec!["eth1".into()],
                    };
                }
                if !selector {
                    g.node_selector.clear();
                }
                g
            },
        )
    }

    fn arb_input() -> impl Strategy<Value = (Vec<NodeState>, Vec<Gateway>, Assignment)> {
        (
            prop::collection::vec(arb_node(), 0..9),
            (
                arb_gateway(0),
                arb_gateway(1),
                arb_gateway(2),
                arb_gateway(3),
            ),
            prop::collection::btree_map(
                prop::sample::select(GWS.to_vec()),
                prop::sample::select(NAMES.to_vec()),
                0..4,
            ),
        )
            .prop_map(|(nodes, (a, b, c, d), cur)| {
                let cur = cur
                    .into_iter()
                    .map(|(g, n)| (g.to_owned(), n.to_owned()))
                    .collect();
                (nodes, vec![a, b, c, d], cur)
            })
    }

    /// Keeps the first entry per name, as `elect` does, so tests can reason about "the" node.
    fn dedup(nodes: &[NodeState]) -> Vec<NodeState> {
        let mut seen = BTreeSet::new();
        nodes
            .iter()
            .filter(|n| seen.insert(n.name.clone()))
            .cloned()
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn deterministic_and_order_independent(
            (nodes, gws, cur) in arb_input(),
            seed in any::<u64>(),
        ) {
            let d1 = run(&nodes, &gws, &cur);
            prop_assert_eq!(&d1, &run(&nodes, &gws, &cur));
            // Permute the deduplicated list (permuting duplicates changes which entry wins).
            let mut uniq = dedup(&nodes);
            let d_uniq = run(&uniq, &gws, &cur);
            prop_assert_eq!(&d1, &d_uniq);
            let len = uniq.len();
            if len > 1 {
                let mut s = seed;
                for i in (1..len).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    uniq.swap(i, (s >> 33) as usize % (i + 1));
                }
            }
            let mut rgws = gws.clone();
            rgws.reverse();
            prop_assert_eq!(&d1, &run(&uniq, &rgws, &cur));
        }

        #[test]
        fn active_is_sound(
            (nodes, gws, cur) in arb_input(),
        ) {
            let d = run(&nodes, &gws, &cur);
            let uniq = dedup(&nodes);
            for g in &gws {
                let gd = &d.gateways[&g.name];
                prop_assert_eq!(gd.active.is_none(), gd.eligible.is_empty());
                prop_assert_eq!(d.assignment.get(&g.name), gd.active.as_ref());
                prop_assert_eq!(gd.previous.as_ref(), cur.get(&g.name));
                prop_assert_eq!(gd.eligible.len() + gd.ineligible.len(), uniq.len());
                for n in &uniq {
                    let why = ineligibility(g, n);
                    prop_assert_eq!(why.as_ref(), gd.ineligible.get(&n.name));
                    prop_assert_eq!(why.is_none(), gd.eligible.contains(&n.name));
                }
                if let Some(a) = &gd.active {
                    prop_assert!(gd.eligible.contains(a));
                    let node = uniq.iter().find(|n| &n.name == a).unwrap();
                    prop_assert_eq!(ineligibility(g, node), None);
                    let prev_ok = cur.get(&g.name).is_some_and(|p| gd.eligible.contains(p));
                    if !g.preempt && prev_ok {
                        // Stickiness.
                        prop_assert_eq!(Some(a), cur.get(&g.name));
                    } else {
                        // Otherwise the first in order, regardless of current.
                        prop_assert_eq!(a, &gd.eligible[0]);
                    }
                }
                if g.selection == Selection::Alphabetical {
                    prop_assert!(gd.eligible.windows(2).all(|w| w[0] < w[1]));
                }
            }
            prop_assert!(d.assignment.keys().all(|k| gws.iter().any(|g| &g.name == k)));
        }

        #[test]
        fn removing_a_node_moves_only_its_gateways(
            (nodes, gws, cur) in arb_input(),
            victim in 0..NAMES.len(),
        ) {
            let victim = NAMES[victim];
            let before = run(&nodes, &gws, &cur);
            let mut after_nodes = dedup(&nodes);
            for n in &mut after_nodes {
                if n.name == victim {
                    n.alive = false;
                }
            }
            let after = run(&after_nodes, &gws, &cur);
            for g in &gws {
                let b = before.assignment.get(&g.name);
                let a = after.assignment.get(&g.name);
                if b.map(String::as_str) != Some(victim) {
                    prop_assert_eq!(a, b, "gateway {} moved", g.name);
                } else {
                    prop_assert_ne!(a.map(String::as_str), Some(victim));
                }
            }
        }

        #[test]
        fn returning_earlier_node_takes_role_back(
            (nodes, gws, cur) in arb_input(),
            victim in 0..NAMES.len(),
        ) {
            let victim = NAMES[victim];
            let mut without = dedup(&nodes);
            without.retain(|n| n.name != victim);
            let d1 = run(&without, &gws, &cur);
            let mut with = without.clone();
            with.push(node(victim)); // fully eligible for every gateway
            let d2 = run(&with, &gws, &d1.assignment);
            for g in &gws {
                if g.selection != Selection::Alphabetical || !g.preempt {
                    continue;
                }
                match d1.assignment.get(&g.name) {
                    Some(holder) if holder.as_str() > victim => {
                        prop_assert_eq!(d2.assignment[&g.name].as_str(), victim);
                    }
                    Some(holder) => prop_assert_eq!(&d2.assignment[&g.name], holder),
                    None => prop_assert_eq!(d2.assignment[&g.name].as_str(), victim),
                }
            }
        }
    }
}
