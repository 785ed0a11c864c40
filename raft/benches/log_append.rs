//! Storage micro-benchmark: durable log appends per second and fsyncs per append, for one shard
//! and for many shards with concurrent writers, with 200-byte messages.
//!
//! Each writer is one shard's log: it appends one entry (one message) and waits for openraft's
//! flush callback, in a loop. Concurrent shards share WAL syncs through the group commit.
//!
//! ```text
//! cargo bench -p chorus-raft --bench log_append -- [--seconds 5] [--runs 5] [--shards 1,64] [--body-bytes 200]
//! ```
//! Data goes to `$CHORUS_BENCH_DIR` (default: the system temp dir): put it on the disk you
//! want to measure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_proto::storage::{ClusterIdentity, Command, Op};
use chorus_raft::state_machine::append_op;
use chorus_raft::{DbOptions, Entry, LogId, NodeDb, ShardLogStore};
use openraft::storage::RaftLogStorageExt;
use openraft::{CommittedLeaderId, EntryPayload};

struct Args {
    seconds: u64,
    runs: usize,
    shards: Vec<u32>,
    body_bytes: usize,
}

fn parse_args() -> Args {
    let mut args = Args { seconds: 5, runs: 5, shards: vec![1, 64], body_bytes: 200 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--seconds" => args.seconds = value().parse().expect("--seconds N"),
            "--runs" => args.runs = value().parse().expect("--runs N"),
            "--shards" => args.shards = value().split(',').map(|s| s.parse().expect("--shards 1,64")).collect(),
            "--body-bytes" => args.body_bytes = value().parse().expect("--body-bytes N"),
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

struct RunResult {
    appends_per_sec: f64,
    fsyncs_per_append: f64,
    p50_us: u64,
    p99_us: u64,
}

async fn run(shards: u32, seconds: u64, body_bytes: usize) -> RunResult {
    let base = std::env::var_os("CHORUS_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).unwrap();
    let identity = ClusterIdentity { cluster_id: "bench".into(), node_id: 1, shard_count: shards, format_version: 0 };
    let db = NodeDb::open(dir.path(), identity, &DbOptions::default()).unwrap();
    let body = Bytes::from(vec![b'm'; body_bytes]);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let before = db.sync_stats();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for shard in 0..shards {
        let mut log = ShardLogStore::new(Arc::clone(&db), shard);
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut index = 1;
            while Instant::now() < deadline {
                let op = append_op("bench-room", "bench", b"client", index, body.clone());
                let cmd = Command {
                    ts_ms: index,
                    ops: vec![Op { kind: Some(op) }],
                    rules: chorus_raft::state_machine::CURRENT_RULES,
                    notify_after_ms: 0,
                };
                let entry = Entry {
                    log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                    payload: EntryPayload::Normal(cmd.into()),
                };
                let t = Instant::now();
                log.blocking_append([entry]).await.unwrap();
                latencies.push(t.elapsed().as_micros() as u64);
                index += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = db.sync_stats();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let appends = latencies.len() as f64;
    RunResult {
        appends_per_sec: appends / elapsed,
        fsyncs_per_append: (after.syncs - before.syncs) as f64 / appends,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!(
        "log_append: {} s per run, {} runs, {}-byte messages, one entry per append, medians over runs",
        args.seconds, args.runs, args.body_bytes
    );
    println!("| shards | appends/s | fsyncs/append | append p50 (µs) | append p99 (µs) |");
    println!("|-------:|----------:|--------------:|----------------:|----------------:|");
    for &shards in &args.shards {
        let results: Vec<RunResult> =
            (0..args.runs).map(|_| rt.block_on(run(shards, args.seconds, args.body_bytes))).collect();
        println!(
            "| {shards} | {:.0} | {:.3} | {:.0} | {:.0} |",
            median(results.iter().map(|r| r.appends_per_sec).collect()),
            median(results.iter().map(|r| r.fsyncs_per_append).collect()),
            median(results.iter().map(|r| r.p50_us as f64).collect()),
            median(results.iter().map(|r| r.p99_us as f64).collect()),
        );
    }
}
