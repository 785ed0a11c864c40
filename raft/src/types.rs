//! The Raft type configuration shared by every shard, declared once; everything else names it.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chorus_proto::storage::Command;
use prost::Message;

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
        D = SharedCommand,
        R = CommandResponse,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        // Snapshots are files under the data dir, streamed in chunks: never a whole shard in memory.
        SnapshotData = tokio::fs::File,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The payload of a normal Raft entry: a [`Command`] together with its protobuf encoding, shared.
///
/// An entry's payload is cloned into the log store's entry cache, out of it for each follower's
/// replication and for apply; a command of many operations (two strings each) is dozens of allocations per clone.
/// Shared, a clone is one reference count. The encoding is made once, on the leader when it
/// proposes, and kept: the log record and every follower's AppendEntries embed the same bytes,
/// and a follower keeps the bytes it received (so replicas store identical records).
#[derive(Clone)]
pub struct SharedCommand(Arc<Encoded>);

struct Encoded {
    command: Command,
    bytes: Bytes,
}

impl SharedCommand {
    /// Encodes `command` (once).
    pub fn new(command: Command) -> Self {
        let bytes = Bytes::from(command.encode_to_vec());
        SharedCommand(Arc::new(Encoded { command, bytes }))
    }

    /// Decodes an encoded command and keeps the bytes it came from. The decoded message's byte
    /// fields (bodies, client ids) are slices of `bytes`, so `bytes` should be an allocation of
    /// its own rather than a slice of a larger receive buffer.
    pub fn decode(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        let command = Command::decode(bytes.clone())?;
        Ok(SharedCommand(Arc::new(Encoded { command, bytes })))
    }

    pub fn command(&self) -> &Command {
        &self.0.command
    }

    /// The command's protobuf encoding.
    pub fn encoded(&self) -> &Bytes {
        &self.0.bytes
    }
}

impl From<Command> for SharedCommand {
    fn from(command: Command) -> Self {
        SharedCommand::new(command)
    }
}

impl fmt::Debug for SharedCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.command.fmt(f)
    }
}

/// Two payloads are equal when their commands are (the encoding follows from the command).
impl PartialEq for SharedCommand {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.command == other.0.command
    }
}

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
    /// The change is event `seq` of the room; `seq` is that of the event that made the
    /// membership what it is, and `ts_ms` 0, when nothing changed (joining a room one is in).
    MembershipChanged {
        seq: u64,
        ts_ms: u64,
    },
    DirectOpened {
        created: bool,
    },
    /// The user's read marker is now `read_seq`, with `unread` TEXT entries after it (sent by
    /// others) and `mentions` unread mentions.
    MarkedRead {
        read_seq: u64,
        unread: u64,
        mentions: u64,
    },
    SessionCreated {
        user: String,
        expires_ms: u64,
        admin: bool,
    },
    /// The operation took effect (or had already: e.g. a session already ended).
    Done {
        ts_ms: u64,
    },
}
