//! One module per client request kind: validate, execute (locally or through the shard's
//! leader), answer.

pub mod create_room;
pub mod hello;
pub mod history;
pub mod list_rooms;
pub mod send;
pub mod send_batch;
pub mod status;
pub mod subscribe;

use std::sync::Arc;

use chorus_proto::client::{request, response};

use crate::error::ServiceError;
use crate::front_door::Session;
use crate::node::Node;

/// Runs a unary request (every kind but Subscribe).
pub async fn dispatch(
    node: &Arc<Node>,
    session: &Session,
    kind: request::Kind,
) -> Result<response::Kind, ServiceError> {
    if !matches!(kind, request::Kind::Hello(_)) {
        session.user()?;
    }
    match kind {
        request::Kind::Hello(hello) => hello::handle(node, session, hello).map(response::Kind::Hello),
        request::Kind::CreateRoom(create) => {
            create_room::handle(node, session, create).await.map(response::Kind::RoomCreated)
        }
        request::Kind::Send(send) => send::handle(node, session, send, true).await.map(response::Kind::Sent),
        request::Kind::SendBatch(batch) => {
            send_batch::handle(node, session, batch).await.map(response::Kind::SentBatch)
        }
        request::Kind::History(history) => history::handle(node, history).await.map(response::Kind::History),
        request::Kind::ListRooms(list) => list_rooms::handle(node, list).await.map(response::Kind::Rooms),
        request::Kind::ClusterStatus(_) => Ok(response::Kind::ClusterStatus(status::handle(node).await)),
        request::Kind::Subscribe(_) => Err(ServiceError::Internal("subscriptions are not unary".into())),
    }
}
