//! `chorus bench presence`: what presence costs the cluster with many users signed in.
//!
//! `users` users, each on a connection of its own, spread over the nodes in turn; each watches
//! `watch` others chosen at random (a Subscribe with `presence_of`). Then, for `duration`, each
//! user changes their presence about once per `change_every` (idle and back, with a status text
//! that names the change), and every watcher records when it sees the change: the time from the
//! SetPresence to the event, split by whether watcher and watched are on the same node.
//!
//! Users sign in with tokens of the cluster's external identity provider, minted here with its
//! Ed25519 key (`--oidc-key`, the cluster started with the matching JWKS): an account each,
//! made on first use, without 10,000 password hashes. With `node_pids` (local nodes) it also
//! reads each node's CPU time over the measured phase, and its memory before the users came
//! and at the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Percentiles;
use crate::{Client, ClientError, ClientOptions, SubscriptionEvent};

#[derive(Debug, Clone)]
pub struct PresenceConfig {
    pub users: usize,
    pub watch: usize,
    pub change_every: Duration,
    pub duration: Duration,
    /// The identity provider's Ed25519 key, PKCS#8 DER, its issuer and our audience.
    pub oidc_key_der: Vec<u8>,
    pub oidc_issuer: String,
    pub oidc_audience: String,
    /// The connections' QUIC idle timeout (keep-alives go at a quarter of it).
    pub idle_timeout: Duration,
    /// Process ids of the (local) nodes, to read their CPU time and memory.
    pub node_pids: Vec<u32>,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeCost {
    pub pid: u32,
    /// CPU over the measured phase, in percent of one core.
    pub cpu_percent: f64,
    /// Resident memory before the users connected and at the end, MiB.
    pub rss_idle_mib: f64,
    pub rss_end_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PresenceReport {
    pub users: usize,
    pub watch: usize,
    pub duration_s: f64,
    pub connect_s: f64,
    pub changes: u64,
    /// Changes a watcher saw, by where the watcher was.
    pub other_node: Percentiles,
    pub same_node: Percentiles,
    /// Watcher/change pairs not seen: a later change of the same user came first (presence
    /// sends the latest state, coalesced per second between nodes), or it was lost.
    pub superseded: u64,
    /// Watcher/user pairs where the watcher's last view, 2 s after the last change, is not the
    /// user's last change: must be 0.
    pub stale_at_end: u64,
    pub errors: u64,
    pub nodes: Vec<NodeCost>,
}

impl PresenceReport {
    pub fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let mut out = format!(
            "{} users watching {} each, {} changes in {:.0} s (connected in {:.0} s)\n\
             seen on another node: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} events)\n\
             seen on the same node: p50 {:.0} ms, p99 {:.0} ms ({} events)\n\
             superseded before seen {}, stale at the end {} (must be 0), errors {}\n",
            self.users,
            self.watch,
            self.changes,
            self.duration_s,
            self.connect_s,
            ms(self.other_node.p50_us),
            ms(self.other_node.p99_us),
            ms(self.other_node.max_us),
            self.other_node.count,
            ms(self.same_node.p50_us),
            ms(self.same_node.p99_us),
            self.same_node.count,
            self.superseded,
            self.stale_at_end,
            self.errors
        );
        for n in &self.nodes {
            out += &format!(
                "node pid {}: {:.1}% of a core, RSS {:.0} MiB idle, {:.0} MiB at the end (+{:.0})\n",
                n.pid,
                n.cpu_percent,
                n.rss_idle_mib,
                n.rss_end_mib,
                n.rss_end_mib - n.rss_idle_mib
            );
        }
        out
    }
}

/// CPU seconds (user + system) and resident MiB of a local process.
fn process_usage(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((ticks / 100.0, rss_kib / 1024.0))
}

fn unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token(config: &PresenceConfig, key: &jsonwebtoken::EncodingKey, run: &str, n: usize) -> Result<String, ClientError> {
    let claims = serde_json::json!({
        "iss": config.oidc_issuer,
        "aud": config.oidc_audience,
        "sub": format!("presence-bench-{run}-{n}"),
        "preferred_username": format!("pb-{run}-{n}"),
        "exp": unix_s() + 3600,
        "iat": unix_s(),
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("bench".into());
    jsonwebtoken::encode(&header, &claims, key).map_err(|e| ClientError::Config(format!("minting a token: {e}")))
}

/// One change: who, to which state, and when it was asked for.
type Changes = std::sync::Mutex<HashMap<(usize, u64), Instant>>;

pub async fn run_presence(options: &ClientOptions, config: &PresenceConfig) -> Result<PresenceReport, ClientError> {
    if config.users < 2 || config.watch == 0 || config.watch >= config.users {
        return Err(ClientError::Config("--users must be at least 2, and --watch between 1 and users - 1".into()));
    }
    if config.watch > 1000 {
        return Err(ClientError::Config("--watch is at most 1000 (a Subscribe's presence_of)".into()));
    }
    let key = jsonwebtoken::EncodingKey::from_ed_der(&config.oidc_key_der);
    // A key that does not sign fails here, not 10,000 times.
    token(config, &key, "check", 0).map_err(|e| ClientError::Config(format!("--oidc-key: {e}")))?;
    let run: String = (0..3).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let nodes = options.nodes.len().max(1);
    let idle: Vec<Option<(f64, f64)>> = config.node_pids.iter().map(|p| process_usage(*p)).collect();

    // Connect and sign everyone in, 64 at a time.
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(64));
    let mut joins = Vec::with_capacity(config.users);
    for n in 0..config.users {
        let mut o = options.clone();
        o.nodes.rotate_left(n % nodes);
        o.idle_timeout = config.idle_timeout;
        o.credentials = crate::Credentials::Anonymous;
        o.device = "presence bench".into();
        let token = token(config, &key, &run, n)?;
        let gate = gate.clone();
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let client = Client::connect(o).await?;
            let tokens = client.login_external(&token).await?;
            Ok::<_, ClientError>((client, tokens.user))
        }));
    }
    let mut clients = Vec::with_capacity(config.users);
    let mut names = Vec::with_capacity(config.users);
    for (n, join) in joins.into_iter().enumerate() {
        let (client, name) = join.await.map_err(|e| ClientError::Config(format!("connecting user {n}: {e}")))??;
        clients.push(client);
        names.push(name);
        if config.progress && (n + 1) % 1000 == 0 {
            eprintln!("bench presence: {} users signed in", n + 1);
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    let index: Arc<HashMap<String, usize>> = Arc::new(names.iter().cloned().enumerate().map(|(i, n)| (n, i)).collect());

    // Every user watches `watch` others.
    let changes: Arc<Changes> = Arc::default();
    let other_node =
        Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).map_err(|e| ClientError::Config(e.to_string()))?));
    let same_node =
        Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).map_err(|e| ClientError::Config(e.to_string()))?));
    let seen = Arc::new(AtomicU64::new(0));
    // Per watcher and watched user, the last change seen (presence sends the latest state:
    // by the end, every watcher must see every watched user's last change).
    let last_seen: Arc<std::sync::Mutex<HashMap<(usize, usize), u64>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut rng = StdRng::from_os_rng();
    let mut watchers = Vec::with_capacity(config.users);
    let mut watched_by: Vec<u64> = vec![0; config.users];
    let mut watching: Vec<Vec<usize>> = Vec::with_capacity(config.users);
    let mut ready = Vec::with_capacity(config.users);
    for (w, client) in clients.iter().enumerate() {
        let mut others: Vec<usize> = (0..config.users).filter(|u| *u != w).collect();
        others.shuffle(&mut rng);
        others.truncate(config.watch);
        for u in &others {
            watched_by[*u] += 1;
        }
        let watched: Vec<String> = others.iter().map(|u| names[*u].clone()).collect();
        watching.push(others.clone());
        let mut sub = client.subscribe_with(std::iter::empty::<(String, u64)>(), watched);
        let last_seen = last_seen.clone();
        let (changes, index, other_node, same_node, seen, errors, stop) = (
            changes.clone(),
            index.clone(),
            other_node.clone(),
            same_node.clone(),
            seen.clone(),
            errors.clone(),
            stop.clone(),
        );
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(ready_rx);
        watchers.push(tokio::spawn(async move {
            let mut ready_tx = Some(ready_tx);
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    event = sub.next() => event,
                };
                match event {
                    Ok(SubscriptionEvent::Presence(batch)) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                        let now = Instant::now();
                        for p in batch {
                            let Some(&u) = index.get(&p.user) else { continue };
                            let Some(k) = p.status_text.strip_prefix('c').and_then(|k| k.parse::<u64>().ok()) else {
                                continue;
                            };
                            last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert((w, u), k);
                            let asked = changes.lock().unwrap_or_else(|p| p.into_inner()).get(&(u, k)).copied();
                            if let Some(asked) = asked {
                                let us = now.saturating_duration_since(asked).as_micros() as u64;
                                let histogram = if u % nodes == w % nodes { &same_node } else { &other_node };
                                let _ = histogram.lock().unwrap_or_else(|p| p.into_inner()).record(us.max(1));
                                seen.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }
    for rx in ready {
        let _ = tokio::time::timeout(Duration::from_secs(60), rx).await;
    }
    if config.progress {
        eprintln!("bench presence: {} subscriptions ready; changing presence for {:?}", config.users, config.duration);
    }

    // The measured phase: changes at users / change_every per second, in random order.
    let before: Vec<Option<(f64, f64)>> = config.node_pids.iter().map(|p| process_usage(*p)).collect();
    let measured = Instant::now();
    let per_second = config.users as f64 / config.change_every.as_secs_f64().max(0.001);
    let gap = Duration::from_secs_f64(1.0 / per_second.max(0.001));
    let mut next = Instant::now();
    let mut count: u64 = 0;
    let mut expected: u64 = 0;
    let mut away = vec![false; config.users];
    let mut last_change = vec![0u64; config.users];
    let busy: Arc<std::sync::Mutex<std::collections::HashSet<usize>>> = Arc::default();
    let mut setters = tokio::task::JoinSet::new();
    while measured.elapsed() < config.duration {
        tokio::time::sleep_until(next.into()).await;
        next += gap;
        // One change at a time per user, so that the last one asked for is where they end.
        let u = rng.random_range(0..config.users);
        if busy.lock().unwrap_or_else(|p| p.into_inner()).contains(&u) {
            continue;
        }
        count += 1;
        last_change[u] = count;
        expected += watched_by[u];
        away[u] = !away[u];
        changes.lock().unwrap_or_else(|p| p.into_inner()).insert((u, count), Instant::now());
        let (client, state, errors, busy) = (clients[u].clone(), away[u], errors.clone(), busy.clone());
        busy.lock().unwrap_or_else(|p| p.into_inner()).insert(u);
        setters.spawn(async move {
            if client.set_presence(state, Some(&format!("c{count}"))).await.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
            }
            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&u);
        });
        while setters.try_join_next().is_some() {}
    }
    while setters.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(2)).await;
    let duration_s = measured.elapsed().as_secs_f64();
    let stale_at_end = {
        let last_seen = last_seen.lock().unwrap_or_else(|p| p.into_inner());
        watching
            .iter()
            .enumerate()
            .flat_map(|(w, others)| others.iter().map(move |u| (w, *u)))
            .filter(|(w, u)| last_change[*u] != 0 && last_seen.get(&(*w, *u)) != Some(&last_change[*u]))
            .count() as u64
    };
    let after: Vec<Option<(f64, f64)>> = config.node_pids.iter().map(|p| process_usage(*p)).collect();
    stop.cancel();
    for w in watchers {
        let _ = w.await;
    }
    let nodes_cost = config
        .node_pids
        .iter()
        .enumerate()
        .map(|(i, pid)| {
            let cpu = match (before[i], after[i]) {
                (Some((b, _)), Some((a, _))) => (a - b) / duration_s * 100.0,
                _ => f64::NAN,
            };
            NodeCost {
                pid: *pid,
                cpu_percent: cpu,
                rss_idle_mib: idle[i].map_or(f64::NAN, |(_, rss)| rss),
                rss_end_mib: after[i].map_or(f64::NAN, |(_, rss)| rss),
            }
        })
        .collect();
    let other_node = Percentiles::of(&other_node.lock().unwrap_or_else(|p| p.into_inner()));
    let same_node = Percentiles::of(&same_node.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(PresenceReport {
        users: config.users,
        watch: config.watch,
        duration_s,
        connect_s,
        changes: count,
        superseded: expected.saturating_sub(seen.load(Ordering::Relaxed)),
        stale_at_end,
        other_node,
        same_node,
        errors: errors.load(Ordering::Relaxed),
        nodes: nodes_cost,
    })
}
