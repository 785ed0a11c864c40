//! A follower that missed more than the retained log catches up through a snapshot streamed in
//! chunks by openraft, and ends with the same history as the others.

mod common;

use std::time::Duration;

use bytes::Bytes;
use chorus_proto::storage::{Command, Op};
use chorus_raft::state_machine::{append_op, create_room_op};
use chorus_raft::{HistoryQuery, RaftTuning, ShardEvent, SharedCommand};
use common::{Router, TestNode, start_cluster};

const SHARD: u32 = 2;

fn command(ops: Vec<chorus_proto::storage::op::Kind>) -> SharedCommand {
    Command {
        ts_ms: 1,
        ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
        rules: chorus_raft::state_machine::CURRENT_RULES,
        notify_after_ms: 0,
    }
    .into()
}

async fn wait_for_leader(nodes: &[TestNode]) -> usize {
    let raft = &nodes[0].replica.raft;
    let metrics = raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.current_leader.is_some(), "a leader is elected")
        .await
        .expect("leader elected");
    let leader = metrics.current_leader.unwrap();
    nodes.iter().position(|n| n.id == leader).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_behind_the_purged_log_catches_up_by_snapshot() {
    let tuning = RaftTuning {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 400,
        election_timeout_max_ms: 800,
        snapshot_every_entries: 100,
        snapshot_log_percent: 0, // a snapshot every 100 entries, however large the shard
        log_entries_kept_after_snapshot: 20,
        snapshot_chunk_bytes: 16 * 1024, // several chunks per snapshot
        ..RaftTuning::default()
    };
    let router = Router::default();
    let nodes = start_cluster(&router, &[1, 2, 3], SHARD, &tuning).await;
    let leader = wait_for_leader(&nodes).await;
    let leader_raft = nodes[leader].replica.raft.clone();
    let lagging = (leader + 1) % nodes.len();

    leader_raft.client_write(command(vec![create_room_op("room", "s")])).await.unwrap();
    for i in 1..=10u64 {
        leader_raft.client_write(command(vec![append_op("room", "s", b"c", i, "before")])).await.unwrap();
    }
    let lagging_raft = nodes[lagging].replica.raft.clone();
    let index_before = leader_raft.metrics().borrow().last_applied.unwrap().index;
    lagging_raft
        .wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(Some(index_before), "caught up")
        .await
        .unwrap();
    let mut lagging_events = nodes[lagging].replica.reader.subscribe();

    router.isolate(nodes[lagging].id);
    // Many entries, concurrently: the leader snapshots and purges far past the lagging node.
    let mut client_seq = 10u64;
    for _ in 0..20 {
        let mut writes = Vec::new();
        for _ in 0..25 {
            client_seq += 1;
            let raft = leader_raft.clone();
            let body = Bytes::from(vec![b'm'; 300]);
            let cmd = command(vec![append_op("room", "s", b"c", client_seq, body)]);
            writes.push(tokio::spawn(async move { raft.client_write(cmd).await }));
        }
        for w in writes {
            w.await.unwrap().unwrap();
        }
    }
    let last = leader_raft.metrics().borrow().last_applied.unwrap().index;
    let purged = leader_raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some_and(|p| p.index > index_before + 1), "leader purged past the lagging node")
        .await
        .expect("leader purges its log after snapshots")
        .purged;
    assert!(purged.unwrap().index > index_before);

    router.heal(nodes[lagging].id);
    lagging_raft
        .wait(Some(Duration::from_secs(30)))
        .applied_index_at_least(Some(last), "lagging node caught up")
        .await
        .expect("lagging node catches up");

    let mut installed = false;
    while let Ok(event) = lagging_events.try_recv() {
        installed |= matches!(event, ShardEvent::SnapshotInstalled);
    }
    assert!(installed, "the lagging node should have caught up through a snapshot");

    let histories: Vec<_> = nodes
        .iter()
        .map(|n| {
            let mut all = Vec::new();
            let mut after = 0;
            loop {
                let page = n.replica.reader.history("room", HistoryQuery::After { after, limit: 1000 }, "s").unwrap();
                if page.messages.is_empty() {
                    break;
                }
                after = page.messages.last().unwrap().seq;
                all.extend(page.messages);
            }
            all
        })
        .collect();
    assert_eq!(histories[0].len() as u64, client_seq);
    assert!(histories.iter().all(|h| h == &histories[0]), "every node has the same history");
    for node in &nodes {
        node.replica.raft.shutdown().await.unwrap();
    }
}
