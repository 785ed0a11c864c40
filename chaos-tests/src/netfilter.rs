//! Network partitions with real packet drops: an iptables chain of DROP rules between node
//! addresses, hooked into INPUT for the duration of a run. Needs root (CAP_NET_ADMIN).
//! The chain is removed when the value is dropped, and a stale one from a crashed run is
//! replaced when a new run starts.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

pub struct Netfilter {
    chain: String,
}

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("running iptables (install it: apt-get install iptables)")?;
    if !out.status.success() {
        bail!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Netfilter {
    pub fn install(chain: &str) -> anyhow::Result<Netfilter> {
        // A leftover from a run that was killed: take it out first.
        let _ = iptables(&["-D", "INPUT", "-j", chain]);
        let _ = iptables(&["-F", chain]);
        let _ = iptables(&["-X", chain]);
        iptables(&["-N", chain]).context("partitions need root and iptables")?;
        iptables(&["-I", "INPUT", "1", "-j", chain])?;
        Ok(Netfilter { chain: chain.to_owned() })
    }

    /// Drops every packet between `a` and `b`, both ways.
    pub fn cut(&self, a: Ipv4Addr, b: Ipv4Addr) -> anyhow::Result<()> {
        for (src, dst) in [(a, b), (b, a)] {
            iptables(&["-A", &self.chain, "-s", &src.to_string(), "-d", &dst.to_string(), "-j", "DROP"])?;
        }
        Ok(())
    }

    pub fn heal(&self) -> anyhow::Result<()> {
        iptables(&["-F", &self.chain])
    }
}

impl Drop for Netfilter {
    fn drop(&mut self) {
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-D", "INPUT", "-j", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
    }
}
