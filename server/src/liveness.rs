//! Node-level liveness in place of per-shard Raft timers, so that idle shards cost nothing
//! (the idea of TiKV's hibernate regions).
//!
//! openraft would give every shard replica its own tick timer, and every shard leader its own
//! heartbeats: with hundreds of shards per node that is thousands of wake-ups a second for a
//! cluster doing nothing. Instead, openraft's tick and heartbeats are off, and each node:
//!
//! - sends every peer a `NodeHeartbeat` each heartbeat interval (250 ms by default), naming the
//!   shards it leads that the peer replicates, with their terms;
//! - calls an election for a shard it follows only when no peer has claimed that shard, at the
//!   replica's term or later, for a randomized election timeout: a dead or cut-off leader is
//!   replaced as quickly as with per-shard heartbeats, a live one is left alone; and only when
//!   it has heard from a majority of the shard's replicas lately (the effect of Raft's
//!   pre-vote: a cut-off node does not inflate its terms and depose the leader when it
//!   returns);
//! - sends a Raft heartbeat only where Raft needs one: to shards whose followers lag behind
//!   (catch-up after a restart, retries after errors) and to shards a peer reports
//!   out of step (a replica that does not know its leader yet, or a leader that was deposed
//!   while its shard was idle and must learn it).
//!
//! Raft's safety never depends on these timers (only liveness does), and commit indexes still
//! reach followers at once: openraft sends one right after each commit.
//!
//! openraft's leader lease still protects a leader from needless elections: a follower
//! rejects votes for a while after its last AppendEntries. It is set shorter than the
//! shortest election timeout here (see `RaftTuning::config`), and the election timer counts
//! from the latest claim *or* accepted AppendEntries, so that the first election after a
//! leader dies finds the other followers' leases expired and wins at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_proto::peer as pb;
use chorus_raft::{NodeId, ShardId};
use openraft::ServerState;
use rand::Rng;

use crate::node::{Node, ticker};

/// How often followers check whether their leaders are still claimed.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// What this node last heard from one peer.
struct PeerView {
    /// The last NodeHeartbeat from the peer, or reply to ours: it was alive then.
    contact: Option<Instant>,
    /// When its last NodeHeartbeat arrived, and the shards it claimed to lead then.
    claimed_at: Option<Instant>,
    claims: HashMap<ShardId, u64>,
}

/// What this node knows of its peers' liveness and leaderships.
#[derive(Default)]
pub struct Liveness {
    peers: Mutex<HashMap<NodeId, PeerView>>,
    /// When each shard replica here last accepted an AppendEntries from its leader. (Locked
    /// after `peers` where both are.)
    appends: Mutex<HashMap<ShardId, Instant>>,
}

impl Liveness {
    fn with_peer<T>(&self, peer: NodeId, f: impl FnOnce(&mut PeerView) -> T) -> T {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let view =
            peers.entry(peer).or_insert_with(|| PeerView { contact: None, claimed_at: None, claims: HashMap::new() });
        f(view)
    }

    /// `peer` answered us.
    pub fn contact(&self, peer: NodeId, at: Instant) {
        self.with_peer(peer, |v| v.contact = v.contact.max(Some(at)));
    }

    /// `peer` says it leads these shards at these terms.
    pub fn claims(&self, peer: NodeId, at: Instant, claims: HashMap<ShardId, u64>) {
        self.with_peer(peer, |v| {
            v.contact = v.contact.max(Some(at));
            v.claimed_at = Some(at);
            v.claims = claims;
        });
    }

    /// The replica of `shard` here accepted an AppendEntries from its leader.
    pub fn appended(&self, shard: ShardId, at: Instant) {
        self.appends.lock().unwrap_or_else(|p| p.into_inner()).insert(shard, at);
    }

    /// Runs `f` with a function answering: when did this node last hear that `shard` is led, at
    /// `term` or later — a peer's claim, or an AppendEntries its replica accepted? (A replica
    /// that has not caught up with a newer leader yet has no reason for an election either.)
    /// One lock for many questions.
    pub fn with_claims<T>(&self, f: impl FnOnce(&dyn Fn(ShardId, u64) -> Option<Instant>) -> T) -> T {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let appends = self.appends.lock().unwrap_or_else(|p| p.into_inner());
        let claimed = |shard: ShardId, term: u64| {
            let claim = peers
                .values()
                .filter(|v| v.claims.get(&shard).is_some_and(|&t| t >= term))
                .filter_map(|v| v.claimed_at)
                .max();
            claim.max(appends.get(&shard).copied())
        };
        f(&claimed)
    }

    #[cfg(test)]
    fn claimed(&self, shard: ShardId, term: u64) -> Option<Instant> {
        self.with_claims(|claimed| claimed(shard, term))
    }

    /// How many of `nodes` were heard from within `window` of `now` (peers only: nothing is
    /// recorded for this node itself).
    pub fn alive(&self, nodes: &[NodeId], now: Instant, window: Duration) -> usize {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let heard = |node: &NodeId| peers.get(node).and_then(|v| v.contact);
        nodes.iter().filter_map(heard).filter(|&at| now.saturating_duration_since(at) <= window).count()
    }
}

/// Answers a peer's NodeHeartbeat: records its claims and names the claimed shards whose
/// replica here does not follow it at that term.
pub fn serve_heartbeat(node: &Node, request: pb::NodeHeartbeatRequest) -> pb::NodeHeartbeatReply {
    let from = request.from_node;
    if from == node.id || !node.layout.nodes.contains_key(&from) {
        return pb::NodeHeartbeatReply { out_of_step: Vec::new() };
    }
    // Only a replica of a shard can lead it: other claims are ignored.
    let claims: HashMap<ShardId, u64> =
        request.leading.iter().filter(|c| node.layout.hosts(from, c.shard)).map(|c| (c.shard, c.term)).collect();
    let out_of_step = claims
        .iter()
        .filter(|&(shard, &term)| {
            node.shards.get(shard).is_some_and(|replica| {
                let m = replica.raft.metrics();
                let m = m.borrow();
                m.current_term != term || m.current_leader != Some(from)
            })
        })
        .map(|(&shard, _)| shard)
        .collect();
    node.liveness.claims(from, Instant::now(), claims);
    pb::NodeHeartbeatReply { out_of_step }
}

/// Sends this node's heartbeat to every peer each interval, and Raft heartbeats to the shards
/// that need one. Ends on shutdown.
pub async fn send_heartbeats(node: Arc<Node>) {
    let interval = Duration::from_millis(node.config.tuning.leader_heartbeat_ms);
    let mut ticker = ticker(interval);
    while node.next_tick(&mut ticker).await {
        let mut leading = Vec::new();
        let mut lagging = Vec::new();
        for (&shard, replica) in &node.shards {
            let m = replica.raft.metrics();
            let m = m.borrow();
            if m.state != ServerState::Leader {
                continue;
            }
            leading.push(pb::ShardTerm { shard, term: m.current_term });
            let last = m.last_log_index;
            if let Some(replication) = &m.replication
                && replication.values().any(|matched| matched.map(|l| l.index) < last)
            {
                lagging.push(shard);
            }
        }
        for shard in lagging {
            raft_heartbeat(&node, shard).await;
        }
        let sends = node.peers.ids().map(|peer| {
            let leading: Vec<_> = leading.iter().filter(|c| node.layout.hosts(peer, c.shard)).cloned().collect();
            heartbeat_peer(&node, peer, leading, interval)
        });
        futures::future::join_all(sends).await;
    }
}

async fn heartbeat_peer(node: &Node, peer: NodeId, leading: Vec<pb::ShardTerm>, timeout: Duration) {
    let Some(mut client) = node.peers.get(peer) else { return };
    let request = pb::NodeHeartbeatRequest { from_node: node.id, leading };
    let Ok(Ok(reply)) = tokio::time::timeout(timeout, client.node_heartbeat(request)).await else { return };
    node.liveness.contact(peer, Instant::now());
    for shard in reply.into_inner().out_of_step {
        raft_heartbeat(node, shard).await;
    }
}

async fn raft_heartbeat(node: &Node, shard: ShardId) {
    if let Some(replica) = node.shards.get(&shard)
        && replica.raft.metrics().borrow().state == ServerState::Leader
    {
        // Fails only when the shard is shutting down.
        let _ = replica.raft.trigger().heartbeat().await;
    }
}

/// One followed shard's election timer.
struct Timer {
    /// (term, state, leader) when last looked at: a change restarts the timer.
    seen: (u64, ServerState, Option<NodeId>),
    since: Instant,
    timeout: Duration,
}

/// Calls an election for every shard this node follows whose leadership nobody has claimed
/// for a randomized election timeout. Checks every `CHECK_EVERY`, and schedules each election
/// due before the next check at its exact time: rounding the timeouts to the check period
/// would make two followers' elections collide (and split the vote) far more often. Ends on
/// shutdown.
pub async fn watch_leaders(node: Arc<Node>) {
    let (min, max) = (node.config.tuning.election_timeout_min_ms, node.config.tuning.election_timeout_max_ms);
    let random_timeout = || Duration::from_millis(rand::rng().random_range(min..max.max(min + 1)));
    let mut timers: HashMap<ShardId, Timer> = HashMap::new();
    let mut ticker = ticker(CHECK_EVERY);
    let mut elections = tokio::task::JoinSet::new();
    while node.next_tick(&mut ticker).await {
        while elections.try_join_next().is_some() {}
        let now = Instant::now();
        let due: Vec<(ShardId, u64, Instant)> = node.liveness.with_claims(|claimed| {
            let mut due = Vec::new();
            for (&shard, replica) in &node.shards {
                let seen = {
                    let m = replica.raft.metrics();
                    let m = m.borrow();
                    (m.current_term, m.state, m.current_leader)
                };
                let timer =
                    timers.entry(shard).or_insert_with(|| Timer { seen, since: now, timeout: random_timeout() });
                if timer.seen != seen {
                    *timer = Timer { seen, since: now, timeout: random_timeout() };
                }
                if !matches!(seen.1, ServerState::Follower | ServerState::Candidate) {
                    timer.since = now;
                    continue;
                }
                let quiet_since = claimed(shard, seen.0).map_or(timer.since, |at| at.max(timer.since));
                let at = quiet_since + timer.timeout;
                if at < now + CHECK_EVERY {
                    due.push((shard, seen.0, at));
                    // The next timeout counts from this election.
                    timer.since = at.max(now);
                    timer.timeout = random_timeout();
                }
            }
            due
        });
        for (shard, term, at) in due {
            elections.spawn(elect_at(node.clone(), shard, term, at));
        }
    }
}

/// At `at`, calls an election for `shard` unless someone claimed it meanwhile or its term moved.
async fn elect_at(node: Arc<Node>, shard: ShardId, term: u64, at: Instant) {
    tokio::time::sleep_until(at.into()).await;
    let Some(replica) = node.shards.get(&shard) else { return };
    let now = Instant::now();
    let heard = node.liveness.with_claims(|claimed| claimed(shard, term));
    if heard.is_some_and(|h| {
        now.saturating_duration_since(h) < Duration::from_millis(node.config.tuning.election_timeout_min_ms)
    }) {
        return;
    }
    let still = {
        let m = replica.raft.metrics();
        let m = m.borrow();
        m.current_term == term && matches!(m.state, ServerState::Follower | ServerState::Candidate)
    };
    // A node that is stopping leads nothing new.
    if !still || node.is_leaving() {
        return;
    }
    // Like Raft's pre-vote: an election that cannot reach a majority cannot win, and the term
    // it would raise deposes the leader once the partition heals. Wait until one is in reach.
    let window = Duration::from_millis(node.config.tuning.election_timeout_min_ms);
    if !quorum_alive(&node, &node.layout.replicas(shard), window) {
        tracing::debug!(shard, term, "no election: most of the shard's replicas are out of reach");
        return;
    }
    let quiet_ms = heard.map(|h| now.saturating_duration_since(h).as_millis() as u64);
    tracing::info!(shard, term, ?quiet_ms, "no live peer leads this shard: calling an election");
    // Fails only when the shard is shutting down.
    let _ = replica.raft.trigger().elect().await;
}

/// Whether a majority of `replicas` (this node included) has been heard from within
/// `window`: a leader without one has probably been deposed or cut off, and should not take
/// writes that may never commit.
pub fn quorum_alive(node: &Node, replicas: &[NodeId], window: Duration) -> bool {
    replicas_alive(node, replicas, window) > replicas.len() / 2
}

/// How many of `replicas` were heard from within `window`, this node included if it is one.
pub fn replicas_alive(node: &Node, replicas: &[NodeId], window: Duration) -> usize {
    // Liveness only knows peers (this node never hears from itself): count it apart.
    let this_node = usize::from(replicas.contains(&node.id));
    node.liveness.alive(replicas, Instant::now(), window) + this_node
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_covers_its_term_and_older_ones() {
        let liveness = Liveness::default();
        let t0 = Instant::now();
        liveness.claims(2, t0, HashMap::from([(7, 5)]));
        assert_eq!(liveness.claimed(7, 5), Some(t0));
        assert_eq!(liveness.claimed(7, 4), Some(t0), "a replica behind the claimed term is covered");
        assert_eq!(liveness.claimed(7, 6), None, "an older leadership does not cover a newer term");
        assert_eq!(liveness.claimed(8, 1), None);
        // The latest claim wins; a new heartbeat without the shard withdraws it.
        let t1 = t0 + Duration::from_millis(250);
        liveness.claims(3, t1, HashMap::from([(7, 6)]));
        assert_eq!(liveness.claimed(7, 5), Some(t1));
        liveness.claims(3, t1, HashMap::new());
        assert_eq!(liveness.claimed(7, 6), None);
        // An accepted AppendEntries counts, whatever the term.
        let t2 = t1 + Duration::from_millis(10);
        liveness.appended(7, t2);
        assert_eq!(liveness.claimed(7, 6), Some(t2));
        assert_eq!(liveness.claimed(8, 1), None);
    }

    #[test]
    fn contact_makes_a_peer_alive_for_a_window() {
        let liveness = Liveness::default();
        let t0 = Instant::now();
        let window = Duration::from_millis(1000);
        assert_eq!(liveness.alive(&[2], t0, window), 0);
        liveness.contact(2, t0);
        assert_eq!(liveness.alive(&[2, 3], t0 + window, window), 1);
        assert_eq!(liveness.alive(&[2], t0 + window + Duration::from_millis(1), window), 0);
        // An older contact never moves it back.
        liveness.contact(2, t0.checked_sub(Duration::from_secs(5)).unwrap_or(t0));
        assert_eq!(liveness.alive(&[2], t0 + window, window), 1);
    }
}
