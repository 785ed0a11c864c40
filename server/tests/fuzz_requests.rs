//! Fuzzing the client-facing decoders and the request validation, from the outside: a real
//! node gets arbitrary bytes, arbitrary frames, and protobuf built field by field for every
//! request kind (and unknown ones) — strings that are not UTF-8, numbers at their extremes,
//! cursors and limits out of range, nested messages where scalars belong. Every stream must
//! get a well-formed answer with a specific error code (or a subscription's first event), and
//! the node must stay up and keep serving a normal client.
//!
//! CI runs `CHORUS_FUZZ_CASES` cases (default 1,000, about 10 s); a longer run:
//! `CHORUS_FUZZ_CASES=20000 cargo test -p chorus-server --test fuzz_requests -- --nocapture`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chorus_proto::client::{self as pb, request, response};
use chorus_proto::framing;
use common::TestCluster;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use quinn::crypto::rustls::QuicClientConfig;

/// A protobuf field, to build messages that no generated type would.
#[derive(Debug, Clone)]
enum Field {
    Varint(u32, u64),
    Bytes(u32, Vec<u8>),
    Nested(u32, Vec<Field>),
    Fixed64(u32, u64),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        match field {
            Field::Varint(n, v) => {
                put_varint(&mut out, u64::from(*n) << 3);
                put_varint(&mut out, *v);
            }
            Field::Fixed64(n, v) => {
                put_varint(&mut out, (u64::from(*n) << 3) | 1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Field::Bytes(n, b) => {
                put_varint(&mut out, (u64::from(*n) << 3) | 2);
                put_varint(&mut out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Field::Nested(n, inner) => {
                let inner = encode(inner);
                put_varint(&mut out, (u64::from(*n) << 3) | 2);
                put_varint(&mut out, inner.len() as u64);
                out.extend_from_slice(&inner);
            }
        }
    }
    out
}

fn number() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(100),
        Just(1000),
        Just(1001),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"general".to_vec()),
        Just(b"fuzzer".to_vec()),
        Just(b"dm.x".to_vec()),
        Just(Vec::new()),
        Just(vec![0xff, 0xfe, 0x80]), // not UTF-8
        Just("é".repeat(40).into_bytes()),
        Just(vec![b'a'; 70_000]), // over the body limit
        "[a-z0-9._-]{1,40}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

fn scalar_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        (1u32..12, number()).prop_map(|(n, v)| Field::Varint(n, v)),
        (1u32..12, bytes()).prop_map(|(n, b)| Field::Bytes(n, b)),
        (1u32..12, any::<u64>()).prop_map(|(n, v)| Field::Fixed64(n, v)),
    ]
}

/// A request body: scalars, and nested messages (cursors, sends, maps) one level down.
fn fields() -> impl Strategy<Value = Vec<Field>> {
    let nested = (1u32..6, proptest::collection::vec(scalar_field(), 0..6)).prop_map(|(n, f)| Field::Nested(n, f));
    proptest::collection::vec(prop_oneof![3 => scalar_field(), 1 => nested], 0..8)
}

/// What one case writes on a stream.
fn stream_bytes() -> impl Strategy<Value = (u32, Vec<u8>)> {
    prop_oneof![
        // A request of any kind (1..=24), or an unknown one, built field by field.
        6 => (1u32..27, fields()).prop_map(|(kind, body)| {
            let request = encode(&[Field::Nested(kind, body)]);
            let mut framed = (request.len() as u32).to_be_bytes().to_vec();
            framed.extend(request);
            (kind, framed)
        }),
        // Random bytes behind a correct length.
        1 => proptest::collection::vec(any::<u8>(), 0..512).prop_map(|body| {
            let mut framed = (body.len() as u32).to_be_bytes().to_vec();
            framed.extend(body);
            (0, framed)
        }),
        // Anything at all.
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| (0, b)),
    ]
}

async fn signed_in(cluster: &TestCluster, n: u32) -> quinn::Connection {
    let pin = chorus_client::tls::parse_fingerprint(&cluster.fingerprint).unwrap();
    let crypto = chorus_client::tls::client_crypto(&chorus_client::Trust::Fingerprints(vec![pin])).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = cluster.nodes[&1].client_addr.parse().unwrap();
    let connection = endpoint.connect_with(config, addr, "localhost").unwrap().await.unwrap();
    for kind in [
        request::Kind::Hello(pb::Hello {
            client_name: "fuzz".into(),
            access_token: String::new(),
            ..Default::default()
        }),
        request::Kind::Register(pb::Register {
            user: format!("fuzzer{n}"),
            password: "fuzzer-password".into(),
            ..Default::default()
        }),
    ] {
        let (mut s, mut r) = connection.open_bi().await.unwrap();
        framing::write_message(&mut s, &pb::Request { kind: Some(kind) }).await.unwrap();
        s.finish().unwrap();
        let reply: pb::Response =
            common::within("a sign-in answer", framing::read_message(&mut r, 1 << 20)).await.unwrap().unwrap();
        assert!(!matches!(reply.kind, Some(response::Kind::Error(_))), "{reply:?}");
    }
    connection
}

/// Writes one case and checks the answer.
async fn one_case(connection: &quinn::Connection, bytes: &[u8]) -> Result<(), String> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| format!("opening a stream: {e}"))?;
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let read = tokio::time::timeout(Duration::from_secs(15), framing::read_frame(&mut recv, 16 << 20)).await;
    let frame = match read {
        Err(_) => return Err("no answer within 15 s".into()),
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return Err("the stream ended without an answer".into()),
        // The connection closed under us (the case signed the session out): the caller
        // reconnects.
        Ok(Err(e)) if connection.close_reason().is_some() => return Err(format!("closed: {e}")),
        Ok(Err(e)) => return Err(format!("a garbled answer: {e}")),
    };
    // A stream whose request begins like a Subscribe (its body's first byte 0x2A: field 5) is
    // answered with events, errors included; any other with a Response.
    let declared = bytes.get(..4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    let subscribe = bytes.get(4) == Some(&0x2A) && declared.is_some_and(|d| d > 0 && d <= (4 << 20) + (64 << 10));
    let error = if subscribe {
        // A subscription answers with events; `Subscribed` or an error.
        let event: pb::Event = prost::Message::decode(frame).map_err(|e| format!("not an Event: {e}"))?;
        match event.kind {
            Some(pb::event::Kind::Error(e)) => Some(e),
            Some(_) => None,
            None => return Err("an Event with no kind".into()),
        }
    } else {
        let response: pb::Response = prost::Message::decode(frame).map_err(|e| format!("not a Response: {e}"))?;
        match response.kind {
            Some(response::Kind::Error(e)) => Some(e),
            Some(_) => None,
            None => return Err("a Response with no kind".into()),
        }
    };
    if let Some(e) = error {
        if e.code.is_empty() || e.message.is_empty() {
            return Err(format!("an error without a code or message: {e:?}"));
        }
        if e.code == "internal" {
            return Err(format!("an internal error for bad input: {e:?}"));
        }
    }
    Ok(())
}

#[test]
fn arbitrary_requests_get_specific_answers_and_the_node_stays_up() {
    let cases = std::env::var("CHORUS_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cluster = TestCluster::start(1, 1, 2, &[]);
    runtime.block_on(cluster.wait_ready(1));
    let normal = runtime.block_on(cluster.client(&[1], "bystander"));
    runtime.block_on(normal.create_room("general", Default::default(), 0)).unwrap();
    let generation = std::cell::Cell::new(0u32);
    let connection = std::cell::RefCell::new(runtime.block_on(signed_in(&cluster, 0)));
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let result = runner.run(&stream_bytes(), |(kind, bytes)| {
        let current = connection.borrow().clone();
        let outcome = runtime.block_on(one_case(&current, &bytes));
        match outcome {
            Ok(()) => Ok(()),
            // Some cases end the connection's session (Logout, say): sign in anew and go on.
            Err(e) if current.close_reason().is_some() || e.starts_with("closed") => {
                generation.set(generation.get() + 1);
                *connection.borrow_mut() = runtime.block_on(signed_in(&cluster, generation.get()));
                Ok(())
            }
            Err(e) => Err(TestCaseError::fail(format!("request kind {kind}, {} bytes: {e}", bytes.len()))),
        }
    });
    if let Err(e) = result {
        panic!("{e}\n{}", common::tail(&cluster.nodes[&1].log, 30));
    }
    // The node is up and serves everyone else as before.
    runtime.block_on(async {
        let receipt = common::within("a normal send", normal.send("general", "still here")).await.unwrap();
        assert!(receipt.seq >= 1);
    });
    let log = std::fs::read_to_string(&cluster.nodes[&1].log).unwrap();
    assert!(!log.contains("panicked"), "the node panicked:\n{}", common::tail(&cluster.nodes[&1].log, 30));
    eprintln!("{cases} fuzz cases, {} re-sign-ins", generation.get());
}
