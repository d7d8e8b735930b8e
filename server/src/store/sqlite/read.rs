//! Reads: a small pool of read-only connections and every query that runs
//! on it.
//!
//! Queries run on tokio's blocking threads; a semaphore bounds how many run
//! at once to the number of connections. Thanks to WAL they proceed while
//! the writer commits, each seeing the last committed state. Queries that
//! take several statements run in one read transaction, so they see a
//! single snapshot.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use im_proto::ids::{ConversationKind, GROUP_BASE};
use im_proto::{ConversationId, pb};
use prost::Message as _;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::Semaphore;

use super::{retention, schema};
use crate::store::{GroupId, GroupRecord, Page, StoreError, StoreResult, UserId, UserRecord};

/// Read-only connections handed out one per running query.
pub(super) struct ReadPool {
    path: PathBuf,
    /// Idle connections. A plain mutex: it is held only to push or pop.
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection; closed when the store closes.
    permits: Arc<Semaphore>,
}

impl ReadPool {
    /// Opens `size` read-only connections to the database at `path`.
    pub(super) fn open(path: &Path, size: usize) -> StoreResult<Self> {
        let size = size.max(1);
        let idle = (0..size)
            .map(|_| open_reader(path))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(ReadPool {
            path: path.to_owned(),
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(size)),
        })
    }

    /// Refuses further reads and closes the idle connections; connections
    /// in use are closed when their query ends.
    pub(super) fn close(&self) {
        self.permits.close();
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.permits.is_closed()
    }

    /// Runs `query` on a pooled connection on a blocking thread.
    pub(super) async fn run<T, F>(self: &Arc<Self>, query: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = pool.take()?;
            let result = query(&mut conn);
            pool.give_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    fn take(&self) -> StoreResult<Connection> {
        let conn = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match conn {
            Some(conn) => Ok(conn),
            // A query panicked and its connection was dropped: replace it.
            None => open_reader(&self.path),
        }
    }

    fn give_back(&self, conn: Connection) {
        if self.is_closed() {
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }
}

fn open_reader(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    schema::configure_reader(&conn)?;
    Ok(conn)
}

/// A client-supplied number as an SQL integer (values beyond `i64::MAX`
/// mean "as large as possible" and match nothing stored).
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `limit + 1` as an SQL LIMIT, to learn whether more rows remain.
fn probe_limit(limit: usize) -> i64 {
    i64::try_from(limit)
        .unwrap_or(i64::MAX - 1)
        .saturating_add(1)
}

/// Columns read by [`message_from_row`].
const MESSAGE_COLUMNS: &str =
    "conversation_id, seq, id, sender_id, client_msg_id, server_time_ms, content";

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<pb::Message> {
    let blob: Vec<u8> = row.get(6)?;
    let content = pb::Content::decode(blob.as_slice()).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Blob, Box::new(e))
    })?;
    Ok(pb::Message {
        conversation_id: row.get(0)?,
        seq: row.get(1)?,
        message_id: row.get(2)?,
        sender_id: row.get(3)?,
        client_msg_id: row.get(4)?,
        server_time_ms: row.get(5)?,
        content: Some(content),
    })
}

/// From which seq on `user` may read `conversation` (`Some(joined_seq)`),
/// `None` if not at all. The participants of a direct conversation may
/// read it from the start, even before its first message creates their
/// membership rows; a group member from the join.
fn visibility(
    conn: &Connection,
    conversation: ConversationId,
    user: UserId,
) -> StoreResult<Option<u64>> {
    if let ConversationKind::Direct { .. } = conversation.kind() {
        return Ok(conversation.peer_of(user).map(|_| 0));
    }
    Ok(conn
        .prepare_cached(
            "SELECT joined_seq FROM members WHERE conversation_id = ?1 AND user_id = ?2",
        )?
        .query_row(params![conversation.raw(), sql_int(user)], |row| row.get(0))
        .optional()?)
}

// ---- accounts ----

pub(super) fn user_by_name(
    conn: &mut Connection,
    username: &str,
) -> StoreResult<Option<UserRecord>> {
    Ok(conn
        .prepare_cached("SELECT id, username, password_hash FROM users WHERE username = ?1")?
        .query_row(params![username], |row| {
            Ok(UserRecord {
                id: row.get(0)?,
                username: row.get(1)?,
                password_hash: row.get(2)?,
            })
        })
        .optional()?)
}

pub(super) fn lookup_users(
    conn: &mut Connection,
    ids: &[UserId],
    names: &[String],
) -> StoreResult<Vec<(UserId, String)>> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    let tx = conn.transaction()?;
    {
        let mut by_id = tx.prepare_cached("SELECT id, username FROM users WHERE id = ?1")?;
        let mut by_name =
            tx.prepare_cached("SELECT id, username FROM users WHERE username = ?1")?;
        let pair = |row: &Row<'_>| Ok((row.get::<_, u64>(0)?, row.get::<_, String>(1)?));
        for &id in ids {
            if let Some(user) = by_id.query_row(params![sql_int(id)], pair).optional()? {
                if seen.insert(user.0) {
                    found.push(user);
                }
            }
        }
        for name in names {
            if let Some(user) = by_name.query_row(params![name], pair).optional()? {
                if seen.insert(user.0) {
                    found.push(user);
                }
            }
        }
    }
    tx.finish()?;
    Ok(found)
}

// ---- messages ----

pub(super) fn sync(
    conn: &mut Connection,
    user: UserId,
    cursors: &[(ConversationId, u64)],
    limit: usize,
) -> StoreResult<Page> {
    // Ascending by conversation; a repeated conversation uses its lowest
    // cursor so nothing the client lacks is skipped.
    let mut cursors = cursors.to_vec();
    cursors.sort_unstable();
    cursors.dedup_by_key(|(conversation, _)| *conversation);

    let tx = conn.transaction()?;
    let mut page = Page::default();
    {
        let mut select = tx.prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE conversation_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
        ))?;
        for (conversation, cursor) in cursors {
            let Some(joined) = visibility(&tx, conversation, user)? else {
                continue;
            };
            let conversation = conversation.raw();
            let floor = retention::floor(&tx, conversation)?;
            let visible_from = cursor.max(joined);
            if floor > visible_from {
                page.expired.push((conversation, floor));
            }
            let after = sql_int(visible_from.max(floor));
            let room = limit - page.messages.len();
            let before = page.messages.len();
            for message in select.query_map(
                params![conversation, after, probe_limit(room)],
                message_from_row,
            )? {
                page.messages.push(message?);
            }
            if page.messages.len() - before > room {
                page.messages.truncate(before + room);
                page.has_more = true;
                break;
            }
        }
    }
    tx.finish()?;
    Ok(page)
}

pub(super) fn history(
    conn: &mut Connection,
    user: UserId,
    conversation: ConversationId,
    before_seq: u64,
    limit: usize,
) -> StoreResult<Page> {
    let tx = conn.transaction()?;
    let Some(joined) = visibility(&tx, conversation, user)? else {
        return Err(StoreError::NotMember);
    };
    let conversation = conversation.raw();
    let floor = retention::floor(&tx, conversation)?;
    let before = if before_seq == 0 {
        i64::MAX
    } else {
        sql_int(before_seq)
    };
    let mut messages = tx
        .prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE conversation_id = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4"
        ))?
        .query_map(
            params![conversation, joined.max(floor), before, probe_limit(limit)],
            message_from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.finish()?;
    let has_more = messages.len() > limit;
    messages.truncate(limit);
    messages.reverse();
    // The page reached the floor: nothing visible remains below it.
    let expired = if !has_more && floor > joined {
        vec![(conversation, floor)]
    } else {
        Vec::new()
    };
    Ok(Page {
        messages,
        has_more,
        expired,
    })
}

pub(super) fn conversations(
    conn: &mut Connection,
    user: UserId,
    after: u64,
    limit: usize,
) -> StoreResult<(Vec<pb::ConversationSummary>, bool)> {
    struct Row {
        conversation: u64,
        joined_seq: u64,
        read_seq: u64,
        last_seq: u64,
        last_message_id: Option<u64>,
    }
    let tx = conn.transaction()?;
    let mut rows = tx
        .prepare_cached(
            "SELECT m.conversation_id, m.joined_seq, m.read_seq,
                    coalesce(c.last_seq, 0), c.last_message_id
             FROM members m LEFT JOIN conversations c ON c.id = m.conversation_id
             WHERE m.user_id = ?1 AND m.conversation_id > ?2
             ORDER BY m.conversation_id LIMIT ?3",
        )?
        .query_map(
            params![sql_int(user), sql_int(after), probe_limit(limit)],
            |row| {
                Ok(Row {
                    conversation: row.get(0)?,
                    joined_seq: row.get(1)?,
                    read_seq: row.get(2)?,
                    last_seq: row.get(3)?,
                    last_message_id: row.get(4)?,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let has_more = rows.len() > limit;
    rows.truncate(limit);

    let mut summaries = Vec::with_capacity(rows.len());
    {
        let mut user_name = tx.prepare_cached("SELECT username FROM users WHERE id = ?1")?;
        let mut group_name = tx.prepare_cached("SELECT name FROM groups WHERE id = ?1")?;
        let mut message = tx.prepare_cached(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"
        ))?;
        for row in rows {
            let Some(id) = ConversationId::from_raw(row.conversation) else {
                continue;
            };
            let (peer_id, group_id, title) = match id.kind() {
                ConversationKind::Direct { .. } => {
                    let peer = id.peer_of(user).unwrap_or_default();
                    let name: Option<String> = user_name
                        .query_row(params![peer], |r| r.get(0))
                        .optional()?;
                    (peer, 0, name.unwrap_or_default())
                }
                ConversationKind::Group(group) => {
                    let name: Option<String> = group_name
                        .query_row(params![group], |r| r.get(0))
                        .optional()?;
                    (0, group, name.unwrap_or_default())
                }
            };
            // A late group joiner does not see what was said before.
            let last_message = match row.last_message_id {
                Some(message_id) if row.last_seq > row.joined_seq => message
                    .query_row(params![message_id], message_from_row)
                    .optional()?,
                _ => None,
            };
            let seen = row.read_seq.max(row.joined_seq);
            summaries.push(pb::ConversationSummary {
                conversation_id: row.conversation,
                peer_id,
                group_id,
                title,
                last_seq: row.last_seq,
                last_message,
                // Cursors start at the join (rows of older versions say 0).
                read_seq: seen,
                unread_count: row.last_seq.saturating_sub(seen),
            });
        }
    }
    tx.finish()?;
    Ok((summaries, has_more))
}

pub(super) fn senders_between(
    conn: &mut Connection,
    conversation: ConversationId,
    after: u64,
    upto: u64,
    limit: usize,
) -> StoreResult<Vec<UserId>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    Ok(conn
        .prepare_cached(
            "SELECT DISTINCT sender_id FROM messages
             WHERE conversation_id = ?1 AND seq > ?2 AND seq <= ?3 AND sender_id <> 0
             LIMIT ?4",
        )?
        .query_map(
            params![conversation.raw(), sql_int(after), sql_int(upto), limit],
            |row| row.get(0),
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

// ---- groups ----

pub(super) fn group(conn: &mut Connection, group: GroupId) -> StoreResult<Option<GroupRecord>> {
    let Some(conversation) = ConversationId::group(group) else {
        return Ok(None);
    };
    Ok(conn
        .prepare_cached(
            "SELECT g.name, g.owner_id,
                    (SELECT count(*) FROM members m WHERE m.conversation_id = ?2)
             FROM groups g WHERE g.id = ?1",
        )?
        .query_row(params![group, conversation.raw()], |row| {
            Ok(GroupRecord {
                id: group,
                name: row.get(0)?,
                owner: row.get(1)?,
                member_count: row.get(2)?,
            })
        })
        .optional()?)
}

pub(super) fn group_members(conn: &mut Connection, group: GroupId) -> StoreResult<Vec<UserId>> {
    let Some(conversation) = ConversationId::group(group) else {
        return Ok(Vec::new());
    };
    Ok(conn
        .prepare_cached(
            "SELECT user_id FROM members WHERE conversation_id = ?1 ORDER BY joined_order",
        )?
        .query_map(params![conversation.raw()], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

pub(super) fn user_groups(
    conn: &mut Connection,
    user: UserId,
    after: GroupId,
    limit: usize,
) -> StoreResult<(Vec<GroupRecord>, bool)> {
    let mut groups = conn
        .prepare_cached(
            "SELECT g.id, g.name, g.owner_id,
                    (SELECT count(*) FROM members c WHERE c.conversation_id = m.conversation_id)
             FROM members m JOIN groups g ON g.id = m.conversation_id - ?2
             WHERE m.user_id = ?1 AND m.conversation_id > ?3
             ORDER BY m.conversation_id LIMIT ?4",
        )?
        .query_map(
            params![
                sql_int(user),
                GROUP_BASE,
                sql_int(GROUP_BASE.saturating_add(after)),
                probe_limit(limit)
            ],
            |row| {
                Ok(GroupRecord {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    owner: row.get(2)?,
                    member_count: row.get(3)?,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let has_more = groups.len() > limit;
    groups.truncate(limit);
    Ok((groups, has_more))
}

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;
    use crate::store::sqlite::{DB_FILE, SqliteOptions, SqliteStore};
    use crate::store::{NewMessage, Store};

    #[tokio::test]
    async fn queries_with_a_bound_limit_are_compiled_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).expect("open store");
        let alice = store.create_user("alice", "h").await.expect("user");
        let bob = store.create_user("bob", "h").await.expect("user");
        let conversation = ConversationId::direct(alice, bob).expect("valid ids");
        let batch = (0..3)
            .map(|i| NewMessage {
                sender: alice,
                conversation,
                client_msg_id: format!("m{i}"),
                content: pb::Content {
                    kind: Some(pb::content::Kind::Text(pb::Text { text: "hi".into() })),
                },
                server_time_ms: im_proto::now_ms(),
                resend: false,
            })
            .collect();
        store.append_batch(batch).await.expect("append");

        let mut conn = open_reader(&dir.path().join(DB_FILE)).expect("reader");
        for limit in 1..=5 {
            let page = sync(&mut conn, bob, &[(conversation, 0)], limit).expect("sync");
            assert_eq!(page.messages.len(), limit.min(3));
        }
        let select = conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE conversation_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
            ))
            .expect("cached statement");
        assert_eq!(select.get_status(StatementStatus::RePrepare), 0);
    }
}
