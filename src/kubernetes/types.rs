//! The Deckhouse resources, `network.deckhouse.io/v1alpha1`, both cluster-scoped, with exactly
//! the fields of Deckhouse's `cni-cilium` module (its CRDs and the `egress-gateway-agent` Go
//! types), so that manifests written for Deckhouse read unchanged and what egressd writes back
//! (status) is what Deckhouse's own tools expect.
//!
//! The types are kept as written: addresses and CIDRs are strings, and nothing here checks
//! them. Whether an object makes sense is decided by `config::rules`, the rules every gateway
//! and policy follows wherever it comes from (see `import.rs`).
//!
//! Unknown fields are ignored on reading, as Kubernetes clients do: a newer Deckhouse may add
//! fields, and a watcher must not stop on them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "network.deckhouse.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "network.deckhouse.io/v1alpha1";

/// The pseudo-label a pod selector uses for the pod's namespace (Cilium's convention, which
/// Deckhouse documents for `spec.selectors`).
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

/// A group of nodes, one of them active, that SNATs the traffic of the policies naming it.
// Each `printcolumn(...)` repeats the keys `name`, `type_` and `json_path`, which clippy takes
// for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.deckhouse.io",
    version = "v1alpha1",
    kind = "EgressGateway",
    status = "EgressGatewayStatus",
    derive = "PartialEq",
    doc = "A fault-tolerant egress gateway: a group of nodes (spec.nodeSelector), one of them \
           active, that sends the traffic of the EgressGatewayPolicies naming it with the source \
           IP of spec.sourceIP.",
    label("app.kubernetes.io/managed-by", "egressd"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.sourceIP.mode"),
    printcolumn(
        name = "Active",
        type_ = "string",
        description = "The node that holds the gateway now.",
        json_path = ".status.activeNodeName"
    ),
    printcolumn(
        name = "Ready Nodes",
        type_ = "integer",
        description = "Nodes ready to take the gateway over.",
        json_path = ".status.readyNodes"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewaySpec {
    /// Every key/value must be among a node's labels; an empty value matches an empty value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(rename = "sourceIP")]
    pub source_ip: SourceIp,
}

/// `spec.sourceIP`: the mode, and the settings object of that mode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SourceIp {
    pub mode: SourceIpMode,
    #[serde(
        rename = "virtualIPAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub virtual_ip_address: Option<VirtualIpAddress>,
    #[serde(
        rename = "primaryIPFromEgressGatewayNodeInterface",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub primary_ip_from_egress_gateway_node_interface: Option<PrimaryIpFromInterface>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SourceIpMode {
    /// The active node holds `virtualIPAddress.ip` and SNATs to it: the source IP survives a
    /// failover.
    VirtualIPAddress,
    /// SNAT to the primary IPv4 address of `interfaceName` on the active node.
    PrimaryIPFromEgressGatewayNodeInterface,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct VirtualIpAddress {
    /// The virtual source IP address.
    pub ip: String,
    /// The interfaces the active node holds the address on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrimaryIpFromInterface {
    /// The interface (the same name on every node of the gateway) whose primary IPv4 address
    /// is the source IP.
    pub interface_name: String,
}

/// What the gateway's controller reports: Deckhouse's fields, so `kubectl get egressgateways`
/// reads the same with either.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes ready to perform the gateway's function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<i64>,
    /// The node active now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition as Deckhouse writes it: Kubernetes' `metav1.Condition` plus `lastHeartbeatTime`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready` for a gateway.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// CamelCase; for a gateway's `Ready`: ElectionSucceedAndVirtualIPAnnounced,
    /// ElectionSucceed, ElectionFailed or VirtualIPAnnouncingFailed.
    pub reason: String,
    pub message: String,
    pub last_transition_time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The type of the gateway's one condition.
pub const READY: &str = "Ready";

/// The reasons Deckhouse gives for a gateway's `Ready` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyReason {
    /// VirtualIPAddress mode: a node is active and holds and announces the address.
    ElectionSucceedAndVirtualIPAnnounced,
    /// PrimaryIPFromEgressGatewayNodeInterface mode: a node is active.
    ElectionSucceed,
    /// No node could be made active.
    ElectionFailed,
    /// A node is active but the virtual address is not announced.
    VirtualIPAnnouncingFailed,
}

impl ReadyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyReason::ElectionSucceedAndVirtualIPAnnounced => {
                "ElectionSucceedAndVirtualIPAnnounced"
            }
            ReadyReason::ElectionSucceed => "ElectionSucceed",
            ReadyReason::ElectionFailed => "ElectionFailed",
            ReadyReason::VirtualIPAnnouncingFailed => "VirtualIPAnnouncingFailed",
        }
    }

    /// The condition's status that goes with the reason.
    pub fn status(self) -> &'static str {
        match self {
            ReadyReason::ElectionSucceedAndVirtualIPAnnounced | ReadyReason::ElectionSucceed => {
                "True"
            }
            ReadyReason::ElectionFailed | ReadyReason::VirtualIPAnnouncingFailed => "False",
        }
    }
}

/// Traffic of the selected pods to `destinationCIDRs` (less `excludedCIDRs`) leaves through the
/// gateway `egressGatewayName`.
#[allow(clippy::duplicated_attributes)] // as for EgressGatewaySpec
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "network.deckhouse.io",
    version = "v1alpha1",
    kind = "EgressGatewayPolicy",
    plural = "egressgatewaypolicies",
    status = "EgressGatewayPolicyStatus",
    derive = "PartialEq",
    doc = "Sends the traffic of the selected pods to destinationCIDRs (less excludedCIDRs) \
           through the EgressGateway egressGatewayName.",
    label("app.kubernetes.io/managed-by", "egressd"),
    printcolumn(
        name = "Gateway",
        type_ = "string",
        json_path = ".spec.egressGatewayName"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayPolicySpec {
    /// The EgressGateway whose active node sends the traffic.
    pub egress_gateway_name: String,
    /// Traffic to these networks leaves through the gateway.
    #[serde(rename = "destinationCIDRs", default)]
    pub destination_cidrs: Vec<String>,
    /// Ranges left out of `destinationCIDRs`.
    #[serde(
        rename = "excludedCIDRs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub excluded_cidrs: Vec<String>,
    /// The pods whose traffic the policy sends; the namespace is the pseudo-label
    /// `io.kubernetes.pod.namespace`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<PodSelectorTerm>,
}

/// One element of `spec.selectors`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelectorTerm {
    pub pod_selector: LabelSelector,
}

/// No fields, as in Deckhouse, which has the status subresource all the same.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct EgressGatewayPolicyStatus {}
