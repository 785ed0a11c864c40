use std::collections::BTreeMap;

use chorus_proto::storage::Op;
use openraft::RaftSnapshotBuilder;

use super::fixture::{Fixture, SHARD};
use super::messages::{EXPIRY_BLOCK, expired_blocks, expiry_floor};
use super::*;
use crate::error::QueryError;
use crate::types::Membership;

fn seqs(page: &HistoryPage) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

#[tokio::test]
async fn every_room_gets_a_dense_ordered_sequence() {
    let mut f = Fixture::new();
    f.create("general").await;
    f.create("random").await;
    // Mixed batches: several rooms in one entry, several entries.
    let mut expected_general = Vec::new();
    let mut client_seq = 0;
    for batch in 0..20u64 {
        let mut ops = Vec::new();
        for i in 0..(batch % 5 + 1) {
            client_seq += 1;
            let body = format!("msg {batch}/{i}");
            ops.push(append_op("general", "alice", b"c1", client_seq, body.clone()));
            expected_general.push(body);
            ops.push(append_op("random", "alice", b"c2", client_seq, "x"));
        }
        let results = f.apply_cmd(1_000 + batch, ops).await;
        assert!(results.iter().all(|r| matches!(r, Ok(OpOutcome::Appended { duplicate: false, .. }))));
    }
    let page = f.history("general", HistoryQuery::After { after: 0, limit: 1000 });
    assert_eq!(seqs(&page), (1..=expected_general.len() as u64).collect::<Vec<_>>());
    let bodies: Vec<_> = page.messages.iter().map(|m| String::from_utf8(m.body.to_vec()).unwrap()).collect();
    assert_eq!(bodies, expected_general);
    assert_eq!(page.last_seq, expected_general.len() as u64);
    assert_eq!(f.sm.reader().last_seq("random").unwrap(), expected_general.len() as u64);
}

#[tokio::test]
async fn a_retried_send_returns_the_original_seq_and_appends_nothing() {
    let mut f = Fixture::new();
    f.create("r").await;
    let first = f.send("r", "c1", 1, "hello").await.unwrap();
    let OpOutcome::Appended { seq, ts_ms, duplicate: false } = first else { panic!("{first:?}") };
    f.send("r", "c2", 1, "other client").await.unwrap();
    let before = f.sm_contents();
    // A later entry, and twice within one entry.
    let retry = f.send("r", "c1", 1, "hello").await.unwrap();
    assert_eq!(retry, OpOutcome::Appended { seq, ts_ms, duplicate: true });
    let twice =
        f.apply_cmd(9_000, vec![append_op("r", "alice", b"c3", 1, "a"), append_op("r", "alice", b"c3", 1, "a")]).await;
    assert_eq!(twice[0], Ok(OpOutcome::Appended { seq: 3, ts_ms: 9_000, duplicate: false }));
    assert_eq!(twice[1], Ok(OpOutcome::Appended { seq: 3, ts_ms: 9_000, duplicate: true }));
    assert_eq!(f.sm.reader().last_seq("r").unwrap(), 3);
    // The retry alone wrote nothing.
    assert_eq!(before.len() + 3, f.sm_contents().len(), "only c3's message, dedup and high-water records are new");
}

#[tokio::test]
async fn pipelined_sends_may_apply_out_of_client_order() {
    let mut f = Fixture::new();
    f.create("r").await;
    // client_seq 2 overtakes 1 (e.g. 1 was retried through another node).
    assert_eq!(f.send("r", "c", 2, "two").await, Ok(OpOutcome::Appended { seq: 1, ts_ms: 2_000, duplicate: false }));
    assert_eq!(f.send("r", "c", 1, "one").await, Ok(OpOutcome::Appended { seq: 2, ts_ms: 2_000, duplicate: false }));
    assert_eq!(f.send("r", "c", 2, "two").await, Ok(OpOutcome::Appended { seq: 1, ts_ms: 2_000, duplicate: true }));
    assert_eq!(f.send("r", "c", 1, "one").await, Ok(OpOutcome::Appended { seq: 2, ts_ms: 2_000, duplicate: true }));
}

#[tokio::test]
async fn dedup_state_is_bounded_by_the_window() {
    let mut f = Fixture::new();
    f.create("r").await;
    // Three windows: the edge leaves two whole blocks, the second not starting at client_seq 1.
    let total = DEDUP_WINDOW * 3 + 10;
    let mut client_seq = 0;
    while client_seq < total {
        let batch_end = (client_seq + 500).min(total);
        let ops = (client_seq + 1..=batch_end).map(|s| append_op("r", "alice", b"c", s, "")).collect();
        client_seq = batch_end;
        f.apply_cmd(5, ops).await;
    }
    let dedup_records = f.sm_contents().iter().filter(|(k, _)| k[keys::SM_PREFIX_LEN] == keys::SM_TAG_DEDUP).count();
    // The window, plus what is left of the block the window's edge is in.
    let edge = total - DEDUP_WINDOW;
    assert_eq!(dedup_records as u64, DEDUP_WINDOW + edge % EXPIRY_BLOCK);
    // Inside the window: remembered. Below it: a clear error, nothing appended.
    let oldest = total - DEDUP_WINDOW + 1;
    assert!(matches!(f.send("r", "c", oldest, "").await, Ok(OpOutcome::Appended { duplicate: true, .. })));
    assert_eq!(
        f.send("r", "c", oldest - 1, "").await,
        Err(CommandError::ClientSeqTooOld { client_seq: oldest - 1, oldest_accepted: oldest, window: DEDUP_WINDOW })
    );
    assert_eq!(f.sm.reader().last_seq("r").unwrap(), total);
}

/// Appends client_seqs `from..=to` of `client` to `room`, 500 to a command.
async fn append_range(f: &mut Fixture, room: &str, client: &[u8], from: u64, to: u64) {
    let mut next = from;
    while next <= to {
        let end = (next + 499).min(to);
        let ops = (next..=end).map(|s| append_op(room, "alice", client, s, "")).collect();
        for r in f.apply_cmd(5, ops).await {
            assert!(matches!(r, Ok(OpOutcome::Appended { duplicate: false, .. })), "{r:?}");
        }
        next = end + 1;
    }
}

#[tokio::test]
async fn the_dedup_window_holds_when_the_apply_cache_is_empty() {
    let mut f = Fixture::new();
    f.create("r").await;
    append_range(&mut f, "r", b"c", 1, 5000).await;
    // A reopened state machine (as after a restart) has an empty apply cache.
    f.sm = ShardStateMachine::open(f.db.clone(), SHARD).unwrap();
    assert!(matches!(f.send("r", "c", 5000, "").await, Ok(OpOutcome::Appended { seq: 5000, duplicate: true, .. })));
    let oldest = 5000 - DEDUP_WINDOW + 1;
    assert_eq!(
        f.send("r", "c", oldest - 1, "").await,
        Err(CommandError::ClientSeqTooOld { client_seq: oldest - 1, oldest_accepted: oldest, window: DEDUP_WINDOW })
    );
    assert!(matches!(f.send("r", "c", 5001, "").await, Ok(OpOutcome::Appended { seq: 5001, duplicate: false, .. })));
    // Another client of the room, and the same client in another room, start from nothing.
    assert!(matches!(f.send("r", "d", 1, "").await, Ok(OpOutcome::Appended { duplicate: false, .. })));
    f.create("s").await;
    f.sm = ShardStateMachine::open(f.db.clone(), SHARD).unwrap();
    assert!(matches!(f.send("s", "c", 1, "").await, Ok(OpOutcome::Appended { seq: 1, duplicate: false, .. })));
}

#[tokio::test]
async fn dedup_state_stays_bounded_for_a_client_that_sends_to_several_rooms() {
    // The client library numbers a client's sends across all its rooms, so within one room a
    // client's client_seqs are sparse. Records below each room's window must still go.
    let mut f = Fixture::new();
    let rooms = ["r0", "r1", "r2"];
    for r in rooms {
        f.create(r).await;
    }
    let room_of = |s: u64| rooms[(s.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 61) as usize % rooms.len()];
    let total = 5 * DEDUP_WINDOW;
    let mut next = 1;
    while next <= total {
        // Uneven batches, so that some expired records were written by the same batch.
        let end = (next + 1 + next % 700).min(total);
        let ops = (next..=end).map(|s| append_op(room_of(s), "alice", b"c", s, "")).collect();
        for r in f.apply_cmd(5, ops).await {
            assert!(matches!(r, Ok(OpOutcome::Appended { duplicate: false, .. })), "{r:?}");
        }
        next = end + 1;
    }
    let dedup_records = f.sm_contents().iter().filter(|(k, _)| k[keys::SM_PREFIX_LEN] == keys::SM_TAG_DEDUP).count();
    // Each room keeps the client's client_seqs within 4,096 of its own newest one, plus what
    // is left of the block its window's edge is in; without expiry it would be all 20,480.
    assert!(dedup_records as u64 <= DEDUP_WINDOW + EXPIRY_BLOCK + 64, "{dedup_records} dedup records kept");
    assert!(dedup_records as u64 >= DEDUP_WINDOW - 64, "{dedup_records} dedup records kept");
    // Every room still answers retries inside its window, and refuses below it.
    for s in total - 50..=total {
        let r = f.send(room_of(s), "c", s, "").await;
        assert!(matches!(r, Ok(OpOutcome::Appended { duplicate: true, .. })), "{s}: {r:?}");
    }
    let last_in = |room: &str| (1..=total).rev().find(|&s| room_of(s) == room).unwrap();
    for room in rooms {
        let oldest = last_in(room) - DEDUP_WINDOW + 1;
        let below = (1..oldest).rev().find(|&s| room_of(s) == room).unwrap();
        assert!(matches!(f.send(room, "c", below, "").await, Err(CommandError::ClientSeqTooOld { .. })));
    }
}

#[test]
fn expiry_covers_every_client_seq_below_the_window_once_its_block_is_whole() {
    // A mark moving by small steps and by far jumps: each step expires what the edge's whole
    // blocks left, nothing above the old mark, and no client_seq twice.
    let floor = expiry_floor;
    let mut high = 0u64;
    let mut expired_up_to = 0u64;
    let mut records = std::collections::BTreeSet::new();
    for step in [1u64, 1, 3, 64, 1, 7, 4096, 1, 1023, 1025, 10_000, 1, 2, 129, 4095, 4097, 1].iter().cycle().take(3000)
    {
        let new = high + step;
        if let Some((first, last)) = expired_blocks(high, new) {
            assert_eq!(first, floor(high) + 1, "{high} -> {new}: starts where the last expiry ended");
            assert!(last <= high && last <= floor(new), "{high} -> {new}: {first}..={last}");
            assert!(first > expired_up_to, "{high} -> {new}: {first}..={last} again");
            expired_up_to = last;
            records.retain(|&s| s < first || s > last);
        }
        records.insert(new);
        high = new;
        // Every record at or below the block-rounded edge is gone; the window is intact.
        assert!(records.iter().all(|&s| s > floor(high)), "{high}: a record at or below {} is kept", floor(high));
        assert!(records.contains(&high));
    }
    assert_eq!(expired_blocks(0, 1), None);
    let b = EXPIRY_BLOCK;
    assert_eq!(expired_blocks(DEDUP_WINDOW + b - 1, DEDUP_WINDOW + b), Some((1, b)));
    assert_eq!(expired_blocks(DEDUP_WINDOW + b, DEDUP_WINDOW + b + 1), None);
    assert_eq!(expired_blocks(5000, 1_000_000), Some((1, 5000)), "a far jump expires all the old window");
}

#[tokio::test]
async fn bad_input_gets_its_specific_error_and_writes_nothing() {
    let mut f = Fixture::new();
    f.create("r").await;
    f.send("r", "c", 1, "ok").await.unwrap();
    let before = f.sm_contents();
    let huge = vec![b'x'; Limits::PROTOCOL.max_body_bytes + 1];
    let cases: Vec<(op::Kind, CommandError)> = vec![
        (
            append_op("r", "alice", b"c", 2, huge.clone()),
            CommandError::BodyTooLarge { size: huge.len(), limit: Limits::PROTOCOL.max_body_bytes },
        ),
        (
            append_op("bad name", "alice", b"c", 2, "x"),
            CommandError::RoomNameInvalid {
                name: "bad name".into(),
                reason: "may contain only ASCII letters, digits, '.', '_' and '-'",
            },
        ),
        (append_op("nope", "alice", b"c", 2, "x"), CommandError::RoomNotFound { room: "nope".into() }),
        (
            append_op("r", "", b"c", 2, "x"),
            CommandError::SenderInvalid { sender: "".into(), reason: "must not be empty" },
        ),
        (append_op("r", "alice", b"", 2, "x"), CommandError::ClientIdInvalid { reason: "must not be empty" }),
        (append_op("r", "alice", b"c", 0, "x"), CommandError::ClientSeqZero),
        (create_room_op("r", "a"), CommandError::RoomExists { room: "r".into() }),
        (create_room_op("", "a"), CommandError::RoomNameInvalid { name: "".into(), reason: "must not be empty" }),
    ];
    for (op, expected) in cases {
        let results = f.apply_cmd(3_000, vec![op]).await;
        assert_eq!(results, vec![Err(expected)]);
    }
    // A command over the protocol's batch limit: every op refused.
    let ops = (0..Limits::PROTOCOL.max_ops_per_command + 1)
        .map(|i| append_op("r", "alice", b"d", i as u64 + 1, ""))
        .collect();
    let results = f.apply_cmd(3_000, ops).await;
    assert!(results.iter().all(|r| matches!(r, Err(CommandError::BatchTooLarge { .. }))));
    // An operation of unknown kind (from a newer version) is refused on its own.
    let entry = f.entry(EntryPayload::Normal(
        Command { ts_ms: 1, ops: vec![Op { kind: None }], rules: CURRENT_RULES, notify_after_ms: 0 }.into(),
    ));
    let responses = f.sm.apply([entry]).await.unwrap();
    assert_eq!(responses[0].results, vec![Err(CommandError::UnknownOperation)]);

    assert_eq!(f.sm_contents(), before, "refused operations must not write anything");
    // ...but last-applied moved on: the entries were applied (as refusals).
    assert_eq!(f.sm.reader().applied().unwrap().unwrap().index, f.next_index - 1);
}

#[tokio::test]
async fn a_refused_op_does_not_affect_its_neighbours_in_the_batch() {
    let mut f = Fixture::new();
    f.create("r").await;
    let results = f
        .apply_cmd(
            10_000,
            vec![
                append_op("r", "alice", b"c", 1, "x"),
                append_op("missing", "alice", b"c", 1, "y"),
                append_op("r", "alice", b"c", 2, "z"),
            ],
        )
        .await;
    assert_eq!(results[0], Ok(OpOutcome::Appended { seq: 1, ts_ms: 10_000, duplicate: false }));
    assert_eq!(results[1], Err(CommandError::RoomNotFound { room: "missing".into() }));
    assert_eq!(results[2], Ok(OpOutcome::Appended { seq: 2, ts_ms: 10_000, duplicate: false }));
}

#[tokio::test]
async fn room_timestamps_never_go_backwards() {
    let mut f = Fixture::new();
    f.create("r").await;
    let a = f.apply_cmd(50_000, vec![append_op("r", "alice", b"c", 1, "")]).await;
    // A new leader with a slower clock.
    let b = f.apply_cmd(40_000, vec![append_op("r", "alice", b"c", 2, "")]).await;
    assert_eq!(a[0], Ok(OpOutcome::Appended { seq: 1, ts_ms: 50_000, duplicate: false }));
    assert_eq!(b[0], Ok(OpOutcome::Appended { seq: 2, ts_ms: 50_000, duplicate: false }));
}

#[tokio::test]
async fn applied_state_and_membership_move_with_the_data() {
    let mut f = Fixture::new();
    assert_eq!(f.sm.applied_state().await.unwrap(), (None, StoredMembership::default()));
    let membership = Membership::new(vec![[1, 2, 3].into()], ());
    let m_entry = f.entry(EntryPayload::Membership(membership.clone()));
    let m_id = m_entry.log_id;
    let blank = f.entry(EntryPayload::Blank);
    let blank_id = blank.log_id;
    let responses = f.sm.apply([m_entry, blank]).await.unwrap();
    assert_eq!(responses, vec![CommandResponse::default(), CommandResponse::default()]);
    assert_eq!(f.sm.applied_state().await.unwrap(), (Some(blank_id), StoredMembership::new(Some(m_id), membership)));
}

#[tokio::test]
async fn history_pages_in_both_directions() {
    let mut f = Fixture::new();
    f.create("r").await;
    let ops = (1..=50).map(|i| append_op("r", "alice", b"c", i, format!("m{i}"))).collect();
    f.apply_cmd(1, ops).await;
    let q = |query| seqs(&f.history("r", query));
    assert_eq!(q(HistoryQuery::After { after: 0, limit: 3 }), vec![1, 2, 3]);
    assert_eq!(q(HistoryQuery::After { after: 48, limit: 10 }), vec![49, 50]);
    assert_eq!(q(HistoryQuery::After { after: 50, limit: 10 }), Vec::<u64>::new());
    assert_eq!(q(HistoryQuery::After { after: u64::MAX, limit: 10 }), Vec::<u64>::new());
    assert_eq!(q(HistoryQuery::Before { before: u64::MAX, limit: 3 }), vec![48, 49, 50]);
    assert_eq!(q(HistoryQuery::Before { before: 3, limit: 10 }), vec![1, 2]);
    assert_eq!(q(HistoryQuery::Before { before: 1, limit: 10 }), Vec::<u64>::new());
    assert_eq!(q(HistoryQuery::Before { before: 20, limit: 0 }), Vec::<u64>::new());
    let all = f.history("r", HistoryQuery::After { after: 0, limit: usize::MAX });
    assert_eq!(all.messages.len(), 50);
    let reader = f.sm.reader();
    assert!(matches!(
        reader.history("absent", HistoryQuery::After { after: 0, limit: 1 }, "alice"),
        Err(QueryError::Invalid(CommandError::RoomNotFound { .. }))
    ));
    assert!(matches!(
        reader.history("no/slash", HistoryQuery::After { after: 0, limit: 1 }, "alice"),
        Err(QueryError::Invalid(CommandError::RoomNameInvalid { .. }))
    ));
}

#[tokio::test]
async fn rooms_are_listed_in_name_order_with_paging() {
    let mut f = Fixture::new();
    for name in ["delta", "alpha", "charlie", "bravo"] {
        f.create(name).await;
    }
    let reader = f.sm.reader();
    let names = |page: rooms::RoomPage| page.rooms.into_iter().map(|r| r.room.name).collect::<Vec<_>>();
    assert_eq!(names(reader.list_rooms(None, 10, "alice", false).unwrap()), ["alpha", "bravo", "charlie", "delta"]);
    assert_eq!(names(reader.list_rooms(None, 2, "alice", false).unwrap()), ["alpha", "bravo"]);
    assert_eq!(names(reader.list_rooms(Some("bravo"), 10, "alice", false).unwrap()), ["charlie", "delta"]);
    assert_eq!(names(reader.list_rooms(Some("b"), 1, "alice", false).unwrap()), ["bravo"]);
}

#[tokio::test]
async fn subscribers_see_appended_messages_in_order() {
    let mut f = Fixture::new();
    f.create("r").await;
    let mut events = f.sm.reader().subscribe();
    f.apply_cmd(1, vec![append_op("r", "alice", b"c", 1, "x"), append_op("r", "alice", b"c", 2, "y")]).await;
    f.send("r", "c", 2, "y").await.unwrap(); // a duplicate: no event
    f.send("r", "c", 3, "z").await.unwrap();
    let mut seen = Vec::new();
    while let Ok(ShardEvent::Appended(batch)) = events.try_recv() {
        seen.extend(batch.iter().map(|m| (m.room.clone(), m.message.seq)));
    }
    assert_eq!(seen, vec![("r".into(), 1), ("r".into(), 2), ("r".into(), 3)]);
}

/// Two replicas applying the same entries end with byte-identical state.
#[tokio::test]
async fn replicas_applying_the_same_entries_are_identical() {
    use rand::{Rng, SeedableRng};
    let seed = rand::random::<u64>();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut a = Fixture::new();
    let mut b = Fixture::new();
    let rooms = ["r0", "r1", "r2", "bad name"];
    let mut entries = Vec::new();
    for i in 0..400u64 {
        let ops = (0..rng.random_range(1..8))
            .map(|_| {
                let room = rooms[rng.random_range(0..rooms.len())];
                // Members come and go (kicks, bans, roles), so appends are refused or not
                // depending on where in the batch they fall.
                let users = ["s", "t", "u"];
                let user = users[rng.random_range(0..users.len())];
                let other = users[rng.random_range(0..users.len())];
                let actions = [
                    MembershipAction::Join,
                    MembershipAction::Leave,
                    MembershipAction::Kick,
                    MembershipAction::Ban,
                    MembershipAction::Unban,
                    MembershipAction::Invite,
                ];
                if rng.random_bool(0.1) {
                    create_room_op(room, "s")
                } else if rng.random_bool(0.15) {
                    membership_op(room, user, actions[rng.random_range(0..actions.len())], other)
                } else if rng.random_bool(0.1) {
                    // Read markers move forward, back (unread) and past the end (refused).
                    op::Kind::MarkRead(chorus_proto::storage::MarkRead {
                        room: room.into(),
                        user: user.into(),
                        seq: rng.random_range(0..i + 2),
                        unread: rng.random_bool(0.2),
                        share: rng.random_bool(0.5),
                    })
                } else {
                    let client = [b'c', rng.random_range(0..3u8)];
                    // Client seqs climb past the dedup window, out of order and with retries,
                    // spread over the rooms: expiry runs, on sparse client seqs too.
                    let client_seq = i * 60 + rng.random_range(1..120);
                    let mut body = vec![0u8; rng.random_range(0..100)];
                    if rng.random_bool(0.3) {
                        body.extend_from_slice(format!(" @{other} @{user}").as_bytes());
                    }
                    append_op(room, user, &client, client_seq, body)
                }
            })
            .map(|k| Op { kind: Some(k) })
            .collect();
        entries.push(Command {
            ts_ms: 1_000 + rng.random_range(0..100) + i,
            ops,
            rules: CURRENT_RULES,
            notify_after_ms: 0,
        });
    }
    // One replica applies each entry on its own, the other in runs of up to 100 entries (as a
    // follower catching up does): the result must not depend on how entries are grouped.
    let mut responses = (Vec::new(), Vec::new());
    let mut pending = Vec::new();
    let count = entries.len();
    for (n, cmd) in entries.into_iter().enumerate() {
        let ea = a.entry(EntryPayload::Normal(cmd.clone().into()));
        responses.0.extend(a.sm.apply([ea]).await.unwrap());
        pending.push(b.entry(EntryPayload::Normal(cmd.into())));
        if rng.random_bool(0.02) || pending.len() == 100 || n + 1 == count {
            responses.1.extend(b.sm.apply(std::mem::take(&mut pending)).await.unwrap());
        }
    }
    assert_eq!(responses.0, responses.1, "seed {seed}");
    assert_eq!(a.sm_contents(), b.sm_contents(), "seed {seed}");
}

async fn install_snapshot_of(from: &mut Fixture, to: &mut Fixture) -> SnapshotMeta {
    let snapshot = from.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    // Stream it through a fresh receiving file, chunk by chunk, as openraft does.
    let mut source = snapshot.snapshot;
    let mut receiving = to.sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::copy(&mut source, &mut *receiving).await.unwrap();
    to.sm.install_snapshot(&snapshot.meta, receiving).await.unwrap();
    snapshot.meta
}

#[tokio::test]
async fn a_retry_after_a_snapshot_install_is_still_deduplicated() {
    let mut leader = Fixture::new();
    let mut follower = Fixture::new();
    leader.create("r").await;
    for i in 1..=10 {
        leader.send("r", "c", i, &format!("m{i}")).await.unwrap();
    }
    let meta = install_snapshot_of(&mut leader, &mut follower).await;
    follower.next_index = leader.next_index;
    assert_eq!(follower.sm.applied_state().await.unwrap().0, meta.last_log_id);
    // The retry arrives at the follower, now leader.
    assert_eq!(
        follower.send("r", "c", 7, "m7").await,
        Ok(OpOutcome::Appended { seq: 7, ts_ms: 2_000, duplicate: true })
    );
    assert_eq!(
        follower.send("r", "c", 11, "m11").await,
        Ok(OpOutcome::Appended { seq: 11, ts_ms: 2_000, duplicate: false })
    );
    let page = follower.history("r", HistoryQuery::After { after: 0, limit: 100 });
    assert_eq!(seqs(&page), (1..=11).collect::<Vec<_>>());
}

#[tokio::test]
async fn installing_a_snapshot_replaces_the_whole_state() {
    let mut leader = Fixture::new();
    let mut follower = Fixture::new();
    leader.create("kept").await;
    leader.send("kept", "c", 1, "leader's").await.unwrap();
    // State the follower has that the snapshot does not: must be gone after install.
    follower.create("stale").await;
    follower.send("stale", "c", 1, "old").await.unwrap();
    install_snapshot_of(&mut leader, &mut follower).await;
    let names: Vec<_> = follower
        .sm
        .reader()
        .list_rooms(None, 10, "alice", false)
        .unwrap()
        .rooms
        .into_iter()
        .map(|r| r.room.name)
        .collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(leader.sm_contents().len(), follower.sm_contents().len());
    // The installed snapshot is the follower's current one, and survives a restart.
    let current = follower.sm.get_current_snapshot().await.unwrap().unwrap();
    let dir = follower._dir.path().to_path_buf();
    drop(follower.sm);
    let reopened = ShardStateMachine::open(follower.db.clone(), SHARD).unwrap();
    let mut reopened = reopened;
    assert_eq!(reopened.get_current_snapshot().await.unwrap().unwrap().meta, current.meta);
    assert_eq!(reopened.reader().last_seq("kept").unwrap(), 1);
    assert!(dir.exists());
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_and_the_state_kept() {
    use tokio::io::{AsyncSeekExt, AsyncWriteExt};
    let mut leader = Fixture::new();
    let mut follower = Fixture::new();
    leader.create("r").await;
    for i in 1..=20 {
        leader.send("r", "c", i, "payload").await.unwrap();
    }
    follower.create("mine").await;
    let before = follower.sm_contents();
    let snapshot = leader.sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let mut receiving = follower.sm.begin_receiving_snapshot().await.unwrap();
    let mut source = snapshot.snapshot;
    tokio::io::copy(&mut source, &mut *receiving).await.unwrap();
    // Flip one byte in the middle of the records.
    let len = receiving.seek(std::io::SeekFrom::End(0)).await.unwrap();
    receiving.seek(std::io::SeekFrom::Start(len / 2)).await.unwrap();
    receiving.write_all(&[0xAA]).await.unwrap();
    let err = follower.sm.install_snapshot(&snapshot.meta, receiving).await.unwrap_err();
    assert!(err.to_string().contains("corrupt snapshot"), "{err}");
    assert_eq!(follower.sm_contents(), before);
    assert!(follower.sm.reader().room("mine").unwrap().is_some());
}

#[tokio::test]
async fn leftovers_of_an_interrupted_install_are_removed_at_open() {
    let mut f = Fixture::new();
    f.create("r").await;
    let before = f.sm_contents();
    // What an install that crashed before its switch leaves: keys in the next generation.
    let next = SmKeys::new(SHARD, 1);
    let mut batch = WriteBatch::default();
    batch.put_cf(f.db.cf_sm().unwrap(), next.room("ghost"), b"junk");
    f.db.write(batch).unwrap();
    assert_ne!(f.sm_contents(), before);
    let reopened = ShardStateMachine::open(f.db.clone(), SHARD).unwrap();
    assert_eq!(f.sm_contents(), before);
    assert!(reopened.reader().room("ghost").unwrap().is_none());
    assert!(reopened.reader().room("r").unwrap().is_some());
}

#[tokio::test]
async fn room_metadata_is_stored() {
    let mut f = Fixture::new();
    let mut metadata = BTreeMap::new();
    metadata.insert("topic".to_string(), "launch".to_string());
    let op = op::Kind::CreateRoom(CreateRoom {
        room: "r".into(),
        creator: "ann".into(),
        metadata: metadata.clone(),
        retention_max_messages: 0,
        visibility: 0,
    });
    f.apply_cmd(77, vec![op]).await;
    let room = f.sm.reader().room("r").unwrap().unwrap();
    assert_eq!((room.creator.as_str(), room.created_ts_ms, room.metadata), ("ann", 77, metadata));
}

#[tokio::test]
async fn retention_keeps_the_newest_messages_and_history_starts_there() {
    let mut f = Fixture::new();
    let create = op::Kind::CreateRoom(CreateRoom {
        room: "short".into(),
        creator: "alice".into(),
        metadata: BTreeMap::new(),
        retention_max_messages: 10,
        visibility: 0,
    });
    f.apply_cmd(1, vec![create]).await;
    // One big batch (range delete) and single appends (point deletes).
    f.apply_cmd(2, (1..=100).map(|i| append_op("short", "alice", b"c", i, format!("m{i}"))).collect()).await;
    for i in 101..=105 {
        f.send("short", "c", i, "x").await.unwrap();
    }
    let room = f.sm.reader().room("short").unwrap().unwrap();
    assert_eq!((room.first_seq, room.last_seq), (96, 105));
    let page = f.history("short", HistoryQuery::After { after: 0, limit: 1000 });
    assert_eq!(seqs(&page), (96..=105).collect::<Vec<_>>());
    assert_eq!(page.first_seq, 96);
    assert_eq!(seqs(&f.history("short", HistoryQuery::Before { before: 98, limit: 10 })), vec![96, 97]);
    let messages = f.sm_contents().iter().filter(|(k, _)| k[keys::SM_PREFIX_LEN] == keys::SM_TAG_MESSAGE).count();
    assert_eq!(messages, 10, "deleted messages are gone from disk");
}

#[tokio::test]
async fn a_snapshot_build_stops_once_its_shard_closes() {
    let mut f = Fixture::new();
    f.create("r").await;
    // More records than a build scans between two looks at its store.
    append_range(&mut f, "r", b"c", 1, 5_000).await;
    let mut builder = f.sm.get_snapshot_builder().await;
    f.sm.snapshots.close();
    assert!(builder.build_snapshot().await.is_err(), "the build went on after its shard closed");
    assert!(f.sm.get_current_snapshot().await.unwrap().is_none());
    let left: Vec<_> = std::fs::read_dir(f.db.snapshot_dir(SHARD)).unwrap().collect();
    assert!(left.is_empty(), "the half-built file was left: {left:?}");
}

/// An apply runs on a blocking thread: on a single-threaded runtime, an inline apply of a
/// thousand appends would finish within the first poll, every time.
#[tokio::test(flavor = "current_thread")]
async fn applies_leave_the_async_thread_free() {
    let mut f = Fixture::new();
    f.create("r").await;
    let mut pending = 0;
    for round in 0..3u64 {
        let ops = (1..=1_000).map(|s| append_op("r", "alice", b"c", round * 1_000 + s, "hello")).collect::<Vec<_>>();
        let cmd = Command {
            ts_ms: 5,
            ops: ops.into_iter().map(|k| Op { kind: Some(k) }).collect(),
            rules: CURRENT_RULES,
            notify_after_ms: 0,
        };
        let entry = f.entry(EntryPayload::Normal(cmd.into()));
        let mut apply = std::pin::pin!(f.sm.apply([entry]));
        let responses = match futures::poll!(apply.as_mut()) {
            std::task::Poll::Ready(responses) => responses.unwrap(),
            std::task::Poll::Pending => {
                pending += 1;
                apply.await.unwrap()
            }
        };
        assert!(responses[0].results.iter().all(|r| matches!(r, Ok(OpOutcome::Appended { duplicate: false, .. }))));
    }
    assert!(pending > 0, "every apply completed inside its first poll: it ran on the async thread");
}
