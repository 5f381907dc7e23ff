//! The cluster: Raft (openraft) replicating the desired state and the assignment, its durable
//! store, its authenticated HTTP transport, and the leader's controller.

pub mod campaign;
pub mod codec;
pub mod controller;
pub mod node;
pub mod state;
pub mod store;
pub mod transport;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use state::{ClusterState, Command, CommandResponse};

/// A Raft member: its name (what operators see) and peer address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = codec::Versioned,
        R = CommandResponse,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;

/// Raft needs numeric ids; operators name nodes. The id is derived from the name so that every
/// node computes the same id for a peer without coordination, and a renamed node is a new node.
pub fn node_id(name: &str) -> NodeId {
    let digest = Sha256::digest(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    // Zero is openraft's default id; keep clear of it.
    u64::from_be_bytes(b).max(1)
}
