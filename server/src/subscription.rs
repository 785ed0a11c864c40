//! Live room feeds: every message after a cursor, in order, with no gap and no duplicate.
//!
//! A feed reads history pages until it has caught up, then follows the shard's apply events.
//! It subscribes to the events *before* reading history, and skips what it has already sent,
//! so nothing committed between the two steps is missed. Memory per feed is bounded: the event
//! channel is shared and bounded (a feed that falls behind gets `Lagged` and goes back to
//! history pages), and the outgoing [`Outbox`] to the client is bounded in events and in bytes
//! (a slow client blocks only its own feeds, never the shard; one that does not read at all is
//! evicted by its writer, see `requests::subscribe`).
//!
//! A feed whose replica is cut off from its shard's leader, or has stopped following it (see
//! [`Node::replica_lag`]), would stall without a word: it ends with `lagging` instead, so that
//! the client resumes on another node.
//!
//! A node that does not host the room's shard relays the feed of a replica over gRPC and
//! resumes from its cursor on another replica if that one fails.
//!
//! A feed is for one signed-in user (its viewer): the replica checks with every history page
//! that they may read the room, and a feed whose viewer is removed from the room (a kick or a
//! ban after the feed's cursor, or leaving a room that is not public) delivers that event and
//! ends with `forbidden` (or `not_member`): nothing the room receives after the removal
//! reaches them, because the removal is itself an event of the room's sequence.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chorus_proto::client::{self, event};
use chorus_proto::storage::{MembershipState, MessageKind, MessageRecord};
use chorus_proto::{framing, peer as pb};
use chorus_raft::{AppliedMessage, HistoryQuery, ShardEvent, ShardId, ShardReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error::ServiceError;
use crate::forward::message_to_pb;
use crate::node::Node;

/// Messages read per history page while catching up.
const CATCH_UP_PAGE: usize = 256;
/// Events buffered between a subscription's feeds and its network writer...
pub const OUTGOING_BUFFER: usize = 512;
/// ...and at most this many bytes of them (encoded).
pub const OUTGOING_BYTES: usize = 1 << 20;
/// How often a live feed checks that its replica is in contact with the shard's leader.
const CONTACT_CHECK_EVERY: Duration = Duration::from_millis(250);

pub fn message_event(message: client::Message) -> client::Event {
    client::Event { kind: Some(event::Kind::Message(message)) }
}

/// What a feed hands to its consumer (a client's stream writer, or a relay to another node).
#[derive(Debug)]
pub enum Outgoing {
    /// An event made for this feed alone: a history message, a gap, an error. Boxed: an
    /// outbox's channel allocates its slots up front, 32 at a time, and an unboxed event would
    /// make each slot ~200 bytes (6 KiB for every subscription, however quiet).
    Event(Box<client::Event>),
    /// A live message as the shard applied it, shared by every feed of the room on this node
    /// and encoded for clients once, however many subscribe.
    Live(Arc<AppliedMessage>),
}

impl From<client::Event> for Outgoing {
    fn from(event: client::Event) -> Outgoing {
        Outgoing::Event(Box::new(event))
    }
}

impl Outgoing {
    /// The length of the event's client-protocol frame (a live message's is encoded once,
    /// here or by whoever frames it first).
    pub fn frame_len(&self) -> usize {
        match self {
            Outgoing::Event(event) => 4 + prost::Message::encoded_len(event.as_ref()),
            Outgoing::Live(applied) => live_frame(applied).len(),
        }
    }

    /// Appends the event as one client-protocol frame.
    pub fn append_frame(&self, frames: &mut BytesMut) {
        match self {
            Outgoing::Event(event) => framing::append_frame(frames, event.as_ref()),
            Outgoing::Live(applied) => frames.extend_from_slice(live_frame(applied)),
        }
    }

    pub fn into_event(self) -> client::Event {
        match self {
            Outgoing::Event(event) => *event,
            Outgoing::Live(applied) => message_event(message_to_pb(&applied.room, applied.message.clone())),
        }
    }
}

/// The frame of a live message, encoded on first use and shared from then on.
fn live_frame(applied: &AppliedMessage) -> &Bytes {
    applied
        .wire
        .get_or_init(|| framing::encode_frame(&message_event(message_to_pb(&applied.room, applied.message.clone()))))
}

/// The sequence number after `cursor`. Cursors come from clients; a cursor at `u64::MAX` has no
/// successor and is refused where requests are validated, so this fails only on a bug.
fn after(room: &str, cursor: u64) -> Result<u64, ServiceError> {
    cursor
        .checked_add(1)
        .ok_or_else(|| ServiceError::InvalidArgument(format!("room {room:?}: cursor {cursor} has no next message")))
}

/// An event in an [`Outbox`], holding its bytes of the outbox's budget until it is written.
#[derive(Debug)]
pub struct Queued {
    pub event: Outgoing,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The bounded queue from a subscription's feeds to its consumer: at most
/// [`OUTGOING_BUFFER`] events and [`OUTGOING_BYTES`] bytes (an event larger than the whole
/// budget takes all of it).
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
}

impl Outbox {
    pub fn new() -> (Outbox, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(OUTGOING_BUFFER);
        (Outbox { tx, bytes: Arc::new(Semaphore::new(OUTGOING_BYTES)) }, rx)
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        OUTGOING_BYTES - self.bytes.available_permits()
    }

    /// Queues `event`, waiting for room; false when the consumer is gone.
    pub async fn send(&self, event: impl Into<Outgoing>) -> bool {
        let event = event.into();
        // At most the budget (a permit count fits in u32).
        let size = event.frame_len().min(OUTGOING_BYTES) as u32;
        let Ok(bytes) = self.bytes.clone().acquire_many_owned(size).await else { return false };
        self.tx.send(Queued { event, _bytes: Some(bytes) }).await.is_ok()
    }

    /// A handle that does not keep the subscription open: once every [`Outbox`] is gone, the
    /// stream ends.
    pub fn downgrade(&self) -> WeakOutbox {
        WeakOutbox { tx: self.tx.downgrade(), bytes: self.bytes.clone() }
    }

    /// Queues `event` at once if there is room for it, ignoring the byte budget (for the one
    /// small event that opens a stream).
    pub fn try_send_first(&self, event: impl Into<Outgoing>) -> bool {
        self.tx.try_send(Queued { event: event.into(), _bytes: None }).is_ok()
    }
}

/// See [`Outbox::downgrade`].
#[derive(Clone)]
pub struct WeakOutbox {
    tx: mpsc::WeakSender<Queued>,
    bytes: Arc<Semaphore>,
}

impl WeakOutbox {
    pub fn upgrade(&self) -> Option<Outbox> {
        Some(Outbox { tx: self.tx.upgrade()?, bytes: self.bytes.clone() })
    }
}

/// Whether a replica that is behind could refuse a read this way (the room or the viewer's
/// membership may be newer than what it applied).
fn maybe_stale(e: &chorus_raft::QueryError) -> bool {
    let code = match e {
        chorus_raft::QueryError::Invalid(e) => e.code(),
        chorus_raft::QueryError::Store(_) => return false,
    };
    matches!(code, "room_not_found" | "not_member" | "forbidden")
}

/// Sends one event unless the feed is cancelled or its consumer gone; false means stop.
async fn send(out: &Outbox, cancel: &CancellationToken, event: impl Into<Outgoing>) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        sent = out.send(event) => sent,
    }
}

/// Whether the feed of `viewer` may go on past `message` (which it delivers either way): `Err`
/// once the viewer was removed from the room by it, and is still out.
fn still_admitted(reader: &ShardReader, room: &str, viewer: &str, message: &MessageRecord) -> Result<(), ServiceError> {
    let kind = MessageKind::try_from(message.kind).unwrap_or(MessageKind::Text);
    match kind {
        MessageKind::Kicked | MessageKind::Banned if message.target == viewer => {
            let now = reader.member(room, viewer)?;
            if now.is_some_and(|m| m.state == MembershipState::Joined as i32) {
                return Ok(()); // back in since
            }
            let how = if kind == MessageKind::Kicked { "removed" } else { "banned" };
            Err(ServiceError::Forbidden(format!("you were {how} from {room} by {}", message.sender)))
        }
        MessageKind::Left if message.sender == viewer => reader.room_view(room, viewer).map(|_| ()).map_err(Into::into),
        _ => Ok(()),
    }
}

/// Follows `room` on this node's replica of `shard` from `after`, for `viewer`, until
/// cancelled or the consumer leaves. Returns an error for a terminal failure (e.g. the room
/// does not exist, or the viewer may not read it), and `Lagging` when the replica has lost
/// contact with the shard's leader or stopped following it (the consumer should resume
/// elsewhere).
pub async fn follow_local(
    node: &Node,
    shard: ShardId,
    room: String,
    viewer: String,
    mut cursor: u64,
    out: Outbox,
    cancel: CancellationToken,
) -> Result<(), ServiceError> {
    let Some(replica) = node.shards.get(&shard) else {
        return Err(ServiceError::Internal(format!("shard {shard} is not hosted here")));
    };
    let reader = replica.reader.clone();
    let mut events = reader.subscribe();
    let mut contact = crate::node::ticker(CONTACT_CHECK_EVERY);
    // A refusal this replica may give only because it is behind (a room created, or a join
    // acknowledged, a moment ago through another node) is checked once against the leader's
    // commit index before it ends the feed: read-your-writes, as for History.
    let mut caught_up = false;
    loop {
        tracing::debug!(shard, %room, cursor, "feed: catching up from history");
        // Catch up from history.
        loop {
            let query = HistoryQuery::After { after: cursor, limit: CATCH_UP_PAGE };
            let page = match chorus_raft::blocking::off_runtime(|| reader.history(&room, query, &viewer)) {
                Ok(page) => page,
                Err(e) if !caught_up && maybe_stale(&e) => {
                    caught_up = true;
                    tracing::debug!(shard, %room, error = %e, "feed: the replica may be behind: catching up with the leader");
                    crate::forward::catch_up_with_leader(node, shard).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let next = after(&room, cursor)?;
            if page.first_seq > next {
                let gap = client::Gap {
                    room: room.clone(),
                    from_seq: next,
                    to_seq: page.first_seq - 1,
                    reason: "older messages are no longer retained (room retention)".into(),
                };
                cursor = page.first_seq - 1;
                if !send(&out, &cancel, client::Event { kind: Some(event::Kind::Gap(gap)) }).await {
                    return Ok(());
                }
            }
            let read = page.messages.len();
            for message in page.messages {
                let expected = after(&room, cursor)?;
                if message.seq != expected {
                    return Err(ServiceError::Internal(format!(
                        "room {room:?}: expected message {expected}, read {}",
                        message.seq
                    )));
                }
                cursor = message.seq;
                let admitted = still_admitted(&reader, &room, &viewer, &message);
                if !send(&out, &cancel, message_event(message_to_pb(&room, message))).await {
                    return Ok(());
                }
                admitted?;
            }
            if read < CATCH_UP_PAGE {
                break;
            }
        }
        tracing::debug!(shard, %room, cursor, "feed: live");
        // Live, until something is missed.
        'live: loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                event = events.recv() => event,
                _ = contact.tick() => match node.replica_lag(shard) {
                    Some(lag) => return Err(ServiceError::Lagging { shard, lag }),
                    None => continue,
                },
            };
            match event {
                Ok(ShardEvent::Appended(batch)) => {
                    for applied in batch.iter().filter(|m| m.room == room) {
                        let seq = applied.message.seq;
                        if seq <= cursor {
                            continue;
                        }
                        if seq != after(&room, cursor)? {
                            break 'live; // a gap in what we saw: read it from history
                        }
                        cursor = seq;
                        let admitted = still_admitted(&reader, &room, &viewer, &applied.message);
                        if !send(&out, &cancel, Outgoing::Live(applied.clone())).await {
                            return Ok(());
                        }
                        admitted?;
                    }
                }
                Ok(ShardEvent::SnapshotInstalled) | Err(broadcast::error::RecvError::Lagged(_)) => break 'live,
                Ok(ShardEvent::Revoked(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Err(ServiceError::ShuttingDown),
            }
        }
    }
}

/// Follows `room` through a replica of `shard` on another node, resuming from the cursor on
/// another replica whenever one fails.
pub async fn follow_remote(
    node: &Node,
    shard: ShardId,
    room: String,
    viewer: String,
    mut cursor: u64,
    out: Outbox,
    cancel: CancellationToken,
) -> Result<(), ServiceError> {
    let replicas = node.layout.replicas(shard);
    let mut attempt = 0usize;
    let mut contact = crate::node::ticker(CONTACT_CHECK_EVERY);
    // A relay on a node cut off from the cluster would retry in silence: it tells its consumer.
    let cut_off = || {
        node.cut_off()
            .then(|| ServiceError::Lagging { shard, lag: crate::node::ReplicaLag::Silent(node.contact_window()) })
    };
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        if let Some(lagging) = cut_off() {
            return Err(lagging);
        }
        let target = replicas[attempt % replicas.len()];
        attempt += 1;
        let Some(mut client) = node.peers.get(target) else { continue };
        let request = pb::SubscribeRequest {
            shard,
            cursor: Some(client::RoomCursor { room: room.clone(), after_seq: cursor }),
            viewer: viewer.clone(),
        };
        let opened = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            opened = tokio::time::timeout(node.config.request_timeout, client.subscribe(request)) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                tracing::debug!(target, shard, %room, error = %status, "relay: replica refused the feed");
                pause(&cancel, attempt).await;
                continue;
            }
            Err(_) => {
                pause(&cancel, attempt).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                next = stream.message() => next,
                _ = contact.tick() => match cut_off() {
                    Some(lagging) => return Err(lagging),
                    None => continue,
                },
            };
            let kind = match next {
                Ok(Some(pb::SubscribeEvent { event: Some(client::Event { kind: Some(kind) }) })) => kind,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break, // the replica went away: resume elsewhere
            };
            match kind {
                event::Kind::Subscribed(_) => attempt = 0,
                event::Kind::Message(m) => {
                    if m.seq <= cursor {
                        continue;
                    }
                    if m.seq != after(&room, cursor)? {
                        break; // should not happen; resume from the cursor elsewhere
                    }
                    cursor = m.seq;
                    if !send(&out, &cancel, message_event(m)).await {
                        return Ok(());
                    }
                }
                event::Kind::Gap(g) => {
                    if g.to_seq > cursor {
                        cursor = g.to_seq;
                        if !send(&out, &cancel, client::Event { kind: Some(event::Kind::Gap(g)) }).await {
                            return Ok(());
                        }
                    }
                }
                event::Kind::Error(e) if matches!(e.code.as_str(), "shutting_down" | "unavailable" | "lagging") => {
                    break;
                }
                event::Kind::Error(e) => return Err(ServiceError::from_wire(e)),
                event::Kind::Closing(_) => break,
                // A peer's room feed carries no presence or typing (those come from this node).
                event::Kind::Presence(_) | event::Kind::Typing(_) => {}
            }
        }
        pause(&cancel, attempt).await;
    }
}

async fn pause(cancel: &CancellationToken, attempt: usize) {
    let delay = Duration::from_millis((50 * attempt as u64).min(1000));
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Follows `room` wherever its shard lives, for `viewer`.
pub async fn follow(
    node: &Node,
    room: String,
    viewer: String,
    after: u64,
    out: Outbox,
    cancel: CancellationToken,
) -> Result<(), ServiceError> {
    let shard = node.layout.router.shard_for_room(&room);
    if node.shards.contains_key(&shard) {
        follow_local(node, shard, room, viewer, after, out, cancel).await
    } else {
        follow_remote(node, shard, room, viewer, after, out, cancel).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use chorus_proto::storage::MessageRecord;

    use super::*;

    #[test]
    fn an_outbox_slot_stays_small() {
        // Every subscription's channel allocates 32 slots at once, busy or not.
        assert!(std::mem::size_of::<Queued>() <= 32, "{} bytes", std::mem::size_of::<Queued>());
    }

    fn applied(room: &str, seq: u64) -> Arc<AppliedMessage> {
        let message = MessageRecord {
            seq,
            ts_ms: 1_700_000_000_000 + seq,
            sender: "ann".into(),
            client_id: Bytes::from_static(b"client-1"),
            client_seq: seq,
            body: Bytes::from(format!("message {seq}")),
            ..Default::default()
        };
        Arc::new(AppliedMessage { room: room.into(), message, wire: OnceLock::new() })
    }

    #[test]
    fn a_live_message_is_sent_as_the_event_it_stands_for_and_encoded_once() {
        let batch = [applied("a", 7), applied("b", 3)];
        let expected = message_event(message_to_pb("b", batch[1].message.clone()));

        let mut first = BytesMut::new();
        Outgoing::Live(batch[1].clone()).append_frame(&mut first);
        assert_eq!(first.freeze(), framing::encode_frame(&expected));
        let cached = batch[1].wire.get().expect("encoded on first use").clone();

        // A second subscriber of the room shares that encoding rather than making its own.
        let mut second = BytesMut::new();
        Outgoing::Live(batch[1].clone()).append_frame(&mut second);
        assert_eq!(second.freeze(), cached);
        assert_eq!(batch[1].wire.get().map(|b| b.as_ptr()), Some(cached.as_ptr()));
        assert!(batch[0].wire.get().is_none(), "only what a feed sent is encoded");

        // Relayed to another node, it is the same event.
        assert_eq!(Outgoing::Live(batch[1].clone()).into_event(), expected);
    }

    #[test]
    fn events_of_one_feed_are_framed_as_they_are() {
        let gap = client::Event {
            kind: Some(event::Kind::Gap(client::Gap {
                room: "a".into(),
                from_seq: 1,
                to_seq: 4,
                reason: "retention".into(),
            })),
        };
        let mut frames = BytesMut::new();
        Outgoing::from(gap.clone()).append_frame(&mut frames);
        assert_eq!(frames.freeze(), framing::encode_frame(&gap));
        assert_eq!(Outgoing::from(gap.clone()).into_event(), gap);
    }
}
