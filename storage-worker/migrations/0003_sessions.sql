-- Sessions: one per login of a device, kept across token refreshes. A
-- session ends (ended_ms set) on logout, password change, the device limit
-- or an end-session request; its tokens are refused from then on.
CREATE TABLE IF NOT EXISTS sessions (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  user_id BIGINT UNSIGNED NOT NULL,
  device_name VARCHAR(64) NOT NULL,
  address VARCHAR(64) NOT NULL,
  created_ms BIGINT NOT NULL,
  last_seen_ms BIGINT NOT NULL,
  ended_ms BIGINT NULL,
  PRIMARY KEY (id),
  KEY sessions_by_user (user_id, ended_ms),
  KEY sessions_ended (ended_ms)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
