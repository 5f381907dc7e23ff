//! The lease task: reports to the leader, applies its grants (`crate::lease::NodeLease`), keeps
//! the kernel fence equal to the leases whose data plane is in place, and announces them. It does
//! only cheap work, on its own cadence, so that no data-plane work can make a renewal late.
//!
//! The fence writes go to the kernel off this task's loop: a write needs nftables' commit lock,
//! which the data plane's map loads hold while they load a part (~130 ms for 8 192 elements at
//! 100 000 policies), and a loop that waited for it sent no report meanwhile (the leader failed
//! the node over at start).
//! The addresses of a write under way are claimed in the reports until its outcome is known.

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
    /// `None` while a fence job has it.
    fence: Option<F>,
    /// The fence tables are in place, as far as the last job knows.
    tables: bool,
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

/// Fence work under way: the fence travels with it and comes back with the outcome.
type FenceJob<F> = BoxFuture<'static, FenceDone<F>>;

struct FenceDone<F> {
    fence: F,
    outcome: Outcome,
    /// The write's elements (empty when there was nothing to write).
    target: BTreeMap<IpAddr, Time>,
    /// The addresses whose elements were live when the job started.
    before: BTreeSet<IpAddr>,
    repair: Option<Repair>,
}

enum Outcome {
    /// The tables could not be built; nothing was written.
    BuildFailed(crate::dataplane::Error),
    /// The tables are in place (`rebuilt`: built by this job, empty); `write` is the outcome of
    /// writing the target, when it differed from what the kernel held.
    Done {
        rebuilt: bool,
        write: Option<crate::dataplane::Result<()>>,
    },
}

impl<R: Reporter, F: Fence + Send + 'static, A: Announcer> LeaseTask<R, F, A> {
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
            fence: Some(fence),
            tables: false,
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
                if let Some(f) = self.fence.as_mut() {
                    f.forget();
                }
                self.written = None;
                Some(r)
            }
        }
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
            Err(e) => debug!(
                error = format!("{e:#}"),
                "report not answered; the leases run on"
            ),
        }
    }

    /// Starts the fence job that brings the kernel fence up to date, when one is needed and none
    /// is under way.
    fn start_fence_job(&mut self) -> Option<FenceJob<F>> {
        // `None`: a job has the fence.
        self.fence.as_ref()?;
        let repair = self.begin_repair();
        let now = clock::now();
        let cfg = self.ch.config.borrow().clone();
        let host = self.ch.host.borrow().clone();
        let committed = self.ch.applied.borrow().state.gateway_list();
        let mut managed = super::managed(&committed, &cfg.file_gateways, &host);
        managed.extend(self.lease.leased(now).flat_map(|(_, h)| h.addrs.clone()));
        let devices = super::fence_devices(&committed, &cfg.file_gateways, &host);
        let expected = (managed, devices);
        let ready: BTreeSet<IpAddr> = self.ch.ready.borrow().iter().map(|(_, a)| *a).collect();
        let target = self.lease.fence_target(&ready, now);
        let rebuild = self.fence.as_ref()?.built() != Some(&expected);
        let kernel = if rebuild {
            Some(BTreeMap::new())
        } else {
            self.written.clone()
        };
        let write = kernel.as_ref() != Some(&target);
        if !rebuild && !write {
            if let (Some(h), Some(r)) = (&self.heal, repair) {
                h.repaired(Part::Fence, r);
            }
            return None;
        }
        let before = self.lease.fenced(now).collect();
        if write {
            self.lease.fence_writing(&target);
        }
        let mut fence = self.fence.take()?;
        let heal = self.heal.clone();
        Some(Box::pin(async move {
            let change = heal.as_deref().map(|h| h.change(Part::Fence));
            let outcome = 'job: {
                if rebuild && let Err(e) = fence.rebuild(&expected.0, &expected.1).await {
                    break 'job Outcome::BuildFailed(e);
                }
                let write = if write {
                    Some(fence.write(&target).await)
                } else {
                    None
                };
                if matches!(write, None | Some(Ok(())))
                    && let Some(c) = change
                {
                    c.done(fence.manifest());
                }
                Outcome::Done {
                    rebuilt: rebuild,
                    write,
                }
            };
            FenceDone {
                fence,
                outcome,
                target: if write { target } else { BTreeMap::new() },
                before,
                repair,
            }
        }))
    }

    /// A fence job ended: takes the fence back and records what the kernel holds.
    fn on_fence_done(&mut self, done: FenceDone<F>) {
        let FenceDone {
            fence,
            outcome,
            target,
            before,
            repair,
        } = done;
        let managed = fence.built().map_or(0, |b| b.0.len());
        self.fence = Some(fence);
        let fenced = match outcome {
            Outcome::BuildFailed(e) => {
                error!(error = %e, "cannot build the fence tables; answering for nothing new");
                self.lease.fence_unchanged();
                self.tables = false;
                false
            }
            Outcome::Done { rebuilt, write } => {
                self.tables = true;
                if rebuilt {
                    // The new tables start empty; the write's outcome follows at once.
                    self.lease.fence_written(BTreeMap::new());
                    self.written = Some(BTreeMap::new());
                    debug!(managed, "fence built");
                }
                match write {
                    None => true,
                    Some(Ok(())) => {
                        let gained: Vec<IpAddr> = target
                            .keys()
                            .filter(|a| !before.contains(a))
                            .copied()
                            .collect();
                        self.lease.fence_written(target.clone());
                        self.written = Some(target);
                        let cfg = self.ch.config.borrow().clone();
                        self.schedule(&gained, &cfg);
                        true
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "fence write failed; rebuilding the fence");
                        self.lease.fence_failed(&target);
                        self.written = None;
                        false
                    }
                }
            }
        };
        if let (Some(h), Some(r)) = (&self.heal, repair) {
            if fenced {
                h.repaired(Part::Fence, r);
            } else {
                h.failed(Part::Fence, r);
            }
        }
    }

    /// Sends the announcements that are due and publishes the leases.
    fn publish_and_announce(&mut self) {
        if self.tables {
            let host = self.ch.host.borrow().clone();
            let cfg = self.ch.config.borrow().clone();
            self.announce_due(&host, &cfg);
        }
        self.publish(clock::now());
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
    fn announce_due(&mut self, host: &HostState, cfg: &AgentConfig) {
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
        let fenced: Vec<IpAddr> = self.lease.fenced(now).collect();
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
        let mut job: Option<FenceJob<F>> = None;
        let mut next_report = tokio::time::Instant::now();
        loop {
            // The watchdog's heartbeat counts the fence too: a write or rebuild that never ends
            // (a hung `nft`, a wedged kernel) stops it, as when the loop itself waited for it.
            if job.is_none() {
                self.heartbeat.beat();
            }
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
                done = async { job.as_mut().expect("guarded").await }, if job.is_some() => {
                    job = None;
                    self.heartbeat.beat();
                    let claimed = self.lease.claims(clock::now()).len();
                    self.on_fence_done(done);
                    // An element gone (a revocation, a release): the leader gives the address
                    // to another node only after a report that no longer claims it; send it
                    // now rather than at the next tick (a planned handover waits for it).
                    if inflight.is_none() && self.lease.claims(clock::now()).len() < claimed {
                        next_report = tokio::time::Instant::now() + self.report_every;
                        inflight = Some(self.start_report());
                    }
                }
                r = self.ch.leader.changed() => {
                    if r.is_err() { break; }
                    // A new leader: report to it at once (it grants nothing until it hears).
                    if inflight.is_none() && self.ch.leader.borrow_and_update().is_some() {
                        next_report = tokio::time::Instant::now() + self.report_every;
                        inflight = Some(self.start_report());
                    }
                    continue;
                }
                r = self.ch.ready.changed() => if r.is_err() { break },
                r = self.ch.applied.changed() => {
                    if r.is_err() { break; }
                    // Newly assigned here: ask for the grant now rather than at the next tick.
                    if inflight.is_none() && self.assigned_unleased() {
                        next_report = tokio::time::Instant::now() + self.report_every;
                        inflight = Some(self.start_report());
                    }
                }
                r = self.ch.host.changed() => if r.is_err() { break },
                r = self.ch.config.changed() => if r.is_err() { break },
                r = super::dataplane::changed(self.heal_rx.as_mut()) => if r.is_err() { break },
                _ = super::dataplane::until(self.heal_wait) => {}
                _ = tokio::time::sleep_until(wake) => {}
                r = self.ch.stop.changed() => {
                    if r.is_err() || *self.ch.stop.borrow() { break; }
                }
            }
            if job.is_none() {
                job = self.start_fence_job();
            }
            self.publish_and_announce();
        }
        // The fence comes back for the clean shutdown.
        if let Some(job) = job {
            let done = job.await;
            self.on_fence_done(done);
        }
    }

    /// Clean shutdown: hold nothing and delete the fence tables.
    pub async fn release(&mut self) -> crate::dataplane::Result<()> {
        let dropped = self.lease.drop_all();
        if !dropped.is_empty() {
            info!(gateways = ?dropped, "giving up the remaining leases");
        }
        self.publish(clock::now());
        match self.fence.as_mut() {
            Some(f) => f.remove().await,
            // `run` returns only with the fence back.
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::dataplane::fake::{FakeAnnouncer, FakeFence};
    use crate::lease::{Grant, ReportHead, Resource};

    /// A fence whose writes wait for a permit, as a write waits for nftables' commit lock while
    /// the data plane loads a large map.
    struct GatedFence {
        inner: FakeFence,
        gate: Arc<Semaphore>,
    }

    impl Fence for GatedFence {
        async fn rebuild(
            &mut self,
            managed: &BTreeSet<IpAddr>,
            devices: &BTreeSet<String>,
        ) -> crate::dataplane::Result<()> {
            self.inner.rebuild(managed, devices).await
        }

        async fn write(&mut self, leases: &BTreeMap<IpAddr, Time>) -> crate::dataplane::Result<()> {
            if let Ok(p) = self.gate.acquire().await {
                p.forget();
            }
            self.inner.write(leases).await
        }

        fn built(&self) -> Option<&(BTreeSet<IpAddr>, BTreeSet<String>)> {
            self.inner.built()
        }

        async fn remove(&mut self) -> crate::dataplane::Result<()> {
            self.inner.remove().await
        }
    }

    /// A leader that grants `gateways` to every report and keeps the reports' lease heads.
    #[derive(Default)]
    struct FakeLeader {
        gateways: Mutex<BTreeMap<String, Vec<IpAddr>>>,
        heads: Mutex<Vec<ReportHead>>,
        /// The first report answered with a revocation.
        revoked_at: Mutex<Option<u64>>,
    }

    impl FakeLeader {
        fn heads(&self) -> Vec<ReportHead> {
            self.heads.lock().unwrap().clone()
        }
        /// The reports sent after the node applied the revocation.
        fn after_revoke(&self) -> Vec<ReportHead> {
            let at = *self.revoked_at.lock().unwrap();
            self.heads()
                .into_iter()
                .filter(|h| at.is_some_and(|a| h.acked >= a))
                .collect()
        }
    }

    impl Reporter for FakeLeader {
        fn report(self: Arc<Self>, report: Report) -> BoxFuture<'static, anyhow::Result<Reply>> {
            Box::pin(async move {
                let gateways = self.gateways.lock().unwrap().clone();
                if gateways.is_empty() {
                    self.revoked_at
                        .lock()
                        .unwrap()
                        .get_or_insert(report.head.seq);
                }
                self.heads.lock().unwrap().push(report.head.clone());
                Ok(Reply {
                    grant: Grant {
                        epoch: report.head.epoch,
                        seq: report.head.seq,
                        lease_ms: 300,
                        gateways,
                    },
                    leader: "gw2".into(),
                    term: 1,
                })
            })
        }
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < end, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn vip() -> IpAddr {
        "198.18.0.50".parse().unwrap()
    }

    /// A running lease task for node gw1, its VIP ready, reporting every `every` to a leader
    /// that grants it gateway `gw` with the VIP; its fence writes wait at `gate`.
    struct Lab {
        leader: Arc<FakeLeader>,
        new_leader: watch::Sender<Option<u64>>,
        stop: watch::Sender<bool>,
        heartbeat: Arc<Heartbeat>,
        run: tokio::task::JoinHandle<LeaseTask<FakeLeader, GatedFence, FakeAnnouncer>>,
        // The other ends stay open while the task runs.
        _keep: Box<dyn std::any::Any + Send>,
    }

    impl Lab {
        fn start(gate: Arc<Semaphore>, every: Duration) -> Lab {
            let leader = Arc::new(FakeLeader::default());
            leader
                .gateways
                .lock()
                .unwrap()
                .insert("gw".into(), vec![vip()]);
            let config = crate::config::parse_str("[node]\nname = \"gw1\"\n", "test").unwrap();
            let (config_tx, config_rx) = watch::channel(AgentConfig::from_config(&config));
            let (facts_tx, facts_rx) = watch::channel(Facts::default());
            let ready: Ready = [("eth0".to_string(), vip())].into_iter().collect();
            let (ready_tx, ready_rx) = watch::channel(ready);
            let (host_tx, host_rx) = watch::channel(Arc::new(HostState::new()));
            let (applied_tx, applied_rx) = watch::channel(Applied {
                index: 0,
                term: 0,
                state: Arc::new(Default::default()),
                membership: Default::default(),
                compact: false,
            });
            let (leader_tx, leader_rx) = watch::channel(Some(2));
            let (stop_tx, stop_rx) = watch::channel(false);
            let (leased_tx, leased_rx) = watch::channel(Leased::new());
            let (contact_tx, contact_rx) = watch::channel(false);
            let (board, status) = StatusBoard::new("gw1");
            let heartbeat = Arc::new(Heartbeat::new());
            let mut task = LeaseTask::new(
                leader.clone(),
                1,
                GatedFence {
                    inner: FakeFence::default(),
                    gate,
                },
                FakeAnnouncer::default(),
                Channels {
                    config: config_rx,
                    facts: facts_rx,
                    ready: ready_rx,
                    host: host_rx,
                    applied: applied_rx,
                    leader: leader_rx,
                    stop: stop_rx,
                    leased: leased_tx,
                    contact: contact_tx,
                },
                Arc::new(board),
                Arc::new(Metrics::new()),
                heartbeat.clone(),
                every,
            );
            let run = tokio::spawn(async move {
                task.run().await;
                task
            });
            Lab {
                leader,
                new_leader: leader_tx,
                stop: stop_tx,
                heartbeat,
                run,
                _keep: Box::new((
                    config_tx, facts_tx, ready_tx, host_tx, applied_tx, leased_rx, contact_rx,
                    status,
                )),
            }
        }

        /// Stops the task and removes its fence, as a clean shutdown does.
        async fn finish(self) {
            self.stop.send_replace(true);
            let mut task = self.run.await.unwrap();
            task.release().await.unwrap();
        }
    }

    /// A revocation whose fence write removes the element is reported at once, not at the next
    /// tick: the leader waits for that report before it gives the address to another node.
    #[tokio::test]
    async fn a_removed_fence_element_is_reported_at_once() {
        // Reports every 30 s: only the start, a new leader and the removal itself report.
        let lab = Lab::start(Arc::new(Semaphore::new(1000)), Duration::from_secs(30));
        let leader = lab.leader.clone();
        until("the first report", || !leader.heads().is_empty()).await;
        // The grant's fence write (the fake's is immediate) has landed by then.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A new leader is told at once; its answer revokes the gateway.
        *leader.gateways.lock().unwrap() = BTreeMap::new();
        lab.new_leader.send_replace(Some(3));
        until(
            "a report that claims nothing, long before the next tick",
            || leader.after_revoke().iter().any(|h| h.claims.is_empty()),
        )
        .await;
        lab.finish().await;
    }

    /// A fence write that waits (for the kernel's commit lock, behind a large map load) neither
    /// stops the reports, which renew the leases, nor lets a report leave out the address it is
    /// writing: a lease revoked meanwhile is still claimed until the write's outcome is known.
    #[tokio::test]
    async fn reports_go_on_while_a_fence_write_waits_and_claim_what_it_writes() {
        let gate = Arc::new(Semaphore::new(0));
        let lab = Lab::start(gate.clone(), Duration::from_millis(20));
        let leader = lab.leader.clone();

        // The first grant starts the write of the VIP's element, which waits at the gate.
        until("a first report", || !leader.heads().is_empty()).await;
        let n = leader.heads().len();
        until("five more reports while the fence write waits", || {
            leader.heads().len() >= n + 5
        })
        .await;
        // ... while the watchdog's heartbeat stops: the fence is not making progress.
        let age = lab.heartbeat.age();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            lab.heartbeat.age() >= age + Duration::from_millis(90),
            "the heartbeat went on while the fence write hung"
        );

        *leader.gateways.lock().unwrap() = BTreeMap::new();
        until("three reports after the revocation", || {
            leader.after_revoke().len() >= 3
        })
        .await;
        for h in leader.after_revoke() {
            assert!(
                h.claims.contains(&Resource::Addr(vip())),
                "report {} left out the address its fence write may put in the kernel at any \
                 moment: {:?}",
                h.seq,
                h.claims
            );
        }

        // The write lands, the next removes the element: from then on nothing is claimed.
        gate.add_permits(100);
        until("a report that claims nothing", || {
            leader.after_revoke().iter().any(|h| h.claims.is_empty())
        })
        .await;
        lab.finish().await;
    }
}
