//! The QUIC endpoint clients connect to (TLS 1.3, ALPN `chorus/1`).
//!
//! One bidirectional stream per request: the client writes one `Request` frame and finishes
//! its side; the server answers with one `Response` frame (or, for `Subscribe`, a sequence of
//! `Event` frames) and finishes. A bad stream gets an error on that stream only.
//!
//! Limits, so that one client cannot starve the others: connections per node; per connection,
//! concurrent streams (QUIC flow control enforces it), subscriptions
//! ([`MAX_SUBSCRIPTIONS_PER_CONNECTION`]), request bytes being read
//! ([`Session::request_bytes`]) and bytes buffered for sending (the QUIC send window); per
//! request, its frame size and the time to send it ([`REQUEST_READ_TIMEOUT`]); per node,
//! requests in flight and request bytes being read. A request's body is read a chunk at a time
//! and each chunk is paid for (connection budget first, then the node's) before it is read, so
//! a declared length costs nothing until its bytes arrive, and a connection that sends slowly
//! waits on its own budget only.
//!
//! Every connection is signed in once (see [`crate::auth`]): the handlers of requests other
//! than Hello, Register, Login, Refresh and LoginExternal receive the [`Identity`] verified
//! here, never a name the client gave.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::auth::Identity;
use crate::auth::connections::ConnectionAuth;

use chorus_proto::client::{Request, Response, request, response};
use chorus_proto::framing::{self, FrameError};
use quinn::crypto::rustls::QuicServerConfig;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::ServiceError;
use crate::node::Node;
use crate::requests;

/// How long a client may take to send its request after opening a stream.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections are closed after this long (clients send keep-alives).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Ack-eliciting packets a client receives per acknowledgement it sends (see `bind`).
const ACK_EVERY: u32 = 10;
/// Subscriptions one connection may hold at once (each may follow up to
/// [`requests::subscribe::MAX_ROOMS_PER_SUBSCRIPTION`] rooms).
pub const MAX_SUBSCRIPTIONS_PER_CONNECTION: usize = 16;
/// Bytes of a request body read (and paid for) at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes QUIC keeps per connection for sending (unacknowledged or waiting for flow-control
/// credit): what a client that does not read can pin, whatever it subscribed to.
const SEND_WINDOW_BYTES: u64 = 8 << 20;

/// QUIC application error codes the server closes connections and streams with (one number
/// space, so that a code means one thing wherever it appears; docs/PROTOCOL.md lists them).
pub mod close_codes {
    /// Connection: the node is stopping (after every subscription got its `Closing`).
    pub const SHUTTING_DOWN: u32 = 1;
    /// Stream (STOP_SENDING): the request frame is over the limit; the server reads no more.
    pub const REQUEST_TOO_LARGE: u32 = 3;
    /// Connection: the session it was signed in with ended (signed out, account disabled).
    pub const SESSION_REVOKED: u32 = 4;
    /// Stream (RESET_STREAM): a subscription whose subscriber did not read its events, not
    /// even the `slow_subscriber` error event that says so (see `requests::subscribe`).
    pub const SLOW_SUBSCRIBER: u32 = 5;
}

/// Per-connection state: whether it said hello, who it is signed in as, its budgets.
pub struct Session {
    pub hello: OnceLock<()>,
    pub auth: Arc<ConnectionAuth>,
    pub remote: std::net::SocketAddr,
    pub requests: crate::rate_limit::ConnectionRate,
    /// Bytes of request bodies this connection may have read and not yet answered: two
    /// requests of the largest size.
    pub request_bytes: Arc<Semaphore>,
    pub subscriptions: Arc<Semaphore>,
    /// Whether this connection made its user online (see [`crate::presence`]), decided
    /// under one lock with its closing, so that a sign-in finishing after the close cannot
    /// leave the user online.
    online: std::sync::Mutex<Online>,
}

enum Online {
    NotYet,
    /// A connection that only routes requests to shard leaders (its first Hello said so):
    /// its user is present through their main connection, not this one.
    RouteOnly,
    As(String),
    Closed,
}

impl Session {
    /// The connection signed in (for the first time): its user is online while it lasts.
    pub fn went_online(&self, node: &Node) {
        let Some(user) = self.auth.user() else { return };
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*online, Online::NotYet) {
            node.presence.connected(&user);
            *online = Online::As(user);
        }
    }

    /// The connection's first Hello said it only routes requests to shard leaders: it never
    /// makes its user online (else a client's idle or away state would lose to the "online"
    /// of its routes, and its closing routes would change presence long after the fact).
    pub fn route_only(&self) {
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*online, Online::NotYet) {
            *online = Online::RouteOnly;
        }
    }

    /// The connection closed: its user is no longer online through it.
    fn went_offline(&self, node: &Node) {
        let mut online = self.online.lock().unwrap_or_else(|p| p.into_inner());
        if let Online::As(user) = std::mem::replace(&mut *online, Online::Closed) {
            node.presence.disconnected(&user);
        }
    }

    pub fn new(node: &Node, quic: Option<quinn::Connection>, remote: std::net::SocketAddr) -> Session {
        Session {
            hello: OnceLock::new(),
            auth: ConnectionAuth::new(quic, node.config.auth.access_token_ttl),
            remote,
            requests: node.rate.connection_rate(),
            request_bytes: Arc::new(Semaphore::new(2 * node.max_request_frame())),
            subscriptions: Arc::new(Semaphore::new(MAX_SUBSCRIPTIONS_PER_CONNECTION)),
            online: std::sync::Mutex::new(Online::NotYet),
        }
    }

    pub fn said_hello(&self) -> Result<(), ServiceError> {
        self.hello.get().copied().ok_or(ServiceError::HelloRequired)
    }

    /// The signed-in identity of this connection.
    pub fn identity(&self) -> Result<Arc<Identity>, ServiceError> {
        self.said_hello()?;
        self.auth.identity()
    }
}

/// Binds the client endpoint.
pub fn bind(node: &Node, crypto: Arc<rustls::ServerConfig>) -> anyhow::Result<quinn::Endpoint> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(node.config.max_streams_per_connection.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into()?));
    // Subscribers receive a steady stream of small packets and by default acknowledge every
    // second one: as many packets back as half of those pushed. Ask for an acknowledgement per
    // ACK_EVERY packets instead (or after the usual delay): each one saved is a packet less to
    // encrypt, send, receive and decrypt on both ends. Loss detection and congestion control
    // work from fewer, larger ACKs.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_EVERY - 1));
    transport.ack_frequency_config(Some(acks));
    transport.send_window(SEND_WINDOW_BYTES);
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto)?));
    server_config.transport_config(Arc::new(transport));
    Ok(quinn::Endpoint::server(server_config, node.config.client_addr)?)
}

/// Accepts connections until the node shuts down.
pub async fn serve(node: Arc<Node>, endpoint: quinn::Endpoint) {
    let connections = Arc::new(Semaphore::new(node.config.max_connections));
    loop {
        let incoming = tokio::select! {
            _ = node.clients_shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing a connection: too many connections");
            incoming.refuse();
            continue;
        };
        let span = tracing::info_span!("conn", remote = %incoming.remote_address());
        let node2 = node.clone();
        node.client_tasks.spawn(
            async move {
                let _permit = permit;
                match incoming.await {
                    Ok(connection) => handle_connection(node2, connection).await,
                    Err(e) => tracing::debug!(error = %e, "handshake failed"),
                }
            }
            .instrument(span),
        );
    }
}

/// Takes a connection's user offline (as far as this connection goes) when it ends, however
/// it ends.
pub struct OfflineOnDrop {
    pub node: Arc<Node>,
    pub session: Arc<Session>,
}

impl Drop for OfflineOnDrop {
    fn drop(&mut self) {
        self.session.went_offline(&self.node);
    }
}

async fn handle_connection(node: Arc<Node>, connection: quinn::Connection) {
    let session = Arc::new(Session::new(&node, Some(connection.clone()), connection.remote_address()));
    let _offline = OfflineOnDrop { node: node.clone(), session: session.clone() };
    // This connection's streams, to close it only once they are done.
    let streams = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = node.clients_shutdown.cancelled() => break,
            stream = async {
                session.requests.wait_if_held().await;
                connection.accept_bi().await
            } => stream,
        };
        match stream {
            Ok((send, recv)) => {
                let (node2, session2) = (node.clone(), session.clone());
                node.client_tasks
                    .spawn(streams.track_future(handle_stream(node2, session2, send, recv).in_current_span()));
            }
            Err(e) => {
                tracing::debug!(reason = %e, "connection closed");
                return;
            }
        }
    }
    // Shutting down: in-flight streams finish on their own tasks (a subscription delivers its
    // `Closing`); then the connection closes with a code that says why. (Left to the last
    // handle's drop, it would close with code 0.)
    streams.close();
    streams.wait().await;
    connection.close(close_codes::SHUTTING_DOWN.into(), b"node shutting down");
}

/// The request bytes a stream holds of its connection's and its node's budgets, until its
/// request is answered.
#[derive(Default)]
pub struct RequestBudget {
    connection: Option<tokio::sync::OwnedSemaphorePermit>,
    node: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl RequestBudget {
    /// Takes `n` more bytes: the connection's first (a connection waits on itself before it
    /// holds any of the node's), then the node's.
    async fn grow(&mut self, session: &Session, node: &Node, n: usize) -> Result<(), ServiceError> {
        // `n` is at most READ_CHUNK.
        let n = n as u32;
        let closed = |_| ServiceError::ShuttingDown;
        let connection = session.request_bytes.clone().acquire_many_owned(n).await.map_err(closed)?;
        let node = node.request_bytes.clone().acquire_many_owned(n).await.map_err(closed)?;
        for (held, more) in [(&mut self.connection, connection), (&mut self.node, node)] {
            match held {
                Some(permit) => permit.merge(more),
                None => *held = Some(more),
            }
        }
        Ok(())
    }
}

/// Reads a stream's request: its length first (refused at once when over the limit), then its
/// body a chunk at a time, each chunk paid for before it is read (see the module docs). The
/// returned budget holds those bytes until the request is done. Cancel-safe reads (QUIC's
/// `read_chunk`) make the caller's timeout drop a half-read request cleanly.
/// The first byte of a `Request` holding a `Subscribe`: field 5, length-delimited.
const SUBSCRIBE_TAG: u8 = (5 << 3) | 2;

async fn read_request(
    node: &Node,
    session: &Session,
    recv: &mut quinn::RecvStream,
    subscribe: &mut bool,
) -> Result<(Request, RequestBudget), ServiceError> {
    let limit = node.max_request_frame();
    let size = match framing::read_len(recv, limit).await {
        Ok(Some(size)) => size,
        Ok(None) => return Err(ServiceError::Malformed("the stream ended before a request".into())),
        Err(e) => {
            if matches!(e, FrameError::TooLarge { .. }) {
                // Do not read (or buffer) the rest of an oversized request.
                let _ = recv.stop(close_codes::REQUEST_TOO_LARGE.into());
            }
            return Err(e.into());
        }
    };
    let mut budget = RequestBudget::default();
    let mut paid = 0usize;
    let mut body = bytes::BytesMut::new();
    while body.len() < size {
        if paid == body.len() {
            let more = (size - paid).min(READ_CHUNK);
            budget.grow(session, node, more).await?;
            body.reserve(more);
            paid += more;
        }
        match recv.read_chunk(paid - body.len(), true).await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk.bytes);
                *subscribe = body.first() == Some(&SUBSCRIBE_TAG);
            }
            Ok(None) => return Err(FrameError::Truncated.into()),
            Err(e) => return Err(ServiceError::Malformed(format!("reading the request: {e}"))),
        }
    }
    let request = <Request as prost::Message>::decode(body.freeze()).map_err(FrameError::from)?;
    Ok((request, budget))
}

async fn handle_stream(
    node: Arc<Node>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // Whether the request, as far as it was read, is a Subscribe: then even an error that comes
    // before it could be decoded is sent as the `Event` its client reads.
    let mut subscribe = false;
    let read = read_request(&node, &session, &mut recv, &mut subscribe);
    let request = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read).await {
        Err(_) => {
            Err(ServiceError::Malformed(format!("no complete request within {} s", REQUEST_READ_TIMEOUT.as_secs())))
        }
        Ok(result) => result,
    };
    let (request, budget) = match request {
        Ok(r) => r,
        Err(e) if subscribe => {
            tracing::debug!(error = %e, "bad subscribe request");
            requests::subscribe::refuse(&mut send, &e).await;
            return;
        }
        Err(e) => {
            tracing::debug!(error = %e, "bad request");
            reply(&mut send, response::Kind::Error(node.wire_error(&e))).await;
            return;
        }
    };
    match request.kind {
        Some(request::Kind::Subscribe(subscribe)) => {
            // The budget bounds requests waiting for an answer; a subscription lives on for
            // as long as the client wants, so it must not keep its share.
            drop(budget);
            // Its client has nothing more to say on it (the request was the whole of it): the
            // receive half's state need not live as long as the subscription.
            drop(recv);
            subscribe_on(node, &session, subscribe, send).await;
        }
        Some(kind) => {
            let kind = answer(&node, &session, kind).await;
            reply(&mut send, kind).await;
        }
        None => reply(&mut send, response::Kind::Error(ServiceError::UnknownRequest.to_wire())).await,
    }
}

/// Serves a Subscribe on `send` (a QUIC stream, or a stream of the WebSocket gateway) for a
/// signed-in connection with a subscription slot left; refuses it with an `Error` event
/// otherwise.
pub async fn subscribe_on<S: requests::subscribe::EventSink>(
    node: Arc<Node>,
    session: &Session,
    subscribe: chorus_proto::client::Subscribe,
    mut send: S,
) {
    let me = session.requests.request().and_then(|()| session.identity()).and_then(|me| {
        let slot = session
            .subscriptions
            .clone()
            .try_acquire_owned()
            .map_err(|_| ServiceError::TooManySubscriptions { limit: MAX_SUBSCRIPTIONS_PER_CONNECTION })?;
        Ok((me, slot))
    });
    let (me, _slot) = match me {
        Ok(me) => me,
        Err(e) => {
            requests::subscribe::refuse(&mut send, &e).await;
            return;
        }
    };
    requests::subscribe::handle(node, me, session.auth.clone(), subscribe, send).await;
}

/// The answer to a unary request (an `Error` when it fails), within the node's bound on
/// requests in flight.
pub async fn answer(node: &Arc<Node>, session: &Session, kind: request::Kind) -> response::Kind {
    let outcome = match node.inflight.clone().try_acquire_owned() {
        // Boxed: the largest request's future would otherwise size every stream's task, a
        // subscription's too, for as long as it lives (~3.7 KiB each).
        Ok(_permit) => Box::pin(requests::dispatch(node, session, kind)).await,
        Err(_) => Err(ServiceError::Unavailable { reason: "this node has too many requests in flight".into() }),
    };
    outcome.unwrap_or_else(|e| {
        if !matches!(e, ServiceError::Command(_)) {
            tracing::debug!(error = %e, code = e.code(), "request failed");
        }
        response::Kind::Error(node.wire_error(&e))
    })
}

/// Writes the one response frame of a unary request and finishes the stream. A client that
/// left is not an error worth more than a debug line.
async fn reply(send: &mut quinn::SendStream, kind: response::Kind) {
    let response = Response { kind: Some(kind) };
    if let Err(e) = framing::write_message(send, &response).await {
        tracing::debug!(error = %e, "could not send the response");
        return;
    }
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of four owned arguments returns.
    fn future_size4<A, B, C, D, Fut, F: FnOnce(A, B, C, D) -> Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    fn future_size5<A, B, C, D, E, Fut, F: FnOnce(A, B, C, D, E) -> Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every stream's task is as large as the largest future it may await inline, for as long
    /// as it lives: a subscription's must not pay for the largest unary request (thousands of
    /// subscriptions per node; see docs/BENCHMARKS.md, presence).
    #[test]
    fn a_streams_task_is_sized_by_the_subscription_not_by_the_largest_request() {
        let stream = future_size4(&handle_stream);
        let subscription = future_size5(&requests::subscribe::handle::<quinn::SendStream>);
        assert!(
            stream <= subscription + 1024,
            "a stream's task takes {stream} bytes, a subscription's future {subscription}"
        );
    }
}
