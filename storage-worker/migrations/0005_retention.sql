-- Retention (--message-retention-secs): the oldest messages go first, found
-- through an index on their time; each conversation loses a prefix of its
-- seqs, and its floor (the highest seq removed) is kept, so sync and
-- history report what is gone and seq counters never restart below it.
-- Archived messages (--message-retention-mode archive) move to a table of
-- the same shape that no client request reads.
ALTER TABLE messages ADD KEY messages_by_time (server_time_ms);
CREATE TABLE IF NOT EXISTS message_expiry (
  conversation_id BIGINT UNSIGNED NOT NULL,
  expired_seq BIGINT UNSIGNED NOT NULL,
  expired_ms BIGINT NOT NULL,
  PRIMARY KEY (conversation_id)
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS messages_archive LIKE messages;
