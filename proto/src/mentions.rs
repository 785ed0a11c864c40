//! What counts as a mention of a user in a message body: one rule for the state machine
//! (which indexes mentions for unread counts and notifications) and for clients (which
//! highlight them as messages arrive).

/// Most members one message mentions: further `@names` are ignored.
pub const MAX_MENTIONS_PER_MESSAGE: usize = 16;
/// Longest user name (bytes), as the state machine validates them.
const MAX_USER_NAME_BYTES: usize = 32;

/// The distinct user names `@name` mentions in `body`, in order of first appearance, at most
/// [`MAX_MENTIONS_PER_MESSAGE`]. A mention starts at an `@` that does not follow a name
/// character (so `ann@example.com` mentions nobody); the name is folded to lower case, and
/// trailing `.`/`-` are punctuation (`@bob.` mentions bob). Names follow the rules of user
/// names: lowercase ASCII letters, digits, `.`, `_`, `-`, starting with a letter or digit, at
/// most 32 bytes.
pub fn parse_mentions(body: &[u8]) -> Vec<String> {
    let is_name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    let mut found: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(at) = body[i..].iter().position(|&b| b == b'@').map(|p| p + i) {
        i = at + 1;
        if at > 0 && is_name(body[at - 1]) {
            continue;
        }
        let len = body[i..].iter().take_while(|&&b| is_name(b)).count();
        let mut name = &body[i..i + len];
        while let [rest @ .., b'.' | b'-'] = name {
            name = rest;
        }
        i += len;
        if name.is_empty() || name.len() > MAX_USER_NAME_BYTES || !name[0].is_ascii_alphanumeric() {
            continue;
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if !found.contains(&name) {
            found.push(name);
            if found.len() == MAX_MENTIONS_PER_MESSAGE {
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_names_after_an_at_sign_that_starts_a_word() {
        let found = |body: &str| parse_mentions(body.as_bytes());
        assert_eq!(found("hi @ann and @Bob."), vec!["ann", "bob"]);
        assert_eq!(found("mail ann@example.com"), Vec::<String>::new());
        assert_eq!(found("@ann @ann, @ann!"), vec!["ann"]);
        assert_eq!(found("(@c.d-e_f) @- @. @"), vec!["c.d-e_f"]);
        assert_eq!(found("@_x is not a name, @9lives is"), vec!["9lives"]);
        let many: String = (0..40).map(|i| format!("@user{i} ")).collect();
        assert_eq!(found(&many).len(), MAX_MENTIONS_PER_MESSAGE);
        let long = format!("@{}", "a".repeat(40));
        assert_eq!(found(&long), Vec::<String>::new());
        assert_eq!(parse_mentions(b"\xff@ann\xfe @\xffbob"), vec!["ann"]);
    }
}
