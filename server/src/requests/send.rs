//! Send: appends one message to a room as the signed-in user, exactly once per (client_id,
//! client_seq). The room's state machine refuses it unless the user is a joined member when
//! the entry applies.

use chorus_proto::client::{Send, SendReply};
use chorus_proto::storage::{AppendMessage, op};
use std::sync::Arc;

use chorus_raft::OpOutcome;

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::node::Node;

/// `lone`: the request carries this send alone (see `Batcher::submit`).
pub async fn handle(node: &Arc<Node>, me: &Identity, send: Send, lone: bool) -> Result<SendReply, ServiceError> {
    node.rate.sends(&me.user, 1)?;
    send_as(node, me, send, lone).await
}

/// Appends `send` as `me`, whose rate was taken already.
pub async fn send_as(node: &Arc<Node>, me: &Identity, send: Send, lone: bool) -> Result<SendReply, ServiceError> {
    let append = AppendMessage {
        room: send.room,
        sender: me.user.clone(),
        client_id: send.client_id,
        client_seq: send.client_seq,
        body: send.body,
    };
    node.config.limits.check_append(&append)?;
    let shard = node.layout.router.shard_for_room(&append.room);
    let span = tracing::debug_span!("send", shard, room = %append.room, client_seq = append.client_seq);
    let outcome = node.batcher.submit(node, shard, op::Kind::Append(append), lone);
    match tracing::Instrument::instrument(outcome, span).await? {
        OpOutcome::Appended { seq, ts_ms, duplicate } => Ok(SendReply { seq, ts_ms, duplicate }),
        other => Err(ServiceError::Internal(format!("Send answered with {other:?}"))),
    }
}
