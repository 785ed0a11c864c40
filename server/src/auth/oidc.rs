//! Tokens of an external identity provider (OpenID Connect ID tokens, or JWT access tokens):
//! checked against the provider's keys (a JWKS file or URL), its issuer and our audience, with
//! an allow-list of algorithms (never `none`, never a symmetric one). The provider's
//! `(issuer, subject)` is the identity; the meta group maps it to a Chorus user on first use.
//!
//! A JWKS URL is fetched at start, every [`REFRESH_EVERY`], and when a token names a key id
//! the set lacks (providers rotate keys); whatever the reason, and whether fetches succeed or
//! fail, at most once per [`REFETCH_AT_MOST_EVERY`], so tokens naming unknown keys, or a
//! provider that is down, cost one fetch per period and not one per sign-in.

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use tokio::sync::Mutex;

use crate::config::{JwksSource, OidcConfig};
use crate::error::ServiceError;

/// Longest external token accepted, in bytes.
pub const MAX_EXTERNAL_TOKEN_BYTES: usize = 16 * 1024;
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);
pub const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(30);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Who the provider says signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIdentity {
    pub issuer: String,
    pub subject: String,
    /// A valid Chorus user name made from the provider's name claim (or "user").
    pub preferred_name: String,
}

struct Keys {
    set: JwkSet,
    /// The last successful fetch, and the last attempt.
    fetched: Option<Instant>,
    attempted: Option<Instant>,
}

/// Checks one provider's tokens.
pub struct ExternalVerifier {
    config: OidcConfig,
    keys: Mutex<Keys>,
    http: Option<reqwest::Client>,
}

fn unauthenticated(why: impl Into<String>) -> ServiceError {
    ServiceError::Unauthenticated(why.into())
}

/// Makes a Chorus user name of what the provider calls the user: lower case, other characters
/// than letters, digits, '.', '_' and '-' as '-', starting with a letter or digit, at most 32
/// bytes; "user" if nothing is left.
pub fn user_name_from(claim: &str) -> String {
    let local = claim.split('@').next().unwrap_or(claim);
    let mut name: String = local
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    name = name.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned();
    name.truncate(chorus_raft::limits::MAX_USER_NAME_BYTES);
    if name.is_empty() { "user".into() } else { name }
}

impl ExternalVerifier {
    /// Reads the provider's keys (a file must be readable now; a URL that cannot be fetched yet
    /// is fetched again when a token comes).
    pub async fn new(config: OidcConfig) -> Result<ExternalVerifier, String> {
        let http = match &config.jwks {
            JwksSource::File(_) => None,
            JwksSource::Url(url) => {
                crate::http::check_url(url, "a JWKS URL")?;
                Some(crate::http::client(FETCH_TIMEOUT)?)
            }
        };
        let verifier = ExternalVerifier {
            config,
            keys: Mutex::new(Keys { set: JwkSet { keys: vec![] }, fetched: None, attempted: None }),
            http,
        };
        match verifier.load().await {
            Ok(set) => {
                let now = Some(Instant::now());
                *verifier.keys.lock().await = Keys { set, fetched: now, attempted: now };
            }
            Err(e) if verifier.http.is_some() => {
                tracing::warn!(error = %e, "could not fetch the identity provider's keys yet; will retry")
            }
            Err(e) => return Err(e),
        }
        Ok(verifier)
    }

    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    async fn load(&self) -> Result<JwkSet, String> {
        let bytes = match (&self.config.jwks, &self.http) {
            (JwksSource::File(path), _) => {
                tokio::fs::read(path).await.map_err(|e| format!("reading the JWKS file {}: {e}", path.display()))?
            }
            (JwksSource::Url(url), Some(http)) => {
                let response = http.get(url).send().await.map_err(|e| format!("fetching {url}: {e}"))?;
                let response = response.error_for_status().map_err(|e| format!("fetching {url}: {e}"))?;
                if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
                    return Err(format!("{url} is over {MAX_JWKS_BYTES} bytes"));
                }
                let bytes = response.bytes().await.map_err(|e| format!("reading {url}: {e}"))?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(format!("{url} is over {MAX_JWKS_BYTES} bytes"));
                }
                bytes.to_vec()
            }
            (JwksSource::Url(_), None) => return Err("no HTTP client".into()),
        };
        serde_json::from_slice(&bytes).map_err(|e| format!("the JWKS is not a JSON Web Key Set: {e}"))
    }

    /// The key for a token's `kid` and algorithm: fetched again when it is not known (and the
    /// keys come from a URL).
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, ServiceError> {
        let mut keys = self.keys.lock().await;
        let stale = keys.fetched.is_none_or(|at| at.elapsed() > REFRESH_EVERY);
        let missing = find(&keys.set, kid, alg).is_none();
        let may_fetch = keys.attempted.is_none_or(|at| at.elapsed() > REFETCH_AT_MOST_EVERY);
        if self.http.is_some() && may_fetch && (stale || missing) {
            keys.attempted = Some(Instant::now());
            match self.load().await {
                Ok(set) => {
                    keys.set = set;
                    keys.fetched = keys.attempted;
                }
                Err(e) => tracing::warn!(error = %e, "fetching the identity provider's keys"),
            }
        }
        let jwk = find(&keys.set, kid, alg).ok_or_else(|| {
            unauthenticated(format!("the identity provider has no {alg:?} key {}", kid.unwrap_or("(no kid)")))
        })?;
        decoding_key(jwk)
    }

    /// Checks `token`; who it names.
    pub async fn verify(&self, token: &str) -> Result<ExternalIdentity, ServiceError> {
        let (alg_name, kid) = super::tokens::header_of(token, "token", MAX_EXTERNAL_TOKEN_BYTES)?;
        let alg: Algorithm =
            alg_name.parse().map_err(|_| unauthenticated(format!("unknown algorithm {alg_name:?}")))?;
        if !self.config.algorithms.contains(&alg) {
            return Err(unauthenticated(format!("algorithm {alg_name} is not accepted from the identity provider")));
        }
        let key = self.key_for(kid.as_deref(), alg).await?;
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ServiceError::TokenExpired("the identity provider's token expired".into())
                }
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    unauthenticated("the token's signature does not verify")
                }
                jsonwebtoken::errors::ErrorKind::InvalidIssuer => unauthenticated("the token is of another issuer"),
                jsonwebtoken::errors::ErrorKind::InvalidAudience => {
                    unauthenticated("the token is for another audience")
                }
                _ => unauthenticated(format!("malformed token: {e}")),
            })?
            .claims;
        let subject = claims.get("sub").and_then(|s| s.as_str()).unwrap_or_default().to_owned();
        if subject.is_empty() || subject.len() > chorus_raft::limits::MAX_EXTERNAL_ID_BYTES {
            return Err(unauthenticated("the token's subject is empty or too long"));
        }
        let name = claims.get(&self.config.username_claim).and_then(|v| v.as_str()).unwrap_or("user");
        Ok(ExternalIdentity { issuer: self.config.issuer.clone(), subject, preferred_name: user_name_from(name) })
    }
}

/// A key of the set for `alg`: the one named `kid`, or (no kid) the only key that fits.
fn find<'s>(set: &'s JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<&'s Jwk> {
    let fits = |jwk: &&Jwk| {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => AlgorithmFamily::Ed,
            _ => return false,
        };
        // The JWK's own `alg`, if it names a signature algorithm, must be the token's.
        let declared = jwk.common.key_algorithm.and_then(|a| format!("{a:?}").parse::<Algorithm>().ok());
        family == alg.family() && declared.is_none_or(|d| d == alg)
    };
    match kid {
        Some(kid) => set.keys.iter().filter(fits).find(|k| k.common.key_id.as_deref() == Some(kid)),
        None => {
            let mut candidates = set.keys.iter().filter(fits);
            let first = candidates.next();
            if candidates.next().is_some() { None } else { first }
        }
    }
}

fn decoding_key(jwk: &Jwk) -> Result<DecodingKey, ServiceError> {
    if let AlgorithmParameters::OctetKeyPair(p) = &jwk.algorithm {
        // An Ed25519 key is 32 bytes; anything else is refused before the library sees it.
        use base64::Engine as _;
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&p.x).unwrap_or_default();
        if x.len() != 32 {
            return Err(unauthenticated("the identity provider's Ed25519 key is malformed"));
        }
    }
    DecodingKey::from_jwk(jwk).map_err(|e| unauthenticated(format!("the identity provider's key is unusable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_become_valid_user_names() {
        for (claim, name) in [
            ("Ann.Smith@example.com", "ann.smith"),
            ("Bob Jones", "bob-jones"),
            ("__x", "x"),
            ("élodie", "lodie"),
            ("", "user"),
            ("@@@", "user"),
            (&"z".repeat(50) as &str, &"z".repeat(32) as &str),
        ] {
            let made = user_name_from(claim);
            assert_eq!(made, name, "{claim:?}");
            assert!(chorus_raft::limits::validate_user_name(&made).is_ok(), "{made:?}");
        }
    }

    #[tokio::test]
    async fn a_provider_that_is_down_is_asked_once_per_period_not_once_per_sign_in() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let _ = stream.read(&mut [0u8; 4096]);
                let _ = stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        let config = OidcConfig {
            issuer: "https://id.example".into(),
            audience: "chorus".into(),
            jwks: JwksSource::Url(url),
            algorithms: vec![Algorithm::ES256],
            username_claim: "preferred_username".into(),
        };
        let verifier = ExternalVerifier::new(config).await.unwrap();
        assert_eq!(asked.load(Ordering::SeqCst), 1, "fetched at start");
        for _ in 0..5 {
            assert!(verifier.key_for(Some("rotated"), Algorithm::ES256).await.is_err());
        }
        assert_eq!(asked.load(Ordering::SeqCst), 2, "once more for the unknown key, then not within the period");
    }
}
