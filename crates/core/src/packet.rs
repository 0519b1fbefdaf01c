//! A group packet's state machine: who may open it, what each open gets, when
//! it is finished, and what is refunded when it expires.
//!
//! The shard that owns a packet is the only code that calls the mutating
//! methods, one request at a time, so no locking happens here. Invariant
//! (checked by `assert_invariants`): total = sum(claims) + remaining + refunded,
//! claims ≤ count, every claim ≥ 1 fen, one claim per user.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::limits::{self, PacketRules};
use crate::split::{self, SplitKind};
use crate::{GroupId, PacketId, UserId};

/// Who may open a packet. Group members are snapshotted when the packet is
/// sent, so an open needs no lookup outside the owning shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipients {
    Group {
        group: GroupId,
        members: Box<[UserId]>,
    },
    Users(Box<[UserId]>),
    /// An exclusive packet for one user.
    User(UserId),
}

impl Recipients {
    /// Builds a recipient set with members sorted and deduplicated.
    pub fn group(group: GroupId, members: impl IntoIterator<Item = UserId>) -> Recipients {
        Recipients::Group { group, members: sorted(members) }
    }
    pub fn users(users: impl IntoIterator<Item = UserId>) -> Recipients {
        Recipients::Users(sorted(users))
    }

    pub fn contains(&self, user: UserId) -> bool {
        match self {
            Recipients::Group { members, .. } => members.binary_search(&user).is_ok(),
            Recipients::Users(users) => users.binary_search(&user).is_ok(),
            Recipients::User(u) => *u == user,
        }
    }

    pub fn list(&self) -> &[UserId] {
        match self {
            Recipients::Group { members, .. } => members,
            Recipients::Users(users) => users,
            Recipients::User(u) => std::slice::from_ref(u),
        }
    }

    pub fn group_id(&self) -> Option<GroupId> {
        match self {
            Recipients::Group { group, .. } => Some(*group),
            _ => None,
        }
    }
}

fn sorted(users: impl IntoIterator<Item = UserId>) -> Box<[UserId]> {
    let mut v: Vec<UserId> = users.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    v.into_boxed_slice()
}

/// What a sender asks for.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub sender: UserId,
    pub total_fen: i64,
    pub count: u32,
    pub kind: SplitKind,
    pub recipients: Recipients,
    pub greeting: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum SendError {
    #[error("amount must be positive, got {0} fen")]
    NonPositiveAmount(i64),
    #[error("amount {amount_fen} fen exceeds the per-packet limit of {max_fen} fen")]
    AmountTooLarge { amount_fen: i64, max_fen: i64 },
    #[error("count must be between 1 and {max}, got {count}")]
    CountOutOfRange { count: u32, max: u32 },
    #[error("amount {amount_fen} fen cannot give {count} shares of at least 1 fen")]
    CountExceedsAmount { amount_fen: i64, count: u32 },
    #[error("a fixed packet's amount ({amount_fen} fen) must be a multiple of its count ({count})")]
    FixedNotDivisible { amount_fen: i64, count: u32 },
    #[error("greeting is longer than {max} bytes")]
    GreetingTooLong { max: usize },
    #[error("the packet has no recipients")]
    NoRecipients,
    #[error("more than {max} recipients")]
    TooManyRecipients { max: usize },
    #[error("an exclusive packet has exactly one share")]
    ExclusiveCountNotOne,
    #[error("user ids must be between 1 and 2^53-1")]
    InvalidUser,
}

impl PacketSpec {
    pub fn validate(&self, rules: &PacketRules) -> Result<(), SendError> {
        if self.total_fen <= 0 {
            return Err(SendError::NonPositiveAmount(self.total_fen));
        }
        if self.total_fen > rules.amount_fen_max {
            return Err(SendError::AmountTooLarge { amount_fen: self.total_fen, max_fen: rules.amount_fen_max });
        }
        if self.count == 0 || self.count > rules.count_max {
            return Err(SendError::CountOutOfRange { count: self.count, max: rules.count_max });
        }
        if (self.count as i64) > self.total_fen {
            return Err(SendError::CountExceedsAmount { amount_fen: self.total_fen, count: self.count });
        }
        if self.kind == SplitKind::Fixed && self.total_fen % self.count as i64 != 0 {
            return Err(SendError::FixedNotDivisible { amount_fen: self.total_fen, count: self.count });
        }
        if self.greeting.len() > limits::GREETING_BYTES_MAX {
            return Err(SendError::GreetingTooLong { max: limits::GREETING_BYTES_MAX });
        }
        let list = self.recipients.list();
        if list.is_empty() {
            return Err(SendError::NoRecipients);
        }
        if list.len() > limits::GROUP_MEMBERS_MAX {
            return Err(SendError::TooManyRecipients { max: limits::GROUP_MEMBERS_MAX });
        }
        if matches!(self.recipients, Recipients::User(_)) && self.count != 1 {
            return Err(SendError::ExclusiveCountNotOne);
        }
        if list.iter().chain(std::iter::once(&self.sender)).any(|&u| u == 0 || u > crate::ID_MAX) {
            return Err(SendError::InvalidUser);
        }
        Ok(())
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PacketStatus {
    Open,
    /// Every share was opened.
    Finished,
    /// Expired; the remainder went back to the sender.
    Refunded,
}

impl PacketStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PacketStatus::Open => "open",
            PacketStatus::Finished => "finished",
            PacketStatus::Refunded => "refunded",
        }
    }
    pub fn parse(s: &str) -> Option<PacketStatus> {
        match s {
            "open" => Some(PacketStatus::Open),
            "finished" => Some(PacketStatus::Finished),
            "refunded" => Some(PacketStatus::Refunded),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub user: UserId,
    pub amount_fen: i64,
    pub at_ms: u64,
}

/// Answer to a grab: can this user still open the packet?
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrabState {
    CanOpen,
    AlreadyOpened { amount_fen: i64 },
    Finished,
    Expired,
    NotEligible,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum OpenError {
    #[error("this packet is not addressed to you")]
    NotEligible,
    #[error("every share of this packet has been opened")]
    Finished,
    #[error("this packet has expired")]
    Expired,
}

/// Result of an open that the shard must make durable before replying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenDecision {
    /// A new share; `best_luck` is set when this open took the last share.
    New { amount_fen: i64, finished: bool, best_luck: Option<UserId> },
    /// The user had already opened this packet: the first result again.
    Repeat { amount_fen: i64 },
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub id: PacketId,
    pub sender: UserId,
    pub kind: SplitKind,
    pub total_fen: i64,
    pub count: u32,
    pub recipients: Recipients,
    pub greeting: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub remaining_fen: i64,
    pub refunded_fen: i64,
    /// In open order; at most `count` (≤ 100), so a linear scan is cheaper
    /// than a hash set.
    pub claims: Vec<Claim>,
    pub status: PacketStatus,
}

impl Packet {
    pub fn new(id: PacketId, spec: PacketSpec, created_ms: u64, expires_ms: u64) -> Packet {
        Packet {
            id,
            sender: spec.sender,
            kind: spec.kind,
            total_fen: spec.total_fen,
            count: spec.count,
            recipients: spec.recipients,
            greeting: spec.greeting,
            created_ms,
            expires_ms,
            remaining_fen: spec.total_fen,
            refunded_fen: 0,
            claims: Vec::new(),
            status: PacketStatus::Open,
        }
    }

    pub fn remaining_count(&self) -> u32 {
        self.count - self.claims.len() as u32
    }

    fn claim_of(&self, user: UserId) -> Option<&Claim> {
        self.claims.iter().find(|c| c.user == user)
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
    }

    pub fn grab(&self, user: UserId, now_ms: u64) -> GrabState {
        if let Some(c) = self.claim_of(user) {
            return GrabState::AlreadyOpened { amount_fen: c.amount_fen };
        }
        if !self.recipients.contains(user) {
            return GrabState::NotEligible;
        }
        match self.status {
            PacketStatus::Finished => GrabState::Finished,
            PacketStatus::Refunded => GrabState::Expired,
            PacketStatus::Open if self.is_expired(now_ms) => GrabState::Expired,
            PacketStatus::Open => GrabState::CanOpen,
        }
    }

    /// Takes one share for `user` in memory. The caller makes it durable
    /// before telling anyone.
    pub fn open<R: Rng + ?Sized>(&mut self, user: UserId, now_ms: u64, rng: &mut R) -> Result<OpenDecision, OpenError> {
        match self.grab(user, now_ms) {
            GrabState::AlreadyOpened { amount_fen } => return Ok(OpenDecision::Repeat { amount_fen }),
            GrabState::NotEligible => return Err(OpenError::NotEligible),
            GrabState::Finished => return Err(OpenError::Finished),
            GrabState::Expired => return Err(OpenError::Expired),
            GrabState::CanOpen => {}
        }
        let amount_fen =
            split::next_share(self.kind, self.total_fen, self.count, self.remaining_fen, self.remaining_count(), rng);
        self.remaining_fen = self.remaining_fen.checked_sub(amount_fen).expect("share never exceeds remainder");
        self.claims.push(Claim { user, amount_fen, at_ms: now_ms });
        let finished = self.remaining_count() == 0;
        if finished {
            self.status = PacketStatus::Finished;
        }
        self.assert_invariants();
        Ok(OpenDecision::New { amount_fen, finished, best_luck: if finished { self.best_luck() } else { None } })
    }

    /// Marks an expired packet refunded and returns the remainder to give
    /// back, exactly once: a second call returns `None`.
    pub fn expire(&mut self, now_ms: u64) -> Option<i64> {
        if self.status != PacketStatus::Open || !self.is_expired(now_ms) {
            return None;
        }
        let refund = self.remaining_fen;
        self.refunded_fen = refund;
        self.remaining_fen = 0;
        self.status = PacketStatus::Refunded;
        self.assert_invariants();
        Some(refund)
    }

    /// The largest claim; the earliest one wins a tie. Only meaningful once finished.
    pub fn best_luck(&self) -> Option<UserId> {
        best_luck_of(&self.claims)
    }

    pub fn assert_invariants(&self) {
        let claimed: i64 = self.claims.iter().map(|c| c.amount_fen).sum();
        assert_eq!(self.total_fen, claimed + self.remaining_fen + self.refunded_fen, "packet {} leaks money", self.id);
        assert!(self.claims.len() <= self.count as usize);
        assert!(self.remaining_fen >= 0 && self.refunded_fen >= 0);
        debug_assert!(self.claims.iter().all(|c| c.amount_fen >= 1));
        if self.status == PacketStatus::Open {
            assert!(self.remaining_fen >= self.remaining_count() as i64);
        }
    }
}

/// Largest amount, earliest (first in order) on a tie.
pub fn best_luck_of(claims: &[Claim]) -> Option<UserId> {
    let mut best: Option<&Claim> = None;
    for c in claims {
        if best.is_none_or(|b| c.amount_fen > b.amount_fen) {
            best = Some(c);
        }
    }
    best.map(|c| c.user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::SmallRng, SeedableRng};

    fn packet(total: i64, count: u32, users: &[UserId]) -> Packet {
        let spec = PacketSpec {
            sender: 1,
            total_fen: total,
            count,
            kind: SplitKind::Lucky,
            recipients: Recipients::users(users.iter().copied()),
            greeting: String::new(),
        };
        spec.validate(&PacketRules::default()).unwrap();
        Packet::new(make(), spec, 0, 1000)
    }
    fn make() -> PacketId {
        crate::ids::make_packet_id(0, 0, 1)
    }

    #[test]
    fn second_open_returns_the_first_result() {
        let mut p = packet(100, 3, &[2, 3, 4]);
        let mut rng = SmallRng::seed_from_u64(1);
        let first = p.open(2, 1, &mut rng).unwrap();
        let OpenDecision::New { amount_fen, .. } = first else { panic!() };
        assert_eq!(p.open(2, 2, &mut rng), Ok(OpenDecision::Repeat { amount_fen }));
        assert_eq!(p.claims.len(), 1);
        assert_eq!(p.open(9, 2, &mut rng), Err(OpenError::NotEligible));
    }

    #[test]
    fn expiry_refunds_the_exact_remainder_once() {
        let mut p = packet(100, 3, &[2, 3, 4]);
        let mut rng = SmallRng::seed_from_u64(1);
        p.open(2, 1, &mut rng).unwrap();
        assert_eq!(p.expire(999), None, "not yet expired");
        let refund = p.expire(1000).unwrap();
        assert_eq!(refund, 100 - p.claims[0].amount_fen);
        assert_eq!(p.expire(2000), None);
        assert_eq!(p.open(3, 1001, &mut rng), Err(OpenError::Expired));
    }

    #[test]
    fn best_luck_prefers_the_earliest_on_a_tie() {
        let c = |user, amount_fen| Claim { user, amount_fen, at_ms: 0 };
        assert_eq!(best_luck_of(&[c(1, 5), c(2, 7), c(3, 7)]), Some(2));
    }

    #[test]
    fn validation_rejects_bad_specs() {
        let rules = PacketRules::default();
        let mut s = PacketSpec {
            sender: 1,
            total_fen: 0,
            count: 1,
            kind: SplitKind::Lucky,
            recipients: Recipients::User(2),
            greeting: String::new(),
        };
        assert_eq!(s.validate(&rules), Err(SendError::NonPositiveAmount(0)));
        s.total_fen = 3;
        s.count = 5;
        assert!(matches!(
            s.validate(&rules),
            Err(SendError::CountExceedsAmount { .. }) | Err(SendError::ExclusiveCountNotOne)
        ));
        s.total_fen = 20_001;
        s.count = 1;
        assert!(matches!(s.validate(&rules), Err(SendError::AmountTooLarge { .. })));
    }

    proptest! {
        #[test]
        fn opening_in_any_order_conserves_money(
            count in 1u32..=30, extra in 0i64..5000, order in proptest::collection::vec(1u64..40, 0..80), seed in any::<u64>()
        ) {
            let users: Vec<UserId> = (1..40).collect();
            let mut p = packet(count as i64 + extra, count, &users);
            let mut rng = SmallRng::seed_from_u64(seed);
            for u in order {
                let _ = p.open(u, 5, &mut rng);
                p.assert_invariants();
            }
            let mut seen = std::collections::HashSet::new();
            prop_assert!(p.claims.iter().all(|c| seen.insert(c.user)));
            if p.status == PacketStatus::Finished {
                prop_assert_eq!(p.remaining_fen, 0);
            }
        }
    }
}
