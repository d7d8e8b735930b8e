//! Messaging end to end: live delivery to every device, groups, offline
//! catch-up, resend deduplication, ordering, permissions, history,
//! conversation list, receipts and presence.

use std::collections::HashMap;

use futures::future::join_all;
use im_client::{ClientError, Event, Target};
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{ConversationId, ErrorCode};
use im_tests::sdk::{self, is_notice, messages, next_message, no_message, text_of};
use im_tests::{RawConn, TestServer};

fn text(s: &str) -> pb::Content {
    pb::Content {
        kind: Some(pb::content::Kind::Text(pb::Text { text: s.into() })),
    }
}

#[tokio::test]
async fn direct_message_reaches_every_device_of_both_users() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = sdk::register(server.addr, "alice").await;
    let (_alice2, mut alice2_events) = sdk::login(server.addr, "alice").await;
    let (bob, mut bob_events) = sdk::register(server.addr, "bob").await;
    let (_bob2, mut bob2_events) = sdk::login(server.addr, "bob").await;

    let ack = alice
        .send_text(Target::User(bob.user_id()), "hello bob")
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    assert_eq!(
        ack.conversation_id,
        ConversationId::direct(alice.user_id(), bob.user_id())
            .unwrap()
            .raw()
    );
    for events in [&mut bob_events, &mut bob2_events, &mut alice2_events] {
        let m = next_message(events, 5).await;
        assert_eq!(
            (m.seq, m.sender_id, text_of(&m)),
            (1, alice.user_id(), "hello bob")
        );
        assert_eq!(m.message_id, ack.message_id);
    }
    // The sending device already has the ack and gets no push.
    no_message(&mut alice_events, 300).await;

    // Media references travel as sent.
    let image = pb::Content {
        kind: Some(pb::content::Kind::Image(pb::Media {
            url: "https://cdn.example/cat.jpg".into(),
            size: 12345,
            mime_type: "image/jpeg".into(),
            name: "cat.jpg".into(),
            thumbnail: Some(pb::Thumbnail {
                url: "https://cdn.example/cat-small.jpg".into(),
                width: 64,
                height: 48,
            }),
        })),
    };
    bob.send(Target::User(alice.user_id()), image.clone())
        .await
        .unwrap();
    let m = next_message(&mut alice_events, 5).await;
    assert_eq!(m.seq, 2);
    assert_eq!(m.content, Some(image));
}

#[tokio::test]
async fn group_messages_fan_out_to_every_member() {
    let server = TestServer::start().await;
    let mut clients = Vec::new();
    for name in ["owner", "member1", "member2", "member3", "member4"] {
        clients.push(sdk::register(server.addr, name).await);
    }
    let ids: Vec<u64> = clients.iter().map(|(c, _)| c.user_id()).collect();
    let (outsider, mut outsider_events) = sdk::register(server.addr, "outsider").await;
    let group = clients[0]
        .0
        .create_group("friends", ids[1..].to_vec())
        .await
        .unwrap();
    assert_eq!(group.member_count, 5);
    assert_eq!(group.owner_id, ids[0]);

    clients[2]
        .0
        .send_text(Target::Group(group.group_id), "hi all")
        .await
        .unwrap();
    for (i, (_, events)) in clients.iter_mut().enumerate() {
        // Everyone sees the creation notice first.
        let notice = next_message(events, 5).await;
        assert!(is_notice(&notice), "member {i} got {notice:?}");
        assert_eq!(notice.seq, 1);
        if i != 2 {
            let m = next_message(events, 5).await;
            assert_eq!((m.seq, text_of(&m), m.sender_id), (2, "hi all", ids[2]));
        }
    }
    no_message(&mut outsider_events, 300).await;
    drop(outsider);
}

#[tokio::test]
async fn offline_user_catches_up_on_connect() {
    let server = TestServer::start().await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, bob_events) = sdk::register(server.addr, "bob").await;
    let bob_id = bob.user_id();
    bob.close().await;
    drop(bob_events);

    let (carol, _c) = sdk::register(server.addr, "carol").await;
    let group = carol.create_group("g", vec![bob_id]).await.unwrap();
    for i in 1..=30 {
        alice
            .send_text(Target::User(bob_id), format!("dm {i}"))
            .await
            .unwrap();
    }
    carol
        .send_text(Target::Group(group.group_id), "group hello")
        .await
        .unwrap();

    let (_bob, mut events) = sdk::login(server.addr, "bob").await;
    let got = messages(&mut events, 32, 10).await;
    let mut by_conv: HashMap<u64, Vec<u64>> = HashMap::new();
    for m in &got {
        by_conv.entry(m.conversation_id).or_default().push(m.seq);
    }
    let direct = ConversationId::direct(alice.user_id(), bob_id)
        .unwrap()
        .raw();
    assert_eq!(by_conv[&direct], (1..=30).collect::<Vec<_>>());
    let group_conv = ConversationId::group(group.group_id).unwrap().raw();
    assert_eq!(by_conv[&group_conv], vec![1, 2]);
    no_message(&mut events, 300).await;
}

#[tokio::test]
async fn resend_with_the_same_id_returns_the_original_ack() {
    let server = TestServer::start().await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, mut bob_events) = sdk::register(server.addr, "bob").await;
    let target = Target::User(bob.user_id());
    let first = alice
        .send_with_id(target, "msg-1", text("once"))
        .await
        .unwrap();
    let again = alice
        .send_with_id(target, "msg-1", text("once"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!((again.message_id, again.seq), (first.message_id, first.seq));
    let next = alice
        .send_with_id(target, "msg-2", text("twice"))
        .await
        .unwrap();
    assert_eq!(next.seq, first.seq + 1);

    let got = messages(&mut bob_events, 2, 5).await;
    assert_eq!(
        got.iter().map(text_of).collect::<Vec<_>>(),
        ["once", "twice"]
    );
    no_message(&mut bob_events, 300).await;
    let history = bob.history(first.conversation_id, 0, 50).await.unwrap();
    assert_eq!(history.messages.len(), 2);
}

/// The protocol's promise: a resend flagged as one gets the original ack
/// at any later time, long after the dedup window (one second here). While
/// the store cannot tell yet (the pipeline's worker behind), the answer is
/// OVERLOADED, never a second copy.
#[tokio::test]
async fn a_resend_after_the_dedup_window_returns_the_original_ack() {
    let server = TestServer::start_with(|c| c.dedup_window_secs = 1).await;
    let mut alice = RawConn::connect(server.addr).await;
    alice.register("alice").await;
    let mut bob = RawConn::connect(server.addr).await;
    let bob_id = bob.register("bob").await.user_id;
    let send = |resend: bool| {
        Body::Send(pb::SendRequest {
            target: Some(pb::send_request::Target::ToUser(bob_id)),
            client_msg_id: "late-1".into(),
            content: Some(text("only once")),
            resend,
        })
    };
    let first = alice.call(send(false)).await;
    let Body::SendAck(first) = first else {
        panic!("first attempt not acked: {first:?}");
    };
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let again = loop {
        match alice.call(send(true)).await {
            Body::SendAck(ack) => break ack,
            Body::Error(e) if e.code == ErrorCode::Overloaded as i32 => {
                assert!(std::time::Instant::now() < deadline, "still OVERLOADED");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => panic!("late resend answered {other:?}"),
        }
    };
    assert!(again.duplicate);
    assert_eq!(
        (again.message_id, again.seq, again.server_time_ms),
        (first.message_id, first.seq, first.server_time_ms)
    );
    // The original may never have been pushed (its ack lost, or refused
    // unconfirmed by replicas): the recipient is told to sync.
    bob.push_where(5, |b| match b {
        Body::SyncHint(h) if h.conversation_ids == [first.conversation_id] => Some(()),
        _ => None,
    })
    .await;
    let history = bob
        .call(Body::History(pb::HistoryRequest {
            conversation_id: first.conversation_id,
            before_seq: 0,
            limit: 10,
        }))
        .await;
    let Body::HistoryResponse(history) = history else {
        panic!("history: {history:?}");
    };
    assert_eq!(history.messages.len(), 1, "stored twice");
}

#[tokio::test]
async fn concurrent_senders_see_one_dense_order() {
    let server = TestServer::start().await;
    let names = ["sender0", "sender1", "sender2", "sender3"];
    let mut clients = Vec::new();
    for name in names {
        clients.push(sdk::register(server.addr, name).await);
    }
    let ids: Vec<u64> = clients.iter().map(|(c, _)| c.user_id()).collect();
    let group = clients[0]
        .0
        .create_group("race", ids[1..].to_vec())
        .await
        .unwrap();
    const PER_SENDER: usize = 50;
    let sends = clients.iter().enumerate().map(|(i, (client, _))| {
        let client = client.clone();
        async move {
            let mut seqs = Vec::new();
            for n in 0..PER_SENDER {
                let ack = client
                    .send_text(Target::Group(group.group_id), format!("{i}:{n}"))
                    .await
                    .unwrap();
                seqs.push(ack.seq);
            }
            seqs
        }
    });
    let acked: Vec<Vec<u64>> = join_all(sends).await;
    let mut all: Vec<u64> = acked.concat();
    all.sort_unstable();
    // Seq 1 is the creation notice; the sends hold 2..=201 with no gap.
    assert_eq!(all, (2..=(1 + 4 * PER_SENDER as u64)).collect::<Vec<_>>());

    for (i, (_, events)) in clients.iter_mut().enumerate() {
        let total = 1 + 4 * PER_SENDER - PER_SENDER; // own messages are not pushed back
        let got = messages(events, total, 10).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "member {i} saw {seqs:?}"
        );
        // Each sender's messages arrive in the order they were sent.
        for &sender in &ids {
            let mine: Vec<usize> = got
                .iter()
                .filter(|m| m.sender_id == sender)
                .map(|m| text_of(m).split(':').nth(1).unwrap().parse().unwrap())
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
        }
    }
}

#[tokio::test]
async fn pipelined_sends_get_seqs_in_request_order() {
    let server = TestServer::start().await;
    let mut bob = RawConn::connect(server.addr).await;
    let bob_id = bob.register("bob").await.user_id;
    let mut alice = RawConn::connect(server.addr).await;
    alice.register("alice").await;
    let mut ids = Vec::new();
    for n in 0..200 {
        let id = alice
            .send(Body::Send(pb::SendRequest {
                target: Some(pb::send_request::Target::ToUser(bob_id)),
                client_msg_id: format!("p{n}"),
                content: Some(text(&n.to_string())),
                resend: false,
            }))
            .await;
        ids.push(id);
    }
    let mut seq_of = HashMap::new();
    while seq_of.len() < ids.len() {
        let frame = alice.recv().await;
        match frame.body {
            Some(Body::SendAck(ack)) => {
                seq_of.insert(frame.request_id, ack.seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let seqs: Vec<u64> = ids.iter().map(|id| seq_of[id]).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    // Bob's pushes arrive in seq order too.
    for expected in 1..=200u64 {
        match bob.recv().await.body {
            Some(Body::Message(m)) => assert_eq!(m.seq, expected),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn code(e: ClientError) -> Option<ErrorCode> {
    e.code()
}

#[tokio::test]
async fn non_members_are_refused() {
    let server = TestServer::start().await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, _b) = sdk::register(server.addr, "bob").await;
    let (mallory, mut mallory_events) = sdk::register(server.addr, "mallory").await;
    let group = alice
        .create_group("private", vec![bob.user_id()])
        .await
        .unwrap();
    let conv = ConversationId::group(group.group_id).unwrap().raw();
    let direct = ConversationId::direct(alice.user_id(), bob.user_id())
        .unwrap()
        .raw();
    alice
        .send_text(Target::User(bob.user_id()), "secret")
        .await
        .unwrap();

    let forbidden = Some(ErrorCode::Forbidden);
    assert_eq!(
        code(
            mallory
                .send_text(Target::Group(group.group_id), "x")
                .await
                .unwrap_err()
        ),
        forbidden
    );
    assert_eq!(
        code(
            mallory
                .send_text(Target::Conversation(direct), "x")
                .await
                .unwrap_err()
        ),
        forbidden
    );
    assert_eq!(
        code(mallory.history(conv, 0, 10).await.unwrap_err()),
        forbidden
    );
    assert_eq!(
        code(mallory.history(direct, 0, 10).await.unwrap_err()),
        forbidden
    );
    assert_eq!(
        code(mallory.group_members(group.group_id).await.unwrap_err()),
        forbidden
    );
    assert_eq!(
        code(
            mallory
                .add_members(group.group_id, vec![mallory.user_id()])
                .await
                .unwrap_err()
        ),
        forbidden
    );
    // Only the owner removes.
    assert_eq!(
        code(
            bob.remove_members(group.group_id, vec![alice.user_id()])
                .await
                .unwrap_err()
        ),
        forbidden
    );
    // Sync simply skips conversations the caller is not in.
    let body = mallory
        .request(Body::Sync(pb::SyncRequest {
            cursors: vec![pb::ConvCursor {
                conversation_id: direct,
                seq: 0,
            }],
            limit: 10,
        }))
        .await
        .unwrap();
    assert!(matches!(body, Body::SyncResponse(r) if r.messages.is_empty()));
    assert_eq!(
        code(
            mallory
                .send_text(Target::User(999_999), "x")
                .await
                .unwrap_err()
        ),
        Some(ErrorCode::NotFound)
    );
    no_message(&mut mallory_events, 200).await;
}

#[tokio::test]
async fn group_membership_changes() {
    let server = TestServer::start().await;
    let (owner, mut owner_events) = sdk::register(server.addr, "owner").await;
    let (bob, mut bob_events) = sdk::register(server.addr, "bob").await;
    let (carol, mut carol_events) = sdk::register(server.addr, "carol").await;
    let group = owner.create_group("team", vec![]).await.unwrap();
    assert_eq!(next_message(&mut owner_events, 5).await.seq, 1);
    owner
        .send_text(Target::Group(group.group_id), "before bob")
        .await
        .unwrap();

    // Any member may add; the new member sees only what follows.
    let info = owner
        .add_members(group.group_id, vec![bob.user_id()])
        .await
        .unwrap();
    assert_eq!(info.member_count, 2);
    let added = next_message(&mut bob_events, 5).await;
    assert!(is_notice(&added));
    assert_eq!(added.seq, 3);
    let history = bob.history(added.conversation_id, 0, 50).await.unwrap();
    assert_eq!(
        history.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3]
    );
    bob.add_members(group.group_id, vec![carol.user_id()])
        .await
        .unwrap();
    assert!(is_notice(&next_message(&mut carol_events, 5).await));

    let members = carol.group_members(group.group_id).await.unwrap();
    let names: Vec<&str> = members.iter().map(|u| u.username.as_str()).collect();
    assert_eq!(names, ["owner", "bob", "carol"]);
    assert_eq!(carol.groups().await.unwrap().len(), 1);

    // Removal: the removed member is told once, then shut out.
    owner
        .remove_members(group.group_id, vec![carol.user_id()])
        .await
        .unwrap();
    let removed = next_message(&mut carol_events, 5).await;
    match removed.content.and_then(|c| c.kind) {
        Some(pb::content::Kind::Notice(n)) => {
            assert_eq!(n.kind, pb::group_notice::Kind::MembersRemoved as i32);
            assert_eq!(n.user_ids, vec![carol.user_id()]);
        }
        other => panic!("expected a notice, got {other:?}"),
    }
    assert_eq!(
        carol
            .send_text(Target::Group(group.group_id), "x")
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::Forbidden)
    );
    assert!(carol.groups().await.unwrap().is_empty());

    // The owner leaves: ownership passes to bob, who may now remove.
    owner.leave_group(group.group_id).await.unwrap();
    let info = bob
        .add_members(group.group_id, vec![carol.user_id()])
        .await
        .unwrap();
    assert_eq!(info.owner_id, bob.user_id());
    bob.remove_members(group.group_id, vec![carol.user_id()])
        .await
        .unwrap();
}

#[tokio::test]
async fn history_pages_backwards() {
    let server = TestServer::start().await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, _b) = sdk::register(server.addr, "bob").await;
    let mut conv = 0;
    for i in 1..=25 {
        conv = alice
            .send_text(Target::User(bob.user_id()), format!("m{i}"))
            .await
            .unwrap()
            .conversation_id;
    }
    let mut seen = Vec::new();
    let mut before = 0;
    loop {
        let page = bob.history(conv, before, 10).await.unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]));
        seen.splice(0..0, seqs.iter().copied());
        before = seqs[0];
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
}

#[tokio::test]
async fn conversation_list_unread_counts_and_receipts() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = sdk::register(server.addr, "alice").await;
    let (bob, _b) = sdk::register(server.addr, "bob").await;
    let (_bob2, mut bob2_events) = sdk::login(server.addr, "bob").await;
    let mut conv = 0;
    for i in 1..=3 {
        conv = alice
            .send_text(Target::User(bob.user_id()), format!("m{i}"))
            .await
            .unwrap()
            .conversation_id;
    }
    let list = bob.conversations().await.unwrap();
    let summary = list
        .iter()
        .find(|c| c.conversation_id == conv)
        .expect("listed");
    assert_eq!(summary.title, "alice");
    assert_eq!(summary.peer_id, alice.user_id());
    assert_eq!(summary.last_seq, 3);
    assert_eq!(summary.unread_count, 3);
    assert_eq!(text_of(summary.last_message.as_ref().unwrap()), "m3");
    // The sender has nothing unread in its own conversation.
    let mine = alice.conversations().await.unwrap();
    assert_eq!(mine[0].unread_count, 0);

    bob.mark_read(conv, 2).await.unwrap();
    let receipt = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), alice_events.next()).await {
            Ok(Some(Event::Receipt(r))) if r.kind == pb::ReceiptKind::Read as i32 => break r,
            Ok(Some(_)) => {}
            other => panic!("no read receipt: {other:?}"),
        }
    };
    assert_eq!(
        (receipt.user_id, receipt.seq, receipt.conversation_id),
        (bob.user_id(), 2, conv)
    );
    // Bob's other device learns it too.
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), bob2_events.next()).await {
            Ok(Some(Event::Receipt(r))) if r.kind == pb::ReceiptKind::Read as i32 => {
                assert_eq!(r.seq, 2);
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no receipt on the other device: {other:?}"),
        }
    }
    let list = bob.conversations().await.unwrap();
    assert_eq!(list[0].unread_count, 1);
    assert_eq!(list[0].read_seq, 2);
    // Cursors never move backwards nor past the end.
    bob.mark_read(conv, 1).await.unwrap();
    bob.mark_read(conv, 99).await.unwrap();
    let list = bob.conversations().await.unwrap();
    assert_eq!((list[0].read_seq, list[0].unread_count), (3, 0));
}

#[tokio::test]
async fn presence_snapshot_and_changes() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = sdk::register(server.addr, "alice").await;
    let (bob, _b) = sdk::register(server.addr, "bob").await;
    let bob_id = bob.user_id();
    let snapshot = alice.subscribe_presence(vec![bob_id]).await.unwrap();
    assert_eq!(snapshot.len(), 1);
    assert!(snapshot[0].online);

    // A second device changes nothing; the last one leaving does.
    let (bob2, _b2) = sdk::login(server.addr, "bob").await;
    bob2.close().await;
    bob.close().await;
    let change = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), alice_events.next()).await {
            Ok(Some(Event::Presence(p))) if !p.online => break p,
            Ok(Some(Event::Presence(p))) => assert!(p.online, "{p:?}"),
            Ok(Some(_)) => {}
            other => panic!("no presence change: {other:?}"),
        }
    };
    assert_eq!(change.user_id, bob_id);
    let (_bob, _b) = sdk::login(server.addr, "bob").await;
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), alice_events.next()).await {
            Ok(Some(Event::Presence(p))) if p.online => break,
            Ok(Some(_)) => {}
            other => panic!("no online change: {other:?}"),
        }
    }
}

#[tokio::test]
async fn pages_are_split_to_fit_the_frame_size() {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 4096).await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, _b) = sdk::register(server.addr, "bob").await;
    let big = "y".repeat(3000);
    let mut conv = 0;
    for i in 0..12 {
        conv = alice
            .send_text(Target::User(bob.user_id()), format!("{i:02}{big}"))
            .await
            .unwrap()
            .conversation_id;
    }
    // A message too large for a frame (with room for its envelope) is refused.
    let huge = alice
        .send_text(Target::User(bob.user_id()), "z".repeat(3500))
        .await;
    assert_eq!(huge.unwrap_err().code(), Some(ErrorCode::InvalidArgument));

    // History asked for 50 at a time comes in frame-sized pages, newest first.
    let page = bob.history(conv, 0, 50).await.unwrap();
    assert!(page.has_more);
    assert!(page.messages.len() < 12);
    assert_eq!(page.messages.last().unwrap().seq, 12);
    // Catch-up of a new device gets everything despite the small frames.
    let (_bob2, mut events) = sdk::login(server.addr, "bob").await;
    let got = messages(&mut events, 12, 10).await;
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );

    // Member lists page too: 150 members with long names exceed 4 KiB.
    let mut ids = Vec::new();
    for i in 0..150 {
        let mut conn = RawConn::connect(server.addr).await;
        ids.push(
            conn.register(&format!("member-with-a-long-name-{i:05}"))
                .await
                .user_id,
        );
    }
    let group = alice.create_group("big", ids.clone()).await.unwrap();
    assert_eq!(group.member_count, 151);
    let first = alice
        .request(Body::ListMembers(pb::ListMembersRequest {
            group_id: group.group_id,
            offset: 0,
            limit: 0,
        }))
        .await
        .unwrap();
    match first {
        Body::MemberList(list) => assert!(list.has_more && list.members.len() < 151),
        other => panic!("{other:?}"),
    }
    let members = alice.group_members(group.group_id).await.unwrap();
    assert_eq!(members.len(), 151);
    assert_eq!(members[0].user_id, alice.user_id());
    assert_eq!(
        members
            .iter()
            .skip(1)
            .map(|u| u.user_id)
            .collect::<Vec<_>>(),
        ids
    );
}

#[tokio::test]
async fn catch_up_racing_live_pushes_shows_each_message_once_in_order() {
    let server = TestServer::start().await;
    let (alice, _a) = sdk::register(server.addr, "alice").await;
    let (bob, bob_events) = sdk::register(server.addr, "bob").await;
    let bob_id = bob.user_id();
    bob.close().await;
    drop(bob_events);

    const TOTAL: u64 = 600;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for i in 1..=TOTAL {
                alice
                    .send_text(Target::User(bob_id), format!("n{i}"))
                    .await
                    .unwrap();
            }
        })
    };
    // Bob's devices come online while messages are still flowing: their
    // catch-up sync races the live pushes.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (_bob1, mut events1) = sdk::login(server.addr, "bob").await;
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (_bob2, mut events2) = sdk::login(server.addr, "bob").await;
    sender.await.unwrap();
    for events in [&mut events1, &mut events2] {
        let got = messages(events, TOTAL as usize, 20).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=TOTAL).collect::<Vec<_>>());
        no_message(events, 300).await;
    }
}

#[tokio::test]
async fn delivery_and_group_read_receipts_reach_the_senders() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = sdk::register(server.addr, "alice").await;
    let (bob, mut bob_events) = sdk::register(server.addr, "bob").await;
    let (carol, mut carol_events) = sdk::register(server.addr, "carol").await;

    // Bob's SDK acknowledges delivery by itself; alice hears of it.
    let ack = alice
        .send_text(Target::User(bob.user_id()), "did you get this?")
        .await
        .unwrap();
    next_message(&mut bob_events, 5).await;
    let delivered = receipt(&mut alice_events, pb::ReceiptKind::Delivered).await;
    assert_eq!((delivered.user_id, delivered.seq), (bob.user_id(), ack.seq));

    // In a group, a read receipt goes to the senders of what it covers.
    let group = alice
        .create_group("readers", vec![bob.user_id(), carol.user_id()])
        .await
        .unwrap();
    let conv = ConversationId::group(group.group_id).unwrap().raw();
    alice
        .send_text(Target::Group(group.group_id), "from alice")
        .await
        .unwrap();
    let last = bob
        .send_text(Target::Group(group.group_id), "from bob")
        .await
        .unwrap();
    let got = messages(&mut carol_events, 3, 5).await;
    assert_eq!(got.last().unwrap().seq, last.seq);
    carol.mark_read(conv, last.seq).await.unwrap();
    for events in [&mut alice_events, &mut bob_events] {
        let read = receipt(events, pb::ReceiptKind::Read).await;
        assert_eq!(
            (read.conversation_id, read.user_id, read.seq),
            (conv, carol.user_id(), last.seq)
        );
    }
}

async fn receipt(events: &mut im_client::Events, kind: pb::ReceiptKind) -> pb::Receipt {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Event::Receipt(r))) if r.kind == kind as i32 => return r,
            Ok(Some(_)) => {}
            other => panic!("no {kind:?} receipt: {other:?}"),
        }
    }
}
