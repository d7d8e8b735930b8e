//! The Redis side of one stream shard, as the storage worker sees it: the
//! consumer group, reading new and pending entries, claiming entries a dead
//! consumer left, acknowledging with the stored watermark, dead letters,
//! and trimming below what every group has stored. Replies are parsed here
//! and nowhere else.

use std::time::Duration;

use redis::{Value, cmd, pipe};

use crate::batch::{Content, Entry, EntryId};
use crate::layout::{Layout, RECORD_FIELD};
use crate::redis_target::RedisConn;

/// Raises `KEYS[1]` (conversation → highest stored seq) to at least the
/// given seqs; never lowers a field. `ARGV`: conversation, seq, ... (one
/// HMGET and one HSET, not two calls per conversation: this runs for every
/// batch).
const RAISE_STORED_SCRIPT: &str = r"
local fields = {}
for i = 1, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
end
local current = redis.call('HMGET', KEYS[1], unpack(fields))
local raise = {}
for i = 1, #fields do
  local seq = ARGV[2 * i]
  if tonumber(seq) > tonumber(current[i] or '0') then
    raise[#raise + 1] = fields[i]
    raise[#raise + 1] = seq
  end
end
if #raise > 0 then
  redis.call('HSET', KEYS[1], unpack(raise))
end
return #raise / 2
";

/// Adds to `pipe` the calls of [`RAISE_STORED_SCRIPT`] that raise the
/// watermarks in `key` to `marks` (conversation, seq), in chunks Lua's
/// `unpack` takes.
pub(crate) fn raise_stored(pipe: &mut redis::Pipeline, key: &str, marks: &[(u64, u64)]) {
    for chunk in marks.chunks(1000) {
        let c = pipe.cmd("EVAL").arg(RAISE_STORED_SCRIPT).arg(1).arg(key);
        for &(conversation, seq) in chunk {
            c.arg(conversation).arg(seq);
        }
        c.ignore();
    }
}

/// A Redis failure.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The command failed or the connection broke.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A reply had an unexpected shape.
    #[error("unexpected redis reply to {0}")]
    Reply(&'static str),
}

impl StreamError {
    /// The stream or its consumer group is gone (someone deleted the key):
    /// create the group again.
    pub fn is_no_group(&self) -> bool {
        matches!(self, StreamError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

/// An entry to move to the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Its id in the shard stream.
    pub id: EntryId,
    /// The record as it was (empty if none).
    pub record: &'a [u8],
    /// Why it was given up.
    pub reason: String,
    /// Deliveries so far.
    pub attempts: u64,
}

/// What trimming needs to know of one consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// Group name.
    pub name: String,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// The smallest of them, if any.
    pub smallest_pending: Option<EntryId>,
    /// The last entry delivered to the group.
    pub last_delivered: EntryId,
    /// Entries not yet delivered to the group, if Redis knows.
    pub lag: Option<u64>,
}

/// The id below which every group has acknowledged everything, i.e. the
/// smallest over all groups of their smallest pending entry, or of their
/// last delivered entry when nothing is pending. `XTRIM MINID` with it
/// removes only stored entries; entries not yet delivered to some group lie
/// above that group's last delivered id, so they are never removed. `None`
/// when there is nothing to trim (no groups, or a group at `0-0`).
pub fn trim_point(groups: &[GroupState]) -> Option<EntryId> {
    let safe = groups
        .iter()
        .map(|g| match (g.pending, g.smallest_pending) {
            (0, _) => g.last_delivered,
            // Pending but not told which: keep everything the group has.
            (_, None) => EntryId::ZERO,
            (_, Some(p)) => p.min(g.last_delivered),
        })
        .min()?;
    (safe > EntryId::ZERO).then_some(safe)
}

/// The keys and names of one shard, as used by one consumer.
#[derive(Debug, Clone)]
pub struct ShardKeys {
    /// Shard number.
    pub shard: u32,
    /// The stream.
    pub stream: String,
    /// The stored watermark hash.
    pub stored: String,
    /// The dead-letter stream.
    pub dead: String,
    /// Consumer group.
    pub group: String,
    /// Consumer name.
    pub consumer: String,
}

impl ShardKeys {
    /// Keys of `shard` in `layout`.
    pub fn new(layout: &Layout, shard: u32, group: &str, consumer: &str) -> ShardKeys {
        ShardKeys {
            shard,
            stream: layout.stream_key(shard),
            stored: layout.stored_key(shard),
            dead: layout.dead_letter_key(shard),
            group: group.to_string(),
            consumer: consumer.to_string(),
        }
    }

    /// Creates the consumer group (and the stream) if missing. The group
    /// starts at the beginning of the stream: entries appended before any
    /// worker ran are stored too.
    pub async fn ensure_group(&self, conn: &mut RedisConn) -> Result<(), StreamError> {
        let created: Result<Value, _> = cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads up to `count` entries never delivered to the group, waiting
    /// up to `block` for the first (`None`: not waiting, possibly none).
    pub async fn read_new(
        &self,
        conn: &mut RedisConn,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, StreamError> {
        self.read_group(conn, count, block, ">").await
    }

    /// Reads up to `count` of this consumer's own pending entries after
    /// `after` (left by an earlier run under the same name).
    pub async fn read_own_pending(
        &self,
        conn: &mut RedisConn,
        after: EntryId,
        count: usize,
    ) -> Result<Vec<Entry>, StreamError> {
        self.read_group(conn, count, None, &after.to_string()).await
    }

    /// XREADGROUP for this consumer from `from` (`>`: never delivered;
    /// an id: own pending entries after it).
    async fn read_group(
        &self,
        conn: &mut RedisConn,
        count: usize,
        block: Option<Duration>,
        from: &str,
    ) -> Result<Vec<Entry>, StreamError> {
        let mut read = cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if let Some(block) = block {
            read.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        let reply: Value = read
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(from)
            .query_async(conn)
            .await?;
        parse_read(reply)
    }

    /// Claims up to `count` entries pending longer than `min_idle` for any
    /// consumer (XAUTOCLAIM from `cursor`); returns the next cursor (`0-0`
    /// after a full pass) and the entries.
    pub async fn claim(
        &self,
        conn: &mut RedisConn,
        min_idle: Duration,
        cursor: EntryId,
        count: usize,
    ) -> Result<(EntryId, Vec<Entry>), StreamError> {
        let reply: Value = cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor.to_string())
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(conn)
            .await?;
        let Value::Array(mut parts) = reply else {
            return Err(StreamError::Reply("XAUTOCLAIM"));
        };
        if parts.len() < 2 {
            return Err(StreamError::Reply("XAUTOCLAIM"));
        }
        let entries = parse_entries(parts.swap_remove(1))?;
        let next = entry_id(&parts[0]).ok_or(StreamError::Reply("XAUTOCLAIM"))?;
        Ok((next, entries))
    }

    /// How often each entry has been delivered (0 if no longer pending).
    pub async fn delivery_counts(
        &self,
        conn: &mut RedisConn,
        ids: &[EntryId],
    ) -> Result<Vec<u64>, StreamError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = pipe();
        for id in ids {
            let id = id.to_string();
            p.cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&id)
                .arg(&id)
                .arg(1);
        }
        let replies: Vec<Value> = p.query_async(conn).await?;
        Ok(replies
            .iter()
            .map(|r| match r {
                // [[id, consumer, idle, deliveries]]
                Value::Array(rows) => match rows.first() {
                    Some(Value::Array(row)) => row.get(3).and_then(int).unwrap_or(0),
                    _ => 0,
                },
                _ => 0,
            })
            .collect())
    }

    /// Acknowledges stored entries. Call only after their rows are
    /// committed.
    pub async fn ack(&self, conn: &mut RedisConn, ids: &[EntryId]) -> Result<(), StreamError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = cmd("XACK");
        c.arg(&self.stream).arg(&self.group);
        for id in ids {
            c.arg(id);
        }
        c.query_async::<()>(conn).await?;
        Ok(())
    }

    /// Moves records to the dead-letter stream (fields `m`: the record,
    /// `id`: the original entry's id, `reason`, `attempts`) and acknowledges
    /// their entries, atomically. Call it only for entries that are done
    /// with (their other records stored).
    pub async fn dead_letter(
        &self,
        conn: &mut RedisConn,
        letters: &[DeadLetter<'_>],
        max_len: u64,
    ) -> Result<(), StreamError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut p = pipe();
        p.atomic();
        for letter in letters {
            let c = p.cmd("XADD").arg(&self.dead);
            if max_len > 0 {
                c.arg("MAXLEN").arg("~").arg(max_len);
            }
            c.arg("*")
                .arg(RECORD_FIELD)
                .arg(letter.record)
                .arg("id")
                .arg(letter.id.to_string())
                .arg("reason")
                .arg(&letter.reason)
                .arg("attempts")
                .arg(letter.attempts)
                .ignore();
        }
        let c = p.cmd("XACK").arg(&self.stream).arg(&self.group);
        for letter in letters {
            c.arg(letter.id);
        }
        c.ignore();
        p.query_async::<()>(conn).await?;
        Ok(())
    }

    /// Whether at least `replicas` replicas have everything this shard's
    /// master held when this was called (the entries just read included):
    /// a write on this connection, then `WAIT` for it, which covers every
    /// earlier write of the master since replication is one ordered log.
    pub async fn replicas_have(
        &self,
        conn: &mut RedisConn,
        replicas: u32,
        timeout: Duration,
    ) -> Result<bool, StreamError> {
        let (_, confirmed): (i64, i64) = pipe()
            .cmd("HINCRBY")
            .arg(&self.stored)
            .arg("#w")
            .arg(1)
            .cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis().max(1) as u64)
            .query_async(conn)
            .await?;
        Ok(confirmed >= i64::from(replicas))
    }

    /// The state of every consumer group of the stream.
    pub async fn groups(&self, conn: &mut RedisConn) -> Result<Vec<GroupState>, StreamError> {
        let reply: Value = cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.stream)
            .query_async(conn)
            .await?;
        let mut groups = parse_groups(reply)?;
        for g in groups.iter_mut().filter(|g| g.pending > 0) {
            // Summary form: [count, smallest, greatest, consumers].
            let reply: Value = cmd("XPENDING")
                .arg(&self.stream)
                .arg(&g.name)
                .query_async(conn)
                .await?;
            if let Value::Array(parts) = reply {
                g.pending = parts.first().and_then(int).unwrap_or(g.pending);
                g.smallest_pending = parts.get(1).and_then(entry_id);
            }
        }
        Ok(groups)
    }

    /// Removes the entries below `min_id`; returns how many.
    pub async fn trim(&self, conn: &mut RedisConn, min_id: EntryId) -> Result<u64, StreamError> {
        let removed: u64 = cmd("XTRIM")
            .arg(&self.stream)
            .arg("MINID")
            .arg(min_id.to_string())
            .query_async(conn)
            .await?;
        Ok(removed)
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn entry_id(v: &Value) -> Option<EntryId> {
    text(v)?.parse().ok()
}

/// Parses an XREADGROUP reply for one stream (nil when nothing came).
pub fn parse_read(reply: Value) -> Result<Vec<Entry>, StreamError> {
    match reply {
        Value::Nil => Ok(Vec::new()),
        // [[stream, entries]]
        Value::Array(mut streams) => match streams.pop() {
            Some(Value::Array(mut stream)) if stream.len() == 2 => {
                parse_entries(stream.swap_remove(1))
            }
            None => Ok(Vec::new()),
            _ => Err(StreamError::Reply("XREADGROUP")),
        },
        // RESP3 would answer with a map.
        Value::Map(mut streams) => match streams.pop() {
            Some((_, entries)) => parse_entries(entries),
            None => Ok(Vec::new()),
        },
        _ => Err(StreamError::Reply("XREADGROUP")),
    }
}

/// Parses a list of `[id, [field, value, ...]]` entries, taking the record
/// bytes without copying. A nil field list means the entry was deleted.
pub fn parse_entries(list: Value) -> Result<Vec<Entry>, StreamError> {
    let Value::Array(items) = list else {
        return Err(StreamError::Reply("stream entries"));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            // Redis 6.2 reports claimed entries that were deleted as nil.
            continue;
        };
        if pair.len() != 2 {
            return Err(StreamError::Reply("stream entry"));
        }
        let fields = pair.pop();
        let id = pair
            .first()
            .and_then(entry_id)
            .ok_or(StreamError::Reply("stream entry id"))?;
        let content = match fields {
            Some(Value::Array(fields)) => {
                // One `m` field per message of the append call, in order.
                let mut records = Vec::new();
                let mut it = fields.into_iter();
                while let (Some(name), Some(value)) = (it.next(), it.next()) {
                    if text(&name) == Some(RECORD_FIELD) {
                        if let Value::BulkString(bytes) = value {
                            records.push(bytes);
                        }
                    }
                }
                if records.is_empty() {
                    Content::NoRecord
                } else {
                    Content::Records(records)
                }
            }
            _ => Content::Deleted,
        };
        out.push(Entry { id, content });
    }
    Ok(out)
}

/// Parses XINFO GROUPS (flat name/value lists per group).
pub fn parse_groups(reply: Value) -> Result<Vec<GroupState>, StreamError> {
    let Value::Array(groups) = reply else {
        return Err(StreamError::Reply("XINFO GROUPS"));
    };
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let pairs: Vec<(Value, Value)> = match g {
            Value::Array(flat) => {
                let mut it = flat.into_iter();
                let mut pairs = Vec::new();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    pairs.push((k, v));
                }
                pairs
            }
            Value::Map(pairs) => pairs,
            _ => return Err(StreamError::Reply("XINFO GROUPS")),
        };
        let mut state = GroupState {
            name: String::new(),
            pending: 0,
            smallest_pending: None,
            last_delivered: EntryId::ZERO,
            lag: None,
        };
        for (k, v) in &pairs {
            match text(k) {
                Some("name") => state.name = text(v).unwrap_or_default().to_string(),
                Some("pending") => state.pending = int(v).unwrap_or(0),
                Some("last-delivered-id") => {
                    state.last_delivered = entry_id(v).ok_or(StreamError::Reply("XINFO GROUPS"))?;
                }
                Some("lag") => state.lag = int(v),
                _ => {}
            }
        }
        out.push(state);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> EntryId {
        EntryId { ms, seq }
    }

    fn group(pending: u64, smallest: Option<EntryId>, last: EntryId) -> GroupState {
        GroupState {
            name: "g".into(),
            pending,
            smallest_pending: smallest,
            last_delivered: last,
            lag: None,
        }
    }

    #[test]
    fn trim_point_is_the_least_any_group_still_needs() {
        assert_eq!(trim_point(&[]), None);
        // One group, all acknowledged up to 10-0.
        assert_eq!(trim_point(&[group(0, None, id(10, 0))]), Some(id(10, 0)));
        // Pending entries hold the point at the smallest of them.
        assert_eq!(
            trim_point(&[group(3, Some(id(5, 1)), id(10, 0))]),
            Some(id(5, 1))
        );
        // A second group that is behind (or has read nothing) holds it too.
        assert_eq!(
            trim_point(&[group(0, None, id(10, 0)), group(0, None, id(7, 0))]),
            Some(id(7, 0))
        );
        assert_eq!(
            trim_point(&[group(0, None, id(10, 0)), group(0, None, EntryId::ZERO)]),
            None
        );
        // Pending, but the smallest one is unknown: trim nothing.
        assert_eq!(trim_point(&[group(1, None, id(10, 0))]), None);
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn replies_parse_into_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("im:{s0}:stream"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-1"),
                    Value::Array(vec![bulk("m"), bulk("1:1:x")]),
                ]),
                Value::Array(vec![bulk("1-2"), Value::Nil]),
                Value::Array(vec![bulk("1-3"), Value::Array(vec![bulk("x"), bulk("y")])]),
            ]),
        ])]);
        let entries = parse_read(reply).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].id, id(1, 1));
        assert_eq!(
            entries[0].content,
            Content::Records(vec![b"1:1:x".to_vec()])
        );
        assert_eq!(entries[1].content, Content::Deleted);
        assert_eq!(entries[2].content, Content::NoRecord);
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        assert!(parse_read(Value::Int(3)).is_err());
    }

    #[test]
    fn group_info_parses() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("name"),
            bulk("storage"),
            bulk("consumers"),
            Value::Int(2),
            bulk("pending"),
            Value::Int(4),
            bulk("last-delivered-id"),
            bulk("9-3"),
            bulk("entries-read"),
            Value::Int(40),
            bulk("lag"),
            Value::Int(7),
        ])]);
        let groups = parse_groups(reply).unwrap();
        assert_eq!(
            groups,
            [GroupState {
                name: "storage".into(),
                pending: 4,
                smallest_pending: None,
                last_delivered: id(9, 3),
                lag: Some(7),
            }]
        );
    }
}
