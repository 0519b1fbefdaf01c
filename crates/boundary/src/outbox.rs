//! Where replies and pushes for one client connection go.
//!
//! An outbox is a bounded queue that allocates nothing while it is empty: the
//! gateway holds one per connection, most connections are idle most of the
//! time, and a channel that reserves its slots up front (tokio's `mpsc`
//! allocates a block of 32 frames, ~5 KiB) would cost more than everything
//! else an idle connection holds. Frames sit in a `VecDeque` that the
//! receiver takes whole, so the queue's memory leaves with the frames.
//!
//! A frame an outbox refuses is counted in `hongbao_outbox_dropped_total`
//! with the reason (`slow_consumer`: the queue overflowed, so the connection
//! is being closed; `closed`: the connection is gone; `link`: the link to
//! the gateway holding it refused it) and the kind of frame (`push`,
//! `reply`, `close`), so no delivery is lost without a trace.
//!
//! A connection held by a gateway in another process has a forwarding
//! outbox instead: its frames go, tagged with the connection's id on that
//! link, to a `FrameSink` (the link to that gateway), whose own bound and
//! the gateway's local outbox bound the queue.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use hongbao_proto::{Reply, ServerFrame};
use tokio::sync::oneshot;

/// Where a forwarding outbox sends frames: the link to the gateway process
/// holding the connection.
pub trait FrameSink: Send + Sync + 'static {
    /// Queues `frame` for connection `conn` of that gateway without waiting.
    /// False if it cannot (the link is gone or full; the sink then closes
    /// the connection itself).
    fn forward(&self, conn: u64, frame: ServerFrame) -> bool;
    /// Queues one `frame` for every connection of that gateway: a broadcast
    /// crosses the link once, not once per connection. False if it cannot.
    fn forward_to_all(&self, frame: ServerFrame) -> bool;
}

/// The sending half of one connection's bounded outbox. Shards (replies) and
/// the push hub (pushes) hold clones; the gateway's connection task drains it.
#[derive(Clone)]
pub struct Outbox {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// Drained by a connection task in this process.
    Local(Arc<Shared>),
    /// Forwarded to a gateway in another process.
    Forward(Arc<Forwarded>),
}

struct Forwarded {
    conn: u64,
    closed: AtomicBool,
    sink: Arc<dyn FrameSink>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Local(shared) => f.debug_tuple("Outbox").field(&Arc::as_ptr(shared)).finish(),
            Kind::Forward(fwd) => f.debug_struct("Outbox").field("forwarded_conn", &fwd.conn).finish(),
        }
    }
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
    /// A frame found the queue full. From then on the outbox takes nothing
    /// (the connection is being closed as a slow consumer) and what it held
    /// is dropped: none of it will be written.
    overflowed: bool,
    /// The receiver is gone.
    closed: bool,
}

/// Why an outbox refused a frame: the `reason` label of
/// `hongbao_outbox_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dropped {
    /// The queue overflowed: the connection does not read fast enough.
    SlowConsumer,
    /// The connection is gone.
    Closed,
    /// The link to the gateway process holding the connection refused it.
    Link,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::SlowConsumer => "slow_consumer",
            Dropped::Closed => "closed",
            Dropped::Link => "link",
        }
    }
}

/// The `frame` label of `hongbao_outbox_dropped_total`.
const FRAME_KINDS: [&str; 3] = ["push", "reply", "close"];

fn frame_kind(frame: &ServerFrame) -> usize {
    match frame {
        ServerFrame::Push(_) => 0,
        ServerFrame::Reply { .. } => 1,
        ServerFrame::Close { .. } => 2,
    }
}

/// Counts frames an outbox refused, or dropped unsent.
fn count_dropped<'a>(reason: Dropped, frames: impl IntoIterator<Item = &'a ServerFrame>) {
    let mut counts = [0u64; FRAME_KINDS.len()];
    for frame in frames {
        counts[frame_kind(frame)] += 1;
    }
    for (kind, n) in FRAME_KINDS.into_iter().zip(counts) {
        if n > 0 {
            metrics::counter!("hongbao_outbox_dropped_total", "reason" => reason.as_str(), "frame" => kind)
                .increment(n);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }
}

impl Outbox {
    pub fn new(capacity_frames: usize) -> (Outbox, OutboxReceiver) {
        let shared = Arc::new(Shared { capacity: capacity_frames.max(1), state: Mutex::new(State::default()) });
        (Outbox { kind: Kind::Local(shared.clone()) }, OutboxReceiver { shared })
    }

    /// An outbox for connection `conn` of a gateway in another process: every
    /// frame goes to `sink`. Open until `close_forwarding`.
    pub fn forwarding(conn: u64, sink: Arc<dyn FrameSink>) -> Outbox {
        Outbox { kind: Kind::Forward(Arc::new(Forwarded { conn, closed: AtomicBool::new(false), sink })) }
    }

    /// Closes a forwarding outbox (its connection is gone): later sends are
    /// refused. No effect on a local one, which its receiver closes.
    pub fn close_forwarding(&self) {
        if let Kind::Forward(fwd) = &self.kind {
            fwd.closed.store(true, Ordering::Release);
        }
    }

    /// Queues a frame without waiting. Returns false when the connection is
    /// gone or full (then it is told to close).
    pub fn send(&self, frame: ServerFrame) -> bool {
        let shared = match &self.kind {
            Kind::Local(shared) => shared,
            Kind::Forward(fwd) => {
                if fwd.closed.load(Ordering::Acquire) {
                    count_dropped(Dropped::Closed, [&frame]);
                    return false;
                }
                let kind = FRAME_KINDS[frame_kind(&frame)];
                let forwarded = fwd.sink.forward(fwd.conn, frame);
                if !forwarded {
                    // Like a local overflow: the sink has told the connection
                    // to close; nothing more goes its way.
                    fwd.closed.store(true, Ordering::Release);
                    let reason = Dropped::Link.as_str();
                    metrics::counter!("hongbao_outbox_dropped_total", "reason" => reason, "frame" => kind).increment(1);
                }
                return forwarded;
            }
        };
        let mut state = shared.lock();
        if state.closed || state.overflowed {
            let reason = if state.closed { Dropped::Closed } else { Dropped::SlowConsumer };
            drop(state);
            count_dropped(reason, [&frame]);
            return false;
        }
        if state.frames.len() < shared.capacity {
            if state.frames.capacity() == 0 {
                // Usually one frame at a time: room for one, not the default four.
                state.frames.reserve_exact(1);
            }
            state.frames.push_back(frame);
            let waker = state.waker.take();
            drop(state);
            if let Some(waker) = waker {
                waker.wake();
            }
            return true;
        }
        // Full: the peer does not read. Nothing queued will be written now
        // (the connection is closed as a slow consumer), so it is freed here.
        state.overflowed = true;
        let unsent = std::mem::take(&mut state.frames);
        let waker = state.waker.take();
        drop(state);
        metrics::counter!("hongbao_outbox_overflows_total").increment(1);
        count_dropped(Dropped::SlowConsumer, unsent.iter().chain([&frame]));
        if let Some(waker) = waker {
            waker.wake();
        }
        false
    }

    /// True once the outbox takes no more frames: its connection is gone,
    /// or is being closed as a slow consumer.
    pub fn is_closed(&self) -> bool {
        match &self.kind {
            Kind::Local(shared) => {
                let state = shared.lock();
                state.closed || state.overflowed
            }
            Kind::Forward(fwd) => fwd.closed.load(Ordering::Acquire),
        }
    }

    /// The link a forwarding outbox sends to; `None` for a local one. A
    /// broadcast crosses each link once instead of once per connection.
    pub fn sink(&self) -> Option<&Arc<dyn FrameSink>> {
        match &self.kind {
            Kind::Local(_) => None,
            Kind::Forward(fwd) => Some(&fwd.sink),
        }
    }

    /// True if both are the same connection.
    pub fn same(&self, other: &Outbox) -> bool {
        match (&self.kind, &other.kind) {
            (Kind::Local(a), Kind::Local(b)) => Arc::ptr_eq(a, b),
            (Kind::Forward(a), Kind::Forward(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
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

    /// Ready once the outbox has overflowed; until then the task is woken
    /// at every frame queued. For a connection busy writing: it learns
    /// that its peer is too slow while the write still waits, and the
    /// frames queued meanwhile stay queued.
    pub fn poll_overflow(&mut self, cx: &mut Context<'_>) -> Poll<Overflow> {
        let mut state = self.shared.lock();
        if state.overflowed {
            return Poll::Ready(Overflow);
        }
        match &mut state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Leaves `waker` to be woken by the next frame queued (or an overflow),
    /// in place of the receiving task's. False if a frame or an overflow is
    /// already waiting. For a connection that parks without a task.
    pub fn watch(&mut self, waker: &Waker) -> bool {
        let mut state = self.shared.lock();
        if state.overflowed || !state.frames.is_empty() {
            return false;
        }
        state.waker = Some(waker.clone());
        true
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
        count_dropped(Dropped::Closed, &frames);
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

    #[tokio::test]
    async fn an_overflow_refuses_everything_after_and_frees_what_was_queued() {
        let (tx, mut rx) = Outbox::new(2);
        let waiting = poll_fn(|cx| Poll::Ready(rx.poll_overflow(cx).is_pending())).await;
        assert!(waiting, "no overflow yet");
        assert!(tx.send(push(1)) && tx.send(push(2)));
        assert!(!tx.is_closed());
        assert!(!tx.send(push(3)));
        assert!(tx.is_closed(), "an overflowed outbox takes nothing more");
        assert_eq!(rx.shared.lock().frames.capacity(), 0, "the frames that will never be written are freed");
        // Even once the receiver made room, nothing more is queued: the
        // connection is being closed.
        assert!(!tx.send(push(4)));
        assert_eq!(poll_fn(|cx| Poll::Ready(rx.poll_overflow(cx))).await, Poll::Ready(Overflow));
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

    #[derive(Default)]
    struct Collect(Mutex<Vec<(u64, ServerFrame)>>);
    impl FrameSink for Collect {
        fn forward(&self, conn: u64, frame: ServerFrame) -> bool {
            self.0.lock().unwrap().push((conn, frame));
            true
        }
        fn forward_to_all(&self, frame: ServerFrame) -> bool {
            self.forward(0, frame)
        }
    }

    struct Refuse(Mutex<u32>);
    impl FrameSink for Refuse {
        fn forward(&self, _conn: u64, _frame: ServerFrame) -> bool {
            *self.0.lock().unwrap() += 1;
            false
        }
        fn forward_to_all(&self, _frame: ServerFrame) -> bool {
            false
        }
    }

    #[test]
    fn a_refused_forward_closes_the_outbox_so_the_sink_is_asked_once() {
        let sink = Arc::new(Refuse(Mutex::new(0)));
        let o = Outbox::forwarding(3, sink.clone());
        assert!(!o.send(push(1)) && !o.send(push(2)) && o.is_closed());
        assert_eq!(*sink.0.lock().unwrap(), 1, "one close per connection, not one per frame");
    }

    #[test]
    fn a_forwarding_outbox_tags_frames_with_its_connection_until_closed() {
        let sink = Arc::new(Collect::default());
        let a = Outbox::forwarding(7, sink.clone());
        let b = Outbox::forwarding(7, sink.clone());
        assert!(a.same(&a.clone()) && !a.same(&b) && !a.same(&Outbox::new(1).0));
        assert!(a.send(push(1)) && b.send(push(2)));
        a.close_forwarding();
        assert!(a.is_closed() && !b.is_closed());
        assert!(!a.send(push(3)));
        assert_eq!(*sink.0.lock().unwrap(), vec![(7, push(1)), (7, push(2))]);
    }
}
