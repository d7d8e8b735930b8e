//! Registration, login, bad passwords, token resume and login rate limits.

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
