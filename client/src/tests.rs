//! Tests of the whole client against a scripted fake server: a TCP listener
//! on `127.0.0.1:0` speaking the real framing, whose every reply is written
//! out by the test, so each test states exactly what the server does and
//! checks what the client sends and emits.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use im_proto::pb::{self, frame::Body};
use im_proto::{ConversationId, ErrorCode, Frame, FrameCodec};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::codec::Framed;

use crate::{Client, ClientConfig, ClientError, Credentials, Event, Events, Target};

/// Upper bound for anything a test waits for; only reached on failure.
const WAIT: Duration = Duration::from_secs(5);
const ALICE: u64 = 1;
const BOB: u64 = 2;

fn conv_ab() -> u64 {
    ConversationId::direct(ALICE, BOB).unwrap().raw()
}

fn login() -> Credentials {
    Credentials::Login {
        username: "alice".into(),
        password: "password1".into(),
    }
}

fn config(server: &FakeServer) -> ClientConfig {
    ClientConfig::new(server.addr.clone())
        .with_reconnect(Duration::from_millis(10), Duration::from_millis(50))
        .with_request_timeout(Duration::from_secs(2))
        .with_auto_ack(false)
}

fn auth_ok(token: &str) -> pb::AuthOk {
    pb::AuthOk {
        user_id: ALICE,
        username: "alice".into(),
        token: token.into(),
        token_expires_at_ms: im_proto::now_ms() + 3_600_000,
        heartbeat_interval_ms: 10_000,
        heartbeat_timeout_ms: 30_000,
        server_time_ms: im_proto::now_ms(),
        max_frame_bytes: 64 * 1024,
        session_id: 1,
    }
}

fn text_message(conv: u64, seq: u64, sender: u64) -> pb::Message {
    pb::Message {
        conversation_id: conv,
        seq,
        message_id: conv.wrapping_mul(1000) + seq,
        sender_id: sender,
        client_msg_id: format!("m{seq}"),
        server_time_ms: 1_700_000_000_000 + seq as i64,
        content: Some(pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text {
                text: format!("message {seq}"),
            })),
        }),
    }
}

/// What the fake server has stored: conversation → messages with seq 1..
#[derive(Default)]
struct Store {
    convs: BTreeMap<u64, Vec<pb::Message>>,
}

impl Store {
    fn add(&mut self, conv: u64, sender: u64) -> pb::Message {
        let messages = self.convs.entry(conv).or_default();
        let m = text_message(conv, messages.len() as u64 + 1, sender);
        messages.push(m.clone());
        m
    }

    fn list(&self) -> pb::ConversationList {
        pb::ConversationList {
            conversations: self
                .convs
                .iter()
                .map(|(&id, ms)| pb::ConversationSummary {
                    conversation_id: id,
                    last_seq: ms.len() as u64,
                    last_message: ms.last().cloned(),
                    ..Default::default()
                })
                .collect(),
            has_more: false,
        }
    }

    /// Answers a sync like the server: ascending by (conversation, seq),
    /// at most `limit` in all.
    fn sync(&self, request: &pb::SyncRequest) -> pb::SyncResponse {
        let mut cursors = request.cursors.clone();
        cursors.sort_by_key(|c| c.conversation_id);
        let mut all = Vec::new();
        for c in cursors {
            if let Some(ms) = self.convs.get(&c.conversation_id) {
                all.extend(ms.iter().filter(|m| m.seq > c.seq).cloned());
            }
        }
        let limit = request.limit.clamp(1, 500) as usize;
        let has_more = all.len() > limit;
        all.truncate(limit);
        pb::SyncResponse {
            messages: all,
            has_more,
            expired: Vec::new(),
        }
    }
}

struct FakeServer {
    listener: TcpListener,
    addr: String,
}

impl FakeServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        FakeServer { listener, addr }
    }

    async fn accept(&self) -> FakeConn {
        let (stream, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("client did not connect")
            .unwrap();
        FakeConn {
            framed: Framed::new(stream, FrameCodec::default()),
            pings: 0,
        }
    }

    /// Accepts a connection and answers its first request, which must be a
    /// login, with `AuthOk`.
    async fn accept_login(&self, token: &str) -> FakeConn {
        let mut conn = self.accept().await;
        let (rid, body) = conn.recv().await;
        assert!(
            matches!(body, Body::Login(ref l) if l.username == "alice"),
            "{body:?}"
        );
        conn.reply(rid, Body::AuthOk(auth_ok(token))).await;
        conn
    }
}

struct FakeConn {
    framed: Framed<TcpStream, FrameCodec>,
    pings: usize,
}

impl FakeConn {
    /// The next frame as it comes, or `None` when the client closed.
    async fn recv_raw(&mut self) -> Option<Frame> {
        timeout(WAIT, self.framed.next())
            .await
            .expect("nothing from the client")
            .map(|f| f.expect("client sent a bad frame"))
    }

    /// The next request that is not a ping (pings are answered).
    async fn recv(&mut self) -> (u64, Body) {
        loop {
            let frame = self.recv_raw().await.expect("client closed the connection");
            assert_ne!(frame.request_id, 0, "requests need a request id");
            match frame.body.expect("empty frame") {
                Body::Ping(_) => {
                    self.pings += 1;
                    let pong = Body::Pong(pb::Pong { server_time_ms: 0 });
                    self.reply(frame.request_id, pong).await;
                }
                body => return (frame.request_id, body),
            }
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.framed.send(frame).await.unwrap();
    }

    async fn reply(&mut self, request_id: u64, body: Body) {
        self.send(Frame::new(request_id, body)).await;
    }

    async fn push(&mut self, message: &pb::Message) {
        self.send(Frame::new(0, Body::Message(message.clone())))
            .await;
    }

    /// Expects `ListConversations` and answers it from `store`.
    async fn serve_list(&mut self, store: &Store) {
        let (rid, body) = self.recv().await;
        assert!(matches!(body, Body::ListConversations(_)), "{body:?}");
        self.reply(rid, Body::ConversationList(store.list())).await;
    }

    /// Expects a `SyncRequest`, answers it from `store` and returns it.
    async fn serve_sync(&mut self, store: &Store) -> pb::SyncRequest {
        let (rid, body) = self.recv().await;
        let Body::Sync(request) = body else {
            panic!("expected a sync, got {body:?}");
        };
        self.reply(rid, Body::SyncResponse(store.sync(&request)))
            .await;
        request
    }
}

/// Connects to `server` while it accepts the login.
async fn connect(server: &FakeServer, config: ClientConfig) -> (Client, Events, FakeConn) {
    let (client, conn) = tokio::join!(
        Client::connect(config, login()),
        server.accept_login("token-1")
    );
    let (client, events) = client.expect("connect failed");
    (client, events, conn)
}

async fn next_event(events: &mut Events) -> Event {
    timeout(WAIT, events.next())
        .await
        .expect("no event")
        .expect("event stream ended")
}

/// The next message event, skipping connection events.
async fn next_message(events: &mut Events) -> pb::Message {
    loop {
        match next_event(events).await {
            Event::Message(m) => return m,
            Event::Receipt(_) | Event::Presence(_) | Event::Stopped { .. } => {
                panic!("unexpected event")
            }
            _ => {}
        }
    }
}

/// Asserts that no message event arrives within a short while.
async fn assert_no_more_messages(events: &mut Events) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
        assert!(!matches!(event, Event::Message(_)), "extra {event:?}");
    }
}

fn cursor_list(request: &pb::SyncRequest) -> Vec<(u64, u64)> {
    request
        .cursors
        .iter()
        .map(|c| (c.conversation_id, c.seq))
        .collect()
}

#[tokio::test]
async fn login_then_replies_are_matched_by_request_id() {
    let server = FakeServer::start().await;
    let (client, mut events, mut conn) = connect(&server, config(&server)).await;
    assert_eq!(client.user_id(), ALICE);
    assert_eq!(client.session().token, "token-1");
    conn.serve_list(&Store::default()).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Connected {
            user_id: ALICE,
            reconnected: false
        }
    );
    assert_eq!(
        next_event(&mut events).await,
        Event::Resynced { messages: 0 }
    );
    client.wait_ready().await.unwrap();

    // Two pipelined requests, answered in the opposite order.
    let c1 = client.clone();
    let lookup = tokio::spawn(async move { c1.user_id_of("bob").await });
    let c2 = client.clone();
    let groups = tokio::spawn(async move { c2.groups().await });
    let first = conn.recv().await;
    let second = conn.recv().await;
    assert_ne!(first.0, second.0);
    for (rid, body) in [second, first] {
        let reply = match body {
            Body::LookupUsers(req) => {
                assert_eq!(req.usernames, ["bob"]);
                Body::UserList(pb::UserList {
                    users: vec![pb::User {
                        user_id: BOB,
                        username: "bob".into(),
                    }],
                })
            }
            Body::ListGroups(_) => Body::GroupList(pb::GroupList {
                has_more: false,
                groups: vec![pb::GroupInfo {
                    group_id: 7,
                    name: "friends".into(),
                    ..Default::default()
                }],
            }),
            other => panic!("unexpected {other:?}"),
        };
        conn.reply(rid, reply).await;
    }
    assert_eq!(lookup.await.unwrap().unwrap(), Some(BOB));
    let groups = groups.await.unwrap().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].name, "friends");

    // An error reply surfaces as a typed server error.
    let c3 = client.clone();
    let leave = tokio::spawn(async move { c3.leave_group(9).await });
    let (rid, body) = conn.recv().await;
    assert_eq!(
        body,
        Body::LeaveGroup(pb::LeaveGroupRequest { group_id: 9 })
    );
    conn.send(Frame::error(
        rid,
        ErrorCode::NotFound,
        "no such group",
        false,
    ))
    .await;
    let err = leave.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    client.close().await;
    assert!(
        conn.recv_raw().await.is_none(),
        "close must drop the connection"
    );
}

#[tokio::test]
async fn refused_credentials_fail_connect() {
    let server = FakeServer::start().await;
    let (result, ()) = tokio::join!(Client::connect(config(&server), login()), async {
        let mut conn = server.accept().await;
        let (rid, _) = conn.recv().await;
        conn.send(Frame::error(
            rid,
            ErrorCode::InvalidCredentials,
            "wrong password",
            false,
        ))
        .await;
    });
    match result {
        Err(ClientError::AuthFailed { code, .. }) => {
            assert_eq!(code, ErrorCode::InvalidCredentials)
        }
        other => panic!("expected AuthFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn duplicated_and_reordered_pushes_are_delivered_once_in_order() {
    let server = FakeServer::start().await;
    let (client, mut events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&Store::default()).await;
    client.wait_ready().await.unwrap();

    let c = conv_ab();
    let mut store = Store::default();
    let m: Vec<pb::Message> = (0..4).map(|_| store.add(c, BOB)).collect();
    conn.push(&m[0]).await;
    conn.push(&m[0]).await;
    conn.push(&m[2]).await;
    // Seq 3 after seq 1 is a gap: the client fetches it from its cursor.
    let (rid, body) = conn.recv().await;
    let Body::Sync(request) = body else {
        panic!("expected a gap fetch, got {body:?}");
    };
    assert_eq!(cursor_list(&request), [(c, 1)]);
    // The gap closes by pushes racing with the fetch...
    conn.push(&m[1]).await;
    conn.push(&m[3]).await;
    conn.push(&m[2]).await;
    // ...and the fetch result then repeats all of them.
    conn.reply(rid, Body::SyncResponse(store.sync(&request)))
        .await;

    let mut seqs = Vec::new();
    for _ in 0..4 {
        seqs.push(next_message(&mut events).await.seq);
    }
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_no_more_messages(&mut events).await;
    assert_eq!(client.cursors().get(&c), Some(&4));
}

#[tokio::test]
async fn catch_up_overlapping_pushes_delivers_each_message_once() {
    let server = FakeServer::start().await;
    let c = conv_ab();
    let mut store = Store::default();
    for _ in 0..3 {
        store.add(c, BOB);
    }
    let (_client, mut events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&store).await;
    let (rid, body) = conn.recv().await;
    let Body::Sync(request) = body else {
        panic!("expected the catch-up sync, got {body:?}");
    };
    assert_eq!(cursor_list(&request), [(c, 0)]);
    let reply = store.sync(&request);
    // Before the sync result: a new message pushed live, and an old one.
    let m4 = store.add(c, BOB);
    conn.push(&m4).await;
    conn.push(&reply.messages[1]).await;
    conn.reply(rid, Body::SyncResponse(reply)).await;
    // Seq 4 ahead of cursor 0 made the client fetch the gap as well.
    let gap = conn.serve_sync(&store).await;
    assert_eq!(cursor_list(&gap), [(c, 0)]);

    assert!(matches!(
        next_event(&mut events).await,
        Event::Connected { .. }
    ));
    for seq in 1..=4 {
        assert_eq!(
            next_event(&mut events).await,
            Event::Message(text_message(c, seq, BOB))
        );
    }
    assert_eq!(
        next_event(&mut events).await,
        Event::Resynced { messages: 3 }
    );
    assert_no_more_messages(&mut events).await;
}

#[tokio::test]
async fn catch_up_pages_and_chunks_cursors() {
    let server = FakeServer::start().await;
    let mut store = Store::default();
    let c = conv_ab();
    for _ in 0..7 {
        store.add(c, BOB);
    }
    // 300 more conversations with one message each, and one already known.
    for g in 1..=300 {
        store.add(ConversationId::group(g).unwrap().raw(), BOB);
    }
    let known = ConversationId::group(300).unwrap().raw();
    let mut cfg = config(&server);
    cfg.sync_page = 3;
    cfg.cursors.insert(known, 1);
    let (client, mut events, mut conn) = connect(&server, cfg).await;
    conn.serve_list(&store).await;

    // First chunk: 256 cursors, paged 3 messages at a time; conversations
    // caught up are dropped from the following requests.
    let first = conn.serve_sync(&store).await;
    assert_eq!(first.cursors.len(), 256);
    assert!(first.cursors.iter().all(|cur| cur.seq == 0));
    let second = conn.serve_sync(&store).await;
    assert_eq!(second.cursors[0].conversation_id, c);
    assert_eq!(second.cursors[0].seq, 3);
    assert_eq!(second.cursors.len(), 256);
    // Keep answering until the client is done; count the requests.
    let mut requests = 2;
    while !client.is_ready() {
        tokio::select! {
            _ = conn.serve_sync(&store) => requests += 1,
            _ = client.wait_ready() => {}
        }
    }
    assert!(requests < 200, "{requests} sync requests");
    let mut delivered = BTreeMap::new();
    loop {
        match next_event(&mut events).await {
            Event::Message(m) => {
                let last = delivered.insert(m.conversation_id, m.seq).unwrap_or(0);
                assert_eq!(m.seq, last + 1, "out of order in {}", m.conversation_id);
            }
            Event::Resynced { .. } => break,
            _ => {}
        }
    }
    assert_eq!(delivered.len(), 300, "the known conversation is skipped");
    assert_eq!(delivered.get(&c), Some(&7));
    assert!(!delivered.contains_key(&known));
    assert_eq!(client.cursors().len(), 301);
}

#[tokio::test]
async fn reconnect_resumes_syncs_and_resends_unacked_send() {
    let server = FakeServer::start().await;
    let (client, mut events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&Store::default()).await;
    client.wait_ready().await.unwrap();

    let sender = client.clone();
    let send = tokio::spawn(async move { sender.send_text(Target::User(BOB), "hello").await });
    let (_, body) = conn.recv().await;
    let Body::Send(first_try) = body else {
        panic!("expected a send, got {body:?}");
    };
    assert_eq!(
        first_try.target,
        Some(pb::send_request::Target::ToUser(BOB))
    );
    // The server stores a message from bob, then the connection dies
    // before the send is acknowledged.
    let c = conv_ab();
    let mut store = Store::default();
    store.add(c, BOB);
    drop(conn);

    let mut conn = server.accept().await;
    let (rid, body) = conn.recv().await;
    assert_eq!(
        body,
        Body::Resume(pb::ResumeRequest {
            token: "token-1".into()
        }),
        "reconnect must resume with the latest token"
    );
    conn.reply(rid, Body::AuthOk(auth_ok("token-2"))).await;
    conn.serve_list(&store).await;
    let sync = conn.serve_sync(&store).await;
    assert_eq!(cursor_list(&sync), [(c, 0)]);
    // Only after catching up is the send repeated, with the same id.
    let (rid, body) = conn.recv().await;
    let Body::Send(retry) = body else {
        panic!("expected the resent send, got {body:?}");
    };
    assert!(
        !first_try.resend && retry.resend,
        "a retry is flagged as a resend"
    );
    assert_eq!(
        retry,
        pb::SendRequest {
            resend: true,
            ..first_try
        }
    );
    let ack = pb::SendAck {
        message_id: 77,
        conversation_id: c,
        seq: 2,
        server_time_ms: 0,
        duplicate: false,
    };
    conn.reply(rid, Body::SendAck(ack)).await;
    assert_eq!(send.await.unwrap().unwrap(), ack);
    assert_eq!(client.session().token, "token-2");

    let mut seen = Vec::new();
    loop {
        let event = next_event(&mut events).await;
        let done = matches!(event, Event::Resynced { messages: 1 });
        seen.push(event);
        if done {
            break;
        }
    }
    assert!(
        matches!(
            &seen[..],
            [
                Event::Connected { reconnected: false, .. },
                Event::Resynced { messages: 0 },
                Event::Disconnected { .. },
                Event::Connected { reconnected: true, .. },
                Event::Message(m),
                Event::Resynced { messages: 1 },
            ] if m.seq == 1
        ),
        "{seen:?}"
    );
}

#[tokio::test]
async fn overloaded_send_is_retried_with_the_same_id() {
    let server = FakeServer::start().await;
    let (client, _events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&Store::default()).await;
    let sender = client.clone();
    let send = tokio::spawn(async move {
        let content = pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text { text: "x".into() })),
        };
        sender
            .send_with_id(Target::Group(5), "my-id", content)
            .await
    });
    let (rid, body) = conn.recv().await;
    let Body::Send(first) = body else { panic!() };
    assert_eq!(first.client_msg_id, "my-id");
    let group_conv = ConversationId::group(5).unwrap().raw();
    assert_eq!(
        first.target,
        Some(pb::send_request::Target::ConversationId(group_conv))
    );
    conn.send(Frame::error(rid, ErrorCode::Overloaded, "busy", false))
        .await;
    let (rid, body) = conn.recv().await;
    assert_eq!(
        body,
        Body::Send(pb::SendRequest {
            resend: true,
            ..first
        })
    );
    let ack = pb::SendAck {
        message_id: 1,
        conversation_id: group_conv,
        seq: 1,
        server_time_ms: 0,
        duplicate: true,
    };
    conn.reply(rid, Body::SendAck(ack)).await;
    assert_eq!(send.await.unwrap().unwrap(), ack);

    // Errors that cannot be fixed by retrying come back at once.
    let sender = client.clone();
    let send = tokio::spawn(async move { sender.send_text(Target::User(99), "x").await });
    let (rid, _) = conn.recv().await;
    conn.send(Frame::error(rid, ErrorCode::Forbidden, "no", false))
        .await;
    let err = send.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
}

#[tokio::test]
async fn a_rate_limited_send_waits_as_long_as_the_server_asks() {
    let server = FakeServer::start().await;
    let (client, _events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&Store::default()).await;
    let sender = client.clone();
    let send = tokio::spawn(async move { sender.send_text(Target::User(7), "x").await });
    let (rid, _) = conn.recv().await;
    let refused_at = std::time::Instant::now();
    conn.send(Frame::error_retry(
        rid,
        ErrorCode::RateLimited,
        "rate limited",
        false,
        400,
    ))
    .await;
    let (rid, body) = conn.recv().await;
    let waited = refused_at.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "resent after {waited:?}"
    );
    let Body::Send(resend) = body else { panic!() };
    assert!(resend.resend);
    let ack = pb::SendAck {
        message_id: 1,
        conversation_id: 1,
        seq: 1,
        server_time_ms: 0,
        duplicate: false,
    };
    conn.reply(rid, Body::SendAck(ack)).await;
    assert_eq!(send.await.unwrap().unwrap(), ack);

    // The wait is on the error for callers of other requests.
    let err = ClientError::from_wire(&pb::Error {
        code: ErrorCode::RateLimited as i32,
        message: String::new(),
        fatal: false,
        retry_after_ms: 250,
    });
    assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
    assert!(err.is_retryable());
}

#[tokio::test]
async fn request_times_out_and_late_reply_is_ignored() {
    let server = FakeServer::start().await;
    let cfg = config(&server).with_request_timeout(Duration::from_millis(300));
    let (client, _events, mut conn) = connect(&server, cfg).await;
    conn.serve_list(&Store::default()).await;

    let started = std::time::Instant::now();
    let c = client.clone();
    let first = tokio::spawn(async move { c.groups().await });
    let (late_rid, _) = conn.recv().await;
    let err = first.await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));

    let c = client.clone();
    let second = tokio::spawn(async move { c.groups().await });
    let (rid, _) = conn.recv().await;
    // The late answer to the first request must not be taken for the second.
    conn.reply(late_rid, Body::GroupList(pb::GroupList::default()))
        .await;
    let one = pb::GroupInfo {
        group_id: 1,
        ..Default::default()
    };
    conn.reply(
        rid,
        Body::GroupList(pb::GroupList {
            groups: vec![one.clone()],
            has_more: false,
        }),
    )
    .await;
    assert_eq!(second.await.unwrap().unwrap(), [one]);
}

#[tokio::test]
async fn heartbeat_pings_and_silent_server_triggers_reconnect() {
    let server = FakeServer::start().await;
    let cfg = config(&server);
    let (result, mut conn) = tokio::join!(Client::connect(cfg, login()), async {
        let mut conn = server.accept().await;
        let (rid, _) = conn.recv().await;
        let mut ok = auth_ok("token-1");
        ok.heartbeat_interval_ms = 100;
        ok.heartbeat_timeout_ms = 400;
        conn.reply(rid, Body::AuthOk(ok)).await;
        conn
    });
    let (_client, mut events) = result.unwrap();
    conn.serve_list(&Store::default()).await;

    // Pings come about every 100 ms, each with a request id (the fake
    // server answers them with pongs in `recv`).
    let started = std::time::Instant::now();
    let mut ping_ids = Vec::new();
    while ping_ids.len() < 3 {
        let frame = conn.recv_raw().await.expect("connection open");
        if let Some(Body::Ping(_)) = frame.body {
            assert_ne!(frame.request_id, 0);
            ping_ids.push(frame.request_id);
            conn.reply(frame.request_id, Body::Pong(pb::Pong::default()))
                .await;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    ping_ids.dedup();
    assert_eq!(ping_ids.len(), 3, "each ping has its own id");

    // Now the server goes silent: no pongs, nothing. The client gives up
    // on the connection after the heartbeat timeout and reconnects.
    let silent_since = std::time::Instant::now();
    let mut conn2 = server.accept().await;
    assert!(silent_since.elapsed() >= Duration::from_millis(300));
    let (rid, body) = conn2.recv().await;
    assert!(matches!(body, Body::Resume(_)), "{body:?}");
    conn2.reply(rid, Body::AuthOk(auth_ok("token-2"))).await;
    drop(conn);

    let mut reason = None;
    while reason.is_none() {
        if let Event::Disconnected { reason: r } = next_event(&mut events).await {
            reason = Some(r);
        }
    }
    assert!(reason.unwrap().contains("no frame"));
}

#[tokio::test]
async fn session_revoked_stops_the_client_without_resuming() {
    let server = FakeServer::start().await;
    let cfg = config(&server).with_device_name("laptop");
    let (result, mut conn) = tokio::join!(Client::connect(cfg, login()), async {
        let mut conn = server.accept().await;
        let (rid, body) = conn.recv().await;
        assert!(
            matches!(body, Body::Login(ref l) if l.device_name == "laptop"),
            "{body:?}"
        );
        conn.reply(rid, Body::AuthOk(auth_ok("token-1"))).await;
        conn
    });
    let (client, mut events) = result.unwrap();
    assert_eq!(client.session().session_id, 1);
    conn.serve_list(&Store::default()).await;

    // The session is ended elsewhere: the server closes this connection.
    conn.send(Frame::error(
        0,
        ErrorCode::SessionRevoked,
        "this session was ended",
        true,
    ))
    .await;
    drop(conn);

    loop {
        match next_event(&mut events).await {
            Event::Stopped { reason } => {
                assert!(reason.contains("ended"), "{reason}");
                break;
            }
            Event::Disconnected { reason } => panic!("treated as a lost connection: {reason}"),
            _ => {}
        }
    }
    // Neither a resume with the dead token nor a login with the password.
    let again = timeout(Duration::from_millis(500), server.listener.accept()).await;
    assert!(again.is_err(), "the client connected again");
    assert!(client.request(Body::Ping(pb::Ping {})).await.is_err());
}

#[tokio::test]
async fn delivery_acks_are_coalesced() {
    let server = FakeServer::start().await;
    let mut cfg = config(&server).with_auto_ack(true);
    cfg.ack_interval = Duration::from_millis(200);
    let (_client, mut events, mut conn) = connect(&server, cfg).await;
    conn.serve_list(&Store::default()).await;
    let c = conv_ab();
    for seq in 1..=5 {
        conn.framed
            .feed(Frame::new(0, Body::Message(text_message(c, seq, BOB))))
            .await
            .unwrap();
    }
    // Our own message (from another device) needs no ack by itself.
    conn.push(&text_message(c, 6, ALICE)).await;
    for _ in 1..=6 {
        next_message(&mut events).await;
    }
    let mut acks = Vec::new();
    while acks.last() != Some(&6) {
        let (rid, body) = conn.recv().await;
        let Body::Ack(ack) = body else {
            panic!("expected an ack, got {body:?}");
        };
        assert_eq!(ack.conversation_id, c);
        assert_eq!(ack.kind, pb::ReceiptKind::Delivered as i32);
        acks.push(ack.seq);
        conn.reply(rid, Body::Done(pb::Done {})).await;
    }
    assert!(acks.len() <= 2, "acks not coalesced: {acks:?}");
}

#[tokio::test]
async fn refused_token_falls_back_to_login_and_stops_when_that_fails() {
    let server = FakeServer::start().await;
    let (client, mut events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&Store::default()).await;
    client.wait_ready().await.unwrap();
    // A fatal error, then the server closes.
    conn.send(Frame::error(0, ErrorCode::SlowConsumer, "too slow", true))
        .await;
    drop(conn);

    // Expired token: the client logs in with its password instead.
    let mut conn = server.accept().await;
    let (rid, body) = conn.recv().await;
    assert!(matches!(body, Body::Resume(_)), "{body:?}");
    conn.send(Frame::error(rid, ErrorCode::InvalidToken, "expired", false))
        .await;
    let (rid, body) = conn.recv().await;
    assert!(matches!(body, Body::Login(_)), "{body:?}");
    conn.send(Frame::error(
        rid,
        ErrorCode::InvalidCredentials,
        "password changed",
        false,
    ))
    .await;

    let mut disconnect = None;
    loop {
        match next_event(&mut events).await {
            Event::Disconnected { reason } => disconnect = Some(reason),
            Event::Stopped { reason } => {
                assert!(reason.contains("InvalidCredentials"), "{reason}");
                break;
            }
            _ => {}
        }
    }
    assert!(disconnect.unwrap().contains("SlowConsumer"));
    assert!(matches!(client.groups().await, Err(ClientError::Closed)));
    assert!(timeout(WAIT, events.next()).await.unwrap().is_none());
}

#[tokio::test]
async fn presence_subscription_is_renewed_after_reconnect() {
    let server = FakeServer::start().await;
    let (client, mut events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&Store::default()).await;
    client.wait_ready().await.unwrap();

    let c = client.clone();
    let subscribe = tokio::spawn(async move { c.subscribe_presence(vec![BOB]).await });
    let (rid, body) = conn.recv().await;
    assert_eq!(
        body,
        Body::PresenceSubscribe(pb::PresenceSubscribeRequest {
            user_ids: vec![BOB]
        })
    );
    let offline = pb::Presence {
        user_id: BOB,
        online: false,
    };
    conn.reply(
        rid,
        Body::PresenceSnapshot(pb::PresenceSnapshot {
            users: vec![offline],
        }),
    )
    .await;
    assert_eq!(subscribe.await.unwrap().unwrap(), [offline]);
    drop(conn);

    // Subscriptions live per connection: the client renews it first thing.
    let mut conn = server.accept().await;
    let (rid, body) = conn.recv().await;
    assert!(matches!(body, Body::Resume(_)), "{body:?}");
    conn.reply(rid, Body::AuthOk(auth_ok("token-2"))).await;
    let (rid, body) = conn.recv().await;
    assert_eq!(
        body,
        Body::PresenceSubscribe(pb::PresenceSubscribeRequest {
            user_ids: vec![BOB]
        })
    );
    let online = pb::Presence {
        user_id: BOB,
        online: true,
    };
    conn.reply(
        rid,
        Body::PresenceSnapshot(pb::PresenceSnapshot {
            users: vec![online],
        }),
    )
    .await;
    conn.serve_list(&Store::default()).await;
    loop {
        if let Event::Presence(p) = next_event(&mut events).await {
            assert_eq!(p, online);
            break;
        }
    }
}

#[tokio::test]
async fn slow_reader_loses_nothing() {
    let server = FakeServer::start().await;
    let cfg = config(&server).with_event_buffer(2);
    let (client, mut events, mut conn) = connect(&server, cfg).await;
    conn.serve_list(&Store::default()).await;
    client.wait_ready().await.unwrap();
    let c = conv_ab();
    for seq in 1..=50 {
        conn.framed
            .feed(Frame::new(0, Body::Message(text_message(c, seq, BOB))))
            .await
            .unwrap();
    }
    SinkExt::<Frame>::flush(&mut conn.framed).await.unwrap();
    // The application is busy; the client must wait for it, not drop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(client.cursors().get(&c).copied().unwrap_or(0) < 50);
    for seq in 1..=50 {
        assert_eq!(next_message(&mut events).await.seq, seq);
    }
    assert_eq!(client.cursors().get(&c), Some(&50));
}

#[tokio::test]
async fn a_sync_hint_fetches_what_the_server_skipped() {
    let server = FakeServer::start().await;
    let (client, mut events, mut conn) = connect(&server, config(&server)).await;
    conn.serve_list(&Store::default()).await;
    client.wait_ready().await.unwrap();
    let c = conv_ab();
    let mut store = Store::default();
    for _ in 0..5 {
        store.add(c, BOB);
    }
    // Pushes 1 and 2 arrive; the server skips 3 to 5 and then says so.
    conn.push(&store.convs[&c][0]).await;
    conn.push(&store.convs[&c][1]).await;
    assert_eq!(next_message(&mut events).await.seq, 1);
    assert_eq!(next_message(&mut events).await.seq, 2);
    let hint = pb::SyncHint {
        conversation_ids: vec![c],
        presence: false,
    };
    conn.send(Frame::new(0, Body::SyncHint(hint))).await;
    let sync = conn.serve_sync(&store).await;
    assert_eq!(cursor_list(&sync), [(c, 2)], "synced from the cursor");
    for seq in 3..=5 {
        assert_eq!(next_message(&mut events).await.seq, seq);
    }
    // A hint naming no conversation means all: list, then sync the behind.
    store.add(c, BOB);
    let all = pb::SyncHint {
        conversation_ids: vec![],
        presence: false,
    };
    conn.send(Frame::new(0, Body::SyncHint(all))).await;
    conn.serve_list(&store).await;
    let sync = conn.serve_sync(&store).await;
    assert_eq!(cursor_list(&sync), [(c, 5)]);
    assert_eq!(next_message(&mut events).await.seq, 6);
    assert_no_more_messages(&mut events).await;
}
