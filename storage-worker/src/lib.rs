//! The Redis Streams + MySQL storage pipeline of the im chat server.
//!
//! Server nodes append messages to Redis Streams (one atomic script per
//! batch: deduplicate, assign the conversation's next seq, XADD, keep a
//! recent-messages cache) and acknowledge; the storage worker consumes the
//! streams in batches into MySQL. This crate holds what both sides must
//! agree on, and the worker itself:
//!
//! - [`layout`]: Redis key names, stream sharding, the record format of a
//!   stored message, message ids, and the append script.
//! - [`redis_target`]: one Redis server or a Redis Cluster behind one
//!   connection type (pipelines split by slot on a cluster).
//! - [`script`]: Lua script calls that follow a cluster slot's migration
//!   (`-ASK`, `-TRYAGAIN`) and load the script on whichever node runs it.
//! - [`schema`]: the MySQL schema and its migrations, run at start-up by
//!   every process that uses the database.
//! - [`shards`]: which MySQL database holds a conversation's messages
//!   (`--mysql-shards`), and the pools of those databases.
//! - [`settings`]: how both binaries merge flags, `IM_*` variables and a
//!   TOML file into their typed configuration.
//! - [`retention`]: removing (or archiving) messages past the retention
//!   limit, as a prefix of each conversation, and the floors sync and
//!   history report.
//! - [`admin`]: the admin HTTP listener of both binaries (Prometheus
//!   metrics and a health check).
//! - [`worker`]: the consumer that moves stream entries into MySQL (one
//!   task per shard), started with a [`config::WorkerConfig`] and watched
//!   through [`stats`]. Its parts: [`batch`] (entries in hand and when to
//!   flush them), [`sql`] (what rows become in MySQL), [`cursors`]
//!   (members rows, read cursors and watermarks, coalesced over batches),
//!   [`stream`] (the consumer group, acknowledgements, dead letters,
//!   trimming), [`outage`] (MySQL shards that are down and the rows held
//!   back for them).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod batch;
pub mod config;
pub mod cursors;
pub mod layout;
pub mod outage;
pub mod redis_target;
pub mod retention;
pub mod schema;
pub mod script;
pub mod settings;
pub mod shards;
pub mod sql;
pub mod stats;
pub mod stream;
pub mod worker;

pub use config::WorkerConfig;
pub use stats::{ShardBacklog, WorkerStats, WorkerStatsSnapshot};
pub use worker::{Worker, WorkerError, WorkerHandle};
