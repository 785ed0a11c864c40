//! Errors of the storage layer, in terms a caller can act on.
//!
//! [`CommandError`] is bad input: it is deterministic (every replica reaches the same verdict)
//! and crosses the wire with a stable [`CommandError::code`]. [`StoreError`] is a local failure
//! of the disk or the data on it.

use std::path::PathBuf;

/// Why an operation was refused. Refused operations write nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("invalid room name {name:?}: {reason}")]
    RoomNameInvalid { name: String, reason: &'static str },
    #[error("room {room:?} does not exist")]
    RoomNotFound { room: String },
    #[error("room {room:?} already exists")]
    RoomExists { room: String },
    #[error("message body is {size} bytes, over the limit of {limit} bytes")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("invalid sender {sender:?}: {reason}")]
    SenderInvalid { sender: String, reason: &'static str },
    #[error("invalid client id: {reason}")]
    ClientIdInvalid { reason: &'static str },
    #[error("client_seq must be at least 1")]
    ClientSeqZero,
    #[error(
        "client_seq {client_seq} is too old for this client in this room: \
         only the latest {window} client_seqs are remembered (oldest accepted now: {oldest_accepted})"
    )]
    ClientSeqTooOld { client_seq: u64, oldest_accepted: u64, window: u64 },
    #[error("invalid room metadata: {reason}")]
    MetadataInvalid { reason: String },
    #[error("batch has {count} operations, over the limit of {limit}")]
    BatchTooLarge { count: usize, limit: usize },
    #[error("batch is {size} bytes, over the limit of {limit} bytes")]
    BatchTooManyBytes { size: usize, limit: usize },
    #[error("empty batch: a command needs at least one operation")]
    EmptyBatch,
    #[error("operation of unknown kind (written by a newer Chorus?)")]
    UnknownOperation,
    #[error("operation sent to {group}, which does not hold what it changes")]
    Misrouted { group: &'static str },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("invalid user name {name:?}: {reason}")]
    UserNameInvalid { name: String, reason: &'static str },
    #[error("not a member of room {room:?}")]
    NotMember { room: String },
    #[error("forbidden: {reason}")]
    Forbidden { reason: String },
    #[error("{user} is not banned from room {room:?}")]
    NotBanned { room: String, user: String },
    #[error("user {user:?} exists already")]
    UserExists { user: String },
    #[error("no user {user:?}")]
    UserNotFound { user: String },
    #[error("wrong user name or password")]
    InvalidCredentials,
    #[error("the account {user:?} is disabled")]
    UserDisabled { user: String },
    #[error("a signing key exists already")]
    SigningKeyExists,
}

impl CommandError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> CommandError {
        CommandError::Invalid { field, reason: reason.into() }
    }
}

impl CommandError {
    /// The stable, machine-readable code of this error (part of the client protocol).
    pub fn code(&self) -> &'static str {
        match self {
            CommandError::RoomNameInvalid { .. } => "invalid_room_name",
            CommandError::RoomNotFound { .. } => "room_not_found",
            CommandError::RoomExists { .. } => "room_exists",
            CommandError::BodyTooLarge { .. } => "body_too_large",
            CommandError::SenderInvalid { .. } => "invalid_sender",
            CommandError::ClientIdInvalid { .. } => "invalid_client_id",
            CommandError::ClientSeqZero => "invalid_client_seq",
            CommandError::ClientSeqTooOld { .. } => "client_seq_too_old",
            CommandError::MetadataInvalid { .. } => "invalid_metadata",
            CommandError::BatchTooLarge { .. } => "batch_too_large",
            CommandError::BatchTooManyBytes { .. } => "batch_too_large",
            CommandError::EmptyBatch => "empty_batch",
            CommandError::UnknownOperation => "unknown_operation",
            CommandError::Misrouted { .. } => "internal",
            CommandError::Invalid { .. } => "invalid_argument",
            CommandError::UserNameInvalid { .. } => "invalid_user_name",
            CommandError::NotMember { .. } => "not_member",
            CommandError::Forbidden { .. } => "forbidden",
            CommandError::NotBanned { .. } => "not_banned",
            CommandError::UserExists { .. } => "user_exists",
            CommandError::UserNotFound { .. } => "user_not_found",
            CommandError::InvalidCredentials => "invalid_credentials",
            CommandError::UserDisabled { .. } => "user_disabled",
            CommandError::SigningKeyExists => "key_exists",
        }
    }
}

/// A failure of the local store: RocksDB, the file system, or data that does not decode.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error(
        "data dir {path} belongs to {found}, but this node was started as {expected}; \
         point --data-dir at this node's own directory, or at an empty one to join afresh"
    )]
    IdentityMismatch { path: PathBuf, found: String, expected: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A purge past the durable snapshot found no install that would cover it.
    #[error("shard {shard}: not purging the log to index {upto}: {reason}")]
    PurgeUncovered { shard: u32, upto: u64, reason: String },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { context: context.into(), source }
    }

    pub(crate) fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        StoreError::Corrupt { what: what.into(), detail: detail.to_string() }
    }
}

/// Why a read of the state machine failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Invalid(#[from] CommandError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rocksdb::Error> for QueryError {
    fn from(e: rocksdb::Error) -> Self {
        QueryError::Store(StoreError::Rocks(e))
    }
}
