//! Route writes and cross-node pushes, in batches.
//!
//! The router takes whatever work has queued up (up to [`BATCH`] items)
//! and handles it in two pipelined round trips: the first writes the
//! batch's route changes and reads the routes of every user it pushes to,
//! the second publishes one envelope per destination incarnation (split
//! past [`MAX_ENVELOPE`]). Work is handled in the order it was queued and
//! published on one connection, so a node receives another node's pushes
//! in the order they were made.
//!
//! A route change also decides presence: a user whose first device came
//! here while no other live incarnation held one came online, a user
//! whose last device here went while none other holds one went offline.
//! The change goes to local watchers and to every other node.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use im_proto::cluster_pb::{Envelope, PresenceChange, Push};
use im_storage::redis_target::RedisConn;
use prost::Message;
use tokio::sync::mpsc;

use super::{ClusterError, INDEX_BUCKETS, Local, Shared, Work, add, node, redis_err};
use crate::store::UserId;

/// Work items handled in one batch at most.
const BATCH: usize = 1024;
/// Bytes of one published envelope at most (more go in another).
const MAX_ENVELOPE: usize = 256 * 1024;
/// Route writes per pipeline when republishing every local user.
const REPUBLISH_CHUNK: usize = 4096;

/// Adds or removes one incarnation in a user's route set and returns the
/// set as it is then.
/// KEYS[1] the route set; ARGV[1] "+" or "-"; ARGV[2] the incarnation.
const ROUTE_SCRIPT: &str = r#"
if ARGV[1] == "+" then
  redis.call("SADD", KEYS[1], ARGV[2])
else
  redis.call("SREM", KEYS[1], ARGV[2])
end
return redis.call("SMEMBERS", KEYS[1])
"#;

/// Envelopes being filled for each destination incarnation.
#[derive(Default)]
struct Outgoing {
    envelopes: BTreeMap<u64, Envelope>,
}

impl Outgoing {
    fn to(&mut self, incarnation: u64, from: u64) -> &mut Envelope {
        self.envelopes
            .entry(incarnation)
            .or_insert_with(|| Envelope {
                from,
                ..Envelope::default()
            })
    }
}

/// Runs the router until the node's work queue closes.
pub(crate) async fn run<L: Local>(
    shared: Arc<Shared>,
    local: Arc<L>,
    mut work: mpsc::UnboundedReceiver<Work>,
) {
    let mut conn = shared.conn.clone();
    let script = redis::Script::new(ROUTE_SCRIPT);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = work.recv_many(&mut batch, BATCH) => if n == 0 {
                return;
            },
            _ = shared.stopped() => return,
        }
        if batch.iter().any(|w| matches!(w, Work::Republish)) {
            batch.retain(|w| !matches!(w, Work::Republish));
            republish(&shared, &mut conn, &script, &*local).await;
        }
        if let Err(e) = handle(&shared, &mut conn, &script, &*local, &mut batch).await {
            tracing::warn!(error = %e, "cluster routing round failed");
        }
        batch.clear();
    }
}

/// Invokes the route script in a pipeline.
fn route_op(
    pipe: &mut redis::Pipeline,
    shared: &Shared,
    script: &redis::Script,
    incarnation: u64,
    user: UserId,
    online: bool,
) {
    pipe.invoke_script(
        script
            .key(shared.keys.route(user))
            .arg(if online { "+" } else { "-" })
            .arg(incarnation),
    );
    let index = shared.keys.index(incarnation, user % INDEX_BUCKETS);
    if online {
        pipe.sadd(index, user).ignore();
    } else {
        pipe.srem(index, user).ignore();
    }
}

/// Runs a pipeline that may invoke the route script, loading the script
/// first if Redis does not know it (it restarted, say).
async fn query<T: redis::FromRedisValue>(
    conn: &mut RedisConn,
    script: &redis::Script,
    pipe: &redis::Pipeline,
) -> Result<T, ClusterError> {
    match pipe.query_async(conn).await {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
            script
                .prepare_invoke()
                .load_async(conn)
                .await
                .map_err(redis_err)?;
            pipe.query_async(conn).await.map_err(redis_err)
        }
        Err(e) => Err(redis_err(e)),
    }
}

/// [`query`], tried again after a failure (a timeout under load, a
/// reconnection) for up to half a lease, with growing pauses. The route
/// script sets a state (this incarnation in or out of the user's set), so
/// running a round again is harmless, and it keeps a passing stall from
/// costing a rejoin, which rewrites every route and makes every session
/// sync. Past half a lease the lease itself may be in doubt: give up.
async fn query_retrying<T: redis::FromRedisValue>(
    shared: &Shared,
    conn: &mut RedisConn,
    script: &redis::Script,
    pipe: &redis::Pipeline,
) -> Result<T, ClusterError> {
    let give_up = std::time::Instant::now() + shared.config.lease / 2;
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match query(conn, script, pipe).await {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() + pause < give_up => {
                tracing::debug!(error = %e, "cluster routing round failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.stopped() => return Err(e),
                }
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes the route of every local user under the current incarnation
/// (after the node took a new one).
async fn republish<L: Local>(
    shared: &Shared,
    conn: &mut RedisConn,
    script: &redis::Script,
    local: &L,
) {
    let incarnation = shared.incarnation();
    let users = local.local_users();
    for chunk in users.chunks(REPUBLISH_CHUNK) {
        let mut pipe = redis::pipe();
        for &user in chunk {
            route_op(&mut pipe, shared, script, incarnation, user, true);
            // The sets themselves are not needed.
        }
        let result: Result<Vec<redis::Value>, _> =
            query_retrying(shared, conn, script, &pipe).await;
        if let Err(e) = result {
            // Start over under yet another incarnation, later.
            tracing::warn!(error = %e, "republishing routes failed");
            node::lost_routes(shared);
            return;
        }
        add(&shared.counters.route_writes, chunk.len() as u64);
    }
    tracing::info!(users = users.len(), incarnation, "routes republished");
}

async fn handle<L: Local>(
    shared: &Shared,
    conn: &mut RedisConn,
    script: &redis::Script,
    local: &L,
    batch: &mut Vec<Work>,
) -> Result<(), ClusterError> {
    let me = shared.incarnation();
    // Round trip 1: route writes, then the routes of every push target.
    let mut pipe = redis::pipe();
    let mut route_ops = Vec::new();
    let mut targets: Vec<UserId> = Vec::new();
    for item in batch.iter() {
        match item {
            Work::Route { user, online, .. } => {
                route_op(&mut pipe, shared, script, me, *user, *online);
                route_ops.push((*user, *online));
            }
            Work::Forward { users, .. } => targets.extend_from_slice(users),
            _ => {}
        }
    }
    targets.sort_unstable();
    targets.dedup();
    for &user in &targets {
        pipe.smembers(shared.keys.route(user));
    }
    let mut routes: HashMap<UserId, Vec<u64>> = HashMap::with_capacity(targets.len());
    let mut changes = Vec::new();
    if !route_ops.is_empty() || !targets.is_empty() {
        let mut replies: Vec<Vec<u64>> = match query_retrying(shared, conn, script, &pipe).await {
            Ok(r) => r,
            Err(e) => {
                if !route_ops.is_empty() {
                    // A route write may be lost: start over under a new
                    // incarnation, which writes every route again.
                    node::lost_routes(shared);
                }
                return Err(e);
            }
        };
        add(&shared.counters.route_writes, route_ops.len() as u64);
        let tail = replies.split_off(route_ops.len());
        let named: Vec<u64> = replies.iter().chain(&tail).flatten().copied().collect();
        let view = shared.view_knowing(&named).await;
        for ((user, online), members) in route_ops.iter().zip(&replies) {
            let elsewhere = members.iter().any(|&i| i != me && view.is_live(i));
            if !elsewhere {
                changes.push(PresenceChange {
                    user_id: *user,
                    online: *online,
                });
            }
        }
        for (user, incarnations) in targets.iter().zip(tail) {
            let live: Vec<u64> = incarnations
                .into_iter()
                .filter(|&i| i != me && view.is_live(i))
                .collect();
            if !live.is_empty() {
                routes.insert(*user, live);
            }
        }
    }

    // Envelopes, in the order the work came.
    let view = shared.view();
    let others: Vec<u64> = view.live().filter(|&i| i != me).collect();
    let mut out = Outgoing::default();
    let mut waiting = Vec::new();
    let mut forwarded = 0u64;
    for item in batch.drain(..) {
        match item {
            Work::Route { done, .. } => {
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Work::Republish => {}
            Work::Forward {
                frame,
                conversation,
                users,
                _room,
            } => {
                let mut by_node: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
                for user in users {
                    for &inc in routes.get(&user).map(Vec::as_slice).unwrap_or(&[]) {
                        by_node.entry(inc).or_default().push(user);
                    }
                }
                for (inc, users) in by_node {
                    forwarded += 1;
                    out.to(inc, me).pushes.push(Push {
                        frame: frame.clone(),
                        conversation_id: conversation,
                        users,
                        group_id: 0,
                    });
                }
            }
            Work::Broadcast {
                frame,
                conversation,
                group,
                _room,
            } => {
                for &inc in &others {
                    forwarded += 1;
                    out.to(inc, me).pushes.push(Push {
                        frame: frame.clone(),
                        conversation_id: conversation,
                        users: Vec::new(),
                        group_id: group,
                    });
                }
            }
            Work::Invalidate { groups, done } => {
                for &inc in &others {
                    out.to(inc, me).invalidate_groups.extend_from_slice(&groups);
                }
                waiting.push(done);
            }
            Work::EndSessions { sessions, done } => {
                for &inc in &others {
                    out.to(inc, me)
                        .revoked_sessions
                        .extend_from_slice(&sessions);
                }
                waiting.push(done);
            }
        }
    }
    if !changes.is_empty() {
        for change in &changes {
            local.presence(change.user_id, change.online);
        }
        for &inc in &others {
            out.to(inc, me).presence.extend_from_slice(&changes);
        }
    }
    add(&shared.counters.forwarded, forwarded);

    // Round trip 2: the envelopes.
    publish(shared, conn, out).await;
    for done in waiting {
        let _ = done.send(());
    }
    Ok(())
}

/// Publishes the envelopes (retrying once on a failed round trip: a
/// repeated push is harmless, clients show each seq once).
async fn publish(shared: &Shared, conn: &mut RedisConn, out: Outgoing) {
    if out.envelopes.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    let mut count = 0u64;
    for (inc, envelope) in out.envelopes {
        for part in split(envelope) {
            pipe.cmd("SPUBLISH")
                .arg(shared.keys.channel(inc))
                .arg(part.encode_to_vec());
            count += 1;
        }
    }
    for attempt in 0..2 {
        match pipe.query_async::<Vec<i64>>(conn).await {
            Ok(receivers) => {
                add(&shared.counters.envelopes_out, count);
                // Nobody subscribed: that node is between subscriptions
                // (and tells its sessions to sync when it is back) or dead.
                let unheard = receivers.iter().filter(|&&n| n == 0).count();
                add(&shared.counters.lost, unheard as u64);
                return;
            }
            Err(e) if attempt == 0 => {
                tracing::debug!(error = %e, "publishing envelopes failed; retrying");
            }
            Err(e) => {
                tracing::warn!(error = %e, envelopes = count, "publishing envelopes failed");
                add(&shared.counters.lost, count);
            }
        }
    }
}

/// Splits an envelope whose encoding would pass [`MAX_ENVELOPE`].
fn split(envelope: Envelope) -> Vec<Envelope> {
    if envelope.encoded_len() <= MAX_ENVELOPE {
        return vec![envelope];
    }
    let Envelope {
        from,
        pushes,
        presence,
        invalidate_groups,
        revoked_sessions,
    } = envelope;
    let mut parts = vec![Envelope {
        from,
        invalidate_groups,
        revoked_sessions,
        ..Envelope::default()
    }];
    for push in pushes {
        let last = parts.last_mut().expect("one part at least");
        if last.encoded_len() + push.encoded_len() + 8 > MAX_ENVELOPE && !last.pushes.is_empty() {
            parts.push(Envelope {
                from,
                ..Envelope::default()
            });
        }
        parts.last_mut().expect("one part").pushes.push(push);
    }
    for chunk in presence.chunks(8192) {
        parts.push(Envelope {
            from,
            presence: chunk.to_vec(),
            ..Envelope::default()
        });
    }
    parts
}

/// For each user, whether a live incarnation holds one of their devices.
pub(crate) async fn online(shared: &Shared, users: &[UserId]) -> Result<Vec<bool>, ClusterError> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for &user in users {
        pipe.smembers(shared.keys.route(user));
    }
    let mut conn = shared.conn.clone();
    let routes: Vec<Vec<u64>> = pipe.query_async(&mut conn).await.map_err(redis_err)?;
    let named: Vec<u64> = routes.iter().flatten().copied().collect();
    let view = shared.view_knowing(&named).await;
    Ok(routes
        .iter()
        .map(|incs| incs.iter().any(|&i| view.is_live(i)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_envelopes_are_split_in_order() {
        let pushes: Vec<Push> = (0..100u64)
            .map(|i| Push {
                frame: bytes::Bytes::from(vec![0u8; 10_000]),
                conversation_id: i,
                users: vec![i],
                group_id: 0,
            })
            .collect();
        let parts = split(Envelope {
            from: 7,
            pushes,
            presence: Vec::new(),
            invalidate_groups: vec![3],
            revoked_sessions: vec![5, 6],
        });
        assert!(parts.len() >= 4);
        assert!(parts.iter().all(|p| p.encoded_len() <= MAX_ENVELOPE));
        assert_eq!(
            parts[0].invalidate_groups,
            vec![3],
            "invalidations go first"
        );
        assert_eq!(parts[0].revoked_sessions, vec![5, 6], "and session ends");
        let order: Vec<u64> = parts
            .iter()
            .flat_map(|p| p.pushes.iter().map(|x| x.conversation_id))
            .collect();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
    }
}
