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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hongbao_core::ledger::Ledger;
use hongbao_core::CampaignId;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::apply::BatchTx;
use crate::ops::{Command, Completion, Op, OpError, Slot};

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
    tx: mpsc::Sender<Command>,
    pub stats: Arc<WriterStats>,
}

fn stopped() -> OpError {
    OpError::Storage("writer stopped".into())
}

impl Writer {
    /// Starts the writer thread. `batch_ops_max` is how many operations one
    /// transaction holds: `COMMIT_BATCH_RECORDS_MAX`, or 1 for the
    /// transaction-per-operation baseline.
    pub(crate) fn start(
        conn: Connection,
        ledger: Ledger,
        next_campaign: CampaignId,
        lock: std::fs::File,
        batch_ops_max: usize,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        assert!(batch_ops_max >= 1);
        let (tx, rx) = mpsc::channel(hongbao_core::limits::WRITER_QUEUE_MAX);
        let stats = Arc::new(WriterStats::default());
        let state = WriterState { conn, ledger, next_campaign, stats: stats.clone(), batch_ops_max, _lock: lock };
        let handle = std::thread::Builder::new()
            .name("hongbao-writer".into())
            .spawn(move || state.run(rx))
            .expect("spawn writer thread");
        (Writer { tx, stats }, handle)
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
}

struct WriterState {
    /// Held for the writer's life: one server per data directory.
    _lock: std::fs::File,
    conn: Connection,
    /// Every account's balance as committed plus the batch being applied.
    ledger: Ledger,
    /// The id the next new campaign gets.
    next_campaign: CampaignId,
    stats: Arc<WriterStats>,
    /// Most operations one transaction holds.
    batch_ops_max: usize,
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
                Err(e) => return self.fail(batch, rx, e),
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
        let closed = OpError::Storage("writer closed".into());
        while let Ok(command) = rx.try_recv() {
            command.settle(Some(&closed));
        }
    }

    /// Crash-only: the batch failed, so none of it is acknowledged; nothing
    /// queued after it is applied either.
    fn fail(self, batch: Vec<Command>, mut rx: mpsc::Receiver<Command>, e: rusqlite::Error) {
        tracing::error!(error = %e, "storage failed; failing the batch and stopping the writer. Restart the server to recover.");
        self.stats.failed.store(true, Ordering::Relaxed);
        let failure = OpError::Storage(e.to_string());
        for command in batch {
            command.settle(Some(&failure));
        }
        rx.close();
        while let Ok(command) = rx.try_recv() {
            command.settle(Some(&failure));
        }
    }

    /// Applies every command of the batch in one transaction and commits it.
    fn commit(&mut self, batch: &mut [Command]) -> rusqlite::Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        let mut applying = BatchTx::new(&tx, &mut self.ledger, &mut self.next_campaign);
        for command in batch.iter_mut() {
            applying.apply(command)?;
            let ok = if command.succeeded() { "true" } else { "false" };
            metrics::counter!("hongbao_writer_ops_total", "op" => command.name(), "ok" => ok).increment(1);
        }
        applying.finish()?;
        tx.commit()
    }
}
