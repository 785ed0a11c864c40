//! A node killed while installing a snapshot restarts.
//!
//! openraft 0.9 purges a follower's log up to a received snapshot right after queueing the
//! snapshot's install, and the install itself runs later on the state-machine task. A chaos run
//! killed a node between the two: at restart its log was purged past its state machine, and
//! openraft's start-up check panicked the shard (`purge_upto <= snapshot_last_log_id`). A purge
//! past the durable snapshot now waits for the install. This test replays openraft's order of
//! storage calls, "crashes" after each step (drops everything and reopens the data dir, which is
//! what RocksDB sees after kill -9), and starts a real Raft instance on what is left.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_proto::storage::{Command, Op};
use chorus_raft::state_machine::{append_op, create_room_op};
use chorus_raft::{
    DbOptions, Entry, LogId, Membership, NodeDb, RaftTuning, ShardId, ShardLogStore, ShardStateMachine, Snapshot,
    SnapshotMeta, open_shard_storage, start_shard,
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
        EntryPayload::Normal(
            Command {
                ts_ms: index,
                ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
                rules: chorus_raft::state_machine::CURRENT_RULES,
                notify_after_ms: 0,
            }
            .into(),
        )
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

/// A leader's replica with entries `0..=last` applied: its data dir and database.
async fn leader_at(last: u64) -> (tempfile::TempDir, Arc<NodeDb>) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_node_db(dir.path(), 1, &DbOptions::default());
    write_and_apply(&db, last).await;
    (dir, db)
}

/// A new snapshot of `db`'s replica, as the metadata and bytes a follower receives.
async fn snapshot_bytes(db: &Arc<NodeDb>) -> (SnapshotMeta, Vec<u8>) {
    let mut snapshot = build_snapshot(db).await;
    let mut bytes = Vec::new();
    snapshot.snapshot.read_to_end(&mut bytes).await.unwrap();
    (snapshot.meta, bytes)
}

/// Opens the follower's storage and receives `bytes` into a fresh snapshot file, as openraft
/// does before it installs one.
async fn receive(db: &Arc<NodeDb>, bytes: &[u8]) -> (ShardLogStore, ShardStateMachine, Box<tokio::fs::File>) {
    let (log, mut sm) = open_shard_storage(db, SHARD).unwrap();
    let mut received = sm.begin_receiving_snapshot().await.unwrap();
    received.write_all(bytes).await.unwrap();
    received.flush().await.unwrap();
    (log, sm, received)
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

/// The follower's durable last purged index and log end.
async fn log_state(dir: &Path) -> (Option<u64>, Option<u64>) {
    let db = open_node_db(dir, FOLLOWER, &DbOptions::default());
    let (mut log, _) = open_shard_storage(&db, SHARD).unwrap();
    let state = log.get_log_state().await.unwrap();
    (state.last_purged_log_id.map(|id| id.index), state.last_log_id.map(|id| id.index))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_a_snapshot_install_leaves_a_state_raft_restarts_from() {
    let (_leader_dir, leader) = leader_at(40).await;
    let (meta, bytes) = snapshot_bytes(&leader).await;
    assert_eq!(meta.last_log_id.map(|id| id.index), Some(40));
    let upto = meta.last_log_id.unwrap();

    // The follower has applied and snapshotted a prefix of the same log.
    let dir = tempfile::tempdir().unwrap();
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        write_and_apply(&db, 5).await;
        build_snapshot(&db).await;
    }
    assert_eq!(restart_and_check(dir.path(), "before the install").await, (None, Some(5)));

    // openraft's order: receive the file, queue the install, purge the log to the snapshot
    // (on the Raft core), install (on the state-machine task).

    // Killed after the purge was issued, before the install: the purge is still waiting and
    // nothing was purged.
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        let (mut log, _sm, _received) = receive(&db, &bytes).await;
        let purge = tokio::spawn(async move { log.purge(upto).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!purge.is_finished(), "a purge past the snapshot must wait for its install");
        purge.abort();
        let _ = purge.await;
    }
    assert_eq!(log_state(dir.path()).await, (None, Some(5)));
    assert_eq!(restart_and_check(dir.path(), "killed before the install").await, (None, Some(5)));

    // The install completes: the waiting purge goes ahead, and what openraft appends next
    // follows the snapshot without a hole.
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        let (mut log, mut sm, received) = receive(&db, &bytes).await;
        let mut purging = log.clone();
        let purge = tokio::spawn(async move { purging.purge(upto).await });
        sm.install_snapshot(&meta, received).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), purge).await.unwrap().unwrap().unwrap();
        log.blocking_append([entry(41)]).await.unwrap();
    }
    assert_eq!(log_state(dir.path()).await, (Some(40), Some(41)));
    assert_eq!(restart_and_check(dir.path(), "killed after the install").await, (Some(40), Some(40)));

    // An install that fails leaves the state as it was, and the purge waiting for it fails
    // (openraft then stops the shard; the node restarts it) instead of purging.
    write_and_apply(&leader, 60).await;
    let (newer, mut corrupt) = snapshot_bytes(&leader).await;
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xAA;
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        let (mut log, mut sm, received) = receive(&db, &corrupt).await;
        let newer_upto = newer.last_log_id.unwrap();
        let mut purging = log.clone();
        let purge = tokio::spawn(async move { purging.purge(newer_upto).await });
        sm.install_snapshot(&newer, received).await.unwrap_err();
        let refused = tokio::time::timeout(Duration::from_secs(10), purge).await.unwrap().unwrap();
        let err = refused.unwrap_err().to_string();
        assert!(err.contains("install that covers it failed"), "{err}");
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(upto));
    }
    assert_eq!(restart_and_check(dir.path(), "after a failed install").await, (Some(40), Some(40)));
}

/// A kill between an install's rename of the snapshot file and its switch leaves a file ahead
/// of the state machine: it is discarded at open, not taken as the current snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_file_ahead_of_the_state_machine_is_discarded_at_open() {
    let (_leader_dir, leader) = leader_at(40).await;
    build_snapshot(&leader).await;
    let snap_files = |db: &NodeDb| -> Vec<std::path::PathBuf> {
        let dir = db.snapshot_dir(SHARD);
        let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "snap"));
        files
    };
    let ahead = snap_files(&leader).pop().expect("the leader's snapshot file");

    let dir = tempfile::tempdir().unwrap();
    let planted = {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        write_and_apply(&db, 5).await;
        build_snapshot(&db).await;
        let planted = db.snapshot_dir(SHARD).join(ahead.file_name().unwrap());
        std::fs::copy(&ahead, &planted).unwrap();
        planted
    };
    assert_eq!(restart_and_check(dir.path(), "with a snapshot ahead of applied").await, (None, Some(5)));
    assert!(!planted.exists(), "the snapshot ahead of the state machine is removed");
}

/// An install whose switch reached the disk but whose snapshot file did not (a failed sync, a
/// lost file): the state machine is ahead of both the log and every snapshot. Opening the
/// store builds a snapshot of it, so that openraft's start-up purge up to the applied index is
/// covered, and the shard starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_machine_ahead_of_its_log_and_snapshots_gets_a_snapshot_at_open() {
    let (_leader_dir, leader) = leader_at(40).await;
    let (meta, bytes) = snapshot_bytes(&leader).await;

    let dir = tempfile::tempdir().unwrap();
    {
        let db = open_node_db(dir.path(), FOLLOWER, &DbOptions::default());
        write_and_apply(&db, 5).await;
        let (_log, mut sm, received) = receive(&db, &bytes).await;
        sm.install_snapshot(&meta, received).await.unwrap();
        // The snapshot file is lost; the log still ends at 5, the state machine is at 40.
        for file in std::fs::read_dir(db.snapshot_dir(SHARD)).unwrap() {
            std::fs::remove_file(file.unwrap().path()).unwrap();
        }
    }
    let (_, snapshot) = restart_and_check(dir.path(), "state machine ahead of log and snapshots").await;
    assert_eq!(snapshot, Some(40), "a snapshot of the state machine was built at open");
}
