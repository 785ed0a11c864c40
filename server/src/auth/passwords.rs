//! Passwords: hashed with Argon2id (OWASP's parameters: 19 MiB, 2 passes, 1 lane) into a PHC
//! string, on the node that received the password and on a blocking thread, never in the state
//! machine. Only the hash goes through Raft.
//!
//! A hash takes tens of milliseconds and 19 MiB, so at most [`HASHES_AT_ONCE`] run at once; a
//! request that cannot get a turn within [`HASH_WAIT`] fails with `unavailable` rather than
//! queueing without bound.

use std::sync::LazyLock;
use std::time::Duration;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use chorus_proto::storage::CreateUser;
use tokio::sync::Semaphore;

use crate::error::ServiceError;

/// Argon2id cost: 19 MiB of memory, 2 iterations, 1 degree of parallelism (OWASP).
const MEMORY_KIB: u32 = 19 * 1024;
const ITERATIONS: u32 = 2;
const LANES: u32 = 1;
/// Hashes computed at once on a node.
pub const HASHES_AT_ONCE: usize = 2;
/// How long a sign-in waits for a turn to hash.
pub const HASH_WAIT: Duration = Duration::from_secs(5);
/// Shortest and longest password, in bytes.
pub const MIN_PASSWORD_BYTES: usize = 8;
pub const MAX_PASSWORD_BYTES: usize = 1024;

static TURNS: Semaphore = Semaphore::const_new(HASHES_AT_ONCE);

fn argon2() -> Result<Argon2<'static>, ServiceError> {
    let params = Params::new(MEMORY_KIB, ITERATIONS, LANES, None)
        .map_err(|e| ServiceError::Internal(format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// A hash of a password nobody has, to compare against when the user does not exist, so that
/// a wrong user name takes as long as a wrong password.
static DECOY: LazyLock<Option<String>> =
    LazyLock::new(|| argon2().ok()?.hash_password(&super::refresh::random::<24>()).ok().map(|h| h.to_string()));

pub fn check_strength(password: &str) -> Result<(), ServiceError> {
    if password.len() < MIN_PASSWORD_BYTES {
        return Err(ServiceError::InvalidArgument(format!(
            "the password must be at least {MIN_PASSWORD_BYTES} bytes long"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ServiceError::InvalidArgument(format!("the password is longer than {MAX_PASSWORD_BYTES} bytes")));
    }
    Ok(())
}

async fn on_a_blocking_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ServiceError> {
    let _turn = tokio::time::timeout(HASH_WAIT, TURNS.acquire())
        .await
        .map_err(|_| ServiceError::Unavailable { reason: "too many sign-ins at once on this node".into() })?
        .map_err(|_| ServiceError::ShuttingDown)?;
    tokio::task::spawn_blocking(work).await.map_err(|e| ServiceError::Internal(format!("password hashing: {e}")))
}

/// The password's Argon2id hash (PHC string) and its credential id (the SHA-256 of that).
pub async fn hash(password: &str) -> Result<(String, [u8; 32]), ServiceError> {
    check_strength(password)?;
    let password = password.to_owned();
    let phc = on_a_blocking_thread(move || {
        argon2()?
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| ServiceError::Internal(format!("hashing a password: {e}")))
    })
    .await??;
    let id = credential_id(&phc);
    Ok((phc, id))
}

/// The record of a new account `name` with `password` (hashed here), made by `actor` (empty:
/// the user themself, or the cluster).
pub async fn new_account(name: String, password: &str, admin: bool, actor: &str) -> Result<CreateUser, ServiceError> {
    let (phc, credential_id) = hash(password).await?;
    Ok(CreateUser {
        name,
        password_phc: phc,
        credential_id: credential_id.to_vec().into(),
        admin,
        actor: actor.to_owned(),
        bootstrap: false,
    })
}

pub fn credential_id(phc: &str) -> [u8; 32] {
    super::refresh::sha256(phc.as_bytes())
}

/// Whether `password` matches `phc` (`None`: no such user; the decoy is checked instead).
pub async fn verify(phc: Option<String>, password: &str) -> Result<bool, ServiceError> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Ok(false);
    }
    let password = password.to_owned();
    on_a_blocking_thread(move || {
        let (phc, real) = match phc {
            Some(p) => (p, true),
            None => match DECOY.as_ref() {
                Some(decoy) => (decoy.clone(), false),
                None => return false,
            },
        };
        let Ok(parsed) = PasswordHash::new(&phc) else { return false };
        let Ok(argon2) = argon2() else { return false };
        argon2.verify_password(password.as_bytes(), &parsed).is_ok() && real
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_password_verifies_against_its_own_hash_only() {
        let (phc, id) = hash("correct horse battery").await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert_eq!(id, credential_id(&phc));
        assert!(verify(Some(phc.clone()), "correct horse battery").await.unwrap());
        assert!(!verify(Some(phc.clone()), "correct horse batterx").await.unwrap());
        assert!(!verify(None, "correct horse battery").await.unwrap());
        assert!(!verify(Some("not a phc".into()), "x").await.unwrap());
        let (again, _) = hash("correct horse battery").await.unwrap();
        assert_ne!(phc, again, "each hash has its own salt");
        assert!(matches!(hash("short").await, Err(ServiceError::InvalidArgument(_))));
    }
}
