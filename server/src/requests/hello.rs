//! Hello: the client says who it is (a user name, no authentication yet) and learns about the
//! cluster. Must be the first request of a connection, and only once.

use chorus_proto::client::{Hello, HelloReply};

use crate::error::ServiceError;
use crate::front_door::Session;
use crate::node::Node;

pub fn handle(node: &Node, session: &Session, hello: Hello) -> Result<HelloReply, ServiceError> {
    chorus_raft::limits::validate_sender(&hello.user)?;
    if let Err(user) = session.user.set(hello.user.clone())
        && user != hello.user
    {
        return Err(ServiceError::HelloTwice(session.user.get().cloned().unwrap_or_default()));
    }
    tracing::debug!(user = %hello.user, client = %hello.client_name, remote = %session.remote, "hello");
    Ok(HelloReply {
        node_id: node.id,
        cluster_id: node.layout.cluster_id.clone(),
        node_addrs: node.client_addrs().into_values().collect(),
        max_body_bytes: node.config.limits.max_body_bytes as u32,
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        shard_count: node.layout.shard_count,
        leaders: node.shard_leaders(0..node.layout.shard_count, false),
    })
}
