//! `chorus bench`: drives a running cluster and measures it.
//!
//! - **load**: N connections spread over the nodes, M sends in flight on each, messages of a
//!   given size to R rooms (uniform or Zipf-skewed), for a duration or a message count, closed
//!   loop or at a fixed `--rate`. Acknowledgement latency goes into an HDR histogram; at a fixed
//!   rate it is measured from each send's *intended* start, which corrects for coordinated
//!   omission. Optional subscribers (on other nodes than the senders) measure fan-out latency:
//!   send → delivered, using the send time carried in each body.
//! - **failover**: repeatedly kills the leader of a shard (with an operator-supplied command)
//!   while a probe writes to it, and measures how long until writes succeed again (or, with a
//!   subscriber on the killed node, until it receives messages again).
//! - **flood**: one user sends at a modest fixed rate through a node, alone and then while
//!   another user floods the same node as fast as it can: how much the flood moves the first
//!   user's acknowledgement latency (the per-user rate limits should keep it within 2×).
//! - **presence**: many users signed in, each watching others' presence, changing theirs now
//!   and then: how long a change takes to reach its watchers, and what it costs the nodes
//!   (see [`presence`]).
//!
//! Every connection signs in. The signed-in user running the bench creates the rooms; each
//! sender and subscriber connection signs in as a user of its own, `bench-<run>-<n>`, made for
//! the run (registered where registration is open, else created by the running user, who must
//! then be an admin), with a random password; they join the rooms first.

pub mod presence;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{Client, ClientError, ClientOptions, Credentials, SubscriptionEvent};

/// How rooms are chosen for each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Skew {
    Uniform,
    /// Zipf with exponent 1.1: a few rooms take most of the traffic.
    Zipf,
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub connections: usize,
    pub inflight: usize,
    pub size: usize,
    pub rooms: usize,
    pub skew: Skew,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    /// Total sends per second; closed loop when absent.
    pub rate: Option<f64>,
    pub subscribers: usize,
    pub room_prefix: String,
    pub progress: bool,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub connections: usize,
    pub inflight: usize,
    pub size: usize,
    pub rooms: usize,
    pub elapsed_s: f64,
    pub sent: u64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    pub ack: Percentiles,
    pub fanout: Option<Percentiles>,
    pub errors: BTreeMap<String, u64>,
}

impl LoadReport {
    pub fn human(&self) -> String {
        let p = |p: &Percentiles| {
            format!(
                "p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
                p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us
            )
        };
        let mut s = format!(
            "{} connections × {} in flight, {}-byte messages, {} rooms\n\
             sent {} messages in {:.1} s: {:.0} msgs/s, {:.2} MB/s\n\
             ack latency: {}\n",
            self.connections,
            self.inflight,
            self.size,
            self.rooms,
            self.sent,
            self.elapsed_s,
            self.msgs_per_s,
            self.mb_per_s,
            p(&self.ack)
        );
        if let Some(f) = &self.fanout {
            s.push_str(&format!("fan-out latency ({} deliveries): {}\n", f.count, p(f)));
        }
        if self.errors.is_empty() {
            s.push_str("errors: none\n");
        } else {
            let errors: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            s.push_str(&format!("errors: {}\n", errors.join(", ")));
        }
        s
    }
}

fn now_unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A body of `size` bytes starting with the send time (for fan-out latency).
fn body(size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(8));
    b.put_u64(now_unix_ns());
    b.resize(size.max(8), b'.');
    b.freeze()
}

/// Zipf(1.1) over `n` items, by inverse CDF.
struct RoomPicker {
    cdf: Vec<f64>,
}

impl RoomPicker {
    fn new(n: usize, skew: Skew) -> RoomPicker {
        let weights: Vec<f64> = (1..=n)
            .map(|k| match skew {
                Skew::Uniform => 1.0,
                Skew::Zipf => 1.0 / (k as f64).powf(1.1),
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        RoomPicker { cdf: cdf.collect() }
    }

    fn pick(&self, rng: &mut StdRng) -> usize {
        let x: f64 = rng.random();
        self.cdf.partition_point(|&c| c < x).min(self.cdf.len() - 1)
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits: bounds are fixed, so recording cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

async fn connect(options: &ClientOptions, first: usize) -> Result<Client, ClientError> {
    let mut o = options.clone();
    let len = o.nodes.len();
    o.nodes.rotate_left(first % len);
    Client::connect(o).await
}

/// The users a bench run signs its connections in as.
pub struct BenchUsers {
    run: String,
    password: String,
    /// Registration is closed: the running user (an admin) creates the accounts.
    created_by: Option<Client>,
}

impl BenchUsers {
    /// Users for a new run, made as `admin`'s cluster allows.
    pub async fn new(admin: &Client) -> Result<BenchUsers, ClientError> {
        let random = |n: usize| -> String { (0..n).map(|_| format!("{:02x}", rand::random::<u8>())).collect() };
        let registration = admin.server_info().await.map(|h| h.registration).unwrap_or_default();
        let created_by = match registration.as_str() {
            "open" => None,
            _ if admin.session().is_some_and(|s| s.admin) => Some(admin.clone()),
            _ => {
                return Err(ClientError::Config(
                    "the bench signs its connections in as users of their own: it needs a cluster with open \
                     registration, or to be run by an admin"
                        .into(),
                ));
            }
        };
        Ok(BenchUsers { run: random(3), password: random(16), created_by })
    }

    /// Options of `options` that sign in as bench user `n`.
    pub async fn options(&self, options: &ClientOptions, n: usize) -> Result<ClientOptions, ClientError> {
        let user = format!("bench-{}-{n}", self.run);
        let mut o = options.clone();
        o.credentials = match &self.created_by {
            None => Credentials::RegisterOrLogin { user, password: self.password.clone() },
            Some(admin) => {
                match admin.admin_create_user(&user, &self.password, false).await {
                    Ok(()) => {}
                    Err(e) if e.code() == Some("user_exists") => {}
                    Err(e) => return Err(e),
                }
                Credentials::Password { user, password: self.password.clone() }
            }
        };
        Ok(o)
    }
}

/// Connects as bench user `n`, to the nodes of `options` starting at `first`, in every room.
async fn connect_user(
    users: &BenchUsers,
    options: &ClientOptions,
    first: usize,
    n: usize,
    rooms: &[String],
) -> Result<Client, ClientError> {
    let client = connect(&users.options(options, n).await?, first).await?;
    for room in rooms {
        client.join(room).await?;
    }
    Ok(client)
}

/// Creates the bench rooms (existing ones are fine).
pub async fn create_rooms(client: &Client, prefix: &str, rooms: usize) -> Result<Vec<String>, ClientError> {
    let names: Vec<String> = (0..rooms).map(|i| format!("{prefix}{i}")).collect();
    for name in &names {
        match client.create_room(name, Default::default(), 0).await {
            Ok(_) => {}
            Err(e) if e.code() == Some("room_exists") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(names)
}

pub async fn run_load(options: &ClientOptions, config: &LoadConfig) -> Result<LoadReport, ClientError> {
    let admin = connect(options, 0).await?;
    let rooms = Arc::new(create_rooms(&admin, &config.room_prefix, config.rooms.max(1)).await?);
    let users = BenchUsers::new(&admin).await?;
    let nodes = options.nodes.len();

    // Subscribers first, on nodes other than the senders' when there are subscribers.
    let stop = CancellationToken::new();
    let fanout = Arc::new(Mutex::new(new_histogram()));
    let mut subscriber_tasks = Vec::new();
    for i in 0..config.subscribers {
        let first = if nodes > 1 { 1 + i % (nodes - 1) } else { 0 };
        let client = connect_user(&users, options, first, 10_000 + i, &rooms).await?;
        let start = rooms.iter().map(|r| (r.clone(), 0u64)).collect::<Vec<_>>();
        // Start each room after its current end: only new messages count.
        let mut cursors = Vec::new();
        for (room, _) in start {
            let last = client.history(&room, crate::HistoryFrom::Before(u64::MAX), 1, false).await?.last_seq;
            cursors.push((room, last));
        }
        let (stop, fanout) = (stop.clone(), fanout.clone());
        subscriber_tasks.push(tokio::spawn(async move {
            let mut local = new_histogram();
            let mut subscription = client.subscribe(cursors);
            // Waiting on the token rather than a timeout per event: 50 subscribers at 1,000
            // msgs/s would otherwise set and cancel 50,000 timers a second in the load generator.
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    event = subscription.next() => event,
                };
                let event = match event {
                    Ok(event) => event,
                    Err(_) => break, // the subscription cannot go on (e.g. its rooms are gone)
                };
                if let SubscriptionEvent::Message(m) = event
                    && m.body.len() >= 8
                {
                    let sent = u64::from_be_bytes(m.body[..8].try_into().unwrap_or([0; 8]));
                    let us = now_unix_ns().saturating_sub(sent) / 1000;
                    let _ = local.record(us.max(1));
                }
            }
            let _ = fanout.lock().await.add(&local);
        }));
    }

    let senders_first = |i: usize| if config.subscribers > 0 { 0 } else { i };
    let mut clients = Vec::new();
    for i in 0..config.connections.max(1) {
        clients.push(connect_user(&users, options, senders_first(i), i, &rooms).await?);
    }
    let picker = Arc::new(RoomPicker::new(rooms.len(), config.skew));
    let sent = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let workers = clients.len() * config.inflight.max(1);
    let per_worker_interval = config.rate.map(|r| Duration::from_secs_f64(workers as f64 / r.max(0.001)));
    let started = Instant::now();
    let deadline = config.duration.map(|d| started + d);

    let progress = config.progress.then(|| {
        let bar = match config.count {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new(config.duration.map(|d| d.as_secs()).unwrap_or(0)),
        };
        let template = if config.count.is_some() {
            "{bar:40} {pos}/{len} messages, {per_sec} [{elapsed_precise}] {msg}"
        } else {
            "{bar:40} {pos}/{len} s [{elapsed_precise}] {msg}"
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar
    });

    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        for w in 0..config.inflight.max(1) {
            let (client, rooms, picker, sent, issued, errors) =
                (client.clone(), rooms.clone(), picker.clone(), sent.clone(), issued.clone(), errors.clone());
            let (size, count) = (config.size, config.count);
            let seed = (c * 1000 + w) as u64;
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut hist = new_histogram();
                // Spread the fixed-rate schedules of the workers over one interval.
                let mut intended = per_worker_interval.map(|i| Instant::now() + i.mul_f64(rng.random::<f64>()));
                loop {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    if let Some(n) = count
                        && issued.fetch_add(1, Ordering::Relaxed) >= n
                    {
                        break;
                    }
                    let start = match (intended, per_worker_interval) {
                        (Some(at), Some(interval)) => {
                            tokio::time::sleep_until(at.into()).await;
                            intended = Some(at + interval);
                            at // latency counts from when the send should have started
                        }
                        _ => Instant::now(),
                    };
                    let room = &rooms[picker.pick(&mut rng)];
                    match client.send(room, body(size)).await {
                        Ok(_) => {
                            let _ = hist.record((start.elapsed().as_micros() as u64).max(1));
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let code = e.code().unwrap_or("client").to_owned();
                            *errors.lock().await.entry(code).or_default() += 1;
                        }
                    }
                }
                hist
            }));
        }
    }

    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut last = (Instant::now(), 0u64);
    loop {
        ticker.tick().await;
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        if let Some(bar) = &progress {
            let now = sent.load(Ordering::Relaxed);
            let rate = (now - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
            last = (Instant::now(), now);
            match config.count {
                Some(_) => bar.set_position(now),
                None => bar.set_position(started.elapsed().as_secs()),
            }
            bar.set_message(format!("{rate:.0} msgs/s"));
        }
    }
    let mut ack = new_histogram();
    for task in tasks {
        if let Ok(h) = task.await {
            let _ = ack.add(&h);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    // Let the subscribers receive the last messages.
    if !subscriber_tasks.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    for task in subscriber_tasks {
        let _ = task.await;
    }
    let sent = sent.load(Ordering::Relaxed);
    let fanout = (config.subscribers > 0)
        .then(|| Percentiles::of(&fanout.try_lock().map(|h| h.clone()).unwrap_or_else(|_| new_histogram())));
    Ok(LoadReport {
        connections: config.connections,
        inflight: config.inflight,
        size: config.size,
        rooms: rooms.len(),
        elapsed_s: elapsed,
        sent,
        msgs_per_s: sent as f64 / elapsed,
        mb_per_s: sent as f64 * config.size as f64 / elapsed / 1e6,
        ack: Percentiles::of(&ack),
        fanout,
        errors: errors.lock().await.clone(),
    })
}

/// `chorus bench flood`: a victim at a fixed rate, alone and beside a flooder.
#[derive(Debug, Clone)]
pub struct FloodConfig {
    /// The victim's sends per second.
    pub rate: f64,
    /// How long each phase lasts.
    pub duration: Duration,
    /// The flooder's connections and sends in flight on each.
    pub connections: usize,
    pub inflight: usize,
    pub size: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    /// The victim's acknowledgement latency alone, then during the flood.
    pub alone: Percentiles,
    pub flooded: Percentiles,
    /// flooded p99 / alone p99.
    pub p99_ratio: f64,
    /// Sends the flooder had acknowledged, and refused as `rate_limited`, per second.
    pub flood_acked_per_s: f64,
    pub flood_refused_per_s: f64,
    pub victim_errors: BTreeMap<String, u64>,
}

/// Sends to `room` at `rate` for `duration` (latency from each send's intended start).
async fn paced(
    client: &Client,
    room: &str,
    rate: f64,
    duration: Duration,
    size: usize,
) -> (Histogram<u64>, BTreeMap<String, u64>) {
    let mut hist = new_histogram();
    let mut errors = BTreeMap::new();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let end = Instant::now() + duration;
    let mut at = Instant::now();
    while at < end {
        tokio::time::sleep_until(at.into()).await;
        match client.send(room, body(size)).await {
            Ok(_) => {
                let _ = hist.record((at.elapsed().as_micros() as u64).max(1));
            }
            Err(e) => *errors.entry(e.code().unwrap_or("client").to_owned()).or_default() += 1,
        }
        at += interval;
    }
    (hist, errors)
}

/// Measures how much a flood from one user moves another user's latency on the same node.
pub async fn run_flood(options: &ClientOptions, config: &FloodConfig) -> Result<FloodReport, ClientError> {
    let admin = connect(options, 0).await?;
    let rooms = create_rooms(&admin, "bench-flood-", 2).await?;
    let users = BenchUsers::new(&admin).await?;
    // Everyone on the first node, sending through it (no leader routing): the flood and the
    // victim share the node that takes their requests.
    let mut on_first = options.clone();
    on_first.nodes.truncate(1);
    on_first.route_to_leaders = false;
    let victim = connect_user(&users, &on_first, 0, 0, &rooms[..1]).await?;
    let (alone, mut victim_errors) = paced(&victim, &rooms[0], config.rate, config.duration, config.size).await;

    let mut flood_options = on_first.clone();
    // The flooder does not wait when told to: every refused send is tried again at once.
    flood_options.retry_deadline = Duration::ZERO;
    let stop = CancellationToken::new();
    let (acked, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut flood = Vec::new();
    for _ in 0..config.connections.max(1) {
        let client = connect_user(&users, &flood_options, 0, 1, &rooms[1..]).await?;
        for _ in 0..config.inflight.max(1) {
            let (client, room, stop, acked, refused) =
                (client.clone(), rooms[1].clone(), stop.clone(), acked.clone(), refused.clone());
            let size = config.size;
            flood.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    match client.send(&room, body(size)).await {
                        Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                        Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked0, refused0, started) = (acked.load(Ordering::Relaxed), refused.load(Ordering::Relaxed), Instant::now());
    let (flooded, errors) = paced(&victim, &rooms[0], config.rate, config.duration, config.size).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (acked1, refused1) = (acked.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    stop.cancel();
    for task in flood {
        let _ = task.await;
    }
    for (code, n) in errors {
        *victim_errors.entry(code).or_default() += n;
    }
    let (alone, flooded) = (Percentiles::of(&alone), Percentiles::of(&flooded));
    Ok(FloodReport {
        p99_ratio: flooded.p99_us as f64 / alone.p99_us.max(1) as f64,
        alone,
        flooded,
        flood_acked_per_s: (acked1 - acked0) as f64 / elapsed,
        flood_refused_per_s: (refused1 - refused0) as f64 / elapsed,
        victim_errors,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub kills: usize,
    /// Milliseconds from each kill until a write invoked after it succeeded (with
    /// [`Probe::SubscriberOnLeader`]: until a message sent after it was delivered).
    pub failover_ms: Vec<u64>,
    pub p50_ms: u64,
    pub max_ms: u64,
}

/// Where the failover probe is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// To a node other than the leader: only the shard's failover is measured.
    Elsewhere,
    /// To the leader's node, which is killed: the time includes the client noticing that its
    /// node is gone and reconnecting to another.
    OnLeader,
    /// A subscriber that only listens, on the leader's node, while a writer elsewhere keeps
    /// sending: the time until the subscriber receives a message sent after the kill.
    SubscriberOnLeader,
}

/// Kills the leader of `room`'s shard `kills` times (running `kill_cmd` with `{node}`
/// replaced by its id), and measures until writes succeed again (or, with
/// [`Probe::SubscriberOnLeader`], until they are delivered again); restarts it with
/// `restart_cmd` and waits for the cluster to settle between kills.
pub async fn run_failover(
    options: &ClientOptions,
    room: &str,
    kills: usize,
    kill_cmd: &str,
    restart_cmd: &str,
    probe_at: Probe,
) -> Result<FailoverReport, ClientError> {
    let admin = connect(options, 0).await?;
    create_rooms(&admin, room, 1).await?;
    let room = format!("{room}0");
    let shard_count = admin.server_info().await.map(|h| h.shard_count).unwrap_or(0);
    let mut results = Vec::new();
    for round in 0..kills {
        let status = wait_settled(&admin, Duration::from_secs(60)).await?;
        let shard = chorus_proto::routing::shard_for_room(&room, shard_count);
        let leader = status.shards.get(shard as usize).map(|s| s.leader).unwrap_or(0);
        if leader == 0 {
            return Err(ClientError::Protocol(format!("shard {shard} has no leader")));
        }
        let (on_leader, others): (Vec<_>, Vec<_>) = status.nodes.iter().partition(|n| n.id == leader);
        let or_configured = |addrs: Vec<String>| if addrs.is_empty() { options.nodes.clone() } else { addrs };
        // The leader's node first; the others to fail over to.
        let leader_first = or_configured(on_leader.iter().chain(&others).map(|n| n.client_addr.clone()).collect());
        let elsewhere = or_configured(others.iter().take(1).map(|n| n.client_addr.clone()).collect());
        let mut probe_options = options.clone();
        probe_options.nodes = if probe_at == Probe::OnLeader { leader_first.clone() } else { elsewhere };
        probe_options.retry_deadline = Duration::from_secs(30);
        let probe = Client::connect(probe_options).await?;
        let last_seq = probe.send(&room, body(64)).await?.seq;
        // When the kill returned, in unix ns (the clock bodies carry their send time in);
        // u64::MAX until then.
        let killed = Arc::new(AtomicU64::new(u64::MAX));
        let recovered = if probe_at == Probe::SubscriberOnLeader {
            let mut watcher_options = options.clone();
            watcher_options.nodes = leader_first;
            let watcher = Client::connect(watcher_options).await?;
            let mut subscription = watcher.subscribe([(room.clone(), last_seq)]);
            let (probe, room) = (probe.clone(), room.clone());
            let writer = tokio::spawn(async move {
                loop {
                    let _ = probe.send(&room, body(64)).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            let killed = killed.clone();
            tokio::spawn(async move {
                let _writer = tokio_util::task::AbortOnDropHandle::new(writer);
                let _watcher = watcher;
                loop {
                    // Bodies carry their send time (unix ns): wait for one sent after the kill.
                    let m = match subscription.next().await? {
                        SubscriptionEvent::Message(m) => m,
                        SubscriptionEvent::RoomError { error, .. } => return Err(error),
                        SubscriptionEvent::Gap(_)
                        | SubscriptionEvent::Resumed { .. }
                        | SubscriptionEvent::Presence(_)
                        | SubscriptionEvent::Typing { .. } => continue,
                    };
                    let Some(sent) = m.body.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes) else {
                        continue;
                    };
                    let kill = killed.load(Ordering::Relaxed);
                    if sent > kill {
                        return Ok(Duration::from_nanos(now_unix_ns().saturating_sub(kill)));
                    }
                }
            })
        } else {
            let (probe, room, killed) = (probe.clone(), room.clone(), killed.clone());
            tokio::spawn(async move {
                loop {
                    let invoked = now_unix_ns();
                    let result = probe.send(&room, body(64)).await;
                    let kill = killed.load(Ordering::Relaxed);
                    if result.is_ok() && invoked > kill {
                        return Ok(Duration::from_nanos(now_unix_ns().saturating_sub(kill)));
                    }
                }
            })
        };
        // Stopped (with the writer and the watcher it owns) however this round ends.
        let recovered = tokio_util::task::AbortOnDropHandle::new(recovered);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The clock starts once the leader is gone (the command returns after the process
        // died); only writes invoked after that count.
        let command = kill_cmd.to_owned();
        tokio::task::spawn_blocking(move || run_command(&command, leader))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))??;
        killed.store(now_unix_ns(), Ordering::Relaxed);
        let took = tokio::time::timeout(Duration::from_secs(60), recovered)
            .await
            .map_err(|_| ClientError::TimedOut(Duration::from_secs(60)))?
            .map_err(|e| ClientError::Protocol(e.to_string()))??;
        let what = if probe_at == Probe::SubscriberOnLeader { "delivery to its subscriber" } else { "writes" };
        eprintln!("failover {}: killed node {leader}, {what} to shard {shard} resumed after {:?}", round + 1, took);
        results.push(took.as_millis() as u64);
        let command = restart_cmd.to_owned();
        tokio::task::spawn_blocking(move || run_command(&command, leader))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))??;
    }
    wait_settled(&admin, Duration::from_secs(60)).await?;
    let mut sorted = results.clone();
    sorted.sort_unstable();
    Ok(FailoverReport {
        kills,
        p50_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        max_ms: sorted.last().copied().unwrap_or(0),
        failover_ms: results,
    })
}

fn run_command(template: &str, node: u64) -> Result<(), ClientError> {
    let command = template.replace("{node}", &node.to_string());
    let status = std::process::Command::new("sh")
        .args(["-c", &command])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| ClientError::Config(format!("running {command:?}: {e}")))?;
    if !status.success() {
        return Err(ClientError::Config(format!("{command:?} failed: {status}")));
    }
    Ok(())
}

/// Waits until every node is reachable, every shard has a leader and every replica has applied
/// what its leader committed.
pub async fn wait_settled(client: &Client, timeout: Duration) -> Result<crate::ClusterStatusReply, ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(status) = client.cluster_status().await {
            let settled = status.nodes.iter().all(|n| n.reachable)
                && status
                    .shards
                    .iter()
                    .all(|s| s.leader != 0 && s.replica_status.iter().all(|r| r.applied >= s.committed));
            if settled {
                return Ok(status);
            }
        }
        if Instant::now() > deadline {
            return Err(ClientError::TimedOut(timeout));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_the_first_rooms_and_uniform_does_not() {
        let mut rng = StdRng::seed_from_u64(1);
        let zipf = RoomPicker::new(64, Skew::Zipf);
        let uniform = RoomPicker::new(64, Skew::Uniform);
        let (mut z, mut u) = ([0u32; 64], [0u32; 64]);
        for _ in 0..100_000 {
            z[zipf.pick(&mut rng)] += 1;
            u[uniform.pick(&mut rng)] += 1;
        }
        assert!(z[0] > 10 * z[63], "{z:?}");
        assert!(u.iter().all(|&c| c > 1200 && c < 1900), "{u:?}");
    }

    #[test]
    fn bodies_carry_their_send_time() {
        let before = now_unix_ns();
        let b = body(200);
        assert_eq!(b.len(), 200);
        let t = u64::from_be_bytes(b[..8].try_into().unwrap());
        assert!(t >= before && t <= now_unix_ns());
    }
}
