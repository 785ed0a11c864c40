//! CreateRoom: a new room in its shard; the signed-in user becomes its owner.

use chorus_proto::client::{CreateRoom, RoomCreated, Visibility};
use chorus_proto::storage::{self, op};
use std::sync::Arc;

use chorus_raft::OpOutcome;

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::node::Node;

pub async fn handle(node: &Arc<Node>, me: &Identity, create: CreateRoom) -> Result<RoomCreated, ServiceError> {
    chorus_raft::limits::validate_room_name(&create.room)?;
    let visibility = match Visibility::try_from(create.visibility) {
        Ok(Visibility::Public) => storage::Visibility::Public,
        Ok(Visibility::Private) => storage::Visibility::Private,
        _ => {
            return Err(ServiceError::InvalidArgument(
                "a room is public or private (direct rooms are opened with OpenDirect)".into(),
            ));
        }
    };
    node.rate.room_creation(&me.user)?;
    let shard = node.layout.router.shard_for_room(&create.room);
    let op = op::Kind::CreateRoom(storage::CreateRoom {
        room: create.room.clone(),
        creator: me.user.clone(),
        metadata: create.metadata,
        retention_max_messages: create.retention_max_messages,
        visibility: visibility as i32,
    });
    let span = tracing::debug_span!("create_room", shard, room = %create.room);
    match tracing::Instrument::instrument(node.batcher.submit(node, shard, op, true), span).await? {
        OpOutcome::RoomCreated { ts_ms, .. } => Ok(RoomCreated { room: create.room, created_ts_ms: ts_ms }),
        other => Err(ServiceError::Internal(format!("CreateRoom answered with {other:?}"))),
    }
}
