//! The Raft type configuration shared by every shard, declared once; everything else names it.

use std::fmt;

use chorus_proto::storage::Command;

use crate::error::CommandError;

/// A node of the cluster. Node ids are never reused.
pub type NodeId = u64;

/// A shard: one Raft group, holding the rooms that hash to it.
pub type ShardId = u32;

/// How to reach a node: the gRPC address its peers use and the QUIC address clients use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub peer_addr: String,
    pub client_addr: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} client={}", self.peer_addr, self.client_addr)
    }
}

openraft::declare_raft_types!(
    /// The Raft types of a Chorus shard.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        // Snapshots are files under the data dir, streamed in chunks: never a whole shard in memory.
        SnapshotData = tokio::fs::File,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type ChorusRaft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Membership = openraft::Membership<NodeId, NodeAddr>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeAddr>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeAddr>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type LogState = openraft::storage::LogState<TypeConfig>;

/// What applying one Raft entry produced: one result per operation of its command, in order.
/// Blank and membership entries produce no results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandResponse {
    pub results: Vec<Result<OpOutcome, CommandError>>,
}

/// The outcome of one successful operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    RoomCreated {
        room_id: u64,
        ts_ms: u64,
    },
    /// The message has sequence number `seq` in its room. `duplicate` is true when this
    /// `(client_id, client_seq)` had been appended before: nothing new was written and `seq`,
    /// `ts_ms` are those of the original append.
    Appended {
        seq: u64,
        ts_ms: u64,
        duplicate: bool,
    },
}
