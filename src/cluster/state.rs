//! The replicated state machine's data and its pure `apply`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{Assignment, Gateway, Labels, NodeName, Policy};

/// Everything the cluster agrees on. Every node applies the same commands in the same order and
/// so holds the same value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
// A snapshot written by an older version lacks the newer fields: they start empty.
#[serde(default)]
pub struct ClusterState {
    /// Shared (copy on write): every command clones the state to tell whether it changed, and
    /// with many policies a deep copy would hold up the assignments behind it in the log.
    pub gateways: Arc<BTreeMap<String, Gateway>>,
    pub policies: Arc<BTreeMap<String, Policy>>,
    /// Objects written through the admin API (`egressd apply`). A reloaded configuration file
    /// replaces only the file's objects and never overwrites these (see `Command::ReplaceObjects`).
    pub api_objects: BTreeSet<ObjectRef>,
    /// Whether any node's configuration file has seeded the objects yet (see `SeedObjects`).
    pub seeded: bool,
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
}

/// A gateway or a policy, by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// A reloaded configuration file: replaces the objects that came from a file. Objects
    /// written through the API stay, and win over a file object of the same name.
    ReplaceObjects {
        gateways: Vec<Gateway>,
        policies: Vec<Policy>,
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// False when the command changed nothing (e.g. a seed after the cluster was seeded).
    pub changed: bool,
    /// Why the command was refused; a refused command changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The log index of the entry (set by the store): a node that forwarded the command waits
    /// until it has applied this far, so that its own reads see the change.
    #[serde(default)]
    pub index: u64,
}

impl ClusterState {
    pub fn apply(&mut self, cmd: &Command) -> CommandResponse {
        self.apply_described(cmd).0
    }

    /// `apply`, and what the change was, for the event list.
    pub fn apply_described(&mut self, cmd: &Command) -> (CommandResponse, Vec<EventDraft>) {
        if let Err(why) = self.check(cmd) {
            let response = CommandResponse {
                changed: false,
                refused: Some(why),
                index: 0,
            };
            return (response, Vec::new());
        }
        let before = self.clone();
        match cmd {
            Command::SeedObjects { gateways, policies } => {
                if !self.seeded {
                    self.replace_file_objects(gateways, policies);
                }
            }
            Command::ReplaceObjects { gateways, policies } => {
                self.replace_file_objects(gateways, policies);
            }
            Command::Apply { gateways, policies } => {
                for g in gateways {
                    Arc::make_mut(&mut self.gateways).insert(g.name.clone(), g.clone());
                    self.api_objects.insert(ObjectRef::Gateway(g.name.clone()));
                }
                for p in policies {
                    Arc::make_mut(&mut self.policies).insert(p.name.clone(), p.clone());
                    self.api_objects.insert(ObjectRef::Policy(p.name.clone()));
                }
            }
            Command::DeleteGateway(name) => {
                Arc::make_mut(&mut self.gateways).remove(name);
                self.api_objects.remove(&ObjectRef::Gateway(name.clone()));
                self.drop_orphans();
            }
            Command::DeletePolicy(name) => {
                Arc::make_mut(&mut self.policies).remove(name);
                self.api_objects.remove(&ObjectRef::Policy(name.clone()));
            }
            Command::Cordon(node) => {
                self.cordoned.insert(node.clone());
            }
            Command::Uncordon(node) => {
                self.cordoned.remove(node);
            }
            Command::SetLabel { node, key, value } => {
                self.label_overrides
                    .entry(node.clone())
                    .or_default()
                    .insert(key.clone(), value.clone());
            }
            Command::SeedMembers(members) => {
                if self.members.is_empty() {
                    self.members = members.iter().cloned().collect();
                }
            }
            Command::SetMembers(members) if !members.is_empty() => {
                self.members = members.iter().cloned().collect();
            }
            // An empty member list would leave no cluster: ignored.
            Command::SetMembers(_) => {}
            Command::Assign {
                changes,
                at_unix_ms,
            } => {
                for ch in changes {
                    self.assign(ch, *at_unix_ms);
                }
            }
        }
        let changed = *self != before;
        let objects_changed = matches!(
            cmd,
            Command::SeedObjects { .. } | Command::ReplaceObjects { .. } | Command::Apply { .. }
        );
        if changed
            && objects_changed
            && let Err(why) = self.check_object_rules()
        {
            *self = before;
            let response = CommandResponse {
                changed: false,
                refused: Some(why),
                index: 0,
            };
            return (response, Vec::new());
        }
        let events = if changed {
            describe(cmd, &before, self)
        } else {
            Vec::new()
        };
        let response = CommandResponse {
            changed,
            refused: None,
            index: 0,
        };
        (response, events)
    }

    /// Why `cmd` must not be applied to this state, if it must not. Deterministic: every node
    /// refuses the same commands.
    pub fn check(&self, cmd: &Command) -> Result<(), String> {
        match cmd {
            Command::Apply { gateways, policies } => {
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
            Command::DeleteGateway(name) => {
                if !self.gateways.contains_key(name) {
                    return Err(format!("no gateway named {name:?}"));
                }
                let users: Vec<&str> = self
                    .policies
                    .values()
                    .filter(|p| &p.egress_gateway_name == name)
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
            _ => Ok(()),
        }
    }

    /// The configuration file's rules (names, interfaces, CIDRs, shared VIPs, references) over
    /// the whole committed set, whatever source each object came from.
    fn check_object_rules(&self) -> Result<(), String> {
        let gateways = self.gateway_list();
        let policies = self.policy_list();
        let errors = crate::config::check_objects(&gateways, &policies);
        if errors.is_empty() {
            return Ok(());
        }
        const SHOWN: usize = 10;
        let mut out: Vec<String> = errors
            .iter()
            .take(SHOWN)
            .map(|e| format!("{}: {}", name_key(&e.key, &gateways, &policies), e.message))
            .collect();
        if errors.len() > SHOWN {
            out.push(format!("and {} more", errors.len() - SHOWN));
        }
        Err(out.join("; "))
    }

    fn assign(&mut self, ch: &AssignChange, at_unix_ms: u64) {
        if !self.gateways.contains_key(&ch.gateway) {
            return;
        }
        let gw = &ch.gateway;
        if self.assignment.get(gw) == ch.to.as_ref() {
            return;
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
    }

    /// The file's objects replace the file's objects; API objects stay and win on a name clash.
    fn replace_file_objects(&mut self, gateways: &[Gateway], policies: &[Policy]) {
        let api = &self.api_objects;
        let own_gateways = Arc::make_mut(&mut self.gateways);
        own_gateways.retain(|n, _| api.contains(&ObjectRef::Gateway(n.clone())));
        for g in gateways {
            own_gateways
                .entry(g.name.clone())
                .or_insert_with(|| g.clone());
        }
        let own_policies = Arc::make_mut(&mut self.policies);
        own_policies.retain(|n, _| api.contains(&ObjectRef::Policy(n.clone())));
        for p in policies {
            own_policies
                .entry(p.name.clone())
                .or_insert_with(|| p.clone());
        }
        self.seeded = true;
        self.drop_orphans();
    }

    /// Assignments and statistics of gateways that no longer exist.
    fn drop_orphans(&mut self) {
        let gateways = &self.gateways;
        self.assignment.retain(|g, _| gateways.contains_key(g));
        self.stats.retain(|g, _| gateways.contains_key(g));
    }

    /// Policies that name a gateway that does not exist (they select nothing).
    pub fn orphaned_policies(&self) -> Vec<&Policy> {
        self.policies
            .values()
            .filter(|p| !self.gateways.contains_key(&p.egress_gateway_name))
            .collect()
    }

    /// Where a node's configuration file disagrees with the committed objects: file objects
    /// missing or different, committed file objects the file no longer has, and file objects
    /// shadowed by an API object of the same name.
    pub fn drift(&self, file_gateways: &[Gateway], file_policies: &[Policy]) -> Vec<String> {
        let mut out = Vec::new();
        fn compare<T: PartialEq>(
            out: &mut Vec<String>,
            api: &BTreeSet<ObjectRef>,
            committed: &BTreeMap<String, T>,
            file: &[(String, &T)],
            make: fn(String) -> ObjectRef,
        ) {
            for (name, obj) in file {
                let r = make(name.clone());
                match committed.get(name) {
                    _ if api.contains(&r) => out.push(format!(
                        "{r}: the file's definition is overridden by `apply`"
                    )),
                    None => out.push(format!("{r}: in the file, not committed")),
                    Some(c) if c != *obj => {
                        out.push(format!("{r}: the file differs from the committed one"))
                    }
                    Some(_) => {}
                }
            }
            for name in committed.keys() {
                let r = make(name.clone());
                if !api.contains(&r) && !file.iter().any(|(n, _)| n == name) {
                    out.push(format!(
                        "{r}: committed from a file, not in this node's file"
                    ));
                }
            }
        }
        let fg: Vec<(String, &Gateway)> =
            file_gateways.iter().map(|g| (g.name.clone(), g)).collect();
        let fp: Vec<(String, &Policy)> =
            file_policies.iter().map(|p| (p.name.clone(), p)).collect();
        compare(
            &mut out,
            &self.api_objects,
            &self.gateways,
            &fg,
            ObjectRef::Gateway,
        );
        compare(
            &mut out,
            &self.api_objects,
            &self.policies,
            &fp,
            ObjectRef::Policy,
        );
        out
    }

    /// A node's labels: its config file's labels with the runtime overrides applied.
    pub fn effective_labels(&self, node: &str, file_labels: &Labels) -> Labels {
        let mut labels = file_labels.clone();
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
        self.policies.values().cloned().collect()
    }
}

/// `gateway[3].name` → `gateway "office".name`: the index into the committed lists means nothing
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

/// What an applied command that changed the state did, for the event list and its log line.
fn describe(cmd: &Command, before: &ClusterState, after: &ClusterState) -> Vec<EventDraft> {
    let one = |kind: EventKind, node: Option<&str>, gateway: Option<&str>, message: String| {
        vec![EventDraft {
            kind,
            node: node.map(str::to_owned),
            gateway: gateway.map(str::to_owned),
            message,
        }]
    };
    let objects = |what: &str| {
        let added_g = after
            .gateways
            .keys()
            .filter(|g| !before.gateways.contains_key(*g))
            .count();
        let removed_g = before
            .gateways
            .keys()
            .filter(|g| !after.gateways.contains_key(*g))
            .count();
        let changed_g = after
            .gateways
            .iter()
            .filter(|(n, g)| before.gateways.get(*n).is_some_and(|b| b != *g))
            .count();
        let added_p = after
            .policies
            .keys()
            .filter(|p| !before.policies.contains_key(*p))
            .count();
        let removed_p = before
            .policies
            .keys()
            .filter(|p| !after.policies.contains_key(*p))
            .count();
        let changed_p = after
            .policies
            .iter()
            .filter(|(n, p)| before.policies.get(*n).is_some_and(|b| b != *p))
            .count();
        format!(
            "{what}: gateways +{added_g} -{removed_g} ~{changed_g}, policies +{added_p} \
             -{removed_p} ~{changed_p} (now {} gateways, {} policies)",
            after.gateways.len(),
            after.policies.len()
        )
    };
    match cmd {
        Command::SeedObjects { .. } => {
            one(EventKind::Config, None, None, objects("seeded from a file"))
        }
        Command::ReplaceObjects { .. } => one(
            EventKind::Config,
            None,
            None,
            objects("configuration file reloaded"),
        ),
        Command::Apply { .. } => one(EventKind::Config, None, None, objects("applied")),
        Command::DeleteGateway(n) => one(
            EventKind::Config,
            None,
            Some(n),
            format!("gateway {n} deleted"),
        ),
        Command::DeletePolicy(n) => {
            one(EventKind::Config, None, None, format!("policy {n} deleted"))
        }
        Command::Cordon(n) => one(EventKind::Cordon, Some(n), None, format!("{n} cordoned")),
        Command::Uncordon(n) => one(
            EventKind::Uncordon,
            Some(n),
            None,
            format!("{n} uncordoned"),
        ),
        Command::SetLabel { node, key, value } => one(
            EventKind::Label,
            Some(node),
            None,
            match value {
                Some(v) => format!("{node}: label {key}={v} set"),
                None => format!("{node}: label {key} removed"),
            },
        ),
        Command::SeedMembers(_) | Command::SetMembers(_) => one(
            EventKind::Members,
            None,
            None,
            format!(
                "members: {}",
                after.members.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ),
        Command::Assign { changes, .. } => changes
            .iter()
            .filter(|ch| before.assignment.get(&ch.gateway) != after.assignment.get(&ch.gateway))
            .map(|ch| {
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
            })
            .collect(),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Selection, SourceIp};

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

    fn policy(name: &str, gateway: &str) -> Policy {
        Policy {
            name: name.into(),
            egress_gateway_name: gateway.into(),
            source_cidrs: vec!["10.0.0.0/24".parse().unwrap()],
            destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            excluded_cidrs: vec![],
        }
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
        let replace = Command::ReplaceObjects {
            gateways: vec![gw("b")],
            policies: vec![],
        };
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
        s.apply(&Command::ReplaceObjects {
            gateways: vec![gw("f1"), gw("f3"), gw("api")],
            policies: vec![policy("fp", "f1")],
        });
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
        let r = s.apply(&Command::ReplaceObjects {
            gateways: vec![],
            policies: vec![],
        });
        let why = r.refused.unwrap_or_default();
        assert!(
            why.contains("policy \"ap\".egress_gateway_name") && why.contains("f1"),
            "{why}"
        );
        assert_eq!(s, before, "a refused reload changes nothing");
        // A file gateway with the api gateway's VIP: two nodes could hold one address.
        let r = s.apply(&Command::ReplaceObjects {
            gateways: vec![gw("f1"), vip("file-vip", "198.18.0.50")],
            policies: vec![],
        });
        let why = r.refused.unwrap_or_default();
        assert!(why.contains("198.18.0.50"), "{why}");
        assert_eq!(s, before);
        assert!(s.orphaned_policies().is_empty());
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
        let (_, ev) = s.apply_described(&assign(Some("gw1"), Reason::Elected, 10));
        assert_eq!(ev[0].kind, EventKind::Elected);
        let failover = Reason::Failover {
            from: "gw1".into(),
            silent_ms: 260,
        };
        let (_, ev) = s.apply_described(&assign(Some("gw2"), failover.clone(), 20));
        assert_eq!(ev[0].kind, EventKind::Failover);
        assert!(
            ev[0].message.contains("silent for 260 ms"),
            "{}",
            ev[0].message
        );
        // The same change again is no change: no event, no count.
        let (r, ev) = s.apply_described(&assign(Some("gw2"), failover, 30));
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
        let (_, ev) = s.apply_described(&Command::Cordon("gw1".into()));
        assert_eq!(
            (ev[0].kind, ev[0].node.as_deref()),
            (EventKind::Cordon, Some("gw1"))
        );
    }
}
