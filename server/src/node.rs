//! A running node: its database, its shard replicas, its peers, and the tasks that serve
//! clients and peers. Owns every task it starts and stops them in order on shutdown.
//!
//! Shutdown order (SIGTERM / ctrl-c): stop accepting clients and close subscriptions with a
//! reason; let in-flight requests finish (up to the grace period); close QUIC; stop the peer
//! server; shut down every shard's Raft; sync the WAL. kill -9 at any point loses nothing that
//! was acknowledged, because acknowledgements wait for the WAL sync on a majority.
//!
//! A shard replica whose Raft stops on its own (a storage error or a bug) stops the node the
//! same way, and chorusd exits with an error so that its supervisor restarts it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chorus_raft::network::{GrpcNetworkFactory, PeerClients};
use chorus_raft::{DbOptions, NodeDb, NodeId, ShardId, ShardReplica, start_shard};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::connections::Connections;
use crate::auth::oidc::ExternalVerifier;
use crate::cluster::ClusterLayout;
use crate::config::NodeConfig;
use crate::liveness::{self, Liveness};
use crate::rate_limit::RateLimiters;
use crate::{auth, bootstrap, front_door, peer, peer_tls, supervisor, tls};

/// Most unary client requests in flight on one node; beyond it, requests are refused as
/// `unavailable` rather than queued without bound.
pub const MAX_INFLIGHT_REQUESTS: usize = 8192;
/// Most live subscriptions (client streams and relays) on one node.
pub const MAX_SUBSCRIPTIONS: usize = 16384;
/// Request bytes (frames read, not yet answered) one node holds at once; a request waits for
/// its share before its body is read.
pub const MAX_REQUEST_BYTES_IN_FLIGHT: usize = 256 << 20;
/// The largest `SendBatch` frame, whatever `max_body_bytes` is.
pub const MAX_BATCH_FRAME_BYTES: usize = 4 << 20;

/// Everything the request handlers share.
pub struct Node {
    pub id: NodeId,
    pub config: NodeConfig,
    pub layout: ClusterLayout,
    pub db: Arc<NodeDb>,
    /// The replicas this node hosts (fixed for the life of the process).
    pub shards: BTreeMap<ShardId, ShardReplica>,
    pub peers: Arc<PeerClients>,
    /// Client addresses of the nodes, learned from their Hello.
    client_addrs: Mutex<BTreeMap<NodeId, String>>,
    /// Leaders of shards this node does not host, as last learned from their replicas.
    leader_hints: Mutex<HashMap<ShardId, NodeId>>,
    /// Cancelled first on shutdown: client connections, subscriptions.
    pub clients_shutdown: CancellationToken,
    /// Cancelled after client requests drained: the peer server and background tasks.
    pub peers_shutdown: CancellationToken,
    /// Client connection, stream and subscription tasks.
    pub client_tasks: TaskTracker,
    /// Bootstrap and directory tasks.
    pub background_tasks: TaskTracker,
    pub inflight: Arc<Semaphore>,
    pub subscriptions: Arc<Semaphore>,
    pub request_bytes: Arc<Semaphore>,
    pub fingerprint: String,
    pub batcher: crate::batcher::Batcher,
    pub liveness: Liveness,
    /// Shards whose writes are held while their leadership moves (see `balance`).
    pub holds: crate::balance::Holds,
    /// Signed-in client connections, for closing them when their session is revoked.
    pub connections: Connections,
    pub rate: RateLimiters,
    /// The external identity provider, if one is configured.
    pub external: Option<ExternalVerifier>,
    /// Presence and typing (ephemeral; see [`crate::presence`]).
    pub presence: crate::presence::PresenceHub,
    /// Cancelled when the node cannot go on (a shard's Raft stopped, a background task keeps
    /// failing): it then shuts down and the process exits with an error.
    failed: CancellationToken,
    started_at: std::time::Instant,
    /// Set when the node starts to stop: it hands its leaderships away and takes none.
    leaving: std::sync::atomic::AtomicBool,
}

/// Why a replica cannot serve a live feed (see [`Node::replica_lag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaLag {
    /// It has heard from no leader for this long.
    Silent(Duration),
    /// A leader had applied `goal` this long ago, and the replica is still at `applied`.
    Behind { applied: u64, goal: u64, behind: Duration },
}

impl std::fmt::Display for ReplicaLag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaLag::Silent(silent) => {
                write!(f, "has heard from no leader for {} ms (cut off from its peers?)", silent.as_millis())
            }
            ReplicaLag::Behind { applied, goal, behind } => write!(
                f,
                "has applied up to entry {applied}, behind its leader's {goal} for {} ms (not receiving entries?)",
                behind.as_millis()
            ),
        }
    }
}

impl Node {
    /// How long a replica, or the node, may go without hearing from its peers before it counts
    /// as cut off: twice the longest election timeout, so that an ordinary election (which
    /// ends within one) never does.
    pub fn contact_window(&self) -> Duration {
        Duration::from_millis(self.config.tuning.election_timeout_max_ms.saturating_mul(2))
    }

    /// True when this node has heard from less than a majority of the cluster's nodes within
    /// [`Node::contact_window`]: it is cut off, and clients are better served elsewhere.
    pub fn cut_off(&self) -> bool {
        let nodes: Vec<NodeId> = self.layout.nodes.keys().copied().collect();
        !liveness::quorum_alive(self, &nodes, self.contact_window())
    }

    /// Why this node's replica of `shard` cannot serve a live feed now, if it cannot: it has
    /// been out of contact with a leader for longer than [`Node::contact_window`], or it has
    /// stayed behind what a leader reported applied for that long (`None`: it follows, or the
    /// shard is not hosted here).
    ///
    /// A replica on a node that is [cut off](Node::cut_off) is out of contact (a minority may
    /// still hear a deposed leader); otherwise a leader is in contact while it hears from a
    /// majority of the shard's replicas, a follower while a peer claims to lead the shard (at
    /// any term: during an election the last claim counts) or it accepts entries. Contact is
    /// not enough: a replica whose entries or commit index do not reach it, or that cannot
    /// apply them, or a deposed leader that has not learnt it, hears claims and commits
    /// nothing. Either way its feeds would stall without a word.
    pub fn replica_lag(&self, shard: ShardId) -> Option<ReplicaLag> {
        let replica = self.shards.get(&shard)?;
        let window = self.contact_window();
        if self.cut_off() {
            return Some(ReplicaLag::Silent(window));
        }
        let (leading, applied) = {
            let m = replica.raft.metrics();
            let m = m.borrow();
            (m.state == openraft::ServerState::Leader, m.last_applied.map_or(0, |l| l.index))
        };
        let now = std::time::Instant::now();
        if let Some((goal, behind)) = self.liveness.behind(shard, applied, now)
            && behind > window
        {
            return Some(ReplicaLag::Behind { applied, goal, behind });
        }
        if leading {
            let replicas = self.layout.replicas(shard);
            return (!liveness::quorum_alive(self, &replicas, window)).then_some(ReplicaLag::Silent(window));
        }
        let heard = self.liveness.with_claims(|claimed| claimed(shard, 0)).unwrap_or(self.started_at);
        let silent = now.saturating_duration_since(heard.max(self.started_at));
        (silent > window).then_some(ReplicaLag::Silent(silent))
    }

    /// An error as a client receives it: an `unavailable` from a node that is cut off says to
    /// try another node.
    pub fn wire_error(&self, e: &crate::error::ServiceError) -> chorus_proto::client::Error {
        let mut wire = e.to_wire();
        if wire.code == "unavailable" && self.cut_off() {
            wire.try_elsewhere = true;
        }
        wire
    }

    /// The node is stopping: from now on it takes no shard leadership (no elections, no
    /// transfers to it) and hands its own away.
    pub fn leave(&self) {
        self.leaving.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the node because of `why` (see [`crate::supervisor`]).
    pub fn fail(&self, why: impl std::fmt::Display) {
        tracing::error!(reason = %why, "the node cannot go on; stopping it so that it restarts");
        self.failed.cancel();
    }

    pub fn client_addr_of(&self, node: NodeId) -> Option<String> {
        self.client_addrs.lock().unwrap_or_else(|p| p.into_inner()).get(&node).cloned()
    }

    pub fn client_addrs(&self) -> BTreeMap<NodeId, String> {
        self.client_addrs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn learn_client_addr(&self, node: NodeId, addr: String) {
        if !addr.is_empty() {
            self.client_addrs.lock().unwrap_or_else(|p| p.into_inner()).insert(node, addr);
        }
    }

    /// The leader of `shard` as this node knows it.
    pub fn leader_hint(&self, shard: ShardId) -> Option<NodeId> {
        if let Some(replica) = self.shards.get(&shard) {
            return replica.raft.metrics().borrow().current_leader;
        }
        self.leader_hints.lock().unwrap_or_else(|p| p.into_inner()).get(&shard).copied()
    }

    /// Where clients can reach the leaders of `shards` that this node knows of, leaving out
    /// shards it leads itself when `others_only`.
    pub fn shard_leaders(
        &self,
        shards: impl IntoIterator<Item = ShardId>,
        others_only: bool,
    ) -> Vec<chorus_proto::client::ShardLeader> {
        let addrs = self.client_addrs.lock().unwrap_or_else(|p| p.into_inner());
        shards
            .into_iter()
            .filter_map(|shard| {
                let leader = self.leader_hint(shard).filter(|&l| !(others_only && l == self.id))?;
                let client_addr = addrs.get(&leader)?.clone();
                Some(chorus_proto::client::ShardLeader { shard, node_id: leader, client_addr })
            })
            .collect()
    }

    pub fn remember_leader(&self, shard: ShardId, leader: Option<NodeId>) {
        if self.shards.contains_key(&shard) {
            return; // Raft keeps track for hosted shards.
        }
        let mut hints = self.leader_hints.lock().unwrap_or_else(|p| p.into_inner());
        match leader {
            Some(l) => hints.insert(shard, l),
            None => hints.remove(&shard),
        };
    }

    /// Waits for the next tick of `ticker` (see [`ticker`]); false once the node's peer side
    /// shuts down. For the node's background loops: `while node.next_tick(&mut t).await { .. }`.
    pub async fn next_tick(&self, ticker: &mut tokio::time::Interval) -> bool {
        tokio::select! {
            _ = self.peers_shutdown.cancelled() => false,
            _ = ticker.tick() => true,
        }
    }

    /// Largest request frame: a batch of sends, or one message body at the limit, plus room
    /// for the other fields.
    pub fn max_request_frame(&self) -> usize {
        self.config.limits.max_body_bytes.max(MAX_BATCH_FRAME_BYTES) + 64 * 1024
    }
}

/// A started node, until it is shut down.
pub struct RunningNode {
    pub node: Arc<Node>,
    quic: quinn::Endpoint,
    peer_server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// A ticker for the node's background loops: a late tick is delayed, not made up for.
pub fn ticker(period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// Opens the data dir, starts every hosted shard, the peer server and the client endpoint.
pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
    let layout = ClusterLayout::from_config(&config);
    let node_id = config.node_id;
    tracing::info!(
        cluster_id = %layout.cluster_id,
        nodes = layout.nodes.len(),
        shards = layout.shard_count,
        replication_factor = layout.replication_factor,
        data_dir = %config.data_dir.display(),
        "starting node"
    );
    let db = NodeDb::open(&config.data_dir, layout.identity(node_id), &DbOptions::default())
        .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;
    // The data dir holds secrets (the meta group's signing keys, password hashes, the first
    // admin's credential): only its owner may enter it.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", config.data_dir.display()))?;
    }
    let peer_tls = peer_tls::load(&config.peer_tls, &config.data_dir, node_id)
        .context("setting up mutual TLS with the other nodes")?;
    let external = match config.auth.oidc.clone() {
        Some(oidc) => Some(
            ExternalVerifier::new(oidc).await.map_err(anyhow::Error::msg).context("the external identity provider")?,
        ),
        None => None,
    };

    let advertised_host = config.advertise_client_addr.rsplit_once(':').map(|(h, _)| h).unwrap_or("localhost");
    let identity = tls::load_or_generate(config.tls.as_ref(), &config.data_dir, advertised_host)
        .context("setting up TLS for the client endpoint")?;
    let fingerprint = identity.fingerprint.clone();
    tracing::info!(%fingerprint, "client endpoint TLS certificate (SHA-256)");
    let web_crypto = tls::web_crypto(&identity)?;
    let crypto = tls::server_crypto(identity)?;

    let peer_ip = config.peer_addr.ip();
    let local_ip = (!peer_ip.is_unspecified()).then_some(peer_ip);
    let peers = Arc::new(
        PeerClients::new(
            node_id,
            &layout.cluster_id,
            &layout.nodes,
            local_ip,
            Duration::from_millis(500),
            Some(&peer_tls),
        )
        .context("setting up peer connections")?,
    );
    let mut shards = BTreeMap::new();
    for shard in layout.shards_of(node_id) {
        let network = GrpcNetworkFactory::new(shard, peers.clone());
        let replica = start_shard(node_id, shard, &db, &config.tuning, network)
            .instrument(tracing::info_span!("shard", shard))
            .await
            .with_context(|| format!("starting shard {shard}"))?;
        shards.insert(shard, replica);
    }
    tracing::info!(hosted = shards.len(), "shard replicas started");

    let mut client_addrs = BTreeMap::new();
    client_addrs.insert(node_id, config.advertise_client_addr.clone());
    let node = Arc::new(Node {
        id: node_id,
        layout,
        db,
        shards,
        peers,
        client_addrs: Mutex::new(client_addrs),
        leader_hints: Mutex::new(HashMap::new()),
        clients_shutdown: CancellationToken::new(),
        peers_shutdown: CancellationToken::new(),
        client_tasks: TaskTracker::new(),
        background_tasks: TaskTracker::new(),
        inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS)),
        subscriptions: Arc::new(Semaphore::new(MAX_SUBSCRIPTIONS)),
        request_bytes: Arc::new(Semaphore::new(MAX_REQUEST_BYTES_IN_FLIGHT)),
        fingerprint,
        batcher: Default::default(),
        liveness: Default::default(),
        holds: Default::default(),
        connections: Connections::default(),
        rate: RateLimiters::new(&config.rate_limits),
        external,
        presence: crate::presence::PresenceHub::new(node_id),
        config,
        failed: CancellationToken::new(),
        started_at: std::time::Instant::now(),
        leaving: Default::default(),
    });

    let peer_server = peer::serve(node.clone(), &peer_tls).await.context("starting the peer server")?;
    let quic = front_door::bind(&node, crypto).context("starting the QUIC client endpoint")?;
    node.client_tasks.spawn(front_door::serve(node.clone(), quic.clone()));
    if let Some(listener) = crate::web::bind(&node).await? {
        node.client_tasks.spawn(crate::web::serve(node.clone(), listener, web_crypto));
    }
    bootstrap::spawn(&node);
    supervisor::supervise(&node, "auth bootstrap", supervisor::Kind::Job, {
        let node = node.clone();
        move || {
            let node = node.clone();
            async move {
                auth::bootstrap::run(node).await;
                Ok(())
            }
        }
    });
    supervisor::service(&node, "revocation watch", auth::connections::watch_revocations);
    supervisor::service(&node, "rate limit cleanup", forget_idle_rates);
    if node.config.tuning.node_liveness {
        supervisor::service(&node, "liveness heartbeats", liveness::send_heartbeats);
        supervisor::service(&node, "leader watch", liveness::watch_leaders);
    }
    if node.config.leader_balance.is_some() {
        supervisor::service(&node, "leader balance", |node: Arc<Node>| async move {
            if let Some(every) = node.config.leader_balance {
                crate::balance::prefer_leaders(node, every).await;
            }
        });
    }
    supervisor::service(&node, "shard watch", watch_shards);
    supervisor::service(&node, "presence exchange", crate::presence::exchange_with_peers);
    if node.config.notify.is_some() {
        supervisor::service(&node, "notifications", crate::notify::deliver);
    }
    tracing::info!(
        client_addr = %node.config.client_addr,
        peer_addr = %node.config.peer_addr,
        web_addr = ?node.config.web_addr,
        "node is serving"
    );
    Ok(RunningNode { node, quic, peer_server })
}

/// Drops the rate limiters' state of quiet keys, and the registry's entries of closed
/// connections, now and then, so that both stay bounded.
async fn forget_idle_rates(node: Arc<Node>) {
    let mut ticker = ticker(Duration::from_secs(60));
    while node.next_tick(&mut ticker).await {
        node.rate.forget_idle();
        let signed_in = node.connections.count();
        tracing::debug!(signed_in, "signed-in client connections");
    }
}

/// Longest the shutdown waits for one shard's Raft to stop.
const SHARD_SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

/// How often [`watch_shards`] looks at the shards' Raft instances.
const SHARD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Stops the node when a shard's Raft stops on its own, or its snapshot-request task does: a
/// storage error or a bug stops openraft's core for good, and a node that stayed up with a
/// dead replica would answer nothing for that shard while its peers still count on it (one
/// without its snapshot requests would grow its log without bound). The node then stops (and
/// exits with an error), so that its supervisor restarts it. Ends on shutdown.
async fn watch_shards(node: Arc<Node>) {
    let mut ticker = ticker(SHARD_CHECK_EVERY);
    while node.next_tick(&mut ticker).await {
        // The metrics channel closes when the core's task ends.
        let stopped: Vec<ShardId> = node
            .shards
            .iter()
            .filter(|(_, replica)| replica.raft.metrics().has_changed().is_err())
            .map(|(&shard, _)| shard)
            .collect();
        let no_snapshots: Vec<ShardId> =
            node.shards.iter().filter(|(_, r)| r.snapshot_requests_stopped()).map(|(&s, _)| s).collect();
        if (stopped.is_empty() && no_snapshots.is_empty()) || node.peers_shutdown.is_cancelled() {
            continue;
        }
        for &shard in &stopped {
            let reason = replica_failure(&node, shard).await;
            tracing::error!(shard, %reason, "shard replica stopped");
        }
        for &shard in &no_snapshots {
            tracing::error!(shard, "the shard's snapshot-request task stopped");
        }
        node.fail(format!("shard replicas stopped: {stopped:?}; snapshot requests stopped: {no_snapshots:?}"));
        return;
    }
}

/// What a stopped shard's Raft says when asked.
async fn replica_failure(node: &Node, shard: ShardId) -> String {
    let Some(replica) = node.shards.get(&shard) else { return "unknown shard".into() };
    match replica.raft.with_raft_state(|_| ()).await {
        Err(fatal) => fatal.to_string(),
        Ok(()) => "its state channel closed".into(),
    }
}

impl RunningNode {
    /// Resolves when the node cannot go on (a shard replica stopped); it should then be shut
    /// down and the process exit with an error.
    pub async fn failed(&self) {
        self.node.failed.cancelled().await
    }

    /// Stops the node in order (see the module docs).
    pub async fn shutdown(self) {
        let failed = self.node.failed.is_cancelled();
        let node = self.node;
        let grace = node.config.shutdown_grace;
        // Leadership first, while everything still serves: writes held meanwhile go to the new
        // leaders, and the stop costs no election timeout.
        node.leave();
        if !failed {
            let (handed, led) = crate::balance::hand_off_all(&node).await;
            if led > 0 {
                tracing::info!(handed, led, "handed shard leaderships over");
            }
        }
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: draining client requests");
        node.clients_shutdown.cancel();
        node.client_tasks.close();
        if tokio::time::timeout(grace, node.client_tasks.wait()).await.is_err() {
            tracing::warn!("client requests still running after the grace period; closing anyway");
        }
        self.quic.close(front_door::close_codes::SHUTTING_DOWN.into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.quic.wait_idle()).await;

        node.peers_shutdown.cancel();
        node.background_tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), node.background_tasks.wait()).await;
        match tokio::time::timeout(Duration::from_secs(2), self.peer_server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "peer server stopped with an error"),
            Err(_) => tracing::warn!("peer server did not stop in time"),
            _ => {}
        }
        for (shard, replica) in &node.shards {
            // A core busy with a long snapshot install (or stuck) must not hold up the exit:
            // everything acknowledged is durable already.
            match tokio::time::timeout(SHARD_SHUTDOWN_LIMIT, replica.raft.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(shard, error = %e, "shard did not shut down cleanly"),
                Err(_) => tracing::warn!(shard, "shard did not shut down in time; leaving it"),
            }
        }
        node.peers.stop_streams();
        if let Err(e) = node.db.sync_wal() {
            tracing::error!(error = %e, "final WAL sync failed");
        }
        tracing::info!("node stopped");
    }
}
