//! One hostile client cannot starve the others: a slow-loris connection that declares the
//! largest requests and sends their bodies a trickle at a time, and a subscriber that never
//! reads, run beside a normal client whose sends are acknowledged about as fast as without
//! them. The slow subscriber is evicted with a reason, and its connection's other streams go on.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_client::Client;
use chorus_proto::client::{self as pb, request, response};
use chorus_proto::framing;
use common::TestCluster;
use quinn::crypto::rustls::QuicClientConfig;

/// A raw QUIC connection to node 1 (with a small stream receive window: what a subscriber
/// that does not read leaves the server to hold), signed in with `token`.
async fn raw_signed_in(cluster: &TestCluster, token: &str) -> quinn::Connection {
    let pin = chorus_client::tls::parse_fingerprint(&cluster.fingerprint).unwrap();
    let crypto = chorus_client::tls::client_crypto(&chorus_client::Trust::Fingerprints(vec![pin])).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(64 * 1024));
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = cluster.nodes[&1].client_addr.parse().unwrap();
    let connection = endpoint.connect_with(config, addr, "localhost").unwrap().await.unwrap();
    let hello = pb::Request {
        kind: Some(request::Kind::Hello(pb::Hello {
            client_name: "hostile".into(),
            access_token: token.into(),
            ..Default::default()
        })),
    };
    let (mut s, mut r) = common::within("a new stream", connection.open_bi()).await.unwrap();
    framing::write_message(&mut s, &hello).await.unwrap();
    s.finish().unwrap();
    let reply: pb::Response =
        common::within("the server's answer", framing::read_message(&mut r, 1 << 20)).await.unwrap().unwrap();
    match reply.kind {
        Some(response::Kind::Hello(h)) => assert!(!h.user.is_empty(), "signed in"),
        other => panic!("hello: {other:?}"),
    }
    connection
}

/// The p99 of `n` sequential sends' acknowledgement times.
async fn ack_p99(client: &Client, room: &str, n: usize) -> Duration {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(20), client.send(room, format!("probe {i}")))
            .await
            .expect("a normal client's send is answered")
            .expect("a normal client's send succeeds");
        took.push(started.elapsed());
    }
    took.sort_unstable();
    took[(n * 99 / 100).min(n - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_and_a_subscriber_that_never_reads_do_not_starve_a_normal_client() {
    let cluster = TestCluster::start(1, 1, 1, &[]);
    cluster.wait_ready(1).await;
    let normal = cluster.client(&[1], "ann").await;
    normal.create_room("lobby", BTreeMap::new(), 0).await.unwrap();
    let unloaded = ack_p99(&normal, "lobby", 200).await;

    // The hostile user signs in like anyone and joins the room.
    let hostile = cluster.client(&[1], "mallory").await;
    hostile.join("lobby").await.unwrap();
    let token = hostile.session().expect("signed in").access_token;

    // A subscriber that never reads, on its own connection, and a second subscription there
    // that does read.
    let lazy = raw_signed_in(&cluster, &token).await;
    let subscribe = |after: u64| pb::Request {
        kind: Some(request::Kind::Subscribe(pb::Subscribe {
            rooms: vec![pb::RoomCursor { room: "lobby".into(), after_seq: after }],
            presence_of: Vec::new(),
        })),
    };
    let (mut s, mut never_read) = common::within("a new stream", lazy.open_bi()).await.unwrap();
    framing::write_message(&mut s, &subscribe(0)).await.unwrap();
    s.finish().unwrap();

    // Load the room so that the lazy subscriber's window fills and its outbox backs up.
    let body = "x".repeat(32 * 1024);
    for _ in 0..200 {
        normal.send("lobby", body.clone()).await.unwrap();
    }

    // Slow loris: as many streams as the connection may open, each declaring the largest
    // request (4 MiB) and sending a few bytes now and then; each one the server gives up on
    // (after 10 s) is replaced at once. Once, each declaration took its whole size from the
    // node's budget (256 MiB) before a byte of the body came: 64 of them stalled every client
    // of the node.
    let loris = raw_signed_in(&cluster, &token).await;
    let stop_loris = tokio_util::sync::CancellationToken::new();
    let trickler = {
        let (loris, stop) = (loris.clone(), stop_loris.clone());
        tokio::spawn(async move {
            let mut streams = tokio::task::JoinSet::new();
            loop {
                while streams.len() < 200 {
                    let Ok((mut send, recv)) = loris.open_bi().await else { return };
                    streams.spawn(async move {
                        let _recv = recv;
                        if send.write_all(&(4u32 << 20).to_be_bytes()).await.is_err() {
                            return;
                        }
                        while send.write_all(&[0u8; 16]).await.is_ok() {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    });
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = streams.join_next() => {}
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = ack_p99(&normal, "lobby", 400).await;
    stop_loris.cancel();
    trickler.await.unwrap();
    eprintln!("ack p99: unloaded {unloaded:?}, beside the hostile client {loaded:?}");
    // The bound is 2x; slack for a shared 2-core machine. (Before the fix the sends
    // stalled for the loris' 10 s request timeout.)
    assert!(
        loaded <= unloaded * 2 + Duration::from_millis(50),
        "a normal client's ack p99 went from {unloaded:?} to {loaded:?} beside a hostile one"
    );

    // The subscriber that never read is evicted once a write to it took no byte for 10 s, and
    // told why after what was buffered (or, had it read none of that within 5 s more either,
    // by the stream's reset code). Reading earlier would have let it catch up.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let (mut events, mut bytes) = (0usize, 0usize);
    let ending = loop {
        assert!(Instant::now() < deadline, "the lazy subscriber was never evicted ({events} events read)");
        let read = tokio::time::timeout(
            Duration::from_secs(30),
            framing::read_message::<pb::Event, _>(&mut never_read, 1 << 20),
        );
        match read.await {
            Ok(Ok(Some(pb::Event { kind: Some(pb::event::Kind::Error(e)) }))) => break e.code,
            Ok(Ok(Some(event))) => {
                events += 1;
                bytes += 4 + prost::Message::encoded_len(&event);
            }
            Ok(Ok(None)) => panic!("the stream ended without saying why after {events} events"),
            Ok(Err(framing::FrameError::Io(e))) => break format!("reset: {e}"),
            Ok(Err(e)) => panic!("reading the lazy subscription: {e}"),
            Err(_) => panic!("the lazy subscription neither delivered nor ended within 30 s"),
        }
    };
    assert!(ending == "slow_subscriber" || ending.contains("reset"), "ended with {ending:?} after {events} events");
    // What it held for the subscriber: its outbox (1 MiB), one coalesced write, the stream's
    // window; not the room's whole history (over 6 MiB by now).
    assert!(bytes < 3 << 20, "the server kept {bytes} bytes ({events} events) for a subscriber that did not read");

    // Its connection is still good for other things, and the node for everyone.
    let (mut s, mut r) = common::within("a new stream", lazy.open_bi()).await.unwrap();
    framing::write_message(&mut s, &subscribe(300)).await.unwrap();
    s.finish().unwrap();
    let first: pb::Event =
        common::within("the server's answer", framing::read_message(&mut r, 1 << 20)).await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(pb::event::Kind::Subscribed(_))), "{first:?}");
    assert!(normal.send("lobby", "after all that").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_may_hold_a_bounded_number_of_subscriptions() {
    let cluster = TestCluster::start(1, 1, 1, &[]);
    cluster.wait_ready(1).await;
    let owner = cluster.client(&[1], "ann").await;
    owner.create_room("lobby", BTreeMap::new(), 0).await.unwrap();
    let token = owner.session().expect("signed in").access_token;
    let connection = raw_signed_in(&cluster, &token).await;
    let subscribe = pb::Request {
        kind: Some(request::Kind::Subscribe(pb::Subscribe {
            rooms: vec![pb::RoomCursor { room: "lobby".into(), after_seq: 0 }],
            presence_of: Vec::new(),
        })),
    };
    let mut open = Vec::new();
    let mut refused = None;
    for i in 0..40 {
        let (mut s, mut r) = common::within("a new stream", connection.open_bi()).await.unwrap();
        framing::write_message(&mut s, &subscribe).await.unwrap();
        s.finish().unwrap();
        let first: pb::Event =
            common::within("the server's answer", framing::read_message(&mut r, 1 << 20)).await.unwrap().unwrap();
        match first.kind {
            Some(pb::event::Kind::Subscribed(_)) => open.push((s, r)),
            Some(pb::event::Kind::Error(e)) => {
                refused = Some((i, e.code));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let (at, code) = refused.expect("a connection cannot subscribe without bound");
    assert_eq!(code, "too_many_subscriptions");
    assert_eq!(at, open.len());
    assert!(open.len() >= 8, "room for a real client's subscriptions");
    // Ending one makes room for another.
    let (s, _r) = open.pop().unwrap();
    drop(s);
    drop(_r);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut s, mut r) = common::within("a new stream", connection.open_bi()).await.unwrap();
        framing::write_message(&mut s, &subscribe).await.unwrap();
        s.finish().unwrap();
        let first: pb::Event =
            common::within("the server's answer", framing::read_message(&mut r, 1 << 20)).await.unwrap().unwrap();
        if matches!(first.kind, Some(pb::event::Kind::Subscribed(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed subscription slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
