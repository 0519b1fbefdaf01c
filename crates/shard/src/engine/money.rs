//! Money in and out of the system, and balances: of this SET's users only
//! (a user's money lives in their home SET's store).

use hongbao_boundary::EngineError;
use hongbao_core::sets::SetMap;
use hongbao_core::UserId;
use hongbao_store::ops::{Deposit, MoneyMoved, Withdraw};

use super::Engine;
use crate::checks::{homed_here, op_error, valid_amount, valid_key, valid_user};
use crate::types::MoneyReceipt;

/// Checks what a deposit and a withdrawal both need.
fn check_move(user: UserId, amount_fen: i64, key: &str, set: SetMap) -> Result<(), EngineError> {
    valid_user(user)?;
    homed_here(user, set)?;
    valid_amount(amount_fen)?;
    valid_key(key)
}

fn receipt(user: UserId, amount_fen: i64, moved: MoneyMoved) -> MoneyReceipt {
    MoneyReceipt { user, amount_fen, balance_fen: moved.balance_fen, repeat: moved.repeat }
}

impl Engine {
    /// Money in from outside, keyed: a retry returns the first receipt.
    pub async fn deposit(&self, user: UserId, amount_fen: i64, key: &str) -> Result<MoneyReceipt, EngineError> {
        check_move(user, amount_fen, key, self.parts.set)?;
        let op = Deposit { user, amount_fen, key: key.to_owned(), at_ms: self.parts.clock.now_ms() };
        let moved = self.parts.writer.run(op).await.map_err(op_error)?;
        Ok(receipt(user, amount_fen, moved))
    }

    /// Money out to outside, keyed like `deposit`.
    pub async fn withdraw(&self, user: UserId, amount_fen: i64, key: &str) -> Result<MoneyReceipt, EngineError> {
        check_move(user, amount_fen, key, self.parts.set)?;
        let op = Withdraw { user, amount_fen, key: key.to_owned(), at_ms: self.parts.clock.now_ms() };
        let moved = self.parts.writer.run(op).await.map_err(op_error)?;
        Ok(receipt(user, amount_fen, moved))
    }

    /// The committed balance (as the writer published it: no read).
    pub async fn balance(&self, user: UserId) -> Result<i64, EngineError> {
        valid_user(user)?;
        homed_here(user, self.parts.set)?;
        Ok(self.parts.writer.committed.balance(hongbao_core::ledger::Account::user(user)))
    }
}
