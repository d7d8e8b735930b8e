//! Behind a load balancer: a connection from a `--proxy-protocol-from`
//! address starts with a PROXY protocol header (v1 or v2), and the client
//! address it carries is the one the server keys on; a bad or missing
//! header closes that connection only, and other peers are served as
//! before.

use std::net::SocketAddr;
use std::time::Duration;

use im_proto::pb::frame::Body;
use im_proto::{ErrorCode, Frame, codec, pb};
use im_tests::{PASSWORD, RawConn, TestServer, error_code, proxy_v1, proxy_v2, proxy_v2_raw};

use crate::protocol::{assert_alive, assert_closed_with};

/// The test clients connect from 127.0.0.1: the balancer's address here.
fn trust_loopback(c: &mut im_server::config::Config) {
    c.proxy_protocol_from = vec!["127.0.0.1/32".parse().expect("CIDR")];
}

fn client(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address"), 40_000)
}

/// A connection through the balancer for a client at `ip`.
async fn via(server: &TestServer, ip: &str) -> RawConn {
    RawConn::connect_with_preamble(server.addr, &proxy_v2(client(ip), server.addr, &[])).await
}

fn login(username: &str, password: &str) -> Body {
    Body::Login(pb::LoginRequest {
        username: username.into(),
        password: password.into(),
        device_name: String::new(),
    })
}

/// The error code a login attempt gets (`None` for success).
async fn login_error(conn: &mut RawConn, username: &str, password: &str) -> Option<ErrorCode> {
    match conn.call(login(username, password)).await {
        Body::AuthOk(_) => None,
        body => Some(error_code(&body).unwrap_or_else(|| panic!("not an error: {body:?}"))),
    }
}

#[tokio::test]
async fn a_v2_header_comes_before_the_frames_in_the_same_or_a_later_write() {
    // One listener handing connections round-robin to two event loops:
    // the second connection is accepted by one and served by the other.
    let server = TestServer::start_with(|c| {
        trust_loopback(c);
        c.shards = 2;
        c.reuse_port = false;
    })
    .await;
    let mut first = via(&server, "203.0.113.5").await;
    let me = first.register("carol").await.user_id;
    assert_alive(&mut first, me).await;

    // Header (with TLVs, which are skipped) and login in one packet.
    let mut tlvs = vec![0x02, 0, 10];
    tlvs.extend_from_slice(b"im.example");
    let mut bytes = proxy_v2(client("203.0.113.6"), server.addr, &tlvs);
    bytes.extend_from_slice(&codec::encode_to_bytes(&Frame::new(
        7,
        login("carol", PASSWORD),
    )));
    let mut second = RawConn::connect(server.addr).await;
    second.write_raw(&bytes).await;
    match second.reply_to(7).await {
        Body::AuthOk(ok) => assert_eq!(ok.user_id, me),
        other => panic!("login after a v2 header: {other:?}"),
    }
    assert_alive(&mut second, me).await;
    assert_eq!(server.node().net_stats().proxy_header_errors, 0);
}

#[tokio::test]
async fn a_v1_header_split_over_two_writes_with_the_login_glued_to_its_end() {
    let server = TestServer::start_with(trust_loopback).await;
    let me = via(&server, "198.51.100.1")
        .await
        .register("dave")
        .await
        .user_id;
    let header = proxy_v1(client("198.51.100.2"), server.addr);
    let mut conn = RawConn::connect(server.addr).await;
    // "PROXY TCP4 198.51.10", then the rest of it and the login frame.
    conn.write_raw(&header[..20]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rest = header[20..].to_vec();
    rest.extend_from_slice(&codec::encode_to_bytes(&Frame::new(
        7,
        login("dave", PASSWORD),
    )));
    conn.write_raw(&rest).await;
    match conn.reply_to(7).await {
        Body::AuthOk(ok) => assert_eq!(ok.user_id, me),
        other => panic!("login after a split v1 header: {other:?}"),
    }
    assert_alive(&mut conn, me).await;
}

/// Every connection here comes from 127.0.0.1; only the carried addresses
/// differ. Were the socket's address used, the victim's own logins from
/// 10.2.2.2 would be refused along with the attacker's.
#[tokio::test]
async fn login_limits_key_on_the_carried_client_address() {
    // 2 failures per (address, username), 20 per address.
    let server = TestServer::start_with(|c| {
        trust_loopback(c);
        c.login_failures = 2;
    })
    .await;
    via(&server, "10.9.9.9").await.register("victim").await;

    let mut attacker = via(&server, "10.1.1.1").await;
    for _ in 0..2 {
        let code = login_error(&mut attacker, "victim", "guess guess").await;
        assert_eq!(code, Some(ErrorCode::InvalidCredentials));
    }
    let code = login_error(&mut attacker, "victim", PASSWORD).await;
    assert_eq!(
        code,
        Some(ErrorCode::RateLimited),
        "per address and username"
    );

    let mut victim = via(&server, "10.2.2.2").await;
    let code = login_error(&mut victim, "victim", "typo typo").await;
    assert_eq!(code, Some(ErrorCode::InvalidCredentials), "not limited");

    // 18 more failures under other names use up 10.1.1.1's 20.
    for i in 0..9 {
        for _ in 0..2 {
            let code = login_error(&mut attacker, &format!("other{i}"), "guess guess").await;
            assert_eq!(code, Some(ErrorCode::InvalidCredentials));
        }
    }
    let code = login_error(&mut attacker, "never-tried", "guess guess").await;
    assert_eq!(code, Some(ErrorCode::RateLimited), "per address");

    // The victim is under neither of the attacker's limits.
    assert_eq!(login_error(&mut victim, "victim", PASSWORD).await, None);
}

/// Health checks (v2 LOCAL) and v1 UNKNOWN are the balancer's own
/// connections: they are served, keyed on the balancer's address.
#[tokio::test]
async fn local_and_unknown_headers_keep_the_balancer_address() {
    let server = TestServer::start_with(|c| {
        trust_loopback(c);
        c.login_failures = 1;
    })
    .await;
    via(&server, "10.9.9.9").await.register("erin").await;

    let mut check = RawConn::connect_with_preamble(server.addr, &proxy_v2_raw(0x20, 0, &[])).await;
    assert!(matches!(
        check.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
    let code = login_error(&mut check, "erin", "guess guess").await;
    assert_eq!(code, Some(ErrorCode::InvalidCredentials));

    // Same key (127.0.0.1, erin): limited.
    let mut unknown = RawConn::connect_with_preamble(server.addr, b"PROXY UNKNOWN\r\n").await;
    let code = login_error(&mut unknown, "erin", PASSWORD).await;
    assert_eq!(code, Some(ErrorCode::RateLimited));
    // A carried client address is another key.
    let mut carried = via(&server, "10.4.4.4").await;
    assert_eq!(login_error(&mut carried, "erin", PASSWORD).await, None);
}

#[tokio::test]
async fn a_trusted_peer_without_a_good_header_is_closed_and_others_carry_on() {
    let server = TestServer::start_with(|c| {
        trust_loopback(c);
        c.auth_timeout_secs = 1;
    })
    .await;
    let mut other = via(&server, "192.0.2.1").await;
    let me = other.register("bystander").await.user_id;

    let mut garbage = RawConn::connect_with_preamble(server.addr, b"HELLO there\r\n").await;
    assert_closed_with(&garbage.until_closed().await, ErrorCode::BadFrame);

    // A balancer not set to send headers: the client's frame comes first.
    let mut bare = RawConn::connect(server.addr).await;
    bare.send(Body::Ping(pb::Ping {})).await;
    assert_closed_with(&bare.until_closed().await, ErrorCode::BadFrame);

    // A v2 header announcing more than the server takes, refused from its
    // fixed part.
    let oversized = proxy_v2_raw(0x21, 0x11, &[0; 600]);
    let mut big = RawConn::connect_with_preamble(server.addr, &oversized[..16]).await;
    assert_closed_with(&big.until_closed().await, ErrorCode::BadFrame);

    // Half a header, then nothing: the auth deadline closes it.
    let header = proxy_v1(client("192.0.2.2"), server.addr);
    let mut silent = RawConn::connect_with_preamble(server.addr, &header[..10]).await;
    let started = std::time::Instant::now();
    assert_closed_with(&silent.until_closed().await, ErrorCode::AuthTimeout);
    assert!(started.elapsed() < Duration::from_secs(4));

    assert_eq!(server.node().net_stats().proxy_header_errors, 3);
    assert_alive(&mut other, me).await;
}

/// From a peer that is not trusted (no flag, or not in the list) a PROXY
/// header is the start of a frame like any other bytes: its first four
/// read as a length far over the limit.
#[tokio::test]
async fn without_trust_a_proxy_header_is_bad_input() {
    let plain = TestServer::start().await;
    let elsewhere = TestServer::start_with(|c| {
        c.proxy_protocol_from = vec!["10.0.0.0/8".parse().expect("CIDR")];
    })
    .await;
    for server in [&plain, &elsewhere] {
        for header in [
            proxy_v2(client("203.0.113.5"), server.addr, &[]),
            proxy_v1(client("203.0.113.5"), server.addr),
        ] {
            let mut conn = RawConn::connect_with_preamble(server.addr, &header).await;
            assert_closed_with(&conn.until_closed().await, ErrorCode::FrameTooLarge);
        }
        let mut conn = RawConn::connect(server.addr).await;
        let me = conn.register("plain").await.user_id;
        assert_alive(&mut conn, me).await;
        let stats = server.node().net_stats();
        assert_eq!(stats.proxy_header_errors, 0);
        assert_eq!(stats.protocol_errors, 2);
    }
}
