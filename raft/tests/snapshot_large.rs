//! A snapshot of a shard with 100,000 messages: built, streamed in chunks, installed on a fresh
//! store, with identical history and bounded memory during the transfer.
//!
//! This file holds one test so that the process's peak RSS belongs to it alone.

use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chorus_proto::storage::{ClusterIdentity, Command, Op};
use chorus_raft::state_machine::{append_op, create_room_op};
use chorus_raft::{DbOptions, Entry, HistoryQuery, LogId, NodeDb, ShardReader, ShardStateMachine, open_shard_storage};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const MESSAGES: u64 = 100_000;
const BODY_BYTES: usize = 1024;
const ROOMS: u64 = 50;
const CHUNK_BYTES: usize = 1 << 20;
const SHARD: u32 = 3;

fn small_db(dir: &std::path::Path, node_id: u64) -> Arc<NodeDb> {
    let identity = ClusterIdentity { cluster_id: "snap".into(), node_id, shard_count: 8, format_version: 0 };
    // Small memtables and cache, so that what the transfer itself holds is what we measure.
    let options = DbOptions { block_cache_bytes: 8 << 20, write_buffer_bytes: 16 << 20, max_background_jobs: 2 };
    NodeDb::open(dir, identity, &options).unwrap()
}

fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets the kernel's peak-RSS counter (VmHWM) of this process.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn all_history(reader: &ShardReader, room: &str) -> Vec<chorus_proto::storage::MessageRecord> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = reader.history(room, HistoryQuery::After { after, limit: 1000 }, "s").unwrap();
        let Some(last) = page.messages.last() else { break };
        after = last.seq;
        out.extend(page.messages);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_message_snapshot_streams_and_installs_with_bounded_memory() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let src_db = small_db(src_dir.path(), 1);
    let dst_db = small_db(dst_dir.path(), 2);
    let (_, mut src) = open_shard_storage(&src_db, SHARD).unwrap();
    let (_, mut dst): (_, ShardStateMachine) = open_shard_storage(&dst_db, SHARD).unwrap();

    let started = Instant::now();
    let mut index = 0u64;
    let mut next_entry = |ops: Vec<chorus_proto::storage::op::Kind>| {
        index += 1;
        let cmd = Command {
            ts_ms: index,
            ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
            rules: chorus_raft::state_machine::CURRENT_RULES,
            notify_after_ms: 0,
        };
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(cmd.into()) }
    };
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("room-{r}")).collect();
    src.apply([next_entry(rooms.iter().map(|r| create_room_op(r, "s")).collect())]).await.unwrap();
    let body = Bytes::from(vec![b'b'; BODY_BYTES]);
    let mut sent = 0u64;
    while sent < MESSAGES {
        let mut entries = Vec::new();
        for _ in 0..20 {
            let ops = (0..50)
                .map(|_| {
                    sent += 1;
                    append_op(&rooms[(sent % ROOMS) as usize], "s", b"client", sent, body.clone())
                })
                .collect();
            entries.push(next_entry(ops));
        }
        src.apply(entries).await.unwrap();
    }
    println!("filled {MESSAGES} messages in {:?}", started.elapsed());

    let started = Instant::now();
    let snapshot = src.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut source = snapshot.snapshot;
    let size = source.seek(SeekFrom::End(0)).await.unwrap();
    println!("built a {:.1} MiB snapshot in {:?}", size as f64 / (1 << 20) as f64, started.elapsed());
    assert!(size > (MESSAGES * BODY_BYTES as u64), "the snapshot holds every message");

    // From here on: the transfer. Peak RSS is measured relative to this point.
    reset_peak_rss();
    let baseline_kib = proc_status_kib("VmRSS:");
    let started = Instant::now();
    source.seek(SeekFrom::Start(0)).await.unwrap();
    let mut receiving = dst.begin_receiving_snapshot().await.unwrap();
    // As openraft's chunked transport does: read a chunk, send it, write it at its offset.
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut offset = 0u64;
    loop {
        let n = source.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        receiving.seek(SeekFrom::Start(offset)).await.unwrap();
        receiving.write_all(&chunk[..n]).await.unwrap();
        offset += n as u64;
    }
    receiving.flush().await.unwrap();
    assert_eq!(offset, size);
    dst.install_snapshot(&snapshot.meta, receiving).await.unwrap();
    let elapsed = started.elapsed();
    let peak_kib = proc_status_kib("VmHWM:");
    let growth_mib = peak_kib.saturating_sub(baseline_kib) as f64 / 1024.0;
    println!(
        "streamed and installed {:.1} MiB in {elapsed:?}; RSS before {:.1} MiB, peak during transfer {:.1} MiB (+{growth_mib:.1} MiB)",
        size as f64 / (1 << 20) as f64,
        baseline_kib as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
    );
    // Bounded: memtables (16 MiB), block cache (8 MiB), one chunk, I/O buffers and install
    // batches (4 MiB) — not the snapshot's size.
    let snapshot_mib = size as f64 / (1 << 20) as f64;
    assert!(
        growth_mib < 64.0 && growth_mib < snapshot_mib / 2.0,
        "peak grew by {growth_mib:.1} MiB for a {snapshot_mib:.1} MiB snapshot"
    );

    assert_eq!(dst.applied_state().await.unwrap(), src.applied_state().await.unwrap());
    let (src_reader, dst_reader) = (src.reader(), dst.reader());
    assert_eq!(
        src_reader.list_rooms(None, 1000, "s", false).unwrap(),
        dst_reader.list_rooms(None, 1000, "s", false).unwrap()
    );
    let mut total = 0;
    for room in &rooms {
        let a = all_history(&src_reader, room);
        let b = all_history(&dst_reader, room);
        assert_eq!(a.len() as u64, MESSAGES / ROOMS);
        assert!(a == b, "history of {room} differs after install");
        total += b.len() as u64;
    }
    assert_eq!(total, MESSAGES);
}
