//! The gate every read of storage passes: at most
//! `STORAGE_READS_INFLIGHT_MAX` run at once (one per reader connection) and
//! at most `STORAGE_READS_WAITING_MAX` wait; beyond that a read is refused
//! at once (`overload`), so a flood of reads from one user costs others a
//! short queue, never a stall. A leaf.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hongbao_boundary::{EngineError, Responder};
use hongbao_core::limits::{STORAGE_READS_INFLIGHT_MAX, STORAGE_READS_WAITING_MAX};
use hongbao_proto::{ErrorCode, Reply};
use hongbao_store::{Reader, StoreError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::checks::store_error;

pub(crate) struct Reads {
    reader: Arc<Reader>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// The gate was full; nothing was read.
#[derive(Debug)]
pub(crate) struct ReadsFull;

impl Reads {
    pub(crate) fn new(reader: Arc<Reader>) -> Arc<Reads> {
        assert!(reader.connections() >= STORAGE_READS_INFLIGHT_MAX);
        Arc::new(Reads {
            reader,
            permits: Arc::new(Semaphore::new(STORAGE_READS_INFLIGHT_MAX)),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Takes a place in the queue of waiting reads, if there is one.
    fn queue(&self) -> Result<(), ReadsFull> {
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= STORAGE_READS_WAITING_MAX {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("hongbao_overload_total", "where" => "storage_reads").increment(1);
            return Err(ReadsFull);
        }
        Ok(())
    }

    /// Waits for a reader, having a place in the queue.
    async fn permit_when_queued(&self) -> OwnedSemaphorePermit {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        permit
    }

    /// Runs `f` on a reader connection, off the async threads.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.queue().map_err(|ReadsFull| EngineError::Overload)?;
                self.permit_when_queued().await
            }
        };
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let result = f(&reader);
            drop(permit);
            result
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(store_error)
    }

    /// For callers that cannot wait (a shard's loop): runs `f` in the
    /// background, or, when too many reads are queued already, calls
    /// `refused` at once instead.
    pub(crate) fn spawn(self: &Arc<Self>, f: impl FnOnce(&Reader) + Send + 'static, refused: impl FnOnce()) {
        match self.queue() {
            Ok(()) => self.spawn_queued(f),
            Err(ReadsFull) => refused(),
        }
    }

    /// Answers `reply` with what `answer` makes of a read of storage, or
    /// with `refused` when too many reads are queued.
    pub(crate) fn reply_with(
        self: &Arc<Self>,
        reply: Responder,
        refused: Reply,
        answer: impl FnOnce(&Reader) -> Reply + Send + 'static,
    ) {
        match self.queue() {
            Ok(()) => self.spawn_queued(move |reader| reply.send(answer(reader))),
            Err(ReadsFull) => reply.send(refused),
        }
    }

    /// Runs `f` once a reader is free, having a place in the queue.
    fn spawn_queued(self: &Arc<Self>, f: impl FnOnce(&Reader) + Send + 'static) {
        let reads = self.clone();
        tokio::spawn(async move {
            let permit = reads.permit_when_queued().await;
            let reader = reads.reader.clone();
            let _ = tokio::task::spawn_blocking(move || {
                f(&reader);
                drop(permit);
            })
            .await;
        });
    }
}

/// The refusal of a read when too many are queued (`overload`, retry).
pub(crate) fn reads_full() -> Reply {
    Reply::error(ErrorCode::Overload, "too many reads of storage queued, retry")
}

#[cfg(test)]
mod tests {
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
        while reads.permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
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
        for _ in 0..STORAGE_READS_INFLIGHT_MAX {
            release_tx.send(()).unwrap();
        }
        for h in held {
            h.await.unwrap().unwrap();
        }
        for _ in 0..STORAGE_READS_WAITING_MAX {
            assert_eq!(done_rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(), 0);
        }
        assert_eq!(reads.run(|r| r.balance(1)).await.unwrap(), 0);
    }
}
