//! `im-pairs-bench`: end-to-end throughput of persisted 1:1 messages.
//!
//! Registers `pairs` sender/receiver pairs, then every sender pipelines
//! `messages` sends to its receiver (at most `window` unacknowledged at a
//! time). The clock stops when every send is acknowledged (so stored) and
//! every receiver has its pushes; with `--mysql-url` it also waits until
//! the storage worker has put every message into MySQL and reports that
//! time too. It checks that each receiver got each message once, in order.
//!
//! This measures the server's send path; the load generator measures
//! latency distributions and many more scenarios. `bench/e2e.sh` starts a
//! whole deployment for it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{Frame, FrameCodec};
use mysql_async::prelude::*;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

#[derive(Parser, Debug)]
#[command(about = "Persisted 1:1 messages per second, end to end")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    server: SocketAddr,
    /// Sender/receiver pairs (two connections each).
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Messages each sender sends.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Unacknowledged sends per sender at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// MySQL database of the pipeline: also wait until every message is
    /// stored there.
    #[arg(long)]
    mysql_url: Option<String>,
}

type Conn = Framed<TcpStream, FrameCodec>;

async fn register(addr: SocketAddr, name: &str) -> anyhow::Result<(Conn, u64)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut conn = Framed::new(stream, FrameCodec::default());
    let body = Body::Register(pb::RegisterRequest {
        username: name.into(),
        password: "pairs-bench-password".into(),
        device_name: String::new(),
    });
    conn.send(Frame::new(1, body)).await?;
    match conn.next().await.context("closed")??.body {
        Some(Body::AuthOk(ok)) => Ok((conn, ok.user_id)),
        other => bail!("register {name}: {other:?}"),
    }
}

/// Sends `n` messages to `to`, keeping `window` in flight; returns when all
/// are acknowledged.
async fn send_all(
    conn: Conn,
    to: u64,
    n: usize,
    window: usize,
    text: String,
) -> anyhow::Result<()> {
    let (mut tx, mut rx) = conn.split();
    let mut sent = 0;
    let mut acked = 0;
    while acked < n {
        while sent < n && sent - acked < window {
            let body = Body::Send(pb::SendRequest {
                target: Some(pb::send_request::Target::ToUser(to)),
                client_msg_id: format!("m{sent}"),
                content: Some(pb::Content {
                    kind: Some(pb::content::Kind::Text(pb::Text { text: text.clone() })),
                }),
                resend: false,
            });
            tx.feed(Frame::new(sent as u64 + 1, body)).await?;
            sent += 1;
        }
        tx.flush().await?;
        match rx.next().await.context("sender closed")??.body {
            Some(Body::SendAck(_)) => acked += 1,
            Some(Body::Error(e)) => bail!("send refused: {e:?}"),
            _ => {}
        }
    }
    Ok(())
}

/// Receives `n` pushes and checks they are seqs 1..=n in order.
async fn receive_all(mut conn: Conn, n: usize) -> anyhow::Result<()> {
    let mut next = 1;
    while next <= n as u64 {
        if let Some(Body::Message(m)) = conn.next().await.context("receiver closed")??.body {
            if m.seq != next {
                bail!("receiver got seq {} where {} was due", m.seq, next);
            }
            next += 1;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tag = format!("{:x}", std::process::id());
    let mut pairs = Vec::with_capacity(args.pairs);
    let mut conversations = Vec::with_capacity(args.pairs);
    for p in 0..args.pairs {
        let (receiver, to) = register(args.server, &format!("r{tag}-{p}")).await?;
        let (sender, from) = register(args.server, &format!("s{tag}-{p}")).await?;
        let conversation = im_proto::ConversationId::direct(from, to).context("user ids")?;
        conversations.push(conversation.raw());
        pairs.push((sender, receiver, to));
    }
    let text = "x".repeat(args.size);
    let total = args.pairs * args.messages;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (sender, receiver, to) in pairs {
        tasks.push(tokio::spawn(receive_all(receiver, args.messages)));
        tasks.push(tokio::spawn(send_all(
            sender,
            to,
            args.messages,
            args.window,
            text.clone(),
        )));
    }
    for task in tasks {
        task.await??;
    }
    let delivered = started.elapsed();
    println!(
        "{total} messages acknowledged and delivered in {:.2} s = {:.0} msgs/s ({} pairs, window {}, {} B)",
        delivered.as_secs_f64(),
        total as f64 / delivered.as_secs_f64(),
        args.pairs,
        args.window,
        args.size
    );
    if let Some(url) = &args.mysql_url {
        let pool = mysql_async::Pool::new(url.as_str());
        let mut conn = pool.get_conn().await?;
        let sql = format!(
            "SELECT COUNT(*) FROM messages WHERE conversation_id IN ({})",
            conversations
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let stored: Option<u64> = conn.query_first(sql.as_str()).await?;
            if stored.unwrap_or(0) >= total as u64 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {total} messages reached MySQL",
                    stored.unwrap_or(0)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let persisted = started.elapsed();
        println!(
            "all {total} stored in MySQL after {:.2} s = {:.0} msgs/s",
            persisted.as_secs_f64(),
            total as f64 / persisted.as_secs_f64()
        );
        drop(conn);
        pool.disconnect().await?;
    }
    Ok(())
}
