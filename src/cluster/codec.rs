//! How cluster data is encoded: MessagePack (compact) for the Raft log, snapshots and the peer
//! RPCs, with a format byte on everything stored and a format number on every command.
//!
//! Why MessagePack: a policy takes ~45 bytes instead of ~130 in JSON and decodes several times
//! faster, which is what keeps a 100 000-policy snapshot or a large change's log entries within
//! a heartbeat on the follower.
//!
//! Versions:
//! - every stored value (log entry, vote, snapshot) starts with [`STORE_FORMAT`]; a store written
//!   by another format is refused with a message, never misread (egressd 0.1 stored JSON);
//! - every command carries the format that introduced its kind ([`Command::format`]), at most
//!   [`COMMAND_FORMAT`]: a node refuses an entry of a newer format than it knows (it cannot know
//!   what it means) instead of misapplying it, and says so. Because an entry carries its kind's
//!   format rather than the writer's, a node of an older version reads every entry of the kinds
//!   it knows, whichever version wrote it: that is what lets a cluster run mixed versions during
//!   a rolling upgrade, as long as no newer kind is proposed — which the leader ensures
//!   (`ClusterNode::propose`: a kind of format N only once every member reports N or more).
//!
//! Formats: 1 — the commands of the versions before mutual TLS; 2 — `InitCluster` (the cluster
//! id), `AddMember`, `RemoveMember`; 3 — `KubeObjects`, `KubeNodes` (the Kubernetes adapter);
//! 4 — `PolicyCidrs` (a policy too large for one entry); 5 — `ClusterFormat` (the format every
//! member reads, recorded so that a new leader need not hear from each member again); 6 —
//! `EditPolicyCidrs` (CIDRs added to or removed from one policy).

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Command;

/// The format byte of every stored value: 2 = MessagePack (1 was egressd 0.1's JSON, which had
/// no format byte).
pub const STORE_FORMAT: u8 = 2;

/// The newest command format this egressd reads (and so the newest kind it may write).
pub const COMMAND_FORMAT: u16 = 6;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encoding: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error(
        "the store was written by egressd 0.1 (JSON); this version stores MessagePack. See the \
         README's upgrade notes: upgrade every node together, with a fresh data_dir"
    )]
    OldStore,
    #[error("an empty stored value")]
    Empty,
    #[error(
        "a stored value of format {0}; this egressd reads format {STORE_FORMAT}: it was written \
         by a newer egressd (see the README's upgrade and rollback notes)"
    )]
    NewerStore(u8),
}

/// Encodes a value for the store: the format byte, then MessagePack.
pub fn to_store<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![STORE_FORMAT];
    rmp_serde::encode::write(&mut out, v)?;
    Ok(out)
}

/// Decodes a stored value, refusing one of another format.
pub fn from_store<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    match b.first() {
        None => Err(CodecError::Empty),
        Some(&STORE_FORMAT) => Ok(rmp_serde::from_slice(&b[1..])?),
        Some(b'{' | b'[' | b'"' | b'n' | b't' | b'f' | b'0'..=b'9') => Err(CodecError::OldStore),
        Some(&f) => Err(CodecError::NewerStore(f)),
    }
}

/// Encodes an RPC body.
pub fn to_wire<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec(v)?)
}

/// Decodes an RPC body.
pub fn from_wire<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    Ok(rmp_serde::from_slice(b)?)
}

/// A command as the Raft log holds it: with the format it was written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned(pub Command);

impl Serialize for Versioned {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.0.format())?;
        t.serialize_element(&self.0)?;
        t.end()
    }
}

impl<'de> Deserialize<'de> for Versioned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Versioned;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a command format and a command")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Versioned, A::Error> {
                let format: u16 = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                if format > COMMAND_FORMAT {
                    return Err(serde::de::Error::custom(format!(
                        "a log entry in command format {format}, newer than this egressd \
                         ({}) reads ({COMMAND_FORMAT}): upgrade this node before the cluster \
                         uses newer commands",
                        env!("CARGO_PKG_VERSION")
                    )));
                }
                let cmd: Command = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(1, &self))?;
                Ok(Versioned(cmd))
            }
        }
        d.deserialize_tuple(2, V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_round_trip_and_other_formats_are_refused() {
        let cmd = Versioned(Command::Cordon("gw1".into()));
        let b = to_store(&cmd).unwrap();
        assert_eq!(b[0], STORE_FORMAT);
        assert_eq!(from_store::<Versioned>(&b).unwrap(), cmd);
        let json = serde_json::to_vec(&serde_json::json!({"Cordon": "gw1"})).unwrap();
        let e = from_store::<Versioned>(&json).unwrap_err();
        assert!(e.to_string().contains("egressd 0.1"), "{e}");
        let mut newer = b.clone();
        newer[0] = 9;
        let e = from_store::<Versioned>(&newer).unwrap_err();
        assert!(e.to_string().contains("format 9"), "{e}");
    }

    #[test]
    fn a_command_of_a_newer_format_is_refused_with_a_clear_message() {
        let mut b = Vec::new();
        rmp_serde::encode::write(&mut b, &(COMMAND_FORMAT + 1, "SomethingNew")).unwrap();
        let e = from_wire::<Versioned>(&b).unwrap_err();
        assert!(
            e.to_string()
                .contains("command format 7, newer than this egressd"),
            "{e}"
        );
        let ok = to_wire(&Versioned(Command::Uncordon("n".into()))).unwrap();
        assert_eq!(
            from_wire::<Versioned>(&ok).unwrap().0,
            Command::Uncordon("n".into())
        );
    }

    /// An entry carries its kind's format, not the writer's: what the versions before mutual TLS
    /// could read is still written as format 1, so a node of that format reads it.
    #[test]
    fn an_entry_carries_the_format_of_its_kind() {
        let format_of = |c: Command| -> u16 {
            let b = to_wire(&Versioned(c)).unwrap();
            let (f, _): (u16, serde::de::IgnoredAny) = rmp_serde::from_slice(&b).unwrap();
            f
        };
        assert_eq!(format_of(Command::Cordon("n".into())), 1);
        assert_eq!(
            format_of(Command::AddMember {
                name: "gw4".into(),
                address: "10.0.0.4:7480".into()
            }),
            2
        );
        let staged = Command::Stage {
            txn: 1,
            part: 0,
            command: Box::new(Command::Apply {
                gateways: vec![],
                policies: vec![],
            }),
        };
        assert_eq!(format_of(staged), 1);
        // Every kind's format is one this egressd reads.
        for c in [
            Command::InitCluster { id: "0".repeat(32) },
            Command::RemoveMember { name: "x".into() },
            Command::EditPolicyCidrs {
                policy: "p".into(),
                add: Default::default(),
                remove: Default::default(),
            },
        ] {
            assert!(c.format() <= COMMAND_FORMAT);
        }
    }

    #[test]
    fn a_policy_takes_a_third_of_its_json_size() {
        let p = crate::model::Policy {
            name: "p-00001".into(),
            egress_gateway_name: "gw".into(),
            source_cidrs: vec!["10.0.0.1/32".parse().unwrap()],
            destination_cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            excluded_cidrs: vec![],
        };
        let m = to_wire(&p).unwrap().len();
        let j = serde_json::to_vec(&p).unwrap().len();
        assert!(m * 2 < j, "msgpack {m} bytes, json {j}");
    }
}

/// The seeds of the `peer_rpc` fuzz target (`fuzz/seeds/peer_rpc`): one valid message of each
/// kind a peer sends, so that the fuzzer starts from the real shapes.
#[cfg(test)]
mod fuzz_seeds {
    use std::path::PathBuf;

    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::{Entry, EntryPayload, LogId, Vote};

    use super::*;
    use crate::cluster::controller::Report;
    use crate::cluster::{NodeId, TypeConfig};

    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(3, 7), 42),
            payload: EntryPayload::Normal(Versioned(Command::Cordon("gw2".into()))),
        };
        let append = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 7),
            prev_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(3, 7), 41)),
            entries: vec![entry.clone()],
            leader_commit: Some(LogId::new(openraft::CommittedLeaderId::new(3, 7), 41)),
        };
        let report = Report {
            node: "gw2".into(),
            ready: true,
            command_format: COMMAND_FORMAT,
            ..Default::default()
        };
        let wire = |v: &dyn erased::Ser| v.wire();
        vec![
            ("append", wire(&append)),
            (
                "vote",
                wire(&VoteRequest::<NodeId>::new(Vote::new(4, 9), None)),
            ),
            ("report", wire(&report)),
            (
                "write",
                wire(&Command::AddMember {
                    name: "gw4".into(),
                    address: "10.0.0.4:7480".into(),
                }),
            ),
            ("entry-store", to_store(&entry).expect("entry")),
        ]
    }

    /// `to_wire` behind a trait object, so that `seeds` can list different types.
    mod erased {
        pub trait Ser {
            fn wire(&self) -> Vec<u8>;
        }
        impl<T: serde::Serialize> Ser for T {
            fn wire(&self) -> Vec<u8> {
                super::to_wire(self).expect("encode")
            }
        }
    }

    /// The committed seeds are what this version encodes (a format change makes them stale:
    /// rewrite them with `EGRESSD_WRITE_FUZZ_SEEDS=1 cargo test --lib fuzz_seeds`).
    #[test]
    fn the_peer_rpc_fuzz_seeds_are_current() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/peer_rpc");
        for (name, bytes) in seeds() {
            let path = dir.join(name);
            if std::env::var_os("EGRESSD_WRITE_FUZZ_SEEDS").is_some() {
                std::fs::create_dir_all(&dir).expect("seed dir");
                std::fs::write(&path, &bytes).expect("seed");
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert_eq!(committed, bytes, "{} is stale", path.display());
        }
    }
}
