//! Where replies and pushes for one client connection go.
//!
//! An outbox is a bounded queue that allocates nothing while it is empty: the
//! gateway holds one per connection, most connections are idle most of the
//! time, and a channel that reserves its slots up front (tokio's `mpsc`
//! allocates a block of 32 frames, ~5 KiB) would cost more than everything
//! else an idle connection holds. Frames sit in a `VecDeque` that the
//! receiver takes whole, so the queue's memory leaves with the frames.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use hongbao_proto::{Reply, ServerFrame};
use tokio::sync::oneshot;

/// The sending half of one connection's bounded outbox. Shards (replies) and
/// the push hub (pushes) hold clones; the gateway's connection task drains it.
#[derive(Clone, Debug)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving half, owned by the gateway's connection task. Dropping it
/// closes the outbox: later sends are refused.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// The outbox overflowed: a frame could not be queued because it was full,
/// so the connection is too slow and the gateway closes it (`SlowConsumer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow;

#[derive(Debug)]
struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Empty (and unallocated) whenever the receiver has caught up.
    frames: VecDeque<ServerFrame>,
    /// The receiver's task, while it waits.
    waker: Option<Waker>,
    overflowed: bool,
    /// The receiver is gone.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the state anyway.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Outbox {
    pub fn new(capacity_frames: usize) -> (Outbox, OutboxReceiver) {
        let shared = Arc::new(Shared { capacity: capacity_frames.max(1), state: Mutex::new(State::default()) });
        (Outbox { shared: shared.clone() }, OutboxReceiver { shared })
    }

    /// Queues a frame without waiting. Returns false when the connection is
    /// gone or full (then it is told to close).
    pub fn send(&self, frame: ServerFrame) -> bool {
        let mut state = self.shared.lock();
        if state.closed {
            return false;
        }
        let queued = if state.frames.len() < self.shared.capacity {
            if state.frames.capacity() == 0 {
                // Usually one frame at a time: room for one, not the default four.
                state.frames.reserve_exact(1);
            }
            state.frames.push_back(frame);
            true
        } else {
            state.overflowed = true;
            false
        };
        let waker = state.waker.take();
        drop(state);
        if !queued {
            metrics::counter!("hongbao_outbox_overflows_total").increment(1);
        }
        if let Some(waker) = waker {
            waker.wake();
        }
        queued
    }

    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// True if both are the same connection.
    pub fn same(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl OutboxReceiver {
    /// Waits for queued frames (at most `max` of them, oldest first, never
    /// none) or an overflow, which is reported first. Cancel-safe: nothing
    /// is taken until it is returned.
    pub async fn recv(&mut self, max: usize) -> Result<VecDeque<ServerFrame>, Overflow> {
        poll_fn(|cx| self.poll_recv(cx, max)).await
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<Result<VecDeque<ServerFrame>, Overflow>> {
        let mut state = self.shared.lock();
        if state.overflowed {
            return Poll::Ready(Err(Overflow));
        }
        if state.frames.is_empty() {
            match &mut state.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let max = max.max(1);
        let frames = if state.frames.len() <= max {
            // Takes the allocation too: an idle outbox holds none.
            std::mem::take(&mut state.frames)
        } else {
            state.frames.drain(..max).collect()
        };
        Poll::Ready(Ok(frames))
    }

    /// The oldest queued frame, if any, without waiting.
    pub fn try_recv(&mut self) -> Option<ServerFrame> {
        let mut state = self.shared.lock();
        let frame = state.frames.pop_front();
        if state.frames.is_empty() {
            state.frames = VecDeque::new();
        }
        frame
    }
}

impl OutboxReceiver {
    /// Closes the outbox: later sends are refused and queued frames dropped.
    /// Dropping the receiver does the same.
    pub fn close(&mut self) {
        let mut state = self.shared.lock();
        state.closed = true;
        state.waker = None;
        // Free the frames now, not when the last sender clone goes.
        let frames = std::mem::take(&mut state.frames);
        drop(state);
        drop(frames);
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

/// Where the answer to one request goes.
#[derive(Debug)]
pub enum Responder {
    /// A client connection: the reply is queued with the request's id.
    Client { outbox: Outbox, request_id: u64 },
    /// An in-process caller (the admin API) awaiting the reply.
    Oneshot(oneshot::Sender<Reply>),
}

impl Responder {
    pub fn send(self, reply: Reply) {
        match self {
            Responder::Client { outbox, request_id } => {
                outbox.send(ServerFrame::Reply { id: request_id, reply });
            }
            Responder::Oneshot(tx) => {
                let _ = tx.send(reply);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_proto::{Push, PushBody};

    fn push(n: u64) -> ServerFrame {
        ServerFrame::Push(Push { msg: n, body: PushBody::Notice { topic: "t".into(), text: "x".into() } })
    }

    #[tokio::test]
    async fn frames_come_out_in_order_in_batches_of_at_most_max() {
        let (tx, mut rx) = Outbox::new(8);
        for n in 0..5 {
            assert!(tx.send(push(n)));
        }
        let a = rx.recv(3).await.unwrap();
        assert_eq!(a, (0..3).map(push).collect::<VecDeque<_>>());
        let b = rx.recv(3).await.unwrap();
        assert_eq!(b, (3..5).map(push).collect::<VecDeque<_>>());
        // Taken whole: the empty queue holds no memory.
        assert_eq!(rx.shared.lock().frames.capacity(), 0);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (tx, mut rx) = Outbox::new(8);
        let waiter = tokio::spawn(async move { rx.recv(64).await });
        tokio::task::yield_now().await;
        assert!(tx.send(push(1)));
        assert_eq!(waiter.await.unwrap(), Ok([push(1)].into()));
    }

    #[tokio::test]
    async fn overflow_is_reported_before_queued_frames() {
        let (tx, mut rx) = Outbox::new(2);
        assert!(tx.send(push(1)) && tx.send(push(2)));
        assert!(!tx.send(push(3)));
        assert_eq!(rx.recv(64).await, Err(Overflow));
    }

    #[test]
    fn a_closed_or_dropped_receiver_closes_the_outbox() {
        let (tx, rx) = Outbox::new(2);
        let other = tx.clone();
        assert!(tx.same(&other) && !tx.same(&Outbox::new(1).0));
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert!(!tx.send(push(1)));
        let (tx, mut rx) = Outbox::new(2);
        assert!(tx.send(push(1)));
        rx.close();
        assert!(tx.is_closed() && rx.try_recv().is_none());
    }
}
