//! The WebSocket gateway (`GET /ws`): the client protocol for browsers, as proto3's canonical
//! JSON mapping of the same `Request`, `Response` and `Event` messages (docs/PROTOCOL.md,
//! "WebSocket").
//!
//! One WebSocket is one connection, as a QUIC connection is: its own Hello and sign-in, its
//! own budgets, its user online while it lasts. Each text message is one JSON object naming a
//! logical stream: `{"id": N, "request": {...}}` opens stream N with one request (as a QUIC
//! stream does), `{"id": N, "cancel": true}` ends it (a subscription); the node answers
//! `{"id": N, "response": {...}}` once, or `{"id": N, "event": {...}}` per event and then
//! `{"id": N, "end": true}` (or `"reset": code`). Requests go through the same code as QUIC's
//! (`front_door::answer`, `front_door::subscribe_on`), so authorization, limits and errors are
//! the same.
//!
//! Bounds: a message of at most [`max_message_bytes`]; at most `max_streams_per_connection`
//! streams open (more are refused with `too_many_streams`); [`OUTGOING`] messages queued for
//! the client, whose writer gives up on a client that takes none for [`WRITE_TIMEOUT`]; a
//! subscription whose events wait for room that long is evicted as on QUIC; a connection that
//! answers no ping for [`SILENT_LIMIT`] is closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use chorus_proto::client::{Event, Request, Response, request, response};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::error::ServiceError;
use crate::front_door::{self, OfflineOnDrop, Session};
use crate::node::Node;
use crate::requests::subscribe::{EventSink, SLOW_SUBSCRIBER_AFTER, Written};

/// Messages queued for one client (responses and events together).
const OUTGOING: usize = 256;
/// A client that takes no message for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The node pings this often; a connection that sends nothing (not even a pong) for
/// [`SILENT_LIMIT`] is closed.
const PING_EVERY: Duration = Duration::from_secs(15);
const SILENT_LIMIT: Duration = Duration::from_secs(45);
/// How long the closing handshake may take before the socket is dropped.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);
/// How long a revoked connection stays open for its subscriptions to say why they end.
const CLOSE_AFTER_REVOKED: Duration = Duration::from_millis(250);

/// WebSocket close codes (4000 + the QUIC application code of the same meaning).
pub mod close_codes {
    pub const SHUTTING_DOWN: u16 = 4001;
    pub const SESSION_REVOKED: u16 = 4004;
    /// The client read nothing for [`super::WRITE_TIMEOUT`], or answered no ping.
    pub const UNRESPONSIVE: u16 = 4006;
}

/// The largest message a client may send: a request frame's limit, with room for base64 and
/// JSON around it.
pub fn max_message_bytes(node: &Node) -> usize {
    node.max_request_frame().saturating_mul(2).saturating_add(4096)
}

/// A message from the client.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming {
    id: u32,
    #[serde(default)]
    request: Option<Request>,
    #[serde(default)]
    cancel: bool,
}

/// A message to the client.
#[derive(Serialize, Default)]
struct Outgoing<'a> {
    id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a Response>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a Event>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    end: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset: Option<u32>,
}

fn encode(message: &Outgoing<'_>) -> String {
    // Serializing generated messages into a string does not fail (their maps have string
    // keys); were it to, the stream is reset rather than the connection broken.
    serde_json::to_string(message).unwrap_or_else(|e| {
        tracing::error!(error = %e, "a gateway message did not serialize");
        serde_json::json!({"id": message.id, "reset": 0}).to_string()
    })
}

fn error_response(node: &Node, e: &ServiceError) -> Response {
    Response { kind: Some(response::Kind::Error(node.wire_error(e))) }
}

/// Answers stream `id` with error `e`; the connection goes on.
async fn refuse(out: &mpsc::Sender<Message>, node: &Node, id: u32, e: ServiceError) {
    let text = encode(&Outgoing { id, response: Some(&error_response(node, &e)), ..Default::default() });
    let _ = out.send(Message::Text(text.into())).await;
}

/// The streams a connection has open, by id, each with the token that ends it.
type Streams = Arc<Mutex<HashMap<u32, CancellationToken>>>;

/// Serves one WebSocket until it closes, the session is revoked or the node shuts down.
pub async fn serve(node: Arc<Node>, socket: WebSocket, remote: SocketAddr) {
    let session = Arc::new(Session::new(&node, None, remote));
    let _offline = OfflineOnDrop { node: node.clone(), session: session.clone() };
    let (mut sink, mut incoming) = socket.split();
    let (out, mut outgoing) = mpsc::channel::<Message>(OUTGOING);
    // The writer: everything the client gets goes through this one queue.
    let unresponsive = CancellationToken::new();
    let writer = {
        let unresponsive = unresponsive.clone();
        tokio::spawn(
            async move {
                while let Some(message) = outgoing.recv().await {
                    let close = matches!(message, Message::Close(_));
                    match tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)).await {
                        Ok(Ok(())) if !close => {}
                        Ok(Ok(())) => break,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "the WebSocket closed");
                            break;
                        }
                        Err(_) => {
                            unresponsive.cancel();
                            break;
                        }
                    }
                }
                // A client that reads nothing would hold the closing handshake (and this task,
                // and the socket) forever: give it a moment, then drop the socket.
                let _ = tokio::time::timeout(CLOSE_WITHIN, sink.close()).await;
            }
            .in_current_span(),
        )
    };
    let streams: Streams = Arc::default();
    let stream_limit = usize::try_from(node.config.max_streams_per_connection).unwrap_or(usize::MAX);
    let permits = Arc::new(Semaphore::new(stream_limit));
    let tasks = TaskTracker::new();
    let mut ping = crate::node::ticker(PING_EVERY);
    let mut heard = tokio::time::Instant::now();
    let revoked = session.auth.revoked().clone();
    let close = loop {
        let message = tokio::select! {
            _ = node.clients_shutdown.cancelled() => break Some((close_codes::SHUTTING_DOWN, "node shutting down")),
            _ = revoked.cancelled() => {
                tokio::time::sleep(CLOSE_AFTER_REVOKED).await;
                break Some((close_codes::SESSION_REVOKED, "session revoked"));
            }
            _ = unresponsive.cancelled() => break None,
            _ = ping.tick() => {
                if heard.elapsed() > SILENT_LIMIT {
                    break Some((close_codes::UNRESPONSIVE, "no answer to pings"));
                }
                let _ = out.try_send(Message::Ping(Bytes::new()));
                continue;
            }
            message = incoming.next() => message,
        };
        heard = tokio::time::Instant::now();
        let text = match message {
            None | Some(Ok(Message::Close(_))) => break None,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading the WebSocket failed");
                break None;
            }
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                let e = ServiceError::Malformed("this gateway speaks JSON in text messages, not binary".into());
                refuse(&out, &node, 0, e).await;
                continue;
            }
            Some(Ok(_)) => continue, // pings and pongs
        };
        let parsed: Result<Incoming, _> = serde_json::from_str(text.as_str());
        let incoming_message = match parsed {
            Ok(m) => m,
            Err(e) => {
                let e = ServiceError::Malformed(format!("not a gateway message: {e}"));
                refuse(&out, &node, 0, e).await;
                continue;
            }
        };
        let id = incoming_message.id;
        if incoming_message.cancel {
            if let Some(token) = streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
                token.cancel();
            }
            continue;
        }
        let Some(request) = incoming_message.request else {
            let e = ServiceError::Malformed("a message needs a request or cancel".into());
            refuse(&out, &node, id, e).await;
            continue;
        };
        let refused = {
            let mut open = streams.lock().unwrap_or_else(|p| p.into_inner());
            if open.contains_key(&id) {
                Some(ServiceError::Malformed(format!("stream {id} is open already")))
            } else {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let token = CancellationToken::new();
                        open.insert(id, token.clone());
                        let stream = Stream { id, out: out.clone(), cancel: token, streams: streams.clone() };
                        let (node, session) = (node.clone(), session.clone());
                        tasks.spawn(
                            async move {
                                let _permit = permit;
                                stream.run(node, session, request).await;
                            }
                            .in_current_span(),
                        );
                        None
                    }
                    Err(_) => Some(ServiceError::TooManyStreams { limit: stream_limit }),
                }
            }
        };
        if let Some(e) = refused {
            refuse(&out, &node, id, e).await;
        }
    };
    // Streams end first (a subscription's `Closing` goes out before the close frame).
    let shutting_down = node.clients_shutdown.is_cancelled();
    if !shutting_down {
        for (_, token) in streams.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            token.cancel();
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    if let Some((code, reason)) = close {
        let _ = out.try_send(Message::Close(Some(CloseFrame { code, reason: reason.into() })));
    }
    drop(out);
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_WITHIN + Duration::from_secs(1), &mut writer).await.is_err() {
        writer.abort();
    }
}

/// One logical stream of a WebSocket.
struct Stream {
    id: u32,
    out: mpsc::Sender<Message>,
    cancel: CancellationToken,
    streams: Streams,
}

impl Stream {
    async fn run(mut self, node: Arc<Node>, session: Arc<Session>, request: Request) {
        let span = tracing::debug_span!("ws_stream", id = self.id);
        async {
            match request.kind {
                Some(request::Kind::Subscribe(subscribe)) => {
                    let (cancel, out) = (self.cancel.clone(), self.out.clone());
                    tokio::select! {
                        _ = front_door::subscribe_on(node, &session, subscribe, &mut self) => {}
                        // The connection closed under it: nothing to deliver to.
                        _ = out.closed() => cancel.cancel(),
                    }
                }
                Some(kind) => {
                    let response = Response { kind: Some(front_door::answer(&node, &session, kind).await) };
                    self.send(&Outgoing { id: self.id, response: Some(&response), ..Default::default() }).await;
                }
                None => {
                    let response = error_response(&node, &ServiceError::UnknownRequest);
                    self.send(&Outgoing { id: self.id, response: Some(&response), ..Default::default() }).await;
                }
            }
        }
        .instrument(span)
        .await;
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }

    async fn send(&self, message: &Outgoing<'_>) -> bool {
        self.out.send(Message::Text(encode(message).into())).await.is_ok()
    }
}

/// Splits `chunk` into the `Event`s of its frames, each with the chunk from its frame on (what
/// is left to write if it is not taken). The frames are the node's own, so a bad one is a bug:
/// it ends the split.
fn events(mut chunk: Bytes) -> impl Iterator<Item = (Event, Bytes)> {
    std::iter::from_fn(move || {
        let from_here = chunk.clone();
        let frame = chorus_proto::framing::split_frame(&mut chunk)?;
        let event = <Event as prost::Message>::decode(frame).ok()?;
        Some((event, from_here))
    })
}

impl EventSink for &mut Stream {
    async fn write_or_stall(&mut self, chunk: Bytes) -> Written {
        for (event, from_here) in events(chunk) {
            let text = encode(&Outgoing { id: self.id, event: Some(&event), ..Default::default() });
            tokio::select! {
                _ = self.cancel.cancelled() => return Written::Gone,
                sent = self.out.send_timeout(Message::Text(text.into()), SLOW_SUBSCRIBER_AFTER) => match sent {
                    Ok(()) => {}
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => return Written::Stalled(from_here),
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => return Written::Gone,
                },
            }
        }
        Written::All
    }

    fn gone(&self) -> impl Future<Output = ()> + Send + 'static {
        self.cancel.clone().cancelled_owned()
    }

    async fn last_event(&mut self, rest: Bytes, event: &Event, within: Duration) -> bool {
        let delivered = async {
            if !rest.is_empty() && !matches!(self.write_or_stall(rest).await, Written::All) {
                return false;
            }
            self.send(&Outgoing { id: self.id, event: Some(event), ..Default::default() }).await
                && self.send(&Outgoing { id: self.id, end: true, ..Default::default() }).await
        };
        tokio::time::timeout(within, delivered).await.unwrap_or(false)
    }

    fn abandon(&mut self, code: u32) {
        let text = encode(&Outgoing { id: self.id, reset: Some(code), ..Default::default() });
        let _ = self.out.try_send(Message::Text(text.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::client::{Closing, event};

    #[test]
    fn messages_map_to_canonical_json() {
        let event = Event { kind: Some(event::Kind::Closing(Closing { reason: "bye".into() })) };
        let text = encode(&Outgoing { id: 7, event: Some(&event), ..Default::default() });
        assert_eq!(text, r#"{"id":7,"event":{"closing":{"reason":"bye"}}}"#);
        let text = encode(&Outgoing { id: 7, end: true, ..Default::default() });
        assert_eq!(text, r#"{"id":7,"end":true}"#);
        let parsed: Incoming = serde_json::from_str(
            r#"{"id":3,"request":{"send":{"room":"general","clientId":"AAE=","clientSeq":"5","body":"aGk="}}}"#,
        )
        .unwrap();
        let Some(request::Kind::Send(send)) = parsed.request.and_then(|r| r.kind) else { panic!("not a send") };
        assert_eq!((send.room.as_str(), send.client_seq, &send.body[..]), ("general", 5, &b"hi"[..]));
        assert_eq!(&send.client_id[..], &[0, 1]);
        assert!(serde_json::from_str::<Incoming>(r#"{"id":3,"bogus":1}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn a_chunk_splits_into_its_events_and_what_is_left_from_each() {
        let a = Event { kind: Some(event::Kind::Closing(Closing { reason: "a".into() })) };
        let b = Event { kind: Some(event::Kind::Closing(Closing { reason: "b".into() })) };
        let mut chunk = bytes::BytesMut::new();
        chunk.extend_from_slice(&chorus_proto::framing::encode_frame(&a));
        let second_at = chunk.len();
        chunk.extend_from_slice(&chorus_proto::framing::encode_frame(&b));
        let chunk = chunk.freeze();
        let split: Vec<(Event, Bytes)> = events(chunk.clone()).collect();
        assert_eq!(split.len(), 2);
        assert_eq!((split[0].0.clone(), split[1].0.clone()), (a, b));
        assert_eq!(split[0].1, chunk);
        assert_eq!(split[1].1, chunk.slice(second_at..));
    }
}
