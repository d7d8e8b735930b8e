-- Accounts, groups, memberships with read cursors, and messages. Ids are unsigned 64-bit; conversation ids encode their
-- participants (see proto/src/ids.rs).

CREATE TABLE IF NOT EXISTS users (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  username VARCHAR(32) NOT NULL,
  password_hash VARCHAR(255) NOT NULL,
  created_ms BIGINT NOT NULL,
  PRIMARY KEY (id),
  -- Case-insensitive collation: usernames are unique without regard to case.
  UNIQUE KEY users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_general_ci;

CREATE TABLE IF NOT EXISTS chat_groups (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
  name VARCHAR(255) NOT NULL,
  owner_id BIGINT UNSIGNED NOT NULL,
  created_ms BIGINT NOT NULL,
  PRIMARY KEY (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Participants of direct conversations and members of group conversations.
-- A member sees only messages with seq > joined_seq.
CREATE TABLE IF NOT EXISTS members (
  conversation_id BIGINT UNSIGNED NOT NULL,
  user_id BIGINT UNSIGNED NOT NULL,
  joined_seq BIGINT UNSIGNED NOT NULL DEFAULT 0,
  joined_order BIGINT UNSIGNED NOT NULL DEFAULT 0,
  read_seq BIGINT UNSIGNED NOT NULL DEFAULT 0,
  PRIMARY KEY (conversation_id, user_id),
  KEY members_by_user (user_id, conversation_id)
) ENGINE=InnoDB;

-- One row per message; (conversation_id, seq) is unique, so a redelivered
-- stream entry never makes a second row. `body` is the Protobuf Message
-- without seq and message_id, exactly as it sat in the stream.
CREATE TABLE IF NOT EXISTS messages (
  conversation_id BIGINT UNSIGNED NOT NULL,
  seq BIGINT UNSIGNED NOT NULL,
  message_id BIGINT UNSIGNED NOT NULL,
  sender_id BIGINT UNSIGNED NOT NULL,
  server_time_ms BIGINT NOT NULL,
  body MEDIUMBLOB NOT NULL,
  PRIMARY KEY (conversation_id, seq)
) ENGINE=InnoDB;
