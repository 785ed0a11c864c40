//! Gathering what is already queued into one batch, without waiting to fill it: a lone item
//! leaves at once, and under load items queue while earlier batches are out and leave together.
//! Used for the client's `SendBatch`es, the nodes' per-shard proposals and per-peer
//! AppendEntries, all through [`dispatch_batches`].

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Empties `queue` in batches, at most `in_flight` of them out at once: waits for an item, then
/// for a free slot (meanwhile more items queue up), takes what is ready (see [`take_ready`]), and
/// hands the batch and its slot to `dispatch`, which sends it in a task of its own and holds the
/// slot until the batch is answered. Ends when the queue is closed or `dispatch` returns false.
pub async fn dispatch_batches<T>(
    mut queue: mpsc::Receiver<T>,
    in_flight: usize,
    max_items: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
    mut dispatch: impl FnMut(Vec<T>, OwnedSemaphorePermit) -> bool,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
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

    #[tokio::test]
    async fn batches_wait_for_a_free_slot_and_gather_meanwhile() {
        let (tx, rx) = mpsc::channel(16);
        let (batches_tx, mut batches) = mpsc::unbounded_channel();
        let run = tokio::spawn(dispatch_batches(
            rx,
            1,
            10,
            100,
            |&n: &usize| n,
            move |batch, slot| batches_tx.send((batch, slot)).is_ok(),
        ));
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
