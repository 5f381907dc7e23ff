//! The daemon: wires the cluster member, the reconciler and the admin endpoint together. Its
//! agent loop reports to the leader, takes the grant it answers with, and converges the data
//! plane to it — on every host event, committed change, report tick and signal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{Instrument, error, info, info_span, warn};

use crate::cluster::controller::Report;
use crate::cluster::node::{ClusterNode, LeaderView};
use crate::cluster::{ClusterState, Command};
use crate::config::Config;
use crate::dataplane::host::{HostEvents, NetlinkHost};
use crate::dataplane::nft::NftFirewall;
use crate::dataplane::{Firewall, Host};
use crate::events::EventKind;
use crate::model::{Assignment, Gateway, Policy};
use crate::reconciler::{self, Reconciler, Settings};

/// What `/v1/status` serves and `egressd status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    /// Why the node is not ready, when it is not.
    pub not_ready: Vec<String>,
    pub cluster: ClusterStatus,
    pub gateways: Vec<GatewayStatus>,
    pub dataplane: DataplaneStatus,
    pub config: ConfigStatus,
    /// Every member with its role, liveness, readiness, labels and cordon (the leader's view;
    /// empty when no leader answered).
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: String,
    /// The last SIGHUP reload: when, and its errors if it was rejected (the running config
    /// then stays).
    pub last_reload_unix_ms: Option<u64>,
    pub last_reload_errors: Vec<String>,
    /// How this node's file disagrees with the committed objects (see README, "Where gateways
    /// and policies come from").
    pub drift: Vec<String>,
    /// Committed policies that name a gateway that does not exist.
    pub orphaned_policies: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<String>,
    pub term: u64,
    pub members: Vec<String>,
    /// Raft voters (at most five); the other members are non-voting learners.
    pub voters: Vec<String>,
    pub applied_index: u64,
    /// The last entry of this node's Raft log (openraft 0.9 does not expose the commit index;
    /// on the leader this is the newest proposed entry, on a follower the newest replicated).
    pub last_log_index: u64,
    /// Committed objects.
    pub gateways: usize,
    pub policies: usize,
    /// How much longer this node may hold its gateways without a renewal.
    pub lease_remaining_ms: u64,
    /// The node's config file disagrees with the committed gateways and policies.
    pub config_drift: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub name: String,
    pub mode: String,
    /// The address the gateway's traffic leaves with, when this node is active for it.
    pub source_ip: Option<IpAddr>,
    /// The committed active node.
    pub active: Option<String>,
    pub epoch: u64,
    /// When the active node was assigned (leader's clock, ms since the Unix epoch).
    pub active_since_unix_ms: Option<u64>,
    /// Eligible nodes in selection order (known on the leader).
    pub eligible: Vec<String>,
    pub ineligible: Vec<(String, String)>,
    pub failovers: u64,
    /// How long the failed node had been silent when the leader moved the gateway away.
    pub last_failover_detect_ms: Option<u64>,
    pub handovers: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataplaneStatus {
    pub held_gateways: Vec<String>,
    pub held_addresses: Vec<(String, IpAddr)>,
    pub snat_elements: usize,
    pub applies: u64,
    /// How long the last change of the data plane took, and when it finished.
    pub last_apply_ms: Option<f64>,
    pub last_apply_unix_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// A member of the cluster as status shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemberStatus {
    pub name: String,
    /// "leader", "voter" or "learner".
    pub role: String,
    pub alive: bool,
    pub ready: bool,
    pub silent_ms: u64,
    pub labels: crate::model::Labels,
    pub cordoned: bool,
}

impl Status {
    /// Fills in what only the leader knows: eligibility, reasons, members' liveness. A
    /// follower's admin endpoint asks the leader for its view and calls this.
    pub fn add_view(&mut self, view: &LeaderView) {
        if let Some(d) = &view.decision {
            for g in &mut self.gateways {
                if let Some(d) = d.gateways.get(&g.name) {
                    g.eligible = d.eligible.clone();
                    g.ineligible = d
                        .ineligible
                        .iter()
                        .map(|(n, r)| (n.clone(), r.to_string()))
                        .collect();
                }
            }
        }
        let leader = self.cluster.leader.as_deref();
        let voters = &self.cluster.voters;
        self.members = view
            .members
            .iter()
            .map(|m| MemberStatus {
                name: m.name.clone(),
                role: if Some(m.name.as_str()) == leader {
                    "leader"
                } else if voters.contains(&m.name) {
                    "voter"
                } else {
                    "learner"
                }
                .into(),
                alive: m.alive,
                ready: m.ready,
                silent_ms: m.silent_ms,
                labels: m.labels.clone(),
                cordoned: m.cordoned,
            })
            .collect();
        self.members.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

fn settings(config: &Config) -> Settings {
    let d = &config.dataplane;
    Settings {
        garp_count: d.garp_count,
        garp_interval: Duration::from_millis(d.garp_interval_ms),
        garp_refresh: (d.garp_refresh_secs > 0).then(|| Duration::from_secs(d.garp_refresh_secs)),
    }
}

/// Forwarding must be on for the node to pass traffic; IPv6 forwarding only when a policy needs
/// it. Returns the problems, after fixing them when the config allows it.
fn check_forwarding(manage: bool, policies: &[Policy]) -> Vec<String> {
    let needs_v6 = policies
        .iter()
        .any(|p| p.destination_cidrs.iter().any(|c| c.addr().is_ipv6()));
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

/// The members of the config file, as the cluster holds them.
fn peer_list(config: &Config) -> Vec<(String, String)> {
    config
        .voters()
        .into_iter()
        .map(|p| (p.name, p.address.to_string()))
        .collect()
}

/// The gateways and policies of the config file, as the cluster would hold them.
fn file_objects(config: &Config) -> (Vec<Gateway>, Vec<Policy>) {
    let mut g = config.gateways.clone();
    g.sort_by(|a, b| a.name.cmp(&b.name));
    let mut p = config.policies.clone();
    p.sort_by(|a, b| a.name.cmp(&b.name));
    (g, p)
}

/// The committed gateways and policies as lists, rebuilt only when the applied index moves
/// (a node plans every report interval; copying 10 000 policies each time is waste).
#[derive(Default)]
struct CommittedObjects {
    version: u64,
    gateways: Arc<Vec<Gateway>>,
    policies: Arc<Vec<Policy>>,
    /// Where the node's config file disagrees with them.
    drift: Vec<String>,
}

impl CommittedObjects {
    fn new(version: u64, state: &ClusterState, config: &Config) -> Self {
        let (fg, fp) = file_objects(config);
        let gateways = state.gateway_list();
        let policies = state.policy_list();
        CommittedObjects {
            version,
            drift: if state.seeded {
                state.drift(&fg, &fp)
            } else {
                Vec::new()
            },
            gateways: Arc::new(gateways),
            policies: Arc::new(policies),
        }
    }
}

struct Agent<H, F> {
    config: Config,
    config_path: PathBuf,
    node: Arc<ClusterNode>,
    rec: Reconciler<H, F>,
    boot: u64,
    /// Gateways of the latest grant, and until when it holds.
    granted: BTreeSet<String>,
    lease_until: Option<Instant>,
    /// Gateways whose data plane this node holds now (what the next report says).
    held: BTreeSet<String>,
    seeded: bool,
    seeding: Option<tokio::task::JoinHandle<anyhow::Result<bool>>>,
    /// The commit of the last reload: `Some(problem)` when it did not happen.
    reloading: Option<tokio::task::JoinHandle<Option<String>>>,
    objects: CommittedObjects,
    snat_cache: reconciler::SnatCache,
    /// Applied index at the last return of freed memory to the system.
    trimmed_at: u64,
    /// Set by SIGTERM/SIGINT: report not ready so the leader moves the gateways away in a planned
    /// handover, and exit once nothing is held.
    leaving: bool,
    status: Status,
    status_tx: watch::Sender<Status>,
    firewall_ok: bool,
    started: Instant,
    startup_reported: bool,
    /// The leader the loop last saw, to wake on and count leader changes.
    last_leader: Option<u64>,
}

impl<H: Host, F: Firewall> Agent<H, F> {
    /// One round: observe, report, take the grant, converge, publish. Returns whether the set
    /// of held gateways changed (the leader should hear about it at once).
    async fn round(&mut self) -> bool {
        let started = Instant::now();
        let host = match self.rec.host.observe().await {
            Ok(h) => h,
            Err(e) => {
                error!(error = %e, "cannot read interfaces; keeping the data plane as it is");
                return false;
            }
        };
        let applied = self.node.applied();
        let state: Arc<ClusterState> = applied.state.clone();
        if self.objects.version != applied.index || self.objects.gateways.is_empty() {
            self.objects = CommittedObjects::new(applied.index, &state, &self.config);
        }
        let gateways = self.objects.gateways.clone();
        let policies = self.objects.policies.clone();
        // Managed: the committed gateways' addresses and the file's, so that a VIP is released
        // even while the node's view of the cluster is empty or behind.
        let mut managed = reconciler::managed_addresses(&gateways);
        managed.extend(reconciler::managed_addresses(&self.config.gateways));

        let mut not_ready = check_forwarding(self.config.dataplane.manage_forwarding, &policies);
        if !self.firewall_ok {
            not_ready.push("nftables table not installed yet".into());
        }
        if self.leaving {
            not_ready.push("shutting down: handing gateways over".into());
        }
        let me = reconciler::local_node_state(
            &self.config.node.name,
            &self.config.node.labels,
            false,
            not_ready.is_empty(),
            &host,
            &managed,
        );
        let report = Report {
            node: self.config.node.name.clone(),
            boot: self.boot,
            labels: self.config.node.labels.clone(),
            ready: not_ready.is_empty(),
            interfaces: me.interfaces.clone(),
            held: self.held.clone(),
        };
        let sent = Instant::now();
        match self.node.report(report).await {
            Ok(grant) => {
                self.granted = grant.gateways;
                self.lease_until = Some(sent + Duration::from_millis(grant.lease_ms));
            }
            Err(e) => {
                tracing::debug!(error = %e, "report not answered; the lease runs on");
            }
        }
        let now = Instant::now();
        let lease = self
            .lease_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        if lease.is_zero() && !self.held.is_empty() {
            warn!(
                held = ?self.held,
                "lease expired without renewal (no quorum or no leader): releasing everything"
            );
        }
        // Hold a gateway only with a live grant and while the committed state agrees.
        let assignment: Assignment = if lease.is_zero() {
            Assignment::new()
        } else {
            self.granted
                .iter()
                .filter(|g| {
                    state.assignment.get(*g).map(String::as_str)
                        == Some(self.config.node.name.as_str())
                })
                .map(|g| (g.clone(), self.config.node.name.clone()))
                .collect()
        };
        let desired = reconciler::plan(
            &self.config.node.name,
            &assignment,
            &reconciler::Objects {
                version: self.objects.version,
                gateways: &gateways,
                policies: &policies,
            },
            &host,
            &managed,
            &mut self.snat_cache,
        );
        let before = self.held.clone();
        let lease_until = self.lease_until.unwrap_or(now);
        match self
            .rec
            .converge(&desired, &host, &managed, lease_until)
            .await
        {
            Ok(changes) => {
                self.firewall_ok = true;
                self.status.dataplane.last_error = None;
                self.held = desired.sources.keys().cloned().collect();
                if !changes.is_empty() {
                    let took = started.elapsed().as_secs_f64() * 1e3;
                    self.status.dataplane.applies += 1;
                    self.status.dataplane.last_apply_ms = Some(took);
                    self.status.dataplane.last_apply_unix_ms = Some(crate::events::unix_ms());
                    for g in self.held.difference(&before) {
                        let epoch = state.epochs.get(g).copied().unwrap_or(0);
                        self.node.events.local(
                            EventKind::Takeover,
                            Some(g),
                            format!(
                                "took over gateway (epoch {epoch}): SNAT installed, addresses \
                                 held, announced in {took:.1} ms"
                            ),
                        );
                    }
                    for g in before.difference(&self.held) {
                        self.node.events.local(
                            EventKind::Release,
                            Some(g),
                            format!("released gateway in {took:.1} ms"),
                        );
                    }
                    if changes.snat_changed && self.held == before {
                        info!(
                            applied_index = applied.index,
                            snat_elements = desired.snat.len(),
                            took_ms = took,
                            "SNAT map updated"
                        );
                    }
                }
            }
            Err(e) => {
                error!(error = %e, "data plane change failed; retrying on the next round");
                self.status.dataplane.last_error = Some(e.to_string());
                // What is held is no longer known exactly: report the union, so the leader
                // waits for a confirmed release rather than assume one.
                self.held.extend(desired.sources.keys().cloned());
            }
        }
        if let Some(at) = self.rec.first_announce
            && !self.startup_reported
        {
            self.startup_reported = true;
            info!(
                since_start_ms = at.duration_since(self.started).as_secs_f64() * 1e3,
                "first announcement sent"
            );
        }
        if !self.seeded {
            self.seed().await;
        }
        self.reload_committed().await;
        if applied.index != self.trimmed_at {
            self.trimmed_at = applied.index;
            release_free_memory();
        }
        self.publish(&state, applied.index, &desired, not_ready, lease);
        self.held != before
    }

    /// Offer the config file's objects and members to a cluster that has none yet.
    /// Offer the config file's objects and members to a cluster that has none yet. The writes
    /// wait for a quorum, so they run in a task of their own; each round looks at the result.
    async fn seed(&mut self) {
        match self.seeding.take() {
            Some(task) if task.is_finished() => match task.await {
                Ok(Ok(changed)) => {
                    self.seeded = true;
                    if changed {
                        info!("seeded the cluster with this node's gateways, policies and members");
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "seeding deferred"),
                Err(e) => tracing::debug!(error = %e, "seeding task failed"),
            },
            Some(task) => self.seeding = Some(task),
            None => {
                let node = self.node.clone();
                let (gateways, policies) = file_objects(&self.config);
                let members = peer_list(&self.config);
                self.seeding = Some(tokio::spawn(async move {
                    let objects = node
                        .write(Command::SeedObjects { gateways, policies })
                        .await?;
                    let members = node.write(Command::SeedMembers(members)).await?;
                    anyhow::Ok(objects.changed || members.changed)
                }));
            }
        }
    }

    fn publish(
        &mut self,
        state: &ClusterState,
        applied_index: u64,
        desired: &reconciler::Desired,
        not_ready: Vec<String>,
        lease: Duration,
    ) {
        let metrics = self.node.raft.metrics().borrow().clone();
        self.status.gateways = state
            .gateways
            .values()
            .map(|g| {
                let stats = state.stats.get(&g.name).cloned().unwrap_or_default();
                GatewayStatus {
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
        let members = metrics.membership_config.membership();
        let leader_name = metrics
            .current_leader
            .and_then(|l| members.get_node(&l).map(|m| m.name.clone()));
        self.status.cluster = ClusterStatus {
            leader: leader_name.clone(),
            term: metrics.current_term,
            members: members.nodes().map(|(_, m)| m.name.clone()).collect(),
            voters: members
                .voter_ids()
                .filter_map(|id| members.get_node(&id).map(|m| m.name.clone()))
                .collect(),
            applied_index,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            gateways: self.objects.gateways.len(),
            policies: self.objects.policies.len(),
            lease_remaining_ms: lease.as_millis() as u64,
            config_drift: !self.objects.drift.is_empty(),
        };
        self.status.config.path = self.config_path.display().to_string();
        self.status.config.drift = self.objects.drift.clone();
        self.status.config.orphaned_policies = state
            .orphaned_policies()
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let mut not_ready = not_ready;
        if leader_name.is_none() {
            not_ready.push("no cluster leader known".into());
        }
        if let Some(e) = &self.status.dataplane.last_error {
            not_ready.push(format!("data plane: {e}"));
        }
        self.status.members.clear();
        if metrics.current_leader == Some(self.node.id)
            && let Ok(view) = self.node.leader_view.lock()
        {
            self.status.add_view(&view);
        }
        self.status.node = self.config.node.name.clone();
        self.status.ready = not_ready.is_empty();
        self.status.not_ready = not_ready;
        self.status.dataplane.held_gateways = self.held.iter().cloned().collect();
        self.status.dataplane.held_addresses = self.rec.held().iter().cloned().collect();
        self.status.dataplane.snat_elements = self.rec.installed().map_or(0, |m| m.len());
        self.status_tx.send_replace(self.status.clone());
    }

    /// A reload failed (an invalid file, or objects the cluster refused): the committed config
    /// stays; say so in the log, the status and the events.
    fn reload_rejected(&mut self, errors: Vec<String>) {
        for e in &errors {
            error!(error = %e, "configuration reload rejected; keeping the running config");
        }
        self.node.events.local(
            EventKind::ConfigRejected,
            None,
            format!(
                "reload of {} rejected ({} errors); the running config stays: {}",
                self.config_path.display(),
                errors.len(),
                errors.first().cloned().unwrap_or_default()
            ),
        );
        self.status.config.last_reload_errors = errors;
    }

    /// Looks at the commit of the last reload, once it has finished.
    async fn reload_committed(&mut self) {
        let Some(task) = self.reloading.take_if(|t| t.is_finished()) else {
            return;
        };
        match task.await {
            Ok(None) => {}
            Ok(Some(problem)) => self.reload_rejected(vec![problem]),
            Err(e) => self.reload_rejected(vec![format!("the reload task failed: {e}")]),
        }
    }

    async fn reload(&mut self) {
        self.status.config.last_reload_unix_ms = Some(crate::events::unix_ms());
        match crate::config::load(&self.config_path) {
            Ok(new) => {
                self.status.config.last_reload_errors.clear();
                info!(
                    gateways = new.gateways.len(),
                    policies = new.policies.len(),
                    "configuration reloaded; committing its gateways and policies"
                );
                // Identity, listeners and timing need a restart; labels, objects and the member
                // list do not.
                let members = (new.voters() != self.config.voters()).then(|| {
                    self.config.cluster.peers = new.cluster.peers.clone();
                    Command::SetMembers(peer_list(&new))
                });
                self.config.gateways = new.gateways;
                self.config.policies = new.policies;
                self.config.node.labels = new.node.labels;
                // The drift against the new file is computed afresh.
                self.objects = CommittedObjects::default();
                let (gateways, policies) = file_objects(&self.config);
                let objects = Command::ReplaceObjects { gateways, policies };
                let count = self.config.policies.len();
                // Committing waits for a quorum (up to the write timeout): not in the agent
                // loop, which must keep renewing leases and feeding the watchdog meanwhile.
                let node = self.node.clone();
                let task = async move {
                    if let Some(cmd) = members {
                        match node.write(cmd).await {
                            Ok(_) => info!("committed the new member list"),
                            Err(e) => error!(error = %e, "committing the new member list failed"),
                        }
                    }
                    match node.write(objects).await {
                        Ok(r) => match r.refused {
                            Some(why) => Some(format!("refused by the cluster: {why}")),
                            None => {
                                info!(
                                    changed = r.changed,
                                    policies = count,
                                    "committed the reloaded objects"
                                );
                                None
                            }
                        },
                        Err(e) => Some(format!("not committed: {e:#}")),
                    }
                };
                self.reloading = Some(tokio::spawn(task.instrument(tracing::Span::current())));
            }
            Err(errors) => {
                self.reload_rejected(errors.0.iter().map(|e| e.to_string()).collect());
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then releases everything it holds.
pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let span = info_span!("egressd", node = %config.node.name);
    run_inner(config, config_path).instrument(span).await
}

async fn run_inner(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    // First: a reload or stop request during start-up must not kill the process (the default
    // action); it is handled once the loop runs.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let mut notifier = crate::notify::Notifier::from_env();

    info!(
        gateways = config.gateways.len(),
        policies = config.policies.len(),
        config = %config_path.display(),
        timing = ?config.cluster.timing(),
        "starting"
    );

    let host = NetlinkHost::new().context("opening rtnetlink")?;
    let mut events = HostEvents::subscribe().context("subscribing to link events")?;
    let mut firewall = NftFirewall::new(&config.dataplane.nft_table);
    // Replace whatever a crashed run left (tables, leases) before anything else, and prove that
    // nft works before the node claims to be ready.
    let firewall_ok = match firewall.apply(&Default::default()).await {
        Ok(()) => true,
        Err(e) => {
            error!(error = %e, "cannot install the nftables table; not ready");
            false
        }
    };
    let managed = reconciler::managed_addresses(&config.gateways);
    if let Err(e) = firewall
        .lease(&managed, &BTreeSet::new(), Instant::now())
        .await
    {
        error!(error = %e, "cannot install the ARP fence table");
    }

    let node = ClusterNode::start(&config).await?;
    tokio::spawn(node.clone().run_controller());
    tokio::spawn(node.clone().run_membership());

    let (status_tx, status_rx) = watch::channel(Status::default());
    let prometheus = Arc::new(crate::metrics::Metrics::new());
    let admin_addr = config.admin.listen;
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {admin_addr}"))?;
    let token = match &config.admin.token_file {
        Some(path) => Some(Arc::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token {}", path.display()))?
                .trim()
                .to_string(),
        )),
        None => None,
    };
    if token.as_ref().is_some_and(|t| t.len() < 16) {
        anyhow::bail!("the admin token in admin.token_file must be at least 16 characters");
    }
    tokio::spawn(crate::admin::serve(
        listener,
        crate::admin::AdminState {
            status: status_rx,
            node: node.clone(),
            token,
            metrics: prometheus.clone(),
        },
    ));

    let report_every = Duration::from_millis(config.cluster.timing().report_interval_ms);
    let mut applied = node.subscribe();
    let mut metrics = node.raft.metrics();
    let mut agent = Agent {
        rec: Reconciler::new(host, firewall, settings(&config)).with_metrics(prometheus),
        config,
        config_path,
        node,
        boot: boot_id(),
        granted: BTreeSet::new(),
        lease_until: None,
        held: BTreeSet::new(),
        seeded: false,
        seeding: None,
        reloading: None,
        objects: CommittedObjects::default(),
        snat_cache: reconciler::SnatCache::default(),
        trimmed_at: 0,
        leaving: false,
        status: Status::default(),
        status_tx,
        firewall_ok,
        started,
        startup_reported: false,
        last_leader: None,
    };

    let mut next_report = Instant::now();
    let mut leave_by: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if now >= next_report {
            next_report = now + report_every;
        }
        // A change of what is held is reported at once: a release may be what the leader waits
        // for to hand the gateway to its successor.
        for _ in 0..3 {
            if !agent.round().await {
                break;
            }
        }
        notifier.round_done(&agent.status);
        if let Some(by) = leave_by
            && (agent.held.is_empty() || Instant::now() >= by)
        {
            return shutdown(&mut agent).await;
        }
        loop {
            let mut wake = next_report;
            if let Some(d) = agent.rec.next_deadline() {
                wake = wake.min(d);
            }
            if let Some(l) = agent.lease_until
                && l > Instant::now()
            {
                wake = wake.min(l);
            }
            tokio::select! {
                ev = events.next() => {
                    if ev.is_none() {
                        anyhow::bail!("the rtnetlink event socket closed");
                    }
                    // Coalesce the burst of events one change makes (link + addresses).
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    break;
                }
                r = applied.changed() => {
                    if r.is_err() { anyhow::bail!("the Raft state machine stopped"); }
                    break;
                }
                r = metrics.changed() => {
                    if r.is_err() { anyhow::bail!("Raft stopped"); }
                    // A new leader matters at once (report to it, seed through it); the
                    // replication churn of the metrics does not. The other metrics are copied
                    // from the status when scraped; leader changes are counted here, where
                    // each one is seen.
                    let leader = metrics.borrow_and_update().current_leader;
                    if leader != agent.last_leader {
                        agent.last_leader = leader;
                        agent.rec.metrics.raft_leader_changes.inc();
                        if leader.is_some() {
                            break;
                        }
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    agent.rec.announce_due(Instant::now()).await;
                    let now = Instant::now();
                    if now >= next_report || agent.lease_until.is_some_and(|l| l <= now) {
                        break;
                    }
                }
                _ = sighup.recv() => {
                    notifier.reloading();
                    agent.reload().await;
                    notifier.reloaded();
                    break;
                }
                _ = sigterm.recv() => {
                    info!("SIGTERM: handing gateways over before exiting");
                    notifier.stopping();
                    agent.leaving = true;
                    leave_by.get_or_insert(Instant::now() + LEAVE_TIMEOUT);
                    break;
                }
                _ = sigint.recv() => {
                    info!("SIGINT: handing gateways over before exiting");
                    notifier.stopping();
                    agent.leaving = true;
                    leave_by.get_or_insert(Instant::now() + LEAVE_TIMEOUT);
                    break;
                }
            }
        }
    }
}

/// Parsing a config or a committed change of many objects leaves freed heap that glibc keeps:
/// give it back, so that an idle node's resident size reflects what it holds.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long a stopping daemon waits for the leader to move its gateways before it releases
/// them anyway (e.g. when there is no quorum to ask).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A number that differs between daemon starts.
fn boot_id() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}

async fn shutdown<H: Host, F: Firewall>(agent: &mut Agent<H, F>) -> anyhow::Result<()> {
    let held: BTreeMap<_, _> = agent.rec.held().iter().cloned().collect();
    info!(held = ?held, "shutting down: releasing addresses and removing the nftables tables");
    let result = agent.rec.release_all().await;
    let _ = agent.node.raft.shutdown().await;
    match result {
        Ok(()) => {
            info!("released everything; bye");
            Ok(())
        }
        Err(e) => {
            warn!(error = %e, "shutdown left something behind");
            Err(e).context("releasing the data plane on shutdown")
        }
    }
}
