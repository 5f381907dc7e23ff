//! Who may hold what, and until when: the lease protocol, both halves, in one place. Pure: time is
//! an argument and nothing here does I/O, so the deterministic simulation (`tests/sim/`) drives
//! exactly this code.
//!
//! # What is protected
//! A [`Resource`] is a gateway's role (SNAT for its policies) or an address held for it (the VIP,
//! the next hop). **At no instant may two nodes hold a live lease for the same resource**, and a
//! node answers ARP/NDP for an address, or announces it, only while its kernel's fence holds a
//! live lease element for it.
//!
//! # The protocol
//! - A node ([`NodeLease`]) reports to the leader every report interval. A report carries the
//!   node's *epoch* (bumped and made durable at every daemon start), a *sequence number* (per
//!   epoch), the highest sequence number whose grant it has applied (`acked`), and its *claims*:
//!   every resource it may hold now (live leases, and fence elements that may still be live).
//! - The leader ([`LeaderLease`]) answers a report in order (a stale or duplicate report changes
//!   nothing and renews nothing) with a [`Grant`]: the gateways the committed assignment gives the
//!   node, with their addresses, and a lease length. A node measures the lease from the moment it
//!   *sent* the report, so on every clock the lease ends before the leader thinks it can.
//! - The leader grants only while its leadership is confirmed by a quorum (`confirmed`), and
//!   never beyond `lease` after the start of that confirmation: when it sent the request a
//!   quorum answered ([`QuorumClock`]). A gateway whose assignment change has been decided but
//!   not yet applied is granted to nobody.
//! - The leader records, per resource and node, an upper bound of when that node's lease can end
//!   (on the leader's clock, stretched for clock drift). A revoked resource counts as held until
//!   that bound, or until an in-order report sent after the node applied the revoking grant no
//!   longer claims it.
//! - A new leader cannot know what its predecessor granted. Every such grant ends within
//!   `lease` (stretched) of the predecessor's last confirmation, which preceded this leader's
//!   election: for that long (`settle`) every node counts as holding everything.
//! - The controller commits "gateway G → node Y" only when no other node may hold any of G's
//!   resources (`free`). So a node holds G only after everyone else's lease on it has ended.
//!
//! Safety does not depend on the timing settings, only on the clocks' rates differing by at most
//! `drift` (see [`Timing`]); the settings decide how fast a failover is.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A reading of one node's lease clock (CLOCK_BOOTTIME in the daemon): time since an arbitrary
/// origin of that clock. Clocks of different nodes are never compared.
pub type Time = Duration;

/// Something at most one node may hold at a time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Resource {
    /// The gateway's role: SNAT of its policies' traffic.
    Gateway(String),
    /// An address the active node holds and answers for (VIP, next hop).
    Addr(IpAddr),
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Gateway(g) => write!(f, "gateway {g}"),
            Resource::Addr(a) => write!(f, "address {a}"),
        }
    }
}

/// The resources of a gateway given with `addrs`.
pub fn resources(gateway: &str, addrs: &[IpAddr]) -> Vec<Resource> {
    std::iter::once(Resource::Gateway(gateway.to_string()))
        .chain(addrs.iter().map(|a| Resource::Addr(*a)))
        .collect()
}

/// The lease timing, in the terms the protocol uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    /// The longest lease the leader grants.
    pub lease: Duration,
    /// A node not heard from for this long is no longer a live member (election input).
    pub failover_timeout: Duration,
    /// The largest relative rate difference between any two clocks involved (0.001 = 1 ms/s).
    pub drift: f64,
    /// Slack added to every bound for timer granularity and scheduling.
    pub margin: Duration,
}

impl Timing {
    /// An upper bound, on any other clock, of a duration `d` measured on one clock, plus the
    /// margin.
    pub fn stretch(&self, d: Duration) -> Duration {
        d.mul_f64(1.0 + 2.0 * self.drift) + self.margin
    }

    /// How long a new leader treats every node as holding everything.
    pub fn settle(&self) -> Duration {
        self.stretch(self.lease)
    }

    /// The relations the timing must keep for failover to work as documented, given the report
    /// interval: each is a message an operator can act on. (Safety holds whatever the values.)
    pub fn check(&self, report_interval: Duration) -> Vec<String> {
        let mut out = Vec::new();
        let ms = |d: Duration| d.as_millis();
        if report_interval >= self.lease {
            out.push(format!(
                "report_interval_ms ({}) must be below lease_ms ({}): a node renews its lease \
                 with each report, and a lease that ends before the next report makes every \
                 node drop its gateways between reports",
                ms(report_interval),
                ms(self.lease)
            ));
        }
        if self.failover_timeout <= self.settle() {
            out.push(format!(
                "failover_timeout_ms ({}) must be above lease_ms stretched for clock drift and \
                 margin ({} ms): the leader moves a silent node's gateways once the node's lease \
                 can no longer be live, and with a shorter failover timeout every failover takes \
                 two steps (release, then assign) instead of one",
                ms(self.failover_timeout),
                ms(self.settle())
            ));
        }
        if !(0.0..=0.01).contains(&self.drift) {
            out.push(format!(
                "clock drift {} is outside 0..=0.01; leases assume clocks that run at nearly the \
                 same rate",
                self.drift
            ));
        }
        out
    }
}

/// The lease part of a node's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportHead {
    /// Bumped at every daemon start, durably, before the node holds anything.
    pub epoch: u64,
    /// Per epoch, increasing from 1.
    pub seq: u64,
    /// The highest `seq` whose grant the node has applied (0: none).
    pub acked: u64,
    /// Every resource the node may hold now.
    pub claims: BTreeSet<Resource>,
}

/// The leader's answer to one report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The report's epoch and sequence number.
    pub epoch: u64,
    pub seq: u64,
    /// Measured by the node from the moment it sent the report. Zero: the leader cannot renew
    /// now (no confirmed quorum, or the report was stale); the node changes nothing.
    pub lease_ms: u64,
    /// The gateways the node may hold, each with the addresses it holds for it. A gateway the
    /// node holds that is missing here is revoked.
    pub gateways: BTreeMap<String, Vec<IpAddr>>,
}

// ---------------------------------------------------------------------------------------------
// The node's half

/// A gateway the node holds a lease for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub addrs: Vec<IpAddr>,
    pub until: Time,
}

/// What applying a grant changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Gateways newly leased (or whose addresses changed).
    pub gained: Vec<String>,
    /// Gateways whose lease was revoked.
    pub revoked: Vec<String>,
}

/// The node's lease state: what it reported, which grants it applied, what it holds, and what
/// its kernel fence may still answer for.
#[derive(Debug, Clone)]
pub struct NodeLease {
    epoch: u64,
    next_seq: u64,
    /// Send times of the recent reports, oldest first.
    sent: VecDeque<(u64, Time)>,
    acked: u64,
    leases: BTreeMap<String, Held>,
    /// Kernel fence elements that may be live, with the moment each ends at the latest.
    fence: BTreeMap<IpAddr, Time>,
    /// The elements of a fence write under way. The kernel may hold them at any moment from
    /// now, and the reports go on while the write waits for the kernel, so they are claimed
    /// until the write's outcome is known (a lease revoked meanwhile must not free them).
    writing: BTreeMap<IpAddr, Time>,
    /// The length of the last lease granted.
    lease: Duration,
    /// The end of the node's lease as a member, whatever it holds: the last in-order grant's
    /// send time plus its length. A standby redirects only while this lasts.
    renewed: Option<Time>,
}

/// Reports older than this many are forgotten: their grants would be stale anyway.
const SENT_KEPT: usize = 64;

impl NodeLease {
    pub fn new(epoch: u64) -> Self {
        NodeLease {
            epoch,
            next_seq: 1,
            sent: VecDeque::new(),
            acked: 0,
            leases: BTreeMap::new(),
            fence: BTreeMap::new(),
            writing: BTreeMap::new(),
            lease: Duration::ZERO,
            renewed: None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The head of the report sent now; records the send time its grant will be measured from.
    pub fn report(&mut self, now: Time) -> ReportHead {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent.push_back((seq, now));
        while self.sent.len() > SENT_KEPT {
            self.sent.pop_front();
        }
        ReportHead {
            epoch: self.epoch,
            seq,
            acked: self.acked,
            claims: self.claims(now),
        }
    }

    /// Applies the leader's answer to one of this node's reports. A grant for another epoch, a
    /// stale one (its report older than one already answered) and a non-renewal change nothing.
    pub fn on_grant(&mut self, grant: &Grant, now: Time) -> Applied {
        let mut out = Applied::default();
        if grant.epoch != self.epoch || grant.seq <= self.acked || grant.lease_ms == 0 {
            return out;
        }
        let Some(&(_, sent)) = self.sent.iter().find(|(s, _)| *s == grant.seq) else {
            return out;
        };
        self.acked = grant.seq;
        self.lease = Duration::from_millis(grant.lease_ms);
        let until = sent + self.lease;
        self.renewed = Some(self.renewed.map_or(until, |r| r.max(until)));
        self.leases.retain(|g, _| {
            let keep = grant.gateways.contains_key(g);
            if !keep {
                out.revoked.push(g.clone());
            }
            keep
        });
        for (g, addrs) in &grant.gateways {
            match self.leases.get_mut(g) {
                Some(h) if h.addrs == *addrs => h.until = h.until.max(until),
                Some(h) => {
                    *h = Held {
                        addrs: addrs.clone(),
                        until,
                    };
                    out.gained.push(g.clone());
                }
                None => {
                    if until > now {
                        out.gained.push(g.clone());
                    }
                    self.leases.insert(
                        g.clone(),
                        Held {
                            addrs: addrs.clone(),
                            until,
                        },
                    );
                }
            }
        }
        self.leases.retain(|_, h| h.until > now);
        out
    }

    /// The gateways leased now.
    pub fn leased(&self, now: Time) -> impl Iterator<Item = (&String, &Held)> {
        self.leases.iter().filter(move |(_, h)| h.until > now)
    }

    pub fn lease_of(&self, gateway: &str, now: Time) -> Option<&Held> {
        self.leases.get(gateway).filter(|h| h.until > now)
    }

    /// Every resource this node may hold now: its live leases and the fence elements that may
    /// still be live in its kernel.
    pub fn claims(&self, now: Time) -> BTreeSet<Resource> {
        let mut out = BTreeSet::new();
        for (g, h) in self.leased(now) {
            out.insert(Resource::Gateway(g.clone()));
            out.extend(h.addrs.iter().map(|a| Resource::Addr(*a)));
        }
        out.extend(
            self.fence
                .iter()
                .chain(&self.writing)
                .filter(|(_, end)| **end > now)
                .map(|(a, _)| Resource::Addr(*a)),
        );
        out
    }

    /// The fence the kernel should hold now: every address of a live lease whose data plane is
    /// `ready` (SNAT and address in place — the takeover order), until its lease ends at the
    /// latest. An element that still has half a lease to run keeps its end rather than follow
    /// every renewal: each write makes the kernel rebuild the set (a renewal every report
    /// interval was a fifth of an idle node's CPU), and an earlier end only silences the address
    /// sooner, never later than its lease.
    pub fn fence_target(&self, ready: &BTreeSet<IpAddr>, now: Time) -> BTreeMap<IpAddr, Time> {
        let mut out = BTreeMap::new();
        for (_, h) in self.leased(now) {
            for a in h.addrs.iter().filter(|a| ready.contains(a)) {
                let e = out.entry(*a).or_insert(h.until);
                *e = (*e).max(h.until);
            }
        }
        let keep_while = now + self.lease / 2;
        for (a, end) in out.iter_mut() {
            if let Some(&old) = self.fence.get(a)
                && old <= *end
                && old >= keep_while
            {
                *end = old;
            }
        }
        out
    }

    /// A write of `target` to the fence starts: claimed from now until its outcome is known.
    pub fn fence_writing(&mut self, target: &BTreeMap<IpAddr, Time>) {
        self.writing = target.clone();
    }

    /// The kernel now holds exactly `fence` (each element ends at the given time at the latest);
    /// every other element was deleted.
    pub fn fence_written(&mut self, fence: BTreeMap<IpAddr, Time>) {
        self.fence = fence;
        self.writing.clear();
    }

    /// A fence write failed: the kernel holds either the old or the new elements (a batch is
    /// atomic), so count both.
    pub fn fence_failed(&mut self, attempted: &BTreeMap<IpAddr, Time>) {
        for (a, end) in attempted {
            let e = self.fence.entry(*a).or_insert(*end);
            *e = (*e).max(*end);
        }
        self.writing.clear();
    }

    /// The write that started was never sent (its tables could not be built): the kernel holds
    /// what it held.
    pub fn fence_unchanged(&mut self) {
        self.writing.clear();
    }

    /// What the fence holds, as far as this node knows.
    pub fn fence(&self) -> &BTreeMap<IpAddr, Time> {
        &self.fence
    }

    /// The addresses whose fence elements may still be live at `now`.
    pub fn fenced(&self, now: Time) -> impl Iterator<Item = IpAddr> + '_ {
        self.fence
            .iter()
            .filter(move |(_, end)| **end > now)
            .map(|(a, _)| *a)
    }

    /// Whether an announcement for `addr` may go out now: the address is leased, and its fence
    /// element lives for at least `margin` more.
    pub fn may_announce(&self, addr: IpAddr, now: Time, margin: Duration) -> bool {
        self.fence.get(&addr).is_some_and(|end| *end > now + margin)
            && self
                .leased(now)
                .any(|(_, h)| h.addrs.contains(&addr) && h.until > now + margin)
    }

    /// Whether the leader renewed this node's lease (with or without gateways) recently enough
    /// that it still lasts: a node cut off from the leader does not know who is active.
    pub fn in_contact(&self, now: Time) -> bool {
        self.renewed.is_some_and(|r| r > now)
    }

    /// The next moment something ends by itself (a lease), for the caller's timer.
    pub fn next_deadline(&self, now: Time) -> Option<Time> {
        self.leases
            .values()
            .map(|h| h.until)
            .chain(self.renewed)
            .chain(self.fence.values().copied())
            .filter(|t| *t > now)
            .min()
    }

    /// Shutting down or giving up: hold nothing from now on (the fence is emptied next).
    pub fn drop_all(&mut self) -> Vec<String> {
        self.renewed = None;
        std::mem::take(&mut self.leases).into_keys().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The leader's half

/// The latest in-order report of a node.
#[derive(Debug, Clone)]
struct Peer {
    epoch: u64,
    seq: u64,
    received: Time,
}

/// When each voter last acknowledged a leadership, for the leader's grants. A reading is the
/// leader's clock taken *before* it sent the request the voter answered without refusing the
/// leader's vote: the voter cannot have voted for a later term before that instant, so no later
/// leader was elected before it either. Raft's own heartbeats carry these rounds.
#[derive(Debug, Clone)]
pub struct QuorumClock<K> {
    term: u64,
    acked: BTreeMap<K, Time>,
}

impl<K: Ord> Default for QuorumClock<K> {
    fn default() -> Self {
        QuorumClock {
            term: 0,
            acked: BTreeMap::new(),
        }
    }
}

impl<K: Ord> QuorumClock<K> {
    /// `peer` accepted this node's leadership of `term` in an answer to a request sent at
    /// `sent`. Answers of an older term are ignored; a newer term forgets the older one's.
    pub fn ack(&mut self, term: u64, peer: K, sent: Time) {
        if term < self.term {
            return;
        }
        if term > self.term {
            self.term = term;
            self.acked.clear();
        }
        let t = self.acked.entry(peer).or_insert(sent);
        if *t < sent {
            *t = sent;
        }
    }

    /// The latest instant at which a quorum of every configuration in `voters` (two during a
    /// joint membership change) is known to have accepted `me` as leader of `term`. `me` counts
    /// as accepting at `now`. `None` if some configuration has no such quorum yet.
    pub fn confirmed(&self, term: u64, me: &K, now: Time, voters: &[BTreeSet<K>]) -> Option<Time> {
        let mut at: Option<Time> = None;
        for config in voters {
            let mut times: Vec<Time> = config
                .iter()
                .filter_map(|k| {
                    if k == me {
                        Some(now)
                    } else if term == self.term {
                        self.acked.get(k).copied()
                    } else {
                        None
                    }
                })
                .collect();
            let majority = config.len() / 2 + 1;
            if config.is_empty() || times.len() < majority {
                return None;
            }
            times.sort_unstable_by(|a, b| b.cmp(a));
            let t = times[majority - 1];
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }
}

/// A lease this leader gave a node on a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    /// The node's lease ends before this, on the leader's clock.
    until: Time,
    /// The report sequence number whose grant left the resource out.
    revoked_at: Option<u64>,
}

/// The leader's lease bookkeeping. A new one is made when a node becomes leader.
#[derive(Debug, Clone)]
pub struct LeaderLease {
    timing: Timing,
    since: Time,
    quorum_until: Option<Time>,
    peers: BTreeMap<String, Peer>,
    holds: BTreeMap<Resource, BTreeMap<String, Hold>>,
    /// Gateways whose assignment change is decided and not yet applied, with the log index of
    /// the change once it is known.
    moving: BTreeMap<String, Option<u64>>,
    /// Holds ended by reports (releases confirmed, restarted daemons), counted.
    released: u64,
}

impl LeaderLease {
    pub fn new(timing: Timing, now: Time) -> Self {
        LeaderLease {
            timing,
            since: now,
            quorum_until: None,
            peers: BTreeMap::new(),
            holds: BTreeMap::new(),
            moving: BTreeMap::new(),
            released: 0,
        }
    }

    /// How many holds reports have ended so far: a change tells the controller that a
    /// gateway it waits for may be free.
    pub fn released(&self) -> u64 {
        self.released
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// A quorum confirmed this leadership (and the applied state is current) with a round that
    /// started at `at`: grants may last until `at + lease`.
    pub fn confirmed(&mut self, at: Time) {
        let until = at + self.timing.lease;
        if self.quorum_until.is_none_or(|u| u < until) {
            self.quorum_until = Some(until);
        }
    }

    /// How much longer this leader may grant.
    pub fn quorum_remaining(&self, now: Time) -> Duration {
        self.quorum_until
            .map_or(Duration::ZERO, |u| u.saturating_sub(now))
    }

    /// Whether the predecessor's grants may still be live.
    pub fn settling(&self, now: Time) -> bool {
        now < self.since + self.timing.settle()
    }

    /// When this leader took over.
    pub fn since(&self) -> Time {
        self.since
    }

    /// Takes a report of `node` and answers it. `assigned`: the gateways the applied state gives
    /// this node, with their addresses.
    pub fn on_report(
        &mut self,
        node: &str,
        head: &ReportHead,
        assigned: &BTreeMap<String, Vec<IpAddr>>,
        now: Time,
    ) -> Grant {
        let mut grant = Grant {
            epoch: head.epoch,
            seq: head.seq,
            lease_ms: 0,
            gateways: BTreeMap::new(),
        };
        match self.peers.get(node) {
            Some(p) if head.epoch < p.epoch => return grant,
            Some(p) if head.epoch == p.epoch && head.seq <= p.seq => return grant,
            Some(p) if head.epoch > p.epoch => {
                // A restarted daemon emptied its fence before its first report: whatever this
                // leader granted its previous incarnation is gone.
                for holders in self.holds.values_mut() {
                    if holders.remove(node).is_some() {
                        self.released += 1;
                    }
                }
            }
            _ => {}
        }
        self.peers.insert(
            node.to_string(),
            Peer {
                epoch: head.epoch,
                seq: head.seq,
                received: now,
            },
        );
        // Releases this report confirms: sent after the revoking grant was applied, and the
        // resource is no longer claimed.
        for (res, holders) in &mut self.holds {
            if let Some(h) = holders.get(node)
                && h.revoked_at.is_some_and(|j| head.acked >= j)
                && !head.claims.contains(res)
            {
                holders.remove(node);
                self.released += 1;
            }
        }
        self.holds.retain(|_, h| !h.is_empty());

        let remaining = self.quorum_remaining(now).min(self.timing.lease);
        let lease_ms = remaining.as_millis() as u64;
        if lease_ms == 0 {
            return grant;
        }
        grant.lease_ms = lease_ms;
        // A resource the node does not claim yet is granted only when no other node may hold
        // it. The controller checks that before it assigns a gateway, but a committed change of
        // a gateway's addresses (a VIP moved from a gateway held elsewhere) reaches the grants
        // without an assignment change. Such a gateway is withheld whole until then (its SNAT
        // needs its address). A settling leader knows no holds yet and re-grants what the
        // committed state says: waiting out the settling kept an active node whose lease lapsed
        // during the election dark for it (a VIP moved just before a change of leader is the
        // case this leaves open; README, known limits).
        let grantable = |res: &Resource| {
            head.claims.contains(res)
                || !self
                    .holds
                    .get(res)
                    .is_some_and(|h| h.iter().any(|(n, h)| n != node && h.until > now))
        };
        grant.gateways = assigned
            .iter()
            .filter(|(g, _)| !self.moving.contains_key(*g))
            .filter(|(g, a)| resources(g, a).iter().all(grantable))
            .map(|(g, a)| (g.clone(), a.clone()))
            .collect();
        let granted: BTreeSet<Resource> = grant
            .gateways
            .iter()
            .flat_map(|(g, a)| resources(g, a))
            .collect();
        let until = now + self.timing.stretch(Duration::from_millis(lease_ms));
        for res in &granted {
            let h = self
                .holds
                .entry(res.clone())
                .or_default()
                .entry(node.to_string())
                .or_insert(Hold {
                    until,
                    revoked_at: None,
                });
            h.until = h.until.max(until);
            h.revoked_at = None;
        }
        for (res, holders) in &mut self.holds {
            if granted.contains(res) {
                continue;
            }
            if let Some(h) = holders.get_mut(node)
                && h.revoked_at.is_none()
            {
                h.revoked_at = Some(head.seq);
            }
        }
        grant
    }

    /// Since when `node` has been silent: its last in-order report, or this leader's start.
    pub fn silent_for(&self, node: &str, now: Time) -> Duration {
        let since = self.peers.get(node).map_or(self.since, |p| p.received);
        now.saturating_sub(since)
    }

    /// A live member: reported within the failover timeout. A node not heard from since this
    /// leader took over counts as live until the settling is over (it would have reported
    /// several times by then).
    pub fn alive(&self, node: &str, now: Time) -> bool {
        match self.peers.get(node) {
            Some(p) => now.saturating_sub(p.received) < self.timing.failover_timeout,
            None => false,
        }
    }

    /// Whether this node has reported to this leader.
    pub fn heard_from(&self, node: &str) -> bool {
        self.peers.contains_key(node)
    }

    /// Whether `node` may hold `res` now, as far as this leader can tell.
    pub fn may_hold(&self, node: &str, res: &Resource, now: Time) -> bool {
        self.settling(now)
            || self
                .holds
                .get(res)
                .and_then(|h| h.get(node))
                .is_some_and(|h| h.until > now)
    }

    /// Whether `resources` can be given to `to` (or to nobody) now: no other node may hold any
    /// of them. `members` are the cluster's members; every node that ever held one counts too.
    pub fn free(
        &self,
        resources: &[Resource],
        to: Option<&str>,
        members: &[String],
        now: Time,
    ) -> bool {
        let others = |res: &Resource| -> BTreeSet<String> {
            let mut s: BTreeSet<String> = members.iter().cloned().collect();
            s.extend(self.peers.keys().cloned());
            if let Some(h) = self.holds.get(res) {
                s.extend(h.keys().cloned());
            }
            if let Some(to) = to {
                s.remove(to);
            }
            s
        };
        resources
            .iter()
            .all(|res| others(res).iter().all(|n| !self.may_hold(n, res, now)))
    }

    /// The nodes that may hold `res` now (for status and logs).
    pub fn holders(&self, res: &Resource, now: Time) -> Vec<String> {
        self.holds
            .get(res)
            .map(|h| {
                h.iter()
                    .filter(|(_, h)| h.until > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// An assignment change of `gateway` is decided: grant it to nobody until it is applied.
    pub fn start_move(&mut self, gateway: &str) {
        self.moving.insert(gateway.to_string(), None);
    }

    /// The change was appended as log entry `index`.
    pub fn move_logged(&mut self, gateway: &str, index: u64) {
        if let Some(i) = self.moving.get_mut(gateway) {
            *i = Some(index);
        }
    }

    /// The applied state reached `index`: moves logged at or before it are done.
    pub fn applied(&mut self, index: u64) {
        self.moving.retain(|_, i| i.is_none_or(|i| i > index));
    }

    pub fn is_moving(&self, gateway: &str) -> bool {
        self.moving.contains_key(gateway)
    }

    /// The earliest moment at which a decision could change without a new report: a node going
    /// silent, a hold running out, the settling ending.
    pub fn next_deadline(&self, now: Time) -> Option<Time> {
        let silent = self
            .peers
            .values()
            .map(|p| p.received + self.timing.failover_timeout);
        let holds = self
            .holds
            .values()
            .flat_map(|h| h.values().map(|h| h.until));
        let settle = std::iter::once(self.since + self.timing.settle());
        silent.chain(holds).chain(settle).filter(|t| *t > now).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        lease: Duration::from_millis(150),
        failover_timeout: Duration::from_millis(250),
        drift: 0.001,
        margin: Duration::from_millis(10),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn vip() -> IpAddr {
        "198.18.0.50".parse().unwrap()
    }

    fn g_assigned() -> BTreeMap<String, Vec<IpAddr>> {
        [("g".to_string(), vec![vip()])].into_iter().collect()
    }

    fn none() -> BTreeMap<String, Vec<IpAddr>> {
        BTreeMap::new()
    }

    fn members() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    /// A leader past its settling, confirmed at `t`.
    fn settled_leader(t: Time) -> LeaderLease {
        let mut l = LeaderLease::new(T, t);
        l.confirmed(t + T.settle());
        l
    }

    #[test]
    fn a_node_measures_its_lease_from_the_send_time() {
        let mut n = NodeLease::new(1);
        let head = n.report(ms(1000));
        let mut l = settled_leader(ms(0));
        let now = T.settle() + ms(5);
        let g = l.on_report("a", &head, &g_assigned(), now);
        assert!(g.lease_ms > 0 && g.lease_ms <= 150);
        let applied = n.on_grant(&g, ms(1030));
        assert_eq!(applied.gained, ["g"]);
        let h = n.lease_of("g", ms(1030)).unwrap();
        assert_eq!(h.until, ms(1000) + ms(g.lease_ms));
        assert!(n.lease_of("g", ms(1000) + ms(g.lease_ms)).is_none());
    }

    #[test]
    fn a_standby_is_in_contact_only_while_its_last_renewal_lasts() {
        let mut n = NodeLease::new(1);
        assert!(!n.in_contact(ms(0)));
        let head = n.report(ms(1000));
        let mut l = settled_leader(ms(0));
        let g = l.on_report("a", &head, &none(), T.settle() + ms(5));
        assert!(g.lease_ms > 0);
        n.on_grant(&g, ms(1010));
        let end = ms(1000) + ms(g.lease_ms);
        assert!(n.in_contact(ms(1010)) && n.in_contact(end - ms(1)));
        assert!(!n.in_contact(end), "a lapsed renewal is no contact");
        assert_eq!(n.next_deadline(ms(1010)), Some(end));
        // A refusal (no quorum) does not renew.
        let mut zero = g.clone();
        zero.seq = n.report(ms(1020)).seq;
        zero.lease_ms = 0;
        n.on_grant(&zero, ms(1021));
        assert!(!n.in_contact(end));
    }

    #[test]
    fn stale_duplicate_and_foreign_grants_change_nothing() {
        let mut n = NodeLease::new(2);
        let h1 = n.report(ms(0));
        let h2 = n.report(ms(10));
        let grant = |h: &ReportHead, gws| Grant {
            epoch: h.epoch,
            seq: h.seq,
            lease_ms: 100,
            gateways: gws,
        };
        assert_eq!(n.on_grant(&grant(&h2, none()), ms(12)), Applied::default());
        // The reply to the older report arrives late: ignored, so it cannot re-grant.
        assert!(
            n.on_grant(&grant(&h1, g_assigned()), ms(13))
                .gained
                .is_empty()
        );
        assert!(n.lease_of("g", ms(13)).is_none());
        let mut other = grant(&n.report(ms(20)), g_assigned());
        other.epoch = 1;
        assert!(n.on_grant(&other, ms(21)).gained.is_empty());
        let mut zero = grant(&n.report(ms(30)), g_assigned());
        zero.lease_ms = 0;
        assert!(n.on_grant(&zero, ms(31)).gained.is_empty());
    }

    /// The reports go on while a fence write waits for the kernel: an address being written is
    /// claimed from the start of the write, also after its lease is revoked, until the outcome.
    #[test]
    fn an_address_is_claimed_while_its_fence_write_is_under_way() {
        let mut n = NodeLease::new(1);
        let ready: BTreeSet<IpAddr> = [vip()].into_iter().collect();
        let grant = |seq, gateways| Grant {
            epoch: 1,
            seq,
            lease_ms: 150,
            gateways,
        };
        let h = n.report(ms(0));
        n.on_grant(&grant(h.seq, g_assigned()), ms(2));
        let target = n.fence_target(&ready, ms(2));
        n.fence_writing(&target);
        // Revoked while the write waits.
        let h = n.report(ms(50));
        n.on_grant(&grant(h.seq, none()), ms(52));
        assert!(n.lease_of("g", ms(60)).is_none());
        assert!(
            n.report(ms(60)).claims.contains(&Resource::Addr(vip())),
            "an address being written is claimed"
        );
        assert!(
            !n.may_announce(vip(), ms(60), ms(1)),
            "not announced before it is in"
        );
        // Written: the next write removes it, and it is claimed until that one is done too.
        n.fence_written(target);
        n.fence_writing(&BTreeMap::new());
        assert!(n.report(ms(70)).claims.contains(&Resource::Addr(vip())));
        n.fence_written(BTreeMap::new());
        assert!(n.report(ms(80)).claims.is_empty());
        // A write that was never sent leaves the claims to what the kernel held.
        n.fence_writing(&[(vip(), ms(200))].into_iter().collect());
        n.fence_unchanged();
        assert!(n.report(ms(90)).claims.is_empty());
        // A failed one may have landed: claimed until its end.
        let attempted = [(vip(), ms(200))].into_iter().collect();
        n.fence_writing(&attempted);
        n.fence_failed(&attempted);
        assert!(n.report(ms(199)).claims.contains(&Resource::Addr(vip())));
        assert!(n.report(ms(200)).claims.is_empty());
    }

    #[test]
    fn a_fence_element_is_rewritten_once_half_its_lease_is_gone_and_never_outlives_it() {
        let mut n = NodeLease::new(1);
        let ready: BTreeSet<IpAddr> = [vip()].into_iter().collect();
        let mut writes = 0;
        for t in (0..1000).step_by(50) {
            let h = n.report(ms(t));
            n.on_grant(
                &Grant {
                    epoch: 1,
                    seq: h.seq,
                    lease_ms: 150,
                    gateways: g_assigned(),
                },
                ms(t + 2),
            );
            let target = n.fence_target(&ready, ms(t + 2));
            let end = target[&vip()];
            let lease_end = n.lease_of("g", ms(t + 2)).map(|h| h.until);
            assert!(
                Some(end) <= lease_end,
                "the fence outlives the lease at {t} ms"
            );
            assert!(
                end >= ms(t + 2) + ms(75),
                "less than half a lease left at {t} ms"
            );
            if n.fence().get(&vip()) != Some(&end) {
                writes += 1;
            }
            n.fence_written(target);
        }
        // A grant every 50 ms for a 150 ms lease: one write in two.
        assert_eq!(writes, 10);
        // A shorter lease (the grant shrinks it) is written at once.
        if let Some(h) = n.leases.get_mut("g") {
            h.until = ms(1000);
        }
        assert_eq!(n.fence_target(&ready, ms(990))[&vip()], ms(1000));
    }

    #[test]
    fn claims_cover_leases_and_fence_elements_that_may_outlive_them() {
        let mut n = NodeLease::new(1);
        let h = n.report(ms(0));
        n.on_grant(
            &Grant {
                epoch: 1,
                seq: h.seq,
                lease_ms: 100,
                gateways: g_assigned(),
            },
            ms(5),
        );
        let ready: BTreeSet<IpAddr> = [vip()].into_iter().collect();
        let target = n.fence_target(&ready, ms(5));
        assert_eq!(target.get(&vip()), Some(&ms(100)));
        n.fence_written(target);
        assert!(n.may_announce(vip(), ms(50), ms(5)));
        assert!(!n.may_announce(vip(), ms(96), ms(5)));
        // Revoked: the lease is gone at once, the fence element until it is deleted.
        let h = n.report(ms(20));
        let applied = n.on_grant(
            &Grant {
                epoch: 1,
                seq: h.seq,
                lease_ms: 100,
                gateways: none(),
            },
            ms(21),
        );
        assert_eq!(applied.revoked, ["g"]);
        assert!(!n.may_announce(vip(), ms(22), ms(0)));
        let claims = n.claims(ms(22));
        assert!(claims.contains(&Resource::Addr(vip())));
        assert!(!claims.contains(&Resource::Gateway("g".into())));
        n.fence_written(n.fence_target(&ready, ms(23)));
        assert!(n.claims(ms(23)).is_empty());
    }

    #[test]
    fn hole1_a_move_in_flight_is_never_regranted() {
        let mut l = settled_leader(ms(0));
        let t = T.settle() + ms(1);
        let mut a = NodeLease::new(1);
        l.on_report("a", &a.report(t), &g_assigned(), t);
        l.start_move("g");
        // The move of g away from a is being committed; a's late report must not renew it.
        let g = l.on_report("a", &a.report(t + ms(5)), &g_assigned(), t + ms(5));
        assert!(!g.gateways.contains_key("g"));
        l.move_logged("g", 7);
        l.applied(6);
        assert!(l.is_moving("g"));
        l.applied(7);
        assert!(!l.is_moving("g"));
    }

    #[test]
    fn hole2_a_new_leader_counts_everyone_as_holding_until_settled() {
        let t = ms(1000);
        let mut l = LeaderLease::new(T, t);
        l.confirmed(t);
        for n in members() {
            l.on_report(&n, &NodeLease::new(1).report(t), &none(), t);
        }
        let res = resources("g", &[vip()]);
        assert!(!l.free(&res, Some("a"), &members(), t + ms(1)));
        assert!(!l.free(&res, Some("a"), &members(), t + T.settle() - ms(1)));
        assert!(l.free(&res, Some("a"), &members(), t + T.settle()));
        // A lone member has nobody to wait for.
        let lone = LeaderLease::new(T, t);
        assert!(lone.free(&res, Some("a"), &["a".to_string()], t));
    }

    /// Found by the long simulation (seed 1077): a committed change moved a VIP from g1 (held
    /// by a) to g2 (held by b), and the leader granted g2 with the VIP at b's next report while
    /// a's lease on it ran on. A resource the reporting node does not claim yet is granted only
    /// once no other node may hold it; a settling leader re-grants what is committed.
    #[test]
    fn hole4_an_address_moved_to_a_gateway_held_elsewhere_waits_for_its_old_holder() {
        let other: IpAddr = "198.18.0.60".parse().unwrap();
        let freed: IpAddr = "198.18.0.61".parse().unwrap();
        let gw = |g: &str, a: IpAddr| -> BTreeMap<String, Vec<IpAddr>> {
            [(g.to_string(), vec![a])].into_iter().collect()
        };
        let mut l = settled_leader(ms(0));
        let t0 = T.settle() + ms(5);
        let (mut a, mut b) = (NodeLease::new(1), NodeLease::new(1));
        let h = a.report(t0);
        a.on_grant(&l.on_report("a", &h, &gw("g1", vip()), t0), t0);
        let h = b.report(t0);
        b.on_grant(&l.on_report("b", &h, &gw("g2", other), t0), t0);
        // The VIP moves from g1 to g2.
        let h = b.report(t0 + ms(10));
        let g = l.on_report("b", &h, &gw("g2", vip()), t0 + ms(10));
        assert!(g.lease_ms > 0);
        assert!(
            g.gateways.is_empty(),
            "g2 withheld while a may still answer for the VIP: {g:?}"
        );
        // a applies the grant that takes the VIP away and confirms it with its next report.
        let h = a.report(t0 + ms(20));
        a.on_grant(
            &l.on_report("a", &h, &gw("g1", freed), t0 + ms(20)),
            t0 + ms(20),
        );
        let h = a.report(t0 + ms(30));
        assert!(!h.claims.contains(&Resource::Addr(vip())));
        l.on_report("a", &h, &gw("g1", freed), t0 + ms(30));
        let h = b.report(t0 + ms(40));
        let g = l.on_report("b", &h, &gw("g2", vip()), t0 + ms(40));
        assert_eq!(g.gateways, gw("g2", vip()));
        b.on_grant(&g, t0 + ms(40));
        // A new leader renews what a node claims, and re-grants a lapsed node while settling.
        let t1 = t0 + ms(50);
        let mut n = LeaderLease::new(T, t1);
        n.confirmed(t1);
        let h = b.report(t1);
        assert!(h.claims.contains(&Resource::Addr(vip())));
        assert_eq!(
            n.on_report("b", &h, &gw("g2", vip()), t1).gateways,
            gw("g2", vip())
        );
        let h = a.report(t1 + ms(1));
        assert_eq!(
            n.on_report("a", &h, &gw("g3", other), t1 + ms(1)).gateways,
            gw("g3", other)
        );
        assert!(
            n.on_report("a", &h, &gw("g3", other), t1 + ms(1))
                .gateways
                .is_empty()
        );
    }

    #[test]
    fn hole3_a_stale_report_never_confirms_a_release() {
        let mut l = settled_leader(ms(0));
        let t = T.settle() + ms(1);
        let mut a = NodeLease::new(1);
        let stale = a.report(t); // claims nothing yet
        let g1 = l.on_report("a", &stale, &g_assigned(), t);
        a.on_grant(&g1, t + ms(1));
        let r2 = a.report(t + ms(2)); // claims g
        let revoke = l.on_report("a", &r2, &none(), t + ms(3));
        assert!(revoke.gateways.is_empty());
        // The stale report is delivered again before a applied the revoking grant.
        l.on_report("a", &stale, &none(), t + ms(4));
        let res = Resource::Addr(vip());
        assert!(l.may_hold("a", &res, t + ms(5)));
        // A report sent before the revoking grant was applied does not confirm either.
        let r3 = a.report(t + ms(6));
        l.on_report("a", &r3, &none(), t + ms(7));
        assert!(l.may_hold("a", &res, t + ms(8)));
        // a applies the revocation, deletes its fence element and says so.
        a.on_grant(&revoke, t + ms(9));
        a.fence_written(BTreeMap::new());
        let r4 = a.report(t + ms(10));
        assert!(r4.claims.is_empty() && r4.acked == revoke.seq);
        l.on_report("a", &r4, &none(), t + ms(11));
        assert!(!l.may_hold("a", &res, t + ms(12)));
        assert!(l.free(&resources("g", &[vip()]), Some("b"), &members(), t + ms(12)));
    }

    #[test]
    fn a_silent_node_holds_nothing_once_its_bound_passes() {
        let mut l = settled_leader(ms(0));
        let t = T.settle() + ms(1);
        let g = l.on_report("a", &NodeLease::new(1).report(t), &g_assigned(), t);
        assert!(g.gateways.contains_key("g"));
        let res = Resource::Addr(vip());
        let bound = t + T.stretch(ms(g.lease_ms));
        assert!(l.may_hold("a", &res, bound - ms(1)));
        assert!(!l.may_hold("a", &res, bound));
        assert!(
            bound < t + T.failover_timeout,
            "failover waits for the bound"
        );
        assert!(!l.alive("a", t + T.failover_timeout));
    }

    #[test]
    fn without_a_confirmed_quorum_nothing_is_renewed_or_revoked() {
        let mut l = LeaderLease::new(T, ms(0));
        let g = l.on_report("a", &NodeLease::new(1).report(ms(1)), &g_assigned(), ms(1));
        assert_eq!(g.lease_ms, 0);
        let mut n = NodeLease::new(1);
        let h = n.report(ms(0));
        n.on_grant(
            &Grant {
                epoch: 1,
                seq: h.seq,
                lease_ms: 100,
                gateways: g_assigned(),
            },
            ms(1),
        );
        let mut zero = Grant {
            epoch: 1,
            seq: n.report(ms(2)).seq,
            ..Grant::default()
        };
        zero.lease_ms = 0;
        assert!(n.on_grant(&zero, ms(3)).revoked.is_empty());
        assert!(n.lease_of("g", ms(3)).is_some());
    }

    #[test]
    fn a_new_epoch_confirms_every_release_of_the_old_one() {
        let mut l = settled_leader(ms(0));
        let t = T.settle() + ms(1);
        l.on_report("a", &NodeLease::new(1).report(t), &g_assigned(), t);
        let res = Resource::Addr(vip());
        assert!(l.may_hold("a", &res, t + ms(1)));
        l.on_report(
            "a",
            &NodeLease::new(2).report(t + ms(2)),
            &none(),
            t + ms(2),
        );
        assert!(!l.may_hold("a", &res, t + ms(3)));
        // A late report of the old incarnation changes nothing.
        let g = l.on_report("a", &NodeLease::new(1).report(t), &g_assigned(), t + ms(4));
        assert_eq!(g.lease_ms, 0);
        assert!(!l.may_hold("a", &res, t + ms(5)));
    }

    #[test]
    fn the_timing_relations_are_checked() {
        assert!(T.check(ms(50)).is_empty());
        let slow_reports = T.check(ms(150));
        assert!(
            slow_reports[0].contains("report_interval_ms (150)"),
            "{slow_reports:?}"
        );
        let t = Timing {
            lease: ms(400),
            failover_timeout: ms(405),
            ..T
        };
        let e = t.check(ms(50));
        assert!(e[0].contains("failover_timeout_ms (405)"), "{e:?}");
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_quorum_time_is_the_majoritys_oldest_acknowledged_send() {
        let mut q = QuorumClock::default();
        let voters = [set(&["a", "b", "c"])];
        let me = "a".to_string();
        // The leader alone is no quorum of three.
        assert_eq!(q.confirmed(3, &me, ms(200), &voters), None);
        q.ack(3, "c".into(), ms(80));
        assert_eq!(q.confirmed(3, &me, ms(200), &voters), Some(ms(80)));
        q.ack(3, "b".into(), ms(100));
        assert_eq!(q.confirmed(3, &me, ms(200), &voters), Some(ms(100)));
        // An answer to an older request (reordered, duplicated) moves nothing back.
        q.ack(3, "b".into(), ms(50));
        assert_eq!(q.confirmed(3, &me, ms(200), &voters), Some(ms(100)));
        // Five voters need two answers besides the leader's own.
        let five = [set(&["a", "b", "c", "d", "e"])];
        assert_eq!(q.confirmed(3, &me, ms(200), &five), Some(ms(80)));
        q.ack(3, "d".into(), ms(40));
        assert_eq!(q.confirmed(3, &me, ms(200), &five), Some(ms(80)));
    }

    #[test]
    fn answers_count_only_for_the_term_they_accepted() {
        let mut q = QuorumClock::default();
        let voters = [set(&["a", "b", "c"])];
        let me = "a".to_string();
        q.ack(3, "b".into(), ms(100));
        // The same node leading a later term has no confirmation from the earlier one.
        assert_eq!(q.confirmed(4, &me, ms(200), &voters), None);
        q.ack(4, "c".into(), ms(150));
        assert_eq!(q.confirmed(4, &me, ms(200), &voters), Some(ms(150)));
        // A late answer of term 3 neither counts nor brings term 3 back.
        q.ack(3, "b".into(), ms(190));
        assert_eq!(q.confirmed(4, &me, ms(200), &voters), Some(ms(150)));
        assert_eq!(q.confirmed(3, &me, ms(200), &voters), None);
    }

    #[test]
    fn a_joint_membership_needs_a_quorum_of_both_configurations() {
        let mut q = QuorumClock::default();
        let joint = [set(&["a", "b", "c"]), set(&["a", "d", "e"])];
        let me = "a".to_string();
        q.ack(2, "b".into(), ms(100));
        assert_eq!(q.confirmed(2, &me, ms(200), &joint), None);
        q.ack(2, "e".into(), ms(60));
        assert_eq!(q.confirmed(2, &me, ms(200), &joint), Some(ms(60)));
        // A leader outside a configuration (it is being removed) counts for nothing there.
        let without_me = [set(&["b", "c", "d"])];
        assert_eq!(q.confirmed(2, &me, ms(200), &without_me), None);
        q.ack(2, "c".into(), ms(90));
        assert_eq!(q.confirmed(2, &me, ms(200), &without_me), Some(ms(90)));
        q.ack(2, "d".into(), ms(95));
        assert_eq!(q.confirmed(2, &me, ms(200), &without_me), Some(ms(95)));
        assert_eq!(q.confirmed(2, &me, ms(200), &[]), None);
    }
}
