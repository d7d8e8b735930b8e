//! Message retention: messages older than a limit are removed for good,
//! either dropped or moved to an archive table that no client reads.
//!
//! A conversation always loses a prefix of its seqs, never a message in
//! the middle: each sweep step takes the oldest stored messages (by
//! `server_time_ms`, through the `messages_by_time` index), finds per
//! conversation the highest seq among them, and removes every message of
//! that conversation up to it. The conversation's *floor* (the highest seq
//! removed) is recorded in `message_expiry` in the same transaction, so
//! sync and history tell a client that asks below it what happened instead
//! of returning a gap, and seq counters seeded from MySQL never start at or
//! below it (a conversation whose every message expired keeps its seqs).
//!
//! Why an index and not time partitions: dropping a month partition costs
//! nothing, but MariaDB wants the partitioning column in every unique key,
//! so `(conversation_id, seq)` (which makes a redelivered stream entry
//! land on its own row) and the `(conversation_id, dedup_key)` index of
//! late resends would no longer be enforced per conversation. Deleting in
//! primary-key order from a time index keeps both, costs one more
//! secondary-index entry per row (about 30 bytes), and the sweep (one
//! short transaction per [`SWEEP_ROWS`] rows) keeps up with a billion
//! messages a day on a handful of shards; see docs/scaling.md. The index
//! ([`TIME_INDEX`]) is created by the first sweep of a database, online,
//! so that deployments that keep every message do not pay its cost on
//! every insert (about a tenth of the worker's rows/s here).
//!
//! The storage worker runs [`sweep`] on every MySQL shard on a schedule
//! (`--message-retention-secs`); one worker at a time per database (a
//! named lock), so several workers share the work without repeating it.
//! After each step the recent caches in Redis lose the same records
//! ([`trim_recent`]).

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use mysql_async::prelude::*;
use mysql_async::{Conn, Params, Value};
use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::script::{LuaScript, query_idempotent};
use crate::shards::ShardPools;

/// What happens to a message past the retention limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RetentionMode {
    /// Deleted.
    #[default]
    Drop,
    /// Moved to the `messages_archive` table (same columns), which no
    /// client request reads; operators export and purge it.
    Archive,
}

/// A retention policy: messages stored more than `max_age` ago go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// How long a message is kept.
    pub max_age: Duration,
    /// Dropped or archived.
    pub mode: RetentionMode,
}

impl Retention {
    /// The policy for `--message-retention-secs` (0 = keep forever: none).
    pub fn from_secs(secs: u64, mode: RetentionMode) -> Option<Retention> {
        (secs > 0).then(|| Retention {
            max_age: Duration::from_secs(secs),
            mode,
        })
    }

    /// Messages with a `server_time_ms` below this go, at `now_ms`.
    pub fn cutoff_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Messages one sweep step removes at most (one transaction).
pub const SWEEP_ROWS: usize = 5000;

/// Conversations per DELETE statement.
const CONVERSATIONS_PER_STATEMENT: usize = 256;

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Message rows removed (archived rows included).
    pub rows: u64,
    /// The new floor of each conversation that lost messages.
    pub floors: BTreeMap<u64, u64>,
}

impl Swept {
    /// Adds another sweep's outcome (the higher floor of a conversation
    /// wins).
    pub fn merge(&mut self, other: Swept) {
        self.rows += other.rows;
        for (conv, floor) in other.floors {
            let f = self.floors.entry(conv).or_insert(floor);
            *f = (*f).max(floor);
        }
    }
}

/// `(conversation_id = ? AND seq <= ?) OR ...` for `n` conversations.
fn prefixes(n: usize) -> String {
    vec!["(conversation_id = ? AND seq <= ?)"; n].join(" OR ")
}

fn prefix_params(floors: &[(u64, u64)]) -> Vec<Value> {
    floors
        .iter()
        .flat_map(|&(c, s)| [Value::from(c), Value::from(s)])
        .collect()
}

/// One step on one database: removes the oldest (at most about
/// [`SWEEP_ROWS`]) messages stored before `cutoff_ms`, each
/// conversation's as a prefix of its seqs, and raises their floors, in one
/// transaction.
pub async fn sweep_step(
    conn: &mut Conn,
    cutoff_ms: i64,
    mode: RetentionMode,
    now_ms: i64,
) -> Result<Swept, mysql_async::Error> {
    let found: Vec<(u64, u64)> = conn
        .exec(
            "SELECT conversation_id, MAX(seq) FROM \
               (SELECT conversation_id, seq FROM messages WHERE server_time_ms < ? \
                ORDER BY server_time_ms LIMIT ?) oldest \
             GROUP BY conversation_id ORDER BY conversation_id",
            (cutoff_ms, SWEEP_ROWS as u64),
        )
        .await?;
    if found.is_empty() {
        return Ok(Swept::default());
    }
    let mut tx = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await?;
    let mut rows = 0;
    for part in found.chunks(CONVERSATIONS_PER_STATEMENT) {
        let matching = prefixes(part.len());
        if mode == RetentionMode::Archive {
            tx.exec_drop(
                format!(
                    "INSERT IGNORE INTO messages_archive SELECT * FROM messages WHERE {matching}"
                ),
                Params::Positional(prefix_params(part)),
            )
            .await?;
        }
        tx.exec_drop(
            format!("DELETE FROM messages WHERE {matching}"),
            Params::Positional(prefix_params(part)),
        )
        .await?;
        rows += tx.affected_rows();
        let values = vec!["(?, ?, ?)"; part.len()].join(", ");
        let params: Vec<Value> = part
            .iter()
            .flat_map(|&(c, s)| [Value::from(c), Value::from(s), Value::from(now_ms)])
            .collect();
        tx.exec_drop(
            format!(
                "INSERT INTO message_expiry (conversation_id, expired_seq, expired_ms) \
                 VALUES {values} ON DUPLICATE KEY UPDATE \
                 expired_seq = GREATEST(expired_seq, VALUES(expired_seq)), \
                 expired_ms = VALUES(expired_ms)"
            ),
            Params::Positional(params),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Swept {
        rows,
        floors: found.into_iter().collect(),
    })
}

/// The index on `messages.server_time_ms` the sweep reads the oldest rows
/// through; created by [`ensure_time_index`].
pub const TIME_INDEX: &str = "messages_by_time";

/// Creates [`TIME_INDEX`] unless the database has it (online: writes go
/// on meanwhile; on a large table this takes a while, once).
pub async fn ensure_time_index(conn: &mut Conn) -> Result<(), mysql_async::Error> {
    let present: Option<u8> = conn
        .exec_first(
            "SELECT 1 FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'messages' AND INDEX_NAME = ? \
             LIMIT 1",
            (TIME_INDEX,),
        )
        .await?;
    if present.is_none() {
        tracing::info!("adding the index retention sweeps read (messages.server_time_ms)");
        conn.query_drop(format!(
            "ALTER TABLE messages ADD KEY IF NOT EXISTS {TIME_INDEX} (server_time_ms), \
             ALGORITHM=INPLACE, LOCK=NONE"
        ))
        .await?;
    }
    Ok(())
}

/// Name of the lock that keeps two sweepers off one database.
const LOCK: &str = "CONCAT('im_retention:', DATABASE())";

/// Steps one [`sweep`] takes per database at most, so the floors it
/// hands back (to trim from the caches) stay bounded: the next sweep goes
/// on where it stopped.
pub const STEPS_PER_SWEEP: usize = 100;

/// Sweeps one database for at most [`STEPS_PER_SWEEP`] steps (creating
/// [`TIME_INDEX`] first if it is missing), or returns at once (nothing
/// swept) while another process sweeps it. The flag says
/// whether messages before the cutoff may remain.
pub async fn sweep_database(
    pool: &mysql_async::Pool,
    cutoff_ms: i64,
    mode: RetentionMode,
) -> Result<(Swept, bool), mysql_async::Error> {
    let mut conn = pool.get_conn().await?;
    let locked: Option<i64> = conn
        .query_first(format!("SELECT GET_LOCK({LOCK}, 0)"))
        .await?;
    if locked != Some(1) {
        return Ok((Swept::default(), false));
    }
    let mut total = Swept::default();
    let mut result = ensure_time_index(&mut conn).await.map(|()| false);
    for _ in 0..STEPS_PER_SWEEP {
        if result.is_err() {
            break;
        }
        match sweep_step(&mut conn, cutoff_ms, mode, im_proto::now_ms()).await {
            Ok(step) if step.floors.is_empty() => {
                result = Ok(false);
                break;
            }
            Ok(step) => {
                total.merge(step);
                result = Ok(true);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Err(e) = conn.query_drop(format!("DO RELEASE_LOCK({LOCK})")).await {
        tracing::debug!(error = %e, "releasing the retention lock");
    }
    result.map(|more| (total, more))
}

/// Sweeps every message shard of what was stored before `cutoff_ms` (one
/// shard after the other, each for at most [`STEPS_PER_SWEEP`] steps). The
/// flag says whether messages before the cutoff may remain (sweep again at
/// once). The floors raised are for the caller to trim from the recent
/// caches ([`trim_recent`]).
pub async fn sweep(
    shards: &ShardPools,
    cutoff_ms: i64,
    mode: RetentionMode,
) -> Result<(Swept, bool), mysql_async::Error> {
    let mut total = Swept::default();
    let mut more = false;
    for shard in 0..shards.len() {
        let (swept, left) = sweep_database(shards.get(shard), cutoff_ms, mode).await?;
        total.merge(swept);
        more |= left;
    }
    Ok((total, more))
}

/// Drops the records at or below `ARGV[1]` from the head of a recent-cache
/// list (`KEYS[1]`), which is contiguous in seq.
const TRIM_RECENT_SCRIPT: &str = r#"
local first = tonumber(string.match(redis.call("LINDEX", KEYS[1], 0) or "", "^(%d+):"))
if not first then return 0 end
local floor = tonumber(ARGV[1])
if floor < first then return 0 end
redis.call("LTRIM", KEYS[1], floor - first + 1, -1)
return floor - first + 1
"#;

static TRIM_RECENT: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(TRIM_RECENT_SCRIPT));

/// Floors trimmed per pipeline.
const TRIM_PIPELINE: usize = 1000;

/// Removes what the floors removed from MySQL from the recent caches, a
/// pipeline per [`TRIM_PIPELINE`] conversations: single-key calls that may
/// run twice with the same outcome.
pub async fn trim_recent<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    layout: &Layout,
    floors: impl IntoIterator<Item = (u64, u64)>,
) -> redis::RedisResult<()> {
    let calls: Vec<_> = floors
        .into_iter()
        .map(|(conv, floor)| {
            let mut call = TRIM_RECENT.call();
            call.key(layout.recent_key(layout.shard_of(conv), conv))
                .arg(floor);
            call
        })
        .collect();
    for part in calls.chunks(TRIM_PIPELINE) {
        query_idempotent::<_, redis::Value>(conn, part).await?;
    }
    Ok(())
}

/// Floors waiting to be trimmed from the recent caches at most (while
/// Redis is unreachable); beyond, some records stay cached until their
/// conversation's cache expires or an append trims it.
const UNTRIMMED_MAX: usize = 1_000_000;

/// Runs [`sweep`] every `every` (at once again while a sweep leaves work)
/// until `stop` changes, trimming the recent caches after each (again at
/// the next, for what Redis could not take): the worker's retention task.
pub async fn run(
    shards: ShardPools,
    retention: Retention,
    target: crate::redis_target::RedisTarget,
    layout: Layout,
    every: Duration,
    stats: std::sync::Arc<crate::stats::WorkerStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    let mut untrimmed = Swept::default();
    let mut more = false;
    loop {
        if !more {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
        } else if *stop.borrow() {
            return;
        }
        more = false;
        let cutoff = retention.cutoff_ms(im_proto::now_ms());
        match sweep(&shards, cutoff, retention.mode).await {
            Ok((swept, left)) => {
                more = left;
                stats.expired(swept.rows);
                if swept.rows > 0 {
                    tracing::info!(
                        rows = swept.rows,
                        conversations = swept.floors.len(),
                        mode = ?retention.mode,
                        "removed messages past the retention limit"
                    );
                }
                untrimmed.merge(swept);
            }
            Err(e) => {
                stats.retention_failed();
                tracing::warn!(error = %e, "the retention sweep failed");
            }
        }
        if untrimmed.floors.is_empty() {
            continue;
        }
        let trimmed = async {
            let mut conn = target
                .connect(crate::redis_target::Timeouts::both(Duration::from_secs(5)))
                .await?;
            trim_recent(
                &mut conn,
                &layout,
                untrimmed.floors.iter().map(|(&c, &f)| (c, f)),
            )
            .await
        }
        .await;
        match trimmed {
            Ok(()) => untrimmed = Swept::default(),
            Err(e) => {
                tracing::warn!(error = %e, pending = untrimmed.floors.len(), "trimming expired records from the recent caches failed; retrying after the next sweep");
                while untrimmed.floors.len() > UNTRIMMED_MAX {
                    untrimmed.floors.pop_first();
                }
                // Redis is down: do not spin on MySQL meanwhile.
                more = false;
            }
        }
    }
}
