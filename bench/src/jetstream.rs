//! `im-jetstream-bench`: the same 1:1 shape as `im-pairs-bench`, on NATS
//! JetStream, for the side-by-side figure of `bench/vs-jetstream.sh`.
//!
//! `pairs` publisher/subscriber pairs, each its own connection (so
//! `2 × pairs` connections, as the chat side). One file-storage stream
//! holds subject `bench.<pair>` of every pair; each subscriber has a push
//! consumer of its own filtered to its pair's subject (no acks: delivery
//! as a chat server's push, which the client acknowledges by cursor, not
//! per message). Every publisher publishes `messages` messages of `size`
//! bytes, each acknowledged by the stream (`PubAck`), with at most
//! `window` unacknowledged at a time. The clock stops when every publish
//! is acknowledged and every subscriber has every message of its pair; it
//! checks each came once and in order.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer, stream};
use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

#[derive(Parser, Debug)]
#[command(about = "JetStream acknowledged 1:1 messages per second, end to end")]
struct Args {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    server: String,
    /// Publisher/subscriber pairs (two connections each).
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// Messages each publisher publishes.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Unacknowledged publishes per publisher at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Bytes per message.
    #[arg(long, default_value_t = 128)]
    size: usize,
}

const STREAM: &str = "IMBENCH";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let admin = async_nats::connect(&args.server)
        .await
        .context("connect to NATS")?;
    let js = jetstream::new(admin.clone());
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("create the stream")?;

    // Subscribers first, each on its own connection with its own consumer.
    let mut receivers = Vec::with_capacity(args.pairs);
    for pair in 0..args.pairs {
        let client = async_nats::connect(&args.server).await?;
        // The consumer's context is this connection's, so its deliveries
        // arrive here.
        let stream = jetstream::new(client.clone()).get_stream(STREAM).await?;
        let consumer: consumer::PushConsumer = stream
            .create_consumer(consumer::push::Config {
                deliver_subject: client.new_inbox(),
                filter_subject: format!("bench.{pair}"),
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("create a push consumer")?;
        let messages = consumer.messages().await?;
        receivers.push(messages);
    }
    let mut publishers = Vec::with_capacity(args.pairs);
    for _ in 0..args.pairs {
        publishers.push(jetstream::new(async_nats::connect(&args.server).await?));
    }

    let expected = args.messages;
    let payload = bytes::Bytes::from(vec![b'x'; args.size]);
    let started = Instant::now();
    let receiving: Vec<_> = receivers
        .into_iter()
        .map(|mut messages| {
            tokio::spawn(async move {
                let mut last = 0u64;
                let mut got = 0usize;
                while got < expected {
                    let message = tokio::time::timeout(Duration::from_secs(60), messages.next())
                        .await
                        .context("no message for 60 s")?
                        .context("consumer ended")??;
                    let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let seq = info.stream_sequence;
                    if seq <= last {
                        bail!("stream seq {seq} after {last}: repeated or out of order");
                    }
                    last = seq;
                    got += 1;
                }
                anyhow::Ok(started.elapsed())
            })
        })
        .collect();
    let sending: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(pair, js)| {
            let payload = payload.clone();
            let window = args.window.max(1);
            tokio::spawn(async move {
                let subject = format!("bench.{pair}");
                let mut in_flight: FuturesUnordered<
                    <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture,
                > = FuturesUnordered::new();
                for _ in 0..expected {
                    if in_flight.len() >= window {
                        in_flight
                            .next()
                            .await
                            .expect("in flight")
                            .context("publish acknowledgement")?;
                    }
                    let ack = js
                        .publish(subject.clone(), payload.clone())
                        .await
                        .context("publish")?;
                    in_flight.push(ack.into_future());
                }
                while let Some(ack) = in_flight.next().await {
                    ack.context("publish acknowledgement")?;
                }
                anyhow::Ok(started.elapsed())
            })
        })
        .collect();
    let mut acked = Duration::ZERO;
    for task in sending {
        acked = acked.max(task.await??);
    }
    let mut delivered = Duration::ZERO;
    for task in receiving {
        delivered = delivered.max(task.await??);
    }
    let total = args.pairs * args.messages;
    let info = js.get_stream(STREAM).await?.info().await?.state.messages;
    if info != total as u64 {
        bail!("the stream holds {info} messages, {total} were acknowledged");
    }
    println!(
        "{total} messages acknowledged and delivered once, in order, with {} connections in {:.2} s: {:.0} deliveries/s (all acknowledged after {:.2} s)",
        2 * args.pairs,
        delivered.as_secs_f64(),
        total as f64 / delivered.as_secs_f64(),
        acked.as_secs_f64()
    );
    js.delete_stream(STREAM).await?;
    Ok(())
}
