//! Packet ids: `set << 48 | shard << 40 | day << 26 | n`. The SET that made
//! the packet (`crate::sets`), its owning shard in that SET, and the day it
//! was made (days since 2020-01-01, UTC) are readable from the id alone: a
//! gateway routes a packet request to its SET, the SET's engine to the
//! shard, and a store puts a packet's rows in a partition per shard-hash ×
//! day and finds them again from the id (WeChat's `db_xx.t_y_dd`). With 5
//! bits of SET ids stay below 2^53 (safe as JSON numbers); a single node is
//! SET 0, so its ids are `shard << 40 | sequence` (below 2^48) as before
//! SETs existed. Each shard's sequence (`day << 26 | n`)
//! is handed out in blocks that are persisted before use, so an id is never
//! reused, across restarts too (unused ids of a block are skipped); a new day
//! starts at its own range, and a day that makes more than 2^26 packets on
//! one shard runs on into the next day's range (ids never go backwards).

use crate::sets::{SetId, SETS_MAX};
use crate::PacketId;

pub const SEQUENCE_BITS: u32 = 40;
pub const SEQUENCE_MAX: u64 = (1 << SEQUENCE_BITS) - 1;
/// Bits of the shard, above the sequence: `limits::SHARDS_MAX` shards.
pub const SHARD_BITS: u32 = 8;
const SHARD_MASK: u64 = (1 << SHARD_BITS) - 1;
/// Where the SET starts in an id, above the shard.
pub const SET_SHIFT: u32 = SEQUENCE_BITS + SHARD_BITS;
/// Bits of the SET: `sets::SETS_MAX` SETs.
pub const SET_BITS: u32 = 5;
/// Every packet id is at most this: 2^53 - 1, the largest integer a JSON
/// number (an IEEE double) holds exactly.
pub const PACKET_ID_MAX: PacketId = (1 << (SET_SHIFT + SET_BITS)) - 1;

const _: () = assert!(1 << SHARD_BITS == crate::limits::SHARDS_MAX);
const _: () = assert!(1 << SET_BITS == SETS_MAX as usize);
const _: () = assert!(PACKET_ID_MAX == crate::ID_MAX);
/// Bits of the day in the sequence: 16,384 days, until 2064.
pub const DAY_BITS: u32 = 14;
/// A day's range of each shard's sequence: 2^26, 67 million packets.
pub const DAY_SHIFT: u32 = SEQUENCE_BITS - DAY_BITS;
pub const DAY_MAX: u32 = (1 << DAY_BITS) - 1;
/// 2020-01-01 in days since 1970-01-01: day 0 of packet ids.
pub const EPOCH_UNIX_DAY: u64 = 18_262;
const MS_PER_DAY: u64 = 86_400_000;

/// The packet-id day of a wall-clock time (0 before 2020, `DAY_MAX` after 2064).
pub fn day_of_unix_ms(unix_ms: u64) -> u32 {
    (unix_ms / MS_PER_DAY).saturating_sub(EPOCH_UNIX_DAY).min(DAY_MAX as u64) as u32
}

/// Milliseconds from `unix_ms` to the start of the next packet-id day
/// (midnight UTC).
pub fn ms_until_next_day(unix_ms: u64) -> u64 {
    MS_PER_DAY - unix_ms % MS_PER_DAY
}

/// The day a packet was made, from its id.
pub fn day_of(packet: PacketId) -> u32 {
    ((packet & SEQUENCE_MAX) >> DAY_SHIFT) as u32
}

/// The first sequence of `day`'s range.
fn day_start(day: u32) -> u64 {
    (u64::from(day.min(DAY_MAX)) << DAY_SHIFT).max(1)
}

/// The id of `shard`'s packet number `sequence` in SET `set`.
pub fn make_packet_id(set: SetId, shard: u16, sequence: u64) -> PacketId {
    assert!(set < SETS_MAX);
    assert!((shard as usize) < crate::limits::SHARDS_MAX);
    assert!(sequence <= SEQUENCE_MAX && sequence > 0);
    (u64::from(set) << SET_SHIFT) | (u64::from(shard) << SEQUENCE_BITS) | sequence
}

/// The shard (within its SET) that owns a packet.
pub fn shard_of(packet: PacketId) -> u16 {
    ((packet >> SEQUENCE_BITS) & SHARD_MASK) as u16
}

/// The SET that made a packet. Below `SETS_MAX` for every id a SET makes; an
/// id above `PACKET_ID_MAX` names no SET (`SETS_MAX` or more, saturating at
/// `SetId::MAX` rather than wrapping onto a real SET).
pub fn set_of(packet: PacketId) -> SetId {
    SetId::try_from(packet >> SET_SHIFT).unwrap_or(SetId::MAX)
}

/// Campaign ids carry their home SET like packet ids: `set << 48 | seq`
/// (`seq` from 1, below 2^48). SET 0's ids are the plain sequence, as on a
/// single node before SETs. Every SET's part of a campaign split across the
/// cluster has the home SET's id.
pub fn make_campaign_id(set: SetId, seq: u64) -> crate::CampaignId {
    assert!(set < SETS_MAX);
    assert!(seq > 0 && seq < 1 << SET_SHIFT);
    (u64::from(set) << SET_SHIFT) | seq
}

/// The sequence part of a campaign id (below 2^48).
pub fn campaign_seq(campaign: crate::CampaignId) -> u64 {
    campaign & ((1 << SET_SHIFT) - 1)
}

/// The home SET of a campaign: the SET that created it (where its funder is
/// homed). Same bits as `set_of`.
pub fn campaign_set(campaign: crate::CampaignId) -> SetId {
    set_of(campaign)
}

/// Hands out ids below a durable high-water mark.
///
/// The owner asks for the next block (`wants_next_block`) when half of the
/// current one is used, persists `next_mark()` and then calls `extend`. Ids at
/// or above the durable mark are never handed out.
#[derive(Debug)]
pub struct IdAllocator {
    /// The SET and shard written into every id handed out.
    set: SetId,
    shard: u16,
    /// Next sequence to hand out.
    next: u64,
    /// Sequences below this are durably reserved for this shard.
    durable_mark: u64,
    /// A reservation beyond `durable_mark` has been requested and not yet confirmed.
    extension_pending: bool,
    block: u64,
}

impl IdAllocator {
    /// `persisted_mark` is the mark read back from storage at start-up: every
    /// sequence below it may have been used before, so allocation starts
    /// there, or at `today`'s range if that is further.
    /// The marks are sequences, per shard: the SET is not part of them.
    pub fn new(set: SetId, shard: u16, persisted_mark: u64, block: u64, today: u32) -> Self {
        assert!(set < SETS_MAX);
        let start = persisted_mark.max(day_start(today));
        IdAllocator { set, shard, next: start, durable_mark: start, extension_pending: false, block }
    }

    /// The next id, made on `day` (`day_of_unix_ms` of the clock now):
    /// the first id of a new day starts that day's range.
    pub fn next_id(&mut self, day: u32) -> Option<PacketId> {
        self.next = self.next.max(day_start(day));
        if self.next >= self.durable_mark {
            return None;
        }
        let id = make_packet_id(self.set, self.shard, self.next);
        self.next += 1;
        Some(id)
    }

    /// True when a new block should be reserved now (half the current one used).
    pub fn wants_next_block(&self) -> bool {
        !self.extension_pending && self.durable_mark.saturating_sub(self.next) <= self.block / 2
    }

    /// The mark to persist for the next block; marks the request as pending.
    pub fn request_next_block(&mut self) -> u64 {
        self.extension_pending = true;
        (self.durable_mark.max(self.next) + self.block).min(SEQUENCE_MAX)
    }

    /// True when `day`'s first ids are not durable yet and nothing is being
    /// reserved: a block for `day` asked for before it starts spares its
    /// first allocation the wait.
    pub fn wants_block_for_day(&self, day: u32) -> bool {
        !self.extension_pending && self.durable_mark <= day_start(day)
    }

    /// The mark to persist so that `day`'s first block is durable; marks
    /// the request as pending (confirmed by `extend`, like any block).
    pub fn request_block_for_day(&mut self, day: u32) -> u64 {
        self.extension_pending = true;
        (self.durable_mark.max(day_start(day)) + self.block).min(SEQUENCE_MAX)
    }

    /// The reservation could not be queued; ask again later.
    pub fn cancel_block_request(&mut self) {
        self.extension_pending = false;
    }

    /// Storage confirmed `mark` durably.
    pub fn extend(&mut self, mark: u64) {
        assert!(mark >= self.durable_mark, "durable id mark moved backwards");
        self.durable_mark = mark;
        self.extension_pending = false;
    }

    pub fn available(&self) -> u64 {
        self.durable_mark - self.next
    }

    pub fn shard(&self) -> u16 {
        self.shard
    }

    pub fn set(&self) -> SetId {
        self.set
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn campaign_ids_carry_their_home_set_and_set_0_keeps_the_plain_sequence() {
        assert_eq!(make_campaign_id(0, 7), 7);
        let id = make_campaign_id(3, 7);
        assert_eq!((campaign_set(id), campaign_seq(id)), (3, 7));
        assert!(make_campaign_id(SETS_MAX - 1, (1 << SET_SHIFT) - 1) <= crate::ID_MAX);
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_carry_their_set_and_shard_and_stay_json_safe() {
        let id = make_packet_id(SETS_MAX - 1, 255, SEQUENCE_MAX);
        assert_eq!((set_of(id), shard_of(id), id & SEQUENCE_MAX), (SETS_MAX - 1, 255, SEQUENCE_MAX));
        assert_eq!(id, PACKET_ID_MAX);
        assert!(id < (1 << 53));
        // SET 0's ids are the ids of before SETs: `shard << 40 | sequence`.
        assert_eq!(make_packet_id(0, 255, SEQUENCE_MAX), (1 << 48) - 1);
        assert_eq!(make_packet_id(0, 3, 9), (3 << 40) | 9);
        // The shard is masked to its bits: the SET above it is not read as shard.
        assert_eq!(shard_of(make_packet_id(1, 0, 1)), 0);
        // An id no SET makes names no SET, rather than wrapping onto one.
        assert_eq!(set_of(1 << 56), SetId::MAX);
        assert_eq!(set_of(1 << 53), SETS_MAX);
    }

    #[test]
    fn allocator_never_passes_the_durable_mark_and_never_reuses() {
        let mut a = IdAllocator::new(2, 3, 0, 10, 0);
        assert_eq!(a.next_id(0), None, "nothing is durable before the first block");
        assert!(a.wants_next_block());
        let mark = a.request_next_block();
        assert!(!a.wants_next_block());
        a.extend(mark);
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = a.next_id(0) {
            assert_eq!((set_of(id), shard_of(id)), (2, 3));
            assert!(seen.insert(id));
        }
        assert_eq!(seen.len(), 10);
        // A restart resumes from the persisted mark: nothing below it comes back.
        let mut b = IdAllocator::new(2, 3, mark, 10, 0);
        let m2 = b.request_next_block();
        b.extend(m2);
        let id = b.next_id(0).unwrap();
        assert!(!seen.contains(&id));
    }

    #[test]
    fn a_new_day_starts_its_own_range_and_ids_never_go_back() {
        let day = day_of_unix_ms(1_795_000_000_000); // 2026-11-18
        assert_eq!(day, 2513);
        let mut a = IdAllocator::new(0, 2, 0, 10, day - 1);
        assert_eq!(a.next_id(day - 1), None);
        let mark = a.request_next_block();
        a.extend(mark);
        let yesterday = a.next_id(day - 1).unwrap();
        assert_eq!((shard_of(yesterday), day_of(yesterday)), (2, day - 1));
        // The next day's first id is beyond every reserved one: it waits for a block.
        assert_eq!(a.next_id(day), None);
        assert!(a.wants_next_block());
        let mark = a.request_next_block();
        a.extend(mark);
        let today = a.next_id(day).unwrap();
        assert_eq!((shard_of(today), day_of(today)), (2, day));
        assert!(today > yesterday);
        // A clock that steps back does not take ids back.
        let after = a.next_id(day - 1).unwrap();
        assert!(after > today && day_of(after) == day);
        // Tomorrow's block reserved ahead: its first id needs no wait.
        assert!(a.wants_block_for_day(day + 1));
        let mark = a.request_block_for_day(day + 1);
        a.extend(mark);
        assert!(!a.wants_block_for_day(day + 1));
        assert!(a.next_id(day).is_some(), "today goes on below tomorrow's range");
        let first = a.next_id(day + 1).unwrap();
        assert_eq!(day_of(first), day + 1);
        assert_eq!(ms_until_next_day(1_795_000_000_000), 86_400_000 - 1_795_000_000_000 % 86_400_000);
        assert!(make_packet_id(0, 255, SEQUENCE_MAX) < (1 << 48));
        assert_eq!(day_of_unix_ms(0), 0);
    }

    proptest! {
        #[test]
        fn set_shard_day_and_sequence_round_trip_below_2_pow_53(
            set in 0..SETS_MAX,
            shard in 0u16..crate::limits::SHARDS_MAX as u16,
            day in 0..=DAY_MAX,
            n in 0u64..(1 << DAY_SHIFT),
        ) {
            let sequence = day_start(day) | n;
            prop_assume!(sequence <= SEQUENCE_MAX);
            let id = make_packet_id(set, shard, sequence);
            prop_assert_eq!(set_of(id), set);
            prop_assert_eq!(shard_of(id), shard);
            prop_assert_eq!(day_of(id), day);
            prop_assert_eq!(id & SEQUENCE_MAX, sequence);
            prop_assert!(id < (1 << 53), "JSON-safe: {} > PACKET_ID_MAX", id);
            prop_assert!(crate::sets::SetMap::new(set, SETS_MAX).unwrap().owns_packet(id));
        }

        #[test]
        fn an_allocator_makes_only_ids_of_its_set_and_shard(
            set in 0..SETS_MAX,
            shard in 0u16..crate::limits::SHARDS_MAX as u16,
            today in 0..=DAY_MAX,
        ) {
            let mut a = IdAllocator::new(set, shard, 0, 4, today);
            let mark = a.request_next_block();
            a.extend(mark);
            while let Some(id) = a.next_id(today) {
                prop_assert_eq!((set_of(id), shard_of(id)), (set, shard));
                prop_assert!(day_of(id) >= today && id <= PACKET_ID_MAX);
            }
        }
    }
}
