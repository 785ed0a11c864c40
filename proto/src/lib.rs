//! Protobuf definitions shared by every Chorus component.
//!
//! - [`storage`]: what is persisted in RocksDB and replicated through the Raft log.
//!
//! Fields are only ever added: the encodings are Chorus's on-disk and on-wire formats.

/// Records persisted in RocksDB and carried in Raft log entries.
pub mod storage {
    tonic::include_proto!("chorus.storage.v1");
}
