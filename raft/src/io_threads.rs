//! Threads that do the node's RocksDB work which can block, so that no tokio worker (which also
//! drives QUIC, replication and election timers) waits on a RocksDB write stall, a cold read or
//! a scan:
//!
//! - the **log thread** writes every log append, vote, truncation and purge of every shard;
//! - the **apply threads** (one per core, at most [`MAX_APPLY_THREADS`]) apply committed
//!   entries, a shard always on the same thread.
//!
//! An [`IoThread`] runs its jobs one at a time in the order they were queued, so the work of one
//! shard keeps its order even if a caller stopped waiting; the caller awaits the job's result.
//! A fixed set of long-lived threads rather than tokio's blocking pool: the thread count (and
//! with it the allocator's per-thread arenas) stays bounded and known, as in TiKV's apply pool.
//!
//! Bound: every queued job is awaited by one shard's log I/O or apply task, each of which runs
//! one job at a time, so a queue holds at most a few jobs per shard.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::work_queue::{QueueThread, WorkQueue};

/// Apply threads at most, whatever the core count: applies are short, and past a few threads
/// they contend on RocksDB's write path instead of running in parallel.
pub const MAX_APPLY_THREADS: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job queued on an [`IoThread`] returned no result.
#[derive(Debug, thiserror::Error)]
pub enum IoThreadError {
    #[error("the {0} thread has stopped")]
    Stopped(String),
    #[error("a job on the {0} thread panicked")]
    Panicked(String),
}

impl From<IoThreadError> for crate::error::StoreError {
    fn from(e: IoThreadError) -> Self {
        crate::error::StoreError::io("running RocksDB work off the async workers", io::Error::other(e))
    }
}

/// One named thread running queued jobs in order. Dropping it runs what is queued and joins it.
pub struct IoThread {
    name: String,
    queue: Arc<WorkQueue<Job>>,
    thread: QueueThread,
}

impl IoThread {
    pub fn start(name: impl Into<String>) -> io::Result<IoThread> {
        let name = name.into();
        let queue = Arc::new(WorkQueue::<Job>::new());
        let drained = queue.clone();
        let thread = QueueThread::spawn(name.clone(), move || run(&drained))?;
        Ok(IoThread { name, queue, thread })
    }

    /// Runs `job` on this thread after the jobs queued before it, and returns its result.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, IoThreadError> {
        let (done, result) = oneshot::channel();
        // The caller may have stopped waiting (its task was cancelled): nothing to tell.
        let job: Job = Box::new(move || drop(done.send(job())));
        if self.queue.push(job).is_err() {
            return Err(IoThreadError::Stopped(self.name.clone()));
        }
        // A job that panicked dropped its sender while unwinding.
        result.await.map_err(|_| IoThreadError::Panicked(self.name.clone()))
    }

    /// Runs what is queued and stops the thread; jobs queued later are refused (see
    /// [`QueueThread::join`] for a stop from the thread itself).
    pub fn shutdown(&self) {
        self.queue.close();
        self.thread.join();
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(queue: &WorkQueue<Job>) {
    while let Some(jobs) = queue.take_all() {
        for job in jobs {
            // A panicking job fails its own caller (see `run`), not the jobs queued after it.
            if catch_unwind(AssertUnwindSafe(job)).is_err() {
                tracing::error!("a RocksDB job panicked");
            }
        }
    }
}

/// How many apply threads a node runs: one per core, at most [`MAX_APPLY_THREADS`].
pub fn apply_thread_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_APPLY_THREADS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn jobs_run_in_order_and_are_refused_after_shutdown() {
        let thread = IoThread::start("test-io").unwrap();
        let last = Arc::new(AtomicU64::new(0));
        let mut waits = Vec::new();
        for i in 1..=100u64 {
            let last = last.clone();
            waits.push(thread.run(move || last.swap(i, Ordering::SeqCst)));
        }
        for (i, wait) in waits.into_iter().enumerate() {
            assert_eq!(wait.await.unwrap(), i as u64, "job {} saw another job's result before it", i + 1);
        }
        thread.shutdown();
        assert!(matches!(thread.run(|| 1).await, Err(IoThreadError::Stopped(_))));
    }

    #[tokio::test]
    async fn a_panicking_job_fails_only_its_caller() {
        let thread = IoThread::start("test-io").unwrap();
        let panicked = thread.run(|| -> u32 { panic!("injected") }).await;
        assert!(matches!(panicked, Err(IoThreadError::Panicked(_))));
        assert_eq!(thread.run(|| 7).await.unwrap(), 7);
    }

    #[test]
    fn a_job_that_drops_the_last_handle_of_its_own_thread_does_not_deadlock() {
        let thread = Arc::new(IoThread::start("test-io").unwrap());
        let (go, wait_for_go) = std::sync::mpsc::channel::<()>();
        let (finished, job_finished) = std::sync::mpsc::channel::<()>();
        let held = thread.clone();
        let job = move || {
            let _ = wait_for_go.recv();
            drop(held);
            let _ = finished.send(());
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut queued = std::pin::pin!(thread.run(job));
            assert!(futures::poll!(queued.as_mut()).is_pending());
        }); // Nobody waits for the job any more (as when openraft drops an apply).
        drop(thread);
        go.send(()).unwrap();
        job_finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the job finished after dropping the last handle of its own thread");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_all_get_their_results() {
        let thread = Arc::new(IoThread::start("test-io").unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let thread = thread.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    assert_eq!(thread.run(move || t * 1_000 + i).await.unwrap(), t * 1_000 + i);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }
}
