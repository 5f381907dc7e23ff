//! Deterministic simulation of the lease protocol (`egressd::lease` and the leader's
//! `Controller`): the real code, driven by a seeded random schedule over simulated time.
//!
//! What is simulated: 3–5 nodes, each with its own clock (rates differing by up to 0.1 %), its
//! node-side lease state, a data plane that becomes ready after a random (sometimes long) delay,
//! and a kernel fence whose elements end at an absolute time (or, to show the hole that closes,
//! after a relative timeout only). A Raft model elects leaders (at most one per term, by exactly
//! a majority of votes; a node refuses appends of a term older than its vote), commits the
//! controller's assignment changes (an old leader's uncommitted entry is committed by the next
//! one or lost), and carries the leader's heartbeats, whose answers confirm its leadership
//! (`QuorumClock`): a minority that has not heard of a new term goes on answering the old
//! leader. Faults: message loss, duplication, delay and reordering, partitions of one or two
//! nodes, pauses of a node (also between computing a fence element and writing it; the messages
//! that waited are then read in any order), slow fence writes while the process goes on
//! reporting (nftables' commit lock held by a map load), kills and restarts, forced leader
//! changes, cordons, nodes going not-ready, VIPs moving between gateways, and slow links (every
//! message of a node, often the leader, 30–300 ms late).
//!
//! Safety (checked at every write of a fence element and every lease a node takes): no two nodes
//! ever hold a live fence element for the same address, nor a live lease for the same gateway.
//! Liveness (checked after each fault phase heals): every gateway is held again, by its elected
//! node, within the failover bound.
//!
//! Why a hand-written event queue and not `turmoil`: the protocol core has no sockets, threads
//! or tokio in it, so the simulator can own time completely (per-node clock rates, pauses that
//! stop a process but not its kernel, a write delayed past a pause) and run millions of events
//! per second; turmoil simulates tokio networking, which the pure module does not use.
//!
//! A failure prints its seed; `EGRESSD_SIM_SEED=<seed> cargo test --test sim -- replay` runs it
//! again. CI runs `short`; `long` (ignored) runs `EGRESSD_SIM_SEEDS` seeds (default 200) of
//! `EGRESSD_SIM_EVENTS` events each (default 1 000 000): `scripts/sim-long.sh`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use egressd::cluster::controller::{Controller, Report};
use egressd::cluster::state::{AssignChange, Reason};
use egressd::cluster::{ClusterState, Command};
use egressd::lease::{Grant, NodeLease, QuorumClock, Timing};
use egressd::model::{Gateway, InterfaceState, Labels, NextHop, Selection, SourceIp};

// ---------------------------------------------------------------------------------------------
// Random numbers: SplitMix64, so that a seed means the same schedule on every machine.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi].
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Time: real time in microseconds; each node's clock runs at its own rate.

type Us = u64;

const MS: Us = 1000;

#[derive(Clone, Copy)]
struct Clock {
    offset: f64,
    rate: f64,
}

impl Clock {
    fn local(&self, real: Us) -> Duration {
        Duration::from_micros((self.offset + real as f64 * self.rate) as u64)
    }
    /// The real time at which this clock reads `local`.
    fn real(&self, local: Duration) -> Us {
        ((local.as_micros() as f64 - self.offset) / self.rate)
            .max(0.0)
            .ceil() as Us
    }
}

// ---------------------------------------------------------------------------------------------
// The world.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FenceKind {
    /// Elements end at an absolute time (egressd's fence).
    Absolute,
    /// Elements end after a timeout computed before the write (the earlier fence).
    Relative,
}

/// What a leader dates a quorum's acknowledgement from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ConfirmAt {
    /// When it sent the append the voters answered (egressd).
    Sent,
    /// When the answers arrived: the hole that a late answer opens.
    Answered,
}

#[derive(Clone, Debug)]
struct Config {
    nodes: usize,
    gateways: usize,
    events: u64,
    fence: FenceKind,
    confirm: ConfirmAt,
    /// Scale of every fault probability (0: a quiet run).
    faults: f64,
}

const REPORT_EVERY: Duration = Duration::from_millis(50);
/// openraft 0.9 sends a heartbeat at each tick, every 1.5 heartbeat intervals (50 ms).
const HEARTBEAT_EVERY: Us = 75 * MS;
/// The daemon asks a quorum directly when the heartbeats' answers are older than one
/// heartbeat period (`ClusterTiming::heartbeat_every_ms`).
const STALE_AFTER: Duration = Duration::from_micros(HEARTBEAT_EVERY);
const ELECTION_TIMEOUT: Us = 250 * MS;
const TIMING: Timing = Timing {
    lease: Duration::from_millis(150),
    failover_timeout: Duration::from_millis(250),
    drift: 0.001,
    margin: Duration::from_millis(10),
};
/// After a fault phase heals, every gateway is held again within this long.
const LIVENESS_BOUND: Us = 2500 * MS;
/// How recently the elected node must have answered when liveness is checked.
const LIVENESS_SLACK: Us = 1000 * MS;

#[derive(Debug)]
enum Ev {
    /// A node's lease task wakes (report due, a lease ending, readiness).
    Wake {
        node: usize,
        inc: u64,
    },
    ReportArrives {
        to: usize,
        report: Report,
    },
    GrantArrives {
        to: usize,
        inc: u64,
        grant: Grant,
    },
    ReportTimeout {
        node: usize,
        inc: u64,
        seq: u64,
    },
    DataplaneReady {
        node: usize,
        inc: u64,
        gateway: String,
        addrs: Vec<IpAddr>,
    },
    FenceWrite {
        node: usize,
        inc: u64,
        target: BTreeMap<IpAddr, Duration>,
        computed_real: Us,
    },
    /// A leader sends Raft's heartbeat (an empty append) to every other node; `again`: the
    /// periodic one (a direct round is not).
    Heartbeat {
        node: usize,
        inc: u64,
        term: u64,
        again: bool,
    },
    AppendArrives {
        to: usize,
        from: usize,
        from_inc: u64,
        term: u64,
        sent_local: Duration,
    },
    /// A follower's answer: it accepted `term`'s leader when it answered.
    AppendAcked {
        to: usize,
        inc: u64,
        from: usize,
        term: u64,
        sent_local: Duration,
    },
    LeaderTick {
        node: usize,
        term: u64,
    },
    Commit {
        entry: u64,
    },
    Fault,
    Heal,
    CheckLiveness {
        heal_id: u64,
    },
    /// A node hears of the new term (and a deposed leader stops leading).
    Learn {
        node: usize,
        term: u64,
        leader: usize,
    },
}

struct Node {
    name: String,
    clock: Clock,
    alive: bool,
    paused_until: Option<Us>,
    /// Bumped at every (re)start: events of an earlier incarnation are dropped.
    inc: u64,
    epoch: u64,
    lease: NodeLease,
    leader_view: Option<usize>,
    ready: BTreeSet<IpAddr>,
    leased_pub: BTreeMap<String, Vec<IpAddr>>,
    written: Option<BTreeMap<IpAddr, Duration>>,
    write_pending: bool,
    inflight: Option<u64>,
    next_report: Duration,
    not_ready_until: Us,
    /// The committed state as this node knows it (a leader's stays frozen while it is cut off).
    applied: Arc<ClusterState>,
    applied_index: u64,
    ctl: Option<(u64, Controller)>,
    /// The highest term this node voted for or followed (durable, as Raft's vote is).
    vote_term: u64,
    /// Which voters accepted this node's leadership, when (in memory: gone at a restart).
    acks: QuorumClock<usize>,
    /// A direct quorum round is being sent.
    direct_pending: bool,
    /// Kernel fence: address → (written at, ends at), real time. Survives kills, not restarts.
    kernel: BTreeMap<IpAddr, (Us, Us)>,
    /// When a live element was last written for each address (real time).
    renewed: BTreeMap<IpAddr, Us>,
    /// Leases the node's process holds: gateway → (from, until), real time.
    leases_real: BTreeMap<String, (Us, Us)>,
}

impl Node {
    fn paused(&self, now: Us) -> bool {
        self.paused_until.is_some_and(|u| u > now)
    }
}

struct Entry {
    term: u64,
    proposer: usize,
    cmd: Command,
    moving: Vec<String>,
}

struct Stats {
    events: u64,
    faults: BTreeMap<&'static str, u64>,
    elections: u64,
    grants: u64,
    heals: u64,
    liveness_checked: u64,
    simulated_ms: u64,
}

struct Sim {
    cfg: Config,
    rng: Rng,
    now: Us,
    seq: u64,
    queue: BinaryHeap<Reverse<(Us, u64)>>,
    events: BTreeMap<u64, Ev>,
    nodes: Vec<Node>,
    term: u64,
    leader: Option<usize>,
    /// When the Raft leader was last able to lead (alive, running, reaching a majority).
    leader_ok_at: Us,
    committed: Arc<ClusterState>,
    index: u64,
    entries: BTreeMap<u64, Entry>,
    next_entry: u64,
    /// Nodes cut off from every other node.
    partitioned: BTreeSet<usize>,
    /// Nodes whose every message, in and out, takes 30–300 ms more (a congested link): too slow
    /// for Raft's heartbeats, so a slow leader is replaced, and hears of it late.
    slow: BTreeSet<usize>,
    vip_pool: Vec<IpAddr>,
    heal_id: u64,
    stats: Stats,
    failure: Option<String>,
    trace: bool,
    /// When the last fault that stops a node or cuts it off happened, and when the last heal did.
    last_disruption: Us,
    healed_at: Us,
}

fn gw_name(i: usize) -> String {
    format!("g{i}")
}

impl Sim {
    fn new(seed: u64, cfg: Config) -> Sim {
        let mut rng = Rng(seed);
        let nodes: Vec<Node> = (0..cfg.nodes)
            .map(|i| {
                let ppm = rng.range(0, 1000) as f64 - 500.0;
                Node {
                    name: format!("n{}", i + 1),
                    clock: Clock {
                        offset: rng.range(0, 10_000_000) as f64,
                        rate: 1.0 + ppm * 1e-6,
                    },
                    alive: true,
                    paused_until: None,
                    inc: 1,
                    epoch: 1,
                    lease: NodeLease::new(1),
                    leader_view: None,
                    ready: BTreeSet::new(),
                    leased_pub: BTreeMap::new(),
                    written: Some(BTreeMap::new()),
                    write_pending: false,
                    inflight: None,
                    next_report: Duration::ZERO,
                    not_ready_until: 0,
                    applied: Arc::new(ClusterState::default()),
                    applied_index: 0,
                    ctl: None,
                    vote_term: 0,
                    acks: QuorumClock::default(),
                    direct_pending: false,
                    kernel: BTreeMap::new(),
                    renewed: BTreeMap::new(),
                    leases_real: BTreeMap::new(),
                }
            })
            .collect();
        let vip_pool: Vec<IpAddr> = (0..cfg.gateways + 2)
            .map(|i| format!("198.18.0.{}", 50 + i).parse().unwrap())
            .collect();
        let mut state = ClusterState::default();
        let gateways: Vec<Gateway> = (0..cfg.gateways)
            .map(|i| Gateway {
                name: gw_name(i),
                node_selector: Labels::new(),
                selection: if i % 2 == 0 {
                    Selection::Alphabetical
                } else {
                    Selection::Spread
                },
                preempt: i != 2,
                source_ip: SourceIp::VirtualIp {
                    ip: vip_pool[i],
                    interfaces: vec!["eth1".into()],
                },
                next_hop: (i == 0).then(|| NextHop {
                    ip: "10.77.0.1".parse().unwrap(),
                    interface: "eth0".into(),
                }),
                conntrack_sync: false,
            })
            .collect();
        let r = state.apply(&Command::Apply {
            gateways,
            policies: vec![],
        });
        assert!(r.refused.is_none(), "{r:?}");
        let mut sim = Sim {
            cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            term: 0,
            leader: None,
            leader_ok_at: 0,
            committed: Arc::new(state),
            index: 1,
            entries: BTreeMap::new(),
            next_entry: 1,
            partitioned: BTreeSet::new(),
            slow: BTreeSet::new(),
            vip_pool,
            heal_id: 0,
            trace: std::env::var("EGRESSD_SIM_TRACE").is_ok(),
            last_disruption: 0,
            healed_at: 0,
            stats: Stats {
                events: 0,
                faults: BTreeMap::new(),
                elections: 0,
                grants: 0,
                heals: 0,
                liveness_checked: 0,
                simulated_ms: 0,
            },
            failure: None,
        };
        for i in 0..sim.nodes.len() {
            sim.nodes[i].applied = sim.committed.clone();
            sim.nodes[i].applied_index = 1;
            let at = sim.rng.range(0, 50 * MS);
            sim.at(at, Ev::Wake { node: i, inc: 1 });
        }
        sim.elect(None);
        sim.at(500 * MS, Ev::Fault);
        sim
    }

    fn at(&mut self, t: Us, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t.max(self.now), self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn after(&mut self, d: Us, ev: Ev) {
        self.at(self.now + d, ev);
    }

    fn fault(&mut self, kind: &'static str) {
        *self.stats.faults.entry(kind).or_default() += 1;
        if !matches!(
            kind,
            "message delayed"
                | "message lost"
                | "message duplicated"
                | "slow data plane"
                | "restart"
        ) {
            self.last_disruption = self.now;
        }
        self.log(|| format!("fault: {kind}"));
    }

    fn log(&self, f: impl FnOnce() -> String) {
        if self.trace {
            println!("{:>8.3} {}", self.now as f64 / 1000.0, f());
        }
    }

    fn fail(&mut self, msg: String) {
        if self.failure.is_none() {
            self.failure = Some(format!("at {} ms: {msg}", self.now / MS));
        }
    }

    fn members(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Whether a message between `a` and `b` gets through now (not counting loss).
    fn connected(&self, a: usize, b: usize) -> bool {
        a == b || (!self.partitioned.contains(&a) && !self.partitioned.contains(&b))
    }

    /// A message's delay: usually under a few ms, sometimes long (a retransmission).
    fn delay(&mut self) -> Us {
        let f = self.cfg.faults;
        if self.rng.chance(0.02 * f) {
            self.fault("message delayed");
            self.rng.range(20 * MS, 300 * MS)
        } else {
            self.rng.range(100, 3 * MS)
        }
    }

    /// Sends a message: maybe lost, maybe duplicated, delayed.
    fn send(&mut self, from: usize, to: usize, ev: impl Fn() -> Ev) {
        if !self.connected(from, to) {
            return;
        }
        let f = self.cfg.faults;
        if from != to && self.rng.chance(0.01 * f) {
            self.fault("message lost");
            return;
        }
        let d = if from == to {
            10
        } else {
            self.delay() + self.congestion(from, to)
        };
        self.after(d, ev());
        if from != to && self.rng.chance(0.005 * f) {
            self.fault("message duplicated");
            let d = self.delay() + self.congestion(from, to);
            self.after(d, ev());
        }
    }

    /// The extra delay of a message between `a` and `b` when either has a slow link.
    fn congestion(&mut self, a: usize, b: usize) -> Us {
        if a != b && (self.slow.contains(&a) || self.slow.contains(&b)) {
            self.rng.range(30 * MS, 300 * MS)
        } else {
            0
        }
    }

    fn local(&self, i: usize) -> Duration {
        self.nodes[i].clock.local(self.now)
    }

    // -----------------------------------------------------------------------------------------
    // Raft model

    /// Elects a new leader among running nodes that reach a majority (excluding `not`).
    fn elect(&mut self, not: Option<usize>) {
        let n = self.nodes.len();
        let majority = n / 2 + 1;
        let reach = |s: &Sim, i: usize| {
            (0..n)
                .filter(|&j| s.connected(i, j) && s.nodes[j].alive)
                .count()
        };
        let candidates: Vec<usize> = (0..n)
            .filter(|&i| {
                Some(i) != not
                    && !self.slow.contains(&i)
                    && self.nodes[i].alive
                    && !self.nodes[i].paused(self.now)
                    && reach(self, i) >= majority
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let c = candidates[self.rng.pick(candidates.len())];
        self.log(|| format!("election: {} leads term {}", c + 1, self.term + 1));
        self.term += 1;
        // Exactly a majority votes (the candidate and others it reaches, at random): the rest
        // go on answering the old leader until they hear of the new term.
        let mut others: Vec<usize> = (0..n)
            .filter(|&j| j != c && self.connected(c, j) && self.nodes[j].alive)
            .collect();
        for k in (1..others.len()).rev() {
            let r = self.rng.pick(k + 1);
            others.swap(k, r);
        }
        self.nodes[c].vote_term = self.term;
        for &j in others.iter().take(majority - 1) {
            self.nodes[j].vote_term = self.term;
            // A leader that votes for a later term has stopped leading its own.
            self.nodes[j].ctl = None;
        }
        self.leader = Some(c);
        self.leader_ok_at = self.now;
        self.stats.elections += 1;
        // Entries the old leader proposed: committed by the new leader, or lost.
        let pending: Vec<u64> = self.entries.keys().copied().collect();
        for e in pending {
            if self.rng.chance(0.5) {
                self.commit(e);
            } else {
                self.entries.remove(&e);
            }
        }
        // The new leader applies everything committed (it grants nothing before an entry of
        // its own term is applied: the daemon's `confirm`).
        let term = self.term;
        self.nodes[c].applied = self.committed.clone();
        self.nodes[c].applied_index = self.index;
        let local = self.local(c);
        self.nodes[c].ctl = Some((term, Controller::new(TIMING, local)));
        let inc = self.nodes[c].inc;
        self.after(
            10,
            Ev::Heartbeat {
                node: c,
                inc,
                term,
                again: true,
            },
        );
        self.after(10, Ev::LeaderTick { node: c, term });
        // Everyone hears of it soon (a cut-off node when it can hear again); until then a
        // deposed leader still leads as far as it knows.
        self.nodes[c].leader_view = Some(c);
        let hear: Vec<usize> = (0..n).filter(|&i| i != c && self.connected(i, c)).collect();
        for i in hear {
            let d = self.rng.range(0, 20 * MS) + self.congestion(i, c);
            self.after(
                d,
                Ev::Learn {
                    node: i,
                    term,
                    leader: c,
                },
            );
        }
    }

    /// Applies log entry `e` to the committed state.
    fn commit(&mut self, e: u64) {
        let Some(entry) = self.entries.remove(&e) else {
            return;
        };
        let mut s = (*self.committed).clone();
        s.apply(&entry.cmd);
        self.log(|| format!("commit: {:?}", entry.cmd));
        self.index += 1;
        self.committed = Arc::new(s);
        if let Some(l) = self.leader {
            self.nodes[l].applied = self.committed.clone();
            self.nodes[l].applied_index = self.index;
            if let Some((t, c)) = self.nodes[l].ctl.as_mut()
                && *t == self.term
            {
                for g in &entry.moving {
                    c.lease.move_logged(g, self.index);
                }
            }
        }
    }

    /// The current leader proposes `cmd`; committed after a short delay if it still leads.
    fn propose(&mut self, proposer: usize, cmd: Command, moving: Vec<String>) {
        let id = self.next_entry;
        self.next_entry += 1;
        self.entries.insert(
            id,
            Entry {
                term: self.term,
                proposer,
                cmd,
                moving,
            },
        );
        let d = self.rng.range(MS, 10 * MS);
        self.after(d, Ev::Commit { entry: id });
    }

    /// Whether the Raft leader can lead now.
    fn leader_ok(&self) -> bool {
        let n = self.nodes.len();
        self.leader.is_some_and(|l| {
            let node = &self.nodes[l];
            node.alive
                && !node.paused(self.now)
                && !self.slow.contains(&l)
                && (0..n)
                    .filter(|&j| self.connected(l, j) && self.nodes[j].alive)
                    .count()
                    > n / 2
        })
    }

    // -----------------------------------------------------------------------------------------
    // Node side

    fn report(&mut self, i: usize) {
        let now_l = self.local(i);
        let node = &mut self.nodes[i];
        let head = node.lease.report(now_l);
        node.inflight = Some(head.seq);
        let ready = self.now >= node.not_ready_until;
        let report = Report {
            node: node.name.clone(),
            head,
            labels: Labels::new(),
            ready,
            interfaces: ["eth0", "eth1"]
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        InterfaceState {
                            up: true,
                            primary_ipv4: None,
                        },
                    )
                })
                .collect(),
            command_format: egressd::cluster::codec::COMMAND_FORMAT,
        };
        let seq = report.head.seq;
        let inc = node.inc;
        if let Some(to) = node.leader_view {
            self.send(i, to, || Ev::ReportArrives {
                to,
                report: report.clone(),
            });
        }
        let t = self.nodes[i].clock.real(now_l + REPORT_EVERY);
        self.at(t, Ev::ReportTimeout { node: i, inc, seq });
    }

    fn on_grant(&mut self, i: usize, grant: Grant) {
        let now_l = self.local(i);
        if self.nodes[i].inflight != Some(grant.seq) {
            return; // a reply after the timeout: the daemon dropped that future
        }
        self.nodes[i].inflight = None;
        let applied = self.nodes[i].lease.on_grant(&grant, now_l);
        if !applied.gained.is_empty() || !applied.revoked.is_empty() {
            self.log(|| {
                format!(
                    "n{} grant seq {} gained {:?} revoked {:?}",
                    i + 1,
                    grant.seq,
                    applied.gained,
                    applied.revoked
                )
            });
        }
        if grant.lease_ms > 0 {
            self.stats.grants += 1;
        }
        // The invariant on gateway leases, at the moment this node takes or extends one.
        let held: Vec<(String, Duration)> = self.nodes[i]
            .lease
            .leased(now_l)
            .map(|(g, h)| (g.clone(), h.until))
            .collect();
        for (g, until) in held {
            let end = self.nodes[i].clock.real(until);
            let start = self.nodes[i]
                .leases_real
                .get(&g)
                .filter(|(_, e)| *e > self.now)
                .map_or(self.now, |(s, _)| *s);
            self.nodes[i].leases_real.insert(g.clone(), (start, end));
            for j in 0..self.nodes.len() {
                if j == i {
                    continue;
                }
                if let Some((_, e)) = self.nodes[j].leases_real.get(&g)
                    && *e > self.now
                {
                    let other = self.nodes[j].name.clone();
                    let me = self.nodes[i].name.clone();
                    self.fail(format!(
                        "two leases on gateway {g}: {me} took it while {other}'s runs until {} ms",
                        e / MS
                    ));
                }
            }
        }
        for g in applied.revoked {
            self.nodes[i].leases_real.remove(&g);
        }
        self.sync(i);
    }

    /// The lease task's sync: fence target, data plane, publication.
    fn sync(&mut self, i: usize) {
        let now_l = self.local(i);
        let leased: BTreeMap<String, Vec<IpAddr>> = self.nodes[i]
            .lease
            .leased(now_l)
            .map(|(g, h)| (g.clone(), h.addrs.clone()))
            .collect();
        // Expired or revoked leases end the process's hold.
        self.nodes[i]
            .leases_real
            .retain(|g, _| leased.contains_key(g));
        let target = self.nodes[i]
            .lease
            .fence_target(&self.nodes[i].ready, now_l);
        if self.nodes[i].written.as_ref() != Some(&target) && !self.nodes[i].write_pending {
            self.nodes[i].write_pending = true;
            let inc = self.nodes[i].inc;
            let computed_real = self.now;
            let f = self.cfg.faults;
            let mut d = self.rng.range(10, 300);
            if self.rng.chance(0.002 * f) {
                // Paused between computing the elements and writing them.
                self.fault("pause before a fence write");
                let p = self.rng.range(10 * MS, 600 * MS);
                self.nodes[i].paused_until = Some(self.now + p);
                d = p;
            } else if self.rng.chance(0.02 * f) {
                // The write waits for nftables' commit lock behind the data plane's map loads;
                // the process goes on reporting and applying grants meanwhile.
                self.fault("slow fence write");
                d = self.rng.range(10 * MS, 400 * MS);
            }
            self.nodes[i].lease.fence_writing(&target);
            self.after(
                d,
                Ev::FenceWrite {
                    node: i,
                    inc,
                    target,
                    computed_real,
                },
            );
        }
        // The data plane follows the published leases.
        if leased != self.nodes[i].leased_pub {
            let inc = self.nodes[i].inc;
            for (g, addrs) in &leased {
                if self.nodes[i].leased_pub.get(g) != Some(addrs) {
                    let f = self.cfg.faults;
                    let d = if self.rng.chance(0.05 * f.min(1.0)) {
                        self.fault("slow data plane");
                        self.rng.range(100 * MS, 800 * MS)
                    } else {
                        self.rng.range(MS, 20 * MS)
                    };
                    self.after(
                        d,
                        Ev::DataplaneReady {
                            node: i,
                            inc,
                            gateway: g.clone(),
                            addrs: addrs.clone(),
                        },
                    );
                }
            }
            let keep: BTreeSet<IpAddr> = leased.values().flatten().copied().collect();
            self.nodes[i].ready.retain(|a| keep.contains(a));
            self.nodes[i].leased_pub = leased;
        }
        self.schedule_wake(i);
    }

    fn schedule_wake(&mut self, i: usize) {
        let now_l = self.local(i);
        let node = &self.nodes[i];
        let mut next = node.next_report;
        if let Some(d) = node.lease.next_deadline(now_l) {
            next = next.min(d);
        }
        let t = node.clock.real(next.max(now_l));
        let inc = node.inc;
        self.at(t, Ev::Wake { node: i, inc });
    }

    fn fence_write(&mut self, i: usize, target: BTreeMap<IpAddr, Duration>, computed_real: Us) {
        let clock = self.nodes[i].clock;
        let old: Vec<IpAddr> = self.nodes[i].kernel.keys().copied().collect();
        for a in old {
            if !target.contains_key(&a)
                && let Some(e) = self.nodes[i].kernel.get_mut(&a)
            {
                e.1 = e.1.min(self.now);
            }
        }
        for (a, until) in &target {
            let absolute = clock.real(*until);
            let relative = self.now + clock.real(*until).saturating_sub(computed_real);
            let end = match self.cfg.fence {
                FenceKind::Absolute => absolute.min(relative),
                FenceKind::Relative => relative,
            };
            if end <= self.now {
                if let Some(e) = self.nodes[i].kernel.get_mut(a) {
                    e.1 = e.1.min(self.now);
                }
                continue;
            }
            let start = self.nodes[i]
                .kernel
                .get(a)
                .filter(|(_, e)| *e > self.now)
                .map_or(self.now, |(s, _)| *s);
            self.nodes[i].kernel.insert(*a, (start, end));
            self.nodes[i].renewed.insert(*a, self.now);
            // The invariant on addresses, at the moment this node answers for one.
            for j in 0..self.nodes.len() {
                if j == i {
                    continue;
                }
                if let Some((_, e)) = self.nodes[j].kernel.get(a)
                    && *e > self.now
                {
                    let other = self.nodes[j].name.clone();
                    let me = self.nodes[i].name.clone();
                    self.fail(format!(
                        "two nodes answer for {a}: {me} from now, {other} until {} ms",
                        e / MS
                    ));
                }
            }
        }
        self.log(|| format!("n{} fence {:?}", i + 1, target.keys().collect::<Vec<_>>()));
        self.nodes[i].lease.fence_written(target.clone());
        self.nodes[i].written = Some(target);
        self.nodes[i].write_pending = false;
        self.sync(i);
    }

    // -----------------------------------------------------------------------------------------
    // Leader side

    fn leader_tick(&mut self, l: usize, term: u64) {
        self.confirm(l);
        let now_l = self.local(l);
        let members = self.members();
        let applied = self.nodes[l].applied.clone();
        let index = self.nodes[l].applied_index;
        let Some((t, c)) = self.nodes[l].ctl.as_mut() else {
            return;
        };
        if *t != term {
            return;
        }
        c.lease.applied(index);
        let (changes, _) = c.tick(&members, &applied, now_l);
        let next = c.next_deadline(now_l);
        if !changes.is_empty() {
            for ch in &changes {
                c.lease.start_move(&ch.gateway);
            }
            let moving = changes.iter().map(|c| c.gateway.clone()).collect();
            let cmd = Command::Assign {
                changes: changes
                    .iter()
                    .map(|ch| AssignChange {
                        gateway: ch.gateway.clone(),
                        to: ch.to.clone(),
                        reason: Reason::Elected,
                    })
                    .collect(),
                at_unix_ms: self.now / MS,
            };
            // openraft appends the entry to the leader's log even while it cannot reach a
            // quorum, and commits it once it can (or a new leader commits or drops it).
            if self.leader == Some(l) && self.term == term {
                self.propose(l, cmd, moving);
            }
        }
        let clock = self.nodes[l].clock;
        let mut at = self.now + 50 * MS;
        if let Some(d) = next {
            at = at.min(clock.real(d));
        }
        self.at(at.max(self.now + 100), Ev::LeaderTick { node: l, term });
    }

    /// The daemon's `confirm`: grants dated from the latest quorum of acknowledged appends,
    /// and a direct round (one at a time) when those are stale.
    fn confirm(&mut self, l: usize) {
        let now_l = self.local(l);
        let voters = [(0..self.nodes.len()).collect::<BTreeSet<usize>>()];
        let node = &mut self.nodes[l];
        let Some((t, c)) = node.ctl.as_mut() else {
            return;
        };
        let term = *t;
        let at = node.acks.confirmed(term, &l, now_l, &voters);
        if let Some(at) = at {
            c.confirmed(at);
        }
        if at.is_none_or(|a| now_l.saturating_sub(a) > STALE_AFTER) && !node.direct_pending {
            node.direct_pending = true;
            let inc = node.inc;
            self.after(
                100,
                Ev::Heartbeat {
                    node: l,
                    inc,
                    term,
                    again: false,
                },
            );
        }
    }

    fn on_report(&mut self, to: usize, report: Report) {
        self.confirm(to);
        let now_l = self.local(to);
        let applied = self.nodes[to].applied.clone();
        let from = self.nodes.iter().position(|n| n.name == report.node);
        // A node that does not lead answers "not the leader": nothing renewed.
        let grant = match self.nodes[to].ctl.as_mut() {
            Some((_, c)) => c.on_report(&report, now_l, &applied),
            None => Grant {
                epoch: report.head.epoch,
                seq: report.head.seq,
                ..Grant::default()
            },
        };
        if let Some(from) = from {
            let inc = self.nodes[from].inc;
            self.send(to, from, || Ev::GrantArrives {
                to: from,
                inc,
                grant: grant.clone(),
            });
        }
        if let Some((t, _)) = &self.nodes[to].ctl {
            let t = *t;
            self.after(100, Ev::LeaderTick { node: to, term: t });
        }
    }

    // -----------------------------------------------------------------------------------------
    // Faults

    fn inject(&mut self) {
        let f = self.cfg.faults;
        let n = self.nodes.len();
        let i = self.rng.pick(n);
        match self.rng.range(0, 9) {
            // Pause a process (SIGSTOP, a stall): its kernel goes on.
            0 if f > 0.0 && self.nodes[i].alive && !self.nodes[i].paused(self.now) => {
                self.fault("pause");
                let p = self.rng.range(20 * MS, 1500 * MS);
                self.nodes[i].paused_until = Some(self.now + p);
            }
            1 if f > 0.0
                && self.nodes[i].alive
                && self.nodes.iter().filter(|n| n.alive).count() > 1 =>
            {
                self.fault("kill -9");
                self.nodes[i].alive = false;
                self.nodes[i].ctl = None;
                self.nodes[i].inc += 1;
                // A killed leader's term is over: the others elect after a timeout.
                if self.leader == Some(i) {
                    self.leader = None;
                }
            }
            2 if f > 0.0 && self.partitioned.len() < (n - 1) / 2 => {
                self.fault("partition");
                self.partitioned.insert(i);
            }
            3 if f > 0.0 => {
                self.fault("forced leader change");
                let old = self.leader;
                self.elect(old);
            }
            4 if f > 0.0 => {
                self.fault("node not ready");
                self.nodes[i].not_ready_until = self.now + self.rng.range(100 * MS, 2000 * MS);
            }
            5 => {
                let name = self.nodes[i].name.clone();
                let cmd = if self.committed.cordoned.contains(&name) {
                    Command::Uncordon(name)
                } else {
                    self.fault("cordon");
                    Command::Cordon(name)
                };
                if let Some(l) = self.leader
                    && self.leader_ok()
                {
                    self.propose(l, cmd, vec![]);
                }
            }
            6 if f > 0.0 => {
                // A VIP moves: a gateway takes an address no other gateway has now (possibly
                // one another gateway had a moment ago).
                let g = self.rng.pick(self.cfg.gateways);
                let used: BTreeSet<IpAddr> = self
                    .committed
                    .gateways
                    .values()
                    .filter_map(|gw| match &gw.source_ip {
                        SourceIp::VirtualIp { ip, .. } => Some(*ip),
                        _ => None,
                    })
                    .collect();
                let free: Vec<IpAddr> = self
                    .vip_pool
                    .iter()
                    .filter(|a| !used.contains(a))
                    .copied()
                    .collect();
                if let (Some(l), false) = (self.leader, free.is_empty())
                    && self.leader_ok()
                {
                    let ip = free[self.rng.pick(free.len())];
                    let mut gw = self.committed.gateways[&gw_name(g)].clone();
                    gw.source_ip = SourceIp::VirtualIp {
                        ip,
                        interfaces: vec!["eth1".into()],
                    };
                    self.fault("VIP moved");
                    self.propose(
                        l,
                        Command::Apply {
                            gateways: vec![gw],
                            policies: vec![],
                        },
                        vec![],
                    );
                }
            }
            7 if f > 0.0 && self.slow.len() < (n - 1) / 2 => {
                self.fault("slow link");
                // Half the time the leader's: a leader that hears of its successor late is the
                // case the lease's quorum dating is for.
                let i = match self.leader {
                    Some(l) if self.rng.chance(0.5) => l,
                    _ => i,
                };
                self.log(|| format!("n{} has a slow link", i + 1));
                self.slow.insert(i);
            }
            _ => {}
        }
        let next = self.rng.range(20 * MS, 400 * MS);
        // Every few seconds: heal everything and check that every gateway comes back.
        if self.rng.chance(0.08) {
            self.after(next, Ev::Heal);
        } else {
            self.after(next, Ev::Fault);
        }
    }

    fn heal(&mut self) {
        self.stats.heals += 1;
        self.log(|| "heal".to_string());
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                self.restart(i);
            }
            self.nodes[i].paused_until = None;
            self.nodes[i].not_ready_until = 0;
        }
        self.partitioned.clear();
        self.slow.clear();
        // With everyone back, Raft elects a leader within an election timeout if it has none
        // that can lead (the uncordons below need one).
        if !self.leader_ok() {
            let old = self.leader;
            self.elect(old);
        }
        // Leaders and followers hear of the latest term again.
        if let Some(l) = self.leader {
            for i in 0..self.nodes.len() {
                self.nodes[i].leader_view = Some(l);
                self.nodes[i].vote_term = self.nodes[i].vote_term.max(self.term);
                if i != l {
                    self.nodes[i].ctl = None;
                }
            }
        }
        let uncordon: Vec<String> = self.committed.cordoned.iter().cloned().collect();
        if let Some(l) = self.leader
            && self.leader_ok()
        {
            for n in uncordon {
                self.propose(l, Command::Uncordon(n), vec![]);
            }
        }
        self.heal_id += 1;
        self.healed_at = self.now;
        let id = self.heal_id;
        self.after(LIVENESS_BOUND, Ev::CheckLiveness { heal_id: id });
    }

    fn restart(&mut self, i: usize) {
        self.fault("restart");
        let node = &mut self.nodes[i];
        node.alive = true;
        node.inc += 1;
        node.epoch += 1;
        node.lease = NodeLease::new(node.epoch);
        // The start-up fence: every element gone before anything else.
        for e in node.kernel.values_mut() {
            e.1 = e.1.min(self.now);
        }
        node.leases_real.clear();
        node.ready.clear();
        node.leased_pub.clear();
        node.written = Some(BTreeMap::new());
        node.write_pending = false;
        node.inflight = None;
        node.ctl = None;
        node.acks = QuorumClock::default();
        node.direct_pending = false;
        node.leader_view = self.leader;
        node.next_report = Duration::ZERO;
        let inc = node.inc;
        self.after(MS, Ev::Wake { node: i, inc });
    }

    /// Who leads and what each node thinks, for a failure message.
    fn describe(&self) -> String {
        let mut out = format!(
            "raft leader {:?} term {} (can lead: {}); ",
            self.leader.map(|l| self.nodes[l].name.clone()),
            self.term,
            self.leader_ok()
        );
        for n in &self.nodes {
            out.push_str(&format!(
                "{}: alive {} paused {} leads {:?} sees {:?}; ",
                n.name,
                n.alive,
                n.paused(self.now),
                n.ctl.as_ref().map(|(t, _)| *t),
                n.leader_view.map(|l| self.nodes[l].name.clone())
            ));
        }
        out.push_str(&format!("assignment {:?}", self.committed.assignment));
        out
    }

    fn check_liveness(&mut self, heal_id: u64) {
        if heal_id != self.heal_id || self.failure.is_some() {
            return;
        }
        // Only meaningful if nothing broke since the heal.
        let quiet = self.last_disruption < self.healed_at
            && self.nodes.iter().all(|n| n.alive && !n.paused(self.now))
            && self.partitioned.is_empty();
        if !quiet {
            return;
        }
        self.stats.liveness_checked += 1;
        for g in self.committed.gateways.values() {
            let Some(holder) = self.committed.assignment.get(&g.name) else {
                let state = self.describe();
                self.fail(format!(
                    "liveness: gateway {} has no active node {} ms after the heal; {state}",
                    g.name,
                    LIVENESS_BOUND / MS
                ));
                return;
            };
            let h = self.nodes.iter().position(|n| &n.name == holder).unwrap();
            for a in g.addresses() {
                // Message faults go on after a heal, and a few lost or late renewals in a row
                // let a lease lapse for a moment (and the data plane may take up to 800 ms to
                // take the gateway again): the elected node must have answered since the heal,
                // and within the last `LIVENESS_SLACK`.
                let live = self.nodes[h]
                    .renewed
                    .get(&a)
                    .is_some_and(|t| *t >= self.healed_at && *t + LIVENESS_SLACK > self.now);
                if !live {
                    let state = self.describe();
                    self.fail(format!(
                        "liveness: {} is assigned {} but does not answer for {a} {} ms after the heal; {state}",
                        holder,
                        g.name,
                        LIVENESS_BOUND / MS
                    ));
                    return;
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // The loop

    fn run(&mut self) -> Result<(), String> {
        while self.stats.events < self.cfg.events {
            let Some(Reverse((t, id))) = self.queue.pop() else {
                break;
            };
            let Some(ev) = self.events.remove(&id) else {
                continue;
            };
            self.now = t;
            self.stats.events += 1;
            self.step(ev);
            if let Some(f) = &self.failure {
                return Err(f.clone());
            }
        }
        Ok(())
    }

    /// The node an event runs on, if it runs on one (its process must be alive and running).
    fn host_of(ev: &Ev) -> Option<usize> {
        match ev {
            Ev::Wake { node, .. }
            | Ev::ReportTimeout { node, .. }
            | Ev::DataplaneReady { node, .. }
            | Ev::FenceWrite { node, .. }
            | Ev::Heartbeat { node, .. }
            | Ev::LeaderTick { node, .. }
            | Ev::Learn { node, .. } => Some(*node),
            Ev::ReportArrives { to, .. }
            | Ev::GrantArrives { to, .. }
            | Ev::AppendArrives { to, .. }
            | Ev::AppendAcked { to, .. } => Some(*to),
            _ => None,
        }
    }

    fn is_message(ev: &Ev) -> bool {
        matches!(
            ev,
            Ev::ReportArrives { .. }
                | Ev::GrantArrives { .. }
                | Ev::AppendArrives { .. }
                | Ev::AppendAcked { .. }
                | Ev::Learn { .. }
        )
    }

    fn step(&mut self, ev: Ev) {
        // A paused process runs its events when it resumes; a dead one never.
        if let Some(i) = Self::host_of(&ev) {
            if !self.nodes[i].alive {
                return;
            }
            if let Some(u) = self.nodes[i].paused_until.filter(|u| *u > self.now) {
                // Messages that waited in its sockets are read in any order once it runs;
                // its own timers and writes keep theirs.
                let jitter = if Self::is_message(&ev) {
                    self.rng.range(0, 2 * MS)
                } else {
                    0
                };
                self.at(u + jitter, ev);
                return;
            }
        }
        // The Raft leader that cannot lead for an election timeout is replaced.
        if !self.leader_ok() {
            if self.now.saturating_sub(self.leader_ok_at) > ELECTION_TIMEOUT {
                let old = self.leader;
                self.elect(old);
            }
        } else {
            self.leader_ok_at = self.now;
        }
        match ev {
            Ev::Wake { node, inc } => {
                if inc != self.nodes[node].inc {
                    return;
                }
                let now_l = self.local(node);
                if now_l >= self.nodes[node].next_report && self.nodes[node].inflight.is_none() {
                    self.nodes[node].next_report = now_l + REPORT_EVERY;
                    self.report(node);
                }
                self.sync(node);
            }
            Ev::ReportTimeout { node, inc, seq } => {
                if inc == self.nodes[node].inc && self.nodes[node].inflight == Some(seq) {
                    self.nodes[node].inflight = None;
                }
            }
            Ev::ReportArrives { to, report } => self.on_report(to, report),
            Ev::GrantArrives { to, inc, grant } => {
                if inc == self.nodes[to].inc {
                    self.on_grant(to, grant);
                }
            }
            Ev::DataplaneReady {
                node,
                inc,
                gateway,
                addrs,
            } => {
                if inc != self.nodes[node].inc {
                    return;
                }
                if self.nodes[node].leased_pub.get(&gateway) == Some(&addrs) {
                    self.nodes[node].ready.extend(addrs);
                    self.sync(node);
                }
            }
            Ev::FenceWrite {
                node,
                inc,
                target,
                computed_real,
            } => {
                if inc == self.nodes[node].inc {
                    self.fence_write(node, target, computed_real);
                }
            }
            Ev::Heartbeat {
                node,
                inc,
                term,
                again,
            } => {
                if !again && inc == self.nodes[node].inc {
                    self.nodes[node].direct_pending = false;
                }
                if inc != self.nodes[node].inc
                    || self.nodes[node]
                        .ctl
                        .as_ref()
                        .is_none_or(|(t, _)| *t != term)
                {
                    return;
                }
                let sent_local = self.local(node);
                for j in (0..self.nodes.len()).filter(|&j| j != node) {
                    self.send(node, j, || Ev::AppendArrives {
                        to: j,
                        from: node,
                        from_inc: inc,
                        term,
                        sent_local,
                    });
                }
                if again {
                    self.after(
                        HEARTBEAT_EVERY,
                        Ev::Heartbeat {
                            node,
                            inc,
                            term,
                            again,
                        },
                    );
                }
            }
            Ev::AppendArrives {
                to,
                from,
                from_inc,
                term,
                sent_local,
            } => {
                // A node that voted for a later term refuses the append (a higher vote).
                if self.nodes[to].vote_term > term {
                    return;
                }
                self.nodes[to].vote_term = term;
                self.send(to, from, || Ev::AppendAcked {
                    to: from,
                    inc: from_inc,
                    from: to,
                    term,
                    sent_local,
                });
            }
            Ev::AppendAcked {
                to,
                inc,
                from,
                term,
                sent_local,
            } => {
                if inc == self.nodes[to].inc {
                    let at = match self.cfg.confirm {
                        ConfirmAt::Sent => sent_local,
                        ConfirmAt::Answered => self.local(to),
                    };
                    self.nodes[to].acks.ack(term, from, at);
                    self.confirm(to);
                }
            }
            Ev::LeaderTick { node, term } => self.leader_tick(node, term),
            Ev::Commit { entry } => {
                let Some(e) = self.entries.get(&entry) else {
                    return;
                };
                if self.leader == Some(e.proposer) && self.term == e.term {
                    if self.leader_ok() {
                        self.commit(entry);
                    } else {
                        // The leader still leads but has no quorum now: it keeps replicating.
                        self.after(10 * MS, Ev::Commit { entry });
                    }
                }
                // Otherwise it waits for the next election (committed or lost there).
            }
            Ev::Fault => {
                if self.cfg.faults > 0.0 {
                    self.inject();
                }
            }
            Ev::Heal => {
                self.heal();
                self.after(LIVENESS_BOUND + MS, Ev::Fault);
            }
            Ev::CheckLiveness { heal_id } => self.check_liveness(heal_id),
            Ev::Learn { node, term, leader } => {
                self.nodes[node].vote_term = self.nodes[node].vote_term.max(term);
                if self.nodes[node]
                    .ctl
                    .as_ref()
                    .is_some_and(|(t, _)| *t < term)
                {
                    self.nodes[node].ctl = None;
                }
                if self.term == term {
                    self.nodes[node].leader_view = Some(leader);
                }
            }
        }
    }
}

fn run(seed: u64, cfg: Config) -> (Result<(), String>, Stats) {
    let mut sim = Sim::new(seed, cfg);
    let r = sim.run();
    sim.stats.simulated_ms = sim.now / MS;
    (r, sim.stats)
}

fn config(seed: u64, events: u64, fence: FenceKind) -> Config {
    Config {
        nodes: 3 + (seed % 3) as usize,
        gateways: 3,
        events,
        fence,
        confirm: ConfirmAt::Sent,
        faults: 1.0,
    }
}

/// Seeds that found a bug once (in the simulator's model of openraft: a leader that could not
/// append without a quorum, liveness asked of a gateway right at a heal, no leader after a
/// heal), run in every CI run.
const REGRESSIONS: &[u64] = &[1001, 1003, 1053, 1112];

fn report(kind: &str, runs: &[(u64, Stats)]) {
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut events, mut elections, mut grants, mut heals, mut ms) = (0, 0, 0, 0, 0);
    for (_, s) in runs {
        ms += s.simulated_ms;
        events += s.events;
        elections += s.elections;
        grants += s.grants;
        heals += s.liveness_checked;
        for (k, v) in &s.faults {
            *faults.entry(k).or_default() += v;
        }
    }
    println!(
        "simulation ({kind}): {} seeds, {events} events, {:.1} simulated hours, {elections} \
         elections, {grants} grants, {heals} heals checked for liveness, 0 violations",
        runs.len(),
        ms as f64 / 3_600_000.0
    );
    for (k, v) in faults {
        println!("  {k}: {v}");
    }
}

fn run_seeds(kind: &str, seeds: impl Iterator<Item = u64>, events: u64, faults: f64) {
    let mut runs = Vec::new();
    for seed in seeds {
        let cfg = Config {
            faults,
            ..config(seed, events, FenceKind::Absolute)
        };
        let (r, stats) = run(seed, cfg);
        if let Err(e) = r {
            panic!(
                "seed {seed} violated the protocol: {e}\n\
                 replay: EGRESSD_SIM_SEED={seed} EGRESSD_SIM_EVENTS={events} EGRESSD_SIM_FAULTS={faults} cargo test --test sim -- replay --ignored --nocapture"
            );
        }
        runs.push((seed, stats));
    }
    report(kind, &runs);
}

#[test]
fn short() {
    run_seeds(
        "short",
        (1..=12).chain(REGRESSIONS.iter().copied()),
        60_000,
        1.0,
    );
}

/// `EGRESSD_SIM_FAULTS` scales every fault's probability (default 1).
fn env_faults() -> f64 {
    std::env::var("EGRESSD_SIM_FAULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// `scripts/sim-long.sh`: many seeds, a million events each.
#[test]
#[ignore]
fn long() {
    let seeds: u64 = std::env::var("EGRESSD_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let events: u64 = std::env::var("EGRESSD_SIM_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let first: u64 = std::env::var("EGRESSD_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    run_seeds("long", first..first + seeds, events, env_faults());
}

/// Runs one seed again (`EGRESSD_SIM_SEED`).
#[test]
#[ignore]
fn replay() {
    let seed: u64 = std::env::var("EGRESSD_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("EGRESSD_SIM_SEED");
    let events: u64 = std::env::var("EGRESSD_SIM_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60_000);
    run_seeds("replay", std::iter::once(seed), events, env_faults());
}

/// The simulator catches what it must: with the earlier fence (a timeout computed before the
/// write, so a pause before the write extends the lease) it finds two nodes answering for one
/// address; with no faults at all it finds nothing and everything is held.
#[test]
fn the_simulator_finds_the_relative_timeout_hole() {
    let mut found = None;
    for seed in 1..=200 {
        let (r, _) = run(seed, config(seed, 60_000, FenceKind::Relative));
        if let Err(e) = r {
            found = Some((seed, e));
            break;
        }
    }
    let (seed, e) = found.expect("a relative-timeout fence must be caught by some seed");
    assert!(e.contains("two nodes answer for"), "seed {seed}: {e}");
    let quiet = Config {
        faults: 0.0,
        ..config(1, 20_000, FenceKind::Absolute)
    };
    let (r, stats) = run(1, quiet);
    r.expect("a quiet run has no violation");
    assert!(stats.grants > 100);
}

/// A leader that dated its quorum from when the answers arrived, not from when it asked, would
/// go on granting after a successor's election when the answers come late (a slow link): the
/// simulator finds two holders. At four times the usual fault rate the first such schedule is
/// seed 71 today (145 at twice the rate); the search starts at 60 to keep CI short, and goes on
/// to 300 so that a change of the schedules does not make it pass by luck.
#[test]
fn the_simulator_finds_the_late_answer_hole() {
    let mut found = None;
    for seed in 60..=300 {
        let cfg = Config {
            confirm: ConfirmAt::Answered,
            faults: 4.0,
            ..config(seed, 60_000, FenceKind::Absolute)
        };
        if let Err(e) = run(seed, cfg).0 {
            found = Some((seed, e));
            break;
        }
    }
    let (seed, e) = found.expect("dating a quorum from its answers must be caught by some seed");
    assert!(
        e.contains("two leases on") || e.contains("two nodes answer for"),
        "seed {seed}: {e}"
    );
}
