//! Proposal batching: concurrent writes to one shard share a Raft entry.
//!
//! Every node keeps one queue per shard. A batch task takes the first waiting operation, waits
//! for one of the shard's in-flight slots, then takes everything else queued (up to the command
//! limits) and proposes it as one command — locally if this node leads the shard, else as one
//! forwarded RPC. Each operation gets its own result back. Under load batches grow by
//! themselves while slots are busy; a lone write goes out at once, so latency does not suffer.
//!
//! Order: an operation is only proposed after every operation whose reply was already sent, so
//! "A acknowledged before B was submitted ⇒ seq(A) < seq(B)" holds. Batches in flight at the
//! same time carry concurrent operations, which may commit in any order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chorus_proto::batching::dispatch_batches;
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

/// The per-shard queues of a node.
#[derive(Default)]
pub struct Batcher {
    queues: Mutex<HashMap<ShardId, mpsc::Sender<Pending>>>,
}

impl Batcher {
    fn queue(&self, node: &Arc<Node>, shard: ShardId) -> mpsc::Sender<Pending> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(shard)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
                node.background_tasks.spawn(run_shard_queue(node.clone(), shard, rx));
                tx
            })
            .clone()
    }

    /// Proposes `op` to `shard` as part of a batch and returns its own result.
    pub async fn submit(&self, node: &Arc<Node>, shard: ShardId, op: op::Kind) -> Result<OpOutcome, ServiceError> {
        let (reply, result) = oneshot::channel();
        let size = op.encoded_len() + 8;
        self.queue(node, shard).send(Pending { op, size, reply }).await.map_err(|_| ServiceError::ShuttingDown)?;
        result.await.map_err(|_| ServiceError::ShuttingDown)?
    }
}

async fn run_shard_queue(node: Arc<Node>, shard: ShardId, queue: mpsc::Receiver<Pending>) {
    let limits = node.config.limits;
    // The command's own fields (timestamp, framing) take 16 bytes on top of its operations.
    let max_bytes = limits.max_command_bytes.saturating_sub(16);
    let batches = dispatch_batches(queue, BATCHES_IN_FLIGHT, limits.max_ops_per_command, max_bytes, |p| p.size, {
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
