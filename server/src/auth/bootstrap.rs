//! The cluster's first signing key and first admin, made once when the meta group first has a
//! leader.
//!
//! - Every node proposes a new signing key while the meta group has none (`only_if_none`: the
//!   first to commit wins, the others are refused), so tokens can be issued as soon as any
//!   node gets through.
//! - The meta group's first node (the one that initializes it) creates the first admin,
//!   `admin`, with a random password, once (`bootstrap`: refused if it was ever done): it
//!   writes the credential to `<data-dir>/admin-credentials.pending` (mode 0600) before
//!   proposing, renames it `admin-credentials` once the account is known to have it (see
//!   `first_admin`), and says in the log where it is, never what it is. Registration never
//!   hands out the name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chorus_proto::storage::{CreateUser, op};
use chorus_raft::keys::META_SHARD;

use super::passwords;
use super::tokens::new_signing_key_op;
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
/// admin, with its credentials file settled), or the node shuts down.
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
        if !key_done {
            match add_first_key(&node).await {
                Ok(()) => key_done = true,
                Err(e) => tracing::debug!(error = %e, "no signing key yet; retrying"),
            }
        }
        if !admin_done {
            match first_admin(&node, state.admin_bootstrapped).await {
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
    match forward::propose_one(node, META_SHARD, new_signing_key_op("", true)?).await {
        Ok(_) => {
            tracing::info!("created the cluster's token signing key");
            Ok(())
        }
        Err(e) if e.code() == "key_exists" => Ok(()),
        Err(e) => Err(e),
    }
}

/// The password of an earlier attempt whose outcome is unknown, if any.
async fn pending_password(pending: &Path) -> Option<String> {
    let text = tokio::fs::read_to_string(pending).await.ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("password = \""))?;
    Some(line.trim_end_matches('"').to_owned())
}

/// Creates the first admin, or settles what an earlier attempt left. An attempt's password
/// waits in `admin-credentials.pending` until the account is known to have it (the file then
/// becomes `admin-credentials`) or not to (the file goes). `bootstrapped`: this node's meta
/// replica says the first admin exists: made by an attempt whose answer was lost (a timeout
/// while the cluster formed), or long ago.
async fn first_admin(node: &Node, bootstrapped: bool) -> Result<(), ServiceError> {
    let path = credentials_path(&node.config.data_dir);
    let pending = path.with_extension("pending");
    let password = match (pending_password(&pending).await, bootstrapped) {
        (Some(password), _) => password,
        (None, true) => return Ok(()),
        (None, false) => {
            let password = super::hex(&super::refresh::random::<12>());
            let text = format!("user = \"{FIRST_ADMIN}\"\npassword = \"{password}\"\n");
            let file = pending.clone();
            tokio::task::spawn_blocking(move || crate::tls::write_private(&file, text.as_bytes()))
                .await
                .map_err(|e| ServiceError::Internal(format!("writing {}: {e}", pending.display())))?
                .map_err(|e| ServiceError::Internal(format!("writing {}: {e}", pending.display())))?;
            password
        }
    };
    if !bootstrapped {
        let account = passwords::new_account(FIRST_ADMIN.into(), &password, true, "").await?;
        let op = op::Kind::CreateUser(CreateUser { bootstrap: true, ..account });
        match forward::propose_one(node, META_SHARD, op).await {
            Ok(_) => return settle(&pending, &path, true).await,
            Err(e) if e.code() == "user_exists" => {}
            // The outcome may be unknown: the pending file stays until a retry settles it.
            Err(e) => return Err(e),
        }
    }
    let admin = node.read_meta(|r| Ok(r.user(FIRST_ADMIN)?), Option::is_some).await?;
    let ours = passwords::verify(admin.map(|a| a.password_phc), &password).await?;
    settle(&pending, &path, ours).await
}

/// The pending credentials become the credentials file if theirs is the admin's password
/// (`ours`), else are removed.
async fn settle(pending: &Path, path: &Path, ours: bool) -> Result<(), ServiceError> {
    if !ours {
        if let Err(e) = tokio::fs::remove_file(pending).await {
            tracing::warn!(error = %e, file = %pending.display(), "removing stale admin credentials");
        }
        return Ok(());
    }
    tokio::fs::rename(pending, path)
        .await
        .map_err(|e| ServiceError::Internal(format!("renaming {}: {e}", pending.display())))?;
    tracing::info!(
        user = FIRST_ADMIN,
        credentials = %path.display(),
        "created the first admin; its password is in the credentials file (mode 0600)"
    );
    Ok(())
}
