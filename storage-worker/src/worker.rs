//! The storage worker: one task per stream shard moves entries from the
//! shard's stream into MySQL in batches, and the handle that stops it.
//!
//! A shard task owns a Redis connection (its blocking reads would hold up
//! anything sharing it) and borrows a MySQL connection from a pool for each
//! transaction, so shards commit in parallel, as many at once as the pool
//! allows. Messages spread over one or more MySQL shards
//! ([`shards`](crate::shards)), each with its own pool; members rows and
//! read cursors go to the main database. Its loop:
//!
//! 1. on start, re-read this consumer's own pending entries (`XREADGROUP
//!    ... 0`), left by an earlier run under the same name;
//! 2. read new entries (`XREADGROUP ... >` with `BLOCK`) into the batch
//!    until it is due (count, bytes or age);
//! 3. store the batch: each MySQL shard's rows in a transaction of their
//!    own, all shards at once (nothing that must be atomic crosses
//!    shards). If the database rejects a row, split that shard's part in
//!    halves until the bad rows are alone, so every good row commits. A
//!    row whose (conversation, seq) is stored with another message id is
//!    a conflict: counted, and its record dead-lettered. A shard that
//!    fails twice is marked down for a backoff and its rows are deferred
//!    ([`outage`](crate::outage)): their entries stay pending while the
//!    other shards' rows go on being stored, and once the shard answers
//!    again the task re-reads its pending entries;
//! 4. after the commits, `XACK` every entry whose messages are all stored,
//!    and hand the members rows, read cursors and stored watermarks the
//!    messages imply to the [`cursors`](crate::cursors) flusher, which
//!    writes them coalesced; records that can never be stored go to the
//!    dead-letter stream at once, records the database rejects after
//!    `max_attempts` deliveries of their entry (which stays pending until
//!    then, and comes back through step 5);
//! 5. every `claim_interval`, claim entries pending longer than
//!    `claim_idle` (a dead consumer's, or rejected ones) with `XAUTOCLAIM`;
//! 6. every `trim_interval`, trim the stream below what every consumer
//!    group has acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use mysql_async::{OptsBuilder, Pool, PoolConstraints, PoolOpts};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{AdminError, AdminListener, AdminServer, AdminSource, Exposition};
use crate::batch::{Batch, EntryId, FlushRules};
use crate::config::{ConfigError, WorkerConfig};
use crate::cursors::{Deferred, Flusher};
use crate::layout::Layout;
use crate::outage::{Health, Held, ShardState};
use crate::redis_target::{RedisConn, RedisTarget, Timeouts};
use crate::schema::{self, SchemaError};
use crate::shards::ShardPools;
use crate::sql::{
    JournalRow, MemberRow, MessageRow, Plan, SeqConflict, Statements, StoreError,
    statement_cache_size,
};
use crate::stats::{WorkerStats, WorkerStatsSnapshot};
use crate::stream::{DeadLetter, ShardKeys, StreamError, trim_point};

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// MySQL is unreachable or refused a start-up query.
    #[error("mysql: {0}")]
    Mysql(#[from] mysql_async::Error),
    /// The schema could not be migrated.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// Redis is unreachable or refused to create a consumer group.
    #[error(transparent)]
    Redis(#[from] StreamError),
    /// The admin listener could not be bound.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// The storage worker.
pub struct Worker;

/// A running worker: its counters, and the way to stop it.
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    finish: watch::Sender<bool>,
    flusher: Option<JoinHandle<()>>,
    stats: Arc<WorkerStats>,
    pool: Pool,
    shards: ShardPools,
    /// Cleared when shutdown begins (the health check fails from then on).
    running: Arc<AtomicBool>,
    admin: Option<AdminServer>,
}

/// What the worker reports on its admin listener.
struct WorkerAdmin {
    stats: Arc<WorkerStats>,
    health: Arc<Health>,
    running: Arc<AtomicBool>,
}

impl AdminSource for WorkerAdmin {
    fn collect(&self, out: &mut Exposition) {
        self.stats.snapshot().export(out);
        self.health.export(out);
    }

    async fn health(&self) -> Result<(), String> {
        if self.running.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err("stopping".into())
        }
    }
}

impl Worker {
    /// Migrates the schema, creates the consumer groups and starts one task
    /// per stream shard.
    ///
    /// With `admin_listen` set, its address is bound first (so a bad one
    /// fails before anything else) and serves metrics and health once the
    /// shard tasks run.
    pub async fn start(config: WorkerConfig) -> Result<WorkerHandle, WorkerError> {
        config.validate()?;
        let admin = config.admin_listen.map(AdminListener::bind).transpose()?;
        let settings = Arc::new(Settings::from(&config));

        let size = config.mysql_pool_size().max(1);
        let chunk_rows = config.chunk_rows;
        let open = |url: &str| -> Result<Pool, mysql_async::Error> {
            let opts = mysql_async::Opts::from_url(url).map_err(mysql_async::Error::from)?;
            // Idle connections are kept up to `min`: keep them all, with
            // their prepared statements.
            let constraints = PoolConstraints::new(size, size).unwrap_or_default();
            let opts = OptsBuilder::from_opts(opts)
                .pool_opts(
                    PoolOpts::default()
                        .with_constraints(constraints)
                        // Keep the prepared statements across uses.
                        .with_reset_connection(false),
                )
                .stmt_cache_size(statement_cache_size(chunk_rows))
                // Affected rows must count changed rows, not found ones:
                // that is how duplicates are told from inserts.
                .client_found_rows(false)
                // Fewer gap locks, so concurrent batches rarely deadlock.
                .init(vec![
                    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                ]);
            Ok(Pool::new(opts))
        };
        let pool = open(&config.mysql_url)?;
        schema::migrate(&pool).await?;
        // Every shard has a pool of the same size as the main database.
        let shards = ShardPools::new(&config.mysql_url, &pool, &config.mysql_shards, open)?;
        shards.migrate().await?;
        let mut max_packet: Option<u64> = None;
        for shard in 0..shards.len() {
            let mut conn = shards.get(shard).get_conn().await?;
            let packet: Option<u64> = conn.query_first("SELECT @@max_allowed_packet").await?;
            max_packet = match (max_packet, packet) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        // One statement's bodies stay well below the packet limit.
        let max_bytes = (max_packet.unwrap_or(4 << 20) / 2).clamp(64 << 10, 16 << 20) as usize;
        let statements = Arc::new(Statements::new(config.chunk_rows, max_bytes));

        let target = config.redis_target()?;
        let layout = Layout::new(config.redis_prefix.clone(), config.streams);
        let consumer = config.consumer_name();
        let mut link = RedisLink::new(target.clone(), settings.redis_timeout);
        let mut conn = link.get().await?;
        for shard in 0..layout.streams() {
            ShardKeys::new(&layout, shard, &config.group, &consumer)
                .ensure_group(&mut conn)
                .await?;
        }
        tracing::info!(
            streams = layout.streams(),
            mysql_shards = shards.len(),
            group = %config.group,
            consumer = %consumer,
            "storage worker started"
        );

        let stats = Arc::new(WorkerStats::new(layout.streams(), shards.len()));
        let health = Arc::new(Health::new(
            shards.len(),
            settings.retry_min,
            settings.retry_max,
        ));
        let (stop, stop_rx) = watch::channel(false);
        let (finish, finish_rx) = watch::channel(false);
        let deferred = Arc::new(Deferred::new(100_000));
        let known = Arc::new(Mutex::new(KnownDirect::new(config.known_direct)));
        let flusher = Flusher {
            deferred: deferred.clone(),
            pool: pool.clone(),
            statements: statements.clone(),
            redis: target.clone(),
            layout: layout.clone(),
            known: known.clone(),
            stats: stats.clone(),
            every: Duration::from_millis(config.cursor_flush_ms.max(1)),
            timeout: settings.mysql_timeout,
        };
        let flusher = tokio::spawn(flusher.run(finish_rx, settings.grace));
        let mut tasks = Vec::new();
        for shard in 0..layout.streams() {
            let task = ShardTask {
                keys: ShardKeys::new(&layout, shard, &config.group, &consumer),
                batch: Batch::new(shard, settings.rules),
                settings: settings.clone(),
                statements: statements.clone(),
                shards: shards.clone(),
                health: health.clone(),
                held: Held::new(config.max_deferred_rows),
                link: RedisLink::new(target.clone(), settings.redis_timeout),
                pace: Pace::new(&settings, stop_rx.clone(), stats.clone()),
                known: known.clone(),
                deferred: deferred.clone(),
                stats: stats.clone(),
                claim_cursor: EntryId::ZERO,
                next_claim: Instant::now(),
                next_trim: Instant::now(),
                reread: false,
                at_tail: false,
            };
            tasks.push(tokio::spawn(task.run()));
        }
        // Each message shard keeps the journal of the rows it stored.
        for shard in 0..shards.len() {
            tasks.push(tokio::spawn(trim_journal(
                shards.get(shard).clone(),
                Duration::from_secs(config.journal_retention_secs.max(60)),
                stop_rx.clone(),
            )));
        }
        if let Some(retention) = config.retention() {
            tasks.push(tokio::spawn(crate::retention::run(
                shards.clone(),
                retention,
                target.clone(),
                layout.clone(),
                Duration::from_secs(config.retention_sweep_secs),
                stats.clone(),
                stop_rx.clone(),
            )));
        }
        if config.progress_secs > 0 {
            tasks.push(tokio::spawn(progress(
                stats.clone(),
                Duration::from_secs(config.progress_secs),
                stop_rx,
            )));
        }
        let running = Arc::new(AtomicBool::new(true));
        let admin = admin.map(|listener| {
            listener.serve(Arc::new(WorkerAdmin {
                stats: stats.clone(),
                health,
                running: running.clone(),
            }))
        });
        Ok(WorkerHandle {
            stop,
            tasks,
            finish,
            flusher: Some(flusher),
            stats,
            pool,
            shards,
            running,
            admin,
        })
    }
}

impl WorkerHandle {
    /// The counters now.
    pub fn stats(&self) -> WorkerStatsSnapshot {
        self.stats.snapshot()
    }

    /// The address of the admin listener, if one was asked for.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// Stops reading, stores and acknowledges the batches in hand (within
    /// the shutdown grace period; what is not stored by then stays pending
    /// for the next start), and returns when every task has ended.
    ///
    /// The health check fails from the start of shutdown; the admin
    /// listener closes last, so the final counters can still be scraped
    /// meanwhile.
    pub async fn shutdown(mut self) {
        self.running.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "shard task failed");
            }
        }
        // The shard tasks are done: write what their last batches implied.
        let _ = self.finish.send(true);
        if let Some(flusher) = self.flusher.take() {
            if let Err(e) = flusher.await {
                tracing::error!(error = %e, "cursor flusher failed");
            }
        }
        self.shards.disconnect().await;
        if let Err(e) = self.pool.clone().disconnect().await {
            tracing::debug!(error = %e, "closing the MySQL pool");
        }
        if let Some(admin) = self.admin.take() {
            admin.shutdown().await;
        }
        tracing::info!("storage worker stopped");
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // Dropped without shutdown: the tasks stop on their own.
        let _ = self.stop.send(true);
        let _ = self.finish.send(true);
    }
}

/// The settings a shard task uses, as durations.
#[derive(Debug)]
struct Settings {
    rules: FlushRules,
    block: Duration,
    claim_idle: Duration,
    claim_interval: Duration,
    max_attempts: u64,
    dead_letter_max_len: u64,
    trim_interval: Option<Duration>,
    retry_min: Duration,
    retry_max: Duration,
    mysql_timeout: Duration,
    redis_timeout: Duration,
    grace: Duration,
    replica_acks: u32,
    replica_timeout: Duration,
}

impl From<&WorkerConfig> for Settings {
    fn from(c: &WorkerConfig) -> Settings {
        let ms = WorkerConfig::ms;
        Settings {
            rules: FlushRules {
                count: c.batch_count,
                bytes: c.batch_bytes,
                age: ms(c.batch_age_ms),
            },
            block: ms(c.block_ms),
            replica_acks: c.replica_acks(),
            replica_timeout: ms(c.redis_replica_timeout_ms),
            claim_idle: ms(c.claim_idle_ms),
            claim_interval: ms(c.claim_interval_ms),
            max_attempts: u64::from(c.max_attempts),
            dead_letter_max_len: c.dead_letter_max_len,
            trim_interval: (c.trim_interval_ms > 0).then(|| ms(c.trim_interval_ms)),
            retry_min: ms(c.retry_min_ms),
            retry_max: ms(c.retry_max_ms),
            mysql_timeout: ms(c.mysql_timeout_ms),
            redis_timeout: ms(c.block_ms) + Duration::from_secs(10),
            grace: ms(c.shutdown_grace_ms),
        }
    }
}

/// A shard task's Redis connection, opened on demand and dropped when it
/// fails.
struct RedisLink {
    target: RedisTarget,
    conn: Option<RedisConn>,
    timeouts: Timeouts,
}

impl RedisLink {
    fn new(target: RedisTarget, response_timeout: Duration) -> RedisLink {
        RedisLink {
            target,
            conn: None,
            timeouts: Timeouts {
                connect: Duration::from_secs(5),
                response: response_timeout,
            },
        }
    }

    async fn get(&mut self) -> Result<RedisConn, StreamError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let conn = self.target.connect_plain(self.timeouts).await?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    fn broken(&mut self) {
        self.conn = None;
    }
}

/// Retry pacing and the stop signal of one shard task.
struct Pace {
    stop: watch::Receiver<bool>,
    grace: Duration,
    deadline: Option<Instant>,
    min: Duration,
    max: Duration,
    next: Duration,
    stats: Arc<WorkerStats>,
}

impl Pace {
    fn new(s: &Settings, stop: watch::Receiver<bool>, stats: Arc<WorkerStats>) -> Pace {
        Pace {
            stop,
            grace: s.grace,
            deadline: None,
            min: s.retry_min,
            max: s.retry_max,
            next: s.retry_min,
            stats,
        }
    }

    /// Whether a stop was requested (starts the grace period).
    fn stopping(&mut self) -> bool {
        if self.deadline.is_none() && *self.stop.borrow() {
            self.deadline = Some(Instant::now() + self.grace);
        }
        self.deadline.is_some()
    }

    /// Resolves when a stop is requested.
    async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|&s| s).await;
    }

    fn success(&mut self) {
        self.next = self.min;
    }

    /// Sleeps before a retry. Returns false when the caller should give
    /// up instead: at a stop request (`finishing` false), or once the
    /// grace period is over (`finishing` true, for a batch in hand).
    async fn pause(&mut self, finishing: bool) -> bool {
        self.stats.retried();
        let jitter = rand::rng().random_range(0.5..1.0);
        let mut delay = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(self.max);
        if self.stopping() {
            let Some(left) = self
                .deadline
                .and_then(|d| d.checked_duration_since(Instant::now()))
                .filter(|_| finishing)
            else {
                return false;
            };
            delay = delay.min(left);
            tokio::time::sleep(delay).await;
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.stopped() => finishing,
        }
    }
}

/// Runs `op` on a Redis connection until it succeeds; `None` if the task
/// must give up first (see [`Pace::pause`]).
async fn with_redis<T, F, Fut>(
    link: &mut RedisLink,
    pace: &mut Pace,
    shard: u32,
    what: &str,
    mut op: F,
) -> Option<T>
where
    F: FnMut(RedisConn) -> Fut,
    Fut: Future<Output = Result<T, StreamError>>,
{
    loop {
        let result = match link.get().await {
            Ok(conn) => op(conn).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(value) => {
                pace.success();
                return Some(value);
            }
            Err(e) if e.is_no_group() => {
                // The stream or its group was deleted: nothing is left to
                // acknowledge or inspect.
                tracing::warn!(shard, error = %e, "redis {what}: consumer group gone");
                return None;
            }
            Err(e) => {
                link.broken();
                tracing::warn!(shard, error = %e, "redis {what} failed; retrying");
                if !pace.pause(true).await {
                    return None;
                }
            }
        }
    }
}

/// Direct conversations known to have both members rows; bounded by
/// starting over when full.
#[derive(Debug)]
pub(crate) struct KnownDirect {
    set: HashSet<u64>,
    cap: usize,
}

impl KnownDirect {
    pub(crate) fn new(cap: usize) -> KnownDirect {
        KnownDirect {
            set: HashSet::new(),
            cap,
        }
    }

    fn contains(&self, conversation: u64) -> bool {
        self.set.contains(&conversation)
    }

    pub(crate) fn extend(&mut self, conversations: &[u64]) {
        if self.cap == 0 {
            return;
        }
        if self.set.len() + conversations.len() > self.cap {
            self.set.clear();
        }
        self.set.extend(conversations.iter().take(self.cap));
    }
}

/// What became of a batch's rows (indices into the batch's rows).
#[derive(Default)]
struct Outcome {
    /// Rows committed.
    stored: Vec<usize>,
    /// Rows the database rejected, alone, with the error.
    rejected: Vec<(usize, String)>,
    /// Rows not written because their (conversation, seq) is stored with
    /// another message id.
    conflicts: Vec<(usize, SeqConflict)>,
    /// Rows not tried, or not stored, because their MySQL shard is down
    /// (or the task is stopping): their entries stay pending.
    deferred: Vec<usize>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.stored.extend(other.stored);
        self.rejected.extend(other.rejected);
        self.conflicts.extend(other.conflicts);
        self.deferred.extend(other.deferred);
    }
}

/// One shard's consumer.
struct ShardTask {
    keys: ShardKeys,
    batch: Batch,
    settings: Arc<Settings>,
    statements: Arc<Statements>,
    shards: ShardPools,
    /// Which MySQL shards are down, shared by every task of the worker.
    health: Arc<Health>,
    /// The rows this task deferred for shards that were down.
    held: Held,
    link: RedisLink,
    pace: Pace,
    /// Shared with the flusher, which marks what it has written.
    known: Arc<Mutex<KnownDirect>>,
    deferred: Arc<Deferred>,
    stats: Arc<WorkerStats>,
    claim_cursor: EntryId,
    next_claim: Instant,
    next_trim: Instant,
    /// Set when the batch was dropped unstored: its entries are read
    /// again from this consumer's pending list.
    reread: bool,
    /// Whether the last read of new entries got fewer than it asked for:
    /// the shard's consumers are at the end of its stream.
    at_tail: bool,
}

impl ShardTask {
    async fn run(mut self) {
        let shard = self.keys.shard;
        // This consumer's own pending entries come first.
        let mut history = Some(EntryId::ZERO);
        self.held.begin_pass();
        let mut full_logged = false;
        while !self.pace.stopping() {
            if std::mem::take(&mut self.reread) {
                // The batch was dropped unconfirmed: read every pending
                // entry again, deferred rows included.
                self.held.begin_pass();
                history = Some(EntryId::ZERO);
            }
            if self.batch.is_due(Instant::now()) {
                self.flush().await;
                continue;
            }
            if history.is_none() && self.batch.is_empty() && self.shard_back().await {
                // The rows deferred for it wait in this consumer's pending
                // entries: read them all again.
                tracing::info!(
                    shard,
                    held = self.held.len(),
                    "a MySQL shard is back; re-reading the entries left pending for it"
                );
                self.held.begin_pass();
                history = Some(EntryId::ZERO);
                continue;
            }
            if history.is_none() && self.held.is_full() {
                if !full_logged {
                    tracing::warn!(
                        shard,
                        held = self.held.len(),
                        "too many rows wait for MySQL shards that are down; reading no new entries until they are back"
                    );
                    full_logged = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.retry_min) => {}
                    _ = self.pace.stopped() => {}
                }
                continue;
            }
            full_logged = false;
            match self.step(&mut history).await {
                Ok(()) => self.pace.success(),
                Err(e) => {
                    self.link.broken();
                    if e.is_no_group() {
                        tracing::warn!(shard, "consumer group missing; creating it again");
                        if let Ok(mut conn) = self.link.get().await {
                            let _ = self.keys.ensure_group(&mut conn).await;
                        }
                    } else {
                        tracing::warn!(shard, error = %e, "redis failed; retrying");
                    }
                    if !self.pace.pause(false).await {
                        break;
                    }
                }
            }
        }
        if !self.batch.is_empty() {
            self.flush().await;
        }
        tracing::debug!(shard, "shard task stopped");
    }

    /// Whether a MySQL shard this task deferred rows for answers again
    /// (probing one whose backoff is over).
    async fn shard_back(&mut self) -> bool {
        if self.held.is_empty() {
            return false;
        }
        let now = Instant::now();
        let waiting: Vec<u32> = self.held.shards().collect();
        for shard in waiting {
            match self.health.state(shard, now) {
                ShardState::Up => return true,
                ShardState::Down(_) => {}
                ShardState::Due => {
                    let timeout = self.settings.mysql_timeout.min(Duration::from_secs(5));
                    let pool = self.shards.get(shard);
                    let probe = async {
                        let mut conn = pool.get_conn().await?;
                        let result = conn.query_drop("SELECT 1").await;
                        if let Err(e) = &result {
                            // A pooled connection the outage broke: not
                            // to be handed out again.
                            if e.is_fatal() {
                                let _ = conn.disconnect().await;
                            }
                        }
                        result
                    };
                    match tokio::time::timeout(timeout, probe).await {
                        Ok(Ok(())) => {
                            self.health.succeeded(shard);
                            return true;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(mysql_shard = shard, error = %e, "MySQL shard still down");
                            self.health.failed(shard, Instant::now());
                            self.stats.retried();
                        }
                        Err(_) => {
                            self.health.failed(shard, Instant::now());
                            self.stats.retried();
                        }
                    }
                }
            }
        }
        false
    }

    /// One read: own pending entries, claimed entries or new entries.
    async fn step(&mut self, history: &mut Option<EntryId>) -> Result<(), StreamError> {
        let now = Instant::now();
        let room = self.batch.room();
        let mut conn = self.link.get().await?;
        if let Some(after) = *history {
            let entries = self.keys.read_own_pending(&mut conn, after, room).await?;
            *history = entries.last().map(|e| e.id);
            if history.is_none() {
                // Every pending entry was read again.
                self.held.end_pass();
            } else {
                tracing::info!(
                    shard = self.keys.shard,
                    entries = entries.len(),
                    "taking up entries left pending (by an earlier run, or for a MySQL shard that was down)"
                );
            }
            self.add(entries, now);
            return Ok(());
        }
        if now >= self.next_trim {
            // Scheduled first: a failing pass must not keep the reads (and
            // their recovery from a lost consumer group) from running.
            self.next_trim = now
                + self
                    .settings
                    .trim_interval
                    .unwrap_or(Duration::from_secs(10));
            self.housekeeping(&mut conn).await?;
        }
        if now >= self.next_claim {
            self.next_claim = now + self.settings.claim_interval;
            let (next, entries) = self
                .keys
                .claim(&mut conn, self.settings.claim_idle, self.claim_cursor, room)
                .await?;
            self.claim_cursor = next;
            if next != EntryId::ZERO && !entries.is_empty() {
                // More of the pending list to go through: on the next step.
                self.next_claim = now;
            }
            if !entries.is_empty() {
                tracing::info!(
                    shard = self.keys.shard,
                    entries = entries.len(),
                    "claimed entries idle for too long"
                );
                self.stats.claimed(entries.len() as u64);
                self.add(entries, now);
                return Ok(());
            }
        }
        // At the end of the stream, a batch that has begun waits out its
        // age and then takes all that arrived meanwhile with one read:
        // reading as entries come in would cost a round trip per append
        // call at low load, for a batch stored at the same moment. Behind
        // it (a backlog), reads follow each other at once.
        let block = match self.batch.deadline() {
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(now);
                if self.at_tail && !wait.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.pace.stopped() => return Ok(()),
                    }
                }
                None
            }
            None => Some(self.settings.block),
        };
        tokio::select! {
            read = self.keys.read_new(&mut conn, room, block) => {
                let read = read?;
                self.stats.read();
                self.at_tail = read.len() < room;
                self.add(read, Instant::now());
            }
            _ = self.pace.stopped() => {
                // Whatever that read was given stays pending for this
                // consumer and is taken up at the next start.
                self.link.broken();
            }
        }
        Ok(())
    }

    fn add(&mut self, entries: Vec<crate::batch::Entry>, now: Instant) {
        for entry in entries {
            self.batch.push(entry, now);
        }
    }

    /// Records the shard's backlog and trims the stream.
    async fn housekeeping(&mut self, conn: &mut RedisConn) -> Result<(), StreamError> {
        let groups = self.keys.groups(conn).await?;
        if let Some(me) = groups.iter().find(|g| g.name == self.keys.group) {
            self.stats.backlog(self.keys.shard, me.pending, me.lag);
        }
        if self.settings.trim_interval.is_some() {
            if let Some(point) = trim_point(&groups) {
                let removed = self.keys.trim(conn, point).await?;
                if removed > 0 {
                    self.stats.trimmed(removed);
                    tracing::debug!(shard = self.keys.shard, removed, below = %point, "trimmed");
                }
            }
        }
        Ok(())
    }

    /// Stores the batch, acknowledges every entry that is done with,
    /// dead-letters what cannot be stored, and empties the batch.
    ///
    /// An entry (all messages of one append call) is done when each of its
    /// records is stored, or can never be (undecodable, or a seq conflict),
    /// or was rejected by the database on `max_attempts` deliveries; all
    /// but the first go to the dead-letter stream as the entry is
    /// acknowledged. Otherwise (a record rejected fewer times, or deferred
    /// for a MySQL shard that is down) it stays pending and comes back when
    /// read again (its stored rows are stored again, a no-op).
    async fn flush(&mut self) {
        let shard = self.keys.shard;
        if !self.replicas_confirm().await {
            return;
        }
        let outcome = self.store().await;
        let batch = &self.batch;
        let rows = batch.rows();
        let entries = batch.entries();

        let mut deferred_by_shard: BTreeMap<u32, u64> = BTreeMap::new();
        for &i in &outcome.deferred {
            let r = &rows[i];
            let mysql_shard = self.shards.shard_of(r.conversation_id);
            self.held.defer(mysql_shard, r.conversation_id, r.seq);
            *deferred_by_shard.entry(mysql_shard).or_default() += 1;
        }
        for (mysql_shard, n) in deferred_by_shard {
            self.stats.deferred(mysql_shard, n);
        }
        let in_mysql = outcome
            .stored
            .iter()
            .chain(outcome.conflicts.iter().map(|(i, _)| i));
        for &i in in_mysql.clone() {
            self.held.stored(rows[i].conversation_id, rows[i].seq);
        }

        // Watermarks: the greatest seq MySQL has (a conflict's seq has the
        // other message), below any rejected seq and any held one.
        let mut marks: Vec<(u64, u64)> = in_mysql
            .map(|&i| (rows[i].conversation_id, rows[i].seq))
            .collect();
        let mut holes: Vec<(u64, u64)> = outcome
            .rejected
            .iter()
            .map(|&(i, _)| (rows[i].conversation_id, rows[i].seq))
            .collect();
        marks.sort_unstable();
        if !self.held.is_empty() {
            let mut last = None;
            for &(conversation, _) in &marks {
                if last != Some(conversation) {
                    holes.extend(self.held.first(conversation).map(|seq| (conversation, seq)));
                    last = Some(conversation);
                }
            }
        }
        holes.sort_unstable();
        let marks = watermarks(&marks, &holes);
        self.deferred.add(shard, &[], &[], &[], &marks);

        // Per entry: rows stored, rows rejected, rows not tried.
        let mut stored_rows = vec![0usize; entries.len()];
        let mut all_rows = vec![0usize; entries.len()];
        for r in rows {
            all_rows[r.entry] += 1;
        }
        for &i in &outcome.stored {
            stored_rows[rows[i].entry] += 1;
        }
        let mut rejected: HashMap<usize, Vec<(usize, String)>> = HashMap::new();
        for (i, reason) in &outcome.rejected {
            rejected.entry(rows[*i].entry).or_default().push((
                rows[*i].record,
                format!("rejected by the database: {reason}"),
            ));
        }
        let mut permanent: HashMap<usize, Vec<(Option<usize>, String)>> = HashMap::new();
        for r in batch.rejects() {
            permanent
                .entry(r.entry)
                .or_default()
                .push((r.record, r.reason.to_string()));
        }
        for (i, conflict) in &outcome.conflicts {
            let r = &rows[*i];
            tracing::error!(
                shard,
                id = %entries[r.entry].id,
                conversation = conflict.conversation_id,
                seq = conflict.seq,
                message_id = conflict.message_id,
                stored_message_id = conflict.stored_message_id,
                "a seq was given to two messages: the stored one stays, this record goes to the dead-letter stream"
            );
            stored_rows[r.entry] += 1;
            permanent
                .entry(r.entry)
                .or_default()
                .push((Some(r.record), conflict.to_string()));
        }
        if !outcome.conflicts.is_empty() {
            self.stats.seq_conflicts(outcome.conflicts.len() as u64);
        }
        // Entries with rejected rows: done only after max_attempts.
        let keys = &self.keys;
        let mut attempts: HashMap<usize, u64> = HashMap::new();
        if !rejected.is_empty() {
            let which: Vec<usize> = rejected.keys().copied().collect();
            let ids: Vec<EntryId> = which.iter().map(|&e| entries[e].id).collect();
            let counts = with_redis(
                &mut self.link,
                &mut self.pace,
                shard,
                "XPENDING",
                |mut c| {
                    let ids = &ids;
                    async move { keys.delivery_counts(&mut c, ids).await }
                },
            )
            .await;
            if let Some(counts) = counts {
                attempts.extend(which.into_iter().zip(counts));
            }
        }
        let mut ack: Vec<EntryId> = batch.deleted().iter().map(|&i| entries[i].id).collect();
        let mut letters = Vec::new();
        let mut stored_bytes = 0;
        for (e, entry) in entries.iter().enumerate() {
            if batch.deleted().contains(&e) {
                continue;
            }
            let rejected_here = rejected.get(&e);
            let tried = stored_rows[e] + rejected_here.map_or(0, Vec::len);
            if tried < all_rows[e] {
                continue; // Not every row was tried (its MySQL shard is down, or stopping): stays pending.
            }
            let tries = attempts.get(&e).copied();
            let letters_before = letters.len();
            if let Some(list) = rejected_here {
                let Some(tries) = tries.filter(|&t| t >= self.settings.max_attempts) else {
                    for (_, reason) in list {
                        tracing::warn!(
                            shard,
                            id = %entry.id,
                            attempts = tries.unwrap_or(0),
                            max_attempts = self.settings.max_attempts,
                            reason = %reason,
                            "entry not stored; it stays pending and is retried once claimed"
                        );
                    }
                    continue;
                };
                for (record, reason) in list {
                    letters.push(DeadLetter {
                        id: entry.id,
                        record: entry.record(*record),
                        reason: reason.clone(),
                        attempts: tries,
                    });
                }
            }
            for (record, reason) in permanent.get(&e).into_iter().flatten() {
                letters.push(DeadLetter {
                    id: entry.id,
                    record: record.map_or(&[][..], |r| entry.record(r)),
                    reason: reason.clone(),
                    attempts: tries.unwrap_or(1),
                });
            }
            stored_bytes += entry.len();
            if letters.len() == letters_before {
                ack.push(entry.id);
            } // else dead_letter acknowledges it with its letters, atomically.
        }
        for letter in &letters {
            tracing::warn!(
                shard,
                id = %letter.id,
                attempts = letter.attempts,
                reason = %letter.reason,
                "moving a record to the dead-letter stream"
            );
        }

        let acked = with_redis(&mut self.link, &mut self.pace, shard, "XACK", |mut c| {
            let ack = &ack;
            async move { keys.ack(&mut c, ack).await }
        })
        .await
        .is_some();
        if acked && !outcome.stored.is_empty() {
            self.stats
                .committed(outcome.stored.len() as u64, stored_bytes as u64);
            tracing::debug!(shard, rows = outcome.stored.len(), "batch stored");
        }
        if !letters.is_empty() {
            let max_len = self.settings.dead_letter_max_len;
            let done = with_redis(
                &mut self.link,
                &mut self.pace,
                shard,
                "dead letter",
                |mut c| {
                    let letters = &letters;
                    async move { keys.dead_letter(&mut c, letters, max_len).await }
                },
            )
            .await;
            if done.is_some() {
                self.stats.dead_lettered(letters.len() as u64);
            }
        }
        self.batch.clear();
    }

    /// With `--redis-replica-acks`, whether the replicas have the batch's
    /// entries; if not (or Redis failed), the batch is dropped unstored
    /// and this consumer's pending entries are read again once Redis
    /// answers, from whichever master then serves the shard. So MySQL
    /// never holds a message a promoted replica lacks: the replica would
    /// give its seq to another message, and the two would collide.
    async fn replicas_confirm(&mut self) -> bool {
        let replicas = self.settings.replica_acks;
        if replicas == 0 || self.batch.is_empty() {
            return true;
        }
        let timeout = self.settings.replica_timeout;
        let confirmed = match self.link.get().await {
            Ok(mut conn) => self.keys.replicas_have(&mut conn, replicas, timeout).await,
            Err(e) => Err(e),
        };
        match confirmed {
            Ok(true) => return true,
            Ok(false) => tracing::warn!(
                shard = self.keys.shard,
                replicas,
                "replicas did not confirm the batch's entries in time; reading them again"
            ),
            Err(e) => {
                self.link.broken();
                tracing::warn!(shard = self.keys.shard, error = %e, "waiting for replicas failed; reading the batch again");
            }
        }
        self.stats.unconfirmed();
        self.batch.clear();
        self.reread = true;
        let _ = self.pace.pause(true).await;
        false
    }

    /// Commits the batch's rows, each MySQL shard's part on its own and
    /// all parts at once; see [`Part::store`].
    async fn store(&mut self) -> Outcome {
        let rows = self.batch.rows();
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_unstable_by_key(|&i| (rows[i].conversation_id, rows[i].seq));
        let parts = self.shards.split(order, |&i| rows[i].conversation_id);
        let part = Part {
            stream: self.keys.shard,
            batch: &self.batch,
            settings: &self.settings,
            statements: &self.statements,
            shards: &self.shards,
            health: &self.health,
            known: &self.known,
            deferred: &self.deferred,
            stats: &self.stats,
            stopping: self.pace.stopping(),
        };
        let work = parts
            .into_iter()
            .enumerate()
            .filter(|(_, indices)| !indices.is_empty())
            .map(|(mysql_shard, indices)| part.store(mysql_shard as u32, indices));
        let mut outcome = Outcome::default();
        for part in futures::future::join_all(work).await {
            outcome.merge(part);
        }
        outcome
    }
}

/// What storing one MySQL shard's part of a batch needs (borrowed from the
/// shard task, so that every part of a batch runs at once).
struct Part<'a> {
    stream: u32,
    batch: &'a Batch,
    settings: &'a Settings,
    statements: &'a Statements,
    shards: &'a ShardPools,
    health: &'a Health,
    known: &'a Mutex<KnownDirect>,
    deferred: &'a Deferred,
    stats: &'a WorkerStats,
    /// A stop was requested: a failing shard is not retried.
    stopping: bool,
}

impl Part<'_> {
    /// Commits the rows at `order` (indices into the batch's rows, sorted
    /// by key, all of MySQL shard `shard`): all at once if possible, else
    /// in halves until every row the database rejects is alone. A shard
    /// marked down is not tried; one that fails is retried once, then
    /// marked down, and what is left of its part is deferred.
    async fn store(&self, shard: u32, order: Vec<usize>) -> Outcome {
        let mut outcome = Outcome::default();
        if self.health.is_down(shard, Instant::now()) {
            outcome.deferred = order;
            return outcome;
        }
        let rows = self.batch.rows();
        let mut retried = self.stopping;
        let mut todo: Vec<std::ops::Range<usize>> = Vec::new();
        todo.push(0..order.len());
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            let indices = &order[range.clone()];
            match self.transaction(shard, indices).await {
                Ok(((direct, group, new_direct), conflicts)) => {
                    self.health.succeeded(shard);
                    self.deferred
                        .add(self.stream, &direct, &group, &new_direct, &[]);
                    for &i in indices {
                        let r = &rows[i];
                        let conflict = conflicts.iter().find(|c| {
                            (c.conversation_id, c.seq, c.message_id)
                                == (r.conversation_id, r.seq, r.message_id)
                        });
                        match conflict {
                            Some(c) => outcome.conflicts.push((i, *c)),
                            None => outcome.stored.push(i),
                        }
                    }
                }
                Err(StoreError::Rejected(e)) => {
                    if range.len() == 1 {
                        outcome.rejected.push((order[range.start], e.to_string()));
                    } else {
                        self.stats.split();
                        let mid = range.start + range.len() / 2;
                        tracing::debug!(
                            shard = self.stream,
                            mysql_shard = shard,
                            rows = range.len(),
                            error = %e,
                            "database rejected a row; splitting the transaction"
                        );
                        todo.push(mid..range.end);
                        todo.push(range.start..mid);
                    }
                }
                Err(e) if !retried => {
                    // Once in place: a deadlock or a dropped connection
                    // usually passes.
                    retried = true;
                    self.stats.retried();
                    tracing::warn!(
                        shard = self.stream,
                        mysql_shard = shard,
                        rows = range.len(),
                        error = %e,
                        "storing rows failed; retrying"
                    );
                    tokio::time::sleep(self.settings.retry_min).await;
                    todo.push(range);
                }
                Err(e) => {
                    self.stats.retried();
                    self.health.failed(shard, Instant::now());
                    outcome.deferred.extend_from_slice(indices);
                    for range in todo.drain(..) {
                        outcome.deferred.extend_from_slice(&order[range]);
                    }
                    tracing::warn!(
                        shard = self.stream,
                        mysql_shard = shard,
                        rows = outcome.deferred.len(),
                        error = %e,
                        "MySQL shard failing; its rows stay pending until it answers again"
                    );
                }
            }
        }
        outcome
    }

    /// Writes the message rows at `indices` on MySQL shard `shard` in one
    /// transaction; returns what they imply for members rows and read
    /// cursors (direct rows, group cursors, new direct conversations),
    /// written later, and the rows not written for a seq conflict.
    async fn transaction(
        &self,
        shard: u32,
        indices: &[usize],
    ) -> Result<(Implied, Vec<SeqConflict>), StoreError> {
        let timeout = self.settings.mysql_timeout;
        let batch = self.batch;
        let rows: Vec<MessageRow<'_>> = indices
            .iter()
            .map(|&i| {
                let r = &batch.rows()[i];
                MessageRow {
                    conversation_id: r.conversation_id,
                    seq: r.seq,
                    message_id: r.message_id,
                    sender_id: r.sender_id,
                    server_time_ms: r.server_time_ms,
                    dedup_key: r.dedup_key,
                    body: batch.body(r),
                }
            })
            .collect();
        let plan = {
            let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            Plan::build(rows, |c| known.contains(c))
        };
        let journal = JournalRow::of(self.stream, &plan);
        let pool = self.shards.get(shard);
        let statements = self.statements;
        let work = async {
            // A pooled connection per transaction: the pool size bounds the
            // transactions in flight, and connections keep their prepared
            // statements between uses.
            let mut conn = pool.get_conn().await?;
            let result = statements
                .execute_messages(&mut conn, &plan.messages, Some(&journal))
                .await;
            if let Err(e) = &result {
                if e.is_fatal() {
                    let _ = conn.disconnect().await;
                }
            }
            result
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(conflicts)) => Ok((
                (plan.direct_members, plan.group_reads, plan.new_direct),
                conflicts,
            )),
            Ok(Err(e)) => Err(StoreError::classify(e)),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }
}

/// Direct members rows, group cursors and new direct conversations implied
/// by committed messages.
type Implied = (Vec<MemberRow>, Vec<MemberRow>, Vec<u64>);

/// The stored watermark per conversation: the greatest stored seq, but
/// below the least seq of the same conversation that is not stored
/// (rejected, or held for a shard that is down: the recent cache must keep
/// it). Both inputs sorted.
fn watermarks(stored: &[(u64, u64)], holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(conversation, seq) in stored {
        let first = holes.partition_point(|h| h.0 < conversation);
        let limit = holes
            .get(first)
            .filter(|h| h.0 == conversation)
            .map_or(u64::MAX, |h| h.1 - 1);
        let seq = seq.min(limit);
        if seq == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 == conversation => last.1 = last.1.max(seq),
            _ => out.push((conversation, seq)),
        }
    }
    out
}

/// Deletes stream journal rows older than `retention`, every minute, in
/// slices that keep each statement short.
async fn trim_journal(pool: Pool, retention: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let before = im_proto::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        loop {
            let deleted = async {
                let mut conn = pool.get_conn().await?;
                conn.exec_drop(
                    "DELETE FROM stream_journal WHERE written_ms < ? LIMIT 10000",
                    (before,),
                )
                .await?;
                Ok::<u64, mysql_async::Error>(conn.affected_rows())
            }
            .await;
            match deleted {
                Ok(10_000) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "trimming the stream journal failed");
                    break;
                }
            }
        }
    }
}

/// Logs a one-line summary of progress every `every`.
async fn progress(stats: Arc<WorkerStats>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut last = stats.snapshot();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|&s| s) => return,
        }
        let now = stats.snapshot();
        let rows = now.rows - last.rows;
        tracing::info!(
            rows,
            rows_per_sec = rows / every.as_secs().max(1),
            batches = now.batches - last.batches,
            dead_letters = now.dead_letters,
            claimed = now.claimed,
            retries = now.retries,
            pending = now.pending(),
            lag = now.lag(),
            "progress"
        );
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_stop_below_rejected_seqs() {
        let stored = [(1, 1), (1, 2), (1, 5), (2, 3), (3, 4)];
        assert_eq!(watermarks(&stored, &[]), [(1, 5), (2, 3), (3, 4)]);
        assert_eq!(watermarks(&stored, &[(1, 3), (3, 1)]), [(1, 2), (2, 3)]);
    }

    #[test]
    fn known_direct_stays_bounded() {
        let mut known = KnownDirect::new(3);
        known.extend(&[1, 2]);
        assert!(known.contains(1) && known.contains(2));
        known.extend(&[3, 4]);
        assert!(known.set.len() <= 3);
        assert!(known.contains(4));
        let mut off = KnownDirect::new(0);
        off.extend(&[1]);
        assert!(!off.contains(1));
    }
}
