//! The admin listener (`--admin-listen`) of a node and of the storage
//! worker: metrics that move with real traffic, health, 404s, and the
//! listener's life tied to the process's.

use std::sync::Arc;
use std::time::Duration;

use im_client::Target;
use im_proto::pb::frame::Body;
use im_proto::{ConversationId, ErrorCode, pb};
use im_server::server::{EmbeddedServer, ServerError};
use im_storage::admin::{AdminServer, AdminSource, Exposition, METRICS_CONTENT_TYPE};
use im_tests::sdk::{self, messages};
use im_tests::{
    Node, PASSWORD, PipelineEnv, RawConn, TestServer, error_code, http_get, metric, test_config,
};

/// Scrapes `/metrics` at `addr` until every `(name, at least)` holds, and
/// returns that scrape; panics with the last one after 10 s.
async fn scrape_until(addr: std::net::SocketAddr, wanted: &[(&str, f64)]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = http_get(addr, "/metrics").await.expect("scrape");
        assert_eq!(reply.status, 200, "{}", reply.body);
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(name, min)| metric(&reply.body, name).is_none_or(|v| v < *min))
            .collect();
        if missing.is_empty() {
            return reply.body;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("{missing:?} not reached:\n{}", reply.body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn node_metrics_follow_traffic_and_health_is_ok() {
    let mut server =
        TestServer::start_with(|c| c.admin_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let admin = server.node().admin_addr().expect("admin listener");

    let (alice, _alice_events) = sdk::register(server.addr, "alice").await;
    let (bob, mut bob_events) = sdk::register(server.addr, "bob").await;
    for i in 0..3 {
        alice
            .send_text(Target::User(bob.user_id()), format!("hello {i}"))
            .await
            .unwrap();
    }
    // A resend with the same client_msg_id is acked as a duplicate.
    let content = pb::Content {
        kind: Some(pb::content::Kind::Text(pb::Text {
            text: "once".into(),
        })),
    };
    let first = alice
        .send_with_id(Target::User(bob.user_id()), "dup-1", content.clone())
        .await
        .unwrap();
    let again = alice
        .send_with_id(Target::User(bob.user_id()), "dup-1", content)
        .await
        .unwrap();
    assert!(again.duplicate && again.seq == first.seq);
    assert_eq!(messages(&mut bob_events, 4, 5).await.len(), 4);
    let conversation = ConversationId::direct(alice.user_id(), bob.user_id())
        .unwrap()
        .raw();
    bob.mark_read(conversation, 4).await.unwrap();
    // A wrong password counts as an auth failure.
    let mut stranger = RawConn::connect(server.addr).await;
    let refused = stranger
        .call(Body::Login(pb::LoginRequest {
            username: "alice".into(),
            password: format!("{PASSWORD}!"),
            device_name: String::new(),
        }))
        .await;
    assert_eq!(error_code(&refused), Some(ErrorCode::InvalidCredentials));

    let text = scrape_until(
        admin,
        &[
            ("im_messages_appended_total", 4.0),
            ("im_messages_acked_total", 5.0),
            ("im_messages_duplicate_total", 1.0),
            ("im_messages_pushed_total", 4.0),
            ("im_receipts_total", 1.0),
            ("im_auth_failures_total", 1.0),
            ("im_connections", 3.0),
            ("im_connections_accepted_total", 3.0),
            ("im_online_users", 2.0),
            ("im_frames_received_total", 8.0),
            ("im_frames_sent_total", 8.0),
            ("im_bytes_received_total", 1.0),
            ("im_bytes_sent_total", 1.0),
        ],
    )
    .await;
    for gauge in [
        "im_outbound_queue_depth",
        "im_send_queue_depth",
        "im_requests_in_flight",
    ] {
        assert!(metric(&text, gauge).is_some(), "{gauge} missing:\n{text}");
        assert!(text.contains(&format!("# TYPE {gauge} gauge\n")), "{text}");
    }
    assert!(text.contains("# TYPE im_messages_appended_total counter\n"));
    assert!(text.contains("# HELP im_slow_consumer_disconnects_total "));

    let metrics = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(metrics.content_type.as_deref(), Some(METRICS_CONTENT_TYPE));
    let health = http_get(admin, "/healthz").await.unwrap();
    assert_eq!((health.status, health.body.trim()), (200, "ok"));
    assert_eq!(http_get(admin, "/nope").await.unwrap().status, 404);

    // The listener goes with the node.
    alice.close().await;
    bob.close().await;
    server.shutdown().await;
    assert!(
        http_get(admin, "/healthz").await.is_err(),
        "admin listener still answers after shutdown"
    );
}

#[tokio::test]
async fn a_node_without_the_flag_has_no_admin_listener() {
    let server = TestServer::start().await;
    assert_eq!(server.node().admin_addr(), None);
}

#[tokio::test]
async fn a_taken_admin_address_fails_start_up() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.admin_listen = Some(taken.local_addr().unwrap());
    match EmbeddedServer::start(config).await {
        Err(ServerError::Admin(e)) => {
            let message = e.to_string();
            assert!(message.contains("admin endpoint"), "{message}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("started on a taken admin address"),
    }
}

/// A source with a fixed answer.
struct Fixed {
    healthy: bool,
}

impl AdminSource for Fixed {
    fn collect(&self, out: &mut Exposition) {
        out.counter("test_things_total", "Things done.", 3);
    }

    async fn health(&self) -> Result<(), String> {
        if self.healthy {
            Ok(())
        } else {
            Err("redis: no answer to PING within 1000 ms".into())
        }
    }
}

#[tokio::test]
async fn unhealthy_is_503_with_the_reason_and_unknown_paths_are_404() {
    let admin = AdminServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Fixed { healthy: false }),
    )
    .unwrap();
    let addr = admin.local_addr();
    let health = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(health.status, 503);
    assert!(health.body.contains("no answer to PING"), "{}", health.body);
    let metrics = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.body,
        "# HELP test_things_total Things done.\n\
         # TYPE test_things_total counter\n\
         test_things_total 3\n"
    );
    for path in ["/", "/metrics/x", "/health"] {
        assert_eq!(http_get(addr, path).await.unwrap().status, 404, "{path}");
    }
    admin.shutdown().await;
    assert!(http_get(addr, "/metrics").await.is_err());
}

#[tokio::test]
async fn worker_metrics_count_stored_rows_and_health_is_ok() {
    im_tests::init_logging();
    let env = PipelineEnv::fresh();
    let mut worker_config = env.worker_config("admin-worker");
    worker_config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = im_storage::Worker::start(worker_config)
        .await
        .expect("worker starts");
    let admin = worker.admin_addr().expect("admin listener");
    let health = http_get(admin, "/healthz").await.unwrap();
    assert_eq!((health.status, health.body.trim()), (200, "ok"));

    // Messages through a node end up as rows the worker counts.
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    env.apply(&mut config);
    let node = Node::start(config).await;
    let (alice, _alice_events) = sdk::register(node.local_addr(), "alice").await;
    let (bob, _bob_events) = sdk::register(node.local_addr(), "bob").await;
    for i in 0..3 {
        alice
            .send_text(Target::User(bob.user_id()), format!("stored {i}"))
            .await
            .unwrap();
    }
    let text = scrape_until(
        admin,
        &[
            ("im_storage_rows_total", 3.0),
            ("im_storage_batches_total", 1.0),
            ("im_storage_bytes_total", 1.0),
        ],
    )
    .await;
    for (name, kind) in [
        ("im_storage_rows_total", "counter"),
        ("im_storage_dead_letters_total", "counter"),
        ("im_storage_stream_pending", "gauge"),
    ] {
        assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{text}");
    }
    assert!(
        text.contains("im_storage_stream_pending{shard=\"0\"}"),
        "{text}"
    );
    assert_eq!(metric(&text, "im_storage_dead_letters_total"), Some(0.0));

    alice.close().await;
    bob.close().await;
    node.shutdown().await;
    worker.shutdown().await;
    assert!(
        http_get(admin, "/healthz").await.is_err(),
        "admin listener still answers after the worker stopped"
    );
}
