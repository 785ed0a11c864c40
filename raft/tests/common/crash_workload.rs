//! The workload and the checks of the crash tests (kill -9 in `crash_recovery.rs`, power loss
//! in `power_loss.rs`).
//!
//! A test re-executes itself as a child (`CHORUS_CRASH_CHILD_DIR` set) that appends, applies,
//! truncates, snapshots, purges and votes on four shards of one `NodeDb` as fast as it can,
//! printing each operation only after it returned (for appends: after the flush callback, which
//! says the entries are durable). The parent kills it at a random moment, crashes it some more
//! if it likes (cuts the power), reopens the database and checks every printed fact against
//! what the crash may have taken ([`Crash`]).
//!
//! Lines of the child: `V shard term` (vote saved), `F shard index term kind` (entry flushed;
//! kind `b`lank, `m`embership or `n`ormal), `A shard index` (applied up to), `t shard from` /
//! `T shard from` (truncation begun / done), `S shard index` (snapshot built), `P shard index`
//! (purged up to).

// Each test uses its own part.
#![allow(dead_code)]

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
pub const SHARDS: u32 = 4;

fn identity() -> ClusterIdentity {
    ClusterIdentity { cluster_id: "crash".into(), node_id: 1, shard_count: SHARDS, format_version: 0 }
}

/// In the re-executed child, runs the workload until it is killed (and never returns); in the
/// parent, returns at once.
pub fn run_child_if_asked() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        let seed = std::env::var(CHILD_SEED_ENV).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        child(Path::new(&dir), seed);
        std::process::exit(0);
    }
}

/// Starts a child on `dir`, lets it run for `run_for` after it is ready, kills it (SIGKILL),
/// and returns everything it printed.
pub fn run_child_and_kill(dir: &Path, seed: u64, run_for: Duration, ctx: &str) -> Vec<String> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Process::new(&exe)
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
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
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l == "READY" => break,
            Ok(l) => lines.push(l),
            Err(e) => panic!("{ctx}: child never became ready ({e})"),
        }
    }
    std::thread::sleep(run_for);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines
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
                    notify_after_ms: 0,
                }
                .into(),
            )
        }
    };
    Entry { log_id, payload }
}

fn kind(entry: &Entry) -> char {
    match entry.payload {
        EntryPayload::Blank => 'b',
        EntryPayload::Membership(_) => 'm',
        EntryPayload::Normal(_) => 'n',
    }
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
        println!("F {shard} 0 {term} m");
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
        let kinds: Vec<char> = entries.iter().map(kind).collect();
        log.blocking_append(entries).await.unwrap();
        for (i, kind) in (next..next + n).zip(kinds) {
            println!("F {shard} {i} {term} {kind}");
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
// The parent: what the child reported, and the checks after a crash.

/// What a crash may take from the reopened database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// kill -9: the process dies, the page cache stays. Everything written survives.
    Kill,
    /// kill -9, then power loss: only what was synced survives. Appends (once flushed), votes,
    /// truncations and snapshots are synced; applies and purges are not (by design: openraft
    /// re-applies from the log, and a lost purge brings back entries with the older
    /// `last_purged`), so those two may go back, but never past the snapshot.
    PowerLoss,
}

#[derive(Default)]
struct ShardModel {
    /// index → (term, kind) of every entry reported flushed and not truncated since.
    flushed: BTreeMap<u64, (u64, char)>,
    /// A truncation announced but not yet reported done: after a crash it may have happened.
    truncating_from: Option<u64>,
    purged: u64,
    applied: u64,
    snapshot: u64,
    vote_term: u64,
}

/// Everything the children reported, per shard.
pub struct Model {
    shards: Vec<ShardModel>,
    pub reported: usize,
}

impl Default for Model {
    fn default() -> Model {
        Model { shards: (0..SHARDS).map(|_| ShardModel::default()).collect(), reported: 0 }
    }
}

impl Model {
    /// Takes in what a child printed before it was killed.
    pub fn record(&mut self, lines: &[String]) {
        self.reported += lines.len();
        for line in lines {
            self.record_line(line);
        }
        // A truncation cut short by the kill may or may not have happened: entries from its
        // start on are no longer known.
        for m in &mut self.shards {
            if let Some(from) = m.truncating_from.take() {
                m.flushed.retain(|&i, _| i < from);
            }
        }
    }

    fn record_line(&mut self, line: &str) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| parts[i].parse::<u64>().unwrap();
        let Some(kind) = parts.first() else { return };
        if !matches!(*kind, "F" | "t" | "T" | "P" | "A" | "V" | "S") {
            return; // test-harness noise
        }
        let m = &mut self.shards[num(1) as usize];
        match *kind {
            "F" => {
                let entry_kind = parts.get(4).and_then(|k| k.chars().next()).unwrap_or('?');
                m.flushed.insert(num(2), (num(3), entry_kind));
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

    pub fn flushed(&self) -> usize {
        self.shards.iter().map(|m| m.flushed.len()).sum()
    }

    pub fn snapshots(&self) -> Vec<u64> {
        self.shards.iter().map(|m| m.snapshot).collect()
    }

    pub fn purged(&self) -> Vec<u64> {
        self.shards.iter().map(|m| m.purged).collect()
    }

    /// Reopens the database in `dir` and checks every reported fact that `crash` cannot have
    /// taken, and that openraft accepts the state; then takes the reopened state as known.
    pub async fn verify(&mut self, dir: &Path, crash: Crash, ctx: &str) {
        let db = NodeDb::open(dir, identity(), &DbOptions::default()).unwrap();
        for shard in 0..SHARDS {
            let ctx = format!("{ctx}, shard {shard}");
            let model = &mut self.shards[shard as usize];
            let (mut log, mut sm) = open_shard_storage(&db, shard).unwrap();
            // openraft's own start-up checks accept the state.
            let initial = StorageHelper::new(&mut log, &mut sm)
                .get_initial_state()
                .await
                .unwrap_or_else(|e| panic!("{ctx}: openraft rejects the reopened state: {e}"));

            let state = log.get_log_state().await.unwrap();
            let purged = state.last_purged_log_id.map(|id| id.index).unwrap_or(0);
            if crash == Crash::Kill {
                assert!(purged >= model.purged, "{ctx}: purge of {} lost (log says {purged})", model.purged);
            }
            let last = state.last_log_id.map(|id| id.index).unwrap_or(0);
            let first = purged + 1;
            let entries = log.read_range(first, last + 1).unwrap();
            assert_eq!(entries.len() as u64, last + 1 - first, "{ctx}: log has a hole in {first}..={last}");
            for (&index, &(term, entry_kind)) in model.flushed.range(first..) {
                assert!(index <= last, "{ctx}: flushed entry {index} is missing (log ends at {last})");
                let found = &entries[(index - first) as usize];
                assert_eq!(
                    found.log_id.leader_id.term, term,
                    "{ctx}: entry {index} has term {}, expected {term}",
                    found.log_id
                );
                assert_eq!(kind(found), entry_kind, "{ctx}: entry {index} changed its payload");
            }
            // The newest flushed membership is in force.
            let newest_membership = model.flushed.iter().rev().find(|(_, (_, k))| *k == 'm').map(|(&i, _)| i);
            let effective = initial.membership_state.effective().log_id().as_ref().map(|id| id.index);
            assert!(
                effective >= newest_membership,
                "{ctx}: membership of entry {newest_membership:?} lost (openraft finds {effective:?})"
            );
            let vote = log.read_vote().await.unwrap().map(|v| v.leader_id.term).unwrap_or(0);
            assert!(vote >= model.vote_term, "{ctx}: vote {} lost (found {vote})", model.vote_term);

            let applied = sm.applied_state().await.unwrap().0.map(|id| id.index).unwrap_or(0);
            if crash == Crash::Kill {
                assert!(applied >= model.applied, "{ctx}: apply up to {} lost (found {applied})", model.applied);
            }
            // openraft starts only if purged <= snapshot <= applied.
            let snapshot =
                sm.get_current_snapshot().await.unwrap().and_then(|s| s.meta.last_log_id).map_or(0, |id| id.index);
            assert!(snapshot >= model.snapshot, "{ctx}: snapshot at {} lost (found {snapshot})", model.snapshot);
            assert!(purged <= snapshot, "{ctx}: log purged to {purged}, past the snapshot at {snapshot}");
            assert!(snapshot <= applied, "{ctx}: snapshot at {snapshot} is ahead of applied {applied}");
            // The room's messages are dense from 1 whatever instant the crash hit.
            let reader = sm.reader();
            if let Some(room) = reader.room(&format!("room-{shard}")).unwrap() {
                let mut after = 0;
                loop {
                    let page = reader.history(&room.name, HistoryQuery::After { after, limit: 1000 }, "s").unwrap();
                    for m in &page.messages {
                        assert_eq!(m.seq, after + 1, "{ctx}: room sequence has a gap");
                        after = m.seq;
                    }
                    if page.messages.is_empty() {
                        break;
                    }
                }
                assert_eq!(after, room.last_seq, "{ctx}: room record and messages disagree");
            }
            model.purged = purged;
            model.applied = applied;
        }
    }
}
