//! Notifications for users who are away: the shard leaders deliver their shards' queues to a
//! webhook.
//!
//! The queue lives in each room shard's state machine (`chorus_raft::state_machine::notify`):
//! a mention of a joined member, or a message to them in a direct room, queues a notification
//! due `--notify-delay-ms` after the message, when the leader that proposed the message has a
//! webhook. Here, every second, the leader of each room shard on this node looks at the
//! notifications that fell due:
//!
//! - the user read past the message, or left the room: skipped;
//! - the user is online (presence, over the whole cluster): skipped, their client shows it;
//! - otherwise POSTed as JSON (see docs/PROTOCOL.md, *Notifications*), with the notification's
//!   id as its `Idempotency-Key`, signed when a secret is set. A 2xx delivers it; a 408, 429,
//!   5xx or a network error is retried with exponential backoff (with jitter, from 1 s up to
//!   5 min, honouring `Retry-After`) for up to a day; any other answer drops it (the receiver
//!   refused it: retrying would not help).
//!
//! Either way the leader then proposes `NotificationsDone` for it, which takes it out of the
//! queue on every replica. A leader that dies between a POST and that entry leaves the
//! notification queued, and the next leader posts it again: delivery is at least once, and the
//! id (the same on every replica) lets the receiver drop the duplicate. At most
//! [`MAX_IN_FLIGHT`] POSTs run at once per node, so a slow receiver costs a bounded number of
//! connections and never delays anything but notifications.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use chorus_proto::client::PresenceState;
use chorus_proto::storage::{MembershipState, NotificationId, NotificationRecord, NotificationsDone, op};
use chorus_raft::ShardId;
use chorus_raft::keys::META_SHARD;
use chorus_raft::state_machine::notify::MAX_DONE_PER_OP;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::auth::now_ms;
use crate::config::NotifyConfig;
use crate::node::{Node, ticker};

/// How often the leaders look at their queues.
const PERIOD: Duration = Duration::from_secs(1);
/// Most POSTs in flight on one node.
pub const MAX_IN_FLIGHT: usize = 8;
/// Due notifications read per shard and look.
const READ_PER_LOOK: usize = 256;
/// One POST's limit.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest pause between two attempts at one notification.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A notification that could not be delivered for this long after it fell due is dropped.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The body of a webhook POST.
#[derive(Debug, Serialize)]
pub struct Notification<'a> {
    /// Unique and stable: the same for every attempt, from every leader.
    pub id: String,
    /// `mention` or `direct`.
    pub reason: &'static str,
    pub user: &'a str,
    pub room: &'a str,
    pub seq: u64,
    pub sender: &'a str,
    pub ts_ms: u64,
    /// The start of the message (at most 256 bytes; invalid UTF-8 replaced).
    pub preview: String,
}

/// The stable id of a queued notification.
pub fn notification_id(cluster_id: &str, shard: ShardId, id: &NotificationId) -> String {
    format!("{cluster_id}-{shard}-{}-{}-{}", id.due_ms, id.index, id.ordinal)
}

/// The `Chorus-Signature` header of a POST of `body` at `timestamp_ms`:
/// `t=<timestamp_ms>,v1=<hex HMAC-SHA256(secret, "<timestamp_ms>." + body)>`.
pub fn signature(secret: &[u8], timestamp_ms: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(format!("{timestamp_ms}.").as_bytes());
    context.update(body);
    format!("t={timestamp_ms},v1={}", hex::encode(context.sign().as_ref()))
}

/// What one POST came to.
#[derive(Debug, PartialEq, Eq)]
enum Posted {
    Delivered,
    /// Worth trying again, not before the receiver's `Retry-After` if it gave one.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The receiver refused it for good.
    Refused(String),
}

fn classify(status: reqwest::StatusCode, retry_after: Option<&str>) -> Posted {
    if status.is_success() {
        return Posted::Delivered;
    }
    let code = status.as_u16();
    if code == 408 || code == 429 || status.is_server_error() {
        let after = retry_after.and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
        Posted::Retry { reason: format!("the webhook answered {status}"), after }
    } else {
        Posted::Refused(format!("the webhook answered {status}"))
    }
}

/// A notification waiting to be retried.
struct Waiting {
    next: Instant,
    backoff: backon::ExponentialBackoff,
}

/// One shard's deliveries, while this node leads it.
#[derive(Default)]
struct ShardDeliveries {
    /// Being posted now.
    in_flight: HashSet<(u64, u64, u32)>,
    waiting: HashMap<(u64, u64, u32), Waiting>,
    /// Dealt with, to be proposed as done.
    done: Vec<NotificationId>,
}

impl ShardDeliveries {
    /// `id` was delivered or skipped: it is proposed as done, and never retried here.
    fn dealt_with(&mut self, id: NotificationId) {
        self.waiting.remove(&key_of(&id));
        self.done.push(id);
    }
}

fn key_of(id: &NotificationId) -> (u64, u64, u32) {
    (id.due_ms, id.index, id.ordinal)
}

type PostResult = (ShardId, NotificationId, Posted);

/// Delivers the queues of the shards this node leads, until the node stops. Runs only when a
/// webhook is configured.
pub async fn deliver(node: Arc<Node>) {
    let Some(config) = node.config.notify.clone() else { return };
    let http = match crate::http::client(POST_TIMEOUT) {
        Ok(http) => http,
        Err(e) => {
            // Ending is a failure to the supervisor: it retries, then stops the node, loudly.
            tracing::error!(error = %e, "notifications: no HTTP client for --notify-webhook-url");
            return;
        }
    };
    let mut shards: HashMap<ShardId, ShardDeliveries> = HashMap::new();
    let mut posts: JoinSet<PostResult> = JoinSet::new();
    let mut tick = ticker(PERIOD);
    loop {
        tokio::select! {
            _ = node.peers_shutdown.cancelled() => return,
            _ = tick.tick() => {}
            Some(joined) = posts.join_next() => {
                if let Ok((shard, id, posted)) = joined {
                    finished(&mut shards, shard, id, posted);
                }
                continue;
            }
        }
        let leading: Vec<ShardId> = node
            .shards
            .iter()
            .filter(|(shard, replica)| {
                **shard != META_SHARD && replica.raft.metrics().borrow().current_leader == Some(node.id)
            })
            .map(|(shard, _)| *shard)
            .collect();
        // A shard led elsewhere now: its new leader delivers (again, at least once).
        shards.retain(|shard, _| leading.contains(shard));
        for shard in leading {
            let deliveries = shards.entry(shard).or_default();
            look(&node, &config, &http, shard, deliveries, &mut posts);
            propose_done(&node, shard, deliveries).await;
        }
    }
}

/// Records what a POST came to.
fn finished(shards: &mut HashMap<ShardId, ShardDeliveries>, shard: ShardId, id: NotificationId, posted: Posted) {
    let Some(deliveries) = shards.get_mut(&shard) else { return };
    let key = key_of(&id);
    deliveries.in_flight.remove(&key);
    let span = tracing::debug_span!("notification", shard, id = key.1, ordinal = key.2);
    let _entered = span.enter();
    match posted {
        Posted::Delivered => {
            tracing::debug!("notification delivered");
            deliveries.dealt_with(id);
        }
        Posted::Refused(reason) => {
            tracing::warn!(%reason, "the webhook refused a notification; dropped");
            deliveries.dealt_with(id);
        }
        Posted::Retry { reason, .. } if now_ms().saturating_sub(id.due_ms) > GIVE_UP_AFTER.as_millis() as u64 => {
            tracing::warn!(%reason, "a notification could not be delivered for a day; dropped");
            deliveries.dealt_with(id);
        }
        Posted::Retry { reason, after } => {
            let now = Instant::now();
            let waiting = deliveries.waiting.entry(key).or_insert_with(|| Waiting {
                next: now,
                backoff: backon::ExponentialBuilder::default()
                    .with_min_delay(Duration::from_secs(1))
                    .with_max_delay(MAX_BACKOFF)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times()
                    .build(),
            });
            let pause = waiting.backoff.next().unwrap_or(MAX_BACKOFF).max(after.unwrap_or_default());
            waiting.next = now + pause;
            tracing::info!(%reason, retry_in = ?pause, "a notification was not delivered; will retry");
        }
    }
}

/// Starts the POSTs of `shard`'s notifications that fell due (and decides the skipped ones).
fn look(
    node: &Arc<Node>,
    config: &NotifyConfig,
    http: &reqwest::Client,
    shard: ShardId,
    deliveries: &mut ShardDeliveries,
    posts: &mut JoinSet<PostResult>,
) {
    let Some(replica) = node.shards.get(&shard) else { return };
    let now = Instant::now();
    // RocksDB reads: off the async workers (see `chorus_raft::blocking`).
    let due = chorus_raft::blocking::off_runtime(|| {
        let due = replica.reader.due_notifications(now_ms(), READ_PER_LOOK)?;
        Ok::<_, chorus_raft::QueryError>(
            due.into_iter().map(|(id, record)| (skip_reason(node, replica, &record), id, record)).collect::<Vec<_>>(),
        )
    });
    let due = match due {
        Ok(due) => due,
        Err(e) => {
            tracing::warn!(shard, error = %e, "notifications: reading the queue");
            return;
        }
    };
    let done: HashSet<(u64, u64, u32)> = deliveries.done.iter().map(key_of).collect();
    for (skip, id, record) in due {
        let key = key_of(&id);
        if done.contains(&key)
            || deliveries.in_flight.contains(&key)
            || deliveries.waiting.get(&key).is_some_and(|w| w.next > now)
        {
            continue;
        }
        if let Some(reason) = skip {
            tracing::debug!(shard, user = %record.user, room = %record.room, seq = record.seq, reason, "notification skipped");
            deliveries.dealt_with(id);
            continue;
        }
        if posts.len() >= MAX_IN_FLIGHT {
            break;
        }
        deliveries.in_flight.insert(key);
        let request = post(http, config, &node.layout.cluster_id, shard, &id, &record);
        posts.spawn(async move {
            let posted = match request.send().await {
                Ok(response) => {
                    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok());
                    classify(response.status(), retry_after)
                }
                Err(e) => Posted::Retry { reason: format!("posting to the webhook: {e}"), after: None },
            };
            (shard, id, posted)
        });
    }
}

/// Why a due notification need not be sent, if it need not.
fn skip_reason(node: &Node, replica: &chorus_raft::ShardReplica, record: &NotificationRecord) -> Option<&'static str> {
    match replica.reader.member(&record.room, &record.user) {
        Ok(Some(member)) if member.state != MembershipState::Joined as i32 => return Some("no longer a member"),
        Ok(Some(member)) if member.read_seq >= record.seq => return Some("read already"),
        Ok(Some(_)) => {}
        Ok(None) => return Some("no longer a member"),
        // Unknown: better a notification too many than one lost.
        Err(e) => tracing::warn!(error = %e, "notifications: reading a member record"),
    }
    let presence = node.presence.snapshot(std::slice::from_ref(&record.user));
    if presence.first().is_some_and(|p| p.state == PresenceState::Online as i32) {
        return Some("online");
    }
    None
}

fn post(
    http: &reqwest::Client,
    config: &NotifyConfig,
    cluster_id: &str,
    shard: ShardId,
    id: &NotificationId,
    record: &NotificationRecord,
) -> reqwest::RequestBuilder {
    let notification = Notification {
        id: notification_id(cluster_id, shard, id),
        reason: if record.direct { "direct" } else { "mention" },
        user: &record.user,
        room: &record.room,
        seq: record.seq,
        sender: &record.sender,
        ts_ms: record.ts_ms,
        preview: String::from_utf8_lossy(&record.preview).into_owned(),
    };
    // Serializing strings and integers cannot fail; an empty body would be refused and retried.
    let body = serde_json::to_vec(&notification).unwrap_or_default();
    let mut request = http
        .post(&config.url)
        .header("content-type", "application/json")
        .header("idempotency-key", &notification.id)
        .header("user-agent", concat!("chorus/", env!("CARGO_PKG_VERSION")));
    if let Some(secret) = &config.secret {
        request = request.header("chorus-signature", signature(secret.expose().as_bytes(), now_ms(), &body));
    }
    request.body(body)
}

/// Proposes the notifications of `shard` dealt with so far as done. Those of a proposal that
/// fails stay for the next look.
async fn propose_done(node: &Node, shard: ShardId, deliveries: &mut ShardDeliveries) {
    while !deliveries.done.is_empty() {
        let n = deliveries.done.len().min(MAX_DONE_PER_OP);
        let ids: Vec<NotificationId> = deliveries.done[..n].to_vec();
        let op = op::Kind::NotificationsDone(NotificationsDone { ids });
        match crate::forward::propose_one(node, shard, op).await {
            Ok(_) => {
                deliveries.done.drain(..n);
            }
            Err(e) => {
                tracing::info!(shard, error = %e, "notifications: proposing which are done; will retry");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_are_worth_retrying() {
        use reqwest::StatusCode as S;
        assert_eq!(classify(S::OK, None), Posted::Delivered);
        assert_eq!(classify(S::NO_CONTENT, None), Posted::Delivered);
        for status in [S::REQUEST_TIMEOUT, S::TOO_MANY_REQUESTS, S::INTERNAL_SERVER_ERROR, S::SERVICE_UNAVAILABLE] {
            assert!(matches!(classify(status, None), Posted::Retry { .. }), "{status}");
        }
        assert_eq!(
            classify(S::TOO_MANY_REQUESTS, Some("30")),
            Posted::Retry {
                reason: "the webhook answered 429 Too Many Requests".into(),
                after: Some(Duration::from_secs(30))
            }
        );
        for status in [S::BAD_REQUEST, S::UNAUTHORIZED, S::NOT_FOUND, S::GONE] {
            assert!(matches!(classify(status, None), Posted::Refused(_)), "{status}");
        }
    }

    #[test]
    fn the_signature_is_an_hmac_of_the_timestamp_and_the_body() {
        let body = br#"{"id":"x"}"#;
        let header = signature(b"0123456789abcdef", 1_700_000_000_000, body);
        let (t, mac) = header.split_once(",v1=").unwrap();
        assert_eq!(t, "t=1700000000000");
        let mut signed = b"1700000000000.".to_vec();
        signed.extend_from_slice(body);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef");
        assert!(ring::hmac::verify(&key, &signed, &hex::decode(mac).unwrap()).is_ok());
        assert!(ring::hmac::verify(&key, b"1700000000001.{\"id\":\"x\"}", &hex::decode(mac).unwrap()).is_err());
    }
}
