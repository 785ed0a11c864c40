//! `chorus chat`: the full-screen terminal chat (ratatui on crossterm).
//!
//! One task owns everything: it draws [`model::Chat`] with [`view::draw`] and waits on the
//! terminal's events, the live subscription, the outcomes of requests it started, and a tick.
//! A key or an event updates the model, which answers with [`model::Effect`]s; each becomes a
//! request on a task of a bounded set, whose outcome comes back into the loop. Sends go through
//! one queue, one at a time, so a room gets the user's lines in the order typed, each with its
//! client_seq from the profile's send log (exactly once, across reconnects and restarts).
//!
//! The subscription follows every room of the user (up to the protocol's 256) and the presence
//! of the members of the rooms opened so far (up to 1000); when either set changes it is made
//! again from the cursors of the old one, so nothing is missed or repeated.

mod editor;
mod model;
mod view;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use chorus_client::settings::ProfileStore;
use chorus_client::{Client, ClientError, HistoryFrom, Subscription};
use chorus_proto::client::{MembershipState, RoomUpdate};
use crossterm::event::{Event, EventStream, KeyEventKind};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use model::{Chat, Effect, PAGE};

/// Newest messages per room in the first Sync.
const SYNC_MESSAGES: u32 = 30;
/// Requests in flight at once (history pages, members, marks...); further effects wait.
const MAX_TASKS: usize = 32;
/// Lines typed and not yet sent (the send queue).
const SEND_QUEUE: usize = 64;
/// How often read markers are flushed and notices expire.
const TICK: Duration = Duration::from_millis(500);

/// What a subscription follows: rooms (with the cursors it started from) and watched users.
type Followed = (BTreeMap<String, u64>, BTreeSet<String>);

/// What a finished request tells the model.
enum Outcome {
    History(String, Result<chorus_client::HistoryPage, String>),
    Members(String, Result<Vec<String>, String>),
    Joined(Result<RoomUpdate, String>),
    Left(String, Result<(), String>),
    Sent(u64, Result<u64, String>),
    Done(Result<String, String>),
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The room as a Sync lists it, for a room just joined or opened: its info and newest page.
async fn room_update(client: &Client, room: &str) -> Result<RoomUpdate, String> {
    let page = client.history(room, HistoryFrom::Before(u64::MAX), SYNC_MESSAGES, false).await.map_err(text)?;
    let mut after = String::new();
    // The room's info (for a direct room: its users) from the user's own room list.
    let info = loop {
        let list = client.list_rooms_of(&after, 200, true).await.map_err(text)?;
        if let Some(info) = list.rooms.iter().find(|r| r.name == room) {
            break Some(info.clone());
        }
        if !list.more || list.next_after.is_empty() {
            break None;
        }
        after = list.next_after;
    };
    let mut info = info.unwrap_or_else(|| chorus_client::RoomInfo { name: room.to_owned(), ..Default::default() });
    // The page's own newest seq, not the (later) list's: the subscription goes on from it, so
    // what was appended in between is delivered, not skipped.
    info.last_seq = page.last_seq;
    info.first_seq = page.first_seq;
    Ok(RoomUpdate {
        room: Some(info),
        read_seq: page.last_seq,
        unread: 0,
        mentions: 0,
        messages: page.messages,
        limited: false,
    })
}

async fn join(client: &Client, room: &str) -> Result<RoomUpdate, String> {
    crate::ensure_room(client, room, true).await.map_err(text)?;
    // Joining a room one is in already changes nothing (and says so).
    client.join(room).await.map_err(text)?;
    room_update(client, room).await
}

/// Runs the full-screen chat until the user quits. `open`: a room to open first (joined, and
/// created if need be).
pub async fn run(client: &Client, store: &ProfileStore, open: Option<&str>) -> anyhow::Result<()> {
    let me = client.user().context("not signed in")?;
    let node = client.current_node().await.unwrap_or_default();
    let mut chat = Chat::new(me, node);
    let catch = client.sync(&[], SYNC_MESSAGES).await.context("catching up (Sync)")?;
    for update in catch.rooms {
        chat.add_room(update);
    }
    let mut first = Vec::new();
    if let Some(room) = open {
        match chat.rooms.iter().position(|r| r.name == room) {
            Some(i) => first = chat.select(i),
            None => first = chat.joined(join(client, room).await.map_err(anyhow::Error::msg)?),
        }
    } else if !chat.rooms.is_empty() {
        first = chat.select(0);
    }

    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableBracketedPaste);
    let outcome = event_loop(client, store, &mut chat, &mut terminal, first).await;
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableBracketedPaste);
    ratatui::try_restore().context("restoring the terminal")?;
    outcome
}

async fn event_loop(
    client: &Client,
    store: &ProfileStore,
    chat: &mut Chat,
    terminal: &mut ratatui::DefaultTerminal,
    first: Vec<Effect>,
) -> anyhow::Result<()> {
    let mut keys = EventStream::new();
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut waiting: std::collections::VecDeque<Effect> = first.into();
    let (sends, send_queue) = mpsc::channel::<(u64, String, String)>(SEND_QUEUE);
    let (sent_tx, mut sent) = mpsc::channel::<Outcome>(SEND_QUEUE);
    let mut sender = tokio::spawn(send_in_order(client.clone(), store.clone(), send_queue, sent_tx));
    let mut marks: HashMap<String, u64> = HashMap::new();
    let mut subscription: Option<(Subscription, Followed)> = None;
    let mut retry_subscription_at = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    let result = loop {
        // Start what waits, within the bound.
        while tasks.len() < MAX_TASKS
            && let Some(effect) = waiting.pop_front()
        {
            match effect {
                Effect::MarkRead { room, seq } => {
                    let at = marks.entry(room).or_default();
                    *at = (*at).max(seq);
                }
                Effect::Send { id, room, text } => {
                    if sends.try_send((id, room, text)).is_err() {
                        chat.sent(id, Err("too many lines waiting to be sent".into()));
                    }
                }
                other => start(client, &mut tasks, other),
            }
        }
        // Follow what the model shows.
        let want = (chat.followed_rooms(), chat.watched_users());
        let current = subscription.as_ref().map(|(_, key)| key);
        let differs = current.is_none_or(|(rooms, users)| rooms.keys().ne(want.0.keys()) || *users != want.1);
        if differs && Instant::now() >= retry_subscription_at && !(want.0.is_empty() && want.1.is_empty()) {
            let mut cursors = want.0.clone();
            if let Some((old, _)) = &subscription {
                for (room, at) in old.cursors() {
                    if let Some(cursor) = cursors.get_mut(room) {
                        *cursor = (*cursor).max(*at);
                    }
                }
            }
            subscription = Some((client.subscribe_with(cursors, want.1.iter().cloned()), want));
        }
        terminal.draw(|frame| view::draw(frame, chat)).context("drawing")?;
        if chat.quit {
            break Ok(());
        }
        let effects = tokio::select! {
            event = keys.next() => match event {
                Some(Ok(Event::Key(key))) if key.kind != KeyEventKind::Release => chat.on_key(key),
                Some(Ok(Event::Paste(text))) => chat.on_paste(&text),
                Some(Ok(_)) => Vec::new(),
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("reading the terminal")),
                None => break Ok(()),
            },
            event = async {
                match &mut subscription {
                    Some((s, _)) => s.next().await,
                    None => std::future::pending().await,
                }
            } => match event {
                Ok(event) => chat.on_event(event),
                Err(e) => {
                    chat.say(format!("live updates stopped: {e}; retrying"), true);
                    subscription = None;
                    retry_subscription_at = Instant::now() + Duration::from_secs(2);
                    Vec::new()
                }
            },
            Some(done) = tasks.join_next() => match done {
                Ok(outcome) => apply(chat, outcome),
                Err(e) => {
                    chat.say(format!("a request failed: {e}"), true);
                    Vec::new()
                }
            },
            Some(outcome) = sent.recv() => apply(chat, outcome),
            _ = tick.tick() => {
                chat.tick(Instant::now());
                for (room, seq) in marks.drain() {
                    let client = client.clone();
                    tasks.spawn(async move {
                        Outcome::Done(client.mark_read(&room, seq, false, false).await.map(|_| String::new()).map_err(text))
                    });
                }
                Vec::new()
            }
        };
        waiting.extend(effects);
    };
    drop(sends);
    // Lines already queued are still sent (each is in the send log either way).
    if tokio::time::timeout(Duration::from_secs(5), &mut sender).await.is_err() {
        sender.abort();
    }
    tasks.abort_all();
    result
}

fn apply(chat: &mut Chat, outcome: Outcome) -> Vec<Effect> {
    match outcome {
        Outcome::History(room, page) => chat.history_loaded(&room, page),
        Outcome::Members(room, members) => {
            chat.members_loaded(&room, members);
            Vec::new()
        }
        Outcome::Joined(Ok(update)) => chat.joined(update),
        Outcome::Joined(Err(e)) | Outcome::Done(Err(e)) => {
            chat.say(e, true);
            Vec::new()
        }
        Outcome::Left(room, Ok(())) => {
            chat.left(&room);
            Vec::new()
        }
        Outcome::Left(room, Err(e)) => {
            chat.say(format!("leaving {room}: {e}"), true);
            Vec::new()
        }
        Outcome::Sent(id, result) => {
            chat.sent(id, result);
            Vec::new()
        }
        Outcome::Done(Ok(said)) => {
            if !said.is_empty() {
                chat.say(said, false);
            }
            Vec::new()
        }
    }
}

fn start(client: &Client, tasks: &mut JoinSet<Outcome>, effect: Effect) {
    let client = client.clone();
    tasks.spawn(async move {
        match effect {
            Effect::LoadOlder { room, before } => {
                let page = client.history(&room, HistoryFrom::Before(before), PAGE, false).await.map_err(text);
                Outcome::History(room, page)
            }
            Effect::LoadMembers { room } => {
                let members = client.all_members(&room).await.map_err(text).map(|members| {
                    members.into_iter().filter(|m| m.state == MembershipState::Joined as i32).map(|m| m.user).collect()
                });
                Outcome::Members(room, members)
            }
            Effect::Typing { room, typing } => {
                // Best effort: a lost "typing" shows nothing wrong.
                let _ = client.typing(&room, typing).await;
                Outcome::Done(Ok(String::new()))
            }
            Effect::Activity => {
                let _ = client.set_presence(false, None).await;
                Outcome::Done(Ok(String::new()))
            }
            Effect::Join { room } => Outcome::Joined(join(&client, &room).await),
            Effect::OpenDirect { user } => {
                let opened = client.open_direct(&user).await.map_err(text);
                Outcome::Joined(match opened {
                    Ok(direct) => room_update(&client, &direct.room).await,
                    Err(e) => Err(e),
                })
            }
            Effect::Leave { room } => {
                let left = client.leave(&room).await.map(|_| ()).map_err(text);
                Outcome::Left(room, left)
            }
            Effect::Invite { room, user } => Outcome::Done(
                client.invite(&room, &user).await.map(|_| format!("invited {user} to {room}")).map_err(text),
            ),
            // Handled by the loop itself.
            Effect::MarkRead { .. } | Effect::Send { .. } => Outcome::Done(Ok(String::new())),
        }
    });
}

/// Sends queued lines one at a time, in order, each with a client_seq from the send log.
async fn send_in_order(
    client: Client,
    store: ProfileStore,
    mut queue: mpsc::Receiver<(u64, String, String)>,
    outcomes: mpsc::Sender<Outcome>,
) {
    while let Some((id, room, body)) = queue.recv().await {
        let outcome = crate::send_joining(&client, &store, &room, body).await.map(|r| r.seq).map_err(|e| {
            if e.downcast_ref::<ClientError>().is_some_and(ClientError::indeterminate) {
                // The send log keeps its client_seq: the same line again is the same message.
                "it may or may not have been sent: send the same line again to find out (it will not appear twice)"
                    .to_owned()
            } else {
                format!("{e:#}")
            }
        });
        if outcomes.send(Outcome::Sent(id, outcome)).await.is_err() {
            return;
        }
    }
}
