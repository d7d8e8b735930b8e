//! Ordered append lanes. Each lane owns one Redis connection and serves a
//! fixed subset of the stream shards; it takes every job queued for it,
//! appends all their messages with one append-script call per shard in one
//! pipelined round trip, and only then takes the next jobs. So messages of
//! a conversation are appended in the order their calls were made, and
//! round trips are shared by every send in flight.
//!
//! The script may ask for help before it can append to a conversation: its
//! member set is not cached (`load`), its seq counter is missing (`seed`),
//! or a resend the dedup window does not know must be looked up in MySQL
//! (`check`). The lane fetches that from MySQL, then resubmits the
//! conversation's blocked messages, still in order.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use im_proto::ids::ConversationKind;
use im_proto::pb;
use im_storage::layout::{self, APPEND_SCRIPT};
use im_storage::redis_target::RedisConn;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{DIRECT_INDEX_TTL_SECS, MEMBERS_TTL_SECS, Shared, redis_err, sql};
use crate::store::{
    Ack, AppendOutcome, AppendRejection, AppendResult, NewMessage, StoreError, StoreResult,
};
use sql::SentQuery;

/// A batch for one lane.
pub(crate) struct AppendJob {
    pub batch: Vec<NewMessage>,
    pub reply: oneshot::Sender<StoreResult<Vec<AppendResult>>>,
}

/// Messages taken into one round at most (more wait for the next round).
const ROUND_MESSAGES: usize = 8192;
/// Rounds of load/seed/check/verify/resubmit before giving up on a
/// conversation. A conversation needs at most five: its shard's check
/// after a change of master, every resend of a round checked, then one
/// load, one seed and the append itself.
const MAX_ROUNDS: usize = 7;

/// Replaces a group's cached member set, unless its membership changed
/// since `ARGV[1]` (its version) was read.
const LOAD_MEMBERS_SCRIPT: &str = r#"
local current = redis.call("GET", KEYS[2]) or ""
if current ~= ARGV[1] then return 0 end
redis.call("DEL", KEYS[1])
redis.call("SADD", KEYS[1], "0")
local batch = {}
for i = 3, #ARGV do
  batch[#batch + 1] = ARGV[i]
  if #batch == 1000 then
    redis.call("SADD", KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call("SADD", KEYS[1], unpack(batch)) end
redis.call("EXPIRE", KEYS[1], tonumber(ARGV[2]))
return 1
"#;

/// Moves a shard's counters past what MySQL holds, after its master
/// changed (see the append script's "verify"). `KEYS[1]` the seq hash;
/// `ARGV[1]` the replication id the check is for, `ARGV[2]` a shard-clock
/// tick MySQL holds, `ARGV[3]` "1" on the last call of the check; then
/// conversation, greatest stored seq, ... Only for the master that asked:
/// if it changed meanwhile, returns 0 and the check starts over. A counter
/// it moves loses its recent cache (which would no longer be contiguous)
/// and gets its stored watermark, so reads go to MySQL below.
const VERIFY_SCRIPT: &str = r##"
local replid = string.match(redis.call("INFO", "replication"), "master_replid:(%w+)")
if replid ~= ARGV[1] then return 0 end
local base = string.sub(KEYS[1], 1, -5)
for i = 4, #ARGV, 2 do
  local conv = ARGV[i]
  local seq = tonumber(ARGV[i + 1])
  local counter = tonumber(redis.call("HGET", KEYS[1], conv) or "0")
  if counter <= seq then
    redis.call("HSET", KEYS[1], conv, seq + 1)
    redis.call("DEL", base .. ":recent:" .. conv)
    local stored = tonumber(redis.call("HGET", base .. ":stored", conv) or "0")
    if stored < seq then redis.call("HSET", base .. ":stored", conv, seq) end
  end
end
local tick = tonumber(redis.call("HGET", KEYS[1], "#t") or "0")
if tonumber(ARGV[2]) > tick then redis.call("HSET", KEYS[1], "#t", ARGV[2]) end
if ARGV[3] == "1" then redis.call("HSET", KEYS[1], "#r", replid) end
return 1
"##;

/// Seeds missing counters of one shard (`KEYS[1]`, the seq hash) to one
/// past the greater of what MySQL holds and what the conversation's recent
/// cache ends with (records the worker has not stored yet).
/// `ARGV`: conversation, last seq in MySQL, ...
const SEED_SCRIPT: &str = r##"
local base = string.sub(KEYS[1], 1, -5)
for i = 1, #ARGV, 2 do
  local conv = ARGV[i]
  local last = tonumber(ARGV[i + 1])
  local tail = redis.call("LINDEX", base .. ":recent:" .. conv, -1)
  local cached = tail and tonumber(string.match(tail, "^(%d+):")) or 0
  redis.call("HSETNX", KEYS[1], conv, math.max(last, cached) + 1)
end
return 1
"##;

/// Which attempt of a send an entry is, as the script's argument says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// A first attempt: the dedup window decides alone.
    First,
    /// A resend: on a window miss, MySQL may have to be asked.
    Resend,
    /// A resend MySQL was asked about and did not have.
    Checked,
}

impl Attempt {
    fn arg(self) -> &'static str {
        match self {
            Attempt::First => "",
            Attempt::Resend => "r",
            Attempt::Checked => "c",
        }
    }
}

struct Entry {
    job: usize,
    shard: u32,
    kind: &'static str,
    attempt: Attempt,
    /// The message as it will be stored (seq and id filled in on success).
    message: pb::Message,
    body: Vec<u8>,
    outcome: Option<AppendResult>,
}

struct Lane {
    shared: Arc<Shared>,
    conn: RedisConn,
    append: redis::Script,
    load_members: redis::Script,
    verify: redis::Script,
    seed: redis::Script,
}

pub(crate) async fn run_lane(
    shared: Arc<Shared>,
    conn: RedisConn,
    mut rx: mpsc::Receiver<AppendJob>,
) {
    let mut lane = Lane {
        shared,
        conn,
        append: redis::Script::new(APPEND_SCRIPT),
        load_members: redis::Script::new(LOAD_MEMBERS_SCRIPT),
        verify: redis::Script::new(VERIFY_SCRIPT),
        seed: redis::Script::new(SEED_SCRIPT),
    };
    let mut jobs: Vec<AppendJob> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut messages = first.batch.len();
        jobs.push(first);
        while messages < ROUND_MESSAGES {
            match rx.try_recv() {
                Ok(job) => {
                    messages += job.batch.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        lane.round(std::mem::take(&mut jobs)).await;
    }
}

/// Whether a failed call cannot have reached Redis: the connection was
/// refused, the manager's reconnection failed, or writing failed (a
/// broken pipe).
fn unsent(e: &redis::RedisError) -> bool {
    use std::error::Error as _;
    let io_kind = e
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    e.is_connection_refusal()
        || io_kind == Some(std::io::ErrorKind::BrokenPipe)
        || (e.kind() == redis::ErrorKind::IoError
            && e.to_string().starts_with("Reconnecting failed"))
}

impl Lane {
    /// Appends every message of `jobs` and answers each job.
    async fn round(&mut self, jobs: Vec<AppendJob>) {
        // One clock reading per round: it is the messages' server time and
        // what the dedup entries record, so a duplicate's ack carries the
        // same message id as the original.
        let now_ms = im_proto::now_ms();
        let mut replies = Vec::with_capacity(jobs.len());
        let mut entries = Vec::new();
        for (job, AppendJob { batch, reply }) in jobs.into_iter().enumerate() {
            replies.push(reply);
            for m in batch {
                entries.push(self.entry(job, m, now_ms));
            }
        }
        // Each message is answered for what happened to it: stored ones
        // are acked and pushed even when others of the round failed.
        if let Err(e) = self.append_all(&mut entries, now_ms).await {
            tracing::warn!(error = %e, "append round failed");
        }
        if let Err(e) = self.index_new_direct_conversations(&entries).await {
            tracing::warn!(error = %e, "indexing new direct conversations failed");
            // Their conversations may be missing from conversation lists:
            // the client resends, and the duplicate indexes them again.
            for entry in &mut entries {
                if entry.opens_direct_conversation() {
                    entry.outcome = Some(Err(AppendRejection::Failed));
                }
            }
        }
        let mut results: Vec<Vec<AppendResult>> = replies.iter().map(|_| Vec::new()).collect();
        for entry in entries {
            // No outcome: the round failed before the message's fate was
            // known (it may be stored; the resend will tell).
            results[entry.job].push(entry.outcome.unwrap_or(Err(AppendRejection::Failed)));
        }
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(Ok(result));
        }
    }

    fn entry(&self, job: usize, m: NewMessage, now_ms: i64) -> Entry {
        let conversation = m.conversation;
        let shard = self.shared.layout.shard_of(conversation.raw());
        let kind = match conversation.kind() {
            _ if m.sender == 0 => "n",
            ConversationKind::Direct { .. } => "d",
            ConversationKind::Group(_) => "g",
        };
        let message = pb::Message {
            conversation_id: conversation.raw(),
            seq: 0,
            message_id: 0,
            sender_id: m.sender,
            client_msg_id: m.client_msg_id,
            server_time_ms: now_ms,
            content: Some(m.content),
        };
        let body = layout::record_body(&message);
        let attempt = if m.resend && !message.client_msg_id.is_empty() {
            Attempt::Resend
        } else {
            Attempt::First
        };
        Entry {
            job,
            shard,
            kind,
            attempt,
            message,
            body,
            outcome: None,
        }
    }

    /// Runs the checks the script cannot do (participants of direct
    /// conversations), then the script, resolving loads and seeds between
    /// rounds. Entries left without an outcome failed.
    async fn append_all(&mut self, entries: &mut [Entry], now_ms: i64) -> StoreResult<()> {
        self.check_direct(entries).await?;
        let mut pending: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].outcome.is_none())
            .collect();
        for _ in 0..MAX_ROUNDS {
            if pending.is_empty() {
                return Ok(());
            }
            let replies = self.run_script(entries, &pending, now_ms).await;
            let mut load = HashSet::new();
            let mut seed = HashSet::new();
            let mut verify: BTreeMap<u32, (String, u64)> = BTreeMap::new();
            let mut check = Vec::new();
            let mut again = Vec::new();
            for (&i, reply) in pending.iter().zip(replies) {
                let entry = &mut entries[i];
                // The shard failed: no outcome (answered as failed).
                let Some(reply) = reply else { continue };
                match reply {
                    Reply::Ok { seq, tick } => {
                        let mut message = entry.message.clone();
                        message.seq = seq;
                        message.message_id = layout::message_id(entry.shard, tick);
                        entry.outcome = Some(Ok(AppendOutcome::Stored(message)));
                    }
                    Reply::Duplicate { seq, tick, time } => {
                        entry.outcome = Some(Ok(AppendOutcome::Duplicate(Ack {
                            message_id: layout::message_id(entry.shard, tick),
                            conversation_id: entry.message.conversation_id,
                            seq,
                            server_time_ms: time,
                        })));
                    }
                    Reply::NotMember => entry.outcome = Some(Err(AppendRejection::NotMember)),
                    Reply::Lag => entry.outcome = Some(Err(AppendRejection::DedupBehind)),
                    Reply::Check => {
                        check.push(i);
                        again.push(i);
                    }
                    Reply::Load => {
                        load.insert(entry.message.conversation_id);
                        again.push(i);
                    }
                    Reply::Seed => {
                        seed.insert(entry.message.conversation_id);
                        again.push(i);
                    }
                    Reply::Blocked => again.push(i),
                    Reply::Verify { replid, tick } => {
                        verify.insert(entry.shard, (replid, tick));
                        again.push(i);
                    }
                    Reply::Unconfirmed => {
                        entry.outcome = Some(Err(AppendRejection::Overloaded));
                    }
                }
            }
            for (shard, (replid, tick)) in verify {
                self.verify_shard(shard, &replid, tick).await?;
            }
            self.check_sent(entries, &check).await?;
            for conv in load {
                self.load_members(conv).await?;
            }
            if !seed.is_empty() {
                self.seed(&seed).await?;
            }
            // Resends MySQL already had are answered.
            again.retain(|&i| entries[i].outcome.is_none());
            pending = again;
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Backend(
                "conversation could not be prepared for appends".into(),
            ))
        }
    }

    /// Direct conversations: the sender must be a participant and the other
    /// participant must exist.
    async fn check_direct(&self, entries: &mut [Entry]) -> StoreResult<()> {
        let mut peers = Vec::new();
        for (i, entry) in entries.iter_mut().enumerate() {
            if entry.kind != "d" {
                continue;
            }
            let conversation = im_proto::ConversationId::from_raw(entry.message.conversation_id);
            match conversation.and_then(|c| c.peer_of(entry.message.sender_id)) {
                Some(peer) => peers.push((i, peer)),
                None => entry.outcome = Some(Err(AppendRejection::NotMember)),
            }
        }
        if peers.is_empty() {
            return Ok(());
        }
        let ids: Vec<u64> = peers.iter().map(|&(_, p)| p).collect();
        let exists = self.shared.users_exist(&ids).await?;
        for ((i, _), exists) in peers.into_iter().zip(exists) {
            if !exists {
                entries[i].outcome = Some(Err(AppendRejection::NoSuchUser));
            }
        }
        Ok(())
    }

    /// One round trip: for each shard, the script over its pending
    /// entries (in chunks, in order), and with `--redis-replica-acks` a
    /// `WAIT` after them. Shards go in pipelines of their own, sent
    /// together (on a Redis Cluster each to its master), so a shard whose
    /// pipeline fails or whose replicas do not confirm in time fails its
    /// own entries only. Replies come back in the order of `pending`;
    /// `None` where the shard's pipeline failed (the fate of those
    /// messages is unknown: their resends will tell).
    async fn run_script(
        &mut self,
        entries: &[Entry],
        pending: &[usize],
        now_ms: i64,
    ) -> Vec<Option<Reply>> {
        let options = &self.shared.options;
        let window = options.dedup_window_secs.max(1);
        // Each message takes two values in one XADD and one HSET: stay well
        // below Lua's limit on unpacked values.
        let chunk = options.script_batch.clamp(1, 2000);
        let acks = options.replica_acks;
        let wait_ms = u64::try_from(options.replica_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);

        let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for &i in pending {
            by_shard.entry(entries[i].shard).or_default().push(i);
        }
        let mut rounds: Vec<(Vec<usize>, redis::Pipeline)> = Vec::with_capacity(by_shard.len());
        for (shard, list) in by_shard {
            let stream = self.shared.layout.stream_key(shard);
            let mut pipe = redis::pipe();
            for part in list.chunks(chunk) {
                let mut invocation = self.append.key(&stream);
                invocation
                    .arg(now_ms)
                    .arg(layout::tick_of(now_ms))
                    .arg(layout::TICKS_PER_MS)
                    .arg(window)
                    .arg(options.recent_cache_len)
                    .arg(options.recent_cache_ttl_secs)
                    .arg(part.len());
                for &i in part {
                    let e = &entries[i];
                    invocation
                        .arg(e.message.conversation_id)
                        .arg(e.message.sender_id)
                        .arg(e.message.client_msg_id.as_str())
                        .arg(e.kind)
                        .arg(e.attempt.arg())
                        .arg(e.body.as_slice());
                }
                pipe.invoke_script(&invocation);
            }
            if acks > 0 {
                // WAIT covers every write this connection made before it,
                // the script's included.
                pipe.cmd("WAIT").arg(acks).arg(wait_ms);
            }
            rounds.push((list, pipe));
        }
        let script = &self.append;
        let results = futures::future::join_all(rounds.iter().map(|(_, pipe)| {
            let mut conn = self.conn.clone();
            async move { query_round(&mut conn, script, pipe).await }
        }))
        .await;

        let mut replies: std::collections::HashMap<usize, Reply> =
            std::collections::HashMap::with_capacity(pending.len());
        for ((order, _), result) in rounds.into_iter().zip(results) {
            match result.and_then(|values| parse_round(values, order.len(), acks)) {
                Ok(parsed) => replies.extend(order.into_iter().zip(parsed)),
                Err(e) => tracing::warn!(error = %e, "append round of a shard failed"),
            }
        }
        pending.iter().map(|i| replies.remove(i)).collect()
    }

    /// Looks up in MySQL the resends at `indices` that the script could
    /// not find in the dedup window: one found there is a duplicate, one
    /// that is not is resubmitted as checked (and stored).
    async fn check_sent(&self, entries: &mut [Entry], indices: &[usize]) -> StoreResult<()> {
        if indices.is_empty() {
            return Ok(());
        }
        let queries: Vec<SentQuery<'_>> = indices
            .iter()
            .map(|&i| SentQuery {
                conversation: entries[i].message.conversation_id,
                sender: entries[i].message.sender_id,
                client_msg_id: &entries[i].message.client_msg_id,
            })
            .collect();
        let found = sql::find_sent(&self.shared, &queries).await?;
        for (&i, ack) in indices.iter().zip(found) {
            let entry = &mut entries[i];
            match ack {
                Some(ack) => entry.outcome = Some(Ok(AppendOutcome::Duplicate(ack))),
                None => entry.attempt = Attempt::Checked,
            }
        }
        Ok(())
    }

    /// Caches a group's member set from MySQL, guarded by its version so a
    /// concurrent change is never overwritten with stale members.
    async fn load_members(&mut self, conversation: u64) -> StoreResult<()> {
        let layout = &self.shared.layout;
        let shard = layout.shard_of(conversation);
        let key = layout.members_key(shard, conversation);
        let version_key = layout.members_version_key(shard, conversation);
        for _ in 0..5 {
            let version: Option<String> = redis::cmd("GET")
                .arg(&version_key)
                .query_async(&mut self.conn)
                .await
                .map_err(redis_err)?;
            let members = sql::member_ids(&self.shared, conversation).await?;
            let mut invocation = self.load_members.key(&key);
            invocation
                .key(&version_key)
                .arg(version.unwrap_or_default())
                .arg(MEMBERS_TTL_SECS);
            for m in members {
                invocation.arg(m);
            }
            let loaded: i64 = invocation
                .invoke_async(&mut self.conn)
                .await
                .map_err(redis_err)?;
            if loaded == 1 {
                return Ok(());
            }
        }
        Err(StoreError::Backend(
            "group membership kept changing while loading".into(),
        ))
    }

    /// Seeds missing seq counters: a new conversation starts at 0; after a
    /// loss of Redis data, seqs continue after what MySQL holds, or what
    /// the recent cache still ends with, whichever is later (the cache
    /// holds what the worker has not stored yet). Counters hold last
    /// seq + 1.
    async fn seed(&mut self, conversations: &HashSet<u64>) -> StoreResult<()> {
        let conversations: Vec<u64> = conversations.iter().copied().collect();
        let last = sql::stored_last_seqs(&self.shared, &conversations).await?;
        let mut by_shard: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for conversation in conversations {
            by_shard
                .entry(self.shared.layout.shard_of(conversation))
                .or_default()
                .push(conversation);
        }
        let mut pipe = redis::pipe();
        for (shard, list) in by_shard {
            let mut invocation = self.seed.key(self.shared.layout.seq_key(shard));
            for conversation in list {
                invocation
                    .arg(conversation)
                    .arg(last.get(&conversation).copied().unwrap_or(0));
            }
            pipe.invoke_script(&invocation).ignore();
        }
        query_round(&mut self.conn, &self.seed, &pipe).await?;
        Ok(())
    }

    /// Checks a shard's counters against MySQL after its master changed:
    /// every conversation the stream journal shows stored above the shard
    /// clock Redis still has (`tick`) gets its counter moved past what
    /// MySQL holds, and the shard clock past MySQL's ticks, so no seq and
    /// no message id is given twice. A shard clock at 0 means Redis kept
    /// nothing of the shard: its counters are all missing and get seeded
    /// one by one as conversations come back, so only the clock is moved.
    async fn verify_shard(&mut self, shard: u32, replid: &str, tick: u64) -> StoreResult<()> {
        let key = self.shared.layout.seq_key(shard);
        let mut moved_to = tick.max(sql::journal_last_tick(&self.shared, shard).await?);
        let mut checked = 0usize;
        let mysql_shards = if tick > 0 {
            self.shared.messages.len()
        } else {
            0
        };
        for mysql_shard in 0..mysql_shards {
            let mut after_id = 0;
            loop {
                let page =
                    sql::journal_page(&self.shared, mysql_shard, shard, tick, after_id).await?;
                let Some(&(last_id, _, _)) = page.last() else {
                    break;
                };
                after_id = last_id;
                let mut greatest: std::collections::HashMap<u64, u64> = Default::default();
                for (_, last_tick, pairs) in page {
                    moved_to = moved_to.max(last_tick);
                    for (conversation, seq) in pairs {
                        let at = greatest.entry(conversation).or_insert(0);
                        *at = (*at).max(seq);
                    }
                }
                checked += greatest.len();
                let pairs: Vec<(u64, u64)> = greatest.into_iter().collect();
                for chunk in pairs.chunks(1000) {
                    let mut invocation = self.verify.key(&key);
                    invocation.arg(replid).arg(moved_to).arg("0");
                    for &(conversation, seq) in chunk {
                        invocation.arg(conversation).arg(seq);
                    }
                    let applied: i64 = invocation
                        .invoke_async(&mut self.conn)
                        .await
                        .map_err(redis_err)?;
                    if applied == 0 {
                        // Another change of master: the next round asks again.
                        return Ok(());
                    }
                }
            }
        }
        let applied: i64 = self
            .verify
            .key(&key)
            .arg(replid)
            .arg(moved_to)
            .arg("1")
            .invoke_async(&mut self.conn)
            .await
            .map_err(redis_err)?;
        if applied == 1 && tick > 0 {
            tracing::info!(
                shard,
                conversations = checked,
                "shard counters checked against MySQL after a change of Redis master"
            );
        }
        Ok(())
    }

    /// The first message of a direct conversation makes it appear in both
    /// participants' conversation lists before the worker has stored it.
    async fn index_new_direct_conversations(&mut self, entries: &[Entry]) -> StoreResult<()> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for entry in entries.iter().filter(|e| e.opens_direct_conversation()) {
            let Some(conv) = im_proto::ConversationId::from_raw(entry.message.conversation_id)
            else {
                continue;
            };
            if let ConversationKind::Direct { lo, hi } = conv.kind() {
                for user in [lo, hi] {
                    let key = self.shared.layout.direct_index_key(user);
                    pipe.cmd("SADD").arg(&key).arg(conv.raw()).ignore();
                    pipe.cmd("EXPIRE")
                        .arg(&key)
                        .arg(DIRECT_INDEX_TTL_SECS)
                        .ignore();
                }
                any = true;
            }
        }
        if any {
            let _: () = pipe.query_async(&mut self.conn).await.map_err(redis_err)?;
        }
        Ok(())
    }
}

/// Runs a shard's pipeline, loading the script when Redis forgot it (a
/// restart, or a master new to the slot) and trying once more when the
/// connection was found broken before the round could be sent: that is
/// how the first round after Redis came back finds the old connection, and
/// the manager reconnects on that error. Not after a timeout or a reset:
/// the round may have been applied, and a second try would answer its
/// messages "dup" without their ever being pushed; those stay failed, and
/// the clients' resends tell.
async fn query_round(
    conn: &mut RedisConn,
    script: &redis::Script,
    pipe: &redis::Pipeline,
) -> StoreResult<Vec<Value>> {
    let mut reconnected = false;
    let mut loaded = false;
    loop {
        match pipe.query_async(conn).await {
            Ok(values) => return Ok(values),
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError && !loaded => {
                loaded = true;
                script
                    .prepare_invoke()
                    .load_async(conn)
                    .await
                    .map_err(redis_err)?;
            }
            Err(e) if unsent(&e) && !reconnected => {
                reconnected = true;
                tracing::info!(error = %e, "append lane reconnecting; retrying the round");
            }
            Err(e) => return Err(redis_err(e)),
        }
    }
}

/// A shard's replies: one array per script call, then (with `acks`) the
/// number of replicas `WAIT` saw. Stored messages and duplicates that the
/// replicas did not confirm become [`Reply::Unconfirmed`].
fn parse_round(values: Vec<Value>, expected: usize, acks: u32) -> StoreResult<Vec<Reply>> {
    let mut values = values.into_iter();
    let mut flat = Vec::with_capacity(expected);
    let scripts = values.len().saturating_sub(usize::from(acks > 0));
    for value in values.by_ref().take(scripts) {
        match value {
            Value::Array(items) => flat.extend(items),
            other => return Err(redis_err(format!("unexpected script reply {other:?}"))),
        }
    }
    if flat.len() != expected {
        return Err(redis_err("script answered a different number of messages"));
    }
    let confirmed = match values.next() {
        None => true,
        Some(Value::Int(n)) => {
            let confirmed = u64::try_from(n).is_ok_and(|n| n >= u64::from(acks));
            if !confirmed {
                tracing::warn!(
                    replicas = n,
                    wanted = acks,
                    "appends not confirmed by replicas in time"
                );
            }
            confirmed
        }
        Some(other) => return Err(redis_err(format!("unexpected WAIT reply {other:?}"))),
    };
    flat.into_iter()
        .map(|v| {
            Reply::parse(v).map(|r| match r {
                Reply::Ok { .. } | Reply::Duplicate { .. } if !confirmed => Reply::Unconfirmed,
                r => r,
            })
        })
        .collect()
}

impl Entry {
    /// Whether this is (an answer for) seq 1 of a direct conversation.
    fn opens_direct_conversation(&self) -> bool {
        let first = match &self.outcome {
            Some(Ok(AppendOutcome::Stored(m))) => m.seq == 1,
            Some(Ok(AppendOutcome::Duplicate(a))) => a.seq == 1,
            _ => false,
        };
        first && self.kind == "d"
    }
}

/// One message's answer from the append script.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok {
        seq: u64,
        tick: u64,
    },
    Duplicate {
        seq: u64,
        tick: u64,
        time: i64,
    },
    NotMember,
    Load,
    Seed,
    Check,
    Lag,
    Blocked,
    /// The shard's counters must be checked against MySQL first.
    Verify {
        replid: String,
        tick: u64,
    },
    /// Applied, but fewer replicas than `--redis-replica-acks` confirmed
    /// it in time: not acknowledged.
    Unconfirmed,
}

impl Reply {
    fn parse(value: Value) -> StoreResult<Reply> {
        let bad = || redis_err("malformed append script reply");
        let Value::Array(items) = value else {
            return Err(bad());
        };
        let text = |v: &Value| -> Option<String> {
            match v {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            }
        };
        let int = |v: &Value| -> Option<u64> {
            match v {
                Value::Int(n) => u64::try_from(*n).ok(),
                _ => None,
            }
        };
        let status = items.first().and_then(text).ok_or_else(bad)?;
        Ok(match status.as_str() {
            "ok" => Reply::Ok {
                seq: items.get(1).and_then(int).ok_or_else(bad)?,
                tick: items.get(2).and_then(int).ok_or_else(bad)?,
            },
            "dup" => {
                let value = items.get(1).and_then(text).ok_or_else(bad)?;
                let (seq, tick, time) = layout::parse_dedup(&value).ok_or_else(bad)?;
                Reply::Duplicate { seq, tick, time }
            }
            "nm" => Reply::NotMember,
            "load" => Reply::Load,
            "seed" => Reply::Seed,
            "check" => Reply::Check,
            "lag" => Reply::Lag,
            "blocked" => Reply::Blocked,
            "verify" => Reply::Verify {
                replid: items.get(1).and_then(text).ok_or_else(bad)?,
                tick: items
                    .get(2)
                    .and_then(text)
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(bad)?,
            },
            _ => return Err(bad()),
        })
    }
}
