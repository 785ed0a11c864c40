//! Accounts and sessions: Register, Login, Refresh, LoginExternal (each signs the connection in
//! and returns a session's tokens), Logout, ListSessions and WhoAmI.
//!
//! Passwords are checked and hashed here, on the node that received them (off the async
//! runtime, see [`crate::auth::passwords`]); only hashes go through Raft. A session is created
//! by the meta group against the exact credential checked, so a password changed in between
//! (or an account re-created) makes the sign-in fail rather than succeed on stale data.

use std::time::Duration;

use chorus_proto::client::{
    LoggedOut, Login, LoginExternal, Logout, Refresh, Register, SessionInfo, SessionList, SignedIn, WhoAmIReply,
};
use chorus_proto::storage::{CreateSession, ExternalLogin, RevokeSessions, TouchSession, op};
use chorus_raft::OpOutcome;
use chorus_raft::keys::META_SHARD;

use crate::auth::refresh::{self, NewRefresh};
use crate::auth::{self, Identity, hex, normalize_user, now_ms, passwords, tokens};
use crate::config::Registration;
use crate::error::ServiceError;
use crate::forward;
use crate::front_door::Session;
use crate::node::Node;

/// A session is extended when it is refreshed at least this long after it was last extended.
const TOUCH_EVERY: Duration = Duration::from_secs(24 * 3600);

fn check_device(device: &str) -> Result<String, ServiceError> {
    let device = device.trim();
    if device.len() > chorus_raft::limits::MAX_DEVICE_BYTES || device.chars().any(char::is_control) {
        return Err(ServiceError::InvalidArgument(
            "the device name must be at most 64 bytes, without control characters".into(),
        ));
    }
    Ok(if device.is_empty() { "unnamed device".into() } else { device.to_owned() })
}

/// Signing in is possible once the cluster has its signing key (made when it first starts):
/// until then, nothing is written and the client is told to retry.
fn check_signing_key(node: &Node) -> Result<(), ServiceError> {
    let state = node.meta_reader()?.auth_state()?;
    if state.active_kid.is_empty() {
        return Err(ServiceError::Unavailable { reason: "the cluster is starting: it has no signing key yet".into() });
    }
    Ok(())
}

fn new_session(node: &Node, user: &str, refresh: &NewRefresh, device: String, credential_id: &[u8]) -> CreateSession {
    CreateSession {
        session_id: refresh.session_id.to_vec().into(),
        user: user.to_owned(),
        refresh_hash: refresh.hash.to_vec().into(),
        device,
        ttl_ms: node.config.auth.session_ttl.as_millis() as u64,
        credential_id: credential_id.to_vec().into(),
    }
}

/// The answer to a sign-in: a fresh access token, and the connection signed in with it (unless
/// it is signed in as someone else already: a connection has one user for life).
fn signed_in(
    node: &Node,
    session: &Session,
    user: &str,
    session_id: &[u8; 16],
    admin: bool,
    refresh_token: String,
    session_expires_ms: u64,
) -> Result<SignedIn, ServiceError> {
    let issued = tokens::issue(node, user, session_id, admin)?;
    let identity = Identity {
        user: user.to_owned(),
        session_id: *session_id,
        admin,
        issued_ms: issued.issued_ms,
        expires_ms: issued.expires_ms,
    };
    if session.auth.user().is_none_or(|u| u == user) {
        node.connections.sign_in(&session.auth, identity)?;
        session.went_online(node);
    }
    Ok(SignedIn {
        user: user.to_owned(),
        access_token: issued.token,
        access_expires_ms: issued.expires_ms,
        refresh_token,
        session_id: hex(session_id),
        session_expires_ms,
        admin,
    })
}

fn session_created(outcome: Result<OpOutcome, ServiceError>) -> Result<(String, u64, bool), ServiceError> {
    match outcome? {
        OpOutcome::SessionCreated { user, expires_ms, admin } => Ok((user, expires_ms, admin)),
        other => Err(ServiceError::Internal(format!("a new session answered with {other:?}"))),
    }
}

pub async fn register(node: &Node, session: &Session, r: Register) -> Result<SignedIn, ServiceError> {
    check_signing_key(node)?;
    match node.config.auth.registration {
        Registration::Closed => {
            return Err(ServiceError::Forbidden(
                "registration is closed on this cluster: ask an admin to create your account".into(),
            ));
        }
        Registration::Token => {
            let expected = node.config.auth.registration_token.as_ref().map(|t| t.expose()).unwrap_or_default();
            let given = refresh::sha256(r.registration_token.as_bytes());
            if expected.is_empty() || !refresh::same(&given, &refresh::sha256(expected.as_bytes())) {
                return Err(ServiceError::Forbidden("the registration token is wrong".into()));
            }
        }
        Registration::Open => {}
    }
    let name = normalize_user(&r.user);
    chorus_raft::limits::validate_user_name(&name)?;
    if auth::RESERVED_USER_NAMES.contains(&name.as_str()) {
        return Err(ServiceError::Forbidden(format!("the name {name:?} is reserved")));
    }
    passwords::check_strength(&r.password)?;
    let device = check_device(&r.device)?;
    node.rate.registration(session.remote.ip())?;
    let account = passwords::new_account(name.clone(), &r.password, false, "").await?;
    let refresh = refresh::new_refresh();
    // One entry: the account, and a session against its credential. If the name is taken, the
    // session is refused too (it names another credential).
    let first_session = new_session(node, &name, &refresh, device, &account.credential_id);
    let ops = vec![op::Kind::CreateUser(account), op::Kind::CreateSession(first_session)];
    let span = tracing::info_span!("register", user = %name);
    let mut results = tracing::Instrument::instrument(forward::propose(node, META_SHARD, ops), span).await?;
    if results.len() != 2 {
        return Err(ServiceError::Internal(format!("{} results for a registration", results.len())));
    }
    let created = results.remove(1);
    results.remove(0)?;
    let (user, expires_ms, admin) = session_created(created)?;
    tracing::info!(%user, "registered");
    signed_in(node, session, &user, &refresh.session_id, admin, refresh.token, expires_ms)
}

pub async fn login(node: &Node, session: &Session, l: Login) -> Result<SignedIn, ServiceError> {
    check_signing_key(node)?;
    let name = normalize_user(&l.user);
    let address = session.remote.ip();
    node.rate.login_allowed(&name, address)?;
    let device = check_device(&l.device)?;
    let user = if chorus_raft::limits::validate_user_name(&name).is_ok() {
        node.read_meta(|r| Ok(r.user(&name)?), Option::is_some).await?
    } else {
        None
    };
    let phc = user.as_ref().filter(|u| !u.password_phc.is_empty()).map(|u| u.password_phc.clone());
    let matches = passwords::verify(phc, &l.password).await?;
    let user = match user {
        Some(user) if matches => user,
        _ => {
            node.rate.login_failed(&name, address);
            tracing::info!(user = %name, remote = %session.remote, "failed sign-in");
            return Err(chorus_raft::CommandError::InvalidCredentials.into());
        }
    };
    if user.disabled {
        return Err(chorus_raft::CommandError::UserDisabled { user: user.name }.into());
    }
    let refresh = refresh::new_refresh();
    let op = op::Kind::CreateSession(new_session(node, &user.name, &refresh, device, &user.credential_id));
    let (user, expires_ms, admin) = session_created(forward::propose_one(node, META_SHARD, op).await)?;
    signed_in(node, session, &user, &refresh.session_id, admin, refresh.token, expires_ms)
}

pub async fn refresh(node: &Node, session: &Session, r: Refresh) -> Result<SignedIn, ServiceError> {
    check_signing_key(node)?;
    let address = session.remote.ip();
    let (session_id, hash) = refresh::parse(&r.refresh_token)
        .ok_or_else(|| ServiceError::Unauthenticated("malformed refresh token".into()))?;
    node.rate.address_allowed(address)?;
    let record = node.read_meta(|m| Ok(m.session(&session_id)?), Option::is_some).await?;
    if record.as_ref().is_some_and(|r| !refresh::same(&hash, &r.refresh_hash)) {
        node.rate.address_failed(address);
        return Err(ServiceError::Unauthenticated("wrong refresh token".into()));
    }
    let now = now_ms();
    let (record, user) = tokens::standing(node.meta_reader()?, record, None, None, now)?;
    if now.saturating_sub(record.touched_ms) >= TOUCH_EVERY.as_millis() as u64 {
        // Extends the session; a failure only means the next refresh tries again.
        let op = op::Kind::TouchSession(TouchSession {
            session_id: record.session_id.clone(),
            ttl_ms: node.config.auth.session_ttl.as_millis() as u64,
        });
        if let Err(e) = forward::propose_one(node, META_SHARD, op).await {
            tracing::debug!(error = %e, "extending a session");
        }
    }
    signed_in(node, session, &user.name, &session_id, user.admin, r.refresh_token, record.expires_ms)
}

pub async fn login_external(node: &Node, session: &Session, l: LoginExternal) -> Result<SignedIn, ServiceError> {
    check_signing_key(node)?;
    let Some(verifier) = node.external.as_ref() else {
        return Err(ServiceError::Forbidden("no external identity provider is configured on this cluster".into()));
    };
    let address = session.remote.ip();
    node.rate.address_allowed(address)?;
    let device = check_device(&l.device)?;
    let external = match verifier.verify(&l.token).await {
        Ok(external) => external,
        Err(e) => {
            node.rate.address_failed(address);
            return Err(e);
        }
    };
    let refresh = refresh::new_refresh();
    let op = op::Kind::ExternalLogin(ExternalLogin {
        issuer: external.issuer,
        subject: external.subject,
        preferred_name: external.preferred_name.clone(),
        session: Some(new_session(node, &external.preferred_name, &refresh, device, &[])),
    });
    let (user, expires_ms, admin) = session_created(forward::propose_one(node, META_SHARD, op).await)?;
    signed_in(node, session, &user, &refresh.session_id, admin, refresh.token, expires_ms)
}

pub async fn logout(node: &Node, me: &Identity, l: Logout) -> Result<LoggedOut, ServiceError> {
    let session_id = if l.all {
        Vec::new()
    } else if l.session_id.is_empty() {
        me.session_id.to_vec()
    } else {
        auth::unhex::<16>(&l.session_id)
            .ok_or_else(|| ServiceError::InvalidArgument("a session id is 32 hex digits".into()))?
            .to_vec()
    };
    let op = op::Kind::RevokeSessions(RevokeSessions {
        user: me.user.clone(),
        session_id: session_id.into(),
        actor: me.user.clone(),
    });
    forward::propose_one(node, META_SHARD, op).await?;
    Ok(LoggedOut {})
}

pub async fn list_sessions(node: &Node, me: &Identity) -> Result<SessionList, ServiceError> {
    let sessions = node.meta_reader()?.sessions_of(&me.user)?;
    Ok(SessionList {
        sessions: sessions
            .into_iter()
            .map(|s| SessionInfo {
                current: s.session_id.as_ref() == me.session_id,
                session_id: hex(&s.session_id),
                device: s.device,
                created_ms: s.created_ms,
                expires_ms: s.expires_ms,
            })
            .collect(),
    })
}

pub fn whoami(me: &Identity) -> WhoAmIReply {
    WhoAmIReply {
        user: me.user.clone(),
        session_id: me.session_hex(),
        admin: me.admin,
        access_expires_ms: me.expires_ms,
    }
}
