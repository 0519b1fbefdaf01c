//! Balances as committed, published by the writer after each commit, so a
//! balance and the money totals are answered without a read of storage.
//!
//! The writer's own ledger holds the batch being applied too; this copy holds
//! only what has committed, and is updated before any completion of the
//! batch runs: a client told "opened" that asks for its balance sees the
//! share. Totals by account kind are kept as running sums, so `/metrics` and
//! `/v1/stats` cost O(1) however many accounts there are. The four totals
//! change together, once per batch, under one lock: a reading is always one
//! committed state, in which the money equation holds exactly (the live
//! dashboard turns red the moment it does not, so a reading torn between
//! two accounts of one transfer would be a false alarm).

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use hongbao_core::ledger::{Account, AccountKind, Ledger};

use crate::MoneyTotals;

/// Stripes of the map: a publish takes one stripe's lock per account, a read
/// one stripe's read lock; 64 keeps the writer and many readers apart.
const STRIPES: usize = 64;

pub struct CommittedBalances {
    stripes: Box<[RwLock<HashMap<Account, i64>>]>,
    /// Sum of the balances of each kind: user, world, packet escrow,
    /// campaign escrow, transit (`kind_index`). Locked once per batch by the
    /// writer and once per reading: a few hundred times a second at most.
    totals: Mutex<[i64; KINDS]>,
}

/// Account kinds, each with a running total.
const KINDS: usize = 5;

fn kind_index(kind: AccountKind) -> usize {
    match kind {
        AccountKind::User => 0,
        AccountKind::World => 1,
        AccountKind::PacketEscrow => 2,
        AccountKind::CampaignEscrow => 3,
        AccountKind::Transit => 4,
    }
}

impl CommittedBalances {
    pub(crate) fn new(ledger: &Ledger) -> CommittedBalances {
        let committed = CommittedBalances {
            stripes: (0..STRIPES).map(|_| RwLock::new(HashMap::new())).collect(),
            totals: Default::default(),
        };
        committed.replace_all(ledger);
        committed
    }

    fn stripe(&self, account: Account) -> &RwLock<HashMap<Account, i64>> {
        &self.stripes[(account.owner as usize ^ kind_index(account.kind)) % STRIPES]
    }

    /// Replaces everything with `ledger` (at start-up and after storage
    /// recovered: the ledger was reloaded from what is committed).
    pub(crate) fn replace_all(&self, ledger: &Ledger) {
        let mut totals = [0i64; KINDS];
        let mut by_stripe: Vec<HashMap<Account, i64>> = (0..STRIPES).map(|_| HashMap::new()).collect();
        for (account, balance) in ledger.iter() {
            totals[kind_index(account.kind)] += balance;
            by_stripe[(account.owner as usize ^ kind_index(account.kind)) % STRIPES].insert(account, balance);
        }
        for (stripe, map) in self.stripes.iter().zip(by_stripe) {
            *stripe.write().unwrap_or_else(|p| p.into_inner()) = map;
        }
        *self.totals.lock().unwrap_or_else(|p| p.into_inner()) = totals;
    }

    /// Publishes the new balances of the accounts a committed batch changed.
    pub(crate) fn publish(&self, changed: impl IntoIterator<Item = (Account, i64)>) {
        let mut deltas = [0i64; KINDS];
        for (account, balance) in changed {
            let old = self.stripe(account).write().unwrap_or_else(|p| p.into_inner()).insert(account, balance);
            deltas[kind_index(account.kind)] += balance - old.unwrap_or(0);
        }
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        for (total, delta) in totals.iter_mut().zip(deltas) {
            *total += delta;
        }
    }

    /// An account's committed balance (0 if it never held money).
    pub fn balance(&self, account: Account) -> i64 {
        self.stripe(account).read().unwrap_or_else(|p| p.into_inner()).get(&account).copied().unwrap_or(0)
    }

    /// Committed totals by account kind.
    pub fn totals(&self) -> MoneyTotals {
        let totals = *self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let t = |i: usize| totals[i];
        MoneyTotals {
            user_balances_fen: t(0),
            world_fen: t(1),
            packet_escrow_fen: t(2),
            campaign_escrow_fen: t(3),
            transit_fen: t(4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_core::ledger::Transfer;

    #[test]
    fn publishing_keeps_balances_and_running_totals_exact() {
        let mut ledger = Ledger::default();
        let committed = CommittedBalances::new(&ledger);
        let moves = [
            Transfer { from: Account::WORLD, to: Account::user(1), amount_fen: 500 },
            Transfer { from: Account::user(1), to: Account::PACKET_ESCROW, amount_fen: 200 },
            Transfer { from: Account::PACKET_ESCROW, to: Account::user(2), amount_fen: 150 },
            Transfer { from: Account::user(1), to: Account::campaign(3), amount_fen: 100 },
            Transfer { from: Account::PACKET_ESCROW, to: Account::transit(1), amount_fen: 20 },
            Transfer { from: Account::transit(2), to: Account::user(2), amount_fen: 5 },
        ];
        for t in moves {
            ledger.apply(&[t]);
            committed.publish([(t.from, ledger.balance(t.from)), (t.to, ledger.balance(t.to))]);
        }
        assert_eq!((committed.balance(Account::user(1)), committed.balance(Account::user(2))), (200, 155));
        let totals = committed.totals();
        assert_eq!(
            (totals.user_balances_fen, totals.packet_escrow_fen, totals.campaign_escrow_fen, totals.world_fen),
            (355, 30, 100, -500)
        );
        assert_eq!(totals.transit_fen, 15, "owed to SET 1 (20), owed by SET 2 (5)");
        // A rebuild from the ledger agrees with the running sums.
        let rebuilt = CommittedBalances::new(&ledger);
        assert_eq!(rebuilt.totals(), totals);
    }

    /// A reader racing the writer sees only whole batches: the four totals
    /// always sum to zero (world is minus everything deposited).
    #[test]
    fn a_reading_of_the_totals_is_never_torn_between_two_accounts() {
        let mut ledger = Ledger::default();
        let committed = std::sync::Arc::new(CommittedBalances::new(&ledger));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (committed, stop) = (committed.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut readings = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = committed.totals();
                    let sum = t.user_balances_fen + t.world_fen + t.packet_escrow_fen + t.campaign_escrow_fen;
                    assert_eq!(sum, 0, "torn reading {t:?} after {readings} readings");
                    readings += 1;
                }
                readings
            })
        };
        for i in 0..20_000u64 {
            let user = Account::user(1 + i % 7);
            let batch = [
                Transfer { from: Account::WORLD, to: user, amount_fen: 10 },
                Transfer { from: user, to: Account::PACKET_ESCROW, amount_fen: 4 },
                Transfer { from: Account::PACKET_ESCROW, to: Account::campaign(1), amount_fen: 3 },
            ];
            ledger.apply(&batch);
            let changed: Vec<_> = [user, Account::WORLD, Account::PACKET_ESCROW, Account::campaign(1)]
                .into_iter()
                .map(|a| (a, ledger.balance(a)))
                .collect();
            committed.publish(changed);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(committed.totals().user_balances_fen, 20_000 * 6);
    }
}
