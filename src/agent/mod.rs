//! The node agent: three tasks that never wait for each other.
//!
//! - [`host`]: watches the host's interfaces and addresses (rtnetlink events) and publishes what
//!   it sees.
//! - [`lease`]: reports to the leader every report interval, applies its grants, keeps the
//!   kernel fence equal to the leases whose data plane is in place, and announces. Cheap work
//!   only (one small netlink batch per renewal), so a lease is never late because the data plane
//!   is busy.
//! - [`dataplane`]: turns the leased gateways and the committed objects into SNAT maps and
//!   addresses (the slow work: compiling, loading maps, rtnetlink) and says which addresses are
//!   in place.
//!
//! A takeover goes lease (grant) → data plane (SNAT, then address) → lease (fence element, then
//! announcement); a release goes lease (fence element gone, at once) → data plane (address, then
//! SNAT). So a node never answers for an address whose translation is missing, and stops
//! answering the moment its lease ends, however busy its data plane is.

pub mod ctsync;
pub mod dataplane;
pub mod host;
pub mod lease;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::model::{Gateway, InterfaceState, Labels};

/// The gateways this node holds a lease for now, with the addresses of each.
pub type Leased = BTreeMap<String, Vec<IpAddr>>;

/// `(interface, address)` pairs whose data plane is in place (SNAT installed, address added):
/// the lease task may answer for them.
pub type Ready = BTreeSet<(String, IpAddr)>;

/// What a node reports about itself besides its leases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub labels: Labels,
    pub ready: bool,
    pub interfaces: BTreeMap<String, InterfaceState>,
}

/// The parts of the configuration the tasks use; replaced on a reload.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub labels: Labels,
    /// The file's gateways: their addresses are fenced even before the cluster knows them.
    pub file_gateways: Vec<Gateway>,
    pub manage_forwarding: bool,
    pub garp_count: u32,
    pub garp_interval: std::time::Duration,
    pub garp_refresh: Option<std::time::Duration>,
    /// Flow-state replication of the `conntrack_sync` gateways.
    pub sync: ctsync::SyncConfig,
}

impl AgentConfig {
    pub fn from_config(c: &Config) -> Arc<AgentConfig> {
        let d = &c.dataplane;
        Arc::new(AgentConfig {
            node: c.node.name.clone(),
            labels: c.node.labels.clone(),
            file_gateways: c.gateways.clone(),
            manage_forwarding: d.manage_forwarding,
            garp_count: d.garp_count,
            garp_interval: std::time::Duration::from_millis(d.garp_interval_ms),
            garp_refresh: (d.garp_refresh_secs > 0)
                .then(|| std::time::Duration::from_secs(d.garp_refresh_secs)),
            sync: ctsync::SyncConfig::from_config(c),
        })
    }
}

/// Every address egressd may hold on this host: the committed gateways', the file's, and the
/// ones tagged as egressd's on the host (a crashed run's, a deleted gateway's).
pub fn managed(
    committed: &[Gateway],
    file: &[Gateway],
    host: &crate::dataplane::HostState,
) -> BTreeSet<IpAddr> {
    committed
        .iter()
        .chain(file)
        .flat_map(Gateway::addresses)
        .chain(host.values().flat_map(|i| i.tagged.iter().copied()))
        .collect()
}

/// The interfaces the fence's egress hook watches: those of `managed` gateways, and those that
/// carry a tagged address, that exist now.
pub fn fence_devices(
    committed: &[Gateway],
    file: &[Gateway],
    host: &crate::dataplane::HostState,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for g in committed.iter().chain(file) {
        for (iface, _) in g.required_interfaces() {
            out.insert(iface.to_string());
        }
    }
    for (name, i) in host {
        if !i.tagged.is_empty() {
            out.insert(name.clone());
        }
    }
    out.retain(|d| host.contains_key(d));
    out
}

/// What the daemon does when the nftables watcher or a task reports on a repair
/// (`dataplane::watch::Heal`): the warning log, the status (not converged, no gateway held while
/// the SNAT table is being repaired), the repair event and the repair counter.
pub fn heal_report(
    board: Arc<crate::status::StatusBoard>,
    events: crate::events::EventLog,
    metrics: Arc<crate::metrics::Metrics>,
) -> impl Fn(&crate::dataplane::watch::Heal, &crate::dataplane::watch::HealEvent<'_>) + Send + Sync
{
    use crate::dataplane::watch::{HealEvent, Part};
    move |heal, event| {
        // Recomputed from the repair state under the board's lock, so that the last writer
        // publishes the newest state whichever thread gets there first.
        let refresh = |s: &mut crate::status::Status| {
            s.set_not_ready("nftables", heal.reasons());
            if heal.pending(Part::Snat).is_some() {
                s.dataplane.held_gateways.clear();
            }
            if heal.pending(Part::Fence).is_some() {
                s.lease.fenced.clear();
            }
        };
        match event {
            HealEvent::Detected { part, tamper } => {
                tracing::warn!(
                    part = part.name(),
                    objects = ?tamper.objects,
                    "nftables: {}; repairing",
                    tamper.describe()
                );
                board.update(refresh);
            }
            HealEvent::BackingOff { part, tamper, wait } => {
                tracing::warn!(
                    part = part.name(),
                    wait_ms = wait.as_millis() as u64,
                    "nftables: the {} tables keep being changed from outside ({}): repairs back \
                     off, the next in {:.1} s",
                    part.name(),
                    tamper.describe(),
                    wait.as_secs_f64()
                );
                board.update(refresh);
            }
            HealEvent::Repaired {
                part,
                tampers,
                since,
                took,
            } => {
                // One repair, one event, whatever number of outside changes it covers.
                let what = tampers
                    .iter()
                    .map(|t| t.describe())
                    .collect::<Vec<_>>()
                    .join("; ");
                let objects: BTreeSet<&String> = tampers.iter().flat_map(|t| &t.objects).collect();
                let message = format!(
                    "data plane repaired: {what}; {} back {:.1} ms after the change (the repair \
                     took {:.1} ms)",
                    part.name(),
                    since.as_secs_f64() * 1e3,
                    took.as_secs_f64() * 1e3
                );
                tracing::warn!(part = part.name(), objects = ?objects, "{message}");
                events.local(crate::events::EventKind::Repair, None, message);
                for o in &objects {
                    metrics.repaired(o);
                }
                let last = (!what.is_empty()).then_some(what);
                board.update(|s| {
                    refresh(s);
                    s.dataplane.repairs += 1;
                    if last.is_some() {
                        s.dataplane.last_repair = last;
                        s.dataplane.last_repair_unix_ms = Some(crate::events::unix_ms());
                    }
                });
            }
        }
    }
}

/// The conntrack sweeper of the data plane (`dataplane::conntrack`), reporting each sweep as a
/// log line, an event and metrics; `None` (logged) when its thread cannot start.
pub fn flows_sweeper(
    settings: crate::dataplane::conntrack::Settings,
    metrics: Arc<crate::metrics::Metrics>,
    events: crate::events::EventLog,
) -> Option<crate::dataplane::conntrack::Sweeper> {
    use crate::dataplane::conntrack::{Sweep, Sweeper, TcpPolicy, log_failure};
    let tcp = settings.tcp;
    let report = move |s: &Sweep| {
        if s.quiet {
            tracing::debug!(
                examined = s.examined,
                took_ms = s.took.as_secs_f64() * 1e3,
                "the node's addresses changed: no conntrack entry was stale"
            );
            return;
        }
        for (protocol, n) in &s.deleted {
            metrics.conntrack_deleted("policy_change", protocol, *n);
        }
        metrics.conntrack_tcp_kept.inc_by(s.kept_tcp as u64);
        let by: Vec<String> = s.deleted.iter().map(|(p, n)| format!("{p} {n}")).collect();
        let mut message = format!(
            "policy change reached running flows: deleted {} stale conntrack entries{} of {} \
             in {:.1} ms (read in {:.1} ms)",
            s.deleted_total(),
            if by.is_empty() {
                String::new()
            } else {
                format!(" ({})", by.join(", "))
            },
            s.examined,
            s.took.as_secs_f64() * 1e3,
            s.read.as_secs_f64() * 1e3
        );
        if s.deleted.contains_key("tcp") {
            message.push_str("; TCP connections ended with a reset");
        }
        if s.kept_tcp > 0 && tcp == TcpPolicy::Keep {
            message.push_str(&format!(
                "; {} TCP connections keep their old translation until they end \
                 (dataplane.tcp_on_policy_change = \"keep\")",
                s.kept_tcp
            ));
        }
        tracing::info!(
            deleted = s.deleted_total(),
            kept_tcp = s.kept_tcp,
            examined = s.examined,
            changes = s.changes,
            took_ms = s.took.as_secs_f64() * 1e3,
            "{message}"
        );
        events.local(crate::events::EventKind::Flows, None, message);
    };
    match Sweeper::start(settings, report, log_failure) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(
                error = %e,
                "cannot start the conntrack sweeper: running flows keep their translation \
                 after policy changes until they end"
            );
            None
        }
    }
}
