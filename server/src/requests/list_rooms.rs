//! ListRooms: every room of the cluster in name order, a page at a time. Each shard is read
//! from one of its replicas; the pages are merged.

use chorus_proto::client::{ListRooms, RoomList};

use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

pub async fn handle(node: &Node, list: ListRooms) -> Result<RoomList, ServiceError> {
    let limit = match list.limit {
        0 => 100,
        n => (n as usize).min(chorus_raft::state_machine::MAX_PAGE),
    };
    let after = (!list.after.is_empty()).then_some(list.after.as_str());
    let pages = futures::future::join_all(
        (0..node.layout.shard_count).map(|shard| forward::list_rooms_of_shard(node, shard, after, limit)),
    )
    .await;
    let mut rooms = Vec::new();
    for page in pages {
        rooms.extend(page?);
    }
    rooms.sort_by(|a, b| a.name.cmp(&b.name));
    let more = rooms.len() > limit;
    rooms.truncate(limit);
    Ok(RoomList { rooms, more })
}
