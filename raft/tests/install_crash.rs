//! A node killed while installing a snapshot restarts.
//!
//! openraft 0.9 purges a follower's log up to a received snapshot right after queueing the
//! snapshot's install, and the install itself runs later on the state-machine task. A chaos run
//! killed a node between the two: at restart its log was purged past its state machine, and
//! openraft's start-up check panicked the shard (`purge_upto <= snapshot_last_log_id`). This test
//! replays openraft's order of storage calls, "crashes" after each step (drops everything and
//! reopens the data dir, which is what RocksDB sees after kill -9), and starts a real Raft
//! instance on what is left.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_proto::storage::{Command, Op};
use chorus_raft::state_machine::{append_op, create_room_op};
use chorus_raft::{
    DbOptions, Entry, LogId, Membership, NodeDb, RaftTuning, ShardId, Snapshot, open_shard_storage, start_shard,
};
use common::{Router, TestNetwork, open_node_db};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHARD: ShardId = 1;
const FOLLOWER: u64 = 2;

fn entry(index: u64) -> Entry {
    let log_id = LogId::new(CommittedLeaderId::new(1, 1), index);
    let payload = if index == 0 {
        EntryPayload::Membership(Membership::new(vec![[1, 2, 3].into()], ()))
    } else {
        let ops = vec![create_room_op("r", "w"), append_op("r", "w", b"writer", index, Bytes::from_static(b"hello"))];
        EntryPayload::Normal(Command { ts_ms: index, ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect() })
    };
    Entry { log_id, payload }
}

/// Appends and applies entries `0..=last` on `db`'s replica of the shard.
async fn write_and_apply(db: &Arc<NodeDb>, last: u64) {
    let (mut log, mut sm) = open_shard_storage(db, SHARD).unwrap();
    let entries: Vec<Entry> = (0..=last).map(entry).collect();
    log.blocking_append(entries.clone()).await.unwrap();
    sm.apply(entries).await.unwrap();
}

async fn build_snapshot(db: &Arc<NodeDb>) -> Snapshot {
    let (_, mut sm) = open_shard_storage(db, SHARD).unwrap();
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap()
}

/// Restarts the follower from its data dir, as after kill -9: opens the database, starts a
/// Raft instance on the shard, and checks that it is running. Returns the durable last purged
/// and current snapshot indexes.
async fn restart_and_check(dir: &Path, step: &str) -> (Option<u64>, Option<u64>) {
    let db = open_node_db(dir, FOLLOWER, &DbOptions::default());
    let (purged, snapshot) = {
        let (mut log, mut sm) = open_shard_storage(&db, SHARD).unwrap();
        let purged = log.get_log_state().await.unwrap().last_purged_log_id.map(|id| id.index);
        let snapshot = sm.get_current_snapshot().await.unwrap().and_then(|s| s.meta.last_log_id).map(|id| id.index);
        let applied = sm.applied_state().await.unwrap().0.map(|id| id.index);
        assert!(purged <= snapshot.or(applied), "{step}: log purged to {purged:?} past snapshot {snapshot:?}");
        assert!(snapshot <= applied, "{step}: snapshot {snapshot:?} ahead of the state machine ({applied:?})");
        (purged, snapshot)
    };
    let tuning = RaftTuning::default();
    let router = Router::default();
    let replica = start_shard(FOLLOWER, SHARD, &db, &tuning, TestNetwork::new(router, FOLLOWER)).await.unwrap();
    // A core that panicked at start-up answers every call with Fatal::Panicked.
    let state = tokio::time::timeout(Duration::from_secs(10), replica.raft.with_raft_state(|s| s.committed)).await;
    assert!(matches!(state, Ok(Ok(_))), "{step}: the restarted shard is not running: {state:?}");
    replica.raft.shutdown().await.unwrap();
    (purged, snapshot)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_snapshot_install_leaves_a_state_raft_restarts_from() {
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = open_node_db(leader_dir.path(), 1, &DbOptions::default());
    write_and_apply(&leader, 40).await;
    let mut from_leader = build_snapshot(&leader).await;
    assert_eq!(from_leader.meta.last_log_id.map(|id| id.index), Some(40));
    let mut bytes = Vec::new();
    from_leader.snapshot.read_to_end(&mut bytes).await.unwrap();
    let meta = from_leader.meta;

    // The follower has applied and snapshotted a prefix of the same log.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        write_and_apply(&db, 5).await;
        build_snapshot(&db).await;
    }
    assert_eq!(restart_and_check(dir.path(), "before the install").await, (None, Some(5)));

    // openraft's order: receive the file, queue the install, purge the log to the snapshot,
    // install. A kill right after the purge:
    let receive = |db: Arc<NodeDb>| {
        let bytes = bytes.clone();
        async move {
            let (log, mut sm) = open_shard_storage(&db, SHARD).unwrap();
            let mut received = sm.begin_receiving_snapshot().await.unwrap();
            received.write_all(&bytes).await.unwrap();
            received.flush().await.unwrap();
            (log, sm, received)
        }
    };
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        let (mut log, _sm, _received) = receive(db.clone()).await;
        log.purge(meta.last_log_id.unwrap()).await.unwrap();
    }
    let (purged, snapshot) = restart_and_check(dir.path(), "killed after the purge, before the install").await;
    assert_eq!(snapshot, Some(5), "the install never ran");
    assert_eq!(purged, Some(5), "the purge stops at the durable snapshot");

    // The whole sequence, then a kill: the snapshot stands, and the next purge catches up.
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        let (mut log, mut sm, received) = receive(db.clone()).await;
        log.purge(meta.last_log_id.unwrap()).await.unwrap();
        sm.install_snapshot(&meta, received).await.unwrap();
    }
    let (purged, snapshot) = restart_and_check(dir.path(), "killed after the install").await;
    assert_eq!((purged, snapshot), (Some(5), Some(40)));
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        let (mut log, _) = open_shard_storage(&db, SHARD).unwrap();
        log.purge(meta.last_log_id.unwrap()).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|id| id.index), Some(40));
        assert_eq!(state.last_log_id.map(|id| id.index), Some(40), "no entry left behind the snapshot");
    }
    assert_eq!(restart_and_check(dir.path(), "after the next purge").await, (Some(40), Some(40)));
}
