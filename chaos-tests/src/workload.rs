//! The workload: concurrent writers appending unique messages to hot and cold rooms,
//! linearizable readers, subscribers tailing rooms through failures, and a moderator kicking
//! writers out of hot rooms while they write (they join again). Every client signs in as a
//! user of its own (writer `p` is `writer<p>`). Every operation is recorded to the history
//! with its invocation and completion times and its outcome; kicks and joins are entries of
//! the rooms' sequences, read back with the messages.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_client::{Client, ClientError, HistoryFrom, SubscriptionEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::history::{CATCHER, HistoryWriter, ReadOutcome, Record, SendOutcome, entry_text, writer_name};

/// Nanoseconds since the run started, on one monotonic clock.
#[derive(Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { start: Instant::now() }
    }

    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// The rooms: a few hot ones take most of the traffic.
#[derive(Clone)]
pub struct Rooms {
    pub hot: Vec<String>,
    pub cold: Vec<String>,
}

impl Rooms {
    pub fn new(hot: usize, cold: usize) -> Rooms {
        Rooms {
            hot: (0..hot).map(|i| format!("hot-{i}")).collect(),
            cold: (0..cold).map(|i| format!("cold-{i}")).collect(),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &String> {
        self.hot.iter().chain(self.cold.iter())
    }

    pub fn pick(&self, rng: &mut StdRng) -> &str {
        if self.cold.is_empty() || (!self.hot.is_empty() && rng.random_bool(0.8)) {
            &self.hot[rng.random_range(0..self.hot.len())]
        } else {
            &self.cold[rng.random_range(0..self.cold.len())]
        }
    }
}

pub struct Context {
    pub history: Arc<HistoryWriter>,
    pub clock: Clock,
    pub stop: CancellationToken,
    pub rooms: Rooms,
}

fn error_parts(e: &ClientError) -> (String, String) {
    (e.code().unwrap_or("client").to_owned(), e.to_string())
}

/// Joins `room` (again), retrying through failures until it is done or the run stops.
async fn join(client: &Client, room: &str, ctx: &Context) {
    while !ctx.stop.is_cancelled() {
        match client.join(room).await {
            Ok(_) => return,
            // Failing over, or the leader is moving: try again.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Sends unique messages until stopped; each send completes (or gives up) on its own deadline.
/// Refused as `not_member` (kicked), it joins the room again.
pub async fn writer(process: u64, client: Client, seed: u64, ctx: Arc<Context>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let client_id: String = client.client_id().iter().map(|b| format!("{b:02x}")).collect();
    for room in ctx.rooms.all() {
        join(&client, room, &ctx).await;
    }
    while !ctx.stop.is_cancelled() {
        let room = ctx.rooms.pick(&mut rng).to_owned();
        let client_seq = client.next_client_seq();
        let mut body = format!("w{process}-{client_seq}");
        if rng.random_bool(0.2) {
            body.push_str(&format!(" @{CATCHER}"));
        }
        let invoke_ns = ctx.clock.now();
        let result = client.send_with_seq(&room, body.clone(), client_seq).await;
        let complete_ns = ctx.clock.now();
        let outcome = match result {
            Ok(r) => SendOutcome::Ok { seq: r.seq, duplicate: r.duplicate },
            Err(e) if e.indeterminate() => {
                let (code, message) = error_parts(&e);
                SendOutcome::Info { code, message }
            }
            Err(e) => {
                let (code, message) = error_parts(&e);
                SendOutcome::Fail { code, message }
            }
        };
        let kicked = matches!(&outcome, SendOutcome::Fail { code, .. } if code == "not_member");
        ctx.history.record(&Record::Send {
            process,
            room: room.clone(),
            client_id: client_id.clone(),
            client_seq,
            body,
            invoke_ns,
            complete_ns,
            outcome,
        });
        if kicked {
            join(&client, &room, &ctx).await;
        }
    }
}

/// Kicks a random writer out of a random hot room every few hundred milliseconds, until
/// stopped: the room's owner moderating while messages flow. The kicks are events of the
/// rooms' sequences; the checker finds them there.
pub async fn moderator(client: Client, writers: u64, seed: u64, ctx: Arc<Context>) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut kicks = 0;
    while !ctx.stop.is_cancelled() && writers > 0 && !ctx.rooms.hot.is_empty() {
        let pause = Duration::from_millis(rng.random_range(200..800));
        tokio::select! {
            _ = ctx.stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        let room = &ctx.rooms.hot[rng.random_range(0..ctx.rooms.hot.len())];
        let target = writer_name(rng.random_range(1..=writers));
        // A kick of a writer who is out already (not_member), or lost in a failover, is fine:
        // the checker reads what happened from the rooms.
        if client.kick(room, &target, "chaos").await.is_ok() {
            kicks += 1;
        }
    }
    kicks
}

/// Reads the newest messages of random rooms, linearizably, until stopped.
pub async fn reader(process: u64, client: Client, seed: u64, ctx: Arc<Context>) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !ctx.stop.is_cancelled() {
        let pause = Duration::from_millis(rng.random_range(50..250));
        tokio::select! {
            _ = ctx.stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        let room = ctx.rooms.pick(&mut rng).to_owned();
        let invoke_ns = ctx.clock.now();
        let result = client.history(&room, HistoryFrom::Before(u64::MAX), 50, true).await;
        let complete_ns = ctx.clock.now();
        let outcome = match result {
            Ok(page) => ReadOutcome::Ok {
                last_seq: page.last_seq,
                messages: page.messages.iter().map(|m| (m.seq, entry_text(m))).collect(),
            },
            Err(e) => {
                let (code, message) = error_parts(&e);
                ReadOutcome::Fail { code, message }
            }
        };
        ctx.history.record(&Record::Read { process, room, invoke_ns, complete_ns, outcome });
    }
}

/// A user in every room who catches up with Sync and marks rooms read, until stopped: each
/// room update a Sync returns and each marker a MarkRead reports is recorded, for the
/// checker's `read_marker_backward` and `sync_count_mismatch`.
pub async fn catcher(process: u64, client: Client, seed: u64, ctx: Arc<Context>) {
    let mut rng = StdRng::seed_from_u64(seed);
    for room in ctx.rooms.all() {
        join(&client, room, &ctx).await;
    }
    let mut token: Vec<u8> = Vec::new();
    let mut last_seqs: BTreeMap<String, u64> = BTreeMap::new();
    while !ctx.stop.is_cancelled() {
        let pause = Duration::from_millis(rng.random_range(100..400));
        tokio::select! {
            _ = ctx.stop.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
        let invoke_ns = ctx.clock.now();
        if last_seqs.is_empty() || rng.random_bool(0.5) {
            // Failures (failovers) are retried by the next round from the same token.
            let Ok(caught) = client.sync(&token, 0).await else { continue };
            let complete_ns = ctx.clock.now();
            for update in caught.rooms {
                let Some(room) = update.room else { continue };
                last_seqs.insert(room.name.clone(), room.last_seq);
                ctx.history.record(&Record::CatchUp {
                    process,
                    room: room.name,
                    op: "sync".into(),
                    invoke_ns,
                    complete_ns,
                    read_seq: update.read_seq,
                    last_seq: room.last_seq,
                    unread: update.unread,
                    mentions: update.mentions,
                });
            }
            token = caught.next.to_vec();
        } else {
            let rooms: Vec<(&String, &u64)> = last_seqs.iter().collect();
            let (room, last_seq) = rooms[rng.random_range(0..rooms.len())];
            let room = room.clone();
            // Anywhere up to what the last Sync saw: often behind the marker already.
            let seq = rng.random_range(1..=(*last_seq).max(1));
            let Ok(marked) = client.mark_read(&room, seq, false, false).await else { continue };
            ctx.history.record(&Record::CatchUp {
                process,
                room,
                op: "mark".into(),
                invoke_ns,
                complete_ns: ctx.clock.now(),
                read_seq: marked.read_seq,
                last_seq: 0,
                unread: marked.unread,
                mentions: marked.mentions,
            });
        }
    }
}

/// Tails `rooms` (each from its cursor) until stopped, through every failure, then records
/// what it received per room.
pub async fn subscriber(process: u64, client: Client, rooms: Vec<(String, u64)>, ctx: Arc<Context>) {
    let started_ns = ctx.clock.now();
    let mut received: BTreeMap<String, Vec<(u64, String)>> =
        rooms.iter().map(|(r, _)| (r.clone(), Vec::new())).collect();
    let mut received_ns: BTreeMap<String, Vec<u64>> = rooms.iter().map(|(r, _)| (r.clone(), Vec::new())).collect();
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    let mut resumes = 0u64;
    let mut nodes: Vec<(u64, String)> = Vec::new();
    let mut subscription = client.subscribe(rooms.clone());
    loop {
        let event = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            event = subscription.next() => event,
        };
        if nodes.is_empty()
            && let Some(node) = client.current_node().await
        {
            nodes.push((started_ns, node));
        }
        match event {
            Ok(SubscriptionEvent::Message(m)) => {
                if let Some(list) = received.get_mut(&m.room) {
                    list.push((m.seq, entry_text(&m)));
                }
                if let Some(times) = received_ns.get_mut(&m.room) {
                    times.push(ctx.clock.now());
                }
            }
            Ok(SubscriptionEvent::Resumed { node }) => {
                resumes += 1;
                nodes.push((ctx.clock.now(), node));
            }
            Ok(SubscriptionEvent::Presence(_) | SubscriptionEvent::Typing { .. }) => {}
            Ok(SubscriptionEvent::Gap(g)) => {
                errors.insert(g.room.clone(), format!("unexpected gap {}..={}: {}", g.from_seq, g.to_seq, g.reason));
            }
            Ok(SubscriptionEvent::RoomError { room, error }) => {
                errors.insert(room, error.to_string());
            }
            Err(e) => {
                for (room, _) in &rooms {
                    errors.entry(room.clone()).or_insert_with(|| e.to_string());
                }
                break;
            }
        }
    }
    let ended_ns = ctx.clock.now();
    for (room, after) in rooms {
        ctx.history.record(&Record::Subscription {
            process,
            received: received.remove(&room).unwrap_or_default(),
            received_ns: received_ns.remove(&room).unwrap_or_default(),
            error: errors.remove(&room),
            room,
            after,
            started_ns,
            ended_ns,
            resumes,
            nodes: nodes.clone(),
        });
    }
}
