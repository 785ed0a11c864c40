//! RocksDB calls that can block — a write that meets a write stall, a read of cold blocks, a
//! scan of many keys — must not hold a tokio worker that also drives QUIC, replication and the
//! node's election timers: under a read burst or a stall, heartbeats would wait behind them
//! and followers call needless elections.
//!
//! [`off_runtime`] runs such a call with `block_in_place`: the worker hands its other tasks to
//! a fresh worker first, and no thread hop or copy is needed (the call may borrow). Outside a
//! multi-threaded runtime (unit tests, tools) it runs the call inline.
//!
//! Used for the replica reads behind History, Members, ListRooms and feed catch-up (pages of
//! up to 1,000 messages). The node's other RocksDB work has threads of its own (see
//! [`crate::io_threads`]): log appends, votes, truncations and purges on the log thread, applies
//! on the apply threads, fsyncs on the WAL syncer ([`crate::wal_sync`]), snapshot builds and
//! installs on tokio's blocking pool. Handing a worker off with `block_in_place` on every append
//! and apply cost a fifth of the write throughput (docs/BENCHMARKS.md).

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f`, which may block on RocksDB, without stalling the runtime's other tasks.
pub fn off_runtime<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_inline_without_a_runtime() {
        assert_eq!(off_runtime(|| 7), 7);
    }

    #[tokio::test]
    async fn runs_inline_on_a_current_thread_runtime() {
        assert_eq!(off_runtime(|| 8), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn other_tasks_run_while_a_call_blocks() {
        // One worker: a timer task gets to run while the blocking call holds the thread.
        let (tx, rx) = std::sync::mpsc::channel();
        let ticker = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            tx.send(()).unwrap();
        });
        let waited = off_runtime(|| rx.recv_timeout(std::time::Duration::from_secs(10)));
        assert!(waited.is_ok(), "the runtime's other task ran while the call blocked");
        ticker.await.unwrap();
    }
}
