//! Failure handling that must not hurt anyone else: a reader too slow for
//! its pushes is cut off and catches up by sync; a restart keeps every
//! account, group and acknowledged message.

use std::time::{Duration, Instant};

use im_client::Target;
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_tests::sdk::{self, messages, next_message, no_message, text_of};
use im_tests::{RawConn, TestServer};

#[tokio::test]
async fn slow_reader_is_disconnected_without_hurting_others() {
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 16 * 1024;
        c.max_outbound_bytes = 32 * 1024;
        c.send_buffer_bytes = 4096;
    })
    .await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (carol, mut carol_events) = sdk::register(server.addr, "carol").await;
    let group = alice
        .create_group("unaffected", vec![carol.user_id()])
        .await
        .unwrap();
    next_message(&mut carol_events, 5).await;

    // Bob logs in and then never reads.
    let mut bob = RawConn::connect_small_buffer(server.addr).await;
    let bob_id = bob.register("bob").await.user_id;

    const FLOOD: usize = 200;
    let payload = "x".repeat(4000);
    for i in 0..FLOOD {
        alice
            .send_text(Target::User(bob_id), format!("{i:04} {payload}"))
            .await
            .expect("sends to a slow reader are still acknowledged");
    }
    // Others are served normally meanwhile.
    alice
        .send_text(Target::Group(group.group_id), "still flowing")
        .await
        .unwrap();
    assert_eq!(
        text_of(&next_message(&mut carol_events, 5).await),
        "still flowing"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while server.node().net_stats().slow_consumers == 0 {
        assert!(
            Instant::now() < deadline,
            "slow reader was never disconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the kernel had buffered is readable, then the stream ends.
    let buffered = bob.until_closed().await;
    assert!(
        buffered.len() < FLOOD,
        "the server kept queueing for a slow reader"
    );

    // Bob comes back and catches up on everything, once, in order.
    let (_bob, mut events) = sdk::login(server.addr, "bob").await;
    let got = messages(&mut events, FLOOD, 10).await;
    let order: Vec<usize> = got
        .iter()
        .map(|m| text_of(m)[..4].parse().unwrap())
        .collect();
    assert_eq!(order, (0..FLOOD).collect::<Vec<_>>());
    no_message(&mut events, 300).await;
}

#[tokio::test]
async fn restart_keeps_accounts_groups_history_and_tokens() {
    let mut server = TestServer::start().await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, _b) = sdk::register(server.addr, "bob").await;
    let token = bob.session().token;
    let group = alice
        .create_group("durable", vec![bob.user_id()])
        .await
        .unwrap();
    let mut conv = 0;
    for i in 1..=20 {
        conv = alice
            .send_text(Target::User(bob.user_id()), format!("m{i}"))
            .await
            .unwrap()
            .conversation_id;
    }
    alice
        .send_text(Target::Group(group.group_id), "in the group")
        .await
        .unwrap();
    bob.mark_read(conv, 15).await.unwrap();
    alice.close().await;
    bob.close().await;

    server.restart().await;

    let (alice, _a) = sdk::login(server.addr, "alice").await;
    let (bob, _b) = sdk::connect(
        sdk::config(server.addr),
        im_client::Credentials::Token(token),
    )
    .await;
    let history = bob.history(conv, 0, 100).await.unwrap();
    let texts: Vec<&str> = history.messages.iter().map(text_of).collect();
    let expected: Vec<String> = (1..=20).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, expected);
    let groups = bob.groups().await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].name, "durable");
    let list = bob.conversations().await.unwrap();
    let direct = list.iter().find(|c| c.conversation_id == conv).unwrap();
    assert_eq!((direct.read_seq, direct.unread_count), (15, 5));
    // Sequencing and deduplication continue where they were.
    let ack = alice
        .send_text(Target::User(bob.user_id()), "after restart")
        .await
        .unwrap();
    assert_eq!(ack.seq, 21);
}

#[tokio::test]
async fn request_storm_from_one_client_is_bounded_by_backpressure() {
    let server = TestServer::start_with(|c| c.max_in_flight = 8).await;
    let mut alice = RawConn::connect(server.addr).await;
    let me = alice.register("alice").await.user_id;
    // Write a thousand requests without reading a single reply.
    let mut ids = Vec::new();
    for n in 0..1000 {
        let id = alice
            .send(Body::Send(pb::SendRequest {
                target: Some(pb::send_request::Target::ToUser(me)),
                client_msg_id: format!("storm-{n}"),
                content: Some(pb::Content {
                    kind: Some(pb::content::Kind::Text(pb::Text {
                        text: n.to_string(),
                    })),
                }),
                resend: false,
            }))
            .await;
        ids.push(id);
    }
    // Every one is answered, none dropped, in seq order of submission.
    let mut acks = std::collections::HashMap::new();
    while acks.len() < ids.len() {
        let frame = alice.recv().await;
        if let Some(Body::SendAck(ack)) = frame.body {
            acks.insert(frame.request_id, ack.seq);
        }
    }
    let seqs: Vec<u64> = ids.iter().map(|id| acks[id]).collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
}
