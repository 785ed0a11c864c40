//! Identity and access, end to end on real `chorusd` processes: who may sign in, with what
//! token, send where, read what, and how fast a revocation reaches every node.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chorus_client::{Client, Credentials, SubscriptionEvent, Visibility};
use chorus_proto::client::{self as pb, request, response};
use common::raw::{self, anonymous, error_of, exchange, hello};
use common::{TestCluster, password_of};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs `user` in on a raw connection; the reply.
async fn sign_in(connection: &quinn::Connection, kind: request::Kind) -> pb::SignedIn {
    match exchange(connection, &raw::request(kind)).await.kind {
        Some(response::Kind::SignedIn(s)) => s,
        other => panic!("expected a sign-in, got {other:?}"),
    }
}

fn register(user: &str) -> request::Kind {
    request::Kind::Register(pb::Register { user: user.into(), password: password_of(user), ..Default::default() })
}

fn login(user: &str, password: &str) -> request::Kind {
    request::Kind::Login(pb::Login { user: user.into(), password: password.into(), device: "test".into() })
}

fn send(room: &str, seq: u64, body: &str) -> request::Kind {
    request::Kind::Send(pb::Send {
        room: room.into(),
        client_id: bytes::Bytes::from_static(b"raw-client"),
        client_seq: seq,
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
    })
}

/// Waits for the next message (skipping other events) or the end of the subscription.
async fn next_message(sub: &mut chorus_client::Subscription, within: Duration) -> Result<pb::Message, String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Err(_) => return Err("nothing arrived in time".into()),
            Ok(Ok(SubscriptionEvent::Message(m))) => return Ok(m),
            Ok(Ok(SubscriptionEvent::RoomError { error, .. })) => return Err(error.code().unwrap_or("?").to_owned()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.code().unwrap_or("client").to_owned()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_gets_its_own_error_and_the_node_keeps_serving() {
    let cluster = TestCluster::start(1, 1, 1, &["--access-token-ttl-s", "2"]);
    cluster.wait_ready(1).await;
    let connection = anonymous(&cluster, 1).await;
    // No sign-in: nothing but the sign-in requests (and the cluster's status).
    let (code, _) = error_of(&connection, send("r", 1, "x")).await;
    assert_eq!(code, "unauthenticated");
    let ann = sign_in(&connection, register("ann")).await;
    assert_eq!(ann.user, "ann");

    // Wrong password, and a user who does not exist: the same answer.
    let fresh = anonymous(&cluster, 1).await;
    assert_eq!(error_of(&fresh, login("ann", "not her password")).await.0, "invalid_credentials");
    assert_eq!(error_of(&fresh, login("nobody", "whatever-it-is")).await.0, "invalid_credentials");

    let token = ann.access_token.clone();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    // Forged: the claims of another user, the signature of ann's token.
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let mut forged_claims = claims.clone();
    forged_claims["sub"] = "admin".into();
    let forged = format!("{}.{}.{}", parts[0], b64(forged_claims.to_string().as_bytes()), parts[2]);
    let unsigned = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let hs256 = format!("{}.{}.{}", b64(br#"{"alg":"HS256","kid":"x"}"#), parts[1], parts[2]);
    let truncated = token[..token.len() - 10].to_string();
    let oversized = format!("{token}{}", "A".repeat(5000));
    for (bad, code, says) in [
        (forged.as_str(), "unauthenticated", "signature does not verify"),
        (unsigned.as_str(), "unauthenticated", "\"none\""),
        (hs256.as_str(), "unauthenticated", "EdDSA"),
        (truncated.as_str(), "unauthenticated", "signature"),
        ("not-a-token", "unauthenticated", "malformed"),
        (oversized.as_str(), "unauthenticated", "over the limit"),
    ] {
        let c = raw::connection(&cluster, 1).await;
        let (got, message) = error_of(&c, hello(bad)).await;
        assert_eq!(got, code, "{message}");
        assert!(message.contains(says), "{says:?} not in {message:?}");
        // Refused, the connection is still anonymous: it cannot act as anyone.
        assert_eq!(error_of(&c, send("r", 1, "x")).await.0, "unauthenticated");
    }

    // Expired: the token outlives its 2 s (and 1 s of leeway).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let c = raw::connection(&cluster, 1).await;
    assert_eq!(error_of(&c, hello(&token)).await.0, "token_expired");
    // On ann's own connection, the expired sign-in is refused too; a refresh renews it.
    assert_eq!(error_of(&connection, send("r", 1, "x")).await.0, "token_expired");
    let refreshed =
        sign_in(&connection, request::Kind::Refresh(pb::Refresh { refresh_token: ann.refresh_token.clone() })).await;
    let create = request::Kind::CreateRoom(pb::CreateRoom { room: "r".into(), ..Default::default() });
    assert!(matches!(exchange(&connection, &raw::request(create)).await.kind, Some(response::Kind::RoomCreated(_))));

    // Revoked: after logout, the session's tokens are refused, and so is its refresh token.
    let logout = raw::request(request::Kind::Logout(pb::Logout::default()));
    assert!(matches!(exchange(&connection, &logout).await.kind, Some(response::Kind::LoggedOut(_))));
    let c = raw::connection(&cluster, 1).await;
    assert_eq!(error_of(&c, hello(&refreshed.access_token)).await.0, "token_revoked");
    let refresh = request::Kind::Refresh(pb::Refresh { refresh_token: ann.refresh_token.clone() });
    assert_eq!(error_of(&c, refresh).await.0, "token_revoked");
    assert_eq!(
        error_of(&c, request::Kind::Refresh(pb::Refresh { refresh_token: "chr1.zz".into() })).await.0,
        "unauthenticated"
    );

    // The node served everyone all along.
    let bob = cluster.client(&[1], "bob").await;
    bob.create_room("still-up", BTreeMap::new(), 0).await.unwrap();
    assert_eq!(bob.send("still-up", "fine").await.unwrap().seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_is_always_the_signed_in_user() {
    let cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    let ann = cluster.client(&[1], "ann").await;
    ann.create_room("town", BTreeMap::new(), 0).await.unwrap();
    // Mallory signs in as herself: every message she sends, through any node, is hers.
    for node in [1, 2, 3] {
        let c = anonymous(&cluster, node).await;
        let signed =
            sign_in(&c, if node == 1 { register("mallory") } else { login("mallory", &password_of("mallory")) }).await;
        assert_eq!(signed.user, "mallory");
        let join = request::Kind::Membership(pb::ChangeMembership {
            room: "town".into(),
            action: pb::MembershipAction::Join as i32,
            user: "ann".into(), // ignored: one joins as oneself
            ..Default::default()
        });
        exchange(&c, &raw::request(join)).await;
        exchange(&c, &raw::request(send("town", node, &format!("I am ann (via {node})")))).await;
        // A Hello with ann's token on mallory's connection does not make it ann's.
        let ann_token = ann.session().unwrap().access_token;
        assert_eq!(error_of(&c, hello(&ann_token)).await.0, "hello_twice");
    }
    let history = ann.history_all("town", 0, true).await.unwrap();
    let texts: Vec<_> = history.iter().filter(|m| m.kind == pb::MessageKind::Text as i32).collect();
    assert_eq!(texts.len(), 3);
    assert!(texts.iter().all(|m| m.sender == "mallory"), "{texts:?}");
    assert!(history.iter().filter(|m| m.kind == pb::MessageKind::Joined as i32).all(|m| m.sender == "mallory"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_room_is_closed_to_non_members_and_a_kick_ends_a_live_feed() {
    let cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    let ann = cluster.client(&[1], "ann").await;
    let bob = cluster.client(&[2], "bob").await;
    let eve = cluster.client(&[3], "eve").await;
    ann.create_room_with("council", Visibility::Private, BTreeMap::new(), 0).await.unwrap();
    ann.send("council", "agenda").await.unwrap();
    // A non-member can neither send, read nor follow it.
    assert_eq!(eve.send("council", "let me in").await.unwrap_err().code(), Some("not_member"));
    assert_eq!(
        eve.history("council", chorus_client::HistoryFrom::After(0), 10, true).await.unwrap_err().code(),
        Some("not_member")
    );
    let mut snoop = eve.subscribe([("council".to_string(), 0)]);
    assert_eq!(next_message(&mut snoop, Duration::from_secs(10)).await, Err("not_member".into()));
    assert_eq!(eve.join("council").await.unwrap_err().code(), Some("forbidden"));
    assert!(eve.list_rooms("", 100).await.unwrap().rooms.iter().all(|r| r.name != "council"));

    // Invited and joined, bob follows it live; kicked, his feed ends within a second with
    // the kick as its last message, and nothing sent after reaches him.
    ann.invite("council", "bob").await.unwrap();
    bob.join("council").await.unwrap();
    let mut feed = bob.subscribe([("council".to_string(), 0)]);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(next_message(&mut feed, Duration::from_secs(10)).await.unwrap().seq);
    }
    assert_eq!(seen, vec![1, 2, 3], "agenda, the invitation, the join");
    let kicked_at = Instant::now();
    let kick = ann.kick("council", "bob", "enough").await.unwrap();
    ann.send("council", "after bob").await.unwrap();
    let last = next_message(&mut feed, Duration::from_secs(5)).await.unwrap();
    assert_eq!((last.seq, last.kind, last.target.as_str()), (kick.seq, pb::MessageKind::Kicked as i32, "bob"));
    assert_eq!(next_message(&mut feed, Duration::from_secs(5)).await, Err("forbidden".into()));
    assert!(kicked_at.elapsed() < Duration::from_secs(1), "the feed ended {:?} after the kick", kicked_at.elapsed());
    assert_eq!(bob.send("council", "hello?").await.unwrap_err().code(), Some("not_member"));

    // A ban ends a feed of a public room too, and keeps the user out.
    ann.create_room("plaza", BTreeMap::new(), 0).await.unwrap();
    let mut open_feed = eve.subscribe([("plaza".to_string(), 0)]);
    ann.send("plaza", "welcome").await.unwrap();
    assert_eq!(next_message(&mut open_feed, Duration::from_secs(10)).await.unwrap().seq, 1);
    let banned_at = Instant::now();
    ann.ban("plaza", "eve", "spam").await.unwrap();
    assert_eq!(
        next_message(&mut open_feed, Duration::from_secs(5)).await.unwrap().kind,
        pb::MessageKind::Banned as i32
    );
    assert_eq!(next_message(&mut open_feed, Duration::from_secs(5)).await, Err("forbidden".into()));
    assert!(banned_at.elapsed() < Duration::from_secs(1));
    assert_eq!(eve.join("plaza").await.unwrap_err().code(), Some("forbidden"));
    let members = ann.all_members("council").await.unwrap();
    assert_eq!(
        members.iter().map(|m| (m.user.as_str(), m.role)).collect::<Vec<_>>(),
        [("ann", pb::Role::Owner as i32)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_registered_on_one_node_signs_in_on_another_at_once() {
    let cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    for i in 0..5 {
        let user = format!("user{i}");
        let on_1 = anonymous(&cluster, 1).await;
        sign_in(&on_1, register(&user)).await;
        let on_3 = anonymous(&cluster, 3).await;
        assert_eq!(sign_in(&on_3, login(&user, &password_of(&user))).await.user, user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_during_registration_and_sign_in_leaves_one_usable_account() {
    let mut cluster = TestCluster::start(3, 3, 1, &[]);
    let status = cluster.wait_ready(1).await;
    let meta = status.shards.iter().find(|s| s.shard == status.meta_shard).unwrap().leader;
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != meta).collect();
    // Registrations and sign-ins stream through the survivors while the meta group's leader dies.
    let task = {
        let options: Vec<_> = (0..30)
            .map(|i| {
                let user = format!("member{i}");
                (
                    user.clone(),
                    cluster.options_with(
                        &others,
                        Credentials::RegisterOrLogin { user: user.clone(), password: password_of(&user) },
                    ),
                )
            })
            .collect();
        tokio::spawn(async move {
            let mut signed = Vec::new();
            for (user, options) in options {
                let client = Client::connect(options).await.unwrap_or_else(|e| panic!("{user}: {e}"));
                signed.push((user, client.session().unwrap().session_id));
            }
            signed
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.kill(meta);
    let signed = task.await.unwrap();
    assert_eq!(signed.len(), 30, "every registration ended signed in");
    cluster.spawn(meta);
    cluster.wait_ready(others[0]).await;
    // Each account exists once and its password works, through any node.
    let admin = admin_client(&cluster).await;
    let users = admin.admin_list_users("", 1000).await.unwrap().users;
    for (user, _) in &signed {
        assert_eq!(users.iter().filter(|u| &u.user == user).count(), 1, "{user}");
        let again =
            cluster.options_with(&[meta], Credentials::Password { user: user.clone(), password: password_of(user) });
        cluster.connect(again).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_out_everywhere_closes_the_users_connections_on_every_node_within_two_seconds() {
    let cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    let owner = cluster.client(&[1], "owner").await;
    owner.create_room("lobby", BTreeMap::new(), 0).await.unwrap();
    // Ann, signed in once, on each node (one session shared by three clients).
    let first = cluster.client(&[1], "ann").await;
    let session = first.session().unwrap();
    let mut feeds = Vec::new();
    for node in [1, 2, 3] {
        let mut options = cluster.options_with(&[node], Credentials::Session(session.clone()));
        options.route_to_leaders = false;
        let client = cluster.connect(options).await;
        let mut feed = client.subscribe([("lobby".to_string(), 0)]);
        owner.send("lobby", format!("hello node {node}")).await.unwrap();
        next_message(&mut feed, Duration::from_secs(10)).await.unwrap();
        feeds.push((node, client, feed));
    }
    let revoked_at = Instant::now();
    first.logout(true).await.unwrap();
    for (node, client, mut feed) in feeds {
        let ended = loop {
            match next_message(&mut feed, Duration::from_secs(5)).await {
                Ok(_) => continue,
                Err(code) => break code,
            }
        };
        let took = revoked_at.elapsed();
        assert_eq!(ended, "token_revoked", "node {node}");
        assert!(took < Duration::from_secs(2), "node {node}: the feed ended {took:?} after the revocation");
        assert_eq!(client.send("lobby", "still me?").await.unwrap_err().code(), Some("token_revoked"), "node {node}");
    }
    // Disabling an account does the same to its new sessions.
    let bob = cluster.client(&[2], "bob").await;
    let last = bob.history("lobby", chorus_client::HistoryFrom::Before(u64::MAX), 1, true).await.unwrap().last_seq;
    let mut feed = bob.subscribe([("lobby".to_string(), last)]);
    owner.send("lobby", "for bob").await.unwrap();
    next_message(&mut feed, Duration::from_secs(10)).await.unwrap();
    let admin = admin_client(&cluster).await;
    let disabled_at = Instant::now();
    admin.admin_set_user_disabled("bob", true).await.unwrap();
    assert_eq!(next_message(&mut feed, Duration::from_secs(5)).await, Err("token_revoked".into()));
    assert!(disabled_at.elapsed() < Duration::from_secs(2));
}

async fn admin_client(cluster: &TestCluster) -> Client {
    let path = cluster.nodes[&1].data_dir.join("admin-credentials");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "no admin credentials");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let password =
        text.lines().find_map(|l| l.strip_prefix("password = \"")).unwrap().trim_end_matches('"').to_string();
    let nodes: Vec<u64> = cluster.nodes.keys().copied().collect();
    cluster.connect(cluster.options_with(&nodes, Credentials::Password { user: "admin".into(), password })).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_admins_credentials_file_appears_even_if_the_node_died_before_writing_it() {
    let mut cluster = TestCluster::start(1, 1, 1, &[]);
    cluster.wait_ready(1).await;
    admin_client(&cluster).await;
    // As if the node had died between the account's commit and the file's rename: the
    // password is still pending, and the account exists.
    let file = cluster.nodes[&1].data_dir.join("admin-credentials");
    let pending = file.with_extension("pending");
    cluster.kill(1);
    std::fs::rename(&file, &pending).unwrap();
    cluster.spawn(1);
    cluster.wait_ready(1).await;
    let admin = admin_client(&cluster).await;
    assert!(admin.whoami().await.unwrap().admin);
    assert!(!pending.exists(), "the pending file became the credentials file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_connection_renews_its_sign_in_and_keeps_its_subscriptions() {
    let cluster = TestCluster::start(1, 1, 1, &["--access-token-ttl-s", "3"]);
    cluster.wait_ready(1).await;
    let ann = cluster.client(&[1], "ann").await;
    ann.create_room("long", BTreeMap::new(), 0).await.unwrap();
    let listener = cluster.client(&[1], "bob").await;
    let mut feed = listener.subscribe([("long".to_string(), 0)]);
    let first_token = listener.session().unwrap().access_token;
    // Four token lifetimes: the stream stays open (no resume), and every message arrives.
    for i in 1..=12u64 {
        ann.send("long", format!("{i}")).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), feed.next()).await.expect("a message within 10 s").unwrap()
        {
            SubscriptionEvent::Message(m) => assert_eq!(m.seq, i),
            SubscriptionEvent::Resumed { .. } => panic!("the subscription was dropped and resumed at message {i}"),
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_ne!(listener.session().unwrap().access_token, first_token, "the token was refreshed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_closed_by_default_and_a_token_opens_it() {
    let closed = TestCluster::start(1, 1, 1, &["--registration", "closed"]);
    closed.wait_ready(1).await;
    let c = anonymous(&closed, 1).await;
    let (code, message) = error_of(&c, register("ann")).await;
    assert_eq!(code, "forbidden", "{message}");
    // An admin creates the account; its owner signs in.
    let admin = admin_client(&closed).await;
    admin.admin_create_user("ann", &password_of("ann"), false).await.unwrap();
    assert_eq!(sign_in(&c, login("ann", &password_of("ann"))).await.user, "ann");
    drop(closed);

    let with_token =
        TestCluster::start(1, 1, 1, &["--registration", "token", "--registration-token", "let-me-in-please-1234"]);
    with_token.wait_ready(1).await;
    let c = anonymous(&with_token, 1).await;
    let mut wrong = pb::Register { user: "bob".into(), password: password_of("bob"), ..Default::default() };
    wrong.registration_token = "guess".into();
    assert_eq!(error_of(&c, request::Kind::Register(wrong.clone())).await.0, "forbidden");
    wrong.registration_token = "let-me-in-please-1234".into();
    assert_eq!(sign_in(&c, request::Kind::Register(wrong)).await.user, "bob");
    // The reserved names are nobody's.
    let c = anonymous(&with_token, 1).await;
    let admin = pb::Register {
        user: "Admin".into(),
        password: "long enough".into(),
        registration_token: "let-me-in-please-1234".into(),
        ..Default::default()
    };
    assert_eq!(error_of(&c, request::Kind::Register(admin)).await.0, "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_with_how_long_to_wait_and_spare_other_users() {
    let cluster =
        TestCluster::start(1, 1, 1, &["--rate-sends-per-user", "2/s,5", "--rate-failed-logins-per-user", "1/min,3"]);
    cluster.wait_ready(1).await;
    let mut options = cluster.options(&[1], "flood");
    options.retry_deadline = Duration::ZERO;
    let flood = cluster.connect(options).await;
    flood.create_room("r", BTreeMap::new(), 0).await.unwrap();
    let mut limited = None;
    for i in 0..20 {
        match flood.send("r", format!("{i}")).await {
            Ok(_) => {}
            Err(e) => {
                limited = Some(e);
                break;
            }
        }
    }
    let limited = limited.expect("a flood is limited");
    assert_eq!(limited.code(), Some("rate_limited"), "{limited}");
    assert!(limited.retry_after().is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(1)), "{limited:?}");
    // Someone else sends as usual.
    let calm = cluster.client(&[1], "calm").await;
    calm.join("r").await.unwrap();
    calm.send("r", "hi").await.unwrap();
    // The library waits as told: a send of the flooder with a retry deadline gets through.
    let patient = cluster.client(&[1], "flood").await;
    patient.send("r", "later").await.unwrap();

    // Failed sign-ins: after three, the user name is blocked for a while, good password or not.
    let c = anonymous(&cluster, 1).await;
    for _ in 0..3 {
        assert_eq!(error_of(&c, login("calm", "wrong password")).await.0, "invalid_credentials");
    }
    assert_eq!(error_of(&c, login("calm", "wrong password")).await.0, "invalid_credentials");
    let (code, message) = error_of(&c, login("calm", &password_of("calm"))).await;
    assert_eq!(code, "rate_limited", "{message}");
}

/// A tonic client of node 1's peer service, as node `as_node` with `cert`/`key` (PEM).
async fn peer_client(
    cluster: &TestCluster,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<chorus_proto::peer::peer_client::PeerClient<tonic::transport::Channel>, String> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("node-1.chorus");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.nodes[&1].peer_addr))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3));
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    Ok(chorus_proto::peer::peer_client::PeerClient::new(channel))
}

async fn peer_hello(
    client: &mut chorus_proto::peer::peer_client::PeerClient<tonic::transport::Channel>,
    cluster_id: &str,
    as_node: u64,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(chorus_proto::peer::HelloRequest { from_node: as_node });
    request.metadata_mut().insert("chorus-cluster-id", cluster_id.parse().unwrap());
    request.metadata_mut().insert("chorus-node-id", as_node.to_string().parse().unwrap());
    client.hello(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_clusters_certificate_or_with_another_nodes_is_refused() {
    let cluster = TestCluster::start(3, 3, 1, &[]);
    let status = cluster.wait_ready(1).await;
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    let node2 = cluster.nodes[&2].data_dir.join("tls/peer");
    let (ca, cert2, key2) = (read(node2.join("ca.pem")), read(node2.join("node.pem")), read(node2.join("node.key")));

    // Node 2's own certificate, as node 2: accepted.
    let mut client = peer_client(&cluster, &ca, Some((&cert2, &key2))).await.unwrap();
    peer_hello(&mut client, &status.cluster_id, 2).await.unwrap();
    // The same certificate claiming to be node 3: refused.
    let refused = peer_hello(&mut client, &status.cluster_id, 3).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("not node 3's"), "{refused}");

    // No certificate at all: the handshake or the first call fails.
    let no_cert = match peer_client(&cluster, &ca, None).await {
        Err(e) => e,
        Ok(mut c) => peer_hello(&mut c, &status.cluster_id, 2).await.unwrap_err().to_string(),
    };
    assert!(!no_cert.is_empty());
    // A certificate of another CA, for the right node id: refused likewise.
    let other = cluster.dir.path().join("other-ca");
    let ca_init =
        std::process::Command::new(common::CHORUSD).args(["ca", "init", "--dir"]).arg(&other).output().unwrap();
    assert!(ca_init.status.success());
    let out = cluster.dir.path().join("impostor");
    let issue = std::process::Command::new(common::CHORUSD)
        .args(["ca", "issue", "--node-id", "2", "--dir"])
        .arg(&other)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(issue.status.success(), "{}", String::from_utf8_lossy(&issue.stderr));
    let (fake_cert, fake_key) = (read(out.join("node.pem")), read(out.join("node.key")));
    let impostor = match peer_client(&cluster, &ca, Some((&fake_cert, &fake_key))).await {
        Err(e) => Err(e),
        Ok(mut c) => peer_hello(&mut c, &status.cluster_id, 2).await.map_err(|e| e.to_string()),
    };
    assert!(impostor.is_err(), "a certificate of another CA must be refused");
    // Plaintext gRPC: refused too.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.nodes[&1].peer_addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(3));
    let plain = match plain.connect().await {
        Err(e) => Err(e.to_string()),
        Ok(channel) => {
            let mut c = chorus_proto::peer::peer_client::PeerClient::new(channel);
            peer_hello(&mut c, &status.cluster_id, 2).await.map_err(|e| e.to_string())
        }
    };
    assert!(plain.is_err(), "plaintext must be refused");
    // And the cluster still works.
    let ann = cluster.client(&[2], "ann").await;
    ann.create_room("r", BTreeMap::new(), 0).await.unwrap();
    assert_eq!(ann.send("r", "ok").await.unwrap().seq, 1);
}

/// An external identity provider: its key pairs, a JWKS naming their public halves, tokens.
struct Provider {
    es256: Vec<u8>,
    ed25519: Vec<u8>,
    jwks: serde_json::Value,
}

impl Provider {
    fn new() -> Provider {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let es256 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap().as_ref().to_vec();
        let ec = ring::signature::EcdsaKeyPair::from_pkcs8(alg, &es256, &rng).unwrap();
        let point = ec.public_key().as_ref(); // 0x04 || x || y
        let ed25519 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref().to_vec();
        let ed = ring::signature::Ed25519KeyPair::from_pkcs8(&ed25519).unwrap();
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
             "x": b64(&point[1..33]), "y": b64(&point[33..65])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": b64(ed.public_key().as_ref())},
        ]});
        Provider { es256, ed25519, jwks }
    }

    fn token(&self, alg: jsonwebtoken::Algorithm, claims: serde_json::Value) -> String {
        let (kid, key) = match alg {
            jsonwebtoken::Algorithm::ES256 => ("ec-1", jsonwebtoken::EncodingKey::from_ec_der(&self.es256)),
            _ => ("ed-1", jsonwebtoken::EncodingKey::from_ed_der(&self.ed25519)),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}

fn claims(subject: &str, name: &str, audience: &str, expires_in: i64) -> serde_json::Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    serde_json::json!({"iss": "https://id.example", "aud": audience, "sub": subject,
                       "preferred_username": name, "iat": now, "exp": now + expires_in})
}

/// Serves `body` to every HTTP request on a loopback port, until the test ends.
fn serve_jwks(body: String) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    format!("http://{addr}/jwks.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_providers_tokens_sign_users_in_as_one_account_each() {
    let provider = Provider::new();
    let dir = tempfile::tempdir().unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, provider.jwks.to_string()).unwrap();
    let jwks_url = serve_jwks(provider.jwks.to_string());
    // Node 1 reads the provider's keys from a file, node 2 from its URL.
    for (jwks, what) in [(jwks_file.display().to_string(), "file"), (jwks_url, "url")] {
        let cluster = TestCluster::start(
            1,
            1,
            1,
            &["--oidc-issuer", "https://id.example", "--oidc-audience", "chorus-app", "--oidc-jwks", &jwks],
        );
        cluster.wait_ready(1).await;
        let external =
            |token: &str| request::Kind::LoginExternal(pb::LoginExternal { token: token.into(), device: "sso".into() });
        let c = anonymous(&cluster, 1).await;
        let first = sign_in(
            &c,
            external(
                &provider
                    .token(jsonwebtoken::Algorithm::ES256, claims("u-1", "Ann.Smith@example.com", "chorus-app", 300)),
            ),
        )
        .await;
        assert_eq!(first.user, "ann.smith", "{what}");
        // The same person again, with the other key: the same account.
        let again = sign_in(
            &anonymous(&cluster, 1).await,
            external(&provider.token(jsonwebtoken::Algorithm::EdDSA, claims("u-1", "renamed", "chorus-app", 300))),
        )
        .await;
        assert_eq!(again.user, "ann.smith", "{what}");
        // Another person with the same name: another account.
        let other = sign_in(
            &anonymous(&cluster, 1).await,
            external(&provider.token(jsonwebtoken::Algorithm::ES256, claims("u-2", "ann.smith", "chorus-app", 300))),
        )
        .await;
        assert_eq!(other.user, "ann.smith2", "{what}");
        // Tokens for another audience, expired, unsigned or tampered with are refused.
        let cases = [
            (
                provider.token(jsonwebtoken::Algorithm::ES256, claims("u-1", "x", "someone-else", 300)),
                "unauthenticated",
                "audience",
            ),
            (
                provider.token(jsonwebtoken::Algorithm::ES256, claims("u-1", "x", "chorus-app", -120)),
                "token_expired",
                "expired",
            ),
            (
                format!(
                    "{}.{}.",
                    b64(br#"{"alg":"none"}"#),
                    b64(claims("u-1", "x", "chorus-app", 300).to_string().as_bytes())
                ),
                "unauthenticated",
                "none",
            ),
        ];
        for (token, code, says) in cases {
            let (got, message) = error_of(&anonymous(&cluster, 1).await, external(&token)).await;
            assert_eq!(got, code, "{what}: {message}");
            assert!(message.contains(says), "{what}: {says:?} not in {message:?}");
        }
        let good = provider.token(jsonwebtoken::Algorithm::EdDSA, claims("u-3", "zed", "chorus-app", 300));
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        parts[1] = b64(claims("u-1", "zed", "chorus-app", 300).to_string().as_bytes());
        let (got, message) = error_of(&anonymous(&cluster, 1).await, external(&parts.join("."))).await;
        assert_eq!(got, "unauthenticated", "{what}: {message}");
        // The external account works like any other, but has no password.
        let client = cluster
            .connect(cluster.options_with(
                &[1],
                Credentials::Session(chorus_client::SessionTokens {
                    user: first.user.clone(),
                    refresh_token: first.refresh_token.clone(),
                    session_id: first.session_id.clone(),
                    admin: false,
                    access_token: first.access_token.clone(),
                    access_expires_ms: first.access_expires_ms,
                    session_expires_ms: first.session_expires_ms,
                }),
            ))
            .await;
        client.create_room("sso", BTreeMap::new(), 0).await.unwrap();
        assert_eq!(client.send("sso", "signed in elsewhere").await.unwrap().seq, 1);
        assert_eq!(
            error_of(&anonymous(&cluster, 1).await, login("ann.smith", "anything-at-all")).await.0,
            "invalid_credentials"
        );
    }
}
