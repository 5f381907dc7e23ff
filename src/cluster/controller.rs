//! The leader's side of failover: the election over the nodes' reports, and which assignment
//! changes to commit. Pure (time is an argument); who may hold what is `crate::lease`'s job, and
//! this file only asks it.
//!
//! The rule: a gateway is committed to node Y only when no other node may still hold any of its
//! resources (`LeaderLease::free`). A node that is alive but no longer the election's choice is
//! released first (committed to nobody); its release is confirmed by its reports or its lease
//! runs out, and only then is the successor committed. A node that went silent for
//! `failover_timeout` holds nothing any more (its lease ended before), so its gateways move
//! straight to the successor.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterState;
use crate::election::{Decision, ElectionInput, elect};
use crate::lease::{self, Grant, LeaderLease, ReportHead, Time, Timing};
use crate::model::{InterfaceState, Labels, NodeName, NodeState};

/// What a node tells the leader, every `report_interval` and whenever something changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: NodeName,
    /// Epoch, sequence number, acknowledgement and claims (see `crate::lease`).
    pub head: ReportHead,
    /// The labels of the node's config file (runtime overrides are in the cluster state).
    pub labels: Labels,
    pub ready: bool,
    pub interfaces: BTreeMap<String, InterfaceState>,
    /// The newest command format the node reads (`codec::COMMAND_FORMAT`): the leader proposes
    /// a command kind only once every member's latest report says it reads that kind's format.
    /// Last and defaulted (to 1, what the versions before mutual TLS read), so that a report
    /// without it decodes.
    #[serde(default = "format_one")]
    pub command_format: u16,
}

fn format_one() -> u16 {
    1
}

/// The leader's answer: the lease grant, and who answered (for the node's status page).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub grant: Grant,
    pub leader: NodeName,
    pub term: u64,
}

/// The facts of a node's latest report.
#[derive(Debug, Clone)]
struct Facts {
    labels: Labels,
    ready: bool,
    interfaces: BTreeMap<String, InterfaceState>,
}

impl Facts {
    /// Whether `report` says the same.
    fn same_as(&self, report: &Report) -> bool {
        self.ready == report.ready
            && self.labels == report.labels
            && self.interfaces == report.interfaces
    }
}

/// The leader's bookkeeping. A new one is made for every term this node leads.
#[derive(Debug)]
pub struct Controller {
    pub lease: LeaderLease,
    facts: BTreeMap<NodeName, Facts>,
    /// Per node, the command format of its latest report (also of a stale one: a format only
    /// says which version runs there).
    formats: BTreeMap<NodeName, u16>,
    /// A report since the last [`Controller::take_news`] may change a decision: a node came
    /// back, its facts or command format changed, or it confirmed a release.
    news: bool,
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

/// The gateways `state` assigns to `node`, with the addresses held for each.
pub fn assigned_to(state: &ClusterState, node: &str) -> BTreeMap<String, Vec<IpAddr>> {
    state
        .assignment
        .iter()
        .filter(|(_, n)| n.as_str() == node)
        .filter_map(|(g, _)| Some((g.clone(), state.gateways.get(g)?.addresses())))
        .collect()
}

impl Controller {
    pub fn new(timing: Timing, now: Time) -> Self {
        Controller {
            lease: LeaderLease::new(timing, now),
            facts: BTreeMap::new(),
            formats: BTreeMap::new(),
            news: false,
        }
    }

    /// A quorum confirmed this leadership with a round that started at `at`.
    pub fn confirmed(&mut self, at: Time) {
        self.lease.confirmed(at);
    }

    /// A report arrived: remember its facts and answer with the node's grant.
    pub fn on_report(&mut self, report: &Report, now: Time, state: &ClusterState) -> Grant {
        let was_alive = self.lease.alive(&report.node, now);
        let released = self.lease.released();
        let grant = self.lease.on_report(
            &report.node,
            &report.head,
            &assigned_to(state, &report.node),
            now,
        );
        let format = self
            .formats
            .insert(report.node.clone(), report.command_format);
        let mut news = !was_alive
            || self.lease.released() != released
            || format != Some(report.command_format);
        // Facts of a stale report are not newer than what we have. Compared before they are
        // copied: nearly every report brings the same facts.
        let known = self.facts.get(&report.node);
        if (grant.lease_ms > 0 || known.is_none()) && !known.is_some_and(|f| f.same_as(report)) {
            news = true;
            self.facts.insert(
                report.node.clone(),
                Facts {
                    labels: report.labels.clone(),
                    ready: report.ready,
                    interfaces: report.interfaces.clone(),
                },
            );
        }
        self.news |= news;
        grant
    }

    /// Whether a report since the last call may change a decision. The rest only renew leases
    /// and liveness, which the controller's own tick and deadlines cover: waking it for each
    /// of them cost the leader a round per report (40 a second in an idle three-node cluster).
    pub fn take_news(&mut self) -> bool {
        std::mem::take(&mut self.news)
    }

    /// The command format `node` said it reads in its latest report to this leader, if it has
    /// reported since this leader took over.
    pub fn command_format(&self, node: &str) -> Option<u16> {
        self.formats.get(node).copied()
    }

    pub fn silent_for(&self, node: &str, now: Time) -> Duration {
        self.lease.silent_for(node, now)
    }

    pub fn alive(&self, node: &str, now: Time) -> bool {
        self.lease.alive(node, now)
    }

    /// The election's view of every member.
    pub fn node_states(
        &self,
        members: &[NodeName],
        state: &ClusterState,
        now: Time,
    ) -> Vec<NodeState> {
        members
            .iter()
            .map(|name| {
                let facts = self.facts.get(name);
                let file_labels = facts.map(|f| f.labels.clone()).unwrap_or_default();
                NodeState {
                    name: name.clone(),
                    labels: state.effective_labels(name, &file_labels),
                    cordoned: state.is_cordoned(name),
                    alive: self.alive(name, now),
                    ready: facts.is_some_and(|f| f.ready),
                    interfaces: facts.map(|f| f.interfaces.clone()).unwrap_or_default(),
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
        now: Time,
    ) -> (Vec<Change>, Decision) {
        let nodes = self.node_states(members, state, now);
        let gateways = state.gateway_list();
        let decision = elect(&ElectionInput {
            nodes: &nodes,
            gateways: &gateways,
            current: &state.assignment,
        });
        let mut changes = Vec::new();
        // Until this leader has confirmed a quorum (and so applied everything committed before
        // it), its view of the assignment may be stale: decide nothing.
        if self.lease.quorum_remaining(now).is_zero() {
            return (changes, decision);
        }
        for g in &gateways {
            if self.lease.is_moving(&g.name) {
                continue;
            }
            let cur = state.assignment.get(&g.name);
            let want = decision.assignment.get(&g.name);
            if cur == want {
                continue;
            }
            let res = lease::resources(&g.name, &g.addresses());
            let free =
                |to: Option<&NodeName>| self.lease.free(&res, to.map(String::as_str), members, now);
            match (cur, want) {
                // Releasing is always safe; the successor waits for the release.
                (Some(x), _) if self.alive(x, now) => changes.push(Change {
                    gateway: g.name.clone(),
                    from: Some(x.clone()),
                    to: None,
                    kind: ChangeKind::Release,
                }),
                // A holder this new leader has not heard from yet may just not have reported:
                // wait until it does, or until the settling is over.
                (Some(x), _) if !self.lease.heard_from(x) && self.lease.settling(now) => {}
                (Some(x), to) => changes.push(Change {
                    gateway: g.name.clone(),
                    from: Some(x.clone()),
                    to: if free(to) { to.cloned() } else { None },
                    kind: ChangeKind::Failover,
                }),
                (None, Some(y)) if free(Some(y)) => changes.push(Change {
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

    /// The earliest moment at which `tick` could decide differently without any new report.
    pub fn next_deadline(&self, now: Time) -> Option<Time> {
        self.lease.next_deadline(now)
    }

    /// The nodes whose facts this leader knows, in name order.
    pub fn known(&self) -> BTreeSet<&str> {
        self.facts.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cluster::Command;
    use crate::lease::NodeLease;
    use crate::model::{Gateway, Selection, SourceIp};

    pub(crate) const T: Timing = Timing {
        lease: Duration::from_millis(150),
        failover_timeout: Duration::from_millis(250),
        drift: 0.001,
        margin: Duration::from_millis(10),
    };

    pub(crate) fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    pub(crate) fn state() -> ClusterState {
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
                conntrack_sync: false,
            }],
            policies: vec![],
        });
        s
    }

    pub(crate) fn members() -> Vec<NodeName> {
        vec!["gw1".into(), "gw2".into(), "gw3".into()]
    }

    /// A node with its lease state; `report` makes its next report.
    pub(crate) struct Node {
        pub name: String,
        pub lease: NodeLease,
    }

    impl Node {
        pub(crate) fn new(name: &str) -> Node {
            Node {
                name: name.into(),
                lease: NodeLease::new(1),
            }
        }

        pub(crate) fn report(&mut self, now: Time) -> Report {
            Report {
                node: self.name.clone(),
                head: self.lease.report(now),
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
                command_format: crate::cluster::codec::COMMAND_FORMAT,
            }
        }

        /// Reports, takes the grant, and (as the data plane would) fences what it holds.
        pub(crate) fn exchange(
            &mut self,
            c: &mut Controller,
            s: &ClusterState,
            now: Time,
        ) -> Grant {
            let r = self.report(now);
            let g = c.on_report(&r, now, s);
            self.lease.on_grant(&g, now);
            let ready = self
                .lease
                .leased(now)
                .flat_map(|(_, h)| h.addrs.clone())
                .collect();
            let fence = self.lease.fence_target(&ready, now);
            self.lease.fence_written(fence);
            g
        }
    }

    pub(crate) fn apply(s: &mut ClusterState, c: &mut Controller, changes: &[Change], index: u64) {
        for ch in changes {
            c.lease.start_move(&ch.gateway);
            c.lease.move_logged(&ch.gateway, index);
        }
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
        c.lease.applied(index);
    }

    /// Everyone reports to a leader that has settled and has a quorum.
    pub(crate) fn steady(t0: Time) -> (Controller, ClusterState, Vec<Node>, Time) {
        let mut c = Controller::new(T, t0);
        let s = state();
        let t = t0 + T.settle();
        c.confirmed(t);
        let mut nodes: Vec<Node> = members().iter().map(|m| Node::new(m)).collect();
        for n in &mut nodes {
            n.exchange(&mut c, &s, t);
        }
        (c, s, nodes, t)
    }

    #[test]
    fn nothing_is_assigned_before_a_quorum_confirms_the_leader() {
        let t0 = ms(1000);
        let mut c = Controller::new(T, t0);
        let s = state();
        let t = t0 + T.settle();
        for m in members() {
            Node::new(&m).exchange(&mut c, &s, t);
        }
        assert!(c.tick(&members(), &s, t).0.is_empty());
        c.confirmed(t);
        let (changes, _) = c.tick(&members(), &s, t);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to.as_deref(), Some("gw1"));
    }

    #[test]
    fn a_new_leader_waits_for_the_settling_before_assigning() {
        let t0 = ms(1000);
        let mut c = Controller::new(T, t0);
        let s = state();
        c.confirmed(t0);
        for m in members() {
            Node::new(&m).exchange(&mut c, &s, t0);
        }
        assert!(c.tick(&members(), &s, t0 + ms(1)).0.is_empty());
        assert_eq!(c.next_deadline(t0 + ms(1)), Some(t0 + T.settle()));
        c.confirmed(t0 + T.settle());
        let (ch, _) = c.tick(&members(), &s, t0 + T.settle());
        assert_eq!(ch[0].to.as_deref(), Some("gw1"));
    }

    #[test]
    fn a_holder_not_heard_from_yet_is_waited_for_during_the_settling() {
        let t0 = ms(1000);
        let mut c = Controller::new(T, t0);
        let mut s = state();
        s.apply(&crate::cluster::state::tests::elect("g", Some("gw1")));
        c.confirmed(t0);
        Node::new("gw2").exchange(&mut c, &s, t0);
        Node::new("gw3").exchange(&mut c, &s, t0);
        // gw1 holds g and simply has not reported to this leader yet: no failover.
        assert!(c.tick(&members(), &s, t0 + ms(20)).0.is_empty());
        let t = t0 + T.settle();
        c.confirmed(t);
        Node::new("gw2").exchange(&mut c, &s, t);
        Node::new("gw3").exchange(&mut c, &s, t);
        let (ch, _) = c.tick(&members(), &s, t);
        assert_eq!(ch[0].kind, ChangeKind::Failover);
        assert_eq!(ch[0].to.as_deref(), Some("gw2"));
    }

    #[test]
    fn failover_after_silence_goes_straight_to_the_successor() {
        let t0 = ms(1000);
        let (mut c, mut s, mut nodes, t) = steady(t0);
        let (ch, _) = c.tick(&members(), &s, t);
        apply(&mut s, &mut c, &ch, 1);
        let g = nodes[0].exchange(&mut c, &s, t + ms(10));
        assert!(g.gateways.contains_key("g") && g.lease_ms > 0);
        // gw1 goes silent; the others keep reporting and the leader keeps its quorum.
        let mut now = t + ms(10);
        while now + ms(50) < t + ms(10) + T.failover_timeout {
            now += ms(50);
            c.confirmed(now);
            nodes[1].exchange(&mut c, &s, now);
            nodes[2].exchange(&mut c, &s, now);
            assert!(
                c.tick(&members(), &s, now).0.is_empty(),
                "gw1 may still hold the gateway at {now:?}"
            );
        }
        let deadline = t + ms(10) + T.failover_timeout;
        assert!(c.next_deadline(now) <= Some(deadline));
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
    }

    #[test]
    fn only_reports_that_can_change_a_decision_wake_the_controller() {
        let t0 = ms(1000);
        let (mut c, mut s, mut nodes, t) = steady(t0);
        assert!(c.take_news(), "first reports bring facts");
        assert!(!c.take_news());
        let ch = c.tick(&members(), &s, t).0;
        apply(&mut s, &mut c, &ch, 1);
        nodes[0].exchange(&mut c, &s, t + ms(1));
        nodes[1].exchange(&mut c, &s, t + ms(1));
        assert!(!c.take_news(), "a renewal with the same facts is routine");

        let mut r = nodes[1].report(t + ms(2));
        r.ready = false;
        c.on_report(&r, t + ms(2), &s);
        assert!(c.take_news(), "changed facts");
        let mut r = nodes[1].report(t + ms(3));
        r.command_format += 1;
        c.on_report(&r, t + ms(3), &s);
        assert!(c.take_news(), "a changed command format");

        // A planned handover: the revoking grant is routine, the confirming report is news.
        s.apply(&Command::Cordon("gw1".into()));
        let (ch, _) = c.tick(&members(), &s, t + ms(4));
        apply(&mut s, &mut c, &ch, 2);
        nodes[0].exchange(&mut c, &s, t + ms(5));
        assert!(!c.take_news());
        nodes[0].exchange(&mut c, &s, t + ms(6));
        assert!(c.take_news(), "a confirmed release");

        // A node heard from again after more than the failover timeout.
        let late = t + ms(6) + T.failover_timeout + ms(1);
        nodes[2].exchange(&mut c, &s, late);
        assert!(c.take_news(), "a node back from silence");
    }

    #[test]
    fn planned_handover_releases_first_and_assigns_after_confirmation() {
        let t0 = ms(1000);
        let (mut c, mut s, mut nodes, t) = steady(t0);
        let ch = c.tick(&members(), &s, t).0;
        apply(&mut s, &mut c, &ch, 1);
        nodes[0].exchange(&mut c, &s, t + ms(1));
        s.apply(&Command::Cordon("gw1".into()));
        let (ch, _) = c.tick(&members(), &s, t + ms(2));
        assert_eq!(ch[0].kind, ChangeKind::Release);
        assert_eq!(ch[0].to, None);
        apply(&mut s, &mut c, &ch, 2);
        // gw2 must wait: gw1 still holds it.
        assert!(c.tick(&members(), &s, t + ms(3)).0.is_empty());
        // gw1's next exchange revokes it; gw1 drops it and its fence element...
        let g = nodes[0].exchange(&mut c, &s, t + ms(4));
        assert!(g.gateways.is_empty());
        assert!(c.tick(&members(), &s, t + ms(5)).0.is_empty());
        // ...and the report after says so.
        nodes[0].exchange(&mut c, &s, t + ms(6));
        let (ch, _) = c.tick(&members(), &s, t + ms(7));
        assert_eq!(ch[0].to.as_deref(), Some("gw2"));
        assert_eq!(ch[0].kind, ChangeKind::Assign);
    }

    #[test]
    fn a_move_in_flight_is_not_decided_twice_nor_granted() {
        let t0 = ms(1000);
        let (mut c, s, mut nodes, t) = steady(t0);
        let (ch, _) = c.tick(&members(), &s, t);
        assert_eq!(ch.len(), 1);
        c.lease.start_move("g");
        assert!(c.tick(&members(), &s, t + ms(1)).0.is_empty());
        let g = nodes[0].exchange(&mut c, &s, t + ms(2));
        assert!(g.gateways.is_empty());
    }

    #[test]
    fn without_a_quorum_the_leader_renews_nothing() {
        let t0 = ms(1000);
        let (mut c, mut s, mut nodes, t) = steady(t0);
        let ch = c.tick(&members(), &s, t).0;
        apply(&mut s, &mut c, &ch, 1);
        let g = nodes[0].exchange(&mut c, &s, t + T.lease + ms(1));
        assert!(g.gateways.is_empty());
        assert_eq!(g.lease_ms, 0);
    }

    #[test]
    fn a_restarted_daemon_holds_nothing_of_its_previous_incarnation() {
        let t0 = ms(1000);
        let (mut c, mut s, mut nodes, t) = steady(t0);
        let ch = c.tick(&members(), &s, t).0;
        apply(&mut s, &mut c, &ch, 1);
        nodes[0].exchange(&mut c, &s, t + ms(1));
        s.apply(&Command::Cordon("gw1".into()));
        let ch = c.tick(&members(), &s, t + ms(2)).0;
        apply(&mut s, &mut c, &ch, 2);
        let mut reborn = Node {
            name: "gw1".into(),
            lease: NodeLease::new(2),
        };
        reborn.exchange(&mut c, &s, t + ms(3));
        let (ch, _) = c.tick(&members(), &s, t + ms(4));
        assert_eq!(ch[0].to.as_deref(), Some("gw2"));
    }

    #[test]
    fn preemption_takes_the_role_back_through_a_release() {
        let t0 = ms(1000);
        let (mut c, mut s, mut nodes, t) = steady(t0);
        s.apply(&crate::cluster::state::tests::elect("g", Some("gw2")));
        nodes[1].exchange(&mut c, &s, t);
        let (ch, _) = c.tick(&members(), &s, t + ms(1));
        assert_eq!(ch[0].kind, ChangeKind::Release);
        assert_eq!(ch[0].from.as_deref(), Some("gw2"));
    }
}
