//! Wire protocol of the im chat server.
//!
//! This crate owns everything about bytes on the wire and nothing about
//! sockets: it does no I/O, so the server's event loops, the async client
//! SDK and the load generator all share one definition.
//!
//! - [`pb`]: the Protobuf messages generated from `proto/im/v1/im.proto`.
//! - [`cluster_pb`]: what server nodes send each other
//!   (`proto/im/cluster/v1/cluster.proto`).
//! - [`codec`]: the length-prefixed framing (check, then parse), including a
//!   [`tokio_util::codec`] adapter for async callers.
//! - [`ids`]: how conversation ids are derived from user and group ids.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod ids;

/// Generated Protobuf types of package `im.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/im.v1.rs"));
}

/// Generated Protobuf types of package `im.cluster.v1`: messages between
/// the server nodes of a cluster (never on a client connection).
#[allow(missing_docs, clippy::all)]
pub mod cluster_pb {
    include!(concat!(env!("OUT_DIR"), "/im.cluster.v1.rs"));
}

pub use codec::{CodecError, DEFAULT_MAX_FRAME_BYTES, FrameCodec, HEADER_LEN};
pub use ids::ConversationId;
pub use pb::frame::Body;
pub use pb::{ErrorCode, Frame};

/// Milliseconds since the Unix epoch, the unit of every `*_ms` time field.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Frame {
    /// A frame holding `body` in reply to (or, with 0, independent of) a
    /// request.
    pub fn new(request_id: u64, body: Body) -> Self {
        Frame {
            request_id,
            body: Some(body),
        }
    }

    /// An error frame.
    pub fn error(
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        fatal: bool,
    ) -> Self {
        Frame::new(
            request_id,
            Body::Error(pb::Error {
                code: code as i32,
                message: message.into(),
                fatal,
                retry_after_ms: 0,
            }),
        )
    }

    /// An error frame telling the client to retry after `retry_after_ms`
    /// (for `RATE_LIMITED` and `OVERLOADED`).
    pub fn error_retry(
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        fatal: bool,
        retry_after_ms: u32,
    ) -> Self {
        let mut frame = Frame::error(request_id, code, message, fatal);
        if let Some(Body::Error(e)) = frame.body.as_mut() {
            e.retry_after_ms = retry_after_ms;
        }
        frame
    }
}
