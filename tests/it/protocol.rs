//! The wire contract at the byte level: authentication rules, bad frames,
//! oversized frames and silent connections are refused with a clear error
//! and a close, while other sessions carry on.

use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{ErrorCode, Frame};
use im_tests::{PASSWORD, RawConn, TestServer, error_code};

fn text(s: &str) -> Option<pb::Content> {
    Some(pb::Content {
        kind: Some(pb::content::Kind::Text(pb::Text { text: s.into() })),
    })
}

/// The last frame before EOF must be a fatal error with `code`.
pub(crate) fn assert_closed_with(frames: &[Frame], code: ErrorCode) {
    let last = frames
        .last()
        .unwrap_or_else(|| panic!("no error frame before close (wanted {code:?})"));
    match &last.body {
        Some(Body::Error(e)) => {
            assert_eq!(ErrorCode::try_from(e.code), Ok(code), "{e:?}");
            assert!(e.fatal, "error before close must be fatal: {e:?}");
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// A logged-in bystander whose session must survive others' misbehaviour.
async fn bystander(server: &TestServer) -> (RawConn, u64) {
    let mut conn = RawConn::connect(server.addr).await;
    let ok = conn.register("bystander").await;
    (conn, ok.user_id)
}

/// `conn`, logged in as `me`, still gets its requests answered.
pub(crate) async fn assert_alive(conn: &mut RawConn, me: u64) {
    let body = conn
        .call(Body::Send(pb::SendRequest {
            target: Some(pb::send_request::Target::ToUser(me)),
            client_msg_id: format!("alive-{}", rand_id()),
            content: text("still here"),
            resend: false,
        }))
        .await;
    assert!(
        matches!(body, Body::SendAck(_)),
        "bystander broken: {body:?}"
    );
}

fn rand_id() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test]
async fn ping_is_answered_before_and_after_login() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    assert!(matches!(
        conn.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
    let ok = conn.register("pinger").await;
    assert_eq!(ok.heartbeat_interval_ms, 30_000);
    assert_eq!(ok.max_frame_bytes, 64 * 1024);
    assert!(matches!(
        conn.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
}

#[tokio::test]
async fn session_request_before_login_is_fatal_unauthenticated() {
    let server = TestServer::start().await;
    let (mut other, me) = bystander(&server).await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.send(Body::ListGroups(pb::ListGroupsRequest::default()))
        .await;
    assert_closed_with(&conn.until_closed().await, ErrorCode::Unauthenticated);
    assert_alive(&mut other, me).await;
}

#[tokio::test]
async fn oversized_frame_is_refused_from_its_header() {
    let server = TestServer::start().await;
    let (mut other, me) = bystander(&server).await;
    let mut conn = RawConn::connect(server.addr).await;
    // Announce 1 MiB (limit 64 KiB) and send only a few bytes of it.
    let mut bytes = (1u32 << 20).to_be_bytes().to_vec();
    bytes.extend_from_slice(b"not much");
    conn.write_raw(&bytes).await;
    assert_closed_with(&conn.until_closed().await, ErrorCode::FrameTooLarge);
    assert_alive(&mut other, me).await;
}

#[tokio::test]
async fn garbage_bytes_are_bad_frame() {
    let server = TestServer::start().await;
    let (mut other, me) = bystander(&server).await;
    let mut conn = RawConn::connect(server.addr).await;
    let mut bytes = 12u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0xff; 12]);
    conn.write_raw(&bytes).await;
    assert_closed_with(&conn.until_closed().await, ErrorCode::BadFrame);
    // Text that happens to look like a length prefix is refused too.
    let mut http = RawConn::connect(server.addr).await;
    http.write_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_closed_with(&http.until_closed().await, ErrorCode::FrameTooLarge);
    assert_alive(&mut other, me).await;
}

#[tokio::test]
async fn silent_connection_is_closed_with_auth_timeout() {
    let server = TestServer::start_with(|c| c.auth_timeout_secs = 1).await;
    let (mut other, me) = bystander(&server).await;
    let mut conn = RawConn::connect(server.addr).await;
    let started = std::time::Instant::now();
    assert_closed_with(&conn.until_closed().await, ErrorCode::AuthTimeout);
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    assert_alive(&mut other, me).await;
}

#[tokio::test]
async fn silent_session_is_closed_with_heartbeat_timeout() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval_secs = 1;
        c.heartbeat_timeout_secs = 2;
    })
    .await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.register("sleepy").await;
    // A client that pings stays up meanwhile.
    let mut pinger = RawConn::connect(server.addr).await;
    pinger.register("pinger").await;
    let keep = tokio::spawn(async move {
        for _ in 0..8 {
            assert!(matches!(
                pinger.call(Body::Ping(pb::Ping {})).await,
                Body::Pong(_)
            ));
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        pinger
    });
    assert_closed_with(&conn.until_closed().await, ErrorCode::HeartbeatTimeout);
    keep.await.expect("pinger stayed connected");
}

#[tokio::test]
async fn empty_frame_gets_a_non_fatal_error() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.write_raw(&0u32.to_be_bytes()).await;
    let frame = conn.recv().await;
    let body = frame.body.expect("error body");
    assert_eq!(error_code(&body), Some(ErrorCode::InvalidArgument));
    conn.register("after-empty").await;
}

/// Request id 0 marks pushes, so a request carrying it is refused (not
/// processed) rather than answered with a reply no client could match.
#[tokio::test]
async fn a_request_with_id_zero_is_refused_and_not_processed() {
    use futures::SinkExt;
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    let register = Body::Register(pb::RegisterRequest {
        username: "zero".into(),
        password: PASSWORD.into(),
        device_name: String::new(),
    });
    conn.framed
        .send(im_proto::Frame::new(0, register))
        .await
        .unwrap();
    let frame = conn.recv().await;
    assert_eq!(frame.request_id, 0);
    let body = frame.body.expect("error body");
    assert_eq!(
        error_code(&body),
        Some(ErrorCode::InvalidArgument),
        "{body:?}"
    );
    // Not registered: the name is still free, and the connection usable.
    let me = conn.register("zero").await.user_id;
    let send = Body::Send(pb::SendRequest {
        target: Some(pb::send_request::Target::ToUser(me)),
        client_msg_id: "z".into(),
        content: text("not stored"),
        resend: false,
    });
    conn.framed
        .send(im_proto::Frame::new(0, send))
        .await
        .unwrap();
    let body = conn.recv().await.body.expect("error body");
    assert_eq!(error_code(&body), Some(ErrorCode::InvalidArgument));
    let list = conn
        .call(Body::ListConversations(pb::ListConversationsRequest {
            after_conversation_id: 0,
            limit: 10,
        }))
        .await;
    assert!(
        matches!(&list, Body::ConversationList(l) if l.conversations.is_empty()),
        "the send was stored: {list:?}"
    );
}

#[tokio::test]
async fn second_login_on_a_session_is_refused_without_closing() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.register("twice").await;
    let body = conn
        .call(Body::Login(pb::LoginRequest {
            username: "twice".into(),
            password: PASSWORD.into(),
            device_name: String::new(),
        }))
        .await;
    assert_eq!(error_code(&body), Some(ErrorCode::AlreadyAuthenticated));
    assert!(matches!(
        conn.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
}

#[tokio::test]
async fn connections_over_the_limit_get_server_full() {
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let _a = RawConn::connect(server.addr).await;
    let _b = RawConn::connect(server.addr).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut c = RawConn::connect(server.addr).await;
    assert_closed_with(&c.until_closed().await, ErrorCode::ServerFull);
}

/// A peer that sends a request and half-closes, with the FIN in the
/// same segment as the data (corked) or a moment later in an event of its
/// own, gets its answer and then the close at once, not at the auth
/// timeout: the server stops reading a socket at a short read, and must
/// still read on to the end when the event says the peer closed.
#[tokio::test]
async fn a_request_then_fin_is_answered_and_closed_at_once() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start_with(|c| c.auth_timeout_secs = 60).await;
    for corked in [true, false] {
        let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        // Corked, the frame waits in the socket and leaves with the FIN.
        socket2::SockRef::from(&stream)
            .set_tcp_cork(corked)
            .unwrap();
        let mut conn = RawConn::over(Box::new(stream));
        conn.send(Body::Ping(pb::Ping {})).await;
        if !corked {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        conn.framed.get_mut().shutdown().await.unwrap();
        let started = std::time::Instant::now();
        let mut frames = Vec::new();
        while let Some(f) = conn.recv_within(5).await {
            frames.push(f);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "the close took {:?} (corked: {corked})",
            started.elapsed()
        );
        assert!(
            frames.iter().any(|f| matches!(f.body, Some(Body::Pong(_)))),
            "no pong before the close: {frames:?}"
        );
    }
}
