//! Redis as one server or as a Redis Cluster, behind one connection type.
//!
//! Every process of a deployment reaches Redis through a [`RedisTarget`]:
//! `--redis-url` (one server) or `--redis-cluster-nodes` (seed nodes of a
//! Redis Cluster). Both give a [`RedisConn`], a `ConnectionLike`, so
//! commands, scripts and pipelines run unchanged on either. On a cluster:
//!
//! - a command goes to the master of its key's slot; redirections (MOVED,
//!   ASK) and a failover in progress (connection refused, CLUSTERDOWN,
//!   TRYAGAIN) are retried by the client for a few seconds at most, then
//!   fail like any other Redis error;
//! - a pipeline whose commands span slots is split into one pipeline per
//!   slot, sent concurrently, and its replies are put back in order. A
//!   keyless command (`WAIT`) goes with the keyed command before it, so
//!   `WAIT` after a script waits for that script's write. Transactions are
//!   sent whole: their keys must share a slot (every key of a stream shard
//!   carries the shard's hash tag; see [`layout`](crate::layout)).
//!
//! Scripts go through [`script`](crate::script), which follows `-ASK` and
//! `-TRYAGAIN` while a slot migrates, and loads a script on whichever node
//! runs it.
//!
//! [`key_slot`] is the cluster's slot function, and [`RedisTarget::master_of`]
//! finds the master serving a key, for connections that must sit on that
//! node (sharded Pub/Sub subscriptions).

use std::time::Duration;

use futures::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult,
    Value,
};

/// Slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// Where Redis is: one server, or the seed nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://host:port[/db]`.
    Single(String),
    /// `redis://host:port` of some nodes of a Redis Cluster (any subset:
    /// the rest is discovered).
    Cluster(Vec<String>),
}

/// Timeouts of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting (to each node).
    pub connect: Duration,
    /// A reply (a blocking read must allow for its block time).
    pub response: Duration,
}

impl Timeouts {
    /// The same limit for connecting and for replies.
    pub fn both(limit: Duration) -> Timeouts {
        Timeouts {
            connect: limit,
            response: limit,
        }
    }
}

impl RedisTarget {
    /// The target the flags name: `--redis-url` or `--redis-cluster-nodes`
    /// (a comma-separated list of `redis://host:port`), not both.
    pub fn from_flags(
        url: Option<&str>,
        cluster_nodes: Option<&str>,
    ) -> Result<Option<RedisTarget>, String> {
        match (url, cluster_nodes) {
            (Some(_), Some(_)) => {
                Err("--redis-url and --redis-cluster-nodes exclude each other".into())
            }
            (Some(url), None) => {
                check_url(url)?;
                Ok(Some(RedisTarget::Single(url.to_string())))
            }
            (None, Some(list)) => Ok(Some(RedisTarget::Cluster(parse_nodes(list)?))),
            (None, None) => Ok(None),
        }
    }

    /// A connection that reconnects by itself: on one server a
    /// [`ConnectionManager`], on a cluster the cluster client (which
    /// reconnects to each node and follows the topology). Calls fail
    /// within `timeouts.response` when Redis stops answering.
    ///
    /// The manager's default backoff waits 1 s, then 60 s between
    /// attempts, and every call waits for the reconnection in progress: a
    /// Redis restart of two seconds would stall its users for a minute.
    /// Here a reconnection gives up after three quick attempts half a
    /// second apart (the calls waiting on it fail and are retried by their
    /// callers) and the next call starts a new one.
    pub async fn connect(&self, timeouts: Timeouts) -> RedisResult<RedisConn> {
        match self {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(timeouts.connect)
                    .set_response_timeout(timeouts.response)
                    .set_factor(1)
                    .set_max_delay(500)
                    .set_number_of_retries(3);
                Ok(RedisConn::Managed(
                    client.get_connection_manager_with_config(config).await?,
                ))
            }
            RedisTarget::Cluster(nodes) => {
                let client = cluster_builder(nodes, timeouts).build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// A connection that stays broken once broken (its owner opens a new
    /// one): a [`MultiplexedConnection`] on one server, the cluster client
    /// on a cluster. For tasks that handle failures themselves.
    pub async fn connect_plain(&self, timeouts: Timeouts) -> RedisResult<RedisConn> {
        match self {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(timeouts.connect)
                    .set_response_timeout(timeouts.response);
                Ok(RedisConn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            RedisTarget::Cluster(_) => self.connect(timeouts).await,
        }
    }

    /// How to reach the master that serves `key` now: the server itself,
    /// or on a cluster the master its slot maps to (asked of the seed
    /// nodes in turn), with the seed URL's credentials.
    pub async fn master_of(&self, key: &[u8]) -> RedisResult<ConnectionInfo> {
        let nodes = match self {
            RedisTarget::Single(url) => return url.as_str().into_connection_info(),
            RedisTarget::Cluster(nodes) => nodes,
        };
        let slot = key_slot(key);
        let mut last = None;
        for node in nodes {
            let info = node.as_str().into_connection_info()?;
            match slot_master(&info, slot).await {
                Ok(found) => return Ok(found),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::ClientError, "no cluster nodes"))
        }))
    }
}

/// The replicas an append (and a worker's batch) must reach: as
/// configured, else 1 on a Redis Cluster (whose failovers are automatic,
/// so an ack must survive one) and 0 on one Redis.
pub fn replica_acks(configured: Option<u32>, on_cluster: bool) -> u32 {
    configured.unwrap_or(u32::from(on_cluster))
}

fn check_url(url: &str) -> Result<(), String> {
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| format!("bad Redis URL {url:?}: {e}"))
}

/// Splits `redis://a:1,redis://b:2` into URLs, checking each.
pub fn parse_nodes(list: &str) -> Result<Vec<String>, String> {
    let nodes: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if nodes.is_empty() {
        return Err("--redis-cluster-nodes lists no node".into());
    }
    for node in &nodes {
        check_url(node)?;
    }
    Ok(nodes)
}

fn cluster_builder(nodes: &[String], timeouts: Timeouts) -> redis::cluster::ClusterClientBuilder {
    // Retries cover a redirection at once and a failover within about
    // three seconds (jittered waits of 50 to 500 ms): a node that is gone
    // for longer fails the call, whose caller decides (a client's resend,
    // a worker's retry), rather than stalling it for minutes as the
    // library's defaults would.
    redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
        .connection_timeout(timeouts.connect)
        .response_timeout(timeouts.response)
        .retries(8)
        .min_retry_wait(50)
        .max_retry_wait(500)
        .retry_wait_formula(25, 2)
}

/// The master serving `slot`, as `info` (a cluster node) tells.
async fn slot_master(info: &ConnectionInfo, slot: u16) -> RedisResult<ConnectionInfo> {
    let client = redis::Client::open(info.clone())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(2));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await?;
    let seed_host = match &info.addr {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
        ConnectionAddr::Unix(_) => String::new(),
    };
    let (host, port) = find_slot(&slots, slot, &seed_host).ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::ClusterDown,
            "no master serves the slot",
            format!("slot {slot}"),
        ))
    })?;
    let mut found = info.clone();
    found.addr = match &info.addr {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    Ok(found)
}

/// The master's host and port for `slot` in a `CLUSTER SLOTS` reply (an
/// empty host means the node that answered).
fn find_slot(reply: &Value, slot: u16, answering_host: &str) -> Option<(String, u16)> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let int = |v: &Value| match v {
            Value::Int(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        let (Some(start), Some(end)) = (parts.first().and_then(int), parts.get(1).and_then(int))
        else {
            continue;
        };
        if !(start..=end).contains(&slot) {
            continue;
        }
        let Some(Value::Array(master)) = parts.get(2) else {
            return None;
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return None,
        };
        let port = master.get(1).and_then(int)?;
        let host = if host.is_empty() || host == "?" {
            answering_host.to_string()
        } else {
            host
        };
        return Some((host, port));
    }
    None
}

/// The cluster slot of a key: CRC16 (XMODEM) of its hash tag (the part
/// within the first `{...}`, if not empty) or of the whole key, modulo
/// [`SLOTS`].
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// The key a command is routed by, if it has one.
fn routing_key(cmd: &Cmd) -> Option<Vec<u8>> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(bytes) => Some(bytes),
        redis::Arg::Cursor => None,
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let _script = args.next()?;
            let keys: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
            if keys == 0 {
                return None;
            }
            args.next().map(<[u8]>::to_vec)
        }
        b"XREAD" | b"XREADGROUP" => {
            let mut args = args.skip_while(|a| !a.eq_ignore_ascii_case(b"STREAMS"));
            args.next()?;
            args.next().map(<[u8]>::to_vec)
        }
        b"WAIT" | b"WAITAOF" | b"PING" | b"INFO" | b"SCRIPT" | b"CLIENT" | b"CLUSTER" | b"TIME"
        | b"ECHO" | b"MULTI" | b"EXEC" | b"DISCARD" | b"READONLY" | b"READWRITE" | b"FUNCTION"
        | b"CONFIG" => None,
        _ => args.next().map(<[u8]>::to_vec),
    }
}

/// The commands of `pipeline` grouped by slot, in order within each group;
/// a keyless command joins the group of the command before it (the first
/// group if it comes first).
fn slot_groups(pipeline: &Pipeline) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<u16>, Vec<usize>)> = Vec::new();
    let mut current: Option<usize> = None;
    let mut leading = Vec::new();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        match routing_key(cmd).map(|k| key_slot(&k)) {
            Some(slot) => {
                let at = match groups.iter().position(|(s, _)| *s == Some(slot)) {
                    Some(at) => at,
                    None => {
                        groups.push((Some(slot), Vec::new()));
                        groups.len() - 1
                    }
                };
                groups[at].1.push(i);
                current = Some(at);
            }
            None => match current {
                Some(at) => groups[at].1.push(i),
                None => leading.push(i),
            },
        }
    }
    if groups.is_empty() {
        return vec![leading];
    }
    if !leading.is_empty() {
        let first = &mut groups[0].1;
        leading.append(first);
        *first = leading;
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// A Redis connection: to one server (self-reconnecting or plain), or to a
/// cluster. Cloning shares the connection.
#[derive(Clone)]
pub enum RedisConn {
    /// One server, reconnecting by itself.
    Managed(ConnectionManager),
    /// One server; broken for good once broken.
    Plain(MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

/// Runs a pipeline on a cluster: one sub-pipeline per slot, concurrently,
/// replies back in the pipeline's order.
async fn split_query(
    conn: &ClusterConnection,
    pipeline: &Pipeline,
    offset: usize,
    count: usize,
) -> RedisResult<Vec<Value>> {
    let groups = slot_groups(pipeline);
    if groups.len() <= 1 {
        return conn
            .clone()
            .req_packed_commands(pipeline, offset, count)
            .await;
    }
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let subs: Vec<Pipeline> = groups
        .iter()
        .map(|group| {
            let mut sub = redis::pipe();
            for &i in group {
                sub.add_command(commands[i].clone());
            }
            sub
        })
        .collect();
    let replies = join_all(subs.iter().map(|sub| {
        let mut conn = conn.clone();
        async move { conn.req_packed_commands(sub, 0, sub.len()).await }
    }))
    .await;
    let mut out: Vec<Option<Value>> = vec![None; commands.len()];
    for (group, reply) in groups.iter().zip(replies) {
        for (&i, value) in group.iter().zip(reply?) {
            out[i] = Some(value);
        }
    }
    out.into_iter()
        .skip(offset)
        .take(count)
        .map(|v| {
            v.ok_or_else(|| {
                redis::RedisError::from((
                    redis::ErrorKind::ResponseError,
                    "a slot's pipeline answered fewer replies",
                ))
            })
        })
        .collect()
}

impl RedisConn {
    /// Runs `pipeline` on the cluster node `node` (`host:port`, as an
    /// `-ASK` names it), in one piece; on one server, on that server.
    pub async fn query_on_node(
        &mut self,
        node: &str,
        pipeline: &Pipeline,
    ) -> RedisResult<Vec<Value>> {
        match self {
            RedisConn::Cluster(c) => {
                let (host, port) = node
                    .rsplit_once(':')
                    .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)))
                    .ok_or_else(|| {
                        redis::RedisError::from((
                            redis::ErrorKind::ClientError,
                            "bad node address",
                            node.to_string(),
                        ))
                    })?;
                c.route_pipeline(
                    pipeline,
                    0,
                    pipeline.len(),
                    redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port },
                )
                .await
            }
            _ => pipeline.query_async(self).await,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Managed(c) => c.req_packed_command(cmd),
            RedisConn::Plain(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Managed(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Plain(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => {
                if cmd.is_transaction() {
                    c.req_packed_commands(cmd, offset, count)
                } else {
                    Box::pin(split_query(c, cmd, offset, count))
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Managed(c) => c.get_db(),
            RedisConn::Plain(c) => c.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Values from the Redis Cluster specification's reference function.
        assert_eq!(key_slot(b"123456789"), 0x31c3 % SLOTS);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"im:{s3}:stream"), key_slot(b"s3"));
        assert_eq!(key_slot(b"im:{s3}:seq"), key_slot(b"im:{s3}:recent:42"));
        // An empty tag does not count; only the first tag does.
        assert_eq!(key_slot(b"a{}b"), key_slot(b"a{}b"));
        assert_ne!(key_slot(b"a{}b"), key_slot(b""));
        assert_eq!(key_slot(b"x{a}{b}"), key_slot(b"a"));
    }

    #[test]
    fn pipelines_split_by_slot_and_keyless_commands_follow_their_keyed_one() {
        let mut p = redis::pipe();
        p.cmd("PING")
            .cmd("EVALSHA")
            .arg("abc")
            .arg(1)
            .arg("im:{s1}:stream")
            .arg("x")
            .cmd("WAIT")
            .arg(1)
            .arg(100)
            .cmd("HGET")
            .arg("im:{s2}:seq")
            .arg("f")
            .cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("STREAMS")
            .arg("im:{s1}:stream")
            .arg(">")
            .cmd("EVAL")
            .arg("return 1")
            .arg(0);
        assert_eq!(slot_groups(&p), vec![vec![0, 1, 2, 4, 5], vec![3]]);
        let mut keyless = redis::pipe();
        keyless.cmd("PING").cmd("PING");
        assert_eq!(slot_groups(&keyless), vec![vec![0, 1]]);
    }

    #[test]
    fn flags_name_one_target() {
        assert_eq!(
            RedisTarget::from_flags(Some("redis://127.0.0.1:1"), None),
            Ok(Some(RedisTarget::Single("redis://127.0.0.1:1".into())))
        );
        assert_eq!(
            RedisTarget::from_flags(None, Some("redis://a:1, redis://b:2")),
            Ok(Some(RedisTarget::Cluster(vec![
                "redis://a:1".into(),
                "redis://b:2".into()
            ])))
        );
        assert!(RedisTarget::from_flags(Some("redis://a:1"), Some("redis://b:2")).is_err());
        assert!(RedisTarget::from_flags(None, Some(" , ")).is_err());
        assert!(RedisTarget::from_flags(None, Some("nonsense://x")).is_err());
        assert_eq!(RedisTarget::from_flags(None, None), Ok(None));
    }

    #[test]
    fn cluster_slots_replies_give_the_master() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                Value::Array(vec![
                    Value::BulkString(b"10.0.0.1".to_vec()),
                    Value::Int(7000),
                ]),
                Value::Array(vec![
                    Value::BulkString(b"10.0.0.4".to_vec()),
                    Value::Int(7003),
                ]),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                Value::Array(vec![Value::BulkString(b"".to_vec()), Value::Int(7001)]),
            ]),
        ]);
        assert_eq!(
            find_slot(&reply, 10, "seed"),
            Some(("10.0.0.1".into(), 7000))
        );
        assert_eq!(find_slot(&reply, 9000, "seed"), Some(("seed".into(), 7001)));
        assert_eq!(find_slot(&Value::Array(vec![]), 1, "seed"), None);
    }
}
