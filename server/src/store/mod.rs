//! The storage seam: everything the chat logic needs from durable storage,
//! behind one small trait.
//!
//! [`Store`] is implemented by the embedded single-node store
//! ([`sqlite::SqliteStore`]) and, in production, by the Redis Streams +
//! MySQL pipeline ([`pipeline::PipelineStore`]); the session code in
//! [`crate::chat`] is the same for both.
//! Implementations own durability, per-conversation sequencing, send
//! deduplication and membership checks on append; authorization of group
//! administration and every wire concern stay in the chat layer.

pub mod pipeline;
pub mod sqlite;

use std::future::Future;

use im_proto::ConversationId;
use im_proto::pb;

pub use im_storage::retention::{Retention, RetentionMode};

/// A user id, in `[1, 2^31)`.
pub type UserId = u64;
/// A group id, in `[1, 2^62)`.
pub type GroupId = u64;

/// A stored account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// The user's id.
    pub id: UserId,
    /// Unique username.
    pub username: String,
    /// PHC-format argon2id hash of the password.
    pub password_hash: String,
}

/// A session id: one login of one device, kept across token refreshes.
pub type SessionId = u64;

/// A stored session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session's id.
    pub id: SessionId,
    /// Whose session it is.
    pub user: UserId,
    /// Name the device gave at login.
    pub device_name: String,
    /// Peer address of the last authentication.
    pub address: String,
    /// When it started, Unix milliseconds.
    pub created_ms: i64,
    /// Last authentication or close, Unix milliseconds.
    pub last_seen_ms: i64,
}

/// A session to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Whose session it is.
    pub user: UserId,
    /// Name the device gave.
    pub device_name: String,
    /// Peer address.
    pub address: String,
    /// Now, Unix milliseconds.
    pub now_ms: i64,
    /// Live sessions the user may have at most, this one included: the
    /// oldest others (by last activity) are ended to make room.
    pub max_live: usize,
    /// Sessions last seen before this (Unix ms) count as expired: their
    /// tokens cannot be valid any more.
    pub live_since_ms: i64,
}

/// Which of a user's sessions to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionScope {
    /// This one ([`StoreError::NotFound`] unless it is a live session of
    /// the user).
    One(SessionId),
    /// Every one.
    All,
    /// Every one but this.
    AllBut(SessionId),
}

/// A session was used (authenticated or closed a connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTouch {
    /// The session.
    pub id: SessionId,
    /// When, Unix milliseconds.
    pub at_ms: i64,
    /// The peer address of an authentication (none for a close).
    pub address: Option<String>,
}

/// A stored group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// The group's id.
    pub id: GroupId,
    /// Display name.
    pub name: String,
    /// The member who may remove others.
    pub owner: UserId,
    /// Current number of members.
    pub member_count: u32,
}

/// Limits a group change must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Members of one group at most.
    pub max_members: usize,
    /// Groups one user belongs to at most.
    pub max_groups_per_user: usize,
}

/// A message to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// The authenticated sender; 0 for notices written by the server, which
    /// skip the membership check.
    pub sender: UserId,
    /// Target conversation.
    pub conversation: ConversationId,
    /// Sender-chosen idempotency key (empty for server notices, which are
    /// never deduplicated).
    pub client_msg_id: String,
    /// What the message says.
    pub content: pb::Content,
    /// Server time in Unix milliseconds. A store may replace it with the
    /// time it sequences the message; the stored message and its ack carry
    /// the final value.
    pub server_time_ms: i64,
    /// The client says an earlier attempt of this send may have been
    /// stored: when the dedup window does not know it, the store checks
    /// its durable index before storing it (see [`Store::append_batch`]).
    pub resend: bool,
}

/// Where an appended message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Store-wide unique message id.
    pub message_id: u64,
    /// The conversation.
    pub conversation_id: u64,
    /// Its sequence number in the conversation.
    pub seq: u64,
    /// Server time of the original append.
    pub server_time_ms: i64,
}

/// Result of appending one message.
#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    /// Newly stored; the message is returned whole for fan-out.
    Stored(pb::Message),
    /// The sender already stored a message with this `client_msg_id`: this
    /// is the original ack, and nothing new was stored.
    Duplicate(Ack),
}

/// Why one message of a batch was refused (the rest of the batch is
/// unaffected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendRejection {
    /// The sender is not a participant of the conversation.
    #[error("sender is not a member of the conversation")]
    NotMember,
    /// A direct conversation names a user that does not exist.
    #[error("no such user")]
    NoSuchUser,
    /// The store had no room for this message now; it was not stored.
    #[error("store overloaded")]
    Overloaded,
    /// The append failed before this message's fate was known: it may or
    /// may not be stored (a resend tells which).
    #[error("append failed; resend to learn whether it was stored")]
    Failed,
    /// A resend the dedup window does not know, while the durable index
    /// may still lack its first attempt (the pipeline's storage worker is
    /// more than the window behind): it was not stored; retry later.
    #[error("the durable dedup index is behind; retry later")]
    DedupBehind,
}

/// Result of one message in [`Store::append_batch`].
pub type AppendResult = Result<AppendOutcome, AppendRejection>;

/// One page of messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// Messages in ascending (conversation, seq) order.
    pub messages: Vec<pb::Message>,
    /// Whether more messages remain beyond this page.
    pub has_more: bool,
    /// Conversations whose requested range reached below what the
    /// retention policy keeps, ascending: (conversation, the highest seq
    /// removed). Their messages in the page start above it.
    pub expired: Vec<(u64, u64)>,
}

/// Which per-user cursor an ack moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorKind {
    /// Received up to seq.
    Delivered,
    /// Read up to seq.
    Read,
}

/// A cursor that moved forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorMove {
    /// Previous value.
    pub from: u64,
    /// New value.
    pub to: u64,
}

/// Failures of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Registration with a username that exists.
    #[error("username already taken")]
    UsernameTaken,
    /// A user or group that does not exist.
    #[error("not found")]
    NotFound,
    /// The user is not a member of the conversation or group.
    #[error("not a member")]
    NotMember,
    /// The operation would exceed a configured limit (e.g. group size).
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
    /// Too much work is queued; the caller should retry later.
    #[error("store overloaded")]
    Overloaded,
    /// The store is shutting down and takes no more work.
    #[error("store closed")]
    Closed,
    /// The backend refused the work for load (no free connection slot, a
    /// lock wait timed out, a script still running) and applied nothing;
    /// the caller should retry later.
    #[error("storage backend busy: {0}")]
    Busy(String),
    /// The backend failed (disk, database, network).
    #[error("storage backend failure: {0}")]
    Backend(String),
}

/// What [`StoreError::LimitExceeded`] says when a user would be in more
/// than `GroupLimits::max_groups_per_user` groups (clients get
/// `RATE_LIMITED` for it, as for the other abuse limits).
pub const GROUPS_PER_USER_LIMIT: &str = "a user is in the most groups allowed";

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// Durable storage used by the chat logic.
///
/// Every method may be called concurrently from many tasks. Futures are
/// `Send` so they can be awaited on any runtime worker.
pub trait Store: Send + Sync + 'static {
    // ---- accounts ----

    /// Creates a user; [`StoreError::UsernameTaken`] if the name exists.
    fn create_user(
        &self,
        username: &str,
        password_hash: &str,
    ) -> impl Future<Output = StoreResult<UserId>> + Send;

    /// Looks up an account by username.
    fn user_by_name(
        &self,
        username: &str,
    ) -> impl Future<Output = StoreResult<Option<UserRecord>>> + Send;

    /// The users among `ids` and `names` that exist, as (id, username),
    /// each at most once, in no particular order.
    fn lookup_users(
        &self,
        ids: &[UserId],
        names: &[String],
    ) -> impl Future<Output = StoreResult<Vec<(UserId, String)>>> + Send;

    /// Replaces a user's password hash; [`StoreError::NotFound`] for an
    /// unknown user.
    fn set_password(
        &self,
        user: UserId,
        password_hash: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    // ---- sessions ----

    /// Creates an account and its first session together: both or neither
    /// (a registration must not leave an account its client never got a
    /// session for). `session.user` is ignored.
    fn create_user_with_session(
        &self,
        username: &str,
        password_hash: &str,
        session: NewSession,
    ) -> impl Future<Output = StoreResult<(UserId, SessionId)>> + Send;

    /// Starts a session and returns its id and the ids of the sessions it
    /// ended to stay within `session.max_live` (oldest activity first).
    fn create_session(
        &self,
        session: NewSession,
    ) -> impl Future<Output = StoreResult<(SessionId, Vec<SessionId>)>> + Send;

    /// The user's live sessions (not ended, last seen at or after
    /// `live_since_ms`), newest first.
    fn sessions(
        &self,
        user: UserId,
        live_since_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<SessionRecord>>> + Send;

    /// Ends sessions of `user` at `now_ms` and returns the ids ended (those
    /// already ended are left as they are and not returned).
    fn end_sessions(
        &self,
        user: UserId,
        scope: SessionScope,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<SessionId>>> + Send;

    /// Sessions ended at or after `since_ms`, as (id, when ended), the
    /// most recently ended first, at most `limit`.
    fn ended_since(
        &self,
        since_ms: i64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<(SessionId, i64)>>> + Send;

    /// Whether a session was ended (or never existed).
    fn session_ended(&self, id: SessionId) -> impl Future<Output = StoreResult<bool>> + Send;

    /// Records when sessions were last used (a later touch of a session
    /// never moves it back), in one write.
    fn touch_sessions(
        &self,
        touches: Vec<SessionTouch>,
    ) -> impl Future<Output = StoreResult<()>> + Send;

    // ---- messages ----

    /// Appends a batch of messages durably and returns one result per input,
    /// in input order.
    ///
    /// Contract, relied on for ordering: the batch is submitted before this
    /// method returns (the returned future only waits for the outcome), and
    /// batches are applied in call order, so messages of one conversation
    /// get increasing seqs in the order they were passed in, across calls.
    /// Each conversation's seqs are dense: 1, 2, 3, ...
    ///
    /// Deduplication is per `(conversation, sender, client_msg_id)`: a
    /// non-empty `client_msg_id` the sender already stored in the same
    /// conversation yields [`AppendOutcome::Duplicate`] with the original
    /// ack (whatever the content). A first attempt is recognised within the
    /// dedup window; a message with `resend` set at any later time, from
    /// the durable index, or it gets [`AppendRejection::DedupBehind`] while
    /// that index may not have it yet. Sending advances the sender's read
    /// cursor to the new seq. The message is durable when the future
    /// resolves with `Ok` and its result is [`AppendOutcome::Stored`]; each
    /// message of the batch has its own result, so some may be stored and
    /// others refused (e.g. [`AppendRejection::Overloaded`]).
    fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> impl Future<Output = StoreResult<Vec<AppendResult>>> + Send + 'static;

    /// Messages with seq above each cursor in the conversations `user`
    /// belongs to, ascending by (conversation, seq), at most `limit` in all.
    /// Conversations the user is not a member of are skipped. A group member
    /// sees only messages stored after they joined. A conversation listed
    /// twice is read from its lowest cursor. `has_more` is set when messages
    /// remain beyond the page in any listed conversation. A cursor below
    /// a conversation's retention floor (see [`Retention`]) is read from
    /// the floor, and the page lists the conversation in `expired`.
    fn sync(
        &self,
        user: UserId,
        cursors: &[(ConversationId, u64)],
        limit: usize,
    ) -> impl Future<Output = StoreResult<Page>> + Send;

    /// Up to `limit` messages with seq below `before_seq` (0 = the newest),
    /// the newest of them, in ascending seq order; as in `sync`, a group
    /// member sees nothing stored before they joined. `has_more` is set when
    /// older visible messages remain; a page that reaches the retention
    /// floor lists it in `expired` (and older messages do not remain).
    /// [`StoreError::NotMember`] if `user` may not read the conversation.
    fn history(
        &self,
        user: UserId,
        conversation: ConversationId,
        before_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Page>> + Send;

    /// The user's conversations with id above `after`, ascending by id, at
    /// most `limit`; the flag says whether more remain. A direct
    /// conversation is listed from its first message on, a group from when
    /// the user joined.
    /// `unread_count` is `last_seq` minus the higher of the read cursor and
    /// the seq at which the user joined; `last_message` is absent when there
    /// is no message the user may see.
    fn conversations(
        &self,
        user: UserId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<(Vec<pb::ConversationSummary>, bool)>> + Send;

    /// Moves the user's delivered or read cursor forward to `seq` (clamped
    /// to the conversation's last seq). `None` when it did not move.
    /// [`StoreError::NotMember`] if the user is not in the conversation.
    fn advance_cursor(
        &self,
        user: UserId,
        conversation: ConversationId,
        kind: CursorKind,
        seq: u64,
    ) -> impl Future<Output = StoreResult<Option<CursorMove>>> + Send;

    /// Removes every message stored before `cutoff_ms` (`server_time_ms`),
    /// dropped or archived as `mode` says: each conversation loses a prefix
    /// of its seqs and keeps its floor (the highest seq removed), which
    /// sync and history report in [`Page::expired`] from then on; seq
    /// counters never restart at or below it. Runs in short transactions
    /// until nothing before the cutoff is left; returns the messages
    /// removed. The embedded node runs it on a schedule; on the pipeline
    /// the storage worker does, with the same code.
    fn expire_before(
        &self,
        cutoff_ms: i64,
        mode: RetentionMode,
    ) -> impl Future<Output = StoreResult<u64>> + Send;

    /// Distinct senders (server notices excluded) of the messages with seq
    /// in `(after, upto]`, at most `limit` of them.
    fn senders_between(
        &self,
        conversation: ConversationId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<UserId>>> + Send;

    // ---- groups ----

    /// Creates a group owned by `owner` with `owner` and `members` in it
    /// (repeats ignored). [`StoreError::NotFound`] if a member does not
    /// exist; [`StoreError::LimitExceeded`] above `limits.max_members`, or
    /// if one of them is in `limits.max_groups_per_user` groups already. On
    /// error nothing changes.
    fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        limits: GroupLimits,
    ) -> impl Future<Output = StoreResult<GroupRecord>> + Send;

    /// Adds users (already-members are skipped) and returns the group and
    /// the users actually added. Errors as for `create_group`.
    fn add_members(
        &self,
        group: GroupId,
        users: &[UserId],
        limits: GroupLimits,
    ) -> impl Future<Output = StoreResult<(GroupRecord, Vec<UserId>)>> + Send;

    /// Removes users (non-members are skipped) and returns the group and the
    /// users actually removed. When the owner goes, the longest-standing
    /// remaining member becomes owner.
    fn remove_members(
        &self,
        group: GroupId,
        users: &[UserId],
    ) -> impl Future<Output = StoreResult<(GroupRecord, Vec<UserId>)>> + Send;

    /// A group by id.
    fn group(
        &self,
        group: GroupId,
    ) -> impl Future<Output = StoreResult<Option<GroupRecord>>> + Send;

    /// Member ids of a group, in joining order (empty for an unknown group).
    fn group_members(
        &self,
        group: GroupId,
    ) -> impl Future<Output = StoreResult<Vec<UserId>>> + Send;

    /// The user's groups with id above `after`, ascending by id, at most
    /// `limit`; the flag says whether more remain.
    fn user_groups(
        &self,
        user: UserId,
        after: GroupId,
        limit: usize,
    ) -> impl Future<Output = StoreResult<(Vec<GroupRecord>, bool)>> + Send;
}
