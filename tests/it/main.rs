//! End-to-end tests against real server nodes, one module per area.

mod accounts;
mod admin;
mod chat;
mod cluster;
mod crash;
mod lifecycle;
mod limits;
mod loadgen;
mod property;
mod protocol;
mod proxy_protocol;
mod redis_cluster;
mod resilience;
mod retention;
mod sessions;
mod shards;
mod store;
mod tls;
mod worker;
