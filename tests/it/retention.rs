//! Retention end to end: a node (embedded) or a storage worker (pipeline)
//! that removes messages past `--message-retention-secs` on its schedule,
//! and what clients see of it: sync and history say where the floor is,
//! and an SDK client that was offline skips what is gone without calling
//! it lost.

use std::time::{Duration, Instant};

use im_client::{Event, Events, Target};
use im_proto::ConversationId;
use im_server::store::RetentionMode;
use im_tests::sdk::{self, text_of};
use im_tests::{PipelineEnv, TestServer};

/// A node whose messages are kept `secs` seconds, swept every second: by
/// the node itself (embedded) or by its storage worker (pipeline).
async fn start_with_retention(secs: u64, mode: RetentionMode) -> TestServer {
    if !im_tests::pipeline_mode() {
        return TestServer::start_with(move |c| {
            c.message_retention_secs = secs;
            c.message_retention_mode = mode;
            c.retention_sweep_secs = 1;
        })
        .await;
    }
    let mut server = TestServer::start().await;
    let env = server.pipeline.as_ref().expect("pipeline mode");
    let mut config = env.worker_config("retention-worker");
    config.message_retention_secs = secs;
    config.message_retention_mode = mode;
    config.retention_sweep_secs = 1;
    if let Some(worker) = server.worker.take() {
        worker.shutdown().await;
    }
    server.worker = Some(
        im_storage::Worker::start(config)
            .await
            .expect("storage worker starts"),
    );
    server
}

/// The next `Expired` event, skipping others but messages (which must not
/// come first).
async fn next_expired(events: &mut Events, secs: u64) -> (u64, u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Event::Expired {
                conversation_id,
                seq,
            })) => return (conversation_id, seq),
            Ok(Some(Event::Message(m))) => panic!("a message before the floor: {m:?}"),
            Ok(Some(_)) => {}
            Ok(None) => panic!("client stopped"),
            Err(_) => panic!("no Expired event within {secs} s"),
        }
    }
}

/// Messages of a device that was offline are removed; when it comes back,
/// its catch-up reports the floor once and delivers what came after it,
/// and history says the same.
async fn offline_device_skips_what_retention_removed(mode: RetentionMode) -> TestServer {
    let server = start_with_retention(3, mode).await;
    let (alice, _alice_events) = sdk::register(server.addr, "alice").await;
    let (bob, bob_events) = sdk::register(server.addr, "bob").await;
    let bob_id = bob.user_id();
    drop(bob_events);
    bob.close().await;
    let conv = ConversationId::direct(alice.user_id(), bob_id)
        .unwrap()
        .raw();
    for i in 1..=3 {
        alice
            .send_text(Target::User(bob_id), &format!("old {i}"))
            .await
            .unwrap();
    }
    // Swept within the retention time plus a sweep or two (and, on the
    // pipeline, the worker's batch).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let page = alice.history(conv, 0, 50).await.unwrap();
        if page.expired_seq == 3 {
            assert!(page.messages.is_empty() && !page.has_more);
            break;
        }
        assert!(Instant::now() < deadline, "not removed in time: {page:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ack = alice
        .send_text(Target::User(bob_id), "fresh")
        .await
        .unwrap();
    assert_eq!(ack.seq, 4, "seqs go on above the floor");

    let (bob, mut bob_events) = sdk::login(server.addr, "bob").await;
    assert_eq!(next_expired(&mut bob_events, 10).await, (conv, 3));
    let m = sdk::next_message(&mut bob_events, 10).await;
    assert_eq!((m.seq, text_of(&m)), (4, "fresh"));
    sdk::no_message(&mut bob_events, 300).await;
    let page = bob.history(conv, 0, 50).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.expired_seq, 3);
    server
}

#[tokio::test]
async fn an_offline_device_skips_what_retention_dropped() {
    offline_device_skips_what_retention_removed(RetentionMode::Drop).await;
}

/// Archived messages leave the conversation the same way, and sit in the
/// archive table (checked on MySQL; the embedded store's archive is
/// covered by its own tests).
#[tokio::test]
async fn archived_messages_leave_the_conversation_for_the_archive_table() {
    let server = offline_device_skips_what_retention_removed(RetentionMode::Archive).await;
    if let Some(env) = &server.pipeline {
        archive_rows_are(env, 3).await;
    }
}

async fn archive_rows_are(env: &PipelineEnv, expected: u64) {
    use mysql_async::prelude::*;
    let pool = mysql_async::Pool::new(env.mysql_url.as_str());
    let mut conn = pool.get_conn().await.unwrap();
    let archived: Option<u64> = conn
        .query_first("SELECT COUNT(*) FROM messages_archive")
        .await
        .unwrap();
    assert_eq!(archived, Some(expected));
    drop(conn);
    let _ = pool.disconnect().await;
}
