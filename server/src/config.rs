//! chorusd's configuration: command-line flags, `CHORUS_*` environment variables and a TOML
//! file (`--config`), in that order of precedence, over built-in defaults.
//!
//! Every key has the same name everywhere: `--data-dir`, `CHORUS_DATA_DIR`, `data_dir = ...`,
//! and is declared once, in [`RunArgs`], which clap and serde both read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chorus_raft::{Limits, NodeId, RaftTuning};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::rate_limit::RateSpec;

/// Defaults, in one place (also quoted in `--help`).
pub mod defaults {
    pub const NODE_ID: u64 = 1;
    pub const CLIENT_PORT_BASE: u16 = 7400;
    pub const WEB_PORT_BASE: u16 = 7500;
    pub const PEER_PORT_BASE: u16 = 7300;
    pub const CLUSTER_TOKEN: &str = "chorus";
    pub const SHARD_COUNT: u32 = 16;
    pub const REPLICATION_FACTOR: usize = 3;
    pub const MAX_BODY_BYTES: usize = 64 * 1024;
    pub const REQUEST_TIMEOUT_MS: u64 = 5_000;
    pub const HEARTBEAT_MS: u64 = 250;
    pub const ELECTION_TIMEOUT_MS: u64 = 500;
    pub const LEADER_BALANCE_MS: u64 = 5000;
    pub const SNAPSHOT_EVERY_ENTRIES: u64 = 20_000;
    pub const SNAPSHOT_LOG_PERCENT: u64 = 50;
    /// The log may hold up to this percent of a shard's size (10×) before a snapshot.
    pub const MAX_SNAPSHOT_LOG_PERCENT: u64 = 1_000;
    pub const LOG_KEPT_AFTER_SNAPSHOT: u64 = 5_000;
    pub const MAX_CONNECTIONS: usize = 4096;
    /// Concurrent streams per connection. A connection holds at most
    /// `MAX_SUBSCRIPTIONS_PER_CONNECTION` (16) subscriptions, each a stream for as long as it
    /// lives; the rest leave room, even then, for the reference client's 4 send batches and its
    /// requests (a Hello renewing the sign-in among them); more wait for a free stream. QUIC
    /// makes room for every stream the peer may open up front, per connection: 256 cost
    /// ~20 KiB of each idle connection, 100 ~6 KiB, 32 ~3.5 KiB (docs/BENCHMARKS.md, presence).
    pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
    // A connection full of subscriptions must still be able to renew its sign-in and send.
    const _: () =
        assert!(MAX_STREAMS_PER_CONNECTION as usize >= crate::front_door::MAX_SUBSCRIPTIONS_PER_CONNECTION + 8);
    pub const SHUTDOWN_GRACE_MS: u64 = 10_000;
    pub const LOG: &str = "info,openraft=warn";
    pub const ACCESS_TOKEN_TTL_S: u64 = 900;
    pub const SESSION_TTL_DAYS: u64 = 30;
    pub const OIDC_ALGORITHMS: &str = "RS256,ES256,EdDSA";
    pub const OIDC_USERNAME_CLAIM: &str = "preferred_username";
    pub const RATE_SENDS_PER_USER: &str = "50/s,200";
    pub const RATE_REQUESTS_PER_CONNECTION: &str = "100/s,200";
    pub const RATE_ROOMS_PER_USER: &str = "10/min,20";
    pub const RATE_FAILED_LOGINS_PER_USER: &str = "5/min,10";
    pub const RATE_FAILED_LOGINS_PER_ADDRESS: &str = "30/min,60";
    pub const RATE_REGISTRATIONS_PER_ADDRESS: &str = "10/min,20";
    pub const NOTIFY_DELAY_MS: u64 = 60_000;
}

/// Who may create an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Only admins create accounts (`chorus admin user add`).
    Closed,
    /// Anyone with the registration token (`registration_token`).
    Token,
    /// Anyone.
    Open,
}

impl Registration {
    pub fn as_str(self) -> &'static str {
        match self {
            Registration::Closed => "closed",
            Registration::Token => "token",
            Registration::Open => "open",
        }
    }
}

/// A secret setting: never printed, in logs or anywhere else.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "chorusd",
    version,
    about = "Chorus node: a Raft-replicated chat log served over QUIC",
    long_about = "Chorus node: a Raft-replicated chat log served over QUIC.\n\n\
        Every setting can be given as a flag, as a CHORUS_* environment variable (e.g. \
        --data-dir / CHORUS_DATA_DIR), or as a key of the TOML file named by --config (e.g. \
        data_dir = \"/var/lib/chorus\"). Flags win over the environment, which wins over the file.\n\n\
        With no settings at all, chorusd runs a single-node cluster on 127.0.0.1 (clients: port \
        7401) with its data in ./chorus-data/node-1.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a self-signed TLS certificate and key (PEM) and print its SHA-256 fingerprint.
    GenCert(GenCertArgs),
    /// The cluster's certificate authority, which peers authenticate each other with.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a cluster CA (ca.pem, and ca.key readable by its owner only) in DIR.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Issue node NODE-ID's peer certificate (node.pem, node.key, and a copy of ca.pem) into
    /// OUT, signed by the CA in DIR.
    Issue {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long)]
        node_id: NodeId,
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct GenCertArgs {
    /// Directory to write cert.pem, key.pem and fingerprint into.
    #[arg(long)]
    pub out: PathBuf,
    /// Host names and IP addresses the certificate is valid for (repeatable).
    #[arg(long = "san", default_values = ["localhost", "127.0.0.1"])]
    pub sans: Vec<String>,
}

/// Every setting of a node, as a flag, an environment variable or a key of the `--config` file.
#[derive(Debug, Args, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunArgs {
    /// TOML file with any of the settings below (keys are the flag names with '_' for '-').
    #[arg(long, env = "CHORUS_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// This node's id: a positive integer, unique in the cluster and never reused.
    /// [default: 1]
    #[arg(long, env = "CHORUS_NODE_ID")]
    pub node_id: Option<NodeId>,

    /// Where this node keeps its database, snapshots and generated TLS certificate.
    /// [default: ./chorus-data/node-<node-id>]
    #[arg(long, env = "CHORUS_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// UDP address the QUIC client endpoint listens on. [default: 127.0.0.1:<7400 + node-id>]
    #[arg(long, env = "CHORUS_CLIENT_ADDR", value_name = "HOST:PORT")]
    pub client_addr: Option<SocketAddr>,

    /// TCP address of the HTTPS endpoint (health checks `/livez` and `/readyz`), with the
    /// client endpoint's certificate; `off` serves none. [default: 127.0.0.1:<7500 + node-id>]
    #[arg(long, env = "CHORUS_WEB_ADDR", value_name = "HOST:PORT|off")]
    pub web_addr: Option<String>,

    /// TCP address the gRPC peer endpoint listens on. [default: the address of this node in
    /// --initial-cluster, else 127.0.0.1:<7300 + node-id>]
    #[arg(long, env = "CHORUS_PEER_ADDR", value_name = "HOST:PORT")]
    pub peer_addr: Option<SocketAddr>,

    /// Client address other nodes and clients are told to use, if not --client-addr (e.g. when
    /// listening on 0.0.0.0).
    #[arg(long, env = "CHORUS_ADVERTISE_CLIENT_ADDR", value_name = "HOST:PORT")]
    pub advertise_client_addr: Option<String>,

    /// Every node of the cluster as id=host:port (peer addresses), comma-separated, the same on
    /// every node; e.g. 1=10.0.0.1:7301,2=10.0.0.2:7302,3=10.0.0.3:7303.
    /// [default: this node alone, at its peer address]
    #[arg(long, env = "CHORUS_INITIAL_CLUSTER", value_name = "ID=HOST:PORT,...")]
    pub initial_cluster: Option<String>,

    /// A name that, with --initial-cluster, --shard-count and --replication-factor, makes up
    /// the cluster id: two clusters with different tokens never mix data. [default: chorus]
    #[arg(long, env = "CHORUS_CLUSTER_TOKEN")]
    pub cluster_token: Option<String>,

    /// Number of shards (Raft groups). Fixed when the cluster is created. [default: 16]
    #[arg(long, env = "CHORUS_SHARD_COUNT")]
    pub shard_count: Option<u32>,

    /// Replicas per shard (at most the number of nodes). [default: 3, or the number of nodes if
    /// smaller]
    #[arg(long, env = "CHORUS_REPLICATION_FACTOR")]
    pub replication_factor: Option<usize>,

    /// TLS certificate chain (PEM) for the client endpoint. [default: a self-signed certificate
    /// generated once into <data-dir>/tls/, whose SHA-256 fingerprint is logged and written to
    /// <data-dir>/tls/fingerprint]
    #[arg(long, env = "CHORUS_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "CHORUS_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Largest message body accepted, in bytes (at most 1 MiB). [default: 65536]
    #[arg(long, env = "CHORUS_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,

    /// How long a request may wait for a shard leader (forwarding and retries included) before
    /// failing with `unavailable`, in ms. [default: 5000]
    #[arg(long, env = "CHORUS_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,

    /// How often each node sends each peer a heartbeat naming the shards it leads, in ms (one
    /// RPC per peer, whatever the shard count). A follower calls an election for a shard that
    /// nobody claimed for a random election timeout. [default: 250]
    #[arg(long, env = "CHORUS_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,

    /// Minimum Raft election timeout, in ms; the actual timeout is random in [t, 2t).
    /// [default: 500]
    #[arg(long, env = "CHORUS_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,

    /// How often this node looks for shards it should lead and asks their current leader to
    /// hand them back, in ms; 0 turns it off. Each shard prefers the first node of its
    /// placement, so leadership that piled up on the nodes that stayed up while others
    /// restarted spreads out again. [default: 5000]
    #[arg(long, env = "CHORUS_LEADER_BALANCE_MS")]
    pub leader_balance_ms: Option<u64>,

    /// Build a shard snapshot after at least this many applied entries. [default: 20000]
    #[arg(long, env = "CHORUS_SNAPSHOT_EVERY_ENTRIES")]
    pub snapshot_every_entries: Option<u64>,

    /// ...and once the log written since the last snapshot is this many percent of that
    /// snapshot's size, so that large shards are not copied every few thousand entries; 0 for
    /// `--snapshot-every-entries` alone, at most 1000. [default: 50]
    #[arg(long, env = "CHORUS_SNAPSHOT_LOG_PERCENT")]
    pub snapshot_log_percent: Option<u64>,

    /// Log entries kept behind the latest snapshot, so lagging followers can catch up from the
    /// log. [default: 5000]
    #[arg(long, env = "CHORUS_LOG_KEPT_AFTER_SNAPSHOT")]
    pub log_kept_after_snapshot: Option<u64>,

    /// Most concurrent client connections. [default: 4096]
    #[arg(long, env = "CHORUS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Most concurrent streams per client connection: subscriptions (at most 16) and requests;
    /// keep room above 16 for requests. [default: 32]
    #[arg(long, env = "CHORUS_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<u32>,

    /// On SIGTERM/ctrl-c, how long in-flight requests may take to finish, in ms. [default: 10000]
    #[arg(long, env = "CHORUS_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,

    /// Log filter (tracing EnvFilter syntax, e.g. "debug" or "chorus_server=debug,info").
    /// [default: info,openraft=warn]
    #[arg(long, env = "CHORUS_LOG")]
    pub log: Option<String>,

    /// Who may create an account: closed (only admins), token (with --registration-token) or
    /// open. [default: closed]
    #[arg(long, env = "CHORUS_REGISTRATION", value_enum)]
    pub registration: Option<Registration>,

    /// The token Register needs when --registration is token. A secret: never logged.
    #[arg(long, env = "CHORUS_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<Secret>,

    /// How long an access token is valid, in seconds (clients refresh it by themselves).
    /// [default: 900]
    #[arg(long, env = "CHORUS_ACCESS_TOKEN_TTL_S")]
    pub access_token_ttl_s: Option<u64>,

    /// How long a session (a signed-in device) lasts unused, in days: each day it is used
    /// extends it. [default: 30]
    #[arg(long, env = "CHORUS_SESSION_TTL_DAYS")]
    pub session_ttl_days: Option<u64>,

    /// Accept tokens of this external identity provider (OpenID Connect) in LoginExternal: its
    /// issuer (the tokens' `iss`). Needs --oidc-audience and --oidc-jwks.
    #[arg(long, env = "CHORUS_OIDC_ISSUER")]
    pub oidc_issuer: Option<String>,

    /// The audience the provider's tokens must name (`aud`): this service's client id there.
    #[arg(long, env = "CHORUS_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,

    /// The provider's signing keys: a JWKS file, or an https:// URL (http:// only on loopback)
    /// that is fetched at start and again every 10 minutes or on an unknown key id.
    #[arg(long, env = "CHORUS_OIDC_JWKS")]
    pub oidc_jwks: Option<String>,

    /// Signature algorithms accepted from the provider, comma-separated.
    /// [default: RS256,ES256,EdDSA]
    #[arg(long, env = "CHORUS_OIDC_ALGORITHMS")]
    pub oidc_algorithms: Option<String>,

    /// The token claim that names a new account made on an external user's first sign-in.
    /// [default: preferred_username]
    #[arg(long, env = "CHORUS_OIDC_USERNAME_CLAIM")]
    pub oidc_username_claim: Option<String>,

    /// Messages one user may send through this node: RATE/s or RATE/min, then a comma and the
    /// burst, e.g. 50/s,200; 0 for no limit. [default: 50/s,200]
    #[arg(long, env = "CHORUS_RATE_SENDS_PER_USER")]
    pub rate_sends_per_user: Option<RateSpec>,

    /// Requests of any kind one client connection may make (a connection over it is refused,
    /// and takes no new request until the wait it was told has passed). [default: 100/s,200]
    #[arg(long, env = "CHORUS_RATE_REQUESTS_PER_CONNECTION")]
    pub rate_requests_per_connection: Option<RateSpec>,

    /// Rooms (and direct-message rooms) one user may create. [default: 10/min,20]
    #[arg(long, env = "CHORUS_RATE_ROOMS_PER_USER")]
    pub rate_rooms_per_user: Option<RateSpec>,

    /// Failed sign-ins per user name. [default: 5/min,10]
    #[arg(long, env = "CHORUS_RATE_FAILED_LOGINS_PER_USER")]
    pub rate_failed_logins_per_user: Option<RateSpec>,

    /// Failed sign-ins per client IP address. [default: 30/min,60]
    #[arg(long, env = "CHORUS_RATE_FAILED_LOGINS_PER_ADDRESS")]
    pub rate_failed_logins_per_address: Option<RateSpec>,

    /// Accounts registered per client IP address. [default: 10/min,20]
    #[arg(long, env = "CHORUS_RATE_REGISTRATIONS_PER_ADDRESS")]
    pub rate_registrations_per_address: Option<RateSpec>,

    /// The cluster CA's certificate (PEM), which every peer's certificate must be issued by.
    /// With --peer-cert and --peer-key; see also --peer-ca-dir. [default: with neither, a
    /// single-node cluster makes its own CA in <data-dir>/tls/]
    #[arg(long, env = "CHORUS_PEER_CA", value_name = "FILE")]
    pub peer_ca: Option<PathBuf>,

    /// This node's peer certificate (PEM), issued by the cluster CA for node-<id>.chorus
    /// (`chorusd ca issue`).
    #[arg(long, env = "CHORUS_PEER_CERT", value_name = "FILE")]
    pub peer_cert: Option<PathBuf>,

    /// The private key (PEM) of --peer-cert.
    #[arg(long, env = "CHORUS_PEER_KEY", value_name = "FILE")]
    pub peer_key: Option<PathBuf>,

    /// A directory with the cluster CA (ca.pem and ca.key, from `chorusd ca init`): the node
    /// issues its own peer certificate from it at first start, into <data-dir>/tls/.
    #[arg(long, env = "CHORUS_PEER_CA_DIR", value_name = "DIR")]
    pub peer_ca_dir: Option<PathBuf>,

    /// Notify users who are away: POST a JSON notification to this URL (https://, or http://
    /// to this machine) for each mention of, or direct message to, a user who has not read it
    /// and is not online when it falls due (see --notify-delay-ms). Give every node the same.
    #[arg(long, env = "CHORUS_NOTIFY_WEBHOOK_URL", value_name = "URL")]
    pub notify_webhook_url: Option<String>,

    /// Signs each webhook POST (`Chorus-Signature`: HMAC-SHA256 of the timestamp and the body),
    /// so the receiver knows it came from this cluster. At least 16 characters. A secret:
    /// never logged.
    #[arg(long, env = "CHORUS_NOTIFY_WEBHOOK_SECRET", hide_env_values = true)]
    pub notify_webhook_secret: Option<Secret>,

    /// How long after its message a notification falls due: a user who reads the message, or
    /// comes online, before then is not notified. [default: 60000]
    #[arg(long, env = "CHORUS_NOTIFY_DELAY_MS")]
    pub notify_delay_ms: Option<u64>,
}

/// The `--config` file: the same keys as the flags, read by serde.
pub type FileConfig = RunArgs;

/// A configuration that cannot work, and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The resolved configuration of a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub advertise_client_addr: String,
    /// The HTTPS endpoint's address (`None`: off).
    pub web_addr: Option<SocketAddr>,
    /// Peer addresses of every node, by id.
    pub initial_cluster: BTreeMap<NodeId, String>,
    pub cluster_token: String,
    pub shard_count: u32,
    pub replication_factor: usize,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub limits: Limits,
    pub request_timeout: Duration,
    pub tuning: RaftTuning,
    /// How often to look for shards this node prefers to lead; `None`: never.
    pub leader_balance: Option<Duration>,
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub shutdown_grace: Duration,
    pub log: String,
    pub auth: AuthConfig,
    pub rate_limits: RateLimits,
    pub peer_tls: PeerTlsSource,
    /// Notifications for users who are away (`None`: none are sent).
    pub notify: Option<NotifyConfig>,
}

/// Where and when to notify users who are away (see `notify`).
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub url: String,
    pub secret: Option<Secret>,
    pub delay: Duration,
}

/// Accounts and sign-in.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub registration: Registration,
    pub registration_token: Option<Secret>,
    pub access_token_ttl: Duration,
    pub session_ttl: Duration,
    pub oidc: Option<OidcConfig>,
}

/// An external identity provider whose tokens LoginExternal accepts.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub username_claim: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

/// Token buckets for abuse limits (`None`: unlimited).
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    pub sends_per_user: Option<RateSpec>,
    pub requests_per_connection: Option<RateSpec>,
    pub rooms_per_user: Option<RateSpec>,
    pub failed_logins_per_user: Option<RateSpec>,
    pub failed_logins_per_address: Option<RateSpec>,
    pub registrations_per_address: Option<RateSpec>,
}

/// Where this node's peer TLS material (mutual TLS between nodes) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerTlsSource {
    /// The operator's files.
    Files { ca: PathBuf, cert: PathBuf, key: PathBuf },
    /// A CA directory (ca.pem, ca.key): the node issues its own certificate from it once.
    CaDir(PathBuf),
    /// A single-node cluster with no settings: its own CA, made once in the data dir.
    Own,
}

impl RunArgs {
    /// Reads the config file (if any) and resolves every setting.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        resolve(self, file)
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_initial_cluster(spec: &str) -> Result<BTreeMap<NodeId, String>, ConfigError> {
    let mut nodes = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::Invalid(format!("initial cluster entry {part:?} is not id=host:port")))?;
        let id: NodeId = id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(|| {
            ConfigError::Invalid(format!("node id {id:?} in the initial cluster is not a positive integer"))
        })?;
        let addr = addr.trim();
        if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
            return Err(ConfigError::Invalid(format!("address {addr:?} of node {id} is not host:port")));
        }
        if nodes.insert(id, addr.to_owned()).is_some() {
            return Err(ConfigError::Invalid(format!("node {id} appears twice in the initial cluster")));
        }
    }
    if nodes.is_empty() {
        return Err(ConfigError::Invalid("the initial cluster is empty".into()));
    }
    Ok(nodes)
}

fn resolve(args: RunArgs, file: FileConfig) -> Result<NodeConfig, ConfigError> {
    use defaults as d;
    let auth = resolve_auth(&args, &file)?;
    let notify = resolve_notify(&args, &file)?;
    let node_id = args.node_id.or(file.node_id).unwrap_or(d::NODE_ID);
    if node_id == 0 {
        return Err(ConfigError::Invalid("node id must be a positive integer".into()));
    }
    let port_offset = u16::try_from(node_id).ok().filter(|o| *o < 100).unwrap_or(0);
    let initial_cluster = match args.initial_cluster.or(file.initial_cluster) {
        Some(spec) => parse_initial_cluster(&spec)?,
        None => {
            let peer = args.peer_addr.or(file.peer_addr).map(|a| a.to_string());
            let peer = peer.unwrap_or_else(|| format!("127.0.0.1:{}", d::PEER_PORT_BASE + port_offset));
            BTreeMap::from([(node_id, peer)])
        }
    };
    let Some(own_peer) = initial_cluster.get(&node_id) else {
        return Err(ConfigError::Invalid(format!(
            "node {node_id} is not in the initial cluster ({}); add it, or fix --node-id",
            initial_cluster.keys().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
        )));
    };
    let peer_addr = match args.peer_addr.or(file.peer_addr) {
        Some(a) => a,
        None => own_peer.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "this node's initial-cluster address {own_peer:?} is not an IP:port; set --peer-addr to listen on"
            ))
        })?,
    };
    let client_addr = args
        .client_addr
        .or(file.client_addr)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], d::CLIENT_PORT_BASE + port_offset)));
    let advertise_client_addr =
        args.advertise_client_addr.or(file.advertise_client_addr).unwrap_or_else(|| client_addr.to_string());
    if client_addr.ip().is_unspecified() && advertise_client_addr == client_addr.to_string() {
        return Err(ConfigError::Invalid(format!(
            "client address {client_addr} is not reachable as such: set --advertise-client-addr"
        )));
    }
    let web_addr = match args.web_addr.or(file.web_addr).as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], d::WEB_PORT_BASE + port_offset))),
        Some("off") => None,
        Some(addr) => Some(
            addr.parse()
                .map_err(|_| ConfigError::Invalid(format!("web address {addr:?} is not an IP:port (or off)")))?,
        ),
    };
    let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| format!("chorus-data/node-{node_id}").into());
    let shard_count = args.shard_count.or(file.shard_count).unwrap_or(d::SHARD_COUNT);
    if shard_count == 0 || shard_count > 65_536 {
        return Err(ConfigError::Invalid(format!("shard count must be between 1 and 65536, got {shard_count}")));
    }
    let replication_factor = match args.replication_factor.or(file.replication_factor) {
        Some(rf) if rf == 0 || rf > initial_cluster.len() => {
            return Err(ConfigError::Invalid(format!(
                "replication factor {rf} must be between 1 and the number of nodes ({})",
                initial_cluster.len()
            )));
        }
        Some(rf) => rf,
        None => d::REPLICATION_FACTOR.min(initial_cluster.len()),
    };
    let tls = match (args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key)) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => return Err(ConfigError::Invalid("--tls-cert and --tls-key go together".into())),
    };
    let limits = Limits {
        max_body_bytes: args.max_body_bytes.or(file.max_body_bytes).unwrap_or(d::MAX_BODY_BYTES),
        ..Limits::default()
    };
    limits.check().map_err(ConfigError::Invalid)?;
    let heartbeat = args.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(d::HEARTBEAT_MS);
    let election = args.election_timeout_ms.or(file.election_timeout_ms).unwrap_or(d::ELECTION_TIMEOUT_MS);
    if heartbeat == 0 || election < 2 * heartbeat {
        return Err(ConfigError::Invalid(format!(
            "the election timeout ({election} ms) must be at least twice the heartbeat ({heartbeat} ms)"
        )));
    }
    let snapshot_log_percent =
        args.snapshot_log_percent.or(file.snapshot_log_percent).unwrap_or(d::SNAPSHOT_LOG_PERCENT);
    if snapshot_log_percent > d::MAX_SNAPSHOT_LOG_PERCENT {
        return Err(ConfigError::Invalid(format!(
            "snapshot_log_percent {snapshot_log_percent} would let the log grow to {}× a shard's size before \
             it is purged; at most {} is allowed",
            snapshot_log_percent / 100,
            d::MAX_SNAPSHOT_LOG_PERCENT
        )));
    }
    let tuning = RaftTuning {
        // openraft's tick (election checks every 1.5 of it) and AppendEntries timeout.
        heartbeat_interval_ms: heartbeat.min(200),
        leader_heartbeat_ms: heartbeat,
        election_timeout_min_ms: election,
        election_timeout_max_ms: election * 2,
        snapshot_every_entries: args
            .snapshot_every_entries
            .or(file.snapshot_every_entries)
            .unwrap_or(d::SNAPSHOT_EVERY_ENTRIES)
            .max(1),
        snapshot_log_percent,
        node_liveness: true,
        log_entries_kept_after_snapshot: args
            .log_kept_after_snapshot
            .or(file.log_kept_after_snapshot)
            .unwrap_or(d::LOG_KEPT_AFTER_SNAPSHOT),
        ..RaftTuning::default()
    };
    tuning.config(0).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let rate =
        |flag: &Option<RateSpec>, key: &Option<RateSpec>, default: &str| -> Result<Option<RateSpec>, ConfigError> {
            let spec = match flag.or(*key) {
                Some(spec) => spec,
                None => default.parse().map_err(ConfigError::Invalid)?,
            };
            Ok(spec.enabled())
        };
    let rate_limits = RateLimits {
        sends_per_user: rate(&args.rate_sends_per_user, &file.rate_sends_per_user, d::RATE_SENDS_PER_USER)?,
        requests_per_connection: rate(
            &args.rate_requests_per_connection,
            &file.rate_requests_per_connection,
            d::RATE_REQUESTS_PER_CONNECTION,
        )?,
        rooms_per_user: rate(&args.rate_rooms_per_user, &file.rate_rooms_per_user, d::RATE_ROOMS_PER_USER)?,
        failed_logins_per_user: rate(
            &args.rate_failed_logins_per_user,
            &file.rate_failed_logins_per_user,
            d::RATE_FAILED_LOGINS_PER_USER,
        )?,
        failed_logins_per_address: rate(
            &args.rate_failed_logins_per_address,
            &file.rate_failed_logins_per_address,
            d::RATE_FAILED_LOGINS_PER_ADDRESS,
        )?,
        registrations_per_address: rate(
            &args.rate_registrations_per_address,
            &file.rate_registrations_per_address,
            d::RATE_REGISTRATIONS_PER_ADDRESS,
        )?,
    };
    let peer_tls = match (
        args.peer_ca.clone().or(file.peer_ca.clone()),
        args.peer_cert.clone().or(file.peer_cert.clone()),
        args.peer_key.clone().or(file.peer_key.clone()),
        args.peer_ca_dir.clone().or(file.peer_ca_dir.clone()),
    ) {
        (Some(ca), Some(cert), Some(key), None) => PeerTlsSource::Files { ca, cert, key },
        (None, None, None, Some(dir)) => PeerTlsSource::CaDir(dir),
        (None, None, None, None) if initial_cluster.len() == 1 => PeerTlsSource::Own,
        (None, None, None, None) => {
            return Err(ConfigError::Invalid(
                "nodes authenticate each other with mutual TLS: give every node the cluster's CA. Make one with \
                 `chorusd ca init --dir DIR`, then either pass --peer-ca-dir DIR (each node issues its own \
                 certificate from it at first start) or issue each node's certificate with `chorusd ca issue` and \
                 pass --peer-ca, --peer-cert and --peer-key"
                    .into(),
            ));
        }
        _ => {
            return Err(ConfigError::Invalid(
                "give either --peer-ca, --peer-cert and --peer-key together, or --peer-ca-dir alone".into(),
            ));
        }
    };
    Ok(NodeConfig {
        node_id,
        data_dir,
        client_addr,
        peer_addr,
        advertise_client_addr,
        web_addr,
        initial_cluster,
        cluster_token: args.cluster_token.or(file.cluster_token).unwrap_or_else(|| d::CLUSTER_TOKEN.into()),
        shard_count,
        replication_factor,
        tls,
        limits,
        request_timeout: Duration::from_millis(
            args.request_timeout_ms.or(file.request_timeout_ms).unwrap_or(d::REQUEST_TIMEOUT_MS).max(100),
        ),
        tuning,
        leader_balance: Some(args.leader_balance_ms.or(file.leader_balance_ms).unwrap_or(d::LEADER_BALANCE_MS))
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis),
        max_connections: args.max_connections.or(file.max_connections).unwrap_or(d::MAX_CONNECTIONS).max(1),
        max_streams_per_connection: args
            .max_streams_per_connection
            .or(file.max_streams_per_connection)
            .unwrap_or(d::MAX_STREAMS_PER_CONNECTION)
            .max(1),
        shutdown_grace: Duration::from_millis(
            args.shutdown_grace_ms.or(file.shutdown_grace_ms).unwrap_or(d::SHUTDOWN_GRACE_MS),
        ),
        log: args.log.or(file.log).unwrap_or_else(|| d::LOG.into()),
        auth,
        rate_limits,
        peer_tls,
        notify,
    })
}

fn resolve_notify(args: &RunArgs, file: &FileConfig) -> Result<Option<NotifyConfig>, ConfigError> {
    let url = args.notify_webhook_url.clone().or(file.notify_webhook_url.clone());
    let secret = args.notify_webhook_secret.clone().or(file.notify_webhook_secret.clone());
    let delay_ms = args.notify_delay_ms.or(file.notify_delay_ms);
    let Some(url) = url else {
        if secret.is_some() || delay_ms.is_some() {
            return Err(ConfigError::Invalid(
                "notify_webhook_secret and notify_delay_ms need notify_webhook_url".into(),
            ));
        }
        return Ok(None);
    };
    crate::http::check_url(&url, "notify_webhook_url").map_err(ConfigError::Invalid)?;
    reqwest::Url::parse(&url)
        .map_err(|e| ConfigError::Invalid(format!("notify_webhook_url {url:?} is not a URL: {e}")))?;
    if secret.as_ref().is_some_and(|s| s.expose().len() < 16) {
        return Err(ConfigError::Invalid("the notify webhook secret must be at least 16 characters".into()));
    }
    let delay_ms = delay_ms.unwrap_or(defaults::NOTIFY_DELAY_MS);
    if delay_ms == 0 || delay_ms > 86_400_000 {
        return Err(ConfigError::Invalid(format!(
            "notify_delay_ms must be between 1 and 86400000 (a day), got {delay_ms}"
        )));
    }
    Ok(Some(NotifyConfig { url, secret, delay: Duration::from_millis(delay_ms) }))
}

fn resolve_auth(args: &RunArgs, file: &FileConfig) -> Result<AuthConfig, ConfigError> {
    use defaults as d;
    let registration = args.registration.or(file.registration).unwrap_or(Registration::Closed);
    let registration_token = args.registration_token.clone().or(file.registration_token.clone());
    match (&registration, &registration_token) {
        (Registration::Token, None) => {
            return Err(ConfigError::Invalid("registration \"token\" needs --registration-token".into()));
        }
        (Registration::Token, Some(t)) if t.expose().len() < 16 => {
            return Err(ConfigError::Invalid("the registration token must be at least 16 characters".into()));
        }
        _ => {}
    }
    let ttl = args.access_token_ttl_s.or(file.access_token_ttl_s).unwrap_or(d::ACCESS_TOKEN_TTL_S);
    if !(2..=86_400).contains(&ttl) {
        return Err(ConfigError::Invalid(format!("access_token_ttl_s must be between 2 and 86400, got {ttl}")));
    }
    let days = args.session_ttl_days.or(file.session_ttl_days).unwrap_or(d::SESSION_TTL_DAYS);
    if !(1..=400).contains(&days) {
        return Err(ConfigError::Invalid(format!("session_ttl_days must be between 1 and 400, got {days}")));
    }
    let issuer = args.oidc_issuer.clone().or(file.oidc_issuer.clone());
    let audience = args.oidc_audience.clone().or(file.oidc_audience.clone());
    let jwks = args.oidc_jwks.clone().or(file.oidc_jwks.clone());
    let oidc = match (issuer, audience, jwks) {
        (None, None, None) => None,
        (Some(issuer), Some(audience), Some(jwks)) => {
            if issuer.is_empty() || issuer.len() > chorus_raft::limits::MAX_EXTERNAL_ID_BYTES {
                return Err(ConfigError::Invalid("oidc_issuer must be 1 to 1024 bytes".into()));
            }
            let jwks = if jwks.starts_with("https://") || jwks.starts_with("http://") {
                JwksSource::Url(jwks)
            } else {
                JwksSource::File(PathBuf::from(jwks))
            };
            let names = args.oidc_algorithms.clone().or(file.oidc_algorithms.clone());
            let names = names.unwrap_or_else(|| d::OIDC_ALGORITHMS.into());
            let mut algorithms = Vec::new();
            for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                use jsonwebtoken::Algorithm as A;
                let alg = match name {
                    "RS256" => A::RS256,
                    "RS384" => A::RS384,
                    "RS512" => A::RS512,
                    "PS256" => A::PS256,
                    "ES256" => A::ES256,
                    "ES384" => A::ES384,
                    "EdDSA" => A::EdDSA,
                    other => {
                        return Err(ConfigError::Invalid(format!(
                            "oidc_algorithms: {other:?} is not an accepted algorithm (RS256, RS384, RS512, PS256, \
                             ES256, ES384, EdDSA; symmetric and `none` are never accepted)"
                        )));
                    }
                };
                algorithms.push(alg);
            }
            if algorithms.is_empty() {
                return Err(ConfigError::Invalid("oidc_algorithms names no algorithm".into()));
            }
            let username_claim = args.oidc_username_claim.clone().or(file.oidc_username_claim.clone());
            Some(OidcConfig {
                issuer,
                audience,
                jwks,
                algorithms,
                username_claim: username_claim.unwrap_or_else(|| d::OIDC_USERNAME_CLAIM.into()),
            })
        }
        _ => {
            return Err(ConfigError::Invalid(
                "an external identity provider needs oidc_issuer, oidc_audience and oidc_jwks together".into(),
            ));
        }
    };
    Ok(AuthConfig {
        registration,
        registration_token,
        access_token_ttl: Duration::from_secs(ttl),
        session_ttl: Duration::from_secs(days * 24 * 3600),
        oidc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> RunArgs {
        let mut argv = vec!["chorusd"];
        argv.extend_from_slice(list);
        Cli::try_parse_from(argv).unwrap().run
    }

    #[test]
    fn the_web_endpoint_may_be_moved_or_turned_off() {
        let at = |list: &[&str]| resolve(args(list), FileConfig::default()).map(|c| c.web_addr);
        assert_eq!(at(&["--web-addr", "0.0.0.0:8443"]).unwrap(), Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(at(&["--web-addr", "off"]).unwrap(), None);
        let bad = at(&["--web-addr", "localhost"]).unwrap_err().to_string();
        assert!(bad.contains("web address") && bad.contains("off"), "{bad}");
    }

    #[test]
    fn defaults_make_a_single_node_cluster() {
        let c = resolve(RunArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.node_id, 1);
        assert_eq!(c.client_addr.to_string(), "127.0.0.1:7401");
        assert_eq!(c.peer_addr.to_string(), "127.0.0.1:7301");
        assert_eq!(c.web_addr.map(|a| a.to_string()).as_deref(), Some("127.0.0.1:7501"));
        assert_eq!(c.initial_cluster, BTreeMap::from([(1, "127.0.0.1:7301".to_string())]));
        assert_eq!((c.shard_count, c.replication_factor), (16, 1));
        assert_eq!(c.data_dir, PathBuf::from("chorus-data/node-1"));
        assert_eq!(c.limits.max_body_bytes, 64 * 1024);
        assert_eq!(c.auth.registration, Registration::Closed);
        assert_eq!(c.peer_tls, PeerTlsSource::Own);
        assert_eq!(c.rate_limits.sends_per_user.map(|r| r.burst), Some(200));
    }

    #[test]
    fn a_multi_node_cluster_needs_the_cluster_ca() {
        let err = resolve(args(&["--initial-cluster", "1=127.0.0.1:1,2=127.0.0.1:2"]), FileConfig::default());
        assert!(matches!(err, Err(ConfigError::Invalid(m)) if m.contains("chorusd ca init")));
        let c = resolve(
            args(&["--initial-cluster", "1=127.0.0.1:1,2=127.0.0.1:2", "--peer-ca-dir", "/tmp/ca"]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(c.peer_tls, PeerTlsSource::CaDir("/tmp/ca".into()));
        let half = resolve(args(&["--peer-ca", "/a", "--peer-cert", "/b"]), FileConfig::default());
        assert!(matches!(half, Err(ConfigError::Invalid(m)) if m.contains("together")));
    }

    #[test]
    fn secrets_are_never_printed() {
        let file: FileConfig =
            toml::from_str("registration = \"token\"\nregistration_token = \"s3cret-s3cret-s3cret\"").unwrap();
        let c = resolve(RunArgs::default(), file).unwrap();
        assert_eq!(c.auth.registration, Registration::Token);
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(resolve(args(&["--registration", "token"]), FileConfig::default()).is_err());
    }

    #[test]
    fn an_external_provider_needs_its_three_settings_and_known_algorithms() {
        let base =
            ["--oidc-issuer", "https://id.example", "--oidc-audience", "chorus", "--oidc-jwks", "/etc/jwks.json"];
        let c = resolve(args(&base), FileConfig::default()).unwrap();
        let oidc = c.auth.oidc.unwrap();
        assert_eq!(oidc.jwks, JwksSource::File("/etc/jwks.json".into()));
        assert_eq!(oidc.algorithms.len(), 3);
        let mut none = base.to_vec();
        none.extend(["--oidc-algorithms", "none"]);
        assert!(resolve(args(&none), FileConfig::default()).is_err());
        let mut hs = base.to_vec();
        hs.extend(["--oidc-algorithms", "HS256"]);
        assert!(resolve(args(&hs), FileConfig::default()).is_err());
        assert!(resolve(args(&base[..4]), FileConfig::default()).is_err());
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            "node_id = 2\nshard_count = 8\ninitial_cluster = \"1=127.0.0.1:1,2=127.0.0.1:2\"\npeer_ca_dir = \"/ca\"",
        )
        .unwrap();
        let c = resolve(args(&["--shard-count", "4"]), file).unwrap();
        assert_eq!((c.node_id, c.shard_count, c.replication_factor), (2, 4, 2));
        assert_eq!(c.peer_addr.to_string(), "127.0.0.1:2");
    }

    #[test]
    fn snapshot_pacing_comes_from_the_file_or_flags_with_a_default() {
        let pacing = |c: NodeConfig| c.tuning.snapshot_pacing();
        let default = pacing(resolve(RunArgs::default(), FileConfig::default()).unwrap());
        assert_eq!(default, chorus_raft::SnapshotPacing { min_entries: 20_000, log_percent: 50 });
        let file: FileConfig = toml::from_str("snapshot_every_entries = 500\nsnapshot_log_percent = 0").unwrap();
        assert_eq!(pacing(resolve(RunArgs::default(), file).unwrap()).log_percent, 0);
        let file: FileConfig = toml::from_str("snapshot_log_percent = 0").unwrap();
        let flagged = pacing(resolve(args(&["--snapshot-log-percent", "200"]), file).unwrap());
        assert_eq!(flagged, chorus_raft::SnapshotPacing { min_entries: 20_000, log_percent: 200 });
        let too_much = resolve(args(&["--snapshot-log-percent", "1001"]), FileConfig::default());
        assert!(matches!(too_much, Err(ConfigError::Invalid(m)) if m.contains("snapshot_log_percent")));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("shard_cuont = 3").is_err());
    }

    #[test]
    fn initial_cluster_syntax_is_checked() {
        assert_eq!(parse_initial_cluster("1=a:1, 2=b:2").unwrap().len(), 2);
        for bad in ["", "1", "x=a:1", "0=a:1", "1=a", "1=a:1,1=b:2"] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn inconsistent_settings_are_refused_with_a_reason() {
        let cases: &[(&[&str], &str)] = &[
            (&["--node-id", "4", "--initial-cluster", "1=127.0.0.1:1"], "not in the initial cluster"),
            (&["--replication-factor", "3"], "replication factor 3"),
            (&["--max-body-bytes", "99999999"], "max_body_bytes"),
            (&["--heartbeat-ms", "100", "--election-timeout-ms", "150"], "at least twice the heartbeat"),
            (&["--client-addr", "0.0.0.0:7000"], "--advertise-client-addr"),
        ];
        for (argv, expected) in cases {
            let err = resolve(args(argv), FileConfig::default()).unwrap_err().to_string();
            assert!(err.contains(expected), "{argv:?}: {err}");
        }
    }
}
