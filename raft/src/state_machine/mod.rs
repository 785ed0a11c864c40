//! The state machine of one shard. A room shard holds rooms, their members and their gap-free
//! message sequences, with the idempotency records that make retried sends harmless; the meta
//! group ([`META_SHARD`]) holds the cluster's accounts, sessions and token signing keys. One
//! module per kind of command:
//!
//! - [`messages`]: appending messages and membership events to a room, and reading history;
//! - [`rooms`]: creating rooms, membership and roles, direct-message rooms, and who may read
//!   or send;
//! - [`accounts`]: users, sessions, external identities and signing keys (meta group only).
//!
//! Invariants (each tested in `tests.rs` and the modules' tests):
//! - Every room's messages are numbered 1, 2, 3, … with no gap: `RoomRecord.last_seq = n` means
//!   messages `1..=n` all exist.
//! - Applying is deterministic: the result depends only on the entries and the prior state, so
//!   every replica computes the same state and the same responses. Limits here are the protocol's
//!   constants ([`Limits::PROTOCOL`]), never a node's configuration.
//! - One apply call is one RocksDB write batch: messages, dedup records, room and member
//!   records, accounts, the last-applied log id and the membership land together or not at all.
//! - A `(room, client_id, client_seq)` is appended at most once. Its outcome is remembered while
//!   `client_seq` is within the newest [`DEDUP_WINDOW`] client_seqs of that client in that room;
//!   records below the window are deleted a block at a time, so at most
//!   `DEDUP_WINDOW + EXPIRY_BLOCK` client_seqs' records are kept per client and room.
//! - A room's timestamps never decrease, whatever the leaders' clocks say.
//! - Every operation is authorized here, against the state it applies to: a message is appended
//!   only if its sender is a joined member when its entry applies, so a kick and a send are
//!   ordered like two messages (the kick is itself an event of the room's sequence).

pub mod accounts;
pub mod messages;
pub mod notify;
pub mod read_markers;
pub mod rooms;
pub mod sync;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};

use bytes::Bytes;
use chorus_proto::storage::{
    AppendMessage, ChangeMembership, Command, CreateRoom, DedupRecord, MemberRecord, MembershipAction, MessageRecord,
    RoomRecord, StoredMembership as PbMembership, Visibility, op,
};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use prost::Message;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use tokio::sync::broadcast;

use crate::codec;
use crate::db::NodeDb;
use crate::error::{CommandError, StoreError};
use crate::keys::{self, META_SHARD, SmKeys, StateKey};
use crate::limits::Limits;
use crate::snapshot::{self, ShardSnapshotBuilder, SnapshotStore};
use crate::types::{
    CommandResponse, Entry, LogId, OpOutcome, ShardId, Snapshot, SnapshotMeta, StorageError, StoredMembership,
    TypeConfig,
};

pub use accounts::Revocation;
pub use messages::first_retained;

/// How many of a client's newest `client_seq`s per room are remembered for deduplication. A
/// client may have at most this many sends to one room in flight.
pub const DEDUP_WINDOW: u64 = 4096;

/// Most messages or rooms returned by one query.
pub const MAX_PAGE: usize = 1000;

/// The authorization rules leaders stamp into the commands they propose (`Command.rules`):
/// 1 checks room membership on every append and makes a room's creator its owner. Entries of
/// rules 0 (written before accounts existed) replay as they first applied: appended without a
/// membership check, rooms created without members.
pub const CURRENT_RULES: u32 = 1;

/// Capacity of a shard's event channel. A subscriber further behind than this many apply
/// batches gets `Lagged` and reads what it missed from history instead.
const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// What the state machine tells live subscribers.
#[derive(Debug, Clone)]
pub enum ShardEvent {
    /// Messages (and membership events) appended by one apply batch, in order. Each is shared
    /// on its own, so that a reader holding one message does not hold the whole batch.
    Appended(Arc<Vec<Arc<AppliedMessage>>>),
    /// A snapshot replaced the shard's state: re-read positions from history (and, in the
    /// meta group, re-check every session).
    SnapshotInstalled,
    /// Meta group: sessions ended (logout, log out everywhere, a disabled account).
    Revoked(Arc<Revocation>),
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

/// A RocksDB key and its value.
type KeyValue = (Box<[u8]>, Box<[u8]>);

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

    /// A protobuf record, decoded; `what` names it in the error if it does not decode.
    fn get<T: Message + Default>(&self, key: &[u8], what: impl FnOnce() -> String) -> Result<Option<T>, StoreError> {
        self.get_at(At::LIVE, key, what)
    }

    /// [`ShardView::get`], as of `at`.
    fn get_at<T: Message + Default>(
        &self,
        at: At<'_>,
        key: &[u8],
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>, StoreError> {
        let cf = self.db.cf_sm()?;
        let found = match at.0 {
            Some(snapshot) => snapshot.get_pinned_cf(cf, key)?,
            None => self.db.rocks().get_pinned_cf(cf, key)?,
        };
        match found {
            None => Ok(None),
            Some(bytes) => T::decode(bytes.as_ref())
                .map(Some)
                .map_err(|e| StoreError::corrupt(format!("{} of shard {}", what(), self.shard), e)),
        }
    }

    fn get_room(&self, keys: &SmKeys, name: &str) -> Result<Option<RoomRecord>, StoreError> {
        self.get_room_at(At::LIVE, keys, name)
    }

    fn get_room_at(&self, at: At<'_>, keys: &SmKeys, name: &str) -> Result<Option<RoomRecord>, StoreError> {
        self.get_at(at, &keys.room(name), || format!("room record {name:?}"))
    }

    fn get_member(&self, keys: &SmKeys, room_id: u64, user: &str) -> Result<Option<MemberRecord>, StoreError> {
        self.get_member_at(At::LIVE, keys, room_id, user)
    }

    fn get_member_at(
        &self,
        at: At<'_>,
        keys: &SmKeys,
        room_id: u64,
        user: &str,
    ) -> Result<Option<MemberRecord>, StoreError> {
        self.get_at(at, &keys.member(room_id, user), || format!("member record of {user:?} in room {room_id}"))
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
        self.get(key, || "dedup record".into())
    }

    /// Keys and values of `[start, end)`, in order, at most `limit` of them.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let cf = self.db.cf_sm()?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(end.to_vec());
        let iter = self.db.rocks().iterator_cf_opt(cf, opts, IteratorMode::From(start, Direction::Forward));
        let mut out = Vec::new();
        for item in iter.take(limit) {
            out.push(item?);
        }
        Ok(out)
    }

    fn applied_state(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        let applied = self.db.read_state(self.shard, StateKey::Applied, codec::decode_log_id)?;
        let membership = self.db.read_state(self.shard, StateKey::Membership, codec::decode_stored_membership)?;
        Ok((applied, membership.unwrap_or_default()))
    }

    /// The last log id applied, as of `snapshot`: exactly the entries whose effects it shows,
    /// since an apply writes its data and its last-applied id in one batch.
    fn applied_at(&self, snapshot: &rocksdb::Snapshot<'_>) -> Result<Option<LogId>, StoreError> {
        self.db.read_state_at(Some(snapshot), self.shard, StateKey::Applied, codec::decode_log_id)
    }
}

/// Where a read looks: at the live state (each read sees the newest applied batch, so two
/// reads may see two different states), or at one point of it, a RocksDB snapshot. Reads that
/// must agree with each other (a Sync page's counts and entries, a history page's bounds and
/// messages) take one snapshot and read everything at it.
#[derive(Clone, Copy)]
pub(crate) struct At<'s>(Option<&'s rocksdb::Snapshot<'s>>);

impl<'s> At<'s> {
    pub(crate) const LIVE: At<'static> = At(None);

    pub(crate) fn snapshot(snapshot: &'s rocksdb::Snapshot<'s>) -> At<'s> {
        At(Some(snapshot))
    }

    /// Options for an iterator that reads at this point; the iterator must not outlive `'s`.
    pub(crate) fn read_options(self) -> ReadOptions {
        let mut opts = ReadOptions::default();
        if let Some(snapshot) = self.0 {
            opts.set_snapshot(snapshot);
        }
        opts
    }
}

/// Read access to one shard's state machine. Cheap to clone. Reads of rooms are in
/// [`rooms`] and [`messages`], reads of accounts in [`accounts`].
#[derive(Clone)]
pub struct ShardReader {
    view: Arc<ShardView>,
}

impl ShardReader {
    pub fn shard(&self) -> ShardId {
        self.view.shard
    }

    /// The last log id applied on this replica.
    pub fn applied(&self) -> Result<Option<LogId>, StoreError> {
        Ok(self.view.applied_state()?.0)
    }

    /// Live events of this shard, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ShardEvent> {
        self.view.events.subscribe()
    }

    /// The key builder of the active generation, and the guard that keeps it active.
    fn generation(&self) -> (RwLockReadGuard<'_, u32>, SmKeys) {
        let generation = self.view.read_generation();
        let keys = SmKeys::new(self.view.shard, *generation);
        (generation, keys)
    }
}

/// Records the applier reads on every append, kept in memory so that apply does not look them
/// up in RocksDB each time. Only the applier writes them, so the cache is exact; it is bounded
/// (cleared when over its bounds) and cleared when a snapshot replaces the state.
#[derive(Default)]
struct ApplyCache {
    rooms: HashMap<String, RoomRecord>,
    dedup_high: HashMap<Vec<u8>, u64>,
    /// Member records by key; `None`: known not to exist.
    members: HashMap<Vec<u8>, Option<MemberRecord>>,
}

const MAX_CACHED_ROOMS: usize = 16 * 1024;
const MAX_CACHED_CLIENTS: usize = 64 * 1024;
const MAX_CACHED_MEMBERS: usize = 64 * 1024;

impl ApplyCache {
    fn remember(&mut self, state: BatchState) {
        if self.rooms.len() + state.rooms.len() > MAX_CACHED_ROOMS {
            self.rooms.clear();
        }
        self.rooms.extend(state.rooms);
        if self.dedup_high.len() + state.dedup_high.len() > MAX_CACHED_CLIENTS {
            self.dedup_high.clear();
        }
        self.dedup_high.extend(state.dedup_high);
        if self.members.len() + state.members.len() > MAX_CACHED_MEMBERS {
            self.members.clear();
        }
        self.members.extend(state.members);
    }

    fn clear(&mut self) {
        self.rooms.clear();
        self.dedup_high.clear();
        self.members.clear();
    }
}

/// openraft's state machine for one shard.
pub struct ShardStateMachine {
    view: Arc<ShardView>,
    snapshots: Arc<SnapshotStore>,
    cache: Arc<Mutex<ApplyCache>>,
}

/// The apply cache of a shard. An apply that panicked may have left it half-updated: start
/// again from an empty one (it only saves reads).
fn lock_cache(cache: &Mutex<ApplyCache>) -> MutexGuard<'_, ApplyCache> {
    cache.lock().unwrap_or_else(|poisoned| {
        cache.clear_poison();
        let mut cache = poisoned.into_inner();
        cache.clear();
        cache
    })
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
        Ok(ShardStateMachine { view, snapshots, cache: Default::default() })
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
}

/// Applies entries in one atomic write; see the module invariants. Reads and writes RocksDB on
/// the calling thread, which may block: [`ShardStateMachine::apply`] runs it on a blocking one.
fn apply_entries(
    view: &ShardView,
    snapshots: &SnapshotStore,
    cache: &mut ApplyCache,
    entries: Vec<Entry>,
) -> Result<Vec<CommandResponse>, StoreError> {
    let generation = *view.read_generation();
    let mut batch = ApplyBatch::new(view, SmKeys::new(view.shard, generation), cache);
    let mut responses = Vec::new();
    let mut last_applied = None;
    let mut membership = None;
    let mut log_bytes = 0u64;
    for entry in entries {
        last_applied = Some(entry.log_id);
        batch.index = entry.log_id.index;
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
    let (mut write, appended, revocations, state) = batch.finish()?;
    let cf_state = view.db.cf_state()?;
    write.put_cf(
        cf_state,
        keys::state_key(view.shard, StateKey::Applied),
        codec::log_id_to_pb(&last_applied).encode_to_vec(),
    );
    if let Some(m) = &membership {
        let pb: PbMembership = codec::stored_membership_to_pb(m);
        write.put_cf(cf_state, keys::state_key(view.shard, StateKey::Membership), pb.encode_to_vec());
    }
    // Not synced: the entries are durable in the log, and last-applied moves with the data,
    // so after a crash openraft re-applies exactly what is missing.
    view.db.write(write)?;
    cache.remember(state);
    snapshots.pacer().applied(responses.len() as u64, log_bytes);
    // No receiver is not an error: nobody is subscribed to this shard right now.
    if !appended.is_empty() {
        let _ = view.events.send(ShardEvent::Appended(Arc::new(appended)));
    }
    for revocation in revocations {
        let _ = view.events.send(ShardEvent::Revoked(Arc::new(revocation)));
    }
    Ok(responses)
}

/// What one apply call leaves for the cache once its batch is written: every room, high-water
/// mark and member record it read or changed, as of the end of the batch.
struct BatchState {
    rooms: HashMap<String, RoomRecord>,
    dedup_high: HashMap<Vec<u8>, u64>,
    members: HashMap<Vec<u8>, Option<MemberRecord>>,
}

/// The outcome of one operation: outer error, the store failed (fatal); inner error, the
/// operation was refused (it wrote nothing).
type OpResult = Result<Result<OpOutcome, CommandError>, StoreError>;

/// The state one apply call builds up before its single write: records changed so far, so
/// that later operations of the same batch see earlier ones.
struct ApplyBatch<'a> {
    view: &'a ShardView,
    cache: &'a ApplyCache,
    keys: SmKeys,
    write: WriteBatch,
    /// Rooms read or changed by this batch, and which of them changed.
    rooms: HashMap<String, RoomRecord>,
    dirty_rooms: Vec<String>,
    dedup_high: HashMap<Vec<u8>, u64>,
    /// Dedup records written by this batch, in key order (expiry looks them up by range).
    dedup: std::collections::BTreeMap<Vec<u8>, DedupRecord>,
    next_room_id: Option<u64>,
    /// Member records read or changed by this batch (`None`: none exists), and which changed.
    members: HashMap<Vec<u8>, Option<MemberRecord>>,
    dirty_members: BTreeSet<Vec<u8>>,
    /// Other records (accounts, indexes) written by this batch: encoded value, or `None` for a
    /// deletion. Reads look here before RocksDB, so later operations see earlier ones.
    overlay: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    appended: Vec<Arc<AppliedMessage>>,
    revocations: Vec<Revocation>,
    /// The rules of the command being applied (see [`CURRENT_RULES`]).
    rules: u32,
    /// The log index of the entry being applied: the position of what it changes in the
    /// change indexes (see [`read_markers`]).
    index: u64,
    /// Rooms this batch appended to or created, with their `changed_at` before the batch.
    room_changes: HashMap<String, u64>,
    /// The command's `notify_after_ms` (0: queue no notifications; see [`notify`]).
    notify_after_ms: u64,
    /// The entry whose notifications are being numbered, and the next number.
    notify_ordinal: (u64, u32),
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
            dedup: Default::default(),
            next_room_id: None,
            members: HashMap::new(),
            dirty_members: BTreeSet::new(),
            overlay: Default::default(),
            appended: Vec::new(),
            revocations: Vec::new(),
            rules: CURRENT_RULES,
            index: 0,
            room_changes: HashMap::new(),
            notify_after_ms: 0,
            notify_ordinal: (0, 0),
        }
    }

    fn is_meta(&self) -> bool {
        self.view.shard == META_SHARD
    }

    fn apply_command(&mut self, cmd: &Command) -> Result<CommandResponse, StoreError> {
        if let Err(e) = Limits::PROTOCOL.check_batch(cmd) {
            let n = cmd.ops.len().max(1);
            return Ok(CommandResponse { results: vec![Err(e); n] });
        }
        let ts_ms = cmd.ts_ms;
        self.rules = cmd.rules;
        self.notify_after_ms = cmd.notify_after_ms;
        let mut results = Vec::with_capacity(cmd.ops.len());
        for op in &cmd.ops {
            let result = match &op.kind {
                None => Err(CommandError::UnknownOperation),
                Some(kind) => match Limits::PROTOCOL.check_op(kind) {
                    Err(e) => Err(e),
                    Ok(()) => self.apply_op(kind, ts_ms)?,
                },
            };
            results.push(result);
        }
        Ok(CommandResponse { results })
    }

    fn apply_op(&mut self, kind: &op::Kind, ts_ms: u64) -> OpResult {
        use op::Kind as K;
        let room_op = matches!(
            kind,
            K::CreateRoom(_)
                | K::Append(_)
                | K::Membership(_)
                | K::OpenDirect(_)
                | K::MarkRead(_)
                | K::NotificationsDone(_)
        );
        if room_op == self.is_meta() {
            let group = if self.is_meta() { "the meta group" } else { "a room shard" };
            return Ok(Err(CommandError::Misrouted { group }));
        }
        match kind {
            K::CreateRoom(c) => self.create_room(c, ts_ms),
            K::Append(a) => self.append(a, ts_ms),
            K::Membership(m) => self.change_membership(m, ts_ms),
            K::OpenDirect(d) => self.open_direct(d, ts_ms),
            K::MarkRead(m) => self.mark_read(m),
            K::NotificationsDone(d) => self.notifications_done(d, ts_ms),
            K::CreateUser(u) => self.create_user(u, ts_ms),
            K::CreateSession(s) => self.create_session(s, ts_ms),
            K::ExternalLogin(e) => self.external_login(e, ts_ms),
            K::RevokeSessions(r) => self.revoke_sessions(r, ts_ms),
            K::SetUserDisabled(d) => self.set_user_disabled(d, ts_ms),
            K::AddSigningKey(k) => self.add_signing_key(k, ts_ms),
            K::TouchSession(t) => self.touch_session(t, ts_ms),
        }
    }

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

    /// `user`'s membership record of room `room_id`, as of this point of the batch.
    fn member(&mut self, room_id: u64, user: &str) -> Result<Option<MemberRecord>, StoreError> {
        let key = self.keys.member(room_id, user);
        if let Some(known) = self.members.get(&key) {
            return Ok(known.clone());
        }
        let known = match self.cache.members.get(&key) {
            Some(known) => known.clone(),
            None => self.view.get_member(&self.keys, room_id, user)?,
        };
        self.members.insert(key, known.clone());
        Ok(known)
    }

    /// Records `user`'s new membership of `room_id` (`None`: no longer a member of any kind).
    fn set_member(&mut self, room_id: u64, user: &str, record: Option<MemberRecord>) {
        let key = self.keys.member(room_id, user);
        self.members.insert(key.clone(), record);
        self.dirty_members.insert(key);
    }

    /// A record written earlier in this batch, else in RocksDB.
    fn get<T: Message + Default>(&self, key: &[u8], what: impl FnOnce() -> String) -> Result<Option<T>, StoreError> {
        match self.overlay.get(key) {
            Some(Some(bytes)) => T::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| StoreError::corrupt(format!("{} written by this batch", what()), e)),
            Some(None) => Ok(None),
            None => self.view.get(key, what),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.write.put_cf(self.view.db.cf_sm()?, &key, &value);
        self.overlay.insert(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: Vec<u8>) -> Result<(), StoreError> {
        self.write.delete_cf(self.view.db.cf_sm()?, &key);
        self.overlay.insert(key, None);
        Ok(())
    }

    /// The keys in `[start, end)` as of this point of the batch: RocksDB's, less those this
    /// batch deleted, plus those it wrote. At most `limit` from RocksDB (a bound on work, set
    /// far above what the callers meet).
    fn keys_in(&self, start: &[u8], end: &[u8], limit: usize) -> Result<BTreeSet<Vec<u8>>, StoreError> {
        let mut keys: BTreeSet<Vec<u8>> =
            self.view.scan(start, end, limit)?.into_iter().map(|(k, _)| k.into_vec()).collect();
        for (key, value) in self.overlay.range(start.to_vec()..end.to_vec()) {
            match value {
                Some(_) => keys.insert(key.clone()),
                None => keys.remove(key),
            };
        }
        Ok(keys)
    }

    /// The write batch with every changed record, the messages it appends, the sessions it
    /// revoked, and what the cache should remember once the batch is written.
    #[allow(clippy::type_complexity)]
    fn finish(mut self) -> Result<(WriteBatch, Vec<Arc<AppliedMessage>>, Vec<Revocation>, BatchState), StoreError> {
        self.write_room_changes()?;
        let sm = self.view.db.cf_sm()?;
        for name in &self.dirty_rooms {
            if let Some(room) = self.rooms.get(name) {
                self.write.put_cf(sm, self.keys.room(name), room.encode_to_vec());
            }
        }
        for key in &self.dirty_members {
            match self.members.get(key) {
                Some(Some(member)) => self.write.put_cf(sm, key, member.encode_to_vec()),
                _ => self.write.delete_cf(sm, key),
            }
        }
        for (key, high) in &self.dedup_high {
            self.write.put_cf(sm, key, keys::encode_u64(*high));
        }
        if let Some(next) = self.next_room_id {
            self.write.put_cf(sm, self.keys.next_room_id(), keys::encode_u64(next));
        }
        // Every room and member read or changed here is in its state as of this batch: all are
        // cacheable.
        let state = BatchState { rooms: self.rooms, dedup_high: self.dedup_high, members: self.members };
        Ok((self.write, self.appended, self.revocations, state))
    }
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
        // Off the async workers, on the shard's apply thread: an apply reads records (rooms,
        // members, dedup marks, expiry ranges) that may be cold, and its write may meet a write
        // stall. The thread runs one shard's applies in order.
        let entries: Vec<Entry> = entries.into_iter().collect();
        let (view, snapshots, cache) = (self.view.clone(), self.snapshots.clone(), self.cache.clone());
        let apply = move || apply_entries(&view, &snapshots, &mut lock_cache(&cache), entries);
        let applied = match self.view.db.apply_thread(self.view.shard).run(apply).await {
            Ok(applied) => applied,
            Err(e) => Err(e.into()),
        };
        applied.map_err(|e| StorageIOError::write_state_machine(&e).into())
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
        lock_cache(&self.cache).clear();
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

/// Used by tests and benchmarks to build commands: a public room, `creator` its owner.
pub fn create_room_op(room: &str, creator: &str) -> op::Kind {
    op::Kind::CreateRoom(CreateRoom {
        room: room.to_owned(),
        creator: creator.to_owned(),
        metadata: Default::default(),
        retention_max_messages: 0,
        visibility: Visibility::Public as i32,
    })
}

/// Used by tests and benchmarks to build commands: `actor` does `action` (to `user`).
pub fn membership_op(room: &str, actor: &str, action: MembershipAction, user: &str) -> op::Kind {
    op::Kind::Membership(ChangeMembership {
        room: room.to_owned(),
        actor: actor.to_owned(),
        user: user.to_owned(),
        action: action as i32,
        role: 0,
        reason: String::new(),
    })
}

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod tests;
