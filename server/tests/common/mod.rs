//! A cluster of real `chorusd` processes on loopback for integration tests: free ports, one
//! shared self-signed certificate, temp dirs, and children killed on drop (with the tail of
//! each node's log printed if the test failed).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chorus_client::{Client, ClientOptions, ClusterStatusReply, Credentials, Trust};

mod ports;
pub mod raw;
use ports::free_port;

/// Cluster tests run one at a time: several clusters on two cores make elections flaky.
static SERIAL: Mutex<()> = Mutex::new(());

pub const CHORUSD: &str = env!("CARGO_BIN_EXE_chorusd");

pub struct TestNode {
    pub id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    /// The HTTPS endpoint (health checks).
    pub web_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, TestNode>,
    pub fingerprint: String,
    pub shard_count: u32,
    initial_cluster: String,
    base_args: Vec<String>,
    _serial: MutexGuard<'static, ()>,
}

impl TestCluster {
    /// Starts `n` nodes with replication factor `rf`, `shards` shards and extra chorusd flags.
    /// Unless `extra` says otherwise, registration is open and there are no rate limits.
    pub fn start(n: u64, rf: usize, shards: u32, extra: &[&str]) -> TestCluster {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let out = Command::new(CHORUSD).args(["gen-cert", "--out"]).arg(&tls).output().unwrap();
        assert!(out.status.success(), "gen-cert failed: {}", String::from_utf8_lossy(&out.stderr));
        let fingerprint = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let ca = dir.path().join("ca");
        let out = Command::new(CHORUSD).args(["ca", "init", "--dir"]).arg(&ca).output().unwrap();
        assert!(out.status.success(), "ca init failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let node = TestNode {
                id,
                client_addr: format!("127.0.0.1:{}", free_port()),
                peer_addr: format!("127.0.0.1:{}", free_port()),
                web_addr: format!("127.0.0.1:{}", free_port()),
                data_dir: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
                child: None,
            };
            nodes.insert(id, node);
        }
        let initial_cluster = nodes.values().map(|n| format!("{}={}", n.id, n.peer_addr)).collect::<Vec<_>>().join(",");
        let mut base_args: Vec<String> = vec![
            "--shard-count".into(),
            shards.to_string(),
            "--replication-factor".into(),
            rf.to_string(),
            "--tls-cert".into(),
            tls.join("cert.pem").display().to_string(),
            "--tls-key".into(),
            tls.join("key.pem").display().to_string(),
            "--log".into(),
            "info,openraft=warn".into(),
            "--peer-ca-dir".into(),
            ca.display().to_string(),
        ];
        for (flag, value) in [
            ("--registration", "open"),
            ("--rate-sends-per-user", "0"),
            ("--rate-requests-per-connection", "0"),
            ("--rate-registrations-per-address", "0"),
            ("--rate-rooms-per-user", "0"),
        ] {
            if !extra.contains(&flag) {
                base_args.extend([flag.to_string(), value.to_string()]);
            }
        }
        base_args.extend(extra.iter().map(|s| s.to_string()));
        let mut cluster =
            TestCluster { dir, nodes, fingerprint, shard_count: shards, initial_cluster, base_args, _serial: serial };
        for id in 1..=n {
            cluster.spawn(id);
        }
        cluster
    }

    pub fn args_of(&self, id: u64) -> Vec<String> {
        let node = &self.nodes[&id];
        let mut args = vec![
            "--node-id".to_string(),
            id.to_string(),
            "--data-dir".into(),
            node.data_dir.display().to_string(),
            "--client-addr".into(),
            node.client_addr.clone(),
            "--peer-addr".into(),
            node.peer_addr.clone(),
            "--web-addr".into(),
            node.web_addr.clone(),
            "--initial-cluster".into(),
            self.initial_cluster.clone(),
        ];
        args.extend(self.base_args.iter().cloned());
        args
    }

    pub fn spawn(&mut self, id: u64) {
        let args = self.args_of(id);
        let node = self.nodes.get_mut(&id).unwrap();
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let child = Command::new(CHORUSD)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).unwrap().child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status once it stopped.
    pub fn terminate(&mut self, id: u64) -> std::process::ExitStatus {
        let mut child = self.nodes.get_mut(&id).unwrap().child.take().expect("node is running");
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "node {id} did not stop within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for node `id` to exit on its own; its exit status, if it did.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let node = self.nodes.get_mut(&id).unwrap();
        let child = node.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                node.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Process id of node `id`, which must be running.
    pub fn pid(&self, id: u64) -> u32 {
        self.nodes[&id].child.as_ref().expect("node is running").id()
    }

    pub fn is_running(&mut self, id: u64) -> bool {
        let node = self.nodes.get_mut(&id).unwrap();
        match node.child.as_mut() {
            None => false,
            Some(child) => child.try_wait().unwrap().is_none(),
        }
    }

    /// Options of a client signed in as `user` (registered on first use, password
    /// [`password_of`]), that knows only the given nodes.
    pub fn options(&self, ids: &[u64], user: &str) -> ClientOptions {
        let credentials = Credentials::RegisterOrLogin { user: user.to_owned(), password: password_of(user) };
        self.options_with(ids, credentials)
    }

    pub fn options_with(&self, ids: &[u64], credentials: Credentials) -> ClientOptions {
        let nodes = ids.iter().map(|id| self.nodes[id].client_addr.clone()).collect();
        let pin = chorus_client::tls::parse_fingerprint(&self.fingerprint).unwrap();
        ClientOptions::new(nodes, Trust::Fingerprints(vec![pin]), credentials)
    }

    /// A client signed in as `user` that knows only the given nodes.
    pub async fn client(&self, ids: &[u64], user: &str) -> Client {
        self.connect(self.options(ids, user)).await
    }

    /// A client that is not signed in.
    pub async fn anonymous(&self, ids: &[u64]) -> Client {
        self.connect(self.options_with(ids, Credentials::Anonymous)).await
    }

    /// Connects, retrying for up to 30 s while the cluster starts.
    pub async fn connect(&self, options: ClientOptions) -> Client {
        let ids = options.nodes.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(options.clone()).await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot connect to nodes {ids:?}: {e}"),
            }
        }
    }

    /// Waits until every shard has a leader and every running replica has applied what it
    /// committed, as seen from node `via`.
    pub async fn wait_ready(&self, via: u64) -> ClusterStatusReply {
        let client = self.anonymous(&[via]).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(status) = client.cluster_status().await
                && status.shards.iter().all(|s| s.leader != 0)
            {
                return status;
            }
            assert!(Instant::now() < deadline, "the cluster did not elect every shard's leader within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A TLS connection to node `id`'s HTTPS endpoint, its certificate pinned like the QUIC
    /// clients' (ALPN `http/1.1`).
    pub async fn web_tls(&self, id: u64) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let pin = chorus_client::tls::parse_fingerprint(&self.fingerprint).unwrap();
        let mut config = chorus_client::tls::client_crypto(&Trust::Fingerprints(vec![pin])).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let addr = &self.nodes[&id].web_addr;
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        connector.connect(name, tcp).await.map_err(|e| format!("TLS to {addr}: {e}"))
    }

    pub async fn leader_of(&self, via: u64, shard: u32) -> u64 {
        let status = self.wait_ready(via).await;
        status.shards[shard as usize].leader
    }
}

/// Awaits `future`, failing the test with what it waited for if that takes over 30 s (a hung
/// test says what it was waiting for instead of hanging the suite).
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(30), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after 30 s waiting for {what}"),
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id);
        }
        if std::thread::panicking() {
            for node in self.nodes.values() {
                eprintln!("----- node {} log (last 40 lines) -----\n{}", node.id, tail(&node.log, 40));
            }
        }
    }
}

/// The password of test user `user`.
pub fn password_of(user: &str) -> String {
    format!("{user}-secret-password")
}

/// The shard a room lands on (same function as the server's).
pub fn shard_of(room: &str, shards: u32) -> u32 {
    chorus_proto::routing::shard_for_room(room, shards)
}
