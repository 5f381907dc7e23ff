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
//! - every command carries [`COMMAND_FORMAT`]: a node refuses an entry of a newer format (it
//!   cannot know what it means) instead of misapplying it, and says so.

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Command;

/// The format byte of every stored value: 2 = MessagePack (1 was egressd 0.1's JSON, which had
/// no format byte).
pub const STORE_FORMAT: u8 = 2;

/// The command format this egressd writes and the newest it reads.
pub const COMMAND_FORMAT: u16 = 1;

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
        t.serialize_element(&COMMAND_FORMAT)?;
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
                .contains("command format 2, newer than this egressd"),
            "{e}"
        );
        let ok = to_wire(&Versioned(Command::Uncordon("n".into()))).unwrap();
        assert_eq!(
            from_wire::<Versioned>(&ok).unwrap().0,
            Command::Uncordon("n".into())
        );
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
