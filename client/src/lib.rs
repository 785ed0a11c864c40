//! The Chorus client library.
//!
//! A [`Client`] connects to any node of a list, says hello, and fails over to another node
//! when its connection breaks, goes silent for [`ClientOptions::idle_timeout`] (2 s by
//! default: a killed node sends nothing), or receives nothing for half that while a request or
//! a subscription waits on it, trying the other nodes before the lost one. Sends
//! carry this client's id and a fresh `client_seq`; a send whose outcome is unknown is retried
//! with the same pair, so each message is appended exactly once. A [`Subscription`] resumes
//! after the last message it delivered, on whatever node it reconnects to: no gap, no
//! duplicate.
//!
//! Every client signs in (see [`session`]): with a password, an external provider's token, or a
//! session it kept; the server knows who sends from the session, never from what a client says.
//!
//! ```no_run
//! # async fn example() -> Result<(), chorus_client::ClientError> {
//! use chorus_client::{Client, ClientOptions, Credentials, Trust};
//! let credentials = Credentials::Password { user: "ann".into(), password: "correct horse".into() };
//! let options = ClientOptions::new(vec!["127.0.0.1:7401".into()], Trust::Insecure, credentials);
//! let client = Client::connect(options).await?;
//! client.join("general").await?;
//! let receipt = client.send("general", "hello").await?;
//! println!("appended as #{}", receipt.seq);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod catch_up;
mod rooms;
mod routes;
pub mod session;
pub mod settings;
mod subscription;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_proto::batching::{BatchQueue, dispatch_batches};
use chorus_proto::client::{self as pb, request, response};
use chorus_proto::framing::{self, FrameError};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::Mutex;

pub use chorus_proto::client::{ClusterStatusReply, HistoryPage, Message, RoomInfo, RoomList};
pub use rooms::{MembershipAction, Role, Visibility};
pub use session::{Credentials, SessionTokens};
pub use subscription::{Subscription, SubscriptionEvent};
pub use tls::Trust;

/// Largest response frame the client accepts (history pages are capped at about 4 MiB).
pub const MAX_RESPONSE_FRAME: usize = 16 << 20;

/// Server error codes after which the same request may simply be retried (elsewhere; after a
/// refresh of the access token; after the wait a rate limit asks for).
/// `lagging` and `slow_subscriber` end subscriptions only (which resume).
const RETRYABLE_CODES: &[&str] =
    &["unavailable", "timeout", "shutting_down", "token_expired", "rate_limited", "lagging", "slow_subscriber"];

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// `try_elsewhere`: the node said another node may serve this (it is cut off).
    #[error("{message} ({code})")]
    Server { code: String, message: String, indeterminate: bool, retry_after_ms: u64, try_elsewhere: bool },
    /// The connection failed. `maybe_sent`: the request may have reached the server first.
    #[error("connection lost: {message}")]
    Connection { message: String, maybe_sent: bool },
    /// The last attempt failed definitely, but an earlier one may have succeeded.
    #[error("{last} (an earlier attempt's outcome is unknown: it may have succeeded)")]
    MaybeApplied { last: Box<ClientError> },
    #[error("no node could be reached: {0}")]
    NoNode(String),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Server { code, .. } => Some(code),
            ClientError::MaybeApplied { last } => last.code(),
            _ => None,
        }
    }

    /// True when the operation may have taken effect despite the error.
    pub fn indeterminate(&self) -> bool {
        match self {
            ClientError::Server { indeterminate, .. } => *indeterminate,
            ClientError::Connection { maybe_sent, .. } => *maybe_sent,
            ClientError::TimedOut(_) | ClientError::MaybeApplied { .. } => true,
            _ => false,
        }
    }

    fn lost(message: impl std::fmt::Display, maybe_sent: bool) -> ClientError {
        ClientError::Connection { message: message.to_string(), maybe_sent }
    }

    fn retryable(&self) -> bool {
        match self {
            ClientError::Server { code, .. } => RETRYABLE_CODES.contains(&code.as_str()),
            ClientError::Connection { .. } | ClientError::NoNode(_) | ClientError::TimedOut(_) => true,
            ClientError::Protocol(_) | ClientError::Config(_) | ClientError::MaybeApplied { .. } => false,
        }
    }

    fn from_wire(e: pb::Error) -> ClientError {
        ClientError::Server {
            code: e.code,
            message: e.message,
            indeterminate: e.indeterminate,
            retry_after_ms: e.retry_after_ms,
            try_elsewhere: e.try_elsewhere,
        }
    }

    /// True when the node that answered cannot help and another may: it is stopping, or cut
    /// off from the cluster. (A shard that is merely electing a leader answers `unavailable`
    /// without this: every node would say the same, and the connection is kept.)
    fn leave_node(&self) -> bool {
        match self {
            ClientError::Server { code, try_elsewhere, .. } => {
                code == "shutting_down" || code == "lagging" || (code == "unavailable" && *try_elsewhere)
            }
            ClientError::MaybeApplied { last } => last.leave_node(),
            _ => false,
        }
    }

    /// How long a `rate_limited` answer asks to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Server { retry_after_ms, .. } if *retry_after_ms > 0 => {
                Some(Duration::from_millis(*retry_after_ms))
            }
            ClientError::MaybeApplied { last } => last.retry_after(),
            _ => None,
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => ClientError::lost(e, true),
            FrameError::Truncated => ClientError::lost("the stream ended inside a frame", true),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// How to reach and trust the cluster, and who we are.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Client addresses (`host:port`) of one or more nodes.
    pub nodes: Vec<String>,
    pub trust: Trust,
    /// TLS server name to ask for (default: the host part of each node's address).
    pub server_name: Option<String>,
    /// How to sign in when connecting.
    pub credentials: Credentials,
    /// Names this client's sessions (e.g. "laptop"), as the user sees them listed.
    pub device: String,
    /// Identifies the client software in the server's logs.
    pub client_name: String,
    pub connect_timeout: Duration,
    /// A connection silent for this long is dead (keep-alives go out four times as often), and
    /// the client fails over: this bounds how long a killed or cut-off node holds requests and
    /// subscriptions. A live node answers a keep-alive within a round trip, so the default (2 s)
    /// leaves a wide margin; over lossy links, raise it. A request or subscription whose
    /// connection receives nothing for half of it (two keep-alive intervals; more where round
    /// trips are long) fails over without waiting for the rest.
    pub idle_timeout: Duration,
    /// How long to wait for one answer (longer than the server's request timeout).
    pub request_timeout: Duration,
    /// How long an operation keeps retrying across failovers before giving up.
    pub retry_deadline: Duration,
    /// Send each shard's messages straight to its leader (over one more connection per leader
    /// node) rather than through the connected node, which would forward them.
    pub route_to_leaders: bool,
    /// This client's id, which every send carries with its `client_seq` (default: a random one
    /// per [`Client`]). A program that keeps its id and its next `client_seq` across restarts
    /// (the CLI does, per profile: see [`settings::SendLog`]) can retry a send whose outcome
    /// it never learnt, after a restart, and have it appended once.
    pub client_id: Option<Bytes>,
    /// The first `client_seq` [`Client::send`] uses (default 1). The server deduplicates per
    /// (room, client_id, client_seq) within a window of the client's latest sequence numbers
    /// (see docs/PROTOCOL.md): a kept id must not start again from 1.
    pub first_client_seq: u64,
}

impl ClientOptions {
    pub fn new(nodes: Vec<String>, trust: Trust, credentials: Credentials) -> ClientOptions {
        ClientOptions {
            nodes,
            trust,
            server_name: None,
            credentials,
            device: default_device(),
            client_name: format!("chorus-client/{}", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            retry_deadline: Duration::from_secs(30),
            route_to_leaders: true,
            client_id: None,
            first_client_seq: 1,
        }
    }
}

/// "chorus-client on <host name>".
fn default_device() -> String {
    let host = std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty());
    let mut device = format!("chorus-client on {}", host.unwrap_or_else(|| "unknown host".into()));
    device.truncate(64);
    device
}

/// What a send returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    pub seq: u64,
    pub ts_ms: u64,
    /// The server had already appended this (client_id, client_seq): this is the original.
    pub duplicate: bool,
    pub client_seq: u64,
}

/// Where a history page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFrom {
    /// The oldest messages after this sequence number.
    After(u64),
    /// The newest messages before this sequence number (`u64::MAX`: the newest of all).
    Before(u64),
}

struct Live {
    connection: quinn::Connection,
    node: String,
    hello: pb::HelloReply,
}

/// A direct connection to a shard leader's node, with that node's id.
type Direct = (u64, quinn::Connection);

/// One send waiting to go out in a batch.
struct PendingSend {
    send: pb::Send,
    reply: tokio::sync::oneshot::Sender<Result<pb::SendReply, ClientError>>,
}

/// Most sends in one SendBatch request, and most batch requests in flight per client. While
/// the slots are busy, sends queue up and leave together in the next request: a lone send
/// leaves at once, concurrent ones share requests (fewer QUIC streams, fewer frames).
const MAX_SENDS_PER_BATCH: usize = 1024;
/// Encoded sends per batch: within the server's 4 MiB + 64 KiB request frame.
const MAX_BATCH_BYTES: usize = 4 << 20;
const SEND_BATCHES_IN_FLIGHT: usize = 4;
const SEND_QUEUE: usize = 16 * 1024;
/// How long a dial waits for one node before it dials the next as well.
const DIAL_STAGGER: Duration = Duration::from_millis(250);

/// The order in which to dial `count` nodes: round-robin from `start`, those not suspected
/// (`suspected(i)`) first.
fn dial_order(count: usize, start: usize, suspected: impl Fn(usize) -> bool) -> Vec<usize> {
    let rotation = (0..count).map(|k| (start + k) % count);
    let (clear, suspect): (Vec<usize>, Vec<usize>) = rotation.partition(|&i| !suspected(i));
    clear.into_iter().chain(suspect).collect()
}

struct Inner {
    options: ClientOptions,
    sends: BatchQueue<PendingSend>,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    /// For connections straight to shard leaders: quick to notice a dead node (see
    /// [`routes::DIRECT_IDLE_TIMEOUT`]).
    direct_config: quinn::ClientConfig,
    live: Mutex<Option<Live>>,
    /// Node id of the live connection's node (0: none yet).
    main_node: AtomicU64,
    routes: std::sync::Mutex<routes::Routes>,
    /// Nodes to try, configured ones first, then those the cluster told us about.
    nodes: std::sync::Mutex<Vec<String>>,
    next_node: AtomicUsize,
    /// Nodes whose connection was lost, that could not be reached, or that said they cannot
    /// help, and when: dialled after the others while they rest ([`routes::REST`], as direct
    /// connections do). Dialling a killed node costs a whole handshake timeout (it answers
    /// nothing over QUIC), and failing over from a node that cannot help (a shard without a
    /// leader yet) should not lead back to the one just lost.
    suspects: std::sync::Mutex<HashMap<String, Instant>>,
    client_id: Bytes,
    next_client_seq: AtomicU64,
    /// The signed-in session, if any (see [`session`]).
    session: std::sync::Mutex<Option<SessionTokens>>,
    /// Woken when the session changes (the refresher recomputes when to refresh).
    session_changed: Arc<tokio::sync::Notify>,
}

/// A connection to a Chorus cluster. Cheap to clone; clones share the connection and the
/// client id.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// The main connection pings this often when it has nothing else to send.
fn keep_alive_interval(options: &ClientOptions) -> Duration {
    options.idle_timeout / 4
}

fn shutting_down() -> ClientError {
    ClientError::lost("the client is shutting down", false)
}

fn random_client_id() -> Bytes {
    Bytes::copy_from_slice(&rand::random::<[u8; 16]>())
}

impl Client {
    /// Connects to the first reachable node, says hello and signs in as `options.credentials`
    /// say.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        if options.nodes.is_empty() {
            return Err(ClientError::Config("no node addresses given".into()));
        }
        let crypto = tls::client_crypto(&options.trust)?;
        let quic = QuicClientConfig::try_from(crypto).map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
        let quic = Arc::new(quic);
        let transport = |idle: Duration, keep_alive: Duration| -> Result<Arc<quinn::TransportConfig>, ClientError> {
            let mut transport = quinn::TransportConfig::default();
            transport.keep_alive_interval(Some(keep_alive));
            let idle = idle.try_into().map_err(|e| ClientError::Config(format!("idle timeout: {e}")))?;
            transport.max_idle_timeout(Some(idle));
            Ok(Arc::new(transport))
        };
        let mut client_config = quinn::ClientConfig::new(quic.clone());
        client_config.transport_config(transport(options.idle_timeout, keep_alive_interval(&options))?);
        let mut direct_config = quinn::ClientConfig::new(quic);
        let direct_idle = routes::DIRECT_IDLE_TIMEOUT.min(options.idle_timeout);
        direct_config.transport_config(transport(direct_idle, direct_idle / 5)?);
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| ClientError::Config(format!("UDP socket: {e}")))?;
        let (sends, queue, slots) = BatchQueue::new(SEND_QUEUE, SEND_BATCHES_IN_FLIGHT);
        let client_id = options.client_id.clone().filter(|id| !id.is_empty()).unwrap_or_else(random_client_id);
        let first_client_seq = options.first_client_seq.max(1);
        let client = Client {
            inner: Arc::new(Inner {
                sends,
                nodes: std::sync::Mutex::new(options.nodes.clone()),
                options,
                endpoint,
                client_config,
                direct_config,
                live: Mutex::new(None),
                main_node: AtomicU64::new(0),
                routes: Default::default(),
                next_node: AtomicUsize::new(0),
                suspects: Default::default(),
                client_id,
                next_client_seq: AtomicU64::new(first_client_seq),
                session: std::sync::Mutex::new(None),
                session_changed: Arc::new(tokio::sync::Notify::new()),
            }),
        };
        let credentials = client.inner.options.credentials.clone();
        if let Credentials::Session(tokens) = &credentials {
            client.use_session(tokens.clone());
        }
        client.connection().await?;
        tokio::spawn(send_batches(Arc::downgrade(&client.inner), queue, slots));
        tokio::spawn(close_unused_routes(Arc::downgrade(&client.inner)));
        tokio::spawn(session::keep_fresh(Arc::downgrade(&client.inner)));
        match credentials {
            Credentials::Anonymous | Credentials::Session(_) => {}
            Credentials::Password { user, password } => {
                client.login(&user, &password).await?;
            }
            Credentials::RegisterOrLogin { user, password } => {
                client.register_or_login(&user, &password).await?;
            }
        }
        Ok(client)
    }

    /// This client's id: every send carries it with its `client_seq`.
    pub fn client_id(&self) -> &Bytes {
        &self.inner.client_id
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The node this client is connected to now, if any.
    pub async fn current_node(&self) -> Option<String> {
        self.inner.live.lock().await.as_ref().map(|l| l.node.clone())
    }

    /// The shards whose sends now go straight to their leader's node (not through the node
    /// this client is connected to), with that node's id.
    pub fn direct_shards(&self) -> Vec<(u32, u64)> {
        self.routes().direct_shards(self.inner.main_node.load(Ordering::Relaxed))
    }

    /// What the current node said in reply to hello.
    pub async fn server_info(&self) -> Option<pb::HelloReply> {
        self.inner.live.lock().await.as_ref().map(|l| l.hello.clone())
    }

    /// The live connection, connecting (and saying hello) if there is none.
    async fn connection(&self) -> Result<quinn::Connection, ClientError> {
        let mut live = self.inner.live.lock().await;
        if let Some(l) = live.as_ref()
            && l.connection.close_reason().is_none()
        {
            return Ok(l.connection.clone());
        }
        if let Some(lost) = live.take() {
            self.suspect(&lost.node);
        }
        let candidates = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let order = {
            let now = Instant::now();
            let mut suspects = self.inner.suspects.lock().unwrap_or_else(|p| p.into_inner());
            suspects.retain(|_, since| now.saturating_duration_since(*since) < routes::REST);
            let start = self.inner.next_node.load(Ordering::Relaxed);
            dial_order(candidates.len(), start, |i| suspects.contains_key(&candidates[i]))
        };
        // The candidates are dialled in order, each DIAL_STAGGER after the one before or at once
        // when it failed, the first to answer wins (as "happy eyeballs" does): a dead node
        // costs a stagger, not a whole connect timeout. Callers meanwhile wait for this one
        // dial rather than each making their own.
        let mut errors = Vec::new();
        let mut order = order.into_iter();
        let mut dials = futures::stream::FuturesUnordered::new();
        let dial = |i: usize| {
            let node = candidates[i].clone();
            async move { (i, self.connect_to(&node, false).await) }
        };
        loop {
            if dials.is_empty() {
                match order.next() {
                    Some(i) => dials.push(dial(i)),
                    None => break,
                }
            }
            let done = tokio::select! {
                done = futures::StreamExt::next(&mut dials) => done,
                _ = tokio::time::sleep(DIAL_STAGGER), if order.len() > 0 => {
                    if let Some(i) = order.next() {
                        dials.push(dial(i));
                    }
                    continue;
                }
            };
            let Some((i, result)) = done else { continue };
            let node = &candidates[i];
            match result {
                Ok(new) => {
                    let connection = new.connection.clone();
                    self.learn_nodes(&new.hello.node_addrs);
                    self.inner.main_node.store(new.hello.node_id, Ordering::Relaxed);
                    self.routes().set_shard_count(new.hello.shard_count);
                    self.routes().note(&new.hello.leaders);
                    *live = Some(new);
                    // The next failover starts at the node after this one (and dials this one,
                    // suspected once lost, after the others).
                    self.inner.next_node.store(i + 1, Ordering::Relaxed);
                    return Ok(connection);
                }
                // The session is over (revoked, disabled): no other node will take it.
                Err(e) if matches!(e.code(), Some("token_revoked" | "unauthenticated")) => return Err(e),
                Err(e) => {
                    self.suspect(node);
                    errors.push(format!("{node}: {e}"));
                }
            }
        }
        Err(ClientError::NoNode(errors.join("; ")))
    }

    /// `node` failed us: dial it after the others for a while.
    fn suspect(&self, node: &str) {
        self.inner.suspects.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_owned(), Instant::now());
    }

    fn learn_nodes(&self, addrs: &[String]) {
        let mut nodes = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for addr in addrs {
            if !addr.is_empty() && !nodes.contains(addr) {
                nodes.push(addr.clone());
            }
        }
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, routes::Routes> {
        self.inner.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in leader hints of a SendBatch reply (shards whose sends were forwarded), and
    /// opens (in the background) a connection to each leader that has none yet. Sends go
    /// through the main connection until it is up.
    fn learn_leaders(&self, hints: &[pb::ShardLeader]) {
        if !self.inner.options.route_to_leaders || hints.is_empty() {
            return;
        }
        let main = self.inner.main_node.load(Ordering::Relaxed);
        for (node, addr) in self.routes().learn(hints, main) {
            let client = self.clone();
            tokio::spawn(async move {
                match client.connect_to(&addr, true).await {
                    Ok(live) if live.hello.node_id == node => {
                        client.routes().connected(node, live.connection);
                        client.routes().note(&live.hello.leaders);
                    }
                    Ok(live) => {
                        // Another node answers at that address now: hints about it are stale.
                        live.connection.close(0u32.into(), b"not the node expected");
                        client.routes().failed(node);
                    }
                    Err(_) => client.routes().failed(node),
                }
            });
        }
    }

    /// Sends `batch` as one SendBatch per target node (see [`routes`]), holding `slot` until
    /// every send of it is answered.
    async fn send_routed(&self, batch: Vec<PendingSend>, slot: tokio::sync::OwnedSemaphorePermit) {
        let groups = self.route(batch);
        futures::future::join_all(groups.into_iter().map(|(direct, batch)| self.send_batch(direct, batch))).await;
        drop(slot);
    }

    /// Sends one batch, on the direct connection to its shards' leader when `direct` names
    /// one, else on the main connection, and answers every send of it.
    async fn send_batch(&self, direct: Option<Direct>, batch: Vec<PendingSend>) {
        let (sends, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.send, p.reply)).unzip();
        let count = sends.len();
        let kind = request::Kind::SendBatch(pb::SendBatch { sends });
        let direct_node = direct.as_ref().map(|(node, _)| *node);
        let result = match direct {
            None => self.call_once(kind).await,
            Some((node, connection)) => {
                match call_on(&connection, kind, self.inner.options.request_timeout, None).await {
                    Err(e) if e.retryable() => {
                        // The leader's node is gone or refuses work: retries take the main road.
                        self.routes().failed(node);
                        Err(ClientError::lost(format!("leader node {node}: {e}"), e.indeterminate()))
                    }
                    other => other,
                }
            }
        };
        match result {
            Ok(response::Kind::SentBatch(reply)) if reply.results.len() == count => {
                let outcomes: Vec<_> = reply
                    .results
                    .into_iter()
                    .map(|result| match result.result {
                        Some(pb::send_result::Result::Sent(r)) => Ok(r),
                        Some(pb::send_result::Result::Error(e)) => Err(ClientError::from_wire(e)),
                        None => Err(ClientError::Protocol("empty send result".into())),
                    })
                    .collect();
                // A leader that cannot commit (cut off from its followers, or deposed and unable
                // to reach who leads now): the retries take the main road.
                let leader_failed = outcomes.iter().any(|o| o.as_ref().is_err_and(ClientError::retryable));
                match direct_node {
                    Some(node) if leader_failed => self.routes().failed(node),
                    _ => self.learn_leaders(&reply.leaders),
                }
                for (waiter, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = waiter.send(outcome);
                }
            }
            Ok(other) => {
                let e = format!("unexpected reply to a batch of {count} sends: {other:?}");
                replies.into_iter().for_each(|w| drop(w.send(Err(ClientError::Protocol(e.clone())))));
            }
            Err(e) => {
                for waiter in replies {
                    let _ = waiter.send(Err(e.clone()));
                }
            }
        }
    }

    /// Splits a batch by where its sends should go: the direct connection of each shard
    /// leader known and connected, the main connection for the rest.
    fn route(&self, batch: Vec<PendingSend>) -> Vec<(Option<Direct>, Vec<PendingSend>)> {
        let main = self.inner.main_node.load(Ordering::Relaxed);
        let mut routes = self.routes();
        let mut groups: Vec<(Option<Direct>, Vec<PendingSend>)> = Vec::new();
        for pending in batch {
            let target = routes.connection_for(&pending.send.room, main);
            let key = target.as_ref().map(|(node, _)| *node);
            match groups.iter_mut().find(|(t, _)| t.as_ref().map(|(node, _)| *node) == key) {
                Some((_, group)) => group.push(pending),
                None => groups.push((target, vec![pending])),
            }
        }
        groups
    }

    /// Connects to `node` and says hello; `direct`: a connection to a shard leader.
    async fn connect_to(&self, node: &str, direct: bool) -> Result<Live, ClientError> {
        let options = &self.inner.options;
        let addr = tokio::net::lookup_host(node)
            .await
            .map_err(|e| ClientError::lost(format!("resolving: {e}"), false))?
            .next()
            .ok_or_else(|| ClientError::lost("no address", false))?;
        let host = node.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(node);
        let server_name = options.server_name.as_deref().unwrap_or(host);
        let connecting = self
            .inner
            .endpoint
            .connect_with(
                if direct { self.inner.direct_config.clone() } else { self.inner.client_config.clone() },
                addr,
                server_name,
            )
            .map_err(|e| ClientError::lost(e, false))?;
        let connection = tokio::time::timeout(options.connect_timeout, connecting)
            .await
            .map_err(|_| ClientError::lost("connecting timed out", false))?
            .map_err(|e| ClientError::lost(e, false))?;
        // An access token that our clock says has expired is refreshed on the new connection
        // (after an anonymous hello) rather than sent.
        let token = match self.access_token() {
            Some((token, expires)) if expires > session::now_ms() + 1_000 => token,
            _ => String::new(),
        };
        let hello = |access_token: String| {
            request::Kind::Hello(pb::Hello {
                client_name: options.client_name.clone(),
                access_token,
                route_only: direct,
            })
        };
        let keep_alive = (!direct).then(|| keep_alive_interval(options));
        let reply = match call_on(&connection, hello(token.clone()), options.request_timeout, keep_alive).await {
            Err(e) if e.code() == Some("token_expired") => {
                call_on(&connection, hello(String::new()), options.request_timeout, keep_alive).await?
            }
            other => other?,
        };
        let response::Kind::Hello(mut hello) = reply else {
            return Err(ClientError::Protocol(format!("unexpected reply to hello: {reply:?}")));
        };
        if hello.user.is_empty() && self.session().is_some() {
            self.refresh_on(&connection).await?;
            hello.user = self.user().unwrap_or_default();
        }
        Ok(Live { connection, node: node.to_owned(), hello })
    }

    /// Forgets the current connection (if it is still `connection`), so the next call fails
    /// over to another node.
    async fn drop_connection(&self, connection: &quinn::Connection) {
        let mut live = self.inner.live.lock().await;
        if live.as_ref().is_some_and(|l| l.connection.stable_id() == connection.stable_id())
            && let Some(l) = live.take()
        {
            l.connection.close(0u32.into(), b"failing over");
            self.suspect(&l.node);
        }
    }

    /// One request on the current connection: no retry.
    pub async fn call_once(&self, kind: request::Kind) -> Result<response::Kind, ClientError> {
        let connection = self.connection().await?;
        let result = call_on(
            &connection,
            kind,
            self.inner.options.request_timeout,
            Some(keep_alive_interval(&self.inner.options)),
        )
        .await;
        if let Err(ClientError::Connection { .. } | ClientError::TimedOut(_)) = &result {
            self.drop_connection(&connection).await;
        }
        result
    }

    /// A request, retried (on other nodes if need be) while the error says retrying may help,
    /// until the retry deadline. Only for requests that are safe to repeat.
    async fn call(&self, kind: request::Kind) -> Result<response::Kind, ClientError> {
        self.retrying(|| self.call_once(kind.clone())).await
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retry deadline passes, backing
    /// off between attempts and leaving a node that says it cannot help. An error after an
    /// attempt whose outcome was unknown becomes `MaybeApplied`.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + self.inner.options.retry_deadline;
        let mut attempts = 0u32;
        let mut indeterminate = false;
        loop {
            match attempt().await {
                Ok(reply) => return Ok(reply),
                Err(e) if e.retryable() && Instant::now() < deadline => {
                    indeterminate |= e.indeterminate();
                    attempts += 1;
                    if e.code() == Some("token_expired") {
                        // Refresh, then retry at once (a refresh that fails says why).
                        match self.refresh().await {
                            Ok(()) => continue,
                            Err(refresh) if !refresh.retryable() => return Err(refresh),
                            Err(_) => {}
                        }
                    }
                    if let Some(wait) = e.retry_after() {
                        tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
                        continue;
                    }
                    if e.leave_node() {
                        // This node cannot help now; another may. (Only then: one shard
                        // without a leader must not close the connection that every other
                        // request and subscription shares.)
                        if let Some(l) = self.inner.live.lock().await.take() {
                            l.connection.close(0u32.into(), b"failing over");
                            self.suspect(&l.node);
                        }
                    }
                    let pause = Duration::from_millis((50u64 << attempts.min(4)).min(1000));
                    tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
                }
                Err(e) if indeterminate && !e.indeterminate() => {
                    return Err(ClientError::MaybeApplied { last: Box::new(e) });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends `body` to `room`, exactly once (see the crate docs).
    pub async fn send(&self, room: &str, body: impl Into<Bytes>) -> Result<SendReceipt, ClientError> {
        let client_seq = self.inner.next_client_seq.fetch_add(1, Ordering::Relaxed);
        self.send_with_seq(room, body, client_seq).await
    }

    /// Appends with a `client_seq` the caller manages (it must be new for this client, or a
    /// deliberate retry of an earlier one).
    pub async fn send_with_seq(
        &self,
        room: &str,
        body: impl Into<Bytes>,
        client_seq: u64,
    ) -> Result<SendReceipt, ClientError> {
        let send =
            pb::Send { room: room.to_owned(), client_id: self.inner.client_id.clone(), client_seq, body: body.into() };
        let reply = self
            .retrying(|| async {
                let (reply, result) = tokio::sync::oneshot::channel();
                let pending = PendingSend { send: send.clone(), reply };
                match self.inner.sends.alone() {
                    // Nothing else waiting: this send goes at once, from this task.
                    Some(slot) => self.send_routed(vec![pending], slot).await,
                    None => self.inner.sends.send(pending).await.map_err(|_| shutting_down())?,
                }
                result.await.unwrap_or_else(|_| Err(shutting_down()))
            })
            .await?;
        Ok(SendReceipt { seq: reply.seq, ts_ms: reply.ts_ms, duplicate: reply.duplicate, client_seq })
    }

    /// Reserves the next `client_seq` (for callers that record it before sending).
    pub fn next_client_seq(&self) -> u64 {
        self.inner.next_client_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates a public room, owned by the signed-in user. `retention_max_messages` 0 keeps
    /// every message.
    pub async fn create_room(
        &self,
        room: &str,
        metadata: BTreeMap<String, String>,
        retention_max_messages: u64,
    ) -> Result<pb::RoomCreated, ClientError> {
        self.create_room_with(room, Visibility::Public, metadata, retention_max_messages).await
    }

    /// Creates a room of the given visibility (public or private).
    pub async fn create_room_with(
        &self,
        room: &str,
        visibility: Visibility,
        metadata: BTreeMap<String, String>,
        retention_max_messages: u64,
    ) -> Result<pb::RoomCreated, ClientError> {
        let kind = request::Kind::CreateRoom(pb::CreateRoom {
            room: room.to_owned(),
            metadata,
            retention_max_messages,
            visibility: visibility as i32,
        });
        match self.call(kind).await? {
            response::Kind::RoomCreated(r) => Ok(r),
            other => Err(unexpected("create room", other)),
        }
    }

    /// A page of history, oldest message first.
    pub async fn history(
        &self,
        room: &str,
        from: HistoryFrom,
        limit: u32,
        linearizable: bool,
    ) -> Result<HistoryPage, ClientError> {
        let position = match from {
            HistoryFrom::After(n) => pb::history::Position::After(n),
            HistoryFrom::Before(n) => pb::history::Position::Before(n),
        };
        let consistency = if linearizable { pb::Consistency::Linearizable } else { pb::Consistency::Local };
        let kind = request::Kind::History(pb::History {
            room: room.to_owned(),
            position: Some(position),
            limit,
            consistency: consistency as i32,
        });
        match self.call(kind).await? {
            response::Kind::History(page) => Ok(page),
            other => Err(unexpected("history", other)),
        }
    }

    /// Every message of a room after `after`, reading page by page.
    pub async fn history_all(&self, room: &str, after: u64, linearizable: bool) -> Result<Vec<Message>, ClientError> {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let page = self.history(room, HistoryFrom::After(cursor), 1000, linearizable).await?;
            let Some(last) = page.messages.last() else { break };
            cursor = last.seq;
            out.extend(page.messages);
        }
        Ok(out)
    }

    /// Rooms the signed-in user can see (`mine`: only those they joined or are invited to).
    pub async fn list_rooms(&self, after: &str, limit: u32) -> Result<RoomList, ClientError> {
        self.list_rooms_of(after, limit, false).await
    }

    pub async fn list_rooms_of(&self, after: &str, limit: u32, mine: bool) -> Result<RoomList, ClientError> {
        let kind =
            request::Kind::ListRooms(pb::ListRooms { after: after.to_owned(), limit, mine, ..Default::default() });
        match self.call(kind).await? {
            response::Kind::Rooms(list) => Ok(list),
            other => Err(unexpected("list rooms", other)),
        }
    }

    pub async fn cluster_status(&self) -> Result<ClusterStatusReply, ClientError> {
        match self.call(request::Kind::ClusterStatus(pb::ClusterStatus {})).await? {
            response::Kind::ClusterStatus(s) => Ok(s),
            other => Err(unexpected("status", other)),
        }
    }

    /// Live messages of `rooms`, each after its cursor.
    pub fn subscribe(&self, rooms: impl IntoIterator<Item = (String, u64)>) -> Subscription {
        Subscription::new(self.clone(), rooms.into_iter().collect(), Vec::new())
    }

    /// Live messages of `rooms` (each after its cursor), who types in them, and the presence
    /// of `presence_of` (at most 1000 users; `rooms` may then be empty).
    pub fn subscribe_with(
        &self,
        rooms: impl IntoIterator<Item = (String, u64)>,
        presence_of: impl IntoIterator<Item = String>,
    ) -> Subscription {
        Subscription::new(self.clone(), rooms.into_iter().collect(), presence_of.into_iter().collect())
    }

    /// The signed-in user is active now (`away` false: an activity ping; send one when they do
    /// something, about once a minute at most), or away while connected. `status_text`, when
    /// given, replaces their status text.
    pub async fn set_presence(&self, away: bool, status_text: Option<&str>) -> Result<(), ClientError> {
        let state = if away { pb::PresenceState::Idle } else { pb::PresenceState::Online };
        let kind = request::Kind::SetPresence(pb::SetPresence {
            state: state as i32,
            status_text: status_text.map(str::to_owned),
        });
        match self.call(kind).await? {
            response::Kind::Done(_) => Ok(()),
            other => Err(unexpected("set presence", other)),
        }
    }

    /// The signed-in user is typing in `room` (repeat every few seconds while they type), or
    /// stopped.
    pub async fn typing(&self, room: &str, typing: bool) -> Result<(), ClientError> {
        match self.call(request::Kind::Typing(pb::Typing { room: room.to_owned(), typing })).await? {
            response::Kind::Done(_) => Ok(()),
            other => Err(unexpected("typing", other)),
        }
    }

    /// Opens a raw subscription stream on the current connection (used by [`Subscription`]).
    async fn open_subscription(
        &self,
        cursors: &BTreeMap<String, u64>,
        presence_of: &[String],
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), ClientError> {
        let connection = self.connection().await?;
        let opened = async {
            let (mut send, recv) = connection.open_bi().await.map_err(|e| ClientError::lost(e, false))?;
            let rooms =
                cursors.iter().map(|(room, after)| pb::RoomCursor { room: room.clone(), after_seq: *after }).collect();
            let subscribe = pb::Subscribe { rooms, presence_of: presence_of.to_vec() };
            let request = pb::Request { kind: Some(request::Kind::Subscribe(subscribe)) };
            framing::write_message(&mut send, &request).await.map_err(|e| ClientError::lost(e, true))?;
            // The request is the whole of what a subscriber says (see PROTOCOL.md).
            let _ = send.finish();
            Ok::<_, ClientError>((send, recv))
        }
        .await;
        match opened {
            Ok((send, recv)) => Ok((connection, send, recv)),
            Err(e) => {
                self.drop_connection(&connection).await;
                Err(e)
            }
        }
    }
}

/// The client's send batcher: takes the first queued send, waits for a free slot, then takes
/// every other queued send (up to the batch limits) and sends them as one SendBatch per target
/// node (see [`routes`]). Ends when the client is dropped.
async fn send_batches(
    client: std::sync::Weak<Inner>,
    queue: tokio::sync::mpsc::Receiver<PendingSend>,
    slots: Arc<tokio::sync::Semaphore>,
) {
    // Each send is a length-delimited field of the request: its encoding plus a few bytes.
    let size = |p: &PendingSend| prost::Message::encoded_len(&p.send) + 8;
    dispatch_batches(queue, slots, MAX_SENDS_PER_BATCH, MAX_BATCH_BYTES, size, |batch, slot| {
        let Some(inner) = client.upgrade() else { return false };
        let client = Client { inner };
        tokio::spawn(async move { client.send_routed(batch, slot).await });
        true
    })
    .await
}

/// Closes direct connections to leaders that carried nothing for a while (they ping often, to
/// notice a dead node quickly: an idle client should not pay for that). Ends when the client
/// is dropped.
async fn close_unused_routes(client: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(routes::UNUSED_AFTER / 4).await;
        let Some(inner) = client.upgrade() else { return };
        inner.routes.lock().unwrap_or_else(|p| p.into_inner()).close_unused(Instant::now());
    }
}

/// How long a connection whose keep-alive goes out every `keep_alive` may receive nothing before
/// it is taken for dead (see [`call_on`]): two intervals, or one plus three round trips and
/// QUIC's ACK delay (25 ms) where round trips are long, because quinn's keep-alive timer
/// restarts when a packet arrives, so a live node's answer comes an interval plus a round trip
/// after the last one.
fn silent_limit(keep_alive: Duration, rtt: Duration) -> Duration {
    (2 * keep_alive).max(keep_alive + 3 * rtt + Duration::from_millis(25))
}

/// Resolves once `received` (a connection's count of datagrams received) has not moved for
/// `limit`, with how long it stood still; checked every quarter of `limit`.
async fn silence(received: impl Fn() -> u64, limit: Duration) -> Duration {
    let tick = limit / 4;
    let mut seen = received();
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = received();
        if now != seen {
            (seen, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= limit {
            return since.elapsed();
        }
    }
}

/// Resolves once `connection`, whose keep-alive goes out every `keep_alive`, has received
/// nothing for [`silent_limit`]: the node is taken for dead. Never resolves without a
/// keep-alive. Reads the connection's state only once polled, so a caller that races it against
/// a read that is usually ready (a busy subscription) pays nothing for it.
async fn connection_silent(connection: &quinn::Connection, keep_alive: Option<Duration>) -> Duration {
    match keep_alive.filter(|k| !k.is_zero()) {
        Some(k) => silence(|| connection.stats().udp_rx.datagrams, silent_limit(k, connection.rtt())).await,
        None => std::future::pending().await,
    }
}

fn unexpected(what: &str, reply: response::Kind) -> ClientError {
    ClientError::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}

/// Sends one request on its own stream and reads the one response.
///
/// With `keep_alive` (the connection's keep-alive interval), a connection that receives nothing
/// for [`silent_limit`] while the request is outstanding is taken for dead, without waiting for
/// its idle timeout: a live node acknowledges within a round trip and QUIC's ACK delay (25 ms)
/// however long the request itself takes, and the keep-alive makes it answer even when nothing
/// else is sent; a killed node answers nothing. A false alarm (a node stalled that long) costs a
/// failover and a retry with the same client_seq, which the dedup window makes harmless. Direct
/// connections to leaders pass `None`: their idle timeout (500 ms) is shorter anyway.
async fn call_on(
    connection: &quinn::Connection,
    kind: request::Kind,
    timeout: Duration,
    keep_alive: Option<Duration>,
) -> Result<response::Kind, ClientError> {
    let opened = std::sync::atomic::AtomicBool::new(false);
    let exchange = async {
        // Nothing has left before the stream is open; anything may have after the first write.
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| ClientError::lost(e, false))?;
        opened.store(true, Ordering::Relaxed);
        let request = pb::Request { kind: Some(kind) };
        framing::write_message(&mut send, &request).await.map_err(|e| ClientError::lost(e, true))?;
        let _ = send.finish();
        let response: Option<pb::Response> = framing::read_message(&mut recv, MAX_RESPONSE_FRAME).await?;
        response.ok_or_else(|| ClientError::lost("the server closed the stream without answering", true))
    };
    let exchange = async {
        tokio::select! {
            response = exchange => response,
            silent_for = connection_silent(connection, keep_alive) => Err(ClientError::lost(
                format!("the node sent nothing for {} ms with a request outstanding", silent_for.as_millis()),
                opened.load(Ordering::Relaxed),
            )),
        }
    };
    let response = tokio::time::timeout(timeout, exchange).await.map_err(|_| ClientError::TimedOut(timeout))??;
    match response.kind {
        Some(response::Kind::Error(e)) => Err(ClientError::from_wire(e)),
        Some(kind) => Ok(kind),
        None => Err(ClientError::Protocol("empty response".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_silence_limit_outlasts_a_keep_alive_answer() {
        let k = Duration::from_millis(500);
        assert_eq!(silent_limit(k, Duration::from_millis(1)), Duration::from_secs(1));
        // A keep-alive's answer comes an interval plus a round trip after the last packet.
        for rtt in [0, 50, 200, 475, 1000, 3000].map(Duration::from_millis) {
            assert!(silent_limit(k, rtt) > k + 2 * rtt, "{rtt:?}: {:?}", silent_limit(k, rtt));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_silent_only_once_nothing_arrives_for_the_limit() {
        let received = Arc::new(AtomicU64::new(0));
        let limit = Duration::from_millis(1000);
        // Datagrams every 600 ms (a keep-alive's answers): never silent.
        let ticker = {
            let received = received.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let start = tokio::time::Instant::now();
        let count = received.clone();
        let silent_for = silence(move || count.load(Ordering::Relaxed), limit).await;
        // The datagrams stop after 12 s; silence is noticed within a check (limit / 4) of the limit.
        assert!(ticker.is_finished());
        assert!(start.elapsed() >= Duration::from_millis(12_000 + 1000), "{:?}", start.elapsed());
        assert!(start.elapsed() <= Duration::from_millis(12_000 + 1250 + 250), "{:?}", start.elapsed());
        assert!(silent_for >= limit && silent_for <= limit + limit / 4, "{silent_for:?}");
    }

    #[test]
    fn failover_dials_round_robin_and_suspected_nodes_last() {
        assert_eq!(dial_order(3, 0, |_| false), vec![0, 1, 2]);
        assert_eq!(dial_order(3, 2, |_| false), vec![2, 0, 1]);
        assert_eq!(dial_order(3, 4, |_| false), vec![1, 2, 0]);
        // Node 1 was just lost and node 2 said it cannot help: node 0 first, then those two in
        // their round-robin order.
        assert_eq!(dial_order(3, 1, |i| i != 0), vec![0, 1, 2]);
        assert_eq!(dial_order(3, 2, |i| i == 2), vec![0, 1, 2]);
        assert_eq!(dial_order(4, 3, |i| i == 0), vec![3, 1, 2, 0]);
        assert!(dial_order(0, 5, |_| false).is_empty());
    }
}
