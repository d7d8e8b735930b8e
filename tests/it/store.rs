//! The storage contract on both backends, through the `Store` trait: each
//! check is written once, generic over the store, and run against the
//! embedded store and the pipeline store (on the shared throwaway Redis and
//! MariaDB, with a prefix and database of its own), whatever
//! `IM_TEST_STORE` says.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use im_proto::{ConversationId, pb};
use im_server::store::pipeline::{PipelineOptions, PipelineStore};
use im_server::store::sqlite::{SqliteOptions, SqliteStore};
use im_server::store::{
    AppendOutcome, AppendRejection, AppendResult, GroupLimits, NewMessage, Page, RetentionMode,
    Store, StoreError, UserId,
};
use im_tests::PipelineEnv;
use im_tests::services::RedisServer;

/// A text message `id` (text and client_msg_id alike).
pub(crate) fn message(
    sender: UserId,
    conversation: ConversationId,
    id: &str,
    resend: bool,
) -> NewMessage {
    NewMessage {
        sender,
        conversation,
        client_msg_id: id.into(),
        content: pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text { text: id.into() })),
        },
        server_time_ms: im_proto::now_ms(),
        resend,
    }
}

/// The stored message of an append result (panics otherwise).
pub(crate) fn stored(result: &AppendResult) -> &pb::Message {
    match result {
        Ok(AppendOutcome::Stored(m)) => m,
        other => panic!("expected a stored message, got {other:?}"),
    }
}

fn duplicate_seq(result: &AppendResult) -> u64 {
    match result {
        Ok(AppendOutcome::Duplicate(ack)) => ack.seq,
        other => panic!("expected a duplicate, got {other:?}"),
    }
}

async fn pair<S: Store>(store: &S, tag: &str) -> (UserId, UserId, ConversationId) {
    let a = store.create_user(&format!("{tag}a"), "h").await.unwrap();
    let b = store.create_user(&format!("{tag}b"), "h").await.unwrap();
    (a, b, ConversationId::direct(a, b).unwrap())
}

fn sqlite(dir: &std::path::Path, dedup_window_secs: u64) -> SqliteStore {
    let options = SqliteOptions {
        dedup_window: Duration::from_secs(dedup_window_secs),
        ..SqliteOptions::default()
    };
    SqliteStore::open(dir, options).unwrap()
}

fn pipeline_options(env: &PipelineEnv, dedup_window_secs: u64) -> PipelineOptions {
    PipelineOptions {
        redis: env.redis_target(),
        mysql_url: env.mysql_url.clone(),
        mysql_shards: env.mysql_shards.clone(),
        prefix: env.prefix.clone(),
        streams: 4,
        dedup_window_secs,
        ..PipelineOptions::default()
    }
}

/// Runs a contract `check(&store)` against each store: as
/// `<check>::embedded` on a fresh SQLite store, `<check>::pipeline` on a
/// fresh prefix and database of the shared Redis and MariaDB, and
/// `<check>::redis_cluster` the same on the shared Redis Cluster.
macro_rules! both_stores {
    ($check:ident) => {
        mod $check {
            #[tokio::test]
            async fn embedded() {
                let dir = tempfile::tempdir().unwrap();
                super::$check(&super::sqlite(dir.path(), 600)).await;
            }

            #[tokio::test]
            async fn pipeline() {
                let env = im_tests::PipelineEnv::fresh();
                let options = super::pipeline_options(&env, 600);
                let store = super::PipelineStore::open(options).await.unwrap();
                super::$check(&store).await;
            }

            #[tokio::test]
            async fn redis_cluster() {
                let nodes = im_tests::redis_cluster::shared_cluster_nodes().to_string();
                let env = im_tests::PipelineEnv::fresh_on_cluster(nodes);
                let options = super::pipeline_options(&env, 600);
                let store = super::PipelineStore::open(options).await.unwrap();
                super::$check(&store).await;
            }
        }
    };
}

// ---- message ids ----

/// More messages than one millisecond's worth of the old 12-bit counter,
/// into one conversation (one shard) in one call, from two stores at once
/// (two nodes on the same shared engines): every id is different.
async fn message_ids_are_unique<S: Store>(one: &S, other: &S) {
    const N: usize = 6000;
    let (a, _, ab) = pair(one, "ids").await;
    let batch = |tag: &str| -> Vec<NewMessage> {
        (0..N)
            .map(|i| message(a, ab, &format!("{tag}{i}"), false))
            .collect()
    };
    let (first, second) =
        tokio::join!(one.append_batch(batch("x")), other.append_batch(batch("y")));
    let mut ids = HashSet::new();
    let mut seqs = HashSet::new();
    for result in first.unwrap().iter().chain(second.unwrap().iter()) {
        let m = stored(result);
        assert!(
            ids.insert(m.message_id),
            "message id {} repeated",
            m.message_id
        );
        assert!(seqs.insert(m.seq));
    }
    assert_eq!(ids.len(), 2 * N);
    assert_eq!(seqs, (1..=2 * N as u64).collect());
}

#[tokio::test]
async fn embedded_message_ids_are_unique() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(sqlite(dir.path(), 600));
    message_ids_are_unique(&*store, &*store).await;
}

#[tokio::test]
async fn pipeline_message_ids_are_unique_across_nodes() {
    let env = PipelineEnv::fresh();
    let one = PipelineStore::open(pipeline_options(&env, 600))
        .await
        .unwrap();
    let other = PipelineStore::open(pipeline_options(&env, 600))
        .await
        .unwrap();
    message_ids_are_unique(&one, &other).await;
}

// ---- deduplication past the window ----

/// With a one-second window: a first attempt repeated after it is a new
/// message, a resend at any time finds the original, in the same
/// conversation only. `settle` waits until the store has made what was
/// appended durable in its index (the pipeline's worker has stored it).
async fn resends_are_found_after_the_window<S: Store>(store: &S, settle: impl AsyncFn()) {
    let (a, b, ab) = pair(store, "late").await;
    let original = store
        .append_batch(vec![
            message(a, ab, "m1", false),
            message(b, ab, "m2", false),
        ])
        .await
        .unwrap();
    let m1 = stored(&original[0]).clone();
    assert_eq!(m1.seq, 1);
    settle().await;
    // Two windows later the window has forgotten both.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let late = store
        .append_batch(vec![
            message(a, ab, "m1", true),
            message(b, ab, "m2", false),
            message(a, ab, "m3", true),
        ])
        .await
        .unwrap();
    match &late[0] {
        Ok(AppendOutcome::Duplicate(ack)) => {
            assert_eq!((ack.seq, ack.message_id), (1, m1.message_id));
            assert_eq!(ack.server_time_ms, m1.server_time_ms);
        }
        other => panic!("a late resend was not recognised: {other:?}"),
    }
    // Not flagged as a resend: only the window protects a first attempt.
    assert_eq!(stored(&late[1]).seq, 3);
    // A resend of something never stored is stored, once.
    assert_eq!(stored(&late[2]).seq, 4);
    let again = store
        .append_batch(vec![message(a, ab, "m3", true)])
        .await
        .unwrap();
    assert_eq!(duplicate_seq(&again[0]), 4);
    // The same id in another conversation is another message.
    let c = store.create_user("latec", "h").await.unwrap();
    let ac = ConversationId::direct(a, c).unwrap();
    let elsewhere = store
        .append_batch(vec![message(a, ac, "m1", true)])
        .await
        .unwrap();
    assert_eq!(stored(&elsewhere[0]).seq, 1);
}

#[tokio::test]
async fn embedded_resends_are_found_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path(), 1);
    resends_are_found_after_the_window(&store, async || {}).await;
}

#[tokio::test]
async fn pipeline_resends_are_found_after_the_window() {
    let env = PipelineEnv::fresh();
    let store = PipelineStore::open(pipeline_options(&env, 1))
        .await
        .unwrap();
    let _worker = env.start_worker().await;
    let settle = async || wait_stored(&env, 2).await;
    resends_are_found_after_the_window(&store, settle).await;
}

/// Waits until MySQL holds `rows` message rows (and the worker has had
/// time to publish its stored watermark).
async fn wait_stored(env: &PipelineEnv, rows: u64) {
    use mysql_async::prelude::*;
    let pool = mysql_async::Pool::new(env.mysql_url.as_str());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut conn = pool.get_conn().await.unwrap();
        let n: Option<u64> = conn
            .query_first("SELECT COUNT(*) FROM messages")
            .await
            .unwrap();
        drop(conn);
        if n.unwrap_or(0) >= rows {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not store {rows} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The watermark is written after the rows, coalesced (50 ms in tests).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = pool.disconnect().await;
}

/// While the worker is further behind than the window, a late resend
/// cannot be decided and is refused, not guessed; once the worker has
/// caught up it is found.
#[tokio::test]
async fn pipeline_resends_wait_for_a_lagging_worker() {
    let env = PipelineEnv::fresh();
    let store = PipelineStore::open(pipeline_options(&env, 1))
        .await
        .unwrap();
    let (a, _, ab) = pair(&store, "lag").await;
    let first = store
        .append_batch(vec![message(a, ab, "m1", false)])
        .await
        .unwrap();
    assert_eq!(stored(&first[0]).seq, 1);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let refused = store
        .append_batch(vec![
            message(a, ab, "m1", true),
            message(a, ab, "m2", false),
        ])
        .await
        .unwrap();
    assert_eq!(refused[0], Err(AppendRejection::DedupBehind));
    // Other messages of the conversation are not held up.
    assert_eq!(stored(&refused[1]).seq, 2);

    let _worker = env.start_worker().await;
    wait_stored(&env, 2).await;
    let found = store
        .append_batch(vec![message(a, ab, "m1", true)])
        .await
        .unwrap();
    assert_eq!(duplicate_seq(&found[0]), 1);
}

// ---- partial overload ----

/// One append lane is full, another is not: the messages for the full one
/// are refused, each on its own, and the others are stored and answered.
#[tokio::test]
async fn pipeline_a_full_lane_refuses_only_its_own_messages() {
    // Its own Redis: the test pauses it.
    let redis = RedisServer::start(false);
    let env = PipelineEnv::fresh_on(redis.url());
    let options = PipelineOptions {
        append_lanes: 2,
        append_queue: 1,
        ..pipeline_options(&env, 600)
    };
    let layout = im_storage::layout::Layout::new(env.prefix.clone(), 4);
    let store = PipelineStore::open(options).await.unwrap();
    // Conversations whose shards go to lane 0 and to lane 1 (shard % 2).
    let mut by_lane: [Vec<(UserId, ConversationId)>; 2] = [Vec::new(), Vec::new()];
    let mut n = 0;
    while by_lane.iter().any(|l| l.len() < 3) {
        let (a, _, conv) = pair(&store, &format!("lane{n}")).await;
        n += 1;
        let lane = layout.shard_of(conv.raw()) as usize % 2;
        by_lane[lane].push((a, conv));
    }
    // Warm both lanes' conversations (seq counters seeded, users known).
    for (i, &(a, conv)) in by_lane.iter().flatten().enumerate() {
        let r = store
            .append_batch(vec![message(a, conv, &format!("warm{i}"), false)])
            .await
            .unwrap();
        stored(&r[0]);
    }

    // Writes wait while the pause lasts: lane 0 gets stuck in a round with
    // one job, and a second job fills its queue.
    redis.pause_writes(1500).await;
    let (a0, c0) = by_lane[0][0];
    let stuck = store.append_batch(vec![message(a0, c0, "stuck", false)]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (a0b, c0b) = by_lane[0][1];
    let queued = store.append_batch(vec![message(a0b, c0b, "queued", false)]);
    let (a0c, c0c) = by_lane[0][2];
    let (a1, c1) = by_lane[1][0];
    let mixed = store.append_batch(vec![
        message(a1, c1, "lane1", false),
        message(a0c, c0c, "lane0", false),
    ]);
    let (stuck, queued, mixed) = tokio::join!(stuck, queued, mixed);
    stored(&stuck.unwrap()[0]);
    stored(&queued.unwrap()[0]);
    let mixed = mixed.unwrap();
    assert_eq!(stored(&mixed[0]).seq, 2, "lane 1's message is stored");
    assert_eq!(mixed[1], Err(AppendRejection::Overloaded));
    // And the refused one was not stored: its resend is a new message.
    let retry = store
        .append_batch(vec![message(a0c, c0c, "lane0", true)])
        .await
        .unwrap();
    assert_eq!(stored(&retry[0]).seq, 2);
}

// ---- many resends in one batch ----

/// Resends flagged as such, several of one id and several ids, pipelined
/// into one conversation in one batch: each is answered for what it is
/// (stored once, a duplicate, or refused), never failed for needing more
/// lookups than a batch allows.
async fn many_resends_in_one_batch_are_each_answered<S: Store>(store: &S) {
    let limits = GroupLimits {
        max_members: 10,
        max_groups_per_user: 10,
    };
    let (a, b, ab) = pair(store, "burst").await;
    let same: Vec<NewMessage> = (0..8).map(|_| message(a, ab, "once", true)).collect();
    let results = store.append_batch(same).await.unwrap();
    let seq = stored(&results[0]).seq;
    for r in &results[1..] {
        assert_eq!(duplicate_seq(r), seq);
    }
    let distinct: Vec<NewMessage> = (0..8)
        .map(|i| message(a, ab, &format!("each{i}"), true))
        .collect();
    let results = store.append_batch(distinct).await.unwrap();
    let seqs: Vec<u64> = results.iter().map(|r| stored(r).seq).collect();
    assert_eq!(seqs, (seq + 1..seq + 9).collect::<Vec<_>>());
    // A group the sender is not in (and one that does not exist).
    let g = store.create_group(b, "g", &[], limits).await.unwrap();
    for conv in [
        ConversationId::group(g.id).unwrap(),
        ConversationId::group(g.id + 1_000_000).unwrap(),
    ] {
        let outside: Vec<NewMessage> = (0..8).map(|_| message(a, conv, "once", true)).collect();
        let results = store.append_batch(outside).await.unwrap();
        for r in results {
            assert_eq!(r, Err(AppendRejection::NotMember));
        }
    }
}

both_stores!(many_resends_in_one_batch_are_each_answered);

// ---- groups per user ----

/// A user in the most groups allowed can neither create nor be added to
/// another; a user's groups are listed a page at a time.
async fn groups_per_user_are_capped_and_paged<S: Store>(store: &S) {
    let limits = GroupLimits {
        max_members: 10,
        max_groups_per_user: 3,
    };
    let (a, b, _) = pair(store, "cap").await;
    let c = store.create_user("capc", "h").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let g = store
            .create_group(a, &format!("g{i}"), &[b], limits)
            .await
            .unwrap();
        ids.push(g.id);
    }
    fn full<T>(r: Result<T, StoreError>) -> bool {
        matches!(r, Err(StoreError::LimitExceeded(_)))
    }
    assert!(full(store.create_group(a, "one more", &[], limits).await));
    // b is full too: a group with b in it cannot be made either, and c's
    // group is left untouched by the refused addition.
    assert!(full(store.create_group(c, "with b", &[b], limits).await));
    let own = store.create_group(c, "c's", &[], limits).await.unwrap();
    assert!(full(store.add_members(own.id, &[a], limits).await));
    assert_eq!(store.group_members(own.id).await.unwrap(), vec![c]);
    // Leaving one makes room again.
    store.remove_members(ids[0], &[b]).await.unwrap();
    store.add_members(own.id, &[b], limits).await.unwrap();

    let (page, more) = store.user_groups(a, 0, 2).await.unwrap();
    assert_eq!(page.iter().map(|g| g.id).collect::<Vec<_>>(), ids[..2]);
    assert!(more);
    let (rest, more) = store.user_groups(a, page[1].id, 2).await.unwrap();
    assert_eq!(rest.iter().map(|g| g.id).collect::<Vec<_>>(), ids[2..]);
    assert!(!more);
    assert_eq!(rest[0].member_count, 2);
}

both_stores!(groups_per_user_are_capped_and_paged);

// ---- a late joiner's cursors ----

/// A member added when the group is at seq 3 has read nothing but sees
/// nothing before the join: its read cursor starts at 3, so unread is
/// `last_seq - read_seq` as documented.
async fn a_late_joiners_read_cursor_starts_at_the_join<S: Store>(store: &S) {
    let limits = GroupLimits {
        max_members: 10,
        max_groups_per_user: 10,
    };
    let (a, b, _) = pair(store, "join").await;
    let g = store.create_group(a, "g", &[], limits).await.unwrap();
    let conv = ConversationId::group(g.id).unwrap();
    for i in 0..3 {
        let r = store
            .append_batch(vec![message(a, conv, &format!("before{i}"), false)])
            .await
            .unwrap();
        stored(&r[0]);
    }
    store.add_members(g.id, &[b], limits).await.unwrap();
    let r = store
        .append_batch(vec![message(a, conv, "after", false)])
        .await
        .unwrap();
    assert_eq!(stored(&r[0]).seq, 4);
    let (list, _) = store.conversations(b, 0, 10).await.unwrap();
    let summary = list
        .iter()
        .find(|c| c.conversation_id == conv.raw())
        .expect("listed");
    assert_eq!(
        (summary.last_seq, summary.read_seq, summary.unread_count),
        (4, 3, 1)
    );
    assert_eq!(summary.unread_count, summary.last_seq - summary.read_seq);
    // Reading moves on from the join, and a receipt covers only what the
    // member could see.
    let moved = store
        .advance_cursor(b, conv, im_server::store::CursorKind::Read, 4)
        .await
        .unwrap()
        .expect("moved");
    assert_eq!((moved.from, moved.to), (3, 4));
}

both_stores!(a_late_joiners_read_cursor_starts_at_the_join);

// ---- direct conversations before their first message ----

/// Its participants may read an empty direct conversation (an empty page,
/// cursors that do not move); anyone else may not.
async fn an_empty_direct_conversation_is_readable_by_its_participants<S: Store>(store: &S) {
    let (a, b, ab) = pair(store, "empty").await;
    let c = store.create_user("emptyc", "h").await.unwrap();
    let page = store.history(a, ab, 0, 10).await.unwrap();
    assert!(page.messages.is_empty() && !page.has_more);
    let page = store.sync(b, &[(ab, 0)], 10).await.unwrap();
    assert!(page.messages.is_empty());
    let moved = store
        .advance_cursor(a, ab, im_server::store::CursorKind::Read, 5)
        .await
        .unwrap();
    assert_eq!(moved, None);
    assert!(matches!(
        store.history(c, ab, 0, 10).await,
        Err(StoreError::NotMember)
    ));
}

both_stores!(an_empty_direct_conversation_is_readable_by_its_participants);

// ---- registration ----

/// An account and its first session are created together: the session is
/// listed at once, and a taken name creates neither.
async fn an_account_comes_with_its_first_session_or_not_at_all<S: Store>(store: &S) {
    let session = |now_ms| im_server::store::NewSession {
        user: 0,
        device_name: "phone".into(),
        address: "10.0.0.1".into(),
        now_ms,
        max_live: 10,
        live_since_ms: 0,
    };
    let now = im_proto::now_ms();
    let (user, id) = store
        .create_user_with_session("reg", "h", session(now))
        .await
        .unwrap();
    let live = store.sessions(user, 0).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!((live[0].id, live[0].device_name.as_str()), (id, "phone"));
    assert!(matches!(
        store
            .create_user_with_session("REG", "h", session(now))
            .await,
        Err(StoreError::UsernameTaken)
    ));
    assert_eq!(store.sessions(user, 0).await.unwrap().len(), 1);
}

both_stores!(an_account_comes_with_its_first_session_or_not_at_all);

/// The MySQL connections a burst of concurrent queries opened stay in the
/// pool for the next burst: a pool that closed each one as soon as it was
/// idle made every concurrent login pay a new MySQL connection.
#[tokio::test]
async fn pipeline_pooled_mysql_connections_outlive_a_burst() {
    use mysql_async::prelude::*;
    let env = PipelineEnv::fresh();
    let store = PipelineStore::open(pipeline_options(&env, 600))
        .await
        .unwrap();
    store.create_user("pooled", "hash").await.unwrap();
    let burst = || futures::future::join_all((0..16).map(|_| store.user_by_name("pooled")));
    for found in burst().await {
        assert!(found.unwrap().is_some());
    }
    // Connections to this test's own database, by MySQL connection id.
    let database = env.mysql_url.rsplit('/').next().unwrap().to_string();
    let admin = mysql_async::Pool::new(env.mysql_url.as_str());
    let ids = async || -> HashSet<u64> {
        let mut conn = admin.get_conn().await.unwrap();
        conn.exec(
            "SELECT id FROM information_schema.processlist WHERE db = ? AND id <> CONNECTION_ID()",
            (database.as_str(),),
        )
        .await
        .unwrap()
        .into_iter()
        .collect()
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_first = ids().await;
    assert!(
        after_first.len() > 1,
        "only {} pooled connection(s) left after 16 concurrent queries",
        after_first.len()
    );
    for found in burst().await {
        assert!(found.unwrap().is_some());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_second = ids().await;
    assert!(
        after_first.is_subset(&after_second),
        "the second burst replaced pooled connections: {after_first:?} then {after_second:?}"
    );
    let _ = admin.disconnect().await;
}

// ---- retention ----

/// Messages stored before the cutoff go as a prefix of each conversation:
/// sync and history from below the floor say where it is and go on above
/// it, the conversation list keeps the last seq, and seqs continue after
/// the floor. `settle(n)` waits until `n` messages are stored for good
/// (the pipeline's worker has them in MySQL).
async fn retention_removes_a_prefix_and_reports_its_floor<S: Store>(
    store: &S,
    settle: impl AsyncFn(u64),
) {
    let (a, b, ab) = pair(store, "ret").await;
    let c = store.create_user("retc", "h").await.unwrap();
    let ac = ConversationId::direct(a, c).unwrap();
    let old: Vec<NewMessage> = (1..=5)
        .map(|i| message(a, ab, &format!("old{i}"), false))
        .chain((1..=2).map(|i| message(c, ac, &format!("oldc{i}"), false)))
        .collect();
    for r in store.append_batch(old).await.unwrap() {
        stored(&r);
    }
    settle(7).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = im_proto::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new = store
        .append_batch(vec![
            message(b, ab, "new6", false),
            message(a, ab, "new7", false),
        ])
        .await
        .unwrap();
    assert_eq!(stored(&new[1]).seq, 7);
    settle(9).await;

    let removed = store
        .expire_before(cutoff, RetentionMode::Drop)
        .await
        .unwrap();
    assert_eq!(removed, 7);
    let again = store
        .expire_before(cutoff, RetentionMode::Drop)
        .await
        .unwrap();
    assert_eq!(again, 0, "nothing left before the cutoff");

    let seqs = |page: &Page| {
        page.messages
            .iter()
            .map(|m| (m.conversation_id, m.seq))
            .collect::<Vec<_>>()
    };
    let mut floors = vec![(ab.raw(), 5), (ac.raw(), 2)];
    floors.sort_unstable();
    let page = store.sync(a, &[(ab, 0), (ac, 0)], 100).await.unwrap();
    assert_eq!(page.expired, floors);
    assert_eq!(seqs(&page), [(ab.raw(), 6), (ab.raw(), 7)]);
    assert!(!page.has_more);
    // From the floor on there is nothing to report.
    let page = store.sync(b, &[(ab, 5)], 100).await.unwrap();
    assert!(page.expired.is_empty());
    assert_eq!(seqs(&page), [(ab.raw(), 6), (ab.raw(), 7)]);
    // A page that stops above the floor says nothing about it yet.
    let page = store.sync(b, &[(ab, 3)], 1).await.unwrap();
    assert_eq!(page.expired, [(ab.raw(), 5)]);
    assert_eq!(seqs(&page), [(ab.raw(), 6)]);
    assert!(page.has_more);

    let page = store.history(b, ab, 0, 50).await.unwrap();
    assert_eq!(seqs(&page), [(ab.raw(), 6), (ab.raw(), 7)]);
    assert_eq!(page.expired, [(ab.raw(), 5)]);
    assert!(!page.has_more, "nothing below the floor remains");
    let page = store.history(b, ab, 0, 1).await.unwrap();
    assert_eq!(seqs(&page), [(ab.raw(), 7)]);
    assert!(page.expired.is_empty() && page.has_more);
    let page = store.history(b, ab, 6, 50).await.unwrap();
    assert!(page.messages.is_empty());
    assert_eq!(page.expired, [(ab.raw(), 5)]);
    let page = store.history(c, ac, 0, 50).await.unwrap();
    assert!(page.messages.is_empty() && !page.has_more);
    assert_eq!(page.expired, [(ac.raw(), 2)]);

    // The list keeps the conversation and its last seq; its last message
    // is gone.
    let (list, _) = store.conversations(c, 0, 10).await.unwrap();
    let summary = list
        .iter()
        .find(|s| s.conversation_id == ac.raw())
        .expect("listed");
    assert_eq!(summary.last_seq, 2);
    assert!(summary.last_message.is_none());

    // Seqs go on above the floor.
    let next = store
        .append_batch(vec![message(a, ac, "after", false)])
        .await
        .unwrap();
    assert_eq!(stored(&next[0]).seq, 3);
    let page = store.sync(c, &[(ac, 0)], 100).await.unwrap();
    assert_eq!(page.expired, [(ac.raw(), 2)]);
    assert_eq!(seqs(&page), [(ac.raw(), 3)]);
}

#[tokio::test]
async fn embedded_retention_removes_a_prefix_and_reports_its_floor() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path(), 600);
    retention_removes_a_prefix_and_reports_its_floor(&store, async |_| {}).await;
}

async fn pipeline_retention_on(env: PipelineEnv) {
    let store = PipelineStore::open(pipeline_options(&env, 600))
        .await
        .unwrap();
    let _worker = env.start_worker().await;
    let settle = async |rows| wait_stored(&env, rows).await;
    retention_removes_a_prefix_and_reports_its_floor(&store, settle).await;

    // A conversation whose every message expired, and whose counter Redis
    // then loses, resumes above its floor: the counter is seeded from it.
    let (a, _, ab) = pair(&store, "retseed").await;
    for r in store
        .append_batch(
            (1..=3)
                .map(|i| message(a, ab, &format!("s{i}"), false))
                .collect(),
        )
        .await
        .unwrap()
    {
        stored(&r);
    }
    // Three rows were left by the check above.
    settle(6).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let removed = store
        .expire_before(im_proto::now_ms(), RetentionMode::Drop)
        .await
        .unwrap();
    assert!(removed >= 3);
    let layout = im_storage::layout::Layout::new(env.prefix.clone(), 4);
    let shard = layout.shard_of(ab.raw());
    let mut redis = env.redis_conn().await;
    let _: () = redis::cmd("HDEL")
        .arg(layout.seq_key(shard))
        .arg(ab.raw())
        .query_async(&mut redis)
        .await
        .unwrap();
    let next = store
        .append_batch(vec![message(a, ab, "s4", false)])
        .await
        .unwrap();
    assert_eq!(
        stored(&next[0]).seq,
        4,
        "a seq at or below the floor was given again"
    );
}

#[tokio::test]
async fn pipeline_retention_removes_a_prefix_and_reports_its_floor() {
    pipeline_retention_on(PipelineEnv::fresh()).await;
}

#[tokio::test]
async fn redis_cluster_retention_removes_a_prefix_and_reports_its_floor() {
    let nodes = im_tests::redis_cluster::shared_cluster_nodes().to_string();
    pipeline_retention_on(PipelineEnv::fresh_on_cluster(nodes)).await;
}

/// A dedup bucket always expires, and never sooner than two windows after
/// its last write, though its expiry is not renewed by every append.
#[tokio::test]
async fn pipeline_dedup_buckets_expire_two_windows_after_their_last_write() {
    let env = PipelineEnv::fresh();
    let window = 30;
    let options = pipeline_options(&env, window);
    let layout = im_storage::layout::Layout::new(options.prefix.clone(), options.streams);
    let store = PipelineStore::open(options).await.unwrap();
    let (a, _, ab) = pair(&store, "dedupttl").await;
    let mut conn = env.redis_conn().await;
    let mut ttls = Vec::new();
    for i in 0..8 {
        let result = store
            .append_batch(vec![message(a, ab, &format!("t{i}"), false)])
            .await
            .unwrap();
        // The message's tick (its id above the shard's 10 bits) names
        // the bucket its dedup entry went to.
        let tick = stored(&result[0]).message_id >> 10;
        let bucket = im_storage::layout::dedup_bucket(tick, window);
        let key = layout.dedup_key(layout.shard_of(ab.raw()), bucket);
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ms = window as i64 * 2000;
        assert!(
            pttl > ms - 100 && pttl <= ms + 1000,
            "append {i}: {key} expires in {pttl} ms, not two windows on"
        );
        ttls.push(pttl);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Over 2.1 s the expiry was renewed (it went up), but not by every
    // append (it also ran down between two).
    assert!(
        ttls.windows(2).any(|w| w[1] > w[0] + 200),
        "never renewed: {ttls:?}"
    );
    assert!(
        ttls.windows(2).any(|w| w[0] > w[1] + 200),
        "renewed by every append: {ttls:?}"
    );
}
