//! Many server nodes as one service, on Redis alone: no consensus and no
//! node-to-node connections of our own. Redis may be one server or a Redis
//! Cluster (`im_storage::redis_target`): every key below is used by
//! single-key commands, pipelines spanning slots are split per slot, and
//! the node channel's subscription sits on the master of its slot.
//!
//! - `node`: who this node is (a node id and, per start, a fresh
//!   incarnation), its lease, and the view of which incarnations are live.
//! - `router`: route writes (which incarnations hold which users'
//!   devices) and cross-node pushes, batched: one pipelined round trip
//!   for the routes of a whole batch, one for its envelopes.
//! - `bus`: the node's sharded Pub/Sub subscription, applying what other
//!   nodes send, and telling local sessions to sync whenever something may
//!   have been missed.
//!
//! Redis keys (prefix `P`, shared by every process of a deployment):
//!
//! | key                   | what                                              |
//! |-----------------------|---------------------------------------------------|
//! | `P:cluster:inc`       | counter; every start takes the next incarnation   |
//! | `P:node:<id>`         | the lease: the id's live incarnation, expiring    |
//! | `P:nodes`             | hash incarnation → node id, live or not yet swept |
//! | `P:rt:<user>`         | set of incarnations holding the user's devices    |
//! | `P:ni:<inc>:<bucket>` | users an incarnation routed (to sweep them)       |
//! | `P:sweep:<inc>`       | who sweeps a dead incarnation (a short lock)      |
//! | `P:push:{<inc>}`      | sharded Pub/Sub channel of one incarnation        |
//!
//! An incarnation is live while `P:node:<id>` holds it. A route naming any
//! other incarnation is never used, and is removed by whichever node
//! sweeps the dead incarnation. Every incarnation number is used once, so
//! a node killed and restarted within its lease starts clean: its old
//! routes name an incarnation that no lease holds any more.

mod bus;
mod node;
mod router;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use im_proto::cluster_pb;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::store::{GroupId, UserId};
use im_storage::redis_target::RedisConn;

pub(crate) use node::View;

/// Settings of a node's cluster membership.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Redis shared by the cluster (one server or a Redis Cluster).
    pub redis: im_storage::redis_target::RedisTarget,
    /// Key prefix shared by every process of the deployment.
    pub prefix: String,
    /// This node's id (letters, digits, `-`, `_`, `.`; at most 64).
    pub node_id: String,
    /// How long a lease lasts without renewal; renewed every third of it.
    pub lease: Duration,
    /// Groups with more members than this are broadcast to every node
    /// (each pushes to its own members); smaller ones are routed to the
    /// nodes of their members.
    pub group_broadcast_members: usize,
    /// Bytes of pushes waiting to be forwarded to other nodes at most;
    /// fan-out waits for room beyond that.
    pub forward_queue_bytes: usize,
}

impl ClusterConfig {
    /// Checks the node id.
    pub fn validate_node_id(id: &str) -> Result<(), String> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Ok(())
        } else {
            Err(format!(
                "node id {id:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
            ))
        }
    }
}

/// Why a node could not join or stay in its cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis failed or answered something unexpected.
    #[error("redis: {0}")]
    Redis(String),
    /// The node id is not one the cluster's keys can carry.
    #[error("{0}")]
    InvalidNodeId(String),
    /// A newer start of the same node id took over.
    #[error("node id {node_id} was taken by incarnation {newer} (this is {mine})")]
    Superseded {
        /// The id.
        node_id: String,
        /// This process's incarnation.
        mine: u64,
        /// The one that holds the lease now.
        newer: u64,
    },
}

fn redis_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Redis(e.to_string())
}

/// What the cluster needs from the node's own chat service: delivery to
/// local connections and what it holds.
pub trait Local: Send + Sync + 'static {
    /// Pushes a frame from another node to the local devices of its users
    /// (or, for a group broadcast, of the group's local members).
    fn deliver(&self, push: cluster_pb::Push) -> impl Future<Output = ()> + Send;
    /// A user went online or offline for the cluster as a whole.
    fn presence(&self, user: UserId, online: bool);
    /// A group's membership changed on some node.
    fn invalidate_group(&self, group: GroupId) -> impl Future<Output = ()> + Send;
    /// Tells every local session it may have missed pushes (a `SyncHint`
    /// for everything).
    fn hint_all(&self);
    /// Users with a device on this node now.
    fn local_users(&self) -> Vec<UserId>;
    /// Whether the user has a device on this node.
    fn is_local(&self, user: UserId) -> bool;
    /// Users some local connection watches for presence.
    fn watched_users(&self) -> Vec<UserId>;
    /// Sessions another node ended: refuse their tokens, close their
    /// connections here.
    fn ended_elsewhere(&self, sessions: Vec<u64>);
}

/// Counters of the cluster layer, for metrics.
#[derive(Debug, Default)]
pub(crate) struct ClusterCounters {
    route_writes: AtomicU64,
    forwarded: AtomicU64,
    envelopes_out: AtomicU64,
    envelopes_in: AtomicU64,
    pushes_in: AtomicU64,
    lost: AtomicU64,
    hints: AtomicU64,
    reregistered: AtomicU64,
    swept: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The cluster layer's counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClusterStatsSnapshot {
    /// This node's incarnation.
    pub incarnation: u64,
    /// Live incarnations in this node's view (itself included).
    pub live_nodes: u64,
    /// Route changes written (a user's first device here, or last gone).
    pub route_writes: u64,
    /// Pushes forwarded to other nodes (one per push and node).
    pub forwarded: u64,
    /// Envelopes published to other nodes.
    pub envelopes_out: u64,
    /// Envelopes received from other nodes.
    pub envelopes_in: u64,
    /// Pushes received from other nodes.
    pub pushes_in: u64,
    /// Envelopes that could not be published or were dropped on arrival.
    pub lost: u64,
    /// Times every local session was told to sync (subscription lost,
    /// lease lapsed, envelopes lost).
    pub hints: u64,
    /// Times this node took a new incarnation while running.
    pub reregistered: u64,
    /// Dead incarnations this node swept.
    pub swept: u64,
}

/// Work for the router, in the order it was produced.
pub(crate) enum Work {
    /// A user's first device on this node (`true`) or last one gone;
    /// `done` is answered once the write is applied.
    Route {
        user: UserId,
        online: bool,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// A push to these users' devices on other nodes.
    Forward {
        frame: Bytes,
        conversation: u64,
        users: smallvec::SmallVec<[UserId; 4]>,
        _room: tokio::sync::OwnedSemaphorePermit,
    },
    /// A push to every other node, for its local members of `group`.
    Broadcast {
        frame: Bytes,
        conversation: u64,
        group: GroupId,
        _room: tokio::sync::OwnedSemaphorePermit,
    },
    /// Membership of these groups changed: tell every other node, then
    /// answer.
    Invalidate {
        groups: Vec<GroupId>,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// These sessions ended: tell every other node, then answer.
    EndSessions {
        sessions: Vec<u64>,
        done: tokio::sync::oneshot::Sender<()>,
    },
    /// A new incarnation: write every local user's route again.
    Republish,
}

/// A route naming an incarnation the view does not know makes the node
/// read the view again, at most this often.
const VIEW_REREAD: Duration = Duration::from_millis(50);

/// Units of forward room: KiB.
fn room_units(bytes: usize) -> u32 {
    u32::try_from(bytes / 1024 + 1).unwrap_or(u32::MAX)
}

/// The shared state of a node's cluster membership.
pub(crate) struct Shared {
    config: ClusterConfig,
    keys: Keys,
    /// Routes and publishing: big pipelines under load.
    conn: RedisConn,
    /// The lease and the view, on a connection of their own so that a
    /// renewal never waits behind the routing traffic (the subscription
    /// has its own too).
    lease_conn: RedisConn,
    /// This node's current incarnation (changes when it re-registers).
    incarnation: watch::Sender<u64>,
    view: std::sync::RwLock<Arc<View>>,
    /// Live incarnations in the view besides this one: while there are
    /// none, pushes are not forwarded at all (no route reads).
    others: AtomicUsize,
    /// When the view was last read again for an unknown incarnation.
    reread: std::sync::Mutex<Option<std::time::Instant>>,
    work: mpsc::UnboundedSender<Work>,
    room: Arc<Semaphore>,
    room_units: u32,
    counters: ClusterCounters,
    /// Set when the node must stop: a newer start took its id.
    fatal: watch::Sender<Option<String>>,
    /// Set when the node leaves: its tasks end.
    stop: watch::Sender<bool>,
    /// Set when a route write may have been lost: the node takes a new
    /// incarnation (and writes every route again).
    rejoin: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Resolves once the node leaves.
    pub(crate) async fn stopped(&self) {
        let mut stop = self.stop.subscribe();
        let _ = stop.wait_for(|s| *s).await;
    }

    pub(crate) fn incarnation(&self) -> u64 {
        *self.incarnation.borrow()
    }

    pub(crate) fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_view(&self, view: View) {
        self.others
            .store(view.live_count().saturating_sub(1), Ordering::Relaxed);
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }

    /// Whether any other node is live (as last read). A node that started
    /// since is told about within a view refresh, and its sessions sync
    /// once it settles (see `node`), so skipping it meanwhile loses nothing
    /// for good.
    fn alone(&self) -> bool {
        self.others.load(Ordering::Relaxed) == 0
    }

    /// The view, read again first if `incarnations` names one it does not
    /// know (a node started since it was read) and it was not read again
    /// within the last [`VIEW_REREAD`].
    pub(crate) async fn view_knowing(&self, incarnations: &[u64]) -> Arc<View> {
        let view = self.view();
        if incarnations
            .iter()
            .all(|&i| view.is_live(i) || view.is_dead(i))
        {
            return view;
        }
        {
            let mut last = self.reread.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < VIEW_REREAD) {
                return view;
            }
            *last = Some(std::time::Instant::now());
        }
        let mut conn = self.conn.clone();
        match node::read_view(&mut conn, self).await {
            Ok(fresh) => {
                self.set_view(fresh);
                self.view()
            }
            Err(_) => view,
        }
    }
}

/// The Redis names of the cluster's keys.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

/// Buckets of an incarnation's route index (each stays a compact intset
/// up to 512 users, so up to ~2M routed users per incarnation).
pub(crate) const INDEX_BUCKETS: u64 = 4096;

impl Keys {
    fn incarnations(&self) -> String {
        format!("{}:cluster:inc", self.prefix)
    }
    fn lease(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.prefix)
    }
    fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }
    fn route(&self, user: UserId) -> String {
        format!("{}:rt:{user}", self.prefix)
    }
    fn index(&self, incarnation: u64, bucket: u64) -> String {
        format!("{}:ni:{incarnation}:{bucket}", self.prefix)
    }
    fn sweep(&self, incarnation: u64) -> String {
        format!("{}:sweep:{incarnation}", self.prefix)
    }
    fn channel(&self, incarnation: u64) -> String {
        format!("{}:push:{{{incarnation}}}", self.prefix)
    }
}

/// A node's membership in its cluster: the handle the chat service uses.
/// Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

/// Everything the cluster's tasks need once the chat service exists.
pub struct Pending {
    shared: Arc<Shared>,
    work: mpsc::UnboundedReceiver<Work>,
}

impl Cluster {
    /// Joins the cluster: takes a fresh incarnation and the lease of
    /// `config.node_id`. Nothing is routed here until [`Pending::attach`]
    /// starts the node's tasks.
    pub async fn join(config: ClusterConfig) -> Result<(Cluster, Pending), ClusterError> {
        ClusterConfig::validate_node_id(&config.node_id).map_err(ClusterError::InvalidNodeId)?;
        let keys = Keys {
            prefix: config.prefix.clone(),
        };
        let conn = node::connect(&config.redis, node::ROUTING_TIMEOUT).await?;
        let mut lease_conn = node::connect(&config.redis, node::LEASE_TIMEOUT).await?;
        let incarnation = node::register(&mut lease_conn, &keys, &config).await?;
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let units = room_units(config.forward_queue_bytes.max(64 * 1024));
        let shared = Arc::new(Shared {
            view: std::sync::RwLock::new(Arc::new(View::only(incarnation, &config.node_id))),
            incarnation: watch::channel(incarnation).0,
            reread: std::sync::Mutex::new(None),
            others: AtomicUsize::new(0),
            room: Arc::new(Semaphore::new(units as usize)),
            room_units: units,
            work: work_tx,
            counters: ClusterCounters::default(),
            fatal: watch::channel(None).0,
            rejoin: std::sync::atomic::AtomicBool::new(false),
            stop: watch::channel(false).0,
            keys,
            conn,
            lease_conn,
            config,
        });
        tracing::info!(
            node_id = %shared.config.node_id,
            incarnation,
            "joined the cluster"
        );
        Ok((
            Cluster {
                shared: shared.clone(),
            },
            Pending {
                shared,
                work: work_rx,
            },
        ))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.config.node_id
    }

    /// This node's current incarnation.
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation()
    }

    /// Groups above this many members are broadcast rather than routed.
    pub fn group_broadcast_members(&self) -> usize {
        self.shared.config.group_broadcast_members
    }

    /// Records that `user` has a device here, and returns once other nodes
    /// route the user's pushes here (or after two seconds without Redis).
    pub async fn route_online(&self, user: UserId) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let work = Work::Route {
            user,
            online: true,
            done: Some(done),
        };
        if self.shared.work.send(work).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        }
    }

    /// Records that `user` has no device here any more.
    pub fn route_offline(&self, user: UserId) {
        let _ = self.shared.work.send(Work::Route {
            user,
            online: false,
            done: None,
        });
    }

    /// Forwards a push to the devices `users` have on other nodes; waits
    /// while too much is queued already.
    pub async fn forward(&self, frame: &Bytes, conversation: u64, users: &[UserId]) {
        if users.is_empty() || self.shared.alone() {
            return;
        }
        let Some(room) = self.room(frame.len()).await else {
            return;
        };
        let _ = self.shared.work.send(Work::Forward {
            frame: frame.clone(),
            conversation,
            users: users.into(),
            _room: room,
        });
    }

    /// Sends a group's push to every other node, which pushes it to its
    /// own members' devices.
    pub async fn broadcast(&self, frame: &Bytes, conversation: u64, group: GroupId) {
        if self.shared.alone() {
            return;
        }
        let Some(room) = self.room(frame.len()).await else {
            return;
        };
        let _ = self.shared.work.send(Work::Broadcast {
            frame: frame.clone(),
            conversation,
            group,
            _room: room,
        });
    }

    async fn room(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let units = room_units(bytes).min(self.shared.room_units);
        self.shared
            .room
            .clone()
            .acquire_many_owned(units)
            .await
            .ok()
    }

    /// Tells every other live node that these groups' memberships changed,
    /// and returns once Redis has taken the message (so a notice acked
    /// after this is pushed by nodes that dropped their cached lists).
    pub async fn invalidate_groups(&self, groups: Vec<GroupId>) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self
            .shared
            .work
            .send(Work::Invalidate { groups, done })
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        }
    }

    /// Tells every other live node that these sessions ended, and returns
    /// once Redis has taken the message (or after five seconds). A node
    /// that misses it (its subscription was down) finds the ends when it
    /// next polls the store.
    pub async fn sessions_ended(&self, sessions: Vec<u64>) {
        if self.shared.alone() {
            return;
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        if self
            .shared
            .work
            .send(Work::EndSessions { sessions, done })
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        }
    }

    /// For each user, whether a live node holds one of their devices.
    pub async fn online(&self, users: &[UserId]) -> Result<Vec<bool>, ClusterError> {
        router::online(&self.shared, users).await
    }

    /// Resolves when the node must stop (a newer start took its id), with
    /// the reason.
    pub async fn fatal(&self) -> String {
        let mut rx = self.shared.fatal.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "cluster membership ended".into();
            }
        }
    }

    /// Counters now.
    pub fn stats(&self) -> ClusterStatsSnapshot {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClusterStatsSnapshot {
            incarnation: self.incarnation(),
            live_nodes: self.shared.view().live_count() as u64,
            route_writes: get(&c.route_writes),
            forwarded: get(&c.forwarded),
            envelopes_out: get(&c.envelopes_out),
            envelopes_in: get(&c.envelopes_in),
            pushes_in: get(&c.pushes_in),
            lost: get(&c.lost),
            hints: get(&c.hints),
            reregistered: get(&c.reregistered),
            swept: get(&c.swept),
        }
    }

    /// Leaves the cluster at shutdown: gives up the lease, so other nodes
    /// count this incarnation dead at once (at their next view refresh,
    /// within half a second), tell their presence watchers who went
    /// offline with it, and sweep its routes.
    pub async fn leave(&self) {
        self.shared.stop.send_replace(true);
        node::release(&self.shared).await;
    }
}

impl Pending {
    /// Starts the node's tasks (lease, view, router, subscription) with
    /// the chat service they deliver to, and returns once the view has
    /// been read and the subscription is up (or after five seconds of
    /// trying; the tasks go on trying).
    pub async fn attach<L: Local>(self, local: Arc<L>) {
        let Pending { shared, work } = self;
        let mut conn = shared.conn.clone();
        if let Ok(view) = node::read_view(&mut conn, &shared).await {
            shared.set_view(view);
        }
        let (ready, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(router::run(shared.clone(), local.clone(), work));
        tokio::spawn(bus::run(shared.clone(), local.clone(), ready));
        tokio::spawn(node::run(shared, local));
        let _ = tokio::time::timeout(Duration::from_secs(5), subscribed).await;
    }
}
