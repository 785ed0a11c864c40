//! Where a client program finds the cluster and how it trusts it, from (highest first):
//! flags, `CHORUS_*` environment variables, the config file (`--config`, default
//! `~/.config/chorus/config.toml`), the local cluster's `client.toml` written by
//! `scripts/cluster.sh` (in `$CHORUS_CLUSTER_DIR`, default `~/.local/share/chorus/cluster`),
//! and built-in defaults (nodes `127.0.0.1:7401-7403`).
//!
//! Config file keys: `nodes = ["host:port", ...]`, `fingerprints = ["hex", ...]`,
//! `ca_cert = "path"`, `insecure = true`, `server_name = "..."`.
//!
//! Who you are is a signed-in session, kept per profile (`--profile`, `CHORUS_PROFILE`, default
//! `default`) in `~/.config/chorus/sessions/<profile>.toml`, readable by its owner only
//! ([`ProfileStore`]). `chorus login` writes it, `chorus logout` removes it.
//!
//! Beside it, `<profile>.sends.toml` keeps the profile's client id, its next `client_seq` and
//! the sends whose outcome is unknown ([`SendLog`]): a send re-run after a failure (or after
//! the program died) reuses its `client_seq`, so the server appends it once.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::session::{Credentials, SessionTokens};
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
    /// Which of your signed-in identities to use (several can live on one machine).
    /// [default: default]
    #[arg(long, env = "CHORUS_PROFILE", global = true, default_value = "default")]
    pub profile: String,
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

/// `$XDG_CONFIG_HOME/chorus`, else `~/.config/chorus`.
pub fn config_dir() -> PathBuf {
    match std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("chorus"),
        None => home().unwrap_or_else(|| PathBuf::from(".")).join(".config/chorus"),
    }
}

/// Where a profile's session lives, readable by its owner only.
#[derive(Clone)]
pub struct ProfileStore {
    pub path: PathBuf,
}

impl ProfileStore {
    /// The store of profile `name` (letters, digits, '.', '_', '-').
    pub fn new(name: &str) -> Result<ProfileStore, ClientError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !name.starts_with('.');
        if !valid {
            return Err(ClientError::Config(format!(
                "{name:?} is not a profile name (letters, digits, '.', '_', '-')"
            )));
        }
        Ok(ProfileStore { path: config_dir().join("sessions").join(format!("{name}.toml")) })
    }

    /// The profile's send log (see [`SendLog`]).
    pub fn send_log(&self) -> SendLog {
        SendLog { path: self.path.with_extension("sends.toml") }
    }

    pub fn load(&self) -> Result<Option<SessionTokens>, ClientError> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text)
                .map(Some)
                .map_err(|e| ClientError::Config(format!("{}: {e} (remove it and log in again)", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ClientError::Config(format!("reading {}: {e}", self.path.display()))),
        }
    }

    /// Writes the session, mode 0600 in a directory of mode 0700.
    pub fn save(&self, session: &SessionTokens) -> Result<(), ClientError> {
        let text = toml::to_string(session).map_err(|e| ClientError::Config(e.to_string()))?;
        write_private(&self.path, &text)
    }

    pub fn remove(&self) -> Result<(), ClientError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ClientError::Config(format!("removing {}: {e}", self.path.display()))),
        }
    }
}

/// Writes `text` to `path` atomically (a synced temporary file renamed over it), mode 0600 in
/// a directory of mode 0700.
fn write_private(path: &Path, text: &str) -> Result<(), ClientError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| ClientError::Config(format!("writing {}: {e}", path.display()));
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    let temp = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp).map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&temp, path).map_err(fail)
}

/// Sends whose outcome is unknown, kept per profile: at most this many (the oldest go).
const MAX_UNSETTLED: usize = 64;

/// A profile's exactly-once state across runs: its client id, the next `client_seq`, and the
/// sends that may or may not have been appended. Every change holds an exclusive lock on
/// `<file>.lock`, so that two programs of one profile never take the same `client_seq`.
pub struct SendLog {
    path: PathBuf,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SendState {
    /// Hex.
    client_id: String,
    next_client_seq: u64,
    #[serde(default)]
    unsettled: Vec<Unsettled>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Unsettled {
    room: String,
    /// SHA-256 of the body, hex.
    body_sha256: String,
    client_seq: u64,
}

fn body_digest(body: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, body).as_ref())
}

impl SendLog {
    /// Runs `f` on the state under the lock, and saves what it leaves (a new client id on
    /// first use).
    fn update<T>(&self, f: impl FnOnce(&mut SendState) -> T) -> Result<T, ClientError> {
        let fail = |e: std::io::Error| ClientError::Config(format!("{}: {e}", self.path.display()));
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(fail)?;
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path.with_extension("lock"))
            .map_err(fail)?;
        lock.lock().map_err(fail)?;
        let mut state = match std::fs::read_to_string(&self.path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                ClientError::Config(format!("{}: {e} (remove it to start a new client id)", self.path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SendState::default(),
            Err(e) => return Err(fail(e)),
        };
        let before = state.clone();
        if crate::tls::decode_hex::<16>(&state.client_id).is_none() {
            state.client_id = hex::encode(rand::random::<[u8; 16]>());
        }
        state.next_client_seq = state.next_client_seq.max(1);
        let out = f(&mut state);
        if state != before {
            let text = toml::to_string(&state).map_err(|e| ClientError::Config(e.to_string()))?;
            write_private(&self.path, &text)?;
        }
        Ok(out)
    }

    /// The profile's client id (made on first use).
    pub fn client_id(&self) -> Result<Bytes, ClientError> {
        let id = self.update(|state| state.client_id.clone())?;
        crate::tls::decode_hex::<16>(&id)
            .map(|id| Bytes::copy_from_slice(&id))
            .ok_or_else(|| ClientError::Config(format!("{}: a bad client id", self.path.display())))
    }

    /// The `client_seq` for sending `body` to `room`: that of an unsettled send of the same
    /// body to the same room (a re-run: the server answers with the original), else a new one.
    /// It stays unsettled until [`SendLog::settle`].
    pub fn reserve(&self, room: &str, body: &[u8]) -> Result<u64, ClientError> {
        let digest = body_digest(body);
        self.update(|state| {
            if let Some(u) = state.unsettled.iter().find(|u| u.room == room && u.body_sha256 == digest) {
                return u.client_seq;
            }
            let client_seq = state.next_client_seq;
            state.next_client_seq = client_seq.saturating_add(1);
            state.unsettled.push(Unsettled { room: room.to_owned(), body_sha256: digest, client_seq });
            let excess = state.unsettled.len().saturating_sub(MAX_UNSETTLED);
            state.unsettled.drain(..excess);
            client_seq
        })
    }

    /// The send of `client_seq` has a known outcome (appended, or refused for good).
    pub fn settle(&self, client_seq: u64) -> Result<(), ClientError> {
        self.update(|state| state.unsettled.retain(|u| u.client_seq != client_seq))
    }

    /// How many sends have an unknown outcome.
    pub fn unsettled(&self) -> Result<usize, ClientError> {
        self.update(|state| state.unsettled.len())
    }
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
        let credentials = match ProfileStore::new(&self.profile)?.load()? {
            Some(session) => Credentials::Session(session),
            None => Credentials::Anonymous,
        };
        let mut options = ClientOptions::new(nodes, trust, credentials);
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
        let args = ConnectArgs { profile: "default".into(), ..Default::default() };
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
    fn a_send_rerun_after_an_unknown_outcome_reuses_its_client_seq() {
        let dir = tempfile::tempdir().unwrap();
        let log = SendLog { path: dir.path().join("p.sends.toml") };
        let first = log.reserve("general", b"hello").unwrap();
        assert_eq!(first, 1);
        // The program died (or the outcome was unknown): the same send again is the same seq.
        let again = SendLog { path: log.path.clone() };
        assert_eq!(again.reserve("general", b"hello").unwrap(), first);
        // Another body, or another room, is another send.
        assert_eq!(again.reserve("general", b"hello!").unwrap(), 2);
        assert_eq!(again.reserve("random", b"hello").unwrap(), 3);
        assert_eq!(again.unsettled().unwrap(), 3);
        // Once its outcome is known, the same text is a new message.
        again.settle(first).unwrap();
        assert_eq!(again.reserve("general", b"hello").unwrap(), 4);
        // Unknown outcomes are bounded.
        for i in 0..200u32 {
            again.reserve("r", &i.to_be_bytes()).unwrap();
        }
        assert_eq!(again.unsettled().unwrap(), MAX_UNSETTLED);
    }

    #[test]
    fn two_programs_of_one_profile_never_take_the_same_client_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sends.toml");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let log = SendLog { path };
                    (0..25u32).map(|i| log.reserve("r", format!("{t}-{i}").as_bytes()).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=100).collect::<Vec<u64>>());
    }

    #[test]
    fn without_any_trust_the_error_says_what_to_do() {
        let args = ConnectArgs { profile: "default".into(), ..Default::default() };
        let err = args.resolve_with(FileSettings::default(), FileSettings::default()).unwrap_err();
        assert!(err.to_string().contains("--fingerprint"), "{err}");
    }

    #[test]
    fn a_profile_is_private_to_its_owner_and_named_safely() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore { path: dir.path().join("sessions/work.toml") };
        assert_eq!(store.load().unwrap(), None);
        let session = SessionTokens {
            user: "ann".into(),
            refresh_token: "chr1.x.y".into(),
            session_id: "ab".into(),
            admin: false,
            access_token: String::new(),
            access_expires_ms: 0,
            session_expires_ms: 7,
        };
        store.save(&session).unwrap();
        assert_eq!(store.load().unwrap(), Some(session));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&store.path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.path().join("sessions")).unwrap().permissions().mode() & 0o777, 0o700);
        store.remove().unwrap();
        assert_eq!(store.load().unwrap(), None);
        let sends = store.send_log();
        let id = sends.client_id().unwrap();
        assert_eq!(id.len(), 16);
        assert_eq!(sends.client_id().unwrap(), id, "the client id outlives a run");
        assert_eq!(std::fs::metadata(&sends.path).unwrap().permissions().mode() & 0o777, 0o600);
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(ProfileStore::new(bad).is_err(), "{bad:?}");
        }
    }
}
