//! Client settings and login credentials: every limit and timeout the SDK
//! uses is a field of [`ClientConfig`], with its default documented there.

use std::collections::HashMap;
use std::time::Duration;

use crate::ClientError;
use crate::tls::Tls;

/// Settings of a [`Client`](crate::Client). Build one with
/// [`ClientConfig::new`] and the `with_*` helpers, or set fields directly.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address, `host:port`, or several nodes of one cluster
    /// separated by commas (`a:7000,b:7000,c:7000`): the client connects to
    /// one of them (starting at a random one) and, after a failure, moves
    /// on to the next. Default `127.0.0.1:7000`.
    pub server: String,
    /// Time limit for opening the TCP connection. Default 10 s.
    pub connect_timeout: Duration,
    /// Time limit for one request, including the wait for a connection
    /// while the client reconnects. Default 10 s.
    pub request_timeout: Duration,
    /// Overall time limit of [`Client::send`](crate::Client::send), across
    /// retries and reconnects. Default 60 s.
    pub send_timeout: Duration,
    /// Smallest reconnect backoff ceiling. Default 200 ms.
    pub reconnect_min: Duration,
    /// Largest reconnect backoff ceiling. Default 30 s.
    pub reconnect_max: Duration,
    /// Capacity of the event channel. When it is full the client stops
    /// reading the socket (see [`Events`](crate::Events)). Default 1024.
    pub event_buffer: usize,
    /// Capacity of the queue from API calls to the connection task; callers
    /// wait when it is full. Default 256.
    pub command_buffer: usize,
    /// Page size of `ListConversations` and `limit` of `Sync` requests (the
    /// server caps the latter at 500). Default 500.
    pub sync_page: u32,
    /// Catch up on every (re)connect by listing conversations and syncing
    /// those with messages newer than the local cursor. When false, only
    /// live pushes are delivered and a conversation without a cursor starts
    /// at the first message seen. Default true.
    pub catch_up: bool,
    /// Acknowledge delivered messages to the server (coalesced per
    /// conversation, at most one ack per conversation per `ack_interval`).
    /// Default true.
    pub auto_ack_delivered: bool,
    /// How often coalesced delivery acks are flushed. Default 500 ms.
    pub ack_interval: Duration,
    /// Highest seq the application already has per conversation id (for
    /// example restored from disk). Conversations not listed start at 0, so
    /// catch-up fetches their whole history. Default empty.
    pub cursors: HashMap<u64, u64>,
    /// How many out-of-order messages are buffered per conversation while a
    /// gap is fetched; beyond that the newest are dropped and fetched again
    /// later by sync. Default 1024.
    pub gap_buffer: usize,
    /// Largest frame accepted from the server. Default 64 KiB.
    pub max_frame_bytes: usize,
    /// Speak TLS to the server (which must listen for it, e.g. with
    /// `--tls-listen`). Default `None`: plain TCP.
    pub tls: Option<Tls>,
    /// Name of this device in the user's session list (at most 64 bytes).
    /// Default empty.
    pub device_name: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            server: "127.0.0.1:7000".to_owned(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            event_buffer: 1024,
            command_buffer: 256,
            sync_page: 500,
            catch_up: true,
            auto_ack_delivered: true,
            ack_interval: Duration::from_millis(500),
            cursors: HashMap::new(),
            gap_buffer: 1024,
            max_frame_bytes: im_proto::DEFAULT_MAX_FRAME_BYTES,
            tls: None,
            device_name: String::new(),
        }
    }
}

impl ClientConfig {
    /// Default settings for the server at `server` (`host:port`).
    pub fn new(server: impl Into<String>) -> Self {
        ClientConfig {
            server: server.into(),
            ..ClientConfig::default()
        }
    }

    /// Sets [`device_name`](Self::device_name).
    pub fn with_device_name(mut self, name: impl Into<String>) -> Self {
        self.device_name = name.into();
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`send_timeout`](Self::send_timeout).
    pub fn with_send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Sets the reconnect backoff range.
    pub fn with_reconnect(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Sets [`catch_up`](Self::catch_up).
    pub fn with_catch_up(mut self, catch_up: bool) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// Sets [`auto_ack_delivered`](Self::auto_ack_delivered).
    pub fn with_auto_ack(mut self, auto_ack: bool) -> Self {
        self.auto_ack_delivered = auto_ack;
        self
    }

    /// Sets [`cursors`](Self::cursors).
    pub fn with_cursors(mut self, cursors: HashMap<u64, u64>) -> Self {
        self.cursors = cursors;
        self
    }

    /// Sets [`tls`](Self::tls).
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`event_buffer`](Self::event_buffer).
    pub fn with_event_buffer(mut self, capacity: usize) -> Self {
        self.event_buffer = capacity;
        self
    }

    /// The server addresses, in the order they are tried.
    pub fn servers(&self) -> Vec<&str> {
        self.server
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Checks the settings before anything is started.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: &str| Err(ClientError::InvalidArgument(what.to_owned()));
        if self.servers().is_empty() {
            return bad("server address is empty");
        }
        if self.request_timeout.is_zero() || self.send_timeout.is_zero() {
            return bad("request_timeout and send_timeout must be positive");
        }
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout must be positive");
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return bad("need 0 < reconnect_min <= reconnect_max");
        }
        if self.event_buffer == 0 || self.command_buffer == 0 || self.gap_buffer == 0 {
            return bad("event_buffer, command_buffer and gap_buffer must be positive");
        }
        if self.sync_page == 0 {
            return bad("sync_page must be positive");
        }
        if self.ack_interval.is_zero() {
            return bad("ack_interval must be positive");
        }
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes must be at least 1024");
        }
        Ok(())
    }
}

/// How the client proves who it is.
#[derive(Clone)]
pub enum Credentials {
    /// Create the account on the first connection, then log in with the same
    /// password whenever the session token is refused.
    Register {
        /// 3 to 32 characters of `[A-Za-z0-9_.-]`.
        username: String,
        /// 8 to 128 bytes.
        password: String,
    },
    /// Log in; the password is kept to log in again if the token expires.
    Login {
        /// The account's username.
        username: String,
        /// The account's password.
        password: String,
    },
    /// Resume with a token from an earlier session; once it is refused the
    /// client stops (there is no password to fall back to).
    Token(String),
}

impl std::fmt::Debug for Credentials {
    // Hand-written so that passwords and tokens never end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Register { username, .. } => {
                write!(f, "Register {{ username: {username:?}, .. }}")
            }
            Credentials::Login { username, .. } => {
                write!(f, "Login {{ username: {username:?}, .. }}")
            }
            Credentials::Token(_) => f.write_str("Token(..)"),
        }
    }
}
