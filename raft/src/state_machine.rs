//! The chat state machine of one shard: rooms, their gap-free message sequences, and the
//! idempotency records that make retried sends harmless.
//!
//! Invariants (each tested below):
//! - Every room's messages are numbered 1, 2, 3, … with no gap: `RoomRecord.last_seq = n` means
//!   messages `1..=n` all exist.
//! - Applying is deterministic: the result depends only on the entries and the prior state, so
//!   every replica computes the same state and the same responses. Limits here are the protocol's
//!   constants ([`Limits::PROTOCOL`]), never a node's configuration.
//! - One apply call is one RocksDB write batch: messages, dedup records, room records, the
//!   last-applied log id and the membership land together or not at all.
//! - A `(room, client_id, client_seq)` is appended at most once. Its outcome is remembered while
//!   `client_seq` is within the newest [`DEDUP_WINDOW`] client_seqs of that client in that room;
//!   records below the window are deleted a block at a time, so at most
//!   `DEDUP_WINDOW + EXPIRY_BLOCK` client_seqs' records are kept per client and room.
//! - A room's timestamps never decrease, whatever the leaders' clocks say.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};

use bytes::Bytes;
use chorus_proto::storage::{
    AppendMessage, Command, CreateRoom, DedupRecord, MessageRecord, RoomRecord, StoredMembership as PbMembership, op,
};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use prost::Message;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use tokio::sync::broadcast;

use crate::codec;
use crate::db::NodeDb;
use crate::error::{CommandError, QueryError, StoreError};
use crate::keys::{self, SmKeys, StateKey};
use crate::limits::{self, Limits};
use crate::snapshot::{self, ShardSnapshotBuilder, SnapshotStore};
use crate::types::{
    CommandResponse, Entry, LogId, OpOutcome, ShardId, Snapshot, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

/// How many of a client's newest `client_seq`s per room are remembered for deduplication. A
/// client may have at most this many sends to one room in flight.
pub const DEDUP_WINDOW: u64 = 4096;

/// Most messages or rooms returned by one query.
pub const MAX_PAGE: usize = 1000;

/// Dedup records below the window are deleted once the window's edge has left a whole block of
/// this many client_seqs: one range lookup per block per client and room, not one per append.
/// A lookup is a RocksDB iterator over every level (~40 µs here), and a client that sends to
/// many rooms crosses a block in each room after few of its sends there (with 64 rooms, every
/// 16th send at 1,024): a block as large as the window makes that every 64th, for at most twice
/// the window's records kept.
const EXPIRY_BLOCK: u64 = DEDUP_WINDOW;

/// Capacity of a shard's event channel. A subscriber further behind than this many apply
/// batches gets `Lagged` and reads what it missed from history instead.
const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// What the state machine tells live subscribers.
#[derive(Debug, Clone)]
pub enum ShardEvent {
    /// Messages appended by one apply batch, in order. Each is shared on its own, so that a
    /// reader holding one message does not hold the whole batch.
    Appended(Arc<Vec<Arc<AppliedMessage>>>),
    /// A snapshot replaced the shard's state: re-read positions from history.
    SnapshotInstalled,
}

#[derive(Debug, Clone)]
pub struct AppliedMessage {
    pub room: String,
    pub message: MessageRecord,
    /// The message as the serving layer sends it to clients, encoded by whichever live feed
    /// needs it first: every subscriber of the room on this node then shares one encoding.
    pub wire: OnceLock<Bytes>,
}

/// A page of history, oldest message first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryPage {
    pub messages: Vec<MessageRecord>,
    /// The room's newest sequence number when the page was read.
    pub last_seq: u64,
    /// The room's oldest retained sequence number (earlier ones were deleted by retention).
    pub first_seq: u64,
}

/// Which part of a room's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The oldest `limit` messages with a sequence number above `after` (catch-up, tailing).
    After { after: u64, limit: usize },
    /// The newest `limit` messages with a sequence number below `before` (scrolling back).
    /// `before: u64::MAX` reads the newest messages.
    Before { before: u64, limit: usize },
}

/// The part of a shard's state machine that readers share with the applier.
pub(crate) struct ShardView {
    pub(crate) shard: ShardId,
    pub(crate) db: Arc<NodeDb>,
    /// The active state-machine generation. Readers hold the read lock for the duration of a
    /// read; installing a snapshot takes the write lock to switch generations.
    pub(crate) generation: RwLock<u32>,
    pub(crate) events: broadcast::Sender<ShardEvent>,
}

impl ShardView {
    pub(crate) fn read_generation(&self) -> RwLockReadGuard<'_, u32> {
        self.generation.read().unwrap_or_else(|p| p.into_inner())
    }

    fn get_room(&self, keys: &SmKeys, name: &str) -> Result<Option<RoomRecord>, StoreError> {
        let cf = self.db.cf_sm()?;
        match self.db.rocks().get_pinned_cf(cf, keys.room(name))? {
            None => Ok(None),
            Some(bytes) => RoomRecord::decode(bytes.as_ref())
                .map(Some)
                .map_err(|e| StoreError::corrupt(format!("room record {name:?} of shard {}", self.shard), e)),
        }
    }

    fn get_u64(&self, key: &[u8], what: &str) -> Result<Option<u64>, StoreError> {
        let cf = self.db.cf_sm()?;
        match self.db.rocks().get_pinned_cf(cf, key)? {
            None => Ok(None),
            Some(bytes) => keys::decode_u64(&bytes)
                .map(Some)
                .ok_or_else(|| StoreError::corrupt(format!("{what} of shard {}", self.shard), "not 8 bytes")),
        }
    }

    fn get_dedup(&self, key: &[u8]) -> Result<Option<DedupRecord>, StoreError> {
        let cf = self.db.cf_sm()?;
        match self.db.rocks().get_pinned_cf(cf, key)? {
            None => Ok(None),
            Some(bytes) => DedupRecord::decode(bytes.as_ref())
                .map(Some)
                .map_err(|e| StoreError::corrupt(format!("dedup record of shard {}", self.shard), e)),
        }
    }

    fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        let applied = self.db.read_state(self.shard, StateKey::Applied, codec::decode_log_id)?;
        let membership = self.db.read_state(self.shard, StateKey::Membership, codec::decode_stored_membership)?;
        Ok((applied, membership.unwrap_or_default()))
    }
}

/// Read access to one shard's state machine. Cheap to clone.
#[derive(Clone)]
pub struct ShardReader {
    view: Arc<ShardView>,
}

impl ShardReader {
    pub fn shard(&self) -> ShardId {
        self.view.shard
    }

    /// The room's record, or `None` if it does not exist on this replica (yet).
    pub fn room(&self, name: &str) -> Result<Option<RoomRecord>, QueryError> {
        limits::validate_room_name(name)?;
        let generation = self.view.read_generation();
        Ok(self.view.get_room(&SmKeys::new(self.view.shard, *generation), name)?)
    }

    /// The room's newest sequence number (0 when empty).
    pub fn last_seq(&self, name: &str) -> Result<u64, QueryError> {
        match self.room(name)? {
            Some(room) => Ok(room.last_seq),
            None => Err(CommandError::RoomNotFound { room: name.to_owned() }.into()),
        }
    }

    /// A page of a room's history, oldest first. `limit` is capped at [`MAX_PAGE`].
    pub fn history(&self, name: &str, query: HistoryQuery) -> Result<HistoryPage, QueryError> {
        limits::validate_room_name(name)?;
        let generation = self.view.read_generation();
        let keys = SmKeys::new(self.view.shard, *generation);
        let room =
            self.view.get_room(&keys, name)?.ok_or_else(|| CommandError::RoomNotFound { room: name.to_owned() })?;
        // Sequence numbers are dense from the oldest retained one, so the page's range is known
        // before reading.
        let oldest = first_retained(&room);
        let (first, last) = match query {
            HistoryQuery::After { after, limit } => {
                let first = after.saturating_add(1).max(oldest);
                let limit = limit.min(MAX_PAGE) as u64;
                (first, first.saturating_add(limit.saturating_sub(1)).min(room.last_seq))
            }
            HistoryQuery::Before { before, limit } => {
                let limit = limit.min(MAX_PAGE) as u64;
                let last = before.saturating_sub(1).min(room.last_seq);
                (last.saturating_sub(limit.saturating_sub(1)).max(oldest), last)
            }
        };
        let mut messages = Vec::new();
        let page = |messages| HistoryPage { messages, last_seq: room.last_seq, first_seq: oldest };
        if limit_is_zero(query) || first > last {
            return Ok(page(messages));
        }
        let cf = self.view.db.cf_sm()?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys.message(room.room_id, last.saturating_add(1)));
        let start = keys.message(room.room_id, first);
        let iter = self.view.db.rocks().iterator_cf_opt(cf, opts, IteratorMode::From(&start, Direction::Forward));
        messages.reserve((last - first + 1) as usize);
        for item in iter {
            let (key, value) = item?;
            let message = MessageRecord::decode(value.as_ref()).map_err(|e| {
                StoreError::corrupt(format!("message {key:?} of room {name:?} in shard {}", self.view.shard), e)
            })?;
            let expected = first + messages.len() as u64;
            if message.seq != expected {
                return Err(StoreError::corrupt(
                    format!("room {name:?} in shard {}", self.view.shard),
                    format!("expected message {expected}, found {}", message.seq),
                )
                .into());
            }
            messages.push(message);
        }
        let expected_len = (last - first + 1) as usize;
        if messages.len() != expected_len {
            return Err(StoreError::corrupt(
                format!("room {name:?} in shard {}", self.view.shard),
                format!("messages {first}..={last} should exist, found {}", messages.len()),
            )
            .into());
        }
        Ok(page(messages))
    }

    /// Rooms of this shard in name order, starting after `after`. `limit` is capped at
    /// [`MAX_PAGE`].
    pub fn list_rooms(&self, after: Option<&str>, limit: usize) -> Result<Vec<RoomRecord>, QueryError> {
        let generation = self.view.read_generation();
        let keys = SmKeys::new(self.view.shard, *generation);
        let (start, end) = keys.room_range();
        let cf = self.view.db.cf_sm()?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(end);
        let from = match after {
            Some(name) => {
                let mut k = keys.room(name);
                k.push(0); // the first key after `name`
                k
            }
            None => start,
        };
        let iter = self.view.db.rocks().iterator_cf_opt(cf, opts, IteratorMode::From(&from, Direction::Forward));
        let mut rooms = Vec::new();
        for item in iter.take(limit.min(MAX_PAGE)) {
            let (key, value) = item?;
            let room = RoomRecord::decode(value.as_ref())
                .map_err(|e| StoreError::corrupt(format!("room record {key:?} of shard {}", self.view.shard), e))?;
            rooms.push(room);
        }
        Ok(rooms)
    }

    /// The last log id applied on this replica.
    pub fn applied(&self) -> Result<Option<LogId>, StoreError> {
        Ok(self.view.applied_state()?.0)
    }

    /// Live events of this shard, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ShardEvent> {
        self.view.events.subscribe()
    }
}

/// The oldest retained message of a room (records written before retention existed say 0).
pub fn first_retained(room: &RoomRecord) -> u64 {
    room.first_seq.max(1)
}

fn limit_is_zero(query: HistoryQuery) -> bool {
    matches!(query, HistoryQuery::After { limit: 0, .. } | HistoryQuery::Before { limit: 0, .. })
}

/// Records the applier reads on every append, kept in memory so that apply does not look them
/// up in RocksDB each time. Only the applier writes them, so the cache is exact; it is bounded
/// (cleared when over its bounds) and cleared when a snapshot replaces the state.
#[derive(Default)]
struct ApplyCache {
    rooms: HashMap<String, RoomRecord>,
    dedup_high: HashMap<Vec<u8>, u64>,
}

const MAX_CACHED_ROOMS: usize = 16 * 1024;
const MAX_CACHED_CLIENTS: usize = 64 * 1024;

impl ApplyCache {
    fn remember(&mut self, rooms: HashMap<String, RoomRecord>, dedup_high: HashMap<Vec<u8>, u64>) {
        if self.rooms.len() + rooms.len() > MAX_CACHED_ROOMS {
            self.rooms.clear();
        }
        self.rooms.extend(rooms);
        if self.dedup_high.len() + dedup_high.len() > MAX_CACHED_CLIENTS {
            self.dedup_high.clear();
        }
        self.dedup_high.extend(dedup_high);
    }

    fn clear(&mut self) {
        self.rooms.clear();
        self.dedup_high.clear();
    }
}

/// openraft's state machine for one shard.
pub struct ShardStateMachine {
    view: Arc<ShardView>,
    snapshots: Arc<SnapshotStore>,
    cache: ApplyCache,
}

impl ShardStateMachine {
    /// Opens the state machine of `shard`: finds its active generation, clears what an
    /// interrupted snapshot install left behind, and loads the current snapshot's metadata.
    pub fn open(db: Arc<NodeDb>, shard: ShardId) -> Result<ShardStateMachine, StoreError> {
        if shard > keys::MAX_SHARD_ID {
            return Err(StoreError::Config(format!("shard id {shard} is out of range")));
        }
        let generation = {
            let cf = db.cf_state()?;
            match db.rocks().get_pinned_cf(cf, keys::state_key(shard, StateKey::SmGeneration))? {
                None => 0,
                Some(bytes) => keys::decode_u32(&bytes)
                    .ok_or_else(|| StoreError::corrupt(format!("shard {shard} generation record"), "not 4 bytes"))?,
            }
        };
        snapshot::remove_other_generations(&db, shard, generation)?;
        let applied = db.read_state(shard, StateKey::Applied, codec::decode_log_id)?.map(|id| id.index);
        let snapshots = Arc::new(SnapshotStore::open(db.snapshot_dir(shard), shard, applied)?);
        // The pacer's count resumes with the log applied since the current snapshot.
        let (entries_since, log_bytes_since) = match applied {
            Some(applied) => {
                let from = snapshots.current_index().map_or(0, |i| i + 1);
                let to = applied.saturating_add(1);
                (to.saturating_sub(from), db.approximate_log_bytes(shard, from, to)?)
            }
            None => (0, 0),
        };
        snapshots.pacer().resume(entries_since, log_bytes_since, snapshots.current_bytes());
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let view = Arc::new(ShardView { shard, db, generation: RwLock::new(generation), events });
        Ok(ShardStateMachine { view, snapshots, cache: ApplyCache::default() })
    }

    pub fn reader(&self) -> ShardReader {
        ShardReader { view: self.view.clone() }
    }

    pub fn shard(&self) -> ShardId {
        self.view.shard
    }

    pub(crate) fn snapshots(&self) -> Arc<SnapshotStore> {
        self.snapshots.clone()
    }

    /// Applies entries in one atomic write; see the module invariants.
    fn apply_entries(&mut self, entries: impl IntoIterator<Item = Entry>) -> Result<Vec<CommandResponse>, StoreError> {
        let generation = *self.view.read_generation();
        let mut batch = ApplyBatch::new(&self.view, SmKeys::new(self.view.shard, generation), &self.cache);
        let mut responses = Vec::new();
        let mut last_applied = None;
        let mut membership = None;
        let mut log_bytes = 0u64;
        for entry in entries {
            last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => CommandResponse::default(),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResponse::default()
                }
                EntryPayload::Normal(cmd) => {
                    log_bytes += cmd.encoded().len() as u64;
                    batch.apply_command(cmd.command())?
                }
            };
            responses.push(response);
        }
        let Some(last_applied) = last_applied else {
            return Ok(responses);
        };
        let (mut write, appended, rooms, dedup_high) = batch.finish()?;
        let state = self.view.db.cf_state()?;
        write.put_cf(
            state,
            keys::state_key(self.view.shard, StateKey::Applied),
            codec::log_id_to_pb(&last_applied).encode_to_vec(),
        );
        if let Some(m) = &membership {
            let pb: PbMembership = codec::stored_membership_to_pb(m);
            write.put_cf(state, keys::state_key(self.view.shard, StateKey::Membership), pb.encode_to_vec());
        }
        // Not synced: the entries are durable in the log, and last-applied moves with the data,
        // so after a crash openraft re-applies exactly what is missing.
        self.view.db.write(write)?;
        self.cache.remember(rooms, dedup_high);
        self.snapshots.pacer().applied(responses.len() as u64, log_bytes);
        if !appended.is_empty() {
            // No receiver is not an error: nobody is subscribed to this shard right now.
            let _ = self.view.events.send(ShardEvent::Appended(Arc::new(appended)));
        }
        Ok(responses)
    }
}

/// The state one apply call builds up before its single write: records changed so far, so
/// that later operations of the same batch see earlier ones.
struct ApplyBatch<'a> {
    view: &'a ShardView,
    cache: &'a ApplyCache,
    keys: SmKeys,
    write: WriteBatch,
    rooms: HashMap<String, RoomRecord>,
    dirty_rooms: Vec<String>,
    dedup_high: HashMap<Vec<u8>, u64>,
    /// Dedup records written by this batch, in key order (expiry looks them up by range).
    dedup: BTreeMap<Vec<u8>, DedupRecord>,
    next_room_id: Option<u64>,
    appended: Vec<Arc<AppliedMessage>>,
}

impl<'a> ApplyBatch<'a> {
    fn new(view: &'a ShardView, keys: SmKeys, cache: &'a ApplyCache) -> Self {
        ApplyBatch {
            view,
            cache,
            keys,
            write: WriteBatch::default(),
            rooms: HashMap::new(),
            dirty_rooms: Vec::new(),
            dedup_high: HashMap::new(),
            dedup: BTreeMap::new(),
            next_room_id: None,
            appended: Vec::new(),
        }
    }

    fn apply_command(&mut self, cmd: &Command) -> Result<CommandResponse, StoreError> {
        if let Err(e) = Limits::PROTOCOL.check_batch(cmd) {
            let n = cmd.ops.len().max(1);
            return Ok(CommandResponse { results: vec![Err(e); n] });
        }
        let ts_ms = cmd.ts_ms;
        let mut results = Vec::with_capacity(cmd.ops.len());
        for op in &cmd.ops {
            let result = match &op.kind {
                None => Err(CommandError::UnknownOperation),
                Some(op::Kind::CreateRoom(c)) => self.create_room(c, ts_ms)?,
                Some(op::Kind::Append(a)) => self.append(a, ts_ms)?,
            };
            results.push(result);
        }
        Ok(CommandResponse { results })
    }

    /// Outer error: the store failed (fatal). Inner error: the operation was refused.
    fn room(&mut self, name: &str) -> Result<Option<&mut RoomRecord>, StoreError> {
        if !self.rooms.contains_key(name) {
            let known = match self.cache.rooms.get(name) {
                Some(room) => Some(room.clone()),
                None => self.view.get_room(&self.keys, name)?,
            };
            match known {
                Some(room) => {
                    self.rooms.insert(name.to_owned(), room);
                }
                None => return Ok(None),
            }
        }
        Ok(self.rooms.get_mut(name))
    }

    fn mark_dirty(&mut self, name: &str) {
        if !self.dirty_rooms.iter().any(|r| r == name) {
            self.dirty_rooms.push(name.to_owned());
        }
    }

    fn create_room(&mut self, c: &CreateRoom, ts_ms: u64) -> Result<Result<OpOutcome, CommandError>, StoreError> {
        if let Err(e) = Limits::PROTOCOL.check_create_room(c) {
            return Ok(Err(e));
        }
        if self.room(&c.room)?.is_some() {
            return Ok(Err(CommandError::RoomExists { room: c.room.clone() }));
        }
        let room_id = match self.next_room_id {
            Some(id) => id,
            None => self.view.get_u64(&self.keys.next_room_id(), "room id counter")?.unwrap_or(1),
        };
        self.next_room_id = Some(room_id + 1);
        let record = RoomRecord {
            name: c.room.clone(),
            room_id,
            creator: c.creator.clone(),
            created_ts_ms: ts_ms,
            metadata: c.metadata.clone(),
            last_seq: 0,
            last_ts_ms: ts_ms,
            first_seq: 1,
            retention_max_messages: c.retention_max_messages,
        };
        self.rooms.insert(c.room.clone(), record);
        self.mark_dirty(&c.room);
        Ok(Ok(OpOutcome::RoomCreated { room_id, ts_ms }))
    }

    fn append(&mut self, a: &AppendMessage, ts_ms: u64) -> Result<Result<OpOutcome, CommandError>, StoreError> {
        if let Err(e) = Limits::PROTOCOL.check_append(a) {
            return Ok(Err(e));
        }
        let (room_id, last_seq, last_ts, first_seq, retention) = match self.room(&a.room)? {
            Some(room) => {
                (room.room_id, room.last_seq, room.last_ts_ms, first_retained(room), room.retention_max_messages)
            }
            None => return Ok(Err(CommandError::RoomNotFound { room: a.room.clone() })),
        };

        // Idempotency: has this (client_id, client_seq) been appended to this room?
        let high_key = self.keys.dedup_high(room_id, &a.client_id);
        let high = match self.dedup_high.get(&high_key).or_else(|| self.cache.dedup_high.get(&high_key)) {
            Some(h) => *h,
            None => self.view.get_u64(&high_key, "dedup high-water mark")?.unwrap_or(0),
        };
        let dedup_key = self.keys.dedup(room_id, &a.client_id, a.client_seq);
        if a.client_seq <= high {
            let oldest_accepted = high.saturating_sub(DEDUP_WINDOW - 1).max(1);
            if a.client_seq < oldest_accepted {
                return Ok(Err(CommandError::ClientSeqTooOld {
                    client_seq: a.client_seq,
                    oldest_accepted,
                    window: DEDUP_WINDOW,
                }));
            }
            let previous = match self.dedup.get(&dedup_key) {
                Some(d) => Some(*d),
                None => self.view.get_dedup(&dedup_key)?,
            };
            if let Some(previous) = previous {
                return Ok(Ok(OpOutcome::Appended { seq: previous.seq, ts_ms: previous.ts_ms, duplicate: true }));
            }
            // A client_seq inside the window that was never appended (sends raced or were
            // retried out of order): append it now.
        }

        let seq = last_seq + 1;
        let ts_ms = ts_ms.max(last_ts);
        let message = MessageRecord {
            seq,
            ts_ms,
            sender: a.sender.clone(),
            client_id: a.client_id.clone(),
            client_seq: a.client_seq,
            body: a.body.clone(),
        };
        let sm = self.view.db.cf_sm()?;
        self.write.put_cf(sm, self.keys.message(room_id, seq), message.encode_to_vec());
        let dedup = DedupRecord { seq, ts_ms };
        self.write.put_cf(sm, &dedup_key, dedup.encode_to_vec());
        self.dedup.insert(dedup_key, dedup);
        if a.client_seq > high {
            self.dedup_high.insert(high_key, a.client_seq);
            self.expire_dedup(room_id, &a.client_id, high, a.client_seq)?;
        }
        // Retention: keep the newest `retention` messages.
        let mut new_first = first_seq;
        if retention > 0 && seq - first_seq + 1 > retention {
            new_first = seq - retention + 1;
            if new_first - first_seq <= 64 {
                for old in first_seq..new_first {
                    self.write.delete_cf(sm, self.keys.message(room_id, old));
                }
            } else {
                self.write.delete_range_cf(
                    sm,
                    self.keys.message(room_id, first_seq),
                    self.keys.message(room_id, new_first),
                );
            }
        }
        if let Some(room) = self.rooms.get_mut(&a.room) {
            room.last_seq = seq;
            room.last_ts_ms = ts_ms;
            room.first_seq = new_first;
        }
        self.mark_dirty(&a.room);
        self.appended.push(Arc::new(AppliedMessage { room: a.room.clone(), message, wire: OnceLock::new() }));
        Ok(Ok(OpOutcome::Appended { seq, ts_ms, duplicate: false }))
    }

    /// Deletes the dedup records of `client_id` in `room_id` that left the window, a block of
    /// client_seqs at a time: when the window's lower edge (`high − W`) enters a new block of
    /// [`EXPIRY_BLOCK`] client_seqs, every record of the blocks it left is deleted. Those are
    /// found, in RocksDB and among this batch's writes, rather than guessed: a client that
    /// numbers its sends across rooms has sparse client_seqs in each room, so deleting a fixed
    /// client_seq would mostly miss (and keep the record that is there forever), and deleting
    /// every client_seq of the block would write a tombstone per absent key. Records below the
    /// window are never read (the window check refuses their client_seqs first); this keeps
    /// their number bounded, by at most a block per client and room. Only the high-water marks
    /// and the state decide what is deleted, so every replica deletes the same records however
    /// its entries were grouped into apply calls.
    fn expire_dedup(&mut self, room_id: u64, client_id: &[u8], old: u64, new: u64) -> Result<(), StoreError> {
        let (first, last) = match expired_blocks(old, new) {
            Some(range) => range,
            None => return Ok(()),
        };
        let sm = self.view.db.cf_sm()?;
        let (lo, hi) = (self.keys.dedup(room_id, client_id, first), self.keys.dedup(room_id, client_id, last));
        let mut expired: Vec<Vec<u8>> = self.dedup.range(lo.clone()..=hi).map(|(k, _)| k.clone()).collect();
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(lo.clone());
        // `last <= old < new`, so `last + 1` does not overflow.
        opts.set_iterate_upper_bound(self.keys.dedup(room_id, client_id, last + 1));
        for item in self.view.db.rocks().iterator_cf_opt(sm, opts, IteratorMode::From(&lo, Direction::Forward)) {
            let (key, _) = item?;
            expired.push(key.into_vec());
        }
        for key in expired {
            self.dedup.remove(&key);
            self.write.delete_cf(sm, key);
        }
        Ok(())
    }

    /// The write batch with every changed record, the messages it appends, and the room
    /// records and high-water marks as of this batch (for the cache, once the batch is written).
    #[allow(clippy::type_complexity)]
    fn finish(
        mut self,
    ) -> Result<(WriteBatch, Vec<Arc<AppliedMessage>>, HashMap<String, RoomRecord>, HashMap<Vec<u8>, u64>), StoreError>
    {
        let sm = self.view.db.cf_sm()?;
        for name in &self.dirty_rooms {
            if let Some(room) = self.rooms.get(name) {
                self.write.put_cf(sm, self.keys.room(name), room.encode_to_vec());
            }
        }
        for (key, high) in &self.dedup_high {
            self.write.put_cf(sm, key, keys::encode_u64(*high));
        }
        if let Some(next) = self.next_room_id {
            self.write.put_cf(sm, self.keys.next_room_id(), keys::encode_u64(next));
        }
        // Every room read or changed here is in its state as of this batch: all are cacheable.
        Ok((self.write, self.appended, self.rooms, self.dedup_high))
    }
}

/// The client_seqs whose dedup records expire when a high-water mark moves from `old` to `new`
/// (see `ApplyBatch::expire_dedup`): those of the whole blocks the window's edge left, and no
/// higher than `old` (nothing above it exists yet). `None` when the edge stays in its block.
fn expired_blocks(old: u64, new: u64) -> Option<(u64, u64)> {
    let (first, last) = (expiry_floor(old) + 1, expiry_floor(new).min(old));
    (first <= last).then_some((first, last))
}

/// With high-water mark `high`, every dedup record at or below this client_seq is expired: the
/// window's lower edge, rounded down to a whole block.
fn expiry_floor(high: u64) -> u64 {
    let edge = high.saturating_sub(DEDUP_WINDOW);
    edge - edge % EXPIRY_BLOCK
}

fn sm_read_err(e: StoreError) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

impl RaftStateMachine<TypeConfig> for ShardStateMachine {
    type SnapshotBuilder = ShardSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.view.applied_state().map_err(sm_read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_entries(entries).map_err(|e| StorageIOError::write_state_machine(&e).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        ShardSnapshotBuilder::new(self.view.db.clone(), self.view.shard, self.snapshots.clone())
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let file = self.snapshots.begin_receiving().map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        // The state is about to be replaced: forget what the applier remembered of it.
        self.cache.clear();
        let result = snapshot::install(&self.view, &self.snapshots, meta, *snapshot).await;
        result.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let _ = self.view.events.send(ShardEvent::SnapshotInstalled);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        self.snapshots.current().await.map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }
}

impl Drop for ShardStateMachine {
    fn drop(&mut self) {
        // A purge waiting for an install must not wait for one that cannot come.
        self.snapshots.close();
    }
}

/// Used by tests and benchmarks to build commands.
pub fn append_op(room: &str, sender: &str, client_id: &[u8], client_seq: u64, body: impl Into<Bytes>) -> op::Kind {
    op::Kind::Append(AppendMessage {
        room: room.to_owned(),
        sender: sender.to_owned(),
        client_id: Bytes::copy_from_slice(client_id),
        client_seq,
        body: body.into(),
    })
}

/// Used by tests and benchmarks to build commands.
pub fn create_room_op(room: &str, creator: &str) -> op::Kind {
    op::Kind::CreateRoom(CreateRoom {
        room: room.to_owned(),
        creator: creator.to_owned(),
        metadata: Default::default(),
        retention_max_messages: 0,
    })
}

#[cfg(test)]
mod tests;
