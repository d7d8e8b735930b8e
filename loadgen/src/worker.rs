//! One worker's run: connect its share of users, play the scenario, then
//! verify. A run is one process, or several that each run a worker and
//! report to the first (see `main`).
//!
//! Every simulated user is one task owning its connection. Senders send at
//! their share of the rate with a bounded window of unacknowledged sends;
//! every message carries its send time, so recipients measure send-to-
//! deliver latency. Every user tracks the seqs of its conversation
//! ([`SeqTracker`]); at the end each does a final sync, and the worker
//! counts what no recipient ever got.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{ConversationId, ErrorCode, Frame};
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, watch};

use crate::args::{Args, Scenario};
use crate::conn::{self, Conn, Session};
use crate::metrics::{Metrics, Snapshot};
use crate::tls::Tls;
use crate::track::{Seen, SeqTracker};

/// Connects (and logs in) at once per worker at most.
const CONNECT_CONCURRENCY: usize = 512;
/// Longest wait after the load for the answers to sends still in flight,
/// before the settle time and the final sync go ahead regardless.
const DRAIN_MAX: Duration = Duration::from_secs(120);

/// Messages per final sync page.
const SYNC_PAGE: u32 = 500;
/// First pause of a sender after the server refused a send as overloaded.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause between refused sends.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// What the users are told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Send at the rate and receive.
    Load,
    /// Stop sending; keep receiving.
    Settle,
    /// Fetch what is missing, report and end.
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Control {
    phase: Phase,
    /// Storms so far: each one makes every user drop its connection and
    /// resume on a new one.
    storms: u32,
}

/// Microseconds since the Unix epoch (all workers of a run share the
/// clock: they run on one machine).
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A simulated user taking part in a conversation.
struct Member {
    index: usize,
    username: String,
    /// Index into `--server` of the node it is connected to now.
    server: usize,
    source: Option<IpAddr>,
    session: Session,
    conversation: u64,
    target: pb::send_request::Target,
    /// Seconds between sends (0: as fast as the window allows).
    interval: f64,
    /// Seqs this user knows from setup (the creator of a group got the
    /// group's first notice while waiting for the creation reply).
    known: Option<u64>,
}

/// What a user knows at the end.
struct Outcome {
    conversation: u64,
    tracker: SeqTracker,
    problems: Vec<String>,
}

struct Shared {
    args: Arc<Args>,
    metrics: Arc<Metrics>,
    connects: Semaphore,
    text_pad: String,
    /// Starts every client_msg_id of this run: ids are unique per sender,
    /// and a later run may reuse the same users (`--user-prefix`).
    run_nonce: u32,
    /// Which node each user of this worker is connected to now (set once
    /// the conversations are planned), to tell cross-node deliveries.
    nodes: std::sync::OnceLock<Nodes>,
    /// With `--tls`: the client configuration each user's is made from.
    tls: Option<Tls>,
}

/// User id → the `--server` index it is connected to now.
struct Nodes {
    slot: HashMap<u64, usize>,
    now: Vec<std::sync::atomic::AtomicUsize>,
}

impl Nodes {
    fn of(&self, user: u64) -> Option<usize> {
        self.slot.get(&user).map(|&i| self.now[i].load(Relaxed))
    }

    fn moved(&self, user: u64, server: usize) {
        if let Some(&i) = self.slot.get(&user) {
            self.now[i].store(server, Relaxed);
        }
    }
}

/// Runs one worker's share of the scenario; `emit` gets a snapshot every
/// second. Returns the final snapshot (with verification results).
pub async fn run(
    args: Arc<Args>,
    worker: usize,
    mut emit: impl FnMut(&Snapshot),
) -> anyhow::Result<Snapshot> {
    let started = Instant::now();
    let metrics = Arc::new(Metrics::default());
    let (count, rate) = args.share(worker);
    let tls = (args.tls || args.ca_file.is_some())
        .then(|| {
            Tls::new(
                args.ca_file.as_deref(),
                &args.tls_server_name,
                2 * count + 16,
            )
        })
        .transpose()?;
    let shared = Arc::new(Shared {
        args: args.clone(),
        metrics: metrics.clone(),
        connects: Semaphore::new(CONNECT_CONCURRENCY),
        text_pad: "x".repeat(args.size),
        run_nonce: rand::random(),
        nodes: std::sync::OnceLock::new(),
        tls,
    });
    let prefix = args
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("lg{}", now_us() / 1_000_000 % 1_000_000_000));
    let mut timeline = Vec::new();
    let mut tick = Ticker::new(started);

    // Connect everyone at this worker's share of the ramp.
    let ramp = f64::from(args.ramp) / args.workers as f64;
    let mut connecting = Vec::with_capacity(count);
    // Connections wait for the last one to be up while heartbeating: a
    // ramp of 100,000 logins can outlast the server's heartbeat timeout.
    let settled = Arc::new(AtomicUsize::new(0));
    let (all_up, up_rx) = watch::channel(false);
    for i in 0..count {
        if ramp > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / ramp);
            while Instant::now() < due {
                let wait = due
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100));
                tokio::time::sleep(wait).await;
                tick.maybe(&metrics, &mut emit, &mut timeline);
            }
        }
        let global = worker * 1_000_000 + i;
        let username = format!("{prefix}w{worker}u{i}");
        let server = placement(&args, i) % args.server.len();
        let address = args.server[server];
        let source = args.source_addrs.as_ref().map(|s| s.0[global % s.0.len()]);
        let shared = shared.clone();
        let settled = settled.clone();
        let mut up_rx = up_rx.clone();
        connecting.push(tokio::spawn(async move {
            let permit = shared.connects.acquire().await.ok();
            let t = Instant::now();
            let result = conn::connect(
                address,
                source,
                &username,
                &shared.args.password,
                None,
                shared.tls.as_ref().map(Tls::for_user),
            )
            .await;
            drop(permit);
            settled.fetch_add(1, Relaxed);
            match result {
                Ok((mut c, session)) => {
                    shared
                        .metrics
                        .connect
                        .record(t.elapsed().as_micros() as u64);
                    Metrics::add(&shared.metrics.connections, 1);
                    if keep_alive(&mut c, session.heartbeat, &mut up_rx)
                        .await
                        .is_err()
                    {
                        Metrics::sub(&shared.metrics.connections, 1);
                        Metrics::add(&shared.metrics.connections_failed, 1);
                        eprintln!("worker {worker}: {username}: lost while the others connected");
                        return None;
                    }
                    Some((i, username, server, source, c, session))
                }
                Err(e) => {
                    Metrics::add(&shared.metrics.connections_failed, 1);
                    eprintln!("worker {worker}: {username}: {e:#}");
                    None
                }
            }
        }));
    }
    while settled.load(Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tick.maybe(&metrics, &mut emit, &mut timeline);
    }
    let _ = all_up.send(true);
    let mut established = Vec::with_capacity(count);
    for task in connecting {
        if let Some(c) = task.await.context("connect task")? {
            established.push(c);
        }
        tick.maybe(&metrics, &mut emit, &mut timeline);
    }

    let (control, rx) = watch::channel(Control {
        phase: Phase::Load,
        storms: 0,
    });
    let mut users = Vec::new();
    match args.scenario {
        Scenario::Idle => {
            for (_, _, _, _, c, session) in established {
                let rx = rx.clone();
                users.push(tokio::spawn(idle(c.into_inner(), session.heartbeat, rx)));
            }
        }
        Scenario::Direct | Scenario::Storm | Scenario::Group => {
            let members = plan_conversations(&args, rate, established, &metrics).await?;
            let nodes = Nodes {
                slot: members
                    .iter()
                    .enumerate()
                    .map(|(i, (m, _))| (m.session.user_id, i))
                    .collect(),
                now: members
                    .iter()
                    .map(|(m, _)| std::sync::atomic::AtomicUsize::new(m.server))
                    .collect(),
            };
            let _ = shared.nodes.set(nodes);
            for (member, c) in members {
                let shared = shared.clone();
                let rx = rx.clone();
                users.push(tokio::spawn(async move {
                    converse(member, c, rx, shared).await
                }));
            }
        }
    }
    let members = users.len() as u64;

    // Warm up, measure, (storm), settle.
    wait_for(
        Duration::from_secs(args.warmup),
        &metrics,
        &mut tick,
        &mut emit,
        &mut timeline,
    )
    .await;
    metrics.start_measuring();
    let measure_start = Instant::now();
    let acked_before = metrics.acked.load(Relaxed);
    let delivered_before = metrics.delivered.load(Relaxed);
    let mut storm_secs = 0.0;
    if args.scenario == Scenario::Storm {
        wait_for(
            Duration::from_secs(args.duration / 2),
            &metrics,
            &mut tick,
            &mut emit,
            &mut timeline,
        )
        .await;
        metrics.connect.reset();
        let before = metrics.reconnects.load(Relaxed);
        let storm_started = Instant::now();
        let _ = control.send(Control {
            phase: Phase::Load,
            storms: 1,
        });
        let deadline = storm_started + Duration::from_secs(120);
        while metrics.reconnects.load(Relaxed) < before + members && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            tick.maybe(&metrics, &mut emit, &mut timeline);
        }
        storm_secs = storm_started.elapsed().as_secs_f64();
        let rest = args.duration.saturating_sub(args.duration / 2);
        let rest = Duration::from_secs(rest).saturating_sub(storm_started.elapsed());
        wait_for(rest, &metrics, &mut tick, &mut emit, &mut timeline).await;
    } else {
        wait_for(
            Duration::from_secs(args.duration),
            &metrics,
            &mut tick,
            &mut emit,
            &mut timeline,
        )
        .await;
    }
    let measured_secs = measure_start.elapsed().as_secs_f64();
    let measured_acked = metrics.acked.load(Relaxed) - acked_before;
    let measured_delivered = metrics.delivered.load(Relaxed) - delivered_before;
    // (Read the storm count first: a borrow held across send() deadlocks.)
    let storms = control.borrow().storms;
    let _ = control.send(Control {
        phase: Phase::Settle,
        storms,
    });
    // A send still unanswered may yet be stored, after the final sync of
    // its recipient: wait for every answer first, or that message would
    // count as lost. Then give the last pushes the settle time to arrive.
    let drain_until = Instant::now() + DRAIN_MAX;
    while metrics.in_flight.load(Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tick.maybe(&metrics, &mut emit, &mut timeline);
    }
    let unanswered = metrics.in_flight.load(Relaxed);
    wait_for(
        Duration::from_secs(args.settle),
        &metrics,
        &mut tick,
        &mut emit,
        &mut timeline,
    )
    .await;
    let _ = control.send(Control {
        phase: Phase::Sync,
        storms,
    });

    // Verify: every seq up to each conversation's last is known to each of
    // its users.
    let mut outcomes = Vec::new();
    for user in users {
        if let Some(outcome) = user.await.context("user task")? {
            outcomes.push(outcome);
        }
        tick.maybe(&metrics, &mut emit, &mut timeline);
    }
    let mut last: HashMap<u64, u64> = HashMap::new();
    for o in &outcomes {
        let l = last.entry(o.conversation).or_default();
        *l = (*l).max(o.tracker.max_known());
    }
    let mut lost = 0;
    let mut problems = Vec::new();
    if unanswered > 0 {
        problems.push(format!(
            "{unanswered} send(s) still unanswered {} s after the load; the final sync went ahead",
            DRAIN_MAX.as_secs()
        ));
    }
    for o in outcomes {
        let missing = o.tracker.missing_upto(last[&o.conversation]);
        if missing > 0 {
            problems.push(format!(
                "conversation {}: a user never got {missing} message(s)",
                o.conversation
            ));
        }
        lost += missing;
        problems.extend(o.problems);
    }
    let mut snapshot = metrics.snapshot(started.elapsed().as_secs_f64());
    timeline.push((
        snapshot.t,
        snapshot.sent,
        snapshot.acked,
        snapshot.delivered,
    ));
    snapshot.done = true;
    snapshot.lost = lost;
    snapshot.unanswered = unanswered;
    snapshot.measured_acked = measured_acked;
    snapshot.measured_delivered = measured_delivered;
    snapshot.measured_secs = measured_secs;
    snapshot.storm_secs = storm_secs;
    snapshot.timeline = timeline;
    problems.truncate(20);
    snapshot.problems = problems;
    Ok(snapshot)
}

/// Request id of the heartbeats a connection sends while it waits for the
/// others to log in (below those a user's requests take later).
const WAITING_PING_ID: u64 = 3;

/// Heartbeats `c` until `up` turns true. What the server sends meanwhile
/// stays unread in the socket, for the user to handle once it starts.
async fn keep_alive(
    c: &mut Conn,
    heartbeat: Duration,
    up: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let every = heartbeat.mul_f64(0.8).max(Duration::from_millis(100));
    loop {
        if *up.borrow_and_update() {
            return Ok(());
        }
        tokio::select! {
            result = up.changed() => result.context("run gone")?,
            _ = tokio::time::sleep(every) => {
                c.send(Frame::new(WAITING_PING_ID, Body::Ping(pb::Ping {}))).await?;
            }
        }
    }
}

/// Which server a user goes to. With several, the users of a pair or
/// group go to consecutive servers (so to different nodes), except for a
/// `1 - --cross-node-fraction` share of pairs and groups whose users all
/// share one.
fn placement(args: &Args, i: usize) -> usize {
    let unit = args.unit();
    let (conversation, member) = (i / unit, i % unit);
    if args.scenario == Scenario::Idle || !spread(args, conversation) {
        conversation
    } else {
        conversation + member
    }
}

/// Whether conversation `n`'s users are spread over nodes: a fixed,
/// well-mixed choice of `--cross-node-fraction` of all conversations.
fn spread(args: &Args, n: usize) -> bool {
    // The fractional parts of n times the golden ratio are evenly spread.
    let x = (n as f64 * 0.618_033_988_749_894_9).fract();
    x < args.cross_node_fraction
}

/// Emits a snapshot once a second.
struct Ticker {
    started: Instant,
    next: Instant,
}

impl Ticker {
    fn new(started: Instant) -> Ticker {
        Ticker {
            started,
            next: started + Duration::from_secs(1),
        }
    }

    fn maybe(
        &mut self,
        metrics: &Metrics,
        emit: &mut impl FnMut(&Snapshot),
        timeline: &mut Vec<(f64, u64, u64, u64)>,
    ) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now + Duration::from_secs(1);
        let s = metrics.snapshot(now.duration_since(self.started).as_secs_f64());
        timeline.push((s.t, s.sent, s.acked, s.delivered));
        emit(&s);
    }
}

async fn wait_for(
    span: Duration,
    metrics: &Metrics,
    tick: &mut Ticker,
    emit: &mut impl FnMut(&Snapshot),
    timeline: &mut Vec<(f64, u64, u64, u64)>,
) {
    let until = Instant::now() + span;
    while Instant::now() < until {
        let step = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(100));
        tokio::time::sleep(step).await;
        tick.maybe(metrics, emit, timeline);
    }
}

/// Pairs users (direct, storm) or forms groups, and gives each its part of
/// the rate.
async fn plan_conversations(
    args: &Args,
    rate: f64,
    established: Vec<(usize, String, usize, Option<IpAddr>, Conn, Session)>,
    metrics: &Metrics,
) -> anyhow::Result<Vec<(Member, Conn)>> {
    // Users i of one conversation are i / unit alike (see `placement`).
    let unit = args.unit();
    let mut by_conversation: std::collections::BTreeMap<usize, Vec<_>> = Default::default();
    for e in established {
        by_conversation.entry(e.0 / unit).or_default().push(e);
    }
    // A conversation one of whose users could not connect is left out.
    let mut incomplete = 0;
    by_conversation.retain(|_, users| {
        let whole = users.len() == unit;
        if !whole {
            incomplete += users.len();
        }
        whole
    });
    metrics.connections.fetch_sub(incomplete as u64, Relaxed);
    let mut out = Vec::new();
    let senders = by_conversation.len() * unit;
    let per_sender = if senders == 0 {
        0.0
    } else {
        rate / senders as f64
    };
    let interval = if args.rate == 0 || per_sender <= 0.0 {
        0.0
    } else {
        1.0 / per_sender
    };
    for (_, mut group) in by_conversation {
        group.sort_by_key(|e| e.0);
        let ids: Vec<u64> = group.iter().map(|g| g.5.user_id).collect();
        let (conversation, targets) = if args.scenario == Scenario::Group {
            let body = Body::CreateGroup(pb::CreateGroupRequest {
                name: "loadgen".into(),
                member_ids: ids[1..].to_vec(),
            });
            let info = match conn::call(&mut group[0].4, 7, body).await? {
                Body::Group(info) => info,
                other => anyhow::bail!("creating a group failed: {other:?}"),
            };
            let target = pb::send_request::Target::ConversationId(info.conversation_id);
            (info.conversation_id, vec![target; unit])
        } else {
            let conv = ConversationId::direct(ids[0], ids[1])
                .context("user ids out of range")?
                .raw();
            let targets = vec![
                pb::send_request::Target::ToUser(ids[1]),
                pb::send_request::Target::ToUser(ids[0]),
            ];
            (conv, targets)
        };
        let first = out.len();
        for (g, target) in group.into_iter().zip(targets) {
            out.push(member(g, conversation, target, interval));
        }
        if args.scenario == Scenario::Group {
            out[first].0.known = Some(1);
        }
    }
    Ok(out)
}

fn member(
    (index, username, server, source, c, session): (
        usize,
        String,
        usize,
        Option<IpAddr>,
        Conn,
        Session,
    ),
    conversation: u64,
    target: pb::send_request::Target,
    interval: f64,
) -> (Member, Conn) {
    (
        Member {
            index,
            username,
            server,
            source,
            session,
            conversation,
            target,
            interval,
            known: None,
        },
        c,
    )
}

/// An idle user: answers nothing, pings at the heartbeat interval, holds
/// no buffer between pongs.
async fn idle(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    heartbeat: Duration,
    mut control: watch::Receiver<Control>,
) -> Option<Outcome> {
    use tokio::io::AsyncWriteExt;
    let ping = im_proto::codec::encode_to_bytes(&Frame::new(1, Body::Ping(pb::Ping {})));
    let every = heartbeat.mul_f64(0.8);
    let mut next = tokio::time::Instant::now() + every;
    loop {
        let mut scratch = [0u8; 256];
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() || control.borrow().phase == Phase::Sync {
                    return None;
                }
            }
            read = stream.read(&mut scratch) => {
                if matches!(read, Ok(0) | Err(_)) {
                    return None;
                }
            }
            _ = tokio::time::sleep_until(next) => {
                if stream.write_all(&ping).await.is_err() {
                    return None;
                }
                next += every;
            }
        }
    }
}

/// A user in a conversation, for the whole run.
async fn converse(
    mut m: Member,
    mut c: Conn,
    mut control: watch::Receiver<Control>,
    shared: Arc<Shared>,
) -> Option<Outcome> {
    let metrics = &shared.metrics;
    let mut state = State {
        tracker: SeqTracker::default(),
        pending: VecDeque::new(),
        unsure: Vec::new(),
        hinted: false,
        next_request: 100,
        counter: 0,
        problems: Vec::new(),
        resume_at: None,
        backoff: Duration::ZERO,
        orphans: 0,
    };
    if let Some(seq) = m.known {
        state.tracker.own(seq);
    }
    let mut storms = 0;
    loop {
        let ctl = *control.borrow();
        if ctl.storms > storms {
            // Everyone drops at once, then resumes with its token.
            storms = ctl.storms;
            // As a network failure drops it: a reset, no FIN handshake,
            // so no TIME_WAIT socket holds this source port afterwards.
            let _ = conn::tcp(c.get_ref()).set_zero_linger();
            drop(c);
            state.orphan_pending(metrics);
            match reconnect(&mut m, &shared).await {
                Some((fresh, session)) => {
                    m.session = session;
                    c = fresh;
                    Metrics::add(&metrics.reconnects, 1);
                    // Catch up, as a client does after every reconnect, then
                    // resend what the lost connection left unacknowledged.
                    if let Err(e) = sync(&m, &mut c, &mut state, &shared, true).await {
                        state
                            .problems
                            .push(format!("{}: catch-up failed: {e:#}", m.username));
                    } else if let Err(e) = resend_unsure(&m, &mut c, &mut state, &shared).await {
                        state
                            .problems
                            .push(format!("{}: resending failed: {e:#}", m.username));
                    }
                }
                None => return Some(state.outcome(&m, metrics)),
            }
            continue;
        }
        match ctl.phase {
            Phase::Load | Phase::Settle => {
                let sending = ctl.phase == Phase::Load;
                match drive(&m, &mut c, &mut state, &mut control, sending, &shared).await {
                    Ok(()) => {}
                    Err(e) => {
                        Metrics::add(&metrics.errors, 1);
                        state.orphan_pending(metrics);
                        eprintln!("{}: connection lost ({e:#}); resuming", m.username);
                        match reconnect(&mut m, &shared).await {
                            Some((fresh, session)) => {
                                m.session = session;
                                c = fresh;
                                if sync(&m, &mut c, &mut state, &shared, true).await.is_ok() {
                                    let _ = resend_unsure(&m, &mut c, &mut state, &shared).await;
                                }
                            }
                            None => return Some(state.outcome(&m, metrics)),
                        }
                    }
                }
            }
            Phase::Sync => {
                if let Err(e) = sync(&m, &mut c, &mut state, &shared, false).await {
                    state
                        .problems
                        .push(format!("{}: final sync failed: {e:#}", m.username));
                }
                let _ = SinkExt::<Frame>::close(&mut c).await;
                return Some(state.outcome(&m, metrics));
            }
        }
    }
}

struct State {
    tracker: SeqTracker,
    /// Unacknowledged sends on this connection.
    pending: VecDeque<Pending>,
    /// Sends left unacknowledged by a lost connection, to resend (flagged
    /// as resends) once the next one has caught up: (counter, send time).
    unsure: Vec<(u64, u64)>,
    /// A `SyncHint` arrived and its sync is due.
    hinted: bool,
    next_request: u64,
    counter: u64,
    problems: Vec<String>,
    /// After the server refused a send as overloaded: no sends before this.
    resume_at: Option<tokio::time::Instant>,
    /// The pause after the next refusal (doubles while refusals go on).
    backoff: Duration,
    /// Sends left unacknowledged on dropped connections: each may still
    /// be stored and pushed to the current connection as to another
    /// device of this user.
    orphans: u64,
}

impl State {
    /// The connection is gone: its unacknowledged sends become orphans,
    /// to be resent.
    fn orphan_pending(&mut self, metrics: &Metrics) {
        self.orphans += self.pending.len() as u64;
        for p in self.pending.drain(..) {
            if self.unsure.len() < MAX_UNSURE {
                self.unsure.push((p.counter, p.sent_us));
            } else {
                // Not resent: nothing will answer it.
                Metrics::sub(&metrics.in_flight, 1);
            }
        }
    }

    /// What the user knows at the end. Sends still unanswered are no
    /// longer in flight: nothing will answer them now.
    fn outcome(self, m: &Member, metrics: &Metrics) -> Outcome {
        Metrics::sub(
            &metrics.in_flight,
            (self.pending.len() + self.unsure.len()) as u64,
        );
        Outcome {
            conversation: m.conversation,
            tracker: self.tracker,
            problems: self.problems,
        }
    }
}

/// Resumes with the token: on the same node first, then (after a
/// failure) on the next one, as a client of a cluster does. Updates where
/// the member is connected.
async fn reconnect(m: &mut Member, shared: &Shared) -> Option<(Conn, Session)> {
    let mut delay = Duration::from_millis(50);
    let servers = &shared.args.server;
    for attempt in 0..50 {
        let server = (m.server + attempt) % servers.len();
        let permit = shared.connects.acquire().await.ok();
        let t = Instant::now();
        let result = conn::connect(
            servers[server],
            m.source,
            &m.username,
            &shared.args.password,
            Some(&m.session.token),
            m.session.tls.clone(),
        )
        .await;
        drop(permit);
        match result {
            Ok(ok) => {
                shared
                    .metrics
                    .connect
                    .record(t.elapsed().as_micros() as u64);
                m.server = server;
                if let Some(nodes) = shared.nodes.get() {
                    nodes.moved(m.session.user_id, server);
                }
                return Some(ok);
            }
            Err(e) => {
                Metrics::add(&shared.metrics.errors, 1);
                eprintln!("{}: reconnect failed: {e:#}", m.username);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
    None
}

/// Sends and receives until the control changes or the connection fails.
async fn drive(
    m: &Member,
    c: &mut Conn,
    state: &mut State,
    control: &mut watch::Receiver<Control>,
    sending: bool,
    shared: &Shared,
) -> anyhow::Result<()> {
    let window = shared.args.window;
    let saturate = m.interval == 0.0;
    let interval = Duration::from_secs_f64(m.interval.max(1e-6));
    // Spread the first sends over one interval.
    let mut next_send = tokio::time::Instant::now() + interval.mul_f64(rand::random::<f64>());
    let ping_every = m.session.heartbeat.mul_f64(0.8);
    let mut last_write = tokio::time::Instant::now();
    // The futures below live across iterations: this loop turns once per
    // frame, and creating and dropping three timers and a watch
    // notification each turn cost 7% of the generator's user CPU.
    let changed = control.changed();
    tokio::pin!(changed);
    let pacing = tokio::time::sleep_until(next_send);
    tokio::pin!(pacing);
    let pause = tokio::time::sleep_until(last_write);
    tokio::pin!(pause);
    let heartbeat = tokio::time::sleep_until(last_write + ping_every);
    tokio::pin!(heartbeat);
    loop {
        if let Some(at) = state.resume_at {
            if pause.deadline() != at {
                pause.as_mut().reset(at);
            }
        }
        let paused = state.resume_at.is_some();
        let can_send = sending && !paused && state.pending.len() < window;
        tokio::select! {
            biased;
            changed = &mut changed => {
                changed.context("control gone")?;
                return Ok(());
            }
            frame = c.next() => {
                let frame = frame.context("server closed the connection")??;
                handle(m, state, frame, shared)?;
                // The server skipped pushes while this connection's queue
                // was full: fetch what they carried, as a client does.
                while state.hinted {
                    state.hinted = false;
                    sync(m, c, state, shared, true).await?;
                }
            }
            _ = std::future::ready(()), if can_send && saturate => {
                send(m, c, state, shared).await?;
                last_write = tokio::time::Instant::now();
            }
            _ = &mut pause, if paused => {
                state.resume_at = None;
            }
            _ = &mut pacing, if sending && !saturate => {
                if !paused && state.pending.len() < window {
                    send(m, c, state, shared).await?;
                    last_write = tokio::time::Instant::now();
                }
                next_send += interval;
                let now = tokio::time::Instant::now();
                if next_send + Duration::from_secs(1) < now {
                    next_send = now; // Far behind: do not burst to catch up.
                }
                pacing.as_mut().reset(next_send);
            }
            _ = &mut heartbeat => {
                // Due a heartbeat interval after the last write, whenever
                // that was: the timer is only moved when it fires.
                let due = last_write + ping_every;
                if due <= tokio::time::Instant::now() {
                    let id = state.next_request;
                    state.next_request += 1;
                    c.send(Frame::new(id, Body::Ping(pb::Ping {}))).await?;
                    last_write = tokio::time::Instant::now();
                }
                heartbeat.as_mut().reset(last_write + ping_every);
            }
        }
    }
}

/// A send waiting for its ack.
struct Pending {
    request_id: u64,
    /// When it was first sent, in µs since the epoch.
    sent_us: u64,
    /// The sender's counter of the send (with `sent_us`, what rebuilds it).
    counter: u64,
    /// Whether this is a resend (its ack latency is not a sample).
    resend: bool,
}

/// Unsure sends kept for resending per user at most (more are only
/// counted as orphans).
const MAX_UNSURE: usize = 1024;

/// Resends, with `resend` set, every send a lost connection left without
/// an ack: each is stored once, whether or not the first attempt was.
async fn resend_unsure(
    m: &Member,
    c: &mut Conn,
    state: &mut State,
    shared: &Shared,
) -> anyhow::Result<()> {
    let mut unsure = std::mem::take(&mut state.unsure).into_iter();
    while let Some((counter, sent_us)) = unsure.next() {
        if let Err(e) = submit(m, c, state, shared, counter, sent_us, true).await {
            // Kept for the next connection, still counted as in flight.
            state.unsure.push((counter, sent_us));
            state.unsure.extend(unsure);
            return Err(e);
        }
        Metrics::add(&shared.metrics.resent, 1);
    }
    Ok(())
}

/// The `counter`-th send of member `m`, first sent at `sent_us` (its text
/// carries both, and its client_msg_id the counter).
fn send_request(
    m: &Member,
    shared: &Shared,
    counter: u64,
    sent_us: u64,
    resend: bool,
) -> pb::SendRequest {
    let pad = &shared.text_pad;
    let mut text = format!("{sent_us}:{}:{counter}:", m.index);
    let fill = shared.args.size.saturating_sub(text.len());
    text.push_str(&pad[..fill.min(pad.len())]);
    pb::SendRequest {
        target: Some(m.target),
        client_msg_id: format!("{:08x}-{}-{}", shared.run_nonce, m.index, counter + 1),
        content: Some(pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text { text })),
        }),
        resend,
    }
}

/// Writes the `counter`-th send and keeps it pending until its ack.
async fn submit(
    m: &Member,
    c: &mut Conn,
    state: &mut State,
    shared: &Shared,
    counter: u64,
    sent_us: u64,
    resend: bool,
) -> anyhow::Result<()> {
    let id = state.next_request;
    state.next_request += 1;
    let request = send_request(m, shared, counter, sent_us, resend);
    c.send(Frame::new(id, Body::Send(request))).await?;
    if !resend {
        // A resend was counted when first sent, and stayed counted while
        // it waited to be resent.
        Metrics::add(&shared.metrics.in_flight, 1);
    }
    state.pending.push_back(Pending {
        request_id: id,
        sent_us,
        counter,
        resend,
    });
    Ok(())
}

async fn send(m: &Member, c: &mut Conn, state: &mut State, shared: &Shared) -> anyhow::Result<()> {
    let counter = state.counter;
    state.counter += 1;
    submit(m, c, state, shared, counter, now_us(), false).await?;
    Metrics::add(&shared.metrics.sent, 1);
    Ok(())
}

/// The send time carried at the start of a message's text.
fn sent_at(message: &pb::Message) -> Option<u64> {
    match message.content.as_ref()?.kind.as_ref()? {
        pb::content::Kind::Text(t) => t.text.split(':').next()?.parse().ok(),
        _ => None,
    }
}

fn handle(m: &Member, state: &mut State, frame: Frame, shared: &Shared) -> anyhow::Result<()> {
    let metrics = &*shared.metrics;
    let Some(body) = frame.body else {
        return Ok(());
    };
    match body {
        Body::SendAck(ack) => {
            if let Some(pos) = state
                .pending
                .iter()
                .position(|p| p.request_id == frame.request_id)
            {
                if let Some(p) = state.pending.remove(pos) {
                    Metrics::sub(&metrics.in_flight, 1);
                    state.backoff = Duration::ZERO;
                    if metrics.measuring() && !p.resend {
                        metrics.ack.record(now_us().saturating_sub(p.sent_us));
                    }
                }
            }
            Metrics::add(&metrics.acked, 1);
            if ack.duplicate {
                // A resend of something already stored: its seq may be
                // known already (from the catch-up sync, or its push to
                // this connection as to another device of this user).
                Metrics::add(&metrics.resends_found, 1);
                if !state.tracker.knows(ack.seq) {
                    state.tracker.own(ack.seq);
                }
            } else if !state.tracker.own(ack.seq) {
                state.problems.push(format!(
                    "{}: seq {} acknowledged but already known",
                    m.username, ack.seq
                ));
                Metrics::add(&metrics.duplicated, 1);
            }
        }
        Body::Message(message) if message.conversation_id == m.conversation => {
            let echo = message.sender_id == m.session.user_id;
            if echo {
                // The server pushes a message to the sender's other
                // connections, never to the one that sent it. A send left
                // unacknowledged on a dropped connection may still be
                // stored after this one logged in: that copy is expected,
                // once per orphaned send at most.
                if state.orphans == 0 {
                    Metrics::add(&metrics.duplicated, 1);
                    state.problems.push(format!(
                        "{}: own message {} pushed back to the connection that sent it",
                        m.username, message.seq
                    ));
                    return Ok(());
                }
                state.orphans -= 1;
            }
            match state.tracker.deliver(message.seq, true) {
                // An echo is not a delivery: the sender had the message.
                Seen::New if echo => {}
                Seen::New => Metrics::add(&metrics.delivered, 1),
                Seen::Overlap => {
                    // Raced a catch-up sync; a client drops it by seq.
                    Metrics::add(&metrics.overlaps, 1);
                    return Ok(());
                }
                Seen::Reordered => {
                    // Pushes from several nodes may cross; a client
                    // following the display rule still shows them in
                    // order, so this is counted, not failed.
                    if !echo {
                        Metrics::add(&metrics.delivered, 1);
                    }
                    Metrics::add(&metrics.reordered, 1);
                }
                Seen::Duplicate => {
                    Metrics::add(&metrics.duplicated, 1);
                    if state.problems.len() < 5 {
                        state.problems.push(format!(
                            "{}: seq {} delivered twice",
                            m.username, message.seq
                        ));
                    }
                }
            }
            if !echo {
                // Where the sender is now (it may have moved after a
                // failure of its node).
                let cross = shared
                    .nodes
                    .get()
                    .and_then(|n| n.of(message.sender_id))
                    .map(|server| server != m.server);
                if cross == Some(true) {
                    Metrics::add(&metrics.cross_node, 1);
                }
                if metrics.measuring() {
                    if let Some(sent) = sent_at(&message) {
                        let us = now_us().saturating_sub(sent);
                        metrics.deliver.record(us);
                        match cross {
                            Some(true) => metrics.deliver_cross_node.record(us),
                            Some(false) => metrics.deliver_same_node.record(us),
                            None => {}
                        }
                    }
                }
            }
        }
        Body::Error(e) => {
            let refused =
                e.code == ErrorCode::Overloaded as i32 || e.code == ErrorCode::RateLimited as i32;
            if refused {
                // As a client does: back off, then go on sending.
                Metrics::add(&metrics.rejected, 1);
                state.backoff = (state.backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                // At least as long as the server asked (`retry_after_ms`).
                let asked = Duration::from_millis(u64::from(e.retry_after_ms));
                let pause = state
                    .backoff
                    .mul_f64(0.5 + rand::random::<f64>())
                    .max(asked);
                state.resume_at = Some(tokio::time::Instant::now() + pause);
            } else {
                Metrics::add(&metrics.errors, 1);
            }
            if let Some(pos) = state
                .pending
                .iter()
                .position(|p| p.request_id == frame.request_id)
            {
                state.pending.remove(pos);
                Metrics::sub(&metrics.in_flight, 1);
            }
            if e.fatal {
                anyhow::bail!("fatal error {}: {}", e.code, e.message);
            }
        }
        Body::SyncHint(_) => {
            Metrics::add(&metrics.sync_hints, 1);
            state.hinted = true;
        }
        Body::Message(message) => {
            Metrics::add(&metrics.misrouted, 1);
            if state.problems.len() < 5 {
                state.problems.push(format!(
                    "{}: got seq {} of conversation {}, which it is not in",
                    m.username, message.seq, message.conversation_id
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Fetches every message of the conversation above what is known without a
/// gap. `catch_up`: after a reconnect (storm), else the final check.
async fn sync(
    m: &Member,
    c: &mut Conn,
    state: &mut State,
    shared: &Shared,
    catch_up: bool,
) -> anyhow::Result<()> {
    let metrics = &*shared.metrics;
    let mut cursor = state.tracker.contiguous();
    loop {
        let id = state.next_request;
        state.next_request += 1;
        let body = Body::Sync(pb::SyncRequest {
            cursors: vec![pb::ConvCursor {
                conversation_id: m.conversation,
                seq: cursor,
            }],
            limit: SYNC_PAGE,
        });
        c.send(Frame::new(id, body)).await?;
        let page = loop {
            let frame = c.next().await.context("closed during sync")??;
            if frame.request_id == id {
                match frame.body {
                    Some(Body::SyncResponse(r)) => break r,
                    other => anyhow::bail!("sync answered with {other:?}"),
                }
            }
            // Pushes and late acks keep counting meanwhile.
            handle(m, state, frame, shared)?;
        };
        let mut highest = cursor;
        // What retention removed is skipped, and counted apart from losses.
        for expired in page
            .expired
            .iter()
            .filter(|e| e.conversation_id == m.conversation)
        {
            Metrics::add(&metrics.expired, state.tracker.expire(expired.seq));
            highest = highest.max(expired.seq);
        }
        for message in &page.messages {
            highest = highest.max(message.seq);
            if message.sender_id == m.session.user_id {
                state.tracker.own_synced(message.seq);
            } else if state.tracker.deliver(message.seq, false) == Seen::New {
                Metrics::add(&metrics.delivered, 1);
                if !catch_up {
                    Metrics::add(&metrics.recovered, 1);
                }
            }
        }
        if !page.has_more || highest == cursor {
            return Ok(());
        }
        cursor = highest;
    }
}
