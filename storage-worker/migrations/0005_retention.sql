-- Retention (--message-retention-secs): each conversation loses a prefix of
-- its seqs, and its floor (the highest seq removed) is kept, so sync and
-- history report what is gone and seq counters never restart below it.
-- Archived messages (--message-retention-mode archive) move to a table of
-- the same shape that no client request reads. The index on
-- messages.server_time_ms that finds the oldest rows is added by the first
-- sweep (im_storage::retention), not here: it costs every insert, and
-- deployments that keep messages forever need not pay for it.
CREATE TABLE IF NOT EXISTS message_expiry (
  conversation_id BIGINT UNSIGNED NOT NULL,
  expired_seq BIGINT UNSIGNED NOT NULL,
  expired_ms BIGINT NOT NULL,
  PRIMARY KEY (conversation_id)
) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS messages_archive LIKE messages;
