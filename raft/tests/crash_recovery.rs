//! kill -9 at random instants: everything reported durable survives, and the store reopens in a
//! state openraft accepts (log purged no further than the snapshot, snapshot not ahead of the
//! state machine).
//!
//! The test re-executes itself as a child (`CHORUS_CRASH_CHILD_DIR` set) that appends, applies,
//! truncates, snapshots, purges and votes on four shards as fast as it can, printing each operation only
//! after it returned (for appends: after the flush callback). The parent kills it with SIGKILL
//! at a random moment, reopens the database, and checks every printed fact. Run with
//! `CHORUS_CRASH_SEED=<n>` to replay a run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_proto::storage::{ClusterIdentity, Command, Op};
use chorus_raft::state_machine::{append_op, create_room_op};
use chorus_raft::{DbOptions, Entry, HistoryQuery, LogId, Membership, NodeDb, ShardId, Vote, open_shard_storage};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine, StorageHelper};
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_DIR_ENV: &str = "CHORUS_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "CHORUS_CRASH_CHILD_SEED";
const SHARDS: u32 = 4;
const ROUNDS: u64 = 25;

fn identity() -> ClusterIdentity {
    ClusterIdentity { cluster_id: "crash".into(), node_id: 1, shard_count: SHARDS, format_version: 0 }
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        let seed = std::env::var(CHILD_SEED_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        child(Path::new(&dir), seed);
        return;
    }
    parent();
}

// ---------------------------------------------------------------------------------------------
// The child: a workload that prints what it knows to be done.

fn child(dir: &Path, seed: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let db = NodeDb::open(dir, identity(), &DbOptions::default()).unwrap();
        let mut tasks = Vec::new();
        for shard in 0..SHARDS {
            let db = db.clone();
            tasks.push(tokio::spawn(shard_workload(db, shard, seed.wrapping_add(u64::from(shard) * 7919))));
        }
        println!("READY");
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn entry(shard: ShardId, term: u64, index: u64, rng: &mut StdRng) -> Entry {
    let log_id = LogId::new(CommittedLeaderId::new(term, 1), index);
    let payload = match rng.random_range(0..20) {
        0 => EntryPayload::Blank,
        1 => EntryPayload::Membership(Membership::new(vec![[1, 2, 3].into()], ())),
        _ => {
            let room = format!("room-{shard}");
            let body = Bytes::from(vec![b'x'; rng.random_range(0..3000)]);
            let ops = vec![create_room_op(&room, "w"), append_op(&room, "w", b"writer", index, body)];
            EntryPayload::Normal(
                Command {
                    ts_ms: index,
                    ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
                    rules: chorus_raft::state_machine::CURRENT_RULES,
                }
                .into(),
            )
        }
    };
    Entry { log_id, payload }
}

async fn shard_workload(db: Arc<NodeDb>, shard: ShardId, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut log, mut sm) = open_shard_storage(&db, shard).unwrap();
    let state = log.get_log_state().await.unwrap();
    let mut term = log.read_vote().await.unwrap().map(|v| v.leader_id.term).unwrap_or(0) + 1;
    log.save_vote(&Vote::new(term, 1)).await.unwrap();
    println!("V {shard} {term}");
    if state.last_log_id.is_none() {
        // Like `Raft::initialize`: a log starts with a membership entry at index 0 (openraft reads
        // it at start-up when nothing was purged), which is applied at once.
        let first = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), 0),
            payload: EntryPayload::Membership(Membership::new(vec![[1, 2, 3].into()], ())),
        };
        log.blocking_append(vec![first.clone()]).await.unwrap();
        println!("F {shard} 0 {term}");
        sm.apply(vec![first]).await.unwrap();
        println!("A {shard} 0");
    }
    let state = log.get_log_state().await.unwrap();
    let mut next = state.last_log_id.map(|id| id.index + 1).unwrap_or(0);
    let mut applied = sm.applied_state().await.unwrap().0.map(|id| id.index).unwrap_or(0);
    let mut snapshot_at =
        sm.get_current_snapshot().await.unwrap().and_then(|s| s.meta.last_log_id).map_or(0, |id| id.index);
    loop {
        let n = rng.random_range(1..=8);
        let entries: Vec<Entry> = (next..next + n).map(|i| entry(shard, term, i, &mut rng)).collect();
        log.blocking_append(entries).await.unwrap();
        for i in next..next + n {
            println!("F {shard} {i} {term}");
        }
        next += n;

        if rng.random_bool(0.6) && applied + 1 < next {
            let upto = rng.random_range(applied + 1..next);
            let entries = log.read_range(applied + 1, upto + 1).unwrap();
            assert_eq!(entries.len() as u64, upto - applied, "log must be contiguous");
            sm.apply(entries).await.unwrap();
            applied = upto;
            println!("A {shard} {upto}");
        } else if rng.random_bool(0.1) && next - 1 > applied {
            // A new leader overwrites the uncommitted tail.
            let from = rng.random_range(applied + 1..next);
            // Announced first: a kill during the truncate may or may not leave it done.
            println!("t {shard} {from}");
            log.truncate(LogId::new(CommittedLeaderId::new(term, 1), from)).await.unwrap();
            println!("T {shard} {from}");
            next = from;
            term += 1;
            log.save_vote(&Vote::new(term, 1)).await.unwrap();
            println!("V {shard} {term}");
        }
        if rng.random_bool(0.03) {
            let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
            snapshot_at = snapshot.meta.last_log_id.map_or(0, |id| id.index);
            println!("S {shard} {snapshot_at}");
        }
        if rng.random_bool(0.05) && applied > 10 && snapshot_at > 0 {
            // Like openraft: never past the snapshot (a purge past it waits for an install).
            let upto = (applied - rng.random_range(0..10)).min(snapshot_at);
            let purged = log.read_range(upto, upto + 1).unwrap();
            if let Some(e) = purged.first() {
                log.purge(e.log_id).await.unwrap();
                println!("P {shard} {upto}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: kill, reopen, check.

#[derive(Default)]
struct ShardModel {
    /// index → term of every entry reported flushed and not truncated since.
    flushed: BTreeMap<u64, u64>,
    /// A truncation announced but not yet reported done: after a kill it may have happened.
    truncating_from: Option<u64>,
    purged: u64,
    applied: u64,
    snapshot: u64,
    vote_term: u64,
}

fn parent() {
    let seed: u64 = std::env::var("CHORUS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("crash_recovery: seed {seed} (replay with CHORUS_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut models: Vec<ShardModel> = (0..SHARDS).map(|_| ShardModel::default()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut total_lines = 0usize;

    for round in 0..ROUNDS {
        let mut child = Process::new(&exe)
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_SEED_ENV, seed.wrapping_add(round).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            match line {
                Ok(l) if l == "READY" => break,
                Ok(l) => lines.push(l),
                Err(e) => panic!("round {round}: child never became ready ({e}); seed {seed}"),
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        total_lines += lines.len();
        for line in &lines {
            apply_line(&mut models, line);
        }
        // A truncation cut short by the kill may or may not have happened: entries from its
        // start on are no longer known.
        for m in &mut models {
            if let Some(from) = m.truncating_from.take() {
                m.flushed.retain(|&i, _| i < from);
            }
        }
        rt.block_on(verify(dir.path(), &models, round, seed));
    }
    let flushed: usize = models.iter().map(|m| m.flushed.len()).sum();
    let snapshots: Vec<u64> = models.iter().map(|m| m.snapshot).collect();
    let purged: Vec<u64> = models.iter().map(|m| m.purged).collect();
    println!(
        "crash_recovery: {ROUNDS} kill -9 rounds, {total_lines} reported operations, {flushed} flushed entries verified; \
         per shard, snapshot at {snapshots:?}, purged to {purged:?}"
    );
    assert!(flushed > 100, "the workload should have made progress");
    assert!(purged.iter().any(|&p| p > 0), "the workload should have purged through snapshots");
}

fn apply_line(models: &mut [ShardModel], line: &str) {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| parts[i].parse::<u64>().unwrap();
    let Some(kind) = parts.first() else { return };
    if !matches!(*kind, "F" | "t" | "T" | "P" | "A" | "V" | "S") {
        return; // test-harness noise
    }
    let m = &mut models[num(1) as usize];
    match *kind {
        "F" => {
            m.flushed.insert(num(2), num(3));
        }
        "t" => m.truncating_from = Some(num(2)),
        "T" => {
            let from = num(2);
            m.flushed.retain(|&i, _| i < from);
            m.truncating_from = None;
        }
        "P" => m.purged = m.purged.max(num(2)),
        "A" => m.applied = m.applied.max(num(2)),
        "V" => m.vote_term = m.vote_term.max(num(2)),
        "S" => m.snapshot = m.snapshot.max(num(2)),
        _ => unreachable!(),
    }
}

async fn verify(dir: &Path, models: &[ShardModel], round: u64, seed: u64) {
    let ctx = |shard: ShardId| format!("round {round}, shard {shard}, seed {seed}");
    let db = NodeDb::open(dir, identity(), &DbOptions::default()).unwrap();
    for shard in 0..SHARDS {
        let model = &models[shard as usize];
        let (mut log, mut sm) = open_shard_storage(&db, shard).unwrap();
        // openraft's own start-up checks accept the state.
        StorageHelper::new(&mut log, &mut sm)
            .get_initial_state()
            .await
            .unwrap_or_else(|e| panic!("{}: openraft rejects the reopened state: {e}", ctx(shard)));

        let state = log.get_log_state().await.unwrap();
        let purged = state.last_purged_log_id.map(|id| id.index).unwrap_or(0);
        assert!(purged >= model.purged, "{}: purge of {} lost (log says {purged})", ctx(shard), model.purged);
        let last = state.last_log_id.map(|id| id.index).unwrap_or(0);
        let first = purged + 1;
        let entries = log.read_range(first, last + 1).unwrap();
        assert_eq!(entries.len() as u64, last + 1 - first, "{}: log has a hole in {first}..={last}", ctx(shard));
        for (&index, &term) in model.flushed.range(first..) {
            assert!(index <= last, "{}: flushed entry {index} is missing (log ends at {last})", ctx(shard));
            let found = entries[(index - first) as usize].log_id;
            assert_eq!(found.leader_id.term, term, "{}: entry {index} has term {found}, expected {term}", ctx(shard));
        }
        let vote = log.read_vote().await.unwrap().map(|v| v.leader_id.term).unwrap_or(0);
        assert!(vote >= model.vote_term, "{}: vote {} lost (found {vote})", ctx(shard), model.vote_term);

        let applied = sm.applied_state().await.unwrap().0.map(|id| id.index).unwrap_or(0);
        assert!(applied >= model.applied, "{}: apply up to {} lost (found {applied})", ctx(shard), model.applied);
        // openraft starts only if purged <= snapshot <= applied.
        let snapshot =
            sm.get_current_snapshot().await.unwrap().and_then(|s| s.meta.last_log_id).map_or(0, |id| id.index);
        assert!(snapshot >= model.snapshot, "{}: snapshot at {} lost (found {snapshot})", ctx(shard), model.snapshot);
        assert!(purged <= snapshot, "{}: log purged to {purged}, past the snapshot at {snapshot}", ctx(shard));
        assert!(snapshot <= applied, "{}: snapshot at {snapshot} is ahead of applied {applied}", ctx(shard));
        // The room's messages are dense from 1 whatever instant the kill hit.
        let reader = sm.reader();
        if let Some(room) = reader.room(&format!("room-{shard}")).unwrap() {
            let mut after = 0;
            loop {
                let page = reader.history(&room.name, HistoryQuery::After { after, limit: 1000 }, "s").unwrap();
                for m in &page.messages {
                    assert_eq!(m.seq, after + 1, "{}: room sequence has a gap", ctx(shard));
                    after = m.seq;
                }
                if page.messages.is_empty() {
                    break;
                }
            }
            assert_eq!(after, room.last_seq, "{}: room record and messages disagree", ctx(shard));
        }
    }
}
