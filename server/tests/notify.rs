//! Notifications for users who are away, on real processes: a webhook receiver started here
//! gets every due mention and direct message of a user who is away, signed, with a stable id,
//! across a failed POST and a leader kill; never one of a user who read it or is online.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestCluster, shard_of, within};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};

const SHARDS: u32 = 4;
const SECRET: &str = "webhook-secret-0123456789";
const DELAY_MS: u64 = 4_000;

/// One POST the receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Received {
    idempotency_key: String,
    signature: String,
    body: Vec<u8>,
    json: serde_json::Value,
    answered: u16,
}

/// A webhook receiver on loopback: it answers 500 to the first `fail_first` POSTs, 200 after.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let recorded = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let recorded = recorded.clone();
                        async move {
                            let header = |name: &str| {
                                request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
                            };
                            let (idempotency_key, signature) = (header("idempotency-key"), header("chorus-signature"));
                            let body =
                                request.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            let mut got = recorded.lock().unwrap();
                            let answered = if got.len() < fail_first { 500 } else { 200 };
                            got.push(Received { idempotency_key, signature, body, json, answered });
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::from_u16(answered).unwrap();
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Receiver { url, got }
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The delivered (200) POSTs for `user`.
    fn delivered_to(&self, user: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.answered == 200 && r.json["user"] == user).collect()
    }

    /// Waits until `n` POSTs for `user` were delivered; they then.
    async fn until_delivered(&self, user: &str, n: usize, limit: Duration) -> Vec<Received> {
        let deadline = Instant::now() + limit;
        loop {
            let delivered = self.delivered_to(user);
            if delivered.len() >= n {
                return delivered;
            }
            assert!(
                Instant::now() < deadline,
                "{n} notifications for {user} within {limit:?}; got {:?}",
                self.received()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn verify_signature(received: &Received) {
    let (t, mac) = received.signature.split_once(",v1=").expect("a signature of the form t=..,v1=..");
    let t = t.strip_prefix("t=").expect("a timestamp");
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&received.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    assert!(ring::hmac::verify(&key, &signed, &hex::decode(mac).unwrap()).is_ok(), "the signature verifies");
}

/// ann mentions bob (away: idle), carol (online) and dave (who reads it at once), and the leader
/// of the room's shard is killed before the notifications fall due. The webhook's first answer
/// is a 500. bob is notified (retried after the 500, by the new leader), with a stable id and a
/// valid signature; carol and dave are not. A direct message to bob is notified as `direct`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_the_webhook_across_a_failed_post_and_a_leader_kill() {
    let receiver = Receiver::start(1).await;
    let delay = DELAY_MS.to_string();
    let args = ["--notify-webhook-url", &receiver.url, "--notify-webhook-secret", SECRET, "--notify-delay-ms", &delay];
    let mut cluster = TestCluster::start(3, 3, SHARDS, &args);
    cluster.wait_ready(1).await;
    let leader = cluster.leader_of(1, shard_of("general", SHARDS)).await;
    let via = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap();
    let ann = cluster.client(&[via], "ann").await;
    let bob = cluster.client(&[via], "bob").await;
    let carol = cluster.client(&[via], "carol").await;
    let dave = cluster.client(&[via], "dave").await;
    ann.create_room("general", BTreeMap::new(), 0).await.unwrap();
    for user in [&bob, &carol, &dave] {
        user.join("general").await.unwrap();
    }
    bob.set_presence(true, None).await.unwrap();
    // Presence reaches the other nodes within about 2 s (PROTOCOL, Presence).
    tokio::time::sleep(Duration::from_secs(3)).await;

    let sent = ann.send("general", "@bob @carol @dave: the build is green").await.unwrap();
    dave.mark_read("general", sent.seq, false, false).await.unwrap();
    cluster.kill(leader);
    let started = Instant::now();

    let delivered = within("bob's notification", receiver.until_delivered("bob", 1, Duration::from_secs(30))).await;
    assert!(started.elapsed() >= Duration::from_millis(DELAY_MS - 500), "not before it fell due");
    let n = &delivered[0];
    assert_eq!(n.json["reason"], "mention");
    assert_eq!(n.json["room"], "general");
    assert_eq!(n.json["sender"], "ann");
    assert_eq!(n.json["seq"], sent.seq);
    assert_eq!(n.json["ts_ms"], sent.ts_ms);
    assert_eq!(n.json["preview"], "@bob @carol @dave: the build is green");
    assert_eq!(n.json["id"], n.idempotency_key.as_str());
    verify_signature(n);
    // Every attempt for bob's notification carried the same id: the 500 answered one too.
    let attempts: Vec<Received> =
        receiver.received().into_iter().filter(|r| r.idempotency_key == n.idempotency_key).collect();
    assert!(attempts.iter().any(|r| r.answered == 500), "the first POST failed and was retried: {attempts:?}");

    // A direct message to bob.
    let direct = ann.open_direct("bob").await.unwrap();
    let psst = ann.send(&direct.room, "psst").await.unwrap();
    let delivered =
        within("bob's direct notification", receiver.until_delivered("bob", 2, Duration::from_secs(30))).await;
    let d = delivered.iter().find(|r| r.json["reason"] == "direct").expect("a direct notification");
    assert_eq!((d.json["room"].as_str(), d.json["seq"].as_u64()), (Some(direct.room.as_str()), Some(psst.seq)));
    assert_ne!(d.idempotency_key, n.idempotency_key);
    verify_signature(d);

    // Nothing for carol (online) or dave (read it), and bob's were delivered once each: a
    // delivered notification leaves the queue.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = receiver.received();
    assert!(all.iter().all(|r| r.json["user"] == "bob"), "only bob is notified: {all:?}");
    assert_eq!(receiver.delivered_to("bob").len(), 2, "each delivered once: {all:?}");
}
