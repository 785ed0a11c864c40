//! A shard's snapshots come further apart as it grows: with `snapshot_log_percent` set, the next
//! snapshot waits until the log since the last one is that share of the last one's size, so the
//! copying stays proportional to what is written, not to the history times the writes. With 0
//! they come every `snapshot_every_entries`. Either way the log is purged behind them.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chorus_proto::storage::{Command, Op};
use chorus_raft::state_machine::{append_op, create_room_op};
use chorus_raft::{ChorusRaft, DbOptions, RaftTuning, SharedCommand, start_shard};
use common::{Router, TestNetwork, open_node_db, start_cluster};

const SHARD: u32 = 1;
const EVERY: u64 = 50;
const WRITES: u64 = 1_600;

fn command(ops: Vec<chorus_proto::storage::op::Kind>) -> SharedCommand {
    Command {
        ts_ms: 1,
        ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
        rules: chorus_raft::state_machine::CURRENT_RULES,
        notify_after_ms: 0,
    }
    .into()
}

fn tuning(log_percent: u64) -> RaftTuning {
    RaftTuning {
        snapshot_every_entries: EVERY,
        snapshot_log_percent: log_percent,
        log_entries_kept_after_snapshot: 10,
        ..RaftTuning::default()
    }
}

/// 1 KiB that does not compress (RocksDB's size estimates are of compressed files).
fn body(i: u64) -> Bytes {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Records every snapshot the metrics report; builds are at least EVERY entries apart, far
/// longer than a metrics change takes to be seen.
fn watch_snapshots(raft: &ChorusRaft, seen: Arc<Mutex<BTreeSet<u64>>>) -> tokio::task::JoinHandle<()> {
    let mut metrics = raft.metrics();
    tokio::spawn(async move {
        loop {
            if let Some(id) = metrics.borrow_and_update().snapshot {
                seen.lock().unwrap().insert(id.index);
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Appends messages `from..=to`, one per entry.
async fn write(raft: &ChorusRaft, from: u64, to: u64) {
    for i in from..=to {
        raft.client_write(command(vec![append_op("room", "s", b"c", i, body(i))])).await.unwrap();
    }
}

/// Lets a build that was asked for finish.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// Writes `WRITES` messages to a one-node shard and returns the log indexes of the snapshots
/// it built meanwhile, and the first index left in its log.
async fn snapshots_built(log_percent: u64) -> (Vec<u64>, u64) {
    let router = common::Router::default();
    let nodes = start_cluster(&router, &[1], SHARD, &tuning(log_percent)).await;
    let raft = nodes[0].replica.raft.clone();
    raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(1), "leader").await.unwrap();
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let watcher = watch_snapshots(&raft, seen.clone());
    raft.client_write(command(vec![create_room_op("room", "s")])).await.unwrap();
    write(&raft, 1, WRITES).await;
    settle().await;
    let first_log_index = raft.metrics().borrow().purged.map_or(0, |id| id.index + 1);
    raft.shutdown().await.unwrap();
    watcher.abort();
    let seen = seen.lock().unwrap().iter().copied().collect();
    (seen, first_log_index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_come_further_apart_as_the_shard_grows() {
    let (fixed, fixed_purged) = snapshots_built(0).await;
    let (paced, paced_purged) = snapshots_built(100).await;

    // Fixed: one every EVERY entries (a build may absorb the next request while it runs).
    assert!(fixed.len() as u64 >= WRITES / EVERY / 4, "fixed interval built only {fixed:?}");
    // Paced at 100 %: each waits for as much log as the shard's whole state, so the indexes
    // at least roughly double: ~log2(WRITES / EVERY) builds, not WRITES / EVERY.
    assert!(paced.len() >= 3 && paced.len() <= 7, "paced built {paced:?}");
    for pair in paced.windows(2) {
        assert!(
            pair[1] - pair[0] >= pair[0] * 8 / 10,
            "snapshots {pair:?} too close for a state of {} entries",
            pair[0]
        );
    }
    // Either way the log is purged behind the latest snapshot.
    assert!(fixed_purged > WRITES / 2, "fixed: log starts at {fixed_purged}");
    assert!(paced_purged > WRITES / 4, "paced: log starts at {paced_purged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_count_of_log_written_since_the_snapshot() {
    // At 100 %, a snapshot at entry L holds about L messages, and the next is due once the log
    // since holds as much again: at about 2L. A restart comes at 1.5L.
    let router = Router::default();
    let mut nodes = start_cluster(&router, &[1], SHARD, &tuning(100)).await;
    let node = nodes.remove(0);
    let raft = node.replica.raft.clone();
    raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(1), "leader").await.unwrap();
    raft.client_write(command(vec![create_room_op("room", "s")])).await.unwrap();
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let watcher = watch_snapshots(&raft, seen.clone());
    let latest = |seen: &Arc<Mutex<BTreeSet<u64>>>| seen.lock().unwrap().last().copied().unwrap_or(0);
    let mut written = 0;
    while latest(&seen) < 400 {
        assert!(written < 5_000, "no snapshot of 400 entries or more: {:?}", seen.lock().unwrap());
        write(&raft, written + 1, written + 50).await;
        written += 50;
    }
    let last = latest(&seen);
    let restart_at = written.max(last * 3 / 2);
    write(&raft, written + 1, restart_at).await;
    settle().await;
    assert_eq!(latest(&seen), last, "a snapshot before the restart: {:?}", seen.lock().unwrap());
    raft.shutdown().await.unwrap();
    watcher.abort();
    let (dir, id) = (node.dir, node.id);
    drop((raft, node.replica, node.db));

    let db = open_node_db(dir.path(), id, &DbOptions::default());
    let replica = start_shard(id, SHARD, &db, &tuning(100), TestNetwork::new(router.clone(), id)).await.unwrap();
    router.add(id, replica.raft.clone());
    let raft = replica.raft.clone();
    raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(1), "leader").await.unwrap();
    let after = Arc::new(Mutex::new(BTreeSet::new()));
    let watcher = watch_snapshots(&raft, after.clone());
    // Resumed, the next snapshot is due at about 2L, and this stops at 2.3L. Had the count
    // started again at the restart, it would wait until about 1.5L + L.
    let stop = last * 23 / 10;
    write(&raft, restart_at + 1, stop).await;
    settle().await;
    let next: Vec<u64> = after.lock().unwrap().iter().copied().filter(|&i| i > last).collect();
    assert!(!next.is_empty(), "no snapshot after {last} by entry {stop}: the restart lost the count");
    raft.shutdown().await.unwrap();
    watcher.abort();
}
