//! Reads that combine the Redis recent cache with MySQL: sync, history,
//! the conversation list, receipts' cursors.
//!
//! A conversation's messages live in the recent cache (a contiguous run of
//! its newest seqs, never trimmed below what MySQL has stored) and in MySQL
//! (everything the worker has stored). A range is read from the cache
//! first and completed from MySQL below the cache's lowest seq, so the
//! boundary never leaves a gap; whatever is returned is contiguous. Reads
//! of many conversations (sync, the conversation list) ask the cache in
//! one round trip and MySQL in one statement per shard, never once per
//! conversation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;

use im_proto::ids::ConversationKind;
use im_proto::{ConversationId, pb};
use im_storage::layout;
use prost::Message as _;

use im_storage::script::{LuaScript, ScriptCall, query_idempotent};

use super::{Shared, redis_err, sql};
use crate::store::{CursorKind, CursorMove, Page, StoreError, StoreResult, UserId};

/// Scripts are hashed once, not per call.
static RECENT_RANGE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(layout::RECENT_RANGE_SCRIPT));
static ADVANCE: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(ADVANCE_SCRIPT));

/// Messages read per conversation when looking for the senders a receipt
/// concerns.
const RECEIPT_SCAN: u64 = 2000;

/// Decodes cache records of a conversation into messages.
fn decode_records(records: Vec<Vec<u8>>, shard: u32) -> StoreResult<Vec<pb::Message>> {
    records
        .iter()
        .map(|r| {
            layout::decode_record(r, shard)
                .map_err(|e| StoreError::Backend(format!("bad record: {e}")))
        })
        .collect()
}

/// A stored row back into a message.
fn decode_row((seq, message_id, body): (u64, u64, Vec<u8>)) -> StoreResult<pb::Message> {
    let mut message = pb::Message::decode(body.as_slice())
        .map_err(|e| StoreError::Backend(format!("bad stored message: {e}")))?;
    message.seq = seq;
    message.message_id = message_id;
    Ok(message)
}

/// Keeps the run of messages that starts right after `after` and has no
/// gap.
fn contiguous_from(after: u64, messages: Vec<pb::Message>) -> Vec<pb::Message> {
    (after + 1..)
        .zip(messages)
        .take_while(|(expected, m)| m.seq == *expected)
        .map(|(_, m)| m)
        .collect()
}

/// The range MySQL must supply for messages in `(after, upto]` given the
/// cache's answer (ascending): none if the cache starts right after
/// `after`, else what lies below the cache's first seq.
fn below_cache(after: u64, upto: u64, cached: &[pb::Message]) -> Option<(u64, u64)> {
    match cached.first() {
        Some(m) if m.seq == after + 1 => None,
        Some(m) => Some((after, m.seq - 1)),
        None => Some((after, upto)),
    }
}

/// Messages with seq in `(after, ...]`, oldest first, at most `limit`,
/// from the rows MySQL gave for the range below the cache (if one was
/// asked for) followed by the cache's answer; nothing at or below `floor`
/// (what retention removed) counts.
fn join_ascending(
    after: u64,
    floor: u64,
    limit: usize,
    stored: Option<Vec<(u64, u64, Vec<u8>)>>,
    cached: Vec<pb::Message>,
) -> StoreResult<Vec<pb::Message>> {
    let after = after.max(floor);
    let Some(rows) = stored else {
        let cached = cached.into_iter().filter(|m| m.seq > after).collect();
        let mut messages = contiguous_from(after, cached);
        messages.truncate(limit);
        return Ok(messages);
    };
    let mut messages = rows
        .into_iter()
        .filter(|r| r.0 > after)
        .map(decode_row)
        .collect::<StoreResult<Vec<_>>>()?;
    let last = messages.last().map_or(after, |m| m.seq);
    messages.extend(cached.into_iter().filter(|m| m.seq > last));
    let mut messages = contiguous_from(after, messages);
    messages.truncate(limit);
    Ok(messages)
}

/// One conversation's answer to [`complete_many`]: its messages, and its
/// retention floor where the range reached below it (else 0).
type Completed = (Vec<pb::Message>, u64);

/// Messages with seq in `(after, upto]`, oldest first, at most `limit`,
/// for many conversations at once: `ranges` are (conversation, after, upto,
/// limit), `cached` the cache's answers in the same order. MySQL is asked
/// once per shard for all of them. Where MySQL's rows do not start right
/// after `after` (retention removed the oldest), the conversations' floors
/// are read (once per shard for all of them) and the answers start above
/// them.
async fn complete_many(
    shared: &Shared,
    ranges: &[(u64, u64, u64, usize)],
    cached: Vec<Vec<pb::Message>>,
) -> StoreResult<Vec<Completed>> {
    let mut needed: Vec<sql::Range> = Vec::new();
    let mut slot: Vec<Option<usize>> = Vec::with_capacity(ranges.len());
    for (&(conversation, after, upto, limit), cached) in ranges.iter().zip(&cached) {
        slot.push(below_cache(after, upto, cached).map(|(after, below)| {
            needed.push(sql::Range {
                conversation,
                after,
                upto: below,
                limit,
            });
            needed.len() - 1
        }));
    }
    let mut stored = if needed.is_empty() {
        Vec::new()
    } else {
        sql::messages_of_many(shared, &needed).await?
    };
    // A range MySQL cannot start is below the conversation's floor.
    let gaps: Vec<u64> = needed
        .iter()
        .zip(&stored)
        .filter(|(r, rows)| r.limit > 0 && rows.first().map(|row| row.0) != Some(r.after + 1))
        .map(|(r, _)| r.conversation)
        .collect();
    let floors = if gaps.is_empty() {
        HashMap::new()
    } else {
        sql::floors(shared, &gaps).await?
    };
    ranges
        .iter()
        .zip(cached)
        .zip(slot)
        .map(|((&(conv, after, _, limit), cached), slot)| {
            let floor = floors
                .get(&conv)
                .copied()
                .filter(|&f| f > after)
                .unwrap_or(0);
            let rows = slot.map(|i| std::mem::take(&mut stored[i]));
            Ok((join_ascending(after, floor, limit, rows, cached)?, floor))
        })
        .collect()
}

/// The cache's records of each conversation with seq in `(after, upto]`,
/// oldest first, at most `limit` each, in one round trip.
async fn cached_ranges(
    shared: &Shared,
    ranges: &[(u64, u64, u64)],
    limit: usize,
) -> StoreResult<Vec<Vec<pb::Message>>> {
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    // Read-only single-key calls, so pipelined: a redirection resends
    // them all harmlessly. A node that lacks the script (restarted, or new
    // to a slot) is sent it whole.
    let calls: Vec<ScriptCall<'_>> = ranges
        .iter()
        .map(|&(conv, after, upto)| {
            let shard = shared.layout.shard_of(conv);
            let mut call = RECENT_RANGE.call();
            call.key(shared.layout.recent_key(shard, conv))
                .arg(after)
                .arg(upto)
                .arg(limit);
            call
        })
        .collect();
    let mut conn = shared.redis().await?;
    let found: Vec<Vec<Vec<u8>>> = query_idempotent(&mut conn, &calls)
        .await
        .map_err(redis_err)?;
    ranges
        .iter()
        .zip(found)
        .map(|(&(conv, _, _), records)| decode_records(records, shared.layout.shard_of(conv)))
        .collect()
}

pub(super) async fn sync(
    shared: &Shared,
    user: UserId,
    cursors: &[(ConversationId, u64)],
    limit: usize,
) -> StoreResult<Page> {
    let mut wanted: BTreeMap<u64, u64> = BTreeMap::new();
    for &(conv, seq) in cursors {
        let cursor = wanted.entry(conv.raw()).or_insert(seq);
        *cursor = (*cursor).min(seq);
    }
    // Who may read what, from where.
    let groups: Vec<u64> = wanted
        .keys()
        .copied()
        .filter(|&c| ConversationId::from_raw(c).is_some_and(|c| c.group_id().is_some()))
        .collect();
    let joined = sql::memberships_in(shared, user, &groups).await?;
    let mut visible: Vec<(u64, u64)> = Vec::new();
    for (&conv, &cursor) in &wanted {
        let Some(id) = ConversationId::from_raw(conv) else {
            continue;
        };
        let from = match id.kind() {
            ConversationKind::Direct { .. } if id.peer_of(user).is_some() => cursor,
            ConversationKind::Group(_) => match joined.get(&conv) {
                Some(&(joined_seq, _)) => cursor.max(joined_seq),
                None => continue,
            },
            ConversationKind::Direct { .. } => continue,
        };
        visible.push((conv, from));
    }
    let convs: Vec<u64> = visible.iter().map(|&(c, _)| c).collect();
    let lasts = shared.last_seqs(&convs).await?;
    let ranges: Vec<(u64, u64, u64)> = visible
        .iter()
        .zip(&lasts)
        .filter(|((_, from), last)| from < *last)
        .map(|(&(conv, from), &last)| (conv, from, last))
        .collect();
    let cached = cached_ranges(shared, &ranges, limit).await?;

    // The page's room goes to the conversations in order; each takes what
    // its range holds (seqs are dense), so every share is known before
    // MySQL is asked.
    let mut page = Page::default();
    let mut shares: Vec<(u64, u64, u64, usize)> = Vec::with_capacity(ranges.len());
    let mut remaining = limit;
    for &(conv, from, last) in &ranges {
        if remaining == 0 {
            page.has_more = true;
            break;
        }
        shares.push((conv, from, last, remaining));
        remaining -= remaining.min(usize::try_from(last - from).unwrap_or(usize::MAX));
    }
    let mut cached = cached;
    cached.truncate(shares.len());
    let found = complete_many(shared, &shares, cached).await?;
    for (&(conv, from, last, _), (messages, floor)) in shares.iter().zip(found) {
        let remaining = limit.saturating_sub(page.messages.len());
        if floor > 0 {
            page.expired.push((conv, floor));
        }
        let reached = messages.last().map_or(from.max(floor), |m| m.seq);
        if reached < last || messages.len() > remaining {
            page.has_more = true;
        }
        page.messages.extend(messages.into_iter().take(remaining));
    }
    Ok(page)
}

pub(super) async fn history(
    shared: &Shared,
    user: UserId,
    conversation: ConversationId,
    before_seq: u64,
    limit: usize,
) -> StoreResult<Page> {
    let joined = shared
        .visibility(user, conversation)
        .await?
        .ok_or(StoreError::NotMember)?;
    let conv = conversation.raw();
    let last = shared
        .last_seqs(&[conv])
        .await?
        .first()
        .copied()
        .unwrap_or(0);
    let upto = if before_seq == 0 {
        last
    } else {
        last.min(before_seq - 1)
    };
    if upto <= joined || limit == 0 {
        return Ok(Page::default());
    }
    let after = joined.max(upto.saturating_sub(limit as u64));
    let cached = cached_ranges(shared, &[(conv, after, upto)], limit).await?;
    let (messages, floor) = complete_many(shared, &[(conv, after, upto, limit)], cached)
        .await?
        .pop()
        .unwrap_or_default();
    // A page that reached the floor has nothing visible below it.
    if floor > 0 {
        return Ok(Page {
            messages,
            has_more: false,
            expired: vec![(conv, floor)],
        });
    }
    Ok(Page {
        messages,
        has_more: after > joined,
        expired: Vec::new(),
    })
}

pub(super) async fn conversations(
    shared: &Shared,
    user: UserId,
    after: u64,
    limit: usize,
) -> StoreResult<(Vec<pb::ConversationSummary>, bool)> {
    let rows = sql::memberships(shared, user, after, limit + 1).await?;
    let boundary = rows.get(limit).map(|r| r.0);
    // Direct conversations the worker has not stored yet.
    let mut conn = shared.redis().await?;
    let indexed: Vec<u64> = redis::cmd("SMEMBERS")
        .arg(shared.layout.direct_index_key(user))
        .query_async(&mut conn)
        .await
        .map_err(redis_err)?;
    drop(conn);
    let mut merged: BTreeMap<u64, (u64, u64)> = rows
        .into_iter()
        .take(limit)
        .map(|(c, joined, read)| (c, (joined, read)))
        .collect();
    for conv in indexed {
        if conv > after && boundary.is_none_or(|b| conv < b) {
            merged.entry(conv).or_insert((0, 0));
        }
    }
    let more_indexed = merged.len() > limit;
    let list: Vec<(u64, u64, u64)> = merged
        .into_iter()
        .take(limit)
        .map(|(c, (j, r))| (c, j, r))
        .collect();
    let has_more = boundary.is_some() || more_indexed;

    let convs: Vec<u64> = list.iter().map(|r| r.0).collect();
    let lasts = shared.last_seqs(&convs).await?;
    // The last message, where the user may see it: the range (last-1, last].
    let ranges: Vec<(u64, u64, u64)> = list
        .iter()
        .zip(&lasts)
        .filter(|((_, joined, _), last)| *last > joined)
        .map(|(&(c, _, _), &last)| (c, last - 1, last))
        .collect();
    let cached = cached_ranges(shared, &ranges, 1).await?;
    let shares: Vec<(u64, u64, u64, usize)> = ranges
        .iter()
        .map(|&(conv, after, upto)| (conv, after, upto, 1))
        .collect();
    let found = complete_many(shared, &shares, cached).await?;
    let mut last_messages: HashMap<u64, pb::Message> = HashMap::new();
    for (&(conv, _, _), (m, _)) in ranges.iter().zip(found) {
        if let Some(m) = m.into_iter().next() {
            last_messages.insert(conv, m);
        }
    }

    let mut group_ids = Vec::new();
    let mut peers = Vec::new();
    for &(conv, _, _) in &list {
        let Some(id) = ConversationId::from_raw(conv) else {
            continue;
        };
        match id.kind() {
            ConversationKind::Group(g) => group_ids.push(g),
            ConversationKind::Direct { .. } => peers.extend(id.peer_of(user)),
        }
    }
    let (group_names, user_names) = sql::titles(shared, &group_ids, &peers).await?;
    let (own, marks) = own_unstored_sends(shared, user, &convs, &lasts).await?;
    // The worker writes a sender's cursor before it raises the stored
    // watermark past the message, but the cursors above were read before
    // the watermarks: where a watermark is above the cursor seen, the
    // cursor may have moved in between, so read it again (after the
    // watermark, which makes it current).
    let stale: Vec<u64> = list
        .iter()
        .zip(&marks)
        .filter(|((_, joined, read), mark)| **mark > (*read).max(*joined))
        .map(|((conv, _, _), _)| *conv)
        .collect();
    let fresh = sql::memberships_in(shared, user, &stale).await?;
    let summaries = list
        .into_iter()
        .zip(lasts)
        .filter_map(|((conv, joined, read), last)| {
            let id = ConversationId::from_raw(conv)?;
            // Read cursors start at the join (older rows may say 0);
            // sending marks everything before as read, which the worker
            // records when it stores the message: until then the cache
            // tells.
            let again = fresh.get(&conv).map_or(0, |&(_, read)| read);
            let read = read
                .max(again)
                .max(joined)
                .max(own.get(&conv).copied().unwrap_or(0));
            let (peer_id, group_id, title) = match id.kind() {
                ConversationKind::Group(g) => {
                    (0, g, group_names.get(&g).cloned().unwrap_or_default())
                }
                ConversationKind::Direct { .. } => {
                    let peer = id.peer_of(user)?;
                    (peer, 0, user_names.get(&peer).cloned().unwrap_or_default())
                }
            };
            Some(pb::ConversationSummary {
                conversation_id: conv,
                peer_id,
                group_id,
                title,
                last_seq: last,
                last_message: last_messages.remove(&conv),
                read_seq: read,
                unread_count: last.saturating_sub(read),
            })
        })
        .collect();
    Ok((summaries, has_more))
}

/// Per conversation, the highest seq `user` sent among the messages the
/// worker has not stored yet (the stored ones have moved the read cursor in
/// MySQL already), and each conversation's stored watermark (0 if none).
async fn own_unstored_sends(
    shared: &Shared,
    user: UserId,
    convs: &[u64],
    lasts: &[u64],
) -> StoreResult<(HashMap<u64, u64>, Vec<u64>)> {
    if convs.is_empty() {
        return Ok((HashMap::new(), Vec::new()));
    }
    let mut pipe = redis::pipe();
    for &conv in convs {
        let shard = shared.layout.shard_of(conv);
        pipe.cmd("HGET")
            .arg(shared.layout.stored_key(shard))
            .arg(conv);
    }
    let mut conn = shared.redis().await?;
    let stored: Vec<Option<u64>> = pipe.query_async(&mut conn).await.map_err(redis_err)?;
    drop(conn);
    let stored: Vec<u64> = stored.into_iter().map(Option::unwrap_or_default).collect();
    let ranges: Vec<(u64, u64, u64)> = convs
        .iter()
        .zip(lasts)
        .zip(&stored)
        .filter_map(|((&conv, &last), &stored)| {
            (stored < last).then_some((conv, stored.max(last.saturating_sub(RECEIPT_SCAN)), last))
        })
        .collect();
    let cached = cached_ranges(shared, &ranges, RECEIPT_SCAN as usize).await?;
    let mut own = HashMap::new();
    for ((conv, _, _), messages) in ranges.into_iter().zip(cached) {
        if let Some(m) = messages.iter().rev().find(|m| m.sender_id == user) {
            own.insert(conv, m.seq);
        }
    }
    Ok((own, stored))
}

/// Moves a delivered cursor forward only (in Redis), returning the old one.
const ADVANCE_SCRIPT: &str = r#"
local old = tonumber(redis.call("HGET", KEYS[1], ARGV[1]) or "0")
local new = tonumber(ARGV[2])
if new > old then redis.call("HSET", KEYS[1], ARGV[1], ARGV[2]) end
return old
"#;

pub(super) async fn advance_cursor(
    shared: &Shared,
    user: UserId,
    conversation: ConversationId,
    kind: CursorKind,
    seq: u64,
) -> StoreResult<Option<CursorMove>> {
    // Cursors start at the join: what came before is not the user's.
    let joined = shared
        .visibility(user, conversation)
        .await?
        .ok_or(StoreError::NotMember)?;
    let last = shared
        .last_seqs(&[conversation.raw()])
        .await?
        .first()
        .copied()
        .unwrap_or(0);
    let to = seq.min(last);
    match kind {
        CursorKind::Read => Ok(sql::advance_read(shared, user, conversation, to)
            .await?
            .map(|(from, to)| CursorMove {
                from: from.max(joined),
                to,
            })
            .filter(|m| m.to > m.from)),
        CursorKind::Delivered => {
            let mut conn = shared.redis().await?;
            let mut call = ADVANCE.call();
            call.key(shared.layout.delivered_key(user))
                .arg(conversation.raw())
                .arg(to);
            // Only ever moves the cursor forward, so a resent call is
            // harmless.
            let from: u64 = query_idempotent(&mut conn, &[call])
                .await
                .map_err(redis_err)?
                .pop()
                .unwrap_or(0);
            let from = from.max(joined);
            Ok((to > from).then_some(CursorMove { from, to }))
        }
    }
}

pub(super) async fn senders_between(
    shared: &Shared,
    conversation: ConversationId,
    after: u64,
    upto: u64,
    limit: usize,
) -> StoreResult<Vec<UserId>> {
    if upto <= after {
        return Ok(Vec::new());
    }
    let conv = conversation.raw();
    let after = after.max(upto.saturating_sub(RECEIPT_SCAN));
    let scan = (upto - after) as usize;
    let cached = cached_ranges(shared, &[(conv, after, upto)], scan).await?;
    let (messages, _) = complete_many(shared, &[(conv, after, upto, scan)], cached)
        .await?
        .pop()
        .unwrap_or_default();
    let mut seen = HashSet::new();
    Ok(messages
        .into_iter()
        .map(|m| m.sender_id)
        .filter(|&s| s != 0 && seen.insert(s))
        .take(limit)
        .collect())
}
