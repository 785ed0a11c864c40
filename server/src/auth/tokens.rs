//! Access tokens: JWTs signed with Ed25519 (`alg: EdDSA`), naming the signing key (`kid`), the
//! cluster (`iss`), the audience `chorus`, the user (`sub`), the session (`sid`, hex) and the
//! time of issue in ms (`iat_ms`, for revocation checks finer than JWT's seconds).
//!
//! A node checks a token entirely on its own: the signature against the key named, kept in
//! its replica of the meta group; the expiry; then that the session still exists, the account
//! is enabled and the token was not issued before the account's `revoked_before_ms`. Each
//! failure has its own message, and expiry its own code (`token_expired`: refresh it), as does
//! revocation (`token_revoked`: sign in again).

use chorus_proto::storage::{AddSigningKey, SessionRecord, UserRecord, op};
use chorus_raft::ShardReader;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Identity, expiry_leeway, hex, now_ms, unhex};
use crate::error::ServiceError;
use crate::node::Node;

/// Longest access token accepted, in bytes (ours are about 400).
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Every access token's audience.
pub const AUDIENCE: &str = "chorus";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    sid: String,
    iat: u64,
    exp: u64,
    iat_ms: u64,
    #[serde(default)]
    adm: bool,
}

fn unauthenticated(why: impl Into<String>) -> ServiceError {
    ServiceError::Unauthenticated(why.into())
}

/// A newly signed access token, with the times it carries (ms since the Unix epoch).
pub struct Issued {
    pub token: String,
    pub issued_ms: u64,
    pub expires_ms: u64,
}

/// Signs a new access token for `user`'s session.
pub fn issue(node: &Node, user: &str, session_id: &[u8], admin: bool) -> Result<Issued, ServiceError> {
    let reader = node.meta_reader()?;
    let (keys, state) = reader.signing_keys()?;
    let Some(key) = keys.iter().find(|k| k.kid == state.active_kid) else {
        return Err(ServiceError::Unavailable { reason: "the cluster has no signing key yet (it is starting)".into() });
    };
    let now = now_ms();
    let ttl = node.config.auth.access_token_ttl;
    let expires_ms = now + ttl.as_millis() as u64;
    let claims = Claims {
        iss: node.layout.cluster_id.clone(),
        aud: AUDIENCE.into(),
        sub: user.to_owned(),
        sid: hex(session_id),
        iat: now / 1000,
        exp: expires_ms.div_ceil(1000),
        iat_ms: now,
        adm: admin,
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid.clone());
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&key.private_pkcs8))
        .map_err(|e| ServiceError::Internal(format!("signing an access token: {e}")))?;
    Ok(Issued { token, issued_ms: now, expires_ms })
}

/// The header's `alg` and `kid` of a JWT (`what` names it in errors), read before anything is
/// trusted, so that a token of the wrong kind is refused with a message that says so: empty,
/// over `max_bytes`, not a JWT, or unsigned (`alg: none`).
pub(crate) fn header_of(token: &str, what: &str, max_bytes: usize) -> Result<(String, Option<String>), ServiceError> {
    if token.is_empty() {
        return Err(unauthenticated(format!("no {what}")));
    }
    if token.len() > max_bytes {
        return Err(unauthenticated(format!("the {what} is {} bytes, over the limit of {max_bytes}", token.len())));
    }
    let malformed = |why: &str| unauthenticated(format!("malformed {what}: {why}"));
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed("not three dot-separated parts"));
    };
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).map_err(|_| malformed("bad base64"))?;
    #[derive(Deserialize)]
    struct Head {
        alg: Option<String>,
        kid: Option<String>,
    }
    let head: Head = serde_json::from_slice(&bytes).map_err(|_| malformed("the header is not JSON"))?;
    let alg = head.alg.ok_or_else(|| malformed("no algorithm"))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(unauthenticated("unsigned tokens (algorithm \"none\") are not accepted"));
    }
    Ok((alg, head.kid))
}

/// Checks an access token and the session behind it; the identity it proves.
pub async fn verify(node: &Node, token: &str) -> Result<Identity, ServiceError> {
    let (alg, kid) = header_of(token, "access token", MAX_TOKEN_BYTES)?;
    if alg != "EdDSA" {
        return Err(unauthenticated(format!("algorithm {alg:?} is not accepted: Chorus signs with EdDSA")));
    }
    let kid = kid.ok_or_else(|| unauthenticated("the token names no signing key"))?;
    let find_key = |keys: &Vec<chorus_proto::storage::SigningKeyRecord>| keys.iter().any(|k| k.kid == kid);
    let keys = node.read_meta(|r| Ok(r.signing_keys()?.0), find_key).await?;
    let key = keys
        .iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| unauthenticated("the token is signed with a key this cluster does not have"))?;
    if key.public_key.len() != 32 {
        return Err(ServiceError::Internal(format!("signing key {kid:?} has a malformed public key")));
    }

    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[node.layout.cluster_id.as_str()]);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = expiry_leeway(node.config.auth.access_token_ttl).as_secs();
    let claims = match jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_ed_der(&key.public_key), &validation) {
        Ok(data) => data.claims,
        Err(e) => {
            return Err(match e.kind() {
                ErrorKind::ExpiredSignature => {
                    ServiceError::TokenExpired("the access token expired: refresh it".into())
                }
                ErrorKind::InvalidSignature => unauthenticated("the token's signature does not verify"),
                ErrorKind::InvalidIssuer => unauthenticated("the token was issued by another cluster"),
                ErrorKind::InvalidAudience => unauthenticated("the token is not a Chorus access token"),
                ErrorKind::InvalidAlgorithm => unauthenticated("the token's algorithm is not accepted"),
                _ => unauthenticated(format!("malformed access token: {e}")),
            });
        }
    };
    let session_id: [u8; 16] = unhex(&claims.sid).ok_or_else(|| unauthenticated("malformed session id"))?;
    let session = node.read_meta(|r| Ok(r.session(&session_id)?), Option::is_some).await?;
    let (_, user) = standing(node.meta_reader()?, session, Some(&claims.sub), Some(claims.iat_ms), now_ms())?;
    Ok(Identity {
        user: user.name,
        session_id,
        admin: user.admin,
        issued_ms: claims.iat_ms,
        expires_ms: claims.exp.saturating_mul(1000),
    })
}

/// Whether a sign-in still stands, against the meta group as `reader` has it: `session`
/// exists, is `claimed_user`'s (when a token names one) and has not expired; its account exists
/// and is enabled; and the account was not signed out everywhere after `issued_ms` (a token's
/// time of issue; `None` for a refresh token, whose session such a revocation ended). The
/// session and the account, if so; else `token_revoked`, saying why.
pub fn standing(
    reader: &ShardReader,
    session: Option<SessionRecord>,
    claimed_user: Option<&str>,
    issued_ms: Option<u64>,
    now_ms: u64,
) -> Result<(SessionRecord, UserRecord), ServiceError> {
    let revoked = |why: &str| Err(ServiceError::TokenRevoked(why.into()));
    let session = match session {
        Some(s) if claimed_user.is_none_or(|u| u == s.user) => s,
        _ => return revoked("the session ended (signed out): sign in again"),
    };
    if session.expires_ms <= now_ms {
        return revoked("the session expired: sign in again");
    }
    match reader.user(&session.user)? {
        None => revoked("the account no longer exists"),
        Some(u) if u.disabled => revoked("the account is disabled"),
        Some(u) if issued_ms.is_some_and(|at| at < u.revoked_before_ms) => {
            revoked("the token was revoked (signed out everywhere): sign in again")
        }
        Some(u) => Ok((session, u)),
    }
}

/// The operation that makes a new Ed25519 signing key (named by 16 random bytes in hex) the
/// cluster's active one; `actor`: the admin rotating it, empty for the cluster's first key
/// (`only_if_none`).
pub fn new_signing_key_op(actor: &str, only_if_none: bool) -> Result<op::Kind, ServiceError> {
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| ServiceError::Internal("generating a signing key failed".into()))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| ServiceError::Internal("reading the new signing key failed".into()))?;
    Ok(op::Kind::AddSigningKey(AddSigningKey {
        kid: hex(&super::refresh::random::<16>()),
        private_pkcs8: pkcs8.as_ref().to_vec().into(),
        public_key: pair.public_key().as_ref().to_vec().into(),
        only_if_none,
        actor: actor.to_owned(),
    }))
}
