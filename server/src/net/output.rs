//! The output side of one connection, without I/O and without a clock of
//! its own: the frames waiting for the socket, the rule for pushes when
//! they pile up, and when the socket last took anything.
//!
//! The rules:
//! - Replies (and other frames the connection itself asked for) are always
//!   queued; the shard stops reading requests while the queue is over the
//!   limit, so they are bounded by the in-flight limit.
//! - A push is queued only while the queue is at most `limit` bytes with
//!   it. Past that the push is shed: it is not queued, its topic (the
//!   conversation, or presence) is remembered, and from then on every push
//!   is shed until the queue has drained to half the limit. Then a
//!   `SyncHint` naming what was shed goes out, and pushes flow again.
//!   Whatever was shed, the client gets back by syncing.
//! - A connection is only ever cut for not reading: when queued output has
//!   waited [`Output::stalled_since`] for longer than the slow-consumer
//!   timeout without the socket taking a byte.
//!
//! So a burst from another user costs a fast reader at most a sync, never
//! its connection, and a reader that stops costs the server at most
//! `limit` bytes of pushes plus its unanswered replies.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};
use im_proto::pb::{self, frame::Body};
use im_proto::{Frame, codec};

/// Distinct conversations a hint names at most; more shed conversations
/// make it a hint for all of them (an empty list).
pub(crate) const MAX_HINT_CONVERSATIONS: usize = 64;

/// What a push is about, so that a shed one can be named in the hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// A message or receipt of this conversation.
    Conversation(u64),
    /// A presence change.
    Presence,
    /// Anything: a shed one makes the hint name every conversation and
    /// presence.
    Everything,
}

/// What [`Output::offer_push`] did with a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued for the socket.
    Queued,
    /// Not queued: the connection will be told to sync instead.
    Shed,
}

/// Pushes shed since the last hint.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Missed {
    conversations: Vec<u64>,
    /// Too many distinct conversations to name.
    all: bool,
    presence: bool,
}

impl Missed {
    fn add(&mut self, topic: Topic) {
        match topic {
            Topic::Presence => self.presence = true,
            Topic::Everything => {
                self.presence = true;
                self.all = true;
                self.conversations = Vec::new();
            }
            Topic::Conversation(_) if self.all => {}
            Topic::Conversation(id) => {
                if !self.conversations.contains(&id) {
                    if self.conversations.len() < MAX_HINT_CONVERSATIONS {
                        self.conversations.push(id);
                    } else {
                        self.all = true;
                        self.conversations = Vec::new();
                    }
                }
            }
        }
    }

    fn hint(&mut self) -> pb::SyncHint {
        let mut conversations = std::mem::take(&mut self.conversations);
        if self.all {
            conversations.clear();
        }
        conversations.sort_unstable();
        let hint = pb::SyncHint {
            conversation_ids: conversations,
            presence: self.presence,
        };
        *self = Missed::default();
        hint
    }
}

/// Frames waiting for one connection's socket.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Encoded frames; the front one may be partly written already (it is
    /// advanced in place).
    frames: VecDeque<Bytes>,
    /// Sum of the lengths in `frames`.
    bytes: usize,
    /// Pushes are being shed and a hint is owed.
    shedding: bool,
    missed: Missed,
    /// Shard second since which queued output has waited without the
    /// socket taking a byte (meaningless while empty).
    waiting_since: u32,
}

impl Output {
    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing is queued and no hint is owed.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && !self.shedding
    }

    /// Whether frames wait for the socket.
    pub fn has_frames(&self) -> bool {
        !self.frames.is_empty()
    }

    /// Whether pushes are being shed (a hint is owed).
    #[cfg(test)]
    pub fn shedding(&self) -> bool {
        self.shedding
    }

    /// The frames in order, for a vectored write.
    pub fn frames(&self) -> impl Iterator<Item = &Bytes> {
        self.frames.iter()
    }

    /// Queues a frame that must not be dropped (a reply, an error before
    /// closing, a hint). `now` is the shard's clock in seconds.
    pub fn push_reply(&mut self, frame: Bytes, now: u32) {
        if self.frames.is_empty() {
            self.waiting_since = now;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Queues a push unless that would take the queue past `limit` bytes
    /// or pushes are already being shed; a shed push's topic is kept for
    /// the hint.
    pub fn offer_push(&mut self, frame: Bytes, topic: Topic, limit: usize, now: u32) -> Offer {
        if self.shedding || self.bytes + frame.len() > limit {
            self.shedding = true;
            self.missed.add(topic);
            return Offer::Shed;
        }
        self.push_reply(frame, now);
        Offer::Queued
    }

    /// The socket took `n` bytes (at most [`Output::bytes`]): drops
    /// finished frames and returns how many.
    pub fn written(&mut self, mut n: usize, now: u32) -> u64 {
        debug_assert!(n <= self.bytes);
        self.bytes -= n.min(self.bytes);
        if n > 0 {
            self.waiting_since = now;
        }
        let mut frames = 0;
        while n > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.frames.pop_front();
                frames += 1;
            } else {
                front.advance(n);
                n = 0;
            }
        }
        frames
    }

    /// The hint owed, once the queue has drained to half of `limit`: it is
    /// queued here (as the next frame) and its encoded length returned,
    /// and pushes are taken again from now on.
    pub fn release_hint(&mut self, limit: usize, now: u32) -> Option<usize> {
        if !self.shedding || self.bytes > limit / 2 {
            return None;
        }
        self.shedding = false;
        let frame = codec::encode_to_bytes(&Frame::new(0, Body::SyncHint(self.missed.hint())));
        let len = frame.len();
        self.push_reply(frame, now);
        Some(len)
    }

    /// Since when queued output has waited for the socket, if any does.
    pub fn stalled_since(&self) -> Option<u32> {
        self.has_frames().then_some(self.waiting_since)
    }

    /// Keeps only the front frame (which may be partly written) and
    /// forgets any hint: the connection is closing.
    pub fn keep_front_only(&mut self) {
        self.frames.truncate(1);
        self.bytes = self.frames.front().map_or(0, Bytes::len);
        self.shedding = false;
        self.missed = Missed::default();
    }

    /// Empties the queue but keeps modest capacity for reuse.
    pub fn reset(&mut self) {
        self.frames.clear();
        if self.frames.capacity() > 64 {
            self.frames = VecDeque::new();
        }
        self.bytes = 0;
        self.shedding = false;
        self.missed = Missed::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn frame(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    fn decode_hint(out: &Output) -> pb::SyncHint {
        let last = out.frames().last().expect("a frame");
        let frame = Frame::decode(&last[im_proto::HEADER_LEN..]).expect("decodes");
        assert_eq!(frame.request_id, 0);
        match frame.body {
            Some(Body::SyncHint(h)) => h,
            other => panic!("not a hint: {other:?}"),
        }
    }

    #[test]
    fn pushes_past_the_limit_are_shed_until_half_drained_then_hinted() {
        let mut out = Output::default();
        let limit = 1000;
        assert_eq!(
            out.offer_push(frame(600), Topic::Conversation(5), limit, 0),
            Offer::Queued
        );
        assert_eq!(
            out.offer_push(frame(600), Topic::Conversation(6), limit, 0),
            Offer::Shed
        );
        // Once shedding, even a push that would fit is shed, so the hint
        // covers everything after the first shed one.
        assert_eq!(
            out.offer_push(frame(10), Topic::Conversation(7), limit, 0),
            Offer::Shed
        );
        assert_eq!(
            out.offer_push(frame(10), Topic::Presence, limit, 0),
            Offer::Shed
        );
        assert_eq!(
            out.offer_push(frame(10), Topic::Conversation(6), limit, 0),
            Offer::Shed
        );
        // Replies are never shed.
        out.push_reply(frame(700), 0);
        assert_eq!(out.bytes(), 1300);
        assert_eq!(out.release_hint(limit, 0), None);
        assert_eq!(out.written(800, 1), 1);
        assert_eq!(out.bytes(), 500);
        let len = out.release_hint(limit, 1).expect("drained to half");
        assert_eq!(out.bytes(), 500 + len);
        let hint = decode_hint(&out);
        assert_eq!(hint.conversation_ids, [6, 7]);
        assert!(hint.presence);
        assert!(!out.shedding());
        assert_eq!(
            out.offer_push(frame(10), Topic::Conversation(8), limit, 1),
            Offer::Queued
        );
    }

    #[test]
    fn too_many_conversations_make_a_hint_for_all() {
        let mut out = Output::default();
        out.push_reply(frame(100), 0);
        for c in 0..=MAX_HINT_CONVERSATIONS as u64 {
            assert_eq!(
                out.offer_push(frame(10), Topic::Conversation(c + 1), 50, 0),
                Offer::Shed
            );
        }
        out.written(100, 0);
        out.release_hint(50, 0).unwrap();
        let hint = decode_hint(&out);
        assert!(hint.conversation_ids.is_empty(), "empty means all");
        assert!(!hint.presence);
    }

    #[test]
    fn stalls_are_measured_from_the_last_progress() {
        let mut out = Output::default();
        assert_eq!(out.stalled_since(), None);
        out.push_reply(frame(100), 10);
        out.push_reply(frame(100), 12);
        assert_eq!(out.stalled_since(), Some(10));
        out.written(0, 20);
        assert_eq!(
            out.stalled_since(),
            Some(10),
            "no byte taken is no progress"
        );
        out.written(50, 21);
        assert_eq!(out.stalled_since(), Some(21));
        out.written(150, 22);
        assert_eq!(out.stalled_since(), None);
        assert!(out.is_empty());
    }

    #[test]
    fn partial_writes_advance_the_front_frame() {
        let mut out = Output::default();
        out.push_reply(Bytes::from_static(b"abcdef"), 0);
        out.push_reply(Bytes::from_static(b"gh"), 0);
        assert_eq!(out.written(4, 0), 0);
        assert_eq!(out.frames().next().unwrap().as_ref(), b"ef");
        assert_eq!(out.written(3, 0), 1);
        assert_eq!(out.frames().next().unwrap().as_ref(), b"h");
        out.keep_front_only();
        assert_eq!(out.bytes(), 1);
    }
}
