//! Server configuration: one typed struct, filled from flags, `IM_*`
//! environment variables and an optional TOML file, validated at start-up.
//!
//! Precedence: command-line flag, then environment variable, then the
//! `--config` file, then the built-in default. TOML keys are the flag names
//! without the leading dashes (`heartbeat-interval-secs = 30`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use im_storage::redis_target::RedisTarget;
use serde::{Deserialize, Serialize};

use crate::chat::ChatConfig;
use crate::chat::auth::HashCost;
use crate::net::tls::TlsFiles;
use crate::net::{Cidr, NetConfig};
use crate::store::pipeline::PipelineOptions;
use crate::store::sqlite::SqliteOptions;
use crate::store::{Retention, RetentionMode};

/// Invalid or unreadable configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Flags, variables or the TOML file could not be read or parsed.
    #[error(transparent)]
    Settings(#[from] im_storage::settings::SettingsError),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// im-server: a chat server speaking length-prefixed Protobuf frames over
/// TCP. With no flags it listens on 127.0.0.1:7000 and keeps its data in
/// ./data (embedded store, no other service needed).
#[derive(Debug, Clone, Parser, Serialize, Deserialize)]
#[command(name = "im-server", version, max_term_width = 100)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Address to listen on for client connections.
    #[arg(long, env = "IM_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,

    /// Directory of the embedded store and the token key.
    #[arg(long, env = "IM_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Address of the admin HTTP listener: Prometheus metrics at /metrics,
    /// a health check at /healthz (e.g. 127.0.0.1:9100; keep it off public
    /// networks). Default: no listener.
    #[arg(long, env = "IM_ADMIN_LISTEN")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,

    /// TOML file with any of these settings (flags and IM_* variables win).
    #[arg(long, env = "IM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    // ---- connections ----
    /// Event-loop threads owning client sockets (0 = one per CPU).
    #[arg(long, env = "IM_SHARDS", default_value_t = 0)]
    pub shards: usize,

    /// Connections held at most; more are refused with SERVER_FULL.
    #[arg(long, env = "IM_MAX_CONNECTIONS", default_value_t = 1_000_000)]
    pub max_connections: usize,

    /// Largest frame accepted, in bytes; a larger length prefix gets
    /// FRAME_TOO_LARGE and a close.
    #[arg(long, env = "IM_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Seconds a new connection has to authenticate before AUTH_TIMEOUT.
    #[arg(long, env = "IM_AUTH_TIMEOUT_SECS", default_value_t = 10)]
    pub auth_timeout_secs: u32,

    /// Heartbeat interval told to clients, in seconds.
    #[arg(long, env = "IM_HEARTBEAT_INTERVAL_SECS", default_value_t = 30)]
    pub heartbeat_interval_secs: u32,

    /// Seconds without any frame after which a session is closed with
    /// HEARTBEAT_TIMEOUT.
    #[arg(long, env = "IM_HEARTBEAT_TIMEOUT_SECS", default_value_t = 90)]
    pub heartbeat_timeout_secs: u32,

    /// Bytes queued for one connection beyond its socket buffer above which
    /// pushes to it are skipped (it gets a SyncHint once it has read them
    /// down, and syncs) and its requests are not read.
    #[arg(long, env = "IM_MAX_OUTBOUND_BYTES", default_value_t = 1 << 20)]
    pub max_outbound_bytes: usize,

    /// Seconds queued output may wait without the client reading a byte
    /// before the connection is closed as SLOW_CONSUMER.
    #[arg(long, env = "IM_SLOW_CONSUMER_SECS", default_value_t = 30)]
    pub slow_consumer_secs: u32,

    /// Requests of one connection awaiting replies before the server stops
    /// reading from it (backpressure).
    #[arg(long, env = "IM_MAX_IN_FLIGHT", default_value_t = 64)]
    pub max_in_flight: u16,

    /// Seconds a closing connection gets to receive its last frame.
    #[arg(long, env = "IM_LINGER_SECS", default_value_t = 2)]
    pub linger_secs: u32,

    /// listen(2) backlog (also capped by net.core.somaxconn).
    #[arg(long, env = "IM_BACKLOG", default_value_t = 4096)]
    pub backlog: u32,

    /// One listener per event loop with SO_REUSEPORT, balanced by the
    /// kernel (false: one listener hands connections round-robin).
    #[arg(long, env = "IM_REUSE_PORT", default_value_t = true, action = clap::ArgAction::Set)]
    pub reuse_port: bool,

    /// TCP_NODELAY on client sockets.
    #[arg(long, env = "IM_NODELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub nodelay: bool,

    /// TCP keepalive idle seconds (0 = off; heartbeats already detect dead
    /// peers).
    #[arg(long, env = "IM_KEEPALIVE_SECS", default_value_t = 0)]
    pub keepalive_secs: u32,

    /// SO_SNDBUF per client socket in bytes (0 = kernel autotuning).
    #[arg(long, env = "IM_SEND_BUFFER_BYTES", default_value_t = 0)]
    pub send_buffer_bytes: usize,

    /// SO_RCVBUF per client socket in bytes (0 = kernel autotuning).
    #[arg(long, env = "IM_RECV_BUFFER_BYTES", default_value_t = 0)]
    pub recv_buffer_bytes: usize,

    /// Load balancers that send a PROXY protocol header (v1 or v2): IPs or
    /// CIDRs, comma-separated (e.g. 10.0.0.0/8,::1/128). A connection from
    /// one of them must start with a header, and the client address it
    /// carries is the connection's (for login rate limits); a bad or
    /// missing header closes it. Others are served as before. Default:
    /// none.
    #[arg(
        long,
        env = "IM_PROXY_PROTOCOL_FROM",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub proxy_protocol_from: Vec<Cidr>,

    // ---- TLS ----
    /// Address to listen on for TLS clients (TLS 1.3 and 1.2, ALPN
    /// `im/1`, the same protocol inside); needs --tls-cert and --tls-key.
    /// Default: no TLS listener.
    #[arg(long, env = "IM_TLS_LISTEN")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<SocketAddr>,

    /// PEM certificate chain of the TLS listener, leaf first. Read again
    /// on SIGHUP (with the key and ticket keys); open connections stay.
    #[arg(long, env = "IM_TLS_CERT", requires = "tls_key")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "IM_TLS_KEY", requires = "tls_cert")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,

    /// Session-ticket secrets shared by every node, so a client resumes
    /// its TLS session on any of them: one per line in hex (at least 32
    /// bytes; `openssl rand -hex 32`), the first seals new tickets, all
    /// open them. Default: a random secret per process (tickets resume on
    /// the node that issued them only).
    #[arg(long, env = "IM_TLS_TICKET_KEY_FILE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ticket_key_file: Option<PathBuf>,

    /// Seconds of one ticket-key period: keys are derived from the
    /// secrets per period, tickets are accepted for the current and the
    /// previous one (so for 1-2 periods).
    #[arg(long, env = "IM_TLS_TICKET_ROTATE_SECS", default_value_t = 6 * 3600)]
    pub tls_ticket_rotate_secs: u32,

    /// Do not open the plain TCP listener (--listen): clients connect
    /// over TLS only.
    #[arg(long, env = "IM_NO_PLAIN_LISTENER")]
    #[serde(default)]
    pub no_plain_listener: bool,

    // ---- chat ----
    /// Send pipelines; conversations are spread over them (0 = one per CPU).
    #[arg(long, env = "IM_SEND_LANES", default_value_t = 0)]
    pub send_lanes: usize,

    /// Messages per storage append batch at most.
    #[arg(long, env = "IM_SEND_BATCH", default_value_t = 512)]
    pub send_batch: usize,

    /// Sends queued per pipeline before new ones get OVERLOADED.
    #[arg(long, env = "IM_SEND_QUEUE", default_value_t = 16_384)]
    pub send_queue: usize,

    /// Bytes of sends admitted to one pipeline and not answered yet before
    /// new ones get OVERLOADED.
    #[arg(long, env = "IM_SEND_QUEUE_BYTES", default_value_t = 64 << 20)]
    pub send_queue_bytes: usize,

    /// Bytes of one user's sends admitted and not answered yet, over all of
    /// the user's connections, before that user's new sends get
    /// OVERLOADED (others are unaffected).
    #[arg(long, env = "IM_MAX_USER_PENDING_BYTES", default_value_t = 4 << 20)]
    pub max_user_pending_bytes: usize,

    /// Append batches in flight per pipeline.
    #[arg(long, env = "IM_SEND_BATCHES_IN_FLIGHT", default_value_t = 4)]
    pub send_batches_in_flight: usize,

    /// Bytes of replies and pushes queued to the event loops above which
    /// fan-out and receipts wait for them to drain.
    #[arg(long, env = "IM_OUTBOUND_QUEUE_BYTES", default_value_t = 256 << 20)]
    pub outbound_queue_bytes: usize,

    /// Messages per sync page at most.
    #[arg(long, env = "IM_MAX_SYNC_PAGE", default_value_t = 500)]
    pub max_sync_page: u32,

    /// Messages per history page at most.
    #[arg(long, env = "IM_MAX_HISTORY_PAGE", default_value_t = 200)]
    pub max_history_page: u32,

    /// Conversations per conversation-list page at most.
    #[arg(long, env = "IM_MAX_LIST_PAGE", default_value_t = 500)]
    pub max_list_page: u32,

    /// Cursors per sync request at most.
    #[arg(long, env = "IM_MAX_SYNC_CURSORS", default_value_t = 1024)]
    pub max_sync_cursors: usize,

    /// Members per group at most.
    #[arg(long, env = "IM_MAX_GROUP_MEMBERS", default_value_t = 2000)]
    pub max_group_members: usize,

    /// Groups one user may belong to at most (creating or joining one more
    /// is refused).
    #[arg(long, env = "IM_MAX_GROUPS_PER_USER", default_value_t = 1000)]
    pub max_groups_per_user: usize,

    /// Presence subscriptions per connection at most.
    #[arg(long, env = "IM_MAX_PRESENCE_SUBSCRIPTIONS", default_value_t = 1000)]
    pub max_presence_subscriptions: usize,

    /// Bytes of text per message at most.
    #[arg(long, env = "IM_MAX_TEXT_BYTES", default_value_t = 32 * 1024)]
    pub max_text_bytes: usize,

    /// Bytes of group member lists cached for fan-out (about 8 per member;
    /// the least recently used groups are dropped first).
    #[arg(long, env = "IM_MEMBER_CACHE_BYTES", default_value_t = 64 << 20)]
    pub member_cache_bytes: u64,

    /// Seconds a cached member list is used for fan-out before reloading (a
    /// safety net: a membership change reaches every node's cache at once).
    #[arg(long, env = "IM_MEMBER_CACHE_TTL_SECS", default_value_t = 5)]
    pub member_cache_ttl_secs: u64,

    // ---- accounts ----
    /// Secret that signs session tokens (at least 32 bytes; nodes that share
    /// it accept each other's tokens). Default: a random key kept in
    /// DATA_DIR/token.key.
    #[arg(long, env = "IM_TOKEN_SECRET", hide_env_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,

    /// Session token lifetime in seconds.
    #[arg(long, env = "IM_TOKEN_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    pub token_ttl_secs: u64,

    /// argon2id memory cost in KiB.
    #[arg(long, env = "IM_ARGON2_MEMORY_KIB", default_value_t = 19 * 1024)]
    pub argon2_memory_kib: u32,

    /// argon2id passes.
    #[arg(long, env = "IM_ARGON2_ITERATIONS", default_value_t = 2)]
    pub argon2_iterations: u32,

    /// Password hashes computed at once (0 = one per CPU).
    #[arg(long, env = "IM_HASH_CONCURRENCY", default_value_t = 0)]
    pub hash_concurrency: usize,

    /// Password hashes waiting at most; more logins get OVERLOADED.
    #[arg(long, env = "IM_HASH_QUEUE", default_value_t = 1024)]
    pub hash_queue: usize,

    /// Failed logins per (address, username) per window before
    /// RATE_LIMITED (ten times as many per address).
    #[arg(long, env = "IM_LOGIN_FAILURES", default_value_t = 5)]
    pub login_failures: u32,

    /// Length of the failed-login window in seconds.
    #[arg(long, env = "IM_LOGIN_FAILURE_WINDOW_SECS", default_value_t = 60)]
    pub login_failure_window_secs: u64,

    // ---- abuse limits (per node; 0 = off) ----
    /// Sustained messages one user may send per second over all its
    /// connections to this node; more get RATE_LIMITED.
    #[arg(long, env = "IM_MAX_MSGS_PER_USER_PER_SEC", default_value_t = 20)]
    pub max_msgs_per_user_per_sec: u32,

    /// Messages one user may send at once before the sustained rate applies
    /// (at least --max-msgs-per-user-per-sec).
    #[arg(long, env = "IM_MSGS_BURST_PER_USER", default_value_t = 50)]
    pub msgs_burst_per_user: u32,

    /// Requests per connection per second (also the burst); more get a
    /// non-fatal RATE_LIMITED. Pings are not counted.
    #[arg(long, env = "IM_MAX_REQUESTS_PER_CONN_PER_SEC", default_value_t = 100)]
    pub max_requests_per_conn_per_sec: u32,

    /// New connections per client address per second (also the burst;
    /// IPv6 addresses count per /64); more are refused with a fatal
    /// RATE_LIMITED and closed.
    #[arg(long, env = "IM_MAX_NEW_CONNS_PER_ADDR_PER_SEC", default_value_t = 20)]
    pub max_new_conns_per_addr_per_sec: u32,

    /// Open connections per client address (IPv6: per /64); more are
    /// refused with a fatal RATE_LIMITED and closed.
    #[arg(long, env = "IM_MAX_CONNS_PER_ADDR", default_value_t = 500)]
    pub max_conns_per_addr: u32,

    /// Groups one user may create per hour.
    #[arg(
        long,
        env = "IM_MAX_GROUPS_CREATED_PER_USER_PER_HOUR",
        default_value_t = 20
    )]
    pub max_groups_created_per_user_per_hour: u32,

    /// Members one user may add per minute, at creation or later (a
    /// request adding more than this at once gets INVALID_ARGUMENT).
    #[arg(long, env = "IM_MAX_MEMBERS_ADDED_PER_MINUTE", default_value_t = 2000)]
    pub max_members_added_per_minute: u32,
    /// Live sessions (logged-in devices) per user at most; a login beyond
    /// it ends the user's least recently used session.
    #[arg(long, env = "IM_MAX_DEVICES_PER_USER", default_value_t = 10)]
    pub max_devices_per_user: usize,

    /// Ended sessions kept in memory for resume checks at most (about 50
    /// bytes each); past it, resumes of sessions not held read the store.
    #[arg(long, env = "IM_MAX_ENDED_SESSIONS", default_value_t = 1_000_000)]
    pub max_ended_sessions: usize,

    // ---- production pipeline (Redis Streams + MySQL) ----
    /// Redis of the production pipeline (with --mysql-url; without both the
    /// embedded store is used). Every node and storage worker of a
    /// deployment shares it.
    #[arg(long, env = "IM_REDIS_URL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,

    /// Seed nodes of a Redis Cluster (`redis://host:port,...`), instead of
    /// --redis-url: the pipeline, routes and cross-node pushes run on the
    /// cluster unchanged.
    #[arg(long, env = "IM_REDIS_CLUSTER_NODES", conflicts_with = "redis_url")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_cluster_nodes: Option<String>,

    /// Replicas that must have an appended message before it is acked
    /// (WAIT after the append; a timeout answers OVERLOADED, not an ack).
    /// Default: 1 with --redis-cluster-nodes, 0 on a single Redis. With 0,
    /// a failover may lose acknowledged messages.
    #[arg(long, env = "IM_REDIS_REPLICA_ACKS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_replica_acks: Option<u32>,

    /// Milliseconds an append waits for its replicas (--redis-replica-acks).
    #[arg(long, env = "IM_REDIS_REPLICA_TIMEOUT_MS", default_value_t = 1000)]
    pub redis_replica_timeout_ms: u64,

    /// MySQL/MariaDB of the production pipeline, e.g.
    /// mysql://user:pass@host:3306/im (the schema is created at start-up).
    #[arg(long, env = "IM_MYSQL_URL", hide_env_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql_url: Option<String>,

    /// MySQL/MariaDB databases the messages are spread over by
    /// conversation, comma-separated URLs (the --mysql-url database may be
    /// one of them; each is migrated at start-up). Accounts, sessions,
    /// groups and memberships stay in --mysql-url. Every node and storage
    /// worker must list the same databases in the same order. Default: the
    /// messages live in --mysql-url.
    #[arg(
        long,
        env = "IM_MYSQL_SHARDS",
        value_name = "URL,...",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(default)]
    pub mysql_shards: Vec<String>,

    /// Prefix of every Redis key (shared by the deployment's processes).
    #[arg(long, env = "IM_REDIS_PREFIX", default_value = "im")]
    pub redis_prefix: String,

    /// Stream shards messages are spread over (must match the storage
    /// workers).
    #[arg(long, env = "IM_STREAMS", default_value_t = 16)]
    pub streams: u32,

    /// Ordered Redis connections carrying appends.
    #[arg(long, env = "IM_APPEND_LANES", default_value_t = 4)]
    pub append_lanes: usize,

    /// Recent messages kept per conversation in Redis for sync, beyond
    /// those the worker has not stored yet.
    #[arg(long, env = "IM_RECENT_CACHE_LEN", default_value_t = 200)]
    pub recent_cache_len: u32,

    /// Seconds an idle conversation's recent messages stay in Redis.
    #[arg(long, env = "IM_RECENT_CACHE_TTL_SECS", default_value_t = 86_400)]
    pub recent_cache_ttl_secs: u64,

    /// Pooled Redis connections for reads.
    #[arg(long, env = "IM_REDIS_POOL_SIZE", default_value_t = 16)]
    pub redis_pool_size: usize,

    /// Pooled MySQL connections, to the main database and to each of
    /// --mysql-shards.
    #[arg(long, env = "IM_MYSQL_POOL_SIZE", default_value_t = 16)]
    pub mysql_pool_size: usize,

    // ---- cluster (with --redis-url) ----
    /// This node's id in the cluster (letters, digits, '-', '_', '.').
    /// Default: a random id kept in DATA_DIR/node.id.
    #[arg(long, env = "IM_NODE_ID")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,

    /// Seconds a node's lease lasts without renewal (renewed every third
    /// of it): a node that dies is dead for the others after at most this.
    #[arg(long, env = "IM_LEASE_SECS", default_value_t = 10)]
    pub lease_secs: u64,

    /// Groups with more members than this are broadcast to every node,
    /// which pushes to its own members; smaller groups are routed to the
    /// nodes their members are on.
    #[arg(long, env = "IM_GROUP_BROADCAST_MEMBERS", default_value_t = 100)]
    pub group_broadcast_members: usize,

    /// Bytes of pushes waiting to be forwarded to other nodes at most
    /// (fan-out waits for room beyond that).
    #[arg(long, env = "IM_FORWARD_QUEUE_BYTES", default_value_t = 64 << 20)]
    pub forward_queue_bytes: usize,

    // ---- storage and process ----
    /// Seconds within which a resend with the same client_msg_id returns
    /// the original ack, in either store (recognised for at least this
    /// long, at most twice; memory: about 60 bytes per message sent in
    /// twice this window in Redis, 24 in the embedded store).
    #[arg(long, env = "IM_DEDUP_WINDOW_SECS", default_value_t = 600)]
    pub dedup_window_secs: u64,

    /// Sends the embedded store's dedup window holds at most (a burst
    /// larger than this within the window shortens it).
    #[arg(long, env = "IM_SQLITE_DEDUP_CAPACITY", default_value_t = 2_000_000)]
    pub sqlite_dedup_capacity: usize,

    /// Read connections of the embedded store.
    #[arg(long, env = "IM_SQLITE_READERS", default_value_t = 4)]
    pub sqlite_readers: usize,

    /// Write jobs queued in the embedded store before sends get OVERLOADED.
    #[arg(long, env = "IM_SQLITE_WRITE_QUEUE", default_value_t = 8192)]
    pub sqlite_write_queue: usize,

    /// Seconds the embedded store keeps a message: older ones are removed
    /// (see --message-retention-mode), oldest first, and sync and history
    /// tell clients what is gone. 0 = keep every message forever. On the
    /// pipeline the storage workers remove them (set it there too; a
    /// pipeline node only reads the floors they leave).
    #[arg(long, env = "IM_MESSAGE_RETENTION_SECS", default_value_t = 0)]
    pub message_retention_secs: u64,

    /// What happens to messages past --message-retention-secs: `drop`
    /// deletes them, `archive` moves them to the `messages_archive` table
    /// (read by no client; export and purge it yourself).
    #[arg(long, env = "IM_MESSAGE_RETENTION_MODE", value_enum, default_value_t = RetentionMode::Drop)]
    #[serde(default)]
    pub message_retention_mode: RetentionMode,

    /// Seconds between two retention sweeps of the embedded store.
    #[arg(long, env = "IM_RETENTION_SWEEP_SECS", default_value_t = 60)]
    pub retention_sweep_secs: u64,

    /// tokio worker threads for chat logic and storage (0 = one per CPU).
    #[arg(long, env = "IM_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Seconds to finish in-flight requests after SIGTERM/SIGINT before
    /// connections are closed with SERVER_SHUTDOWN.
    #[arg(long, env = "IM_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Config {
    /// Parses the process arguments and environment, merges the TOML file
    /// if one is named, and validates.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    /// Like [`Config::load`] with explicit arguments (the first is the
    /// program name).
    pub fn load_from<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let config: Config = im_storage::settings::load(args, |c: &Config| c.config.as_deref())?;
        config.validate()?;
        Ok(config)
    }

    /// The built-in defaults (as if started with no flags), for tests and
    /// embedding.
    pub fn defaults() -> Config {
        Config::try_parse_from(["im-server"]).expect("defaults parse")
    }

    /// Checks ranges and relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.tls_listen.is_some() != (self.tls_cert.is_some() && self.tls_key.is_some()) {
            return bad("tls-listen needs tls-cert and tls-key, and they need tls-listen");
        }
        if self.no_plain_listener && self.tls_listen.is_none() {
            return bad("no-plain-listener needs tls-listen");
        }
        if self.tls_ticket_rotate_secs < 60 {
            return bad("tls-ticket-rotate-secs must be at least 60");
        }
        if !(4096..=16 << 20).contains(&self.max_frame_bytes) {
            return bad("max-frame-bytes must be between 4 KiB and 16 MiB");
        }
        if self.heartbeat_interval_secs == 0
            || self.heartbeat_timeout_secs <= self.heartbeat_interval_secs
        {
            return bad("heartbeat-timeout-secs must exceed heartbeat-interval-secs > 0");
        }
        if self.auth_timeout_secs == 0 {
            return bad("auth-timeout-secs must be positive");
        }
        if self.max_devices_per_user == 0 || self.max_ended_sessions == 0 {
            return bad("max-devices-per-user and max-ended-sessions must be positive");
        }
        if self.max_outbound_bytes < self.max_frame_bytes {
            return bad("max-outbound-bytes must be at least max-frame-bytes");
        }
        if self.slow_consumer_secs == 0 {
            return bad("slow-consumer-secs must be positive");
        }
        if self.outbound_queue_bytes < self.max_frame_bytes {
            return bad("outbound-queue-bytes must be at least max-frame-bytes");
        }
        if self.max_in_flight == 0 || self.send_batch == 0 || self.send_queue == 0 {
            return bad("max-in-flight, send-batch and send-queue must be positive");
        }
        if self.send_queue_bytes < self.max_frame_bytes
            || self.max_user_pending_bytes < self.max_frame_bytes
        {
            return bad(
                "send-queue-bytes and max-user-pending-bytes must be at least max-frame-bytes",
            );
        }
        if self.max_group_members < 2 || self.max_groups_per_user == 0 {
            return bad("max-group-members must be at least 2, max-groups-per-user at least 1");
        }
        if let Some(secret) = &self.token_secret {
            if secret.len() < 32 {
                return bad("token-secret must be at least 32 bytes");
            }
        }
        let redis = self.redis_target()?;
        if redis.is_some() != self.mysql_url.is_some() {
            return bad("--redis-url (or --redis-cluster-nodes) and --mysql-url go together");
        }
        if self.retention_sweep_secs == 0 {
            return bad("retention-sweep-secs must be positive");
        }
        if self.redis_replica_timeout_ms == 0 {
            return bad("redis-replica-timeout-ms must be positive");
        }
        if !self.mysql_shards.is_empty() && self.mysql_url.is_none() {
            return bad("--mysql-shards needs --mysql-url (and --redis-url)");
        }
        im_storage::shards::validate_urls(&self.mysql_shards)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(1..=im_storage::layout::MAX_STREAMS).contains(&self.streams) {
            return bad("streams must be between 1 and 1024");
        }
        if let Some(id) = &self.node_id {
            crate::cluster::ClusterConfig::validate_node_id(id).map_err(ConfigError::Invalid)?;
        }
        if self.lease_secs < 2 {
            return bad("lease-secs must be at least 2");
        }
        if self.argon2_memory_kib < 8 || self.argon2_iterations == 0 {
            return bad("argon2-memory-kib must be >= 8 and argon2-iterations >= 1");
        }
        if self.max_msgs_per_user_per_sec > 0
            && self.msgs_burst_per_user < self.max_msgs_per_user_per_sec
        {
            return bad("msgs-burst-per-user must be at least max-msgs-per-user-per-sec");
        }
        Ok(())
    }

    /// The embedded store's retention policy, if messages are not kept
    /// forever.
    pub fn retention(&self) -> Option<Retention> {
        Retention::from_secs(self.message_retention_secs, self.message_retention_mode)
    }

    /// Settings of the connection layer.
    pub fn net(&self) -> NetConfig {
        NetConfig {
            listen: self.listen,
            plain_listener: !self.no_plain_listener,
            tls_listen: self.tls_listen,
            // Loaded (reading files) when the server starts.
            tls: None,
            shards: if self.shards == 0 {
                cpus()
            } else {
                self.shards
            },
            max_connections: self.max_connections,
            max_frame_bytes: self.max_frame_bytes,
            auth_timeout_secs: self.auth_timeout_secs,
            heartbeat_timeout_secs: self.heartbeat_timeout_secs,
            max_outbound_bytes: self.max_outbound_bytes,
            slow_consumer_secs: self.slow_consumer_secs,
            queue_high_water_bytes: self.outbound_queue_bytes,
            max_in_flight: self.max_in_flight,
            linger_secs: self.linger_secs,
            backlog: self.backlog,
            reuse_port: self.reuse_port,
            nodelay: self.nodelay,
            keepalive_secs: self.keepalive_secs,
            send_buffer_bytes: self.send_buffer_bytes,
            recv_buffer_bytes: self.recv_buffer_bytes,
            proxy_protocol_from: self.proxy_protocol_from.clone(),
            max_requests_per_conn_per_sec: self.max_requests_per_conn_per_sec,
            max_new_conns_per_addr_per_sec: self.max_new_conns_per_addr_per_sec,
            max_conns_per_addr: self.max_conns_per_addr,
        }
    }

    /// The TLS listener's files, when it is configured.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        self.tls_listen?;
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ticket_keys: self.tls_ticket_key_file.clone(),
            ticket_rotate_secs: self.tls_ticket_rotate_secs,
        })
    }

    /// Settings of the chat layer.
    pub fn chat(&self) -> ChatConfig {
        ChatConfig {
            heartbeat_interval_secs: self.heartbeat_interval_secs,
            heartbeat_timeout_secs: self.heartbeat_timeout_secs,
            max_frame_bytes: self.max_frame_bytes,
            send_lanes: if self.send_lanes == 0 {
                cpus()
            } else {
                self.send_lanes
            },
            send_batch: self.send_batch,
            send_queue: self.send_queue,
            send_queue_bytes: self.send_queue_bytes,
            max_user_pending_bytes: self.max_user_pending_bytes,
            send_batches_in_flight: self.send_batches_in_flight,
            max_sync_page: self.max_sync_page,
            max_history_page: self.max_history_page,
            max_list_page: self.max_list_page,
            max_sync_cursors: self.max_sync_cursors,
            max_group_members: self.max_group_members,
            max_groups_per_user: self.max_groups_per_user,
            max_presence_subscriptions: self.max_presence_subscriptions,
            max_lookup: 1000,
            max_text_bytes: self.max_text_bytes,
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            hash_cost: HashCost {
                memory_kib: self.argon2_memory_kib,
                iterations: self.argon2_iterations,
                parallelism: 1,
            },
            hash_concurrency: if self.hash_concurrency == 0 {
                cpus()
            } else {
                self.hash_concurrency
            },
            hash_queue: self.hash_queue,
            login_failures: self.login_failures,
            login_failure_window: Duration::from_secs(self.login_failure_window_secs),
            member_cache_bytes: self.member_cache_bytes,
            member_cache_ttl: Duration::from_secs(self.member_cache_ttl_secs.max(1)),
            user_limits: crate::chat::limits::UserLimitConfig {
                msgs_per_sec: self.max_msgs_per_user_per_sec,
                msgs_burst: self.msgs_burst_per_user,
                groups_created_per_hour: self.max_groups_created_per_user_per_hour,
                members_added_per_minute: self.max_members_added_per_minute,
            },
            max_devices_per_user: self.max_devices_per_user,
            max_ended_sessions: self.max_ended_sessions,
        }
    }

    /// Where Redis is, if anywhere: --redis-url or --redis-cluster-nodes.
    pub fn redis_target(&self) -> Result<Option<RedisTarget>, ConfigError> {
        RedisTarget::from_flags(
            self.redis_url.as_deref(),
            self.redis_cluster_nodes.as_deref(),
        )
        .map_err(ConfigError::Invalid)
    }

    /// Replicas an append must reach before its ack.
    pub fn replica_acks(&self) -> u32 {
        im_storage::redis_target::replica_acks(
            self.redis_replica_acks,
            self.redis_cluster_nodes.is_some(),
        )
    }

    /// Settings of the pipeline store, if Redis and MySQL are configured.
    pub fn pipeline(&self) -> Option<PipelineOptions> {
        Some(PipelineOptions {
            redis: self.redis_target().ok()??,
            replica_acks: self.replica_acks(),
            replica_timeout: Duration::from_millis(self.redis_replica_timeout_ms),
            mysql_url: self.mysql_url.clone()?,
            mysql_shards: self.mysql_shards.clone(),
            prefix: self.redis_prefix.clone(),
            streams: self.streams,
            append_lanes: self.append_lanes,
            dedup_window_secs: self.dedup_window_secs,
            recent_cache_len: self.recent_cache_len,
            recent_cache_ttl_secs: self.recent_cache_ttl_secs,
            redis_pool_size: self.redis_pool_size,
            mysql_pool_size: self.mysql_pool_size,
            ..PipelineOptions::default()
        })
    }

    /// Settings of the node's cluster membership (with Redis), given its
    /// node id.
    pub fn cluster(&self, node_id: String) -> Option<crate::cluster::ClusterConfig> {
        Some(crate::cluster::ClusterConfig {
            redis: self.redis_target().ok()??,
            prefix: self.redis_prefix.clone(),
            node_id,
            lease: Duration::from_secs(self.lease_secs),
            group_broadcast_members: self.group_broadcast_members,
            forward_queue_bytes: self.forward_queue_bytes,
        })
    }

    /// Settings of the embedded store.
    pub fn sqlite(&self) -> SqliteOptions {
        SqliteOptions {
            read_connections: self.sqlite_readers,
            write_queue: self.sqlite_write_queue,
            dedup_window: Duration::from_secs(self.dedup_window_secs.max(1)),
            dedup_capacity: self.sqlite_dedup_capacity,
            ..SqliteOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let c = Config::defaults();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert_eq!(c.admin_listen, None);
        c.validate().unwrap();
        let help = <Config as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for flag in [
            "--max-frame-bytes",
            "--auth-timeout-secs",
            "--max-outbound-bytes",
            "--reuse-port",
            "--admin-listen",
            "IM_ADMIN_LISTEN",
            "--proxy-protocol-from <CIDR,...>",
            "IM_PROXY_PROTOCOL_FROM",
            "--mysql-shards <URL,...>",
            "IM_MYSQL_SHARDS",
        ] {
            assert!(help.contains(flag), "{flag} missing from --help");
        }
        assert!(help.contains("[default: 65536]"));
        assert!(help.contains("IM_MAX_FRAME_BYTES"));
    }

    #[test]
    fn mysql_shards_are_a_list_that_needs_the_pipeline() {
        let pipeline = [
            "im-server",
            "--redis-url",
            "redis://r",
            "--mysql-url",
            "mysql://m/im",
        ];
        let c = Config::load_from(
            pipeline
                .iter()
                .copied()
                .chain(["--mysql-shards", "mysql://m/im,mysql://s1/im"]),
        )
        .unwrap();
        assert_eq!(c.mysql_shards, ["mysql://m/im", "mysql://s1/im"]);
        let options = c.pipeline().unwrap();
        assert_eq!(options.mysql_shards, c.mysql_shards);
        assert!(Config::defaults().pipeline().is_none());
        assert!(Config::load_from(pipeline).unwrap().mysql_shards.is_empty());
        let err = Config::load_from(["im-server", "--mysql-shards", "mysql://s1/im"]);
        assert!(matches!(err, Err(ConfigError::Invalid(_))), "{err:?}");
        let err = Config::load_from(
            pipeline
                .iter()
                .copied()
                .chain(["--mysql-shards", "mysql://s1/im,mysql://s1/im"]),
        );
        assert!(matches!(err, Err(ConfigError::Invalid(_))), "{err:?}");
    }

    #[test]
    fn file_values_apply_unless_a_flag_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "max-frame-bytes = 8192\nheartbeat-interval-secs = 5\nlisten = \"127.0.0.1:7100\"\n",
        )
        .unwrap();
        let c = Config::load_from([
            "im-server",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:7200",
            "--admin-listen",
            "127.0.0.1:9100",
        ])
        .unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.max_frame_bytes, 8192);
        assert_eq!(c.heartbeat_interval_secs, 5);
        assert_eq!(c.listen, "127.0.0.1:7200".parse().unwrap());
    }

    #[test]
    fn proxy_protocol_sources_are_a_list_from_the_flag_or_the_file() {
        let cidrs =
            |list: &[&str]| -> Vec<Cidr> { list.iter().map(|s| s.parse().unwrap()).collect() };
        assert!(Config::defaults().proxy_protocol_from.is_empty());
        assert!(Config::defaults().net().proxy_protocol_from.is_empty());
        let c = Config::load_from([
            "im-server",
            "--proxy-protocol-from",
            "10.0.0.0/8,127.0.0.1, ::1/128",
        ])
        .unwrap();
        let expected = cidrs(&["10.0.0.0/8", "127.0.0.1/32", "::1/128"]);
        assert_eq!(c.proxy_protocol_from, expected);
        assert_eq!(c.net().proxy_protocol_from, expected);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "proxy-protocol-from = [\"192.168.0.0/16\", \"fd00::1\"]\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let c = Config::load_from(["im-server", "--config", file]).unwrap();
        assert_eq!(
            c.proxy_protocol_from,
            cidrs(&["192.168.0.0/16", "fd00::1/128"])
        );
        let c = Config::load_from([
            "im-server",
            "--config",
            file,
            "--proxy-protocol-from",
            "10.1.0.0/16",
        ])
        .unwrap();
        assert_eq!(c.proxy_protocol_from, cidrs(&["10.1.0.0/16"]));
        std::fs::write(&path, "proxy-protocol-from = [\"10.0.0.0/33\"]\n").unwrap();
        assert!(Config::load_from(["im-server", "--config", file]).is_err());

        for bad in ["10.0.0.0/33", "10.0.0.0/8,nope", "10.0.0.0/8,"] {
            assert!(
                Config::try_parse_from(["im-server", "--proxy-protocol-from", bad]).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(&path, "no-such-setting = 1\n").unwrap();
        assert!(Config::load_from(["im-server", "--config", path.to_str().unwrap()]).is_err());
        std::fs::write(&path, "heartbeat-timeout-secs = 1\n").unwrap();
        assert!(matches!(
            Config::load_from(["im-server", "--config", path.to_str().unwrap()]),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn abuse_limits_have_public_defaults_file_keys_and_checked_bursts() {
        let c = Config::defaults();
        assert_eq!(
            c.chat().user_limits,
            crate::chat::limits::UserLimitConfig {
                msgs_per_sec: 20,
                msgs_burst: 50,
                groups_created_per_hour: 20,
                members_added_per_minute: 2000,
            }
        );
        let net = c.net();
        assert_eq!(net.max_requests_per_conn_per_sec, 100);
        assert_eq!(net.max_new_conns_per_addr_per_sec, 20);
        assert_eq!(net.max_conns_per_addr, 500);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.toml");
        std::fs::write(
            &path,
            "max-msgs-per-user-per-sec = 0\nmax-conns-per-addr = 7\n\
             max-members-added-per-minute = 9\n",
        )
        .unwrap();
        let c = Config::load_from(["im-server", "--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.chat().user_limits.msgs_per_sec, 0);
        assert_eq!(c.net().max_conns_per_addr, 7);
        assert_eq!(c.chat().user_limits.members_added_per_minute, 9);
        c.validate().unwrap();

        let c = Config::try_parse_from([
            "im-server",
            "--max-msgs-per-user-per-sec",
            "30",
            "--msgs-burst-per-user",
            "10",
        ])
        .unwrap();
        assert!(c.validate().is_err(), "a burst below the rate");
    }
}
