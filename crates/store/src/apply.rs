//! The decision on each operation, made inside the batch's transaction: one
//! function per operation, each returning that operation's own outcome.
//! Written once for every store: reads and writes go through `Rows`.
//!
//! A function's outer `Result` is the storage's verdict (an error fails the
//! whole batch); the inner `Result` is the decision on the request
//! (insufficient funds, key reused, …), which fails that operation alone.

use std::collections::{BTreeSet, HashMap};

use hongbao_core::audit::EntryKind;
use hongbao_core::campaign::CampaignStatus;
use hongbao_core::cross::{CrossBody, CrossKind};
use hongbao_core::ledger::{Account, Ledger, Transfer};
use hongbao_core::limits::{
    GROUP_MEMBERS_MAX, PENDING_MESSAGES_PER_SENDER_MAX, PENDING_MESSAGES_PER_USER_MAX,
    PENDING_SYSTEM_MESSAGES_PER_USER_MAX,
};
use hongbao_core::sets::SetId;
use hongbao_core::{CampaignId, PacketId, UserId};

use crate::ops::*;
use crate::rows::{CrossIn, CrossOut, EntryMeta, MessageKind, RowResult, Rows};

/// The storage's verdict on one step, around the decision on the request.
type Applied<T> = RowResult<Result<T, OpError>>;

/// What the writer keeps in memory between batches, reloaded from storage
/// at start-up and after a failure.
pub(crate) struct WriterMemory {
    /// Every account's balance as committed plus the batch being applied.
    pub ledger: Ledger,
    /// The sequence of the next new campaign's id (`ids::make_campaign_id`).
    pub next_campaign: u64,
    /// Undelivered user notices by sender, for each sender's budget.
    pub pending_by_sender: HashMap<UserId, u32>,
    /// Outbox rows not yet marked published (`Writer::cross_backlog`).
    pub cross_backlog: u64,
}

impl WriterMemory {
    /// The memory of a store's committed rows: balances by account id, the
    /// highest campaign sequence (of any SET: parts of other SETs' campaigns
    /// are stored here too), pending user notices by sender, and unpublished
    /// outbox rows. Checks that the balances sum to zero.
    pub(crate) fn from_stored(
        balances: Vec<(i64, i64)>,
        max_campaign: Option<i64>,
        pending_by_sender: HashMap<UserId, u32>,
        cross_backlog: u64,
    ) -> Result<WriterMemory, crate::StoreError> {
        let mut accounts = Vec::with_capacity(balances.len());
        for (id, balance) in balances {
            let account = Account::from_id(id).ok_or_else(|| crate::StoreError::Corrupt(format!("account id {id}")))?;
            accounts.push((account, balance));
        }
        let ledger = Ledger::from_balances(accounts);
        if ledger.total() != 0 {
            return Err(crate::StoreError::Corrupt(format!(
                "stored balances sum to {} fen, not 0; run `hongbao audit`",
                ledger.total()
            )));
        }
        let next_campaign = max_campaign.map(|m| m as u64 + 1).unwrap_or(1);
        Ok(WriterMemory { ledger, next_campaign, pending_by_sender, cross_backlog })
    }
}

/// One batch being applied: the store's rows in the open transaction, the
/// writer's memory, and what must be written back before the commit.
pub(crate) struct BatchTx<'a, R: Rows> {
    rows: &'a mut R,
    memory: &'a mut WriterMemory,
    /// Each account this batch moved money in or out of, with its balance
    /// before the batch: written back once per batch, and checked to sum to
    /// no change at all (money only moves between accounts).
    touched: HashMap<Account, i64>,
    /// The opens of each packet not yet written to its row.
    opened: HashMap<PacketId, PacketOpens>,
    /// Users who got a message of a kind in this batch: their oldest
    /// beyond that kind's cap are dropped once, before the commit.
    messaged: BTreeSet<(UserId, MessageKind)>,
}

/// A packet's opens in the current batch, written once per packet and
/// batch: a packet row carries its recipient list, and rewriting it once
/// per open was the costliest statement of an open.
struct PacketOpens {
    taken_fen: i64,
    /// What is left after this batch's opens so far.
    remaining_fen: i64,
    /// Best luck, once an open of this batch finished the packet.
    finished: Option<UserId>,
}

impl<'a, R: Rows> BatchTx<'a, R> {
    pub(crate) fn new(rows: &'a mut R, memory: &'a mut WriterMemory) -> BatchTx<'a, R> {
        BatchTx { rows, memory, touched: HashMap::new(), opened: HashMap::new(), messaged: BTreeSet::new() }
    }

    /// Applies one command, recording its decision in its slot.
    pub(crate) fn apply(&mut self, command: &mut Command) -> RowResult<()> {
        match command {
            Command::Deposit(s) => s.decided(self.deposit(&s.op)?),
            Command::Withdraw(s) => s.decided(self.withdraw(&s.op)?),
            Command::FundPacket(s) => s.decided(self.fund_packet(&s.op)?),
            Command::OpenShare(s) => s.decided(self.open_share(&s.op)?),
            Command::FindClaim(s) => s.decided(Ok(self.rows.claim_amount(s.op.packet, s.op.user)?)),
            Command::Refund(s) => {
                // Only a refund reads a packet row's `remaining`; everything
                // else may run on rows whose opens are still pending.
                self.flush_opens()?;
                s.decided(self.refund(&s.op)?)
            }
            Command::ReserveIds(s) => s.decided(Ok(self.rows.raise_id_mark(s.op.shard, s.op.mark)?)),
            Command::CreateCampaign(s) => s.decided(self.create_campaign(&s.op)?),
            Command::StartCampaign(s) => s.decided(self.start_campaign(&s.op)?),
            Command::ShakeWin(s) => s.decided(self.shake_win(&s.op)?),
            Command::FindShakeWin(s) => s.decided(Ok(self.rows.shake_win_by_key(s.op.user, &s.op.key)?)),
            Command::CloseCampaign(s) => s.decided(self.close_campaign(&s.op)?),
            Command::StoreMessages(s) => s.decided(self.store_messages(&s.op)?),
            Command::AckMessage(s) => s.decided(self.ack_message(&s.op)?),
            Command::ChangeGroup(s) => s.decided(self.change_group(&s.op)?),
            Command::ApplyCross(s) => s.decided(self.apply_cross(&s.op)?),
            Command::MarkCrossPublished(s) => {
                let marked = self.rows.mark_cross_published(&s.op.keys)?;
                self.memory.cross_backlog = self.memory.cross_backlog.saturating_sub(marked);
                s.decided(Ok(marked))
            }
            Command::Barrier(s) => s.decided(Ok(())),
            Command::Close(s) => s.decided(Ok(())),
        }
        Ok(())
    }

    /// Writes back what the batch changed, after its last command, and
    /// returns the new balance of every account it changed (to publish once
    /// the batch has committed).
    pub(crate) fn finish(mut self) -> RowResult<Vec<(Account, i64)>> {
        self.flush_opens()?;
        self.drop_messages_over_caps()?;
        // Money only moves between accounts: the batch changed the sum of
        // all balances by nothing (the ledger's own checks, verified by
        // independent arithmetic before anything is committed).
        let net: i128 = self.touched.iter().map(|(a, before)| (self.memory.ledger.balance(*a) - before) as i128).sum();
        assert_eq!(net, 0, "a batch created or destroyed {net} fen");
        let changed: Vec<(Account, i64)> =
            self.touched.keys().map(|account| (*account, self.memory.ledger.balance(*account))).collect();
        self.rows.write_balances(&changed)?;
        // Conservation of the whole ledger on every committed batch in debug
        // builds (it is a scan of every account); `hongbao audit` checks it always.
        debug_assert_eq!(self.memory.ledger.total(), 0, "ledger does not balance");
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
        if let Some((stored_request, result)) = self.rows.keyed_result(scope, key)? {
            return Ok(if stored_request == request {
                Ok(MoneyMoved { balance_fen: result.parse().unwrap_or_default(), repeat: true })
            } else {
                Err(OpError::KeyConflict)
            });
        }
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        let balance = self.memory.ledger.balance(Account::user(user));
        self.rows.insert_keyed_result(scope, key, &request, &balance.to_string())?;
        Ok(Ok(MoneyMoved { balance_fen: balance, repeat: false }))
    }

    fn fund_packet(&mut self, op: &FundPacket) -> Applied<Funded> {
        let p = &op.packet;
        if let Some((existing, kind)) = self.rows.packet_by_key(p.sender, &op.key)? {
            let same = existing.total_fen == p.total_fen && existing.count == p.count && kind == p.kind.as_str();
            return Ok(if same { Ok(Funded::Repeat(existing)) } else { Err(OpError::KeyConflict) });
        }
        let pending = self.memory.pending_by_sender.get(&p.sender).copied().unwrap_or(0) as usize;
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
        self.rows.insert_packet(p, &op.key)?;
        let mut messages = Vec::with_capacity(p.recipients.list().len().saturating_sub(op.away.len()));
        // A recipient homed on another SET gets the notice through the
        // outbox: its messages live in its SET's store.
        let away: HashMap<UserId, hongbao_core::sets::SetId> = op.away.iter().copied().collect();
        for &user in p.recipients.list() {
            match away.get(&user) {
                Some(&to) => {
                    let row = CrossOut {
                        to,
                        kind: CrossKind::Notice,
                        packet: p.id,
                        user,
                        amount_fen: 0,
                        body: Some(&op.notice),
                        created_ms: op.at_ms,
                    };
                    self.write_cross_out(&row)?;
                }
                None => messages.push((user, self.store_message(user, &op.notice, op.at_ms, Author::User(p.sender))?)),
            }
        }
        Ok(Ok(Funded::New { messages }))
    }

    fn write_cross_out(&mut self, row: &CrossOut<'_>) -> RowResult<()> {
        self.rows.insert_cross_out(row)?;
        self.memory.cross_backlog += 1;
        Ok(())
    }

    fn open_share(&mut self, op: &OpenShare) -> Applied<()> {
        if let Err(e) = self.check_remaining(op)? {
            return Ok(Err(e));
        }
        // A user homed on another SET is paid there: here the share goes
        // into that SET's transit account, and the outbox carries it.
        let to = match op.cross_to {
            Some(set) => Account::transit(set),
            None => Account::user(op.user),
        };
        let t = Transfer { from: Account::PACKET_ESCROW, to, amount_fen: op.amount_fen };
        let meta =
            EntryMeta { kind: EntryKind::PacketOpen, reference: op.packet, user: Some(op.user), at_ms: op.at_ms };
        // The shard decided this share from the packet's state; the ledger
        // must agree. A failure here would be a bug in the shard.
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        self.rows.insert_claim(op)?;
        if let Some(set) = op.cross_to {
            let row = CrossOut {
                to: set,
                kind: CrossKind::Credit,
                packet: op.packet,
                user: op.user,
                amount_fen: op.amount_fen,
                body: None,
                created_ms: op.at_ms,
            };
            self.write_cross_out(&row)?;
        }
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
            None => self.rows.open_remaining(op.packet)?,
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

    /// Writes pending opens to their packet rows. Runs before a refund (the
    /// only operation that reads a row's `remaining`) and before the commit:
    /// the transaction holds the same rows as with one update per open,
    /// under the same checks.
    fn flush_opens(&mut self) -> RowResult<()> {
        for (packet, o) in self.opened.drain() {
            self.rows.write_opens(packet, o.taken_fen, o.finished)?;
        }
        Ok(())
    }

    fn refund(&mut self, op: &Refund) -> Applied<Refunded> {
        if !self.rows.refund_packet(op.packet, op.amount_fen)? {
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

    fn create_campaign(&mut self, op: &CreateCampaign) -> Applied<CampaignCreated> {
        // This SET's row is its own part of a campaign split over the cluster.
        let own = match op.parts.get(usize::from(op.set)) {
            Some(part) => part,
            None if op.parts.is_empty() => &op.spec,
            None => return Ok(Err(OpError::Invalid(format!("no part of the campaign for SET {}", op.set)))),
        };
        let rule = serde_json::to_string(&own.rule).expect("rule serialises");
        if let Some(existing) = self.rows.campaign_by_key(&op.key)? {
            let same = existing.funder == own.funder && existing.total_fen == own.total_fen && existing.rule == rule;
            return Ok(if same {
                Ok(CampaignCreated { id: existing.id, repeat: true })
            } else {
                Err(OpError::KeyConflict)
            });
        }
        let id = hongbao_core::ids::make_campaign_id(op.set, self.memory.next_campaign);
        let spec = &op.spec;
        let t = Transfer { from: Account::user(spec.funder), to: Account::campaign(id), amount_fen: spec.total_fen };
        let meta = EntryMeta { kind: EntryKind::CampaignFund, reference: id, user: None, at_ms: op.at_ms };
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        for (x, part) in op.parts.iter().enumerate() {
            let x = x as SetId;
            if x == op.set {
                continue;
            }
            let t = Transfer { from: Account::campaign(id), to: Account::transit(x), amount_fen: part.total_fen };
            let meta = EntryMeta { kind: EntryKind::CampaignFundOut, reference: id, user: None, at_ms: op.at_ms };
            if let Err(e) = self.transfer(t, meta)? {
                panic!("campaign {id}: SET {x}'s part does not fit in what was funded: {e}");
            }
            let body = serde_json::to_vec(part).expect("spec serialises");
            let row = CrossOut {
                to: x,
                kind: CrossKind::Fund,
                packet: id,
                user: u64::from(x),
                amount_fen: part.total_fen,
                body: Some(&body),
                created_ms: op.at_ms,
            };
            self.write_cross_out(&row)?;
        }
        self.memory.next_campaign += 1;
        self.rows.insert_campaign(id, own, &rule, op.at_ms, &op.key)?;
        Ok(Ok(CampaignCreated { id, repeat: false }))
    }

    fn start_campaign(&mut self, op: &StartCampaign) -> Applied<()> {
        let started = self.rows.start_campaign(op.id)?;
        Ok(if started { Ok(()) } else { Err(OpError::NotFound(format!("open campaign {}", op.id))) })
    }

    fn shake_win(&mut self, op: &ShakeWin) -> Applied<ShakeWon> {
        if let Some(key) = &op.key {
            if let Some(first) = self.rows.shake_win_by_key(op.user, key)? {
                return Ok(Ok(ShakeWon::Repeat(first)));
            }
        }
        // A packet is won once. A second win of it is a decision, not a
        // storage failure: it can only come after a commit that reported
        // failure yet reached the disk, and must not fail the whole batch.
        if self.rows.packet_won(op.packet)? {
            return Ok(Err(OpError::Stale(format!("campaign packet {} was won before", op.packet))));
        }
        let t =
            Transfer { from: Account::campaign(op.campaign), to: Account::user(op.user), amount_fen: op.amount_fen };
        let meta =
            EntryMeta { kind: EntryKind::ShakeWin, reference: op.campaign, user: Some(op.user), at_ms: op.at_ms };
        if let Err(e) = self.transfer(t, meta)? {
            return Ok(Err(e));
        }
        self.rows.insert_shake_win(op)?;
        Ok(Ok(ShakeWon::Won))
    }

    fn close_campaign(&mut self, op: &CloseCampaign) -> Applied<CampaignClosed> {
        let Some((funder, current)) = self.rows.campaign_state(op.id)? else {
            return Ok(Err(OpError::NotFound(format!("campaign {}", op.id))));
        };
        if CampaignStatus::parse(&current).is_some_and(|s| s.is_closed()) {
            return Ok(Ok(CampaignClosed { refunded_fen: 0 }));
        }
        let left = self.memory.ledger.balance(Account::campaign(op.id));
        if left > 0 {
            // A part of another SET's campaign: back through that SET, whose
            // `refund` pays the funder (their balance is there).
            let (to, kind, user) = match op.home {
                Some(home) => (Account::transit(home), EntryKind::CampaignRefundOut, Some(funder)),
                None => (Account::user(funder), EntryKind::CampaignRefund, None),
            };
            let t = Transfer { from: Account::campaign(op.id), to, amount_fen: left };
            let meta = EntryMeta { kind, reference: op.id, user, at_ms: op.at_ms };
            if let Err(e) = self.transfer(t, meta)? {
                panic!("campaign {} refund does not balance: {e}", op.id);
            }
            if let Some(home) = op.home {
                let row = CrossOut {
                    to: home,
                    kind: CrossKind::Refund,
                    packet: op.id,
                    user: funder,
                    amount_fen: left,
                    body: None,
                    created_ms: op.at_ms,
                };
                self.write_cross_out(&row)?;
            }
        }
        self.rows.set_campaign_status(op.id, op.status.as_str())?;
        Ok(Ok(CampaignClosed { refunded_fen: left }))
    }

    fn store_messages(&mut self, op: &StoreMessages) -> Applied<Vec<(UserId, u64)>> {
        let mut ids = Vec::with_capacity(op.users.len());
        for &u in &op.users {
            ids.push((u, self.store_message(u, &op.body, op.at_ms, Author::System)?));
        }
        Ok(Ok(ids))
    }

    /// A message of another SET, once per key: the key's inbox row is written
    /// in the same transaction as what the message does.
    fn apply_cross(&mut self, op: &ApplyCross) -> Applied<CrossApplied> {
        let m = &op.msg;
        let (kind, amount_fen) = (m.kind(), m.amount_fen());
        if let Some(applied_fen) = self.rows.cross_in_amount(m.from, kind, m.packet, m.user)? {
            return Ok(if applied_fen == amount_fen {
                Ok(CrossApplied { repeat: true, message: None })
            } else {
                Err(OpError::Invalid(format!(
                    "the {} of packet {} for user {} from SET {} was applied with {applied_fen} fen;                      this copy says {amount_fen} fen: one of them is corrupt",
                    kind.as_str(),
                    m.packet,
                    m.user,
                    m.from
                )))
            });
        }
        let message = match &m.body {
            CrossBody::Credit { amount_fen } => {
                let t = Transfer { from: Account::transit(m.from), to: Account::user(m.user), amount_fen: *amount_fen };
                let meta = EntryMeta {
                    kind: EntryKind::CrossCredit,
                    reference: m.packet,
                    user: Some(m.user),
                    at_ms: op.at_ms,
                };
                if let Err(e) = self.transfer(t, meta)? {
                    return Ok(Err(e));
                }
                None
            }
            CrossBody::Notice { body } => Some(self.store_message(m.user, body, op.at_ms, Author::Remote)?),
            CrossBody::Fund { spec } => {
                // This SET's part of campaign `packet`, created as the home
                // SET funded it (status created: the operator starts it).
                let id: CampaignId = m.packet;
                if self.rows.campaign_state(id)?.is_some() {
                    return Ok(Err(OpError::Invalid(format!(
                        "campaign {id} already has a part here that no fund of SET {} made",
                        m.from
                    ))));
                }
                let t =
                    Transfer { from: Account::transit(m.from), to: Account::campaign(id), amount_fen: spec.total_fen };
                let meta =
                    EntryMeta { kind: EntryKind::CampaignFundIn, reference: id, user: Some(m.user), at_ms: op.at_ms };
                if let Err(e) = self.transfer(t, meta)? {
                    return Ok(Err(e));
                }
                let rule = serde_json::to_string(&spec.rule).expect("rule serialises");
                // Longer than any operator's key (at most 64 bytes), so
                // never one of theirs.
                let key = format!(
                    "fund of campaign {id} from SET {}: this SET's part, made by the campaign's home SET",
                    m.from
                );
                debug_assert!(key.len() > hongbao_core::limits::IDEMPOTENCY_KEY_BYTES_MAX);
                self.rows.insert_campaign(id, spec, &rule, op.at_ms, &key)?;
                None
            }
            CrossBody::Refund { amount_fen } => {
                // Only to the funder of a campaign of this SET.
                match self.rows.campaign_state(m.packet)? {
                    Some((funder, _)) if funder == m.user => {}
                    _ => {
                        return Ok(Err(OpError::Invalid(format!(
                            "a refund of campaign {} for user {}, who funded no such campaign here",
                            m.packet, m.user
                        ))))
                    }
                }
                let t = Transfer { from: Account::transit(m.from), to: Account::user(m.user), amount_fen: *amount_fen };
                let meta = EntryMeta {
                    kind: EntryKind::CampaignRefundIn,
                    reference: m.packet,
                    user: Some(m.user),
                    at_ms: op.at_ms,
                };
                if let Err(e) = self.transfer(t, meta)? {
                    return Ok(Err(e));
                }
                None
            }
        };
        let row = CrossIn {
            from: m.from,
            kind,
            packet: m.packet,
            user: m.user,
            amount_fen,
            created_ms: m.created_ms,
            applied_ms: op.at_ms,
        };
        self.rows.insert_cross_in(&row)?;
        Ok(Ok(CrossApplied { repeat: false, message }))
    }

    fn ack_message(&mut self, op: &AckMessage) -> Applied<bool> {
        let deleted = self.rows.delete_message(op.msg, op.user)?;
        if let Some((kind, sender)) = deleted {
            self.forget_pending(kind, sender, 1);
        }
        Ok(Ok(deleted.is_some()))
    }

    /// A sender's notices that left storage (read, or dropped by a cap).
    fn forget_pending(&mut self, kind: MessageKind, sender: UserId, n: u32) {
        if kind != MessageKind::User {
            return;
        }
        if let Some(count) = self.memory.pending_by_sender.get_mut(&sender) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.memory.pending_by_sender.remove(&sender);
            }
        }
    }

    fn change_group(&mut self, op: &ChangeGroup) -> Applied<Vec<UserId>> {
        // Work out the new membership first so an over-limit change touches nothing.
        let mut members: BTreeSet<UserId> = match &op.change {
            GroupChange::Replace(_) => Default::default(),
            GroupChange::Add(_) | GroupChange::Remove(_) => self.rows.group_members(op.group)?.into_iter().collect(),
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
        self.rows.replace_group(op.group, &members)?;
        Ok(Ok(members.into_iter().collect()))
    }

    /// Checks and applies one transfer to the ledger and the journal.
    fn transfer(&mut self, t: Transfer, meta: EntryMeta) -> Applied<()> {
        if let Err(e) = self.memory.ledger.check(&[t]) {
            return Ok(Err(e.into()));
        }
        self.rows.insert_entry(&t, meta)?;
        for account in [t.from, t.to] {
            let before = self.memory.ledger.balance(account);
            self.touched.entry(account).or_insert(before);
        }
        self.memory.ledger.apply(&[t]);
        Ok(Ok(()))
    }

    /// Stores a persistent message. What one offline user can accumulate of
    /// each kind is bounded once per batch (`drop_messages_over_caps`), so
    /// user notices never push out system messages.
    fn store_message(&mut self, user: UserId, body: &[u8], at_ms: u64, author: Author) -> RowResult<u64> {
        let (kind, sender) = match author {
            Author::User(sender) => (MessageKind::User, sender),
            Author::Remote => (MessageKind::User, 0),
            Author::System => (MessageKind::System, 0),
        };
        let id = self.rows.insert_message(user, body, at_ms, kind, sender)?;
        if let Author::User(sender) = author {
            *self.memory.pending_by_sender.entry(sender).or_insert(0) += 1;
        }
        self.messaged.insert((user, kind));
        Ok(id)
    }

    /// Drops the oldest messages beyond each kind's cap of every user who
    /// got one in this batch: the same rows as a cut after each message.
    fn drop_messages_over_caps(&mut self) -> RowResult<()> {
        if self.messaged.is_empty() {
            return Ok(());
        }
        let owners = std::mem::take(&mut self.messaged);
        let dropped = self.rows.prune_messages(&owners, |kind| match kind {
            MessageKind::User => PENDING_MESSAGES_PER_USER_MAX,
            MessageKind::System => PENDING_SYSTEM_MESSAGES_PER_USER_MAX,
        })?;
        for (kind, sender) in dropped {
            self.forget_pending(kind, sender, 1);
        }
        Ok(())
    }
}

/// Who a stored message is from, which decides which cap it counts toward.
#[derive(Clone, Copy)]
enum Author {
    /// Another user (a packet's notice): capped per recipient, and per sender.
    User(UserId),
    /// A user of another SET (a notice that SET sent through its outbox):
    /// capped per recipient like `User`; the sender's budget is kept on the
    /// sender's SET, so it is stored with sender 0 and counted in none here.
    Remote,
    /// The operator or the system (pushes, refunds): never dropped for user traffic.
    System,
}
