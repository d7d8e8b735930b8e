//! The im chat server.
//!
//! - [`net`]: mio event-loop shards that own sockets, framing and limits.
//! - [`chat`]: the chat logic (auth, sends, fan-out, sync, groups, presence).
//! - [`cluster`]: many nodes as one service (leases, routes, cross-node
//!   pushes over Redis).
//! - [`store`]: the storage trait and the embedded SQLite store.
//! - [`config`]: flags, `IM_*` variables and TOML, validated.
//! - [`server`]: assembly of one node and its graceful shutdown.
//! - [`metrics`]: what a node reports on its admin listener.
#![forbid(unsafe_code)]

pub mod chat;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod net;
pub mod server;
pub mod store;
