//! TLS: the same protocol on the TLS listener (SDK and raw clients), side
//! by side with plain TCP; a TLS-only server; certificates reloaded on
//! SIGHUP without dropping connections; sessions resumed on another node
//! that shares the ticket keys; bad input on the TLS port.

use std::net::SocketAddr;
use std::time::Duration;

use im_client::{Client, ClientConfig, Credentials, Event, Target, Tls};
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_tests::tls::{self, TestPki};
use im_tests::{PASSWORD, PipelineEnv, RawConn, ServerProcess, TestServer, im_chat, pipeline_mode};
use rustls::HandshakeKind;

/// A ticket-key secret (hex) shared by the nodes of a test.
const SHARED_SECRET: &str = "8f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn with_tls(pki_dir: &std::path::Path, c: &mut im_server::config::Config) {
    c.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    c.tls_cert = Some(pki_dir.join("cert.pem"));
    c.tls_key = Some(pki_dir.join("key.pem"));
}

async fn tls_server(pki_dir: &std::path::Path) -> TestServer {
    let dir = pki_dir.to_path_buf();
    TestServer::start_with(move |c| with_tls(&dir, c)).await
}

/// A node whose TLS clients come through a balancer at 127.0.0.1 that
/// sends a PROXY header, with `tweak` applied too.
async fn tls_server_behind_balancer(
    pki_dir: &std::path::Path,
    tweak: impl Fn(&mut im_server::config::Config) + Send + Sync + 'static,
) -> TestServer {
    let dir = pki_dir.to_path_buf();
    TestServer::start_with(move |c| {
        with_tls(&dir, c);
        c.proxy_protocol_from = vec!["127.0.0.1/32".parse().unwrap()];
        tweak(c);
    })
    .await
}

/// A TLS connection through the balancer for a client at `ip`.
async fn tls_via(
    addr: SocketAddr,
    client: &std::sync::Arc<rustls::ClientConfig>,
    ip: &str,
) -> std::io::Result<RawConn> {
    let header = im_tests::proxy_v1(SocketAddr::new(ip.parse().unwrap(), 40_000), addr);
    let stream = tls::connect_after(addr, &header, client).await?;
    Ok(RawConn::over(Box::new(stream)))
}

/// A raw connection over TLS (trusting `pki`'s CA).
async fn raw_tls(addr: SocketAddr, pki: &TestPki) -> RawConn {
    let stream = tls::connect(addr, &pki.client_config())
        .await
        .expect("TLS handshake");
    RawConn::over(Box::new(stream))
}

fn text_of(m: &pb::Message) -> &str {
    match m.content.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(pb::content::Kind::Text(t)) => &t.text,
        _ => "",
    }
}

#[tokio::test]
async fn tls_and_plain_clients_chat_with_each_other() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let server = tls_server(pki_dir.path()).await;
    let tls_addr = server.node().tls_addr().expect("a TLS listener");
    assert_ne!(tls_addr, server.addr);

    // Alice uses the SDK over TLS (the certificate names 127.0.0.1 too).
    let config =
        ClientConfig::new(tls_addr.to_string()).with_tls(Tls::with_ca_file(pki.ca_file()).unwrap());
    let credentials = Credentials::Register {
        username: "tls_alice".into(),
        password: PASSWORD.into(),
    };
    let (alice, mut alice_events) = Client::connect(config, credentials).await.unwrap();
    // Bob speaks plain TCP.
    let mut bob = RawConn::connect(server.addr).await;
    let bob_id = bob.register("plain_bob").await.user_id;

    alice
        .send_text(Target::User(bob_id), "over TLS")
        .await
        .unwrap();
    assert_eq!(text_of(&bob.pushed_message(5).await), "over TLS");

    // Many large messages: pushes span many TLS records and writes.
    let big = "x".repeat(20_000);
    for i in 0..40 {
        bob.send_text_to_user(alice.user_id(), &format!("big-{i}"), &big)
            .await;
    }
    let mut got = 0;
    while got < 40 {
        match tokio::time::timeout(Duration::from_secs(10), alice_events.next()).await {
            Ok(Some(Event::Message(m))) => {
                assert_eq!(text_of(&m).len(), 20_000);
                got += 1;
            }
            Ok(Some(_)) => {}
            other => panic!("after {got} messages: {other:?}"),
        }
    }
    // A reply larger than one record (history of three 20 KB messages).
    let conv = im_proto::ConversationId::direct(alice.user_id(), bob_id)
        .unwrap()
        .raw();
    let history = alice.history(conv, 0, 3).await.unwrap();
    assert_eq!(history.messages.len(), 3);
    let stats = server.node().net_stats();
    assert_eq!(stats.tls_handshakes, 1);
    assert_eq!(stats.tls_errors, 0);
    alice.close().await;
}

#[tokio::test]
async fn a_tls_only_server_refuses_plain_bytes_on_its_port_and_serves_tls() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let dir = pki_dir.path().to_path_buf();
    let server = TestServer::start_with(move |c| {
        with_tls(&dir, c);
        c.no_plain_listener = true;
    })
    .await;
    let tls_addr = server.node().tls_addr().unwrap();
    assert_eq!(server.addr, tls_addr, "the only listener");

    // A plain client on the TLS port: no reply, closed, nobody else hurt.
    let mut plain = RawConn::connect(tls_addr).await;
    plain
        .send(Body::Register(pb::RegisterRequest {
            username: "confused".into(),
            password: PASSWORD.into(),
            ..Default::default()
        }))
        .await;
    assert!(plain.until_closed().await.is_empty(), "a plain reply");
    // Garbage that looks like a TLS record header, then a stall.
    let mut junk = RawConn::connect(tls_addr).await;
    junk.write_raw(&[22, 3, 1, 0xff, 0xff, 1, 2, 3]).await;

    let mut a = raw_tls(tls_addr, &pki).await;
    let a_id = a.register("only_tls_a").await.user_id;
    let mut b = raw_tls(tls_addr, &pki).await;
    b.register("only_tls_b").await;
    b.send_text_to_user(a_id, "c1", "fine").await;
    assert_eq!(text_of(&a.pushed_message(5).await), "fine");
    assert!(server.node().net_stats().tls_errors >= 1);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let pki_dir = tempfile::tempdir().unwrap();
    let mut pki = TestPki::new(pki_dir.path());
    let data = tempfile::tempdir().unwrap();
    let env = pipeline_mode().then(PipelineEnv::fresh);
    let tls_addr: SocketAddr = format!("127.0.0.1:{}", im_tests::free_port())
        .parse()
        .unwrap();
    let args = pki.server_args(tls_addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = ServerProcess::start_in(data.path(), env.as_ref(), &args);
    let old_roots = pki.client_config();
    let mut open = raw_tls(tls_addr, &pki).await;
    let open_id = open.register("reload_open").await.user_id;

    pki.rotate_ca();
    server.signal("HUP");
    // New handshakes get the new certificate (once the signal is handled).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tls::connect(tls_addr, &old_roots).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old certificate is still served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut fresh = raw_tls(tls_addr, &pki).await;
    fresh.register("reload_fresh").await;
    fresh.send_text_to_user(open_id, "r1", "after reload").await;
    // The connection from before the reload is still served.
    assert_eq!(text_of(&open.pushed_message(5).await), "after reload");
    assert!(matches!(
        open.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
}

#[tokio::test]
async fn a_session_resumes_on_another_node_sharing_the_ticket_keys() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let shared = pki.ticket_key_file(SHARED_SECRET);
    let start = |tickets: Option<std::path::PathBuf>| {
        let dir = pki_dir.path().to_path_buf();
        TestServer::start_with(move |c| {
            with_tls(&dir, c);
            c.tls_ticket_key_file = tickets.clone();
        })
    };
    let node_a = start(Some(shared.clone())).await;
    let node_b = start(Some(shared)).await;
    let stranger = start(None).await;
    let client = pki.client_config();

    let kind = |stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        stream.get_ref().1.handshake_kind()
    };
    // A full handshake on node A; a round trip brings the ticket.
    let stream = tls::connect(node_a.node().tls_addr().unwrap(), &client)
        .await
        .unwrap();
    assert_eq!(kind(&stream), Some(HandshakeKind::Full));
    let mut conn = RawConn::over(Box::new(stream));
    assert!(matches!(
        conn.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
    drop(conn);

    // Node B opens A's ticket: no full handshake.
    let stream = tls::connect(node_b.node().tls_addr().unwrap(), &client)
        .await
        .unwrap();
    assert_eq!(kind(&stream), Some(HandshakeKind::Resumed));
    let mut conn = RawConn::over(Box::new(stream));
    assert!(matches!(
        conn.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
    drop(conn);
    let stats = node_b.node().net_stats();
    assert_eq!((stats.tls_resumptions, stats.tls_handshakes), (1, 0));

    // A node with keys of its own cannot, and falls back to a full one.
    let stream = tls::connect(stranger.node().tls_addr().unwrap(), &client)
        .await
        .unwrap();
    assert_eq!(kind(&stream), Some(HandshakeKind::Full));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_run_over_tls_verifies_and_its_reconnect_storm_resumes_sessions() {
    use clap::Parser;
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let server = tls_server(pki_dir.path()).await;
    let addr = server.node().tls_addr().unwrap().to_string();
    let ca = pki.ca_file().display().to_string();
    let args = im_loadgen::Args::try_parse_from([
        "im-loadgen",
        "--server",
        &addr,
        "--ca-file",
        &ca,
        "--quiet",
        "--scenario",
        "storm",
        "--connections",
        "100",
        "--rate",
        "500",
        "--duration",
        "3",
        "--warmup",
        "1",
        "--settle",
        "1",
    ])
    .unwrap();
    let (report, _) = im_loadgen::run(args).await.expect("load run");
    assert!(!report.failed(), "verification failed: {report:#?}");
    assert_eq!(report.messages_lost, 0);
    assert!(report.reconnects_per_s > 0.0, "{report:?}");
    let stats = server.node().net_stats();
    // Every connection's first handshake is a full one; the storm's
    // reconnects resume with the tickets they got.
    assert_eq!(stats.tls_handshakes, 100, "{stats:?}");
    assert!(stats.tls_resumptions >= 100, "{stats:?}");
    assert_eq!(stats.tls_errors, 0);
}

/// A balancer passing TLS through sends its PROXY header in clear before
/// the handshake: the address it carries is the client's (here: login
/// failures counted per address).
#[tokio::test]
async fn a_proxy_header_before_the_handshake_names_the_client() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let server = tls_server_behind_balancer(pki_dir.path(), |c| c.login_failures = 2).await;
    let tls_addr = server.node().tls_addr().unwrap();
    let client = pki.client_config();
    let via = |ip: &'static str| {
        let client = client.clone();
        async move {
            tls_via(tls_addr, &client, ip)
                .await
                .expect("TLS after the PROXY header")
        }
    };
    via("10.9.9.9").await.register("tls_victim").await;
    let login = |password: &str| {
        Body::Login(pb::LoginRequest {
            username: "tls_victim".into(),
            password: password.into(),
            ..Default::default()
        })
    };
    let mut attacker = via("10.1.1.1").await;
    for _ in 0..2 {
        let reply = attacker.call(login("guess guess")).await;
        assert_eq!(
            im_tests::error_code(&reply),
            Some(im_proto::ErrorCode::InvalidCredentials)
        );
    }
    let reply = attacker.call(login(PASSWORD)).await;
    assert_eq!(
        im_tests::error_code(&reply),
        Some(im_proto::ErrorCode::RateLimited)
    );
    // Another client address through the same balancer is not limited.
    let mut victim = via("10.2.2.2").await;
    assert!(matches!(
        victim.call(login(PASSWORD)).await,
        Body::AuthOk(_)
    ));
}

/// The per-address connection limit counts the client a balancer's PROXY
/// header names before the handshake: over it, the connection is closed
/// (before the handshake, so without a frame), others are served.
#[tokio::test]
async fn tls_connections_count_against_the_address_in_the_proxy_header() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let server = tls_server_behind_balancer(pki_dir.path(), |c| c.max_conns_per_addr = 1).await;
    let tls_addr = server.node().tls_addr().unwrap();
    let client = pki.client_config();
    let mut first = tls_via(tls_addr, &client, "10.5.5.5")
        .await
        .expect("the first connection of 10.5.5.5");
    first.register("addr_limited").await;
    // The second one from the same client address is refused.
    if let Ok(mut second) = tls_via(tls_addr, &client, "10.5.5.5").await {
        assert!(
            second.until_closed().await.is_empty(),
            "served over the limit"
        );
    }
    // Another client address through the same balancer is served.
    let mut other = tls_via(tls_addr, &client, "10.6.6.6")
        .await
        .expect("another address");
    assert!(matches!(
        other.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
    assert!(matches!(
        first.call(Body::Ping(pb::Ping {})).await,
        Body::Pong(_)
    ));
}

/// `im-chat` logs in over TLS with a private CA, and later commands (no
/// TLS flag given) keep speaking TLS from the saved session.
#[tokio::test]
async fn im_chat_logs_in_over_tls_and_later_commands_keep_it() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(pki_dir.path());
    let server = tls_server(pki_dir.path()).await;
    let tls_addr = server.node().tls_addr().unwrap();
    let state = tempfile::tempdir().unwrap();
    let ca = pki.ca_file().display().to_string();
    let pw = format!("--password={PASSWORD}");
    let (ok, _, err) = im_chat(
        tls_addr,
        state.path(),
        &["--ca-file", &ca, "register", "chat_tls", &pw],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, users, err) = im_chat(tls_addr, state.path(), &["users", "chat_tls"]).await;
    assert!(ok, "{err}");
    assert!(format!("{users:?}").contains("chat_tls"), "{users:?}");
    // The saved choice holds: TLS to the plain port fails.
    let (ok, _, _) = im_chat(server.addr, state.path(), &["users", "chat_tls"]).await;
    assert!(!ok, "TLS to the plain port must fail");
    assert_eq!(server.node().net_stats().tls_handshakes, 2);
}
