//! Assembly and lifecycle of one server node: open the store, bind the
//! listeners, start the chat service, the event loops and the optional
//! admin listener; and the ordered shutdown (report unhealthy, stop
//! accepting, finish in-flight requests, close sessions with a reason,
//! flush the store, close the admin listener).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use im_proto::{ErrorCode, Frame};
use im_storage::admin::{AdminError, AdminListener, AdminServer};

use crate::chat::{ChatService, ChatStatsSnapshot};
use crate::cluster::{Cluster, ClusterError, ClusterStatsSnapshot, Pending};
use crate::config::Config;
use crate::metrics::NodeMetrics;
use crate::net::tls::{TlsAcceptor, TlsError};
use crate::net::{Net, NetConfig, NetError, NetStatsSnapshot, Outbound, RunningNet};
use crate::store::pipeline::PipelineStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Retention, Store, StoreError};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory or token key is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open store: {0}")]
    Store(#[from] StoreError),
    /// Sockets or event loops could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The chat service could not be built.
    #[error("cannot start chat service: {0}")]
    Chat(String),
    /// The admin listener could not be bound.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The node could not join its cluster.
    #[error("cannot join the cluster: {0}")]
    Cluster(#[from] ClusterError),
    /// The TLS certificate, key or ticket keys are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// How long the pipeline store's health check waits for Redis.
const REDIS_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// Storage a node runs on: it can be health-checked and shut down cleanly.
pub trait Closeable: Store {
    /// `Ok` while the backend can take appends, otherwise why not; answers
    /// within about a second.
    fn health(&self) -> impl std::future::Future<Output = Result<(), String>> + Send;

    /// Finishes queued writes and releases the backend.
    fn shutdown(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send;
}

impl Closeable for SqliteStore {
    async fn health(&self) -> Result<(), String> {
        // In-process: it is there as long as the node is.
        Ok(())
    }

    async fn shutdown(self: Arc<Self>) {
        // Closing joins the writer thread: keep it off the reactor.
        let _ = tokio::task::spawn_blocking(move || self.close()).await;
    }
}

impl Closeable for PipelineStore {
    async fn health(&self) -> Result<(), String> {
        self.ping(REDIS_HEALTH_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    }

    async fn shutdown(self: Arc<Self>) {
        self.close().await;
    }
}

/// A running server node.
pub struct Server<S: Closeable> {
    net: RunningNet,
    service: ChatService<S>,
    store: Arc<S>,
    grace: Duration,
    /// Cleared when shutdown begins (the health check fails from then on).
    accepting: Arc<AtomicBool>,
    admin: Option<AdminServer>,
    cluster: Option<Cluster>,
    tls: Option<Arc<TlsAcceptor>>,
}

/// The node with the embedded store, as `im-server` runs it by default.
pub type EmbeddedServer = Server<SqliteStore>;

/// A node of the production pipeline (Redis Streams + MySQL).
pub type PipelineServer = Server<PipelineStore>;

impl Server<SqliteStore> {
    /// Starts a node with the embedded store under `config.data_dir`. Must
    /// be called within a tokio runtime.
    pub async fn start(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let options = config.sqlite();
        let dir = data_dir.clone();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir, options))
            .await
            .map_err(|e| ServerError::Chat(e.to_string()))??;
        let key = token_key(&config, &data_dir)?;
        let store = Arc::new(store);
        if let Some(retention) = config.retention() {
            spawn_retention(
                Arc::downgrade(&store),
                retention,
                Duration::from_secs(config.retention_sweep_secs),
            );
        }
        Self::with_store(config, store, key, None).await
    }
}

/// Removes the embedded store's messages past the retention limit every
/// `every`, until the store is closed or dropped.
fn spawn_retention(store: std::sync::Weak<SqliteStore>, retention: Retention, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(store) = store.upgrade() else {
                return;
            };
            let cutoff = retention.cutoff_ms(im_proto::now_ms());
            match store.expire_before(cutoff, retention.mode).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(
                    removed,
                    mode = ?retention.mode,
                    "removed messages past the retention limit"
                ),
                Err(StoreError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "the retention sweep failed"),
            }
        }
    });
}

impl Server<PipelineStore> {
    /// Starts a node on Redis and MySQL (`config.redis_url` and
    /// `config.mysql_url` must be set). Must be called within a tokio
    /// runtime.
    pub async fn start_pipeline(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        let options = config.pipeline().ok_or_else(|| {
            ServerError::Config(crate::config::ConfigError::Invalid(
                "--redis-url and --mysql-url are both required for the pipeline".into(),
            ))
        })?;
        let store = PipelineStore::open(options).await?;
        if config.retention().is_some() {
            tracing::info!(
                "messages past --message-retention-secs are removed by im-storage-worker, not by this node"
            );
        }
        let data_dir = config.data_dir.clone();
        let make_dir = || {
            std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
                path: data_dir.clone(),
                source,
            })
        };
        let key = match &config.token_secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => {
                make_dir()?;
                token_key(&config, &data_dir)?
            }
        };
        let node_id = match &config.node_id {
            Some(id) => id.clone(),
            None => {
                make_dir()?;
                node_id(&data_dir)?
            }
        };
        let cluster = config
            .cluster(node_id)
            .expect("pipeline settings include Redis");
        let joined = Cluster::join(cluster).await?;
        Self::with_store(config, Arc::new(store), key, Some(joined)).await
    }
}

impl<S: Closeable> Server<S> {
    /// Starts a node on an already opened store (and, with `cluster`, in
    /// its cluster: subscribed to other nodes' pushes before the first
    /// client is accepted). With `admin_listen` set, that address is bound
    /// before the client listener, so a bad one fails start-up before any
    /// client is accepted.
    pub async fn with_store(
        config: Config,
        store: Arc<S>,
        token_key: Vec<u8>,
        cluster: Option<(Cluster, Pending)>,
    ) -> Result<Self, ServerError> {
        let admin = config.admin_listen.map(AdminListener::bind).transpose()?;
        let tls = config
            .tls_files()
            .map(TlsAcceptor::load)
            .transpose()?
            .map(Arc::new);
        let net = Net::bind(NetConfig {
            tls: tls.clone(),
            ..config.net()
        })?;
        let (cluster, pending) = cluster.unzip();
        let service = ChatService::new(
            store.clone(),
            net.outbound(),
            config.chat(),
            token_key,
            cluster.clone(),
        )
        .map_err(ServerError::Chat)?;
        if let Some(pending) = pending {
            // Subscribed before the first client is accepted.
            pending.attach(service.local()).await;
        }
        // After the subscription: an end published meanwhile is either
        // loaded or received.
        service.start_sessions().await;
        let net = net.run(Arc::new(service.clone()))?;
        let addrs = net.addrs();
        if let Some(addr) = addrs.plain {
            tracing::info!(%addr, "listening");
        }
        if let Some(addr) = addrs.tls {
            tracing::info!(%addr, "listening for TLS");
        }
        let accepting = Arc::new(AtomicBool::new(true));
        let admin = admin.map(|listener| {
            listener.serve(Arc::new(NodeMetrics {
                outbound: net.outbound(),
                service: service.clone(),
                store: store.clone(),
                accepting: accepting.clone(),
                cluster: cluster.clone(),
            }))
        });
        Ok(Server {
            net,
            service,
            store,
            grace: Duration::from_secs(config.shutdown_grace_secs),
            accepting,
            admin,
            cluster,
            tls,
        })
    }

    /// Reads the TLS certificate, key and ticket keys again (SIGHUP): new
    /// connections get them, open ones keep theirs. Without a TLS
    /// listener there is nothing to do.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// The address clients connect to: the plain listener's, or the TLS
    /// one's when the plain listener is off.
    pub fn local_addr(&self) -> SocketAddr {
        self.net.addrs().first()
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.net.addrs().tls
    }

    /// Connection-layer counters.
    pub fn net_stats(&self) -> NetStatsSnapshot {
        self.outbound().stats()
    }

    /// Chat-service counters and queue depths.
    pub fn chat_stats(&self) -> ChatStatsSnapshot {
        self.service.stats()
    }

    /// Cluster counters, when the node is part of one.
    pub fn cluster_stats(&self) -> Option<ClusterStatsSnapshot> {
        self.cluster.as_ref().map(Cluster::stats)
    }

    /// The node's cluster membership, when it has one.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Resolves, with the reason, when the node must stop because it is no
    /// longer part of its cluster (a newer start took its node id). Never
    /// resolves for a node without a cluster.
    pub async fn fatal(&self) -> String {
        match &self.cluster {
            Some(cluster) => cluster.fatal().await,
            None => std::future::pending().await,
        }
    }

    /// The address of the admin listener, if one was asked for.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    fn outbound(&self) -> Outbound {
        self.net.outbound()
    }

    /// Users with at least one live connection.
    pub fn online_users(&self) -> usize {
        self.service.online_users()
    }

    /// Graceful shutdown: report unhealthy, stop accepting and reading
    /// requests, wait (up to the grace period) until every received request
    /// is answered, close every connection with SERVER_SHUTDOWN, flush and
    /// close the store, and close the admin listener last (so the final
    /// counters can be scraped meanwhile).
    pub async fn shutdown(self) {
        let Server {
            net,
            service,
            store,
            grace,
            accepting,
            admin,
            cluster,
            tls: _,
        } = self;
        accepting.store(false, Ordering::Release);
        net.drain();
        if tokio::time::timeout(grace, service.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = service.pending(),
                "grace period over with requests still in flight"
            );
        }
        let frame = Frame::error(0, ErrorCode::ServerShutdown, "server shutting down", true);
        let closing = tokio::task::spawn_blocking(move || net.close_all(&frame));
        if closing.await.is_err() {
            tracing::error!("closing connections failed");
        }
        service.flush_sessions().await;
        if let Some(cluster) = cluster {
            // Others count this node dead at once and sweep its routes.
            cluster.leave().await;
        }
        store.shutdown().await;
        if let Some(admin) = admin {
            admin.shutdown().await;
        }
        tracing::info!("shut down");
    }
}

/// The token signing key: the configured secret, or a random key kept in
/// `DATA_DIR/token.key` (created with mode 0600 on first start).
fn token_key(config: &Config, data_dir: &Path) -> Result<Vec<u8>, ServerError> {
    if let Some(secret) = &config.token_secret {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = data_dir.join("token.key");
    let err = |source| ServerError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "token key shorter than 32 bytes",
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: String = rand::random::<[u8; 32]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            write_private(&path, &key).map_err(err)?;
            Ok(key.into_bytes())
        }
        Err(e) => Err(err(e)),
    }
}

/// The node id kept in `DATA_DIR/node.id` (a random one, made on first
/// start).
fn node_id(data_dir: &Path) -> Result<String, ServerError> {
    let path = data_dir.join("node.id");
    let err = |source| ServerError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim().to_string();
            crate::cluster::ClusterConfig::validate_node_id(&id)
                .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id: String = rand::random::<[u8; 8]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            write_private(&path, &id).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()
}
