//! ListRooms: the rooms the signed-in user can see, in name order, a page at a time: every
//! public room, and the private and direct rooms they joined or are invited to (`mine`: only
//! those). Each shard is read through its leader (or, with LOCAL consistency, one of its
//! replicas), which decides what the user sees; the pages are merged.
//!
//! Bound: a request gathers about twice its page, not `shard_count × limit` rooms: each shard
//! is asked for its share ([`per_shard_limit`]); a shard that fills its share may have more,
//! so the merged page stops at its last room and the next page goes on from there.

use chorus_proto::client::{Consistency, ListRooms, RoomList};
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
    let linearizable = list.consistency != Consistency::Local as i32;
    let share = per_shard_limit(limit, node.layout.shard_count);
    let request = ListRooms { limit: share as u32, ..list };
    let pages = futures::future::join_all(
        (0..node.layout.shard_count)
            .map(|shard| forward::list_rooms_of_shard(node, shard, &me.user, &request, linearizable)),
    )
    .await;
    let pages = pages.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(merge(pages, share, limit))
}

/// How many rooms to ask each of `shards` shards for, to fill a page of `limit`: twice an even
/// share (rooms hash evenly over shards), and a few more so that small pages need no second
/// round; never more than the page itself.
fn per_shard_limit(limit: usize, shards: u32) -> usize {
    let shards = shards.max(1) as usize;
    (limit.div_ceil(shards) * 2 + 8).min(limit).max(1)
}

/// One page of the cluster's rooms from the shards' pages (each asked for `share` rooms), in
/// name order. A shard whose scan stopped early (`scanned_to`), or that returned its whole
/// share (it may have more), covers names up to where it stopped: the merged page goes no
/// further than the first such name, or that shard's rooms after it would be skipped, and
/// then its cursor (`next_after`) is where to go on from, even with no room to show.
fn merge(pages: Vec<pb::ShardRoomPage>, share: usize, limit: usize) -> RoomList {
    let mut rooms = Vec::new();
    let mut cut: Option<String> = None;
    for page in pages {
        let full = (page.rooms.len() >= share).then(|| page.rooms.last().map(|r| r.name.clone())).flatten();
        let stopped = (!page.scanned_to.is_empty()).then_some(page.scanned_to);
        for end in [full, stopped].into_iter().flatten() {
            if cut.as_ref().is_none_or(|c| end < *c) {
                cut = Some(end);
            }
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
        let list = merge(vec![page(&["b", "d"], ""), page(&["a", "c", "e"], "")], 10, 3);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec!["a", "b", "c"], true, "c"));
        let all = merge(vec![page(&["b"], ""), page(&["a"], "")], 10, 3);
        assert_eq!((names(&all), all.more, all.next_after.as_str()), (vec!["a", "b"], false, ""));
    }

    #[test]
    fn a_shard_that_stopped_early_bounds_the_page() {
        // Shard 2 looked at names up to "m" only: nothing past "m" may be listed yet.
        let list = merge(vec![page(&["a", "x"], ""), page(&["k"], "m")], 10, 10);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec!["a", "k"], true, "k"));
        // It found nothing visible, and every other room is past the cut: an empty page whose
        // cursor is the cut, so that the next page goes on from there (not from the start).
        let list = merge(vec![page(&["x", "y"], ""), page(&[], "m")], 10, 10);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec![], true, "m"));
    }

    #[test]
    fn a_shard_that_filled_its_share_bounds_the_page() {
        // Each shard was asked for 2: the first may have rooms between "b" and "z".
        let list = merge(vec![page(&["a", "b"], ""), page(&["c", "z"], "")], 2, 10);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec!["a", "b"], true, "b"));
        // A page exactly full from one shard says there may be more (once `more: false`).
        let list = merge(vec![page(&["a", "b", "c"], ""), page(&[], "")], 3, 3);
        assert_eq!((names(&list), list.more, list.next_after.as_str()), (vec!["a", "b", "c"], true, "c"));
    }

    #[test]
    fn each_shard_is_asked_for_a_share_of_the_page_not_the_whole_page() {
        assert_eq!(per_shard_limit(1000, 64), 40);
        assert_eq!(per_shard_limit(1000, 1), 1000);
        assert_eq!(per_shard_limit(100, 8), 34);
        assert_eq!(per_shard_limit(1, 8), 1);
        assert!(
            (1..=1000)
                .all(|limit| (1..=256).all(|s| per_shard_limit(limit, s) * s as usize <= 2 * limit + 10 * s as usize))
        );
    }

    #[test]
    fn paging_with_shares_lists_every_room_once_in_order() {
        // 40 rooms over 5 shards, unevenly; pages of 7, each shard asked for its share: the
        // pages together hold every room once, in order.
        let shards: Vec<Vec<String>> = (0..5)
            .map(|s| (0..40).filter(|i| (i * 7 + i / 3) % 5 == s).map(|i| format!("r{i:03}")).collect())
            .collect();
        let share = per_shard_limit(7, 5);
        let (mut listed, mut after) = (Vec::new(), String::new());
        for _ in 0..100 {
            let pages = shards
                .iter()
                .map(|rooms| {
                    let names: Vec<&str> =
                        rooms.iter().filter(|n| **n > after).take(share).map(String::as_str).collect();
                    page(&names, "")
                })
                .collect();
            let list = merge(pages, share, 7);
            listed.extend(names(&list).into_iter().map(str::to_owned));
            if !list.more {
                break;
            }
            after = list.next_after;
        }
        let expected: Vec<String> = (0..40).map(|i| format!("r{i:03}")).collect();
        assert_eq!(listed, expected);
    }
}
