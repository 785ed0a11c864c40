//! Room membership: join, leave, invite, kick, ban, unban and roles (ChangeMembership), the
//! member list (Members) and direct-message rooms (OpenDirect). Who may do what is decided by
//! the room's state machine when the change applies (see `chorus_raft::state_machine::rooms`);
//! here the request is checked for syntax, and users it names are checked to exist.

use chorus_proto::client::{self, ChangeMembership, DirectRoom, MemberList, Members, MembershipChanged, OpenDirect};
use chorus_proto::storage::{self, op};
use chorus_raft::OpOutcome;
use chorus_raft::state_machine::rooms::direct_room_name;

use crate::auth::{Identity, normalize_user};
use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;

/// `name` (normalized) is an account of the cluster.
async fn existing_user(node: &Node, name: &str) -> Result<String, ServiceError> {
    let name = normalize_user(name);
    chorus_raft::limits::validate_user_name(&name)?;
    match node.read_meta(|r| Ok(r.user(&name)?), Option::is_some).await? {
        Some(_) => Ok(name),
        None => Err(chorus_raft::CommandError::UserNotFound { user: name }.into()),
    }
}

pub async fn change(
    node: &std::sync::Arc<Node>,
    me: &Identity,
    m: ChangeMembership,
) -> Result<MembershipChanged, ServiceError> {
    chorus_raft::limits::validate_room_name(&m.room)?;
    let action = client::MembershipAction::try_from(m.action)
        .ok()
        .filter(|a| *a != client::MembershipAction::Unspecified)
        .ok_or_else(|| ServiceError::InvalidArgument(format!("unknown membership action {}", m.action)))?;
    use client::MembershipAction as A;
    let user = match action {
        A::Join | A::Leave => String::new(),
        _ => existing_user(node, &m.user).await?,
    };
    let shard = node.layout.router.shard_for_room(&m.room);
    let op = op::Kind::Membership(storage::ChangeMembership {
        room: m.room.clone(),
        actor: me.user.clone(),
        user,
        action: action as i32,
        role: m.role,
        reason: m.reason,
    });
    let span = tracing::debug_span!("membership", shard, room = %m.room, action = ?action);
    match tracing::Instrument::instrument(node.batcher.submit(node, shard, op, true), span).await? {
        OpOutcome::MembershipChanged { seq, ts_ms } => Ok(MembershipChanged { room: m.room, seq, ts_ms }),
        other => Err(ServiceError::Internal(format!("a membership change answered with {other:?}"))),
    }
}

pub async fn members(node: &Node, me: &Identity, m: Members) -> Result<MemberList, ServiceError> {
    chorus_raft::limits::validate_room_name(&m.room)?;
    let shard = node.layout.router.shard_for_room(&m.room);
    forward::members(node, shard, &me.user, m).await
}

pub async fn open_direct(
    node: &std::sync::Arc<Node>,
    me: &Identity,
    d: OpenDirect,
) -> Result<DirectRoom, ServiceError> {
    let other = existing_user(node, &d.user).await?;
    if other == me.user {
        return Err(ServiceError::InvalidArgument("a direct-message room is between two different users".into()));
    }
    let room = direct_room_name(&me.user, &other);
    let mut users = vec![me.user.clone(), other];
    users.sort();
    let shard = node.layout.router.shard_for_room(&room);
    node.rate.room_creation(&me.user)?;
    let op = op::Kind::OpenDirect(storage::OpenDirect { room: room.clone(), actor: me.user.clone(), users });
    match node.batcher.submit(node, shard, op, true).await? {
        OpOutcome::DirectOpened { created } => Ok(DirectRoom { room, created }),
        other => Err(ServiceError::Internal(format!("opening a direct room answered with {other:?}"))),
    }
}
