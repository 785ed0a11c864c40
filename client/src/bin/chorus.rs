//! `chorus`: the command-line client. Readable output for people; `--json` prints one JSON
//! object per line for scripts.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use chorus_client::settings::ConnectArgs;
use chorus_client::{Client, ClientError, ClusterStatusReply, HistoryFrom, Message, SubscriptionEvent};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

/// `println!` that survives a closed stdout: when the reader went away (`chorus status | head`)
/// the command ends quietly instead of panicking; other write errors are reported.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            stdout_failed(e)
        }
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("chorus: writing to stdout: {e}");
    std::process::exit(1);
}

#[derive(Debug, Parser)]
#[command(name = "chorus", version, about = "Chat through a Chorus cluster")]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print machine-readable JSON, one object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a message to a room.
    Send {
        room: String,
        text: String,
        /// Create the room first if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Create a room.
    Create {
        room: String,
        /// Metadata entry key=value (repeatable), e.g. --meta topic=releases.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        /// Keep only the newest N messages (0: keep all).
        #[arg(long, default_value_t = 0)]
        retention: u64,
    },
    /// Print a room's messages as they arrive.
    Tail {
        room: String,
        /// Start at this sequence number (1: the whole history). [default: new messages only]
        #[arg(long)]
        from: Option<u64>,
    },
    /// Print a page of a room's history, oldest first.
    History {
        room: String,
        /// Messages before this sequence number. [default: the newest]
        #[arg(long, conflicts_with = "after")]
        before: Option<u64>,
        /// Messages after this sequence number.
        #[arg(long)]
        after: Option<u64>,
        /// How many messages (at most 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Read the connected node's replica instead of going through the shard leader.
        #[arg(long)]
        local: bool,
    },
    /// List rooms.
    Rooms {
        /// Rooms after this name (paging).
        #[arg(long, default_value = "")]
        after: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show the cluster: nodes, and every shard's replicas, leader, term and progress.
    Status,
    /// Chat in a room: messages arrive as they are sent; type a line to send it (/quit to leave).
    Chat { room: String },
    /// Measure a running cluster: throughput, latency, fan-out (see docs/BENCHMARKS.md).
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    mode: Option<BenchMode>,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Debug, Subcommand)]
enum BenchMode {
    /// Kill the leader of a shard repeatedly and measure how long until writes succeed again.
    Failover {
        /// How many kills.
        #[arg(long, default_value_t = 5)]
        kills: usize,
        /// Command that kills node {node}, e.g. "scripts/cluster.sh kill {node}".
        #[arg(long)]
        kill_cmd: String,
        /// Command that restarts node {node}, e.g. "scripts/cluster.sh restart {node}".
        #[arg(long)]
        restart_cmd: String,
        /// Prefix of the probe room.
        #[arg(long, default_value = "failover-")]
        room: String,
        /// Connect the probe to the node that is killed (the shard's leader), so that the
        /// time also includes the client noticing its node is gone and reconnecting
        /// elsewhere. By default the probe is connected to another node.
        #[arg(long)]
        client_on_leader: bool,
        /// Measure delivery instead: a client that only subscribes is connected to the node
        /// that is killed, a writer to another; the time is until the subscriber receives a
        /// message sent after the kill.
        #[arg(long, conflicts_with = "client_on_leader")]
        subscriber_on_leader: bool,
    },
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Client connections, spread over the nodes.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Sends in flight per connection.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Message size in bytes (at least 8: the send time is carried in the body).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Number of rooms.
    #[arg(long, default_value_t = 64)]
    rooms: usize,
    #[arg(long, value_enum, default_value_t = chorus_client::bench::Skew::Uniform)]
    skew: chorus_client::bench::Skew,
    /// How long to send (e.g. 30s). [default: 10s unless --count is given]
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// How many messages to send.
    #[arg(long)]
    count: Option<u64>,
    /// Fixed total rate in messages per second (latency then counts from each send's intended
    /// start, correcting for coordinated omission). [default: as fast as acknowledgements allow]
    #[arg(long)]
    rate: Option<f64>,
    /// Subscribers on other nodes than the senders, measuring send → delivery latency.
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// Prefix of the bench rooms.
    #[arg(long, default_value = "bench-")]
    room_prefix: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chorus: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let options = cli.connect.resolve()?;
    let nodes = options.nodes.join(", ");
    let client = Client::connect(options).await.with_context(|| format!("connecting to {nodes}"))?;
    let json = cli.json;
    match cli.command {
        Command::Send { room, text, create } => {
            if create {
                ensure_room(&client, &room, json).await?;
            }
            let receipt = client.send(&room, text).await?;
            if json {
                out!(
                    "{}",
                    json!({"room": room, "seq": receipt.seq, "ts_ms": receipt.ts_ms,
                           "duplicate": receipt.duplicate, "client_seq": receipt.client_seq})
                );
            } else {
                out!("sent to {room} as #{} at {}", receipt.seq, format_time(receipt.ts_ms));
            }
        }
        Command::Create { room, meta, retention } => {
            let mut metadata = BTreeMap::new();
            for entry in meta {
                let Some((k, v)) = entry.split_once('=') else { bail!("--meta {entry:?} is not KEY=VALUE") };
                metadata.insert(k.to_owned(), v.to_owned());
            }
            let created = client.create_room(&room, metadata, retention).await?;
            if json {
                out!("{}", json!({"room": created.room, "created_ts_ms": created.created_ts_ms}));
            } else {
                out!("created room {}", created.room);
            }
        }
        Command::Tail { room, from } => {
            let after = match from {
                Some(n) => n.saturating_sub(1),
                None => client.history(&room, HistoryFrom::Before(u64::MAX), 1, true).await?.last_seq,
            };
            follow(&client, &room, after, json).await?;
        }
        Command::History { room, before, after, limit, local } => {
            let from = match (after, before) {
                (Some(a), _) => HistoryFrom::After(a),
                (None, Some(b)) => HistoryFrom::Before(b),
                (None, None) => HistoryFrom::Before(u64::MAX),
            };
            let page = client.history(&room, from, limit, !local).await?;
            if !json && page.messages.is_empty() {
                out!("(no messages; {room} has {} in all)", page.last_seq);
            }
            for m in &page.messages {
                print_message(m, json);
            }
        }
        Command::Rooms { after, limit } => {
            let list = client.list_rooms(&after, limit).await?;
            if json {
                for r in &list.rooms {
                    out!(
                        "{}",
                        json!({"room": r.name, "shard": r.shard, "last_seq": r.last_seq, "first_seq": r.first_seq,
                               "creator": r.creator, "created_ts_ms": r.created_ts_ms, "metadata": r.metadata})
                    );
                }
            } else {
                out!("{:<32} {:>6} {:>10} {:<16} LAST MESSAGE", "ROOM", "SHARD", "MESSAGES", "CREATED BY");
                for r in &list.rooms {
                    let last = if r.last_seq == 0 { "-".to_string() } else { format_time(r.last_ts_ms) };
                    out!("{:<32} {:>6} {:>10} {:<16} {}", r.name, r.shard, r.last_seq, r.creator, last);
                }
                if list.more {
                    let next = list.rooms.last().map(|r| r.name.as_str()).unwrap_or_default();
                    out!("(more: --after {next})");
                }
            }
        }
        Command::Status => {
            let status = client.cluster_status().await?;
            if json {
                out!("{}", status_json(&status));
            } else {
                print_status(&status);
            }
        }
        Command::Chat { room } => chat(&client, &room).await?,
        Command::Bench(args) => bench(client.options(), args, json).await?,
    }
    Ok(())
}

async fn bench(options: &chorus_client::ClientOptions, args: BenchArgs, json: bool) -> anyhow::Result<()> {
    use chorus_client::bench;
    match args.mode {
        Some(BenchMode::Failover { kills, kill_cmd, restart_cmd, room, client_on_leader, subscriber_on_leader }) => {
            let probe = match (client_on_leader, subscriber_on_leader) {
                (true, _) => bench::Probe::OnLeader,
                (_, true) => bench::Probe::SubscriberOnLeader,
                _ => bench::Probe::Elsewhere,
            };
            let report = bench::run_failover(options, &room, kills, &kill_cmd, &restart_cmd, probe).await?;
            if json {
                out!("{}", serde_json::to_string(&report)?);
            } else {
                out!(
                    "failover over {} kills: p50 {} ms, max {} ms ({:?})",
                    report.kills,
                    report.p50_ms,
                    report.max_ms,
                    report.failover_ms
                );
            }
        }
        None => {
            let l = args.load;
            if l.size < 8 {
                bail!("--size must be at least 8 bytes (the send time travels in the body)");
            }
            let config = bench::LoadConfig {
                connections: l.connections,
                inflight: l.inflight,
                size: l.size,
                rooms: l.rooms,
                skew: l.skew,
                duration: l.duration.or(if l.count.is_none() {
                    Some(std::time::Duration::from_secs(10))
                } else {
                    None
                }),
                count: l.count,
                rate: l.rate,
                subscribers: l.subscribers,
                room_prefix: l.room_prefix,
                progress: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let report = bench::run_load(options, &config).await?;
            if json {
                out!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.human());
            }
        }
    }
    Ok(())
}

async fn ensure_room(client: &Client, room: &str, quiet: bool) -> anyhow::Result<()> {
    match client.create_room(room, BTreeMap::new(), 0).await {
        Ok(_) => {
            if !quiet {
                eprintln!("created room {room}");
            }
            Ok(())
        }
        Err(e) if e.code() == Some("room_exists") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn format_time(ts_ms: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .map(|s| format!("{s} UTC"))
        .unwrap_or_else(|| ts_ms.to_string())
}

fn print_message(m: &Message, json: bool) {
    let body = String::from_utf8_lossy(&m.body);
    if json {
        out!(
            "{}",
            json!({"room": m.room, "seq": m.seq, "ts_ms": m.ts_ms, "sender": m.sender, "body": body,
                   "client_seq": m.client_seq})
        );
    } else {
        out!("#{:<6} {}  {}: {}", m.seq, format_time(m.ts_ms), m.sender, body);
    }
}

fn print_event(event: &SubscriptionEvent, json: bool) {
    match event {
        SubscriptionEvent::Message(m) => print_message(m, json),
        SubscriptionEvent::Gap(g) if json => {
            out!("{}", json!({"room": g.room, "gap_from": g.from_seq, "gap_to": g.to_seq, "reason": g.reason}))
        }
        SubscriptionEvent::Gap(g) => {
            out!("-- messages {}..{} of {} are gone: {} --", g.from_seq, g.to_seq, g.room, g.reason)
        }
        SubscriptionEvent::RoomError { room, error } => eprintln!("chorus: {room}: {error}"),
        SubscriptionEvent::Resumed { node } => eprintln!("(reconnected via {node}; nothing missed)"),
    }
}

async fn follow(client: &Client, room: &str, after: u64, json: bool) -> anyhow::Result<()> {
    let mut subscription = client.subscribe([(room.to_owned(), after)]);
    loop {
        let event = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            event = subscription.next() => event,
        };
        let event = event?;
        print_event(&event, json);
        if let SubscriptionEvent::RoomError { error, .. } = event {
            return Err(error.into());
        }
    }
}

async fn chat(client: &Client, room: &str) -> anyhow::Result<()> {
    ensure_room(client, room, false).await?;
    let recent = client.history(room, HistoryFrom::Before(u64::MAX), 10, true).await?;
    let user = client.options().user.clone();
    out!("-- {room}: you are {user}; type a message and press enter, /quit to leave --");
    for m in &recent.messages {
        print_message(m, false);
    }
    let mut subscription = client.subscribe([(room.to_owned(), recent.last_seq)]);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            event = subscription.next() => {
                let event = event?;
                print_event(&event, false);
                if let SubscriptionEvent::RoomError { error, .. } = event {
                    return Err(error.into());
                }
            }
            line = lines.next_line() => {
                let Some(line) = line? else { return Ok(()) };
                let line = line.trim_end();
                if line == "/quit" {
                    return Ok(());
                }
                if line.is_empty() {
                    continue;
                }
                // The message comes back through the subscription, in its place in the room.
                if let Err(e) = client.send(room, line.to_owned()).await {
                    eprintln!("chorus: not sent: {e}{}", indeterminate_hint(&e));
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn indeterminate_hint(e: &ClientError) -> &'static str {
    if e.indeterminate() { " (it may still appear)" } else { "" }
}

fn print_status(s: &ClusterStatusReply) {
    out!(
        "cluster {}: {} shards, replication factor {} (answered by node {})",
        s.cluster_id,
        s.shard_count,
        s.replication_factor,
        s.answered_by
    );
    out!();
    out!("{:<6} {:<22} {:<22} STATE", "NODE", "CLIENT ADDR", "PEER ADDR");
    for n in &s.nodes {
        let state = if n.reachable { "up".to_string() } else { format!("unreachable ({})", n.error) };
        out!("{:<6} {:<22} {:<22} {}", n.id, n.client_addr, n.peer_addr, state);
    }
    out!();
    out!("{:<6} {:<7} {:<6} {:<8} REPLICAS (node role applied lag)", "SHARD", "LEADER", "TERM", "COMMIT");
    for shard in &s.shards {
        let leader = if shard.leader == 0 { "none".to_string() } else { shard.leader.to_string() };
        let replicas: Vec<String> = shard
            .replica_status
            .iter()
            .map(|r| {
                if r.role == "unreachable" {
                    return format!("{} unreachable", r.node);
                }
                let lag = shard.committed.saturating_sub(r.applied);
                format!("{} {} {} {}", r.node, r.role, r.applied, lag)
            })
            .collect();
        out!("{:<6} {:<7} {:<6} {:<8} {}", shard.shard, leader, shard.term, shard.committed, replicas.join(" | "));
    }
}

fn status_json(s: &ClusterStatusReply) -> serde_json::Value {
    json!({
        "cluster_id": s.cluster_id,
        "shard_count": s.shard_count,
        "replication_factor": s.replication_factor,
        "answered_by": s.answered_by,
        "nodes": s.nodes.iter().map(|n| json!({
            "id": n.id, "client_addr": n.client_addr, "peer_addr": n.peer_addr,
            "reachable": n.reachable, "error": n.error,
        })).collect::<Vec<_>>(),
        "shards": s.shards.iter().map(|sh| json!({
            "shard": sh.shard, "leader": sh.leader, "term": sh.term, "committed": sh.committed,
            "replicas": sh.replicas,
            "replica_status": sh.replica_status.iter().map(|r| json!({
                "node": r.node, "role": r.role, "term": r.term, "last_log_index": r.last_log_index,
                "matched": r.matched, "applied": r.applied, "snapshot_index": r.snapshot_index,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
