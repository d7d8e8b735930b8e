//! Delivery verification: what one simulated user knows of one
//! conversation, by seq. No I/O.
//!
//! A user learns seqs two ways: its own sends are acknowledged with their
//! seq, and everyone else's messages arrive as pushes (or, at the end, from
//! a sync). Each seq must become known exactly once; pushes must arrive in
//! increasing seq order; and after the final sync every seq up to the
//! conversation's last must be known, or it was lost.
//!
//! One repeat is expected rather than wrong: a push that raced a sync (the
//! message was stored, a reconnecting recipient's sync returned it, then
//! its push arrived). The protocol allows it and a client drops it by seq
//! (docs/protocol.md, "Exactly-once, in-order display"), so it is told
//! apart as [`Seen::Overlap`].

use std::collections::BTreeSet;

/// How a delivered message relates to what was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time, in order.
    New,
    /// First time, but after a push with a higher seq.
    Reordered,
    /// Already known: delivered twice (or an own message pushed back).
    Duplicate,
    /// A push of a message a sync already brought: the push raced the
    /// sync, which the protocol allows.
    Overlap,
}

/// Known seqs of one conversation, compactly: everything up to
/// `contiguous`, plus the few known beyond a gap.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqTracker {
    contiguous: u64,
    ahead: BTreeSet<u64>,
    max_pushed: u64,
    max_known: u64,
    /// Seqs a sync brought first that no push or ack has repeated yet:
    /// one repeat of each is expected, a second is a duplicate.
    synced: BTreeSet<u64>,
}

impl SeqTracker {
    /// Whether `seq` is known.
    pub fn knows(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.ahead.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        self.max_known = self.max_known.max(seq);
        if seq == self.contiguous + 1 {
            self.contiguous = seq;
            while self.ahead.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else {
            self.ahead.insert(seq);
        }
    }

    /// The user's own message was acknowledged with `seq`. Returns false if
    /// the seq was already known (the server gave one seq twice), unless a
    /// sync brought it just before its ack arrived.
    pub fn own(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if self.knows(seq) {
            return self.synced.remove(&seq);
        }
        self.insert(seq);
        true
    }

    /// A sync brought the user's own message (its ack is late, or was lost
    /// with a dropped connection). Returns false if already known.
    pub fn own_synced(&mut self, seq: u64) -> bool {
        if seq == 0 || self.knows(seq) {
            return false;
        }
        self.insert(seq);
        self.synced.insert(seq);
        true
    }

    /// A message arrived: live (`push`) or from a sync.
    pub fn deliver(&mut self, seq: u64, push: bool) -> Seen {
        if seq == 0 {
            return Seen::Duplicate;
        }
        if self.knows(seq) {
            return if push && self.synced.remove(&seq) {
                Seen::Overlap
            } else {
                Seen::Duplicate
            };
        }
        self.insert(seq);
        if !push {
            self.synced.insert(seq);
            return Seen::New;
        }
        let in_order = seq > self.max_pushed;
        self.max_pushed = self.max_pushed.max(seq);
        if in_order { Seen::New } else { Seen::Reordered }
    }

    /// Every seq up to here is known.
    pub fn contiguous(&self) -> u64 {
        self.contiguous
    }

    /// The highest seq known.
    pub fn max_known(&self) -> u64 {
        self.max_known
    }

    /// The server removed every seq up to `floor` (retention): those not
    /// known yet never will be. Marks them known and returns how many.
    pub fn expire(&mut self, floor: u64) -> u64 {
        if floor <= self.contiguous {
            return 0;
        }
        let unknown = self.missing_upto(floor);
        self.ahead.retain(|&s| s > floor);
        self.synced.retain(|&s| s > floor);
        self.contiguous = floor;
        self.max_known = self.max_known.max(floor);
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        unknown
    }

    /// How many seqs in `1..=last` are not known.
    pub fn missing_upto(&self, last: u64) -> u64 {
        if last <= self.contiguous {
            return 0;
        }
        let known_beyond = self.ahead.range(..=last).count() as u64;
        last - self.contiguous - known_beyond
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_seqs_are_skipped_not_lost() {
        let mut t = SeqTracker::default();
        assert_eq!(t.deliver(2, true), Seen::New);
        assert_eq!(t.deliver(5, true), Seen::New);
        assert_eq!(t.expire(3), 2, "1 and 3 were never known");
        assert_eq!(t.contiguous(), 3);
        assert_eq!(t.missing_upto(5), 1);
        assert_eq!(t.deliver(4, false), Seen::New);
        assert_eq!(t.contiguous(), 5);
        assert_eq!(t.expire(2), 0);
    }

    #[test]
    fn own_and_delivered_seqs_interleave() {
        let mut t = SeqTracker::default();
        assert!(t.own(2));
        assert_eq!(t.deliver(1, true), Seen::New);
        assert_eq!(t.contiguous(), 2);
        assert_eq!(t.deliver(4, true), Seen::New);
        assert!(t.own(3));
        assert_eq!(t.contiguous(), 4);
        assert_eq!(t.missing_upto(4), 0);
    }

    #[test]
    fn duplicates_reorders_and_losses_are_told_apart() {
        let mut t = SeqTracker::default();
        assert_eq!(t.deliver(1, true), Seen::New);
        assert_eq!(t.deliver(1, true), Seen::Duplicate);
        assert_eq!(t.deliver(3, true), Seen::New);
        assert_eq!(t.deliver(2, true), Seen::Reordered);
        assert_eq!(t.deliver(6, true), Seen::New);
        assert_eq!(t.missing_upto(7), 3); // 4, 5, 7
        // A sync fills a gap without counting as a reorder.
        assert_eq!(t.deliver(4, false), Seen::New);
        assert_eq!(t.missing_upto(7), 2);
        assert!(!t.own(6), "own ack of a known seq");
        assert_eq!(t.max_known(), 6);
    }

    #[test]
    fn a_push_racing_a_sync_is_an_overlap_not_a_duplicate() {
        let mut t = SeqTracker::default();
        assert_eq!(t.deliver(1, true), Seen::New);
        assert_eq!(t.deliver(2, false), Seen::New);
        assert_eq!(t.deliver(3, false), Seen::New);
        assert_eq!(t.deliver(3, true), Seen::Overlap);
        assert_eq!(t.deliver(1, true), Seen::Duplicate, "pushed twice");
        assert_eq!(t.deliver(4, true), Seen::New);
        assert_eq!(t.deliver(4, true), Seen::Duplicate);
        assert_eq!(
            t.deliver(3, true),
            Seen::Duplicate,
            "a sync allows one repeat"
        );
        // A seq pushed before a sync that brought its neighbours is not
        // one the sync brought.
        assert_eq!(t.deliver(6, true), Seen::New);
        assert_eq!(t.deliver(5, false), Seen::New);
        assert_eq!(t.deliver(7, false), Seen::New);
        assert_eq!(t.deliver(6, true), Seen::Duplicate);
    }

    #[test]
    fn an_own_message_a_sync_brought_may_also_arrive_as_a_push() {
        let mut t = SeqTracker::default();
        assert!(t.own(1), "acked");
        assert!(t.own_synced(2), "its ack was lost with the connection");
        assert!(!t.own_synced(1));
        assert_eq!(t.deliver(2, true), Seen::Overlap);
        assert_eq!(t.deliver(1, true), Seen::Duplicate, "acked and pushed back");
        assert!(t.own_synced(3), "a sync raced the ack");
        assert!(t.own(3), "the late ack of a message a sync brought");
        assert!(!t.own(3), "acknowledged twice");
    }
}
