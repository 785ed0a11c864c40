//! Power loss at random instants: nothing reported durable is lost, even what the page cache
//! held. kill -9 alone keeps the page cache, so a store that never fsynced would pass
//! `crash_recovery.rs`; here the child's data dir is on a lazy FUSE filesystem
//! (`chorus-lazyfs`) that keeps unsynced writes in memory, and after the kill the parent cuts
//! the power: every unsynced write is dropped (in half of the rounds, part of the newest one
//! survives, torn). Then every flushed entry (term and payload kind), every vote, every
//! snapshot and the newest membership must be there, and openraft must accept the state.
//! Applies and purges are not synced by design and may go back (never past the snapshot).
//!
//! Same workload as `crash_recovery.rs` (`common/crash_workload.rs`). Replay a run with
//! `CHORUS_POWER_SEED=<n>`. Without /dev/fuse or the right to mount, the test says SKIPPED and
//! passes.

#[path = "common/crash_workload.rs"]
mod crash_workload;

use std::time::{Duration, Instant};

use chorus_lazyfs::LazyFs;
use crash_workload::{Crash, Model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROUNDS: u64 = 30;

fn main() {
    crash_workload::run_child_if_asked();
    let seed: u64 = std::env::var("CHORUS_POWER_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("power_loss: seed {seed} (replay with CHORUS_POWER_SEED={seed})");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut fs = match LazyFs::mount_seeded(&dir.path().join("backing"), &dir.path().join("mnt"), seed) {
        Ok(fs) => fs,
        Err(e) if e.is_unavailable() => {
            eprintln!(
                "power_loss: SKIPPED: no power-loss test on this machine: it needs /dev/fuse and the right to \
                 mount a FUSE filesystem (root, or fusermount3 from Debian's fuse3): {e}"
            );
            return;
        }
        Err(e) => panic!("power_loss: mounting lazyfs failed: {e}"),
    };
    let data_dir = fs.mountpoint().join("node");
    let mut model = Model::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (mut dropped_bytes, mut torn_writes) = (0u64, 0usize);

    for round in 0..ROUNDS {
        let ctx = format!("round {round}, seed {seed}");
        let run_for = Duration::from_millis(rng.random_range(20..400));
        let lines = crash_workload::run_child_and_kill(&data_dir, seed.wrapping_add(round), run_for, &ctx);
        model.record(&lines);
        let torn = rng.random_bool(0.5);
        let cut = fs.power_cut(torn).unwrap_or_else(|e| panic!("{ctx}: power cut failed: {e}"));
        dropped_bytes += cut.bytes;
        torn_writes += usize::from(cut.torn.is_some());
        rt.block_on(model.verify(&data_dir, Crash::PowerLoss, &format!("{ctx}, after a power cut that {cut}")));
    }
    let (flushed, snapshots, purged) = (model.flushed(), model.snapshots(), model.purged());
    println!(
        "power_loss: {ROUNDS} rounds of kill -9 and power cut in {:.1}s, {} reported operations, {flushed} flushed \
         entries verified; the cuts dropped {dropped_bytes} unsynced bytes and tore {torn_writes} writes; per \
         shard, snapshot at {snapshots:?}, purged to {purged:?}",
        started.elapsed().as_secs_f64(),
        model.reported
    );
    assert!(flushed > 100, "the workload should have made progress");
    assert!(dropped_bytes > 0, "the cuts should have found unsynced data to drop (is the filesystem lazy?)");
    assert!(purged.iter().any(|&p| p > 0), "the workload should have purged through snapshots");
}
