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
    Node { child, client_addr, fingerprint, home }
}

fn chorus(node: &Node, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
    cmd.args(args)
        .env_clear()
        .env("HOME", node.home.path())
        .env("CHORUS_NODES", &node.client_addr)
        .env("CHORUS_FINGERPRINT", &node.fingerprint)
        .env("CHORUS_USER", "tester")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
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
fn ok_eventually(node: &Node, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = chorus(node, args, None);
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
    let sent = ok_eventually(&node, &["send", "general", "hello world", "--create"]);
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
    assert!(status["shards"].as_array().unwrap().iter().all(|s| s["leader"] == 1), "{status}");
    let table = ok(chorus(&node, &["status"], None));
    assert!(table.contains("SHARD") && table.contains("leader"), "{table}");
    // A reader that goes away (`chorus status | head -1`) ends the command quietly.
    let mut closed = Command::new(env!("CARGO_BIN_EXE_chorus"));
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
    let output = child.wait_with_output().unwrap();
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
        .env("HOME", node.home.path())
        .env("CHORUS_NODES", &node.client_addr)
        .env("CHORUS_FINGERPRINT", &node.fingerprint)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    for expected in 1..=3 {
        let line = lines.next().unwrap().unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap()["seq"], expected);
    }
    ok(chorus(&node, &["send", "general", "live one"], None));
    let live: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
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
