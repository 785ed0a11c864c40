//! Size and syntax limits on everything a client can put into the log.
//!
//! Two levels, so that replicas can never disagree:
//! - [`Limits::PROTOCOL`] is a constant. The state machine enforces it on every apply, so each
//!   replica reaches the same verdict on the same entry whatever its configuration.
//! - A node's configured [`Limits`] (never above the protocol's) are enforced before an entry is
//!   proposed; changing them on a rolling restart cannot make replicas diverge.

use chorus_proto::storage::{AppendMessage, ChangeMembership, Command, CreateRoom, OpenDirect, op};

use crate::error::CommandError;

/// Longest room name, in bytes.
pub const MAX_ROOM_NAME_BYTES: usize = 128;
/// Longest sender name, in bytes.
pub const MAX_SENDER_BYTES: usize = 64;
/// Longest client id, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 64;
/// Most metadata entries on a room.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_BYTES: usize = 64;
/// Most bytes of metadata (keys and values) on a room.
pub const MAX_METADATA_BYTES: usize = 8 * 1024;
/// Longest user name, in bytes.
pub const MAX_USER_NAME_BYTES: usize = 32;
/// Longest session device name, in bytes.
pub const MAX_DEVICE_BYTES: usize = 64;
/// Longest reason given with a kick or a ban, in bytes.
pub const MAX_REASON_BYTES: usize = 512;
/// Longest password hash (PHC string), in bytes.
pub const MAX_PHC_BYTES: usize = 512;
/// Longest external issuer or subject, in bytes.
pub const MAX_EXTERNAL_ID_BYTES: usize = 1024;

/// Limits on commands. See the module docs for why there are two levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Most operations in one command (one Raft entry).
    pub max_ops_per_command: usize,
    /// Largest encoded command, in bytes.
    pub max_command_bytes: usize,
}

impl Limits {
    /// The hard limits every replica enforces when it applies an entry.
    pub const PROTOCOL: Limits =
        Limits { max_body_bytes: 1024 * 1024, max_ops_per_command: 4096, max_command_bytes: 16 * 1024 * 1024 };

    /// Checks that configured limits stay within the protocol's.
    pub fn check(&self) -> Result<(), String> {
        let p = Limits::PROTOCOL;
        let fits = |name: &str, value: usize, max: usize| {
            if value == 0 || value > max {
                Err(format!("{name} must be between 1 and {max}, got {value}"))
            } else {
                Ok(())
            }
        };
        fits("max_body_bytes", self.max_body_bytes, p.max_body_bytes)?;
        fits("max_ops_per_command", self.max_ops_per_command, p.max_ops_per_command)?;
        fits("max_command_bytes", self.max_command_bytes, p.max_command_bytes)
    }

    /// Checks the batch-level limits of a command (count and size).
    pub fn check_batch(&self, cmd: &Command) -> Result<(), CommandError> {
        if cmd.ops.is_empty() {
            return Err(CommandError::EmptyBatch);
        }
        if cmd.ops.len() > self.max_ops_per_command {
            return Err(CommandError::BatchTooLarge { count: cmd.ops.len(), limit: self.max_ops_per_command });
        }
        let size = prost::Message::encoded_len(cmd);
        if size > self.max_command_bytes {
            return Err(CommandError::BatchTooManyBytes { size, limit: self.max_command_bytes });
        }
        Ok(())
    }

    /// Checks one operation's fields: names, sizes, ids. Does not look at any state.
    pub fn check_op(&self, op: &op::Kind) -> Result<(), CommandError> {
        use op::Kind as K;
        match op {
            K::CreateRoom(c) => self.check_create_room(c),
            K::Append(a) => self.check_append(a),
            K::Membership(m) => check_membership(m),
            K::OpenDirect(d) => check_open_direct(d),
            K::MarkRead(m) => {
                validate_room_name(&m.room)?;
                validate_user_name(&m.user)
            }
            K::NotificationsDone(d) => {
                if d.ids.len() > crate::state_machine::notify::MAX_DONE_PER_OP {
                    return Err(CommandError::invalid("ids", "at most 1,000 per NotificationsDone"));
                }
                Ok(())
            }
            K::CreateUser(u) => {
                validate_user_name(&u.name)?;
                if u.password_phc.is_empty() || u.password_phc.len() > MAX_PHC_BYTES {
                    return Err(CommandError::invalid("password_phc", "1 to 512 bytes"));
                }
                if u.credential_id.len() != 32 {
                    return Err(CommandError::invalid("credential_id", "must be a SHA-256 (32 bytes)"));
                }
                validate_optional_user(&u.actor)
            }
            K::CreateSession(s) => {
                validate_user_name(&s.user)?;
                crate::state_machine::accounts::check_session(s)
            }
            K::ExternalLogin(e) => {
                for (field, value) in [("issuer", &e.issuer), ("subject", &e.subject)] {
                    if value.is_empty() || value.len() > MAX_EXTERNAL_ID_BYTES {
                        return Err(CommandError::invalid(field, "1 to 1024 bytes"));
                    }
                }
                validate_user_name(&e.preferred_name)?;
                match &e.session {
                    Some(s) => crate::state_machine::accounts::check_session(s),
                    None => Err(CommandError::invalid("session", "missing")),
                }
            }
            K::RevokeSessions(r) => {
                validate_user_name(&r.user)?;
                validate_user_name(&r.actor)?;
                if !r.session_id.is_empty() && r.session_id.len() != crate::keys::SESSION_ID_LEN {
                    return Err(CommandError::invalid("session_id", "must be 16 bytes"));
                }
                Ok(())
            }
            K::SetUserDisabled(d) => {
                validate_user_name(&d.user)?;
                validate_user_name(&d.actor)
            }
            K::AddSigningKey(k) => {
                if k.kid.is_empty()
                    || k.kid.len() > 64
                    || !k.kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(CommandError::invalid("kid", "1 to 64 ASCII letters, digits and '-'"));
                }
                if k.private_pkcs8.is_empty() || k.private_pkcs8.len() > 256 || k.public_key.len() != 32 {
                    return Err(CommandError::invalid("signing key", "an Ed25519 key pair"));
                }
                validate_optional_user(&k.actor)
            }
            K::TouchSession(t) => {
                if t.session_id.len() != crate::keys::SESSION_ID_LEN {
                    return Err(CommandError::invalid("session_id", "must be 16 bytes"));
                }
                if t.ttl_ms > crate::state_machine::accounts::MAX_SESSION_TTL_MS {
                    return Err(CommandError::invalid("ttl_ms", "at most 400 days"));
                }
                Ok(())
            }
        }
    }

    pub fn check_create_room(&self, c: &CreateRoom) -> Result<(), CommandError> {
        validate_room_name(&c.room)?;
        validate_sender(&c.creator)?;
        validate_metadata(&c.metadata)
    }

    pub fn check_append(&self, a: &AppendMessage) -> Result<(), CommandError> {
        validate_room_name(&a.room)?;
        validate_sender(&a.sender)?;
        validate_client_id(&a.client_id)?;
        if a.client_seq == 0 {
            return Err(CommandError::ClientSeqZero);
        }
        if a.body.len() > self.max_body_bytes {
            return Err(CommandError::BodyTooLarge { size: a.body.len(), limit: self.max_body_bytes });
        }
        Ok(())
    }

    /// Checks a whole command against these limits: what a node does before proposing it.
    pub fn check_command(&self, cmd: &Command) -> Result<(), CommandError> {
        self.check_batch(cmd)?;
        for op in &cmd.ops {
            match &op.kind {
                Some(kind) => self.check_op(kind)?,
                None => return Err(CommandError::UnknownOperation),
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body_bytes: 64 * 1024, max_ops_per_command: 1024, max_command_bytes: 4 * 1024 * 1024 }
    }
}

/// Room names: 1 to 128 bytes of ASCII letters, digits, '.', '_' and '-', starting with a letter
/// or digit (so that names are safe in URLs, file names and terminal output).
pub fn validate_room_name(name: &str) -> Result<(), CommandError> {
    let invalid = |reason| Err(CommandError::RoomNameInvalid { name: truncate_for_error(name), reason });
    if name.is_empty() {
        return invalid("must not be empty");
    }
    if name.len() > MAX_ROOM_NAME_BYTES {
        return invalid("longer than 128 bytes");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return invalid("must start with a letter or digit");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return invalid("may contain only ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Senders: 1 to 64 bytes of UTF-8 without control characters.
pub fn validate_sender(sender: &str) -> Result<(), CommandError> {
    let invalid = |reason| Err(CommandError::SenderInvalid { sender: truncate_for_error(sender), reason });
    if sender.is_empty() {
        return invalid("must not be empty");
    }
    if sender.len() > MAX_SENDER_BYTES {
        return invalid("longer than 64 bytes");
    }
    if sender.chars().any(char::is_control) {
        return invalid("must not contain control characters");
    }
    Ok(())
}

/// User names: 1 to 32 bytes of lowercase ASCII letters, digits, '.', '_' and '-', starting
/// with a letter or digit (Chorus folds upper case to lower case before it gets here).
pub fn validate_user_name(name: &str) -> Result<(), CommandError> {
    let invalid = |reason| Err(CommandError::UserNameInvalid { name: truncate_for_error(name), reason });
    if name.is_empty() {
        return invalid("must not be empty");
    }
    if name.len() > MAX_USER_NAME_BYTES {
        return invalid("longer than 32 bytes");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() && !name.as_bytes()[0].is_ascii_digit() {
        return invalid("must start with a lowercase letter or a digit");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
        return invalid("may contain only lowercase ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// An actor field that is empty (no one: the cluster itself, or self-registration) or a user.
fn validate_optional_user(name: &str) -> Result<(), CommandError> {
    if name.is_empty() { Ok(()) } else { validate_user_name(name) }
}

fn check_membership(m: &ChangeMembership) -> Result<(), CommandError> {
    validate_room_name(&m.room)?;
    validate_user_name(&m.actor)?;
    if !m.user.is_empty() {
        validate_user_name(&m.user)?;
    }
    if m.reason.len() > MAX_REASON_BYTES {
        return Err(CommandError::invalid("reason", "at most 512 bytes"));
    }
    Ok(())
}

fn check_open_direct(d: &OpenDirect) -> Result<(), CommandError> {
    validate_room_name(&d.room)?;
    validate_user_name(&d.actor)?;
    d.users.iter().try_for_each(|u| validate_user_name(u))
}

/// Client ids: 1 to 64 opaque bytes (clients use 16 random bytes).
pub fn validate_client_id(client_id: &[u8]) -> Result<(), CommandError> {
    if client_id.is_empty() {
        return Err(CommandError::ClientIdInvalid { reason: "must not be empty" });
    }
    if client_id.len() > MAX_CLIENT_ID_BYTES {
        return Err(CommandError::ClientIdInvalid { reason: "longer than 64 bytes" });
    }
    Ok(())
}

/// Room metadata: at most 32 entries and 8 KiB; keys are 1 to 64 bytes of ASCII letters,
/// digits, '.', '_' and '-'; values are any UTF-8.
pub fn validate_metadata(metadata: &std::collections::BTreeMap<String, String>) -> Result<(), CommandError> {
    let invalid = |reason: String| Err(CommandError::MetadataInvalid { reason });
    if metadata.len() > MAX_METADATA_ENTRIES {
        return invalid(format!("{} entries, over the limit of {MAX_METADATA_ENTRIES}", metadata.len()));
    }
    let mut total = 0usize;
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_BYTES {
            return invalid(format!("key {:?} must be 1 to {MAX_METADATA_KEY_BYTES} bytes", truncate_for_error(key)));
        }
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return invalid(format!(
                "key {:?} may contain only ASCII letters, digits, '.', '_' and '-'",
                truncate_for_error(key)
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_BYTES {
        return invalid(format!("{total} bytes, over the limit of {MAX_METADATA_BYTES}"));
    }
    Ok(())
}

/// Keeps error messages short when the offending input is huge.
fn truncate_for_error(s: &str) -> String {
    const MAX: usize = 160;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use chorus_proto::storage::Op;

    fn append(room: &str, body_len: usize) -> AppendMessage {
        AppendMessage {
            room: room.into(),
            sender: "alice".into(),
            client_id: Bytes::from_static(b"c1"),
            client_seq: 1,
            body: Bytes::from(vec![b'x'; body_len]),
        }
    }

    #[test]
    fn room_names_follow_the_documented_syntax() {
        for ok in ["general", "a", "Team-42.ops_x", &"r".repeat(128)] {
            assert_eq!(validate_room_name(ok), Ok(()), "{ok}");
        }
        for (bad, reason) in [
            ("", "must not be empty"),
            (&"r".repeat(129) as &str, "longer than 128 bytes"),
            ("-lead", "must start with a letter or digit"),
            ("has space", "may contain only ASCII letters, digits, '.', '_' and '-'"),
            ("émoji", "must start with a letter or digit"),
            ("a/b", "may contain only ASCII letters, digits, '.', '_' and '-'"),
        ] {
            match validate_room_name(bad) {
                Err(CommandError::RoomNameInvalid { reason: r, .. }) => assert_eq!(r, reason, "{bad:?}"),
                other => panic!("{bad:?}: expected RoomNameInvalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn body_limit_is_the_configured_one() {
        let limits = Limits::default();
        assert_eq!(limits.check_append(&append("r", 64 * 1024)), Ok(()));
        assert_eq!(
            limits.check_append(&append("r", 64 * 1024 + 1)),
            Err(CommandError::BodyTooLarge { size: 64 * 1024 + 1, limit: 64 * 1024 })
        );
        // The protocol limit is larger: the state machine accepts what a node with a larger
        // configured limit proposed.
        assert_eq!(Limits::PROTOCOL.check_append(&append("r", 64 * 1024 + 1)), Ok(()));
    }

    #[test]
    fn batch_limits_count_ops_and_bytes() {
        let limits = Limits { max_body_bytes: 1000, max_ops_per_command: 2, max_command_bytes: 1500 };
        let op = |n| Op { kind: Some(op::Kind::Append(append("r", n))) };
        let cmd = |ops| Command { ts_ms: 1, ops, rules: 1, notify_after_ms: 0 };
        assert_eq!(limits.check_command(&cmd(vec![])), Err(CommandError::EmptyBatch));
        assert_eq!(limits.check_command(&cmd(vec![op(10), op(10)])), Ok(()));
        assert_eq!(
            limits.check_command(&cmd(vec![op(10), op(10), op(10)])),
            Err(CommandError::BatchTooLarge { count: 3, limit: 2 })
        );
        assert!(matches!(
            limits.check_command(&cmd(vec![op(900), op(900)])),
            Err(CommandError::BatchTooManyBytes { limit: 1500, .. })
        ));
        assert_eq!(limits.check_command(&cmd(vec![Op { kind: None }])), Err(CommandError::UnknownOperation));
    }

    #[test]
    fn senders_client_ids_and_metadata_are_checked() {
        assert!(validate_sender("bob").is_ok());
        assert!(validate_sender("").is_err());
        assert!(validate_sender("a\nb").is_err());
        assert!(validate_sender(&"s".repeat(65)).is_err());
        assert!(validate_client_id(b"").is_err());
        assert!(validate_client_id(&[7; 65]).is_err());
        let mut md = std::collections::BTreeMap::new();
        md.insert("topic".to_string(), "release planning".to_string());
        assert!(validate_metadata(&md).is_ok());
        md.insert("bad key".to_string(), String::new());
        assert!(validate_metadata(&md).is_err());
    }

    #[test]
    fn user_names_follow_the_documented_syntax() {
        for ok in ["ann", "a", "bob.smith", "x_1-2", "7of9", &"u".repeat(32)] {
            assert_eq!(validate_user_name(ok), Ok(()), "{ok}");
        }
        for (bad, reason) in [
            ("", "must not be empty"),
            (&"u".repeat(33) as &str, "longer than 32 bytes"),
            ("Ann", "must start with a lowercase letter or a digit"),
            ("aNN", "may contain only lowercase ASCII letters, digits, '.', '_' and '-'"),
            (".ann", "must start with a lowercase letter or a digit"),
            ("ann smith", "may contain only lowercase ASCII letters, digits, '.', '_' and '-'"),
            ("ann\n", "may contain only lowercase ASCII letters, digits, '.', '_' and '-'"),
        ] {
            match validate_user_name(bad) {
                Err(CommandError::UserNameInvalid { reason: r, .. }) => assert_eq!(r, reason, "{bad:?}"),
                other => panic!("{bad:?}: expected UserNameInvalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn configured_limits_cannot_exceed_the_protocol() {
        assert!(Limits::default().check().is_ok());
        let too_big = Limits { max_body_bytes: Limits::PROTOCOL.max_body_bytes + 1, ..Limits::default() };
        assert!(too_big.check().is_err());
        assert!(Limits { max_ops_per_command: 0, ..Limits::default() }.check().is_err());
    }
}
