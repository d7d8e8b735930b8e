//! Sessions: which ones are ended (the revocation set every resume checks)
//! and when each was last used (written to the store in batches).
//!
//! A session is one login of one device; every token issued for it names
//! it, so ending the session refuses them all. The set of ended sessions
//! is kept in memory (a sharded map, so a resume costs one shard lookup and
//! no storage read) and is filled from three sources: the store at start
//! (every session ended within one token lifetime), live from this node's
//! own logouts and, in a cluster, from other nodes' envelopes; and, as the
//! safety net for an envelope Pub/Sub lost, by reading the store's recent
//! ends every [`POLL`]. An entry is dropped once every token issued before
//! the end has expired. Past `capacity` entries the set stops being
//! complete, and resumes of sessions it does not hold read the store
//! instead, until a reload fits again.
//!
//! Last-seen times (authentications and closes) collect in a map keyed by
//! session, so a busy session costs one entry, and are written in one
//! store call when [`TOUCH_BATCH`] sessions are waiting or the oldest has
//! waited [`TOUCH_AGE`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use im_proto::pb::frame::Body;
use im_proto::{ErrorCode, Frame, codec, pb};

use super::auth::validate_password;
use super::{ChatCounters, ChatError, Inner};
use crate::net::ConnRef;
use crate::store::{NewSession, SessionId, SessionScope, SessionTouch, Store, UserId};

/// How often the store's recent session ends are read again.
pub(crate) const POLL: Duration = Duration::from_secs(3);
/// How far back each poll reads (ends committed late by a slow writer).
pub(crate) const POLL_OVERLAP_MS: i64 = 30_000;
/// Sessions whose last-seen time is written in one batch at most.
pub(crate) const TOUCH_BATCH: usize = 512;
/// How long a last-seen time waits at most before it is written.
pub(crate) const TOUCH_AGE: Duration = Duration::from_secs(2);
/// Bytes of a device name at most.
pub(crate) const MAX_DEVICE_NAME: usize = 64;

/// The sessions known to be ended, with when each ended (Unix ms).
pub(crate) struct Revoked {
    ended: DashMap<SessionId, i64>,
    capacity: usize,
    /// Set once a load from the store holds every recent end and nothing
    /// was left out since; until then a session not in the set may still
    /// be ended, and the store says.
    complete: AtomicBool,
    /// How long tokens live: an entry older than this protects nothing.
    ttl_ms: i64,
}

/// What the set knows about a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    /// It is ended.
    Ended,
    /// It is not ended.
    Live,
    /// The set is incomplete: ask the store.
    Unknown,
}

impl Revoked {
    pub(crate) fn new(capacity: usize, token_ttl: Duration) -> Self {
        Revoked {
            ended: DashMap::new(),
            capacity: capacity.max(1),
            complete: AtomicBool::new(false),
            ttl_ms: i64::try_from(token_ttl.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// Whether `id` is ended, as far as the set knows.
    pub(crate) fn check(&self, id: SessionId) -> Known {
        if self.ended.contains_key(&id) {
            Known::Ended
        } else if self.complete.load(Ordering::Acquire) {
            Known::Live
        } else {
            Known::Unknown
        }
    }

    /// Records ended sessions; returns those it did not hold yet.
    pub(crate) fn insert(&self, ids: impl IntoIterator<Item = (SessionId, i64)>) -> Vec<SessionId> {
        let mut fresh = Vec::new();
        for (id, at) in ids {
            if self.ended.len() >= self.capacity && !self.ended.contains_key(&id) {
                self.prune(im_proto::now_ms());
                if self.ended.len() >= self.capacity {
                    // Full of ends that still matter: forget that the set
                    // is complete rather than grow past the bound.
                    if self.complete.swap(false, Ordering::AcqRel) {
                        tracing::warn!(
                            capacity = self.capacity,
                            "ended-session set full; resumes read the store"
                        );
                    }
                    fresh.push(id);
                    continue;
                }
            }
            if self.ended.insert(id, at).is_none() {
                fresh.push(id);
            }
        }
        fresh
    }

    /// Replaces what a load from the store found: `rows` are every end
    /// since one token lifetime ago, unless `truncated`.
    pub(crate) fn loaded(&self, rows: Vec<(SessionId, i64)>, truncated: bool) {
        self.insert(rows);
        let fits = !truncated && self.ended.len() < self.capacity;
        self.complete.store(fits, Ordering::Release);
    }

    /// Drops entries whose tokens have all expired.
    pub(crate) fn prune(&self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.ttl_ms);
        self.ended.retain(|_, at| *at >= horizon);
    }

    /// Unix ms from which the store holds the ends that still matter.
    pub(crate) fn horizon(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.ttl_ms)
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.ended.len()
    }

    /// The most entries held.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether a session not held is known to be live.
    pub(crate) fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }
}

/// Last-seen times waiting to be written.
#[derive(Default)]
pub(crate) struct Touches {
    /// A plain mutex: held for one map insert or one swap, never across an
    /// await.
    waiting: Mutex<(HashMap<SessionId, SessionTouch>, Option<Instant>)>,
}

/// Sessions waiting for their last-seen time at most (while the store is
/// slow or away): past it, touches of further sessions are dropped.
const MAX_WAITING_TOUCHES: usize = TOUCH_BATCH * 64;

impl Touches {
    /// Records a use of a session; true when a batch is full and should be
    /// written now.
    pub(crate) fn touch(&self, id: SessionId, address: Option<String>) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (map, since) = &mut *waiting;
        since.get_or_insert_with(Instant::now);
        let at_ms = im_proto::now_ms();
        if map.len() >= MAX_WAITING_TOUCHES && !map.contains_key(&id) {
            return true;
        }
        let entry = map.entry(id).or_insert(SessionTouch {
            id,
            at_ms,
            address: None,
        });
        entry.at_ms = entry.at_ms.max(at_ms);
        if address.is_some() {
            entry.address = address;
        }
        map.len() >= TOUCH_BATCH
    }

    /// The waiting batch, if it is full or old enough (or `force`).
    pub(crate) fn take(&self, force: bool) -> Vec<SessionTouch> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (map, since) = &mut *waiting;
        let due = map.len() >= TOUCH_BATCH || since.is_some_and(|s| s.elapsed() >= TOUCH_AGE);
        if map.is_empty() || !(due || force) {
            return Vec::new();
        }
        *since = None;
        map.drain().map(|(_, t)| t).collect()
    }

    /// Puts back a batch the store did not take (newer touches win).
    pub(crate) fn restore(&self, batch: Vec<SessionTouch>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (map, since) = &mut *waiting;
        since.get_or_insert_with(Instant::now);
        for t in batch {
            // Bounded like the batch itself: a store that stays away
            // loses the oldest last-seen times, not memory.
            if map.len() >= MAX_WAITING_TOUCHES {
                break;
            }
            map.entry(t.id).or_insert(t);
        }
    }
}

/// Checks and normalises a device name from a login or registration.
pub(crate) fn device_name(name: &str) -> Result<String, ChatError> {
    if name.len() > MAX_DEVICE_NAME || name.chars().any(char::is_control) {
        return Err(ChatError::invalid(
            "device_name must be at most 64 bytes without control characters",
        ));
    }
    Ok(name.trim().to_owned())
}

// ---- the session requests and their effects ----

/// Sessions ended by one request at most that are named in one envelope
/// to other nodes (more go in several).
const ENDS_PER_ENVELOPE: usize = 4096;

/// Loads the ended sessions and starts the task that writes last-seen
/// times and polls for ends.
pub(crate) async fn start<S: Store>(inner: &Arc<Inner<S>>) {
    let started = im_proto::now_ms();
    let loaded = inner.load_ended().await;
    let weak = Arc::downgrade(inner);
    inner.runtime.spawn(async move {
        let mut loaded = loaded;
        let mut polled_at = started;
        let mut next_poll = Instant::now() + POLL;
        loop {
            let Some(inner) = weak.upgrade() else { return };
            tokio::select! {
                _ = inner.touch_wake.notified() => {}
                _ = tokio::time::sleep(TOUCH_AGE / 4) => {}
            }
            inner.flush_touches(false).await;
            if Instant::now() < next_poll {
                continue;
            }
            next_poll = Instant::now() + POLL;
            let now = im_proto::now_ms();
            if !loaded || !inner.revoked.is_complete() {
                loaded = inner.load_ended().await;
                polled_at = now;
                continue;
            }
            let since = polled_at.saturating_sub(POLL_OVERLAP_MS);
            match inner
                .store
                .ended_since(since, inner.revoked.capacity())
                .await
            {
                Ok(rows) => {
                    polled_at = now;
                    let fresh = inner.revoked.insert(rows);
                    if !fresh.is_empty() {
                        // Ends whose envelope did not arrive: close their
                        // connections here too.
                        tracing::info!(sessions = fresh.len(), "session ends found by polling");
                        inner.close_sessions(&fresh, None);
                    }
                    inner.revoked.prune(now);
                }
                Err(e) => tracing::warn!(error = %e, "polling for ended sessions failed"),
            }
        }
    });
}

impl<S: Store> Inner<S> {
    /// Loads every end within one token lifetime; true on success.
    async fn load_ended(&self) -> bool {
        let now = im_proto::now_ms();
        let cap = self.revoked.capacity();
        match self
            .store
            .ended_since(self.revoked.horizon(now), cap.saturating_add(1))
            .await
        {
            Ok(rows) => {
                let truncated = rows.len() > cap;
                let count = rows.len();
                self.revoked.loaded(rows, truncated);
                tracing::info!(sessions = count, "ended sessions loaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load ended sessions; resumes read the store");
                false
            }
        }
    }

    /// Whether a token's session may resume: the set answers, or the
    /// store when the set cannot tell.
    pub(crate) async fn session_live(&self, id: u64) -> Result<bool, ChatError> {
        match self.revoked.check(id) {
            Known::Ended => Ok(false),
            Known::Live => Ok(true),
            Known::Unknown => Ok(!self.store.session_ended(id).await?),
        }
    }

    /// A session of `user` starting now, within the device limit.
    pub(crate) fn new_session(
        &self,
        user: UserId,
        device_name: String,
        address: String,
    ) -> NewSession {
        let now = im_proto::now_ms();
        NewSession {
            user,
            device_name,
            address,
            now_ms: now,
            max_live: self.config.max_devices_per_user.max(1),
            live_since_ms: self.revoked.horizon(now),
        }
    }

    /// Starts a session for a login or registration, ending the user's
    /// least recently used ones beyond the device limit.
    pub(crate) async fn start_session(
        &self,
        user: UserId,
        device_name: String,
        address: String,
    ) -> Result<u64, ChatError> {
        let (id, ended) = self
            .store
            .create_session(self.new_session(user, device_name, address))
            .await?;
        if !ended.is_empty() {
            tracing::info!(user, sessions = ?ended, "device limit reached; oldest sessions ended");
            ChatCounters::add(&self.counters.sessions_ended_by_limit, ended.len() as u64);
            self.sessions_ended(ended, None).await;
        }
        Ok(id)
    }

    /// Records a use of a session, to be written with the next batch.
    pub(crate) fn touch(&self, session: u64, address: Option<String>) {
        if self.touches.touch(session, address) {
            self.touch_wake.notify_one();
        }
    }

    /// Writes the waiting last-seen times if a batch is due (or `force`).
    pub(crate) async fn flush_touches(&self, force: bool) {
        let batch = self.touches.take(force);
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch_sessions(batch.clone()).await {
            tracing::warn!(error = %e, sessions = batch.len(), "writing last-seen times failed");
            self.touches.restore(batch);
        }
    }

    /// Sessions just ended (in the store): refuse their tokens and close
    /// their connections here and, before returning, on every other node.
    /// `skip` is left open (the caller closes it after its reply).
    pub(crate) async fn sessions_ended(&self, ids: Vec<u64>, skip: Option<ConnRef>) {
        if ids.is_empty() {
            return;
        }
        ChatCounters::add(&self.counters.sessions_ended, ids.len() as u64);
        self.end_local(&ids, im_proto::now_ms(), skip);
        if let Some(cluster) = &self.cluster {
            for chunk in ids.chunks(ENDS_PER_ENVELOPE) {
                cluster.sessions_ended(chunk.to_vec()).await;
            }
        }
    }

    /// Records ends (here only) and closes the sessions' connections.
    pub(crate) fn end_local(&self, ids: &[u64], at_ms: i64, skip: Option<ConnRef>) {
        // The set first: an authentication racing this either finds the
        // end when it checks again after registering its connection, or is
        // registered already and closed below.
        self.revoked.insert(ids.iter().map(|&id| (id, at_ms)));
        self.close_sessions(ids, skip);
    }

    fn close_sessions(&self, ids: &[u64], skip: Option<ConnRef>) {
        let mut frame = None;
        for &id in ids {
            for conn in self.registry.connections_of(id) {
                if Some(conn) != skip {
                    let bytes = frame.get_or_insert_with(revoked_frame).clone();
                    self.out.close(conn, Some(bytes));
                }
            }
        }
    }

    /// Closes `conn` with SESSION_REVOKED if its session has ended.
    pub(crate) fn close_if_ended(&self, user: UserId, conn: ConnRef) {
        if let Some(session) = self.registry.session_of(user, conn) {
            if self.revoked.check(session) == Known::Ended {
                self.out.close(conn, Some(revoked_frame()));
            }
        }
    }

    fn own_session(&self, user: UserId, conn: ConnRef) -> Result<u64, ChatError> {
        // Present for as long as the connection is open.
        self.registry
            .session_of(user, conn)
            .ok_or(ChatError::Internal)
    }

    pub(crate) async fn logout(
        &self,
        conn: ConnRef,
        user: UserId,
        r: pb::LogoutRequest,
    ) -> Result<Body, ChatError> {
        let own = self.own_session(user, conn)?;
        let scope = if r.all {
            SessionScope::All
        } else {
            SessionScope::One(own)
        };
        let ended = match self
            .store
            .end_sessions(user, scope, im_proto::now_ms())
            .await
        {
            // Ended meanwhile (another device ended it): nothing left to do.
            Err(crate::store::StoreError::NotFound) => Vec::new(),
            other => other?,
        };
        tracing::info!(user, all = r.all, sessions = ended.len(), "logged out");
        self.sessions_ended(ended, Some(conn)).await;
        Ok(Body::Done(pb::Done {}))
    }

    pub(crate) async fn end_session(
        &self,
        conn: ConnRef,
        user: UserId,
        r: pb::EndSessionRequest,
    ) -> Result<Body, ChatError> {
        let ended = self
            .store
            .end_sessions(user, SessionScope::One(r.session_id), im_proto::now_ms())
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound => ChatError::NotFound("no such session"),
                e => e.into(),
            })?;
        self.sessions_ended(ended, Some(conn)).await;
        Ok(Body::Done(pb::Done {}))
    }

    pub(crate) async fn list_sessions(
        &self,
        conn: ConnRef,
        user: UserId,
    ) -> Result<Body, ChatError> {
        let own = self.own_session(user, conn)?;
        let now = im_proto::now_ms();
        let records = self.store.sessions(user, self.revoked.horizon(now)).await?;
        let sessions = records
            .into_iter()
            .map(|s| pb::SessionInfo {
                session_id: s.id,
                device_name: s.device_name,
                address: s.address,
                created_ms: s.created_ms,
                last_seen_ms: s.last_seen_ms,
                current: s.id == own,
            })
            .collect();
        Ok(Body::SessionList(pb::SessionList { sessions }))
    }

    pub(crate) async fn change_password(
        &self,
        conn: ConnRef,
        user: UserId,
        r: pb::ChangePasswordRequest,
    ) -> Result<Body, ChatError> {
        let own = self.own_session(user, conn)?;
        validate_password(&r.new_password)?;
        if r.old_password.len() > 1024 {
            return Err(ChatError::InvalidCredentials);
        }
        let username = self
            .store
            .lookup_users(&[user], &[])
            .await?
            .into_iter()
            .next()
            .map(|(_, name)| name)
            .ok_or(ChatError::Internal)?;
        self.limiter.check(None, &username)?;
        let record = self.store.user_by_name(&username).await?;
        let hash = record.map(|u| u.password_hash);
        if !self.passwords.verify(r.old_password, hash).await? {
            self.limiter.record_failure(None, &username);
            return Err(ChatError::InvalidCredentials);
        }
        let hash = self.passwords.hash(r.new_password).await?;
        self.store.set_password(user, &hash).await?;
        let ended = self
            .store
            .end_sessions(user, SessionScope::AllBut(own), im_proto::now_ms())
            .await?;
        tracing::info!(user, sessions = ended.len(), "password changed");
        self.sessions_ended(ended, None).await;
        Ok(Body::Done(pb::Done {}))
    }
}

/// The fatal error a connection of an ended session gets.
fn revoked_frame() -> bytes::Bytes {
    codec::encode_to_bytes(&Frame::error(
        0,
        ErrorCode::SessionRevoked,
        "this session was ended; log in again",
        true,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_is_bounded_and_says_when_it_cannot_tell() {
        let set = Revoked::new(4, Duration::from_secs(60));
        assert_eq!(set.check(1), Known::Unknown, "not loaded yet");
        set.loaded(vec![(1, im_proto::now_ms())], false);
        assert_eq!(set.check(1), Known::Ended);
        assert_eq!(set.check(2), Known::Live);
        let now = im_proto::now_ms();
        assert_eq!(set.insert([(2, now), (3, now), (2, now)]), [2, 3]);
        // An end older than a token lifetime is pruned to make room.
        set.insert([(4, now - 120_000)]);
        assert_eq!(set.insert([(5, now)]), [5]);
        assert_eq!(set.check(4), Known::Live);
        assert_eq!(set.len(), 4);
        // Full of ends that matter: the next one is not held, and the set
        // stops vouching for sessions it does not hold.
        set.insert([(6, now)]);
        assert_eq!(set.len(), 4);
        assert_eq!(set.check(6), Known::Unknown);
        assert_eq!(set.check(1), Known::Ended);
    }

    #[test]
    fn touches_coalesce_per_session_and_flush_when_full() {
        let touches = Touches::default();
        assert!(!touches.touch(1, Some("10.0.0.1".into())));
        assert!(!touches.touch(1, None));
        assert!(touches.take(false).is_empty(), "neither full nor old");
        let batch = touches.take(true);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].address.as_deref(), Some("10.0.0.1"));
        let full = (0..TOUCH_BATCH as u64).any(|i| touches.touch(i, None));
        assert!(full);
        assert_eq!(touches.take(false).len(), TOUCH_BATCH);
    }

    #[test]
    fn device_names_are_checked() {
        assert_eq!(device_name(" phone ").unwrap(), "phone");
        assert!(device_name(&"x".repeat(65)).is_err());
        assert!(device_name("a\nb").is_err());
    }
}
