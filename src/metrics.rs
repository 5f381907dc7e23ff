//! Prometheus metrics, served as text at `/metrics`. Values that the cluster state or the
//! status already hold are copied in at each scrape (`observe`); counters of things that happen
//! (announcements, nftables applies, leader changes) are counted where they happen.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::cluster::ClusterState;
use crate::status::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub gateway: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayActionLabels {
    pub gateway: String,
    /// `snated`, `redirected`, `dropped` (no node can take it), `looped` (came through the
    /// overlay to a node not active).
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayNodeLabels {
    pub gateway: String,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    /// "ipv4" (gratuitous ARP) or "ipv6" (unsolicited neighbour advertisement).
    pub family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    /// One of egressd's nftables tables, as nft names it: `inet egressd`, `arp egressd`, ...
    pub object: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConntrackLabels {
    /// `policy_change` (a change reclassified running flows) or `repair` (flows begun while
    /// the SNAT table was missing).
    pub reason: String,
    /// `udp`, `tcp`, `icmp` or `other`.
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncCacheLabels {
    /// `internal` (this node's flows, sent to the others) or `external` (received).
    pub cache: String,
}

pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: `observe` clears and refills the gateway families.
    scraping: std::sync::Mutex<()>,
    pub gateway_active: Family<GatewayNodeLabels, Gauge>,
    pub gateway_held: Family<GatewayLabels, Gauge>,
    pub gateway_eligible_nodes: Family<GatewayLabels, Gauge>,
    pub gateway_failovers: Family<GatewayLabels, Counter>,
    pub gateway_handovers: Family<GatewayLabels, Counter>,
    pub gateway_packets: Family<GatewayActionLabels, Counter>,
    pub gateway_bytes: Family<GatewayActionLabels, Counter>,
    pub gateway_last_failover: Family<GatewayLabels, Gauge<f64, AtomicU64>>,
    pub announcements: Family<FamilyLabels, Counter>,
    pub announcement_errors: Counter,
    pub nft_apply: Histogram,
    pub nft_apply_errors: Counter,
    pub dataplane_repairs: Family<ObjectLabels, Counter>,
    pub conntrack_deleted: Family<ConntrackLabels, Counter>,
    pub conntrack_tcp_kept: Counter,
    pub conntrack_sync_up: Gauge,
    pub conntrack_sync_cache: Family<SyncCacheLabels, Gauge>,
    pub conntrack_sync_lost: Gauge,
    pub conntrack_sync_commit: Histogram,
    pub conntrack_sync_committed: Counter,
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_leader_changes: Counter,
    pub raft_overdue_campaigns: Counter,
    pub raft_last_log_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_apply_lag: Gauge,
    pub lease_remaining: Gauge<f64, AtomicU64>,
    pub ready: Gauge,
    pub config_drift: Gauge,
    pub config_reload_failed: Gauge,
    pub policies_orphaned: Gauge,
    pub gateways: Gauge,
    pub policies: Gauge,
    pub snat_elements: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("egressd");
        let m = Metrics {
            registry: Registry::default(),
            scraping: std::sync::Mutex::new(()),
            gateway_active: Family::default(),
            gateway_held: Family::default(),
            gateway_eligible_nodes: Family::default(),
            gateway_failovers: Family::default(),
            gateway_handovers: Family::default(),
            gateway_packets: Family::default(),
            gateway_bytes: Family::default(),
            gateway_last_failover: Family::default(),
            announcements: Family::default(),
            announcement_errors: Counter::default(),
            // 1 ms .. ~8 s: one-element deltas take milliseconds, a 100 000-policy load seconds.
            nft_apply: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            nft_apply_errors: Counter::default(),
            dataplane_repairs: Family::default(),
            conntrack_deleted: Family::default(),
            conntrack_tcp_kept: Counter::default(),
            conntrack_sync_up: Gauge::default(),
            conntrack_sync_cache: Family::default(),
            conntrack_sync_lost: Gauge::default(),
            // 0.1 ms .. ~3 s: a commit of a few entries takes a fraction of a millisecond.
            conntrack_sync_commit: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            conntrack_sync_committed: Counter::default(),
            raft_term: Gauge::default(),
            raft_is_leader: Gauge::default(),
            raft_leader_changes: Counter::default(),
            raft_overdue_campaigns: Counter::default(),
            raft_last_log_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_apply_lag: Gauge::default(),
            lease_remaining: Gauge::default(),
            ready: Gauge::default(),
            config_drift: Gauge::default(),
            config_reload_failed: Gauge::default(),
            policies_orphaned: Gauge::default(),
            gateways: Gauge::default(),
            policies: Gauge::default(),
            snat_elements: Gauge::default(),
        };
        r.register(
            "gateway_active",
            "1 for the node the cluster committed as the gateway's active node, 0 for the other members",
            m.gateway_active.clone(),
        );
        r.register(
            "gateway_held",
            "1 while this node's data plane holds the gateway (SNAT, addresses, ARP answers)",
            m.gateway_held.clone(),
        );
        r.register(
            "gateway_eligible_nodes",
            "Eligible nodes of the gateway (exported by the leader, which decides)",
            m.gateway_eligible_nodes.clone(),
        );
        r.register(
            "gateway_failovers",
            "Moves of the gateway away from an active node that went silent",
            m.gateway_failovers.clone(),
        );
        r.register(
            "gateway_handovers",
            "Planned moves of the gateway (cordon, label, preemption, shutdown)",
            m.gateway_handovers.clone(),
        );
        r.register(
            "gateway_packets",
            "Packets of the gateway's policies through this node, by what it did with them: \
             snated (here), redirected (to the active node), dropped (no node can take them), \
             looped (came redirected to a node not active)",
            m.gateway_packets.clone(),
        );
        r.register_with_unit(
            "gateway",
            "Bytes of the gateway's policies through this node, by action (see gateway_packets)",
            Unit::Bytes,
            m.gateway_bytes.clone(),
        );
        r.register_with_unit(
            "gateway_last_failover",
            "How long the failed node had been silent when its gateway was moved",
            Unit::Seconds,
            m.gateway_last_failover.clone(),
        );
        r.register(
            "announcements",
            "Gratuitous ARPs and unsolicited neighbour advertisements sent",
            m.announcements.clone(),
        );
        r.register(
            "announcement_errors",
            "Announcements that could not be sent",
            m.announcement_errors.clone(),
        );
        r.register_with_unit(
            "nft_apply_duration",
            "Time to apply a change of the SNAT map through nft",
            Unit::Seconds,
            m.nft_apply.clone(),
        );
        r.register(
            "nft_apply_errors",
            "SNAT map changes that nft refused or that failed",
            m.nft_apply_errors.clone(),
        );
        r.register(
            "dataplane_repairs",
            "Repairs of one of egressd's nftables tables after something outside changed or removed it",
            m.dataplane_repairs.clone(),
        );
        r.register(
            "conntrack_deleted",
            "Conntrack entries egressd deleted because their NAT decision was stale (tcp: connections ended with a reset)",
            m.conntrack_deleted.clone(),
        );
        r.register(
            "conntrack_tcp_kept",
            "Stale TCP conntrack entries left to keep their old translation (dataplane.tcp_on_policy_change = keep)",
            m.conntrack_tcp_kept.clone(),
        );
        r.register(
            "conntrack_sync_up",
            "1 while conntrackd replicates the flow state of this node's conntrack_sync gateways",
            m.conntrack_sync_up.clone(),
        );
        r.register(
            "conntrack_sync_entries",
            "Entries in conntrackd's caches: internal (this node's flows, sent to the others), external (replicated from the active node, committed at a takeover)",
            m.conntrack_sync_cache.clone(),
        );
        r.register(
            "conntrack_sync_lost_messages",
            "Replication messages conntrackd saw lost (FTFW asks for them again)",
            m.conntrack_sync_lost.clone(),
        );
        r.register_with_unit(
            "conntrack_sync_commit",
            "Time to commit the replicated flow state into the kernel at a takeover, before the SNAT and addresses go in",
            Unit::Seconds,
            m.conntrack_sync_commit.clone(),
        );
        r.register(
            "conntrack_sync_committed_entries",
            "Replicated entries committed into the kernel at takeovers",
            m.conntrack_sync_committed.clone(),
        );
        r.register("raft_term", "Current Raft term", m.raft_term.clone());
        r.register(
            "raft_overdue_campaigns",
            "Campaigns started because openraft kept delaying this node's elections for a longer log it had caught up with",
            m.raft_overdue_campaigns.clone(),
        );
        r.register(
            "raft_is_leader",
            "1 while this node is the Raft leader",
            m.raft_is_leader.clone(),
        );
        r.register(
            "raft_leader_changes",
            "Changes of the leader this node has seen (including to none)",
            m.raft_leader_changes.clone(),
        );
        r.register(
            "raft_last_log_index",
            "Index of the last entry in this node's Raft log",
            m.raft_last_log_index.clone(),
        );
        r.register(
            "raft_applied_index",
            "Index of the last entry this node applied",
            m.raft_applied_index.clone(),
        );
        r.register(
            "raft_apply_lag",
            "Log entries this node has but has not applied yet",
            m.raft_apply_lag.clone(),
        );
        r.register_with_unit(
            "lease_remaining",
            "How much longer this node may hold its gateways without a renewal from the leader",
            Unit::Seconds,
            m.lease_remaining.clone(),
        );
        r.register(
            "ready",
            "1 when the node is ready (leader known, data plane converged)",
            m.ready.clone(),
        );
        r.register(
            "config_drift",
            "Differences between this node's configuration file and the committed objects",
            m.config_drift.clone(),
        );
        r.register(
            "config_reload_failed",
            "1 when the last reload of the configuration file was rejected",
            m.config_reload_failed.clone(),
        );
        r.register(
            "policies_orphaned",
            "Committed policies that name a gateway that does not exist",
            m.policies_orphaned.clone(),
        );
        r.register("gateways", "Committed gateways", m.gateways.clone());
        r.register("policies", "Committed policies", m.policies.clone());
        r.register(
            "snat_elements",
            "Elements of the SNAT maps installed on this node",
            m.snat_elements.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// `observe`, then `encode`, as one scrape.
    pub fn scrape(&self, status: &Status, state: &ClusterState) -> String {
        let _one = self.scraping.lock().unwrap_or_else(|p| p.into_inner());
        self.observe(status, state);
        self.encode()
    }

    /// One repair of egressd's nftables table `object` (`inet egressd`).
    pub fn repaired(&self, object: &str) {
        self.dataplane_repairs
            .get_or_create(&ObjectLabels {
                object: object.to_owned(),
            })
            .inc();
    }

    /// Starts the repair counters of egressd's tables at 0, so that the first repair is an
    /// increase Prometheus sees.
    pub fn init_repairs(&self, table: &str) {
        for family in ["inet", "arp", "ip6", "netdev"] {
            let _ = self.dataplane_repairs.get_or_create(&ObjectLabels {
                object: format!("{family} {table}"),
            });
        }
    }

    /// `n` conntrack entries of `protocol` deleted for `reason`.
    pub fn conntrack_deleted(&self, reason: &str, protocol: &str, n: usize) {
        self.conntrack_deleted
            .get_or_create(&ConntrackLabels {
                reason: reason.to_owned(),
                protocol: protocol.to_owned(),
            })
            .inc_by(n as u64);
    }

    /// The gauge of one of conntrackd's caches.
    pub fn conntrack_sync_entries(&self, cache: &str) -> Gauge {
        self.conntrack_sync_cache
            .get_or_create(&SyncCacheLabels {
                cache: cache.to_owned(),
            })
            .clone()
    }

    pub fn announced(&self, ipv6: bool) {
        let family = if ipv6 { "ipv6" } else { "ipv4" };
        self.announcements
            .get_or_create(&FamilyLabels {
                family: family.into(),
            })
            .inc();
    }

    /// Copies what the status and the committed state say into the gauges and counters.
    pub fn observe(&self, status: &Status, state: &ClusterState) {
        let g = |name: &str| GatewayLabels {
            gateway: name.to_owned(),
        };
        self.gateway_active.clear();
        self.gateway_held.clear();
        self.gateway_eligible_nodes.clear();
        self.gateway_last_failover.clear();
        let is_leader = status.cluster.leader.as_deref() == Some(status.node.as_str());
        for gw in &status.gateways {
            for member in &status.cluster.members {
                let labels = GatewayNodeLabels {
                    gateway: gw.name.clone(),
                    node: member.clone(),
                };
                let active = gw.active.as_deref() == Some(member.as_str());
                self.gateway_active
                    .get_or_create(&labels)
                    .set(i64::from(active));
            }
            let held = status.dataplane.held_gateways.contains(&gw.name);
            self.gateway_held
                .get_or_create(&g(&gw.name))
                .set(i64::from(held));
            if is_leader {
                self.gateway_eligible_nodes
                    .get_or_create(&g(&gw.name))
                    .set(gw.eligible.len() as i64);
            }
            if let Some(ms) = gw.last_failover_detect_ms {
                self.gateway_last_failover
                    .get_or_create(&g(&gw.name))
                    .set(ms as f64 / 1e3);
            }
        }
        // Counters follow the replicated counts, which only grow while a gateway exists.
        for (name, st) in &state.stats {
            raise(
                &self.gateway_failovers.get_or_create(&g(name)),
                st.failovers,
            );
            raise(
                &self.gateway_handovers.get_or_create(&g(name)),
                st.handovers,
            );
        }
        // nftables counters start again at 0 when the table is replaced from scratch: the
        // exported counters only grow (a reset loses what came before it, never goes back).
        for (name, actions) in &status.dataplane.traffic {
            for (action, t) in actions {
                let labels = GatewayActionLabels {
                    gateway: name.clone(),
                    action: action.clone(),
                };
                raise(&self.gateway_packets.get_or_create(&labels), t.packets);
                raise(&self.gateway_bytes.get_or_create(&labels), t.bytes);
            }
        }
        self.raft_term.set(status.cluster.term as i64);
        raise(
            &self.raft_overdue_campaigns,
            status.cluster.overdue_campaigns,
        );
        self.raft_is_leader.set(i64::from(is_leader));
        self.raft_applied_index
            .set(status.cluster.applied_index as i64);
        self.raft_last_log_index
            .set(status.cluster.last_log_index as i64);
        self.raft_apply_lag.set(
            status
                .cluster
                .last_log_index
                .saturating_sub(status.cluster.applied_index) as i64,
        );
        self.lease_remaining
            .set(status.cluster.lease_remaining_ms as f64 / 1e3);
        self.ready.set(i64::from(status.ready));
        self.config_drift.set(status.config.drift.len() as i64);
        self.config_reload_failed
            .set(i64::from(!status.config.last_reload_errors.is_empty()));
        self.policies_orphaned
            .set(status.config.orphaned_policies.len() as i64);
        self.gateways.set(status.cluster.gateways as i64);
        self.policies.set(status.cluster.policies as i64);
        self.snat_elements
            .set(status.dataplane.snat_elements as i64);
    }
}

fn raise(counter: &Counter, to: u64) {
    let now = counter.get();
    if to > now {
        counter.inc_by(to - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::GatewayStatus;

    #[test]
    fn per_gateway_traffic_is_exported_and_only_grows() {
        let m = Metrics::new();
        let mut s = Status::default();
        let set = |s: &mut Status, packets, bytes| {
            let mut a = std::collections::BTreeMap::new();
            a.insert(
                "redirected".to_string(),
                crate::status::Traffic { packets, bytes },
            );
            s.dataplane.traffic.insert("g".into(), a);
        };
        set(&mut s, 5, 300);
        m.observe(&s, &ClusterState::default());
        let text = m.encode();
        assert!(
            text.contains("egressd_gateway_packets_total{gateway=\"g\",action=\"redirected\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("egressd_gateway_bytes_total{gateway=\"g\",action=\"redirected\"} 300"),
            "{text}"
        );
        // The table was replaced: nftables counts from 0 again; the export does not go back.
        set(&mut s, 2, 120);
        m.observe(&s, &ClusterState::default());
        assert!(m.encode().contains("action=\"redirected\"} 5"));
    }

    #[test]
    fn exposition_names_and_values() {
        let m = Metrics::new();
        let mut s = Status {
            node: "gw1".into(),
            ready: true,
            ..Default::default()
        };
        s.cluster.leader = Some("gw1".into());
        s.cluster.members = vec!["gw1".into(), "gw2".into()];
        s.gateways = vec![GatewayStatus {
            name: "g".into(),
            active: Some("gw2".into()),
            eligible: vec!["gw2".into()],
            last_failover_detect_ms: Some(270),
            ..Default::default()
        }];
        let mut state = ClusterState::default();
        state.stats.insert(
            "g".into(),
            crate::cluster::state::GatewayStats {
                failovers: 3,
                ..Default::default()
            },
        );
        m.observe(&s, &state);
        m.observe(&s, &state);
        m.announced(false);
        m.nft_apply.observe(0.004);
        m.init_repairs("egressd");
        m.repaired("inet egressd");
        let text = m.encode();
        for line in [
            "egressd_gateway_active{gateway=\"g\",node=\"gw2\"} 1",
            "egressd_gateway_active{gateway=\"g\",node=\"gw1\"} 0",
            "egressd_gateway_failovers_total{gateway=\"g\"} 3",
            "egressd_gateway_last_failover_seconds{gateway=\"g\"} 0.27",
            "egressd_gateway_eligible_nodes{gateway=\"g\"} 1",
            "egressd_announcements_total{family=\"ipv4\"} 1",
            "egressd_nft_apply_duration_seconds_count 1",
            "egressd_ready 1",
            "egressd_raft_is_leader 1",
            "egressd_dataplane_repairs_total{object=\"inet egressd\"} 1",
            "egressd_dataplane_repairs_total{object=\"arp egressd\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
