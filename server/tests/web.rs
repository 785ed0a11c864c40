//! The HTTPS endpoint on real processes: `/livez` and `/readyz` as a load balancer sees them
//! when the cluster forms, loses its quorum and gets it back; bad input on the port.

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One `GET path` over TLS (the node's certificate pinned by fingerprint): status and body.
async fn get(cluster: &TestCluster, id: u64, path: &str) -> Result<(u16, String), String> {
    let addr = &cluster.nodes[&id].web_addr;
    let exchange = async {
        let mut tls = cluster.web_tls(id).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        tls.read_to_end(&mut response).await.map_err(|e| e.to_string())?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line: {response:?}"))?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.map_err(|_| "timed out".to_string())?
}

/// Polls `path` on node `id` until its status is `status` (within 60 s); the last body.
async fn until_status(cluster: &TestCluster, id: u64, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = get(cluster, id, path).await;
        if let Ok((s, body)) = &got
            && *s == status
        {
            return body.clone();
        }
        assert!(Instant::now() < deadline, "node {id} {path}: wanted {status} within 60 s, last {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_quorum_and_livez_the_process() {
    let mut cluster = TestCluster::start(3, 3, 2, &[]);
    let body = until_status(&cluster, 1, "/readyz", 200).await;
    assert_eq!(body, "ready\n");
    assert_eq!(get(&cluster, 1, "/livez").await, Ok((200, "ok\n".to_string())));
    assert_eq!(get(&cluster, 1, "/nothing-here").await.map(|(s, _)| s), Ok(404));

    // Alone, node 1 cannot serve: not ready (with the reasons), yet alive.
    cluster.kill(2);
    cluster.kill(3);
    let body = until_status(&cluster, 1, "/readyz", 503).await;
    assert!(body.starts_with("not ready:") && body.contains("shard"), "{body}");
    assert_eq!(get(&cluster, 1, "/livez").await.map(|(s, _)| s), Ok(200));

    // A majority back: ready again.
    cluster.spawn(2);
    until_status(&cluster, 1, "/readyz", 200).await;
    until_status(&cluster, 2, "/readyz", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_silence_on_the_web_port_harm_nothing() {
    let cluster = TestCluster::start(1, 1, 1, &[]);
    until_status(&cluster, 1, "/livez", 200).await;
    let addr = cluster.nodes[&1].web_addr.clone();
    // Plain HTTP where TLS is expected, random bytes, and a connection that says nothing.
    let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    plain.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut junk = tokio::net::TcpStream::connect(&addr).await.unwrap();
    junk.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3]).await.unwrap();
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(_)) | Ok(Err(_))), "a plain-HTTP client is answered or closed at once");
    // Meanwhile the endpoint serves.
    assert_eq!(get(&cluster, 1, "/livez").await.map(|(s, _)| s), Ok(200));
    drop((junk, silent));
}
