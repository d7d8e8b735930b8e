//! Per-user abuse limits of the chat layer and the count of every refusal
//! the chat layer answers as `RATE_LIMITED`.
//!
//! Messages per user per second (a sustained rate and a burst), groups
//! created per user per hour and members added per user per minute are
//! keyed GCRA limiters ([`governor`]): each key holds 8 bytes of state in
//! a sharded map, so a check is one atomic update under a shard lock, never
//! a global one. A key is dropped by [`UserLimits::sweep`] (every 5 s)
//! once its bucket is full again (it then behaves like a fresh one), so
//! the maps hold only users who used a limiter within the time its bucket
//! takes to refill (burst / rate: 2.5 s for messages by default, an hour
//! for groups, a minute for members), and only authenticated users can
//! create keys.
//!
//! Limits are per node: a user whose devices are on N nodes may send N
//! times the per-node rate. A limit of 0 is off.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::ChatError;
use crate::store::UserId;

/// `limit` label and error text of messages per user per second.
pub const MESSAGES: &str = "messages_per_user";
/// `limit` label of groups created per user per hour.
pub const GROUPS_CREATED: &str = "groups_created_per_user";
/// `limit` label of members added per user per minute.
pub const MEMBERS_ADDED: &str = "members_added_per_user";
/// `limit` label of groups one user may be in (checked by the store).
pub const GROUPS_PER_USER: &str = "groups_per_user";
/// `limit` label of failed logins per address and username.
pub const LOGIN_FAILURES: &str = "login_failures";

/// Every limit the chat layer refuses for, in `/metrics` order.
pub const CHAT_LIMITS: [&str; 5] = [
    MESSAGES,
    GROUPS_CREATED,
    MEMBERS_ADDED,
    GROUPS_PER_USER,
    LOGIN_FAILURES,
];

/// The settings of [`UserLimits`] (0 = that limit is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserLimitConfig {
    /// Sustained messages per user per second.
    pub msgs_per_sec: u32,
    /// Messages a user may send at once above the sustained rate.
    pub msgs_burst: u32,
    /// Groups one user may create per hour.
    pub groups_created_per_hour: u32,
    /// Members one user may add (at creation or later) per minute.
    pub members_added_per_minute: u32,
}

type Keyed<C> =
    RateLimiter<UserId, DashMapStateStore<UserId>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The per-user limiters and the refusal counts (see the module docs).
pub struct UserLimits<C: Clock + Clone = DefaultClock> {
    messages: Option<Keyed<C>>,
    groups_created: Option<Keyed<C>>,
    members_added: Option<Keyed<C>>,
    members_per_minute: u32,
    clock: C,
    refused: [AtomicU64; CHAT_LIMITS.len()],
}

impl UserLimits<DefaultClock> {
    /// Limiters on the real clock.
    pub fn new(config: UserLimitConfig) -> Self {
        UserLimits::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock + Clone> UserLimits<C> {
    /// Limiters on `clock` (a fake one in tests).
    pub fn with_clock(config: UserLimitConfig, clock: C) -> Self {
        let keyed =
            |quota: Option<Quota>| quota.map(|q| RateLimiter::dashmap_with_clock(q, clock.clone()));
        let messages = NonZeroU32::new(config.msgs_per_sec).map(|rate| {
            let burst = NonZeroU32::new(config.msgs_burst.max(config.msgs_per_sec)).unwrap_or(rate);
            Quota::per_second(rate).allow_burst(burst)
        });
        let groups = NonZeroU32::new(config.groups_created_per_hour).map(Quota::per_hour);
        let members = NonZeroU32::new(config.members_added_per_minute).map(Quota::per_minute);
        UserLimits {
            messages: keyed(messages),
            groups_created: keyed(groups),
            members_added: keyed(members),
            members_per_minute: config.members_added_per_minute,
            clock: clock.clone(),
            refused: Default::default(),
        }
    }

    fn refuse(&self, what: &'static str, wait: Duration) -> ChatError {
        // Rounded up: a retry after exactly this long conforms.
        let ms = wait
            .as_nanos()
            .div_ceil(1_000_000)
            .clamp(1, u32::MAX as u128);
        ChatError::RateLimited {
            what,
            retry_after_ms: ms as u32,
        }
    }

    fn check(
        &self,
        limiter: &Option<Keyed<C>>,
        what: &'static str,
        user: UserId,
    ) -> Result<(), ChatError> {
        match limiter.as_ref().map(|l| l.check_key(&user)) {
            Some(Err(not_until)) => {
                Err(self.refuse(what, not_until.wait_time_from(self.clock.now())))
            }
            _ => Ok(()),
        }
    }

    /// One message of `user`.
    pub fn message(&self, user: UserId) -> Result<(), ChatError> {
        self.check(&self.messages, MESSAGES, user)
    }

    /// One group created by `user`.
    pub fn group_created(&self, user: UserId) -> Result<(), ChatError> {
        self.check(&self.groups_created, GROUPS_CREATED, user)
    }

    /// `count` members added by `user` in one request (0 passes). More at
    /// once than the per-minute limit can never pass: `INVALID_ARGUMENT`.
    pub fn members_added(&self, user: UserId, count: usize) -> Result<(), ChatError> {
        let (Some(limiter), Some(n)) = (
            self.members_added.as_ref(),
            u32::try_from(count).ok().and_then(NonZeroU32::new),
        ) else {
            if count > 0 && self.members_added.is_some() {
                return Err(self.too_many(count));
            }
            return Ok(());
        };
        match limiter.check_key_n(&user, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Err(self.refuse(MEMBERS_ADDED, not_until.wait_time_from(self.clock.now())))
            }
            Err(_) => Err(self.too_many(count)),
        }
    }

    fn too_many(&self, count: usize) -> ChatError {
        ChatError::invalid(format!(
            "{count} members in one request exceed the {} that may be added per minute",
            self.members_per_minute
        ))
    }

    /// Counts the refusal if `error` is one (`RATE_LIMITED` for a limit
    /// in [`CHAT_LIMITS`]); every error answered goes through here once.
    pub fn count(&self, error: &ChatError) {
        if let ChatError::RateLimited { what, .. } = error {
            if let Some(i) = CHAT_LIMITS.iter().position(|l| l == what) {
                self.refused[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Refusals so far, per limit, in [`CHAT_LIMITS`] order.
    pub fn refused(&self) -> [(&'static str, u64); CHAT_LIMITS.len()] {
        std::array::from_fn(|i| (CHAT_LIMITS[i], self.refused[i].load(Ordering::Relaxed)))
    }

    /// Drops the keys whose buckets are full again (indistinguishable from
    /// fresh ones); call every few seconds.
    pub fn sweep(&self) {
        for limiter in [&self.messages, &self.groups_created, &self.members_added]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys held now over all limiters.
    pub fn keys(&self) -> usize {
        [&self.messages, &self.groups_created, &self.members_added]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum()
    }
}

/// Keeps the limiters' memory bounded: sweeps every `every` until the
/// limiters are dropped (with the chat service).
pub fn spawn_sweeper(
    limits: &std::sync::Arc<UserLimits>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let limits = std::sync::Arc::downgrade(limits);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match limits.upgrade() {
                Some(limits) => limits.sweep(),
                None => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits(config: UserLimitConfig) -> (UserLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (UserLimits::with_clock(config, clock.clone()), clock)
    }

    const OFF: UserLimitConfig = UserLimitConfig {
        msgs_per_sec: 0,
        msgs_burst: 0,
        groups_created_per_hour: 0,
        members_added_per_minute: 0,
    };

    fn retry_ms(r: Result<(), ChatError>) -> u32 {
        match r {
            Err(ChatError::RateLimited { retry_after_ms, .. }) => retry_after_ms,
            other => panic!("expected RATE_LIMITED, got {other:?}"),
        }
    }

    #[test]
    fn messages_pass_a_burst_then_the_sustained_rate_per_user() {
        let (l, clock) = limits(UserLimitConfig {
            msgs_per_sec: 10,
            msgs_burst: 20,
            ..OFF
        });
        for _ in 0..20 {
            l.message(1).unwrap();
        }
        // The 21st waits for one token: a tenth of a second.
        let wait = retry_ms(l.message(1));
        assert!((1..=100).contains(&wait), "{wait}");
        // Another user is not affected.
        for _ in 0..20 {
            l.message(2).unwrap();
        }
        clock.advance(Duration::from_millis(u64::from(wait)));
        l.message(1).unwrap();
        assert!(l.message(1).is_err());
        // A second later ten more pass, not twenty.
        clock.advance(Duration::from_secs(1));
        for _ in 0..10 {
            l.message(1).unwrap();
        }
        let refusal = l.message(1).unwrap_err();
        l.count(&refusal);
        l.count(&ChatError::Overloaded);
        assert_eq!(l.refused()[0], (MESSAGES, 1));
        assert_eq!(l.refused()[1..].iter().map(|r| r.1).sum::<u64>(), 0);
    }

    #[test]
    fn groups_created_per_hour() {
        let (l, clock) = limits(UserLimitConfig {
            groups_created_per_hour: 3,
            ..OFF
        });
        for _ in 0..3 {
            l.group_created(7).unwrap();
        }
        let wait = retry_ms(l.group_created(7));
        // One group comes back every 20 minutes.
        assert!((1_199_000..=1_200_000).contains(&wait), "{wait}");
        clock.advance(Duration::from_secs(20 * 60));
        l.group_created(7).unwrap();
        assert!(l.group_created(7).is_err());
    }

    #[test]
    fn members_added_count_each_member_and_refuse_what_can_never_pass() {
        let (l, clock) = limits(UserLimitConfig {
            members_added_per_minute: 60,
            ..OFF
        });
        l.members_added(1, 50).unwrap();
        let wait = retry_ms(l.members_added(1, 20));
        assert!((9_000..=10_000).contains(&wait), "{wait}");
        l.members_added(1, 10).unwrap();
        l.members_added(1, 0).unwrap();
        assert!(matches!(
            l.members_added(2, 61),
            Err(ChatError::InvalidArgument(_))
        ));
        clock.advance(Duration::from_secs(60));
        l.members_added(1, 60).unwrap();
    }

    #[tokio::test]
    async fn the_sweeper_stops_with_the_limiters() {
        let limits = std::sync::Arc::new(UserLimits::new(OFF));
        let task = spawn_sweeper(&limits, Duration::from_millis(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!task.is_finished());
        drop(limits);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the sweeper ends once the limiters are gone")
            .unwrap();
    }

    #[test]
    fn zero_is_off_and_sweeping_forgets_full_buckets() {
        let (off, _) = limits(OFF);
        for _ in 0..10_000 {
            off.message(1).unwrap();
            off.group_created(1).unwrap();
        }
        off.members_added(1, 1_000_000).unwrap();

        let (l, clock) = limits(UserLimitConfig {
            msgs_per_sec: 100,
            msgs_burst: 100,
            ..OFF
        });
        for user in 1..=1000 {
            l.message(user).unwrap();
        }
        assert_eq!(l.keys(), 1000);
        l.sweep();
        assert_eq!(l.keys(), 1000, "buckets not full yet are kept");
        clock.advance(Duration::from_secs(2));
        l.sweep();
        assert_eq!(l.keys(), 0);
    }
}
