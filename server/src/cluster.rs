//! The cluster's shape: its id, its nodes, and which nodes replicate which shard.
//!
//! Everything here is derived deterministically from settings that must be identical on every
//! node (initial cluster, cluster token, shard count, replication factor), so every node
//! computes the same layout without talking to the others. The cluster id is a digest of those
//! settings: nodes started with different ones refuse each other's requests and data dirs.

use std::collections::BTreeMap;

use chorus_proto::storage::ClusterIdentity;
use chorus_raft::keys::META_SHARD;
use chorus_raft::{NodeId, ShardId, ShardRouter};

use crate::config::NodeConfig;

#[derive(Debug, Clone)]
pub struct ClusterLayout {
    pub cluster_id: String,
    /// Peer address of every node.
    pub nodes: BTreeMap<NodeId, String>,
    pub shard_count: u32,
    pub replication_factor: usize,
    pub router: ShardRouter,
}

impl ClusterLayout {
    pub fn from_config(config: &NodeConfig) -> ClusterLayout {
        let cluster_id =
            cluster_id(&config.cluster_token, &config.initial_cluster, config.shard_count, config.replication_factor);
        ClusterLayout {
            cluster_id,
            nodes: config.initial_cluster.clone(),
            shard_count: config.shard_count,
            replication_factor: config.replication_factor,
            // The config check keeps the shard count in range.
            router: ShardRouter::new(config.shard_count.max(1)).unwrap_or_else(|| unreachable!("shard count checked")),
        }
    }

    /// The nodes that replicate `shard`: `replication_factor` consecutive nodes (in id order)
    /// starting at `shard mod nodes`, so shards spread evenly and each node leads its share.
    /// The meta group is replicated on every node, so that each checks sign-ins locally.
    pub fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        if shard == META_SHARD {
            return ids;
        }
        let start = shard as usize % ids.len();
        (0..self.replication_factor).map(|i| ids[(start + i) % ids.len()]).collect()
    }

    pub fn hosts(&self, node: NodeId, shard: ShardId) -> bool {
        self.replicas(shard).contains(&node)
    }

    /// The shards `node` replicates: its room shards, then the meta group.
    pub fn shards_of(&self, node: NodeId) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = (0..self.shard_count).filter(|&s| self.hosts(node, s)).collect();
        if self.hosts(node, META_SHARD) {
            shards.push(META_SHARD);
        }
        shards
    }

    /// The one node that initializes `shard` when the cluster is created: the first node of its
    /// placement. It usually wins the first election, and the first node rotates with the shard
    /// id, so shard leadership starts out evenly spread over the nodes.
    pub fn initializer(&self, shard: ShardId) -> NodeId {
        self.replicas(shard).first().copied().unwrap_or_default()
    }

    pub fn identity(&self, node_id: NodeId) -> ClusterIdentity {
        ClusterIdentity {
            cluster_id: self.cluster_id.clone(),
            node_id,
            shard_count: self.shard_count,
            format_version: 0,
        }
    }
}

/// A short hex digest of the settings that define a cluster.
fn cluster_id(token: &str, nodes: &BTreeMap<NodeId, String>, shard_count: u32, rf: usize) -> String {
    let mut text = format!("chorus-cluster/v1\ntoken={token}\nshards={shard_count}\nrf={rf}\n");
    for (id, addr) in nodes {
        text.push_str(&format!("node {id}={addr}\n"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let hex = hex::encode(&digest.as_ref()[..8]);
    format!("{token}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: u64, rf: usize, shards: u32) -> ClusterLayout {
        let nodes: BTreeMap<NodeId, String> = (1..=n).map(|i| (i, format!("127.0.0.1:{}", 7300 + i))).collect();
        ClusterLayout {
            cluster_id: cluster_id("t", &nodes, shards, rf),
            nodes,
            shard_count: shards,
            replication_factor: rf,
            router: ShardRouter::new(shards).unwrap(),
        }
    }

    #[test]
    fn three_nodes_rf3_replicate_everything_everywhere() {
        let l = layout(3, 3, 16);
        for s in 0..16 {
            let mut r = l.replicas(s);
            r.sort();
            assert_eq!(r, vec![1, 2, 3]);
        }
    }

    #[test]
    fn five_nodes_rf3_spread_shards_evenly() {
        let l = layout(5, 3, 20);
        let mut per_node = BTreeMap::new();
        for s in 0..20 {
            let r = l.replicas(s);
            assert_eq!(r.len(), 3);
            let mut dedup = r.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), 3, "distinct replicas for shard {s}");
            for n in r {
                *per_node.entry(n).or_insert(0) += 1;
            }
        }
        assert!(per_node.values().all(|&c| c == 12), "{per_node:?}");
        for node in 1..=5 {
            assert!(l.shards_of(node).contains(&META_SHARD), "every node hosts the meta group");
        }
        assert_eq!(l.replicas(META_SHARD), vec![1, 2, 3, 4, 5]);
        assert_eq!(l.initializer(META_SHARD), 1);
        assert_eq!(l.replicas(0), vec![1, 2, 3]);
        assert_eq!(l.replicas(4), vec![5, 1, 2]);
        assert_eq!(l.initializer(4), 5);
        let initializers: std::collections::BTreeSet<_> = (0..20).map(|s| l.initializer(s)).collect();
        assert_eq!(initializers.len(), 5, "every node initializes (and first leads) some shards");
    }

    #[test]
    fn the_cluster_id_depends_on_every_defining_setting() {
        let base = layout(3, 3, 16).cluster_id;
        assert_eq!(base, layout(3, 3, 16).cluster_id);
        assert_ne!(base, layout(3, 3, 8).cluster_id);
        assert_ne!(base, layout(3, 2, 16).cluster_id);
        assert_ne!(base, layout(4, 3, 16).cluster_id);
        assert!(base.starts_with("t-"));
    }
}
