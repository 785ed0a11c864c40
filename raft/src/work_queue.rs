//! A queue that one thread drains a whole batch at a time, and that thread: what the WAL syncer
//! ([`crate::wal_sync`]) and the I/O threads ([`crate::io_threads`]) are made of.
//!
//! Producers push from any thread (async tasks included: a push only takes a lock for as long
//! as a `Vec::push`); the thread takes everything queued at once, so work that arrives while
//! it is busy is handled together next time (one fsync for many appends). Closing refuses
//! later pushes; the thread drains what is queued, then ends.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

struct State<T> {
    items: Vec<T>,
    closed: bool,
}

pub(crate) struct WorkQueue<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
}

impl<T> WorkQueue<T> {
    pub(crate) fn new() -> WorkQueue<T> {
        WorkQueue { state: Mutex::new(State { items: Vec::new(), closed: false }), wake: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Push and take are single operations: a poisoned lock still holds a whole queue.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `item`; gives it back if the queue is closed.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let mut state = self.lock();
        if state.closed {
            return Err(item);
        }
        state.items.push(item);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Waits for work and takes all of it; `None` once the queue is closed and empty.
    pub(crate) fn take_all(&self) -> Option<Vec<T>> {
        let mut state = self.lock();
        while state.items.is_empty() {
            if state.closed {
                return None;
            }
            state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        Some(std::mem::take(&mut state.items))
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

/// The thread that drains a [`WorkQueue`].
pub(crate) struct QueueThread {
    name: String,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl QueueThread {
    pub(crate) fn spawn(name: impl Into<String>, run: impl FnOnce() + Send + 'static) -> io::Result<QueueThread> {
        let name = name.into();
        let handle = std::thread::Builder::new().name(name.clone()).spawn(run)?;
        Ok(QueueThread { name, handle: Mutex::new(Some(handle)) })
    }

    /// Waits for the thread to end (close its queue first). Called on the thread itself (one
    /// of its jobs held the last reference to what owns it), it cannot wait for itself: the
    /// thread ends on its own once its queue is empty.
    pub(crate) fn join(&self) {
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else { return };
        if handle.thread().id() == std::thread::current().id() {
            return;
        }
        if handle.join().is_err() {
            tracing::error!(thread = %self.name, "a queue thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_thread_takes_what_was_queued_and_a_closed_queue_refuses_more() {
        let queue = Arc::new(WorkQueue::new());
        for i in 0..5 {
            queue.push(i).unwrap();
        }
        assert_eq!(queue.take_all(), Some(vec![0, 1, 2, 3, 4]));
        queue.push(5).unwrap();
        queue.close();
        assert_eq!(queue.push(6), Err(6));
        assert_eq!(queue.take_all(), Some(vec![5]), "what was queued before the close is drained");
        assert_eq!(queue.take_all(), None);
    }
}
