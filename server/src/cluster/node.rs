//! A node's identity and liveness: registration under a fresh incarnation,
//! the lease and its renewal, the view of live incarnations, and the sweep
//! of dead ones.
//!
//! The loop here runs every [`VIEW_EVERY`]: it renews the lease when a
//! third of it has passed, reads which incarnations are live, and for each
//! incarnation newly found dead tells local presence watchers who went
//! offline with it and (one node at a time, under a lock) removes its
//! routes. A node that could not renew for a whole lease, or finds its
//! lease gone, takes a new incarnation and republishes its routes; one
//! that finds its id held by a newer incarnation stops.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use im_storage::redis_target::{RedisConn, RedisTarget, Timeouts};
use im_storage::script::LuaScript;
use redis::AsyncCommands;

use super::{
    ClusterConfig, ClusterError, INDEX_BUCKETS, Keys, Local, Shared, Work, add, redis_err,
};
use crate::store::UserId;

/// How often the view of live nodes is refreshed.
pub(crate) const VIEW_EVERY: Duration = Duration::from_millis(500);
/// How long a sweep lock is held at most (another node retries after).
const SWEEP_LOCK_MS: u64 = 60_000;
/// Index buckets read per round trip of a sweep.
const SWEEP_CHUNK: u64 = 256;
/// How long after taking a new incarnation every local session is told to
/// sync: by then every other node's view has it, so whatever they pushed
/// meanwhile without knowing it (a broadcast, or a forward skipped by a
/// node that thought itself alone) is caught up.
const SETTLE: Duration = Duration::from_millis(1500);

/// Renews the lease if this incarnation still holds it.
/// Returns {"ok"}, {"lapsed"} (no lease) or {"taken", holder}.
const RENEW_SCRIPT: &str = r#"
local current = redis.call("GET", KEYS[1])
if current == ARGV[1] then
  redis.call("PEXPIRE", KEYS[1], ARGV[2])
  return {"ok"}
end
if not current then return {"lapsed"} end
return {"taken", current}
"#;

/// Deletes the lease if this incarnation holds it.
const RELEASE_SCRIPT: &str = r#"
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
"#;

/// Which incarnations are live, as last read.
#[derive(Debug, Clone)]
pub(crate) struct View {
    /// Live incarnation → node id.
    live: HashMap<u64, String>,
    /// Registered incarnations that are not live (not swept yet).
    dead: HashSet<u64>,
}

impl View {
    /// A view that knows only this node.
    pub(crate) fn only(incarnation: u64, node_id: &str) -> View {
        View {
            live: HashMap::from([(incarnation, node_id.to_string())]),
            dead: HashSet::new(),
        }
    }

    /// Whether the incarnation holds its node's lease.
    pub(crate) fn is_live(&self, incarnation: u64) -> bool {
        self.live.contains_key(&incarnation)
    }

    /// Whether the incarnation is known and dead.
    pub(crate) fn is_dead(&self, incarnation: u64) -> bool {
        self.dead.contains(&incarnation)
    }

    /// Live incarnations.
    pub(crate) fn live(&self) -> impl Iterator<Item = u64> + '_ {
        self.live.keys().copied()
    }

    pub(crate) fn live_count(&self) -> usize {
        self.live.len()
    }
}

/// How long a lease or view call may take before it fails (well within
/// the lease, so that a stalled Redis is noticed and retried in time).
pub(crate) const LEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a routing round trip may take: its pipelines are large, and
/// a failure costs a retry (or, repeated, a rejoin).
pub(crate) const ROUTING_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection of the node that reconnects by itself; a Redis that stops
/// answering fails its calls within `timeout` instead of stalling them.
pub(crate) async fn connect(
    target: &RedisTarget,
    timeout: Duration,
) -> Result<RedisConn, ClusterError> {
    target
        .connect(Timeouts::both(timeout))
        .await
        .map_err(redis_err)
}

fn lease_ms(config: &ClusterConfig) -> u64 {
    u64::try_from(config.lease.as_millis())
        .unwrap_or(u64::MAX)
        .max(1000)
}

/// Takes a fresh incarnation and the lease of the node id (a process still
/// running with an older incarnation of the id stops when it sees this).
pub(crate) async fn register(
    conn: &mut RedisConn,
    keys: &Keys,
    config: &ClusterConfig,
) -> Result<u64, ClusterError> {
    let incarnation: u64 = conn.incr(keys.incarnations(), 1).await.map_err(redis_err)?;
    let () = redis::pipe()
        .cmd("SET")
        .arg(keys.lease(&config.node_id))
        .arg(incarnation)
        .arg("PX")
        .arg(lease_ms(config))
        .ignore()
        .hset(keys.nodes(), incarnation, &config.node_id)
        .ignore()
        .query_async(conn)
        .await
        .map_err(redis_err)?;
    Ok(incarnation)
}

/// Gives up the lease (if still held), at shutdown. The routes are left
/// for the other nodes to sweep: they first tell their presence watchers
/// who went offline with this incarnation.
pub(crate) async fn release(shared: &Shared) {
    let mut conn = shared.lease_conn.clone();
    let script = LuaScript::new(RELEASE_SCRIPT);
    let mut call = script.call();
    call.key(shared.keys.lease(&shared.config.node_id))
        .arg(shared.incarnation());
    let released = call.run(&mut conn).await;
    if let Err(e) = released {
        tracing::warn!(error = %e, "giving up the lease failed; it will lapse");
    }
}

/// Runs the lease and the view until the node stops.
pub(crate) async fn run<L: Local>(shared: Arc<Shared>, local: Arc<L>) {
    let renew_every = shared.config.lease / 3;
    let mut last_renewed = Instant::now();
    let mut next_renewal = Instant::now() + renew_every;
    let mut conn = shared.lease_conn.clone();
    // Dead incarnations already handled, and when to try sweeping again.
    let mut handled: HashMap<u64, Instant> = HashMap::new();
    // Nodes that started just before this one learn of it within a view
    // refresh; what they broadcast meanwhile missed it.
    let mut settle_at = Some(Instant::now() + SETTLE);
    let mut ticker = tokio::time::interval(VIEW_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shared.stopped() => return,
        }
        if shared.fatal.borrow().is_some() {
            return;
        }
        if settle_at.is_some_and(|at| Instant::now() >= at) {
            settle_at = None;
            hint_all(&shared, &*local);
        }
        let c = &mut conn;
        let lapsed_here = last_renewed.elapsed() >= shared.config.lease
            || shared
                .rejoin
                .swap(false, std::sync::atomic::Ordering::AcqRel);
        if Instant::now() >= next_renewal || lapsed_here {
            match renew(c, &shared).await {
                Ok(Renewal::Held) if !lapsed_here => {
                    last_renewed = Instant::now();
                    next_renewal = last_renewed + renew_every;
                }
                Ok(Renewal::Held | Renewal::Lapsed) => {
                    // Others may have counted this incarnation dead and
                    // swept its routes: start over under a new one.
                    match reregister(&shared).await {
                        Ok(incarnation) => {
                            tracing::warn!(
                                incarnation,
                                "lease lapsed; rejoined under a new incarnation"
                            );
                            last_renewed = Instant::now();
                            next_renewal = last_renewed + renew_every;
                            settle_at = Some(Instant::now() + SETTLE);
                        }
                        Err(e) => tracing::warn!(error = %e, "rejoining the cluster failed"),
                    }
                }
                Ok(Renewal::Taken(newer)) => {
                    let error = ClusterError::Superseded {
                        node_id: shared.config.node_id.clone(),
                        mine: shared.incarnation(),
                        newer,
                    };
                    tracing::error!(%error, "stopping");
                    shared.fatal.send_replace(Some(error.to_string()));
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the lease failed");
                    continue;
                }
            }
        }
        match read_view(c, &shared).await {
            Ok(view) => {
                let newly_dead: Vec<u64> = view
                    .dead
                    .iter()
                    .copied()
                    .filter(|inc| handled.get(inc).is_none_or(|&at| Instant::now() >= at))
                    .collect();
                let first_seen: Vec<u64> = newly_dead
                    .iter()
                    .copied()
                    .filter(|inc| !handled.contains_key(inc))
                    .collect();
                handled.retain(|inc, _| view.dead.contains(inc));
                shared.set_view(view);
                if !first_seen.is_empty() {
                    if let Err(e) = gone_offline(c, &shared, &*local, &first_seen).await {
                        tracing::warn!(error = %e, "presence check after a node died failed");
                    }
                }
                for incarnation in newly_dead {
                    handled.insert(
                        incarnation,
                        Instant::now() + Duration::from_millis(SWEEP_LOCK_MS),
                    );
                    match try_sweep(c, &shared.keys, incarnation).await {
                        Ok(true) => {
                            add(&shared.counters.swept, 1);
                            tracing::info!(incarnation, "swept a dead node's routes");
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, incarnation, "sweep failed"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the cluster view failed"),
        }
    }
}

/// Asks the node to take a new incarnation: a route write failed and may
/// or may not have been applied.
pub(crate) fn lost_routes(shared: &Shared) {
    shared
        .rejoin
        .store(true, std::sync::atomic::Ordering::Release);
}

/// Tells every local session to sync, and counts it.
pub(crate) fn hint_all<L: Local>(shared: &Shared, local: &L) {
    add(&shared.counters.hints, 1);
    local.hint_all();
}

enum Renewal {
    Held,
    Lapsed,
    Taken(u64),
}

async fn renew(conn: &mut RedisConn, shared: &Shared) -> Result<Renewal, ClusterError> {
    let script = LuaScript::new(RENEW_SCRIPT);
    let mut call = script.call();
    call.key(shared.keys.lease(&shared.config.node_id))
        .arg(shared.incarnation())
        .arg(lease_ms(&shared.config));
    let reply: Vec<String> =
        redis::from_redis_value(&call.run(conn).await.map_err(redis_err)?).map_err(redis_err)?;
    match reply.first().map(String::as_str) {
        Some("ok") => Ok(Renewal::Held),
        Some("lapsed") => Ok(Renewal::Lapsed),
        Some("taken") => {
            let holder: u64 = reply.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            if holder > shared.incarnation() {
                Ok(Renewal::Taken(holder))
            } else {
                // An older incarnation cannot take a lease back; treat it
                // as lost and rejoin.
                Ok(Renewal::Lapsed)
            }
        }
        _ => Err(ClusterError::Redis(format!(
            "unexpected lease reply {reply:?}"
        ))),
    }
}

/// Takes a new incarnation and makes the node's tasks move to it.
async fn reregister(shared: &Shared) -> Result<u64, ClusterError> {
    let mut conn = shared.lease_conn.clone();
    let incarnation = register(&mut conn, &shared.keys, &shared.config).await?;
    add(&shared.counters.reregistered, 1);
    let mut view = (*shared.view()).clone();
    view.live.insert(incarnation, shared.config.node_id.clone());
    shared.set_view(view);
    shared.incarnation.send_replace(incarnation);
    let _ = shared.work.send(Work::Republish);
    Ok(incarnation)
}

pub(crate) async fn read_view(conn: &mut RedisConn, shared: &Shared) -> Result<View, ClusterError> {
    let nodes: HashMap<u64, String> = conn.hgetall(shared.keys.nodes()).await.map_err(redis_err)?;
    let ids: Vec<&String> = nodes.values().collect::<HashSet<_>>().into_iter().collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.get(shared.keys.lease(id));
    }
    let holders: Vec<Option<u64>> = if ids.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(conn).await.map_err(redis_err)?
    };
    let holder: HashMap<&str, u64> = ids
        .iter()
        .zip(holders)
        .filter_map(|(id, h)| h.map(|h| (id.as_str(), h)))
        .collect();
    let mut view = View {
        live: HashMap::new(),
        dead: HashSet::new(),
    };
    for (incarnation, id) in &nodes {
        if holder.get(id.as_str()) == Some(incarnation) {
            view.live.insert(*incarnation, id.clone());
        } else {
            view.dead.insert(*incarnation);
        }
    }
    // This node counts itself live while it believes it holds its lease.
    view.live
        .insert(shared.incarnation(), shared.config.node_id.clone());
    view.dead.remove(&shared.incarnation());
    Ok(view)
}

/// Watched users whose only devices were on the incarnations that just
/// died: their watchers here learn they are offline.
async fn gone_offline<L: Local>(
    conn: &mut RedisConn,
    shared: &Shared,
    local: &L,
    dead: &[u64],
) -> Result<(), ClusterError> {
    let watched = local.watched_users();
    if watched.is_empty() {
        return Ok(());
    }
    let view = shared.view();
    for chunk in watched.chunks(1024) {
        let mut pipe = redis::pipe();
        for &user in chunk {
            pipe.smembers(shared.keys.route(user));
        }
        let routes: Vec<Vec<u64>> = pipe.query_async(conn).await.map_err(redis_err)?;
        for (&user, incarnations) in chunk.iter().zip(routes) {
            let was_there = incarnations.iter().any(|i| dead.contains(i));
            let still = incarnations.iter().any(|&i| view.is_live(i));
            if was_there && !still && !local.is_local(user) {
                local.presence(user, false);
            }
        }
    }
    Ok(())
}

/// Sweeps a dead incarnation unless another node is at it: true if this
/// node did.
async fn try_sweep(
    conn: &mut RedisConn,
    keys: &Keys,
    incarnation: u64,
) -> Result<bool, ClusterError> {
    let locked: Option<String> = redis::cmd("SET")
        .arg(keys.sweep(incarnation))
        .arg(1)
        .arg("NX")
        .arg("PX")
        .arg(SWEEP_LOCK_MS)
        .query_async(conn)
        .await
        .map_err(redis_err)?;
    if locked.is_none() {
        return Ok(false);
    }
    sweep(conn, keys, incarnation).await?;
    Ok(true)
}

/// Removes an incarnation from every route it wrote, then forgets it.
async fn sweep(conn: &mut RedisConn, keys: &Keys, incarnation: u64) -> Result<(), ClusterError> {
    let mut start = 0;
    while start < INDEX_BUCKETS {
        let buckets: Vec<u64> = (start..(start + SWEEP_CHUNK).min(INDEX_BUCKETS)).collect();
        start += SWEEP_CHUNK;
        let mut pipe = redis::pipe();
        for &b in &buckets {
            pipe.smembers(keys.index(incarnation, b));
        }
        let users: Vec<Vec<UserId>> = pipe.query_async(conn).await.map_err(redis_err)?;
        let mut pipe = redis::pipe();
        let mut any = false;
        for (&b, users) in buckets.iter().zip(&users) {
            if users.is_empty() {
                continue;
            }
            any = true;
            for &user in users {
                pipe.srem(keys.route(user), incarnation).ignore();
            }
            pipe.del(keys.index(incarnation, b)).ignore();
        }
        if any {
            let () = pipe.query_async(conn).await.map_err(redis_err)?;
        }
    }
    let () = redis::pipe()
        .hdel(keys.nodes(), incarnation)
        .ignore()
        .del(keys.sweep(incarnation))
        .ignore()
        .query_async(conn)
        .await
        .map_err(redis_err)?;
    Ok(())
}
