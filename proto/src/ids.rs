//! Conversation ids: stateless, derived from the participants.
//!
//! A direct (1:1) conversation between users `a` and `b` has the id
//! `(min(a, b) << 31) | max(a, b)`, so client and server compute it without a
//! lookup. A group conversation is `(1 << 62) | group_id`. User ids lie in
//! `[1, 2^31)` and group ids in `[1, 2^62)`, so every id is a positive `i64`
//! as well (SQL stores them as signed 64-bit integers).

/// Largest valid user id.
pub const MAX_USER_ID: u64 = (1 << 31) - 1;
/// Largest valid group id.
pub const MAX_GROUP_ID: u64 = (1 << 62) - 1;
/// The conversation id of group 0 (not a valid group): group `g`'s
/// conversation is `GROUP_BASE | g`, and every group conversation id is at
/// least this.
pub const GROUP_BASE: u64 = 1 << 62;

/// A conversation id together with what it encodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(u64);

/// What a conversation id refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationKind {
    /// A 1:1 conversation; `lo <= hi` (equal for notes to oneself).
    Direct {
        /// The smaller user id.
        lo: u64,
        /// The larger user id.
        hi: u64,
    },
    /// A group conversation.
    Group(u64),
}

impl ConversationId {
    /// The direct conversation between two users, or `None` if either id is
    /// out of range.
    pub fn direct(a: u64, b: u64) -> Option<Self> {
        let valid = |u: u64| (1..=MAX_USER_ID).contains(&u);
        if !valid(a) || !valid(b) {
            return None;
        }
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        Some(ConversationId((lo << 31) | hi))
    }

    /// The conversation of a group, or `None` if the id is out of range.
    pub fn group(group_id: u64) -> Option<Self> {
        (1..=MAX_GROUP_ID)
            .contains(&group_id)
            .then_some(ConversationId(GROUP_BASE | group_id))
    }

    /// Checks a raw id received from the wire.
    pub fn from_raw(raw: u64) -> Option<Self> {
        let id = ConversationId(raw);
        match id.kind() {
            ConversationKind::Direct { lo, hi } if lo >= 1 && lo <= hi => Some(id),
            ConversationKind::Group(g) if g >= 1 && raw & (1 << 63) == 0 => Some(id),
            _ => None,
        }
    }

    /// The raw 64-bit id.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// What this id refers to.
    pub fn kind(self) -> ConversationKind {
        if self.0 & GROUP_BASE != 0 {
            ConversationKind::Group(self.0 & MAX_GROUP_ID)
        } else {
            ConversationKind::Direct {
                lo: self.0 >> 31,
                hi: self.0 & MAX_USER_ID,
            }
        }
    }

    /// The group id, for a group conversation.
    pub fn group_id(self) -> Option<u64> {
        match self.kind() {
            ConversationKind::Group(g) => Some(g),
            ConversationKind::Direct { .. } => None,
        }
    }

    /// For a direct conversation that `user` takes part in, the other
    /// participant (the user itself for notes to oneself).
    pub fn peer_of(self, user: u64) -> Option<u64> {
        match self.kind() {
            ConversationKind::Direct { lo, hi } if lo == user => Some(hi),
            ConversationKind::Direct { lo, hi } if hi == user => Some(lo),
            _ => None,
        }
    }
}

impl std::fmt::Display for ConversationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind() {
            ConversationKind::Direct { lo, hi } => write!(f, "direct:{lo}-{hi}"),
            ConversationKind::Group(g) => write!(f, "group:{g}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_is_symmetric_and_round_trips() {
        let c = ConversationId::direct(7, 3).unwrap();
        assert_eq!(c, ConversationId::direct(3, 7).unwrap());
        assert_eq!(c.kind(), ConversationKind::Direct { lo: 3, hi: 7 });
        assert_eq!(c.peer_of(3), Some(7));
        assert_eq!(c.peer_of(7), Some(3));
        assert_eq!(c.peer_of(4), None);
        assert_eq!(ConversationId::from_raw(c.raw()), Some(c));
    }

    #[test]
    fn extreme_ids_stay_positive_i64() {
        let c = ConversationId::direct(MAX_USER_ID, MAX_USER_ID).unwrap();
        assert!(i64::try_from(c.raw()).is_ok());
        let g = ConversationId::group(MAX_GROUP_ID).unwrap();
        assert!(i64::try_from(g.raw()).is_ok());
        assert_eq!(g.group_id(), Some(MAX_GROUP_ID));
    }

    #[test]
    fn invalid_ids_are_refused() {
        assert!(ConversationId::direct(0, 5).is_none());
        assert!(ConversationId::direct(MAX_USER_ID + 1, 5).is_none());
        assert!(ConversationId::group(0).is_none());
        assert!(ConversationId::from_raw(0).is_none());
        assert!(ConversationId::from_raw(5).is_none()); // lo = 0
        assert!(ConversationId::from_raw((9 << 31) | 4).is_none()); // lo > hi
        assert!(ConversationId::from_raw(1 << 63).is_none());
        assert!(ConversationId::from_raw(1 << 62).is_none()); // group 0
    }
}
