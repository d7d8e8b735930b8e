//! Command-line settings of a run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

/// What the simulated users do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Log in, then only keep the connection alive with heartbeats.
    Idle,
    /// 1:1 chat: users in random pairs send to each other at the rate.
    Direct,
    /// Groups of `--group-size`; every member sends at the rate, every
    /// message fans out to all other members.
    Group,
    /// Pairs chat; then every connection drops at once and reconnects with
    /// its token, syncs, and goes on; checks that nothing went missing.
    Storm,
}

impl Scenario {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Direct => "direct",
            Scenario::Group => "group",
            Scenario::Storm => "storm",
        }
    }
}

/// im-loadgen: simulates users of the im chat server over real TCP
/// connections, verifies that every acknowledged message reaches every
/// recipient exactly once and in order, and reports throughput and latency.
#[derive(Debug, Clone, Parser, Serialize, Deserialize)]
#[command(name = "im-loadgen", version, max_term_width = 100)]
pub struct Args {
    /// Server address(es), e.g. the nodes of one cluster. With several,
    /// the users of a pair or group are spread over different nodes (see
    /// --cross-node-fraction), and a user whose node fails resumes on the
    /// next one.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7000")]
    pub server: Vec<SocketAddr>,

    /// With several --server addresses: the fraction of pairs and groups
    /// whose users are spread over different nodes; the rest keep all
    /// their users on one node, so same-node and cross-node latency are
    /// measured in one run.
    #[arg(long, default_value_t = 1.0)]
    #[serde(default = "one")]
    pub cross_node_fraction: f64,

    /// What the users do.
    #[arg(long, value_enum, default_value_t = Scenario::Direct)]
    pub scenario: Scenario,

    /// Simulated users (one connection each), over all workers.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,

    /// New connections (connect and log in) per second, over all workers
    /// (0 = as fast as they go).
    #[arg(long, default_value_t = 2000)]
    pub ramp: u32,

    /// Messages per second, over all senders and workers (0 = as fast as
    /// the server acknowledges, each sender keeping `--window` in flight).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,

    /// Bytes of text per message (at least 40: timing and ids travel in
    /// the text).
    #[arg(long, default_value_t = 100)]
    pub size: usize,

    /// Members per group (group scenario).
    #[arg(long, default_value_t = 10)]
    pub group_size: usize,

    /// Seconds of measured load (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,

    /// Seconds of load before measuring starts (latency and throughput of
    /// the warm-up are not counted; its messages are still verified).
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,

    /// Processes to spread the connections over (each may hold only as many
    /// sockets as its open-files limit allows).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,

    /// Local source addresses to spread connections over, as a range
    /// `127.0.0.2-127.0.0.40` or a list; each allows about another 28,000
    /// connections (the ephemeral port range of one address).
    #[arg(long, value_parser = parse_source_addrs)]
    pub source_addrs: Option<SourceAddrs>,

    /// Sends in flight per sender at most (the server reads at most 64
    /// unanswered requests per connection).
    #[arg(long, default_value_t = 32)]
    pub window: usize,

    /// Write a JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Draw throughput over time and the latency percentile curve here
    /// (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// Password of the simulated accounts.
    #[arg(long, default_value = "im-loadgen-password", hide = true)]
    pub password: String,

    /// Prefix of the simulated usernames (default: derived from the time).
    #[arg(long)]
    pub user_prefix: Option<String>,

    /// Seconds to wait for late deliveries before the final sync (which
    /// then fetches whatever is still missing), counted from the last
    /// answer to a send: the load generator first waits (up to two
    /// minutes) until every send is acknowledged or refused.
    #[arg(long, default_value_t = 2)]
    pub settle: u64,

    /// Print no progress lines.
    #[arg(long)]
    pub quiet: bool,

    /// Internal: this process is worker N of `--workers`.
    #[arg(long, hide = true)]
    pub worker_index: Option<usize>,

    /// Connect over TLS (to the servers' --tls-listen addresses), trusting
    /// the system's CA bundle unless --ca-file is given.
    #[arg(long)]
    pub tls: bool,

    /// Trust the CA certificates of this PEM file (implies --tls).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// The name every node's TLS certificate is checked against (clients
    /// of one service see one name, so tickets of one node resume on
    /// another).
    #[arg(long, default_value = "localhost")]
    pub tls_server_name: String,
}

fn one() -> f64 {
    1.0
}

impl Args {
    /// Checks ranges that clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.server.is_empty() {
            return Err("--server needs at least one address".into());
        }
        if self.size < 40 {
            return Err("--size must be at least 40 bytes".into());
        }
        if self.workers == 0 || self.connections == 0 {
            return Err("--workers and --connections must be positive".into());
        }
        if self.scenario == Scenario::Group && self.group_size < 2 {
            return Err("--group-size must be at least 2".into());
        }
        if matches!(self.scenario, Scenario::Direct | Scenario::Storm) && self.connections < 2 {
            return Err("direct and storm need at least 2 connections".into());
        }
        if self.window == 0 {
            return Err("--window must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.cross_node_fraction) {
            return Err("--cross-node-fraction must be between 0 and 1".into());
        }
        Ok(())
    }

    /// Users per conversation: a pair, a group, or 1 (idle).
    pub fn unit(&self) -> usize {
        match self.scenario {
            Scenario::Idle => 1,
            Scenario::Direct | Scenario::Storm => 2,
            Scenario::Group => self.group_size,
        }
    }

    /// The share of a worker: its connections (a multiple of the pair or
    /// group size, so pairs and groups never span workers) and its rate.
    pub fn share(&self, worker: usize) -> (usize, f64) {
        let unit = self.unit();
        let units = self.connections / unit;
        let base = units / self.workers;
        let extra = usize::from(worker < units % self.workers);
        let mine = (base + extra) * unit;
        let mine = if self.scenario == Scenario::Idle {
            let base = self.connections / self.workers;
            base + usize::from(worker < self.connections % self.workers)
        } else {
            mine
        };
        let total_senders = (units * unit).max(1);
        let rate = f64::from(self.rate) * mine as f64 / total_senders as f64;
        (mine, rate)
    }
}

/// Local addresses to bind connections to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceAddrs(pub Vec<IpAddr>);

fn parse_source_addrs(s: &str) -> Result<SourceAddrs, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 65_536 {
                    return Err(format!("bad range {part}"));
                }
                out.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            }
            None => out.push(part.trim().parse().map_err(|e| format!("{part}: {e}"))?),
        }
    }
    if out.is_empty() {
        return Err("no source address".into());
    }
    Ok(SourceAddrs(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["im-loadgen"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn source_ranges_expand() {
        let a = args(&["--source-addrs", "127.0.0.2-127.0.0.4,10.0.0.1"]);
        let ips: Vec<String> = a
            .source_addrs
            .unwrap()
            .0
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.1"]);
        assert!(parse_source_addrs("127.0.0.9-127.0.0.2").is_err());
    }

    #[test]
    fn shares_keep_pairs_and_groups_whole_and_add_up() {
        let a = args(&[
            "--scenario",
            "group",
            "--group-size",
            "10",
            "--connections",
            "95",
            "--workers",
            "3",
            "--rate",
            "900",
        ]);
        let shares: Vec<(usize, f64)> = (0..3).map(|w| a.share(w)).collect();
        assert!(shares.iter().all(|(n, _)| n % 10 == 0));
        assert_eq!(shares.iter().map(|s| s.0).sum::<usize>(), 90);
        let rate: f64 = shares.iter().map(|s| s.1).sum();
        assert!((rate - 900.0).abs() < 1e-6);

        let idle = args(&[
            "--scenario",
            "idle",
            "--connections",
            "10",
            "--workers",
            "3",
        ]);
        assert_eq!((0..3).map(|w| idle.share(w).0).sum::<usize>(), 10);
    }
}
