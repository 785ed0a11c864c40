//! Conversions between openraft's types and their protobuf encodings (`chorus_proto::storage`).
//!
//! The same encodings serve the RocksDB records and the peer protocol, so a log entry is encoded
//! once on the leader and decoded once on each follower. Decoding never trusts its input: a
//! missing or malformed field is a [`DecodeError`], never a panic.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use chorus_proto::storage as pb;
use openraft::{CommittedLeaderId, EntryPayload};
use prost::Message;

use crate::types::{Entry, LogId, Membership, NodeAddr, NodeId, SharedCommand, StoredMembership, Vote};

/// A record that did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("field {0} is missing")]
    Missing(&'static str),
}

pub fn log_id_to_pb(id: &LogId) -> pb::LogId {
    pb::LogId { term: id.leader_id.term, leader_node_id: id.leader_id.node_id, index: id.index }
}

pub fn log_id_from_pb(id: &pb::LogId) -> LogId {
    LogId::new(CommittedLeaderId::new(id.term, id.leader_node_id), id.index)
}

pub fn opt_log_id_to_pb(id: Option<&LogId>) -> Option<pb::LogId> {
    id.map(log_id_to_pb)
}

pub fn vote_to_pb(vote: &Vote) -> pb::Vote {
    pb::Vote { term: vote.leader_id.term, node_id: vote.leader_id.node_id, committed: vote.committed }
}

pub fn vote_from_pb(vote: &pb::Vote) -> Vote {
    let mut v = Vote::new(vote.term, vote.node_id);
    v.committed = vote.committed;
    v
}

pub fn node_to_pb(node: &NodeAddr) -> pb::NodeAddr {
    pb::NodeAddr { peer_addr: node.peer_addr.clone(), client_addr: node.client_addr.clone() }
}

pub fn node_from_pb(node: &pb::NodeAddr) -> NodeAddr {
    NodeAddr { peer_addr: node.peer_addr.clone(), client_addr: node.client_addr.clone() }
}

pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|set| pb::VoterSet { voters: set.iter().copied().collect() })
            .collect(),
        nodes: m.nodes().map(|(id, node)| (*id, node_to_pb(node))).collect(),
    }
}

pub fn membership_from_pb(m: &pb::Membership) -> Membership {
    let configs: Vec<BTreeSet<NodeId>> = m.configs.iter().map(|c| c.voters.iter().copied().collect()).collect();
    let nodes: BTreeMap<NodeId, NodeAddr> = m.nodes.iter().map(|(id, n)| (*id, node_from_pb(n))).collect();
    Membership::new(configs, nodes)
}

pub fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to_pb(m.log_id().as_ref()),
        membership: Some(membership_to_pb(m.membership())),
    }
}

pub fn stored_membership_from_pb(m: &pb::StoredMembership) -> Result<StoredMembership, DecodeError> {
    let membership = m.membership.as_ref().ok_or(DecodeError::Missing("StoredMembership.membership"))?;
    Ok(StoredMembership::new(m.log_id.as_ref().map(log_id_from_pb), membership_from_pb(membership)))
}

/// The protobuf form of `entry`. A command is embedded as the bytes it was encoded to once (a
/// reference count, not a copy).
pub fn entry_to_pb(entry: &Entry) -> pb::LogEntry {
    let payload = match &entry.payload {
        EntryPayload::Blank => pb::log_entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(cmd) => pb::log_entry::Payload::Command(cmd.encoded().clone()),
        EntryPayload::Membership(m) => pb::log_entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::LogEntry { log_id: Some(log_id_to_pb(&entry.log_id)), payload: Some(payload) }
}

/// The entry `entry` encodes. Its command keeps the bytes it was decoded from: pass an entry
/// whose byte fields own their allocations (decoding from a `&[u8]` makes such copies), or use
/// [`entry_from_received_pb`].
pub fn entry_from_pb(entry: pb::LogEntry) -> Result<Entry, DecodeError> {
    entry_from_pb_with(entry, |bytes| bytes)
}

/// [`entry_from_pb`] for an entry decoded from a receive buffer: its command's bytes are
/// copied into an allocation of their own first. As slices of the buffer, the log cache and
/// the state machine's live messages would keep the whole buffer alive.
pub fn entry_from_received_pb(entry: pb::LogEntry) -> Result<Entry, DecodeError> {
    entry_from_pb_with(entry, |bytes| Bytes::copy_from_slice(&bytes))
}

fn entry_from_pb_with(entry: pb::LogEntry, own: impl FnOnce(Bytes) -> Bytes) -> Result<Entry, DecodeError> {
    let log_id = entry.log_id.as_ref().ok_or(DecodeError::Missing("LogEntry.log_id"))?;
    let payload = match entry.payload.ok_or(DecodeError::Missing("LogEntry.payload"))? {
        pb::log_entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::log_entry::Payload::Command(bytes) => EntryPayload::Normal(SharedCommand::decode(own(bytes))?),
        pb::log_entry::Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(&m)),
    };
    Ok(Entry { log_id: log_id_from_pb(log_id), payload })
}

pub fn encode_entry(entry: &Entry) -> Vec<u8> {
    entry_to_pb(entry).encode_to_vec()
}

pub fn decode_entry(bytes: &[u8]) -> Result<Entry, DecodeError> {
    entry_from_pb(pb::LogEntry::decode(bytes)?)
}

pub fn decode_log_id(bytes: &[u8]) -> Result<LogId, DecodeError> {
    Ok(log_id_from_pb(&pb::LogId::decode(bytes)?))
}

pub fn decode_vote(bytes: &[u8]) -> Result<Vote, DecodeError> {
    Ok(vote_from_pb(&pb::Vote::decode(bytes)?))
}

pub fn decode_stored_membership(bytes: &[u8]) -> Result<StoredMembership, DecodeError> {
    stored_membership_from_pb(&pb::StoredMembership::decode(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::storage::{AppendMessage, Command, Op, op};
    use proptest::prelude::*;

    fn arb_log_id() -> impl Strategy<Value = LogId> {
        (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(term, node, index)| LogId::new(CommittedLeaderId::new(term, node), index))
    }

    fn arb_membership() -> impl Strategy<Value = Membership> {
        let set = proptest::collection::btree_set(0u64..16, 1..5);
        (proptest::collection::vec(set, 1..3), proptest::collection::btree_set(0u64..32, 0..4)).prop_map(
            |(configs, learners)| {
                let mut nodes = BTreeMap::new();
                for id in configs.iter().flatten().chain(learners.iter()) {
                    nodes.insert(
                        *id,
                        NodeAddr { peer_addr: format!("10.0.0.{id}:7000"), client_addr: format!("10.0.0.{id}:7001") },
                    );
                }
                Membership::new(configs, nodes)
            },
        )
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        let payload = prop_oneof![
            Just(EntryPayload::Blank),
            arb_membership().prop_map(EntryPayload::Membership),
            (any::<u64>(), "[a-z]{1,10}", proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
                |(ts_ms, room, body)| {
                    EntryPayload::Normal(SharedCommand::new(Command {
                        ts_ms,
                        ops: vec![Op {
                            kind: Some(op::Kind::Append(AppendMessage {
                                room,
                                sender: "s".into(),
                                client_id: Bytes::from_static(b"c"),
                                client_seq: 1,
                                body: Bytes::from(body),
                            })),
                        }],
                        rules: 1,
                        notify_after_ms: 0,
                    }))
                }
            ),
        ];
        (arb_log_id(), payload).prop_map(|(log_id, payload)| Entry { log_id, payload })
    }

    proptest! {
        #[test]
        fn entries_round_trip(entry in arb_entry()) {
            let decoded = decode_entry(&encode_entry(&entry)).unwrap();
            prop_assert_eq!(decoded, entry);
        }

        #[test]
        fn votes_round_trip(term: u64, node: u64, committed: bool) {
            let mut vote = Vote::new(term, node);
            vote.committed = committed;
            prop_assert_eq!(decode_vote(&vote_to_pb(&vote).encode_to_vec()).unwrap(), vote);
        }

        #[test]
        fn memberships_round_trip(m in arb_membership(), id in proptest::option::of(arb_log_id())) {
            let stored = StoredMembership::new(id, m);
            let bytes = stored_membership_to_pb(&stored).encode_to_vec();
            prop_assert_eq!(decode_stored_membership(&bytes).unwrap(), stored);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_entry(&bytes);
            let _ = decode_vote(&bytes);
            let _ = decode_stored_membership(&bytes);
        }
    }

    /// Records written before the command was declared as bytes (`Command command = 4`) are the
    /// same bytes: they still decode, and re-encode identically.
    #[test]
    fn a_command_field_is_the_encoded_message() {
        let cmd = Command {
            ts_ms: 7,
            ops: vec![Op { kind: Some(op::Kind::Append(AppendMessage::default())) }],
            rules: 1,
            notify_after_ms: 0,
        };
        let entry = Entry { log_id: LogId::default(), payload: EntryPayload::Normal(SharedCommand::new(cmd.clone())) };
        let mut by_hand = pb::LogId::default().encode_length_delimited_to_vec();
        by_hand.insert(0, 0x0a); // field 1, length-delimited
        by_hand.push(0x22); // field 4, length-delimited
        by_hand.extend(cmd.encode_length_delimited_to_vec());
        assert_eq!(encode_entry(&entry), by_hand);
        assert_eq!(decode_entry(&by_hand).unwrap(), entry);
    }

    #[test]
    fn a_malformed_command_is_an_error() {
        let entry = pb::LogEntry {
            log_id: Some(pb::LogId::default()),
            payload: Some(pb::log_entry::Payload::Command(Bytes::from_static(&[0xff]))),
        };
        assert!(matches!(decode_entry(&entry.encode_to_vec()), Err(DecodeError::Protobuf(_))));
    }

    #[test]
    fn an_entry_without_a_payload_is_an_error() {
        let bytes = pb::LogEntry { log_id: Some(pb::LogId::default()), payload: None }.encode_to_vec();
        assert_eq!(decode_entry(&bytes).unwrap_err(), DecodeError::Missing("LogEntry.payload"));
    }
}
