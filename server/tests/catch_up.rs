//! Offline catch-up on real processes: read markers and Sync, across nodes and failovers.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use chorus_client::catch_up::Catch;
use common::{TestCluster, shard_of, within};

const SHARDS: u32 = 4;
const NO_LIMITS: &[&str] =
    &["--rate-sends-per-user", "0", "--rate-rooms-per-user", "0", "--rate-requests-per-connection", "0"];

fn rooms_of(catch: &Catch) -> BTreeSet<String> {
    catch.rooms.iter().filter_map(|r| r.room.as_ref()).map(|r| r.name.clone()).collect()
}

/// bob is in 200 rooms and goes offline while 1,000 messages arrive in 20 of them (and more in
/// rooms he is not in); a shard leader dies meanwhile. One Sync through another node gives him
/// exactly those 20 rooms with their counts; marking them read moves them once more; then
/// nothing is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_user_catches_up_with_one_sync_and_gets_exactly_the_changed_rooms() {
    let mut cluster = TestCluster::start(3, 3, SHARDS, NO_LIMITS);
    cluster.wait_ready(1).await;
    let ann = cluster.client(&[1], "ann").await;
    let bob = cluster.client(&[2], "bob").await;
    let rooms: Vec<String> = (0..200).map(|i| format!("room-{i:03}")).collect();
    let others: Vec<String> = (0..10).map(|i| format!("elsewhere-{i}")).collect();
    within("creating 210 rooms and joining 200", async {
        for room in rooms.iter().chain(&others) {
            ann.create_room(room, BTreeMap::new(), 0).await.unwrap();
        }
        for room in &rooms {
            bob.join(room).await.unwrap();
        }
    })
    .await;
    let first = within("bob's first sync", bob.sync(&[], 1)).await.unwrap();
    assert_eq!(rooms_of(&first), rooms.iter().cloned().collect::<BTreeSet<_>>());
    assert!(first.rooms.iter().all(|r| r.unread == 0 && r.mentions == 0), "nothing was sent yet");
    let token = first.next.clone();
    drop(bob);

    // While bob is away: 50 messages in each of 20 of his rooms (every 10th mentions him),
    // and 100 in each room he is not in.
    let changed: Vec<String> = rooms.iter().step_by(10).cloned().collect();
    assert_eq!(changed.len(), 20);
    // Rooms at once, each room's messages in order: 2,000 sends one after another took close
    // to the 30 s guard in a debug build on a busy CI machine.
    let ann = &ann;
    within("1,000 messages to bob's rooms and 1,000 elsewhere", async {
        let to_bob = changed.iter().map(|room| async move {
            for i in 0..50 {
                let body = if i % 10 == 0 { format!("@bob look at {i}") } else { format!("message {i}") };
                ann.send(room, body).await.unwrap();
            }
        });
        let elsewhere = others.iter().map(|room| async move {
            for i in 0..100 {
                ann.send(room, format!("not for bob {i}")).await.unwrap();
            }
        });
        futures::future::join(futures::future::join_all(to_bob), futures::future::join_all(elsewhere)).await;
    })
    .await;
    // The leader of the shard with the most changed rooms dies.
    let busiest = (0..SHARDS).max_by_key(|s| changed.iter().filter(|r| shard_of(r, SHARDS) == *s).count()).unwrap();
    let leader = cluster.leader_of(1, busiest).await;
    cluster.kill(leader);
    let via = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();

    let bob = cluster.client(&[via], "bob").await;
    let started = Instant::now();
    let caught = within("bob's catch-up sync", bob.sync(&token, 5)).await.unwrap();
    let incremental = started.elapsed();
    assert_eq!(rooms_of(&caught), changed.iter().cloned().collect::<BTreeSet<_>>(), "exactly the changed rooms");
    for update in &caught.rooms {
        let room = update.room.as_ref().unwrap();
        assert_eq!((update.unread, update.mentions), (50, 5), "counts of {}", room.name);
        assert_eq!(room.last_seq, 51, "{}: bob's join, then 50 messages", room.name);
        let seqs: Vec<u64> = update.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, vec![47, 48, 49, 50, 51], "newest messages of {}", room.name);
        assert!(update.limited, "{}: 45 unread messages are not in the reply", room.name);
        assert_eq!(update.read_seq, 1, "{}: bob read up to his join", room.name);
    }
    // Newest first.
    let order: Vec<u64> = caught.rooms.iter().map(|r| r.room.as_ref().unwrap().last_ts_ms).collect();
    assert!(order.windows(2).all(|w| w[0] >= w[1]), "rooms come newest first: {order:?}");

    // Reading them is a change too (another device of bob's learns of it), and then nothing is.
    for room in &changed {
        let marked = bob.mark_read(room, 0, false, false).await.unwrap();
        assert_eq!((marked.read_seq, marked.unread, marked.mentions), (51, 0, 0));
    }
    let again = within("the sync after reading", bob.sync(&caught.next, 0)).await.unwrap();
    assert_eq!(rooms_of(&again), changed.iter().cloned().collect::<BTreeSet<_>>());
    assert!(again.rooms.iter().all(|r| r.unread == 0 && r.mentions == 0));
    let quiet = within("a sync with nothing new", bob.sync(&again.next, 0)).await.unwrap();
    assert_eq!(rooms_of(&quiet), BTreeSet::new());

    let started = Instant::now();
    let full = within("a first sync of 200 rooms", bob.sync(&[], 5)).await.unwrap();
    let complete = started.elapsed();
    assert_eq!(full.rooms.len(), 200);
    println!(
        "catch_up: a sync of the 20 changed rooms of 200 took {} ms, a first sync of all 200 {} ms \
         (debug build, 3 nodes, one leader killed)",
        incremental.as_millis(),
        complete.as_millis()
    );
}

/// Read markers never move back: not with a retried or reordered MarkRead, not across a
/// leader kill; an explicit "unread" is the only way back. Receipts are shown only when shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_only_move_forward_under_retries_and_failover() {
    let mut cluster = TestCluster::start(3, 3, SHARDS, NO_LIMITS);
    cluster.wait_ready(1).await;
    let ann = cluster.client(&[1], "ann").await;
    let bob = cluster.client(&[2, 3], "bob").await;
    ann.create_room("general", BTreeMap::new(), 0).await.unwrap();
    bob.join("general").await.unwrap();
    for i in 0..20 {
        ann.send("general", format!("hello {i}")).await.unwrap();
    }
    let marked = bob.mark_read("general", 10, false, true).await.unwrap();
    assert_eq!((marked.read_seq, marked.unread), (10, 11));
    // A late, reordered mark does not move it back.
    assert_eq!(bob.mark_read("general", 5, false, false).await.unwrap().read_seq, 10);
    assert_eq!(bob.mark_read("general", 10, false, false).await.unwrap().read_seq, 10);

    // Kill the room's leader; marks go on through the new one.
    let shard = shard_of("general", SHARDS);
    let leader = cluster.leader_of(1, shard).await;
    cluster.kill(leader);
    let mut last = 10;
    for seq in [12, 11, 15, 14, 21] {
        let marked =
            within("a MarkRead across the failover", bob.mark_read("general", seq, false, false)).await.unwrap();
        last = last.max(seq);
        assert_eq!(marked.read_seq, last, "after marking {seq}");
    }
    assert_eq!(bob.mark_read("general", 22, false, false).await.unwrap_err().code(), Some("invalid_argument"));
    let unread = bob.mark_read("general", 3, true, false).await.unwrap();
    assert_eq!((unread.read_seq, unread.unread), (3, 18));

    // Receipts: ann sees what bob shared (10), bob sees his own marker.
    let via = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    let ann = cluster.client(&[via], "ann").await;
    let receipt =
        |members: Vec<chorus_proto::client::Member>| members.into_iter().find(|m| m.user == "bob").unwrap().read_seq;
    assert_eq!(receipt(ann.all_members("general").await.unwrap()), 10);
    assert_eq!(receipt(bob.all_members("general").await.unwrap()), 3);
    // ann shares nothing: bob sees 0 for her.
    let ann_receipt = bob.all_members("general").await.unwrap().into_iter().find(|m| m.user == "ann").unwrap().read_seq;
    assert_eq!(ann_receipt, 0);
}
