//! Worker configuration: one typed struct, filled from flags, `IM_*`
//! environment variables and an optional TOML file, validated at start-up.
//!
//! Precedence: command-line flag, then environment variable, then the
//! `--config` file, then the built-in default. TOML keys are the flag names
//! without the leading dashes (`batch-count = 2000`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::layout::{DEFAULT_PREFIX, DEFAULT_STREAMS, MAX_STREAMS, STORAGE_GROUP};
use crate::retention::{Retention, RetentionMode};

/// Invalid or unreadable configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Flags, variables or the TOML file could not be read or parsed.
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// im-storage-worker: moves messages from the Redis stream shards into
/// MySQL in batches. Several workers may run at once; they share the work
/// through one consumer group per stream.
#[derive(Debug, Clone, Parser, Serialize, Deserialize)]
#[command(name = "im-storage-worker", version, max_term_width = 100)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WorkerConfig {
    /// Redis holding the message streams.
    #[arg(long, env = "IM_REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,

    /// Seed nodes of a Redis Cluster holding the message streams
    /// (`redis://host:port,...`), instead of --redis-url.
    #[arg(long, env = "IM_REDIS_CLUSTER_NODES", conflicts_with = "redis_url")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cluster_nodes: Option<String>,

    /// Replicas that must have the stream entries of a batch before it
    /// commits to MySQL (WAIT). Default: 1 with --redis-cluster-nodes, 0 on
    /// a single Redis. Must not be lower than the servers'
    /// --redis-replica-acks.
    #[arg(long, env = "IM_REDIS_REPLICA_ACKS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_replica_acks: Option<u32>,

    /// Seconds the stream journal (what each batch stored, read by servers
    /// after a Redis master changes) is kept. A Redis that comes back with
    /// data older than this, or a replica promoted that far behind, may
    /// reuse seqs MySQL holds.
    #[arg(long, env = "IM_JOURNAL_RETENTION_SECS", default_value_t = 3600)]
    pub journal_retention_secs: u64,

    /// Seconds a message is kept in MySQL: older ones are removed (see
    /// --message-retention-mode), oldest first, and sync and history tell
    /// clients what is gone. 0 = keep every message forever.
    #[arg(long, env = "IM_MESSAGE_RETENTION_SECS", default_value_t = 0)]
    pub message_retention_secs: u64,

    /// What happens to messages past --message-retention-secs: `drop`
    /// deletes them, `archive` moves them to the `messages_archive` table
    /// of their shard (read by no client; export and purge it yourself).
    #[arg(long, env = "IM_MESSAGE_RETENTION_MODE", value_enum, default_value_t = RetentionMode::Drop)]
    #[serde(default)]
    pub message_retention_mode: RetentionMode,

    /// Seconds between two retention sweeps.
    #[arg(long, env = "IM_RETENTION_SWEEP_SECS", default_value_t = 60)]
    pub retention_sweep_secs: u64,

    /// Milliseconds a batch waits for its replicas before it is read again.
    #[arg(long, env = "IM_REDIS_REPLICA_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_replica_timeout_ms: u64,

    /// MySQL/MariaDB database the messages are stored in (migrated at
    /// start-up).
    #[arg(
        long,
        env = "IM_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/im",
        hide_env_values = true
    )]
    pub mysql_url: String,

    /// MySQL/MariaDB databases the messages are spread over by
    /// conversation, comma-separated URLs (the main database may be one of
    /// them; each is migrated at start-up). Members rows and read cursors
    /// stay in the main database. Must list the same databases in the same
    /// order as the server nodes. Default: the messages live in the main
    /// database.
    #[arg(
        long,
        env = "IM_MYSQL_SHARDS",
        value_name = "URL,...",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub mysql_shards: Vec<String>,

    /// TOML file with any of these settings (flags and IM_* variables win).
    #[arg(long, env = "IM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Prefix of every Redis key; must match the server nodes.
    #[arg(long, env = "IM_REDIS_PREFIX", default_value = DEFAULT_PREFIX)]
    pub redis_prefix: String,

    /// Number of stream shards; must match the server nodes.
    #[arg(long, env = "IM_STREAMS", default_value_t = DEFAULT_STREAMS)]
    pub streams: u32,

    /// Consumer group shared by all storage workers.
    #[arg(long, env = "IM_GROUP", default_value = STORAGE_GROUP)]
    pub group: String,

    /// Name of this worker in the consumer group; must differ between
    /// workers running at once and stay the same across restarts of one
    /// (its pending entries are taken up again on start). Default: the host
    /// name.
    #[arg(long, env = "IM_CONSUMER")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,

    // ---- batching ----
    /// Messages per batch: a batch is stored once it holds this many (one
    /// transaction; it may exceed it by one read's entries).
    #[arg(long, env = "IM_BATCH_COUNT", default_value_t = 4000)]
    pub batch_count: usize,

    /// Record bytes per batch: a batch is stored once it holds this many
    /// (it may exceed it by one read).
    #[arg(long, env = "IM_BATCH_BYTES", default_value_t = 4 << 20)]
    pub batch_bytes: usize,

    /// Milliseconds a batch waits for more entries after its first one
    /// before it is stored anyway. Acks and deliveries never wait for it
    /// (they come from Redis), only visibility in MySQL; at low load a
    /// longer age means fewer, fuller transactions, which leave more of
    /// a shared machine to the path that acks and delivers.
    #[arg(long, env = "IM_BATCH_AGE_MS", default_value_t = 100)]
    pub batch_age_ms: u64,

    /// Milliseconds one blocking read (XREADGROUP BLOCK) waits for new
    /// entries when the batch is empty.
    #[arg(long, env = "IM_BLOCK_MS", default_value_t = 1000)]
    pub block_ms: u64,

    /// Rows per INSERT statement at most (also capped below MySQL's 65,535
    /// placeholders).
    #[arg(long, env = "IM_CHUNK_ROWS", default_value_t = 1024)]
    pub chunk_rows: usize,

    // ---- failures ----
    /// Milliseconds an entry stays pending unacknowledged (its consumer
    /// died, or storing it failed) before a worker claims it (XAUTOCLAIM).
    #[arg(long, env = "IM_CLAIM_IDLE_MS", default_value_t = 30_000)]
    pub claim_idle_ms: u64,

    /// Milliseconds between two looks for entries to claim, per shard.
    #[arg(long, env = "IM_CLAIM_INTERVAL_MS", default_value_t = 5_000)]
    pub claim_interval_ms: u64,

    /// Deliveries of an entry the database keeps rejecting before it goes
    /// to the shard's dead-letter stream.
    #[arg(long, env = "IM_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,

    /// Entries kept per dead-letter stream at most (approximately; the
    /// oldest go first).
    #[arg(long, env = "IM_DEAD_LETTER_MAX_LEN", default_value_t = 100_000)]
    pub dead_letter_max_len: u64,

    /// First delay in milliseconds before retrying after a Redis or MySQL
    /// failure; it doubles up to --retry-max-ms.
    #[arg(long, env = "IM_RETRY_MIN_MS", default_value_t = 100)]
    pub retry_min_ms: u64,

    /// Longest delay in milliseconds between retries.
    #[arg(long, env = "IM_RETRY_MAX_MS", default_value_t = 5_000)]
    pub retry_max_ms: u64,

    /// Milliseconds one batch transaction may take before the connection
    /// is dropped and the batch retried.
    #[arg(long, env = "IM_MYSQL_TIMEOUT_MS", default_value_t = 30_000)]
    pub mysql_timeout_ms: u64,

    // ---- housekeeping ----
    /// Milliseconds between two stream trims, per shard (0 = never trim).
    /// Streams are trimmed only below what every consumer group has
    /// stored.
    #[arg(long, env = "IM_TRIM_INTERVAL_MS", default_value_t = 10_000)]
    pub trim_interval_ms: u64,

    /// Direct conversations remembered as having both members rows, so
    /// their rows are not written again.
    #[arg(long, env = "IM_KNOWN_DIRECT", default_value_t = 100_000)]
    pub known_direct: usize,

    /// Milliseconds between writes of the members rows and read cursors
    /// that stored messages imply (coalesced over every batch meanwhile;
    /// also the lag of the stored watermark).
    #[arg(long, env = "IM_CURSOR_FLUSH_MS", default_value_t = 500)]
    pub cursor_flush_ms: u64,

    /// MySQL connections, i.e. batch transactions in flight at once over
    /// all shards (0 = one per shard). More only help a database with
    /// cores to spare: on a small machine they cost context switches.
    #[arg(long, env = "IM_MYSQL_CONNECTIONS", default_value_t = 4)]
    pub mysql_connections: usize,

    /// Message rows one stream shard's consumer may leave pending for MySQL
    /// shards that are down (while the other shards' rows are stored)
    /// before it stops reading new entries until those shards are back.
    #[arg(long, env = "IM_MAX_DEFERRED_ROWS", default_value_t = 100_000)]
    pub max_deferred_rows: usize,

    /// Milliseconds to finish the batch in hand after a stop request;
    /// entries not stored by then stay pending for the next start.
    #[arg(long, env = "IM_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Seconds between two progress lines in the log (0 = none).
    #[arg(long, env = "IM_PROGRESS_SECS", default_value_t = 10)]
    pub progress_secs: u64,

    /// Address of the admin HTTP listener: Prometheus metrics at /metrics,
    /// a health check at /healthz (e.g. 127.0.0.1:9101; keep it off public
    /// networks). Default: no listener.
    #[arg(long, env = "IM_ADMIN_LISTEN")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
}

impl WorkerConfig {
    /// Parses the process arguments and environment, merges the TOML file
    /// if one is named, and validates.
    pub fn load() -> Result<WorkerConfig, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// Like [`WorkerConfig::load`] with explicit arguments (the first is
    /// the program name).
    pub fn load_from<I, T>(args: I) -> Result<WorkerConfig, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config: WorkerConfig =
            crate::settings::load(args, |c: &WorkerConfig| c.config.as_deref())?;
        config.validate()?;
        Ok(config)
    }

    /// The built-in defaults with the given Redis and MySQL URLs (for tests
    /// and embedding).
    pub fn new(redis_url: impl Into<String>, mysql_url: impl Into<String>) -> WorkerConfig {
        let mut config = WorkerConfig::try_parse_from(["im-storage-worker"])
            .expect("the built-in defaults parse");
        config.redis_url = redis_url.into();
        config.mysql_url = mysql_url.into();
        config
    }

    /// Checks ranges and relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if !(1..=MAX_STREAMS).contains(&self.streams) {
            return bad("streams must be between 1 and 1024");
        }
        if self.group.is_empty() || self.redis_prefix.is_empty() {
            return bad("group and prefix must not be empty");
        }
        if self.consumer.as_deref() == Some("") {
            return bad("consumer must not be empty");
        }
        if !(1..=100_000).contains(&self.batch_count) {
            return bad("batch-count must be between 1 and 100000");
        }
        if self.batch_bytes < 1024 {
            return bad("batch-bytes must be at least 1024");
        }
        if self.block_ms == 0 || self.block_ms > 60_000 {
            return bad("block-ms must be between 1 and 60000");
        }
        if self.chunk_rows == 0 {
            return bad("chunk-rows must be positive");
        }
        if self.max_attempts == 0 {
            return bad("max-attempts must be at least 1");
        }
        if self.claim_idle_ms == 0 || self.claim_interval_ms == 0 {
            return bad("claim-idle-ms and claim-interval-ms must be positive");
        }
        // Entries waiting in a batch must not look abandoned.
        if self.claim_idle_ms <= self.batch_age_ms {
            return bad("claim-idle-ms must exceed batch-age-ms");
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            return bad("retry-max-ms must be at least retry-min-ms > 0");
        }
        if self.mysql_timeout_ms == 0 {
            return bad("mysql-timeout-ms must be positive");
        }
        self.redis_target()?;
        if self.redis_replica_timeout_ms == 0 {
            return bad("redis-replica-timeout-ms must be positive");
        }
        if self.retention_sweep_secs == 0 {
            return bad("retention-sweep-secs must be positive");
        }
        if self.max_deferred_rows == 0 {
            return bad("max-deferred-rows must be positive");
        }
        crate::shards::validate_urls(&self.mysql_shards)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The retention policy, if messages are not kept forever.
    pub fn retention(&self) -> Option<Retention> {
        Retention::from_secs(self.message_retention_secs, self.message_retention_mode)
    }

    /// Where Redis is.
    pub fn redis_target(&self) -> Result<crate::redis_target::RedisTarget, ConfigError> {
        // --redis-url has a default: it counts only without the cluster.
        let url = self
            .redis_cluster_nodes
            .is_none()
            .then_some(self.redis_url.as_str());
        crate::redis_target::RedisTarget::from_flags(url, self.redis_cluster_nodes.as_deref())
            .map_err(ConfigError::Invalid)?
            .ok_or_else(|| ConfigError::Invalid("no Redis configured".into()))
    }

    /// Replicas a batch's entries must reach before it commits.
    pub fn replica_acks(&self) -> u32 {
        crate::redis_target::replica_acks(
            self.redis_replica_acks,
            self.redis_cluster_nodes.is_some(),
        )
    }

    /// The consumer name: the configured one, else the host name.
    pub fn consumer_name(&self) -> String {
        if let Some(name) = &self.consumer {
            return name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "im-storage-worker".to_string())
    }

    /// MySQL connections to allow.
    pub fn mysql_pool_size(&self) -> usize {
        if self.mysql_connections == 0 {
            self.streams as usize
        } else {
            self.mysql_connections
        }
    }

    pub(crate) fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let c = WorkerConfig::new("redis://x", "mysql://y/z");
        c.validate().unwrap();
        assert_eq!(c.redis_prefix, "im");
        assert_eq!(c.streams, 16);
        assert_eq!(c.group, "storage");
        assert_eq!(c.batch_count, 4000);
        assert_eq!(c.batch_bytes, 4 << 20);
        assert_eq!(c.claim_idle_ms, 30_000);
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.admin_listen, None);
        assert!(c.mysql_shards.is_empty());
        assert_eq!(c.max_deferred_rows, 100_000);
        assert!(!c.consumer_name().is_empty());
        let help = <WorkerConfig as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for flag in [
            "--batch-count",
            "--batch-bytes",
            "--batch-age-ms",
            "--claim-idle-ms",
            "--max-attempts",
            "--trim-interval-ms",
            "--admin-listen",
            "IM_ADMIN_LISTEN",
            "IM_REDIS_URL",
            "--mysql-shards",
            "IM_MYSQL_SHARDS",
            "--max-deferred-rows",
            "[default: 1000]",
        ] {
            assert!(help.contains(flag), "--help lacks {flag}");
        }
    }

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("im-worker-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("worker.toml");
        std::fs::write(
            &path,
            "batch-count = 77\nstreams = 4\nconsumer = \"w1\"\nadmin-listen = \"127.0.0.1:9101\"\n",
        )
        .unwrap();
        let c = WorkerConfig::load_from([
            "im-storage-worker",
            "--config",
            path.to_str().unwrap(),
            "--streams",
            "8",
        ])
        .unwrap();
        assert_eq!(c.batch_count, 77);
        assert_eq!(c.streams, 8);
        assert_eq!(c.consumer_name(), "w1");
        assert_eq!(c.admin_listen, Some("127.0.0.1:9101".parse().unwrap()));
        std::fs::write(&path, "no-such-key = 1\n").unwrap();
        let err = WorkerConfig::load_from(["w", "--config", path.to_str().unwrap()]);
        assert!(matches!(err, Err(ConfigError::Settings(_))));
        let _ = std::fs::remove_dir_all(&dir);
        let err = WorkerConfig::load_from(["w", "--batch-count", "0"]);
        assert!(matches!(err, Err(ConfigError::Invalid(_))));
        let err = WorkerConfig::load_from(["w", "--claim-idle-ms", "20", "--batch-age-ms", "20"]);
        assert!(matches!(err, Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn mysql_shards_are_a_list_from_the_flag_or_the_file() {
        let c =
            WorkerConfig::load_from(["w", "--mysql-shards", "mysql://a:3306/m0,mysql://b:3306/m1"])
                .unwrap();
        assert_eq!(c.mysql_shards, ["mysql://a:3306/m0", "mysql://b:3306/m1"]);
        let dir = std::env::temp_dir().join(format!("im-worker-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("worker.toml");
        std::fs::write(
            &path,
            "mysql-shards = [\"mysql://c/m0\", \"mysql://d/m1\"]\n",
        )
        .unwrap();
        let c = WorkerConfig::load_from(["w", "--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.mysql_shards, ["mysql://c/m0", "mysql://d/m1"]);
        let _ = std::fs::remove_dir_all(&dir);
        let err = WorkerConfig::load_from(["w", "--mysql-shards", "mysql://a/m,mysql://a/m"]);
        assert!(matches!(err, Err(ConfigError::Invalid(_))));
    }
}
