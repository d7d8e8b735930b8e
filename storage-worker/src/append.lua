-- Appends a batch of messages of one stream shard atomically, in order.
--
-- KEYS[1]  the shard's stream, "<prefix>:{s<N>}:stream"; every other key
--          is derived from it and shares its hash tag.
-- ARGV[1]  server time, Unix ms
-- ARGV[2]  current dedup bucket number (the previous one is checked too)
-- ARGV[3]  seconds a dedup bucket lives
-- ARGV[4]  records kept per conversation in the recent cache, beyond
--          those not yet stored in MySQL
-- ARGV[5]  seconds an idle conversation's recent cache lives
-- ARGV[6]  number of messages; then 5 arguments per message:
--          conversation id, sender id ("0" for server notices),
--          client_msg_id ("" for none), kind ("d" direct, "g" group,
--          "n" notice), record body
--
-- All messages appended by one call go into one stream entry, as repeated
-- "m" fields in order, so the stream costs one entry per call, not per
-- message. Each conversation's recent cache is a list of its newest
-- records, contiguous in seq.
--
-- Returns one reply per message, in order:
--   {"ok", seq, n}          stored; the record is "<seq>:<n>:" .. body
--   {"dup", "seq:n:time"}   the sender already stored this client_msg_id
--   {"nm"}                  the sender is not a member of the group
--   {"load"}                the group's member set is not cached: load it
--   {"seed"}                the conversation's seq counter is missing:
--                           seed it from MySQL (HSETNX to last seq + 1)
--   {"blocked"}             an earlier message of the same conversation
--                           needs "load" or "seed" first; resubmit
-- A conversation that needs "load" or "seed" is blocked for the rest of
-- the batch, so resubmitting keeps its order.

local stream = KEYS[1]
local base = string.sub(stream, 1, -8)
local seq_key = base .. ":seq"
local stored_key = base .. ":stored"
local now = ARGV[1]
local bucket = tonumber(ARGV[2])
local dedup_cur = base .. ":dedup:" .. string.format("%d", bucket)
local dedup_prev = base .. ":dedup:" .. string.format("%d", bucket - 1)
local dedup_ttl = tonumber(ARGV[3])
local cache_len = tonumber(ARGV[4])
local cache_ttl = tonumber(ARGV[5])
local count = tonumber(ARGV[6])

local out = {}
local blocked = {}
local entry = {}
-- Dedup entries written by this call, flushed with one HSET at the end
-- (and consulted for duplicates within the call).
local written = {}
local dedup = {}
-- Message counter values are reserved for the whole call at once.
local n_next = redis.call("HINCRBY", seq_key, "#n", count) - count
if n_next >= 1099511627776 then
  -- Only n mod 4096 enters message ids; keep the counter small.
  redis.call("HSET", seq_key, "#n", count)
  n_next = 0
end

for i = 1, count do
  local at = 7 + (i - 1) * 5
  local conv = ARGV[at]
  local sender = ARGV[at + 1]
  local cmid = ARGV[at + 2]
  local kind = ARGV[at + 3]
  local body = ARGV[at + 4]
  local reply = nil
  local field = nil

  if blocked[conv] then
    reply = {"blocked"}
  end

  if reply == nil and cmid ~= "" then
    field = conv .. ":" .. sender .. ":" .. cmid
    local seen = written[field] or redis.call("HGET", dedup_cur, field)
    if not seen then
      seen = redis.call("HGET", dedup_prev, field)
    end
    if seen then
      reply = {"dup", seen}
    end
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
    -- Counters hold last seq + 1, so a missing one (a new conversation, or
    -- a lost counter) shows as 1 here: undo, and let the node seed it from
    -- MySQL first.
    local seq = redis.call("HINCRBY", seq_key, conv, 1) - 1
    if seq == 0 then
      redis.call("HDEL", seq_key, conv)
      blocked[conv] = true
      reply = {"seed"}
    else
      n_next = n_next + 1
      -- Both stay far below 1e14, so Lua prints them as plain integers.
      local head = seq .. ":" .. n_next .. ":"
      local record = head .. body
      entry[#entry + 1] = "m"
      entry[#entry + 1] = record

      local recent = base .. ":recent:" .. conv
      redis.call("RPUSH", recent, record)
      if seq % 16 == 1 then
        -- Every 16 messages: drop what MySQL has and the cache need not
        -- keep, and renew the idle timeout.
        local stored = tonumber(redis.call("HGET", stored_key, conv) or "0")
        local floor = math.min(stored, seq - cache_len)
        local first = tonumber(string.match(redis.call("LINDEX", recent, 0) or "", "^(%d+):"))
        if first and floor >= first then
          redis.call("LTRIM", recent, floor - first + 1, -1)
        end
        redis.call("EXPIRE", recent, cache_ttl)
      end

      if field then
        local value = head .. now
        written[field] = value
        dedup[#dedup + 1] = field
        dedup[#dedup + 1] = value
      end
      reply = {"ok", seq, n_next}
    end
  end

  out[i] = reply
end

if #entry > 0 then
  redis.call("XADD", stream, "*", unpack(entry))
end
if #dedup > 0 then
  redis.call("HSET", dedup_cur, unpack(dedup))
  redis.call("EXPIRE", dedup_cur, dedup_ttl * 2)
end
return out
