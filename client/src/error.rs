//! The SDK's error type: everything a [`Client`](crate::Client) call can
//! fail with, from transport failures to error replies of the server.

use im_proto::{CodecError, ErrorCode};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be opened or broke.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("codec error: {0}")]
    Codec(#[from] CodecError),
    /// The server answered the request with an `Error` frame.
    #[error("server error {code:?}: {message}")]
    Server {
        /// The stable error code (match on this).
        code: ErrorCode,
        /// Human-readable detail from the server.
        message: String,
        /// How long the server asks to wait before retrying
        /// (`Error.retry_after_ms`, sent with `RATE_LIMITED` and
        /// `OVERLOADED`); `None` when it did not say.
        retry_after: Option<std::time::Duration>,
    },
    /// Register, login or resume was refused and cannot succeed by retrying
    /// (wrong password, username taken, expired token without a password).
    #[error("authentication failed ({code:?}): {message}")]
    AuthFailed {
        /// The server's error code.
        code: ErrorCode,
        /// Human-readable detail from the server.
        message: String,
    },
    /// No reply within the configured timeout.
    #[error("request timed out")]
    Timeout,
    /// The connection dropped before the reply arrived. The client
    /// reconnects by itself; the request may or may not have been applied.
    #[error("disconnected from the server")]
    Disconnected,
    /// The client was closed, or stopped after a permanent failure.
    #[error("client is closed")]
    Closed,
    /// The server replied with a body that does not answer the request.
    #[error("unexpected reply from the server: {0}")]
    UnexpectedReply(String),
    /// The call was refused locally before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl ClientError {
    /// The server's error code, for [`ClientError::Server`] and
    /// [`ClientError::AuthFailed`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::AuthFailed { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// How long the server asked to wait before retrying, if it said
    /// (`RATE_LIMITED` and `OVERLOADED` replies carry it).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ClientError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether repeating the same request later may succeed (sends are
    /// idempotent by `client_msg_id`, so [`Client::send`](crate::Client::send)
    /// retries exactly these).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::Overloaded | ErrorCode::Internal | ErrorCode::RateLimited
            ),
            ClientError::Io(_)
            | ClientError::Codec(_)
            | ClientError::Timeout
            | ClientError::Disconnected => true,
            _ => false,
        }
    }

    /// Builds the error for an `Error` frame received in reply to a request.
    pub(crate) fn from_wire(err: &im_proto::pb::Error) -> Self {
        ClientError::Server {
            code: error_code(err.code),
            message: err.message.clone(),
            retry_after: (err.retry_after_ms > 0)
                .then(|| std::time::Duration::from_millis(u64::from(err.retry_after_ms))),
        }
    }
}

/// Decodes a wire error code; unknown numbers (a newer server) map to
/// `Unspecified` rather than failing.
pub(crate) fn error_code(raw: i32) -> ErrorCode {
    ErrorCode::try_from(raw).unwrap_or(ErrorCode::Unspecified)
}
