//! The replicated state machine's data and its pure `apply`.
//!
//! Sized for 100 000 policies: the object maps are persistent (`imbl`), so that the copy each
//! command takes (to refuse a change whole) and the copies readers hold cost nothing, and a
//! change of a few objects costs a few map updates. Commands carry changes, never the whole
//! object set; a large change arrives in parts (`Stage`) and is applied, or refused whole, by a
//! small `Commit`. The configuration rules are checked for the changed objects only, against the
//! committed set.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use imbl::ordmap::DiffItem;
use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};

use crate::model::{Assignment, Gateway, Labels, NodeName, Policy};
use ipnet::IpNet;

/// Everything the cluster agrees on. Every node applies the same commands in the same order and
/// so holds the same value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    #[serde(deserialize_with = "cautious::ord_map")]
    pub gateways: OrdMap<String, Gateway>,
    #[serde(deserialize_with = "cautious::ord_map")]
    pub policies: OrdMap<String, Arc<Policy>>,
    /// Objects written through the admin API (`egressd apply`). A configuration file changes
    /// only the file's objects and never overwrites these.
    #[serde(deserialize_with = "cautious::ord_set")]
    pub api_objects: OrdSet<ObjectRef>,
    /// Whether any node's configuration file has seeded the objects yet (see `SeedObjects`).
    pub seeded: bool,
    /// Per node, the digest of the gateways and policies of the file it last applied.
    pub file_digests: BTreeMap<NodeName, String>,
    /// Labels set at runtime, per node: `Some(value)` sets a label, `None` removes one that the
    /// node's config file sets. Combined with the file's labels by `effective_labels`.
    pub label_overrides: BTreeMap<NodeName, BTreeMap<String, Option<String>>>,
    pub cordoned: BTreeSet<NodeName>,
    /// The committed assignment: which node may be active for each gateway.
    pub assignment: Assignment,
    /// Bumped on every assignment change of a gateway; lets nodes and logs tell changes apart.
    pub epochs: BTreeMap<String, u64>,
    /// Per gateway: failovers, handovers, and since when the active node holds it.
    pub stats: BTreeMap<String, GatewayStats>,
    /// The desired cluster members, name → peer address. The leader moves Raft's membership
    /// towards it (the first five by name vote, the others are learners).
    pub members: BTreeMap<NodeName, String>,
    /// Parts of large changes not committed yet, by transaction.
    pub staging: BTreeMap<u64, Staged>,
    /// The cluster's identity (`InitCluster`), carried by every peer request: a node of another
    /// cluster is refused. `None` until the first leader of a new cluster has committed one.
    /// Last, and defaulted, so that a snapshot written before it existed still reads.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Objects imported from Kubernetes (origin `kubernetes`, see `KubeObjects`): they win over
    /// a file or API object of the same name, and `egressd apply`/`delete` refuse to change
    /// them. Defaulted, after the older fields, so that older snapshots read.
    #[serde(default, deserialize_with = "cautious::ord_set")]
    pub kube_objects: OrdSet<ObjectRef>,
    /// What the Kubernetes Node of each member says (see `KubeNodes`).
    #[serde(default)]
    pub kube_nodes: BTreeMap<NodeName, KubeNode>,
    /// The newest command format every member was known to read (`ClusterFormat`): commands
    /// up to it are proposed without waiting for every member to report to a new leader.
    /// Defaulted, last, so that older snapshots read.
    #[serde(default)]
    pub cluster_format: u16,
}

/// What egressd takes from the Kubernetes Node of the same name as a member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeNode {
    /// The Node's labels: matched by `node_selector` over the file's labels (a key in both
    /// takes the Node's value); `egressd node label` overrides still come last.
    pub labels: Labels,
    /// `spec.unschedulable` (`kubectl cordon`): cordoned for that reason until Kubernetes
    /// uncordons it, whatever `egressd node uncordon` says.
    pub unschedulable: bool,
}

/// Who wrote an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File,
    Api,
    Kubernetes,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::File => "file",
            Origin::Api => "api",
            Origin::Kubernetes => "kubernetes",
        }
    }
}

/// Decoding of the state's persistent maps without trusting the length a map or set announces.
/// imbl's own deserializers reserve room for as many entries as the header claims, so a snapshot
/// of 13 bytes (a MessagePack map32 header claiming 3.7 billion gateways) made the process try
/// to allocate 660 GB and abort — from a snapshot a peer sends or a damaged store (found by the
/// `peer_rpc` fuzz target; regression test `a_map_header_claiming_billions_is_an_error`). These
/// insert entry by entry as they arrive.
mod cautious {
    use std::fmt;
    use std::marker::PhantomData;

    use imbl::{OrdMap, OrdSet};
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    struct MapVisitor<K, V>(PhantomData<(K, V)>);

    impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
    where
        K: Deserialize<'de> + Ord + Clone,
        V: Deserialize<'de> + Clone,
    {
        type Value = OrdMap<K, V>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut map = OrdMap::new();
            while let Some((k, v)) = access.next_entry()? {
                map.insert(k, v);
            }
            Ok(map)
        }
    }

    pub fn ord_map<'de, D, K, V>(d: D) -> Result<OrdMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord + Clone,
        V: Deserialize<'de> + Clone,
    {
        d.deserialize_map(MapVisitor(PhantomData))
    }

    struct SetVisitor<T>(PhantomData<T>);

    impl<'de, T> Visitor<'de> for SetVisitor<T>
    where
        T: Deserialize<'de> + Ord + Clone,
    {
        type Value = OrdSet<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a sequence")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut set = OrdSet::new();
            while let Some(v) = access.next_element()? {
                set.insert(v);
            }
            Ok(set)
        }
    }

    pub fn ord_set<'de, D, T>(d: D) -> Result<OrdSet<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Ord + Clone,
    {
        d.deserialize_seq(SetVisitor(PhantomData))
    }
}

/// The parts of a change staged so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    /// Shared, so that the copy of the state each command takes costs nothing per staged part
    /// (a copy of 200 staged parts of 500 policies each, per part, made staging quadratic).
    pub parts: Vec<Arc<Command>>,
    /// Log index of the first part: a transaction abandoned for `STAGE_TTL` entries is dropped.
    pub since: u64,
}

/// The refusal of an `apply` or `delete` of objects imported from Kubernetes.
fn kube_owned(what: &str) -> String {
    format!(
        "{what}: owned by Kubernetes (imported from an EgressGateway/EgressGatewayPolicy); \
         change or delete it with kubectl — egressd apply/delete do not change \
         Kubernetes-owned objects"
    )
}

/// Entries after which an uncommitted transaction is dropped (its proposer gave up).
pub const STAGE_TTL: u64 = 100_000;

/// A gateway or a policy, by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ObjectRef {
    Gateway(String),
    Policy(String),
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectRef::Gateway(n) => write!(f, "gateway {n}"),
            ObjectRef::Policy(n) => write!(f, "policy {n}"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStats {
    /// Moves away from an active node that went silent.
    pub failovers: u64,
    /// How long the last failed node had been silent when the leader moved its gateway (ms).
    pub last_failover_detect_ms: Option<u64>,
    /// Planned moves: the active node was alive but no longer the choice.
    pub handovers: u64,
    /// When the current active node was assigned (leader's clock, ms since the Unix epoch).
    pub active_since_unix_ms: Option<u64>,
}

/// Why the leader changes a gateway's active node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// Nobody held the gateway (or the release was confirmed): the election's choice gets it.
    Elected,
    /// The active node went silent for `silent_ms`; its lease has run out.
    Failover { from: NodeName, silent_ms: u64 },
    /// The active node is alive but no longer the choice (`why`): it releases first.
    Handover { from: NodeName, why: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignChange {
    pub gateway: String,
    pub to: Option<NodeName>,
    pub reason: Reason,
}

/// A change to the cluster state, committed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Objects from a node's configuration file at start-up: applied only if no file has seeded
    /// the cluster yet, so that restarting a node with an old file does not undo runtime changes.
    SeedObjects {
        gateways: Vec<Gateway>,
        policies: Vec<Policy>,
    },
    /// A node's configuration file changed (a reload): these file objects are created or
    /// replaced, these are deleted. Objects written through the API stay, and win over a file
    /// object of the same name. `digest` is that of the whole file's objects.
    FileObjects {
        node: NodeName,
        gateways: Vec<Gateway>,
        policies: Vec<Policy>,
        delete_gateways: Vec<String>,
        delete_policies: Vec<String>,
        digest: String,
    },
    /// `egressd apply`: creates or replaces these objects in one step. Refused, changing
    /// nothing, if a policy would name a gateway that does not exist.
    Apply {
        gateways: Vec<Gateway>,
        policies: Vec<Policy>,
    },
    /// Refused while a policy names the gateway.
    DeleteGateway(String),
    DeletePolicy(String),
    Cordon(NodeName),
    Uncordon(NodeName),
    /// `value: None` removes the label.
    SetLabel {
        node: NodeName,
        key: String,
        value: Option<String>,
    },
    /// Set (or clear) the active node of gateways; `at_unix_ms` is the leader's clock.
    Assign {
        changes: Vec<AssignChange>,
        at_unix_ms: u64,
    },
    /// The member list of a node's file at start-up: applied only while none is known.
    SeedMembers(Vec<(NodeName, String)>),
    /// Replace the desired member list (a reloaded `cluster.peers`, or the admin API).
    SetMembers(Vec<(NodeName, String)>),
    /// Part `part` of a large object change (`SeedObjects`, `FileObjects` or `Apply`): kept,
    /// not applied.
    Stage {
        txn: u64,
        part: u32,
        command: Box<Command>,
    },
    /// Applies the `parts` staged parts of `txn` as one command, or refuses them whole.
    Commit {
        txn: u64,
        parts: u32,
    },
    // ---- command format 2 (see `Command::format`); new kinds go below, never above ----
    /// The cluster's identity, chosen by the first leader of a new cluster: applied only while
    /// the state has none.
    InitCluster {
        id: String,
    },
    /// `egressd member add`: a new member; the leader adds it to Raft (a learner first, a voter
    /// once it has caught up, if it is among the first five by name).
    AddMember {
        name: NodeName,
        address: String,
    },
    /// `egressd member remove`: the leader takes it out of Raft.
    RemoveMember {
        name: NodeName,
    },
    // ---- command format 3 ----
    /// The Kubernetes adapter (on the leader): these objects imported from Kubernetes are
    /// created or replaced (winning over a file or API object of the same name), these
    /// deleted. Changes only, never the whole set; refused whole if a rule breaks.
    KubeObjects {
        gateways: Vec<Gateway>,
        policies: Vec<Policy>,
        delete_gateways: Vec<String>,
        delete_policies: Vec<String>,
    },
    /// The Kubernetes adapter: what the Nodes of these members say now (`None`: the member has
    /// no Node any more).
    KubeNodes(Vec<(NodeName, Option<KubeNode>)>),
    // ---- command format 4 ----
    /// More CIDRs of a policy too large for one entry (100 000 destinations encode to more
    /// than a megabyte): only a part of a staged change, after the part that carries the
    /// policy itself; the commit appends them to it.
    PolicyCidrs {
        policy: String,
        source_cidrs: Vec<IpNet>,
        destination_cidrs: Vec<IpNet>,
        excluded_cidrs: Vec<IpNet>,
    },
    // ---- command format 5 ----
    /// Every member has reported that it reads this command format: from now on the leader
    /// proposes commands up to it without waiting for each member to report to it again (a
    /// member that is down after a change of leader no longer holds them up). Only raises.
    ClusterFormat(u16),
    // ---- command format 6 ----
    /// `egressd policy add-cidrs` / `remove-cidrs`: CIDRs added to and removed from one
    /// existing policy, without sending the policy (one CIDR of a 100 000-CIDR allow-list is a
    /// few bytes, not megabytes in many entries). Removals first; a CIDR already listed is not
    /// added twice, one not listed is not removed. The policy becomes an API object, as with
    /// `apply`; refused, changing nothing, if the policy does not exist, is Kubernetes-owned,
    /// or a required list would end up empty.
    EditPolicyCidrs {
        policy: String,
        add: CidrLists,
        remove: CidrLists,
    },
}

/// The three CIDR lists of a policy, as a change to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CidrLists {
    pub source_cidrs: Vec<IpNet>,
    pub destination_cidrs: Vec<IpNet>,
    pub excluded_cidrs: Vec<IpNet>,
}

impl CidrLists {
    /// The three lists with their keys, in the order of a policy's fields.
    pub fn named(&self) -> [(&'static str, &[IpNet]); 3] {
        [
            ("source_cidrs", &self.source_cidrs),
            ("destination_cidrs", &self.destination_cidrs),
            ("excluded_cidrs", &self.excluded_cidrs),
        ]
    }

    /// `policy`'s lists with `remove`'s CIDRs taken out and then `add`'s appended (those not
    /// listed yet), in order.
    pub fn edit(policy: &Policy, add: &CidrLists, remove: &CidrLists) -> Policy {
        // Every node applies this: a few CIDRs against 100 000 are compared one by one (a
        // hash set of the whole list would cost more than the edit).
        const FEW: usize = 16;
        fn one(list: &[IpNet], add: &[IpNet], remove: &[IpNet]) -> Vec<IpNet> {
            let mut out: Vec<IpNet> = if remove.is_empty() {
                list.to_vec()
            } else if remove.len() <= FEW {
                list.iter()
                    .filter(|n| !remove.contains(n))
                    .copied()
                    .collect()
            } else {
                let gone: std::collections::HashSet<&IpNet> = remove.iter().collect();
                list.iter().filter(|n| !gone.contains(n)).copied().collect()
            };
            if add.len() <= FEW {
                for n in add {
                    if !out.contains(n) {
                        out.push(*n);
                    }
                }
            } else {
                let mut have: std::collections::HashSet<IpNet> = out.iter().copied().collect();
                out.extend(add.iter().filter(|n| have.insert(**n)));
            }
            out
        }
        Policy {
            name: policy.name.clone(),
            egress_gateway_name: policy.egress_gateway_name.clone(),
            source_cidrs: one(
                &policy.source_cidrs,
                &add.source_cidrs,
                &remove.source_cidrs,
            ),
            destination_cidrs: one(
                &policy.destination_cidrs,
                &add.destination_cidrs,
                &remove.destination_cidrs,
            ),
            excluded_cidrs: one(
                &policy.excluded_cidrs,
                &add.excluded_cidrs,
                &remove.excluded_cidrs,
            ),
        }
    }
}

/// The oldest command format any peer can have: the versions before mutual TLS wrote format 1,
/// and this version's peer protocol (mutual TLS) cannot talk to them, so a cluster that runs
/// this version has no node older than format 2.
pub const BASELINE_FORMAT: u16 = 2;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// False when the command changed nothing (e.g. a seed after the cluster was seeded).
    pub changed: bool,
    /// Why the command was refused; a refused command changes nothing.
    pub refused: Option<String>,
    /// The log index of the entry (set by the store): a node that forwarded the command waits
    /// until it has applied this far, so that its own reads see the change.
    pub index: u64,
}

/// What an object change did, for its event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    added_g: usize,
    removed_g: usize,
    changed_g: usize,
    added_p: usize,
    removed_p: usize,
    changed_p: usize,
}

impl Counts {
    fn any(&self) -> bool {
        *self != Counts::default()
    }
}

/// The objects an object change touched, for the rules.
#[derive(Debug, Default)]
struct Touched {
    gateways: BTreeSet<String>,
    policies: BTreeSet<String>,
    removed_gateways: BTreeSet<String>,
}

impl Command {
    /// The command format that introduced this kind of command: a node that reads only older
    /// formats cannot read it (see `codec::Versioned`), so it is proposed only once every
    /// member has reported that it knows this format (`ClusterNode::propose`). A change to an
    /// existing kind's encoding is a new kind.
    pub fn format(&self) -> u16 {
        match self {
            Command::Stage { command, .. } => command.format(),
            Command::InitCluster { .. }
            | Command::AddMember { .. }
            | Command::RemoveMember { .. } => 2,
            Command::KubeObjects { .. } | Command::KubeNodes(_) => 3,
            Command::PolicyCidrs { .. } => 4,
            Command::ClusterFormat(_) => 5,
            Command::EditPolicyCidrs { .. } => 6,
            Command::SeedObjects { .. }
            | Command::FileObjects { .. }
            | Command::Apply { .. }
            | Command::DeleteGateway(_)
            | Command::DeletePolicy(_)
            | Command::Cordon(_)
            | Command::Uncordon(_)
            | Command::SetLabel { .. }
            | Command::Assign { .. }
            | Command::SeedMembers(_)
            | Command::SetMembers(_)
            | Command::Commit { .. } => 1,
        }
    }

    /// A short name of the command's kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::SeedObjects { .. } => "seed objects",
            Command::FileObjects { .. } => "file objects",
            Command::Apply { .. } => "apply",
            Command::DeleteGateway(_) => "delete gateway",
            Command::DeletePolicy(_) => "delete policy",
            Command::Cordon(_) => "cordon",
            Command::Uncordon(_) => "uncordon",
            Command::SetLabel { .. } => "label",
            Command::Assign { .. } => "assign",
            Command::SeedMembers(_) => "seed members",
            Command::SetMembers(_) => "set members",
            Command::Stage { .. } => "stage",
            Command::Commit { .. } => "commit",
            Command::InitCluster { .. } => "init cluster",
            Command::AddMember { .. } => "member add",
            Command::RemoveMember { .. } => "member remove",
            Command::KubeObjects { .. } => "kubernetes objects",
            Command::KubeNodes(_) => "kubernetes nodes",
            Command::PolicyCidrs { .. } => "policy cidrs",
            Command::ClusterFormat(_) => "cluster format",
            Command::EditPolicyCidrs { .. } => "policy cidrs edit",
        }
    }

    /// Whether this is an object change that may be split into parts.
    pub fn is_object_change(&self) -> bool {
        matches!(
            self,
            Command::SeedObjects { .. }
                | Command::FileObjects { .. }
                | Command::Apply { .. }
                | Command::KubeObjects { .. }
        )
    }

    /// The objects it carries (gateways, policies, deletions).
    pub fn object_count(&self) -> usize {
        match self {
            Command::SeedObjects { gateways, policies } | Command::Apply { gateways, policies } => {
                gateways.len() + policies.len()
            }
            Command::FileObjects {
                gateways,
                policies,
                delete_gateways,
                delete_policies,
                ..
            }
            | Command::KubeObjects {
                gateways,
                policies,
                delete_gateways,
                delete_policies,
            } => gateways.len() + policies.len() + delete_gateways.len() + delete_policies.len(),
            _ => 1,
        }
    }

    /// Splits an object change into parts of at most `per_part` objects each (gateways and
    /// deletions travel in the first part). Other commands come back whole.
    pub fn split(self, per_part: usize) -> Vec<Command> {
        let per_part = per_part.max(1);
        if !self.is_object_change() || self.object_count() <= per_part {
            return vec![self];
        }
        let chunks = |policies: Vec<Policy>| -> Vec<Vec<Policy>> {
            let mut out = Vec::new();
            let mut it = policies.into_iter().peekable();
            while it.peek().is_some() {
                out.push(it.by_ref().take(per_part).collect());
            }
            out
        };
        match self {
            Command::SeedObjects { gateways, policies } => {
                let mut parts: Vec<Command> = chunks(policies)
                    .into_iter()
                    .map(|p| Command::SeedObjects {
                        gateways: vec![],
                        policies: p,
                    })
                    .collect();
                parts.insert(
                    0,
                    Command::SeedObjects {
                        gateways,
                        policies: vec![],
                    },
                );
                parts
            }
            Command::Apply { gateways, policies } => {
                let mut parts: Vec<Command> = chunks(policies)
                    .into_iter()
                    .map(|p| Command::Apply {
                        gateways: vec![],
                        policies: p,
                    })
                    .collect();
                parts.insert(
                    0,
                    Command::Apply {
                        gateways,
                        policies: vec![],
                    },
                );
                parts
            }
            Command::FileObjects {
                node,
                gateways,
                policies,
                delete_gateways,
                delete_policies,
                digest,
            } => {
                let mut parts: Vec<Command> = chunks(policies)
                    .into_iter()
                    .map(|p| Command::FileObjects {
                        node: node.clone(),
                        gateways: vec![],
                        policies: p,
                        delete_gateways: vec![],
                        delete_policies: vec![],
                        digest: digest.clone(),
                    })
                    .collect();
                parts.insert(
                    0,
                    Command::FileObjects {
                        node,
                        gateways,
                        policies: vec![],
                        delete_gateways,
                        delete_policies,
                        digest,
                    },
                );
                parts
            }
            Command::KubeObjects {
                gateways,
                policies,
                delete_gateways,
                delete_policies,
            } => {
                let mut parts: Vec<Command> = chunks(policies)
                    .into_iter()
                    .map(|p| Command::KubeObjects {
                        gateways: vec![],
                        policies: p,
                        delete_gateways: vec![],
                        delete_policies: vec![],
                    })
                    .collect();
                parts.insert(
                    0,
                    Command::KubeObjects {
                        gateways,
                        policies: vec![],
                        delete_gateways,
                        delete_policies,
                    },
                );
                parts
            }
            other => vec![other],
        }
    }

    /// The parts of a split object change, merged back into one command; `None` when they are
    /// not parts of one object change of one kind.
    pub fn merge(parts: Vec<Command>) -> Option<Command> {
        let mut it = parts.into_iter();
        let mut acc = it.next()?;
        for p in it {
            match (&mut acc, p) {
                (
                    Command::SeedObjects { gateways, policies },
                    Command::SeedObjects {
                        gateways: g,
                        policies: p,
                    },
                )
                | (
                    Command::Apply { gateways, policies },
                    Command::Apply {
                        gateways: g,
                        policies: p,
                    },
                ) => {
                    gateways.extend(g);
                    policies.extend(p);
                }
                (
                    Command::FileObjects {
                        node,
                        gateways,
                        policies,
                        delete_gateways,
                        delete_policies,
                        digest,
                    },
                    Command::FileObjects {
                        node: n,
                        gateways: g,
                        policies: p,
                        delete_gateways: dg,
                        delete_policies: dp,
                        digest: d,
                    },
                ) if *node == n && *digest == d => {
                    gateways.extend(g);
                    policies.extend(p);
                    delete_gateways.extend(dg);
                    delete_policies.extend(dp);
                }
                (
                    Command::KubeObjects {
                        gateways,
                        policies,
                        delete_gateways,
                        delete_policies,
                    },
                    Command::KubeObjects {
                        gateways: g,
                        policies: p,
                        delete_gateways: dg,
                        delete_policies: dp,
                    },
                ) => {
                    gateways.extend(g);
                    policies.extend(p);
                    delete_gateways.extend(dg);
                    delete_policies.extend(dp);
                }
                (
                    acc,
                    Command::PolicyCidrs {
                        policy,
                        source_cidrs,
                        destination_cidrs,
                        excluded_cidrs,
                    },
                ) => {
                    let p = acc
                        .policies_mut()?
                        .iter_mut()
                        .rev()
                        .find(|p| p.name == policy)?;
                    p.source_cidrs.extend(source_cidrs);
                    p.destination_cidrs.extend(destination_cidrs);
                    p.excluded_cidrs.extend(excluded_cidrs);
                }
                _ => return None,
            }
        }
        acc.is_object_change().then_some(acc)
    }

    /// The policies an object change creates or replaces.
    fn policies_mut(&mut self) -> Option<&mut Vec<Policy>> {
        match self {
            Command::SeedObjects { policies, .. }
            | Command::Apply { policies, .. }
            | Command::FileObjects { policies, .. }
            | Command::KubeObjects { policies, .. } => Some(policies),
            _ => None,
        }
    }

    /// Moves the CIDRs beyond the first `per_part` of every policy that has more into
    /// [`Command::PolicyCidrs`] commands of at most `per_part` CIDRs each, to be staged after
    /// the parts of this change (see [`Command::merge`]). Returns them; empty when no policy is
    /// that large.
    pub fn cut_large_policies(&mut self, per_part: usize) -> Vec<Command> {
        let per_part = per_part.max(1);
        let Some(policies) = self.policies_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for p in policies.iter_mut() {
            let total = p.source_cidrs.len() + p.destination_cidrs.len() + p.excluded_cidrs.len();
            if total <= per_part {
                continue;
            }
            // The policy keeps one CIDR of each list it has (so that its part passes the
            // shape checks a follower may make), the rest travels in fragments.
            let rest = |v: &mut Vec<IpNet>| {
                if v.len() > 1 {
                    v.split_off(1)
                } else {
                    Vec::new()
                }
            };
            let mut lists = [
                rest(&mut p.source_cidrs),
                rest(&mut p.destination_cidrs),
                rest(&mut p.excluded_cidrs),
            ];
            while lists.iter().any(|l| !l.is_empty()) {
                let mut room = per_part;
                let mut take = |l: &mut Vec<IpNet>| {
                    let n = l.len().min(room);
                    room -= n;
                    let tail = l.split_off(n);
                    std::mem::replace(l, tail)
                };
                let [s, d, e] = &mut lists;
                out.push(Command::PolicyCidrs {
                    policy: p.name.clone(),
                    source_cidrs: take(s),
                    destination_cidrs: take(d),
                    excluded_cidrs: take(e),
                });
            }
        }
        out
    }
}

impl ClusterState {
    pub fn apply(&mut self, cmd: &Command) -> CommandResponse {
        self.apply_described(cmd, 0).0
    }

    /// `apply` of the entry at log `index`, and what the change was, for the event list.
    pub fn apply_described(
        &mut self,
        cmd: &Command,
        index: u64,
    ) -> (CommandResponse, Vec<EventDraft>) {
        let refuse = |why: String| {
            (
                CommandResponse {
                    changed: false,
                    refused: Some(why),
                    index: 0,
                },
                Vec::new(),
            )
        };
        if let Err(why) = self.check(cmd) {
            return refuse(why);
        }
        let ok = |changed: bool, events: Vec<EventDraft>| {
            (
                CommandResponse {
                    changed,
                    refused: None,
                    index: 0,
                },
                events,
            )
        };
        match cmd {
            Command::Stage { txn, part, command } => {
                self.staging
                    .retain(|_, s| s.since.saturating_add(STAGE_TTL) >= index);
                if !command.is_object_change() && !matches!(**command, Command::PolicyCidrs { .. })
                {
                    return refuse("only object changes can be staged".into());
                }
                let staged = self.staging.entry(*txn).or_insert_with(|| Staged {
                    parts: Vec::new(),
                    since: index,
                });
                if staged.parts.len() as u64 != u64::from(*part) {
                    let have = staged.parts.len();
                    self.staging.remove(txn);
                    return refuse(format!(
                        "transaction {txn:x}: part {part} arrived after {have} parts; dropped"
                    ));
                }
                staged.parts.push(Arc::new((**command).clone()));
                ok(false, Vec::new())
            }
            Command::Commit { txn, parts } => {
                let Some(staged) = self.staging.remove(txn) else {
                    return refuse(format!("transaction {txn:x}: nothing staged"));
                };
                if staged.parts.len() as u64 != u64::from(*parts) {
                    return refuse(format!(
                        "transaction {txn:x}: {} of {parts} parts staged",
                        staged.parts.len()
                    ));
                }
                let parts = staged.parts.into_iter().map(Arc::unwrap_or_clone).collect();
                let Some(merged) = Command::merge(parts) else {
                    return refuse(format!("transaction {txn:x}: parts of different changes"));
                };
                self.apply_described(&merged, index)
            }
            Command::SeedObjects { .. }
            | Command::FileObjects { .. }
            | Command::Apply { .. }
            | Command::KubeObjects { .. } => match self.apply_objects(cmd, None) {
                Ok((changed, events)) => ok(changed, events),
                Err(why) => refuse(why),
            },
            Command::PolicyCidrs { policy, .. } => refuse(format!(
                "CIDRs of policy {policy}: only a part of a staged change, after the policy"
            )),
            Command::EditPolicyCidrs {
                policy,
                add,
                remove,
            } => {
                let Some(old) = self.policies.get(policy) else {
                    return refuse(format!("no policy named {policy:?}"));
                };
                let new = CidrLists::edit(old, add, remove);
                if new == **old {
                    return ok(false, Vec::new());
                }
                for (list, at) in [
                    (&new.source_cidrs, "source_cidrs"),
                    (&new.destination_cidrs, "destination_cidrs"),
                ] {
                    if list.is_empty() {
                        return refuse(format!(
                            "policy {policy}: the change would leave {at} empty; list at least \
                             one CIDR (0.0.0.0/0 or ::/0 for everything), or delete the policy"
                        ));
                    }
                }
                // Only the added CIDRs are new to the lists: removing keeps a list well-formed,
                // and what is added is appended when not listed yet.
                for (at, list) in add.named() {
                    if let Some(bad) = crate::config::rules::cidrs(list.iter().enumerate(), at)
                        .into_iter()
                        .next()
                    {
                        return refuse(format!(
                            "policy {policy}: added {}: {}",
                            bad.key, bad.message
                        ));
                    }
                }
                // From here on it is an `apply` of the edited policy: the same ownership, rules
                // (but the whole lists' checks) and event.
                let cmd = Command::Apply {
                    gateways: Vec::new(),
                    policies: vec![new],
                };
                match self.apply_objects(&cmd, Some(policy)) {
                    Ok((changed, events)) => ok(changed, events),
                    Err(why) => refuse(why),
                }
            }
            _ => {
                let events = self.apply_small(cmd);
                ok(!events.is_empty(), events)
            }
        }
    }

    /// Applies an object change whose rules hold (or changes nothing and says why not): whether
    /// anything changed, and the event. `lists_checked` names a policy whose CIDR lists are known
    /// to be well-formed (see `rules::objects_with`).
    fn apply_objects(
        &mut self,
        cmd: &Command,
        lists_checked: Option<&str>,
    ) -> Result<(bool, Vec<EventDraft>), String> {
        let before = self.clone();
        let mut counts = Counts::default();
        let mut touched = Touched::default();
        let digest_changed = self.change_objects(cmd, &mut counts, &mut touched);
        if let Err(why) = self.check_rules(&touched, lists_checked) {
            *self = before;
            return Err(why);
        }
        let what = match cmd {
            Command::SeedObjects { .. } => "seeded from a file",
            Command::FileObjects { .. } => "configuration file reloaded",
            Command::KubeObjects { .. } => "imported from Kubernetes",
            _ => "applied",
        };
        let changed = counts.any() || digest_changed;
        let events = if counts.any() {
            vec![EventDraft {
                kind: EventKind::Config,
                node: None,
                gateway: None,
                message: format!(
                    "{what}: gateways +{} -{} ~{}, policies +{} -{} ~{} (now {} gateways, \
                     {} policies)",
                    counts.added_g,
                    counts.removed_g,
                    counts.changed_g,
                    counts.added_p,
                    counts.removed_p,
                    counts.changed_p,
                    self.gateways.len(),
                    self.policies.len()
                ),
            }]
        } else {
            Vec::new()
        };
        Ok((changed, events))
    }

    /// Applies an object change without checking it; returns whether a file digest changed.
    fn change_objects(
        &mut self,
        cmd: &Command,
        counts: &mut Counts,
        touched: &mut Touched,
    ) -> bool {
        let (gateways, policies, del_g, del_p, origin) = match cmd {
            Command::SeedObjects { gateways, policies } => {
                if self.seeded {
                    return false;
                }
                self.seeded = true;
                (gateways, policies, &[][..], &[][..], Origin::File)
            }
            Command::KubeObjects {
                gateways,
                policies,
                delete_gateways,
                delete_policies,
            } => (
                gateways,
                policies,
                &delete_gateways[..],
                &delete_policies[..],
                Origin::Kubernetes,
            ),
            Command::FileObjects {
                node,
                gateways,
                policies,
                delete_gateways,
                delete_policies,
                digest,
            } => {
                self.seeded = true;
                let old = self.file_digests.insert(node.clone(), digest.clone());
                let digest_changed = old.as_ref() != Some(digest);
                self.change_lists(
                    gateways,
                    policies,
                    delete_gateways,
                    delete_policies,
                    Origin::File,
                    counts,
                    touched,
                );
                return digest_changed;
            }
            Command::Apply { gateways, policies } => {
                (gateways, policies, &[][..], &[][..], Origin::Api)
            }
            _ => return false,
        };
        self.change_lists(gateways, policies, del_g, del_p, origin, counts, touched);
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn change_lists(
        &mut self,
        gateways: &[Gateway],
        policies: &[Policy],
        delete_gateways: &[String],
        delete_policies: &[String],
        origin: Origin,
        counts: &mut Counts,
        touched: &mut Touched,
    ) {
        // A file never touches what the API or Kubernetes wrote; the API never touches what
        // Kubernetes wrote (`check` refuses such an apply); Kubernetes wins over both.
        let mine = |s: &ClusterState, r: &ObjectRef| match origin {
            Origin::Kubernetes => true,
            Origin::Api => !s.kube_objects.contains(r),
            Origin::File => !s.api_objects.contains(r) && !s.kube_objects.contains(r),
        };
        let kube = origin == Origin::Kubernetes;
        let api = origin == Origin::Api;
        // Kubernetes deletes only what it imported.
        let deletable = |s: &ClusterState, r: &ObjectRef| {
            if kube {
                s.kube_objects.contains(r)
            } else {
                mine(s, r)
            }
        };
        for name in delete_policies {
            let r = ObjectRef::Policy(name.clone());
            if deletable(self, &r) && self.policies.remove(name).is_some() {
                counts.removed_p += 1;
            }
            if kube {
                self.kube_objects.remove(&r);
            }
        }
        for name in delete_gateways {
            let r = ObjectRef::Gateway(name.clone());
            if deletable(self, &r) && self.gateways.remove(name).is_some() {
                counts.removed_g += 1;
                touched.removed_gateways.insert(name.clone());
            }
            if kube {
                self.kube_objects.remove(&r);
            }
        }
        for g in gateways {
            let r = ObjectRef::Gateway(g.name.clone());
            if !mine(self, &r) {
                continue;
            }
            match self.gateways.get(&g.name) {
                Some(old) if old == g => {}
                Some(_) => counts.changed_g += 1,
                None => counts.added_g += 1,
            }
            if self.gateways.get(&g.name) != Some(g) {
                self.gateways.insert(g.name.clone(), g.clone());
                touched.gateways.insert(g.name.clone());
            }
            if api {
                self.api_objects.insert(r);
            } else if kube {
                self.api_objects.remove(&r);
                self.kube_objects.insert(r);
            }
        }
        for p in policies {
            let r = ObjectRef::Policy(p.name.clone());
            if !mine(self, &r) {
                continue;
            }
            match self.policies.get(&p.name) {
                Some(old) if **old == *p => {}
                Some(_) => counts.changed_p += 1,
                None => counts.added_p += 1,
            }
            if self.policies.get(&p.name).is_none_or(|o| **o != *p) {
                self.policies.insert(p.name.clone(), Arc::new(p.clone()));
                touched.policies.insert(p.name.clone());
            }
            if api {
                self.api_objects.insert(r);
            } else if kube {
                self.api_objects.remove(&r);
                self.kube_objects.insert(r);
            }
        }
        self.drop_orphans();
    }

    /// The small commands; returns their events (none: nothing changed).
    fn apply_small(&mut self, cmd: &Command) -> Vec<EventDraft> {
        let one = |kind: EventKind, node: Option<&str>, gateway: Option<&str>, message: String| {
            vec![EventDraft {
                kind,
                node: node.map(str::to_owned),
                gateway: gateway.map(str::to_owned),
                message,
            }]
        };
        match cmd {
            Command::DeleteGateway(name) => {
                self.gateways.remove(name);
                self.api_objects.remove(&ObjectRef::Gateway(name.clone()));
                self.drop_orphans();
                one(
                    EventKind::Config,
                    None,
                    Some(name),
                    format!("gateway {name} deleted"),
                )
            }
            Command::DeletePolicy(name) => {
                self.policies.remove(name);
                self.api_objects.remove(&ObjectRef::Policy(name.clone()));
                one(
                    EventKind::Config,
                    None,
                    None,
                    format!("policy {name} deleted"),
                )
            }
            Command::Cordon(node) => {
                if !self.cordoned.insert(node.clone()) {
                    return Vec::new();
                }
                one(
                    EventKind::Cordon,
                    Some(node),
                    None,
                    format!("{node} cordoned"),
                )
            }
            Command::Uncordon(node) => {
                if !self.cordoned.remove(node) {
                    return Vec::new();
                }
                one(
                    EventKind::Uncordon,
                    Some(node),
                    None,
                    format!("{node} uncordoned"),
                )
            }
            Command::SetLabel { node, key, value } => {
                let labels = self.label_overrides.entry(node.clone()).or_default();
                if labels.get(key) == Some(value) {
                    return Vec::new();
                }
                labels.insert(key.clone(), value.clone());
                one(
                    EventKind::Label,
                    Some(node),
                    None,
                    match value {
                        Some(v) => format!("{node}: label {key}={v} set"),
                        None => format!("{node}: label {key} removed"),
                    },
                )
            }
            Command::SeedMembers(members) | Command::SetMembers(members) => {
                let seed = matches!(cmd, Command::SeedMembers(_));
                // An empty member list would leave no cluster: ignored.
                if members.is_empty() || (seed && !self.members.is_empty()) {
                    return Vec::new();
                }
                let new: BTreeMap<NodeName, String> = members.iter().cloned().collect();
                if new == self.members {
                    return Vec::new();
                }
                self.members = new;
                one(
                    EventKind::Members,
                    None,
                    None,
                    format!(
                        "members: {}",
                        self.members.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                )
            }
            Command::Assign {
                changes,
                at_unix_ms,
            } => changes
                .iter()
                .filter(|&ch| self.assign(ch, *at_unix_ms))
                .map(assign_event)
                .collect(),
            Command::KubeNodes(nodes) => {
                let mut events = Vec::new();
                for (node, new) in nodes {
                    let old = self.kube_nodes.get(node).cloned();
                    if old == *new {
                        continue;
                    }
                    let was = old.as_ref().is_some_and(|k| k.unschedulable);
                    let now = new.as_ref().is_some_and(|k| k.unschedulable);
                    match new {
                        Some(k) => self.kube_nodes.insert(node.clone(), k.clone()),
                        None => self.kube_nodes.remove(node),
                    };
                    let (kind, message) = match (was, now) {
                        (false, true) => (
                            EventKind::Cordon,
                            format!("{node} cordoned by Kubernetes (Node spec.unschedulable)"),
                        ),
                        (true, false) => (
                            EventKind::Uncordon,
                            format!("{node} uncordoned by Kubernetes"),
                        ),
                        _ => (
                            EventKind::Label,
                            format!(
                                "{node}: Kubernetes Node labels {}",
                                match new {
                                    Some(k) => k
                                        .labels
                                        .iter()
                                        .map(|(k, v)| format!("{k}={v}"))
                                        .collect::<Vec<_>>()
                                        .join(","),
                                    None => "gone (no Node)".to_string(),
                                }
                            ),
                        ),
                    };
                    events.extend(one(kind, Some(node), None, message));
                }
                events
            }
            Command::InitCluster { id } => {
                if self.cluster_id.is_some() {
                    return Vec::new();
                }
                self.cluster_id = Some(id.clone());
                one(
                    EventKind::Members,
                    None,
                    None,
                    format!("cluster id {id} chosen by the first leader"),
                )
            }
            Command::AddMember { name, address } => {
                if self.members.get(name) == Some(address) {
                    return Vec::new();
                }
                self.members.insert(name.clone(), address.clone());
                one(
                    EventKind::Members,
                    Some(name),
                    None,
                    format!(
                        "member {name} ({address}) added; members: {}",
                        self.member_names().join(", ")
                    ),
                )
            }
            Command::RemoveMember { name } => {
                if self.members.remove(name).is_none() {
                    return Vec::new();
                }
                one(
                    EventKind::Members,
                    Some(name),
                    None,
                    format!(
                        "member {name} removed; members: {}",
                        self.member_names().join(", ")
                    ),
                )
            }
            Command::ClusterFormat(f) => {
                if *f <= self.cluster_format {
                    return Vec::new();
                }
                self.cluster_format = *f;
                one(
                    EventKind::Members,
                    None,
                    None,
                    format!(
                        "every member reads command format {f}: commands up to it no longer \
                         wait for each member to report to a new leader"
                    ),
                )
            }
            _ => Vec::new(),
        }
    }

    /// Whether `node` is cordoned, for either reason.
    pub fn is_cordoned(&self, node: &str) -> bool {
        !self.cordon_reasons(node).is_empty()
    }

    /// Why `node` is cordoned: `egressd node cordon`, Kubernetes (`spec.unschedulable`), both
    /// or neither.
    pub fn cordon_reasons(&self, node: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.cordoned.contains(node) {
            out.push("egressd node cordon".to_string());
        }
        if self.kube_nodes.get(node).is_some_and(|k| k.unschedulable) {
            out.push("Kubernetes Node spec.unschedulable (kubectl cordon)".to_string());
        }
        out
    }

    /// Who wrote object `r` (committed or not).
    pub fn origin(&self, r: &ObjectRef) -> Origin {
        if self.kube_objects.contains(r) {
            Origin::Kubernetes
        } else if self.api_objects.contains(r) {
            Origin::Api
        } else {
            Origin::File
        }
    }

    /// The member names, in order.
    pub fn member_names(&self) -> Vec<String> {
        self.members.keys().cloned().collect()
    }

    /// Why `cmd` must not be applied to this state, if it must not. Deterministic: every node
    /// refuses the same commands.
    pub fn check(&self, cmd: &Command) -> Result<(), String> {
        match cmd {
            Command::Apply { gateways, policies } => {
                let owned: Vec<String> = gateways
                    .iter()
                    .map(|g| ObjectRef::Gateway(g.name.clone()))
                    .chain(policies.iter().map(|p| ObjectRef::Policy(p.name.clone())))
                    .filter(|r| self.kube_objects.contains(r))
                    .take(10)
                    .map(|r| r.to_string())
                    .collect();
                if !owned.is_empty() {
                    return Err(kube_owned(&owned.join(", ")));
                }
                let mut seen = BTreeSet::new();
                for o in gateways
                    .iter()
                    .map(|g| ObjectRef::Gateway(g.name.clone()))
                    .chain(policies.iter().map(|p| ObjectRef::Policy(p.name.clone())))
                {
                    if !seen.insert(o.clone()) {
                        return Err(format!("{o} appears twice"));
                    }
                }
                let missing: Vec<String> = policies
                    .iter()
                    .filter(|p| {
                        !self.gateways.contains_key(&p.egress_gateway_name)
                            && !gateways.iter().any(|g| g.name == p.egress_gateway_name)
                    })
                    .take(10)
                    .map(|p| format!("policy {} names gateway {}", p.name, p.egress_gateway_name))
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "no such gateway: {}; apply the gateway first or in the same file",
                        missing.join(", ")
                    ))
                }
            }
            Command::EditPolicyCidrs { policy, .. }
                if self
                    .kube_objects
                    .contains(&ObjectRef::Policy(policy.clone())) =>
            {
                Err(kube_owned(&format!("policy {policy}")))
            }
            Command::DeleteGateway(name) => {
                if !self.gateways.contains_key(name) {
                    return Err(format!("no gateway named {name:?}"));
                }
                if self
                    .kube_objects
                    .contains(&ObjectRef::Gateway(name.clone()))
                {
                    return Err(kube_owned(&format!("gateway {name}")));
                }
                let users: Vec<&str> = self
                    .policies
                    .values()
                    .filter(|p| &p.egress_gateway_name == name)
                    .take(10)
                    .map(|p| p.name.as_str())
                    .collect();
                if users.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "gateway {name} is used by policies {}: delete or re-point them first",
                        users.join(", ")
                    ))
                }
            }
            Command::DeletePolicy(name) if !self.policies.contains_key(name) => {
                Err(format!("no policy named {name:?}"))
            }
            Command::DeletePolicy(name)
                if self.kube_objects.contains(&ObjectRef::Policy(name.clone())) =>
            {
                Err(kube_owned(&format!("policy {name}")))
            }
            Command::InitCluster { id } => {
                if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "a cluster id is 32 hexadecimal digits, not {}",
                        crate::config::rules::quote(id)
                    ));
                }
                match &self.cluster_id {
                    Some(have) if have != id => Err(format!("the cluster's id is {have} already")),
                    _ => Ok(()),
                }
            }
            Command::AddMember { name, address } => self.check_add_member(name, address),
            Command::RemoveMember { name } => {
                if !self.members.contains_key(name) {
                    return Err(format!(
                        "no member named {}; members: {}",
                        crate::config::rules::quote(name),
                        self.member_names().join(", ")
                    ));
                }
                if self.members.len() == 1 {
                    return Err(format!(
                        "{name} is the only member: a cluster cannot remove its last member"
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn check_add_member(&self, name: &str, address: &str) -> Result<(), String> {
        use crate::config::rules;
        rules::object_name(name).map_err(|m| format!("member name: {m}"))?;
        let addr = rules::socket_addr(address).map_err(|m| format!("member address: {m}"))?;
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(format!(
                "member address {addr} cannot be connected to; give the node's reachable peer \
                 address and port (its cluster.listen)"
            ));
        }
        if self.members.is_empty() {
            return Err(
                "the cluster's member list is not known yet (the cluster is starting); try again \
                 in a moment"
                    .into(),
            );
        }
        if let Some(have) = self.members.get(name) {
            if *have == addr.to_string() {
                return Ok(());
            }
            return Err(format!(
                "{name} is a member already, at {have}; to move it, `egressd member remove \
                 {name}` first"
            ));
        }
        if let Some((other, _)) = self
            .members
            .iter()
            .find(|(_, a)| a.parse::<std::net::SocketAddr>().ok() == Some(addr))
        {
            return Err(format!("address {addr} is member {other}'s"));
        }
        Ok(())
    }

    /// The configuration rules (names, interfaces, CIDRs, shared VIPs and next hops, address
    /// families, references) for what a change touched, against the whole committed set: every
    /// touched policy with its gateway, every gateway against the others (there are few), the
    /// policies of a gateway whose address family or mode changed, and no policy left naming a
    /// removed gateway.
    fn check_rules(&self, touched: &Touched, lists_checked: Option<&str>) -> Result<(), String> {
        let mut errors: Vec<String> = Vec::new();
        const SHOWN: usize = 10;
        let mut more = 0usize;
        let mut push = |errors: &mut Vec<String>, e: String| {
            if errors.len() < SHOWN {
                errors.push(e);
            } else {
                more += 1;
            }
        };
        if !touched.gateways.is_empty() {
            let all: Vec<Gateway> = self.gateways.values().cloned().collect();
            for e in crate::config::check_objects(&all, &[]) {
                push(
                    &mut errors,
                    format!("{}: {}", name_key(&e.key, &all, &[]), e.message),
                );
            }
        }
        // Policies to check: the touched ones, and those of a touched gateway.
        let mut policies: Vec<Arc<Policy>> = touched
            .policies
            .iter()
            .filter_map(|n| self.policies.get(n).cloned())
            .collect();
        if !touched.gateways.is_empty() || !touched.removed_gateways.is_empty() {
            let gws: BTreeSet<&String> = touched
                .gateways
                .iter()
                .chain(&touched.removed_gateways)
                .collect();
            policies.extend(
                self.policies
                    .values()
                    .filter(|p| {
                        gws.contains(&p.egress_gateway_name) && !touched.policies.contains(&p.name)
                    })
                    .cloned(),
            );
        }
        for p in &policies {
            let gw: Vec<Gateway> = self
                .gateways
                .get(&p.egress_gateway_name)
                .cloned()
                .into_iter()
                .collect();
            let list = [(**p).clone()];
            let checked = lists_checked == Some(p.name.as_str());
            for e in crate::config::check_objects_with(&gw, &list, checked) {
                push(
                    &mut errors,
                    format!("{}: {}", name_key(&e.key, &gw, &list), e.message),
                );
            }
        }
        if errors.is_empty() {
            return Ok(());
        }
        if more > 0 {
            errors.push(format!("and {more} more"));
        }
        Err(errors.join("; "))
    }

    /// Sets or clears the active node of a gateway; whether anything changed.
    fn assign(&mut self, ch: &AssignChange, at_unix_ms: u64) -> bool {
        if !self.gateways.contains_key(&ch.gateway) {
            return false;
        }
        let gw = &ch.gateway;
        if self.assignment.get(gw) == ch.to.as_ref() {
            return false;
        }
        match &ch.to {
            Some(n) => self.assignment.insert(gw.clone(), n.clone()),
            None => self.assignment.remove(gw),
        };
        *self.epochs.entry(gw.clone()).or_default() += 1;
        let stats = self.stats.entry(gw.clone()).or_default();
        match &ch.reason {
            Reason::Failover { silent_ms, .. } => {
                stats.failovers += 1;
                stats.last_failover_detect_ms = Some(*silent_ms);
            }
            Reason::Handover { .. } => stats.handovers += 1,
            Reason::Elected => {}
        }
        stats.active_since_unix_ms = ch.to.as_ref().map(|_| at_unix_ms);
        true
    }

    /// Assignments and statistics of gateways that no longer exist.
    fn drop_orphans(&mut self) {
        let gateways = &self.gateways;
        self.assignment.retain(|g, _| gateways.contains_key(g));
        self.stats.retain(|g, _| gateways.contains_key(g));
    }

    /// The change that makes the file objects equal a node's configuration file: `None` when
    /// they already are (API objects of the same name are not the file's to change).
    pub fn file_change<P: Borrow<Policy>>(
        &self,
        node: &str,
        file_gateways: &[Gateway],
        file_policies: &[P],
    ) -> Option<Command> {
        let digest = file_digest(file_gateways, file_policies);
        let api = |r: &ObjectRef| self.api_objects.contains(r) || self.kube_objects.contains(r);
        let gateways: Vec<Gateway> = file_gateways
            .iter()
            .filter(|g| !api(&ObjectRef::Gateway(g.name.clone())))
            .filter(|g| self.gateways.get(&g.name) != Some(*g))
            .cloned()
            .collect();
        let policies: Vec<Policy> = file_policies
            .iter()
            .map(Borrow::borrow)
            .filter(|p: &&Policy| !api(&ObjectRef::Policy(p.name.clone())))
            .filter(|p| self.policies.get(&p.name).is_none_or(|o| **o != **p))
            .cloned()
            .collect();
        let in_file_g: BTreeSet<&str> = file_gateways.iter().map(|g| g.name.as_str()).collect();
        let in_file_p: BTreeSet<&str> = file_policies
            .iter()
            .map(|p| p.borrow().name.as_str())
            .collect();
        let delete_gateways: Vec<String> = self
            .gateways
            .keys()
            .filter(|n| !in_file_g.contains(n.as_str()) && !api(&ObjectRef::Gateway((*n).clone())))
            .cloned()
            .collect();
        let delete_policies: Vec<String> = self
            .policies
            .keys()
            .filter(|n| !in_file_p.contains(n.as_str()) && !api(&ObjectRef::Policy((*n).clone())))
            .cloned()
            .collect();
        let unchanged = gateways.is_empty()
            && policies.is_empty()
            && delete_gateways.is_empty()
            && delete_policies.is_empty()
            && self.file_digests.get(node) == Some(&digest);
        (!unchanged).then(|| Command::FileObjects {
            node: node.to_string(),
            gateways,
            policies,
            delete_gateways,
            delete_policies,
            digest,
        })
    }

    /// Where a node's configuration file disagrees with the committed objects, one line per
    /// object in object order: file objects missing or different, committed file objects the
    /// file no longer has, and file objects shadowed by an API object of the same name.
    /// `file_gateways` and `file_policies` are sorted by name.
    pub fn drift<P: Borrow<Policy>>(
        &self,
        file_gateways: &[Gateway],
        file_policies: &[P],
    ) -> Vec<String> {
        self.drift_map(file_gateways, file_policies)
            .into_values()
            .collect()
    }

    /// `drift`, by object.
    pub fn drift_map<P: Borrow<Policy>>(
        &self,
        fg: &[Gateway],
        fp: &[P],
    ) -> BTreeMap<ObjectRef, String> {
        let mut out = BTreeMap::new();
        self.gateway_drift(fg, &mut out);
        let names: BTreeSet<&str> = fp
            .iter()
            .map(|p| p.borrow().name.as_str())
            .chain(self.policies.keys().map(String::as_str))
            .collect();
        for name in names {
            if let Some(line) = self.policy_drift(name, file_policy(fp, name)) {
                out.insert(ObjectRef::Policy(name.to_owned()), line);
            }
        }
        out
    }

    /// Brings `out`, the drift of a state whose policies and API objects were `policies` and
    /// `api`, up to this state, for the same file: only the policies that changed since, or
    /// whose shadowing by `apply` did, are compared again (the persistent maps' diff skips what
    /// they share). With 100 000 policies a full comparison took a tenth of a second of CPU.
    #[allow(clippy::too_many_arguments)]
    pub fn update_drift<P: Borrow<Policy>>(
        &self,
        policies: &OrdMap<String, Arc<Policy>>,
        api: &OrdSet<ObjectRef>,
        kube: &OrdSet<ObjectRef>,
        fg: &[Gateway],
        fp: &[P],
        out: &mut BTreeMap<ObjectRef, String>,
    ) {
        let mut names: BTreeSet<&String> = policies
            .diff(&self.policies)
            .map(|d| match d {
                DiffItem::Add(k, _)
                | DiffItem::Remove(k, _)
                | DiffItem::Update { new: (k, _), .. } => k,
            })
            .collect();
        for d in api
            .diff(&self.api_objects)
            .chain(kube.diff(&self.kube_objects))
        {
            let (imbl::ordset::DiffItem::Add(r) | imbl::ordset::DiffItem::Remove(r)) = d;
            if let ObjectRef::Policy(n) = r {
                names.insert(n);
            }
        }
        self.gateway_drift(fg, out);
        for name in names {
            let r = ObjectRef::Policy(name.clone());
            match self.policy_drift(name, file_policy(fp, name)) {
                Some(line) => out.insert(r, line),
                None => out.remove(&r),
            };
        }
    }

    /// The drift lines of every gateway (there are few), replacing those in `out`.
    pub fn gateway_drift(&self, file: &[Gateway], out: &mut BTreeMap<ObjectRef, String>) {
        out.retain(|r, _| !matches!(r, ObjectRef::Gateway(_)));
        let names: BTreeSet<&str> = file
            .iter()
            .map(|g| g.name.as_str())
            .chain(self.gateways.keys().map(String::as_str))
            .collect();
        for name in names {
            let r = ObjectRef::Gateway(name.to_owned());
            let mine = file.iter().find(|g| g.name == name);
            let line = match (mine, self.gateways.get(name)) {
                (Some(_), _) if self.kube_objects.contains(&r) => {
                    format!("{r}: the file's definition is overridden by Kubernetes")
                }
                (Some(_), _) if self.api_objects.contains(&r) => {
                    format!("{r}: the file's definition is overridden by `apply`")
                }
                (Some(_), None) => format!("{r}: in the file, not committed"),
                (Some(f), Some(c)) if c != f => {
                    format!("{r}: the file differs from the committed one")
                }
                (None, Some(_))
                    if !self.api_objects.contains(&r) && !self.kube_objects.contains(&r) =>
                {
                    format!("{r}: committed from a file, not in this node's file")
                }
                _ => continue,
            };
            out.insert(r, line);
        }
    }

    /// The drift line of policy `name`, if the file's (`file`) and the committed one differ.
    pub fn policy_drift(&self, name: &str, file: Option<&Policy>) -> Option<String> {
        let r = ObjectRef::Policy(name.to_owned());
        let committed = self.policies.get(name);
        match (file, committed) {
            (Some(_), _) if self.kube_objects.contains(&r) => Some(format!(
                "{r}: the file's definition is overridden by Kubernetes"
            )),
            (Some(_), _) if self.api_objects.contains(&r) => Some(format!(
                "{r}: the file's definition is overridden by `apply`"
            )),
            (Some(_), None) => Some(format!("{r}: in the file, not committed")),
            (Some(f), Some(c)) if **c != *f => {
                Some(format!("{r}: the file differs from the committed one"))
            }
            (None, Some(_))
                if !self.api_objects.contains(&r) && !self.kube_objects.contains(&r) =>
            {
                Some(format!(
                    "{r}: committed from a file, not in this node's file"
                ))
            }
            _ => None,
        }
    }

    /// A node's labels: its config file's labels with the runtime overrides applied.
    pub fn effective_labels(&self, node: &str, file_labels: &Labels) -> Labels {
        let mut labels = file_labels.clone();
        if let Some(k) = self.kube_nodes.get(node) {
            labels.extend(k.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(over) = self.label_overrides.get(node) {
            for (k, v) in over {
                match v {
                    Some(v) => labels.insert(k.clone(), v.clone()),
                    None => labels.remove(k),
                };
            }
        }
        labels
    }

    pub fn gateway_list(&self) -> Vec<Gateway> {
        self.gateways.values().cloned().collect()
    }

    pub fn policy_list(&self) -> Vec<Policy> {
        self.policies.values().map(|p| (**p).clone()).collect()
    }
}

/// A digest of a file's gateways and policies as the cluster would hold them (sorted by name,
/// after environment overrides): equal files have equal digests, whatever their comments or
/// order.
pub fn file_digest<P: Borrow<Policy>>(gateways: &[Gateway], policies: &[P]) -> String {
    use sha2::{Digest, Sha256};
    let mut g: Vec<&Gateway> = gateways.iter().collect();
    g.sort_by(|a, b| a.name.cmp(&b.name));
    let mut p: Vec<&Policy> = policies.iter().map(Borrow::borrow).collect();
    p.sort_by(|a, b| a.name.cmp(&b.name));
    let bytes = rmp_serde::to_vec(&(g, p)).unwrap_or_default();
    let d = Sha256::digest(&bytes);
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// `gateway[3].name` → `gateway "office".name`: the index into the checked lists means nothing
/// to an operator.
fn name_key(key: &str, gateways: &[Gateway], policies: &[Policy]) -> String {
    let named = |prefix: &str, name_of: &dyn Fn(usize) -> Option<String>| {
        let rest = key.strip_prefix(prefix)?.strip_prefix('[')?;
        let (idx, tail) = rest.split_once(']')?;
        let name = name_of(idx.parse().ok()?)?;
        Some(format!("{prefix} {name:?}{tail}"))
    };
    named("gateway", &|i| gateways.get(i).map(|g| g.name.clone()))
        .or_else(|| named("policy", &|i| policies.get(i).map(|p| p.name.clone())))
        .unwrap_or_else(|| key.to_string())
}

/// The event of one assignment change.
fn assign_event(ch: &AssignChange) -> EventDraft {
    let to = ch.to.as_deref().unwrap_or("nobody");
    let (kind, message) = match &ch.reason {
        Reason::Elected => (EventKind::Elected, format!("{to} elected active")),
        Reason::Failover { from, silent_ms } => (
            EventKind::Failover,
            format!("failover {from} -> {to}: {from} silent for {silent_ms} ms"),
        ),
        Reason::Handover { from, why } => (
            EventKind::Handover,
            format!("planned handover: {from} releases ({why})"),
        ),
    };
    EventDraft {
        kind,
        node: ch.to.clone(),
        gateway: Some(ch.gateway.clone()),
        message,
    }
}

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Elected,
    Failover,
    Handover,
    Cordon,
    Uncordon,
    Label,
    Config,
    Members,
    /// Local to the node that reports it: data plane took over / released, reload rejected,
    /// leadership gained or lost.
    Takeover,
    Release,
    ConfigRejected,
    Leadership,
    /// egressd's nftables tables were changed from outside and repaired.
    Repair,
    /// A policy change reached running flows: stale conntrack entries deleted.
    Flows,
}

impl EventKind {
    /// The name in the API and in `status --events` (snake_case, as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Elected => "elected",
            EventKind::Failover => "failover",
            EventKind::Handover => "handover",
            EventKind::Cordon => "cordon",
            EventKind::Uncordon => "uncordon",
            EventKind::Label => "label",
            EventKind::Config => "config",
            EventKind::Members => "members",
            EventKind::Takeover => "takeover",
            EventKind::Release => "release",
            EventKind::ConfigRejected => "config_rejected",
            EventKind::Leadership => "leadership",
            EventKind::Repair => "repair",
            EventKind::Flows => "flows",
        }
    }
}

/// An event before it gets its sequence number and time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventDraft {
    pub kind: EventKind,
    pub node: Option<NodeName>,
    pub gateway: Option<String>,
    pub message: String,
}

/// The file's policy `name` (the file's policies are sorted by name).
pub fn file_policy<'a, P: Borrow<Policy>>(policies: &'a [P], name: &str) -> Option<&'a Policy> {
    policies
        .binary_search_by(|p| p.borrow().name.as_str().cmp(name))
        .ok()
        .map(|i| policies[i].borrow())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Selection, SourceIp};

    /// A crash the `peer_rpc` fuzz target found (13 bytes): a stored state whose gateway map
    /// claims 0xdfdfdfa3 entries. It must be refused, not abort the process trying to allocate
    /// for them (this test process would abort).
    #[test]
    fn a_map_header_claiming_billions_is_an_error() {
        use crate::cluster::codec::{STORE_FORMAT, from_store, to_store};
        let crash = [2u8, 147, 223, 223, 223, 163, 58, 3, 146, 97, 146, 7, 97];
        assert!(from_store::<ClusterState>(&crash).is_err());
        // The same claim in each persistent map and set of the state (gateways, policies,
        // api_objects), after empty ones before it.
        for field in 0..3 {
            let mut b = vec![STORE_FORMAT, 0xdc, 0, 13];
            b.extend(std::iter::repeat_n(0x80, field));
            b.push(if field == 2 { 0xdd } else { 0xdf });
            b.extend([0xdf, 0xdf, 0xdf, 0xdf]);
            assert!(from_store::<ClusterState>(&b).is_err(), "field {field}");
        }
        // And a real state still round-trips.
        let mut st = ClusterState::default();
        st.apply(&Command::Cordon("gw1".into()));
        st.api_objects.insert(ObjectRef::Gateway("g".into()));
        let b = to_store(&st).unwrap();
        assert_eq!(from_store::<ClusterState>(&b).unwrap(), st);
    }

    pub(crate) fn elect(gateway: &str, to: Option<&str>) -> Command {
        Command::Assign {
            changes: vec![AssignChange {
                gateway: gateway.into(),
                to: to.map(String::from),
                reason: Reason::Elected,
            }],
            at_unix_ms: 1,
        }
    }

    /// What a node's reload commits for this file.
    fn reload(s: &ClusterState, gateways: Vec<Gateway>, policies: Vec<Policy>) -> Command {
        s.file_change("n1", &gateways, &policies)
            .expect("the file differs from the committed objects")
    }

    fn gw(name: &str) -> Gateway {
        Gateway {
            name: name.into(),
            node_selector: Labels::new(),
            selection: Selection::Alphabetical,
            preempt: true,
            source_ip: SourceIp::PrimaryIp {
                interface: "eth1".into(),
            },
            next_hop: None,
            conntrack_sync: false,
        }
    }

    fn vip(name: &str, ip: &str) -> Gateway {
        Gateway {
            source_ip: SourceIp::VirtualIp {
                ip: ip.parse().unwrap(),
                interfaces: vec!["eth1".into()],
            },
            ..gw(name)
        }
    }

    pub(crate) fn policy(name: &str, gateway: &str) -> Policy {
        Policy {
            name: name.into(),
            egress_gateway_name: gateway.into(),
            source_cidrs: vec!["10.0.0.0/24".parse().unwrap()],
            destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            excluded_cidrs: vec![],
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// `egressd policy add-cidrs|remove-cidrs`: the policy changes as `apply` of the edited
    /// policy would change it (an API object from then on); an edit that cannot apply is
    /// refused and changes nothing.
    #[test]
    fn a_cidr_edit_is_an_apply_of_the_edited_policy() {
        let mut s = ClusterState::default();
        s.apply(&Command::SeedObjects {
            gateways: vec![gw("g")],
            policies: vec![Policy {
                destination_cidrs: nets(&["192.0.2.0/24", "198.51.100.0/24"]),
                ..policy("p", "g")
            }],
        });
        let edit = |add: &[&str], remove: &[&str]| Command::EditPolicyCidrs {
            policy: "p".into(),
            add: CidrLists {
                destination_cidrs: nets(add),
                ..Default::default()
            },
            remove: CidrLists {
                destination_cidrs: nets(remove),
                ..Default::default()
            },
        };
        let r = s.apply(&edit(
            &["203.0.113.0/24", "192.0.2.0/24"],
            &["198.51.100.0/24"],
        ));
        assert_eq!(r.refused, None);
        assert!(r.changed);
        // Removals first, then what is not listed yet, appended in order.
        assert_eq!(
            s.policies["p"].destination_cidrs,
            nets(&["192.0.2.0/24", "203.0.113.0/24"])
        );
        assert_eq!(s.origin(&ObjectRef::Policy("p".into())), Origin::Api);
        // The same again changes nothing; so does removing what is not listed.
        let before = s.clone();
        for cmd in [
            edit(&["203.0.113.0/24"], &[]),
            edit(&[], &["198.51.100.0/24"]),
        ] {
            let r = s.apply(&cmd);
            assert_eq!((r.changed, r.refused), (false, None), "{cmd:?}");
            assert_eq!(s, before);
        }
        // Refused whole: an empty required list, a policy that does not exist, one Kubernetes
        // owns, an added CIDR with host bits (only the added ones are checked as CIDRs), and
        // one the rest of the rules refuse (an IPv6 destination for IPv4 sources).
        let mut missing = edit(&["203.0.113.0/24"], &[]);
        if let Command::EditPolicyCidrs { policy, .. } = &mut missing {
            *policy = "nope".into();
        }
        let mut owned = s.clone();
        owned.kube_objects.insert(ObjectRef::Policy("p".into()));
        for (st, cmd, says) in [
            (
                s.clone(),
                edit(&[], &["192.0.2.0/24", "203.0.113.0/24"]),
                "destination_cidrs empty",
            ),
            (s.clone(), missing, "no policy named"),
            (owned, edit(&["10.9.0.0/16"], &[]), "owned by Kubernetes"),
            (
                s.clone(),
                edit(&["203.0.113.1/24"], &[]),
                "added destination_cidrs[0]: 203.0.113.1/24 has host bits set",
            ),
            (s.clone(), edit(&["2001:db8::/32"], &[]), "matches nothing"),
        ] {
            let mut st = st;
            let before = st.clone();
            let why = st.apply(&cmd).refused.unwrap_or_default();
            assert!(why.contains(says), "{cmd:?}: {why}");
            assert_eq!(st, before);
        }
    }

    #[test]
    fn the_drift_kept_up_to_date_equals_the_drift_computed_afresh() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let variant = |name: String, k: u64| Policy {
            source_cidrs: vec![format!("10.0.{k}.0/24").parse().unwrap()],
            ..policy(&name, "g0")
        };
        // This node's file (sorted by name).
        let fg = vec![gw("g0"), gw("g1")];
        let fp: Vec<Policy> = (0..20).map(|i| variant(format!("p{i:02}"), 0)).collect();
        let mut s = ClusterState::default();
        s.apply(&Command::SeedObjects {
            gateways: fg.clone(),
            policies: fp[..10].to_vec(),
        });
        let mut drift = s.drift_map(&fg, &fp);
        for step in 0..300 {
            let (policies, api, kube) = (
                s.policies.clone(),
                s.api_objects.clone(),
                s.kube_objects.clone(),
            );
            let name = format!("p{:02}", next(30));
            let cmd = match next(6) {
                0 => Command::DeletePolicy(name),
                1 | 2 => Command::Apply {
                    gateways: vec![],
                    policies: vec![variant(name, next(3))],
                },
                // Kubernetes imports or withdraws a policy.
                3 => Command::KubeObjects {
                    gateways: vec![],
                    policies: if next(2) == 0 {
                        vec![variant(name, next(3))]
                    } else {
                        vec![]
                    },
                    delete_gateways: vec![],
                    delete_policies: vec![format!("p{:02}", next(30))],
                },
                // Another node's file becomes the committed file objects.
                _ => {
                    let mut other = Vec::new();
                    for i in 0..20 {
                        if next(3) > 0 {
                            other.push(variant(format!("p{i:02}"), next(2)));
                        }
                    }
                    match s.file_change("n2", &fg, &other) {
                        Some(c) => c,
                        None => continue,
                    }
                }
            };
            s.apply(&cmd);
            s.update_drift(&policies, &api, &kube, &fg, &fp, &mut drift);
            assert_eq!(drift, s.drift_map(&fg, &fp), "after step {step}: {cmd:?}");
        }
        assert!(!drift.is_empty());
    }

    /// Kubernetes wins over the file and the API; `apply`/`delete` refuse its objects; a file
    /// reload never touches them; its deletions touch only what it imported.
    /// `ClusterFormat` only raises the recorded format, and says so once.
    #[test]
    fn the_cluster_format_only_rises() {
        let mut s = ClusterState::default();
        assert_eq!(s.cluster_format, 0);
        let r = s.apply(&Command::ClusterFormat(5));
        assert!(r.changed && r.refused.is_none());
        assert_eq!(s.cluster_format, 5);
        assert!(!s.apply(&Command::ClusterFormat(5)).changed);
        assert!(!s.apply(&Command::ClusterFormat(3)).changed);
        assert_eq!(s.cluster_format, 5);
        assert_eq!(Command::ClusterFormat(5).format(), 5);
    }

    #[test]
    fn kubernetes_objects_win_and_are_not_changed_by_apply_delete_or_a_file() {
        let mut s = ClusterState::default();
        s.apply(&Command::SeedObjects {
            gateways: vec![gw("f")],
            policies: vec![policy("fp", "f")],
        });
        s.apply(&Command::Apply {
            gateways: vec![gw("a")],
            policies: vec![],
        });
        let mut k = gw("f");
        k.preempt = false;
        let r = s.apply(&Command::KubeObjects {
            gateways: vec![k.clone(), gw("a")],
            policies: vec![],
            delete_gateways: vec![],
            delete_policies: vec!["fp".into()],
        });
        assert_eq!(r.refused, None);
        // Deleting a file object is not Kubernetes' to do.
        assert!(s.policies.contains_key("fp"));
        assert_eq!(s.gateways["f"], k);
        assert_eq!(
            s.origin(&ObjectRef::Gateway("f".into())),
            Origin::Kubernetes
        );
        assert_eq!(
            s.origin(&ObjectRef::Gateway("a".into())),
            Origin::Kubernetes
        );
        assert!(s.api_objects.is_empty());
        for cmd in [
            Command::Apply {
                gateways: vec![gw("f")],
                policies: vec![],
            },
            Command::DeleteGateway("a".into()),
        ] {
            let before = s.clone();
            let r = s.apply(&cmd);
            let why = r.refused.unwrap_or_default();
            assert!(why.contains("owned by Kubernetes"), "{cmd:?}: {why}");
            assert_eq!(s, before);
        }
        // The file's gateway f shows as drift; a reload does not touch it.
        assert_eq!(
            s.drift(&[gw("f")], &[policy("fp", "f")]),
            vec!["gateway f: the file's definition is overridden by Kubernetes"]
        );
        assert_eq!(
            s.file_change("n1", &[gw("f")], &[policy("fp", "f")])
                .map(|c| c.object_count()),
            Some(0)
        );
        s.apply(&Command::FileObjects {
            node: "n1".into(),
            gateways: vec![gw("f")],
            policies: vec![],
            delete_gateways: vec!["a".into(), "f".into()],
            delete_policies: vec![],
            digest: "x".into(),
        });
        assert_eq!(s.gateways["f"], k);
        assert!(s.gateways.contains_key("a"));
        // Kubernetes withdraws f: gone, and the file's f is drift until the next reload.
        s.apply(&Command::KubeObjects {
            gateways: vec![],
            policies: vec![],
            delete_gateways: vec!["a".into()],
            delete_policies: vec![],
        });
        assert!(!s.gateways.contains_key("a"));
        assert!(!s.kube_objects.contains(&ObjectRef::Gateway("a".into())));
    }

    #[test]
    fn seed_applies_once_replace_always() {
        let mut s = ClusterState::default();
        let seed = |names: &[&str]| Command::SeedObjects {
            gateways: names.iter().map(|n| gw(n)).collect(),
            policies: vec![],
        };
        assert!(s.apply(&seed(&["a"])).changed);
        assert!(
            !s.apply(&seed(&["b"])).changed,
            "an old file must not undo the cluster"
        );
        assert!(s.gateways.contains_key("a"));
        let replace = reload(&s, vec![gw("b")], vec![]);
        assert!(s.apply(&replace).changed);
        assert_eq!(s.gateways.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn assign_bumps_epochs_only_on_change_and_ignores_unknown_gateways() {
        let mut s = ClusterState::default();
        s.apply(&Command::Apply {
            gateways: vec![gw("a")],
            policies: vec![],
        });
        let assign = |n: Option<&str>| elect("a", n);
        assert!(s.apply(&assign(Some("gw1"))).changed);
        assert!(!s.apply(&assign(Some("gw1"))).changed);
        assert!(s.apply(&assign(None)).changed);
        assert_eq!(s.epochs["a"], 2);
        assert!(!s.apply(&elect("zz", Some("gw1"))).changed);
    }

    #[test]
    fn deleting_a_gateway_drops_its_assignment() {
        let mut s = ClusterState::default();
        s.apply(&Command::Apply {
            gateways: vec![gw("a")],
            policies: vec![],
        });
        s.apply(&elect("a", Some("gw1")));
        s.apply(&Command::DeleteGateway("a".into()));
        assert!(s.assignment.is_empty());
    }

    #[test]
    fn runtime_labels_override_and_remove_file_labels() {
        let mut s = ClusterState::default();
        let file: Labels = [
            ("egress".to_string(), String::new()),
            ("zone".into(), "a".into()),
        ]
        .into_iter()
        .collect();
        s.apply(&Command::SetLabel {
            node: "gw1".into(),
            key: "egress".into(),
            value: None,
        });
        s.apply(&Command::SetLabel {
            node: "gw1".into(),
            key: "zone".into(),
            value: Some("b".into()),
        });
        let l = s.effective_labels("gw1", &file);
        assert!(!l.contains_key("egress"));
        assert_eq!(l["zone"], "b");
        assert_eq!(s.effective_labels("gw2", &file), file);
    }

    #[test]
    fn members_seed_once_and_never_empty() {
        let mut s = ClusterState::default();
        let m = |names: &[&str]| {
            names
                .iter()
                .map(|n| (n.to_string(), format!("{n}:7480")))
                .collect::<Vec<_>>()
        };
        assert!(s.apply(&Command::SeedMembers(m(&["gw1", "gw2"]))).changed);
        assert!(!s.apply(&Command::SeedMembers(m(&["gw9"]))).changed);
        assert!(s.apply(&Command::SetMembers(m(&["gw1", "gw3"]))).changed);
        assert!(!s.apply(&Command::SetMembers(vec![])).changed);
        assert_eq!(s.members.keys().collect::<Vec<_>>(), ["gw1", "gw3"]);
    }

    #[test]
    fn cordon_and_uncordon() {
        let mut s = ClusterState::default();
        assert!(s.apply(&Command::Cordon("gw1".into())).changed);
        assert!(!s.apply(&Command::Cordon("gw1".into())).changed);
        assert!(s.apply(&Command::Uncordon("gw1".into())).changed);
        assert!(s.cordoned.is_empty());
    }

    #[test]
    fn apply_is_refused_whole_when_a_policy_names_a_missing_gateway() {
        let mut s = ClusterState::default();
        let r = s.apply(&Command::Apply {
            gateways: vec![gw("a")],
            policies: vec![policy("p", "a"), policy("q", "nope")],
        });
        assert!(!r.changed);
        assert!(
            r.refused
                .as_deref()
                .unwrap_or("")
                .contains("policy q names gateway nope")
        );
        assert!(s.gateways.is_empty() && s.policies.is_empty());
        let r = s.apply(&Command::Apply {
            gateways: vec![gw("a"), gw("a")],
            policies: vec![],
        });
        assert!(r.refused.as_deref().unwrap_or("").contains("twice"));
        let r = s.apply(&Command::Apply {
            gateways: vec![gw("a")],
            policies: vec![policy("p", "a")],
        });
        assert!(r.changed && r.refused.is_none());
    }

    #[test]
    fn deletes_are_refused_for_unknown_names_and_gateways_in_use() {
        let mut s = ClusterState::default();
        s.apply(&Command::Apply {
            gateways: vec![gw("a")],
            policies: vec![policy("p", "a")],
        });
        let before = s.clone();
        let r = s.apply(&Command::DeleteGateway("a".into()));
        assert!(
            r.refused
                .as_deref()
                .unwrap_or("")
                .contains("used by policies p")
        );
        assert!(
            s.apply(&Command::DeleteGateway("zz".into()))
                .refused
                .is_some()
        );
        assert!(
            s.apply(&Command::DeletePolicy("zz".into()))
                .refused
                .is_some()
        );
        assert_eq!(s, before);
        assert!(s.apply(&Command::DeletePolicy("p".into())).changed);
        assert!(s.apply(&Command::DeleteGateway("a".into())).changed);
        assert!(s.api_objects.is_empty() && s.gateways.is_empty());
    }

    #[test]
    fn a_reloaded_file_replaces_file_objects_and_never_api_objects() {
        let mut s = ClusterState::default();
        s.apply(&Command::SeedObjects {
            gateways: vec![gw("f1"), gw("f2")],
            policies: vec![policy("fp", "f1")],
        });
        let mut mine = gw("api");
        mine.preempt = false;
        s.apply(&Command::Apply {
            gateways: vec![mine.clone()],
            policies: vec![policy("ap", "api")],
        });
        // The file drops f2, adds f3 and has its own "api" gateway: the API one wins.
        let c = reload(
            &s,
            vec![gw("f1"), gw("f3"), gw("api")],
            vec![policy("fp", "f1")],
        );
        s.apply(&c);
        assert_eq!(s.gateways.keys().collect::<Vec<_>>(), ["api", "f1", "f3"]);
        assert_eq!(s.gateways["api"], mine);
        assert!(s.policies.contains_key("ap"));
        let drift = s.drift(&[gw("f1"), gw("f3"), gw("api")], &[policy("fp", "f1")]);
        assert_eq!(
            drift,
            ["gateway api: the file's definition is overridden by `apply`"]
        );
        let drift = s.drift(&[gw("f1")], &[policy("fp", "f1")]);
        assert_eq!(
            drift,
            ["gateway f3: committed from a file, not in this node's file"]
        );
    }

    #[test]
    fn a_reload_that_would_orphan_an_api_policy_or_share_a_vip_is_refused_whole() {
        let mut s = ClusterState::default();
        s.apply(&Command::SeedObjects {
            gateways: vec![gw("f1")],
            policies: vec![],
        });
        s.apply(&Command::Apply {
            gateways: vec![vip("api", "198.18.0.50")],
            policies: vec![policy("ap", "f1")],
        });
        let before = s.clone();
        let c = reload(&s, vec![], vec![]);
        let r = s.apply(&c);
        let why = r.refused.unwrap_or_default();
        assert!(
            why.contains("policy \"ap\".egress_gateway_name") && why.contains("f1"),
            "{why}"
        );
        assert_eq!(s, before, "a refused reload changes nothing");
        // A file gateway with the api gateway's VIP: two nodes could hold one address.
        let c = reload(&s, vec![gw("f1"), vip("file-vip", "198.18.0.50")], vec![]);
        let r = s.apply(&c);
        let why = r.refused.unwrap_or_default();
        assert!(why.contains("198.18.0.50"), "{why}");
        assert_eq!(s, before);
        assert!(
            s.policies
                .values()
                .all(|p| s.gateways.contains_key(&p.egress_gateway_name)),
            "no policy is left without its gateway"
        );
    }

    fn many(n: usize, gateway: &str) -> Vec<Policy> {
        (0..n)
            .map(|i| Policy {
                name: format!("p{i:06}"),
                egress_gateway_name: gateway.into(),
                source_cidrs: vec![
                    format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255)
                        .parse()
                        .unwrap(),
                ],
                destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
                excluded_cidrs: vec![],
            })
            .collect()
    }

    /// A large change goes in parts and is applied whole at the commit; until then nothing of it
    /// is visible, and the parts are gone after.
    #[test]
    fn a_staged_change_applies_whole_at_its_commit() {
        let mut s = ClusterState::default();
        let cmd = Command::Apply {
            gateways: vec![gw("a")],
            policies: many(5000, "a"),
        };
        let parts = cmd.clone().split(2000);
        assert_eq!(
            parts.len(),
            4,
            "gateways first, then three parts of policies"
        );
        assert_eq!(Command::merge(parts.clone()), Some(cmd));
        for (i, p) in parts.into_iter().enumerate() {
            let r = s.apply_described(
                &Command::Stage {
                    txn: 7,
                    part: i as u32,
                    command: Box::new(p),
                },
                10 + i as u64,
            );
            assert!(r.0.refused.is_none() && !r.0.changed);
            assert!(s.policies.is_empty() && s.gateways.is_empty());
        }
        let (r, ev) = s.apply_described(&Command::Commit { txn: 7, parts: 4 }, 20);
        assert!(r.changed && r.refused.is_none(), "{r:?}");
        assert_eq!(s.policies.len(), 5000);
        assert!(
            ev[0].message.contains("policies +5000"),
            "{}",
            ev[0].message
        );
        assert!(s.staging.is_empty());
    }

    /// A policy with more CIDRs than one entry carries is staged as the policy with one CIDR
    /// of each list, then fragments; the commit puts it back together exactly, in order, and
    /// a fragment alone, or one whose policy is not in the change, is refused.
    #[test]
    fn a_policy_with_very_many_cidrs_is_staged_in_fragments_and_committed_whole() {
        let net = |i: u32| -> IpNet {
            format!("{}.{}.{}.0/24", 10 + i / 65_536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap()
        };
        let mut big = policy("big", "a");
        big.destination_cidrs = (0..100_000).map(|i| net(2 * i)).collect();
        big.source_cidrs = (0..3).map(|i| net(1_000_000 + i)).collect();
        big.excluded_cidrs = (0..5).map(|i| net(2 * i + 1)).collect();
        let cmd = Command::SeedObjects {
            gateways: vec![gw("a")],
            policies: vec![policy("small", "a"), big.clone()],
        };
        let mut trimmed = cmd.clone();
        let fragments = trimmed.cut_large_policies(16_384);
        assert_eq!(
            fragments.len(),
            7,
            "100 007 CIDRs less the 3 kept, 16 384 at a time"
        );
        assert!(fragments.iter().all(|f| f.format() == 4));
        let mut parts = trimmed.split(500);
        parts.extend(fragments.clone());
        assert_eq!(Command::merge(parts.clone()), Some(cmd.clone()));
        let mut s = ClusterState::default();
        for (i, p) in parts.iter().enumerate() {
            let r = s.apply(&Command::Stage {
                txn: 9,
                part: i as u32,
                command: Box::new(p.clone()),
            });
            assert!(r.refused.is_none(), "{r:?}");
        }
        let r = s.apply(&Command::Commit {
            txn: 9,
            parts: parts.len() as u32,
        });
        assert!(r.changed && r.refused.is_none(), "{r:?}");
        assert_eq!(s.policies.get("big").map(|p| (**p).clone()), Some(big));
        // A fragment is never applied alone, nor merged into a change without its policy.
        let r = s.apply(&fragments[0]);
        assert!(r.refused.is_some_and(|w| w.contains("staged")));
        let orphan = vec![
            Command::Apply {
                gateways: vec![],
                policies: vec![policy("other", "a")],
            },
            fragments[0].clone(),
        ];
        assert_eq!(Command::merge(orphan), None);
        // Small policies are left alone.
        let mut small = Command::Apply {
            gateways: vec![],
            policies: vec![policy("other", "a")],
        };
        assert!(small.cut_large_policies(16_384).is_empty());
    }

    /// A commit whose parts break a rule, miss a part or arrive out of order changes nothing.
    #[test]
    fn a_staged_change_is_refused_whole() {
        let mut s = ClusterState::default();
        s.apply(&Command::Apply {
            gateways: vec![gw("a")],
            policies: vec![],
        });
        let before = s.clone();
        let mut bad = many(3000, "a");
        bad[2999].source_cidrs = vec!["10.0.0.1/24".parse().unwrap()]; // host bits set
        let parts = Command::Apply {
            gateways: vec![],
            policies: bad,
        }
        .split(2000);
        let n = parts.len() as u32;
        for (i, p) in parts.into_iter().enumerate() {
            s.apply(&Command::Stage {
                txn: 1,
                part: i as u32,
                command: Box::new(p),
            });
        }
        let r = s.apply(&Command::Commit { txn: 1, parts: n });
        let why = r.refused.unwrap_or_default();
        assert!(
            why.contains("p002999") && why.contains("host bits"),
            "{why}"
        );
        s.staging.clear();
        assert_eq!(s, before, "a refused commit changes nothing");
        // A part out of order drops the transaction; a commit of a partial one is refused.
        s.apply(&Command::Stage {
            txn: 2,
            part: 0,
            command: Box::new(Command::Apply {
                gateways: vec![],
                policies: many(1, "a"),
            }),
        });
        let r = s.apply(&Command::Stage {
            txn: 2,
            part: 2,
            command: Box::new(Command::Apply {
                gateways: vec![],
                policies: many(1, "a"),
            }),
        });
        assert!(r.refused.is_some());
        assert!(
            s.apply(&Command::Commit { txn: 2, parts: 3 })
                .refused
                .is_some()
        );
        assert_eq!(s, before);
        // An abandoned transaction is dropped once STAGE_TTL entries have passed.
        s.apply_described(
            &Command::Stage {
                txn: 3,
                part: 0,
                command: Box::new(Command::Apply {
                    gateways: vec![],
                    policies: many(1, "a"),
                }),
            },
            5,
        );
        s.apply_described(
            &Command::Stage {
                txn: 4,
                part: 0,
                command: Box::new(Command::Apply {
                    gateways: vec![],
                    policies: many(1, "a"),
                }),
            },
            6 + STAGE_TTL,
        );
        assert_eq!(s.staging.keys().collect::<Vec<_>>(), [&4]);
    }

    /// A reload commits the difference only, and a file whose objects are committed already
    /// commits nothing at all; the digest says which file a node applied last.
    #[test]
    fn a_reload_carries_only_the_difference() {
        let mut s = ClusterState::default();
        let pols = many(100, "a");
        s.apply(&Command::SeedObjects {
            gateways: vec![gw("a")],
            policies: pols.clone(),
        });
        assert!(
            s.file_change("n1", &[gw("a")], &pols).is_some(),
            "no digest recorded yet"
        );
        let c = s.file_change("n1", &[gw("a")], &pols).unwrap();
        assert_eq!(c.object_count(), 0);
        s.apply(&c);
        assert!(s.file_change("n1", &[gw("a")], &pols).is_none());
        let mut edited = pols.clone();
        edited[5].destination_cidrs = vec!["192.0.2.0/24".parse().unwrap()];
        edited.pop();
        let c = s.file_change("n1", &[gw("a")], &edited).unwrap();
        match &c {
            Command::FileObjects {
                policies,
                delete_policies,
                gateways,
                ..
            } => {
                assert_eq!(policies.len(), 1);
                assert_eq!(delete_policies, &["p000099".to_string()]);
                assert!(gateways.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(s.apply(&c).changed);
        assert_eq!(s.policies.len(), 99);
        assert_eq!(*s.policies["p000005"], edited[5]);
        assert_eq!(
            s.file_digests["n1"],
            file_digest(&[gw("a")], &edited),
            "the digest of what n1 applied"
        );
    }

    /// The rules are checked for what changed, against the committed set: a changed gateway's
    /// policies, a removed gateway's users, a policy's own gateway.
    #[test]
    fn the_rules_see_the_whole_committed_set() {
        let mut s = ClusterState::default();
        let mut p = policy("p", "v");
        p.destination_cidrs = vec!["0.0.0.0/0".parse().unwrap()];
        s.apply(&Command::Apply {
            gateways: vec![vip("v", "198.18.0.50"), gw("b")],
            policies: vec![p],
        });
        let before = s.clone();
        // The gateway becomes IPv6: its IPv4 policy could no longer be SNATed.
        let r = s.apply(&Command::Apply {
            gateways: vec![vip("v", "fd00::50")],
            policies: vec![],
        });
        assert!(r.refused.unwrap_or_default().contains("IPv4"));
        assert_eq!(s, before);
        // A reload removing the file gateway a file policy uses: refused.
        let c = Command::FileObjects {
            node: "n1".into(),
            gateways: vec![],
            policies: vec![],
            delete_gateways: vec!["v".into()],
            delete_policies: vec![],
            digest: "x".into(),
        };
        s.apply(&Command::SeedObjects {
            gateways: vec![],
            policies: vec![],
        });
        let r = s.apply(&c);
        assert!(
            r.refused.is_none(),
            "v is an API gateway: the file cannot delete it"
        );
        assert!(s.gateways.contains_key("v"));
    }

    /// At 100 000 policies, a one-policy change costs a few map updates, not a copy of the set.
    /// Run with `--ignored --nocapture` in a release build for the figures.
    #[test]
    #[ignore]
    fn figures_100k() {
        let mut s = ClusterState::default();
        let t = std::time::Instant::now();
        let cmd = Command::SeedObjects {
            gateways: vec![gw("a")],
            policies: many(100_000, "a"),
        };
        for (i, p) in cmd.split(2000).into_iter().enumerate() {
            s.apply(&Command::Stage {
                txn: 1,
                part: i as u32,
                command: Box::new(p),
            });
        }
        let r = s.apply(&Command::Commit { txn: 1, parts: 51 });
        assert!(r.changed, "{r:?}");
        println!(
            "seed of 100 000 policies, staged and committed: {:?}",
            t.elapsed()
        );
        let mut times = Vec::new();
        for i in 0..50 {
            let mut p = (*s.policies["p000007"]).clone();
            p.destination_cidrs = vec![format!("192.0.{i}.0/24").parse().unwrap()];
            let readers = s.clone(); // a reader holds the previous version, as the agent does
            let t = std::time::Instant::now();
            s.apply(&Command::Apply {
                gateways: vec![],
                policies: vec![p],
            });
            times.push(t.elapsed());
            drop(readers);
        }
        times.sort();
        println!(
            "one-policy apply at 100 000: median {:?}, max {:?}",
            times[25], times[49]
        );
        let t = std::time::Instant::now();
        let bytes = crate::cluster::codec::to_store(&s).unwrap();
        println!("snapshot encode: {:?}, {} bytes", t.elapsed(), bytes.len());
        let t = std::time::Instant::now();
        let back: ClusterState = crate::cluster::codec::from_store(&bytes).unwrap();
        println!("snapshot decode: {:?}", t.elapsed());
        assert_eq!(back.policies.len(), 100_000);
    }

    #[test]
    fn error_keys_name_the_objects() {
        let p = policy("office", "g");
        assert_eq!(
            name_key("policy[0].source_cidrs[1]", &[], &[p]),
            "policy \"office\".source_cidrs[1]"
        );
        assert_eq!(name_key("gateway[7].name", &[], &[]), "gateway[7].name");
        assert_eq!(name_key("", &[], &[]), "");
    }

    #[test]
    fn assignment_reasons_count_failovers_and_handovers_and_become_events() {
        let mut s = ClusterState::default();
        s.apply(&Command::Apply {
            gateways: vec![gw("g")],
            policies: vec![],
        });
        let assign = |to: Option<&str>, reason: Reason, at: u64| Command::Assign {
            changes: vec![AssignChange {
                gateway: "g".into(),
                to: to.map(String::from),
                reason,
            }],
            at_unix_ms: at,
        };
        let (_, ev) = s.apply_described(&assign(Some("gw1"), Reason::Elected, 10), 0);
        assert_eq!(ev[0].kind, EventKind::Elected);
        let failover = Reason::Failover {
            from: "gw1".into(),
            silent_ms: 260,
        };
        let (_, ev) = s.apply_described(&assign(Some("gw2"), failover.clone(), 20), 0);
        assert_eq!(ev[0].kind, EventKind::Failover);
        assert!(
            ev[0].message.contains("silent for 260 ms"),
            "{}",
            ev[0].message
        );
        // The same change again is no change: no event, no count.
        let (r, ev) = s.apply_described(&assign(Some("gw2"), failover, 30), 0);
        assert!(!r.changed && ev.is_empty());
        let handover = Reason::Handover {
            from: "gw2".into(),
            why: "cordoned".into(),
        };
        s.apply(&assign(None, handover, 40));
        s.apply(&assign(Some("gw1"), Reason::Elected, 50));
        let st = &s.stats["g"];
        assert_eq!(
            (st.failovers, st.last_failover_detect_ms, st.handovers),
            (1, Some(260), 1)
        );
        assert_eq!(st.active_since_unix_ms, Some(50));
        for k in [EventKind::ConfigRejected, EventKind::Takeover] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        let (_, ev) = s.apply_described(&Command::Cordon("gw1".into()), 0);
        assert_eq!(
            (ev[0].kind, ev[0].node.as_deref()),
            (EventKind::Cordon, Some("gw1"))
        );
    }
}
