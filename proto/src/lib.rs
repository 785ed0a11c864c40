//! Protobuf definitions shared by every Chorus component, and the client protocol's framing.
//!
//! - [`storage`]: what is persisted in RocksDB and replicated through the Raft log.
//! - [`client`]: the client protocol over QUIC (see docs/PROTOCOL.md).
//! - [`peer`]: the gRPC protocol between nodes.
//! - [`framing`]: length-prefixed frames on a byte stream.
//! - [`mentions`]: what counts as a mention of a user in a message body.
//! - [`routing`]: room → shard.
//!
//! Fields are only ever added: the encodings are Chorus's on-disk and on-wire formats.

pub mod batching;
pub mod framing;
pub mod mentions;
pub mod routing;

/// The generated code, nested like the protobuf packages (cross-package references rely on it).
pub mod chorus {
    pub mod storage {
        pub mod v1 {
            tonic::include_proto!("chorus.storage.v1");
        }
    }
    pub mod client {
        pub mod v1 {
            tonic::include_proto!("chorus.client.v1");
            include!(concat!(env!("OUT_DIR"), "/chorus.client.v1.serde.rs"));
        }
    }
    pub mod peer {
        pub mod v1 {
            tonic::include_proto!("chorus.peer.v1");
        }
    }
}

/// Records persisted in RocksDB and carried in Raft log entries.
pub use chorus::storage::v1 as storage;

/// The client protocol (QUIC, ALPN `chorus/1`).
pub use chorus::client::v1 as client;

/// The node-to-node protocol (gRPC).
pub use chorus::peer::v1 as peer;

/// The ALPN protocol id of the client protocol.
pub const ALPN: &[u8] = b"chorus/1";
