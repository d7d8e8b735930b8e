//! The node's subscription: envelopes from other nodes arrive on the
//! sharded Pub/Sub channel of this node's incarnation (`SSUBSCRIBE`, on a
//! RESP3 connection of its own) and are applied in arrival order.
//!
//! Pub/Sub delivers at most once. Whenever something may have been lost
//! (the connection dropped, Redis closed it for its output buffer limit,
//! arrivals outran this node and were dropped, or the node moved to a new
//! incarnation) every local session gets a `SyncHint` once the
//! subscription is back, and syncs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use im_proto::cluster_pb::Envelope;
use prost::Message;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::{Local, Shared, add, node, redis_err};

/// Envelopes received and not yet applied at most; past that they are
/// dropped, and the node subscribes again and tells its sessions to sync.
const QUEUE: usize = 4096;
/// Wait between attempts to subscribe again.
const RETRY: Duration = Duration::from_millis(200);

/// What the connection's push sender hands over.
enum Arrival {
    Envelope(bytes::Bytes),
    /// The connection is gone.
    Dropped,
}

/// Runs the subscription until the node stops.
/// `ready` is answered once the first subscription is up.
pub(crate) async fn run<L: Local>(
    shared: Arc<Shared>,
    local: Arc<L>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut incarnation = shared.incarnation.subscribe();
    let mut first = true;
    let mut ready = Some(ready);
    loop {
        if shared.fatal.borrow().is_some() {
            return;
        }
        let current = *incarnation.borrow_and_update();
        let overflow = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<Arrival>(QUEUE);
        let subscribed = subscribe(&shared, current, tx, overflow.clone()).await;
        let _conn = match subscribed {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "subscribing to the node channel failed");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = shared.stopped() => return,
                }
            }
        };
        if !first {
            // Whatever was published while unsubscribed is gone.
            node::hint_all(&shared, &*local);
        }
        first = false;
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        loop {
            tokio::select! {
                arrival = rx.recv() => match arrival {
                    Some(Arrival::Envelope(payload)) => {
                        apply(&shared, &*local, payload).await;
                        if overflow.load(Ordering::Acquire) {
                            // Arrivals were dropped (perhaps the notice of
                            // a lost connection too): start over on a
                            // fresh subscription, which hints the sessions.
                            add(&shared.counters.lost, 1);
                            tracing::warn!("node subscription fell behind; subscribing again");
                            break;
                        }
                    }
                    Some(Arrival::Dropped) | None => {
                        tracing::warn!("node subscription lost; subscribing again");
                        break;
                    }
                },
                changed = incarnation.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = shared.stopped() => return,
            }
        }
    }
}

/// Opens a RESP3 connection subscribed to the incarnation's channel; its
/// pushes go to `tx` (dropped when full, which `overflow` records).
async fn subscribe(
    shared: &Shared,
    incarnation: u64,
    tx: mpsc::Sender<Arrival>,
    overflow: Arc<AtomicBool>,
) -> Result<redis::aio::MultiplexedConnection, super::ClusterError> {
    // A sharded channel is served by the master of its slot: on a Redis
    // Cluster the subscription sits on that node, and a failover or a
    // moved slot ends it (a disconnection or an SUNSUBSCRIBE), after
    // which it is opened again wherever the slot is then.
    let channel = shared.keys.channel(incarnation);
    let mut info = shared
        .config
        .redis
        .master_of(channel.as_bytes())
        .await
        .map_err(redis_err)?;
    info.redis.protocol = redis::ProtocolVersion::RESP3;
    let client = redis::Client::open(info).map_err(redis_err)?;
    let sender = move |push: PushInfo| -> Result<(), ()> {
        let arrival = match push.kind {
            PushKind::SMessage | PushKind::Message => match push.data.into_iter().nth(1) {
                Some(Value::BulkString(bytes)) => Arrival::Envelope(bytes.into()),
                _ => return Ok(()),
            },
            PushKind::Disconnection | PushKind::SUnsubscribe => Arrival::Dropped,
            _ => return Ok(()),
        };
        match tx.try_send(arrival) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                overflow.store(true, Ordering::Release);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    };
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(2))
        .set_push_sender(sender);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(redis_err)?;
    // Named, so operators (and tests) can tell it in CLIENT LIST.
    let () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(format!("{}-node-{incarnation}", shared.keys.prefix))
        .exec_async(&mut conn)
        .await
        .map_err(redis_err)?;
    let () = redis::cmd("SSUBSCRIBE")
        .arg(&channel)
        .exec_async(&mut conn)
        .await
        .map_err(redis_err)?;
    Ok(conn)
}

/// Applies one envelope: session ends and invalidations first (so pushes
/// after them use fresh member lists), then pushes in order, then
/// presence.
async fn apply<L: Local>(shared: &Shared, local: &L, payload: bytes::Bytes) {
    let envelope = match Envelope::decode(payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable envelope from another node");
            add(&shared.counters.lost, 1);
            return;
        }
    };
    add(&shared.counters.envelopes_in, 1);
    if !envelope.revoked_sessions.is_empty() {
        local.ended_elsewhere(envelope.revoked_sessions);
    }
    for group in envelope.invalidate_groups {
        local.invalidate_group(group).await;
    }
    add(&shared.counters.pushes_in, envelope.pushes.len() as u64);
    for push in envelope.pushes {
        local.deliver(push).await;
    }
    for change in envelope.presence {
        local.presence(change.user_id, change.online);
    }
}
