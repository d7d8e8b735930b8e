//! The `im-server` process: graceful shutdown on SIGTERM/SIGINT (in-flight
//! sends answered, sessions closed with a reason, exit 0, nothing acked
//! lost) and SDK clients riding through a restart.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use im_client::Target;
use im_proto::pb::frame::Body;
use im_proto::{ErrorCode, pb};
use im_tests::sdk::{self, messages, text_of};
use im_tests::{PipelineEnv, RawConn, ServerProcess, pipeline_mode};

#[tokio::test]
async fn sigterm_answers_in_flight_sends_then_closes_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let env = pipeline_mode().then(PipelineEnv::fresh);
    let mut server =
        ServerProcess::start_in(dir.path(), env.as_ref(), &["--shutdown-grace-secs", "5"]);
    let mut bob = RawConn::connect(server.addr).await;
    let bob_id = bob.register("bob").await.user_id;
    let mut alice = RawConn::connect(server.addr).await;
    alice.register("alice").await;

    const SENDS: usize = 2000;
    for n in 0..SENDS {
        alice
            .send(Body::Send(pb::SendRequest {
                target: Some(pb::send_request::Target::ToUser(bob_id)),
                client_msg_id: format!("m{n}"),
                content: Some(pb::Content {
                    kind: Some(pb::content::Kind::Text(pb::Text {
                        text: n.to_string(),
                    })),
                }),
                resend: false,
            }))
            .await;
    }
    let signalled = Instant::now();
    server.signal("TERM");
    let frames = alice.until_closed().await;
    let acked: HashSet<u64> = frames
        .iter()
        .filter_map(|f| match &f.body {
            Some(Body::SendAck(a)) => Some(a.seq),
            _ => None,
        })
        .collect();
    match frames.last().and_then(|f| f.body.as_ref()) {
        Some(Body::Error(e)) => {
            assert_eq!(ErrorCode::try_from(e.code), Ok(ErrorCode::ServerShutdown));
            assert!(e.fatal);
        }
        other => panic!("expected SERVER_SHUTDOWN last, got {other:?}"),
    }
    assert_eq!(server.wait_exit(15), Some(0), "graceful exit status");
    assert!(signalled.elapsed() < Duration::from_secs(12));

    // Everything acknowledged is stored exactly once, and nothing else.
    let restarted = ServerProcess::start_in(dir.path(), env.as_ref(), &[]);
    let (bob, _events) = sdk::login(restarted.addr, "bob").await;
    let list = bob.conversations().await.unwrap();
    let stored = list.first().map_or(0, |c| c.last_seq) as usize;
    assert_eq!(
        stored,
        acked.len(),
        "stored messages must be exactly the acked ones"
    );
    assert_eq!(acked, (1..=stored as u64).collect::<HashSet<_>>());
}

#[tokio::test]
async fn sigint_also_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let env = pipeline_mode().then(PipelineEnv::fresh);
    let mut server = ServerProcess::start_in(dir.path(), env.as_ref(), &[]);
    let mut conn = RawConn::connect(server.addr).await;
    conn.register("someone").await;
    server.signal("INT");
    let frames = conn.until_closed().await;
    let last = frames.last().and_then(|f| f.body.as_ref());
    assert!(matches!(last, Some(Body::Error(e)) if e.code == ErrorCode::ServerShutdown as i32));
    assert_eq!(server.wait_exit(10), Some(0));
}

#[tokio::test]
async fn sdk_clients_reconnect_and_catch_up_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let env = pipeline_mode().then(PipelineEnv::fresh);
    let server = ServerProcess::start_in(dir.path(), env.as_ref(), &[]);
    let addr = server.addr;
    let (alice, _a) = sdk::register(addr, "alice").await;
    let (bob, mut bob_events) = sdk::register(addr, "bob").await;
    alice
        .send_text(Target::User(bob.user_id()), "before")
        .await
        .unwrap();
    assert_eq!(text_of(&messages(&mut bob_events, 1, 5).await[0]), "before");

    let mut server = server;
    server.signal("TERM");
    assert_eq!(server.wait_exit(15), Some(0));
    let _server = ServerProcess::start_on_in(addr, dir.path(), env.as_ref(), &[]);

    // Alice's send waits for her client to reconnect, then goes through.
    alice
        .send_text(Target::User(bob.user_id()), "after")
        .await
        .unwrap();
    let got = messages(&mut bob_events, 1, 15).await;
    assert_eq!((got[0].seq, text_of(&got[0])), (2, "after"));
}
