//! An in-process Raft network for tests: RPCs are direct calls into the target's `Raft`, and a
//! node can be cut off (every RPC to or from it fails as unreachable).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chorus_proto::storage::ClusterIdentity;
use chorus_raft::{
    ChorusRaft, DbOptions, NodeAddr, NodeDb, NodeId, RaftTuning, ShardId, ShardReplica, TypeConfig, start_shard,
};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

#[derive(Default)]
struct RouterState {
    rafts: HashMap<NodeId, ChorusRaft>,
    isolated: BTreeSet<NodeId>,
}

/// Connects the Raft instances of one shard across test nodes.
#[derive(Clone, Default)]
pub struct Router {
    state: Arc<Mutex<RouterState>>,
}

impl Router {
    pub fn add(&self, id: NodeId, raft: ChorusRaft) {
        self.state.lock().unwrap().rafts.insert(id, raft);
    }

    pub fn isolate(&self, id: NodeId) {
        self.state.lock().unwrap().isolated.insert(id);
    }

    pub fn heal(&self, id: NodeId) {
        self.state.lock().unwrap().isolated.remove(&id);
    }

    fn target(&self, from: NodeId, to: NodeId) -> Result<ChorusRaft, Unreachable> {
        let state = self.state.lock().unwrap();
        if state.isolated.contains(&from) || state.isolated.contains(&to) {
            return Err(Unreachable::new(&std::io::Error::other(format!("{from} -> {to} is cut"))));
        }
        state.rafts.get(&to).cloned().ok_or_else(|| Unreachable::new(&std::io::Error::other("no such node")))
    }
}

pub struct TestNetwork {
    router: Router,
    from: NodeId,
}

impl TestNetwork {
    pub fn new(router: Router, from: NodeId) -> Self {
        TestNetwork { router, from }
    }
}

pub struct TestConnection {
    router: Router,
    from: NodeId,
    to: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for TestNetwork {
    type Network = TestConnection;

    async fn new_client(&mut self, target: NodeId, _node: &NodeAddr) -> TestConnection {
        TestConnection { router: self.router.clone(), from: self.from, to: target }
    }
}

fn remote<E>(to: NodeId, e: RaftError<NodeId, E>) -> RPCError<NodeId, NodeAddr, RaftError<NodeId, E>>
where
    E: std::error::Error,
{
    RPCError::RemoteError(RemoteError::new(to, e))
}

impl RaftNetwork<TypeConfig> for TestConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        let raft = self.router.target(self.from, self.to).map_err(RPCError::Unreachable)?;
        raft.append_entries(rpc).await.map_err(|e| remote(self.to, e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId, InstallSnapshotError>>>
    {
        let raft = self.router.target(self.from, self.to).map_err(RPCError::Unreachable)?;
        raft.install_snapshot(rpc).await.map_err(|e| remote(self.to, e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeAddr, RaftError<NodeId>>> {
        let raft = self.router.target(self.from, self.to).map_err(RPCError::Unreachable)?;
        raft.vote(rpc).await.map_err(|e| remote(self.to, e))
    }
}

/// Keeps `NetworkError` in scope for tests that build one.
pub fn network_error(msg: &str) -> NetworkError {
    NetworkError::new(&std::io::Error::other(msg.to_owned()))
}

/// Opens a node's database. A test that "restarts" a node in the same process may reopen it
/// while the previous instance's threads are still letting go of it (moments after its last
/// handle was dropped; after a real kill -9 the process is gone at once): RocksDB then refuses
/// with its in-process lock, and the open is retried for a while.
pub fn open_node_db(dir: &Path, node_id: NodeId, options: &DbOptions) -> Arc<NodeDb> {
    let identity = ClusterIdentity { cluster_id: "test-cluster".into(), node_id, shard_count: 4, format_version: 0 };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match NodeDb::open(dir, identity.clone(), options) {
            Ok(db) => return db,
            Err(e)
                if e.to_string().contains("lock hold by current process") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open node db: {e:?}"),
        }
    }
}

/// A node of a test cluster: its database and its replica of one shard.
pub struct TestNode {
    pub id: NodeId,
    pub dir: tempfile::TempDir,
    pub db: Arc<NodeDb>,
    pub replica: ShardReplica,
}

/// Starts `ids` as replicas of `shard`, connected through `router`, and initializes the group
/// on the first node.
pub async fn start_cluster(router: &Router, ids: &[NodeId], shard: ShardId, tuning: &RaftTuning) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for &id in ids {
        let dir = tempfile::tempdir().unwrap();
        let db = open_node_db(dir.path(), id, &DbOptions::default());
        let replica = start_shard(id, shard, &db, tuning, TestNetwork::new(router.clone(), id)).await.unwrap();
        router.add(id, replica.raft.clone());
        nodes.push(TestNode { id, dir, db, replica });
    }
    let members: BTreeMap<NodeId, NodeAddr> = ids.iter().map(|&id| (id, NodeAddr::default())).collect();
    nodes[0].replica.raft.initialize(members).await.unwrap();
    nodes
}
