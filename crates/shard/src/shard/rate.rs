//! Each sender's send rate: a token bucket per user, in the shard that
//! handles the user's sends, so no lock and no other shard is involved.

use std::collections::HashMap;

use hongbao_core::UserId;

/// Users whose buckets one shard keeps. Past it, buckets that have refilled
/// (they would allow a full burst anyway) are forgotten; if every bucket is
/// still draining, an eighth of them are, and those users get a fresh burst
/// a little early: the map stays bounded whatever the number of senders.
const BUCKETS_MAX: usize = 65_536;

/// Tokens are counted in thousandths, so a rate of a few a second refills
/// smoothly with integer arithmetic.
const MILLI: u64 = 1_000;

pub(super) struct SendLimits {
    /// Tokens added per second (thousandths per ms).
    per_s: u64,
    /// The bucket's size, in thousandths.
    burst_milli: u64,
    buckets: HashMap<UserId, Bucket>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens_milli: u64,
    at_ms: u64,
}

impl SendLimits {
    pub(super) fn new(per_s: u32, burst: u32) -> SendLimits {
        SendLimits { per_s: per_s.into(), burst_milli: u64::from(burst.max(1)) * MILLI, buckets: HashMap::new() }
    }

    fn refilled(&self, b: Bucket, now_ms: u64) -> u64 {
        let added = now_ms.saturating_sub(b.at_ms).saturating_mul(self.per_s);
        b.tokens_milli.saturating_add(added).min(self.burst_milli)
    }

    /// Takes one send from `user`'s bucket; false when it is empty.
    pub(super) fn allow(&mut self, user: UserId, now_ms: u64) -> bool {
        if self.per_s == 0 {
            return true;
        }
        if !self.buckets.contains_key(&user) && self.buckets.len() >= BUCKETS_MAX {
            self.forget_some(now_ms);
        }
        let full = Bucket { tokens_milli: self.burst_milli, at_ms: now_ms };
        let bucket = self.buckets.get(&user).copied().unwrap_or(full);
        let tokens_milli = self.refilled(bucket, now_ms);
        let allowed = tokens_milli >= MILLI;
        let left = if allowed { tokens_milli - MILLI } else { tokens_milli };
        self.buckets.insert(user, Bucket { tokens_milli: left, at_ms: now_ms });
        allowed
    }

    fn forget_some(&mut self, now_ms: u64) {
        let burst = self.burst_milli;
        let per_s = self.per_s;
        self.buckets.retain(|_, b| {
            let added = now_ms.saturating_sub(b.at_ms).saturating_mul(per_s);
            b.tokens_milli.saturating_add(added) < burst
        });
        if self.buckets.len() >= BUCKETS_MAX {
            let drop: Vec<UserId> = self.buckets.keys().take(BUCKETS_MAX / 8).copied().collect();
            for user in drop {
                self.buckets.remove(&user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut limits = SendLimits::new(10, 20);
        let allowed = (0..30).filter(|_| limits.allow(7, 1_000)).count();
        assert_eq!(allowed, 20, "the burst");
        // 10 a second: one more every 100 ms.
        assert!(!limits.allow(7, 1_099));
        assert!(limits.allow(7, 1_100));
        assert!(!limits.allow(7, 1_100));
        let in_a_second = (0..100).filter(|i| limits.allow(7, 1_100 + (i + 1) * 10)).count();
        assert_eq!(in_a_second, 10);
        // Other users have their own buckets.
        assert!(limits.allow(8, 1_100));
    }

    #[test]
    fn the_map_of_buckets_stays_bounded() {
        let mut limits = SendLimits::new(1, 5);
        for user in 0..(BUCKETS_MAX as u64 * 2) {
            limits.allow(user, 0);
            assert!(limits.buckets.len() <= BUCKETS_MAX);
        }
    }

    #[test]
    fn a_rate_of_zero_means_no_limit() {
        let mut limits = SendLimits::new(0, 1);
        assert!((0..1_000).all(|_| limits.allow(1, 0)));
    }
}
