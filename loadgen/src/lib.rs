//! The im load generator: simulated users over real TCP connections.
//!
//! Each simulated user is one task speaking the wire protocol directly
//! (no SDK: a user costs a task, its socket and a few hundred bytes of
//! state, and an idle one no buffer at all). A run spreads its users over
//! one or more worker processes, each limited only by its open-files limit.
//! Every delivery is verified: each user tracks the seqs of its
//! conversation, and a final sync shows what never arrived.
//!
//! - [`args`]: the command line.
//! - `worker`: one worker's run (connect, scenario, verification).
//! - [`track`]: per-conversation seq bookkeeping.
//! - [`metrics`]: counters, latency histograms, snapshots.
//! - [`report`]: progress lines, summary, JSON report, SVG plot.
#![forbid(unsafe_code)]

pub mod args;
mod conn;
pub mod metrics;
pub mod report;
pub mod tls;
pub mod track;
mod worker;

use std::sync::Arc;

pub use args::{Args, Scenario};
pub use report::Report;

/// Runs a whole load test in this process (one worker, whatever
/// `--workers` says) and returns its report. Progress lines go to stderr
/// unless `--quiet`.
pub async fn run(mut args: Args) -> anyhow::Result<(Report, Vec<metrics::Snapshot>)> {
    args.validate().map_err(anyhow::Error::msg)?;
    args.workers = 1;
    let args = Arc::new(args);
    let quiet = args.quiet;
    let mut previous = (0, 0, 0, 0.0);
    let last = worker::run(args.clone(), 0, |s| {
        if !quiet {
            eprintln!(
                "{}",
                report::progress_line(std::slice::from_ref(s), &mut previous)
            );
        }
    })
    .await?;
    let finals = vec![last];
    Ok((report::build(&args, &finals), finals))
}

/// Runs worker `index` of a multi-process run, writing its snapshots to
/// stdout as JSON lines (the last one has `done`).
pub async fn run_worker(args: Args, index: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let args = Arc::new(args);
    let emit = |s: &metrics::Snapshot| {
        if let Ok(line) = serde_json::to_string(s) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    let last = worker::run(args, index, emit).await?;
    emit(&last);
    Ok(())
}
