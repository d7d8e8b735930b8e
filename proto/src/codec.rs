//! Length-prefixed framing: a 4-byte big-endian length N, then N bytes of
//! one Protobuf [`Frame`].
//!
//! Decoding is check-then-parse: [`check`] looks only at the header, refuses
//! an oversized length before any allocation and reports an incomplete frame
//! as `Ok(None)`; only then does [`decode`] run the Protobuf parser. Nothing
//! here touches a socket; callers own their buffers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::pb::{ErrorCode, Frame};

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Default maximum frame size (the length prefix value), 64 KiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;

/// Why bytes could not be turned into a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The length prefix exceeds the maximum frame size.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Length announced by the prefix.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The payload is not a valid `Frame`.
    #[error("undecodable frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// An I/O error from the transport (only from the tokio adapter).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// The wire error code to report for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            CodecError::Malformed(_) | CodecError::Truncated => ErrorCode::BadFrame,
            CodecError::Io(_) => ErrorCode::Internal,
        }
    }
}

/// Checks the header at the start of `src`. Returns the total length of the
/// first frame (header included) once all of it is in `src`, `Ok(None)` if
/// more bytes are needed, or [`CodecError::TooLarge`] as soon as the header
/// announces more than `max` bytes.
pub fn check(src: &[u8], max: usize) -> Result<Option<usize>, CodecError> {
    let Some(header) = src.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*header) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    let total = HEADER_LEN + len;
    Ok((src.len() >= total).then_some(total))
}

/// Decodes the first frame of `src`. On success returns the frame and the
/// number of bytes it used, which the caller then consumes.
pub fn decode(src: &[u8], max: usize) -> Result<Option<(Frame, usize)>, CodecError> {
    match check(src, max)? {
        None => Ok(None),
        Some(total) => {
            let frame = Frame::decode(&src[HEADER_LEN..total])?;
            Ok(Some((frame, total)))
        }
    }
}

/// Appends `frame`, length prefix included, to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    let len = frame.encoded_len();
    dst.reserve(HEADER_LEN + len);
    dst.put_u32(len as u32);
    // Cannot fail: the capacity was reserved above.
    frame
        .encode(dst)
        .expect("BytesMut grows to fit the encoded frame");
}

/// Encodes `frame`, length prefix included, into a fresh buffer that can be
/// shared among many recipients without copying.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + frame.encoded_len());
    encode(frame, &mut buf);
    buf.freeze()
}

/// [`tokio_util::codec`] adapter for async callers (the SDK, the load
/// generator). Decoding applies the same size limit as [`check`].
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl FrameCodec {
    /// A codec that refuses frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { max_frame_bytes }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match decode(src, self.max_frame_bytes)? {
            Some((frame, used)) => {
                src.advance(used);
                Ok(Some(frame))
            }
            None => {
                if src.len() >= HEADER_LEN {
                    // The header passed `check`, so this reservation is bounded.
                    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
                    src.reserve(HEADER_LEN + len - src.len());
                }
                Ok(None)
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode(frame, dst);
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode(&frame, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, frame::Body};
    use proptest::prelude::*;

    const MAX: usize = 1024;

    fn text_frame(request_id: u64, text: String) -> Frame {
        Frame::new(
            request_id,
            Body::Send(pb::SendRequest {
                target: Some(pb::send_request::Target::ToUser(42)),
                client_msg_id: format!("c{request_id}"),
                content: Some(pb::Content {
                    kind: Some(pb::content::Kind::Text(pb::Text { text })),
                }),
                resend: false,
            }),
        )
    }

    /// Feeds `bytes` to a decoder in the given chunk sizes and collects what
    /// comes out, stopping at the first error.
    fn decode_chunked(bytes: &[u8], chunks: &[usize]) -> (Vec<Frame>, Option<CodecError>) {
        let mut codec = FrameCodec::new(MAX);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut rest = bytes;
        let mut sizes = chunks.iter().copied().cycle();
        while !rest.is_empty() {
            let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e)),
                }
            }
        }
        match codec.decode_eof(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => {}
            Err(e) => return (frames, Some(e)),
        }
        (frames, None)
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let header = ((MAX + 1) as u32).to_be_bytes();
        let err = check(&header, MAX).unwrap_err();
        assert!(matches!(err, CodecError::TooLarge { len, max } if len == MAX + 1 && max == MAX));
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        // A maximal length is fine and merely incomplete.
        assert!(check(&(MAX as u32).to_be_bytes(), MAX).unwrap().is_none());
    }

    #[test]
    fn incomplete_header_and_body_need_more() {
        let bytes = encode_to_bytes(&text_frame(1, "hello".into()));
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], MAX).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        let (frame, used) = decode(&bytes, MAX).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame, text_frame(1, "hello".into()));
    }

    #[test]
    fn garbage_payload_is_bad_frame() {
        let mut bytes = vec![0, 0, 0, 3];
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = decode(&bytes, MAX).unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadFrame);
    }

    #[test]
    fn eof_mid_frame_is_truncated() {
        let bytes = encode_to_bytes(&text_frame(1, "x".into()));
        let (frames, err) = decode_chunked(&bytes[..bytes.len() - 1], &[]);
        assert!(frames.is_empty());
        assert!(matches!(err, Some(CodecError::Truncated)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any sequence of valid frames, split at arbitrary points, decodes
        /// back to the same frames in order.
        #[test]
        fn split_stream_round_trips(
            texts in prop::collection::vec(".{0,200}", 1..8),
            chunks in prop::collection::vec(1usize..64, 0..16),
        ) {
            let frames: Vec<Frame> = texts
                .into_iter()
                .enumerate()
                .map(|(i, t)| text_frame(i as u64 + 1, t))
                .collect();
            let mut wire = BytesMut::new();
            for f in &frames {
                encode(f, &mut wire);
            }
            let (decoded, err) = decode_chunked(&wire, &chunks);
            prop_assert!(err.is_none(), "unexpected error {:?}", err);
            prop_assert_eq!(decoded, frames);
        }

        /// Random bytes never panic the decoder and never make it allocate
        /// for a length above the limit: every outcome is a frame, a request
        /// for more bytes, or an error.
        #[test]
        fn random_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..2048),
            chunks in prop::collection::vec(1usize..128, 0..8),
        ) {
            let (frames, err) = decode_chunked(&bytes, &chunks);
            if let Some(CodecError::TooLarge { len, max }) = err {
                prop_assert!(len > max);
            }
            prop_assert!(frames.len() <= bytes.len() / HEADER_LEN);
        }

        /// Flipping bytes of a valid stream yields frames, an error or a
        /// truncation, never a panic; frames before the damage survive.
        #[test]
        fn corrupted_stream_keeps_the_prefix(
            texts in prop::collection::vec(".{0,64}", 2..6),
            flip_at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let frames: Vec<Frame> = texts
                .into_iter()
                .enumerate()
                .map(|(i, t)| text_frame(i as u64 + 1, t))
                .collect();
            let mut wire = BytesMut::new();
            let mut ends = Vec::new();
            for f in &frames {
                encode(f, &mut wire);
                ends.push(wire.len());
            }
            let pos = flip_at.index(wire.len());
            wire[pos] ^= flip;
            let intact = ends.iter().filter(|&&end| end <= pos).count();
            let (decoded, _err) = decode_chunked(&wire, &[7]);
            prop_assert!(decoded.len() >= intact);
            prop_assert_eq!(&decoded[..intact], &frames[..intact]);
        }
    }
}
