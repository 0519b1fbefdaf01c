//! Idle connections without a task.
//!
//! Most connections of an evening sit idle: a heartbeat every few minutes, a
//! push now and then. A running connection costs its task (~770 bytes of
//! future) and tokio's registration of its socket (256 bytes) whether or not
//! anything happens. A connection that has had nothing but heartbeats for
//! `park_after_s` parks instead: its state (session, transport, admission)
//! moves into one box held here, and its socket into this gateway's own
//! epoll set (a `mio::Poll`), watched by one thread. Whatever would have
//! woken the task wakes the connection: the peer's bytes or hang-up (the
//! socket turns readable), a frame queued in its outbox (its waker), its
//! idle deadline (a sweep each second), the server's shutdown (all at
//! once). Waking spawns its task again, on the gateway's runtime, on the
//! same state.
//!
//! A thread of its own, not a task: tokio watches a foreign descriptor (the
//! epoll set's) only through `AsyncFd`, whose constructors need `unsafe`
//! now, and the workspace has none.
//!
//! Must not: read or write a parked socket, or decide anything about the
//! connection; a woken connection's own loop does that, as if it had never
//! stopped. Bounded: a gateway parks at most the connections it admitted.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Wake, Waker};
use std::time::Duration;

use hongbao_boundary::sync::lock;
use metrics::Gauge;
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often parked connections' idle deadlines are looked at: the idle
/// timeout of a parked connection fires up to this late.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Readiness events taken from the epoll set per call.
const EVENTS_PER_POLL: usize = 1024;
/// The token of the thread's own waker; connections' tokens carry a
/// generation in their low half, never all ones.
const WAKE: Token = Token(usize::MAX);

/// A parked connection, as the parking lot sees it.
pub(crate) trait Resume: Send {
    /// Its socket.
    fn fd(&self) -> RawFd;
    /// Leaves `waker` to be woken by the next frame queued for the
    /// connection. False (nothing left) if a frame or an overflow is
    /// already waiting: the connection must not park.
    fn watch_outbox(&mut self, waker: &Waker) -> bool;
    /// Puts off parking by `park_after_s` (its socket could not be watched).
    fn stay_awake(&mut self);
    /// Spawns the connection's task again (on the calling runtime).
    fn resume(self: Box<Self>);
}

/// One gateway's parked connections. Cloned into every connection task
/// through `Shared`; the reactor (`run`) is the only one that resumes them.
#[derive(Clone)]
pub(crate) struct Parking {
    inner: Arc<Inner>,
}

struct Inner {
    registry: mio::Registry,
    lot: Mutex<Lot>,
    /// Wakes the thread: a connection's outbox woke it, or shutdown.
    thread_waker: mio::Waker,
    /// `hongbao_connections_parked`.
    parked_gauge: Gauge,
}

struct Lot {
    parked: Slab<Parked>,
    /// Connections whose outbox woke them, as their tokens; the reactor
    /// resumes them. At most one entry per park (an outbox takes its waker
    /// when it wakes it), so never more than have parked.
    woken: Vec<Token>,
    /// Bumped at every park, so a waker or an event left from an earlier
    /// connection in the same slot wakes nobody. Never all ones (`WAKE`).
    generation: u32,
    /// The server is shutting down: nothing parks any more.
    closed: bool,
}

struct Parked {
    token: Token,
    idle_deadline: Instant,
    conn: Box<dyn Resume>,
}

/// A slot and the generation of the connection parked in it, in one token.
fn token(slot: usize, generation: u32) -> Token {
    Token((slot << 32) | generation as usize)
}

fn slot_of(token: Token) -> usize {
    token.0 >> 32
}

/// Wakes one parked connection when a frame is queued for it.
struct OutboxWaker {
    token: Token,
    inner: Weak<Inner>,
}

impl Wake for OutboxWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(inner) = self.inner.upgrade() {
            let mut lot = lock(&inner.lot);
            lot.woken.push(self.token);
            let first = lot.woken.len() == 1;
            drop(lot);
            if first {
                // The thread takes the whole list when it wakes.
                let _ = inner.thread_waker.wake();
            }
        }
    }
}

impl Parking {
    /// A parking lot, and its thread, which resumes connections on
    /// `runtime` and resumes them all once `shutdown` turns true.
    pub(crate) fn start(runtime: Handle, mut shutdown: watch::Receiver<bool>) -> std::io::Result<Parking> {
        let poll = mio::Poll::new()?;
        let inner = Arc::new(Inner {
            registry: poll.registry().try_clone()?,
            thread_waker: mio::Waker::new(poll.registry(), WAKE)?,
            lot: Mutex::new(Lot { parked: Slab::new(), woken: Vec::new(), generation: 0, closed: false }),
            parked_gauge: metrics::gauge!("hongbao_connections_parked"),
        });
        let thread_inner = inner.clone();
        let rt = runtime.clone();
        std::thread::Builder::new()
            .name("hongbao-parking".into())
            .spawn(move || watch_parked(&thread_inner, poll, &rt))?;
        let closing = inner.clone();
        runtime.spawn(async move {
            // A dropped sender ends the server too.
            while !*shutdown.borrow_and_update() && shutdown.changed().await.is_ok() {}
            lock(&closing.lot).closed = true;
            let _ = closing.thread_waker.wake();
        });
        Ok(Parking { inner })
    }

    /// Parks `conn` until something wakes it or `idle_deadline` passes.
    /// Gives it back if it cannot park (a frame is already queued for it,
    /// the server is shutting down, or its socket cannot be watched); the
    /// caller then goes on serving it.
    pub(crate) fn park(&self, idle_deadline: Instant, mut conn: Box<dyn Resume>) -> Result<(), Box<dyn Resume>> {
        let inner = &self.inner;
        let mut lot = lock(&inner.lot);
        if lot.closed {
            return Err(conn);
        }
        lot.generation = lot.generation.wrapping_add(1) % u32::MAX;
        let token = token(lot.parked.vacant_key(), lot.generation);
        let waker = Waker::from(Arc::new(OutboxWaker { token, inner: Arc::downgrade(inner) }));
        // Under the lot's lock: a frame queued from here on wakes the
        // waker, which waits for this lock, so it finds the connection in
        // its slot.
        if !conn.watch_outbox(&waker) {
            return Err(conn);
        }
        let fd = conn.fd();
        if let Err(e) = inner.registry.register(&mut SourceFd(&fd), token, Interest::READABLE) {
            tracing::warn!(error = %e, "cannot watch an idle connection's socket; it stays awake");
            conn.stay_awake();
            return Err(conn);
        }
        lot.parked.insert(Parked { token, idle_deadline, conn });
        drop(lot);
        inner.parked_gauge.increment(1.0);
        Ok(())
    }
}

impl Inner {
    /// Takes the connection in `token`'s slot out of the lot, if it is still
    /// the one the token names.
    fn take(&self, lot: &mut Lot, token: Token) -> Option<Box<dyn Resume>> {
        let slot = slot_of(token);
        if lot.parked.get(slot)?.token != token {
            return None;
        }
        Some(lot.parked.remove(slot).conn)
    }

    /// Resumes connections taken out of the lot (outside its lock: spawning
    /// and re-registering sockets need none of it).
    fn resume(&self, conns: Vec<Box<dyn Resume>>) {
        if conns.is_empty() {
            return;
        }
        self.parked_gauge.decrement(conns.len() as f64);
        for conn in conns {
            // Before the task registers the socket with tokio's reactor.
            let _ = self.registry.deregister(&mut SourceFd(&conn.fd()));
            conn.resume();
        }
    }
}

/// The thread: waits on the epoll set of parked sockets (and its waker,
/// and the sweep's second), and resumes whatever is due on `runtime`. Ends
/// after resuming every connection at shutdown, or once the gateway is
/// gone with nothing parked.
fn watch_parked(inner: &Arc<Inner>, mut poll: mio::Poll, runtime: &Handle) {
    // Tokio's clock and reactor for the resumed connections' deadlines and
    // sockets, and `spawn` for their tasks.
    let _runtime = runtime.enter();
    let mut events = Events::with_capacity(EVENTS_PER_POLL);
    let mut next_sweep = Instant::now() + SWEEP_EVERY;
    loop {
        let wait = next_sweep.saturating_duration_since(Instant::now());
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                // Not expected of epoll_wait on our own set; connections
                // still wake by outbox, deadline and shutdown.
                tracing::error!(error = %e, "polling parked connections failed");
                std::thread::sleep(SWEEP_EVERY);
            }
        }
        let now = Instant::now();
        let sweep = now >= next_sweep;
        if sweep {
            next_sweep = now + SWEEP_EVERY;
        }
        let mut lot = lock(&inner.lot);
        if lot.closed {
            lot.woken = Vec::new();
            let all = lot.parked.drain().map(|p| p.conn).collect();
            drop(lot);
            inner.resume(all);
            return;
        }
        let mut due: Vec<Token> = events.iter().map(|e| e.token()).filter(|t| *t != WAKE).collect();
        due.append(&mut lot.woken);
        if sweep {
            if lot.parked.is_empty() && Arc::strong_count(inner) == 1 {
                // The gateway was dropped without a shutdown (its runtime
                // ended): nobody can park here any more.
                return;
            }
            due.extend(lot.parked.iter().filter(|(_, p)| p.idle_deadline <= now).map(|(_, p)| p.token));
        }
        let woken = due.into_iter().filter_map(|t| inner.take(&mut lot, t)).collect();
        drop(lot);
        inner.resume(woken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_a_slot_and_a_generation_and_never_the_wake_token() {
        for (slot, generation) in [(0, 1), (17, 2), (18_000, u32::MAX - 1), (1 << 20, 0)] {
            let t = token(slot, generation);
            assert_eq!(slot_of(t), slot);
            assert_ne!(t, WAKE);
        }
        // Generations wrap below all ones, so no token's low half is.
        assert_eq!((u32::MAX - 1).wrapping_add(1) % u32::MAX, 0);
        assert_ne!(token(0, 1), token(0, 2), "a slot reused by the next park is another token");
    }
}
