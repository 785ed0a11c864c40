//! Rooms and who is in them: creating rooms, joining and leaving, invitations, kicks, bans and
//! roles, direct-message rooms, and the rules of who may read and who may send.
//!
//! Rules (checked here, when an entry applies, so every replica reaches the same verdict):
//! - A `PUBLIC` room is readable by anyone signed in but a banned user; anyone not banned may
//!   join it. A `PRIVATE` room is readable by its joined members only, and joined only by
//!   invitation. A `DIRECT` room is the private room of its two users, who may always (re)join.
//! - Only joined members send. Owners and admins invite, kick, ban and unban; a kick, ban or
//!   role change needs a role above the target's (an owner may not kick another owner), and a
//!   role given is at most the giver's own. A room keeps at least one owner while it has
//!   members: its last owner may neither leave nor step down.
//! - Every change that takes effect is an event in the room's sequence (`JOINED`, `KICKED`,
//!   ...), ordered with the messages around it.

use chorus_proto::storage::{
    ChangeMembership, CreateRoom, MemberRecord, MembershipAction, MembershipState, MessageKind, OpenDirect, Role,
    RoomRecord, Visibility,
};
use prost::Message;

use super::messages::Event;
use super::{ApplyBatch, MAX_PAGE, OpResult, ShardReader};
use crate::error::{CommandError, QueryError, StoreError};
use crate::limits;
use crate::types::OpOutcome;

/// Room names starting with this are direct-message rooms, made only by [`OpenDirect`].
pub const DIRECT_ROOM_PREFIX: &str = "dm.";

/// The name of the one direct-message room of two users: the prefix and 128 bits of the
/// SHA-256 of their sorted names, so that two people never get two rooms and no name can be
/// read as another pair's.
pub fn direct_room_name(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let text = format!("{first}\n{second}");
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let hex: String = digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{DIRECT_ROOM_PREFIX}{hex}")
}

fn visibility(room: &RoomRecord) -> Visibility {
    Visibility::try_from(room.visibility).unwrap_or(Visibility::Private)
}

fn state(member: Option<&MemberRecord>) -> MembershipState {
    member.and_then(|m| MembershipState::try_from(m.state).ok()).unwrap_or(MembershipState::NotMember)
}

fn role(member: Option<&MemberRecord>) -> Role {
    match state(member) {
        MembershipState::Joined => member.and_then(|m| Role::try_from(m.role).ok()).unwrap_or(Role::Member),
        _ => Role::Member,
    }
}

/// Whether the holder of `member` may read `room` (history, live feed, member list).
pub fn check_read(room: &RoomRecord, member: Option<&MemberRecord>) -> Result<(), CommandError> {
    match (state(member), visibility(room)) {
        (MembershipState::Banned, _) => Err(CommandError::Forbidden { reason: format!("banned from {}", room.name) }),
        (_, Visibility::Public) | (MembershipState::Joined, _) => Ok(()),
        _ => Err(CommandError::NotMember { room: room.name.clone() }),
    }
}

/// Whether the holder of `member` may send to `room`.
pub fn check_send(room: &RoomRecord, member: Option<&MemberRecord>) -> Result<(), CommandError> {
    match state(member) {
        MembershipState::Joined => Ok(()),
        MembershipState::Banned => Err(CommandError::Forbidden { reason: format!("banned from {}", room.name) }),
        _ => Err(CommandError::NotMember { room: room.name.clone() }),
    }
}

/// A room as one user sees it: its record and their membership (if any).
#[derive(Debug, Clone, PartialEq)]
pub struct RoomView {
    pub room: RoomRecord,
    pub member: Option<MemberRecord>,
}

/// One shard's page of rooms for a viewer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoomPage {
    pub rooms: Vec<RoomView>,
    /// The scan stopped after this room name (its budget ran out): rooms after it were not
    /// looked at. `None`: the page covers everything up to its last room, or the shard's end.
    pub scanned_to: Option<String>,
}

/// Most room records one ListRooms page looks at in a shard, visible or not.
pub const ROOM_SCAN_BUDGET: usize = 4096;

impl ShardReader {
    /// The room's record, or `None` if it does not exist on this replica (yet).
    pub fn room(&self, name: &str) -> Result<Option<RoomRecord>, QueryError> {
        limits::validate_room_name(name)?;
        let (_generation, keys) = self.generation();
        Ok(self.view.get_room(&keys, name)?)
    }

    /// The room and `viewer`'s membership of it, if the viewer may read it.
    pub fn room_view(&self, name: &str, viewer: &str) -> Result<RoomView, QueryError> {
        limits::validate_room_name(name)?;
        let (_generation, keys) = self.generation();
        let room =
            self.view.get_room(&keys, name)?.ok_or_else(|| CommandError::RoomNotFound { room: name.to_owned() })?;
        let member = self.view.get_member(&keys, room.room_id, viewer)?;
        check_read(&room, member.as_ref())?;
        Ok(RoomView { room, member })
    }

    /// `user`'s membership record of `room`, whoever asks (for the serving layer's own checks).
    pub fn member(&self, room: &str, user: &str) -> Result<Option<MemberRecord>, QueryError> {
        let (_generation, keys) = self.generation();
        let Some(record) = self.view.get_room(&keys, room)? else { return Ok(None) };
        Ok(self.view.get_member(&keys, record.room_id, user)?)
    }

    /// Members of `room` after the user name `after`, in name order, for `viewer` (who must be
    /// allowed to read the room): joined and invited members, and banned users too for the
    /// room's owners and admins. At most `limit` (capped at [`MAX_PAGE`]); `more` if others
    /// follow.
    pub fn members(
        &self,
        room: &str,
        viewer: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<MemberRecord>, bool), QueryError> {
        limits::validate_room_name(room)?;
        let (_generation, keys) = self.generation();
        let record =
            self.view.get_room(&keys, room)?.ok_or_else(|| CommandError::RoomNotFound { room: room.to_owned() })?;
        let me = self.view.get_member(&keys, record.room_id, viewer)?;
        check_read(&record, me.as_ref())?;
        let sees_bans = role(me.as_ref()) >= Role::Admin;
        let (start, end) = keys.member_range(record.room_id);
        let from = if after.is_empty() {
            start
        } else {
            let mut k = keys.member(record.room_id, after);
            k.push(0);
            k
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let mut members = Vec::new();
        // Bans hidden from a member make the scan longer than the page: bounded all the same
        // (a page cut short by the budget says `more`).
        let scanned = self.view.scan(&from, &end, ROOM_SCAN_BUDGET)?;
        let mut more = scanned.len() == ROOM_SCAN_BUDGET;
        for (key, value) in scanned {
            let member = MemberRecord::decode(value.as_ref())
                .map_err(|e| StoreError::corrupt(format!("member record {key:?} of room {room:?}"), e))?;
            if state(Some(&member)) == MembershipState::Banned && !sees_bans {
                continue;
            }
            if members.len() == limit {
                more = true;
                break;
            }
            members.push(member);
        }
        Ok((members, more))
    }

    /// Rooms of this shard that `viewer` can see, in name order, after `after`: every public
    /// room and the rooms they joined or are invited to (`mine`: only those). Looks at no more
    /// than [`ROOM_SCAN_BUDGET`] records; see [`RoomPage::scanned_to`].
    pub fn list_rooms(
        &self,
        after: Option<&str>,
        limit: usize,
        viewer: &str,
        mine: bool,
    ) -> Result<RoomPage, QueryError> {
        let (_generation, keys) = self.generation();
        let limit = limit.clamp(1, MAX_PAGE);
        let mut page = RoomPage::default();
        if mine {
            let (start, end) = keys.user_room_range(viewer);
            let from = match after {
                Some(name) => {
                    let mut k = keys.user_room(viewer, name);
                    k.push(0);
                    k
                }
                None => start.clone(),
            };
            for (key, _) in self.view.scan(&from, &end, limit)? {
                let name = std::str::from_utf8(&key[start.len()..])
                    .map_err(|e| StoreError::corrupt(format!("room index entry {key:?}"), e))?;
                let Some(room) = self.view.get_room(&keys, name)? else { continue };
                let member = self.view.get_member(&keys, room.room_id, viewer)?;
                page.rooms.push(RoomView { room, member });
            }
            return Ok(page);
        }
        let (start, end) = keys.room_range();
        let from = match after {
            Some(name) => {
                let mut k = keys.room(name);
                k.push(0); // the first key after `name`
                k
            }
            None => start,
        };
        let scanned = self.view.scan(&from, &end, ROOM_SCAN_BUDGET)?;
        let exhausted = scanned.len() == ROOM_SCAN_BUDGET;
        let mut last_name = None;
        for (key, value) in scanned {
            let room = RoomRecord::decode(value.as_ref())
                .map_err(|e| StoreError::corrupt(format!("room record {key:?} of shard {}", self.view.shard), e))?;
            last_name = Some(room.name.clone());
            let member = self.view.get_member(&keys, room.room_id, viewer)?;
            let visible = match visibility(&room) {
                Visibility::Public => state(member.as_ref()) != MembershipState::Banned,
                _ => matches!(state(member.as_ref()), MembershipState::Joined | MembershipState::Invited),
            };
            if visible {
                page.rooms.push(RoomView { room, member });
                if page.rooms.len() == limit {
                    return Ok(page);
                }
            }
        }
        if exhausted {
            page.scanned_to = last_name;
        }
        Ok(page)
    }
}

impl ApplyBatch<'_> {
    pub(super) fn create_room(&mut self, c: &CreateRoom, ts_ms: u64) -> OpResult {
        let legacy = self.rules == 0;
        if c.room.starts_with(DIRECT_ROOM_PREFIX) && !legacy {
            return Ok(Err(CommandError::RoomNameInvalid {
                name: c.room.clone(),
                reason: "names starting with \"dm.\" are kept for direct messages",
            }));
        }
        let visibility = match Visibility::try_from(c.visibility) {
            Ok(v @ (Visibility::Public | Visibility::Private)) => v,
            _ => return Ok(Err(CommandError::invalid("visibility", "must be public or private"))),
        };
        let created = self.new_room(&c.room, &c.creator, ts_ms, |room| {
            room.metadata = c.metadata.clone();
            room.retention_max_messages = c.retention_max_messages;
            room.visibility = visibility as i32;
        })?;
        let (room_id, ts_ms) = match created {
            Ok(created) => created,
            Err(e) => return Ok(Err(e)),
        };
        if legacy {
            return Ok(Ok(OpOutcome::RoomCreated { room_id, ts_ms }));
        }
        let owner = MemberRecord {
            user: c.creator.clone(),
            state: MembershipState::Joined as i32,
            role: Role::Owner as i32,
            since_ms: ts_ms,
            by: c.creator.clone(),
            since_seq: 0,
            ..Default::default()
        };
        self.set_membership(&c.room, room_id, &c.creator, None, Some(owner))?;
        Ok(Ok(OpOutcome::RoomCreated { room_id, ts_ms }))
    }

    /// Makes the record of a new, empty room; its id and creation time.
    fn new_room(
        &mut self,
        name: &str,
        creator: &str,
        ts_ms: u64,
        fill: impl FnOnce(&mut RoomRecord),
    ) -> Result<Result<(u64, u64), CommandError>, StoreError> {
        if self.room(name)?.is_some() {
            return Ok(Err(CommandError::RoomExists { room: name.to_owned() }));
        }
        let room_id = match self.next_room_id {
            Some(id) => id,
            None => self.view.get_u64(&self.keys.next_room_id(), "room id counter")?.unwrap_or(1),
        };
        self.next_room_id = Some(room_id + 1);
        let mut record = RoomRecord {
            name: name.to_owned(),
            room_id,
            creator: creator.to_owned(),
            created_ts_ms: ts_ms,
            last_ts_ms: ts_ms,
            first_seq: 1,
            ..Default::default()
        };
        fill(&mut record);
        self.rooms.insert(name.to_owned(), record);
        self.mark_dirty(name);
        self.touch_room(name);
        Ok(Ok((room_id, ts_ms)))
    }

    /// Records a membership change: the member record, the user's room index entry, and the
    /// room's member and owner counts.
    fn set_membership(
        &mut self,
        room: &str,
        room_id: u64,
        user: &str,
        before: Option<&MemberRecord>,
        after: Option<MemberRecord>,
    ) -> Result<(), StoreError> {
        let counts = |m: Option<&MemberRecord>| match state(m) {
            MembershipState::Joined => (1u64, u64::from(role(m) == Role::Owner)),
            _ => (0, 0),
        };
        let (joined_before, owners_before) = counts(before);
        let (joined_after, owners_after) = counts(after.as_ref());
        if let Some(record) = self.rooms.get_mut(room) {
            record.member_count = (record.member_count + joined_after).saturating_sub(joined_before);
            record.owner_count = (record.owner_count + owners_after).saturating_sub(owners_before);
        }
        self.mark_dirty(room);
        let index = self.keys.user_room(user, room);
        let listed = match state(after.as_ref()) {
            MembershipState::Joined | MembershipState::Invited => {
                Some(vec![after.as_ref().map_or(0, |m| m.state as u8)])
            }
            _ => None,
        };
        let current = self.member(room_id, user)?;
        let after = self.carry_read_state(room, room_id, user, current.as_ref(), after)?;
        // Through the overlay, so that the index is consistent within the batch.
        match listed {
            Some(value) => self.put(index, value)?,
            None => self.delete(index)?,
        }
        self.set_member(room_id, user, after);
        Ok(())
    }

    pub(super) fn change_membership(&mut self, m: &ChangeMembership, ts_ms: u64) -> OpResult {
        let Ok(action) = MembershipAction::try_from(m.action) else { return Ok(Err(CommandError::UnknownOperation)) };
        let Some(room) = self.room(&m.room)?.cloned() else {
            return Ok(Err(CommandError::RoomNotFound { room: m.room.clone() }));
        };
        let kind = visibility(&room);
        let actor = self.member(room.room_id, &m.actor)?;
        let target_name = match action {
            MembershipAction::Join | MembershipAction::Leave => m.actor.as_str(),
            _ => m.user.as_str(),
        };
        let target = self.member(room.room_id, target_name)?;
        let forbidden = |reason: String| Ok(Err(CommandError::Forbidden { reason }));
        let unchanged = |member: Option<&MemberRecord>| {
            Ok(Ok(OpOutcome::MembershipChanged { seq: member.map_or(0, |m| m.since_seq), ts_ms: 0 }))
        };
        let record = |state: MembershipState, role: Role| MemberRecord {
            user: target_name.to_owned(),
            state: state as i32,
            role: role as i32,
            since_ms: ts_ms,
            by: m.actor.clone(),
            since_seq: 0, // set once the event has its seq
            ..Default::default()
        };
        let (actor_state, actor_role) = (state(actor.as_ref()), role(actor.as_ref()));
        let (target_state, target_role) = (state(target.as_ref()), role(target.as_ref()));
        let manager = actor_state == MembershipState::Joined && actor_role >= Role::Admin;
        if action != MembershipAction::Join
            && action != MembershipAction::Leave
            && (kind == Visibility::Direct || !manager)
        {
            return match kind {
                Visibility::Direct => {
                    forbidden("direct-message rooms have no invitations, kicks, bans or roles".into())
                }
                _ if actor_state != MembershipState::Joined => Ok(Err(CommandError::NotMember { room: room.name })),
                _ => forbidden(format!("only owners and admins of {} may do that", room.name)),
            };
        }
        let on_others = !matches!(action, MembershipAction::Join | MembershipAction::Leave | MembershipAction::SetRole);
        if on_others && m.user == m.actor {
            return forbidden("that cannot be done to oneself (leave the room instead)".into());
        }
        let (event, new) = match action {
            MembershipAction::Unspecified => return Ok(Err(CommandError::UnknownOperation)),
            MembershipAction::Join => {
                match target_state {
                    MembershipState::Joined => return unchanged(target.as_ref()),
                    MembershipState::Banned => return forbidden(format!("banned from {}", room.name)),
                    MembershipState::Invited | MembershipState::NotMember => {}
                }
                let allowed = match kind {
                    Visibility::Public => true,
                    Visibility::Private => target_state == MembershipState::Invited,
                    Visibility::Direct => room.direct_users.iter().any(|u| u == &m.actor),
                };
                if !allowed {
                    return forbidden(format!("{} is private: join it by invitation", room.name));
                }
                (MessageKind::Joined, Some(record(MembershipState::Joined, Role::Member)))
            }
            MembershipAction::Leave => {
                if !matches!(target_state, MembershipState::Joined | MembershipState::Invited) {
                    return Ok(Err(CommandError::NotMember { room: room.name }));
                }
                if target_role == Role::Owner && room.owner_count <= 1 && room.member_count > 1 {
                    return forbidden(format!(
                        "you are the last owner of {}: make another member an owner before leaving",
                        room.name
                    ));
                }
                (MessageKind::Left, None)
            }
            MembershipAction::Invite => match target_state {
                MembershipState::Joined | MembershipState::Invited => return unchanged(target.as_ref()),
                MembershipState::Banned => return forbidden(format!("{target_name} is banned: unban them first")),
                MembershipState::NotMember => {
                    (MessageKind::Invited, Some(record(MembershipState::Invited, Role::Member)))
                }
            },
            MembershipAction::Kick => {
                if !matches!(target_state, MembershipState::Joined | MembershipState::Invited) {
                    return Ok(Err(CommandError::NotMember { room: room.name }));
                }
                if actor_role <= target_role {
                    return forbidden(format!("{target_name} ranks as high as you in {}", room.name));
                }
                (MessageKind::Kicked, None)
            }
            MembershipAction::Ban => {
                if target_state == MembershipState::Banned {
                    return unchanged(target.as_ref());
                }
                if actor_role <= target_role {
                    return forbidden(format!("{target_name} ranks as high as you in {}", room.name));
                }
                (MessageKind::Banned, Some(record(MembershipState::Banned, Role::Member)))
            }
            MembershipAction::Unban => {
                if target_state != MembershipState::Banned {
                    return Ok(Err(CommandError::NotBanned { room: room.name, user: target_name.to_owned() }));
                }
                (MessageKind::Unbanned, None)
            }
            MembershipAction::SetRole => {
                let Ok(new_role) = Role::try_from(m.role) else {
                    return Ok(Err(CommandError::invalid("role", "unknown role")));
                };
                if target_state != MembershipState::Joined {
                    return Ok(Err(CommandError::NotMember { room: room.name }));
                }
                if new_role == target_role {
                    return unchanged(target.as_ref());
                }
                let stepping_down = m.user == m.actor && new_role < actor_role;
                if !stepping_down && (actor_role <= target_role || new_role > actor_role) {
                    return forbidden(format!(
                        "you may give {target_name} no role above your own, and only if you outrank them"
                    ));
                }
                if target_role == Role::Owner && room.owner_count <= 1 {
                    return forbidden(format!("{} must keep an owner: make another member an owner first", room.name));
                }
                let mut changed = target.clone().unwrap_or_default();
                changed.role = new_role as i32;
                (MessageKind::RoleChanged, Some(changed))
            }
        };
        let role = new.as_ref().map_or(Role::Member, |n| Role::try_from(n.role).unwrap_or(Role::Member));
        let event = Event { kind: event, sender: &m.actor, target: target_name, role, reason: &m.reason };
        let (seq, ts_ms) = self.push_event(&room.name, event, ts_ms)?;
        let new = new.map(|mut n| {
            n.since_seq = seq;
            n
        });
        self.set_membership(&room.name, room.room_id, target_name, target.as_ref(), new)?;
        Ok(Ok(OpOutcome::MembershipChanged { seq, ts_ms }))
    }

    pub(super) fn open_direct(&mut self, d: &OpenDirect, ts_ms: u64) -> OpResult {
        let [a, b] = d.users.as_slice() else {
            return Ok(Err(CommandError::invalid("users", "a direct room has exactly two users")));
        };
        if a >= b || !d.users.contains(&d.actor) || d.room != direct_room_name(a, b) {
            return Ok(Err(CommandError::invalid("users", "two distinct users in name order, one of them the actor")));
        }
        if let Some(room) = self.room(&d.room)?.cloned() {
            if visibility(&room) != Visibility::Direct || room.direct_users != d.users {
                return Ok(Err(CommandError::RoomExists { room: room.name }));
            }
            let me = self.member(room.room_id, &d.actor)?;
            if state(me.as_ref()) != MembershipState::Joined {
                let join = ChangeMembership {
                    room: d.room.clone(),
                    actor: d.actor.clone(),
                    action: MembershipAction::Join as i32,
                    ..Default::default()
                };
                if let Err(e) = self.change_membership(&join, ts_ms)? {
                    return Ok(Err(e));
                }
            }
            return Ok(Ok(OpOutcome::DirectOpened { created: false }));
        }
        let created = self.new_room(&d.room, &d.actor, ts_ms, |room| {
            room.visibility = Visibility::Direct as i32;
            room.direct_users = d.users.clone();
        })?;
        let (room_id, ts_ms) = match created {
            Ok(created) => created,
            Err(e) => return Ok(Err(e)),
        };
        for user in &d.users {
            let member = MemberRecord {
                user: user.clone(),
                state: MembershipState::Joined as i32,
                role: Role::Member as i32,
                since_ms: ts_ms,
                by: d.actor.clone(),
                since_seq: 0,
                ..Default::default()
            };
            self.set_membership(&d.room, room_id, user, None, Some(member))?;
        }
        Ok(Ok(OpOutcome::DirectOpened { created: true }))
    }
}

#[cfg(test)]
mod tests {
    use chorus_proto::storage::op;

    use super::*;
    use crate::state_machine::fixture::{Fixture, refused};
    use crate::state_machine::{HistoryQuery, append_op, membership_op};

    const ALL: HistoryQuery = HistoryQuery::After { after: 0, limit: 1000 };

    fn create(room: &str, creator: &str, visibility: Visibility) -> op::Kind {
        op::Kind::CreateRoom(CreateRoom {
            room: room.into(),
            creator: creator.into(),
            visibility: visibility as i32,
            ..Default::default()
        })
    }

    fn change(room: &str, actor: &str, action: MembershipAction, user: &str) -> op::Kind {
        membership_op(room, actor, action, user)
    }

    fn set_role(room: &str, actor: &str, user: &str, role: Role) -> op::Kind {
        op::Kind::Membership(ChangeMembership {
            room: room.into(),
            actor: actor.into(),
            user: user.into(),
            action: MembershipAction::SetRole as i32,
            role: role as i32,
            reason: String::new(),
        })
    }

    fn send(room: &str, sender: &str, client_seq: u64) -> op::Kind {
        append_op(room, sender, sender.as_bytes(), client_seq, format!("{sender} {client_seq}"))
    }

    fn kinds(f: &Fixture, room: &str, viewer: &str) -> Vec<(u64, MessageKind, String)> {
        let page = f.sm.reader().history(room, ALL, viewer).unwrap();
        page.messages
            .into_iter()
            .map(|m| {
                let kind = MessageKind::try_from(m.kind).unwrap();
                let who = if m.target.is_empty() { m.sender } else { m.target };
                (m.seq, kind, who)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_rooms_creator_owns_it_and_others_send_only_once_joined() {
        let mut f = Fixture::new();
        f.apply_one(1, create("general", "ann", Visibility::Public)).await.unwrap();
        assert_eq!(refused(f.apply_one(2, send("general", "bob", 1)).await), "not_member");
        assert_eq!(
            f.apply_one(3, change("general", "bob", MembershipAction::Join, "")).await,
            Ok(OpOutcome::MembershipChanged { seq: 1, ts_ms: 3 })
        );
        // Joining again changes nothing and says when it happened.
        assert_eq!(
            f.apply_one(4, change("general", "bob", MembershipAction::Join, "")).await,
            Ok(OpOutcome::MembershipChanged { seq: 1, ts_ms: 0 })
        );
        assert!(matches!(f.apply_one(5, send("general", "bob", 2)).await, Ok(OpOutcome::Appended { seq: 2, .. })));
        assert!(matches!(f.apply_one(6, send("general", "ann", 1)).await, Ok(OpOutcome::Appended { seq: 3, .. })));
        let room = f.sm.reader().room("general").unwrap().unwrap();
        assert_eq!((room.member_count, room.owner_count), (2, 1));
        // A public room is readable by anyone signed in.
        assert_eq!(
            kinds(&f, "general", "carol"),
            vec![
                (1, MessageKind::Joined, "bob".into()),
                (2, MessageKind::Text, "bob".into()),
                (3, MessageKind::Text, "ann".into())
            ]
        );
    }

    #[tokio::test]
    async fn a_private_room_is_read_and_joined_by_its_members_only() {
        let mut f = Fixture::new();
        f.apply_one(1, create("secret", "ann", Visibility::Private)).await.unwrap();
        f.apply_one(2, send("secret", "ann", 1)).await.unwrap();
        let reader = f.sm.reader();
        assert!(matches!(
            reader.history("secret", ALL, "bob"),
            Err(QueryError::Invalid(CommandError::NotMember { .. }))
        ));
        assert_eq!(refused(f.apply_one(3, change("secret", "bob", MembershipAction::Join, "")).await), "forbidden");
        // Only owners and admins invite.
        assert_eq!(
            refused(f.apply_one(4, change("secret", "bob", MembershipAction::Invite, "carol")).await),
            "not_member"
        );
        f.apply_one(5, change("secret", "ann", MembershipAction::Invite, "bob")).await.unwrap();
        assert!(reader.history("secret", ALL, "bob").is_err(), "an invitation is not membership");
        let listed = |viewer: &str, mine: bool| -> Vec<String> {
            reader.list_rooms(None, 100, viewer, mine).unwrap().rooms.into_iter().map(|r| r.room.name).collect()
        };
        assert_eq!(listed("bob", false), vec!["secret"], "an invitee sees the room");
        assert_eq!(listed("bob", true), vec!["secret"]);
        assert!(listed("carol", false).is_empty(), "others do not see a private room");
        f.apply_one(6, change("secret", "bob", MembershipAction::Join, "")).await.unwrap();
        assert_eq!(
            kinds(&f, "secret", "bob"),
            vec![
                (1, MessageKind::Text, "ann".into()),
                (2, MessageKind::Invited, "bob".into()),
                (3, MessageKind::Joined, "bob".into())
            ]
        );
        // Leaving a private room ends the right to read it.
        f.apply_one(7, change("secret", "bob", MembershipAction::Leave, "")).await.unwrap();
        assert!(reader.history("secret", ALL, "bob").is_err());
        assert!(listed("bob", true).is_empty());
    }

    #[tokio::test]
    async fn a_kick_and_the_sends_around_it_are_ordered_like_messages() {
        let mut f = Fixture::new();
        f.apply_one(1, create("r", "ann", Visibility::Public)).await.unwrap();
        f.apply_one(2, change("r", "bob", MembershipAction::Join, "")).await.unwrap();
        // One entry: bob sends, ann kicks bob, bob sends again.
        let results = f
            .apply_cmd(
                3,
                vec![send("r", "bob", 1), change("r", "ann", MembershipAction::Kick, "bob"), send("r", "bob", 2)],
            )
            .await;
        assert!(matches!(results[0], Ok(OpOutcome::Appended { seq: 2, .. })), "{results:?}");
        assert_eq!(results[1], Ok(OpOutcome::MembershipChanged { seq: 3, ts_ms: 3 }));
        assert_eq!(results[2], Err(CommandError::NotMember { room: "r".into() }));
        // A retry of the message sent before the kick still returns its original outcome.
        assert!(matches!(
            f.apply_one(4, send("r", "bob", 1)).await,
            Ok(OpOutcome::Appended { seq: 2, duplicate: true, .. })
        ));
        assert_eq!(
            kinds(&f, "r", "ann"),
            vec![
                (1, MessageKind::Joined, "bob".into()),
                (2, MessageKind::Text, "bob".into()),
                (3, MessageKind::Kicked, "bob".into())
            ]
        );
        assert_eq!(f.sm.reader().room("r").unwrap().unwrap().member_count, 1);
    }

    #[tokio::test]
    async fn a_ban_keeps_a_user_out_and_away_from_a_public_room_until_lifted() {
        let mut f = Fixture::new();
        f.apply_one(1, create("r", "ann", Visibility::Public)).await.unwrap();
        f.apply_one(2, change("r", "ann", MembershipAction::Ban, "mallory")).await.unwrap();
        assert_eq!(refused(f.apply_one(3, change("r", "mallory", MembershipAction::Join, "")).await), "forbidden");
        assert!(matches!(
            f.sm.reader().history("r", ALL, "mallory"),
            Err(QueryError::Invalid(CommandError::Forbidden { .. }))
        ));
        assert!(f.sm.reader().list_rooms(None, 10, "mallory", false).unwrap().rooms.is_empty());
        // Bans are listed for owners and admins only.
        let (members, _) = f.sm.reader().members("r", "ann", "", 10).unwrap();
        assert_eq!(members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(), ["ann", "mallory"]);
        let (members, _) = f.sm.reader().members("r", "bob", "", 10).unwrap();
        assert_eq!(members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(), ["ann"]);
        assert_eq!(refused(f.apply_one(4, change("r", "ann", MembershipAction::Unban, "bob")).await), "not_banned");
        f.apply_one(5, change("r", "ann", MembershipAction::Unban, "mallory")).await.unwrap();
        f.apply_one(6, change("r", "mallory", MembershipAction::Join, "")).await.unwrap();
    }

    #[tokio::test]
    async fn roles_rank_owner_over_admin_over_member_and_a_room_keeps_an_owner() {
        let mut f = Fixture::new();
        f.apply_one(1, create("r", "ann", Visibility::Public)).await.unwrap();
        for user in ["bob", "carol", "dave"] {
            f.apply_one(2, change("r", user, MembershipAction::Join, "")).await.unwrap();
        }
        // A member can neither kick nor promote.
        assert_eq!(refused(f.apply_one(3, change("r", "bob", MembershipAction::Kick, "carol")).await), "forbidden");
        assert_eq!(refused(f.apply_one(3, set_role("r", "bob", "bob", Role::Admin)).await), "forbidden");
        f.apply_one(4, set_role("r", "ann", "bob", Role::Admin)).await.unwrap();
        // An admin kicks members, but not the owner, and gives no role above their own.
        f.apply_one(5, change("r", "bob", MembershipAction::Kick, "dave")).await.unwrap();
        assert_eq!(refused(f.apply_one(6, change("r", "bob", MembershipAction::Kick, "ann")).await), "forbidden");
        assert_eq!(refused(f.apply_one(6, set_role("r", "bob", "carol", Role::Owner)).await), "forbidden");
        f.apply_one(7, set_role("r", "bob", "carol", Role::Admin)).await.unwrap();
        assert_eq!(refused(f.apply_one(8, change("r", "bob", MembershipAction::Kick, "carol")).await), "forbidden");
        assert_eq!(refused(f.apply_one(8, change("r", "bob", MembershipAction::Kick, "bob")).await), "forbidden");
        // The last owner neither leaves nor steps down while others remain...
        assert_eq!(refused(f.apply_one(9, change("r", "ann", MembershipAction::Leave, "")).await), "forbidden");
        assert_eq!(refused(f.apply_one(9, set_role("r", "ann", "ann", Role::Member)).await), "forbidden");
        // ...but may once another member is an owner.
        f.apply_one(10, set_role("r", "ann", "carol", Role::Owner)).await.unwrap();
        f.apply_one(11, change("r", "ann", MembershipAction::Leave, "")).await.unwrap();
        let room = f.sm.reader().room("r").unwrap().unwrap();
        assert_eq!((room.member_count, room.owner_count), (2, 1));
        let kinds: Vec<_> = kinds(&f, "r", "bob").into_iter().map(|(_, k, who)| (k, who)).collect();
        assert!(kinds.contains(&(MessageKind::RoleChanged, "carol".into())), "{kinds:?}");
        assert!(kinds.contains(&(MessageKind::Kicked, "dave".into())), "{kinds:?}");
    }

    #[tokio::test]
    async fn two_users_have_one_direct_room_that_nobody_else_enters() {
        let mut f = Fixture::new();
        let room = direct_room_name("bob", "ann");
        assert_eq!(room, direct_room_name("ann", "bob"));
        let open = |actor: &str| {
            op::Kind::OpenDirect(OpenDirect {
                room: room.clone(),
                actor: actor.into(),
                users: vec!["ann".into(), "bob".into()],
            })
        };
        assert_eq!(f.apply_one(1, open("ann")).await, Ok(OpOutcome::DirectOpened { created: true }));
        assert_eq!(f.apply_one(2, open("bob")).await, Ok(OpOutcome::DirectOpened { created: false }));
        assert!(matches!(f.apply_one(3, send(&room, "bob", 1)).await, Ok(OpOutcome::Appended { seq: 1, .. })));
        assert_eq!(refused(f.apply_one(4, open("carol")).await), "invalid_argument");
        assert_eq!(refused(f.apply_one(4, change(&room, "carol", MembershipAction::Join, "")).await), "forbidden");
        assert_eq!(refused(f.apply_one(4, change(&room, "ann", MembershipAction::Invite, "carol")).await), "forbidden");
        assert!(f.sm.reader().history(&room, ALL, "carol").is_err());
        // A name not made from the pair, and room names kept for direct messages, are refused.
        let forged = op::Kind::OpenDirect(OpenDirect {
            room: "dm.0000".into(),
            actor: "ann".into(),
            users: vec!["ann".into(), "bob".into()],
        });
        assert_eq!(refused(f.apply_one(5, forged).await), "invalid_argument");
        assert_eq!(refused(f.apply_one(5, create("dm.squat", "carol", Visibility::Public)).await), "invalid_room_name");
        // Leaving and coming back.
        f.apply_one(6, change(&room, "bob", MembershipAction::Leave, "")).await.unwrap();
        assert_eq!(f.apply_one(7, open("bob")).await, Ok(OpOutcome::DirectOpened { created: false }));
        assert!(f.apply_one(8, send(&room, "bob", 2)).await.is_ok());
    }

    #[tokio::test]
    async fn entries_of_the_rules_before_membership_replay_without_its_checks() {
        let mut f = Fixture::new();
        let results =
            f.apply_rules(1, vec![create("old", "anyone", Visibility::Public), send("old", "someone", 1)], 0).await;
        assert!(matches!(results[1], Ok(OpOutcome::Appended { seq: 1, .. })), "{results:?}");
        let room = f.sm.reader().room("old").unwrap().unwrap();
        assert_eq!((room.member_count, room.owner_count), (0, 0), "no owner was made");
        // Under the current rules the same send is refused.
        assert_eq!(refused(f.apply_one(2, send("old", "someone", 2)).await), "not_member");
    }
}
