//! MySQL shards of the `messages` table: which database holds a
//! conversation's messages, and the connection pools of those databases.
//!
//! Messages are the one table that grows without bound, and every read of
//! them names its conversation (sync, history, the last message of a
//! conversation, dedup lookups), so they spread over N databases by
//! conversation: [`shard_of`]. Everything else (accounts, sessions, groups,
//! `members` with its read cursors) stays in the main database: the
//! conversation list reads `members` by user, which a split by
//! conversation would fan out to every shard, and those tables are small
//! next to the messages. Without `--mysql-shards` the main database is the
//! only shard.
//!
//! The function is part of the data: it is fixed across releases (the
//! tests pin its values), and [`SHARD_FUNCTION_SQL`] computes the same in
//! MySQL/MariaDB, for moving rows between shards by hand
//! ([`DROP_OTHER_SHARDS_SQL`] deletes what does not belong after a split;
//! docs/scaling.md quotes both).

use mysql_async::Pool;

use crate::schema::{self, SchemaError};

/// Most MySQL shards a deployment may list.
pub const MAX_SHARDS: usize = 256;

/// Mixed into the conversation id before hashing, so that the MySQL shard
/// of a conversation does not follow its Redis stream shard (which hashes
/// the bare id with the same finalizer): `"im-mysql"` in ASCII.
pub const SHARD_SALT: u64 = 0x696d_2d6d_7973_716c;

/// The MySQL shard (`0..shards`) of a conversation's messages: the murmur3
/// finalizer of the salted id, modulo `shards` (0 counts as 1).
///
/// Because it is a plain remainder, growing from N to 2N shards moves a
/// conversation of shard `i` either nowhere or to shard `i + N`: half of
/// each shard's conversations move, and all of them to one new shard.
pub fn shard_of(conversation: u64, shards: u32) -> u32 {
    let mut x = conversation ^ SHARD_SALT;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x % u64::from(shards.max(1))) as u32
}

/// A MySQL/MariaDB stored function that computes [`shard_of`]:
/// `im_message_shard(conversation_id, shards)`. Not created by the
/// migrations (it needs the `CREATE ROUTINE` privilege); an operator
/// creates it where rows are to be moved (see docs/scaling.md). The 64-bit
/// products are taken exactly as DECIMAL and reduced modulo 2^64.
pub const SHARD_FUNCTION_SQL: &str =
    "CREATE FUNCTION im_message_shard(conversation BIGINT UNSIGNED, shards INT UNSIGNED)
RETURNS INT UNSIGNED DETERMINISTIC NO SQL
BEGIN
  DECLARE x BIGINT UNSIGNED DEFAULT conversation ^ 7596778094656188780;
  SET x = x ^ (x >> 33);
  SET x = MOD(CAST(x AS DECIMAL(40)) * 18397679294719823053, 18446744073709551616);
  SET x = x ^ (x >> 33);
  SET x = MOD(CAST(x AS DECIMAL(40)) * 14181476777654086739, 18446744073709551616);
  SET x = x ^ (x >> 33);
  RETURN x % GREATEST(shards, 1);
END";

/// A MySQL/MariaDB stored procedure, `im_drop_other_shards(shards, me)`:
/// deletes from `messages` every row whose conversation is not on shard
/// `me` of `shards` (by `im_message_shard`, which must exist). It walks the
/// primary key one conversation at a time and deletes at most 10,000 rows
/// per statement, so no transaction grows large; it may run while the
/// shard serves.
pub const DROP_OTHER_SHARDS_SQL: &str =
    "CREATE PROCEDURE im_drop_other_shards(shards INT UNSIGNED, me INT UNSIGNED)
MODIFIES SQL DATA
BEGIN
  DECLARE c BIGINT UNSIGNED DEFAULT (SELECT MIN(conversation_id) FROM messages);
  WHILE c IS NOT NULL DO
    IF im_message_shard(c, shards) <> me THEN
      REPEAT
        DELETE FROM messages WHERE conversation_id = c LIMIT 10000;
      UNTIL ROW_COUNT() = 0 END REPEAT;
    END IF;
    SET c = (SELECT MIN(conversation_id) FROM messages WHERE conversation_id > c);
  END WHILE;
END";

/// Why a shard list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardListError {
    /// An entry of the list is empty.
    #[error("--mysql-shards has an empty entry")]
    Empty,
    /// More than [`MAX_SHARDS`] entries.
    #[error("--mysql-shards lists {0} databases; at most {MAX_SHARDS}")]
    TooMany(usize),
    /// The same database is listed twice (its conversations would be
    /// split between two numbers that both point at it).
    #[error("--mysql-shards lists {0} twice")]
    Duplicate(String),
}

/// Checks a `--mysql-shards` list (empty: no sharding).
pub fn validate_urls(urls: &[String]) -> Result<(), ShardListError> {
    if urls.len() > MAX_SHARDS {
        return Err(ShardListError::TooMany(urls.len()));
    }
    for (i, url) in urls.iter().enumerate() {
        if url.trim().is_empty() {
            return Err(ShardListError::Empty);
        }
        if urls[..i].contains(url) {
            return Err(ShardListError::Duplicate(url.clone()));
        }
    }
    Ok(())
}

/// The pools of the message shards, in shard order. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShardPools {
    pools: Vec<Pool>,
    /// Whether shard `i` is the main database's own pool.
    is_main: Vec<bool>,
}

impl ShardPools {
    /// The pools of `urls` (each made by `open`); a shard whose URL is the
    /// main database's (`main_url`) shares `main`'s pool. An empty list
    /// means one shard, the main database.
    pub fn new(
        main_url: &str,
        main: &Pool,
        urls: &[String],
        open: impl Fn(&str) -> Result<Pool, mysql_async::Error>,
    ) -> Result<ShardPools, mysql_async::Error> {
        if urls.is_empty() {
            return Ok(ShardPools {
                pools: vec![main.clone()],
                is_main: vec![true],
            });
        }
        let mut pools = Vec::with_capacity(urls.len());
        let mut is_main = Vec::with_capacity(urls.len());
        for url in urls {
            if url == main_url {
                pools.push(main.clone());
                is_main.push(true);
            } else {
                pools.push(open(url)?);
                is_main.push(false);
            }
        }
        Ok(ShardPools { pools, is_main })
    }

    /// Number of shards (at least 1).
    pub fn len(&self) -> u32 {
        self.pools.len() as u32
    }

    /// Always false: there is at least the main database.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The shard of a conversation.
    pub fn shard_of(&self, conversation: u64) -> u32 {
        shard_of(conversation, self.len())
    }

    /// The pool of shard `shard`.
    pub fn get(&self, shard: u32) -> &Pool {
        &self.pools[shard as usize % self.pools.len()]
    }

    /// The pool holding a conversation's messages.
    pub fn of(&self, conversation: u64) -> &Pool {
        self.get(self.shard_of(conversation))
    }

    /// Applies the migrations on every shard that is not the main database
    /// (the caller migrates that one), all shards at once.
    pub async fn migrate(&self) -> Result<(), SchemaError> {
        let own = self
            .pools
            .iter()
            .zip(&self.is_main)
            .filter(|(_, main)| !**main)
            .map(|(pool, _)| schema::migrate(pool));
        for result in futures::future::join_all(own).await {
            result?;
        }
        Ok(())
    }

    /// Closes the pools that are not the main database's.
    pub async fn disconnect(&self) {
        for (pool, main) in self.pools.iter().zip(&self.is_main) {
            if !main {
                if let Err(e) = pool.clone().disconnect().await {
                    tracing::debug!(error = %e, "closing a shard's MySQL pool");
                }
            }
        }
    }

    /// Splits `items` by the shard of `conversation(item)`: one list per
    /// shard, each in the order given.
    pub fn split<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        conversation: impl Fn(&T) -> u64,
    ) -> Vec<Vec<T>> {
        let mut out: Vec<Vec<T>> = (0..self.pools.len()).map(|_| Vec::new()).collect();
        for item in items {
            let shard = self.shard_of(conversation(&item)) as usize;
            out[shard].push(item);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_function_is_fixed_across_releases() {
        // Stored data depends on these: never change them.
        for (conversation, two, four, seven) in [
            (1u64, 1, 3, 1),
            (2, 0, 0, 0),
            (3, 1, 1, 4),
            (42, 0, 0, 2),
            (4_294_967_303, 1, 1, 1),
            (4_611_686_018_427_387_909, 0, 0, 0),
            (u64::MAX, 0, 2, 2),
        ] {
            assert_eq!(shard_of(conversation, 2), two, "{conversation}");
            assert_eq!(shard_of(conversation, 4), four, "{conversation}");
            assert_eq!(shard_of(conversation, 7), seven, "{conversation}");
        }
        assert_eq!(shard_of(12345, 1), 0);
        assert_eq!(shard_of(12345, 0), 0);
    }

    #[test]
    fn the_operators_guide_quotes_the_sql_as_it_is() {
        let guide = include_str!("../../docs/scaling.md");
        assert!(guide.contains(SHARD_FUNCTION_SQL), "docs/scaling.md");
        assert!(guide.contains(DROP_OTHER_SHARDS_SQL), "docs/scaling.md");
    }

    #[test]
    fn doubling_moves_half_of_each_shard_to_its_new_twin() {
        let ids = (1..200u64).flat_map(|a| {
            [
                im_proto::ConversationId::direct(a, a + 7).map(|c| c.raw()),
                im_proto::ConversationId::group(a).map(|c| c.raw()),
            ]
        });
        for n in [1u32, 2, 3, 4, 8] {
            let mut moved = vec![0u32; n as usize];
            let mut stayed = vec![0u32; n as usize];
            for c in ids.clone().flatten() {
                let (old, new) = (shard_of(c, n), shard_of(c, 2 * n));
                assert!(new == old || new == old + n, "{c}: {old} of {n} -> {new}");
                if new == old {
                    stayed[old as usize] += 1;
                } else {
                    moved[old as usize] += 1;
                }
            }
            for i in 0..n as usize {
                let total = moved[i] + stayed[i];
                // About half, with room for chance.
                assert!(
                    moved[i] * 3 > total && stayed[i] * 3 > total,
                    "shard {i} of {n}: {} moved, {} stayed",
                    moved[i],
                    stayed[i]
                );
            }
        }
    }

    #[test]
    fn mysql_shards_do_not_follow_stream_shards() {
        // Conversations of one stream shard spread over both MySQL shards.
        let layout = crate::layout::Layout::new("im", 2);
        let mut seen = [[0u32; 2]; 2];
        for a in 1..400u64 {
            let c = im_proto::ConversationId::direct(a, a + 1).unwrap().raw();
            seen[layout.shard_of(c) as usize][shard_of(c, 2) as usize] += 1;
        }
        for row in seen {
            for n in row {
                assert!(n > 60, "{seen:?}");
            }
        }
    }

    #[test]
    fn shard_lists_are_checked() {
        let urls = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(validate_urls(&[]), Ok(()));
        assert_eq!(
            validate_urls(&urls(&["mysql://a/x", "mysql://b/x"])),
            Ok(())
        );
        assert_eq!(
            validate_urls(&urls(&["mysql://a/x", " "])),
            Err(ShardListError::Empty)
        );
        assert_eq!(
            validate_urls(&urls(&["mysql://a/x", "mysql://a/x"])),
            Err(ShardListError::Duplicate("mysql://a/x".into()))
        );
        let many = vec!["mysql://a/x".to_string(); MAX_SHARDS + 1];
        assert_eq!(
            validate_urls(&many),
            Err(ShardListError::TooMany(MAX_SHARDS + 1))
        );
    }

    #[test]
    fn items_split_by_shard_in_order() {
        let main = Pool::new(mysql_async::Opts::default());
        let one = ShardPools::new("mysql://m/x", &main, &[], |_| unreachable!()).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one.split([5u64, 6, 7], |&c| c), vec![vec![5, 6, 7]]);
        let urls = vec!["mysql://m/x".to_string(), "mysql://other/x".to_string()];
        let two = ShardPools::new("mysql://m/x", &main, &urls, |_| {
            Ok(Pool::new(mysql_async::Opts::default()))
        })
        .unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(two.is_main, [true, false]);
        let ids: Vec<u64> = (1..50).collect();
        let parts = two.split(ids.iter().copied(), |&c| c);
        for (shard, part) in parts.iter().enumerate() {
            assert!(part.windows(2).all(|w| w[0] < w[1]));
            assert!(part.iter().all(|&c| two.shard_of(c) == shard as u32));
        }
        assert_eq!(parts[0].len() + parts[1].len(), ids.len());
    }
}
