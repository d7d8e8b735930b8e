//! The im chat server.
//!
//! - [`net`]: mio event-loop shards that own sockets, framing and limits.
//! - [`chat`]: the chat logic (auth, sends, fan-out, sync, groups, presence).
//! - [`store`]: the storage trait and the embedded SQLite store.
#![forbid(unsafe_code)]

pub mod chat;
pub mod net;
pub mod store;
