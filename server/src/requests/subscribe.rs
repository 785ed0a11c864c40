//! Subscribe: live messages of one or more rooms, each from a cursor, on one stream.
//!
//! Each room is followed by its own feed task (see `subscription.rs`); a bounded outbox joins
//! them to the stream writer. On shutdown the stream ends with a `Closing` event, delivered
//! before the node closes the connection; a room whose feed fails gets an `Error` event naming
//! it, and the other rooms go on, except for `lagging` (this node is cut off from the shard's
//! leader, or stopped following it), which ends the whole stream so that the client resumes
//! on another node.
//!
//! A subscriber that does not read is evicted: when no byte of a write is taken for
//! [`SLOW_SUBSCRIBER_AFTER`] (QUIC flow control holds it: the client's receive window is
//! full), the writer stops taking events, queues a `slow_subscriber` error after what is
//! buffered and finishes the stream; a client that reads nothing of that either within
//! [`EVICTION_GRACE`] has the stream reset with [`close_codes::SLOW_SUBSCRIBER`]. Either way
//! its feeds stop and what they held is freed: a subscription holds at most its outbox
//! ([`subscription::OUTGOING_BYTES`]) and one coalesced write, and its connection at most
//! the QUIC send window, whatever the subscriber does.
//!
//! The stream lives as long as the connection's sign-in: it ends with `token_revoked` when the
//! session is revoked, and with `token_expired` if the access token expires without the client
//! renewing the connection's sign-in (a Hello with a fresh token, which the reference client
//! sends before the token expires: the stream is not touched).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chorus_proto::client::{self, Subscribe, event};
use chorus_proto::framing;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::Identity;
use crate::auth::connections::{ConnectionAuth, SignIn};
use crate::error::ServiceError;
use crate::front_door::close_codes;
use crate::node::Node;
use crate::subscription;

/// A write to a subscriber takes waiting events up to about this many bytes.
const COALESCE_BYTES: usize = 64 * 1024;
/// A busy subscriber (written to within this long) gets its next write this long after the
/// previous one, with everything that arrived meanwhile: one QUIC packet for several messages
/// instead of one each. An idle subscriber is written to at once.
const COALESCE_WINDOW: Duration = Duration::from_millis(5);

/// Most rooms in one subscription.
pub const MAX_ROOMS_PER_SUBSCRIPTION: usize = 256;
/// Most users whose presence one subscription watches.
pub const MAX_PRESENCE_WATCHED: usize = 1000;
/// A write of which the subscriber takes no byte for this long evicts it (see the module docs).
pub const SLOW_SUBSCRIBER_AFTER: Duration = Duration::from_secs(10);
/// How long an evicted subscriber has to read what is buffered and the error saying why.
pub const EVICTION_GRACE: Duration = Duration::from_secs(5);
/// How long the last event (`Closing`, an error) may take to be acknowledged before the
/// stream's task ends anyway (on shutdown the node closes connections after those tasks).
const LAST_EVENT_DELIVERY: Duration = Duration::from_secs(2);

fn validate(subscribe: &Subscribe) -> Result<(), ServiceError> {
    if subscribe.rooms.is_empty() && subscribe.presence_of.is_empty() {
        return Err(ServiceError::InvalidArgument("subscribe to at least one room, or to presence".into()));
    }
    if subscribe.presence_of.len() > MAX_PRESENCE_WATCHED {
        return Err(ServiceError::InvalidArgument(format!(
            "presence of {} users in one subscription, over the limit of {MAX_PRESENCE_WATCHED}",
            subscribe.presence_of.len()
        )));
    }
    for user in &subscribe.presence_of {
        chorus_raft::limits::validate_user_name(user)?;
    }
    if subscribe.rooms.len() > MAX_ROOMS_PER_SUBSCRIPTION {
        return Err(ServiceError::InvalidArgument(format!(
            "{} rooms in one subscription, over the limit of {MAX_ROOMS_PER_SUBSCRIPTION}",
            subscribe.rooms.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for cursor in &subscribe.rooms {
        chorus_raft::limits::validate_room_name(&cursor.room)?;
        validate_cursor(cursor)?;
        if !seen.insert(cursor.room.as_str()) {
            return Err(ServiceError::InvalidArgument(format!("room {:?} appears twice", cursor.room)));
        }
    }
    Ok(())
}

/// A cursor names the last message its client has: one at `u64::MAX` would have no next.
pub fn validate_cursor(cursor: &client::RoomCursor) -> Result<(), ServiceError> {
    if cursor.after_seq == u64::MAX {
        return Err(ServiceError::InvalidArgument(format!(
            "room {:?}: after_seq {} is not a cursor (the largest is {})",
            cursor.room,
            cursor.after_seq,
            u64::MAX - 1
        )));
    }
    Ok(())
}

/// Resolves when the connection's sign-in stops being valid: its token expired (and was not
/// renewed), or its session was revoked; the error to end the stream with.
async fn sign_in_ends(auth: &ConnectionAuth) -> ServiceError {
    let mut changes = auth.watch();
    loop {
        if let SignIn::Revoked(reason) = &*changes.borrow_and_update() {
            return ServiceError::TokenRevoked(reason.clone());
        }
        let wait = auth
            .valid_until_ms()
            .map(|until| Duration::from_millis(until.saturating_sub(crate::auth::now_ms()) + 1))
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                return ServiceError::ShuttingDown;
            },
            _ = tokio::time::sleep(wait) => {
                if let Err(e) = auth.identity() {
                    return e;
                }
            }
        }
    }
}

/// Where a subscription's events go: a QUIC stream (the client protocol), or a stream of the
/// WebSocket gateway (`crate::web::ws`). Both bound what a subscriber that does not read can
/// hold, and both end with the same last events.
pub trait EventSink: Send {
    /// Writes `chunk` (whole `Event` frames), as long as the subscriber keeps taking bytes.
    fn write_or_stall(&mut self, chunk: Bytes) -> impl Future<Output = Written> + Send;
    /// Resolves once the subscriber has gone (stopped the stream, or its connection closed).
    fn gone(&self) -> impl Future<Output = ()> + Send + 'static;
    /// Writes `rest` (frames, or the end of one, already begun) and then `event`, ends the
    /// stream and waits until the subscriber has it all, for at most `within`. True when it
    /// was delivered.
    fn last_event(&mut self, rest: Bytes, event: &client::Event, within: Duration)
    -> impl Future<Output = bool> + Send;
    /// Abandons the stream: its subscriber read nothing, not even why it ends.
    fn abandon(&mut self, code: u32);
}

impl EventSink for quinn::SendStream {
    async fn write_or_stall(&mut self, chunk: Bytes) -> Written {
        write_or_stall(self, chunk).await
    }

    fn gone(&self) -> impl Future<Output = ()> + Send + 'static {
        let stopped = self.stopped();
        async move {
            let stopped = stopped.await;
            tracing::debug!(?stopped, "subscriber stopped the stream");
        }
    }

    async fn last_event(&mut self, rest: Bytes, event: &client::Event, within: Duration) -> bool {
        last_event(self, rest, event, within).await
    }

    fn abandon(&mut self, code: u32) {
        let _ = self.reset(code.into());
    }
}

pub async fn handle<S: EventSink>(
    node: Arc<Node>,
    me: Arc<Identity>,
    auth: Arc<ConnectionAuth>,
    mut subscribe: Subscribe,
    mut send: S,
) {
    if let Err(e) = validate(&subscribe) {
        refuse(&mut send, &e).await;
        return;
    }
    let Ok(_permit) = node.subscriptions.clone().try_acquire_owned() else {
        refuse(&mut send, &ServiceError::Unavailable { reason: "this node has too many subscriptions".into() }).await;
        return;
    };
    let subscribed =
        client::Event { kind: Some(event::Kind::Subscribed(client::Subscribed { rooms: subscribe.rooms.clone() })) };
    if !matches!(send.write_or_stall(framing::encode_frame(&subscribed)).await, Written::All) {
        return;
    }
    let cancel = node.clients_shutdown.child_token();
    let (outbox, mut rx) = subscription::Outbox::new();
    let mut feeds = tokio::task::JoinSet::new();
    // Presence and typing first: a room feed may wait on its shard, they never do.
    let typing_rooms: Vec<String> = subscribe.rooms.iter().map(|c| c.room.clone()).collect();
    {
        let (outbox, cancel, node, viewer) = (outbox.clone(), cancel.clone(), node.clone(), me.user.clone());
        // Moved, not copied: the names live on in the watch alone, for as long as it lasts.
        let watched = std::mem::take(&mut subscribe.presence_of);
        let outbox = outbox.downgrade();
        feeds.spawn(async move {
            presence_feed(&node, &viewer, watched, typing_rooms, outbox, &cancel).await;
            None
        });
    }
    for cursor in subscribe.rooms {
        let (outbox, cancel, node, viewer) = (outbox.clone(), cancel.clone(), node.clone(), me.user.clone());
        feeds.spawn(async move {
            let room = cursor.room.clone();
            let feed = subscription::follow(&node, cursor.room, viewer, cursor.after_seq, outbox.clone(), cancel);
            match feed.await {
                Ok(()) => None,
                // The node is cut off: the whole subscription should move (see the module docs).
                Err(e @ ServiceError::Lagging { .. }) => Some(e),
                Err(e) => {
                    let _ = outbox.send(e.to_event(Some(&room))).await;
                    None
                }
            }
        });
    }
    let mut last_write: Option<tokio::time::Instant> = None;
    // Reused across writes: each write hands QUIC the filled part without copying it. It grows
    // on demand (thousands of mostly quiet subscriptions must not hold 64 KiB each).
    let mut frames = BytesMut::new();
    let ended = sign_in_ends(&auth);
    tokio::pin!(ended);
    let mut feeds_gone = false;
    let end = loop {
        tokio::select! {
            // Shutdown first: feeds end with it too, and the reason must not depend on which
            // the writer notices first.
            biased;
            _ = node.clients_shutdown.cancelled() => break End::Closing("node shutting down"),
            e = &mut ended => break End::Error(e),
            _ = send.gone() => break End::Gone,
            // Not a `Some(Ok(Some(e))) = feeds.join_next()` pattern: a feed that ends on its
            // own (presence with nothing to watch) would fail the pattern, which disables the
            // branch for the rest of this wait, and an error of another feed then went unseen
            // until some event woke the writer: a cut-off node's subscribers waited in silence.
            finished = feeds_end(&mut feeds), if !feeds_gone => match finished {
                Some(e) => break End::Error(e),
                // What they queued (a room's last message and its error) still goes out; the
                // stream stays until the subscriber closes it, as when it watches presence.
                None => feeds_gone = true,
            },
            event = rx.recv() => match event {
                Some(event) => {
                    // Events that are already waiting leave in the same write (one QUIC write
                    // and wake-up for many messages when a subscriber's rooms are busy).
                    event.event.append_frame(&mut frames);
                    drop(event);
                    if let Some(due) = hold_until(last_write, tokio::time::Instant::now()) {
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            _ = node.clients_shutdown.cancelled() => {}
                        }
                    }
                    while frames.len() < COALESCE_BYTES {
                        let Ok(more) = rx.try_recv() else { break };
                        more.event.append_frame(&mut frames);
                    }
                    last_write = Some(tokio::time::Instant::now());
                    match send.write_or_stall(frames.split().freeze()).await {
                        Written::All => {}
                        Written::Gone => break End::Gone,
                        Written::Stalled(rest) => break End::Evict(rest),
                    }
                }
                None if node.clients_shutdown.is_cancelled() => break End::Closing("node shutting down"),
                None => break End::Closing("every room of the subscription ended"),
            },
        }
    };
    let queued_bytes = outbox.queued_bytes();
    drop(outbox);
    cancel.cancel();
    feeds.abort_all();
    while feeds.join_next().await.is_some() {}
    drop(rx);
    match end {
        End::Gone => {}
        End::Error(e) => {
            if matches!(e, ServiceError::Lagging { .. }) {
                tracing::info!(error = %e, "a subscription ends: this node's replica of a shard is out of contact with its leader, or behind it");
            } else {
                tracing::debug!(error = %e, "subscription ends");
            }
            send.last_event(Bytes::new(), &e.to_event(None), LAST_EVENT_DELIVERY).await;
        }
        End::Closing(reason) => {
            let closing = client::Event { kind: Some(event::Kind::Closing(client::Closing { reason: reason.into() })) };
            send.last_event(Bytes::new(), &closing, LAST_EVENT_DELIVERY).await;
        }
        End::Evict(rest) => {
            let e =
                ServiceError::SlowSubscriber { waited: SLOW_SUBSCRIBER_AFTER, queued_bytes: queued_bytes + rest.len() };
            tracing::info!(error = %e, "evicting a subscriber that does not read");
            if !send.last_event(rest, &e.to_event(None), EVICTION_GRACE).await {
                send.abandon(close_codes::SLOW_SUBSCRIBER);
            }
        }
    }
}

/// The presence of `watched` (where each is now, then changes) and who types in `rooms`,
/// until cancelled. Typing is shown only in rooms `viewer` is a joined member of (checked on a
/// replica when the subscription starts: typing is a hint, not history). Watching presence
/// keeps the stream open; typing alone does not (it ends with the rooms' feeds).
async fn presence_feed(
    node: &Node,
    viewer: &str,
    watched: Vec<String>,
    rooms: Vec<String>,
    outbox: subscription::WeakOutbox,
    cancel: &tokio_util::sync::CancellationToken,
) {
    // Registered with the snapshot, and typing subscribed before its snapshot, so that no
    // change falls between the two.
    let watching = !watched.is_empty();
    let watch = watching.then(|| node.presence.watch(watched));
    let mut typing = (!rooms.is_empty()).then(|| node.presence.typing_changes());
    // Held for as long as this feed runs.
    let _holds_open = watching.then(|| outbox.upgrade()).flatten();
    let send = |event: client::Event| {
        let outbox = outbox.upgrade();
        async move {
            let Some(outbox) = outbox else { return false };
            tokio::select! {
                _ = cancel.cancelled() => false,
                sent = outbox.send(event) => sent,
            }
        }
    };
    let presence_event = |users| client::Event { kind: Some(event::Kind::Presence(client::PresenceChanged { users })) };
    let watch = match watch {
        Some((watch, now)) => {
            if !send(presence_event(now)).await {
                return;
            }
            Some(watch)
        }
        None => None,
    };
    let mut typing_rooms = std::collections::HashSet::new();
    for room in rooms {
        // Boxed: a read that may go to another node is a large future, needed only here, and
        // the feed's task would otherwise hold room for it for as long as it lives.
        if let Ok(true) = Box::pin(crate::forward::is_joined(node, &room, viewer)).await {
            typing_rooms.insert(room);
        }
    }
    if !watching && typing_rooms.is_empty() {
        return;
    }
    for room in &typing_rooms {
        let users: Vec<String> = node.presence.typing_in(room).into_iter().filter(|u| u != viewer).collect();
        if !users.is_empty() {
            let event = client::TypingChanged { room: room.clone(), users };
            if !send(client::Event { kind: Some(event::Kind::Typing(event)) }).await {
                return;
            }
        }
    }
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            users = changed(&watch), if watch.is_some() => presence_event(users),
            change = typing_changed(&mut typing), if !typing_rooms.is_empty() => match change {
                Ok(change) if typing_rooms.contains(&change.room) => {
                    let users = change.users.iter().filter(|u| *u != viewer).cloned().collect();
                    let change = client::TypingChanged { room: change.room.clone(), users };
                    client::Event { kind: Some(event::Kind::Typing(change)) }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
        };
        if !send(event).await {
            return;
        }
    }
}

/// The next changes of a watch; never, without one.
async fn changed(watch: &Option<crate::presence::PresenceWatch>) -> Vec<client::UserPresence> {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

/// The next typing change; never, without a receiver.
async fn typing_changed(
    typing: &mut Option<tokio::sync::broadcast::Receiver<Arc<client::TypingChanged>>>,
) -> Result<Arc<client::TypingChanged>, RecvError> {
    match typing {
        Some(typing) => typing.recv().await,
        None => std::future::pending().await,
    }
}

/// How a subscription stream ends.
enum End {
    /// The subscriber left (stopped the stream, or the connection closed).
    Gone,
    Closing(&'static str),
    Error(ServiceError),
    /// The subscriber does not read; these bytes of a frame were not written.
    Evict(Bytes),
}

pub enum Written {
    All,
    Gone,
    /// No byte was taken for [`SLOW_SUBSCRIBER_AFTER`]; what is left of the chunk.
    Stalled(Bytes),
}

/// Writes `chunk`, as long as the subscriber keeps taking bytes (QUIC's `write_chunks` is
/// cancel-safe: a write given up wrote nothing).
async fn write_or_stall(send: &mut quinn::SendStream, chunk: Bytes) -> Written {
    let mut chunks = [chunk];
    while !chunks[0].is_empty() {
        match tokio::time::timeout(SLOW_SUBSCRIBER_AFTER, send.write_chunks(&mut chunks)).await {
            Err(_) => {
                let [rest] = chunks;
                return Written::Stalled(rest);
            }
            Ok(Err(_)) => return Written::Gone,
            Ok(Ok(_)) => {}
        }
    }
    Written::All
}

/// Resolves when one of the subscription's feeds fails with an error for the whole stream
/// (`Some`: `lagging`, a failure of the feed itself), or none is left (`None`). Feeds that end
/// on their own (a room whose error event was sent, presence with nothing to watch) are
/// collected on the way. Cancel-safe: it holds nothing but the set.
async fn feeds_end(feeds: &mut tokio::task::JoinSet<Option<ServiceError>>) -> Option<ServiceError> {
    while let Some(joined) = feeds.join_next().await {
        match joined {
            Ok(Some(e)) => return Some(e),
            Ok(None) => {}
            Err(e) if e.is_panic() => {
                tracing::error!(error = %e, "a feed of a subscription panicked");
                return Some(ServiceError::Internal(
                    "a feed of this subscription failed on this node (a bug, logged there): subscribe again from your cursors, on another node".into(),
                ));
            }
            Err(_) => {} // cancelled
        }
    }
    None
}

/// Writes `rest` (the end of a frame already begun) and then `event`, finishes the stream and
/// waits until the subscriber has it all, for at most `within`. True when it was delivered.
async fn last_event(send: &mut quinn::SendStream, rest: Bytes, event: &client::Event, within: Duration) -> bool {
    let delivered = async {
        send.write_chunk(rest).await.ok()?;
        send.write_chunk(framing::encode_frame(event)).await.ok()?;
        send.finish().ok()?;
        // Resolves once the subscriber has read (and acknowledged) everything.
        send.stopped().await.ok()
    };
    matches!(tokio::time::timeout(within, delivered).await, Ok(Some(None)))
}

/// When a write due now should wait for more events: until `COALESCE_WINDOW` after the last
/// write if that was less than a window ago, else not at all.
fn hold_until(last_write: Option<tokio::time::Instant>, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
    last_write.map(|at| at + COALESCE_WINDOW).filter(|&due| due > now)
}

/// Ends a subscription stream before it started, with an `Error` event.
pub async fn refuse(send: &mut impl EventSink, e: &ServiceError) {
    send.last_event(Bytes::new(), &e.to_event(None), LAST_EVENT_DELIVERY).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_feed_error_ends_the_subscription_after_another_feed_ended_quietly() {
        let mut feeds = tokio::task::JoinSet::new();
        // Presence with nothing to watch ends at once; a room feed fails later.
        feeds.spawn(async { None });
        feeds.spawn(async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Some(ServiceError::Unavailable { reason: "cut off".into() })
        });
        feeds.spawn(std::future::pending::<Option<ServiceError>>());
        // As the writer waits: beside a branch that never fires, woken by nothing else.
        let idle = std::future::pending::<()>();
        tokio::pin!(idle);
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = &mut idle => None,
                finished = feeds_end(&mut feeds) => finished,
            }
        })
        .await
        .expect("the failing feed's error is seen, not swallowed");
        assert_eq!(ended.as_ref().map(ServiceError::code), Some("unavailable"));
    }

    #[tokio::test]
    async fn feeds_end_is_none_once_every_feed_ended_quietly_and_an_error_on_a_panic() {
        let mut feeds = tokio::task::JoinSet::new();
        feeds.spawn(async { None });
        feeds.spawn(async { None });
        assert!(feeds_end(&mut feeds).await.is_none());
        feeds.spawn(async { panic!("injected") });
        assert_eq!(feeds_end(&mut feeds).await.as_ref().map(ServiceError::code), Some("internal"));
    }

    #[test]
    fn only_a_busy_subscriber_waits_and_never_longer_than_the_window() {
        let t0 = tokio::time::Instant::now();
        assert_eq!(hold_until(None, t0), None, "the first write goes at once");
        let soon = t0 + COALESCE_WINDOW / 2;
        assert_eq!(hold_until(Some(t0), soon), Some(t0 + COALESCE_WINDOW));
        assert_eq!(hold_until(Some(t0), t0 + COALESCE_WINDOW), None, "idle for a window: at once");
        assert_eq!(hold_until(Some(t0), t0 + COALESCE_WINDOW * 10), None);
    }
}
