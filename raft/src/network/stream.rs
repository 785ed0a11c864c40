//! The replication stream to one peer: a long-lived `Replicate` call carrying the AppendEntries
//! of every shard, instead of one unary RPC each.
//!
//! A unary gRPC call costs both sides a new HTTP/2 stream, headers to encode and parse, and
//! three writes (headers, data, end of stream) before its reply's three; per Raft entry a
//! leader makes two per follower (the entries, then the commit update). On the stream a request
//! is one data frame, and whatever queued meanwhile (other shards, heartbeats) shares it.
//!
//! The stream opens on the first request and again on the first request after it breaks. Its
//! requests are tagged with ids; a reader task hands each reply to its waiter. When the stream
//! breaks, every waiter still waiting gets `unavailable` (or why the stream could not open), and
//! openraft retries as after any failed RPC (Raft messages may be lost, repeated or late: all
//! are safe). A request whose caller gave up (timed out) while it was queued is not sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_proto::batching::take_ready;
use chorus_proto::peer as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

use super::PeerClient;

/// Requests waiting for the stream, in number and in KiB; beyond either, senders wait
/// (backpressure).
const QUEUE: usize = 4096;
const QUEUE_KIB: usize = 64 << 10;
/// Most requests in one frame, and most bytes (a first request always goes, whatever its size).
/// Kept small: a frame is decoded only once whole, so a heartbeat behind it waits for it all.
const FRAME_REQUESTS: usize = 1024;
const FRAME_BYTES: usize = 512 << 10;
/// Frames handed to the HTTP/2 stream and not yet written.
const FRAMES_BUFFERED: usize = 16;
/// Waiters kept after their caller gave up (timed out) before they are swept.
const SWEEP_ABOVE: usize = 4096;

type Reply = Result<pb::AppendEntriesReply, tonic::Status>;
type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

struct Queued {
    request: pb::AppendEntriesRequest,
    size: usize,
    reply: oneshot::Sender<Reply>,
    /// Its share of the queue's bytes, given back once it is in a frame.
    _room: OwnedSemaphorePermit,
}

/// The sending side of one peer's replication stream. Cheap to clone; the stream's task ends
/// when the last clone is dropped or [`ReplicationStream::stop`] is called.
#[derive(Clone)]
pub struct ReplicationStream {
    queue: mpsc::Sender<Queued>,
    room: Arc<Semaphore>,
    task: AbortHandle,
}

impl ReplicationStream {
    /// Starts the stream's task (in the current tokio runtime). Opening the stream waits at most
    /// `open_timeout`.
    pub fn start(client: PeerClient, open_timeout: Duration) -> ReplicationStream {
        let (queue, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(client, rx, open_timeout)).abort_handle();
        ReplicationStream { queue, room: Arc::new(Semaphore::new(QUEUE_KIB)), task }
    }

    /// Sends `request`, whose encoding takes `encoded_len` bytes, and waits for its reply. The
    /// caller bounds the wait.
    pub async fn call(&self, request: pb::AppendEntriesRequest, encoded_len: usize) -> Reply {
        let (reply, answer) = oneshot::channel();
        // Tagged, in a repeated field: a few bytes more.
        let size = encoded_len + 16;
        let kib = size.div_ceil(1024).min(QUEUE_KIB) as u32;
        let stopped = || tonic::Status::unavailable("the replication stream has stopped");
        let room = self.room.clone().acquire_many_owned(kib).await.map_err(|_| stopped())?;
        self.queue.send(Queued { request, size, reply, _room: room }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| tonic::Status::unavailable("the replication stream to the peer broke"))?
    }

    /// Stops the stream's task (node shutdown); requests still waiting fail.
    pub fn stop(&self) {
        self.task.abort();
        self.room.close();
    }
}

/// Takes what is queued after `first` into one frame, registering each waiter under its id and
/// leaving out the requests whose callers gave up.
fn frame(
    first: Queued,
    queue: &mut mpsc::Receiver<Queued>,
    waiters: &Waiters,
    next_id: &mut u64,
) -> pb::ReplicateFrame {
    let (batch, carried) = take_ready(first, queue, FRAME_REQUESTS, FRAME_BYTES, |q| q.size);
    let mut waiting = waiters.lock().unwrap_or_else(|p| p.into_inner());
    if waiting.len() > SWEEP_ABOVE {
        waiting.retain(|_, w| !w.is_closed());
    }
    let mut requests = Vec::with_capacity(batch.len() + 1);
    for q in batch.into_iter().chain(carried) {
        // An item over the byte limit comes back as `carried`: it goes in this frame too, as the
        // first of a frame would (the limit keeps frames moderate, it is not a hard cap).
        if q.reply.is_closed() {
            continue;
        }
        *next_id += 1;
        waiting.insert(*next_id, q.reply);
        requests.push(pb::TaggedAppendEntries { id: *next_id, request: Some(q.request) });
    }
    pb::ReplicateFrame { requests }
}

/// Answers every waiter left with `status`.
fn fail_all(waiters: &Waiters, status: tonic::Status) {
    let left: Vec<_> = waiters.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    for (_, waiter) in left {
        let _ = waiter.send(Err(status.clone()));
    }
}

async fn run(client: PeerClient, mut queue: mpsc::Receiver<Queued>, open_timeout: Duration) {
    let mut next_id = 0u64;
    // Each turn of the loop is one stream: opened on a request, used until it breaks.
    while let Some(first) = queue.recv().await {
        let waiters: Waiters = Arc::default();
        let (frames, outgoing) = mpsc::channel(FRAMES_BUFFERED);
        let opening = frame(first, &mut queue, &waiters, &mut next_id);
        // The channel is empty: this cannot fail for lack of room.
        let _ = frames.try_send(opening);
        let mut client = client.clone();
        let replies = match tokio::time::timeout(open_timeout, client.replicate(ReceiverStream::new(outgoing))).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                // Keeps the code: `unimplemented` (a peer of an earlier version) makes the caller
                // fall back to unary calls.
                let why = format!("cannot open the replication stream: {}", status.message());
                fail_all(&waiters, tonic::Status::new(status.code(), why));
                continue;
            }
            Err(_) => {
                fail_all(&waiters, tonic::Status::unavailable("opening the replication stream timed out"));
                continue;
            }
        };
        let mut reader = Reader(tokio::spawn(read_replies(replies, waiters.clone())));
        loop {
            tokio::select! {
                _ = &mut reader.0 => break,
                next = queue.recv() => {
                    let Some(first) = next else { return };
                    let frame = frame(first, &mut queue, &waiters, &mut next_id);
                    tokio::select! {
                        sent = frames.send(frame) => if sent.is_err() { break },
                        _ = &mut reader.0 => break,
                    }
                }
            }
        }
        drop(reader);
        fail_all(&waiters, tonic::Status::unavailable("the replication stream to the peer broke"));
    }
}

/// The reply reader of one stream, stopped with it.
struct Reader(JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands each reply to its waiter until the stream ends or fails.
async fn read_replies(mut replies: tonic::Streaming<pb::ReplicateReplyFrame>, waiters: Waiters) {
    loop {
        let frame = match replies.message().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(error = %status, "replication stream failed");
                return;
            }
        };
        let mut waiting = waiters.lock().unwrap_or_else(|p| p.into_inner());
        for tagged in frame.replies {
            // A waiter may be gone (its caller timed out): the reply is dropped.
            if let Some(waiter) = waiting.remove(&tagged.id) {
                let reply = tagged.reply.ok_or_else(|| tonic::Status::internal("a replication reply without a result"));
                let _ = waiter.send(reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(shard: u32, size: usize) -> (Queued, oneshot::Receiver<Reply>) {
        let (reply, answer) = oneshot::channel();
        let room = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let request = pb::AppendEntriesRequest { shard, ..Default::default() };
        (Queued { request, size, reply, _room: room }, answer)
    }

    fn shards(frame: &pb::ReplicateFrame) -> Vec<u32> {
        frame.requests.iter().map(|t| t.request.as_ref().map_or(u32::MAX, |r| r.shard)).collect()
    }

    #[test]
    fn a_frame_takes_what_is_queued_and_registers_a_waiter_per_id() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut answers = Vec::new();
        for shard in [2, 3] {
            let (q, a) = queued(shard, 10);
            tx.try_send(q).unwrap();
            answers.push(a);
        }
        let waiters = Waiters::default();
        let mut next_id = 0;
        let (first, _a) = queued(1, 10);
        let f = frame(first, &mut rx, &waiters, &mut next_id);
        assert_eq!(shards(&f), vec![1, 2, 3]);
        let ids: Vec<u64> = f.requests.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        let mut registered: Vec<u64> = waiters.lock().unwrap().keys().copied().collect();
        registered.sort();
        assert_eq!(registered, ids);
        // Ids go on increasing across frames.
        let (next, _b) = queued(4, 10);
        let f = frame(next, &mut rx, &waiters, &mut next_id);
        assert_eq!(f.requests[0].id, 4);
    }

    #[test]
    fn a_frame_stops_after_the_request_that_crosses_the_byte_limit() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut answers = Vec::new();
        for shard in [2, 3] {
            let (q, a) = queued(shard, FRAME_BYTES / 2 + 1);
            tx.try_send(q).unwrap();
            answers.push(a);
        }
        let waiters = Waiters::default();
        let (first, _a) = queued(1, FRAME_BYTES / 2 + 1);
        let f = frame(first, &mut rx, &waiters, &mut 0);
        assert_eq!(shards(&f), vec![1, 2]);
        assert_eq!(rx.try_recv().map(|q| q.request.shard).ok(), Some(3), "the rest waits for the next frame");
    }

    #[test]
    fn a_request_whose_caller_gave_up_while_queued_is_not_sent() {
        let (tx, mut rx) = mpsc::channel(8);
        let (gone, answer) = queued(2, 10);
        drop(answer);
        tx.try_send(gone).unwrap();
        let waiters = Waiters::default();
        let (first, _a) = queued(1, 10);
        let f = frame(first, &mut rx, &waiters, &mut 0);
        assert_eq!(shards(&f), vec![1]);
        assert_eq!(waiters.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn waiters_whose_callers_gave_up_are_swept_and_the_rest_fail_when_the_stream_breaks() {
        let (_tx, mut rx) = mpsc::channel(1);
        let waiters = Waiters::default();
        let mut next_id = 0;
        let mut answers = Vec::new();
        for _ in 0..=SWEEP_ABOVE {
            let (q, answer) = queued(1, 10);
            frame(q, &mut rx, &waiters, &mut next_id);
            answers.push(answer);
        }
        // Their callers time out after the requests were sent.
        drop(answers);
        let (q, answer) = queued(2, 10);
        frame(q, &mut rx, &waiters, &mut next_id);
        assert_eq!(waiters.lock().unwrap().len(), 1, "only the live waiter is left");
        fail_all(&waiters, tonic::Status::unavailable("gone"));
        let status = answer.await.unwrap().unwrap_err();
        assert_eq!((status.code(), status.message()), (tonic::Code::Unavailable, "gone"));
        assert!(waiters.lock().unwrap().is_empty());
    }
}
