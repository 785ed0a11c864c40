//! MarkRead: moves the signed-in user's read marker in a room. The room's state machine decides
//! (forward only unless `unread`, joined members only, at most the room's newest entry; see
//! `chorus_raft::state_machine::read_markers`), so a marker and the messages around it are
//! ordered like any two entries.

use chorus_proto::client::{MarkRead, MarkedRead};
use chorus_proto::storage::{self, op};
use chorus_raft::OpOutcome;

use crate::auth::Identity;
use crate::error::ServiceError;
use crate::node::Node;

pub async fn handle(node: &std::sync::Arc<Node>, me: &Identity, m: MarkRead) -> Result<MarkedRead, ServiceError> {
    chorus_raft::limits::validate_room_name(&m.room)?;
    let shard = node.layout.router.shard_for_room(&m.room);
    let op = op::Kind::MarkRead(storage::MarkRead {
        room: m.room.clone(),
        user: me.user.clone(),
        seq: m.seq,
        unread: m.unread,
        share: m.share,
    });
    let span = tracing::debug_span!("mark_read", shard, room = %m.room, seq = m.seq);
    match tracing::Instrument::instrument(node.batcher.submit(node, shard, op, true), span).await? {
        OpOutcome::MarkedRead { read_seq, unread, mentions } => {
            Ok(MarkedRead { room: m.room, read_seq, unread, mentions })
        }
        other => Err(ServiceError::Internal(format!("a MarkRead answered with {other:?}"))),
    }
}
