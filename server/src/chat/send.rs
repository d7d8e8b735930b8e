//! The send pipeline: validated sends are spread over lanes by
//! conversation; each lane appends them to storage in batches, keeps several
//! batches in flight, and completes them strictly in submission order:
//! ack to the sender, then a push to every other device of every
//! participant. One conversation always uses one lane and the store applies
//! batches in call order, so seqs follow arrival order and pushes leave in
//! seq order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use dashmap::DashMap;
use futures::stream::{FuturesOrdered, StreamExt};
use im_proto::ids::ConversationKind;
use im_proto::pb::frame::Body;
use im_proto::pb::{self, content, send_request};
use im_proto::{ConversationId, Frame, codec};
use tokio::sync::{mpsc, oneshot};

use super::{ChatCounters, ChatError, Inner};
use crate::net::ConnRef;
use crate::store::{
    AppendOutcome, AppendRejection, AppendResult, NewMessage, Store, StoreError, UserId,
};

/// Longest client_msg_id accepted.
const MAX_CLIENT_MSG_ID: usize = 64;
/// Longest URL, MIME type or file name accepted in media references.
const MAX_URL: usize = 2048;
const MAX_LABEL: usize = 255;
/// Bytes of a frame reserved besides a message's content and client id, so
/// that every message fits in a push, a sync page and a conversation
/// summary.
const MESSAGE_OVERHEAD: usize = 1024;

/// Bytes of sends admitted and not answered yet, per lane and per sender,
/// so that no lane's queue and no single user can take more than their
/// share of the node's pending work.
pub(crate) struct SendBudget {
    lanes: Vec<CachePadded<AtomicUsize>>,
    per_lane: usize,
    users: DashMap<UserId, usize>,
    per_user: usize,
}

impl SendBudget {
    pub(crate) fn new(lanes: usize, per_lane: usize, per_user: usize) -> Arc<Self> {
        Arc::new(SendBudget {
            lanes: (0..lanes)
                .map(|_| CachePadded::new(AtomicUsize::new(0)))
                .collect(),
            per_lane,
            users: DashMap::new(),
            per_user,
        })
    }

    /// Takes `bytes` from the lane's and the user's budget, or `None` when
    /// either would go past its limit.
    fn admit(self: &Arc<Self>, lane: usize, user: UserId, bytes: usize) -> Option<SendPermit> {
        let queued = &self.lanes[lane];
        if queued.fetch_add(bytes, Ordering::AcqRel) + bytes > self.per_lane {
            queued.fetch_sub(bytes, Ordering::AcqRel);
            return None;
        }
        let mut pending = self.users.entry(user).or_insert(0);
        if *pending + bytes > self.per_user {
            drop(pending);
            queued.fetch_sub(bytes, Ordering::AcqRel);
            self.users.remove_if(&user, |_, p| *p == 0);
            return None;
        }
        *pending += bytes;
        Some(SendPermit {
            budget: self.clone(),
            lane,
            user,
            bytes,
        })
    }

    /// Bytes admitted to a lane and not answered yet.
    pub(crate) fn lane_bytes(&self, lane: usize) -> usize {
        self.lanes[lane].load(Ordering::Relaxed)
    }
}

/// A send's share of the [`SendBudget`], given back when it is answered
/// (dropped), whatever the answer.
pub(crate) struct SendPermit {
    budget: Arc<SendBudget>,
    lane: usize,
    user: UserId,
    bytes: usize,
}

impl Drop for SendPermit {
    fn drop(&mut self) {
        self.budget.lanes[self.lane].fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.users.remove_if_mut(&self.user, |_, pending| {
            *pending = pending.saturating_sub(self.bytes);
            *pending == 0
        });
    }
}

/// Who is waiting for an append.
pub(crate) enum Origin {
    /// A client's SendRequest: answer with an ack; do not push the message
    /// back to the sending connection. The permit is the send's share of
    /// the budget until then.
    Client {
        conn: ConnRef,
        request_id: u64,
        _permit: SendPermit,
    },
    /// A notice written by the server (group changes).
    Internal(oneshot::Sender<Result<(), ChatError>>),
}

/// One message on its way through a lane.
pub(crate) struct SendJob {
    pub origin: Origin,
    pub message: NewMessage,
    /// Users to push to besides the conversation's members (e.g. members
    /// just removed, who should see why).
    pub extra_recipients: Vec<UserId>,
}

/// What a send weighs in the budget: its content and id, as queued.
fn send_cost(message: &NewMessage) -> usize {
    prost::Message::encoded_len(&message.content)
        + message.client_msg_id.len()
        + std::mem::size_of::<SendJob>()
}

/// Spreads conversations evenly over lanes.
fn lane_of(conversation: ConversationId, lanes: usize) -> usize {
    // The murmur3 finalizer: every input bit affects the low bits.
    let mut x = conversation.raw();
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    (x % lanes as u64) as usize
}

impl<S: Store> Inner<S> {
    /// Validates a SendRequest and queues it, or answers with an error.
    pub(crate) fn submit_send(
        &self,
        conn: ConnRef,
        user: UserId,
        request_id: u64,
        req: pb::SendRequest,
    ) {
        if let Err(e) = self.limits.message(user) {
            self.limits.count(&e);
            return self.answer(conn, e.to_frame(request_id));
        }
        let message = match self.validate_send(user, req) {
            Ok(m) => m,
            Err(e) => return self.answer(conn, e.to_frame(request_id)),
        };
        let lane = lane_of(message.conversation, self.lanes.len());
        let bytes = send_cost(&message);
        let Some(permit) = self.send_budget.admit(lane, user, bytes) else {
            return self.answer(conn, ChatError::Overloaded.to_frame(request_id));
        };
        let job = SendJob {
            origin: Origin::Client {
                conn,
                request_id,
                _permit: permit,
            },
            message,
            extra_recipients: Vec::new(),
        };
        // A full (or closed) lane drops the job, and with it the permit.
        if self.lanes[lane].try_send(job).is_err() {
            self.answer(conn, ChatError::Overloaded.to_frame(request_id));
        }
    }

    /// Appends a server notice through the conversation's lane and waits
    /// until it is stored and pushed.
    pub(crate) async fn append_notice(
        &self,
        conversation: ConversationId,
        notice: pb::GroupNotice,
        extra_recipients: Vec<UserId>,
    ) -> Result<(), ChatError> {
        let (tx, rx) = oneshot::channel();
        let lane = lane_of(conversation, self.lanes.len());
        let job = SendJob {
            origin: Origin::Internal(tx),
            message: NewMessage {
                sender: 0,
                conversation,
                client_msg_id: String::new(),
                content: pb::Content {
                    kind: Some(content::Kind::Notice(notice)),
                },
                server_time_ms: im_proto::now_ms(),
                resend: false,
            },
            extra_recipients,
        };
        // Notices wait for room rather than fail: the change they describe
        // is already stored.
        self.lanes[lane]
            .send(job)
            .await
            .map_err(|_| ChatError::Overloaded)?;
        rx.await.map_err(|_| ChatError::Internal)?
    }

    fn validate_send(&self, user: UserId, req: pb::SendRequest) -> Result<NewMessage, ChatError> {
        let conversation = match req.target {
            Some(send_request::Target::ToUser(to)) => ConversationId::direct(user, to)
                .ok_or_else(|| ChatError::invalid("invalid to_user"))?,
            Some(send_request::Target::ConversationId(raw)) => ConversationId::from_raw(raw)
                .ok_or_else(|| ChatError::invalid("invalid conversation_id"))?,
            None => {
                return Err(ChatError::invalid(
                    "target (to_user or conversation_id) is required",
                ));
            }
        };
        if req.client_msg_id.is_empty() || req.client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(ChatError::invalid("client_msg_id must be 1 to 64 bytes"));
        }
        let content = req.content.unwrap_or_default();
        match &content.kind {
            Some(content::Kind::Text(t)) => {
                if t.text.is_empty() || t.text.len() > self.config.max_text_bytes {
                    return Err(ChatError::invalid(format!(
                        "text must be 1 to {} bytes",
                        self.config.max_text_bytes
                    )));
                }
            }
            Some(content::Kind::Image(m) | content::Kind::File(m)) => validate_media(m)?,
            Some(content::Kind::Notice(_)) => {
                return Err(ChatError::invalid("notices are written by the server only"));
            }
            None => return Err(ChatError::invalid("content is required")),
        }
        // Room for the ids and times a stored message adds, and for the
        // summary around it in a conversation list, within one frame.
        let size = prost::Message::encoded_len(&content) + req.client_msg_id.len();
        let max = self.config.max_frame_bytes.saturating_sub(MESSAGE_OVERHEAD);
        if size > max {
            return Err(ChatError::invalid(format!(
                "message of {size} bytes exceeds the maximum of {max}"
            )));
        }
        Ok(NewMessage {
            sender: user,
            conversation,
            client_msg_id: req.client_msg_id,
            content,
            server_time_ms: im_proto::now_ms(),
            resend: req.resend,
        })
    }

    /// Completes one append batch in order: acks, then pushes.
    async fn complete(
        &self,
        origins: Vec<(Origin, Vec<UserId>)>,
        results: Result<Vec<AppendResult>, StoreError>,
    ) {
        let results = match results {
            Ok(r) if r.len() == origins.len() => r,
            Ok(r) => {
                tracing::error!(
                    expected = origins.len(),
                    got = r.len(),
                    "store answered a batch partly"
                );
                return self.fail_all(origins, ChatError::Internal);
            }
            Err(e) => return self.fail_all(origins, e.into()),
        };
        self.count_batch(&origins, &results);
        for ((origin, extra), result) in origins.into_iter().zip(results) {
            match origin {
                Origin::Client {
                    conn, request_id, ..
                } => {
                    let frame = match &result {
                        Ok(AppendOutcome::Stored(m)) => Frame::new(
                            request_id,
                            Body::SendAck(pb::SendAck {
                                message_id: m.message_id,
                                conversation_id: m.conversation_id,
                                seq: m.seq,
                                server_time_ms: m.server_time_ms,
                                duplicate: false,
                            }),
                        ),
                        Ok(AppendOutcome::Duplicate(ack)) => Frame::new(
                            request_id,
                            Body::SendAck(pb::SendAck {
                                message_id: ack.message_id,
                                conversation_id: ack.conversation_id,
                                seq: ack.seq,
                                server_time_ms: ack.server_time_ms,
                                duplicate: true,
                            }),
                        ),
                        Err(rejection) => rejection_error(*rejection).to_frame(request_id),
                    };
                    self.answer(conn, frame);
                    match result {
                        Ok(AppendOutcome::Stored(message)) => {
                            self.fan_out(message, Some(conn), &extra).await;
                        }
                        Ok(AppendOutcome::Duplicate(ack)) => {
                            self.hint_recipients(ack.conversation_id, Some(conn), &extra)
                                .await;
                        }
                        Err(_) => {}
                    }
                }
                Origin::Internal(waiter) => {
                    let outcome = match result {
                        Ok(AppendOutcome::Stored(message)) => {
                            self.fan_out(message, None, &extra).await;
                            Ok(())
                        }
                        Ok(AppendOutcome::Duplicate(_)) => Ok(()),
                        Err(rejection) => {
                            tracing::error!(%rejection, "server notice refused by the store");
                            Err(ChatError::Internal)
                        }
                    };
                    let _ = waiter.send(outcome);
                }
            }
        }
    }

    /// Counts a stored batch before it is answered, so the totals already
    /// include a message when its sender sees the ack.
    fn count_batch(&self, origins: &[(Origin, Vec<UserId>)], results: &[AppendResult]) {
        let (mut stored, mut acked, mut duplicates) = (0, 0, 0);
        for ((origin, _), result) in origins.iter().zip(results) {
            let client = matches!(origin, Origin::Client { .. });
            match result {
                Ok(AppendOutcome::Stored(_)) => {
                    stored += 1;
                    acked += u64::from(client);
                }
                Ok(AppendOutcome::Duplicate(_)) => {
                    acked += u64::from(client);
                    duplicates += u64::from(client);
                }
                Err(_) => {}
            }
        }
        let counters = &self.counters;
        ChatCounters::add(&counters.appended, stored);
        ChatCounters::add(&counters.acked, acked);
        ChatCounters::add(&counters.duplicates, duplicates);
    }

    fn fail_all(&self, origins: Vec<(Origin, Vec<UserId>)>, error: ChatError) {
        for (origin, _) in origins {
            match origin {
                Origin::Client {
                    conn, request_id, ..
                } => self.answer(conn, error.to_frame(request_id)),
                Origin::Internal(tx) => {
                    let _ = tx.send(Err(ChatError::Internal));
                }
            }
        }
    }

    /// Pushes a stored message to every participant's devices (and to
    /// `extra` users), except the connection that sent it.
    async fn fan_out(&self, message: pb::Message, origin: Option<ConnRef>, extra: &[UserId]) {
        let Some(conversation) = ConversationId::from_raw(message.conversation_id) else {
            return;
        };
        let frame = codec::encode_to_bytes(&Frame::new(0, Body::Message(message)));
        self.push_to_participants(conversation, frame, origin, extra)
            .await;
    }

    /// A resend answered as a duplicate: its original was stored, but may
    /// never have been pushed (its ack was lost, or the replicas had not
    /// confirmed it yet). The participants' devices are told to sync the
    /// conversation, which costs one sync per resend and loses nothing.
    async fn hint_recipients(&self, conversation: u64, origin: Option<ConnRef>, extra: &[UserId]) {
        let Some(conversation) = ConversationId::from_raw(conversation) else {
            return;
        };
        let hint = pb::SyncHint {
            conversation_ids: vec![conversation.raw()],
            presence: false,
        };
        let frame = codec::encode_to_bytes(&Frame::new(0, Body::SyncHint(hint)));
        self.push_to_participants(conversation, frame, origin, extra)
            .await;
    }

    /// Pushes `frame` to the devices of the conversation's participants
    /// (and of `extra` users), except `origin`.
    async fn push_to_participants(
        &self,
        conversation: ConversationId,
        frame: bytes::Bytes,
        origin: Option<ConnRef>,
        extra: &[UserId],
    ) {
        let conv = conversation.raw();
        // Delivery that lags behind holds this lane here (the shards wake
        // it as they drain) rather than growing their queues.
        self.out.wait_room().await;
        let mut pushed = 0;
        match conversation.kind() {
            ConversationKind::Direct { lo, hi } => {
                let users = [lo, hi];
                let users = if lo == hi { &users[..1] } else { &users[..] };
                pushed += self.deliver(users, &frame, conv, origin).await;
            }
            ConversationKind::Group(group) => match self.group_members(group).await {
                Ok(members) => {
                    let broadcast = self
                        .cluster
                        .as_ref()
                        .filter(|c| members.len() > c.group_broadcast_members());
                    match broadcast {
                        // Every other node pushes to its own members.
                        Some(cluster) => {
                            for &user in members.iter() {
                                pushed += self.push_to_user(user, &frame, conv, origin);
                            }
                            cluster.broadcast(&frame, conv, group).await;
                        }
                        None => pushed += self.deliver(&members, &frame, conv, origin).await,
                    }
                }
                Err(e) => {
                    // Recipients catch up by sync; the message is stored.
                    tracing::warn!(group, error = %e, "cannot load members for fan-out");
                }
            },
        }
        if !extra.is_empty() {
            pushed += self.deliver(extra, &frame, conv, origin).await;
        }
        ChatCounters::add(&self.counters.pushed, pushed);
    }
}

fn rejection_error(rejection: AppendRejection) -> ChatError {
    match rejection {
        AppendRejection::NotMember => ChatError::Forbidden("not a member of this conversation"),
        AppendRejection::NoSuchUser => ChatError::NotFound("no such user"),
        AppendRejection::Overloaded => ChatError::Overloaded,
        AppendRejection::Failed => ChatError::Internal,
        AppendRejection::DedupBehind => ChatError::ResendUnverified,
    }
}

fn validate_media(m: &pb::Media) -> Result<(), ChatError> {
    if m.url.is_empty() || m.url.len() > MAX_URL {
        return Err(ChatError::invalid("media url must be 1 to 2048 bytes"));
    }
    if m.mime_type.len() > MAX_LABEL || m.name.len() > MAX_LABEL {
        return Err(ChatError::invalid(
            "mime_type and name must be at most 255 bytes",
        ));
    }
    if let Some(t) = &m.thumbnail {
        if t.url.len() > MAX_URL {
            return Err(ChatError::invalid(
                "thumbnail url must be at most 2048 bytes",
            ));
        }
    }
    Ok(())
}

/// Runs one lane until its queue closes and its batches complete.
pub(crate) async fn run_lane<S: Store>(inner: Arc<Inner<S>>, mut rx: mpsc::Receiver<SendJob>) {
    let batch = inner.config.send_batch.max(1);
    let max_in_flight = inner.config.send_batches_in_flight.max(1);
    let mut in_flight = FuturesOrdered::new();
    let mut jobs = Vec::with_capacity(batch);
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            biased;
            Some((origins, results)) = in_flight.next(), if !in_flight.is_empty() => {
                inner.complete(origins, results).await;
            }
            n = rx.recv_many(&mut jobs, batch), if open && in_flight.len() < max_in_flight => {
                if n == 0 {
                    open = false;
                    continue;
                }
                let mut messages = Vec::with_capacity(jobs.len());
                let mut origins = Vec::with_capacity(jobs.len());
                for job in jobs.drain(..) {
                    messages.push(job.message);
                    origins.push((job.origin, job.extra_recipients));
                }
                let append = inner.store.append_batch(messages);
                in_flight.push_back(async move { (origins, append.await) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_budget_is_shared_per_lane_and_per_user_and_given_back() {
        let budget = SendBudget::new(2, 1000, 600);
        let a1 = budget.admit(0, 1, 500).expect("room");
        assert!(
            budget.admit(1, 1, 200).is_none(),
            "user 1 is over its share"
        );
        let b = budget.admit(0, 2, 500).expect("user 2 has its own share");
        assert!(budget.admit(0, 3, 10).is_none(), "lane 0 is full");
        assert!(budget.admit(1, 3, 10).is_some(), "lane 1 is not");
        assert_eq!(budget.lane_bytes(0), 1000);
        drop(a1);
        assert_eq!(budget.lane_bytes(0), 500);
        let a2 = budget.admit(1, 1, 600).expect("given back on drop");
        drop((a2, b));
        assert_eq!(budget.lane_bytes(0) + budget.lane_bytes(1), 0);
        assert!(
            budget.users.is_empty(),
            "no entry for users without pending sends"
        );
    }

    #[test]
    fn lanes_spread_conversations() {
        let lanes = 4;
        let mut counts = [0usize; 4];
        for a in 1..200u64 {
            let c = ConversationId::direct(a, a + 1).unwrap();
            counts[lane_of(c, lanes)] += 1;
        }
        assert!(counts.iter().all(|&n| n > 20), "{counts:?}");
    }
}
