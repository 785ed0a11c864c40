//! One shard's part of a Sync: the viewer's rooms of this shard that changed after a position
//! (a log index), with their read state and newest entries.
//!
//! Cost: a first sync reads every room of the viewer in the shard. A later one walks the
//! shard's room change index after the position and the viewer's room index side by side,
//! and stops at the end of the shorter: then it checks only the rooms of that one (changed
//! rooms for membership, or the viewer's rooms for a change). So it reads at most about twice
//! the smaller of "rooms changed in this shard since" and "rooms of the viewer here", plus
//! the viewer's own change index (markers moved, memberships ended) since the position.

use std::collections::BTreeSet;

use chorus_proto::storage::{MemberRecord, MessageRecord, RoomRecord};
use rocksdb::{Direction, IteratorMode};

use super::read_markers::{joined, listed, ordinal_before, unread_count};
use super::{At, HistoryQuery, ShardReader};
use crate::error::{CommandError, QueryError, StoreError};
use crate::keys::SmKeys;

/// Most newest entries returned per room.
pub const MAX_SYNC_MESSAGES: usize = 100;
/// Bytes of message bodies returned per room at most (the newest entry always comes).
pub const MAX_ROOM_BYTES: usize = 256 * 1024;

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct SyncQuery {
    /// Changes after this log index; `None`: a first sync (every room of the viewer).
    pub since: Option<u64>,
    /// Rooms to return at most.
    pub limit: usize,
    /// Newest entries per room.
    pub messages_per_room: usize,
    /// Rooms after this one in Sync's order (newest last entry first, then by name).
    pub after: Option<(u64, String)>,
}

/// One room of the viewer as Sync returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomUpdate {
    pub room: RoomRecord,
    /// `None`: the viewer is no longer a member (left, kicked).
    pub member: Option<MemberRecord>,
    pub unread: u64,
    pub mentions: u64,
    /// The room's newest entries, oldest first (none if the viewer may not read the room).
    pub messages: Vec<MessageRecord>,
    /// Unread entries exist before the first of `messages`.
    pub limited: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncPage {
    /// The shard's applied log index before the read: every change up to it is covered.
    pub position: u64,
    pub rooms: Vec<RoomUpdate>,
    /// More rooms of this shard follow the last one.
    pub more: bool,
    /// Index entries and room records this read looked at: what it cost (see the module docs).
    pub examined: usize,
}

/// The rooms a Sync looks at (names), those of them in the viewer's own change index, and how
/// many index entries and records finding them read.
type Candidates = (BTreeSet<Vec<u8>>, BTreeSet<Vec<u8>>, usize);

/// Sync's order: newest last entry first, then by name.
fn order_key(room: &RoomRecord) -> (std::cmp::Reverse<u64>, &str) {
    (std::cmp::Reverse(room.last_ts_ms), room.name.as_str())
}

impl ShardReader {
    /// The viewer's rooms of this shard that changed after `query.since`, in Sync's order.
    ///
    /// The page is one point of the shard's state: everything in it (the position, which rooms
    /// changed, their records, the viewer's member records, counts and newest entries) is read
    /// at one RocksDB snapshot. An apply writes its data and its last-applied id in one batch,
    /// so the page shows exactly the entries up to its position: unread and mention counts
    /// agree with the room's sequence, and a later Sync from the position misses nothing.
    pub fn sync(&self, viewer: &str, query: &SyncQuery) -> Result<SyncPage, QueryError> {
        crate::limits::validate_user_name(viewer)?;
        let (_generation, keys) = self.generation();
        let snapshot = self.view.db.rocks().snapshot();
        let at = At::snapshot(&snapshot);
        let position = self.view.applied_at(&snapshot)?.map_or(0, |id| id.index);
        let (candidates, own_changes, looked_at) = self.sync_candidates(at, &keys, viewer, query.since)?;
        let examined = looked_at + candidates.len();
        let mut updates = Vec::new();
        for name in candidates {
            let name = std::str::from_utf8(&name).map_err(|e| {
                StoreError::corrupt(format!("room index entry {name:?} of shard {}", self.view.shard), e)
            })?;
            let Some(room) = self.view.get_room_at(at, &keys, name)? else { continue };
            let member = self.view.get_member_at(at, &keys, room.room_id, viewer)?;
            // A changed room that was never the viewer's is none of their business.
            if !listed(member.as_ref()) && !own_changes.contains(name.as_bytes()) {
                continue;
            }
            if let Some((ts, after)) = &query.after
                && order_key(&room) <= (std::cmp::Reverse(*ts), after.as_str())
            {
                continue;
            }
            updates.push((room, member));
        }
        updates.sort_by(|a, b| order_key(&a.0).cmp(&order_key(&b.0)));
        let more = updates.len() > query.limit;
        updates.truncate(query.limit);
        let mut rooms = Vec::with_capacity(updates.len());
        for (room, member) in updates {
            rooms.push(self.room_update(at, &keys, room, member, query.messages_per_room)?);
        }
        Ok(SyncPage { position, rooms, more, examined })
    }

    /// The names of the rooms to look at (see the module docs for the cost), and those of
    /// them in the viewer's own change index (markers moved, memberships ended).
    fn sync_candidates(
        &self,
        at: At<'_>,
        keys: &SmKeys,
        viewer: &str,
        since: Option<u64>,
    ) -> Result<Candidates, StoreError> {
        let (mine_start, mine_end) = keys.user_room_range(viewer);
        let name_of = |key: Box<[u8]>| key[mine_start.len()..].to_vec();
        let mut candidates = BTreeSet::new();
        let mut own_changes = BTreeSet::new();
        let Some(since) = since else {
            for key in self.keys_of(at, &mine_start, &mine_end)? {
                candidates.insert(name_of(key?));
            }
            let looked_at = candidates.len();
            return Ok((candidates, own_changes, looked_at));
        };
        let (start, end) = keys.room_changes_after(since);
        let mut changes = self.keys_of(at, &start, &end)?;
        let mut mine = self.keys_of(at, &mine_start, &mine_end)?;
        let (mut changed, mut own) = (Vec::new(), Vec::new());
        let changes_ended_first = loop {
            match changes.next() {
                None => break true,
                Some(key) => changed.push(keys.room_of_change(&key?).unwrap_or_default().to_vec()),
            }
            match mine.next() {
                None => break false,
                Some(key) => own.push(name_of(key?)),
            }
        };
        let mut looked_at = changed.len() + own.len();
        if changes_ended_first {
            // The rooms changed since: whether each is the viewer's is checked by the caller.
            candidates.extend(changed);
        } else {
            for key in mine {
                own.push(name_of(key?));
            }
            looked_at = changed.len() + 2 * own.len();
            for name in own {
                let Ok(name_str) = std::str::from_utf8(&name) else { continue };
                if self.view.get_room_at(at, keys, name_str)?.is_some_and(|room| room.changed_at > since) {
                    candidates.insert(name);
                }
            }
        }
        let (start, end) = keys.read_changes_after(viewer, since);
        for key in self.keys_of(at, &start, &end)? {
            let name = keys.room_of_read_change(viewer, &key?).unwrap_or_default().to_vec();
            own_changes.insert(name.clone());
            candidates.insert(name);
            looked_at += 1;
        }
        Ok((candidates, own_changes, looked_at))
    }

    fn room_update(
        &self,
        at: At<'_>,
        keys: &SmKeys,
        room: RoomRecord,
        member: Option<MemberRecord>,
        messages_per_room: usize,
    ) -> Result<RoomUpdate, QueryError> {
        let first = super::first_retained(&room);
        let before_first = || -> u64 {
            match self.view.get_at::<MessageRecord>(at, &keys.message(room.room_id, first), || "message".into()) {
                Ok(Some(message)) => ordinal_before(&message),
                _ => 0,
            }
        };
        let unread = unread_count(&room, member.as_ref(), before_first);
        let joined = joined(member.as_ref());
        let mentions = if joined { member.as_ref().map_or(0, |m| m.unread_mentions) } else { 0 };
        let limit = messages_per_room.min(MAX_SYNC_MESSAGES);
        let messages = if limit == 0 || room.last_seq == 0 {
            Vec::new()
        } else {
            match self.page_at(at, keys, &room, member.as_ref(), HistoryQuery::Before { before: u64::MAX, limit }) {
                Ok(page) => page.messages,
                // Invited to a private room, or removed: counts, but no messages.
                Err(QueryError::Invalid(CommandError::NotMember { .. } | CommandError::Forbidden { .. })) => Vec::new(),
                Err(e) => return Err(e),
            }
        };
        // A room's newest entries stay under MAX_ROOM_BYTES (at least one): the rest is History's.
        let mut messages = messages;
        let mut bytes: usize = messages.iter().map(|m| m.body.len()).sum();
        while messages.len() > 1 && bytes > MAX_ROOM_BYTES {
            bytes -= messages.remove(0).body.len();
        }
        // Mention entries of messages retention deleted may remain: never more than unread.
        let mentions = mentions.min(unread);
        let read_seq = member.as_ref().map_or(0, |m| m.read_seq);
        let limited =
            joined && unread > 0 && messages.first().is_none_or(|m| m.seq > read_seq.saturating_add(1).max(first));
        Ok(RoomUpdate { room, member, unread, mentions, messages, limited })
    }

    /// The keys of `[start, end)` as of `at`, in order, read as they are needed.
    fn keys_of<'a>(
        &'a self,
        at: At<'a>,
        start: &[u8],
        end: &[u8],
    ) -> Result<impl Iterator<Item = Result<Box<[u8]>, StoreError>> + 'a, StoreError> {
        let cf = self.view.db.cf_sm()?;
        let mut opts = at.read_options();
        opts.set_iterate_upper_bound(end.to_vec());
        let iter = self.view.db.rocks().iterator_cf_opt(cf, opts, IteratorMode::From(start, Direction::Forward));
        Ok(iter.map(|item| item.map(|(key, _)| key).map_err(StoreError::from)))
    }
}
