//! The node's HTTPS endpoint (`web_addr`, TLS with the client endpoint's certificate):
//!
//! - `GET /ws`: the WebSocket gateway, the client protocol in JSON for browsers ([`ws`]);
//! - `GET /livez`: 200 while the process serves HTTP at all (restart it when this fails);
//! - `GET /readyz`: 200 when this node can serve clients: every shard replica it hosts knows
//!   its leader and follows it (not cut off, not behind; see [`Node::replica_lag`]), and it is
//!   not shutting down; else 503 with the reasons. A load balancer sends clients only to ready
//!   nodes (README.md, "Operator's guide", has a HAProxy example).
//!
//! Bounded like the QUIC endpoint: connections per node (`max_connections`, counted apart
//! from the QUIC endpoint's; a WebSocket is one), the TLS
//! handshake and a request's headers within [`HANDSHAKE_TIMEOUT`], HTTP/1.1 only. On shutdown
//! it stops accepting, and open connections finish their request and close.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Extension, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::node::Node;

pub mod ws;

/// The remote address of the connection a request came on.
#[derive(Clone, Copy)]
struct Remote(std::net::SocketAddr);

/// The TLS handshake, and then each request's headers, must arrive within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the HTTPS listener (before the node reports serving, so that a port in use fails the
/// start with a clear error).
pub async fn bind(node: &Node) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = node.config.web_addr else { return Ok(None) };
    let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("binding the web address {addr}: {e}"))?;
    Ok(Some(listener))
}

fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/ws", get(websocket))
        .with_state(node)
}

async fn websocket(
    State(node): State<Arc<Node>>,
    Extension(Remote(remote)): Extension<Remote>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let limit = ws::max_message_bytes(&node);
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        // Tracked with the node's client tasks: shutdown waits for its subscriptions' `Closing`.
        .on_upgrade(move |socket| {
            let tasks = node.client_tasks.clone();
            tasks.track_future(ws::serve(node, socket, remote).instrument(tracing::info_span!("ws", %remote)))
        })
}

async fn livez() -> &'static str {
    "ok\n"
}

/// Why this node should not get clients now (empty: it is ready).
pub fn not_ready(node: &Node) -> Vec<String> {
    if node.is_leaving() || node.clients_shutdown.is_cancelled() {
        return vec!["the node is shutting down".into()];
    }
    let mut reasons = Vec::new();
    for (shard, replica) in &node.shards {
        let name = if *shard == chorus_raft::keys::META_SHARD { "meta".to_string() } else { shard.to_string() };
        let leader = replica.raft.metrics().borrow().current_leader;
        if leader.is_none() {
            reasons.push(format!("shard {name}: no leader known"));
        } else if let Some(lag) = node.replica_lag(*shard) {
            reasons.push(format!("shard {name}: this replica {lag}"));
        }
    }
    reasons
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let reasons = not_ready(&node);
    let text = if reasons.is_empty() { "ready\n".to_string() } else { format!("not ready:\n{}\n", reasons.join("\n")) };
    let status = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CACHE_CONTROL, "no-store")], text).into_response()
}

/// Serves HTTPS on `listener` until the node shuts down.
pub async fn serve(node: Arc<Node>, listener: TcpListener, crypto: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(crypto);
    // Further connections are closed at once.
    let connections = Arc::new(Semaphore::new(node.config.max_connections));
    let router = router(node.clone());
    loop {
        let accepted = tokio::select! {
            _ = node.clients_shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, usually: wait rather than spin.
                tracing::warn!(error = %e, "accepting a web connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "refusing a web connection: too many");
            continue;
        };
        let service = TowerToHyperService::new(router.clone().layer(Extension(Remote(remote))));
        let (node2, acceptor) = (node.clone(), acceptor.clone());
        let span = tracing::debug_span!("web", %remote);
        node.client_tasks.spawn(
            async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!("TLS handshake timed out"),
                };
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT).max_buf_size(64 * 1024);
                let connection = http.serve_connection(TokioIo::new(tls), service).with_upgrades();
                tokio::pin!(connection);
                tokio::select! {
                    done = connection.as_mut() => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, "web connection ended with an error");
                        }
                    }
                    _ = node2.clients_shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
                    }
                }
            }
            .instrument(span),
        );
    }
}
