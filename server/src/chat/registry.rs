//! Who is online where: the map from a user to all of that user's live
//! connections (devices) and the session of each, the map from a session
//! to its connections (to close them when it ends), and presence
//! subscriptions.
//!
//! Both are sharded maps (dashmap), so routing a push takes one shard's read
//! lock for a lookup and no global lock. Entries exist only for online users
//! and for connections that subscribed to presence.

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use smallvec::SmallVec;

use crate::net::ConnRef;
use crate::store::{SessionId, UserId};

type Devices = SmallVec<[(ConnRef, SessionId); 2]>;

/// User → live connections, and session → live connections.
#[derive(Default)]
pub struct Registry {
    users: DashMap<UserId, Devices>,
    sessions: DashMap<SessionId, SmallVec<[ConnRef; 1]>>,
}

impl Registry {
    /// Adds a device of `session`; true if the user just came online.
    pub fn add(&self, user: UserId, conn: ConnRef, session: SessionId) -> bool {
        let mut devices = self.users.entry(user).or_default();
        let first = devices.is_empty();
        if !devices.iter().any(|(c, _)| *c == conn) {
            devices.push((conn, session));
            // Lock order: a user's entry, then a session's (nothing takes
            // them the other way round).
            self.sessions.entry(session).or_default().push(conn);
        }
        first
    }

    /// Removes a device; true if that was the user's last one, and the
    /// session it belonged to.
    pub fn remove(&self, user: UserId, conn: ConnRef) -> (bool, Option<SessionId>) {
        let mut session = None;
        let removed = self.users.remove_if_mut(&user, |_, devices| {
            if let Some(i) = devices.iter().position(|(c, _)| *c == conn) {
                let (_, s) = devices.swap_remove(i);
                session = Some(s);
                self.sessions.remove_if_mut(&s, |_, conns| {
                    conns.retain(|c| *c != conn);
                    conns.is_empty()
                });
            }
            devices.is_empty()
        });
        (removed.is_some(), session)
    }

    /// Calls `f` for each live connection of `user`.
    pub fn for_each_device(&self, user: UserId, mut f: impl FnMut(ConnRef)) {
        if let Some(devices) = self.users.get(&user) {
            for &(conn, _) in devices.iter() {
                f(conn);
            }
        }
    }

    /// Whether `conn` is a live connection of `user`.
    pub fn has_device(&self, user: UserId, conn: ConnRef) -> bool {
        self.session_of(user, conn).is_some()
    }

    /// The session of `user`'s connection `conn`.
    pub fn session_of(&self, user: UserId, conn: ConnRef) -> Option<SessionId> {
        self.users.get(&user).and_then(|devices| {
            devices
                .iter()
                .find(|(c, _)| *c == conn)
                .map(|&(_, session)| session)
        })
    }

    /// The live connections of `session`.
    pub fn connections_of(&self, session: SessionId) -> SmallVec<[ConnRef; 1]> {
        self.sessions
            .get(&session)
            .map(|conns| conns.clone())
            .unwrap_or_default()
    }

    /// Whether the user has a live connection.
    pub fn is_online(&self, user: UserId) -> bool {
        self.users.contains_key(&user)
    }

    /// Calls `f` for every live connection.
    pub fn for_each_connection(&self, mut f: impl FnMut(ConnRef)) {
        for entry in self.users.iter() {
            for &(conn, _) in entry.value().iter() {
                f(conn);
            }
        }
    }

    /// Every online user.
    pub fn users(&self) -> Vec<UserId> {
        self.users.iter().map(|e| *e.key()).collect()
    }

    /// Number of online users.
    pub fn online_users(&self) -> usize {
        self.users.len()
    }
}

/// Presence subscriptions: watched user → watching connections, and the
/// reverse for clean-up when a connection goes.
#[derive(Default)]
pub struct PresenceHub {
    watchers: DashMap<UserId, SmallVec<[ConnRef; 4]>>,
    subscriptions: DashMap<ConnRef, Box<[UserId]>>,
}

impl PresenceHub {
    /// Replaces `conn`'s subscriptions with `users` (deduplicated), then
    /// asks `live` whether the connection still exists and drops what it
    /// just added if not.
    ///
    /// The connection's entry stays locked while its watchers change, so
    /// two subscribes of one connection apply one after the other and the
    /// watchers always match the connection's list. A subscribe handled
    /// after its connection closed cleans up after itself: the closing side
    /// removes the connection from the registry before it unsubscribes, so
    /// either `live` sees it gone or that unsubscribe sees this list.
    pub fn subscribe(&self, conn: ConnRef, mut users: Vec<UserId>, live: impl FnOnce() -> bool) {
        users.sort_unstable();
        users.dedup();
        // Lock order: a subscriptions entry, then watcher entries (nothing
        // takes them the other way round).
        match self.subscriptions.entry(conn) {
            Entry::Occupied(mut entry) => {
                self.remove_watcher(conn, entry.get());
                if users.is_empty() {
                    entry.remove();
                } else {
                    self.add_watcher(conn, &users);
                    entry.insert(users.into_boxed_slice());
                }
            }
            Entry::Vacant(entry) => {
                if !users.is_empty() {
                    self.add_watcher(conn, &users);
                    entry.insert(users.into_boxed_slice());
                }
            }
        }
        if !live() {
            self.unsubscribe_all(conn);
        }
    }

    fn add_watcher(&self, conn: ConnRef, users: &[UserId]) {
        for &user in users {
            self.watchers.entry(user).or_default().push(conn);
        }
    }

    fn remove_watcher(&self, conn: ConnRef, users: &[UserId]) {
        for user in users {
            self.watchers.remove_if_mut(user, |_, conns| {
                conns.retain(|c| *c != conn);
                conns.is_empty()
            });
        }
    }

    /// Drops every subscription of `conn`.
    pub fn unsubscribe_all(&self, conn: ConnRef) {
        if let Some((_, users)) = self.subscriptions.remove(&conn) {
            self.remove_watcher(conn, &users);
        }
    }

    /// Connections with at least one subscription.
    pub fn subscribed_connections(&self) -> usize {
        self.subscriptions.len()
    }

    /// Watched users.
    pub fn watched_users(&self) -> usize {
        self.watchers.len()
    }

    /// Every watched user.
    pub fn watched(&self) -> Vec<UserId> {
        self.watchers.iter().map(|e| *e.key()).collect()
    }

    /// Calls `f` for each connection watching `user`.
    pub fn for_each_watcher(&self, user: UserId, mut f: impl FnMut(ConnRef)) {
        if let Some(conns) = self.watchers.get(&user) {
            for &conn in conns.iter() {
                f(conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    fn watchers_of(hub: &PresenceHub, user: UserId) -> Vec<ConnRef> {
        let mut conns = Vec::new();
        hub.for_each_watcher(user, |c| conns.push(c));
        conns
    }

    #[test]
    fn a_subscribe_handled_after_the_close_leaves_nothing() {
        let registry = Registry::default();
        let hub = PresenceHub::default();
        let conn = ConnRef::for_test(1);
        registry.add(7, conn, 1);
        // The connection closes (registry first, then its subscriptions)...
        registry.remove(7, conn);
        hub.unsubscribe_all(conn);
        // ...and only then is its subscribe request handled.
        hub.subscribe(conn, vec![1, 2, 3], || registry.has_device(7, conn));
        assert_eq!(hub.subscribed_connections(), 0);
        assert_eq!(hub.watched_users(), 0);
    }

    #[test]
    fn connections_are_found_by_session_until_they_close() {
        let registry = Registry::default();
        let (a, b, c) = (
            ConnRef::for_test(1),
            ConnRef::for_test(2),
            ConnRef::for_test(3),
        );
        assert!(registry.add(7, a, 10));
        assert!(!registry.add(7, b, 10));
        assert!(!registry.add(7, c, 11));
        assert_eq!(registry.connections_of(10).as_slice(), [a, b]);
        assert_eq!(registry.session_of(7, c), Some(11));
        assert_eq!(registry.remove(7, a), (false, Some(10)));
        assert_eq!(registry.connections_of(10).as_slice(), [b]);
        assert_eq!(registry.remove(7, b), (false, Some(10)));
        assert!(registry.connections_of(10).is_empty());
        assert_eq!(registry.remove(7, c), (true, Some(11)));
        assert_eq!(registry.remove(7, c), (false, None));
    }

    #[test]
    fn replacing_keeps_watchers_equal_to_the_list() {
        let hub = PresenceHub::default();
        let conn = ConnRef::for_test(1);
        hub.subscribe(conn, vec![3, 1, 3, 2], || true);
        assert_eq!(watchers_of(&hub, 3), [conn]);
        hub.subscribe(conn, vec![2, 4], || true);
        assert!(watchers_of(&hub, 1).is_empty());
        assert_eq!(watchers_of(&hub, 4), [conn]);
        hub.subscribe(conn, Vec::new(), || true);
        assert_eq!((hub.subscribed_connections(), hub.watched_users()), (0, 0));
    }

    #[test]
    fn concurrent_subscribes_of_one_connection_leave_one_consistent_list() {
        let hub = Arc::new(PresenceHub::default());
        let conn = ConnRef::for_test(1);
        for round in 0..200u64 {
            let barrier = Arc::new(Barrier::new(4));
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let (hub, barrier) = (hub.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let base = 1 + (round * 4 + t) * 10;
                        hub.subscribe(conn, (base..base + 10).collect(), || true);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            // Exactly the ten users of the subscribe that won are watched.
            assert_eq!(hub.subscribed_connections(), 1);
            assert_eq!(hub.watched_users(), 10, "round {round}");
        }
        hub.unsubscribe_all(conn);
        assert_eq!((hub.subscribed_connections(), hub.watched_users()), (0, 0));
    }
}
