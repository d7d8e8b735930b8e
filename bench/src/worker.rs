//! `im-worker-bench`: how fast the storage worker moves messages from Redis
//! Streams into MySQL, next to the fastest bulk load MySQL offers.
//!
//! It fills the stream shards with N synthetic records (pipelined XADD, as
//! the append script would write them: a mix of direct and group
//! conversations), runs the worker in-process until every row is stored,
//! and prints rows/s. Then it writes the same rows to a file and loads them
//! with `LOAD DATA LOCAL INFILE` into a fresh copy of the `messages` table,
//! and prints that rate and the ratio.
//!
//! Run it against throwaway servers: `bench/worker-rows.sh` does that.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use im_proto::{ConversationId, pb};
use im_storage::layout::{Layout, dedup_key, encode_record, message_id, record_body};
use im_storage::{Worker, WorkerConfig};
use mysql_async::prelude::*;
use rand::Rng;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Storage worker rows/s from Redis Streams into MySQL, and LOAD DATA for scale")]
struct Args {
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// MySQL server URL without a database (a fresh one is created).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    mysql_url: String,
    /// Messages to store.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Stream shards.
    #[arg(long, default_value_t = 16)]
    streams: u32,
    /// Conversations the messages spread over.
    #[arg(long, default_value_t = 20_000)]
    conversations: u64,
    /// Percent of conversations that are groups (the rest are direct).
    #[arg(long, default_value_t = 20)]
    group_percent: u64,
    /// Members per group.
    #[arg(long, default_value_t = 20)]
    group_members: u64,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 60)]
    text_bytes: usize,
    /// Messages per stream entry (the append script writes one entry per
    /// call, with every message of the call).
    #[arg(long, default_value_t = 16)]
    records_per_entry: usize,
    /// Worker: messages per batch.
    #[arg(long, default_value_t = 4000)]
    batch_count: usize,
    /// Worker: rows per INSERT statement.
    #[arg(long, default_value_t = 1024)]
    chunk_rows: usize,
    /// Worker: MySQL connections (transactions in flight; 0 = one per
    /// shard).
    #[arg(long, default_value_t = 4)]
    mysql_connections: usize,
    /// PIDs of the database processes (mariadbd, redis-server) whose CPU
    /// time to report next to the worker's.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Skip the LOAD DATA comparison.
    #[arg(long)]
    no_load_data: bool,
    /// MySQL servers (`mysql://user@host:port`, no database) to spread
    /// the message rows over (`--mysql-shards`): a database of this run's
    /// own on each. Default: the messages in --mysql-url's database.
    #[arg(long, value_delimiter = ',')]
    mysql_shards: Vec<String>,
    /// Add the index retention sweeps use (`messages_by_time`, created by
    /// the first sweep with --message-retention-secs) before the run, to
    /// measure what it costs the worker.
    #[arg(long)]
    with_time_index: bool,
}

struct Conv {
    id: u64,
    seq: u64,
    members: Vec<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt::init();
    }
    let args = Args::parse();
    let mut rng = rand::rng();
    let tag: u32 = rng.random();
    let database = format!("im_bench_{tag:08x}");
    let server = mysql_async::Pool::new(args.mysql_url.as_str());
    server
        .get_conn()
        .await
        .context("connect to MySQL")?
        .query_drop(format!("CREATE DATABASE {database}"))
        .await?;
    server.disconnect().await?;
    let mysql_url = format!("{}/{database}", args.mysql_url.trim_end_matches('/'));
    let pool = mysql_async::Pool::new(mysql_url.as_str());
    im_storage::schema::migrate(&pool).await?;
    if args.with_time_index {
        im_storage::retention::ensure_time_index(&mut pool.get_conn().await?).await?;
    }
    let mut shard_urls = Vec::new();
    for (i, server_url) in args.mysql_shards.iter().enumerate() {
        let name = format!("{database}_s{i}");
        let server = mysql_async::Pool::new(server_url.as_str());
        server
            .get_conn()
            .await
            .context("connect to a MySQL shard")?
            .query_drop(format!("CREATE DATABASE {name}"))
            .await?;
        server.disconnect().await?;
        shard_urls.push(format!("{}/{name}", server_url.trim_end_matches('/')));
    }

    // Conversations: groups with members rows (so read cursors do real
    // work), and direct pairs.
    let mut convs = Vec::new();
    let mut members = Vec::new();
    for i in 0..args.conversations {
        if i * 100 < args.conversations * args.group_percent {
            let id = ConversationId::group(i + 1).context("group id")?.raw();
            let ms: Vec<u64> = (0..args.group_members)
                .map(|m| 1 + (i * 7 + m) % 100_000)
                .collect();
            members.extend(ms.iter().map(|&u| (id, u)));
            convs.push(Conv {
                id,
                seq: 0,
                members: ms,
            });
        } else {
            let a = 1 + i % 50_000;
            let b = 50_001 + i;
            let id = ConversationId::direct(a, b).context("direct id")?.raw();
            convs.push(Conv {
                id,
                seq: 0,
                members: vec![a, b],
            });
        }
    }
    let mut conn = pool.get_conn().await?;
    members.sort_unstable();
    members.dedup();
    for chunk in members.chunks(5000) {
        let values: Vec<String> = chunk.iter().map(|(c, u)| format!("({c},{u})")).collect();
        conn.query_drop(format!(
            "INSERT IGNORE INTO members (conversation_id, user_id) VALUES {}",
            values.join(",")
        ))
        .await?;
    }
    drop(conn);

    // Fill the streams, writing the same rows to a file for LOAD DATA.
    let layout = Layout::new(format!("bench{tag:08x}"), args.streams);
    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    let file_path = std::env::temp_dir().join(format!("{database}.tsv"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&file_path)?);
    let text = "x".repeat(args.text_bytes);
    let mut pipes: Vec<redis::Pipeline> = (0..args.streams).map(|_| redis::pipe()).collect();
    let mut queued = vec![0usize; args.streams as usize];
    let per_entry = args.records_per_entry.max(1);
    let mut entries: Vec<Vec<Vec<u8>>> = (0..args.streams)
        .map(|_| Vec::with_capacity(per_entry))
        .collect();
    let mut counters = vec![0u64; args.streams as usize];
    let mut hex = String::new();
    let fill_start = Instant::now();
    let now = im_proto::now_ms();
    for i in 0..args.rows {
        let conv = &mut convs[rng.random_range(0..args.conversations as usize)];
        conv.seq += 1;
        let sender = conv.members[rng.random_range(0..conv.members.len())];
        let time = now + (i / 1000) as i64;
        let client_msg_id = format!("{sender}-{i}");
        let key = dedup_key(sender, &client_msg_id);
        let body = record_body(&pb::Message {
            conversation_id: conv.id,
            sender_id: sender,
            client_msg_id,
            server_time_ms: time,
            content: Some(pb::Content {
                kind: Some(pb::content::Kind::Text(pb::Text { text: text.clone() })),
            }),
            ..Default::default()
        });
        let shard = layout.shard_of(conv.id) as usize;
        counters[shard] += 1;
        entries[shard].push(encode_record(conv.seq, counters[shard], &body));
        if entries[shard].len() == per_entry {
            let cmd = pipes[shard]
                .cmd("XADD")
                .arg(layout.stream_key(shard as u32))
                .arg("*");
            for record in entries[shard].drain(..) {
                cmd.arg("m").arg(record);
            }
            cmd.ignore();
            queued[shard] += 1;
        }
        if queued[shard] > 1000 / per_entry {
            pipes[shard].query_async::<()>(&mut redis).await?;
            pipes[shard].clear();
            queued[shard] = 0;
        }
        if args.no_load_data {
            continue;
        }
        hex.clear();
        for b in &body {
            use std::fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
        }
        let id = message_id(shard as u32, counters[shard]);
        writeln!(
            file,
            "{}\t{}\t{id}\t{sender}\t{time}\t{key}\t{hex}",
            conv.id, conv.seq
        )?;
    }
    for (shard, p) in pipes.iter_mut().enumerate() {
        if !entries[shard].is_empty() {
            let cmd = p.cmd("XADD").arg(layout.stream_key(shard as u32)).arg("*");
            for record in entries[shard].drain(..) {
                cmd.arg("m").arg(record);
            }
            cmd.ignore();
            queued[shard] += 1;
        }
        if queued[shard] > 0 {
            p.query_async::<()>(&mut redis).await?;
        }
    }
    file.flush()?;
    drop(file);
    let fill = fill_start.elapsed();
    println!(
        "filled {} streams with {} records in {:.2} s ({:.0}/s)",
        args.streams,
        args.rows,
        fill.as_secs_f64(),
        args.rows as f64 / fill.as_secs_f64()
    );

    // The worker.
    let mut config = WorkerConfig::new(&args.redis_url, &mysql_url);
    config.redis_prefix = layout.prefix().to_string();
    config.streams = args.streams;
    config.consumer = Some("bench".into());
    config.batch_count = args.batch_count;
    config.chunk_rows = args.chunk_rows;
    config.mysql_connections = args.mysql_connections;
    config.mysql_shards = shard_urls.clone();
    config.progress_secs = 0;
    let cpu_before = cpu_times(&args.pids);
    let start = Instant::now();
    let worker = Worker::start(config).await?;
    let mut last_print = Instant::now();
    loop {
        let stats = worker.stats();
        if stats.rows >= args.rows {
            break;
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            println!("  ... {} rows", stats.rows);
            last_print = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!(
                "worker stored only {} of {} rows in 10 minutes",
                stats.rows,
                args.rows
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rows_took = start.elapsed();
    let stats = worker.stats();
    // Shutdown writes what the rows imply (members rows, read cursors,
    // watermarks) that is still waiting: count it in.
    worker.shutdown().await;
    let took = start.elapsed();
    let cpu = cpu_times(&args.pids)
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect::<Vec<f64>>();
    let rate = args.rows as f64 / took.as_secs_f64();
    println!(
        "  message rows committed after {:.2} s; cursors and watermarks written after {:.2} s",
        rows_took.as_secs_f64(),
        took.as_secs_f64()
    );
    let mut stored = Some(0);
    let holders = if shard_urls.is_empty() {
        vec![mysql_url.clone()]
    } else {
        shard_urls.clone()
    };
    for url in &holders {
        let shard = mysql_async::Pool::new(url.as_str());
        let n: Option<u64> = shard
            .get_conn()
            .await?
            .query_first("SELECT COUNT(*) FROM messages")
            .await?;
        stored = Some(stored.unwrap_or(0) + n.unwrap_or(0));
        shard.disconnect().await?;
    }
    let mut conn = pool.get_conn().await?;
    println!(
        "worker: {} rows in {:.2} s = {:.0} rows/s ({} batches, {:.0} rows/batch, {} retries); table holds {}",
        args.rows,
        took.as_secs_f64(),
        rate,
        stats.batches,
        stats.rows as f64 / stats.batches.max(1) as f64,
        stats.retries,
        stored.unwrap_or(0)
    );

    let names =
        std::iter::once("worker".to_string()).chain(args.pids.iter().map(|p| format!("pid {p}")));
    let shares: Vec<String> = names
        .zip(&cpu)
        .map(|(n, c)| format!("{n} {c:.2} s ({:.0}%)", 100.0 * c / took.as_secs_f64()))
        .collect();
    println!("  cpu during the run: {}", shares.join(", "));

    if !args.no_load_data {
        conn.query_drop("CREATE TABLE messages_load LIKE messages")
            .await?;
        drop(conn);
        pool.clone().disconnect().await?;
        let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&mysql_url)?)
            .local_infile_handler(Some(mysql_async::WhiteListFsHandler::new([&file_path])));
        let pool = mysql_async::Pool::new(opts);
        let mut conn = pool.get_conn().await?;
        let start = Instant::now();
        conn.query_drop(format!(
            "LOAD DATA LOCAL INFILE '{}' INTO TABLE messages_load \
             FIELDS TERMINATED BY '\\t' \
             (conversation_id, seq, message_id, sender_id, server_time_ms, dedup_key, @b) \
             SET body = UNHEX(@b)",
            file_path.display()
        ))
        .await?;
        let took = start.elapsed();
        let load_rate = args.rows as f64 / took.as_secs_f64();
        println!(
            "LOAD DATA: {} rows in {:.2} s = {:.0} rows/s; worker/LOAD DATA = {:.2}",
            args.rows,
            took.as_secs_f64(),
            load_rate,
            rate / load_rate
        );
        drop(conn);
        pool.disconnect().await?;
    }
    let _ = std::fs::remove_file(&file_path);
    Ok(())
}

/// CPU seconds (user + system) of this process, then of each pid.
fn cpu_times(pids: &[u32]) -> Vec<f64> {
    let tick = 100.0; // USER_HZ on Linux
    let read = |path: String| -> f64 {
        let stat = std::fs::read_to_string(path).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / tick
    };
    std::iter::once(read("/proc/self/stat".into()))
        .chain(pids.iter().map(|p| read(format!("/proc/{p}/stat"))))
        .collect()
}
