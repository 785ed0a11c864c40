//! Where a client program finds the cluster and how it trusts it, from (highest first):
//! flags, `CHORUS_*` environment variables, the config file (`--config`, default
//! `~/.config/chorus/config.toml`), the local cluster's `client.toml` written by
//! `scripts/cluster.sh` (in `$CHORUS_CLUSTER_DIR`, default `~/.local/share/chorus/cluster`),
//! and built-in defaults (nodes `127.0.0.1:7401-7403`).
//!
//! Config file keys: `nodes = ["host:port", ...]`, `fingerprints = ["hex", ...]`,
//! `ca_cert = "path"`, `insecure = true`, `server_name = "..."`, `user = "..."`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tls::{Trust, parse_fingerprint};
use crate::{ClientError, ClientOptions};

pub const DEFAULT_NODES: [&str; 3] = ["127.0.0.1:7401", "127.0.0.1:7402", "127.0.0.1:7403"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub nodes: Option<Vec<String>>,
    pub fingerprints: Option<Vec<String>>,
    pub ca_cert: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub server_name: Option<String>,
    pub user: Option<String>,
}

/// Connection flags shared by every client program.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Client addresses of one or more nodes, comma-separated. [default: from the config file,
    /// else 127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403]
    #[arg(long, env = "CHORUS_NODES", value_delimiter = ',', global = true)]
    pub nodes: Vec<String>,
    /// SHA-256 fingerprint(s) of the nodes' certificates to trust (see <data-dir>/tls/fingerprint).
    #[arg(long = "fingerprint", env = "CHORUS_FINGERPRINT", value_delimiter = ',', global = true)]
    pub fingerprints: Vec<String>,
    /// Trust certificates issued by this CA (PEM) instead of pinning fingerprints.
    #[arg(long, env = "CHORUS_CA_CERT", value_name = "FILE", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Accept any certificate (development only: you cannot know who you talk to).
    #[arg(long, env = "CHORUS_INSECURE", global = true)]
    pub insecure: bool,
    /// TLS server name to request. [default: the host of each node address]
    #[arg(long, env = "CHORUS_SERVER_NAME", global = true)]
    pub server_name: Option<String>,
    /// Who you are in the chat. [default: $USER]
    #[arg(long, env = "CHORUS_USER", global = true)]
    pub user: Option<String>,
    /// Send everything through the connected node (which forwards writes to their shard's
    /// leader) instead of opening a connection to each leader and sending there directly.
    #[arg(long, env = "CHORUS_NO_LEADER_ROUTING", global = true)]
    pub no_leader_routing: bool,
    /// Client config file. [default: ~/.config/chorus/config.toml]
    #[arg(long = "config", env = "CHORUS_CLIENT_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// Where `scripts/cluster.sh` keeps the local cluster.
pub fn local_cluster_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CHORUS_CLUSTER_DIR") {
        return PathBuf::from(dir);
    }
    home().unwrap_or_else(|| PathBuf::from(".")).join(".local/share/chorus/cluster")
}

fn read_settings(path: &Path, required: bool) -> Result<FileSettings, ClientError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| ClientError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(FileSettings::default()),
        Err(e) => Err(ClientError::Config(format!("reading {}: {e}", path.display()))),
    }
}

impl ConnectArgs {
    /// Resolves the options (see the module docs for the order).
    pub fn resolve(&self) -> Result<ClientOptions, ClientError> {
        let file = match &self.config {
            Some(path) => read_settings(path, true)?,
            None => match home() {
                Some(h) => read_settings(&h.join(".config/chorus/config.toml"), false)?,
                None => FileSettings::default(),
            },
        };
        let local = read_settings(&local_cluster_dir().join("client.toml"), false)?;
        self.resolve_with(file, local)
    }

    fn resolve_with(&self, file: FileSettings, local: FileSettings) -> Result<ClientOptions, ClientError> {
        let nodes = if !self.nodes.is_empty() {
            self.nodes.clone()
        } else {
            file.nodes
                .clone()
                .or(local.nodes.clone())
                .unwrap_or_else(|| DEFAULT_NODES.iter().map(|s| s.to_string()).collect())
        };
        let trust = if self.insecure || file.insecure == Some(true) {
            Trust::Insecure
        } else if let Some(ca) = self.ca_cert.clone().or(file.ca_cert.clone()) {
            Trust::CaFile(ca)
        } else {
            let pins = if !self.fingerprints.is_empty() {
                self.fingerprints.clone()
            } else {
                file.fingerprints.clone().or(local.fingerprints.clone()).unwrap_or_default()
            };
            if pins.is_empty() {
                return Err(ClientError::Config(format!(
                    "no way to trust the server: pass --fingerprint (from <data-dir>/tls/fingerprint), --ca-cert, \
                     or --insecure; a local cluster started with scripts/cluster.sh writes {}",
                    local_cluster_dir().join("client.toml").display()
                )));
            }
            Trust::Fingerprints(pins.iter().map(|p| parse_fingerprint(p)).collect::<Result<_, _>>()?)
        };
        let user = self
            .user
            .clone()
            .or(file.user)
            .or_else(|| std::env::var("USER").ok())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "anonymous".into());
        let mut options = ClientOptions::new(nodes, trust, user);
        options.server_name = self.server_name.clone().or(file.server_name).or(local.server_name);
        options.route_to_leaders = !self.no_leader_routing;
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_then_file_then_local_cluster_then_defaults() {
        let fp = "ab".repeat(32);
        let local = || FileSettings {
            nodes: Some(vec!["10.0.0.1:1".into()]),
            fingerprints: Some(vec![fp.clone()]),
            ..Default::default()
        };
        let args = ConnectArgs { user: Some("ann".into()), ..Default::default() };
        let o = args.resolve_with(FileSettings::default(), local()).unwrap();
        assert_eq!(o.nodes, vec!["10.0.0.1:1"]);
        assert!(matches!(o.trust, Trust::Fingerprints(ref p) if p == &vec![[0xab; 32]]));

        let file = FileSettings { nodes: Some(vec!["10.0.0.2:2".into()]), ..Default::default() };
        assert_eq!(args.resolve_with(file, local()).unwrap().nodes, vec!["10.0.0.2:2"]);

        let flagged = ConnectArgs { nodes: vec!["10.0.0.3:3".into()], insecure: true, ..args.clone() };
        let o = flagged.resolve_with(FileSettings::default(), local()).unwrap();
        assert_eq!(o.nodes, vec!["10.0.0.3:3"]);
        assert!(matches!(o.trust, Trust::Insecure));
    }

    #[test]
    fn without_any_trust_the_error_says_what_to_do() {
        let err = ConnectArgs::default().resolve_with(FileSettings::default(), FileSettings::default()).unwrap_err();
        assert!(err.to_string().contains("--fingerprint"), "{err}");
    }
}
