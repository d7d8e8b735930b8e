-- Resends are recognised after the dedup window too: each message row
-- keeps the dedup key of its send (a stable hash of sender and
-- client_msg_id, 0 for none; see layout::dedup_key), indexed with the
-- conversation, so a resend that Redis no longer remembers is looked up
-- here. It is written in the same transaction as the row.
ALTER TABLE messages
  ADD COLUMN dedup_key BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER server_time_ms,
  ADD KEY messages_dedup (conversation_id, dedup_key);
