//! Abuse limits of the connection layer, free of I/O: requests per
//! connection per second, new connections per client address per second
//! and open connections per client address.
//!
//! - [`AddrLimits`] is shared by all shards (a client's connections land on
//!   any of them): a keyed GCRA limiter ([`governor`]) for the connection
//!   rate and a sharded map of open connections per address. The address
//!   is the socket's peer, or the client a trusted balancer's PROXY header
//!   names. IPv6 addresses count per /64 (one subscriber's block), IPv4
//!   ones per address. Keys are 64-bit hashes (seeded per process), so
//!   every entry has a fixed size. The open map holds an entry only while
//!   that address has a connection, so it is bounded by the connections;
//!   the rate limiter drops keys whose bucket is full again every
//!   [`SWEEP_EVERY`] admissions, so it holds at most the addresses seen
//!   within the last second plus that many.
//! - [`ShardLimits`] is a shard's own: per slot, the request bucket (one
//!   GCRA time stamp) and the address key the slot was counted under, 16
//!   bytes per slot in a vector beside the slab (the 32-byte connection
//!   state does not grow).
//!
//! Limits are per node: behind a balancer spreading clients over N nodes,
//! one address may hold up to N times `max_conns_per_addr`.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// `limit` label of requests per connection per second.
pub const REQUESTS_PER_CONN: &str = "requests_per_conn";
/// `limit` label of new connections per address per second.
pub const NEW_CONNS_PER_ADDR: &str = "new_conns_per_addr";
/// `limit` label of open connections per address.
pub const CONNS_PER_ADDR: &str = "conns_per_addr";

/// Admissions between two sweeps of the connection-rate limiter.
pub const SWEEP_EVERY: u64 = 1024;
/// `retry_after_ms` of a connection refused because its address holds the
/// most connections allowed: when one closes cannot be known.
pub const CONNS_PER_ADDR_RETRY_MS: u32 = 1000;

/// Why a new connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrRefusal {
    /// Too many new connections from the address; retry after this many
    /// milliseconds.
    Rate(u32),
    /// The address holds the most connections allowed.
    Open,
}

impl AddrRefusal {
    /// The `limit` label.
    pub fn limit(self) -> &'static str {
        match self {
            AddrRefusal::Rate(_) => NEW_CONNS_PER_ADDR,
            AddrRefusal::Open => CONNS_PER_ADDR,
        }
    }

    /// Milliseconds to wait before reconnecting.
    pub fn retry_after_ms(self) -> u32 {
        match self {
            AddrRefusal::Rate(ms) => ms,
            AddrRefusal::Open => CONNS_PER_ADDR_RETRY_MS,
        }
    }
}

type Keyed<C> = RateLimiter<u64, DashMapStateStore<u64>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Per-address limits shared by a node's shards (see the module docs).
pub struct AddrLimits<C: Clock = DefaultClock> {
    hasher: RandomState,
    rate: Option<Keyed<C>>,
    clock: C,
    max_open: u32,
    open: DashMap<u64, u32>,
    admitted: AtomicU64,
}

impl AddrLimits<DefaultClock> {
    /// `new_per_sec` new connections per address per second (also the
    /// burst) and `max_open` open ones; 0 turns either off.
    pub fn new(new_per_sec: u32, max_open: u32) -> Self {
        AddrLimits::with_clock(new_per_sec, max_open, DefaultClock::default())
    }
}

impl<C: Clock + Clone> AddrLimits<C> {
    /// As [`AddrLimits::new`], on `clock` (a fake one in tests).
    pub fn with_clock(new_per_sec: u32, max_open: u32, clock: C) -> Self {
        AddrLimits {
            hasher: RandomState::new(),
            rate: NonZeroU32::new(new_per_sec)
                .map(|r| RateLimiter::dashmap_with_clock(Quota::per_second(r), clock.clone())),
            clock,
            max_open,
            open: DashMap::new(),
            admitted: AtomicU64::new(0),
        }
    }

    /// Whether any limit is on.
    pub fn enabled(&self) -> bool {
        self.rate.is_some() || self.max_open > 0
    }

    /// The key an address counts under (never 0, which marks "none").
    pub fn key(&self, ip: IpAddr) -> u64 {
        let key = match ip.to_canonical() {
            IpAddr::V4(v4) => self.hasher.hash_one((4u8, v4.octets())),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                self.hasher.hash_one((6u8, [s[0], s[1], s[2], s[3]]))
            }
        };
        key.max(1)
    }

    /// Admits a new connection from the address with key `key` (counting
    /// it as open until [`AddrLimits::release`]), or says why not.
    pub fn admit(&self, key: u64) -> Result<(), AddrRefusal> {
        if self.admitted.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        if self.max_open > 0 {
            // Checked first: a refusal for being full costs no rate token.
            if self.open.get(&key).is_some_and(|n| *n >= self.max_open) {
                return Err(AddrRefusal::Open);
            }
        }
        if let Some(rate) = &self.rate {
            if let Err(not_until) = rate.check_key(&key) {
                let wait = not_until.wait_time_from(self.clock.now());
                return Err(AddrRefusal::Rate(millis_up(wait)));
            }
        }
        if self.max_open > 0 {
            let mut n = self.open.entry(key).or_insert(0);
            if *n >= self.max_open {
                // Another shard took the last place meanwhile.
                return Err(AddrRefusal::Open);
            }
            *n += 1;
        }
        Ok(())
    }

    /// A connection admitted under `key` is gone.
    pub fn release(&self, key: u64) {
        if self.max_open > 0 {
            self.open.remove_if_mut(&key, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }

    /// Drops rate-limiter keys whose bucket is full again.
    pub fn sweep(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }

    /// Keys held: (rate limiter, open-connection map).
    #[cfg(test)]
    pub fn keys(&self) -> (usize, usize) {
        (self.rate.as_ref().map_or(0, |r| r.len()), self.open.len())
    }
}

/// Milliseconds, rounded up, at least 1.
fn millis_up(wait: Duration) -> u32 {
    wait.as_nanos()
        .div_ceil(1_000_000)
        .clamp(1, u32::MAX as u128) as u32
}

/// A GCRA request bucket: `rate` per second, `rate` at once.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    period_ns: u64,
    /// How far the theoretical arrival time may run ahead of now.
    tolerance_ns: u64,
}

impl Bucket {
    fn new(rate: u32) -> Option<Bucket> {
        let rate = u64::from(NonZeroU32::new(rate)?.get());
        let period_ns = (1_000_000_000 / rate).max(1);
        Some(Bucket {
            period_ns,
            tolerance_ns: period_ns * rate,
        })
    }

    /// Takes one token at `now_ns` from the bucket whose state is `tat`,
    /// or returns the milliseconds until one is there.
    fn take(self, tat: &mut u64, now_ns: u64) -> Result<(), u32> {
        let start = (*tat).max(now_ns);
        let next = start + self.period_ns;
        if next > now_ns + self.tolerance_ns {
            return Err(millis_up(Duration::from_nanos(
                next - now_ns - self.tolerance_ns,
            )));
        }
        *tat = next;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Theoretical arrival time of the request bucket, ns since `started`.
    tat: u64,
    /// The address key the connection is counted under (0: none).
    addr: u64,
}

/// One shard's view of the limits (see the module docs).
pub struct ShardLimits<C: Clock = DefaultClock> {
    addrs: Arc<AddrLimits<C>>,
    requests: Option<Bucket>,
    slots: Vec<Slot>,
    started: Instant,
}

impl<C: Clock + Clone> ShardLimits<C> {
    /// `requests_per_sec` per connection (0 = off), addresses limited by
    /// the node-wide `addrs`.
    pub fn new(addrs: Arc<AddrLimits<C>>, requests_per_sec: u32) -> Self {
        ShardLimits {
            addrs,
            requests: Bucket::new(requests_per_sec),
            slots: Vec::new(),
            started: Instant::now(),
        }
    }

    fn slot(&mut self, slot: usize) -> &mut Slot {
        if slot >= self.slots.len() {
            self.slots.resize(slot + 1, Slot::default());
        }
        &mut self.slots[slot]
    }

    /// A new connection in `slot` (its bucket starts full).
    pub fn opened(&mut self, slot: usize) {
        if self.requests.is_some() || self.addrs.enabled() {
            *self.slot(slot) = Slot::default();
        }
    }

    /// Counts the connection in `slot` against the limits of its client
    /// address `ip`, or says why it is refused (then nothing is counted).
    pub fn admit(&mut self, slot: usize, ip: IpAddr) -> Result<(), AddrRefusal> {
        if !self.addrs.enabled() {
            return Ok(());
        }
        let key = self.addrs.key(ip);
        self.addrs.admit(key)?;
        self.slot(slot).addr = key;
        Ok(())
    }

    /// The connection in `slot` is gone: its address place is given back.
    pub fn closed(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            let key = std::mem::take(&mut s.addr);
            if key != 0 {
                self.addrs.release(key);
            }
        }
    }

    /// One request of the connection in `slot`, now; `Err(ms)` to wait.
    pub fn request(&mut self, slot: usize) -> Result<(), u32> {
        if self.requests.is_none() {
            return Ok(());
        }
        let now = self.started.elapsed().as_nanos() as u64;
        self.request_at(slot, now)
    }

    /// As [`ShardLimits::request`], at `now_ns` since this shard started.
    pub fn request_at(&mut self, slot: usize, now_ns: u64) -> Result<(), u32> {
        let Some(bucket) = self.requests else {
            return Ok(());
        };
        bucket.take(&mut self.slot(slot).tat, now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    const SEC: u64 = 1_000_000_000;

    fn addrs(rate: u32, open: u32) -> (Arc<AddrLimits<FakeRelativeClock>>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (
            Arc::new(AddrLimits::with_clock(rate, open, clock.clone())),
            clock,
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn requests_per_connection_pass_a_burst_then_the_rate() {
        let (a, _) = addrs(0, 0);
        let mut l = ShardLimits::new(a, 10);
        l.opened(3);
        l.opened(4);
        for _ in 0..10 {
            l.request_at(3, SEC).unwrap();
        }
        // The 11th waits a tenth of a second.
        assert_eq!(l.request_at(3, SEC), Err(100));
        assert_eq!(l.request_at(3, SEC + 40_000_000), Err(60));
        // Another connection of the same shard is not affected.
        l.request_at(4, SEC).unwrap();
        l.request_at(3, SEC + 100_000_000).unwrap();
        assert!(l.request_at(3, SEC + 100_000_000).is_err());
        // After two idle seconds the bucket holds ten again, not twenty.
        for _ in 0..10 {
            l.request_at(3, 3 * SEC).unwrap();
        }
        assert!(l.request_at(3, 3 * SEC).is_err());
        // A new connection in a reused slot starts with a full bucket.
        l.opened(3);
        l.request_at(3, 3 * SEC).unwrap();
        // Off: everything passes.
        let (a, _) = addrs(0, 0);
        let mut off = ShardLimits::new(a, 0);
        for _ in 0..10_000 {
            off.request_at(0, 0).unwrap();
        }
    }

    #[test]
    fn open_connections_per_address_are_capped_across_shards() {
        let (a, _) = addrs(0, 2);
        let mut s0 = ShardLimits::new(a.clone(), 0);
        let mut s1 = ShardLimits::new(a.clone(), 0);
        s0.opened(0);
        s0.admit(0, ip("10.0.0.1")).unwrap();
        s1.opened(0);
        s1.admit(0, ip("10.0.0.1")).unwrap();
        s1.opened(1);
        assert_eq!(s1.admit(1, ip("10.0.0.1")), Err(AddrRefusal::Open));
        // Another address is not affected; the v4-mapped form is the same.
        s1.admit(1, ip("10.0.0.2")).unwrap();
        s0.opened(1);
        assert_eq!(s0.admit(1, ip("::ffff:10.0.0.1")), Err(AddrRefusal::Open));
        // A refused connection holds no place: closing it frees nothing.
        s0.closed(1);
        assert_eq!(s0.admit(1, ip("10.0.0.1")), Err(AddrRefusal::Open));
        s0.closed(0);
        s0.admit(1, ip("10.0.0.1")).unwrap();
        // Closing twice gives back one place only.
        s0.closed(1);
        s0.closed(1);
        s1.closed(0);
        s1.closed(1);
        assert_eq!(a.keys().1, 0, "no entry is kept without a connection");
        assert_eq!(AddrRefusal::Open.retry_after_ms(), CONNS_PER_ADDR_RETRY_MS);
    }

    #[test]
    fn new_connections_per_address_per_second() {
        let (a, clock) = addrs(4, 0);
        let key = a.key(ip("192.0.2.7"));
        for _ in 0..4 {
            a.admit(key).unwrap();
        }
        let Err(AddrRefusal::Rate(ms)) = a.admit(key) else {
            panic!("fifth connection in a second admitted");
        };
        assert!((1..=250).contains(&ms), "{ms}");
        a.admit(a.key(ip("192.0.2.8"))).unwrap();
        clock.advance(Duration::from_millis(u64::from(ms)));
        a.admit(key).unwrap();
        assert!(a.admit(key).is_err());
        // Full buckets are swept away.
        clock.advance(Duration::from_secs(2));
        a.sweep();
        assert_eq!(a.keys().0, 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_sweeps_bound_the_keys() {
        let (a, _) = addrs(1, 0);
        a.admit(a.key(ip("2001:db8:1:2::1"))).unwrap();
        assert!(a.admit(a.key(ip("2001:db8:1:2:ffff::9"))).is_err());
        a.admit(a.key(ip("2001:db8:1:3::1"))).unwrap();

        let (a, clock) = addrs(1, 0);
        for i in 0..3 * SWEEP_EVERY {
            if i % SWEEP_EVERY == 0 {
                clock.advance(Duration::from_secs(2));
            }
            let v4 = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
            a.admit(a.key(IpAddr::V4(v4))).unwrap();
        }
        assert!(a.keys().0 <= 2 * SWEEP_EVERY as usize, "{:?}", a.keys());
    }
}
