//! Errors of the chat layer and their stable wire codes.

use im_proto::{ErrorCode, Frame};

use crate::store::StoreError;

/// `retry_after_ms` of an `OVERLOADED` reply: queues drain within a few
/// batches, so a short pause (clients add their own backoff and jitter).
pub const OVERLOADED_RETRY_MS: u32 = 200;
/// `retry_after_ms` of an `OVERLOADED` reply to a resend the store cannot
/// look up yet: the storage worker has to catch up, which takes longer.
pub const RESEND_UNVERIFIED_RETRY_MS: u32 = 1000;

/// Why a request failed; each maps to one wire [`ErrorCode`].
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// A field is missing, malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The user may not do this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The target does not exist.
    #[error("{0}")]
    NotFound(&'static str),
    /// Unknown username or wrong password.
    #[error("invalid username or password")]
    InvalidCredentials,
    /// Registration with a taken username.
    #[error("username already taken")]
    UsernameTaken,
    /// An abuse limit was hit; retry after `retry_after_ms` (0: waiting
    /// alone does not help).
    #[error("rate limited ({what}){}", retry_hint(*retry_after_ms))]
    RateLimited {
        /// Which limit (also the `limit` label of `im_rate_limited_total`).
        what: &'static str,
        /// Milliseconds until a retry can succeed.
        retry_after_ms: u32,
    },
    /// The resume token is malformed, forged or expired.
    #[error("invalid or expired token; log in again")]
    InvalidToken,
    /// Too much work queued; retry later.
    #[error("server overloaded; retry later")]
    Overloaded,
    /// A resend whose first attempt cannot be looked up yet (storage is
    /// behind); retry later.
    #[error("cannot tell yet whether the first attempt was stored; resend later")]
    ResendUnverified,
    /// An unexpected failure (details are logged, not sent).
    #[error("internal error")]
    Internal,
}

impl ChatError {
    /// Shorthand for [`ChatError::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        ChatError::InvalidArgument(message.into())
    }

    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ChatError::Forbidden(_) => ErrorCode::Forbidden,
            ChatError::NotFound(_) => ErrorCode::NotFound,
            ChatError::InvalidCredentials => ErrorCode::InvalidCredentials,
            ChatError::UsernameTaken => ErrorCode::UsernameTaken,
            ChatError::RateLimited { .. } => ErrorCode::RateLimited,
            ChatError::InvalidToken => ErrorCode::InvalidToken,
            ChatError::Overloaded | ChatError::ResendUnverified => ErrorCode::Overloaded,
            ChatError::Internal => ErrorCode::Internal,
        }
    }

    /// Milliseconds the client should wait before retrying, carried in
    /// `Error.retry_after_ms` (0 where waiting is not the remedy).
    pub fn retry_after_ms(&self) -> u32 {
        match self {
            ChatError::RateLimited { retry_after_ms, .. } => *retry_after_ms,
            ChatError::Overloaded => OVERLOADED_RETRY_MS,
            ChatError::ResendUnverified => RESEND_UNVERIFIED_RETRY_MS,
            _ => 0,
        }
    }

    /// The (non-fatal) error reply to request `request_id`.
    pub fn to_frame(&self, request_id: u64) -> Frame {
        Frame::error_retry(
            request_id,
            self.code(),
            self.to_string(),
            false,
            self.retry_after_ms(),
        )
    }
}

fn retry_hint(ms: u32) -> String {
    match ms {
        0 => "; waiting alone does not help".to_string(),
        ms => format!("; retry in {ms} ms"),
    }
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken => ChatError::UsernameTaken,
            StoreError::NotFound => ChatError::NotFound("no such user or group"),
            StoreError::NotMember => ChatError::Forbidden("not a member of this conversation"),
            StoreError::LimitExceeded(what) if what == crate::store::GROUPS_PER_USER_LIMIT => {
                ChatError::RateLimited {
                    what: super::limits::GROUPS_PER_USER,
                    retry_after_ms: 0,
                }
            }
            StoreError::LimitExceeded(what) => {
                ChatError::invalid(format!("limit exceeded: {what}"))
            }
            StoreError::Overloaded | StoreError::Closed => ChatError::Overloaded,
            StoreError::Busy(detail) => {
                tracing::warn!(%detail, "storage engine busy; answered OVERLOADED");
                ChatError::Overloaded
            }
            StoreError::Backend(detail) => {
                tracing::error!(%detail, "storage failure");
                ChatError::Internal
            }
        }
    }
}
