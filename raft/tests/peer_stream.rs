//! The Raft network's choice of path for AppendEntries, against a peer served in-process: small
//! requests go on the replication stream, large ones as unary calls, and a peer without the
//! stream (an earlier version) is called unary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chorus_proto::peer::peer_server::{Peer, PeerServer};
use chorus_proto::peer::{self as pb};
use chorus_proto::storage::{Command, Op};
use chorus_raft::network::{GrpcNetworkFactory, PeerClients};
use chorus_raft::state_machine::append_op;
use chorus_raft::{Entry, NodeAddr, TypeConfig};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

/// A peer that accepts every AppendEntries and counts how each arrived. Without `streams` it
/// answers `Replicate` as a node of an earlier version would: unimplemented.
#[derive(Clone, Default)]
struct CountingPeer {
    streams: bool,
    unary: Arc<AtomicUsize>,
    streamed: Arc<AtomicUsize>,
}

fn success() -> pb::AppendEntriesReply {
    pb::AppendEntriesReply { result: Some(pb::append_entries_reply::Result::Success(pb::Empty {})) }
}

type Stream<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for CountingPeer {
    async fn hello(&self, _: Request<pb::HelloRequest>) -> Result<Response<pb::HelloReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn append_entries(
        &self,
        _: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesReply>, Status> {
        self.unary.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(success()))
    }

    type ReplicateStream = Stream<pb::ReplicateReplyFrame>;

    async fn replicate(
        &self,
        request: Request<tonic::Streaming<pb::ReplicateFrame>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        if !self.streams {
            return Err(Status::unimplemented("no Replicate in this version"));
        }
        let streamed = self.streamed.clone();
        let replies = request.into_inner().map(move |frame| {
            let frame = frame?;
            streamed.fetch_add(frame.requests.len(), Ordering::SeqCst);
            let replies = frame
                .requests
                .iter()
                .map(|t| pb::TaggedAppendEntriesReply { id: t.id, reply: Some(success()) })
                .collect();
            Ok(pb::ReplicateReplyFrame { replies })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn append_entries_batch(
        &self,
        _: Request<pb::AppendEntriesBatchRequest>,
    ) -> Result<Response<pb::AppendEntriesBatchReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn vote(&self, _: Request<pb::VoteRequest>) -> Result<Response<pb::VoteReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn install_snapshot(
        &self,
        _: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn propose(&self, _: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn read(&self, _: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn read_index(&self, _: Request<pb::ReadIndexRequest>) -> Result<Response<pb::ReadIndexReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    type SubscribeStream = Stream<pb::SubscribeEvent>;

    async fn subscribe(&self, _: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn node_status(&self, _: Request<pb::NodeStatusRequest>) -> Result<Response<pb::NodeStatusReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn shard_probe(&self, _: Request<pb::ShardProbeRequest>) -> Result<Response<pb::ShardProbeReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn node_heartbeat(
        &self,
        _: Request<pb::NodeHeartbeatRequest>,
    ) -> Result<Response<pb::NodeHeartbeatReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn transfer_leader(
        &self,
        _: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn take_leadership(
        &self,
        _: Request<pb::TakeLeadershipRequest>,
    ) -> Result<Response<pb::TakeLeadershipReply>, Status> {
        Err(Status::unimplemented("test peer"))
    }

    async fn exchange_presence(
        &self,
        _: Request<pb::PresenceExchange>,
    ) -> Result<Response<pb::PresenceExchange>, Status> {
        Err(Status::unimplemented("test peer"))
    }
}

async fn serve(peer: CountingPeer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(PeerServer::new(peer)).serve_with_incoming(incoming));
    addr
}

/// An AppendEntries from node 1 to node 2 of shard 0, carrying one entry whose message body
/// has `body_bytes` bytes (none: no entry, a heartbeat).
fn request(body_bytes: Option<usize>) -> AppendEntriesRequest<TypeConfig> {
    let entries = body_bytes.map(|n| {
        let op = append_op("room", "alice", b"client", 1, Bytes::from(vec![b'x'; n]));
        let cmd = Command {
            ts_ms: 1,
            ops: vec![Op { kind: Some(op) }],
            rules: chorus_raft::state_machine::CURRENT_RULES,
            notify_after_ms: 0,
        };
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), 1), payload: EntryPayload::Normal(cmd.into()) }
    });
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        entries: entries.into_iter().collect(),
        leader_commit: None,
    }
}

async fn connect(addr: SocketAddr) -> impl RaftNetwork<TypeConfig> {
    let peers = BTreeMap::from([(1, "127.0.0.1:1".to_owned()), (2, addr.to_string())]);
    let clients = PeerClients::new(1, "test-cluster", &peers, None, Duration::from_secs(2), None).unwrap();
    let mut factory = GrpcNetworkFactory::new(0, Arc::new(clients));
    let node = NodeAddr { peer_addr: addr.to_string(), client_addr: String::new() };
    factory.new_client(2, &node).await
}

fn option() -> RPCOption {
    RPCOption::new(Duration::from_secs(5))
}

#[tokio::test]
async fn small_appends_go_on_the_stream_and_large_ones_as_unary_calls() {
    let peer = CountingPeer { streams: true, ..Default::default() };
    let mut network = connect(serve(peer.clone()).await).await;
    for body in [None, Some(200), None] {
        let reply = network.append_entries(request(body), option()).await.unwrap();
        assert!(matches!(reply, AppendEntriesResponse::Success));
    }
    assert_eq!((peer.streamed.load(Ordering::SeqCst), peer.unary.load(Ordering::SeqCst)), (3, 0));

    let reply = network.append_entries(request(Some(300 << 10)), option()).await.unwrap();
    assert!(matches!(reply, AppendEntriesResponse::Success));
    assert_eq!((peer.streamed.load(Ordering::SeqCst), peer.unary.load(Ordering::SeqCst)), (3, 1));
}

#[tokio::test]
async fn a_peer_without_the_stream_is_called_unary() {
    let peer = CountingPeer { streams: false, ..Default::default() };
    let mut network = connect(serve(peer.clone()).await).await;
    for body in [None, Some(200)] {
        let reply = network.append_entries(request(body), option()).await.unwrap();
        assert!(matches!(reply, AppendEntriesResponse::Success));
    }
    assert_eq!((peer.streamed.load(Ordering::SeqCst), peer.unary.load(Ordering::SeqCst)), (0, 2));
}
