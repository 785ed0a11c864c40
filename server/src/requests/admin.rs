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

pub async fn create_user(node: &Node, me: &Identity, u: CreateUser) -> Result<Done, ServiceError> {
    let name = normalize_user(&u.user);
    chorus_raft::limits::validate_user_name(&name)?;
    require_admin(node, me)?;
    let account = passwords::new_account(name, &u.password, u.admin, &me.user).await?;
    forward::propose_one(node, META_SHARD, op::Kind::CreateUser(account)).await?;
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
    forward::propose_one(node, META_SHARD, tokens::new_signing_key_op(&me.user, false)?).await?;
    tracing::info!(by = %me.user, "rotated the token signing key");
    Ok(Done {})
}

/// `me` is an enabled admin, as this node's replica of the meta group says.
fn require_admin(node: &Node, me: &Identity) -> Result<(), ServiceError> {
    match node.meta_reader()?.user(&me.user)? {
        Some(user) if user.admin && !user.disabled => Ok(()),
        _ => Err(ServiceError::Forbidden("only admins may do that".into())),
    }
}
