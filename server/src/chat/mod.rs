//! Chat logic: authentication, sends, fan-out, sync, receipts, groups and
//! presence. It owns no socket and no SQL: frames arrive from the
//! connection layer through [`Handler`], answers leave through
//! [`Outbound`] (and, in a cluster, pushes for devices on other nodes
//! through [`Cluster`]), and durable state lives behind [`Store`].
//!
//! - [`auth`]: password hashing, session tokens, login rate limiting.
//! - [`limits`]: per-user abuse limits (messages, groups, members) and the
//!   count of every `RATE_LIMITED` refusal.
//! - [`registry`]: user → live connections, presence subscriptions.
//! - `send`: the send pipeline (batched appends, acks, fan-out in order).
//! - `members`: the member lists fan-out uses, never staler than the last
//!   membership change.
//! - `requests`: every other request.
//! - `sessions`: logout, password change, the session list; the set of
//!   ended sessions every resume checks; batched last-seen times.

pub mod auth;
mod error;
pub mod limits;
mod members;
pub mod registry;
mod requests;
mod send;
mod sessions;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{Frame, codec};
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc};

use sessions::{Revoked, Touches};

pub use error::{ChatError, OVERLOADED_RETRY_MS};

use crate::cluster::Cluster;
use crate::net::{ConnRef, FrameCtx, Handler, Outbound, Topic};
use crate::store::{GroupId, Store, UserId};
use auth::{HashCost, LoginLimiter, Passwords, Tokens};
use limits::{UserLimitConfig, UserLimits};
use members::MemberCache;
use registry::{PresenceHub, Registry};
use send::{SendBudget, SendJob};

/// Limits and settings of the chat layer (filled from `Config`).
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Heartbeat interval announced to clients, seconds.
    pub heartbeat_interval_secs: u32,
    /// Silence after which the server closes a connection, seconds.
    pub heartbeat_timeout_secs: u32,
    /// Largest frame accepted, announced to clients.
    pub max_frame_bytes: usize,
    /// Parallel send pipelines (conversations are spread over them).
    pub send_lanes: usize,
    /// Messages per storage append batch at most.
    pub send_batch: usize,
    /// Sends queued per lane before new ones get OVERLOADED.
    pub send_queue: usize,
    /// Bytes of sends admitted to one lane and not answered yet before new
    /// ones get OVERLOADED.
    pub send_queue_bytes: usize,
    /// Bytes of one user's sends admitted and not answered yet (over all
    /// the user's connections) before the user's new ones get OVERLOADED.
    pub max_user_pending_bytes: usize,
    /// Append batches in flight per lane.
    pub send_batches_in_flight: usize,
    /// Messages per sync page at most.
    pub max_sync_page: u32,
    /// Messages per history page at most.
    pub max_history_page: u32,
    /// Conversations per conversation-list page at most.
    pub max_list_page: u32,
    /// Cursors per sync request at most.
    pub max_sync_cursors: usize,
    /// Members per group at most.
    pub max_group_members: usize,
    /// Groups per user at most.
    pub max_groups_per_user: usize,
    /// Presence subscriptions per connection at most.
    pub max_presence_subscriptions: usize,
    /// Users per lookup request at most.
    pub max_lookup: usize,
    /// Bytes of message text at most.
    pub max_text_bytes: usize,
    /// Lifetime of session tokens.
    pub token_ttl: Duration,
    /// argon2id cost.
    pub hash_cost: HashCost,
    /// Password hashes computed at once.
    pub hash_concurrency: usize,
    /// Password hashes waiting at most before logins get OVERLOADED.
    pub hash_queue: usize,
    /// Failed logins per (peer, username) per window.
    pub login_failures: u32,
    /// Window of the failed-login count.
    pub login_failure_window: Duration,
    /// Bytes of group member lists cached for fan-out (8 per member and a
    /// little per group).
    pub member_cache_bytes: u64,
    /// How long a cached member list is used before it is reloaded (a
    /// safety net: every node's change reaches every node's cache at once).
    pub member_cache_ttl: Duration,
    /// Per-user abuse limits (messages, groups created, members added).
    pub user_limits: UserLimitConfig,
    /// Live sessions (logged-in devices) per user at most: a login beyond
    /// it ends the user's least recently used session.
    pub max_devices_per_user: usize,
    /// Ended sessions kept in memory at most (16 bytes and a little each);
    /// past it, resumes of sessions not held read the store.
    pub max_ended_sessions: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            heartbeat_interval_secs: 30,
            heartbeat_timeout_secs: 90,
            max_frame_bytes: im_proto::DEFAULT_MAX_FRAME_BYTES,
            send_lanes: 2,
            send_batch: 512,
            send_queue: 16_384,
            send_queue_bytes: 64 << 20,
            max_user_pending_bytes: 4 << 20,
            send_batches_in_flight: 4,
            max_sync_page: 500,
            max_history_page: 200,
            max_list_page: 500,
            max_sync_cursors: 1024,
            max_group_members: 2000,
            max_groups_per_user: 1000,
            max_presence_subscriptions: 1000,
            max_lookup: 1000,
            max_text_bytes: 32 * 1024,
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            hash_cost: HashCost {
                memory_kib: 19 * 1024,
                iterations: 2,
                parallelism: 1,
            },
            hash_concurrency: 2,
            hash_queue: 1024,
            login_failures: 5,
            login_failure_window: Duration::from_secs(60),
            member_cache_bytes: 64 << 20,
            member_cache_ttl: Duration::from_secs(5),
            user_limits: UserLimitConfig {
                msgs_per_sec: 20,
                msgs_burst: 50,
                groups_created_per_hour: 20,
                members_added_per_minute: 2000,
            },
            max_devices_per_user: 10,
            max_ended_sessions: 1_000_000,
        }
    }
}

/// Totals of the chat service, for metrics. Relaxed atomics, added to at
/// most once per append batch or per message: no lock, no allocation.
#[derive(Debug, Default)]
pub(crate) struct ChatCounters {
    appended: AtomicU64,
    acked: AtomicU64,
    duplicates: AtomicU64,
    pushed: AtomicU64,
    receipts: AtomicU64,
    auth_failures: AtomicU64,
    sessions_ended: AtomicU64,
    sessions_ended_by_limit: AtomicU64,
}

impl ChatCounters {
    fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The chat service's counters and queues at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChatStatsSnapshot {
    /// Messages the store appended (client sends and server notices;
    /// resends answered from the dedup window are not counted).
    pub appended: u64,
    /// SendAcks sent to clients, duplicates included.
    pub acked: u64,
    /// SendAcks for a resend the store had already appended.
    pub duplicates: u64,
    /// Message pushes queued to recipients' connections.
    pub pushed: u64,
    /// Delivered and read receipts that moved a cursor.
    pub receipts: u64,
    /// Logins and resumes refused: wrong credentials, a bad or expired
    /// token, or rate limited.
    pub auth_failures: u64,
    /// Sends waiting in the send lanes' queues (not yet in an append
    /// batch).
    pub send_queued: u64,
    /// Bytes of sends admitted to the lanes and not answered yet.
    pub send_pending_bytes: u64,
    /// Requests received and not answered yet.
    pub in_flight: u64,
    /// Users with at least one live connection.
    pub online_users: u64,
    /// Connections with a presence subscription.
    pub presence_subscriptions: u64,
    /// `RATE_LIMITED` refusals per limit, in [`limits::CHAT_LIMITS`] order.
    pub rate_limited: [u64; limits::CHAT_LIMITS.len()],
    /// Sessions this node ended (logout, password change, end-session,
    /// device limit).
    pub sessions_ended: u64,
    /// Of those, sessions ended because a login passed the device limit.
    pub sessions_ended_by_limit: u64,
    /// Ended sessions held in memory for resume checks.
    pub ended_sessions_cached: u64,
}

/// The chat service: implements [`Handler`] for the connection layer.
pub struct ChatService<S: Store> {
    inner: Arc<Inner<S>>,
}

impl<S: Store> Clone for ChatService<S> {
    fn clone(&self) -> Self {
        ChatService {
            inner: self.inner.clone(),
        }
    }
}

pub(crate) struct Inner<S: Store> {
    store: Arc<S>,
    out: Outbound,
    config: ChatConfig,
    passwords: Passwords,
    tokens: Tokens,
    limiter: LoginLimiter,
    limits: Arc<UserLimits>,
    registry: Registry,
    presence: PresenceHub,
    members: MemberCache,
    lanes: Vec<mpsc::Sender<SendJob>>,
    send_budget: Arc<SendBudget>,
    runtime: Handle,
    /// The other nodes, when this node is one of several.
    cluster: Option<Cluster>,
    /// Requests received and not answered yet (for graceful shutdown).
    pending: AtomicUsize,
    idle: Notify,
    counters: ChatCounters,
    /// Sessions known to be ended.
    revoked: Revoked,
    /// Last-seen times waiting to be written.
    touches: Touches,
    /// Woken when a batch of last-seen times is full.
    touch_wake: Notify,
}

impl<S: Store> ChatService<S> {
    /// Builds the service and starts its send pipelines on the current
    /// tokio runtime.
    pub fn new(
        store: Arc<S>,
        out: Outbound,
        config: ChatConfig,
        token_key: Vec<u8>,
        cluster: Option<Cluster>,
    ) -> Result<Self, String> {
        let passwords =
            Passwords::new(config.hash_cost, config.hash_concurrency, config.hash_queue)?;
        let tokens = Tokens::new(token_key, config.token_ttl);
        let limiter = LoginLimiter::new(
            config.login_failures,
            config.login_failures.saturating_mul(10),
            config.login_failure_window,
            100_000,
        );
        let limits = Arc::new(UserLimits::new(config.user_limits));
        limits::spawn_sweeper(&limits, Duration::from_secs(5));
        let lane_count = config.send_lanes.max(1);
        let mut lanes = Vec::with_capacity(lane_count);
        let mut receivers = Vec::with_capacity(lane_count);
        for _ in 0..lane_count {
            let (tx, rx) = mpsc::channel(config.send_queue.max(1));
            lanes.push(tx);
            receivers.push(rx);
        }
        let send_budget = SendBudget::new(
            lane_count,
            config.send_queue_bytes,
            config.max_user_pending_bytes,
        );
        let revoked = Revoked::new(config.max_ended_sessions, config.token_ttl);
        let inner = Arc::new(Inner {
            store,
            out,
            members: MemberCache::new(config.member_cache_bytes, config.member_cache_ttl),
            config,
            passwords,
            tokens,
            limiter,
            limits,
            registry: Registry::default(),
            presence: PresenceHub::default(),
            send_budget,
            lanes,
            runtime: Handle::current(),
            cluster,
            pending: AtomicUsize::new(0),
            idle: Notify::new(),
            counters: ChatCounters::default(),
            revoked,
            touches: Touches::default(),
            touch_wake: Notify::new(),
        });
        for rx in receivers {
            tokio::spawn(send::run_lane(inner.clone(), rx));
        }
        Ok(ChatService { inner })
    }

    /// Loads the ended sessions from the store and starts writing
    /// last-seen times and polling for ends. Called once the node is
    /// subscribed to other nodes (so no end falls between the load and the
    /// subscription); until the load succeeds, resumes read the store.
    pub async fn start_sessions(&self) {
        sessions::start(&self.inner).await;
    }

    /// Writes the last-seen times still waiting (at shutdown).
    pub async fn flush_sessions(&self) {
        self.inner.flush_touches(true).await;
    }

    /// Waits until every request received so far has been answered.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Requests received and not answered yet.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Acquire)
    }

    /// Users with at least one live connection.
    pub fn online_users(&self) -> usize {
        self.inner.registry.online_users()
    }

    /// What the cluster delivers to (the chat service behind this
    /// handle).
    pub fn local(&self) -> Arc<impl crate::cluster::Local> {
        self.inner.clone()
    }

    /// Counters and queue depths now.
    pub fn stats(&self) -> ChatStatsSnapshot {
        let inner = &self.inner;
        let c = &inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let send_queued = inner
            .lanes
            .iter()
            .map(|lane| (lane.max_capacity() - lane.capacity()) as u64)
            .sum();
        let send_pending_bytes = (0..inner.lanes.len())
            .map(|lane| inner.send_budget.lane_bytes(lane) as u64)
            .sum();
        ChatStatsSnapshot {
            send_pending_bytes,
            appended: get(&c.appended),
            acked: get(&c.acked),
            duplicates: get(&c.duplicates),
            pushed: get(&c.pushed),
            receipts: get(&c.receipts),
            auth_failures: get(&c.auth_failures),
            send_queued,
            in_flight: self.pending() as u64,
            online_users: self.online_users() as u64,
            presence_subscriptions: inner.presence.subscribed_connections() as u64,
            rate_limited: inner.limits.refused().map(|(_, n)| n),
            sessions_ended: get(&c.sessions_ended),
            sessions_ended_by_limit: get(&c.sessions_ended_by_limit),
            ended_sessions_cached: inner.revoked.len() as u64,
        }
    }
}

impl<S: Store> Handler for ChatService<S> {
    fn on_frame(&self, ctx: FrameCtx, frame: Frame) {
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        let Frame { request_id, body } = frame;
        let Some(body) = body else {
            // The connection layer answers body-less frames itself.
            self.inner.answer(
                ctx.conn,
                Frame::error(
                    request_id,
                    im_proto::ErrorCode::InvalidArgument,
                    "empty frame",
                    false,
                ),
            );
            return;
        };
        match ctx.user_id {
            None => {
                let inner = self.inner.clone();
                self.inner
                    .runtime
                    .spawn(async move { inner.authenticate(ctx, request_id, body).await });
            }
            Some(user) => self.inner.session_request(ctx.conn, user, request_id, body),
        }
    }

    fn on_close(&self, conn: ConnRef, user_id: u64) {
        // Registry first: a presence subscribe racing this close either
        // sees the connection gone or has its watchers removed below (see
        // `PresenceHub::subscribe`).
        let (went_offline, session) = self.inner.registry.remove(user_id, conn);
        if let Some(session) = session {
            if self.inner.touches.touch(session, None) {
                self.inner.touch_wake.notify_one();
            }
        }
        self.inner.presence.unsubscribe_all(conn);
        if went_offline {
            match &self.inner.cluster {
                // The cluster decides whether the user is still online on
                // another node, and tells watchers here and there.
                Some(cluster) => cluster.route_offline(user_id),
                // On the shard thread, which cannot wait for room: these
                // pushes are bounded by the user's watchers, and closes by
                // the shards' own pace.
                None => self.inner.notify_presence(user_id, false),
            }
        }
    }
}

impl<S: Store> Inner<S> {
    /// Sends the answer to one request and counts it done.
    fn answer(&self, conn: ConnRef, frame: Frame) {
        self.out.reply(conn, codec::encode_to_bytes(&frame));
        self.request_done();
    }

    fn answer_auth(&self, conn: ConnRef, user: Option<UserId>, frame: Frame) {
        self.out
            .auth_result(conn, user, codec::encode_to_bytes(&frame));
        self.request_done();
    }

    fn request_done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Pushes `frame`, about `conversation`, to every live connection of
    /// `user` except `skip`; returns how many connections it was queued to.
    fn push_to_user(
        &self,
        user: UserId,
        frame: &Bytes,
        conversation: u64,
        skip: Option<ConnRef>,
    ) -> u64 {
        let mut pushed = 0;
        self.registry.for_each_device(user, |conn| {
            if Some(conn) != skip {
                self.out
                    .push(conn, frame.clone(), Topic::Conversation(conversation));
                pushed += 1;
            }
        });
        pushed
    }

    /// Pushes `frame` to every device of `users`: here directly (except
    /// `skip`), and through the cluster to their devices on other nodes.
    /// Returns how many local connections it was queued to.
    async fn deliver(
        &self,
        users: &[UserId],
        frame: &Bytes,
        conversation: u64,
        skip: Option<ConnRef>,
    ) -> u64 {
        let mut pushed = 0;
        for &user in users {
            pushed += self.push_to_user(user, frame, conversation, skip);
        }
        if let Some(cluster) = &self.cluster {
            cluster.forward(frame, conversation, users).await;
        }
        pushed
    }

    fn notify_presence(&self, user: UserId, online: bool) {
        let mut frame: Option<Bytes> = None;
        self.presence.for_each_watcher(user, |conn| {
            let bytes = frame.get_or_insert_with(|| {
                codec::encode_to_bytes(&Frame::new(
                    0,
                    Body::Presence(pb::Presence {
                        user_id: user,
                        online,
                    }),
                ))
            });
            self.out.push(conn, bytes.clone(), Topic::Presence);
        });
    }

    /// Routes a session request: sends to a pipeline, the rest to a task.
    fn session_request(self: &Arc<Self>, conn: ConnRef, user: UserId, request_id: u64, body: Body) {
        match body {
            Body::Send(req) => self.submit_send(conn, user, request_id, req),
            body => {
                // These may end the caller's own session: it is closed
                // after the reply.
                let may_end_own = matches!(body, Body::Logout(_) | Body::EndSession(_));
                let inner = self.clone();
                self.runtime.spawn(async move {
                    let frame = match inner.request(conn, user, body).await {
                        Ok(body) => Frame::new(request_id, body),
                        Err(e) => {
                            inner.limits.count(&e);
                            e.to_frame(request_id)
                        }
                    };
                    inner.answer(conn, frame);
                    if may_end_own {
                        inner.close_if_ended(user, conn);
                    }
                });
            }
        }
    }
}

/// What the cluster delivers here from other nodes.
impl<S: Store> crate::cluster::Local for Inner<S> {
    async fn deliver(&self, push: im_proto::cluster_pb::Push) {
        let im_proto::cluster_pb::Push {
            frame,
            conversation_id,
            users,
            group_id,
        } = push;
        self.out.wait_room().await;
        let mut pushed = 0;
        if group_id != 0 {
            match self.group_members(group_id).await {
                Ok(members) => {
                    for &user in members.iter() {
                        pushed += self.push_to_user(user, &frame, conversation_id, None);
                    }
                }
                Err(e) => {
                    tracing::warn!(group = group_id, error = %e, "cannot load members for fan-out")
                }
            }
        }
        for user in users {
            pushed += self.push_to_user(user, &frame, conversation_id, None);
        }
        ChatCounters::add(&self.counters.pushed, pushed);
    }

    fn presence(&self, user: UserId, online: bool) {
        self.notify_presence(user, online);
    }

    async fn invalidate_group(&self, group: GroupId) {
        self.members.invalidate(group).await;
    }

    fn hint_all(&self) {
        let frame = codec::encode_to_bytes(&Frame::new(
            0,
            Body::SyncHint(pb::SyncHint {
                conversation_ids: Vec::new(),
                presence: true,
            }),
        ));
        self.registry
            .for_each_connection(|conn| self.out.push(conn, frame.clone(), Topic::Everything));
    }

    fn local_users(&self) -> Vec<UserId> {
        self.registry.users()
    }

    fn is_local(&self, user: UserId) -> bool {
        self.registry.is_online(user)
    }

    fn watched_users(&self) -> Vec<UserId> {
        self.presence.watched()
    }

    fn ended_elsewhere(&self, sessions: Vec<u64>) {
        self.end_local(&sessions, im_proto::now_ms(), None);
    }
}
