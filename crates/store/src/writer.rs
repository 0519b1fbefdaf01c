//! The group-commit writer: one thread, one database connection, many
//! operations per transaction, and every operation's completion called only
//! after its transaction committed. The same loop drives every store
//! (`Backend`): SQLite embedded, or a PostgreSQL server.
//!
//! The writer also owns the in-memory balances (`core::ledger::Ledger`): it is
//! the only code that moves money, so "can this account pay?" is decided here,
//! sequentially, with no database lock contention and no read per request.
//!
//! Storage failures are survived, not fatal. If a statement or the commit
//! fails (a lock held too long, a full disk, an I/O error, a database server
//! gone), the transaction is rolled back and every operation of the batch
//! fails: none was acknowledged, and nothing of it is kept. When the
//! commit's outcome is unknown (the connection broke while COMMIT was on
//! its way), the batch is held instead, unanswered, until the store can say
//! whether it committed: its operations are then settled as committed or
//! failed, never both and never guessed. Meanwhile the writer fails every
//! new operation at once (`OpError::Storage`, quickly) while it retries
//! with backoff: it reconnects, reloads the balances from what is
//! committed (so nothing of a failed batch lingers in memory), and commits
//! a probe. When the probe commits, service resumes by itself.
//! `Writer::failure` says meanwhile what is wrong.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hongbao_core::ledger::Account;
use tokio::sync::{mpsc, oneshot};

use crate::apply::WriterMemory;
use crate::committed::CommittedBalances;
use crate::ops::{Command, Completion, Op, OpError, Slot};
use crate::StoreError;

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

/// A store the writer commits to: one connection, owned by the writer's
/// thread. Dropping it lets go of the store (its lock, its connection).
pub(crate) trait Backend: Send + 'static {
    /// Applies every command of the batch (`apply::BatchTx`) in one
    /// transaction and commits it; answers the new balance of every account
    /// the batch changed. On any error nothing of the batch may be
    /// acknowledged: the writer reloads `memory` before it commits again.
    fn commit(&mut self, batch: &mut [Command], memory: &mut WriterMemory) -> Result<Vec<(Account, i64)>, CommitError>;

    /// Connects again, reads back whether a batch whose commit's outcome
    /// was unknown did commit, reloads the writer's memory from what is
    /// committed, and commits a probe.
    fn recover(&mut self) -> Result<Recovered, StoreError>;

    /// Whether the connection still works, asked each time the writer has
    /// sat idle for `IDLE_CHECK_AFTER` (a database server may have gone or
    /// restarted meanwhile). An embedded store has no connection to lose.
    fn check(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Idle this long, the writer checks its connection: an idle server says
/// within about this that its database is gone (`/health`), and is
/// connected again before the next request if it came back.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Why a batch did not commit.
#[derive(Debug)]
pub(crate) enum CommitError {
    /// It did not: the transaction was rolled back or never reached COMMIT.
    Failed(StoreError),
    /// Nobody knows yet: the connection broke after COMMIT was sent. The
    /// next `Backend::recover` finds out.
    Unknown(StoreError),
}

/// What `Backend::recover` found.
pub(crate) struct Recovered {
    pub memory: WriterMemory,
    /// Whether the batch whose outcome was unknown committed (`None`: there
    /// was none).
    pub unknown_batch_committed: Option<bool>,
}

/// Why storage is failing now.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StorageFailure {
    /// The error of the last failed try.
    pub reason: String,
    /// When the failure began (wall-clock ms).
    pub since_ms: u64,
    /// Batches and probes that failed since.
    pub failed_tries: u64,
}

/// Commit latencies kept for `WriterStats::recent_commit_us`: the last
/// 16,384 commits (64 KiB).
const RECENT_COMMITS_KEPT: usize = 16_384;

/// Counters the engine reports.
#[derive(Default, Debug)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub committed_ops: AtomicU64,
    pub queued: AtomicU64,
    /// True while storage is failing (the cheap check for every request).
    pub failing: AtomicBool,
    /// Cross-SET outbox rows not yet marked published, as committed.
    pub cross_backlog: AtomicU64,
    failure: Mutex<Option<StorageFailure>>,
    /// Microseconds of the latest commits, oldest first, at most `RECENT_COMMITS_KEPT`.
    recent_commit_us: Mutex<std::collections::VecDeque<u32>>,
}

impl WriterStats {
    fn failure_lock(&self) -> std::sync::MutexGuard<'_, Option<StorageFailure>> {
        // A completion never runs under this lock; recover rather than panic.
        self.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record_commit(&self, took: Duration) {
        let mut recent = self.recent_commit_us.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_COMMITS_KEPT {
            recent.pop_front();
        }
        recent.push_back(took.as_micros().min(u32::MAX as u128) as u32);
    }

    /// How long each of the latest commits took (apply, write, and the
    /// durable commit itself), in microseconds, oldest first.
    pub fn recent_commit_us(&self) -> Vec<u32> {
        self.recent_commit_us.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect()
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

impl Writer {
    /// Starts the writer thread on `backend`, from `memory` (what is
    /// committed). `batch_ops_max` is how many operations one transaction
    /// holds: `COMMIT_BATCH_RECORDS_MAX`, or 1 for the
    /// transaction-per-operation baseline.
    pub(crate) fn start(
        backend: Box<dyn Backend>,
        memory: WriterMemory,
        batch_ops_max: usize,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        assert!(batch_ops_max >= 1);
        let (tx, rx) = mpsc::channel(hongbao_core::limits::WRITER_QUEUE_MAX);
        let stats = Arc::new(WriterStats::default());
        metrics::gauge!("hongbao_storage_up").set(1.0);
        let committed = Arc::new(CommittedBalances::new(&memory.ledger));
        let state = WriterState { backend, memory, stats: stats.clone(), committed: committed.clone(), batch_ops_max };
        state.stats.cross_backlog.store(state.memory.cross_backlog, Ordering::Relaxed);
        metrics::gauge!("hongbao_cross_backlog").set(state.memory.cross_backlog as f64);
        let handle = std::thread::Builder::new()
            .name("hongbao-writer".into())
            .spawn(move || state.run(rx))
            .expect("spawn writer thread");
        (Writer { tx, stats, committed }, handle)
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

    /// Cross-SET outbox rows not yet marked published, as committed (no
    /// read: the writer keeps the count).
    pub fn cross_backlog(&self) -> u64 {
        self.stats.cross_backlog.load(Ordering::Relaxed)
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
    /// The store, reconnected after a failure. Dropped when the writer
    /// closes, which releases it.
    backend: Box<dyn Backend>,
    /// Balances, the next campaign id and pending notices, as committed
    /// plus the batch being applied.
    memory: WriterMemory,
    stats: Arc<WriterStats>,
    committed: Arc<CommittedBalances>,
    /// Most operations one transaction holds.
    batch_ops_max: usize,
}

/// How the writer's loop goes on after a failure.
enum Next {
    /// Storage is back: commit the next batch.
    Continue,
    /// The writer stops (a `Close` arrived, or every handle is gone). Each
    /// command here is settled with its answer (`None`: it committed) once
    /// the store has been let go of, so whoever hears "closed" can open the
    /// store again at once.
    Stop(Vec<(Command, Option<OpError>)>),
    /// A held batch turned out to have committed, and it holds `Close`.
    Close(Vec<Command>),
}

impl WriterState {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch: Vec<Command> = Vec::with_capacity(self.batch_ops_max);
        // Only to wait for the queue with a time limit; the store is used
        // outside it.
        let waiting = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("the writer's timer");
        loop {
            let first = match waiting.block_on(async { tokio::time::timeout(IDLE_CHECK_AFTER, rx.recv()).await }) {
                Ok(Some(command)) => command,
                Ok(None) => return,
                Err(_idle) => {
                    if let Err(e) = self.reconnect_if_lost() {
                        tracing::error!(error = %e, "storage is gone while idle; the writer retries with backoff");
                        self.note_failure(e.to_string());
                        match self.fail_until_recovered(&mut rx, OpError::Storage(e.to_string()), Vec::new()) {
                            Next::Continue => {}
                            Next::Stop(late) => return self.stop(late),
                            Next::Close(batch) => return self.close(batch, rx),
                        }
                    }
                    continue;
                }
            };
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
            let committed = self.backend.commit(&mut batch, &mut self.memory);
            count_ops(&batch);
            match committed {
                Ok(changed) => {
                    // Before any completion runs: whoever hears of the commit can read it.
                    self.committed.publish(changed);
                    self.publish_backlog();
                    if closing {
                        return self.close(batch, rx);
                    }
                    let took = started.elapsed();
                    self.stats.record_commit(took);
                    self.settle_committed(&mut batch);
                    metrics::histogram!("hongbao_commit_seconds").record(took.as_secs_f64());
                }
                Err(CommitError::Failed(e)) => {
                    let failure = self.batch_failed(&mut batch, &e);
                    match self.fail_until_recovered(&mut rx, failure, Vec::new()) {
                        Next::Continue => {}
                        Next::Stop(late) => return self.stop(late),
                        Next::Close(batch) => return self.close(batch, rx),
                    }
                }
                Err(CommitError::Unknown(e)) => {
                    tracing::error!(error = %e, ops = batch.len(), "the commit's outcome is unknown; the batch waits, unanswered, until storage says whether it committed");
                    self.note_failure(e.to_string());
                    let held = std::mem::take(&mut batch);
                    match self.fail_until_recovered(&mut rx, OpError::Storage(e.to_string()), held) {
                        Next::Continue => {}
                        Next::Stop(late) => return self.stop(late),
                        Next::Close(batch) => return self.close(batch, rx),
                    }
                }
            }
        }
    }

    /// After the writer sat idle: if its connection went away meanwhile,
    /// connects again (and reloads what is committed), so a database
    /// restarted while nobody asked costs no request a failure; if it cannot,
    /// storage is failing.
    fn reconnect_if_lost(&mut self) -> Result<(), StoreError> {
        let Err(lost) = self.backend.check() else { return Ok(()) };
        tracing::warn!(error = %lost, "the store's connection went away while idle; connecting again");
        let Recovered { memory, unknown_batch_committed } = self.backend.recover()?;
        debug_assert!(unknown_batch_committed.is_none(), "no batch was in doubt");
        self.committed.replace_all(&memory.ledger);
        self.memory = memory;
        self.publish_backlog();
        Ok(())
    }

    /// Publishes the outbox backlog as committed (the count and the
    /// `hongbao_cross_backlog` gauge), when it changed: a single node, whose
    /// backlog is always 0, sets nothing per commit.
    fn publish_backlog(&self) {
        let now = self.memory.cross_backlog;
        if self.stats.cross_backlog.swap(now, Ordering::Relaxed) != now {
            metrics::gauge!("hongbao_cross_backlog").set(now as f64);
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

    /// The batch with `Close` committed: release the store (its lock, its
    /// connection) before any completion says the writer closed, so it can
    /// be opened again at once.
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
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            command.settle(Some(&closed));
        }
    }

    /// The batch did not commit (its transaction was rolled back): none of it
    /// is acknowledged. Starts or extends the failure.
    fn batch_failed(&mut self, batch: &mut Vec<Command>, e: &StoreError) -> OpError {
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
            None => *failure = Some(StorageFailure { reason, since_ms: crate::unix_ms(), failed_tries: 1 }),
        }
        self.stats.failing.store(true, Ordering::Relaxed);
    }

    /// While storage fails: every operation that arrives is failed at once
    /// with `failure`, and storage is tried again with backoff until a probe
    /// commits. `held` is a batch whose commit's outcome is unknown: it is
    /// settled once recovery has read back whether it committed. A `Close`
    /// stops the writer (nothing more can be committed; a held batch is
    /// failed, and the store's own recovery at the next start decides).
    fn fail_until_recovered(
        &mut self,
        rx: &mut mpsc::Receiver<Command>,
        mut failure: OpError,
        mut held: Vec<Command>,
    ) -> Next {
        let mut backoff = Duration::from_millis(RETRY_BACKOFF_MIN_MS);
        let mut retry_at = Instant::now() + backoff;
        loop {
            while let Ok(command) = rx.try_recv() {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                if matches!(command, Command::Close(_)) {
                    return self.stop_failing(rx, held, failure, Some(command));
                }
                command.settle(Some(&failure));
            }
            if rx.is_closed() && rx.is_empty() {
                return self.stop_failing(rx, held, failure, None);
            }
            let now = Instant::now();
            if now < retry_at {
                std::thread::sleep((retry_at - now).min(Duration::from_millis(FAIL_FAST_INTERVAL_MS)));
                continue;
            }
            match self.backend.recover() {
                Ok(recovered) => {
                    let held_committed = self.recovered(recovered);
                    if !held_committed {
                        let failure = OpError::Storage(format!("the commit did not reach storage: {failure}"));
                        for command in held.drain(..) {
                            command.settle(Some(&failure));
                        }
                        return Next::Continue;
                    }
                    if held.iter().any(|c| matches!(c, Command::Close(_))) {
                        return Next::Close(held);
                    }
                    self.settle_committed(&mut held);
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

    /// Takes what recovery found as the writer's state; answers whether a
    /// batch whose outcome was unknown had committed.
    fn recovered(&mut self, recovered: Recovered) -> bool {
        let Recovered { memory, unknown_batch_committed } = recovered;
        self.committed.replace_all(&memory.ledger);
        self.memory = memory;
        self.publish_backlog();
        let was = self.stats.failure_lock().take();
        self.stats.failing.store(false, Ordering::Relaxed);
        metrics::gauge!("hongbao_storage_up").set(1.0);
        tracing::info!(failure = ?was, "storage recovered; the writer commits again");
        match unknown_batch_committed {
            Some(committed) => {
                tracing::info!(committed, "read back the batch whose commit's outcome was unknown");
                committed
            }
            None => false,
        }
    }

    /// The writer stops while storage fails (`close`: the `Close` that asked
    /// for it). A batch whose outcome is unknown gets one last try at
    /// reading it back, so its answers are true ones if storage answers;
    /// if it does not, they are failures that may hide a commit (a retry
    /// with the same key, or a repeated open, finds out once the store is
    /// back). Everything still queued is failed.
    fn stop_failing(
        &mut self,
        rx: &mut mpsc::Receiver<Command>,
        held: Vec<Command>,
        failure: OpError,
        close: Option<Command>,
    ) -> Next {
        rx.close();
        let mut late: Vec<(Command, Option<OpError>)> = Vec::new();
        while let Ok(command) = rx.try_recv() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            late.push((command, Some(failure.clone())));
        }
        let held_committed = !held.is_empty() && self.backend.recover().is_ok_and(|r| self.recovered(r));
        let held_answer = if held_committed { None } else { Some(failure.clone()) };
        late.extend(held.into_iter().map(|c| (c, held_answer.clone())));
        late.extend(close.map(|c| (c, Some(failure))));
        Next::Stop(late)
    }

    /// Lets go of the store, then settles what was left.
    fn stop(self, late: Vec<(Command, Option<OpError>)>) {
        drop(self);
        for (command, answer) in late {
            command.settle(answer.as_ref());
        }
    }
}

/// `hongbao_writer_ops_total{op, ok}` for each operation of a batch.
fn count_ops(batch: &[Command]) {
    for command in batch {
        let ok = if command.succeeded() { "true" } else { "false" };
        metrics::counter!("hongbao_writer_ops_total", "op" => command.name(), "ok" => ok).increment(1);
    }
}
