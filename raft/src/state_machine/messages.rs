//! A room's sequence: appending messages (exactly once per `(client_id, client_seq)`, and only
//! from joined members), appending membership events, retention, dedup expiry, and reading
//! history pages.
//!
//! Every entry of a room's sequence is a [`MessageRecord`]: a message someone sent (`TEXT`) or
//! a membership change (`JOINED`, `KICKED`, ...). Both take the next sequence number, so a
//! membership change is ordered with the messages around it, in history and in live feeds.

use std::sync::{Arc, OnceLock};

use chorus_proto::storage::{AppendMessage, DedupRecord, MemberRecord, MessageKind, MessageRecord, Role, RoomRecord};
use prost::Message;
use rocksdb::{Direction, IteratorMode, ReadOptions};

use super::rooms::check_send;
use super::{AppliedMessage, ApplyBatch, At, DEDUP_WINDOW, HistoryPage, HistoryQuery, MAX_PAGE, OpResult, ShardReader};
use crate::error::{CommandError, QueryError, StoreError};
use crate::keys::SmKeys;
use crate::limits;
use crate::types::OpOutcome;

/// Dedup records below the window are deleted once the window's edge has left a whole block of
/// this many client_seqs: one range lookup per block per client and room, not one per append.
/// A lookup is a RocksDB iterator over every level (~40 µs here), and a client that sends to
/// many rooms crosses a block in each room after few of its sends there (with 64 rooms, every
/// 16th send at 1,024): a block as large as the window makes that every 64th, for at most twice
/// the window's records kept.
pub(super) const EXPIRY_BLOCK: u64 = DEDUP_WINDOW;

/// The oldest retained message of a room (records written before retention existed say 0).
pub fn first_retained(room: &RoomRecord) -> u64 {
    room.first_seq.max(1)
}

fn limit_is_zero(query: HistoryQuery) -> bool {
    matches!(query, HistoryQuery::After { limit: 0, .. } | HistoryQuery::Before { limit: 0, .. })
}

/// A membership event to append to a room's sequence.
pub(super) struct Event<'e> {
    pub kind: MessageKind,
    pub sender: &'e str,
    pub target: &'e str,
    pub role: Role,
    pub reason: &'e str,
}

impl ShardReader {
    /// The room's newest sequence number (0 when empty).
    pub fn last_seq(&self, name: &str) -> Result<u64, QueryError> {
        match self.room(name)? {
            Some(room) => Ok(room.last_seq),
            None => Err(CommandError::RoomNotFound { room: name.to_owned() }.into()),
        }
    }

    /// A page of a room's history, oldest first, for `viewer`, who must be allowed to read the
    /// room (see [`super::rooms::check_read`]). `limit` is capped at [`MAX_PAGE`].
    ///
    /// The page is read at one point of the state (a RocksDB snapshot): retention deleting the
    /// oldest messages, or an append, while it reads cannot make its bounds and its messages
    /// disagree.
    pub fn history(&self, name: &str, query: HistoryQuery, viewer: &str) -> Result<HistoryPage, QueryError> {
        limits::validate_room_name(name)?;
        let (_generation, keys) = self.generation();
        let snapshot = self.view.db.rocks().snapshot();
        let at = At::snapshot(&snapshot);
        let room = self
            .view
            .get_room_at(at, &keys, name)?
            .ok_or_else(|| CommandError::RoomNotFound { room: name.to_owned() })?;
        let member = self.view.get_member_at(at, &keys, room.room_id, viewer)?;
        self.page_at(at, &keys, &room, member.as_ref(), query)
    }

    /// A history page of `room` (its record and the viewer's member record as of `at`), read
    /// as of `at`, for a caller that holds the generation guard.
    pub(super) fn page_at(
        &self,
        at: At<'_>,
        keys: &SmKeys,
        room: &RoomRecord,
        member: Option<&MemberRecord>,
        query: HistoryQuery,
    ) -> Result<HistoryPage, QueryError> {
        let name = room.name.as_str();
        super::rooms::check_read(room, member)?;
        // Sequence numbers are dense from the oldest retained one, so the page's range is known
        // before reading.
        let oldest = first_retained(room);
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
        let mut opts = at.read_options();
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
}

impl ApplyBatch<'_> {
    pub(super) fn append(&mut self, a: &AppendMessage, ts_ms: u64) -> OpResult {
        let room_id = match self.room(&a.room)? {
            Some(room) => room.room_id,
            None => return Ok(Err(CommandError::RoomNotFound { room: a.room.clone() })),
        };

        // Idempotency: has this (client_id, client_seq) been appended to this room? Asked
        // before membership: a retry of a message appended before its sender was removed
        // returns the original outcome, not a refusal that would say it never happened.
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

        // Only a joined member sends, as of this entry (entries of rules 0 never checked it).
        if self.rules >= 1 {
            let member = self.member(room_id, &a.sender)?;
            let Some(room) = self.rooms.get(&a.room) else {
                return Ok(Err(CommandError::RoomNotFound { room: a.room.clone() }));
            };
            if let Err(e) = check_send(room, member.as_ref()) {
                return Ok(Err(e));
            }
        }

        let message = MessageRecord {
            seq: 0, // set by `push`
            ts_ms,
            sender: a.sender.clone(),
            client_id: a.client_id.clone(),
            client_seq: a.client_seq,
            body: a.body.clone(),
            kind: MessageKind::Text as i32,
            target: String::new(),
            role: 0,
            text_ordinal: 0, // set by `push`
        };
        let Some((seq, ts_ms)) = self.push(&a.room, message)? else {
            return Ok(Err(CommandError::RoomNotFound { room: a.room.clone() }));
        };
        let sm = self.view.db.cf_sm()?;
        let dedup = DedupRecord { seq, ts_ms };
        self.write.put_cf(sm, &dedup_key, dedup.encode_to_vec());
        self.dedup.insert(dedup_key, dedup);
        if a.client_seq > high {
            self.dedup_high.insert(high_key, a.client_seq);
            self.expire_dedup(room_id, &a.client_id, high, a.client_seq)?;
        }
        Ok(Ok(OpOutcome::Appended { seq, ts_ms, duplicate: false }))
    }

    /// Appends a membership event to `room`'s sequence; its `(seq, ts_ms)`.
    pub(super) fn push_event(&mut self, room: &str, event: Event<'_>, ts_ms: u64) -> Result<(u64, u64), StoreError> {
        let message = MessageRecord {
            seq: 0,
            ts_ms,
            sender: event.sender.to_owned(),
            client_id: Default::default(),
            client_seq: 0,
            body: bytes::Bytes::copy_from_slice(event.reason.as_bytes()),
            kind: event.kind as i32,
            target: event.target.to_owned(),
            role: event.role as i32,
            text_ordinal: 0,
        };
        self.push(room, message)?
            .ok_or_else(|| StoreError::corrupt(format!("room {room:?}"), "vanished within its own batch"))
    }

    /// Gives `message` the room's next sequence number and a timestamp no older than the room's
    /// last one, writes it, applies retention and tells live feeds. `None` if the room does
    /// not exist.
    fn push(&mut self, room_name: &str, mut message: MessageRecord) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(room) = self.room(room_name)? else { return Ok(None) };
        let (room_id, last_seq, last_ts, first_seq, retention) =
            (room.room_id, room.last_seq, room.last_ts_ms, first_retained(room), room.retention_max_messages);
        let text_count = room.text_count + u64::from(message.kind == MessageKind::Text as i32);
        let direct_users = room.direct_users.clone();
        let seq = last_seq + 1;
        let ts_ms = message.ts_ms.max(last_ts);
        message.seq = seq;
        message.ts_ms = ts_ms;
        message.text_ordinal = text_count;
        let sm = self.view.db.cf_sm()?;
        self.write.put_cf(sm, self.keys.message(room_id, seq), message.encode_to_vec());
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
        if let Some(room) = self.rooms.get_mut(room_name) {
            room.last_seq = seq;
            room.last_ts_ms = ts_ms;
            room.first_seq = new_first;
            room.text_count = text_count;
        }
        self.mark_dirty(room_name);
        self.touch_room(room_name);
        self.after_entry((room_name, room_id), &direct_users, &message)?;
        self.appended.push(Arc::new(AppliedMessage { room: room_name.to_owned(), message, wire: OnceLock::new() }));
        Ok(Some((seq, ts_ms)))
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
}

/// The client_seqs whose dedup records expire when a high-water mark moves from `old` to `new`
/// (see `ApplyBatch::expire_dedup`): those of the whole blocks the window's edge left, and no
/// higher than `old` (nothing above it exists yet). `None` when the edge stays in its block.
pub(super) fn expired_blocks(old: u64, new: u64) -> Option<(u64, u64)> {
    let (first, last) = (expiry_floor(old) + 1, expiry_floor(new).min(old));
    (first <= last).then_some((first, last))
}

/// With high-water mark `high`, every dedup record at or below this client_seq is expired: the
/// window's lower edge, rounded down to a whole block.
pub(super) fn expiry_floor(high: u64) -> u64 {
    let edge = high.saturating_sub(DEDUP_WINDOW);
    edge - edge % EXPIRY_BLOCK
}
