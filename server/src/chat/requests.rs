//! Every request except sends: authentication, sync, history, the
//! conversation list, receipts, groups, user lookup and presence.

use std::collections::HashMap;
use std::sync::Arc;

use im_proto::ids::ConversationKind;
use im_proto::pb::frame::Body;
use im_proto::pb::{self, group_notice};
use im_proto::{ConversationId, Frame, codec};

use super::auth::{validate_password, validate_username};
use super::sessions::device_name;
use super::{ChatCounters, ChatError, Inner};
use crate::net::{ConnRef, FrameCtx};
use crate::store::{CursorKind, GroupId, GroupLimits, GroupRecord, Store, StoreError, UserId};

/// Bytes of a reply frame taken by everything but its repeated items
/// (length prefix, request id, body tag and length, flags).
const REPLY_OVERHEAD: usize = 64;
/// Groups per group-list page at most.
const MAX_GROUP_PAGE: usize = 1000;

/// Encoded size of one item of a repeated message field.
fn item_len<T: prost::Message>(item: &T) -> usize {
    let len = item.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// How many items, taken in the given order, fit in `budget` bytes
/// (at least one, so a page always makes progress).
fn fitting<'a, T: prost::Message + 'a>(items: impl Iterator<Item = &'a T>, budget: usize) -> usize {
    let mut total = 0;
    let mut count = 0;
    for item in items {
        total += item_len(item);
        if total > budget && count > 0 {
            break;
        }
        count += 1;
    }
    count
}

/// Keeps the longest prefix of `items` that fits in one reply frame;
/// true if anything was cut.
fn fit_prefix<T: prost::Message>(items: &mut Vec<T>, max_frame: usize) -> bool {
    let keep = fitting(items.iter(), max_frame.saturating_sub(REPLY_OVERHEAD));
    let cut = keep < items.len();
    items.truncate(keep);
    cut
}

/// Keeps the longest suffix of `items` that fits in one reply frame;
/// true if anything was cut.
fn fit_suffix<T: prost::Message>(items: &mut Vec<T>, max_frame: usize) -> bool {
    let keep = fitting(items.iter().rev(), max_frame.saturating_sub(REPLY_OVERHEAD));
    let cut = keep < items.len();
    items.drain(..items.len() - keep);
    cut
}

/// Senders told about one receipt in a group at most.
const MAX_RECEIPT_SENDERS: usize = 100;
/// Characters in a group name at most.
const MAX_GROUP_NAME: usize = 64;

fn group_info(g: &GroupRecord) -> pb::GroupInfo {
    pb::GroupInfo {
        group_id: g.id,
        conversation_id: ConversationId::group(g.id).map_or(0, ConversationId::raw),
        name: g.name.clone(),
        owner_id: g.owner,
        member_count: g.member_count,
    }
}

fn conversation(raw: u64) -> Result<ConversationId, ChatError> {
    ConversationId::from_raw(raw).ok_or_else(|| ChatError::invalid("invalid conversation_id"))
}

fn group_id(raw: u64) -> Result<GroupId, ChatError> {
    ConversationId::group(raw)
        .map(|_| raw)
        .ok_or_else(|| ChatError::invalid("invalid group_id"))
}

/// Checks, sorts and deduplicates user ids from a request.
fn user_ids(ids: &[u64], max: usize) -> Result<Vec<UserId>, ChatError> {
    if ids.len() > max {
        return Err(ChatError::invalid(format!(
            "at most {max} users per request"
        )));
    }
    if ids
        .iter()
        .any(|&u| !(1..=im_proto::ids::MAX_USER_ID).contains(&u))
    {
        return Err(ChatError::invalid("invalid user id"));
    }
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn page_limit(asked: u32, max: u32) -> usize {
    if asked == 0 { max } else { asked.min(max) }.max(1) as usize
}

impl<S: Store> Inner<S> {
    // ---- authentication ----

    pub(crate) async fn authenticate(&self, ctx: FrameCtx, request_id: u64, body: Body) {
        let address = ctx.peer.map(|ip| ip.to_string()).unwrap_or_default();
        let result = match body {
            Body::Register(r) => self.register(r, address).await,
            Body::Login(r) => self.login(r, ctx, address).await,
            Body::Resume(r) => self.resume(&r.token, address).await,
            _ => Err(ChatError::invalid("expected register, login or resume")),
        };
        let result = match result {
            // Register the device before the connection learns it is
            // logged in: the event loop drops pushes until the auth result
            // lands, and anything stored before the client's first sync is
            // returned by that sync.
            Ok((user_id, username, session)) => {
                let came_online = self.registry.add(user_id, ctx.conn, session);
                // An end of the session that raced this login either is in
                // the set now or found the connection registered (and
                // closes it).
                if self.revoked.check(session) == super::sessions::Known::Ended {
                    self.registry.remove(user_id, ctx.conn);
                    Err(ChatError::InvalidToken)
                } else {
                    Ok((user_id, username, session, came_online))
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((user_id, username, session_id, came_online)) => {
                if came_online {
                    if let Some(cluster) = &self.cluster {
                        // Other nodes route this user's pushes here before
                        // the client learns it is logged in and syncs: a
                        // message stored after that sync is pushed to it.
                        cluster.route_online(user_id).await;
                    }
                }
                let (token, token_expires_at_ms) =
                    self.tokens.issue(user_id, session_id, &username);
                let ok = pb::AuthOk {
                    user_id,
                    username,
                    token,
                    token_expires_at_ms,
                    heartbeat_interval_ms: self.config.heartbeat_interval_secs.saturating_mul(1000),
                    heartbeat_timeout_ms: self.config.heartbeat_timeout_secs.saturating_mul(1000),
                    server_time_ms: im_proto::now_ms(),
                    max_frame_bytes: self.config.max_frame_bytes as u32,
                    session_id,
                };
                self.answer_auth(
                    ctx.conn,
                    Some(user_id),
                    Frame::new(request_id, Body::AuthOk(ok)),
                );
                if came_online && self.cluster.is_none() {
                    // Watchers' pushes wait for room like any fan-out.
                    self.out.wait_room().await;
                    self.notify_presence(user_id, true);
                }
            }
            Err(e) => {
                if matches!(
                    e,
                    ChatError::InvalidCredentials
                        | ChatError::InvalidToken
                        | ChatError::RateLimited { .. }
                ) {
                    ChatCounters::add(&self.counters.auth_failures, 1);
                }
                self.limits.count(&e);
                self.answer_auth(ctx.conn, None, e.to_frame(request_id))
            }
        }
    }

    /// A token's user and session, if it is valid and its session live.
    async fn resume(
        &self,
        token: &str,
        address: String,
    ) -> Result<(UserId, String, u64), ChatError> {
        let claims = self.tokens.verify(token)?;
        if !self.session_live(claims.session_id).await? {
            return Err(ChatError::InvalidToken);
        }
        self.touch(claims.session_id, Some(address));
        Ok((claims.user_id, claims.username, claims.session_id))
    }

    async fn register(
        &self,
        r: pb::RegisterRequest,
        address: String,
    ) -> Result<(UserId, String, u64), ChatError> {
        validate_username(&r.username)?;
        validate_password(&r.password)?;
        let device = device_name(&r.device_name)?;
        // A taken name costs no password hash: the hash is the expensive
        // part of a registration, and clients that register-or-log-in
        // (as the load generator does) would pay it on every login. The
        // store still refuses a name taken meanwhile.
        if self.store.user_by_name(&r.username).await?.is_some() {
            return Err(ChatError::UsernameTaken);
        }
        let hash = self.passwords.hash(r.password).await?;
        // One store operation: an account its client never got a session
        // for would make the retried registration USERNAME_TAKEN.
        let (id, session) = self
            .store
            .create_user_with_session(&r.username, &hash, self.new_session(0, device, address))
            .await?;
        tracing::info!(user_id = id, username = %r.username, "registered");
        Ok((id, r.username, session))
    }

    async fn login(
        &self,
        r: pb::LoginRequest,
        ctx: FrameCtx,
        address: String,
    ) -> Result<(UserId, String, u64), ChatError> {
        if r.username.len() > 64 || r.password.len() > 1024 {
            return Err(ChatError::InvalidCredentials);
        }
        let device = device_name(&r.device_name)?;
        self.limiter.check(ctx.peer, &r.username)?;
        let user = self.store.user_by_name(&r.username).await?;
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        let ok = self.passwords.verify(r.password, hash).await?;
        match user {
            Some(user) if ok => {
                self.limiter.record_success(ctx.peer, &r.username);
                let session = self.start_session(user.id, device, address).await?;
                Ok((user.id, user.username, session))
            }
            _ => {
                self.limiter.record_failure(ctx.peer, &r.username);
                Err(ChatError::InvalidCredentials)
            }
        }
    }

    // ---- session requests ----

    pub(crate) async fn request(
        self: &Arc<Self>,
        conn: ConnRef,
        user: UserId,
        body: Body,
    ) -> Result<Body, ChatError> {
        let c = &self.config;
        match body {
            Body::Sync(r) => {
                if r.cursors.len() > c.max_sync_cursors {
                    return Err(ChatError::invalid(format!(
                        "at most {} cursors per sync request",
                        c.max_sync_cursors
                    )));
                }
                let cursors = r
                    .cursors
                    .iter()
                    .map(|cur| Ok((conversation(cur.conversation_id)?, cur.seq)))
                    .collect::<Result<Vec<_>, ChatError>>()?;
                let mut page = self
                    .store
                    .sync(user, &cursors, page_limit(r.limit, c.max_sync_page))
                    .await?;
                let expired: Vec<pb::ConvCursor> = page
                    .expired
                    .iter()
                    .map(|&(conversation_id, seq)| pb::ConvCursor {
                        conversation_id,
                        seq,
                    })
                    .collect();
                // At most one per cursor; each a tag, a length and itself.
                let expired_len: usize = expired
                    .iter()
                    .map(|e| {
                        let len = prost::Message::encoded_len(e);
                        1 + prost::length_delimiter_len(len) + len
                    })
                    .sum();
                // Each conversation's part stays a contiguous prefix.
                let cut = fit_prefix(
                    &mut page.messages,
                    c.max_frame_bytes.saturating_sub(expired_len),
                );
                Ok(Body::SyncResponse(pb::SyncResponse {
                    messages: page.messages,
                    has_more: page.has_more || cut,
                    expired,
                }))
            }
            Body::History(r) => {
                let conv = conversation(r.conversation_id)?;
                let mut page = self
                    .store
                    .history(
                        user,
                        conv,
                        r.before_seq,
                        page_limit(r.limit, c.max_history_page),
                    )
                    .await?;
                // Keep the newest: the page must end right below before_seq.
                let cut = fit_suffix(&mut page.messages, c.max_frame_bytes);
                // A page cut short ends above the floor: the next says it.
                let expired_seq = match page.expired.first() {
                    Some(&(_, floor)) if !cut => floor,
                    _ => 0,
                };
                Ok(Body::HistoryResponse(pb::HistoryResponse {
                    messages: page.messages,
                    has_more: page.has_more || cut,
                    expired_seq,
                }))
            }
            Body::ListConversations(r) => {
                let (mut conversations, has_more) = self
                    .store
                    .conversations(
                        user,
                        r.after_conversation_id,
                        page_limit(r.limit, c.max_list_page),
                    )
                    .await?;
                let cut = fit_prefix(&mut conversations, c.max_frame_bytes);
                Ok(Body::ConversationList(pb::ConversationList {
                    conversations,
                    has_more: has_more || cut,
                }))
            }
            Body::Ack(r) => {
                self.ack(conn, user, r).await?;
                Ok(Body::Done(pb::Done {}))
            }
            Body::CreateGroup(r) => self.create_group(user, r).await,
            Body::AddMembers(r) => self.add_members(user, r).await,
            Body::RemoveMembers(r) => self.remove_members(user, r).await,
            Body::LeaveGroup(r) => {
                let group = group_id(r.group_id)?;
                let (g, removed) = self.store.remove_members(group, &[user]).await?;
                if removed.is_empty() {
                    return Err(ChatError::Forbidden("not a member of this group"));
                }
                self.membership_changed(group).await;
                self.group_notice(
                    &g,
                    group_notice::Kind::MemberLeft,
                    user,
                    vec![user],
                    vec![user],
                )
                .await?;
                Ok(Body::Done(pb::Done {}))
            }
            Body::ListMembers(r) => {
                let group = group_id(r.group_id)?;
                let all = self.member_list(group, user).await?;
                let start = (r.offset as usize).min(all.len());
                let limit = if r.limit == 0 {
                    all.len()
                } else {
                    r.limit as usize
                };
                let ids: Vec<UserId> = all[start..].iter().copied().take(limit).collect();
                let names: HashMap<UserId, String> = self
                    .store
                    .lookup_users(&ids, &[])
                    .await?
                    .into_iter()
                    .collect();
                let mut members: Vec<pb::User> = ids
                    .into_iter()
                    .map(|id| pb::User {
                        user_id: id,
                        username: names.get(&id).cloned().unwrap_or_default(),
                    })
                    .collect();
                fit_prefix(&mut members, c.max_frame_bytes);
                let has_more = start + members.len() < all.len();
                Ok(Body::MemberList(pb::MemberList {
                    group_id: group,
                    members,
                    has_more,
                }))
            }
            Body::ListGroups(r) => {
                let limit = page_limit(r.limit, MAX_GROUP_PAGE as u32);
                let (groups, more) = self
                    .store
                    .user_groups(user, r.after_group_id, limit)
                    .await?;
                let mut infos: Vec<pb::GroupInfo> = groups.iter().map(group_info).collect();
                let cut = fit_prefix(&mut infos, c.max_frame_bytes);
                Ok(Body::GroupList(pb::GroupList {
                    groups: infos,
                    has_more: more || cut,
                }))
            }
            Body::LookupUsers(r) => {
                // Replies must fit one frame: about 48 bytes per user.
                let max_lookup = c.max_lookup.min(c.max_frame_bytes / 48);
                if r.usernames.len() + r.user_ids.len() > max_lookup {
                    return Err(ChatError::invalid(format!(
                        "at most {} users per lookup",
                        c.max_lookup
                    )));
                }
                let ids: Vec<UserId> = r
                    .user_ids
                    .into_iter()
                    .filter(|&u| (1..=im_proto::ids::MAX_USER_ID).contains(&u))
                    .collect();
                let users = self.store.lookup_users(&ids, &r.usernames).await?;
                Ok(Body::UserList(pb::UserList {
                    users: users
                        .into_iter()
                        .map(|(user_id, username)| pb::User { user_id, username })
                        .collect(),
                }))
            }
            Body::PresenceSubscribe(r) => {
                let max = c.max_presence_subscriptions.min(c.max_frame_bytes / 16);
                let ids = user_ids(&r.user_ids, max)?;
                self.presence
                    .subscribe(conn, ids.clone(), || self.registry.has_device(user, conn));
                let mut online: Vec<bool> =
                    ids.iter().map(|&u| self.registry.is_online(u)).collect();
                if let Some(cluster) = &self.cluster {
                    // Online anywhere: the routes of every live node.
                    match cluster.online(&ids).await {
                        Ok(anywhere) => {
                            for (here, there) in online.iter_mut().zip(anywhere) {
                                *here |= there;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "presence snapshot: routes unreadable")
                        }
                    }
                }
                let users = ids
                    .into_iter()
                    .zip(online)
                    .map(|(user_id, online)| pb::Presence { user_id, online })
                    .collect();
                Ok(Body::PresenceSnapshot(pb::PresenceSnapshot { users }))
            }
            Body::Logout(r) => self.logout(conn, user, r).await,
            Body::ChangePassword(r) => self.change_password(conn, user, r).await,
            Body::ListSessions(_) => self.list_sessions(conn, user).await,
            Body::EndSession(r) => self.end_session(conn, user, r).await,
            Body::Register(_) | Body::Login(_) | Body::Resume(_) => Err(ChatError::invalid(
                "this connection is already authenticated",
            )),
            _ => Err(ChatError::invalid("not a request the server accepts")),
        }
    }

    // ---- receipts ----

    async fn ack(&self, conn: ConnRef, user: UserId, r: pb::AckRequest) -> Result<(), ChatError> {
        let conv = conversation(r.conversation_id)?;
        let kind = match pb::ReceiptKind::try_from(r.kind) {
            Ok(pb::ReceiptKind::Delivered) => CursorKind::Delivered,
            Ok(pb::ReceiptKind::Read) => CursorKind::Read,
            _ => return Err(ChatError::invalid("kind must be DELIVERED or READ")),
        };
        let Some(moved) = self.store.advance_cursor(user, conv, kind, r.seq).await? else {
            return Ok(());
        };
        ChatCounters::add(&self.counters.receipts, 1);
        let receipt = pb::Receipt {
            conversation_id: conv.raw(),
            user_id: user,
            seq: moved.to,
            kind: r.kind,
        };
        let frame = codec::encode_to_bytes(&Frame::new(0, Body::Receipt(receipt)));
        self.out.wait_room().await;
        // The user's other devices learn what this one received or read,
        // and so do the senders of what it covers.
        let mut users = vec![user];
        match conv.kind() {
            ConversationKind::Direct { .. } => {
                users.extend(conv.peer_of(user).filter(|&p| p != user));
            }
            ConversationKind::Group(_) => {
                let senders = self
                    .store
                    .senders_between(conv, moved.from, moved.to, MAX_RECEIPT_SENDERS)
                    .await?;
                users.extend(senders.into_iter().filter(|&s| s != user));
            }
        }
        self.deliver(&users, &frame, conv.raw(), Some(conn)).await;
        Ok(())
    }

    // ---- groups ----

    fn group_limits(&self) -> GroupLimits {
        GroupLimits {
            max_members: self.config.max_group_members,
            max_groups_per_user: self.config.max_groups_per_user,
        }
    }

    /// Drops the cached member list of a group whose membership just
    /// changed, here and (before returning) on every other node, so that
    /// the change's notice and everything after it fan out to the new
    /// members only.
    pub(crate) async fn membership_changed(&self, group: GroupId) {
        self.members.invalidate(group).await;
        if let Some(cluster) = &self.cluster {
            cluster.invalidate_groups(vec![group]).await;
        }
    }

    /// Members of a group for fan-out, from the cache when possible.
    pub(crate) async fn group_members(
        &self,
        group: GroupId,
    ) -> Result<Arc<[UserId]>, Arc<StoreError>> {
        self.members
            .get(group, || self.store.group_members(group))
            .await
    }

    /// Member ids of a group the caller belongs to.
    async fn member_list(&self, group: GroupId, user: UserId) -> Result<Vec<UserId>, ChatError> {
        if self.store.group(group).await?.is_none() {
            return Err(ChatError::NotFound("no such group"));
        }
        let members = self.store.group_members(group).await?;
        if !members.contains(&user) {
            return Err(ChatError::Forbidden("not a member of this group"));
        }
        Ok(members)
    }

    async fn group_notice(
        &self,
        group: &GroupRecord,
        kind: group_notice::Kind,
        actor: UserId,
        users: Vec<UserId>,
        extra_recipients: Vec<UserId>,
    ) -> Result<(), ChatError> {
        let conv = ConversationId::group(group.id).ok_or(ChatError::Internal)?;
        let notice = pb::GroupNotice {
            kind: kind as i32,
            actor_id: actor,
            user_ids: users,
            group_name: group.name.clone(),
        };
        self.append_notice(conv, notice, extra_recipients).await
    }

    async fn create_group(
        &self,
        user: UserId,
        r: pb::CreateGroupRequest,
    ) -> Result<Body, ChatError> {
        let name = r.name.trim();
        if name.is_empty() || name.chars().count() > MAX_GROUP_NAME {
            return Err(ChatError::invalid("group name must be 1 to 64 characters"));
        }
        let mut members = user_ids(&r.member_ids, self.config.max_group_members)?;
        members.retain(|&m| m != user);
        self.limits.group_created(user)?;
        self.limits.members_added(user, members.len())?;
        let g = self
            .store
            .create_group(user, name, &members, self.group_limits())
            .await?;
        self.group_notice(&g, group_notice::Kind::Created, user, members, Vec::new())
            .await?;
        Ok(Body::Group(group_info(&g)))
    }

    async fn add_members(&self, user: UserId, r: pb::AddMembersRequest) -> Result<Body, ChatError> {
        let group = group_id(r.group_id)?;
        let ids = user_ids(&r.user_ids, self.config.max_group_members)?;
        self.member_list(group, user).await?;
        self.limits.members_added(user, ids.len())?;
        let (g, added) = self
            .store
            .add_members(group, &ids, self.group_limits())
            .await?;
        if !added.is_empty() {
            self.membership_changed(group).await;
            self.group_notice(
                &g,
                group_notice::Kind::MembersAdded,
                user,
                added,
                Vec::new(),
            )
            .await?;
        }
        Ok(Body::Group(group_info(&g)))
    }

    async fn remove_members(
        &self,
        user: UserId,
        r: pb::RemoveMembersRequest,
    ) -> Result<Body, ChatError> {
        let group = group_id(r.group_id)?;
        let ids = user_ids(&r.user_ids, self.config.max_group_members)?;
        let g = self
            .store
            .group(group)
            .await?
            .ok_or(ChatError::NotFound("no such group"))?;
        if g.owner != user {
            return Err(ChatError::Forbidden(
                "only the group owner may remove members",
            ));
        }
        let (g, removed) = self.store.remove_members(group, &ids).await?;
        if !removed.is_empty() {
            self.membership_changed(group).await;
            self.group_notice(
                &g,
                group_notice::Kind::MembersRemoved,
                user,
                removed.clone(),
                removed,
            )
            .await?;
        }
        Ok(Body::Group(group_info(&g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, len: usize) -> pb::Message {
        pb::Message {
            seq,
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text {
                    text: "x".repeat(len),
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pages_are_cut_to_fit_one_frame() {
        let mut items: Vec<pb::Message> = (1..=10).map(|s| message(s, 1000)).collect();
        assert!(fit_prefix(&mut items, 4096));
        assert_eq!(items.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let frame = Frame::new(
            u64::MAX,
            Body::SyncResponse(pb::SyncResponse {
                messages: items,
                has_more: true,
                expired: Vec::new(),
            }),
        );
        assert!(im_proto::HEADER_LEN + prost::Message::encoded_len(&frame) <= 4096);

        let mut items: Vec<pb::Message> = (1..=10).map(|s| message(s, 1000)).collect();
        assert!(fit_suffix(&mut items, 4096));
        assert_eq!(items.iter().map(|m| m.seq).collect::<Vec<_>>(), [8, 9, 10]);

        let mut small: Vec<pb::Message> = (1..=3).map(|s| message(s, 10)).collect();
        assert!(!fit_prefix(&mut small, 4096));
        assert_eq!(small.len(), 3);
        // A single oversized item is still returned, so paging progresses.
        let mut big = vec![message(1, 10_000)];
        assert!(!fit_prefix(&mut big, 4096));
        assert_eq!(big.len(), 1);
    }
}
