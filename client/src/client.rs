//! The application-facing handle: [`Client`] and its typed request methods.
//! Each method builds one request, hands it to the connection task through
//! [`Shared::call`] and checks the reply's type; sends add retries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use im_proto::pb::{self, frame::Body};
use im_proto::{ConversationId, ErrorCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::conn::{AuthError, Conn, body_name};
use crate::driver::Driver;
use crate::shared::{Link, Session, Shared, lock};
use crate::{ClientConfig, ClientError, Credentials, Events};

/// Longest `client_msg_id` the server accepts, in bytes.
pub const MAX_CLIENT_MSG_ID: usize = 64;

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A direct message to this user (the conversation is derived).
    User(u64),
    /// An existing conversation, direct or group, by conversation id.
    Conversation(u64),
    /// The conversation of this group, by group id.
    Group(u64),
}

impl Target {
    fn to_wire(self) -> Result<pb::send_request::Target, ClientError> {
        use pb::send_request::Target as Wire;
        Ok(match self {
            Target::User(user) => Wire::ToUser(user),
            Target::Conversation(conv) => Wire::ConversationId(conv),
            Target::Group(group) => Wire::ConversationId(
                ConversationId::group(group)
                    .ok_or_else(|| {
                        ClientError::InvalidArgument(format!("invalid group id {group}"))
                    })?
                    .raw(),
            ),
        })
    }
}

/// A connected chat client. Cheap to clone; all clones share one
/// connection task, which keeps the connection alive, reconnects, resumes
/// the session and catches up by itself. Dropping the last clone (or
/// [`close`](Client::close)) stops it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.shared.config.server)
            .field("session", &self.session())
            .finish()
    }
}

impl Client {
    /// Connects and authenticates. The first connection must succeed (its
    /// error is returned as is: [`ClientError::AuthFailed`] for refused
    /// credentials); after that a background task owns the connection and
    /// reports through the returned [`Events`]. Catch-up of missed messages
    /// starts at once and ends with [`Event::Resynced`](crate::Event::Resynced).
    pub async fn connect(
        config: ClientConfig,
        credentials: Credentials,
    ) -> Result<(Client, Events), ClientError> {
        config.validate()?;
        let mut request_id = 1;
        // Any node of a cluster will do: start at a random one, so that
        // clients spread, and try each once.
        let servers = config.servers();
        let start = rand::random_range(0..servers.len());
        let mut opened = None;
        let mut last_error = None;
        for i in 0..servers.len() {
            let index = (start + i) % servers.len();
            match Conn::open(
                servers[index],
                config.connect_timeout,
                config.max_frame_bytes,
                config.tls.as_ref(),
            )
            .await
            {
                Ok(conn) => {
                    opened = Some((index, conn));
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        let Some((server_index, mut conn)) = opened else {
            return Err(last_error.expect("at least one server was tried"));
        };
        let ok = conn
            .authenticate(
                &credentials,
                None,
                &config.device_name,
                || {
                    request_id += 1;
                    request_id - 1
                },
                config.request_timeout,
            )
            .await
            .map_err(AuthError::into_inner)?;

        let (calls_tx, calls_rx) = mpsc::channel(config.command_buffer);
        let (events_tx, events_rx) = mpsc::channel(config.event_buffer);
        let shared = Arc::new(Shared::new(
            config,
            calls_tx,
            Session::from(&ok),
            request_id,
        ));
        let cancel = CancellationToken::new();
        let driver = Driver::new(
            shared.clone(),
            calls_rx,
            events_tx,
            cancel.clone(),
            credentials,
            server_index,
        );
        let handle = tokio::spawn(driver.run((conn, ok)));
        let client = Client {
            inner: Arc::new(Inner {
                shared,
                cancel,
                driver: Mutex::new(Some(handle)),
            }),
        };
        Ok((client, Events::new(events_rx)))
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The current session: user, username and the latest token (which
    /// changes on every reconnect; persist it to resume later).
    pub fn session(&self) -> Session {
        lock(&self.shared().session).clone()
    }

    /// The logged-in user's id.
    pub fn user_id(&self) -> u64 {
        lock(&self.shared().session).user_id
    }

    /// Per conversation, the highest seq up to which every message has been
    /// handed to the event channel. Persist it and pass it back as
    /// [`ClientConfig::cursors`] to resume delivery where it stopped
    /// (messages still unread in the channel count as delivered).
    pub fn cursors(&self) -> HashMap<u64, u64> {
        lock(&self.shared().delivery).cursors()
    }

    /// Whether the client is connected and has caught up.
    pub fn is_ready(&self) -> bool {
        matches!(*self.shared().link.borrow(), Link::Ready { .. })
    }

    /// Waits until the current connection has caught up (at once if it has).
    /// Fails with [`ClientError::Closed`] if the client stops first.
    pub async fn wait_ready(&self) -> Result<(), ClientError> {
        if self.shared().wait_ready().await {
            Ok(())
        } else {
            Err(ClientError::Closed)
        }
    }

    /// Sends any request body and returns the reply body (an `Error` reply
    /// becomes [`ClientError::Server`]). The typed methods are built on
    /// this; it is public for tests and tools that need an unusual request.
    pub async fn request(&self, body: Body) -> Result<Body, ClientError> {
        self.shared()
            .call(body, self.shared().config.request_timeout)
            .await
    }

    /// Sends a message with a fresh `client_msg_id`. See
    /// [`send_with_id`](Self::send_with_id) for the retry rules.
    pub async fn send(
        &self,
        target: Target,
        content: pb::Content,
    ) -> Result<pb::SendAck, ClientError> {
        self.send_with_id(target, new_client_msg_id(), content)
            .await
    }

    /// Sends a text message.
    pub async fn send_text(
        &self,
        target: Target,
        text: impl Into<String>,
    ) -> Result<pb::SendAck, ClientError> {
        let content = pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text { text: text.into() })),
        };
        self.send(target, content).await
    }

    /// Sends a message with the caller's `client_msg_id` (1 to 64 bytes,
    /// unique per sender) and returns the ack once the server has stored it.
    ///
    /// Retries with the same id, flagged as a resend (so the message is
    /// stored at most once, however late the retry), on `OVERLOADED`,
    /// `INTERNAL` and `RATE_LIMITED` after a backoff, on a request timeout
    /// at once, and after a lost connection once the next connection has
    /// caught up; all within [`ClientConfig::send_timeout`]. Other errors
    /// are returned at once.
    pub async fn send_with_id(
        &self,
        target: Target,
        client_msg_id: impl Into<String>,
        content: pb::Content,
    ) -> Result<pb::SendAck, ClientError> {
        let client_msg_id = client_msg_id.into();
        if client_msg_id.is_empty() || client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(ClientError::InvalidArgument(format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} bytes"
            )));
        }
        let mut request = pb::SendRequest {
            target: Some(target.to_wire()?),
            client_msg_id,
            content: Some(content),
            resend: false,
        };
        let config = &self.shared().config;
        let deadline = Instant::now() + config.send_timeout;
        let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::Timeout);
            }
            let limit = remaining.min(config.request_timeout);
            let attempt = Body::Send(request.clone());
            // Every retry may follow an attempt that was stored: say so, and
            // the server finds it however long ago that was.
            request.resend = true;
            match self.shared().call(attempt, limit).await {
                Ok(Body::SendAck(ack)) => return Ok(ack),
                Ok(other) => return Err(unexpected("SendAck", &other)),
                Err(ClientError::Server {
                    code,
                    message,
                    retry_after,
                }) if matches!(
                    code,
                    ErrorCode::Overloaded | ErrorCode::Internal | ErrorCode::RateLimited
                ) =>
                {
                    tracing::debug!(?code, %message, "send refused for now; retrying");
                    // At least as long as the server asked.
                    let delay = backoff
                        .next_delay()
                        .max(retry_after.unwrap_or_default())
                        .min(remaining);
                    tokio::time::sleep(delay).await;
                }
                Err(ClientError::Disconnected) => {
                    // The message may or may not be stored: resend it once
                    // the next connection has caught up.
                    let ready = tokio::time::timeout_at(deadline, self.shared().wait_ready()).await;
                    match ready {
                        Ok(true) => {}
                        Ok(false) => return Err(ClientError::Closed),
                        Err(_) => return Err(ClientError::Timeout),
                    }
                }
                Err(ClientError::Timeout) => {
                    tracing::debug!("send timed out; retrying with the same id");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A page of older messages: those before `before_seq` (0 = the newest),
    /// at most `limit`, returned in ascending seq order. History does not go
    /// through the event channel.
    pub async fn history(
        &self,
        conversation_id: u64,
        before_seq: u64,
        limit: u32,
    ) -> Result<pb::HistoryResponse, ClientError> {
        let body = Body::History(pb::HistoryRequest {
            conversation_id,
            before_seq,
            limit,
        });
        match self.request(body).await? {
            Body::HistoryResponse(r) => Ok(r),
            other => Err(unexpected("HistoryResponse", &other)),
        }
    }

    /// All conversations of the user (every page), by conversation id.
    pub async fn conversations(&self) -> Result<Vec<pb::ConversationSummary>, ClientError> {
        let mut all: Vec<pb::ConversationSummary> = Vec::new();
        let mut after = 0;
        loop {
            let body = Body::ListConversations(pb::ListConversationsRequest {
                after_conversation_id: after,
                limit: self.shared().config.sync_page,
            });
            let page = match self.request(body).await? {
                Body::ConversationList(list) => list,
                other => return Err(unexpected("ConversationList", &other)),
            };
            let before = after;
            for conv in &page.conversations {
                after = after.max(conv.conversation_id);
            }
            all.extend(page.conversations);
            if !page.has_more || after == before {
                return Ok(all);
            }
        }
    }

    /// Tells the server (and so the other participants) that the user has
    /// read everything up to `seq` in the conversation.
    pub async fn mark_read(&self, conversation_id: u64, seq: u64) -> Result<(), ClientError> {
        self.ack(conversation_id, seq, pb::ReceiptKind::Read).await
    }

    /// Acknowledges delivery up to `seq` explicitly (the client does this by
    /// itself when [`ClientConfig::auto_ack_delivered`] is on).
    pub async fn ack_delivered(&self, conversation_id: u64, seq: u64) -> Result<(), ClientError> {
        self.ack(conversation_id, seq, pb::ReceiptKind::Delivered)
            .await
    }

    async fn ack(
        &self,
        conversation_id: u64,
        seq: u64,
        kind: pb::ReceiptKind,
    ) -> Result<(), ClientError> {
        let body = Body::Ack(pb::AckRequest {
            conversation_id,
            seq,
            kind: kind as i32,
        });
        self.expect_done(body).await
    }

    /// Catches up now, as after a reconnect: lists all conversations and
    /// syncs those with newer messages, which arrive as events. Returns how
    /// many messages the sync returned (duplicates included).
    pub async fn sync(&self) -> Result<usize, ClientError> {
        crate::sync::full_sync(self.shared()).await
    }

    /// Creates a group owned by the user with the given initial members.
    pub async fn create_group(
        &self,
        name: impl Into<String>,
        member_ids: Vec<u64>,
    ) -> Result<pb::GroupInfo, ClientError> {
        let body = Body::CreateGroup(pb::CreateGroupRequest {
            name: name.into(),
            member_ids,
        });
        self.expect_group(body).await
    }

    /// Adds members to a group.
    pub async fn add_members(
        &self,
        group_id: u64,
        user_ids: Vec<u64>,
    ) -> Result<pb::GroupInfo, ClientError> {
        let body = Body::AddMembers(pb::AddMembersRequest { group_id, user_ids });
        self.expect_group(body).await
    }

    /// Removes members from a group (owner only).
    pub async fn remove_members(
        &self,
        group_id: u64,
        user_ids: Vec<u64>,
    ) -> Result<pb::GroupInfo, ClientError> {
        let body = Body::RemoveMembers(pb::RemoveMembersRequest { group_id, user_ids });
        self.expect_group(body).await
    }

    /// Ends this device's session (`all` = false) or every session of the
    /// user (`all` = true). The server then closes this connection with
    /// SESSION_REVOKED and the client stops ([`Event::Stopped`](crate::Event::Stopped)).
    pub async fn logout(&self, all: bool) -> Result<(), ClientError> {
        self.expect_done(Body::Logout(pb::LogoutRequest { all }))
            .await
    }

    /// Changes the password and ends every other session of the user; this
    /// one stays logged in.
    pub async fn change_password(
        &self,
        old_password: impl Into<String>,
        new_password: impl Into<String>,
    ) -> Result<(), ClientError> {
        self.expect_done(Body::ChangePassword(pb::ChangePasswordRequest {
            old_password: old_password.into(),
            new_password: new_password.into(),
        }))
        .await
    }

    /// The user's live sessions (devices), newest first.
    pub async fn sessions(&self) -> Result<Vec<pb::SessionInfo>, ClientError> {
        match self
            .request(Body::ListSessions(pb::ListSessionsRequest {}))
            .await?
        {
            Body::SessionList(list) => Ok(list.sessions),
            other => Err(unexpected("SessionList", &other)),
        }
    }

    /// Ends one of the user's sessions (its connections are closed).
    pub async fn end_session(&self, session_id: u64) -> Result<(), ClientError> {
        self.expect_done(Body::EndSession(pb::EndSessionRequest { session_id }))
            .await
    }

    /// Leaves a group.
    pub async fn leave_group(&self, group_id: u64) -> Result<(), ClientError> {
        self.expect_done(Body::LeaveGroup(pb::LeaveGroupRequest { group_id }))
            .await
    }

    /// The members of a group.
    pub async fn group_members(&self, group_id: u64) -> Result<Vec<pb::User>, ClientError> {
        let mut members: Vec<pb::User> = Vec::new();
        loop {
            let request = pb::ListMembersRequest {
                group_id,
                offset: members.len() as u32,
                limit: 0,
            };
            match self.request(Body::ListMembers(request)).await? {
                Body::MemberList(list) => {
                    let progressed = !list.members.is_empty();
                    members.extend(list.members);
                    if !list.has_more || !progressed {
                        return Ok(members);
                    }
                }
                other => return Err(unexpected("MemberList", &other)),
            }
        }
    }

    /// The groups the user belongs to (every page), by group id.
    pub async fn groups(&self) -> Result<Vec<pb::GroupInfo>, ClientError> {
        let mut groups: Vec<pb::GroupInfo> = Vec::new();
        loop {
            let request = pb::ListGroupsRequest {
                after_group_id: groups.last().map_or(0, |g| g.group_id),
                limit: 0,
            };
            match self.request(Body::ListGroups(request)).await? {
                Body::GroupList(list) => {
                    let progressed = !list.groups.is_empty();
                    groups.extend(list.groups);
                    if !list.has_more || !progressed {
                        return Ok(groups);
                    }
                }
                other => return Err(unexpected("GroupList", &other)),
            }
        }
    }

    /// Looks users up by username and by id; unknown ones are left out.
    pub async fn lookup_users(
        &self,
        usernames: Vec<String>,
        user_ids: Vec<u64>,
    ) -> Result<Vec<pb::User>, ClientError> {
        let body = Body::LookupUsers(pb::LookupUsersRequest {
            usernames,
            user_ids,
        });
        match self.request(body).await? {
            Body::UserList(list) => Ok(list.users),
            other => Err(unexpected("UserList", &other)),
        }
    }

    /// The id of the user called `username`, if there is one.
    pub async fn user_id_of(&self, username: &str) -> Result<Option<u64>, ClientError> {
        let users = self.lookup_users(vec![username.to_owned()], vec![]).await?;
        Ok(users
            .into_iter()
            .find(|u| u.username == username)
            .map(|u| u.user_id))
    }

    /// Replaces the presence subscription with `user_ids` (empty: none) and
    /// returns their current presence. Changes then arrive as
    /// [`Event::Presence`](crate::Event::Presence); the client renews the subscription after every
    /// reconnect.
    pub async fn subscribe_presence(
        &self,
        user_ids: Vec<u64>,
    ) -> Result<Vec<pb::Presence>, ClientError> {
        *lock(&self.shared().presence) = user_ids.clone();
        let body = Body::PresenceSubscribe(pb::PresenceSubscribeRequest { user_ids });
        match self.request(body).await? {
            Body::PresenceSnapshot(snapshot) => Ok(snapshot.users),
            other => Err(unexpected("PresenceSnapshot", &other)),
        }
    }

    /// Stops the client: the connection is closed, outstanding requests
    /// fail with [`ClientError::Closed`] or [`ClientError::Disconnected`],
    /// and the event stream ends. Affects every clone.
    pub async fn close(self) {
        self.inner.cancel.cancel();
        let handle = lock(&self.inner.driver).take();
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }

    async fn expect_done(&self, body: Body) -> Result<(), ClientError> {
        match self.request(body).await? {
            Body::Done(_) => Ok(()),
            other => Err(unexpected("Done", &other)),
        }
    }

    async fn expect_group(&self, body: Body) -> Result<pb::GroupInfo, ClientError> {
        match self.request(body).await? {
            Body::Group(info) => Ok(info),
            other => Err(unexpected("GroupInfo", &other)),
        }
    }
}

/// A fresh random `client_msg_id` (32 hex digits), unique in practice
/// across devices and restarts.
pub fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub(crate) fn unexpected(wanted: &str, got: &Body) -> ClientError {
    ClientError::UnexpectedReply(format!("expected {wanted}, got {}", body_name(got)))
}
