//! Who is online where: the map from a user to all of that user's live
//! connections (devices), and presence subscriptions.
//!
//! Both are sharded maps (dashmap), so routing a push takes one shard's read
//! lock for a lookup and no global lock. Entries exist only for online users
//! and for connections that subscribed to presence.

use dashmap::DashMap;
use smallvec::SmallVec;

use crate::net::ConnRef;
use crate::store::UserId;

type Devices = SmallVec<[ConnRef; 2]>;

/// User → live connections.
#[derive(Default)]
pub struct Registry {
    users: DashMap<UserId, Devices>,
}

impl Registry {
    /// Adds a device; true if the user just came online.
    pub fn add(&self, user: UserId, conn: ConnRef) -> bool {
        let mut devices = self.users.entry(user).or_default();
        let first = devices.is_empty();
        if !devices.contains(&conn) {
            devices.push(conn);
        }
        first
    }

    /// Removes a device; true if that was the user's last one.
    pub fn remove(&self, user: UserId, conn: ConnRef) -> bool {
        let removed = self.users.remove_if_mut(&user, |_, devices| {
            devices.retain(|c| *c != conn);
            devices.is_empty()
        });
        removed.is_some()
    }

    /// Calls `f` for each live connection of `user`.
    pub fn for_each_device(&self, user: UserId, mut f: impl FnMut(ConnRef)) {
        if let Some(devices) = self.users.get(&user) {
            for &conn in devices.iter() {
                f(conn);
            }
        }
    }

    /// Whether the user has a live connection.
    pub fn is_online(&self, user: UserId) -> bool {
        self.users.contains_key(&user)
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
    /// Replaces `conn`'s subscriptions with `users` (deduplicated).
    pub fn subscribe(&self, conn: ConnRef, mut users: Vec<UserId>) {
        self.unsubscribe_all(conn);
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return;
        }
        for &user in &users {
            self.watchers.entry(user).or_default().push(conn);
        }
        self.subscriptions.insert(conn, users.into_boxed_slice());
    }

    /// Drops every subscription of `conn`.
    pub fn unsubscribe_all(&self, conn: ConnRef) {
        let Some((_, users)) = self.subscriptions.remove(&conn) else {
            return;
        };
        for user in users.iter() {
            self.watchers.remove_if_mut(user, |_, conns| {
                conns.retain(|c| *c != conn);
                conns.is_empty()
            });
        }
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
