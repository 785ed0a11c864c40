//! Every RocksDB key Chorus writes, encoded in one place.
//!
//! All integers are big-endian so that byte order is numeric order. Every key of a shard starts
//! with the shard id, so each shard is one contiguous range in each column family and can be
//! snapshotted, dropped or moved as a range.
//!
//! | column family | key                                                  | value            |
//! |---------------|------------------------------------------------------|------------------|
//! | `default`     | `node/identity`                                      | `ClusterIdentity`|
//! | `raft_log`    | shard u32 · index u64                                | `LogEntry`       |
//! | `raft_state`  | shard u32 · kind u8 (see [`StateKey`])               | per kind         |
//! | `sm`          | shard u32 · gen u32 · `0x00` · `next_room_id`        | u64              |
//! | `sm`          | shard u32 · gen u32 · `0x01` · room name             | `RoomRecord`     |
//! | `sm`          | shard u32 · gen u32 · `0x02` · room id u64 · seq u64 | `MessageRecord`  |
//! | `sm`          | shard u32 · gen u32 · `0x03` · room id · client key · client_seq u64 | `DedupRecord` |
//! | `sm`          | shard u32 · gen u32 · `0x04` · room id · client key  | highest client_seq u64 |
//! | `sm`          | shard u32 · gen u32 · `0x05` · room id · user name   | `MemberRecord`   |
//! | `sm`          | shard u32 · gen u32 · `0x06` · user key · room name  | membership state u8 |
//! | `sm`          | shard u32 · gen u32 · `0x07` · room id · user key · seq u64 | empty (an unread mention) |
//! | `sm`          | shard u32 · gen u32 · `0x08` · log index u64 · room name | empty (room change index) |
//! | `sm`          | shard u32 · gen u32 · `0x09` · user key · log index u64 · room name | empty (read change index) |
//! | `sm`          | shard u32 · gen u32 · `0x0a` · due ms u64 · log index u64 · ordinal u32 | `NotificationRecord` |
//! | `sm`          | shard u32 · gen u32 · `0x0b`                         | `NotificationQueueState` |
//!
//! The meta group (shard [`META_SHARD`]) holds the cluster's accounts instead of rooms:
//!
//! | column family | key                                                  | value            |
//! |---------------|------------------------------------------------------|------------------|
//! | `sm`          | meta · gen u32 · `0x10` · user name                  | `UserRecord`     |
//! | `sm`          | meta · gen u32 · `0x11` · session id (16 bytes)      | `SessionRecord`  |
//! | `sm`          | meta · gen u32 · `0x12` · user key · session id      | empty            |
//! | `sm`          | meta · gen u32 · `0x13` · key id                     | `SigningKeyRecord` |
//! | `sm`          | meta · gen u32 · `0x14`                              | `AuthState`      |
//! | `sm`          | meta · gen u32 · `0x15` · issuer key · subject       | `ExternalIdentityRecord` |
//!
//! A client key is the client id's length (u8) followed by its bytes, so that one client's keys
//! never interleave with another's; a user key is likewise the user name's length (u8) and its
//! bytes, and an issuer key the issuer's length (u16) and its bytes. `gen` is the shard's state-machine generation: installing a
//! snapshot writes a new generation and switches to it atomically (see `snapshot.rs`).

use crate::types::ShardId;

pub const CF_LOG: &str = "raft_log";
pub const CF_STATE: &str = "raft_state";
pub const CF_SM: &str = "sm";
pub const COLUMN_FAMILIES: [&str; 3] = [CF_LOG, CF_STATE, CF_SM];

/// Node-level record in the default column family.
pub const NODE_IDENTITY_KEY: &[u8] = b"node/identity";

/// Shard ids stop one short of `u32::MAX` so that "the next shard" is always a valid bound.
pub const MAX_SHARD_ID: ShardId = u32::MAX - 1;

/// The meta group: the Raft group of the cluster's accounts, sessions and token signing keys,
/// replicated on every node. Room shards are numbered from 0 up to the shard count (at most
/// 65,536), far below it.
pub const META_SHARD: ShardId = MAX_SHARD_ID;

/// The per-shard records of the `raft_state` column family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StateKey {
    /// `Vote`: the vote this node holds for the shard.
    Vote = 0x01,
    /// `LogId`: the last log id purged from the shard's log.
    LastPurged = 0x02,
    /// `LogId`: the last log id applied to the state machine.
    Applied = 0x10,
    /// `StoredMembership`: the membership as of the last applied entry.
    Membership = 0x11,
    /// u32: the active state-machine generation.
    SmGeneration = 0x12,
}

pub const SM_TAG_COUNTER: u8 = 0x00;
pub const SM_TAG_ROOM: u8 = 0x01;
pub const SM_TAG_MESSAGE: u8 = 0x02;
pub const SM_TAG_DEDUP: u8 = 0x03;
pub const SM_TAG_DEDUP_HIGH: u8 = 0x04;
pub const SM_TAG_MEMBER: u8 = 0x05;
pub const SM_TAG_USER_ROOM: u8 = 0x06;
pub const SM_TAG_MENTION: u8 = 0x07;
pub const SM_TAG_ROOM_CHANGE: u8 = 0x08;
pub const SM_TAG_READ_CHANGE: u8 = 0x09;
pub const SM_TAG_NOTIFICATION: u8 = 0x0a;
pub const SM_TAG_NOTIFY_STATE: u8 = 0x0b;
pub const SM_TAG_USER: u8 = 0x10;
pub const SM_TAG_SESSION: u8 = 0x11;
pub const SM_TAG_USER_SESSION: u8 = 0x12;
pub const SM_TAG_SIGNING_KEY: u8 = 0x13;
pub const SM_TAG_AUTH_STATE: u8 = 0x14;
pub const SM_TAG_EXTERNAL_ID: u8 = 0x15;

/// Length of a session id, in bytes.
pub const SESSION_ID_LEN: usize = 16;

/// Length of the `shard · gen` prefix of every `sm` key.
pub const SM_PREFIX_LEN: usize = 8;

/// Prefixes under which keys are written in ascending order, for RocksDB's memtable insert
/// hints: a shard's log (`shard`), and one room's records of one kind (`shard · gen · tag ·
/// room id`: messages by seq; dedup records by client, then client seq).
pub const LOG_HINT_PREFIX: usize = 4;
pub const SM_HINT_PREFIX: usize = SM_PREFIX_LEN + 1 + 8;

pub fn shard_prefix(shard: ShardId) -> [u8; 4] {
    shard.to_be_bytes()
}

/// The first key after every key of `shard` (the exclusive end of its range).
pub fn shard_end(shard: ShardId) -> [u8; 4] {
    debug_assert!(shard <= MAX_SHARD_ID);
    (shard + 1).to_be_bytes()
}

pub fn log_key(shard: ShardId, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Decodes a `raft_log` key into `(shard, index)`.
pub fn decode_log_key(key: &[u8]) -> Option<(ShardId, u64)> {
    let key: &[u8; 12] = key.try_into().ok()?;
    let shard = u32::from_be_bytes(key[..4].try_into().ok()?);
    let index = u64::from_be_bytes(key[4..].try_into().ok()?);
    Some((shard, index))
}

pub fn state_key(shard: ShardId, kind: StateKey) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4] = kind as u8;
    k
}

/// The prefix of every `sm` key of one generation of one shard.
pub fn sm_prefix(shard: ShardId, generation: u32) -> [u8; SM_PREFIX_LEN] {
    let mut k = [0u8; SM_PREFIX_LEN];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4..].copy_from_slice(&generation.to_be_bytes());
    k
}

/// The exclusive end of one generation's range (the first key of the next generation, or of the
/// next shard when `generation` is the last one).
pub fn sm_generation_end(shard: ShardId, generation: u32) -> Vec<u8> {
    match generation.checked_add(1) {
        Some(next) => sm_prefix(shard, next).to_vec(),
        None => shard_end(shard).to_vec(),
    }
}

/// Builds `sm` keys of one shard generation. Snapshots carry keys without the prefix
/// ("relative" keys) so that they can be installed under any shard generation.
#[derive(Debug, Clone, Copy)]
pub struct SmKeys {
    prefix: [u8; SM_PREFIX_LEN],
}

impl SmKeys {
    pub fn new(shard: ShardId, generation: u32) -> Self {
        SmKeys { prefix: sm_prefix(shard, generation) }
    }

    pub fn prefix(&self) -> &[u8; SM_PREFIX_LEN] {
        &self.prefix
    }

    fn key(&self, tag: u8, parts: &[&[u8]]) -> Vec<u8> {
        let len = SM_PREFIX_LEN + 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut k = Vec::with_capacity(len);
        k.extend_from_slice(&self.prefix);
        k.push(tag);
        for p in parts {
            k.extend_from_slice(p);
        }
        k
    }

    pub fn next_room_id(&self) -> Vec<u8> {
        self.key(SM_TAG_COUNTER, &[b"next_room_id"])
    }

    pub fn room(&self, name: &str) -> Vec<u8> {
        self.key(SM_TAG_ROOM, &[name.as_bytes()])
    }

    /// `[start, end)` of every room record, in name order.
    pub fn room_range(&self) -> (Vec<u8>, Vec<u8>) {
        (self.key(SM_TAG_ROOM, &[]), self.key(SM_TAG_ROOM + 1, &[]))
    }

    pub fn message(&self, room_id: u64, seq: u64) -> Vec<u8> {
        self.key(SM_TAG_MESSAGE, &[&room_id.to_be_bytes(), &seq.to_be_bytes()])
    }

    pub fn dedup(&self, room_id: u64, client_id: &[u8], client_seq: u64) -> Vec<u8> {
        let len = [client_key_len(client_id)];
        self.key(SM_TAG_DEDUP, &[&room_id.to_be_bytes(), &len, client_id, &client_seq.to_be_bytes()])
    }

    pub fn dedup_high(&self, room_id: u64, client_id: &[u8]) -> Vec<u8> {
        let len = [client_key_len(client_id)];
        self.key(SM_TAG_DEDUP_HIGH, &[&room_id.to_be_bytes(), &len, client_id])
    }

    /// The user name ends the key, so a room's members sort by name.
    pub fn member(&self, room_id: u64, user: &str) -> Vec<u8> {
        self.key(SM_TAG_MEMBER, &[&room_id.to_be_bytes(), user.as_bytes()])
    }

    /// `[start, end)` of every member record of a room, in user name order.
    pub fn member_range(&self, room_id: u64) -> (Vec<u8>, Vec<u8>) {
        let start = self.key(SM_TAG_MEMBER, &[&room_id.to_be_bytes()]);
        (start.clone(), prefix_end(start))
    }

    pub fn user_room(&self, user: &str, room: &str) -> Vec<u8> {
        let len = [name_key_len(user)];
        self.key(SM_TAG_USER_ROOM, &[&len, user.as_bytes(), room.as_bytes()])
    }

    /// `[start, end)` of one user's room index entries, in room name order.
    pub fn user_room_range(&self, user: &str) -> (Vec<u8>, Vec<u8>) {
        let len = [name_key_len(user)];
        let start = self.key(SM_TAG_USER_ROOM, &[&len, user.as_bytes()]);
        (start.clone(), prefix_end(start))
    }

    /// An unread mention of `user` by entry `seq` of room `room_id`.
    pub fn mention(&self, room_id: u64, user: &str, seq: u64) -> Vec<u8> {
        let len = [name_key_len(user)];
        self.key(SM_TAG_MENTION, &[&room_id.to_be_bytes(), &len, user.as_bytes(), &seq.to_be_bytes()])
    }

    /// `[start, end)` of the mentions of `user` in room `room_id` by entries `from..=to`.
    pub fn mention_range(&self, room_id: u64, user: &str, from: u64, to: u64) -> (Vec<u8>, Vec<u8>) {
        let end = match to.checked_add(1) {
            Some(after) => self.mention(room_id, user, after),
            None => {
                let len = [name_key_len(user)];
                prefix_end(self.key(SM_TAG_MENTION, &[&room_id.to_be_bytes(), &len, user.as_bytes()]))
            }
        };
        (self.mention(room_id, user, from), end)
    }

    /// The room change index: every room once, at the log index of the entry that last
    /// appended to it (or created it).
    pub fn room_change(&self, changed_at: u64, room: &str) -> Vec<u8> {
        self.key(SM_TAG_ROOM_CHANGE, &[&changed_at.to_be_bytes(), room.as_bytes()])
    }

    /// `[start, end)` of the room change index after log index `since`.
    pub fn room_changes_after(&self, since: u64) -> (Vec<u8>, Vec<u8>) {
        let start = match since.checked_add(1) {
            Some(from) => self.key(SM_TAG_ROOM_CHANGE, &[&from.to_be_bytes()]),
            None => self.key(SM_TAG_ROOM_CHANGE + 1, &[]),
        };
        (start, self.key(SM_TAG_ROOM_CHANGE + 1, &[]))
    }

    /// The room name of a room change index key.
    pub fn room_of_change<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        key.get(SM_PREFIX_LEN + 1 + 8..)
    }

    /// A user's read change index: each room whose read marker a MarkRead moved, once, at the
    /// log index of that MarkRead.
    pub fn read_change(&self, user: &str, changed_at: u64, room: &str) -> Vec<u8> {
        let len = [name_key_len(user)];
        self.key(SM_TAG_READ_CHANGE, &[&len, user.as_bytes(), &changed_at.to_be_bytes(), room.as_bytes()])
    }

    /// `[start, end)` of `user`'s read change index after log index `since`.
    pub fn read_changes_after(&self, user: &str, since: u64) -> (Vec<u8>, Vec<u8>) {
        let len = [name_key_len(user)];
        let user_start = self.key(SM_TAG_READ_CHANGE, &[&len, user.as_bytes()]);
        let end = prefix_end(user_start.clone());
        let start = match since.checked_add(1) {
            Some(from) => self.key(SM_TAG_READ_CHANGE, &[&len, user.as_bytes(), &from.to_be_bytes()]),
            None => end.clone(),
        };
        (start, end)
    }

    /// The room name of a key of `user`'s read change index.
    pub fn room_of_read_change<'k>(&self, user: &str, key: &'k [u8]) -> Option<&'k [u8]> {
        key.get(SM_PREFIX_LEN + 1 + 1 + user.len() + 8..)
    }

    /// A queued notification, in order of its due time (see [`crate::state_machine::notify`]).
    pub fn notification(&self, due_ms: u64, index: u64, ordinal: u32) -> Vec<u8> {
        self.key(SM_TAG_NOTIFICATION, &[&due_ms.to_be_bytes(), &index.to_be_bytes(), &ordinal.to_be_bytes()])
    }

    /// `[start, end)` of the notifications due at or before `due_ms`.
    pub fn notifications_due(&self, due_ms: u64) -> (Vec<u8>, Vec<u8>) {
        let end = match due_ms.checked_add(1) {
            Some(after) => self.key(SM_TAG_NOTIFICATION, &[&after.to_be_bytes()]),
            None => self.key(SM_TAG_NOTIFICATION + 1, &[]),
        };
        (self.key(SM_TAG_NOTIFICATION, &[]), end)
    }

    /// `(due_ms, index, ordinal)` of a notification key.
    pub fn notification_id(&self, key: &[u8]) -> Option<(u64, u64, u32)> {
        let rest = key.get(SM_PREFIX_LEN + 1..)?;
        if rest.len() != 20 {
            return None;
        }
        let due = u64::from_be_bytes(rest[..8].try_into().ok()?);
        let index = u64::from_be_bytes(rest[8..16].try_into().ok()?);
        let ordinal = u32::from_be_bytes(rest[16..].try_into().ok()?);
        Some((due, index, ordinal))
    }

    pub fn notify_state(&self) -> Vec<u8> {
        self.key(SM_TAG_NOTIFY_STATE, &[])
    }

    pub fn user(&self, name: &str) -> Vec<u8> {
        self.key(SM_TAG_USER, &[name.as_bytes()])
    }

    /// `[start, end)` of every user record, in name order.
    pub fn user_range(&self) -> (Vec<u8>, Vec<u8>) {
        (self.key(SM_TAG_USER, &[]), self.key(SM_TAG_USER + 1, &[]))
    }

    pub fn session(&self, session_id: &[u8]) -> Vec<u8> {
        self.key(SM_TAG_SESSION, &[session_id])
    }

    pub fn user_session(&self, user: &str, session_id: &[u8]) -> Vec<u8> {
        let len = [name_key_len(user)];
        self.key(SM_TAG_USER_SESSION, &[&len, user.as_bytes(), session_id])
    }

    /// `[start, end)` of one user's session index entries.
    pub fn user_session_range(&self, user: &str) -> (Vec<u8>, Vec<u8>) {
        let len = [name_key_len(user)];
        let start = self.key(SM_TAG_USER_SESSION, &[&len, user.as_bytes()]);
        (start.clone(), prefix_end(start))
    }

    pub fn signing_key(&self, kid: &str) -> Vec<u8> {
        self.key(SM_TAG_SIGNING_KEY, &[kid.as_bytes()])
    }

    /// `[start, end)` of every signing key record.
    pub fn signing_key_range(&self) -> (Vec<u8>, Vec<u8>) {
        (self.key(SM_TAG_SIGNING_KEY, &[]), self.key(SM_TAG_SIGNING_KEY + 1, &[]))
    }

    pub fn auth_state(&self) -> Vec<u8> {
        self.key(SM_TAG_AUTH_STATE, &[])
    }

    pub fn external_identity(&self, issuer: &str, subject: &str) -> Vec<u8> {
        let len = issuer_key_len(issuer).to_be_bytes();
        self.key(SM_TAG_EXTERNAL_ID, &[&len, issuer.as_bytes(), subject.as_bytes()])
    }

    /// The generation's whole range.
    pub fn range(&self) -> (Vec<u8>, Vec<u8>) {
        let shard = u32::from_be_bytes([self.prefix[0], self.prefix[1], self.prefix[2], self.prefix[3]]);
        let generation = u32::from_be_bytes([self.prefix[4], self.prefix[5], self.prefix[6], self.prefix[7]]);
        (self.prefix.to_vec(), sm_generation_end(shard, generation))
    }

    /// Turns a relative key (from a snapshot) into a key of this generation.
    pub fn absolute(&self, relative: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(SM_PREFIX_LEN + relative.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(relative);
        k
    }
}

/// Client ids are at most 64 bytes (checked before any key is built), so the length fits a u8.
fn client_key_len(client_id: &[u8]) -> u8 {
    debug_assert!(client_id.len() <= crate::limits::MAX_CLIENT_ID_BYTES);
    client_id.len().min(u8::MAX as usize) as u8
}

/// User names are at most 32 bytes (checked before any key is built), so the length fits a u8.
fn name_key_len(name: &str) -> u8 {
    debug_assert!(name.len() <= u8::MAX as usize);
    name.len().min(u8::MAX as usize) as u8
}

/// Issuers are at most 1 KiB (checked when the configuration is read).
fn issuer_key_len(issuer: &str) -> u16 {
    issuer.len().min(u16::MAX as usize) as u16
}

/// The first key after every key that starts with `prefix` (`prefix` is never all 0xff: it
/// starts with a shard id of at most [`MAX_SHARD_ID`]).
fn prefix_end(mut prefix: Vec<u8>) -> Vec<u8> {
    while let Some(last) = prefix.pop() {
        if last < u8::MAX {
            prefix.push(last + 1);
            return prefix;
        }
    }
    prefix
}

/// Checks a relative key read from a snapshot: it must name a known record kind.
pub fn check_relative_sm_key(relative: &[u8]) -> Result<(), &'static str> {
    match relative.first() {
        None => Err("empty key"),
        Some(&tag) if tag <= SM_TAG_READ_CHANGE => Ok(()),
        Some(&tag) if (SM_TAG_USER..=SM_TAG_EXTERNAL_ID).contains(&tag) => Ok(()),
        Some(_) => Err("unknown record tag"),
    }
}

pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub fn encode_u32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

pub fn decode_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn log_keys_round_trip(shard in 0..=MAX_SHARD_ID, index: u64) {
            prop_assert_eq!(decode_log_key(&log_key(shard, index)), Some((shard, index)));
        }

        #[test]
        fn log_keys_sort_by_shard_then_index(a in (0..=MAX_SHARD_ID, any::<u64>()), b in (0..=MAX_SHARD_ID, any::<u64>())) {
            prop_assert_eq!(log_key(a.0, a.1).cmp(&log_key(b.0, b.1)), a.cmp(&b));
        }

        #[test]
        fn every_key_of_a_shard_is_inside_its_range(shard in 0..=MAX_SHARD_ID, generation: u32, room_id: u64, seq: u64,
                                                    name in "[a-z0-9]{1,128}", cid in proptest::collection::vec(any::<u8>(), 1..64)) {
            let keys = SmKeys::new(shard, generation);
            let (start, end) = keys.range();
            for k in [keys.room(&name), keys.message(room_id, seq), keys.dedup(room_id, &cid, seq),
                      keys.dedup_high(room_id, &cid), keys.next_room_id(), keys.member(room_id, &name[..name.len().min(32)]),
                      keys.user_room(&name[..name.len().min(32)], &name), keys.user(&name), keys.session(&cid),
                      keys.user_session(&name[..name.len().min(32)], &cid), keys.signing_key(&name), keys.auth_state(),
                      keys.external_identity(&name, &name), keys.mention(room_id, &name[..name.len().min(32)], seq),
                      keys.room_change(seq, &name), keys.read_change(&name[..name.len().min(32)], seq, &name)] {
                prop_assert!(k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice());
                prop_assert!(k.as_slice() >= shard_prefix(shard).as_slice() && k.as_slice() < shard_end(shard).as_slice());
            }
            let log = log_key(shard, seq);
            prop_assert!(log.as_slice() >= shard_prefix(shard).as_slice() && log.as_slice() < shard_end(shard).as_slice());
        }

        #[test]
        fn change_index_ranges_hold_exactly_the_later_changes(user in "[a-z0-9]{1,32}", other in "[a-z0-9]{1,32}",
                                                               room in "[a-z0-9]{1,128}", since: u64, at: u64, room_id: u64) {
            let keys = SmKeys::new(3, 1);
            let inside = |k: &[u8], (start, end): &(Vec<u8>, Vec<u8>)| k >= start.as_slice() && k < end.as_slice();
            let change = keys.room_change(at, &room);
            prop_assert_eq!(inside(&change, &keys.room_changes_after(since)), at > since);
            prop_assert_eq!(keys.room_of_change(&change), Some(room.as_bytes()));
            let read = keys.read_change(&user, at, &room);
            prop_assert_eq!(inside(&read, &keys.read_changes_after(&user, since)), at > since);
            prop_assert_eq!(keys.room_of_read_change(&user, &read), Some(room.as_bytes()));
            if other != user {
                prop_assert!(!inside(&keys.read_change(&other, at, &room), &keys.read_changes_after(&user, 0)));
                prop_assert!(!inside(&keys.mention(room_id, &other, at), &keys.mention_range(room_id, &user, 0, u64::MAX)));
            }
            prop_assert_eq!(inside(&keys.mention(room_id, &user, at), &keys.mention_range(room_id, &user, since, u64::MAX)), at >= since);
        }

        #[test]
        fn messages_sort_by_seq_within_a_room(room_id: u64, a: u64, b: u64) {
            let keys = SmKeys::new(1, 0);
            prop_assert_eq!(keys.message(room_id, a).cmp(&keys.message(room_id, b)), a.cmp(&b));
        }

        #[test]
        fn one_clients_dedup_keys_never_interleave_with_anothers(c1 in proptest::collection::vec(any::<u8>(), 1..64),
                                                                 c2 in proptest::collection::vec(any::<u8>(), 1..64),
                                                                 s1: u64, s2: u64, t1: u64) {
            prop_assume!(c1 != c2);
            let keys = SmKeys::new(1, 0);
            // Every key of c2 is on the same side of both of c1's keys.
            let (lo, hi) = (keys.dedup(7, &c1, s1.min(t1)), keys.dedup(7, &c1, s1.max(t1)));
            let other = keys.dedup(7, &c2, s2);
            prop_assert!(other < lo || other > hi);
        }
    }

    proptest! {
        #[test]
        fn a_rooms_members_are_inside_its_member_range(room_id: u64, other: u64, user in "[a-z0-9]{1,32}") {
            let keys = SmKeys::new(2, 0);
            let (start, end) = keys.member_range(room_id);
            let k = keys.member(room_id, &user);
            prop_assert!(k >= start && k < end);
            prop_assume!(other != room_id);
            let k = keys.member(other, &user);
            prop_assert!(k < start || k >= end);
        }

        #[test]
        fn one_users_index_entries_never_mix_with_anothers(a in "[a-z0-9]{1,32}", b in "[a-z0-9]{1,32}",
                                                          room in "[a-z0-9]{1,128}", sid in proptest::collection::vec(any::<u8>(), 16)) {
            prop_assume!(a != b);
            let keys = SmKeys::new(META_SHARD, 3);
            let (start, end) = keys.user_room_range(&a);
            let mine = keys.user_room(&a, &room);
            prop_assert!(mine >= start && mine < end);
            let theirs = keys.user_room(&b, &room);
            prop_assert!(theirs < start || theirs >= end);
            let (start, end) = keys.user_session_range(&a);
            prop_assert!(keys.user_session(&a, &sid) >= start && keys.user_session(&a, &sid) < end);
            let theirs = keys.user_session(&b, &sid);
            prop_assert!(theirs < start || theirs >= end);
        }
    }

    #[test]
    fn generation_ranges_are_disjoint_and_ordered() {
        let a = SmKeys::new(3, 7).range();
        let b = SmKeys::new(3, 8).range();
        assert_eq!(a.1, b.0);
        let last = SmKeys::new(3, u32::MAX).range();
        assert_eq!(last.1, shard_end(3).to_vec());
    }

    #[test]
    fn relative_keys_are_checked() {
        assert!(check_relative_sm_key(&[]).is_err());
        assert!(check_relative_sm_key(&[SM_TAG_MESSAGE, 1, 2]).is_ok());
        assert!(check_relative_sm_key(&[SM_TAG_MEMBER, 1]).is_ok());
        assert!(check_relative_sm_key(&[SM_TAG_EXTERNAL_ID, 1]).is_ok());
        assert!(check_relative_sm_key(&[SM_TAG_READ_CHANGE, 1]).is_ok());
        assert!(check_relative_sm_key(&[SM_TAG_READ_CHANGE + 1]).is_err());
        assert!(check_relative_sm_key(&[0x16]).is_err());
    }
}
