//! Read markers and offline catch-up: MarkRead moves the signed-in user's read position in a
//! room; Sync returns every room of theirs that changed since a token, with unread and mention
//! counts and the newest messages (see docs/PROTOCOL.md, "Read markers and Sync").

use bytes::Bytes;
use chorus_proto::client::{self as pb, request, response};

use crate::{Client, ClientError, unexpected};

/// Everything one catch-up returned, all pages of it.
#[derive(Debug, Clone, Default)]
pub struct Catch {
    pub rooms: Vec<pb::RoomUpdate>,
    /// The token of the next catch-up.
    pub next: Bytes,
}

impl Client {
    /// Marks `room` read up to `seq` (0: its newest entry). The marker only moves forward,
    /// unless `unread`: then it is set to `seq`, and what follows reads as unread. `share` also
    /// makes it the read receipt other members see.
    pub async fn mark_read(
        &self,
        room: &str,
        seq: u64,
        unread: bool,
        share: bool,
    ) -> Result<pb::MarkedRead, ClientError> {
        let kind = request::Kind::MarkRead(pb::MarkRead { room: room.to_owned(), seq, unread, share });
        match self.call(kind).await? {
            response::Kind::MarkedRead(m) => Ok(m),
            other => Err(unexpected("mark read", other)),
        }
    }

    /// One page of a Sync: the rooms of the signed-in user that changed since `since` (empty:
    /// all of them), newest first.
    pub async fn sync_page(
        &self,
        since: &[u8],
        limit: u32,
        messages_per_room: u32,
    ) -> Result<pb::SyncReply, ClientError> {
        let kind = request::Kind::Sync(pb::Sync { since: Bytes::copy_from_slice(since), limit, messages_per_room });
        match self.call(kind).await? {
            response::Kind::Sync(s) => Ok(s),
            other => Err(unexpected("sync", other)),
        }
    }

    /// Every page of a Sync since `since`, and the token to go on from next time.
    pub async fn sync(&self, since: &[u8], messages_per_room: u32) -> Result<Catch, ClientError> {
        let mut catch = Catch::default();
        let mut token = Bytes::copy_from_slice(since);
        loop {
            let page = self.sync_page(&token, 0, messages_per_room).await?;
            if page.more && page.rooms.is_empty() {
                return Err(ClientError::Protocol("a Sync page with no rooms said more follow".into()));
            }
            catch.rooms.extend(page.rooms);
            token = page.next;
            if !page.more {
                catch.next = token;
                return Ok(catch);
            }
        }
    }
}
