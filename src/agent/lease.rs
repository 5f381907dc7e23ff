//! The lease task: reports to the leader, applies its grants (`crate::lease::NodeLease`), keeps
//! the kernel fence equal to the leases whose data plane is in place, and announces them. It does
//! only cheap work, on its own cadence, so that no data-plane work can make a renewal late.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{AgentConfig, Facts, Leased, Ready};
use crate::clock;
use crate::cluster::controller::{Reply, Report};
use crate::cluster::store::Applied;
use crate::dataplane::fence::Fence;
use crate::dataplane::watch::{Begin, Heal, Part, Repair};
use crate::dataplane::{Announcer, HostState};
use crate::lease::{NodeLease, Time};
use crate::metrics::Metrics;
use crate::notify::Heartbeat;
use crate::status::{LeasedGateway, StatusBoard};

/// Where reports go: the leader, wherever it is (in-process when this node leads).
pub trait Reporter: Send + Sync + 'static {
    fn report(self: Arc<Self>, report: Report) -> BoxFuture<'static, anyhow::Result<Reply>>;
}

impl Reporter for crate::cluster::node::ClusterNode {
    fn report(self: Arc<Self>, report: Report) -> BoxFuture<'static, anyhow::Result<Reply>> {
        Box::pin(async move { crate::cluster::node::ClusterNode::report(&self, report).await })
    }
}

/// An announcement burst in progress.
#[derive(Debug, Clone)]
struct Burst {
    iface: String,
    ip: IpAddr,
    remaining: u32,
    due: Time,
}

/// Announcements are not sent for a lease that has less than this left.
const ANNOUNCE_MARGIN: Duration = Duration::from_millis(5);

/// The inputs and outputs of the lease task.
pub struct Channels {
    pub config: watch::Receiver<Arc<AgentConfig>>,
    pub facts: watch::Receiver<Facts>,
    pub ready: watch::Receiver<Ready>,
    pub host: watch::Receiver<Arc<HostState>>,
    pub applied: watch::Receiver<Applied>,
    /// The current leader's id, to report to a new leader at once.
    pub leader: watch::Receiver<Option<u64>>,
    pub stop: watch::Receiver<bool>,
    pub leased: watch::Sender<Leased>,
    /// Whether this node's lease as a member lasts (see `NodeLease::in_contact`).
    pub contact: watch::Sender<bool>,
}

pub struct LeaseTask<R, F, A> {
    reporter: Arc<R>,
    lease: NodeLease,
    fence: F,
    announcer: A,
    ch: Channels,
    board: Arc<StatusBoard>,
    metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
    report_every: Duration,
    bursts: Vec<Burst>,
    next_refresh: Option<Time>,
    /// What the fence was last written with.
    written: Option<BTreeMap<IpAddr, Time>>,
    reports: u64,
    renewals: u64,
    started: Time,
    first_announce: bool,
    /// Repairs after outside changes of the fence tables (see `dataplane::watch`).
    heal: Option<Arc<Heal>>,
    heal_rx: Option<watch::Receiver<u64>>,
    /// A repair is pending but backs off until then.
    heal_wait: Option<std::time::Instant>,
}

type Inflight = BoxFuture<'static, anyhow::Result<Reply>>;

impl<R: Reporter, F: Fence, A: Announcer> LeaseTask<R, F, A> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        reporter: Arc<R>,
        epoch: u64,
        fence: F,
        announcer: A,
        ch: Channels,
        board: Arc<StatusBoard>,
        metrics: Arc<Metrics>,
        heartbeat: Arc<Heartbeat>,
        report_every: Duration,
    ) -> Self {
        LeaseTask {
            reporter,
            lease: NodeLease::new(epoch),
            fence,
            announcer,
            ch,
            board,
            metrics,
            heartbeat,
            report_every,
            bursts: Vec::new(),
            next_refresh: None,
            written: None,
            reports: 0,
            renewals: 0,
            started: clock::now(),
            first_announce: false,
            heal: None,
            heal_rx: None,
            heal_wait: None,
        }
    }

    /// Repairs the fence tables when the nftables watcher reports an outside change.
    pub fn with_heal(mut self, heal: Arc<Heal>) -> Self {
        self.heal_rx = Some(heal.subscribe(Part::Fence));
        self.heal = Some(heal);
        self
    }

    /// Starts a pending repair: the fence forgets its tables, so that this round rebuilds them
    /// with no lease and then writes only the leases held now.
    fn begin_repair(&mut self) -> Option<Repair> {
        self.heal_wait = None;
        match self.heal.as_ref()?.begin(Part::Fence) {
            Begin::Idle => None,
            Begin::Wait(at) => {
                self.heal_wait = Some(at);
                None
            }
            Begin::Repair(r) => {
                self.fence.forget();
                self.written = None;
                Some(r)
            }
        }
    }

    /// The fence this task owns, once it has stopped (for the clean shutdown).
    pub fn into_fence(self) -> F {
        self.fence
    }

    fn start_report(&mut self) -> Inflight {
        let now = clock::now();
        let facts = self.ch.facts.borrow().clone();
        let report = Report {
            node: self.ch.config.borrow().node.clone(),
            head: self.lease.report(now),
            labels: facts.labels,
            ready: facts.ready,
            interfaces: facts.interfaces,
            command_format: crate::cluster::codec::COMMAND_FORMAT,
        };
        self.reports += 1;
        let timeout = self.report_every.max(Duration::from_millis(20));
        let fut = self.reporter.clone().report(report);
        Box::pin(async move {
            tokio::time::timeout(timeout, fut)
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {} ms", timeout.as_millis()))?
        })
    }

    fn on_reply(&mut self, reply: anyhow::Result<Reply>) {
        match reply {
            Ok(reply) => {
                let now = clock::now();
                if reply.grant.lease_ms > 0 {
                    self.renewals += 1;
                }
                let applied = self.lease.on_grant(&reply.grant, now);
                tracing::trace!(
                    seq = reply.grant.seq,
                    lease_ms = reply.grant.lease_ms,
                    gateways = ?reply.grant.gateways.keys().collect::<Vec<_>>(),
                    "grant"
                );
                for g in &applied.gained {
                    info!(gateway = %g, leader = %reply.leader, term = reply.term, "lease granted");
                }
                for g in &applied.revoked {
                    info!(gateway = %g, leader = %reply.leader, term = reply.term, "lease revoked");
                }
            }
            Err(e) => debug!(error = %e, "report not answered; the leases run on"),
        }
    }

    /// Brings the fence, the published leases and the announcements up to date.
    async fn sync(&mut self) {
        let repair = self.begin_repair();
        let heal = self.heal.clone();
        let change = heal.as_ref().map(|h| h.change(Part::Fence));
        let (built, fenced) = self.sync_fence().await;
        match (fenced, change) {
            (true, Some(c)) => c.done(self.fence.manifest()),
            (_, c) => drop(c),
        }
        if let (Some(h), Some(r)) = (&heal, repair) {
            if fenced {
                h.repaired(Part::Fence, r);
            } else {
                h.failed(Part::Fence, r);
            }
        }
        let now = clock::now();
        if built {
            let host = self.ch.host.borrow().clone();
            let cfg = self.ch.config.borrow().clone();
            self.announce_due(&host, &cfg).await;
        }
        self.publish(now);
    }

    /// Brings the fence up to date. Returns whether its tables are built, and whether it is in
    /// place (built and written).
    async fn sync_fence(&mut self) -> (bool, bool) {
        let now = clock::now();
        let cfg = self.ch.config.borrow().clone();
        let host = self.ch.host.borrow().clone();
        let committed = self.ch.applied.borrow().state.gateway_list();
        let mut managed = super::managed(&committed, &cfg.file_gateways, &host);
        managed.extend(self.lease.leased(now).flat_map(|(_, h)| h.addrs.clone()));
        let devices = super::fence_devices(&committed, &cfg.file_gateways, &host);
        let expected = (managed, devices);
        if self.fence.built() != Some(&expected) {
            match self.fence.rebuild(&expected.0, &expected.1).await {
                Ok(()) => {
                    self.lease.fence_written(BTreeMap::new());
                    self.written = Some(BTreeMap::new());
                    debug!(managed = expected.0.len(), devices = ?expected.1, "fence built");
                }
                Err(e) => {
                    error!(error = %e, "cannot build the fence tables; answering for nothing new");
                    return (false, false);
                }
            }
        }
        let ready: BTreeSet<IpAddr> = self.ch.ready.borrow().iter().map(|(_, a)| *a).collect();
        let target = self.lease.fence_target(&ready, now);
        if self.written.as_ref() != Some(&target) {
            let before: BTreeSet<IpAddr> = self
                .lease
                .fence()
                .iter()
                .filter(|(_, end)| **end > now)
                .map(|(a, _)| *a)
                .collect();
            match self.fence.write(&target).await {
                Ok(()) => {
                    let gained: Vec<IpAddr> = target
                        .keys()
                        .filter(|a| !before.contains(a))
                        .copied()
                        .collect();
                    self.lease.fence_written(target.clone());
                    self.written = Some(target);
                    self.schedule(&gained, &cfg);
                }
                Err(e) => {
                    warn!(error = %e, "fence write failed; rebuilding the fence");
                    self.lease.fence_failed(&target);
                    self.written = None;
                    return (true, false);
                }
            }
        }
        (true, true)
    }

    /// Starts an announcement burst for each address newly answered for.
    fn schedule(&mut self, gained: &[IpAddr], cfg: &AgentConfig) {
        if cfg.garp_count == 0 {
            return;
        }
        let ready = self.ch.ready.borrow().clone();
        let now = clock::now();
        for (iface, ip) in ready.iter().filter(|(_, a)| gained.contains(a)) {
            self.bursts.retain(|b| !(b.iface == *iface && b.ip == *ip));
            self.bursts.push(Burst {
                iface: iface.clone(),
                ip: *ip,
                remaining: cfg.garp_count,
                due: now,
            });
        }
        if self.next_refresh.is_none() {
            self.next_refresh = cfg.garp_refresh.map(|r| now + r);
        }
    }

    /// Sends the announcements that are due, each only while its lease and fence element live.
    async fn announce_due(&mut self, host: &HostState, cfg: &AgentConfig) {
        let now = clock::now();
        let mut due: Vec<(String, IpAddr)> = Vec::new();
        for b in self.bursts.iter_mut().filter(|b| b.due <= now) {
            due.push((b.iface.clone(), b.ip));
            b.remaining -= 1;
            b.due = now + cfg.garp_interval;
        }
        self.bursts.retain(|b| b.remaining > 0);
        if let (Some(at), Some(every)) = (self.next_refresh, cfg.garp_refresh)
            && at <= now
        {
            for (iface, ip) in self.ch.ready.borrow().iter() {
                if !due.contains(&(iface.clone(), *ip)) {
                    due.push((iface.clone(), *ip));
                }
            }
            self.next_refresh = Some(now + every);
        }
        for (iface, ip) in due {
            // Checked right before sending: a lease that ended (or a node paused past it) sends
            // nothing. The kernel's egress fence would drop it anyway.
            if !self.lease.may_announce(ip, clock::now(), ANNOUNCE_MARGIN) {
                debug!(%ip, "announcement skipped: no live lease");
                continue;
            }
            let Some(i) = host.get(&iface) else { continue };
            match self.announcer.announce(&iface, i, ip) {
                Ok(()) => {
                    self.metrics.announced(ip.is_ipv6());
                    if !self.first_announce {
                        self.first_announce = true;
                        info!(
                            since_start_ms = (clock::now() - self.started).as_secs_f64() * 1e3,
                            "first announcement sent"
                        );
                    }
                }
                Err(e) => {
                    self.metrics.announcement_errors.inc();
                    warn!(interface = %iface, %ip, error = %e, "announcement failed");
                }
            }
        }
    }

    fn publish(&mut self, now: Time) {
        let contact = self.lease.in_contact(now);
        self.ch
            .contact
            .send_if_modified(|c| std::mem::replace(c, contact) != contact);
        let leased: Leased = self
            .lease
            .leased(now)
            .map(|(g, h)| (g.clone(), h.addrs.clone()))
            .collect();
        self.ch.leased.send_if_modified(|l| {
            if *l == leased {
                false
            } else {
                *l = leased;
                true
            }
        });
        let fenced: Vec<IpAddr> = self
            .lease
            .fence()
            .iter()
            .filter(|(_, end)| **end > now)
            .map(|(a, _)| *a)
            .collect();
        let gateways: Vec<LeasedGateway> = self
            .lease
            .leased(now)
            .map(|(g, h)| LeasedGateway {
                gateway: g.clone(),
                addresses: h.addrs.clone(),
                remaining_ms: h.until.saturating_sub(now).as_millis() as u64,
            })
            .collect();
        let remaining = gateways.iter().map(|g| g.remaining_ms).max().unwrap_or(0);
        let (epoch, reports, renewals) = (self.lease.epoch(), self.reports, self.renewals);
        let heal = self.heal.clone();
        self.board.update(|s| {
            s.lease.epoch = epoch;
            s.lease.leased = gateways;
            // Read under the board's lock (see `agent::heal_report`).
            let repairing = heal
                .as_ref()
                .is_some_and(|h| h.pending(Part::Fence).is_some());
            s.lease.fenced = if repairing { Vec::new() } else { fenced };
            s.lease.reports = reports;
            s.lease.renewals = renewals;
            s.cluster.lease_remaining_ms = remaining;
        });
    }

    /// Whether the applied state assigns this node a gateway it holds no lease for.
    fn assigned_unleased(&self) -> bool {
        let now = clock::now();
        let me = self.ch.config.borrow().node.clone();
        let applied = self.ch.applied.borrow();
        applied
            .state
            .assignment
            .iter()
            .any(|(g, n)| *n == me && self.lease.lease_of(g, now).is_none())
    }

    /// When something ends or is due without any input.
    fn next_wake(&self, now: Time) -> Time {
        let mut at = now + Duration::from_secs(1);
        if let Some(d) = self.lease.next_deadline(now) {
            at = at.min(d);
        }
        for b in &self.bursts {
            at = at.min(b.due);
        }
        if let Some(r) = self.next_refresh {
            at = at.min(r);
        }
        at
    }

    /// Runs until `stop` turns true.
    pub async fn run(&mut self) {
        let mut inflight: Option<Inflight> = None;
        let mut next_report = tokio::time::Instant::now();
        loop {
            self.heartbeat.beat();
            let wake = clock::deadline(self.next_wake(clock::now()));
            tokio::select! {
                reply = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                    inflight = None;
                    self.on_reply(reply);
                }
                _ = tokio::time::sleep_until(next_report), if inflight.is_none() => {
                    next_report = tokio::time::Instant::now() + self.report_every;
                    inflight = Some(self.start_report());
                    continue;
                }
                r = self.ch.leader.changed() => {
                    if r.is_err() { return; }
                    // A new leader: report to it at once (it grants nothing until it hears).
                    if inflight.is_none() && self.ch.leader.borrow_and_update().is_some() {
                        next_report = tokio::time::Instant::now() + self.report_every;
                        inflight = Some(self.start_report());
                    }
                    continue;
                }
                r = self.ch.ready.changed() => if r.is_err() { return },
                r = self.ch.applied.changed() => {
                    if r.is_err() { return; }
                    // Newly assigned here: ask for the grant now rather than at the next tick.
                    if inflight.is_none() && self.assigned_unleased() {
                        next_report = tokio::time::Instant::now() + self.report_every;
                        inflight = Some(self.start_report());
                    }
                }
                r = self.ch.host.changed() => if r.is_err() { return },
                r = self.ch.config.changed() => if r.is_err() { return },
                r = super::dataplane::changed(self.heal_rx.as_mut()) => if r.is_err() { return },
                _ = super::dataplane::until(self.heal_wait) => {}
                _ = tokio::time::sleep_until(wake) => {}
                r = self.ch.stop.changed() => {
                    if r.is_err() || *self.ch.stop.borrow() { return; }
                }
            }
            self.sync().await;
        }
    }

    /// Clean shutdown: hold nothing and delete the fence tables.
    pub async fn release(&mut self) -> crate::dataplane::Result<()> {
        let dropped = self.lease.drop_all();
        if !dropped.is_empty() {
            info!(gateways = ?dropped, "giving up the remaining leases");
        }
        self.publish(clock::now());
        self.fence.remove().await
    }
}
