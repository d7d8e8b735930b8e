//! `im-server`: runs one chat server node until SIGTERM or SIGINT, then
//! shuts down gracefully and exits 0. SIGHUP reloads the TLS certificate,
//! key and ticket keys. A cluster node whose id a newer
//! start of the same id took over shuts down too, and exits 1.

use im_server::config::Config;
use im_server::server::{Closeable, EmbeddedServer, PipelineServer, Server};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let config = Config::load()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("im-worker");
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.build()?.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Installed before start-up, so a signal during it is not fatal.
    let signals = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::hangup())?,
    );
    if config.redis_cluster_nodes.is_some() || config.redis_url.is_some() {
        serve(PipelineServer::start_pipeline(config).await?, signals).await
    } else {
        serve(EmbeddedServer::start(config).await?, signals).await
    }
}

async fn serve<S: Closeable>(
    server: Server<S>,
    (mut term, mut int, mut hup): (Signal, Signal, Signal),
) -> anyhow::Result<()> {
    let fatal = loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break None;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                break None;
            }
            _ = hup.recv() => match server.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and ticket keys reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the old ones"),
            },
            reason = server.fatal() => break Some(reason),
        }
    };
    server.shutdown().await;
    match fatal {
        Some(reason) => anyhow::bail!("{reason}"),
        None => Ok(()),
    }
}
