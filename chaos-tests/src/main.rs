//! `chorus-chaos`: run a fault-injection test against a fresh local cluster, or re-check a
//! recorded history. Exits non-zero on any anomaly.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chorus_chaos::nemesis::FaultSet;
use chorus_chaos::run::{RunConfig, run};
use chorus_chaos::{checker, history};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "chorus-chaos",
    version,
    about = "Kill, power-cut, pause and partition a live Chorus cluster, and check every history"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a cluster, run the workload under faults, check the history.
    Run {
        /// Cluster size.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        /// How long faults are injected (e.g. 150s, 30m).
        #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Seed of the fault schedule and the workload. [default: random]
        #[arg(long)]
        seed: Option<u64>,
        /// Fault families: any of kill, pause, partition, power-cut (partitions need root and
        /// iptables; power cuts need /dev/fuse and fusermount3, and are left out, with a warning,
        /// where lazyfs cannot be mounted).
        #[arg(long, default_value = "kill,pause,partition,power-cut")]
        faults: FaultSet,
        /// Where the history, report, logs and data go. [default: target/chaos/seed-<seed>]
        #[arg(long)]
        out: Option<PathBuf>,
        /// The chorusd binary. [default: next to this binary]
        #[arg(long)]
        chorusd: Option<PathBuf>,
        #[arg(long, default_value_t = 6)]
        writers: u64,
        #[arg(long, default_value_t = 2)]
        readers: u64,
        #[arg(long, default_value_t = 3)]
        subscribers: u64,
        #[arg(long, default_value_t = 2)]
        hot_rooms: usize,
        #[arg(long, default_value_t = 6)]
        cold_rooms: usize,
    },
    /// Check a recorded history again.
    Check {
        history: PathBuf,
        /// Also write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chorus-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { history: path, json } => {
            let records = history::read(&path)?;
            let report = checker::check(&records);
            if let Some(json) = json {
                std::fs::write(json, serde_json::to_string_pretty(&report)?)?;
            }
            print!("{}", report.summary());
            Ok(report.valid())
        }
        Command::Run {
            nodes,
            shards,
            duration,
            seed,
            faults,
            out,
            chorusd,
            writers,
            readers,
            subscribers,
            hot_rooms,
            cold_rooms,
        } => {
            let seed = seed.unwrap_or_else(rand::random);
            let chorusd = match chorusd {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("chorusd"),
            };
            anyhow::ensure!(chorusd.exists(), "{} not found: build it, or pass --chorusd", chorusd.display());
            let out = out.unwrap_or_else(|| PathBuf::from("target/chaos").join(format!("seed-{seed}")));
            if out.exists() {
                std::fs::remove_dir_all(&out)?;
            }
            let config = RunConfig {
                nodes,
                shards,
                duration,
                seed,
                faults,
                out: out.clone(),
                chorusd,
                writers,
                readers,
                subscribers,
                hot_rooms: hot_rooms.max(1),
                cold_rooms,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let report = runtime.block_on(run(config))?;
            println!();
            print!("{}", report.summary());
            println!("history: {}  report: {}", out.join("history.jsonl").display(), out.join("report.json").display());
            if !report.valid() {
                println!("replay this schedule with: chorus-chaos run --seed {seed} --nodes {nodes} --faults ...");
            }
            Ok(report.valid())
        }
    }
}
