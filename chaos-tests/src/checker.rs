//! The history checker. It reads only the history (operations, nemesis events, final reads)
//! and reports every violation of Chorus's guarantees, with counts and the first examples:
//!
//! 1. `lost_ack`: an acknowledged send is missing from the final history;
//!    `acked_seq_mismatch`: it is there, but not at the sequence number it was acknowledged with.
//! 2. `duplicate`: a message appears more than once.
//! 3. `phantom`: a message no client attempted; `failed_but_present`: a message whose send
//!    definitely failed.
//! 4. `divergence`: a node's history of a room differs from the final order; `not_dense`: the
//!    final order is not numbered 1, 2, 3, …; `final_read_failed`: a node could not be read.
//! 5. `real_time_order`: send A completed before send B was invoked (same room), yet
//!    seq(A) > seq(B).
//! 6. `stale_read`: a linearizable read missed a send acknowledged before it was invoked;
//!    `read_mismatch`: it returned something that is not part of the final order.
//! 7. `subscription_gap`, `subscription_duplicate`, `subscription_mismatch`: a subscriber's
//!    stream is not the contiguous run of the final order after its cursor;
//!    `subscription_error`: a subscription ended with an error instead of resuming.
//!
//! 9. `subscription_stalled` (progress): every subscriber running at the time receives each
//!    acknowledged message of its rooms within [`PROGRESS_BOUND`] of the acknowledgement —
//!    while a partition holds and after it heals, whichever node the subscriber was on. (A
//!    feed on a node cut off from its shard's leader once went silent for good.)
//!
//! 8. `sent_while_not_member`: in a room's order, a message of a writer who was not a member
//!    at that point: after their kick (and before they joined again), or before they joined.
//!    Kicks and joins are entries of the room's sequence, so this is the order the state
//!    machine authorized sends in.
//!
//! 10. `read_marker_backward`: the catcher (who never marks unread) saw its read marker of a
//!     room move back, in a MarkRead's answer or a Sync's.
//! 11. `sync_count_mismatch`: a Sync's unread or mention count of a room is not the number of
//!     messages (mentioning the catcher) in the final order after the marker, up to the room's
//!     last seq as that Sync saw it.
//!
//! Also `node_crashed` (a node exited without being killed) and `nemesis_error` (a fault could
//! not be injected, so the run did not test what it claims).
//!
//! Indeterminate sends may be present or absent, but at most once.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::history::{CATCHER, EVENT_PREFIX, ReadOutcome, Record, SendOutcome, writer_name};

const EXAMPLES: usize = 5;

/// How long after its acknowledgement a message may take to reach every running subscriber:
/// failure detection (a cut-off replica says so after twice the election timeout, a silent
/// connection is dropped after two keep-alives), a resubscription elsewhere, and catch-up.
pub const PROGRESS_BOUND_NS: u64 = 10_000_000_000;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Anomalies {
    pub count: u64,
    pub examples: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub sends: u64,
    pub acked: u64,
    pub failed: u64,
    pub indeterminate: u64,
    pub indeterminate_present: u64,
    pub reads: u64,
    pub reads_ok: u64,
    pub subscriptions: u64,
    pub subscription_messages: u64,
    pub subscription_resumes: u64,
    pub rooms: u64,
    pub final_messages: u64,
    /// Kicks in the final history.
    pub kicks: u64,
    /// Read markers and Sync room updates the catcher recorded.
    pub catch_ups: u64,
    pub faults: BTreeMap<String, u64>,
    pub anomalies: BTreeMap<String, Anomalies>,
}

impl Report {
    pub fn valid(&self) -> bool {
        self.anomalies.values().all(|a| a.count == 0)
    }

    fn flag(&mut self, property: &str, example: impl FnOnce() -> String) {
        let entry = self.anomalies.entry(property.to_owned()).or_default();
        entry.count += 1;
        if entry.examples.len() < EXAMPLES {
            entry.examples.push(example());
        }
    }

    /// A readable summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "sends: {} ({} acknowledged, {} failed, {} indeterminate of which {} were applied)\n",
            self.sends, self.acked, self.failed, self.indeterminate, self.indeterminate_present
        ));
        s.push_str(&format!("linearizable reads: {} ({} answered)\n", self.reads, self.reads_ok));
        s.push_str(&format!(
            "subscriptions: {} streams, {} messages received, {} resumes after failures\n",
            self.subscriptions, self.subscription_messages, self.subscription_resumes
        ));
        s.push_str(&format!(
            "final history: {} rooms, {} entries ({} kicks)\n",
            self.rooms, self.final_messages, self.kicks
        ));
        s.push_str(&format!("catch-up: {} markers and Sync room updates checked\n", self.catch_ups));
        let faults: Vec<String> = self.faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
        s.push_str(&format!("faults: {}\n", if faults.is_empty() { "none".into() } else { faults.join(", ") }));
        if self.valid() {
            s.push_str("anomalies: none\n");
        } else {
            s.push_str("ANOMALIES:\n");
            for (property, a) in self.anomalies.iter().filter(|(_, a)| a.count > 0) {
                s.push_str(&format!("  {property}: {}\n", a.count));
                for e in &a.examples {
                    s.push_str(&format!("    - {e}\n"));
                }
            }
        }
        s
    }
}

/// 10-11: what the catcher saw of its read markers and counts.
fn check_catch_up(records: &[Record], finals: &BTreeMap<&str, &Vec<(u64, String)>>, report: &mut Report) {
    let mention = format!("@{CATCHER}");
    // Per process and room, in completion order (each catcher is one sequential process).
    let mut markers: BTreeMap<(u64, &str), (u64, u64)> = BTreeMap::new();
    let mut observations: Vec<&Record> = records.iter().filter(|r| matches!(r, Record::CatchUp { .. })).collect();
    observations.sort_by_key(|r| match r {
        Record::CatchUp { complete_ns, .. } => *complete_ns,
        _ => 0,
    });
    for record in observations {
        let Record::CatchUp { process, room, op, complete_ns, read_seq, last_seq, unread, mentions, .. } = record
        else {
            continue;
        };
        report.catch_ups += 1;
        if let Some((before, at)) = markers.insert((*process, room), (*read_seq, *complete_ns))
            && *read_seq < before
        {
            report.flag("read_marker_backward", || {
                format!(
                    "process {process}, {room:?}: marker {before} at {:.1} s, then {read_seq} ({op}) at {:.1} s",
                    at as f64 / 1e9,
                    *complete_ns as f64 / 1e9
                )
            });
        }
        if op != "sync" {
            continue;
        }
        let Some(order) = finals.get(room.as_str()) else { continue };
        let after_marker =
            order.iter().filter(|(seq, text)| *seq > *read_seq && *seq <= *last_seq && !text.starts_with(EVENT_PREFIX));
        let (expected_unread, expected_mentions) =
            after_marker.fold((0u64, 0u64), |(u, m), (_, text)| (u + 1, m + u64::from(text.contains(&mention))));
        if (*unread, *mentions) != (expected_unread, expected_mentions) {
            report.flag("sync_count_mismatch", || {
                format!(
                    "process {process}, {room:?} at {:.1} s: marker {read_seq}, last seq {last_seq}: {unread} unread and \
                     {mentions} mentions, but the history has {expected_unread} and {expected_mentions}",
                    *complete_ns as f64 / 1e9
                )
            });
        }
    }
}

struct SendInfo<'a> {
    room: &'a str,
    invoke_ns: u64,
    complete_ns: u64,
    outcome: &'a SendOutcome,
}

/// Checks a whole history (see the module docs).
pub fn check(records: &[Record]) -> Report {
    let mut report = Report::default();
    let mut sends: HashMap<&str, SendInfo> = HashMap::new();
    for record in records {
        match record {
            Record::Send { room, body, invoke_ns, complete_ns, outcome, .. } => {
                report.sends += 1;
                match outcome {
                    SendOutcome::Ok { .. } => report.acked += 1,
                    SendOutcome::Fail { .. } => report.failed += 1,
                    SendOutcome::Info { .. } => report.indeterminate += 1,
                }
                if sends
                    .insert(body, SendInfo { room, invoke_ns: *invoke_ns, complete_ns: *complete_ns, outcome })
                    .is_some()
                {
                    report.flag("history_error", || format!("body {body:?} was sent twice: bodies must be unique"));
                }
            }
            Record::Nemesis { action, nodes, detail, .. } => match action.as_str() {
                "heal" | "restart" | "resume" => {}
                "crash" => report.flag("node_crashed", || format!("node {nodes:?}: {detail}")),
                "error" => report.flag("nemesis_error", || detail.clone()),
                _ => *report.faults.entry(action.clone()).or_default() += 1,
            },
            _ => {}
        }
    }

    // The final order of every room: the linearizable final read.
    let mut finals: BTreeMap<&str, &Vec<(u64, String)>> = BTreeMap::new();
    for record in records {
        if let Record::FinalRead { room, linearizable: true, messages, error, .. } = record {
            match messages {
                Some(m) => {
                    finals.insert(room, m);
                }
                None => report.flag("final_read_failed", || {
                    format!("linearizable final read of {room:?} failed: {}", error.clone().unwrap_or_default())
                }),
            }
        }
    }
    let rooms_with_sends: HashSet<&str> = sends.values().map(|s| s.room).collect();
    for room in &rooms_with_sends {
        if !finals.contains_key(room) {
            report.flag("final_read_failed", || format!("no linearizable final read of {room:?}"));
        }
    }
    report.rooms = finals.len() as u64;

    // 4: dense numbering, and every node agrees.
    for (room, messages) in &finals {
        report.final_messages += messages.len() as u64;
        if let Some((i, (seq, _))) = messages.iter().enumerate().find(|(i, (seq, _))| *seq != *i as u64 + 1) {
            report.flag("not_dense", || format!("{room:?}: position {} holds seq {seq}", i + 1));
        }
    }
    for record in records {
        if let Record::FinalRead { node, room, linearizable: false, messages, error } = record {
            match (messages, finals.get(room.as_str())) {
                (None, _) => report.flag("final_read_failed", || {
                    format!("node {node}: reading {room:?} failed: {}", error.clone().unwrap_or_default())
                }),
                (Some(local), Some(expected)) if local != *expected => report.flag("divergence", || {
                    let at = local.iter().zip(expected.iter()).position(|(a, b)| a != b).unwrap_or(local.len().min(expected.len()));
                    format!(
                        "node {node}, room {room:?}: {} messages vs {} in the final order, first difference at position {}",
                        local.len(),
                        expected.len(),
                        at + 1
                    )
                }),
                _ => {}
            }
        }
    }

    // 1-3: acknowledged sends present once at their seq; nothing else present.
    let mut position: HashMap<&str, (&str, u64)> = HashMap::new();
    for (room, messages) in &finals {
        for (seq, body) in messages.iter().filter(|(_, body)| !body.starts_with(EVENT_PREFIX)) {
            if let Some((other_room, other_seq)) = position.insert(body.as_str(), (room, *seq)) {
                report.flag("duplicate", || {
                    format!("{body:?} appears as {other_room:?} #{other_seq} and {room:?} #{seq}")
                });
            }
            match sends.get(body.as_str()) {
                None => report.flag("phantom", || format!("{room:?} #{seq} = {body:?}, which no client sent")),
                Some(s) if s.room != *room => {
                    report.flag("phantom", || format!("{body:?} was sent to {:?} but appears in {room:?}", s.room))
                }
                Some(SendInfo { outcome: SendOutcome::Fail { code, .. }, .. }) => report
                    .flag("failed_but_present", || {
                        format!("{room:?} #{seq} = {body:?}, whose send failed definitely ({code})")
                    }),
                Some(SendInfo { outcome: SendOutcome::Info { .. }, .. }) => report.indeterminate_present += 1,
                Some(_) => {}
            }
        }
    }
    for (body, s) in &sends {
        if let SendOutcome::Ok { seq, .. } = s.outcome {
            match position.get(body) {
                None if finals.contains_key(s.room) => {
                    report.flag("lost_ack", || format!("{body:?} acknowledged as {:?} #{seq} is missing", s.room))
                }
                Some((_, actual)) if actual != seq => report.flag("acked_seq_mismatch", || {
                    format!("{body:?} acknowledged as #{seq} is at #{actual} in {:?}", s.room)
                }),
                _ => {}
            }
        }
    }

    // 5: real-time order, per room. A: acknowledged, completed before B was invoked.
    // Per room: acknowledged sends as (completed at, seq), and present sends as
    // (invoked at, seq, body).
    type Acked = Vec<(u64, u64)>;
    type Present<'a> = Vec<(u64, u64, &'a str)>;
    let mut per_room: BTreeMap<&str, (Acked, Present)> = BTreeMap::new();
    for (body, s) in &sends {
        let Some((_, seq)) = position.get(body) else { continue };
        let entry = per_room.entry(s.room).or_default();
        if matches!(s.outcome, SendOutcome::Ok { .. }) {
            entry.0.push((s.complete_ns, *seq));
        }
        entry.1.push((s.invoke_ns, *seq, body));
    }
    for (room, (mut acked, mut present)) in per_room {
        acked.sort_unstable();
        present.sort_unstable();
        let (mut i, mut max_before) = (0, (0u64, 0u64)); // (seq, completed at)
        for (invoke_ns, seq, body) in present {
            while i < acked.len() && acked[i].0 < invoke_ns {
                if acked[i].1 > max_before.0 {
                    max_before = (acked[i].1, acked[i].0);
                }
                i += 1;
            }
            if max_before.0 >= seq {
                report.flag("real_time_order", || {
                    format!(
                        "{room:?}: {body:?} was invoked after #{} had been acknowledged, yet got #{seq}",
                        max_before.0
                    )
                });
            }
        }
    }

    // 6: linearizable reads.
    let mut acked_by_room: HashMap<&str, Vec<(u64, u64)>> = HashMap::new(); // (complete_ns, seq)
    for s in sends.values() {
        if let SendOutcome::Ok { seq, .. } = s.outcome {
            acked_by_room.entry(s.room).or_default().push((s.complete_ns, *seq));
        }
    }
    for list in acked_by_room.values_mut() {
        list.sort_unstable();
    }
    for record in records {
        let Record::Read { room, invoke_ns, outcome, process, .. } = record else { continue };
        report.reads += 1;
        let ReadOutcome::Ok { last_seq, messages } = outcome else { continue };
        report.reads_ok += 1;
        let required = acked_by_room
            .get(room.as_str())
            .map(|l| l.iter().take_while(|(c, _)| c < invoke_ns).map(|(_, s)| *s).max().unwrap_or(0))
            .unwrap_or(0);
        if *last_seq < required {
            report.flag("stale_read", || {
                format!("process {process}: read of {room:?} saw up to #{last_seq}, but #{required} was acknowledged before it began")
            });
        }
        let Some(expected) = finals.get(room.as_str()) else { continue };
        let consistent = messages.iter().enumerate().all(|(i, (seq, body))| {
            let contiguous = i == 0 || *seq == messages[i - 1].0 + 1;
            contiguous && expected.get((*seq as usize).wrapping_sub(1)).is_some_and(|(s, b)| s == seq && b == body)
        }) && messages.last().is_none_or(|(seq, _)| seq == last_seq)
            && *last_seq as usize <= expected.len();
        if !consistent {
            report.flag("read_mismatch", || {
                format!("process {process}: read of {room:?} (up to #{last_seq}) is not a prefix of the final order")
            });
        }
    }

    // 8: messages only from members, in each room's order.
    for (room, messages) in &finals {
        let mut members: HashSet<&str> = HashSet::new();
        for (seq, entry) in messages.iter() {
            if let Some(event) = entry.strip_prefix(EVENT_PREFIX) {
                let mut words = event.split(' ');
                match (words.next(), words.next()) {
                    (Some("joined"), Some(user)) => {
                        members.insert(user);
                    }
                    (Some("left" | "kicked" | "banned"), Some(user)) => {
                        if event.starts_with("kicked") {
                            report.kicks += 1;
                        }
                        members.remove(user);
                    }
                    _ => {}
                }
                continue;
            }
            // w<process>-<client_seq>: writer <process>'s message.
            let Some(process) = entry.strip_prefix('w').and_then(|b| b.split('-').next()) else { continue };
            let writer = writer_name(process);
            if !members.contains(writer.as_str()) {
                report.flag("sent_while_not_member", || {
                    format!(
                        "{room:?} #{seq} = {entry:?}, from {writer}, who was not a member then (kicked, not rejoined)"
                    )
                });
            }
        }
    }

    // 9: progress. When each room's acknowledged messages were acknowledged, by seq.
    let mut acked_at: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    for record in records {
        if let Record::Send { room, complete_ns, outcome: SendOutcome::Ok { seq, .. }, .. } = record {
            acked_at.entry(room.as_str()).or_default().push((*seq, *complete_ns));
        }
    }
    for list in acked_at.values_mut() {
        list.sort_unstable();
    }
    for record in records {
        let Record::Subscription { process, room, after, received, received_ns, started_ns, ended_ns, nodes, .. } =
            record
        else {
            continue;
        };
        if received_ns.len() != received.len() {
            continue; // a history without arrival times
        }
        for &(seq, acked) in acked_at.get(room.as_str()).map(Vec::as_slice).unwrap_or(&[]) {
            if seq <= *after || acked < *started_ns || acked.saturating_add(PROGRESS_BOUND_NS) > *ended_ns {
                continue;
            }
            // The first arrival that covers `seq` (arrivals are in seq order).
            let at = received.partition_point(|(s, _)| *s < seq);
            let arrived = received_ns.get(at).copied();
            if arrived.is_none_or(|t| t > acked.saturating_add(PROGRESS_BOUND_NS)) {
                report.flag("subscription_stalled", || {
                    let when = match arrived {
                        Some(t) => format!("only {:.1} s later", t.saturating_sub(acked) as f64 / 1e9),
                        None => format!("never (the subscription ran {:.1} s more)", (ended_ns - acked) as f64 / 1e9),
                    };
                    format!(
                        "process {process}, {room:?}: #{seq}, acknowledged at {:.1} s, arrived {when} (bound {} s){}",
                        acked as f64 / 1e9,
                        PROGRESS_BOUND_NS / 1_000_000_000,
                        nodes_between(nodes, acked, arrived.unwrap_or(*ended_ns))
                    )
                });
                break; // one per subscription: the rest of a stall says nothing new
            }
        }
    }

    // 7: subscriptions.
    for record in records {
        let Record::Subscription { process, room, after, received, resumes, error, .. } = record else { continue };
        report.subscriptions += 1;
        if let Some(error) = error {
            report.flag("subscription_error", || format!("process {process}, {room:?}: {error}"));
        }
        report.subscription_messages += received.len() as u64;
        report.subscription_resumes += resumes;
        let expected = finals.get(room.as_str());
        let mut next = after + 1;
        for (seq, body) in received {
            if *seq < next {
                report.flag("subscription_duplicate", || {
                    format!("process {process}, {room:?}: #{seq} again after #{}", next - 1)
                });
                continue;
            }
            if *seq > next {
                report.flag("subscription_gap", || format!("process {process}, {room:?}: #{seq} after #{}", next - 1));
            }
            if let Some(expected) = expected
                && expected.get((*seq as usize).wrapping_sub(1)).is_none_or(|(_, b)| b != body)
            {
                report.flag("subscription_mismatch", || {
                    format!("process {process}, {room:?}: #{seq} = {body:?} is not the final order's #{seq}")
                });
            }
            next = seq + 1;
        }
    }
    check_catch_up(records, &finals, &mut report);
    report
}

/// Where a subscription was between `from` and `to` (its node then, and each it resumed on),
/// for a stall's report: "; on node X, then Y at 12.3 s".
fn nodes_between(nodes: &[(u64, String)], from: u64, to: u64) -> String {
    let then = nodes.iter().rev().find(|(at, _)| *at <= from).map(|(_, n)| n.as_str());
    let moves: Vec<String> = nodes
        .iter()
        .filter(|(at, _)| *at > from && *at <= to)
        .map(|(at, n)| format!("{n} at {:.1} s", *at as f64 / 1e9))
        .collect();
    match (then, moves.is_empty()) {
        (None, true) => String::new(),
        (Some(n), true) => format!("; on {n} all along"),
        (then, false) => format!("; on {}, then {}", then.unwrap_or("?"), moves.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(body: &str, room: &str, invoke: u64, complete: u64, outcome: SendOutcome) -> Record {
        Record::Send {
            process: 1,
            room: room.into(),
            client_id: "c".into(),
            client_seq: 1,
            body: body.into(),
            invoke_ns: invoke,
            complete_ns: complete,
            outcome,
        }
    }

    fn ok(seq: u64) -> SendOutcome {
        SendOutcome::Ok { seq, duplicate: false }
    }

    fn fail() -> SendOutcome {
        SendOutcome::Fail { code: "unavailable".into(), message: "no leader".into() }
    }

    fn info() -> SendOutcome {
        SendOutcome::Info { code: "timeout".into(), message: "unknown".into() }
    }

    fn final_read(node: u64, room: &str, linearizable: bool, bodies: &[&str]) -> Record {
        let messages = bodies.iter().enumerate().map(|(i, b)| (i as u64 + 1, b.to_string())).collect();
        Record::FinalRead { node, room: room.into(), linearizable, messages: Some(messages), error: None }
    }

    /// A valid history: three sends (one indeterminate that was applied, one failed), reads,
    /// a subscription, and identical final reads.
    fn valid() -> Vec<Record> {
        vec![
            send("a", "r", 0, 10, ok(1)),
            send("b", "r", 20, 30, ok(2)),
            send("c", "r", 25, 40, info()),
            send("d", "r", 50, 60, fail()),
            Record::Read {
                process: 2,
                room: "r".into(),
                invoke_ns: 35,
                complete_ns: 45,
                outcome: ReadOutcome::Ok { last_seq: 2, messages: vec![(1, "a".into()), (2, "b".into())] },
            },
            Record::Subscription {
                process: 3,
                room: "r".into(),
                after: 0,
                started_ns: 0,
                ended_ns: 100,
                received: vec![(1, "a".into()), (2, "b".into()), (3, "c".into())],
                received_ns: vec![12, 31, 45],
                resumes: 1,
                nodes: vec![],
                error: None,
            },
            Record::Nemesis { at_ns: 15, action: "kill".into(), nodes: vec![1], detail: String::new() },
            final_read(1, "r", true, &["a", "b", "c"]),
            final_read(1, "r", false, &["a", "b", "c"]),
            final_read(2, "r", false, &["a", "b", "c"]),
        ]
    }

    fn anomalies(records: &[Record]) -> Vec<String> {
        check(records).anomalies.into_iter().filter(|(_, a)| a.count > 0).map(|(k, _)| k).collect()
    }

    fn replace_final(records: &mut Vec<Record>, bodies: &[&str]) {
        records.retain(|r| !matches!(r, Record::FinalRead { .. }));
        for node in [1, 2] {
            records.push(final_read(node, "r", false, bodies));
        }
        records.push(final_read(1, "r", true, bodies));
    }

    #[test]
    fn a_valid_history_has_no_anomaly() {
        let report = check(&valid());
        assert!(report.valid(), "{}", report.summary());
        assert_eq!((report.acked, report.failed, report.indeterminate, report.indeterminate_present), (2, 1, 1, 1));
        assert_eq!(report.faults.get("kill"), Some(&1));
        assert!(report.summary().contains("anomalies: none"));
    }

    /// Writer 1's messages (`w1-…`), its joins and kicks.
    fn membership_history(entries: &[&str]) -> Vec<Record> {
        let mut h: Vec<Record> = entries
            .iter()
            .filter(|e| !e.starts_with('!'))
            .enumerate()
            .map(|(i, body)| send(body, "r", i as u64 * 10, i as u64 * 10 + 5, info()))
            .collect();
        for node in [1, 2] {
            h.push(final_read(node, "r", false, entries));
        }
        h.push(final_read(1, "r", true, entries));
        h
    }

    #[test]
    fn a_message_after_its_senders_kick_is_found() {
        let ok = membership_history(&["!joined writer1", "w1-1", "!kicked writer1 by mod", "!joined writer1", "w1-2"]);
        let report = check(&ok);
        assert!(report.valid(), "{}", report.summary());
        assert_eq!(report.kicks, 1);
        let after_kick = membership_history(&["!joined writer1", "w1-1", "!kicked writer1 by mod", "w1-2"]);
        assert_eq!(anomalies(&after_kick), vec!["sent_while_not_member"]);
        let never_joined = membership_history(&["w1-1"]);
        assert_eq!(anomalies(&never_joined), vec!["sent_while_not_member"]);
    }

    #[test]
    fn a_lost_acknowledged_send_is_found() {
        let mut h = valid();
        replace_final(&mut h, &["a", "c"]);
        let found = anomalies(&h);
        assert!(found.contains(&"lost_ack".to_string()), "{found:?}");
    }

    #[test]
    fn an_acknowledged_send_at_another_seq_is_found() {
        let mut h = valid();
        replace_final(&mut h, &["b", "a", "c"]);
        assert!(anomalies(&h).contains(&"acked_seq_mismatch".to_string()));
    }

    #[test]
    fn a_duplicate_is_found() {
        let mut h = valid();
        replace_final(&mut h, &["a", "b", "c", "c"]);
        assert!(anomalies(&h).contains(&"duplicate".to_string()));
    }

    #[test]
    fn a_phantom_and_a_failed_send_that_appears_are_found() {
        let mut h = valid();
        replace_final(&mut h, &["a", "b", "zzz"]);
        assert!(anomalies(&h).contains(&"phantom".to_string()));
        replace_final(&mut h, &["a", "b", "d"]);
        assert!(anomalies(&h).contains(&"failed_but_present".to_string()));
    }

    #[test]
    fn diverging_nodes_and_holes_are_found() {
        let mut h = valid();
        h.push(final_read(3, "r", false, &["a", "b"]));
        assert!(anomalies(&h).contains(&"divergence".to_string()));
        let mut h = valid();
        h.retain(|r| !matches!(r, Record::FinalRead { linearizable: true, .. }));
        h.push(Record::FinalRead {
            node: 1,
            room: "r".into(),
            linearizable: true,
            messages: Some(vec![(1, "a".into()), (2, "b".into()), (4, "c".into())]),
            error: None,
        });
        assert!(anomalies(&h).contains(&"not_dense".to_string()));
        let mut h = valid();
        h.push(Record::FinalRead {
            node: 3,
            room: "r".into(),
            linearizable: false,
            messages: None,
            error: Some("down".into()),
        });
        assert!(anomalies(&h).contains(&"final_read_failed".to_string()));
    }

    #[test]
    fn a_real_time_order_violation_is_found() {
        // b completed (t=30) before e was invoked (t=31), yet e precedes b.
        let mut h = valid();
        h.push(send("e", "r", 31, 70, ok(2)));
        for r in h.iter_mut() {
            if let Record::Send { body, outcome, .. } = r
                && body == "b"
            {
                *outcome = ok(3);
            }
        }
        h.retain(|r| !matches!(r, Record::Read { .. } | Record::Subscription { .. }));
        replace_final(&mut h, &["a", "e", "b", "c"]);
        assert_eq!(anomalies(&h), vec!["real_time_order".to_string()]);
    }

    #[test]
    fn stale_and_inconsistent_reads_are_found() {
        let mut h = valid();
        h.push(Record::Read {
            process: 2,
            room: "r".into(),
            invoke_ns: 35, // after b was acknowledged (30)
            complete_ns: 45,
            outcome: ReadOutcome::Ok { last_seq: 1, messages: vec![(1, "a".into())] },
        });
        assert_eq!(anomalies(&h), vec!["stale_read".to_string()]);
        let mut h = valid();
        h.push(Record::Read {
            process: 2,
            room: "r".into(),
            invoke_ns: 35,
            complete_ns: 45,
            outcome: ReadOutcome::Ok { last_seq: 2, messages: vec![(1, "a".into()), (2, "x".into())] },
        });
        assert_eq!(anomalies(&h), vec!["read_mismatch".to_string()]);
    }

    #[test]
    fn subscription_gaps_duplicates_and_mismatches_are_found() {
        let sub = |received: Vec<(u64, &str)>| Record::Subscription {
            process: 9,
            room: "r".into(),
            after: 0,
            started_ns: 0,
            ended_ns: 1,
            received: received.into_iter().map(|(s, b)| (s, b.to_string())).collect(),
            received_ns: vec![],
            resumes: 0,
            nodes: vec![],
            error: None,
        };
        let mut h = valid();
        h.push(sub(vec![(1, "a"), (3, "c")]));
        assert_eq!(anomalies(&h), vec!["subscription_gap".to_string()]);
        let mut h = valid();
        h.push(sub(vec![(1, "a"), (2, "b"), (2, "b")]));
        assert_eq!(anomalies(&h), vec!["subscription_duplicate".to_string()]);
        let mut h = valid();
        h.push(sub(vec![(1, "a"), (2, "c")]));
        assert_eq!(anomalies(&h), vec!["subscription_mismatch".to_string()]);
    }

    fn catch_up(op: &str, read_seq: u64, last_seq: u64, unread: u64, mentions: u64, at: u64) -> Record {
        Record::CatchUp {
            process: 9,
            room: "r".into(),
            op: op.into(),
            invoke_ns: at - 5,
            complete_ns: at,
            read_seq,
            last_seq,
            unread,
            mentions,
        }
    }

    #[test]
    fn read_markers_that_move_back_and_wrong_sync_counts_are_found() {
        // The final order is a, b, c.
        let mut h = valid();
        h.push(catch_up("sync", 1, 3, 2, 0, 70));
        h.push(catch_up("mark", 2, 0, 1, 0, 80));
        h.push(catch_up("sync", 2, 2, 0, 0, 90));
        assert!(anomalies(&h).is_empty(), "{}", check(&h).summary());
        let mut back = h.clone();
        back.push(catch_up("sync", 1, 3, 2, 0, 100));
        assert_eq!(anomalies(&back), vec!["read_marker_backward".to_string()]);
        for wrong in [catch_up("sync", 1, 3, 1, 0, 70), catch_up("sync", 0, 3, 3, 1, 70)] {
            let mut h = valid();
            h.push(wrong);
            assert_eq!(anomalies(&h), vec!["sync_count_mismatch".to_string()]);
        }
        // Mentions of the catcher are counted after the marker only.
        let mut h =
            vec![send("a", "r", 0, 10, ok(1)), send("b @catcher", "r", 20, 30, ok(2)), send("c", "r", 40, 50, ok(3))];
        replace_final(&mut h, &["a", "b @catcher", "c"]);
        h.push(catch_up("sync", 1, 3, 2, 1, 70));
        h.push(catch_up("sync", 2, 3, 1, 0, 80));
        assert!(anomalies(&h).is_empty(), "{}", check(&h).summary());
    }

    #[test]
    fn a_stall_names_the_nodes_the_subscriber_was_on() {
        let nodes = vec![(0, "n1".to_string()), (5_000_000_000, "n2".to_string()), (9_000_000_000, "n3".to_string())];
        assert_eq!(nodes_between(&nodes, 6_000_000_000, 8_000_000_000), "; on n2 all along");
        assert_eq!(nodes_between(&nodes, 1_000_000_000, 9_500_000_000), "; on n1, then n2 at 5.0 s, n3 at 9.0 s");
        assert_eq!(nodes_between(&[], 1, 2), "");
    }

    #[test]
    fn a_subscriber_that_stalls_is_found() {
        const S: u64 = 1_000_000_000;
        // A subscriber on a node cut off from the leader: #1 arrives, then nothing, while the
        // cluster acknowledges #2 and the subscription runs on for a minute.
        let history = |received: Vec<(u64, &str, u64)>| {
            vec![
                send("a", "r", 0, S, ok(1)),
                send("b", "r", 2 * S, 3 * S, ok(2)),
                Record::Subscription {
                    process: 3,
                    room: "r".into(),
                    after: 0,
                    started_ns: 0,
                    ended_ns: 60 * S,
                    received_ns: received.iter().map(|r| r.2).collect(),
                    received: received.into_iter().map(|(s, b, _)| (s, b.to_string())).collect(),
                    resumes: 0,
                    nodes: vec![],
                    error: None,
                },
                final_read(1, "r", true, &["a", "b"]),
            ]
        };
        assert_eq!(anomalies(&history(vec![(1, "a", S)])), vec!["subscription_stalled".to_string()]);
        // Late, beyond the bound: stalled too.
        let late = 3 * S + PROGRESS_BOUND_NS + 1;
        assert_eq!(anomalies(&history(vec![(1, "a", S), (2, "b", late)])), vec!["subscription_stalled".to_string()]);
        // Within the bound (a resumption elsewhere takes a few seconds): fine.
        assert!(anomalies(&history(vec![(1, "a", S), (2, "b", 8 * S)])).is_empty());
        // A message acknowledged too close to the subscription's end is not held against it.
        let mut h = history(vec![(1, "a", S)]);
        if let Record::Subscription { ended_ns, .. } = &mut h[2] {
            *ended_ns = 3 * S + PROGRESS_BOUND_NS - 1;
        }
        assert!(anomalies(&h).is_empty());
    }

    #[test]
    fn crashes_and_subscription_errors_are_found() {
        let mut h = valid();
        h.push(Record::Nemesis { at_ns: 1, action: "crash".into(), nodes: vec![2], detail: "exit 101".into() });
        h.push(Record::Subscription {
            process: 9,
            room: "r".into(),
            after: 0,
            started_ns: 0,
            ended_ns: 1,
            received: vec![],
            received_ns: vec![],
            resumes: 0,
            nodes: vec![],
            error: Some("room_not_found".into()),
        });
        assert_eq!(anomalies(&h), vec!["node_crashed".to_string(), "subscription_error".to_string()]);
        // Heals are not faults.
        let mut h = valid();
        h.push(Record::Nemesis { at_ns: 2, action: "heal".into(), nodes: vec![], detail: String::new() });
        assert_eq!(check(&h).faults.len(), 1);
    }

    #[test]
    fn history_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let writer = crate::history::HistoryWriter::create(&path).unwrap();
        for r in valid() {
            writer.record(&r);
        }
        writer.flush().unwrap();
        assert_eq!(crate::history::read(&path).unwrap(), valid());
    }
}
