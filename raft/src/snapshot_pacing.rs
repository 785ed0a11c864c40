//! When a shard builds its next snapshot.
//!
//! A snapshot copies the whole shard, and a chat log only grows. Built every fixed number of
//! entries, a snapshot's cost per entry would grow with the history the shard keeps: at
//! 10 million messages, a 2 GiB copy every 20,000 entries. So a shard builds its next snapshot
//! once both hold:
//! - at least `min_entries` entries have been applied since the last one (small shards behave
//!   as with a fixed interval), and
//! - the log written since then is at least `log_percent` % of the last snapshot's size.
//!
//! The second rule bounds the copying at `100 / log_percent` bytes of snapshot per byte of log,
//! however large the shard, at the price of disk: the log holds up to `log_percent` % of the
//! shard's size (plus the tail kept behind every snapshot). Redis rewrites its append-only file
//! the same way, once it has grown by a percentage of its size at the last rewrite.
//! `log_percent = 0` keeps the fixed interval (tests use it to make snapshots often).
//!
//! The pacer only decides *when* to ask; openraft builds (one at a time; a request while one
//! runs is ignored) and the counters follow what was built. A request that led to no build is
//! asked again after another `min_entries` entries, and a build's end (or failure) lets the next
//! apply ask at once. Log bytes are the entries' encoded commands as applied; at start-up the
//! count resumes from RocksDB's estimate of the log written since the snapshot (flushed,
//! compressed bytes), so restarts delay a snapshot by at most the log's compression ratio and
//! never postpone it indefinitely.

use std::sync::Mutex;

use tokio::sync::mpsc;

/// The settings: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPacing {
    pub min_entries: u64,
    pub log_percent: u64,
}

/// What had been applied when a build read its state; what the build covers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BuildMark {
    entries: u64,
    log_bytes: u64,
    epoch: u64,
}

#[derive(Debug, Default)]
struct Counters {
    /// None until configured: nothing is asked for.
    pacing: Option<SnapshotPacing>,
    /// Applied since the state the current snapshot holds.
    entries_since: u64,
    log_bytes_since: u64,
    /// Size of the current snapshot file (0: none yet).
    snapshot_bytes: u64,
    /// A snapshot was asked for when `entries_since` was this, and none has been built (or
    /// failed) since.
    requested_at: Option<u64>,
    /// Bumped by every install: a build that read the state before an install does not count.
    epoch: u64,
}

/// One shard's pacing: fed by apply, reset by builds and installs, and read by the task that
/// asks openraft for a snapshot (see `shard::start_shard`).
pub(crate) struct SnapshotPacer {
    counters: Mutex<Counters>,
    /// Capacity 1: one pending request is enough, however many applies find one due.
    wanted: mpsc::Sender<()>,
    requests: Mutex<Option<mpsc::Receiver<()>>>,
}

impl SnapshotPacer {
    /// A pacer that asks for nothing until [`SnapshotPacer::configure`] is called.
    pub(crate) fn new() -> SnapshotPacer {
        let (wanted, requests) = mpsc::channel(1);
        SnapshotPacer { counters: Mutex::default(), wanted, requests: Mutex::new(Some(requests)) }
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        // Every update is a few plain assignments: a poisoned lock holds consistent counters.
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the rule and checks it against what has been applied so far.
    pub(crate) fn configure(&self, pacing: SnapshotPacing) {
        self.counters().pacing = Some(pacing);
        self.applied(0, 0);
    }

    /// Where the count resumes at open: the log since the current snapshot, as far as known.
    pub(crate) fn resume(&self, entries_since: u64, log_bytes_since: u64, snapshot_bytes: u64) {
        let mut c = self.counters();
        c.entries_since = entries_since;
        c.log_bytes_since = log_bytes_since;
        c.snapshot_bytes = snapshot_bytes;
    }

    /// The receiving end of the requests, taken once by the task that passes them to openraft.
    pub(crate) fn take_requests(&self) -> Option<mpsc::Receiver<()>> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Counts an apply call's entries and the bytes of their commands; asks for a snapshot
    /// when one is due and none is pending.
    pub(crate) fn applied(&self, entries: u64, log_bytes: u64) {
        let mut c = self.counters();
        c.entries_since = c.entries_since.saturating_add(entries);
        c.log_bytes_since = c.log_bytes_since.saturating_add(log_bytes);
        let Some(pacing) = c.pacing else { return };
        // A request that led to no build (one already running when it arrived is the usual
        // reason; that build's end clears it) is asked again after another `min_entries`.
        let ask = match c.requested_at {
            None => true,
            Some(at) => c.entries_since.saturating_sub(at) >= pacing.min_entries.max(1),
        };
        if ask && is_due(pacing, &c) {
            c.requested_at = Some(c.entries_since);
            // Full: a request is pending already. Closed: the shard is stopping.
            let _ = self.wanted.try_send(());
        }
    }

    /// A build is reading the state as of now.
    pub(crate) fn build_started(&self) -> BuildMark {
        let c = self.counters();
        BuildMark { entries: c.entries_since, log_bytes: c.log_bytes_since, epoch: c.epoch }
    }

    /// A build that started at `mark` made a snapshot of `snapshot_bytes`: what was applied
    /// after `mark` counts towards the next one. A build overtaken by an install (whose
    /// snapshot is newer and current) changes no count.
    pub(crate) fn built(&self, mark: BuildMark, snapshot_bytes: u64) {
        let mut c = self.counters();
        c.requested_at = None;
        if mark.epoch != c.epoch {
            return;
        }
        c.entries_since = c.entries_since.saturating_sub(mark.entries);
        c.log_bytes_since = c.log_bytes_since.saturating_sub(mark.log_bytes);
        c.snapshot_bytes = snapshot_bytes;
    }

    /// A build failed: the next apply may ask again.
    pub(crate) fn build_failed(&self) {
        self.counters().requested_at = None;
    }

    /// A snapshot of `snapshot_bytes` from the leader replaced the state: the log starts over.
    pub(crate) fn installed(&self, snapshot_bytes: u64) {
        let mut c = self.counters();
        c.entries_since = 0;
        c.log_bytes_since = 0;
        c.snapshot_bytes = snapshot_bytes;
        c.requested_at = None;
        c.epoch += 1;
    }

    #[cfg(test)]
    fn is_requested(&self) -> bool {
        self.counters().requested_at.is_some()
    }
}

fn is_due(pacing: SnapshotPacing, c: &Counters) -> bool {
    c.entries_since >= pacing.min_entries.max(1)
        && u128::from(c.log_bytes_since) * 100 >= u128::from(pacing.log_percent) * u128::from(c.snapshot_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(min_entries: u64, log_percent: u64) -> (SnapshotPacer, mpsc::Receiver<()>) {
        let pacer = SnapshotPacer::new();
        let requests = pacer.take_requests().expect("taken once");
        pacer.configure(SnapshotPacing { min_entries, log_percent });
        (pacer, requests)
    }

    #[test]
    fn the_first_snapshot_comes_after_min_entries() {
        let (pacer, mut requests) = pacer(100, 50);
        pacer.applied(99, 1_000_000);
        assert!(requests.try_recv().is_err());
        pacer.applied(1, 10);
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn a_larger_shard_waits_for_log_in_proportion_to_its_snapshot() {
        let (pacer, mut requests) = pacer(100, 50);
        pacer.applied(100, 1_000);
        assert!(requests.try_recv().is_ok());
        let mark = pacer.build_started();
        pacer.built(mark, 1_000_000);
        // 10,000 entries, but only 400 kB of log against a 1 MB snapshot: not yet.
        pacer.applied(10_000, 400_000);
        assert!(requests.try_recv().is_err());
        pacer.applied(1, 100_000);
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn what_is_applied_during_a_build_counts_towards_the_next() {
        let (pacer, mut requests) = pacer(10, 100);
        pacer.applied(10, 500);
        assert!(requests.try_recv().is_ok());
        let mark = pacer.build_started();
        pacer.applied(7, 300);
        pacer.built(mark, 1_000);
        pacer.applied(3, 699);
        assert!(requests.try_recv().is_err(), "10 entries but 999 of 1,000 bytes");
        pacer.applied(0, 1);
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn one_request_is_pending_at_a_time_and_a_failed_build_asks_again() {
        let (pacer, mut requests) = pacer(10, 0);
        pacer.applied(10, 1);
        assert!(requests.try_recv().is_ok());
        pacer.applied(5, 1);
        assert!(requests.try_recv().is_err(), "asked once until built, failed or another 10 entries");
        assert!(pacer.is_requested());
        pacer.build_failed();
        pacer.applied(1, 1);
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn a_request_that_led_to_no_build_is_asked_again_after_min_entries() {
        let (pacer, mut requests) = pacer(10, 0);
        pacer.applied(10, 0);
        assert!(requests.try_recv().is_ok());
        pacer.applied(9, 0);
        assert!(requests.try_recv().is_err());
        pacer.applied(1, 0);
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn percent_zero_is_a_fixed_interval_and_the_count_resumes() {
        let (pacer, mut requests) = pacer(5, 0);
        pacer.resume(4, 0, u64::MAX);
        pacer.applied(1, 0);
        assert!(requests.try_recv().is_ok(), "the count resumes where the log was");
        pacer.built(pacer.build_started(), 1 << 40);
        pacer.applied(4, 0);
        assert!(requests.try_recv().is_err());
        pacer.applied(1, 0);
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn an_install_starts_the_count_over_and_a_build_it_overtook_changes_nothing() {
        let (pacer, mut requests) = pacer(10, 100);
        pacer.applied(10, 1_000);
        assert!(requests.try_recv().is_ok());
        let mark = pacer.build_started();
        pacer.applied(5, 3_000);
        // The leader's snapshot of 2,000 bytes replaces the state while the build runs.
        pacer.installed(2_000);
        assert!(!pacer.is_requested(), "an install answers a pending request");
        pacer.applied(9, 1_999);
        pacer.built(mark, 1_000);
        assert!(requests.try_recv().is_err());
        pacer.applied(1, 0);
        assert!(requests.try_recv().is_err(), "1,999 bytes of log against the installed 2,000");
        pacer.applied(0, 1);
        assert!(requests.try_recv().is_ok());
    }

    #[test]
    fn an_unconfigured_pacer_asks_for_nothing() {
        let pacer = SnapshotPacer::new();
        let mut requests = pacer.take_requests().expect("taken once");
        assert!(pacer.take_requests().is_none());
        pacer.applied(1 << 30, 1 << 40);
        assert!(requests.try_recv().is_err());
    }
}
