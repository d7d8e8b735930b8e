//! The im chat server.
//!
//! - [`store`]: the storage trait and the embedded SQLite store.
#![forbid(unsafe_code)]

pub mod store;
