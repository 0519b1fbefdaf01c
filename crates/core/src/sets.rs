//! SETs: the units a cluster of hongbao processes is cut into (WeChat's
//! term). Each SET is one engine with its own store, and owns two things:
//!
//! - a range of packet ids: the SET is written in the id's top bits
//!   (`ids::set_of`), so any process routes a packet request from its id
//!   alone;
//! - the users homed on it: `home_set(user, sets) = user % sets`. The modulo
//!   spreads users evenly over the SETs (user ids are handed out densely by
//!   the app server), and every process computes it from nothing but the
//!   number of SETs in the cluster file: no directory to look users up in,
//!   no lookup on the request path. The price is that the number of SETs is
//!   fixed for the data's life: changing it would move users (and their
//!   balances) to other SETs, and resharding is out of scope here.
//!
//! A single node (`hongbao serve`) is SET 0 of 1 (`SetMap::single`): every
//! user is homed on it, every id it makes has SET bits 0, exactly the ids it
//! made before SETs existed.

use crate::{PacketId, UserId};

/// A SET's number, `0..sets`.
pub type SetId = u8;

/// The most SETs a cluster may have: 5 bits of a packet id
/// (`ids::SET_BITS`), which keeps ids below 2^53, safe as JSON numbers.
pub const SETS_MAX: u8 = 32;

/// A SET map that cannot be: the cluster's size or this SET's number out of range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SetMapError {
    #[error("the number of SETs must be between 1 and {SETS_MAX}, got {0}")]
    SetCount(u8),
    #[error("SET {set} does not exist in a cluster of {sets} SETs (they are numbered 0 to {})", sets - 1)]
    SetNumber { set: SetId, sets: u8 },
}

/// Which SET this process is, of how many: what it owns follows from the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SetMap {
    set: SetId,
    sets: u8,
}

impl SetMap {
    /// SET `set` of a cluster of `sets` (`1..=SETS_MAX`, `set < sets`).
    pub fn new(set: SetId, sets: u8) -> Result<SetMap, SetMapError> {
        if sets == 0 || sets > SETS_MAX {
            return Err(SetMapError::SetCount(sets));
        }
        if set >= sets {
            return Err(SetMapError::SetNumber { set, sets });
        }
        Ok(SetMap { set, sets })
    }

    /// A single node: SET 0 of 1, which owns every user and the ids of SET 0.
    pub const fn single() -> SetMap {
        SetMap { set: 0, sets: 1 }
    }

    /// This SET's number.
    pub fn set(&self) -> SetId {
        self.set
    }

    /// How many SETs the cluster has.
    pub fn sets(&self) -> u8 {
        self.sets
    }

    /// True when `user` is homed on this SET (always, on a single node,
    /// which then skips even the division: this is asked on every request).
    pub fn owns_user(&self, user: UserId) -> bool {
        self.sets == 1 || home_set(user, self.sets) == self.set
    }

    /// True when `packet` was made by this SET (its id carries this SET).
    pub fn owns_packet(&self, packet: PacketId) -> bool {
        crate::ids::set_of(packet) == self.set
    }
}

impl Default for SetMap {
    fn default() -> SetMap {
        SetMap::single()
    }
}

/// The SET `user` is homed on, in a cluster of `sets` SETs: `user % sets`.
/// `sets` is `1..=SETS_MAX` (`SetMap` guarantees it); 0 is taken as 1 rather
/// than dividing by zero.
pub fn home_set(user: UserId, sets: u8) -> SetId {
    // The remainder is below `sets`, a u8: the cast cannot truncate.
    (user % u64::from(sets.max(1))) as SetId
}

/// The shard of its home SET that serves `user` (its shakes, its pool):
/// `(user / sets) % shards`. Not `user % shards`: a SET's users all share
/// `user % sets`, so when the SET and shard counts share a factor the plain
/// remainder would leave shards with no users. The engine and every gateway
/// answering shakes from a copy of the gates use this one rule.
pub fn user_shard(user: UserId, sets: u8, shards: usize) -> usize {
    assert!(shards > 0, "a SET has at least one shard");
    ((user / u64::from(sets.max(1))) % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::make_packet_id;
    use proptest::prelude::*;

    #[test]
    fn set_maps_out_of_range_are_refused_with_a_reason() {
        assert_eq!(SetMap::new(0, 0), Err(SetMapError::SetCount(0)));
        assert_eq!(SetMap::new(0, SETS_MAX + 1), Err(SetMapError::SetCount(SETS_MAX + 1)));
        assert_eq!(SetMap::new(2, 2), Err(SetMapError::SetNumber { set: 2, sets: 2 }));
        assert_eq!(
            SetMap::new(2, 2).unwrap_err().to_string(),
            "SET 2 does not exist in a cluster of 2 SETs (they are numbered 0 to 1)"
        );
        let last = SetMap::new(SETS_MAX - 1, SETS_MAX).unwrap();
        assert_eq!((last.set(), last.sets()), (SETS_MAX - 1, SETS_MAX));
        assert_eq!(SetMap::default(), SetMap::single());
        assert_eq!(SetMap::new(0, 1), Ok(SetMap::single()));
    }

    #[test]
    fn a_single_node_owns_every_user_and_the_ids_it_always_made() {
        let single = SetMap::single();
        for user in [1, 2, 3, 1 << 40, crate::ID_MAX] {
            assert!(single.owns_user(user));
        }
        // Ids as they were before SETs: `shard << 40 | sequence`.
        assert!(single.owns_packet((255 << 40) | 7));
        assert!(!single.owns_packet(make_packet_id(1, 0, 7)));
    }

    #[test]
    fn users_are_homed_by_their_id_modulo_the_set_count() {
        let one_of_two = SetMap::new(1, 2).unwrap();
        assert!(one_of_two.owns_user(3));
        assert!(!one_of_two.owns_user(4));
        assert_eq!(home_set(4, 2), 0);
        assert_eq!(home_set(9, 0), 0, "0 SETs is taken as 1");
        assert!(one_of_two.owns_packet(make_packet_id(1, 3, 1)));
        assert!(!one_of_two.owns_packet(make_packet_id(0, 3, 1)));
        // An id above 2^53 names no SET: nobody owns it.
        assert!(!one_of_two.owns_packet(u64::MAX));
    }

    proptest! {
        #[test]
        fn every_user_has_exactly_one_home(user in 1u64..=crate::ID_MAX, sets in 1u8..=SETS_MAX) {
            let homes = (0..sets).filter(|&set| SetMap::new(set, sets).unwrap().owns_user(user)).count();
            prop_assert_eq!(homes, 1);
            prop_assert!(home_set(user, sets) < sets);
        }
    }
}
