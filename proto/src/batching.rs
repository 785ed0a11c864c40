//! Gathering what is already queued into one batch, without waiting to fill it: a lone item
//! leaves at once, and under load items queue while earlier batches are out and leave together.
//! Used for the client's `SendBatch`es, the nodes' per-shard proposals and per-peer
//! AppendEntries, all through [`dispatch_batches`].

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// The submitting side of a batched queue: items go through [`dispatch_batches`], except a
/// lone one, which its submitter may send at once in its own task ([`BatchQueue::alone`]) and
/// save the two task hops of the queue. Cheap to clone.
pub struct BatchQueue<T> {
    queue: mpsc::Sender<T>,
    slots: Arc<Semaphore>,
}

impl<T> Clone for BatchQueue<T> {
    fn clone(&self) -> Self {
        BatchQueue { queue: self.queue.clone(), slots: self.slots.clone() }
    }
}

impl<T> BatchQueue<T> {
    /// A queue holding up to `capacity` items, with `in_flight` slots for batches; the receiver
    /// and slots go to [`dispatch_batches`].
    pub fn new(capacity: usize, in_flight: usize) -> (BatchQueue<T>, mpsc::Receiver<T>, Arc<Semaphore>) {
        let (queue, rx) = mpsc::channel(capacity);
        let slots = Arc::new(Semaphore::new(in_flight));
        (BatchQueue { queue, slots: slots.clone() }, rx, slots)
    }

    /// A slot for sending one item at once, outside the queue: given only when nothing is
    /// queued and a slot is free (so nothing submitted earlier is overtaken: a batch waiting
    /// for a slot gets the next free one first). Hold it until the item is answered.
    pub fn alone(&self) -> Option<OwnedSemaphorePermit> {
        if self.queue.capacity() < self.queue.max_capacity() {
            return None;
        }
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Queues `item`, waiting while the queue is full; fails if the dispatcher is gone.
    pub async fn send(&self, item: T) -> Result<(), mpsc::error::SendError<T>> {
        self.queue.send(item).await
    }
}

/// Empties `queue` in batches, at most one per slot of `slots` out at once: waits for an item,
/// then for a free slot (meanwhile more items queue up), takes what is ready (see
/// [`take_ready`]), and hands the batch and its slot to `dispatch`, which sends it in a task of
/// its own and holds the slot until the batch is answered. Ends when the queue is closed or
/// `dispatch` returns false.
pub async fn dispatch_batches<T>(
    mut queue: mpsc::Receiver<T>,
    slots: Arc<Semaphore>,
    max_items: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
    mut dispatch: impl FnMut(Vec<T>, OwnedSemaphorePermit) -> bool,
) {
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None => match queue.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (batch, next) = take_ready(first, &mut queue, max_items, max_bytes, &size);
        carried = next;
        if !dispatch(batch, slot) {
            return;
        }
    }
}

/// Starts a batch with `first`, then takes the items already waiting in `queue` while the batch
/// stays within `max_items` items and `max_bytes` bytes (each item weighs `size(item)`; `first`
/// always goes, whatever it weighs). An item taken that would overflow the bytes is returned as
/// well: it starts the next batch.
pub fn take_ready<T>(
    first: T,
    queue: &mut mpsc::Receiver<T>,
    max_items: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> (Vec<T>, Option<T>) {
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < max_items {
        let Ok(item) = queue.try_recv() else { break };
        let weight = size(&item);
        if bytes.saturating_add(weight) > max_bytes {
            return (batch, Some(item));
        }
        bytes += weight;
        batch.push(item);
    }
    (batch, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(items: &[usize]) -> mpsc::Receiver<usize> {
        let (tx, rx) = mpsc::channel(items.len().max(1));
        for &i in items {
            tx.try_send(i).unwrap();
        }
        rx
    }

    #[test]
    fn takes_only_what_is_waiting() {
        let mut rx = queue(&[2, 3]);
        assert_eq!(take_ready(1, &mut rx, 10, 100, |&n| n), (vec![1, 2, 3], None));
        assert_eq!(take_ready(4, &mut rx, 10, 100, |&n| n), (vec![4], None));
    }

    #[test]
    fn stops_at_the_item_limit_and_leaves_the_rest_queued() {
        let mut rx = queue(&[2, 3, 4]);
        assert_eq!(take_ready(1, &mut rx, 2, 100, |&n| n), (vec![1, 2], None));
        assert_eq!(rx.try_recv().ok(), Some(3));
    }

    type Dispatched = mpsc::UnboundedReceiver<(Vec<usize>, OwnedSemaphorePermit)>;

    /// A queue with `in_flight` slots whose dispatcher hands each batch (and its slot) to the
    /// test; items weigh their value, batches hold up to 10 items and 100 units.
    fn dispatching(in_flight: usize) -> (BatchQueue<usize>, Dispatched, tokio::task::JoinHandle<()>) {
        let (tx, rx, slots) = BatchQueue::new(16, in_flight);
        let (batches_tx, batches) = mpsc::unbounded_channel();
        let run = tokio::spawn(dispatch_batches(
            rx,
            slots,
            10,
            100,
            |&n: &usize| n,
            move |batch, slot| batches_tx.send((batch, slot)).is_ok(),
        ));
        (tx, batches, run)
    }

    #[tokio::test]
    async fn batches_wait_for_a_free_slot_and_gather_meanwhile() {
        let (tx, mut batches, run) = dispatching(1);
        tx.send(1).await.unwrap();
        let (first, slot) = batches.recv().await.unwrap();
        assert_eq!(first, vec![1]);
        // The only slot is taken: these wait, and leave together once it is free.
        for n in [2, 3, 4] {
            tx.send(n).await.unwrap();
        }
        tokio::task::yield_now().await;
        assert!(batches.try_recv().is_err());
        drop(slot);
        let (second, _slot) = batches.recv().await.unwrap();
        assert_eq!(second, vec![2, 3, 4]);
        drop(tx);
        drop(_slot);
        run.await.unwrap();
    }

    #[tokio::test]
    async fn a_lone_item_may_skip_the_queue_but_never_overtakes_one() {
        let (tx, mut batches, run) = dispatching(2);
        // Nothing queued, slots free: the submitter goes alone.
        let alone = tx.alone().expect("a free slot");
        // One slot left: a queued item takes it.
        tx.send(1).await.unwrap();
        let (first, busy) = batches.recv().await.unwrap();
        assert_eq!(first, vec![1]);
        assert!(tx.alone().is_none(), "no free slot");
        // Queued items wait for a slot; nobody skips them, even once a slot frees.
        tx.send(2).await.unwrap();
        tokio::task::yield_now().await;
        assert!(tx.alone().is_none());
        drop(alone);
        let (second, _slot) = batches.recv().await.unwrap();
        assert_eq!(second, vec![2], "the freed slot went to the waiting batch");
        drop(busy);
        assert!(tx.alone().is_some(), "queue empty and a slot free again");
        drop(tx);
        drop(_slot);
        run.await.unwrap();
    }

    #[test]
    fn an_item_over_the_byte_limit_starts_the_next_batch() {
        let mut rx = queue(&[30, 50, 5]);
        // 40 + 30 fits in 80; 50 more would not.
        assert_eq!(take_ready(40, &mut rx, 10, 80, |&n| n), (vec![40, 30], Some(50)));
        assert_eq!(rx.try_recv().ok(), Some(5));
        // A first item heavier than the limit still goes, alone.
        let mut rx = queue(&[1]);
        assert_eq!(take_ready(500, &mut rx, 10, 80, |&n| n), (vec![500], Some(1)));
    }
}
