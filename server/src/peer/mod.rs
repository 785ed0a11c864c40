//! The gRPC service other nodes call: Raft RPCs for the shards this node hosts, forwarded
//! client requests, relayed subscriptions, status and bootstrap probes.
//!
//! Peers authenticate each other with mutual TLS (see `peer_tls`). Requests from another
//! cluster (a different `chorus-cluster-id` header), or whose certificate does not name the
//! node they say they come from (`chorus-node-id`), are refused before they reach any handler.
//! Because peers are authenticated, the users named in forwarded commands, reads and feeds
//! (`actor`, `viewer`) are those the forwarding node verified.

use std::sync::Arc;

use chorus_proto::client;
use chorus_proto::peer::peer_server::{Peer, PeerServer};
use chorus_proto::peer::{self as pb};
use chorus_raft::network::{CLUSTER_ID_HEADER, MAX_PEER_MESSAGE_BYTES, NODE_ID_HEADER, service as raft_rpc};
use chorus_raft::{ChorusRaft, ShardId};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::ServiceError;
use crate::node::Node;
use crate::{forward, status, subscription};

pub struct PeerService {
    node: Arc<Node>,
}

/// The Raft of `shard`, or why this node cannot serve it.
fn hosted(node: &Node, shard: ShardId) -> Result<&ChorusRaft, String> {
    node.shards.get(&shard).map(|r| &r.raft).ok_or_else(|| format!("shard {shard} is not hosted on node {}", node.id))
}

/// One shard's AppendEntries; an accepted one tells liveness that the shard has a leader.
async fn append_entries_of(node: &Node, request: pb::AppendEntriesRequest) -> pb::AppendEntriesReply {
    use pb::append_entries_reply::Result as R;
    let shard = request.shard;
    let reply = match hosted(node, shard) {
        Ok(raft) => raft_rpc::append_entries(raft, request).await,
        Err(e) => return pb::AppendEntriesReply { result: Some(R::Failure(failure(e))) },
    };
    if let Some(R::Success(_) | R::PartialSuccess(_) | R::Conflict(_)) = &reply.result {
        node.liveness.appended(shard, std::time::Instant::now());
    }
    reply
}

/// Reply frames handed to the HTTP/2 stream and not yet written.
const REPLY_FRAMES_BUFFERED: usize = 16;

/// Serves one peer's replication stream until it ends or the node stops: every request is
/// handed to its shard at once (shards proceed independently), and the replies that are ready
/// leave together in one frame.
async fn serve_replication(
    node: Arc<Node>,
    mut requests: tonic::Streaming<pb::ReplicateFrame>,
    replies: mpsc::Sender<Result<pb::ReplicateReplyFrame, Status>>,
) {
    let mut running = futures::stream::FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            _ = node.peers_shutdown.cancelled() => return,
            frame = requests.message(), if open => match frame {
                Ok(Some(frame)) => {
                    for tagged in frame.requests {
                        let node = node.clone();
                        running.push(async move {
                            let reply = match tagged.request {
                                Some(request) => append_entries_of(&node, request).await,
                                None => pb::AppendEntriesReply {
                                    result: Some(pb::append_entries_reply::Result::Failure(failure(
                                        "a replication frame entry without a request".into(),
                                    ))),
                                },
                            };
                            pb::TaggedAppendEntriesReply { id: tagged.id, reply: Some(reply) }
                        });
                    }
                }
                Ok(None) => open = false,
                Err(status) => {
                    tracing::debug!(error = %status, "replication stream from a peer failed");
                    return;
                }
            },
            Some(first) = running.next(), if !running.is_empty() => {
                let mut ready = vec![first];
                while let Some(Some(reply)) = futures::FutureExt::now_or_never(running.next()) {
                    ready.push(reply);
                }
                let frame = Ok(pb::ReplicateReplyFrame { replies: ready });
                tokio::select! {
                    _ = node.peers_shutdown.cancelled() => return,
                    sent = replies.send(frame) => if sent.is_err() { return },
                }
            }
        }
        if !open && running.is_empty() {
            return;
        }
    }
}

fn failure(message: String) -> pb::RemoteFailure {
    pb::RemoteFailure { message }
}

type ReplicateStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ReplicateReplyFrame, Status>> + Send>>;
type SubscribeStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SubscribeEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    async fn hello(&self, _request: Request<pb::HelloRequest>) -> Result<Response<pb::HelloReply>, Status> {
        Ok(Response::new(pb::HelloReply {
            node_id: self.node.id,
            cluster_id: self.node.layout.cluster_id.clone(),
            client_addr: self.node.config.advertise_client_addr.clone(),
        }))
    }

    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesReply>, Status> {
        Ok(Response::new(append_entries_of(&self.node, request.into_inner()).await))
    }

    async fn append_entries_batch(
        &self,
        request: Request<pb::AppendEntriesBatchRequest>,
    ) -> Result<Response<pb::AppendEntriesBatchReply>, Status> {
        let requests = request.into_inner().requests;
        let replies = futures::future::join_all(requests.into_iter().map(|r| append_entries_of(&self.node, r))).await;
        Ok(Response::new(pb::AppendEntriesBatchReply { replies }))
    }

    type ReplicateStream = ReplicateStream;

    async fn replicate(
        &self,
        request: Request<tonic::Streaming<pb::ReplicateFrame>>,
    ) -> Result<Response<ReplicateStream>, Status> {
        let (tx, rx) = mpsc::channel(REPLY_FRAMES_BUFFERED);
        self.node.background_tasks.spawn(serve_replication(self.node.clone(), request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn vote(&self, request: Request<pb::VoteRequest>) -> Result<Response<pb::VoteReply>, Status> {
        let request = request.into_inner();
        let reply = match hosted(&self.node, request.shard) {
            Ok(raft) => raft_rpc::vote(raft, request).await,
            Err(e) => pb::VoteReply { result: Some(pb::vote_reply::Result::Failure(failure(e))) },
        };
        Ok(Response::new(reply))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotReply>, Status> {
        let request = request.into_inner();
        let reply = match hosted(&self.node, request.shard) {
            Ok(raft) => raft_rpc::install_snapshot(raft, request).await,
            Err(e) => {
                pb::InstallSnapshotReply { result: Some(pb::install_snapshot_reply::Result::Failure(failure(e))) }
            }
        };
        Ok(Response::new(reply))
    }

    async fn node_heartbeat(
        &self,
        request: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatReply>, Status> {
        Ok(Response::new(crate::liveness::serve_heartbeat(&self.node, request.into_inner())))
    }

    async fn exchange_presence(
        &self,
        request: Request<pb::PresenceExchange>,
    ) -> Result<Response<pb::PresenceExchange>, Status> {
        // The interceptor checked the caller's certificate against this header.
        let caller: Option<chorus_raft::NodeId> =
            request.metadata().get(NODE_ID_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let exchange = request.into_inner();
        if caller != Some(exchange.from_node) {
            return Err(Status::permission_denied(format!(
                "presence of node {} sent by node {caller:?}: a node speaks only for itself",
                exchange.from_node
            )));
        }
        Ok(Response::new(self.node.presence.receive(exchange)))
    }

    async fn propose(&self, request: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        Ok(Response::new(forward::serve_forwarded_propose(&self.node, request.into_inner()).await))
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        Ok(Response::new(forward::serve_forwarded_read(&self.node, request.into_inner()).await))
    }

    async fn read_index(&self, request: Request<pb::ReadIndexRequest>) -> Result<Response<pb::ReadIndexReply>, Status> {
        Ok(Response::new(forward::serve_read_index(&self.node, request.into_inner()).await))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(&self, request: Request<pb::SubscribeRequest>) -> Result<Response<SubscribeStream>, Status> {
        let request = request.into_inner();
        let cursor = request.cursor.ok_or_else(|| Status::invalid_argument("Subscribe without a cursor"))?;
        crate::requests::subscribe::validate_cursor(&cursor).map_err(|e| Status::invalid_argument(e.to_string()))?;
        chorus_raft::limits::validate_user_name(&request.viewer)
            .map_err(|e| Status::invalid_argument(format!("Subscribe for no valid user: {e}")))?;
        let replica = self
            .node
            .shards
            .get(&request.shard)
            .ok_or_else(|| Status::failed_precondition(format!("shard {} is not hosted here", request.shard)))?;
        let permit = self
            .node
            .subscriptions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many subscriptions on this node"))?;
        let (tx, rx) = subscription::Outbox::new();
        let shard = replica.shard;
        let node = self.node.clone();
        let cancel = self.node.clients_shutdown.child_token();
        let subscribed = client::Event {
            kind: Some(client::event::Kind::Subscribed(client::Subscribed { rooms: vec![cursor.clone()] })),
        };
        // The channel is empty: this cannot block.
        let _ = tx.try_send_first(subscribed);
        self.node.client_tasks.spawn(async move {
            let _permit = permit;
            let out = tx.clone();
            let feed = subscription::follow_local(
                &node,
                shard,
                cursor.room,
                request.viewer,
                cursor.after_seq,
                tx,
                cancel.clone(),
            );
            let result = feed.await;
            let last = match result {
                Err(e) => Some(e.to_event(None)),
                Ok(()) if cancel.is_cancelled() => Some(ServiceError::ShuttingDown.to_event(None)),
                Ok(()) => None,
            };
            if let Some(event) = last {
                let _ = out.send(event).await;
            }
        });
        let stream =
            ReceiverStream::new(rx).map(|queued| Ok(pb::SubscribeEvent { event: Some(queued.event.into_event()) }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn node_status(
        &self,
        _request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusReply>, Status> {
        Ok(Response::new(status::local_status(&self.node)))
    }

    async fn shard_probe(
        &self,
        request: Request<pb::ShardProbeRequest>,
    ) -> Result<Response<pb::ShardProbeReply>, Status> {
        let shard = request.into_inner().shard;
        let reply = match self.node.shards.get(&shard) {
            None => pb::ShardProbeReply { hosted: false, has_state: false },
            Some(replica) => {
                pb::ShardProbeReply { hosted: true, has_state: crate::bootstrap::has_raft_state(&replica.raft) }
            }
        };
        Ok(Response::new(reply))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        Ok(Response::new(crate::balance::serve_transfer(&self.node, request.into_inner()).await))
    }

    async fn take_leadership(
        &self,
        request: Request<pb::TakeLeadershipRequest>,
    ) -> Result<Response<pb::TakeLeadershipReply>, Status> {
        Ok(Response::new(crate::balance::serve_take_leadership(&self.node, request.into_inner()).await))
    }
}

/// Refuses requests from nodes of another cluster, and from callers whose certificate does not
/// name the node they say they are.
#[derive(Clone)]
struct PeerAuth {
    cluster_id: String,
    nodes: std::collections::BTreeSet<chorus_raft::NodeId>,
}

impl tonic::service::Interceptor for PeerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let theirs = request.metadata().get(CLUSTER_ID_HEADER).and_then(|v| v.to_str().ok());
        if theirs != Some(self.cluster_id.as_str()) {
            return Err(Status::permission_denied(format!(
                "request from cluster {:?}, but this node belongs to cluster {:?}: check --initial-cluster, \
                 --cluster-token, --shard-count and --replication-factor on every node",
                theirs.unwrap_or("<none>"),
                self.cluster_id
            )));
        }
        let node: Option<chorus_raft::NodeId> =
            request.metadata().get(NODE_ID_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        let Some(node) = node.filter(|n| self.nodes.contains(n)) else {
            return Err(Status::permission_denied("request from no node of this cluster (chorus-node-id)"));
        };
        let certs = request.peer_certs();
        let Some(cert) = certs.as_ref().and_then(|c| c.first()) else {
            return Err(Status::unauthenticated("peers must present their certificate (mutual TLS)"));
        };
        if !crate::peer_tls::names_node(cert, node) {
            return Err(Status::permission_denied(format!(
                "the caller says it is node {node}, but its certificate is not node {node}'s"
            )));
        }
        Ok(request)
    }
}

/// Binds the peer address and serves until the node's peer shutdown.
pub async fn serve(
    node: Arc<Node>,
    tls: &crate::peer_tls::PeerTls,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let listener = tokio::net::TcpListener::bind(node.config.peer_addr).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let interceptor =
        PeerAuth { cluster_id: node.layout.cluster_id.clone(), nodes: node.layout.nodes.keys().copied().collect() };
    let service = PeerServer::new(PeerService { node: node.clone() })
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES + (1 << 20))
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES + (1 << 20));
    let service = tonic::service::interceptor::InterceptedService::new(service, interceptor);
    let shutdown = node.peers_shutdown.clone();
    let builder = tonic::transport::Server::builder().tls_config(crate::peer_tls::server_config(tls))?;
    Ok(tokio::spawn(async move {
        builder
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
    }))
}
