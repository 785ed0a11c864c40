//! A subscription that survives failures: after a broken stream, a closed node or a failover
//! it resubscribes — on whichever node the client reaches — from the last sequence number it
//! delivered for each room, so its consumer sees every message once, in order.
//!
//! What fails is what is retried: a stream the node reset or ended with an error (it evicted
//! a slow subscriber, one shard is unavailable) is reopened on the same connection; only a
//! connection that died, a node that is stopping, or one cut off from the cluster (`lagging`)
//! makes the client fail over to another node.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chorus_proto::client::{self as pb, event};
use futures::StreamExt;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::{Client, ClientError, MAX_RESPONSE_FRAME, Message, connection_silent, keep_alive_interval};

/// Bytes read from a subscription stream at a time: a node writes many small events at once.
const READ_BUFFER: usize = 64 * 1024;

/// What a subscription yields.
#[derive(Debug)]
pub enum SubscriptionEvent {
    Message(Message),
    /// Messages `from_seq..=to_seq` of `room` are no longer retained; the feed goes on after.
    Gap(pb::Gap),
    /// One room's feed ended with an error (e.g. it does not exist); the other rooms go on.
    RoomError {
        room: String,
        error: ClientError,
    },
    /// The subscription is live again (on `node`) after a failure; nothing was lost.
    Resumed {
        node: String,
    },
    /// Presence of watched users: all of them when the subscription starts (and again after
    /// it resumes), then those that changed.
    Presence(Vec<pb::UserPresence>),
    /// Who is typing in `room` now (empty: nobody).
    Typing {
        room: String,
        users: Vec<String>,
    },
}

/// Live messages of some rooms; see the module docs. Created by [`Client::subscribe`].
pub struct Subscription {
    client: Client,
    cursors: BTreeMap<String, u64>,
    /// Users whose presence the subscription watches.
    presence_of: Vec<String>,
    /// The stream's receive half, framed (the codec keeps a partly read frame across calls,
    /// which makes [`Subscription::next`] cancel-safe).
    stream: Option<(quinn::Connection, quinn::SendStream, FramedRead<quinn::RecvStream, LengthDelimitedCodec>)>,
    failures: u32,
    resuming: bool,
}

/// The client protocol's frames: a 4-byte big-endian length, then the message.
fn framed(recv: quinn::RecvStream) -> FramedRead<quinn::RecvStream, LengthDelimitedCodec> {
    let codec = LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_RESPONSE_FRAME).new_codec();
    FramedRead::with_capacity(recv, codec, READ_BUFFER)
}

/// How a read of the stream ended, when it did not give an event.
enum Broken {
    /// Nothing came for two keep-alive intervals, or the connection closed: the node is gone.
    Connection,
    /// The stream alone failed (reset, ended, garbled): the connection may well be fine.
    Stream,
}

impl Subscription {
    pub(crate) fn new(client: Client, cursors: BTreeMap<String, u64>, presence_of: Vec<String>) -> Subscription {
        Subscription { client, cursors, presence_of, stream: None, failures: 0, resuming: false }
    }

    /// The last sequence number delivered (or skipped by a gap) per room.
    pub fn cursors(&self) -> &BTreeMap<String, u64> {
        &self.cursors
    }

    /// The stream is gone: drops it (and, with `fail_over`, the connection, so that the next
    /// attempt goes to another node), then pauses before the next attempt.
    async fn broken(&mut self, fail_over: bool) {
        if let Some((connection, _, _)) = self.stream.take()
            && (fail_over || connection.close_reason().is_some())
        {
            self.client.drop_connection(&connection).await;
        }
        self.failures += 1;
        self.resuming = true;
        let pause = Duration::from_millis((50u64 << self.failures.min(5)).min(2000));
        tokio::time::sleep(pause).await;
    }

    /// The next event. Keeps reconnecting through failures; returns an error only when the
    /// subscription cannot go on (no rooms left, or an error retrying cannot fix).
    ///
    /// Cancel-safe: a call dropped while it waits loses nothing (a partly read event stays
    /// buffered for the next call), so it may race other futures in a `select!`.
    pub async fn next(&mut self) -> Result<SubscriptionEvent, ClientError> {
        loop {
            if self.cursors.is_empty() && self.presence_of.is_empty() {
                return Err(ClientError::Protocol("the subscription has no rooms left".into()));
            }
            if self.stream.is_none() {
                match self.client.open_subscription(&self.cursors, &self.presence_of).await {
                    Ok((connection, send, recv)) => self.stream = Some((connection, send, framed(recv))),
                    Err(e) if e.retryable() => {
                        self.broken(false).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((connection, _, recv)) = self.stream.as_mut() else { continue };
            // A node that dies sends nothing more, not even an end of stream: the same watchdog
            // as a request's (see `call_on`) notices it after two keep-alive intervals, where the
            // connection's idle timeout would take four. Polled only when no event is ready.
            let keep_alive = keep_alive_interval(self.client.options());
            let read = tokio::select! {
                biased;
                frame = recv.next() => match frame {
                    Some(Ok(frame)) => decode(frame.freeze()),
                    _ if connection.close_reason().is_some() => Err(Broken::Connection),
                    _ => Err(Broken::Stream),
                },
                _ = connection_silent(connection, Some(keep_alive)) => Err(Broken::Connection),
            };
            let event = match read {
                Ok(event) => event,
                Err(broken) => {
                    self.broken(matches!(broken, Broken::Connection)).await;
                    continue;
                }
            };
            match event.kind {
                Some(event::Kind::Subscribed(_)) => {
                    self.failures = 0;
                    if std::mem::take(&mut self.resuming) {
                        let node = self.client.current_node().await.unwrap_or_default();
                        return Ok(SubscriptionEvent::Resumed { node });
                    }
                }
                Some(event::Kind::Message(m)) => {
                    let Some(cursor) = self.cursors.get_mut(&m.room) else { continue };
                    if m.seq <= *cursor {
                        continue; // already delivered before a reconnect
                    }
                    *cursor = m.seq;
                    return Ok(SubscriptionEvent::Message(m));
                }
                Some(event::Kind::Gap(g)) => {
                    if let Some(cursor) = self.cursors.get_mut(&g.room) {
                        *cursor = (*cursor).max(g.to_seq);
                    }
                    return Ok(SubscriptionEvent::Gap(g));
                }
                Some(event::Kind::Error(e)) if !e.room.is_empty() => {
                    self.cursors.remove(&e.room);
                    let room = e.room.clone();
                    return Ok(SubscriptionEvent::RoomError { room, error: ClientError::from_wire(e) });
                }
                Some(event::Kind::Error(e)) => {
                    let error = ClientError::from_wire(e);
                    if !error.retryable() {
                        return Err(error);
                    }
                    // A node cut off or stopping: another node. Anything else (an evicted slow
                    // subscriber, a shard without a leader): the same connection, after a pause.
                    self.broken(error.leave_node()).await;
                }
                // The node is going away: resume elsewhere.
                Some(event::Kind::Closing(_)) => self.broken(true).await,
                Some(event::Kind::Presence(p)) => return Ok(SubscriptionEvent::Presence(p.users)),
                Some(event::Kind::Typing(t)) => {
                    return Ok(SubscriptionEvent::Typing { room: t.room, users: t.users });
                }
                None => {} // an event kind from a newer server
            }
        }
    }
}

fn decode(frame: Bytes) -> Result<pb::Event, Broken> {
    prost::Message::decode(frame).map_err(|_| Broken::Stream)
}
