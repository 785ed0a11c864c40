//! What the terminal chat shows, and what a key or an event changes: the user's rooms with
//! unread and mention counts, each room's loaded messages and scroll position, members and
//! their presence, who is typing, the input line and the status bar.
//!
//! No I/O here: a key or an event updates the state and returns the [`Effect`]s the runtime
//! (`super::run`) should carry out (send, page history, mark read...), whose outcomes come
//! back through the `*_loaded`/`sent`/`joined` methods. So every behaviour is tested without a
//! terminal or a cluster.
//!
//! Invariants: a room's messages are keyed by seq, so an event delivered twice (a resumed or
//! recreated subscription) changes nothing, and only a seq above the newest one known counts
//! as unread; scrolling is in messages from the bottom, so older pages loaded above the view
//! never move what is on screen.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chorus_client::{HistoryPage, Message, SubscriptionEvent};
use chorus_proto::client::{MessageKind, RoomUpdate, UserPresence};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::editor::LineEditor;

/// Messages asked for per history page.
pub const PAGE: u32 = 50;
/// Messages kept per room; beyond it the oldest go (they can be paged in again).
const KEEP_PER_ROOM: usize = 5_000;
/// A "typing" notice is repeated this often while the user keeps typing (the server shows it
/// for 6 s).
const TYPING_REPEAT: Duration = Duration::from_secs(3);
/// Activity pings at most this often (see `Client::set_presence`).
const ACTIVITY_EVERY: Duration = Duration::from_secs(60);
/// How long a notice stays in the status bar.
const NOTICE_FOR: Duration = Duration::from_secs(8);
/// Users whose presence one subscription may watch (the protocol's limit).
pub const MAX_WATCHED: usize = 1000;
/// Rooms one subscription may follow (the protocol's limit).
pub const MAX_SUBSCRIBED_ROOMS: usize = 256;

/// Something the runtime should do for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send `text` to `room`; the outcome comes back as [`Chat::sent`] with `id`.
    Send {
        id: u64,
        room: String,
        text: String,
    },
    /// The page of messages before `before`; comes back as [`Chat::history_loaded`].
    LoadOlder {
        room: String,
        before: u64,
    },
    /// The room's members; comes back as [`Chat::members_loaded`].
    LoadMembers {
        room: String,
    },
    MarkRead {
        room: String,
        seq: u64,
    },
    Typing {
        room: String,
        typing: bool,
    },
    /// Create (if need be) and join; comes back as [`Chat::joined`].
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    OpenDirect {
        user: String,
    },
    Invite {
        room: String,
        user: String,
    },
    /// The user did something: an activity ping.
    Activity,
}

/// Where the older messages of a room stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Older {
    /// There may be some: page them in when the view gets there.
    More,
    Loading,
    /// The room's first (retained) message is loaded.
    Start,
}

#[derive(Debug)]
pub struct RoomView {
    pub name: String,
    /// For a direct room: the other user.
    pub direct_with: Option<String>,
    pub messages: BTreeMap<u64, Message>,
    pub last_seq: u64,
    pub read_seq: u64,
    pub unread: u64,
    pub mentions: u64,
    pub older: Older,
    /// Joined members, once loaded.
    pub members: Option<BTreeSet<String>>,
    pub typing: Vec<String>,
    /// Messages below the view (0: following the newest).
    pub scroll: usize,
}

impl RoomView {
    fn new(name: String) -> RoomView {
        RoomView {
            name,
            direct_with: None,
            messages: BTreeMap::new(),
            last_seq: 0,
            read_seq: 0,
            unread: 0,
            mentions: 0,
            older: Older::More,
            members: None,
            typing: Vec::new(),
            scroll: 0,
        }
    }

    /// How the room is listed: `#name`, or `@user` for a direct room.
    pub fn label(&self) -> String {
        match &self.direct_with {
            Some(user) => format!("@{user}"),
            None => format!("#{}", self.name),
        }
    }

    fn oldest_loaded(&self) -> Option<u64> {
        self.messages.keys().next().copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
    at: Instant,
}

/// A message sent and not yet seen back in its room.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: u64,
    pub room: String,
    pub text: String,
    /// The seq it got, once acknowledged (it is shown until the subscription delivers it).
    pub seq: Option<u64>,
}

pub struct Chat {
    pub me: String,
    pub rooms: Vec<RoomView>,
    pub selected: Option<usize>,
    pub presence: HashMap<String, UserPresence>,
    pub editor: LineEditor,
    /// The node the client is connected to, and how often the live feed resumed.
    pub node: String,
    pub reconnects: u32,
    pub notice: Option<Notice>,
    pub pending: Vec<Pending>,
    /// Rows of the message pane at the last draw (for paging and for when to load more).
    pub rows: usize,
    pub quit: bool,
    pub show_help: bool,
    next_pending: u64,
    typing_said: Option<(String, Instant)>,
    last_activity: Option<Instant>,
}

fn is_text(m: &Message) -> bool {
    MessageKind::try_from(m.kind).unwrap_or(MessageKind::Text) == MessageKind::Text
}

/// Whether `body` mentions `user` (the state machine's rule: `@user` starting a word).
pub fn mentions(body: &[u8], user: &str) -> bool {
    chorus_proto::mentions::parse_mentions(body).iter().any(|name| name == user)
}

impl Chat {
    pub fn new(me: String, node: String) -> Chat {
        Chat {
            me,
            rooms: Vec::new(),
            selected: None,
            presence: HashMap::new(),
            editor: LineEditor::default(),
            node,
            reconnects: 0,
            notice: None,
            pending: Vec::new(),
            rows: 20,
            quit: false,
            show_help: false,
            next_pending: 1,
            typing_said: None,
            last_activity: None,
        }
    }

    pub fn selected_room(&self) -> Option<&RoomView> {
        self.selected.and_then(|i| self.rooms.get(i))
    }

    fn room_mut(&mut self, name: &str) -> Option<&mut RoomView> {
        self.rooms.iter_mut().find(|r| r.name == name)
    }

    pub fn say(&mut self, text: impl Into<String>, error: bool) {
        self.notice = Some(Notice { text: text.into(), error, at: Instant::now() });
    }

    /// A room of a Sync (the first one, or after joining): adds it or refreshes its counts.
    pub fn add_room(&mut self, update: RoomUpdate) {
        let Some(info) = update.room else { return };
        let index = match self.rooms.iter().position(|r| r.name == info.name) {
            Some(i) => i,
            None => {
                self.rooms.push(RoomView::new(info.name.clone()));
                self.rooms.len() - 1
            }
        };
        let room = &mut self.rooms[index];
        room.direct_with = info.direct_users.iter().find(|u| **u != self.me).cloned();
        room.read_seq = room.read_seq.max(update.read_seq);
        room.unread = update.unread;
        room.mentions = update.mentions;
        room.last_seq = room.last_seq.max(info.last_seq);
        for m in update.messages {
            room.messages.insert(m.seq, m);
        }
        room.older = match room.oldest_loaded() {
            Some(oldest) if oldest <= info.first_seq.max(1) => Older::Start,
            None if info.last_seq == 0 => Older::Start,
            _ => Older::More,
        };
        // Listed rooms first by name, direct ones after them; the open room stays open.
        let selected = self.selected.map(|i| self.rooms[i].name.clone());
        self.rooms.sort_by(|a, b| (a.direct_with.is_some(), &a.name).cmp(&(b.direct_with.is_some(), &b.name)));
        self.selected = selected.and_then(|name| self.rooms.iter().position(|r| r.name == name));
    }

    /// Opens the room at `index`: its unread count is read, and what it lacks is loaded.
    pub fn select(&mut self, index: usize) -> Vec<Effect> {
        if index >= self.rooms.len() {
            return Vec::new();
        }
        let mut effects = self.stop_typing();
        self.selected = Some(index);
        self.show_help = false;
        let room = &mut self.rooms[index];
        room.scroll = 0;
        if room.members.is_none() {
            effects.push(Effect::LoadMembers { room: room.name.clone() });
        }
        effects.extend(self.read_to_bottom());
        effects.extend(self.load_older_if_near_top());
        effects
    }

    pub fn select_named(&mut self, name: &str) -> Vec<Effect> {
        match self.rooms.iter().position(|r| r.name == name) {
            Some(i) => self.select(i),
            None => Vec::new(),
        }
    }

    /// The selected room is shown down to its newest message: everything in it is read.
    fn read_to_bottom(&mut self) -> Vec<Effect> {
        let Some(room) = self.selected.and_then(|i| self.rooms.get_mut(i)) else { return Vec::new() };
        if room.scroll != 0 {
            return Vec::new();
        }
        room.unread = 0;
        room.mentions = 0;
        if room.last_seq > room.read_seq {
            room.read_seq = room.last_seq;
            return vec![Effect::MarkRead { room: room.name.clone(), seq: room.last_seq }];
        }
        Vec::new()
    }

    /// Pages older messages in once the top of the view is within a screen of the oldest
    /// loaded one.
    fn load_older_if_near_top(&mut self) -> Vec<Effect> {
        let rows = self.rows.max(1);
        let Some(room) = self.selected.and_then(|i| self.rooms.get_mut(i)) else { return Vec::new() };
        if room.older != Older::More || room.scroll + 2 * rows < room.messages.len() {
            return Vec::new();
        }
        room.older = Older::Loading;
        let before = room.oldest_loaded().unwrap_or(room.last_seq.saturating_add(1));
        vec![Effect::LoadOlder { room: room.name.clone(), before }]
    }

    pub fn history_loaded(&mut self, room: &str, page: Result<HistoryPage, String>) -> Vec<Effect> {
        let Some(view) = self.room_mut(room) else { return Vec::new() };
        match page {
            Ok(page) => {
                let got = page.messages.len();
                // Not `page.last_seq`: newer messages come through the subscription, and the
                // newest seq known is where a new subscription would go on from.
                for m in page.messages {
                    view.messages.entry(m.seq).or_insert(m);
                }
                let first = page.first_seq.max(1);
                view.older = match view.oldest_loaded() {
                    Some(oldest) if oldest > first && got > 0 => Older::More,
                    _ => Older::Start,
                };
            }
            Err(e) => {
                view.older = Older::More;
                self.say(format!("history of {room}: {e}"), true);
                return Vec::new();
            }
        }
        if self.selected_room().is_some_and(|r| r.name == room) {
            // Still near the top (a short page): go on.
            return self.load_older_if_near_top();
        }
        Vec::new()
    }

    pub fn members_loaded(&mut self, room: &str, members: Result<Vec<String>, String>) {
        match members {
            Ok(members) => {
                if let Some(view) = self.room_mut(room) {
                    view.members = Some(members.into_iter().collect());
                }
            }
            Err(e) => self.say(format!("members of {room}: {e}"), true),
        }
    }

    /// Users whose presence to watch: the members of the rooms whose members are loaded
    /// (the selected room's first), at most [`MAX_WATCHED`].
    pub fn watched_users(&self) -> BTreeSet<String> {
        let mut users = BTreeSet::new();
        let order = self.selected.into_iter().chain((0..self.rooms.len()).filter(|i| Some(*i) != self.selected));
        for i in order {
            for user in self.rooms[i].members.iter().flatten() {
                if users.len() == MAX_WATCHED {
                    return users;
                }
                if *user != self.me {
                    users.insert(user.clone());
                }
            }
        }
        users
    }

    /// The rooms to follow live, each with the last seq known: the selected one and the rest,
    /// at most [`MAX_SUBSCRIBED_ROOMS`].
    pub fn followed_rooms(&self) -> BTreeMap<String, u64> {
        let order = self.selected.into_iter().chain((0..self.rooms.len()).filter(|i| Some(*i) != self.selected));
        order.take(MAX_SUBSCRIBED_ROOMS).map(|i| (self.rooms[i].name.clone(), self.rooms[i].last_seq)).collect()
    }

    /// An event of the live subscription.
    pub fn on_event(&mut self, event: SubscriptionEvent) -> Vec<Effect> {
        match event {
            SubscriptionEvent::Message(m) => return self.on_message(m),
            SubscriptionEvent::Gap(g) => {
                self.say(format!("messages {}..{} of {} are gone: {}", g.from_seq, g.to_seq, g.room, g.reason), false)
            }
            SubscriptionEvent::RoomError { room, error } => self.say(format!("{room}: {error}"), true),
            SubscriptionEvent::Resumed { node } => {
                self.reconnects += 1;
                self.say(format!("reconnected via {node}; nothing missed"), false);
                self.node = node;
            }
            SubscriptionEvent::Presence(users) => {
                for p in users {
                    self.presence.insert(p.user.clone(), p);
                }
            }
            SubscriptionEvent::Typing { room, users } => {
                let me = self.me.clone();
                if let Some(view) = self.room_mut(&room) {
                    view.typing = users.into_iter().filter(|u| *u != me).collect();
                }
            }
        }
        Vec::new()
    }

    fn on_message(&mut self, m: Message) -> Vec<Effect> {
        let me = self.me.clone();
        let selected = self.selected_room().map(|r| r.name.clone());
        let Some(view) = self.room_mut(&m.room) else { return Vec::new() };
        if view.messages.contains_key(&m.seq) || m.seq <= view.oldest_loaded().unwrap_or(0) {
            return Vec::new();
        }
        let newest = m.seq > view.last_seq;
        view.last_seq = view.last_seq.max(m.seq);
        let viewing = selected.as_deref() == Some(view.name.as_str());
        if viewing && view.scroll > 0 {
            // Reading further up: what is on screen stays where it is.
            view.scroll += 1;
        }
        if let Some(kind) = MessageKind::try_from(m.kind).ok().filter(|k| *k != MessageKind::Text)
            && let Some(members) = &mut view.members
        {
            let who = if m.target.is_empty() { &m.sender } else { &m.target };
            match kind {
                MessageKind::Joined => {
                    members.insert(who.clone());
                }
                MessageKind::Left | MessageKind::Kicked | MessageKind::Banned => {
                    members.remove(who);
                }
                _ => {}
            }
        }
        let from_other = m.sender != me && is_text(&m);
        if newest && from_other && !(viewing && view.scroll == 0) {
            view.unread += 1;
            if view.direct_with.is_some() || mentions(&m.body, &me) {
                view.mentions += 1;
            }
        }
        if m.sender == me {
            view.read_seq = view.read_seq.max(m.seq);
            self.pending.retain(|p| !(p.room == m.room && p.seq == Some(m.seq)));
        }
        if let Some(view) = self.room_mut(&m.room) {
            view.messages.insert(m.seq, m);
            while view.messages.len() > KEEP_PER_ROOM && view.scroll + KEEP_PER_ROOM / 2 < view.messages.len() {
                view.messages.pop_first();
                view.older = Older::More;
            }
        }
        if viewing { self.read_to_bottom() } else { Vec::new() }
    }

    /// The outcome of a send: its seq, or why it failed.
    pub fn sent(&mut self, id: u64, outcome: Result<u64, String>) {
        let Some(at) = self.pending.iter().position(|p| p.id == id) else { return };
        match outcome {
            Ok(seq) => {
                let room = self.pending[at].room.clone();
                let delivered = self.rooms.iter().any(|r| r.name == room && r.messages.contains_key(&seq));
                if delivered {
                    self.pending.remove(at);
                } else {
                    self.pending[at].seq = Some(seq);
                }
            }
            Err(e) => {
                let p = self.pending.remove(at);
                self.say(format!("not sent to {}: {e}", p.room), true);
            }
        }
    }

    /// A room was joined (or a direct room opened): listed, and opened.
    pub fn joined(&mut self, update: RoomUpdate) -> Vec<Effect> {
        let name = update.room.as_ref().map(|r| r.name.clone()).unwrap_or_default();
        self.add_room(update);
        self.select_named(&name)
    }

    pub fn left(&mut self, room: &str) {
        let selected = self.selected_room().map(|r| r.name.clone());
        self.rooms.retain(|r| r.name != room);
        self.selected = selected.and_then(|name| self.rooms.iter().position(|r| r.name == name));
        if self.selected.is_none() && !self.rooms.is_empty() {
            self.selected = Some(0);
        }
        self.say(format!("left {room}"), false);
    }

    pub fn tick(&mut self, now: Instant) {
        if self.notice.as_ref().is_some_and(|n| now.duration_since(n.at) >= NOTICE_FOR) {
            self.notice = None;
        }
    }

    fn stop_typing(&mut self) -> Vec<Effect> {
        match self.typing_said.take() {
            Some((room, at)) if at.elapsed() < Duration::from_secs(6) => vec![Effect::Typing { room, typing: false }],
            _ => Vec::new(),
        }
    }

    /// After an edit: says "typing" in the selected room (again every few seconds), or that
    /// the user stopped once the line is empty or a command.
    fn typing_after_edit(&mut self) -> Vec<Effect> {
        let text = self.editor.text();
        if text.is_empty() || text.starts_with('/') {
            return self.stop_typing();
        }
        let Some(room) = self.selected_room().map(|r| r.name.clone()) else { return Vec::new() };
        let due = match &self.typing_said {
            Some((said, at)) => *said != room || at.elapsed() >= TYPING_REPEAT,
            None => true,
        };
        if due {
            let mut effects = if self.typing_said.as_ref().is_some_and(|(said, _)| *said != room) {
                self.stop_typing()
            } else {
                Vec::new()
            };
            self.typing_said = Some((room.clone(), Instant::now()));
            effects.push(Effect::Typing { room, typing: true });
            return effects;
        }
        Vec::new()
    }

    fn activity(&mut self) -> Vec<Effect> {
        if self.last_activity.is_none_or(|at| at.elapsed() >= ACTIVITY_EVERY) {
            self.last_activity = Some(Instant::now());
            return vec![Effect::Activity];
        }
        Vec::new()
    }

    pub fn on_paste(&mut self, text: &str) -> Vec<Effect> {
        self.editor.insert_str(text);
        self.typing_after_edit()
    }

    /// A key press.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Effect> {
        let mut effects = self.activity();
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        let mut edited = false;
        match key.code {
            KeyCode::Char('c') if ctrl => self.quit = true,
            KeyCode::Char('d') if ctrl && self.editor.is_empty() => self.quit = true,
            KeyCode::Char('n') if ctrl => effects.extend(self.cycle(1)),
            KeyCode::Char('p') if ctrl => effects.extend(self.cycle(-1)),
            KeyCode::Down if alt || ctrl => effects.extend(self.cycle(1)),
            KeyCode::Up if alt || ctrl => effects.extend(self.cycle(-1)),
            KeyCode::Tab => effects.extend(self.next_unread()),
            KeyCode::PageUp => effects.extend(self.scroll_by(self.rows.max(2) as isize / 2)),
            KeyCode::PageDown => effects.extend(self.scroll_by(-(self.rows.max(2) as isize / 2))),
            KeyCode::Esc => {
                self.show_help = false;
                if self.selected_room().is_some_and(|r| r.scroll > 0) {
                    effects.extend(self.scroll_by(isize::MIN / 2));
                } else {
                    self.editor.clear();
                    edited = true;
                }
            }
            KeyCode::Enter => effects.extend(self.enter()),
            KeyCode::Char('a') if ctrl => self.editor.home(),
            KeyCode::Char('e') if ctrl => self.editor.end(),
            KeyCode::Char('u') if ctrl => (self.editor.kill_to_start(), edited = true).1,
            KeyCode::Char('k') if ctrl => (self.editor.kill_to_end(), edited = true).1,
            KeyCode::Char('w') if ctrl => (self.editor.delete_word_back(), edited = true).1,
            KeyCode::Char('h') if ctrl => (self.editor.backspace(), edited = true).1,
            KeyCode::Char('b') if alt => self.editor.word_left(),
            KeyCode::Char('f') if alt => self.editor.word_right(),
            KeyCode::Left if ctrl => self.editor.word_left(),
            KeyCode::Right if ctrl => self.editor.word_right(),
            KeyCode::Char(c) if !ctrl && !alt => (self.editor.insert(c), edited = true).1,
            KeyCode::Backspace => (self.editor.backspace(), edited = true).1,
            KeyCode::Delete => (self.editor.delete(), edited = true).1,
            KeyCode::Left => self.editor.left(),
            KeyCode::Right => self.editor.right(),
            KeyCode::Home => self.editor.home(),
            KeyCode::End => self.editor.end(),
            KeyCode::Up => self.editor.history_prev(),
            KeyCode::Down => self.editor.history_next(),
            _ => {}
        }
        if edited {
            effects.extend(self.typing_after_edit());
        }
        effects
    }

    fn cycle(&mut self, by: isize) -> Vec<Effect> {
        let n = self.rooms.len() as isize;
        if n == 0 {
            return Vec::new();
        }
        let at = self.selected.map_or(0, |i| (i as isize + by).rem_euclid(n));
        self.select(at as usize)
    }

    /// Tab: the next room with unread messages (mentions first), if any.
    fn next_unread(&mut self) -> Vec<Effect> {
        let n = self.rooms.len();
        let start = self.selected.map_or(0, |i| i + 1);
        let order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
        let pick = order
            .iter()
            .find(|&&i| self.rooms[i].mentions > 0)
            .or_else(|| order.iter().find(|&&i| self.rooms[i].unread > 0))
            .copied();
        match pick {
            Some(i) => self.select(i),
            None => {
                self.say("no unread messages", false);
                Vec::new()
            }
        }
    }

    /// Scrolls the message pane by `by` messages (positive: up, into older ones).
    fn scroll_by(&mut self, by: isize) -> Vec<Effect> {
        let Some(room) = self.selected.and_then(|i| self.rooms.get_mut(i)) else { return Vec::new() };
        let max = room.messages.len().saturating_sub(1);
        room.scroll = (room.scroll as isize).saturating_add(by).clamp(0, max as isize) as usize;
        let mut effects = self.load_older_if_near_top();
        effects.extend(self.read_to_bottom());
        effects
    }

    fn enter(&mut self) -> Vec<Effect> {
        let line = self.editor.take();
        let line = line.trim();
        if line.is_empty() {
            return Vec::new();
        }
        if let Some(command) = line.strip_prefix('/') {
            return self.command(command);
        }
        let mut effects = self.stop_typing();
        let Some(room) = self.selected_room().map(|r| r.name.clone()) else {
            self.say("no room open: /join ROOM first", true);
            return effects;
        };
        let id = self.next_pending;
        self.next_pending += 1;
        self.pending.push(Pending { id, room: room.clone(), text: line.to_owned(), seq: None });
        // Sending brings the view back to the newest message.
        effects.extend(self.scroll_by(isize::MIN / 2));
        effects.push(Effect::Send { id, room, text: line.to_owned() });
        effects
    }

    fn command(&mut self, command: &str) -> Vec<Effect> {
        let mut words = command.split_whitespace();
        let verb = words.next().unwrap_or("");
        let arg = words.next().map(|w| w.trim_start_matches(['#', '@']).to_owned());
        let current = self.selected_room().map(|r| r.name.clone());
        match (verb, arg, current) {
            ("quit" | "q" | "exit", _, _) => self.quit = true,
            ("help" | "h" | "?", _, _) => self.show_help = !self.show_help,
            ("join" | "j", Some(room), _) => match self.rooms.iter().position(|r| r.name == room) {
                Some(i) => return self.select(i),
                None => return vec![Effect::Join { room }],
            },
            ("leave" | "part", None, Some(room)) | ("leave" | "part", Some(room), _) => {
                return vec![Effect::Leave { room }];
            }
            ("dm" | "msg", Some(user), _) => return vec![Effect::OpenDirect { user }],
            ("invite", Some(user), Some(room)) => return vec![Effect::Invite { room, user }],
            ("read", _, Some(_)) => return self.scroll_by(isize::MIN / 2),
            _ => self.say(format!("unknown command /{command}: /help lists them"), true),
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::client::RoomInfo;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn ctrl(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
    }

    fn message(room: &str, seq: u64, sender: &str, body: &str) -> Message {
        Message {
            room: room.into(),
            seq,
            ts_ms: 1_700_000_000_000 + seq * 1000,
            sender: sender.into(),
            body: body.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn update(room: &str, last_seq: u64, read_seq: u64, messages: std::ops::RangeInclusive<u64>) -> RoomUpdate {
        RoomUpdate {
            room: Some(RoomInfo { name: room.into(), last_seq, first_seq: 1, ..Default::default() }),
            read_seq,
            unread: last_seq - read_seq,
            mentions: 0,
            messages: messages.map(|s| message(room, s, "bob", &format!("m{s}"))).collect(),
            limited: false,
        }
    }

    /// A key's effects, without the activity ping the first key of a minute brings.
    fn press(chat: &mut Chat, code: KeyCode) -> Vec<Effect> {
        chat.on_key(key(code)).into_iter().filter(|e| *e != Effect::Activity).collect()
    }

    fn typed(chat: &mut Chat, text: &str) -> Vec<Effect> {
        text.chars().flat_map(|c| chat.on_key(key(KeyCode::Char(c)))).collect()
    }

    fn chat() -> Chat {
        let mut chat = Chat::new("alice".into(), "127.0.0.1:7401".into());
        chat.add_room(update("general", 40, 40, 11..=40));
        chat.add_room(update("random", 5, 2, 1..=5));
        chat
    }

    #[test]
    fn opening_a_room_reads_it_and_loads_what_it_lacks() {
        let mut chat = chat();
        assert_eq!(chat.rooms.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["general", "random"]);
        let effects = chat.select(1);
        assert_eq!(
            effects,
            [Effect::LoadMembers { room: "random".into() }, Effect::MarkRead { room: "random".into(), seq: 5 }]
        );
        assert_eq!((chat.rooms[1].unread, chat.rooms[1].older), (0, Older::Start), "its first message is loaded");
        let effects = chat.select(0);
        assert!(effects.contains(&Effect::LoadOlder { room: "general".into(), before: 11 }), "{effects:?}");
    }

    #[test]
    fn messages_elsewhere_count_as_unread_once_and_mentions_apart() {
        let mut chat = chat();
        chat.select(0);
        chat.on_event(SubscriptionEvent::Message(message("random", 6, "bob", "hi")));
        chat.on_event(SubscriptionEvent::Message(message("random", 7, "bob", "hey @alice, look")));
        chat.on_event(SubscriptionEvent::Message(message("random", 7, "bob", "hey @alice, look")));
        chat.on_event(SubscriptionEvent::Message(message("random", 8, "alice", "mine")));
        chat.on_event(SubscriptionEvent::Message(message("random", 9, "bob", "to @alicea")));
        let random = &chat.rooms[1];
        assert_eq!(
            (random.unread, random.mentions),
            (3 + 3, 1),
            "3 from the sync, 3 new; a delivery twice counts once"
        );
        // In the open room, at the bottom: read at once.
        let effects = chat.on_event(SubscriptionEvent::Message(message("general", 41, "bob", "x")));
        assert_eq!(effects, [Effect::MarkRead { room: "general".into(), seq: 41 }]);
        assert_eq!(chat.rooms[0].unread, 0);
        // Tab goes to the room with the mention.
        let effects = chat.on_key(key(KeyCode::Tab));
        assert_eq!(chat.selected, Some(1));
        assert!(effects.contains(&Effect::MarkRead { room: "random".into(), seq: 9 }), "{effects:?}");
    }

    #[test]
    fn mentions_follow_the_servers_rule() {
        assert!(mentions(b"@alice hi", "alice"));
        assert!(mentions(b"thanks @Alice.", "alice"));
        assert!(!mentions(b"ping @alice_b", "alice"));
        assert!(!mentions(b"alice@example.com", "alice"));
    }

    #[test]
    fn scrolling_up_pages_older_history_in_and_holds_the_view() {
        let mut chat = chat();
        chat.rows = 20;
        let effects = chat.select(0);
        assert!(effects.contains(&Effect::LoadOlder { room: "general".into(), before: 11 }), "{effects:?}");
        // The first page was asked for at once (30 loaded, under two screens).
        chat.history_loaded(
            "general",
            Ok(HistoryPage {
                room: "general".into(),
                messages: (1..=10).map(|s| message("general", s, "bob", "old")).collect(),
                last_seq: 40,
                first_seq: 1,
            }),
        );
        assert_eq!((chat.rooms[0].messages.len(), chat.rooms[0].older), (40, Older::Start));
        let effects = press(&mut chat, KeyCode::PageUp);
        assert!(effects.is_empty(), "nothing older to load: {effects:?}");
        assert_eq!(chat.rooms[0].scroll, 10);
        // A new message while scrolled up: the view stays, and it is unread.
        chat.on_event(SubscriptionEvent::Message(message("general", 41, "bob", "new")));
        assert_eq!((chat.rooms[0].scroll, chat.rooms[0].unread), (11, 1));
        let effects = press(&mut chat, KeyCode::Esc);
        assert_eq!(effects, [Effect::MarkRead { room: "general".into(), seq: 41 }]);
        assert_eq!(chat.rooms[0].scroll, 0);
    }

    #[test]
    fn a_failed_history_page_can_be_asked_for_again() {
        let mut chat = chat();
        chat.rows = 20;
        chat.select(0);
        assert_eq!(chat.rooms[0].older, Older::Loading);
        chat.history_loaded("general", Err("unavailable".into()));
        assert_eq!(chat.rooms[0].older, Older::More);
        assert!(chat.notice.as_ref().is_some_and(|n| n.error));
        let effects = press(&mut chat, KeyCode::PageUp);
        assert!(effects.contains(&Effect::LoadOlder { room: "general".into(), before: 11 }), "{effects:?}");
    }

    #[test]
    fn enter_sends_and_the_pending_line_goes_once_delivered() {
        let mut chat = chat();
        chat.select(0);
        let effects = typed(&mut chat, "hello");
        assert!(effects.contains(&Effect::Typing { room: "general".into(), typing: true }), "{effects:?}");
        assert_eq!(effects.iter().filter(|e| matches!(e, Effect::Typing { .. })).count(), 1, "said once, not per key");
        let effects = chat.on_key(key(KeyCode::Enter));
        assert!(effects.contains(&Effect::Typing { room: "general".into(), typing: false }), "{effects:?}");
        assert!(effects.contains(&Effect::Send { id: 1, room: "general".into(), text: "hello".into() }));
        assert_eq!(chat.pending.len(), 1);
        assert!(chat.editor.is_empty());
        chat.sent(1, Ok(41));
        assert_eq!(chat.pending[0].seq, Some(41), "shown until it is seen in the room");
        chat.on_event(SubscriptionEvent::Message(message("general", 41, "alice", "hello")));
        assert!(chat.pending.is_empty());
        // A failed send says so.
        typed(&mut chat, "again");
        chat.on_key(key(KeyCode::Enter));
        chat.sent(2, Err("not_member".into()));
        assert!(chat.pending.is_empty());
        assert!(chat.notice.as_ref().is_some_and(|n| n.error && n.text.contains("not sent")));
    }

    #[test]
    fn commands_join_leave_open_direct_rooms_and_quit() {
        let mut chat = chat();
        chat.select(0);
        typed(&mut chat, "/join #ops");
        assert_eq!(chat.on_key(key(KeyCode::Enter)), [Effect::Join { room: "ops".into() }]);
        typed(&mut chat, "/join random");
        let effects = chat.on_key(key(KeyCode::Enter));
        assert_eq!(chat.selected, Some(1), "a room already listed is opened: {effects:?}");
        typed(&mut chat, "/dm @bob");
        assert_eq!(chat.on_key(key(KeyCode::Enter)), [Effect::OpenDirect { user: "bob".into() }]);
        typed(&mut chat, "/invite carol");
        assert_eq!(chat.on_key(key(KeyCode::Enter)), [Effect::Invite { room: "random".into(), user: "carol".into() }]);
        typed(&mut chat, "/leave");
        assert_eq!(chat.on_key(key(KeyCode::Enter)), [Effect::Leave { room: "random".into() }]);
        chat.left("random");
        assert_eq!(chat.rooms.len(), 1);
        assert_eq!(chat.selected, Some(0));
        typed(&mut chat, "/bogus");
        chat.on_key(key(KeyCode::Enter));
        assert!(chat.notice.as_ref().is_some_and(|n| n.text.contains("unknown command")));
        assert!(!chat.quit);
        chat.on_key(ctrl('c'));
        assert!(chat.quit);
    }

    #[test]
    fn a_joined_direct_room_is_listed_after_the_others_and_opened() {
        let mut chat = chat();
        chat.select(1);
        let mut dm = update("dm:alice:bob", 1, 0, 1..=1);
        if let Some(info) = &mut dm.room {
            info.direct_users = vec!["alice".into(), "bob".into()];
        }
        dm.unread = 1;
        chat.joined(dm);
        assert_eq!(chat.rooms.iter().map(|r| r.label()).collect::<Vec<_>>(), ["#general", "#random", "@bob"]);
        assert_eq!(chat.selected, Some(2));
        assert_eq!(chat.rooms[2].unread, 0);
        let followed = chat.followed_rooms();
        assert_eq!(followed.get("dm:alice:bob"), Some(&1));
    }

    #[test]
    fn presence_watches_members_of_loaded_rooms_and_membership_events_update_them() {
        let mut chat = chat();
        chat.select(0);
        chat.members_loaded("general", Ok(vec!["alice".into(), "bob".into()]));
        assert_eq!(chat.watched_users().into_iter().collect::<Vec<_>>(), ["bob"]);
        let mut joined = message("general", 41, "carol", "");
        joined.kind = MessageKind::Joined as i32;
        chat.on_event(SubscriptionEvent::Message(joined));
        assert_eq!(chat.watched_users().into_iter().collect::<Vec<_>>(), ["bob", "carol"]);
        assert_eq!(chat.rooms[0].unread, 0, "a membership change is not an unread message");
        chat.on_event(SubscriptionEvent::Typing { room: "general".into(), users: vec!["alice".into(), "bob".into()] });
        assert_eq!(chat.rooms[0].typing, ["bob"], "one's own typing is not shown");
        chat.on_event(SubscriptionEvent::Resumed { node: "127.0.0.1:7402".into() });
        assert_eq!((chat.reconnects, chat.node.as_str()), (1, "127.0.0.1:7402"));
    }

    #[test]
    fn rooms_cycle_with_ctrl_n_and_ctrl_p() {
        let mut chat = chat();
        chat.select(0);
        chat.on_key(ctrl('n'));
        assert_eq!(chat.selected, Some(1));
        chat.on_key(ctrl('n'));
        assert_eq!(chat.selected, Some(0));
        chat.on_key(ctrl('p'));
        assert_eq!(chat.selected, Some(1));
    }
}
