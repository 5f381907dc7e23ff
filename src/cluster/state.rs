//! The replicated state machine's data and its pure `apply`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{Assignment, Gateway, Labels, NodeName, Policy};

/// Everything the cluster agrees on. Every node applies the same commands in the same order and
/// so holds the same value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub gateways: BTreeMap<String, Gateway>,
    pub policies: BTreeMap<String, Policy>,
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
    /// The desired cluster members, name → peer address. The leader moves Raft's membership
    /// towards it (the first five by name vote, the others are learners).
    pub members: BTreeMap<NodeName, String>,
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
    /// Replace all gateways and policies (SIGHUP reload of a file, `apply` of a full set).
    ReplaceObjects {
        gateways: Vec<Gateway>,
        policies: Vec<Policy>,
    },
    PutGateway(Gateway),
    DeleteGateway(String),
    PutPolicy(Policy),
    DeletePolicy(String),
    Cordon(NodeName),
    Uncordon(NodeName),
    /// `value: None` removes the label.
    SetLabel {
        node: NodeName,
        key: String,
        value: Option<String>,
    },
    /// Set (or clear, with `None`) the active node of gateways.
    Assign(Vec<(String, Option<NodeName>)>),
    /// The member list of a node's file at start-up: applied only while none is known.
    SeedMembers(Vec<(NodeName, String)>),
    /// Replace the desired member list (a reloaded `cluster.peers`, or the admin API).
    SetMembers(Vec<(NodeName, String)>),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    /// False when the command changed nothing (e.g. a seed after the cluster was seeded).
    pub changed: bool,
}

impl ClusterState {
    pub fn apply(&mut self, cmd: &Command) -> CommandResponse {
        let before = self.clone();
        match cmd {
            Command::SeedObjects { gateways, policies } => {
                if !self.seeded {
                    self.replace_objects(gateways, policies);
                }
            }
            Command::ReplaceObjects { gateways, policies } => {
                self.replace_objects(gateways, policies);
            }
            Command::PutGateway(g) => {
                self.gateways.insert(g.name.clone(), g.clone());
            }
            Command::DeleteGateway(name) => {
                self.gateways.remove(name);
                self.drop_orphans();
            }
            Command::PutPolicy(p) => {
                self.policies.insert(p.name.clone(), p.clone());
            }
            Command::DeletePolicy(name) => {
                self.policies.remove(name);
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
            Command::Assign(changes) => {
                for (gw, node) in changes {
                    if !self.gateways.contains_key(gw) {
                        continue;
                    }
                    let old = self.assignment.get(gw);
                    if old == node.as_ref() {
                        continue;
                    }
                    match node {
                        Some(n) => self.assignment.insert(gw.clone(), n.clone()),
                        None => self.assignment.remove(gw),
                    };
                    *self.epochs.entry(gw.clone()).or_default() += 1;
                }
            }
        }
        CommandResponse {
            changed: *self != before,
        }
    }

    fn replace_objects(&mut self, gateways: &[Gateway], policies: &[Policy]) {
        self.gateways = gateways
            .iter()
            .map(|g| (g.name.clone(), g.clone()))
            .collect();
        self.policies = policies
            .iter()
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        self.seeded = true;
        self.drop_orphans();
    }

    /// Assignments of gateways that no longer exist.
    fn drop_orphans(&mut self) {
        let gateways = &self.gateways;
        self.assignment.retain(|g, _| gateways.contains_key(g));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Selection, SourceIp};

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
        s.apply(&Command::PutGateway(gw("a")));
        let assign = |n: Option<&str>| Command::Assign(vec![("a".into(), n.map(String::from))]);
        assert!(s.apply(&assign(Some("gw1"))).changed);
        assert!(!s.apply(&assign(Some("gw1"))).changed);
        assert!(s.apply(&assign(None)).changed);
        assert_eq!(s.epochs["a"], 2);
        assert!(
            !s.apply(&Command::Assign(vec![("zz".into(), Some("gw1".into()))]))
                .changed
        );
    }

    #[test]
    fn deleting_a_gateway_drops_its_assignment() {
        let mut s = ClusterState::default();
        s.apply(&Command::PutGateway(gw("a")));
        s.apply(&Command::Assign(vec![("a".into(), Some("gw1".into()))]));
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
}
