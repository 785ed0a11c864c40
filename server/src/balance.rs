//! Preferred leaders: leadership that piled up on some nodes moves back to where it belongs.
//!
//! Each shard prefers the first node of its placement ([`ClusterLayout::initializer`]), which
//! spreads leadership evenly. Failovers move it: after a rolling restart, the node restarted
//! first may lead nothing while another leads almost everything, does the leader's share of
//! the work for every shard, and takes most client writes through forwarding. (Kafka's
//! preferred replica election and Redpanda's leader balancer do this job there.)
//!
//! Every `--leader-balance-ms`, a node looks at the shards it prefers to lead but only
//! follows. For each whose leader and term have not changed since the previous look (so not
//! during an election or right after a restart) and whose replicas are all alive, it asks the
//! leader to hand it over (`TransferLeader`):
//!
//! 1. The leader *holds* the shard's new writes (they are retried, as when no leader is
//!    known), waits until everything in its log is applied and replicated to the asker, and
//!    answers `ready`. A leader that cannot (the asker is behind, a replica is down, it is not
//!    the leader at that term) refuses; the asker tries again at its next look.
//! 2. The asker waits out the leader lease (followers refuse to vote for that long after their
//!    last AppendEntries; with writes held no new ones come) and calls an election. Its log is
//!    as long as anyone's, so the other followers vote for it; the old leader learns the new
//!    term from the new leader and steps down.
//!
//! A node that is stopping (SIGTERM) hands off the shards it leads the same way, before it
//! stops serving: it asks one live replica of each to take it over (`TakeLeadership`), which
//! then runs the steps above. A rolling restart then costs each shard a hold of about a lease,
//! not an election timeout (see [`hand_off_all`]).
//!
//! Safety never depends on this: a transfer is an ordinary Raft election. A transfer that goes
//! wrong (a follower still under its lease, a lost vote) costs what an election costs; the old
//! leader's hold ends by itself after [`hold_for`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_proto::peer as pb;
use chorus_raft::{NodeAddr, NodeId, ShardId, ShardReplica};
use openraft::{RaftMetrics, ServerState};

use crate::node::{Node, ticker};

/// How long a leader waits for the asker to have every entry before it refuses.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(1);
/// Added to the leader lease before the asker calls its election: the followers' lease counts
/// from the last AppendEntries they got, which may have left just after the leader's answer.
const LEASE_MARGIN: Duration = Duration::from_millis(100);
/// Longest wait for the leader's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Shards whose new writes are held on this node while their leadership moves, each until an
/// instant.
#[derive(Default)]
pub struct Holds(Mutex<HashMap<ShardId, Instant>>);

impl Holds {
    /// Holds `shard`'s writes until `until`; false if they are already held.
    fn start(&self, shard: ShardId, until: Instant) -> bool {
        let mut holds = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if holds.get(&shard).is_some_and(|&u| u > Instant::now()) {
            return false;
        }
        holds.insert(shard, until);
        true
    }

    fn extend(&self, shard: ShardId, until: Instant) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(shard, until);
    }

    fn release(&self, shard: ShardId) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard);
    }

    /// Until when `shard`'s writes are held, if they are now.
    pub fn held(&self, shard: ShardId) -> Option<Instant> {
        let mut holds = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match holds.get(&shard) {
            Some(&until) if until > Instant::now() => Some(until),
            Some(_) => {
                holds.remove(&shard);
                None
            }
            None => None,
        }
    }
}

/// Waits while `shard`'s writes are held on this node (at most until `deadline`). Returns the
/// new leader once this node has learnt that it lost the shard; `None` when it may propose:
/// nothing was held, or the handover failed and the hold ran out.
pub async fn wait_for_handover(node: &Node, replica: &ShardReplica, deadline: Instant) -> Option<Option<NodeId>> {
    let shard = replica.shard;
    node.holds.held(shard)?;
    let mut metrics = replica.raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.current_leader != Some(node.id) {
                return Some(m.current_leader);
            }
        }
        let until = node.holds.held(shard)?.min(deadline);
        match tokio::time::timeout_at(until.into(), metrics.changed()).await {
            Ok(Ok(())) => {}
            // The shard stopped: proposing reports it.
            Ok(Err(_)) => return None,
            Err(_) if Instant::now() >= deadline => return None,
            // The hold ran out: the next turn finds it gone.
            Err(_) => {}
        }
    }
}

/// How long a leader holds writes after it said `ready`: the asker's wait for the lease, its
/// election, and room for the new leader's first AppendEntries to reach the old one.
fn hold_for(node: &Node) -> Duration {
    let tuning = &node.config.tuning;
    Duration::from_millis(tuning.leader_lease_ms() + tuning.election_timeout_min_ms) + LEASE_MARGIN
}

/// Whether every replica of a shard was heard from lately.
fn all_replicas_alive(node: &Node, replicas: &[NodeId]) -> bool {
    let window = Duration::from_millis(node.config.tuning.election_timeout_min_ms);
    crate::liveness::replicas_alive(node, replicas, window) == replicas.len()
}

/// Answers a peer that asks to take over a shard this node leads.
pub async fn serve_transfer(node: &Node, request: pb::TransferLeaderRequest) -> pb::TransferLeaderReply {
    let (shard, to, term) = (request.shard, request.to_node, request.term);
    let refuse = |reason: String| {
        tracing::debug!(shard, to, term, %reason, "leadership transfer refused");
        pb::TransferLeaderReply { ready: false, reason, hold_ms: 0 }
    };
    let Some(replica) = node.shards.get(&shard) else {
        return refuse(format!("node {} does not host shard {shard}", node.id));
    };
    let replicas = node.layout.replicas(shard);
    if to == node.id || !replicas.contains(&to) {
        return refuse(format!("node {to} is not another replica of shard {shard}"));
    }
    if !leading_at(&replica.raft.metrics().borrow(), node.id, term) {
        return refuse(format!("node {} does not lead shard {shard} at term {term}", node.id));
    }
    // A leader that is stopping hands over whatever else is down: the alternative is an
    // election timeout.
    if !node.is_leaving() && !all_replicas_alive(node, &replicas) {
        return refuse(format!("not every replica of shard {shard} is reachable from node {}", node.id));
    }
    if !node.holds.start(shard, Instant::now() + CATCH_UP_LIMIT + hold_for(node)) {
        return refuse(format!("shard {shard} is already being handed over"));
    }
    // Writes are held from here: what is in the log now is all there is to catch up on.
    if !wait_caught_up(replica, node.id, term, to).await {
        node.holds.release(shard);
        return refuse(format!("node {to} did not catch up on shard {shard} within {CATCH_UP_LIMIT:?}"));
    }
    let hold = hold_for(node);
    node.holds.extend(shard, Instant::now() + hold);
    tracing::info!(shard, to, term, "handing shard leadership to its preferred node");
    pb::TransferLeaderReply { ready: true, reason: String::new(), hold_ms: hold.as_millis() as u64 }
}

/// Whether these metrics show node `id` leading at `term`.
fn leading_at(m: &RaftMetrics<NodeId, NodeAddr>, id: NodeId, term: u64) -> bool {
    m.state == ServerState::Leader && m.current_leader == Some(id) && m.current_term == term
}

/// Waits until this leader (at `term`) has applied its whole log and `to` has all of it.
async fn wait_caught_up(replica: &ShardReplica, id: NodeId, term: u64, to: NodeId) -> bool {
    // Ends early once this node no longer leads at `term`.
    let seen = replica
        .raft
        .wait(Some(CATCH_UP_LIMIT))
        .metrics(move |m| !leading_at(m, id, term) || caught_up(m, to), "leader applied and replica caught up")
        .await;
    seen.is_ok_and(|m| leading_at(&m, id, term) && caught_up(&m, to))
}

/// Whether these (leader's) metrics show its whole log applied and replicated to `to`.
fn caught_up(m: &RaftMetrics<NodeId, NodeAddr>, to: NodeId) -> bool {
    let last = m.last_log_index;
    let matched = m.replication.as_ref().and_then(|r| r.get(&to)).and_then(|l| l.as_ref()).map(|l| l.index);
    last.is_some() && m.last_applied.map(|l| l.index) == last && matched == last
}

/// Shards this node prefers to lead (it comes first in their placement) but follows, with
/// their current leader and term.
fn preferred_but_following(node: &Node) -> Vec<(ShardId, NodeId, u64)> {
    let mut out = Vec::new();
    for (&shard, replica) in &node.shards {
        if node.layout.initializer(shard) != node.id {
            continue;
        }
        let m = replica.raft.metrics();
        let m = m.borrow();
        if m.state == ServerState::Follower
            && let Some(leader) = m.current_leader.filter(|&l| l != node.id)
        {
            out.push((shard, leader, m.current_term));
        }
    }
    out
}

/// How long a stopping node waits for its shards to be taken over before it stops anyway.
pub const HAND_OFF_LIMIT: Duration = Duration::from_secs(5);

/// Hands every shard this node leads to another live replica, all at once, and waits (at most
/// [`HAND_OFF_LIMIT`]) until each is taken over or refused. Called once the node is leaving
/// ([`Node::leave`]), before it stops serving. Returns (handed over, led).
pub async fn hand_off_all(node: &Arc<Node>) -> (usize, usize) {
    let mut handoffs = tokio::task::JoinSet::new();
    let window = Duration::from_millis(node.config.tuning.election_timeout_min_ms);
    for (&shard, replica) in &node.shards {
        let term = {
            let m = replica.raft.metrics();
            let m = m.borrow();
            if !leading_at(&m, node.id, m.current_term) {
                continue;
            }
            m.current_term
        };
        // The shard's preferred node first (the balancer would move it there anyway), then
        // the others in placement order; only those heard from lately.
        let mut candidates: Vec<NodeId> = node.layout.replicas(shard).into_iter().filter(|&n| n != node.id).collect();
        candidates.sort_by_key(|&n| n != node.layout.initializer(shard));
        let Some(to) = candidates.into_iter().find(|&n| crate::liveness::replicas_alive(node, &[n], window) == 1)
        else {
            tracing::info!(shard, "no live replica to hand shard leadership to");
            continue;
        };
        let node = node.clone();
        handoffs.spawn(async move {
            let request = pb::TakeLeadershipRequest { shard, from_node: node.id, term };
            let reply = match node.peers.get(to) {
                None => Err(format!("node {to} is not a peer")),
                Some(mut client) => match tokio::time::timeout(HAND_OFF_LIMIT, client.take_leadership(request)).await {
                    Err(_) => Err(format!("node {to} did not take it over within {HAND_OFF_LIMIT:?}")),
                    Ok(Err(status)) => Err(format!("node {to}: {}", status.message())),
                    Ok(Ok(reply)) if reply.get_ref().taken => Ok(()),
                    Ok(Ok(reply)) => Err(format!("node {to}: {}", reply.into_inner().reason)),
                },
            };
            (shard, to, reply)
        });
    }
    let (mut handed, mut led) = (0, 0);
    while let Some(done) = handoffs.join_next().await {
        led += 1;
        match done {
            Ok((shard, to, Ok(()))) => {
                handed += 1;
                tracing::info!(shard, to, "handed shard leadership over before stopping");
            }
            Ok((shard, to, Err(reason))) => {
                tracing::warn!(shard, to, %reason, "could not hand shard leadership over; it will be elected")
            }
            Err(e) => tracing::warn!(error = %e, "a leadership hand-off task failed"),
        }
    }
    (handed, led)
}

/// Answers a stopping leader that asks this node to take `shard` over.
pub async fn serve_take_leadership(node: &Node, request: pb::TakeLeadershipRequest) -> pb::TakeLeadershipReply {
    let (shard, from, term) = (request.shard, request.from_node, request.term);
    if node.is_leaving() {
        return pb::TakeLeadershipReply { taken: false, reason: format!("node {} is stopping too", node.id) };
    }
    match take_over(node, shard, from, term).await {
        Ok(took) => {
            tracing::info!(
                shard,
                from,
                took_ms = took.as_millis() as u64,
                "took over shard leadership from a stopping node"
            );
            pb::TakeLeadershipReply { taken: true, reason: String::new() }
        }
        Err(Failed::Refused(reason) | Failed::Lost(reason)) => pb::TakeLeadershipReply { taken: false, reason },
    }
}

/// Every `every`, asks the leaders of the shards this node prefers to lead to hand them back,
/// all such shards at once. Ends on shutdown.
pub async fn prefer_leaders(node: Arc<Node>, every: Duration) {
    let mut ticker = ticker(every);
    // What each shard looked like at the previous look: only a leadership that stayed put for
    // a whole period is moved (never during an election, nor in a node's first period).
    let mut previous: Vec<(ShardId, NodeId, u64)> = Vec::new();
    // Shards whose last election to take them over was lost: how many in a row, and when to
    // try again. A refusal costs nothing and is retried at the next look; a lost election
    // costs an election, so those back off.
    let mut lost: HashMap<ShardId, (u32, Instant)> = HashMap::new();
    while node.next_tick(&mut ticker).await {
        if node.is_leaving() {
            continue;
        }
        let now = preferred_but_following(&node);
        // All at once: clients see one short pause rather than one per shard.
        let mut transfers = tokio::task::JoinSet::new();
        for &(shard, leader, term) in &now {
            if !previous.contains(&(shard, leader, term))
                || lost.get(&shard).is_some_and(|&(_, not_before)| Instant::now() < not_before)
                || !all_replicas_alive(&node, &node.layout.replicas(shard))
            {
                continue;
            }
            let node = node.clone();
            transfers.spawn(async move { (shard, leader, take_over(&node, shard, leader, term).await) });
        }
        loop {
            let done = tokio::select! {
                // Dropping the set aborts the transfers; a leader's hold ends by itself.
                _ = node.peers_shutdown.cancelled() => return,
                done = transfers.join_next() => done,
            };
            let Some(done) = done else { break };
            let Ok((shard, leader, outcome)) = done else { continue };
            match outcome {
                Ok(took) => {
                    lost.remove(&shard);
                    tracing::info!(
                        shard,
                        from = leader,
                        took_ms = took.as_millis() as u64,
                        "took over shard leadership"
                    );
                }
                Err(Failed::Refused(reason)) => {
                    // Retried at every look (a replica catching up, a peer of an earlier
                    // version): not worth a line each time.
                    tracing::debug!(shard, from = leader, %reason, "shard leadership stays where it is for now");
                }
                Err(Failed::Lost(reason)) => {
                    let failures = lost.get(&shard).map_or(0, |&(n, _)| n) + 1;
                    let pause = every * (1u32 << failures.min(6));
                    lost.insert(shard, (failures, Instant::now() + pause));
                    tracing::warn!(shard, from = leader, %reason, retry_in_s = pause.as_secs(), "could not take over shard leadership");
                }
            }
        }
        previous = now;
    }
}

/// Why a transfer did not happen.
enum Failed {
    /// Before any election: nothing changed.
    Refused(String),
    /// The election was called and not won.
    Lost(String),
}

/// Asks `leader` to hand `shard` over, and calls the election when it is ready. Returns how
/// long the shard's writes were held (about), or why the transfer did not happen.
async fn take_over(node: &Node, shard: ShardId, leader: NodeId, term: u64) -> Result<Duration, Failed> {
    let refused = Failed::Refused;
    let replica = node.shards.get(&shard).ok_or_else(|| refused(format!("shard {shard} is not hosted here")))?;
    let mut client = node.peers.get(leader).ok_or_else(|| refused(format!("node {leader} is not a peer")))?;
    let started = Instant::now();
    let request = pb::TransferLeaderRequest { shard, to_node: node.id, term };
    let reply = match tokio::time::timeout(ASK_TIMEOUT, client.transfer_leader(request)).await {
        Err(_) => return Err(refused(format!("node {leader} did not answer within {ASK_TIMEOUT:?}"))),
        Ok(Err(status)) => return Err(refused(format!("node {leader}: {}", status.message()))),
        Ok(Ok(reply)) => reply.into_inner(),
    };
    if !reply.ready {
        return Err(refused(format!("node {leader}: {}", reply.reason)));
    }
    let ready_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(node.config.tuning.leader_lease_ms()) + LEASE_MARGIN).await;
    {
        let m = replica.raft.metrics();
        let m = m.borrow();
        if m.current_term != term || m.current_leader != Some(leader) {
            return Err(refused(format!("shard {shard} changed leadership meanwhile (term {})", m.current_term)));
        }
    }
    replica.raft.trigger().elect().await.map_err(|e| refused(format!("shard {shard} stopped: {e}")))?;
    // Report how it went; the hold on the old leader ends by itself either way.
    let remaining = Duration::from_millis(reply.hold_ms).saturating_sub(ready_at.elapsed());
    match replica.raft.wait(Some(remaining)).state(ServerState::Leader, "won the transfer election").await {
        Ok(_) => Ok(started.elapsed()),
        Err(_) => Err(Failed::Lost(format!("the election for shard {shard} was not won in time"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_lasts_until_its_instant_or_its_release_and_is_not_taken_twice() {
        let holds = Holds::default();
        assert_eq!(holds.held(3), None);
        let until = Instant::now() + Duration::from_secs(60);
        assert!(holds.start(3, until));
        assert!(!holds.start(3, until), "a shard already being handed over is not handed over twice");
        assert_eq!(holds.held(3), Some(until));
        assert_eq!(holds.held(4), None, "holds are per shard");
        holds.release(3);
        assert_eq!(holds.held(3), None);

        assert!(holds.start(5, Instant::now()));
        assert_eq!(holds.held(5), None, "an expired hold holds nothing");
        assert!(holds.start(5, until), "and does not block the next one");
    }
}
