//! `im-idle-bench`: measures what an idle authenticated connection costs the
//! server. It registers a set of users, opens N connections that each log in
//! with a token (spread over the users), waits until the server is quiet,
//! and reports the server's RSS growth and the kernel's slab growth per
//! connection. Then it drops them all and opens them again (a reconnect
//! storm), and reports both rates and the server's CPU time per connection.
//!
//! With `--ca-file` the connections speak TLS: the first opening makes full
//! handshakes, the reconnect resumes sessions from tickets.
//!
//! Run it against a fresh server process: `bench/idle-rss.sh` does that.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use im_loadgen::tls::Tls;
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{Frame, FrameCodec};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::HandshakeKind;
use tokio_util::codec::Framed;
use tokio_util::either::Either;

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
    /// Speak TLS (to the server's --tls-listen address), trusting this CA.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The name the server's certificate is checked against.
    #[arg(long, default_value = "localhost")]
    tls_server_name: String,
}

type Conn = Framed<Either<TcpStream, TlsStream<TcpStream>>, FrameCodec>;

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

async fn connect(addr: SocketAddr, tls: Option<&Tls>) -> anyhow::Result<Conn> {
    let stream = TcpStream::connect(addr).await?;
    let stream = match tls {
        None => Either::Left(stream),
        Some(tls) => Either::Right(tls.connect(stream).await?),
    };
    Ok(Framed::new(stream, FrameCodec::default()))
}

/// Whether the connection's TLS handshake resumed a session.
fn resumed(conn: &Conn) -> bool {
    match conn.get_ref() {
        Either::Left(_) => false,
        Either::Right(tls) => tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed),
    }
}

/// Registers (or logs in) `name` and returns a token.
async fn token_for(addr: SocketAddr, name: String, tls: Option<&Tls>) -> anyhow::Result<String> {
    let mut conn = connect(addr, tls).await?;
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

/// CPU seconds the process has used (user + system; USER_HZ is 100).
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("stat field")?.parse::<f64>()?)
    };
    // utime and stime are fields 14 and 15, here 11 and 12 (0-based after
    // the state field at 0).
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// Opens a connection per token index, resuming each; returns the
/// connections and how many TLS handshakes resumed a session.
async fn open_all(
    addr: SocketAddr,
    tls: Option<&Tls>,
    tokens: &[String],
    count: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Conn>, usize)> {
    let mut opened = futures::stream::iter((0..count).map(|i| async move {
        let mut conn = connect(addr, tls).await?;
        let token = tokens[i % tokens.len()].clone();
        match call(&mut conn, 1, Body::Resume(pb::ResumeRequest { token })).await? {
            Body::AuthOk(_) => Ok::<_, anyhow::Error>(conn),
            other => bail!("resume failed: {other:?}"),
        }
    }))
    .buffer_unordered(concurrency.max(1));
    let mut conns = Vec::with_capacity(count);
    let mut resumed_count = 0;
    while let Some(conn) = opened.next().await {
        let conn = conn?;
        resumed_count += usize::from(resumed(&conn));
        conns.push(conn);
    }
    Ok((conns, resumed_count))
}

/// Connections opened by [`timed_open`], and how fast and at what server
/// CPU cost.
struct Opened {
    conns: Vec<Conn>,
    summary: String,
}

/// [`open_all`] for `--connections`, timed, with the server's CPU time.
async fn timed_open(args: &Args, tls: Option<&Tls>, tokens: &[String]) -> anyhow::Result<Opened> {
    let cpu_before = cpu_secs(args.pid)?;
    let started = Instant::now();
    let (conns, resumed) =
        open_all(args.server, tls, tokens, args.connections, args.concurrency).await?;
    let elapsed = started.elapsed();
    let cpu = cpu_secs(args.pid)? - cpu_before;
    let n = conns.len().max(1) as f64;
    let summary = format!(
        "{:.0}/s, server CPU {:.0} us each ({resumed} TLS resumed)",
        n / elapsed.as_secs_f64(),
        cpu * 1e6 / n
    );
    Ok(Opened { conns, summary })
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
    let tls = args
        .ca_file
        .as_deref()
        .map(|ca| {
            Tls::new(
                Some(ca),
                &args.tls_server_name,
                2 * args.connections + users,
            )
        })
        .transpose()?;
    let tls = tls.as_ref();
    eprintln!("registering {users} users...");
    let prefix = format!("idle{}", std::process::id());
    let mut tokens = Vec::with_capacity(users);
    let mut pending = futures::stream::iter(
        (0..users).map(|i| token_for(args.server, format!("{prefix}-{i}"), tls)),
    )
    .buffered(32);
    while let Some(token) = pending.next().await {
        tokens.push(token?);
    }
    // The first opening makes full handshakes (keeping the tickets they
    // bring for the reconnect).
    if let Some(tls) = tls {
        tls.set_resume(false);
    }

    let rss_before = settled_rss(args.pid).await?;
    let slab_before = meminfo_kib("Slab:")?;
    eprintln!("opening {} connections...", args.connections);
    let first = timed_open(&args, tls, &tokens).await?;
    let conns = first.conns;
    let rss_after = settled_rss(args.pid).await?;
    let slab_after = meminfo_kib("Slab:")?;
    let n = conns.len() as f64;
    let rss_per = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n;
    let slab_per = (slab_after.saturating_sub(slab_before)) as f64 * 1024.0 / n;
    let kind = if tls.is_some() { "TLS" } else { "plain" };
    println!("connections            {} ({kind})", conns.len());
    println!("users                  {users}");
    println!("open+resume rate       {}", first.summary);
    println!("server RSS before      {rss_before} KiB");
    println!("server RSS after       {rss_after} KiB");
    println!("server RSS per conn    {rss_per:.0} bytes");
    println!("kernel slab per conn   {slab_per:.0} bytes (both loopback ends)");

    // Every connection drops and comes back (with TLS: resuming).
    drop(conns);
    if let Some(tls) = tls {
        tls.set_resume(true);
    }
    settled_rss(args.pid).await?;
    let again = timed_open(&args, tls, &tokens).await?;
    let conns = again.conns;
    println!("reconnect rate         {}", again.summary);
    if args.hold > 0 {
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    drop(conns);
    Ok(())
}
