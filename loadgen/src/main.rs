//! `im-loadgen`: see the crate docs and `im-loadgen --help`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::Context;
use clap::Parser;
use im_loadgen::metrics::Snapshot;
use im_loadgen::{Args, report};

// The generator allocates per frame sent and received; mimalloc keeps
// that cost off the cores it shares with the server it measures.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        anyhow::bail!(e);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(index) = args.worker_index {
        return runtime.block_on(im_loadgen::run_worker(args, index));
    }
    let (report, finals) = if args.workers <= 1 {
        runtime.block_on(im_loadgen::run(args.clone()))?
    } else {
        let finals = spawn_workers(&args)?;
        (report::build(&args, &finals), finals)
    };
    print!("{}", report::summary(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        report::plot(path, &finals).with_context(|| format!("plot {}", path.display()))?;
    }
    if report.failed() {
        std::process::exit(1);
    }
    if report.connections_established == 0 {
        std::process::exit(2);
    }
    Ok(())
}

/// Starts `--workers` copies of this program, each with its share, merges
/// their snapshots into one progress line a second, and returns their
/// final snapshots.
fn spawn_workers(args: &Args) -> anyhow::Result<Vec<Snapshot>> {
    let exe = std::env::current_exe().context("own executable")?;
    let prefix = args.user_prefix.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("lg{}", secs % 1_000_000_000)
    });
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Snapshot)>();
    let mut children = Vec::new();
    for index in 0..args.workers {
        let mut command = Command::new(&exe);
        command
            .args(std::env::args_os().skip(1))
            .args(["--worker-index", &index.to_string()]);
        if args.user_prefix.is_none() {
            // Every worker must name its users alike.
            command.args(["--user-prefix", &prefix]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .context("start a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(s) = serde_json::from_str::<Snapshot>(&line) {
                    let _ = tx.send((index, s));
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let mut latest: Vec<Option<Snapshot>> = vec![None; args.workers];
    let mut previous = (0, 0, 0, 0.0);
    let mut last_print = std::time::Instant::now();
    while let Ok((index, snapshot)) = rx.recv() {
        latest[index] = Some(snapshot);
        if !args.quiet && last_print.elapsed() >= std::time::Duration::from_secs(1) {
            let parts: Vec<Snapshot> = latest.iter().flatten().cloned().collect();
            eprintln!("{}", report::progress_line(&parts, &mut previous));
            last_print = std::time::Instant::now();
        }
    }
    for mut child in children {
        let status = child.wait()?;
        if !status.success() {
            eprintln!("a worker exited with {status}");
        }
    }
    let finals: Vec<Snapshot> = latest.into_iter().flatten().filter(|s| s.done).collect();
    anyhow::ensure!(
        finals.len() == args.workers,
        "only {} of {} workers finished",
        finals.len(),
        args.workers
    );
    Ok(finals)
}
