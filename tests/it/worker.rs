//! The storage worker against real Redis and MariaDB: entries are written
//! into the shard streams the way the append script writes them, an
//! in-process worker stores them, and the tests read MySQL and Redis.

use std::time::{Duration, Instant};

use im_proto::{ConversationId, pb};
use im_storage::layout::{Layout, encode_record, message_id, record_body, tick_of};
use im_storage::{Worker, WorkerConfig, WorkerHandle};
use im_tests::WorkerProcess;
use im_tests::eventually;
use im_tests::services::{self, MariaDb, RedisServer};
use mysql_async::prelude::*;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;

/// A test's own key prefix and database on the shared services.
struct Env {
    layout: Layout,
    redis_url: String,
    mysql_url: String,
    redis: MultiplexedConnection,
    pool: mysql_async::Pool,
}

impl Env {
    async fn new(streams: u32) -> Env {
        let shared = services::shared();
        Self::on(&shared.redis_url, &shared.mysql_url, streams).await
    }

    async fn on(redis_url: &str, mysql_server_url: &str, streams: u32) -> Env {
        im_tests::init_logging();
        let mysql_url = services::fresh_database(mysql_server_url);
        let redis = redis::Client::open(redis_url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let pool = mysql_async::Pool::new(mysql_url.as_str());
        // The schema exists before any worker starts, so that every count
        // below is a real query (a failing one fails the test).
        im_storage::schema::migrate(&pool).await.expect("migrate");
        Env {
            layout: Layout::new(services::unique_prefix(), streams),
            redis_url: redis_url.to_string(),
            mysql_url,
            redis,
            pool,
        }
    }

    /// Creates consumer group `group` on `stream` (from the start) and has
    /// `consumer` read up to `count` entries, leaving them pending.
    async fn read_as(&self, stream: &str, group: &str, consumer: &str, count: usize) {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .query_async(&mut self.r())
            .await
            .unwrap();
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut self.r())
            .await
            .unwrap();
    }

    /// A handle on the Redis connection.
    fn r(&self) -> MultiplexedConnection {
        self.redis.clone()
    }

    /// Worker settings fast enough for tests.
    fn config(&self, consumer: &str) -> WorkerConfig {
        let mut c = WorkerConfig::new(&self.redis_url, &self.mysql_url);
        c.redis_prefix = self.layout.prefix().to_string();
        c.streams = self.layout.streams();
        c.consumer = Some(consumer.to_string());
        c.batch_age_ms = 5;
        c.block_ms = 100;
        c.claim_idle_ms = 400;
        c.claim_interval_ms = 100;
        c.trim_interval_ms = 0;
        c.retry_min_ms = 20;
        c.retry_max_ms = 200;
        c.progress_secs = 0;
        c.shutdown_grace_ms = 5_000;
        c
    }

    async fn start(&self, config: WorkerConfig) -> WorkerHandle {
        Worker::start(config).await.expect("worker starts")
    }

    /// Creates the schema ahead of the worker (to add rows or triggers).
    async fn migrate(&self) {
        im_storage::schema::migrate(&self.pool).await.unwrap();
    }

    /// XADDs a message record as the append script would; returns the
    /// entry id and the message as MySQL should hold it.
    async fn append(&self, conv: u64, sender: u64, seq: u64, text: &str) -> (String, Stored) {
        let time = im_proto::now_ms();
        let body = record_body(&pb::Message {
            conversation_id: conv,
            sender_id: sender,
            client_msg_id: format!("c{seq}"),
            server_time_ms: time,
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text { text: text.into() })),
            }),
            ..Default::default()
        });
        let shard = self.layout.shard_of(conv);
        // A tick of the shard clock, unique as the script's are.
        static NEXT_TICK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let counter = tick_of(time) + NEXT_TICK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = self.xadd(shard, &encode_record(seq, counter, &body)).await;
        let stored = Stored {
            conversation_id: conv,
            seq,
            message_id: message_id(shard, counter),
            sender_id: sender,
            server_time_ms: time,
            body,
        };
        (id, stored)
    }

    async fn xadd(&self, shard: u32, record: &[u8]) -> String {
        self.r()
            .xadd(self.layout.stream_key(shard), "*", &[("m", record)])
            .await
            .unwrap()
    }

    async fn messages(&self) -> Vec<Stored> {
        let mut conn = self.pool.get_conn().await.unwrap();
        let rows: Vec<(u64, u64, u64, u64, i64, Vec<u8>)> = conn
            .query(
                "SELECT conversation_id, seq, message_id, sender_id, server_time_ms, body \
                 FROM messages ORDER BY conversation_id, seq",
            )
            .await
            .unwrap_or_default();
        rows.into_iter()
            .map(|r| Stored {
                conversation_id: r.0,
                seq: r.1,
                message_id: r.2,
                sender_id: r.3,
                server_time_ms: r.4,
                body: r.5,
            })
            .collect()
    }

    async fn count(&self, sql: &str) -> u64 {
        let mut conn = self.pool.get_conn().await.unwrap();
        conn.query_first(sql)
            .await
            .expect("count query")
            .unwrap_or(0)
    }

    async fn pending(&self, shard: u32) -> u64 {
        let reply: redis::Value = redis::cmd("XPENDING")
            .arg(self.layout.stream_key(shard))
            .arg("storage")
            .query_async(&mut self.r())
            .await
            .unwrap();
        match reply {
            redis::Value::Array(parts) => match parts.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        }
    }

    async fn all_pending(&self) -> u64 {
        let mut total = 0;
        for shard in 0..self.layout.streams() {
            total += self.pending(shard).await;
        }
        total
    }

    async fn stored_mark(&self, conv: u64) -> Option<u64> {
        let key = self.layout.stored_key(self.layout.shard_of(conv));
        self.r().hget(key, conv).await.unwrap()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    conversation_id: u64,
    seq: u64,
    message_id: u64,
    sender_id: u64,
    server_time_ms: i64,
    body: Vec<u8>,
}

fn direct(a: u64, b: u64) -> u64 {
    ConversationId::direct(a, b).unwrap().raw()
}

fn group(g: u64) -> u64 {
    ConversationId::group(g).unwrap().raw()
}

#[tokio::test]
async fn worker_stores_rows_once_with_summaries_and_cursors() {
    let env = Env::new(2).await;
    env.migrate().await;
    let (d, g) = (direct(8, 3), group(5));
    // User 11 is a member of the group; 12 was removed (no row).
    let mut conn = env.pool.get_conn().await.unwrap();
    conn.exec_drop(
        "INSERT INTO members (conversation_id, user_id, joined_seq) VALUES (?, 11, 0)",
        (g,),
    )
    .await
    .unwrap();
    drop(conn);

    let mut expected = Vec::new();
    for (conv, sender, seq) in [
        (d, 3, 1),
        (d, 8, 2),
        (d, 3, 3),
        (g, 11, 1),
        (g, 12, 2),
        (g, 11, 3),
        (g, 0, 4), // a notice
    ] {
        expected.push(env.append(conv, sender, seq, &format!("m{seq}")).await.1);
    }
    // A watermark already above what this batch stores is never lowered.
    let _: () = env
        .r()
        .hset(env.layout.stored_key(env.layout.shard_of(g)), g, 99)
        .await
        .unwrap();
    let worker = env.start(env.config("w1")).await;
    eventually(10, "all rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 7
    })
    .await;
    expected.sort_by_key(|m| (m.conversation_id, m.seq));
    assert_eq!(
        env.messages().await,
        expected,
        "rows and columns as written"
    );

    // Members rows and read cursors follow, coalesced over batches.
    eventually(5, "members rows and read cursors written", || async {
        let mut conn = env.pool.get_conn().await.unwrap();
        let members: Vec<(u64, u64, u64, u64)> = conn
            .query(
                "SELECT conversation_id, user_id, joined_seq, read_seq FROM members ORDER BY 1, 2",
            )
            .await
            .unwrap();
        // Both direct participants; a removed group member stays removed.
        members == [(d, 3, 0, 3), (d, 8, 0, 2), (g, 11, 0, 3)]
    })
    .await;

    // Acknowledged after the commit, and the watermark rose (after the
    // cursors were written).
    eventually(5, "nothing pending", || async {
        env.all_pending().await == 0
    })
    .await;
    eventually(5, "watermark raised", || async {
        env.stored_mark(d).await == Some(3)
    })
    .await;
    assert_eq!(env.stored_mark(g).await, Some(99));

    // Redelivery (the group rewound to the start) makes no second row, and
    // an older summary never overwrites a newer one.
    let before = worker.stats().rows;
    for shard in 0..env.layout.streams() {
        let _: () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg(env.layout.stream_key(shard))
            .arg("storage")
            .arg("0")
            .query_async(&mut env.r())
            .await
            .unwrap();
    }
    eventually(10, "redelivered rows processed", || async {
        worker.stats().rows >= before + 7
    })
    .await;
    assert_eq!(env.messages().await, expected);
    assert_eq!(env.count("SELECT COUNT(*) FROM members").await, 3);
    eventually(5, "nothing pending", || async {
        env.all_pending().await == 0
    })
    .await;

    assert_eq!(env.stored_mark(d).await, Some(3));
    assert_eq!(env.stored_mark(g).await, Some(99));
    // Redelivered rows carry their own message ids: no conflict.
    let stats = worker.stats();
    assert_eq!((stats.seq_conflicts, stats.dead_letters), (0, 0));
    worker.shutdown().await;
}

/// A record whose (conversation, seq) MySQL already holds with another
/// message id (the same seq given to two messages) is never skipped
/// silently: it is counted, logged and dead-lettered, the stored row
/// stays, and every other row of its entry and batch is stored. A row
/// already there with its own id (a redelivery) is no conflict.
#[tokio::test]
async fn a_seq_given_to_two_messages_is_counted_and_dead_lettered() {
    let env = Env::new(1).await;
    env.migrate().await;
    let (g, other) = (group(31), group(32));
    let body = |seq: u64| {
        record_body(&pb::Message {
            conversation_id: g,
            sender_id: 7,
            client_msg_id: format!("g{seq}"),
            server_time_ms: im_proto::now_ms(),
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text {
                    text: format!("g {seq}"),
                })),
            }),
            ..Default::default()
        })
    };
    let tick = tick_of(im_proto::now_ms());
    // Seq 2 is stored as another message; seq 4 as this very one.
    let mut conn = env.pool.get_conn().await.unwrap();
    for (seq, id) in [(2, 424_242), (4, message_id(0, tick + 4))] {
        conn.exec_drop(
            "INSERT INTO messages \
             (conversation_id, seq, message_id, sender_id, server_time_ms, dedup_key, body) \
             VALUES (?, ?, ?, 7, 1, 0, ?)",
            (g, seq, id, body(seq)),
        )
        .await
        .unwrap();
    }
    drop(conn);
    // One append call's entry: seqs 1 to 4 of g.
    let records: Vec<Vec<u8>> = (1..=4)
        .map(|seq| encode_record(seq, tick + seq, &body(seq)))
        .collect();
    let fields: Vec<(&str, &[u8])> = records.iter().map(|r| ("m", r.as_slice())).collect();
    let entry: String = env
        .r()
        .xadd(env.layout.stream_key(0), "*", &fields)
        .await
        .unwrap();
    for seq in 1..=3 {
        env.append(other, 9, seq, "bystander").await;
    }

    let mut config = env.config("w1");
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = env.start(config).await;
    eventually(10, "the other rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 7
    })
    .await;
    let dead = env.layout.dead_letter_key(0);
    eventually(5, "the conflict dead-lettered", || async {
        let n: u64 = env.r().xlen(&dead).await.unwrap();
        n == 1
    })
    .await;
    let letters: redis::streams::StreamRangeReply = env.r().xrange_all(&dead).await.unwrap();
    let field = |f: &str| -> Vec<u8> { redis::from_redis_value(&letters.ids[0].map[f]).unwrap() };
    assert_eq!(field("m"), records[1], "the conflicting record, as it was");
    assert_eq!(String::from_utf8(field("id")).unwrap(), entry);
    let reason = String::from_utf8(field("reason")).unwrap();
    assert!(
        reason.contains("seq conflict") && reason.contains("seq 2") && reason.contains("424242"),
        "{reason}"
    );
    // The stored row stays; the rest of the entry is there.
    let stored: Vec<(u64, u64)> = env
        .messages()
        .await
        .iter()
        .filter(|m| m.conversation_id == g)
        .map(|m| (m.seq, m.message_id))
        .collect();
    assert_eq!(
        stored,
        [
            (1, message_id(0, tick + 1)),
            (2, 424_242),
            (3, message_id(0, tick + 3)),
            (4, message_id(0, tick + 4)),
        ]
    );
    eventually(5, "nothing pending", || async { env.pending(0).await == 0 }).await;
    eventually(5, "watermark over the whole entry", || async {
        env.stored_mark(g).await == Some(4)
    })
    .await;
    let stats = worker.stats();
    assert_eq!((stats.seq_conflicts, stats.dead_letters), (1, 1));
    let addr = worker.admin_addr().expect("admin listener");
    let scrape = im_tests::http_get(addr, "/metrics").await.unwrap();
    assert_eq!(
        im_tests::metric(&scrape.body, "im_storage_seq_conflicts_total"),
        Some(1.0),
        "{}",
        scrape.body
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn shutdown_stores_the_batch_in_hand() {
    let env = Env::new(1).await;
    let mut config = env.config("w1");
    // Batches would wait a minute: only shutdown makes this one flush.
    config.batch_age_ms = 60_000;
    config.claim_idle_ms = 120_000;
    // Appended first, so that the worker's first read takes them all (a
    // batch that has begun reads again only when its age is up).
    for seq in 1..=10 {
        env.append(group(77), 5, seq, "late").await;
    }
    let worker = env.start(config).await;
    eventually(5, "entries read into the batch", || async {
        env.pending(0).await == 10
    })
    .await;
    assert_eq!(env.count("SELECT COUNT(*) FROM messages").await, 0);
    worker.shutdown().await;
    assert_eq!(env.count("SELECT COUNT(*) FROM messages").await, 10);
    assert_eq!(env.pending(0).await, 0, "acknowledged before stopping");
}

/// At the end of a stream a batch that has begun reads once more, at its
/// age, however many append calls arrive meanwhile: not once per entry.
#[tokio::test]
async fn a_begun_batch_reads_once_at_its_age() {
    let env = Env::new(1).await;
    let mut config = env.config("w1");
    config.batch_age_ms = 800;
    config.claim_idle_ms = 5_000;
    // No empty reads timing out while the test runs.
    config.block_ms = 60_000;
    let worker = env.start(config).await;
    // The worker is at the end of the stream, blocked in a read.
    env.append(direct(1, 2), 1, 1, "first").await;
    eventually(5, "the first batch stored", || async {
        worker.stats().rows == 1
    })
    .await;
    let before = worker.stats();
    for seq in 2..=21 {
        env.append(direct(1, 2), 1, seq, "spaced").await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eventually(5, "every entry stored", || async {
        worker.stats().rows == 21
    })
    .await;
    let after = worker.stats();
    assert_eq!(after.batches - before.batches, 1, "one batch for the 20");
    // The read the first entry answered, the one at the batch's age, and
    // at most one empty non-blocking read besides.
    assert!(
        after.reads - before.reads <= 3,
        "{} reads for one batch of 20 entries",
        after.reads - before.reads
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn entries_of_a_dead_consumer_are_claimed() {
    let env = Env::new(1).await;
    let stream = env.layout.stream_key(0);
    for seq in 1..=20 {
        env.append(direct(1, 2), 1, seq, "orphan").await;
    }
    // A consumer reads them and dies before storing anything.
    env.read_as(&stream, "storage", "dead", 100).await;
    assert_eq!(env.pending(0).await, 20);

    let started = Instant::now();
    let worker = env.start(env.config("alive")).await;
    eventually(10, "orphans stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 20
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "claimed only after the idle time"
    );
    eventually(5, "nothing pending", || async { env.pending(0).await == 0 }).await;
    assert!(worker.stats().claimed >= 20);
    worker.shutdown().await;
}

#[tokio::test]
async fn poison_entries_go_to_dead_letters_while_others_flow() {
    let env = Env::new(1).await;
    env.migrate().await;
    let poison = group(666);
    let mut conn = env.pool.get_conn().await.unwrap();
    conn.query_drop(format!(
        "CREATE TRIGGER poison BEFORE INSERT ON messages FOR EACH ROW \
         IF NEW.conversation_id = {poison} THEN \
         SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'poisoned conversation'; END IF"
    ))
    .await
    .unwrap();
    drop(conn);

    let mut config = env.config("w1");
    config.max_attempts = 3;
    let worker = env.start(config).await;
    let good = group(1);
    for seq in 1..=5 {
        env.append(good, 9, seq, "fine").await;
    }
    let (poison_id, _) = env.append(poison, 9, 1, "bad").await;
    let garbage_id = env.xadd(0, b"not a record").await;
    for seq in 6..=10 {
        env.append(good, 9, seq, "fine").await;
    }
    // Good entries around the bad ones are stored right away.
    eventually(5, "good rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 10
    })
    .await;
    // The undecodable record is dead at once; the rejected one only after
    // its attempts, and meanwhile later entries keep flowing.
    let dead = env.layout.dead_letter_key(0);
    eventually(5, "garbage dead-lettered", || async {
        let n: u64 = env.r().xlen(&dead).await.unwrap();
        n == 1
    })
    .await;
    for seq in 11..=15 {
        env.append(good, 9, seq, "fine").await;
    }
    eventually(5, "later rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 15
    })
    .await;
    eventually(15, "poison dead-lettered", || async {
        let n: u64 = env.r().xlen(&dead).await.unwrap();
        n == 2
    })
    .await;
    let letters: redis::streams::StreamRangeReply = env.r().xrange_all(&dead).await.unwrap();
    let fields =
        |i: usize, f: &str| -> String { redis::from_redis_value(&letters.ids[i].map[f]).unwrap() };
    assert_eq!(fields(0, "id"), garbage_id);
    assert_eq!(fields(0, "m"), "not a record");
    assert!(fields(0, "reason").contains("undecodable"));
    assert_eq!(fields(1, "id"), poison_id);
    assert!(
        fields(1, "reason").contains("poisoned conversation"),
        "{}",
        fields(1, "reason")
    );
    assert_eq!(fields(1, "attempts"), "3");
    eventually(5, "nothing pending", || async { env.pending(0).await == 0 }).await;
    assert_eq!(
        env.count(&format!(
            "SELECT COUNT(*) FROM messages WHERE conversation_id = {poison}"
        ))
        .await,
        0
    );
    // Rows of the good conversation stop below nothing: all 15 there, and
    // its watermark is its last seq.
    eventually(5, "watermark raised", || async {
        env.stored_mark(good).await == Some(15)
    })
    .await;
    assert_eq!(env.stored_mark(poison).await, None);
    let stats = worker.stats();
    assert_eq!(stats.dead_letters, 2);
    assert!(stats.splits >= 1);
    worker.shutdown().await;
}

#[tokio::test]
async fn trimming_keeps_what_any_group_has_not_acknowledged() {
    let env = Env::new(1).await;
    let stream = env.layout.stream_key(0);
    let mut ids = Vec::new();
    for seq in 1..=10 {
        ids.push(env.append(group(3), 4, seq, "t").await.0);
    }
    // Another consumer group (say, a search indexer) is behind: it read 5
    // entries and acknowledged the first 2.
    env.read_as(&stream, "indexer", "i1", 5).await;
    let _: u64 = env.r().xack(&stream, "indexer", &ids[..2]).await.unwrap();

    let mut config = env.config("w1");
    config.trim_interval_ms = 100;
    let worker = env.start(config).await;
    eventually(10, "rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 10
    })
    .await;
    eventually(
        5,
        "trimmed below the indexer's first pending entry",
        || async {
            let n: u64 = env.r().xlen(&stream).await.unwrap();
            n == 8
        },
    )
    .await;
    let first: redis::streams::StreamRangeReply =
        env.r().xrange_count(&stream, "-", "+", 1).await.unwrap();
    assert_eq!(first.ids[0].id, ids[2]);

    // The indexer acknowledges everything it read: the stream is trimmed
    // up to its last delivered entry, never past it.
    let _: u64 = env.r().xack(&stream, "indexer", &ids[2..5]).await.unwrap();
    eventually(
        5,
        "trimmed to the indexer's last delivered entry",
        || async {
            let n: u64 = env.r().xlen(&stream).await.unwrap();
            n == 6
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let n: u64 = env.r().xlen(&stream).await.unwrap();
    assert_eq!(n, 6, "entries the indexer has not read stay");
    assert!(worker.stats().trimmed >= 4);
    worker.shutdown().await;
}

#[tokio::test]
async fn mysql_outage_loses_nothing() {
    let mut db = tokio::task::spawn_blocking(MariaDb::start).await.unwrap();
    let shared = services::shared();
    let mut env = Env::on(&shared.redis_url, &db.server_url(), 2).await;
    let worker = env.start(env.config("w1")).await;
    let convs: Vec<u64> = (1..=6).map(|u| direct(u, 100)).collect();
    let mut seq = 0;
    for round in 0..3 {
        seq += 1;
        for &c in &convs {
            env.append(c, 100, seq, &format!("before {round}")).await;
        }
    }
    eventually(10, "first rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 18
    })
    .await;

    db.stop();
    for round in 0..20 {
        seq += 1;
        for &c in &convs {
            env.append(c, 100, seq, &format!("during {round}")).await;
        }
    }
    // The worker holds its batch unacknowledged while MySQL is away.
    eventually(5, "entries held pending", || async {
        env.all_pending().await > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        env.all_pending().await > 0,
        "nothing acknowledged while down"
    );
    assert!(worker.stats().retries > 0);

    db = tokio::task::spawn_blocking(move || {
        db.start_again();
        db
    })
    .await
    .unwrap();
    for round in 0..2 {
        seq += 1;
        for &c in &convs {
            env.append(c, 100, seq, &format!("after {round}")).await;
        }
    }
    let total = seq * convs.len() as u64;
    env.pool = mysql_async::Pool::new(env.mysql_url.as_str());
    eventually(15, "every row stored after the outage", || async {
        env.count("SELECT COUNT(*) FROM messages").await == total
    })
    .await;
    // Dense seqs 1..=seq in every conversation: nothing lost, nothing twice.
    assert_eq!(
        env.count("SELECT COUNT(DISTINCT conversation_id, seq) FROM messages")
            .await,
        total
    );
    eventually(5, "nothing pending", || async {
        env.all_pending().await == 0
    })
    .await;
    worker.shutdown().await;
    drop(db);
}

#[tokio::test]
async fn two_workers_share_the_load_without_duplicates() {
    let env = Env::new(4).await;
    let config = |name: &str| {
        let mut c = env.config(name);
        // No claiming between the two: each entry is delivered once.
        c.claim_idle_ms = 60_000;
        c
    };
    let a = env.start(config("a")).await;
    let b = env.start(config("b")).await;
    let mut n = 0u64;
    for wave in 0..10 {
        for user in 1..=40u64 {
            let c = direct(user, 1000);
            env.append(c, user, wave + 1, "shared").await;
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually(15, "all rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == n
    })
    .await;
    eventually(5, "nothing pending", || async {
        env.all_pending().await == 0
    })
    .await;
    let (sa, sb) = (a.stats(), b.stats());
    assert!(
        sa.rows > 0 && sb.rows > 0,
        "both worked: {} and {}",
        sa.rows,
        sb.rows
    );
    assert_eq!(sa.rows + sb.rows, n, "each entry stored by one worker once");
    assert_eq!(
        env.count("SELECT COUNT(DISTINCT message_id) FROM messages")
            .await,
        n
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn binary_runs_until_sigterm_and_exits_cleanly() {
    let env = Env::new(2).await;
    let (_, stored) = env.append(group(4), 2, 1, "via the binary").await;
    let mut worker = WorkerProcess::start(
        &[],
        &[
            ("IM_REDIS_URL", &env.redis_url),
            ("IM_MYSQL_URL", &env.mysql_url),
            ("IM_REDIS_PREFIX", env.layout.prefix()),
            ("IM_STREAMS", "2"),
            ("IM_CONSUMER", "bin"),
            ("IM_BLOCK_MS", "100"),
        ],
    );
    eventually(15, "row stored by the binary", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 1
    })
    .await;
    assert_eq!(env.messages().await, [stored]);
    worker.signal("TERM");
    let code = tokio::task::spawn_blocking(move || worker.wait_exit(10))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn redis_restart_is_survived() {
    let mut redis = tokio::task::spawn_blocking(|| RedisServer::start(true))
        .await
        .unwrap();
    let shared = services::shared();
    let mut env = Env::on(&redis.url(), &shared.mysql_url, 2).await;
    let worker = env.start(env.config("w1")).await;
    for seq in 1..=10 {
        env.append(group(8), 1, seq, "before").await;
    }
    eventually(10, "first rows stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 10
    })
    .await;

    // Redis crashes and comes back with its append-only file.
    redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    env.redis = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for seq in 11..=20 {
        env.append(group(8), 1, seq, "after").await;
    }
    eventually(15, "rows after the restart stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 20
    })
    .await;
    eventually(5, "nothing pending", || async {
        env.all_pending().await == 0
    })
    .await;
    assert!(
        worker.stats().retries > 0,
        "the worker noticed and reconnected"
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn a_deleted_stream_gets_its_group_back() {
    let env = Env::new(1).await;
    let worker = env.start(env.config("w1")).await;
    env.append(group(9), 1, 1, "first").await;
    eventually(10, "first row stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 1
    })
    .await;
    // Someone deletes the stream, group and all; appends go on.
    let _: () = env.r().del(env.layout.stream_key(0)).await.unwrap();
    for seq in 2..=5 {
        env.append(group(9), 1, seq, "after").await;
    }
    eventually(10, "rows after the deletion stored", || async {
        env.count("SELECT COUNT(*) FROM messages").await == 5
    })
    .await;
    worker.shutdown().await;
}
