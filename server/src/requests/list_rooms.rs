//! ListRooms: the rooms the signed-in user can see, in name order, a page at a time: every
//! public room, and the private and direct rooms they joined or are invited to (`mine`: only
//! those). Each shard is read from one of its replicas, which decides what the user sees; the
//! pages are merged.

use chorus_proto::client::{ListRooms, RoomList};
use chorus_proto::peer as pb;

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
    let pages = pages.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(merge(pages, limit))
}

/// One page of the cluster's rooms from the shards' pages, in name order. A shard whose scan
/// stopped early (`scanned_to`) covers names up to where it stopped: the merged page goes no
/// further than the first such name, or that shard's rooms after it would be skipped, and
/// then its cursor (`next_after`) is where to go on from, even with no room to show.
fn merge(pages: Vec<pb::ShardRoomPage>, limit: usize) -> RoomList {
    let mut rooms = Vec::new();
    let mut cut: Option<String> = None;
    for page in pages {
        if !page.scanned_to.is_empty() && cut.as_ref().is_none_or(|c| page.scanned_to < *c) {
            cut = Some(page.scanned_to);
        }
        rooms.extend(page.rooms);
    }
    rooms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut more = rooms.len() > limit;
    rooms.truncate(limit);
    if let Some(cut) = &cut {
        rooms.retain(|r| r.name <= *cut);
        more = true;
    }
    let next_after = match (more, rooms.last()) {
        (false, _) => String::new(),
        (true, Some(last)) => last.name.clone(),
        // Nothing visible up to the cut: go on after it (a room no one may see is not listed).
        (true, None) => cut.unwrap_or_default(),
    };
    RoomList { rooms, more, next_after }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::client::RoomInfo;

    fn page(names: &[&str], scanned_to: &str) -> pb::ShardRoomPage {
        pb::ShardRoomPage {
            rooms: names.iter().map(|n| RoomInfo { name: (*n).into(), ..Default::default() }).collect(),
            scanned_to: scanned_to.into(),
        }
    }

    fn names(list: &RoomList) -> Vec<&str> {
        list.rooms.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn pages_merge_in_name_order_up_to_the_limit() {
        let list = merge(vec![page(&["b", "d"], ""), page(&["a", "c", "e"], "")], 3);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec!["a", "b", "c"], true, "c"));
        let all = merge(vec![page(&["b"], ""), page(&["a"], "")], 3);
        assert_eq!((names(&all), all.more, all.next_after.as_str()), (vec!["a", "b"], false, ""));
    }

    #[test]
    fn a_shard_that_stopped_early_bounds_the_page() {
        // Shard 2 looked at names up to "m" only: nothing past "m" may be listed yet.
        let list = merge(vec![page(&["a", "x"], ""), page(&["k"], "m")], 10);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec!["a", "k"], true, "k"));
        // It found nothing visible, and every other room is past the cut: an empty page whose
        // cursor is the cut, so that the next page goes on from there (not from the start).
        let list = merge(vec![page(&["x", "y"], ""), page(&[], "m")], 10);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec![], true, "m"));
    }
}
