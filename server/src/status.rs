//! Cluster status: every node reports its view of the shards it hosts; the node a client asked
//! combines the reports into one table (nodes, each shard's replicas, leader, term, commit and
//! applied index), marking nodes it could not reach.

use std::collections::BTreeMap;
use std::time::Duration;

use chorus_proto::client;
use chorus_proto::peer as pb;
use chorus_raft::{ChorusRaft, NodeId};
use openraft::ServerState;

use crate::node::Node;

const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// The commit index a leader can prove: the highest index a majority of voters has matched.
fn commit_index(voters: &[NodeId], matched: &BTreeMap<NodeId, u64>) -> u64 {
    let mut indexes: Vec<u64> = voters.iter().map(|v| matched.get(v).copied().unwrap_or(0)).collect();
    indexes.sort_unstable_by(|a, b| b.cmp(a));
    let majority = voters.len() / 2 + 1;
    indexes.get(majority - 1).copied().unwrap_or(0)
}

fn replica_status(node: NodeId, raft: &ChorusRaft) -> pb::ShardReplicaStatus {
    let m = raft.metrics().borrow().clone();
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    let mut matched = BTreeMap::new();
    let mut committed = 0;
    if m.state == ServerState::Leader {
        matched.insert(node, m.last_log_index.unwrap_or(0));
        if let Some(replication) = &m.replication {
            for (target, log_id) in replication.iter() {
                matched.insert(*target, log_id.map(|l| l.index).unwrap_or(0));
            }
        }
        committed = commit_index(&voters, &matched);
    }
    pb::ShardReplicaStatus {
        shard: 0,
        replica: Some(client::ReplicaStatus {
            node,
            role: role(m.state).into(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            matched: 0,
            applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
        }),
        leader: m.current_leader.unwrap_or(0),
        voters,
        committed,
        matched,
    }
}

/// This node's view of every shard it hosts.
pub fn local_status(node: &Node) -> pb::NodeStatusReply {
    pb::NodeStatusReply {
        node_id: node.id,
        client_addr: node.config.advertise_client_addr.clone(),
        shards: node
            .shards
            .iter()
            .map(|(&shard, replica)| pb::ShardReplicaStatus { shard, ..replica_status(node.id, &replica.raft) })
            .collect(),
    }
}

/// Asks every node for its view and combines them.
pub async fn cluster_status(node: &Node) -> client::ClusterStatusReply {
    let mut asks = Vec::new();
    for &id in node.layout.nodes.keys() {
        asks.push(async move {
            if id == node.id {
                return (id, Ok(local_status(node)));
            }
            let Some(mut client) = node.peers.get(id) else {
                return (id, Err("no route".to_string()));
            };
            match tokio::time::timeout(STATUS_TIMEOUT, client.node_status(pb::NodeStatusRequest {})).await {
                Ok(Ok(reply)) => (id, Ok(reply.into_inner())),
                Ok(Err(status)) => (id, Err(status.message().to_string())),
                Err(_) => (id, Err("no answer within 1 s".to_string())),
            }
        });
    }
    let reports: BTreeMap<NodeId, Result<pb::NodeStatusReply, String>> =
        futures::future::join_all(asks).await.into_iter().collect();

    let nodes = node
        .layout
        .nodes
        .iter()
        .map(|(&id, peer_addr)| {
            let report = &reports[&id];
            if let Ok(r) = report {
                node.learn_client_addr(id, r.client_addr.clone());
            }
            client::NodeStatus {
                id,
                client_addr: node.client_addr_of(id).unwrap_or_default(),
                peer_addr: peer_addr.clone(),
                reachable: report.is_ok(),
                error: report.as_ref().err().cloned().unwrap_or_default(),
            }
        })
        .collect();

    let mut views: BTreeMap<u32, Vec<&pb::ShardReplicaStatus>> = BTreeMap::new();
    for report in reports.values().flatten() {
        for s in &report.shards {
            views.entry(s.shard).or_default().push(s);
        }
    }
    let shards = (0..node.layout.shard_count)
        .chain(std::iter::once(chorus_raft::keys::META_SHARD))
        .map(|shard| {
            let views = views.get(&shard).map(Vec::as_slice).unwrap_or_default();
            // A deposed leader may still think it leads for a moment: trust the highest term.
            let leader_view = views
                .iter()
                .filter(|v| v.replica.as_ref().is_some_and(|r| r.role == "leader"))
                .max_by_key(|v| v.replica.as_ref().map(|r| r.term).unwrap_or(0));
            let replicas = match leader_view.or(views.first()) {
                Some(v) if !v.voters.is_empty() => v.voters.clone(),
                _ => node.layout.replicas(shard),
            };
            let replica_status = replicas
                .iter()
                .map(|&id| {
                    let own = views.iter().find(|v| v.replica.as_ref().is_some_and(|r| r.node == id));
                    let mut status = match own.and_then(|v| v.replica.clone()) {
                        Some(r) => r,
                        None => client::ReplicaStatus { node: id, role: "unreachable".into(), ..Default::default() },
                    };
                    status.matched = leader_view.and_then(|l| l.matched.get(&id).copied()).unwrap_or(0);
                    status
                })
                .collect();
            client::ShardStatus {
                shard,
                replicas,
                leader: leader_view.and_then(|v| v.replica.as_ref()).map(|r| r.node).unwrap_or(0),
                term: views.iter().filter_map(|v| v.replica.as_ref()).map(|r| r.term).max().unwrap_or(0),
                committed: leader_view.map(|v| v.committed).unwrap_or(0),
                replica_status,
            }
        })
        .collect();
    client::ClusterStatusReply {
        cluster_id: node.layout.cluster_id.clone(),
        shard_count: node.layout.shard_count,
        replication_factor: node.layout.replication_factor as u32,
        answered_by: node.id,
        nodes,
        shards,
        meta_shard: chorus_raft::keys::META_SHARD,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_index_is_what_a_majority_matched() {
        let matched = BTreeMap::from([(1, 10), (2, 7), (3, 3)]);
        assert_eq!(commit_index(&[1, 2, 3], &matched), 7);
        assert_eq!(commit_index(&[1], &BTreeMap::from([(1, 4)])), 4);
        let five = BTreeMap::from([(1, 9), (2, 9), (3, 5), (4, 1)]);
        assert_eq!(commit_index(&[1, 2, 3, 4, 5], &five), 5);
    }
}
