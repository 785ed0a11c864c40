//! Group commit: one thread per node that makes the RocksDB write-ahead log durable.
//!
//! Writers (log appends of every shard, votes, snapshot installs) write their batch without
//! syncing, which makes it readable at once, then queue a waiter here. The syncer thread takes
//! every waiter queued so far, issues one `SyncWAL` (fsync), and only then completes them. A
//! waiter is therefore completed only after a sync that started after its write returned, and
//! because the WAL is one sequential file, that sync covers the write. Appends of many shards
//! arriving together share one fsync; under load the batch grows by itself while a sync runs.
//!
//! Bound: each waiter is one in-flight write of one shard. openraft keeps the log I/O of a
//! shard sequential and the node bounds its proposals, so the queue is bounded by the shards'
//! in-flight I/O, and it drains at every sync.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::LogFlushed;
use tokio::sync::oneshot;

use crate::types::TypeConfig;
use crate::work_queue::{QueueThread, WorkQueue};

/// Something waiting for the WAL to be synced.
enum SyncWaiter {
    /// openraft's "log I/O flushed" callback for one append.
    LogFlushed(LogFlushed<TypeConfig>),
    /// Any other durable write (vote, truncate, snapshot install).
    Notify(oneshot::Sender<Result<(), io::Error>>),
}

impl SyncWaiter {
    fn complete(self, result: Result<(), io::Error>) {
        match self {
            SyncWaiter::LogFlushed(cb) => cb.log_io_completed(result),
            // The waiter may have given up (its task was cancelled): nothing to tell.
            SyncWaiter::Notify(tx) => drop(tx.send(result)),
        }
    }
}

struct Counters {
    syncs: AtomicU64,
    synced_writes: AtomicU64,
}

/// Counters of the group commit, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// WAL syncs (fsyncs) issued.
    pub syncs: u64,
    /// Writes made durable by those syncs.
    pub synced_writes: u64,
}

/// The per-node WAL sync thread. Dropping it drains the queue and joins the thread.
pub struct WalSyncer {
    queue: Arc<WorkQueue<SyncWaiter>>,
    counters: Arc<Counters>,
    thread: QueueThread,
}

impl WalSyncer {
    pub(crate) fn start(db: Arc<rocksdb::DB>) -> io::Result<WalSyncer> {
        let queue = Arc::new(WorkQueue::new());
        let counters = Arc::new(Counters { syncs: AtomicU64::new(0), synced_writes: AtomicU64::new(0) });
        let (drained, counted) = (queue.clone(), counters.clone());
        let thread = QueueThread::spawn("chorus-wal-sync", move || run(&db, &drained, &counted))?;
        Ok(WalSyncer { queue, counters, thread })
    }

    /// Calls openraft's callback once everything written so far is durable.
    pub fn complete_after_sync(&self, callback: LogFlushed<TypeConfig>) {
        self.enqueue(SyncWaiter::LogFlushed(callback));
    }

    /// Returns once everything written so far is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(SyncWaiter::Notify(tx));
        rx.await.unwrap_or_else(|_| Err(io::Error::other("WAL sync thread stopped")))
    }

    pub fn stats(&self) -> SyncStats {
        SyncStats {
            syncs: self.counters.syncs.load(Ordering::Relaxed),
            synced_writes: self.counters.synced_writes.load(Ordering::Relaxed),
        }
    }

    fn enqueue(&self, waiter: SyncWaiter) {
        if let Err(waiter) = self.queue.push(waiter) {
            waiter.complete(Err(io::Error::other("node is shutting down: WAL sync refused")));
        }
    }

    /// Completes every queued waiter (with a final sync) and stops the thread.
    pub fn shutdown(&self) {
        self.queue.close();
        self.thread.join();
    }
}

impl Drop for WalSyncer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(db: &rocksdb::DB, queue: &WorkQueue<SyncWaiter>, counters: &Counters) {
    while let Some(batch) = queue.take_all() {
        let result = db.flush_wal(true).map_err(|e| e.into_string());
        if let Err(e) = &result {
            // RocksDB stops accepting writes after a failed WAL sync; openraft sees the error on
            // every shard and stops them (fail-stop, as etcd does on a failed fsync).
            tracing::error!(error = %e, "WAL sync failed");
        }
        counters.syncs.fetch_add(1, Ordering::Relaxed);
        counters.synced_writes.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for waiter in batch {
            waiter.complete(result.clone().map_err(io::Error::other));
        }
    }
}
