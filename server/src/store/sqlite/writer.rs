//! The writer thread: the only connection that writes, fed by a bounded job
//! queue, applying jobs in FIFO order with group commit.
//!
//! The thread takes one job, drains whatever else is already queued (up to
//! `max_group_commit` messages and jobs), applies them all inside one
//! transaction, commits once and only then replies to every job. One fsync
//! thus serves many sends. Each job but an append runs inside its own
//! savepoint, so a job that fails leaves the others of its group untouched.
//! Appends check everything before they write and skip the savepoint (its
//! statement journal was a measurable cost per send); one that fails anyway
//! (a backend error) abandons the group. When the commit fails, every job
//! of the group gets [`StoreError::Backend`].
//!
//! The thread owns the dedup window ([`RecentSends`]) and keeps two caches:
//! the last seq of recently used conversations and the ids of users known
//! to exist. They mirror what this connection sees (committed state plus
//! the open transaction) and are dropped whenever something is rolled
//! back, so they never get ahead of the database.

use std::collections::{HashMap, HashSet};

use crossbeam_channel::Receiver;
use im_proto::ids::{ConversationKind, GROUP_BASE, MAX_GROUP_ID, MAX_USER_ID};
use im_proto::{ConversationId, pb};
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::recent::RecentSends;
use crate::store::{
    Ack, AppendOutcome, AppendRejection, AppendResult, CursorKind, CursorMove, GroupId,
    GroupLimits, GroupRecord, NewMessage, StoreError, StoreResult, UserId,
};

/// Where a job's outcome goes.
pub(super) type Reply<T> = oneshot::Sender<StoreResult<T>>;

/// Entries a cache may hold before it is emptied (checked between groups,
/// never in the middle of a job).
const CACHE_LIMIT: usize = 100_000;

/// One unit of write work, answered over its `reply` channel.
pub(super) enum Job {
    CreateUser {
        username: String,
        password_hash: String,
        reply: Reply<UserId>,
    },
    Append {
        batch: Vec<NewMessage>,
        reply: Reply<Vec<AppendResult>>,
    },
    AdvanceCursor {
        user: UserId,
        conversation: ConversationId,
        kind: CursorKind,
        seq: u64,
        reply: Reply<Option<CursorMove>>,
    },
    CreateGroup {
        owner: UserId,
        name: String,
        members: Vec<UserId>,
        limits: GroupLimits,
        reply: Reply<GroupRecord>,
    },
    AddMembers {
        group: GroupId,
        users: Vec<UserId>,
        limits: GroupLimits,
        reply: Reply<(GroupRecord, Vec<UserId>)>,
    },
    RemoveMembers {
        group: GroupId,
        users: Vec<UserId>,
        reply: Reply<(GroupRecord, Vec<UserId>)>,
    },
    /// Any other write: a function of the connection, run in its own
    /// savepoint (accounts and sessions, see `sessions.rs`).
    Call(Box<dyn Call>),
}

/// A write job given as a function of the write connection.
pub(super) trait Call: Send {
    /// Runs it inside the open transaction; the outcome is sent after the
    /// commit.
    fn run(self: Box<Self>, writer: &mut Writer) -> Done;
    /// Answers it without running it.
    fn fail(self: Box<Self>, msg: &str);
}

/// [`Call`] for a function and its reply channel.
pub(super) struct TypedCall<T, F> {
    pub(super) f: F,
    pub(super) reply: Reply<T>,
}

impl<T, F> Call for TypedCall<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
{
    fn run(self: Box<Self>, writer: &mut Writer) -> Done {
        let TypedCall { f, reply } = *self;
        let result = writer.savepoint(|w| f(&w.conn));
        Done::Call(Box::new(move |commit_error: Option<&str>| {
            let result = match commit_error {
                Some(e) => Err(StoreError::Backend(e.to_owned())),
                None => result,
            };
            let _ = reply.send(result);
        }))
    }

    fn fail(self: Box<Self>, msg: &str) {
        let _ = self.reply.send(Err(StoreError::Backend(msg.to_owned())));
    }
}

impl Job {
    /// How much of a group commit this job uses up.
    fn weight(&self) -> usize {
        match self {
            Job::Append { batch, .. } => batch.len().max(1),
            _ => 1,
        }
    }
}

/// Sends a [`Call`]'s outcome, given the commit's error if any.
pub(super) type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;

/// A job applied inside the open transaction whose reply waits for the
/// commit.
pub(super) enum Done {
    /// A [`Call`]'s outcome, sent with the commit's error if any.
    Call(Deliver),
    User(Reply<UserId>, StoreResult<UserId>),
    Append(Reply<Vec<AppendResult>>, StoreResult<Vec<AppendResult>>),
    Cursor(Reply<Option<CursorMove>>, StoreResult<Option<CursorMove>>),
    Group(Reply<GroupRecord>, StoreResult<GroupRecord>),
    Members(
        Reply<(GroupRecord, Vec<UserId>)>,
        StoreResult<(GroupRecord, Vec<UserId>)>,
    ),
}

impl Done {
    /// Sends the outcome, or `commit_error` when the transaction did not
    /// commit. A caller that stopped waiting is not an error.
    fn deliver(self, commit_error: Option<&str>) {
        fn send<T>(reply: Reply<T>, result: StoreResult<T>, commit_error: Option<&str>) {
            let result = match commit_error {
                Some(e) => Err(StoreError::Backend(e.to_owned())),
                None => result,
            };
            let _ = reply.send(result);
        }
        match self {
            Done::User(r, v) => send(r, v, commit_error),
            Done::Append(r, v) => send(r, v, commit_error),
            Done::Cursor(r, v) => send(r, v, commit_error),
            Done::Group(r, v) => send(r, v, commit_error),
            Done::Members(r, v) => send(r, v, commit_error),
            Done::Call(deliver) => deliver(commit_error),
        }
    }
}

/// State of the writer thread.
pub(super) struct Writer {
    conn: Connection,
    jobs: Receiver<Job>,
    max_group_commit: usize,
    /// Last seq per conversation id, as this connection sees it.
    last_seq: HashMap<u64, u64>,
    /// Ids of users that exist (users are never deleted).
    known_users: HashSet<u64>,
    /// The dedup window.
    recent: RecentSends,
    /// Late resends looked up per sender (each scans a conversation).
    late_checks: LateChecks,
    /// A savepoint could not be closed: the open transaction must not commit.
    poisoned: bool,
}

impl Writer {
    /// A writer over `conn`, its dedup window refilled from the newest
    /// stored messages.
    pub(super) fn new(
        conn: Connection,
        jobs: Receiver<Job>,
        max_group_commit: usize,
        recent: RecentSends,
    ) -> StoreResult<Self> {
        let mut writer = Writer {
            conn,
            jobs,
            max_group_commit: max_group_commit.max(1),
            last_seq: HashMap::new(),
            known_users: HashSet::new(),
            recent,
            late_checks: LateChecks::default(),
            poisoned: false,
        };
        writer.refill_recent()?;
        Ok(writer)
    }

    /// Loads the sends of the last two windows (at most the window's
    /// capacity), so that resends are still recognised after a restart.
    fn refill_recent(&mut self) -> StoreResult<()> {
        let window_ms = i64::try_from(self.recent.window().as_millis()).unwrap_or(i64::MAX);
        let since = im_proto::now_ms().saturating_sub(window_ms.saturating_mul(2));
        let newest =
            i64::try_from(self.recent.per_generation().saturating_mul(2)).unwrap_or(i64::MAX);
        let mut rows = Vec::new();
        {
            let mut stmt = self.conn.prepare(
                "SELECT sender_id, client_msg_id, conversation_id, seq FROM messages
                 WHERE id > (SELECT coalesce(max(id), 0) FROM messages) - ?1
                   AND server_time_ms >= ?2 AND client_msg_id <> ''
                 ORDER BY id",
            )?;
            let mut found = stmt.query(params![newest, since])?;
            while let Some(row) = found.next()? {
                let sender: u64 = row.get(0)?;
                let client_msg_id: String = row.get(1)?;
                rows.push((sender, client_msg_id, row.get(2)?, row.get(3)?));
            }
        }
        for (sender, client_msg_id, conversation, seq) in &rows {
            self.recent
                .preload(*sender, client_msg_id, (*conversation, *seq));
        }
        if !rows.is_empty() {
            tracing::info!(sends = rows.len(), "dedup window refilled");
        }
        Ok(())
    }

    /// Applies jobs until every sender is gone and the queue is empty, then
    /// checkpoints the WAL into the main database file.
    pub(super) fn run(mut self) {
        while let Ok(first) = self.jobs.recv() {
            let mut weight = first.weight();
            let mut group = vec![first];
            while weight < self.max_group_commit {
                match self.jobs.try_recv() {
                    Ok(job) => {
                        weight += job.weight();
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "WAL checkpoint at close failed");
        }
    }

    fn commit_group(&mut self, jobs: Vec<Job>) {
        self.recent.rotate_if_due();
        if self.last_seq.len() > CACHE_LIMIT {
            self.last_seq.clear();
        }
        if self.known_users.len() > CACHE_LIMIT {
            self.known_users.clear();
        }
        self.poisoned = false;
        if let Err(e) = self.exec("BEGIN IMMEDIATE") {
            tracing::error!(error = %e, "could not begin a write transaction");
            self.clear_caches();
            let msg = e.to_string();
            for job in jobs {
                // Nothing ran; every job fails the same way.
                Self::reject(job, &msg);
            }
            return;
        }
        let done: Vec<Done> = jobs.into_iter().map(|job| self.apply(job)).collect();
        let commit = if self.poisoned {
            Err(StoreError::Backend(
                "write transaction abandoned after a failed job".into(),
            ))
        } else {
            self.exec("COMMIT")
        };
        let commit_error = match commit {
            Ok(()) => {
                self.recent.commit();
                None
            }
            Err(e) => {
                tracing::error!(error = %e, jobs = done.len(), "write transaction failed");
                if let Err(e) = self.exec("ROLLBACK") {
                    tracing::error!(error = %e, "rollback failed");
                }
                self.recent.rollback();
                self.clear_caches();
                Some(e.to_string())
            }
        };
        for d in done {
            d.deliver(commit_error.as_deref());
        }
    }

    /// Answers a job that never ran.
    fn reject(job: Job, msg: &str) {
        fn fail<T>(reply: Reply<T>, msg: &str) {
            let _ = reply.send(Err(StoreError::Backend(msg.to_owned())));
        }
        match job {
            Job::CreateUser { reply, .. } => fail(reply, msg),
            Job::Append { reply, .. } => fail(reply, msg),
            Job::AdvanceCursor { reply, .. } => fail(reply, msg),
            Job::CreateGroup { reply, .. } => fail(reply, msg),
            Job::AddMembers { reply, .. } | Job::RemoveMembers { reply, .. } => fail(reply, msg),
            Job::Call(call) => call.fail(msg),
        }
    }

    fn apply(&mut self, job: Job) -> Done {
        match job {
            Job::CreateUser {
                username,
                password_hash,
                reply,
            } => Done::User(
                reply,
                self.savepoint(|w| w.create_user(&username, &password_hash)),
            ),
            Job::Append { batch, reply } => {
                Done::Append(reply, self.unguarded(|w| w.append(batch)))
            }
            Job::AdvanceCursor {
                user,
                conversation,
                kind,
                seq,
                reply,
            } => Done::Cursor(
                reply,
                self.savepoint(|w| w.advance_cursor(user, conversation, kind, seq)),
            ),
            Job::CreateGroup {
                owner,
                name,
                members,
                limits,
                reply,
            } => Done::Group(
                reply,
                self.savepoint(|w| w.create_group(owner, &name, &members, limits)),
            ),
            Job::AddMembers {
                group,
                users,
                limits,
                reply,
            } => Done::Members(
                reply,
                self.savepoint(|w| w.add_members(group, &users, limits)),
            ),
            Job::RemoveMembers {
                group,
                users,
                reply,
            } => Done::Members(reply, self.savepoint(|w| w.remove_members(group, &users))),
            Job::Call(call) => call.run(self),
        }
    }

    /// Runs `f` inside a savepoint: kept when it succeeds, undone when it
    /// fails, so one failing job never takes the rest of its group down.
    fn savepoint<T>(&mut self, f: impl FnOnce(&mut Self) -> StoreResult<T>) -> StoreResult<T> {
        if self.poisoned {
            return Err(StoreError::Backend(
                "write transaction abandoned after a failed savepoint".into(),
            ));
        }
        if let Err(e) = self.exec("SAVEPOINT job") {
            self.poisoned = true;
            return Err(e);
        }
        let result = f(self);
        let closed = match &result {
            Ok(_) => self.exec("RELEASE job"),
            Err(e) => {
                if matches!(e, StoreError::Backend(_)) {
                    // The job may have filled caches before failing.
                    self.clear_caches();
                }
                self.exec("ROLLBACK TO job")
                    .and_then(|()| self.exec("RELEASE job"))
            }
        };
        if let Err(e) = closed {
            self.poisoned = true;
            self.clear_caches();
            return Err(e);
        }
        result
    }

    /// Runs `f` without a savepoint, for jobs that check everything before
    /// they write and so fail only on a backend error: that error poisons
    /// the transaction (the whole group fails and rolls back). Saves the
    /// statement journal a savepoint costs on the hot path.
    fn unguarded<T>(&mut self, f: impl FnOnce(&mut Self) -> StoreResult<T>) -> StoreResult<T> {
        if self.poisoned {
            return Err(StoreError::Backend(
                "write transaction abandoned after a failed job".into(),
            ));
        }
        let result = f(self);
        if result.is_err() {
            self.poisoned = true;
            self.clear_caches();
        }
        result
    }

    fn exec(&self, sql: &str) -> StoreResult<()> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    fn clear_caches(&mut self) {
        self.last_seq.clear();
        self.known_users.clear();
    }

    // ---- lookups shared by the jobs ----

    /// The conversation's last seq in the open transaction.
    fn last_seq(&mut self, conversation: u64) -> StoreResult<u64> {
        if let Some(&seq) = self.last_seq.get(&conversation) {
            return Ok(seq);
        }
        // `messages`, because `conversations` is only brought up to date at
        // the end of each append job; and `conversations`, because retention
        // may have removed every message.
        let seq: u64 = self
            .conn
            .prepare_cached(
                "SELECT max(
                   coalesce((SELECT max(seq) FROM messages WHERE conversation_id = ?1), 0),
                   coalesce((SELECT last_seq FROM conversations WHERE id = ?1), 0))",
            )?
            .query_row(params![conversation], |row| row.get(0))?;
        self.last_seq.insert(conversation, seq);
        Ok(seq)
    }

    fn user_exists(&mut self, user: UserId) -> StoreResult<bool> {
        if !(1..=MAX_USER_ID).contains(&user) {
            return Ok(false);
        }
        if self.known_users.contains(&user) {
            return Ok(true);
        }
        let found = self
            .conn
            .prepare_cached("SELECT 1 FROM users WHERE id = ?1")?
            .exists(params![user])?;
        if found {
            self.known_users.insert(user);
        }
        Ok(found)
    }

    fn is_member(&self, conversation: u64, user: UserId) -> StoreResult<bool> {
        let Ok(user) = i64::try_from(user) else {
            return Ok(false);
        };
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2")?
            .exists(params![conversation, user])?)
    }

    /// `LimitExceeded` if one of `users` belongs to `max` groups already.
    fn check_group_counts(&self, users: &[UserId], max: usize) -> StoreResult<()> {
        let mut count = self.conn.prepare_cached(
            "SELECT count(*) FROM members WHERE user_id = ?1 AND conversation_id > ?2",
        )?;
        for &user in users {
            let Ok(user) = i64::try_from(user) else {
                continue;
            };
            let groups: i64 =
                count.query_row(params![user, GROUP_BASE as i64], |row| row.get(0))?;
            if usize::try_from(groups).unwrap_or(usize::MAX) >= max {
                return Err(StoreError::LimitExceeded(
                    crate::store::GROUPS_PER_USER_LIMIT,
                ));
            }
        }
        Ok(())
    }

    /// Name, owner and current member count of a group.
    fn load_group(&self, group: GroupId) -> StoreResult<Option<GroupRecord>> {
        let Some(conversation) = ConversationId::group(group) else {
            return Ok(None);
        };
        let Some((name, owner)) = self
            .conn
            .prepare_cached("SELECT name, owner_id FROM groups WHERE id = ?1")?
            .query_row(params![group], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?
        else {
            return Ok(None);
        };
        let count: u32 = self
            .conn
            .prepare_cached("SELECT count(*) FROM members WHERE conversation_id = ?1")?
            .query_row(params![conversation.raw()], |row| row.get(0))?;
        Ok(Some(GroupRecord {
            id: group,
            name,
            owner,
            member_count: count,
        }))
    }

    // ---- jobs ----

    fn create_user(&mut self, username: &str, password_hash: &str) -> StoreResult<UserId> {
        insert_user(&self.conn, username, password_hash)
    }

    fn append(&mut self, batch: Vec<NewMessage>) -> StoreResult<Vec<AppendResult>> {
        let mut results = Vec::with_capacity(batch.len());
        // conversation -> (last seq, last message id) stored by this job.
        let mut touched: HashMap<u64, (u64, u64)> = HashMap::new();
        for message in batch {
            results.push(self.append_one(message, &mut touched)?);
        }
        let mut upsert = self.conn.prepare_cached(
            "INSERT INTO conversations (id, last_seq, last_message_id) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE
             SET last_seq = excluded.last_seq, last_message_id = excluded.last_message_id",
        )?;
        for (conversation, (seq, message_id)) in touched {
            upsert.execute(params![conversation, seq, message_id])?;
        }
        Ok(results)
    }

    fn append_one(
        &mut self,
        message: NewMessage,
        touched: &mut HashMap<u64, (u64, u64)>,
    ) -> StoreResult<AppendResult> {
        let sender = message.sender;
        let conversation = message.conversation.raw();
        let dedup_key = if sender == 0 {
            0
        } else {
            index_key(sender, &message.client_msg_id)
        };
        if dedup_key != 0 {
            let found = match self
                .recent
                .get(conversation, sender, &message.client_msg_id)
            {
                Some(at) => self.confirm_sent(at, sender, &message.client_msg_id)?,
                // Past the window only a resend is looked up (first attempts
                // stay one map probe), as often as the sender's budget allows.
                None if message.resend => {
                    if !self.late_checks.admit(sender) {
                        return Ok(Err(AppendRejection::DedupBehind));
                    }
                    self.find_sent(conversation, dedup_key, sender, &message.client_msg_id)?
                }
                None => None,
            };
            if let Some(ack) = found {
                return Ok(Ok(AppendOutcome::Duplicate(ack)));
            }
        }
        let last = self.last_seq(conversation)?;
        let seq = last + 1;
        match message.conversation.kind() {
            ConversationKind::Group(_) => {
                if sender != 0 && !self.bump_sender_cursors(conversation, sender, seq)? {
                    return Ok(Err(AppendRejection::NotMember));
                }
            }
            ConversationKind::Direct { lo, hi } => {
                if sender != 0 && sender != lo && sender != hi {
                    return Ok(Err(AppendRejection::NotMember));
                }
                // The participants' rows are created with the first message
                // and never removed, so only a new conversation needs them.
                if last == 0 {
                    if !self.user_exists(lo)? || !self.user_exists(hi)? {
                        return Ok(Err(AppendRejection::NoSuchUser));
                    }
                    let mut add = self.conn.prepare_cached(
                        "INSERT OR IGNORE INTO members (conversation_id, user_id, joined_seq, joined_order)
                         VALUES (?1, ?2, 0, ?3)",
                    )?;
                    add.execute(params![conversation, lo, 1])?;
                    add.execute(params![conversation, hi, 2])?;
                }
                if sender != 0 {
                    self.bump_sender_cursors(conversation, sender, seq)?;
                }
            }
        }
        let content = message.content.encode_to_vec();
        self.conn
            .prepare_cached(
                "INSERT INTO messages
                 (conversation_id, seq, sender_id, client_msg_id, server_time_ms, content, dedup_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                conversation,
                seq,
                sender,
                message.client_msg_id,
                message.server_time_ms,
                content,
                dedup_key
            ])?;
        let message_id = u64::try_from(self.conn.last_insert_rowid())
            .map_err(|_| StoreError::Backend("negative message id".into()))?;
        self.last_seq.insert(conversation, seq);
        touched.insert(conversation, (seq, message_id));
        if sender != 0 && !message.client_msg_id.is_empty() {
            self.recent
                .insert(sender, &message.client_msg_id, (conversation, seq));
        }
        Ok(Ok(AppendOutcome::Stored(pb::Message {
            conversation_id: conversation,
            seq,
            message_id,
            sender_id: sender,
            client_msg_id: message.client_msg_id,
            server_time_ms: message.server_time_ms,
            content: Some(message.content),
        })))
    }

    /// The ack of the message the dedup window says is at `at`, if that row
    /// really is this send.
    fn confirm_sent(
        &self,
        (conversation, seq): (u64, u64),
        sender: UserId,
        client_msg_id: &str,
    ) -> StoreResult<Option<Ack>> {
        let row: Option<(u64, u64, String, i64)> = self
            .conn
            .prepare_cached(
                "SELECT id, sender_id, client_msg_id, server_time_ms FROM messages
                 WHERE conversation_id = ?1 AND seq = ?2",
            )?
            .query_row(params![conversation, seq], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .optional()?;
        Ok(
            row.and_then(|(message_id, stored_sender, stored_id, server_time_ms)| {
                (stored_sender == sender && stored_id == client_msg_id).then_some(Ack {
                    message_id,
                    conversation_id: conversation,
                    seq,
                    server_time_ms,
                })
            }),
        )
    }

    /// The ack of the send stored under this conversation, sender and
    /// client_msg_id at any time (the lowest seq, should there be several):
    /// a scan of the conversation's entries of the (conversation_id, seq,
    /// dedup_key) index, reading only the rows whose key matches.
    fn find_sent(
        &self,
        conversation: u64,
        dedup_key: i64,
        sender: UserId,
        client_msg_id: &str,
    ) -> StoreResult<Option<Ack>> {
        let row: Option<(u64, u64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT id, seq, server_time_ms FROM messages
                 WHERE conversation_id = ?1 AND dedup_key = ?2
                   AND sender_id = ?3 AND client_msg_id = ?4
                 ORDER BY seq LIMIT 1",
            )?
            .query_row(
                params![conversation, dedup_key, sender as i64, client_msg_id],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        Ok(row.map(|(message_id, seq, server_time_ms)| Ack {
            message_id,
            conversation_id: conversation,
            seq,
            server_time_ms,
        }))
    }

    /// Moves the sender's read and delivered cursors to `seq`; false when the
    /// sender has no membership row (which doubles as the membership check).
    fn bump_sender_cursors(
        &self,
        conversation: u64,
        sender: UserId,
        seq: u64,
    ) -> StoreResult<bool> {
        let Ok(sender) = i64::try_from(sender) else {
            return Ok(false);
        };
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE members
                 SET read_seq = max(read_seq, ?3), delivered_seq = max(delivered_seq, ?3)
                 WHERE conversation_id = ?1 AND user_id = ?2",
            )?
            .execute(params![conversation, sender, seq])?;
        Ok(changed > 0)
    }

    fn advance_cursor(
        &mut self,
        user: UserId,
        conversation: ConversationId,
        kind: CursorKind,
        seq: u64,
    ) -> StoreResult<Option<CursorMove>> {
        let participant = matches!(conversation.kind(), ConversationKind::Direct { .. })
            && conversation.peer_of(user).is_some();
        let conversation = conversation.raw();
        let Ok(user) = i64::try_from(user) else {
            return Err(StoreError::NotMember);
        };
        let cursors: Option<(u64, u64)> = self
            .conn
            .prepare_cached(
                "SELECT read_seq, delivered_seq FROM members
                 WHERE conversation_id = ?1 AND user_id = ?2",
            )?
            .query_row(params![conversation, user], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        let Some((read, delivered)) = cursors else {
            // A participant of a direct conversation without messages yet
            // (its rows come with the first one) has nothing to move.
            return if participant {
                Ok(None)
            } else {
                Err(StoreError::NotMember)
            };
        };
        let target = seq.min(self.last_seq(conversation)?);
        let (from, sql) = match kind {
            CursorKind::Read => (
                read,
                "UPDATE members SET read_seq = ?3 WHERE conversation_id = ?1 AND user_id = ?2",
            ),
            CursorKind::Delivered => (
                delivered,
                "UPDATE members SET delivered_seq = ?3 WHERE conversation_id = ?1 AND user_id = ?2",
            ),
        };
        if target <= from {
            return Ok(None);
        }
        self.conn
            .prepare_cached(sql)?
            .execute(params![conversation, user, target])?;
        Ok(Some(CursorMove { from, to: target }))
    }

    fn create_group(
        &mut self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        limits: GroupLimits,
    ) -> StoreResult<GroupRecord> {
        let users = dedup(std::iter::once(owner).chain(members.iter().copied()));
        if users.len() > limits.max_members {
            return Err(StoreError::LimitExceeded("group size"));
        }
        for &user in &users {
            if !self.user_exists(user)? {
                return Err(StoreError::NotFound);
            }
        }
        self.check_group_counts(&users, limits.max_groups_per_user)?;
        self.conn
            .prepare_cached("INSERT INTO groups (name, owner_id, created_ms) VALUES (?1, ?2, ?3)")?
            .execute(params![name, owner, im_proto::now_ms()])?;
        let id = u64::try_from(self.conn.last_insert_rowid()).unwrap_or(0);
        if id > MAX_GROUP_ID {
            return Err(StoreError::Backend("group id space exhausted".into()));
        }
        let conversation = ConversationId::group(id)
            .ok_or_else(|| StoreError::Backend(format!("invalid group id {id}")))?;
        self.insert_members(conversation.raw(), &users, 1)?;
        Ok(GroupRecord {
            id,
            name: name.to_owned(),
            owner,
            member_count: u32::try_from(users.len()).unwrap_or(u32::MAX),
        })
    }

    fn add_members(
        &mut self,
        group: GroupId,
        users: &[UserId],
        limits: GroupLimits,
    ) -> StoreResult<(GroupRecord, Vec<UserId>)> {
        let Some(mut record) = self.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        let conversation = group_conversation(group)?;
        let mut added = Vec::new();
        for user in dedup(users.iter().copied()) {
            if !self.is_member(conversation, user)? {
                added.push(user);
            }
        }
        if record.member_count as usize + added.len() > limits.max_members {
            return Err(StoreError::LimitExceeded("group size"));
        }
        for &user in &added {
            if !self.user_exists(user)? {
                return Err(StoreError::NotFound);
            }
        }
        self.check_group_counts(&added, limits.max_groups_per_user)?;
        let next_order: i64 = self
            .conn
            .prepare_cached(
                "SELECT coalesce(max(joined_order), 0) + 1 FROM members WHERE conversation_id = ?1",
            )?
            .query_row(params![conversation], |row| row.get(0))?;
        self.insert_members(conversation, &added, next_order)?;
        record.member_count = record
            .member_count
            .saturating_add(u32::try_from(added.len()).unwrap_or(u32::MAX));
        Ok((record, added))
    }

    /// Inserts membership rows; new members see only messages stored after
    /// this point.
    fn insert_members(
        &mut self,
        conversation: u64,
        users: &[UserId],
        first_order: i64,
    ) -> StoreResult<()> {
        let joined_seq = self.last_seq(conversation)?;
        // A new member has read nothing, but what came before joining is
        // not theirs to read: both cursors start at the join.
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO members
             (conversation_id, user_id, joined_seq, joined_order, read_seq, delivered_seq)
             VALUES (?1, ?2, ?3, ?4, ?3, ?3)",
        )?;
        for (order, &user) in (first_order..).zip(users) {
            insert.execute(params![conversation, user, joined_seq, order])?;
        }
        Ok(())
    }

    fn remove_members(
        &mut self,
        group: GroupId,
        users: &[UserId],
    ) -> StoreResult<(GroupRecord, Vec<UserId>)> {
        let Some(mut record) = self.load_group(group)? else {
            return Err(StoreError::NotFound);
        };
        let conversation = group_conversation(group)?;
        let mut removed = Vec::new();
        {
            let mut delete = self.conn.prepare_cached(
                "DELETE FROM members WHERE conversation_id = ?1 AND user_id = ?2",
            )?;
            for user in dedup(users.iter().copied()) {
                let Ok(sql_user) = i64::try_from(user) else {
                    continue;
                };
                if delete.execute(params![conversation, sql_user])? > 0 {
                    removed.push(user);
                }
            }
        }
        if removed.contains(&record.owner) {
            let successor: Option<u64> = self
                .conn
                .prepare_cached(
                    "SELECT user_id FROM members WHERE conversation_id = ?1
                     ORDER BY joined_order LIMIT 1",
                )?
                .query_row(params![conversation], |row| row.get(0))
                .optional()?;
            if let Some(successor) = successor {
                self.conn
                    .prepare_cached("UPDATE groups SET owner_id = ?2 WHERE id = ?1")?
                    .execute(params![group, successor])?;
                record.owner = successor;
            }
        }
        record.member_count = record
            .member_count
            .saturating_sub(u32::try_from(removed.len()).unwrap_or(u32::MAX));
        Ok((record, removed))
    }
}

/// A send's key in the messages index: the top 31 bits of its dedup key
/// (small entries; a hit is confirmed against the row), never 0, which
/// marks messages without a client_msg_id.
fn index_key(sender: UserId, client_msg_id: &str) -> i64 {
    match im_storage::layout::dedup_key(sender, client_msg_id) {
        0 => 0,
        key => ((key >> 33) as i64).max(1),
    }
}

/// Late resends (past the window) one sender may have looked up per
/// minute. Each costs a scan of its conversation's index entries in the
/// writer, so without a bound one user could stall everyone's writes by
/// resending unknown ids to a big group.
const LATE_CHECKS_PER_MINUTE: u32 = 120;
/// Senders tracked at most before the expired windows are forgotten.
const LATE_CHECK_SENDERS: usize = 10_000;

#[derive(Default)]
struct LateChecks {
    by_sender: HashMap<UserId, (std::time::Instant, u32)>,
}

impl LateChecks {
    /// Counts one check for `sender`; false when its budget is spent.
    fn admit(&mut self, sender: UserId) -> bool {
        let now = std::time::Instant::now();
        let minute = std::time::Duration::from_secs(60);
        if self.by_sender.len() >= LATE_CHECK_SENDERS {
            self.by_sender
                .retain(|_, (since, _)| now.duration_since(*since) < minute);
            if self.by_sender.len() >= LATE_CHECK_SENDERS {
                // All live: start over rather than grow.
                self.by_sender.clear();
            }
        }
        let (since, count) = self.by_sender.entry(sender).or_insert((now, 0));
        if now.duration_since(*since) >= minute {
            *since = now;
            *count = 0;
        }
        if *count >= LATE_CHECKS_PER_MINUTE {
            return false;
        }
        *count += 1;
        true
    }
}

fn group_conversation(group: GroupId) -> StoreResult<u64> {
    ConversationId::group(group)
        .map(ConversationId::raw)
        .ok_or(StoreError::NotFound)
}

/// The distinct values of `items`, in first-seen order.
fn dedup(items: impl Iterator<Item = UserId>) -> Vec<UserId> {
    let mut seen = HashSet::new();
    items.filter(|u| seen.insert(*u)).collect()
}

/// Inserts an account (inside the caller's savepoint, which undoes it on
/// any later failure of the same job).
pub(super) fn insert_user(
    conn: &Connection,
    username: &str,
    password_hash: &str,
) -> StoreResult<UserId> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO users (username, password_hash, created_ms) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![username, password_hash, im_proto::now_ms()]);
    match inserted {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            return Err(StoreError::UsernameTaken);
        }
        Err(e) => return Err(e.into()),
    }
    let id = u64::try_from(conn.last_insert_rowid()).unwrap_or(0);
    if !(1..=MAX_USER_ID).contains(&id) {
        // Rolled back by the savepoint.
        return Err(StoreError::Backend("user id space exhausted".into()));
    }
    Ok(id)
}
