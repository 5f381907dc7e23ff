//! Decoding of everything a peer sends (after its TLS handshake: a member's bytes, which a bug
//! or a newer version may still make odd): Raft's RPCs, log entries with their format, reports,
//! forwarded writes, and the stored forms read back from disk. Decoded or refused, never a
//! panic.
#![no_main]

use egressd::cluster::codec::{Versioned, from_store, from_wire};
use egressd::cluster::controller::Report;
use egressd::cluster::state::ClusterState;
use egressd::cluster::{Command, NodeId, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

fuzz_target!(|data: &[u8]| {
    let _ = from_wire::<AppendEntriesRequest<TypeConfig>>(data);
    let _ = from_wire::<VoteRequest<NodeId>>(data);
    let _ = from_wire::<InstallSnapshotRequest<TypeConfig>>(data);
    let _ = from_wire::<Report>(data);
    let _ = from_wire::<Command>(data);
    let _ = from_wire::<Versioned>(data);
    let _ = from_store::<openraft::Entry<TypeConfig>>(data);
    let _ = from_store::<ClusterState>(data);
});
