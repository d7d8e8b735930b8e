//! Failure handling that must not hurt anyone else: a burst never cuts a
//! fast reader off; a reader that falls behind has pushes skipped, is told
//! to sync, and is cut off only when it stops reading altogether; a
//! restart keeps every account, group and acknowledged message.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use im_client::Target;
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{ConversationId, ErrorCode};
use im_tests::sdk::{self, messages, next_message, no_message, text_of};
use im_tests::{RawConn, TestServer};

/// What a reader that reads as fast as it can saw of one conversation.
#[derive(Debug, Default)]
struct Seen {
    /// Seqs of the conversation, from pushes and syncs, each counted once.
    seqs: BTreeSet<u64>,
    pushes: usize,
    hints: usize,
    /// A fatal error or the end of the stream.
    cut: Option<String>,
}

/// Reads every frame as soon as it arrives; on a `SyncHint` syncs the
/// conversation from what it has (as a client written from the protocol
/// guide does); stops once it has `want` seqs or after `secs`.
async fn read_fast(mut conn: RawConn, conversation: u64, want: usize, secs: u64) -> Seen {
    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut sync_id = None;
    while seen.seqs.len() < want {
        let frame = match tokio::time::timeout_at(deadline, conn.framed.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => {
                seen.cut = Some("connection closed".into());
                break;
            }
            Err(_) => break,
        };
        match frame.body {
            Some(Body::Message(m)) if m.conversation_id == conversation => {
                seen.pushes += 1;
                seen.seqs.insert(m.seq);
            }
            Some(Body::SyncHint(hint)) => {
                assert!(
                    hint.conversation_ids.is_empty()
                        || hint.conversation_ids.contains(&conversation),
                    "{hint:?}"
                );
                seen.hints += 1;
                let from = contiguous(&seen.seqs);
                sync_id = Some(conn.send(sync_from(conversation, from)).await);
            }
            Some(Body::SyncResponse(page)) if Some(frame.request_id) == sync_id => {
                let mut highest = 0;
                for m in page.messages {
                    highest = highest.max(m.seq);
                    seen.seqs.insert(m.seq);
                }
                sync_id = None;
                if page.has_more && highest > 0 {
                    sync_id = Some(conn.send(sync_from(conversation, highest)).await);
                }
            }
            Some(Body::Error(e)) if e.fatal => {
                seen.cut = Some(format!("fatal error {}: {}", e.code, e.message));
                break;
            }
            _ => {}
        }
    }
    seen
}

fn contiguous(seqs: &BTreeSet<u64>) -> u64 {
    let mut n = 0;
    while seqs.contains(&(n + 1)) {
        n += 1;
    }
    n
}

fn sync_from(conversation: u64, seq: u64) -> Body {
    Body::Sync(pb::SyncRequest {
        cursors: vec![pb::ConvCursor {
            conversation_id: conversation,
            seq,
        }],
        limit: 0,
    })
}

fn big_send(target: pb::send_request::Target, id: String, bytes: usize) -> Body {
    Body::Send(pb::SendRequest {
        target: Some(target),
        client_msg_id: id.clone(),
        content: Some(pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text {
                text: format!("{id} {}", "x".repeat(bytes)),
            })),
        }),
        resend: false,
    })
}

/// Writes the sends in one go (one flush), then reads until every one is
/// answered: (acked, refused as OVERLOADED). Any other answer fails.
async fn pipeline_sends(conn: &mut RawConn, sends: impl Iterator<Item = Body>) -> (usize, usize) {
    use futures::SinkExt;
    let mut ids = BTreeSet::new();
    for (i, body) in sends.enumerate() {
        let id = 1_000_000 + i as u64;
        conn.framed
            .feed(im_proto::Frame::new(id, body))
            .await
            .unwrap();
        ids.insert(id);
    }
    SinkExt::<im_proto::Frame>::flush(&mut conn.framed)
        .await
        .unwrap();
    let (mut acked, mut refused) = (0, 0);
    while !ids.is_empty() {
        let frame = conn.recv_within(20).await.expect("sender still connected");
        match frame.body {
            Some(Body::SendAck(_)) => acked += 1,
            Some(Body::Error(e)) if e.code == ErrorCode::Overloaded as i32 => refused += 1,
            Some(Body::Error(e)) => panic!("a send failed: {e:?}"),
            _ => continue,
        }
        ids.remove(&frame.request_id);
    }
    (acked, refused)
}

/// One user pipelining 64 sends of 30,000-byte texts to another, within
/// every documented limit, must not cut the recipient's fast reader off:
/// it gets every message, live or after a hint and a sync.
#[tokio::test]
async fn a_burst_never_disconnects_a_fast_reader() {
    let server = TestServer::start().await;
    for trial in 0..8 {
        let mut sender = RawConn::connect(server.addr).await;
        let sender_id = sender.register(&format!("burster{trial}")).await.user_id;
        let mut reader = RawConn::connect(server.addr).await;
        let reader_id = reader.register(&format!("reader{trial}")).await.user_id;
        let conversation = ConversationId::direct(sender_id, reader_id).unwrap().raw();
        let reading = tokio::spawn(read_fast(reader, conversation, 64, 30));
        let target = pb::send_request::Target::ToUser(reader_id);
        let sent = pipeline_sends(
            &mut sender,
            (0..64).map(|i| big_send(target, format!("t{trial}-{i}"), 30_000)),
        )
        .await;
        assert_eq!(
            sent,
            (64, 0),
            "trial {trial}: every send of the burst is acked"
        );
        let seen = reading.await.unwrap();
        assert_eq!(
            seen.cut, None,
            "trial {trial}: the fast reader was cut off: {seen:?}"
        );
        assert_eq!(
            seen.seqs,
            (1..=64).collect::<BTreeSet<u64>>(),
            "trial {trial}: missing messages ({} pushes, {} hints)",
            seen.pushes,
            seen.hints
        );
    }
    assert_eq!(server.node().net_stats().slow_consumers, 0);
}

/// The same in a group: one member pipelining such messages must not cut
/// any other member's fast reader.
#[tokio::test]
async fn a_group_burst_never_disconnects_the_other_members() {
    const BURST: u64 = 64;
    let server = TestServer::start().await;
    for trial in 0..4 {
        let mut sender = RawConn::connect(server.addr).await;
        sender.register(&format!("gburster{trial}")).await;
        let mut readers = Vec::new();
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut r = RawConn::connect(server.addr).await;
            ids.push(r.register(&format!("member{trial}x{i}")).await.user_id);
            readers.push(r);
        }
        let group = match sender
            .call(Body::CreateGroup(pb::CreateGroupRequest {
                name: "burst".into(),
                member_ids: ids.clone(),
            }))
            .await
        {
            Body::Group(g) => g,
            other => panic!("{other:?}"),
        };
        // Seq 1 is the creation notice; the burst follows.
        let reading: Vec<_> = readers
            .into_iter()
            .map(|r| tokio::spawn(read_fast(r, group.conversation_id, BURST as usize + 1, 30)))
            .collect();
        let target = pb::send_request::Target::ConversationId(group.conversation_id);
        let sent = pipeline_sends(
            &mut sender,
            (0..BURST).map(|i| big_send(target, format!("g{trial}-{i}"), 30_000)),
        )
        .await;
        assert_eq!(
            sent,
            (BURST as usize, 0),
            "trial {trial}: every send is acked"
        );
        for (i, r) in reading.into_iter().enumerate() {
            let seen = r.await.unwrap();
            assert_eq!(seen.cut, None, "trial {trial}: member {i} was cut off");
            assert_eq!(
                seen.seqs,
                (1..=BURST + 1).collect::<BTreeSet<u64>>(),
                "trial {trial}: member {i}"
            );
        }
    }
    assert_eq!(server.node().net_stats().slow_consumers, 0);
}

/// A reader that stops reading costs the server at most its output limit
/// in pushes, however much is sent to it; when it reads again it gets a
/// hint, and after its sync it has everything, once.
#[tokio::test]
async fn a_stopped_reader_costs_bounded_memory_and_catches_up_after_the_hint() {
    const LIMIT: usize = 64 * 1024;
    const FLOOD: usize = 300;
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 16 * 1024;
        c.max_outbound_bytes = LIMIT;
        c.send_buffer_bytes = 4096;
    })
    .await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let mut bob = RawConn::connect_small_buffer(server.addr).await;
    let bob_id = bob.register("bob").await.user_id;
    let conversation = ConversationId::direct(alice.user_id(), bob_id)
        .unwrap()
        .raw();
    let payload = "y".repeat(4000);
    let mut peak = 0;
    for i in 0..FLOOD {
        alice
            .send_text(Target::User(bob_id), format!("{i:04} {payload}"))
            .await
            .unwrap();
        peak = peak.max(server.node().net_stats().output_bytes);
    }
    let stats = server.node().net_stats();
    assert!(stats.pushes_shed > 0, "nothing was shed: {stats:?}");
    // Bob's queue holds at most the limit (plus the reply it had queued).
    assert!(
        peak <= (LIMIT + 16 * 1024) as u64,
        "queued output reached {peak} bytes for a reader that does not read"
    );
    // Bob reads again: what was queued, then the hint, then his sync.
    let seen = read_fast(bob, conversation, FLOOD, 20).await;
    assert_eq!(seen.cut, None);
    assert!(seen.hints >= 1, "no hint came: {seen:?}");
    assert!(seen.pushes < FLOOD, "every push was queued after all");
    assert_eq!(seen.seqs, (1..=FLOOD as u64).collect::<BTreeSet<u64>>());
    assert_eq!(server.node().net_stats().slow_consumers, 0);
}

/// Only a reader that takes nothing at all for --slow-consumer-secs is
/// disconnected, and others are served meanwhile.
#[tokio::test]
async fn slow_reader_is_disconnected_without_hurting_others() {
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 16 * 1024;
        c.max_outbound_bytes = 32 * 1024;
        c.send_buffer_bytes = 4096;
        c.slow_consumer_secs = 2;
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

/// One user pipelining big sends on several connections at once takes at
/// most its share of the node's pending sends: past it that user's sends
/// are refused, while another user's go through, and every acknowledged
/// send is stored once.
#[tokio::test]
async fn one_user_cannot_take_more_than_its_share_of_pending_sends() {
    let server = TestServer::start_with(|c| c.max_user_pending_bytes = 256 * 1024).await;
    let mut flooders = Vec::new();
    let mut hog_id = 0;
    for i in 0..2 {
        let mut conn = RawConn::connect(server.addr).await;
        if i == 0 {
            hog_id = conn.register("hog").await.user_id;
        } else {
            conn.call(Body::Login(pb::LoginRequest {
                username: "hog".into(),
                password: im_tests::PASSWORD.into(),
                device_name: String::new(),
            }))
            .await;
        }
        flooders.push(conn);
    }
    let mut other = RawConn::connect(server.addr).await;
    let other_id = other.register("modest").await.user_id;
    let target = pb::send_request::Target::ToUser(other_id);
    // Both of hog's connections write 64 sends of 30 KB at once.
    let mut flood = Vec::new();
    for (c, mut conn) in flooders.into_iter().enumerate() {
        flood.push(tokio::spawn(async move {
            let sends = (0..64).map(|i| big_send(target, format!("h{c}-{i}"), 30_000));
            pipeline_sends(&mut conn, sends).await
        }));
    }
    let to_hog = pb::send_request::Target::ToUser(hog_id);
    let mine = other.call(big_send(to_hog, "mine".into(), 100)).await;
    assert!(
        matches!(mine, Body::SendAck(_)),
        "the other user was refused: {mine:?}"
    );
    let (mut acked, mut refused) = (0, 0);
    for f in flood {
        let (a, r) = f.await.unwrap();
        acked += a;
        refused += r;
    }
    assert!(refused > 0, "hog was never held back ({acked} acked)");
    let Body::SendAck(mine) = mine else {
        unreachable!()
    };
    // Everything acked (and "mine") is stored, once; nothing refused is.
    let mut stored = BTreeSet::new();
    let mut before = 0;
    loop {
        let page = other
            .call(Body::History(pb::HistoryRequest {
                conversation_id: mine.conversation_id,
                before_seq: before,
                limit: 200,
            }))
            .await;
        let Body::HistoryResponse(page) = page else {
            panic!("{page:?}");
        };
        for m in &page.messages {
            assert!(
                stored.insert(m.client_msg_id.clone()),
                "{} twice",
                m.client_msg_id
            );
        }
        match page.messages.first() {
            Some(first) if page.has_more => before = first.seq,
            _ => break,
        }
    }
    assert_eq!(stored.len(), acked + 1);
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

/// An SDK application that stops taking events while a flood arrives: the
/// server skips pushes, the SDK syncs after the hint, and the application
/// sees every message once, in order, on the same connection.
#[tokio::test]
async fn an_sdk_client_that_falls_behind_catches_up_without_reconnecting() {
    const FLOOD: usize = 2000;
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 16 * 1024;
        c.max_outbound_bytes = 64 * 1024;
        c.send_buffer_bytes = 4096;
    })
    .await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, mut events) = sdk::connect(
        sdk::config(server.addr).with_event_buffer(4),
        im_client::Credentials::Register {
            username: "bob".into(),
            password: im_tests::PASSWORD.into(),
        },
    )
    .await;
    let payload = "z".repeat(4000);
    for i in 0..FLOOD {
        alice
            .send_text(Target::User(bob.user_id()), format!("{i:05} {payload}"))
            .await
            .unwrap();
    }
    assert!(
        server.node().net_stats().pushes_shed > 0,
        "the flood never filled bob's queue"
    );
    // Bob's application reads again.
    let mut got: Vec<usize> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < FLOOD {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(im_client::Event::Message(m))) => got.push(text_of(&m)[..5].parse().unwrap()),
            Ok(Some(im_client::Event::Disconnected { reason })) => {
                panic!("bob was disconnected: {reason}")
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("only {} of {FLOOD} messages", got.len()),
        }
    }
    assert_eq!(got, (0..FLOOD).collect::<Vec<usize>>());
    assert!(server.node().net_stats().sync_hints > 0);
    assert_eq!(server.node().net_stats().slow_consumers, 0);
    no_message(&mut events, 300).await;
}
