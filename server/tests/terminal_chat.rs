//! The full-screen `chorus chat` under tmux against a real 3-node cluster: what it shows is
//! read back with `capture-pane`, what the user types goes in with `send-keys`. Another user
//! (a library client) talks, types and posts elsewhere; then the node the chat is connected to
//! is killed and the chat resumes on another with nothing missed or repeated.
//!
//! Needs tmux (scripts/test.sh installs it).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::TestCluster;

/// A tmux server of its own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        let found = Command::new("tmux").arg("-V").output();
        assert!(
            found.as_ref().is_ok_and(|o| o.status.success()),
            "this test drives the terminal chat with tmux, which is not installed (scripts/test.sh installs it)"
        );
        Tmux { socket: format!("chorus-test-{}", std::process::id()) }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().unwrap()
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "chat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success(), "send-keys {keys:?}");
    }

    /// Types `text` literally (no key names).
    fn type_text(&self, text: &str) {
        assert!(self.run(&["send-keys", "-t", "chat", "-l", text]).status.success());
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "chat"]).status.success()
    }

    /// Waits until the screen satisfies `ok`; fails with the screen and `log` otherwise.
    fn until(&self, what: &str, log: &std::path::Path, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!(
                    "the chat did not show {what} within 30 s; the screen:\n{screen}\nits stderr:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn chorus_bin() -> PathBuf {
    let path = PathBuf::from(common::CHORUSD).with_file_name("chorus");
    assert!(path.exists(), "{} is missing: build the workspace's binaries (scripts/test.sh does)", path.display());
    path
}

/// Messages bob sends before the chat starts: more than a screen and the first Sync's 30.
const FILLER: usize = 80;

/// The room list's line for `label`.
fn room_line<'a>(screen: &'a str, label: &str) -> &'a str {
    screen.lines().find(|l| l.trim_start_matches('│').starts_with(label)).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_chat_shows_rooms_messages_presence_and_typing_and_resumes_after_its_node_dies() {
    let mut cluster = TestCluster::start(3, 3, 2, &[]);
    cluster.wait_ready(1).await;
    let tmux = Tmux::new();
    // Bob talks through nodes 2 and 3 only.
    let bob = cluster.client(&[2, 3], "bob").await;
    for room in ["general", "random"] {
        bob.create_room(room, BTreeMap::new(), 0).await.unwrap();
    }
    bob.send("general", "hello from bob").await.unwrap();
    // More than the first screen and the first Sync hold: the rest is paged in on scrolling.
    for i in 1..=FILLER {
        bob.send("general", format!("filler {i}")).await.unwrap();
    }

    // Alice signs in with the CLI (her session lives in her HOME) and joins both rooms.
    let home = cluster.dir.path().join("alice-home");
    std::fs::create_dir_all(&home).unwrap();
    let nodes: Vec<String> = (1..=3).map(|id| cluster.nodes[&id].client_addr.clone()).collect();
    let env: Vec<(&str, String)> = vec![
        ("HOME", home.display().to_string()),
        ("CHORUS_NODES", nodes.join(",")),
        ("CHORUS_FINGERPRINT", cluster.fingerprint.clone()),
        ("CHORUS_PROFILE", "alice".into()),
        ("TERM", "xterm-256color".into()),
    ];
    let cli = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = Command::new(chorus_bin());
        cmd.args(args).env_clear().envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "chorus {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    cli(&["register", "alice", "--password-stdin"], Some("alice-password-1\n"));
    cli(&["join", "random"], None);

    let log = cluster.dir.path().join("chat.stderr");
    let mut command = String::from("env");
    for (k, v) in &env {
        command.push_str(&format!(" {k}='{v}'"));
    }
    command.push_str(&format!(" '{}' chat general 2>'{}'", chorus_bin().display(), log.display()));
    let started = tmux.run(&["new-session", "-d", "-s", "chat", "-x", "120", "-y", "30", &command]);
    assert!(started.status.success(), "tmux: {}", String::from_utf8_lossy(&started.stderr));

    // The room list, the open room's newest messages, its members (bob online).
    let newest = format!("bob: filler {FILLER}");
    let screen = tmux.until("the rooms, bob's newest message and his presence", &log, |s| {
        s.contains(&newest) && s.contains("#random") && s.contains("● bob")
    });
    assert!(room_line(&screen, "#general").starts_with("│#general"), "{screen}");
    assert!(screen.contains("#general · 2 members"), "{screen}");
    assert!(!screen.contains("hello from bob"), "{screen}");

    // Scrolling up pages the older history in from the cluster, down to the room's start.
    let deadline = Instant::now() + Duration::from_secs(30);
    let screen = loop {
        let screen = tmux.screen();
        if screen.contains("bob: hello from bob") && screen.contains("-- the start of #general --") {
            break screen;
        }
        assert!(Instant::now() < deadline, "PageUp did not reach the start of the room: {screen}");
        tmux.keys(&["PageUp"]);
        std::thread::sleep(Duration::from_millis(150));
    };
    assert!(screen.contains("newer below (Esc)"), "{screen}");
    tmux.keys(&["Escape"]);
    tmux.until("the newest message again", &log, |s| s.contains(&newest) && !s.contains("newer below"));

    // Alice sends; it is in the room once, in order, and shown without "(sending...)".
    tmux.type_text("hi from alice");
    tmux.keys(&["Enter"]);
    tmux.until("alice's own message, acknowledged", &log, |s| {
        s.contains("alice: hi from alice") && !s.contains("(sending...)")
    });
    let page = bob.history("general", chorus_client::HistoryFrom::After(0), 100, true).await.unwrap();
    let bodies: Vec<String> =
        page.messages.iter().filter(|m| m.kind == 0).map(|m| String::from_utf8_lossy(&m.body).into_owned()).collect();
    assert_eq!(bodies.len(), FILLER + 2);
    assert_eq!(bodies[0], "hello from bob");
    assert_eq!(bodies[FILLER + 1], "hi from alice");

    // Bob types; then posts in the other room, mentioning her: counted there.
    bob.typing("general", true).await.unwrap();
    tmux.until("that bob is typing", &log, |s| s.contains("bob is typing..."));
    bob.send("random", "psst @alice").await.unwrap();
    tmux.until("a mention count on #random", &log, |s| room_line(s, "#random").contains("@1"));
    // Ctrl-N opens it: the message is there and the count is gone.
    tmux.keys(&["C-n"]);
    let screen =
        tmux.until("#random opened", &log, |s| s.contains("bob: psst @alice") && s.contains("Message #random"));
    assert!(!room_line(&screen, "#random").contains("@1"), "{screen}");

    // Kill the node the chat is connected to: it resumes on another and misses nothing.
    let node_addr = screen
        .lines()
        .find_map(|l| l.split("node ").nth(1).and_then(|rest| rest.split_whitespace().next()))
        .unwrap_or_else(|| panic!("no node in the status bar: {screen}"))
        .to_owned();
    let victim = (1..=3).find(|id| cluster.nodes[id].client_addr == node_addr).expect(&node_addr);
    cluster.kill(victim);
    // Bob's client fails over by itself if the node was one of his; a retry keeps its
    // client_seq, so it is appended once whatever the first attempt did.
    let client_seq = bob.next_client_seq();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = bob.send_with_seq("random", "after the kill", client_seq).await {
        assert!(Instant::now() < deadline, "bob could not send after node {victim} died: {e}");
    }
    let screen = tmux.until("the message sent after the kill, and the reconnection", &log, |s| {
        s.contains("bob: after the kill") && s.contains("reconnects 1")
    });
    assert_eq!(screen.matches("bob: after the kill").count(), 1, "{screen}");
    assert_eq!(screen.matches("bob: psst @alice").count(), 1, "{screen}");
    assert!(!screen.contains(&format!("node {node_addr}")), "the status bar names the new node: {screen}");

    // Ctrl-C leaves, and the terminal is given back.
    tmux.keys(&["C-c"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.alive() {
        assert!(Instant::now() < deadline, "the chat did not quit on Ctrl-C: {}", tmux.screen());
        std::thread::sleep(Duration::from_millis(100));
    }
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
