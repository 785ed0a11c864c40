//! The nemesis: a seeded schedule of faults, one at a time — kill -9 of a random node or of the
//! busy shard's leader, power cuts (kill -9, then every write the node had not fsynced is lost,
//! sometimes with one torn write; see `chorus-lazyfs`), SIGSTOP/SIGCONT pauses, and partitions
//! (isolate a node, isolate the leader, majority/minority split, bridge) — each held for a few
//! seconds, then healed (killed nodes restart with their data). Every fault and every heal is
//! recorded in the history. The first faults cover every enabled kind, so even a short run has
//! a leader kill, a power cut, a pause and a partition.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_client::Client;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::cluster::{ChaosCluster, node_ip};
use crate::history::{HistoryWriter, Record};
use crate::netfilter::Netfilter;
use crate::workload::Clock;

/// The families of faults a run may use (`--faults kill,pause,partition,power-cut`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSet {
    pub kill: bool,
    pub pause: bool,
    pub partition: bool,
    /// Needs every node's data dir on a lazyfs mount (`cluster::Disks::Lazy`).
    pub power_cut: bool,
}

impl FaultSet {
    /// Leaves power cuts out, loudly, where lazyfs cannot be mounted (no /dev/fuse, no
    /// fusermount3, or mounting not permitted).
    pub fn usable_here(mut self) -> FaultSet {
        if !self.power_cut {
            return self;
        }
        let usable = match chorus_lazyfs::find_fusermount3() {
            None => Err("fusermount3 is not installed (apt-get install fuse3)".to_owned()),
            Some(_) => chorus_lazyfs::probe().map_err(|e| e.to_string()),
        };
        if let Err(why) = usable {
            eprintln!();
            eprintln!("chorus-chaos: WARNING: power-cut faults are OFF: lazyfs cannot be mounted here: {why}");
            eprintln!("chorus-chaos: WARNING: this run does not test durability against power loss");
            eprintln!();
            self.power_cut = false;
        }
        self
    }
}

impl std::str::FromStr for FaultSet {
    type Err = String;

    fn from_str(s: &str) -> Result<FaultSet, String> {
        let mut set = FaultSet { kill: false, pause: false, partition: false, power_cut: false };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "kill" => set.kill = true,
                "pause" => set.pause = true,
                "partition" => set.partition = true,
                "power-cut" => set.power_cut = true,
                "none" => {}
                other => {
                    return Err(format!("unknown fault {other:?} (use kill, pause, partition, power-cut or none)"));
                }
            }
        }
        Ok(set)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillRandom,
    KillLeader,
    PowerCut,
    PowerCutLeader,
    Pause,
    Isolate,
    IsolateLeader,
    Split,
    Bridge,
}

pub struct Nemesis {
    pub cluster: Arc<Mutex<ChaosCluster>>,
    pub net: Option<Arc<Netfilter>>,
    pub faults: FaultSet,
    pub history: Arc<HistoryWriter>,
    pub clock: Clock,
    /// Used to find leaders.
    pub status_client: Client,
    /// The shard whose leader "kill-leader" and "isolate-leader" target.
    pub busy_shard: u32,
    pub seed: u64,
}

impl Nemesis {
    fn enabled(&self) -> Vec<Fault> {
        let mut all = Vec::new();
        if self.faults.kill {
            all.extend([Fault::KillRandom, Fault::KillLeader]);
        }
        if self.faults.power_cut {
            all.extend([Fault::PowerCut, Fault::PowerCutLeader]);
        }
        if self.faults.pause {
            all.push(Fault::Pause);
        }
        if self.faults.partition {
            all.extend([Fault::Isolate, Fault::IsolateLeader, Fault::Split, Fault::Bridge]);
        }
        all
    }

    fn record(&self, action: &str, nodes: Vec<u64>, detail: impl Into<String>) {
        let detail = detail.into();
        println!("[{:>7.1}s] nemesis: {action} {nodes:?} {detail}", self.clock.now() as f64 / 1e9);
        self.history.record(&Record::Nemesis { at_ns: self.clock.now(), action: action.into(), nodes, detail });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChaosCluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn leader(&self, rng: &mut StdRng) -> u64 {
        let status = tokio::time::timeout(Duration::from_secs(3), self.status_client.cluster_status()).await;
        if let Ok(Ok(status)) = status
            && let Some(shard) = status.shards.get(self.busy_shard as usize)
            && shard.leader != 0
        {
            return shard.leader;
        }
        let ids = self.lock().ids();
        ids[rng.random_range(0..ids.len())]
    }

    /// Crashes nobody asked for are findings: record them, and bring the node back.
    fn note_unexpected_exits(&self) {
        let dead = self.lock().unexpected_exits();
        for (id, status) in dead {
            self.record("crash", vec![id], format!("node exited by itself: {status}"));
            if let Err(e) = self.lock().start_node(id) {
                self.record("crash", vec![id], format!("could not restart: {e}"));
            }
        }
    }

    /// Injects faults until `until`, then heals the last one.
    pub async fn run(self, until: Instant) {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let enabled = self.enabled();
        if enabled.is_empty() {
            return;
        }
        // First, one fault of each enabled family.
        let mut plan: VecDeque<Fault> = VecDeque::new();
        if self.faults.kill {
            plan.push_back(Fault::KillLeader);
        }
        if self.faults.power_cut {
            plan.push_back(Fault::PowerCutLeader);
        }
        if self.faults.pause {
            plan.push_back(Fault::Pause);
        }
        if self.faults.partition {
            plan.push_back([Fault::Isolate, Fault::IsolateLeader, Fault::Split, Fault::Bridge][rng.random_range(0..4)]);
        }
        loop {
            let quiet = Duration::from_millis(rng.random_range(1500..3500));
            let hold = Duration::from_millis(rng.random_range(3000..7000));
            if Instant::now() + quiet + hold > until {
                break;
            }
            tokio::time::sleep(quiet).await;
            self.note_unexpected_exits();
            let fault = plan.pop_front().unwrap_or_else(|| enabled[rng.random_range(0..enabled.len())]);
            if let Err(e) = self.inject(fault, hold, &mut rng).await {
                self.record("error", vec![], format!("{fault:?}: {e:#}"));
            }
        }
        self.note_unexpected_exits();
    }

    async fn inject(&self, fault: Fault, hold: Duration, rng: &mut StdRng) -> anyhow::Result<()> {
        let ids = self.lock().ids();
        let random = ids[rng.random_range(0..ids.len())];
        match fault {
            Fault::KillRandom | Fault::KillLeader => {
                let (node, action) = match fault {
                    Fault::KillLeader => (self.leader(rng).await, "kill-leader"),
                    _ => (random, "kill"),
                };
                self.lock().kill(node)?;
                self.record(action, vec![node], "kill -9");
                tokio::time::sleep(hold).await;
                self.lock().start_node(node)?;
                self.record("restart", vec![node], "");
            }
            Fault::PowerCut | Fault::PowerCutLeader => {
                let (node, action) = match fault {
                    Fault::PowerCutLeader => (self.leader(rng).await, "power-cut-leader"),
                    _ => (random, "power-cut"),
                };
                let torn = rng.random_bool(0.5);
                let cut = self.lock().power_cut(node, torn)?;
                self.record(action, vec![node], format!("kill -9, then power cut: {cut}"));
                tokio::time::sleep(hold).await;
                self.lock().start_node(node)?;
                self.record("restart", vec![node], "");
            }
            Fault::Pause => {
                self.lock().pause(random)?;
                self.record("pause", vec![random], "SIGSTOP");
                tokio::time::sleep(hold).await;
                self.lock().resume(random)?;
                self.record("resume", vec![random], "SIGCONT");
            }
            Fault::Isolate | Fault::IsolateLeader | Fault::Split | Fault::Bridge => {
                let Some(net) = &self.net else { return Ok(()) };
                let mut shuffled = ids.clone();
                shuffled.shuffle(rng);
                let (action, cuts, detail): (&str, Vec<(u64, u64)>, String) = match fault {
                    Fault::Isolate | Fault::IsolateLeader => {
                        let node = if fault == Fault::IsolateLeader { self.leader(rng).await } else { random };
                        let cuts = ids.iter().filter(|&&o| o != node).map(|&o| (node, o)).collect();
                        let action =
                            if fault == Fault::IsolateLeader { "partition-leader" } else { "partition-isolate" };
                        (action, cuts, format!("node {node} cut off from all others"))
                    }
                    Fault::Split => {
                        let minority = shuffled.len() / 2;
                        let (small, big) = shuffled.split_at(minority.max(1));
                        let cuts = small.iter().flat_map(|&a| big.iter().map(move |&b| (a, b))).collect();
                        ("partition-split", cuts, format!("{small:?} | {big:?}"))
                    }
                    _ => {
                        // Two sides that cannot see each other, and one node that sees both.
                        let bridge = shuffled[0];
                        let rest = &shuffled[1..];
                        let (left, right) = rest.split_at(rest.len() / 2);
                        let cuts = left.iter().flat_map(|&a| right.iter().map(move |&b| (a, b))).collect();
                        ("partition-bridge", cuts, format!("{left:?} | {right:?}, bridged by {bridge}"))
                    }
                };
                for (a, b) in &cuts {
                    net.cut(node_ip(*a), node_ip(*b))?;
                }
                let mut nodes: Vec<u64> = cuts.iter().flat_map(|(a, b)| [*a, *b]).collect();
                nodes.sort_unstable();
                nodes.dedup();
                self.record(action, nodes, detail);
                tokio::time::sleep(hold).await;
                net.heal()?;
                self.record("heal", vec![], "all links restored");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_cuts_are_a_fault_family_of_their_own() {
        let set: FaultSet = "kill, power-cut".parse().unwrap();
        assert_eq!(set, FaultSet { kill: true, pause: false, partition: false, power_cut: true });
        let none: FaultSet = "none".parse().unwrap();
        assert!(!none.power_cut);
        let err = "power".parse::<FaultSet>().unwrap_err();
        assert!(err.contains("power-cut"), "{err}");
    }
}
