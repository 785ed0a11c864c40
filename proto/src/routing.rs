//! Room → shard routing, shared by nodes and clients: `fnv1a64(room) mod shard_count`.
//! FNV-1a (64-bit) is a fixed, documented hash, so the mapping never changes with a Rust or
//! library upgrade — rooms must stay on their shard for the life of a cluster.

pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// The shard of `room` in a cluster of `shard_count` shards (at least 1).
pub fn shard_for_room(room: &str, shard_count: u32) -> u32 {
    (fnv1a_64(room.as_bytes()) % u64::from(shard_count.max(1))) as u32
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
    fn rooms_spread_over_all_shards() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[shard_for_room(&format!("room-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700 && c < 1300), "{counts:?}");
        assert_eq!(shard_for_room("a", 16), (0xaf63dc4c8601ec8c_u64 % 16) as u32);
    }
}
