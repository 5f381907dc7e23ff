//! The data-plane task: from the leased gateways and the committed objects to SNAT maps and
//! addresses (`crate::reconciler`), and back to the lease task the addresses that are in place.
//! It also says whether the node is ready (forwarding, nftables) for the reports.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imbl::OrdMap;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{AgentConfig, Facts, Leased, Ready};
use crate::cluster::store::Applied;
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
    /// Whether a policy has an IPv6 destination (IPv6 forwarding is then needed).
    needs_v6: bool,
    /// The policies that name a gateway that does not exist.
    orphaned: Arc<Vec<String>>,
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
    /// When the per-gateway counters were last read.
    counted: Option<Instant>,
    /// Repairs after outside changes of the SNAT table (see `dataplane::watch`).
    heal: Option<Arc<Heal>>,
    heal_rx: Option<watch::Receiver<u64>>,
    /// A repair is pending but backs off until then.
    heal_wait: Option<Instant>,
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
            counted: None,
            heal: None,
            heal_rx: None,
            heal_wait: None,
        }
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
            // One pass over the policies, and only when they or the gateways changed: at
            // 100 000 policies a pass per round was a tenth of an apply's time.
            let (needs_v6, orphaned) = if policies_changed || gateways != self.objects.gateways {
                let names: BTreeSet<&str> = gateways.iter().map(|g| g.name.as_str()).collect();
                let mut needs_v6 = false;
                let mut orphaned = Vec::new();
                for p in policies.values() {
                    needs_v6 |= p.destination_cidrs.iter().any(|c| c.addr().is_ipv6());
                    if !names.contains(p.egress_gateway_name.as_str()) {
                        orphaned.push(p.name.clone());
                    }
                }
                (needs_v6, Arc::new(orphaned))
            } else {
                (self.objects.needs_v6, self.objects.orphaned.clone())
            };
            self.objects = Objects {
                version: applied.index,
                gateways,
                policies,
                needs_v6,
                orphaned,
            };
        }
        let gateways = self.objects.gateways.clone();
        let managed = super::managed(&gateways, &cfg.file_gateways, &host);

        let mut not_ready = check_forwarding(cfg.manage_forwarding, self.objects.needs_v6);
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
                    forget_untranslated(&desired, &host).await;
                    h.repaired(Part::Snat, r);
                }
                self.firewall_ok = true;
                self.held = desired.sources.keys().cloned().collect();
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
        // After the policies changed, and otherwise at most every few seconds (trimming a large
        // heap takes tens of milliseconds; during a seed the index moves hundreds of times),
        // off the async threads.
        if policies_changed
            || (applied.index != self.trimmed.0 && self.trimmed.1.elapsed() > TRIM_EVERY)
        {
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
        let orphaned = (*self.objects.orphaned).clone();
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
async fn forget_untranslated(desired: &reconciler::Desired, host: &HostState) {
    let map = desired.snat.clone();
    let roles = desired.roles.clone();
    // Traffic to the host itself is never translated.
    let local: BTreeSet<IpAddr> = host
        .values()
        .flat_map(|i| i.addresses.iter().map(|(a, _)| *a))
        .collect();
    let translate = move |src: IpAddr, dst: IpAddr| {
        !local.contains(&dst)
            && map
                .lookup(src, dst)
                .and_then(|g| roles.get(&g))
                .is_some_and(|r| match dst {
                    IpAddr::V4(_) => r.v4.is_some(),
                    IpAddr::V6(_) => r.v6.is_some(),
                })
    };
    let started = Instant::now();
    match tokio::task::spawn_blocking(move || {
        crate::dataplane::watch::drop_untranslated(None, translate)
    })
    .await
    {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => info!(
            connections = n,
            took_ms = started.elapsed().as_secs_f64() * 1e3,
            "dropped the conntrack entries of connections that began un-NATed while the SNAT \
             table was missing: they start over, translated"
        ),
        Ok(Err(e)) => warn!(
            error = %e,
            "cannot drop the conntrack entries of connections that began un-NATed during the \
             repair: they stay un-NATed until they end"
        ),
        Err(e) => warn!(error = %e, "the conntrack clean-up failed"),
    }
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
