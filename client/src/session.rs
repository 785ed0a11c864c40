//! Signing in: registering, logging in (with a password or an external provider's token), and
//! keeping the session's access token fresh.
//!
//! A [`Client`] holds at most one session ([`SessionTokens`]). Every connection it opens says
//! Hello with the session's access token; a connection whose token expired refreshes it on the
//! spot (Refresh, then Hello). In the background, the client refreshes the token before it
//! expires (at two thirds of its life) and renews every open connection's sign-in with a Hello
//! of the fresh token, so subscriptions never end for an expired token. A request that meets
//! `token_expired` anyway (a laptop that slept) refreshes and is retried; `token_revoked` and
//! `unauthenticated` end the session: sign in again.

use std::time::Duration;

use chorus_proto::client::{self as pb, request, response};
use serde::{Deserialize, Serialize};

use crate::{Client, ClientError, call_on, keep_alive_interval, unexpected};

/// A signed-in session: what a program keeps to stay signed in. `refresh_token` is a secret
/// (store it where only its owner can read it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTokens {
    pub user: String,
    pub refresh_token: String,
    /// Hex; names the session in [`Client::sessions`] and [`Client::logout_session`].
    pub session_id: String,
    pub admin: bool,
    #[serde(default)]
    pub access_token: String,
    #[serde(default)]
    pub access_expires_ms: u64,
    #[serde(default)]
    pub session_expires_ms: u64,
}

impl SessionTokens {
    fn from_signed_in(s: pb::SignedIn) -> SessionTokens {
        SessionTokens {
            user: s.user,
            refresh_token: s.refresh_token,
            session_id: s.session_id,
            admin: s.admin,
            access_token: s.access_token,
            access_expires_ms: s.access_expires_ms,
            session_expires_ms: s.session_expires_ms,
        }
    }
}

/// How a client signs in when it connects.
#[derive(Debug, Clone, Default)]
pub enum Credentials {
    /// Not signed in: only Register, Login and LoginExternal work.
    #[default]
    Anonymous,
    /// An existing session (e.g. read from a file).
    Session(SessionTokens),
    Password {
        user: String,
        password: String,
    },
    /// Register the user if the name is free, else log in with the password (tests, the
    /// benchmark, the chaos workload).
    RegisterOrLogin {
        user: String,
        password: String,
    },
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// When a token expiring at `expires_ms` should be refreshed: two thirds into the time left
/// (at least 1 s from now), or at once if less than 2 s are left.
pub(crate) fn refresh_due_in(expires_ms: u64, now_ms: u64) -> Duration {
    let left = expires_ms.saturating_sub(now_ms);
    if left < 2_000 {
        return Duration::ZERO;
    }
    Duration::from_millis((left * 2 / 3).max(1_000))
}

fn signed_in(reply: response::Kind, what: &str) -> Result<pb::SignedIn, ClientError> {
    match reply {
        response::Kind::SignedIn(s) => Ok(s),
        other => Err(unexpected(what, other)),
    }
}

impl Client {
    /// The session, if signed in.
    pub fn session(&self) -> Option<SessionTokens> {
        self.inner.session.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The signed-in user, if any.
    pub fn user(&self) -> Option<String> {
        self.session().map(|s| s.user)
    }

    pub(crate) fn access_token(&self) -> Option<(String, u64)> {
        self.session().map(|s| (s.access_token, s.access_expires_ms))
    }

    fn adopt(&self, tokens: SessionTokens) {
        let renewed = {
            let mut session = self.inner.session.lock().unwrap_or_else(|p| p.into_inner());
            let same = session.as_ref().is_some_and(|s| s.session_id == tokens.session_id);
            *session = Some(tokens);
            same
        };
        if !renewed {
            // Direct connections signed in as the previous session (or none): open them anew.
            self.routes().close_all();
        }
        self.inner.session_changed.notify_waiters();
    }

    /// Creates an account and signs in as it. `registration_token`: when the cluster's
    /// registration needs one. If an attempt's outcome was lost in a failover and the retry
    /// finds the name taken, the client logs in with the password: the account is ours.
    pub async fn register(
        &self,
        user: &str,
        password: &str,
        registration_token: &str,
    ) -> Result<SessionTokens, ClientError> {
        let kind = request::Kind::Register(pb::Register {
            user: user.to_owned(),
            password: password.to_owned(),
            device: self.inner.options.device.clone(),
            registration_token: registration_token.to_owned(),
        });
        match self.call(kind).await {
            Ok(reply) => {
                let tokens = SessionTokens::from_signed_in(signed_in(reply, "register")?);
                self.adopt(tokens.clone());
                Ok(tokens)
            }
            Err(ClientError::MaybeApplied { last }) if last.code() == Some("user_exists") => {
                self.login(user, password).await
            }
            Err(e) => Err(e),
        }
    }

    /// Signs in with a password (a new session).
    pub async fn login(&self, user: &str, password: &str) -> Result<SessionTokens, ClientError> {
        let kind = request::Kind::Login(pb::Login {
            user: user.to_owned(),
            password: password.to_owned(),
            device: self.inner.options.device.clone(),
        });
        let tokens = SessionTokens::from_signed_in(signed_in(self.call(kind).await?, "login")?);
        self.adopt(tokens.clone());
        Ok(tokens)
    }

    /// Registers `user`, or logs in if the name is taken.
    pub async fn register_or_login(&self, user: &str, password: &str) -> Result<SessionTokens, ClientError> {
        match self.register(user, password, "").await {
            Err(e) if e.code() == Some("user_exists") => self.login(user, password).await,
            other => other,
        }
    }

    /// Signs in with a token of the cluster's external identity provider.
    pub async fn login_external(&self, token: &str) -> Result<SessionTokens, ClientError> {
        let kind = request::Kind::LoginExternal(pb::LoginExternal {
            token: token.to_owned(),
            device: self.inner.options.device.clone(),
        });
        let tokens = SessionTokens::from_signed_in(signed_in(self.call(kind).await?, "external login")?);
        self.adopt(tokens.clone());
        Ok(tokens)
    }

    /// Uses an existing session from now on.
    pub fn use_session(&self, tokens: SessionTokens) {
        self.adopt(tokens);
    }

    /// A fresh access token for the session, on `connection` (which it also signs in).
    pub(crate) async fn refresh_on(&self, connection: &quinn::Connection) -> Result<(), ClientError> {
        let Some(current) = self.session() else {
            return Err(ClientError::Server {
                code: "unauthenticated".into(),
                message: "not signed in".into(),
                indeterminate: false,
                retry_after_ms: 0,
                try_elsewhere: false,
            });
        };
        let kind = request::Kind::Refresh(pb::Refresh { refresh_token: current.refresh_token.clone() });
        let keep_alive = Some(keep_alive_interval(&self.inner.options));
        let reply = call_on(connection, kind, self.inner.options.request_timeout, keep_alive).await?;
        let fresh = SessionTokens::from_signed_in(signed_in(reply, "refresh")?);
        self.adopt(fresh);
        Ok(())
    }

    /// Refreshes the access token now on the main connection, and renews the sign-in of every
    /// direct connection with it.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let connection = self.connection().await?;
        self.refresh_on(&connection).await?;
        let Some((token, _)) = self.access_token() else { return Ok(()) };
        let direct = self.routes().open_connections();
        for (node, connection) in direct {
            let hello = request::Kind::Hello(pb::Hello {
                client_name: self.inner.options.client_name.clone(),
                access_token: token.clone(),
                route_only: true,
            });
            if call_on(&connection, hello, self.inner.options.request_timeout, None).await.is_err() {
                self.routes().failed(node);
            }
        }
        Ok(())
    }

    /// Ends this session (`all`: every session of the user, and every token issued before).
    pub async fn logout(&self, all: bool) -> Result<(), ClientError> {
        let kind = request::Kind::Logout(pb::Logout { all, session_id: String::new() });
        match self.call(kind).await? {
            response::Kind::LoggedOut(_) => {
                *self.inner.session.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(())
            }
            other => Err(unexpected("logout", other)),
        }
    }

    /// Ends another session of the signed-in user.
    pub async fn logout_session(&self, session_id: &str) -> Result<(), ClientError> {
        let kind = request::Kind::Logout(pb::Logout { all: false, session_id: session_id.to_owned() });
        match self.call(kind).await? {
            response::Kind::LoggedOut(_) => Ok(()),
            other => Err(unexpected("logout", other)),
        }
    }

    pub async fn whoami(&self) -> Result<pb::WhoAmIReply, ClientError> {
        match self.call(request::Kind::Whoami(pb::WhoAmI {})).await? {
            response::Kind::Whoami(w) => Ok(w),
            other => Err(unexpected("whoami", other)),
        }
    }

    /// The signed-in user's sessions.
    pub async fn sessions(&self) -> Result<Vec<pb::SessionInfo>, ClientError> {
        match self.call(request::Kind::ListSessions(pb::ListSessions {})).await? {
            response::Kind::Sessions(s) => Ok(s.sessions),
            other => Err(unexpected("list sessions", other)),
        }
    }
}

/// Refreshes the session's access token before it expires, until the client is dropped (see
/// the module docs). A session that cannot be refreshed for good (revoked) is left as it is:
/// the next request says why.
pub(crate) async fn keep_fresh(client: std::sync::Weak<crate::Inner>) {
    loop {
        let (due, changed) = {
            let Some(inner) = client.upgrade() else { return };
            let changed = inner.session_changed.clone();
            let client = Client { inner };
            let due = client.access_token().map(|(_, expires)| refresh_due_in(expires, now_ms()));
            (due, changed)
        };
        let notified = changed.notified();
        match due {
            None => notified.await,
            Some(due) => {
                tokio::select! {
                    _ = notified => continue,
                    _ = tokio::time::sleep(due) => {}
                }
                let Some(inner) = client.upgrade() else { return };
                let client = Client { inner };
                if let Err(e) = client.refresh().await {
                    tracing::debug!(error = %e, "refreshing the access token");
                    let permanent = matches!(e.code(), Some("token_revoked" | "unauthenticated"));
                    let pause = if permanent { Duration::from_secs(3600) } else { Duration::from_secs(2) };
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_two_thirds_into_their_life() {
        assert_eq!(refresh_due_in(900_000 + 1_000, 1_000), Duration::from_secs(600));
        assert_eq!(refresh_due_in(10_000, 9_000), Duration::ZERO, "less than 2 s left: now");
        assert_eq!(refresh_due_in(3_500, 1_000), Duration::from_millis(1_666));
        assert_eq!(refresh_due_in(5, 10), Duration::ZERO, "expired: now");
    }
}
