//! Assembly and lifecycle of one server node: open the store, bind the
//! listeners, start the chat service and the event loops; and the ordered
//! shutdown (stop accepting, finish in-flight requests, close sessions with
//! a reason, flush the store).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use im_proto::{ErrorCode, Frame};

use crate::chat::ChatService;
use crate::config::Config;
use crate::net::{Net, NetError, NetStatsSnapshot, Outbound, RunningNet};
use crate::store::pipeline::PipelineStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

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
}

/// Storage that can be shut down cleanly.
pub trait Closeable: Store {
    /// Finishes queued writes and releases the backend.
    fn shutdown(self: Arc<Self>) -> impl std::future::Future<Output = ()> + Send;
}

impl Closeable for SqliteStore {
    async fn shutdown(self: Arc<Self>) {
        // Closing joins the writer thread: keep it off the reactor.
        let _ = tokio::task::spawn_blocking(move || self.close()).await;
    }
}

impl Closeable for PipelineStore {
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
        Self::with_store(config, Arc::new(store), key)
    }
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
        let data_dir = config.data_dir.clone();
        let key = match &config.token_secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => {
                std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
                    path: data_dir.clone(),
                    source,
                })?;
                token_key(&config, &data_dir)?
            }
        };
        Self::with_store(config, Arc::new(store), key)
    }
}

impl<S: Closeable> Server<S> {
    /// Starts a node on an already opened store.
    pub fn with_store(
        config: Config,
        store: Arc<S>,
        token_key: Vec<u8>,
    ) -> Result<Self, ServerError> {
        let net = Net::bind(config.net())?;
        let service = ChatService::new(store.clone(), net.outbound(), config.chat(), token_key)
            .map_err(ServerError::Chat)?;
        let net = net.run(Arc::new(service.clone()))?;
        tracing::info!(addr = %net.local_addr(), "listening");
        Ok(Server {
            net,
            service,
            store,
            grace: Duration::from_secs(config.shutdown_grace_secs),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.net.local_addr()
    }

    /// Connection-layer counters.
    pub fn net_stats(&self) -> NetStatsSnapshot {
        self.outbound().stats()
    }

    fn outbound(&self) -> Outbound {
        self.net.outbound()
    }

    /// Users with at least one live connection.
    pub fn online_users(&self) -> usize {
        self.service.online_users()
    }

    /// Graceful shutdown: stop accepting and reading requests, wait (up to
    /// the grace period) until every received request is answered, close
    /// every connection with SERVER_SHUTDOWN, then flush and close the
    /// store.
    pub async fn shutdown(self) {
        let Server {
            net,
            service,
            store,
            grace,
        } = self;
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
        store.shutdown().await;
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
