//! Refresh tokens: `chr1.<session id, hex>.<secret, hex>`. The secret is 32 random bytes from
//! the operating system; only its SHA-256 is stored (in the session record, replicated), so a
//! copy of a node's data cannot sign anyone in. A refresh token lives as long as its session.

use chorus_raft::keys::SESSION_ID_LEN;
use subtle::ConstantTimeEq;

use super::{hex, unhex};

const PREFIX: &str = "chr1.";

/// `N` random bytes from the operating system.
pub fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom as _;
    let mut out = [0u8; N];
    // The system's random source does not fail on the systems Chorus runs on; if it ever did,
    // an all-zero secret must not be used, so this is the one place a node gives up.
    if ring::rand::SystemRandom::new().fill(&mut out).is_err() {
        tracing::error!("the operating system's random number generator failed");
        std::process::abort();
    }
    out
}

/// A new session's id, refresh token and the token's stored hash.
pub struct NewRefresh {
    pub session_id: [u8; SESSION_ID_LEN],
    pub token: String,
    pub hash: [u8; 32],
}

pub fn new_refresh() -> NewRefresh {
    let session_id = random::<SESSION_ID_LEN>();
    let secret = random::<32>();
    NewRefresh { session_id, token: format!("{PREFIX}{}.{}", hex(&session_id), hex(&secret)), hash: sha256(&secret) }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The session id and the secret's hash of a refresh token, if it is well formed.
pub fn parse(token: &str) -> Option<([u8; SESSION_ID_LEN], [u8; 32])> {
    let rest = token.strip_prefix(PREFIX)?;
    let (sid, secret) = rest.split_once('.')?;
    Some((unhex::<SESSION_ID_LEN>(sid)?, sha256(&unhex::<32>(secret)?)))
}

/// Compares two secrets' hashes in constant time.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_token_parses_back_to_its_session_and_hash() {
        let new = new_refresh();
        let (sid, hash) = parse(&new.token).unwrap();
        assert_eq!(sid, new.session_id);
        assert!(same(&hash, &new.hash));
        assert!(!new.token.contains(&hex(&new.hash)), "the stored hash is not in the token");
        for bad in
            ["", "chr1.", "chr1.00.11", "chr2.x.y", &new.token[..new.token.len() - 1], &format!("{}0", new.token)]
        {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        assert_ne!(new_refresh().token, new.token);
    }
}
