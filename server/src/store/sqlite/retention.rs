//! Retention on the embedded store: the oldest messages go first, in id
//! order, which is append order, so every conversation loses a prefix of
//! its seqs (seqs grow with ids within a conversation). The highest seq a
//! conversation lost is its floor, `conversations.expired_seq`; sync and
//! history read it to report what is gone. See
//! [`Store::expire_before`](crate::store::Store::expire_before).

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{RetentionMode, StoreResult};

/// Messages one step removes at most (one write job).
pub(super) const STEP_ROWS: usize = 5000;

/// One step, run on the writer: removes the oldest messages (at most
/// [`STEP_ROWS`]) up to the first one stored at or after `cutoff_ms`, and
/// raises their conversations' floors. Returns the messages removed.
pub(super) fn expire_step(
    conn: &Connection,
    cutoff_ms: i64,
    mode: RetentionMode,
) -> StoreResult<usize> {
    let mut last_id = None;
    let mut floors: BTreeMap<u64, u64> = BTreeMap::new();
    {
        let mut oldest = conn.prepare_cached(
            "SELECT id, conversation_id, seq, server_time_ms FROM messages ORDER BY id LIMIT ?1",
        )?;
        let mut rows = oldest.query(params![STEP_ROWS as i64])?;
        while let Some(row) = rows.next()? {
            let (id, conv, seq, time): (i64, u64, u64, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
            if time >= cutoff_ms {
                break;
            }
            last_id = Some(id);
            let floor = floors.entry(conv).or_insert(seq);
            *floor = (*floor).max(seq);
        }
    }
    let Some(last_id) = last_id else {
        return Ok(0);
    };
    if mode == RetentionMode::Archive {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO messages_archive SELECT * FROM messages WHERE id <= ?1",
        )?
        .execute(params![last_id])?;
    }
    let removed = conn
        .prepare_cached("DELETE FROM messages WHERE id <= ?1")?
        .execute(params![last_id])?;
    let mut raise = conn.prepare_cached(
        "UPDATE conversations SET expired_seq = MAX(expired_seq, ?2) WHERE id = ?1",
    )?;
    for (conv, floor) in floors {
        raise.execute(params![conv, floor])?;
    }
    Ok(removed)
}

/// A conversation's floor: every seq up to it was removed (0: none).
pub(super) fn floor(conn: &Connection, conversation: u64) -> StoreResult<u64> {
    Ok(conn
        .prepare_cached("SELECT expired_seq FROM conversations WHERE id = ?1")?
        .query_row(params![conversation], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}
