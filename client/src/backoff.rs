//! Exponential backoff with full jitter, shared by reconnects and send
//! retries.

use std::time::Duration;

/// Backoff state: the ceiling doubles from `min` up to `max` with every
/// failure, and each delay is drawn uniformly from `[0, ceiling]` so that
/// many clients dropped at once do not come back in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The current ceiling: `min * 2^failures`, capped at `max`.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.failures.min(20);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay; raises the ceiling for the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::random_range(0..=nanos))
    }

    /// Back to the smallest ceiling after a healthy period.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        for _ in 0..100 {
            b.reset();
            assert!(b.next_delay() <= Duration::from_millis(100));
        }
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
    }
}
