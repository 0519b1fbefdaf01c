//! The gate every read of storage passes: at most
//! `STORAGE_READS_INFLIGHT_MAX` run at once (one per reader connection) and
//! at most `STORAGE_READS_WAITING_MAX` wait; beyond that a read is refused
//! at once (`overload`), so a flood of reads from one user costs others a
//! short queue, never a stall. A leaf.

use std::sync::{Arc, Mutex};

use hongbao_boundary::{EngineError, Responder};
use hongbao_core::limits::{STORAGE_READS_INFLIGHT_MAX, STORAGE_READS_WAITING_MAX};
use hongbao_proto::{ErrorCode, Reply};
use hongbao_store::{Reader, StoreError};
use tokio::sync::{mpsc, oneshot};

use crate::checks::store_error;

/// A read, run on one of the reader threads.
type Job = Box<dyn FnOnce(&Reader) + Send>;

/// `STORAGE_READS_INFLIGHT_MAX` reader threads, each running one read at a
/// time (so each finds a free reader connection), fed from one queue of
/// `STORAGE_READS_WAITING_MAX` reads. Dedicated threads rather than tokio's
/// blocking pool: that pool starts a thread for any blocking task that finds
/// none idle, which is how a flood of reads once took it to 516 threads.
pub(crate) struct Reads {
    jobs: mpsc::Sender<Job>,
}

impl Reads {
    pub(crate) fn new(reader: Arc<Reader>) -> Arc<Reads> {
        assert!(reader.connections() >= STORAGE_READS_INFLIGHT_MAX);
        let (jobs, queue) = mpsc::channel::<Job>(STORAGE_READS_WAITING_MAX);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..STORAGE_READS_INFLIGHT_MAX {
            let (queue, reader) = (queue.clone(), reader.clone());
            std::thread::Builder::new()
                .name(format!("hongbao-reader-{i}"))
                .spawn(move || loop {
                    // One thread waits on the queue at a time; the others
                    // wait for the lock. Ends when the engine is gone.
                    let Some(job) = hongbao_boundary::sync::lock(&queue).blocking_recv() else { return };
                    job(&reader);
                })
                .expect("spawn a reader thread");
        }
        Arc::new(Reads { jobs })
    }

    /// Queues `job`; false when the queue is full (the read is refused).
    fn queue(&self, job: Job) -> bool {
        match self.jobs.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                metrics::counter!("hongbao_overload_total", "where" => "storage_reads").increment(1);
                false
            }
        }
    }

    /// Runs `f` on a reader thread; `Overload` when too many reads are queued.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        if !self.queue(Box::new(move |reader| drop(tx.send(f(reader))))) {
            return Err(EngineError::Overload);
        }
        rx.await.map_err(|_| EngineError::Internal("the reader threads have stopped".into()))?.map_err(store_error)
    }

    /// Runs `f` on a reader thread, waiting for room in the queue instead of
    /// being refused. For the stored-message read of a connection that was
    /// already welcomed: a storm of logins waits its turn rather than having
    /// connections closed right after their welcome. The waiters are bounded
    /// by the connections the gateways admitted.
    pub(crate) async fn run_waiting<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |reader| drop(tx.send(f(reader))));
        if self.jobs.send(job).await.is_err() {
            return Err(EngineError::Internal("the reader threads have stopped".into()));
        }
        rx.await.map_err(|_| EngineError::Internal("the reader threads have stopped".into()))?.map_err(store_error)
    }

    /// For callers that cannot wait (a shard's loop): runs `f` on a reader
    /// thread, or, when too many reads are queued already, calls `refused`
    /// at once instead.
    pub(crate) fn spawn(&self, f: impl FnOnce(&Reader) + Send + 'static, refused: impl FnOnce()) {
        if !self.queue(Box::new(f)) {
            refused();
        }
    }

    /// Answers `reply` with what `answer` makes of a read of storage, or
    /// with `refused` when too many reads are queued.
    pub(crate) fn reply_with(
        &self,
        reply: Responder,
        refused: Reply,
        answer: impl FnOnce(&Reader) -> Reply + Send + 'static,
    ) {
        // The job and the refusal both want the responder: the job carries
        // it, and a refused job is dropped unrun, so the refusal needs its
        // own way back to it.
        let slot = Arc::new(Mutex::new(Some(reply)));
        let job_slot = slot.clone();
        let send = |slot: &Mutex<Option<Responder>>, r: Reply| {
            if let Some(reply) = hongbao_boundary::sync::lock(slot).take() {
                reply.send(r);
            }
        };
        self.spawn(move |reader| send(&job_slot, answer(reader)), || send(&slot, refused));
    }
}

/// The refusal of a read when too many are queued (`overload`, retry).
pub(crate) fn reads_full() -> Reply {
    Reply::error(ErrorCode::Overload, "too many reads of storage queued, retry")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_beyond_the_queue_are_refused_at_once_and_the_rest_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = hongbao_store::Store::open(dir.path()).unwrap();
        let reads = Reads::new(Arc::new(store.reader));
        // Hold every reader.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let mut held = Vec::new();
        for _ in 0..STORAGE_READS_INFLIGHT_MAX {
            let (reads, rx) = (reads.clone(), release_rx.clone());
            let hold = move |_: &Reader| {
                let _ = rx.lock().unwrap().recv();
                Ok(())
            };
            held.push(tokio::spawn(async move { reads.run(hold).await }));
        }
        // Let every reader thread take its held read.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // Fill the queue, then one more is refused at once.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for _ in 0..STORAGE_READS_WAITING_MAX {
            let done = done_tx.clone();
            reads.spawn(move |r| done.send(r.balance(1).unwrap()).unwrap(), || panic!("room in the queue"));
        }
        let refused = std::sync::atomic::AtomicBool::new(false);
        reads.spawn(|_| panic!("no room"), || refused.store(true, Ordering::Relaxed));
        assert!(refused.load(Ordering::Relaxed));
        assert!(matches!(reads.run(|r| r.balance(1)).await, Err(EngineError::Overload)));
        // A read that may wait (a welcomed connection's stored messages)
        // waits for room instead, and runs once there is.
        let waiting = tokio::spawn({
            let reads = reads.clone();
            async move { reads.run_waiting(|r| r.balance(1)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "no room yet");
        for _ in 0..STORAGE_READS_INFLIGHT_MAX {
            release_tx.send(()).unwrap();
        }
        assert_eq!(waiting.await.unwrap().unwrap(), 0);
        for h in held {
            h.await.unwrap().unwrap();
        }
        for _ in 0..STORAGE_READS_WAITING_MAX {
            assert_eq!(done_rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(), 0);
        }
        assert_eq!(reads.run(|r| r.balance(1)).await.unwrap(), 0);
    }
}
