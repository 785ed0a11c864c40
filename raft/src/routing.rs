//! Room → shard routing for a node. The shard count is fixed when a cluster is created (it is
//! part of every node's stored identity), so a room maps to the same shard for the life of the
//! cluster. The hash itself lives in `chorus_proto::routing`, shared with clients.

use crate::types::ShardId;

/// Maps room names to shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRouter {
    shard_count: u32,
}

impl ShardRouter {
    /// `shard_count` must be at least 1 (checked when the cluster identity is created).
    pub fn new(shard_count: u32) -> Option<ShardRouter> {
        (shard_count > 0 && shard_count <= crate::keys::MAX_SHARD_ID).then_some(ShardRouter { shard_count })
    }

    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    pub fn shard_for_room(&self, room: &str) -> ShardId {
        chorus_proto::routing::shard_for_room(room, self.shard_count)
    }

    /// Every shard id of the cluster.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> + use<> {
        0..self.shard_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable_and_in_range() {
        let router = ShardRouter::new(16).unwrap();
        // Pinned: changing this would move rooms between shards in existing clusters.
        assert_eq!(router.shard_for_room("a"), (0xaf63dc4c8601ec8c_u64 % 16) as u32);
        assert!((0..1000).all(|i| router.shard_for_room(&format!("room-{i}")) < 16));
    }

    #[test]
    fn zero_shards_is_refused() {
        assert!(ShardRouter::new(0).is_none());
    }
}
