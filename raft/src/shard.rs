//! Wiring one shard replica: its storage views over the node's database, its openraft
//! configuration, and the running Raft instance. The network is a parameter, so the real gRPC
//! network and the in-process test network plug in the same way.

use std::sync::Arc;

use openraft::{Config, RaftNetworkFactory, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::db::NodeDb;
use crate::error::StoreError;
use crate::log_store::ShardLogStore;
use crate::snapshot_pacing::SnapshotPacing;
use crate::state_machine::{ShardReader, ShardStateMachine};
use crate::types::{ChorusRaft, NodeId, ShardId, TypeConfig};

/// Raft timing and log-retention settings, shared by every shard of a node.
#[derive(Debug, Clone)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    /// Elections start after a random timeout in `[min, max)`. Keep `min` well above the fsync
    /// latency (10× or more) and several heartbeats long.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after at least this many entries have been applied since the last one
    /// (see `snapshot_pacing`)...
    pub snapshot_every_entries: u64,
    /// ...and once the log applied since then is this many percent of the last snapshot's size
    /// (0: after `snapshot_every_entries` alone).
    pub snapshot_log_percent: u64,
    /// Entries kept in the log behind the latest snapshot, so that a follower slightly behind
    /// catches up from the log rather than by a full snapshot.
    pub log_entries_kept_after_snapshot: u64,
    /// Most entries in one AppendEntries RPC.
    pub max_entries_per_append: u64,
    /// Snapshots are streamed in chunks of this size.
    pub snapshot_chunk_bytes: u64,
    /// Timeout for one snapshot chunk (and its install on the last one).
    pub install_snapshot_timeout_ms: u64,
    /// The node drives heartbeats and elections from its own liveness tracking (see the
    /// server's `liveness` module): openraft's tick (election timer) and heartbeats are off,
    /// so idle shards cost nothing. `heartbeat_interval_ms` then only sets openraft's
    /// AppendEntries timeout, and `leader_heartbeat_ms` the node's heartbeat interval.
    pub node_liveness: bool,
    pub leader_heartbeat_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 20_000,
            snapshot_log_percent: 50,
            log_entries_kept_after_snapshot: 5_000,
            max_entries_per_append: 256,
            snapshot_chunk_bytes: 1 << 20,
            install_snapshot_timeout_ms: 10_000,
            node_liveness: false,
            leader_heartbeat_ms: 100,
        }
    }
}

impl RaftTuning {
    /// How long a follower refuses to vote after it last heard from its leader (openraft's
    /// leader lease), in ms.
    pub fn leader_lease_ms(&self) -> u64 {
        if self.node_liveness {
            (self.election_timeout_min_ms * 3 / 5).max(self.heartbeat_interval_ms + 2)
        } else {
            self.election_timeout_max_ms
        }
    }

    /// When shards build snapshots.
    pub fn snapshot_pacing(&self) -> SnapshotPacing {
        SnapshotPacing { min_entries: self.snapshot_every_entries, log_percent: self.snapshot_log_percent }
    }

    /// openraft's configuration for `shard`, validated.
    pub fn config(&self, shard: ShardId) -> Result<Arc<Config>, StoreError> {
        // With node liveness, openraft's election timeouts serve only as its leader lease (a
        // follower rejects votes for `election_timeout_max` after hearing from its leader) and
        // its vote RPC timeout (`election_timeout_min`): the lease must end before the node's
        // shortest election timeout, or the first election after a leader dies is refused.
        let (election_min, election_max) = if self.node_liveness {
            let lease = self.leader_lease_ms();
            (lease - 1, lease)
        } else {
            (self.election_timeout_min_ms, self.election_timeout_max_ms)
        };
        let config = Config {
            cluster_name: format!("chorus-shard-{shard}"),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: self.max_entries_per_append,
            // The shard's pacer asks for snapshots (see `snapshot_pacing`).
            snapshot_policy: SnapshotPolicy::Never,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_in_snapshot_log_to_keep: self.log_entries_kept_after_snapshot,
            purge_batch_size: 256,
            enable_heartbeat: !self.node_liveness,
            enable_tick: !self.node_liveness,
            ..Default::default()
        };
        let config = config.validate().map_err(|e| StoreError::Config(format!("raft settings: {e}")))?;
        Ok(Arc::new(config))
    }
}

/// The log store and state machine of one shard, over the node's database.
pub fn open_shard_storage(db: &Arc<NodeDb>, shard: ShardId) -> Result<(ShardLogStore, ShardStateMachine), StoreError> {
    if shard >= db.identity().shard_count && shard != crate::keys::META_SHARD {
        return Err(StoreError::Config(format!(
            "shard {shard} does not exist: the cluster has {} shards",
            db.identity().shard_count
        )));
    }
    let state_machine = ShardStateMachine::open(db.clone(), shard)?;
    let snapshots = state_machine.snapshots();
    let log = ShardLogStore::linked(db.clone(), shard, snapshots.clone());
    // The state machine ahead of both the log and the current snapshot: an install whose
    // switch reached the disk without its snapshot file. openraft would purge the log up to
    // the applied index at start-up, which needs a snapshot that covers it: build one.
    let applied = state_machine.reader().applied()?.map(|id| id.index);
    if applied > snapshots.current_index() && applied > log.last_index()? {
        tracing::warn!(shard, ?applied, snapshot = ?snapshots.current_index(), "state machine ahead of its log and snapshot: building a snapshot");
        crate::snapshot::build(db, shard, &snapshots)?;
    }
    Ok((log, state_machine))
}

/// A running replica of one shard on this node.
#[derive(Clone)]
pub struct ShardReplica {
    pub shard: ShardId,
    pub raft: ChorusRaft,
    pub reader: ShardReader,
    /// Dropped with the last clone of the replica: ends its snapshot-request task, which holds
    /// a handle of the Raft (openraft stops a Raft whose handles are all gone).
    _snapshot_requests: Arc<oneshot::Sender<()>>,
    /// That task, to tell whether it still runs.
    snapshot_task: Option<Arc<tokio::task::AbortHandle>>,
}

impl ShardReplica {
    /// True when the task that passes the snapshot pacer's requests to openraft has ended
    /// (it ends on its own only when the Raft stopped, or by a bug): without it the shard
    /// never snapshots and its log grows without bound.
    pub fn snapshot_requests_stopped(&self) -> bool {
        self.snapshot_task.as_ref().is_some_and(|task| task.is_finished())
    }
}

/// Why a shard replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("starting raft for shard {shard}: {source}")]
    Raft {
        shard: ShardId,
        #[source]
        source: openraft::error::Fatal<NodeId>,
    },
}

/// Starts the Raft instance of `shard` on node `node_id`.
pub async fn start_shard<N>(
    node_id: NodeId,
    shard: ShardId,
    db: &Arc<NodeDb>,
    tuning: &RaftTuning,
    network: N,
) -> Result<ShardReplica, StartError>
where
    N: RaftNetworkFactory<TypeConfig>,
{
    let config = tuning.config(shard)?;
    let (log, state_machine) = open_shard_storage(db, shard)?;
    let reader = state_machine.reader();
    let snapshots = state_machine.snapshots();
    let raft = ChorusRaft::new(node_id, config, network, log, state_machine)
        .await
        .map_err(|source| StartError::Raft { shard, source })?;
    let (owner, dropped) = oneshot::channel();
    let snapshot_task = snapshots.pacer().take_requests().map(|requests| {
        let task = request_snapshots(raft.clone(), requests, dropped);
        Arc::new(tokio::spawn(task.instrument(tracing::info_span!("snapshots", shard))).abort_handle())
    });
    snapshots.pacer().configure(tuning.snapshot_pacing());
    Ok(ShardReplica { shard, raft, reader, _snapshot_requests: Arc::new(owner), snapshot_task })
}

/// Passes the pacer's requests for a snapshot to openraft. Ends when the Raft has stopped, when
/// its storage is dropped (openraft drops it as the Raft stops), or when the last clone of its
/// [`ShardReplica`] is dropped.
async fn request_snapshots(raft: ChorusRaft, mut requests: mpsc::Receiver<()>, mut dropped: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut dropped => return,
            request = requests.recv() => {
                if request.is_none() || raft.trigger().snapshot().await.is_err() {
                    return;
                }
            }
        }
    }
}
