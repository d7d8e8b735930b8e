//! Registration, login, bad passwords, token resume and login rate limits.

use std::time::Duration;

use im_client::{Client, ClientError, Credentials};
use im_proto::ErrorCode;
use im_tests::sdk::{self, config};
use im_tests::{PASSWORD, TestServer};

async fn auth_error(addr: std::net::SocketAddr, credentials: Credentials) -> ErrorCode {
    match Client::connect(config(addr), credentials).await {
        Err(e @ (ClientError::AuthFailed { .. } | ClientError::Server { .. })) => {
            e.code().expect("a server code")
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("authentication unexpectedly succeeded"),
    }
}

fn login(name: &str, password: &str) -> Credentials {
    Credentials::Login {
        username: name.into(),
        password: password.into(),
    }
}

#[tokio::test]
async fn register_login_and_bad_password() {
    let server = TestServer::start().await;
    let (alice, _events) = sdk::register(server.addr, "alice").await;
    let id = alice.user_id();
    assert!(id > 0);

    let (again, _e) = sdk::login(server.addr, "alice").await;
    assert_eq!(again.user_id(), id);
    // Usernames are unique without regard to case, and login ignores case.
    let (upper, _e) = sdk::login(server.addr, "ALICE").await;
    assert_eq!(upper.user_id(), id);

    assert_eq!(
        auth_error(server.addr, login("alice", "wrong password")).await,
        ErrorCode::InvalidCredentials
    );
    assert_eq!(
        auth_error(server.addr, login("nobody", PASSWORD)).await,
        ErrorCode::InvalidCredentials
    );
    let taken = Credentials::Register {
        username: "Alice".into(),
        password: PASSWORD.into(),
    };
    assert_eq!(
        auth_error(server.addr, taken).await,
        ErrorCode::UsernameTaken
    );
    let short = Credentials::Register {
        username: "bob".into(),
        password: "short".into(),
    };
    assert_eq!(
        auth_error(server.addr, short).await,
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn tokens_resume_without_a_password_and_forgeries_fail() {
    let server = TestServer::start().await;
    let (alice, _events) = sdk::register(server.addr, "alice").await;
    let token = alice.session().token;
    let (resumed, _e) = sdk::connect(config(server.addr), Credentials::Token(token.clone())).await;
    assert_eq!(resumed.user_id(), alice.user_id());
    assert_eq!(resumed.session().username, "alice");

    let mut forged = token.into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(
        auth_error(server.addr, Credentials::Token(forged)).await,
        ErrorCode::InvalidToken
    );

    // A token from another deployment (another key) is refused too.
    let other = TestServer::start().await;
    let (stranger, _e) = sdk::register(other.addr, "alice").await;
    assert_eq!(
        auth_error(server.addr, Credentials::Token(stranger.session().token)).await,
        ErrorCode::InvalidToken
    );
}

#[tokio::test]
async fn repeated_failures_are_rate_limited() {
    let server = TestServer::start_with(|c| c.login_failures = 3).await;
    let (_alice, _events) = sdk::register(server.addr, "alice").await;
    for _ in 0..3 {
        assert_eq!(
            auth_error(server.addr, login("alice", "bad password")).await,
            ErrorCode::InvalidCredentials
        );
    }
    // Even the right password is refused until the window passes.
    assert_eq!(
        auth_error(server.addr, login("alice", PASSWORD)).await,
        ErrorCode::RateLimited
    );
}

/// A registration storm at a real argon2 cost leaves the hashing threads'
/// buffers behind (concurrency × cost) and nothing per registration.
#[tokio::test]
async fn a_registration_storm_leaves_bounded_memory() {
    const COST_KIB: u64 = 8 * 1024;
    const CONCURRENCY: u64 = 2;
    const USERS: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let cost = COST_KIB.to_string();
    let concurrency = CONCURRENCY.to_string();
    let server = im_tests::ServerProcess::start_in(
        dir.path(),
        None,
        &[
            "--argon2-memory-kib",
            &cost,
            "--argon2-iterations",
            "1",
            "--hash-concurrency",
            &concurrency,
        ],
    );
    let before = server.rss_kib();
    let addr = server.addr;
    let tasks: Vec<_> = (0..USERS)
        .map(|i| {
            tokio::spawn(async move {
                let mut conn = im_tests::RawConn::connect(addr).await;
                assert!(conn.register(&format!("storm{i}")).await.user_id > 0);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let grown = server.rss_kib().saturating_sub(before);
    // The buffers of the hashing threads, plus room for the store's page
    // cache and the connections.
    let bound = CONCURRENCY * COST_KIB + 24 * 1024;
    assert!(
        grown <= bound,
        "{USERS} registrations left {grown} KiB more RSS (bound {bound} KiB)"
    );
}

/// Registering a taken name is answered without hashing its password: with
/// the only hashing thread busy and its one queue slot taken by new
/// registrations, a registration of a taken name still gets
/// USERNAME_TAKEN, where a hash would have been refused as OVERLOADED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_name_costs_no_password_hash() {
    use im_proto::pb::{self, frame::Body};
    let server = TestServer::start_with(|c| {
        c.hash_concurrency = 1;
        c.hash_queue = 1;
        // About a second per hash.
        c.argon2_memory_kib = 64 * 1024;
        c.argon2_iterations = 24;
    })
    .await;
    let mut first = im_tests::RawConn::connect(server.addr).await;
    first.register("taken").await;
    let register = |name: &str| {
        Body::Register(pb::RegisterRequest {
            username: name.into(),
            password: PASSWORD.into(),
            device_name: String::new(),
        })
    };
    // One hash running, one waiting: the pool is full.
    let mut busy = Vec::new();
    for name in ["newcomer1", "newcomer2"] {
        let mut conn = im_tests::RawConn::connect(server.addr).await;
        let id = conn.send(register(name)).await;
        busy.push((conn, id));
        // The first is taken up by the thread before the second queues.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut again = im_tests::RawConn::connect(server.addr).await;
    let id = again.send(register("Taken")).await;
    match again.reply_to(id).await {
        Body::Error(e) => assert_eq!(e.code, ErrorCode::UsernameTaken as i32, "{e:?}"),
        other => panic!("registering a taken name answered {other:?}"),
    }
    // The registrations that held the pool still complete.
    for (mut conn, id) in busy {
        assert!(matches!(conn.reply_to(id).await, Body::AuthOk(_)));
    }
}
