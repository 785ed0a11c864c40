//! Cluster creation without a manual step: one designated replica of each shard (the first of
//! its placement) initializes it, once. Restarts never re-initialize (the replica has Raft state), and a replica whose data
//! dir was wiped does not initialize a second, conflicting group either: it first asks the
//! other replicas, and initializes only if a majority of the shard's replicas (itself
//! included) is reachable and has no state at all.
//!
//! Also keeps the directory of the nodes' client addresses (for Hello replies and status).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_proto::peer as pb;
use chorus_raft::{ChorusRaft, NodeAddr, NodeId, ShardId};
use openraft::error::{InitializeError, RaftError};
use tracing::Instrument;

use crate::node::Node;
use crate::supervisor;

/// Pause between attempts to initialize a shard.
const RETRY: Duration = Duration::from_millis(250);

/// True when this replica holds any Raft state: a vote, or log entries.
pub fn has_raft_state(raft: &ChorusRaft) -> bool {
    let m = raft.metrics().borrow().clone();
    m.last_log_index.is_some() || m.vote.leader_id.term > 0 || m.last_applied.is_some()
}

pub fn spawn(node: &Arc<Node>) {
    for &shard in node.shards.keys() {
        if node.layout.initializer(shard) == node.id {
            let node2 = node.clone();
            supervisor::supervise(node, "shard bootstrap", supervisor::Kind::Job, move || {
                initialize(node2.clone(), shard).instrument(tracing::info_span!("bootstrap", shard))
            });
        }
    }
    supervisor::service(node, "node directory", keep_directory);
}

enum Probe {
    Pristine,
    HasState,
    Unreachable,
}

async fn probe(node: &Node, peer: NodeId, shard: ShardId) -> Probe {
    let Some(mut client) = node.peers.get(peer) else { return Probe::Unreachable };
    match tokio::time::timeout(Duration::from_secs(1), client.shard_probe(pb::ShardProbeRequest { shard })).await {
        Ok(Ok(reply)) if reply.get_ref().has_state => Probe::HasState,
        Ok(Ok(_)) => Probe::Pristine,
        _ => Probe::Unreachable,
    }
}

/// Initializes `shard` once a majority of its replicas is pristine, retrying (and saying why,
/// now and then, at warn) until it is initialized here or elsewhere. Fails (stopping the node)
/// only when openraft says it never will: this node is not in the membership it proposes, or
/// the Raft stopped.
async fn initialize(node: Arc<Node>, shard: ShardId) -> Result<(), String> {
    let Some(replica) = node.shards.get(&shard) else { return Ok(()) };
    let replicas = node.layout.replicas(shard);
    let majority = replicas.len() / 2 + 1;
    let mut attempt = 0u32;
    loop {
        if has_raft_state(&replica.raft) {
            tracing::debug!("shard already initialized");
            return Ok(());
        }
        let mut pristine = 1; // ourselves
        let mut initialized_elsewhere = false;
        for &peer in replicas.iter().filter(|&&p| p != node.id) {
            match probe(&node, peer, shard).await {
                Probe::Pristine => pristine += 1,
                Probe::HasState => initialized_elsewhere = true,
                Probe::Unreachable => {}
            }
        }
        if initialized_elsewhere {
            tracing::info!("shard was initialized before; joining it");
            return Ok(());
        }
        if pristine >= majority {
            let members: BTreeMap<NodeId, NodeAddr> = replicas
                .iter()
                .map(|&id| {
                    let addr = NodeAddr {
                        peer_addr: node.layout.nodes.get(&id).cloned().unwrap_or_default(),
                        client_addr: node.client_addr_of(id).unwrap_or_default(),
                    };
                    (id, addr)
                })
                .collect();
            match replica.raft.initialize(members).await {
                Ok(()) => {
                    tracing::info!(?replicas, "initialized shard");
                    return Ok(());
                }
                // It has state now (a vote or an entry from a peer that initialized it).
                Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                    tracing::info!(reason = %e, "shard has Raft state already; not initializing it here");
                    return Ok(());
                }
                Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
                    return Err(format!("shard {shard}: {e}"));
                }
                Err(RaftError::Fatal(e)) => return Err(format!("shard {shard}: Raft stopped: {e}")),
            }
        }
        attempt += 1;
        if attempt % 20 == 1 {
            tracing::warn!(pristine, majority, "waiting for a majority of the shard's replicas to initialize it");
        }
        tokio::select! {
            _ = node.peers_shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Learns the nodes' client addresses: quickly until all are known, then now and then.
async fn keep_directory(node: Arc<Node>) {
    loop {
        for peer in node.peers.ids().collect::<Vec<_>>() {
            if let Some(mut client) = node.peers.get(peer) {
                let hello = pb::HelloRequest { from_node: node.id };
                if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(1), client.hello(hello)).await {
                    node.learn_client_addr(peer, reply.into_inner().client_addr);
                }
            }
        }
        let all_known = node.client_addrs().len() == node.layout.nodes.len();
        let wait = if all_known { Duration::from_secs(30) } else { Duration::from_millis(500) };
        tokio::select! {
            _ = node.peers_shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
