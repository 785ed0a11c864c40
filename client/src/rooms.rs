//! Rooms and their members: joining, leaving, invitations, kicks, bans, roles, member lists,
//! direct-message rooms; and the admin requests. The server decides who may do what (see
//! docs/PROTOCOL.md); these are the requests.

use chorus_proto::client::{self as pb, request, response};
pub use chorus_proto::client::{MembershipAction, Role, Visibility};

use crate::{Client, ClientError, unexpected};

impl Client {
    async fn membership(
        &self,
        room: &str,
        action: MembershipAction,
        user: &str,
        role: Role,
        reason: &str,
    ) -> Result<pb::MembershipChanged, ClientError> {
        let kind = request::Kind::Membership(pb::ChangeMembership {
            room: room.to_owned(),
            action: action as i32,
            user: user.to_owned(),
            role: role as i32,
            reason: reason.to_owned(),
        });
        match self.call(kind).await? {
            response::Kind::MembershipChanged(m) => Ok(m),
            other => Err(unexpected("membership change", other)),
        }
    }

    /// Joins a public room, or a private one the user is invited to.
    pub async fn join(&self, room: &str) -> Result<pb::MembershipChanged, ClientError> {
        self.membership(room, MembershipAction::Join, "", Role::Member, "").await
    }

    pub async fn leave(&self, room: &str) -> Result<pb::MembershipChanged, ClientError> {
        self.membership(room, MembershipAction::Leave, "", Role::Member, "").await
    }

    pub async fn invite(&self, room: &str, user: &str) -> Result<pb::MembershipChanged, ClientError> {
        self.membership(room, MembershipAction::Invite, user, Role::Member, "").await
    }

    pub async fn kick(&self, room: &str, user: &str, reason: &str) -> Result<pb::MembershipChanged, ClientError> {
        self.membership(room, MembershipAction::Kick, user, Role::Member, reason).await
    }

    pub async fn ban(&self, room: &str, user: &str, reason: &str) -> Result<pb::MembershipChanged, ClientError> {
        self.membership(room, MembershipAction::Ban, user, Role::Member, reason).await
    }

    pub async fn unban(&self, room: &str, user: &str) -> Result<pb::MembershipChanged, ClientError> {
        self.membership(room, MembershipAction::Unban, user, Role::Member, "").await
    }

    pub async fn set_role(&self, room: &str, user: &str, role: Role) -> Result<pb::MembershipChanged, ClientError> {
        self.membership(room, MembershipAction::SetRole, user, role, "").await
    }

    /// A page of a room's members, by name, after `after`.
    pub async fn members(&self, room: &str, after: &str, limit: u32) -> Result<pb::MemberList, ClientError> {
        let kind = request::Kind::Members(pb::Members { room: room.to_owned(), after: after.to_owned(), limit });
        match self.call(kind).await? {
            response::Kind::Members(m) => Ok(m),
            other => Err(unexpected("members", other)),
        }
    }

    /// Every member of a room.
    pub async fn all_members(&self, room: &str) -> Result<Vec<pb::Member>, ClientError> {
        let mut all: Vec<pb::Member> = Vec::new();
        loop {
            let after = all.last().map(|m| m.user.clone()).unwrap_or_default();
            let page = self.members(room, &after, 1000).await?;
            let empty = page.members.is_empty();
            all.extend(page.members);
            if !page.more || empty {
                return Ok(all);
            }
        }
    }

    /// The direct-message room of the signed-in user and `user` (made on first use).
    pub async fn open_direct(&self, user: &str) -> Result<pb::DirectRoom, ClientError> {
        match self.call(request::Kind::OpenDirect(pb::OpenDirect { user: user.to_owned() })).await? {
            response::Kind::DirectRoom(d) => Ok(d),
            other => Err(unexpected("open direct", other)),
        }
    }

    /// Admins: creates an account.
    pub async fn admin_create_user(&self, user: &str, password: &str, admin: bool) -> Result<(), ClientError> {
        let kind =
            request::Kind::CreateUser(pb::CreateUser { user: user.to_owned(), password: password.to_owned(), admin });
        self.done(kind, "create user").await
    }

    /// Admins: disables an account (ending its sessions) or enables it again.
    pub async fn admin_set_user_disabled(&self, user: &str, disabled: bool) -> Result<(), ClientError> {
        let kind = request::Kind::SetUserDisabled(pb::SetUserDisabled { user: user.to_owned(), disabled });
        self.done(kind, "disable user").await
    }

    /// Admins: a page of accounts, by name.
    pub async fn admin_list_users(&self, after: &str, limit: u32) -> Result<pb::UserList, ClientError> {
        match self.call(request::Kind::ListUsers(pb::ListUsers { after: after.to_owned(), limit })).await? {
            response::Kind::Users(u) => Ok(u),
            other => Err(unexpected("list users", other)),
        }
    }

    /// Admins: signs new access tokens with a new key.
    pub async fn admin_rotate_signing_key(&self) -> Result<(), ClientError> {
        self.done(request::Kind::RotateSigningKey(pb::RotateSigningKey {}), "rotate signing key").await
    }

    async fn done(&self, kind: request::Kind, what: &str) -> Result<(), ClientError> {
        match self.call(kind).await? {
            response::Kind::Done(_) => Ok(()),
            other => Err(unexpected(what, other)),
        }
    }
}
