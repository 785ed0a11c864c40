//! Presence and typing: who is online and who is typing. Ephemeral by design: never in Raft,
//! never on disk; a restarted node starts with its users offline.
//!
//! - The node holding a user's connection owns that user's presence here: a connection makes
//!   them online, an activity ping (SetPresence) keeps them so, [`IDLE_AFTER`] without one
//!   makes them idle, and [`OFFLINE_AFTER`] after their last connection closed they are
//!   offline (a reconnect within it does not flap).
//! - Every change a node makes to its users' presence gets the next value of its counter; with
//!   the node's incarnation (its start time) that orders a node's entries: a peer keeps, per
//!   node and user, only the newest. A user connected to several nodes is the best of them
//!   (online, then idle, then offline).
//! - Nodes exchange changes with every peer at most every [`EXCHANGE_EVERY`], coalesced (the
//!   last state of each user wins), and their whole table when they first meet, when a peer
//!   comes back, or after a failed exchange. A peer not heard from for [`PEER_SILENT_AFTER`]
//!   loses its users: a killed node's users go offline everywhere, no ghost stays online.
//! - Typing: a member typing in a room is shown to the room's subscribers for [`TYPING_FOR`]
//!   after their last Typing; notices go to every peer with the next exchange (a user's
//!   repeated "still typing" at most once per [`TYPING_RESEND`]).
//!
//! Delivery is to whoever asked: a subscription registers a [`PresenceWatch`] of the users it
//! shows, in an index by watched user. An effective change (after merging) goes only to the
//! watches of that user: into each one's inbox, where the last state of each user wins, and
//! the watch's task is woken. A node with thousands of subscriptions thus does work per
//! delivered change, not per change and subscription, and a slow subscription never falls
//! behind: its inbox holds at most one entry per watched user.
//!
//! Bounds: the table holds the users connected to the cluster (one entry per user and node);
//! typing holds the users typing now; the pending deltas and notices are drained every
//! exchange and capped ([`MAX_PENDING_TYPING`]); a watch's inbox, its watched users.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chorus_proto::client::{PresenceState, TypingChanged, UserPresence};
use chorus_proto::peer as pb;
use tokio::sync::{Notify, broadcast};

use crate::auth::now_ms;

/// A connected user without activity for this long is idle.
pub const IDLE_AFTER: Duration = Duration::from_secs(5 * 60);
/// A user whose last connection closed is offline this long after.
pub const OFFLINE_AFTER: Duration = Duration::from_secs(30);
/// How often a node sends its changes to each peer.
pub const EXCHANGE_EVERY: Duration = Duration::from_secs(1);
/// A peer not heard from for this long has its users taken offline.
pub const PEER_SILENT_AFTER: Duration = Duration::from_secs(30);
/// A user is shown typing this long after their last Typing.
pub const TYPING_FOR: Duration = Duration::from_secs(6);
/// A user's "still typing" goes to the peers at most this often.
pub const TYPING_RESEND: Duration = Duration::from_secs(2);
/// Longest status text, in bytes.
pub const MAX_STATUS_BYTES: usize = 256;
/// Typing notices kept for the next exchange at most (more are dropped: typing is a hint).
const MAX_PENDING_TYPING: usize = 10_000;
/// Typing changes a slow subscription may fall behind before it skips some (typing is a hint).
const TYPING_CAPACITY: usize = 256;

fn rank(state: PresenceState) -> u8 {
    match state {
        PresenceState::Online => 3,
        PresenceState::Idle => 2,
        PresenceState::Offline | PresenceState::Unspecified => 1,
    }
}

/// A user connected to this node.
struct LocalUser {
    connections: u32,
    last_active: Instant,
    last_active_ms: u64,
    status_text: String,
    /// The client said the user is away.
    away: bool,
    /// When the last connection closed (while `connections` is 0).
    closed_at: Option<Instant>,
    /// The entry last published for the user (what peers know of them from this node).
    entry: pb::PresenceEntry,
}

impl LocalUser {
    fn state(&self, now: Instant) -> PresenceState {
        match (self.connections, self.closed_at) {
            (0, Some(closed)) if now.duration_since(closed) >= OFFLINE_AFTER => PresenceState::Offline,
            (0, None) => PresenceState::Offline,
            _ if self.away || now.duration_since(self.last_active) >= IDLE_AFTER => PresenceState::Idle,
            _ => PresenceState::Online,
        }
    }
}

/// What this node knows of a peer's users.
struct RemoteNode {
    incarnation: u64,
    last_heard: Instant,
    users: HashMap<String, pb::PresenceEntry>,
    /// When each user's entry became offline: kept for [`OFFLINE_KEPT`] (so that an older
    /// entry arriving late cannot win), then forgotten.
    offline_at: HashMap<String, Instant>,
}

/// How long a peer's offline entry is kept before it is forgotten.
const OFFLINE_KEPT: Duration = Duration::from_secs(300);

struct TypingEntry {
    until: Instant,
    /// When this node last passed the notice on (for notices of its own users).
    sent: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    local: HashMap<String, LocalUser>,
    counter: u64,
    /// Local users whose entry changed since the last exchange.
    pending: BTreeSet<String>,
    remote: HashMap<u64, RemoteNode>,
    /// Peers that must get the whole table next (first met, came back, or a failed exchange).
    needs_full: HashSet<u64>,
    /// The effective presence last published, per user.
    effective: HashMap<String, UserPresence>,
    typing: BTreeMap<(String, String), TypingEntry>,
    pending_typing: Vec<pb::TypingNotice>,
}

/// Where a watch's changes wait for its task: the newest state of each watched user that
/// changed since the task last looked.
#[derive(Default)]
struct Inbox {
    changes: Mutex<HashMap<String, UserPresence>>,
    ready: Notify,
}

/// The watches of each user (see the module docs).
#[derive(Default)]
struct WatchIndex {
    next_id: u64,
    /// Watched user → the inboxes of their watches, by watch id. The key is shared with the
    /// watches (thousands of watches of the same users hold one copy of each name).
    by_user: HashMap<Arc<str>, HashMap<u64, Arc<Inbox>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One subscription's watch of some users' presence, from [`PresenceHub::watch`]; dropping it
/// takes it out of the index.
pub struct PresenceWatch {
    id: u64,
    users: Vec<Arc<str>>,
    inbox: Arc<Inbox>,
    index: Arc<Mutex<WatchIndex>>,
}

impl PresenceWatch {
    /// The watched users that changed since the last call (each as they are now), once there
    /// is at least one. Cancel-safe: nothing is taken before it returns.
    pub async fn changed(&self) -> Vec<UserPresence> {
        loop {
            let changes: Vec<UserPresence> = lock(&self.inbox.changes).drain().map(|(_, p)| p).collect();
            if !changes.is_empty() {
                return changes;
            }
            // A change published since the drain left a permit: this returns at once.
            self.inbox.ready.notified().await;
        }
    }
}

#[cfg(test)]
impl PresenceWatch {
    fn try_changed(&self) -> Vec<UserPresence> {
        let mut changes: Vec<UserPresence> = lock(&self.inbox.changes).drain().map(|(_, p)| p).collect();
        changes.sort_by(|a, b| a.user.cmp(&b.user));
        changes
    }
}

impl Drop for PresenceWatch {
    fn drop(&mut self) {
        let mut index = lock(&self.index);
        for user in &self.users {
            if let Some(watches) = index.by_user.get_mut(&**user) {
                watches.remove(&self.id);
                if watches.is_empty() {
                    index.by_user.remove(&**user);
                }
            }
        }
    }
}

/// The node's presence and typing state; see the module docs.
pub struct PresenceHub {
    node: u64,
    incarnation: u64,
    inner: Mutex<Inner>,
    /// Taken after `inner` when both are.
    watches: Arc<Mutex<WatchIndex>>,
    typing: broadcast::Sender<Arc<TypingChanged>>,
}

impl PresenceHub {
    pub fn new(node: u64) -> PresenceHub {
        let (typing, _) = broadcast::channel(TYPING_CAPACITY);
        PresenceHub { node, incarnation: now_ms(), inner: Mutex::default(), watches: Arc::default(), typing }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Watches `users`: where they are now (offline when unknown), and a watch that collects
    /// their changes from that point on (no change falls between the two).
    pub fn watch(&self, mut users: Vec<String>) -> (PresenceWatch, Vec<UserPresence>) {
        let inner = self.lock();
        let now: Vec<UserPresence> =
            users.iter().map(|u| inner.effective.get(u).cloned().unwrap_or_else(|| offline(u))).collect();
        users.sort_unstable();
        users.dedup();
        let inbox = Arc::new(Inbox::default());
        let mut index = lock(&self.watches);
        let id = index.next_id;
        index.next_id += 1;
        let mut keys = Vec::with_capacity(users.len());
        for user in users {
            let key = match index.by_user.get_key_value(user.as_str()) {
                Some((key, _)) => key.clone(),
                None => Arc::from(user),
            };
            index.by_user.entry(key.clone()).or_default().insert(id, inbox.clone());
            keys.push(key);
        }
        drop(index);
        (PresenceWatch { id, users: keys, inbox, index: self.watches.clone() }, now)
    }

    /// How many watches there are (of any user), and of how many distinct users.
    #[cfg(test)]
    fn watch_counts(&self) -> (usize, usize) {
        let index = lock(&self.watches);
        (index.by_user.values().map(HashMap::len).sum(), index.by_user.len())
    }

    /// Typing changes of every room, from now on.
    pub fn typing_changes(&self) -> broadcast::Receiver<Arc<TypingChanged>> {
        self.typing.subscribe()
    }

    /// Where `users` are now (offline when unknown).
    pub fn snapshot(&self, users: &[String]) -> Vec<UserPresence> {
        let inner = self.lock();
        users.iter().map(|u| inner.effective.get(u).cloned().unwrap_or_else(|| offline(u))).collect()
    }

    /// Who is typing in `room` now.
    pub fn typing_in(&self, room: &str) -> Vec<String> {
        let inner = self.lock();
        typing_users(&inner, room, Instant::now())
    }

    /// A connection of `user` signed in here.
    pub fn connected(&self, user: &str) {
        let now = Instant::now();
        let mut inner = self.lock();
        let local = inner.local.entry(user.to_owned()).or_insert_with(|| LocalUser {
            connections: 0,
            last_active: now,
            last_active_ms: now_ms(),
            status_text: String::new(),
            away: false,
            closed_at: None,
            entry: pb::PresenceEntry { user: user.to_owned(), ..Default::default() },
        });
        local.connections = local.connections.saturating_add(1);
        local.closed_at = None;
        local.last_active = now;
        local.last_active_ms = now_ms();
        local.away = false;
        self.refresh_local(&mut inner, user, now);
        self.publish(&mut inner, [user.to_owned()]);
    }

    /// A signed-in connection of `user` closed.
    pub fn disconnected(&self, user: &str) {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(local) = inner.local.get_mut(user) {
            local.connections = local.connections.saturating_sub(1);
            if local.connections == 0 {
                local.closed_at = Some(now);
            }
        }
    }

    /// `user` is active (`away` false) or says they are away; `status_text`, when given,
    /// replaces theirs. Only for a user connected here.
    pub fn activity(&self, user: &str, away: bool, status_text: Option<String>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(local) = inner.local.get_mut(user) else { return };
        local.away = away;
        if !away {
            local.last_active = now;
            local.last_active_ms = now_ms();
        }
        if let Some(text) = status_text {
            local.status_text = text;
        }
        self.refresh_local(&mut inner, user, now);
        self.publish(&mut inner, [user.to_owned()]);
    }

    /// `user` (a member of `room`, connected here) is typing there, or stopped.
    pub fn typing(&self, room: &str, user: &str, typing: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        let key = (room.to_owned(), user.to_owned());
        let before = typing_users(&inner, room, now);
        let resend = match inner.typing.get(&key) {
            _ if !typing => true,
            Some(TypingEntry { sent: Some(sent), .. }) => now.duration_since(*sent) >= TYPING_RESEND,
            _ => true,
        };
        if typing {
            let sent = if resend { Some(now) } else { inner.typing.get(&key).and_then(|t| t.sent) };
            inner.typing.insert(key, TypingEntry { until: now + TYPING_FOR, sent });
        } else {
            inner.typing.remove(&key);
        }
        if resend && inner.pending_typing.len() < MAX_PENDING_TYPING {
            inner.pending_typing.push(pb::TypingNotice { room: room.to_owned(), user: user.to_owned(), typing });
        }
        self.publish_typing(&inner, room, before, now);
    }

    /// Recomputes a local user's state; a change gets the next counter and is pending.
    fn refresh_local(&self, inner: &mut Inner, user: &str, now: Instant) {
        let Some(local) = inner.local.get_mut(user) else { return };
        let state = local.state(now) as i32;
        let entry = &local.entry;
        // Every tick looks at every local user: compare before building anything.
        let unchanged = entry.counter != 0
            && entry.state == state
            && entry.last_active_ms == local.last_active_ms
            && entry.status_text == local.status_text;
        if unchanged {
            return;
        }
        inner.counter += 1;
        local.entry = pb::PresenceEntry {
            user: user.to_owned(),
            state,
            status_text: local.status_text.clone(),
            last_active_ms: local.last_active_ms,
            counter: inner.counter,
        };
        inner.pending.insert(user.to_owned());
    }

    /// Publishes the users' effective presence where it changed.
    fn publish(&self, inner: &mut Inner, users: impl IntoIterator<Item = String>) {
        let mut changed = Vec::new();
        for user in users {
            let now = effective(inner, &user);
            let before = inner.effective.get(&user);
            if before != Some(&now) && !(before.is_none() && now.state == PresenceState::Offline as i32) {
                changed.push(now.clone());
            }
            if now.state == PresenceState::Offline as i32 {
                inner.effective.remove(&user);
            } else {
                inner.effective.insert(user, now);
            }
        }
        if changed.is_empty() {
            return;
        }
        let index = lock(&self.watches);
        for presence in changed {
            for inbox in index.by_user.get(presence.user.as_str()).into_iter().flat_map(HashMap::values) {
                lock(&inbox.changes).insert(presence.user.clone(), presence.clone());
                inbox.ready.notify_one();
            }
        }
    }

    fn publish_typing(&self, inner: &Inner, room: &str, before: Vec<String>, now: Instant) {
        let users = typing_users(inner, room, now);
        if users != before {
            let _ = self.typing.send(Arc::new(TypingChanged { room: room.to_owned(), users }));
        }
    }

    /// Once per exchange: idle and offline timeouts, typing expiry, silent peers. Returns the
    /// exchange to send to each of `peers` (all of them get the same changes; a peer that
    /// needs the whole table gets it).
    pub fn tick(&self, peers: &[u64]) -> Vec<(u64, pb::PresenceExchange)> {
        let now = Instant::now();
        let mut inner = self.lock();
        let users: Vec<String> = inner.local.keys().cloned().collect();
        for user in &users {
            self.refresh_local(&mut inner, user, now);
        }
        // Offline users need no local entry once peers were told.
        let gone: Vec<String> = inner
            .local
            .iter()
            .filter(|(_, l)| l.connections == 0 && l.entry.state == PresenceState::Offline as i32)
            .map(|(u, _)| u.clone())
            .collect();
        let silent: Vec<u64> = inner
            .remote
            .iter()
            .filter(|(_, r)| now.duration_since(r.last_heard) >= PEER_SILENT_AFTER)
            .map(|(id, _)| *id)
            .collect();
        for remote in inner.remote.values_mut() {
            let forgotten: Vec<String> = remote
                .offline_at
                .iter()
                .filter(|(_, at)| now.duration_since(**at) >= OFFLINE_KEPT)
                .map(|(user, _)| user.clone())
                .collect();
            for user in forgotten {
                remote.offline_at.remove(&user);
                remote.users.remove(&user);
            }
        }
        let mut affected: BTreeSet<String> = inner.pending.clone();
        for id in silent {
            if let Some(node) = inner.remote.remove(&id) {
                tracing::info!(peer = id, users = node.users.len(), "presence: a silent peer's users go offline");
                affected.extend(node.users.into_keys());
            }
            inner.needs_full.insert(id);
        }
        // Typing that expired.
        let expired: Vec<(String, String)> =
            inner.typing.iter().filter(|(_, t)| t.until <= now).map(|(k, _)| k.clone()).collect();
        let expired_rooms: BTreeSet<String> = expired.iter().map(|(room, _)| room.clone()).collect();
        for room in &expired_rooms {
            let before: Vec<String> =
                inner.typing.iter().filter(|((r, _), _)| r == room).map(|((_, u), _)| u.clone()).collect();
            for key in expired.iter().filter(|(r, _)| r == room) {
                inner.typing.remove(key);
            }
            self.publish_typing(&inner, room, before, now);
        }
        let delta: Vec<pb::PresenceEntry> =
            inner.pending.iter().filter_map(|u| inner.local.get(u).map(|l| l.entry.clone())).collect();
        // The whole table only when some peer gets it (the first exchanges, after a failure).
        let whole_for: HashSet<u64> = peers
            .iter()
            .copied()
            .filter(|peer| inner.needs_full.contains(peer) || !inner.remote.contains_key(peer))
            .collect();
        let full: Vec<pb::PresenceEntry> =
            if whole_for.is_empty() { Vec::new() } else { inner.local.values().map(|l| l.entry.clone()).collect() };
        let typing = std::mem::take(&mut inner.pending_typing);
        inner.pending.clear();
        for user in gone {
            inner.local.remove(&user);
        }
        self.publish(&mut inner, affected);
        peers
            .iter()
            .map(|&peer| {
                let whole = whole_for.contains(&peer);
                let exchange = pb::PresenceExchange {
                    from_node: self.node,
                    incarnation: self.incarnation,
                    full: whole,
                    want_full: whole,
                    entries: if whole { full.clone() } else { delta.clone() },
                    typing: typing.clone(),
                    counter_high: inner.counter,
                };
                (peer, exchange)
            })
            .collect()
    }

    /// An exchange with `peer` went through: it had our table if we sent it whole.
    pub fn exchanged(&self, peer: u64, sent_full: bool) {
        if sent_full {
            self.lock().needs_full.remove(&peer);
        }
    }

    /// An exchange with `peer` failed: it gets the whole table next time.
    pub fn exchange_failed(&self, peer: u64) {
        self.lock().needs_full.insert(peer);
    }

    /// Takes in what a peer sent (a request, or the reply to ours); returns the reply to a
    /// request: our whole table if it asked for it.
    pub fn receive(&self, from: pb::PresenceExchange) -> pb::PresenceExchange {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut affected: BTreeSet<String> = BTreeSet::new();
        let node = from.from_node;
        if node != self.node {
            let stale_incarnation = inner.remote.get(&node).is_some_and(|r| r.incarnation > from.incarnation);
            if !stale_incarnation {
                let fresh = inner.remote.get(&node).is_none_or(|r| r.incarnation < from.incarnation);
                let remote = inner.remote.entry(node).or_insert_with(|| RemoteNode {
                    incarnation: from.incarnation,
                    last_heard: now,
                    users: HashMap::new(),
                    offline_at: HashMap::new(),
                });
                remote.last_heard = now;
                if fresh {
                    // A restarted node: what it said before no longer holds.
                    affected.extend(remote.users.keys().cloned());
                    remote.users.clear();
                    remote.offline_at.clear();
                    remote.incarnation = from.incarnation;
                }
                if from.full {
                    // A whole table: its users not in it are gone, unless what we have of them
                    // is newer than the table (it came in an exchange built after it).
                    let listed: HashSet<&str> = from.entries.iter().map(|e| e.user.as_str()).collect();
                    let gone: Vec<String> = remote
                        .users
                        .iter()
                        .filter(|(user, e)| !listed.contains(user.as_str()) && e.counter <= from.counter_high)
                        .map(|(user, _)| user.clone())
                        .collect();
                    for user in gone {
                        remote.users.remove(&user);
                        remote.offline_at.remove(&user);
                        affected.insert(user);
                    }
                }
                for entry in from.entries {
                    let newer = remote.users.get(&entry.user).is_none_or(|e| e.counter < entry.counter);
                    if newer && crate::auth::normalize_user(&entry.user) == entry.user {
                        affected.insert(entry.user.clone());
                        // Offline entries are kept a while too, so that an older one arriving
                        // late does not win.
                        if entry.state == PresenceState::Offline as i32 {
                            remote.offline_at.insert(entry.user.clone(), now);
                        } else {
                            remote.offline_at.remove(&entry.user);
                        }
                        remote.users.insert(entry.user.clone(), entry);
                    }
                }
                for notice in from.typing {
                    let before = typing_users(&inner, &notice.room, now);
                    let key = (notice.room.clone(), notice.user.clone());
                    if notice.typing {
                        inner.typing.insert(key, TypingEntry { until: now + TYPING_FOR, sent: None });
                    } else {
                        inner.typing.remove(&key);
                    }
                    self.publish_typing(&inner, &notice.room, before, now);
                }
            }
        }
        self.publish(&mut inner, affected);
        let entries = if from.want_full { inner.local.values().map(|l| l.entry.clone()).collect() } else { Vec::new() };
        pb::PresenceExchange {
            from_node: self.node,
            incarnation: self.incarnation,
            full: from.want_full,
            want_full: false,
            entries,
            typing: Vec::new(),
            counter_high: inner.counter,
        }
    }
}

fn offline(user: &str) -> UserPresence {
    UserPresence { user: user.to_owned(), state: PresenceState::Offline as i32, ..Default::default() }
}

/// The best of what every node says of `user`.
fn effective(inner: &Inner, user: &str) -> UserPresence {
    let local = inner.local.get(user).map(|l| &l.entry);
    let remote = inner.remote.values().filter_map(|r| r.users.get(user));
    let best = local
        .into_iter()
        .chain(remote)
        .max_by_key(|e| (rank(PresenceState::try_from(e.state).unwrap_or(PresenceState::Offline)), e.last_active_ms));
    match best {
        Some(e) if e.state != PresenceState::Offline as i32 => UserPresence {
            user: user.to_owned(),
            state: e.state,
            status_text: e.status_text.clone(),
            last_active_ms: e.last_active_ms,
        },
        Some(e) => UserPresence { last_active_ms: e.last_active_ms, ..offline(user) },
        None => offline(user),
    }
}

fn typing_users(inner: &Inner, room: &str, now: Instant) -> Vec<String> {
    inner
        .typing
        .range((room.to_owned(), String::new())..)
        .take_while(|((r, _), _)| r == room)
        .filter(|(_, t)| t.until > now)
        .map(|((_, u), _)| u.clone())
        .collect()
}

/// Sends this node's presence changes to every peer every [`EXCHANGE_EVERY`], and takes in
/// their replies, until the node stops (a supervised service).
pub async fn exchange_with_peers(node: Arc<crate::node::Node>) {
    let mut ticker = crate::node::ticker(EXCHANGE_EVERY);
    while node.next_tick(&mut ticker).await {
        let peers: Vec<u64> = node.peers.ids().collect();
        let exchanges = node.presence.tick(&peers);
        let sends = exchanges.into_iter().map(|(peer, exchange)| {
            let node = node.clone();
            async move {
                let Some(mut client) = node.peers.get(peer) else { return };
                let full = exchange.full;
                match tokio::time::timeout(EXCHANGE_EVERY * 2, client.exchange_presence(exchange)).await {
                    Ok(Ok(reply)) if reply.get_ref().from_node == peer => {
                        node.presence.receive(reply.into_inner());
                        node.presence.exchanged(peer, full);
                    }
                    _ => node.presence.exchange_failed(peer),
                }
            }
        });
        futures::future::join_all(sends).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_of(hub: &PresenceHub, user: &str) -> PresenceState {
        PresenceState::try_from(hub.snapshot(&[user.to_owned()])[0].state).unwrap()
    }

    /// Runs one exchange from `a` to `b` (and b's reply back), as the exchange loop does.
    fn exchange(a: &PresenceHub, b: &PresenceHub) {
        for (_, request) in a.tick(&[b.node]) {
            let full = request.full;
            let reply = b.receive(request);
            a.receive(reply);
            a.exchanged(b.node, full);
        }
    }

    #[test]
    fn a_connected_user_is_online_on_every_node_and_offline_after_the_grace() {
        let (a, b) = (PresenceHub::new(1), PresenceHub::new(2));
        let (watch, _) = b.watch(vec!["ann".into()]);
        a.connected("ann");
        assert_eq!(state_of(&a, "ann"), PresenceState::Online);
        exchange(&a, &b);
        exchange(&b, &a);
        assert_eq!(state_of(&b, "ann"), PresenceState::Online);
        let batch = watch.try_changed();
        assert_eq!((batch[0].user.as_str(), batch[0].state), ("ann", PresenceState::Online as i32));
        // The last connection closes: still online during the grace, then offline everywhere.
        a.disconnected("ann");
        exchange(&a, &b);
        assert_eq!(state_of(&b, "ann"), PresenceState::Online, "a reconnect within the grace does not flap");
        a.lock().local.get_mut("ann").unwrap().closed_at = Some(Instant::now() - OFFLINE_AFTER);
        exchange(&a, &b);
        assert_eq!(state_of(&a, "ann"), PresenceState::Offline);
        assert_eq!(state_of(&b, "ann"), PresenceState::Offline);
    }

    #[test]
    fn a_watch_gets_only_its_users_last_states_and_leaves_the_index_when_dropped() {
        let hub = PresenceHub::new(1);
        hub.connected("ann");
        let (watch, now) = hub.watch(vec!["ann".into(), "bob".into(), "ann".into()]);
        let states: Vec<i32> = now.iter().map(|p| p.state).collect();
        assert_eq!(states, [PresenceState::Online as i32, PresenceState::Offline as i32, PresenceState::Online as i32]);
        let (other, _) = hub.watch(vec!["carol".into()]);
        assert_eq!(hub.watch_counts(), (3, 3), "one entry per distinct watched user");
        // Several changes before the watch looks: the last state of each user, once.
        hub.connected("bob");
        hub.activity("ann", true, Some("one".into()));
        hub.activity("ann", true, Some("two".into()));
        hub.connected("dave");
        let changes = watch.try_changed();
        let seen: Vec<(&str, &str)> = changes.iter().map(|p| (p.user.as_str(), p.status_text.as_str())).collect();
        assert_eq!(seen, [("ann", "two"), ("bob", "")]);
        assert!(watch.try_changed().is_empty());
        assert!(other.try_changed().is_empty(), "carol did not change");
        // Nothing is lost between a change and the wait.
        hub.activity("bob", true, None);
        let waited = futures::executor::block_on(watch.changed());
        assert_eq!((waited[0].user.as_str(), waited[0].state), ("bob", PresenceState::Idle as i32));
        drop(watch);
        assert_eq!(hub.watch_counts(), (1, 1));
        drop(other);
        assert_eq!(hub.watch_counts(), (0, 0));
    }

    #[test]
    fn idle_after_inactivity_or_when_away_and_status_text_travels() {
        let (a, b) = (PresenceHub::new(1), PresenceHub::new(2));
        a.connected("ann");
        a.activity("ann", true, Some("lunch".into()));
        exchange(&a, &b);
        let seen = &b.snapshot(&["ann".into()])[0];
        assert_eq!((seen.state, seen.status_text.as_str()), (PresenceState::Idle as i32, "lunch"));
        a.activity("ann", false, None);
        assert_eq!(state_of(&a, "ann"), PresenceState::Online);
        a.lock().local.get_mut("ann").unwrap().last_active = Instant::now() - IDLE_AFTER;
        exchange(&a, &b);
        assert_eq!(state_of(&b, "ann"), PresenceState::Idle);
    }

    #[test]
    fn the_best_device_wins_and_a_stale_entry_never_does() {
        let (a, b, c) = (PresenceHub::new(1), PresenceHub::new(2), PresenceHub::new(3));
        a.connected("ann");
        b.connected("ann");
        b.activity("ann", true, None);
        exchange(&a, &c);
        exchange(&b, &c);
        assert_eq!(state_of(&c, "ann"), PresenceState::Online, "online on one device beats idle on another");
        // An old entry of node 1 arriving after a newer one changes nothing.
        let old = pb::PresenceExchange {
            from_node: 1,
            incarnation: a.incarnation,
            entries: vec![pb::PresenceEntry {
                user: "ann".into(),
                state: PresenceState::Offline as i32,
                counter: 0,
                ..Default::default()
            }],
            ..Default::default()
        };
        c.receive(old);
        assert_eq!(state_of(&c, "ann"), PresenceState::Online);
    }

    #[test]
    fn a_whole_table_older_than_a_change_already_seen_does_not_undo_it() {
        let (a, b) = (PresenceHub::new(1), PresenceHub::new(2));
        b.connected("ann");
        // b's whole table, built now (ann online)...
        let stale = b.receive(pb::PresenceExchange { from_node: 1, want_full: true, ..Default::default() });
        // ...then ann leaves and b's delta saying so reaches a first.
        b.disconnected("ann");
        b.lock().local.get_mut("ann").unwrap().closed_at = Some(Instant::now() - OFFLINE_AFTER);
        for (_, delta) in b.tick(&[1]) {
            a.receive(delta);
        }
        assert_eq!(state_of(&a, "ann"), PresenceState::Offline);
        a.receive(stale);
        assert_eq!(state_of(&a, "ann"), PresenceState::Offline, "the late whole table brought back a ghost");
    }

    #[test]
    fn offline_entries_of_peers_are_forgotten_after_a_while() {
        let (a, b) = (PresenceHub::new(1), PresenceHub::new(2));
        a.connected("ann");
        exchange(&a, &b);
        a.disconnected("ann");
        a.lock().local.get_mut("ann").unwrap().closed_at = Some(Instant::now() - OFFLINE_AFTER);
        exchange(&a, &b);
        assert!(b.lock().remote[&1].users.contains_key("ann"));
        for at in b.lock().remote.get_mut(&1).unwrap().offline_at.values_mut() {
            *at = Instant::now() - OFFLINE_KEPT;
        }
        b.tick(&[1]);
        assert!(!b.lock().remote[&1].users.contains_key("ann"), "the table holds only users connected now");
    }

    #[test]
    fn a_silent_peers_users_go_offline() {
        let (a, b) = (PresenceHub::new(1), PresenceHub::new(2));
        a.connected("ann");
        exchange(&a, &b);
        assert_eq!(state_of(&b, "ann"), PresenceState::Online);
        b.lock().remote.get_mut(&1).unwrap().last_heard = Instant::now() - PEER_SILENT_AFTER;
        let next = b.tick(&[1]);
        assert_eq!(state_of(&b, "ann"), PresenceState::Offline, "no ghost stays online");
        assert!(next[0].1.full && next[0].1.want_full, "the peer gets the whole table when it comes back");
    }

    #[test]
    fn a_restarted_nodes_old_entries_are_dropped() {
        let (a, b) = (PresenceHub::new(1), PresenceHub::new(2));
        a.connected("ann");
        exchange(&a, &b);
        // Node 1 restarts: a new incarnation with nobody connected.
        let restarted = PresenceHub { incarnation: a.incarnation + 1, ..PresenceHub::new(1) };
        exchange(&restarted, &b);
        assert_eq!(state_of(&b, "ann"), PresenceState::Offline);
    }

    #[test]
    fn typing_reaches_peers_and_expires() {
        let (a, b) = (PresenceHub::new(1), PresenceHub::new(2));
        let mut typing = b.typing_changes();
        a.typing("general", "ann", true);
        assert_eq!(a.typing_in("general"), vec!["ann"]);
        exchange(&a, &b);
        assert_eq!(b.typing_in("general"), vec!["ann"]);
        assert_eq!(typing.try_recv().unwrap().users, vec!["ann"]);
        // Repeated "still typing" within the resend interval is not sent again.
        a.typing("general", "ann", true);
        assert!(a.tick(&[2])[0].1.typing.is_empty());
        // Expiry.
        for entry in b.lock().typing.values_mut() {
            entry.until = Instant::now();
        }
        b.tick(&[]);
        assert!(b.typing_in("general").is_empty());
        assert!(typing.try_recv().unwrap().users.is_empty());
        // Stopping is sent at once.
        a.typing("general", "ann", false);
        assert!(a.typing_in("general").is_empty());
        assert_eq!(a.tick(&[2])[0].1.typing.len(), 1);
    }
}
