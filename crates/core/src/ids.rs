//! Packet ids: `shard << 40 | sequence`. The owning shard is readable from the
//! id alone, ids stay below 2^48 (safe as JSON numbers), and each shard's
//! sequence is handed out in blocks that are persisted before use, so an id is
//! never reused, across restarts too (unused ids of a block are skipped).

use crate::PacketId;

pub const SEQUENCE_BITS: u32 = 40;
pub const SEQUENCE_MAX: u64 = (1 << SEQUENCE_BITS) - 1;

pub fn make_packet_id(shard: u16, sequence: u64) -> PacketId {
    assert!((shard as usize) < crate::limits::SHARDS_MAX);
    assert!(sequence <= SEQUENCE_MAX && sequence > 0);
    ((shard as u64) << SEQUENCE_BITS) | sequence
}

pub fn shard_of(packet: PacketId) -> u16 {
    (packet >> SEQUENCE_BITS) as u16
}

/// Hands out ids below a durable high-water mark.
///
/// The owner asks for the next block (`wants_next_block`) when half of the
/// current one is used, persists `next_mark()` and then calls `extend`. Ids at
/// or above the durable mark are never handed out.
#[derive(Debug)]
pub struct IdAllocator {
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
    /// sequence below it may have been used before, so allocation starts there.
    pub fn new(shard: u16, persisted_mark: u64, block: u64) -> Self {
        let start = persisted_mark.max(1);
        IdAllocator { shard, next: start, durable_mark: start, extension_pending: false, block }
    }

    pub fn next_id(&mut self) -> Option<PacketId> {
        if self.next >= self.durable_mark {
            return None;
        }
        let id = make_packet_id(self.shard, self.next);
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
        (self.durable_mark + self.block).min(SEQUENCE_MAX)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_shard_and_stay_json_safe() {
        let id = make_packet_id(255, SEQUENCE_MAX);
        assert_eq!(shard_of(id), 255);
        assert!(id < (1 << 53));
    }

    #[test]
    fn allocator_never_passes_the_durable_mark_and_never_reuses() {
        let mut a = IdAllocator::new(3, 0, 10);
        assert_eq!(a.next_id(), None, "nothing is durable before the first block");
        assert!(a.wants_next_block());
        let mark = a.request_next_block();
        assert!(!a.wants_next_block());
        a.extend(mark);
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = a.next_id() {
            assert_eq!(shard_of(id), 3);
            assert!(seen.insert(id));
        }
        assert_eq!(seen.len(), 10);
        // A restart resumes from the persisted mark: nothing below it comes back.
        let mut b = IdAllocator::new(3, mark, 10);
        let m2 = b.request_next_block();
        b.extend(m2);
        let id = b.next_id().unwrap();
        assert!(!seen.contains(&id));
    }
}
