//! Catching up after a (re)connect: renew the presence subscription, list
//! every conversation, and sync those with messages newer than the local
//! cursor. The messages themselves reach the application through the
//! connection task, which feeds every `SyncResponse` into the same delivery
//! path as live pushes; this module only decides what to ask for.

use std::sync::Arc;
use std::time::Duration;

use im_proto::pb::{self, frame::Body};
use tokio::sync::mpsc;

use crate::shared::{Link, Shared, lock};
use crate::{ClientError, Event};

/// Most cursors the server accepts in one `SyncRequest`.
pub(crate) const MAX_CURSORS: usize = 256;
/// Catch-up attempts on one connection before the link is declared ready
/// anyway (a later reconnect or [`Client::sync`](crate::Client::sync)
/// tries again).
const CATCH_UP_ATTEMPTS: u32 = 3;

/// Runs once per authenticated connection `generation`, next to the
/// connection task; aborted if the connection is lost first.
pub(crate) async fn catch_up(shared: Arc<Shared>, events: mpsc::Sender<Event>, generation: u64) {
    renew_presence(&shared, &events).await;

    let mut messages = 0;
    if shared.config.catch_up {
        let mut attempt = 0;
        loop {
            match full_sync(&shared).await {
                Ok(n) => {
                    messages = n;
                    break;
                }
                // The connection is gone; the next one catches up instead.
                Err(ClientError::Disconnected | ClientError::Closed) => return,
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "catch-up sync failed");
                    if attempt >= CATCH_UP_ATTEMPTS {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250) * attempt).await;
                }
            }
        }
    }

    let became_ready = shared.link.send_if_modified(|link| {
        if *link == (Link::Up { generation }) {
            *link = Link::Ready { generation };
            true
        } else {
            false
        }
    });
    if became_ready {
        let _ = events.send(Event::Resynced { messages }).await;
    }
}

/// Subscribes to presence again (the subscription belongs to the
/// connection) and reports the snapshot as presence events.
async fn renew_presence(shared: &Shared, events: &mpsc::Sender<Event>) {
    let subscription = lock(&shared.presence).clone();
    if subscription.is_empty() {
        return;
    }
    let body = Body::PresenceSubscribe(pb::PresenceSubscribeRequest {
        user_ids: subscription,
    });
    match shared.call(body, shared.config.request_timeout).await {
        Ok(Body::PresenceSnapshot(snapshot)) => {
            for presence in snapshot.users {
                if events.send(Event::Presence(presence)).await.is_err() {
                    break;
                }
            }
        }
        Ok(_) => tracing::warn!("unexpected reply to the presence subscription"),
        Err(e) => tracing::warn!(error = %e, "renewing the presence subscription failed"),
    }
}

/// What the server said this connection missed (merged `SyncHint`s).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Missed {
    /// Every conversation (the hint named none).
    pub all: bool,
    pub conversations: std::collections::BTreeSet<u64>,
    pub presence: bool,
}

impl Missed {
    /// Adds a hint.
    pub fn add(&mut self, hint: &pb::SyncHint) {
        if hint.conversation_ids.is_empty() {
            self.all = true;
            self.conversations.clear();
        } else if !self.all {
            self.conversations.extend(&hint.conversation_ids);
        }
        self.presence |= hint.presence;
    }
}

/// After a `SyncHint`: renews presence if presence changes were skipped,
/// and syncs what the hint names from the local cursors (everything
/// behind, when it named no conversation). The messages reach the
/// application through the connection task like any others.
pub(crate) async fn resync(shared: Arc<Shared>, events: mpsc::Sender<Event>, missed: Missed) {
    if missed.presence {
        renew_presence(&shared, &events).await;
    }
    for attempt in 1..=CATCH_UP_ATTEMPTS {
        let result = if missed.all {
            full_sync(&shared).await
        } else {
            // The last seq is unknown: page until the server has nothing
            // more.
            let wanted: Vec<(u64, u64)> = missed
                .conversations
                .iter()
                .map(|&c| (c, u64::MAX))
                .collect();
            sync_behind(&shared, wanted).await
        };
        match result {
            Ok(n) => {
                tracing::debug!(messages = n, "synced after a hint");
                return;
            }
            // The connection is gone; the next one catches up instead.
            Err(ClientError::Disconnected | ClientError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "sync after a hint failed");
                tokio::time::sleep(Duration::from_millis(250) * attempt).await;
            }
        }
    }
}

/// Lists all conversations and syncs every one whose last seq is above the
/// delivered cursor. Returns how many messages the syncs returned.
pub(crate) async fn full_sync(shared: &Shared) -> Result<usize, ClientError> {
    let limit = shared.config.request_timeout;
    let page = shared.config.sync_page;

    // (conversation, last_seq) of every conversation of the user.
    let mut known = Vec::new();
    let mut after = 0;
    loop {
        let body = Body::ListConversations(pb::ListConversationsRequest {
            after_conversation_id: after,
            limit: page,
        });
        let list = match shared.call(body, limit).await? {
            Body::ConversationList(list) => list,
            other => return Err(crate::client::unexpected("ConversationList", &other)),
        };
        let before = after;
        for conv in &list.conversations {
            after = after.max(conv.conversation_id);
            known.push((conv.conversation_id, conv.last_seq));
        }
        // A page that does not advance would repeat forever.
        if !list.has_more || after == before {
            break;
        }
    }

    let behind: Vec<(u64, u64)> = {
        let delivery = lock(&shared.delivery);
        known
            .into_iter()
            .filter(|&(conv, last)| last > delivery.delivered(conv))
            .collect()
    };
    sync_behind(shared, behind).await
}

/// Syncs each `(conversation, last_seq)` from the delivered cursor until it
/// reaches `last_seq` or the server has nothing more. Returns how many
/// messages the syncs returned.
async fn sync_behind(shared: &Shared, behind: Vec<(u64, u64)>) -> Result<usize, ClientError> {
    let limit = shared.config.request_timeout;
    let page = shared.config.sync_page;
    let mut fetched = 0;
    for chunk in behind.chunks(MAX_CURSORS) {
        let mut active = chunk.to_vec();
        while !active.is_empty() {
            let cursors = {
                let delivery = lock(&shared.delivery);
                active
                    .iter()
                    .map(|&(conv, _)| pb::ConvCursor {
                        conversation_id: conv,
                        seq: delivery.delivered(conv),
                    })
                    .collect()
            };
            let body = Body::Sync(pb::SyncRequest {
                cursors,
                limit: page,
            });
            let response = match shared.call(body, limit).await? {
                Body::SyncResponse(r) => r,
                other => return Err(crate::client::unexpected("SyncResponse", &other)),
            };
            fetched += response.messages.len();
            if !response.has_more || response.messages.is_empty() {
                break;
            }
            // The connection task has delivered the page before handing us
            // the reply, so the cursors are already advanced. Conversations
            // caught up to their listed last seq are done; anything newer
            // arrives as a push.
            let delivery = lock(&shared.delivery);
            active.retain(|&(conv, last)| delivery.delivered(conv) < last);
        }
    }
    Ok(fetched)
}
