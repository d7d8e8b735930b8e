//! One event-loop thread: accepts connections, reads and parses frames,
//! enforces deadlines and per-connection limits, and writes replies and
//! pushes queued by other threads.
//!
//! The loop is: poll → socket events → queued commands → connections with
//! input left over → flush connections with output → expire deadlines.
//! Reads go through one shard-wide scratch buffer; a connection gets its own
//! buffer only while it holds a partial frame. Output is queued per
//! connection during a round and written with one `writev` per connection.
//!
//! A TLS connection (from the TLS listener) reads into the same scratch
//! buffer; its ciphertext is decrypted by its [`TlsConn`] (kept in a
//! shard-wide map by slot, so plain connections pay nothing for it) and
//! the plaintext goes through the same framing. Its output is the same
//! queue of frames, encrypted a record at a time (up to 16 KiB of frames)
//! when the socket can take more; the record waits in `Bufs::tls_out`, and
//! the frames it holds count as written once it is. Both buffers exist
//! only while busy.
//!
//! A connection from a trusted load balancer (`--proxy-protocol-from`)
//! first has its PROXY header read (partial ones wait in its inbound
//! buffer, like a partial frame); the client address it carries is kept in
//! a shard-wide map keyed by slot until the connection is gone, so other
//! connections pay nothing for it.
//!
//! Abuse limits (`limits`) hook in at four points: a connection is counted
//! against its client address once that is known (at accept, or once its
//! PROXY header is read) and refused with a fatal `RATE_LIMITED` if over;
//! each request but a ping takes a token of its connection's bucket or is
//! answered with a non-fatal `RATE_LIMITED`; finalizing gives the address
//! place back.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use im_proto::pb::{self, frame::Body};
use im_proto::{ErrorCode, Frame, codec};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use prost::Message;
use slab::Slab;

use super::conn::{
    Bufs, Conn, DIRTY, OUT_PAUSED, PROXY_HEADER, READ_PAUSED, READY, State, TLS, WRITE_BLOCKED,
    WRITE_SHUT,
};
use super::limits::{AddrLimits, AddrRefusal, ShardLimits};
use super::output::{Offer, Topic};
use super::proxy::{self, WarnGate};
use super::tls::{MAX_PLAINTEXT, ReadOutcome, TlsAcceptor, TlsConn};
use super::wheel::{self, Wheel};
use super::{Command, ConnRef, FrameCtx, Handler, NetConfig, NetError, Outbound, ShardStats};

const TLS_LISTENER: Token = Token(usize::MAX - 2);
const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
/// Size of the shard-wide read buffer.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read from one connection per round before others get a turn.
const READ_BUDGET: usize = 256 * 1024;
/// Frames gathered into one `writev`.
const MAX_IOV: usize = 64;
/// Commands handled per round before sockets get a turn.
const COMMAND_BUDGET: usize = 16 * 1024;
/// Spare buffer sets kept for reuse.
const MAX_POOLED_BUFS: usize = 1024;
/// How long accepting pauses after a resource error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Seconds between two warnings about bad PROXY headers (each one is
/// logged at debug level).
const PROXY_WARN_SECS: u32 = 60;

/// The listeners of one shard (none when another shard accepts for it).
pub(crate) struct Listeners {
    pub plain: Option<TcpListener>,
    pub tls: Option<TcpListener>,
}

/// A shard before its thread starts.
pub(crate) struct Shard {
    id: u16,
    poll: Poll,
    listeners: Listeners,
    config: Arc<NetConfig>,
    stats: Arc<ShardStats>,
    open: Arc<AtomicUsize>,
    addrs: Arc<AddrLimits>,
}

impl Shard {
    pub fn new(
        id: u16,
        config: Arc<NetConfig>,
        mut listeners: Listeners,
        stats: Arc<ShardStats>,
        open: Arc<AtomicUsize>,
        addrs: Arc<AddrLimits>,
    ) -> Result<(Shard, mio::Waker), NetError> {
        let poll = Poll::new().map_err(NetError::Poll)?;
        let waker = mio::Waker::new(poll.registry(), WAKER).map_err(NetError::Poll)?;
        if let Some(l) = listeners.plain.as_mut() {
            poll.registry()
                .register(l, LISTENER, Interest::READABLE)
                .map_err(NetError::Poll)?;
        }
        if let Some(l) = listeners.tls.as_mut() {
            poll.registry()
                .register(l, TLS_LISTENER, Interest::READABLE)
                .map_err(NetError::Poll)?;
        }
        let shard = Shard {
            id,
            poll,
            listeners,
            config,
            stats,
            open,
            addrs,
        };
        Ok((shard, waker))
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    /// Runs the event loop until shutdown completes.
    pub fn run(self, rx: Receiver<Command>, outbound: Outbound, handler: Arc<dyn Handler>) {
        let wheel_size = self
            .config
            .auth_timeout_secs
            .max(self.config.heartbeat_timeout_secs)
            .max(self.config.linger_secs) as usize
            + 2;
        let started = Instant::now();
        let errors = FatalFrames::new();
        let tls_acceptor = self.config.tls.clone();
        let limits = ShardLimits::new(self.addrs, self.config.max_requests_per_conn_per_sec);
        let mut event_loop = Loop {
            id: self.id,
            poll: self.poll,
            listener: self.listeners.plain,
            tls_listener: self.listeners.tls,
            tls_acceptor,
            tls: HashMap::new(),
            tls_plain: Vec::new(),
            tls_stage: Vec::new(),
            config: self.config,
            stats: self.stats,
            open: self.open,
            rx,
            outbound,
            handler,
            conns: Slab::new(),
            next_generation: 0,
            wheel: Wheel::new(wheel_size.min(4096)),
            due: Vec::new(),
            scratch: vec![0; READ_CHUNK],
            dirty: Vec::new(),
            ready: VecDeque::new(),
            pool: Vec::new(),
            started,
            now: 0,
            draining: false,
            closing_all: false,
            more_commands: false,
            accept_resume_at: None,
            next_adopt: 0,
            errors,
            carried: HashMap::new(),
            proxy_warnings: WarnGate::new(PROXY_WARN_SECS),
            limits,
        };
        event_loop.run();
    }
}

/// What decrypting one read came to.
enum Step {
    /// A PROXY header is awaited and not complete yet.
    ProxyIncomplete,
    /// A trusted balancer sent a bad PROXY header.
    ProxyError(proxy::HeaderError),
    /// Records were processed; the input from `rest` on is an incomplete
    /// record.
    Read { rest: usize, outcome: ReadOutcome },
    /// The TLS state refused the input (its alert is queued).
    Failed,
}

/// Encoded fatal error frames that carry no request id.
struct FatalFrames {
    auth_timeout: Bytes,
    heartbeat_timeout: Bytes,
    slow_consumer: Bytes,
    server_full: Bytes,
}

impl FatalFrames {
    fn new() -> Self {
        let enc = |code, msg: &str| codec::encode_to_bytes(&Frame::error(0, code, msg, true));
        FatalFrames {
            auth_timeout: enc(
                ErrorCode::AuthTimeout,
                "no authentication within the deadline",
            ),
            heartbeat_timeout: enc(
                ErrorCode::HeartbeatTimeout,
                "no frame within the heartbeat timeout",
            ),
            slow_consumer: enc(
                ErrorCode::SlowConsumer,
                "queued output went unread for too long; reconnect and sync",
            ),
            server_full: enc(
                ErrorCode::ServerFull,
                "the server holds its maximum of connections",
            ),
        }
    }
}

struct Loop {
    id: u16,
    poll: Poll,
    listener: Option<TcpListener>,
    tls_listener: Option<TcpListener>,
    tls_acceptor: Option<Arc<TlsAcceptor>>,
    /// The TLS state of connections flagged `TLS`, by slot.
    tls: HashMap<u32, Box<TlsConn>>,
    /// Plaintext decrypted from one read, before it is framed.
    tls_plain: Vec<u8>,
    /// Frames gathered into one record before it is encrypted.
    tls_stage: Vec<u8>,
    config: Arc<NetConfig>,
    stats: Arc<ShardStats>,
    /// Open connections across all shards (for `max_connections`).
    open: Arc<AtomicUsize>,
    rx: Receiver<Command>,
    outbound: Outbound,
    handler: Arc<dyn Handler>,
    conns: Slab<Conn>,
    next_generation: u32,
    wheel: Wheel,
    due: Vec<wheel::Entry>,
    scratch: Vec<u8>,
    /// Connections with output queued this round.
    dirty: Vec<u32>,
    /// Connections with input left to read (budget spent, or resumed).
    ready: VecDeque<u32>,
    /// Spare buffer sets; boxed because connections hold them boxed, so
    /// reuse moves a pointer instead of allocating.
    #[allow(clippy::vec_box)]
    pool: Vec<Box<Bufs>>,
    started: Instant,
    /// Whole seconds since `started`: the clock of deadlines.
    now: u32,
    draining: bool,
    closing_all: bool,
    more_commands: bool,
    accept_resume_at: Option<Instant>,
    next_adopt: usize,
    errors: FatalFrames,
    /// Client addresses carried by PROXY headers, by slot: only connections
    /// from trusted balancers whose header named a client are here, until
    /// they are finalized.
    carried: HashMap<u32, IpAddr>,
    proxy_warnings: WarnGate,
    limits: ShardLimits,
}

fn add(stat: &std::sync::atomic::AtomicU64, n: u64) {
    stat.fetch_add(n, Ordering::Relaxed);
}

fn sub(stat: &std::sync::atomic::AtomicU64, n: u64) {
    stat.fetch_sub(n, Ordering::Relaxed);
}

impl Loop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(shard = self.id, error = %e, "poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            self.now = self.started.elapsed().as_secs() as u32;
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    LISTENER => self.accept(false),
                    TLS_LISTENER => self.accept(true),
                    Token(slot) => {
                        if event.is_writable() {
                            self.on_writable(slot);
                        }
                        if event.is_read_closed() || event.is_error() {
                            self.on_readable(slot, true);
                        } else if event.is_readable() {
                            self.on_readable(slot, false);
                        }
                    }
                }
            }
            if let Some(at) = self.accept_resume_at {
                if Instant::now() >= at {
                    self.accept_resume_at = None;
                    self.accept(false);
                    self.accept(true);
                }
            }
            self.process_commands();
            self.process_ready();
            self.flush_dirty();
            self.expire();
            self.flush_dirty();
            if self.closing_all && self.conns.is_empty() {
                tracing::debug!(shard = self.id, "shard stopped");
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Duration {
        if !self.ready.is_empty() || self.more_commands || !self.rx.is_empty() {
            return Duration::ZERO;
        }
        let elapsed = self.started.elapsed();
        let to_next_second = Duration::from_secs(elapsed.as_secs() + 1).saturating_sub(elapsed);
        match self.accept_resume_at {
            Some(at) => to_next_second.min(at.saturating_duration_since(Instant::now())),
            None => to_next_second,
        }
    }

    // ---- accepting ----

    fn accept(&mut self, tls: bool) {
        if self.accept_resume_at.is_some() || self.draining {
            return;
        }
        loop {
            let listener = if tls {
                &self.tls_listener
            } else {
                &self.listener
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    add(&self.stats.accepted, 1);
                    if self.open.load(Ordering::Relaxed) >= self.config.max_connections {
                        // A TLS client could not read a plain frame.
                        if !tls {
                            refuse(stream, &self.errors.server_full);
                        }
                        continue;
                    }
                    let shards = self.outbound.links.len();
                    if self.config.reuse_port || shards == 1 {
                        self.add(stream, peer, tls);
                    } else {
                        let target = self.next_adopt % shards;
                        self.next_adopt = self.next_adopt.wrapping_add(1);
                        if target == self.id as usize {
                            self.add(stream, peer, tls);
                        } else {
                            self.outbound
                                .send(target, Command::Adopt(stream, peer, tls));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS...: back off rather than spin.
                    tracing::warn!(shard = self.id, error = %e, "accept failed; pausing accepts");
                    self.accept_resume_at = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn add(&mut self, mut stream: TcpStream, peer: SocketAddr, tls: bool) {
        if self.closing_all {
            return;
        }
        let tls_conn = match (tls, &self.tls_acceptor) {
            (false, _) => None,
            (true, Some(acceptor)) => match acceptor.accept() {
                Ok(conn) => Some(Box::new(conn)),
                Err(e) => {
                    tracing::warn!(shard = self.id, error = %e, "cannot start a TLS connection");
                    return;
                }
            },
            (true, None) => return,
        };
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        if slot >= u32::MAX as usize {
            return;
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(slot), interest)
        {
            tracing::warn!(shard = self.id, error = %e, "cannot register connection");
            return;
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let deadline = self.now + self.config.auth_timeout_secs;
        let wheel_at = self.wheel.insert(slot as u32, generation, deadline);
        let mut flags = if proxy::trusted(&self.config.proxy_protocol_from, peer.ip()) {
            PROXY_HEADER
        } else {
            0
        };
        if let Some(tls_conn) = tls_conn {
            flags |= TLS;
            self.tls.insert(slot as u32, tls_conn);
        }
        entry.insert(Conn {
            stream,
            generation,
            user_id: 0,
            deadline,
            wheel_at,
            in_flight: 0,
            state: State::Unauthenticated,
            flags,
            bufs: None,
        });
        self.open.fetch_add(1, Ordering::Relaxed);
        add(&self.stats.connections, 1);
        self.limits.opened(slot);
        if flags & PROXY_HEADER == 0 {
            self.admit_addr(slot, peer.ip());
        }
    }

    /// Counts the connection against its client address's limits, or
    /// refuses it with a fatal `RATE_LIMITED` (the one refusal that closes:
    /// the connection itself is what is over the limit).
    fn admit_addr(&mut self, slot: usize, ip: IpAddr) {
        let Err(refusal) = self.limits.admit(slot, ip) else {
            return;
        };
        let stat = match refusal {
            AddrRefusal::Rate(_) => &self.stats.limited_new_conns,
            AddrRefusal::Open => &self.stats.limited_open_conns,
        };
        add(stat, 1);
        tracing::debug!(shard = self.id, slot, %ip, limit = refusal.limit(), "connection refused");
        let message = match refusal {
            AddrRefusal::Rate(_) => "too many new connections from this address",
            AddrRefusal::Open => "this address holds the most connections allowed",
        };
        let frame = Frame::error_retry(
            0,
            ErrorCode::RateLimited,
            message,
            true,
            refusal.retry_after_ms(),
        );
        self.close_conn(slot, Some(codec::encode_to_bytes(&frame)), false);
    }

    // ---- reading ----

    /// Reads what the connection has. With `to_end` it reads until the
    /// socket says it would block (or the peer's FIN); without, a read that
    /// does not fill the buffer ends it: the socket's queue was empty then,
    /// and bytes arriving later raise a new edge-triggered event. That
    /// saves a system call per wake-up, most of the reads at low load.
    /// `to_end` is for events that also report the peer's FIN or an error
    /// (nothing new would follow them) and for connections resumed from
    /// the ready list (whose last event may have been one).
    fn on_readable(&mut self, slot: usize, to_end: bool) {
        let Some(conn) = self.conns.get(slot) else {
            return;
        };
        if conn.state == State::Closing {
            self.discard_input(slot);
        } else {
            self.read_frames(slot, to_end);
        }
    }

    /// Whether the connection may hand another frame to the chat logic.
    fn can_dispatch(&self, conn: &Conn) -> bool {
        !self.draining
            && !conn.has(READ_PAUSED | OUT_PAUSED)
            && match conn.state {
                State::Unauthenticated => true,
                State::Authenticated => conn.in_flight < self.config.max_in_flight,
                State::Authenticating | State::Closing => false,
            }
    }

    fn read_frames(&mut self, slot: usize, to_end: bool) {
        let mut budget = READ_BUDGET;
        // Frames held back while paused come before new bytes.
        if self.conns.get(slot).is_some_and(Conn::has_inbound) {
            let mut inbound = self.take_inbound(slot);
            let used = self.consume(slot, &inbound);
            inbound.drain(..used);
            self.put_inbound(slot, inbound);
        }
        loop {
            let Some(conn) = self.conns.get(slot) else {
                return;
            };
            if !self.can_dispatch(conn) {
                return;
            }
            if budget == 0 {
                self.mark_ready(slot);
                return;
            }
            let conn = &mut self.conns[slot];
            let tls = conn.has(TLS);
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.peer_closed(slot);
                    return;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    add(&self.stats.bytes_in, n as u64);
                    if tls {
                        self.ingest_tls(slot, n);
                    } else {
                        self.ingest(slot, n);
                    }
                    if !to_end && n < self.scratch.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.abort(slot);
                    return;
                }
            }
        }
    }

    /// Parses `n` freshly read bytes in the scratch buffer, appending them
    /// to a buffered partial frame if there is one, and keeps whatever is
    /// not consumed.
    fn ingest(&mut self, slot: usize, n: usize) {
        let scratch = std::mem::take(&mut self.scratch);
        self.ingest_bytes(slot, &scratch[..n]);
        self.scratch = scratch;
    }

    /// Frames (and dispatches) received plaintext `data`, after a buffered
    /// partial frame if there is one, and keeps what is not consumed.
    fn ingest_bytes(&mut self, slot: usize, data: &[u8]) {
        if self.conns.get(slot).is_some_and(Conn::has_inbound) {
            let mut inbound = self.take_inbound(slot);
            inbound.extend_from_slice(data);
            let used = self.consume(slot, &inbound);
            inbound.drain(..used);
            self.put_inbound(slot, inbound);
        } else {
            let used = self.consume(slot, data);
            if used < data.len() {
                let mut inbound = self.take_inbound(slot);
                inbound.extend_from_slice(&data[used..]);
                self.put_inbound(slot, inbound);
            }
        }
    }

    /// Decrypts `n` bytes of ciphertext freshly read into the scratch
    /// buffer (after a buffered incomplete record, and after the PROXY
    /// header if one is awaited), queues the handshake's answers, and
    /// frames the plaintext.
    fn ingest_tls(&mut self, slot: usize, n: usize) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut plain = std::mem::take(&mut self.tls_plain);
        plain.clear();
        let outcome = self.decrypt(slot, &mut scratch[..n], &mut plain);
        self.scratch = scratch;
        match outcome {
            Some(outcome) => {
                if !plain.is_empty() {
                    self.ingest_bytes(slot, &plain);
                }
                if outcome.closed {
                    self.peer_closed(slot);
                }
            }
            None => {
                if self
                    .conns
                    .get(slot)
                    .is_some_and(|c| c.bufs.as_ref().is_some_and(|b| b.is_empty()))
                {
                    self.recycle(slot);
                }
            }
        }
        if plain.capacity() > READ_BUDGET {
            plain = Vec::new();
        }
        self.tls_plain = plain;
    }

    /// The TLS part of [`Loop::ingest_tls`]: `None` when nothing is to be
    /// framed (the PROXY header is incomplete, or the connection failed).
    fn decrypt(
        &mut self,
        slot: usize,
        fresh: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Option<ReadOutcome> {
        let conn = self.conns.get_mut(slot)?;
        let bufs = conn
            .bufs
            .get_or_insert_with(|| self.pool.pop().unwrap_or_default());
        let mut held = std::mem::take(&mut bufs.tls_in);
        let from_held = !held.is_empty();
        if from_held {
            held.extend_from_slice(fresh);
        }
        let queued = bufs.tls_out.len();
        let mut carried_ip = None;
        let step = {
            let input: &mut [u8] = if from_held { &mut held } else { fresh };
            let mut start = 0;
            let mut step = None;
            if conn.flags & PROXY_HEADER != 0 {
                match proxy::parse_header(input) {
                    Ok(None) => step = Some(Step::ProxyIncomplete),
                    Ok(Some(header)) => {
                        conn.flags &= !PROXY_HEADER;
                        if let Some(source) = header.source {
                            let ip = source.ip().to_canonical();
                            self.carried.insert(slot as u32, ip);
                            carried_ip = Some(ip);
                        }
                        start = header.len;
                    }
                    Err(err) => step = Some(Step::ProxyError(err)),
                }
            }
            match (step, self.tls.get_mut(&(slot as u32))) {
                (Some(step), _) => step,
                (None, None) => Step::Failed,
                (None, Some(tls)) => {
                    match tls.read(&mut input[start..], plain, &mut bufs.tls_out) {
                        Ok(outcome) => Step::Read {
                            rest: start + outcome.consumed,
                            outcome,
                        },
                        Err(e) => {
                            // The alert rustls has for the peer goes out
                            // before the FIN.
                            tls.pending_alert(&mut bufs.tls_out);
                            tracing::debug!(shard = self.id, slot, error = %e, "TLS error");
                            Step::Failed
                        }
                    }
                }
            }
        };
        let outcome = match step {
            Step::ProxyIncomplete => {
                if !from_held {
                    held.extend_from_slice(fresh);
                }
                bufs.tls_in = held;
                return None;
            }
            Step::ProxyError(err) => {
                self.proxy_error(slot, &err);
                return None;
            }
            Step::Read { rest, outcome } => {
                if from_held {
                    held.drain(..rest);
                } else {
                    held.extend_from_slice(&fresh[rest..]);
                }
                bufs.tls_in = held;
                match outcome.handshake_done {
                    Some(true) => add(&self.stats.tls_resumptions, 1),
                    Some(false) => add(&self.stats.tls_handshakes, 1),
                    None => {}
                }
                Some(outcome)
            }
            Step::Failed => None,
        };
        if bufs.tls_out.len() > queued && conn.flags & DIRTY == 0 {
            conn.flags |= DIRTY;
            self.dirty.push(slot as u32);
        }
        if outcome.is_none() {
            add(&self.stats.tls_errors, 1);
            self.close_conn(slot, None, true);
        }
        if let Some(ip) = carried_ip {
            // The client's address counts, as for a plain connection.
            self.admit_addr(slot, ip);
        }
        outcome
    }

    fn take_inbound(&mut self, slot: usize) -> Vec<u8> {
        match self.conns.get_mut(slot).and_then(|c| c.bufs.as_mut()) {
            Some(bufs) => std::mem::take(&mut bufs.inbound),
            None => Vec::new(),
        }
    }

    /// Stores unparsed bytes back, unless the connection is closing (its
    /// input no longer matters).
    fn put_inbound(&mut self, slot: usize, inbound: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.state == State::Closing || (inbound.is_empty() && conn.bufs.is_none()) {
            return;
        }
        let bufs = conn
            .bufs
            .get_or_insert_with(|| self.pool.pop().unwrap_or_default());
        bufs.inbound = inbound;
        if bufs.is_empty() {
            self.recycle(slot);
        }
    }

    /// Takes the PROXY header off the start of `buf` if one is awaited,
    /// then the frames after it; returns the bytes consumed (none while
    /// the header is incomplete).
    fn consume(&mut self, slot: usize, buf: &[u8]) -> usize {
        if !self.conns.get(slot).is_some_and(|c| c.has(PROXY_HEADER)) {
            return self.parse(slot, buf);
        }
        match proxy::parse_header(buf) {
            Ok(None) => 0,
            Ok(Some(header)) => {
                let conn = &mut self.conns[slot];
                conn.clear(PROXY_HEADER);
                if let Some(source) = header.source {
                    // One key per client whichever family the balancer
                    // used for it.
                    self.carried.insert(slot as u32, source.ip().to_canonical());
                    self.admit_addr(slot, source.ip().to_canonical());
                }
                header.len + self.parse(slot, &buf[header.len..])
            }
            Err(err) => {
                self.proxy_error(slot, &err);
                0
            }
        }
    }

    /// A trusted balancer sent a bad PROXY header: close, with a fatal
    /// error that the balancer passes on to its client.
    fn proxy_error(&mut self, slot: usize, err: &proxy::HeaderError) {
        add(&self.stats.proxy_header_errors, 1);
        let balancer = self.conns[slot].stream.peer_addr().ok();
        tracing::debug!(shard = self.id, slot, ?balancer, error = %err, "bad PROXY header");
        if let Some(held_back) = self.proxy_warnings.pass(self.now) {
            tracing::warn!(
                shard = self.id,
                ?balancer,
                error = %err,
                held_back,
                "closing a connection from a trusted load balancer: bad PROXY header \
                 (is the balancer set to send one?)"
            );
        }
        let message = format!("a PROXY protocol header was expected first: {err}");
        let frame = Frame::error(0, ErrorCode::BadFrame, &message, true);
        self.close_conn(slot, Some(codec::encode_to_bytes(&frame)), false);
    }

    /// Decodes and dispatches the complete frames at the start of `buf`
    /// while the connection may dispatch; returns the bytes consumed.
    fn parse(&mut self, slot: usize, buf: &[u8]) -> usize {
        let max = self.config.max_frame_bytes;
        let mut pos = 0;
        loop {
            let Some(conn) = self.conns.get(slot) else {
                return pos;
            };
            if !self.can_dispatch(conn) {
                return pos;
            }
            match codec::check(&buf[pos..], max) {
                Ok(None) => return pos,
                Ok(Some(total)) => {
                    let body = &buf[pos + im_proto::HEADER_LEN..pos + total];
                    match Frame::decode(body) {
                        Ok(frame) => {
                            pos += total;
                            add(&self.stats.frames_in, 1);
                            self.dispatch(slot, frame);
                        }
                        Err(e) => {
                            let err = codec::CodecError::from(e);
                            self.protocol_error(slot, err.code(), &err.to_string());
                            return pos;
                        }
                    }
                }
                Err(err) => {
                    self.protocol_error(slot, err.code(), &err.to_string());
                    return pos;
                }
            }
        }
    }

    fn dispatch(&mut self, slot: usize, frame: Frame) {
        let heartbeat = self.config.heartbeat_timeout_secs;
        let max_in_flight = self.config.max_in_flight;
        let now = self.now;
        let conn = &mut self.conns[slot];
        let conn_ref = ConnRef {
            shard: self.id,
            slot: slot as u32,
            generation: conn.generation,
        };
        let authenticated = conn.state == State::Authenticated;
        if authenticated {
            conn.deadline = now + heartbeat;
        }
        let request_id = frame.request_id;
        if !matches!(frame.body, Some(Body::Ping(_))) {
            if let Err(ms) = self.limits.request(slot) {
                add(&self.stats.limited_requests, 1);
                let message = format!("rate limited (requests per connection); retry in {ms} ms");
                let err =
                    Frame::error_retry(request_id, ErrorCode::RateLimited, message, false, ms);
                self.queue_frame(slot, codec::encode_to_bytes(&err));
                return;
            }
        }
        let conn = &mut self.conns[slot];
        match (&frame.body, conn.state) {
            (Some(Body::Ping(_)), _) => {
                let pong = Frame::new(
                    request_id,
                    Body::Pong(pb::Pong {
                        server_time_ms: im_proto::now_ms(),
                    }),
                );
                self.queue_frame(slot, codec::encode_to_bytes(&pong));
            }
            (None, _) => {
                let err = Frame::error(
                    request_id,
                    ErrorCode::InvalidArgument,
                    "frame has no body, or one this server does not know",
                    false,
                );
                self.queue_frame(slot, codec::encode_to_bytes(&err));
            }
            // 0 marks pushes: a reply with it could not be told from one.
            (Some(_), _) if request_id == 0 => {
                let err = Frame::error(
                    0,
                    ErrorCode::InvalidArgument,
                    "request_id must not be 0; the request was not processed",
                    false,
                );
                self.queue_frame(slot, codec::encode_to_bytes(&err));
            }
            (
                Some(Body::Register(_) | Body::Login(_) | Body::Resume(_)),
                State::Unauthenticated,
            ) => {
                conn.state = State::Authenticating;
                conn.in_flight += 1;
                let peer = match self.carried.get(&(slot as u32)) {
                    Some(&client) => Some(client),
                    None => conn.stream.peer_addr().ok().map(|a| a.ip()),
                };
                let ctx = FrameCtx {
                    conn: conn_ref,
                    user_id: None,
                    peer,
                };
                self.handler.on_frame(ctx, frame);
            }
            (Some(Body::Register(_) | Body::Login(_) | Body::Resume(_)), _) => {
                let err = Frame::error(
                    request_id,
                    ErrorCode::AlreadyAuthenticated,
                    "this connection is already authenticated",
                    false,
                );
                self.queue_frame(slot, codec::encode_to_bytes(&err));
            }
            (Some(_), State::Authenticated) => {
                conn.in_flight += 1;
                if conn.in_flight >= max_in_flight {
                    conn.set(READ_PAUSED);
                }
                let ctx = FrameCtx {
                    conn: conn_ref,
                    user_id: Some(u64::from(conn.user_id)),
                    peer: None,
                };
                self.handler.on_frame(ctx, frame);
            }
            (Some(_), _) => {
                let err = Frame::error(
                    request_id,
                    ErrorCode::Unauthenticated,
                    "authenticate before sending session requests",
                    true,
                );
                add(&self.stats.protocol_errors, 1);
                self.close_conn(slot, Some(codec::encode_to_bytes(&err)), false);
            }
        }
    }

    fn protocol_error(&mut self, slot: usize, code: ErrorCode, message: &str) {
        add(&self.stats.protocol_errors, 1);
        let frame = codec::encode_to_bytes(&Frame::error(0, code, message, true));
        self.close_conn(slot, Some(frame), false);
    }

    fn mark_ready(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot) {
            if !conn.has(READY) {
                conn.set(READY);
                self.ready.push_back(slot as u32);
            }
        }
    }

    fn process_ready(&mut self) {
        for _ in 0..self.ready.len() {
            let Some(slot) = self.ready.pop_front() else {
                break;
            };
            let slot = slot as usize;
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.clear(READY);
                self.on_readable(slot, true);
            }
        }
    }

    /// Reads and drops input of a closing connection until the peer's FIN.
    fn discard_input(&mut self, slot: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(slot) else {
                return;
            };
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => return self.finalize(slot),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.finalize(slot),
            }
        }
    }

    // ---- writing ----

    /// Queues a frame the connection must get (a reply, an error): never
    /// dropped. Past the output limit the connection's requests are not
    /// read until it drains.
    fn queue_frame(&mut self, slot: usize, frame: Bytes) {
        let now = self.now;
        let limit = self.config.max_outbound_bytes;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let bufs = conn
            .bufs
            .get_or_insert_with(|| self.pool.pop().unwrap_or_default());
        add(&self.stats.output_bytes, frame.len() as u64);
        bufs.out.push_reply(frame, now);
        if bufs.out.bytes() > limit && conn.state != State::Closing {
            conn.set(OUT_PAUSED);
        }
        if !conn.has(DIRTY) {
            conn.set(DIRTY);
            self.dirty.push(slot as u32);
        }
    }

    /// Queues a push, or sheds it when the connection's output is full
    /// (after trying to hand what is queued to the socket first): the
    /// connection then gets a `SyncHint` once it has read its queue down.
    fn offer_push(&mut self, slot: usize, frame: Bytes, topic: Topic) {
        let limit = self.config.max_outbound_bytes;
        let over = |c: &Conn| c.out_bytes() + frame.len() > limit;
        let Some(conn) = self.conns.get(slot) else {
            return;
        };
        if over(conn) && !conn.has(WRITE_BLOCKED) {
            // A fast reader's socket may take it all at once.
            self.flush(slot);
        }
        let now = self.now;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.state != State::Authenticated {
            return;
        }
        let bufs = conn
            .bufs
            .get_or_insert_with(|| self.pool.pop().unwrap_or_default());
        let len = frame.len() as u64;
        match bufs.out.offer_push(frame, topic, limit, now) {
            Offer::Queued => add(&self.stats.output_bytes, len),
            Offer::Shed => {
                add(&self.stats.pushes_shed, 1);
                return;
            }
        }
        if !conn.has(DIRTY) {
            conn.set(DIRTY);
            self.dirty.push(slot as u32);
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            let slot = slot as usize;
            if let Some(conn) = self.conns.get_mut(slot) {
                conn.clear(DIRTY);
                if !conn.has(WRITE_BLOCKED) {
                    self.flush(slot);
                }
            }
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn on_writable(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot) {
            conn.clear(WRITE_BLOCKED);
            self.flush(slot);
        }
    }

    /// Writes queued output until it is gone or the socket is full, then
    /// releases a hint that has become due and resumes reading when the
    /// queue is back under the limit.
    fn flush(&mut self, slot: usize) {
        if self.conns.get(slot).is_some_and(|c| c.has(TLS)) {
            return self.flush_tls(slot);
        }
        let now = self.now;
        let limit = self.config.max_outbound_bytes;
        loop {
            let Some(conn) = self.conns.get_mut(slot) else {
                return;
            };
            let Some(bufs) = conn.bufs.as_mut() else {
                break;
            };
            // Once written down to half, a connection that had pushes shed
            // is told so, right behind what it has.
            if conn.state == State::Authenticated {
                if let Some(len) = bufs.out.release_hint(limit, now) {
                    add(&self.stats.sync_hints, 1);
                    add(&self.stats.output_bytes, len as u64);
                }
            }
            if !bufs.out.has_frames() {
                break;
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (slice, frame) in iov.iter_mut().zip(bufs.out.frames()) {
                *slice = IoSlice::new(frame);
                count += 1;
            }
            match conn.stream.write_vectored(&iov[..count]) {
                Ok(0) => return self.abort(slot),
                Ok(written) => {
                    add(&self.stats.bytes_out, written as u64);
                    sub(&self.stats.output_bytes, written as u64);
                    let frames = bufs.out.written(written, now);
                    add(&self.stats.frames_out, frames);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return self.write_blocked(slot),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.abort(slot),
            }
        }
        self.flushed(slot);
    }

    /// [`Loop::flush`] of a TLS connection: writes the pending record,
    /// then encrypts the next one from the queued frames, until the queue
    /// is empty or the socket is full.
    fn flush_tls(&mut self, slot: usize) {
        let now = self.now;
        let limit = self.config.max_outbound_bytes;
        loop {
            let Some(conn) = self.conns.get_mut(slot) else {
                return;
            };
            let closing = conn.state == State::Closing;
            let Some(tls) = self.tls.get_mut(&(slot as u32)) else {
                return self.abort(slot);
            };
            let Some(bufs) = conn.bufs.as_mut() else {
                if closing && !tls.close_queued {
                    // Nothing queued: the close_notify goes first.
                    let bufs = conn
                        .bufs
                        .get_or_insert_with(|| self.pool.pop().unwrap_or_default());
                    tls.close_notify(&mut bufs.tls_out);
                    continue;
                }
                break;
            };
            if bufs.tls_sent < bufs.tls_out.len() {
                match conn.stream.write(&bufs.tls_out[bufs.tls_sent..]) {
                    Ok(0) => return self.abort(slot),
                    Ok(written) => {
                        add(&self.stats.bytes_out, written as u64);
                        bufs.tls_sent += written;
                        if bufs.tls_sent == bufs.tls_out.len() {
                            bufs.tls_out.clear();
                            bufs.tls_sent = 0;
                            let plain = std::mem::take(&mut bufs.tls_plain);
                            if plain > 0 {
                                sub(&self.stats.output_bytes, plain as u64);
                                let frames = bufs.out.written(plain, now);
                                add(&self.stats.frames_out, frames);
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return self.write_blocked(slot);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return self.abort(slot),
                }
                continue;
            }
            if conn.state == State::Authenticated {
                if let Some(len) = bufs.out.release_hint(limit, now) {
                    add(&self.stats.sync_hints, 1);
                    add(&self.stats.output_bytes, len as u64);
                }
            }
            if !bufs.out.has_frames() {
                if closing && !tls.close_queued {
                    tls.close_notify(&mut bufs.tls_out);
                    continue;
                }
                break;
            }
            // Up to one record of frames, encrypted at once.
            let stage = &mut self.tls_stage;
            stage.clear();
            for frame in bufs.out.frames() {
                let room = MAX_PLAINTEXT - stage.len();
                if room == 0 {
                    break;
                }
                stage.extend_from_slice(&frame[..frame.len().min(room)]);
            }
            match tls.encrypt(stage, &mut bufs.tls_out) {
                Ok(true) => bufs.tls_plain = stage.len(),
                Ok(false) if closing => {
                    // Closed before the handshake finished (a deadline):
                    // nothing can be sent encrypted.
                    sub(&self.stats.output_bytes, bufs.out.bytes() as u64);
                    bufs.out.reset();
                    tls.close_queued = true;
                    break;
                }
                // Frames wait for the handshake.
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!(shard = self.id, slot, error = %e, "TLS encryption failed");
                    add(&self.stats.tls_errors, 1);
                    return self.abort(slot);
                }
            }
        }
        self.flushed(slot);
    }

    /// The socket is full: wait for it to be writable, cut the connection
    /// if it takes nothing for the slow-consumer time, and go on reading
    /// if the queue is under its limit.
    fn write_blocked(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.set(WRITE_BLOCKED);
        if let Some(at) = self.stall_deadline(&self.conns[slot]) {
            self.arm(slot, at);
        }
        self.resume_if_drained(slot);
    }

    /// After a flush that left nothing the socket could take now: a
    /// closing connection sends its FIN, reading resumes if it waited for
    /// the queue, and empty buffers go back to the pool.
    fn flushed(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        let pending_tls = conn
            .bufs
            .as_ref()
            .is_some_and(|b| b.tls_sent < b.tls_out.len());
        if conn.state == State::Closing && !conn.has(WRITE_SHUT) && !pending_tls {
            conn.set(WRITE_SHUT);
            // Our last frame is out: send FIN, then wait for the peer's.
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
        self.resume_if_drained(slot);
        if self
            .conns
            .get(slot)
            .and_then(|c| c.bufs.as_ref())
            .is_some_and(|b| b.is_empty())
        {
            self.recycle(slot);
        }
    }

    /// Reading paused for a full output queue goes on once it is under the
    /// limit again.
    fn resume_if_drained(&mut self, slot: usize) {
        let limit = self.config.max_outbound_bytes;
        if let Some(conn) = self.conns.get_mut(slot) {
            if conn.has(OUT_PAUSED) && conn.out_bytes() <= limit {
                conn.clear(OUT_PAUSED);
                self.mark_ready(slot);
            }
        }
    }

    /// Returns a connection's empty buffers to the pool.
    fn recycle(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if let Some(mut bufs) = conn.bufs.take() {
            if self.pool.len() < MAX_POOLED_BUFS {
                bufs.reset();
                self.pool.push(bufs);
            }
        }
    }

    // ---- closing ----

    /// Starts closing: stops requests, tells the chat logic, sends `frame`
    /// if given (after queued output, or instead of it when `discard`), then
    /// waits for the peer's FIN or the linger deadline.
    fn close_conn(&mut self, slot: usize, frame: Option<Bytes>, discard: bool) {
        let linger = self.config.linger_secs;
        let now = self.now;
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if conn.state == State::Closing {
            return;
        }
        let was_authenticated = conn.state == State::Authenticated;
        conn.state = State::Closing;
        conn.in_flight = 0;
        conn.clear(READ_PAUSED | OUT_PAUSED);
        if let Some(bufs) = conn.bufs.as_mut() {
            bufs.inbound = Vec::new();
            bufs.tls_in = Vec::new();
            if discard && bufs.tls_plain > 0 {
                // Frames already encrypted into the pending record are
                // its to deliver: count them out of the queue now.
                let plain = std::mem::take(&mut bufs.tls_plain);
                sub(&self.stats.output_bytes, plain as u64);
                bufs.out.written(plain, now);
            }
            if discard {
                // Keep only the front frame, which may be partly written.
                let before = bufs.out.bytes();
                bufs.out.keep_front_only();
                sub(&self.stats.output_bytes, (before - bufs.out.bytes()) as u64);
            }
        }
        let conn_ref = ConnRef {
            shard: self.id,
            slot: slot as u32,
            generation: conn.generation,
        };
        let user_id = u64::from(conn.user_id);
        self.set_deadline(slot, now + linger);
        if was_authenticated {
            self.handler.on_close(conn_ref, user_id);
        }
        if let Some(frame) = frame {
            self.queue_frame(slot, frame);
        }
        if self.conns.get(slot).is_some_and(|c| !c.has(WRITE_BLOCKED)) {
            self.flush(slot);
        }
    }

    /// The peer sent FIN while the connection was open.
    fn peer_closed(&mut self, slot: usize) {
        self.close_conn(slot, None, false);
        if self.conns.get(slot).is_some_and(|c| c.out_bytes() == 0) {
            self.finalize(slot);
        }
    }

    /// An I/O error: nothing more can be sent.
    fn abort(&mut self, slot: usize) {
        self.close_conn(slot, None, true);
        self.finalize(slot);
    }

    /// Drops the connection for good (closing its socket).
    fn finalize(&mut self, slot: usize) {
        if !self.conns.contains(slot) {
            return;
        }
        if self.conns[slot].state != State::Closing {
            self.close_conn(slot, None, true);
        }
        let left = self.conns[slot].out_bytes();
        sub(&self.stats.output_bytes, left as u64);
        self.recycle(slot);
        if !self.carried.is_empty() {
            self.carried.remove(&(slot as u32));
        }
        if self.conns[slot].has(TLS) {
            self.tls.remove(&(slot as u32));
        }
        self.limits.closed(slot);
        self.conns.remove(slot);
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }

    // ---- deadlines ----

    /// Sets the connection's deadline, adding a wheel entry when the live
    /// one would fire too late.
    fn set_deadline(&mut self, slot: usize, at: u32) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        conn.deadline = at;
        if at < conn.wheel_at {
            conn.wheel_at = self.wheel.insert(slot as u32, conn.generation, at);
        }
    }

    /// Makes sure the connection's wheel entry fires by `at` (for a check
    /// other than its deadline), without moving the deadline.
    fn arm(&mut self, slot: usize, at: u32) {
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        if at < conn.wheel_at {
            conn.wheel_at = self.wheel.insert(slot as u32, conn.generation, at);
        }
    }

    /// When the connection's output will have stalled for too long, if
    /// output waits for its socket.
    fn stall_deadline(&self, conn: &Conn) -> Option<u32> {
        if conn.state == State::Closing {
            return None;
        }
        let since = conn.bufs.as_ref()?.out.stalled_since()?;
        Some(since.saturating_add(self.config.slow_consumer_secs))
    }

    fn expire(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(self.now, &mut due);
        for entry in due.drain(..) {
            let slot = entry.slot as usize;
            let Some(conn) = self.conns.get(slot) else {
                continue;
            };
            if conn.generation != entry.generation || conn.wheel_at != entry.at {
                continue; // A stale entry: the connection has a newer one.
            }
            let stall = self.stall_deadline(conn);
            let conn = &mut self.conns[slot];
            if stall.is_some_and(|at| at <= self.now) {
                // Output has waited the whole timeout without the socket
                // taking a byte: the peer does not read.
                conn.wheel_at = u32::MAX;
                add(&self.stats.slow_consumers, 1);
                tracing::debug!(shard = self.id, slot, "slow consumer disconnected");
                let frame = self.errors.slow_consumer.clone();
                self.close_conn(slot, Some(frame), true);
                continue;
            }
            let next = stall.map_or(conn.deadline, |at| at.min(conn.deadline));
            if next > self.now {
                conn.wheel_at = self.wheel.insert(entry.slot, entry.generation, next);
                continue;
            }
            conn.wheel_at = u32::MAX; // This entry is spent.
            match conn.state {
                State::Unauthenticated | State::Authenticating => {
                    add(&self.stats.timeouts, 1);
                    if conn.has(PROXY_HEADER) {
                        tracing::debug!(
                            shard = self.id,
                            slot,
                            "no PROXY header from a trusted balancer within the auth deadline"
                        );
                    }
                    let frame = self.errors.auth_timeout.clone();
                    self.close_conn(slot, Some(frame), true);
                }
                State::Authenticated => {
                    add(&self.stats.timeouts, 1);
                    let frame = self.errors.heartbeat_timeout.clone();
                    self.close_conn(slot, Some(frame), true);
                }
                State::Closing => self.finalize(slot),
            }
        }
        self.due = due;
    }

    // ---- commands from other threads ----

    fn process_commands(&mut self) {
        self.outbound.links[self.id as usize]
            .notified
            .store(false, Ordering::Release);
        self.more_commands = false;
        let mut taken = 0;
        for _ in 0..COMMAND_BUDGET {
            match self.rx.try_recv() {
                Ok(command) => {
                    taken += command.cost();
                    self.command(command);
                }
                Err(_) => {
                    self.outbound.taken(self.id as usize, taken);
                    return;
                }
            }
        }
        self.outbound.taken(self.id as usize, taken);
        self.more_commands = true;
    }

    fn lookup(&self, conn: ConnRef) -> Option<usize> {
        let slot = conn.slot as usize;
        self.conns
            .get(slot)
            .filter(|c| c.generation == conn.generation)
            .map(|_| slot)
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Reply { conn, frame } => {
                let Some(slot) = self.lookup(conn) else {
                    return;
                };
                let resume_at = self.config.max_in_flight / 2;
                let c = &mut self.conns[slot];
                if c.state == State::Closing {
                    return;
                }
                c.in_flight = c.in_flight.saturating_sub(1);
                let resume = c.has(READ_PAUSED) && c.in_flight <= resume_at;
                if resume {
                    c.clear(READ_PAUSED);
                }
                self.queue_frame(slot, frame);
                if resume {
                    self.mark_ready(slot);
                }
            }
            Command::Push { conn, frame, topic } => {
                let Some(slot) = self.lookup(conn) else {
                    return;
                };
                if self.conns[slot].state == State::Authenticated {
                    self.offer_push(slot, frame, topic);
                }
            }
            Command::AuthResult {
                conn,
                user_id,
                frame,
            } => self.auth_result(conn, user_id, frame),
            Command::Close { conn, frame } => {
                if let Some(slot) = self.lookup(conn) {
                    self.close_conn(slot, frame, false);
                }
            }
            Command::Adopt(stream, peer, tls) => self.add(stream, peer, tls),
            Command::Drain => {
                self.draining = true;
                self.listener = None;
                self.tls_listener = None;
            }
            Command::CloseAll(frame) => {
                self.draining = true;
                self.closing_all = true;
                self.listener = None;
                self.tls_listener = None;
                let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
                for slot in slots {
                    self.close_conn(slot, Some(frame.clone()), false);
                }
            }
        }
    }

    fn auth_result(&mut self, conn: ConnRef, user_id: Option<u64>, frame: Bytes) {
        let slot = self
            .lookup(conn)
            .filter(|&slot| self.conns[slot].state == State::Authenticating);
        let Some(slot) = slot else {
            // The connection went away while the chat logic registered it.
            if let Some(user_id) = user_id {
                self.handler.on_close(conn, user_id);
            }
            return;
        };
        let c = &mut self.conns[slot];
        c.in_flight = c.in_flight.saturating_sub(1);
        match user_id.and_then(|u| u32::try_from(u).ok()) {
            Some(uid) => {
                c.state = State::Authenticated;
                c.user_id = uid;
                let at = self.now + self.config.heartbeat_timeout_secs;
                self.set_deadline(slot, at);
            }
            None => c.state = State::Unauthenticated,
        }
        self.queue_frame(slot, frame);
        // Input may have arrived while reading was paused.
        self.mark_ready(slot);
    }
}

/// Best-effort refusal of a connection over the limit.
fn refuse(mut stream: TcpStream, frame: &Bytes) {
    let _ = stream.write(frame);
}
