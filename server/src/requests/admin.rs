//! Admin requests: create and disable accounts, list them, rotate the token signing key. The
//! meta group's state machine checks that the actor is an enabled admin when each change
//! applies; reads check it against this node's replica. Neither trusts the token's claim.

use chorus_proto::client::{CreateUser, Done, ListUsers, SetUserDisabled, UserInfo, UserList};
use chorus_proto::storage::{self, op};
use chorus_raft::keys::META_SHARD;

use crate::auth::{Identity, normalize_user, passwords, tokens};
use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(e.to_string())
}

pub async fn create_user(node: &Node, me: &Identity, u: CreateUser) -> Result<Done, ServiceError> {
    let name = normalize_user(&u.user);
    chorus_raft::limits::validate_user_name(&name)?;
    require_admin(node, me)?;
    let (phc, credential_id) = passwords::hash(&u.password).await?;
    let op = op::Kind::CreateUser(storage::CreateUser {
        name,
        password_phc: phc,
        credential_id: credential_id.to_vec().into(),
        admin: u.admin,
        actor: me.user.clone(),
        bootstrap: false,
    });
    forward::propose_one(node, META_SHARD, op).await?;
    Ok(Done {})
}

pub async fn set_user_disabled(node: &Node, me: &Identity, d: SetUserDisabled) -> Result<Done, ServiceError> {
    let name = normalize_user(&d.user);
    chorus_raft::limits::validate_user_name(&name)?;
    let op = op::Kind::SetUserDisabled(storage::SetUserDisabled {
        user: name,
        disabled: d.disabled,
        actor: me.user.clone(),
    });
    forward::propose_one(node, META_SHARD, op).await?;
    Ok(Done {})
}

pub async fn list_users(node: &Node, me: &Identity, l: ListUsers) -> Result<UserList, ServiceError> {
    require_admin(node, me)?;
    let limit = if l.limit == 0 { 100 } else { l.limit as usize };
    let (users, more) = node.meta_reader()?.users(&l.after, limit)?;
    Ok(UserList {
        users: users
            .into_iter()
            .map(|u| UserInfo {
                user: u.name,
                created_ms: u.created_ms,
                disabled: u.disabled,
                admin: u.admin,
                external_issuer: u.external_issuer,
            })
            .collect(),
        more,
    })
}

pub async fn rotate_signing_key(node: &Node, me: &Identity) -> Result<Done, ServiceError> {
    let (private_pkcs8, public_key) = tokens::new_signing_key()?;
    let op = op::Kind::AddSigningKey(storage::AddSigningKey {
        kid: tokens::new_kid(),
        private_pkcs8: private_pkcs8.into(),
        public_key: public_key.into(),
        only_if_none: false,
        actor: me.user.clone(),
    });
    forward::propose_one(node, META_SHARD, op).await?;
    tracing::info!(by = %me.user, "rotated the token signing key");
    Ok(Done {})
}

/// `me` is an enabled admin, as this node's replica of the meta group says.
fn require_admin(node: &Node, me: &Identity) -> Result<(), ServiceError> {
    match node.meta_reader()?.user(&me.user).map_err(internal)? {
        Some(user) if user.admin && !user.disabled => Ok(()),
        _ => Err(ServiceError::Forbidden("only admins may do that".into())),
    }
}
