//! End to end: real chorusd processes on loopback, driven through the client library.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chorus_client::{Client, HistoryFrom, Message, SubscriptionEvent};
use common::{TestCluster, shard_of};

/// Collects `count` messages (or until `timeout`) from a subscription.
async fn collect(sub: &mut chorus_client::Subscription, count: usize, timeout: Duration) -> Vec<Message> {
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < count {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, sub.next()).await {
            Ok(Ok(SubscriptionEvent::Message(m))) => out.push(m),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("subscription failed: {e}"),
            Err(_) => break,
        }
    }
    out
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn assert_gap_free(messages: &[Message], first: u64, what: &str) {
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(m.seq, first + i as u64, "{what}: gap or duplicate at position {i}: {:?}", seqs(messages));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_through_one_node_reach_subscribers_on_the_others() {
    let cluster = TestCluster::start(3, 3, 4, &[]);
    cluster.wait_ready(1).await;
    let a = cluster.client(&[1], "ann").await;
    a.create_room("general", BTreeMap::new(), 0).await.unwrap();
    let b = cluster.client(&[2], "bob").await;
    let c = cluster.client(&[3], "cat").await;
    let mut sub_b = b.subscribe([("general".to_string(), 0)]);
    let mut sub_c = c.subscribe([("general".to_string(), 0)]);
    for i in 1..=50 {
        let receipt = a.send("general", format!("message {i}")).await.unwrap();
        assert_eq!((receipt.seq, receipt.duplicate), (i, false));
    }
    let got_b = collect(&mut sub_b, 50, Duration::from_secs(20)).await;
    let got_c = collect(&mut sub_c, 50, Duration::from_secs(20)).await;
    assert_gap_free(&got_b, 1, "subscriber on node 2");
    assert_gap_free(&got_c, 1, "subscriber on node 3");
    assert_eq!(got_b.len(), 50);
    assert_eq!(got_b, got_c);
    assert_eq!(String::from_utf8_lossy(&got_b[9].body), "message 10");
    assert_eq!(got_b[9].sender, "ann");

    // History is identical from every node, linearizable or local (once applied).
    let reference = a.history_all("general", 0, true).await.unwrap();
    assert_eq!(reference, got_b);
    for node in [1, 2, 3] {
        let client = cluster.client(&[node], "reader").await;
        assert_eq!(client.history_all("general", 0, true).await.unwrap(), reference, "linearizable via node {node}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let local = client.history_all("general", 0, false).await.unwrap();
            if local == reference {
                break;
            }
            assert!(Instant::now() < deadline, "local history of node {node} never caught up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Paging backwards.
    let page = a.history("general", HistoryFrom::Before(11), 5, true).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![6, 7, 8, 9, 10]);
    assert_eq!(page.last_seq, 50);
    let rooms = a.list_rooms("", 10).await.unwrap();
    assert_eq!(rooms.rooms.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["general"]);

    // Read-your-writes: a room whose creation was acknowledged is listed at once, through any
    // node (ListRooms reads every shard through its leader; once it read local replicas and
    // missed 1-2 rooms of 20).
    let clients = [&a, &b, &c];
    for i in 0..30 {
        let name = format!("fresh-{i:02}");
        let client = clients[i % 3];
        client.create_room(&name, BTreeMap::new(), 0).await.unwrap();
        let listed = client.list_rooms("", 1000).await.unwrap();
        assert!(
            listed.rooms.iter().any(|r| r.name == name),
            "room {name} missing from a ListRooms right after it was created"
        );
    }
    // And a subscription to a room created a moment ago through another node: the replica
    // that is behind checks with the leader before it says the room does not exist.
    for i in 0..20 {
        let name = format!("sub-{i:02}");
        a.create_room(&name, BTreeMap::new(), 0).await.unwrap();
        let mut subscription = clients[1 + i % 2].subscribe([(name.clone(), 0)]);
        a.send(&name, "first").await.unwrap();
        match common::within("the new room's first message", subscription.next()).await {
            Ok(SubscriptionEvent::Message(m)) => assert_eq!(m.seq, 1),
            other => panic!("subscribing to {name} right after it was created: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_sends_survive_a_leader_kill_and_the_killed_node_catches_up_by_snapshot() {
    // Small snapshot settings so that the killed node misses more than the retained log.
    let mut cluster = TestCluster::start(
        3,
        3,
        2,
        &["--snapshot-every-entries", "100", "--snapshot-log-percent", "0", "--log-kept-after-snapshot", "20"],
    );
    cluster.wait_ready(1).await;
    let room = "busy";
    let shard = shard_of(room, 2);
    let admin = cluster.client(&[1, 2, 3], "owner").await;
    admin.create_room(room, BTreeMap::new(), 0).await.unwrap();
    let leader = cluster.leader_of(1, shard).await;
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != leader).collect();

    // A subscriber and a sender on the followers, so that the kill tests failover, not luck.
    let watcher = cluster.client(&[others[0], others[1]], "watcher").await;
    let mut subscription = watcher.subscribe([(room.to_string(), 0)]);
    // The room's owner sends (a member from the start: the room's sequence is its messages).
    let sender = cluster.client(&[others[1], others[0]], "owner").await;
    const SENDS: u64 = 1000;
    let send_task = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut failed = Vec::new();
        for i in 1..=SENDS {
            match sender.send(room, format!("m{i}")).await {
                Ok(receipt) => acked.push((i, receipt.seq)),
                Err(e) => failed.push((i, e.to_string())),
            }
        }
        (acked, failed)
    });
    let subscriber_task = tokio::spawn(async move {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(240);
        while got.len() < SENDS as usize && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(30), subscription.next()).await {
                Ok(Ok(SubscriptionEvent::Message(m))) => got.push(m),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscription failed: {e}"),
                Err(_) => break,
            }
        }
        got
    });

    // Kill the leader once some messages are in.
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin.history(room, HistoryFrom::Before(u64::MAX), 1, false).await.map(|p| p.last_seq).unwrap_or(0) < 150 {
        assert!(Instant::now() < deadline, "sends are not progressing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(leader);
    let killed_at = Instant::now();

    let (acked, failed) = send_task.await.unwrap();
    assert!(failed.is_empty(), "sends failed despite retries: {failed:?}");
    assert_eq!(acked.len() as u64, SENDS);
    let failover = killed_at.elapsed();

    // Every acknowledged send is present exactly once, in one order.
    let survivor = cluster.client(&[others[0]], "checker").await;
    let history = survivor.history_all(room, 0, true).await.unwrap();
    assert_gap_free(&history, 1, "history");
    let mut seen = BTreeSet::new();
    for m in &history {
        assert!(seen.insert(m.body.clone()), "message {:?} appears twice", String::from_utf8_lossy(&m.body));
    }
    assert_eq!(history.len() as u64, SENDS, "exactly the acknowledged sends");
    for (i, seq) in &acked {
        assert_eq!(String::from_utf8_lossy(&history[(*seq - 1) as usize].body), format!("m{i}"));
    }
    // Sequential sends from one client: real-time order is the room's order.
    assert!(acked.windows(2).all(|w| w[0].1 < w[1].1));

    let streamed = subscriber_task.await.unwrap();
    assert_gap_free(&streamed, 1, "subscriber");
    assert_eq!(streamed, history, "the subscriber saw exactly the history");

    // The killed node restarts and catches up, through a snapshot: the leader purged its log.
    cluster.spawn(leader);
    let rejoined = cluster.client(&[leader], "rejoined").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(local) = rejoined.history_all(room, 0, false).await
            && local == history
        {
            break;
        }
        assert!(Instant::now() < deadline, "node {leader} did not catch up in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = cluster.wait_ready(leader).await;
    let replica = status.shards[shard as usize].replica_status.iter().find(|r| r.node == leader).unwrap();
    assert!(replica.snapshot_index > 150, "node {leader} should hold a snapshot past the kill point: {replica:?}");
    eprintln!("leader kill: all {SENDS} sends acknowledged {failover:?} after the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_go_straight_to_shard_leaders_and_fall_back_when_one_dies() {
    const SHARDS: u32 = 6;
    let mut cluster = TestCluster::start(3, 3, SHARDS, &[]);
    let status = cluster.wait_ready(1).await;
    // One room per shard.
    let rooms: Vec<String> = (0..SHARDS)
        .map(|shard| (0..).map(|i| format!("room-{i}")).find(|r| shard_of(r, SHARDS) == shard).unwrap())
        .collect();
    let client = cluster.client(&[1], "ann").await;
    for room in &rooms {
        client.create_room(room, BTreeMap::new(), 0).await.unwrap();
    }
    let expected: Vec<(u32, u64)> =
        status.shards.iter().filter(|s| s.shard < SHARDS && s.leader != 1).map(|s| (s.shard, s.leader)).collect();
    assert!(!expected.is_empty(), "leadership should be spread over the nodes: {:?}", status.shards);

    // The client learns the leaders from node 1 and connects to them (in the background).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut sent = vec![0u64; rooms.len()];
    while client.direct_shards() != expected {
        assert!(Instant::now() < deadline, "direct routes {:?}, expected {expected:?}", client.direct_shards());
        for (i, room) in rooms.iter().enumerate() {
            client.send(room, "warm-up").await.unwrap();
            sent[i] += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The leader of a directly-routed shard dies: its sends fail over (through node 1, which
    // forwards to the new leader), and no send is lost or doubled.
    let victim = expected[0].1;
    cluster.kill(victim);
    for round in 0..20 {
        for (i, room) in rooms.iter().enumerate() {
            let receipt = client.send(room, format!("round {round}")).await.unwrap();
            sent[i] += 1;
            assert_eq!(receipt.seq, sent[i], "room {room}");
        }
    }
    assert!(client.direct_shards().iter().all(|&(_, node)| node != victim), "{:?}", client.direct_shards());
    for (i, room) in rooms.iter().enumerate() {
        let history = client.history_all(room, 0, true).await.unwrap();
        assert_gap_free(&history, 1, room);
        assert_eq!(history.len() as u64, sent[i], "room {room}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_node_is_killed_reconnects_to_another_node_first() {
    let mut cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    let mut options = cluster.options(&[1, 2, 3], "ann");
    // Everything through the main connection, to node 1.
    options.route_to_leaders = false;
    let client = Client::connect(options).await.unwrap();
    let node_1 = cluster.nodes[&1].client_addr.clone();
    assert_eq!(client.current_node().await.as_deref(), Some(node_1.as_str()));
    client.create_room("r", BTreeMap::new(), 0).await.unwrap();
    for i in 1..=5u64 {
        assert_eq!(client.send("r", "before").await.unwrap().seq, i);
    }

    cluster.kill(1);
    // Whatever reaches node 1's port from now on lands here: the dead connection's packets,
    // and the Initial packets (long header) of any attempt to dial node 1 again, which would
    // cost the whole handshake timeout (a killed process answers nothing over QUIC).
    let trap = std::net::UdpSocket::bind(&node_1).unwrap();
    trap.set_nonblocking(true).unwrap();
    let receipt = client.send("r", "after").await.unwrap();
    assert_eq!(receipt.seq, 6);
    let now_on = client.current_node().await.unwrap_or_default();
    assert_ne!(now_on, node_1, "still on the killed node");
    let (mut dials, mut old_connection) = (0, 0);
    let mut packet = [0u8; 2048];
    while let Ok((n, _)) = trap.recv_from(&mut packet) {
        if n > 0 && packet[0] & 0x80 != 0 { dials += 1 } else { old_connection += 1 }
    }
    assert_eq!(dials, 0, "node 1 was dialled again ({old_connection} packets of the lost connection)");
    let history = client.history_all("r", 0, true).await.unwrap();
    assert_gap_free(&history, 1, "r");
    assert_eq!(history.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shards_keep_their_leaders_and_a_dead_leaders_shards_move() {
    const SHARDS: u32 = 8;
    // Without leader balancing: the returning node must not take its shards back here.
    let mut cluster = TestCluster::start(3, 3, SHARDS, &["--leader-balance-ms", "0"]);
    let before = cluster.wait_ready(1).await;
    // Idle for many election timeouts: no shard holds an election.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let idle = cluster.wait_ready(1).await;
    for (a, b) in before.shards.iter().zip(&idle.shards) {
        assert_eq!((a.leader, a.term), (b.leader, b.term), "shard {} changed leadership while idle", a.shard);
    }

    // Kill a node: the shards it led get new leaders, the others keep theirs.
    let victim = 2;
    let led: Vec<u32> = idle.shards.iter().filter(|s| s.leader == victim).map(|s| s.shard).collect();
    assert!(!led.is_empty(), "node {victim} should lead some shards: {:?}", idle.shards);
    cluster.kill(victim);
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let status = cluster.client(&[1], "probe").await.cluster_status().await;
        if let Ok(s) = status
            && s.shards.iter().all(|s| s.leader != 0 && s.leader != victim)
        {
            break s;
        }
        assert!(Instant::now() < deadline, "the shards of node {victim} found no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (a, b) in idle.shards.iter().zip(&after.shards) {
        if a.leader != victim {
            assert_eq!((a.leader, a.term), (b.leader, b.term), "shard {} should have kept its leader", a.shard);
        }
    }

    // The node returns and follows the current leaders, without a new election anywhere.
    cluster.spawn(victim);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cluster.wait_ready(1).await;
        let following = status
            .shards
            .iter()
            .all(|s| s.replica_status.iter().any(|r| r.node == victim && r.role == "follower" && r.term == s.term));
        if following {
            for (a, b) in after.shards.iter().zip(&status.shards) {
                assert_eq!((a.leader, a.term), (b.leader, b.term), "shard {} held an election", a.shard);
            }
            break;
        }
        assert!(Instant::now() < deadline, "node {victim} does not follow the leaders: {:?}", status.shards);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Writes work everywhere.
    let client = cluster.client(&[1, 2, 3], "ann").await;
    for shard in 0..SHARDS {
        let room = (0..).map(|i| format!("r{i}")).find(|r| shard_of(r, SHARDS) == shard).unwrap();
        client.create_room(&room, BTreeMap::new(), 0).await.unwrap();
        assert_eq!(client.send(&room, "hello").await.unwrap().seq, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_returns_to_the_preferred_node_after_a_restart_and_no_write_fails() {
    const SHARDS: u32 = 6;
    let mut cluster = TestCluster::start(3, 3, SHARDS, &["--leader-balance-ms", "1000"]);
    // Each shard prefers the first node of its placement: node (shard mod 3) + 1.
    let preferred = |shard: u32| u64::from(shard % 3) + 1;
    let status = cluster.wait_ready(2).await;
    let mine: Vec<u32> = (0..SHARDS).filter(|&s| preferred(s) == 1).collect();

    // Node 1 dies: the others take its shards.
    cluster.kill(1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.wait_ready(2).await;
        if mine.iter().all(|&shard| s.shards[shard as usize].leader != 1) {
            break;
        }
        assert!(Instant::now() < deadline, "node 1's shards found no other leader: {:?}", s.shards);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(status.shards.iter().all(|s| s.leader != 0));

    // Writes flow to node 1's shards while it returns and takes them back.
    let client = cluster.client(&[2, 3], "ann").await;
    let rooms: Vec<String> = mine
        .iter()
        .map(|&shard| (0..).map(|i| format!("pref{i}")).find(|r| shard_of(r, SHARDS) == shard).unwrap())
        .collect();
    for room in &rooms {
        client.create_room(room, BTreeMap::new(), 0).await.unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let (client, rooms, stop) = (client.clone(), rooms.clone(), stop.clone());
        async move {
            let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            let mut errors = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for room in &rooms {
                    match client.send(room, format!("m{i}")).await {
                        Ok(receipt) => acked.entry(room.clone()).or_default().push(receipt.seq),
                        Err(e) => errors.push(format!("{room}: {e}")),
                    }
                }
                i += 1;
            }
            (acked, errors)
        }
    });
    cluster.spawn(1);
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let s = cluster.wait_ready(2).await;
        if (0..SHARDS).all(|shard| s.shards[shard as usize].leader == preferred(shard)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leadership did not return to the preferred nodes: {:?}",
            s.shards.iter().map(|s| (s.shard, s.leader)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Some writes after the handover too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acked, errors) = writer.await.unwrap();
    assert!(errors.is_empty(), "writes failed during the handover: {errors:?}");
    for room in &rooms {
        let seqs = &acked[room];
        assert_eq!(*seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{room}: acked seqs not 1..n");
        let history = client.history_all(room, 0, true).await.unwrap();
        assert_eq!(history.len(), seqs.len(), "{room}: history holds every acked message and nothing else");
        assert_gap_free(&history, 1, room);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_of_the_shard_forwards_everything() {
    let cluster = TestCluster::start(5, 3, 5, &[]);
    cluster.wait_ready(1).await;
    // A room whose shard node 5 does not host (replicas of shard s: nodes s+1, s+2, s+3 mod 5).
    let room = (0..100)
        .map(|i| format!("room-{i}"))
        .find(|r| {
            let s = shard_of(r, 5) as u64;
            ![s % 5 + 1, (s + 1) % 5 + 1, (s + 2) % 5 + 1].contains(&5)
        })
        .unwrap();
    let outsider = cluster.client(&[5], "eve").await;
    outsider.create_room(&room, BTreeMap::new(), 0).await.unwrap();
    let mut subscription = outsider.subscribe([(room.clone(), 0)]);
    for i in 1..=20 {
        assert_eq!(outsider.send(&room, format!("hi {i}")).await.unwrap().seq, i);
    }
    let streamed = collect(&mut subscription, 20, Duration::from_secs(20)).await;
    assert_gap_free(&streamed, 1, "relayed subscription");
    assert_eq!(streamed.len(), 20);
    assert_eq!(outsider.history_all(&room, 0, true).await.unwrap(), streamed);
    assert_eq!(outsider.history_all(&room, 0, false).await.unwrap(), streamed);
    let status = outsider.cluster_status().await.unwrap();
    assert_eq!(status.nodes.len(), 5);
    let rooms_shards = status.shards.iter().filter(|s| s.shard != status.meta_shard);
    assert!(rooms_shards.clone().all(|s| s.replicas.len() == 3 && s.leader != 0), "{:?}", status.shards);
    assert_eq!(rooms_shards.count(), 5);
    let meta = status.shards.iter().find(|s| s.shard == status.meta_shard).expect("the meta group is listed");
    assert_eq!(meta.replicas.len(), 5, "the meta group is on every node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_fails_sends_with_unavailable_until_it_returns() {
    let mut cluster = TestCluster::start(3, 3, 1, &["--request-timeout-ms", "2000"]);
    cluster.wait_ready(1).await;
    let admin = cluster.client(&[1], "owner").await;
    admin.create_room("r", BTreeMap::new(), 0).await.unwrap();
    admin.send("r", "before").await.unwrap();
    // Signed in before the quorum goes (signing in is a write too).
    let mut options = cluster.options(&[1], "owner");
    options.retry_deadline = Duration::ZERO;
    let client = Client::connect(options).await.unwrap();
    cluster.kill(2);
    cluster.kill(3);
    // Let the survivor notice it has lost its quorum.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let err = client.send("r", "during").await.unwrap_err();
        assert_eq!(err.code(), Some("unavailable"), "{err}");
        assert!(!err.indeterminate(), "{err}");
        assert!(err.to_string().contains("no leader for shard 0"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "failed after {:?}", started.elapsed());
    }
    cluster.spawn(2);
    cluster.spawn(3);
    cluster.wait_ready(1).await;
    let after = cluster.client(&[1, 2, 3], "owner").await;
    let receipt = after.send("r", "after").await.unwrap();
    assert_eq!(receipt.seq, 2, "the failed sends appended nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_subscriptions_with_a_reason_and_subscribers_resume_elsewhere() {
    let mut cluster = TestCluster::start(3, 3, 1, &[]);
    cluster.wait_ready(1).await;
    let admin = cluster.client(&[1], "owner").await;
    admin.create_room("r", BTreeMap::new(), 0).await.unwrap();
    for i in 1..=5 {
        admin.send("r", format!("{i}")).await.unwrap();
    }
    let watcher = cluster.client(&[2, 3], "watcher").await;
    let mut subscription = watcher.subscribe([("r".to_string(), 0)]);
    assert_eq!(seqs(&collect(&mut subscription, 5, Duration::from_secs(10)).await), vec![1, 2, 3, 4, 5]);
    let status = cluster.terminate(2);
    assert!(status.success(), "chorusd exits cleanly on SIGTERM: {status}");
    for i in 6..=10 {
        admin.send("r", format!("{i}")).await.unwrap();
    }
    // The subscription resumes on node 3 from where it was.
    let mut resumed = false;
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rest.len() < 5 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), subscription.next()).await {
            Ok(Ok(SubscriptionEvent::Message(m))) => rest.push(m),
            Ok(Ok(SubscriptionEvent::Resumed { .. })) => resumed = true,
            Ok(Ok(other)) => panic!("unexpected {other:?}"),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
    }
    assert!(resumed, "the subscriber should report resuming on another node");
    assert_eq!(seqs(&rest), vec![6, 7, 8, 9, 10]);
    // Restarted with the same data dir, the node rejoins and serves the same history.
    cluster.spawn(2);
    let rejoined = cluster.client(&[2], "r2").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rejoined.history_all("r", 0, false).await.map(|h| h.len()).unwrap_or(0) < 10 {
        assert!(Instant::now() < deadline, "node 2 did not catch up after restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&cluster.nodes[&2].log).unwrap();
    assert!(log.contains("node stopped"), "node 2 should log an orderly stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_node_is_killed_resumes_before_the_idle_timeout() {
    let mut cluster = TestCluster::start(3, 3, 1, &[]);
    cluster.wait_ready(1).await;
    // A long idle timeout, so that the watchdog (half of it) and the idle timeout are far
    // apart: the subscription must resume well before the connection would time out.
    let idle_timeout = Duration::from_secs(16);
    let mut options = cluster.options(&[2, 3], "watcher");
    options.idle_timeout = idle_timeout;
    let watcher = Client::connect(options).await.unwrap();
    let watched = watcher.current_node().await.unwrap();
    let (&victim, _) = cluster.nodes.iter().find(|(_, n)| n.client_addr == watched).unwrap();
    let admin = cluster.client(&[1], "owner").await;
    admin.create_room("r", BTreeMap::new(), 0).await.unwrap();
    admin.send("r", "1").await.unwrap();
    // The watcher only subscribes: no request of its own would notice the dead node.
    let mut subscription = watcher.subscribe([("r".to_string(), 0)]);
    assert_eq!(seqs(&collect(&mut subscription, 1, Duration::from_secs(10)).await), vec![1]);

    cluster.kill(victim);
    let killed_at = Instant::now();
    let mut resumed_after = None;
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rest.is_empty() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), subscription.next()).await {
            Ok(Ok(SubscriptionEvent::Resumed { .. })) => {
                resumed_after = Some(killed_at.elapsed());
                admin.send("r", "2").await.unwrap();
            }
            Ok(Ok(SubscriptionEvent::Message(m))) => rest.push(m),
            Ok(Ok(other)) => panic!("unexpected {other:?}"),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break,
        }
    }
    let resumed_after = resumed_after.expect("the subscription should resume on another node");
    // The watchdog fires within a check (a quarter of its limit) after its limit, half the
    // idle timeout: ~8-10 s here; without it the connection times out after 16 s or more.
    assert!(
        resumed_after < idle_timeout - Duration::from_secs(2),
        "resumed {resumed_after:?} after the kill: the watchdog should fire after ~{:?}-{:?}",
        idle_timeout / 2,
        idle_timeout * 5 / 8
    );
    assert_eq!(seqs(&rest), vec![2]);
}

/// Kill and restart commands for `chorus bench failover`, as an operator would write them:
/// shell commands over pid files. Kills whatever they started when dropped.
struct ShellControl {
    dir: std::path::PathBuf,
    ids: Vec<u64>,
}

impl ShellControl {
    fn new(cluster: &TestCluster) -> ShellControl {
        let dir = cluster.dir.path().join("control");
        std::fs::create_dir_all(&dir).unwrap();
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        for (&id, node) in &cluster.nodes {
            std::fs::write(dir.join(format!("pid-{id}")), cluster.pid(id).to_string()).unwrap();
            let args: Vec<String> = cluster.args_of(id).iter().map(|a| quote(a)).collect();
            let script = format!(
                "{} {} >>{} 2>&1 </dev/null &\necho $! >{}\n",
                quote(common::CHORUSD),
                args.join(" "),
                quote(&node.log.display().to_string()),
                quote(&dir.join(format!("pid-{id}")).display().to_string()),
            );
            std::fs::write(dir.join(format!("restart-{id}.sh")), script).unwrap();
        }
        ShellControl { dir, ids: cluster.nodes.keys().copied().collect() }
    }

    /// kill -9, returning once the process is dead (a zombie counts as dead).
    fn kill_cmd(&self) -> String {
        let pid_file = self.dir.join("pid-{node}").display().to_string();
        format!(
            "pid=$(cat {pid_file}); kill -9 $pid; \
             while [ -e /proc/$pid ] && [ \"$(cut -d' ' -f3 /proc/$pid/stat)\" != Z ]; do sleep 0.01; done"
        )
    }

    fn restart_cmd(&self) -> String {
        format!("sh {}", self.dir.join("restart-{node}.sh").display())
    }
}

impl Drop for ShellControl {
    fn drop(&mut self) {
        for id in &self.ids {
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("pid-{id}"))) {
                let _ = std::process::Command::new("kill").args(["-9", pid.trim()]).status();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_failover_measures_from_the_kill_until_writes_and_deliveries_resume() {
    use chorus_client::bench::{Probe, run_failover};
    // No leader balancing: a restarted node taking its shard back between two probes would
    // move the leader the next probe is about to kill (a "failover" of a few milliseconds).
    let cluster = TestCluster::start(3, 3, 1, &["--leader-balance-ms", "0"]);
    cluster.wait_ready(1).await;
    let control = ShellControl::new(&cluster);
    let options = cluster.options(&[1, 2, 3], "bench");
    for (probe, at_least) in [
        // A new leader is elected once the old one has been silent for an election timeout.
        (Probe::Elsewhere, Duration::from_millis(300)),
        // A client on the killed node also waits for its watchdog before it moves: 1 s without
        // a datagram, counted from the last one it received, which may have come up to a
        // keep-alive interval (500 ms) before the kill.
        (Probe::OnLeader, Duration::from_millis(500)),
        (Probe::SubscriberOnLeader, Duration::from_millis(500)),
    ] {
        let report =
            run_failover(&options, &format!("fo-{probe:?}-"), 1, &control.kill_cmd(), &control.restart_cmd(), probe)
                .await
                .unwrap_or_else(|e| panic!("{probe:?}: {e}"));
        assert_eq!((report.kills, report.failover_ms.len()), (1, 1), "{probe:?}: {report:?}");
        let took = Duration::from_millis(report.failover_ms[0]);
        // Only what happened after the kill counts: faster than this would be a message or a
        // write from before it.
        assert!(took >= at_least && took < Duration::from_secs(30), "{probe:?}: {took:?}");
        assert_eq!(report.p50_ms, report.failover_ms[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_gaps_are_announced_to_subscribers() {
    let cluster = TestCluster::start(1, 1, 1, &[]);
    cluster.wait_ready(1).await;
    let client = cluster.client(&[1], "ann").await;
    client.create_room("short", BTreeMap::new(), 10).await.unwrap();
    for i in 1..=30 {
        client.send("short", format!("{i}")).await.unwrap();
    }
    let mut subscription = client.subscribe([("short".to_string(), 0)]);
    match common::within("the retention gap event", subscription.next()).await.unwrap() {
        SubscriptionEvent::Gap(gap) => assert_eq!((gap.from_seq, gap.to_seq), (1, 20)),
        other => panic!("expected a gap first, got {other:?}"),
    }
    assert_eq!(seqs(&collect(&mut subscription, 10, Duration::from_secs(10)).await), (21..=30).collect::<Vec<_>>());
    let page = client.history("short", HistoryFrom::After(0), 100, true).await.unwrap();
    assert_eq!((page.first_seq, page.messages.len()), (21, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_cluster_is_refused() {
    let mut cluster = TestCluster::start(1, 1, 1, &[]);
    cluster.wait_ready(1).await;
    cluster.kill(1);
    let mut args = cluster.args_of(1);
    args.extend(["--cluster-token".to_string(), "someone-else".to_string()]);
    let out = std::process::Command::new(common::CHORUSD).args(&args).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("belongs to cluster"), "{stderr}");
    assert!(stderr.contains("someone-else"), "{stderr}");
}

/// A node whose shard replica stops (openraft's core ends on a storage error or a bug, and
/// cannot be restarted in-process) exits with an error, so that its supervisor restarts it,
/// rather than staying up with a dead replica its peers count on. Here the replica stops at
/// start-up: its log claims a purge past anything its state machine has, a state openraft
/// refuses to start from.
#[tokio::test]
async fn a_node_whose_shard_replica_stops_exits_with_an_error() {
    use chorus_raft::keys::{self, StateKey};
    use clap::Parser;
    use prost::Message as _;

    let mut cluster = TestCluster::start(1, 1, 2, &[]);
    cluster.wait_ready(1).await;
    assert!(cluster.terminate(1).success());
    {
        let args = std::iter::once("chorusd".to_string()).chain(cluster.args_of(1));
        let config = chorus_server::config::Cli::try_parse_from(args).unwrap().run.resolve().unwrap();
        let identity = chorus_server::cluster::ClusterLayout::from_config(&config).identity(1);
        let db = chorus_raft::NodeDb::open(&config.data_dir, identity, &chorus_raft::DbOptions::default()).unwrap();
        let state = db.rocks().cf_handle(keys::CF_STATE).unwrap();
        let bogus = chorus_raft::LogId::new(openraft::CommittedLeaderId::new(1, 1), 1_000_000);
        let value = chorus_raft::codec::log_id_to_pb(&bogus).encode_to_vec();
        db.rocks().put_cf(state, keys::state_key(1, StateKey::LastPurged), value).unwrap();
    }
    cluster.spawn(1);
    let status = cluster.wait_exit(1, Duration::from_secs(30)).expect("the node should exit on its own");
    assert!(!status.success(), "exit status {status}");
    let log = std::fs::read_to_string(&cluster.nodes[&1].log).unwrap();
    // Whichever notices first, the shard watch or the shard's bootstrap, stops the node.
    assert!(
        log.contains("the node cannot go on") && log.contains("shard"),
        "{}",
        common::tail(&cluster.nodes[&1].log, 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_history_read_load_causes_no_leader_change() {
    let cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    let writer = cluster.client(&[1], "ann").await;
    writer.create_room("archive", BTreeMap::new(), 0).await.unwrap();
    // About 6 MiB of history: full pages of 1000 messages are about 2 MiB each.
    let body = "h".repeat(2048);
    for chunk in 0..30 {
        let sends = (0..100).map(|i| writer.send("archive", format!("{chunk}-{i} {body}")));
        for sent in futures::future::join_all(sends).await {
            sent.unwrap();
        }
    }
    let leaders = |status: chorus_client::ClusterStatusReply| -> Vec<(u32, u64, u64)> {
        status.shards.iter().map(|s| (s.shard, s.leader, s.term)).collect()
    };
    let before = leaders(writer.cluster_status().await.unwrap());
    assert!(before.iter().all(|&(_, leader, _)| leader != 0), "every shard has a leader: {before:?}");

    // Twelve readers, four per node, paging through the whole room as fast as they can, for
    // 10 s: linearizable pages through the leader and local ones on each replica.
    let mut readers = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    for r in 0..12u64 {
        let client = cluster.client(&[1 + r % 3], &format!("reader{r}")).await;
        readers.push(tokio::spawn(async move {
            let mut pages = 0u64;
            while Instant::now() < until {
                let mut after = 0;
                loop {
                    let page = client.history("archive", HistoryFrom::After(after), 1000, r % 2 == 0).await.unwrap();
                    pages += 1;
                    match page.messages.last() {
                        Some(m) => after = m.seq,
                        None => break,
                    }
                    if Instant::now() >= until {
                        break;
                    }
                }
            }
            pages
        }));
    }
    let mut pages = 0;
    for reader in readers {
        pages += reader.await.unwrap();
    }
    let after = leaders(writer.cluster_status().await.unwrap());
    eprintln!("{pages} history pages of up to 1000 messages read in 10 s");
    assert!(pages > 12, "the readers read something ({pages} pages)");
    assert_eq!(before, after, "a read load changed shard leaders or terms");
    for node in [1, 2, 3] {
        let log = std::fs::read_to_string(&cluster.nodes[&node].log).unwrap();
        assert!(!log.contains("calling an election"), "node {node} called an election under a read load");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_hands_leadership_over_and_costs_no_election() {
    let mut cluster = TestCluster::start(3, 3, 3, &[]);
    cluster.wait_ready(1).await;
    let owner = cluster.client(&[1, 2, 3], "owner").await;
    let rooms: Vec<String> = (0..6).map(|i| format!("roll-{i}")).collect();
    for room in &rooms {
        owner.create_room(room, BTreeMap::new(), 0).await.unwrap();
    }
    // A writer that keeps sending to every room through the restarts.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (client, stop, rooms) = (owner.clone(), stop.clone(), rooms.clone());
        tokio::spawn(async move {
            let (mut sent, mut failed) = (0u64, Vec::new());
            while !stop.is_cancelled() {
                for room in &rooms {
                    match client.send(room, "through the restart").await {
                        Ok(_) => sent += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                }
            }
            (sent, failed)
        })
    };
    for node in [1, 2, 3] {
        let logs: BTreeMap<u64, u64> =
            [1, 2, 3].into_iter().map(|n| (n, std::fs::metadata(&cluster.nodes[&n].log).unwrap().len())).collect();
        let status = cluster.terminate(node);
        assert!(status.success(), "node {node} stops cleanly: {status}");
        let stopped = std::fs::read_to_string(&cluster.nodes[&node].log).unwrap();
        assert!(
            stopped[logs[&node] as usize..].contains("handed shard leaderships over"),
            "node {node} handed its shards over before it stopped:\n{}",
            common::tail(&cluster.nodes[&node].log, 30)
        );
        // The others took them over without an election timeout (which, had the shards been
        // left leaderless, would have passed by now).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for other in [1, 2, 3].into_iter().filter(|&n| n != node) {
            let log = std::fs::read_to_string(&cluster.nodes[&other].log).unwrap();
            let since = &log[logs[&other] as usize..];
            assert!(
                !since.contains("calling an election"),
                "node {other} had to call an election when node {node} stopped:\n{since}"
            );
        }
        cluster.spawn(node);
        cluster.wait_ready(node).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    stop.cancel();
    let (sent, failed) = writer.await.unwrap();
    assert!(sent > 0);
    assert!(
        failed.is_empty(),
        "{} of {} sends failed during the rolling restart: {:?}",
        failed.len(),
        sent,
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unavailable_shard_does_not_cost_the_connection_or_other_rooms_subscriptions() {
    // One replica per shard: killing its node leaves that shard, and only it, unavailable.
    let mut cluster = TestCluster::start(3, 1, 6, &["--request-timeout-ms", "1500"]);
    let status = cluster.wait_ready(1).await;
    let replica_of = |shard: u32| status.shards.iter().find(|s| s.shard == shard).map(|s| s.replicas[0]).unwrap();
    let room_on = |node: u64| {
        (0..1000).map(|i| format!("room-{i}")).find(|r| replica_of(shard_of(r, 6)) == node).expect("a room on the node")
    };
    let (doomed, alive) = (room_on(2), room_on(3));
    let owner = cluster.client(&[1], "owner").await;
    owner.create_room(&doomed, BTreeMap::new(), 0).await.unwrap();
    owner.create_room(&alive, BTreeMap::new(), 0).await.unwrap();
    let mut options = cluster.options(&[1], "owner");
    options.retry_deadline = Duration::from_secs(3);
    options.route_to_leaders = false;
    let client = Client::connect(options).await.unwrap();
    let mut subscription = client.subscribe([(alive.clone(), 0)]);
    client.send(&alive, "before").await.unwrap();
    assert_eq!(seqs(&collect(&mut subscription, 1, Duration::from_secs(10)).await), vec![1]);

    cluster.kill(2);
    // Sends to the room whose only replica is gone fail (after retrying on the same
    // connection), while the other room's subscription goes on without a resumption.
    for _ in 0..2 {
        let err = client.send(&doomed, "into the void").await.unwrap_err();
        assert_eq!(err.code(), Some("unavailable"), "{err}");
    }
    assert_eq!(client.current_node().await.as_deref(), Some(cluster.nodes[&1].client_addr.as_str()));
    client.send(&alive, "after").await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), subscription.next()).await {
        Ok(Ok(SubscriptionEvent::Message(m))) => assert_eq!(m.seq, 2),
        other => panic!("the subscription should have gone on untouched, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_raced_against_a_timer_loses_nothing_and_never_resubscribes() {
    let cluster = TestCluster::start(1, 1, 1, &[]);
    cluster.wait_ready(1).await;
    let client = cluster.client(&[1], "ann").await;
    client.create_room("big", BTreeMap::new(), 0).await.unwrap();
    let body = "b".repeat(60 * 1024);
    for _ in 0..40 {
        client.send("big", body.clone()).await.unwrap();
    }
    // `chorus chat` races `next()` against stdin; here against a timer that fires in the
    // middle of frames (60 KiB messages arrive in many packets). A cancelled call must leave
    // the partly read frame for the next one.
    let mut subscription = client.subscribe([("big".to_string(), 0)]);
    let (mut got, mut cancelled) = (Vec::new(), 0u32);
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 40 {
        assert!(Instant::now() < deadline, "only {} of 40 messages in 30 s", got.len());
        tokio::select! {
            event = subscription.next() => match event.unwrap() {
                SubscriptionEvent::Message(m) => got.push(m),
                other => panic!("a cancelled next() must not break the stream: {other:?}"),
            },
            _ = tokio::time::sleep(Duration::from_micros(200)) => cancelled += 1,
        }
    }
    assert_gap_free(&got, 1, "raced subscription");
    assert!(got.iter().all(|m| m.body.len() == body.len()));
    assert!(cancelled > 0, "the timer never won: the test proved nothing");
}
