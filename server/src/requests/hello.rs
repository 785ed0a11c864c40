//! Hello: the first request of a connection. The client learns about the cluster and, with an
//! access token, signs the connection in; a later Hello with a fresh token of the same user
//! renews the sign-in without touching the connection's streams. A Hello whose token is
//! refused leaves the connection as it was (a first one leaves it able to Register, Login,
//! Refresh or LoginExternal).

use chorus_proto::client::{Hello, HelloReply};

use crate::error::ServiceError;
use crate::front_door::Session;
use crate::node::Node;

pub async fn handle(node: &Node, session: &Session, hello: Hello) -> Result<HelloReply, ServiceError> {
    // Decided before the hello counts as said: a sign-in on another stream of this connection
    // must not find it said and not yet route-only.
    session.hello.get_or_init(|| {
        if hello.route_only {
            session.route_only();
        }
    });
    if !hello.access_token.is_empty() {
        let identity = crate::auth::tokens::verify(node, &hello.access_token).await?;
        node.connections.sign_in(&session.auth, identity)?;
        session.went_online(node);
    }
    let (user, access_expires_ms) = match session.auth.identity() {
        Ok(identity) => (identity.user.clone(), identity.expires_ms),
        Err(_) => (String::new(), 0),
    };
    tracing::debug!(%user, client = %hello.client_name, remote = %session.remote, "hello");
    Ok(reply(node, user, access_expires_ms))
}

/// What Hello answers: the cluster, and the connection's sign-in.
pub fn reply(node: &Node, user: String, access_expires_ms: u64) -> HelloReply {
    HelloReply {
        node_id: node.id,
        cluster_id: node.layout.cluster_id.clone(),
        node_addrs: node.client_addrs().into_values().collect(),
        max_body_bytes: node.config.limits.max_body_bytes as u32,
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        shard_count: node.layout.shard_count,
        leaders: node.shard_leaders(0..node.layout.shard_count, false),
        user,
        access_expires_ms,
        registration: node.config.auth.registration.as_str().to_owned(),
        external_issuer: node.external.as_ref().map(|e| e.issuer().to_owned()).unwrap_or_default(),
    }
}
