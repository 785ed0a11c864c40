//! Sync: offline catch-up in one request. Every room shard is asked, through its leader, for
//! the signed-in user's rooms that changed after the token's position for that shard (see
//! `chorus_raft::state_machine::sync` for what that costs a shard); the pages are merged in
//! Sync's order (newest last entry first, then by name).
//!
//! The token holds a position per shard: the shard's applied log index when it was read, so
//! that a change applied later is in the next Sync. A Sync of many rooms comes in pages; the
//! token of a page in between holds the positions of the first page (what the next catch-up
//! goes on from) and where the next page starts. Tokens are not secret and need no signature:
//! whatever a token says, a user is only ever shown their own rooms.

use std::cmp::Reverse;

use chorus_proto::client::{RoomUpdate, Sync, SyncReply};
use chorus_proto::peer as pb;
use chorus_raft::state_machine::MAX_PAGE;
use chorus_raft::state_machine::sync::MAX_SYNC_MESSAGES;
use prost::Message;

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

/// Rooms per reply when the request says 0.
const DEFAULT_LIMIT: usize = 100;
/// Newest entries per room when the request says 0.
const DEFAULT_MESSAGES_PER_ROOM: usize = 10;
/// A reply stops adding rooms past this size (and says `more`).
const MAX_REPLY_BYTES: usize = 2 << 20;
/// The longest token accepted (one position per shard, a room name and a few numbers).
const MAX_TOKEN_BYTES: usize = 64 * 1024;

pub async fn handle(node: &Node, me: &Identity, sync: Sync) -> Result<SyncReply, ServiceError> {
    let shard_count = node.layout.shard_count;
    let limit = match sync.limit {
        0 => DEFAULT_LIMIT,
        n => (n as usize).min(MAX_PAGE),
    };
    let messages_per_room = match sync.messages_per_room {
        0 => DEFAULT_MESSAGES_PER_ROOM,
        n => (n as usize).min(MAX_SYNC_MESSAGES),
    };
    let token = decode_token(&sync.since, shard_count)?;
    let (first, since, paging) = match &token {
        None => (true, vec![0; shard_count as usize], None),
        Some(t) if t.paging => (t.first, t.since.clone(), Some(t)),
        Some(t) => (false, t.positions.clone(), None),
    };
    let after = paging.map(|t| (t.after_ts_ms, t.after_room.clone()));
    let requests: Vec<pb::SyncShard> = since
        .iter()
        .map(|&since| pb::SyncShard {
            first,
            since,
            limit: limit as u32,
            messages_per_room: messages_per_room as u32,
            paged: after.is_some(),
            after_ts_ms: after.as_ref().map_or(0, |a| a.0),
            after_room: after.as_ref().map(|a| a.1.clone()).unwrap_or_default(),
        })
        .collect();
    let pages = futures::future::join_all(
        requests
            .iter()
            .enumerate()
            .map(|(shard, request)| forward::sync_of_shard(node, shard as u32, &me.user, request)),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let positions = match paging {
        Some(t) => t.positions.clone(),
        None => pages.iter().map(|p| p.position).collect(),
    };
    let (rooms, more) = merge(pages, limit);
    let next = match (more, rooms.last()) {
        (true, Some(last)) => pb::SyncToken {
            shard_count,
            positions,
            paging: true,
            first,
            since,
            after_ts_ms: order_key(last).0.0,
            after_room: order_key(last).1.to_owned(),
        },
        _ => pb::SyncToken { shard_count, positions, ..Default::default() },
    };
    Ok(SyncReply { rooms, more, next: next.encode_to_vec().into() })
}

fn decode_token(bytes: &[u8], shard_count: u32) -> Result<Option<pb::SyncToken>, ServiceError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() > MAX_TOKEN_BYTES {
        return Err(ServiceError::InvalidSyncToken(format!(
            "{} bytes, over the limit of {MAX_TOKEN_BYTES}",
            bytes.len()
        )));
    }
    let token = pb::SyncToken::decode(bytes).map_err(|e| ServiceError::InvalidSyncToken(format!("garbled: {e}")))?;
    let shards = shard_count as usize;
    if token.shard_count != shard_count || token.positions.len() != shards {
        return Err(ServiceError::InvalidSyncToken(format!(
            "made for {} shards, and this cluster has {shard_count}",
            token.shard_count
        )));
    }
    if token.paging && !token.first && token.since.len() != shards {
        return Err(ServiceError::InvalidSyncToken("a page token without its positions".into()));
    }
    if token.paging && token.first && token.since.iter().any(|&s| s != 0) {
        return Err(ServiceError::InvalidSyncToken("a first sync's page token with positions".into()));
    }
    let mut token = token;
    if token.paging && token.first {
        token.since = vec![0; shards];
    }
    Ok(Some(token))
}

/// Sync's order: newest last entry first, then by name.
fn order_key(update: &RoomUpdate) -> (Reverse<u64>, &str) {
    match &update.room {
        Some(room) => (Reverse(room.last_ts_ms), room.name.as_str()),
        None => (Reverse(0), ""),
    }
}

/// The reply's rooms from the shards' pages (each of at most `limit` rooms), and whether more
/// follow. A shard that has more stopped at its last room: nothing after that may be listed
/// yet, or that shard's rooms in between would be skipped.
fn merge(pages: Vec<pb::ShardSync>, limit: usize) -> (Vec<RoomUpdate>, bool) {
    let mut cut: Option<(Reverse<u64>, String)> = None;
    let mut rooms = Vec::new();
    let mut more = false;
    for page in pages {
        if page.more
            && let Some(last) = page.rooms.last()
        {
            let (ts, name) = order_key(last);
            let key = (ts, name.to_owned());
            if cut.as_ref().is_none_or(|c| key < *c) {
                cut = Some(key);
            }
        }
        more |= page.more;
        rooms.extend(page.rooms);
    }
    rooms.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
    if let Some((ts, name)) = &cut {
        rooms.retain(|r| order_key(r) <= (*ts, name.as_str()));
    }
    if rooms.len() > limit {
        rooms.truncate(limit);
        more = true;
    }
    let mut bytes = 0;
    let mut keep = rooms.len();
    for (i, room) in rooms.iter().enumerate() {
        bytes += room.encoded_len();
        if bytes > MAX_REPLY_BYTES && i > 0 {
            keep = i;
            more = true;
            break;
        }
    }
    rooms.truncate(keep);
    (rooms, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::client::RoomInfo;

    fn update(name: &str, ts: u64) -> RoomUpdate {
        RoomUpdate {
            room: Some(RoomInfo { name: name.into(), last_ts_ms: ts, ..Default::default() }),
            ..Default::default()
        }
    }

    fn page(rooms: &[(&str, u64)], more: bool) -> pb::ShardSync {
        pb::ShardSync { position: 1, rooms: rooms.iter().map(|(n, t)| update(n, *t)).collect(), more }
    }

    fn names(rooms: &[RoomUpdate]) -> Vec<&str> {
        rooms.iter().map(|r| order_key(r).1).collect()
    }

    #[test]
    fn pages_merge_newest_first_and_a_shard_with_more_bounds_the_reply() {
        let (rooms, more) = merge(vec![page(&[("a", 5), ("b", 1)], false), page(&[("c", 9), ("d", 3)], false)], 10);
        assert_eq!((names(&rooms), more), (vec!["c", "a", "d", "b"], false));
        // The second shard has rooms older than "d" it did not send: "b" may not come yet.
        let (rooms, more) = merge(vec![page(&[("a", 5), ("b", 1)], false), page(&[("c", 9), ("d", 3)], true)], 10);
        assert_eq!((names(&rooms), more), (vec!["c", "a", "d"], true));
        let (rooms, more) = merge(vec![page(&[("a", 5), ("b", 1)], false), page(&[("c", 9)], false)], 2);
        assert_eq!((names(&rooms), more), (vec!["c", "a"], true));
    }

    #[test]
    fn tokens_of_another_shape_or_garbled_are_refused() {
        assert!(decode_token(&[], 4).unwrap().is_none());
        let token = pb::SyncToken { shard_count: 4, positions: vec![1, 2, 3, 4], ..Default::default() };
        assert_eq!(decode_token(&token.encode_to_vec(), 4).unwrap(), Some(token.clone()));
        for bad in [token.encode_to_vec(), vec![0xff; 7]] {
            assert!(matches!(decode_token(&bad, 8), Err(ServiceError::InvalidSyncToken(_))));
        }
        let paging = pb::SyncToken { paging: true, since: vec![1], ..token };
        assert!(matches!(decode_token(&paging.encode_to_vec(), 4), Err(ServiceError::InvalidSyncToken(_))));
        assert!(matches!(decode_token(&vec![0u8; MAX_TOKEN_BYTES + 1], 4), Err(ServiceError::InvalidSyncToken(_))));
    }
}
