//! Notifications for users who are away: the queue a room shard's leader delivers from.
//!
//! - A mention of a joined member, or a message to them in a direct room (what counts as an
//!   unread mention, see [`super::read_markers`]), queues one [`NotificationRecord`] when the
//!   entry's command asks for notifications (`Command.notify_after_ms` > 0: the proposing
//!   leader has a webhook). It is queued under its due time (the message's time plus that
//!   delay), the entry's log index and its place among the entry's notifications: the same key
//!   on every replica, which is also the notification's idempotency key.
//! - The queue is bounded: at most [`MAX_QUEUED_NOTIFICATIONS`] per shard. A notification that
//!   finds it full is not queued, and counted in [`NotificationQueueState::dropped`].
//! - Only `NotificationsDone` takes notifications out, once the leader has delivered them or
//!   decided to skip them. Until then every leader (the next one too, after a failover) sees
//!   them: delivery is at least once, and a receiver removes duplicates by the key.
//!
//! Being in the state machine, the queue is replicated, in snapshots, and durable like the
//! messages that queued it.

use chorus_proto::storage::{
    MessageRecord, NotificationId, NotificationQueueState, NotificationRecord, NotificationsDone,
};
use prost::Message;

use super::{ApplyBatch, At, OpResult, ShardReader};
use crate::error::{QueryError, StoreError};
use crate::types::OpOutcome;

/// Most notifications queued in one shard.
pub const MAX_QUEUED_NOTIFICATIONS: u64 = 10_000;
/// Most bytes of a message body a notification carries.
pub const PREVIEW_BYTES: usize = 256;
/// Most ids one NotificationsDone names.
pub const MAX_DONE_PER_OP: usize = 1_000;

/// The start of `body`, at most [`PREVIEW_BYTES`], cut at a UTF-8 character boundary (a body
/// that is not UTF-8 is cut at the limit).
pub fn preview(body: &[u8]) -> Vec<u8> {
    if body.len() <= PREVIEW_BYTES {
        return body.to_vec();
    }
    let mut end = PREVIEW_BYTES;
    if std::str::from_utf8(body).is_ok() {
        while end > 0 && (body[end] & 0b1100_0000) == 0b1000_0000 {
            end -= 1;
        }
    }
    body[..end].to_vec()
}

impl ApplyBatch<'_> {
    fn notify_queue(&self) -> Result<NotificationQueueState, StoreError> {
        Ok(self.get(&self.keys.notify_state(), || "notification queue state".into())?.unwrap_or_default())
    }

    /// Queues a notification of `message` (in room `room`, of id `room_id`) for `user`, if the entry asks
    /// for notifications and the queue has room.
    pub(super) fn queue_notification(
        &mut self,
        (room, room_id): (&str, u64),
        user: &str,
        message: &MessageRecord,
        direct: bool,
    ) -> Result<(), StoreError> {
        if self.notify_after_ms == 0 {
            return Ok(());
        }
        let mut queue = self.notify_queue()?;
        if queue.queued >= MAX_QUEUED_NOTIFICATIONS {
            queue.dropped = queue.dropped.saturating_add(1);
        } else {
            if self.notify_ordinal.0 != self.index {
                self.notify_ordinal = (self.index, 0);
            }
            let ordinal = self.notify_ordinal.1;
            self.notify_ordinal.1 = ordinal.saturating_add(1);
            let due_ms = message.ts_ms.saturating_add(self.notify_after_ms);
            let record = NotificationRecord {
                user: user.to_owned(),
                room: room.to_owned(),
                room_id,
                seq: message.seq,
                sender: message.sender.clone(),
                ts_ms: message.ts_ms,
                direct,
                preview: preview(&message.body).into(),
            };
            self.put(self.keys.notification(due_ms, self.index, ordinal), record.encode_to_vec())?;
            queue.queued += 1;
        }
        self.put(self.keys.notify_state(), queue.encode_to_vec())
    }

    /// NotificationsDone: takes the named notifications out of the queue.
    pub(super) fn notifications_done(&mut self, done: &NotificationsDone, ts_ms: u64) -> OpResult {
        let mut queue = self.notify_queue()?;
        let before = queue.queued;
        for id in &done.ids {
            let key = self.keys.notification(id.due_ms, id.index, id.ordinal);
            if self.get::<NotificationRecord>(&key, || "queued notification".into())?.is_some() {
                self.delete(key)?;
                queue.queued = queue.queued.saturating_sub(1);
            }
        }
        if queue.queued != before {
            self.put(self.keys.notify_state(), queue.encode_to_vec())?;
        }
        Ok(Ok(OpOutcome::Done { ts_ms }))
    }
}

impl ShardReader {
    /// The notifications due at `now_ms` or before, oldest due first, at most `limit`.
    pub fn due_notifications(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(NotificationId, NotificationRecord)>, QueryError> {
        let (_generation, keys) = self.generation();
        let (start, end) = keys.notifications_due(now_ms);
        let mut due = Vec::new();
        for (key, value) in self.view.scan(&start, &end, limit)? {
            let (due_ms, index, ordinal) = keys.notification_id(&key).ok_or_else(|| {
                StoreError::corrupt(format!("notification key of shard {}", self.view.shard), "length")
            })?;
            let record = NotificationRecord::decode(value.as_ref()).map_err(|e| {
                StoreError::corrupt(format!("notification {due_ms}/{index}/{ordinal} of shard {}", self.view.shard), e)
            })?;
            due.push((NotificationId { due_ms, index, ordinal }, record));
        }
        Ok(due)
    }

    /// How many notifications are queued, and how many a full queue dropped.
    pub fn notification_queue(&self) -> Result<NotificationQueueState, StoreError> {
        let (_generation, keys) = self.generation();
        Ok(self.view.get_at(At::LIVE, &keys.notify_state(), || "notification queue state".into())?.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::fixture::Fixture;
    use crate::state_machine::{CURRENT_RULES, append_op, membership_op};
    use chorus_proto::storage::{Command, MembershipAction, Op, OpenDirect, op};
    use openraft::EntryPayload;
    use openraft::storage::RaftStateMachine;

    /// Applies `ops` in one entry at `ts_ms`, asking for notifications after `after_ms`.
    async fn apply_notifying(f: &mut Fixture, ts_ms: u64, after_ms: u64, ops: Vec<op::Kind>) {
        let cmd = Command {
            ts_ms,
            ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
            rules: CURRENT_RULES,
            notify_after_ms: after_ms,
        };
        let entry = f.entry(EntryPayload::Normal(cmd.into()));
        let responses = f.sm.apply([entry]).await.unwrap();
        for result in &responses[0].results {
            assert!(result.is_ok(), "{result:?}");
        }
    }

    fn say(room: &str, sender: &str, client_seq: u64, body: &str) -> op::Kind {
        append_op(room, sender, sender.as_bytes(), client_seq, body.to_owned())
    }

    fn done(ids: Vec<NotificationId>) -> op::Kind {
        op::Kind::NotificationsDone(NotificationsDone { ids })
    }

    #[tokio::test]
    async fn mentions_and_direct_messages_queue_notifications_in_order_of_their_due_time() {
        let mut f = Fixture::new();
        f.create("r").await;
        for user in ["bob", "carol"] {
            f.apply_cmd(1_000, vec![membership_op("r", user, MembershipAction::Join, "")]).await;
        }
        // No notifications asked for: none queued.
        apply_notifying(&mut f, 2_000, 0, vec![say("r", "alice", 1, "@bob one")]).await;
        assert!(f.sm.reader().due_notifications(u64::MAX, 100).unwrap().is_empty());
        // Two mentions in one message, one in another entry with a shorter delay.
        apply_notifying(&mut f, 3_000, 60_000, vec![say("r", "alice", 2, "@bob and @carol, @dave")]).await;
        apply_notifying(&mut f, 4_000, 10_000, vec![say("r", "alice", 3, "@carol again")]).await;
        let reader = f.sm.reader();
        assert!(reader.due_notifications(13_999, 100).unwrap().is_empty());
        let due = reader.due_notifications(u64::MAX, 100).unwrap();
        let seen: Vec<(u64, u32, &str, u64)> =
            due.iter().map(|(id, n)| (id.due_ms, id.ordinal, n.user.as_str(), n.seq)).collect();
        // bob's join is seq 1, carol's 2; the messages 3, 4, 5.
        assert_eq!(seen, vec![(14_000, 0, "carol", 5), (63_000, 0, "bob", 4), (63_000, 1, "carol", 4)]);
        assert_eq!(due[1].1.sender, "alice");
        assert_eq!(due[1].1.room, "r");
        assert!(!due[1].1.direct);
        assert_eq!(reader.notification_queue().unwrap().queued, 3);
        // A direct room: every message of the other user.
        let direct = crate::state_machine::rooms::direct_room_name("alice", "bob");
        let open = op::Kind::OpenDirect(OpenDirect {
            room: direct.clone(),
            actor: "alice".into(),
            users: vec!["alice".into(), "bob".into()],
        });
        apply_notifying(&mut f, 5_000, 1_000, vec![open, say(&direct, "alice", 1, "psst")]).await;
        let due = f.sm.reader().due_notifications(6_000, 100).unwrap();
        assert_eq!(due.len(), 1);
        assert!(due[0].1.direct && due[0].1.user == "bob" && due[0].1.room == direct);
        // Done takes them out, once; a repeated Done is harmless.
        let ids: Vec<NotificationId> =
            f.sm.reader().due_notifications(u64::MAX, 100).unwrap().into_iter().map(|d| d.0).collect();
        f.apply_cmd(7_000, vec![done(ids[..2].to_vec())]).await;
        f.apply_cmd(7_000, vec![done(ids[..2].to_vec())]).await;
        assert_eq!(f.sm.reader().due_notifications(u64::MAX, 100).unwrap().len(), 2);
        assert_eq!(f.sm.reader().notification_queue().unwrap().queued, 2);
    }

    #[tokio::test]
    async fn a_full_queue_counts_what_it_drops() {
        let mut f = Fixture::new();
        f.create("r").await;
        f.apply_cmd(1_000, vec![membership_op("r", "bob", MembershipAction::Join, "")]).await;
        let queue = NotificationQueueState { queued: MAX_QUEUED_NOTIFICATIONS - 1, dropped: 0 };
        // Pretend the queue is nearly full (writing 10,000 entries would only be slower).
        let keys = {
            let reader = f.sm.reader();
            reader.generation().1
        };
        f.db.rocks().put_cf(f.db.cf_sm().unwrap(), keys.notify_state(), queue.encode_to_vec()).unwrap();
        apply_notifying(&mut f, 2_000, 1, vec![say("r", "alice", 1, "@bob 1"), say("r", "alice", 2, "@bob 2")]).await;
        let queue = f.sm.reader().notification_queue().unwrap();
        assert_eq!((queue.queued, queue.dropped), (MAX_QUEUED_NOTIFICATIONS, 1));
        assert_eq!(f.sm.reader().due_notifications(u64::MAX, 100).unwrap().len(), 1);
    }

    #[test]
    fn a_preview_is_cut_at_a_character_boundary() {
        assert_eq!(preview(b"short"), b"short");
        let body = "é".repeat(200); // 400 bytes
        let cut = preview(body.as_bytes());
        assert_eq!(cut.len(), 256);
        assert!(std::str::from_utf8(&cut).is_ok());
        let body = format!("a{}", "é".repeat(200));
        let cut = preview(body.as_bytes());
        assert_eq!(cut.len(), 255);
        assert!(std::str::from_utf8(&cut).is_ok());
        assert_eq!(preview(&[0xff; 300]).len(), 256);
    }
}
