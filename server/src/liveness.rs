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

/// A leader's applied index that a shard replica here had not reached when it heard of it.
#[derive(Debug, Clone, Copy)]
struct Behind {
    goal: u64,
    since: Instant,
}

/// What this node knows of its peers' liveness and leaderships.
#[derive(Default)]
pub struct Liveness {
    peers: Mutex<HashMap<NodeId, PeerView>>,
    /// When each shard replica here last accepted an AppendEntries from its leader. (Locked
    /// after `peers` where both are.)
    appends: Mutex<HashMap<ShardId, Instant>>,
    /// Per shard replica here, the oldest applied index a leader reported that the replica had
    /// not reached yet, and since when (see [`Liveness::leader_applied`]).
    behind: Mutex<HashMap<ShardId, Behind>>,
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

    /// A leader of `shard` said it had applied `goal` when the replica here had applied
    /// `applied`. Keeps the oldest goal not reached yet: a replica that follows reaches each
    /// within a heartbeat or two, one that has stopped following (its entries or the commit
    /// index do not reach it, or it cannot apply them) stays behind the same goal. Returns how
    /// long the replica has been behind that goal (zero: it is not).
    pub fn leader_applied(&self, shard: ShardId, applied: u64, goal: u64, at: Instant) -> Duration {
        let mut behind = self.behind.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = behind.get(&shard)
            && applied < b.goal
        {
            return at.saturating_duration_since(b.since);
        }
        if applied >= goal {
            behind.remove(&shard);
        } else {
            behind.insert(shard, Behind { goal, since: at });
        }
        Duration::ZERO
    }

    /// The leader's applied index that the replica of `shard` here, having reached index
    /// `reached`, has not, and for how long, as of `now`; `None` when it is not behind. Feeds
    /// ask with the replica's applied index (is it following?), elections with its last log
    /// index (does it hold every entry it knows to be committed?).
    pub fn behind(&self, shard: ShardId, reached: u64, now: Instant) -> Option<(u64, Duration)> {
        let behind = self.behind.lock().unwrap_or_else(|p| p.into_inner());
        let b = behind.get(&shard).filter(|b| reached < b.goal)?;
        Some((b.goal, now.saturating_duration_since(b.since)))
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
/// replica here does not follow it at that term, or has stayed behind its applied index for
/// longer than [`resync_after`].
pub fn serve_heartbeat(node: &Node, request: pb::NodeHeartbeatRequest) -> pb::NodeHeartbeatReply {
    let from = request.from_node;
    if from == node.id || !node.layout.nodes.contains_key(&from) {
        return pb::NodeHeartbeatReply { out_of_step: Vec::new() };
    }
    let now = Instant::now();
    let resync = resync_after(node);
    // Only a replica of a shard can lead it: other claims are ignored.
    let leading: Vec<&pb::ShardTerm> = request.leading.iter().filter(|c| node.layout.hosts(from, c.shard)).collect();
    let out_of_step = leading
        .iter()
        .filter(|c| {
            node.shards.get(&c.shard).is_some_and(|replica| {
                let (in_step, applied) = {
                    let m = replica.raft.metrics();
                    let m = m.borrow();
                    (m.current_term == c.term && m.current_leader == Some(from), m.last_applied.map_or(0, |l| l.index))
                };
                let behind = node.liveness.leader_applied(c.shard, applied, c.applied, now);
                !in_step || behind > resync
            })
        })
        .map(|c| c.shard)
        .collect();
    node.liveness.claims(from, now, leading.iter().map(|c| (c.shard, c.term)).collect());
    pb::NodeHeartbeatReply { out_of_step }
}

/// How long a replica may stay behind its leader's applied index before the leader is asked
/// for a Raft heartbeat: it carries the commit index, which a replica that has every entry
/// but missed the commit-only AppendEntries (lost in a partition) would otherwise wait for
/// until the shard's next write.
fn resync_after(node: &Node) -> Duration {
    Duration::from_millis(node.config.tuning.election_timeout_max_ms)
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
            let applied = m.last_applied.map_or(0, |l| l.index);
            leading.push(pb::ShardTerm { shard, term: m.current_term, applied });
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
    /// Terms in a row that began without a leader emerging: each doubles the next timeout, up
    /// to [`MAX_BACKOFF_DOUBLINGS`].
    leaderless: u32,
}

/// An election timeout doubles at most this many times while elections keep failing.
const MAX_BACKOFF_DOUBLINGS: u32 = 2;

/// Calls an election for every shard this node follows whose leadership nobody has claimed
/// for a randomized election timeout. Checks every `CHECK_EVERY`, and schedules each election
/// due before the next check at its exact time: rounding the timeouts to the check period
/// would make two followers' elections collide (and split the vote) far more often. Ends on
/// shutdown.
pub async fn watch_leaders(node: Arc<Node>) {
    let (min, max) = (node.config.tuning.election_timeout_min_ms, node.config.tuning.election_timeout_max_ms);
    // Elections that keep failing back off (randomized, doubling): when votes are slow (a
    // node catching up, a slow disk) a round can outlast a plain timeout, and two candidates
    // that keep starting new terms over each other's rounds never finish one.
    let random_timeout = |leaderless: u32| backed_off(rand::rng().random_range(min..max.max(min + 1)), leaderless);
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
                let timer = timers.entry(shard).or_insert_with(|| Timer {
                    seen,
                    since: now,
                    timeout: random_timeout(0),
                    leaderless: 0,
                });
                if timer.seen != seen {
                    // A new term with no leader known: an election is under way, or has failed.
                    let leaderless = match seen.2 {
                        Some(_) => 0,
                        None if seen.0 > timer.seen.0 => timer.leaderless.saturating_add(1),
                        None => timer.leaderless,
                    };
                    *timer = Timer { seen, since: now, timeout: random_timeout(leaderless), leaderless };
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
                    timer.timeout = random_timeout(timer.leaderless);
                }
            }
            due
        });
        for (shard, term, at) in due {
            elections.spawn(elect_at(node.clone(), shard, term, at));
        }
    }
}

/// An election timeout of `base_ms` after `leaderless` terms in a row without a leader.
fn backed_off(base_ms: u64, leaderless: u32) -> Duration {
    Duration::from_millis(base_ms.saturating_mul(1 << leaderless.min(MAX_BACKOFF_DOUBLINGS)))
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
    let (still, last_log) = {
        let m = replica.raft.metrics();
        let m = m.borrow();
        (m.current_term == term && matches!(m.state, ServerState::Follower | ServerState::Candidate), m.last_log_index)
    };
    // A node that is stopping leads nothing new.
    if !still || node.is_leaving() {
        return;
    }
    // Nor does a replica whose log ends before an entry a leader said it had applied (so
    // committed): a majority holds that entry, every majority of voters includes one of them,
    // and they refuse a candidate without it. Its terms would only outbid the candidates that
    // can win (a node back from a crash, still catching up, once kept a shard leaderless for
    // 15 s that way).
    let last_log = last_log.unwrap_or(0);
    if let Some((committed, _)) = node.liveness.behind(shard, last_log, now) {
        tracing::debug!(shard, term, last_log, committed, "no election: this replica lacks committed entries");
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
    fn a_replica_behind_its_leaders_is_timed_from_the_oldest_goal_it_has_not_reached() {
        let liveness = Liveness::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let at = |d: u64| t0 + ms(d);
        // Keeping up: every goal is reached by the next heartbeat, so it is never behind long.
        assert_eq!(liveness.leader_applied(7, 10, 10, t0), Duration::ZERO);
        assert_eq!(liveness.behind(7, 10, t0), None);
        assert_eq!(liveness.leader_applied(7, 10, 12, t0), Duration::ZERO);
        assert_eq!(liveness.behind(7, 11, at(100)), Some((12, ms(100))));
        assert_eq!(liveness.leader_applied(7, 12, 15, at(250)), Duration::ZERO, "12 reached: 15 is the goal now");
        assert_eq!(liveness.behind(7, 15, at(300)), None);
        // Stuck at 12: the goal stays 15 and its age grows, however far the leader moves on.
        assert_eq!(liveness.leader_applied(7, 12, 20, at(500)), ms(250));
        assert_eq!(liveness.behind(7, 12, at(2500)), Some((15, ms(2250))));
        // A deposed leader's lower goal does not hide the real leader's.
        assert_eq!(liveness.leader_applied(7, 13, 13, at(2600)), ms(2350));
        assert_eq!(liveness.behind(7, 13, at(2600)), Some((15, ms(2350))));
        // Caught up with everything it heard of.
        assert_eq!(liveness.leader_applied(7, 20, 20, at(2700)), Duration::ZERO);
        assert_eq!(liveness.behind(7, 20, at(9000)), None);
        // Shards are apart, and a peer that does not say (an older version: 0) is not waited for.
        assert_eq!(liveness.leader_applied(8, 0, 0, t0), Duration::ZERO);
        assert_eq!(liveness.behind(8, 0, at(9000)), None);
        assert_eq!(liveness.leader_applied(7, 20, 25, at(9000)), Duration::ZERO);
        assert_eq!(liveness.behind(8, 0, at(9500)), None);
        assert_eq!(liveness.behind(7, 20, at(9500)), Some((25, ms(500))));
    }

    #[test]
    fn failing_elections_back_off_up_to_four_times_the_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(backed_off(700, 0), ms(700), "the first election after a leader is lost is not delayed");
        assert_eq!(backed_off(700, 1), ms(1400));
        assert_eq!(backed_off(700, 2), ms(2800));
        assert_eq!(backed_off(700, 50), ms(2800));
        assert_eq!(backed_off(u64::MAX, 3), Duration::from_millis(u64::MAX));
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
