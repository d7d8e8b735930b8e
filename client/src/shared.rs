//! State shared between the [`Client`](crate::Client) handles, the
//! connection task and the catch-up task: the request queue, the session,
//! the delivery cursors and the link state, plus the one function through
//! which every request travels ([`Shared::call`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use im_proto::pb::{self, frame::Body};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout_at};

use crate::delivery::Delivery;
use crate::{ClientConfig, ClientError};

/// The logged-in session, refreshed on every (re)authentication.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Session {
    /// The logged-in user.
    pub user_id: u64,
    /// Their username.
    pub username: String,
    /// The latest session token (valid for `ResumeRequest`).
    pub token: String,
    /// When `token` expires, in milliseconds since the Unix epoch.
    pub token_expires_at_ms: i64,
    /// The server's id of this login (kept across reconnects; see
    /// [`Client::sessions`](crate::Client::sessions)).
    pub session_id: u64,
}

impl std::fmt::Debug for Session {
    // The token is a credential: keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user_id", &self.user_id)
            .field("username", &self.username)
            .field("token_expires_at_ms", &self.token_expires_at_ms)
            .field("session_id", &self.session_id)
            .finish_non_exhaustive()
    }
}

impl From<&pb::AuthOk> for Session {
    fn from(ok: &pb::AuthOk) -> Self {
        Session {
            user_id: ok.user_id,
            username: ok.username.clone(),
            token: ok.token.clone(),
            token_expires_at_ms: ok.token_expires_at_ms,
            session_id: ok.session_id,
        }
    }
}

/// Where the connection task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    /// Between connections: backing off, connecting or authenticating.
    Connecting,
    /// Authenticated connection number `generation`; catch-up running.
    Up { generation: u64 },
    /// Connection `generation` has caught up.
    Ready { generation: u64 },
    /// Closed by the application or stopped for good.
    Closed,
}

/// A request on its way to the connection task.
pub(crate) struct Call {
    pub(crate) body: Body,
    pub(crate) reply: oneshot::Sender<Result<Body, ClientError>>,
}

pub(crate) struct Shared {
    pub(crate) config: ClientConfig,
    pub(crate) calls: mpsc::Sender<Call>,
    pub(crate) link: watch::Sender<Link>,
    // The mutexes below guard short, await-free sections (a copy, a few map
    // updates), so std mutexes are cheaper than async ones.
    pub(crate) session: Mutex<Session>,
    pub(crate) delivery: Mutex<Delivery>,
    /// The presence subscription to renew after every reconnect.
    pub(crate) presence: Mutex<Vec<u64>>,
    request_ids: AtomicU64,
}

impl Shared {
    pub(crate) fn new(
        config: ClientConfig,
        calls: mpsc::Sender<Call>,
        session: Session,
        first_request_id: u64,
    ) -> Self {
        let delivery = Delivery::new(&config.cursors, config.gap_buffer, !config.catch_up);
        Shared {
            calls,
            link: watch::Sender::new(Link::Connecting),
            session: Mutex::new(session),
            delivery: Mutex::new(delivery),
            presence: Mutex::new(Vec::new()),
            request_ids: AtomicU64::new(first_request_id.max(1)),
            config,
        }
    }

    /// A fresh, non-zero request id (unique for the client's lifetime, so a
    /// late reply can never be mistaken for the answer to a newer request).
    pub(crate) fn next_request_id(&self) -> u64 {
        self.request_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `body` as a request and waits for the reply, all within
    /// `limit` (which includes waiting for a connection while the client
    /// reconnects). An `Error` reply becomes [`ClientError::Server`].
    pub(crate) async fn call(&self, body: Body, limit: Duration) -> Result<Body, ClientError> {
        let deadline = Instant::now() + limit;
        let mut link = self.link.subscribe();
        let reply = timeout_at(deadline, async {
            let state = *link
                .wait_for(|l| !matches!(l, Link::Connecting))
                .await
                .map_err(|_| ClientError::Closed)?;
            if state == Link::Closed {
                return Err(ClientError::Closed);
            }
            let (tx, rx) = oneshot::channel();
            self.calls
                .send(Call { body, reply: tx })
                .await
                .map_err(|_| ClientError::Closed)?;
            // The connection task drops the sender when the connection is
            // lost with the request outstanding.
            rx.await.map_err(|_| ClientError::Disconnected)?
        })
        .await
        .map_err(|_| ClientError::Timeout)??;
        match reply {
            Body::Error(err) => Err(ClientError::from_wire(&err)),
            body => Ok(body),
        }
    }

    /// Waits until the link is ready (caught up) or closed; false if closed.
    pub(crate) async fn wait_ready(&self) -> bool {
        let mut link = self.link.subscribe();
        match link
            .wait_for(|l| matches!(l, Link::Ready { .. } | Link::Closed))
            .await
        {
            Ok(state) => *state != Link::Closed,
            Err(_) => false,
        }
    }
}

/// Locks a mutex, ignoring poisoning: the guarded state stays consistent
/// because no section can panic halfway through an update.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
