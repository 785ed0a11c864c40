//! The QUIC endpoint clients connect to (TLS 1.3, ALPN `chorus/1`).
//!
//! One bidirectional stream per request: the client writes one `Request` frame and finishes
//! its side; the server answers with one `Response` frame (or, for `Subscribe`, a sequence of
//! `Event` frames) and finishes. Limits: connections per node, concurrent streams per
//! connection (QUIC flow control enforces it), request frame size, time to send the request,
//! and requests in flight per node. A bad stream gets an error on that stream only.
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

/// QUIC application error codes used when closing connections and streams.
pub mod close_codes {
    pub const SHUTTING_DOWN: u32 = 1;
    pub const TOO_MANY_CONNECTIONS: u32 = 2;
    pub const REQUEST_TOO_LARGE: u32 = 3;
}

/// Per-connection state: whether it said hello, who it is signed in as, its request budget.
pub struct Session {
    pub hello: OnceLock<()>,
    pub auth: Arc<ConnectionAuth>,
    pub remote: std::net::SocketAddr,
    pub requests: crate::rate_limit::ConnectionRate,
}

impl Session {
    pub fn new(node: &Node, quic: Option<quinn::Connection>, remote: std::net::SocketAddr) -> Session {
        Session {
            hello: OnceLock::new(),
            auth: ConnectionAuth::new(quic, node.config.auth.access_token_ttl),
            remote,
            requests: node.rate.connection_rate(),
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

async fn handle_connection(node: Arc<Node>, connection: quinn::Connection) {
    let session = Arc::new(Session::new(&node, Some(connection.clone()), connection.remote_address()));
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
                node.client_tasks.spawn(handle_stream(node2, session2, send, recv).in_current_span());
            }
            Err(e) => {
                tracing::debug!(reason = %e, "connection closed");
                return;
            }
        }
    }
    // Shutting down: in-flight streams finish on their own tasks; the endpoint closes the
    // connection once they are done.
}

/// Reads a stream's request: its length first, then — once the node's request-byte budget
/// has room for it — its body. The returned permit holds that budget until the request is done.
async fn read_request(
    node: &Node,
    recv: &mut quinn::RecvStream,
) -> Result<(Request, tokio::sync::OwnedSemaphorePermit), ServiceError> {
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
    // `size` is below the frame limit, far below u32::MAX.
    let permit =
        node.request_bytes.clone().acquire_many_owned(size as u32).await.map_err(|_| ServiceError::ShuttingDown)?;
    let body = framing::read_body(recv, size).await?;
    let request = <Request as prost::Message>::decode(body).map_err(FrameError::from)?;
    Ok((request, permit))
}

async fn handle_stream(
    node: Arc<Node>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let request = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(&node, &mut recv)).await {
        Err(_) => {
            Err(ServiceError::Malformed(format!("no complete request within {} s", REQUEST_READ_TIMEOUT.as_secs())))
        }
        Ok(result) => result,
    };
    let (request, budget) = match request {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "bad request");
            reply(&mut send, response::Kind::Error(e.to_wire())).await;
            return;
        }
    };
    match request.kind {
        Some(request::Kind::Subscribe(subscribe)) => {
            // The budget bounds requests waiting for an answer; a subscription lives on for
            // as long as the client wants, so it must not keep its share.
            drop(budget);
            let me = session.requests.request().and_then(|()| session.identity());
            let me = match me {
                Ok(me) => me,
                Err(e) => {
                    requests::subscribe::refuse(&mut send, &e).await;
                    return;
                }
            };
            requests::subscribe::handle(node, me, session.auth.clone(), subscribe, send).await;
        }
        Some(kind) => {
            let outcome = match node.inflight.clone().try_acquire_owned() {
                Ok(_permit) => requests::dispatch(&node, &session, kind).await,
                Err(_) => Err(ServiceError::Unavailable { reason: "this node has too many requests in flight".into() }),
            };
            let kind = outcome.unwrap_or_else(|e| {
                if !matches!(e, ServiceError::Command(_)) {
                    tracing::debug!(error = %e, code = e.code(), "request failed");
                }
                response::Kind::Error(e.to_wire())
            });
            reply(&mut send, kind).await;
        }
        None => reply(&mut send, response::Kind::Error(ServiceError::UnknownRequest.to_wire())).await,
    }
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
