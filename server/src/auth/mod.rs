//! Who a client is. Every connection is signed in once, by the access token in its Hello (or by
//! Register, Login, Refresh or LoginExternal on it), and request handlers receive the
//! [`Identity`] this module verified, never a name a client claimed.
//!
//! - [`tokens`]: access tokens (JWT, EdDSA), signed with the cluster's keys (meta group
//!   state), checked by any node against its own replica of the meta group.
//! - [`passwords`]: Argon2id hashing and checking, off the async runtime, a few at a time.
//! - [`refresh`]: refresh tokens (a session id and a random secret, stored only as a hash).
//! - [`oidc`]: tokens of an external identity provider, checked against its keys (JWKS).
//! - [`connections`]: the node's signed-in connections, closed within moments of their
//!   session's revocation.
//! - [`bootstrap`]: the cluster's first signing key and first admin.

pub mod bootstrap;
pub mod connections;
pub mod oidc;
pub mod passwords;
pub mod refresh;
pub mod tokens;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_raft::keys::{META_SHARD, SESSION_ID_LEN};
use chorus_raft::{ShardReader, ShardReplica};

use crate::error::ServiceError;
use crate::node::Node;

/// A verified sign-in: the user a connection acts for, and the session it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub session_id: [u8; SESSION_ID_LEN],
    pub admin: bool,
    /// When the access token was issued and when it expires, ms since the Unix epoch.
    pub issued_ms: u64,
    pub expires_ms: u64,
}

impl Identity {
    pub fn session_hex(&self) -> String {
        hex(&self.session_id)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// Decodes lowercase or uppercase hex of exactly `N` bytes.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// How long past an access token's expiry it is still accepted, for clock differences between
/// the node that issued it and the one that checks it: 30 s, or half the token's lifetime if
/// that is shorter.
pub fn expiry_leeway(ttl: Duration) -> Duration {
    Duration::from_secs(30).min(ttl / 2)
}

/// User names are case-insensitive: folded to lower case (and trimmed) before anything else.
pub fn normalize_user(name: &str) -> String {
    name.trim().to_lowercase()
}

/// Names nobody may register: the first admin's, and names people would take for the system's.
pub const RESERVED_USER_NAMES: &[&str] = &["admin", "root", "system", "chorus", "everyone", "here", "channel"];

impl Node {
    /// This node's replica of the meta group (every node hosts one).
    pub fn meta(&self) -> Result<&ShardReplica, ServiceError> {
        self.shards.get(&META_SHARD).ok_or_else(|| ServiceError::Internal("this node hosts no meta group".into()))
    }

    pub fn meta_reader(&self) -> Result<&ShardReader, ServiceError> {
        Ok(&self.meta()?.reader)
    }

    /// Reads the meta group from this node's replica; if `found` says the answer may be stale
    /// (a record not there yet), waits until the replica has caught up with the leader's commit
    /// index as of now, and reads again. So a user registered, or a session made, through
    /// another node an instant ago is seen.
    pub async fn read_meta<T>(
        &self,
        read: impl Fn(&ShardReader) -> Result<T, ServiceError>,
        found: impl Fn(&T) -> bool,
    ) -> Result<T, ServiceError> {
        let reader = self.meta_reader()?;
        let first = read(reader)?;
        if found(&first) {
            return Ok(first);
        }
        crate::forward::catch_up_with_leader(self, META_SHARD).await?;
        read(reader)
    }
}
