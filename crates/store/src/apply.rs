//! How each operation is applied to SQLite inside the batch transaction: one
//! function per operation, each returning that operation's own outcome.
//!
//! A function's `rusqlite::Result` is the storage's verdict (an error fails
//! the whole batch); the inner `Result` is the decision on the request
//! (insufficient funds, key reused, …), which fails that operation alone.

use std::collections::HashMap;

use hongbao_core::audit::EntryKind;
use hongbao_core::campaign::CampaignStatus;
use hongbao_core::ledger::{Account, Ledger, Transfer};
use hongbao_core::limits::{
    GROUP_MEMBERS_MAX, PENDING_MESSAGES_PER_SENDER_MAX, PENDING_MESSAGES_PER_USER_MAX,
    PENDING_SYSTEM_MESSAGES_PER_USER_MAX,
};
use hongbao_core::packet::Recipients;
use hongbao_core::{CampaignId, PacketId, UserId};
use rusqlite::{params, Connection, OptionalExtension};

use crate::ops::*;

/// The storage's verdict on one step, around the decision on the request.
type Applied<T> = rusqlite::Result<Result<T, OpError>>;

/// One batch being applied: the open transaction, the writer's ledger, and
/// what must be written back before the commit.
pub(crate) struct BatchTx<'a> {
    tx: &'a Connection,
    ledger: &'a mut Ledger,
    next_campaign: &'a mut CampaignId,
    /// Undelivered user notices by sender, kept as messages come and go.
    pending_by_sender: &'a mut HashMap<UserId, u32>,
    /// Each account this batch moved money in or out of, with its balance
    /// before the batch: written back once per batch, and checked to sum to
    /// no change at all (money only moves between accounts).
    touched: HashMap<Account, i64>,
    /// The opens of each packet not yet written to its row.
    opened: HashMap<PacketId, PacketOpens>,
}

/// A packet's opens in the current batch, written as one `UPDATE` per packet
/// and batch: a packet row carries its recipient list, and rewriting it once
/// per open was the costliest statement of an open.
struct PacketOpens {
    taken_fen: i64,
    /// What is left after this batch's opens so far.
    remaining_fen: i64,
    /// Best luck, once an open of this batch finished the packet.
    finished: Option<UserId>,
}

/// What a journal entry is for.
#[derive(Clone, Copy)]
struct EntryMeta {
    kind: EntryKind,
    /// The packet or campaign id (0 for deposits and withdrawals).
    reference: u64,
    /// The user an open or a win credits.
    user: Option<UserId>,
    at_ms: u64,
}

impl<'a> BatchTx<'a> {
    pub(crate) fn new(
        tx: &'a Connection,
        ledger: &'a mut Ledger,
        next_campaign: &'a mut CampaignId,
        pending_by_sender: &'a mut HashMap<UserId, u32>,
    ) -> BatchTx<'a> {
        BatchTx { tx, ledger, next_campaign, pending_by_sender, touched: HashMap::new(), opened: HashMap::new() }
    }

    /// Applies one command, recording its decision in its slot.
    pub(crate) fn apply(&mut self, command: &mut Command) -> rusqlite::Result<()> {
        match command {
            Command::Deposit(s) => s.decided(self.deposit(&s.op)?),
            Command::Withdraw(s) => s.decided(self.withdraw(&s.op)?),
            Command::FundPacket(s) => s.decided(self.fund_packet(&s.op)?),
            Command::OpenShare(s) => s.decided(self.open_share(&s.op)?),
            Command::FindClaim(s) => s.decided(Ok(self.find_claim(&s.op)?)),
            Command::Refund(s) => {
                // Only a refund reads a packet row's `remaining`; everything
                // else may run on rows whose opens are still pending.
                self.flush_opens()?;
                s.decided(self.refund(&s.op)?)
            }
            Command::ReserveIds(s) => s.decided(self.reserve_ids(&s.op)?),
            Command::CreateCampaign(s) => s.decided(self.create_campaign(&s.op)?),
            Command::StartCampaign(s) => s.decided(self.start_campaign(&s.op)?),
            Command::ShakeWin(s) => s.decided(self.shake_win(&s.op)?),
            Command::FindShakeWin(s) => s.decided(Ok(self.first_shake_win(s.op.user, &s.op.key)?)),
            Command::CloseCampaign(s) => s.decided(self.close_campaign(&s.op)?),
            Command::StoreMessages(s) => s.decided(self.store_messages(&s.op)?),
            Command::AckMessage(s) => s.decided(self.ack_message(&s.op)?),
            Command::ChangeGroup(s) => s.decided(self.change_group(&s.op)?),
            Command::Barrier(s) => s.decided(Ok(())),
            Command::Close(s) => s.decided(Ok(())),
        }
        Ok(())
    }

    /// Writes back what the batch changed, after its last command, and
    /// returns the new balance of every account it changed (to publish once
    /// the batch has committed).
    pub(crate) fn finish(mut self) -> rusqlite::Result<Vec<(Account, i64)>> {
        self.flush_opens()?;
        // Money only moves between accounts: the batch changed the sum of
        // all balances by nothing (the ledger's own checks, verified by
        // independent arithmetic before anything is committed).
        let net: i128 = self.touched.iter().map(|(a, before)| (self.ledger.balance(*a) - before) as i128).sum();
        assert_eq!(net, 0, "a batch created or destroyed {net} fen");
        let mut stmt = self.tx.prepare_cached(
            "INSERT INTO accounts (id, balance) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET balance = excluded.balance",
        )?;
        let mut changed = Vec::with_capacity(self.touched.len());
        for account in self.touched.keys() {
            let balance = self.ledger.balance(*account);
            stmt.execute(params![account.id(), balance])?;
            changed.push((*account, balance));
        }
        // Conservation of the whole ledger on every committed batch in debug
        // builds (it is a scan of every account); `hongbao audit` checks it always.
        debug_assert_eq!(self.ledger.total(), 0, "ledger does not balance");
        Ok(changed)
    }

    fn deposit(&mut self, op: &Deposit) -> Applied<MoneyMoved> {
        let t = Transfer { from: Account::WORLD, to: Account::user(op.user), amount_fen: op.amount_fen };
        let meta = EntryMeta { kind: EntryKind::Deposit, reference: 0, user: None, at_ms: op.at_ms };
        self.keyed_transfer("deposit", &op.key, op.user, t, meta)
    }

    fn withdraw(&mut self, op: &Withdraw) -> Applied<MoneyMoved> {
        let t = Transfer { from: Account::user(op.user), to: Account::WORLD, amount_fen: op.amount_fen };
        let meta = EntryMeta { kind: EntryKind::Withdraw, reference: 0, user: None, at_ms: op.at_ms };
        self.keyed_transfer("withdraw", &op.key, op.user, t, meta)
    }

    /// A keyed deposit or withdrawal of `user`: a retry with the same request
    /// gets the first result; the same key for another request conflicts.
    fn keyed_transfer(
        &mut self,
        scope: &str,
        key: &str,
        user: UserId,
        t: Transfer,
        meta: EntryMeta,
    ) -> Applied<MoneyMoved> {
        let request = format!("{user}:{}", t.amount_fen);
        match self.keyed(scope, key, &request)? {
            Some(Ok(balance)) => {
                return Ok(Ok(MoneyMoved { balance_fen: balance.parse().unwrap_or_default(), repeat: true }))
            }
            Some(Err(e)) => return Ok(Err(e)),
            None => {}
        }
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        let balance = self.ledger.balance(Account::user(user));
        self.tx
            .prepare_cached("INSERT INTO idempotency (scope, key, request, result) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![scope, key, request, balance.to_string()])?;
        Ok(Ok(MoneyMoved { balance_fen: balance, repeat: false }))
    }

    /// The stored result of `(scope, key)`, if that key was used.
    fn keyed(&self, scope: &str, key: &str, request: &str) -> rusqlite::Result<Option<Result<String, OpError>>> {
        let row: Option<(String, String)> = self
            .tx
            .prepare_cached("SELECT request, result FROM idempotency WHERE scope = ?1 AND key = ?2")?
            .query_row(params![scope, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.map(|(req, result)| if req == request { Ok(result) } else { Err(OpError::KeyConflict) }))
    }

    fn fund_packet(&mut self, op: &FundPacket) -> Applied<Funded> {
        let p = &op.packet;
        if let Some(repeat) = self.funded_before(p, &op.key)? {
            return Ok(repeat);
        }
        let pending = self.pending_by_sender.get(&p.sender).copied().unwrap_or(0) as usize;
        if pending + p.recipients.list().len() > PENDING_MESSAGES_PER_SENDER_MAX {
            return Ok(Err(OpError::RateLimited(format!(
                "{pending} of your notices are still undelivered (at most {PENDING_MESSAGES_PER_SENDER_MAX}); retry later"
            ))));
        }
        let t = Transfer { from: Account::user(p.sender), to: Account::PACKET_ESCROW, amount_fen: p.total_fen };
        let meta = EntryMeta { kind: EntryKind::PacketFund, reference: p.id, user: None, at_ms: op.at_ms };
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        let (target, grp) = match &p.recipients {
            Recipients::Group { group, .. } => ("group", Some(*group as i64)),
            Recipients::Users(_) => ("users", None),
            Recipients::User(_) => ("user", None),
        };
        self.tx
            .prepare_cached(
                "INSERT INTO packets (id, sender, kind, total, count, target, grp, recipients, greeting, created_ms, expires_ms, remaining, status, idem_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?4, 'open', ?12)",
            )?
            .execute(params![
                p.id as i64,
                p.sender as i64,
                p.kind.as_str(),
                p.total_fen,
                p.count,
                target,
                grp,
                crate::schema::encode_users(p.recipients.list()),
                p.greeting,
                p.created_ms as i64,
                p.expires_ms as i64,
                op.key
            ])?;
        let mut messages = Vec::with_capacity(p.recipients.list().len());
        for &user in p.recipients.list() {
            messages.push((user, self.store_message(user, &op.notice, op.at_ms, Author::User(p.sender))?));
        }
        Ok(Ok(Funded::New { messages }))
    }

    /// The answer to a send whose key already funded a packet: that packet,
    /// or a conflict if the key was used for a different one.
    fn funded_before(&self, p: &NewPacket, key: &str) -> rusqlite::Result<Option<Result<Funded, OpError>>> {
        let existing = self
            .tx
            .prepare_cached(
                "SELECT id, total, count, expires_ms, kind FROM packets WHERE sender = ?1 AND idem_key = ?2",
            )?
            .query_row(params![p.sender as i64, key], |r| {
                Ok((
                    ExistingPacket {
                        id: r.get::<_, i64>(0)? as u64,
                        total_fen: r.get(1)?,
                        count: r.get(2)?,
                        expires_ms: r.get::<_, i64>(3)? as u64,
                    },
                    r.get::<_, String>(4)?,
                ))
            })
            .optional()?;
        Ok(existing.map(|(e, kind)| {
            if e.total_fen == p.total_fen && e.count == p.count && kind == p.kind.as_str() {
                Ok(Funded::Repeat(e))
            } else {
                Err(OpError::KeyConflict)
            }
        }))
    }

    fn open_share(&mut self, op: &OpenShare) -> Applied<()> {
        if let Err(e) = self.check_remaining(op)? {
            return Ok(Err(e));
        }
        let t = Transfer { from: Account::PACKET_ESCROW, to: Account::user(op.user), amount_fen: op.amount_fen };
        let meta =
            EntryMeta { kind: EntryKind::PacketOpen, reference: op.packet, user: Some(op.user), at_ms: op.at_ms };
        // The shard decided this share from the packet's state; the ledger
        // must agree. A failure here would be a bug in the shard.
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        self.tx
            .prepare_cached("INSERT INTO claims (packet, user, seq, amount, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![op.packet as i64, op.user as i64, op.seq, op.amount_fen, op.at_ms as i64])?;
        // The packet row is updated once per batch (`flush_opens`).
        let o = self.opened.get_mut(&op.packet).expect("checked above");
        // The shard never opens a finished packet; the stored row's checks
        // in `flush_opens` would refuse it too.
        assert!(o.finished.is_none(), "open of packet {} after the open that finished it", op.packet);
        o.taken_fen = o.taken_fen.checked_add(op.amount_fen).expect("a packet's shares sum to at most its amount");
        o.remaining_fen -= op.amount_fen;
        assert!(o.remaining_fen >= 0, "packet {} paid out more than it holds", op.packet);
        o.finished = op.best_luck;
        Ok(Ok(()))
    }

    /// Checks that storage (as committed, plus this batch's earlier opens)
    /// holds what the shard saw left in the packet before this share, and
    /// starts the packet's entry for this batch. A difference means an open
    /// this one was decided after did not commit: this one must not either.
    fn check_remaining(&mut self, op: &OpenShare) -> Applied<()> {
        let remaining_fen = match self.opened.get(&op.packet) {
            Some(o) => Some(o.remaining_fen),
            None => self
                .tx
                .prepare_cached("SELECT remaining FROM packets WHERE id = ?1 AND status = 'open'")?
                .query_row(params![op.packet as i64], |r| r.get::<_, i64>(0))
                .optional()?,
        };
        if remaining_fen != Some(op.remaining_before_fen) {
            let what = format!(
                "packet {} (storage holds {remaining_fen:?} fen, the open saw {})",
                op.packet, op.remaining_before_fen
            );
            return Ok(Err(OpError::Stale(what)));
        }
        self.opened.entry(op.packet).or_insert(PacketOpens {
            taken_fen: 0,
            remaining_fen: op.remaining_before_fen,
            finished: None,
        });
        Ok(Ok(()))
    }

    fn find_claim(&mut self, op: &FindClaim) -> rusqlite::Result<Option<i64>> {
        self.tx
            .prepare_cached("SELECT amount FROM claims WHERE packet = ?1 AND user = ?2")?
            .query_row(params![op.packet as i64, op.user as i64], |r| r.get(0))
            .optional()
    }

    /// Writes pending opens to their packet rows. Runs before a refund (the
    /// only operation that reads a row's `remaining`) and before the commit:
    /// the transaction holds the same rows as with one `UPDATE` per open,
    /// under the same checks.
    fn flush_opens(&mut self) -> rusqlite::Result<()> {
        if self.opened.is_empty() {
            return Ok(());
        }
        let mut stmt = self.tx.prepare_cached(
            "UPDATE packets SET remaining = remaining - ?2, status = ?3, best_luck = ?4 WHERE id = ?1 AND status = 'open' AND remaining >= ?2",
        )?;
        for (packet, o) in self.opened.drain() {
            let status = if o.finished.is_some() { "finished" } else { "open" };
            let changed = stmt.execute(params![packet as i64, o.taken_fen, status, o.finished.map(|u| u as i64)])?;
            assert_eq!(changed, 1, "opens of packet {packet} do not match its stored state");
        }
        Ok(())
    }

    fn refund(&mut self, op: &Refund) -> Applied<Refunded> {
        let changed = self
            .tx
            .prepare_cached(
                "UPDATE packets SET status = 'refunded', refunded = remaining, remaining = 0 WHERE id = ?1 AND status = 'open' AND remaining = ?2",
            )?
            .execute(params![op.packet as i64, op.amount_fen])?;
        if changed == 0 {
            let what = format!("open packet {} with {} fen remaining", op.packet, op.amount_fen);
            return Ok(Err(OpError::NotFound(what)));
        }
        if op.amount_fen == 0 {
            return Ok(Ok(Refunded { message: None }));
        }
        let t = Transfer { from: Account::PACKET_ESCROW, to: Account::user(op.sender), amount_fen: op.amount_fen };
        let meta = EntryMeta { kind: EntryKind::PacketRefund, reference: op.packet, user: None, at_ms: op.at_ms };
        if let Err(e) = self.transfer(t, meta)? {
            panic!("refund of packet {} does not balance: {e}", op.packet);
        }
        let message = self.store_message(op.sender, &op.notice, op.at_ms, Author::System)?;
        Ok(Ok(Refunded { message: Some(message) }))
    }

    fn reserve_ids(&mut self, op: &ReserveIds) -> Applied<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO id_marks (shard, mark) VALUES (?1, ?2) ON CONFLICT (shard) DO UPDATE SET mark = max(mark, excluded.mark)",
            )?
            .execute(params![op.shard as i64, op.mark as i64])?;
        Ok(Ok(()))
    }

    fn create_campaign(&mut self, op: &CreateCampaign) -> Applied<CampaignCreated> {
        let spec = &op.spec;
        let rule = serde_json::to_string(&spec.rule).expect("rule serialises");
        let existing: Option<(i64, i64, i64, String)> = self
            .tx
            .prepare_cached("SELECT id, funder, total, rule FROM campaigns WHERE idem_key = ?1")?
            .query_row(params![op.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .optional()?;
        if let Some((id, funder, total, r)) = existing {
            let same = funder as u64 == spec.funder && total == spec.total_fen && r == rule;
            return Ok(if same {
                Ok(CampaignCreated { id: id as u64, repeat: true })
            } else {
                Err(OpError::KeyConflict)
            });
        }
        let id = *self.next_campaign;
        let t = Transfer { from: Account::user(spec.funder), to: Account::campaign(id), amount_fen: spec.total_fen };
        let meta = EntryMeta { kind: EntryKind::CampaignFund, reference: id, user: None, at_ms: op.at_ms };
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        *self.next_campaign += 1;
        self.tx
            .prepare_cached(
                "INSERT INTO campaigns (id, funder, total, rule, rate_per_s, win_cap, status, created_ms, idem_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'created', ?7, ?8)",
            )?
            .execute(params![
                id as i64,
                spec.funder as i64,
                spec.total_fen,
                rule,
                spec.rate_per_s,
                spec.win_cap_per_user,
                op.at_ms as i64,
                op.key
            ])?;
        Ok(Ok(CampaignCreated { id, repeat: false }))
    }

    fn start_campaign(&mut self, op: &StartCampaign) -> Applied<()> {
        let n = self
            .tx
            .prepare_cached(
                "UPDATE campaigns SET status = 'running' WHERE id = ?1 AND status NOT IN ('stopped', 'finished')",
            )?
            .execute(params![op.id as i64])?;
        Ok(if n == 0 { Err(OpError::NotFound(format!("open campaign {}", op.id))) } else { Ok(()) })
    }

    fn shake_win(&mut self, op: &ShakeWin) -> Applied<ShakeWon> {
        if let Some(key) = &op.key {
            if let Some(first) = self.first_shake_win(op.user, key)? {
                return Ok(Ok(ShakeWon::Repeat(first)));
            }
        }
        // A packet is won once. A second win of it is a decision, not a
        // storage failure: it can only come after a commit that reported
        // failure yet reached the disk, and must not fail the whole batch.
        let won_before = self
            .tx
            .prepare_cached("SELECT 1 FROM shake_wins WHERE packet = ?1")?
            .query_row(params![op.packet as i64], |_| Ok(()))
            .optional()?;
        if won_before.is_some() {
            return Ok(Err(OpError::Stale(format!("campaign packet {} was won before", op.packet))));
        }
        let t =
            Transfer { from: Account::campaign(op.campaign), to: Account::user(op.user), amount_fen: op.amount_fen };
        let meta =
            EntryMeta { kind: EntryKind::ShakeWin, reference: op.campaign, user: Some(op.user), at_ms: op.at_ms };
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        self.tx
            .prepare_cached(
                "INSERT INTO shake_wins (packet, campaign, user, amount, at_ms, idem_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                op.packet as i64,
                op.campaign as i64,
                op.user as i64,
                op.amount_fen,
                op.at_ms as i64,
                op.key
            ])?;
        Ok(Ok(ShakeWon::Won))
    }

    /// The first win of `(user, key)`, if that key has won.
    fn first_shake_win(&self, user: UserId, key: &str) -> rusqlite::Result<Option<FirstWin>> {
        let first: Option<(i64, i64, i64)> = self
            .tx
            .prepare_cached("SELECT campaign, packet, amount FROM shake_wins WHERE user = ?1 AND idem_key = ?2")?
            .query_row(params![user as i64, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        Ok(first.map(|(c, p, a)| FirstWin { campaign: c as u64, packet: p as u64, amount_fen: a }))
    }

    fn close_campaign(&mut self, op: &CloseCampaign) -> Applied<CampaignClosed> {
        let row: Option<(i64, String)> = self
            .tx
            .prepare_cached("SELECT funder, status FROM campaigns WHERE id = ?1")?
            .query_row(params![op.id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((funder, current)) = row else {
            return Ok(Err(OpError::NotFound(format!("campaign {}", op.id))));
        };
        if CampaignStatus::parse(&current).is_some_and(|s| s.is_closed()) {
            return Ok(Ok(CampaignClosed { refunded_fen: 0 }));
        }
        let left = self.ledger.balance(Account::campaign(op.id));
        if left > 0 {
            let t = Transfer { from: Account::campaign(op.id), to: Account::user(funder as u64), amount_fen: left };
            let meta = EntryMeta { kind: EntryKind::CampaignRefund, reference: op.id, user: None, at_ms: op.at_ms };
            if let Err(e) = self.transfer(t, meta)? {
                panic!("campaign {} refund does not balance: {e}", op.id);
            }
        }
        self.tx
            .prepare_cached("UPDATE campaigns SET status = ?2 WHERE id = ?1")?
            .execute(params![op.id as i64, op.status.as_str()])?;
        Ok(Ok(CampaignClosed { refunded_fen: left }))
    }

    fn store_messages(&mut self, op: &StoreMessages) -> Applied<Vec<(UserId, u64)>> {
        let mut ids = Vec::with_capacity(op.users.len());
        for &u in &op.users {
            ids.push((u, self.store_message(u, &op.body, op.at_ms, Author::System)?));
        }
        Ok(Ok(ids))
    }

    fn ack_message(&mut self, op: &AckMessage) -> Applied<bool> {
        let deleted: Option<(String, i64)> = self
            .tx
            .prepare_cached("DELETE FROM messages WHERE id = ?1 AND user = ?2 RETURNING kind, sender")?
            .query_row(params![op.msg as i64, op.user as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((kind, sender)) = &deleted {
            self.forget_pending(kind, *sender as u64, 1);
        }
        Ok(Ok(deleted.is_some()))
    }

    /// A sender's notices that left storage (read, or dropped by a cap).
    fn forget_pending(&mut self, kind: &str, sender: UserId, n: u32) {
        if kind != Author::USER {
            return;
        }
        if let Some(count) = self.pending_by_sender.get_mut(&sender) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.pending_by_sender.remove(&sender);
            }
        }
    }

    fn change_group(&mut self, op: &ChangeGroup) -> Applied<Vec<UserId>> {
        let group = op.group as i64;
        // Work out the new membership first so an over-limit change touches nothing.
        let mut members: std::collections::BTreeSet<UserId> = match &op.change {
            GroupChange::Replace(_) => Default::default(),
            GroupChange::Add(_) | GroupChange::Remove(_) => self
                .tx
                .prepare_cached("SELECT user FROM group_members WHERE grp = ?1")?
                .query_map(params![group], |r| r.get::<_, i64>(0).map(|u| u as u64))?
                .collect::<rusqlite::Result<_>>()?,
        };
        match &op.change {
            GroupChange::Replace(users) | GroupChange::Add(users) => members.extend(users.iter().copied()),
            GroupChange::Remove(users) => {
                for u in users {
                    members.remove(u);
                }
            }
        }
        if members.len() > GROUP_MEMBERS_MAX {
            return Ok(Err(OpError::Invalid(format!("a group holds at most {GROUP_MEMBERS_MAX} members"))));
        }
        self.tx.prepare_cached("DELETE FROM group_members WHERE grp = ?1")?.execute(params![group])?;
        let mut insert = self.tx.prepare_cached("INSERT INTO group_members (grp, user) VALUES (?1, ?2)")?;
        for u in &members {
            insert.execute(params![group, *u as i64])?;
        }
        Ok(Ok(members.into_iter().collect()))
    }

    /// Checks and applies one transfer to the ledger and the journal.
    fn transfer(&mut self, t: Transfer, meta: EntryMeta) -> Applied<()> {
        if let Err(e) = self.ledger.check(&[t]) {
            return Ok(Err(e.into()));
        }
        let EntryMeta { kind, reference, user, at_ms } = meta;
        self.tx
            .prepare_cached(
                "INSERT INTO entries (from_account, to_account, amount, kind, reference, user, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                t.from.id(),
                t.to.id(),
                t.amount_fen,
                kind.as_str(),
                reference as i64,
                user.map(|u| u as i64),
                at_ms as i64
            ])?;
        for account in [t.from, t.to] {
            let before = self.ledger.balance(account);
            self.touched.entry(account).or_insert(before);
        }
        self.ledger.apply(&[t]);
        Ok(Ok(()))
    }

    /// Stores a persistent message and bounds what one offline user can
    /// accumulate of its kind: the oldest beyond the limit are dropped, so
    /// user notices never push out system messages.
    fn store_message(&mut self, user: UserId, body: &[u8], at_ms: u64, author: Author) -> rusqlite::Result<u64> {
        let (kind, sender, kept) = match author {
            Author::User(sender) => (Author::USER, sender, PENDING_MESSAGES_PER_USER_MAX),
            Author::System => (Author::SYSTEM, 0, PENDING_SYSTEM_MESSAGES_PER_USER_MAX),
        };
        self.tx
            .prepare_cached("INSERT INTO messages (user, body, created_ms, kind, sender) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![user as i64, body, at_ms as i64, kind, sender as i64])?;
        let id = self.tx.last_insert_rowid() as u64;
        if let Author::User(sender) = author {
            *self.pending_by_sender.entry(sender).or_insert(0) += 1;
        }
        let mut dropped = self.tx.prepare_cached(
            "DELETE FROM messages WHERE user = ?1 AND kind = ?2 AND id <= (SELECT id FROM messages WHERE user = ?1 AND kind = ?2 ORDER BY id DESC LIMIT 1 OFFSET ?3) RETURNING sender",
        )?;
        let senders: Vec<i64> = dropped
            .query_map(params![user as i64, kind, kept as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        drop(dropped);
        for sender in senders {
            self.forget_pending(kind, sender as u64, 1);
        }
        Ok(id)
    }
}

/// Who a stored message is from, which decides which cap it counts toward.
#[derive(Clone, Copy)]
enum Author {
    /// Another user (a packet's notice): capped per recipient, and per sender.
    User(UserId),
    /// The operator or the system (pushes, refunds): never dropped for user traffic.
    System,
}

impl Author {
    const USER: &'static str = "user";
    const SYSTEM: &'static str = "system";
}
