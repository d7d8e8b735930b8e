//! Fixtures for the end-to-end tests: in-process server nodes on port 0
//! with a throwaway data directory, `im-server` child processes for signal
//! and restart tests, and a raw framed connection for protocol-level tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{Frame, FrameCodec};
use im_server::config::Config;
use im_server::net::NetStatsSnapshot;
use im_server::server::{EmbeddedServer, PipelineServer};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

pub mod redis_cluster;
pub mod services;
pub mod tls;

/// Password used by every test account.
pub const PASSWORD: &str = "correct horse battery";

/// Which store the tests run against: the embedded one, or the production
/// pipeline (Redis Streams + MySQL + storage worker) when
/// `IM_TEST_STORE=pipeline` (one Redis) or `IM_TEST_STORE=pipeline-cluster`
/// (a Redis Cluster). The same tests run in every mode.
pub fn pipeline_mode() -> bool {
    std::env::var("IM_TEST_STORE").is_ok_and(|v| v == "pipeline" || v == "pipeline-cluster")
}

/// Whether the pipeline runs on a Redis Cluster (`IM_TEST_STORE=pipeline-cluster`).
pub fn redis_cluster_mode() -> bool {
    std::env::var("IM_TEST_STORE").is_ok_and(|v| v == "pipeline-cluster")
}

/// Whether pipeline-mode nodes spread their messages over two MySQL
/// shards (`IM_TEST_MYSQL_SHARDS=2`): one database on each of the two
/// shared MariaDB servers, besides the main database.
pub fn sharded_mode() -> bool {
    std::env::var("IM_TEST_MYSQL_SHARDS").is_ok_and(|v| v == "2")
}

/// Where a pipeline-mode node keeps its data: a key prefix and a database
/// of its own on the shared services (and, sharded, a database of its own
/// on each shard server).
#[derive(Debug, Clone)]
pub struct PipelineEnv {
    /// Redis URL (on a Redis Cluster: the first node's).
    pub redis_url: String,
    /// Seed nodes, on a Redis Cluster.
    pub redis_cluster: Option<String>,
    /// MySQL URL of a database only this node uses.
    pub mysql_url: String,
    /// Key prefix only this node uses.
    pub prefix: String,
    /// The message shards (`--mysql-shards`); empty: messages in
    /// `mysql_url`.
    pub mysql_shards: Vec<String>,
}

impl PipelineEnv {
    /// A fresh prefix and database on the shared services (with two
    /// message shards in [`sharded_mode`]).
    pub fn fresh() -> PipelineEnv {
        if redis_cluster_mode() {
            return PipelineEnv::fresh_on_cluster(
                redis_cluster::shared_cluster_nodes().to_string(),
            );
        }
        let shared = services::shared();
        let env = PipelineEnv {
            redis_cluster: None,
            redis_url: shared.redis_url.clone(),
            mysql_url: services::fresh_database(&shared.mysql_url),
            prefix: services::unique_prefix(),
            mysql_shards: Vec::new(),
        };
        if sharded_mode() { env.sharded() } else { env }
    }

    /// The same on a Redis of the test's own (one it stops or pauses), with
    /// a fresh database on the shared MariaDB.
    pub fn fresh_on(redis_url: String) -> PipelineEnv {
        let env = PipelineEnv {
            redis_url,
            redis_cluster: None,
            mysql_url: services::fresh_database(&services::shared().mysql_url),
            prefix: services::unique_prefix(),
            mysql_shards: Vec::new(),
        };
        if sharded_mode() { env.sharded() } else { env }
    }

    /// This environment with its messages on two shards: a fresh database
    /// on the shared MariaDB and one on the second (see
    /// [`services::second_mysql`]).
    pub fn sharded(self) -> PipelineEnv {
        let servers = [
            services::shared().mysql_url.clone(),
            services::second_mysql().to_string(),
        ];
        self.sharded_on(&servers)
    }

    /// This environment with its messages on a fresh database of each of
    /// `servers` (`mysql://...` without a database), in that order.
    pub fn sharded_on(mut self, servers: &[String]) -> PipelineEnv {
        self.mysql_shards = servers
            .iter()
            .map(|s| services::fresh_database(s))
            .collect();
        self
    }

    /// The same on a Redis Cluster (`redis://...,redis://...`).
    pub fn fresh_on_cluster(nodes: String) -> PipelineEnv {
        PipelineEnv {
            redis_url: nodes.split(',').next().unwrap_or_default().to_string(),
            redis_cluster: Some(nodes),
            mysql_url: services::fresh_database(&services::shared().mysql_url),
            prefix: services::unique_prefix(),
            mysql_shards: Vec::new(),
        }
    }

    /// Where Redis is.
    pub fn redis_target(&self) -> im_storage::redis_target::RedisTarget {
        use im_storage::redis_target::RedisTarget;
        match &self.redis_cluster {
            Some(nodes) => RedisTarget::Cluster(nodes.split(',').map(str::to_string).collect()),
            None => RedisTarget::Single(self.redis_url.clone()),
        }
    }

    /// A connection to this environment's Redis (a cluster connection on
    /// a Redis Cluster), for tests that look at keys directly.
    pub async fn redis_conn(&self) -> im_storage::redis_target::RedisConn {
        self.redis_target()
            .connect(im_storage::redis_target::Timeouts::both(
                Duration::from_secs(5),
            ))
            .await
            .expect("connect to redis")
    }

    /// Points a server configuration at this environment.
    pub fn apply(&self, c: &mut Config) {
        if let Some(nodes) = &self.redis_cluster {
            c.redis_cluster_nodes = Some(nodes.clone());
            c.redis_url = None;
        } else {
            c.redis_url = Some(self.redis_url.clone());
        }
        c.mysql_url = Some(self.mysql_url.clone());
        c.mysql_shards = self.mysql_shards.clone();
        c.redis_prefix = self.prefix.clone();
        c.streams = 4;
    }

    /// A storage worker for this environment, tuned for tests (short batch
    /// age and claim idle time).
    pub fn worker_config(&self, consumer: &str) -> im_storage::WorkerConfig {
        let mut c = im_storage::WorkerConfig::new(&self.redis_url, &self.mysql_url);
        c.mysql_shards = self.mysql_shards.clone();
        c.redis_prefix = self.prefix.clone();
        c.redis_cluster_nodes = self.redis_cluster.clone();
        c.streams = 4;
        c.consumer = Some(consumer.to_string());
        c.batch_age_ms = 5;
        c.block_ms = 200;
        c.claim_idle_ms = 2_000;
        c.claim_interval_ms = 500;
        c.cursor_flush_ms = 50;
        c.retry_min_ms = 20;
        c.retry_max_ms = 500;
        c.progress_secs = 0;
        c
    }

    /// Starts an in-process storage worker for this environment.
    pub async fn start_worker(&self) -> im_storage::WorkerHandle {
        im_storage::Worker::start(self.worker_config("test-worker"))
            .await
            .expect("storage worker starts")
    }

    /// The same, as `im-server` flags.
    pub fn args(&self) -> Vec<String> {
        let redis = match &self.redis_cluster {
            Some(nodes) => ["--redis-cluster-nodes".to_string(), nodes.clone()],
            None => ["--redis-url".to_string(), self.redis_url.clone()],
        };
        let [flag, redis] = redis;
        let mut args: Vec<String> = vec![
            flag,
            redis,
            "--mysql-url".into(),
            self.mysql_url.clone(),
            "--redis-prefix".into(),
            self.prefix.clone(),
            "--streams".into(),
            "4".into(),
        ];
        if !self.mysql_shards.is_empty() {
            args.push("--mysql-shards".into());
            args.push(self.mysql_shards.join(","));
        }
        args
    }
}

/// A configuration for tests: port 0, cheap password hashing, the given
/// data directory, and the abuse limits off (see [`no_abuse_limits`]).
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse().expect("valid address");
    c.data_dir = data_dir.to_path_buf();
    c.argon2_memory_kib = 64;
    c.argon2_iterations = 1;
    c.shutdown_grace_secs = 5;
    no_abuse_limits(&mut c);
    c
}

/// Turns every abuse limit off (0): tests open many connections from
/// 127.0.0.1 and send faster than the defaults allow one person. Tests of
/// a limit set the one they test.
pub fn no_abuse_limits(c: &mut Config) {
    c.max_msgs_per_user_per_sec = 0;
    c.max_requests_per_conn_per_sec = 0;
    c.max_new_conns_per_addr_per_sec = 0;
    c.max_conns_per_addr = 0;
    c.max_groups_created_per_user_per_hour = 0;
    c.max_members_added_per_minute = 0;
}

/// The flags of [`no_abuse_limits`], for `im-server` processes.
pub const NO_ABUSE_LIMIT_FLAGS: [&str; 6] = [
    "--max-msgs-per-user-per-sec",
    "--max-requests-per-conn-per-sec",
    "--max-new-conns-per-addr-per-sec",
    "--max-conns-per-addr",
    "--max-groups-created-per-user-per-hour",
    "--max-members-added-per-minute",
];

/// Polls `check` until it holds; panics after `secs`, naming `what`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs to stderr once per test binary when `RUST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}

/// A running node of either kind.
pub enum Node {
    /// Embedded store.
    Embedded(EmbeddedServer),
    /// Redis Streams + MySQL.
    Pipeline(PipelineServer),
}

impl Node {
    /// Starts a node of the kind `config` asks for.
    pub async fn start(config: Config) -> Node {
        if config.redis_url.is_some() || config.redis_cluster_nodes.is_some() {
            Node::Pipeline(
                PipelineServer::start_pipeline(config)
                    .await
                    .expect("pipeline node starts"),
            )
        } else {
            Node::Embedded(
                EmbeddedServer::start(config)
                    .await
                    .expect("embedded node starts"),
            )
        }
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        match self {
            Node::Embedded(s) => s.local_addr(),
            Node::Pipeline(s) => s.local_addr(),
        }
    }

    /// Where TLS clients connect, if the node listens for them.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        match self {
            Node::Embedded(s) => s.tls_addr(),
            Node::Pipeline(s) => s.tls_addr(),
        }
    }

    /// Connection-layer counters.
    pub fn net_stats(&self) -> NetStatsSnapshot {
        match self {
            Node::Embedded(s) => s.net_stats(),
            Node::Pipeline(s) => s.net_stats(),
        }
    }

    /// The admin listener's address, if the node has one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        match self {
            Node::Embedded(s) => s.admin_addr(),
            Node::Pipeline(s) => s.admin_addr(),
        }
    }

    /// Graceful shutdown.
    pub async fn shutdown(self) {
        match self {
            Node::Embedded(s) => s.shutdown().await,
            Node::Pipeline(s) => s.shutdown().await,
        }
    }
}

/// A server node running inside the test process, on the embedded store
/// or (in pipeline mode) on its own Redis prefix and MySQL database.
pub struct TestServer {
    /// The running node (taken on shutdown).
    pub server: Option<Node>,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The data directory (kept until the fixture drops).
    pub dir: tempfile::TempDir,
    /// The pipeline environment, in pipeline mode.
    pub pipeline: Option<PipelineEnv>,
    /// The storage worker moving this node's streams into MySQL (pipeline
    /// mode).
    pub worker: Option<im_storage::WorkerHandle>,
    tweak: std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>,
}

impl TestServer {
    /// Starts a node with [`test_config`] adjusted by `tweak` (which is
    /// applied again on restart).
    pub async fn start_with(tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> TestServer {
        Self::start_in(pipeline_mode().then(PipelineEnv::fresh), tweak).await
    }

    /// Starts a pipeline node on `env`, whatever `IM_TEST_STORE` says, with
    /// its storage worker.
    pub async fn start_on(
        env: PipelineEnv,
        tweak: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> TestServer {
        Self::start_in(Some(env), tweak).await
    }

    async fn start_in(
        pipeline: Option<PipelineEnv>,
        tweak: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> TestServer {
        init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = TestServer {
            server: None,
            addr: "127.0.0.1:0".parse().expect("address"),
            dir,
            pipeline,
            worker: None,
            tweak: std::sync::Arc::new(tweak),
        };
        server.boot().await;
        if let Some(env) = &server.pipeline {
            server.worker = Some(env.start_worker().await);
        }
        server
    }

    /// Starts a node with the test defaults.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    fn config(&self) -> Config {
        let mut config = test_config(self.dir.path());
        if let Some(env) = &self.pipeline {
            env.apply(&mut config);
        }
        (self.tweak)(&mut config);
        config
    }

    async fn boot(&mut self) {
        let node = Node::start(self.config()).await;
        self.addr = node.local_addr();
        self.server = Some(node);
    }

    /// Restarts on the same data (new port).
    pub async fn restart(&mut self) {
        self.shutdown().await;
        self.boot().await;
    }

    /// Graceful shutdown (of the node; the worker keeps running).
    pub async fn shutdown(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    /// The running node.
    pub fn node(&self) -> &Node {
        self.server.as_ref().expect("server running")
    }
}

/// The token secret every node of a [`TestCluster`] shares.
pub const CLUSTER_SECRET: &str = "a token secret shared by the whole test cluster";

/// Several pipeline nodes in this process on one Redis prefix and MySQL
/// database, with one storage worker: one service.
pub struct TestCluster {
    /// The shared environment.
    pub env: PipelineEnv,
    /// The nodes (`None` once shut down).
    pub nodes: Vec<Option<PipelineServer>>,
    /// Their data directories.
    pub dirs: Vec<tempfile::TempDir>,
    /// The storage worker.
    pub worker: Option<im_storage::WorkerHandle>,
    tweak: std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>,
}

impl TestCluster {
    /// Starts `n` nodes (`node0`, `node1`, ...) with a 3-second lease.
    pub async fn start(n: usize) -> TestCluster {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` nodes with [`test_config`] adjusted by `tweak`.
    pub async fn start_with(
        n: usize,
        tweak: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> TestCluster {
        Self::start_on(PipelineEnv::fresh(), n, tweak).await
    }

    /// Starts `n` nodes on a given environment (e.g. a Redis of the
    /// test's own, to stop and start).
    pub async fn start_on(
        env: PipelineEnv,
        n: usize,
        tweak: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> TestCluster {
        init_logging();
        let mut cluster = TestCluster {
            worker: Some(env.start_worker().await),
            env,
            nodes: Vec::new(),
            dirs: Vec::new(),
            tweak: std::sync::Arc::new(tweak),
        };
        for i in 0..n {
            cluster.dirs.push(tempfile::tempdir().expect("temp dir"));
            let node = PipelineServer::start_pipeline(cluster.config(i))
                .await
                .expect("cluster node starts");
            cluster.nodes.push(Some(node));
        }
        // Formed: every node sees every other.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cluster
            .nodes
            .iter()
            .flatten()
            .any(|node| node.cluster_stats().map(|s| s.live_nodes) != Some(n as u64))
        {
            assert!(std::time::Instant::now() < deadline, "cluster did not form");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster
    }

    /// The configuration of node `i`.
    pub fn config(&self, i: usize) -> Config {
        let mut c = test_config(self.dirs[i].path());
        self.env.apply(&mut c);
        c.token_secret = Some(CLUSTER_SECRET.into());
        c.node_id = Some(format!("node{i}"));
        c.lease_secs = 3;
        (self.tweak)(&mut c);
        c
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &PipelineServer {
        self.nodes[i].as_ref().expect("node running")
    }

    /// Where clients of node `i` connect.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.node(i).local_addr()
    }

    /// Shuts node `i` down gracefully.
    pub async fn stop(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.shutdown().await;
        }
    }

    /// Shuts everything down.
    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
        if let Some(worker) = self.worker.take() {
            worker.shutdown().await;
        }
    }
}

/// A byte stream a [`RawConn`] runs on: plain TCP or TLS over it.
pub trait RawStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> RawStream for T {}

/// A raw framed connection for protocol-level tests.
pub struct RawConn {
    /// The framed socket.
    pub framed: Framed<Box<dyn RawStream>, FrameCodec>,
    next_id: u64,
}

impl RawConn {
    /// Connects without authenticating.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn::over(Box::new(stream))
    }

    /// A connection on an open stream (e.g. after a TLS handshake).
    pub fn over(stream: Box<dyn RawStream>) -> RawConn {
        RawConn {
            framed: Framed::new(stream, FrameCodec::new(16 << 20)),
            next_id: 1,
        }
    }

    /// Connects and writes `preamble` (a PROXY protocol header, say)
    /// before any frame.
    pub async fn connect_with_preamble(addr: SocketAddr, preamble: &[u8]) -> RawConn {
        let mut conn = RawConn::connect(addr).await;
        conn.write_raw(preamble).await;
        conn
    }

    /// Connects from the local address `source` (any 127.0.0.0/8 address
    /// works on loopback), to test limits per client address.
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source address");
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        RawConn::over(Box::new(stream))
    }

    /// Connects with a tiny receive buffer, so that a reader that stops
    /// reading backs the server up quickly.
    pub async fn connect_small_buffer(addr: SocketAddr) -> RawConn {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        RawConn::over(Box::new(stream))
    }

    /// Sends a request and returns its id.
    pub async fn send(&mut self, body: Body) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.framed
            .send(Frame::new(id, body))
            .await
            .expect("send frame");
        id
    }

    /// The next frame, or `None` at EOF; panics after `secs` seconds.
    pub async fn recv_within(&mut self, secs: u64) -> Option<Frame> {
        match tokio::time::timeout(Duration::from_secs(secs), self.framed.next()).await {
            Ok(Some(Ok(frame))) => Some(frame),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no frame within {secs} s"),
        }
    }

    /// The next frame (5 s deadline); panics at EOF.
    pub async fn recv(&mut self) -> Frame {
        self.recv_within(5).await.expect("connection closed")
    }

    /// Skips pushes until the reply to `request_id` arrives.
    pub async fn reply_to(&mut self, request_id: u64) -> Body {
        loop {
            let frame = self.recv().await;
            if frame.request_id == request_id {
                return frame.body.expect("reply has a body");
            }
        }
    }

    /// Sends a request and waits for its reply.
    pub async fn call(&mut self, body: Body) -> Body {
        let id = self.send(body).await;
        self.reply_to(id).await
    }

    /// Registers `username` and returns the AuthOk.
    pub async fn register(&mut self, username: &str) -> pb::AuthOk {
        let body = self
            .call(Body::Register(pb::RegisterRequest {
                username: username.into(),
                password: PASSWORD.into(),
                device_name: String::new(),
            }))
            .await;
        match body {
            Body::AuthOk(ok) => ok,
            other => panic!("register {username}: {other:?}"),
        }
    }

    /// Logs `username` in (another device) and returns the AuthOk.
    pub async fn login(&mut self, username: &str) -> pb::AuthOk {
        self.login_device(username, "").await
    }

    /// Logs `username` in as the device `device_name` and returns the
    /// AuthOk.
    pub async fn login_device(&mut self, username: &str, device_name: &str) -> pb::AuthOk {
        let body = self
            .call(Body::Login(pb::LoginRequest {
                username: username.into(),
                password: PASSWORD.into(),
                device_name: device_name.into(),
            }))
            .await;
        match body {
            Body::AuthOk(ok) => ok,
            other => panic!("login {username}: {other:?}"),
        }
    }

    /// Resumes with `token`; the reply body (AuthOk or an error).
    pub async fn resume(&mut self, token: &str) -> Body {
        self.call(Body::Resume(pb::ResumeRequest {
            token: token.into(),
        }))
        .await
    }

    /// Waits up to `secs` for a fatal error with `code`, skipping other
    /// frames; panics if the connection closes without one.
    pub async fn fatal_error(&mut self, secs: u64) -> pb::Error {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(_) => panic!("connection closed without a fatal error"),
                Err(_) => panic!("no fatal error within {secs} s"),
            };
            if let Some(Body::Error(e)) = frame.body {
                if e.fatal {
                    return e;
                }
            }
        }
    }

    /// The next push (request id 0) whose body `pick` accepts, skipping
    /// other pushes; panics after `secs` seconds or on a reply.
    pub async fn push_where<T>(
        &mut self,
        secs: u64,
        mut pick: impl FnMut(&Body) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(_) => panic!("connection closed while waiting for a push"),
                Err(_) => panic!("no such push within {secs} s"),
            };
            assert_eq!(frame.request_id, 0, "unexpected reply {frame:?}");
            if let Some(found) = frame.body.as_ref().and_then(&mut pick) {
                return found;
            }
        }
    }

    /// The next message push, skipping other pushes.
    pub async fn pushed_message(&mut self, secs: u64) -> pb::Message {
        self.push_where(secs, |b| match b {
            Body::Message(m) => Some(m.clone()),
            _ => None,
        })
        .await
    }

    /// Asserts that no message push arrives within `millis`.
    pub async fn no_message_within(&mut self, millis: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
        loop {
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(Body::Message(m)) = frame.body {
                        panic!("unexpected message {m:?}");
                    }
                }
                Ok(_) | Err(_) => return,
            }
        }
    }

    /// Sends a text to a user and returns the ack.
    pub async fn send_text_to_user(&mut self, to: u64, cmid: &str, text: &str) -> pb::SendAck {
        self.send_text(pb::send_request::Target::ToUser(to), cmid, text)
            .await
    }

    /// Sends a text and returns the ack (skipping pushes meanwhile).
    pub async fn send_text(
        &mut self,
        target: pb::send_request::Target,
        cmid: &str,
        text: &str,
    ) -> pb::SendAck {
        let body = self
            .call(Body::Send(pb::SendRequest {
                target: Some(target),
                client_msg_id: cmid.into(),
                content: Some(pb::Content {
                    kind: Some(pb::content::Kind::Text(pb::Text { text: text.into() })),
                }),
                resend: false,
            }))
            .await;
        match body {
            Body::SendAck(ack) => ack,
            other => panic!("send {cmid}: {other:?}"),
        }
    }

    /// Writes raw bytes to the socket.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.framed.get_mut().write_all(bytes).await.expect("write");
    }

    /// Reads until EOF (10 s deadline) and returns the frames seen.
    pub async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.recv_within(10).await {
            frames.push(f);
        }
        frames
    }
}

/// A PROXY protocol v1 header (text) for a TCP connection from `client`
/// to `server`, as a load balancer sends it.
pub fn proxy_v1(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        server.ip(),
        client.port(),
        server.port()
    )
    .into_bytes()
}

/// A PROXY protocol v2 header (binary, command PROXY, TCP) for a
/// connection from `client` to `server` (both of one family), followed by
/// `tlvs`.
pub fn proxy_v2(client: SocketAddr, server: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match (client.ip(), server.ip()) {
        (std::net::IpAddr::V4(c), std::net::IpAddr::V4(s)) => {
            body.extend_from_slice(&c.octets());
            body.extend_from_slice(&s.octets());
            0x11
        }
        (std::net::IpAddr::V6(c), std::net::IpAddr::V6(s)) => {
            body.extend_from_slice(&c.octets());
            body.extend_from_slice(&s.octets());
            0x21
        }
        _ => panic!("client and server of one family"),
    };
    body.extend_from_slice(&client.port().to_be_bytes());
    body.extend_from_slice(&server.port().to_be_bytes());
    body.extend_from_slice(tlvs);
    proxy_v2_raw(0x21, family, &body)
}

/// A PROXY protocol v2 header from its parts: version and command (0x20
/// LOCAL, 0x21 PROXY), family and protocol (0x11 TCP over IPv4, 0x00
/// unspecified), and what follows the length.
pub fn proxy_v2_raw(version_command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(version_command);
    header.push(family);
    header.extend_from_slice(&u16::try_from(body.len()).expect("short body").to_be_bytes());
    header.extend_from_slice(body);
    header
}

/// The error code of an error body, if it is one.
pub fn error_code(body: &Body) -> Option<im_proto::ErrorCode> {
    match body {
        Body::Error(e) => im_proto::ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

/// Path of a workspace binary built alongside the tests, building it if
/// missing.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// An `im-server` child process.
pub struct ServerProcess {
    /// The child.
    pub child: Child,
    /// Where clients connect.
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `im-server` on a free port with `data_dir`, the pipeline
    /// environment if given, and extra flags.
    pub fn start_in(data_dir: &Path, env: Option<&PipelineEnv>, extra: &[&str]) -> ServerProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("address");
        Self::start_on_in(addr, data_dir, env, extra)
    }

    /// Like [`ServerProcess::start_in`] on a given address.
    pub fn start_on_in(
        addr: SocketAddr,
        data_dir: &Path,
        env: Option<&PipelineEnv>,
        extra: &[&str],
    ) -> ServerProcess {
        let mut args: Vec<String> = env.map(PipelineEnv::args).unwrap_or_default();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start_on(addr, data_dir, &args)
    }

    /// Starts `im-server` on `addr` (e.g. to restart a node where its
    /// clients expect it) with `data_dir` and extra flags, and waits until
    /// it accepts connections.
    pub fn start_on(addr: SocketAddr, data_dir: &Path, extra: &[&str]) -> ServerProcess {
        let child = Command::new(binary("im-server"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            // Cheap password hashing unless the test asks for a cost.
            .args(if extra.contains(&"--argon2-memory-kib") {
                &[][..]
            } else {
                &["--argon2-memory-kib", "64", "--argon2-iterations", "1"][..]
            })
            // The abuse limits off, except those the test sets.
            .args(
                NO_ABUSE_LIMIT_FLAGS
                    .iter()
                    .filter(|flag| !extra.contains(flag))
                    .flat_map(|flag| [*flag, "0"]),
            )
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn im-server");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "im-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        ServerProcess { child, addr }
    }

    /// Sends a signal (by name, e.g. "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        signal_child(&self.child, signal);
    }

    /// Waits for exit (up to `secs`) and returns the exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        wait_child(&mut self.child, secs)
    }

    /// Resident memory of the process now, in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An `im-storage-worker` child process, killed when dropped (also when a
/// test fails).
pub struct WorkerProcess {
    /// The child.
    pub child: Child,
}

impl WorkerProcess {
    /// Starts `im-storage-worker` with `args` and environment `envs`.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> WorkerProcess {
        let child = Command::new(binary("im-storage-worker"))
            .args(args)
            .envs(envs.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn im-storage-worker");
        WorkerProcess { child }
    }

    /// Sends a signal (by name, e.g. "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        signal_child(&self.child, signal);
    }

    /// Waits for exit (up to `secs`) and returns the exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        wait_child(&mut self.child, secs)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (`TERM`, `STOP`, ...) to a child process.
pub(crate) fn signal_child(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} failed");
}

fn wait_child(child: &mut Child, secs: u64) -> Option<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {secs} s", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A reply of an HTTP server (the admin listener).
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The Content-Type header, if any.
    pub content_type: Option<String>,
    /// The body as text.
    pub body: String,
}

/// `GET path` as HTTP/1.0, so the server closes the connection after the
/// reply: just enough of a client to scrape the admin listener. Errors if
/// the connection is refused or no full reply comes within 5 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpReply> {
    use std::io::{Error, ErrorKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "no HTTP reply within 5 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let bad = || {
        Error::new(
            ErrorKind::InvalidData,
            format!("not an HTTP reply: {text:?}"),
        )
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(bad)?;
    let content_type = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-type")
            .then(|| value.trim().to_string())
    });
    Ok(HttpReply {
        status,
        content_type,
        body: body.to_string(),
    })
}

/// The value of the sample `name` (exactly, no labels) in a Prometheus
/// text exposition.
pub fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (sample, value) = line.split_once(' ')?;
        (sample == name).then(|| value.trim().parse().ok())?
    })
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// SDK helpers: log users in and read what they receive.
pub mod sdk {
    use std::net::SocketAddr;
    use std::time::Duration;

    use im_client::{Client, ClientConfig, Credentials, Event, Events};
    use im_proto::pb;

    use super::PASSWORD;

    /// Client settings for tests: fast reconnects, short timeouts.
    pub fn config(addr: SocketAddr) -> ClientConfig {
        ClientConfig::new(addr.to_string())
            .with_reconnect(Duration::from_millis(50), Duration::from_millis(500))
            .with_request_timeout(Duration::from_secs(10))
            .with_send_timeout(Duration::from_secs(30))
    }

    /// Registers `name` and waits for the first catch-up.
    pub async fn register(addr: SocketAddr, name: &str) -> (Client, Events) {
        connect(
            config(addr),
            Credentials::Register {
                username: name.into(),
                password: PASSWORD.into(),
            },
        )
        .await
    }

    /// Logs `name` in (another device) and waits for the catch-up.
    pub async fn login(addr: SocketAddr, name: &str) -> (Client, Events) {
        connect(
            config(addr),
            Credentials::Login {
                username: name.into(),
                password: PASSWORD.into(),
            },
        )
        .await
    }

    /// Connects with explicit settings and waits for the catch-up.
    pub async fn connect(config: ClientConfig, credentials: Credentials) -> (Client, Events) {
        let (client, events) = Client::connect(config, credentials)
            .await
            .expect("client connects");
        tokio::time::timeout(Duration::from_secs(10), client.wait_ready())
            .await
            .expect("catch-up within 10 s")
            .expect("client ready");
        (client, events)
    }

    /// The next message event (other events skipped); panics after `secs`.
    pub async fn next_message(events: &mut Events, secs: u64) -> pb::Message {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(Event::Message(m))) => return m,
                Ok(Some(_)) => {}
                Ok(None) => panic!("client stopped"),
                Err(_) => panic!("no message within {secs} s"),
            }
        }
    }

    /// The next `n` messages.
    pub async fn messages(events: &mut Events, n: usize, secs: u64) -> Vec<pb::Message> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(next_message(events, secs).await);
        }
        out
    }

    /// Asserts that no message arrives within `millis`.
    pub async fn no_message(events: &mut Events, millis: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(millis);
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(Event::Message(m))) => panic!("unexpected message {m:?}"),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// The text of a text message.
    pub fn text_of(m: &pb::Message) -> &str {
        match m.content.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(pb::content::Kind::Text(t)) => &t.text,
            _ => "",
        }
    }

    /// Whether the message is a server notice.
    pub fn is_notice(m: &pb::Message) -> bool {
        matches!(
            m.content.as_ref().and_then(|c| c.kind.as_ref()),
            Some(pb::content::Kind::Notice(_))
        )
    }
}

/// Runs `im-chat --json` with `args` against `addr` (its `--server`
/// unless `args` names one), its state in `dir`: whether it succeeded, the
/// JSON lines it printed, and its stderr.
pub async fn im_chat(
    addr: SocketAddr,
    dir: &Path,
    args: &[&str],
) -> (bool, Vec<serde_json::Value>, String) {
    let mut command = tokio::process::Command::new(binary("im-chat"));
    command
        .arg("--json")
        .args(args)
        .env("IM_SERVER", addr.to_string())
        .env("IM_CHAT_DIR", dir)
        .env_remove("IM_PASSWORD")
        .env_remove("IM_NEW_PASSWORD")
        .env_remove("IM_TLS")
        .env_remove("IM_CA_FILE")
        .env_remove("RUST_LOG");
    let out = command.output().await.expect("im-chat runs");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
