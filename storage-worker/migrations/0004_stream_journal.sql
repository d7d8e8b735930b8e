-- What each committed batch stored, per stream shard: the shard clock's
-- last tick among its messages and, for each conversation, the greatest
-- seq (16 bytes per conversation: id and seq, little-endian). Written in
-- the batch's own transaction. After a Redis master changes (a failover,
-- a restart that lost the tail of its AOF), servers read the rows above the
-- shard clock Redis still has, and move every counter past what MySQL
-- holds before appending again. Rows older than the worker's
-- --journal-retention-secs are deleted.
CREATE TABLE IF NOT EXISTS stream_journal (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  shard INT UNSIGNED NOT NULL,
  last_tick BIGINT UNSIGNED NOT NULL,
  written_ms BIGINT NOT NULL,
  conversations MEDIUMBLOB NOT NULL,
  PRIMARY KEY (id),
  KEY stream_journal_by_tick (shard, last_tick),
  KEY stream_journal_by_time (written_ms)
) ENGINE=InnoDB;
