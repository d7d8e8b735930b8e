//! Ordered append lanes. Each lane owns one Redis connection and serves a
//! fixed subset of the stream shards; it takes every job queued for it,
//! appends all their messages with one append-script call per shard (the
//! shards concurrently, so one round trip for most rounds), and only then
//! takes the next jobs. So messages of a conversation are appended in the
//! order their calls were made, and round trips are shared by every send
//! in flight.
//!
//! Each call declares every key the script touches and is sent alone
//! (`im_storage::script`), so on a Redis Cluster whose slot of the shard
//! is moving it runs where all its keys are or is retried (`-ASK`,
//! `-TRYAGAIN`) without having run; and it carries the lane's token and a
//! call number, so a call the client library sends again after a timeout
//! is answered from the shard's call memo instead of appending twice.
//!
//! The script may ask for help before it can append to a conversation: its
//! member set is not cached (`load`), its seq counter is missing (`seed`),
//! or a resend the dedup window does not know must be looked up in MySQL
//! (`check`). The lane fetches that from MySQL, then resubmits the
//! conversation's blocked messages, still in order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use im_proto::ids::ConversationKind;
use im_proto::pb;
use im_storage::layout::{self, APPEND_SCRIPT};
use im_storage::redis_target::RedisConn;
use im_storage::script::{LuaScript, ScriptCall};
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

/// Replaces a group's cached member set (`KEYS[1]`), unless its
/// membership changed since `ARGV[1]` (its version, `KEYS[2]`) was read.
/// In place, never deleted and written again: a key one call deletes and
/// writes again is missing in between, which a cluster node migrating the
/// slot refuses in the middle of the script.
const LOAD_MEMBERS_SCRIPT: &str = r#"
local current = redis.call("GET", KEYS[2]) or ""
if current ~= ARGV[1] then return 0 end
redis.call("SADD", KEYS[1], "0")
local keep = {["0"] = true}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local batch = {}
for _, member in ipairs(redis.call("SMEMBERS", KEYS[1])) do
  if not keep[member] then
    batch[#batch + 1] = member
    if #batch == 1000 then
      redis.call("SREM", KEYS[1], unpack(batch))
      batch = {}
    end
  end
end
if #batch > 0 then redis.call("SREM", KEYS[1], unpack(batch)) end
batch = {}
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
/// changed (see the append script's "verify"). `KEYS[1]` the seq hash,
/// `KEYS[2]` the stored watermarks, then the recent cache of each
/// conversation given; `ARGV[1]` the replication id the check is for,
/// `ARGV[2]` a shard-clock tick MySQL holds, `ARGV[3]` "1" on the last
/// call of the check; then conversation, greatest stored seq, ... (in the
/// order of their recent-cache keys). Only for the master that asked: if
/// it changed meanwhile, returns 0 and the check starts over. A counter it
/// moves loses its recent cache (which would no longer be contiguous) and
/// gets its stored watermark, so reads go to MySQL below.
const VERIFY_SCRIPT: &str = r##"
local replid = string.match(redis.call("INFO", "replication"), "master_replid:(%w+)")
if replid ~= ARGV[1] then return 0 end
for i = 4, #ARGV, 2 do
  local conv = ARGV[i]
  local seq = tonumber(ARGV[i + 1])
  local counter = tonumber(redis.call("HGET", KEYS[1], conv) or "0")
  if counter <= seq then
    redis.call("HSET", KEYS[1], conv, seq + 1)
    redis.call("DEL", KEYS[2 + (i - 2) / 2])
    local stored = tonumber(redis.call("HGET", KEYS[2], conv) or "0")
    if stored < seq then redis.call("HSET", KEYS[2], conv, seq) end
  end
end
local tick = tonumber(redis.call("HGET", KEYS[1], "#t") or "0")
if tonumber(ARGV[2]) > tick then redis.call("HSET", KEYS[1], "#t", ARGV[2]) end
if ARGV[3] == "1" then redis.call("HSET", KEYS[1], "#r", replid) end
return 1
"##;

/// Seeds missing counters of one shard (`KEYS[1]`, the seq hash) to one
/// past the greater of what MySQL holds and what the conversation's recent
/// cache (`KEYS[1 + i]` for the i-th conversation) ends with (records the
/// worker has not stored yet). `ARGV`: conversation, last seq in MySQL,
/// ...
const SEED_SCRIPT: &str = r##"
for i = 1, #ARGV, 2 do
  local conv = ARGV[i]
  local last = tonumber(ARGV[i + 1])
  local tail = redis.call("LINDEX", KEYS[1 + (i + 1) / 2], -1)
  local cached = tail and tonumber(string.match(tail, "^(%d+):")) or 0
  redis.call("HSETNX", KEYS[1], conv, math.max(last, cached) + 1)
end
return 1
"##;

/// Bucket replies in a row before a call gives up (the shard clock moved
/// to another bucket between the tries each time).
const BUCKET_TRIES: usize = 3;

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
    append: LuaScript,
    load_members: LuaScript,
    verify: LuaScript,
    seed: LuaScript,
    /// Names this lane's calls in the shards' call memos: unique per lane
    /// and process start.
    token: String,
    /// Number of the lane's next append call.
    next_call: u64,
    /// The dedup bucket each shard's clock was last found in.
    buckets: HashMap<u32, u64>,
}

pub(crate) async fn run_lane(
    shared: Arc<Shared>,
    conn: RedisConn,
    mut rx: mpsc::Receiver<AppendJob>,
) {
    let mut lane = Lane {
        shared,
        conn,
        append: LuaScript::new(APPEND_SCRIPT),
        load_members: LuaScript::new(LOAD_MEMBERS_SCRIPT),
        verify: LuaScript::new(VERIFY_SCRIPT),
        seed: LuaScript::new(SEED_SCRIPT),
        token: format!("{:016x}", rand::random::<u64>()),
        next_call: 1,
        buckets: HashMap::new(),
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
                        // The entry is done: its content and client id move
                        // into the outcome rather than being copied (the
                        // ids stay for the direct-conversation index).
                        let message = pb::Message {
                            seq,
                            message_id: layout::message_id(entry.shard, tick),
                            client_msg_id: std::mem::take(&mut entry.message.client_msg_id),
                            content: entry.message.content.take(),
                            ..entry.message
                        };
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
                    // (Bucket replies are answered by calling again at once.)
                    Reply::Blocked | Reply::Bucket(_) => again.push(i),
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

    /// One round trip per shard, the shards concurrently (on a Redis
    /// Cluster each on its master): for each shard, the script over its
    /// pending entries, a chunk per call, the calls one after the other,
    /// each followed with `--redis-replica-acks` by a `WAIT`. A shard whose
    /// call fails, or whose replicas do not confirm in time, fails its own
    /// entries only. Replies come back in the order of `pending`; `None`
    /// where the shard's call failed or was not made (the fate of those
    /// messages is unknown: their resends will tell).
    async fn run_script(
        &mut self,
        entries: &[Entry],
        pending: &[usize],
        now_ms: i64,
    ) -> Vec<Option<Reply>> {
        let options = &self.shared.options;
        // Each message takes two values in one XADD and one HSET: stay well
        // below Lua's limit on unpacked values.
        let chunk = options.script_batch.clamp(1, 2000);
        let own_bucket =
            layout::dedup_bucket(layout::tick_of(now_ms), options.dedup_window_secs.max(1));

        let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for &i in pending {
            by_shard.entry(entries[i].shard).or_default().push(i);
        }
        let mut plans = Vec::with_capacity(by_shard.len());
        for (shard, list) in by_shard {
            // The shard clock never goes back and may run ahead of ours.
            let bucket = own_bucket.max(self.buckets.get(&shard).copied().unwrap_or(0));
            let first_call = self.next_call;
            self.next_call += list.len().div_ceil(chunk) as u64;
            plans.push((shard, list, first_call, bucket));
        }
        let lane = &*self;
        let results = futures::future::join_all(plans.into_iter().map(
            |(shard, list, first_call, bucket)| {
                let conn = lane.conn.clone();
                async move {
                    let outcome = lane
                        .shard_calls(conn, entries, &list, now_ms, first_call, bucket)
                        .await;
                    (shard, outcome)
                }
            },
        ))
        .await;

        let mut replies: HashMap<usize, Reply> = HashMap::with_capacity(pending.len());
        for (shard, (answered, bucket)) in results {
            replies.extend(answered);
            if let Some(bucket) = bucket {
                self.buckets.insert(shard, bucket);
            }
        }
        pending.iter().map(|i| replies.remove(i)).collect()
    }

    /// The calls of one shard, chunk by chunk; stops at the first call that
    /// fails (the later ones could reorder a conversation). Returns the
    /// replies got and the dedup bucket the shard said its clock is in.
    async fn shard_calls(
        &self,
        mut conn: RedisConn,
        entries: &[Entry],
        list: &[usize],
        now_ms: i64,
        first_call: u64,
        mut bucket: u64,
    ) -> (Vec<(usize, Reply)>, Option<u64>) {
        let options = &self.shared.options;
        let chunk = options.script_batch.clamp(1, 2000);
        let acks = options.replica_acks;
        let wait_ms = u64::try_from(options.replica_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let wait = (acks > 0).then_some((acks, wait_ms));
        let mut answered = Vec::with_capacity(list.len());
        let mut told = None;
        for (n, part) in list.chunks(chunk).enumerate() {
            let number = first_call + n as u64;
            let mut tries = 0;
            let replies = loop {
                let call = self.append_call(entries, part, now_ms, number, bucket);
                let result = call
                    .run_and_wait(&mut conn, wait)
                    .await
                    .map_err(redis_err)
                    .and_then(|(reply, waited)| parse_call(reply, waited, part.len(), acks));
                match result {
                    Ok(replies) => match replies.first() {
                        Some(&Reply::Bucket(at)) if tries < BUCKET_TRIES => {
                            tries += 1;
                            bucket = at;
                            told = Some(at);
                        }
                        Some(Reply::Bucket(_)) => {
                            tracing::warn!("the shard clock kept changing dedup bucket");
                            return (answered, told);
                        }
                        _ => break replies,
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "append call of a shard failed");
                        return (answered, told);
                    }
                }
            };
            answered.extend(part.iter().copied().zip(replies));
        }
        (answered, told)
    }

    /// The append script's call for the entries at `part` (all of one
    /// shard): every key it touches, then its arguments (see append.lua).
    fn append_call(
        &self,
        entries: &[Entry],
        part: &[usize],
        now_ms: i64,
        number: u64,
        bucket: u64,
    ) -> ScriptCall<'_> {
        let options = &self.shared.options;
        let layout = &self.shared.layout;
        let shard = entries[part[0]].shard;
        let mut call = self.append.call();
        call.key(layout.stream_key(shard))
            .key(layout.seq_key(shard))
            .key(layout.stored_key(shard))
            .key(layout.calls_key(shard))
            .key(layout.dedup_key(shard, bucket))
            .key(layout.dedup_key(shard, bucket.saturating_sub(1)));
        let mut seen = HashSet::new();
        for &i in part {
            let e = &entries[i];
            let conv = e.message.conversation_id;
            if seen.insert((conv, false)) {
                call.key(layout.recent_key(shard, conv));
            }
            if e.kind == "g" && seen.insert((conv, true)) {
                call.key(layout.members_key(shard, conv));
            }
        }
        call.arg(now_ms)
            .arg(layout::tick_of(now_ms))
            .arg(layout::TICKS_PER_MS)
            .arg(options.dedup_window_secs.max(1))
            .arg(options.recent_cache_len)
            .arg(options.recent_cache_ttl_secs)
            .arg(part.len())
            .arg(self.token.as_str())
            .arg(number)
            .arg(bucket);
        for &i in part {
            let e = &entries[i];
            call.arg(e.message.conversation_id)
                .arg(e.message.sender_id)
                .arg(e.message.client_msg_id.as_str())
                .arg(e.kind)
                .arg(e.attempt.arg())
                .arg(e.body.as_slice());
        }
        call
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
            let mut call = self.load_members.call();
            call.key(&key)
                .key(&version_key)
                .arg(version.unwrap_or_default())
                .arg(MEMBERS_TTL_SECS);
            for m in members {
                call.arg(m);
            }
            let loaded = int_reply(call.run(&mut self.conn).await)?;
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
        let layout = &self.shared.layout;
        let calls: Vec<ScriptCall<'_>> = by_shard
            .into_iter()
            .map(|(shard, list)| {
                let mut call = self.seed.call();
                call.key(layout.seq_key(shard));
                for &conversation in &list {
                    call.key(layout.recent_key(shard, conversation));
                }
                for conversation in list {
                    call.arg(conversation)
                        .arg(last.get(&conversation).copied().unwrap_or(0));
                }
                call
            })
            .collect();
        let results = futures::future::join_all(calls.iter().map(|call| {
            let mut conn = self.conn.clone();
            async move { call.run(&mut conn).await }
        }))
        .await;
        for result in results {
            result.map_err(redis_err)?;
        }
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
        let layout = &self.shared.layout;
        let key = layout.seq_key(shard);
        let stored_key = layout.stored_key(shard);
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
                    let mut call = self.verify.call();
                    call.key(&key).key(&stored_key);
                    for &(conversation, _) in chunk {
                        call.key(layout.recent_key(shard, conversation));
                    }
                    call.arg(replid).arg(moved_to).arg("0");
                    for &(conversation, seq) in chunk {
                        call.arg(conversation).arg(seq);
                    }
                    let applied = int_reply(call.run(&mut self.conn).await)?;
                    if applied == 0 {
                        // Another change of master: the next round asks again.
                        return Ok(());
                    }
                }
            }
        }
        let mut call = self.verify.call();
        call.key(&key)
            .key(&stored_key)
            .arg(replid)
            .arg(moved_to)
            .arg("1");
        let applied = int_reply(call.run(&mut self.conn).await)?;
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

/// A script's integer reply.
fn int_reply(reply: redis::RedisResult<Value>) -> StoreResult<i64> {
    match reply.map_err(redis_err)? {
        Value::Int(n) => Ok(n),
        other => Err(redis_err(format!("unexpected script reply {other:?}"))),
    }
}

/// One append call's replies: one per message, then (with `acks`) the
/// number of replicas `WAIT` saw. Stored messages and duplicates that the
/// replicas did not confirm become [`Reply::Unconfirmed`].
fn parse_call(
    reply: Value,
    waited: Option<Value>,
    expected: usize,
    acks: u32,
) -> StoreResult<Vec<Reply>> {
    let items = match reply {
        Value::Array(items) => items,
        other => return Err(redis_err(format!("unexpected script reply {other:?}"))),
    };
    if items.len() != expected {
        return Err(redis_err("script answered a different number of messages"));
    }
    let confirmed = match waited {
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
    items
        .into_iter()
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
    /// The shard clock is in this dedup bucket, not the one declared:
    /// nothing was done, call again with it.
    Bucket(u64),
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
            "bucket" => Reply::Bucket(items.get(1).and_then(int).ok_or_else(bad)?),
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
