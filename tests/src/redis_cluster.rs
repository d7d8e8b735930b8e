//! A throwaway Redis Cluster for the tests: six `redis-server` processes
//! on free ports (three masters with a replica each, made one cluster by
//! `redis-cli --cluster create`), `cluster-node-timeout 1000` so that a
//! failover takes seconds, AOF `everysec`.
//!
//! [`shared_cluster_nodes`] gives every test of a binary the same cluster
//! (`REDIS_CLUSTER_NODES` when set, else one started on first use and
//! stopped by a watchdog when the test process exits); crash tests start a
//! [`RedisCluster`] of their own so they can kill its masters.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::free_port;

/// Nodes of a test cluster.
pub const NODES: usize = 6;

struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running Redis Cluster of [`NODES`] processes.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: Option<tempfile::TempDir>,
}

fn node_command(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
        .args(["--cluster-config-file", "nodes.conf"])
        // The survivors keep serving their slots while one master is gone.
        .args(["--cluster-require-full-coverage", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--daemonize", "no", "--logfile", "redis.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A free port whose cluster bus port (10000 higher, so at most 65535) is
/// free too.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// `redis-cli -p PORT ARGS...`'s output, if it ran.
fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RedisCluster {
    /// Starts the processes in a temp directory and forms the cluster.
    pub fn start() -> RedisCluster {
        let dir = tempfile::Builder::new()
            .prefix("im-test-redis-cluster-")
            .tempdir()
            .expect("temp dir");
        let mut cluster = RedisCluster::start_in(dir.path());
        cluster._dir = Some(dir);
        cluster
    }

    fn start_in(base: &Path) -> RedisCluster {
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let dir = base.join(format!("node{i}"));
            std::fs::create_dir_all(&dir).expect("node dir");
            let mut node = Node {
                port: cluster_port(),
                dir,
                child: None,
            };
            node.spawn();
            nodes.push(node);
        }
        let cluster = RedisCluster { nodes, _dir: None };
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    /// `redis://127.0.0.1:PORT,...` of every node.
    pub fn nodes_csv(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of the nodes running now.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// The port of the master serving `key` now, as a live node tells.
    pub fn master_of(&self, key: &[u8]) -> u16 {
        self.try_master_of(key)
            .expect("no live node knows a master serving the key")
    }

    /// The same, `None` while no live master serves it (a failover in
    /// progress).
    pub fn try_master_of(&self, key: &[u8]) -> Option<u16> {
        let slot = im_storage::redis_target::key_slot(key);
        let live = self.live_ports();
        live.iter()
            .find_map(|&port| slot_owner(port, slot).filter(|owner| live.contains(owner)))
    }

    /// The port of a live replica of the master on `master`, if any.
    pub fn replica_of(&self, master: u16) -> Option<u16> {
        let nodes = cluster_nodes(master)?;
        let id = &nodes.iter().find(|n| n.myself)?.id;
        let live = self.live_ports();
        nodes
            .iter()
            .find(|n| n.master_id.as_ref() == Some(id) && live.contains(&n.port))
            .map(|n| n.port)
    }

    /// Ports of the live masters.
    pub fn masters(&self) -> Vec<u16> {
        let live = self.live_ports();
        live.iter()
            .find_map(|&port| cluster_nodes(port))
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.healthy_master && live.contains(&n.port))
            .map(|n| n.port)
            .collect()
    }

    /// A move of `slot` from the master serving it now to the master on
    /// `to`, ready to run.
    pub fn slot_move(&self, slot: u16, to: u16) -> SlotMove {
        let live = self.live_ports();
        let nodes = live
            .iter()
            .find_map(|&port| cluster_nodes(port))
            .expect("a live node answers CLUSTER NODES");
        let from = nodes
            .iter()
            .find(|n| n.healthy_master && n.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
            .expect("a master serves the slot");
        let id_of = |port: u16| {
            let node = nodes.iter().find(|n| n.port == port);
            node.expect("a node of this cluster").id.clone()
        };
        SlotMove {
            slot,
            from: (from.port, from.id.clone()),
            to: (to, id_of(to)),
            masters: nodes
                .iter()
                .filter(|n| n.healthy_master && live.contains(&n.port))
                .map(|n| n.port)
                .collect(),
        }
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to a node's process.
    pub fn signal(&self, port: u16, signal: &str) {
        let node = self.nodes.iter().find(|n| n.port == port);
        let node = node.expect("a node of this cluster");
        if let Some(child) = &node.child {
            super::signal_child(child, signal);
        }
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        let node = self.nodes.iter_mut().find(|n| n.port == port);
        node.expect("a node of this cluster")
    }

    /// Kills a node at once (SIGKILL), like a crash.
    pub fn kill(&mut self, port: u16) {
        let node = self.node_mut(port);
        node.kill();
    }

    /// Starts a killed node again (it rejoins, as a replica if its slots
    /// moved meanwhile).
    pub fn restart(&mut self, port: u16) {
        let node = self.node_mut(port);
        node.kill();
        node.spawn();
    }

    /// Waits until every live node reports `cluster_state:ok` and agrees
    /// that every slot has a live master, and every live replica is in
    /// sync with its master.
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let live = self.live_ports();
        loop {
            let ok = live.iter().all(|&port| {
                cli(port, &["CLUSTER", "INFO"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
                    && slots_covered(port, &live)
                    && replica_synced(port)
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster is not healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A slot's move from one master to another, as `redis-cli --cluster
/// reshard` makes it (`CLUSTER SETSLOT IMPORTING` on the target,
/// `MIGRATING` on the source, `MIGRATE` of the slot's keys in batches,
/// `SETSLOT NODE` everywhere), but as slowly as a test wants: a few keys
/// per batch and a pause between batches, so that traffic meets the slot
/// half moved.
#[derive(Debug, Clone)]
pub struct SlotMove {
    slot: u16,
    /// Port and node id.
    from: (u16, String),
    to: (u16, String),
    masters: Vec<u16>,
}

impl SlotMove {
    /// Moves the slot (blocking), `batch` keys per `MIGRATE` and `pause`
    /// after each, the keys in the order of `rank` (lowest first; the order
    /// `redis-cli` takes is the node's, any order can happen); returns how
    /// many keys moved.
    pub fn run(&self, batch: usize, pause: Duration, rank: impl Fn(&str) -> u32) -> usize {
        let slot = self.slot.to_string();
        let (from, from_id) = (self.from.0, self.from.1.as_str());
        let (to, to_id) = (self.to.0, self.to.1.as_str());
        let ok = |port: u16, args: &[&str]| {
            let out = cli(port, args).unwrap_or_default();
            assert!(out.trim() == "OK", "{args:?} on {port}: {out}");
        };
        ok(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", from_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", to_id]);
        let to_port = to.to_string();
        let mut moved = 0;
        // Keys created on the source meanwhile (none should be: a missing
        // key is the target's now) are moved by the next pass.
        loop {
            let keys =
                cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100000"]).unwrap_or_default();
            let mut keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            keys.sort_by_key(|k| rank(k));
            for part in keys.chunks(batch.max(1)) {
                let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
                args.extend(part);
                let out = cli(from, &args).unwrap_or_default();
                assert!(
                    matches!(out.trim(), "OK" | "NOKEY"),
                    "MIGRATE {part:?}: {out}"
                );
                moved += part.len();
                std::thread::sleep(pause);
            }
        }
        // The target first, as redis-cli does: it owns the slot before the
        // source stops redirecting to it.
        ok(to, &["CLUSTER", "SETSLOT", &slot, "NODE", to_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot, "NODE", to_id]);
        for &port in &self.masters {
            if port != from && port != to {
                ok(port, &["CLUSTER", "SETSLOT", &slot, "NODE", to_id]);
            }
        }
        moved
    }
}

/// Whether the node on `port` is a master, or a replica whose link to its
/// master is up (its first full sync done).
fn replica_synced(port: u16) -> bool {
    cli(port, &["INFO", "replication"])
        .is_some_and(|info| info.contains("role:master") || info.contains("master_link_status:up"))
}

/// One line of `CLUSTER NODES`.
struct NodeLine {
    id: String,
    port: u16,
    myself: bool,
    /// A master that no node counts as failing.
    healthy_master: bool,
    /// Whose replica it is, for a replica.
    master_id: Option<String>,
    /// Slot ranges it serves (inclusive).
    slots: Vec<(u16, u16)>,
}

/// The cluster as the node on `port` sees it.
fn cluster_nodes(port: u16) -> Option<Vec<NodeLine>> {
    let text = cli(port, &["CLUSTER", "NODES"])?;
    Some(
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = *fields.get(2)?;
                let port = fields
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let slots = fields
                    .iter()
                    .skip(8)
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|range| {
                        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                        Some((lo.parse().ok()?, hi.parse().ok()?))
                    })
                    .collect();
                Some(NodeLine {
                    id: fields[0].to_string(),
                    port,
                    myself: flags.contains("myself"),
                    healthy_master: flags.contains("master") && !flags.contains("fail"),
                    master_id: fields.get(3).filter(|m| **m != "-").map(|m| m.to_string()),
                    slots,
                })
            })
            .collect(),
    )
}

/// Whether the node on `port` maps all 16384 slots to masters in `live`.
fn slots_covered(port: u16, live: &[u16]) -> bool {
    let Some(nodes) = cluster_nodes(port) else {
        return false;
    };
    let covered: u32 = nodes
        .iter()
        .filter(|n| n.healthy_master && live.contains(&n.port))
        .flat_map(|n| &n.slots)
        .map(|&(lo, hi)| u32::from(hi) - u32::from(lo) + 1)
        .sum();
    covered == u32::from(im_storage::redis_target::SLOTS)
}

/// The port of the master serving `slot`, as the node on `port` says.
fn slot_owner(port: u16, slot: u16) -> Option<u16> {
    cluster_nodes(port)?
        .into_iter()
        .find(|n| n.healthy_master && n.slots.iter().any(|&(lo, hi)| (lo..=hi).contains(&slot)))
        .map(|n| n.port)
}

impl Node {
    fn spawn(&mut self) {
        let child = node_command(&self.dir, self.port)
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while cli(self.port, &["PING"]).is_none_or(|r| !r.contains("PONG")) {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

/// The seed nodes of the cluster shared by the tests of this process:
/// `REDIS_CLUSTER_NODES` if set, else a cluster started on first use (and
/// stopped when the process exits).
pub fn shared_cluster_nodes() -> &'static str {
    static NODES_CSV: OnceLock<String> = OnceLock::new();
    NODES_CSV.get_or_init(|| {
        if let Ok(nodes) = std::env::var("REDIS_CLUSTER_NODES") {
            return nodes;
        }
        let dir = tempfile::Builder::new()
            .prefix("im-test-redis-cluster-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let mut cluster = RedisCluster::start_in(&dir);
        let csv = cluster.nodes_csv();
        for node in &mut cluster.nodes {
            if let Some(child) = node.child.take() {
                super::services::keep_until_exit(child, &dir);
            }
        }
        csv
    })
}
