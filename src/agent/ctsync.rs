//! The data-plane task's side of flow-state replication (`dataplane::ctsync`): runs conntrackd
//! while a gateway this node may serve asks for it, commits the replicated entries before a
//! takeover's SNAT and addresses go in, and reports to the status and the metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::dataplane::HostState;
use crate::dataplane::ctsync::{Conntrackd, PeerSync, Settings, SyncStatus, pair_port};
use crate::metrics::Metrics;
use crate::model::Gateway;

/// The parts of the configuration the replication needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    pub program: PathBuf,
    pub dir: PathBuf,
    /// This node's peer-network address (None: not configured and not known from
    /// `cluster.listen`).
    pub address: Option<Ipv4Addr>,
    /// The first port of the links (one per pair of members).
    pub port: u16,
    pub node: String,
    /// The other members, by name and peer address.
    pub peers: Vec<(String, IpAddr)>,
}

impl SyncConfig {
    pub fn from_config(c: &crate::config::Config) -> SyncConfig {
        let listen = match c.cluster.listen.ip() {
            IpAddr::V4(a) if !a.is_unspecified() => Some(a),
            _ => None,
        };
        SyncConfig {
            program: c.dataplane.conntrackd.clone(),
            dir: c.cluster.data_dir.join("conntrackd"),
            address: c.dataplane.conntrack_sync_address.or(listen),
            port: c.dataplane.conntrack_sync_port,
            node: c.node.name.clone(),
            peers: c
                .cluster
                .peers
                .iter()
                .filter(|p| p.name != c.node.name)
                .map(|p| (p.name.clone(), p.address.ip()))
                .collect(),
        }
    }
}

/// Whether gateway `g` replicates its flows and this node may serve it.
pub fn synced_here(g: &Gateway, labels: &crate::model::Labels) -> bool {
    g.conntrack_sync
        && matches!(g.source_ip, crate::model::SourceIp::VirtualIp { .. })
        && g.selector_mismatch(labels).is_none()
}

/// How long after a failed start the next one is tried.
const RETRY: Duration = Duration::from_secs(5);
/// How long a node that just asked the active node for its flows (`-n`) reports not ready, so
/// that it is not given a gateway before they arrive (a bulk of a few thousand entries takes
/// milliseconds on a LAN).
const SETTLE: Duration = Duration::from_millis(500);

pub struct FlowSync {
    /// One conntrackd per peer, by peer name.
    daemons: BTreeMap<String, Conntrackd>,
    status: SyncStatus,
    /// Per peer: the last start failure and when the next start may be tried.
    failed: BTreeMap<String, (String, Instant)>,
    /// Until when the node waits for the resync it asked for.
    settle_until: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl FlowSync {
    pub fn new(metrics: Arc<Metrics>) -> FlowSync {
        FlowSync {
            daemons: BTreeMap::new(),
            status: SyncStatus {
                state: "off".into(),
                ..Default::default()
            },
            failed: BTreeMap::new(),
            settle_until: None,
            metrics,
        }
    }

    pub fn status(&self) -> &SyncStatus {
        &self.status
    }

    /// Why the node is not ready yet, while it waits for the resync it asked for.
    pub fn settling(&mut self) -> Option<String> {
        match self.settle_until {
            Some(t) if Instant::now() < t => Some(
                "conntrack sync: waiting for the active node's flows (resync requested)".into(),
            ),
            Some(_) => {
                self.settle_until = None;
                None
            }
            None => None,
        }
    }

    /// When the wait for a resync ends (the data-plane task runs a round then).
    pub fn settled_at(&self) -> Option<Instant> {
        self.settle_until
    }

    /// Asks every peer for its flows, and waits `SETTLE` before being ready.
    async fn resync(&mut self) {
        let mut asked = false;
        for (peer, d) in &self.daemons {
            match d.standby().await {
                Ok(()) => asked = true,
                Err(e) => {
                    warn!(peer, error = %e, "conntrackd: asking the peer for its flows failed")
                }
            }
        }
        if asked {
            self.settle_until = Some(Instant::now() + SETTLE);
        }
    }

    /// The node is back in contact with the cluster: a standby asks for the active node's
    /// flows again (those it missed while cut off).
    pub async fn rejoined(&mut self, held: &BTreeSet<String>) {
        if held.is_empty() {
            self.resync().await;
        }
    }

    /// Runs one conntrackd per peer when `wanted` (and none when not), restarting one that
    /// died or whose settings changed.
    pub async fn ensure(
        &mut self,
        wanted: bool,
        cfg: &SyncConfig,
        host: &HostState,
        managed: &BTreeSet<IpAddr>,
    ) {
        if !wanted {
            if !self.daemons.is_empty() {
                self.daemons.clear();
                info!("no gateway of this node replicates its flows any more: conntrackd stopped");
            }
            self.failed.clear();
            self.status = SyncStatus {
                state: "off".into(),
                ..Default::default()
            };
            self.metrics.conntrack_sync_up.set(0);
            return;
        }
        let wanted = match settings(cfg, host, managed) {
            Ok(s) => s,
            Err(message) => {
                if self.status.error.as_deref() != Some(message.as_str()) {
                    error!("flow-state replication cannot start: {message}");
                }
                self.daemons.clear();
                self.status = SyncStatus {
                    state: "failed".into(),
                    error: Some(message),
                    ..Default::default()
                };
                self.metrics.conntrack_sync_up.set(0);
                return;
            }
        };
        self.daemons.retain(|peer, _| wanted.contains_key(peer));
        let mut started = false;
        for (peer, settings) in wanted {
            if let Some(d) = self.daemons.get_mut(&peer) {
                match d.check() {
                    Err(e) => {
                        error!(peer, error = %e, "conntrackd died; restarting it");
                        self.daemons.remove(&peer);
                    }
                    Ok(()) if d.settings() != &settings => {
                        info!(
                            peer,
                            "the replication's settings changed: restarting conntrackd"
                        );
                        self.daemons.remove(&peer);
                    }
                    Ok(()) => continue,
                }
            }
            if self
                .failed
                .get(&peer)
                .is_some_and(|(_, at)| Instant::now() < *at)
            {
                continue;
            }
            match Conntrackd::start(settings).await {
                Ok(d) => {
                    self.failed.remove(&peer);
                    self.daemons.insert(peer, d);
                    started = true;
                }
                Err(e) => {
                    error!(
                        peer,
                        error = %e,
                        "flow-state replication with this peer is down: established connections \
                         will not survive a failover from it until it is back"
                    );
                    self.failed
                        .insert(peer, (e.to_string(), Instant::now() + RETRY));
                }
            }
        }
        if started {
            // A standby until a takeover: fill the external caches from the peers.
            self.resync().await;
        }
        self.publish(cfg);
    }

    /// The per-peer status from the running daemons and the failures.
    fn publish(&mut self, cfg: &SyncConfig) {
        let mut peers = Vec::new();
        for (name, _) in &cfg.peers {
            let old = self.status.peers.iter().find(|p| &p.peer == name).cloned();
            let p = if let Some(d) = self.daemons.get(name) {
                let s = d.settings();
                PeerSync {
                    peer: name.clone(),
                    state: "running".into(),
                    error: None,
                    link: Some(format!("{}:{}", s.peer, s.port)),
                    stats: old.and_then(|o| o.stats),
                }
            } else {
                PeerSync {
                    peer: name.clone(),
                    state: "failed".into(),
                    error: self.failed.get(name).map(|(e, _)| e.clone()),
                    link: None,
                    stats: None,
                }
            };
            peers.push(p);
        }
        let running = peers.iter().filter(|p| p.state == "running").count();
        self.status.state = if running == peers.len() {
            "running"
        } else if running > 0 {
            "degraded"
        } else {
            "failed"
        }
        .into();
        self.status.error = peers.iter().find_map(|p| p.error.clone());
        self.status.interface = self
            .daemons
            .values()
            .next()
            .map(|d| d.settings().interface.clone());
        self.status.peers = peers;
        self.metrics
            .conntrack_sync_up
            .set(i64::from(self.status.state == "running"));
    }

    /// Before the data plane takes `gateways` over: the replicated entries into the kernel,
    /// so that the flows find their state (and NAT binding) on their first packet here.
    pub async fn before_takeover(&mut self, gateways: &[String]) {
        if self.daemons.is_empty() {
            warn!(
                gateways = ?gateways,
                "taking over without replicated flow state (conntrackd is not running): \
                 established connections start over"
            );
            return;
        }
        let started = Instant::now();
        for (peer, d) in &self.daemons {
            if let Err(e) = d.commit().await {
                error!(
                    peer,
                    error = %e,
                    gateways = ?gateways,
                    "could not commit the flow state replicated from this peer: its established \
                     connections start over"
                );
            }
        }
        let took = started.elapsed();
        let ms = took.as_secs_f64() * 1e3;
        info!(
            gateways = ?gateways,
            took_ms = ms,
            "committed the replicated flow state into the kernel before taking over"
        );
        self.status.commits += 1;
        self.status.last_commit_ms = Some(ms);
        self.status.last_commit_entries = None;
        self.status.last_commit_unix_ms = Some(crate::events::unix_ms());
        self.metrics
            .conntrack_sync_commit
            .observe(took.as_secs_f64());
    }

    /// After the data plane changed: the new active node becomes the source of the replication
    /// (`took`), a released one a standby again (`released`).
    pub async fn after(&mut self, took: bool, released: bool) {
        if took {
            // How many entries the commit had: read now, off the takeover's path (the external
            // caches keep them until the flush below).
            let mut entries = 0;
            for d in self.daemons.values() {
                if let Ok(s) = d.stats().await {
                    entries += s.external;
                }
            }
            self.status.last_commit_entries = Some(entries);
            self.metrics.conntrack_sync_committed.inc_by(entries);
            for (peer, d) in &self.daemons {
                if let Err(e) = d.promoted().await {
                    warn!(peer, error = %e, "conntrackd: becoming the replication's source failed");
                }
            }
        } else if released {
            self.resync().await;
        }
    }

    /// Reads conntrackd's statistics into the status and the metrics.
    pub async fn refresh(&mut self) {
        if self.daemons.is_empty() {
            return;
        }
        let (mut internal, mut external, mut lost) = (0, 0, 0);
        for p in &mut self.status.peers {
            let Some(d) = self.daemons.get_mut(&p.peer) else {
                continue;
            };
            if let Err(e) = d.check() {
                p.state = "failed".into();
                p.error = Some(e.to_string());
                continue;
            }
            match d.stats().await {
                Ok(s) => {
                    // Every link's internal cache holds the same kernel entries.
                    internal = internal.max(s.internal);
                    external += s.external;
                    lost += s.lost;
                    p.stats = Some(s);
                }
                Err(e) => warn!(peer = p.peer, error = %e, "cannot read conntrackd's statistics"),
            }
        }
        let m = &self.metrics;
        m.conntrack_sync_entries("internal").set(internal as i64);
        m.conntrack_sync_entries("external").set(external as i64);
        m.conntrack_sync_lost.set(lost as i64);
        self.status.external = external;
    }
}

/// conntrackd's settings per peer, from the config and the host: the peer-network address
/// must be on an interface of this host, and each peer's an IPv4 address.
fn settings(
    cfg: &SyncConfig,
    host: &HostState,
    managed: &BTreeSet<IpAddr>,
) -> Result<BTreeMap<String, Settings>, String> {
    let address = cfg.address.ok_or_else(|| {
        "no peer-network address: set dataplane.conntrack_sync_address (cluster.listen does not \
         name one)"
            .to_string()
    })?;
    let interface = host
        .iter()
        .find(|(_, i)| i.addresses.iter().any(|(a, _)| *a == IpAddr::V4(address)))
        .map(|(name, _)| name.clone())
        .ok_or_else(|| format!("no interface of this host carries {address}"))?;
    // The nodes' own addresses (peer connections, management), never the gateways' ones.
    let mut ignore: BTreeSet<IpAddr> = host
        .values()
        .flat_map(|i| i.addresses.iter().map(|(a, _)| *a))
        .filter(|a| a.is_ipv4() && !managed.contains(a))
        .collect();
    ignore.extend(cfg.peers.iter().map(|(_, a)| *a));
    ignore.insert(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let members: Vec<String> = cfg
        .peers
        .iter()
        .map(|(n, _)| n.clone())
        .chain([cfg.node.clone()])
        .collect();
    let mut out = BTreeMap::new();
    for (peer, addr) in &cfg.peers {
        let IpAddr::V4(peer_addr) = addr else {
            return Err(format!("peer {peer}'s address {addr} is not IPv4"));
        };
        let port = pair_port(cfg.port, &members, &cfg.node, peer).ok_or_else(|| {
            format!(
                "dataplane.conntrack_sync_port {} leaves no port for the link with {peer}",
                cfg.port
            )
        })?;
        out.insert(
            peer.clone(),
            Settings {
                program: cfg.program.clone(),
                dir: cfg.dir.join(peer),
                address,
                interface: interface.clone(),
                peer: *peer_addr,
                port,
                ignore: ignore.clone(),
            },
        );
    }
    Ok(out)
}
