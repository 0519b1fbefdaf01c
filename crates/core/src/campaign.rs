//! Shake campaigns: an operator-funded pool released at a fixed rate.
//!
//! A campaign's budget and packet count are split evenly across shards when it
//! starts (and again, from what is left, after a restart). Each shard then
//! releases from its own share on its own clock, so no shard's users starve and
//! no shake touches another shard. Shard `i` of `n` has released
//! `floor((floor(rate × t) + i) / n)` packets after `t` seconds; summed over the
//! shards that is exactly `floor(rate × t)`, so the campaign rate holds without
//! any coordination.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::limits;
use crate::split;
use crate::UserId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmountRule {
    /// This many packets, sized by the double-average rule over the budget.
    Count { packets: u64 },
    /// Packets uniform in `[min_fen, max_fen]` until the budget runs out.
    Range { min_fen: i64, max_fen: i64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignSpec {
    pub funder: UserId,
    pub total_fen: i64,
    pub rule: AmountRule,
    pub rate_per_s: u32,
    /// Most wins one user may take from this campaign.
    pub win_cap_per_user: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum CampaignError {
    #[error("total must be between 1 and {max} fen, got {got}")]
    BadTotal { got: i64, max: i64 },
    #[error("packet count must be between 1 and {max} and at most the total in fen")]
    BadCount { max: u64 },
    #[error("range must satisfy 1 <= min_fen <= max_fen <= total_fen")]
    BadRange,
    #[error("rate must be between 1 and {max} packets per second")]
    BadRate { max: u32 },
    #[error("win cap must be at least 1")]
    BadCap,
    #[error("funder must be a user id between 1 and 2^53-1")]
    BadFunder,
}

impl CampaignSpec {
    pub fn validate(&self) -> Result<(), CampaignError> {
        if self.total_fen <= 0 || self.total_fen > limits::AMOUNT_FEN_MAX {
            return Err(CampaignError::BadTotal { got: self.total_fen, max: limits::AMOUNT_FEN_MAX });
        }
        if self.funder == 0 || self.funder > crate::ID_MAX {
            return Err(CampaignError::BadFunder);
        }
        match self.rule {
            AmountRule::Count { packets } => {
                if packets == 0 || packets > limits::CAMPAIGN_PACKETS_MAX || packets as i64 > self.total_fen {
                    return Err(CampaignError::BadCount { max: limits::CAMPAIGN_PACKETS_MAX });
                }
            }
            AmountRule::Range { min_fen, max_fen } => {
                if min_fen < 1 || min_fen > max_fen || max_fen > self.total_fen {
                    return Err(CampaignError::BadRange);
                }
            }
        }
        if self.rate_per_s == 0 || self.rate_per_s > limits::CAMPAIGN_RATE_PER_S_MAX {
            return Err(CampaignError::BadRate { max: limits::CAMPAIGN_RATE_PER_S_MAX });
        }
        if self.win_cap_per_user == Some(0) {
            return Err(CampaignError::BadCap);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    Created,
    Running,
    /// Stopped by an operator; the unreleased money went back to the funder.
    Stopped,
    /// Every packet was won (or the budget ran out); the rest went back.
    Finished,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Created => "created",
            CampaignStatus::Running => "running",
            CampaignStatus::Stopped => "stopped",
            CampaignStatus::Finished => "finished",
        }
    }
    pub fn parse(s: &str) -> Option<CampaignStatus> {
        Some(match s {
            "created" => CampaignStatus::Created,
            "running" => CampaignStatus::Running,
            "stopped" => CampaignStatus::Stopped,
            "finished" => CampaignStatus::Finished,
            _ => return None,
        })
    }
    pub fn is_closed(self) -> bool {
        matches!(self, CampaignStatus::Stopped | CampaignStatus::Finished)
    }
}

/// One shard's part of a running campaign: what it may still release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolShare {
    pub rule: AmountRule,
    /// Money not yet released by this shard.
    pub budget_fen: i64,
    /// Packets not yet released (Count rule only).
    pub packets_left: u64,
    pub shard_index: u32,
    pub shards: u32,
    pub rate_per_s: u32,
}

/// Splits what is left of a campaign across `shards` shards.
/// `packets_left` is only used by the Count rule.
pub fn split_pool(
    rule: AmountRule,
    budget_fen: i64,
    packets_left: u64,
    rate_per_s: u32,
    shards: u32,
) -> Vec<PoolShare> {
    assert!(shards >= 1 && budget_fen >= 0);
    let n = shards as i64;
    (0..shards)
        .map(|i| {
            let budget = (budget_fen + i as i64) / n;
            let packets = (packets_left + i as u64) / shards as u64;
            PoolShare { rule, budget_fen: budget, packets_left: packets, shard_index: i, shards, rate_per_s }
        })
        .collect()
}

impl PoolShare {
    /// True when this share can release nothing more.
    pub fn exhausted(&self) -> bool {
        match self.rule {
            AmountRule::Count { .. } => self.packets_left == 0 || self.budget_fen < self.packets_left as i64,
            AmountRule::Range { min_fen, .. } => self.budget_fen < min_fen,
        }
    }

    /// Draws the amount of the next released packet, or `None` when exhausted.
    pub fn release_one<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Option<i64> {
        if self.exhausted() {
            return None;
        }
        let amount = match self.rule {
            AmountRule::Count { .. } => {
                let left = u32::try_from(self.packets_left).expect("CAMPAIGN_PACKETS_MAX fits in u32");
                let a = split::lucky_share(self.budget_fen, left, rng);
                self.packets_left -= 1;
                a
            }
            AmountRule::Range { min_fen, max_fen } => rng.random_range(min_fen..=max_fen.min(self.budget_fen)),
        };
        self.budget_fen = self.budget_fen.checked_sub(amount).expect("release never exceeds budget");
        debug_assert!(amount >= 1);
        Some(amount)
    }

    /// Cumulative releases due `elapsed_ms` after the share started.
    pub fn due_after(&self, elapsed_ms: u64) -> u64 {
        let campaign_total = (self.rate_per_s as u128 * elapsed_ms as u128 / 1000) as u64;
        (campaign_total + self.shard_index as u64) / self.shards as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::SmallRng, SeedableRng};

    proptest! {
        #[test]
        fn shards_together_release_exactly_the_campaign_rate(rate in 1u32..100_000, shards in 1u32..16, ms in 0u64..100_000) {
            let pools = split_pool(AmountRule::Count { packets: 1 }, 1, 1, rate, shards);
            let sum: u64 = pools.iter().map(|p| p.due_after(ms)).sum();
            prop_assert_eq!(sum, rate as u64 * ms / 1000);
        }

        #[test]
        fn pools_never_release_more_than_the_budget(
            total in 1i64..1_000_000, packets in 1u64..5000, shards in 1u32..8, seed in any::<u64>(), range in any::<bool>()
        ) {
            let packets = packets.min(total as u64);
            let rule = if range { AmountRule::Range { min_fen: 1, max_fen: (total / 10).max(1) } } else { AmountRule::Count { packets } };
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut released = 0i64;
            let mut n = 0u64;
            let pools = split_pool(rule, total, packets, 100, shards);
            prop_assert_eq!(pools.iter().map(|p| p.budget_fen).sum::<i64>(), total);
            for mut p in pools {
                while let Some(a) = p.release_one(&mut rng) {
                    prop_assert!(a >= 1);
                    released += a;
                    n += 1;
                }
            }
            prop_assert!(released <= total);
            if !range {
                prop_assert!(n <= packets);
            }
        }
    }
}
