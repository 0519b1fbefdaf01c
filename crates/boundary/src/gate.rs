//! The shake gate as a gateway sees it: whether a plain shake can win
//! anything in the user's shard, so the shakes that cannot (nearly all of
//! them) are answered where they arrive.

use hongbao_core::UserId;
use hongbao_proto::{Request, ShakeResult};
use serde::{Deserialize, Serialize};

/// One shard's gate as a remote gateway sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateState {
    /// A campaign pool runs in the shard.
    pub open: bool,
    /// One of its packets is ready to be won.
    pub ready: bool,
}

/// A copy of every shard's gate, kept by a gateway in another process (sent
/// over the link on every change) so it answers the shakes that find
/// nothing without a round trip. Stale by the link's delay at most, which
/// answers as the shake would have been a moment earlier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateView {
    /// Indexed by shard.
    pub gates: Vec<GateState>,
    /// SETs in the cluster (1 for a single node): with the shard count, it
    /// says which shard a user is on (`hongbao_core::sets::user_shard`).
    pub sets: u8,
}

impl GateView {
    /// The engine's inline answer from this copy: `Some` for a plain shake
    /// the user's shard has nothing for; `None`: submit it.
    pub fn answer(&self, user: UserId, req: &Request) -> Option<ShakeResult> {
        let Request::Shake { campaign, key: None } = req else { return None };
        if self.gates.is_empty() {
            return None;
        }
        let gate = self.gates[hongbao_core::sets::user_shard(user, self.sets, self.gates.len())];
        inline_shake_result(*campaign, gate.open, gate.ready)
    }
}

/// The answer to a plain shake for `campaign` (0: any) that the shard need
/// not see: nothing running in the user's shard, or nothing ready for "any".
pub fn inline_shake_result(campaign: u64, open: bool, ready: bool) -> Option<ShakeResult> {
    if !open {
        Some(ShakeResult::NotRunning)
    } else if campaign == 0 && !ready {
        Some(ShakeResult::None)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_shakes_that_cannot_win_are_answered() {
        let view = GateView {
            gates: vec![GateState { open: false, ready: false }, GateState { open: true, ready: false }],
            sets: 1,
        };
        let shake = |campaign| Request::Shake { campaign, key: None };
        assert_eq!(view.answer(2, &shake(0)), Some(ShakeResult::NotRunning));
        assert_eq!(view.answer(3, &shake(0)), Some(ShakeResult::None));
        // A named campaign may still have a packet: the shard decides.
        assert_eq!(view.answer(3, &shake(5)), None);
        assert_eq!(view.answer(3, &Request::Shake { campaign: 0, key: Some("k".into()) }), None);
        assert_eq!(view.answer(3, &Request::Ping), None);
        assert_eq!(GateView::default().answer(3, &shake(0)), None);
    }
}
