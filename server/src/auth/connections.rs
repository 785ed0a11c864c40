//! The node's signed-in client connections, by user, and their revocation.
//!
//! Each connection has one [`ConnectionAuth`]: anonymous until a token or a sign-in request
//! signs it in, then signed in as one user for the rest of its life (a fresh token of the same
//! user renews it without touching its streams). When the meta group applies a revocation
//! (logout, log out everywhere, a disabled account), every node's replica tells its
//! [`watch_revocations`] task at once; it marks each affected connection revoked, which ends its
//! subscriptions with `token_revoked`, and closes it a moment later. Measured from the commit,
//! that is the time to apply one entry on each node: milliseconds, well within the 2 s bound.
//! A replica that installs a snapshot may have skipped revocations, so then every connection
//! is checked again against the replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chorus_raft::{Revocation, ShardEvent};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{Identity, expiry_leeway, now_ms};
use crate::error::ServiceError;
use crate::node::Node;

/// How long a revoked connection stays open for its subscriptions to say why they end.
const CLOSE_AFTER: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignIn {
    Anonymous,
    SignedIn(Arc<Identity>),
    /// The session ended; the connection is closing.
    Revoked(String),
}

/// One connection's sign-in.
pub struct ConnectionAuth {
    state: watch::Sender<SignIn>,
    revoked: CancellationToken,
    quic: Option<quinn::Connection>,
    token_ttl: Duration,
}

impl ConnectionAuth {
    pub fn new(quic: Option<quinn::Connection>, token_ttl: Duration) -> Arc<ConnectionAuth> {
        Arc::new(ConnectionAuth {
            state: watch::Sender::new(SignIn::Anonymous),
            revoked: CancellationToken::new(),
            quic,
            token_ttl,
        })
    }

    /// The signed-in identity, if the sign-in is still valid (its token has not expired).
    pub fn identity(&self) -> Result<Arc<Identity>, ServiceError> {
        match &*self.state.borrow() {
            SignIn::Anonymous => Err(ServiceError::Unauthenticated(
                "sign in first: Hello with an access token, or Register, Login or Refresh".into(),
            )),
            SignIn::Revoked(reason) => Err(ServiceError::TokenRevoked(reason.clone())),
            SignIn::SignedIn(identity) => {
                if now_ms() > identity.expires_ms + expiry_leeway(self.token_ttl).as_millis() as u64 {
                    Err(ServiceError::TokenExpired(
                        "this connection's access token expired: refresh it and say Hello again".into(),
                    ))
                } else {
                    Ok(identity.clone())
                }
            }
        }
    }

    /// The user this connection is signed in as, even if its token has expired.
    pub fn user(&self) -> Option<String> {
        match &*self.state.borrow() {
            SignIn::SignedIn(identity) => Some(identity.user.clone()),
            _ => None,
        }
    }

    pub fn watch(&self) -> watch::Receiver<SignIn> {
        self.state.subscribe()
    }

    /// Cancelled once the connection's session is revoked.
    pub fn revoked(&self) -> &CancellationToken {
        &self.revoked
    }

    /// When the current sign-in stops being valid (its token's expiry, plus the leeway);
    /// `None` when not signed in.
    pub fn valid_until_ms(&self) -> Option<u64> {
        match &*self.state.borrow() {
            SignIn::SignedIn(identity) => Some(identity.expires_ms + expiry_leeway(self.token_ttl).as_millis() as u64),
            _ => None,
        }
    }
}

/// Every signed-in connection of the node, by user.
#[derive(Default)]
pub struct Connections {
    by_user: Mutex<HashMap<String, Vec<Weak<ConnectionAuth>>>>,
}

impl Connections {
    /// Signs `connection` in as `identity`: for the first time, or again with a fresh token of
    /// the same user.
    pub fn sign_in(&self, connection: &Arc<ConnectionAuth>, identity: Identity) -> Result<(), ServiceError> {
        let mut first = false;
        let mut refused = None;
        connection.state.send_if_modified(|state| match state {
            SignIn::Revoked(reason) => {
                refused = Some(ServiceError::TokenRevoked(reason.clone()));
                false
            }
            SignIn::SignedIn(current) if current.user != identity.user => {
                refused = Some(ServiceError::HelloTwice(current.user.clone()));
                false
            }
            SignIn::SignedIn(_) => {
                *state = SignIn::SignedIn(Arc::new(identity.clone()));
                true
            }
            SignIn::Anonymous => {
                first = true;
                *state = SignIn::SignedIn(Arc::new(identity.clone()));
                true
            }
        });
        if let Some(e) = refused {
            return Err(e);
        }
        if first {
            let mut by_user = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
            let list = by_user.entry(identity.user.clone()).or_default();
            list.retain(|c| c.strong_count() > 0);
            list.push(Arc::downgrade(connection));
        }
        Ok(())
    }

    /// The live connections of `user` (all users when `None`).
    fn live(&self, user: Option<&str>) -> Vec<Arc<ConnectionAuth>> {
        let mut by_user = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        by_user.retain(|_, list| {
            list.retain(|c| c.strong_count() > 0);
            !list.is_empty()
        });
        match user {
            Some(user) => by_user.get(user).map(|l| l.iter().filter_map(Weak::upgrade).collect()).unwrap_or_default(),
            None => by_user.values().flatten().filter_map(Weak::upgrade).collect(),
        }
    }

    /// How many connections are signed in.
    pub fn count(&self) -> usize {
        self.live(None).len()
    }
}

/// Ends `connection`'s sign-in: its streams see `token_revoked`, and it closes shortly after.
fn revoke(node: &Node, connection: &ConnectionAuth, reason: &str) {
    let changed = connection.state.send_if_modified(|state| {
        if matches!(state, SignIn::Revoked(_)) {
            return false;
        }
        *state = SignIn::Revoked(reason.to_owned());
        true
    });
    if !changed {
        return;
    }
    connection.revoked.cancel();
    if let Some(quic) = connection.quic.clone() {
        let reason = reason.to_owned();
        node.client_tasks.spawn(async move {
            tokio::time::sleep(CLOSE_AFTER).await;
            quic.close(crate::front_door::close_codes::SESSION_REVOKED.into(), reason.as_bytes());
        });
    }
}

fn applies_to(revocation: &Revocation, identity: &Identity) -> bool {
    match &revocation.session_id {
        Some(session) => session.as_slice() == identity.session_id,
        None => true,
    }
}

/// Checks a connection's sign-in against the meta replica as it is now: the reason it no
/// longer stands, if so. A replica that cannot be read leaves the connection be.
fn still_valid(node: &Node, identity: &Identity) -> Result<(), String> {
    let reader = node.meta_reader().map_err(|e| e.to_string())?;
    let checked = reader.session(&identity.session_id).map_err(ServiceError::from).and_then(|session| {
        super::tokens::standing(reader, session, Some(&identity.user), Some(identity.issued_ms), now_ms())
    });
    match checked {
        Ok(_) => Ok(()),
        Err(ServiceError::TokenRevoked(reason)) => Err(reason),
        Err(e) => {
            tracing::warn!(error = %e, user = %identity.user, "checking a signed-in connection");
            Ok(())
        }
    }
}

/// Follows the meta replica's revocations until the node shuts down (see the module docs).
pub async fn watch_revocations(node: Arc<Node>) {
    let Ok(reader) = node.meta_reader().cloned() else { return };
    let mut events = reader.subscribe();
    loop {
        let event = tokio::select! {
            _ = node.peers_shutdown.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(ShardEvent::Revoked(revocation)) => {
                for connection in node.connections.live(Some(&revocation.user)) {
                    let SignIn::SignedIn(identity) = connection.state.borrow().clone() else { continue };
                    if applies_to(&revocation, &identity) {
                        let reason = match revocation.session_id {
                            Some(_) => "the session was signed out",
                            None => "every session of the account was ended",
                        };
                        tracing::info!(user = %identity.user, session = %identity.session_hex(), "closing a revoked connection");
                        revoke(&node, &connection, reason);
                    }
                }
            }
            Ok(ShardEvent::SnapshotInstalled) | Err(broadcast::error::RecvError::Lagged(_)) => {
                for connection in node.connections.live(None) {
                    let SignIn::SignedIn(identity) = connection.state.borrow().clone() else { continue };
                    if let Err(reason) = still_valid(&node, &identity) {
                        revoke(&node, &connection, &reason);
                    }
                }
            }
            Ok(ShardEvent::Appended(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
