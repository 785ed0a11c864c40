//! History: a page of a room, linearizable (through the shard leader) or local, for the
//! signed-in user: the replica that reads it checks that they may read the room.

use chorus_proto::client::{Consistency, History, HistoryPage};

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

pub async fn handle(node: &Node, me: &Identity, history: History) -> Result<HistoryPage, ServiceError> {
    chorus_raft::limits::validate_room_name(&history.room)?;
    let linearizable = match Consistency::try_from(history.consistency) {
        Ok(Consistency::Linearizable) => true,
        Ok(Consistency::Local) => false,
        Err(_) => return Err(ServiceError::InvalidArgument(format!("unknown consistency {}", history.consistency))),
    };
    let shard = node.layout.router.shard_for_room(&history.room);
    let query = forward::history_query(&history);
    let page = forward::history(node, shard, &history.room, &me.user, query, linearizable).await?;
    Ok(forward::history_page_to_pb(&history.room, page))
}
