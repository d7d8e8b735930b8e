//! The on-disk layout: connection settings and versioned schema migrations.
//!
//! The schema version lives in the `meta` table. Migrations are a list of
//! SQL scripts; script `i` takes the database from version `i` to `i + 1`.
//! [`migrate`] applies the missing ones in one transaction at open, so
//! running it again on an up-to-date database does nothing.
//!
//! Layout notes:
//! - `members` holds both group members (conversation = the group's
//!   conversation id) and the participants of direct conversations (created
//!   with the first message), so "conversations of a user", cursors and
//!   visibility (`joined_seq`) work the same for both kinds.
//! - `messages.id` is the store-wide message id; `(conversation_id, seq)`
//!   is unique and serves every range read.
//! - Send deduplication is a window kept in memory (see `recent.rs`) and
//!   refilled from the newest rows at open; version 1 had a unique index on
//!   `(sender_id, client_msg_id)`, which version 2 drops because its random
//!   inserts dominated the cost of an append. Version 3 adds
//!   `messages.dedup_key` (the top 31 bits of `im_storage::layout::dedup_key`)
//!   to the table's only index, `(conversation_id, seq, dedup_key)`,
//!   scanned only for resends the window no longer knows. The writer keeps
//!   seqs unique per conversation (it is the only writer).
//! - Version 5 (retention) makes message ids AUTOINCREMENT, so ids of
//!   expired messages are never given again, adds each conversation's
//!   floor (`conversations.expired_seq`) and the `messages_archive` table.
//! - There are no foreign keys: only the writer thread writes, and it checks
//!   every reference before writing, so enforcing them again on the hot
//!   append path would only cost time.

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{StoreError, StoreResult};

/// How long a connection waits for a lock before failing, in milliseconds.
const BUSY_TIMEOUT_MS: u32 = 5_000;

/// Prepared statements kept per connection.
const STATEMENT_CACHE: usize = 64;

/// Schema scripts; the database is at version `MIGRATIONS.len()` when current.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE users (
        id            INTEGER PRIMARY KEY,
        username      TEXT NOT NULL UNIQUE COLLATE NOCASE,
        password_hash TEXT NOT NULL,
        created_ms    INTEGER NOT NULL
    );
    CREATE TABLE groups (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL,
        owner_id   INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE members (
        conversation_id INTEGER NOT NULL,
        user_id         INTEGER NOT NULL,
        joined_seq      INTEGER NOT NULL,
        joined_order    INTEGER NOT NULL,
        read_seq        INTEGER NOT NULL DEFAULT 0,
        delivered_seq   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (conversation_id, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX members_by_user ON members (user_id, conversation_id);
    CREATE TABLE conversations (
        id              INTEGER PRIMARY KEY,
        last_seq        INTEGER NOT NULL,
        last_message_id INTEGER
    );
    CREATE TABLE messages (
        id              INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL,
        seq             INTEGER NOT NULL,
        sender_id       INTEGER NOT NULL,
        client_msg_id   TEXT NOT NULL,
        server_time_ms  INTEGER NOT NULL,
        content         BLOB NOT NULL,
        UNIQUE (conversation_id, seq)
    );
    CREATE UNIQUE INDEX messages_dedup ON messages (sender_id, client_msg_id)
        WHERE client_msg_id <> '';",
    // 2: the dedup window moves to memory.
    "DROP INDEX messages_dedup;",
    // 3: resends are recognised after the window too. Each message keeps
    // its send's dedup key, and the key joins the one index the table has,
    // (conversation_id, seq), so a late resend is found by scanning its
    // conversation's index entries. A separate index cost every commit one
    // more page per conversation it touched: a quarter of the writer's
    // throughput. Rows stored before this version keep key 0 and are not
    // found by late resends.
    "CREATE TABLE messages_v3 (
        id              INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL,
        seq             INTEGER NOT NULL,
        sender_id       INTEGER NOT NULL,
        client_msg_id   TEXT NOT NULL,
        server_time_ms  INTEGER NOT NULL,
        content         BLOB NOT NULL,
        dedup_key       INTEGER NOT NULL DEFAULT 0,
        UNIQUE (conversation_id, seq, dedup_key)
    );
    INSERT INTO messages_v3
        (id, conversation_id, seq, sender_id, client_msg_id, server_time_ms, content)
        SELECT id, conversation_id, seq, sender_id, client_msg_id, server_time_ms, content
        FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v3 RENAME TO messages;",
    // 4: sessions (one per login of a device), ended by logout, password
    // change, the device limit or an end-session request.
    "CREATE TABLE sessions (
        id           INTEGER PRIMARY KEY,
        user_id      INTEGER NOT NULL,
        device_name  TEXT NOT NULL,
        address      TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        ended_ms     INTEGER
    );
    CREATE INDEX sessions_by_user ON sessions (user_id);
    CREATE INDEX sessions_ended ON sessions (ended_ms) WHERE ended_ms IS NOT NULL;",
    // 5: retention. Expired messages leave as a prefix of the oldest ids,
    // so ids become AUTOINCREMENT: a table emptied by retention must not
    // give a deleted message's id to a new one. Each conversation keeps
    // its floor (the highest seq removed) for sync and history, and
    // archived messages move to a table of the same shape that no client
    // request reads.
    "CREATE TABLE messages_v5 (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id INTEGER NOT NULL,
        seq             INTEGER NOT NULL,
        sender_id       INTEGER NOT NULL,
        client_msg_id   TEXT NOT NULL,
        server_time_ms  INTEGER NOT NULL,
        content         BLOB NOT NULL,
        dedup_key       INTEGER NOT NULL DEFAULT 0,
        UNIQUE (conversation_id, seq, dedup_key)
    );
    INSERT INTO messages_v5
        (id, conversation_id, seq, sender_id, client_msg_id, server_time_ms, content, dedup_key)
        SELECT id, conversation_id, seq, sender_id, client_msg_id, server_time_ms, content,
               dedup_key
        FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v5 RENAME TO messages;
    ALTER TABLE conversations ADD COLUMN expired_seq INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE messages_archive (
        id              INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL,
        seq             INTEGER NOT NULL,
        sender_id       INTEGER NOT NULL,
        client_msg_id   TEXT NOT NULL,
        server_time_ms  INTEGER NOT NULL,
        content         BLOB NOT NULL,
        dedup_key       INTEGER NOT NULL DEFAULT 0
    );",
];

/// Settings of the single write connection: WAL so readers run beside the
/// writer, and `synchronous=FULL` so a committed (acknowledged) message
/// survives power loss.
pub(super) fn configure_writer(conn: &Connection) -> StoreResult<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!(
            "could not enable WAL mode (journal_mode is {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // 32 MiB page cache: the writer touches the tails of many indexes.
    conn.pragma_update(None, "cache_size", -32_768)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoint every ~40 MiB of WAL rather than SQLite's 4 MiB: a busy
    // writer rewrites the same index tail pages in every commit, and a
    // longer WAL copies each of them to the database file once per
    // checkpoint rather than once per few commits (halved the median
    // send-to-deliver latency at 50k msgs/s).
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    common(conn)
}

/// Settings of a read-only pool connection.
pub(super) fn configure_reader(conn: &Connection) -> StoreResult<()> {
    conn.pragma_update(None, "query_only", "ON")?;
    // Plans must not depend on bound values: the planner reads a bound
    // `LIMIT ?n`, and SQLite then recompiles the statement every time it is
    // bound again, i.e. on every query. With no statistics tables and no
    // `LIKE ?` the plans are the same either way.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    common(conn)
}

fn common(conn: &Connection) -> StoreResult<()> {
    conn.busy_timeout(std::time::Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// Brings the schema up to date. Fails if the database was written by a
/// newer version of the server.
pub(super) fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    )?;
    let current: usize = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()?
        .unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(StoreError::Backend(format!(
            "database schema version {current} is newer than this server supports ({})",
            MIGRATIONS.len()
        )));
    }
    for script in &MIGRATIONS[current..] {
        tx.execute_batch(script)?;
    }
    if current < MIGRATIONS.len() {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![MIGRATIONS.len()],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The schema version this build writes.
#[cfg(test)]
pub(super) fn latest_version() -> usize {
    MIGRATIONS.len()
}
