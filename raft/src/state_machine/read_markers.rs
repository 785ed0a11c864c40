//! Read markers, unread counts and mentions: how far each member has read a room, and what
//! they have not read yet, kept so that a catch-up (Sync) costs a few reads per room.
//!
//! - A member's marker (`MemberRecord.read_seq`) moves forward with MarkRead, and to every
//!   entry the member makes (sending a message, joining); only an explicit "mark unread" moves
//!   it back. A retried or reordered MarkRead therefore never moves it back.
//! - Unread = TEXT entries after the marker that are still retained. Every TEXT entry carries
//!   the room's running TEXT count (`text_ordinal`), the marker remembers the count through
//!   itself (`read_text_ordinal`), so an unread count is one subtraction. Own messages move the
//!   marker, so what is unread was sent by others.
//! - A mention of a joined member (`@name` in a TEXT body, or any message of the other user in
//!   a direct room) after their marker adds an index entry and counts in
//!   `MemberRecord.unread_mentions`; a marker moving past it deletes the entry. Entries exist
//!   only for unread mentions. Marking unread does not bring back mentions already read.
//! - Change indexes, for Sync: every room once in the shard's room change index, at the log
//!   index of the entry that last appended to it; per user, the rooms whose marker a MarkRead
//!   moved and the rooms the user stopped being a member of, at that entry's log index. Log
//!   indexes are the same on every replica, so these positions are too.

use chorus_proto::storage::{MarkRead, MemberRecord, MembershipState, MessageKind, MessageRecord, RoomRecord};

use super::{ApplyBatch, OpResult};
use crate::error::{CommandError, StoreError};
use crate::types::OpOutcome;

pub use chorus_proto::mentions::{MAX_MENTIONS_PER_MESSAGE, parse_mentions};

pub(super) fn joined(member: Option<&MemberRecord>) -> bool {
    member.is_some_and(|m| m.state == MembershipState::Joined as i32)
}

/// Joined or invited: the user's room (what their room index lists).
pub(super) fn listed(member: Option<&MemberRecord>) -> bool {
    member.is_some_and(|m| m.state == MembershipState::Joined as i32 || m.state == MembershipState::Invited as i32)
}

/// TEXT entries of `room` after `member`'s marker that are still retained (0 for anyone not
/// joined). `first_ordinal` is the room's TEXT count through `first_retained - 1`, needed only
/// when retention deleted entries after the marker (see [`super::ShardReader`]'s use).
pub fn unread_count(
    room: &RoomRecord,
    member: Option<&MemberRecord>,
    through_before_first: impl FnOnce() -> u64,
) -> u64 {
    let Some(member) = member.filter(|m| joined(Some(m))) else { return 0 };
    let first = super::first_retained(room);
    let mut through = member.read_text_ordinal;
    if member.read_seq.saturating_add(1) < first {
        through = through.max(through_before_first());
    }
    room.text_count.saturating_sub(through)
}

/// The TEXT count through `first_retained(room) - 1`, from the room's first retained entry.
pub(super) fn ordinal_before(first: &MessageRecord) -> u64 {
    first.text_ordinal.saturating_sub(u64::from(first.kind == MessageKind::Text as i32))
}

impl ApplyBatch<'_> {
    /// Records that entry `self.index` appended to (or created) room `name`.
    pub(super) fn touch_room(&mut self, name: &str) {
        let index = self.index;
        if let Some(room) = self.rooms.get_mut(name)
            && room.changed_at != index
        {
            // Once per room and batch (this runs for every entry appended).
            if !self.room_changes.contains_key(name) {
                self.room_changes.insert(name.to_owned(), room.changed_at);
            }
            room.changed_at = index;
        }
    }

    /// The room change index entries of the rooms this batch changed: one per room, at its
    /// last change.
    pub(super) fn write_room_changes(&mut self) -> Result<(), StoreError> {
        let sm = self.view.db.cf_sm()?;
        for (name, before) in std::mem::take(&mut self.room_changes) {
            let Some(room) = self.rooms.get(&name) else { continue };
            if before != 0 {
                self.write.delete_cf(sm, self.keys.room_change(before, &name));
            }
            self.write.put_cf(sm, self.keys.room_change(room.changed_at, &name), []);
        }
        Ok(())
    }

    /// After entry `message` was appended to `room_name`: its sender has read up to it, and
    /// the members it mentions have an unread mention (and a notification, see [`super::notify`]).
    pub(super) fn after_entry(
        &mut self,
        (room_name, room_id): (&str, u64),
        direct_users: &[String],
        message: &MessageRecord,
    ) -> Result<(), StoreError> {
        if !message.sender.is_empty()
            && let Some(mut sender) = self.member(room_id, &message.sender)?
            && joined(Some(&sender))
            && message.seq > sender.read_seq
        {
            self.move_marker(room_id, &mut sender, message.seq, message.text_ordinal)?;
            self.set_member(room_id, &message.sender, Some(sender));
        }
        if message.kind != MessageKind::Text as i32 {
            return Ok(());
        }
        let mentioned = if direct_users.is_empty() {
            parse_mentions(&message.body)
        } else {
            direct_users.iter().filter(|u| **u != message.sender).cloned().collect()
        };
        for user in mentioned {
            if user == message.sender {
                continue;
            }
            let Some(mut member) = self.member(room_id, &user)? else { continue };
            if !joined(Some(&member)) || message.seq <= member.read_seq {
                continue;
            }
            self.put(self.keys.mention(room_id, &user, message.seq), Vec::new())?;
            member.unread_mentions = member.unread_mentions.saturating_add(1);
            self.set_member(room_id, &user, Some(member));
            self.queue_notification((room_name, room_id), &user, message, !direct_users.is_empty())?;
        }
        Ok(())
    }

    /// Sets `member`'s marker to `seq` (through which the room has `ordinal` TEXT entries),
    /// deletes the mention entries it passes and recounts the rest.
    fn move_marker(
        &mut self,
        room_id: u64,
        member: &mut MemberRecord,
        seq: u64,
        ordinal: u64,
    ) -> Result<(), StoreError> {
        let before = member.read_seq;
        member.read_seq = seq;
        member.read_text_ordinal = ordinal;
        if member.unread_mentions == 0 || seq <= before {
            // Marked unread: mentions already read stay read (see the module docs).
            return Ok(());
        }
        // Entries exist only for unread mentions, so this reads no more than it deletes.
        let (start, end) = self.keys.mention_range(room_id, &member.user, before.saturating_add(1), seq);
        let passed = self.keys_in(&start, &end, usize::MAX)?;
        member.unread_mentions = member.unread_mentions.saturating_sub(passed.len() as u64);
        for key in passed {
            self.delete(key)?;
        }
        Ok(())
    }

    /// The room's TEXT count through entry `seq` (an entry of this batch, or in RocksDB).
    fn ordinal_through(&mut self, room: &RoomRecord, seq: u64) -> Result<u64, StoreError> {
        if seq >= room.last_seq {
            return Ok(room.text_count);
        }
        if seq == 0 {
            return Ok(0);
        }
        let first = super::first_retained(room);
        let (at, before_first) = if seq < first { (first, true) } else { (seq, false) };
        let written = self.appended.iter().rev().find(|a| a.room == room.name && a.message.seq == at);
        let message = match written {
            Some(a) => a.message.clone(),
            None => self
                .view
                .get::<MessageRecord>(&self.keys.message(room.room_id, at), || {
                    format!("message {at} of {:?}", room.name)
                })?
                .ok_or_else(|| {
                    StoreError::corrupt(format!("room {:?}", room.name), format!("entry {at} is missing"))
                })?,
        };
        Ok(if before_first { ordinal_before(&message) } else { message.text_ordinal })
    }

    /// MarkRead: moves the user's marker (forward only, unless `unread`).
    pub(super) fn mark_read(&mut self, m: &MarkRead) -> OpResult {
        let Some(room) = self.room(&m.room)?.cloned() else {
            return Ok(Err(CommandError::RoomNotFound { room: m.room.clone() }));
        };
        let Some(mut member) = self.member(room.room_id, &m.user)?.filter(|r| joined(Some(r))) else {
            return Ok(Err(CommandError::NotMember { room: m.room.clone() }));
        };
        let seq = if m.seq == 0 { room.last_seq } else { m.seq };
        if seq > room.last_seq {
            return Ok(Err(CommandError::invalid(
                "seq",
                format!("{seq} is past the newest entry of {} ({})", room.name, room.last_seq),
            )));
        }
        let moves = if m.unread { seq != member.read_seq } else { seq > member.read_seq };
        if moves {
            let ordinal = self.ordinal_through(&room, seq)?;
            self.move_marker(room.room_id, &mut member, seq, ordinal)?;
            if member.read_changed_at != 0 {
                self.delete(self.keys.read_change(&m.user, member.read_changed_at, &room.name))?;
            }
            member.read_changed_at = self.index;
            self.put(self.keys.read_change(&m.user, self.index, &room.name), Vec::new())?;
        }
        if m.share {
            member.shared_read_seq = member.shared_read_seq.max(member.read_seq);
        }
        let first = super::first_retained(&room);
        let before_first =
            if member.read_seq.saturating_add(1) < first { self.ordinal_through(&room, first - 1)? } else { 0 };
        let outcome = OpOutcome::MarkedRead {
            read_seq: member.read_seq,
            unread: unread_count(&room, Some(&member), || before_first),
            mentions: member.unread_mentions,
        };
        self.set_member(room.room_id, &m.user, Some(member));
        Ok(Ok(outcome))
    }

    /// The read state a membership change leaves `after` with, given the member's record
    /// `current` as of this point of the batch: kept while the user stays joined; a user who
    /// joins has read up to their join; a user who stops being joined loses their mention
    /// entries, and one who stops being a member (or invited) gets an entry in their change
    /// index, so that their next Sync says so.
    pub(super) fn carry_read_state(
        &mut self,
        room: &str,
        room_id: u64,
        user: &str,
        current: Option<&MemberRecord>,
        after: Option<MemberRecord>,
    ) -> Result<Option<MemberRecord>, StoreError> {
        let mut after = after;
        match (joined(current), after.as_mut()) {
            (true, Some(next)) if joined(Some(next)) => {
                if let Some(current) = current {
                    next.read_seq = current.read_seq;
                    next.read_text_ordinal = current.read_text_ordinal;
                    next.shared_read_seq = current.shared_read_seq;
                    next.unread_mentions = current.unread_mentions;
                    next.read_changed_at = current.read_changed_at;
                }
                return Ok(after);
            }
            (false, Some(next)) if joined(Some(next)) => {
                let text_count = self.rooms.get(room).map_or(0, |r| r.text_count);
                next.read_seq = next.since_seq;
                next.read_text_ordinal = text_count;
            }
            _ => {}
        }
        if joined(current) {
            let (start, end) = self.keys.mention_range(room_id, user, 0, u64::MAX);
            for key in self.keys_in(&start, &end, usize::MAX)? {
                self.delete(key)?;
            }
            if let Some(changed_at) = current.map(|c| c.read_changed_at).filter(|&c| c != 0) {
                self.delete(self.keys.read_change(user, changed_at, room))?;
            }
        }
        if listed(current) && !listed(after.as_ref()) {
            self.put(self.keys.read_change(user, self.index, room), Vec::new())?;
        }
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::fixture::{Fixture, refused};
    use crate::state_machine::sync::{SyncPage, SyncQuery};
    use crate::state_machine::{append_op, create_room_op, membership_op};
    use chorus_proto::storage::{MembershipAction, OpenDirect, op};

    fn mark(room: &str, user: &str, seq: u64, unread: bool) -> op::Kind {
        op::Kind::MarkRead(MarkRead { room: room.into(), user: user.into(), seq, unread, share: false })
    }

    fn say(room: &str, sender: &str, client_seq: u64, body: &str) -> op::Kind {
        append_op(room, sender, sender.as_bytes(), client_seq, body.to_owned())
    }

    fn join(room: &str, user: &str) -> op::Kind {
        membership_op(room, user, MembershipAction::Join, "")
    }

    async fn apply(f: &mut Fixture, op: op::Kind) -> Result<OpOutcome, CommandError> {
        f.apply_cmd(5_000, vec![op]).await.pop().unwrap()
    }

    /// (read_seq, unread, mentions) of `user` in `room`, as Sync reports them.
    async fn state(f: &mut Fixture, room: &str, user: &str) -> (u64, u64, u64) {
        let page = sync(f, user, None);
        let update = page.rooms.iter().find(|r| r.room.name == room).unwrap();
        (update.member.as_ref().map_or(0, |m| m.read_seq), update.unread, update.mentions)
    }

    fn sync(f: &Fixture, user: &str, since: Option<u64>) -> SyncPage {
        let query = SyncQuery { since, limit: 100, messages_per_room: 3, after: None };
        f.sm.reader().sync(user, &query).unwrap()
    }

    fn names(page: &SyncPage) -> Vec<&str> {
        let mut names: Vec<&str> = page.rooms.iter().map(|r| r.room.name.as_str()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_marker_moves_forward_only_unless_marked_unread() {
        let mut f = Fixture::new();
        f.create("r").await;
        apply(&mut f, join("r", "bob")).await.unwrap(); // entry 1
        for i in 1..=5 {
            apply(&mut f, say("r", "alice", i, "hello")).await.unwrap(); // entries 2..=6
        }
        assert_eq!(state(&mut f, "r", "bob").await, (1, 5, 0));
        assert!(matches!(
            apply(&mut f, mark("r", "bob", 4, false)).await,
            Ok(OpOutcome::MarkedRead { read_seq: 4, unread: 2, .. })
        ));
        // A retried or reordered mark never moves it back.
        assert!(matches!(
            apply(&mut f, mark("r", "bob", 3, false)).await,
            Ok(OpOutcome::MarkedRead { read_seq: 4, unread: 2, .. })
        ));
        assert!(matches!(
            apply(&mut f, mark("r", "bob", 0, false)).await,
            Ok(OpOutcome::MarkedRead { read_seq: 6, unread: 0, .. })
        ));
        // Marking unread sets it exactly.
        assert!(matches!(
            apply(&mut f, mark("r", "bob", 2, true)).await,
            Ok(OpOutcome::MarkedRead { read_seq: 2, unread: 4, .. })
        ));
        assert_eq!(refused(apply(&mut f, mark("r", "bob", 7, false)).await), "invalid_argument");
        assert_eq!(refused(apply(&mut f, mark("r", "carol", 1, false)).await), "not_member");
        assert_eq!(refused(apply(&mut f, mark("nowhere", "bob", 1, false)).await), "room_not_found");
    }

    #[tokio::test]
    async fn own_entries_move_the_marker_and_only_others_text_is_unread() {
        let mut f = Fixture::new();
        f.create("r").await;
        apply(&mut f, join("r", "bob")).await.unwrap(); // 1
        apply(&mut f, say("r", "alice", 1, "one")).await.unwrap(); // 2
        apply(&mut f, say("r", "alice", 2, "two")).await.unwrap(); // 3
        assert_eq!(state(&mut f, "r", "bob").await, (1, 2, 0));
        apply(&mut f, say("r", "bob", 1, "mine")).await.unwrap(); // 4
        assert_eq!(state(&mut f, "r", "bob").await, (4, 0, 0));
        // Membership events are not unread messages.
        apply(&mut f, join("r", "carol")).await.unwrap(); // 5
        assert_eq!(state(&mut f, "r", "bob").await, (4, 0, 0));
        // A user who joins has read everything before their join.
        apply(&mut f, say("r", "alice", 3, "three")).await.unwrap(); // 6
        assert_eq!(state(&mut f, "r", "carol").await, (5, 1, 0));
        assert_eq!(state(&mut f, "r", "alice").await, (6, 0, 0));
    }

    #[tokio::test]
    async fn mentions_count_until_read_and_direct_messages_count_as_mentions() {
        let mut f = Fixture::new();
        f.create("r").await;
        apply(&mut f, join("r", "bob")).await.unwrap(); // 1
        apply(&mut f, say("r", "alice", 1, "hi @bob")).await.unwrap(); // 2
        apply(&mut f, say("r", "alice", 2, "@carol is not here; @Bob, again")).await.unwrap(); // 3
        apply(&mut f, say("r", "alice", 3, "bob@example.com is no mention")).await.unwrap(); // 4
        assert_eq!(state(&mut f, "r", "bob").await, (1, 3, 2));
        assert!(matches!(
            apply(&mut f, mark("r", "bob", 2, false)).await,
            Ok(OpOutcome::MarkedRead { mentions: 1, .. })
        ));
        // Own mentions of oneself, and mentions already read, do not count.
        apply(&mut f, say("r", "bob", 1, "@bob talks to himself")).await.unwrap(); // 5
        assert_eq!(state(&mut f, "r", "bob").await, (5, 0, 0));
        // Leaving drops what was unread.
        apply(&mut f, say("r", "alice", 4, "@bob?")).await.unwrap(); // 6
        assert_eq!(state(&mut f, "r", "bob").await, (5, 1, 1));
        apply(&mut f, membership_op("r", "bob", MembershipAction::Leave, "")).await.unwrap();
        apply(&mut f, join("r", "bob")).await.unwrap();
        assert_eq!(state(&mut f, "r", "bob").await, (8, 0, 0));
        // In a direct room, every message of the other user is a mention.
        let direct = super::super::rooms::direct_room_name("alice", "bob");
        let open = op::Kind::OpenDirect(OpenDirect {
            room: direct.clone(),
            actor: "alice".into(),
            users: vec!["alice".into(), "bob".into()],
        });
        apply(&mut f, open).await.unwrap();
        apply(&mut f, say(&direct, "alice", 1, "psst")).await.unwrap();
        assert_eq!(state(&mut f, &direct, "bob").await.2, 1);
        assert_eq!(state(&mut f, &direct, "alice").await.2, 0);
    }

    #[tokio::test]
    async fn unread_counts_leave_out_what_retention_deleted() {
        let mut f = Fixture::new();
        let mut create = create_room_op("r", "alice");
        if let op::Kind::CreateRoom(c) = &mut create {
            c.retention_max_messages = 3;
        }
        apply(&mut f, create).await.unwrap();
        apply(&mut f, join("r", "bob")).await.unwrap(); // 1
        for i in 1..=10 {
            apply(&mut f, say("r", "alice", i, "x")).await.unwrap(); // 2..=11
        }
        // Entries 9..=11 are retained: three unread, not ten.
        let page = sync(&f, "bob", None);
        assert_eq!(page.rooms[0].unread, 3);
        assert!(!page.rooms[0].limited, "every retained unread entry is in the reply");
        assert!(matches!(apply(&mut f, mark("r", "bob", 5, false)).await, Ok(OpOutcome::MarkedRead { unread: 3, .. })));
        assert!(matches!(
            apply(&mut f, mark("r", "bob", 10, false)).await,
            Ok(OpOutcome::MarkedRead { unread: 1, .. })
        ));
    }

    #[tokio::test]
    async fn sync_returns_the_rooms_of_the_viewer_that_changed_and_nothing_else() {
        let mut f = Fixture::new();
        for i in 0..10 {
            f.create(&format!("r{i}")).await;
            if i % 2 == 0 {
                apply(&mut f, join(&format!("r{i}"), "bob")).await.unwrap();
            }
        }
        let first = sync(&f, "bob", None);
        assert_eq!(names(&first), vec!["r0", "r2", "r4", "r6", "r8"]);
        let since = first.position;
        assert_eq!(sync(&f, "bob", Some(since)).rooms, vec![]);
        // News in two of bob's rooms and in one that is not his.
        apply(&mut f, say("r2", "alice", 1, "hey @bob")).await.unwrap();
        apply(&mut f, say("r4", "alice", 1, "hey")).await.unwrap();
        apply(&mut f, say("r4", "alice", 2, "you")).await.unwrap();
        apply(&mut f, say("r3", "alice", 1, "not for bob")).await.unwrap();
        let page = sync(&f, "bob", Some(since));
        assert_eq!(names(&page), vec!["r2", "r4"]);
        let r4 = page.rooms.iter().find(|r| r.room.name == "r4").unwrap();
        assert_eq!((r4.unread, r4.mentions, r4.messages.len(), r4.room.last_seq), (2, 0, 3, 3));
        let r2 = page.rooms.iter().find(|r| r.room.name == "r2").unwrap();
        assert_eq!((r2.unread, r2.mentions), (1, 1));
        // A marker moved (on another device), and a membership that ended.
        let since = page.position;
        apply(&mut f, mark("r4", "bob", 0, false)).await.unwrap();
        apply(&mut f, membership_op("r6", "bob", MembershipAction::Leave, "")).await.unwrap();
        let page = sync(&f, "bob", Some(since));
        assert_eq!(names(&page), vec!["r4", "r6"]);
        assert!(page.rooms.iter().find(|r| r.room.name == "r6").unwrap().member.is_none());
        assert_eq!(page.rooms.iter().find(|r| r.room.name == "r4").unwrap().unread, 0);
        // Others' sync is their own business: carol has no rooms.
        assert_eq!(sync(&f, "carol", None).rooms, vec![]);
        assert_eq!(sync(&f, "carol", Some(0)).rooms, vec![]);
    }

    #[tokio::test]
    async fn a_sync_costs_the_smaller_of_the_changed_rooms_and_the_viewers_rooms() {
        let mut f = Fixture::new();
        // bob is in 100 rooms, carol in 3 of them.
        for i in 0..100 {
            let room = format!("r{i:03}");
            f.create(&room).await;
            apply(&mut f, join(&room, "bob")).await.unwrap();
            if i < 3 {
                apply(&mut f, join(&room, "carol")).await.unwrap();
            }
        }
        let since = sync(&f, "bob", None).position;
        // News in 5 of bob's rooms, among them carol's 3.
        for i in [0, 1, 2, 50, 99] {
            apply(&mut f, say(&format!("r{i:03}"), "alice", 1, "news")).await.unwrap();
        }
        // bob: 5 changed rooms against his 100: about 2 × 5 entries looked at, and the 5 rooms.
        let page = sync(&f, "bob", Some(since));
        assert_eq!(names(&page), vec!["r000", "r001", "r002", "r050", "r099"]);
        assert!(page.examined <= 2 * 5 + 1 + 5, "bob's sync looked at {} entries and rooms", page.examined);
        // carol: her 3 rooms against 5 changed ones: about 2 × 3, her rooms twice, and 3 rooms.
        let page = sync(&f, "carol", Some(since));
        assert_eq!(names(&page), vec!["r000", "r001", "r002"]);
        assert!(page.examined <= 5 + 2 * 3 + 3, "carol's sync looked at {} entries and rooms", page.examined);
        // A first sync reads every room of the viewer.
        assert_eq!(sync(&f, "bob", None).examined, 200);
    }

    #[tokio::test]
    async fn sync_pages_in_order_of_the_last_entry() {
        let mut f = Fixture::new();
        for i in 0..7 {
            f.create(&format!("r{i}")).await;
        }
        for (client_seq, room) in ["r3", "r1", "r5"].iter().enumerate() {
            f.apply_cmd(10_000 + client_seq as u64, vec![say(room, "alice", 1, "x")]).await;
        }
        let reader = f.sm.reader();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let query = SyncQuery { since: None, limit: 3, messages_per_room: 0, after: after.clone() };
            let page = reader.sync("alice", &query).unwrap();
            seen.extend(page.rooms.iter().map(|r| r.room.name.clone()));
            let Some(last) = page.rooms.last() else { break };
            after = Some((last.room.last_ts_ms, last.room.name.clone()));
            if !page.more {
                break;
            }
        }
        assert_eq!(seen, vec!["r5", "r1", "r3", "r0", "r2", "r4", "r6"]);
    }

    /// A Sync page is one point of the state: while entries apply, every page's unread and
    /// mention counts agree with its room's sequence and its position. (Read live, a mention
    /// applied between reading the room and the member record counted in mentions but not in
    /// unread; the chaos checker found it as `sync_count_mismatch`.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_page_reads_one_point_of_the_state_while_entries_apply() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let mut f = Fixture::new();
        f.create("r").await;
        apply(&mut f, join("r", "bob")).await.unwrap();
        let base = sync(&f, "bob", None);
        let (base_position, base_seq) = (base.position, base.rooms[0].room.last_seq);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = f.sm.reader();
        let syncer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let query = SyncQuery { since: None, limit: 10, messages_per_room: 1, after: None };
                let mut pages = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let page = reader.sync("bob", &query).unwrap();
                    let room = &page.rooms[0];
                    // Message k (1, 2, ...) is one entry; the odd ones mention bob.
                    let sent = room.room.last_seq - base_seq;
                    let seen = (room.unread, room.mentions, page.position - base_position);
                    assert_eq!(seen, (sent, sent.div_ceil(2), sent), "page {pages} at seq {}", room.room.last_seq);
                    pages += 1;
                }
                pages
            })
        };
        for k in 1..=3_000u64 {
            let body = if k % 2 == 1 { "hey @bob" } else { "hey" };
            apply(&mut f, say("r", "alice", k, body)).await.unwrap();
            if syncer.is_finished() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let pages = syncer.join().unwrap_or_else(|_| panic!("a Sync page disagreed with itself: see the panic above"));
        assert!(pages > 0);
    }
}
