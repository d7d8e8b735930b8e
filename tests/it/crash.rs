//! Crash tests of the production pipeline: under load, kill -9 the storage
//! worker, kill -9 the server node, stop MySQL, restart Redis (AOF). Each
//! time every acknowledged message must end up in MySQL exactly once, seqs
//! must stay dense, and every recipient must get every message once, in
//! order, after sync; on a Redis Cluster, kill -9 a master. Also Redis
//! state going wrong: lost seq counters, a member cache left stale. Each
//! test runs its own Redis (or Redis Cluster) and MariaDB so it can break
//! them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use im_client::{Client, Events, Target};
use im_proto::pb;
use im_tests::redis_cluster::RedisCluster;
use im_tests::sdk::{self, text_of};
use im_tests::services::{MariaDb, RedisServer, fresh_database, unique_prefix};
use im_tests::{ServerProcess, WorkerProcess, free_port};
use mysql_async::prelude::*;
use tokio::sync::Mutex;

pub(crate) const STREAMS: &str = "4";

/// Redis (AOF, fsync always), MariaDB, one server node and one storage
/// worker, each killable.
pub(crate) struct Stack {
    /// One Redis, or (for the failover tests) a Redis Cluster.
    single: Option<RedisServer>,
    cluster: Option<RedisCluster>,
    mysql: MariaDb,
    mysql_url: String,
    pub(crate) prefix: String,
    data: tempfile::TempDir,
    pub(crate) addr: SocketAddr,
    server: Option<ServerProcess>,
    worker: Option<WorkerProcess>,
    /// More flags for the server.
    server_args: Vec<String>,
}

impl Stack {
    fn start() -> Stack {
        Stack::start_with(Some(RedisServer::start(true)), None, &[])
    }

    /// The same on a Redis Cluster of its own (3 masters, a replica each).
    pub(crate) fn start_on_cluster() -> Stack {
        Stack::start_with(None, Some(RedisCluster::start()), &[])
    }

    /// The same, with more flags for the server.
    pub(crate) fn start_on_cluster_with(server_args: &[&str]) -> Stack {
        Stack::start_with(None, Some(RedisCluster::start()), server_args)
    }

    fn start_with(
        single: Option<RedisServer>,
        cluster: Option<RedisCluster>,
        server_args: &[&str],
    ) -> Stack {
        let mysql = MariaDb::start();
        let mysql_url = fresh_database(&mysql.server_url());
        let mut stack = Stack {
            single,
            cluster,
            mysql,
            mysql_url,
            prefix: unique_prefix(),
            data: tempfile::tempdir().unwrap(),
            addr: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            server: None,
            worker: None,
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
        };
        stack.start_server();
        stack.start_worker();
        stack
    }

    /// The single Redis.
    fn redis(&mut self) -> &mut RedisServer {
        self.single.as_mut().expect("a stack on one Redis")
    }

    /// The Redis Cluster.
    pub(crate) fn cluster(&mut self) -> &mut RedisCluster {
        self.cluster.as_mut().expect("a stack on a Redis Cluster")
    }

    /// The flag naming Redis, and its value.
    fn redis_flags(&self) -> [String; 2] {
        match (&self.single, &self.cluster) {
            (_, Some(cluster)) => ["--redis-cluster-nodes".into(), cluster.nodes_csv()],
            (Some(single), None) => ["--redis-url".into(), single.url()],
            (None, None) => unreachable!("a stack has a Redis"),
        }
    }

    fn start_server(&mut self) {
        let [flag, redis] = self.redis_flags();
        let mut args = vec![
            flag.as_str(),
            &redis,
            "--mysql-url",
            &self.mysql_url,
            "--redis-prefix",
            &self.prefix,
            "--streams",
            STREAMS,
        ];
        args.extend(self.server_args.iter().map(String::as_str));
        self.server = Some(ServerProcess::start_on(self.addr, self.data.path(), &args));
    }

    fn kill_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
    }

    fn start_worker(&mut self) {
        let [flag, redis] = self.redis_flags();
        self.worker = Some(WorkerProcess::start(
            &[
                &flag,
                &redis,
                "--mysql-url",
                &self.mysql_url,
                "--redis-prefix",
                &self.prefix,
                "--streams",
                STREAMS,
                "--consumer",
                "crash-test",
                "--claim-idle-ms",
                "2000",
            ],
            &[],
        ));
    }

    fn kill_worker(&mut self) {
        // Dropping it kills it.
        self.worker = None;
    }

    /// (conversation, seq) → client_msg_id of every row in MySQL.
    async fn stored(&self) -> BTreeMap<(u64, u64), String> {
        let pool = mysql_async::Pool::new(self.mysql_url.as_str());
        let mut conn = pool.get_conn().await.expect("MySQL connection");
        let rows: Vec<(u64, u64, Vec<u8>)> = conn
            .query("SELECT conversation_id, seq, body FROM messages")
            .await
            .expect("read messages");
        drop(conn);
        pool.disconnect().await.ok();
        rows.into_iter()
            .map(|(c, s, body)| {
                let m = <pb::Message as prost::Message>::decode(body.as_slice())
                    .expect("stored body decodes");
                ((c, s), m.client_msg_id)
            })
            .collect()
    }

    /// Waits until MySQL holds `count` messages.
    async fn wait_stored(&self, count: usize) -> BTreeMap<(u64, u64), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stored = self.stored().await;
            if stored.len() >= count || Instant::now() > deadline {
                return stored;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.kill_worker();
        self.kill_server();
    }
}

/// One acknowledged send.
#[derive(Debug, Clone)]
pub(crate) struct Acked {
    pub(crate) conversation: u64,
    seq: u64,
    client_msg_id: String,
}

/// Messages one receiver got, in arrival order.
type Inbox = Arc<Mutex<Vec<pb::Message>>>;

/// What each receiver got, by conversation; holds the clients open.
pub(crate) struct Receivers {
    got: Vec<(u64, Inbox)>,
    _clients: Vec<Client>,
}

/// Senders that keep sending (each send retried by the SDK until acked)
/// and receivers that collect what they get.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    senders: Vec<tokio::task::JoinHandle<Vec<Acked>>>,
    receivers: Vec<(u64, Inbox, tokio::task::JoinHandle<()>)>,
    _clients: Vec<Client>,
}

async fn collect(mut events: Events, into: Arc<Mutex<Vec<pb::Message>>>) {
    while let Some(event) = events.next().await {
        if let im_client::Event::Message(m) = event {
            into.lock().await.push(m);
        }
    }
}

impl Load {
    /// `pairs` sender → receiver pairs; every conversation gets its first
    /// message before this returns, so later sends need no new state.
    pub(crate) async fn start(addr: SocketAddr, pairs: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        let mut clients = Vec::new();
        for p in 0..pairs {
            let (receiver, events) = sdk::register(addr, &format!("receiver{p}")).await;
            let (sender, _sender_events) = sdk::register(addr, &format!("sender{p}")).await;
            let to = receiver.user_id();
            let first = sender
                .send_with_id(Target::User(to), format!("p{p}-0"), text("0"))
                .await
                .unwrap();
            let got = Arc::new(Mutex::new(Vec::new()));
            receivers.push((
                first.conversation_id,
                got.clone(),
                tokio::spawn(collect(events, got)),
            ));
            let stop = stop.clone();
            let client = sender.clone();
            senders.push(tokio::spawn(async move {
                let mut acked = vec![Acked {
                    conversation: first.conversation_id,
                    seq: first.seq,
                    client_msg_id: format!("p{p}-0"),
                }];
                let mut n = 1;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("p{p}-{n}");
                    let ack = client
                        .send_with_id(Target::User(to), id.clone(), text(&n.to_string()))
                        .await
                        .unwrap_or_else(|e| panic!("send {id} never acknowledged: {e}"));
                    acked.push(Acked {
                        conversation: ack.conversation_id,
                        seq: ack.seq,
                        client_msg_id: id,
                    });
                    n += 1;
                }
                acked
            }));
            clients.push(sender);
            clients.push(receiver);
        }
        Load {
            stop,
            senders,
            receivers,
            _clients: clients,
        }
    }

    /// The conversations the load runs in.
    pub(crate) fn conversations(&self) -> Vec<u64> {
        self.receivers.iter().map(|(c, _, _)| *c).collect()
    }

    /// Stops sending and returns every acknowledged send, and the
    /// receivers (whose clients stay connected until `verify` is done).
    pub(crate) async fn finish(self) -> (Vec<Acked>, Receivers) {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        for s in self.senders {
            acked.extend(s.await.expect("sender task"));
        }
        let got = self
            .receivers
            .into_iter()
            .map(|(c, got, _)| (c, got))
            .collect();
        (
            acked,
            Receivers {
                got,
                _clients: self._clients,
            },
        )
    }
}

fn text(s: &str) -> pb::Content {
    pb::Content {
        kind: Some(pb::content::Kind::Text(pb::Text { text: s.into() })),
    }
}

/// The assertions shared by every crash test.
pub(crate) async fn verify(stack: &Stack, acked: Vec<Acked>, receivers: Receivers) {
    assert!(
        acked.len() > 20,
        "the load barely ran: {} acks",
        acked.len()
    );
    let mut by_conv: HashMap<u64, Vec<&Acked>> = HashMap::new();
    for a in &acked {
        by_conv.entry(a.conversation).or_default().push(a);
    }
    // Seqs of each conversation: dense from 1, each acked once.
    for (conv, list) in &by_conv {
        let mut seqs: Vec<u64> = list.iter().map(|a| a.seq).collect();
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "conversation {conv}"
        );
    }
    // MySQL holds exactly the acknowledged messages, once each.
    let stored = stack.wait_stored(acked.len()).await;
    assert_eq!(
        stored.len(),
        acked.len(),
        "rows in MySQL vs acknowledged sends"
    );
    for a in &acked {
        assert_eq!(
            stored.get(&(a.conversation, a.seq)),
            Some(&a.client_msg_id),
            "acked message missing or different in MySQL"
        );
    }
    // Every recipient got every message once, in order.
    for (conv, got) in receivers.got {
        let expected = by_conv[&conv].len();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n = got.lock().await.len();
            if n >= expected || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = got.lock().await;
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        let in_order = seqs.iter().copied().eq(1..=expected as u64);
        assert!(
            in_order,
            "receiver of {conv} got {} messages, expected 1..={expected} once each in order (first difference at {:?})",
            seqs.len(),
            seqs.iter().zip(1..).position(|(s, e)| *s != e)
        );
        let sent: HashMap<u64, &str> = by_conv[&conv]
            .iter()
            .map(|a| (a.seq, a.client_msg_id.as_str()))
            .collect();
        for m in got.iter() {
            assert_eq!(Some(&m.client_msg_id.as_str()), sent.get(&m.seq));
            assert!(!text_of(m).is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_worker_killed_mid_batch_loses_nothing() {
    let mut stack = Stack::start();
    let load = Load::start(stack.addr, 4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.kill_worker();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stack.start_worker();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.kill_worker();
    stack.start_worker();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (acked, receivers) = load.finish().await;
    verify(&stack, acked, receivers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_node_killed_under_load_loses_nothing() {
    let mut stack = Stack::start();
    let load = Load::start(stack.addr, 4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.kill_server();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.start_server();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (acked, receivers) = load.finish().await;
    verify(&stack, acked, receivers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_stopped_under_load_loses_nothing() {
    let mut stack = Stack::start();
    let load = Load::start(stack.addr, 4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.mysql.stop();
    // Sends keep being acknowledged from Redis meanwhile.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stack.mysql.start_again();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (acked, receivers) = load.finish().await;
    verify(&stack, acked, receivers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_load_loses_nothing() {
    let mut stack = Stack::start();
    let load = Load::start(stack.addr, 4).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.redis().restart();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (acked, receivers) = load.finish().await;
    verify(&stack, acked, receivers).await;
}

/// Redis loses the conversations' seq counters (say, it came back from an
/// old snapshot): the conversation list and new sends carry on from what
/// MySQL holds, with no gap and no repeated seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_seq_counters_resume_from_mysql() {
    let stack = Stack::start();
    let (alice, _alice_events) = sdk::register(stack.addr, "alice").await;
    let (bob, mut bob_events) = sdk::register(stack.addr, "bob").await;
    for i in 0..3 {
        alice
            .send_text(Target::User(bob.user_id()), &format!("m{i}"))
            .await
            .unwrap();
    }
    assert_eq!(sdk::messages(&mut bob_events, 3, 10).await.len(), 3);
    assert_eq!(stack.wait_stored(3).await.len(), 3);

    let client = redis::Client::open(stack.single.as_ref().expect("one Redis").url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let counters: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*:seq", stack.prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!counters.is_empty());
    let _: () = redis::cmd("DEL")
        .arg(&counters)
        .query_async(&mut redis)
        .await
        .unwrap();

    let list = bob.conversations().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].last_seq, 3);
    let ack = alice
        .send_text(Target::User(bob.user_id()), "after")
        .await
        .unwrap();
    assert_eq!(ack.seq, 4);
    assert_eq!(sdk::next_message(&mut bob_events, 10).await.seq, 4);
}

/// Removing a member commits to MySQL, then drops the group's member set
/// cached in Redis. Should that second step fail, the owner's retry of the
/// removal, which now changes nothing in MySQL, must still drop it: a
/// stale set would let the removed member post for a day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_removal_drops_a_stale_member_cache() {
    let stack = Stack::start();
    let (owner, _owner_events) = sdk::register(stack.addr, "owner").await;
    let (bob, _bob_events) = sdk::register(stack.addr, "bob").await;
    let group = owner
        .create_group("team", vec![bob.user_id()])
        .await
        .unwrap();
    let target = Target::Group(group.group_id);
    bob.send_text(target, "hello").await.unwrap();

    let client = redis::Client::open(stack.single.as_ref().expect("one Redis").url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let cached: Vec<String> = redis::cmd("KEYS")
        .arg(format!(
            "{}:*:members:{}",
            stack.prefix, group.conversation_id
        ))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(cached.len(), 1, "the append cached the member set");
    let stale: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&cached[0])
        .query_async(&mut redis)
        .await
        .unwrap();

    owner
        .remove_members(group.group_id, vec![bob.user_id()])
        .await
        .unwrap();
    // As if dropping the cache had failed after the commit.
    let _: () = redis::cmd("SADD")
        .arg(&cached[0])
        .arg(&stale)
        .query_async(&mut redis)
        .await
        .unwrap();
    owner
        .remove_members(group.group_id, vec![bob.user_id()])
        .await
        .unwrap();
    let refused = bob.send_text(target, "still here?").await.unwrap_err();
    assert_eq!(refused.code(), Some(im_proto::ErrorCode::Forbidden));
}

/// A database with no free connection slot (`ERROR 1040: Too many
/// connections`, as when N nodes' pools outgrow `max_connections`) refuses
/// work it has not done: clients get OVERLOADED and a retry succeeds once
/// slots free up, never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_out_of_connections_answers_overloaded_never_internal() {
    use im_proto::ErrorCode;
    use im_proto::pb::frame::Body;
    use im_tests::{PipelineEnv, RawConn, error_code, test_config};

    let mysql = MariaDb::start();
    let env = PipelineEnv {
        redis_url: im_tests::services::shared().redis_url.clone(),
        redis_cluster: None,
        mysql_url: fresh_database(&mysql.server_url()),
        prefix: unique_prefix(),
        mysql_shards: Vec::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    env.apply(&mut config);
    let node = im_server::server::PipelineServer::start_pipeline(config)
        .await
        .expect("node starts");
    let addr = node.local_addr();

    // Leave the node only the connections it holds now: MariaDB lets a
    // SUPER user (root, as everyone here) have max_connections + 1.
    let admin_pool = mysql_async::Pool::new(mysql.server_url().as_str());
    let mut admin = admin_pool.get_conn().await.unwrap();
    let open: Option<(String, u64)> = admin
        .query_first("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        .await
        .unwrap();
    let open = open.unwrap().1;
    admin
        .query_drop(format!("SET GLOBAL max_connections = {}", open - 1))
        .await
        .unwrap();

    // Registrations at once: more than the held connections can serve
    // together, so the pool tries to open more and the server says no.
    let attempt = |name: String| async move {
        let mut conn = RawConn::connect(addr).await;
        let body = conn
            .call(Body::Register(pb::RegisterRequest {
                username: name.clone(),
                password: im_tests::PASSWORD.into(),
                device_name: String::new(),
            }))
            .await;
        (name, body)
    };
    let mut refused = Vec::new();
    let mut accepted = 0;
    for _round in 0..5 {
        let names: Vec<String> = (0..64).map(|_| unique_prefix()).collect();
        let replies = futures::future::join_all(names.into_iter().map(attempt)).await;
        for (name, body) in replies {
            match &body {
                Body::AuthOk(_) => accepted += 1,
                other => {
                    assert_eq!(
                        error_code(other),
                        Some(ErrorCode::Overloaded),
                        "{name}: {other:?}"
                    );
                    refused.push(name);
                }
            }
        }
        if !refused.is_empty() {
            break;
        }
    }
    assert!(
        !refused.is_empty(),
        "no registration needed a new connection"
    );
    assert!(accepted > 0, "the held connections kept serving");

    // Slots free again: the same requests go through.
    admin
        .query_drop("SET GLOBAL max_connections = 151")
        .await
        .unwrap();
    for name in refused {
        let (name, body) = attempt(name).await;
        assert!(matches!(body, Body::AuthOk(_)), "{name}: {body:?}");
    }
    drop(admin);
    admin_pool.disconnect().await.ok();
    node.shutdown().await;
}

/// A Redis Cluster master killed under load (kill -9): its replica is
/// promoted within seconds (cluster-node-timeout 1000), the server's
/// appends and the worker's reads follow the slot to it, and still every
/// acknowledged message is delivered once, in order, and stored once, with
/// dense seqs. With the default --redis-replica-acks 1 an ack means the
/// replica had the message, so the promotion loses none; the new master
/// checks its shards' counters against MySQL before appending again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_master_killed_under_load_loses_nothing() {
    let mut stack = Stack::start_on_cluster();
    let load = Load::start(stack.addr, 6).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The master of stream shard 0 (of 4).
    let stream = format!("{}:{{s0}}:stream", stack.prefix);
    let master = stack.cluster().master_of(stream.as_bytes());
    stack.cluster().kill(master);
    let promoted = Instant::now();
    loop {
        let now_master = stack.cluster().try_master_of(stream.as_bytes());
        if now_master.is_some_and(|m| m != master) {
            break;
        }
        assert!(
            promoted.elapsed() < Duration::from_secs(20),
            "no replica was promoted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The old master comes back as a replica of the new one.
    stack.cluster().restart(master);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (acked, receivers) = load.finish().await;
    verify(&stack, acked, receivers).await;
}
