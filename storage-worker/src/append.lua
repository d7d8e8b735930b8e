-- Appends a batch of messages of one stream shard atomically, in order.
--
-- Every key the script touches is declared in KEYS, all with the shard's
-- hash tag, so a Redis Cluster routes the call to where its keys are while
-- the shard's slot is being migrated: -ASK when they all moved, -TRYAGAIN
-- when they are split between the two nodes or one does not exist yet. In
-- either case the script has not run, and the caller retries.
-- KEYS[1]  the shard's stream, "<prefix>:{s<N>}:stream"
-- KEYS[2]  its seq hash (":seq"), KEYS[3] its stored watermarks (":stored")
-- KEYS[4]  its call memo (":calls"): lane token -> the last call's replies
-- KEYS[5]  the dedup bucket the caller expects (":dedup:<B>", see ARGV[10])
-- KEYS[6]  the bucket before it (":dedup:<B-1>")
-- KEYS[7..] the recent cache (":recent:<C>") of every conversation of the
--          batch, and the member set (":members:<C>") of every group of it,
--          once each, in any order; a key the script needs that is not
--          declared is an error raised before anything is written
-- ARGV[1]  server time, Unix ms (the messages' server_time_ms)
-- ARGV[2]  the same time as a tick of the shard clock (layout::tick_of)
-- ARGV[3]  ticks per millisecond (layout::TICKS_PER_MS)
-- ARGV[4]  seconds a dedup bucket covers (the dedup window)
-- ARGV[5]  records kept per conversation in the recent cache, beyond
--          those not yet stored in MySQL
-- ARGV[6]  seconds an idle conversation's recent cache lives
-- ARGV[7]  number of messages
-- ARGV[8]  the calling lane's token (unique per lane and process start)
-- ARGV[9]  the call's number within the lane (never reused by the lane)
-- ARGV[10] the dedup bucket B the caller expects (layout::dedup_bucket)
-- ARGV[11..] 6 arguments per message:
--          conversation id, sender id ("0" for server notices),
--          client_msg_id ("" for none), kind ("d" direct, "g" group,
--          "n" notice), attempt ("" first attempt, "r" a resend, "c" a
--          resend MySQL was checked for), record body
--
-- Calls run once. A call that stored something leaves its replies in the
-- memo under its lane's token; the same call again (a client library
-- resending it after a timeout or a broken connection, when the first one
-- may have run) gets those replies back and changes nothing, so its
-- messages are acknowledged with the seqs they took, never appended twice.
-- A lane makes one call at a time per shard, so the memo needs only its
-- last call. Memo entries older than a minute are swept now and then.
--
-- The shard clock. `#t` in the seq hash holds the last tick taken; each
-- stored message takes the next one, which is the wall clock (ARGV[2])
-- or one past the last tick, whichever is later. Ticks never repeat or go
-- back, so message ids (tick and shard) are unique however many messages
-- arrive within one millisecond and whichever node appends them. Dedup
-- buckets follow the same clock, so where a message's dedup entry lives
-- is a function of its tick.
--
-- The dedup bucket. The bucket is the shard clock's, as computed here
-- (the clock may run ahead of the caller's wall clock), not the caller's:
-- a bucket taken from each node's own clock would put a message's entry
-- wherever that node's clock said, and a resend to a node whose clock is
-- behind would look in buckets before it and miss it; and the "check"
-- decision below trusts that every message with a tick past
-- `window_start` has its entry in the two buckets checked, which holds
-- only if buckets follow ticks. So the caller names the bucket it expects
-- (from its clock, or from the shard's last answer) and declares it and
-- the one before; when the clock's bucket differs the script writes
-- nothing and answers {"bucket", B} for every message, and the caller
-- calls again with bucket B. That happens around a bucket's start, or
-- while the caller's clock is behind the shard clock by a bucket.
--
-- All messages appended by one call go into one stream entry, as repeated
-- "m" fields in order, so the stream costs one entry per call, not per
-- message. Each conversation's recent cache is a list of its newest
-- records, contiguous in seq.
--
-- Returns one reply per message, in order:
--   {"ok", seq, tick}       stored; the record is "<seq>:<tick>:" .. body
--   {"dup", "seq:tick:time"} the sender already stored this client_msg_id
--   {"nm"}                  the sender is not a member of the group
--   {"load"}                the group's member set is not cached: load it
--   {"seed"}                the conversation's seq counter is missing:
--                           seed it from MySQL (HSETNX to last seq + 1)
--   {"check"}               a resend the dedup window does not know, while
--                           every message of the conversation MySQL may
--                           lack is inside the window: look it up in MySQL,
--                           then resubmit it as "c" if it is not there
--   {"lag"}                 a resend the dedup window does not know, while
--                           the storage worker is more than the window
--                           behind on the conversation: nobody can tell yet
--                           whether it was stored; refuse it for now
--   {"verify", replid, tick} this shard's counters have not been checked
--                           against MySQL since its master last changed
--                           (a failover, a restart that may have lost the
--                           tail of its AOF): nothing is appended until
--                           the node checks them (see VERIFY_SCRIPT) and
--                           resubmits; replid is the master's replication
--                           id, tick the shard clock's last tick
--   {"bucket", B}           the shard clock is in dedup bucket B, not the
--                           one the caller declared: nothing was done; call
--                           again with bucket B (every message of the call
--                           gets this reply, like "verify")
--   {"blocked"}             an earlier message of the same conversation
--                           needs "load", "seed" or "check" first; resubmit
--                           (a duplicate or a resend to check is answered
--                           as such even then)
-- A conversation that needs "load", "seed" or "check" is blocked for the
-- rest of the batch, so resubmitting keeps its order.

local stream = KEYS[1]
local seq_key = KEYS[2]
local stored_key = KEYS[3]
local calls_key = KEYS[4]
local base = string.sub(stream, 1, -8)
local count = tonumber(ARGV[7])
local token = ARGV[8]
local call = ARGV[9]
local first_arg = 11

-- The same call again: its replies, and a write, so that a WAIT after it
-- also covers the first run's. The memo is "<call>:<time>:<replies>".
local memo = redis.call("HGET", calls_key, token)
if memo then
  local colon = string.find(memo, ":", 1, true)
  if colon and string.sub(memo, 1, colon - 1) == call then
    redis.call("HINCRBY", seq_key, "#w", 1)
    local rest = string.sub(memo, colon + 1)
    return cmsgpack.unpack(string.sub(rest, string.find(rest, ":", 1, true) + 1))
  end
end

-- Every key used below must be declared (see the header).
local declared = {}
for i = 1, #KEYS do
  declared[KEYS[i]] = true
end
local function check_declared(name)
  if not declared[name] then
    error("append script: undeclared key " .. name)
  end
end
for i = 1, count do
  local at = first_arg + (i - 1) * 6
  check_declared(base .. ":recent:" .. ARGV[at])
  if ARGV[at + 3] == "g" then
    check_declared(base .. ":members:" .. ARGV[at])
  end
end

-- Every message of the call gets the same reply.
local function all(reply)
  local out = {}
  for i = 1, count do
    out[i] = reply
  end
  return out
end

-- Counters are trusted under the master that last checked them (`#r` in
-- the seq hash, its replication id). A new master (a promoted replica, a
-- restarted process: every start takes a new replication id) may have
-- lost writes MySQL already has, so it appends nothing until its counters
-- are checked again.
local replid = string.match(redis.call("INFO", "replication"), "master_replid:(%w+)")
if redis.call("HGET", seq_key, "#r") ~= replid then
  return all({"verify", replid, redis.call("HGET", seq_key, "#t") or "0"})
end

local now = ARGV[1]
local per_ms = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local cache_len = tonumber(ARGV[5])
local cache_ttl = tonumber(ARGV[6])

-- Lua numbers are doubles and print with 14 significant digits: seqs and
-- ticks stay below 1e14 (ticks until 2073), so they print as plain,
-- exact integers.
local last_tick = tonumber(redis.call("HGET", seq_key, "#t") or "0")
local clock = math.max(tonumber(ARGV[2]), last_tick + 1)
local bucket_ticks = window * 1000 * per_ms
local bucket = math.floor(clock / bucket_ticks)
if bucket ~= tonumber(ARGV[10]) then
  return all({"bucket", bucket})
end
local dedup_cur = base .. ":dedup:" .. bucket
local dedup_prev = base .. ":dedup:" .. (bucket - 1)
check_declared(dedup_cur)
check_declared(dedup_prev)
-- The two buckets checked hold every message with a tick from here on
-- (a second of margin for ticks taken within one call).
local window_start = (bucket - 1) * bucket_ticks + 1000 * per_ms

-- Per conversation appended to in this call: the last seq given
-- (`counters`; written back with one HSET at the end), the records not yet
-- pushed to its recent cache (`pending`, pushed with one RPUSH per
-- conversation), the first seq among them (`first_new`), whether its cache
-- must be cut to them (`restart`), in the order of first append (`order`).
-- Most calls carry many messages of few conversations, so the commands a
-- message costs become commands a conversation costs.
local counters = {}
local pending = {}
local first_new = {}
local restart = {}
local order = {}

-- Pushes a conversation's pending records to its recent cache; every 16
-- seqs also drops what MySQL has and the cache need not keep, and renews
-- the idle timeout.
local function flush(conv)
  local records = pending[conv]
  if records == nil or #records == 0 then
    return
  end
  local recent = base .. ":recent:" .. conv
  redis.call("RPUSH", recent, unpack(records))
  if restart[conv] then
    redis.call("LTRIM", recent, -#records, -1)
    restart[conv] = nil
  end
  local last = counters[conv]
  -- Some seq in first_new..last is 1 modulo 16.
  if math.floor((last - 1) / 16) > math.floor((first_new[conv] - 2) / 16) then
    -- The newest record always stays (the list never empties here).
    local stored = tonumber(redis.call("HGET", stored_key, conv) or "0")
    local floor = math.min(stored, last - cache_len, last - 1)
    local first = tonumber(string.match(redis.call("LINDEX", recent, 0) or "", "^(%d+):"))
    if first and floor >= first then
      redis.call("LTRIM", recent, floor - first + 1, -1)
    end
    redis.call("EXPIRE", recent, cache_ttl)
  end
  pending[conv] = {}
  first_new[conv] = nil
end

-- Whether every message of `conv` that MySQL may not have yet is young
-- enough for the dedup window, so that a resend the window misses is
-- either in MySQL or was never stored.
local function covered(conv)
  local last = counters[conv]
  if last == nil then
    local counter = redis.call("HGET", seq_key, conv)
    if not counter then
      -- No counter: a new conversation, or one whose Redis state was lost
      -- (and with it anything not yet stored); MySQL is all there is.
      return true
    end
    last = tonumber(counter) - 1
  end
  local stored = tonumber(redis.call("HGET", stored_key, conv) or "0")
  if stored >= last then
    return true
  end
  -- The oldest message MySQL may lack is seq stored + 1; the recent cache
  -- keeps every record above the stored watermark (this call's too, once
  -- pushed).
  flush(conv)
  local recent = base .. ":recent:" .. conv
  local first = tonumber(string.match(redis.call("LINDEX", recent, 0) or "", "^(%d+):"))
  if not first or first > stored + 1 then
    return false
  end
  local record = redis.call("LINDEX", recent, stored + 1 - first)
  local tick = tonumber(string.match(record or "", "^%d+:(%d+):"))
  return tick ~= nil and tick >= window_start
end

-- The dedup fields of the call's messages, looked up in both buckets with
-- one HMGET each (the buckets are written only at the end).
local fields = {}
local known = {}
do
  local want = {}
  for i = 1, count do
    local at = first_arg + (i - 1) * 6
    local cmid = ARGV[at + 2]
    if cmid ~= "" then
      local field = ARGV[at] .. ":" .. ARGV[at + 1] .. ":" .. cmid
      fields[i] = field
      want[#want + 1] = field
    end
  end
  if #want > 0 then
    local found = redis.call("HMGET", dedup_cur, unpack(want))
    local missing = {}
    for j = 1, #want do
      if found[j] then
        known[want[j]] = found[j]
      else
        missing[#missing + 1] = want[j]
      end
    end
    if #missing > 0 then
      found = redis.call("HMGET", dedup_prev, unpack(missing))
      for j = 1, #missing do
        if found[j] then
          known[missing[j]] = found[j]
        end
      end
    end
  end
end

local out = {}
local blocked = {}
local entry = {}
-- Dedup entries written by this call, flushed with one HSET at the end
-- (and consulted for duplicates within the call).
local written = {}
local dedup = {}
-- Whether a duplicate was answered: see the end.
local dup_seen = false

for i = 1, count do
  local at = first_arg + (i - 1) * 6
  local conv = ARGV[at]
  local sender = ARGV[at + 1]
  local kind = ARGV[at + 3]
  local attempt = ARGV[at + 4]
  local body = ARGV[at + 5]
  local reply = nil
  local field = fields[i]

  -- Duplicates and resends are answered even in a blocked conversation:
  -- neither takes a seq, so order is kept, and every resend of a batch
  -- is looked up in one round instead of one round each.
  if field then
    local seen = written[field] or known[field]
    if seen then
      dup_seen = true
      reply = {"dup", seen}
    elseif attempt == "r" then
      if covered(conv) then
        blocked[conv] = true
        reply = {"check"}
      else
        reply = {"lag"}
      end
    end
  end

  if reply == nil and blocked[conv] then
    reply = {"blocked"}
  end

  if reply == nil and kind == "g" then
    local members = base .. ":members:" .. conv
    if redis.call("SISMEMBER", members, sender) == 0 then
      if redis.call("EXISTS", members) == 0 then
        blocked[conv] = true
        reply = {"load"}
      else
        reply = {"nm"}
      end
    end
  end

  if reply == nil then
    local last = counters[conv]
    if last == nil then
      -- Counters hold last seq + 1, so a missing one (a new conversation,
      -- or a lost counter) is told apart: let the node seed it from MySQL
      -- first.
      local counter = redis.call("HGET", seq_key, conv)
      if counter then
        last = tonumber(counter) - 1
        -- The cache ends with the conversation's newest record: a counter
        -- that fell behind it (rolled back or rewritten) is moved past it,
        -- so a seq is never given twice; a cache that does not end right
        -- below the next seq is cut to this call's records once they are
        -- pushed, so it stays contiguous (cut after the push, not deleted
        -- before it: a key this script deletes and writes again would be
        -- missing in between, which a cluster node migrating the slot
        -- refuses mid-script).
        local tail = redis.call("LINDEX", base .. ":recent:" .. conv, -1)
        local tail_seq = tail and tonumber(string.match(tail, "^(%d+):"))
        if tail_seq and tail_seq > last then
          last = tail_seq
        elseif tail_seq and tail_seq ~= last then
          restart[conv] = true
        end
        counters[conv] = last
        pending[conv] = {}
        order[#order + 1] = conv
      else
        blocked[conv] = true
        reply = {"seed"}
      end
    end
    if reply == nil then
      local seq = last + 1
      counters[conv] = seq
      if first_new[conv] == nil then
        first_new[conv] = seq
      end
      local tick = clock
      clock = clock + 1
      -- %d formats integers; `..` on a number goes through the C library's
      -- floating-point printer, a measurable share of the script.
      local head = string.format("%d:%d:", seq, tick)
      local record = head .. body
      entry[#entry + 1] = "m"
      entry[#entry + 1] = record
      local list = pending[conv]
      list[#list + 1] = record

      if field then
        local value = head .. now
        written[field] = value
        dedup[#dedup + 1] = field
        dedup[#dedup + 1] = value
      end
      reply = {"ok", seq, tick}
    end
  end

  out[i] = reply
end

if #entry > 0 then
  local counts = {"#t", string.format("%d", clock - 1)}
  for _, conv in ipairs(order) do
    flush(conv)
    counts[#counts + 1] = conv
    counts[#counts + 1] = string.format("%d", counters[conv] + 1)
  end
  redis.call("HSET", seq_key, unpack(counts))
  redis.call("XADD", stream, "*", unpack(entry))
elseif dup_seen then
  -- A call that answers a duplicate writes something, so that a WAIT after
  -- it (--redis-replica-acks) also covers the original, which another
  -- connection may have appended.
  redis.call("HINCRBY", seq_key, "#w", 1)
end
if #dedup > 0 then
  redis.call("HSET", dedup_cur, unpack(dedup))
  -- The bucket lives at least two windows past its last write. Renewed
  -- on every call, that was an expiry in the AOF per call (about 70
  -- bytes: a third of a one-message call's writes besides its two
  -- records); renewed only once two windows are no longer left, with a
  -- second to spare, it is renewed about once a second per bucket. (A
  -- new bucket has no expiry, -1: set at once.)
  if redis.call("PTTL", dedup_cur) < window * 2000 then
    redis.call("PEXPIRE", dedup_cur, window * 2000 + 1000)
  end
end
if #entry > 0 then
  redis.call("HSET", calls_key, token, call .. ":" .. now .. ":" .. cmsgpack.pack(out))
  -- About every 16 s of shard clock: forget the calls of lanes that made
  -- none for a minute (stopped processes). The marker field "#" keeps the
  -- hash, so it exists whenever the shard does.
  if math.floor(clock / 1048576) ~= math.floor(last_tick / 1048576) then
    local fields = redis.call("HGETALL", calls_key)
    local old = tonumber(now) - 60000
    for i = 1, #fields, 2 do
      local t = tonumber(string.match(fields[i + 1], "^%d+:(%d+):"))
      if fields[i] ~= "#" and (not t or t < old) then
        redis.call("HDEL", calls_key, fields[i])
      end
    end
    redis.call("HSET", calls_key, "#", "")
  end
end
return out
