//! Embedded, durable single-node store on SQLite: the default backend,
//! keeping every account, group and acknowledged message in one database
//! file (`im.sqlite3`) under the data directory.
//!
//! - [`schema`]: connection settings and versioned migrations.
//! - [`writer`]: the one thread that writes, with group commit.
//! - [`read`]: the read-only connection pool and every query.
//! - [`retention`]: removing the oldest messages, and the floors reads
//!   report.
//!
//! Writes are jobs sent over a bounded queue to the writer thread, which
//! applies them in FIFO order and commits many at once (one fsync for many
//! sends); a full queue fails fast with [`StoreError::Overloaded`]. Reads
//! run concurrently on the pool thanks to WAL mode. All SQL of the server
//! lives in this module.

mod read;
mod recent;
mod retention;
mod schema;
mod sessions;
mod writer;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use im_proto::{ConversationId, pb};
use rusqlite::Connection;
use tokio::sync::oneshot;

use self::read::ReadPool;
use self::recent::RecentSends;
use self::writer::{Job, Reply, TypedCall, Writer};
use super::{
    AppendResult, CursorKind, CursorMove, GroupId, GroupLimits, GroupRecord, NewMessage,
    NewSession, Page, RetentionMode, SessionId, SessionRecord, SessionScope, SessionTouch, Store,
    StoreError, StoreResult, UserId, UserRecord,
};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "im.sqlite3";

/// Tuning of [`SqliteStore`]. Zero values are raised to 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Read-only connections, i.e. reads that run at once. Default 4.
    pub read_connections: usize,
    /// Write jobs (one per call) that may wait for the writer before calls
    /// fail with [`StoreError::Overloaded`]. Default 8192.
    pub write_queue: usize,
    /// Most messages (plus other jobs) committed in one transaction.
    /// Default 4096.
    pub max_group_commit: usize,
    /// How long a resend is recognised at least (at most twice as long).
    /// Default 600 s.
    pub dedup_window: Duration,
    /// Sends the dedup window holds at most. Default 2,000,000.
    pub dedup_capacity: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            read_connections: 4,
            write_queue: 8192,
            max_group_commit: 4096,
            dedup_window: Duration::from_secs(600),
            dedup_capacity: 2_000_000,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// The embedded store. Share it as `Arc<SqliteStore>`.
pub struct SqliteStore {
    /// Queue to the writer; `None` once closed. Read-locked for each
    /// submission (no contention but [`SqliteStore::close`]), so closing
    /// cannot race with a job being queued behind the writer's exit.
    jobs: RwLock<Option<Sender<Job>>>,
    /// The writer thread, joined by `close`.
    writer: Mutex<Option<JoinHandle<()>>>,
    reads: Arc<ReadPool>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store under `dir` (file
    /// `dir/im.sqlite3`), runs migrations and starts the writer thread.
    pub fn open(dir: &Path, options: SqliteOptions) -> StoreResult<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join(DB_FILE);
        let mut conn = Connection::open(&path)?;
        schema::configure_writer(&conn)?;
        schema::migrate(&mut conn)?;
        let reads = Arc::new(ReadPool::open(&path, options.read_connections)?);

        let (tx, rx) = crossbeam_channel::bounded(options.write_queue.max(1));
        let recent = RecentSends::new(options.dedup_window, options.dedup_capacity);
        let writer = Writer::new(conn, rx, options.max_group_commit, recent)?;
        let handle = std::thread::Builder::new()
            .name("im-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
        tracing::info!(path = %path.display(), "store opened");
        Ok(SqliteStore {
            jobs: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            reads,
            path,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops taking work, finishes every write already queued, stops the
    /// writer thread and checkpoints the WAL into the database file.
    ///
    /// Blocks the calling thread until the queued writes are committed (call
    /// it from `spawn_blocking` or at the end of `main` when that matters).
    /// Idempotent; afterwards every method fails with
    /// [`StoreError::Closed`]. Also run on drop.
    pub fn close(&self) {
        // Dropping the only sender lets the writer drain the queue and exit.
        drop(
            self.jobs
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        // Held while joining so that a concurrent `close` also waits.
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = writer.take() {
            if handle.join().is_err() {
                tracing::error!("the store writer thread panicked");
            }
            tracing::info!(path = %self.path.display(), "store closed");
        }
        self.reads.close();
    }

    /// Queues a write job now and returns a future for its outcome.
    fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce(Reply<T>) -> Job,
    ) -> impl Future<Output = StoreResult<T>> + Send + 'static {
        let (reply, outcome) = oneshot::channel();
        let queued = self.enqueue(job(reply));
        async move {
            queued?;
            // The writer drops the reply only if it died.
            outcome.await.map_err(|_| StoreError::Closed)?
        }
    }

    fn enqueue(&self, job: Job) -> StoreResult<()> {
        let jobs = self.jobs.read().unwrap_or_else(PoisonError::into_inner);
        let Some(jobs) = jobs.as_ref() else {
            return Err(StoreError::Closed);
        };
        jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => StoreError::Overloaded,
            TrySendError::Disconnected(_) => StoreError::Closed,
        })
    }

    /// Runs `f` on the writer thread in a savepoint of its own.
    fn write<T, F>(&self, f: F) -> impl Future<Output = StoreResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.submit(move |reply| Job::Call(Box::new(TypedCall { f, reply })))
    }

    /// Runs a query on the read pool.
    fn read<T, F>(&self, query: F) -> impl Future<Output = StoreResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let reads = Arc::clone(&self.reads);
        async move { reads.run(query).await }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl Store for SqliteStore {
    fn create_user(
        &self,
        username: &str,
        password_hash: &str,
    ) -> impl Future<Output = StoreResult<UserId>> + Send {
        let (username, password_hash) = (username.to_owned(), password_hash.to_owned());
        self.submit(move |reply| Job::CreateUser {
            username,
            password_hash,
            reply,
        })
    }

    fn user_by_name(
        &self,
        username: &str,
    ) -> impl Future<Output = StoreResult<Option<UserRecord>>> + Send {
        let username = username.to_owned();
        self.read(move |conn| read::user_by_name(conn, &username))
    }

    fn lookup_users(
        &self,
        ids: &[UserId],
        names: &[String],
    ) -> impl Future<Output = StoreResult<Vec<(UserId, String)>>> + Send {
        let (ids, names) = (ids.to_vec(), names.to_vec());
        self.read(move |conn| read::lookup_users(conn, &ids, &names))
    }

    fn set_password(
        &self,
        user: UserId,
        password_hash: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        let hash = password_hash.to_owned();
        self.write(move |conn| sessions::set_password(conn, user, &hash))
    }

    fn create_user_with_session(
        &self,
        username: &str,
        password_hash: &str,
        session: NewSession,
    ) -> impl Future<Output = StoreResult<(UserId, SessionId)>> + Send {
        let (username, password_hash) = (username.to_owned(), password_hash.to_owned());
        self.write(move |conn| {
            let user = writer::insert_user(conn, &username, &password_hash)?;
            let (id, _) = sessions::create_session(conn, &NewSession { user, ..session })?;
            Ok((user, id))
        })
    }

    fn create_session(
        &self,
        session: NewSession,
    ) -> impl Future<Output = StoreResult<(SessionId, Vec<SessionId>)>> + Send {
        self.write(move |conn| sessions::create_session(conn, &session))
    }

    fn sessions(
        &self,
        user: UserId,
        live_since_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<SessionRecord>>> + Send {
        self.read(move |conn| sessions::sessions(conn, user, live_since_ms))
    }

    fn end_sessions(
        &self,
        user: UserId,
        scope: SessionScope,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<SessionId>>> + Send {
        self.write(move |conn| sessions::end_sessions(conn, user, scope, now_ms))
    }

    fn ended_since(
        &self,
        since_ms: i64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<(SessionId, i64)>>> + Send {
        self.read(move |conn| sessions::ended_since(conn, since_ms, limit))
    }

    fn session_ended(&self, id: SessionId) -> impl Future<Output = StoreResult<bool>> + Send {
        self.read(move |conn| sessions::session_ended(conn, id))
    }

    fn touch_sessions(
        &self,
        touches: Vec<SessionTouch>,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        self.write(move |conn| sessions::touch_sessions(conn, &touches))
    }

    fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> impl Future<Output = StoreResult<Vec<AppendResult>>> + Send + 'static {
        self.submit(move |reply| Job::Append { batch, reply })
    }

    fn sync(
        &self,
        user: UserId,
        cursors: &[(ConversationId, u64)],
        limit: usize,
    ) -> impl Future<Output = StoreResult<Page>> + Send {
        let cursors = cursors.to_vec();
        self.read(move |conn| read::sync(conn, user, &cursors, limit))
    }

    fn history(
        &self,
        user: UserId,
        conversation: ConversationId,
        before_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Page>> + Send {
        self.read(move |conn| read::history(conn, user, conversation, before_seq, limit))
    }

    fn conversations(
        &self,
        user: UserId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<(Vec<pb::ConversationSummary>, bool)>> + Send {
        self.read(move |conn| read::conversations(conn, user, after, limit))
    }

    fn advance_cursor(
        &self,
        user: UserId,
        conversation: ConversationId,
        kind: CursorKind,
        seq: u64,
    ) -> impl Future<Output = StoreResult<Option<CursorMove>>> + Send {
        self.submit(move |reply| Job::AdvanceCursor {
            user,
            conversation,
            kind,
            seq,
            reply,
        })
    }

    async fn expire_before(&self, cutoff_ms: i64, mode: RetentionMode) -> StoreResult<u64> {
        let mut removed = 0;
        // One write job per step, so appends run in between.
        loop {
            let n = self
                .write(move |conn| retention::expire_step(conn, cutoff_ms, mode))
                .await?;
            removed += n as u64;
            if n < retention::STEP_ROWS {
                return Ok(removed);
            }
        }
    }

    fn senders_between(
        &self,
        conversation: ConversationId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<UserId>>> + Send {
        self.read(move |conn| read::senders_between(conn, conversation, after, upto, limit))
    }

    fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        limits: GroupLimits,
    ) -> impl Future<Output = StoreResult<GroupRecord>> + Send {
        let (name, members) = (name.to_owned(), members.to_vec());
        self.submit(move |reply| Job::CreateGroup {
            owner,
            name,
            members,
            limits,
            reply,
        })
    }

    fn add_members(
        &self,
        group: GroupId,
        users: &[UserId],
        limits: GroupLimits,
    ) -> impl Future<Output = StoreResult<(GroupRecord, Vec<UserId>)>> + Send {
        let users = users.to_vec();
        self.submit(move |reply| Job::AddMembers {
            group,
            users,
            limits,
            reply,
        })
    }

    fn remove_members(
        &self,
        group: GroupId,
        users: &[UserId],
    ) -> impl Future<Output = StoreResult<(GroupRecord, Vec<UserId>)>> + Send {
        let users = users.to_vec();
        self.submit(move |reply| Job::RemoveMembers {
            group,
            users,
            reply,
        })
    }

    fn group(
        &self,
        group: GroupId,
    ) -> impl Future<Output = StoreResult<Option<GroupRecord>>> + Send {
        self.read(move |conn| read::group(conn, group))
    }

    fn group_members(
        &self,
        group: GroupId,
    ) -> impl Future<Output = StoreResult<Vec<UserId>>> + Send {
        self.read(move |conn| read::group_members(conn, group))
    }

    fn user_groups(
        &self,
        user: UserId,
        after: GroupId,
        limit: usize,
    ) -> impl Future<Output = StoreResult<(Vec<GroupRecord>, bool)>> + Send {
        self.read(move |conn| read::user_groups(conn, user, after, limit))
    }
}
