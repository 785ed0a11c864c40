//! Raw client-protocol exchanges over QUIC, for tests that send what the client library never
//! would (no token, forged tokens, hand-made requests).

use std::sync::Arc;
use std::time::Duration;

use chorus_proto::client::{self as pb, request, response};
use chorus_proto::framing;
use quinn::crypto::rustls::QuicClientConfig;

use super::TestCluster;

/// A QUIC connection to node `node` that has said nothing yet.
pub async fn connection(cluster: &TestCluster, node: u64) -> quinn::Connection {
    let pin = chorus_client::tls::parse_fingerprint(&cluster.fingerprint).unwrap();
    let crypto = chorus_client::tls::client_crypto(&chorus_client::Trust::Fingerprints(vec![pin])).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = cluster.nodes[&node].client_addr.parse().unwrap();
    endpoint.connect_with(config, addr, "localhost").unwrap().await.unwrap()
}

pub fn request(kind: request::Kind) -> pb::Request {
    pb::Request { kind: Some(kind) }
}

/// One request on a new stream, and its response.
pub async fn exchange(connection: &quinn::Connection, request: &pb::Request) -> pb::Response {
    let (mut s, mut r) = connection.open_bi().await.unwrap();
    framing::write_message(&mut s, request).await.unwrap();
    s.finish().unwrap();
    let read = framing::read_message(&mut r, 1 << 20);
    tokio::time::timeout(Duration::from_secs(15), read).await.expect("an answer within 15 s").unwrap().unwrap()
}

/// The error a request gets: (code, message); panics on a success.
pub async fn error_of(connection: &quinn::Connection, kind: request::Kind) -> (String, String) {
    match exchange(connection, &request(kind)).await.kind {
        Some(response::Kind::Error(e)) => (e.code, e.message),
        other => panic!("expected an error, got {other:?}"),
    }
}

pub fn hello(access_token: &str) -> request::Kind {
    request::Kind::Hello(pb::Hello {
        client_name: "raw test".into(),
        access_token: access_token.into(),
        ..Default::default()
    })
}

/// A connection that said an anonymous hello.
pub async fn anonymous(cluster: &TestCluster, node: u64) -> quinn::Connection {
    let connection = connection(cluster, node).await;
    let reply = exchange(&connection, &request(hello(""))).await;
    assert!(matches!(reply.kind, Some(response::Kind::Hello(_))), "{reply:?}");
    connection
}
