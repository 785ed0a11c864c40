//! Accounts, sessions, external identities and the keys access tokens are signed with: the
//! state of the meta group ([`crate::keys::META_SHARD`]), replicated on every node so that any
//! node checks a token against it locally.
//!
//! Rules (checked here, when an entry applies):
//! - User names are unique: creating a user is a compare-and-set on its record.
//! - A session is created only for an enabled user and only against the credential that the
//!   node checked the password against (`credential_id`, the SHA-256 of the password's PHC
//!   string): a password changed, or an account re-created, in between makes it fail.
//! - Only the user themself or an admin ends a user's sessions; only admins create accounts for
//!   others, disable accounts and rotate signing keys. Revoking every session also sets the
//!   user's `revoked_before_ms`: tokens issued before it are refused everywhere.
//! - A user has at most [`MAX_SESSIONS_PER_USER`] sessions (the oldest goes first), and the
//!   cluster keeps its [`SIGNING_KEYS_KEPT`] newest signing keys.

use chorus_proto::storage::{
    AddSigningKey, AuthState, CreateSession, CreateUser, ExternalIdentityRecord, ExternalLogin, RevokeSessions,
    SessionRecord, SetUserDisabled, SigningKeyRecord, TouchSession, UserRecord,
};
use prost::Message;

use super::{ApplyBatch, MAX_PAGE, OpResult, ShardReader};
use crate::error::{CommandError, QueryError, StoreError};
use crate::keys::SESSION_ID_LEN;
use crate::limits::{self, MAX_USER_NAME_BYTES};
use crate::types::OpOutcome;

/// Sessions one user may have; creating one more ends their oldest.
pub const MAX_SESSIONS_PER_USER: usize = 256;
/// Signing keys kept: the active one and the three before it (tokens live minutes, keys are
/// rotated rarely, so a token outlives its key only after four rotations within its lifetime).
pub const SIGNING_KEYS_KEPT: usize = 4;
/// Shortest and longest session lifetime.
pub const MIN_SESSION_TTL_MS: u64 = 60_000;
pub const MAX_SESSION_TTL_MS: u64 = 400 * 24 * 3600 * 1000;

/// Sessions that ended, as the meta group tells each node's live connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub user: String,
    /// One session ended; `None`: every session of the user, and every token issued before
    /// `before_ms`.
    pub session_id: Option<Vec<u8>>,
    pub before_ms: u64,
}

impl ShardReader {
    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        let (_generation, keys) = self.generation();
        self.view.get(&keys.user(name), || format!("user record {name:?}"))
    }

    pub fn session(&self, session_id: &[u8]) -> Result<Option<SessionRecord>, StoreError> {
        let (_generation, keys) = self.generation();
        self.view.get(&keys.session(session_id), || "session record".into())
    }

    /// Every session of `user`.
    pub fn sessions_of(&self, user: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let (_generation, keys) = self.generation();
        let (start, end) = keys.user_session_range(user);
        let mut sessions = Vec::new();
        for (key, _) in self.view.scan(&start, &end, MAX_SESSIONS_PER_USER * 2)? {
            let session_id = &key[start.len()..];
            if let Some(session) = self.view.get(&keys.session(session_id), || "session record".into())? {
                sessions.push(session);
            }
        }
        Ok(sessions)
    }

    /// Every signing key kept, and the state naming the active one.
    pub fn signing_keys(&self) -> Result<(Vec<SigningKeyRecord>, AuthState), StoreError> {
        let (_generation, keys) = self.generation();
        let (start, end) = keys.signing_key_range();
        let mut records = Vec::new();
        for (key, value) in self.view.scan(&start, &end, SIGNING_KEYS_KEPT * 4)? {
            records.push(
                SigningKeyRecord::decode(value.as_ref())
                    .map_err(|e| StoreError::corrupt(format!("signing key record {key:?}"), e))?,
            );
        }
        let state = self.view.get(&keys.auth_state(), || "auth state".into())?.unwrap_or_default();
        Ok((records, state))
    }

    pub fn auth_state(&self) -> Result<AuthState, StoreError> {
        let (_generation, keys) = self.generation();
        Ok(self.view.get(&keys.auth_state(), || "auth state".into())?.unwrap_or_default())
    }

    /// Accounts after `after`, in name order; `more` if others follow.
    pub fn users(&self, after: &str, limit: usize) -> Result<(Vec<UserRecord>, bool), QueryError> {
        let (_generation, keys) = self.generation();
        let (start, end) = keys.user_range();
        let from = if after.is_empty() {
            start
        } else {
            let mut k = keys.user(after);
            k.push(0);
            k
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let mut users = Vec::new();
        let scanned = self.view.scan(&from, &end, limit + 1)?;
        let more = scanned.len() > limit;
        for (key, value) in scanned.into_iter().take(limit) {
            users.push(
                UserRecord::decode(value.as_ref())
                    .map_err(|e| StoreError::corrupt(format!("user record {key:?}"), e))?,
            );
        }
        Ok((users, more))
    }

    pub fn external_identity(&self, issuer: &str, subject: &str) -> Result<Option<ExternalIdentityRecord>, StoreError> {
        let (_generation, keys) = self.generation();
        self.view.get(&keys.external_identity(issuer, subject), || "external identity record".into())
    }
}

impl ApplyBatch<'_> {
    fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.get(&self.keys.user(name), || format!("user record {name:?}"))
    }

    fn session(&self, session_id: &[u8]) -> Result<Option<SessionRecord>, StoreError> {
        self.get(&self.keys.session(session_id), || "session record".into())
    }

    /// `actor` is an enabled admin.
    fn is_admin(&self, actor: &str) -> Result<bool, StoreError> {
        Ok(!actor.is_empty() && self.user(actor)?.is_some_and(|u| u.admin && !u.disabled))
    }

    fn auth_state(&self) -> Result<AuthState, StoreError> {
        Ok(self.get(&self.keys.auth_state(), || "auth state".into())?.unwrap_or_default())
    }

    pub(super) fn create_user(&mut self, c: &CreateUser, ts_ms: u64) -> OpResult {
        if !c.actor.is_empty() && !self.is_admin(&c.actor)? {
            return Ok(Err(CommandError::Forbidden { reason: "only admins create accounts for others".into() }));
        }
        if c.admin && !c.bootstrap && !self.is_admin(&c.actor)? {
            return Ok(Err(CommandError::Forbidden { reason: "only admins make admins".into() }));
        }
        let mut state = self.auth_state()?;
        if self.user(&c.name)?.is_some() || (c.bootstrap && state.admin_bootstrapped) {
            return Ok(Err(CommandError::UserExists { user: c.name.clone() }));
        }
        if c.bootstrap {
            state.admin_bootstrapped = true;
            self.put(self.keys.auth_state(), state.encode_to_vec())?;
        }
        let user = UserRecord {
            name: c.name.clone(),
            password_phc: c.password_phc.clone(),
            credential_id: c.credential_id.clone(),
            created_ms: ts_ms,
            admin: c.admin,
            ..Default::default()
        };
        self.put(self.keys.user(&c.name), user.encode_to_vec())?;
        Ok(Ok(OpOutcome::Done { ts_ms }))
    }

    pub(super) fn create_session(&mut self, s: &CreateSession, ts_ms: u64) -> OpResult {
        let Some(user) = self.user(&s.user)? else { return Ok(Err(CommandError::InvalidCredentials)) };
        if user.credential_id.is_empty() || user.credential_id != s.credential_id {
            return Ok(Err(CommandError::InvalidCredentials));
        }
        self.new_session(&user, s, ts_ms)
    }

    /// Makes session `s` of `user` (whose credential was checked), ending their oldest session
    /// if they have too many.
    fn new_session(&mut self, user: &UserRecord, s: &CreateSession, ts_ms: u64) -> OpResult {
        if user.disabled {
            return Ok(Err(CommandError::UserDisabled { user: user.name.clone() }));
        }
        let created =
            |expires_ms: u64| OpOutcome::SessionCreated { user: user.name.clone(), expires_ms, admin: user.admin };
        if let Some(existing) = self.session(&s.session_id)? {
            // A retried entry (same id and secret): the session exists already.
            return Ok(if existing.user == user.name && existing.refresh_hash == s.refresh_hash {
                Ok(created(existing.expires_ms))
            } else {
                Err(CommandError::invalid("session_id", "taken"))
            });
        }
        let (start, end) = self.keys.user_session_range(&user.name);
        let theirs = self.keys_in(&start, &end, MAX_SESSIONS_PER_USER * 2)?;
        if theirs.len() >= MAX_SESSIONS_PER_USER {
            let mut oldest: Option<SessionRecord> = None;
            for key in &theirs {
                if let Some(session) = self.session(&key[start.len()..])? {
                    let older = oldest
                        .as_ref()
                        .is_none_or(|o| (session.created_ms, &session.session_id) < (o.created_ms, &o.session_id));
                    if older {
                        oldest = Some(session);
                    }
                }
            }
            if let Some(oldest) = oldest {
                self.end_session(&oldest)?;
                self.revocations.push(Revocation {
                    user: user.name.clone(),
                    session_id: Some(oldest.session_id.to_vec()),
                    before_ms: ts_ms,
                });
            }
        }
        let session = SessionRecord {
            session_id: s.session_id.clone(),
            user: user.name.clone(),
            refresh_hash: s.refresh_hash.clone(),
            device: s.device.clone(),
            created_ms: ts_ms,
            expires_ms: ts_ms.saturating_add(s.ttl_ms),
            touched_ms: ts_ms,
        };
        self.put(self.keys.session(&s.session_id), session.encode_to_vec())?;
        self.put(self.keys.user_session(&user.name, &s.session_id), Vec::new())?;
        Ok(Ok(created(ts_ms.saturating_add(s.ttl_ms))))
    }

    fn end_session(&mut self, session: &SessionRecord) -> Result<(), StoreError> {
        self.delete(self.keys.session(&session.session_id))?;
        self.delete(self.keys.user_session(&session.user, &session.session_id))
    }

    /// Ends every session of `user` and refuses every token issued before `ts_ms`.
    fn end_all_sessions(&mut self, user: &mut UserRecord, ts_ms: u64) -> Result<(), StoreError> {
        let (start, end) = self.keys.user_session_range(&user.name);
        for key in self.keys_in(&start, &end, MAX_SESSIONS_PER_USER * 2)? {
            if let Some(session) = self.session(&key[start.len()..])? {
                self.end_session(&session)?;
            } else {
                self.delete(key)?;
            }
        }
        user.revoked_before_ms = user.revoked_before_ms.max(ts_ms);
        self.revocations.push(Revocation { user: user.name.clone(), session_id: None, before_ms: ts_ms });
        Ok(())
    }

    pub(super) fn external_login(&mut self, e: &ExternalLogin, ts_ms: u64) -> OpResult {
        let Some(session) = &e.session else { return Ok(Err(CommandError::invalid("session", "missing"))) };
        let link_key = self.keys.external_identity(&e.issuer, &e.subject);
        let linked: Option<ExternalIdentityRecord> = self.get(&link_key, || "external identity record".into())?;
        let user = match linked {
            Some(link) => match self.user(&link.user)? {
                Some(user) => user,
                None => return Ok(Err(CommandError::UserNotFound { user: link.user })),
            },
            None if self.session(&session.session_id)?.is_some() => {
                return Ok(Err(CommandError::invalid("session_id", "taken")));
            }
            None => {
                // First use: a new account, named as the provider suggests, numbered if taken.
                let mut name = None;
                for n in 1..=100u32 {
                    let candidate = numbered(&e.preferred_name, n);
                    if limits::validate_user_name(&candidate).is_ok() && self.user(&candidate)?.is_none() {
                        name = Some(candidate);
                        break;
                    }
                }
                let Some(name) = name else {
                    return Ok(Err(CommandError::UserExists { user: e.preferred_name.clone() }));
                };
                let user = UserRecord {
                    name: name.clone(),
                    created_ms: ts_ms,
                    external_issuer: e.issuer.clone(),
                    external_subject: e.subject.clone(),
                    ..Default::default()
                };
                self.put(self.keys.user(&name), user.encode_to_vec())?;
                let link = ExternalIdentityRecord { issuer: e.issuer.clone(), subject: e.subject.clone(), user: name };
                self.put(link_key, link.encode_to_vec())?;
                user
            }
        };
        self.new_session(&user, session, ts_ms)
    }

    pub(super) fn revoke_sessions(&mut self, r: &RevokeSessions, ts_ms: u64) -> OpResult {
        if r.actor != r.user && !self.is_admin(&r.actor)? {
            return Ok(Err(CommandError::Forbidden { reason: "only admins end other users' sessions".into() }));
        }
        let Some(mut user) = self.user(&r.user)? else {
            return Ok(Err(CommandError::UserNotFound { user: r.user.clone() }));
        };
        if r.session_id.is_empty() {
            self.end_all_sessions(&mut user, ts_ms)?;
            self.put(self.keys.user(&user.name), user.encode_to_vec())?;
        } else if let Some(session) = self.session(&r.session_id)?.filter(|s| s.user == r.user) {
            self.end_session(&session)?;
            self.revocations.push(Revocation {
                user: user.name.clone(),
                session_id: Some(session.session_id.to_vec()),
                before_ms: ts_ms,
            });
        }
        // A session already gone (a retried logout) is not an error.
        Ok(Ok(OpOutcome::Done { ts_ms }))
    }

    pub(super) fn set_user_disabled(&mut self, d: &SetUserDisabled, ts_ms: u64) -> OpResult {
        if !self.is_admin(&d.actor)? {
            return Ok(Err(CommandError::Forbidden { reason: "only admins disable and enable accounts".into() }));
        }
        if d.actor == d.user && d.disabled {
            return Ok(Err(CommandError::Forbidden { reason: "an admin cannot disable their own account".into() }));
        }
        let Some(mut user) = self.user(&d.user)? else {
            return Ok(Err(CommandError::UserNotFound { user: d.user.clone() }));
        };
        if d.disabled && !user.disabled {
            self.end_all_sessions(&mut user, ts_ms)?;
        }
        user.disabled = d.disabled;
        self.put(self.keys.user(&user.name), user.encode_to_vec())?;
        Ok(Ok(OpOutcome::Done { ts_ms }))
    }

    pub(super) fn add_signing_key(&mut self, k: &AddSigningKey, ts_ms: u64) -> OpResult {
        if !k.actor.is_empty() && !self.is_admin(&k.actor)? {
            return Ok(Err(CommandError::Forbidden { reason: "only admins rotate signing keys".into() }));
        }
        let (start, end) = self.keys.signing_key_range();
        let existing = self.keys_in(&start, &end, SIGNING_KEYS_KEPT * 4)?;
        if k.only_if_none && !existing.is_empty() {
            return Ok(Err(CommandError::SigningKeyExists));
        }
        if existing.contains(&self.keys.signing_key(&k.kid)) {
            return Ok(Err(CommandError::invalid("kid", "a key with this id exists")));
        }
        let mut kept: Vec<SigningKeyRecord> = Vec::new();
        for key in &existing {
            if let Some(record) = self.get::<SigningKeyRecord>(key, || "signing key record".into())? {
                kept.push(record);
            }
        }
        // Newest first; the oldest beyond the limit go.
        kept.sort_by(|a, b| (b.created_ms, &b.kid).cmp(&(a.created_ms, &a.kid)));
        for old in kept.iter().skip(SIGNING_KEYS_KEPT - 1) {
            self.delete(self.keys.signing_key(&old.kid))?;
        }
        let record = SigningKeyRecord {
            kid: k.kid.clone(),
            private_pkcs8: k.private_pkcs8.clone(),
            public_key: k.public_key.clone(),
            created_ms: ts_ms,
        };
        self.put(self.keys.signing_key(&k.kid), record.encode_to_vec())?;
        let mut state = self.auth_state()?;
        state.active_kid = k.kid.clone();
        self.put(self.keys.auth_state(), state.encode_to_vec())?;
        Ok(Ok(OpOutcome::Done { ts_ms }))
    }

    pub(super) fn touch_session(&mut self, t: &TouchSession, ts_ms: u64) -> OpResult {
        if let Some(mut session) = self.session(&t.session_id)? {
            session.expires_ms = ts_ms.saturating_add(t.ttl_ms).max(session.expires_ms);
            session.touched_ms = ts_ms;
            self.put(self.keys.session(&t.session_id), session.encode_to_vec())?;
        }
        Ok(Ok(OpOutcome::Done { ts_ms }))
    }
}

/// `name`, or `name` with `n` added (shortened to stay a valid user name) for `n` > 1.
fn numbered(name: &str, n: u32) -> String {
    if n <= 1 {
        return name.to_owned();
    }
    let suffix = n.to_string();
    let mut base = name.to_owned();
    while base.len() + suffix.len() > MAX_USER_NAME_BYTES {
        base.pop();
    }
    base + &suffix
}

/// Checks the syntax of the meta group's operations (what `Limits::check_op` needs).
pub(crate) fn check_session(s: &CreateSession) -> Result<(), CommandError> {
    if s.session_id.len() != SESSION_ID_LEN {
        return Err(CommandError::invalid("session_id", "must be 16 bytes"));
    }
    if s.refresh_hash.len() != 32 {
        return Err(CommandError::invalid("refresh_hash", "must be a SHA-256 (32 bytes)"));
    }
    if s.device.len() > limits::MAX_DEVICE_BYTES || s.device.chars().any(char::is_control) {
        return Err(CommandError::invalid("device", "at most 64 bytes, no control characters"));
    }
    if !(MIN_SESSION_TTL_MS..=MAX_SESSION_TTL_MS).contains(&s.ttl_ms) {
        return Err(CommandError::invalid("ttl_ms", "between a minute and 400 days"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use chorus_proto::storage::op;

    use super::*;
    use crate::state_machine::fixture::{Fixture, refused};
    use crate::state_machine::{ShardEvent, create_room_op};

    fn credential(password: &str) -> Bytes {
        Bytes::copy_from_slice(ring::digest::digest(&ring::digest::SHA256, password.as_bytes()).as_ref())
    }

    fn user(name: &str, password: &str, admin: bool, actor: &str) -> op::Kind {
        op::Kind::CreateUser(CreateUser {
            name: name.into(),
            password_phc: format!("$argon2id$fake${password}"),
            credential_id: credential(&format!("$argon2id$fake${password}")),
            admin,
            actor: actor.into(),
            bootstrap: false,
        })
    }

    fn first_admin(name: &str) -> op::Kind {
        let mut op = user(name, "pw", true, "");
        if let op::Kind::CreateUser(u) = &mut op {
            u.bootstrap = true;
        }
        op
    }

    fn session_of(name: &str, id: u8, password: &str) -> CreateSession {
        CreateSession {
            session_id: Bytes::from(vec![id; SESSION_ID_LEN]),
            user: name.into(),
            refresh_hash: Bytes::from(vec![id; 32]),
            device: "laptop".into(),
            ttl_ms: 3_600_000,
            credential_id: credential(&format!("$argon2id$fake${password}")),
        }
    }

    fn session(name: &str, id: u8, password: &str) -> op::Kind {
        op::Kind::CreateSession(session_of(name, id, password))
    }

    fn revoke(name: &str, id: Option<u8>, actor: &str) -> op::Kind {
        op::Kind::RevokeSessions(RevokeSessions {
            user: name.into(),
            session_id: id.map(|id| Bytes::from(vec![id; SESSION_ID_LEN])).unwrap_or_default(),
            actor: actor.into(),
        })
    }

    #[tokio::test]
    async fn a_user_name_is_taken_once() {
        let mut f = Fixture::meta();
        assert_eq!(f.apply_one(10, user("ann", "pw", false, "")).await, Ok(OpOutcome::Done { ts_ms: 10 }));
        let before = f.sm_contents();
        assert_eq!(refused(f.apply_one(11, user("ann", "other", false, "")).await), "user_exists");
        assert_eq!(f.sm_contents(), before, "a refused account writes nothing");
        let ann = f.sm.reader().user("ann").unwrap().unwrap();
        assert_eq!((ann.created_ms, ann.admin, ann.password_phc.as_str()), (10, false, "$argon2id$fake$pw"));
    }

    #[tokio::test]
    async fn a_session_needs_the_credential_the_node_checked_and_an_enabled_account() {
        let mut f = Fixture::meta();
        f.apply_one(1, first_admin("admin")).await.unwrap();
        f.apply_one(1, user("ann", "pw", false, "")).await.unwrap();
        assert_eq!(refused(f.apply_one(2, session("ann", 1, "stale")).await), "invalid_credentials");
        assert_eq!(refused(f.apply_one(2, session("nobody", 1, "pw")).await), "invalid_credentials");
        assert_eq!(
            f.apply_one(3, session("ann", 1, "pw")).await,
            Ok(OpOutcome::SessionCreated { user: "ann".into(), expires_ms: 3 + 3_600_000, admin: false })
        );
        // The same entry again (a retried proposal) finds its session made.
        assert!(matches!(f.apply_one(4, session("ann", 1, "pw")).await, Ok(OpOutcome::SessionCreated { .. })));
        let disable = |disabled| {
            op::Kind::SetUserDisabled(SetUserDisabled { user: "ann".into(), disabled, actor: "admin".into() })
        };
        f.apply_one(5, disable(true)).await.unwrap();
        assert_eq!(refused(f.apply_one(6, session("ann", 2, "pw")).await), "user_disabled");
        let ann = f.sm.reader().user("ann").unwrap().unwrap();
        assert!(ann.disabled);
        assert_eq!(ann.revoked_before_ms, 5, "disabling ends every token issued before");
        assert!(f.sm.reader().sessions_of("ann").unwrap().is_empty());
        f.apply_one(7, disable(false)).await.unwrap();
        f.apply_one(8, session("ann", 2, "pw")).await.unwrap();
    }

    #[tokio::test]
    async fn revocations_end_one_or_every_session_and_are_announced() {
        let mut f = Fixture::meta();
        let mut events = f.sm.reader().subscribe();
        f.apply_one(1, user("ann", "pw", false, "")).await.unwrap();
        for id in 1..=3 {
            f.apply_one(2, session("ann", id, "pw")).await.unwrap();
        }
        assert_eq!(f.sm.reader().sessions_of("ann").unwrap().len(), 3);
        f.apply_one(3, revoke("ann", Some(2), "ann")).await.unwrap();
        let left: Vec<u8> = f.sm.reader().sessions_of("ann").unwrap().iter().map(|s| s.session_id[0]).collect();
        assert_eq!(left, vec![1, 3]);
        // Another user may not end ann's sessions; a retried logout is harmless.
        f.apply_one(3, user("bob", "pw", false, "")).await.unwrap();
        assert_eq!(refused(f.apply_one(4, revoke("ann", None, "bob")).await), "forbidden");
        f.apply_one(5, revoke("ann", Some(2), "ann")).await.unwrap();
        f.apply_one(6, revoke("ann", None, "ann")).await.unwrap();
        assert!(f.sm.reader().sessions_of("ann").unwrap().is_empty());
        assert_eq!(f.sm.reader().user("ann").unwrap().unwrap().revoked_before_ms, 6);
        let mut seen = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let ShardEvent::Revoked(r) = event {
                seen.push((r.user.clone(), r.session_id.as_ref().map(|s| s[0]), r.before_ms));
            }
        }
        assert_eq!(seen, vec![("ann".into(), Some(2), 3), ("ann".into(), None, 6)]);
    }

    #[tokio::test]
    async fn only_admins_make_accounts_for_others_disable_them_or_rotate_keys() {
        let mut f = Fixture::meta();
        f.apply_one(1, user("ann", "pw", false, "")).await.unwrap();
        assert_eq!(refused(f.apply_one(2, user("bob", "pw", false, "ann")).await), "forbidden");
        assert_eq!(
            refused(f.apply_one(2, user("eve", "pw", true, "")).await),
            "forbidden",
            "nobody makes themself admin"
        );
        f.apply_one(3, first_admin("admin")).await.unwrap();
        assert_eq!(refused(f.apply_one(4, first_admin("admin2")).await), "user_exists", "the first admin is made once");
        f.apply_one(5, user("bob", "pw", false, "admin")).await.unwrap();
        let disable = |user: &str, actor: &str| {
            op::Kind::SetUserDisabled(SetUserDisabled { user: user.into(), disabled: true, actor: actor.into() })
        };
        assert_eq!(refused(f.apply_one(6, disable("bob", "ann")).await), "forbidden");
        assert_eq!(refused(f.apply_one(6, disable("admin", "admin")).await), "forbidden");
        assert_eq!(refused(f.apply_one(6, disable("nobody", "admin")).await), "user_not_found");
        let key = |kid: &str, only_if_none: bool, actor: &str| {
            op::Kind::AddSigningKey(AddSigningKey {
                kid: kid.into(),
                private_pkcs8: Bytes::from_static(b"pkcs8"),
                public_key: Bytes::from(vec![7; 32]),
                only_if_none,
                actor: actor.into(),
            })
        };
        f.apply_one(7, key("k1", true, "")).await.unwrap();
        assert_eq!(refused(f.apply_one(8, key("k2", true, "")).await), "key_exists");
        assert_eq!(refused(f.apply_one(8, key("k2", false, "ann")).await), "forbidden");
        for (i, kid) in ["k2", "k3", "k4", "k5"].into_iter().enumerate() {
            f.apply_one(10 + i as u64, key(kid, false, "admin")).await.unwrap();
        }
        let (keys, state) = f.sm.reader().signing_keys().unwrap();
        let mut kids: Vec<_> = keys.into_iter().map(|k| k.kid).collect();
        kids.sort();
        assert_eq!(kids, ["k2", "k3", "k4", "k5"], "the newest four are kept");
        assert_eq!(state.active_kid, "k5");
        assert!(state.admin_bootstrapped);
    }

    #[tokio::test]
    async fn an_external_identity_maps_to_one_user_named_on_first_use() {
        let mut f = Fixture::meta();
        f.apply_one(1, user("ann", "pw", false, "")).await.unwrap();
        let external = |subject: &str, id: u8| {
            op::Kind::ExternalLogin(ExternalLogin {
                issuer: "https://id.example".into(),
                subject: subject.into(),
                preferred_name: "ann".into(),
                session: Some(session_of("ignored", id, "")),
            })
        };
        let first = f.apply_one(2, external("sub-1", 1)).await.unwrap();
        assert!(matches!(&first, OpOutcome::SessionCreated { user, .. } if user == "ann2"), "{first:?}");
        let again = f.apply_one(3, external("sub-1", 2)).await.unwrap();
        assert!(matches!(&again, OpOutcome::SessionCreated { user, .. } if user == "ann2"), "the same user: {again:?}");
        let other = f.apply_one(4, external("sub-2", 3)).await.unwrap();
        assert!(matches!(&other, OpOutcome::SessionCreated { user, .. } if user == "ann3"), "{other:?}");
        let ann2 = f.sm.reader().user("ann2").unwrap().unwrap();
        assert_eq!(ann2.external_subject, "sub-1");
        // An external account has no password to sign in with.
        assert_eq!(refused(f.apply_one(5, session("ann2", 9, "")).await), "invalid_credentials");
        assert_eq!(f.sm.reader().external_identity("https://id.example", "sub-1").unwrap().unwrap().user, "ann2");
    }

    #[tokio::test]
    async fn a_users_oldest_session_goes_when_they_have_too_many() {
        let mut f = Fixture::meta();
        f.apply_one(1, user("ann", "pw", false, "")).await.unwrap();
        for i in 0..=MAX_SESSIONS_PER_USER {
            let mut s = session_of("ann", 0, "pw");
            s.session_id = Bytes::from([(i as u64).to_be_bytes(), [1; 8]].concat());
            f.apply_one(10 + i as u64, op::Kind::CreateSession(s)).await.unwrap();
        }
        let sessions = f.sm.reader().sessions_of("ann").unwrap();
        assert_eq!(sessions.len(), MAX_SESSIONS_PER_USER);
        assert!(sessions.iter().all(|s| s.created_ms > 10), "the oldest (created at 10) went");
    }

    #[tokio::test]
    async fn account_and_room_operations_go_to_their_own_groups() {
        let mut meta = Fixture::meta();
        assert_eq!(refused(meta.apply_one(1, create_room_op("r", "ann")).await), "internal");
        let mut rooms = Fixture::new();
        assert_eq!(refused(rooms.apply_one(1, user("ann", "pw", false, "")).await), "internal");
    }
}
