//! The admin HTTP listener of both binaries (`--admin-listen`): Prometheus
//! metrics at `GET /metrics`, a health check at `GET /healthz`, 404 for
//! every other path.
//!
//! The module knows nothing of what it reports: a process hands it an
//! [`AdminSource`] that fills an [`Exposition`] on each scrape (from its own
//! counters, read when asked, so nothing is kept twice) and answers the
//! health check. The listener is bound first ([`AdminListener::bind`], so a
//! bad address fails start-up before anything else runs), then serves
//! ([`AdminListener::serve`]) until [`AdminServer::shutdown`] or until it is
//! dropped.
//!
//! Metrics use the Prometheus text format, version 0.0.4, encoded by the
//! `prometheus` crate: `# HELP` and `# TYPE` lines, counters named with a
//! `_total` suffix.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The content type of `GET /metrics`: `text/plain; version=0.0.4`.
pub const METRICS_CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// How long in-flight admin requests get to finish on shutdown before the
/// listener task is aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Failures of the admin listener.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr} for the admin endpoint: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The metrics could not be encoded (a metric without a name or
    /// sample: a bug in the source).
    #[error("cannot encode metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// What a process reports on its admin listener.
pub trait AdminSource: Send + Sync + 'static {
    /// Adds the current metrics to `out`. Runs on every scrape: read
    /// counters, do no I/O.
    fn collect(&self, out: &mut Exposition);

    /// `Ok` while the process is healthy, otherwise why not (sent with a
    /// 503). Runs on every `GET /healthz`: bound any I/O with a short
    /// timeout.
    fn health(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// The metrics of one scrape, in the order they were added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<MetricFamily>,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// A counter: a total that only grows while the process runs. Its name
    /// must end in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        debug_assert!(name.ends_with("_total"), "counter {name} lacks _total");
        let mut counter = Counter::default();
        counter.set_value(value as f64);
        let mut metric = Metric::default();
        metric.set_counter(counter);
        self.push(name, help, MetricType::COUNTER, vec![metric]);
    }

    /// A gauge: a value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.push(name, help, MetricType::GAUGE, vec![gauge_metric(value)]);
    }

    /// A counter with one sample per value of `label` (e.g. per limit).
    /// Its name must end in `_total`.
    pub fn counter_by<L: ToString>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) {
        debug_assert!(name.ends_with("_total"), "counter {name} lacks _total");
        let metrics: Vec<Metric> = samples
            .into_iter()
            .map(|(value_of_label, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(label.to_string());
                pair.set_value(value_of_label.to_string());
                let mut counter = Counter::default();
                counter.set_value(value as f64);
                let mut metric = Metric::default();
                metric.set_counter(counter);
                metric.set_label(vec![pair]);
                metric
            })
            .collect();
        if !metrics.is_empty() {
            self.push(name, help, MetricType::COUNTER, metrics);
        }
    }

    /// A gauge with one sample per value of `label` (e.g. per shard). A
    /// family without samples is left out, as the format requires.
    pub fn gauge_by<L: ToString>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) {
        let metrics: Vec<Metric> = samples
            .into_iter()
            .map(|(value_of_label, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(label.to_string());
                pair.set_value(value_of_label.to_string());
                let mut metric = gauge_metric(value);
                metric.set_label(vec![pair]);
                metric
            })
            .collect();
        if !metrics.is_empty() {
            self.push(name, help, MetricType::GAUGE, metrics);
        }
    }

    fn push(&mut self, name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) {
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(kind);
        family.set_metric(metrics);
        self.families.push(family);
    }

    /// The text format, version 0.0.4.
    pub fn encode(&self) -> Result<String, AdminError> {
        let mut out = Vec::with_capacity(64 * self.families.len());
        TextEncoder::new().encode(&self.families, &mut out)?;
        // The encoder writes only str data.
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn gauge_metric(value: u64) -> Metric {
    let mut gauge = Gauge::default();
    gauge.set_value(value as f64);
    let mut metric = Metric::default();
    metric.set_gauge(gauge);
    metric
}

/// A bound admin socket that does not serve yet.
#[derive(Debug)]
pub struct AdminListener {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
}

impl AdminListener {
    /// Binds `addr` (port 0 picks a free port). Must be called within a
    /// tokio runtime; binding is all that can fail, so a process can bind
    /// before it starts anything else and serve once it runs.
    pub fn bind(addr: SocketAddr) -> Result<AdminListener, AdminError> {
        let err = |source| AdminError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let local_addr = listener.local_addr().map_err(err)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(err)?;
        Ok(AdminListener {
            listener,
            local_addr,
        })
    }

    /// The bound address (with the actual port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Starts serving `source` on a task of the current tokio runtime.
    pub fn serve<T: AdminSource>(self, source: Arc<T>) -> AdminServer {
        let addr = self.local_addr;
        let listener = self.listener;
        let app = Router::new()
            .route("/metrics", get(metrics::<T>))
            .route("/healthz", get(healthz::<T>))
            .with_state(source);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
        tracing::info!(addr = %addr, "admin listener serving /metrics and /healthz");
        AdminServer {
            local_addr: addr,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

/// A serving admin listener. Dropping it stops it at once; prefer
/// [`AdminServer::shutdown`], which lets a scrape in progress finish.
#[derive(Debug)]
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `addr` and serves `source` (see [`AdminListener`]).
    pub fn start<T: AdminSource>(
        addr: SocketAddr,
        source: Arc<T>,
    ) -> Result<AdminServer, AdminError> {
        Ok(AdminListener::bind(addr)?.serve(source))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets requests in progress finish (up to a second),
    /// and closes the socket.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn metrics<T: AdminSource>(State(source): State<Arc<T>>) -> Response {
    let mut exposition = Exposition::new();
    source.collect(&mut exposition);
    match exposition.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

async fn healthz<T: AdminSource>(State(source): State<Arc<T>>) -> Response {
    match source.health().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_families_are_typed_with_help() {
        let mut out = Exposition::new();
        out.counter("im_frames_received_total", "Frames received.", 42);
        out.gauge("im_connections", "Open connections.", 7);
        out.gauge_by(
            "im_storage_stream_lag",
            "Entries not yet delivered.",
            "shard",
            [(0, 3), (1, 0)],
        );
        out.gauge_by::<u32>("im_empty", "Left out.", "shard", []);
        let text = out.encode().unwrap();
        assert_eq!(
            text,
            "# HELP im_frames_received_total Frames received.\n\
             # TYPE im_frames_received_total counter\n\
             im_frames_received_total 42\n\
             # HELP im_connections Open connections.\n\
             # TYPE im_connections gauge\n\
             im_connections 7\n\
             # HELP im_storage_stream_lag Entries not yet delivered.\n\
             # TYPE im_storage_stream_lag gauge\n\
             im_storage_stream_lag{shard=\"0\"} 3\n\
             im_storage_stream_lag{shard=\"1\"} 0\n"
        );
        assert_eq!(METRICS_CONTENT_TYPE, "text/plain; version=0.0.4");
    }

    #[test]
    fn help_text_is_escaped() {
        let mut out = Exposition::new();
        out.gauge("im_x", "a \\ b\nc", 1);
        let text = out.encode().unwrap();
        assert!(text.starts_with("# HELP im_x a \\\\ b\\nc\n"), "{text}");
    }

    #[tokio::test]
    async fn a_taken_port_fails_clearly() {
        let first = AdminListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = AdminListener::bind(first.local_addr()).unwrap_err();
        assert!(matches!(err, AdminError::Bind { .. }));
        assert!(err.to_string().contains("admin endpoint"), "{err}");
    }
}
