//! Executing a request on the right node: the shard leader for writes and linearizable reads,
//! any replica for local reads. A node that cannot serve a request itself forwards it over
//! gRPC, follows leader changes, and retries until the request deadline.
//!
//! The error a client finally gets says whether the write may have happened:
//! - `unavailable`: no attempt could have appended it (no leader found, the leader had lost its
//!   quorum, connections refused) — nothing was written;
//! - `timeout` (indeterminate): an attempt reached a leader and its outcome is unknown — retry
//!   with the same (client_id, client_seq) to learn it.

use std::time::{Duration, Instant};

use chorus_proto::client;
use chorus_proto::peer::{self as pb};
use chorus_proto::storage::{Command, Op, op};
use chorus_raft::blocking::off_runtime;
use chorus_raft::state_machine::rooms::RoomView;
use chorus_raft::state_machine::sync::{MAX_SYNC_MESSAGES, SyncPage, SyncQuery};
use chorus_raft::state_machine::{CURRENT_RULES, MAX_PAGE};
use chorus_raft::{HistoryPage, HistoryQuery, NodeId, OpOutcome, ShardId, SharedCommand};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};

use crate::auth::now_ms;
use crate::error::ServiceError;
use crate::node::Node;

/// The outcome of one operation of a proposal.
pub type OpResult = Result<OpOutcome, ServiceError>;

/// One attempt at a target node.
enum Attempt<T> {
    Done(T),
    /// Not the leader; here is who is, if known. Nothing was proposed.
    Redirect(Option<NodeId>),
    /// Try elsewhere or later. `maybe_applied`: the write may have been appended.
    Retry {
        maybe_applied: bool,
        reason: String,
    },
    /// Final: do not retry.
    Failed(ServiceError),
}

/// A transport error where the request certainly never left this node.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((20u64 << attempt.min(4)).min(300))
}

/// Drives attempts across the shard's replicas until one succeeds or the deadline passes.
/// `attempt` returns, for a target node, what happened there.
async fn with_leader<T, F, Fut>(
    node: &Node,
    shard: ShardId,
    leader_only: bool,
    mut attempt: F,
) -> Result<T, ServiceError>
where
    F: FnMut(NodeId, Duration) -> Fut,
    Fut: std::future::Future<Output = Attempt<T>>,
{
    let deadline = Instant::now() + node.config.request_timeout;
    let replicas = node.layout.replicas(shard);
    let mut maybe_applied = false;
    let mut last_reason = String::from("no replica answered");
    let mut rotation = 0usize;
    let mut failures = 0u32;
    let mut hint = if leader_only { node.leader_hint(shard) } else { None };
    if !leader_only && node.shards.contains_key(&shard) {
        hint = Some(node.id);
    }
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        if node.clients_shutdown.is_cancelled() && node.peers_shutdown.is_cancelled() {
            return Err(ServiceError::ShuttingDown);
        }
        let target = hint.take().unwrap_or_else(|| {
            rotation += 1;
            replicas[rotation % replicas.len()]
        });
        match attempt(target, remaining).await {
            Attempt::Done(value) => return Ok(value),
            Attempt::Failed(e) => return Err(e),
            Attempt::Redirect(leader) => {
                node.remember_leader(shard, leader);
                last_reason = match leader {
                    Some(l) => format!("node {target} says node {l} leads shard {shard}"),
                    None => format!("node {target} knows no leader for shard {shard}"),
                };
                if let Some(l) = leader.filter(|&l| l != target) {
                    hint = Some(l);
                    continue; // a fresh lead: try it at once
                }
            }
            Attempt::Retry { maybe_applied: m, reason } => {
                maybe_applied |= m;
                last_reason = reason;
            }
        }
        failures += 1;
        let pause = backoff(failures).min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(pause).await;
    }
    if maybe_applied {
        Err(ServiceError::Timeout { reason: format!("shard {shard}: the outcome is unknown ({last_reason})") })
    } else {
        Err(ServiceError::Unavailable { reason: format!("no leader for shard {shard} ({last_reason})") })
    }
}

/// Proposes `ops` to `shard` and returns one result per op. Validated here first (cheap
/// refusals never leave this node), again by the leader, and finally by the state machine.
pub async fn propose(node: &Node, shard: ShardId, ops: Vec<op::Kind>) -> Result<Vec<OpResult>, ServiceError> {
    let command = Command {
        ts_ms: 0,
        ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
        rules: CURRENT_RULES,
        notify_after_ms: 0,
    };
    node.config.limits.check_batch(&command)?;
    with_leader(node, shard, true, |target, remaining| {
        let command = command.clone();
        async move {
            if target == node.id {
                propose_here(node, shard, command, remaining).await
            } else {
                propose_at(node, target, shard, command, remaining).await
            }
        }
    })
    .await
}

/// Proposes one operation to `shard` (in an entry of its own) and returns its result.
pub async fn propose_one(node: &Node, shard: ShardId, op: op::Kind) -> OpResult {
    let mut results = propose(node, shard, vec![op]).await?;
    match (results.pop(), results.is_empty()) {
        (Some(result), true) => result,
        _ => Err(ServiceError::Internal("a proposal of one operation got another number of results".into())),
    }
}

/// Proposes on this node if it leads `shard`. Used for local requests and for requests that
/// peers forwarded here (which are never forwarded again).
async fn propose_here(
    node: &Node,
    shard: ShardId,
    mut command: Command,
    remaining: Duration,
) -> Attempt<Vec<OpResult>> {
    let Some(replica) = node.shards.get(&shard) else {
        return Attempt::Redirect(None);
    };
    // Only the leader field: cloning the whole metrics (membership, replication maps) on every
    // proposal would allocate for nothing.
    let leader = replica.raft.metrics().borrow().current_leader;
    if leader != Some(node.id) {
        return Attempt::Redirect(leader);
    }
    // A leader that has not heard from a quorum of its shard's nodes for an election timeout
    // has probably been deposed or cut off: do not append to a log that may never commit.
    let window = Duration::from_millis(node.config.tuning.election_timeout_max_ms);
    if !crate::liveness::quorum_alive(node, &node.layout.replicas(shard), window) {
        return Attempt::Retry {
            maybe_applied: false,
            reason: format!("the leader of shard {shard} has not heard from a quorum of its replicas for {window:?}"),
        };
    }
    for op in &command.ops {
        if let Some(kind) = &op.kind
            && let Err(e) = node.config.limits.check_op(kind)
        {
            return Attempt::Failed(e.into());
        }
    }
    // The shard's leadership is moving: wait for the new leader rather than append here.
    if let Some(new_leader) = crate::balance::wait_for_handover(node, replica, Instant::now() + remaining).await {
        return Attempt::Redirect(new_leader);
    }
    command.ts_ms = now_ms();
    // The leader's rules decide how the entry applies, whoever forwarded it.
    command.rules = CURRENT_RULES;
    // So is whether its mentions queue notifications (only a leader with a webhook sends them).
    command.notify_after_ms = node.config.notify.as_ref().map_or(0, |n| n.delay.as_millis() as u64);
    match tokio::time::timeout(remaining, replica.raft.client_write(SharedCommand::new(command))).await {
        Ok(Ok(response)) => {
            Attempt::Done(response.data.results.into_iter().map(|r| r.map_err(ServiceError::Command)).collect())
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Attempt::Redirect(f.leader_id),
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            Attempt::Failed(ServiceError::Internal(e.to_string()))
        }
        Ok(Err(RaftError::Fatal(e))) => {
            Attempt::Retry { maybe_applied: true, reason: format!("shard {shard} stopped on node {}: {e}", node.id) }
        }
        Err(_) => Attempt::Failed(ServiceError::Timeout {
            reason: format!("shard {shard} did not commit the write in time; it may still be applied"),
        }),
    }
}

async fn propose_at(
    node: &Node,
    target: NodeId,
    shard: ShardId,
    command: Command,
    remaining: Duration,
) -> Attempt<Vec<OpResult>> {
    let Some(mut client) = node.peers.get(target) else {
        return Attempt::Retry { maybe_applied: false, reason: format!("node {target} is not a peer") };
    };
    let request = pb::ProposeRequest { shard, command: Some(command), timeout_ms: remaining.as_millis() as u64 };
    let reply = match tokio::time::timeout(remaining, client.propose(request)).await {
        Err(_) => {
            return Attempt::Failed(ServiceError::Timeout {
                reason: format!("node {target} did not answer in time; the write may still be applied"),
            });
        }
        Ok(Err(status)) => {
            return Attempt::Retry {
                maybe_applied: !never_sent(&status),
                reason: format!("node {target}: {}", status.message()),
            };
        }
        Ok(Ok(reply)) => reply.into_inner(),
    };
    use pb::propose_reply::Result as R;
    match reply.result {
        Some(R::Results(results)) => Attempt::Done(results.results.into_iter().map(op_result_from_pb).collect()),
        Some(R::NotLeader(n)) => Attempt::Redirect((n.leader_hint != 0).then_some(n.leader_hint)),
        Some(R::Error(e)) if e.code == "unavailable" || e.code == "shutting_down" => {
            Attempt::Retry { maybe_applied: e.indeterminate, reason: format!("node {target}: {}", e.message) }
        }
        Some(R::Error(e)) => Attempt::Failed(ServiceError::from_wire(e)),
        None => Attempt::Retry { maybe_applied: true, reason: format!("node {target} sent an empty reply") },
    }
}

/// Serves a Propose forwarded by a peer: only if this node leads the shard.
pub async fn serve_forwarded_propose(node: &Node, request: pb::ProposeRequest) -> pb::ProposeReply {
    use pb::propose_reply::Result as R;
    let Some(command) = request.command else {
        let e = ServiceError::Malformed("Propose without a command".into());
        return pb::ProposeReply { result: Some(R::Error(e.to_wire())) };
    };
    if let Err(e) = node.config.limits.check_batch(&command) {
        return pb::ProposeReply { result: Some(R::Error(ServiceError::from(e).to_wire())) };
    }
    let timeout = Duration::from_millis(request.timeout_ms).min(node.config.request_timeout);
    let result = match propose_here(node, request.shard, command, timeout).await {
        Attempt::Done(results) => R::Results(pb::OpResults { results: results.iter().map(op_result_to_pb).collect() }),
        Attempt::Redirect(leader) => R::NotLeader(pb::NotLeader { leader_hint: leader.unwrap_or(0) }),
        Attempt::Retry { maybe_applied, reason } => {
            let e = if maybe_applied { ServiceError::Timeout { reason } } else { ServiceError::Unavailable { reason } };
            R::Error(e.to_wire())
        }
        Attempt::Failed(e) => R::Error(e.to_wire()),
    };
    pb::ProposeReply { result: Some(result) }
}

pub fn op_result_to_pb(result: &OpResult) -> pb::OpResult {
    use pb::op_result::Result as R;
    let r = match result {
        Ok(OpOutcome::RoomCreated { room_id, ts_ms }) => {
            R::RoomCreated(pb::RoomCreated { room_id: *room_id, ts_ms: *ts_ms })
        }
        Ok(OpOutcome::Appended { seq, ts_ms, duplicate }) => {
            R::Appended(pb::Appended { seq: *seq, ts_ms: *ts_ms, duplicate: *duplicate })
        }
        Ok(OpOutcome::MembershipChanged { seq, ts_ms }) => {
            R::MembershipChanged(pb::MembershipChanged { seq: *seq, ts_ms: *ts_ms })
        }
        Ok(OpOutcome::DirectOpened { created }) => R::DirectOpened(pb::DirectOpened { created: *created }),
        Ok(OpOutcome::MarkedRead { read_seq, unread, mentions }) => {
            R::MarkedRead(pb::MarkedRead { read_seq: *read_seq, unread: *unread, mentions: *mentions })
        }
        Ok(OpOutcome::SessionCreated { user, expires_ms, admin }) => {
            R::SessionCreated(pb::SessionCreated { user: user.clone(), expires_ms: *expires_ms, admin: *admin })
        }
        Ok(OpOutcome::Done { ts_ms }) => R::Done(pb::Done { ts_ms: *ts_ms }),
        Err(e) => R::Refused(e.to_wire()),
    };
    pb::OpResult { result: Some(r) }
}

fn op_result_from_pb(result: pb::OpResult) -> OpResult {
    use pb::op_result::Result as R;
    match result.result {
        Some(R::RoomCreated(c)) => Ok(OpOutcome::RoomCreated { room_id: c.room_id, ts_ms: c.ts_ms }),
        Some(R::Appended(a)) => Ok(OpOutcome::Appended { seq: a.seq, ts_ms: a.ts_ms, duplicate: a.duplicate }),
        Some(R::MembershipChanged(m)) => Ok(OpOutcome::MembershipChanged { seq: m.seq, ts_ms: m.ts_ms }),
        Some(R::DirectOpened(d)) => Ok(OpOutcome::DirectOpened { created: d.created }),
        Some(R::MarkedRead(m)) => {
            Ok(OpOutcome::MarkedRead { read_seq: m.read_seq, unread: m.unread, mentions: m.mentions })
        }
        Some(R::SessionCreated(s)) => {
            Ok(OpOutcome::SessionCreated { user: s.user, expires_ms: s.expires_ms, admin: s.admin })
        }
        Some(R::Done(d)) => Ok(OpOutcome::Done { ts_ms: d.ts_ms }),
        Some(R::Refused(e)) => Err(ServiceError::from_wire(e)),
        None => Err(ServiceError::Internal("a peer sent an empty operation result".into())),
    }
}

/// Reads a page of `room`'s history: through the leader (linearizable) or from any replica.
pub async fn history(
    node: &Node,
    shard: ShardId,
    room: &str,
    viewer: &str,
    query: HistoryQuery,
    linearizable: bool,
) -> Result<HistoryPage, ServiceError> {
    chorus_raft::limits::validate_room_name(room)?;
    let request = history_request(room, query, linearizable);
    with_leader(node, shard, linearizable, |target, remaining| {
        let request = request.clone();
        async move {
            if target == node.id {
                history_here(node, shard, room, viewer, query, linearizable, remaining).await
            } else {
                let read = pb::ReadRequest {
                    shard,
                    linearizable,
                    query: Some(pb::read_request::Query::History(request)),
                    viewer: viewer.to_owned(),
                };
                read_reply_at(node, target, read, remaining, |reply| match reply {
                    pb::read_reply::Result::History(page) => Some(history_page_from_pb(page)),
                    _ => None,
                })
                .await
            }
        }
    })
    .await
}

fn history_request(room: &str, query: HistoryQuery, linearizable: bool) -> client::History {
    let (position, limit) = match query {
        HistoryQuery::After { after, limit } => (client::history::Position::After(after), limit),
        HistoryQuery::Before { before, limit } => (client::history::Position::Before(before), limit),
    };
    client::History {
        room: room.to_owned(),
        position: Some(position),
        limit: limit as u32,
        consistency: if linearizable { client::Consistency::Linearizable } else { client::Consistency::Local } as i32,
    }
}

/// A history query as the client sent it. The default page is 100 messages; `before` 0 or
/// absent means "the newest".
pub fn history_query(h: &client::History) -> HistoryQuery {
    let limit = match h.limit {
        0 => 100,
        n => (n as usize).min(chorus_raft::state_machine::MAX_PAGE),
    };
    match h.position {
        Some(client::history::Position::After(after)) => HistoryQuery::After { after, limit },
        Some(client::history::Position::Before(0)) | None => HistoryQuery::Before { before: u64::MAX, limit },
        Some(client::history::Position::Before(before)) => HistoryQuery::Before { before, limit },
    }
}

/// On the shard's leader, confirms the leadership with a quorum and waits until the replica
/// has applied everything committed before: what it reads next is linearizable.
async fn linearizable_here<T>(node: &Node, shard: ShardId, remaining: Duration) -> Result<(), Attempt<T>> {
    let Some(replica) = node.shards.get(&shard) else {
        return Err(Attempt::Redirect(None));
    };
    match tokio::time::timeout(remaining, replica.raft.ensure_linearizable()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(Attempt::Redirect(f.leader_id)),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
            Err(Attempt::Retry { maybe_applied: false, reason: format!("shard {shard}: {e}") })
        }
        Ok(Err(RaftError::Fatal(e))) => {
            Err(Attempt::Retry { maybe_applied: false, reason: format!("shard {shard} stopped: {e}") })
        }
        Err(_) => Err(Attempt::Retry {
            maybe_applied: false,
            reason: format!("shard {shard} could not confirm its leadership in time"),
        }),
    }
}

async fn history_here(
    node: &Node,
    shard: ShardId,
    room: &str,
    viewer: &str,
    query: HistoryQuery,
    linearizable: bool,
    remaining: Duration,
) -> Attempt<HistoryPage> {
    let Some(replica) = node.shards.get(&shard) else {
        return Attempt::Redirect(None);
    };
    if linearizable && let Err(stop) = linearizable_here(node, shard, remaining).await {
        return stop;
    }
    match off_runtime(|| replica.reader.history(room, query, viewer)) {
        Ok(page) => Attempt::Done(cap_page_bytes(page)),
        Err(e) => Attempt::Failed(e.into()),
    }
}

/// A room's members, for `viewer`, read through the shard's leader.
pub async fn members(
    node: &Node,
    shard: ShardId,
    viewer: &str,
    request: client::Members,
) -> Result<client::MemberList, ServiceError> {
    with_leader(node, shard, true, |target, remaining| {
        let request = request.clone();
        async move {
            if target == node.id {
                return members_here(node, shard, viewer, &request, remaining).await;
            }
            let read = pb::ReadRequest {
                shard,
                linearizable: true,
                query: Some(pb::read_request::Query::Members(request)),
                viewer: viewer.to_owned(),
            };
            read_reply_at(node, target, read, remaining, |reply| match reply {
                pb::read_reply::Result::Members(list) => Some(list),
                _ => None,
            })
            .await
        }
    })
    .await
}

async fn members_here(
    node: &Node,
    shard: ShardId,
    viewer: &str,
    request: &client::Members,
    remaining: Duration,
) -> Attempt<client::MemberList> {
    let Some(replica) = node.shards.get(&shard) else {
        return Attempt::Redirect(None);
    };
    if let Err(stop) = linearizable_here(node, shard, remaining).await {
        return stop;
    }
    let limit = if request.limit == 0 { 100 } else { (request.limit as usize).min(MAX_PAGE) };
    match off_runtime(|| replica.reader.members(&request.room, viewer, &request.after, limit)) {
        Ok((members, more)) => Attempt::Done(client::MemberList {
            room: request.room.clone(),
            members: members
                .into_iter()
                .map(|m| {
                    // Members see each other's shared receipts; a user sees their own marker.
                    let read_seq = if m.user == viewer { m.read_seq } else { m.shared_read_seq };
                    client::Member { user: m.user, state: m.state, role: m.role, since_ms: m.since_ms, read_seq }
                })
                .collect(),
            more,
        }),
        Err(e) => Attempt::Failed(e.into()),
    }
}

/// Waits until this node's replica of `shard` has applied everything its leader had committed
/// when asked (the leader confirms its leadership first): reads of the replica after this see
/// every write acknowledged before the call.
pub async fn catch_up_with_leader(node: &Node, shard: ShardId) -> Result<(), ServiceError> {
    let Some(replica) = node.shards.get(&shard) else {
        return Err(ServiceError::Internal(format!("shard {shard} is not hosted here")));
    };
    let index = with_leader(node, shard, true, |target, remaining| async move {
        if target == node.id {
            return read_index_here(node, shard, remaining).await;
        }
        let Some(mut client) = node.peers.get(target) else {
            return Attempt::Retry { maybe_applied: false, reason: format!("node {target} is not a peer") };
        };
        match tokio::time::timeout(remaining, client.read_index(pb::ReadIndexRequest { shard })).await {
            Err(_) => Attempt::Retry { maybe_applied: false, reason: format!("node {target} did not answer in time") },
            Ok(Err(status)) => {
                Attempt::Retry { maybe_applied: false, reason: format!("node {target}: {}", status.message()) }
            }
            Ok(Ok(reply)) => match reply.into_inner().result {
                Some(pb::read_index_reply::Result::Index(index)) => Attempt::Done(index),
                Some(pb::read_index_reply::Result::NotLeader(n)) => {
                    Attempt::Redirect((n.leader_hint != 0).then_some(n.leader_hint))
                }
                Some(pb::read_index_reply::Result::Error(e)) => {
                    Attempt::Retry { maybe_applied: false, reason: format!("node {target}: {}", e.message) }
                }
                None => Attempt::Retry { maybe_applied: false, reason: format!("node {target} sent an empty reply") },
            },
        }
    })
    .await?;
    replica
        .raft
        .wait(Some(node.config.request_timeout))
        .applied_index_at_least(Some(index), "catching up with the leader")
        .await
        .map_err(|e| ServiceError::Unavailable { reason: format!("shard {shard}: this replica is behind: {e}") })?;
    Ok(())
}

async fn read_index_here(node: &Node, shard: ShardId, remaining: Duration) -> Attempt<u64> {
    let Some(replica) = node.shards.get(&shard) else {
        return Attempt::Redirect(None);
    };
    match tokio::time::timeout(remaining, replica.raft.get_read_log_id()).await {
        Ok(Ok((read, applied))) => Attempt::Done(read.max(applied).map_or(0, |id| id.index)),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Attempt::Redirect(f.leader_id),
        Ok(Err(e)) => Attempt::Retry { maybe_applied: false, reason: format!("shard {shard}: {e}") },
        Err(_) => Attempt::Retry {
            maybe_applied: false,
            reason: format!("shard {shard} could not confirm its leadership in time"),
        },
    }
}

/// Serves a ReadIndex asked by a peer: only if this node leads the shard.
pub async fn serve_read_index(node: &Node, request: pb::ReadIndexRequest) -> pb::ReadIndexReply {
    use pb::read_index_reply::Result as R;
    let result = match read_index_here(node, request.shard, node.config.request_timeout).await {
        Attempt::Done(index) => R::Index(index),
        Attempt::Redirect(l) => R::NotLeader(pb::NotLeader { leader_hint: l.unwrap_or(0) }),
        Attempt::Retry { reason, .. } => R::Error(ServiceError::Unavailable { reason }.to_wire()),
        Attempt::Failed(e) => R::Error(e.to_wire()),
    };
    pb::ReadIndexReply { result: Some(result) }
}

/// Pages stay under about 4 MiB whatever the message sizes: a client reads on from the last
/// message it got.
const MAX_PAGE_BYTES: usize = 4 << 20;

/// Bytes of rooms one shard puts in a Sync page before it stops (and says `more`); the merged
/// reply is cut at the same size (see `requests::sync`).
pub const SYNC_PAGE_BYTES: usize = 1 << 20;

fn cap_page_bytes(mut page: HistoryPage) -> HistoryPage {
    let mut total = 0;
    let keep = page
        .messages
        .iter()
        .take_while(|m| {
            total += m.body.len() + m.sender.len() + 64;
            total <= MAX_PAGE_BYTES
        })
        .count()
        .max(1)
        .min(page.messages.len());
    page.messages.truncate(keep);
    page
}

/// A read at `target`, its reply taken by `pick` (`None`: a reply of the wrong kind). A read
/// never changes anything, so a failed attempt may always be retried elsewhere.
async fn read_reply_at<T>(
    node: &Node,
    target: NodeId,
    read: pb::ReadRequest,
    remaining: Duration,
    pick: impl FnOnce(pb::read_reply::Result) -> Option<T>,
) -> Attempt<T> {
    match read_at(node, target, read, remaining).await {
        Attempt::Done(reply) => match pick(reply) {
            Some(value) => Attempt::Done(value),
            None => Attempt::Retry { maybe_applied: false, reason: format!("node {target} sent a wrong reply") },
        },
        Attempt::Redirect(l) => Attempt::Redirect(l),
        Attempt::Retry { reason, .. } => Attempt::Retry { maybe_applied: false, reason },
        Attempt::Failed(e) => Attempt::Failed(e),
    }
}

async fn read_at(
    node: &Node,
    target: NodeId,
    request: pb::ReadRequest,
    remaining: Duration,
) -> Attempt<pb::read_reply::Result> {
    let Some(mut client) = node.peers.get(target) else {
        return Attempt::Retry { maybe_applied: false, reason: format!("node {target} is not a peer") };
    };
    let reply = match tokio::time::timeout(remaining, client.read(request)).await {
        Err(_) => {
            return Attempt::Retry { maybe_applied: false, reason: format!("node {target} did not answer in time") };
        }
        Ok(Err(status)) => {
            return Attempt::Retry { maybe_applied: false, reason: format!("node {target}: {}", status.message()) };
        }
        Ok(Ok(reply)) => reply.into_inner(),
    };
    use pb::read_reply::Result as R;
    match reply.result {
        Some(R::NotLeader(n)) => Attempt::Redirect((n.leader_hint != 0).then_some(n.leader_hint)),
        Some(R::Error(e)) if e.code == "unavailable" || e.code == "shutting_down" => {
            Attempt::Retry { maybe_applied: false, reason: format!("node {target}: {}", e.message) }
        }
        Some(R::Error(e)) => Attempt::Failed(ServiceError::from_wire(e)),
        Some(other) => Attempt::Done(other),
        None => Attempt::Retry { maybe_applied: false, reason: format!("node {target} sent an empty reply") },
    }
}

/// Serves a Read forwarded by a peer from this node's replica (never forwarded again).
pub async fn serve_forwarded_read(node: &Node, request: pb::ReadRequest) -> pb::ReadReply {
    use pb::read_reply::Result as R;
    let remaining = node.config.request_timeout;
    let viewer = request.viewer.as_str();
    if let Err(e) = chorus_raft::limits::validate_user_name(viewer) {
        return pb::ReadReply { result: Some(R::Error(ServiceError::from(e).to_wire())) };
    }
    fn answer<T>(attempt: Attempt<T>, done: impl FnOnce(T) -> R) -> R {
        match attempt {
            Attempt::Done(value) => done(value),
            Attempt::Redirect(l) => R::NotLeader(pb::NotLeader { leader_hint: l.unwrap_or(0) }),
            Attempt::Retry { reason, .. } => R::Error(ServiceError::Unavailable { reason }.to_wire()),
            Attempt::Failed(e) => R::Error(e.to_wire()),
        }
    }
    let result = match request.query {
        Some(pb::read_request::Query::History(h)) => {
            let query = history_query(&h);
            let attempt = history_here(node, request.shard, &h.room, viewer, query, request.linearizable, remaining);
            answer(attempt.await, |page| R::History(history_page_to_pb(&h.room, page)))
        }
        Some(pb::read_request::Query::Members(m)) => {
            answer(members_here(node, request.shard, viewer, &m, remaining).await, R::Members)
        }
        Some(pb::read_request::Query::ListRooms(l)) => {
            let attempt = rooms_here(node, request.shard, viewer, &l, request.linearizable, remaining);
            answer(attempt.await, R::RoomPage)
        }
        Some(pb::read_request::Query::MemberOf(room)) => {
            let attempt = async {
                if request.linearizable
                    && let Err(stop) = linearizable_here(node, request.shard, remaining).await
                {
                    return stop;
                }
                member_of_here(node, request.shard, viewer, &room)
            };
            answer(attempt.await, R::Member)
        }
        Some(pb::read_request::Query::Sync(q)) => {
            answer(sync_here(node, request.shard, viewer, &q, remaining).await, R::Sync)
        }
        None => R::Error(ServiceError::Malformed("Read without a query".into()).to_wire()),
    };
    pb::ReadReply { result: Some(result) }
}

/// One shard's page of rooms on this node's replica (after confirming its leadership when
/// `linearizable`). The page size is the caller's, bounded by the protocol's page limit.
async fn rooms_here(
    node: &Node,
    shard: ShardId,
    viewer: &str,
    request: &client::ListRooms,
    linearizable: bool,
    remaining: Duration,
) -> Attempt<pb::ShardRoomPage> {
    let Some(replica) = node.shards.get(&shard) else {
        return Attempt::Redirect(None);
    };
    if linearizable && let Err(stop) = linearizable_here(node, shard, remaining).await {
        return stop;
    }
    let after = (!request.after.is_empty()).then_some(request.after.as_str());
    let limit = (request.limit as usize).clamp(1, chorus_raft::state_machine::MAX_PAGE);
    match off_runtime(|| replica.reader.list_rooms(after, limit, viewer, request.mine)) {
        Ok(page) => Attempt::Done(room_page_to_pb(shard, page)),
        Err(e) => Attempt::Failed(e.into()),
    }
}

fn room_page_to_pb(shard: ShardId, page: chorus_raft::state_machine::rooms::RoomPage) -> pb::ShardRoomPage {
    pb::ShardRoomPage {
        rooms: page.rooms.into_iter().map(|r| room_info(shard, r)).collect(),
        scanned_to: page.scanned_to.unwrap_or_default(),
    }
}

/// The rooms of one shard after `after` that `viewer` can see: read through the shard's leader
/// when `linearizable`, else from any replica (this node's first).
pub async fn list_rooms_of_shard(
    node: &Node,
    shard: ShardId,
    viewer: &str,
    request: &client::ListRooms,
    linearizable: bool,
) -> Result<pb::ShardRoomPage, ServiceError> {
    with_leader(node, shard, linearizable, |target, remaining| {
        let request = request.clone();
        async move {
            if target == node.id {
                return rooms_here(node, shard, viewer, &request, linearizable, remaining).await;
            }
            let read = pb::ReadRequest {
                shard,
                linearizable,
                query: Some(pb::read_request::Query::ListRooms(request)),
                viewer: viewer.to_owned(),
            };
            let page = read_reply_at(node, target, read, remaining, |reply| match reply {
                pb::read_reply::Result::RoomPage(page) => Some(page),
                _ => None,
            });
            match page.await {
                // A non-replica answering NotLeader: try the next replica.
                Attempt::Redirect(_) => Attempt::Retry {
                    maybe_applied: false,
                    reason: format!("node {target} does not host shard {shard}"),
                },
                other => other,
            }
        }
    })
    .await
}

/// Whether `viewer` is a joined member of `room` (for typing): asked of a replica of its
/// shard (this node's first), and, when that says no, of the leader, so that a member who has
/// just joined is not refused by a replica a moment behind.
pub async fn is_joined(node: &Node, room: &str, viewer: &str) -> Result<bool, ServiceError> {
    let shard = node.layout.router.shard_for_room(room);
    let joined = |m: &client::Member| m.state == client::MembershipState::Joined as i32;
    if joined(&member_of(node, shard, viewer, room, false).await?) {
        return Ok(true);
    }
    Ok(joined(&member_of(node, shard, viewer, room, true).await?))
}

/// `viewer`'s own membership of `room`, read on a replica of its shard (this node's first), or
/// through its leader when `linearizable`.
pub async fn member_of(
    node: &Node,
    shard: ShardId,
    viewer: &str,
    room: &str,
    linearizable: bool,
) -> Result<client::Member, ServiceError> {
    with_leader(node, shard, linearizable, |target, remaining| async move {
        if target == node.id {
            if linearizable && let Err(stop) = linearizable_here(node, shard, remaining).await {
                return stop;
            }
            return member_of_here(node, shard, viewer, room);
        }
        let read = pb::ReadRequest {
            shard,
            linearizable,
            query: Some(pb::read_request::Query::MemberOf(room.to_owned())),
            viewer: viewer.to_owned(),
        };
        let member = read_reply_at(node, target, read, remaining, |reply| match reply {
            pb::read_reply::Result::Member(member) => Some(member),
            _ => None,
        });
        match member.await {
            Attempt::Redirect(_) => {
                Attempt::Retry { maybe_applied: false, reason: format!("node {target} does not host shard {shard}") }
            }
            other => other,
        }
    })
    .await
}

fn member_of_here(node: &Node, shard: ShardId, viewer: &str, room: &str) -> Attempt<client::Member> {
    let Some(replica) = node.shards.get(&shard) else {
        return Attempt::Redirect(None);
    };
    if let Err(e) = chorus_raft::limits::validate_room_name(room) {
        return Attempt::Failed(e.into());
    }
    match replica.reader.member(room, viewer) {
        Ok(Some(m)) => Attempt::Done(client::Member {
            user: m.user,
            state: m.state,
            role: m.role,
            since_ms: m.since_ms,
            read_seq: m.read_seq,
        }),
        Ok(None) => Attempt::Done(client::Member { user: viewer.to_owned(), ..Default::default() }),
        Err(e) => Attempt::Failed(e.into()),
    }
}

/// One shard's part of a Sync for `viewer`, read through the shard's leader.
pub async fn sync_of_shard(
    node: &Node,
    shard: ShardId,
    viewer: &str,
    request: &pb::SyncShard,
) -> Result<pb::ShardSync, ServiceError> {
    with_leader(node, shard, true, |target, remaining| {
        let request = request.clone();
        async move {
            if target == node.id {
                return sync_here(node, shard, viewer, &request, remaining).await;
            }
            let read = pb::ReadRequest {
                shard,
                linearizable: true,
                query: Some(pb::read_request::Query::Sync(request)),
                viewer: viewer.to_owned(),
            };
            read_reply_at(node, target, read, remaining, |reply| match reply {
                pb::read_reply::Result::Sync(page) => Some(page),
                _ => None,
            })
            .await
        }
    })
    .await
}

async fn sync_here(
    node: &Node,
    shard: ShardId,
    viewer: &str,
    request: &pb::SyncShard,
    remaining: Duration,
) -> Attempt<pb::ShardSync> {
    let Some(replica) = node.shards.get(&shard) else {
        return Attempt::Redirect(None);
    };
    if let Err(stop) = linearizable_here(node, shard, remaining).await {
        return stop;
    }
    let query = SyncQuery {
        since: (!request.first).then_some(request.since),
        limit: (request.limit as usize).clamp(1, MAX_PAGE),
        messages_per_room: (request.messages_per_room as usize).min(MAX_SYNC_MESSAGES),
        after: request.paged.then(|| (request.after_ts_ms, request.after_room.clone())),
    };
    match off_runtime(|| replica.reader.sync(viewer, &query)) {
        Ok(page) => Attempt::Done(shard_sync_to_pb(shard, page)),
        Err(e) => Attempt::Failed(e.into()),
    }
}

/// A shard's Sync page as it crosses the wire, cut short (`more`) once its rooms pass
/// [`SYNC_PAGE_BYTES`]: what is left comes in the next page.
fn shard_sync_to_pb(shard: ShardId, page: SyncPage) -> pb::ShardSync {
    let mut rooms = Vec::with_capacity(page.rooms.len());
    let mut bytes = 0usize;
    let mut more = page.more;
    let count = page.rooms.len();
    for (i, update) in page.rooms.into_iter().enumerate() {
        let read_seq = update.member.as_ref().map_or(0, |m| m.read_seq);
        let name = update.room.name.clone();
        let room = room_info(shard, RoomView { room: update.room, member: update.member });
        let messages = update.messages.into_iter().map(|m| message_to_pb(&name, m)).collect();
        let update = client::RoomUpdate {
            room: Some(room),
            read_seq,
            unread: update.unread,
            mentions: update.mentions,
            messages,
            limited: update.limited,
        };
        bytes += prost::Message::encoded_len(&update);
        rooms.push(update);
        if bytes > SYNC_PAGE_BYTES && i + 1 < count {
            more = true;
            break;
        }
    }
    pb::ShardSync { position: page.position, rooms, more }
}

/// A room as its viewer sees it. The storage and client enums share their numbers.
pub fn room_info(shard: ShardId, view: RoomView) -> client::RoomInfo {
    let r = view.room;
    let (membership, role) = match &view.member {
        Some(m) => (m.state, if m.state == client::MembershipState::Joined as i32 { m.role } else { 0 }),
        None => (0, 0),
    };
    client::RoomInfo {
        first_seq: chorus_raft::state_machine::first_retained(&r),
        name: r.name,
        shard,
        last_seq: r.last_seq,
        last_ts_ms: r.last_ts_ms,
        creator: r.creator,
        created_ts_ms: r.created_ts_ms,
        metadata: r.metadata,
        retention_max_messages: r.retention_max_messages,
        visibility: r.visibility,
        member_count: r.member_count,
        membership,
        role,
        direct_users: r.direct_users,
    }
}

pub fn message_to_pb(room: &str, m: chorus_proto::storage::MessageRecord) -> client::Message {
    client::Message {
        room: room.to_owned(),
        seq: m.seq,
        ts_ms: m.ts_ms,
        sender: m.sender,
        body: m.body,
        client_id: m.client_id,
        client_seq: m.client_seq,
        kind: m.kind,
        target: m.target,
        role: m.role,
    }
}

pub fn history_page_to_pb(room: &str, page: HistoryPage) -> client::HistoryPage {
    client::HistoryPage {
        room: room.to_owned(),
        last_seq: page.last_seq,
        first_seq: page.first_seq,
        messages: page.messages.into_iter().map(|m| message_to_pb(room, m)).collect(),
    }
}

fn history_page_from_pb(page: client::HistoryPage) -> HistoryPage {
    HistoryPage {
        last_seq: page.last_seq,
        first_seq: page.first_seq,
        messages: page
            .messages
            .into_iter()
            .map(|m| chorus_proto::storage::MessageRecord {
                seq: m.seq,
                ts_ms: m.ts_ms,
                sender: m.sender,
                client_id: m.client_id,
                client_seq: m.client_seq,
                body: m.body,
                kind: m.kind,
                target: m.target,
                role: m.role,
                // Internal to the state machine; a client never sees it.
                text_ordinal: 0,
            })
            .collect(),
    }
}
