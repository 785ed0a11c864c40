//! chorusd: one Chorus node. It replicates its share of the shards (Raft over gRPC, storage in
//! RocksDB) and serves clients over QUIC, forwarding what it cannot serve itself.
//!
//! - [`config`]: flags, environment and config file.
//! - [`cluster`]: cluster id and shard placement.
//! - [`node`]: start-up, the shared node state, ordered shutdown.
//! - [`front_door`]: the QUIC endpoint; [`requests`]: one module per request kind.
//! - [`web`]: the HTTPS endpoint (health checks for load balancers).
//! - [`forward`]: reaching the shard leader from any node; [`batcher`]: many writes per Raft
//!   entry.
//! - [`subscription`]: gap-free live feeds.
//! - [`peer`]: the gRPC service between nodes; [`bootstrap`]: creating shards once.
//! - [`status`]: the cluster status table; [`tls`]: the client endpoint's certificate;
//!   [`peer_tls`]: mutual TLS between nodes.
//! - [`auth`]: accounts, sessions and tokens; [`rate_limit`]: abuse limits.
//! - [`supervisor`]: background tasks restarted, or the node stopped, when they fail.

pub mod auth;
pub mod balance;
pub mod batcher;
pub mod bootstrap;
pub mod cluster;
pub mod config;
pub mod error;
pub mod forward;
pub mod front_door;
pub mod http;
pub mod liveness;
pub mod node;
pub mod notify;
pub mod peer;
pub mod peer_tls;
pub mod presence;
pub mod rate_limit;
pub mod requests;
pub mod status;
pub mod subscription;
pub mod supervisor;
pub mod tls;
pub mod web;
