//! Seqs that never go back and acks that survive the loss of a master:
//! counters deleted or rolled back under the store's feet, a Redis that
//! comes back from an older snapshot than MySQL holds, and appends whose
//! replicas do not confirm them in time. On one Redis and on the shared
//! Redis Cluster; the crash test that kills a cluster master under load is
//! in `crash`.

use std::time::{Duration, Instant};

use im_proto::{ConversationId, pb};
use im_server::store::pipeline::{PipelineOptions, PipelineStore};
use im_server::store::{AppendOutcome, AppendRejection, AppendResult, NewMessage, Store, UserId};
use im_storage::layout::Layout;
use im_tests::PipelineEnv;
use im_tests::redis_cluster::{RedisCluster, shared_cluster_nodes};
use im_tests::services::RedisServer;
use mysql_async::prelude::*;

fn message(sender: UserId, conversation: ConversationId, id: &str) -> NewMessage {
    crate::store::message(sender, conversation, id, false)
}

fn seq_of(result: &AppendResult) -> u64 {
    crate::store::stored(result).seq
}

async fn open(env: &PipelineEnv, replica_acks: u32) -> PipelineStore {
    PipelineStore::open(PipelineOptions {
        redis: env.redis_target(),
        mysql_url: env.mysql_url.clone(),
        prefix: env.prefix.clone(),
        streams: 4,
        replica_acks,
        replica_timeout: Duration::from_millis(300),
        ..PipelineOptions::default()
    })
    .await
    .expect("pipeline store opens")
}

/// Two users and their direct conversation.
async fn pair(store: &PipelineStore, tag: &str) -> (UserId, ConversationId) {
    let a = store.create_user(&format!("{tag}a"), "h").await.unwrap();
    let b = store.create_user(&format!("{tag}b"), "h").await.unwrap();
    (a, ConversationId::direct(a, b).unwrap())
}

/// Appends `ids` one call each, returning their seqs.
async fn send(store: &PipelineStore, a: UserId, ab: ConversationId, ids: &[&str]) -> Vec<u64> {
    let mut seqs = Vec::new();
    for id in ids {
        let result = store.append_batch(vec![message(a, ab, id)]).await.unwrap();
        seqs.push(seq_of(&result[0]));
    }
    seqs
}

/// The conversation's counter field in its shard's seq hash.
fn counter_key(env: &PipelineEnv, ab: ConversationId) -> String {
    let layout = Layout::new(env.prefix.clone(), 4);
    layout.seq_key(layout.shard_of(ab.raw()))
}

/// A counter deleted while the worker has stored nothing: the next seq
/// follows the messages Redis still holds, not MySQL's (empty) history.
async fn deleted_counter_continues_after_unstored_messages(env: PipelineEnv) {
    let store = open(&env, 0).await;
    let (a, ab) = pair(&store, "del").await;
    assert_eq!(send(&store, a, ab, &["m1", "m2", "m3"]).await, [1, 2, 3]);
    let mut redis = env.redis_conn().await;
    let _: i64 = redis::cmd("HDEL")
        .arg(counter_key(&env, ab))
        .arg(ab.raw())
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(send(&store, a, ab, &["m4", "m5"]).await, [4, 5]);
}

/// A counter rolled back (an old value written over it): the next seq is
/// still past the newest message, never one given before.
async fn rolled_back_counter_never_repeats_a_seq(env: PipelineEnv) {
    let store = open(&env, 0).await;
    let (a, ab) = pair(&store, "back").await;
    assert_eq!(
        send(&store, a, ab, &["m1", "m2", "m3", "m4"]).await,
        [1, 2, 3, 4]
    );
    let mut redis = env.redis_conn().await;
    // Counters hold last seq + 1: as if only seq 1 had been given.
    let _: i64 = redis::cmd("HSET")
        .arg(counter_key(&env, ab))
        .arg(ab.raw())
        .arg(2)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(send(&store, a, ab, &["m5", "m6"]).await, [5, 6]);
    let page = store.history(a, ab, 0, 50).await.unwrap();
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
}

/// Runs `check(env)` as `<check>::one_redis` on the shared Redis and as
/// `<check>::redis_cluster` on the shared Redis Cluster.
macro_rules! on_both_redis {
    ($check:ident) => {
        mod $check {
            use super::*;

            #[tokio::test]
            async fn one_redis() {
                let redis = im_tests::services::shared().redis_url.clone();
                $check(PipelineEnv::fresh_on(redis)).await;
            }

            #[tokio::test]
            async fn redis_cluster() {
                let nodes = shared_cluster_nodes().to_string();
                $check(PipelineEnv::fresh_on_cluster(nodes)).await;
            }
        }
    };
}

/// The append script's reply to one call of message `cmid` of `a` in `ab`,
/// as lane `token`'s call `number` declaring dedup bucket `bucket`.
async fn append_call(
    conn: &mut im_storage::redis_target::RedisConn,
    layout: &Layout,
    (a, ab): (UserId, ConversationId),
    cmid: &str,
    (token, number, bucket): (&str, u64, u64),
    now_ms: i64,
) -> redis::Value {
    use im_storage::layout::{self, TICKS_PER_MS};
    let script = im_storage::script::LuaScript::new(layout::APPEND_SCRIPT);
    let shard = layout.shard_of(ab.raw());
    let body = layout::record_body(&pb::Message {
        conversation_id: ab.raw(),
        sender_id: a,
        client_msg_id: cmid.into(),
        server_time_ms: now_ms,
        ..Default::default()
    });
    let mut call = script.call();
    call.key(layout.stream_key(shard))
        .key(layout.seq_key(shard))
        .key(layout.stored_key(shard))
        .key(layout.calls_key(shard))
        .key(layout.dedup_key(shard, bucket))
        .key(layout.dedup_key(shard, bucket - 1))
        .key(layout.recent_key(shard, ab.raw()))
        .arg(now_ms)
        .arg(layout::tick_of(now_ms))
        .arg(TICKS_PER_MS)
        .arg(600)
        .arg(200)
        .arg(3600)
        .arg(1)
        .arg(token)
        .arg(number)
        .arg(bucket)
        .arg(ab.raw())
        .arg(a)
        .arg(cmid)
        .arg("d")
        .arg("")
        .arg(body);
    call.run(conn).await.expect("append call")
}

fn reply_kind(reply: &redis::Value) -> String {
    match reply {
        redis::Value::Array(replies) => match replies.first() {
            Some(redis::Value::Array(parts)) => match parts.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            },
            other => format!("{other:?}"),
        },
        other => format!("{other:?}"),
    }
}

/// An append call that runs again (a client library resends a call after
/// a timeout, when the first may have run) gets the first run's replies
/// and appends nothing more; a call that names another dedup bucket than
/// the shard clock's is told which and changes nothing.
async fn an_append_call_run_again_is_answered_not_appended(env: PipelineEnv) {
    let store = open(&env, 0).await;
    let (a, ab) = pair(&store, "memo").await;
    // Seeds the counter and checks the shard: the calls below just append.
    assert_eq!(send(&store, a, ab, &["m1"]).await, [1]);
    let layout = Layout::new(env.prefix.clone(), 4);
    let stream = layout.stream_key(layout.shard_of(ab.raw()));
    let mut conn = env.redis_conn().await;
    let entries = async |conn: &mut im_storage::redis_target::RedisConn| -> u64 {
        redis::cmd("XLEN")
            .arg(&stream)
            .query_async(conn)
            .await
            .unwrap()
    };
    let before = entries(&mut conn).await;
    let now = im_proto::now_ms();
    let own = im_storage::layout::dedup_bucket(im_storage::layout::tick_of(now), 600);

    let wrong = append_call(&mut conn, &layout, (a, ab), "m2", ("lane", 1, own + 1), now).await;
    let redis::Value::Array(replies) = &wrong else {
        panic!("{wrong:?}")
    };
    let shard_bucket = match &replies[0] {
        redis::Value::Array(parts) => {
            assert_eq!(reply_kind(&wrong), "bucket");
            match parts[1] {
                redis::Value::Int(b) => b as u64,
                ref other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(entries(&mut conn).await, before, "a wrong bucket appended");

    let first = append_call(
        &mut conn,
        &layout,
        (a, ab),
        "m2",
        ("lane", 1, shard_bucket),
        now,
    )
    .await;
    assert_eq!(reply_kind(&first), "ok", "{first:?}");
    let again = append_call(
        &mut conn,
        &layout,
        (a, ab),
        "m2",
        ("lane", 1, shard_bucket),
        now,
    )
    .await;
    assert_eq!(again, first, "the call ran again");
    assert_eq!(entries(&mut conn).await, before + 1);
    // Another call of the same message is a duplicate, not a new append.
    let other = append_call(
        &mut conn,
        &layout,
        (a, ab),
        "m2",
        ("lane", 2, shard_bucket),
        now,
    )
    .await;
    assert_eq!(reply_kind(&other), "dup", "{other:?}");
    assert_eq!(send(&store, a, ab, &["m3"]).await, [3]);
}

on_both_redis!(deleted_counter_continues_after_unstored_messages);
on_both_redis!(an_append_call_run_again_is_answered_not_appended);
on_both_redis!(rolled_back_counter_never_repeats_a_seq);

/// Rows in MySQL: (seq, client_msg_id) of a conversation, by seq.
async fn stored_rows(mysql_url: &str, conversation: u64) -> Vec<(u64, String)> {
    let pool = mysql_async::Pool::new(mysql_url);
    let mut conn = pool.get_conn().await.unwrap();
    let rows: Vec<(u64, Vec<u8>)> = conn
        .exec(
            "SELECT seq, body FROM messages WHERE conversation_id = ? ORDER BY seq",
            (conversation,),
        )
        .await
        .unwrap();
    drop(conn);
    pool.disconnect().await.ok();
    rows.into_iter()
        .map(|(seq, body)| {
            let m = <pb::Message as prost::Message>::decode(body.as_slice()).unwrap();
            (seq, m.client_msg_id)
        })
        .collect()
}

async fn wait_rows(mysql_url: &str, conversation: u64, n: usize) -> Vec<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = stored_rows(mysql_url, conversation).await;
        if rows.len() >= n || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis comes back (kill -9, restart) from a snapshot older than what the
/// worker already stored in MySQL, as after losing the tail of an AOF: a
/// new process has a new replication id, so the store checks the shard's
/// counters against MySQL's stream journal before appending, and seqs
/// carry on after MySQL's, dense, with no row written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_back_from_an_older_snapshot_continues_after_mysql() {
    let mut redis = RedisServer::start(false);
    let env = PipelineEnv::fresh_on(redis.url());
    let worker = env.start_worker().await;
    let store = open(&env, 0).await;
    let (a, ab) = pair(&store, "snap").await;
    assert_eq!(send(&store, a, ab, &["m1", "m2", "m3"]).await, [1, 2, 3]);
    assert_eq!(wait_rows(&env.mysql_url, ab.raw(), 3).await.len(), 3);
    let mut conn = env.redis_conn().await;
    let _: () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    assert_eq!(send(&store, a, ab, &["m4", "m5"]).await, [4, 5]);
    assert_eq!(wait_rows(&env.mysql_url, ab.raw(), 5).await.len(), 5);
    // Back to the snapshot: Redis knows seqs 1 to 3 only.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let seq = loop {
        match store.append_batch(vec![message(a, ab, "m6")]).await {
            Ok(r) if r[0].is_ok() => break seq_of(&r[0]),
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no append after the restart: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(seq, 6, "a seq MySQL holds was given again");
    assert_eq!(send(&store, a, ab, &["m7"]).await, [7]);
    let rows = wait_rows(&env.mysql_url, ab.raw(), 7).await;
    let expected: Vec<(u64, String)> = (1..=7).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(rows, expected);
    let history = store.history(a, ab, 0, 50).await.unwrap();
    let seqs: Vec<u64> = history.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    assert_eq!(worker.stats().dead_letters, 0);
    worker.shutdown().await;
}

/// With --redis-replica-acks 1, an append whose replica cannot confirm it
/// (the replica process stopped) is refused as overloaded, not acked; the
/// client's resend once the replica is back gets the original seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_the_replica_does_not_confirm_are_refused_not_acked() {
    let cluster = RedisCluster::start();
    let env = PipelineEnv::fresh_on_cluster(cluster.nodes_csv());
    let store = open(&env, 1).await;
    let (a, ab) = pair(&store, "acks").await;
    assert_eq!(send(&store, a, ab, &["m1"]).await, [1]);

    let layout = Layout::new(env.prefix.clone(), 4);
    let stream = layout.stream_key(layout.shard_of(ab.raw()));
    let master = cluster.master_of(stream.as_bytes());
    let replica = cluster
        .replica_of(master)
        .expect("the master has a replica");
    cluster.signal(replica, "STOP");
    let refused = store
        .append_batch(vec![message(a, ab, "m2")])
        .await
        .unwrap();
    cluster.signal(replica, "CONT");
    assert!(
        matches!(refused[0], Err(AppendRejection::Overloaded)),
        "{:?}",
        refused[0]
    );
    let mut resend = message(a, ab, "m2");
    resend.resend = true;
    let again = store.append_batch(vec![resend]).await.unwrap();
    match &again[0] {
        Ok(AppendOutcome::Duplicate(ack)) => assert_eq!(ack.seq, 2),
        other => panic!("the resend was answered {other:?}"),
    }
    assert_eq!(send(&store, a, ab, &["m3"]).await, [3]);
}

/// The worker commits only what the replicas have: while the replica of a
/// shard's master is stopped, that shard's entries stay out of MySQL
/// (counted as unconfirmed batches, read again), and once it is back they
/// are stored, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_commits_only_what_the_replicas_have() {
    let cluster = RedisCluster::start();
    let env = PipelineEnv::fresh_on_cluster(cluster.nodes_csv());
    // Appends are acked without waiting, so they go on while the replica
    // is stopped; only the worker waits.
    let store = open(&env, 0).await;
    let (a, ab) = pair(&store, "wait").await;
    let layout = Layout::new(env.prefix.clone(), 4);
    let stream = layout.stream_key(layout.shard_of(ab.raw()));
    let master = cluster.master_of(stream.as_bytes());
    let replica = cluster
        .replica_of(master)
        .expect("the master has a replica");
    let mut config = env.worker_config("replica-wait");
    config.redis_replica_acks = Some(1);
    config.redis_replica_timeout_ms = 200;
    let worker = im_storage::Worker::start(config).await.unwrap();

    cluster.signal(replica, "STOP");
    assert_eq!(send(&store, a, ab, &["m1", "m2"]).await, [1, 2]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while worker.stats().unconfirmed == 0 {
        assert!(
            Instant::now() < deadline,
            "the worker never waited for the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stored_rows(&env.mysql_url, ab.raw()).await.is_empty());
    cluster.signal(replica, "CONT");
    let rows = wait_rows(&env.mysql_url, ab.raw(), 2).await;
    assert_eq!(rows, [(1, "m1".to_string()), (2, "m2".to_string())]);
    worker.shutdown().await;
}

/// The slot of a busy stream shard moves to another master (`SETSLOT
/// IMPORTING`/`MIGRATING`, `MIGRATE` one key at a time with pauses, the
/// conversations' caches first and the counters and stream last, `SETSLOT
/// NODE`) while verified traffic runs into its conversations
/// (server process, storage worker, MariaDB, on a Redis Cluster of its
/// own): appends meet the shard's keys split between the two masters, are
/// refused with -TRYAGAIN or redirected with -ASK and retried, and every
/// acknowledged message is delivered once, in order, and stored once, with
/// dense seqs. Then the traffic goes on against the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_shard_slot_moved_under_load_loses_nothing() {
    // Two-second dedup buckets: the shard's previous bucket exists, as in
    // any deployment that ran for a while, and new buckets start while the
    // slot moves.
    let mut stack = crate::crash::Stack::start_on_cluster_with(&["--dedup-window-secs", "2"]);
    let load = crate::crash::Load::start(stack.addr, 8).await;
    // The shard most of the load's conversations are on.
    let streams = crate::crash::STREAMS.parse().unwrap();
    let layout = Layout::new(stack.prefix.clone(), streams);
    let mut per_shard = vec![0usize; streams as usize];
    for conv in load.conversations() {
        per_shard[layout.shard_of(conv) as usize] += 1;
    }
    let shard = (0..streams).max_by_key(|&s| per_shard[s as usize]).unwrap();
    let stream = layout.stream_key(shard);
    let slot = im_storage::redis_target::key_slot(stream.as_bytes());
    tokio::time::sleep(Duration::from_millis(800)).await;

    let from = stack.cluster().master_of(stream.as_bytes());
    let to = stack
        .cluster()
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("another master");
    let slot_move = stack.cluster().slot_move(slot, to);
    // Start just after a dedup bucket begins, so that the bucket already
    // exists on the source while the caches move.
    loop {
        let into_bucket = (im_proto::now_ms() - im_storage::layout::MESSAGE_ID_EPOCH_MS) % 2000;
        if (300..400).contains(&into_bucket) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The recent caches first, the counters and the stream last: the
    // longest time with a script's keys split between the two masters.
    let (seq_key, stream_key) = (layout.seq_key(shard), stream.clone());
    let moved = tokio::task::spawn_blocking(move || {
        slot_move.run(1, Duration::from_millis(300), |key| {
            if key.contains(":recent:") {
                0
            } else if key == seq_key || key == stream_key {
                2
            } else {
                1
            }
        })
    })
    .await
    .unwrap();
    assert!(moved >= 4, "only {moved} keys moved: was the shard busy?");
    assert_eq!(stack.cluster().master_of(stream.as_bytes()), to);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (acked, receivers) = load.finish().await;
    let on_shard = acked
        .iter()
        .filter(|a| layout.shard_of(a.conversation) == shard)
        .count();
    assert!(
        on_shard > 20,
        "the moved shard took only {on_shard} messages"
    );
    crate::crash::verify(&stack, acked, receivers).await;
}
