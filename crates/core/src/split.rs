//! How a packet's money is divided into shares.
//!
//! `lucky` uses WeChat's double-average rule: each share is uniform in
//! `[1, 2 × remaining / remaining_count]` fen, clamped so every later share can
//! still get 1 fen; the last share takes the rest. `fixed` gives equal shares.
//! Shares are drawn at open time, so only `remaining` and `remaining_count`
//! are state (no pre-split list to store).

use rand::Rng;
use serde::{Deserialize, Serialize};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitKind {
    Lucky,
    Fixed,
}

impl SplitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SplitKind::Lucky => "lucky",
            SplitKind::Fixed => "fixed",
        }
    }
    pub fn parse(s: &str) -> Option<SplitKind> {
        match s {
            "lucky" => Some(SplitKind::Lucky),
            "fixed" => Some(SplitKind::Fixed),
            _ => None,
        }
    }
}

/// One lucky share from what remains. Preconditions (asserted): at least one
/// share left and at least 1 fen for each.
pub fn lucky_share<R: Rng + ?Sized>(remaining_fen: i64, remaining_count: u32, rng: &mut R) -> i64 {
    assert!(remaining_count >= 1);
    assert!(remaining_fen >= remaining_count as i64, "fewer fen than shares left");
    if remaining_count == 1 {
        return remaining_fen;
    }
    let count = remaining_count as i64;
    let double_average = remaining_fen.checked_mul(2).expect("amounts are bounded far below overflow") / count;
    // Leave at least 1 fen for every share after this one.
    let upper = double_average.min(remaining_fen - (count - 1)).max(1);
    let share = rng.random_range(1..=upper);
    debug_assert!(share >= 1 && remaining_fen - share >= count - 1);
    share
}

/// The share of a fixed packet. The total is a multiple of the count
/// (checked when the packet is sent), so every share is the same.
pub fn fixed_share(total_fen: i64, count: u32) -> i64 {
    assert!(count >= 1 && total_fen % count as i64 == 0);
    total_fen / count as i64
}

/// The next share of a packet of either kind.
pub fn next_share<R: Rng + ?Sized>(
    kind: SplitKind,
    total_fen: i64,
    count: u32,
    remaining_fen: i64,
    remaining_count: u32,
    rng: &mut R,
) -> i64 {
    match kind {
        SplitKind::Lucky => lucky_share(remaining_fen, remaining_count, rng),
        SplitKind::Fixed => fixed_share(total_fen, count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::SmallRng, SeedableRng};

    fn split_all(kind: SplitKind, total: i64, count: u32, seed: u64) -> Vec<i64> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (mut rem, mut left) = (total, count);
        let mut out = Vec::new();
        while left > 0 {
            let s = next_share(kind, total, count, rem, left, &mut rng);
            out.push(s);
            rem -= s;
            left -= 1;
        }
        assert_eq!(rem, 0);
        out
    }

    proptest! {
        #[test]
        fn lucky_shares_sum_to_total_and_respect_the_double_average_bound(
            count in 1u32..=100, extra in 0i64..=20_000, seed in any::<u64>()
        ) {
            let total = count as i64 + extra;
            let mut rng = SmallRng::seed_from_u64(seed);
            let (mut rem, mut left) = (total, count);
            let mut sum = 0;
            while left > 0 {
                let s = lucky_share(rem, left, &mut rng);
                prop_assert!(s >= 1);
                if left > 1 {
                    prop_assert!(s <= 2 * rem / left as i64);
                }
                prop_assert!(rem - s >= left as i64 - 1);
                sum += s;
                rem -= s;
                left -= 1;
            }
            prop_assert_eq!(sum, total);
        }

        #[test]
        fn fixed_shares_are_equal(count in 1u32..=100, per in 1i64..=200, seed in any::<u64>()) {
            let shares = split_all(SplitKind::Fixed, per * count as i64, count, seed);
            prop_assert!(shares.iter().all(|&s| s == per));
        }
    }

    #[test]
    fn minimum_packet_gives_one_fen_each() {
        assert_eq!(split_all(SplitKind::Lucky, 5, 5, 7), vec![1; 5]);
    }
}
