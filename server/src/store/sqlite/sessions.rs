//! Passwords and sessions on SQLite: the statements behind the account and
//! session methods of the [`Store`](crate::store::Store) trait. Writes run
//! on the writer thread (as `writer::Call` jobs), reads on the read pool.

use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{
    NewSession, SessionId, SessionRecord, SessionScope, SessionTouch, StoreError, StoreResult,
    UserId,
};

pub(super) fn set_password(conn: &Connection, user: UserId, hash: &str) -> StoreResult<()> {
    let changed = conn
        .prepare_cached("UPDATE users SET password_hash = ?2 WHERE id = ?1")?
        .execute(params![user, hash])?;
    if changed == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub(super) fn create_session(
    conn: &Connection,
    s: &NewSession,
) -> StoreResult<(SessionId, Vec<SessionId>)> {
    conn.prepare_cached(
        "INSERT INTO sessions (user_id, device_name, address, created_ms, last_seen_ms)
         VALUES (?1, ?2, ?3, ?4, ?4)",
    )?
    .execute(params![s.user, s.device_name, s.address, s.now_ms])?;
    let id = SessionId::try_from(conn.last_insert_rowid())
        .map_err(|_| StoreError::Backend("negative session id".into()))?;
    // The newest first; everything past the limit is ended.
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM sessions
         WHERE user_id = ?1 AND ended_ms IS NULL AND last_seen_ms >= ?2 AND id <> ?3
         ORDER BY last_seen_ms DESC, id DESC",
    )?;
    let others: Vec<SessionId> = stmt
        .query_map(params![s.user, s.live_since_ms, id], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let keep = s.max_live.saturating_sub(1);
    let ended: Vec<SessionId> = others.into_iter().skip(keep).collect();
    let mut end = conn.prepare_cached("UPDATE sessions SET ended_ms = ?2 WHERE id = ?1")?;
    for &old in &ended {
        end.execute(params![old, s.now_ms])?;
    }
    Ok((id, ended))
}

pub(super) fn end_sessions(
    conn: &Connection,
    user: UserId,
    scope: SessionScope,
    now_ms: i64,
) -> StoreResult<Vec<SessionId>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM sessions WHERE user_id = ?1 AND ended_ms IS NULL ORDER BY id",
    )?;
    let live: Vec<SessionId> = stmt
        .query_map(params![user], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let ended: Vec<SessionId> = match scope {
        SessionScope::One(id) if live.contains(&id) => vec![id],
        SessionScope::One(_) => return Err(StoreError::NotFound),
        SessionScope::All => live,
        SessionScope::AllBut(keep) => live.into_iter().filter(|&id| id != keep).collect(),
    };
    let mut end = conn.prepare_cached("UPDATE sessions SET ended_ms = ?2 WHERE id = ?1")?;
    for &id in &ended {
        end.execute(params![id, now_ms])?;
    }
    Ok(ended)
}

pub(super) fn touch_sessions(conn: &Connection, touches: &[SessionTouch]) -> StoreResult<()> {
    let mut seen = conn
        .prepare_cached("UPDATE sessions SET last_seen_ms = max(last_seen_ms, ?2) WHERE id = ?1")?;
    let mut address = conn.prepare_cached("UPDATE sessions SET address = ?2 WHERE id = ?1")?;
    for t in touches {
        seen.execute(params![t.id, t.at_ms])?;
        if let Some(a) = &t.address {
            address.execute(params![t.id, a])?;
        }
    }
    Ok(())
}

pub(super) fn sessions(
    conn: &Connection,
    user: UserId,
    live_since_ms: i64,
) -> StoreResult<Vec<SessionRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, device_name, address, created_ms, last_seen_ms FROM sessions
         WHERE user_id = ?1 AND ended_ms IS NULL AND last_seen_ms >= ?2
         ORDER BY id DESC",
    )?;
    let rows = stmt
        .query_map(params![user, live_since_ms], |row| {
            Ok(SessionRecord {
                id: row.get(0)?,
                user,
                device_name: row.get(1)?,
                address: row.get(2)?,
                created_ms: row.get(3)?,
                last_seen_ms: row.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn ended_since(
    conn: &Connection,
    since_ms: i64,
    limit: usize,
) -> StoreResult<Vec<(SessionId, i64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, ended_ms FROM sessions WHERE ended_ms >= ?1
         ORDER BY ended_ms DESC LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(
            params![since_ms, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn session_ended(conn: &Connection, id: SessionId) -> StoreResult<bool> {
    let ended: Option<Option<i64>> = conn
        .prepare_cached("SELECT ended_ms FROM sessions WHERE id = ?1")?
        .query_row(params![id], |row| row.get(0))
        .optional()?;
    Ok(!matches!(ended, Some(None)))
}
