//! The group-commit writer: one thread, one SQLite connection, many
//! operations per transaction, one fsync per transaction, and every
//! operation's completion called only after its transaction committed.
//!
//! The writer also owns the in-memory balances (`core::ledger::Ledger`): it is
//! the only code that moves money, so "can this account pay?" is decided here,
//! sequentially, with no database lock contention and no read per request.
//!
//! Storage failures are survived, not fatal. A transaction takes the write
//! lock up front (`BEGIN IMMEDIATE`) and waits out a lock held elsewhere for
//! up to `schema::BUSY_TIMEOUT_MS`. If a statement or the commit fails (a
//! lock held too long, a full disk, an I/O error), the transaction is rolled
//! back and every operation of the batch fails: none was acknowledged, and
//! nothing of it is kept. The writer then fails every operation at once
//! (`OpError::Storage`, quickly) while it retries with backoff: it reopens
//! the database, reloads the balances from what is committed (so nothing of
//! the failed batch lingers in memory, and after a failed fsync the state is
//! whatever the file now says), and commits a probe. When the probe commits,
//! service resumes by itself. `Writer::failure` says meanwhile what is wrong.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hongbao_core::ledger::Ledger;
use hongbao_core::{CampaignId, UserId};
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use crate::apply::BatchTx;
use crate::committed::CommittedBalances;
use crate::ops::{Command, Completion, Op, OpError, Slot};
use crate::schema;

/// First pause before storage is tried again after a failure; it doubles
/// with each failed try up to `RETRY_BACKOFF_MAX_MS`.
const RETRY_BACKOFF_MIN_MS: u64 = 100;
/// Longest pause between tries: a full disk freed by an operator is noticed
/// within this.
const RETRY_BACKOFF_MAX_MS: u64 = 5_000;
/// While storage fails, operations that queued are failed at least this
/// often, so nobody waits for the backoff to end to hear the answer.
const FAIL_FAST_INTERVAL_MS: u64 = 10;
const _: () = assert!(FAIL_FAST_INTERVAL_MS < RETRY_BACKOFF_MIN_MS && RETRY_BACKOFF_MIN_MS < RETRY_BACKOFF_MAX_MS);

/// Why storage is failing now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StorageFailure {
    /// The error of the last failed try.
    pub reason: String,
    /// When the failure began (wall-clock ms).
    pub since_ms: u64,
    /// Batches and probes that failed since.
    pub failed_tries: u64,
}

/// Counters the engine reports.
#[derive(Default, Debug)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub committed_ops: AtomicU64,
    pub queued: AtomicU64,
    /// True while storage is failing (the cheap check for every request).
    pub failing: AtomicBool,
    failure: Mutex<Option<StorageFailure>>,
}

impl WriterStats {
    fn failure_lock(&self) -> std::sync::MutexGuard<'_, Option<StorageFailure>> {
        // A completion never runs under this lock; recover rather than panic.
        self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
    pub stats: Arc<WriterStats>,
    /// Balances as committed, published after each commit.
    pub committed: Arc<CommittedBalances>,
}

fn stopped() -> OpError {
    OpError::Storage("the writer has stopped".into())
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Writer {
    /// Starts the writer thread on the database at `path`. `batch_ops_max`
    /// is how many operations one transaction holds:
    /// `COMMIT_BATCH_RECORDS_MAX`, or 1 for the transaction-per-operation
    /// baseline.
    pub(crate) fn start(
        path: PathBuf,
        conn: Connection,
        ledger: Ledger,
        next_campaign: CampaignId,
        lock: std::fs::File,
        batch_ops_max: usize,
    ) -> Result<(Writer, std::thread::JoinHandle<()>), crate::StoreError> {
        let pending_by_sender = schema::pending_by_sender(&conn)?;
        assert!(batch_ops_max >= 1);
        let (tx, rx) = mpsc::channel(hongbao_core::limits::WRITER_QUEUE_MAX);
        let stats = Arc::new(WriterStats::default());
        metrics::gauge!("hongbao_storage_up").set(1.0);
        let committed = Arc::new(CommittedBalances::new(&ledger));
        let state = WriterState {
            path,
            conn,
            ledger,
            next_campaign,
            pending_by_sender,
            stats: stats.clone(),
            committed: committed.clone(),
            batch_ops_max,
            _lock: lock,
        };
        let handle = std::thread::Builder::new()
            .name("hongbao-writer".into())
            .spawn(move || state.run(rx))
            .expect("spawn writer thread");
        Ok((Writer { tx, stats, committed }, handle))
    }

    /// Queues an operation; waits while the queue is full (back-pressure).
    /// `done` gets the operation's own outcome, on the writer thread, after
    /// the commit: keep it short.
    pub async fn submit<O: Op>(&self, op: O, done: impl FnOnce(Result<O::Outcome, OpError>) + Send + 'static) {
        let command = O::into_command(Slot::new(op, Completion::new(done)));
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(command)) = self.tx.send(command).await {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            command.settle(Some(&stopped()));
        }
    }

    /// Queues without waiting. When the queue is full nothing is queued,
    /// `done` is called at once with `OpError::QueueFull`, and the answer is
    /// false.
    pub fn try_submit<O: Op>(&self, op: O, done: impl FnOnce(Result<O::Outcome, OpError>) + Send + 'static) -> bool {
        match self.tx.try_reserve() {
            Ok(permit) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                permit.send(O::into_command(Slot::new(op, Completion::new(done))));
                true
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                done(Err(OpError::QueueFull));
                false
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                done(Err(stopped()));
                true
            }
        }
    }

    /// Submits and waits for the committed outcome.
    pub async fn run<O: Op>(&self, op: O) -> Result<O::Outcome, OpError> {
        let (tx, rx) = oneshot::channel();
        self.submit(op, move |r| drop(tx.send(r))).await;
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    pub fn queue_depth(&self) -> u64 {
        self.stats.queued.load(Ordering::Relaxed)
    }

    /// True while storage is failing: whatever is submitted now fails.
    pub fn is_failing(&self) -> bool {
        self.stats.failing.load(Ordering::Relaxed)
    }

    /// What is wrong with storage, while it fails.
    pub fn failure(&self) -> Option<StorageFailure> {
        self.stats.failure_lock().clone()
    }
}

struct WriterState {
    /// Held for the writer's life: one server per data directory.
    _lock: std::fs::File,
    /// The database, reopened after a failure.
    path: PathBuf,
    conn: Connection,
    /// Every account's balance as committed plus the batch being applied.
    ledger: Ledger,
    /// The id the next new campaign gets.
    next_campaign: CampaignId,
    /// Undelivered user notices by sender, for each sender's budget.
    pending_by_sender: HashMap<UserId, u32>,
    stats: Arc<WriterStats>,
    committed: Arc<CommittedBalances>,
    /// Most operations one transaction holds.
    batch_ops_max: usize,
}

/// How the writer's loop ended a batch.
enum Next {
    Continue,
    Stop,
}

impl WriterState {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_ops_max);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            // Whatever queued while the last batch was committing joins this one.
            while batch.len() < self.batch_ops_max {
                match rx.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.stats.queued.fetch_sub(batch.len() as u64, Ordering::Relaxed);
            let closing = batch.iter().any(|c| matches!(c, Command::Close(_)));
            let started = Instant::now();
            match self.commit(&mut batch) {
                Ok(()) if closing => return self.close(batch, rx),
                Ok(()) => {
                    self.settle_committed(&mut batch);
                    metrics::histogram!("hongbao_commit_seconds").record(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    let failure = self.batch_failed(&mut batch, &e);
                    if let Next::Stop = self.fail_until_recovered(&mut rx, failure) {
                        return;
                    }
                }
            }
        }
    }

    fn settle_committed(&self, batch: &mut Vec<Command>) {
        let n = batch.len() as u64;
        // Counted before any completion runs: whoever has a reply sees its
        // commit counted.
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats.committed_ops.fetch_add(n, Ordering::Relaxed);
        metrics::histogram!("hongbao_commit_batch_ops").record(n as f64);
        metrics::counter!("hongbao_commits_total").increment(1);
        for command in batch.drain(..) {
            command.settle(None);
        }
    }

    /// The batch with `Close` committed: release the connection and the data
    /// directory's lock before any completion says the writer closed, so the
    /// directory can be opened again at once.
    fn close(self, mut batch: Vec<Command>, mut rx: mpsc::Receiver<Command>) {
        rx.close();
        let stats = self.stats.clone();
        drop(self);
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.committed_ops.fetch_add(batch.len() as u64, Ordering::Relaxed);
        for command in batch.drain(..) {
            command.settle(None);
        }
        let closed = OpError::Storage("the writer has closed".into());
        while let Ok(command) = rx.try_recv() {
            command.settle(Some(&closed));
        }
    }

    /// The batch did not commit (its transaction was rolled back): none of it
    /// is acknowledged. Starts or extends the failure.
    fn batch_failed(&mut self, batch: &mut Vec<Command>, e: &rusqlite::Error) -> OpError {
        tracing::error!(error = %e, ops = batch.len(), "storage failed; the batch is failed and the writer retries with backoff");
        self.note_failure(e.to_string());
        let failure = OpError::Storage(e.to_string());
        for command in batch.drain(..) {
            command.settle(Some(&failure));
        }
        failure
    }

    fn note_failure(&self, reason: String) {
        metrics::counter!("hongbao_storage_failures_total").increment(1);
        metrics::gauge!("hongbao_storage_up").set(0.0);
        let mut failure = self.stats.failure_lock();
        match failure.as_mut() {
            Some(f) => {
                f.reason = reason;
                f.failed_tries += 1;
            }
            None => *failure = Some(StorageFailure { reason, since_ms: unix_ms(), failed_tries: 1 }),
        }
        self.stats.failing.store(true, Ordering::Relaxed);
    }

    /// While storage fails: every operation that arrives is failed at once
    /// with `failure`, and storage is tried again with backoff until a probe
    /// commits. A `Close` stops the writer (nothing more can be committed).
    fn fail_until_recovered(&mut self, rx: &mut mpsc::Receiver<Command>, mut failure: OpError) -> Next {
        let mut backoff = Duration::from_millis(RETRY_BACKOFF_MIN_MS);
        let mut retry_at = Instant::now() + backoff;
        loop {
            while let Ok(command) = rx.try_recv() {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                let closing = matches!(command, Command::Close(_));
                command.settle(Some(&failure));
                if closing {
                    rx.close();
                    while let Ok(command) = rx.try_recv() {
                        command.settle(Some(&failure));
                    }
                    return Next::Stop;
                }
            }
            if rx.is_closed() && rx.is_empty() {
                return Next::Stop;
            }
            let now = Instant::now();
            if now < retry_at {
                std::thread::sleep((retry_at - now).min(Duration::from_millis(FAIL_FAST_INTERVAL_MS)));
                continue;
            }
            match self.recover() {
                Ok(()) => {
                    let was = self.stats.failure_lock().take();
                    self.stats.failing.store(false, Ordering::Relaxed);
                    metrics::gauge!("hongbao_storage_up").set(1.0);
                    tracing::info!(failure = ?was, "storage recovered; the writer commits again");
                    return Next::Continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "storage still failing");
                    self.note_failure(e.to_string());
                    failure = OpError::Storage(e.to_string());
                    backoff = (backoff * 2).min(Duration::from_millis(RETRY_BACKOFF_MAX_MS));
                    retry_at = Instant::now() + backoff;
                }
            }
        }
    }

    /// Reopens the database, reloads what is committed, and commits a probe.
    fn recover(&mut self) -> Result<(), crate::StoreError> {
        let mut conn = schema::connect(&self.path, false)?;
        let (ledger, next_campaign) = schema::load_writer_state(&conn)?;
        let pending_by_sender = schema::pending_by_sender(&conn)?;
        let probe = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        probe.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('writer_probe_ms', ?1)",
            [unix_ms().to_string()],
        )?;
        probe.commit()?;
        self.committed.replace_all(&ledger);
        self.pending_by_sender = pending_by_sender;
        self.conn = conn;
        self.ledger = ledger;
        self.next_campaign = next_campaign;
        Ok(())
    }

    /// Applies every command of the batch in one transaction and commits it.
    /// The write lock is taken up front, so a lock held elsewhere is waited
    /// out (up to the busy timeout) before anything is applied.
    fn commit(&mut self, batch: &mut [Command]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut applying = BatchTx::new(&tx, &mut self.ledger, &mut self.next_campaign, &mut self.pending_by_sender);
        for command in batch.iter_mut() {
            applying.apply(command)?;
            let ok = if command.succeeded() { "true" } else { "false" };
            metrics::counter!("hongbao_writer_ops_total", "op" => command.name(), "ok" => ok).increment(1);
        }
        let changed = applying.finish()?;
        tx.commit()?;
        // Before any completion runs: whoever hears of the commit can read it.
        self.committed.publish(changed);
        Ok(())
    }
}
