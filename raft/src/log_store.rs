//! openraft's log storage for one shard, over the node's shared RocksDB.
//!
//! Invariants:
//! - The shard's log is contiguous: entries `last_purged + 1 ..= last` all exist.
//! - An append is reported flushed (`IOFlushed`) only after a WAL sync that covers it; the vote
//!   and truncations are durable before their call returns.
//! - Purge writes the new `last_purged` and deletes the entries in one atomic batch, so a crash
//!   at any instant leaves either the old or the new state, both contiguous.
//! - All writes of a shard are issued in the order openraft calls them, and each is in RocksDB
//!   before the call returns, so the WAL keeps them in that order.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use prost::Message;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use crate::codec;
use crate::db::NodeDb;
use crate::error::StoreError;
use crate::keys::{self, StateKey};
use crate::types::{Entry, LogId, LogState, ShardId, StorageError, TypeConfig, Vote};

/// The Raft log and vote of one shard. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct ShardLogStore {
    shard: ShardId,
    db: Arc<NodeDb>,
}

impl ShardLogStore {
    pub fn new(db: Arc<NodeDb>, shard: ShardId) -> Self {
        ShardLogStore { shard, db }
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    fn read_state<T>(
        &self,
        kind: StateKey,
        decode: impl FnOnce(&[u8]) -> Result<T, codec::DecodeError>,
    ) -> Result<Option<T>, StoreError> {
        let cf = self.db.cf_state()?;
        match self.db.rocks().get_pinned_cf(cf, keys::state_key(self.shard, kind))? {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|e| StoreError::corrupt(format!("shard {} {kind:?} record", self.shard), e)),
        }
    }

    fn last_purged(&self) -> Result<Option<LogId>, StoreError> {
        self.read_state(StateKey::LastPurged, codec::decode_log_id)
    }

    /// The id of the newest entry in the log, if any.
    fn last_entry_id(&self) -> Result<Option<LogId>, StoreError> {
        let cf = self.db.cf_log()?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(keys::shard_prefix(self.shard).to_vec());
        opts.set_iterate_upper_bound(keys::shard_end(self.shard).to_vec());
        let mut iter = self.db.rocks().iterator_cf_opt(cf, opts, IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item?;
                let entry = self.decode_entry(&key, &value)?;
                Ok(Some(entry.log_id))
            }
        }
    }

    fn decode_entry(&self, key: &[u8], value: &[u8]) -> Result<Entry, StoreError> {
        let what = || match keys::decode_log_key(key) {
            Some((shard, index)) => format!("log entry {index} of shard {shard}"),
            None => format!("log key {key:?}"),
        };
        let entry = codec::decode_entry(value).map_err(|e| StoreError::corrupt(what(), e))?;
        if keys::decode_log_key(key).map(|(_, index)| index) != Some(entry.log_id.index) {
            return Err(StoreError::corrupt(what(), format!("holds entry {}", entry.log_id)));
        }
        Ok(entry)
    }

    /// Reads the entries present in `[start, end)`: a contiguous run from the first present
    /// index (entries before it may have been purged); stops early at a gap.
    pub fn read_range(&self, start: u64, end: u64) -> Result<Vec<Entry>, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        let cf = self.db.cf_log()?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::log_key(self.shard, end).to_vec());
        let from = keys::log_key(self.shard, start);
        let iter = self.db.rocks().iterator_cf_opt(cf, opts, IteratorMode::From(&from, Direction::Forward));
        let mut entries = Vec::with_capacity((end - start).min(1024) as usize);
        let mut expected = None;
        for item in iter {
            let (key, value) = item?;
            let entry = self.decode_entry(&key, &value)?;
            if expected.is_some_and(|e| e != entry.log_id.index) {
                break;
            }
            expected = Some(entry.log_id.index + 1);
            entries.push(entry);
        }
        Ok(entries)
    }
}

fn range_to_indices(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

fn read_err(e: StoreError) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: StoreError) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for ShardLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = range_to_indices(&range);
        self.read_range(start, end).map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for ShardLogStore {
    type LogReader = ShardLogStore;

    async fn get_log_state(&mut self) -> Result<LogState, StorageError> {
        let last_purged_log_id = self.last_purged().map_err(read_err)?;
        let last_log_id = match self.last_entry_id().map_err(read_err)? {
            Some(id) => Some(id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let result: Result<(), StoreError> = async {
            let mut batch = WriteBatch::default();
            let cf = self.db.cf_state()?;
            batch.put_cf(cf, keys::state_key(self.shard, StateKey::Vote), codec::vote_to_pb(vote).encode_to_vec());
            self.db.write_durable(batch).await
        }
        .await;
        result.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_state(StateKey::Vote, codec::decode_vote).map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf_log().map_err(write_err)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(cf, keys::log_key(self.shard, entry.log_id.index), codec::encode_entry(&entry));
        }
        // Written (and so readable) now; reported flushed only after the group-commit sync.
        self.db.write(batch).map_err(write_err)?;
        self.db.syncer().complete_after_sync(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(shard = self.shard, %log_id, "truncating log");
        let result: Result<(), StoreError> = async {
            let cf = self.db.cf_log()?;
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf, &keys::log_key(self.shard, log_id.index)[..], &keys::shard_end(self.shard)[..]);
            self.db.write_durable(batch).await
        }
        .await;
        result.map_err(|e| StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Log(log_id), ErrorVerb::Delete, &e),
        })
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(shard = self.shard, %log_id, "purging log");
        let result: Result<(), StoreError> = (|| {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                self.db.cf_state()?,
                keys::state_key(self.shard, StateKey::LastPurged),
                codec::log_id_to_pb(&log_id).encode_to_vec(),
            );
            let end = log_id.index.checked_add(1).map(|i| keys::log_key(self.shard, i).to_vec());
            let end = end.unwrap_or_else(|| keys::shard_end(self.shard).to_vec());
            batch.delete_range_cf(self.db.cf_log()?, keys::log_key(self.shard, 0).to_vec(), end);
            // Not synced: losing a purge in a power failure brings back the purged entries
            // together with the older `last_purged`, which is an equally valid state.
            self.db.write(batch)
        })();
        result.map_err(|e| StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Log(log_id), ErrorVerb::Delete, &e),
        })
    }
}
