//! A lazy timer wheel with one-second resolution for per-connection
//! deadlines (authentication, heartbeat, lingering close).
//!
//! Each connection keeps its deadline in its own state and has exactly one
//! live entry here. Activity only moves the deadline forward in the
//! connection (no wheel operation); when the entry fires early, the owner
//! re-inserts it at the current deadline. So an idle connection costs one
//! 12-byte entry and no per-connection timer object.

/// Identifies what an entry belongs to; the owner checks it on expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Slab slot of the connection.
    pub slot: u32,
    /// Generation of the connection in that slot (guards against reuse).
    pub generation: u32,
    /// The second this entry was scheduled for.
    pub at: u32,
}

/// Buckets of entries indexed by second modulo the wheel size.
#[derive(Debug)]
pub struct Wheel {
    buckets: Vec<Vec<Entry>>,
    /// The next second to expire.
    next: u32,
}

impl Wheel {
    /// A wheel with `size` one-second buckets; deadlines further out than
    /// that are clamped and re-inserted when they come round.
    pub fn new(size: usize) -> Self {
        let size = size.max(2).next_power_of_two();
        Wheel {
            buckets: (0..size).map(|_| Vec::new()).collect(),
            next: 0,
        }
    }

    /// Schedules an entry for second `at` (clamped to what the wheel can
    /// hold; an `at` in the past fires at the next expiry). Returns the
    /// second actually used, which the owner records to recognise its live
    /// entry.
    pub fn insert(&mut self, slot: u32, generation: u32, at: u32) -> u32 {
        let horizon = self.next + self.buckets.len() as u32 - 1;
        let at = at.clamp(self.next, horizon);
        let idx = at as usize & (self.buckets.len() - 1);
        self.buckets[idx].push(Entry {
            slot,
            generation,
            at,
        });
        at
    }

    /// Moves every entry due at or before `now` into `due` (which the
    /// caller drains and reuses, so expiry allocates nothing in steady
    /// state).
    pub fn expire(&mut self, now: u32, due: &mut Vec<Entry>) {
        while self.next <= now {
            let idx = self.next as usize & (self.buckets.len() - 1);
            due.append(&mut self.buckets[idx]);
            self.next += 1;
        }
    }

    /// Whether no entry is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_fire_at_their_second() {
        let mut w = Wheel::new(8);
        w.insert(1, 0, 3);
        w.insert(2, 0, 5);
        let mut due = Vec::new();
        w.expire(2, &mut due);
        assert!(due.is_empty());
        w.expire(4, &mut due);
        assert_eq!(due.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![1]);
        due.clear();
        w.expire(5, &mut due);
        assert_eq!(due.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![2]);
        assert!(w.is_empty());
    }

    #[test]
    fn far_deadlines_are_clamped_to_the_horizon() {
        let mut w = Wheel::new(8);
        let at = w.insert(1, 0, 1000);
        assert_eq!(at, 7);
        let mut due = Vec::new();
        w.expire(6, &mut due);
        assert!(due.is_empty());
        w.expire(7, &mut due);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].at, 7);
    }

    #[test]
    fn past_deadlines_fire_on_the_next_expiry() {
        let mut w = Wheel::new(4);
        let mut due = Vec::new();
        w.expire(10, &mut due);
        assert_eq!(w.insert(1, 0, 3), 11);
        w.expire(11, &mut due);
        assert_eq!(due.len(), 1);
    }
}
