//! The data-plane task: from the leased gateways and the committed objects to SNAT maps and
//! addresses (`crate::reconciler`), and back to the lease task the addresses that are in place.
//! It also says whether the node is ready (forwarding, nftables) for the reports.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{AgentConfig, Facts, Leased, Ready};
use crate::cluster::store::Applied;
use crate::dataplane::conntrack::{Classifier, Sweeper};
use crate::dataplane::watch::{Begin, Heal, Part, Repair};
use crate::dataplane::{Firewall, Host, HostState};
use crate::events::{EventKind, EventLog};
use crate::model::{Assignment, Gateway, Policy};
use crate::notify::Heartbeat;
use crate::policy;
use crate::reconciler::{self, Reconciler};
use crate::status::StatusBoard;

/// The committed gateways and policies, taken again only when the applied index moves (the
/// policy map is shared with the state: no copy).
#[derive(Default)]
struct Objects {
    version: u64,
    gateways: Arc<Vec<Gateway>>,
    policies: OrdMap<String, Arc<Policy>>,
    facts: PolicyFacts,
}

/// What the data plane needs to know of the policies besides their classification, kept up to
/// date from the change alone: at 100 000 policies a pass over all of them per change was a
/// sixth of an apply's time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct PolicyFacts {
    /// How many policies have an IPv6 destination (IPv6 forwarding is then needed).
    v6: usize,
    /// The policies that name a gateway that does not exist.
    orphaned: BTreeSet<String>,
}

impl PolicyFacts {
    fn needs_v6(&self) -> bool {
        self.v6 > 0
    }

    /// The facts of `policies` with `gateways` existing, from scratch.
    fn of(policies: &OrdMap<String, Arc<Policy>>, gateways: &BTreeSet<&str>) -> PolicyFacts {
        let mut f = PolicyFacts::default();
        for p in policies.values() {
            f.add(p, gateways);
        }
        f
    }

    /// The facts after the policies changed from `old` to `new`, the gateways staying the
    /// same: O(changes), as the two maps share everything that did not change.
    fn updated(
        &self,
        old: &OrdMap<String, Arc<Policy>>,
        new: &OrdMap<String, Arc<Policy>>,
        gateways: &BTreeSet<&str>,
    ) -> PolicyFacts {
        let mut f = self.clone();
        for item in old.diff(new) {
            match item {
                DiffItem::Add(_, p) => f.add(p, gateways),
                DiffItem::Update {
                    old: (_, o),
                    new: (_, n),
                } => {
                    f.remove(o);
                    f.add(n, gateways);
                }
                DiffItem::Remove(_, p) => f.remove(p),
            }
        }
        f
    }

    fn add(&mut self, p: &Policy, gateways: &BTreeSet<&str>) {
        self.v6 += usize::from(has_v6_destination(p));
        if !gateways.contains(p.egress_gateway_name.as_str()) {
            self.orphaned.insert(p.name.clone());
        }
    }

    fn remove(&mut self, p: &Policy) {
        self.v6 -= usize::from(has_v6_destination(p));
        self.orphaned.remove(&p.name);
    }
}

fn has_v6_destination(p: &Policy) -> bool {
    p.destination_cidrs.iter().any(|c| c.addr().is_ipv6())
}

/// The inputs and outputs of the data-plane task.
pub struct Channels {
    pub config: watch::Receiver<Arc<AgentConfig>>,
    pub leased: watch::Receiver<Leased>,
    /// Whether this node's lease as a member lasts: a standby redirects only then.
    pub contact: watch::Receiver<bool>,
    pub host: watch::Receiver<Arc<HostState>>,
    pub applied: watch::Receiver<Applied>,
    /// Set on SIGTERM: report not ready, so the leader moves the gateways away.
    pub leaving: watch::Receiver<bool>,
    pub stop: watch::Receiver<bool>,
    pub facts: watch::Sender<Facts>,
    pub ready: watch::Sender<Ready>,
}

pub struct DataplaneTask<H, F> {
    rec: Reconciler<H, F>,
    ch: Channels,
    board: Arc<StatusBoard>,
    events: EventLog,
    heartbeat: Arc<Heartbeat>,
    objects: Objects,
    compiler: policy::Compiler,
    firewall_ok: bool,
    held: BTreeSet<String>,
    /// The applied index and the moment of the last return of freed memory to the system.
    trimmed: (u64, Instant),
    /// Freed memory goes back once the policies have not changed for [`TRIM_QUIET`].
    trim_after: Option<Instant>,
    /// When the per-gateway counters were last read.
    counted: Option<Instant>,
    /// Repairs after outside changes of the SNAT table (see `dataplane::watch`).
    heal: Option<Arc<Heal>>,
    heal_rx: Option<watch::Receiver<u64>>,
    /// A repair is pending but backs off until then.
    heal_wait: Option<Instant>,
    /// Deletes the conntrack entries a change made stale, on a thread of its own.
    flows: Option<Sweeper>,
    /// Flow-state replication of the `conntrack_sync` gateways (conntrackd).
    sync: super::ctsync::FlowSync,
    /// When conntrackd's statistics were last read.
    sync_read: Option<Instant>,
    /// Whether the node was in contact with the cluster at the last round.
    in_contact: bool,
}

/// Forwarding must be on for the node to pass traffic; IPv6 forwarding only when a policy needs
/// it. Returns the problems, after fixing them when the config allows it.
fn check_forwarding(manage: bool, needs_v6: bool) -> Vec<String> {
    let mut knobs = vec![("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward")];
    if needs_v6 {
        knobs.push((
            "net.ipv6.conf.all.forwarding",
            "/proc/sys/net/ipv6/conf/all/forwarding",
        ));
    }
    let mut problems = Vec::new();
    for (name, path) in knobs {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        if manage {
            match std::fs::write(path, "1") {
                Ok(()) => {
                    info!(
                        sysctl = name,
                        "enabled forwarding (dataplane.manage_forwarding)"
                    );
                    continue;
                }
                Err(e) => problems.push(format!("{name} is 0 and setting it failed: {e}")),
            }
        } else {
            problems.push(format!(
                "{name} is 0: this node cannot forward client traffic; set it to 1 \
                 (or dataplane.manage_forwarding = true)"
            ));
        }
    }
    problems
}

/// How often the per-gateway counters are read for the status and the metrics (an `nft` run
/// each).
const COUNT_EVERY: Duration = Duration::from_secs(2);

/// Parsing a config or a committed change of many objects leaves freed heap that glibc keeps:
/// give it back, so that an idle node's resident size reflects what it holds.
/// The least time between two returns of freed memory when the policies did not change.
const TRIM_EVERY: Duration = Duration::from_secs(5);
/// How long after the last policy change freed memory goes back: not at every change, where a
/// trim (tens of milliseconds with a large heap) competed with the compile of the next change,
/// which then faulted the returned pages back in.
const TRIM_QUIET: Duration = Duration::from_secs(1);

fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl<H: Host, F: Firewall> DataplaneTask<H, F> {
    pub fn new(
        rec: Reconciler<H, F>,
        firewall_ok: bool,
        ch: Channels,
        board: Arc<StatusBoard>,
        events: EventLog,
        heartbeat: Arc<Heartbeat>,
    ) -> Self {
        DataplaneTask {
            sync: super::ctsync::FlowSync::new(rec.metrics.clone()),
            sync_read: None,
            in_contact: false,
            rec,
            ch,
            board,
            events,
            heartbeat,
            objects: Objects::default(),
            compiler: policy::Compiler::new(),
            firewall_ok,
            held: BTreeSet::new(),
            trimmed: (0, Instant::now()),
            trim_after: None,
            counted: None,
            heal: None,
            heal_rx: None,
            heal_wait: None,
            flows: None,
        }
    }

    /// Running flows follow policy changes (see `dataplane::conntrack`).
    pub fn with_flows(mut self, sweeper: Sweeper) -> Self {
        self.flows = Some(sweeper);
        self
    }

    /// Repairs the SNAT table when the nftables watcher reports an outside change.
    pub fn with_heal(mut self, heal: Arc<Heal>) -> Self {
        self.heal_rx = Some(heal.subscribe(Part::Snat));
        self.heal = Some(heal);
        self
    }

    /// Starts a pending repair (the reconciler forgets what it installed, so that this round
    /// installs everything), or notes when a backed-off one is due.
    fn begin_repair(&mut self) -> Option<Repair> {
        self.heal_wait = None;
        match self.heal.as_ref()?.begin(Part::Snat) {
            Begin::Idle => None,
            Begin::Wait(at) => {
                self.heal_wait = Some(at);
                None
            }
            Begin::Repair(r) => {
                self.rec.forget();
                Some(r)
            }
        }
    }

    /// The reconciler, once the task has stopped (for the clean shutdown).
    pub fn into_reconciler(self) -> Reconciler<H, F> {
        self.rec
    }

    /// One round: readiness, plan, converge, publish.
    async fn round(&mut self) {
        let started = Instant::now();
        let cfg = self.ch.config.borrow().clone();
        let host = self.ch.host.borrow().clone();
        let applied = self.ch.applied.borrow().clone();
        let leased = self.ch.leased.borrow().clone();
        let in_contact = *self.ch.contact.borrow();
        let mut policies_changed = false;
        if self.objects.version != applied.index || self.objects.gateways.is_empty() {
            let policies = applied.state.policies.clone();
            policies_changed = !policies.ptr_eq(&self.objects.policies);
            let gateways = Arc::new(applied.state.gateway_list());
            let names: BTreeSet<&str> = gateways.iter().map(|g| g.name.as_str()).collect();
            let facts = if gateways != self.objects.gateways {
                PolicyFacts::of(&policies, &names)
            } else if policies_changed {
                self.objects
                    .facts
                    .updated(&self.objects.policies, &policies, &names)
            } else {
                self.objects.facts.clone()
            };
            drop(names);
            self.objects = Objects {
                version: applied.index,
                gateways,
                policies,
                facts,
            };
        }
        let gateways = self.objects.gateways.clone();
        let managed = super::managed(&gateways, &cfg.file_gateways, &host);

        let mut not_ready = check_forwarding(cfg.manage_forwarding, self.objects.facts.needs_v6());
        // Flow-state replication: conntrackd runs while a gateway this node may serve asks for
        // it. A node that just started it (or came back into contact) waits a moment for the
        // active node's flows before it may be given a gateway.
        let wanted = gateways
            .iter()
            .any(|g| super::ctsync::synced_here(g, &cfg.labels));
        self.sync.ensure(wanted, &cfg.sync, &host, &managed).await;
        if in_contact && !self.in_contact {
            self.sync.rejoined(&self.held).await;
        }
        self.in_contact = in_contact;
        if let Some(reason) = self.sync.settling() {
            not_ready.push(reason);
        }
        if !self.firewall_ok {
            not_ready.push("nftables table not installed yet".into());
        }
        if *self.ch.leaving.borrow() {
            not_ready.push("shutting down: handing gateways over".into());
        }
        let me = reconciler::local_node_state(
            &cfg.node,
            &cfg.labels,
            false,
            not_ready.is_empty(),
            &host,
            &managed,
        );
        let facts = Facts {
            labels: cfg.labels.clone(),
            ready: not_ready.is_empty(),
            interfaces: me.interfaces,
        };
        self.ch.facts.send_if_modified(|f| {
            if *f == facts {
                false
            } else {
                *f = facts;
                true
            }
        });

        // Hold a leased gateway only as the leader granted it: a definition whose addresses
        // differ (this node has not applied a change yet) waits.
        let assignment: Assignment = leased
            .iter()
            .filter(|(g, addrs)| {
                gateways
                    .iter()
                    .find(|d| &d.name == *g)
                    .is_some_and(|d| d.addresses() == **addrs)
            })
            .map(|(g, _)| (g.clone(), cfg.node.clone()))
            .collect();
        let mut plan = || {
            reconciler::plan(
                &cfg.node,
                &assignment,
                &reconciler::Objects {
                    version: self.objects.version,
                    gateways: &gateways,
                    policies: &self.objects.policies,
                    committed: &applied.state.assignment,
                    members: &applied.state.members,
                    in_contact,
                },
                &host,
                &managed,
                &mut self.compiler,
            )
        };
        // A compile of 100 000 policies takes a fifth of a second: not on the thread that
        // answers heartbeats and votes.
        let desired = if policies_changed {
            crate::heavy(plan)
        } else {
            plan()
        };
        let compiled = self.compiler.last();
        let planned_ms = started.elapsed().as_secs_f64() * 1e3;
        let before = self.held.clone();
        // The replicated entries are in the kernel before a takeover's SNAT and addresses (the
        // node forwards nothing of the gateway before those).
        let synced: BTreeSet<&str> = gateways
            .iter()
            .filter(|g| g.conntrack_sync)
            .map(|g| g.name.as_str())
            .collect();
        let taking: Vec<String> = desired
            .sources
            .keys()
            .filter(|g| !before.contains(*g) && synced.contains(g.as_str()))
            .cloned()
            .collect();
        if !taking.is_empty() {
            self.sync.before_takeover(&taking).await;
        }
        let mut error = None;
        self.rec.host.learn(&host);
        let repair = self.begin_repair();
        let heal = self.heal.clone();
        let change = heal.as_ref().map(|h| h.change(Part::Snat));
        match self.rec.converge(&desired, &host, &managed).await {
            Ok(changes) => {
                if let Some(c) = change {
                    c.done(self.rec.firewall.manifest());
                }
                if let (Some(h), Some(r)) = (&heal, repair) {
                    forget_untranslated(&desired, &host, &self.rec.metrics).await;
                    h.repaired(Part::Snat, r);
                }
                // The kernel decides now as `desired` says: the sweeper compares the running
                // flows with it, without holding up this round.
                if let Some(f) = &self.flows {
                    f.installed(Classifier {
                        map: desired.snat.clone(),
                        roles: desired.roles.clone(),
                        local: Arc::new(local_addresses(&host)),
                    });
                }
                self.firewall_ok = true;
                self.held = desired.sources.keys().cloned().collect();
                let released = before
                    .difference(&self.held)
                    .any(|g| synced.contains(g.as_str()));
                if !taking.is_empty() || released {
                    self.sync.after(!taking.is_empty(), released).await;
                    let status = self.sync.status().clone();
                    self.board.update(|s| s.dataplane.conntrack_sync = status);
                }
                let ready: Ready = desired.addresses.clone();
                self.ch.ready.send_if_modified(|r| {
                    if *r == ready {
                        false
                    } else {
                        *r = ready;
                        true
                    }
                });
                if !changes.is_empty() {
                    self.changed(&applied, &before, &desired, started, (planned_ms, compiled));
                }
            }
            Err(e) => {
                drop(change);
                if let (Some(h), Some(r)) = (&heal, repair) {
                    h.failed(Part::Snat, r);
                }
                error!(error = %e, "data plane change failed; retrying");
                error = Some(e.to_string());
                // Only what was in place before and is still wanted stays answerable.
                let keep: Ready = self
                    .ch
                    .ready
                    .borrow()
                    .intersection(&desired.addresses)
                    .cloned()
                    .collect();
                self.ch.ready.send_replace(keep);
            }
        }
        // Once the policies are quiet after a change, and otherwise at most every few seconds
        // (trimming a large heap takes tens of milliseconds; during a seed the index moves
        // hundreds of times), off the async threads. A round comes at least every second.
        if policies_changed {
            self.trim_after = Some(Instant::now() + TRIM_QUIET);
        }
        let quiet = self.trim_after.is_some_and(|t| Instant::now() >= t);
        if quiet
            || (self.trim_after.is_none()
                && applied.index != self.trimmed.0
                && self.trimmed.1.elapsed() > TRIM_EVERY)
        {
            self.trim_after = None;
            self.trimmed = (applied.index, Instant::now());
            tokio::task::spawn_blocking(release_free_memory);
        }
        self.publish(&applied, &desired, not_ready, error, started);
    }

    fn changed(
        &mut self,
        applied: &Applied,
        before: &BTreeSet<String>,
        desired: &reconciler::Desired,
        started: Instant,
        (planned_ms, compiled): (f64, policy::CompileStats),
    ) {
        let took = started.elapsed().as_secs_f64() * 1e3;
        for g in self.held.difference(before) {
            let epoch = applied.state.epochs.get(g).copied().unwrap_or(0);
            self.events.local(
                EventKind::Takeover,
                Some(g),
                format!(
                    "took over gateway (epoch {epoch}): SNAT installed and addresses held in \
                     {took:.1} ms; answering once fenced"
                ),
            );
        }
        for g in before.difference(&self.held) {
            self.events.local(
                EventKind::Release,
                Some(g),
                format!("released gateway in {took:.1} ms"),
            );
        }
        if self.held == *before {
            info!(
                applied_index = applied.index,
                snat_elements = desired.snat.len(),
                took_ms = took,
                plan_ms = planned_ms,
                full_compile = compiled.full,
                policies_changed = compiled.changed,
                policies_recompiled = compiled.recompiled,
                "SNAT map updated"
            );
        }
        self.board.update(|s| {
            s.dataplane.applies += 1;
            s.dataplane.last_apply_ms = Some(took);
            s.dataplane.last_apply_unix_ms = Some(crate::events::unix_ms());
        });
    }

    fn publish(
        &mut self,
        applied: &Applied,
        desired: &reconciler::Desired,
        not_ready: Vec<String>,
        error: Option<String>,
        _started: Instant,
    ) {
        let state = &applied.state;
        let gateways = state
            .gateways
            .values()
            .map(|g| {
                let stats = state.stats.get(&g.name).cloned().unwrap_or_default();
                crate::status::GatewayStatus {
                    name: g.name.clone(),
                    mode: g.source_ip.mode_name().to_string(),
                    source_ip: desired.sources.get(&g.name).copied(),
                    active: state.assignment.get(&g.name).cloned(),
                    epoch: state.epochs.get(&g.name).copied().unwrap_or(0),
                    active_since_unix_ms: stats.active_since_unix_ms,
                    eligible: Vec::new(),
                    ineligible: Vec::new(),
                    failovers: stats.failovers,
                    last_failover_detect_ms: stats.last_failover_detect_ms,
                    handovers: stats.handovers,
                }
            })
            .collect();
        let held: Vec<String> = self.held.iter().cloned().collect();
        let held_addresses: Vec<(String, IpAddr)> = self.rec.held().iter().cloned().collect();
        let snat_elements = self.rec.installed().map_or(0, |m| m.len());
        let orphaned: Vec<String> = self.objects.facts.orphaned.iter().cloned().collect();
        let mut reasons = not_ready;
        if let Some(e) = &error {
            reasons.push(format!("data plane: {e}"));
        }
        let heal = self.heal.clone();
        self.board.update(|s| {
            s.gateways = gateways;
            // Read under the board's lock (see `agent::heal_report`): while the SNAT table is
            // being repaired, no gateway is claimed held.
            let repairing = heal
                .as_ref()
                .is_some_and(|h| h.pending(Part::Snat).is_some());
            s.dataplane.held_gateways = if repairing { Vec::new() } else { held };
            s.dataplane.held_addresses = held_addresses;
            s.dataplane.snat_elements = snat_elements;
            s.dataplane.last_error = error;
            s.config.orphaned_policies = orphaned;
            s.set_not_ready("dataplane", reasons);
        });
    }

    /// Reads conntrackd's statistics into the status and metrics, at most every
    /// `COUNT_EVERY`.
    async fn read_sync(&mut self) {
        if self.sync_read.is_some_and(|t| t.elapsed() < COUNT_EVERY) {
            return;
        }
        self.sync_read = Some(Instant::now());
        self.sync.refresh().await;
        let status = self.sync.status().clone();
        self.board.update(|s| s.dataplane.conntrack_sync = status);
    }

    /// Reads the per-gateway counters into the status, at most every `COUNT_EVERY`.
    async fn count(&mut self) {
        if !self.firewall_ok || self.counted.is_some_and(|t| t.elapsed() < COUNT_EVERY) {
            return;
        }
        self.counted = Some(Instant::now());
        let counters = match self.rec.firewall.gateway_counters().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "could not read the per-gateway counters");
                return;
            }
        };
        let names: std::collections::BTreeMap<policy::GwId, &str> = self
            .objects
            .gateways
            .iter()
            .map(|g| (policy::GwId::of(&g.name), g.name.as_str()))
            .collect();
        let traffic = counters
            .iter()
            .filter_map(|(id, actions)| {
                let per_action = actions
                    .iter()
                    .map(|(a, (packets, bytes))| {
                        let t = crate::status::Traffic {
                            packets: *packets,
                            bytes: *bytes,
                        };
                        (a.name().to_owned(), t)
                    })
                    .collect();
                Some((names.get(id)?.to_string(), per_action))
            })
            .collect();
        self.board.update(|s| s.dataplane.traffic = traffic);
    }

    /// Runs until `stop` turns true.
    pub async fn run(&mut self) {
        loop {
            self.round().await;
            self.count().await;
            self.read_sync().await;
            self.heartbeat.beat();
            // Idle is healthy: beat at least once a second while waiting.
            tokio::select! {
                r = self.ch.leased.changed() => if r.is_err() { return },
                r = self.ch.contact.changed() => if r.is_err() { return },
                r = self.ch.applied.changed() => if r.is_err() { return },
                r = self.ch.host.changed() => if r.is_err() { return },
                r = self.ch.config.changed() => if r.is_err() { return },
                r = self.ch.leaving.changed() => if r.is_err() { return },
                r = self.ch.stop.changed() => {
                    if r.is_err() || *self.ch.stop.borrow() { return; }
                }
                r = changed(self.heal_rx.as_mut()) => if r.is_err() { return },
                _ = until(self.sync.settled_at()) => {}
                _ = until(self.heal_wait) => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Gateways whose data plane is in place.
    pub fn held(&self) -> &BTreeSet<String> {
        &self.held
    }
}

/// After a repair of the SNAT table: the connections that began while it was missing (their
/// conntrack entries are not translated) start over, translated (see
/// `watch::drop_untranslated`).
async fn forget_untranslated(
    desired: &reconciler::Desired,
    host: &HostState,
    metrics: &crate::metrics::Metrics,
) {
    let classifier = Classifier {
        map: desired.snat.clone(),
        roles: desired.roles.clone(),
        local: Arc::new(local_addresses(host)),
    };
    let translate = move |src: IpAddr, dst: IpAddr| {
        matches!(
            classifier.decide(src, dst),
            crate::dataplane::conntrack::Nat::Snat(_)
        )
    };
    let started = Instant::now();
    match tokio::task::spawn_blocking(move || {
        crate::dataplane::conntrack::drop_untranslated(None, translate)
    })
    .await
    {
        Ok(Ok(deleted)) if deleted.is_empty() => {}
        Ok(Ok(deleted)) => {
            for (protocol, n) in &deleted {
                metrics.conntrack_deleted("repair", protocol, *n);
            }
            info!(
                connections = deleted.values().sum::<usize>(),
                took_ms = started.elapsed().as_secs_f64() * 1e3,
                "dropped the conntrack entries of connections that began un-NATed while the SNAT \
             table was missing: they start over, translated"
            )
        }
        Ok(Err(e)) => warn!(
            error = %e,
            "cannot drop the conntrack entries of connections that began un-NATed during the \
             repair: they stay un-NATed until they end"
        ),
        Err(e) => warn!(error = %e, "the conntrack clean-up failed"),
    }
}

/// The host's addresses: traffic from or to them is never classified.
fn local_addresses(host: &HostState) -> BTreeSet<IpAddr> {
    host.values()
        .flat_map(|i| i.addresses.iter().map(|(a, _)| *a))
        .collect()
}

/// Waits for a change of `rx`, forever when there is none.
pub(crate) async fn changed(
    rx: Option<&mut watch::Receiver<u64>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, forever when there is none.
pub(crate) async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, gateway: &str, dst: &str) -> Arc<Policy> {
        Arc::new(Policy {
            name: name.into(),
            egress_gateway_name: gateway.into(),
            source_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            destination_cidrs: vec![dst.parse().unwrap()],
            excluded_cidrs: vec![],
        })
    }

    /// The facts kept from changes alone equal the facts computed afresh, after every change of
    /// a long random sequence (adds, updates that move a policy between gateways and families,
    /// removals).
    #[test]
    fn policy_facts_follow_changes_exactly() {
        let gateways: BTreeSet<&str> = ["a", "b"].into();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut policies: OrdMap<String, Arc<Policy>> = OrdMap::new();
        let mut facts = PolicyFacts::default();
        let (mut saw_v6, mut saw_orphan) = (false, false);
        for _ in 0..2000 {
            let before = policies.clone();
            for _ in 0..=next(3) {
                let name = format!("p{}", next(40));
                if next(4) == 0 {
                    policies.remove(&name);
                } else {
                    let gw = ["a", "b", "gone"][next(3) as usize];
                    let dst = ["0.0.0.0/0", "::/0"][next(2) as usize];
                    policies.insert(name.clone(), policy(&name, gw, dst));
                }
            }
            facts = facts.updated(&before, &policies, &gateways);
            assert_eq!(facts, PolicyFacts::of(&policies, &gateways));
            saw_v6 |= facts.needs_v6();
            saw_orphan |= !facts.orphaned.is_empty();
        }
        assert!(saw_v6 && saw_orphan, "the sequence covers both facts");
    }
}
