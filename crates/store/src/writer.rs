//! The group-commit writer: one thread, one SQLite connection, many
//! operations per transaction, one fsync per transaction, and every
//! operation's completion called only after its transaction committed.
//!
//! The writer also owns the in-memory balances (`core::ledger::Ledger`): it is
//! the only code that moves money, so "can this account pay?" is decided here,
//! sequentially, with no database lock contention and no read per request.
//!
//! Crash-only on storage failure: if a statement or a commit fails, every
//! operation of the batch is failed (none was acknowledged), the writer stops
//! taking work and the server must be restarted; recovery reads the last
//! committed state. Nothing acknowledged is ever rolled back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hongbao_core::audit::EntryKind;
use hongbao_core::campaign::{CampaignSpec, CampaignStatus};
use hongbao_core::ledger::{Account, Ledger, LedgerError, Transfer};
use hongbao_core::limits::{COMMIT_BATCH_RECORDS_MAX, PENDING_MESSAGES_PER_USER_MAX, WRITER_QUEUE_MAX};
use hongbao_core::packet::Recipients;
use hongbao_core::split::SplitKind;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

/// A new group packet, as funded.
#[derive(Clone, Debug)]
pub struct NewPacket {
    pub id: PacketId,
    pub sender: UserId,
    pub kind: SplitKind,
    pub total_fen: i64,
    pub count: u32,
    pub recipients: Recipients,
    pub greeting: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

/// Everything that changes durable state.
#[derive(Debug)]
pub enum Op {
    Deposit {
        user: UserId,
        amount_fen: i64,
        key: String,
    },
    Withdraw {
        user: UserId,
        amount_fen: i64,
        key: String,
    },
    /// Debit the sender, create the packet, store a message for each recipient.
    FundPacket {
        packet: Box<NewPacket>,
        key: String,
        notice: Vec<u8>,
    },
    /// One share to `user`; `finished` carries best luck when it was the last.
    Open {
        packet: PacketId,
        user: UserId,
        amount_fen: i64,
        seq: u32,
        at_ms: u64,
        finished: Option<UserId>,
    },
    /// Give an expired packet's remainder back to its sender, once.
    Refund {
        packet: PacketId,
        sender: UserId,
        amount_fen: i64,
        at_ms: u64,
        notice: Vec<u8>,
    },
    ReserveIds {
        shard: u16,
        mark: u64,
    },
    CreateCampaign {
        spec: CampaignSpec,
        key: String,
        at_ms: u64,
    },
    SetCampaignStatus {
        id: CampaignId,
        status: CampaignStatus,
    },
    ShakeWin {
        campaign: CampaignId,
        packet: PacketId,
        user: UserId,
        amount_fen: i64,
        at_ms: u64,
        key: Option<String>,
    },
    /// Looks up the first win of a shake key (moves no money). A keyed shake
    /// asks this before taking a packet, so a retry gets its first answer
    /// even when no packet is ready, the user is capped, or the pool is gone.
    FindShakeWin {
        user: UserId,
        key: String,
    },
    /// Return everything left in a campaign's escrow to its funder.
    CloseCampaign {
        id: CampaignId,
        status: CampaignStatus,
    },
    StoreMessages {
        users: Vec<UserId>,
        body: Vec<u8>,
        at_ms: u64,
    },
    AckMessage {
        user: UserId,
        msg: u64,
    },
    ChangeGroup {
        group: GroupId,
        add: Vec<UserId>,
        remove: Vec<UserId>,
        replace: bool,
    },
    /// Completes after everything queued before it has committed.
    Barrier,
    /// Like `Barrier`, then the writer stops: later operations fail.
    Close,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Deposit { .. } => "deposit",
            Op::Withdraw { .. } => "withdraw",
            Op::FundPacket { .. } => "fund_packet",
            Op::Open { .. } => "open",
            Op::Refund { .. } => "refund",
            Op::ReserveIds { .. } => "reserve_ids",
            Op::CreateCampaign { .. } => "create_campaign",
            Op::SetCampaignStatus { .. } => "set_campaign_status",
            Op::ShakeWin { .. } => "shake_win",
            Op::FindShakeWin { .. } => "find_shake_win",
            Op::CloseCampaign { .. } => "close_campaign",
            Op::StoreMessages { .. } => "store_messages",
            Op::AckMessage { .. } => "ack_message",
            Op::ChangeGroup { .. } => "change_group",
            Op::Barrier => "barrier",
            Op::Close => "close",
        }
    }
}

/// What a committed operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Balance {
        balance_fen: i64,
        repeat: bool,
    },
    /// `existing` is set when the key had already funded a packet.
    Funded {
        existing: Option<ExistingPacket>,
        messages: Vec<(UserId, u64)>,
    },
    Opened,
    Refunded {
        message: Option<u64>,
    },
    IdsReserved {
        mark: u64,
    },
    CampaignCreated {
        id: CampaignId,
        repeat: bool,
    },
    CampaignStatusSet,
    /// `repeat` holds the first win when the key had already won.
    ShakeWon {
        repeat: Option<(CampaignId, PacketId, i64)>,
    },
    ShakeWinFound {
        first: Option<(CampaignId, PacketId, i64)>,
    },
    CampaignClosed {
        refunded_fen: i64,
    },
    MessagesStored {
        ids: Vec<(UserId, u64)>,
    },
    MessageAcked {
        existed: bool,
    },
    GroupChanged {
        members: Vec<UserId>,
    },
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingPacket {
    pub id: PacketId,
    pub total_fen: i64,
    pub count: u32,
    pub expires_ms: u64,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OpError {
    #[error("insufficient funds: balance {balance_fen} fen, needs {needed_fen} fen")]
    InsufficientFunds { balance_fen: i64, needed_fen: i64 },
    #[error("idempotency key was already used for a different request")]
    KeyConflict,
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("storage failed: {0}; restart the server to recover")]
    Storage(String),
}

impl From<LedgerError> for OpError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::InsufficientFunds { balance_fen, needed_fen } => {
                OpError::InsufficientFunds { balance_fen, needed_fen }
            }
            other => OpError::Invalid(other.to_string()),
        }
    }
}

pub type Done = Box<dyn FnOnce(Result<Outcome, OpError>) + Send>;

struct Job {
    op: Op,
    done: Done,
}

/// How the writer groups operations into transactions.
///
/// `Group` is what the server runs. `PerOp` exists only as the baseline of
/// `hongbao perf opens` (one transaction and one fsync per operation); it is
/// deliberately not reachable from `serve`'s flags, environment or TOML.
/// Both keep the same durability: an operation's completion runs only after
/// the transaction holding it has committed (fsync'd).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    /// Everything queued, up to `COMMIT_BATCH_RECORDS_MAX` ops, in one transaction.
    #[default]
    Group,
    /// One operation per transaction (benchmark baseline only).
    PerOp,
}

impl CommitMode {
    /// Most operations one transaction holds.
    fn batch_max(self) -> usize {
        match self {
            CommitMode::Group => COMMIT_BATCH_RECORDS_MAX,
            CommitMode::PerOp => 1,
        }
    }
}

/// Counters the engine reports.
#[derive(Default, Debug)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub committed_ops: AtomicU64,
    pub queued: AtomicU64,
    pub failed: AtomicBool,
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    pub stats: Arc<WriterStats>,
}

impl Writer {
    pub(crate) fn start(
        conn: Connection,
        ledger: Ledger,
        next_campaign: CampaignId,
        lock: std::fs::File,
        mode: CommitMode,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(WRITER_QUEUE_MAX);
        let stats = Arc::new(WriterStats::default());
        let state = WriterState { conn, ledger, next_campaign, stats: stats.clone(), mode, _lock: lock };
        let handle = std::thread::Builder::new()
            .name("hongbao-writer".into())
            .spawn(move || state.run(rx))
            .expect("spawn writer thread");
        (Writer { tx, stats }, handle)
    }

    /// Queues an operation; waits while the queue is full (back-pressure).
    /// `done` runs on the writer thread after the commit: keep it short.
    pub async fn submit(&self, op: Op, done: Done) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(job)) = self.tx.send(Job { op, done }).await {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            (job.done)(Err(OpError::Storage("writer stopped".into())));
        }
    }

    /// Queues without waiting; `Err(op)` when the queue is full.
    pub fn try_submit(&self, op: Op, done: Done) -> Result<(), (Op, Done)> {
        match self.tx.try_send(Job { op, done }) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(job)) => Err((job.op, job.done)),
            Err(mpsc::error::TrySendError::Closed(job)) => {
                (job.done)(Err(OpError::Storage("writer stopped".into())));
                Ok(())
            }
        }
    }

    /// Submits and waits for the committed outcome.
    pub async fn run(&self, op: Op) -> Result<Outcome, OpError> {
        let (tx, rx) = oneshot::channel();
        self.submit(op, Box::new(move |r| drop(tx.send(r)))).await;
        rx.await.unwrap_or_else(|_| Err(OpError::Storage("writer stopped".into())))
    }

    pub fn queue_depth(&self) -> u64 {
        self.stats.queued.load(Ordering::Relaxed)
    }
}

struct WriterState {
    /// Held for the writer's life: one server per data directory.
    _lock: std::fs::File,
    conn: Connection,
    ledger: Ledger,
    next_campaign: CampaignId,
    stats: Arc<WriterStats>,
    mode: CommitMode,
}

/// Per-batch scratch: accounts whose balance must be written back, and the
/// opens of each packet not yet written to its row.
struct Batch {
    dirty: HashSet<Account>,
    opened: HashMap<PacketId, PacketOpens>,
}

/// A packet's opens in the current batch, written as one `UPDATE` per packet
/// and batch: a packet row carries its recipient list, and rewriting it once
/// per open was the costliest statement of an open.
#[derive(Default)]
struct PacketOpens {
    taken_fen: i64,
    /// Best luck, once an open of this batch finished the packet.
    finished: Option<UserId>,
}

impl Batch {
    fn new() -> Batch {
        Batch { dirty: HashSet::new(), opened: HashMap::new() }
    }

    fn add_open(&mut self, packet: PacketId, amount_fen: i64, finished: Option<UserId>) {
        let o = self.opened.entry(packet).or_default();
        // The shard never opens a finished packet; the stored row's checks
        // below would refuse it too.
        assert!(o.finished.is_none(), "open of packet {packet} after the open that finished it");
        o.taken_fen = o.taken_fen.checked_add(amount_fen).expect("a packet's shares sum to at most its amount");
        o.finished = finished;
    }

    /// Writes pending opens to their packet rows. Runs before a refund (the
    /// only operation that reads a row's `remaining`) and before the commit: the transaction holds the same rows as with one `UPDATE` per
    /// open, under the same checks.
    fn flush_opens(&mut self, tx: &Connection) -> rusqlite::Result<()> {
        if self.opened.is_empty() {
            return Ok(());
        }
        let mut stmt = tx.prepare_cached(
            "UPDATE packets SET remaining = remaining - ?2, status = ?3, best_luck = ?4 WHERE id = ?1 AND status = 'open' AND remaining >= ?2",
        )?;
        for (packet, o) in self.opened.drain() {
            let status = if o.finished.is_some() { "finished" } else { "open" };
            let changed = stmt.execute(params![packet as i64, o.taken_fen, status, o.finished.map(|u| u as i64)])?;
            assert_eq!(changed, 1, "opens of packet {packet} do not match its stored state");
        }
        Ok(())
    }
}

impl WriterState {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let batch_max = self.mode.batch_max();
        let mut jobs: Vec<Job> = Vec::with_capacity(batch_max);
        while let Some(first) = rx.blocking_recv() {
            jobs.push(first);
            // Whatever queued while the last batch was committing joins this one.
            while jobs.len() < batch_max {
                match rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            self.stats.queued.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
            let closing = jobs.iter().any(|j| matches!(j.op, Op::Close));
            let started = Instant::now();
            match self.commit_batch(&mut jobs) {
                Ok(results) => {
                    let n = results.len();
                    // Counted before any completion runs: whoever has a reply
                    // sees its commit counted.
                    self.stats.commits.fetch_add(1, Ordering::Relaxed);
                    self.stats.committed_ops.fetch_add(n as u64, Ordering::Relaxed);
                    metrics::histogram!("hongbao_commit_batch_ops").record(n as f64);
                    metrics::counter!("hongbao_commits_total").increment(1);
                    if closing {
                        // Release the connection and the data directory's lock
                        // before any completion says the writer closed, so the
                        // directory can be opened again at once.
                        rx.close();
                        drop(self);
                        for (job, result) in jobs.drain(..).zip(results) {
                            (job.done)(result);
                        }
                        while let Ok(job) = rx.try_recv() {
                            (job.done)(Err(OpError::Storage("writer closed".into())));
                        }
                        return;
                    }
                    for (job, result) in jobs.drain(..).zip(results) {
                        (job.done)(result);
                    }
                    metrics::histogram!("hongbao_commit_seconds").record(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    tracing::error!(error = %e, "storage failed; failing the batch and stopping the writer. Restart the server to recover.");
                    self.stats.failed.store(true, Ordering::Relaxed);
                    for job in jobs.drain(..) {
                        (job.done)(Err(OpError::Storage(e.to_string())));
                    }
                    rx.close();
                    while let Ok(job) = rx.try_recv() {
                        (job.done)(Err(OpError::Storage(e.to_string())));
                    }
                    return;
                }
            }
        }
    }

    fn commit_batch(&mut self, jobs: &mut [Job]) -> rusqlite::Result<Vec<Result<Outcome, OpError>>> {
        let tx = self.conn.unchecked_transaction()?;
        let mut batch = Batch::new();
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs.iter() {
            // Only a refund reads a packet row's `remaining`; everything
            // else may run on rows whose opens are still pending.
            if matches!(job.op, Op::Refund { .. }) {
                batch.flush_opens(&tx)?;
            }
            let r = apply(&tx, &mut self.ledger, &mut self.next_campaign, &mut batch, &job.op)?;
            metrics::counter!("hongbao_writer_ops_total", "op" => job.op.name(), "ok" => if r.is_ok() { "true" } else { "false" }).increment(1);
            results.push(r);
        }
        batch.flush_opens(&tx)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO accounts (id, balance) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET balance = excluded.balance",
            )?;
            for account in batch.dirty.drain() {
                stmt.execute(params![account.id(), self.ledger.balance(account)])?;
            }
        }
        // Conservation on every committed batch in debug builds; `hongbao
        // audit` checks it always.
        debug_assert_eq!(self.ledger.total(), 0, "ledger does not balance");
        tx.commit()?;
        Ok(results)
    }
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

fn insert_entry(tx: &Connection, t: &Transfer, meta: &EntryMeta) -> rusqlite::Result<()> {
    let EntryMeta { kind, reference, user, at_ms } = *meta;
    tx.prepare_cached(
        "INSERT INTO entries (from_account, to_account, amount, kind, reference, user, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![t.from.id(), t.to.id(), t.amount_fen, kind.as_str(), reference as i64, user.map(|u| u as i64), at_ms as i64])?;
    Ok(())
}

/// Checks and applies transfers to the ledger and the journal, all or none.
fn transfer(
    tx: &Connection,
    ledger: &mut Ledger,
    batch: &mut Batch,
    transfers: &[Transfer],
    meta: EntryMeta,
) -> rusqlite::Result<Result<(), OpError>> {
    if let Err(e) = ledger.check(transfers) {
        return Ok(Err(e.into()));
    }
    for t in transfers {
        insert_entry(tx, t, &meta)?;
        batch.dirty.insert(t.from);
        batch.dirty.insert(t.to);
    }
    ledger.apply(transfers);
    Ok(Ok(()))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn store_message(tx: &Connection, user: UserId, body: &[u8], at_ms: u64) -> rusqlite::Result<u64> {
    tx.prepare_cached("INSERT INTO messages (user, body, created_ms) VALUES (?1, ?2, ?3)")?.execute(params![
        user as i64,
        body,
        at_ms as i64
    ])?;
    let id = tx.last_insert_rowid() as u64;
    // Bound what one offline user can accumulate: drop the oldest beyond the limit.
    tx.prepare_cached(
        "DELETE FROM messages WHERE user = ?1 AND id <= (SELECT id FROM messages WHERE user = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![user as i64, PENDING_MESSAGES_PER_USER_MAX as i64])?;
    Ok(id)
}

/// Idempotency for keyed deposits and withdrawals: a retry with the same
/// request gets the first result; the same key for another request conflicts.
fn keyed(tx: &Connection, scope: &str, key: &str, request: &str) -> rusqlite::Result<Option<Result<String, OpError>>> {
    let row: Option<(String, String)> = tx
        .prepare_cached("SELECT request, result FROM idempotency WHERE scope = ?1 AND key = ?2")?
        .query_row(params![scope, key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(req, result)| if req == request { Ok(result) } else { Err(OpError::KeyConflict) }))
}

fn remember(tx: &Connection, scope: &str, key: &str, request: &str, result: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO idempotency (scope, key, request, result) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![scope, key, request, result])?;
    Ok(())
}

/// The first win of `(user, key)`, if that key has won.
fn first_shake_win(tx: &Connection, user: UserId, key: &str) -> rusqlite::Result<Option<(CampaignId, PacketId, i64)>> {
    let first: Option<(i64, i64, i64)> = tx
        .prepare_cached("SELECT campaign, packet, amount FROM shake_wins WHERE user = ?1 AND idem_key = ?2")?
        .query_row(params![user as i64, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(first.map(|(c, p, a)| (c as u64, p as u64, a)))
}

fn apply(
    tx: &Connection,
    ledger: &mut Ledger,
    next_campaign: &mut CampaignId,
    batch: &mut Batch,
    op: &Op,
) -> rusqlite::Result<Result<Outcome, OpError>> {
    let at = now_ms();
    Ok(match op {
        Op::Deposit { user, amount_fen, key } | Op::Withdraw { user, amount_fen, key } => {
            let deposit = matches!(op, Op::Deposit { .. });
            let scope = if deposit { "deposit" } else { "withdraw" };
            let request = format!("{user}:{amount_fen}");
            match keyed(tx, scope, key, &request)? {
                Some(Ok(balance)) => {
                    Ok(Outcome::Balance { balance_fen: balance.parse().unwrap_or_default(), repeat: true })
                }
                Some(Err(e)) => Err(e),
                None => {
                    let (from, to) = if deposit {
                        (Account::WORLD, Account::user(*user))
                    } else {
                        (Account::user(*user), Account::WORLD)
                    };
                    let kind = if deposit { EntryKind::Deposit } else { EntryKind::Withdraw };
                    let t = [Transfer { from, to, amount_fen: *amount_fen }];
                    match transfer(tx, ledger, batch, &t, EntryMeta { kind, reference: 0, user: None, at_ms: at })? {
                        Err(e) => Err(e),
                        Ok(()) => {
                            let balance = ledger.balance(Account::user(*user));
                            remember(tx, scope, key, &request, &balance.to_string())?;
                            Ok(Outcome::Balance { balance_fen: balance, repeat: false })
                        }
                    }
                }
            }
        }
        Op::FundPacket { packet: p, key, notice } => {
            let existing = tx
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
            if let Some((e, kind)) = existing {
                return Ok(if e.total_fen == p.total_fen && e.count == p.count && kind == p.kind.as_str() {
                    Ok(Outcome::Funded { existing: Some(e), messages: Vec::new() })
                } else {
                    Err(OpError::KeyConflict)
                });
            }
            let t = [Transfer { from: Account::user(p.sender), to: Account::PACKET_ESCROW, amount_fen: p.total_fen }];
            if let Err(e) = transfer(
                tx,
                ledger,
                batch,
                &t,
                EntryMeta { kind: EntryKind::PacketFund, reference: p.id, user: None, at_ms: at },
            )? {
                return Ok(Err(e));
            }
            let (target, grp) = match &p.recipients {
                Recipients::Group { group, .. } => ("group", Some(*group as i64)),
                Recipients::Users(_) => ("users", None),
                Recipients::User(_) => ("user", None),
            };
            tx.prepare_cached(
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
                key
            ])?;
            let mut messages = Vec::with_capacity(p.recipients.list().len());
            for &user in p.recipients.list() {
                messages.push((user, store_message(tx, user, notice, at)?));
            }
            Ok(Outcome::Funded { existing: None, messages })
        }
        Op::Open { packet, user, amount_fen, seq, at_ms, finished } => {
            let t = [Transfer { from: Account::PACKET_ESCROW, to: Account::user(*user), amount_fen: *amount_fen }];
            // The shard decided this share from the packet's state; the ledger
            // must agree. A failure here would be a bug in the shard.
            if let Err(e) = transfer(
                tx,
                ledger,
                batch,
                &t,
                EntryMeta { kind: EntryKind::PacketOpen, reference: *packet, user: Some(*user), at_ms: *at_ms },
            )? {
                return Ok(Err(e));
            }
            tx.prepare_cached("INSERT INTO claims (packet, user, seq, amount, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?
                .execute(params![*packet as i64, *user as i64, seq, amount_fen, *at_ms as i64])?;
            // The packet row is updated once per batch (`Batch::flush_opens`).
            batch.add_open(*packet, *amount_fen, *finished);
            Ok(Outcome::Opened)
        }
        Op::Refund { packet, sender, amount_fen, at_ms, notice } => {
            let changed = tx
                .prepare_cached(
                    "UPDATE packets SET status = 'refunded', refunded = remaining, remaining = 0 WHERE id = ?1 AND status = 'open' AND remaining = ?2",
                )?
                .execute(params![*packet as i64, amount_fen])?;
            if changed == 0 {
                return Ok(Err(OpError::NotFound(format!("open packet {packet} with {amount_fen} fen remaining"))));
            }
            let mut message = None;
            if *amount_fen > 0 {
                let t =
                    [Transfer { from: Account::PACKET_ESCROW, to: Account::user(*sender), amount_fen: *amount_fen }];
                if let Err(e) = transfer(
                    tx,
                    ledger,
                    batch,
                    &t,
                    EntryMeta { kind: EntryKind::PacketRefund, reference: *packet, user: None, at_ms: *at_ms },
                )? {
                    panic!("refund of packet {packet} does not balance: {e}");
                }
                message = Some(store_message(tx, *sender, notice, at)?);
            }
            Ok(Outcome::Refunded { message })
        }
        Op::ReserveIds { shard, mark } => {
            tx.prepare_cached(
                "INSERT INTO id_marks (shard, mark) VALUES (?1, ?2) ON CONFLICT (shard) DO UPDATE SET mark = max(mark, excluded.mark)",
            )?
            .execute(params![*shard as i64, *mark as i64])?;
            Ok(Outcome::IdsReserved { mark: *mark })
        }
        Op::CreateCampaign { spec, key, at_ms } => {
            let rule = serde_json::to_string(&spec.rule).expect("rule serialises");
            let existing: Option<(i64, i64, i64, String)> = tx
                .prepare_cached("SELECT id, funder, total, rule FROM campaigns WHERE idem_key = ?1")?
                .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?;
            if let Some((id, funder, total, r)) = existing {
                return Ok(if funder as u64 == spec.funder && total == spec.total_fen && r == rule {
                    Ok(Outcome::CampaignCreated { id: id as u64, repeat: true })
                } else {
                    Err(OpError::KeyConflict)
                });
            }
            let id = *next_campaign;
            let t =
                [Transfer { from: Account::user(spec.funder), to: Account::campaign(id), amount_fen: spec.total_fen }];
            if let Err(e) = transfer(
                tx,
                ledger,
                batch,
                &t,
                EntryMeta { kind: EntryKind::CampaignFund, reference: id, user: None, at_ms: *at_ms },
            )? {
                return Ok(Err(e));
            }
            *next_campaign += 1;
            tx.prepare_cached(
                "INSERT INTO campaigns (id, funder, total, rule, rate_per_s, win_cap, status, created_ms, idem_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'created', ?7, ?8)",
            )?
            .execute(params![id as i64, spec.funder as i64, spec.total_fen, rule, spec.rate_per_s, spec.win_cap_per_user, *at_ms as i64, key])?;
            Ok(Outcome::CampaignCreated { id, repeat: false })
        }
        Op::SetCampaignStatus { id, status } => {
            let n = tx
                .prepare_cached(
                    "UPDATE campaigns SET status = ?2 WHERE id = ?1 AND status NOT IN ('stopped', 'finished')",
                )?
                .execute(params![*id as i64, status.as_str()])?;
            if n == 0 {
                Err(OpError::NotFound(format!("open campaign {id}")))
            } else {
                Ok(Outcome::CampaignStatusSet)
            }
        }
        Op::FindShakeWin { user, key } => Ok(Outcome::ShakeWinFound { first: first_shake_win(tx, *user, key)? }),
        Op::ShakeWin { campaign, packet, user, amount_fen, at_ms, key } => {
            if let Some(key) = key {
                if let Some(first) = first_shake_win(tx, *user, key)? {
                    return Ok(Ok(Outcome::ShakeWon { repeat: Some(first) }));
                }
            }
            let t =
                [Transfer { from: Account::campaign(*campaign), to: Account::user(*user), amount_fen: *amount_fen }];
            if let Err(e) = transfer(
                tx,
                ledger,
                batch,
                &t,
                EntryMeta { kind: EntryKind::ShakeWin, reference: *campaign, user: Some(*user), at_ms: *at_ms },
            )? {
                return Ok(Err(e));
            }
            tx.prepare_cached(
                "INSERT INTO shake_wins (packet, campaign, user, amount, at_ms, idem_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![*packet as i64, *campaign as i64, *user as i64, amount_fen, *at_ms as i64, key])?;
            Ok(Outcome::ShakeWon { repeat: None })
        }
        Op::CloseCampaign { id, status } => {
            let row: Option<(i64, String)> = tx
                .prepare_cached("SELECT funder, status FROM campaigns WHERE id = ?1")?
                .query_row(params![*id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((funder, current)) = row else {
                return Ok(Err(OpError::NotFound(format!("campaign {id}"))));
            };
            if CampaignStatus::parse(&current).is_some_and(|s| s.is_closed()) {
                return Ok(Ok(Outcome::CampaignClosed { refunded_fen: 0 }));
            }
            let left = ledger.balance(Account::campaign(*id));
            if left > 0 {
                let t = [Transfer { from: Account::campaign(*id), to: Account::user(funder as u64), amount_fen: left }];
                if let Err(e) = transfer(
                    tx,
                    ledger,
                    batch,
                    &t,
                    EntryMeta { kind: EntryKind::CampaignRefund, reference: *id, user: None, at_ms: at },
                )? {
                    panic!("campaign {id} refund does not balance: {e}");
                }
            }
            tx.prepare_cached("UPDATE campaigns SET status = ?2 WHERE id = ?1")?
                .execute(params![*id as i64, status.as_str()])?;
            Ok(Outcome::CampaignClosed { refunded_fen: left })
        }
        Op::StoreMessages { users, body, at_ms } => {
            let mut ids = Vec::with_capacity(users.len());
            for &u in users {
                ids.push((u, store_message(tx, u, body, *at_ms)?));
            }
            Ok(Outcome::MessagesStored { ids })
        }
        Op::AckMessage { user, msg } => {
            let n = tx
                .prepare_cached("DELETE FROM messages WHERE id = ?1 AND user = ?2")?
                .execute(params![*msg as i64, *user as i64])?;
            Ok(Outcome::MessageAcked { existed: n > 0 })
        }
        Op::ChangeGroup { group, add, remove, replace } => {
            // Work out the new membership first so an over-limit change
            // touches nothing.
            let mut members: std::collections::BTreeSet<UserId> = if *replace {
                Default::default()
            } else {
                tx.prepare_cached("SELECT user FROM group_members WHERE grp = ?1")?
                    .query_map(params![*group as i64], |r| r.get::<_, i64>(0).map(|u| u as u64))?
                    .collect::<rusqlite::Result<_>>()?
            };
            members.extend(add.iter().copied());
            for u in remove {
                members.remove(u);
            }
            if members.len() > hongbao_core::limits::GROUP_MEMBERS_MAX {
                return Ok(Err(OpError::Invalid(format!(
                    "a group holds at most {} members",
                    hongbao_core::limits::GROUP_MEMBERS_MAX
                ))));
            }
            tx.prepare_cached("DELETE FROM group_members WHERE grp = ?1")?.execute(params![*group as i64])?;
            for u in &members {
                tx.prepare_cached("INSERT INTO group_members (grp, user) VALUES (?1, ?2)")?
                    .execute(params![*group as i64, *u as i64])?;
            }
            Ok(Outcome::GroupChanged { members: members.into_iter().collect() })
        }
        Op::Barrier | Op::Close => Ok(Outcome::Done),
    })
}
