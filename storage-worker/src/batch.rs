//! Batches of one shard's stream entries on their way into MySQL: the
//! entries as read, the rows decoded from their records, and the rule that
//! decides when a batch is stored (count, bytes or age, whichever comes
//! first). No I/O and no clock of its own: callers pass `now`.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use im_proto::{ConversationId, pb};
use prost::Message as _;

use crate::layout::{dedup_key, message_id, parse_record};

/// A stream entry id, `<ms>-<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EntryId {
    /// Milliseconds part.
    pub ms: u64,
    /// Sequence part.
    pub seq: u64,
}

impl EntryId {
    /// `0-0`, below every real entry.
    pub const ZERO: EntryId = EntryId { ms: 0, seq: 0 };
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        // Formatted straight into the command buffer: one less allocation
        // per acknowledged entry.
        out.write_arg_fmt(self);
    }
}

impl FromStr for EntryId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Ok(EntryId {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

/// What a stream entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The records (the `m` fields): one per message the append call
    /// stored, in order.
    Records(Vec<Vec<u8>>),
    /// The entry has no `m` field: not written by the append script.
    NoRecord,
    /// The entry was deleted from the stream while pending.
    Deleted,
}

/// One stream entry as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id in the stream.
    pub id: EntryId,
    /// Its record, if any.
    pub content: Content,
}

impl Entry {
    /// Bytes of its records.
    pub fn len(&self) -> usize {
        self.records().iter().map(Vec::len).sum()
    }

    /// Whether it has no record bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records (none when there are none).
    pub fn records(&self) -> &[Vec<u8>] {
        match &self.content {
            Content::Records(r) => r,
            _ => &[],
        }
    }

    /// One record's bytes (empty if there is no such record).
    pub fn record(&self, index: usize) -> &[u8] {
        self.records().get(index).map_or(&[], Vec::as_slice)
    }
}

/// A message row decoded from an entry's record; the body stays in the
/// entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Index of its entry in the batch.
    pub entry: usize,
    /// Index of its record in the entry.
    pub record: usize,
    /// `messages.conversation_id`.
    pub conversation_id: u64,
    /// `messages.seq`.
    pub seq: u64,
    /// `messages.message_id`.
    pub message_id: u64,
    /// `messages.sender_id` (0 for notices).
    pub sender_id: u64,
    /// `messages.server_time_ms`.
    pub server_time_ms: i64,
    /// `messages.dedup_key` (0 without a client_msg_id).
    pub dedup_key: u64,
    /// Where the body starts in the record.
    pub body_start: usize,
}

/// Why an entry can never be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// No record field.
    #[error("entry has no record field")]
    NoRecord,
    /// The header or the Protobuf body does not decode.
    #[error("undecodable record: {0}")]
    Undecodable(String),
    /// The conversation id is not a valid one.
    #[error("invalid conversation id {0}")]
    Conversation(u64),
    /// Seq 0 (seqs start at 1).
    #[error("seq 0")]
    SeqZero,
}

/// Decodes record `record` of entry `entry` (bytes `bytes`) of `shard`
/// into its row (body included by offset).
pub fn decode_row(bytes: &[u8], entry: usize, record: usize, shard: u32) -> Result<Row, Reject> {
    let parts = parse_record(bytes).map_err(|e| Reject::Undecodable(e.to_string()))?;
    // A full decode, not just the columns: a body that readers could not
    // decode must not land in the table.
    let message =
        pb::Message::decode(parts.body).map_err(|e| Reject::Undecodable(e.to_string()))?;
    if ConversationId::from_raw(message.conversation_id).is_none() {
        return Err(Reject::Conversation(message.conversation_id));
    }
    if parts.seq == 0 {
        return Err(Reject::SeqZero);
    }
    Ok(Row {
        entry,
        record,
        conversation_id: message.conversation_id,
        seq: parts.seq,
        message_id: message_id(shard, parts.tick),
        sender_id: message.sender_id,
        server_time_ms: message.server_time_ms,
        dedup_key: dedup_key(message.sender_id, &message.client_msg_id),
        body_start: bytes.len() - parts.body.len(),
    })
}

/// A record (or an entry without records) that can never be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Index of the entry in the batch.
    pub entry: usize,
    /// Index of the record in the entry (`None`: the entry has none).
    pub record: Option<usize>,
    /// Why.
    pub reason: Reject,
}

/// Entries taken by the first read into an empty batch.
const FIRST_READ: usize = 32;

/// When a batch is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushRules {
    /// Messages (records) at most; a batch may exceed it by the records
    /// of one read's entries.
    pub count: usize,
    /// Record bytes at most (a batch may exceed it by one read).
    pub bytes: usize,
    /// Longest wait after the first entry.
    pub age: Duration,
}

/// The entries in hand of one shard, decoded.
#[derive(Debug)]
pub struct Batch {
    shard: u32,
    rules: FlushRules,
    entries: Vec<Entry>,
    rows: Vec<Row>,
    rejects: Vec<Rejected>,
    deleted: Vec<usize>,
    bytes: usize,
    started: Option<Instant>,
}

impl Batch {
    /// An empty batch of `shard`.
    pub fn new(shard: u32, rules: FlushRules) -> Batch {
        Batch {
            shard,
            rules,
            entries: Vec::with_capacity(rules.count),
            rows: Vec::with_capacity(rules.count),
            rejects: Vec::new(),
            deleted: Vec::new(),
            bytes: 0,
            started: None,
        }
    }

    /// Adds an entry read at `now`, decoding its records.
    pub fn push(&mut self, entry: Entry, now: Instant) {
        let index = self.entries.len();
        match &entry.content {
            Content::Deleted => self.deleted.push(index),
            Content::NoRecord => self.rejects.push(Rejected {
                entry: index,
                record: None,
                reason: Reject::NoRecord,
            }),
            Content::Records(records) => {
                for (i, bytes) in records.iter().enumerate() {
                    match decode_row(bytes, index, i, self.shard) {
                        Ok(row) => self.rows.push(row),
                        Err(reason) => self.rejects.push(Rejected {
                            entry: index,
                            record: Some(i),
                            reason,
                        }),
                    }
                }
            }
        }
        self.bytes += entry.len();
        self.entries.push(entry);
        self.started.get_or_insert(now);
    }

    /// Entries in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Record bytes in the batch.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Messages held: decoded rows and rejected records (an entry without
    /// records counts as one).
    pub fn messages(&self) -> usize {
        self.rows.len() + self.rejects.len() + self.deleted.len()
    }

    /// Entries that may still be read into the batch before it is full,
    /// judging by the messages per entry seen so far.
    pub fn room(&self) -> usize {
        let left = self.rules.count.saturating_sub(self.messages());
        if self.bytes >= self.rules.bytes || left == 0 {
            return 0;
        }
        if self.entries.is_empty() {
            // Nothing seen yet: a small first read tells how many messages
            // an entry carries.
            return left.min(FIRST_READ);
        }
        let per_entry = self.messages().div_ceil(self.entries.len()).max(1);
        left.div_ceil(per_entry)
    }

    /// When the batch must be stored at the latest (`None` when empty).
    pub fn deadline(&self) -> Option<Instant> {
        self.started.map(|t| t + self.rules.age)
    }

    /// Whether the batch is due: full by count or bytes, or old enough.
    pub fn is_due(&self, now: Instant) -> bool {
        !self.is_empty() && (self.room() == 0 || self.deadline().is_some_and(|d| now >= d))
    }

    /// The entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The decoded rows, in read order.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// Records (or record-less entries) that can never be stored.
    pub fn rejects(&self) -> &[Rejected] {
        &self.rejects
    }

    /// Entries deleted from the stream while pending (acknowledge only).
    pub fn deleted(&self) -> &[usize] {
        &self.deleted
    }

    /// The body of a row.
    pub fn body(&self, row: &Row) -> &[u8] {
        &self.entries[row.entry].record(row.record)[row.body_start..]
    }

    /// Empties the batch for reuse.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.rows.clear();
        self.rejects.clear();
        self.deleted.clear();
        self.bytes = 0;
        self.started = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MESSAGE_ID_EPOCH_MS, encode_record, record_body};

    fn body(conversation: u64, sender: u64, text: &str) -> Vec<u8> {
        record_body(&pb::Message {
            conversation_id: conversation,
            sender_id: sender,
            client_msg_id: "c".into(),
            server_time_ms: MESSAGE_ID_EPOCH_MS + 1000,
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text { text: text.into() })),
            }),
            ..Default::default()
        })
    }

    fn entry(n: u64, record: Vec<u8>) -> Entry {
        Entry {
            id: EntryId { ms: 100, seq: n },
            content: Content::Records(vec![record]),
        }
    }

    fn rules(count: usize, bytes: usize, age_ms: u64) -> FlushRules {
        FlushRules {
            count,
            bytes,
            age: Duration::from_millis(age_ms),
        }
    }

    #[test]
    fn entry_ids_parse_order_and_print() {
        let a: EntryId = "1700000000000-5".parse().unwrap();
        assert_eq!(
            a,
            EntryId {
                ms: 1_700_000_000_000,
                seq: 5
            }
        );
        assert_eq!(a.to_string(), "1700000000000-5");
        assert!(a < "1700000000000-6".parse().unwrap());
        assert!(a < "1700000000001-0".parse().unwrap());
        assert_eq!("7".parse::<EntryId>(), Ok(EntryId { ms: 7, seq: 0 }));
        assert!("x-1".parse::<EntryId>().is_err());
    }

    #[test]
    fn rows_carry_the_columns_and_the_exact_body() {
        let conv = ConversationId::direct(3, 9).unwrap().raw();
        let b = body(conv, 9, "hello");
        let record = encode_record(42, 4097, &b);
        let row = decode_row(&record, 7, 2, 5).unwrap();
        assert_eq!(row.entry, 7);
        assert_eq!(row.record, 2);
        assert_eq!(row.conversation_id, conv);
        assert_eq!(row.seq, 42);
        assert_eq!(row.sender_id, 9);
        assert_eq!(row.server_time_ms, MESSAGE_ID_EPOCH_MS + 1000);
        assert_eq!(row.message_id, message_id(5, 4097));
        assert_eq!(row.dedup_key, dedup_key(9, "c"));
        assert_eq!(&record[row.body_start..], &b[..]);
    }

    #[test]
    fn bad_records_are_rejected_with_a_reason() {
        let conv = ConversationId::group(5).unwrap().raw();
        let bad = |bytes: Vec<u8>| decode_row(&bytes, 0, 0, 0);
        assert!(matches!(
            bad(b"garbage".to_vec()),
            Err(Reject::Undecodable(_))
        ));
        assert!(matches!(
            bad(encode_record(1, 1, &[0xff, 0xff, 0xff])),
            Err(Reject::Undecodable(_))
        ));
        assert_eq!(
            bad(encode_record(1, 1, &body(0, 1, "x"))),
            Err(Reject::Conversation(0))
        );
        assert_eq!(
            bad(encode_record(0, 1, &body(conv, 1, "x"))),
            Err(Reject::SeqZero)
        );
    }

    #[test]
    fn entries_with_several_records_make_one_row_each() {
        let conv = ConversationId::group(5).unwrap().raw();
        let t = Instant::now();
        let mut batch = Batch::new(0, rules(10, 1 << 20, 20));
        batch.push(
            Entry {
                id: EntryId { ms: 1, seq: 0 },
                content: Content::Records(vec![
                    encode_record(1, 1, &body(conv, 1, "a")),
                    b"junk".to_vec(),
                    encode_record(2, 2, &body(conv, 1, "bb")),
                ]),
            },
            t,
        );
        assert_eq!(batch.len(), 1);
        let rows = batch.rows();
        assert_eq!(
            rows.iter().map(|r| (r.record, r.seq)).collect::<Vec<_>>(),
            [(0, 1), (2, 2)]
        );
        assert_eq!(batch.body(&rows[1]), &body(conv, 1, "bb")[..]);
        assert_eq!(batch.rejects().len(), 1);
        assert_eq!(batch.rejects()[0].record, Some(1));
    }

    #[test]
    fn batches_flush_on_count() {
        let conv = ConversationId::group(1).unwrap().raw();
        let t = Instant::now();
        let mut batch = Batch::new(0, rules(3, 1 << 20, 1000));
        assert!(
            !batch.is_due(t + Duration::from_secs(5)),
            "empty is never due"
        );
        assert_eq!(batch.deadline(), None);
        for seq in 1..=2 {
            batch.push(entry(seq, encode_record(seq, seq, &body(conv, 1, "x"))), t);
            assert!(!batch.is_due(t));
        }
        assert_eq!(batch.room(), 1);
        batch.push(entry(3, encode_record(3, 3, &body(conv, 1, "x"))), t);
        assert_eq!(batch.room(), 0);
        assert!(batch.is_due(t));
        assert_eq!(batch.rows().len(), 3);
        batch.clear();
        assert!(batch.is_empty() && batch.bytes() == 0 && batch.deadline().is_none());
    }

    #[test]
    fn batches_flush_on_bytes() {
        let conv = ConversationId::group(1).unwrap().raw();
        let t = Instant::now();
        let big = "y".repeat(600);
        let mut batch = Batch::new(0, rules(100, 1000, 1000));
        batch.push(entry(1, encode_record(1, 1, &body(conv, 1, &big))), t);
        assert!(!batch.is_due(t));
        assert!(batch.room() > 0);
        batch.push(entry(2, encode_record(2, 2, &body(conv, 1, &big))), t);
        assert!(batch.bytes() >= 1000);
        assert_eq!(batch.room(), 0);
        assert!(batch.is_due(t));
    }

    #[test]
    fn batches_flush_on_age_from_the_first_entry() {
        let conv = ConversationId::group(1).unwrap().raw();
        let t = Instant::now();
        let mut batch = Batch::new(0, rules(100, 1 << 20, 20));
        batch.push(entry(1, encode_record(1, 1, &body(conv, 1, "a"))), t);
        batch.push(
            entry(2, encode_record(2, 2, &body(conv, 1, "b"))),
            t + Duration::from_millis(15),
        );
        assert_eq!(batch.deadline(), Some(t + Duration::from_millis(20)));
        assert!(!batch.is_due(t + Duration::from_millis(19)));
        assert!(batch.is_due(t + Duration::from_millis(20)));
    }

    #[test]
    fn rejects_and_deleted_entries_count_but_make_no_rows() {
        let t = Instant::now();
        let mut batch = Batch::new(0, rules(10, 1 << 20, 20));
        batch.push(entry(1, b"junk".to_vec()), t);
        batch.push(
            Entry {
                id: EntryId { ms: 1, seq: 2 },
                content: Content::Deleted,
            },
            t,
        );
        assert_eq!(batch.len(), 2);
        assert!(batch.rows().is_empty());
        assert_eq!(batch.rejects().len(), 1);
        assert_eq!(batch.deleted(), &[1]);
    }
}
