//! The domain model: what an operator declares (gateways, policies) and what a node reports about
//! itself. Pure data, no I/O; the election, the policy compiler and the reconciler all work on it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub type NodeName = String;
pub type Labels = BTreeMap<String, String>;

/// How the active node of a gateway is chosen among the eligible ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// First eligible node in alphabetical order of its name (the Deckhouse/Cilium rule).
    #[default]
    Alphabetical,
    /// Rendezvous order of sha256(gateway + "#" + node): spreads many gateways over the same
    /// nodes and moves only the gateways of a node that leaves.
    Spread,
}

/// Where the SNAT source address comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode")]
pub enum SourceIp {
    /// SNAT to the primary IPv4 address of `interface` on the active node.
    #[serde(rename = "PrimaryIPFromEgressGatewayNodeInterface")]
    PrimaryIp { interface: String },
    /// The active node holds `ip` on each of `interfaces`, announces it and SNATs to it.
    #[serde(rename = "VirtualIPAddress")]
    VirtualIp {
        // As text: the tag makes serde buffer the variant, which only keeps text for an address
        // in binary formats (the cluster's MessagePack).
        #[serde(with = "ip_text")]
        ip: IpAddr,
        interfaces: Vec<String>,
    },
}

impl SourceIp {
    pub fn mode_name(&self) -> &'static str {
        match self {
            SourceIp::PrimaryIp { .. } => "PrimaryIPFromEgressGatewayNodeInterface",
            SourceIp::VirtualIp { .. } => "VirtualIPAddress",
        }
    }
}

mod ip_text {
    use std::net::IpAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ip: &IpAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(ip)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An address clients route through, held by the active node beside the egress IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHop {
    pub ip: IpAddr,
    pub interface: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    pub name: String,
    pub node_selector: Labels,
    pub selection: Selection,
    pub preempt: bool,
    pub source_ip: SourceIp,
    pub next_hop: Option<NextHop>,
    /// Replicate the connection-tracking state of its flows to the standby nodes
    /// (`dataplane::ctsync`; `VirtualIPAddress` mode only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub conntrack_sync: bool,
}

/// What a gateway needs from an interface on a node for that node to be eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterfaceNeed {
    /// Exists and is up.
    Up,
    /// Exists, is up and carries an IPv4 address (PrimaryIP mode).
    UpWithIpv4,
}

impl Gateway {
    /// Every key/value of the selector must be among the labels (an empty value matches only an
    /// empty value). Returns the first selector key that does not match, if any.
    pub fn selector_mismatch(&self, labels: &Labels) -> Option<&str> {
        self.node_selector
            .iter()
            .find(|(k, v)| labels.get(*k) != Some(*v))
            .map(|(k, _)| k.as_str())
    }

    /// The addresses its active node holds and answers for: the VIP and the next hop.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let vip = match &self.source_ip {
            SourceIp::VirtualIp { ip, .. } => Some(*ip),
            SourceIp::PrimaryIp { .. } => None,
        };
        vip.into_iter()
            .chain(self.next_hop.as_ref().map(|n| n.ip))
            .collect()
    }

    /// The interfaces this gateway needs on its active node, each with what it needs.
    pub fn required_interfaces(&self) -> Vec<(&str, InterfaceNeed)> {
        let mut out: Vec<(&str, InterfaceNeed)> = match &self.source_ip {
            SourceIp::PrimaryIp { interface } => vec![(interface, InterfaceNeed::UpWithIpv4)],
            SourceIp::VirtualIp { interfaces, .. } => interfaces
                .iter()
                .map(|i| (i.as_str(), InterfaceNeed::Up))
                .collect(),
        };
        if let Some(nh) = &self.next_hop
            && !out.iter().any(|(i, _)| *i == nh.interface)
        {
            out.push((&nh.interface, InterfaceNeed::Up));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub egress_gateway_name: String,
    pub source_cidrs: Vec<IpNet>,
    pub destination_cidrs: Vec<IpNet>,
    pub excluded_cidrs: Vec<IpNet>,
}

/// The state of one interface on a node, as the node observes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceState {
    pub up: bool,
    /// The first IPv4 address on the interface that egressd did not add itself (the primary).
    pub primary_ipv4: Option<std::net::Ipv4Addr>,
}

/// Everything the election needs to know about one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: NodeName,
    pub labels: Labels,
    pub cordoned: bool,
    /// Heard from within the failure timeout (always true for the local node).
    pub alive: bool,
    /// Its daemon reports ready (data plane usable).
    pub ready: bool,
    /// Interfaces that exist on the node. A missing key means the interface does not exist.
    pub interfaces: BTreeMap<String, InterfaceState>,
}

/// Which node is active for which gateway.
pub type Assignment = BTreeMap<String, NodeName>;
