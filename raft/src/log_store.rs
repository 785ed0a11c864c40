//! openraft's log storage for one shard, over the node's shared RocksDB.
//!
//! Invariants:
//! - The shard's log is contiguous: entries `last_purged + 1 ..= last` all exist.
//! - An append is reported flushed (`IOFlushed`) only after a WAL sync that covers it; the vote
//!   and truncations are durable before their call returns.
//! - Purge writes the new `last_purged` and deletes the entries in one atomic batch, so a crash
//!   at any instant leaves either the old or the new state, both contiguous.
//! - The log is never purged past the shard's durable snapshot (when linked to its snapshot
//!   store, as in production). openraft 0.9 purges the log up to a received snapshot right after
//!   *queueing* its install, so a crash before the install finished would otherwise leave the
//!   log purged past the state machine: a state openraft refuses to start from. Such a purge
//!   waits for the install under way (and fails at once if none is, or when it fails).
//!   (Deferring part of it instead is not enough: the entries openraft appends after the
//!   install would then follow a hole in the log.) Waiting holds up the shard's Raft core,
//!   which has nothing else to do for this replica until the install is done.
//! - All writes of a shard are issued in the order openraft calls them, and each is in RocksDB
//!   before the call returns, so the WAL keeps them in that order.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, StorageIOError};
use prost::Message;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use crate::codec;
use crate::db::NodeDb;
use crate::error::StoreError;
use crate::keys::{self, StateKey};
use crate::snapshot::{SnapshotProgress, SnapshotStore};
use crate::types::{Entry, LogId, LogState, ShardId, StorageError, TypeConfig, Vote};

/// Newest entries kept in memory per shard, so that replication (which reads every entry
/// once per follower, right after it was appended) does not go back to RocksDB. Bytes are
/// counted as twice the encoded size: a cached entry holds its command decoded and encoded.
const CACHE_MAX_ENTRIES: usize = 1024;
const CACHE_MAX_BYTES: usize = 1 << 20;

/// A contiguous run of the newest log entries. Invariant: `entries[i].log_id.index ==
/// entries[0].log_id.index + i`, and each entry equals the one in RocksDB.
#[derive(Default)]
struct EntryCache {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl EntryCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry, size: usize) {
        let expected = self.entries.back().map(|(e, _)| e.log_id.index + 1);
        if expected.is_some_and(|next| next != entry.log_id.index) {
            self.clear();
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.entries.len() > CACHE_MAX_ENTRIES || (self.bytes > CACHE_MAX_BYTES && self.entries.len() > 1) {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries with index >= `index` (truncation).
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries with index <= `index` (purge).
    fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|(e, _)| e.log_id.index <= index) {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries `[start, end)` if the cache holds all of those that exist.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = (start - first) as usize;
        let take = end.saturating_sub(start).min(usize::MAX as u64) as usize;
        Some(self.entries.iter().skip(skip).take(take).map(|(e, _)| e.clone()).collect())
    }
}

/// The Raft log and vote of one shard. Cheap to clone: clones share the database and the
/// entry cache.
#[derive(Clone)]
pub struct ShardLogStore {
    shard: ShardId,
    db: Arc<NodeDb>,
    cache: Arc<Mutex<EntryCache>>,
    /// The shard's snapshots: a purge waits until the current one covers it (see the module
    /// invariants).
    snapshots: Option<Arc<SnapshotStore>>,
}

impl ShardLogStore {
    /// A log store that purges whatever openraft asks, for tests and tools without a state
    /// machine. Nodes use [`open_shard_storage`](crate::open_shard_storage), which links the
    /// log to the shard's snapshots.
    pub fn new(db: Arc<NodeDb>, shard: ShardId) -> Self {
        ShardLogStore { shard, db, cache: Arc::default(), snapshots: None }
    }

    /// A log store that never purges past the current snapshot in `snapshots`: a purge beyond it
    /// waits for the snapshot install under way.
    pub(crate) fn linked(db: Arc<NodeDb>, shard: ShardId, snapshots: Arc<SnapshotStore>) -> Self {
        ShardLogStore { shard, db, cache: Arc::default(), snapshots: Some(snapshots) }
    }

    /// Waits until the durable snapshot covers `upto` (see the module invariants): only while
    /// a snapshot install is under way; fails at once otherwise, or when the install fails or
    /// the state machine is gone.
    async fn wait_for_snapshot(&self, upto: LogId) -> Result<(), StoreError> {
        let Some(snapshots) = &self.snapshots else {
            return Ok(());
        };
        let mut progress = snapshots.progress();
        let covered = |p: &SnapshotProgress| p.current >= Some(upto.index);
        let hopeless = |p: &SnapshotProgress| !p.receiving || p.closed || p.failed_install >= Some(upto.index);
        let refused = |p: &SnapshotProgress| {
            let reason = if p.failed_install >= Some(upto.index) {
                "the snapshot install that covers it failed"
            } else if p.closed {
                "the state machine stopped"
            } else {
                "the current snapshot does not cover it and no snapshot install is under way"
            };
            StoreError::PurgeUncovered { shard: self.shard, upto: upto.index, reason: reason.into() }
        };
        {
            let p = progress.borrow();
            if covered(&p) {
                return Ok(());
            }
            if hopeless(&p) {
                return Err(refused(&p));
            }
        }
        tracing::info!(shard = self.shard, %upto, "purge waits for the snapshot install that covers it");
        match progress.wait_for(|p| covered(p) || hopeless(p)).await {
            Ok(p) if covered(&p) => Ok(()),
            Ok(p) => Err(refused(&p)),
            Err(_) => Err(StoreError::PurgeUncovered {
                shard: self.shard,
                upto: upto.index,
                reason: "the snapshot store is gone".into(),
            }),
        }
    }

    /// The index of the newest entry, or of the last purged one if the log is empty.
    pub(crate) fn last_index(&self) -> Result<Option<u64>, StoreError> {
        let last = match self.last_entry_id()? {
            Some(id) => Some(id),
            None => self.last_purged()?,
        };
        Ok(last.map(|id| id.index))
    }

    fn cache(&self) -> MutexGuard<'_, EntryCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    fn last_purged(&self) -> Result<Option<LogId>, StoreError> {
        self.db.read_state(self.shard, StateKey::LastPurged, codec::decode_log_id)
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
        if let Some(entries) = self.cache().get(start, end) {
            return Ok(entries);
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
        self.db
            .read_state(self.shard, StateKey::Vote, codec::decode_vote)
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.db.cf_log().map_err(write_err)?;
        let mut batch = WriteBatch::default();
        let mut written = Vec::new();
        for entry in entries {
            let bytes = codec::encode_entry(&entry);
            batch.put_cf(cf, keys::log_key(self.shard, entry.log_id.index), &bytes);
            // In memory an entry holds its decoded command as well as the encoding.
            written.push((entry, 2 * bytes.len()));
        }
        // Written (and so readable) now; reported flushed only after the group-commit sync.
        if let Err(e) = self.db.write_log(batch).await {
            self.cache().clear();
            return Err(write_err(e));
        }
        let mut cache = self.cache();
        for (entry, size) in written {
            cache.push(entry, size);
        }
        drop(cache);
        self.db.syncer().complete_after_sync(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(shard = self.shard, %log_id, "truncating log");
        let result: Result<(), StoreError> = async {
            let cf = self.db.cf_log()?;
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf, &keys::log_key(self.shard, log_id.index)[..], &keys::shard_end(self.shard)[..]);
            self.cache().truncate(log_id.index);
            self.db.write_durable(batch).await
        }
        .await;
        result.map_err(|e| StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Log(log_id), ErrorVerb::Delete, &e),
        })
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(shard = self.shard, %log_id, "purging log");
        if let Err(e) = self.wait_for_snapshot(log_id).await {
            tracing::error!(shard = self.shard, error = %e, "purge refused");
            return Err(StorageError::IO {
                source: StorageIOError::new(ErrorSubject::Log(log_id), ErrorVerb::Delete, &e),
            });
        }
        let result: Result<(), StoreError> = async {
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
            self.cache().purge(log_id.index);
            self.db.write_log(batch).await
        }
        .await;
        result.map_err(|e| StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Log(log_id), ErrorVerb::Delete, &e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Blank }
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|v| v.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn the_entry_cache_stays_contiguous_and_bounded() {
        let mut cache = EntryCache::default();
        for i in 1..=10 {
            cache.push(entry(i), 100);
        }
        assert_eq!(indexes(cache.get(3, 6)), Some(vec![3, 4, 5]));
        assert_eq!(indexes(cache.get(9, 100)), Some(vec![9, 10]));
        cache.truncate(8);
        assert_eq!(indexes(cache.get(5, 100)), Some(vec![5, 6, 7]));
        cache.purge(5);
        assert_eq!(cache.get(5, 6).map(|v| v.len()), None, "purged entries come from RocksDB (or nowhere)");
        // A gap restarts the cache rather than leaving a hole in it.
        cache.push(entry(20), 100);
        assert_eq!(indexes(cache.get(20, 21)), Some(vec![20]));
        assert_eq!(cache.get(6, 7).map(|v| v.len()), None);
        for i in 21..=(20 + CACHE_MAX_ENTRIES as u64 + 10) {
            cache.push(entry(i), 10);
        }
        assert_eq!(cache.entries.len(), CACHE_MAX_ENTRIES);
        cache.push(entry(20 + CACHE_MAX_ENTRIES as u64 + 11), CACHE_MAX_BYTES);
        assert_eq!(cache.entries.len(), 1, "one oversized entry is kept alone");
    }
}
