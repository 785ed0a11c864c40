//! Every error a client can receive, with its stable code. Mapped to the wire in one place
//! ([`ServiceError::to_wire`]); docs/PROTOCOL.md lists the codes.

use chorus_proto::client;
use chorus_proto::framing::FrameError;
use chorus_raft::{CommandError, QueryError, ShardId, StoreError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is invalid (room name, sizes, ...): deterministic, do not retry.
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("say hello first: the first request on a connection must be Hello")]
    HelloRequired,
    #[error("this connection is signed in as {0:?}: a token of another user cannot renew it")]
    HelloTwice(String),
    /// No valid sign-in: none yet, or a token that is malformed, forged or of another cluster.
    #[error("not signed in: {0}")]
    Unauthenticated(String),
    /// The access token expired: refresh it (the session goes on).
    #[error("{0}")]
    TokenExpired(String),
    /// The session ended (logout, log out everywhere, a disabled account): sign in again.
    #[error("{0}")]
    TokenRevoked(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("too many {what}: try again in {} ms", retry_after.as_millis())]
    RateLimited { what: String, retry_after: std::time::Duration },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unknown request kind (is this client newer than the server?)")]
    UnknownRequest,
    #[error("request frame of {size} bytes is over the limit of {limit} bytes")]
    FrameTooLarge { size: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("this sync token cannot be used: {0} (sync again from an empty token)")]
    InvalidSyncToken(String),
    /// Nothing was done, and nothing will be: safe to retry the same request.
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    /// The outcome is unknown: the write may still be applied. Retry with the same
    /// (client_id, client_seq) to learn it.
    #[error("timed out: {reason}")]
    Timeout { reason: String },
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The connection has as many subscriptions as it may: end one (or add rooms to one).
    #[error(
        "this connection has {limit} subscriptions, the most it may have: end one, or subscribe to several rooms in one"
    )]
    TooManySubscriptions { limit: usize },
    /// A WebSocket connection has as many streams open as it may (QUIC holds a client back
    /// with flow control instead): wait for an answer, or end a subscription.
    #[error("this connection has {limit} streams open, the most it may have: wait for one to end")]
    TooManyStreams { limit: usize },
    /// The subscriber did not read its events: the stream is closed to free what it held.
    /// Resubscribe from the last seq received (and read faster).
    #[error("this subscription did not read its events for {} ms with {queued_bytes} bytes waiting; closed so that they need not be kept (resubscribe from the last seq received)", waited.as_millis())]
    SlowSubscriber { waited: std::time::Duration, queued_bytes: usize },
    /// This node's replica of the shard has heard nothing from a leader for longer than two
    /// election timeouts (the node is cut off), or has stayed behind its leader that long:
    /// its feed would stall. Resume on another node.
    #[error("this node's replica of shard {shard} {lag}: resume on another node")]
    Lagging { shard: ShardId, lag: crate::node::ReplicaLag },
    #[error("internal error: {0}")]
    Internal(String),
    /// An error a peer already mapped (forwarded requests): passed on unchanged.
    #[error("{}", .0.message)]
    Remote(client::Error),
}

impl ServiceError {
    pub fn no_leader(shard: ShardId) -> ServiceError {
        ServiceError::Unavailable { reason: format!("no leader for shard {shard}") }
    }

    pub fn code(&self) -> &str {
        match self {
            ServiceError::Remote(e) => &e.code,
            ServiceError::Command(e) => e.code(),
            ServiceError::HelloRequired => "hello_required",
            ServiceError::HelloTwice(_) => "hello_twice",
            ServiceError::Unauthenticated(_) => "unauthenticated",
            ServiceError::TokenExpired(_) => "token_expired",
            ServiceError::TokenRevoked(_) => "token_revoked",
            ServiceError::Forbidden(_) => "forbidden",
            ServiceError::RateLimited { .. } => "rate_limited",
            ServiceError::Malformed(_) => "malformed_request",
            ServiceError::UnknownRequest => "unknown_request",
            ServiceError::FrameTooLarge { .. } => "frame_too_large",
            ServiceError::InvalidArgument(_) => "invalid_argument",
            ServiceError::InvalidSyncToken(_) => "invalid_sync_token",
            ServiceError::Unavailable { .. } => "unavailable",
            ServiceError::Timeout { .. } => "timeout",
            ServiceError::ShuttingDown => "shutting_down",
            ServiceError::TooManySubscriptions { .. } => "too_many_subscriptions",
            ServiceError::TooManyStreams { .. } => "too_many_streams",
            ServiceError::SlowSubscriber { .. } => "slow_subscriber",
            ServiceError::Lagging { .. } => "lagging",
            ServiceError::Internal(_) => "internal",
        }
    }

    /// True when the operation may have taken effect despite the error.
    pub fn indeterminate(&self) -> bool {
        match self {
            ServiceError::Timeout { .. } => true,
            ServiceError::Remote(e) => e.indeterminate,
            _ => false,
        }
    }

    /// The error as an event ending a subscription (of one room, when `room` is given).
    pub fn to_event(&self, room: Option<&str>) -> chorus_proto::client::Event {
        let mut wire = self.to_wire();
        wire.room = room.unwrap_or_default().to_owned();
        chorus_proto::client::Event { kind: Some(chorus_proto::client::event::Kind::Error(wire)) }
    }

    pub fn to_wire(&self) -> client::Error {
        if let ServiceError::Remote(e) = self {
            return e.clone();
        }
        let retry_after_ms = match self {
            ServiceError::RateLimited { retry_after, .. } => (retry_after.as_millis() as u64).max(1),
            _ => 0,
        };
        client::Error {
            code: self.code().to_owned(),
            message: self.to_string(),
            indeterminate: self.indeterminate(),
            room: String::new(),
            retry_after_ms,
            try_elsewhere: false,
        }
    }

    /// An error received from a peer (forwarding), kept as it is.
    pub fn from_wire(e: client::Error) -> ServiceError {
        ServiceError::Remote(e)
    }
}

impl From<QueryError> for ServiceError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid(e) => ServiceError::Command(e),
            QueryError::Store(e) => e.into(),
        }
    }
}

/// A replica's storage failed reading: nothing the client can change.
impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        ServiceError::Internal(e.to_string())
    }
}

impl From<FrameError> for ServiceError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { size, limit } => ServiceError::FrameTooLarge { size, limit },
            FrameError::Decode(e) => ServiceError::Malformed(e.to_string()),
            FrameError::Truncated => ServiceError::Malformed("the stream ended inside a frame".into()),
            FrameError::Io(e) => ServiceError::Malformed(format!("reading the request: {e}")),
        }
    }
}
