//! Several nodes as one service (always on Redis and MariaDB, whatever
//! `IM_TEST_STORE` says): pushes, receipts, group fan-out and presence
//! cross nodes live, membership changes reach every node's fan-out, and a
//! node whose subscription is cut tells its sessions to sync.

use std::time::{Duration, Instant};

use im_proto::pb::frame::Body;
use im_proto::pb::{self, send_request::Target};
use im_proto::{ConversationId, ErrorCode};
use im_tests::{RawConn, TestCluster, error_code};

/// A user logged in on node `i` of the cluster.
async fn user(cluster: &TestCluster, i: usize, name: &str, register: bool) -> (RawConn, u64) {
    let mut conn = RawConn::connect(cluster.addr(i)).await;
    let ok = if register {
        conn.register(name).await
    } else {
        conn.login(name).await
    };
    (conn, ok.user_id)
}

use im_tests::sdk::text_of as text;

#[tokio::test]
async fn direct_messages_cross_nodes_live() {
    let cluster = TestCluster::start(2).await;
    let (mut alice, alice_id) = user(&cluster, 0, "xalice", true).await;
    let (mut bob, bob_id) = user(&cluster, 1, "xbob", true).await;
    for i in 0..20 {
        let ack = bob
            .send_text_to_user(alice_id, &format!("b{i}"), &format!("hello {i}"))
            .await;
        let m = alice.pushed_message(5).await;
        assert_eq!((m.seq, m.sender_id), (ack.seq, bob_id));
        assert_eq!(text(&m), format!("hello {i}"));
    }
    let ack = alice.send_text_to_user(bob_id, "a0", "back").await;
    let m = bob.pushed_message(5).await;
    assert_eq!((m.seq, text(&m)), (ack.seq, "back"));
    let stats = cluster.node(1).cluster_stats().expect("a cluster node");
    assert!(stats.forwarded >= 20, "{stats:?}");
    assert_eq!(stats.live_nodes, 2);
    cluster.shutdown().await;
}

#[tokio::test]
async fn one_users_devices_on_three_nodes_get_every_push_and_each_others_receipts() {
    let cluster = TestCluster::start(3).await;
    let (mut bob, bob_id) = user(&cluster, 0, "mbob", true).await;
    let (mut phone, alice_id) = user(&cluster, 0, "malice", true).await;
    let (mut desktop, _) = user(&cluster, 1, "malice", false).await;
    let (mut tablet, _) = user(&cluster, 2, "malice", false).await;

    let ack = bob
        .send_text_to_user(alice_id, "m1", "to every device")
        .await;
    for device in [&mut phone, &mut desktop, &mut tablet] {
        let m = device.pushed_message(5).await;
        assert_eq!(m.seq, ack.seq);
    }
    // The desktop reads it: the phone, the tablet and bob learn it.
    let done = desktop
        .call(Body::Ack(pb::AckRequest {
            conversation_id: ack.conversation_id,
            seq: ack.seq,
            kind: pb::ReceiptKind::Read as i32,
        }))
        .await;
    assert!(matches!(done, Body::Done(_)), "{done:?}");
    for device in [&mut phone, &mut tablet, &mut bob] {
        let receipt = device
            .push_where(5, |b| match b {
                Body::Receipt(r) => Some(*r),
                _ => None,
            })
            .await;
        assert_eq!((receipt.user_id, receipt.seq), (alice_id, ack.seq));
    }
    // What one device sends reaches the others too.
    let ack = tablet
        .send_text_to_user(bob_id, "t1", "from the tablet")
        .await;
    for device in [&mut phone, &mut desktop, &mut bob] {
        assert_eq!(device.pushed_message(5).await.seq, ack.seq);
    }
    cluster.shutdown().await;
}

async fn group_on_every_node(broadcast_above: usize) {
    let cluster =
        TestCluster::start_with(3, move |c| c.group_broadcast_members = broadcast_above).await;
    let tag = broadcast_above;
    let mut conns = Vec::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        let (conn, id) = user(&cluster, i % 3, &format!("g{tag}u{i}"), true).await;
        conns.push(conn);
        ids.push(id);
    }
    let created = conns[0]
        .call(Body::CreateGroup(pb::CreateGroupRequest {
            name: "everywhere".into(),
            member_ids: ids[1..].to_vec(),
        }))
        .await;
    let Body::Group(group) = created else {
        panic!("create group: {created:?}")
    };
    // Everyone sees the creation notice, then a message from each member.
    for conn in conns.iter_mut().skip(1) {
        conn.pushed_message(5).await;
    }
    for sender in 0..6 {
        let ack = conns[sender]
            .send_text(
                Target::ConversationId(group.conversation_id),
                &format!("s{sender}"),
                "to the group",
            )
            .await;
        for (i, conn) in conns.iter_mut().enumerate() {
            if i != sender {
                let m = conn.pushed_message(5).await;
                assert_eq!((m.seq, m.sender_id), (ack.seq, ids[sender]));
            }
        }
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_group_routed_to_its_members_nodes_reaches_members_on_every_node() {
    group_on_every_node(100).await;
}

#[tokio::test]
async fn a_group_broadcast_to_every_node_reaches_members_on_every_node() {
    group_on_every_node(1).await;
}

async fn presence_of(conn: &mut RawConn, user: u64, online: bool, within: Duration) -> Duration {
    let start = Instant::now();
    conn.push_where(within.as_secs().max(1), |b| match b {
        Body::Presence(p) if p.user_id == user && p.online == online => Some(()),
        _ => None,
    })
    .await;
    start.elapsed()
}

#[tokio::test]
async fn presence_crosses_nodes_and_counts_every_device() {
    let cluster = TestCluster::start(3).await;
    let (mut watcher, _) = user(&cluster, 0, "pwatcher", true).await;
    let (first, bob_id) = user(&cluster, 1, "pbob", true).await;
    let snapshot = watcher
        .call(Body::PresenceSubscribe(pb::PresenceSubscribeRequest {
            user_ids: vec![bob_id],
        }))
        .await;
    let Body::PresenceSnapshot(snapshot) = snapshot else {
        panic!("{snapshot:?}")
    };
    assert!(
        snapshot.users[0].online,
        "the snapshot reads other nodes' routes"
    );
    // Bob leaves node 1 while his device on node 2 stays: still online.
    let (_second, _) = user(&cluster, 2, "pbob", false).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Then the last device goes: offline within a second.
    drop(_second);
    let took = presence_of(&mut watcher, bob_id, false, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(1), "offline seen after {took:?}");
    // And back online on node 1.
    let (_again, _) = user(&cluster, 1, "pbob", false).await;
    let took = presence_of(&mut watcher, bob_id, true, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(1), "online seen after {took:?}");
    // Node 1 shuts down: its users go offline for watchers elsewhere.
    let mut cluster = cluster;
    cluster.stop(1).await;
    let took = presence_of(&mut watcher, bob_id, false, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(1), "offline seen after {took:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_membership_change_reaches_every_nodes_fan_out_before_its_notice() {
    // Cached member lists would live a minute: only the change itself may
    // refresh them.
    let cluster = TestCluster::start_with(3, |c| c.member_cache_ttl_secs = 60).await;
    let (mut owner, _) = user(&cluster, 0, "cowner", true).await;
    let (mut sender, sender_id) = user(&cluster, 1, "csender", true).await;
    let (mut leaver, leaver_id) = user(&cluster, 2, "cleaver", true).await;
    let (mut joiner, joiner_id) = user(&cluster, 2, "cjoiner", true).await;
    let created = owner
        .call(Body::CreateGroup(pb::CreateGroupRequest {
            name: "changing".into(),
            member_ids: vec![sender_id, leaver_id],
        }))
        .await;
    let Body::Group(group) = created else {
        panic!("{created:?}")
    };
    let conv = Target::ConversationId(group.conversation_id);
    // Every node caches the member list by fanning a message out.
    sender.send_text(conv, "warm", "warm").await;
    leaver.pushed_message(5).await; // the creation notice
    assert_eq!(text(&leaver.pushed_message(5).await), "warm");

    // Remove through node 0, send through node 1 at once.
    let removed = owner
        .call(Body::RemoveMembers(pb::RemoveMembersRequest {
            group_id: group.group_id,
            user_ids: vec![leaver_id],
        }))
        .await;
    assert!(matches!(removed, Body::Group(_)), "{removed:?}");
    let ack = sender.send_text(conv, "after", "after the removal").await;
    // The removed member sees the removal notice and nothing after it.
    let notice = leaver.pushed_message(5).await;
    assert!(notice.seq < ack.seq, "{notice:?}");
    leaver.no_message_within(500).await;

    // Add through node 0: node 1's next message reaches the joiner on 2.
    let added = owner
        .call(Body::AddMembers(pb::AddMembersRequest {
            group_id: group.group_id,
            user_ids: vec![joiner_id],
        }))
        .await;
    assert!(matches!(added, Body::Group(_)), "{added:?}");
    let ack = sender.send_text(conv, "welcome", "welcome").await;
    let notice = joiner.pushed_message(5).await;
    assert!(notice.seq < ack.seq);
    let m = joiner.pushed_message(5).await;
    assert_eq!((m.seq, text(&m)), (ack.seq, "welcome"));
    // A removed member cannot send either (checked at the append).
    let refused = leaver
        .call(Body::Send(pb::SendRequest {
            target: Some(conv),
            client_msg_id: "late".into(),
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text { text: "x".into() })),
            }),
            resend: false,
        }))
        .await;
    assert_eq!(error_code(&refused), Some(ErrorCode::Forbidden));
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_node_whose_subscription_is_cut_tells_its_sessions_to_sync() {
    let cluster = TestCluster::start(2).await;
    let (mut alice, alice_id) = user(&cluster, 0, "salice", true).await;
    let (mut bob, _) = user(&cluster, 1, "sbob", true).await;
    let ack = bob.send_text_to_user(alice_id, "before", "before").await;
    assert_eq!(alice.pushed_message(5).await.seq, ack.seq);

    // Redis drops alice's node's subscriber connection (as its output
    // buffer limit would), and messages are sent meanwhile.
    let incarnation = cluster.node(0).cluster_stats().unwrap().incarnation;
    // The subscription sits on the master serving the node's channel.
    let channel = format!("{}:push:{{{incarnation}}}", cluster.env.prefix);
    let info = cluster
        .env
        .redis_target()
        .master_of(channel.as_bytes())
        .await
        .unwrap();
    let redis = redis::Client::open(info).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    let name = format!("{}-node-{incarnation}", cluster.env.prefix);
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    let id = clients
        .lines()
        .find(|l| l.contains(&format!(" name={name} ")))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .expect("the node's subscriber connection is listed")
        .to_string();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let mut acked = Vec::new();
    for i in 0..5 {
        acked.push(
            bob.send_text_to_user(alice_id, &format!("cut{i}"), "while cut")
                .await
                .seq,
        );
    }
    // Alice's node says so; her sync has everything.
    let hint = alice
        .push_where(5, |b| match b {
            Body::SyncHint(h) => Some(h.clone()),
            _ => None,
        })
        .await;
    assert!(hint.conversation_ids.is_empty(), "a hint for everything");
    let conversation = ConversationId::from_raw(ack.conversation_id).unwrap();
    let page = alice
        .call(Body::Sync(pb::SyncRequest {
            cursors: vec![pb::ConvCursor {
                conversation_id: conversation.raw(),
                seq: ack.seq,
            }],
            limit: 50,
        }))
        .await;
    let Body::SyncResponse(page) = page else {
        panic!("{page:?}")
    };
    let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, acked);
    assert!(cluster.node(0).cluster_stats().unwrap().hints >= 1);
    // And pushes flow again without a reconnect (some of those sent while
    // cut may have been pushed as well, once the subscription was back).
    let ack = bob.send_text_to_user(alice_id, "after", "after").await;
    loop {
        let m = alice.pushed_message(5).await;
        if m.seq == ack.seq {
            break;
        }
        assert!(acked.contains(&m.seq), "{m:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_node_whose_lease_lapsed_rejoins_and_gets_pushes_again() {
    let cluster = TestCluster::start(2).await;
    let (mut alice, alice_id) = user(&cluster, 0, "lalice", true).await;
    let (mut bob, _) = user(&cluster, 1, "lbob", true).await;
    let before = cluster.node(0).cluster_stats().unwrap();
    // As if node 0 had been cut off from Redis for a whole lease: the
    // others count it dead.
    let mut admin = cluster.env.redis_conn().await;
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{}:node:node0", cluster.env.prefix))
        .query_async(&mut admin)
        .await
        .unwrap();
    // It rejoins under a new incarnation and tells its sessions to sync.
    alice
        .push_where(5, |b| matches!(b, Body::SyncHint(_)).then_some(()))
        .await;
    let after = cluster.node(0).cluster_stats().unwrap();
    assert!(after.incarnation > before.incarnation, "{after:?}");
    assert_eq!(after.reregistered, 1);
    // Sent at once, while node 1 may not know the new incarnation nor see
    // alice's rewritten route: it is pushed live, or the hint that node 0
    // sends once the cluster has settled makes alice sync and find it.
    let early = bob
        .send_text_to_user(alice_id, "l0", "during the rejoin")
        .await;
    let live = alice
        .push_where(10, |b| match b {
            Body::Message(m) if m.seq == early.seq => Some(true),
            Body::SyncHint(_) => Some(false),
            _ => None,
        })
        .await;
    if !live {
        let page = alice
            .call(Body::Sync(pb::SyncRequest {
                cursors: vec![pb::ConvCursor {
                    conversation_id: early.conversation_id,
                    seq: 0,
                }],
                limit: 50,
            }))
            .await;
        let Body::SyncResponse(page) = page else {
            panic!("{page:?}")
        };
        assert!(page.messages.iter().any(|m| m.seq == early.seq), "{page:?}");
    }
    // Once node 1 counts the new incarnation live and alice's route is
    // written again, pushes reach her live.
    let route = format!("{}:rt:{alice_id}", cluster.env.prefix);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let routes: Vec<u64> = redis::cmd("SMEMBERS")
            .arg(&route)
            .query_async(&mut admin)
            .await
            .unwrap();
        let peer = cluster.node(1).cluster_stats().unwrap();
        if routes.contains(&after.incarnation) && peer.live_nodes == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "routes {routes:?}, node 1 {peer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ack = bob
        .send_text_to_user(alice_id, "l1", "after the rejoin")
        .await;
    loop {
        let m = alice.pushed_message(5).await;
        if m.seq == ack.seq {
            break;
        }
    }
    cluster.shutdown().await;
}

async fn load(cluster: &TestCluster, nodes: &[usize], flags: &[&str]) -> im_loadgen::Report {
    use clap::Parser;
    let servers: Vec<String> = nodes.iter().map(|&i| cluster.addr(i).to_string()).collect();
    let servers = servers.join(",");
    let mut argv = vec![
        "im-loadgen",
        "--server",
        &servers,
        "--quiet",
        "--warmup",
        "1",
        "--settle",
        "2",
    ];
    argv.extend_from_slice(flags);
    let args = im_loadgen::Args::try_parse_from(argv).expect("valid flags");
    let (report, _) = im_loadgen::run(args).await.expect("load run");
    assert!(!report.failed(), "verification failed: {report:#?}");
    assert_eq!(report.messages_lost, 0, "{report:#?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_run_over_three_nodes_needs_no_sync() {
    let cluster = TestCluster::start(3).await;
    for (scenario, recipients) in [
        (&["--scenario", "direct", "--connections", "120"][..], 1),
        (
            &[
                "--scenario",
                "group",
                "--group-size",
                "6",
                "--connections",
                "60",
            ][..],
            5,
        ),
    ] {
        let mut flags = scenario.to_vec();
        flags.extend([
            "--rate",
            "1000",
            "--duration",
            "2",
            "--cross-node-fraction",
            "0.5",
        ]);
        let r = load(&cluster, &[0, 1, 2], &flags).await;
        assert_eq!(r.connections_established, r.connections_target);
        // Half the conversations cross nodes, half stay on one.
        assert!(r.cross_node_deliveries > 0, "{r:#?}");
        assert!(r.latency_us.same_node.count > 0, "{r:#?}");
        assert!(r.latency_us.cross_node.count > 0, "{r:#?}");
        // A healthy cluster delivers everything live.
        assert_eq!(r.messages_recovered, 0, "{r:#?}");
        // (Group creation notices are delivered too.)
        assert!(
            r.messages_delivered >= r.messages_acked * recipients,
            "{r:#?}"
        );
    }
    cluster.shutdown().await;
}

/// Sends still unanswered when the load stops (their appends wait behind
/// a pause of Redis writes, while reads go on) are answered after the
/// settle time: the load generator waits for every answer before its
/// final sync, so none of them counts as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_run_waits_for_late_acks_before_its_final_sync() {
    // Its own Redis: the test pauses its writes.
    let redis_server = im_tests::services::RedisServer::start(false);
    let env = im_tests::PipelineEnv::fresh_on(redis_server.url());
    // A lease that outlives the pause.
    let cluster = TestCluster::start_on(env, 1, |c| c.lease_secs = 30).await;
    let run = direct_load_in_background(cluster.addr(0).to_string(), "3", "0");
    // The load stops about 4 s from now; appends wait from 3.4 s to 5.9 s.
    tokio::time::sleep(Duration::from_millis(3400)).await;
    redis_server.pause_writes(2500).await;
    let r = run.await.unwrap();
    assert!(!r.failed(), "verification failed: {r:#?}");
    assert_eq!(r.messages_lost, 0, "{r:#?}");
    assert_eq!(r.messages_acked, r.messages_sent, "{r:#?}");
    assert_eq!(r.messages_delivered, r.messages_acked, "{r:#?}");
    // Acks that came during the pause were seconds late.
    assert!(r.latency_us.ack.max > 1_000_000, "{:?}", r.latency_us.ack);
    cluster.shutdown().await;
}

/// A verified 1:1 load run of 90 connections at 600 msgs/s over `servers`,
/// started in the background (for a test that breaks a node meanwhile).
fn direct_load_in_background(
    servers: String,
    duration: &'static str,
    settle: &'static str,
) -> tokio::task::JoinHandle<im_loadgen::Report> {
    tokio::spawn(async move {
        use clap::Parser;
        let args = im_loadgen::Args::try_parse_from([
            "im-loadgen",
            "--server",
            &servers,
            "--quiet",
            "--scenario",
            "direct",
            "--connections",
            "90",
            "--rate",
            "600",
            "--warmup",
            "1",
            "--duration",
            duration,
            "--settle",
            settle,
        ])
        .expect("valid flags");
        im_loadgen::run(args).await.expect("load run").0
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_node_that_goes_move_to_the_others_and_lose_nothing() {
    let mut cluster = TestCluster::start(3).await;
    let servers: Vec<String> = (0..3).map(|i| cluster.addr(i).to_string()).collect();
    let servers = servers.join(",");
    let run = direct_load_in_background(servers, "5", "2");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.stop(2).await;
    let r = run.await.unwrap();
    assert!(!r.failed(), "verification failed: {r:#?}");
    assert_eq!(r.messages_lost, 0, "{r:#?}");
    assert!(r.cross_node_deliveries > 0, "{r:#?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_sdk_client_given_several_nodes_moves_on_when_its_node_goes() {
    use im_tests::sdk;
    let mut cluster = TestCluster::start(3).await;
    let (mut bob, _) = user(&cluster, 0, "fbob", true).await;
    // A dead address first in the list is skipped.
    let servers = format!(
        "127.0.0.1:{},{},{}",
        im_tests::free_port(),
        cluster.addr(1),
        cluster.addr(2)
    );
    let mut config = sdk::config(cluster.addr(1));
    config.server = servers;
    let (alice, mut events) = sdk::connect(
        config,
        im_client::Credentials::Register {
            username: "falice".into(),
            password: im_tests::PASSWORD.into(),
        },
    )
    .await;
    let alice_id = alice.user_id();
    let ack = bob.send_text_to_user(alice_id, "f0", "first").await;
    assert_eq!(sdk::next_message(&mut events, 5).await.seq, ack.seq);
    // Her node goes; bob goes on sending meanwhile.
    let hers = if cluster.node(1).online_users() > 0 {
        1
    } else {
        2
    };
    cluster.stop(hers).await;
    let mut acked = Vec::new();
    for i in 1..=10 {
        acked.push(
            bob.send_text_to_user(alice_id, &format!("f{i}"), "meanwhile")
                .await
                .seq,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // She resumes on the other node and gets each exactly once, in order.
    let got: Vec<u64> = sdk::messages(&mut events, 10, 10)
        .await
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(got, acked);
    sdk::no_message(&mut events, 300).await;
    alice.close().await;
    cluster.shutdown().await;
}

/// `im-server` processes of one cluster on `env`.
fn node_process(
    env: &im_tests::PipelineEnv,
    dir: &std::path::Path,
    id: &str,
) -> im_tests::ServerProcess {
    im_tests::ServerProcess::start_in(
        dir,
        Some(env),
        &[
            "--node-id",
            id,
            "--token-secret",
            im_tests::CLUSTER_SECRET,
            "--lease-secs",
            "3",
        ],
    )
}

#[tokio::test]
async fn a_node_killed_is_dead_for_the_others_within_its_lease_and_its_id_can_be_taken() {
    let env = im_tests::PipelineEnv::fresh();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let p0 = node_process(&env, dirs[0].path(), "k0");
    let mut p1 = node_process(&env, dirs[1].path(), "k1");
    let mut watcher = RawConn::connect(p0.addr).await;
    watcher.register("kwatcher").await;
    let mut bob = RawConn::connect(p1.addr).await;
    let bob_id = bob.register("kbob").await.user_id;
    let snapshot = watcher
        .call(Body::PresenceSubscribe(pb::PresenceSubscribeRequest {
            user_ids: vec![bob_id],
        }))
        .await;
    let Body::PresenceSnapshot(snapshot) = snapshot else {
        panic!("{snapshot:?}")
    };
    assert!(snapshot.users[0].online);

    // kill -9: nobody tells anyone; the lease (3 s) runs out.
    p1.signal("KILL");
    p1.wait_exit(5);
    let took = presence_of(&mut watcher, bob_id, false, Duration::from_secs(8)).await;
    assert!(took < Duration::from_secs(5), "offline seen after {took:?}");

    // The id is started again at once, and a second start takes it over:
    // the older one stops with an error.
    let mut again = node_process(&env, dirs[1].path(), "k1");
    let mut bob = RawConn::connect(again.addr).await;
    bob.login("kbob").await;
    presence_of(&mut watcher, bob_id, true, Duration::from_secs(3)).await;
    let _newer = node_process(&env, dirs[2].path(), "k1");
    assert_eq!(again.wait_exit(10), Some(1), "the superseded node exits 1");
    drop(p0);
}

/// kill -9 of one of three node processes in the middle of a verified
/// load run: its clients reconnect to the others, resume and sync, every
/// acknowledged message reaches every recipient exactly once, and the dead
/// node's routes are swept within its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_nothing_and_its_routes_go() {
    let env = im_tests::PipelineEnv::fresh();
    let worker = env.start_worker().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<_> = (0..3)
        .map(|i| node_process(&env, dirs[i].path(), &format!("x{i}")))
        .collect();
    let servers: Vec<String> = nodes.iter().map(|p| p.addr.to_string()).collect();
    let servers = servers.join(",");
    let mut admin = env.redis_conn().await;
    // Formed, and the incarnation of the node to kill.
    let deadline = Instant::now() + Duration::from_secs(10);
    let doomed: u64 = loop {
        let leases: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(
                (0..3)
                    .map(|i| format!("{}:node:x{i}", env.prefix))
                    .collect::<Vec<_>>(),
            )
            .query_async(&mut admin)
            .await
            .unwrap();
        if let [Some(_), Some(_), Some(inc)] = leases[..] {
            break inc;
        }
        assert!(Instant::now() < deadline, "cluster did not form");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let run = direct_load_in_background(servers, "6", "3");
    tokio::time::sleep(Duration::from_secs(3)).await;
    nodes[2].signal("KILL");
    nodes[2].wait_exit(5);
    // Within the lease (3 s) and a sweep, while the load goes on and its
    // users hold routes on the other nodes, no route names the dead
    // incarnation any more.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let routes: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:rt:*", env.prefix))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(!routes.is_empty(), "the load's users are routed");
    for key in routes {
        let member: bool = redis::cmd("SISMEMBER")
            .arg(&key)
            .arg(doomed)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(!member, "{key} still names the dead node");
    }
    let r = run.await.unwrap();
    assert!(!r.failed(), "verification failed: {r:#?}");
    assert_eq!(r.messages_lost, 0, "{r:#?}");
    assert!(r.cross_node_deliveries > 0, "{r:#?}");
    // Its clients lost their connections (counted as errors) and moved.
    assert!(r.errors > 0, "{r:#?}");
    drop(nodes);
    worker.shutdown().await;
}

/// The whole Redis goes away for longer than the lease and comes back
/// (restarted from its AOF): every node rejoins under a new incarnation,
/// republishes its routes, and pushes cross nodes live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_rejoin_when_redis_returns_and_push_across_again() {
    let mut redis_server = im_tests::services::RedisServer::start(true);
    let env = im_tests::PipelineEnv::fresh_on(redis_server.url());
    let cluster = TestCluster::start_on(env, 2, |_| {}).await;
    let (mut alice, alice_id) = user(&cluster, 0, "ralice", true).await;
    let (mut bob, bob_id) = user(&cluster, 1, "rbob", true).await;
    let ack = bob.send_text_to_user(alice_id, "r0", "before").await;
    assert_eq!(alice.pushed_message(5).await.seq, ack.seq);

    redis_server.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis_server.restart();

    // Both rejoin; once each counts the other live and both routes are
    // written again, pushes cross live in both directions.
    let redis = redis::Client::open(redis_server.url()).unwrap();
    let mut admin = redis.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s0 = cluster.node(0).cluster_stats().unwrap();
        let s1 = cluster.node(1).cluster_stats().unwrap();
        let mut routed = true;
        for (user, inc) in [(alice_id, s0.incarnation), (bob_id, s1.incarnation)] {
            let routes: Vec<u64> = redis::cmd("SMEMBERS")
                .arg(format!("{}:rt:{user}", cluster.env.prefix))
                .query_async(&mut admin)
                .await
                .unwrap_or_default();
            routed &= routes.contains(&inc);
        }
        if s0.reregistered >= 1
            && s1.reregistered >= 1
            && s0.live_nodes == 2
            && s1.live_nodes == 2
            && routed
        {
            break;
        }
        assert!(Instant::now() < deadline, "not rejoined: {s0:?} {s1:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ack = bob.send_text_to_user(alice_id, "r1", "after").await;
    loop {
        if alice.pushed_message(5).await.seq == ack.seq {
            break;
        }
    }
    let ack = alice.send_text_to_user(bob_id, "r2", "back").await;
    loop {
        if bob.pushed_message(5).await.seq == ack.seq {
            break;
        }
    }
    cluster.shutdown().await;
}
