//! The cluster under test: real `chorusd` processes, node N listening on its own loopback
//! address 127.0.100.N (clients on port 7400, peers on 7300), so that the packet filter can
//! cut any pair of nodes. Processes are killed (SIGKILL), paused (SIGSTOP/SIGCONT) and
//! restarted with their data; every child is killed when the cluster is dropped. With lazy
//! disks, each node's data dir is a lazyfs mount of its own (backed by `data/node-<id>`), so
//! that a node can also lose its power: whatever it wrote and did not fsync is gone.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use chorus_lazyfs::{CutReport, LazyFs};

/// Where the nodes keep their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disks {
    /// Plain directories under `data/`.
    Plain,
    /// lazyfs mounts under `disks/`, backed by `data/`; `seed` picks the torn writes.
    Lazy { seed: u64 },
}

pub struct NodeProcess {
    pub id: u64,
    pub ip: Ipv4Addr,
    pub client_addr: String,
    pub peer_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// The lazyfs mount `data_dir` is on, with lazy disks (unmounted when the cluster is dropped,
    /// after its `Drop` killed every node).
    disk: Option<LazyFs>,
}

pub struct ChaosCluster {
    pub nodes: BTreeMap<u64, NodeProcess>,
    pub fingerprint: String,
    chorusd: PathBuf,
    common_args: Vec<String>,
}

pub fn node_ip(id: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 100, id as u8)
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

impl ChaosCluster {
    /// Starts `n` nodes under `dir` (data, logs, TLS).
    pub fn start(
        chorusd: &Path,
        dir: &Path,
        n: u64,
        shards: u32,
        extra: &[String],
        disks: Disks,
    ) -> anyhow::Result<ChaosCluster> {
        if !(1..=9).contains(&n) {
            bail!("cluster size must be between 1 and 9");
        }
        let tls = dir.join("tls");
        let out = Command::new(chorusd)
            .args(["gen-cert", "--out"])
            .arg(&tls)
            .args(["--san", "localhost"])
            .output()
            .with_context(|| format!("running {}", chorusd.display()))?;
        if !out.status.success() {
            bail!("chorusd gen-cert failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let fingerprint = String::from_utf8(out.stdout)?.trim().to_string();
        // The cluster CA the nodes authenticate each other with; each issues its own
        // certificate from it at first start.
        let ca = dir.join("ca");
        if !ca.join("ca.pem").exists() {
            let out = Command::new(chorusd).args(["ca", "init", "--dir"]).arg(&ca).output()?;
            if !out.status.success() {
                bail!("chorusd ca init failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        std::fs::create_dir_all(dir.join("logs"))?;
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let ip = node_ip(id);
            let backing = dir.join("data").join(format!("node-{id}"));
            let (data_dir, disk) = match disks {
                Disks::Plain => (backing, None),
                Disks::Lazy { seed } => {
                    let mountpoint = dir.join("disks").join(format!("node-{id}"));
                    let disk = LazyFs::mount_seeded(&backing, &mountpoint, seed ^ id)
                        .with_context(|| format!("mounting node {id}'s lazy disk on {}", mountpoint.display()))?;
                    (mountpoint, Some(disk))
                }
            };
            nodes.insert(
                id,
                NodeProcess {
                    id,
                    ip,
                    client_addr: format!("{ip}:7400"),
                    peer_addr: format!("{ip}:7300"),
                    data_dir,
                    log: dir.join("logs").join(format!("node-{id}.log")),
                    child: None,
                    paused: false,
                    disk,
                },
            );
        }
        let initial_cluster = nodes.values().map(|n| format!("{}={}", n.id, n.peer_addr)).collect::<Vec<_>>().join(",");
        let mut common_args = vec![
            "--initial-cluster".to_string(),
            initial_cluster,
            "--shard-count".into(),
            shards.to_string(),
            "--tls-cert".into(),
            tls.join("cert.pem").display().to_string(),
            "--tls-key".into(),
            tls.join("key.pem").display().to_string(),
            "--peer-ca-dir".into(),
            ca.display().to_string(),
        ];
        common_args.extend(extra.iter().cloned());
        let mut cluster = ChaosCluster { nodes, fingerprint, chorusd: chorusd.to_path_buf(), common_args };
        for id in 1..=n {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn client_addrs(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.client_addr.clone()).collect()
    }

    /// Starts (or restarts) node `id` with its data dir.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let args = self.common_args.clone();
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if node.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let child = Command::new(&self.chorusd)
            .args(["--node-id", &id.to_string(), "--client-addr", &node.client_addr, "--peer-addr", &node.peer_addr])
            .args(["--web-addr", &format!("{}:7500", node.ip)])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.child.is_some())
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if let Some(mut child) = node.child.take() {
            child.kill()?;
            child.wait()?;
        }
        node.paused = false;
        Ok(())
    }

    /// kill -9, then a power cut of the node's disk: every write it did not fsync is lost (with
    /// `torn`, part of one survives). Needs lazy disks.
    pub fn power_cut(&mut self, id: u64, torn: bool) -> anyhow::Result<CutReport> {
        self.kill(id)?;
        let node = self.nodes.get_mut(&id).context("no such node")?;
        let disk = node.disk.as_mut().context("power cuts need lazy disks (Disks::Lazy)")?;
        disk.power_cut(torn).with_context(|| format!("cutting node {id}'s power"))
    }

    /// SIGSTOP.
    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if let Some(child) = &node.child {
            signal(child.id(), "STOP")?;
            node.paused = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if let (Some(child), true) = (&node.child, node.paused) {
            signal(child.id(), "CONT")?;
        }
        node.paused = false;
        Ok(())
    }

    /// Resumes paused nodes and starts stopped ones.
    pub fn restore_all(&mut self) -> anyhow::Result<()> {
        for id in self.ids() {
            self.resume(id)?;
            self.start_node(id)?;
        }
        Ok(())
    }

    /// Checks that no node died on its own (a crash is a finding, not a fault we injected).
    pub fn unexpected_exits(&mut self) -> Vec<(u64, String)> {
        let mut dead = Vec::new();
        for node in self.nodes.values_mut() {
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                dead.push((node.id, status.to_string()));
                node.child = None;
            }
        }
        dead
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for id in self.ids() {
            let _ = self.resume(id);
            let _ = self.kill(id);
        }
    }
}
