//! MySQL shards that are down, and the message rows held back for them.
//!
//! A batch's rows go to several MySQL shards, each in its own transaction.
//! When one shard fails, the others' rows commit anyway and the failing
//! shard's rows are *deferred*: their stream entries stay pending (the
//! stream is the buffer) and the shard task goes on with new entries, so a
//! shard that is down delays only its own conversations.
//!
//! - [`Health`], one per worker: which shards are down, until when (with
//!   backoff), so that the other shard tasks skip a dead shard instead of
//!   each waiting for it. Once its time is up, the next transaction or
//!   probe tries it again.
//! - [`Held`], one per shard task: the (conversation, seq) of every row it
//!   deferred. A conversation's stored watermark must not pass a seq that
//!   is not in MySQL (the recent cache is trimmed below the watermark), so
//!   watermarks stop below the first held seq. When a shard is back the
//!   task re-reads its own pending entries from the start (a *pass*); what
//!   it defers again during the pass is what stays held, which also drops
//!   rows of entries another worker claimed and stored meanwhile. It is
//!   bounded: a task holding too many rows reads no new entries until its
//!   shards are back.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::admin::Exposition;

/// Whether a shard may be written to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardState {
    /// The last transaction or probe succeeded.
    Up,
    /// Failed; not to be tried before the given instant.
    Down(Instant),
    /// Failed, and its backoff is over: the next attempt tells.
    Due,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    down_until: Option<Instant>,
    backoff: Duration,
}

/// Which MySQL shards are down, shared by the shard tasks of a worker.
#[derive(Debug)]
pub struct Health {
    // A plain mutex: every critical section is a few field updates.
    shards: Mutex<Vec<Entry>>,
    min: Duration,
    max: Duration,
}

impl Health {
    /// `shards` shards, all up; a failing one backs off from `min`,
    /// doubling up to `max`.
    pub fn new(shards: u32, min: Duration, max: Duration) -> Health {
        Health {
            shards: Mutex::new(vec![
                Entry {
                    down_until: None,
                    backoff: min,
                };
                shards as usize
            ]),
            min,
            max: max.max(min),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.shards.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of `shard` at `now`.
    pub fn state(&self, shard: u32, now: Instant) -> ShardState {
        match self.lock().get(shard as usize).and_then(|e| e.down_until) {
            None => ShardState::Up,
            Some(until) if until > now => ShardState::Down(until),
            Some(_) => ShardState::Due,
        }
    }

    /// Whether `shard` is to be skipped at `now`.
    pub fn is_down(&self, shard: u32, now: Instant) -> bool {
        matches!(self.state(shard, now), ShardState::Down(_))
    }

    /// A transaction or probe of `shard` succeeded.
    pub fn succeeded(&self, shard: u32) {
        if let Some(e) = self.lock().get_mut(shard as usize) {
            e.down_until = None;
            e.backoff = self.min;
        }
    }

    /// A transaction or probe of `shard` failed at `now`: it is down for
    /// the next backoff (doubled each time its backoff runs out). Several
    /// tasks failing at once extend it once.
    pub fn failed(&self, shard: u32, now: Instant) {
        if let Some(e) = self.lock().get_mut(shard as usize) {
            match e.down_until {
                Some(until) if until > now => {}
                Some(_) => {
                    e.backoff = (e.backoff * 2).min(self.max);
                    e.down_until = Some(now + e.backoff);
                }
                None => e.down_until = Some(now + e.backoff),
            }
        }
    }

    /// Shards considered down now, as (shard, 0 or 1) samples.
    pub fn down(&self, now: Instant) -> Vec<(u32, u64)> {
        self.lock()
            .iter()
            .enumerate()
            .map(|(i, e)| (i as u32, u64::from(e.down_until.is_some_and(|u| u > now))))
            .collect()
    }

    /// Adds `im_storage_mysql_shard_down` to a scrape.
    pub fn export(&self, out: &mut Exposition) {
        out.gauge_by(
            "im_storage_mysql_shard_down",
            "1 while this worker skips a MySQL shard after a failure (its rows wait in the stream), else 0.",
            "mysql_shard",
            self.down(Instant::now()),
        );
    }
}

/// The rows one shard task deferred, for its watermarks.
#[derive(Debug)]
pub struct Held {
    rows: BTreeSet<(u64, u64)>,
    /// During a pass: the rows deferred since it began.
    next: Option<BTreeSet<(u64, u64)>>,
    /// Shards that rows were deferred for since the last pass began.
    shards: BTreeSet<u32>,
    cap: usize,
}

impl Held {
    /// Holds at most about `cap` rows before [`Held::is_full`].
    pub fn new(cap: usize) -> Held {
        Held {
            rows: BTreeSet::new(),
            next: None,
            shards: BTreeSet::new(),
            cap: cap.max(1),
        }
    }

    /// A row of `shard` was deferred.
    pub fn defer(&mut self, shard: u32, conversation: u64, seq: u64) {
        self.rows.insert((conversation, seq));
        if let Some(next) = &mut self.next {
            next.insert((conversation, seq));
        }
        self.shards.insert(shard);
    }

    /// A row is in MySQL now.
    pub fn stored(&mut self, conversation: u64, seq: u64) {
        self.rows.remove(&(conversation, seq));
        if let Some(next) = &mut self.next {
            next.remove(&(conversation, seq));
        }
    }

    /// The least held seq of a conversation.
    pub fn first(&self, conversation: u64) -> Option<u64> {
        self.rows
            .range((conversation, 0)..=(conversation, u64::MAX))
            .next()
            .map(|&(_, seq)| seq)
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether the task should stop reading new entries.
    pub fn is_full(&self) -> bool {
        self.rows.len() >= self.cap
    }

    /// Shards rows were deferred for since the last pass began.
    pub fn shards(&self) -> impl Iterator<Item = u32> + '_ {
        self.shards.iter().copied()
    }

    /// Whether a pass is under way.
    pub fn in_pass(&self) -> bool {
        self.next.is_some()
    }

    /// The task starts re-reading its pending entries.
    pub fn begin_pass(&mut self) {
        self.next = Some(BTreeSet::new());
        self.shards.clear();
    }

    /// Every pending entry was read again: what was deferred meanwhile is
    /// what is held now (rows of entries no longer pending here, stored
    /// or claimed by another worker, are dropped).
    pub fn end_pass(&mut self) {
        if let Some(next) = self.next.take() {
            self.rows = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_shard_backs_off_and_comes_back() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let h = Health::new(2, ms(100), ms(400));
        assert_eq!(h.state(0, t), ShardState::Up);
        h.failed(0, t);
        assert_eq!(h.state(0, t), ShardState::Down(t + ms(100)));
        assert!(h.is_down(0, t + ms(50)) && !h.is_down(1, t));
        // Others failing within the same window change nothing.
        h.failed(0, t + ms(50));
        assert_eq!(h.state(0, t + ms(99)), ShardState::Down(t + ms(100)));
        assert_eq!(h.state(0, t + ms(100)), ShardState::Due);
        // A failed retry doubles the backoff, up to the maximum.
        h.failed(0, t + ms(100));
        assert_eq!(h.state(0, t + ms(100)), ShardState::Down(t + ms(300)));
        h.failed(0, t + ms(300));
        h.failed(0, t + ms(700));
        assert_eq!(h.state(0, t + ms(700)), ShardState::Down(t + ms(1100)));
        assert_eq!(h.down(t + ms(700)), [(0, 1), (1, 0)]);
        h.succeeded(0);
        assert_eq!(h.state(0, t + ms(700)), ShardState::Up);
        h.failed(0, t + ms(800));
        assert_eq!(h.state(0, t + ms(800)), ShardState::Down(t + ms(900)));
        // Unknown shards are ignored.
        h.failed(9, t);
        assert_eq!(h.state(9, t), ShardState::Up);
    }

    #[test]
    fn held_rows_bound_watermarks_until_a_pass_ends() {
        let mut held = Held::new(3);
        held.defer(1, 10, 5);
        held.defer(1, 10, 7);
        held.defer(0, 11, 2);
        assert_eq!(held.first(10), Some(5));
        assert_eq!(held.first(12), None);
        assert!(held.is_full());
        assert_eq!(held.shards().collect::<Vec<_>>(), [0, 1]);
        held.stored(10, 5);
        assert_eq!(held.first(10), Some(7));
        assert!(!held.is_full());

        // A pass: (10, 7) is stored again, (11, 2) deferred again; (10, 9)
        // is not seen (another worker took its entry).
        held.defer(1, 10, 9);
        held.begin_pass();
        assert!(held.in_pass());
        assert_eq!(held.shards().count(), 0);
        held.stored(10, 7);
        held.defer(0, 11, 2);
        assert_eq!(held.first(10), Some(9), "still held during the pass");
        held.end_pass();
        assert!(!held.in_pass());
        assert_eq!(held.first(10), None);
        assert_eq!(held.first(11), Some(2));
        assert_eq!(held.len(), 1);
        assert_eq!(held.shards().collect::<Vec<_>>(), [0]);
    }
}
