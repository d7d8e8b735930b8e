//! Sessions: logout of one device or all, password change, the session
//! list and ending one session, the devices-per-user limit, and (in a
//! cluster) an end on one node closing the session's connection on
//! another.

use std::time::Duration;

use im_proto::ErrorCode;
use im_proto::pb::{self, frame::Body};
use im_tests::{PASSWORD, RawConn, TestCluster, TestServer, error_code, http_get, im_chat, metric};

/// A connection to `addr` logged in as `name` from `device`.
async fn device(addr: std::net::SocketAddr, name: &str, device: &str) -> (RawConn, pb::AuthOk) {
    let mut conn = RawConn::connect(addr).await;
    let ok = conn.login_device(name, device).await;
    (conn, ok)
}

/// What a fresh connection to `addr` gets when it resumes with `token`.
async fn resume_code(addr: std::net::SocketAddr, token: &str) -> Option<ErrorCode> {
    let mut conn = RawConn::connect(addr).await;
    let reply = conn.resume(token).await;
    error_code(&reply)
}

/// Asserts the connection is still open and served.
async fn still_served(conn: &mut RawConn) {
    let reply = conn.call(Body::Ping(pb::Ping {})).await;
    assert!(matches!(reply, Body::Pong(_)), "{reply:?}");
}

/// Asserts the connection gets a fatal SESSION_REVOKED and is closed.
async fn assert_revoked(conn: &mut RawConn) {
    let e = conn.fatal_error(5).await;
    assert_eq!(e.code, ErrorCode::SessionRevoked as i32, "{e:?}");
    // Nothing but the close follows.
    assert!(conn.recv_within(5).await.is_none(), "still open");
}

fn done(body: &Body) {
    assert!(matches!(body, Body::Done(_)), "{body:?}");
}

#[tokio::test]
async fn logout_ends_this_device_only_and_logout_all_ends_every_device() {
    let server = TestServer::start().await;
    let mut first = RawConn::connect(server.addr).await;
    let first_ok = first.register("lalice").await;
    let (mut phone, phone_ok) = device(server.addr, "lalice", "phone").await;
    let (mut tablet, _) = device(server.addr, "lalice", "tablet").await;
    assert_ne!(first_ok.session_id, phone_ok.session_id);

    done(
        &phone
            .call(Body::Logout(pb::LogoutRequest { all: false }))
            .await,
    );
    assert_revoked(&mut phone).await;
    still_served(&mut first).await;
    still_served(&mut tablet).await;
    assert_eq!(
        resume_code(server.addr, &phone_ok.token).await,
        Some(ErrorCode::InvalidToken)
    );

    // The first device's token still resumes, into the same session.
    let mut again = RawConn::connect(server.addr).await;
    let Body::AuthOk(resumed) = again.resume(&first_ok.token).await else {
        panic!("resume refused");
    };
    assert_eq!(resumed.session_id, first_ok.session_id);

    done(
        &tablet
            .call(Body::Logout(pb::LogoutRequest { all: true }))
            .await,
    );
    for conn in [&mut tablet, &mut first, &mut again] {
        assert_revoked(conn).await;
    }
    for token in [&first_ok.token, &resumed.token] {
        assert_eq!(
            resume_code(server.addr, token).await,
            Some(ErrorCode::InvalidToken)
        );
    }
    // A password login still works and starts a new session.
    let (mut fresh, fresh_ok) = device(server.addr, "lalice", "phone").await;
    assert_ne!(fresh_ok.session_id, phone_ok.session_id);
    still_served(&mut fresh).await;
}

#[tokio::test]
async fn password_change_ends_every_other_session_but_keeps_this_one() {
    let server = TestServer::start().await;
    let mut this = RawConn::connect(server.addr).await;
    let this_ok = this.register("palice").await;
    let (mut other, other_ok) = device(server.addr, "palice", "laptop").await;

    let wrong = this
        .call(Body::ChangePassword(pb::ChangePasswordRequest {
            old_password: "not the password".into(),
            new_password: "a new password".into(),
        }))
        .await;
    assert_eq!(error_code(&wrong), Some(ErrorCode::InvalidCredentials));
    still_served(&mut other).await;
    let short = this
        .call(Body::ChangePassword(pb::ChangePasswordRequest {
            old_password: PASSWORD.into(),
            new_password: "short".into(),
        }))
        .await;
    assert_eq!(error_code(&short), Some(ErrorCode::InvalidArgument));

    done(
        &this
            .call(Body::ChangePassword(pb::ChangePasswordRequest {
                old_password: PASSWORD.into(),
                new_password: "a new password".into(),
            }))
            .await,
    );
    assert_revoked(&mut other).await;
    still_served(&mut this).await;
    assert_eq!(
        resume_code(server.addr, &other_ok.token).await,
        Some(ErrorCode::InvalidToken)
    );
    let mut resumed = RawConn::connect(server.addr).await;
    assert!(matches!(
        resumed.resume(&this_ok.token).await,
        Body::AuthOk(_)
    ));

    let mut conn = RawConn::connect(server.addr).await;
    let old = conn
        .call(Body::Login(pb::LoginRequest {
            username: "palice".into(),
            password: PASSWORD.into(),
            device_name: String::new(),
        }))
        .await;
    assert_eq!(error_code(&old), Some(ErrorCode::InvalidCredentials));
    let new = conn
        .call(Body::Login(pb::LoginRequest {
            username: "palice".into(),
            password: "a new password".into(),
            device_name: String::new(),
        }))
        .await;
    assert!(matches!(new, Body::AuthOk(_)), "{new:?}");
}

async fn list(conn: &mut RawConn) -> Vec<pb::SessionInfo> {
    match conn
        .call(Body::ListSessions(pb::ListSessionsRequest {}))
        .await
    {
        Body::SessionList(list) => list.sessions,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn session_list_shows_devices_and_addresses_and_end_ends_one() {
    let server = TestServer::start().await;
    let mut first = RawConn::connect(server.addr).await;
    let first_ok = first.register("salice").await;
    let (mut phone, phone_ok) = device(server.addr, "salice", "phone").await;
    let (mut laptop, laptop_ok) = device(server.addr, "salice", "work laptop").await;
    let mut bob = RawConn::connect(server.addr).await;
    bob.register("sbob").await;

    let sessions = list(&mut phone).await;
    let names: Vec<&str> = sessions.iter().map(|s| s.device_name.as_str()).collect();
    assert_eq!(names, ["work laptop", "phone", ""], "newest first");
    assert!(
        sessions.iter().all(|s| s.address == "127.0.0.1"),
        "{sessions:?}"
    );
    assert!(
        sessions
            .iter()
            .all(|s| s.created_ms > 0 && s.last_seen_ms >= s.created_ms)
    );
    let current: Vec<u64> = sessions
        .iter()
        .filter(|s| s.current)
        .map(|s| s.session_id)
        .collect();
    assert_eq!(current, [phone_ok.session_id]);

    // Another user's session, or one that does not exist, is not ours.
    for id in [laptop_ok.session_id + 1000, laptop_ok.session_id] {
        let reply = bob
            .call(Body::EndSession(pb::EndSessionRequest { session_id: id }))
            .await;
        assert_eq!(error_code(&reply), Some(ErrorCode::NotFound));
    }
    still_served(&mut laptop).await;

    done(
        &phone
            .call(Body::EndSession(pb::EndSessionRequest {
                session_id: laptop_ok.session_id,
            }))
            .await,
    );
    assert_revoked(&mut laptop).await;
    still_served(&mut phone).await;
    still_served(&mut first).await;
    let left: Vec<u64> = list(&mut first)
        .await
        .iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(left, [phone_ok.session_id, first_ok.session_id]);
    assert_eq!(
        resume_code(server.addr, &laptop_ok.token).await,
        Some(ErrorCode::InvalidToken)
    );

    // Last seen moves with a resume (written in batches, within seconds).
    let before = list(&mut first).await[0].last_seen_ms;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut again = RawConn::connect(server.addr).await;
    assert!(matches!(
        again.resume(&phone_ok.token).await,
        Body::AuthOk(_)
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = list(&mut first).await[0].last_seen_ms;
        if seen > before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "last seen never moved"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_login_past_the_device_limit_ends_the_least_recently_used_session() {
    let server = TestServer::start_with(|c| {
        c.max_devices_per_user = 2;
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut oldest = RawConn::connect(server.addr).await;
    let oldest_ok = oldest.register("dalice").await;
    let (mut second, _) = device(server.addr, "dalice", "second").await;
    let (mut third, _) = device(server.addr, "dalice", "third").await;
    assert_revoked(&mut oldest).await;
    still_served(&mut second).await;
    still_served(&mut third).await;
    assert_eq!(
        resume_code(server.addr, &oldest_ok.token).await,
        Some(ErrorCode::InvalidToken)
    );
    assert_eq!(list(&mut third).await.len(), 2);

    let admin = server.node().admin_addr().expect("admin listener");
    let metrics = http_get(admin, "/metrics").await.expect("scrape").body;
    assert_eq!(
        metric(&metrics, "im_sessions_ended_by_device_limit_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "im_sessions_ended_total"), Some(1.0));
}

#[tokio::test]
async fn a_session_ended_on_one_node_is_closed_and_refused_on_the_others() {
    let cluster = TestCluster::start(2).await;
    let mut on_a = RawConn::connect(cluster.addr(0)).await;
    on_a.register("calice").await;
    let (mut on_b, on_b_ok) = device(cluster.addr(1), "calice", "on node b").await;

    let started = std::time::Instant::now();
    done(
        &on_a
            .call(Body::Logout(pb::LogoutRequest { all: true }))
            .await,
    );
    assert_revoked(&mut on_b).await;
    // Well within the store poll (3 s): the envelope did it.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_revoked(&mut on_a).await;
    for node in 0..2 {
        assert_eq!(
            resume_code(cluster.addr(node), &on_b_ok.token).await,
            Some(ErrorCode::InvalidToken),
            "node {node}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn im_chat_lists_and_ends_sessions_changes_the_password_and_logs_out_everywhere() {
    let server = TestServer::start().await;
    let (laptop, phone) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let pw = format!("--password={PASSWORD}");
    let (ok, _, err) = im_chat(
        server.addr,
        laptop.path(),
        &["register", "ialice", &pw, "--device-name", "laptop"],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = im_chat(
        server.addr,
        phone.path(),
        &["login", "ialice", &pw, "--device-name", "phone"],
    )
    .await;
    assert!(ok, "{err}");

    let (ok, sessions, err) = im_chat(server.addr, laptop.path(), &["sessions"]).await;
    assert!(ok, "{err}");
    let names: Vec<&str> = sessions
        .iter()
        .map(|s| s["device_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["phone", "laptop"]);
    assert_eq!(sessions[1]["current"], true);
    assert_eq!(sessions[0]["address"], "127.0.0.1");
    let phone_id = sessions[0]["session_id"].as_u64().unwrap().to_string();

    let (ok, _, err) = im_chat(server.addr, laptop.path(), &["sessions", "end", &phone_id]).await;
    assert!(ok, "{err}");
    // The phone's saved session no longer works.
    let (ok, _, err) = im_chat(server.addr, phone.path(), &["sessions"]).await;
    assert!(!ok);
    assert!(
        err.contains("INVALID_TOKEN") || err.contains("log in again"),
        "{err}"
    );

    let (ok, _, err) = im_chat(
        server.addr,
        phone.path(),
        &["login", "ialice", &pw, "--device-name", "phone"],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = im_chat(
        server.addr,
        laptop.path(),
        &[
            "password",
            &format!("--old={PASSWORD}"),
            "--new=another password",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, _) = im_chat(server.addr, phone.path(), &["sessions"]).await;
    assert!(!ok, "the phone's session ended with the password change");
    let (ok, sessions, err) = im_chat(server.addr, laptop.path(), &["sessions"]).await;
    assert!(ok, "{err}");
    assert_eq!(sessions.len(), 1, "{sessions:?}");

    let (ok, _, err) = im_chat(
        server.addr,
        phone.path(),
        &["login", "ialice", "--password=another password"],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, err) = im_chat(server.addr, laptop.path(), &["logout", "--all"]).await;
    assert!(ok, "{err}");
    assert_eq!(out[0]["all"], true);
    let (ok, _, _) = im_chat(server.addr, phone.path(), &["sessions"]).await;
    assert!(!ok, "logout --all ended the phone's session too");
    let (ok, _, err) = im_chat(server.addr, laptop.path(), &["sessions"]).await;
    assert!(!ok);
    assert!(err.contains("not logged in"), "{err}");
}

#[tokio::test]
async fn ended_sessions_stay_ended_across_a_restart() {
    let mut server = TestServer::start().await;
    let mut kept = RawConn::connect(server.addr).await;
    let kept_ok = kept.register("ralice").await;
    let (mut ended, ended_ok) = device(server.addr, "ralice", "old phone").await;
    done(
        &ended
            .call(Body::Logout(pb::LogoutRequest { all: false }))
            .await,
    );
    assert_revoked(&mut ended).await;
    drop(kept);

    server.restart().await;
    assert_eq!(
        resume_code(server.addr, &ended_ok.token).await,
        Some(ErrorCode::InvalidToken),
        "the end was loaded at start"
    );
    let mut again = RawConn::connect(server.addr).await;
    let Body::AuthOk(ok) = again.resume(&kept_ok.token).await else {
        panic!("the live session was refused after the restart");
    };
    assert_eq!(ok.session_id, kept_ok.session_id);
    let names: Vec<String> = list(&mut again)
        .await
        .into_iter()
        .map(|s| s.device_name)
        .collect();
    assert_eq!(names, [""], "the ended session is not listed");
}

#[tokio::test]
async fn an_end_whose_envelope_never_came_is_found_by_polling_the_store() {
    use mysql_async::prelude::Queryable;
    let cluster = TestCluster::start(2).await;
    let (mut on_b, ok) = {
        let mut conn = RawConn::connect(cluster.addr(1)).await;
        let ok = conn.register("galice").await;
        (conn, ok)
    };
    // Ended in MySQL behind the nodes' backs: no node publishes anything,
    // as when the envelope was lost.
    let pool = mysql_async::Pool::new(cluster.env.mysql_url.as_str());
    let mut db = pool.get_conn().await.expect("mysql");
    db.exec_drop(
        "UPDATE sessions SET ended_ms = ? WHERE id = ?",
        (im_proto::now_ms(), ok.session_id),
    )
    .await
    .expect("end the session");
    drop(db);
    pool.disconnect().await.expect("disconnect");

    let started = std::time::Instant::now();
    assert_revoked(&mut on_b).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for node in 0..2 {
        assert_eq!(
            resume_code(cluster.addr(node), &ok.token).await,
            Some(ErrorCode::InvalidToken),
            "node {node}"
        );
    }
    cluster.shutdown().await;
}
