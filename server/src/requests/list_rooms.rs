//! ListRooms: the rooms the signed-in user can see, in name order, a page at a time: every
//! public room, and the private and direct rooms they joined or are invited to (`mine`: only
//! those). Each shard is read from one of its replicas, which decides what the user sees; the
//! pages are merged.

use chorus_proto::client::{ListRooms, RoomList};

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

pub async fn handle(node: &Node, me: &Identity, list: ListRooms) -> Result<RoomList, ServiceError> {
    let limit = match list.limit {
        0 => 100,
        n => (n as usize).min(chorus_raft::state_machine::MAX_PAGE),
    };
    let after = (!list.after.is_empty()).then_some(list.after.as_str());
    let pages = futures::future::join_all(
        (0..node.layout.shard_count)
            .map(|shard| forward::list_rooms_of_shard(node, shard, &me.user, after, limit, list.mine)),
    )
    .await;
    let mut rooms = Vec::new();
    // A shard whose scan stopped early covers names up to where it stopped: the merged page
    // must not go past the first such name, or rooms of that shard after it would be skipped.
    let mut cut: Option<String> = None;
    for page in pages {
        let page = page?;
        if !page.scanned_to.is_empty() && cut.as_ref().is_none_or(|c| page.scanned_to < *c) {
            cut = Some(page.scanned_to);
        }
        rooms.extend(page.rooms);
    }
    rooms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut more = rooms.len() > limit;
    rooms.truncate(limit);
    if let Some(cut) = cut {
        let before = rooms.len();
        rooms.retain(|r| r.name <= cut);
        more = true;
        if rooms.is_empty() && before == 0 {
            // Nothing visible up to the cut: say where to go on from with an empty page's
            // cursor, the cut itself (a room no one may see is not listed).
            return Ok(RoomList { rooms, more, next_after: cut });
        }
    }
    let next_after = if more { rooms.last().map(|r| r.name.clone()).unwrap_or_default() } else { String::new() };
    Ok(RoomList { rooms, more, next_after })
}
