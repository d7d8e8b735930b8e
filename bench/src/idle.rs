//! `im-idle-bench`: measures what an idle authenticated connection costs the
//! server. It registers a set of users, opens N connections that each log in
//! with a token (spread over the users), waits until the server is quiet,
//! and reports the server's RSS growth and the kernel's slab growth per
//! connection.
//!
//! Run it against a fresh server process: `bench/idle-rss.sh` does that.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{Frame, FrameCodec};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

#[derive(Parser, Debug)]
#[command(about = "Server RSS and kernel slab per idle authenticated connection")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    server: SocketAddr,
    /// PID of the server process (its RSS is read from /proc).
    #[arg(long)]
    pid: u32,
    /// Idle connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Distinct users the connections log in as.
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds to hold the connections after measuring.
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

type Conn = Framed<TcpStream, FrameCodec>;

async fn call(conn: &mut Conn, id: u64, body: Body) -> anyhow::Result<Body> {
    conn.send(Frame::new(id, body)).await?;
    while let Some(frame) = conn.next().await {
        let frame = frame?;
        if frame.request_id == id {
            return frame.body.context("empty reply");
        }
    }
    bail!("connection closed")
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
    let stream = TcpStream::connect(addr).await?;
    Ok(Framed::new(stream, FrameCodec::default()))
}

/// Registers (or logs in) `name` and returns a token.
async fn token_for(addr: SocketAddr, name: String) -> anyhow::Result<String> {
    let mut conn = connect(addr).await?;
    let password = "idle-bench-password".to_string();
    let reply = call(
        &mut conn,
        1,
        Body::Register(pb::RegisterRequest {
            username: name.clone(),
            password: password.clone(),
            device_name: String::new(),
        }),
    )
    .await?;
    let reply = match reply {
        Body::AuthOk(ok) => Body::AuthOk(ok),
        _ => {
            call(
                &mut conn,
                2,
                Body::Login(pb::LoginRequest {
                    username: name,
                    password,
                    device_name: String::new(),
                }),
            )
            .await?
        }
    };
    match reply {
        Body::AuthOk(ok) => Ok(ok.token),
        other => bail!("cannot log in: {other:?}"),
    }
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_kib(&text, field)
}

fn meminfo_kib(field: &str) -> anyhow::Result<u64> {
    parse_kib(&std::fs::read_to_string("/proc/meminfo")?, field)
}

fn parse_kib(text: &str, field: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("{field} not found"))
}

/// Waits until the server's RSS stops moving.
async fn settled_rss(pid: u32) -> anyhow::Result<u64> {
    let mut last = status_kib(pid, "VmRSS:")?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = status_kib(pid, "VmRSS:")?;
        if now.abs_diff(last) < 64 {
            return Ok(now);
        }
        last = now;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let users = args.users.max(1).min(args.connections.max(1));
    eprintln!("registering {users} users...");
    let prefix = format!("idle{}", std::process::id());
    let mut tokens = Vec::with_capacity(users);
    let mut pending =
        futures::stream::iter((0..users).map(|i| token_for(args.server, format!("{prefix}-{i}"))))
            .buffered(32);
    while let Some(token) = pending.next().await {
        tokens.push(token?);
    }

    let rss_before = settled_rss(args.pid).await?;
    let slab_before = meminfo_kib("Slab:")?;
    eprintln!("opening {} connections...", args.connections);
    let started = Instant::now();
    let tokens = &tokens;
    let addr = args.server;
    let mut opened = futures::stream::iter((0..args.connections).map(|i| async move {
        let mut conn = connect(addr).await?;
        let token = tokens[i % tokens.len()].clone();
        match call(&mut conn, 1, Body::Resume(pb::ResumeRequest { token })).await? {
            Body::AuthOk(_) => Ok::<_, anyhow::Error>(conn),
            other => bail!("resume failed: {other:?}"),
        }
    }))
    .buffer_unordered(args.concurrency.max(1));
    let mut conns = Vec::with_capacity(args.connections);
    while let Some(conn) = opened.next().await {
        conns.push(conn?);
    }
    let elapsed = started.elapsed();
    let rss_after = settled_rss(args.pid).await?;
    let slab_after = meminfo_kib("Slab:")?;
    let n = conns.len() as f64;
    let rss_per = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n;
    let slab_per = (slab_after.saturating_sub(slab_before)) as f64 * 1024.0 / n;
    println!("connections            {}", conns.len());
    println!("users                  {users}");
    println!("open+resume rate       {:.0}/s", n / elapsed.as_secs_f64());
    println!("server RSS before      {rss_before} KiB");
    println!("server RSS after       {rss_after} KiB");
    println!("server RSS per conn    {rss_per:.0} bytes");
    println!("kernel slab per conn   {slab_per:.0} bytes (both loopback ends)");
    if args.hold > 0 {
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    drop(conns);
    Ok(())
}
