//! The leader's side of failover: who is alive, who may still hold a gateway, and which
//! assignment changes to commit. Pure (time is an argument), so that every safety rule is tested
//! without a network.
//!
//! The safety rule: a gateway is committed to node Y only when no other node may still hold it.
//! A node may hold gateway G while
//! - its latest report says it holds G, or the leader's latest reply granted G to it, or a
//!   revocation of G has not yet been confirmed by a later report; or
//! - this leader has not heard from it yet and has not been leader for `failover_timeout`
//!   (a previous leader may have granted it anything).
//!
//! A node stops holding anything when its lease runs out: every grant carries a lease that ends
//! at most `lease` after the node *sent* the report it answers, and the node's kernel stops
//! answering ARP for its addresses when the lease ends (nftables set timeouts), whether or not
//! the daemon is still running. Since `lease < failover_timeout`, a node silent for
//! `failover_timeout` holds nothing, and its gateways can be given away at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterState;
use crate::election::{Decision, ElectionInput, elect};
use crate::model::{InterfaceState, Labels, NodeName, NodeState};

/// What a node tells the leader, every `report_interval` and whenever something changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: NodeName,
    /// Random per daemon start: a restarted daemon begins with nothing held.
    pub boot: u64,
    /// The labels of the node's config file (runtime overrides are in the cluster state).
    pub labels: Labels,
    pub ready: bool,
    pub interfaces: BTreeMap<String, InterfaceState>,
    /// Gateways whose addresses and SNAT this node holds right now.
    pub held: BTreeSet<String>,
}

/// The leader's answer: the gateways the node may hold, for how long.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub gateways: BTreeSet<String>,
    /// Measured by the node from the moment it sent its report. Zero: hold nothing.
    pub lease_ms: u64,
    /// The leader's view, for the node's status page.
    pub leader: NodeName,
    pub term: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub lease: Duration,
    pub failover_timeout: Duration,
    pub settle_margin: Duration,
}

#[derive(Debug, Clone)]
struct NodeRecord {
    report: Report,
    received: Instant,
    /// Gateways in the latest reply to this node.
    granted: BTreeSet<String>,
    /// Gateways granted before and left out of a later reply, not yet confirmed released.
    revoking: BTreeSet<String>,
}

/// The leader's bookkeeping. A new one is made when this node becomes leader.
#[derive(Debug)]
pub struct Controller {
    timing: Timing,
    leader_since: Instant,
    nodes: BTreeMap<NodeName, NodeRecord>,
    /// When this leader last confirmed it still had a quorum (`Raft::is_leader`).
    lease_until: Option<Instant>,
}

/// Why an assignment change was made, for the one log line a failover gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub gateway: String,
    pub from: Option<NodeName>,
    pub to: Option<NodeName>,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The active node went silent; its lease has run out.
    Failover,
    /// The active node is alive but no longer the choice: it releases first.
    Release,
    /// Nobody held the gateway (or the release was confirmed): assign it.
    Assign,
}

impl Controller {
    pub fn new(timing: Timing, now: Instant) -> Self {
        Controller {
            timing,
            leader_since: now,
            nodes: BTreeMap::new(),
            lease_until: None,
        }
    }

    /// Record that a quorum confirmed this leadership; `at` is when the check started.
    pub fn confirmed(&mut self, at: Instant) {
        let until = at + self.timing.lease;
        if self.lease_until.is_none_or(|u| u < until) {
            self.lease_until = Some(until);
        }
    }

    pub fn leader_lease_remaining(&self, now: Instant) -> Duration {
        self.lease_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now))
    }

    /// A report arrived: remember it and answer with the node's grant.
    pub fn on_report(&mut self, report: Report, now: Instant, state: &ClusterState) -> Grant {
        let lease = self.leader_lease_remaining(now);
        let name = report.node.clone();
        let assigned: BTreeSet<String> = if lease.is_zero() {
            BTreeSet::new()
        } else {
            state
                .assignment
                .iter()
                .filter(|(_, n)| **n == name)
                .map(|(g, _)| g.clone())
                .collect()
        };
        let rec = self.nodes.entry(name).or_insert_with(|| NodeRecord {
            report: report.clone(),
            received: now,
            granted: BTreeSet::new(),
            revoking: BTreeSet::new(),
        });
        if rec.report.boot != report.boot {
            // A restarted daemon wiped its data plane at start-up.
            rec.granted.clear();
            rec.revoking.clear();
        }
        // This report was sent after the node processed our previous reply, so whatever it no
        // longer holds is confirmed released.
        rec.revoking.retain(|g| report.held.contains(g));
        for g in rec.granted.difference(&assigned) {
            rec.revoking.insert(g.clone());
        }
        rec.granted = assigned.clone();
        rec.report = report;
        rec.received = now;
        Grant {
            gateways: assigned,
            lease_ms: lease.as_millis() as u64,
            leader: String::new(),
            term: 0,
        }
    }

    fn silent(&self, rec: &NodeRecord, now: Instant) -> bool {
        now.saturating_duration_since(rec.received) >= self.timing.failover_timeout
    }

    /// A new leader cannot know what its predecessor granted. Those grants end within `lease`
    /// of the predecessor's last quorum confirmation, which preceded this leader's election;
    /// the extra `settle_margin` covers timer granularity.
    fn settled(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.leader_since)
            >= self.timing.lease + self.timing.settle_margin
    }

    /// Whether `node` may still hold `gateway` (see the module docs).
    pub fn may_hold(&self, node: &str, gateway: &str, now: Instant) -> bool {
        match self.nodes.get(node) {
            Some(rec) if self.silent(rec, now) => false,
            Some(rec) => {
                rec.report.held.contains(gateway)
                    || rec.granted.contains(gateway)
                    || rec.revoking.contains(gateway)
            }
            None => !self.settled(now),
        }
    }

    /// How long since the node's last report (since leadership began if it never reported).
    pub fn silent_for(&self, node: &str, now: Instant) -> Duration {
        let since = self
            .nodes
            .get(node)
            .map_or(self.leader_since, |r| r.received);
        now.saturating_duration_since(since)
    }

    /// Whether a node counts as a live member for the election.
    pub fn alive(&self, node: &str, now: Instant) -> bool {
        self.nodes.get(node).is_some_and(|r| !self.silent(r, now))
    }

    /// The election's view of every member.
    pub fn node_states(
        &self,
        members: &[NodeName],
        state: &ClusterState,
        now: Instant,
    ) -> Vec<NodeState> {
        members
            .iter()
            .map(|name| {
                let rec = self.nodes.get(name);
                let file_labels = rec.map(|r| r.report.labels.clone()).unwrap_or_default();
                NodeState {
                    name: name.clone(),
                    labels: state.effective_labels(name, &file_labels),
                    cordoned: state.cordoned.contains(name),
                    alive: self.alive(name, now),
                    ready: rec.is_some_and(|r| r.report.ready),
                    interfaces: rec.map(|r| r.report.interfaces.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Decide the assignment changes to commit now, with the election's full decision (for
    /// status and logs).
    pub fn tick(
        &self,
        members: &[NodeName],
        state: &ClusterState,
        now: Instant,
    ) -> (Vec<Change>, Decision) {
        let nodes = self.node_states(members, state, now);
        let gateways = state.gateway_list();
        let decision = elect(&ElectionInput {
            nodes: &nodes,
            gateways: &gateways,
            current: &state.assignment,
        });
        let mut changes = Vec::new();
        // Until this leader has confirmed a quorum, it grants nothing; no point assigning.
        if self.leader_lease_remaining(now).is_zero() {
            return (changes, decision);
        }
        for g in &gateways {
            let cur = state.assignment.get(&g.name);
            let want = decision.assignment.get(&g.name);
            if cur == want {
                continue;
            }
            let blocked = |to: Option<&NodeName>| {
                members
                    .iter()
                    .filter(|n| Some(*n) != to)
                    .any(|n| self.may_hold(n, &g.name, now))
            };
            match (cur, want) {
                (Some(x), _) if self.alive(x, now) => changes.push(Change {
                    gateway: g.name.clone(),
                    from: Some(x.clone()),
                    to: None,
                    kind: ChangeKind::Release,
                }),
                // A holder this new leader has not heard from yet: wait until it reports or
                // its possible lease is over.
                (Some(x), _) if !self.nodes.contains_key(x) && !self.settled(now) => {}
                (Some(x), to) => {
                    // Silent for failover_timeout: its lease is over. Move straight to the
                    // successor unless someone else may still hold the gateway.
                    let to = if blocked(to) { None } else { to.cloned() };
                    changes.push(Change {
                        gateway: g.name.clone(),
                        from: Some(x.clone()),
                        to,
                        kind: ChangeKind::Failover,
                    });
                }
                (None, Some(y)) if !blocked(Some(y)) => changes.push(Change {
                    gateway: g.name.clone(),
                    from: None,
                    to: Some(y.clone()),
                    kind: ChangeKind::Assign,
                }),
                (None, _) => {}
            }
        }
        (changes, decision)
    }

    /// The earliest moment at which `tick` could decide differently without any new report:
    /// a node going silent or the settling period ending.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let silent = self
            .nodes
            .values()
            .map(|r| r.received + self.timing.failover_timeout)
            .filter(|t| *t > now);
        let settle = Some(self.leader_since + self.timing.lease + self.timing.settle_margin)
            .filter(|t| *t > now);
        silent.chain(settle).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Command;
    use crate::model::{Gateway, Selection, SourceIp};

    const T: Timing = Timing {
        lease: Duration::from_millis(150),
        failover_timeout: Duration::from_millis(250),
        settle_margin: Duration::from_millis(50),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Command::Apply {
            gateways: vec![Gateway {
                name: "g".into(),
                node_selector: Labels::new(),
                selection: Selection::Alphabetical,
                preempt: true,
                source_ip: SourceIp::VirtualIp {
                    ip: "198.18.0.50".parse().unwrap(),
                    interfaces: vec!["eth1".into()],
                },
                next_hop: None,
            }],
            policies: vec![],
        });
        s
    }

    fn members() -> Vec<NodeName> {
        vec!["gw1".into(), "gw2".into(), "gw3".into()]
    }

    fn report(node: &str, held: &[&str]) -> Report {
        Report {
            node: node.into(),
            boot: 1,
            labels: Labels::new(),
            ready: true,
            interfaces: [(
                "eth1".to_string(),
                InterfaceState {
                    up: true,
                    primary_ipv4: None,
                },
            )]
            .into_iter()
            .collect(),
            held: held.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn apply(s: &mut ClusterState, changes: &[Change]) {
        s.apply(&Command::Assign {
            changes: changes
                .iter()
                .map(|c| crate::cluster::state::AssignChange {
                    gateway: c.gateway.clone(),
                    to: c.to.clone(),
                    reason: crate::cluster::state::Reason::Elected,
                })
                .collect(),
            at_unix_ms: 1,
        });
    }

    /// Everyone reports; the leader has a quorum; settle time has passed.
    fn steady(t0: Instant) -> (Controller, ClusterState) {
        let mut c = Controller::new(T, t0);
        let s = state();
        c.confirmed(t0);
        for m in members() {
            c.on_report(report(&m, &[]), t0, &s);
        }
        (c, s)
    }

    #[test]
    fn nothing_is_assigned_before_a_quorum_confirms_the_leader() {
        let t0 = Instant::now();
        let mut c = Controller::new(T, t0);
        let s = state();
        for m in members() {
            c.on_report(report(&m, &[]), t0, &s);
        }
        assert!(c.tick(&members(), &s, t0).0.is_empty());
        c.confirmed(t0);
        let (changes, _) = c.tick(&members(), &s, t0);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to.as_deref(), Some("gw1"));
    }

    #[test]
    fn a_new_leader_waits_for_silent_nodes_before_assigning() {
        let t0 = Instant::now();
        let mut c = Controller::new(T, t0);
        let s = state();
        c.confirmed(t0);
        // gw2 and gw3 report; gw1 (first in order) has not: gw1 is not alive, so gw2 is the
        // choice, but gw1 might still hold the gateway from an earlier leader's grant.
        c.on_report(report("gw2", &[]), t0, &s);
        c.on_report(report("gw3", &[]), t0, &s);
        assert!(c.tick(&members(), &s, t0 + ms(100)).0.is_empty());
        c.confirmed(t0 + ms(200));
        c.on_report(report("gw2", &[]), t0 + ms(200), &s);
        c.on_report(report("gw3", &[]), t0 + ms(200), &s);
        let (changes, _) = c.tick(&members(), &s, t0 + ms(260));
        assert_eq!(changes[0].to.as_deref(), Some("gw2"));
    }

    #[test]
    fn failover_after_silence_goes_straight_to_the_successor() {
        let t0 = Instant::now();
        let (mut c, mut s) = steady(t0);
        let (ch, _) = c.tick(&members(), &s, t0);
        apply(&mut s, &ch);
        let g = c.on_report(report("gw1", &[]), t0 + ms(10), &s);
        assert!(g.gateways.contains("g") && g.lease_ms > 0);
        // gw1 goes silent; the others keep reporting and the leader keeps its quorum.
        let mut t = t0 + ms(10);
        while t + ms(50) < t0 + ms(260) {
            t += ms(50);
            c.confirmed(t);
            c.on_report(report("gw2", &[]), t, &s);
            c.on_report(report("gw3", &[]), t, &s);
            assert!(
                c.tick(&members(), &s, t).0.is_empty(),
                "gw1 may still hold the gateway at {:?}",
                t - t0
            );
        }
        let deadline = t0 + ms(10) + T.failover_timeout;
        assert!(c.next_deadline(t0 + ms(255)) <= Some(deadline));
        let (ch, _) = c.tick(&members(), &s, deadline);
        assert_eq!(
            ch,
            vec![Change {
                gateway: "g".into(),
                from: Some("gw1".into()),
                to: Some("gw2".into()),
                kind: ChangeKind::Failover
            }]
        );
        // The lease gw1 got lasts less than the time the leader waited.
        assert!(ms(g.lease_ms) < T.failover_timeout);
    }

    #[test]
    fn planned_handover_releases_first_and_assigns_after_confirmation() {
        let t0 = Instant::now();
        let (mut c, mut s) = steady(t0);
        let ch = c.tick(&members(), &s, t0).0;
        apply(&mut s, &ch);
        c.on_report(report("gw1", &[]), t0, &s);
        c.on_report(report("gw1", &["g"]), t0 + ms(5), &s);
        s.apply(&Command::Cordon("gw1".into()));
        let (ch, _) = c.tick(&members(), &s, t0 + ms(6));
        assert_eq!(ch[0].kind, ChangeKind::Release);
        assert_eq!(ch[0].to, None);
        apply(&mut s, &ch);
        // gw2 must wait: gw1 still holds it (its report says so, and it was granted).
        assert!(c.tick(&members(), &s, t0 + ms(7)).0.is_empty());
        // gw1's next report is answered without the gateway...
        let g = c.on_report(report("gw1", &["g"]), t0 + ms(8), &s);
        assert!(g.gateways.is_empty());
        assert!(c.tick(&members(), &s, t0 + ms(9)).0.is_empty());
        // ...and the one after confirms the release.
        c.on_report(report("gw1", &[]), t0 + ms(10), &s);
        let (ch, _) = c.tick(&members(), &s, t0 + ms(11));
        assert_eq!(ch[0].to.as_deref(), Some("gw2"));
        assert_eq!(ch[0].kind, ChangeKind::Assign);
    }

    #[test]
    fn a_report_that_does_not_follow_the_revoking_reply_does_not_confirm() {
        let t0 = Instant::now();
        let (mut c, mut s) = steady(t0);
        let ch = c.tick(&members(), &s, t0).0;
        apply(&mut s, &ch);
        c.on_report(report("gw1", &[]), t0, &s); // granted g, not yet taken
        s.apply(&Command::Cordon("gw1".into()));
        let ch = c.tick(&members(), &s, t0 + ms(1)).0;
        apply(&mut s, &ch);
        // This report crossed our grant on the wire: it says "not held", but gw1 may take the
        // gateway on the grant it is about to read. Its reply revokes.
        c.on_report(report("gw1", &[]), t0 + ms(2), &s);
        assert!(c.may_hold("gw1", "g", t0 + ms(3)));
        c.on_report(report("gw1", &[]), t0 + ms(4), &s);
        assert!(!c.may_hold("gw1", "g", t0 + ms(5)));
    }

    #[test]
    fn without_a_quorum_the_leader_grants_nothing() {
        let t0 = Instant::now();
        let (mut c, mut s) = steady(t0);
        let ch = c.tick(&members(), &s, t0).0;
        apply(&mut s, &ch);
        let g = c.on_report(report("gw1", &[]), t0 + T.lease + ms(1), &s);
        assert!(g.gateways.is_empty());
        assert_eq!(g.lease_ms, 0);
    }

    #[test]
    fn a_restarted_daemon_starts_clean() {
        let t0 = Instant::now();
        let (mut c, mut s) = steady(t0);
        let ch = c.tick(&members(), &s, t0).0;
        apply(&mut s, &ch);
        c.on_report(report("gw1", &["g"]), t0, &s);
        s.apply(&Command::Cordon("gw1".into()));
        let ch = c.tick(&members(), &s, t0 + ms(1)).0;
        apply(&mut s, &ch);
        let mut r = report("gw1", &[]);
        r.boot = 2;
        c.on_report(r, t0 + ms(2), &s);
        assert!(!c.may_hold("gw1", "g", t0 + ms(3)));
    }

    #[test]
    fn preemption_takes_the_role_back_through_a_release() {
        let t0 = Instant::now();
        let (mut c, mut s) = steady(t0);
        s.apply(&crate::cluster::state::tests::elect("g", Some("gw2")));
        c.on_report(report("gw2", &["g"]), t0, &s);
        let (ch, _) = c.tick(&members(), &s, t0 + ms(1));
        assert_eq!(ch[0].kind, ChangeKind::Release);
        assert_eq!(ch[0].from.as_deref(), Some("gw2"));
    }
}
