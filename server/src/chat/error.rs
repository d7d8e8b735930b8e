//! Errors of the chat layer and their stable wire codes.

use im_proto::{ErrorCode, Frame};

use crate::store::StoreError;

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
    /// Too many failures; retry after this many seconds.
    #[error("too many failed attempts; retry in {0} s")]
    RateLimited(u64),
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
            ChatError::RateLimited(_) => ErrorCode::RateLimited,
            ChatError::InvalidToken => ErrorCode::InvalidToken,
            ChatError::Overloaded | ChatError::ResendUnverified => ErrorCode::Overloaded,
            ChatError::Internal => ErrorCode::Internal,
        }
    }

    /// The (non-fatal) error reply to request `request_id`.
    pub fn to_frame(&self, request_id: u64) -> Frame {
        Frame::error(request_id, self.code(), self.to_string(), false)
    }
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken => ChatError::UsernameTaken,
            StoreError::NotFound => ChatError::NotFound("no such user or group"),
            StoreError::NotMember => ChatError::Forbidden("not a member of this conversation"),
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
