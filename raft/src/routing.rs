//! Room → shard routing. The shard count is fixed when a cluster is created (it is part of every
//! node's stored identity), so a room maps to the same shard for the life of the cluster.

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

    /// The shard that holds `room`. Uses FNV-1a (64-bit), a fixed, documented hash, so the
    /// mapping never changes with a Rust or library upgrade.
    pub fn shard_for_room(&self, room: &str) -> ShardId {
        (fnv1a_64(room.as_bytes()) % u64::from(self.shard_count)) as ShardId
    }

    /// Every shard id of the cluster.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> + use<> {
        0..self.shard_count
    }
}

fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // From the FNV reference test suite (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn routing_is_stable_and_in_range() {
        let router = ShardRouter::new(16).unwrap();
        // Pinned values: changing them would move rooms between shards in existing clusters.
        assert_eq!(router.shard_for_room("general"), (fnv1a_64(b"general") % 16) as u32);
        assert_eq!(router.shard_for_room("a"), (0xaf63dc4c8601ec8c_u64 % 16) as u32);
        for i in 0..1000 {
            assert!(router.shard_for_room(&format!("room-{i}")) < 16);
        }
    }

    #[test]
    fn rooms_spread_over_all_shards() {
        let router = ShardRouter::new(16).unwrap();
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[router.shard_for_room(&format!("room-{i}")) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700 && c < 1300), "{counts:?}");
    }

    #[test]
    fn zero_shards_is_refused() {
        assert!(ShardRouter::new(0).is_none());
    }
}
