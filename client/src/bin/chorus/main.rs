//! `chorus`: the command-line client. Readable output for people; `--json` prints one JSON
//! object per line for scripts.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use chorus_client::settings::{ConnectArgs, ProfileStore};
use chorus_client::{
    Client, ClientError, ClusterStatusReply, Credentials, HistoryFrom, Message, Role, SubscriptionEvent, Visibility,
};
use clap::{Parser, Subcommand};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

mod chat;

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

#[derive(Debug, clap::Args)]
struct PasswordArgs {
    /// Read the password from the first line of standard input (for scripts) instead of
    /// asking for it at the terminal.
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an account and sign in as it (the cluster must allow registration).
    Register {
        user: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// The registration token, if the cluster's registration needs one.
        #[arg(long, env = "CHORUS_REGISTRATION_TOKEN", hide_env_values = true)]
        registration_token: Option<String>,
    },
    /// Sign in (keeps the session in ~/.config/chorus/sessions/<profile>.toml, mode 0600).
    Login {
        /// Your user name (not with --external-token-stdin).
        #[arg(required_unless_present = "external_token_stdin")]
        user: Option<String>,
        #[command(flatten)]
        password: PasswordArgs,
        /// Sign in with a token of the cluster's external identity provider, read from stdin.
        #[arg(long, conflicts_with = "user")]
        external_token_stdin: bool,
    },
    /// Sign out: this session, another one (--session), or every session (--all).
    Logout {
        #[arg(long)]
        all: bool,
        /// The id of another session of yours to end (see `chorus sessions`).
        #[arg(long, conflicts_with = "all")]
        session: Option<String>,
    },
    /// Who you are signed in as.
    Whoami,
    /// Your signed-in sessions (devices).
    Sessions,
    /// Send a message to a room (joining it first if it is public and you are not in it).
    Send {
        room: String,
        text: String,
        /// Create the room first if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Create a room; you become its owner.
    Create {
        room: String,
        /// Only members can read it; others join by invitation.
        #[arg(long)]
        private: bool,
        /// Metadata entry key=value (repeatable), e.g. --meta topic=releases.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
        /// Keep only the newest N messages (0: keep all).
        #[arg(long, default_value_t = 0)]
        retention: u64,
    },
    /// Join a room (a public one, or a private one you are invited to).
    Join { room: String },
    /// Leave a room.
    Leave { room: String },
    /// Invite a user to a room (owners and admins).
    Invite { room: String, user: String },
    /// Remove a user from a room (owners and admins).
    Kick {
        room: String,
        user: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Remove a user from a room and keep them out (owners and admins).
    Ban {
        room: String,
        user: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a ban.
    Unban { room: String, user: String },
    /// Give a member a role: member, admin or owner.
    Role {
        room: String,
        user: String,
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// The members of a room, with their roles (and how far each has read, for those who share
    /// their read receipts).
    Members { room: String },
    /// The members of a room who are online or idle now (with --all, everyone, with when
    /// they were last active).
    Who {
        room: String,
        #[arg(long)]
        all: bool,
    },
    /// Mark a room read up to SEQ (default: its newest message).
    Read {
        room: String,
        seq: Option<u64>,
        /// Set the marker to SEQ exactly, so that what follows reads as unread again.
        #[arg(long)]
        unread: bool,
        /// Also show this position to the room's members as your read receipt.
        #[arg(long)]
        share: bool,
    },
    /// Your rooms, newest first, with how many messages and mentions you have not read.
    Sync {
        /// Also print each room's newest N messages.
        #[arg(long, default_value_t = 0)]
        messages: u32,
    },
    /// Direct messages with a user: chat with them, or send TEXT.
    Dm { user: String, text: Option<String> },
    /// Administer the cluster (admins).
    #[command(subcommand)]
    Admin(AdminCommand),
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
    /// List the rooms you can see: public ones, and those you are in or invited to.
    Rooms {
        /// Rooms after this name (paging).
        #[arg(long, default_value = "")]
        after: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only the rooms you are in or invited to.
        #[arg(long)]
        mine: bool,
    },
    /// Show the cluster: nodes, and every shard's replicas, leader, term and progress.
    Status,
    /// Chat full-screen: your rooms with unread counts, the open room's messages (scroll back
    /// with PageUp), members and who is typing; /help inside lists the keys. ROOM is opened
    /// first (joined if it is public and you are not in it, created if it does not exist).
    /// Without a terminal, or with --plain, a line mode: messages are printed as they arrive
    /// and each line typed is sent (/quit to leave).
    Chat {
        room: Option<String>,
        /// Line mode even at a terminal (for scripts, pipes and screen readers).
        #[arg(long)]
        plain: bool,
    },
    /// Measure a running cluster: throughput, latency, fan-out (see docs/BENCHMARKS.md).
    Bench(Box<BenchArgs>),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Member,
    Admin,
    Owner,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Accounts.
    #[command(subcommand)]
    User(AdminUserCommand),
    /// Sign new access tokens with a new key (tokens signed with older keys stay valid until
    /// they expire).
    RotateKey,
}

#[derive(Debug, Subcommand)]
enum AdminUserCommand {
    /// Create an account.
    Add {
        user: String,
        /// Make the account an admin.
        #[arg(long)]
        admin: bool,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Disable an account: its sessions end at once, on every node.
    Disable { user: String },
    /// Enable a disabled account again.
    Enable { user: String },
    /// List the accounts.
    List,
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
    /// One user sends at a fixed rate through the first node, alone and then while another
    /// user floods the same node: how much the flood moves the first user's latency.
    Flood {
        /// The first user's sends per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// How long each phase lasts (e.g. 20s).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
        duration: std::time::Duration,
        /// The flooder's connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// The flooder's sends in flight per connection.
        #[arg(long, default_value_t = 64)]
        inflight: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 200)]
        size: usize,
    },
    /// Many users signed in, each watching others' presence and changing their own now and
    /// then: how long a change takes to reach its watchers, and what it costs the nodes. Users
    /// sign in with tokens of the cluster's identity provider, minted with its key.
    Presence {
        /// Users, each on a connection of its own.
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        /// Others each user watches.
        #[arg(long, default_value_t = 50)]
        watch: usize,
        /// Each user changes presence about this often (e.g. 2min).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2min")]
        change_every: std::time::Duration,
        /// How long to measure (after everyone is connected).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        duration: std::time::Duration,
        /// The identity provider's Ed25519 private key (PKCS#8 DER, as `openssl genpkey -algorithm
        /// ed25519 -outform DER` writes it); the nodes run with
        /// --oidc-jwks naming its public key, with key id "bench".
        #[arg(long)]
        oidc_key: std::path::PathBuf,
        #[arg(long)]
        oidc_issuer: String,
        #[arg(long)]
        oidc_audience: String,
        /// The connections' QUIC idle timeout (keep-alives every quarter of it).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
        idle_timeout: std::time::Duration,
        /// Process ids of local nodes (comma-separated), to report their CPU and memory.
        #[arg(long, value_delimiter = ',')]
        node_pids: Vec<u32>,
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

/// Reads a password: the first line of stdin with --password-stdin, else from the terminal
/// without echo.
fn read_password(args: &PasswordArgs, prompt: &str) -> anyhow::Result<String> {
    if args.password_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the password from stdin")?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        bail!("no terminal to ask for the password: pass it on stdin with --password-stdin");
    }
    rpassword::prompt_password(prompt).context("reading the password")
}

fn not_signed_in() -> anyhow::Error {
    anyhow::anyhow!("not signed in: `chorus login USER` (or `chorus register USER` where registration is open)")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut options = cli.connect.resolve()?;
    let store = ProfileStore::new(&cli.connect.profile)?;
    // The profile's own client id: a send re-run after an unknown outcome is deduplicated.
    options.client_id = Some(store.send_log().client_id()?);
    let nodes = options.nodes.join(", ");
    let signed_in_before = matches!(options.credentials, Credentials::Session(_));
    let client = match Client::connect(options).await {
        Err(e) if signed_in_before && matches!(e.code(), Some("token_revoked" | "unauthenticated")) => {
            // The kept session ended (signed out elsewhere, or an admin disabled the account).
            store.remove()?;
            let mut options = cli.connect.resolve()?;
            options.credentials = Credentials::Anonymous;
            options.client_id = Some(store.send_log().client_id()?);
            eprintln!("chorus: your session ended ({e}); sign in again");
            Client::connect(options).await.with_context(|| format!("connecting to {nodes}"))?
        }
        other => other.with_context(|| format!("connecting to {nodes}"))?,
    };
    let json = cli.json;
    let before = client.session();
    let result = command(&client, &store, cli.command, json).await;
    // Keep a refreshed access token, so that the next command need not refresh again.
    if let (Some(before), Some(now)) = (before, client.session())
        && now.session_id == before.session_id
        && now != before
    {
        let _ = store.save(&now);
    }
    result
}

async fn command(client: &Client, store: &ProfileStore, command: Command, json: bool) -> anyhow::Result<()> {
    let needs_session = !matches!(command, Command::Register { .. } | Command::Login { .. } | Command::Status);
    if needs_session && client.session().is_none() {
        return Err(not_signed_in());
    }
    match command {
        Command::Register { user, password, registration_token } => {
            let password = read_password(&password, "choose a password: ")?;
            let session = client.register(&user, &password, registration_token.as_deref().unwrap_or("")).await?;
            store.save(&session)?;
            say_signed_in(&session, json, "registered and signed in");
        }
        Command::Login { user, password, external_token_stdin } => {
            let session = if external_token_stdin {
                let mut token = String::new();
                std::io::stdin().read_line(&mut token).context("reading the token from stdin")?;
                client.login_external(token.trim()).await?
            } else {
                let user = user.unwrap_or_default();
                let password = read_password(&password, &format!("password for {user}: "))?;
                client.login(&user, &password).await?
            };
            store.save(&session)?;
            say_signed_in(&session, json, "signed in");
        }
        Command::Logout { all, session } => {
            match session {
                Some(id) => client.logout_session(&id).await?,
                None => {
                    client.logout(all).await?;
                    store.remove()?;
                }
            }
            if !json {
                out!("signed out");
            }
        }
        Command::Whoami => {
            let me = client.whoami().await?;
            if json {
                out!("{}", json!({"user": me.user, "session_id": me.session_id, "admin": me.admin}));
            } else {
                out!("{}{} (session {})", me.user, if me.admin { ", admin" } else { "" }, me.session_id);
            }
        }
        Command::Sessions => {
            for s in client.sessions().await? {
                if json {
                    out!(
                        "{}",
                        json!({"session_id": s.session_id, "device": s.device, "created_ms": s.created_ms,
                               "expires_ms": s.expires_ms, "current": s.current})
                    );
                } else {
                    let current = if s.current { "  (this one)" } else { "" };
                    out!("{}  {}  since {}{current}", s.session_id, s.device, format_time(s.created_ms));
                }
            }
        }
        Command::Send { room, text, create } => {
            if create {
                ensure_room(client, &room, json).await?;
            }
            let receipt = send_joining(client, store, &room, text).await?;
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
        Command::Create { room, private, meta, retention } => {
            let mut metadata = BTreeMap::new();
            for entry in meta {
                let Some((k, v)) = entry.split_once('=') else { bail!("--meta {entry:?} is not KEY=VALUE") };
                metadata.insert(k.to_owned(), v.to_owned());
            }
            let visibility = if private { Visibility::Private } else { Visibility::Public };
            let created = client.create_room_with(&room, visibility, metadata, retention).await?;
            if json {
                out!("{}", json!({"room": created.room, "created_ts_ms": created.created_ts_ms}));
            } else {
                out!("created {} room {}", if private { "private" } else { "public" }, created.room);
            }
        }
        Command::Join { room } => say_changed(client.join(&room).await?, json, &format!("joined {room}")),
        Command::Leave { room } => say_changed(client.leave(&room).await?, json, &format!("left {room}")),
        Command::Invite { room, user } => {
            say_changed(client.invite(&room, &user).await?, json, &format!("invited {user} to {room}"))
        }
        Command::Kick { room, user, reason } => {
            say_changed(client.kick(&room, &user, &reason).await?, json, &format!("removed {user} from {room}"))
        }
        Command::Ban { room, user, reason } => {
            say_changed(client.ban(&room, &user, &reason).await?, json, &format!("banned {user} from {room}"))
        }
        Command::Unban { room, user } => {
            say_changed(client.unban(&room, &user).await?, json, &format!("lifted the ban of {user} in {room}"))
        }
        Command::Role { room, user, role } => {
            let role = match role {
                RoleArg::Member => Role::Member,
                RoleArg::Admin => Role::Admin,
                RoleArg::Owner => Role::Owner,
            };
            let done = format!("{user} is now {} of {room}", role_name(role as i32));
            say_changed(client.set_role(&room, &user, role).await?, json, &done)
        }
        Command::Members { room } => {
            for m in client.all_members(&room).await? {
                let state = member_state(m.state);
                if json {
                    out!(
                        "{}",
                        json!({"user": m.user, "role": role_name(m.role), "state": state, "since_ms": m.since_ms,
                               "read_seq": m.read_seq})
                    );
                } else if state == "joined" && m.read_seq > 0 {
                    out!("{:<32} {:<8} read up to #{}", m.user, role_name(m.role), m.read_seq);
                } else if state == "joined" {
                    out!("{:<32} {}", m.user, role_name(m.role));
                } else {
                    out!("{:<32} ({state})", m.user);
                }
            }
        }
        Command::Who { room, all } => {
            let members: Vec<String> = client
                .all_members(&room)
                .await?
                .into_iter()
                .filter(|m| m.state == chorus_proto::client::MembershipState::Joined as i32)
                .map(|m| m.user)
                .take(1000)
                .collect();
            let mut subscription = client.subscribe_with(Vec::<(String, u64)>::new(), members.clone());
            let presence = loop {
                let event =
                    tokio::time::timeout(std::time::Duration::from_secs(10), subscription.next()).await.map_err(
                        |_| anyhow::anyhow!("no presence came within 10 s: is the cluster up? (`chorus status` says)"),
                    )??;
                if let SubscriptionEvent::Presence(users) = event {
                    break users;
                }
            };
            for p in presence {
                let offline = p.state == chorus_proto::client::PresenceState::Offline as i32;
                if json {
                    out!(
                        "{}",
                        json!({"user": p.user, "state": presence_name(p.state), "status_text": p.status_text,
                               "last_active_ms": p.last_active_ms})
                    );
                } else if all || !offline {
                    out!("{}", describe_presence(&p));
                }
            }
        }
        Command::Read { room, seq, unread, share } => {
            let marked = client.mark_read(&room, seq.unwrap_or(0), unread, share).await?;
            if json {
                out!(
                    "{}",
                    json!({"room": marked.room, "read_seq": marked.read_seq, "unread": marked.unread,
                           "mentions": marked.mentions})
                );
            } else {
                out!(
                    "{}: read up to #{} ({} unread, {} mentions)",
                    marked.room,
                    marked.read_seq,
                    marked.unread,
                    marked.mentions
                );
            }
        }
        Command::Sync { messages } => {
            let caught = client.sync(&[], messages).await?;
            for update in caught.rooms {
                let Some(room) = update.room else { continue };
                let state = member_state(room.membership);
                if json {
                    let messages: Vec<_> = update.messages.iter().map(message_json).collect();
                    out!(
                        "{}",
                        json!({"room": room.name, "state": state, "last_seq": room.last_seq,
                               "last_ts_ms": room.last_ts_ms, "read_seq": update.read_seq, "unread": update.unread,
                               "mentions": update.mentions, "limited": update.limited, "messages": messages})
                    );
                    continue;
                }
                let counts = match (update.unread, update.mentions) {
                    (0, _) if state == "joined" => String::new(),
                    (unread, 0) if state == "joined" => format!("{unread} unread"),
                    (unread, mentions) if state == "joined" => format!("{unread} unread, {mentions} mentioning you"),
                    _ => format!("({state})"),
                };
                out!("{:<40} {counts}", room.name);
                for message in &update.messages {
                    print_message(message, false);
                }
            }
        }
        Command::Dm { user, text } => {
            let direct = client.open_direct(&user).await?;
            match text {
                Some(text) => {
                    let receipt = send_joining(client, store, &direct.room, text).await?;
                    if json {
                        out!("{}", json!({"room": direct.room, "seq": receipt.seq, "ts_ms": receipt.ts_ms}));
                    } else {
                        out!("sent to {user} as #{}", receipt.seq);
                    }
                }
                None => {
                    use std::io::IsTerminal;
                    if !json && std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
                        chat::run(client, store, Some(&direct.room)).await?
                    } else {
                        chat_in(client, store, &direct.room, &format!("direct messages with {user}")).await?
                    }
                }
            }
        }
        Command::Admin(admin) => self::admin(client, admin, json).await?,
        Command::Tail { room, from } => {
            let after = match from {
                Some(n) => n.saturating_sub(1),
                None => client.history(&room, HistoryFrom::Before(u64::MAX), 1, true).await?.last_seq,
            };
            follow(client, &room, after, json).await?;
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
        Command::Rooms { after, limit, mine } => {
            let list = client.list_rooms_of(&after, limit, mine).await?;
            if json {
                for r in &list.rooms {
                    out!(
                        "{}",
                        json!({"room": r.name, "shard": r.shard, "last_seq": r.last_seq, "first_seq": r.first_seq,
                               "creator": r.creator, "created_ts_ms": r.created_ts_ms, "metadata": r.metadata,
                               "visibility": visibility_name(r.visibility), "members": r.member_count,
                               "membership": member_state(r.membership), "role": role_name(r.role),
                               "direct_users": r.direct_users})
                    );
                }
            } else {
                let me = client.user().unwrap_or_default();
                out!("{:<36} {:<8} {:>8} {:>8} {:<8} LAST MESSAGE", "ROOM", "KIND", "MEMBERS", "MESSAGES", "YOU");
                for r in &list.rooms {
                    let last = if r.last_seq == 0 { "-".to_string() } else { format_time(r.last_ts_ms) };
                    let name = match r.direct_users.iter().find(|u| **u != me) {
                        Some(other) => format!("@{other}"),
                        None => r.name.clone(),
                    };
                    let you = match member_state(r.membership) {
                        "joined" => role_name(r.role),
                        other => other,
                    };
                    out!(
                        "{:<36} {:<8} {:>8} {:>8} {:<8} {}",
                        name,
                        visibility_name(r.visibility),
                        r.member_count,
                        r.last_seq,
                        you,
                        last
                    );
                }
                if list.more {
                    out!("(more: --after {})", list.next_after);
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
        Command::Chat { room, plain } => {
            use std::io::IsTerminal;
            let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
            if plain || json || !terminal {
                let Some(room) = room else { bail!("line mode (--plain, or no terminal) needs a ROOM") };
                ensure_room(client, &room, false).await?;
                chat_in(client, store, &room, &room).await?
            } else {
                chat::run(client, store, room.as_deref()).await?
            }
        }
        Command::Bench(args) => bench(client.options(), *args, json).await?,
    }
    Ok(())
}

fn say_signed_in(session: &chorus_client::SessionTokens, json: bool, what: &str) {
    if json {
        out!("{}", json!({"user": session.user, "session_id": session.session_id, "admin": session.admin}));
    } else {
        out!("{what} as {}", session.user);
    }
}

fn say_changed(changed: chorus_proto::client::MembershipChanged, json: bool, what: &str) {
    if json {
        out!("{}", json!({"room": changed.room, "seq": changed.seq, "ts_ms": changed.ts_ms}));
    } else if changed.ts_ms == 0 {
        out!("{what} (already so)");
    } else {
        out!("{what} (#{})", changed.seq);
    }
}

fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Owner) => "owner",
        Ok(Role::Admin) => "admin",
        _ => "member",
    }
}

fn member_state(state: i32) -> &'static str {
    match chorus_proto::client::MembershipState::try_from(state) {
        Ok(chorus_proto::client::MembershipState::Joined) => "joined",
        Ok(chorus_proto::client::MembershipState::Invited) => "invited",
        Ok(chorus_proto::client::MembershipState::Banned) => "banned",
        _ => "-",
    }
}

fn visibility_name(visibility: i32) -> &'static str {
    match Visibility::try_from(visibility) {
        Ok(Visibility::Private) => "private",
        Ok(Visibility::Direct) => "direct",
        _ => "public",
    }
}

/// Sends, joining the room first if it is public and the user is not in it yet (as a chat
/// user expects when they write to a channel they can see). The `client_seq` comes from the
/// profile's send log: a send whose outcome stays unknown keeps it, and running the same send
/// again reuses it, so that the message is appended once however often it is tried.
async fn send_joining(
    client: &Client,
    store: &ProfileStore,
    room: &str,
    text: String,
) -> anyhow::Result<chorus_client::SendReceipt> {
    let log = store.send_log();
    let client_seq = log.reserve(room, text.as_bytes())?;
    let outcome = match client.send_with_seq(room, text.clone(), client_seq).await {
        Err(e) if e.code() == Some("not_member") => {
            client.join(room).await.with_context(|| format!("joining {room}"))?;
            client.send_with_seq(room, text, client_seq).await
        }
        other => other,
    };
    match outcome {
        Ok(receipt) => {
            log.settle(client_seq)?;
            Ok(receipt)
        }
        Err(e) if !e.indeterminate() => {
            log.settle(client_seq)?;
            Err(e.into())
        }
        Err(e) => Err(anyhow::Error::new(e).context(
            "the outcome of this send is unknown: run the same command again to learn it \
             (it will not be sent twice)",
        )),
    }
}

async fn admin(client: &Client, command: AdminCommand, json: bool) -> anyhow::Result<()> {
    match command {
        AdminCommand::User(AdminUserCommand::Add { user, admin, password }) => {
            let password = read_password(&password, &format!("password for {user}: "))?;
            client.admin_create_user(&user, &password, admin).await?;
            if !json {
                out!("created {}{user}", if admin { "admin " } else { "" });
            }
        }
        AdminCommand::User(AdminUserCommand::Disable { user }) => {
            client.admin_set_user_disabled(&user, true).await?;
            if !json {
                out!("disabled {user}: its sessions have ended");
            }
        }
        AdminCommand::User(AdminUserCommand::Enable { user }) => {
            client.admin_set_user_disabled(&user, false).await?;
            if !json {
                out!("enabled {user}");
            }
        }
        AdminCommand::User(AdminUserCommand::List) => {
            let mut after = String::new();
            loop {
                let page = client.admin_list_users(&after, 1000).await?;
                for u in &page.users {
                    if json {
                        out!(
                            "{}",
                            json!({"user": u.user, "created_ms": u.created_ms, "disabled": u.disabled,
                                   "admin": u.admin, "external_issuer": u.external_issuer})
                        );
                    } else {
                        let mut notes = Vec::new();
                        if u.admin {
                            notes.push("admin".to_string());
                        }
                        if u.disabled {
                            notes.push("disabled".to_string());
                        }
                        if !u.external_issuer.is_empty() {
                            notes.push(format!("via {}", u.external_issuer));
                        }
                        out!("{:<32} since {}  {}", u.user, format_time(u.created_ms), notes.join(", "));
                    }
                }
                match (page.more, page.users.last()) {
                    (true, Some(last)) => after = last.user.clone(),
                    _ => break,
                }
            }
        }
        AdminCommand::RotateKey => {
            client.admin_rotate_signing_key().await?;
            if !json {
                out!("new access tokens are signed with a new key");
            }
        }
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
        Some(BenchMode::Flood { rate, duration, connections, inflight, size }) => {
            let config = bench::FloodConfig { rate, duration, connections, inflight, size };
            let report = bench::run_flood(options, &config).await?;
            if json {
                out!("{}", serde_json::to_string(&report)?);
            } else {
                out!(
                    "victim at {rate} msgs/s: ack p50 {} µs, p99 {} µs alone; p50 {} µs, p99 {} µs during the flood \
                     ({:.2}× p99)\nflood: {:.0} acknowledged and {:.0} refused (rate_limited) sends/s; victim errors: {:?}",
                    report.alone.p50_us,
                    report.alone.p99_us,
                    report.flooded.p50_us,
                    report.flooded.p99_us,
                    report.p99_ratio,
                    report.flood_acked_per_s,
                    report.flood_refused_per_s,
                    report.victim_errors
                );
            }
        }
        Some(BenchMode::Presence {
            users,
            watch,
            change_every,
            duration,
            oidc_key,
            oidc_issuer,
            oidc_audience,
            idle_timeout,
            node_pids,
        }) => {
            let oidc_key_der =
                std::fs::read(&oidc_key).with_context(|| format!("reading --oidc-key {}", oidc_key.display()))?;
            let config = bench::presence::PresenceConfig {
                users,
                watch,
                change_every,
                duration,
                oidc_key_der,
                oidc_issuer,
                oidc_audience,
                idle_timeout,
                node_pids,
                progress: !json,
            };
            let report = bench::presence::run_presence(options, &config).await?;
            if json {
                out!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.human());
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

/// How a membership event reads in a room's timeline.
fn describe_event(m: &Message) -> Option<String> {
    use chorus_proto::client::MessageKind as K;
    let reason = String::from_utf8_lossy(&m.body);
    let because = if reason.is_empty() { String::new() } else { format!(": {reason}") };
    Some(match K::try_from(m.kind).unwrap_or(K::Text) {
        K::Text => return None,
        K::Joined => format!("{} joined", m.sender),
        K::Left => format!("{} left", m.sender),
        K::Invited => format!("{} invited {}", m.sender, m.target),
        K::Kicked => format!("{} removed {}{because}", m.sender, m.target),
        K::Banned => format!("{} banned {}{because}", m.sender, m.target),
        K::Unbanned => format!("{} lifted the ban of {}", m.sender, m.target),
        K::RoleChanged => format!("{} made {} {}", m.sender, m.target, role_name(m.role)),
    })
}

fn message_json(m: &Message) -> serde_json::Value {
    let body = String::from_utf8_lossy(&m.body);
    let kind = chorus_proto::client::MessageKind::try_from(m.kind)
        .map(|k| k.as_str_name().trim_start_matches("MESSAGE_KIND_").to_lowercase())
        .unwrap_or_else(|_| "unknown".into());
    json!({"room": m.room, "seq": m.seq, "ts_ms": m.ts_ms, "sender": m.sender, "body": body,
           "client_seq": m.client_seq, "kind": kind, "target": m.target})
}

fn print_message(m: &Message, json: bool) {
    let body = String::from_utf8_lossy(&m.body);
    if json {
        out!("{}", message_json(m));
    } else if let Some(event) = describe_event(m) {
        out!("#{:<6} {}  -- {event} --", m.seq, format_time(m.ts_ms));
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
        SubscriptionEvent::Presence(users) if json => {
            for p in users {
                out!(
                    "{}",
                    json!({"presence": p.user, "state": presence_name(p.state), "status_text": p.status_text,
                           "last_active_ms": p.last_active_ms})
                );
            }
        }
        SubscriptionEvent::Presence(users) => {
            for p in users {
                out!("-- {} --", describe_presence(p));
            }
        }
        SubscriptionEvent::Typing { room, users } if json => out!("{}", json!({"typing": users, "room": room})),
        SubscriptionEvent::Typing { users, .. } if users.is_empty() => {}
        SubscriptionEvent::Typing { users, .. } => out!("-- {} typing... --", users.join(", ")),
    }
}

fn presence_name(state: i32) -> &'static str {
    match chorus_proto::client::PresenceState::try_from(state) {
        Ok(chorus_proto::client::PresenceState::Online) => "online",
        Ok(chorus_proto::client::PresenceState::Idle) => "idle",
        _ => "offline",
    }
}

fn describe_presence(p: &chorus_proto::client::UserPresence) -> String {
    let mut text = format!("{} is {}", p.user, presence_name(p.state));
    if !p.status_text.is_empty() {
        text.push_str(&format!(" ({})", p.status_text));
    }
    if p.state == chorus_proto::client::PresenceState::Offline as i32 && p.last_active_ms > 0 {
        text.push_str(&format!(", last active {}", format_time(p.last_active_ms)));
    }
    text
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

async fn chat_in(client: &Client, store: &ProfileStore, room: &str, title: &str) -> anyhow::Result<()> {
    let user = client.user().unwrap_or_default();
    let recent = match client.history(room, HistoryFrom::Before(u64::MAX), 10, true).await {
        Err(e) if e.code() == Some("not_member") => {
            client.join(room).await.with_context(|| format!("joining {room}"))?;
            client.history(room, HistoryFrom::Before(u64::MAX), 10, true).await?
        }
        other => other?,
    };
    out!("-- {title}: you are {user}; type a message and press enter, /quit to leave --");
    for m in &recent.messages {
        print_message(m, false);
    }
    // Who is here, and then who comes and goes (members' presence) and who types.
    let members: Vec<String> = match client.all_members(room).await {
        Ok(members) => members
            .into_iter()
            .filter(|m| m.state == chorus_proto::client::MembershipState::Joined as i32 && m.user != user)
            .map(|m| m.user)
            .take(1000)
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut subscription = client.subscribe_with([(room.to_owned(), recent.last_seq)], members);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut first_presence = true;
    let mut last_ping: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            event = subscription.next() => {
                let event = event?;
                match &event {
                    // The first snapshot: one line for who is around.
                    SubscriptionEvent::Presence(users) if std::mem::take(&mut first_presence) => {
                        let here: Vec<String> = users
                            .iter()
                            .filter(|p| p.state != chorus_proto::client::PresenceState::Offline as i32)
                            .map(|p| format!("{} ({})", p.user, presence_name(p.state)))
                            .collect();
                        if !here.is_empty() {
                            out!("-- here: {} --", here.join(", "));
                        }
                        continue;
                    }
                    // After a reconnection the snapshot comes again: only changes are news.
                    SubscriptionEvent::Resumed { .. } => first_presence = true,
                    _ => {}
                }
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
                // Sending is activity: tell the cluster, at most once a minute.
                if last_ping.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60)) {
                    last_ping = Some(std::time::Instant::now());
                    let _ = client.set_presence(false, None).await;
                }
                // The message comes back through the subscription, in its place in the room.
                if let Err(e) = send_joining(client, store, room, line.to_owned()).await {
                    let hint = e.downcast_ref::<ClientError>().map(indeterminate_hint).unwrap_or("");
                    eprintln!("chorus: not sent: {e:#}{hint}");
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
        let name = if shard.shard == s.meta_shard { "meta".to_string() } else { shard.shard.to_string() };
        out!("{:<6} {:<7} {:<6} {:<8} {}", name, leader, shard.term, shard.committed, replicas.join(" | "));
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
