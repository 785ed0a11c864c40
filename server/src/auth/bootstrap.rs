//! The cluster's first signing key and first admin, made once when the meta group first has a
//! leader.
//!
//! - Every node proposes a new signing key while the meta group has none (`only_if_none`: the
//!   first to commit wins, the others are refused), so tokens can be issued as soon as any
//!   node gets through.
//! - The meta group's first node (the one that initializes it) creates the first admin,
//!   `admin`, with a random password, once (`bootstrap`: refused if it was ever done): it
//!   writes the credential to `<data-dir>/admin-credentials` (mode 0600) before proposing, and
//!   says in the log where it is, never what it is. Registration never hands out the name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chorus_proto::storage::{AddSigningKey, CreateUser, op};
use chorus_raft::keys::META_SHARD;

use super::passwords;
use super::tokens::{new_kid, new_signing_key};
use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

/// The first admin's name.
pub const FIRST_ADMIN: &str = "admin";
/// The file in the data dir holding the first admin's credential.
pub const CREDENTIALS_FILE: &str = "admin-credentials";

const RETRY: Duration = Duration::from_millis(500);

pub fn credentials_path(data_dir: &Path) -> PathBuf {
    data_dir.join(CREDENTIALS_FILE)
}

/// Runs until the cluster has a signing key (and, on the meta group's first node, its first
/// admin), or the node shuts down.
pub async fn run(node: Arc<Node>) {
    let makes_admin = node.layout.initializer(META_SHARD) == node.id;
    let mut key_done = false;
    let mut admin_done = !makes_admin;
    let mut ticker = crate::node::ticker(RETRY);
    while node.next_tick(&mut ticker).await {
        let Ok(reader) = node.meta_reader() else { return };
        let state = match reader.auth_state() {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(error = %e, "reading the meta group");
                continue;
            }
        };
        key_done |= !state.active_kid.is_empty();
        admin_done |= state.admin_bootstrapped;
        if !key_done {
            match add_first_key(&node).await {
                Ok(()) => key_done = true,
                Err(e) => tracing::debug!(error = %e, "no signing key yet; retrying"),
            }
        }
        if !admin_done {
            match add_first_admin(&node).await {
                Ok(()) => admin_done = true,
                Err(e) => tracing::debug!(error = %e, "no first admin yet; retrying"),
            }
        }
        if key_done && admin_done {
            return;
        }
    }
}

async fn add_first_key(node: &Node) -> Result<(), ServiceError> {
    let (private_pkcs8, public_key) = new_signing_key()?;
    let op = op::Kind::AddSigningKey(AddSigningKey {
        kid: new_kid(),
        private_pkcs8: private_pkcs8.into(),
        public_key: public_key.into(),
        only_if_none: true,
        actor: String::new(),
    });
    match forward::propose_one(node, META_SHARD, op).await {
        Ok(_) => {
            tracing::info!("created the cluster's token signing key");
            Ok(())
        }
        Err(e) if e.code() == "key_exists" => Ok(()),
        Err(e) => Err(e),
    }
}

/// The password of an earlier attempt whose outcome is unknown, if any.
fn pending_password(pending: &Path) -> Option<String> {
    let text = std::fs::read_to_string(pending).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("password = \""))?;
    Some(line.trim_end_matches('"').to_owned())
}

async fn add_first_admin(node: &Node) -> Result<(), ServiceError> {
    let path = credentials_path(&node.config.data_dir);
    let pending = path.with_extension("pending");
    // A retry uses the password of the attempt before it, which may have taken effect.
    let password = match pending_password(&pending) {
        Some(password) => password,
        None => {
            let password = super::hex(&super::refresh::random::<12>());
            write_private(&pending, &format!("user = \"{FIRST_ADMIN}\"\npassword = \"{password}\"\n"))
                .map_err(|e| ServiceError::Internal(format!("writing {}: {e}", pending.display())))?;
            password
        }
    };
    let (phc, credential_id) = passwords::hash(&password).await?;
    let op = op::Kind::CreateUser(CreateUser {
        name: FIRST_ADMIN.into(),
        password_phc: phc,
        credential_id: credential_id.to_vec().into(),
        admin: true,
        actor: String::new(),
        bootstrap: true,
    });
    match forward::propose_one(node, META_SHARD, op).await {
        Ok(_) => {
            std::fs::rename(&pending, &path)
                .map_err(|e| ServiceError::Internal(format!("renaming {}: {e}", pending.display())))?;
            tracing::info!(
                user = FIRST_ADMIN,
                credentials = %path.display(),
                "created the first admin; its password is in the credentials file (mode 0600)"
            );
            Ok(())
        }
        Err(e) if e.code() == "user_exists" => {
            // Made by an earlier attempt of ours (whose answer was lost), or long ago.
            let admin = node.meta_reader()?.user(FIRST_ADMIN).map_err(|e| ServiceError::Internal(e.to_string()))?;
            if passwords::verify(admin.map(|a| a.password_phc), &password).await? {
                std::fs::rename(&pending, &path)
                    .map_err(|e| ServiceError::Internal(format!("renaming {}: {e}", pending.display())))?;
                tracing::info!(user = FIRST_ADMIN, credentials = %path.display(), "created the first admin");
            } else {
                let _ = std::fs::remove_file(&pending);
            }
            Ok(())
        }
        Err(e) => {
            // The outcome may be unknown: keep the pending file until a retry settles it.
            Err(e)
        }
    }
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}
