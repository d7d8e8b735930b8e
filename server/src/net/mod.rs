//! The connection layer: a few sharded event-loop threads on mio that own
//! every client socket, framing and per-connection limits, and nothing of
//! the chat logic.
//!
//! Each shard thread owns a slab of compact connection states (this slab is
//! the sharded connection table), a timer wheel for authentication and
//! heartbeat deadlines, and, with `SO_REUSEPORT`, its own listener. An idle
//! authenticated connection costs a 32-byte slab entry and one wheel entry:
//! no buffer, timer or queue is allocated until there is something to read
//! or write.
//!
//! Decoded frames go to a [`Handler`] (the chat service) on the shard
//! thread; the handler must not block. Replies and pushes come back through
//! [`Outbound`], a cheap handle that queues [`Command`]s to the owning shard
//! and wakes it at most once per batch. What waits in those queues is
//! counted in bytes; producers of pushes wait for room
//! ([`Outbound::wait_room`]) and the shards wake them as they drain.
//!
//! - `shard`: the event loop.
//! - `conn`: the compact per-connection state and its borrowed buffers.
//! - `limits`: requests per connection and connections per client address
//!   (abuse limits), free of I/O.
//! - `output`: a connection's output queue and its push policy (shed past
//!   the limit, hint, cut only a reader that stalls), free of I/O.
//! - `proxy`: the PROXY protocol header a trusted load balancer sends
//!   first, and which peers are trusted, free of I/O.
//! - `socket`: listener and socket options.
//! - [`tls`]: TLS (rustls, unbuffered) as an I/O-free state machine per
//!   connection, with reloadable certificates and shared ticket keys.
//! - `wheel`: the timer wheel of deadlines.

mod conn;
mod limits;
mod output;
mod proxy;
mod shard;
mod socket;
pub mod tls;
mod wheel;

pub use limits::{CONNS_PER_ADDR, NEW_CONNS_PER_ADDR, REQUESTS_PER_CONN};
pub use output::Topic;
pub use proxy::{Cidr, CidrError};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use crossbeam_utils::CachePadded;
use im_proto::Frame;
use mio::net::TcpListener;

use shard::Shard;

/// Settings of the connection layer (see `Config` for the documented
/// flags that fill them).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Address to listen on for plain TCP.
    pub listen: SocketAddr,
    /// Whether the plain listener is opened at all (`--no-plain-listener`
    /// turns it off; then `tls` must be set).
    pub plain_listener: bool,
    /// Address to listen on for TLS (needs `tls`).
    pub tls_listen: Option<SocketAddr>,
    /// Certificate, ticket keys and settings of the TLS listener.
    pub tls: Option<Arc<tls::TlsAcceptor>>,
    /// Number of event-loop threads.
    pub shards: usize,
    /// Connections held at most; further ones get SERVER_FULL.
    pub max_connections: usize,
    /// Largest accepted frame (length prefix value).
    pub max_frame_bytes: usize,
    /// Seconds a new connection has to authenticate.
    pub auth_timeout_secs: u32,
    /// Seconds of silence after which an authenticated connection is closed.
    pub heartbeat_timeout_secs: u32,
    /// Bytes queued for one connection beyond its socket buffer above
    /// which pushes to it are shed (and a `SyncHint` sent once it drains)
    /// and its requests are not read.
    pub max_outbound_bytes: usize,
    /// Seconds queued output may wait without the socket taking a byte
    /// before the connection is closed as a slow consumer.
    pub slow_consumer_secs: u32,
    /// Bytes of replies and pushes queued to all shards above which
    /// producers of pushes wait ([`Outbound::wait_room`]).
    pub queue_high_water_bytes: usize,
    /// Requests of one connection awaiting a reply before the shard stops
    /// reading from it.
    pub max_in_flight: u16,
    /// Seconds a closing connection may take to flush its last frame and
    /// see the peer's FIN.
    pub linger_secs: u32,
    /// listen(2) backlog.
    pub backlog: u32,
    /// One listener per shard with SO_REUSEPORT (else shard 0 accepts and
    /// hands connections round-robin to the others).
    pub reuse_port: bool,
    /// TCP_NODELAY on client sockets.
    pub nodelay: bool,
    /// TCP keepalive idle time in seconds (0 = off).
    pub keepalive_secs: u32,
    /// SO_SNDBUF in bytes (0 = kernel default / autotuning).
    pub send_buffer_bytes: usize,
    /// SO_RCVBUF in bytes (0 = kernel default / autotuning).
    pub recv_buffer_bytes: usize,
    /// Load balancers whose connections start with a PROXY protocol
    /// header; the client address it carries replaces theirs (empty: no
    /// header is expected from anyone).
    pub proxy_protocol_from: Vec<Cidr>,
    /// Requests per connection per second, also the burst (0 = off).
    pub max_requests_per_conn_per_sec: u32,
    /// New connections per client address per second, also the burst
    /// (0 = off).
    pub max_new_conns_per_addr_per_sec: u32,
    /// Open connections per client address (0 = off).
    pub max_conns_per_addr: u32,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            plain_listener: true,
            tls_listen: None,
            tls: None,
            shards: 2,
            max_connections: 1_000_000,
            max_frame_bytes: im_proto::DEFAULT_MAX_FRAME_BYTES,
            auth_timeout_secs: 10,
            heartbeat_timeout_secs: 90,
            max_outbound_bytes: 1 << 20,
            slow_consumer_secs: 30,
            queue_high_water_bytes: 256 << 20,
            max_in_flight: 64,
            linger_secs: 2,
            backlog: 4096,
            reuse_port: true,
            nodelay: true,
            keepalive_secs: 0,
            send_buffer_bytes: 0,
            recv_buffer_bytes: 0,
            proxy_protocol_from: Vec::new(),
            max_requests_per_conn_per_sec: 0,
            max_new_conns_per_addr_per_sec: 0,
            max_conns_per_addr: 0,
        }
    }
}

/// Failures of the connection layer.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The event loop could not be created.
    #[error("cannot create event loop: {0}")]
    Poll(std::io::Error),
    /// A shard thread could not be started.
    #[error("cannot start shard thread: {0}")]
    Spawn(std::io::Error),
    /// No listener is configured, or a TLS listener lacks its certificate.
    #[error("{0}")]
    Listeners(&'static str),
}

/// A connection as seen from outside its shard. The generation makes a
/// stale reference (to a closed connection whose slot was reused) harmless:
/// commands for it are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnRef {
    shard: u16,
    slot: u32,
    generation: u32,
}

impl ConnRef {
    /// The shard that owns the connection.
    pub fn shard(self) -> usize {
        self.shard as usize
    }

    /// A reference to slot `slot` of shard 0, for unit tests of code that
    /// only stores and compares references.
    #[cfg(test)]
    pub(crate) fn for_test(slot: u32) -> ConnRef {
        ConnRef {
            shard: 0,
            slot,
            generation: 0,
        }
    }
}

/// Where a frame came from.
#[derive(Debug, Clone, Copy)]
pub struct FrameCtx {
    /// The connection.
    pub conn: ConnRef,
    /// The authenticated user, or `None` for authentication requests.
    pub user_id: Option<u64>,
    /// The client's address, given with authentication requests only (for
    /// rate limiting): the one a trusted load balancer's PROXY header
    /// carried, else the socket's peer.
    pub peer: Option<IpAddr>,
}

/// The chat logic as the connection layer sees it.
///
/// Methods run on shard threads and must not block: hand work to a runtime
/// or a bounded queue and answer through [`Outbound`].
pub trait Handler: Send + Sync + 'static {
    /// A decoded frame: an authentication request (`ctx.user_id` is `None`;
    /// answer with [`Outbound::auth_result`]) or a session request of an
    /// authenticated user (answer with exactly one [`Outbound::reply`] or
    /// [`Outbound::close`]). Pings never reach the handler.
    fn on_frame(&self, ctx: FrameCtx, frame: Frame);

    /// An authenticated connection is gone (closed by either side), or an
    /// authentication succeeded for a connection that had already gone.
    fn on_close(&self, conn: ConnRef, user_id: u64);
}

/// What other threads ask of a shard.
#[derive(Debug)]
pub(crate) enum Command {
    /// The answer to one request of the connection.
    Reply { conn: ConnRef, frame: Bytes },
    /// An unsolicited frame (message, receipt, presence); dropped unless the
    /// connection is authenticated, shed when its queue is full.
    Push {
        conn: ConnRef,
        frame: Bytes,
        topic: Topic,
    },
    /// The answer to an authentication request: `Some(user)` on success.
    AuthResult {
        conn: ConnRef,
        user_id: Option<u64>,
        frame: Bytes,
    },
    /// Send `frame` (if any), then close.
    Close { conn: ConnRef, frame: Option<Bytes> },
    /// A connection accepted by another shard's listener, its peer, and
    /// whether it came to the TLS listener.
    Adopt(mio::net::TcpStream, SocketAddr, bool),
    /// Shutdown, first phase: stop accepting and reading requests.
    Drain,
    /// Shutdown, second phase: close every connection with `frame`, then
    /// exit the thread.
    CloseAll(Bytes),
}

impl Command {
    /// What the command holds in the queue, in bytes: its slot and the
    /// frame it carries (counted per command, even where recipients share
    /// one buffer: that is how many bytes the shard still has to move).
    fn cost(&self) -> usize {
        let frame = match self {
            Command::Reply { frame, .. }
            | Command::Push { frame, .. }
            | Command::AuthResult { frame, .. } => frame.len(),
            Command::Close { frame, .. } => frame.as_ref().map_or(0, Bytes::len),
            Command::Adopt(..) | Command::Drain | Command::CloseAll(_) => 0,
        };
        std::mem::size_of::<Command>() + frame
    }
}

/// The sending side of one shard's command queue.
struct ShardLink {
    tx: Sender<Command>,
    waker: mio::Waker,
    /// Set while a wake-up is pending, so a burst of commands costs one
    /// `eventfd` write.
    notified: CachePadded<AtomicBool>,
    /// Bytes of the commands queued and not yet taken (see
    /// [`Command::cost`]).
    queued: CachePadded<AtomicUsize>,
    stats: Arc<ShardStats>,
}

impl ShardLink {
    fn send(&self, command: Command) {
        let cost = command.cost();
        self.queued.fetch_add(cost, Ordering::Relaxed);
        if self.tx.send(command).is_err() {
            // The shard has exited (shutdown); nothing to deliver to.
            self.queued.fetch_sub(cost, Ordering::Relaxed);
            return;
        }
        if !self.notified.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "cannot wake shard");
            }
        }
    }
}

/// Producers waiting for the shards' queues to drain, and how they are
/// woken.
struct Room {
    high_water: usize,
    /// Someone waits: shards that took commands wake them.
    waiting: AtomicBool,
    notify: tokio::sync::Notify,
}

/// Handle through which the chat logic answers requests and pushes frames.
/// Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Outbound {
    links: Arc<[ShardLink]>,
    room: Arc<Room>,
}

impl Outbound {
    fn send(&self, shard: usize, command: Command) {
        if let Some(link) = self.links.get(shard) {
            link.send(command);
        }
    }

    /// Sends the reply to one request of `conn`.
    pub fn reply(&self, conn: ConnRef, frame: Bytes) {
        self.send(conn.shard(), Command::Reply { conn, frame });
    }

    /// Pushes an unsolicited frame about `topic` to `conn` if it is (still)
    /// authenticated. A connection whose queue is full skips it and is
    /// told to sync `topic` later.
    pub fn push(&self, conn: ConnRef, frame: Bytes, topic: Topic) {
        self.send(conn.shard(), Command::Push { conn, frame, topic });
    }

    /// Completes an authentication request: `Some(user_id)` logs the
    /// connection in, `None` leaves it unauthenticated.
    pub fn auth_result(&self, conn: ConnRef, user_id: Option<u64>, frame: Bytes) {
        self.send(
            conn.shard(),
            Command::AuthResult {
                conn,
                user_id,
                frame,
            },
        );
    }

    /// Sends `frame` (if any) and closes the connection.
    pub fn close(&self, conn: ConnRef, frame: Option<Bytes>) {
        self.send(conn.shard(), Command::Close { conn, frame });
    }

    /// Commands queued to all shards and not yet processed (a measure of
    /// how far the event loops lag behind).
    pub fn queued(&self) -> usize {
        self.links.iter().map(|l| l.tx.len()).sum()
    }

    /// Bytes of the commands queued to all shards and not yet processed.
    pub fn queued_bytes(&self) -> usize {
        self.links
            .iter()
            .map(|l| l.queued.load(Ordering::Relaxed))
            .sum()
    }

    /// Waits while the shards' queues hold more than their high-water mark
    /// (`queue_high_water_bytes`): producers of pushes call it before
    /// queueing more, so delivery that lags behind slows them down instead
    /// of growing the queues. Returns at once when there is room.
    pub async fn wait_room(&self) {
        loop {
            if self.queued_bytes() <= self.room.high_water {
                return;
            }
            let notified = self.room.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.room.waiting.store(true, Ordering::Release);
            if self.queued_bytes() <= self.room.high_water {
                return;
            }
            // A shard that takes commands wakes every waiter; the periodic
            // timeout only guards against a shard that has exited.
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// Called by a shard that took `bytes` worth of commands off its queue.
    fn taken(&self, shard: usize, bytes: usize) {
        if bytes == 0 {
            return;
        }
        if let Some(link) = self.links.get(shard) {
            link.queued.fetch_sub(bytes, Ordering::Relaxed);
        }
        if self.room.waiting.load(Ordering::Acquire)
            && self.queued_bytes() <= self.room.high_water
            && self.room.waiting.swap(false, Ordering::AcqRel)
        {
            self.room.notify.notify_waiters();
        }
    }

    /// Counters summed over all shards, and the queues to them now.
    pub fn stats(&self) -> NetStatsSnapshot {
        let mut total = NetStatsSnapshot::default();
        for link in self.links.iter() {
            link.stats.add_to(&mut total);
        }
        total.queued_commands = self.queued() as u64;
        total.queued_bytes = self.queued_bytes() as u64;
        total
    }
}

/// Per-shard counters, written with relaxed atomics by the owning thread.
#[derive(Debug, Default)]
pub(crate) struct ShardStats {
    connections: AtomicU64,
    accepted: AtomicU64,
    frames_in: AtomicU64,
    frames_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    slow_consumers: AtomicU64,
    protocol_errors: AtomicU64,
    proxy_header_errors: AtomicU64,
    timeouts: AtomicU64,
    pushes_shed: AtomicU64,
    sync_hints: AtomicU64,
    /// Bytes in the output queues of this shard's connections (a gauge).
    output_bytes: AtomicU64,
    tls_handshakes: AtomicU64,
    tls_resumptions: AtomicU64,
    tls_errors: AtomicU64,
    /// RATE_LIMITED refusals: requests, new connections, open connections.
    limited_requests: AtomicU64,
    limited_new_conns: AtomicU64,
    limited_open_conns: AtomicU64,
}

impl ShardStats {
    fn add_to(&self, total: &mut NetStatsSnapshot) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        total.connections += get(&self.connections);
        total.accepted += get(&self.accepted);
        total.frames_in += get(&self.frames_in);
        total.frames_out += get(&self.frames_out);
        total.bytes_in += get(&self.bytes_in);
        total.bytes_out += get(&self.bytes_out);
        total.slow_consumers += get(&self.slow_consumers);
        total.protocol_errors += get(&self.protocol_errors);
        total.proxy_header_errors += get(&self.proxy_header_errors);
        total.timeouts += get(&self.timeouts);
        total.pushes_shed += get(&self.pushes_shed);
        total.sync_hints += get(&self.sync_hints);
        total.output_bytes += get(&self.output_bytes);
        total.tls_handshakes += get(&self.tls_handshakes);
        total.tls_resumptions += get(&self.tls_resumptions);
        total.tls_errors += get(&self.tls_errors);
        total.rate_limited_requests += get(&self.limited_requests);
        total.rate_limited_new_conns += get(&self.limited_new_conns);
        total.rate_limited_open_conns += get(&self.limited_open_conns);
    }
}

/// Connection-layer counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStatsSnapshot {
    /// Open connections.
    pub connections: u64,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Connections closed because they read too slowly.
    pub slow_consumers: u64,
    /// Connections closed for a bad or oversized frame or a protocol
    /// violation.
    pub protocol_errors: u64,
    /// Connections from a trusted load balancer closed for a malformed or
    /// oversized PROXY header.
    pub proxy_header_errors: u64,
    /// Connections closed for missing authentication (a trusted balancer's
    /// missing PROXY header included) or heartbeat.
    pub timeouts: u64,
    /// Pushes not queued because the connection's output queue was full
    /// (each connection concerned got a `SyncHint` once it drained).
    pub pushes_shed: u64,
    /// `SyncHint`s sent.
    pub sync_hints: u64,
    /// Bytes waiting in connections' output queues now.
    pub output_bytes: u64,
    /// Full TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS handshakes that resumed a session from a ticket.
    pub tls_resumptions: u64,
    /// TLS connections closed for a failed handshake or a bad record.
    pub tls_errors: u64,
    /// Replies and pushes queued to the shards and not taken up yet.
    pub queued_commands: u64,
    /// Their bytes.
    pub queued_bytes: u64,
    /// Requests refused as over `max_requests_per_conn_per_sec`.
    pub rate_limited_requests: u64,
    /// Connections refused as over `max_new_conns_per_addr_per_sec`.
    pub rate_limited_new_conns: u64,
    /// Connections refused as over `max_conns_per_addr`.
    pub rate_limited_open_conns: u64,
}

/// Bound listeners and event loops, ready to run once the handler exists.
pub struct Net {
    shards: Vec<Shard>,
    receivers: Vec<Receiver<Command>>,
    outbound: Outbound,
    addrs: Addrs,
}

/// The bound listener addresses (at least one is set).
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    /// The plain TCP listener, unless turned off.
    pub plain: Option<SocketAddr>,
    /// The TLS listener, if configured.
    pub tls: Option<SocketAddr>,
}

impl Addrs {
    /// The plain listener's address, or the TLS one's when plain is off.
    pub fn first(&self) -> SocketAddr {
        self.plain
            .or(self.tls)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

impl Net {
    /// Creates the shards and binds the listener(s). Nothing runs until
    /// [`Net::run`].
    pub fn bind(config: NetConfig) -> Result<Net, NetError> {
        let config = Arc::new(config);
        let count = config.shards.clamp(1, u16::MAX as usize);
        let tls_listen = match (config.tls_listen, &config.tls) {
            (Some(addr), Some(_)) => Some(addr),
            (Some(_), None) => {
                return Err(NetError::Listeners(
                    "a TLS listener needs a certificate and key",
                ));
            }
            (None, _) => None,
        };
        let plain_listen = config.plain_listener.then_some(config.listen);
        if plain_listen.is_none() && tls_listen.is_none() {
            return Err(NetError::Listeners(
                "no listener: the plain one is off and no TLS one is set",
            ));
        }
        // The first listener of each kind fixes the port (0: any) that the
        // other shards' listeners then share.
        let bind_first = |addr: Option<SocketAddr>| -> Result<_, NetError> {
            let Some(addr) = addr else {
                return Ok((None, None));
            };
            let listen_err = |source| NetError::Listen { addr, source };
            let first = socket::listener(&config, addr).map_err(listen_err)?;
            let local = first.local_addr().map_err(listen_err)?;
            Ok((Some(first), Some(local)))
        };
        let (mut first_plain, plain_addr) = bind_first(plain_listen)?;
        let (mut first_tls, tls_addr) = bind_first(tls_listen)?;
        let more = |first: &mut Option<TcpListener>, addr: Option<SocketAddr>| match (
            first.take(),
            addr,
        ) {
            (Some(l), _) => Ok(Some(l)),
            (None, Some(addr)) if config.reuse_port => socket::listener(&config, addr)
                .map(Some)
                .map_err(|source| NetError::Listen { addr, source }),
            _ => Ok(None),
        };

        let open = Arc::new(AtomicUsize::new(0));
        let addrs = Arc::new(limits::AddrLimits::new(
            config.max_new_conns_per_addr_per_sec,
            config.max_conns_per_addr,
        ));
        let mut shards = Vec::with_capacity(count);
        let mut links = Vec::with_capacity(count);
        let mut receivers = Vec::with_capacity(count);
        for id in 0..count {
            let listeners = shard::Listeners {
                plain: more(&mut first_plain, plain_addr)?,
                tls: more(&mut first_tls, tls_addr)?,
            };
            let stats = Arc::new(ShardStats::default());
            let (shard, waker) = Shard::new(
                id as u16,
                config.clone(),
                listeners,
                stats.clone(),
                open.clone(),
                addrs.clone(),
            )?;
            let (tx, rx) = crossbeam_channel::unbounded();
            links.push(ShardLink {
                tx,
                waker,
                notified: CachePadded::new(AtomicBool::new(false)),
                queued: CachePadded::new(AtomicUsize::new(0)),
                stats,
            });
            receivers.push(rx);
            shards.push(shard);
        }
        Ok(Net {
            shards,
            receivers,
            outbound: Outbound {
                links: links.into(),
                room: Arc::new(Room {
                    high_water: config.queue_high_water_bytes,
                    waiting: AtomicBool::new(false),
                    notify: tokio::sync::Notify::new(),
                }),
            },
            addrs: Addrs {
                plain: plain_addr,
                tls: tls_addr,
            },
        })
    }

    /// The bound addresses (with the actual ports when 0 was asked for).
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// The handle the chat logic answers through.
    pub fn outbound(&self) -> Outbound {
        self.outbound.clone()
    }

    /// Starts one thread per shard.
    pub fn run(self, handler: Arc<dyn Handler>) -> Result<RunningNet, NetError> {
        let mut threads = Vec::with_capacity(self.shards.len());
        for (shard, rx) in self.shards.into_iter().zip(self.receivers) {
            let name = format!("im-shard-{}", shard.id());
            let handler = handler.clone();
            let outbound = self.outbound.clone();
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || shard.run(rx, outbound, handler))
                .map_err(NetError::Spawn)?;
            threads.push(thread);
        }
        Ok(RunningNet {
            threads,
            outbound: self.outbound,
            addrs: self.addrs,
        })
    }
}

/// The running event loops.
pub struct RunningNet {
    threads: Vec<JoinHandle<()>>,
    outbound: Outbound,
    addrs: Addrs,
}

impl RunningNet {
    /// The bound addresses.
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// The handle the chat logic answers through.
    pub fn outbound(&self) -> Outbound {
        self.outbound.clone()
    }

    /// Shutdown, first phase: stop accepting connections and reading
    /// requests; replies and pushes still go out.
    pub fn drain(&self) {
        for shard in 0..self.outbound.links.len() {
            self.outbound.send(shard, Command::Drain);
        }
    }

    /// Shutdown, second phase: send `frame` to every connection, close them
    /// and wait (blocking) for the shard threads to exit, which takes at
    /// most the linger time.
    pub fn close_all(self, frame: &Frame) {
        let bytes = im_proto::codec::encode_to_bytes(frame);
        for shard in 0..self.outbound.links.len() {
            self.outbound.send(shard, Command::CloseAll(bytes.clone()));
        }
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!("a shard thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn producers_wait_for_room_and_are_woken_as_soon_as_shards_drain() {
        let config = NetConfig {
            shards: 1,
            queue_high_water_bytes: 10_000,
            ..NetConfig::default()
        };
        let net = Net::bind(config).unwrap();
        let out = net.outbound();
        let frame = Bytes::from(vec![0u8; 4000]);
        for _ in 0..3 {
            out.push(ConnRef::for_test(1), frame.clone(), Topic::Presence);
        }
        assert!(out.queued_bytes() > 10_000);
        let waiter = tokio::spawn({
            let out = out.clone();
            async move { out.wait_room().await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "no room yet");
        // The shard takes two of the three commands off its queue.
        for _ in 0..2 {
            let command = net.receivers[0].try_recv().unwrap();
            out.taken(0, command.cost());
        }
        // Woken by the drain, well before the fallback recheck.
        tokio::time::timeout(Duration::from_millis(50), waiter)
            .await
            .expect("woken when the queue drained")
            .unwrap();
        assert!(out.queued_bytes() <= 10_000);
    }
}
