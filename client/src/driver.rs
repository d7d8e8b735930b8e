//! The connection task: owns the socket of the current connection, matches
//! replies to requests, sends heartbeats, notices a dead peer, feeds
//! messages through [`Delivery`](crate::delivery::Delivery) to the event
//! channel, and reconnects with backoff whenever the connection is lost.
//!
//! One loop per connection selects over: frames from the server, requests
//! from the API, the heartbeat timer and a housekeeping tick (request
//! deadlines, delivery acks, gap fetches). Writes go through a bounded queue
//! to a separate writer task, so a slow write never stops the reading.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use im_proto::pb::{self, frame::Body};
use im_proto::{CodecError, ErrorCode, Frame};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::conn::{AuthError, Conn, Writer, describe_error};
use crate::error::error_code;
use crate::shared::{Call, Link, Session, Shared, lock};
use crate::{ClientError, Credentials, Event};

/// Frames waiting for the writer task.
const WRITE_QUEUE: usize = 128;
/// Period of the housekeeping tick.
const TICK: Duration = Duration::from_millis(100);
/// Heartbeat settings used when the server sends zeros.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Floor for the heartbeat interval, whatever the server says.
const MIN_HEARTBEAT: Duration = Duration::from_millis(50);
/// A connection that lived this long counts as healthy: the next reconnect
/// starts again from the smallest backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Who is waiting for the reply to a request.
enum Waiter {
    /// An API call (or the catch-up task).
    Call(oneshot::Sender<Result<Body, ClientError>>),
    /// A gap fetch for a conversation, started at cursor `from`.
    GapFill { conversation: u64, from: u64 },
    /// A fire-and-forget request (delivery acks).
    Ignore,
}

struct Pending {
    waiter: Waiter,
    deadline: Instant,
    /// For a `SyncRequest`: the cursors it asked from, by conversation.
    sync_from: Vec<(u64, u64)>,
}

/// The cursors of a sync request (empty for any other body).
fn sync_cursors(body: &Body) -> Vec<(u64, u64)> {
    match body {
        Body::Sync(r) => r
            .cursors
            .iter()
            .map(|c| (c.conversation_id, c.seq))
            .collect(),
        _ => Vec::new(),
    }
}

/// Why a connection ended.
enum End {
    /// The client is shutting down.
    Shutdown,
    /// The connection was lost; reconnect.
    Lost(String),
}

/// The client is shutting down (returned from a wait that was cut short).
struct Shutdown;

pub(crate) struct Driver {
    shared: Arc<Shared>,
    calls: mpsc::Receiver<Call>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
    credentials: Credentials,
    pending: HashMap<u64, Pending>,
    /// What `SyncHint`s said was missed and no resync has taken up yet.
    missed: Option<crate::sync::Missed>,
    /// The resync running after a hint (one at a time).
    resync: Option<tokio::task::JoinHandle<()>>,
    generation: u64,
    /// The user of the current connection.
    me: u64,
    /// Index into the configured servers of the one to connect to next.
    server: usize,
    /// The server ended this session (SESSION_REVOKED): its token is dead,
    /// and logging in again is the application's decision, not ours.
    revoked: bool,
}

impl Driver {
    pub(crate) fn new(
        shared: Arc<Shared>,
        calls: mpsc::Receiver<Call>,
        events: mpsc::Sender<Event>,
        cancel: CancellationToken,
        credentials: Credentials,
        server: usize,
    ) -> Self {
        Driver {
            shared,
            calls,
            events,
            cancel,
            credentials,
            pending: HashMap::new(),
            missed: None,
            resync: None,
            generation: 0,
            me: 0,
            server,
            revoked: false,
        }
    }

    /// Runs until the client is closed or authentication fails for good.
    /// `first` is the connection authenticated by `Client::connect`.
    pub(crate) async fn run(mut self, first: (Conn, pb::AuthOk)) {
        let mut backoff = Backoff::new(
            self.shared.config.reconnect_min,
            self.shared.config.reconnect_max,
        );
        let mut next = Some(first);
        loop {
            let (conn, ok) = match next.take() {
                Some(established) => established,
                None => {
                    let delay = backoff.next_delay();
                    tracing::debug!(?delay, "reconnecting");
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    let attempt = tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        attempt = self.establish() => attempt,
                    };
                    match attempt {
                        Ok(established) => established,
                        Err(AuthError::Retry(e)) => {
                            tracing::debug!(error = %e, "reconnect failed");
                            // Not before the server said a retry can pass.
                            if let Some(wait) = e.retry_after() {
                                tokio::select! {
                                    _ = self.cancel.cancelled() => break,
                                    _ = tokio::time::sleep(wait) => {}
                                }
                            }
                            // Another node may be up.
                            self.server += 1;
                            continue;
                        }
                        Err(AuthError::Fatal(e)) => {
                            tracing::warn!(error = %e, "giving up: credentials refused");
                            self.shared.link.send_replace(Link::Closed);
                            let reason = e.to_string();
                            let _ = self.emit(Event::Stopped { reason }).await;
                            return;
                        }
                    }
                }
            };

            self.authenticated(&ok);
            self.generation += 1;
            let generation = self.generation;
            let reconnected = generation > 1;
            self.shared.link.send_replace(Link::Up { generation });
            tracing::debug!(user_id = ok.user_id, generation, "connected");
            let connected = Event::Connected {
                user_id: ok.user_id,
                reconnected,
            };
            if self.emit(connected).await.is_err() {
                break;
            }
            let catch_up = tokio::spawn(crate::sync::catch_up(
                self.shared.clone(),
                self.events.clone(),
                generation,
            ));
            let started = Instant::now();
            let end = self.connection(conn, &ok).await;
            catch_up.abort();
            // The next connection catches up on everything anyway.
            if let Some(resync) = self.resync.take() {
                resync.abort();
            }
            self.missed = None;

            // Order matters: the link leaves Ready before the waiters learn
            // of the disconnect, so a retrying send waits for the next
            // connection to catch up before it resends.
            self.shared.link.send_replace(Link::Connecting);
            self.pending.clear();
            lock(&self.shared.delivery).connection_lost();
            match end {
                End::Shutdown => break,
                End::Lost(reason) if self.revoked => {
                    tracing::info!(%reason, "session ended by the server; stopping");
                    self.shared.link.send_replace(Link::Closed);
                    let _ = self.emit(Event::Stopped { reason }).await;
                    return;
                }
                End::Lost(reason) => {
                    tracing::info!(%reason, "connection lost");
                    // Its node may be gone: the next attempt goes to the
                    // next one (the same one when there is only one).
                    self.server += 1;
                    if started.elapsed() >= HEALTHY_AFTER {
                        backoff.reset();
                    }
                    if self.emit(Event::Disconnected { reason }).await.is_err() {
                        break;
                    }
                }
            }
        }
        self.shared.link.send_replace(Link::Closed);
    }

    /// Opens a new connection and logs in with the latest token.
    async fn establish(&self) -> Result<(Conn, pb::AuthOk), AuthError> {
        let config = &self.shared.config;
        let servers = config.servers();
        let mut conn = Conn::open(
            servers[self.server % servers.len()],
            config.connect_timeout,
            config.max_frame_bytes,
            config.tls.as_ref(),
        )
        .await
        .map_err(AuthError::Retry)?;
        let token = lock(&self.shared.session).token.clone();
        let shared = &self.shared;
        let ok = conn
            .authenticate(
                &self.credentials,
                Some(&token),
                &config.device_name,
                || shared.next_request_id(),
                config.request_timeout,
            )
            .await?;
        Ok((conn, ok))
    }

    fn authenticated(&mut self, ok: &pb::AuthOk) {
        *lock(&self.shared.session) = Session::from(ok);
        self.me = ok.user_id;
        // The account exists now: from here on, fall back to logging in.
        if let Credentials::Register { username, password } = &self.credentials {
            self.credentials = Credentials::Login {
                username: username.clone(),
                password: password.clone(),
            };
        }
    }

    /// Serves one authenticated connection until it ends.
    async fn connection(&mut self, conn: Conn, ok: &pb::AuthOk) -> End {
        let Conn { mut reader, writer } = conn;
        let (writes, write_queue) = mpsc::channel(WRITE_QUEUE);
        let mut writer_task = tokio::spawn(write_loop(writer, write_queue));

        let interval = millis(ok.heartbeat_interval_ms)
            .unwrap_or(DEFAULT_HEARTBEAT)
            .max(MIN_HEARTBEAT);
        let dead_after = millis(ok.heartbeat_timeout_ms)
            .unwrap_or(interval * 3)
            .max(interval);
        let server_max = usize::try_from(ok.max_frame_bytes)
            .ok()
            .filter(|&m| m > 0)
            .unwrap_or(im_proto::DEFAULT_MAX_FRAME_BYTES);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut next_ack_flush = Instant::now() + self.shared.config.ack_interval;

        let end = loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break End::Shutdown,
                result = &mut writer_task => {
                    let reason = match result {
                        Ok(Ok(())) => "writer stopped".to_owned(),
                        Ok(Err(e)) => format!("write failed: {e}"),
                        Err(e) => format!("writer task failed: {e}"),
                    };
                    break End::Lost(reason);
                }
                frame = reader.next() => match frame {
                    None => break End::Lost("connection closed by the server".to_owned()),
                    Some(Err(e)) => break End::Lost(format!("read failed: {e}")),
                    Some(Ok(frame)) => {
                        match self.on_frame(frame).await {
                            Ok(None) => {}
                            Ok(Some(reason)) => break End::Lost(reason),
                            Err(Shutdown) => break End::Shutdown,
                        }
                        self.fetch_gaps(&writes);
                        // Counted after processing: time spent waiting for
                        // the application to take events is not silence.
                        last_heard = Instant::now();
                    }
                },
                // Only take a request when the write queue has room for it,
                // so a stalled socket pushes back on callers, not on reads.
                Some(call) = self.calls.recv(), if writes.capacity() > 0 => {
                    self.on_call(call, &writes, server_max);
                }
                _ = heartbeat.tick() => {
                    let ping = Frame::new(self.shared.next_request_id(), Body::Ping(pb::Ping {}));
                    // A full queue means frames are going out anyway.
                    let _ = writes.try_send(ping);
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now.duration_since(last_heard) >= dead_after {
                        break End::Lost(format!("no frame from the server for {dead_after:?}"));
                    }
                    self.expire(now);
                    self.start_resync();
                    if self.shared.config.auto_ack_delivered && now >= next_ack_flush {
                        next_ack_flush = now + self.shared.config.ack_interval;
                        self.flush_acks(&writes);
                    }
                    self.fetch_gaps(&writes);
                }
            }
        };
        writer_task.abort();
        end
    }

    /// Handles one frame from the server. Returns the reason to disconnect
    /// after a fatal error.
    async fn on_frame(&mut self, frame: Frame) -> Result<Option<String>, Shutdown> {
        let Some(body) = frame.body else {
            tracing::debug!("ignoring a frame without a body");
            return Ok(None);
        };
        let fatal = match &body {
            Body::Error(err) if err.fatal => Some(describe_error(err)),
            _ => None,
        };
        if let Body::Error(err) = &body {
            if err.fatal && error_code(err.code) == ErrorCode::SessionRevoked {
                self.revoked = true;
            }
        }
        if frame.request_id == 0 {
            match body {
                Body::Message(message) => self.deliver(vec![message]).await?,
                Body::Receipt(receipt) => self.emit(Event::Receipt(receipt)).await?,
                Body::Presence(presence) => self.emit(Event::Presence(presence)).await?,
                Body::SyncHint(hint) => {
                    tracing::debug!(?hint, "the server skipped pushes; syncing");
                    self.missed.get_or_insert_default().add(&hint);
                    self.start_resync();
                }
                Body::Error(err) if !err.fatal => {
                    tracing::warn!(code = ?error_code(err.code), message = %err.message, "server error");
                }
                _ => {}
            }
            return Ok(fatal);
        }

        // Every sync result is delivered, whoever asked for it, so sync and
        // pushes share one path. It happens before the waiter hears of the
        // reply, so the waiter sees advanced cursors.
        if let Body::SyncResponse(response) = &body {
            // What retention removed will never come: the cursor moves
            // past it first.
            for expired in &response.expired {
                let ready = lock(&self.shared.delivery).expire(
                    expired.conversation_id,
                    expired.seq,
                    self.me,
                );
                if let Some(ready) = ready {
                    self.emit(Event::Expired {
                        conversation_id: expired.conversation_id,
                        seq: expired.seq,
                    })
                    .await?;
                    for message in ready {
                        self.emit(Event::Message(message)).await?;
                    }
                }
            }
            // The server returns each conversation contiguously from the
            // first message visible after the cursor; a member who joined a
            // group late cannot see below that, so the cursor skips ahead.
            if let Some(pending) = self.pending.get(&frame.request_id) {
                let mut delivery = lock(&self.shared.delivery);
                for &(conversation, from) in &pending.sync_from {
                    if let Some(first) = response
                        .messages
                        .iter()
                        .find(|m| m.conversation_id == conversation)
                    {
                        delivery.skip_invisible(conversation, from, first.seq);
                    }
                }
            }
            self.deliver(response.messages.iter().cloned()).await?;
        }
        // This device's own sends count as delivered once acked, so they
        // are not handed back to the application as incoming messages.
        if let Body::SendAck(ack) = &body {
            let ready = lock(&self.shared.delivery).sent(ack.conversation_id, ack.seq, self.me);
            for message in ready {
                self.emit(Event::Message(message)).await?;
            }
        }
        match self.pending.remove(&frame.request_id).map(|p| p.waiter) {
            Some(Waiter::Call(reply)) => {
                let _ = reply.send(Ok(body));
            }
            Some(Waiter::GapFill { conversation, from }) => {
                let mut delivery = lock(&self.shared.delivery);
                if let Body::Error(err) = &body {
                    tracing::debug!(conversation, code = ?error_code(err.code), "gap fetch failed");
                    if matches!(
                        error_code(err.code),
                        ErrorCode::Forbidden | ErrorCode::NotFound
                    ) {
                        // Not ours to read (any more): stop waiting for it.
                        delivery.discard_early(conversation);
                    }
                }
                let progressed = delivery.delivered(conversation) > from;
                delivery.fetch_done(conversation, progressed, std::time::Instant::now());
            }
            Some(Waiter::Ignore) => {
                if let Body::Error(err) = &body {
                    tracing::debug!(code = ?error_code(err.code), message = %err.message, "request failed");
                }
            }
            // A pong, or the late reply to a request that timed out.
            None => {}
        }
        Ok(fatal)
    }

    /// Starts a resync for what hints said was missed, unless one runs
    /// (then it starts at a later tick, with everything merged).
    fn start_resync(&mut self) {
        if self.resync.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if let Some(missed) = self.missed.take() {
            self.resync = Some(tokio::spawn(crate::sync::resync(
                self.shared.clone(),
                self.events.clone(),
                missed,
            )));
        }
    }

    /// Runs messages through delivery and emits whatever became ready.
    async fn deliver(
        &mut self,
        messages: impl IntoIterator<Item = pb::Message>,
    ) -> Result<(), Shutdown> {
        let ready: Vec<pb::Message> = {
            let mut delivery = lock(&self.shared.delivery);
            messages
                .into_iter()
                .flat_map(|m| delivery.accept(m, self.me))
                .collect()
        };
        for message in ready {
            self.emit(Event::Message(message)).await?;
        }
        Ok(())
    }

    /// Hands an event to the application, waiting while its channel is full
    /// (which is what stops the reading of the socket). A dropped `Events`
    /// discards events.
    async fn emit(&self, event: Event) -> Result<(), Shutdown> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Shutdown),
            _ = self.events.send(event) => Ok(()),
        }
    }

    fn on_call(&mut self, call: Call, writes: &mpsc::Sender<Frame>, server_max: usize) {
        if call.reply.is_closed() {
            return; // the caller gave up while the request was queued
        }
        let request_id = self.shared.next_request_id();
        let sync_from = sync_cursors(&call.body);
        let frame = Frame::new(request_id, call.body);
        let len = frame.encoded_len();
        if len > server_max {
            let _ = call.reply.send(Err(ClientError::InvalidArgument(format!(
                "request of {len} bytes exceeds the server's limit of {server_max} bytes"
            ))));
            return;
        }
        match writes.try_send(frame) {
            Ok(()) => {
                let deadline = Instant::now() + self.shared.config.request_timeout;
                let waiter = Waiter::Call(call.reply);
                self.pending.insert(
                    request_id,
                    Pending {
                        waiter,
                        deadline,
                        sync_from,
                    },
                );
            }
            // Full cannot happen (capacity was checked); closed means the
            // writer died, which the loop notices next.
            Err(_) => {
                let _ = call.reply.send(Err(ClientError::Disconnected));
            }
        }
    }

    /// Drops requests whose callers gave up or whose time ran out.
    fn expire(&mut self, now: Instant) {
        let shared = &self.shared;
        self.pending.retain(|_, pending| {
            let expired = now >= pending.deadline;
            match &pending.waiter {
                Waiter::Call(reply) => !expired && !reply.is_closed(),
                Waiter::GapFill { conversation, .. } => {
                    if expired {
                        lock(&shared.delivery).fetch_done(
                            *conversation,
                            false,
                            std::time::Instant::now(),
                        );
                    }
                    !expired
                }
                Waiter::Ignore => !expired,
            }
        });
    }

    /// Sends the coalesced delivery acks.
    fn flush_acks(&mut self, writes: &mpsc::Sender<Frame>) {
        let acks = lock(&self.shared.delivery).take_acks();
        for (conversation, seq) in acks {
            let request_id = self.shared.next_request_id();
            let ack = Body::Ack(pb::AckRequest {
                conversation_id: conversation,
                seq,
                kind: pb::ReceiptKind::Delivered as i32,
            });
            if writes.try_send(Frame::new(request_id, ack)).is_ok() {
                self.track(request_id, Waiter::Ignore);
            }
        }
    }

    /// Starts a sync for every conversation with a gap.
    fn fetch_gaps(&mut self, writes: &mpsc::Sender<Frame>) {
        let now = std::time::Instant::now();
        let due = lock(&self.shared.delivery).gaps_to_fetch(now);
        for (conversation, from) in due {
            tracing::debug!(conversation, from, "fetching a gap");
            let request_id = self.shared.next_request_id();
            let sync = Body::Sync(pb::SyncRequest {
                cursors: vec![pb::ConvCursor {
                    conversation_id: conversation,
                    seq: from,
                }],
                limit: self.shared.config.sync_page,
            });
            if writes.try_send(Frame::new(request_id, sync)).is_ok() {
                let deadline = Instant::now() + self.shared.config.request_timeout;
                let pending = Pending {
                    waiter: Waiter::GapFill { conversation, from },
                    deadline,
                    sync_from: vec![(conversation, from)],
                };
                self.pending.insert(request_id, pending);
            } else {
                lock(&self.shared.delivery).fetch_done(conversation, false, now);
            }
        }
    }

    fn track(&mut self, request_id: u64, waiter: Waiter) {
        let deadline = Instant::now() + self.shared.config.request_timeout;
        let pending = Pending {
            waiter,
            deadline,
            sync_from: Vec::new(),
        };
        self.pending.insert(request_id, pending);
    }
}

/// Writes queued frames, flushing whenever the queue runs dry.
async fn write_loop(
    mut writer: Writer,
    mut queue: mpsc::Receiver<Frame>,
) -> Result<(), CodecError> {
    while let Some(frame) = queue.recv().await {
        writer.feed(frame).await?;
        while let Ok(frame) = queue.try_recv() {
            writer.feed(frame).await?;
        }
        SinkExt::<Frame>::flush(&mut writer).await?;
    }
    Ok(())
}

fn millis(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(u64::from(ms)))
}
