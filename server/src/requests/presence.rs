//! SetPresence and Typing: the signed-in user is active (or away), or typing in a room. Both
//! are ephemeral: they go to [`crate::presence`], never to Raft.

use chorus_proto::client::{Done, PresenceState, SetPresence, Typing};

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::forward;
use crate::node::Node;
use crate::presence::MAX_STATUS_BYTES;

pub fn set_presence(node: &Node, me: &Identity, p: SetPresence) -> Result<Done, ServiceError> {
    let away = match PresenceState::try_from(p.state) {
        Ok(PresenceState::Unspecified | PresenceState::Online) => false,
        Ok(PresenceState::Idle) => true,
        Ok(PresenceState::Offline) => {
            return Err(ServiceError::InvalidArgument(
                "a connected user cannot be offline: close the connection instead".into(),
            ));
        }
        Err(_) => return Err(ServiceError::InvalidArgument(format!("unknown presence state {}", p.state))),
    };
    if let Some(text) = &p.status_text
        && (text.len() > MAX_STATUS_BYTES || text.chars().any(char::is_control))
    {
        return Err(ServiceError::InvalidArgument(format!(
            "status text: at most {MAX_STATUS_BYTES} bytes, without control characters"
        )));
    }
    node.presence.activity(&me.user, away, p.status_text);
    Ok(Done {})
}

pub async fn typing(node: &Node, me: &Identity, t: Typing) -> Result<Done, ServiceError> {
    chorus_raft::limits::validate_room_name(&t.room)?;
    if !forward::is_joined(node, &t.room, &me.user).await? {
        return Err(chorus_raft::CommandError::NotMember { room: t.room }.into());
    }
    node.presence.typing(&t.room, &me.user, t.typing);
    Ok(Done {})
}
