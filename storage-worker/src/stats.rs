//! Counters of a running worker (plain atomics, updated by the shard
//! tasks) and their snapshot, for logs and a metrics endpoint.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::admin::Exposition;

/// Live counters of one worker process.
#[derive(Debug, Default)]
pub struct WorkerStats {
    batches: AtomicU64,
    rows: AtomicU64,
    bytes: AtomicU64,
    dead_letters: AtomicU64,
    claimed: AtomicU64,
    retries: AtomicU64,
    splits: AtomicU64,
    trimmed: AtomicU64,
    unconfirmed: AtomicU64,
    seq_conflicts: AtomicU64,
    expired: AtomicU64,
    retention_failures: AtomicU64,
    reads: AtomicU64,
    shards: Vec<ShardStats>,
    /// Rows deferred, per MySQL shard.
    deferred: Vec<AtomicU64>,
}

#[derive(Debug)]
struct ShardStats {
    pending: AtomicU64,
    /// -1 while unknown.
    lag: AtomicI64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStatsSnapshot {
    /// Batches committed.
    pub batches: u64,
    /// Message rows committed (a redelivered row counts again).
    pub rows: u64,
    /// Record bytes committed.
    pub bytes: u64,
    /// Entries moved to a dead-letter stream.
    pub dead_letters: u64,
    /// Entries claimed from idle consumers (including this one).
    pub claimed: u64,
    /// Retries after a Redis or MySQL failure.
    pub retries: u64,
    /// Transactions split because the database rejected a row.
    pub splits: u64,
    /// Stream entries removed by trimming.
    pub trimmed: u64,
    /// Batches not committed because fewer replicas than
    /// `--redis-replica-acks` confirmed their entries in time (read again).
    pub unconfirmed: u64,
    /// Records not stored because their (conversation, seq) was stored
    /// with another message id (each dead-lettered).
    pub seq_conflicts: u64,
    /// Messages removed (or archived) past the retention limit.
    pub expired: u64,
    /// Retention sweeps that failed (retried at the next).
    pub retention_failures: u64,
    /// Reads of new stream entries (XREADGROUP `>`), answered or empty.
    pub reads: u64,
    /// Per stream shard, as of the last trim pass.
    pub shards: Vec<ShardBacklog>,
    /// Per MySQL shard: rows left pending because the shard was down
    /// (stored once it is back; a row deferred twice counts twice).
    pub deferred: Vec<u64>,
}

/// The backlog of one shard for this worker's group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardBacklog {
    /// Shard number.
    pub shard: u32,
    /// Entries delivered to the group and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to the group (`None` if Redis cannot
    /// tell).
    pub lag: Option<u64>,
}

impl WorkerStats {
    /// Counters for `shards` stream shards and `mysql_shards` MySQL
    /// shards.
    pub fn new(shards: u32, mysql_shards: u32) -> WorkerStats {
        WorkerStats {
            shards: (0..shards)
                .map(|_| ShardStats {
                    pending: AtomicU64::new(0),
                    lag: AtomicI64::new(-1),
                })
                .collect(),
            deferred: (0..mysql_shards).map(|_| AtomicU64::new(0)).collect(),
            ..WorkerStats::default()
        }
    }

    /// A batch of `rows` rows and `bytes` bytes was committed.
    pub fn committed(&self, rows: u64, bytes: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.rows.fetch_add(rows, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// Entries were dead-lettered.
    pub fn dead_lettered(&self, n: u64) {
        self.dead_letters.fetch_add(n, Relaxed);
    }

    /// Entries were claimed.
    pub fn claimed(&self, n: u64) {
        self.claimed.fetch_add(n, Relaxed);
    }

    /// A failed operation will be retried.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Relaxed);
    }

    /// A transaction was split.
    pub fn split(&self) {
        self.splits.fetch_add(1, Relaxed);
    }

    /// Entries were trimmed.
    pub fn trimmed(&self, n: u64) {
        self.trimmed.fetch_add(n, Relaxed);
    }

    /// New stream entries were read (or a read of them came back empty).
    pub fn read(&self) {
        self.reads.fetch_add(1, Relaxed);
    }

    /// A batch's entries were not confirmed by enough replicas.
    pub fn unconfirmed(&self) {
        self.unconfirmed.fetch_add(1, Relaxed);
    }

    /// Records conflicted with stored rows.
    pub fn seq_conflicts(&self, n: u64) {
        self.seq_conflicts.fetch_add(n, Relaxed);
    }

    /// A retention sweep removed `n` messages.
    pub fn expired(&self, n: u64) {
        self.expired.fetch_add(n, Relaxed);
    }

    /// A retention sweep failed.
    pub fn retention_failed(&self) {
        self.retention_failures.fetch_add(1, Relaxed);
    }

    /// Rows of MySQL shard `shard` were deferred.
    pub fn deferred(&self, shard: u32, n: u64) {
        if let Some(d) = self.deferred.get(shard as usize) {
            d.fetch_add(n, Relaxed);
        }
    }

    /// The backlog of a shard as last seen.
    pub fn backlog(&self, shard: u32, pending: u64, lag: Option<u64>) {
        if let Some(s) = self.shards.get(shard as usize) {
            s.pending.store(pending, Relaxed);
            s.lag.store(
                lag.and_then(|l| i64::try_from(l).ok()).unwrap_or(-1),
                Relaxed,
            );
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> WorkerStatsSnapshot {
        WorkerStatsSnapshot {
            batches: self.batches.load(Relaxed),
            rows: self.rows.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            dead_letters: self.dead_letters.load(Relaxed),
            claimed: self.claimed.load(Relaxed),
            retries: self.retries.load(Relaxed),
            splits: self.splits.load(Relaxed),
            unconfirmed: self.unconfirmed.load(Relaxed),
            trimmed: self.trimmed.load(Relaxed),
            seq_conflicts: self.seq_conflicts.load(Relaxed),
            expired: self.expired.load(Relaxed),
            retention_failures: self.retention_failures.load(Relaxed),
            reads: self.reads.load(Relaxed),
            deferred: self.deferred.iter().map(|d| d.load(Relaxed)).collect(),
            shards: self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| ShardBacklog {
                    shard: i as u32,
                    pending: s.pending.load(Relaxed),
                    lag: u64::try_from(s.lag.load(Relaxed)).ok(),
                })
                .collect(),
        }
    }
}

impl WorkerStatsSnapshot {
    /// Pending entries over all shards.
    pub fn pending(&self) -> u64 {
        self.shards.iter().map(|s| s.pending).sum()
    }

    /// Undelivered entries over all shards (unknown counts as 0).
    pub fn lag(&self) -> u64 {
        self.shards.iter().filter_map(|s| s.lag).sum()
    }

    /// Adds the worker's metrics (`im_storage_*`) to a scrape. A shard
    /// whose lag Redis cannot tell has no lag sample.
    pub fn export(&self, out: &mut Exposition) {
        out.counter(
            "im_storage_batches_total",
            "Batches committed to MySQL.",
            self.batches,
        );
        out.counter(
            "im_storage_rows_total",
            "Message rows committed to MySQL (a redelivered row counts again); its rate is rows per second.",
            self.rows,
        );
        out.counter(
            "im_storage_bytes_total",
            "Record bytes committed to MySQL.",
            self.bytes,
        );
        out.counter(
            "im_storage_dead_letters_total",
            "Stream entries moved to a dead-letter stream.",
            self.dead_letters,
        );
        out.counter(
            "im_storage_claimed_total",
            "Stream entries claimed from idle consumers.",
            self.claimed,
        );
        out.counter(
            "im_storage_retries_total",
            "Retries after a Redis or MySQL failure.",
            self.retries,
        );
        out.counter(
            "im_storage_splits_total",
            "Transactions split because the database rejected a row.",
            self.splits,
        );
        out.counter(
            "im_storage_trimmed_total",
            "Stream entries removed by trimming.",
            self.trimmed,
        );
        out.counter(
            "im_storage_replica_unconfirmed_total",
            "Batches not committed because too few Redis replicas confirmed their entries in time (they are read again).",
            self.unconfirmed,
        );
        out.counter(
            "im_storage_seq_conflicts_total",
            "Records not stored because their conversation and seq were already stored with another message id; each is dead-lettered.",
            self.seq_conflicts,
        );
        out.counter(
            "im_storage_retention_removed_total",
            "Messages removed (dropped or archived) because they were older than --message-retention-secs.",
            self.expired,
        );
        out.counter(
            "im_storage_retention_failures_total",
            "Retention sweeps that failed; the next sweep goes on where it stopped.",
            self.retention_failures,
        );
        out.counter(
            "im_storage_stream_reads_total",
            "Reads of new stream entries (XREADGROUP), including empty ones; per batch at the end of a stream, one as it begins and one at its age.",
            self.reads,
        );
        out.counter_by(
            "im_storage_rows_deferred_total",
            "Message rows left pending because their MySQL shard was down, per MySQL shard; they are stored once it is back.",
            "mysql_shard",
            self.deferred.iter().enumerate().map(|(i, &n)| (i, n)),
        );
        out.gauge_by(
            "im_storage_stream_pending",
            "Entries delivered to the consumer group and not yet acknowledged, per stream shard, as of the last trim pass.",
            "shard",
            self.shards.iter().map(|s| (s.shard, s.pending)),
        );
        out.gauge_by(
            "im_storage_stream_lag",
            "Entries not yet delivered to the consumer group, per stream shard, as of the last trim pass.",
            "shard",
            self.shards
                .iter()
                .filter_map(|s| s.lag.map(|lag| (s.shard, lag))),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reflects_counters() {
        let stats = WorkerStats::new(2, 1);
        stats.committed(10, 100);
        stats.committed(5, 50);
        stats.dead_lettered(1);
        stats.backlog(1, 7, Some(3));
        stats.backlog(9, 1, None); // out of range: ignored
        let s = stats.snapshot();
        assert_eq!(
            (s.batches, s.rows, s.bytes, s.dead_letters),
            (2, 15, 150, 1)
        );
        assert_eq!(s.shards[0].lag, None);
        assert_eq!(
            s.shards[1],
            ShardBacklog {
                shard: 1,
                pending: 7,
                lag: Some(3)
            }
        );
        assert_eq!((s.pending(), s.lag()), (7, 3));
    }

    #[test]
    fn export_names_types_and_shard_labels() {
        let stats = WorkerStats::new(2, 2);
        stats.committed(10, 100);
        stats.dead_lettered(2);
        stats.seq_conflicts(1);
        stats.deferred(1, 4);
        stats.deferred(7, 1); // out of range: ignored
        stats.backlog(1, 7, Some(3));
        stats.read();
        let mut out = Exposition::new();
        stats.snapshot().export(&mut out);
        let text = out.encode().unwrap();
        for (name, kind) in [
            ("im_storage_batches_total", "counter"),
            ("im_storage_rows_total", "counter"),
            ("im_storage_bytes_total", "counter"),
            ("im_storage_dead_letters_total", "counter"),
            ("im_storage_claimed_total", "counter"),
            ("im_storage_retries_total", "counter"),
            ("im_storage_splits_total", "counter"),
            ("im_storage_trimmed_total", "counter"),
            ("im_storage_seq_conflicts_total", "counter"),
            ("im_storage_retention_removed_total", "counter"),
            ("im_storage_retention_failures_total", "counter"),
            ("im_storage_rows_deferred_total", "counter"),
            ("im_storage_stream_reads_total", "counter"),
            ("im_storage_stream_pending", "gauge"),
            ("im_storage_stream_lag", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name}: {text}"
            );
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
        }
        for line in [
            "im_storage_rows_total 10\n",
            "im_storage_bytes_total 100\n",
            "im_storage_dead_letters_total 2\n",
            "im_storage_seq_conflicts_total 1\n",
            "im_storage_stream_reads_total 1\n",
            "im_storage_rows_deferred_total{mysql_shard=\"0\"} 0\n",
            "im_storage_rows_deferred_total{mysql_shard=\"1\"} 4\n",
            "im_storage_stream_pending{shard=\"0\"} 0\n",
            "im_storage_stream_pending{shard=\"1\"} 7\n",
            "im_storage_stream_lag{shard=\"1\"} 3\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        // Shard 0's lag is unknown: no sample rather than a made-up 0.
        assert!(
            !text.contains("im_storage_stream_lag{shard=\"0\"}"),
            "{text}"
        );
    }
}
