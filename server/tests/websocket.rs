//! The WebSocket gateway on real processes: a client speaking the JSON mapping over `/ws`
//! signs in, joins, sends exactly once, reads history and follows a room beside a QUIC client;
//! bad messages get error codes; after its node is killed it resumes on another from its
//! cursor with nothing missed or repeated.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use common::TestCluster;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn connect(cluster: &TestCluster, id: u64) -> Ws {
    let addr = cluster.nodes[&id].web_addr.clone();
    let tls = cluster.web_tls(id).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{addr}/ws"), tls).await.unwrap();
    ws
}

/// The next JSON message (pings are answered by the library), within 10 s.
async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("nothing within 10 s")?;
        match message {
            Ok(Message::Text(text)) => return Some(serde_json::from_str(text.as_str()).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::Text(message.to_string().into())).await.unwrap();
}

/// Sends request `request` on stream `id` and returns its response (skipping other streams'
/// messages, which are returned in `others`).
async fn call(ws: &mut Ws, id: u32, request: Value, others: &mut Vec<Value>) -> Value {
    send(ws, json!({"id": id, "request": request})).await;
    loop {
        let message = next(ws).await.expect("the WebSocket closed");
        if message["id"] == id && message.get("response").is_some() {
            return message["response"].clone();
        }
        others.push(message);
    }
}

/// The bodies of the `message` events of stream `id` among `messages`.
fn bodies_of(messages: &[Value], id: u32) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m["id"] == id)
        .filter_map(|m| m["event"]["message"]["body"].as_str())
        .map(|b| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap())
        .collect()
}

/// Reads messages until stream `id` has delivered `want` message bodies in all; all of them.
async fn until_bodies(ws: &mut Ws, id: u32, want: usize, seen: &mut Vec<Value>) -> Vec<String> {
    while bodies_of(seen, id).len() < want {
        seen.push(next(ws).await.expect("the WebSocket closed"));
    }
    bodies_of(seen, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_signs_in_sends_once_reads_follows_and_resumes_elsewhere() {
    let mut cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    let bob = cluster.client(&[2, 3], "bob").await;
    bob.create_room("general", BTreeMap::new(), 0).await.unwrap();
    bob.send("general", "from quic").await.unwrap();

    let mut ws = connect(&cluster, 1).await;
    let mut seen = Vec::new();
    // Before Hello, nothing else; bad messages are answered, and the connection goes on.
    let early = call(&mut ws, 1, json!({"whoami": {}}), &mut seen).await;
    assert_eq!(early["error"]["code"], "hello_required", "{early}");
    send(&mut ws, json!({"id": 2, "bogus": true})).await;
    let bad = next(&mut ws).await.unwrap();
    assert_eq!((bad["id"].as_u64(), bad["response"]["error"]["code"].as_str()), (Some(0), Some("malformed_request")));
    ws.send(Message::Text("not json".into())).await.unwrap();
    assert_eq!(next(&mut ws).await.unwrap()["response"]["error"]["code"], "malformed_request");

    let hello = call(&mut ws, 1, json!({"hello": {"clientName": "websocket test"}}), &mut seen).await;
    assert!(hello.get("hello").is_some(), "{hello}");
    let signed_in =
        call(&mut ws, 2, json!({"register": {"user": "alice", "password": "alice-password-1"}}), &mut seen).await;
    let token = signed_in["signedIn"]["accessToken"].as_str().expect("a token").to_owned();
    let joined =
        call(&mut ws, 3, json!({"membership": {"room": "general", "action": "MEMBERSHIP_ACTION_JOIN"}}), &mut seen)
            .await;
    assert!(joined.get("membershipChanged").is_some(), "{joined}");

    // Follow the room from the start, on stream 4.
    send(&mut ws, json!({"id": 4, "request": {"subscribe": {"rooms": [{"room": "general", "afterSeq": "0"}]}}})).await;
    // Send once; the retry (same client id and seq) is the same message.
    let client_id = b64(&[7u8; 16]);
    let sent = json!({"send": {"room": "general", "clientId": client_id, "clientSeq": "1", "body": b64(b"from ws")}});
    let first = call(&mut ws, 5, sent.clone(), &mut seen).await;
    let again = call(&mut ws, 6, sent, &mut seen).await;
    assert_eq!(first["sent"]["seq"], again["sent"]["seq"], "{first} {again}");
    assert_eq!(again["sent"]["duplicate"], true, "{again}");
    bob.send("general", "second from quic").await.unwrap();
    let bodies = until_bodies(&mut ws, 4, 3, &mut seen).await;
    assert_eq!(bodies, ["from quic", "from ws", "second from quic"]);
    assert_eq!(seen.iter().find(|m| m["id"] == 4).unwrap()["event"]["subscribed"]["rooms"][0]["room"], "general");
    let history = call(&mut ws, 7, json!({"history": {"room": "general", "after": "0", "limit": 10}}), &mut seen).await;
    let senders: Vec<&str> =
        history["history"]["messages"].as_array().unwrap().iter().filter_map(|m| m["sender"].as_str()).collect();
    assert!(senders.contains(&"alice") && senders.contains(&"bob"), "{history}");
    let last_seq: u64 = history["history"]["lastSeq"].as_str().unwrap().parse().unwrap();

    // A cancelled stream's id may be used again at once.
    send(&mut ws, json!({"id": 4, "cancel": true})).await;
    let who = call(&mut ws, 4, json!({"whoami": {}}), &mut seen).await;
    assert_eq!(who["whoami"]["user"], "alice", "{who}");

    // Kill the node: the WebSocket ends; another node takes the same token and the cursor.
    cluster.kill(1);
    while next(&mut ws).await.is_some() {}
    let mut ws = connect(&cluster, 2).await;
    let mut seen = Vec::new();
    let hello = call(&mut ws, 1, json!({"hello": {"accessToken": token}}), &mut seen).await;
    assert!(hello.get("hello").is_some(), "{hello}");
    send(
        &mut ws,
        json!({"id": 2, "request": {"subscribe": {"rooms": [{"room": "general", "afterSeq": last_seq.to_string()}]}}}),
    )
    .await;
    bob.send("general", "after the kill").await.unwrap();
    let bodies = until_bodies(&mut ws, 2, 1, &mut seen).await;
    assert_eq!(bodies, ["after the kill"], "nothing before the cursor again");
}

/// Signs a new WebSocket in as `user` (registering it) and subscribes to `room` from its start
/// on stream 9.
async fn subscriber(cluster: &TestCluster, node: u64, user: &str, room: &str) -> Ws {
    let mut ws = connect(cluster, node).await;
    let mut seen = Vec::new();
    call(&mut ws, 1, json!({"hello": {}}), &mut seen).await;
    let password = format!("{user}-password-1");
    let signed_in = call(&mut ws, 2, json!({"register": {"user": user, "password": password}}), &mut seen).await;
    assert!(signed_in.get("signedIn").is_some(), "{signed_in}");
    let join = json!({"membership": {"room": room, "action": "MEMBERSHIP_ACTION_JOIN"}});
    assert!(call(&mut ws, 3, join, &mut seen).await.get("membershipChanged").is_some());
    send(&mut ws, json!({"id": 9, "request": {"subscribe": {"rooms": [{"room": room, "afterSeq": "0"}]}}})).await;
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_stops_reading_is_cut_off_without_slowing_the_others() {
    let cluster = TestCluster::start(1, 1, 1, &[]);
    cluster.wait_ready(1).await;
    let bob = cluster.client(&[1], "bob").await;
    bob.create_room("busy", BTreeMap::new(), 0).await.unwrap();
    let mut stalled = subscriber(&cluster, 1, "stalled", "busy").await;
    let mut reader = subscriber(&cluster, 1, "reader", "busy").await;
    // ~22 MiB of JSON: more than the socket buffers and the gateway's queue hold.
    const SENDS: usize = 2000;
    let body = "x".repeat(8 * 1024);
    let sender = {
        let bob = bob.clone();
        tokio::spawn(async move {
            for _ in 0..SENDS {
                bob.send("busy", body.clone()).await.unwrap();
            }
        })
    };
    // The reader keeps up, in order.
    let mut seqs = Vec::new();
    while seqs.len() < SENDS {
        let message = next(&mut reader).await.expect("the reader's WebSocket closed");
        if let Some(seq) = message["event"]["message"]["seq"].as_str() {
            seqs.push(seq.parse::<u64>().unwrap());
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "the reader got every message in order");
    sender.await.unwrap();
    // The one that read nothing is disconnected once the node gave up on it; what it had
    // buffered is a gap-free prefix.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "the stalled WebSocket was never closed");
        match next(&mut stalled).await {
            None => break,
            Some(message) => {
                if let Some(seq) = message["event"]["message"]["seq"].as_str() {
                    got.push(seq.parse::<u64>().unwrap());
                }
            }
        }
    }
    assert!(got.len() < SENDS, "it was cut off before getting everything ({} messages)", got.len());
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "what it got has no gap");
}
