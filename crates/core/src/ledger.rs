//! Accounts and balanced transfers.
//!
//! Every movement of money is one transfer from one account to another of a
//! positive amount, so each record is balanced by construction and the sum of
//! all balances is always zero. The `World` account stands for money outside
//! the system: deposits come from it and withdrawals go to it, and
//! `-balance(World)` is deposits minus withdrawals. A `Transit` account
//! stands for another SET of the cluster (`crate::cross`): the net money
//! this SET owes it. World and Transit accounts are the only ones allowed
//! below zero.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountKind {
    User,
    World,
    /// Money held for all open group packets: sum of their remainders.
    PacketEscrow,
    /// Money held for one shake campaign (owner = campaign id).
    CampaignEscrow,
    /// What this SET owes another SET (owner = that SET's id): shares of
    /// this SET's packets paid to users homed there, less the shares of
    /// that SET's packets paid here. Below zero when the SET owes this one.
    Transit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Account {
    pub kind: AccountKind,
    pub owner: u64,
}

const KIND_SHIFT: u32 = 56;

impl Account {
    pub const WORLD: Account = Account { kind: AccountKind::World, owner: 0 };
    pub const PACKET_ESCROW: Account = Account { kind: AccountKind::PacketEscrow, owner: 0 };

    pub fn user(user: u64) -> Account {
        Account { kind: AccountKind::User, owner: user }
    }
    pub fn campaign(campaign: u64) -> Account {
        Account { kind: AccountKind::CampaignEscrow, owner: campaign }
    }
    /// What this SET owes SET `peer` (negative: what `peer` owes it).
    pub fn transit(peer: crate::sets::SetId) -> Account {
        Account { kind: AccountKind::Transit, owner: u64::from(peer) }
    }

    /// The storage id: kind in the top byte, owner below. A user's account id
    /// is the user id itself.
    pub fn id(self) -> i64 {
        assert!(self.owner <= crate::ID_MAX);
        let kind: u64 = match self.kind {
            AccountKind::User => 0,
            AccountKind::World => 1,
            AccountKind::PacketEscrow => 2,
            AccountKind::CampaignEscrow => 3,
            AccountKind::Transit => 4,
        };
        ((kind << KIND_SHIFT) | self.owner) as i64
    }

    pub fn from_id(id: i64) -> Option<Account> {
        let id = u64::try_from(id).ok()?;
        let owner = id & ((1 << KIND_SHIFT) - 1);
        let kind = match id >> KIND_SHIFT {
            0 => AccountKind::User,
            1 => AccountKind::World,
            2 => AccountKind::PacketEscrow,
            3 => AccountKind::CampaignEscrow,
            4 => AccountKind::Transit,
            _ => return None,
        };
        Some(Account { kind, owner })
    }

    /// World (money outside the system) and Transit (another SET's side of
    /// the cluster's money) may be below zero; every other account may not.
    pub fn may_go_negative(self) -> bool {
        matches!(self.kind, AccountKind::World | AccountKind::Transit)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum LedgerError {
    #[error("amount must be positive, got {0} fen")]
    NonPositive(i64),
    #[error("amount {0} fen exceeds the limit")]
    TooLarge(i64),
    #[error("insufficient funds: balance {balance_fen} fen, needs {needed_fen} fen")]
    InsufficientFunds { balance_fen: i64, needed_fen: i64 },
    #[error("balance would overflow")]
    Overflow,
}

/// A balanced movement of `amount_fen` from `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub from: Account,
    pub to: Account,
    pub amount_fen: i64,
}

/// In-memory balances, the owner of the "can this account pay?" rule.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    balances: HashMap<Account, i64>,
}

impl Ledger {
    pub fn from_balances(balances: impl IntoIterator<Item = (Account, i64)>) -> Ledger {
        Ledger { balances: balances.into_iter().collect() }
    }

    pub fn balance(&self, account: Account) -> i64 {
        self.balances.get(&account).copied().unwrap_or(0)
    }

    /// Checks a set of transfers without applying any of them: all of them
    /// must succeed together (they are one request).
    pub fn check(&self, transfers: &[Transfer]) -> Result<(), LedgerError> {
        let mut scratch: HashMap<Account, i64> = HashMap::new();
        for t in transfers {
            if t.amount_fen <= 0 {
                return Err(LedgerError::NonPositive(t.amount_fen));
            }
            if t.amount_fen > crate::limits::AMOUNT_FEN_MAX {
                return Err(LedgerError::TooLarge(t.amount_fen));
            }
            let from = *scratch.entry(t.from).or_insert_with(|| self.balance(t.from));
            let new_from = from.checked_sub(t.amount_fen).ok_or(LedgerError::Overflow)?;
            if new_from < 0 && !t.from.may_go_negative() {
                return Err(LedgerError::InsufficientFunds { balance_fen: from, needed_fen: t.amount_fen });
            }
            scratch.insert(t.from, new_from);
            let to = *scratch.entry(t.to).or_insert_with(|| self.balance(t.to));
            scratch.insert(t.to, to.checked_add(t.amount_fen).ok_or(LedgerError::Overflow)?);
        }
        Ok(())
    }

    /// Applies transfers that `check` accepted. Panics if they were not checked:
    /// that would be a bug, never peer input.
    pub fn apply(&mut self, transfers: &[Transfer]) {
        self.check(transfers).expect("transfers are checked before they are applied");
        for t in transfers {
            *self.balances.entry(t.from).or_insert(0) -= t.amount_fen;
            *self.balances.entry(t.to).or_insert(0) += t.amount_fen;
        }
    }

    /// Sum of all balances; zero at all times (double entry).
    pub fn total(&self) -> i128 {
        self.balances.values().map(|&b| b as i128).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Account, i64)> + '_ {
        self.balances.iter().map(|(a, b)| (*a, *b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn account_ids_round_trip() {
        for a in [Account::user(42), Account::WORLD, Account::PACKET_ESCROW, Account::campaign(7), Account::transit(31)]
        {
            assert_eq!(Account::from_id(a.id()), Some(a));
        }
        assert_eq!(Account::user(42).id(), 42);
    }

    #[test]
    fn users_cannot_go_negative_and_failed_requests_change_nothing() {
        let mut l = Ledger::default();
        l.apply(&[Transfer { from: Account::WORLD, to: Account::user(1), amount_fen: 100 }]);
        let both = [
            Transfer { from: Account::user(1), to: Account::PACKET_ESCROW, amount_fen: 60 },
            Transfer { from: Account::user(1), to: Account::PACKET_ESCROW, amount_fen: 60 },
        ];
        assert!(matches!(l.check(&both), Err(LedgerError::InsufficientFunds { .. })));
        assert_eq!(l.balance(Account::user(1)), 100);
        assert_eq!(
            l.check(&[Transfer { from: Account::WORLD, to: Account::user(1), amount_fen: 0 }]),
            Err(LedgerError::NonPositive(0))
        );
    }

    #[test]
    fn a_transit_account_may_go_negative_and_money_still_sums_to_zero() {
        let mut l = Ledger::default();
        // SET 1's credit applied here before anything went the other way.
        let credit = [Transfer { from: Account::transit(1), to: Account::user(3), amount_fen: 40 }];
        assert_eq!(l.check(&credit), Ok(()));
        l.apply(&credit);
        assert_eq!((l.balance(Account::transit(1)), l.total()), (-40, 0));
        assert!(Account::transit(1).may_go_negative() && !Account::PACKET_ESCROW.may_go_negative());
        assert_ne!(Account::transit(1).id(), Account::campaign(1).id());
    }

    proptest! {
        #[test]
        fn random_transfers_conserve_money_and_keep_users_non_negative(
            ops in proptest::collection::vec((0u64..5, 0u64..5, -10i64..1000, any::<bool>()), 1..200)
        ) {
            let mut l = Ledger::default();
            for (from, to, amount, deposit) in ops {
                let from = if deposit { Account::WORLD } else { Account::user(from) };
                let t = [Transfer { from, to: Account::user(to), amount_fen: amount }];
                if l.check(&t).is_ok() {
                    l.apply(&t);
                }
                prop_assert_eq!(l.total(), 0);
                for (a, b) in l.iter() {
                    prop_assert!(b >= 0 || a.may_go_negative());
                }
            }
        }
    }
}
