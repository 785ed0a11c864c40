//! A subscription that survives failures: after a broken stream, a closed node or a failover
//! it resubscribes — on whichever node the client reaches — from the last sequence number it
//! delivered for each room, so its consumer sees every message once, in order.

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_proto::client::{self as pb, event};
use chorus_proto::framing;
use tokio::io::BufReader;

use crate::{Client, ClientError, MAX_RESPONSE_FRAME, Message, connection_silent, keep_alive_interval};

/// Bytes read from a subscription stream at a time (frames larger than this are read directly).
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
}

/// Live messages of some rooms; see the module docs. Created by [`Client::subscribe`].
pub struct Subscription {
    client: Client,
    cursors: BTreeMap<String, u64>,
    /// The stream's receive half is read through a buffer: a node writes many small events at
    /// once, and reading each frame straight from QUIC would take two stream reads per event.
    stream: Option<(quinn::Connection, quinn::SendStream, BufReader<quinn::RecvStream>)>,
    failures: u32,
    resuming: bool,
}

impl Subscription {
    pub(crate) fn new(client: Client, cursors: BTreeMap<String, u64>) -> Subscription {
        Subscription { client, cursors, stream: None, failures: 0, resuming: false }
    }

    /// The last sequence number delivered (or skipped by a gap) per room.
    pub fn cursors(&self) -> &BTreeMap<String, u64> {
        &self.cursors
    }

    async fn broken(&mut self, fail_over: bool) {
        if let Some((connection, _, _)) = self.stream.take()
            && fail_over
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
    /// Not cancel-safe: a call dropped while it waits may drop a partly read event, and the
    /// dead-node watchdog restarts with each call, so wrap it in a timeout only to give up.
    pub async fn next(&mut self) -> Result<SubscriptionEvent, ClientError> {
        loop {
            if self.cursors.is_empty() {
                return Err(ClientError::Protocol("the subscription has no rooms left".into()));
            }
            if self.stream.is_none() {
                match self.client.open_subscription(&self.cursors).await {
                    Ok((connection, send, recv)) => {
                        self.stream = Some((connection, send, BufReader::with_capacity(READ_BUFFER, recv)))
                    }
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
                read = framing::read_message::<pb::Event, _>(recv, MAX_RESPONSE_FRAME) => read.ok().flatten(),
                _ = connection_silent(connection, Some(keep_alive)) => None,
            };
            let Some(event) = read else {
                self.broken(true).await;
                continue;
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
                    self.broken(true).await;
                }
                // The node is going away: resume elsewhere.
                Some(event::Kind::Closing(_)) => self.broken(true).await,
                None => {} // an event kind from a newer server
            }
        }
    }
}
