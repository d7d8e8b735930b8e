//! The cache of group member lists used for fan-out.
//!
//! Entries are weighed in bytes (a 2,000-member group is 16 KiB, a small
//! one under 100 B) and live `member_cache_ttl` at most. A membership
//! change invalidates the group on every node before it is acknowledged;
//! what makes that enough is that a list loaded *before* an invalidation is
//! never used by a lookup that starts *after* it. Without that rule a load
//! in flight when the change commits (it read the old members) would be
//! cached after the invalidation, and the node would push to the old
//! members until the entry expired.
//!
//! The rule is kept with an invalidation clock: every invalidation ticks
//! it and stamps the group's stripe with the new time; every load records
//! the time it started; a lookup that finds an entry older than the stamp
//! its group's stripe had when the lookup began drops it and loads again.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{GroupId, UserId};
use crate::store::StoreError;

/// Stripes of invalidation stamps (groups share them by hash; a shared
/// stripe only costs a neighbour an extra reload).
const STRIPES: usize = 1024;

/// A member list and the invalidation time at which its load started.
#[derive(Clone)]
struct Loaded {
    since: u64,
    ids: Arc<[UserId]>,
}

/// Member lists by group, bounded in bytes, never staler than the last
/// invalidation a lookup could know of.
pub(crate) struct MemberCache {
    cache: moka::future::Cache<GroupId, Loaded>,
    clock: AtomicU64,
    stamps: Box<[AtomicU64]>,
}

impl MemberCache {
    /// A cache of at most `bytes` (weighed) whose entries live `ttl`.
    pub(crate) fn new(bytes: u64, ttl: Duration) -> MemberCache {
        let cache = moka::future::Cache::builder()
            .max_capacity(bytes)
            .weigher(|_, loaded: &Loaded| {
                u32::try_from(loaded.ids.len() * std::mem::size_of::<UserId>() + 72)
                    .unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .build();
        MemberCache {
            cache,
            clock: AtomicU64::new(0),
            stamps: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn stamp(&self, group: GroupId) -> &AtomicU64 {
        // Group ids are dense, so the low bits spread them evenly.
        &self.stamps[(group % STRIPES as u64) as usize]
    }

    /// The group's members, from the cache or from `load` (one load per
    /// group at a time; concurrent lookups share it).
    pub(crate) async fn get<F, Fut>(
        &self,
        group: GroupId,
        load: F,
    ) -> Result<Arc<[UserId]>, Arc<StoreError>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Vec<UserId>, StoreError>>,
    {
        let known = self.stamp(group).load(Ordering::Acquire);
        let loaded = self.load_shared(group, &load).await?;
        if loaded.since >= known {
            return Ok(loaded.ids);
        }
        // Loaded before an invalidation this lookup must see (a load that
        // was in flight, or an entry inserted by one): load afresh.
        self.cache.invalidate(&group).await;
        Ok(self.load_shared(group, &load).await?.ids)
    }

    async fn load_shared<F, Fut>(&self, group: GroupId, load: &F) -> Result<Loaded, Arc<StoreError>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Vec<UserId>, StoreError>>,
    {
        self.cache
            .try_get_with(group, async {
                let since = self.clock.load(Ordering::Acquire);
                let ids = load().await?;
                Ok(Loaded {
                    since,
                    ids: ids.into(),
                })
            })
            .await
    }

    /// Forgets the group's list: lookups from now on load it again.
    pub(crate) async fn invalidate(&self, group: GroupId) {
        let now = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        self.stamp(group).fetch_max(now, Ordering::AcqRel);
        self.cache.invalidate(&group).await;
    }

    #[cfg(test)]
    async fn weighed(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> MemberCache {
        MemberCache::new(1 << 20, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn the_cache_is_bounded_in_bytes() {
        let cache = cache();
        let big: Vec<UserId> = (1..=2000).collect();
        for group in 0..200 {
            let list = big.clone();
            cache
                .get(group, || async { Ok(list.clone()) })
                .await
                .unwrap();
        }
        let (bytes, entries) = cache.weighed().await;
        // 200 groups of 2,000 would be 3.2 MB; at most the budget stays.
        assert!(bytes <= 1 << 20, "{bytes}");
        assert!(entries <= 65, "{entries} groups kept");
    }

    #[tokio::test]
    async fn a_list_is_served_from_the_cache_until_invalidated() {
        let cache = cache();
        let loads = AtomicU64::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::Relaxed);
            Ok(vec![1, 2])
        };
        cache.get(7, load).await.unwrap();
        cache.get(7, load).await.unwrap();
        assert_eq!(loads.load(Ordering::Relaxed), 1);
        cache.invalidate(7).await;
        cache.get(7, load).await.unwrap();
        assert_eq!(loads.load(Ordering::Relaxed), 2);
    }

    /// A load that read the old members, still in flight when the change
    /// is invalidated, must not serve lookups made after the invalidation.
    #[tokio::test]
    async fn a_load_in_flight_at_an_invalidation_serves_no_later_lookup() {
        let cache = Arc::new(cache());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = std::sync::Mutex::new(Some(released));
        let slow = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get(7, || {
                        let gate = released.lock().unwrap().take();
                        async move {
                            if let Some(gate) = gate {
                                let _ = gate.await;
                            }
                            Ok(vec![1, 2, 3])
                        }
                    })
                    .await
                    .unwrap()
            })
        };
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Member 3 is removed and the change invalidated while that load
        // (which read the old list) is in flight.
        cache.invalidate(7).await;
        let later = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(7, || async { Ok(vec![1, 2]) }).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(()).unwrap();
        // The lookup made before the change may use the old list...
        assert_eq!(&*slow.await.unwrap(), &[1, 2, 3]);
        // ...the one after must not, nor may any that follows.
        assert_eq!(&*later.await.unwrap(), &[1, 2]);
        let next = cache.get(7, || async { Ok(vec![1, 2]) }).await.unwrap();
        assert_eq!(&*next, &[1, 2]);
    }
}
