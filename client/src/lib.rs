//! Async client SDK for the im chat server: what a mobile app, an
//! end-to-end test or the `im-chat` command line builds on.
//!
//! [`Client::connect`] authenticates and hands the connection to a
//! background task, which from then on keeps it alive (heartbeats,
//! dead-peer detection), reconnects with jittered exponential backoff,
//! resumes the session with the latest token, renews the presence
//! subscription and catches up by sync. The application calls typed
//! request methods on the cheap-to-clone [`Client`] and reads [`Events`].
//!
//! Messages reach the application exactly once per `(conversation, seq)`
//! and in seq order within each conversation, whether they arrive as live
//! pushes, duplicated, out of order, or from sync.
//!
//! Guarantees and limits worth knowing:
//! - [`Client::send`] retries with the same `client_msg_id` until it gets
//!   an ack or [`ClientConfig::send_timeout`] runs out; after a lost
//!   connection it resends once the next connection has caught up. A send
//!   whose future is dropped is not resent.
//! - Every request is bounded by [`ClientConfig::request_timeout`], which
//!   includes waiting for a connection while the client reconnects.
//! - The event channel is bounded; a stalled reader stalls the socket, and
//!   the client recovers what the server skipped meanwhile by syncing
//!   after the server's `SyncHint`, or after reconnecting (see [`Events`]).
//! - Tests can wait for [`Client::wait_ready`] (catch-up done), turn
//!   catch-up or delivery acks off in [`ClientConfig`], and send arbitrary
//!   request bodies with [`Client::request`].
//!
//! Modules:
//! - [`config`] holds [`ClientConfig`] (every limit and timeout) and
//!   [`Credentials`].
//! - [`error`] holds the [`ClientError`] type.
//! - [`event`] holds [`Event`] and the bounded [`Events`] channel.
//! - `client`: the [`Client`] handle and its request methods.
//! - `driver`: the connection task (socket, request matching, heartbeat,
//!   reconnect).
//! - `conn`: opening a connection and the authentication handshake.
//! - [`tls`]: [`Tls`], TLS to the server (system roots or a private CA,
//!   ALPN `im/1`, session resumption); set [`ClientConfig::tls`].
//! - `delivery`: the exactly-once, in-order delivery state (no I/O).
//! - `sync`: catch-up after a (re)connect.
//! - `backoff`: exponential backoff with full jitter.
//!
//! ```no_run
//! use im_client::{Client, ClientConfig, Credentials, Event, Target};
//!
//! # async fn demo() -> Result<(), im_client::ClientError> {
//! let credentials = Credentials::Login {
//!     username: "alice".into(),
//!     password: "correct horse".into(),
//! };
//! let (client, mut events) = Client::connect(ClientConfig::new("127.0.0.1:7000"), credentials).await?;
//! let bob = client.user_id_of("bob").await?.expect("bob exists");
//! let ack = client.send_text(Target::User(bob), "hi").await?;
//! println!("stored as seq {} of conversation {}", ack.seq, ack.conversation_id);
//! while let Some(event) = events.next().await {
//!     if let Event::Message(message) = event {
//!         println!("{message:?}");
//!     }
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod client;
pub mod config;
mod conn;
mod delivery;
mod driver;
pub mod error;
pub mod event;
mod shared;
mod sync;
pub mod tls;

#[cfg(test)]
mod tests;

pub use client::{Client, MAX_CLIENT_MSG_ID, Target, new_client_msg_id};
pub use config::{ClientConfig, Credentials};
pub use error::ClientError;
pub use event::{Event, Events};
pub use im_proto::{self, ConversationId, ErrorCode, pb};
pub use shared::Session;
pub use tls::Tls;
