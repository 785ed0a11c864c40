//! Proposal batching: concurrent writes to one shard share a Raft entry.
//!
//! Every node keeps one queue per shard. A batch task takes the first waiting operation, waits
//! for one of the shard's in-flight slots, then takes everything else queued (up to the command
//! limits) and proposes it as one command — locally if this node leads the shard, else as one
//! forwarded RPC. Each operation gets its own result back. Under load batches grow by
//! themselves while slots are busy; a lone write (nothing queued, a slot free) is proposed at
//! once from its submitter's task, without the queue's two task hops.
//!
//! Order: an operation is only proposed after every operation whose reply was already sent, so
//! "A acknowledged before B was submitted ⇒ seq(A) < seq(B)" holds. Batches in flight at the
//! same time carry concurrent operations, which may commit in any order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chorus_proto::batching::{BatchQueue, dispatch_batches};
use chorus_proto::storage::op;
use chorus_raft::{OpOutcome, ShardId};
use tokio::sync::{mpsc, oneshot};

use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

/// Operations waiting per shard; beyond it, submitters wait (backpressure).
const QUEUE_CAPACITY: usize = 8192;
/// Batches of one shard in flight at once (pipelining through Raft).
const BATCHES_IN_FLIGHT: usize = 4;

struct Pending {
    op: op::Kind,
    size: usize,
    reply: oneshot::Sender<Result<OpOutcome, ServiceError>>,
}

/// The per-shard queues of a node, each with the generation that tells a queue from the one
/// that replaced it.
#[derive(Default)]
pub struct Batcher {
    queues: Mutex<HashMap<ShardId, (u64, BatchQueue<Pending>)>>,
    generations: std::sync::atomic::AtomicU64,
}

impl Batcher {
    fn queue(&self, node: &Arc<Node>, shard: ShardId) -> BatchQueue<Pending> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(shard)
            .or_insert_with(|| {
                let generation = self.generations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (tx, rx, slots) = BatchQueue::new(QUEUE_CAPACITY, BATCHES_IN_FLIGHT);
                node.background_tasks.spawn(supervise_queue(node.clone(), shard, generation, rx, slots));
                (generation, tx)
            })
            .1
            .clone()
    }

    /// Forgets `shard`'s queue if it is still the one of `generation`: the next write starts a
    /// new one.
    fn forget(&self, shard: ShardId, generation: u64) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if queues.get(&shard).is_some_and(|(g, _)| *g == generation) {
            queues.remove(&shard);
        }
    }

    /// Proposes `op` to `shard` as part of a batch and returns its own result. `lone` says the
    /// request carries no other operation: then, when nothing is waiting and a slot is free, it
    /// is proposed at once. (Operations of one request are submitted together, and should
    /// share an entry rather than each take a slot.)
    pub async fn submit(
        &self,
        node: &Arc<Node>,
        shard: ShardId,
        op: op::Kind,
        lone: bool,
    ) -> Result<OpOutcome, ServiceError> {
        let (reply, result) = oneshot::channel();
        let size = op.encoded_len() + 8;
        let pending = Pending { op, size, reply };
        let queue = self.queue(node, shard);
        match lone.then(|| queue.alone()).flatten() {
            Some(slot) => propose(node.clone(), shard, vec![pending], slot).await,
            None => queue.send(pending).await.map_err(|_| ServiceError::ShuttingDown)?,
        }
        result.await.map_err(|_| ServiceError::ShuttingDown)?
    }
}

/// Runs a shard's queue and, should it stop before the node does (a panic), replaces it: the
/// writes it held fail (their submitters see the node as unavailable) and the next write
/// starts a new queue, rather than queueing behind a dead one forever.
async fn supervise_queue(
    node: Arc<Node>,
    shard: ShardId,
    generation: u64,
    queue: mpsc::Receiver<Pending>,
    slots: Arc<tokio::sync::Semaphore>,
) {
    let outcome = tokio::spawn(run_shard_queue(node.clone(), shard, queue, slots)).await;
    if !node.peers_shutdown.is_cancelled() {
        let reason = match outcome {
            Err(e) if e.is_panic() => "it panicked",
            _ => "it ended",
        };
        tracing::error!(shard, reason, "the shard's write queue stopped; the next write starts a new one");
        node.batcher.forget(shard, generation);
    }
}

async fn run_shard_queue(
    node: Arc<Node>,
    shard: ShardId,
    queue: mpsc::Receiver<Pending>,
    slots: Arc<tokio::sync::Semaphore>,
) {
    let limits = node.config.limits;
    // The command's own fields (timestamp, framing) take 16 bytes on top of its operations.
    let max_bytes = limits.max_command_bytes.saturating_sub(16);
    let batches = dispatch_batches(queue, slots, limits.max_ops_per_command, max_bytes, |p| p.size, {
        let node = node.clone();
        move |batch, slot| {
            node.background_tasks.spawn(propose(node.clone(), shard, batch, slot));
            true
        }
    });
    tokio::select! {
        _ = node.peers_shutdown.cancelled() => {}
        _ = batches => {}
    }
}

async fn propose(node: Arc<Node>, shard: ShardId, batch: Vec<Pending>, _slot: tokio::sync::OwnedSemaphorePermit) {
    let (ops, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.op, p.reply)).unzip();
    match forward::propose(&node, shard, ops).await {
        Ok(results) if results.len() == replies.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Ok(results) => {
            let e = ServiceError::Internal(format!("{} results for {} operations", results.len(), replies.len()));
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
