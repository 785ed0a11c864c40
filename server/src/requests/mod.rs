//! One module per client request kind: validate, execute (locally or through the shard's
//! leader), answer. Handlers of signed-in requests take the connection's verified
//! [`Identity`]; only Hello, ClusterStatus and the sign-in requests ([`account`]) run on a
//! connection that is not signed in.

pub mod account;
pub mod admin;
pub mod create_room;
pub mod hello;
pub mod history;
pub mod list_rooms;
pub mod mark_read;
pub mod membership;
pub mod presence;
pub mod send;
pub mod send_batch;
pub mod status;
pub mod subscribe;
pub mod sync;

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
    use request::Kind as K;
    use response::Kind as R;
    session.requests.request()?;
    match kind {
        K::Hello(hello) => return hello::handle(node, session, hello).await.map(R::Hello),
        K::Subscribe(_) => return Err(ServiceError::Internal("subscriptions are not unary".into())),
        _ => {}
    }
    session.said_hello()?;
    match kind {
        // The cluster's shape, for operators' health checks: no sign-in needed.
        K::ClusterStatus(_) => return Ok(R::ClusterStatus(status::handle(node).await)),
        K::Register(r) => return account::register(node, session, r).await.map(R::SignedIn),
        K::Login(l) => return account::login(node, session, l).await.map(R::SignedIn),
        K::Refresh(r) => return account::refresh(node, session, r).await.map(R::SignedIn),
        K::LoginExternal(l) => return account::login_external(node, session, l).await.map(R::SignedIn),
        _ => {}
    }
    let me = session.identity()?;
    match kind {
        K::CreateRoom(create) => create_room::handle(node, &me, create).await.map(R::RoomCreated),
        K::Send(send) => send::handle(node, &me, send, true).await.map(R::Sent),
        K::SendBatch(batch) => send_batch::handle(node, &me, batch).await.map(R::SentBatch),
        K::History(history) => history::handle(node, &me, history).await.map(R::History),
        K::ListRooms(list) => list_rooms::handle(node, &me, list).await.map(R::Rooms),
        K::Logout(l) => account::logout(node, &me, l).await.map(R::LoggedOut),
        K::ListSessions(_) => account::list_sessions(node, &me).await.map(R::Sessions),
        K::Whoami(_) => Ok(R::Whoami(account::whoami(&me))),
        K::Membership(m) => membership::change(node, &me, m).await.map(R::MembershipChanged),
        K::Members(m) => membership::members(node, &me, m).await.map(R::Members),
        K::OpenDirect(d) => membership::open_direct(node, &me, d).await.map(R::DirectRoom),
        K::MarkRead(m) => mark_read::handle(node, &me, m).await.map(R::MarkedRead),
        K::Sync(s) => sync::handle(node, &me, s).await.map(R::Sync),
        K::SetPresence(p) => presence::set_presence(node, &me, p).map(R::Done),
        K::Typing(t) => presence::typing(node, &me, t).await.map(R::Done),
        K::CreateUser(u) => admin::create_user(node, &me, u).await.map(R::Done),
        K::SetUserDisabled(d) => admin::set_user_disabled(node, &me, d).await.map(R::Done),
        K::ListUsers(l) => admin::list_users(node, &me, l).await.map(R::Users),
        K::RotateSigningKey(_) => admin::rotate_signing_key(node, &me).await.map(R::Done),
        K::Hello(_)
        | K::Subscribe(_)
        | K::ClusterStatus(_)
        | K::Register(_)
        | K::Login(_)
        | K::Refresh(_)
        | K::LoginExternal(_) => Err(ServiceError::Internal("handled above".into())),
    }
}
