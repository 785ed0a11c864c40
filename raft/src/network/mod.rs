//! The Raft network between nodes, over gRPC (tonic): one HTTP/2 connection per peer pair,
//! shared by every shard (each message names its shard).
//!
//! - [`PeerClients`]: the gRPC client of every other node, stamped with our cluster id.
//! - [`GrpcNetworkFactory`]: openraft's network for one shard, over those clients.
//! - [`service`]: the receiving side, which hands Raft RPCs to the local shard.
//!
//! Every RPC has a timeout (openraft's per-RPC TTL), so an unreachable peer costs its own
//! replication task some waiting and nothing else: each target is replicated by its own task.

// openraft's RPCError is large; its size is openraft's API, not ours to box.
#![allow(clippy::result_large_err)]

pub mod convert;
pub mod service;
pub mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_proto::peer::{self as pb, peer_client::PeerClient as RawPeerClient};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, SnapshotMismatch, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{SnapshotId, SnapshotSegmentId};
use prost::Message;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::codec;
use crate::types::{NodeAddr, NodeId, ShardId, TypeConfig};
use stream::ReplicationStream;

/// The metadata header carrying the sender's cluster id on every peer request.
pub const CLUSTER_ID_HEADER: &str = "chorus-cluster-id";
/// The metadata header carrying the sender's node id on every peer request.
pub const NODE_ID_HEADER: &str = "chorus-node-id";

/// Largest peer message, in bytes. AppendEntries batches above it are split (openraft retries
/// with fewer entries); protocol limits keep any single entry far below it.
pub const MAX_PEER_MESSAGE_BYTES: usize = 48 << 20;

/// Adds our cluster and node id to every outgoing peer request.
#[derive(Clone)]
pub struct IdentityInterceptor {
    cluster_id: AsciiMetadataValue,
    node_id: AsciiMetadataValue,
}

impl Interceptor for IdentityInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        request.metadata_mut().insert(CLUSTER_ID_HEADER, self.cluster_id.clone());
        request.metadata_mut().insert(NODE_ID_HEADER, self.node_id.clone());
        Ok(request)
    }
}

pub type PeerClient = RawPeerClient<InterceptedService<Channel, IdentityInterceptor>>;

/// AppendEntries up to this size go on the peer's replication stream; larger ones (catch-up
/// batches) as RPCs of their own, so that they never hold up the small ones behind them.
const STREAMED_BYTES: usize = 256 << 10;

/// Why the peer clients could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PeerSetupError {
    #[error("invalid peer address {addr:?} of node {node}: {reason}")]
    BadAddress { node: NodeId, addr: String, reason: String },
    #[error("cluster id {0:?} cannot be sent as a header")]
    BadClusterId(String),
}

/// This node's mutual-TLS material with its peers (PEM): the cluster CA, which every peer's
/// certificate must be issued by, and this node's own certificate and key.
#[derive(Clone)]
pub struct PeerTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Never prints the key.
impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls { .. }")
    }
}

/// The name a node's peer certificate is issued for: a peer's certificate must name the node
/// that was dialled.
pub fn peer_name(node: NodeId) -> String {
    format!("node-{node}.chorus")
}

/// A gRPC client for every other node. Connections are made lazily and re-made after failures.
pub struct PeerClients {
    self_id: NodeId,
    clients: BTreeMap<NodeId, (String, PeerClient)>,
    streams: BTreeMap<NodeId, ReplicationStream>,
}

impl PeerClients {
    /// `peers` maps node ids to their peer addresses (`host:port`); our own entry is skipped.
    /// Connections leave from `local_ip` when given (the address this node's peer endpoint
    /// listens on), so that peers, and packet filters, see where they come from. Starts the
    /// replication stream of each peer, so must be called inside a tokio runtime.
    /// With `tls`, peers are called over mutual TLS (`https`), each expected to present a
    /// certificate of the cluster CA naming it ([`peer_name`]); without, in plaintext (tests of
    /// this crate only: chorusd always authenticates its peers).
    pub fn new(
        self_id: NodeId,
        cluster_id: &str,
        peers: &BTreeMap<NodeId, String>,
        local_ip: Option<std::net::IpAddr>,
        connect_timeout: Duration,
        tls: Option<&PeerTls>,
    ) -> Result<PeerClients, PeerSetupError> {
        let cluster_id: AsciiMetadataValue =
            MetadataValue::try_from(cluster_id).map_err(|_| PeerSetupError::BadClusterId(cluster_id.to_owned()))?;
        let node_id: AsciiMetadataValue = MetadataValue::from(self_id);
        let interceptor = IdentityInterceptor { cluster_id, node_id };
        let mut clients = BTreeMap::new();
        for (&id, addr) in peers {
            if id == self_id {
                continue;
            }
            let bad = |reason: String| PeerSetupError::BadAddress { node: id, addr: addr.clone(), reason };
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| bad(e.to_string()))?;
            if let Some(tls) = tls {
                let config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&tls.ca_pem))
                    .identity(tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem))
                    .domain_name(peer_name(id));
                endpoint = endpoint.tls_config(config).map_err(|e| bad(format!("TLS: {e}")))?;
            }
            let endpoint = endpoint
                .connect_timeout(connect_timeout)
                .local_address(local_ip)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            let channel = endpoint.connect_lazy();
            let client = RawPeerClient::with_interceptor(channel, interceptor.clone())
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES + (1 << 20))
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES + (1 << 20));
            clients.insert(id, (addr.clone(), client));
        }
        let streams = clients
            .iter()
            .map(|(id, (_, client))| (*id, ReplicationStream::start(client.clone(), connect_timeout)))
            .collect();
        Ok(PeerClients { self_id, clients, streams })
    }

    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    /// The client of `node`, or `None` for ourselves (never route a node's RPC to itself) and
    /// for unknown nodes.
    pub fn get(&self, node: NodeId) -> Option<PeerClient> {
        self.clients.get(&node).map(|(_, c)| c.clone())
    }

    pub fn addr(&self, node: NodeId) -> Option<&str> {
        self.clients.get(&node).map(|(a, _)| a.as_str())
    }

    /// Stops the replication streams (node shutdown, once the shards have stopped).
    pub fn stop_streams(&self) {
        self.streams.values().for_each(ReplicationStream::stop);
    }

    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.clients.keys().copied()
    }
}

/// openraft's network for one shard.
#[derive(Clone)]
pub struct GrpcNetworkFactory {
    shard: ShardId,
    peers: Arc<PeerClients>,
}

impl GrpcNetworkFactory {
    pub fn new(shard: ShardId, peers: Arc<PeerClients>) -> Self {
        GrpcNetworkFactory { shard, peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, _node: &NodeAddr) -> GrpcConnection {
        GrpcConnection {
            shard: self.shard,
            from: self.peers.self_id(),
            target,
            client: self.peers.get(target),
            peers: self.peers.clone(),
        }
    }
}

/// One shard's Raft RPCs to one target node.
pub struct GrpcConnection {
    shard: ShardId,
    from: NodeId,
    target: NodeId,
    client: Option<PeerClient>,
    peers: Arc<PeerClients>,
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>>;

fn unreachable<E: std::error::Error>(msg: String) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(msg)))
}

impl GrpcConnection {
    fn client<E: std::error::Error>(&self) -> Result<PeerClient, RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>> {
        self.client.clone().ok_or_else(|| {
            unreachable(format!("no route from node {} to node {} (shard {})", self.from, self.target, self.shard))
        })
    }

    /// Maps a transport failure: a refused or broken connection is "unreachable" (openraft backs
    /// off), an expired deadline a timeout, anything else a network error.
    fn status_error<E: std::error::Error>(
        &self,
        action: RPCTypes,
        ttl: Duration,
        status: tonic::Status,
    ) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
        match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                RPCError::Timeout(Timeout { action, id: self.from, target: self.target, timeout: ttl })
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        }
    }

    fn append_reply(&self, reply: pb::AppendEntriesReply) -> RpcResult<AppendEntriesResponse<NodeId>> {
        use pb::append_entries_reply::Result as R;
        match reply.result {
            Some(R::Success(_)) => Ok(AppendEntriesResponse::Success),
            Some(R::PartialSuccess(p)) => {
                Ok(AppendEntriesResponse::PartialSuccess(p.matching.as_ref().map(codec::log_id_from_pb)))
            }
            Some(R::Conflict(_)) => Ok(AppendEntriesResponse::Conflict),
            Some(R::HigherVote(v)) => Ok(AppendEntriesResponse::HigherVote(codec::vote_from_pb(&v))),
            Some(R::Failure(f)) => Err(unreachable(format!("node {}: {}", self.target, f.message))),
            None => Err(malformed("AppendEntries")),
        }
    }

    fn timeout<E: std::error::Error>(
        &self,
        action: RPCTypes,
        ttl: Duration,
    ) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
        RPCError::Timeout(Timeout { action, id: self.from, target: self.target, timeout: ttl })
    }
}

fn with_timeout<T>(message: T, ttl: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(ttl);
    request
}

fn malformed<E: std::error::Error>(what: &str) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(format!("malformed {what} reply"))))
}

impl RaftNetwork<TypeConfig> for GrpcConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let request = convert::append_request_to_pb(self.shard, &rpc);
        // Walks every entry: computed once per request.
        let encoded_len = request.encoded_len();
        if encoded_len > MAX_PEER_MESSAGE_BYTES && request.entries.len() > 1 {
            // Tell openraft how many entries fit; it resends fewer.
            let mut size = 0;
            let fits = request.entries.iter().take_while(|e| {
                size += e.encoded_len() + 8;
                size <= MAX_PEER_MESSAGE_BYTES
            });
            let hint = fits.count().max(1) as u64;
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
        }
        let ttl = option.hard_ttl();
        let request = match self.peers.streams.get(&self.target) {
            Some(stream) if encoded_len <= STREAMED_BYTES => {
                match tokio::time::timeout(ttl, stream.call(request, encoded_len)).await {
                    Err(_) => return Err(self.timeout(RPCTypes::AppendEntries, ttl)),
                    // A peer of an earlier version has no replication stream: call it unary.
                    Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                        convert::append_request_to_pb(self.shard, &rpc)
                    }
                    Ok(reply) => {
                        return self
                            .append_reply(reply.map_err(|s| self.status_error(RPCTypes::AppendEntries, ttl, s))?);
                    }
                }
            }
            _ => request,
        };
        let mut client = self.client()?;
        let reply = tokio::time::timeout(ttl, client.append_entries(with_timeout(request, ttl)))
            .await
            .map_err(|_| self.timeout(RPCTypes::AppendEntries, ttl))?
            .map_err(|s| self.status_error(RPCTypes::AppendEntries, ttl, s))?
            .into_inner();
        self.append_reply(reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let mut client = self.client()?;
        let ttl = option.hard_ttl();
        let request = convert::install_request_to_pb(self.shard, rpc);
        let reply = tokio::time::timeout(ttl, client.install_snapshot(with_timeout(request, ttl)))
            .await
            .map_err(|_| self.timeout(RPCTypes::InstallSnapshot, ttl))?
            .map_err(|s| self.status_error(RPCTypes::InstallSnapshot, ttl, s))?
            .into_inner();
        use pb::install_snapshot_reply::Result as R;
        match reply.result {
            Some(R::Vote(v)) => Ok(InstallSnapshotResponse { vote: codec::vote_from_pb(&v) }),
            Some(R::Mismatch(m)) => {
                let segment = |id: String, offset| SnapshotSegmentId { id: SnapshotId::from(id), offset };
                let mismatch = SnapshotMismatch {
                    expect: segment(m.expect_id, m.expect_offset),
                    got: segment(m.got_id, m.got_offset),
                };
                Err(RPCError::RemoteError(RemoteError::new(
                    self.target,
                    RaftError::APIError(InstallSnapshotError::SnapshotMismatch(mismatch)),
                )))
            }
            Some(R::Failure(f)) => Err(unreachable(format!("node {}: {}", self.target, f.message))),
            None => Err(malformed("InstallSnapshot")),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> RpcResult<VoteResponse<NodeId>> {
        let mut client = self.client()?;
        let ttl = option.hard_ttl();
        let request = convert::vote_request_to_pb(self.shard, &rpc);
        let reply = tokio::time::timeout(ttl, client.vote(with_timeout(request, ttl)))
            .await
            .map_err(|_| self.timeout(RPCTypes::Vote, ttl))?
            .map_err(|s| self.status_error(RPCTypes::Vote, ttl, s))?
            .into_inner();
        use pb::vote_reply::Result as R;
        match reply.result {
            Some(R::Response(r)) => convert::vote_response_from_pb(&r).map_err(|_| malformed("Vote")),
            Some(R::Failure(f)) => Err(unreachable(format!("node {}: {}", self.target, f.message))),
            None => Err(malformed("Vote")),
        }
    }
}
