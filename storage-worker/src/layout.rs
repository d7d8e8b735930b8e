//! How messages and their indexes are laid out in Redis.
//!
//! Messages spread over `streams` stream shards by conversation, so one
//! stream never caps throughput and each conversation stays ordered. Every
//! key an append touches carries its shard's hash tag (`{s7}`), so the
//! append script works unchanged on Redis Cluster, and every script names
//! every key it touches in `KEYS` (none derives a key name it was not
//! given), so that while a shard's slot moves between cluster masters a
//! call runs where all its keys are, or is answered `-ASK`/`-TRYAGAIN`
//! without running. Per shard:
//!
//! | key | type | what |
//! |---|---|---|
//! | `P:{sN}:stream` | stream | one entry per append call: field `m` repeated, one record per message, in order |
//! | `P:{sN}:seq` | hash | conversation → last seq + 1 (so a missing counter is told apart from a new one); `#t` → the shard clock's last tick; `#r` → the replication id of the Redis primary that last checked the counters against MySQL; `#w` → bumped by calls that answer only duplicates (so a `WAIT` after them covers the originals) |
//! | `P:{sN}:dedup:B` | hash | `conv:sender:client_msg_id` → `seq:tick:time`, bucket B of the dedup window (buckets follow the shard clock: [`dedup_bucket`]) |
//! | `P:{sN}:calls` | hash | append lane token → `call:time:replies` of its last call that stored something, so a call sent again is answered, not run again; `#` a marker |
//! | `P:{sN}:recent:C` | list | newest records of conversation C, contiguous in seq |
//! | `P:{sN}:stored` | hash | conversation → highest seq the worker has stored in MySQL; `#w` → bumped before the worker's `WAIT` |
//! | `P:{sN}:members:C` | set | member ids of group conversation C, plus `0` as a marker |
//! | `P:{sN}:mver:C` | string | version of C's membership, bumped on every change |
//! | `P:{sN}:dead` | stream | entries that kept failing (dead letters) |
//!
//! Per user (hash tag `{uU}`): `P:{uU}:direct` (set of direct conversations
//! not yet known to MySQL) and `P:{uU}:delivered` (hash: conversation →
//! delivered cursor). Global: `P:users` (bitmap of existing user ids).
//!
//! A *record* is `"<seq>:<tick>:"` followed by a Protobuf `Message` without
//! its `seq` and `message_id`; the script prepends the first two, which it
//! assigns. Message ids are the shard and the tick of the shard's clock the
//! message took (see [`message_id`]).

use im_proto::pb;
use prost::Message as _;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "im";
/// Default number of stream shards.
pub const DEFAULT_STREAMS: u32 = 16;
/// Largest number of stream shards (shard numbers take 10 bits of a
/// message id).
pub const MAX_STREAMS: u32 = 1024;
/// Default consumer group of storage workers.
pub const STORAGE_GROUP: &str = "storage";
/// Field of a stream entry that holds the record.
pub const RECORD_FIELD: &str = "m";
/// Marker member of every cached member set, so an empty group still has a
/// set (user ids start at 1).
pub const MEMBERS_MARKER: &str = "0";
/// Epoch of message ids: 2024-01-01T00:00:00Z in Unix milliseconds.
pub const MESSAGE_ID_EPOCH_MS: i64 = 1_704_067_200_000;

/// The append script (see the comments at its top for its arguments).
pub const APPEND_SCRIPT: &str = include_str!("append.lua");

/// Reads records with seq in `(ARGV[1], ARGV[2]]`, at most `ARGV[3]`, oldest
/// first, from a recent-cache list (`KEYS[1]`): the list is contiguous in
/// seq, so its first record's seq turns seqs into indexes. Flagged as not
/// writing, so that it also runs where writes wait (a `CLIENT PAUSE
/// WRITE`, a replica).
pub const RECENT_RANGE_SCRIPT: &str = r#"#!lua flags=no-writes
local first = redis.call("LINDEX", KEYS[1], 0)
if not first then return {} end
local f = tonumber(string.match(first, "^(%d+):"))
if not f then return {} end
local lo = math.max(tonumber(ARGV[1]) + 1, f)
local hi = math.min(tonumber(ARGV[2]), lo + tonumber(ARGV[3]) - 1)
if hi < lo then return {} end
return redis.call("LRANGE", KEYS[1], lo - f, hi - f)
"#;

/// Key names for one deployment: a prefix and a number of stream shards.
/// Every process of a deployment must use the same values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
    streams: u32,
}

impl Layout {
    /// A layout with `streams` shards (clamped to `1..=MAX_STREAMS`) under
    /// `prefix`.
    pub fn new(prefix: impl Into<String>, streams: u32) -> Self {
        Layout {
            prefix: prefix.into(),
            streams: streams.clamp(1, MAX_STREAMS),
        }
    }

    /// Number of stream shards.
    pub fn streams(&self) -> u32 {
        self.streams
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The shard a conversation's messages go to.
    pub fn shard_of(&self, conversation: u64) -> u32 {
        // The murmur3 finalizer: every bit of the id affects the result.
        let mut x = conversation;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^= x >> 33;
        (x % u64::from(self.streams)) as u32
    }

    fn shard_key(&self, shard: u32, suffix: &str) -> String {
        format!("{}:{{s{shard}}}:{suffix}", self.prefix)
    }

    /// The stream of a shard.
    pub fn stream_key(&self, shard: u32) -> String {
        self.shard_key(shard, "stream")
    }

    /// Conversation → last seq + 1 (and the shard clock's last tick).
    pub fn seq_key(&self, shard: u32) -> String {
        self.shard_key(shard, "seq")
    }

    /// Dedup bucket `bucket` (see [`dedup_bucket`]).
    pub fn dedup_key(&self, shard: u32, bucket: u64) -> String {
        self.shard_key(shard, &format!("dedup:{bucket}"))
    }

    /// Append lane token → the replies of its last call.
    pub fn calls_key(&self, shard: u32) -> String {
        self.shard_key(shard, "calls")
    }

    /// Conversation → highest seq stored in MySQL.
    pub fn stored_key(&self, shard: u32) -> String {
        self.shard_key(shard, "stored")
    }

    /// Recent records of a conversation.
    pub fn recent_key(&self, shard: u32, conversation: u64) -> String {
        self.shard_key(shard, &format!("recent:{conversation}"))
    }

    /// Cached members of a group conversation.
    pub fn members_key(&self, shard: u32, conversation: u64) -> String {
        self.shard_key(shard, &format!("members:{conversation}"))
    }

    /// Membership version of a group conversation.
    pub fn members_version_key(&self, shard: u32, conversation: u64) -> String {
        self.shard_key(shard, &format!("mver:{conversation}"))
    }

    /// Dead letters of a shard.
    pub fn dead_letter_key(&self, shard: u32) -> String {
        self.shard_key(shard, "dead")
    }

    /// Bitmap of existing user ids.
    pub fn users_key(&self) -> String {
        format!("{}:users", self.prefix)
    }

    /// Direct conversations of a user that MySQL may not know yet.
    pub fn direct_index_key(&self, user: u64) -> String {
        format!("{}:{{u{user}}}:direct", self.prefix)
    }

    /// Delivered cursors of a user.
    pub fn delivered_key(&self, user: u64) -> String {
        format!("{}:{{u{user}}}:delivered", self.prefix)
    }
}

/// Ticks of a shard's message clock per millisecond: a tick is the
/// position of a message in its shard's total order, and runs at least as
/// fast as the wall clock (see [`message_id`]). A shard taking more than
/// this many messages a millisecond runs its clock ahead of the wall
/// clock for a while; ids stay unique. Ticks stay below 10^14 (Lua prints
/// them exactly) until 2073.
pub const TICKS_PER_MS: u64 = 64;

/// The shard clock's tick for Unix time `now_ms`: what the append script
/// starts from when its shard's clock is behind the wall clock.
pub fn tick_of(now_ms: i64) -> u64 {
    (now_ms - MESSAGE_ID_EPOCH_MS).max(0) as u64 * TICKS_PER_MS
}

/// The dedup bucket of shard-clock tick `tick` with a dedup window of
/// `window_secs`: what the append script computes from its shard clock,
/// and what a caller expects from its own clock ([`tick_of`]) when it
/// declares the bucket's key.
pub fn dedup_bucket(tick: u64, window_secs: u64) -> u64 {
    tick / (window_secs.max(1) * 1000 * TICKS_PER_MS)
}

/// The message id of the message of `shard` that took tick `tick` of the
/// shard's clock: `tick << 10 | shard`.
///
/// Every append of a shard takes the next tick of that shard's clock, which
/// lives in Redis (`#t` in the seq hash) and only moves forward: it is the
/// wall clock in units of 1/64 ms since [`MESSAGE_ID_EPOCH_MS`], or one
/// past the last tick taken when that is later. So ids are unique by
/// construction, on every node, however many messages a shard takes
/// within one millisecond; they grow with time and fit 57 bits until
/// 2073.
pub fn message_id(shard: u32, tick: u64) -> u64 {
    (tick << 10) | u64::from(shard & 0x3ff)
}

/// The key under which a send is found again when it is resent after the
/// dedup window: a stable 64-bit hash of the sender and its
/// `client_msg_id`, never 0 (0 marks messages without one). Stored beside
/// each message in both stores' `messages` tables and indexed with the
/// conversation; a hit is confirmed against the stored message's own
/// sender and client_msg_id, so a collision can never make a new message
/// a duplicate.
pub fn dedup_key(sender: u64, client_msg_id: &str) -> u64 {
    if client_msg_id.is_empty() {
        return 0;
    }
    // Streamed, so no buffer per message; the same value as hashing the
    // concatenation at once.
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&sender.to_le_bytes());
    hasher.update(client_msg_id.as_bytes());
    hasher.digest().max(1)
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The `<seq>:<tick>:` header is missing or not numeric.
    #[error("malformed record header")]
    Header,
    /// The Protobuf body does not decode.
    #[error("malformed record body: {0}")]
    Body(#[from] prost::DecodeError),
}

/// A decoded record header and its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordParts<'a> {
    /// The message's seq in its conversation.
    pub seq: u64,
    /// The tick of the shard clock the message took.
    pub tick: u64,
    /// The Protobuf `Message` without seq and message id.
    pub body: &'a [u8],
}

/// The body of a record: `message` without `seq` and `message_id` (which
/// the append script assigns).
pub fn record_body(message: &pb::Message) -> Vec<u8> {
    debug_assert!(message.seq == 0 && message.message_id == 0);
    message.encode_to_vec()
}

/// Splits a record into its header numbers and body.
pub fn parse_record(record: &[u8]) -> Result<RecordParts<'_>, RecordError> {
    let (seq, rest) = take_number(record)?;
    let (tick, body) = take_number(rest)?;
    Ok(RecordParts { seq, tick, body })
}

fn take_number(bytes: &[u8]) -> Result<(u64, &[u8]), RecordError> {
    let colon = bytes
        .iter()
        .take(21)
        .position(|&b| b == b':')
        .ok_or(RecordError::Header)?;
    let digits = std::str::from_utf8(&bytes[..colon]).map_err(|_| RecordError::Header)?;
    let n = digits.parse().map_err(|_| RecordError::Header)?;
    Ok((n, &bytes[colon + 1..]))
}

/// Decodes a record of `shard` into the full message.
pub fn decode_record(record: &[u8], shard: u32) -> Result<pb::Message, RecordError> {
    let parts = parse_record(record)?;
    let mut message = pb::Message::decode(parts.body)?;
    message.seq = parts.seq;
    message.message_id = message_id(shard, parts.tick);
    Ok(message)
}

/// A record as the append script builds it (for tests and tools that write
/// streams directly).
pub fn encode_record(seq: u64, tick: u64, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{seq}:{tick}:").into_bytes();
    out.extend_from_slice(body);
    out
}

/// The dedup value `seq:tick:time` the script stores and returns for
/// duplicates.
pub fn parse_dedup(value: &str) -> Option<(u64, u64, i64)> {
    let mut parts = value.splitn(3, ':');
    let seq = parts.next()?.parse().ok()?;
    let tick = parts.next()?.parse().ok()?;
    let time = parts.next()?.parse().ok()?;
    Some((seq, tick, time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_shard_share_a_hash_tag() {
        let l = Layout::new("im", 16);
        let tag = "{s3}";
        for key in [
            l.stream_key(3),
            l.seq_key(3),
            l.stored_key(3),
            l.recent_key(3, 42),
            l.members_key(3, 42),
            l.members_version_key(3, 42),
            l.dead_letter_key(3),
            l.dedup_key(3, 9),
            l.calls_key(3),
        ] {
            assert!(key.starts_with("im:{s3}:"), "{key}");
            assert!(key.contains(tag));
        }
        assert_eq!(l.direct_index_key(7), "im:{u7}:direct");
    }

    #[test]
    fn conversations_spread_over_shards() {
        let l = Layout::new("im", 8);
        let mut counts = [0u32; 8];
        for a in 1..400u64 {
            let conv = im_proto::ConversationId::direct(a, a + 1).unwrap().raw();
            counts[l.shard_of(conv) as usize] += 1;
        }
        assert!(counts.iter().all(|&n| n > 25), "{counts:?}");
        assert_eq!(Layout::new("x", 0).streams(), 1);
        assert_eq!(Layout::new("x", 1 << 20).streams(), MAX_STREAMS);
    }

    #[test]
    fn message_ids_are_ordered_by_tick_and_distinct_by_shard_and_tick() {
        let t = tick_of(MESSAGE_ID_EPOCH_MS + 1_000);
        assert_eq!(tick_of(MESSAGE_ID_EPOCH_MS + 1_001), t + TICKS_PER_MS);
        assert!(message_id(0, t + 1) > message_id(1023, t));
        assert_ne!(message_id(1, t), message_id(2, t));
        assert_ne!(message_id(1, t), message_id(1, t + 1));
        // The script prints ticks with 14 significant digits: exact below
        // 10^14, which lasts until 2073; ids stay positive as i64.
        let year_2073 = tick_of(MESSAGE_ID_EPOCH_MS + 49 * 365 * 24 * 3600 * 1000);
        assert!(year_2073 < 100_000_000_000_000);
        assert!(i64::try_from(message_id(1023, year_2073)).is_ok());
    }

    #[test]
    fn dedup_keys_are_stable_and_never_zero() {
        assert_eq!(dedup_key(7, "abc"), dedup_key(7, "abc"));
        assert_ne!(dedup_key(7, "abc"), dedup_key(8, "abc"));
        assert_ne!(dedup_key(7, "abc"), dedup_key(7, "abd"));
        assert_eq!(dedup_key(7, ""), 0);
        // Fixed across releases: it is stored in both databases.
        assert_eq!(dedup_key(1, "m1"), 0xdbe6_6bb3_13aa_5aba);
    }

    #[test]
    fn records_round_trip() {
        let message = pb::Message {
            conversation_id: 99,
            sender_id: 5,
            client_msg_id: "abc".into(),
            server_time_ms: MESSAGE_ID_EPOCH_MS + 5,
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text {
                    text: "hi:there".into(),
                })),
            }),
            ..Default::default()
        };
        let record = encode_record(12, 34, &record_body(&message));
        let decoded = decode_record(&record, 3).unwrap();
        assert_eq!(decoded.seq, 12);
        assert_eq!(decoded.message_id, message_id(3, 34));
        assert_eq!(decoded.client_msg_id, "abc");
        assert_eq!(decoded.content, message.content);
        assert!(matches!(parse_record(b"12"), Err(RecordError::Header)));
        assert!(matches!(parse_record(b"x:1:"), Err(RecordError::Header)));
        assert_eq!(parse_dedup("7:8:9"), Some((7, 8, 9)));
        assert_eq!(parse_dedup("7:8"), None);
    }
}
