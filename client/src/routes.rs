//! Leader-aware routing of sends. Every node accepts every request and forwards writes to the
//! shard's leader, but that costs a gRPC round trip per batch. Nodes tell the client which node
//! leads which shard (in their hello, and in each SendBatch reply for the shards they had to
//! forward), and a client that sends keeps one extra connection per leader its sends were
//! forwarded to, so most sends go to their leader directly. Hello's hints are only noted: a
//! client that only reads (most chat users, most of the time) opens no extra connection. The main connection remains the fallback: a shard whose leader
//! is unknown, not yet connected, or unreachable is sent there and forwarded as before.
//!
//! Hints may be stale; that costs a forward (and the reply corrects the hint), never
//! correctness: whichever node a send reaches, it is appended once, at its shard's leader.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chorus_proto::client::ShardLeader;
use chorus_proto::routing::shard_for_room;

/// How long a node that failed us (could not be reached, lost, or refused the work) is left
/// alone.
pub(crate) const REST: Duration = Duration::from_secs(5);
/// A direct connection that hears nothing for this long is dead (it pings five times as
/// often): sends waiting on a killed leader fail over within about this long, not within the
/// main connection's idle timeout.
pub const DIRECT_IDLE_TIMEOUT: Duration = Duration::from_millis(500);
/// A direct connection unused for this long is closed (reopened when sends need it again).
pub const UNUSED_AFTER: Duration = Duration::from_secs(30);

enum Direct {
    Connecting,
    Ready {
        connection: quinn::Connection,
        last_used: Instant,
    },
    /// Connecting failed or the connection broke: not tried again before this instant.
    Resting(Instant),
}

impl Direct {
    /// The connection, if it is up and open.
    fn open(&self) -> Option<&quinn::Connection> {
        match self {
            Direct::Ready { connection, .. } if connection.close_reason().is_none() => Some(connection),
            _ => None,
        }
    }
}

#[derive(Default)]
pub(crate) struct Routes {
    shard_count: u32,
    /// Shard → its leader's node id, as last heard.
    leaders: HashMap<u32, u64>,
    /// Direct connections to leaders, by node id.
    nodes: HashMap<u64, Direct>,
}

impl Routes {
    pub fn set_shard_count(&mut self, shard_count: u32) {
        if shard_count != self.shard_count {
            self.shard_count = shard_count;
            self.leaders.clear();
        }
    }

    /// Records leader hints, and returns the nodes (id, address) to connect to now: leaders
    /// other than `main` that have no connection and are not resting.
    pub fn learn(&mut self, hints: &[ShardLeader], main: u64) -> Vec<(u64, String)> {
        let now = Instant::now();
        let mut connect = Vec::new();
        for hint in hints {
            if hint.node_id == 0 || hint.client_addr.is_empty() || hint.shard >= self.shard_count {
                continue;
            }
            self.leaders.insert(hint.shard, hint.node_id);
            if hint.node_id == main {
                continue;
            }
            let due = match self.nodes.get(&hint.node_id) {
                None => true,
                Some(Direct::Resting(until)) => *until <= now,
                Some(ready @ Direct::Ready { .. }) => ready.open().is_none(),
                Some(Direct::Connecting) => false,
            };
            if due {
                self.nodes.insert(hint.node_id, Direct::Connecting);
                connect.push((hint.node_id, hint.client_addr.clone()));
            }
        }
        connect
    }

    /// Records leader hints without connecting (a client that never sends needs no route).
    pub fn note(&mut self, hints: &[ShardLeader]) {
        for hint in hints {
            if hint.node_id != 0 && !hint.client_addr.is_empty() && hint.shard < self.shard_count {
                self.leaders.insert(hint.shard, hint.node_id);
            }
        }
    }

    /// The direct connection to the leader of `room`'s shard, if there is one that is not the
    /// main connection's node (`None`: send on the main connection).
    pub fn connection_for(&mut self, room: &str, main: u64) -> Option<(u64, quinn::Connection)> {
        if self.shard_count == 0 {
            return None;
        }
        let node = *self.leaders.get(&shard_for_room(room, self.shard_count))?;
        if node == main {
            return None;
        }
        let direct = self.nodes.get_mut(&node)?;
        let connection = direct.open()?.clone();
        if let Direct::Ready { last_used, .. } = direct {
            *last_used = Instant::now();
        }
        Some((node, connection))
    }

    pub fn connected(&mut self, node: u64, connection: quinn::Connection) {
        let ready = Direct::Ready { connection, last_used: Instant::now() };
        if let Some(Direct::Ready { connection: old, .. }) = self.nodes.insert(node, ready) {
            old.close(0u32.into(), b"replaced");
        }
    }

    /// Closes the direct connections unused since `UNUSED_AFTER` before `now`.
    pub fn close_unused(&mut self, now: Instant) {
        self.nodes.retain(|_, direct| match direct {
            Direct::Ready { connection, last_used } if now.saturating_duration_since(*last_used) >= UNUSED_AFTER => {
                connection.close(0u32.into(), b"unused");
                false
            }
            _ => true,
        });
    }

    /// `node` could not be reached (or refused the work): forget the shards it was said to
    /// lead, close its connection, and leave it alone for a while.
    pub fn failed(&mut self, node: u64) {
        self.leaders.retain(|_, leader| *leader != node);
        if let Some(Direct::Ready { connection, .. }) = self.nodes.insert(node, Direct::Resting(Instant::now() + REST))
        {
            connection.close(0u32.into(), b"failing over");
        }
    }

    /// Every open direct connection, with its node.
    pub fn open_connections(&self) -> Vec<(u64, quinn::Connection)> {
        self.nodes.iter().filter_map(|(&node, direct)| Some((node, direct.open()?.clone()))).collect()
    }

    /// Closes every direct connection (they are opened again as sends need them).
    pub fn close_all(&mut self) {
        for (_, direct) in self.nodes.drain() {
            if let Direct::Ready { connection, .. } = direct {
                connection.close(0u32.into(), b"signed in anew");
            }
        }
    }

    /// The shards whose sends go straight to their leader's node, with that node, sorted.
    pub fn direct_shards(&self, main: u64) -> Vec<(u32, u64)> {
        let mut direct: Vec<_> = self
            .leaders
            .iter()
            .filter(|&(_, node)| *node != main && self.nodes.get(node).and_then(Direct::open).is_some())
            .map(|(&shard, &node)| (shard, node))
            .collect();
        direct.sort_unstable();
        direct
    }

    #[cfg(test)]
    fn leader_of(&self, shard: u32) -> Option<u64> {
        self.leaders.get(&shard).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(shard: u32, node_id: u64) -> ShardLeader {
        ShardLeader { shard, node_id, client_addr: format!("127.0.0.1:{}", 7400 + node_id) }
    }

    #[test]
    fn learns_leaders_and_connects_once_per_node() {
        let mut routes = Routes::default();
        routes.set_shard_count(4);
        let connect = routes.learn(&[hint(0, 1), hint(1, 2), hint(2, 2), hint(3, 3)], 1);
        assert_eq!(connect, vec![(2, "127.0.0.1:7402".to_owned()), (3, "127.0.0.1:7403".to_owned())]);
        // Already connecting: not again.
        assert!(routes.learn(&[hint(1, 2)], 1).is_empty());
        assert_eq!(routes.leader_of(2), Some(2));
        // Not connected yet: the main connection carries everything.
        assert!(routes.connection_for("any room", 1).is_none());
    }

    #[test]
    fn noted_hints_open_no_connection_until_a_send_learns_them() {
        let mut routes = Routes::default();
        routes.set_shard_count(2);
        routes.note(&[hint(0, 2), hint(1, 3), ShardLeader { shard: 1, node_id: 0, client_addr: "x:1".into() }]);
        assert_eq!((routes.leader_of(0), routes.leader_of(1)), (Some(2), Some(3)));
        assert!(routes.open_connections().is_empty());
        assert_eq!(routes.learn(&[hint(0, 2)], 1), vec![(2, "127.0.0.1:7402".to_owned())]);
    }

    #[test]
    fn ignores_bad_hints() {
        let mut routes = Routes::default();
        routes.set_shard_count(2);
        let bad = [
            ShardLeader { shard: 0, node_id: 0, client_addr: "x:1".into() },
            ShardLeader { shard: 1, node_id: 2, client_addr: String::new() },
            hint(7, 2),
        ];
        assert!(routes.learn(&bad, 1).is_empty());
        assert_eq!((routes.leader_of(0), routes.leader_of(1), routes.leader_of(7)), (None, None, None));
    }

    #[test]
    fn a_failed_node_rests_and_loses_its_shards() {
        let mut routes = Routes::default();
        routes.set_shard_count(2);
        assert_eq!(routes.learn(&[hint(0, 2), hint(1, 3)], 1).len(), 2);
        routes.failed(2);
        assert_eq!(routes.leader_of(0), None);
        assert_eq!(routes.leader_of(1), Some(3));
        // A new hint is recorded, but the node is not dialled again while it rests.
        assert!(routes.learn(&[hint(0, 2)], 1).is_empty());
        assert_eq!(routes.leader_of(0), Some(2));
    }

    #[test]
    fn a_new_shard_count_drops_old_hints() {
        let mut routes = Routes::default();
        routes.set_shard_count(2);
        routes.learn(&[hint(0, 2)], 1);
        routes.set_shard_count(4);
        assert_eq!(routes.leader_of(0), None);
    }
}
