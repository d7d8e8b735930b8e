//! What the client tells the application without being asked: messages,
//! receipts, presence changes and connection state, through a bounded
//! channel ([`Events`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use im_proto::pb;
use tokio::sync::mpsc;

/// Something that happened on the client's connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A message, delivered exactly once per `(conversation_id, seq)` and in
    /// seq order within its conversation, whether it came from a live push
    /// or from sync.
    Message(pb::Message),
    /// The server's retention policy removed every message of a
    /// conversation up to `seq` before this device received them: they
    /// will never arrive, and delivery goes on after `seq`.
    Expired {
        /// The conversation.
        conversation_id: u64,
        /// The highest seq removed.
        seq: u64,
    },
    /// Another device or participant acknowledged messages up to a seq.
    Receipt(pb::Receipt),
    /// A subscribed user went online or offline. After every reconnect the
    /// subscription is renewed and the snapshot is reported this way too.
    Presence(pb::Presence),
    /// The client (re)authenticated; catch-up follows.
    Connected {
        /// The logged-in user.
        user_id: u64,
        /// False for the first connection, true after a reconnect.
        reconnected: bool,
    },
    /// The connection was lost; the client reconnects by itself.
    Disconnected {
        /// What happened (an error code from the server, an I/O error, a
        /// heartbeat timeout).
        reason: String,
    },
    /// Catch-up after a (re)connect finished: every message stored before
    /// the connection was established has been delivered. Sent right after
    /// `Connected` when [`ClientConfig::catch_up`] is off.
    ///
    /// [`ClientConfig::catch_up`]: crate::ClientConfig::catch_up
    Resynced {
        /// Messages received by the catch-up sync (duplicates included).
        messages: usize,
    },
    /// The client gave up for good (the server refused the credentials on
    /// reconnect). No further events follow.
    Stopped {
        /// Why the client stopped.
        reason: String,
    },
}

/// The receiving end of a client's events.
///
/// The channel is bounded ([`ClientConfig::event_buffer`]). When the
/// application stops reading, the connection task stops reading the socket;
/// the server then skips pushes to it and says so (`SyncHint`) once it
/// reads again, and the client syncs what was skipped; if it stays stalled
/// the server drops the connection as a slow consumer and the client
/// reconnects and catches up by sync. Either way nothing is lost, only
/// delayed. Dropping `Events` discards all further events without stalling
/// the client.
///
/// [`ClientConfig::event_buffer`]: crate::ClientConfig::event_buffer
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    pub(crate) fn new(rx: mpsc::Receiver<Event>) -> Self {
        Events { rx }
    }

    /// The next event, or `None` once the client has shut down.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// An event if one is ready now.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl futures::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
