//! The dedup window of the embedded store: which sends `(conversation,
//! sender, client_msg_id)` were stored recently, and where.
//!
//! A unique index on client-chosen ids costs a random B-tree insert per
//! message, spread over an index that grows forever; it dominated the
//! writer's time (WAL pages written per commit grow with it). Most resends
//! come from clients retrying after a lost ack, i.e. within minutes, so,
//! like the production pipeline, the embedded store recognises first
//! attempts within a window: two generations of an in-memory map, each
//! covering `window` (or at most `capacity / 2` sends), so a send is
//! recognised for at least one window and at most two. At open the window
//! is refilled from the tail of the `messages` table, so a restart keeps
//! it. Sends flagged as resends that the window misses are looked up in
//! the compact `(conversation_id, dedup_key)` index instead.
//!
//! Keys are a keyed 64-bit hash of the send and values `(conversation,
//! seq)`: 24 bytes a send. A hit is confirmed against the stored row before it is
//! believed, so a hash collision can never turn a new message into a
//! "duplicate"; at worst it lets one resend through as new.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

use crate::store::UserId;

/// Recently stored sends, owned by the writer thread.
pub(super) struct RecentSends {
    hasher: RandomState,
    current: HashMap<u64, (u64, u64)>,
    previous: HashMap<u64, (u64, u64)>,
    /// When `current` started filling.
    started: Instant,
    window: Duration,
    per_generation: usize,
    /// Keys added by the open transaction, forgotten if it rolls back.
    uncommitted: Vec<u64>,
}

impl RecentSends {
    /// An empty window of `window` (at least) holding at most `capacity`
    /// sends.
    pub(super) fn new(window: Duration, capacity: usize) -> Self {
        RecentSends {
            hasher: RandomState::new(),
            current: HashMap::new(),
            previous: HashMap::new(),
            started: Instant::now(),
            window,
            per_generation: (capacity / 2).max(1),
            uncommitted: Vec::new(),
        }
    }

    /// How far back the refill at open looks.
    pub(super) fn window(&self) -> Duration {
        self.window
    }

    /// Sends the refill at open should load at most.
    pub(super) fn per_generation(&self) -> usize {
        self.per_generation
    }

    fn key(&self, conversation: u64, sender: UserId, client_msg_id: &str) -> u64 {
        self.hasher.hash_one((conversation, sender, client_msg_id))
    }

    /// Where the send was stored, if it is in the window (to be confirmed
    /// against the row).
    pub(super) fn get(
        &self,
        conversation: u64,
        sender: UserId,
        client_msg_id: &str,
    ) -> Option<(u64, u64)> {
        let key = self.key(conversation, sender, client_msg_id);
        self.current
            .get(&key)
            .or_else(|| self.previous.get(&key))
            .copied()
    }

    /// Records a send stored by the open transaction.
    pub(super) fn insert(&mut self, sender: UserId, client_msg_id: &str, at: (u64, u64)) {
        let key = self.key(at.0, sender, client_msg_id);
        self.current.insert(key, at);
        self.uncommitted.push(key);
    }

    /// Records a send loaded at open (already committed).
    pub(super) fn preload(&mut self, sender: UserId, client_msg_id: &str, at: (u64, u64)) {
        let key = self.key(at.0, sender, client_msg_id);
        self.current.insert(key, at);
    }

    /// The open transaction committed.
    pub(super) fn commit(&mut self) {
        self.uncommitted.clear();
    }

    /// The open transaction rolled back: what it added was never stored.
    pub(super) fn rollback(&mut self) {
        for key in self.uncommitted.drain(..) {
            self.current.remove(&key);
        }
    }

    /// Starts a new generation when the current one is full or older than
    /// the window. Called between transactions.
    pub(super) fn rotate_if_due(&mut self) {
        let age = self.started.elapsed();
        if age >= self.window.saturating_mul(2) {
            // Idle for two windows: both generations are past.
            self.current.clear();
            self.previous.clear();
            self.started = Instant::now();
        } else if self.current.len() >= self.per_generation || age >= self.window {
            self.previous = std::mem::take(&mut self.current);
            self.started = Instant::now();
        }
    }

    /// Sends held now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_found_until_two_generations_have_passed() {
        let mut r = RecentSends::new(Duration::from_secs(3600), 4);
        r.insert(1, "a", (10, 1));
        r.insert(1, "b", (10, 2));
        r.commit();
        assert_eq!(r.get(10, 1, "a"), Some((10, 1)));
        assert_eq!(r.get(10, 2, "a"), None, "the sender is part of the key");
        assert_eq!(r.get(11, 1, "a"), None, "so is the conversation");
        r.rotate_if_due(); // full: "a" and "b" move to the previous generation
        r.insert(1, "c", (10, 3));
        r.commit();
        assert_eq!(r.get(10, 1, "a"), Some((10, 1)));
        r.insert(1, "d", (10, 4));
        r.commit();
        r.rotate_if_due();
        assert_eq!(r.get(10, 1, "a"), None, "two generations later it is gone");
        assert_eq!(r.get(10, 1, "c"), Some((10, 3)));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_rolled_back_transaction_leaves_nothing_behind() {
        let mut r = RecentSends::new(Duration::from_secs(3600), 100);
        r.insert(1, "kept", (10, 1));
        r.commit();
        r.insert(1, "lost", (10, 2));
        r.rollback();
        assert_eq!(r.get(10, 1, "kept"), Some((10, 1)));
        assert_eq!(r.get(10, 1, "lost"), None);
    }

    #[test]
    fn generations_also_turn_over_with_time() {
        let mut r = RecentSends::new(Duration::ZERO, 100);
        r.preload(1, "a", (10, 1));
        r.rotate_if_due();
        r.rotate_if_due();
        assert_eq!(r.get(10, 1, "a"), None);
    }
}
