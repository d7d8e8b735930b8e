//! Exactly-once, in-order delivery: per conversation, the highest
//! contiguous seq handed to the application, a bounded buffer of messages
//! that arrived early, and which gaps need fetching.
//!
//! Pushes and sync results both go through [`Delivery::accept`], so the
//! order in which they race does not matter: a seq at or below the cursor is
//! a duplicate, the next seq is emitted together with any buffered
//! successors, and anything further ahead is buffered while the gap is
//! fetched with a `SyncRequest` from the cursor. Messages this device sent
//! itself (known from their acks) count as delivered without being emitted:
//! the application has them already. This module does no I/O and reads no
//! clock; the caller passes `now`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use im_proto::pb;

/// How long to wait before fetching a gap again when a fetch brought
/// nothing new (or failed).
pub(crate) const GAP_RETRY: Duration = Duration::from_secs(2);

/// Own acked seqs remembered per conversation while they wait for the
/// cursor to reach them; beyond this the oldest are forgotten (and then
/// emitted like anyone else's messages when they arrive).
const MAX_OWN_PENDING: usize = 4096;

#[derive(Debug, Default)]
struct Conv {
    /// Highest seq such that 1..=delivered have all been emitted.
    delivered: u64,
    /// Messages above `delivered + 1`, waiting for the gap to close.
    early: BTreeMap<u64, pb::Message>,
    /// Seqs above `delivered` of messages this device sent (acked): they
    /// advance the cursor without being emitted.
    own: BTreeSet<u64>,
    /// A gap fetch for this conversation is in flight.
    fetching: bool,
    /// Do not start another gap fetch before this instant.
    retry_at: Option<Instant>,
    /// Highest seq acknowledged as delivered to the server.
    acked: u64,
    /// A message from someone else was emitted since the last ack.
    ack_due: bool,
}

/// Delivery state of all conversations of one client.
#[derive(Debug)]
pub(crate) struct Delivery {
    convs: HashMap<u64, Conv>,
    gap_buffer: usize,
    /// Start a conversation without a cursor at its first message seen
    /// instead of at seq 0 (live-only clients that do not catch up).
    adopt_unknown: bool,
}

impl Delivery {
    /// State seeded with the application's known cursors.
    pub(crate) fn new(cursors: &HashMap<u64, u64>, gap_buffer: usize, adopt_unknown: bool) -> Self {
        let convs = cursors
            .iter()
            .map(|(&conv, &seq)| {
                let state = Conv {
                    delivered: seq,
                    acked: seq,
                    ..Conv::default()
                };
                (conv, state)
            })
            .collect();
        Delivery {
            convs,
            gap_buffer: gap_buffer.max(1),
            adopt_unknown,
        }
    }

    /// Takes one message from a push or a sync result and returns the
    /// messages that are now ready for the application, in order (empty for
    /// a duplicate or an early message). `me` is the local user, whose own
    /// messages need no delivery ack.
    pub(crate) fn accept(&mut self, msg: pb::Message, me: u64) -> Vec<pb::Message> {
        let seq = msg.seq;
        if seq == 0 {
            return Vec::new();
        }
        let gap_buffer = self.gap_buffer;
        let conv = self.conv(msg.conversation_id, seq);
        if seq <= conv.delivered || conv.early.contains_key(&seq) {
            return Vec::new();
        }
        if conv.own.remove(&seq) {
            // Sent from this device: already known to the application.
            if seq == conv.delivered + 1 {
                return Self::advance(conv, Vec::new(), me);
            }
            conv.own.insert(seq);
            return Vec::new();
        }
        if seq > conv.delivered + 1 {
            if conv.early.len() >= gap_buffer {
                // Full: keep the messages closest to the cursor. Whatever is
                // dropped is fetched again by the gap fetch, which always
                // starts at the cursor.
                match conv.early.last_key_value() {
                    Some((&last, _)) if last > seq => {
                        conv.early.pop_last();
                    }
                    _ => return Vec::new(),
                }
            }
            conv.early.insert(seq, msg);
            return Vec::new();
        }
        conv.delivered = seq;
        Self::advance(conv, vec![msg], me)
    }

    /// Records that this device sent `seq` in `conversation` (its ack
    /// arrived) and returns the messages that became ready.
    pub(crate) fn sent(&mut self, conversation: u64, seq: u64, me: u64) -> Vec<pb::Message> {
        if seq == 0 {
            return Vec::new();
        }
        let conv = self.conv(conversation, seq);
        if seq <= conv.delivered {
            return Vec::new();
        }
        if seq == conv.delivered + 1 {
            conv.delivered = seq;
            return Self::advance(conv, Vec::new(), me);
        }
        conv.early.remove(&seq);
        conv.own.insert(seq);
        if conv.own.len() > MAX_OWN_PENDING {
            conv.own.pop_first();
        }
        Vec::new()
    }

    /// The state of a conversation, created on first sight.
    fn conv(&mut self, conversation: u64, first_seq: u64) -> &mut Conv {
        let adopt = self.adopt_unknown;
        self.convs.entry(conversation).or_insert_with(|| {
            let start = if adopt { first_seq - 1 } else { 0 };
            Conv {
                delivered: start,
                acked: start,
                ..Conv::default()
            }
        })
    }

    /// Moves the cursor over buffered messages and own seqs that are now
    /// contiguous, appending the buffered ones to `ready`.
    fn advance(conv: &mut Conv, mut ready: Vec<pb::Message>, me: u64) -> Vec<pb::Message> {
        loop {
            let next = conv.delivered + 1;
            if let Some(m) = conv.early.remove(&next) {
                conv.delivered = next;
                ready.push(m);
            } else if conv.own.remove(&next) {
                conv.delivered = next;
            } else {
                break;
            }
        }
        if ready.iter().any(|m| m.sender_id != me) {
            conv.ack_due = true;
        }
        ready
    }

    /// The server removed every seq up to `floor` of `conversation` (its
    /// retention policy): the cursor moves up to it, and the buffered
    /// messages right after it are returned, ready. Returns `None` when
    /// the cursor was already at or past the floor.
    pub(crate) fn expire(
        &mut self,
        conversation: u64,
        floor: u64,
        me: u64,
    ) -> Option<Vec<pb::Message>> {
        let conv = self.convs.entry(conversation).or_default();
        if floor <= conv.delivered {
            return None;
        }
        conv.delivered = floor;
        conv.acked = conv.acked.max(floor);
        conv.early.retain(|&seq, _| seq > floor);
        conv.own.retain(|&seq| seq > floor);
        Some(Self::advance(conv, Vec::new(), me))
    }

    /// A sync from cursor `from` returned `first_seq` as the first message
    /// of `conversation`: nothing between is visible to this user (it
    /// predates joining a group), so the cursor moves up to it.
    pub(crate) fn skip_invisible(&mut self, conversation: u64, from: u64, first_seq: u64) {
        let Some(conv) = self.convs.get_mut(&conversation) else {
            return;
        };
        if conv.delivered == from && first_seq > from + 1 {
            conv.delivered = first_seq - 1;
            conv.acked = conv.acked.max(conv.delivered);
            // The response carries `first_seq` itself, which will then be emitted.
            conv.early.retain(|&seq, _| seq > first_seq);
            conv.own.retain(|&seq| seq >= first_seq);
        }
    }

    /// The highest contiguous seq delivered in `conv` (0 if unknown).
    pub(crate) fn delivered(&self, conv: u64) -> u64 {
        self.convs.get(&conv).map_or(0, |c| c.delivered)
    }

    /// Delivered cursors of every known conversation.
    pub(crate) fn cursors(&self) -> HashMap<u64, u64> {
        self.convs
            .iter()
            .filter(|(_, c)| c.delivered > 0)
            .map(|(&id, c)| (id, c.delivered))
            .collect()
    }

    /// Conversations with a gap that should be fetched now, each with the
    /// cursor to sync from. They are marked as fetching until
    /// [`fetch_done`](Self::fetch_done).
    pub(crate) fn gaps_to_fetch(&mut self, now: Instant) -> Vec<(u64, u64)> {
        let mut due = Vec::new();
        for (&id, conv) in &mut self.convs {
            let waiting = conv.retry_at.is_some_and(|at| at > now);
            if !conv.early.is_empty() && !conv.fetching && !waiting {
                conv.fetching = true;
                due.push((id, conv.delivered));
            }
        }
        due.sort_unstable();
        due
    }

    /// A gap fetch for `conv` ended. `progressed` says whether it moved the
    /// cursor; if not (or it failed), the next fetch waits [`GAP_RETRY`].
    pub(crate) fn fetch_done(&mut self, conv: u64, progressed: bool, now: Instant) {
        if let Some(c) = self.convs.get_mut(&conv) {
            c.fetching = false;
            c.retry_at = (!progressed).then(|| now + GAP_RETRY);
        }
    }

    /// Drops the early messages of `conv` (the user can no longer read it),
    /// so no further gap fetches are made for them.
    pub(crate) fn discard_early(&mut self, conv: u64) {
        if let Some(c) = self.convs.get_mut(&conv) {
            c.early.clear();
            c.own.clear();
        }
    }

    /// Forgets every in-flight fetch (their connection is gone).
    pub(crate) fn connection_lost(&mut self) {
        for conv in self.convs.values_mut() {
            conv.fetching = false;
            conv.retry_at = None;
        }
    }

    /// Delivery acks to send: `(conversation, seq)` for each conversation
    /// with newly delivered messages from others. They count as sent.
    pub(crate) fn take_acks(&mut self) -> Vec<(u64, u64)> {
        let mut acks = Vec::new();
        for (&id, conv) in &mut self.convs {
            if conv.ack_due && conv.delivered > conv.acked {
                acks.push((id, conv.delivered));
                conv.acked = conv.delivered;
            }
            conv.ack_due = false;
        }
        acks.sort_unstable();
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u64 = 1;
    const C: u64 = (1 << 31) | 2;

    fn msg(conv: u64, seq: u64) -> pb::Message {
        pb::Message {
            conversation_id: conv,
            seq,
            message_id: seq * 100,
            sender_id: 2,
            ..Default::default()
        }
    }

    fn seqs(ms: &[pb::Message]) -> Vec<u64> {
        ms.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn in_order_duplicates_and_early_messages() {
        let mut d = Delivery::new(&HashMap::new(), 16, false);
        let now = Instant::now();
        assert_eq!(seqs(&d.accept(msg(C, 1), ME)), [1]);
        assert!(d.accept(msg(C, 1), ME).is_empty());
        assert!(d.accept(msg(C, 3), ME).is_empty());
        assert!(d.accept(msg(C, 3), ME).is_empty());
        assert_eq!(d.gaps_to_fetch(now), [(C, 1)]);
        // Already fetching: not asked again.
        assert!(d.gaps_to_fetch(now).is_empty());
        assert_eq!(seqs(&d.accept(msg(C, 2), ME)), [2, 3]);
        assert_eq!(d.delivered(C), 3);
        d.fetch_done(C, true, now);
        assert!(d.gaps_to_fetch(now).is_empty());
        assert!(d.accept(msg(C, 2), ME).is_empty());
        assert_eq!(seqs(&d.accept(msg(C, 4), ME)), [4]);
    }

    #[test]
    fn every_permutation_with_duplicates_emits_each_seq_once_in_order() {
        // All orders of 1..=5 followed by a replay of the same order.
        let mut order: Vec<u64> = (1..=5).collect();
        let mut count = 0;
        permute(&mut order, 0, &mut |perm| {
            count += 1;
            let mut d = Delivery::new(&HashMap::new(), 16, false);
            let mut out = Vec::new();
            for &s in perm.iter().chain(perm.iter()) {
                out.extend(seqs(&d.accept(msg(C, s), ME)));
            }
            assert_eq!(out, [1, 2, 3, 4, 5], "order {perm:?}");
        });
        assert_eq!(count, 120);
    }

    fn permute(v: &mut Vec<u64>, k: usize, f: &mut impl FnMut(&[u64])) {
        if k == v.len() {
            f(v);
            return;
        }
        for i in k..v.len() {
            v.swap(k, i);
            permute(v, k + 1, f);
            v.swap(k, i);
        }
    }

    #[test]
    fn known_cursors_are_respected() {
        let cursors = HashMap::from([(C, 10)]);
        let mut d = Delivery::new(&cursors, 16, false);
        assert!(d.accept(msg(C, 9), ME).is_empty());
        assert!(d.accept(msg(C, 10), ME).is_empty());
        assert_eq!(seqs(&d.accept(msg(C, 11), ME)), [11]);
        assert_eq!(d.cursors(), HashMap::from([(C, 11)]));
    }

    #[test]
    fn unknown_conversation_starts_at_zero_or_first_seen() {
        let mut d = Delivery::new(&HashMap::new(), 16, false);
        assert!(d.accept(msg(C, 5), ME).is_empty());
        assert_eq!(d.gaps_to_fetch(Instant::now()), [(C, 0)]);

        let mut live = Delivery::new(&HashMap::new(), 16, true);
        assert_eq!(seqs(&live.accept(msg(C, 5), ME)), [5]);
        assert!(live.gaps_to_fetch(Instant::now()).is_empty());
        assert!(live.accept(msg(C, 7), ME).is_empty());
        assert_eq!(live.gaps_to_fetch(Instant::now()), [(C, 5)]);
    }

    #[test]
    fn buffer_is_bounded_and_keeps_the_lowest() {
        let mut d = Delivery::new(&HashMap::new(), 3, false);
        for s in [10, 9, 8, 7, 3] {
            assert!(d.accept(msg(C, s), ME).is_empty());
        }
        // Kept 3, 7, 8; 9 and 10 were dropped and must come back by fetch.
        assert_eq!(seqs(&d.accept(msg(C, 1), ME)), [1]);
        assert_eq!(seqs(&d.accept(msg(C, 2), ME)), [2, 3]);
        let mut out = Vec::new();
        for s in 4..=10 {
            out.extend(seqs(&d.accept(msg(C, s), ME)));
        }
        assert_eq!(out, [4, 5, 6, 7, 8, 9, 10]);
    }

    #[test]
    fn fruitless_fetch_waits_before_retrying() {
        let mut d = Delivery::new(&HashMap::new(), 16, false);
        let now = Instant::now();
        d.accept(msg(C, 4), ME);
        assert_eq!(d.gaps_to_fetch(now), [(C, 0)]);
        d.fetch_done(C, false, now);
        assert!(d.gaps_to_fetch(now).is_empty());
        assert_eq!(d.gaps_to_fetch(now + GAP_RETRY), [(C, 0)]);
        d.connection_lost();
        assert_eq!(d.gaps_to_fetch(now), [(C, 0)]);
    }

    #[test]
    fn own_sends_advance_the_cursor_without_being_emitted() {
        let mut d = Delivery::new(&HashMap::new(), 16, false);
        let own = |seq| {
            let mut m = msg(C, seq);
            m.sender_id = ME;
            m
        };
        // In order: my seq 1 is acked, then someone's seq 2 is pushed.
        assert!(d.sent(C, 1, ME).is_empty());
        assert_eq!(seqs(&d.accept(msg(C, 2), ME)), [2]);
        // My ack for 4 arrives before the push of 3: 4 waits for 3.
        assert!(d.sent(C, 4, ME).is_empty());
        assert_eq!(seqs(&d.accept(msg(C, 3), ME)), [3]);
        assert_eq!(d.delivered(C), 4);
        // Someone's 6 is pushed before my ack for 5 arrives.
        assert!(d.accept(msg(C, 6), ME).is_empty());
        assert_eq!(seqs(&d.sent(C, 5, ME)), [6]);
        // A gap fetch that returns my own message does not emit it.
        assert!(d.sent(C, 8, ME).is_empty());
        assert!(d.accept(msg(C, 9), ME).is_empty());
        assert_eq!(seqs(&d.accept(msg(C, 7), ME)), [7, 9]);
        assert!(d.accept(own(8), ME).is_empty());
        assert_eq!(d.delivered(C), 9);
    }

    #[test]
    fn sync_skips_what_a_late_joiner_cannot_see() {
        let mut d = Delivery::new(&HashMap::new(), 16, false);
        // A push of seq 3 arrives first; the gap fetch from 0 starts at 3.
        assert!(d.accept(msg(C, 3), ME).is_empty());
        d.skip_invisible(C, 0, 3);
        assert_eq!(seqs(&d.accept(msg(C, 3), ME)), [3]);
        // Skipping never moves a cursor that has advanced since the request.
        d.skip_invisible(C, 0, 10);
        assert_eq!(d.delivered(C), 3);
        // Unknown conversations are created by the messages themselves.
        d.skip_invisible(C + 1, 0, 5);
        assert_eq!(d.delivered(C + 1), 0);
    }

    #[test]
    fn an_expired_prefix_moves_the_cursor_and_releases_what_follows() {
        let mut d = Delivery::new(&HashMap::new(), 16, false);
        assert_eq!(seqs(&d.accept(msg(C, 1), ME)), [1]);
        // 2..=4 were removed; 5 and 6 arrived early and wait for them.
        assert!(d.accept(msg(C, 6), ME).is_empty());
        assert!(d.accept(msg(C, 5), ME).is_empty());
        assert!(d.accept(msg(C, 3), ME).is_empty());
        assert_eq!(seqs(&d.expire(C, 4, ME).unwrap()), [5, 6]);
        assert_eq!(d.delivered(C), 6);
        // A floor at or below the cursor changes nothing.
        assert!(d.expire(C, 4, ME).is_none());
        assert!(d.accept(msg(C, 4), ME).is_empty(), "at or below the cursor");
        // An unknown conversation starts at its floor.
        assert!(d.expire(C + 1, 9, ME).unwrap().is_empty());
        assert_eq!(seqs(&d.accept(msg(C + 1, 10), ME)), [10]);
    }

    #[test]
    fn acks_are_coalesced_and_skip_own_messages() {
        let mut d = Delivery::new(&HashMap::new(), 16, false);
        for s in 1..=5 {
            d.accept(msg(C, s), ME);
        }
        assert_eq!(d.take_acks(), [(C, 5)]);
        assert!(d.take_acks().is_empty());
        let mut own = msg(C, 6);
        own.sender_id = ME;
        d.accept(own, ME);
        assert!(d.take_acks().is_empty());
        d.accept(msg(C, 7), ME);
        assert_eq!(d.take_acks(), [(C, 7)]);
    }
}
