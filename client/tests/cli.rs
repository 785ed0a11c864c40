//! The `chorus` CLI against a real single-node `chorusd` (built by `cargo test --workspace`).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn target_bin(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(path.exists(), "{} is missing: run the workspace's tests (scripts/test.sh) so it is built", path.display());
    path
}

#[path = "../../server/tests/common/ports.rs"]
mod ports;
use ports::free_port;

struct Node {
    child: Child,
    client_addr: String,
    fingerprint: String,
    home: tempfile::TempDir,
    data: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node() -> Node {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    let client_addr = format!("127.0.0.1:{}", free_port());
    let peer_addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(target_bin("chorusd"))
        .args(["--node-id", "1", "--shard-count", "2", "--client-addr", &client_addr, "--peer-addr", &peer_addr])
        .args(["--registration", "open", "--web-addr", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(home.path().join("node.log")).unwrap())
        .spawn()
        .unwrap();
    let fp_file = data.join("tls/fingerprint");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fp_file.exists() {
        assert!(Instant::now() < deadline, "chorusd wrote no fingerprint");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let fingerprint = std::fs::read_to_string(&fp_file).unwrap().trim().to_string();
    Node { child, client_addr, fingerprint, home, data }
}

fn chorus(node: &Node, args: &[&str], stdin: Option<&str>) -> Output {
    chorus_as(node, "default", args, stdin)
}

/// `chorus` signed in as profile `profile` (each profile keeps its own session).
fn chorus_as(node: &Node, profile: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
    cmd.args(args)
        .env_clear()
        .env("HOME", node.home.path())
        .env("CHORUS_NODES", &node.client_addr)
        .env("CHORUS_FINGERPRINT", &node.fingerprint)
        .env("CHORUS_PROFILE", profile)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    finish(child, &args.join(" "))
}

/// Waits for `child`'s output; a run over 60 s is killed and fails the test, saying which
/// command hung.
fn finish(child: Child, what: &str) -> Output {
    let pid = child.id().to_string();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let hung = finished.recv_timeout(Duration::from_secs(60)).is_err();
        if hung {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        hung
    });
    let output = child.wait_with_output().unwrap();
    let _ = done.send(());
    let hung = watchdog.join().unwrap();
    assert!(!hung, "`chorus {what}` did not finish within 60 s: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// The lines a child prints, each waited for at most 30 s (a hung test says what it waited for).
fn lines_of(stdout: std::process::ChildStdout) -> impl FnMut(&str) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                return;
            }
        }
    });
    move |what: &str| rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no line within 30 s: {what}"))
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "chorus failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Retries a command until the node has elected its leaders.
fn ok_eventually(node: &Node, args: &[&str], stdin: Option<&str>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = chorus(node, args, stdin);
        if output.status.success() || Instant::now() > deadline {
            return ok(output);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn the_cli_sends_reads_lists_tails_and_chats() {
    let node = start_node();
    let signed_in = ok_eventually(&node, &["register", "tester", "--password-stdin"], Some("tester-password\n"));
    assert_eq!(signed_in.trim(), "registered and signed in as tester");
    let sent = ok(chorus(&node, &["send", "general", "hello world", "--create"], None));
    assert!(sent.starts_with("sent to general as #1"), "{sent}");
    let sent = ok(chorus(&node, &["--json", "send", "general", "second"], None));
    assert_eq!(json_lines(&sent)[0]["seq"], 2);

    let history = json_lines(&ok(chorus(&node, &["--json", "history", "general"], None)));
    assert_eq!(history.len(), 2);
    assert_eq!((history[0]["seq"].as_u64(), history[0]["body"].as_str()), (Some(1), Some("hello world")));
    assert_eq!(history[0]["sender"], "tester");
    let page = ok(chorus(&node, &["history", "general", "--after", "1"], None));
    assert!(page.contains("#2") && page.contains("tester: second") && !page.contains("#1 "), "{page}");

    let rooms = json_lines(&ok(chorus(&node, &["--json", "rooms"], None)));
    assert_eq!(rooms[0]["room"], "general");
    assert_eq!(rooms[0]["last_seq"], 2);

    let status: serde_json::Value = serde_json::from_str(&ok(chorus(&node, &["--json", "status"], None))).unwrap();
    assert_eq!(status["shard_count"], 2);
    assert_eq!(status["shards"].as_array().unwrap().len(), 3, "two room shards and the meta group: {status}");
    assert!(status["shards"].as_array().unwrap().iter().all(|s| s["leader"] == 1), "{status}");
    let table = ok(chorus(&node, &["status"], None));
    assert!(table.contains("SHARD") && table.contains("leader"), "{table}");
    // A reader that goes away (`chorus status | head -1`) ends the command quietly.
    let mut closed = Command::new(env!("CARGO_BIN_EXE_chorus"));
    // Status needs no sign-in.
    closed
        .arg("status")
        .env_clear()
        .env("HOME", node.home.path())
        .env("CHORUS_NODES", &node.client_addr)
        .env("CHORUS_FINGERPRINT", &node.fingerprint)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = closed.spawn().unwrap();
    drop(child.stdout.take()); // closed before the command has connected, let alone printed
    let output = finish(child, "status (reader gone)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", output.status);

    // Chat: a typed line is sent; /quit leaves.
    let chat = ok(chorus(&node, &["chat", "general"], Some("typed in chat\n/quit\n")));
    assert!(chat.contains("tester: hello world"), "chat shows recent messages: {chat}");
    let last = json_lines(&ok(chorus(&node, &["--json", "history", "general", "--limit", "1"], None)));
    assert_eq!(last[0]["body"], "typed in chat");

    // Tail from the start prints the history, then live messages.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["--json", "tail", "general", "--from", "1"])
        .env_clear()
        .env("CHORUS_PROFILE", "default")
        .env("HOME", node.home.path())
        .env("CHORUS_NODES", &node.client_addr)
        .env("CHORUS_FINGERPRINT", &node.fingerprint)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut next_line = lines_of(tail.stdout.take().unwrap());
    for expected in 1..=3 {
        let line = next_line("the history `chorus tail` prints first");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap()["seq"], expected);
    }
    ok(chorus(&node, &["send", "general", "live one"], None));
    let live: serde_json::Value = serde_json::from_str(&next_line("a live message from `chorus tail`")).unwrap();
    assert_eq!((live["seq"].as_u64(), live["body"].as_str()), (Some(4), Some("live one")));
    let _ = tail.kill();
    let _ = tail.wait();

    // Errors: a clear message and a failing exit status.
    let missing = chorus(&node, &["history", "nope"], None);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("room \"nope\" does not exist") && stderr.contains("room_not_found"), "{stderr}");
    let bad = chorus(&node, &["send", "bad name", "x"], None);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid_room_name"));
}

#[test]
fn without_a_way_to_trust_the_server_the_cli_says_what_to_pass() {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["status"])
        .env_clear()
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--fingerprint") && stderr.contains("cluster.sh"), "{stderr}");
}

/// The admin's password, from the credentials file the first start wrote.
fn admin_password(node: &Node) -> String {
    let path = node.data.join("admin-credentials");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(Instant::now() < deadline, "no {}", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("password = \"")).unwrap();
    line.trim_end_matches('"').to_string()
}

#[test]
fn the_cli_signs_in_manages_rooms_and_members_and_signs_out() {
    let node = start_node();
    ok_eventually(&node, &["status"], None);
    let not_signed_in = chorus(&node, &["rooms"], None);
    assert!(!not_signed_in.status.success());
    assert!(String::from_utf8_lossy(&not_signed_in.stderr).contains("chorus login"), "says how to sign in");

    // Two identities on one machine, by profile.
    let register = |profile: &str, user: &str| {
        ok_eventually_as(&node, profile, &["register", user, "--password-stdin"], &format!("{user}-password\n"))
    };
    register("ann", "ann");
    register("bob", "bob");
    let whoami = ok(chorus_as(&node, "ann", &["whoami"], None));
    assert!(whoami.starts_with("ann (session "), "{whoami}");
    let session_file = node.home.path().join(".config/chorus/sessions/ann.toml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&session_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!std::fs::read_to_string(&session_file).unwrap().contains("ann-password"), "no password is kept");

    // A private room: bob cannot read it until invited and joined.
    ok(chorus_as(&node, "ann", &["create", "plans", "--private"], None));
    ok(chorus_as(&node, "ann", &["send", "plans", "secret plan"], None));
    let refused = chorus_as(&node, "bob", &["history", "plans"], None);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not_member"), "{refused:?}");
    let rooms = ok(chorus_as(&node, "bob", &["--json", "rooms"], None));
    assert!(!rooms.contains("plans"), "bob does not see the private room: {rooms}");
    ok(chorus_as(&node, "ann", &["invite", "plans", "bob"], None));
    ok(chorus_as(&node, "bob", &["join", "plans"], None));
    let history = ok(chorus_as(&node, "bob", &["history", "plans"], None));
    assert!(history.contains("ann: secret plan") && history.contains("-- bob joined --"), "{history}");
    let members = ok(chorus_as(&node, "bob", &["members", "plans"], None));
    assert!(members.contains("ann") && members.contains("owner") && members.contains("bob"), "{members}");
    // Who is around: both ran a command within the last 30 s, so both are online.
    let who = ok(chorus_as(&node, "bob", &["who", "plans"], None));
    assert!(who.contains("ann is online") && who.contains("bob is online"), "{who}");
    // Kicked, bob cannot send there any more; the kick is in the room's history.
    ok(chorus_as(&node, "ann", &["kick", "plans", "bob", "--reason", "oops"], None));
    let after = chorus_as(&node, "bob", &["send", "plans", "still here?"], None);
    assert!(!after.status.success(), "{after:?}");
    let history = ok(chorus_as(&node, "ann", &["history", "plans"], None));
    assert!(history.contains("ann removed bob: oops") && !history.contains("still here?"), "{history}");

    // Direct messages: one room per pair, whoever opens it.
    ok(chorus_as(&node, "ann", &["dm", "bob", "hi bob"], None));
    ok(chorus_as(&node, "bob", &["dm", "ann", "hi ann"], None));
    let mine = json_lines(&ok(chorus_as(&node, "bob", &["--json", "rooms", "--mine"], None)));
    let direct: Vec<_> = mine.iter().filter(|r| r["visibility"] == "direct").collect();
    assert_eq!(direct.len(), 1, "{mine:?}");
    assert_eq!(direct[0]["last_seq"], 2);

    // Catching up: a direct message to bob is unread and a mention until he reads it.
    ok(chorus_as(&node, "ann", &["dm", "bob", "are you there?"], None));
    let synced = json_lines(&ok(chorus_as(&node, "bob", &["--json", "sync"], None)));
    let dm = synced.iter().find(|r| r["room"] == direct[0]["room"]).expect("the direct room is in bob's sync");
    let counts = (dm["read_seq"].as_u64(), dm["unread"].as_u64(), dm["mentions"].as_u64());
    assert_eq!(counts, (Some(2), Some(1), Some(1)), "{synced:?}");
    let listing = ok(chorus_as(&node, "bob", &["sync"], None));
    assert!(listing.contains("1 unread, 1 mentioning you"), "{listing}");
    let dm_room = direct[0]["room"].as_str().unwrap();
    let read = ok(chorus_as(&node, "bob", &["read", dm_room], None));
    assert!(read.contains("read up to #3 (0 unread, 0 mentions)"), "{read}");

    // Admin: create, list and disable accounts.
    let password = admin_password(&node);
    ok(chorus_as(&node, "admin", &["login", "admin", "--password-stdin"], Some(&format!("{password}\n"))));
    ok(chorus_as(&node, "admin", &["admin", "user", "add", "carol", "--password-stdin"], Some("carol-password\n")));
    let users = ok(chorus_as(&node, "admin", &["admin", "user", "list"], None));
    assert!(users.contains("carol") && users.contains("ann") && users.contains("admin"), "{users}");
    let not_admin = chorus_as(&node, "ann", &["admin", "user", "list"], None);
    assert!(String::from_utf8_lossy(&not_admin.stderr).contains("forbidden"), "{not_admin:?}");
    // A new signing key: sessions signed in before keep working, and new sign-ins use it.
    ok(chorus_as(&node, "admin", &["admin", "rotate-key"], None));
    ok(chorus_as(&node, "bob", &["whoami"], None));
    ok(chorus_as(&node, "carol", &["login", "carol", "--password-stdin"], Some("carol-password\n")));
    ok(chorus_as(&node, "carol", &["whoami"], None));
    ok(chorus_as(&node, "admin", &["admin", "user", "disable", "bob"], None));
    let disabled = chorus_as(&node, "bob", &["whoami"], None);
    assert!(!disabled.status.success(), "bob's session ended: {disabled:?}");
    let login = chorus_as(&node, "bob", &["login", "bob", "--password-stdin"], Some("bob-password\n"));
    assert!(String::from_utf8_lossy(&login.stderr).contains("user_disabled"), "{login:?}");

    // Wrong password, then signing out.
    let wrong = chorus_as(&node, "ann2", &["login", "ann", "--password-stdin"], Some("not-her-password\n"));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("invalid_credentials"), "{wrong:?}");
    ok(chorus_as(&node, "ann", &["logout"], None));
    assert!(!session_file.exists(), "logout forgets the session");
    let gone = chorus_as(&node, "ann", &["whoami"], None);
    assert!(!gone.status.success());
}

fn ok_eventually_as(node: &Node, profile: &str, args: &[&str], stdin: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = chorus_as(node, profile, args, Some(stdin));
        if output.status.success() || Instant::now() > deadline {
            return ok(output);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_send_rerun_after_an_unknown_outcome_is_appended_once() {
    let node = start_node();
    ok_eventually(&node, &["register", "tester", "--password-stdin"], Some("tester-password\n"));
    let first = json_lines(&ok(chorus(&node, &["--json", "send", "general", "only once", "--create"], None)));
    assert_eq!((first[0]["seq"].as_u64(), first[0]["duplicate"].as_bool()), (Some(1), Some(false)));
    let client_seq = first[0]["client_seq"].as_i64().unwrap();
    // As if that run had died after its send left, before it learnt the outcome: the profile's
    // send log still holds it as unsettled (this is what a failed run leaves behind).
    let log_path = node.home.path().join(".config/chorus/sessions/default.sends.toml");
    let mut log: toml::Table = toml::from_str(&std::fs::read_to_string(&log_path).unwrap()).unwrap();
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, b"only once").as_ref());
    let mut entry = toml::Table::new();
    entry.insert("room".into(), "general".into());
    entry.insert("body_sha256".into(), digest.into());
    entry.insert("client_seq".into(), client_seq.into());
    log.insert("unsettled".into(), toml::Value::Array(vec![entry.into()]));
    std::fs::write(&log_path, toml::to_string(&log).unwrap()).unwrap();
    // Run again, in a new process: the same client id and client_seq, so the server answers
    // with the original and appends nothing.
    let again = json_lines(&ok(chorus(&node, &["--json", "send", "general", "only once"], None)));
    assert_eq!((again[0]["seq"].as_u64(), again[0]["duplicate"].as_bool()), (Some(1), Some(true)), "{again:?}");
    // Settled now: the same text once more is a new message.
    let third = json_lines(&ok(chorus(&node, &["--json", "send", "general", "only once"], None)));
    assert_eq!((third[0]["seq"].as_u64(), third[0]["duplicate"].as_bool()), (Some(2), Some(false)));
    let history = json_lines(&ok(chorus(&node, &["--json", "history", "general"], None)));
    assert_eq!(history.iter().filter(|m| m["body"] == "only once").count(), 2, "{history:?}");
}
