//! What stored messages change besides the messages table, coalesced over
//! many batches and written together: members rows of new direct
//! conversations, senders' read cursors (sending marks everything before
//! as read), and then each shard's stored watermark.
//!
//! Batches commit only their message rows; the changes they imply wait
//! here, merged (the highest seq per row wins), and a flusher writes them
//! in one transaction every `cursor_flush` (sooner when many are waiting).
//! Only after that commit are the watermarks raised, so the recent cache in
//! Redis keeps a message until both the message and its sender's cursor
//! are in MySQL: readers never see a state in which one is missing.
//!
//! A worker killed between a batch's commit and the next flush loses only
//! those cursor moves; watermarks not raised just keep records a little
//! longer in the cache.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::redis_target::{RedisConn, RedisTarget, Timeouts};
use mysql_async::Pool;
use tokio::sync::{Notify, watch};

use crate::layout::Layout;
use crate::sql::{MemberRow, Statements, StoreError};
use crate::stats::WorkerStats;
use crate::stream::raise_stored;

/// Changes waiting for the next flush.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// (conversation, user) → read seq, for direct conversations (the row
    /// is created if missing).
    pub direct: BTreeMap<(u64, u64), u64>,
    /// (conversation, user) → read seq, for groups (existing rows only).
    pub group: BTreeMap<(u64, u64), u64>,
    /// Direct conversations whose members rows this flush creates.
    pub new_direct: Vec<u64>,
    /// (shard, conversation) → highest stored seq.
    pub marks: BTreeMap<(u32, u64), u64>,
}

fn raise(map: &mut BTreeMap<(u64, u64), u64>, key: (u64, u64), seq: u64) {
    let v = map.entry(key).or_insert(0);
    *v = (*v).max(seq);
}

impl Pending {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.group.is_empty() && self.marks.is_empty()
    }

    /// Entries held (a measure of memory).
    pub fn len(&self) -> usize {
        self.direct.len() + self.group.len() + self.marks.len()
    }

    /// Merges another set in, keeping the highest seqs.
    pub fn merge(&mut self, other: Pending) {
        for (k, s) in other.direct {
            raise(&mut self.direct, k, s);
        }
        for (k, s) in other.group {
            raise(&mut self.group, k, s);
        }
        self.new_direct.extend(other.new_direct);
        for (k, s) in other.marks {
            let v = self.marks.entry(k).or_insert(0);
            *v = (*v).max(s);
        }
    }
}

/// The waiting changes of one worker, shared by its shard tasks.
#[derive(Debug)]
pub struct Deferred {
    pending: Mutex<Pending>,
    wake: Notify,
    soon: usize,
}

impl Deferred {
    /// A flush is asked for early once `soon` entries wait.
    pub fn new(soon: usize) -> Deferred {
        Deferred {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            soon: soon.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Only plain map updates happen under this lock (never an await).
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds what one committed transaction of `shard` implies.
    pub fn add(
        &self,
        shard: u32,
        direct: &[MemberRow],
        group: &[MemberRow],
        new_direct: &[u64],
        marks: &[(u64, u64)],
    ) {
        let len = {
            let mut p = self.lock();
            for &(c, u, s) in direct {
                raise(&mut p.direct, (c, u), s);
            }
            for &(c, u, s) in group {
                raise(&mut p.group, (c, u), s);
            }
            p.new_direct.extend_from_slice(new_direct);
            for &(c, s) in marks {
                let v = p.marks.entry((shard, c)).or_insert(0);
                *v = (*v).max(s);
            }
            p.len()
        };
        if len >= self.soon {
            self.wake.notify_one();
        }
    }

    /// Takes everything waiting.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.lock())
    }

    /// Puts back changes a flush could not write.
    pub fn restore(&self, pending: Pending) {
        self.lock().merge(pending);
    }
}

/// What the flusher needs.
pub(crate) struct Flusher {
    /// The waiting changes.
    pub(crate) deferred: Arc<Deferred>,
    /// MySQL.
    pub(crate) pool: Pool,
    /// Prepared statement texts.
    pub(crate) statements: Arc<Statements>,
    /// Redis, for the watermarks.
    pub(crate) redis: RedisTarget,
    /// Key names.
    pub(crate) layout: Layout,
    /// Marks direct conversations whose rows exist.
    pub(crate) known: Arc<Mutex<crate::worker::KnownDirect>>,
    /// Counters.
    pub(crate) stats: Arc<WorkerStats>,
    /// Time between flushes.
    pub(crate) every: Duration,
    /// How long one flush may take before it is retried.
    pub(crate) timeout: Duration,
}

impl Flusher {
    /// Flushes every `every` (or when asked) until `finish` turns true,
    /// then flushes what is left, trying for at most `grace`.
    pub(crate) async fn run(self, mut finish: watch::Receiver<bool>, grace: Duration) {
        let mut conn: Option<RedisConn> = None;
        let mut delay = Duration::from_millis(100);
        loop {
            let finishing = *finish.borrow();
            if !finishing {
                tokio::select! {
                    _ = tokio::time::sleep(self.every) => {}
                    _ = self.deferred.wake.notified() => {}
                    _ = finish.changed() => {}
                }
            }
            let finishing = *finish.borrow();
            let pending = self.deferred.take();
            if pending.is_empty() {
                if finishing {
                    return;
                }
                continue;
            }
            match self.flush(&pending, &mut conn).await {
                Ok(()) => delay = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, entries = pending.len(), "writing read cursors failed; retrying");
                    self.stats.retried();
                    self.deferred.restore(pending);
                    if finishing {
                        // One last try within the grace period.
                        let left = self.deferred.take();
                        let last = tokio::time::timeout(grace, self.flush(&left, &mut conn)).await;
                        if !matches!(last, Ok(Ok(()))) {
                            tracing::warn!("read cursors left unwritten at shutdown");
                        }
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn flush(&self, p: &Pending, conn: &mut Option<RedisConn>) -> Result<(), FlushError> {
        if !p.direct.is_empty() || !p.group.is_empty() {
            let direct: Vec<MemberRow> = p.direct.iter().map(|(&(c, u), &s)| (c, u, s)).collect();
            let group: Vec<MemberRow> = p.group.iter().map(|(&(c, u), &s)| (c, u, s)).collect();
            let write = async {
                let mut mysql = self.pool.get_conn().await?;
                self.statements
                    .execute_members(&mut mysql, &direct, &group)
                    .await
            };
            match tokio::time::timeout(self.timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => match StoreError::classify(e) {
                    StoreError::Rejected(e) => {
                        // Cursor rows carry no user data that could be bad;
                        // losing them only affects unread counts.
                        tracing::error!(error = %e, "read cursors rejected by the database; dropped");
                    }
                    e => return Err(FlushError::Mysql(e.to_string())),
                },
                Err(_) => return Err(FlushError::Mysql("timed out".into())),
            }
            self.known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(&p.new_direct);
        }
        if !p.marks.is_empty() {
            // Bounded like the MySQL write: a stalled Redis must not hold
            // up shutdown beyond its grace period.
            let write = self.write_marks(p, conn);
            match tokio::time::timeout(self.timeout, write).await {
                Ok(result) => result?,
                Err(_) => {
                    *conn = None;
                    return Err(FlushError::RedisTimeout);
                }
            }
        }
        Ok(())
    }

    async fn write_marks(
        &self,
        p: &Pending,
        conn: &mut Option<RedisConn>,
    ) -> Result<(), FlushError> {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(
                self.redis
                    .connect_plain(Timeouts::both(self.timeout))
                    .await?,
            ),
        };
        let mut pipe = redis::pipe();
        let mut by_shard: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        for (&(shard, conv), &seq) in &p.marks {
            by_shard.entry(shard).or_default().push((conv, seq));
        }
        for (shard, marks) in by_shard {
            raise_stored(&mut pipe, &self.layout.stored_key(shard), &marks);
        }
        if let Err(e) = pipe.query_async::<()>(c).await {
            *conn = None;
            return Err(e.into());
        }
        Ok(())
    }
}

/// Why a flush failed (it is retried).
#[derive(Debug, thiserror::Error)]
enum FlushError {
    #[error("mysql: {0}")]
    Mysql(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: timed out")]
    RedisTimeout,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_merge_to_the_highest_seq() {
        let d = Deferred::new(100);
        d.add(1, &[(10, 2, 5)], &[(20, 3, 7)], &[10], &[(10, 5), (20, 7)]);
        d.add(1, &[(10, 2, 4), (10, 3, 0)], &[(20, 3, 9)], &[], &[(10, 4)]);
        let p = d.take();
        assert_eq!(p.direct, BTreeMap::from([((10, 2), 5), ((10, 3), 0)]));
        assert_eq!(p.group, BTreeMap::from([((20, 3), 9)]));
        assert_eq!(p.marks, BTreeMap::from([((1, 10), 5), ((1, 20), 7)]));
        assert!(d.take().is_empty());
        d.add(2, &[], &[], &[], &[(30, 1)]);
        d.restore(p);
        let p = d.take();
        assert_eq!(p.marks.len(), 3);
        assert_eq!(p.new_direct, [10]);
    }
}
