//! The production store: messages in Redis Streams (appended atomically by
//! a script, acknowledged once Redis has them), everything else in MySQL,
//! with Redis as the cache where reads are hot. The storage worker
//! (`im-storage-worker`) moves stream entries into MySQL in batches.
//!
//! Redis is one server or a Redis Cluster (`--redis-cluster-nodes`): every
//! key a script touches carries its stream shard's hash tag, and with
//! `replica_acks` an append is acknowledged only once that many replicas
//! have it (`WAIT`). A shard's counters are checked against MySQL's stream
//! journal whenever its Redis primary changes (see `append`).
//!
//! Nothing here assumes a single server node: seqs, deduplication, the
//! recent-messages cache and the member sets used to authorise appends all
//! live in Redis; the only process-local cache holds which user ids exist,
//! which never changes once true.
//!
//! - `append`: ordered append lanes and the append script's protocol.
//! - `sql`: accounts, groups and memberships in MySQL (the main database),
//!   and the message reads, each on its conversation's MySQL shard
//!   (`im_storage::shards`; one shard, the main database, unless
//!   `--mysql-shards` lists others).
//! - `engine`: Redis and MySQL errors told apart (busy or failed).
//! - `read`: sync, history, conversation list and cursors, merging the
//!   Redis cache with MySQL without a gap at the boundary.

mod append;
mod engine;
mod read;
mod sql;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use im_proto::ids::ConversationKind;
use im_proto::{ConversationId, pb};
use im_storage::layout::Layout;
use im_storage::redis_target::{RedisConn, RedisTarget, Timeouts};
use tokio::sync::{mpsc, oneshot};

use super::{
    AppendRejection, AppendResult, CursorKind, CursorMove, GroupId, GroupLimits, GroupRecord,
    NewMessage, NewSession, Page, RetentionMode, SessionId, SessionRecord, SessionScope,
    SessionTouch, Store, StoreError, StoreResult, UserId, UserRecord,
};
use append::AppendJob;
use engine::{mysql_err, redis_err};

/// Settings of the pipeline store.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// One Redis or a Redis Cluster.
    pub redis: RedisTarget,
    /// Replicas that must have an append before it is acked (WAIT).
    pub replica_acks: u32,
    /// How long an append waits for them; past it the append is answered
    /// `Overloaded`.
    pub replica_timeout: Duration,
    /// `mysql://user:pass@host:port/db`: accounts, sessions, groups,
    /// memberships, and the messages unless `mysql_shards` lists other
    /// databases.
    pub mysql_url: String,
    /// Databases the messages are spread over by conversation (empty: the
    /// main database). Must match the storage workers, in order.
    pub mysql_shards: Vec<String>,
    /// Key prefix shared by every process of the deployment.
    pub prefix: String,
    /// Stream shards (must match the storage workers).
    pub streams: u32,
    /// Ordered Redis connections for appends (each serves a subset of the
    /// shards).
    pub append_lanes: usize,
    /// Append jobs queued per lane before appends get `Overloaded`.
    pub append_queue: usize,
    /// Messages per append script call at most.
    pub script_batch: usize,
    /// Seconds within which a resend with the same client_msg_id is
    /// recognised (at least; at most twice that).
    pub dedup_window_secs: u64,
    /// Records kept per conversation in the recent cache, beyond those not
    /// yet stored in MySQL.
    pub recent_cache_len: u32,
    /// Seconds an idle conversation's recent cache lives.
    pub recent_cache_ttl_secs: u64,
    /// Pooled Redis connections for reads and other commands.
    pub redis_pool_size: usize,
    /// Pooled MySQL connections, of the main database and of each shard.
    pub mysql_pool_size: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            redis: RedisTarget::Single("redis://127.0.0.1:6379".into()),
            replica_acks: 0,
            replica_timeout: Duration::from_secs(1),
            mysql_url: "mysql://root@127.0.0.1:3306/im".into(),
            mysql_shards: Vec::new(),
            prefix: im_storage::layout::DEFAULT_PREFIX.into(),
            streams: im_storage::layout::DEFAULT_STREAMS,
            append_lanes: 4,
            append_queue: 4096,
            script_batch: 512,
            dedup_window_secs: 600,
            recent_cache_len: 200,
            recent_cache_ttl_secs: 24 * 3600,
            redis_pool_size: 16,
            mysql_pool_size: 16,
        }
    }
}

/// Where reads and other commands go: a pool of connections to one Redis,
/// or the cluster client (one multiplexed connection per node).
enum RedisReads {
    Pool(deadpool_redis::Pool),
    Shared(RedisConn),
}

impl RedisReads {
    async fn get(&self) -> StoreResult<ReadConn> {
        match self {
            RedisReads::Pool(pool) => Ok(ReadConn::Pooled(pool.get().await.map_err(redis_err)?)),
            RedisReads::Shared(conn) => Ok(ReadConn::Shared(conn.clone())),
        }
    }
}

/// A connection from [`RedisReads`].
pub(crate) enum ReadConn {
    Pooled(deadpool_redis::Connection),
    Shared(RedisConn),
}

impl redis::aio::ConnectionLike for ReadConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            ReadConn::Pooled(c) => c.req_packed_command(cmd),
            ReadConn::Shared(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            ReadConn::Pooled(c) => c.req_packed_commands(cmd, offset, count),
            ReadConn::Shared(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            ReadConn::Pooled(c) => c.get_db(),
            ReadConn::Shared(c) => c.get_db(),
        }
    }
}

/// Seconds a user's index of direct conversations not yet in MySQL lives.
const DIRECT_INDEX_TTL_SECS: u64 = 7 * 24 * 3600;
/// Seconds a cached member set lives.
const MEMBERS_TTL_SECS: u64 = 24 * 3600;

pub(crate) struct Shared {
    layout: Layout,
    options: PipelineOptions,
    mysql: mysql_async::Pool,
    /// The pools of the message shards (the main pool when unsharded).
    messages: im_storage::shards::ShardPools,
    redis: RedisReads,
    /// Ids known to exist (users are never deleted, so this can only be
    /// stale in the harmless direction).
    known_users: moka::sync::Cache<UserId, ()>,
}

/// Messages in Redis Streams, the rest in MySQL.
pub struct PipelineStore {
    shared: Arc<Shared>,
    lanes: Vec<mpsc::Sender<AppendJob>>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How long a pooled MySQL connection above the pool's first may stay
/// idle before it is closed.
const MYSQL_IDLE_TTL: Duration = Duration::from_secs(60);

impl PipelineStore {
    /// Connects to Redis and MySQL, runs the schema migrations and starts
    /// the append lanes. Must be called within a tokio runtime.
    pub async fn open(options: PipelineOptions) -> StoreResult<PipelineStore> {
        im_storage::shards::validate_urls(&options.mysql_shards)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let size = options.mysql_pool_size;
        let mysql = mysql_pool(&options.mysql_url, size).map_err(mysql_err)?;
        im_storage::schema::migrate(&mysql)
            .await
            .map_err(|e| mysql_err(e.to_string()))?;
        let messages = im_storage::shards::ShardPools::new(
            &options.mysql_url,
            &mysql,
            &options.mysql_shards,
            |url| mysql_pool(url, size),
        )
        .map_err(mysql_err)?;
        messages
            .migrate()
            .await
            .map_err(|e| mysql_err(e.to_string()))?;

        let redis = match &options.redis {
            RedisTarget::Single(url) => {
                let mut config = deadpool_redis::Config::from_url(url.clone());
                config.pool = Some(deadpool_redis::PoolConfig::new(
                    options.redis_pool_size.max(1),
                ));
                RedisReads::Pool(
                    config
                        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                        .map_err(|e| redis_err(e.to_string()))?,
                )
            }
            // The cluster client multiplexes over one connection per node.
            cluster => RedisReads::Shared(
                cluster
                    .connect(Timeouts::both(Duration::from_secs(5)))
                    .await
                    .map_err(redis_err)?,
            ),
        };
        // Fail fast on a wrong URL rather than at the first message.
        let mut conn = redis.get().await?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        drop(conn);

        let shared = Arc::new(Shared {
            layout: Layout::new(options.prefix.clone(), options.streams),
            known_users: moka::sync::Cache::new(1_000_000),
            mysql,
            messages,
            redis,
            options,
        });
        let mut lanes = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..shared.options.append_lanes.max(1) {
            // A Redis that stops answering fails the round (clients retry)
            // rather than stalling its lane.
            let conn = shared
                .options
                .redis
                .connect(Timeouts::both(Duration::from_secs(5)))
                .await
                .map_err(redis_err)?;
            let (tx, rx) = mpsc::channel(shared.options.append_queue.max(1));
            tasks.push(tokio::spawn(append::run_lane(shared.clone(), conn, rx)));
            lanes.push(tx);
        }
        tracing::info!(
            streams = shared.layout.streams(),
            prefix = shared.layout.prefix(),
            mysql_shards = shared.messages.len(),
            "pipeline store opened"
        );
        Ok(PipelineStore {
            shared,
            lanes,
            tasks: std::sync::Mutex::new(tasks),
        })
    }

    /// Whether Redis answers PING within `timeout` (taking a pooled
    /// connection included); `Err` says why not.
    pub async fn ping(&self, timeout: Duration) -> StoreResult<()> {
        let ping = async {
            let mut conn = self.shared.redis().await?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(redis_err)
        };
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Backend(format!(
                "redis: no answer to PING within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Stops the append lanes and closes the MySQL pool. Call it once no
    /// append is in flight (the server does, after draining requests);
    /// appends still queued fail with [`StoreError::Closed`]. Everything
    /// acknowledged is already in Redis.
    pub async fn close(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            task.abort();
        }
        self.shared.messages.disconnect().await;
        if let Err(e) = self.shared.mysql.clone().disconnect().await {
            tracing::warn!(error = %e, "closing the MySQL pool failed");
        }
    }
}

/// A MySQL pool of up to `size` connections for `url`.
fn mysql_pool(url: &str, size: usize) -> Result<mysql_async::Pool, mysql_async::Error> {
    let opts = mysql_async::Opts::from_url(url).map_err(mysql_async::Error::from)?;
    let constraints = mysql_async::PoolConstraints::new(1, size.max(1)).unwrap_or_default();
    // Connections above the first stay open while they are in use at
    // least once a minute. (The default closes each one the moment it is
    // idle, so under load every query above one at a time paid a new
    // connection: two MySQL handshakes per login, which kept MariaDB busy
    // with 100,000 logins.)
    let pool_opts = mysql_async::PoolOpts::default()
        .with_constraints(constraints)
        .with_inactive_connection_ttl(MYSQL_IDLE_TTL);
    let opts = mysql_async::OptsBuilder::from_opts(opts)
        .pool_opts(pool_opts)
        .stmt_cache_size(256);
    Ok(mysql_async::Pool::new(opts))
}

impl Store for PipelineStore {
    fn create_user(
        &self,
        username: &str,
        password_hash: &str,
    ) -> impl Future<Output = StoreResult<UserId>> + Send {
        sql::create_user(&self.shared, username, password_hash)
    }

    fn user_by_name(
        &self,
        username: &str,
    ) -> impl Future<Output = StoreResult<Option<UserRecord>>> + Send {
        sql::user_by_name(&self.shared, username)
    }

    fn lookup_users(
        &self,
        ids: &[UserId],
        names: &[String],
    ) -> impl Future<Output = StoreResult<Vec<(UserId, String)>>> + Send {
        sql::lookup_users(&self.shared, ids, names)
    }

    fn set_password(
        &self,
        user: UserId,
        password_hash: &str,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        sql::set_password(&self.shared, user, password_hash)
    }

    fn create_user_with_session(
        &self,
        username: &str,
        password_hash: &str,
        session: NewSession,
    ) -> impl Future<Output = StoreResult<(UserId, SessionId)>> + Send {
        sql::create_user_with_session(&self.shared, username, password_hash, session)
    }

    fn create_session(
        &self,
        session: NewSession,
    ) -> impl Future<Output = StoreResult<(SessionId, Vec<SessionId>)>> + Send {
        sql::create_session(&self.shared, session)
    }

    fn sessions(
        &self,
        user: UserId,
        live_since_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<SessionRecord>>> + Send {
        sql::sessions(&self.shared, user, live_since_ms)
    }

    fn end_sessions(
        &self,
        user: UserId,
        scope: SessionScope,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<SessionId>>> + Send {
        sql::end_sessions(&self.shared, user, scope, now_ms)
    }

    fn ended_since(
        &self,
        since_ms: i64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<(SessionId, i64)>>> + Send {
        sql::ended_since(&self.shared, since_ms, limit)
    }

    fn session_ended(&self, id: SessionId) -> impl Future<Output = StoreResult<bool>> + Send {
        sql::session_ended(&self.shared, id)
    }

    fn touch_sessions(
        &self,
        touches: Vec<SessionTouch>,
    ) -> impl Future<Output = StoreResult<()>> + Send {
        sql::touch_sessions(&self.shared, touches)
    }

    fn append_batch(
        &self,
        batch: Vec<NewMessage>,
    ) -> impl Future<Output = StoreResult<Vec<AppendResult>>> + Send + 'static {
        // Each shard is served by one lane, which applies its jobs in FIFO
        // order: splitting by lane here, synchronously, keeps every
        // conversation's messages in call order across calls.
        let total = batch.len();
        let lanes = self.lanes.len();
        let mut split: Vec<(Vec<usize>, Vec<NewMessage>)> =
            (0..lanes).map(|_| Default::default()).collect();
        for (i, message) in batch.into_iter().enumerate() {
            let lane = self.shared.layout.shard_of(message.conversation.raw()) as usize % lanes;
            split[lane].0.push(i);
            split[lane].1.push(message);
        }
        // A lane that is full (or gone, at shutdown) refuses its own
        // messages only: the others are submitted, stored and answered as
        // usual.
        let mut results: Vec<Option<AppendResult>> = (0..total).map(|_| None).collect();
        let mut waiting = Vec::new();
        for (lane, (indices, messages)) in split.into_iter().enumerate() {
            if messages.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let job = AppendJob {
                batch: messages,
                reply: tx,
            };
            match self.lanes[lane].try_send(job) {
                Ok(()) => waiting.push((indices, rx)),
                Err(_) => {
                    for i in indices {
                        results[i] = Some(Err(AppendRejection::Overloaded));
                    }
                }
            }
        }
        async move {
            for (indices, rx) in waiting {
                let part = rx.await.map_err(|_| StoreError::Closed)??;
                for (i, result) in indices.into_iter().zip(part) {
                    results[i] = Some(result);
                }
            }
            results
                .into_iter()
                .map(|r| r.ok_or_else(|| StoreError::Backend("append lane answered partly".into())))
                .collect()
        }
    }

    fn sync(
        &self,
        user: UserId,
        cursors: &[(ConversationId, u64)],
        limit: usize,
    ) -> impl Future<Output = StoreResult<Page>> + Send {
        read::sync(&self.shared, user, cursors, limit)
    }

    fn history(
        &self,
        user: UserId,
        conversation: ConversationId,
        before_seq: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Page>> + Send {
        read::history(&self.shared, user, conversation, before_seq, limit)
    }

    fn conversations(
        &self,
        user: UserId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<(Vec<pb::ConversationSummary>, bool)>> + Send {
        read::conversations(&self.shared, user, after, limit)
    }

    fn advance_cursor(
        &self,
        user: UserId,
        conversation: ConversationId,
        kind: CursorKind,
        seq: u64,
    ) -> impl Future<Output = StoreResult<Option<CursorMove>>> + Send {
        read::advance_cursor(&self.shared, user, conversation, kind, seq)
    }

    fn expire_before(
        &self,
        cutoff_ms: i64,
        mode: RetentionMode,
    ) -> impl Future<Output = StoreResult<u64>> + Send {
        sql::expire_before(&self.shared, cutoff_ms, mode)
    }

    fn senders_between(
        &self,
        conversation: ConversationId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> impl Future<Output = StoreResult<Vec<UserId>>> + Send {
        read::senders_between(&self.shared, conversation, after, upto, limit)
    }

    fn create_group(
        &self,
        owner: UserId,
        name: &str,
        members: &[UserId],
        limits: GroupLimits,
    ) -> impl Future<Output = StoreResult<GroupRecord>> + Send {
        sql::create_group(&self.shared, owner, name, members, limits)
    }

    fn add_members(
        &self,
        group: GroupId,
        users: &[UserId],
        limits: GroupLimits,
    ) -> impl Future<Output = StoreResult<(GroupRecord, Vec<UserId>)>> + Send {
        sql::add_members(&self.shared, group, users, limits)
    }

    fn remove_members(
        &self,
        group: GroupId,
        users: &[UserId],
    ) -> impl Future<Output = StoreResult<(GroupRecord, Vec<UserId>)>> + Send {
        sql::remove_members(&self.shared, group, users)
    }

    fn group(
        &self,
        group: GroupId,
    ) -> impl Future<Output = StoreResult<Option<GroupRecord>>> + Send {
        sql::group(&self.shared, group)
    }

    fn group_members(
        &self,
        group: GroupId,
    ) -> impl Future<Output = StoreResult<Vec<UserId>>> + Send {
        sql::group_members(&self.shared, group)
    }

    fn user_groups(
        &self,
        user: UserId,
        after: GroupId,
        limit: usize,
    ) -> impl Future<Output = StoreResult<(Vec<GroupRecord>, bool)>> + Send {
        sql::user_groups(&self.shared, user, after, limit)
    }
}

impl Shared {
    /// A Redis connection for reads and other commands.
    async fn redis(&self) -> StoreResult<ReadConn> {
        self.redis.get().await
    }

    /// A pooled MySQL connection to the main database.
    async fn mysql(&self) -> StoreResult<mysql_async::Conn> {
        self.mysql.get_conn().await.map_err(mysql_err)
    }

    /// A pooled MySQL connection to message shard `shard`.
    async fn message_shard(&self, shard: u32) -> StoreResult<mysql_async::Conn> {
        self.messages.get(shard).get_conn().await.map_err(mysql_err)
    }

    /// The last seq of each conversation (0 if none), from Redis, falling
    /// back to MySQL for conversations Redis does not know.
    async fn last_seqs(&self, conversations: &[u64]) -> StoreResult<Vec<u64>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for &conv in conversations {
            let shard = self.layout.shard_of(conv);
            pipe.cmd("HGET").arg(self.layout.seq_key(shard)).arg(conv);
        }
        let mut conn = self.redis().await?;
        // Counters hold last seq + 1.
        let found: Vec<Option<u64>> = pipe
            .query_async::<Vec<Option<u64>>>(&mut conn)
            .await
            .map_err(redis_err)?
            .into_iter()
            .map(|v| v.map(|v| v.saturating_sub(1)))
            .collect();
        let missing: Vec<u64> = conversations
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(&c, _)| c)
            .collect();
        let from_mysql = if missing.is_empty() {
            Default::default()
        } else {
            sql::stored_last_seqs(self, &missing).await?
        };
        Ok(conversations
            .iter()
            .zip(found)
            .map(|(c, f)| f.unwrap_or_else(|| from_mysql.get(c).copied().unwrap_or(0)))
            .collect())
    }

    /// For each id, whether that user exists.
    async fn users_exist(&self, users: &[UserId]) -> StoreResult<Vec<bool>> {
        let mut exists: Vec<bool> = users
            .iter()
            .map(|u| self.known_users.contains_key(u))
            .collect();
        let unknown: Vec<UserId> = users
            .iter()
            .zip(&exists)
            .filter(|(u, known)| !**known && (1..=im_proto::ids::MAX_USER_ID).contains(*u))
            .map(|(&u, _)| u)
            .collect();
        if unknown.is_empty() {
            return Ok(exists);
        }
        let mut pipe = redis::pipe();
        for &u in &unknown {
            pipe.cmd("GETBIT").arg(self.layout.users_key()).arg(u);
        }
        let mut conn = self.redis().await?;
        let bits: Vec<u8> = pipe.query_async(&mut conn).await.map_err(redis_err)?;
        let mut still: Vec<UserId> = Vec::new();
        for (&u, bit) in unknown.iter().zip(bits) {
            if bit == 1 {
                self.known_users.insert(u, ());
            } else {
                still.push(u);
            }
        }
        if !still.is_empty() {
            // Not in the bitmap (e.g. Redis lost it): MySQL is the truth.
            let found = sql::existing_users(self, &still).await?;
            if !found.is_empty() {
                let mut pipe = redis::pipe();
                for &u in &found {
                    self.known_users.insert(u, ());
                    pipe.cmd("SETBIT")
                        .arg(self.layout.users_key())
                        .arg(u)
                        .arg(1)
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.map_err(redis_err)?;
            }
        }
        for (e, u) in exists.iter_mut().zip(users) {
            *e = self.known_users.contains_key(u);
        }
        Ok(exists)
    }

    /// Whether `user` may read `conversation`, and from which seq on
    /// (`Some(joined_seq)`), else `None`.
    async fn visibility(
        &self,
        user: UserId,
        conversation: ConversationId,
    ) -> StoreResult<Option<u64>> {
        match conversation.kind() {
            ConversationKind::Direct { .. } => Ok(conversation.peer_of(user).map(|_| 0)),
            ConversationKind::Group(_) => sql::joined_seq(self, user, conversation.raw()).await,
        }
    }
}
