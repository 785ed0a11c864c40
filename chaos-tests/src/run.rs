//! One chaos run, start to end: start the cluster, create rooms, run the workload under the
//! nemesis, heal and restart everything, wait until every replica has applied everything,
//! read every room from every node, and check the history.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chorus_client::{Client, ClientOptions, Credentials, Trust};
use tokio_util::sync::CancellationToken;

use crate::checker::{self, Report};
use crate::cluster::{ChaosCluster, Disks};
use crate::history::{self, HistoryWriter, Record};
use crate::nemesis::{FaultSet, Nemesis};
use crate::netfilter::Netfilter;
use crate::workload::{self, Clock, Context, Rooms};

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub nodes: u64,
    pub shards: u32,
    pub duration: Duration,
    pub seed: u64,
    pub faults: FaultSet,
    pub out: PathBuf,
    pub chorusd: PathBuf,
    pub writers: u64,
    pub readers: u64,
    pub subscribers: u64,
    pub hot_rooms: usize,
    pub cold_rooms: usize,
}

/// Every chaos user's password (the cluster lives for one run, on loopback).
const PASSWORD: &str = "chaos-password";

fn credentials(user: &str) -> Credentials {
    Credentials::RegisterOrLogin { user: user.to_owned(), password: PASSWORD.to_owned() }
}

fn options(cluster: &ChaosCluster, first: usize, user: &str) -> anyhow::Result<ClientOptions> {
    let mut nodes = cluster.client_addrs();
    let len = nodes.len();
    nodes.rotate_left(first % len);
    let pin = chorus_client::tls::parse_fingerprint(&cluster.fingerprint)?;
    let mut o = ClientOptions::new(nodes, Trust::Fingerprints(vec![pin]), credentials(user));
    o.server_name = Some("localhost".into());
    o.retry_deadline = Duration::from_secs(10);
    Ok(o)
}

async fn connect(options: ClientOptions) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect(options.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => bail!("cannot connect to {:?}: {e}", options.nodes),
        }
    }
}

/// Waits until every shard has a leader and every replica has applied everything its leader
/// committed (nothing is in flight any more).
async fn wait_converged(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(status) = client.cluster_status().await {
            let settled = status.nodes.iter().all(|n| n.reachable)
                && status.shards.iter().all(|s| {
                    s.leader != 0
                        && s.replica_status.iter().all(|r| {
                            r.role != "unreachable" && r.applied == s.committed && r.last_log_index == s.committed
                        })
                });
            if settled {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the cluster did not converge within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(config: RunConfig) -> anyhow::Result<Report> {
    let faults = config.faults.usable_here();
    println!(
        "chorus-chaos: seed {} (replay with --seed {}), {} nodes, {:?}, faults {:?}",
        config.seed, config.seed, config.nodes, config.duration, faults
    );
    std::fs::create_dir_all(&config.out).with_context(|| format!("creating {}", config.out.display()))?;
    let history_path = config.out.join("history.jsonl");
    let history = Arc::new(HistoryWriter::create(&history_path)?);
    let net = match config.faults.partition {
        true => Some(Arc::new(Netfilter::install(&format!("CHORUS-CHAOS-{}", std::process::id())).context(
            "partition faults need root and iptables (run as root, or leave partitions out: --faults kill,pause)",
        )?)),
        false => None,
    };
    // The nodes' log filter: CHORUS_LOG when set (e.g. to see one module at debug level).
    let log = std::env::var("CHORUS_LOG").unwrap_or_else(|_| "info,openraft=warn".to_owned());
    let chorusd_args: Vec<String> = [
        "--snapshot-every-entries",
        "500",
        "--snapshot-log-percent",
        "0",
        "--log-kept-after-snapshot",
        "100",
        "--log",
        log.as_str(),
        // Everyone signs in as a user of their own, and writes as fast as the cluster lets them.
        "--registration",
        "open",
        "--rate-sends-per-user",
        "0",
        "--rate-registrations-per-address",
        "0",
        "--rate-requests-per-connection",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let disks = if faults.power_cut { Disks::Lazy { seed: config.seed } } else { Disks::Plain };
    let cluster = ChaosCluster::start(&config.chorusd, &config.out, config.nodes, config.shards, &chorusd_args, disks)?;
    let admin = connect(options(&cluster, 0, "chaos-admin")?).await?;
    // The moderator, on another connection of the same user (the rooms' owner).
    let moderator = connect(options(&cluster, 1, "chaos-admin")?).await?;
    wait_converged(&admin, Duration::from_secs(90)).await.context("waiting for the new cluster")?;

    let rooms = Rooms::new(config.hot_rooms, config.cold_rooms);
    for room in rooms.all() {
        match admin.create_room(room, Default::default(), 0).await {
            Ok(_) => {}
            Err(e) if e.code() == Some("room_exists") => {}
            Err(e) => bail!("creating room {room}: {e}"),
        }
    }
    let busy_shard = chorus_proto::routing::shard_for_room(&rooms.hot[0], config.shards);

    let clock = Clock::new();
    let stop = CancellationToken::new();
    let ctx = Arc::new(Context { history: history.clone(), clock, stop: stop.clone(), rooms: rooms.clone() });
    let mut tasks = Vec::new();
    let mut process = 0u64;
    for i in 0..config.writers {
        process += 1;
        let client = connect(options(&cluster, i as usize, &crate::history::writer_name(process))?).await?;
        tasks.push(tokio::spawn(workload::writer(process, client, config.seed ^ (process << 32), ctx.clone())));
    }
    for i in 0..config.readers {
        process += 1;
        let client = connect(options(&cluster, i as usize + 1, &format!("reader{process}"))?).await?;
        tasks.push(tokio::spawn(workload::reader(process, client, config.seed ^ (process << 32), ctx.clone())));
    }
    for i in 0..config.subscribers {
        process += 1;
        let client = connect(options(&cluster, i as usize + 2, &format!("subscriber{process}"))?).await?;
        let hot = rooms.hot[i as usize % rooms.hot.len()].clone();
        let mut cursors = vec![(hot, 0)];
        if !rooms.cold.is_empty() {
            cursors.push((rooms.cold[i as usize % rooms.cold.len()].clone(), 0));
        }
        tasks.push(tokio::spawn(workload::subscriber(process, client, cursors, ctx.clone())));
    }

    process += 1;
    let catcher = connect(options(&cluster, process as usize, crate::history::CATCHER)?).await?;
    tasks.push(tokio::spawn(workload::catcher(process, catcher, config.seed ^ 0x7379_6e63, ctx.clone())));

    let kicker = tokio::spawn(workload::moderator(moderator, config.writers, config.seed ^ 0x6b69636b, ctx.clone()));
    let cluster = Arc::new(Mutex::new(cluster));
    let nemesis = Nemesis {
        cluster: cluster.clone(),
        net: net.clone(),
        faults,
        history: history.clone(),
        clock,
        status_client: admin.clone(),
        busy_shard,
        seed: config.seed,
    };
    let until = Instant::now() + config.duration;
    let nemesis = tokio::spawn(nemesis.run(until));
    tokio::time::sleep_until(until.into()).await;
    nemesis.await.context("nemesis task")?;

    // Heal everything, stop the workload, wait for the dust to settle.
    if let Some(net) = &net {
        net.heal()?;
    }
    cluster.lock().unwrap_or_else(|p| p.into_inner()).restore_all()?;
    println!("[{:>7.1}s] healed and restored every node; stopping the workload", clock.now() as f64 / 1e9);
    stop.cancel();
    for task in tasks {
        task.await.context("workload task")?;
    }
    let kicks = kicker.await.context("moderator task")?;
    println!("[{:>7.1}s] the moderator kicked writers {kicks} times", clock.now() as f64 / 1e9);
    let converged = wait_converged(&admin, Duration::from_secs(120)).await;
    if let Err(e) = &converged {
        history.record(&Record::Nemesis {
            at_ns: clock.now(),
            action: "error".into(),
            nodes: vec![],
            detail: e.to_string(),
        });
    }

    // Final reads: through the leader, and from every node's own replica.
    println!("[{:>7.1}s] final reads", clock.now() as f64 / 1e9);
    let (ids, addrs, fingerprint) = {
        let c = cluster.lock().unwrap_or_else(|p| p.into_inner());
        (c.ids(), c.client_addrs(), c.fingerprint.clone())
    };
    for room in rooms.all() {
        let linearizable = admin.history_all(room, 0, true).await;
        history.record(&final_read(0, room, true, linearizable));
    }
    for (id, addr) in ids.iter().zip(addrs) {
        let pin = chorus_client::tls::parse_fingerprint(&fingerprint)?;
        let mut o = ClientOptions::new(vec![addr], Trust::Fingerprints(vec![pin]), credentials("final-reader"));
        o.server_name = Some("localhost".into());
        let client = connect(o).await;
        for room in rooms.all() {
            let result = match &client {
                Ok(c) => c.history_all(room, 0, false).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            history.record(&final_read(*id, room, false, result.map_err(chorus_client::ClientError::Protocol)));
        }
    }
    history.flush()?;
    drop(cluster);

    let records = history::read(&history_path)?;
    let report = checker::check(&records);
    std::fs::write(config.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    Ok(report)
}

fn final_read(
    node: u64,
    room: &str,
    linearizable: bool,
    result: Result<Vec<chorus_client::Message>, chorus_client::ClientError>,
) -> Record {
    match result {
        Ok(messages) => Record::FinalRead {
            node,
            room: room.to_owned(),
            linearizable,
            messages: Some(messages.iter().map(|m| (m.seq, crate::history::entry_text(m))).collect()),
            error: None,
        },
        Err(e) => {
            Record::FinalRead { node, room: room.to_owned(), linearizable, messages: None, error: Some(e.to_string()) }
        }
    }
}
