//! Turning workers' snapshots into what people read: a progress line per
//! second, the final summary, the JSON report and the SVG plot.

use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::args::{Args, Scenario};
use crate::metrics::{Snapshot, decode};

/// Percentiles of one latency, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Samples.
    pub count: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }
}

/// Latencies of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    /// TCP connect plus register/log-in (storm: resume after the drop).
    pub connect: Percentiles,
    /// Send to acknowledgement (the message is durable).
    pub ack: Percentiles,
    /// Send to delivery at a recipient.
    pub deliver: Percentiles,
    /// Send to delivery, sender and recipient on the same node.
    #[serde(default)]
    pub same_node: Percentiles,
    /// Send to delivery, sender and recipient on different nodes.
    #[serde(default)]
    pub cross_node: Percentiles,
}

/// The report of a run (`--json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Connections asked for.
    pub connections_target: u64,
    /// Connections that logged in.
    pub connections_established: u64,
    /// Connections that failed.
    pub connections_failed: u64,
    /// Send requests written.
    pub messages_sent: u64,
    /// Sends acknowledged (stored).
    pub messages_acked: u64,
    /// Deliveries to recipients (each recipient's first copy).
    pub messages_delivered: u64,
    /// Deliveries no recipient ever got, even from the final sync.
    pub messages_lost: u64,
    /// Sends neither acknowledged nor refused by the time the final sync
    /// went ahead (two minutes after the load): a server that never
    /// answers fails the run.
    #[serde(default)]
    pub sends_unanswered: u64,
    /// Deliveries of a message a recipient already had.
    pub messages_duplicated: u64,
    /// Live pushes that arrived after a later one of their conversation
    /// (pushes from several nodes may cross; a client following the
    /// display rule shows them in order, so this is counted, not failed).
    #[serde(default)]
    pub pushes_out_of_order: u64,
    /// Live deliveries whose sender was connected to another node than
    /// the recipient.
    #[serde(default)]
    pub cross_node_deliveries: u64,
    /// Pushes to a user of a conversation it is not in.
    pub messages_misrouted: u64,
    /// Deliveries that only the final sync brought (missed live).
    pub messages_recovered: u64,
    /// Seqs the server's retention policy removed before they were
    /// delivered (reported by sync; not lost).
    #[serde(default)]
    pub messages_expired: u64,
    /// Sends the server refused as overloaded (backed off, not stored).
    pub messages_rejected: u64,
    /// Pushes of a message the recipient's catch-up sync had already
    /// brought (the push raced the sync; clients drop them by seq).
    pub pushes_after_sync: u64,
    /// Error replies and lost connections.
    pub errors: u64,
    /// Sends resent (flagged as resends) after their connection was lost
    /// before the ack; each is stored once either way.
    #[serde(default)]
    pub messages_resent: u64,
    /// Resends the server answered as duplicates (the lost attempt had
    /// been stored).
    #[serde(default)]
    pub resends_found_stored: u64,
    /// `SyncHint` pushes received: the server skipped pushes to a
    /// connection whose queue was full, and it synced instead.
    #[serde(default)]
    pub sync_hints: u64,
    /// Seconds of measured load.
    pub duration_s: f64,
    /// Acknowledged messages per second during the measured load.
    pub throughput_msgs_per_s: f64,
    /// Deliveries per second during the measured load.
    pub deliveries_per_s: f64,
    /// Storm: reconnects (resume) per second after the drop.
    pub reconnects_per_s: f64,
    /// Latencies during the measured load, in microseconds.
    pub latency_us: Latencies,
    /// Workers (processes).
    pub workers: usize,
    /// Problems verification found (empty when all is well).
    pub problems: Vec<String>,
}

impl Report {
    /// Whether verification found a loss, a duplicate or a misrouted
    /// push.
    pub fn failed(&self) -> bool {
        self.messages_lost > 0
            || self.messages_duplicated > 0
            || self.messages_misrouted > 0
            || self.sends_unanswered > 0
    }
}

/// Merges the histograms of several snapshots.
fn merged(parts: &[Snapshot], pick: impl Fn(&Snapshot) -> &str) -> Histogram<u64> {
    let mut out = decode("");
    for p in parts {
        let _ = out.add(decode(pick(p)));
    }
    out
}

/// The report from every worker's final snapshot.
pub fn build(args: &Args, finals: &[Snapshot]) -> Report {
    let sum = |f: fn(&Snapshot) -> u64| finals.iter().map(f).sum::<u64>();
    let measured_secs = finals.iter().map(|f| f.measured_secs).fold(0.0, f64::max);
    let per_s = |n: u64| {
        if measured_secs > 0.0 {
            n as f64 / measured_secs
        } else {
            0.0
        }
    };
    let storm = finals.iter().map(|f| f.storm_secs).fold(0.0, f64::max);
    Report {
        scenario: args.scenario.name().into(),
        connections_target: args.connections as u64,
        connections_established: sum(|f| f.connections),
        connections_failed: sum(|f| f.connections_failed),
        messages_sent: sum(|f| f.sent),
        messages_acked: sum(|f| f.acked),
        messages_delivered: sum(|f| f.delivered),
        messages_lost: sum(|f| f.lost),
        sends_unanswered: sum(|f| f.unanswered),
        messages_duplicated: sum(|f| f.duplicated),
        pushes_out_of_order: sum(|f| f.reordered),
        cross_node_deliveries: sum(|f| f.cross_node),
        messages_misrouted: sum(|f| f.misrouted),
        messages_recovered: sum(|f| f.recovered),
        messages_expired: sum(|f| f.expired),
        messages_rejected: sum(|f| f.rejected),
        pushes_after_sync: sum(|f| f.overlaps),
        errors: sum(|f| f.errors),
        messages_resent: sum(|f| f.resent),
        resends_found_stored: sum(|f| f.resends_found),
        sync_hints: sum(|f| f.sync_hints),
        duration_s: measured_secs,
        throughput_msgs_per_s: per_s(sum(|f| f.measured_acked)),
        deliveries_per_s: per_s(sum(|f| f.measured_delivered)),
        reconnects_per_s: if args.scenario == Scenario::Storm && storm > 0.0 {
            sum(|f| f.reconnects) as f64 / storm
        } else {
            0.0
        },
        latency_us: Latencies {
            connect: Percentiles::of(&merged(finals, |s| &s.connect)),
            ack: Percentiles::of(&merged(finals, |s| &s.ack)),
            deliver: Percentiles::of(&merged(finals, |s| &s.deliver)),
            same_node: Percentiles::of(&merged(finals, |s| &s.deliver_same_node)),
            cross_node: Percentiles::of(&merged(finals, |s| &s.deliver_cross_node)),
        },
        workers: finals.len(),
        problems: finals
            .iter()
            .flat_map(|f| f.problems.iter().cloned())
            .take(20)
            .collect(),
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// One progress line from the workers' latest snapshots and the previous
/// merged counters `(sent, acked, delivered)` a second ago.
pub fn progress_line(parts: &[Snapshot], previous: &mut (u64, u64, u64, f64)) -> String {
    let sent: u64 = parts.iter().map(|p| p.sent).sum();
    let acked: u64 = parts.iter().map(|p| p.acked).sum();
    let delivered: u64 = parts.iter().map(|p| p.delivered).sum();
    let t = parts.iter().map(|p| p.t).fold(0.0, f64::max);
    let dt = (t - previous.3).max(1e-3);
    let rate = |now: u64, before: u64| (now.saturating_sub(before)) as f64 / dt;
    let line = format!(
        "[{t:5.1}s] conns {:>7} | sent {:>8.0}/s acked {:>8.0}/s delivered {:>9.0}/s | p99 ack {} ms deliver {} ms | refused {} errors {}{}",
        parts.iter().map(|p| p.connections).sum::<u64>(),
        rate(sent, previous.0),
        rate(acked, previous.1),
        rate(delivered, previous.2),
        ms(merged(parts, |s| &s.ack).value_at_quantile(0.99)),
        ms(merged(parts, |s| &s.deliver).value_at_quantile(0.99)),
        parts.iter().map(|p| p.rejected).sum::<u64>(),
        parts.iter().map(|p| p.errors).sum::<u64>(),
        if parts.iter().any(|p| p.measuring) {
            ""
        } else {
            " (warm-up)"
        },
    );
    *previous = (sent, acked, delivered, t);
    line
}

/// The human summary.
pub fn summary(r: &Report) -> String {
    let lat = |name: &str, p: &Percentiles| {
        format!(
            "  {name:<8} p50 {:>8} ms  p90 {:>8} ms  p99 {:>8} ms  p99.9 {:>8} ms  max {:>8} ms  ({} samples)\n",
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.p999),
            ms(p.max),
            p.count
        )
    };
    let mut out = format!(
        "scenario {}: {} of {} connections ({} failed) over {} worker(s)\n",
        r.scenario,
        r.connections_established,
        r.connections_target,
        r.connections_failed,
        r.workers
    );
    out += &format!(
        "messages: {} sent, {} acked, {} refused (overloaded), {} delivered | {:.0} msgs/s acked, {:.0} deliveries/s over {:.1} s\n",
        r.messages_sent,
        r.messages_acked,
        r.messages_rejected,
        r.messages_delivered,
        r.throughput_msgs_per_s,
        r.deliveries_per_s,
        r.duration_s
    );
    if r.reconnects_per_s > 0.0 {
        out += &format!("storm: {:.0} reconnects/s (resume)\n", r.reconnects_per_s);
    }
    if r.messages_resent > 0 || r.sync_hints > 0 {
        out += &format!(
            "recovery: {} sends resent after a lost connection ({} had been stored), {} sync hints\n",
            r.messages_resent, r.resends_found_stored, r.sync_hints
        );
    }
    out += "latency:\n";
    out += &lat("connect", &r.latency_us.connect);
    out += &lat("ack", &r.latency_us.ack);
    out += &lat("deliver", &r.latency_us.deliver);
    if r.cross_node_deliveries > 0 {
        out += &lat("  same node", &r.latency_us.same_node);
        out += &lat("  cross node", &r.latency_us.cross_node);
    }
    out += &format!(
        "verification: {} lost, {} unanswered, {} duplicated, {} pushes out of order, {} misrouted, {} recovered only by the final sync, {} removed by retention, {} pushes after a sync had them, {} errors; {} cross-node deliveries: {}\n",
        r.messages_lost,
        r.sends_unanswered,
        r.messages_duplicated,
        r.pushes_out_of_order,
        r.messages_misrouted,
        r.messages_recovered,
        r.messages_expired,
        r.pushes_after_sync,
        r.errors,
        r.cross_node_deliveries,
        if r.failed() { "FAILED" } else { "ok" }
    );
    for p in &r.problems {
        out += &format!("  problem: {p}\n");
    }
    out
}

/// Draws throughput per second over the run and the latency percentile
/// curves (ack and deliver) into an SVG file.
pub fn plot(path: &Path, finals: &[Snapshot]) -> anyhow::Result<()> {
    use plotters::prelude::*;

    // Per-second rates, summed over workers by whole second.
    let mut per_second: std::collections::BTreeMap<u64, (u64, u64, u64)> = Default::default();
    for f in finals {
        let mut previous = (0.0, 0, 0, 0);
        for &(t, sent, acked, delivered) in &f.timeline {
            let dt = t - previous.0;
            if dt > 0.0 {
                let e = per_second.entry(t.round() as u64).or_default();
                e.0 += ((sent - previous.1) as f64 / dt) as u64;
                e.1 += ((acked - previous.2) as f64 / dt) as u64;
                e.2 += ((delivered - previous.3) as f64 / dt) as u64;
            }
            previous = (t, sent, acked, delivered);
        }
    }
    let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);

    let t_max = per_second.keys().next_back().copied().unwrap_or(1).max(1);
    let y_max = per_second
        .values()
        .map(|v| v.0.max(v.1).max(v.2))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = ChartBuilder::on(&top)
        .caption("throughput (per second)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..t_max, 0u64..y_max + y_max / 10)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .draw()?;
    let series = [
        ("sent", 0usize, BLUE),
        ("acked", 1, GREEN),
        ("delivered", 2, RED),
    ];
    for (name, index, color) in series {
        let points: Vec<(u64, u64)> = per_second
            .iter()
            .map(|(&t, v)| (t, [v.0, v.1, v.2][index]))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;

    // Latency by percentile: x = nines (0 = p0, 1 = p90, 2 = p99, ...).
    let curves = [
        ("ack", merged(finals, |s| &s.ack), GREEN),
        ("deliver", merged(finals, |s| &s.deliver), RED),
    ];
    let lat_max = curves.iter().map(|c| c.1.max()).max().unwrap_or(1).max(1) as f64 / 1000.0;
    let mut chart = ChartBuilder::on(&bottom)
        .caption("latency by percentile (ms)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..4f64, 0f64..lat_max * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .x_label_formatter(&|x| format!("{:.3}", 100.0 * (1.0 - 10f64.powf(-x))))
        .y_desc("ms")
        .draw()?;
    for (name, h, color) in curves {
        if h.is_empty() {
            continue;
        }
        let points: Vec<(f64, f64)> = (0..=400)
            .map(|i| {
                let x = f64::from(i) / 100.0;
                let q = 1.0 - 10f64.powf(-x);
                (x, h.value_at_quantile(q.min(1.0)) as f64 / 1000.0)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
