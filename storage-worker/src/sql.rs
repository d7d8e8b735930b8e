//! The MySQL side of the worker: what a set of message rows becomes in the
//! database (a [`Plan`]: message rows, members rows and read cursors), the
//! SQL that writes it, and how database errors are told apart (retry
//! everything, or split the batch).
//!
//! Message rows are written in the batch's own transaction. Members rows
//! and read cursors change far less often than messages arrive, so they
//! are coalesced over many batches and written together later (see
//! `cursors`): a busy batch costs MySQL little more than its inserts.
//!
//! Every statement is a multi-row prepared statement (binary protocol, so
//! bodies travel as raw bytes) in a few fixed sizes: a chunk of rows is
//! padded up to the next size by repeating its last row, which every
//! statement here tolerates (they are idempotent per key). So each chunk is
//! one round trip, each connection prepares at most a few dozen statements,
//! and no chunk comes near MySQL's 65,535 placeholders.
//!
//! The statements:
//! - `messages`: `INSERT ... ON DUPLICATE KEY UPDATE seq = seq` (a
//!   redelivered entry makes no second row, and real errors still surface,
//!   unlike `INSERT IGNORE`). Its affected-rows count is 1 per inserted row
//!   and 0 per row that was there already, so a chunk that counts fewer
//!   than its real rows held duplicates: only then are the chunk's stored
//!   message ids read back (`lookup`, in the same transaction) and
//!   compared. The same id is a redelivery; another id means the seq was
//!   given to two messages, a [`SeqConflict`], which is reported and never
//!   overwrites the stored row;
//! - `members` of direct conversations: both participants' rows
//!   (`joined_seq` 0) unless already known, and the sender's `read_seq`
//!   raised to the highest seq it sent;
//! - `members` of groups: the sender's `read_seq` raised on existing rows
//!   only (a removed member is never added back).

use std::collections::BTreeMap;
use std::time::Duration;

use im_proto::ConversationId;
use im_proto::ids::ConversationKind;
use mysql_async::prelude::*;
use mysql_async::{Params, Value};

/// Most placeholders one MySQL statement may have.
pub const MAX_PLACEHOLDERS: usize = 65_535;

/// Why a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, overloaded or otherwise failing for
    /// reasons unrelated to the rows: retry the same rows later.
    #[error("database unavailable: {0}")]
    Unavailable(mysql_async::Error),
    /// The transaction took too long.
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
    /// The database refused the rows themselves (a constraint, a trigger,
    /// a bad value): some row in the set is bad.
    #[error("database rejected the rows: {0}")]
    Rejected(mysql_async::Error),
}

impl StoreError {
    /// Sorts a database error into retry-all or split-the-batch.
    pub fn classify(error: mysql_async::Error) -> StoreError {
        match &error {
            mysql_async::Error::Server(e) if is_data_error(e.code, &e.state) => {
                StoreError::Rejected(error)
            }
            // A row too large for max_allowed_packet, caught before sending.
            mysql_async::Error::Driver(mysql_async::DriverError::PacketTooLarge) => {
                StoreError::Rejected(error)
            }
            _ => StoreError::Unavailable(error),
        }
    }
}

/// Whether a server error is about the data rather than the database's
/// state: SQLSTATE classes 22 (data exception), 23 (integrity constraint),
/// 44 (check option) and 45 (user-defined, e.g. SIGNAL in a trigger), and
/// a few such errors MySQL reports as HY000. Anything else (lock waits,
/// deadlocks, read-only, disk full, missing tables...) is retried as a
/// whole: it is no reason to give up on a row.
pub fn is_data_error(code: u16, state: &str) -> bool {
    const DATA_CODES: &[u16] = &[
        1048, // column cannot be null
        1062, // duplicate entry
        1264, // out of range
        1265, // data truncated
        1292, // incorrect value
        1366, // incorrect string value
        1406, // data too long
        1452, // foreign key
        1644, // SIGNAL
        1690, // value out of range
        3819, // check constraint (MySQL)
        4025, // check constraint (MariaDB)
    ];
    matches!(state.get(..2), Some("22" | "23" | "44" | "45")) || DATA_CODES.contains(&code)
}

/// One message row with its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRow<'a> {
    /// Conversation.
    pub conversation_id: u64,
    /// Seq in the conversation.
    pub seq: u64,
    /// Message id.
    pub message_id: u64,
    /// Sender (0 for notices).
    pub sender_id: u64,
    /// Server time.
    pub server_time_ms: i64,
    /// The send's dedup key (0 without a client_msg_id).
    pub dedup_key: u64,
    /// The record body.
    pub body: &'a [u8],
}

/// The `stream_journal` row of one transaction: what it stored of one
/// stream shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRow {
    /// Stream shard.
    pub shard: u32,
    /// The greatest shard-clock tick among the rows.
    pub last_tick: u64,
    /// When it was written (Unix ms).
    pub written_ms: i64,
    /// (conversation, greatest seq) pairs, see [`encode_journal`].
    pub conversations: Vec<u8>,
}

impl JournalRow {
    /// The journal row of a plan's rows of `shard`.
    pub fn of(shard: u32, plan: &Plan<'_>) -> JournalRow {
        JournalRow {
            shard,
            last_tick: plan
                .messages
                .iter()
                .map(|r| r.message_id >> 10)
                .max()
                .unwrap_or(0),
            written_ms: im_proto::now_ms(),
            conversations: encode_journal(&plan.conversations),
        }
    }
}

/// (conversation, seq) pairs as 16 bytes each, little-endian.
pub fn encode_journal(pairs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pairs.len() * 16);
    for &(conversation, seq) in pairs {
        out.extend_from_slice(&conversation.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
    }
    out
}

/// The pairs of [`encode_journal`] (a trailing partial pair is ignored).
pub fn decode_journal(bytes: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    bytes.chunks_exact(16).map(|pair| {
        let (c, s) = pair.split_at(8);
        (
            u64::from_le_bytes(c.try_into().unwrap_or_default()),
            u64::from_le_bytes(s.try_into().unwrap_or_default()),
        )
    })
}

/// A message row whose (conversation, seq) is already stored with another
/// message id: the same seq was given to two different messages (say, by a
/// Redis that failed over and lost its latest counters). The stored row is
/// kept; this one is not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqConflict {
    /// Conversation.
    pub conversation_id: u64,
    /// The seq both messages have.
    pub seq: u64,
    /// The message id of the row that was not written.
    pub message_id: u64,
    /// The message id stored under that seq.
    pub stored_message_id: u64,
}

impl std::fmt::Display for SeqConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seq conflict: conversation {} seq {} is stored with message id {}, this record has message id {}",
            self.conversation_id, self.seq, self.stored_message_id, self.message_id
        )
    }
}

/// The conflicts among `rows` given what the database holds under their
/// keys (`stored`: (conversation, seq, message id), in any order). A row
/// whose key is stored with its own message id is a redelivery (or was
/// just inserted); a key the database does not hold is no conflict.
pub fn conflicts(rows: &[MessageRow<'_>], stored: &mut [(u64, u64, u64)]) -> Vec<SeqConflict> {
    stored.sort_unstable();
    rows.iter()
        .filter_map(|r| {
            let i = stored
                .binary_search_by(|s| (s.0, s.1).cmp(&(r.conversation_id, r.seq)))
                .ok()?;
            let stored_message_id = stored[i].2;
            (stored_message_id != r.message_id).then_some(SeqConflict {
                conversation_id: r.conversation_id,
                seq: r.seq,
                message_id: r.message_id,
                stored_message_id,
            })
        })
        .collect()
}

/// A `members` row to write: conversation, user, read seq.
pub type MemberRow = (u64, u64, u64);

/// Everything one set of message rows writes, sorted by key (so concurrent
/// transactions lock in the same order).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Message rows, by (conversation, seq).
    pub messages: Vec<MessageRow<'a>>,
    /// (conversation, greatest seq), by conversation.
    pub conversations: Vec<(u64, u64)>,
    /// Direct conversations' members rows to upsert.
    pub direct_members: Vec<MemberRow>,
    /// Group members whose `read_seq` to raise if they are members.
    pub group_reads: Vec<MemberRow>,
    /// Direct conversations whose both members rows this plan writes.
    pub new_direct: Vec<u64>,
    /// Record bytes of the message rows.
    pub bytes: usize,
}

impl<'a> Plan<'a> {
    /// Builds the plan of `rows`; `known(conversation)` tells direct
    /// conversations whose members rows already exist.
    pub fn build(mut rows: Vec<MessageRow<'a>>, known: impl Fn(u64) -> bool) -> Plan<'a> {
        rows.sort_unstable_by_key(|r| (r.conversation_id, r.seq));
        let mut conversations: Vec<(u64, u64)> = Vec::new();
        let mut direct: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        let mut group: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        let mut new_direct = Vec::new();
        let mut bytes = 0;
        for r in &rows {
            bytes += r.body.len();
            match conversations.last_mut() {
                // Sorted by seq within a conversation: the last one wins.
                Some(c) if c.0 == r.conversation_id => c.1 = r.seq,
                _ => {
                    conversations.push((r.conversation_id, r.seq));
                    if let Some(ConversationKind::Direct { lo, hi }) =
                        ConversationId::from_raw(r.conversation_id).map(ConversationId::kind)
                    {
                        if !known(r.conversation_id) {
                            direct.entry((r.conversation_id, lo)).or_insert(0);
                            direct.entry((r.conversation_id, hi)).or_insert(0);
                            new_direct.push(r.conversation_id);
                        }
                    }
                }
            }
            if r.sender_id == 0 {
                continue;
            }
            let Some(id) = ConversationId::from_raw(r.conversation_id) else {
                continue;
            };
            let target = match id.kind() {
                // A sender who is not a participant gets no members row.
                ConversationKind::Direct { .. } if id.peer_of(r.sender_id).is_none() => continue,
                ConversationKind::Direct { .. } => &mut direct,
                ConversationKind::Group(_) => &mut group,
            };
            let seq = target.entry((r.conversation_id, r.sender_id)).or_insert(0);
            *seq = (*seq).max(r.seq);
        }
        let flatten = |m: BTreeMap<(u64, u64), u64>| m.into_iter().map(|((c, u), s)| (c, u, s));
        Plan {
            messages: rows,
            conversations,
            direct_members: flatten(direct).collect(),
            group_reads: flatten(group).collect(),
            new_direct,
            bytes,
        }
    }
}

/// The statement kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Message rows.
    Messages,
    /// Direct members rows.
    DirectMembers,
    /// Group read cursors.
    GroupReads,
    /// Message ids stored under (conversation, seq) keys.
    Lookup,
}

impl Kind {
    /// Placeholders per row.
    pub fn params(self) -> usize {
        match self {
            Kind::Messages => 7,
            Kind::DirectMembers | Kind::GroupReads => 3,
            Kind::Lookup => 2,
        }
    }

    /// The statement for `rows` rows.
    pub fn sql(self, rows: usize) -> String {
        let values = |tuple: &str| {
            let mut s = String::with_capacity(rows * (tuple.len() + 1));
            for i in 0..rows {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(tuple);
            }
            s
        };
        match self {
            Kind::Messages => format!(
                "INSERT INTO messages \
                 (conversation_id, seq, message_id, sender_id, server_time_ms, dedup_key, body) \
                 VALUES {} ON DUPLICATE KEY UPDATE seq = seq",
                values("(?,?,?,?,?,?,?)")
            ),
            Kind::DirectMembers => format!(
                "INSERT INTO members (conversation_id, user_id, read_seq) VALUES {} \
                 ON DUPLICATE KEY UPDATE read_seq = GREATEST(read_seq, VALUES(read_seq))",
                values("(?,?,?)")
            ),
            Kind::GroupReads => {
                let mut derived = String::from("SELECT ? AS c, ? AS u, ? AS s");
                for _ in 1..rows {
                    derived.push_str(" UNION ALL SELECT ?,?,?");
                }
                format!(
                    "UPDATE members m JOIN ({derived}) v \
                     ON m.conversation_id = v.c AND m.user_id = v.u \
                     SET m.read_seq = GREATEST(m.read_seq, v.s)"
                )
            }
            Kind::Lookup => {
                let keys = vec!["(conversation_id = ? AND seq = ?)"; rows].join(" OR ");
                format!("SELECT conversation_id, seq, message_id FROM messages WHERE {keys}")
            }
        }
    }
}

/// Statement sizes up to `cap`: 1, 2, 3, 4, 6, 8, 12, ... and `cap`. Each
/// is at most half above the one before, so padding stays below a third of
/// a statement.
pub fn size_classes(cap: usize) -> Vec<usize> {
    let mut out = vec![];
    let mut p = 1usize;
    while p <= cap {
        out.push(p);
        let mid = p + p / 2;
        if p >= 2 && mid <= cap {
            out.push(mid);
        }
        p *= 2;
    }
    out.dedup();
    if out.last() != Some(&cap) {
        out.push(cap);
    }
    out
}

/// One statement's share of rows: `rows` real rows padded to `class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First row.
    pub start: usize,
    /// Real rows.
    pub rows: usize,
    /// Statement size (rows + padding).
    pub class: usize,
}

/// Splits rows into statements: at most `cap` rows and (unless one row
/// alone is larger) `max_bytes` bytes each, as few as possible. `size(i)`
/// is the byte size of row `i`.
pub fn chunks(
    rows: usize,
    classes: &[usize],
    max_bytes: usize,
    size: impl Fn(usize) -> usize,
) -> Vec<Chunk> {
    let cap = classes.last().copied().unwrap_or(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows {
        let mut n = 0;
        let mut bytes = 0;
        while start + n < rows && n < cap {
            let b = size(start + n);
            if n > 0 && bytes + b > max_bytes {
                break;
            }
            bytes += b;
            n += 1;
        }
        let class = classes.iter().copied().find(|&c| c >= n).unwrap_or(cap);
        out.push(Chunk {
            start,
            rows: n,
            class,
        });
        start += n;
    }
    out
}

/// The prepared statements of every kind and size, built once.
#[derive(Debug)]
pub struct Statements {
    kinds: [(Kind, Vec<usize>, Vec<String>); 4],
    max_bytes: usize,
}

/// Statements per connection worth caching: every kind and size class.
pub fn statement_cache_size(chunk_rows: usize) -> usize {
    4 * size_classes(chunk_rows).len() + 8
}

impl Statements {
    /// Statements of at most `chunk_rows` rows (and below the placeholder
    /// limit) and about `max_bytes` bytes of bodies.
    pub fn new(chunk_rows: usize, max_bytes: usize) -> Statements {
        let make = |kind: Kind| {
            let cap = chunk_rows.clamp(1, MAX_PLACEHOLDERS / kind.params());
            let classes = size_classes(cap);
            let sql = classes.iter().map(|&n| kind.sql(n)).collect();
            (kind, classes, sql)
        };
        Statements {
            kinds: [
                make(Kind::Messages),
                make(Kind::DirectMembers),
                make(Kind::GroupReads),
                make(Kind::Lookup),
            ],
            max_bytes,
        }
    }

    fn of(&self, kind: Kind) -> (&[usize], &[String]) {
        let k = &self.kinds[kind as usize];
        (&k.1, &k.2)
    }

    fn sql(&self, kind: Kind, class: usize) -> &str {
        let (classes, sql) = self.of(kind);
        let i = classes.iter().position(|&c| c == class).unwrap_or(0);
        &sql[i]
    }

    /// Writes message rows in one transaction on `conn`; returns the rows
    /// that were not written because their (conversation, seq) is stored
    /// with another message id (every other row is committed).
    pub async fn execute_messages(
        &self,
        conn: &mut mysql_async::Conn,
        messages: &[MessageRow<'_>],
        journal: Option<&JournalRow>,
    ) -> Result<Vec<SeqConflict>, mysql_async::Error> {
        let mut tx = conn
            .start_transaction(mysql_async::TxOpts::default())
            .await?;
        let (classes, _) = self.of(Kind::Messages);
        let per_row = |i: usize| messages[i].body.len() + 64;
        let mut found = Vec::new();
        for chunk in chunks(messages.len(), classes, self.max_bytes, per_row) {
            let mut params = Vec::with_capacity(chunk.class * 7);
            for i in 0..chunk.class {
                let r = &messages[chunk.start + i.min(chunk.rows - 1)];
                params.extend([
                    Value::UInt(r.conversation_id),
                    Value::UInt(r.seq),
                    Value::UInt(r.message_id),
                    Value::UInt(r.sender_id),
                    Value::Int(r.server_time_ms),
                    Value::UInt(r.dedup_key),
                    Value::Bytes(r.body.to_vec()),
                ]);
            }
            let sql = self.sql(Kind::Messages, chunk.class);
            tx.exec_drop(sql, Params::Positional(params)).await?;
            // 1 per inserted row, 0 per row already there (the padding
            // repeats the last row, which then counts once at most).
            if (tx.affected_rows() as usize) < chunk.rows {
                let rows = &messages[chunk.start..chunk.start + chunk.rows];
                let mut stored = self.lookup(&mut tx, rows).await?;
                found.extend(conflicts(rows, &mut stored));
            }
        }
        if let Some(j) = journal {
            tx.exec_drop(
                "INSERT INTO stream_journal (shard, last_tick, written_ms, conversations) \
                 VALUES (?, ?, ?, ?)",
                (j.shard, j.last_tick, j.written_ms, &j.conversations),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(found)
    }

    /// The (conversation, seq, message id) stored under the keys of `rows`,
    /// read in `tx` (so its own inserts included).
    async fn lookup(
        &self,
        tx: &mut mysql_async::Transaction<'_>,
        rows: &[MessageRow<'_>],
    ) -> Result<Vec<(u64, u64, u64)>, mysql_async::Error> {
        let (classes, _) = self.of(Kind::Lookup);
        let mut out = Vec::with_capacity(rows.len());
        for chunk in chunks(rows.len(), classes, usize::MAX, |_| 0) {
            let mut params = Vec::with_capacity(chunk.class * 2);
            for i in 0..chunk.class {
                let r = &rows[chunk.start + i.min(chunk.rows - 1)];
                params.extend([Value::UInt(r.conversation_id), Value::UInt(r.seq)]);
            }
            let sql = self.sql(Kind::Lookup, chunk.class);
            let found: Vec<(u64, u64, u64)> = tx.exec(sql, Params::Positional(params)).await?;
            out.extend(found);
        }
        Ok(out)
    }

    /// Writes members rows of direct conversations and raises group read
    /// cursors, in one transaction on `conn`.
    pub async fn execute_members(
        &self,
        conn: &mut mysql_async::Conn,
        direct_members: &[MemberRow],
        group_reads: &[MemberRow],
    ) -> Result<(), mysql_async::Error> {
        let mut tx = conn
            .start_transaction(mysql_async::TxOpts::default())
            .await?;
        for (kind, rows) in [
            (Kind::DirectMembers, direct_members),
            (Kind::GroupReads, group_reads),
        ] {
            let (classes, _) = self.of(kind);
            for chunk in chunks(rows.len(), classes, usize::MAX, |_| 0) {
                let mut params = Vec::with_capacity(chunk.class * 3);
                for i in 0..chunk.class {
                    let (a, b, c) = rows[chunk.start + i.min(chunk.rows - 1)];
                    params.extend([Value::UInt(a), Value::UInt(b), Value::UInt(c)]);
                }
                let sql = self.sql(kind, chunk.class);
                tx.exec_drop(sql, Params::Positional(params)).await?;
            }
        }
        tx.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(conversation_id: u64, seq: u64, sender_id: u64) -> MessageRow<'static> {
        MessageRow {
            conversation_id,
            seq,
            message_id: conversation_id.wrapping_add(seq),
            sender_id,
            server_time_ms: 1,
            dedup_key: 0,
            body: b"body",
        }
    }

    #[test]
    fn size_classes_grow_by_at_most_half() {
        assert_eq!(size_classes(1), vec![1]);
        assert_eq!(size_classes(10), vec![1, 2, 3, 4, 6, 8, 10]);
        let c = size_classes(1024);
        assert_eq!(&c[..8], &[1, 2, 3, 4, 6, 8, 12, 16]);
        assert_eq!(c.last(), Some(&1024));
        assert!(
            c.windows(2)
                .all(|w| w[0] < w[1] && w[1] <= w[0] * 3 / 2 + 1)
        );
        assert!(c.len() <= 21);
        assert!(statement_cache_size(1024) >= 4 * c.len());
    }

    #[test]
    fn chunks_stay_below_the_placeholder_limit() {
        let statements = Statements::new(1_000_000, usize::MAX);
        for kind in [
            Kind::Messages,
            Kind::DirectMembers,
            Kind::GroupReads,
            Kind::Lookup,
        ] {
            let (classes, sql) = statements.of(kind);
            let cap = *classes.last().unwrap();
            assert!(cap * kind.params() <= MAX_PLACEHOLDERS, "{kind:?}");
            assert!((cap + 1) * kind.params() > MAX_PLACEHOLDERS, "{kind:?}");
            let biggest = sql.last().unwrap();
            assert_eq!(biggest.matches('?').count(), cap * kind.params());
            for chunk in chunks(100_000, classes, usize::MAX, |_| 10) {
                assert!(chunk.class * kind.params() <= MAX_PLACEHOLDERS);
            }
        }
    }

    #[test]
    fn chunks_cover_every_row_once_and_pad_little() {
        let classes = size_classes(1024);
        for n in [1, 2, 5, 999, 1000, 1024, 1025, 5000] {
            let plan = chunks(n, &classes, usize::MAX, |_| 1);
            let mut next = 0;
            for c in &plan {
                assert_eq!(c.start, next);
                assert!(c.rows >= 1 && c.rows <= c.class && c.class <= 1024);
                assert!(c.class * 2 <= c.rows * 3, "{c:?}");
                next += c.rows;
            }
            assert_eq!(next, n);
            assert_eq!(plan.len(), n.div_ceil(1024));
        }
        assert!(chunks(0, &classes, 10, |_| 1).is_empty());
    }

    #[test]
    fn chunks_split_on_bytes_but_never_below_one_row() {
        let classes = size_classes(100);
        let plan = chunks(10, &classes, 250, |_| 100);
        assert_eq!(
            plan.iter().map(|c| c.rows).collect::<Vec<_>>(),
            [2, 2, 2, 2, 2]
        );
        let plan = chunks(3, &classes, 50, |_| 100);
        assert_eq!(plan.iter().map(|c| c.rows).collect::<Vec<_>>(), [1, 1, 1]);
    }

    #[test]
    fn statements_have_the_right_shape() {
        let sql = Kind::Messages.sql(2);
        assert!(sql.contains("VALUES (?,?,?,?,?,?,?),(?,?,?,?,?,?,?) ON DUPLICATE KEY UPDATE"));
        assert!(!sql.contains("IGNORE"));
        let reads = Kind::GroupReads.sql(3);
        assert_eq!(reads.matches('?').count(), 9);
        assert!(reads.starts_with("UPDATE members m JOIN"));
        let lookup = Kind::Lookup.sql(2);
        assert_eq!(
            lookup,
            "SELECT conversation_id, seq, message_id FROM messages WHERE \
             (conversation_id = ? AND seq = ?) OR (conversation_id = ? AND seq = ?)"
        );
    }

    #[test]
    fn duplicates_with_another_message_id_are_conflicts() {
        let rows = [row(10, 1, 0), row(10, 2, 0), row(11, 1, 0), row(12, 5, 0)];
        // 10:1 and 11:1 were there with the same ids (redelivered or just
        // inserted), 10:2 with another one; 12:5 is not stored at all.
        let mut stored = vec![
            (11, 1, rows[2].message_id),
            (10, 2, 999),
            (10, 1, rows[0].message_id),
        ];
        assert_eq!(
            conflicts(&rows, &mut stored),
            [SeqConflict {
                conversation_id: 10,
                seq: 2,
                message_id: rows[1].message_id,
                stored_message_id: 999,
            }]
        );
        assert!(conflicts(&rows, &mut []).is_empty());
        // Two records of one batch with the same seq: the one inserted
        // first is stored, the other conflicts with it.
        let mut twin = row(10, 2, 0);
        twin.message_id = 999;
        let mut stored = vec![(10, 2, 999)];
        let found = conflicts(&[twin, rows[1]], &mut stored);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].message_id, rows[1].message_id);
        let text = found[0].to_string();
        assert!(
            text.starts_with("seq conflict: conversation 10 seq 2"),
            "{text}"
        );
    }

    #[test]
    fn plans_summarise_conversations_members_and_reads() {
        let d = ConversationId::direct(2, 7).unwrap().raw();
        let g = ConversationId::group(9).unwrap().raw();
        let rows = vec![
            row(g, 5, 3),
            row(d, 2, 7),
            row(d, 1, 2),
            row(g, 4, 3),
            row(g, 6, 0), // a notice: no read cursor
            row(d, 3, 7),
            row(g, 7, 8),
        ];
        let plan = Plan::build(rows, |_| false);
        let order: Vec<_> = plan
            .messages
            .iter()
            .map(|r| (r.conversation_id, r.seq))
            .collect();
        assert_eq!(
            order,
            [(d, 1), (d, 2), (d, 3), (g, 4), (g, 5), (g, 6), (g, 7)]
        );
        assert_eq!(plan.conversations, [(d, 3), (g, 7)]);
        assert_eq!(plan.direct_members, [(d, 2, 1), (d, 7, 3)]);
        assert_eq!(plan.group_reads, [(g, 3, 5), (g, 8, 7)]);
        assert_eq!(plan.new_direct, [d]);
        assert_eq!(plan.bytes, 7 * 4);

        // Known direct conversations only get the sender's cursor.
        let plan = Plan::build(vec![row(d, 4, 2)], |c| c == d);
        assert_eq!(plan.direct_members, [(d, 2, 4)]);
        assert!(plan.new_direct.is_empty());

        // Notes to oneself make one members row; a stranger makes none.
        let me = ConversationId::direct(5, 5).unwrap().raw();
        let plan = Plan::build(vec![row(me, 1, 5), row(d, 9, 4)], |_| false);
        assert_eq!(plan.direct_members, [(d, 2, 0), (d, 7, 0), (me, 5, 1)]);
    }

    #[test]
    fn errors_are_sorted_into_data_and_availability() {
        assert!(is_data_error(1644, "45000"));
        assert!(is_data_error(1406, "22001"));
        assert!(is_data_error(1452, "23000"));
        assert!(is_data_error(1366, "HY000"));
        assert!(!is_data_error(1213, "40001"), "deadlock");
        assert!(!is_data_error(1205, "HY000"), "lock wait timeout");
        assert!(!is_data_error(1146, "42S02"), "missing table");
        assert!(!is_data_error(1290, "HY000"), "read only");
        let io = mysql_async::Error::Io(mysql_async::IoError::Io(std::io::Error::other("x")));
        assert!(matches!(
            StoreError::classify(io),
            StoreError::Unavailable(_)
        ));
    }
}
