//! The history of a chaos run: one JSON object per line, written as operations complete.
//!
//! Times are nanoseconds on one monotonic clock since the run started. Message bodies are
//! unique per run (`w<process>-<client_seq>`), so a body identifies its send. A room's
//! membership events are entries of its sequence too; they are recorded as their text
//! ([`entry_text`]), which starts with [`EVENT_PREFIX`] and so never looks like a body.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;

use chorus_proto::client::{Message, MessageKind};
use serde::{Deserialize, Serialize};

/// The user name writer `process` signs in as (its bodies are `w<process>-<client_seq>`).
pub fn writer_name(process: impl std::fmt::Display) -> String {
    format!("writer{process}")
}

/// The user the catch-up process signs in as; writers mention them (`@catcher`) in some
/// messages.
pub const CATCHER: &str = "catcher";

/// Recorded membership events start with this; message bodies never do.
pub const EVENT_PREFIX: &str = "!";

/// How an entry of a room's sequence is recorded: a message by its body; a membership event
/// as `!joined <user>`, `!left <user>`, `!kicked <user> by <user>`, `!banned <user> by <user>`,
/// and so on.
pub fn entry_text(m: &Message) -> String {
    let kind = MessageKind::try_from(m.kind).unwrap_or(MessageKind::Text);
    match kind {
        MessageKind::Text => String::from_utf8_lossy(&m.body).into_owned(),
        MessageKind::Joined => format!("{EVENT_PREFIX}joined {}", m.sender),
        MessageKind::Left => format!("{EVENT_PREFIX}left {}", m.sender),
        MessageKind::Kicked => format!("{EVENT_PREFIX}kicked {} by {}", m.target, m.sender),
        MessageKind::Banned => format!("{EVENT_PREFIX}banned {} by {}", m.target, m.sender),
        other => format!(
            "{EVENT_PREFIX}{} {} by {}",
            other.as_str_name().trim_start_matches("MESSAGE_KIND_").to_lowercase(),
            m.target,
            m.sender
        ),
    }
}

/// The outcome of a send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SendOutcome {
    /// Acknowledged: committed with this sequence number.
    Ok { seq: u64, duplicate: bool },
    /// Definitely not appended.
    Fail { code: String, message: String },
    /// Unknown (timeout, connection lost): it may or may not have been appended.
    Info { code: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReadOutcome {
    /// The newest messages of the room (oldest first), and the room's last seq.
    Ok {
        last_seq: u64,
        messages: Vec<(u64, String)>,
    },
    Fail {
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// One send: invoked, then completed with an outcome.
    Send {
        process: u64,
        room: String,
        client_id: String,
        client_seq: u64,
        body: String,
        invoke_ns: u64,
        complete_ns: u64,
        outcome: SendOutcome,
    },
    /// A linearizable read of a room's newest messages.
    Read { process: u64, room: String, invoke_ns: u64, complete_ns: u64, outcome: ReadOutcome },
    /// Everything one subscriber received for one room, in order, from after `after`.
    Subscription {
        process: u64,
        room: String,
        after: u64,
        started_ns: u64,
        ended_ns: u64,
        received: Vec<(u64, String)>,
        /// When each of `received` arrived (same order).
        #[serde(default)]
        received_ns: Vec<u64>,
        resumes: u64,
        /// Which node the subscription was on from when: where it started, then each resume.
        #[serde(default)]
        nodes: Vec<(u64, String)>,
        error: Option<String>,
    },
    /// What the catcher (a user who reads and catches up) saw of one room: its read marker
    /// after a MarkRead (`op` "mark", `last_seq` 0: not known), or a Sync's update of the room
    /// (`op` "sync"), with the room's last seq and the counts.
    CatchUp {
        process: u64,
        room: String,
        op: String,
        invoke_ns: u64,
        complete_ns: u64,
        read_seq: u64,
        last_seq: u64,
        unread: u64,
        mentions: u64,
    },
    /// A fault injected (or healed) by the nemesis.
    Nemesis { at_ns: u64, action: String, nodes: Vec<u64>, detail: String },
    /// A room's full history read at the end from one node (`linearizable`: through the
    /// leader; otherwise that node's own replica).
    FinalRead {
        node: u64,
        room: String,
        linearizable: bool,
        messages: Option<Vec<(u64, String)>>,
        error: Option<String>,
    },
}

/// Appends records to a JSON-lines file; shared by every task of a run.
pub struct HistoryWriter {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl HistoryWriter {
    pub fn create(path: &Path) -> std::io::Result<HistoryWriter> {
        Ok(HistoryWriter { out: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)) })
    }

    pub fn record(&self, record: &Record) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A record that cannot be written makes the run unverifiable: fail loudly.
        serde_json::to_writer(&mut *out, record).expect("history records serialize");
        out.write_all(b"\n").expect("writing the history file");
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// Reads a history file.
pub fn read(path: &Path) -> std::io::Result<Vec<Record>> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut records = Vec::new();
    for (i, line) in file.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}:{}: {e}", path.display(), i + 1))
        })?;
        records.push(record);
    }
    Ok(records)
}
