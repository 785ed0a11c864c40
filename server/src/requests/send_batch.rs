//! SendBatch: many sends in one request. Each one is validated, batched into its shard's
//! next Raft entry, and answered on its own, exactly as if it had come alone. The reply names
//! the leaders of the batch's shards that this node does not lead, so the client can send
//! there directly next time.

use std::sync::Arc;

use chorus_proto::client::{SendBatch, SendBatchReply, SendResult, send_result};

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::node::Node;

/// Most sends in one batch.
pub const MAX_SENDS_PER_BATCH: usize = 1024;

pub async fn handle(node: &Arc<Node>, me: &Identity, batch: SendBatch) -> Result<SendBatchReply, ServiceError> {
    if batch.sends.len() > MAX_SENDS_PER_BATCH {
        return Err(ServiceError::InvalidArgument(format!(
            "{} sends in one batch, over the limit of {MAX_SENDS_PER_BATCH}",
            batch.sends.len()
        )));
    }
    let shards: std::collections::BTreeSet<_> =
        batch.sends.iter().map(|send| node.layout.router.shard_for_room(&send.room)).collect();
    let lone = batch.sends.len() == 1;
    // Each send takes its own token of the user's rate: those beyond it are refused alone. A
    // user over their rate already has the whole batch refused at once (no token per send).
    let over = node.rate.sends(&me.user, 1).err();
    let sends = batch.sends.into_iter().enumerate().map(|(i, send)| {
        let over = over.clone();
        async move {
            if let Some(e) = over {
                return Err(e);
            }
            if i > 0 {
                node.rate.sends(&me.user, 1)?;
            }
            super::send::send_as(node, me, send, lone).await
        }
    });
    let outcomes = futures::future::join_all(sends).await;
    let results = outcomes
        .into_iter()
        .map(|outcome| SendResult {
            result: Some(match outcome {
                Ok(reply) => send_result::Result::Sent(reply),
                Err(e) => send_result::Result::Error(node.wire_error(&e)),
            }),
        })
        .collect();
    // After the sends: a leader elected while they ran is the one to tell.
    Ok(SendBatchReply { results, leaders: node.shard_leaders(shards, true) })
}
