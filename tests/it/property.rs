//! A state-machine property test: several clients drive a real node (either
//! store) with random sequences of valid and invalid frames, and after
//! every run:
//!
//! - every request got exactly one reply while its connection lived, and
//!   only the frames meant to be fatal closed a connection;
//! - every conversation's seqs are dense and every acknowledged send is in
//!   it once, with the seq its ack gave (resends included);
//! - nobody saw a message of a conversation it never belonged to, and a
//!   user outside a group cannot read it;
//! - a bystander that only ever does valid things was never disturbed.
//!
//! CI runs a few cases (`PROPTEST_CASES`, 8 by default, up to 40 steps
//! each). The long run is
//! `PROPTEST_CASES=500 IM_PROPERTY_STEPS=200 cargo test --release -p im-tests --test it property::`
//! (add `IM_TEST_STORE=pipeline` for the production store).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use im_proto::pb::{self, frame::Body};
use im_proto::{ConversationId, ErrorCode, Frame, FrameCodec};
use im_tests::{PASSWORD, TestServer};
use proptest::prelude::*;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Simulated users that misbehave at random.
const USERS: usize = 3;
/// How long any reply may take.
const REPLY_WITHIN: Duration = Duration::from_secs(10);

/// Who a send goes to.
#[derive(Debug, Clone)]
enum To {
    User(usize),
    Group(usize),
    /// A random conversation id (usually nobody's).
    Raw(u64),
    /// A user id that does not exist.
    Nobody,
}

/// One step of a run.
#[derive(Debug, Clone)]
enum Step {
    /// `count` sends pipelined at once; `reuse` resends the sender's
    /// previous client_msg_id instead of a new one (flagged as a resend or
    /// not).
    Send {
        who: usize,
        to: To,
        count: usize,
        text: usize,
        reuse: Option<bool>,
    },
    /// A send with a bad field.
    BadSend {
        who: usize,
        flaw: u8,
    },
    Sync {
        who: usize,
        group: Option<usize>,
        cursor: u64,
    },
    History {
        who: usize,
        group: usize,
        before: u64,
    },
    List {
        who: usize,
    },
    CreateGroup {
        who: usize,
        members: Vec<usize>,
    },
    Add {
        who: usize,
        group: usize,
        users: Vec<usize>,
    },
    Remove {
        who: usize,
        group: usize,
        users: Vec<usize>,
    },
    Leave {
        who: usize,
        group: usize,
    },
    Ack {
        who: usize,
        group: usize,
        seq: u64,
        read: bool,
    },
    Presence {
        who: usize,
        users: Vec<usize>,
    },
    Lookup {
        who: usize,
    },
    /// A second login on the session.
    Relogin {
        who: usize,
    },
    /// A frame whose body this server does not know.
    UnknownBody {
        who: usize,
    },
    /// An empty frame (no request id, no body).
    Empty {
        who: usize,
    },
    /// A request with request id 0.
    IdZero {
        who: usize,
    },
    /// Bytes that are no Protobuf frame: fatal.
    Garbage {
        who: usize,
    },
    /// A length prefix above the maximum: fatal.
    Oversize {
        who: usize,
    },
}

fn who() -> impl Strategy<Value = usize> {
    0..USERS
}

fn users() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(0..USERS + 1, 0..4)
}

fn step() -> impl Strategy<Value = Step> {
    let to = prop_oneof![
        4 => (0..USERS).prop_map(To::User),
        4 => (0..4usize).prop_map(To::Group),
        1 => any::<u64>().prop_map(To::Raw),
        1 => Just(To::Nobody),
    ];
    prop_oneof![
        8 => (who(), to, 1..6usize, prop_oneof![3 => 1..200usize, 1 => 1000..20_000usize],
              prop::option::weighted(0.2, any::<bool>()))
            .prop_map(|(who, to, count, text, reuse)| Step::Send { who, to, count, text, reuse }),
        2 => (who(), 0..6u8).prop_map(|(who, flaw)| Step::BadSend { who, flaw }),
        2 => (who(), prop::option::of(0..4usize), 0..8u64)
            .prop_map(|(who, group, cursor)| Step::Sync { who, group, cursor }),
        1 => (who(), 0..4usize, 0..10u64).prop_map(|(who, group, before)| Step::History { who, group, before }),
        1 => who().prop_map(|who| Step::List { who }),
        2 => (who(), users()).prop_map(|(who, members)| Step::CreateGroup { who, members }),
        2 => (who(), 0..4usize, users()).prop_map(|(who, group, users)| Step::Add { who, group, users }),
        1 => (who(), 0..4usize, users()).prop_map(|(who, group, users)| Step::Remove { who, group, users }),
        1 => (who(), 0..4usize).prop_map(|(who, group)| Step::Leave { who, group }),
        1 => (who(), 0..4usize, 0..10u64, any::<bool>())
            .prop_map(|(who, group, seq, read)| Step::Ack { who, group, seq, read }),
        1 => (who(), users()).prop_map(|(who, users)| Step::Presence { who, users }),
        1 => who().prop_map(|who| Step::Lookup { who }),
        1 => who().prop_map(|who| Step::Relogin { who }),
        1 => who().prop_map(|who| Step::UnknownBody { who }),
        1 => who().prop_map(|who| Step::Empty { who }),
        1 => who().prop_map(|who| Step::IdZero { who }),
        1 => who().prop_map(|who| Step::Garbage { who }),
        1 => who().prop_map(|who| Step::Oversize { who }),
    ]
}

fn steps() -> usize {
    std::env::var("IM_PROPERTY_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 40,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_frames_never_break_the_node_or_anyone_else(
        run in prop::collection::vec(step(), 1..=steps())
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        if let Err(e) = runtime.block_on(execute(run)) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// A connection as the driver sees it: frames go out through `framed`'s
/// sink, everything received comes back through `inbox` (a reader task
/// reads continuously, so no push ever waits for the driver).
struct Client {
    name: String,
    id: u64,
    sink: FramedWrite<OwnedWriteHalf, FrameCodec>,
    inbox: mpsc::UnboundedReceiver<Option<Frame>>,
    next_id: u64,
    /// Every message seen (pushed or synced): (conversation, seq, cmid).
    seen: Vec<(u64, u64, String)>,
    /// The connection was closed by the server.
    closed: bool,
}

impl Client {
    async fn open(
        addr: std::net::SocketAddr,
        name: &str,
        register: bool,
    ) -> Result<Client, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (read, write) = stream.into_split();
        let mut stream = FramedRead::new(read, FrameCodec::new(16 << 20));
        let sink = FramedWrite::new(write, FrameCodec::new(16 << 20));
        let (tx, inbox) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(frame) = stream.next().await {
                if tx.send(frame.ok()).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
        let mut client = Client {
            name: name.to_string(),
            id: 0,
            sink,
            inbox,
            next_id: 1,
            seen: Vec::new(),
            closed: false,
        };
        let auth = if register {
            Body::Register(pb::RegisterRequest {
                username: name.into(),
                password: PASSWORD.into(),
                device_name: String::new(),
            })
        } else {
            Body::Login(pb::LoginRequest {
                username: name.into(),
                password: PASSWORD.into(),
                device_name: String::new(),
            })
        };
        match client.call(auth).await? {
            Body::AuthOk(ok) => client.id = ok.user_id,
            other => return Err(format!("{name} could not log in: {other:?}")),
        }
        Ok(client)
    }

    async fn write(&mut self, frame: Frame) -> Result<(), String> {
        self.sink
            .send(frame)
            .await
            .map_err(|e| format!("{}: write failed: {e}", self.name))
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let _ = SinkExt::<Frame>::flush(&mut self.sink).await;
        self.sink
            .get_mut()
            .write_all(bytes)
            .await
            .map_err(|e| format!("{}: raw write failed: {e}", self.name))
    }

    fn request(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends requests (pipelined) and collects exactly one reply to each;
    /// pushes seen meanwhile are recorded. A fatal error or a closed
    /// connection before all replies came is an error.
    async fn exchange(&mut self, bodies: Vec<Body>) -> Result<Vec<Body>, String> {
        let mut ids = Vec::with_capacity(bodies.len());
        for body in bodies {
            let id = self.request();
            self.sink
                .feed(Frame::new(id, body))
                .await
                .map_err(|e| e.to_string())?;
            ids.push(id);
        }
        SinkExt::<Frame>::flush(&mut self.sink)
            .await
            .map_err(|e| e.to_string())?;
        let mut replies: HashMap<u64, Body> = HashMap::new();
        while replies.len() < ids.len() {
            let frame = self.next_frame().await?;
            if frame.request_id == 0 {
                self.note_push(&frame)?;
                continue;
            }
            if !ids.contains(&frame.request_id) {
                return Err(format!(
                    "{}: reply to unknown request {}",
                    self.name, frame.request_id
                ));
            }
            let body = frame
                .body
                .ok_or_else(|| format!("{}: reply without a body", self.name))?;
            if let Body::Error(e) = &body {
                if e.fatal {
                    return Err(format!(
                        "{}: fatal error on a valid request: {e:?}",
                        self.name
                    ));
                }
            }
            if replies.insert(frame.request_id, body).is_some() {
                return Err(format!(
                    "{}: two replies to request {}",
                    self.name, frame.request_id
                ));
            }
        }
        Ok(ids
            .into_iter()
            .map(|id| replies.remove(&id).unwrap())
            .collect())
    }

    async fn call(&mut self, body: Body) -> Result<Body, String> {
        Ok(self.exchange(vec![body]).await?.remove(0))
    }

    async fn next_frame(&mut self) -> Result<Frame, String> {
        match tokio::time::timeout(REPLY_WITHIN, self.inbox.recv()).await {
            Ok(Some(Some(frame))) => Ok(frame),
            Ok(_) => {
                self.closed = true;
                Err(format!("{}: connection closed", self.name))
            }
            Err(_) => Err(format!("{}: no frame within {REPLY_WITHIN:?}", self.name)),
        }
    }

    fn note_push(&mut self, frame: &Frame) -> Result<(), String> {
        match &frame.body {
            Some(Body::Message(m)) => {
                self.seen
                    .push((m.conversation_id, m.seq, m.client_msg_id.clone()))
            }
            Some(Body::Error(e)) if e.fatal => {
                return Err(format!("{}: pushed a fatal error: {e:?}", self.name));
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads whatever arrived without waiting.
    fn drain(&mut self) -> Result<(), String> {
        while let Ok(next) = self.inbox.try_recv() {
            match next {
                Some(frame) if frame.request_id == 0 => self.note_push(&frame)?,
                Some(frame) => {
                    return Err(format!("{}: unexpected reply {:?}", self.name, frame));
                }
                None => self.closed = true,
            }
        }
        Ok(())
    }
}

/// What the run has established, from the replies.
#[derive(Default)]
struct Model {
    /// Groups created: group id, conversation id.
    groups: Vec<(u64, u64)>,
    /// Current members of each group.
    members: HashMap<u64, BTreeSet<u64>>,
    /// Users that ever were members of each group.
    ever: HashMap<u64, HashSet<u64>>,
    /// Acked sends: (conversation, sender, cmid) → seq.
    acked: HashMap<(u64, u64, String), u64>,
    /// Seqs acked per conversation (and to which send).
    seqs: HashMap<u64, BTreeMap<u64, (u64, String)>>,
    /// Each user's last client_msg_id.
    last_cmid: HashMap<usize, String>,
    counter: u64,
}

fn text(len: usize) -> Option<pb::Content> {
    Some(pb::Content {
        kind: Some(pb::content::Kind::Text(pb::Text {
            text: "p".repeat(len.max(1)),
        })),
    })
}

fn code(body: &Body) -> Option<ErrorCode> {
    match body {
        Body::Error(e) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

/// Non-fatal codes a request may legitimately get back.
fn expected_error(body: &Body) -> Result<(), String> {
    match code(body) {
        None => Ok(()),
        Some(
            ErrorCode::InvalidArgument
            | ErrorCode::Forbidden
            | ErrorCode::NotFound
            | ErrorCode::AlreadyAuthenticated
            | ErrorCode::Overloaded,
        ) => Ok(()),
        Some(other) => Err(format!("unexpected error {other:?}: {body:?}")),
    }
}

async fn execute(run: Vec<Step>) -> Result<(), String> {
    let server = TestServer::start_with(|c| c.max_frame_bytes = 32 * 1024).await;
    let addr = server.addr;
    let tag = format!("{:x}", rand_tag());
    let mut clients = Vec::new();
    for i in 0..USERS {
        clients.push(Client::open(addr, &format!("p{tag}u{i}"), true).await?);
    }
    // The bystanders: one only ever sends to the other, valid frames only.
    let mut calm = Client::open(addr, &format!("p{tag}calm"), true).await?;
    let mut calm_peer = Client::open(addr, &format!("p{tag}peer"), true).await?;
    let ids: Vec<u64> = clients.iter().map(|c| c.id).collect();
    let mut model = Model::default();

    for step in run {
        apply(&step, &mut clients, &ids, &mut model, addr).await?;
        // The bystander goes on as if nothing happened.
        let cmid = format!("calm{}", model.counter);
        model.counter += 1;
        let reply = calm
            .call(Body::Send(pb::SendRequest {
                target: Some(pb::send_request::Target::ToUser(calm_peer.id)),
                client_msg_id: cmid,
                content: text(10),
                resend: false,
            }))
            .await?;
        if !matches!(reply, Body::SendAck(_)) {
            return Err(format!(
                "the bystander's send failed after {step:?}: {reply:?}"
            ));
        }
        for c in clients.iter_mut() {
            c.drain()?;
        }
        calm_peer.drain()?;
    }

    check(&mut clients, &ids, &model).await?;
    // The bystanders were never cut off, and the peer got every message.
    calm.drain()?;
    calm_peer.drain()?;
    if calm.closed || calm_peer.closed {
        return Err("a bystander was disconnected".into());
    }
    server_shutdown(server).await;
    Ok(())
}

async fn server_shutdown(mut server: TestServer) {
    server.shutdown().await;
    if let Some(worker) = server.worker.take() {
        worker.shutdown().await;
    }
}

fn rand_tag() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() & 0xffff_ffff
}

fn target(to: &To, ids: &[u64], model: &Model) -> pb::send_request::Target {
    use pb::send_request::Target;
    match to {
        To::User(u) => Target::ToUser(ids[*u]),
        To::Group(g) => match model.groups.get(*g) {
            Some(&(_, conv)) => Target::ConversationId(conv),
            None => {
                Target::ConversationId(ConversationId::group(1_000_000 + *g as u64).unwrap().raw())
            }
        },
        To::Raw(raw) => Target::ConversationId(*raw),
        To::Nobody => Target::ToUser(1_999_999_999),
    }
}

/// Users by index; an index past the end is a user that does not exist.
fn user_ids(users: &[usize], ids: &[u64]) -> Vec<u64> {
    users
        .iter()
        .map(|&u| ids.get(u).copied().unwrap_or(1_999_999_998))
        .collect()
}

fn group_of(model: &Model, g: usize) -> u64 {
    model
        .groups
        .get(g)
        .map_or(1_000_000 + g as u64, |&(id, _)| id)
}

async fn apply(
    step: &Step,
    clients: &mut [Client],
    ids: &[u64],
    model: &mut Model,
    addr: std::net::SocketAddr,
) -> Result<(), String> {
    let who = match step {
        Step::Send { who, .. }
        | Step::BadSend { who, .. }
        | Step::Sync { who, .. }
        | Step::History { who, .. }
        | Step::List { who }
        | Step::CreateGroup { who, .. }
        | Step::Add { who, .. }
        | Step::Remove { who, .. }
        | Step::Leave { who, .. }
        | Step::Ack { who, .. }
        | Step::Presence { who, .. }
        | Step::Lookup { who }
        | Step::Relogin { who }
        | Step::UnknownBody { who }
        | Step::Empty { who }
        | Step::IdZero { who }
        | Step::Garbage { who }
        | Step::Oversize { who } => *who,
    };
    let me = ids[who];
    let client = &mut clients[who];
    match step {
        Step::Send {
            to,
            count,
            text: len,
            reuse,
            ..
        } => {
            let target = target(to, ids, model);
            let mut bodies = Vec::new();
            let mut cmids = Vec::new();
            for _ in 0..*count {
                let (cmid, resend) = match (reuse, model.last_cmid.get(&who)) {
                    (Some(flag), Some(last)) => (last.clone(), *flag),
                    _ => {
                        model.counter += 1;
                        (format!("c{}-{}", who, model.counter), false)
                    }
                };
                model.last_cmid.insert(who, cmid.clone());
                cmids.push(cmid.clone());
                bodies.push(Body::Send(pb::SendRequest {
                    target: Some(target),
                    client_msg_id: cmid,
                    content: text(*len),
                    resend,
                }));
            }
            let replies = client.exchange(bodies).await?;
            for (cmid, reply) in cmids.into_iter().zip(replies) {
                match reply {
                    Body::SendAck(ack) => {
                        let key = (ack.conversation_id, me, cmid.clone());
                        if let Some(&seq) = model.acked.get(&key) {
                            if !ack.duplicate || ack.seq != seq {
                                return Err(format!(
                                    "resend of {cmid} acked as {ack:?}, first seq {seq}"
                                ));
                            }
                            continue;
                        }
                        // A first ack may still say duplicate when a resend
                        // raced it within one pipelined burst; it must then
                        // name a seq nobody else holds.
                        let by_seq = model.seqs.entry(ack.conversation_id).or_default();
                        if let Some(holder) = by_seq.get(&ack.seq) {
                            if *holder != (me, cmid.clone()) {
                                return Err(format!(
                                    "seq {} acked twice: {holder:?} and {cmid}",
                                    ack.seq
                                ));
                            }
                        }
                        by_seq.insert(ack.seq, (me, cmid.clone()));
                        model.acked.insert(key, ack.seq);
                    }
                    other => expected_error(&other)?,
                }
            }
        }
        Step::BadSend { flaw, .. } => {
            use pb::send_request::Target;
            let mut request = pb::SendRequest {
                target: Some(Target::ToUser(ids[0])),
                client_msg_id: "bad".into(),
                content: text(5),
                resend: false,
            };
            match flaw {
                0 => request.target = None,
                1 => request.client_msg_id = String::new(),
                2 => request.client_msg_id = "x".repeat(65),
                3 => request.content = None,
                // Fits the 32 KiB frame, not the room a message may take in it.
                4 => request.content = text(31_900),
                _ => {
                    request.content = Some(pb::Content {
                        kind: Some(pb::content::Kind::Notice(pb::GroupNotice::default())),
                    })
                }
            }
            let reply = client.call(Body::Send(request)).await?;
            if code(&reply) != Some(ErrorCode::InvalidArgument) {
                return Err(format!("a bad send (flaw {flaw}) got {reply:?}"));
            }
        }
        Step::Sync { group, cursor, .. } => {
            let conv = match group {
                Some(g) => model.groups.get(*g).map_or(u64::MAX >> 1, |&(_, c)| c),
                None => ConversationId::direct(me, ids[(who + 1) % USERS])
                    .unwrap()
                    .raw(),
            };
            let reply = client
                .call(Body::Sync(pb::SyncRequest {
                    cursors: vec![pb::ConvCursor {
                        conversation_id: conv,
                        seq: *cursor,
                    }],
                    limit: 50,
                }))
                .await?;
            match reply {
                Body::SyncResponse(page) => {
                    for m in page.messages {
                        client
                            .seen
                            .push((m.conversation_id, m.seq, m.client_msg_id));
                    }
                }
                other => expected_error(&other)?,
            }
        }
        Step::History { group, before, .. } => {
            let conv = model.groups.get(*group).map_or(1, |&(_, c)| c);
            let reply = client
                .call(Body::History(pb::HistoryRequest {
                    conversation_id: conv,
                    before_seq: *before,
                    limit: 20,
                }))
                .await?;
            match reply {
                Body::HistoryResponse(page) => {
                    for m in page.messages {
                        client
                            .seen
                            .push((m.conversation_id, m.seq, m.client_msg_id));
                    }
                }
                other => expected_error(&other)?,
            }
        }
        Step::List { .. } => {
            let reply = client
                .call(Body::ListConversations(pb::ListConversationsRequest {
                    after_conversation_id: 0,
                    limit: 0,
                }))
                .await?;
            match &reply {
                Body::ConversationList(list) => {
                    for c in &list.conversations {
                        if c.unread_count != c.last_seq.saturating_sub(c.read_seq) {
                            return Err(format!("unread is not last_seq - read_seq: {c:?}"));
                        }
                    }
                }
                other => expected_error(other)?,
            }
        }
        Step::CreateGroup { members, .. } => {
            let reply = client
                .call(Body::CreateGroup(pb::CreateGroupRequest {
                    name: "prop".into(),
                    member_ids: user_ids(members, ids),
                }))
                .await?;
            match reply {
                Body::Group(g) => {
                    let mut all: BTreeSet<u64> = user_ids(members, ids).into_iter().collect();
                    all.insert(me);
                    if all.iter().any(|u| !ids.contains(u)) {
                        return Err(format!("a group with an unknown member was created: {g:?}"));
                    }
                    model
                        .ever
                        .entry(g.group_id)
                        .or_default()
                        .extend(all.iter().copied());
                    model.members.insert(g.group_id, all);
                    model.groups.push((g.group_id, g.conversation_id));
                }
                other => expected_error(&other)?,
            }
        }
        Step::Add { group, users, .. } => {
            let group_id = group_of(model, *group);
            let wanted = user_ids(users, ids);
            let reply = client
                .call(Body::AddMembers(pb::AddMembersRequest {
                    group_id,
                    user_ids: wanted.clone(),
                }))
                .await?;
            match reply {
                Body::Group(g) => {
                    let members = model.members.entry(g.group_id).or_default();
                    if !members.contains(&me) {
                        return Err(format!("a non-member added members: {g:?}"));
                    }
                    members.extend(wanted.iter().copied());
                    model.ever.entry(g.group_id).or_default().extend(wanted);
                }
                other => expected_error(&other)?,
            }
        }
        Step::Remove { group, users, .. } => {
            let group_id = group_of(model, *group);
            let gone = user_ids(users, ids);
            let reply = client
                .call(Body::RemoveMembers(pb::RemoveMembersRequest {
                    group_id,
                    user_ids: gone.clone(),
                }))
                .await?;
            match reply {
                Body::Group(g) => {
                    let members = model.members.entry(g.group_id).or_default();
                    for u in gone {
                        members.remove(&u);
                    }
                }
                other => expected_error(&other)?,
            }
        }
        Step::Leave { group, .. } => {
            let group_id = group_of(model, *group);
            let reply = client
                .call(Body::LeaveGroup(pb::LeaveGroupRequest { group_id }))
                .await?;
            match reply {
                Body::Done(_) => {
                    model.members.entry(group_id).or_default().remove(&me);
                }
                other => expected_error(&other)?,
            }
        }
        Step::Ack {
            group, seq, read, ..
        } => {
            let conv = model.groups.get(*group).map_or(
                ConversationId::direct(me, ids[(who + 1) % USERS])
                    .unwrap()
                    .raw(),
                |&(_, c)| c,
            );
            let kind = if *read {
                pb::ReceiptKind::Read
            } else {
                pb::ReceiptKind::Delivered
            };
            let reply = client
                .call(Body::Ack(pb::AckRequest {
                    conversation_id: conv,
                    seq: *seq,
                    kind: kind as i32,
                }))
                .await?;
            expected_error(&reply)?;
        }
        Step::Presence { users, .. } => {
            let reply = client
                .call(Body::PresenceSubscribe(pb::PresenceSubscribeRequest {
                    user_ids: user_ids(users, ids),
                }))
                .await?;
            if !matches!(reply, Body::PresenceSnapshot(_)) {
                expected_error(&reply)?;
            }
        }
        Step::Lookup { .. } => {
            let reply = client
                .call(Body::LookupUsers(pb::LookupUsersRequest {
                    usernames: vec![client.name.clone(), "nobody-here".into()],
                    user_ids: vec![me, 0, u64::MAX],
                }))
                .await?;
            match reply {
                Body::UserList(list) if list.users.iter().all(|u| u.user_id == me) => {}
                other => return Err(format!("lookup answered {other:?}")),
            }
        }
        Step::Relogin { .. } => {
            let reply = client
                .call(Body::Login(pb::LoginRequest {
                    username: client.name.clone(),
                    password: PASSWORD.into(),
                    device_name: String::new(),
                }))
                .await?;
            if code(&reply) != Some(ErrorCode::AlreadyAuthenticated) {
                return Err(format!("a second login got {reply:?}"));
            }
        }
        Step::UnknownBody { .. } => {
            // Field 99 of Frame: a body this server does not know.
            let id = client.request();
            let mut bytes = Vec::new();
            prost::encoding::uint64::encode(1, &id, &mut bytes);
            prost::encoding::bytes::encode(99, &vec![1u8, 2, 3], &mut bytes);
            let mut raw = (bytes.len() as u32).to_be_bytes().to_vec();
            raw.extend(bytes);
            client.write_raw(&raw).await?;
            let reply = wait_reply(client, id).await?;
            if code(&reply) != Some(ErrorCode::InvalidArgument) {
                return Err(format!("an unknown body got {reply:?}"));
            }
        }
        Step::Empty { .. } => {
            client.write_raw(&0u32.to_be_bytes()).await?;
            let reply = wait_reply(client, 0).await?;
            if code(&reply) != Some(ErrorCode::InvalidArgument) {
                return Err(format!("an empty frame got {reply:?}"));
            }
        }
        Step::IdZero { .. } => {
            let list = Body::ListConversations(pb::ListConversationsRequest::default());
            client.write(Frame::new(0, list)).await?;
            let reply = wait_reply(client, 0).await?;
            if code(&reply) != Some(ErrorCode::InvalidArgument) {
                return Err(format!("request id 0 got {reply:?}"));
            }
        }
        Step::Garbage { .. } | Step::Oversize { .. } => {
            let raw: Vec<u8> = if matches!(step, Step::Garbage { .. }) {
                vec![0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]
            } else {
                (64u32 << 20).to_be_bytes().to_vec()
            };
            client.write_raw(&raw).await?;
            // The connection ends with one fatal error; then the user logs
            // in again and goes on.
            loop {
                match client.next_frame().await {
                    Ok(frame) => match frame.body {
                        Some(Body::Error(e)) if e.fatal => break,
                        Some(Body::Message(m)) => {
                            client
                                .seen
                                .push((m.conversation_id, m.seq, m.client_msg_id))
                        }
                        _ => {}
                    },
                    Err(_) if client.closed => {
                        return Err(format!("{}: closed without a fatal error", client.name));
                    }
                    Err(e) => return Err(e),
                }
            }
            let seen = std::mem::take(&mut client.seen);
            let name = client.name.clone();
            *client = Client::open(addr, &name, false).await?;
            client.seen = seen;
        }
    }
    Ok(())
}

/// Skips pushes until the frame with `request_id` (0: the next non-message
/// frame) arrives.
async fn wait_reply(client: &mut Client, request_id: u64) -> Result<Body, String> {
    loop {
        let frame = client.next_frame().await?;
        if frame.request_id == request_id {
            if let Some(Body::Message(m)) = &frame.body {
                client
                    .seen
                    .push((m.conversation_id, m.seq, m.client_msg_id.clone()));
                continue;
            }
            return frame.body.ok_or_else(|| "reply without a body".to_string());
        }
        client.note_push(&frame)?;
    }
}

/// The invariants after a run.
async fn check(clients: &mut [Client], ids: &[u64], model: &Model) -> Result<(), String> {
    for c in clients.iter_mut() {
        c.drain()?;
    }
    // Nobody saw a conversation it never belonged to.
    for c in clients.iter() {
        for (conv, seq, _) in &c.seen {
            let id =
                ConversationId::from_raw(*conv).ok_or("a message with a bad conversation id")?;
            let belongs = match id.kind() {
                im_proto::ids::ConversationKind::Direct { lo, hi } => c.id == lo || c.id == hi,
                im_proto::ids::ConversationKind::Group(g) => {
                    model.ever.get(&g).is_some_and(|m| m.contains(&c.id))
                }
            };
            if !belongs {
                return Err(format!(
                    "{} saw seq {seq} of conversation {conv}, not its own",
                    c.name
                ));
            }
        }
    }
    // Every conversation with acked sends: dense, and each ack in place.
    for (&conv, acked) in &model.seqs {
        let reader = match ConversationId::from_raw(conv).map(|c| c.kind()) {
            Some(im_proto::ids::ConversationKind::Direct { lo, .. }) => {
                ids.iter().position(|&u| u == lo)
            }
            Some(im_proto::ids::ConversationKind::Group(g)) => model
                .members
                .get(&g)
                .and_then(|m| m.iter().find_map(|u| ids.iter().position(|i| i == u))),
            None => None,
        };
        let Some(reader) = reader else {
            continue; // nobody of ours can read it any more
        };
        let all = sync_all(&mut clients[reader], conv).await?;
        let seqs: Vec<u64> = all.keys().copied().collect();
        if let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) {
            if seqs.len() as u64 != last - first + 1 {
                return Err(format!("conversation {conv} has gaps: {seqs:?}"));
            }
            for (&seq, (sender, cmid)) in acked.range(first..) {
                match all.get(&seq) {
                    Some((s, m)) if s == sender && m == cmid => {}
                    other => {
                        return Err(format!(
                            "acked seq {seq} of {conv} ({cmid} from {sender}) reads as {other:?}"
                        ));
                    }
                }
            }
        }
    }
    // Someone outside a group cannot read it.
    for (&group, members) in &model.members {
        let Some(conv) = ConversationId::group(group).map(|c| c.raw()) else {
            continue;
        };
        for (i, c) in clients.iter_mut().enumerate() {
            if members.contains(&ids[i]) {
                continue;
            }
            let reply = c
                .call(Body::History(pb::HistoryRequest {
                    conversation_id: conv,
                    before_seq: 0,
                    limit: 10,
                }))
                .await?;
            if code(&reply) != Some(ErrorCode::Forbidden) {
                return Err(format!(
                    "{} outside group {group} read it: {reply:?}",
                    c.name
                ));
            }
        }
    }
    Ok(())
}

/// Every message of a conversation the client may see: seq → (sender,
/// client_msg_id).
async fn sync_all(client: &mut Client, conv: u64) -> Result<BTreeMap<u64, (u64, String)>, String> {
    let mut all = BTreeMap::new();
    let mut cursor = 0;
    loop {
        let reply = client
            .call(Body::Sync(pb::SyncRequest {
                cursors: vec![pb::ConvCursor {
                    conversation_id: conv,
                    seq: cursor,
                }],
                limit: 500,
            }))
            .await?;
        let Body::SyncResponse(page) = reply else {
            return Err(format!("{} cannot sync {conv}: {reply:?}", client.name));
        };
        for m in &page.messages {
            if all
                .insert(m.seq, (m.sender_id, m.client_msg_id.clone()))
                .is_some()
            {
                return Err(format!("seq {} of {conv} returned twice", m.seq));
            }
            cursor = cursor.max(m.seq);
        }
        if !page.has_more || page.messages.is_empty() {
            return Ok(all);
        }
    }
}
