//! Messages spread over two MySQL shards (`--mysql-shards`): a node and a
//! storage worker on a main database and two shard databases, one on each
//! of two MariaDB servers. Rows land on their conversation's shard only;
//! sync, history, the conversation list and late resends read them back
//! from there once the Redis recent cache is gone; a shard that is down
//! holds up only its own conversations and loses nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use im_client::Target;
use im_proto::pb::frame::Body;
use im_proto::{ConversationId, ErrorCode, pb};
use im_server::store::pipeline::{PipelineOptions, PipelineStore};
use im_server::store::{AppendOutcome, NewMessage, Store};
use im_storage::layout::Layout;
use im_storage::shards::{DROP_OTHER_SHARDS_SQL, SHARD_FUNCTION_SQL, shard_of};
use im_tests::eventually;
use im_tests::sdk::{self, text_of};
use im_tests::services::{self, MariaDb};
use im_tests::{PipelineEnv, RawConn, TestServer};
use mysql_async::prelude::*;

/// A fresh environment with its messages on a database of each of the
/// two shared MariaDB servers.
fn two_shards() -> PipelineEnv {
    PipelineEnv::fresh().sharded()
}

/// `SELECT COUNT(*)`-style query on the database at `url`.
async fn count(url: &str, sql: &str) -> u64 {
    let pool = mysql_async::Pool::new(url);
    let n: Option<u64> = {
        let mut conn = pool.get_conn().await.expect("connect");
        conn.query_first(sql).await.expect("count query")
    };
    let _ = pool.disconnect().await;
    n.unwrap_or(0)
}

/// (conversation, seq, message_id) of every message row at `url`.
async fn rows(url: &str) -> Vec<(u64, u64, u64)> {
    let pool = mysql_async::Pool::new(url);
    let rows = {
        let mut conn = pool.get_conn().await.expect("connect");
        conn.query("SELECT conversation_id, seq, message_id FROM messages ORDER BY 1, 2")
            .await
            .expect("rows")
    };
    let _ = pool.disconnect().await;
    rows
}

/// Messages stored over both shards.
async fn stored_total(env: &PipelineEnv) -> u64 {
    let mut total = 0;
    for url in &env.mysql_shards {
        total += count(url, "SELECT COUNT(*) FROM messages").await;
    }
    total
}

/// Waits until the worker has raised every conversation's stored
/// watermark to its last seq, then deletes every recent cache: from then
/// on, reads find the messages in MySQL only.
async fn drop_recent_caches(env: &PipelineEnv, lasts: &BTreeMap<u64, u64>) {
    let layout = Layout::new(env.prefix.clone(), 4);
    let mut redis = redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (&conv, &last) in lasts {
        let key = layout.stored_key(layout.shard_of(conv));
        eventually(10, "watermark raised", || {
            let key = key.clone();
            let mut redis = redis.clone();
            async move {
                let mark: Option<u64> = redis::cmd("HGET")
                    .arg(&key)
                    .arg(conv)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                mark == Some(last)
            }
        })
        .await;
        let _: () = redis::cmd("DEL")
            .arg(layout.recent_key(layout.shard_of(conv), conv))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn messages_land_on_their_shard_and_read_back_from_it() {
    let env = two_shards();
    // A recent cache of one message: MySQL answers nearly everything.
    let server = TestServer::start_on(env.clone(), |c| c.recent_cache_len = 1).await;
    let names: Vec<String> = (0..6).map(|i| format!("user{i}")).collect();
    let mut clients = Vec::new();
    for name in &names {
        clients.push(sdk::register(server.addr, name).await.0);
    }
    let ids: Vec<u64> = clients.iter().map(|c| c.user_id()).collect();
    // conversation -> texts in seq order.
    let mut expected: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for a in 0..ids.len() {
        for b in a + 1..ids.len() {
            for (i, (from, to)) in [(a, b), (b, a), (a, b)].into_iter().enumerate() {
                let text = format!("{a}-{b} #{i}");
                let ack = clients[from]
                    .send_text(Target::User(ids[to]), text.clone())
                    .await
                    .unwrap();
                let texts = expected.entry(ack.conversation_id).or_default();
                assert_eq!(ack.seq, texts.len() as u64 + 1);
                texts.push(text);
            }
        }
    }
    let group = clients[0]
        .create_group("all", ids[1..].to_vec())
        .await
        .unwrap();
    let group_conv = ConversationId::group(group.group_id).unwrap().raw();
    // The group opens with a notice per join; later texts follow.
    let notices = {
        let history = clients[0].history(group_conv, 0, 100).await.unwrap();
        history.messages.len()
    };
    for (i, client) in clients.iter().enumerate() {
        client
            .send_text(Target::Group(group.group_id), format!("group #{i}"))
            .await
            .unwrap();
    }
    let total: u64 =
        expected.values().map(|t| t.len() as u64).sum::<u64>() + (notices + clients.len()) as u64;

    eventually(20, "every message stored", || async {
        stored_total(&env).await == total
    })
    .await;
    // Each row on its conversation's shard, none on the other, none in the
    // main database; both shards hold some.
    for (shard, url) in env.mysql_shards.iter().enumerate() {
        let here = rows(url).await;
        assert!(!here.is_empty(), "shard {shard} holds no message");
        for (conv, _, _) in &here {
            assert_eq!(shard_of(*conv, 2), shard as u32, "conversation {conv}");
        }
        assert_eq!(count(url, "SELECT COUNT(*) FROM members").await, 0);
    }
    assert_eq!(
        count(&env.mysql_url, "SELECT COUNT(*) FROM messages").await,
        0
    );
    assert!(count(&env.mysql_url, "SELECT COUNT(*) FROM members").await > 0);

    let mut lasts: BTreeMap<u64, u64> =
        expected.iter().map(|(&c, t)| (c, t.len() as u64)).collect();
    lasts.insert(group_conv, (notices + clients.len()) as u64);
    drop_recent_caches(&env, &lasts).await;

    // A new device of user 0 catches up (conversation list, then sync).
    let (fresh, mut events) = sdk::login(server.addr, &names[0]).await;
    let mine: Vec<u64> = lasts
        .keys()
        .copied()
        .filter(|&c| {
            ConversationId::from_raw(c)
                .is_some_and(|id| id.group_id().is_some() || id.peer_of(ids[0]).is_some())
        })
        .collect();
    let want: u64 = mine.iter().map(|c| lasts[c]).sum();
    let got = sdk::messages(&mut events, want as usize, 10).await;
    let mut by_conv: HashMap<u64, Vec<&pb::Message>> = HashMap::new();
    for m in &got {
        by_conv.entry(m.conversation_id).or_default().push(m);
    }
    for &conv in &mine {
        let seqs: Vec<u64> = by_conv[&conv].iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=lasts[&conv]).collect::<Vec<_>>(), "{conv}");
        if let Some(texts) = expected.get(&conv) {
            let got: Vec<&str> = by_conv[&conv].iter().map(|m| text_of(m)).collect();
            assert_eq!(got, *texts);
        }
    }
    sdk::no_message(&mut events, 300).await;

    // History, in pages, from both shards.
    for &conv in expected.keys() {
        let page = fresh.history(conv, 0, 2).await;
        if ConversationId::from_raw(conv)
            .and_then(|c| c.peer_of(ids[0]))
            .is_none()
        {
            assert!(page.is_err(), "history of someone else's conversation");
            continue;
        }
        let page = page.unwrap();
        let texts: Vec<&str> = page.messages.iter().map(text_of).collect();
        assert_eq!(texts, expected[&conv][1..]);
        assert!(page.has_more);
        let older = fresh.history(conv, 2, 10).await.unwrap();
        assert_eq!(older.messages.len(), 1);
        assert_eq!(text_of(&older.messages[0]), expected[&conv][0]);
    }

    // The conversation list: every conversation's last message.
    let list = fresh.conversations().await.unwrap();
    assert_eq!(list.len(), mine.len());
    for summary in &list {
        let conv = summary.conversation_id;
        assert_eq!(summary.last_seq, lasts[&conv]);
        let last = summary.last_message.as_ref().expect("last message");
        assert_eq!(last.seq, lasts[&conv]);
        let want = match expected.get(&conv) {
            Some(texts) => texts.last().unwrap().clone(),
            None => format!("group #{}", clients.len() - 1),
        };
        assert_eq!(text_of(last), want, "{conv}");
    }
}

#[tokio::test]
async fn resends_after_the_window_are_found_on_their_shard() {
    let env = two_shards();
    let server = TestServer::start_on(env.clone(), |c| c.dedup_window_secs = 1).await;
    let mut alice = RawConn::connect(server.addr).await;
    alice.register("alice").await;
    let mut peers = Vec::new();
    for i in 0..8 {
        let mut peer = RawConn::connect(server.addr).await;
        peers.push(peer.register(&format!("peer{i}")).await.user_id);
    }
    let send = |to: u64, resend: bool| {
        Body::Send(pb::SendRequest {
            target: Some(pb::send_request::Target::ToUser(to)),
            client_msg_id: format!("to-{to}"),
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text {
                    text: "once".into(),
                })),
            }),
            resend,
        })
    };
    let mut firsts = Vec::new();
    for &peer in &peers {
        let Body::SendAck(ack) = alice.call(send(peer, false)).await else {
            panic!("first attempt not acked");
        };
        firsts.push(ack);
    }
    let shards: Vec<u32> = firsts
        .iter()
        .map(|a| shard_of(a.conversation_id, 2))
        .collect();
    assert!(shards.contains(&0) && shards.contains(&1), "{shards:?}");
    eventually(20, "stored", || async {
        stored_total(&env).await == peers.len() as u64
    })
    .await;
    // Two windows later Redis has forgotten every send: only the shards'
    // dedup keys know them.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for (&peer, first) in peers.iter().zip(&firsts) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let again = loop {
            match alice.call(send(peer, true)).await {
                Body::SendAck(ack) => break ack,
                Body::Error(e) if e.code == ErrorCode::Overloaded as i32 => {
                    assert!(Instant::now() < deadline, "still OVERLOADED");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => panic!("late resend answered {other:?}"),
            }
        };
        assert!(again.duplicate, "a late resend was stored again");
        assert_eq!(
            (again.message_id, again.seq, again.server_time_ms),
            (first.message_id, first.seq, first.server_time_ms)
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_total(&env).await, peers.len() as u64);
}

/// Many late resends in one append call, over both shards: each shard is
/// asked once for its own, and each resend finds its original.
#[tokio::test]
async fn a_batch_of_late_resends_is_looked_up_on_each_shard() {
    let env = two_shards();
    let store = PipelineStore::open(PipelineOptions {
        redis: env.redis_target(),
        mysql_url: env.mysql_url.clone(),
        mysql_shards: env.mysql_shards.clone(),
        prefix: env.prefix.clone(),
        streams: 4,
        dedup_window_secs: 1,
        ..PipelineOptions::default()
    })
    .await
    .unwrap();
    let _worker = env.start_worker().await;
    let a = store.create_user("sender", "h").await.unwrap();
    let mut convs = Vec::new();
    for i in 0..10 {
        let b = store.create_user(&format!("to{i}"), "h").await.unwrap();
        convs.push(ConversationId::direct(a, b).unwrap());
    }
    let message = |conv: ConversationId, id: &str, resend: bool| NewMessage {
        sender: a,
        conversation: conv,
        client_msg_id: id.into(),
        content: pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text { text: id.into() })),
        },
        server_time_ms: im_proto::now_ms(),
        resend,
    };
    let first = store
        .append_batch(convs.iter().map(|&c| message(c, "m1", false)).collect())
        .await
        .unwrap();
    let originals: Vec<pb::Message> = first
        .iter()
        .map(|r| match r {
            Ok(AppendOutcome::Stored(m)) => m.clone(),
            other => panic!("not stored: {other:?}"),
        })
        .collect();
    let on: Vec<u32> = convs.iter().map(|c| shard_of(c.raw(), 2)).collect();
    assert!(on.contains(&0) && on.contains(&1), "{on:?}");
    eventually(20, "stored", || async {
        stored_total(&env).await == convs.len() as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut batch: Vec<NewMessage> = convs.iter().map(|&c| message(c, "m1", true)).collect();
    // And one resend of a send never stored: stored now, once.
    batch.push(message(convs[0], "never", true));
    let late = store.append_batch(batch).await.unwrap();
    for (result, original) in late.iter().zip(&originals) {
        match result {
            Ok(AppendOutcome::Duplicate(ack)) => {
                assert_eq!((ack.seq, ack.message_id), (1, original.message_id));
                assert_eq!(ack.conversation_id, original.conversation_id);
            }
            other => panic!("a late resend was not recognised: {other:?}"),
        }
    }
    match &late[convs.len()] {
        Ok(AppendOutcome::Stored(m)) => assert_eq!(m.seq, 2),
        other => panic!("expected a stored message, got {other:?}"),
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_is_down_holds_up_only_its_own_conversations() {
    // Shard 1 on a MariaDB of the test's own, to stop and start.
    let mut db = tokio::task::spawn_blocking(MariaDb::start).await.unwrap();
    let env =
        PipelineEnv::fresh().sharded_on(&[services::shared().mysql_url.clone(), db.server_url()]);
    let server = TestServer::start_on(env.clone(), |_| {}).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(sdk::register(server.addr, &format!("user{i}")).await.0);
    }
    let ids: Vec<u64> = clients.iter().map(|c| c.user_id()).collect();
    let mut pairs = Vec::new();
    for a in 0..ids.len() {
        for b in a + 1..ids.len() {
            pairs.push((a, b));
        }
    }
    let conv_of = |(a, b): (usize, usize)| ConversationId::direct(ids[a], ids[b]).unwrap().raw();
    let on_shard = |s: u32| {
        pairs
            .iter()
            .filter(|&&p| shard_of(conv_of(p), 2) == s)
            .count() as u64
    };
    let (n0, n1) = (on_shard(0), on_shard(1));
    assert!(n0 > 0 && n1 > 0, "{n0} and {n1}");
    let send_round = |round: &'static str| {
        let clients = &clients;
        let ids = &ids;
        let pairs = &pairs;
        async move {
            for &(a, b) in pairs {
                clients[a]
                    .send_text(Target::User(ids[b]), format!("{round} {a}-{b}"))
                    .await
                    .unwrap();
            }
        }
    };
    send_round("before").await;
    let (shard0, shard1) = (&env.mysql_shards[0], &env.mysql_shards[1]);
    eventually(20, "first round stored", || async {
        count(shard0, "SELECT COUNT(*) FROM messages").await == n0
            && count(shard1, "SELECT COUNT(*) FROM messages").await == n1
    })
    .await;

    db.stop();
    send_round("during 1").await;
    send_round("during 2").await;
    // Shard 0's conversations are stored meanwhile; shard 1's wait.
    eventually(20, "shard 0 stored while shard 1 is down", || async {
        count(shard0, "SELECT COUNT(*) FROM messages").await == 3 * n0
    })
    .await;
    let worker = server.worker.as_ref().unwrap();
    eventually(10, "shard 1's rows deferred", || async {
        worker.stats().deferred[1] >= 2 * n1
    })
    .await;
    // Down for longer than the claim idle time: the waiting entries are
    // claimed and deferred again, and shard 0 keeps flowing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    send_round("during 3").await;
    eventually(20, "shard 0 stored while shard 1 is still down", || async {
        count(shard0, "SELECT COUNT(*) FROM messages").await == 4 * n0
    })
    .await;
    assert_eq!(worker.stats().deferred[0], 0);
    assert_eq!(worker.stats().dead_letters, 0);

    db = tokio::task::spawn_blocking(move || {
        db.start_again();
        db
    })
    .await
    .unwrap();
    send_round("after").await;
    eventually(30, "shard 1 caught up", || async {
        count(shard1, "SELECT COUNT(*) FROM messages").await == 5 * n1
    })
    .await;
    eventually(10, "shard 0 has the last round", || async {
        count(shard0, "SELECT COUNT(*) FROM messages").await == 5 * n0
    })
    .await;
    // Dense, once each, on the right shard.
    for (shard, url) in env.mysql_shards.iter().enumerate() {
        let here = rows(url).await;
        let mut seqs: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (conv, seq, _) in here {
            assert_eq!(shard_of(conv, 2), shard as u32);
            seqs.entry(conv).or_default().push(seq);
        }
        for (conv, list) in seqs {
            assert_eq!(list, [1, 2, 3, 4, 5], "conversation {conv}");
        }
    }
    // And they read back, the late shard's included.
    for &pair in &pairs {
        let history = clients[pair.0].history(conv_of(pair), 0, 10).await.unwrap();
        let texts: Vec<&str> = history.messages.iter().map(text_of).collect();
        let (a, b) = pair;
        assert_eq!(
            texts,
            [
                format!("before {a}-{b}"),
                format!("during 1 {a}-{b}"),
                format!("during 2 {a}-{b}"),
                format!("during 3 {a}-{b}"),
                format!("after {a}-{b}"),
            ]
        );
    }
    assert_eq!(worker.stats().dead_letters, 0);
    drop(server);
    drop(db);
}

/// The stored function of docs/scaling.md computes the same shard as the
/// servers and workers, for the ids of both kinds of conversation, and its
/// procedure leaves a shard with exactly the conversations that belong to
/// it.
#[tokio::test]
async fn the_sql_of_the_shard_split_agrees_with_the_servers() {
    let url = services::fresh_database(&services::shared().mysql_url);
    let pool = mysql_async::Pool::new(url.as_str());
    im_storage::schema::migrate(&pool).await.unwrap();
    let mut conn = pool.get_conn().await.unwrap();
    conn.query_drop(SHARD_FUNCTION_SQL).await.unwrap();
    conn.query_drop(DROP_OTHER_SHARDS_SQL).await.unwrap();
    let mut ids: Vec<u64> = vec![1, 2, 3, u64::MAX, u64::MAX - 1, 1 << 63, (1 << 32) + 7];
    for a in 1..60u64 {
        ids.extend(
            (a..a + 20)
                .filter_map(|b| ConversationId::direct(a * 7919, b * 104_729).map(|c| c.raw())),
        );
        ids.extend(ConversationId::group(a * 1_000_003).map(|c| c.raw()));
    }
    ids.sort_unstable();
    ids.dedup();
    // Two messages per conversation.
    for chunk in ids.chunks(500) {
        let sql = format!(
            "INSERT INTO messages (conversation_id, seq, message_id, sender_id, server_time_ms, body) \
             VALUES {}",
            vec!["(?, 1, 1, 0, 0, ''), (?, 2, 2, 0, 0, '')"; chunk.len()].join(",")
        );
        let params: Vec<mysql_async::Value> =
            chunk.iter().flat_map(|&i| [i.into(), i.into()]).collect();
        conn.exec_drop(sql, params).await.unwrap();
    }
    let found: Vec<(u64, u32, u32, u32)> = conn
        .query(
            "SELECT DISTINCT conversation_id, im_message_shard(conversation_id, 2), \
             im_message_shard(conversation_id, 4), im_message_shard(conversation_id, 7) \
             FROM messages ORDER BY 1",
        )
        .await
        .unwrap();
    assert_eq!(found.len(), ids.len());
    for (id, two, four, seven) in found {
        assert_eq!(
            (two, four, seven),
            (shard_of(id, 2), shard_of(id, 4), shard_of(id, 7)),
            "{id}"
        );
    }
    // This database as shard 1 of 2 after a split.
    conn.query_drop("CALL im_drop_other_shards(2, 1)")
        .await
        .unwrap();
    let left: Vec<(u64, u64)> = conn
        .query("SELECT conversation_id, COUNT(*) FROM messages GROUP BY 1 ORDER BY 1")
        .await
        .unwrap();
    let kept: Vec<(u64, u64)> = ids
        .iter()
        .filter(|&&c| shard_of(c, 2) == 1)
        .map(|&c| (c, 2))
        .collect();
    assert!(!kept.is_empty() && kept.len() < ids.len());
    assert_eq!(left, kept);
    drop(conn);
    let _ = pool.disconnect().await;
}
