//! Abuse limits: a flood is refused with `RATE_LIMITED` and a retry time
//! (`Error.retry_after_ms`) while other users, connections and addresses
//! go on unaffected; every refusal is counted in `/metrics`. Limits are
//! per node: in a cluster, each node counts on its own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use im_proto::pb::frame::Body;
use im_proto::{ErrorCode, Frame, pb};
use im_server::config::Config;
use im_tests::{RawConn, TestServer, http_get, proxy_v2};

use crate::protocol::assert_alive;

fn text_send(to: u64, cmid: String) -> Body {
    Body::Send(pb::SendRequest {
        target: Some(pb::send_request::Target::ToUser(to)),
        client_msg_id: cmid,
        content: Some(pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text { text: "hi".into() })),
        }),
        resend: false,
    })
}

/// The error of a reply if it is `RATE_LIMITED`, checked to be non-fatal
/// and to carry a retry time (`None` for any other reply).
fn rate_limited(body: &Body) -> Option<u32> {
    match body {
        Body::Error(e) if e.code == ErrorCode::RateLimited as i32 => {
            assert!(!e.fatal, "a refused request must not close: {e:?}");
            assert!(e.retry_after_ms > 0, "no retry time: {e:?}");
            Some(e.retry_after_ms)
        }
        _ => None,
    }
}

/// Sends all of `bodies` at once, then reads every reply (skipping
/// pushes); returns them in request order.
async fn pipelined(conn: &mut RawConn, bodies: Vec<Body>) -> Vec<Body> {
    let mut ids = Vec::with_capacity(bodies.len());
    for body in bodies {
        ids.push(conn.send(body).await);
    }
    // Refusals overtake the replies that wait for storage.
    let mut replies: HashMap<u64, Body> = HashMap::new();
    while replies.len() < ids.len() {
        let frame = conn.recv().await;
        if frame.request_id != 0 {
            let body = frame.body.expect("reply has a body");
            assert!(
                replies.insert(frame.request_id, body).is_none(),
                "two replies to request {}",
                frame.request_id
            );
        }
    }
    ids.iter()
        .map(|id| replies.remove(id).expect("a reply to each request"))
        .collect()
}

/// `im_rate_limited_total{limit="..."}` now.
async fn refusals(server: &TestServer, limit: &str) -> f64 {
    let admin = server.node().admin_addr().expect("admin listener");
    let text = http_get(admin, "/metrics").await.expect("scrape").body;
    let sample = format!("im_rate_limited_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&sample))
        .unwrap_or_else(|| panic!("{sample} missing:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

fn with_admin(c: &mut Config) {
    c.admin_listen = Some("127.0.0.1:0".parse().expect("address"));
}

#[tokio::test]
async fn a_user_flooding_sends_is_refused_with_a_retry_time_while_another_is_not() {
    let server = TestServer::start_with(|c| {
        with_admin(c);
        c.max_msgs_per_user_per_sec = 5;
        c.msgs_burst_per_user = 10;
    })
    .await;
    let mut flooder = RawConn::connect(server.addr).await;
    let alice = flooder.register("alice").await.user_id;
    let mut calm = RawConn::connect(server.addr).await;
    let bob = calm.register("bob").await.user_id;

    // Alice sends 60 at once (and Bob his 10) within the same moment.
    let flood = (0..60).map(|i| text_send(bob, format!("f{i}"))).collect();
    let calm_sends = (0..10).map(|i| text_send(alice, format!("c{i}"))).collect();
    let (flood, calm_sends) = tokio::join!(
        pipelined(&mut flooder, flood),
        pipelined(&mut calm, calm_sends)
    );

    let acked = flood
        .iter()
        .filter(|b| matches!(b, Body::SendAck(_)))
        .count();
    let refused: Vec<u32> = flood.iter().filter_map(rate_limited).collect();
    assert_eq!(acked + refused.len(), 60, "{flood:?}");
    assert!((10..=15).contains(&acked), "burst of 10, then 5/s: {acked}");
    assert!(
        refused.iter().all(|&ms| ms <= 1000),
        "one token comes back every 200 ms: {refused:?}"
    );
    for (i, body) in calm_sends.iter().enumerate() {
        assert!(
            matches!(body, Body::SendAck(_)),
            "bob's send {i} refused: {body:?}"
        );
    }
    assert_eq!(
        refusals(&server, "messages_per_user").await,
        refused.len() as f64
    );

    // Refused, not cut off: after the wait a send goes through.
    let wait = refused.iter().copied().max().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(u64::from(wait))).await;
    assert_alive(&mut flooder, alice).await;
}

#[tokio::test]
async fn a_connection_flooding_requests_is_refused_and_stays_open() {
    let server = TestServer::start_with(|c| {
        with_admin(c);
        c.max_requests_per_conn_per_sec = 10;
    })
    .await;
    let mut flooder = RawConn::connect(server.addr).await;
    let me = flooder.register("carol").await.user_id;
    // The same user on a second connection has its own budget.
    let mut other = RawConn::connect(server.addr).await;
    other.login("carol").await;

    let lookup = || {
        Body::LookupUsers(pb::LookupUsersRequest {
            usernames: vec!["carol".into()],
            user_ids: Vec::new(),
        })
    };
    let flood = (0..40).map(|_| lookup()).collect();
    let replies = pipelined(&mut flooder, flood).await;
    let answered = replies
        .iter()
        .filter(|b| matches!(b, Body::UserList(_)))
        .count();
    let refused: Vec<u32> = replies.iter().filter_map(rate_limited).collect();
    assert_eq!(answered + refused.len(), 40, "one reply each: {replies:?}");
    assert!(
        (8..=12).contains(&answered),
        "10 at once (the registration took one): {answered}"
    );

    // Pings are not counted: the heartbeat always gets its pong.
    let ping = flooder.call(Body::Ping(pb::Ping {})).await;
    assert!(matches!(ping, Body::Pong(_)), "{ping:?}");
    for _ in 0..5 {
        let body = other.call(lookup()).await;
        assert!(matches!(body, Body::UserList(_)), "{body:?}");
    }
    assert_eq!(
        refusals(&server, "requests_per_conn").await,
        refused.len() as f64
    );

    // Still open: after the wait it is served again.
    let wait = refused.iter().copied().max().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(u64::from(wait))).await;
    assert_alive(&mut flooder, me).await;
}

/// Reads the fatal `RATE_LIMITED` a refused connection gets, then EOF;
/// returns its retry time.
async fn refused_connection(conn: &mut RawConn) -> u32 {
    let frames = conn.until_closed().await;
    match frames.as_slice() {
        [
            Frame {
                request_id: 0,
                body: Some(Body::Error(e)),
            },
        ] => {
            assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
            assert!(e.fatal, "{e:?}");
            assert!(e.retry_after_ms > 0, "{e:?}");
            e.retry_after_ms
        }
        other => panic!("expected one fatal RATE_LIMITED, got {other:?}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

#[tokio::test]
async fn connections_over_the_per_address_limit_are_refused_while_another_address_connects() {
    let server = TestServer::start_with(|c| {
        with_admin(c);
        c.max_conns_per_addr = 3;
        c.shards = 2;
    })
    .await;
    let mut held = Vec::new();
    for i in 0..3 {
        let mut conn = RawConn::connect_from(server.addr, ip("127.0.0.1")).await;
        conn.register(&format!("held{i}")).await;
        held.push(conn);
    }
    let mut fourth = RawConn::connect_from(server.addr, ip("127.0.0.1")).await;
    let wait = refused_connection(&mut fourth).await;
    assert!(wait <= 5_000, "{wait}");

    // Another address is not affected.
    let mut elsewhere = RawConn::connect_from(server.addr, ip("127.0.0.2")).await;
    let me = elsewhere.register("elsewhere").await.user_id;
    assert_alive(&mut elsewhere, me).await;
    assert_eq!(refusals(&server, "conns_per_addr").await, 1.0);

    // A place freed is a place taken again.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut conn = RawConn::connect_from(server.addr, ip("127.0.0.1")).await;
        let login = Body::Login(pb::LoginRequest {
            username: "held2".into(),
            password: im_tests::PASSWORD.into(),
            ..Default::default()
        });
        // Refused (closed) until the server has seen the close.
        let reply = call_or_closed(&mut conn, login).await;
        if matches!(reply, Some(Body::AuthOk(_))) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{reply:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `body` and returns the reply, or `None` if the connection was
/// closed first (after the fatal refusal).
async fn call_or_closed(conn: &mut RawConn, body: Body) -> Option<Body> {
    let id = conn.send(body).await;
    loop {
        let frame = conn.recv_within(5).await?;
        if frame.request_id == id {
            return frame.body;
        }
        if let Some(Body::Error(e)) = &frame.body {
            if e.fatal {
                assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
                assert!(e.retry_after_ms > 0, "{e:?}");
                return None;
            }
        }
    }
}

#[tokio::test]
async fn new_connections_per_address_are_rate_limited_by_the_address_a_balancer_names() {
    let server = TestServer::start_with(|c| {
        with_admin(c);
        c.max_new_conns_per_addr_per_sec = 3;
        c.proxy_protocol_from = vec!["127.0.0.2/32".parse().expect("CIDR")];
    })
    .await;
    let ping = || Body::Ping(pb::Ping {});

    // Directly from 127.0.0.1: three a second.
    let mut served = 0;
    let mut refused = 0;
    for _ in 0..6 {
        let mut conn = RawConn::connect_from(server.addr, ip("127.0.0.1")).await;
        match call_or_closed(&mut conn, ping()).await {
            Some(Body::Pong(_)) => served += 1,
            None => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        served >= 3 && refused >= 2,
        "{served} served, {refused} refused"
    );

    // Through the balancer at 127.0.0.2, the header's client counts: one
    // client is limited, another is not (nor is the balancer itself).
    let via = |client: &str| {
        let header = proxy_v2(SocketAddr::new(ip(client), 40_000), server.addr, &[]);
        let addr = server.addr;
        async move {
            let mut conn = RawConn::connect_from(addr, ip("127.0.0.2")).await;
            conn.write_raw(&header).await;
            conn
        }
    };
    let mut limited = 0;
    for _ in 0..6 {
        let mut conn = via("203.0.113.5").await;
        if call_or_closed(&mut conn, ping()).await.is_none() {
            limited += 1;
        }
    }
    assert!(limited >= 2, "{limited}");
    for _ in 0..3 {
        let mut conn = via("203.0.113.6").await;
        let reply = call_or_closed(&mut conn, ping()).await;
        assert!(matches!(reply, Some(Body::Pong(_))), "{reply:?}");
    }
    assert_eq!(
        refusals(&server, "new_conns_per_addr").await,
        f64::from(refused + limited)
    );
}

fn create_group(name: &str, members: Vec<u64>) -> Body {
    Body::CreateGroup(pb::CreateGroupRequest {
        name: name.into(),
        member_ids: members,
    })
}

#[tokio::test]
async fn group_creation_and_member_additions_are_limited_per_user() {
    let server = TestServer::start_with(|c| {
        with_admin(c);
        c.max_groups_created_per_user_per_hour = 2;
        c.max_members_added_per_minute = 4;
        c.max_groups_per_user = 3;
    })
    .await;
    let mut alice = RawConn::connect(server.addr).await;
    alice.register("alice").await;
    let mut bob = RawConn::connect(server.addr).await;
    let bob_id = bob.register("bob").await.user_id;
    let mut carol = RawConn::connect(server.addr).await;
    let carol_id = carol.register("carol").await.user_id;

    // Groups created per hour: the third within the hour is refused, for
    // about half an hour (one of two comes back every 30 minutes).
    let mut groups = Vec::new();
    for name in ["one", "two"] {
        match alice.call(create_group(name, vec![bob_id])).await {
            Body::Group(g) => groups.push(g.group_id),
            other => panic!("{other:?}"),
        }
    }
    let third = alice.call(create_group("three", Vec::new())).await;
    let wait = rate_limited(&third).unwrap_or_else(|| panic!("{third:?}"));
    assert!(
        (25 * 60_000..=30 * 60_000).contains(&wait),
        "{wait} ms to the next group"
    );
    // Another user is not affected.
    let body = carol.call(create_group("carol's", Vec::new())).await;
    assert!(matches!(body, Body::Group(_)), "{body:?}");

    // Members added per minute (4): two at creation, one now, and a
    // request for two more is refused.
    let add = |users: Vec<u64>| {
        Body::AddMembers(pb::AddMembersRequest {
            group_id: groups[0],
            user_ids: users,
        })
    };
    let body = alice.call(add(vec![carol_id])).await;
    assert!(matches!(body, Body::Group(_)), "{body:?}");
    let refused = alice.call(add(vec![carol_id, 999])).await;
    let wait = rate_limited(&refused).unwrap_or_else(|| panic!("{refused:?}"));
    assert!((1..=60_000).contains(&wait), "{wait}");
    assert_eq!(refusals(&server, "groups_created_per_user").await, 1.0);
    assert_eq!(refusals(&server, "members_added_per_user").await, 1.0);

    // Groups per user (memberships, held by the store): bob is in two of
    // alice's and joins carol's third; a fourth is refused, and waiting
    // is no remedy (retry_after_ms 0).
    let mut dave = RawConn::connect(server.addr).await;
    dave.register("dave").await;
    let into_carols = carol.call(create_group("carol's 2", vec![bob_id])).await;
    assert!(matches!(into_carols, Body::Group(_)), "{into_carols:?}");
    match dave.call(create_group("dave's", vec![bob_id])).await {
        Body::Error(e) => {
            assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
            assert_eq!(e.retry_after_ms, 0, "{e:?}");
            assert!(!e.fatal);
        }
        other => panic!("bob joined a fourth group: {other:?}"),
    }
    assert_eq!(refusals(&server, "groups_per_user").await, 1.0);
}

#[tokio::test]
async fn limits_are_per_node_so_a_flood_on_one_node_leaves_the_others_serving() {
    let cluster = im_tests::TestCluster::start_with(2, |c| {
        c.max_msgs_per_user_per_sec = 2;
        c.msgs_burst_per_user = 5;
    })
    .await;
    let mut on_a = RawConn::connect(cluster.addr(0)).await;
    let alice = on_a.register("nalice").await.user_id;
    let mut on_b = RawConn::connect(cluster.addr(1)).await;
    on_b.login("nalice").await;

    // Node A refuses the flood of alice's device there...
    let flood = (0..20).map(|i| text_send(alice, format!("a{i}"))).collect();
    let replies = pipelined(&mut on_a, flood).await;
    let refused = replies.iter().filter_map(rate_limited).count();
    assert!(refused >= 13, "{refused} of 20 refused");
    // ...while node B counts her sends there on its own: a full burst.
    let sends = (0..5).map(|i| text_send(alice, format!("b{i}"))).collect();
    for (i, body) in pipelined(&mut on_b, sends).await.iter().enumerate() {
        assert!(matches!(body, Body::SendAck(_)), "send {i} on B: {body:?}");
    }
    cluster.shutdown().await;
}
