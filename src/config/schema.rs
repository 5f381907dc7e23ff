//! The schema: every key of `egressd.toml`, and the objects as they are written wherever they
//! come from — the file's `[[gateway]]` and `[[policy]]` tables, `egressd apply -f`, and the
//! TOML and JSON bodies of the admin API (`POST /v1/apply`, whose JSON names the lists
//! `gateways` and `policies`). One set of types, so one set of keys, required fields and
//! defaults everywhere.
//!
//! A field without a default is required; `Option` and `#[serde(default)]` fields may be left
//! out. Addresses and CIDRs are kept as written (strings) and parsed by `rules`, whose messages
//! say what was expected. Unknown keys are refused (the reader in `de.rs` names each with the
//! keys that exist there). What each key expects, for error messages, is [`expected`].

use std::ops::RangeInclusive;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{Gateway, Labels, NextHop, Policy, Selection, SourceIp};

pub const VIP_MODE: &str = "VirtualIPAddress";
pub const PRIMARY_MODE: &str = "PrimaryIPFromEgressGatewayNodeInterface";
pub const VIP_TABLE: &str = "virtual_ip_address";
pub const PRIMARY_TABLE: &str = "primary_ip_from_egress_gateway_node_interface";

/// The whole configuration file. Every section may be left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    #[serde(default)]
    pub node: NodeSpec,
    #[serde(default)]
    pub cluster: ClusterSpec,
    #[serde(default)]
    pub admin: AdminSpec,
    #[serde(default)]
    pub dataplane: DataplaneSpec,
    #[serde(default)]
    pub log: LogSpec,
    #[serde(default)]
    pub kubernetes: KubernetesSpec,
    #[serde(default)]
    pub gateway: Vec<GatewaySpec>,
    #[serde(default)]
    pub policy: Vec<PolicySpec>,
}

/// `[node]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Default: the host name. Must be among `cluster.peers`.
    pub name: Option<String>,
    /// Matched by the gateways' `node_selector`.
    #[serde(default)]
    pub labels: Labels,
}

/// `[cluster]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Peer (Raft) endpoint; default `0.0.0.0:7480`.
    pub listen: Option<String>,
    /// Every voter, this node included; empty: a single-node cluster.
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
    /// Default `/var/lib/egressd`.
    pub data_dir: Option<PathBuf>,
    /// `[cluster.tls]`: mutual TLS between the peers; required with more than one peer.
    pub tls: Option<ClusterTlsSpec>,
    #[serde(default)]
    pub profile: Profile,
    /// Overrides of the profile's timing, milliseconds ([`TIMING_MS`]).
    pub heartbeat_ms: Option<u64>,
    pub election_timeout_min_ms: Option<u64>,
    pub election_timeout_max_ms: Option<u64>,
    pub report_interval_ms: Option<u64>,
    pub lease_ms: Option<u64>,
    pub failover_timeout_ms: Option<u64>,
}

/// `[cluster.tls]`: this node's peer TLS identity (PEM files; see `egressd tls`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsSpec {
    /// The cluster CA certificate(s); old and new may be bundled during a rotation.
    pub ca_file: PathBuf,
    /// This node's certificate, whose DNS subject alternative name is `node.name`.
    pub cert_file: PathBuf,
    /// Its private key, readable by the daemon's user only (mode 0600).
    pub key_file: PathBuf,
}

/// `[admin.tls]`: HTTPS for the admin endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTlsSpec {
    /// The endpoint's certificate (chain), PEM.
    pub cert_file: PathBuf,
    /// Its private key, mode 0600.
    pub key_file: PathBuf,
    /// The CA the command-line client verifies the endpoint with (egressd itself does not read
    /// it); `--ca-file` overrides it.
    pub ca_file: Option<PathBuf>,
}

/// One of `cluster.peers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    pub name: String,
    /// address:port
    pub address: String,
}

/// A set of timing defaults: `default` targets a failover of about a quarter second on ordinary
/// hosts; `fast` halves everything, for quiet, well-connected machines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Default,
    Fast,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// Default `127.0.0.1:7481`.
    pub listen: Option<String>,
    /// The bearer token mutations need; without it they are refused.
    pub token_file: Option<PathBuf>,
    /// `[admin.tls]`: serve HTTPS instead of HTTP.
    pub tls: Option<AdminTlsSpec>,
}

/// `[dataplane]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSpec {
    /// Default `egressd`.
    pub nft_table: Option<String>,
    /// Default 5, [`GARP_COUNT`].
    pub garp_count: Option<u64>,
    /// Default 10, [`GARP_INTERVAL_MS`].
    pub garp_interval_ms: Option<u64>,
    /// Default 0 (off), [`GARP_REFRESH_SECS`].
    pub garp_refresh_secs: Option<u64>,
    /// Default false.
    pub manage_forwarding: Option<bool>,
    /// `keep` (default) or `reset`: what a policy change does to running TCP connections it
    /// reclassifies (`crate::dataplane::conntrack`).
    pub tcp_on_policy_change: Option<String>,
    /// Flow-state replication of the gateways with `conntrack_sync = true` (conntrackd, FTFW
    /// over multicast on the peer network): this node's IPv4 address on the peer network;
    /// default the address of `cluster.listen`.
    pub conntrack_sync_address: Option<String>,
    /// The first UDP port of the replication's links (one per pair of members, numbered in
    /// the order of the sorted node names); default 3780.
    pub conntrack_sync_port: Option<u64>,
    /// The conntrackd program; default `/usr/sbin/conntrackd`.
    pub conntrackd: Option<PathBuf>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSpec {
    pub format: Option<LogFormat>,
    /// An `EnvFilter` directive; default `info`.
    pub level: Option<String>,
}

/// `[kubernetes]`: the live sync of Deckhouse's EgressGateway and EgressGatewayPolicy (and the
/// Nodes and Pods they select) from a Kubernetes cluster; needs an egressd built with the
/// `kubernetes` feature.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSpec {
    /// Default false.
    pub enabled: Option<bool>,
    /// A kubeconfig file; left out, the in-cluster service account (the
    /// `KUBERNETES_SERVICE_HOST` environment and
    /// `/var/run/secrets/kubernetes.io/serviceaccount`).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig's context; default its current context.
    pub context: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub const TIMING_MS: RangeInclusive<u64> = 5..=60_000;
pub const GARP_COUNT: RangeInclusive<u64> = 1..=100;
pub const GARP_INTERVAL_MS: RangeInclusive<u64> = 0..=10_000;
pub const GARP_REFRESH_SECS: RangeInclusive<u64> = 0..=86_400;
pub const SYNC_PORT: RangeInclusive<u64> = 1..=65_535;

/// `[[gateway]]` (an element of `gateways` in a JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    pub name: String,
    /// Every key/value must be among a node's labels; default: every node.
    #[serde(default)]
    pub node_selector: Labels,
    #[serde(default)]
    pub selection: Selection,
    /// false: a still-eligible active node keeps the role.
    #[serde(default = "yes")]
    pub preempt: bool,
    pub source_ip: SourceIpSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop: Option<NextHopSpec>,
    /// Replicate the conntrack state of the gateway's flows to its standby nodes through
    /// conntrackd, so that established connections survive a failover (`VirtualIPAddress`
    /// mode only). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conntrack_sync: bool,
}

fn yes() -> bool {
    true
}

/// `[gateway.source_ip]`: the mode, and the settings table of that mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceIpSpec {
    pub mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_ip_address: Option<VipSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_ip_from_egress_gateway_node_interface: Option<PrimarySpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    #[serde(rename = "VirtualIPAddress")]
    VirtualIp,
    #[serde(rename = "PrimaryIPFromEgressGatewayNodeInterface")]
    PrimaryIp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    pub ip: String,
    pub interfaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrimarySpec {
    pub interface_name: String,
}

/// `[gateway.next_hop]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextHopSpec {
    pub ip: String,
    pub interface: String,
}

/// `[[policy]]` (an element of `policies` in a JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub name: String,
    pub egress_gateway_name: String,
    pub source_cidrs: Vec<String>,
    pub destination_cidrs: Vec<String>,
    #[serde(default)]
    pub excluded_cidrs: Vec<String>,
}

/// The JSON body of `POST /v1/apply` (its TOML body is `[[gateway]]` and `[[policy]]` tables).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplySpec {
    #[serde(default)]
    pub gateways: Vec<GatewaySpec>,
    #[serde(default)]
    pub policies: Vec<PolicySpec>,
}

/// The body of `POST /v1/nodes/{name}/labels`: `value` null or left out removes the label.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelChange {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

/// The body of `POST /v1/policies/{name}/cidrs` (`egressd policy add-cidrs|remove-cidrs`):
/// CIDRs to add to and to remove from a policy's lists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrEdit {
    #[serde(default)]
    pub add: CidrListsSpec,
    #[serde(default)]
    pub remove: CidrListsSpec,
}

/// A policy's three CIDR lists as strings, as in the configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrListsSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_cidrs: Vec<String>,
}

impl CidrListsSpec {
    pub fn is_empty(&self) -> bool {
        self.source_cidrs.is_empty()
            && self.destination_cidrs.is_empty()
            && self.excluded_cidrs.is_empty()
    }
}

/// The body of `POST /v1/members` (`egressd member add NAME ADDRESS`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberAdd {
    pub name: String,
    /// The new node's peer address (its `cluster.listen`), address:port.
    pub address: String,
}

/// What the key at `pattern` expects, for messages about a missing or mistyped value. In the
/// pattern, `[]` stands for any index and `*` for any label key; JSON's `gateways`/`policies`
/// are looked up as `gateway`/`policy`.
pub fn expected(pattern: &str) -> Option<String> {
    let range = |r: &RangeInclusive<u64>, unit: &str| {
        format!("an integer between {} and {}{unit}", r.start(), r.end())
    };
    let label_value = "a string (label values are strings; use \"\" for an empty value)";
    let cidr = "a CIDR string such as \"10.0.0.0/24\"";
    let modes = format!("\"{VIP_MODE}\" or \"{PRIMARY_MODE}\"");
    let s = |s: &str| Some(s.to_string());
    match pattern {
        "node" | "cluster" | "admin" | "dataplane" | "log" | "kubernetes" => s("a table"),
        "kubernetes.enabled" => s("true or false"),
        "kubernetes.kubeconfig" => s("a path string"),
        "kubernetes.context" => s("a kubeconfig context name"),
        "node.name" => s("a name string"),
        "node.labels" | "gateway[].node_selector" => {
            s("a table of strings such as { \"node-role.deckhouse.io/egress\" = \"\" }")
        }
        "node.labels.*" | "gateway[].node_selector.*" => s(label_value),
        "cluster.listen" | "cluster.peers[].address" | "admin.listen" => {
            s("an address:port string such as \"10.77.0.12:7480\"")
        }
        "cluster.peers" => {
            s("an array of tables such as { name = \"gw1\", address = \"10.77.0.11:7480\" }")
        }
        "cluster.peers[].name" => s("the peer's node name"),
        "cluster.data_dir"
        | "admin.token_file"
        | "cluster.tls.ca_file"
        | "cluster.tls.cert_file"
        | "cluster.tls.key_file"
        | "admin.tls.cert_file"
        | "admin.tls.key_file"
        | "admin.tls.ca_file" => s("a path string"),
        "cluster.tls" => s(
            "a table { ca_file = \"...\", cert_file = \"...\", key_file = \"...\" } (PEM files \
             made by `egressd tls`)",
        ),
        "admin.tls" => s("a table { cert_file = \"...\", key_file = \"...\" }"),
        "cluster.profile" => s("\"default\" or \"fast\""),
        "cluster.heartbeat_ms"
        | "cluster.election_timeout_min_ms"
        | "cluster.election_timeout_max_ms"
        | "cluster.report_interval_ms"
        | "cluster.lease_ms"
        | "cluster.failover_timeout_ms" => Some(range(&TIMING_MS, " milliseconds")),
        "dataplane.nft_table" => s("a table name string"),
        "dataplane.garp_count" => Some(range(&GARP_COUNT, "")),
        "dataplane.garp_interval_ms" => Some(range(&GARP_INTERVAL_MS, " milliseconds")),
        "dataplane.garp_refresh_secs" => {
            Some(range(&GARP_REFRESH_SECS, " seconds (0 turns it off)"))
        }
        "dataplane.conntrack_sync_address" => {
            s("this node's IPv4 address on the peer network, e.g. \"10.77.0.11\"")
        }
        "dataplane.conntrack_sync_port" => Some(range(&SYNC_PORT, "")),
        "dataplane.conntrackd" => s("a path string such as \"/usr/sbin/conntrackd\""),
        "log.format" => s("\"text\" or \"json\""),
        "log.level" => s("a log filter string such as \"info\""),
        "gateway" => s("an array of tables ([[gateway]])"),
        "policy" => s("an array of tables ([[policy]])"),
        "gateway[]" => s("a [[gateway]] table"),
        "policy[]" => s("a [[policy]] table"),
        "gateway[].name" => s("the gateway's name"),
        "gateway[].selection" => s("\"alphabetical\" (the default) or \"spread\""),
        "gateway[].source_ip" => Some(format!("a [gateway.source_ip] table with mode = {modes}")),
        "gateway[].source_ip.mode" => Some(modes),
        "gateway[].source_ip.virtual_ip_address.ip" => {
            s("the virtual IP address, e.g. \"198.18.0.50\"")
        }
        "gateway[].source_ip.virtual_ip_address.interfaces" => {
            s("the interfaces to hold the VIP on, e.g. [\"eth1\"]")
        }
        "gateway[].source_ip.virtual_ip_address.interfaces[]" => {
            s("an interface name string such as \"eth1\"")
        }
        "gateway[].source_ip.primary_ip_from_egress_gateway_node_interface.interface_name" => {
            s("the interface whose primary IPv4 address is used, e.g. \"eth1\"")
        }
        "gateway[].conntrack_sync" => s("true or false"),
        "gateway[].next_hop" => s("a table { ip = \"10.77.0.1\", interface = \"eth0\" }"),
        "gateway[].next_hop.ip" => {
            s("the next-hop address clients route through, e.g. \"10.77.0.1\"")
        }
        "gateway[].next_hop.interface" => {
            s("the interface to hold the next-hop address on, e.g. \"eth0\"")
        }
        "policy[].name" => s("the policy's name"),
        "policy[].egress_gateway_name" => s("the name of a [[gateway]]"),
        "policy[].source_cidrs" => s("the CIDRs of the traffic's sources, e.g. [\"10.77.0.0/24\"]"),
        "policy[].destination_cidrs" => {
            s("the CIDRs of the traffic's destinations, e.g. [\"0.0.0.0/0\"]")
        }
        "policy[].excluded_cidrs" => s("CIDRs to leave out, e.g. [\"192.168.0.0/16\"]"),
        "policy[].source_cidrs[]"
        | "policy[].destination_cidrs[]"
        | "policy[].excluded_cidrs[]" => s(cidr),
        "key" => s("a label key such as \"node-role.deckhouse.io/egress\""),
        "value" => s("a label value string, or null to remove the label"),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Model objects in this shape: how the effective configuration, `egressd get` and the admin
// API's listings show them, so that what is read back can be applied again.
// ---------------------------------------------------------------------------------------------

impl From<&Gateway> for GatewaySpec {
    fn from(g: &Gateway) -> GatewaySpec {
        GatewaySpec {
            name: g.name.clone(),
            node_selector: g.node_selector.clone(),
            selection: g.selection,
            preempt: g.preempt,
            source_ip: match &g.source_ip {
                SourceIp::VirtualIp { ip, interfaces } => SourceIpSpec {
                    mode: Mode::VirtualIp,
                    virtual_ip_address: Some(VipSpec {
                        ip: ip.to_string(),
                        interfaces: interfaces.clone(),
                    }),
                    primary_ip_from_egress_gateway_node_interface: None,
                },
                SourceIp::PrimaryIp { interface } => SourceIpSpec {
                    mode: Mode::PrimaryIp,
                    virtual_ip_address: None,
                    primary_ip_from_egress_gateway_node_interface: Some(PrimarySpec {
                        interface_name: interface.clone(),
                    }),
                },
            },
            next_hop: g
                .next_hop
                .as_ref()
                .map(|NextHop { ip, interface }| NextHopSpec {
                    ip: ip.to_string(),
                    interface: interface.clone(),
                }),
            conntrack_sync: g.conntrack_sync,
        }
    }
}

impl From<&Policy> for PolicySpec {
    fn from(p: &Policy) -> PolicySpec {
        let strings = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect();
        PolicySpec {
            name: p.name.clone(),
            egress_gateway_name: p.egress_gateway_name.clone(),
            source_cidrs: strings(&p.source_cidrs),
            destination_cidrs: strings(&p.destination_cidrs),
            excluded_cidrs: strings(&p.excluded_cidrs),
        }
    }
}
