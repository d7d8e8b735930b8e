//! Counters and latency histograms of a run, and the snapshots workers send
//! to the process that merges them.
//!
//! Counters are relaxed atomics shared by every connection task of a worker.
//! Latencies go into hdrhistograms (microseconds, 1 µs to 100 s, three
//! significant digits) split into a few mutex-guarded shards so tasks on
//! different threads rarely meet; snapshots merge the shards.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

const SHARDS: usize = 8;
const MAX_US: u64 = 100_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// A latency histogram written by many tasks.
pub struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        }
    }
}

impl Latency {
    /// Records one latency in microseconds.
    pub fn record(&self, us: u64) {
        let shard = shard_of_thread();
        let mut h = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record(us.clamp(1, MAX_US));
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Histogram<u64> {
        let mut out = histogram();
        for shard in &self.shards {
            let h = shard.lock().unwrap_or_else(|p| p.into_inner());
            let _ = out.add(&*h);
        }
        out
    }

    /// Forgets everything (at the end of the warm-up).
    pub fn reset(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
    }
}

fn shard_of_thread() -> usize {
    use std::hash::BuildHasher;
    thread_local! {
        static SHARD: usize = {
            let hasher = std::collections::hash_map::RandomState::new();
            (hasher.hash_one(std::thread::current().id()) as usize) % SHARDS
        };
    }
    SHARD.with(|s| *s)
}

/// What one worker counts.
#[derive(Default)]
pub struct Metrics {
    /// Connections logged in (gauge).
    pub connections: AtomicU64,
    /// Connection attempts that failed.
    pub connections_failed: AtomicU64,
    /// Send requests written.
    pub sent: AtomicU64,
    /// SendAcks received.
    pub acked: AtomicU64,
    /// Messages delivered to a recipient for the first time (live or by
    /// the final sync).
    pub delivered: AtomicU64,
    /// Deliveries of a seq the recipient already had.
    pub duplicated: AtomicU64,
    /// Live deliveries after a higher seq had been pushed (allowed: pushes
    /// of one conversation from several nodes may cross; clients order by
    /// seq).
    pub reordered: AtomicU64,
    /// Live deliveries whose sender was connected to another node.
    pub cross_node: AtomicU64,
    /// Pushes of a conversation the user is not in.
    pub misrouted: AtomicU64,
    /// Deliveries that only the final sync brought (missed live).
    pub recovered: AtomicU64,
    /// Seqs the server said its retention policy removed before they
    /// reached the user (not counted as lost).
    pub expired: AtomicU64,
    /// Pushes of a message a catch-up sync had already brought (allowed by
    /// the protocol; not a duplicate).
    pub overlaps: AtomicU64,
    /// Sends the server refused as overloaded or rate limited (the sender
    /// backs off and goes on; nothing was stored).
    pub rejected: AtomicU64,
    /// Error replies and broken connections.
    pub errors: AtomicU64,
    /// Reconnects completed (storm).
    pub reconnects: AtomicU64,
    /// Sends resent (flagged as resends) after their connection was lost
    /// before the ack.
    pub resent: AtomicU64,
    /// Acks of a resend whose first attempt had been stored (`duplicate`).
    pub resends_found: AtomicU64,
    /// `SyncHint` pushes received (each followed by a sync).
    pub sync_hints: AtomicU64,
    /// Sends not answered yet (gauge): waiting for their ack or refusal,
    /// or left by a lost connection to be resent. The final sync waits
    /// for it to reach 0, so that no message is stored after it.
    pub in_flight: AtomicU64,
    /// Whether the warm-up is over.
    pub measuring: AtomicBool,
    /// Connect + log-in (or resume) latency.
    pub connect: Latency,
    /// Send to acknowledgement.
    pub ack: Latency,
    /// Send to delivery at a recipient.
    pub deliver: Latency,
    /// The same, for senders on the recipient's node.
    pub deliver_same_node: Latency,
    /// The same, for senders on another node.
    pub deliver_cross_node: Latency,
}

impl Metrics {
    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Takes from a gauge.
    pub fn sub(gauge: &AtomicU64, n: u64) {
        gauge.fetch_sub(n, Relaxed);
    }

    /// Whether latencies are being recorded (after the warm-up).
    pub fn measuring(&self) -> bool {
        self.measuring.load(Relaxed)
    }

    /// Ends the warm-up: latencies recorded so far are dropped.
    pub fn start_measuring(&self) {
        self.ack.reset();
        self.deliver.reset();
        self.deliver_same_node.reset();
        self.deliver_cross_node.reset();
        self.measuring.store(true, Relaxed);
    }

    /// The counters and histograms now, `t` seconds into the run.
    pub fn snapshot(&self, t: f64) -> Snapshot {
        let get = |a: &AtomicU64| a.load(Relaxed);
        Snapshot {
            t,
            measuring: self.measuring(),
            connections: get(&self.connections),
            connections_failed: get(&self.connections_failed),
            sent: get(&self.sent),
            acked: get(&self.acked),
            delivered: get(&self.delivered),
            duplicated: get(&self.duplicated),
            reordered: get(&self.reordered),
            cross_node: get(&self.cross_node),
            misrouted: get(&self.misrouted),
            recovered: get(&self.recovered),
            expired: get(&self.expired),
            rejected: get(&self.rejected),
            overlaps: get(&self.overlaps),
            errors: get(&self.errors),
            reconnects: get(&self.reconnects),
            resent: get(&self.resent),
            resends_found: get(&self.resends_found),
            sync_hints: get(&self.sync_hints),
            connect: encode(&self.connect.snapshot()),
            ack: encode(&self.ack.snapshot()),
            deliver: encode(&self.deliver.snapshot()),
            deliver_same_node: encode(&self.deliver_same_node.snapshot()),
            deliver_cross_node: encode(&self.deliver_cross_node.snapshot()),
            ..Snapshot::default()
        }
    }
}

fn encode(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    if V2Serializer::new().serialize(h, &mut bytes).is_err() {
        return String::new();
    }
    STANDARD.encode(bytes)
}

/// Decodes a histogram written by [`Metrics::snapshot`] (empty if
/// malformed).
pub fn decode(s: &str) -> Histogram<u64> {
    STANDARD
        .decode(s)
        .ok()
        .and_then(|bytes| Deserializer::new().deserialize(&mut bytes.as_slice()).ok())
        .unwrap_or_else(histogram)
}

/// A worker's state at one moment; the last one of a run (`done`) carries
/// the verification results and the timeline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the worker started.
    pub t: f64,
    /// Whether the warm-up was over.
    pub measuring: bool,
    /// Connections logged in.
    pub connections: u64,
    /// Connections that failed.
    pub connections_failed: u64,
    /// Sends written.
    pub sent: u64,
    /// Sends acknowledged.
    pub acked: u64,
    /// First deliveries.
    pub delivered: u64,
    /// Duplicate deliveries.
    pub duplicated: u64,
    /// Out-of-order live deliveries.
    pub reordered: u64,
    /// Live deliveries from a sender on another node.
    #[serde(default)]
    pub cross_node: u64,
    /// Pushes of a conversation the user is not in.
    #[serde(default)]
    pub misrouted: u64,
    /// Deliveries only the final sync brought.
    pub recovered: u64,
    /// Seqs removed by the server's retention policy before delivery.
    #[serde(default)]
    pub expired: u64,
    /// Sends refused as overloaded.
    #[serde(default)]
    pub rejected: u64,
    /// Pushes that raced a sync.
    #[serde(default)]
    pub overlaps: u64,
    /// Errors.
    pub errors: u64,
    /// Reconnects (storm).
    pub reconnects: u64,
    /// Sends resent after a lost connection.
    #[serde(default)]
    pub resent: u64,
    /// Resends answered as duplicates (their first attempt was stored).
    #[serde(default)]
    pub resends_found: u64,
    /// SyncHint pushes received.
    #[serde(default)]
    pub sync_hints: u64,
    /// Connect latency histogram (base64 V2).
    pub connect: String,
    /// Ack latency histogram.
    pub ack: String,
    /// Delivery latency histogram.
    pub deliver: String,
    /// Delivery latency histogram, sender on the recipient's node.
    #[serde(default)]
    pub deliver_same_node: String,
    /// Delivery latency histogram, sender on another node.
    #[serde(default)]
    pub deliver_cross_node: String,
    /// The run is over and these are the final figures.
    pub done: bool,
    /// Seqs never delivered to a recipient, even by the final sync.
    pub lost: u64,
    /// Sends the server had not answered when the final sync went ahead
    /// (two minutes after the load).
    #[serde(default)]
    pub unanswered: u64,
    /// Acked messages sent during the measured window.
    pub measured_acked: u64,
    /// Deliveries during the measured window.
    pub measured_delivered: u64,
    /// Seconds of the measured window.
    pub measured_secs: f64,
    /// Storm: seconds from the drop until every connection was back.
    pub storm_secs: f64,
    /// Per second: (t, sent, acked, delivered) cumulative.
    pub timeline: Vec<(f64, u64, u64, u64)>,
    /// Human-readable problems found by verification.
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_carry_histograms() {
        let m = Metrics::default();
        for us in [100, 200, 300, 10_000] {
            m.connect.record(us);
        }
        let s = m.snapshot(1.0);
        let h = decode(&s.connect);
        assert_eq!(h.len(), 4);
        assert!(h.max() >= 10_000 && h.max() < 10_100);
        let json = serde_json::to_string(&s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(decode(&back.connect).len(), 4);
        assert_eq!(decode("not base64").len(), 0);
    }
}
