//! Draws the terminal chat: rooms on the left (unread and mention counts), the open room's
//! messages in the middle (newest at the bottom, wrapped, scrolled by whole messages), its
//! members with their presence on the right, then who is typing, the input line and a status
//! bar (node, reconnects, the latest notice). Narrow terminals drop the side panes.

use chorus_client::Message;
use chorus_proto::client::{MessageKind, PresenceState};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};
use unicode_width::UnicodeWidthChar;

use super::model::{Chat, Older, RoomView};

const ROOMS_WIDTH: u16 = 24;
const MEMBERS_WIDTH: u16 = 24;
/// Below this width the members pane goes; below the second, the rooms pane too.
const MEMBERS_FROM: u16 = 90;
const ROOMS_FROM: u16 = 56;

pub const HELP: &[&str] = &[
    "Enter            send the line (or run a /command)",
    "Ctrl-N / Ctrl-P  next / previous room (also Alt-Down / Alt-Up)",
    "Tab              the next room with mentions or unread messages",
    "PageUp / PageDn  scroll (older history loads as you go); Esc: back to the newest",
    "Up / Down        input history;  Ctrl-A/E/U/K/W, Alt-B/F: editing",
    "/join ROOM       join (or create) a room and open it",
    "/leave [ROOM]    leave the open room (or ROOM)",
    "/dm USER         open the direct room with USER",
    "/invite USER     invite USER to the open room",
    "/quit, Ctrl-C    leave the chat",
];

/// A stable colour per user name, so that a speaker is recognisable down the pane.
fn user_color(user: &str) -> Color {
    const COLORS: [Color; 6] = [Color::Cyan, Color::Green, Color::Magenta, Color::Yellow, Color::Blue, Color::Red];
    let hash = user.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    COLORS[hash as usize % COLORS.len()]
}

fn clock(ts_ms: u64) -> String {
    let format = time::macros::format_description!("[hour]:[minute]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "--:--".into())
}

/// Splits `text` into pieces at most `width` columns wide, breaking after a space where one is
/// near enough.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut used = 0;
    let mut last_space: Option<(usize, usize)> = None; // byte index after the space, columns used then
    for c in text.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > width && !line.is_empty() {
            match last_space {
                Some((at, cols)) if cols * 2 >= width => {
                    let rest = line.split_off(at);
                    lines.push(std::mem::take(&mut line));
                    used -= cols;
                    line = rest;
                }
                _ => {
                    lines.push(std::mem::take(&mut line));
                    used = 0;
                }
            }
            last_space = None;
        }
        line.push(c);
        used += w;
        if c == ' ' {
            last_space = Some((line.len(), used));
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// A message as lines `width` columns wide: `HH:MM sender: body`, continuation lines indented.
fn message_lines(m: &Message, width: usize) -> Vec<Line<'static>> {
    let time = Span::styled(format!("{} ", clock(m.ts_ms)), Style::new().fg(Color::DarkGray));
    let kind = MessageKind::try_from(m.kind).unwrap_or(MessageKind::Text);
    if kind != MessageKind::Text {
        let text = crate::describe_event(m).unwrap_or_default();
        let style = Style::new().fg(Color::DarkGray).add_modifier(Modifier::ITALIC);
        return wrap(&format!("-- {text} --"), width.saturating_sub(6))
            .into_iter()
            .enumerate()
            .map(|(i, piece)| {
                let lead = if i == 0 { time.clone() } else { Span::raw("      ") };
                Line::from(vec![lead, Span::styled(piece, style)])
            })
            .collect();
    }
    let body = String::from_utf8_lossy(&m.body);
    let sender = format!("{}: ", m.sender);
    let first = format!("{sender}{body}");
    let mut out = Vec::new();
    for (i, piece) in wrap(&first, width.saturating_sub(6)).into_iter().enumerate() {
        if i == 0 {
            let (name, rest) = piece.split_at(sender.len().min(piece.len()));
            let style = Style::new().fg(user_color(&m.sender)).add_modifier(Modifier::BOLD);
            out.push(Line::from(vec![time.clone(), Span::styled(name.to_owned(), style), Span::raw(rest.to_owned())]));
        } else {
            out.push(Line::from(vec![Span::raw("      "), Span::raw(piece)]));
        }
    }
    out
}

fn room_title(room: &RoomView) -> String {
    let mut title = room.label();
    if let Some(members) = &room.members {
        title.push_str(&format!(" · {} members", members.len()));
    }
    if room.scroll > 0 {
        title.push_str(&format!(" · {} newer below (Esc)", room.scroll));
    }
    title
}

/// The message pane's lines, the newest at the bottom, at most `rows` of them.
fn pane_lines(chat: &Chat, room: &RoomView, width: usize, rows: usize) -> Vec<Line<'static>> {
    let mut lines: Vec<Line<'static>> = Vec::new();
    if room.scroll == 0 {
        for p in chat.pending.iter().filter(|p| p.room == room.name).rev() {
            let style = Style::new().fg(Color::DarkGray);
            let text = format!("{}: {} (sending...)", chat.me, p.text);
            for piece in wrap(&text, width.saturating_sub(6)).into_iter().rev() {
                lines.push(Line::from(vec![Span::raw("      "), Span::styled(piece, style)]));
            }
        }
    }
    let mut shown_all = true;
    for m in room.messages.values().rev().skip(room.scroll) {
        if lines.len() >= rows {
            shown_all = false;
            break;
        }
        lines.extend(message_lines(m, width).into_iter().rev());
    }
    if shown_all && lines.len() < rows {
        let (text, style) = match room.older {
            Older::Start => (format!("-- the start of {} --", room.label()), Style::new().fg(Color::DarkGray)),
            Older::Loading => ("loading older messages...".to_owned(), Style::new().fg(Color::Yellow)),
            Older::More => ("PageUp for older messages".to_owned(), Style::new().fg(Color::DarkGray)),
        };
        lines.push(Line::styled(text, style));
    }
    lines.truncate(rows);
    lines.reverse();
    lines
}

fn presence_rank(chat: &Chat, user: &str) -> (u8, &'static str, Color) {
    match chat.presence.get(user).map(|p| PresenceState::try_from(p.state).unwrap_or(PresenceState::Offline)) {
        Some(PresenceState::Online) => (0, "●", Color::Green),
        Some(PresenceState::Idle) => (1, "◐", Color::Yellow),
        _ => (2, "○", Color::DarkGray),
    }
}

fn typing_line(room: Option<&RoomView>) -> String {
    let Some(room) = room else { return String::new() };
    match room.typing.as_slice() {
        [] => String::new(),
        [one] => format!("{one} is typing..."),
        [a, b] => format!("{a} and {b} are typing..."),
        [a, b, c] => format!("{a}, {b} and {c} are typing..."),
        _ => "several people are typing...".into(),
    }
}

pub fn draw(frame: &mut Frame, chat: &mut Chat) {
    let area = frame.area();
    let [main, typing, input, status] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1), Constraint::Length(3), Constraint::Length(1)])
            .areas(area);
    let rooms_width = if area.width >= ROOMS_FROM { ROOMS_WIDTH } else { 0 };
    let members_width = if area.width >= MEMBERS_FROM { MEMBERS_WIDTH } else { 0 };
    let [rooms_area, messages_area, members_area] =
        Layout::horizontal([Constraint::Length(rooms_width), Constraint::Min(10), Constraint::Length(members_width)])
            .areas(main);
    chat.rows = messages_area.height.saturating_sub(2) as usize;
    if rooms_width > 0 {
        draw_rooms(frame, chat, rooms_area);
    }
    draw_messages(frame, chat, messages_area);
    if members_width > 0 {
        draw_members(frame, chat, members_area);
    }
    frame.render_widget(
        Paragraph::new(typing_line(chat.selected_room()))
            .style(Style::new().fg(Color::DarkGray).add_modifier(Modifier::ITALIC)),
        typing,
    );
    draw_input(frame, chat, input);
    draw_status(frame, chat, status);
}

fn draw_rooms(frame: &mut Frame, chat: &Chat, area: Rect) {
    let inner = area.width.saturating_sub(2) as usize;
    let lines: Vec<Line> = chat
        .rooms
        .iter()
        .enumerate()
        .map(|(i, room)| {
            let count = if room.mentions > 0 {
                format!("@{}", room.mentions)
            } else if room.unread > 0 {
                room.unread.to_string()
            } else {
                String::new()
            };
            let label: String = room.label().chars().take(inner.saturating_sub(count.len() + 1)).collect();
            let pad = inner.saturating_sub(label.chars().count() + count.len());
            let mut style = Style::new();
            if room.unread > 0 {
                style = style.add_modifier(Modifier::BOLD);
            }
            if chat.selected == Some(i) {
                style = style.add_modifier(Modifier::REVERSED);
            }
            let count_style = if room.mentions > 0 { style.fg(Color::Red) } else { style };
            Line::from(vec![
                Span::styled(format!("{label}{}", " ".repeat(pad)), style),
                Span::styled(count, count_style),
            ])
        })
        .collect();
    let lines = if lines.is_empty() { vec![Line::raw("no rooms: /join ROOM")] } else { lines };
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title("Rooms")), area);
}

fn draw_messages(frame: &mut Frame, chat: &Chat, area: Rect) {
    let (width, rows) = (area.width.saturating_sub(2) as usize, area.height.saturating_sub(2) as usize);
    if chat.show_help || chat.selected_room().is_none() {
        let mut lines: Vec<Line> = HELP.iter().map(|l| Line::raw(*l)).collect();
        if chat.rooms.is_empty() {
            lines.insert(0, Line::raw("You are in no room yet: type /join ROOM to join or create one."));
            lines.insert(1, Line::raw(""));
        }
        frame.render_widget(Paragraph::new(lines).block(Block::bordered().title("Help (Esc closes)")), area);
        return;
    }
    let Some(room) = chat.selected_room() else { return };
    let lines = pane_lines(chat, room, width, rows);
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title(room_title(room))), area);
}

fn draw_members(frame: &mut Frame, chat: &Chat, area: Rect) {
    let Some(room) = chat.selected_room() else {
        frame.render_widget(Block::bordered().title("Members"), area);
        return;
    };
    let lines: Vec<Line> = match &room.members {
        None => vec![Line::styled("loading...", Style::new().fg(Color::DarkGray))],
        Some(members) => {
            let mut sorted: Vec<(u8, &'static str, Color, &String)> = members
                .iter()
                .map(|m| {
                    let (rank, mark, color) =
                        if *m == chat.me { (0, "●", Color::Green) } else { presence_rank(chat, m) };
                    (rank, mark, color, m)
                })
                .collect();
            sorted.sort_by(|a, b| (a.0, a.3).cmp(&(b.0, b.3)));
            sorted
                .into_iter()
                .map(|(_, mark, color, user)| {
                    let status = chat.presence.get(user.as_str()).map(|p| p.status_text.as_str()).unwrap_or("");
                    let mut spans =
                        vec![Span::styled(format!("{mark} "), Style::new().fg(color)), Span::raw(user.clone())];
                    if !status.is_empty() {
                        spans.push(Span::styled(format!(" {status}"), Style::new().fg(Color::DarkGray)));
                    }
                    Line::from(spans)
                })
                .collect()
        }
    };
    frame.render_widget(Paragraph::new(lines).block(Block::bordered().title("Members")), area);
}

fn draw_input(frame: &mut Frame, chat: &Chat, area: Rect) {
    let title = match chat.selected_room() {
        Some(room) => format!("Message {}", room.label()),
        None => "Type /join ROOM".into(),
    };
    let inner = area.width.saturating_sub(2) as usize;
    let column = chat.editor.cursor_column();
    // Scrolled sideways so that the cursor stays in view.
    let offset = column.saturating_sub(inner.saturating_sub(1));
    frame.render_widget(
        Paragraph::new(chat.editor.text()).scroll((0, offset as u16)).block(Block::bordered().title(title)),
        area,
    );
    let x = area.x.saturating_add(1).saturating_add((column - offset) as u16);
    frame.set_cursor_position((x, area.y.saturating_add(1)));
}

fn draw_status(frame: &mut Frame, chat: &Chat, area: Rect) {
    let mut spans = vec![
        Span::styled(format!(" {} ", chat.me), Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!("· node {} · reconnects {} ", chat.node, chat.reconnects)),
    ];
    match &chat.notice {
        Some(n) => {
            let style = if n.error { Style::new().fg(Color::Red) } else { Style::new().fg(Color::Yellow) };
            spans.push(Span::styled(format!("· {}", n.text), style));
        }
        None => spans.push(Span::styled("· /help for keys and commands", Style::new().fg(Color::DarkGray))),
    }
    frame.render_widget(Paragraph::new(Line::from(spans)).style(Style::new().bg(Color::Black)), area);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_proto::client::{RoomInfo, RoomUpdate, UserPresence};
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn message(room: &str, seq: u64, sender: &str, body: &str) -> Message {
        Message {
            room: room.into(),
            seq,
            ts_ms: 1_700_000_000_000 + seq * 60_000,
            sender: sender.into(),
            body: body.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn room(name: &str, last_seq: u64, unread: u64, mentions: u64, messages: Vec<Message>) -> RoomUpdate {
        RoomUpdate {
            room: Some(RoomInfo { name: name.into(), last_seq, first_seq: 1, ..Default::default() }),
            read_seq: last_seq - unread,
            unread,
            mentions,
            messages,
            limited: false,
        }
    }

    fn screen(chat: &mut Chat, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, chat)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height).map(|y| (0..width).map(|x| buffer[(x, y)].symbol().to_string()).collect::<String>()).collect()
    }

    fn sample() -> Chat {
        let mut chat = Chat::new("alice".into(), "127.0.0.1:7401".into());
        let general: Vec<Message> =
            (1..=3).map(|s| message("general", s, "bob", &format!("hello number {s}"))).collect();
        chat.add_room(room("general", 3, 0, 0, general));
        chat.add_room(room("random", 9, 4, 2, vec![message("random", 9, "carol", "hey @alice")]));
        chat.select(0);
        chat.members_loaded("general", Ok(vec!["alice".into(), "bob".into(), "carol".into()]));
        chat.on_event(chorus_client::SubscriptionEvent::Presence(vec![
            UserPresence { user: "bob".into(), state: PresenceState::Online as i32, ..Default::default() },
            UserPresence {
                user: "carol".into(),
                state: PresenceState::Idle as i32,
                status_text: "lunch".into(),
                ..Default::default()
            },
        ]));
        chat
    }

    #[test]
    fn the_screen_shows_rooms_with_counts_messages_members_typing_and_status() {
        let mut chat = sample();
        chat.on_event(chorus_client::SubscriptionEvent::Typing { room: "general".into(), users: vec!["bob".into()] });
        let lines = screen(&mut chat, 110, 16);
        let text = lines.join("\n");
        assert!(lines[1].contains("#general") && lines[2].contains("#random") && lines[2].contains("@2"), "{text}");
        assert!(lines[0].contains("#general · 3 members"), "{text}");
        let hello = lines.iter().position(|l| l.contains("bob: hello number 3")).expect(&text);
        assert!(lines[hello - 1].contains("bob: hello number 2"), "newest at the bottom: {text}");
        assert!(text.contains("-- the start of #general --"), "{text}");
        assert!(text.contains("● alice") && text.contains("● bob") && text.contains("◐ carol lunch"), "{text}");
        assert!(text.contains("bob is typing..."), "{text}");
        assert!(text.contains("Message #general"), "{text}");
        assert!(lines[15].contains("alice") && lines[15].contains("node 127.0.0.1:7401 · reconnects 0"), "{text}");
    }

    #[test]
    fn pending_sends_show_until_delivered_and_the_cursor_follows_the_input() {
        let mut chat = sample();
        for c in "on my way".chars() {
            chat.on_key(crossterm::event::KeyEvent::from(crossterm::event::KeyCode::Char(c)));
        }
        let text = screen(&mut chat, 110, 16).join("\n");
        assert!(text.contains("│on my way"), "{text}");
        chat.on_key(crossterm::event::KeyEvent::from(crossterm::event::KeyCode::Enter));
        let text = screen(&mut chat, 110, 16).join("\n");
        assert!(text.contains("alice: on my way (sending...)"), "{text}");
        chat.sent(1, Ok(4));
        chat.on_event(chorus_client::SubscriptionEvent::Message(message("general", 4, "alice", "on my way")));
        let text = screen(&mut chat, 110, 16).join("\n");
        assert!(text.contains("alice: on my way") && !text.contains("(sending...)"), "{text}");
    }

    #[test]
    fn a_narrow_terminal_keeps_the_messages_and_drops_the_side_panes() {
        let mut chat = sample();
        let text = screen(&mut chat, 50, 12).join("\n");
        assert!(text.contains("bob: hello number 3") && !text.contains("Members") && !text.contains("Rooms"), "{text}");
    }

    #[test]
    fn scrolled_up_the_title_says_how_much_is_below_and_long_lines_wrap() {
        let mut chat = sample();
        let long = "word ".repeat(30);
        chat.on_event(chorus_client::SubscriptionEvent::Message(message("general", 4, "bob", &long)));
        let lines = screen(&mut chat, 110, 16);
        assert!(lines.iter().filter(|l| l.contains("word word")).count() >= 2, "{}", lines.join("\n"));
        chat.on_key(crossterm::event::KeyEvent::from(crossterm::event::KeyCode::PageUp));
        let text = screen(&mut chat, 110, 16).join("\n");
        assert!(text.contains("newer below (Esc)") && !text.contains("word word"), "{text}");
    }

    #[test]
    fn wrapping_breaks_at_spaces_and_never_exceeds_the_width() {
        assert_eq!(wrap("hello big world", 10), ["hello big ", "world"]);
        assert_eq!(wrap("abcdefghijkl", 5), ["abcde", "fghij", "kl"]);
        assert_eq!(wrap("", 5), [""]);
        assert!(wrap("日本語のテキスト", 5).iter().all(|l| unicode_width::UnicodeWidthStr::width(l.as_str()) <= 5));
    }

    #[test]
    fn with_no_rooms_the_pane_says_how_to_join_one() {
        let mut chat = Chat::new("alice".into(), "n1".into());
        let text = screen(&mut chat, 110, 16).join("\n");
        assert!(text.contains("/join ROOM"), "{text}");
    }
}
