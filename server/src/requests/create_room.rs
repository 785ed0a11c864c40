//! CreateRoom: a new room in its shard, created by the hello'd user.

use chorus_proto::client::{CreateRoom, RoomCreated};
use chorus_proto::storage::{self, op};
use std::sync::Arc;

use chorus_raft::OpOutcome;

use crate::error::ServiceError;
use crate::front_door::Session;
use crate::node::Node;

pub async fn handle(node: &Arc<Node>, session: &Session, create: CreateRoom) -> Result<RoomCreated, ServiceError> {
    chorus_raft::limits::validate_room_name(&create.room)?;
    let shard = node.layout.router.shard_for_room(&create.room);
    let op = op::Kind::CreateRoom(storage::CreateRoom {
        room: create.room.clone(),
        creator: session.user()?.to_owned(),
        metadata: create.metadata,
        retention_max_messages: create.retention_max_messages,
    });
    let span = tracing::debug_span!("create_room", shard, room = %create.room);
    match tracing::Instrument::instrument(node.batcher.submit(node, shard, op, true), span).await? {
        OpOutcome::RoomCreated { ts_ms, .. } => Ok(RoomCreated { room: create.room, created_ts_ms: ts_ms }),
        other => Err(ServiceError::Internal(format!("CreateRoom answered with {other:?}"))),
    }
}
