//! kill -9 at random instants: everything reported durable survives, and the store reopens in a
//! state openraft accepts (log purged no further than the snapshot, snapshot not ahead of the
//! state machine).
//!
//! The test re-executes itself as a child that appends, applies, truncates, snapshots, purges
//! and votes on four shards as fast as it can (`common/crash_workload.rs`), printing each
//! operation only after it returned. The parent kills it with SIGKILL at a random moment,
//! reopens the database, and checks every printed fact. Run with `CHORUS_CRASH_SEED=<n>` to
//! replay a run. (Power loss, which also takes what was not synced: `power_loss.rs`.)

#[path = "common/crash_workload.rs"]
mod crash_workload;

use std::time::Duration;

use crash_workload::{Crash, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROUNDS: u64 = 25;

fn main() {
    crash_workload::run_child_if_asked();
    let seed: u64 = std::env::var("CHORUS_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("crash_recovery: seed {seed} (replay with CHORUS_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    for round in 0..ROUNDS {
        let ctx = format!("round {round}, seed {seed}");
        let run_for = Duration::from_millis(rng.random_range(20..400));
        let lines = crash_workload::run_child_and_kill(dir.path(), seed.wrapping_add(round), run_for, &ctx);
        model.record(&lines);
        rt.block_on(model.verify(dir.path(), Crash::Kill, &ctx));
    }
    let (flushed, snapshots, purged) = (model.flushed(), model.snapshots(), model.purged());
    println!(
        "crash_recovery: {ROUNDS} kill -9 rounds, {} reported operations, {flushed} flushed entries verified; \
         per shard, snapshot at {snapshots:?}, purged to {purged:?}",
        model.reported
    );
    assert!(flushed > 100, "the workload should have made progress");
    assert!(purged.iter().any(|&p| p > 0), "the workload should have purged through snapshots");
}
