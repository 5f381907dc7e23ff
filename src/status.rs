//! The node's status: what `/v1/status` serves, `egressd status` shows, the metrics copy and the
//! systemd status line summarises. The daemon's tasks each fill in their part on a
//! [`StatusBoard`]; readers get whole, consistent copies.

use std::net::IpAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cluster::node::LeaderView;

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
    /// The node's leases (see `crate::lease`).
    #[serde(default)]
    pub lease: LeaseStatus,
    /// Every member with its role, liveness, readiness, labels and cordon (the leader's view;
    /// empty when no leader answered).
    pub members: Vec<MemberStatus>,
    /// The Kubernetes sync (`[kubernetes] enabled = true`), if it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesStatus>,
    /// The reasons of each part of the daemon, which `not_ready` joins.
    #[serde(skip)]
    pub not_ready_parts: std::collections::BTreeMap<String, Vec<String>>,
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
    /// How this node's `cluster.peers` differs from the cluster's member list (which only
    /// `egressd member add`/`remove` change).
    #[serde(default)]
    pub member_drift: Vec<String>,
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
    /// The last entry in this node's latest snapshot; the log before it is gone (0: none yet).
    #[serde(default)]
    pub snapshot_index: u64,
    /// Campaigns this node started because openraft kept delaying its elections for a longer
    /// log it had caught up with (openraft#2087).
    #[serde(default)]
    pub overdue_campaigns: u64,
    /// The newest command format every member is recorded to read (`ClusterFormat`; 0: none
    /// recorded yet): commands up to it no longer wait for members to report to a new leader.
    #[serde(default)]
    pub command_format: u16,
    /// Committed objects.
    pub gateways: usize,
    pub policies: usize,
    /// How much longer this node may hold its gateways without a renewal.
    pub lease_remaining_ms: u64,
    /// The node's config file disagrees with the committed gateways and policies.
    pub config_drift: bool,
    /// The cluster's id (chosen by its first leader; every peer request carries it).
    #[serde(default)]
    pub id: Option<String>,
    /// This node's peer TLS certificate: names, days left, trusted CAs (none: no
    /// `[cluster.tls]`, a one-node cluster).
    #[serde(default)]
    pub peer_tls: Option<String>,
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
    /// Repairs of egressd's nftables tables after changes from outside, the last one's cause
    /// and when it was done.
    #[serde(default)]
    pub repairs: u64,
    #[serde(default)]
    pub last_repair: Option<String>,
    #[serde(default)]
    pub last_repair_unix_ms: Option<u64>,
    /// Per gateway, what this node's gateway chains did with its policies' packets since they
    /// were made: action (`snated`, `redirected`, `dropped`, `looped`) → packets and bytes.
    #[serde(default)]
    pub traffic: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Traffic>>,
    /// Flow-state replication (conntrackd) of the `conntrack_sync` gateways on this node.
    #[serde(default)]
    pub conntrack_sync: crate::dataplane::ctsync::SyncStatus,
}

/// Packets and bytes counted by one nftables counter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// What this node may hold, and until when.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// Bumped at every start of the daemon.
    pub epoch: u64,
    /// Leased gateways, each with its addresses and how much longer the lease runs without a
    /// renewal.
    pub leased: Vec<LeasedGateway>,
    /// Addresses the kernel fence answers for now.
    pub fenced: Vec<IpAddr>,
    /// Reports sent, and answered with a renewing grant.
    pub reports: u64,
    pub renewals: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeasedGateway {
    pub gateway: String,
    pub addresses: Vec<IpAddr>,
    pub remaining_ms: u64,
}

/// The Kubernetes sync as this node runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesStatus {
    /// "listing", "synced", or why the API server cannot be reached (the last imported state
    /// is kept meanwhile).
    pub state: String,
    /// This node writes the imported objects and the status (it is the Raft leader).
    pub writer: bool,
    /// Objects in this node's watch caches.
    pub seen_gateways: usize,
    pub seen_policies: usize,
    pub seen_nodes: usize,
    pub seen_pods: usize,
    /// Committed objects of origin `kubernetes`.
    pub imported_gateways: usize,
    pub imported_policies: usize,
    /// Objects the sync did not import, with why (as the writer last saw them).
    pub not_imported: Vec<String>,
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
    /// Why: `egressd node cordon`, Kubernetes' `spec.unschedulable`, or both.
    #[serde(default)]
    pub cordon_reasons: Vec<String>,
}

impl Status {
    /// Replaces the not-ready reasons of one part of the daemon.
    pub fn set_not_ready(&mut self, part: &str, reasons: Vec<String>) {
        if reasons.is_empty() {
            self.not_ready_parts.remove(part);
        } else {
            self.not_ready_parts.insert(part.to_string(), reasons);
        }
        self.not_ready = self.not_ready_parts.values().flatten().cloned().collect();
        self.ready = self.not_ready.is_empty();
    }

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
                cordon_reasons: m.cordon_reasons.clone(),
            })
            .collect();
        self.members.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

/// Where the daemon's tasks publish their parts of the status.
pub struct StatusBoard {
    status: Mutex<Status>,
    tx: watch::Sender<Status>,
}

impl StatusBoard {
    pub fn new(node: &str) -> (StatusBoard, watch::Receiver<Status>) {
        let status = Status {
            node: node.to_string(),
            ..Status::default()
        };
        let (tx, rx) = watch::channel(status.clone());
        (
            StatusBoard {
                status: Mutex::new(status),
                tx,
            },
            rx,
        )
    }

    /// Changes the status and publishes a copy. Readers see every change; the subscribers are
    /// woken only when the summary the daemon's loop acts on changes (`notify::summary`): the
    /// lease task alone publishes a new remaining time several times a report interval.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let before = crate::notify::summary(&s);
        f(&mut s);
        s.ready = s.not_ready.is_empty();
        let changed = crate::notify::summary(&s) != before;
        self.tx.send_if_modified(|published| {
            *published = s.clone();
            changed
        });
    }

    pub fn get(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readers see every change; the daemon's loop is woken only by a change of what it passes
    /// on (the status line, joining): an idle node's lease task publishes many times a second.
    #[test]
    fn subscribers_are_woken_only_when_the_summary_changes() {
        let (board, mut rx) = StatusBoard::new("gw1");
        rx.borrow_and_update();
        board.update(|s| {
            s.cluster.lease_remaining_ms = 120;
            s.lease.reports = 7;
        });
        assert!(!rx.has_changed().unwrap(), "woken for a remaining time");
        assert_eq!(rx.borrow().cluster.lease_remaining_ms, 120);
        assert_eq!(board.get().lease.reports, 7);
        board.update(|s| s.cluster.leader = Some("gw2".into()));
        assert!(rx.has_changed().unwrap(), "not woken for a new leader");
        assert_eq!(
            rx.borrow_and_update().cluster.leader.as_deref(),
            Some("gw2")
        );
        board.update(|s| s.dataplane.held_gateways = vec!["vip".into()]);
        assert!(
            rx.has_changed().unwrap(),
            "not woken when the node became active"
        );
    }
}
