//! `im-storage-worker`: moves messages from the Redis stream shards into
//! MySQL until SIGTERM or SIGINT, then stores the batches in hand and exits
//! 0. Settings come from flags, `IM_*` variables or `--config FILE` (see
//! `--help`); logging follows `RUST_LOG` (default `info`). With
//! `--admin-listen ADDR` it serves Prometheus metrics at `/metrics` and a
//! health check at `/healthz` until it exits.

use im_storage::{Worker, WorkerConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

// Every stored row allocates a little (reply parsing, decoding, statement
// parameters); mimalloc takes a good share of that cost off the worker.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let config = WorkerConfig::load()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let worker = Worker::start(config).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    worker.shutdown().await;
    Ok(())
}
