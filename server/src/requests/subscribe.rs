//! Subscribe: live messages of one or more rooms, each from a cursor, on one stream.
//!
//! Each room is followed by its own feed task (see `subscription.rs`); a bounded channel joins
//! them to the stream writer. On shutdown the stream ends with a `Closing` event; a room whose
//! feed fails gets an `Error` event naming it, and the other rooms go on.
//!
//! The stream lives as long as the connection's sign-in: it ends with `token_revoked` when the
//! session is revoked, and with `token_expired` if the access token expires without the client
//! renewing the connection's sign-in (a Hello with a fresh token, which the reference client
//! sends before the token expires: the stream is not touched).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use chorus_proto::client::{self, Subscribe, event};
use chorus_proto::framing;
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::auth::connections::{ConnectionAuth, SignIn};
use crate::error::ServiceError;
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

fn validate(subscribe: &Subscribe) -> Result<(), ServiceError> {
    if subscribe.rooms.is_empty() {
        return Err(ServiceError::InvalidArgument("subscribe to at least one room".into()));
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
        if !seen.insert(cursor.room.as_str()) {
            return Err(ServiceError::InvalidArgument(format!("room {:?} appears twice", cursor.room)));
        }
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

pub async fn handle(
    node: Arc<Node>,
    me: Arc<Identity>,
    auth: Arc<ConnectionAuth>,
    subscribe: Subscribe,
    mut send: quinn::SendStream,
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
    if framing::write_message(&mut send, &subscribed).await.is_err() {
        return;
    }
    let cancel = node.clients_shutdown.child_token();
    let (tx, mut rx) = mpsc::channel(subscription::OUTGOING_BUFFER);
    let mut feeds = tokio::task::JoinSet::new();
    for cursor in subscribe.rooms {
        let (tx, cancel, node, viewer) = (tx.clone(), cancel.clone(), node.clone(), me.user.clone());
        feeds.spawn(async move {
            let room = cursor.room.clone();
            let feed = subscription::follow(&node, cursor.room, viewer, cursor.after_seq, tx.clone(), cancel);
            if let Err(e) = feed.await {
                let _ = tx.send(e.to_event(Some(&room)).into()).await;
            }
        });
    }
    drop(tx);
    let mut last_write: Option<tokio::time::Instant> = None;
    // Reused across writes: each write hands QUIC the filled part without copying it.
    let mut frames = BytesMut::with_capacity(COALESCE_BYTES);
    let ended = sign_in_ends(&auth);
    tokio::pin!(ended);
    let mut ended_by: Option<ServiceError> = None;
    let closing_reason = loop {
        tokio::select! {
            _ = node.clients_shutdown.cancelled() => break Some("node shutting down"),
            e = &mut ended => {
                ended_by = Some(e);
                break None;
            }
            stopped = send.stopped() => {
                tracing::debug!(?stopped, "subscriber stopped the stream");
                break None;
            }
            event = rx.recv() => match event {
                Some(event) => {
                    // Events that are already waiting leave in the same write (one QUIC write
                    // and wake-up for many messages when a subscriber's rooms are busy).
                    event.append_frame(&mut frames);
                    if let Some(due) = hold_until(last_write, tokio::time::Instant::now()) {
                        tokio::select! {
                            _ = tokio::time::sleep_until(due) => {}
                            _ = node.clients_shutdown.cancelled() => {}
                        }
                    }
                    while frames.len() < COALESCE_BYTES {
                        let Ok(more) = rx.try_recv() else { break };
                        more.append_frame(&mut frames);
                    }
                    last_write = Some(tokio::time::Instant::now());
                    if send.write_chunk(frames.split().freeze()).await.is_err() {
                        break None;
                    }
                }
                None => break Some("every room of the subscription ended"),
            },
        }
    };
    cancel.cancel();
    feeds.abort_all();
    while feeds.join_next().await.is_some() {}
    if let Some(e) = ended_by {
        tracing::debug!(error = %e, "subscription ends with its sign-in");
        let _ = framing::write_message(&mut send, &e.to_event(None)).await;
        let _ = send.finish();
        return;
    }
    if let Some(reason) = closing_reason {
        let closing = client::Event { kind: Some(event::Kind::Closing(client::Closing { reason: reason.into() })) };
        let _ = framing::write_message(&mut send, &closing).await;
        let _ = send.finish();
    }
}

/// When a write due now should wait for more events: until `COALESCE_WINDOW` after the last
/// write if that was less than a window ago, else not at all.
fn hold_until(last_write: Option<tokio::time::Instant>, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
    last_write.map(|at| at + COALESCE_WINDOW).filter(|&due| due > now)
}

/// Ends a subscription stream before it started, with an `Error` event.
pub async fn refuse(send: &mut quinn::SendStream, e: &ServiceError) {
    let _ = framing::write_message(send, &e.to_event(None)).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

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
