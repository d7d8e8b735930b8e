//! Accounts, groups and memberships in MySQL, and the reads of stored
//! messages. Every SQL statement of the pipeline store's server side is
//! here (the worker has its own, for writing messages).
//!
//! Accounts, sessions, groups and `members` live in the main database.
//! Messages live on their conversation's shard (`im_storage::shards`): a
//! read of one conversation goes to its shard; a read of many is split by
//! shard into one statement per shard, and the shards are asked at once.

use std::collections::{HashMap, HashSet};

use im_proto::ConversationId;
use im_proto::ids::GROUP_BASE;
use im_storage::layout::dedup_key;
use im_storage::retention;
use mysql_async::prelude::*;
use mysql_async::{Params, TxOpts, Value};
use prost::Message as _;

use super::{Shared, mysql_err, redis_err};
use crate::store::{
    Ack, GroupId, GroupLimits, GroupRecord, NewSession, RetentionMode, SessionId, SessionRecord,
    SessionScope, SessionTouch, StoreError, StoreResult, UserId, UserRecord,
};

/// MySQL's "duplicate entry" error.
const ER_DUP_ENTRY: u16 = 1062;

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

fn values<T: Into<Value> + Copy>(items: &[T]) -> Vec<Value> {
    items.iter().map(|&v| v.into()).collect()
}

fn group_conversation(group: GroupId) -> StoreResult<u64> {
    ConversationId::group(group)
        .map(ConversationId::raw)
        .ok_or(StoreError::NotFound)
}

// ---- accounts ----

pub(super) async fn create_user(
    shared: &Shared,
    username: &str,
    password_hash: &str,
) -> StoreResult<UserId> {
    let (user, _) = create_account(shared, username, password_hash, None).await?;
    Ok(user)
}

/// An account and its first session in one transaction (see
/// `Store::create_user_with_session`).
pub(super) async fn create_user_with_session(
    shared: &Shared,
    username: &str,
    password_hash: &str,
    s: NewSession,
) -> StoreResult<(UserId, SessionId)> {
    let (user, session) = create_account(shared, username, password_hash, Some(s)).await?;
    let session = session.ok_or_else(|| mysql_err("no session id"))?;
    Ok((user, session))
}

/// Inserts an account, and its first session if given, in one
/// transaction, then marks the account known to appends.
async fn create_account(
    shared: &Shared,
    username: &str,
    password_hash: &str,
    first: Option<NewSession>,
) -> StoreResult<(UserId, Option<SessionId>)> {
    let mut conn = shared.mysql().await?;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(mysql_err)?;
    let inserted = tx
        .exec_drop(
            "INSERT INTO users (username, password_hash, created_ms) VALUES (?, ?, ?)",
            (username, password_hash, im_proto::now_ms()),
        )
        .await;
    match inserted {
        Ok(()) => {}
        Err(mysql_async::Error::Server(e)) if e.code == ER_DUP_ENTRY => {
            return Err(StoreError::UsernameTaken);
        }
        Err(e) => return Err(mysql_err(e)),
    }
    let user = tx
        .last_insert_id()
        .ok_or_else(|| mysql_err("no insert id"))?;
    if !(1..=im_proto::ids::MAX_USER_ID).contains(&user) {
        return Err(StoreError::Backend("user id space exhausted".into()));
    }
    let mut session = None;
    if let Some(s) = first {
        tx.exec_drop(
            "INSERT INTO sessions (user_id, device_name, address, created_ms, last_seen_ms)
             VALUES (?, ?, ?, ?, ?)",
            (user, &s.device_name, &s.address, s.now_ms, s.now_ms),
        )
        .await
        .map_err(mysql_err)?;
        session = Some(
            tx.last_insert_id()
                .ok_or_else(|| mysql_err("no insert id"))?,
        );
    }
    tx.commit().await.map_err(mysql_err)?;
    drop(conn);
    mark_user_known(shared, user).await?;
    Ok((user, session))
}

/// Sets the account's bit in Redis: later appends check existence
/// against it.
async fn mark_user_known(shared: &Shared, id: UserId) -> StoreResult<()> {
    let mut redis = shared.redis().await?;
    let _: i64 = redis::cmd("SETBIT")
        .arg(shared.layout.users_key())
        .arg(id)
        .arg(1)
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    shared.known_users.insert(id, ());
    Ok(())
}

pub(super) async fn user_by_name(
    shared: &Shared,
    username: &str,
) -> StoreResult<Option<UserRecord>> {
    let mut conn = shared.mysql().await?;
    let row: Option<(u64, String, String)> = conn
        .exec_first(
            "SELECT id, username, password_hash FROM users WHERE username = ?",
            (username,),
        )
        .await
        .map_err(mysql_err)?;
    Ok(row.map(|(id, username, password_hash)| UserRecord {
        id,
        username,
        password_hash,
    }))
}

pub(super) async fn set_password(shared: &Shared, user: UserId, hash: &str) -> StoreResult<()> {
    let mut conn = shared.mysql().await?;
    conn.exec_drop(
        "UPDATE users SET password_hash = ? WHERE id = ?",
        (hash, user),
    )
    .await
    .map_err(mysql_err)?;
    // Matched rows, not changed ones (CLIENT_FOUND_ROWS is not set, and a
    // new hash always differs from the old one: fresh salt).
    if conn.affected_rows() == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

// ---- sessions ----

pub(super) async fn create_session(
    shared: &Shared,
    s: NewSession,
) -> StoreResult<(SessionId, Vec<SessionId>)> {
    let mut conn = shared.mysql().await?;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(mysql_err)?;
    tx.exec_drop(
        "INSERT INTO sessions (user_id, device_name, address, created_ms, last_seen_ms)
         VALUES (?, ?, ?, ?, ?)",
        (s.user, &s.device_name, &s.address, s.now_ms, s.now_ms),
    )
    .await
    .map_err(mysql_err)?;
    let id = tx
        .last_insert_id()
        .ok_or_else(|| mysql_err("no insert id"))?;
    // Locks the user's live rows, so two logins at once count each other.
    let others: Vec<SessionId> = tx
        .exec(
            "SELECT id FROM sessions
             WHERE user_id = ? AND ended_ms IS NULL AND last_seen_ms >= ? AND id <> ?
             ORDER BY last_seen_ms DESC, id DESC FOR UPDATE",
            (s.user, s.live_since_ms, id),
        )
        .await
        .map_err(mysql_err)?;
    let ended: Vec<SessionId> = others
        .into_iter()
        .skip(s.max_live.saturating_sub(1))
        .collect();
    if !ended.is_empty() {
        let sql = format!(
            "UPDATE sessions SET ended_ms = ? WHERE id IN ({})",
            placeholders(ended.len())
        );
        let mut params: Vec<Value> = vec![s.now_ms.into()];
        params.extend(values(&ended));
        tx.exec_drop(sql, Params::Positional(params))
            .await
            .map_err(mysql_err)?;
    }
    tx.commit().await.map_err(mysql_err)?;
    Ok((id, ended))
}

pub(super) async fn sessions(
    shared: &Shared,
    user: UserId,
    live_since_ms: i64,
) -> StoreResult<Vec<SessionRecord>> {
    let mut conn = shared.mysql().await?;
    let rows: Vec<(u64, String, String, i64, i64)> = conn
        .exec(
            "SELECT id, device_name, address, created_ms, last_seen_ms FROM sessions
             WHERE user_id = ? AND ended_ms IS NULL AND last_seen_ms >= ?
             ORDER BY id DESC",
            (user, live_since_ms),
        )
        .await
        .map_err(mysql_err)?;
    Ok(rows
        .into_iter()
        .map(
            |(id, device_name, address, created_ms, last_seen_ms)| SessionRecord {
                id,
                user,
                device_name,
                address,
                created_ms,
                last_seen_ms,
            },
        )
        .collect())
}

pub(super) async fn end_sessions(
    shared: &Shared,
    user: UserId,
    scope: SessionScope,
    now_ms: i64,
) -> StoreResult<Vec<SessionId>> {
    let mut conn = shared.mysql().await?;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(mysql_err)?;
    let live: Vec<SessionId> = tx
        .exec(
            "SELECT id FROM sessions WHERE user_id = ? AND ended_ms IS NULL
             ORDER BY id FOR UPDATE",
            (user,),
        )
        .await
        .map_err(mysql_err)?;
    let ended: Vec<SessionId> = match scope {
        SessionScope::One(id) if live.contains(&id) => vec![id],
        SessionScope::One(_) => return Err(StoreError::NotFound),
        SessionScope::All => live,
        SessionScope::AllBut(keep) => live.into_iter().filter(|&id| id != keep).collect(),
    };
    if !ended.is_empty() {
        let sql = format!(
            "UPDATE sessions SET ended_ms = ? WHERE id IN ({})",
            placeholders(ended.len())
        );
        let mut params: Vec<Value> = vec![now_ms.into()];
        params.extend(values(&ended));
        tx.exec_drop(sql, Params::Positional(params))
            .await
            .map_err(mysql_err)?;
    }
    tx.commit().await.map_err(mysql_err)?;
    Ok(ended)
}

pub(super) async fn ended_since(
    shared: &Shared,
    since_ms: i64,
    limit: usize,
) -> StoreResult<Vec<(SessionId, i64)>> {
    let mut conn = shared.mysql().await?;
    conn.exec(
        "SELECT id, ended_ms FROM sessions WHERE ended_ms >= ?
         ORDER BY ended_ms DESC LIMIT ?",
        (since_ms, u64::try_from(limit).unwrap_or(u64::MAX)),
    )
    .await
    .map_err(mysql_err)
}

pub(super) async fn session_ended(shared: &Shared, id: SessionId) -> StoreResult<bool> {
    let mut conn = shared.mysql().await?;
    let row: Option<(Option<i64>,)> = conn
        .exec_first("SELECT ended_ms FROM sessions WHERE id = ?", (id,))
        .await
        .map_err(mysql_err)?;
    Ok(!matches!(row, Some((None,))))
}

/// Sessions updated per statement at most (three placeholders each, far
/// below MySQL's 65,535).
const TOUCHES_PER_STATEMENT: usize = 512;

pub(super) async fn touch_sessions(shared: &Shared, touches: Vec<SessionTouch>) -> StoreResult<()> {
    if touches.is_empty() {
        return Ok(());
    }
    let mut conn = shared.mysql().await?;
    for chunk in touches.chunks(TOUCHES_PER_STATEMENT) {
        touch_chunk(&mut conn, chunk).await?;
    }
    Ok(())
}

async fn touch_chunk(conn: &mut mysql_async::Conn, touches: &[SessionTouch]) -> StoreResult<()> {
    // One statement per kind for the whole chunk.
    let sql = format!(
        "UPDATE sessions SET last_seen_ms = GREATEST(last_seen_ms, CASE id {} END)
         WHERE id IN ({})",
        vec!["WHEN ? THEN ?"; touches.len()].join(" "),
        placeholders(touches.len())
    );
    let mut params: Vec<Value> = Vec::with_capacity(touches.len() * 3);
    for t in touches {
        params.push(t.id.into());
        params.push(t.at_ms.into());
    }
    params.extend(touches.iter().map(|t| Value::from(t.id)));
    conn.exec_drop(sql, Params::Positional(params))
        .await
        .map_err(mysql_err)?;
    let addressed: Vec<&SessionTouch> = touches.iter().filter(|t| t.address.is_some()).collect();
    if !addressed.is_empty() {
        let sql = format!(
            "UPDATE sessions SET address = CASE id {} END WHERE id IN ({})",
            vec!["WHEN ? THEN ?"; addressed.len()].join(" "),
            placeholders(addressed.len())
        );
        let mut params: Vec<Value> = Vec::with_capacity(addressed.len() * 3);
        for t in &addressed {
            params.push(t.id.into());
            params.push(t.address.as_deref().unwrap_or_default().into());
        }
        params.extend(addressed.iter().map(|t| Value::from(t.id)));
        conn.exec_drop(sql, Params::Positional(params))
            .await
            .map_err(mysql_err)?;
    }
    Ok(())
}

pub(super) async fn lookup_users(
    shared: &Shared,
    ids: &[UserId],
    names: &[String],
) -> StoreResult<Vec<(UserId, String)>> {
    let mut out: Vec<(UserId, String)> = Vec::new();
    let mut conn = shared.mysql().await?;
    if !ids.is_empty() {
        let sql = format!(
            "SELECT id, username FROM users WHERE id IN ({})",
            placeholders(ids.len())
        );
        out.extend(
            conn.exec::<(u64, String), _, _>(sql, Params::Positional(values(ids)))
                .await
                .map_err(mysql_err)?,
        );
    }
    if !names.is_empty() {
        let sql = format!(
            "SELECT id, username FROM users WHERE username IN ({})",
            placeholders(names.len())
        );
        let params: Vec<Value> = names.iter().map(|n| n.as_str().into()).collect();
        out.extend(
            conn.exec::<(u64, String), _, _>(sql, Params::Positional(params))
                .await
                .map_err(mysql_err)?,
        );
    }
    let mut seen = HashSet::new();
    out.retain(|(id, _)| seen.insert(*id));
    Ok(out)
}

pub(super) async fn existing_users(shared: &Shared, ids: &[UserId]) -> StoreResult<Vec<UserId>> {
    let mut conn = shared.mysql().await?;
    let sql = format!(
        "SELECT id FROM users WHERE id IN ({})",
        placeholders(ids.len())
    );
    conn.exec::<u64, _, _>(sql, Params::Positional(values(ids)))
        .await
        .map_err(mysql_err)
}

// ---- conversations ----

/// Splits `items` by the MySQL shard of `conversation(item)` and runs
/// `query` once for each shard that got any, on a connection of that
/// shard, all shards at once; the answers come back in shard order.
async fn on_shards<P, T, Fut>(
    shared: &Shared,
    items: impl IntoIterator<Item = P>,
    conversation: impl Fn(&P) -> u64,
    query: impl Fn(mysql_async::Conn, Vec<P>) -> Fut,
) -> StoreResult<Vec<T>>
where
    Fut: Future<Output = StoreResult<T>>,
{
    let parts = shared.messages.split(items, conversation);
    let query = &query;
    let queries = parts
        .into_iter()
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        .map(|(shard, part)| async move {
            let conn = shared.message_shard(shard as u32).await?;
            query(conn, part).await
        });
    futures::future::join_all(queries)
        .await
        .into_iter()
        .collect()
}

/// A seq per conversation of `conversations`, from each one's shard:
/// `query(list)` is a statement answering (conversation, seq) rows, where
/// `list` is the placeholders of the shard's conversations, given as often
/// as the statement uses it (`lists`).
async fn seq_per_conversation(
    shared: &Shared,
    conversations: &[u64],
    lists: usize,
    query: impl Fn(&str) -> String,
) -> StoreResult<HashMap<u64, u64>> {
    let query = &query;
    let answers = on_shards(
        shared,
        conversations.iter().copied(),
        |&c| c,
        |mut conn, part| async move {
            let sql = query(&placeholders(part.len()));
            let params = (0..lists).flat_map(|_| values(&part)).collect();
            conn.exec::<(u64, u64), _, _>(sql, Params::Positional(params))
                .await
                .map_err(mysql_err)
        },
    )
    .await?;
    Ok(answers.into_iter().flatten().collect())
}

/// The highest seq stored in MySQL for each of `conversations` that has
/// any message there (the others are absent): what a conversation's seq
/// counter resumes from when Redis does not know it. A conversation whose
/// every message expired resumes above its floor.
pub(super) async fn stored_last_seqs(
    shared: &Shared,
    conversations: &[u64],
) -> StoreResult<HashMap<u64, u64>> {
    seq_per_conversation(shared, conversations, 2, |list| {
        format!(
            "SELECT conversation_id, MAX(s) FROM ( \
               SELECT conversation_id, MAX(seq) AS s FROM messages \
               WHERE conversation_id IN ({list}) GROUP BY conversation_id \
               UNION ALL \
               SELECT conversation_id, expired_seq FROM message_expiry \
               WHERE conversation_id IN ({list}) \
             ) known GROUP BY conversation_id"
        )
    })
    .await
}

/// The retention floor (highest seq removed) of each of `conversations`
/// that lost messages to retention (the others are absent).
pub(super) async fn floors(
    shared: &Shared,
    conversations: &[u64],
) -> StoreResult<HashMap<u64, u64>> {
    seq_per_conversation(shared, conversations, 1, |list| {
        format!(
            "SELECT conversation_id, expired_seq FROM message_expiry \
             WHERE conversation_id IN ({list})"
        )
    })
    .await
}

/// Removes what retention removes (see
/// [`Store::expire_before`](crate::store::Store::expire_before)) from
/// every message shard, and the same records from the recent caches.
pub(super) async fn expire_before(
    shared: &Shared,
    cutoff_ms: i64,
    mode: RetentionMode,
) -> StoreResult<u64> {
    let mut removed = 0;
    loop {
        let (swept, more) = retention::sweep(&shared.messages, cutoff_ms, mode)
            .await
            .map_err(mysql_err)?;
        removed += swept.rows;
        if !swept.floors.is_empty() {
            let mut conn = shared.redis().await?;
            retention::trim_recent(&mut conn, &shared.layout, swept.floors)
                .await
                .map_err(redis_err)?;
        }
        if !more {
            return Ok(removed);
        }
    }
}

/// Journal rows read per query while checking a shard's counters.
const JOURNAL_PAGE: usize = 200;

/// A page of the stream journal of stream shard `shard` on MySQL shard
/// `mysql_shard` (each holds the journal of the rows it stored): rows with
/// a last tick above `tick` and an id above `after_id`, oldest first, as
/// (row id, last tick, (conversation, greatest seq) pairs).
pub(super) async fn journal_page(
    shared: &Shared,
    mysql_shard: u32,
    shard: u32,
    tick: u64,
    after_id: u64,
) -> StoreResult<Vec<(u64, u64, Vec<(u64, u64)>)>> {
    let mut conn = shared.message_shard(mysql_shard).await?;
    let rows: Vec<(u64, u64, Vec<u8>)> = conn
        .exec(
            "SELECT id, last_tick, conversations FROM stream_journal \
             WHERE shard = ? AND last_tick > ? AND id > ? ORDER BY id LIMIT ?",
            (shard, tick, after_id, JOURNAL_PAGE as u64),
        )
        .await
        .map_err(mysql_err)?;
    Ok(rows
        .into_iter()
        .map(|(id, last, blob)| (id, last, im_storage::sql::decode_journal(&blob).collect()))
        .collect())
}

/// The greatest last tick the stream journals of every MySQL shard have
/// for stream shard `shard` (0 if none).
pub(super) async fn journal_last_tick(shared: &Shared, shard: u32) -> StoreResult<u64> {
    let mut greatest = 0;
    for mysql_shard in 0..shared.messages.len() {
        let mut conn = shared.message_shard(mysql_shard).await?;
        let last: Option<Option<u64>> = conn
            .exec_first(
                "SELECT MAX(last_tick) FROM stream_journal WHERE shard = ?",
                (shard,),
            )
            .await
            .map_err(mysql_err)?;
        greatest = greatest.max(last.flatten().unwrap_or(0));
    }
    Ok(greatest)
}

/// `Some(joined_seq)` if the user is a member of the group conversation.
pub(super) async fn joined_seq(
    shared: &Shared,
    user: UserId,
    conversation: u64,
) -> StoreResult<Option<u64>> {
    let mut conn = shared.mysql().await?;
    conn.exec_first(
        "SELECT joined_seq FROM members WHERE conversation_id = ? AND user_id = ?",
        (conversation, user),
    )
    .await
    .map_err(mysql_err)
}

/// The user's membership rows: conversation → (joined_seq, read_seq), for
/// conversations with id above `after`, ascending, at most `limit`.
pub(super) async fn memberships(
    shared: &Shared,
    user: UserId,
    after: u64,
    limit: usize,
) -> StoreResult<Vec<(u64, u64, u64)>> {
    let mut conn = shared.mysql().await?;
    conn.exec(
        "SELECT conversation_id, joined_seq, read_seq FROM members \
         WHERE user_id = ? AND conversation_id > ? ORDER BY conversation_id LIMIT ?",
        (user, after, limit as u64),
    )
    .await
    .map_err(mysql_err)
}

/// Membership rows of the user among `conversations`: conversation →
/// (joined_seq, read_seq).
pub(super) async fn memberships_in(
    shared: &Shared,
    user: UserId,
    conversations: &[u64],
) -> StoreResult<HashMap<u64, (u64, u64)>> {
    if conversations.is_empty() {
        return Ok(HashMap::new());
    }
    let mut conn = shared.mysql().await?;
    let sql = format!(
        "SELECT conversation_id, joined_seq, read_seq FROM members WHERE user_id = ? AND conversation_id IN ({})",
        placeholders(conversations.len())
    );
    let mut params = vec![Value::from(user)];
    params.extend(values(conversations));
    let rows: Vec<(u64, u64, u64)> = conn
        .exec(sql, Params::Positional(params))
        .await
        .map_err(mysql_err)?;
    Ok(rows.into_iter().map(|(c, j, r)| (c, (j, r))).collect())
}

/// Names of groups and users, for conversation titles.
pub(super) async fn titles(
    shared: &Shared,
    groups: &[GroupId],
    users: &[UserId],
) -> StoreResult<(HashMap<GroupId, String>, HashMap<UserId, String>)> {
    let mut conn = shared.mysql().await?;
    let mut group_names = HashMap::new();
    if !groups.is_empty() {
        let sql = format!(
            "SELECT id, name FROM chat_groups WHERE id IN ({})",
            placeholders(groups.len())
        );
        let rows: Vec<(u64, String)> = conn
            .exec(sql, Params::Positional(values(groups)))
            .await
            .map_err(mysql_err)?;
        group_names.extend(rows);
    }
    let mut user_names = HashMap::new();
    if !users.is_empty() {
        let sql = format!(
            "SELECT id, username FROM users WHERE id IN ({})",
            placeholders(users.len())
        );
        let rows: Vec<(u64, String)> = conn
            .exec(sql, Params::Positional(values(users)))
            .await
            .map_err(mysql_err)?;
        user_names.extend(rows);
    }
    Ok((group_names, user_names))
}

/// One conversation's share of a [`messages_of_many`] read: seqs in
/// `(after, upto]`, at most `limit`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Range {
    pub conversation: u64,
    pub after: u64,
    pub upto: u64,
    pub limit: usize,
}

/// Ranges per statement at most (four placeholders each).
const RANGES_PER_STATEMENT: usize = 256;

/// Stored messages of many conversations at once: for each range, its
/// rows with seq in `(after, upto]`, ascending, at most `limit`, as (seq,
/// message_id, body). One statement per shard (per
/// [`RANGES_PER_STATEMENT`] ranges), the shards asked at once.
pub(super) async fn messages_of_many(
    shared: &Shared,
    ranges: &[Range],
) -> StoreResult<Vec<Vec<(u64, u64, Vec<u8>)>>> {
    let mut out: Vec<Vec<(u64, u64, Vec<u8>)>> = vec![Vec::new(); ranges.len()];
    let wanted = ranges
        .iter()
        .enumerate()
        .filter(|(_, r)| r.limit > 0 && r.upto > r.after);
    let answers = on_shards(
        shared,
        wanted,
        |(_, r)| r.conversation,
        |mut conn, part| async move {
            let mut found = Vec::new();
            for chunk in part.chunks(RANGES_PER_STATEMENT) {
                // Each range is its own indexed scan; the first column
                // says which range a row answers.
                let sql = vec![
                    "(SELECT ? AS i, seq, message_id, body FROM messages \
                     WHERE conversation_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?)";
                    chunk.len()
                ]
                .join(" UNION ALL ");
                let mut params = Vec::with_capacity(chunk.len() * 5);
                for &(i, r) in chunk {
                    params.extend([
                        Value::from(i as u64),
                        Value::from(r.conversation),
                        Value::from(r.after),
                        Value::from(r.upto),
                        Value::from(r.limit as u64),
                    ]);
                }
                let rows: Vec<(u64, u64, u64, Vec<u8>)> = conn
                    .exec(sql, Params::Positional(params))
                    .await
                    .map_err(mysql_err)?;
                found.extend(rows);
            }
            Ok(found)
        },
    )
    .await?;
    for rows in answers {
        for (i, seq, message_id, body) in rows {
            if let Some(list) = out.get_mut(i as usize) {
                list.push((seq, message_id, body));
            }
        }
    }
    for list in &mut out {
        // UNION ALL keeps no order across its parts.
        list.sort_unstable_by_key(|m| m.0);
    }
    Ok(out)
}

/// A send looked up by its dedup key.
pub(super) struct SentQuery<'a> {
    pub conversation: u64,
    pub sender: UserId,
    pub client_msg_id: &'a str,
}

/// For each query, the ack of the stored message with that conversation,
/// sender and client_msg_id (the lowest seq, should there be several), or
/// `None`: one statement per shard for all of them, through the dedup-key
/// index, the shards asked at once.
pub(super) async fn find_sent(
    shared: &Shared,
    queries: &[SentQuery<'_>],
) -> StoreResult<Vec<Option<Ack>>> {
    let mut found = vec![None; queries.len()];
    if queries.is_empty() {
        return Ok(found);
    }
    let keys: Vec<(u64, u64)> = queries
        .iter()
        .map(|q| (q.conversation, dedup_key(q.sender, q.client_msg_id)))
        .collect();
    let keys = &keys;
    let answers = on_shards(
        shared,
        0..queries.len(),
        |&i| keys[i].0,
        |mut conn, part| async move {
            let condition =
                vec!["(conversation_id = ? AND dedup_key = ?)"; part.len()].join(" OR ");
            let params: Vec<Value> = part
                .iter()
                .flat_map(|&i| [Value::from(keys[i].0), Value::from(keys[i].1)])
                .collect();
            conn.exec::<(u64, u64, u64, u64, i64, Vec<u8>), _, _>(
                format!(
                    "SELECT conversation_id, dedup_key, seq, message_id, server_time_ms, body \
                     FROM messages WHERE {condition} ORDER BY seq"
                ),
                Params::Positional(params),
            )
            .await
            .map_err(mysql_err)
        },
    )
    .await?;
    for rows in answers {
        for (conversation, key, seq, message_id, server_time_ms, body) in rows {
            // The key is a hash: believe a row only if it is the same send.
            let Ok(stored) = im_proto::pb::Message::decode(body.as_slice()) else {
                continue;
            };
            for (i, q) in queries.iter().enumerate() {
                if found[i].is_none()
                    && keys[i] == (conversation, key)
                    && stored.sender_id == q.sender
                    && stored.client_msg_id == q.client_msg_id
                {
                    found[i] = Some(Ack {
                        message_id,
                        conversation_id: conversation,
                        seq,
                        server_time_ms,
                    });
                }
            }
        }
    }
    Ok(found)
}

/// Moves the read cursor forward: `Some((from, to))` if it moved, `None` if
/// not; `Err(NotMember)` for a group the user is not in. Direct
/// conversations get their row on first use.
pub(super) async fn advance_read(
    shared: &Shared,
    user: UserId,
    conversation: ConversationId,
    seq: u64,
) -> StoreResult<Option<(u64, u64)>> {
    let mut conn = shared.mysql().await?;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(mysql_err)?;
    let current: Option<u64> = tx
        .exec_first(
            "SELECT read_seq FROM members WHERE conversation_id = ? AND user_id = ? FOR UPDATE",
            (conversation.raw(), user),
        )
        .await
        .map_err(mysql_err)?;
    let moved = match current {
        Some(from) if seq > from => {
            tx.exec_drop(
                "UPDATE members SET read_seq = ? WHERE conversation_id = ? AND user_id = ?",
                (seq, conversation.raw(), user),
            )
            .await
            .map_err(mysql_err)?;
            Some((from, seq))
        }
        Some(_) => None,
        None if conversation.group_id().is_some() => return Err(StoreError::NotMember),
        None => {
            tx.exec_drop(
                "INSERT INTO members (conversation_id, user_id, joined_seq, joined_order, read_seq) \
                 VALUES (?, ?, 0, 0, ?) ON DUPLICATE KEY UPDATE read_seq = GREATEST(read_seq, VALUES(read_seq))",
                (conversation.raw(), user, seq),
            )
            .await
            .map_err(mysql_err)?;
            (seq > 0).then_some((0, seq))
        }
    };
    tx.commit().await.map_err(mysql_err)?;
    Ok(moved)
}

// ---- groups ----

/// Bumps a group's membership version and drops its cached member set, so
/// the next append reloads it (appends are authorised against that set).
/// It runs after the MySQL commit, so it is retried a few times (for about
/// a second and a half) before the change is reported as failed; callers
/// invalidate even when a request changed nothing, so that the client's
/// retry of a failed change repairs the cache too.
async fn invalidate_members(shared: &Shared, conversation: u64) -> StoreResult<()> {
    let layout = &shared.layout;
    let shard = layout.shard_of(conversation);
    let mut pause = std::time::Duration::from_millis(50);
    let mut attempts = 0;
    loop {
        let result: StoreResult<()> = async {
            let mut redis = shared.redis().await?;
            redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(layout.members_version_key(shard, conversation))
                .ignore()
                .cmd("DEL")
                .arg(layout.members_key(shard, conversation))
                .ignore()
                .query_async::<()>(&mut redis)
                .await
                .map_err(redis_err)
        }
        .await;
        attempts += 1;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if attempts >= 5 => return Err(e),
            Err(e) => {
                tracing::warn!(conversation, error = %e, "dropping a cached member set failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
}

/// Joining order: Unix milliseconds times a million plus the position in
/// the request, so one request keeps its order.
fn join_order(index: usize) -> u64 {
    (im_proto::now_ms().max(0) as u64) * 1_000_000 + index as u64
}

async fn check_users_exist(
    tx: &mut mysql_async::Transaction<'_>,
    users: &[UserId],
) -> StoreResult<()> {
    if users.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "SELECT COUNT(*) FROM users WHERE id IN ({})",
        placeholders(users.len())
    );
    let count: Option<u64> = tx
        .exec_first(sql, Params::Positional(values(users)))
        .await
        .map_err(mysql_err)?;
    if count.unwrap_or(0) as usize != users.len() {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

async fn insert_members(
    tx: &mut mysql_async::Transaction<'_>,
    conversation: u64,
    users: &[UserId],
    joined_seq: u64,
) -> StoreResult<()> {
    if users.is_empty() {
        return Ok(());
    }
    // A new member has read nothing, but what came before joining is not
    // theirs to read: the read cursor starts at the join.
    let rows = vec!["(?, ?, ?, ?, ?)"; users.len()].join(",");
    let sql = format!(
        "INSERT INTO members (conversation_id, user_id, joined_seq, joined_order, read_seq) VALUES {rows} \
         ON DUPLICATE KEY UPDATE joined_seq = VALUES(joined_seq), joined_order = VALUES(joined_order), \
         read_seq = VALUES(read_seq)"
    );
    let mut params = Vec::with_capacity(users.len() * 5);
    for (i, &user) in users.iter().enumerate() {
        params.extend([
            Value::from(conversation),
            Value::from(user),
            Value::from(joined_seq),
            Value::from(join_order(i)),
            Value::from(joined_seq),
        ]);
    }
    tx.exec_drop(sql, Params::Positional(params))
        .await
        .map_err(mysql_err)
}

/// `LimitExceeded` if one of `users` belongs to `max` groups already. (Two
/// transactions adding the same user at once may both pass: the limit can
/// be overshot by the number of such races, never by more.)
async fn check_group_counts(
    tx: &mut mysql_async::Transaction<'_>,
    users: &[UserId],
    max: usize,
) -> StoreResult<()> {
    if users.is_empty() {
        return Ok(());
    }
    let mut params = values(users);
    params.push(Value::from(GROUP_BASE));
    params.push(Value::from(max as u64));
    let full: Option<u64> = tx
        .exec_first(
            format!(
                "SELECT user_id FROM members WHERE user_id IN ({}) AND conversation_id > ? \
                 GROUP BY user_id HAVING COUNT(*) >= ? LIMIT 1",
                placeholders(users.len())
            ),
            Params::Positional(params),
        )
        .await
        .map_err(mysql_err)?;
    match full {
        Some(_) => Err(StoreError::LimitExceeded(
            crate::store::GROUPS_PER_USER_LIMIT,
        )),
        None => Ok(()),
    }
}

async fn load_group(conn: &mut impl Queryable, group: GroupId) -> StoreResult<Option<GroupRecord>> {
    let conversation = group_conversation(group)?;
    let row: Option<(String, u64, u64)> = conn
        .exec_first(
            "SELECT g.name, g.owner_id, (SELECT COUNT(*) FROM members m WHERE m.conversation_id = ?) \
             FROM chat_groups g WHERE g.id = ?",
            (conversation, group),
        )
        .await
        .map_err(mysql_err)?;
    Ok(row.map(|(name, owner, count)| GroupRecord {
        id: group,
        name,
        owner,
        member_count: count as u32,
    }))
}

pub(super) async fn create_group(
    shared: &Shared,
    owner: UserId,
    name: &str,
    members: &[UserId],
    limits: GroupLimits,
) -> StoreResult<GroupRecord> {
    let mut all = vec![owner];
    for &m in members {
        if !all.contains(&m) {
            all.push(m);
        }
    }
    if all.len() > limits.max_members {
        return Err(StoreError::LimitExceeded("group size"));
    }
    let mut conn = shared.mysql().await?;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(mysql_err)?;
    check_users_exist(&mut tx, &all).await?;
    check_group_counts(&mut tx, &all, limits.max_groups_per_user).await?;
    tx.exec_drop(
        "INSERT INTO chat_groups (name, owner_id, created_ms) VALUES (?, ?, ?)",
        (name, owner, im_proto::now_ms()),
    )
    .await
    .map_err(mysql_err)?;
    let id = tx
        .last_insert_id()
        .ok_or_else(|| mysql_err("no insert id"))?;
    let conversation = group_conversation(id)?;
    insert_members(&mut tx, conversation, &all, 0).await?;
    tx.commit().await.map_err(mysql_err)?;
    invalidate_members(shared, conversation).await?;
    Ok(GroupRecord {
        id,
        name: name.to_string(),
        owner,
        member_count: all.len() as u32,
    })
}

pub(super) async fn add_members(
    shared: &Shared,
    group: GroupId,
    users: &[UserId],
    limits: GroupLimits,
) -> StoreResult<(GroupRecord, Vec<UserId>)> {
    let conversation = group_conversation(group)?;
    // New members see what is posted from now on.
    let joined_seq = shared
        .last_seqs(&[conversation])
        .await?
        .first()
        .copied()
        .unwrap_or(0);
    let mut conn = shared.mysql().await?;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(mysql_err)?;
    let locked: Option<u64> = tx
        .exec_first(
            "SELECT id FROM chat_groups WHERE id = ? FOR UPDATE",
            (group,),
        )
        .await
        .map_err(mysql_err)?;
    if locked.is_none() {
        return Err(StoreError::NotFound);
    }
    let existing: HashSet<u64> = tx
        .exec::<u64, _, _>(
            "SELECT user_id FROM members WHERE conversation_id = ?",
            (conversation,),
        )
        .await
        .map_err(mysql_err)?
        .into_iter()
        .collect();
    let mut added: Vec<UserId> = Vec::new();
    for &u in users {
        if !existing.contains(&u) && !added.contains(&u) {
            added.push(u);
        }
    }
    if existing.len() + added.len() > limits.max_members {
        return Err(StoreError::LimitExceeded("group size"));
    }
    check_users_exist(&mut tx, &added).await?;
    check_group_counts(&mut tx, &added, limits.max_groups_per_user).await?;
    insert_members(&mut tx, conversation, &added, joined_seq).await?;
    let record = load_group(&mut tx, group)
        .await?
        .ok_or(StoreError::NotFound)?;
    tx.commit().await.map_err(mysql_err)?;
    invalidate_members(shared, conversation).await?;
    Ok((record, added))
}

pub(super) async fn remove_members(
    shared: &Shared,
    group: GroupId,
    users: &[UserId],
) -> StoreResult<(GroupRecord, Vec<UserId>)> {
    let conversation = group_conversation(group)?;
    let mut conn = shared.mysql().await?;
    let mut tx = conn
        .start_transaction(TxOpts::default())
        .await
        .map_err(mysql_err)?;
    let owner: Option<u64> = tx
        .exec_first(
            "SELECT owner_id FROM chat_groups WHERE id = ? FOR UPDATE",
            (group,),
        )
        .await
        .map_err(mysql_err)?;
    let Some(owner) = owner else {
        return Err(StoreError::NotFound);
    };
    let existing: Vec<u64> = tx
        .exec(
            "SELECT user_id FROM members WHERE conversation_id = ?",
            (conversation,),
        )
        .await
        .map_err(mysql_err)?;
    let mut removed: Vec<UserId> = Vec::new();
    for &u in users {
        if existing.contains(&u) && !removed.contains(&u) {
            removed.push(u);
        }
    }
    if !removed.is_empty() {
        let sql = format!(
            "DELETE FROM members WHERE conversation_id = ? AND user_id IN ({})",
            placeholders(removed.len())
        );
        let mut params = vec![Value::from(conversation)];
        params.extend(values(&removed));
        tx.exec_drop(sql, Params::Positional(params))
            .await
            .map_err(mysql_err)?;
        if removed.contains(&owner) {
            let next: Option<u64> = tx
                .exec_first(
                    "SELECT user_id FROM members WHERE conversation_id = ? ORDER BY joined_order, user_id LIMIT 1",
                    (conversation,),
                )
                .await
                .map_err(mysql_err)?;
            if let Some(next) = next {
                tx.exec_drop(
                    "UPDATE chat_groups SET owner_id = ? WHERE id = ?",
                    (next, group),
                )
                .await
                .map_err(mysql_err)?;
            }
        }
    }
    let record = load_group(&mut tx, group)
        .await?
        .ok_or(StoreError::NotFound)?;
    tx.commit().await.map_err(mysql_err)?;
    invalidate_members(shared, conversation).await?;
    Ok((record, removed))
}

pub(super) async fn group(shared: &Shared, group: GroupId) -> StoreResult<Option<GroupRecord>> {
    if ConversationId::group(group).is_none() {
        return Ok(None);
    }
    let mut conn = shared.mysql().await?;
    load_group(&mut conn, group).await
}

pub(super) async fn member_ids(shared: &Shared, conversation: u64) -> StoreResult<Vec<UserId>> {
    let mut conn = shared.mysql().await?;
    conn.exec(
        "SELECT user_id FROM members WHERE conversation_id = ? ORDER BY joined_order, user_id",
        (conversation,),
    )
    .await
    .map_err(mysql_err)
}

pub(super) async fn group_members(shared: &Shared, group: GroupId) -> StoreResult<Vec<UserId>> {
    match ConversationId::group(group) {
        Some(c) => member_ids(shared, c.raw()).await,
        None => Ok(Vec::new()),
    }
}

pub(super) async fn user_groups(
    shared: &Shared,
    user: UserId,
    after: GroupId,
    limit: usize,
) -> StoreResult<(Vec<GroupRecord>, bool)> {
    let mut conn = shared.mysql().await?;
    let rows: Vec<(u64, String, u64, u64)> = conn
        .exec(
            "SELECT g.id, g.name, g.owner_id, \
                    (SELECT COUNT(*) FROM members c WHERE c.conversation_id = m.conversation_id) \
             FROM members m JOIN chat_groups g ON m.conversation_id = g.id + ? \
             WHERE m.user_id = ? AND m.conversation_id > ? ORDER BY m.conversation_id LIMIT ?",
            (
                GROUP_BASE,
                user,
                GROUP_BASE.saturating_add(after),
                limit as u64 + 1,
            ),
        )
        .await
        .map_err(mysql_err)?;
    let has_more = rows.len() > limit;
    let groups = rows
        .into_iter()
        .take(limit)
        .map(|(id, name, owner, count)| GroupRecord {
            id,
            name,
            owner,
            member_count: count as u32,
        })
        .collect();
    Ok((groups, has_more))
}
