//! Gathering what is already queued into one batch, without waiting to fill it: a lone item
//! leaves at once, and under load items queue while earlier batches are out and leave together.
//! Used for the client's `SendBatch`es, the nodes' per-shard proposals and per-peer
//! AppendEntries.

use tokio::sync::mpsc;

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
