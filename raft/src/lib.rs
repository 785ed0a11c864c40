//! Chorus's replication core: every shard is one openraft group whose log and chat state
//! machine live in the node's single RocksDB.
//!
//! - [`db`]: the node's database, its identity, and group commit ([`wal_sync`]).
//! - [`keys`]: every RocksDB key encoding.
//! - [`log_store`]: openraft log storage for one shard.
//! - [`state_machine`]: the chat state machine (rooms, sequences, idempotency) and its reads.
//! - [`snapshot`]: building, streaming and installing shard snapshots.
//! - [`network`]: the Raft network between nodes (gRPC).
//! - [`routing`]: room → shard.
//! - [`shard`]: wiring one shard replica together.
//! - [`blocking`]: RocksDB calls kept off the async workers.
//!
//! See `docs/ARCHITECTURE.md` for the data path and the invariants.

pub mod blocking;
pub mod codec;
pub mod db;
pub mod error;
pub mod io_threads;
pub mod keys;
pub mod limits;
pub mod log_store;
pub mod network;
pub mod routing;
pub mod shard;
pub mod snapshot;
pub mod snapshot_pacing;
pub mod state_machine;
pub mod types;
pub mod wal_sync;
mod work_queue;

pub use db::{DbOptions, NodeDb};
pub use error::{CommandError, QueryError, StoreError};
pub use limits::Limits;
pub use log_store::ShardLogStore;
pub use routing::ShardRouter;
pub use shard::{RaftTuning, ShardReplica, StartError, open_shard_storage, start_shard};
pub use snapshot_pacing::SnapshotPacing;
pub use state_machine::{
    AppliedMessage, HistoryPage, HistoryQuery, Revocation, ShardEvent, ShardReader, ShardStateMachine,
};
pub use types::*;
