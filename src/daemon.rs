//! The daemon: wires config, election, reconciler and admin endpoint together, and runs the loop
//! that re-decides and converges on every host event, signal and periodic resync.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, info_span, warn};

use crate::config::Config;
use crate::dataplane::host::{HostEvents, NetlinkHost};
use crate::dataplane::nft::NftFirewall;
use crate::dataplane::{Firewall, Host, HostState};
use crate::election::{Decision, ElectionInput, elect};
use crate::model::{Assignment, Gateway, Policy};
use crate::reconciler::{self, Reconciler, Settings};

/// What `/v1/status` serves and `egressd status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    /// Why the node is not ready, when it is not.
    pub not_ready: Vec<String>,
    pub gateways: Vec<GatewayStatus>,
    pub dataplane: DataplaneStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub name: String,
    pub mode: String,
    /// The address the gateway's traffic leaves with, when an active node is known here.
    pub source_ip: Option<IpAddr>,
    pub active: Option<String>,
    /// Unix time (ms) of the last change of the active node.
    pub since_ms: u64,
    pub eligible: Vec<String>,
    pub ineligible: Vec<(String, String)>,
    pub failovers: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataplaneStatus {
    pub held_addresses: Vec<(String, IpAddr)>,
    pub snat_elements: usize,
    pub applies: u64,
    pub last_apply_ms: Option<f64>,
    pub last_error: Option<String>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn settings(config: &Config) -> Settings {
    let d = &config.dataplane;
    Settings {
        garp_count: d.garp_count,
        garp_interval: Duration::from_millis(d.garp_interval_ms),
        garp_refresh: (d.garp_refresh_secs > 0).then(|| Duration::from_secs(d.garp_refresh_secs)),
        address_lifetime: None,
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
        let on = std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1");
        if on {
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

struct Daemon<H, F> {
    config: Config,
    config_path: PathBuf,
    rec: Reconciler<H, F>,
    assignment: Assignment,
    status: Status,
    status_tx: watch::Sender<Status>,
    firewall_ok: bool,
    started: Instant,
    startup_reported: bool,
}

impl<H: Host, F: Firewall> Daemon<H, F> {
    fn gateways(&self) -> &[Gateway] {
        &self.config.gateways
    }

    /// One round: observe, decide, converge, publish.
    async fn round(&mut self) {
        let started = Instant::now();
        let host: HostState = match self.rec.host.observe().await {
            Ok(h) => h,
            Err(e) => {
                error!(error = %e, "cannot read interfaces; keeping the data plane as it is");
                return;
            }
        };
        let managed = reconciler::managed_addresses(self.gateways());
        let mut not_ready = check_forwarding(
            self.config.dataplane.manage_forwarding,
            &self.config.policies,
        );
        if !self.firewall_ok {
            not_ready.push("nftables table not installed yet".into());
        }
        let me = reconciler::local_node_state(
            &self.config.node.name,
            &self.config.node.labels,
            false,
            not_ready.is_empty(),
            &host,
            &managed,
        );
        let decision = elect(&ElectionInput {
            nodes: std::slice::from_ref(&me),
            gateways: self.gateways(),
            current: &self.assignment,
        });
        self.log_changes(&decision);
        let desired = reconciler::plan(
            &self.config.node.name,
            &decision.assignment,
            self.gateways(),
            &self.config.policies,
            &host,
            &managed,
        );
        let result = self.rec.converge(&desired, &host, &managed).await;
        let took = started.elapsed();
        match &result {
            Ok(changes) if !changes.is_empty() => {
                self.firewall_ok = true;
                info!(
                    added = ?changes.added,
                    removed = ?changes.removed,
                    snat_changed = changes.snat_changed,
                    snat_elements = desired.snat.len(),
                    took_ms = took.as_secs_f64() * 1e3,
                    "data plane converged"
                );
                self.status.dataplane.applies += 1;
                self.status.dataplane.last_apply_ms = Some(took.as_secs_f64() * 1e3);
                self.status.dataplane.last_error = None;
            }
            Ok(_) => {
                self.firewall_ok = true;
                self.status.dataplane.last_error = None;
            }
            Err(e) => {
                error!(error = %e, "data plane change failed; retrying on the next event or resync");
                self.status.dataplane.last_error = Some(e.to_string());
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
        self.publish(decision, &desired, not_ready);
    }

    fn log_changes(&mut self, decision: &Decision) {
        for (gw, from, to) in decision.changed() {
            let _span =
                info_span!("gateway", node = %self.config.node.name, gateway = gw, term = 0)
                    .entered();
            let why = match from.and_then(|f| decision.gateways.get(gw)?.ineligible.get(f)) {
                Some(reason) => format!("{} is no longer eligible: {reason}", from.unwrap_or("")),
                None if from.is_none() => "no node was active".to_string(),
                None => "a node earlier in the selection order is eligible".to_string(),
            };
            info!(
                from = from.unwrap_or("-"),
                to = to.unwrap_or("-"),
                why,
                "active node changed"
            );
            if let Some(g) = self.status.gateways.iter_mut().find(|g| g.name == gw) {
                g.failovers += 1;
                g.since_ms = unix_ms();
            }
        }
        self.assignment = decision.assignment.clone();
    }

    fn publish(
        &mut self,
        decision: Decision,
        desired: &reconciler::Desired,
        not_ready: Vec<String>,
    ) {
        let previous: Vec<GatewayStatus> = std::mem::take(&mut self.status.gateways);
        self.status.gateways = self
            .config
            .gateways
            .iter()
            .map(|g| {
                let prev = previous.iter().find(|p| p.name == g.name);
                let d = decision.gateways.get(&g.name);
                GatewayStatus {
                    name: g.name.clone(),
                    mode: g.source_ip.mode_name().to_string(),
                    source_ip: desired.sources.get(&g.name).copied(),
                    active: d.and_then(|d| d.active.clone()),
                    since_ms: prev.map_or_else(unix_ms, |p| p.since_ms),
                    eligible: d.map(|d| d.eligible.clone()).unwrap_or_default(),
                    ineligible: d
                        .map(|d| {
                            d.ineligible
                                .iter()
                                .map(|(n, r)| (n.clone(), r.to_string()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    failovers: prev.map_or(0, |p| p.failovers),
                }
            })
            .collect();
        self.status.node = self.config.node.name.clone();
        self.status.ready = not_ready.is_empty() && self.status.dataplane.last_error.is_none();
        self.status.not_ready = not_ready;
        self.status.dataplane.held_addresses = self.rec.held().iter().cloned().collect();
        self.status.dataplane.snat_elements = self.rec.installed().map_or(0, |m| m.len());
        self.status_tx.send_replace(self.status.clone());
    }

    fn reload(&mut self) {
        match crate::config::load(&self.config_path) {
            Ok(new) => {
                info!(
                    gateways = new.gateways.len(),
                    policies = new.policies.len(),
                    "configuration reloaded"
                );
                // Identity and listeners need a restart; the cluster-wide objects do not.
                self.config.gateways = new.gateways;
                self.config.policies = new.policies;
                self.config.node.labels = new.node.labels;
            }
            Err(errors) => {
                for e in &errors.0 {
                    error!(error = %e, "configuration reload rejected; keeping the running config");
                }
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then releases everything it holds.
pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let started = Instant::now();
    let node = config.node.name.clone();
    let _span = info_span!("egressd", node = %node).entered();
    info!(
        gateways = config.gateways.len(),
        policies = config.policies.len(),
        config = %config_path.display(),
        "starting"
    );

    let host = NetlinkHost::new().context("opening rtnetlink")?;
    let mut events = HostEvents::subscribe().context("subscribing to link events")?;
    let firewall = NftFirewall::new(&config.dataplane.nft_table);
    let resync = Duration::from_secs(config.dataplane.resync_secs);
    let (status_tx, status_rx) = watch::channel(Status::default());

    let admin_addr = config.admin.listen;
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {admin_addr}"))?;
    tokio::spawn(crate::admin::serve(listener, status_rx));

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    let mut daemon = Daemon {
        rec: Reconciler::new(host, firewall, settings(&config)),
        config,
        config_path,
        assignment: Assignment::new(),
        status: Status::default(),
        status_tx,
        firewall_ok: false,
        started,
        startup_reported: false,
    };
    // Install the (empty) table first: it replaces whatever a crashed run left, and proves that
    // nft works before the node claims to be ready.
    match daemon.rec.firewall.apply(&Default::default()).await {
        Ok(()) => daemon.firewall_ok = true,
        Err(e) => error!(error = %e, "cannot install the nftables table; not ready"),
    }

    let mut next_resync = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_resync {
            next_resync = now + resync;
        }
        daemon.round().await;
        loop {
            let wake = daemon
                .rec
                .next_deadline()
                .map_or(next_resync, |d| d.min(next_resync));
            tokio::select! {
                ev = events.next() => {
                    if ev.is_none() {
                        anyhow::bail!("the rtnetlink event socket closed");
                    }
                    // Coalesce the burst of events one change makes (link + addresses).
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    break;
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    daemon.rec.announce_due(Instant::now()).await;
                    if Instant::now() >= next_resync {
                        break;
                    }
                }
                _ = sighup.recv() => {
                    daemon.reload();
                    break;
                }
                _ = sigterm.recv() => return shutdown(&mut daemon, "SIGTERM").await,
                _ = sigint.recv() => return shutdown(&mut daemon, "SIGINT").await,
            }
        }
    }
}

async fn shutdown<H: Host, F: Firewall>(
    daemon: &mut Daemon<H, F>,
    signal: &str,
) -> anyhow::Result<()> {
    let held: BTreeSet<_> = daemon.rec.held().clone();
    info!(signal, held = ?held, "shutting down: releasing addresses and removing the nftables table");
    match daemon.rec.release_all().await {
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
