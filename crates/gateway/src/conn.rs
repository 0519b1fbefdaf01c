//! One client connection: handshake, request dispatch, reply and push
//! delivery, timeouts.
//!
//! A connection is one task running `Conn::run`, a loop that waits for the
//! next event (the shutdown signal, the outbox — an overflow or frames to
//! write —, a frame from the peer, the idle deadline) and handles it.
//! Transports differ only in how frames are read and written (`FrameIo`).
//!
//! An idle connection is what most connections are most of the time, so
//! what it holds is kept small (~1.5 KiB of server memory, measured by
//! `hongbao perf conn-memory`): the task (768 bytes; its future holds the
//! wait state only, handlers that await are boxed while they run), tokio's
//! registration of the socket (256 bytes), an outbox that allocates only
//! while frames are queued, a presence entry, and no read or write buffer
//! between frames. Per-connection state is bounded: a frame buffer of at
//! most `FRAME_BYTES_MAX`, an outbox of `CONNECTION_OUTBOX_FRAMES_MAX`
//! frames, and at most `CONNECTION_INFLIGHT_MAX` in-flight request records.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hongbao_boundary::{Backend, Outbox, OutboxReceiver, Responder};
use hongbao_core::limits::{CONNECTION_INFLIGHT_MAX, CONNECTION_OUTBOX_FRAMES_MAX, FRAME_BYTES_MAX};
use hongbao_proto::{ClientFrame, ErrorCode, Reply, Request, ServerFrame, ShakeResult, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::io::{FrameIo, Incoming, Parkable, TcpIo, Transport, Unsent};
use crate::limits::{
    FRAMES_PER_TURN_MAX, HELLO_FRAME_BYTES_MAX, OVERLOAD_PAUSE_MAX_MS, OVERLOAD_PAUSE_MIN_MS, SLOW_CONSUMER_CLOSE_MS,
    WRITE_BATCH_FRAMES_MAX, WRITE_TIMEOUT_S,
};
use crate::park::{Parking, Resume};
use crate::shared::{Admission, HotCounters, PendingHello, Shared};
use crate::ws::{self, WsIo};

/// Runs one accepted raw TCP connection to its end.
///
/// The entry points are plain functions returning an `async move` block, and
/// what they capture is used in place: an `async fn` stores its arguments
/// twice, and a future awaited from inside another is stored beside the
/// captured copy, which for a connection task costs hundreds of bytes.
pub(crate) fn run_tcp<B: Backend>(
    stream: TcpStream,
    shared: Arc<Shared<B>>,
    admission: Admission,
    pending: PendingHello,
) -> impl Future<Output = ()> + Send {
    let conn = Conn::new(TcpIo::new(stream), shared, Transport::Tcp, Some(Box::new(pending)));
    serve(conn, admission)
}

/// A transport whose connections' tasks can be spawned: `serve` is generic
/// over the transport, and only for a concrete one is its future known to
/// be `Send`.
trait Spawn: Parkable {
    fn spawn<B: Backend>(conn: Conn<B, Self>, admission: Admission);
}

impl Spawn for TcpIo<TcpStream> {
    fn spawn<B: Backend>(conn: Conn<B, Self>, admission: Admission) {
        tokio::spawn(serve(conn, admission));
    }
}

impl Spawn for WsIo<TcpStream> {
    fn spawn<B: Backend>(conn: Conn<B, Self>, admission: Admission) {
        tokio::spawn(serve(conn, admission));
    }
}

/// Runs one accepted WebSocket connection: the upgrade here, the rest in a
/// task of its own (`serve`), so the upgrade's room is not kept for the
/// connection's life.
pub(crate) fn run_ws<B: Backend>(
    stream: TcpStream,
    shared: Arc<Shared<B>>,
    admission: Admission,
    pending: PendingHello,
) -> impl Future<Output = ()> + Send {
    let mut conn = Conn::new(WsIo::new(stream), shared, Transport::Ws, Some(Box::new(pending)));
    async move {
        if upgrade(conn.io.stream_mut(), conn.session.idle_deadline).await {
            Spawn::spawn(conn, admission);
        }
    }
}

/// Serves a connection (new, or woken from parking) until it ends or parks.
/// Not an `async fn`, for the reason `run_tcp` gives.
#[allow(clippy::manual_async_fn)]
fn serve<B: Backend, I: Spawn>(mut conn: Conn<B, I>, admission: Admission) -> impl Future<Output = ()> {
    async move {
        let end = loop {
            match conn.run().await {
                Ran::Ended(end) => break end,
                Ran::Idle if conn.io.is_quiet() => {
                    if let Some(parking) = conn.session.shared.parking.clone() {
                        return park(conn, admission, &parking);
                    }
                    // `park_at` is never due without a parking lot.
                    conn.session.last_active = Instant::now();
                }
                // Half a frame received, or a pong unsent: not idle after all.
                Ran::Idle => conn.session.last_active = Instant::now(),
            }
        };
        Box::pin(conn.finish(end)).await;
        drop(admission);
    }
}

/// Hands an idle connection to its gateway's parking lot; its task ends.
fn park<B: Backend, I: Spawn>(conn: Conn<B, I>, admission: Admission, parking: &Parking) {
    let Conn { io, session } = conn;
    let io = match io.park() {
        Ok(io) => io,
        Err(e) => {
            // The socket is lost with its registration: the peer sees the
            // connection end and reconnects.
            tracing::warn!(error = %e, "cannot take an idle connection's socket out of the reactor; closing it");
            return;
        }
    };
    let idle_deadline = session.idle_deadline;
    let parked: Box<dyn Resume> = Box::new(ParkedConn::<B, I> { io, session, admission });
    if let Err(parked) = parking.park(idle_deadline, parked) {
        // A frame came in meanwhile, or the server is stopping: serve it.
        parked.resume();
    }
}

/// A connection while parked: all it had but its task and its place in
/// tokio's reactor.
struct ParkedConn<B: Backend, I: Spawn> {
    io: I::Parked,
    session: Session<B>,
    admission: Admission,
}

impl<B: Backend, I: Spawn> Resume for ParkedConn<B, I> {
    fn fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }

    fn watch_outbox(&mut self, waker: &Waker) -> bool {
        self.session.rx.watch(waker)
    }

    fn stay_awake(&mut self) {
        self.session.last_active = Instant::now();
    }

    fn resume(self: Box<Self>) {
        let ParkedConn { io, session, admission } = *self;
        match I::unpark(io) {
            Ok(io) => I::spawn(Conn { io, session }, admission),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register a woken connection's socket; closing it");
            }
        }
    }
}

/// The WebSocket upgrade, by the hello deadline. False if it failed.
async fn upgrade(stream: &mut TcpStream, deadline: Instant) -> bool {
    match tokio::time::timeout_at(deadline, ws::handshake(&mut *stream)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(peer = ?stream.peer_addr().ok(), error = %e, "websocket handshake failed");
            count_protocol_error(ErrorCode::Malformed);
            false
        }
        Err(_) => {
            count_protocol_error(ErrorCode::IdleTimeout);
            false
        }
    }
}

/// One connection: its transport and its session.
pub(crate) struct Conn<B: Backend, I> {
    io: I,
    session: Session<B>,
}

impl<B: Backend, I: FrameIo> Conn<B, I> {
    /// `pending` is the connection's place among those not yet past
    /// `hello`, given up when `hello` succeeds.
    pub(crate) fn new(
        io: I,
        shared: Arc<Shared<B>>,
        transport: Transport,
        pending: Option<Box<PendingHello>>,
    ) -> Conn<B, I> {
        let (outbox, rx) = Outbox::new(CONNECTION_OUTBOX_FRAMES_MAX);
        let now = Instant::now();
        // Counted from accept, so a WebSocket client cannot hold a
        // connection by upgrading slowly.
        let hello_deadline = now + Duration::from_secs(shared.config.hello_timeout_s.into());
        let session = Session {
            shared,
            transport,
            user: None,
            registration: None,
            outbox,
            rx,
            inflight: Vec::new(),
            pending,
            frames_this_turn: 0,
            overload_pause_ms: 0,
            answered_overload: false,
            read_paused: false,
            idle_deadline: hello_deadline,
            last_active: now,
        };
        Conn { io, session }
    }

    /// Serves the connection until it ends, then tells the peer why (if it
    /// should hear) and closes the socket. (The tasks call the two halves
    /// themselves, `finish` boxed: only a closing connection needs its room.)
    #[cfg(test)]
    pub(crate) async fn serve(&mut self) {
        let end = loop {
            if let Ran::Ended(end) = self.run().await {
                break end;
            }
            self.session.last_active = Instant::now();
        };
        self.finish(end).await;
    }

    /// Unregisters from pushes and refuses further replies, then tells the
    /// peer why the connection ends (if it should hear) and closes it.
    async fn finish(&mut self, end: End) {
        self.session.registration = None;
        self.session.rx.close();
        let io = &mut self.io;
        let write_timeout = Duration::from_secs(WRITE_TIMEOUT_S);
        match end {
            End::SlowConsumer(rest) => close_slow_consumer(io, self.session.user, rest).await,
            End::Fatal(code, message) => {
                tracing::debug!(user = ?self.session.user, code = code.as_str(), %message, "closing connection");
                if code != ErrorCode::ShuttingDown {
                    count_protocol_error(code);
                }
                // Best effort: the peer may already be gone.
                let _ = timeout(write_timeout, io.send(&[ServerFrame::Close { code, message }])).await;
                let _ = timeout(write_timeout, io.close(code)).await;
            }
            End::Quiet => {
                let _ = timeout(write_timeout, io.close(ErrorCode::ShuttingDown)).await;
            }
        }
    }

    /// Serves the connection until it must end (and says why), or until it
    /// has been idle long enough to park (`Ran::Idle`).
    async fn run(&mut self) -> Ran {
        let mut shutdown = self.session.shared.shutdown.clone();
        if *shutdown.borrow_and_update() {
            return Ran::Ended(fatal(ErrorCode::ShuttingDown, "server is shutting down"));
        }
        // One timer for the hello deadline, the idle deadline, the time to
        // park and the end of a read pause. It may fire early (past hello
        // the deadlines only move later, and it is not moved with them):
        // then it is set again for what is due next.
        let mut deadline = pin!(sleep_until(self.session.wake_at()));
        loop {
            // What this future holds while it waits here is what a
            // connection that is not parked costs: the deadline, the
            // shutdown waiter and references. The handlers that await
            // (writes, hello) are boxed, so their state exists only while
            // they run.
            let event = {
                let mut changed = pin!(shutdown.changed());
                let session = &mut self.session;
                poll_fn(|cx| next_event(cx, changed.as_mut(), session, &mut self.io, deadline.as_mut())).await
            };
            let (session, io) = (&mut self.session, &mut self.io);
            let ended = match event {
                Event::Shutdown(changed) => {
                    // A dropped sender also ends the server.
                    (changed.is_err() || *shutdown.borrow())
                        .then(|| fatal(ErrorCode::ShuttingDown, "server is shutting down"))
                }
                Event::Overflow => Some(End::SlowConsumer(Unsent::default())),
                Event::Write(batch) => {
                    session.last_active = Instant::now();
                    Box::pin(session.write_outbox(io, batch)).await
                }
                Event::Read(Incoming::Frame(frame)) => {
                    // A heartbeat keeps the connection open, not awake.
                    let heartbeat = matches!(frame.req, Request::Ping);
                    let stranger = session.user.is_none();
                    let handled = Box::pin(session.handle(io, *frame)).await;
                    session.heard_from(!heartbeat);
                    if stranger && session.user.is_some() {
                        // Past hello the deadlines are new ones, and may
                        // come before the hello deadline the timer is at.
                        deadline.as_mut().reset(session.wake_at());
                    }
                    handled.err()
                }
                Event::Read(Incoming::Heartbeat) => {
                    session.heard_from(false);
                    // Sends the pong the WebSocket layer queued.
                    Box::pin(session.write(io, &[])).await.err()
                }
                Event::Read(Incoming::Closed) => Some(End::Quiet),
                Event::Read(Incoming::Truncated) => {
                    // Nobody is left to tell; count it and go.
                    count_protocol_error(ErrorCode::Malformed);
                    Some(End::Quiet)
                }
                Event::Read(Incoming::Bad(e)) => Some(End::Fatal(e.code, e.message)),
                Event::Deadline => {
                    // Whatever it stood for, a read pause is over.
                    session.read_paused = false;
                    let now = Instant::now();
                    if now >= session.idle_deadline {
                        return Ran::Ended(match session.user {
                            None => fatal(ErrorCode::IdleTimeout, "no hello in time"),
                            Some(_) => fatal(ErrorCode::IdleTimeout, "no frame within the idle timeout"),
                        });
                    }
                    if session.park_at().is_some_and(|at| now >= at) {
                        return Ran::Idle;
                    }
                    deadline.as_mut().reset(session.wake_at());
                    continue;
                }
            };
            if let Some(end) = ended {
                return Ran::Ended(end);
            }
            match session.take_turn() {
                Turn::Go => {}
                Turn::Yield => tokio::task::yield_now().await,
                Turn::PauseReading(pause) => {
                    // The one timer says when the pause ends; the deadlines
                    // come back when it fires.
                    session.read_paused = true;
                    deadline.as_mut().reset(Instant::now() + pause);
                }
            }
        }
    }
}

/// How `Conn::run` returned.
enum Ran {
    Ended(End),
    /// Nothing but heartbeats for `park_after_s`: the connection may park.
    Idle,
}

/// Why a session ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Close with this code and message (a `Close` frame is still to be sent).
    Fatal(ErrorCode, String),
    /// The peer does not read fast enough: its outbox overflowed, or a write
    /// to it stalled for `WRITE_TIMEOUT_S`. Holds what is left of the write
    /// it was cut off in (see `close_slow_consumer`).
    SlowConsumer(Unsent),
    /// The peer is gone, or it has already been sent its `Close` frame.
    Quiet,
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> End {
    End::Fatal(code, message.into())
}

fn count_protocol_error(code: ErrorCode) {
    metrics::counter!("hongbao_protocol_errors_total", "code" => code.as_str()).increment(1);
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The `result` metric label of a reply.
fn result_label(reply: &Reply) -> &'static str {
    match reply {
        Reply::Shake(ShakeResult::Won { .. }) => "won",
        Reply::Shake(ShakeResult::None) => "none",
        Reply::Shake(ShakeResult::Overload) => "overload",
        Reply::Shake(ShakeResult::NotRunning) => "not_running",
        Reply::Error { code, .. } => code.as_str(),
        _ => "ok",
    }
}

fn count_request(hot: &HotCounters, op: &'static str, reply: &Reply) {
    match hot.get(op, reply) {
        Some(counter) => counter.increment(1),
        None => metrics::counter!("hongbao_requests_total", "op" => op, "result" => result_label(reply)).increment(1),
    }
}

fn is_overload(reply: &Reply) -> bool {
    matches!(reply, Reply::Shake(ShakeResult::Overload) | Reply::Error { code: ErrorCode::Overload, .. })
}

/// What woke a connection.
enum Event {
    Shutdown(Result<(), tokio::sync::watch::error::RecvError>),
    /// The outbox overflowed: the peer reads too slowly.
    Overflow,
    /// Frames from the outbox to write.
    Write(VecDeque<ServerFrame>),
    Read(Incoming),
    Deadline,
}

/// Polls a connection's event sources in priority order: shutdown and
/// slow-consumer checks first, then writing what is queued before reading
/// more, so a client that floods requests is held back by its own replies.
fn next_event<B: Backend, I: FrameIo>(
    cx: &mut Context<'_>,
    shutdown: std::pin::Pin<&mut impl Future<Output = Result<(), tokio::sync::watch::error::RecvError>>>,
    session: &mut Session<B>,
    io: &mut I,
    deadline: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Poll<Event> {
    if let Poll::Ready(changed) = shutdown.poll(cx) {
        return Poll::Ready(Event::Shutdown(changed));
    }
    // An overflow comes out before any queued frame.
    if let Poll::Ready(received) = session.rx.poll_recv(cx, WRITE_BATCH_FRAMES_MAX) {
        return Poll::Ready(received.map_or(Event::Overflow, Event::Write));
    }
    // While reading pauses (after `overload`), replies and pushes still go
    // out and shutdown is still seen; the peer's requests wait in its socket.
    if !session.read_paused {
        if let Poll::Ready(incoming) = io.poll_recv(cx, session.frame_bytes_max()) {
            return Poll::Ready(Event::Read(incoming));
        }
    }
    if deadline.poll(cx).is_ready() {
        return Poll::Ready(Event::Deadline);
    }
    Poll::Pending
}

/// How a write ended.
enum Written {
    Done(std::io::Result<()>),
    /// The outbox overflowed or the write stalled: the peer does not read.
    Stuck,
}

/// Closes a slow consumer, already unregistered (nothing more is queued for
/// it). Within `SLOW_CONSUMER_CLOSE_MS` in all: the rest of the write it was
/// cut off in (a frame half written must be finished for the next to be
/// read), then `Close { slow_consumer }`, then the shutdown. A peer that read
/// nothing meanwhile does not make room in that time: its socket is then
/// closed without the frame, and `hongbao_slow_consumer_closes_total` counts
/// the close as `close_frame="unsent"`.
async fn close_slow_consumer<I: FrameIo>(io: &mut I, user: Option<NonZeroU64>, mut rest: Unsent) {
    tracing::debug!(?user, "closing a slow consumer");
    count_protocol_error(ErrorCode::SlowConsumer);
    rest.skip_if_unstarted();
    let close = ServerFrame::Close {
        code: ErrorCode::SlowConsumer,
        message: "too many replies and pushes queued; read faster".into(),
    };
    let closing = async {
        rest.write_all(io).await?;
        io.send(&[close]).await?;
        io.close(ErrorCode::SlowConsumer).await;
        Ok::<(), std::io::Error>(())
    };
    let sent = matches!(timeout(Duration::from_millis(SLOW_CONSUMER_CLOSE_MS), closing).await, Ok(Ok(())));
    let close_frame = if sent { "sent" } else { "unsent" };
    metrics::counter!("hongbao_slow_consumer_closes_total", "close_frame" => close_frame).increment(1);
}

/// A request handed to the engine and not yet answered.
struct InFlight {
    id: u64,
    op: &'static str,
    started: Instant,
}

struct Session<B: Backend> {
    shared: Arc<Shared<B>>,
    transport: Transport,
    /// The authenticated user; `None` until `hello` succeeds.
    user: Option<NonZeroU64>,
    /// Keeps this connection registered for pushes; dropping it unregisters.
    registration: Option<B::Guard>,
    /// Cloned into every request's `Responder` and into the push hub.
    outbox: Outbox,
    /// Its receiving end: drained by the loop, and watched for an overflow
    /// while a write waits.
    rx: OutboxReceiver,
    /// Submitted requests not yet answered, for the in-flight limit and the
    /// latency histogram. A `Vec` because it holds at most
    /// `CONNECTION_INFLIGHT_MAX` entries, and most connections have none.
    inflight: Vec<InFlight>,
    /// The connection's place among those not past `hello` yet (the
    /// `max_pending_hello` caps); `None` once `hello` succeeded. Boxed: a
    /// pointer in every connection's task instead of 32 bytes, and the box
    /// is freed at `hello`.
    pending: Option<Box<PendingHello>>,
    /// Frames handled since this connection last let the others run.
    frames_this_turn: u8,
    /// How long this connection's reading pauses after its next `overload`
    /// answer (0: not overloaded lately); doubles while overloads continue.
    overload_pause_ms: u16,
    /// An `overload` answer went out since the loop last looked.
    answered_overload: bool,
    /// Reading pauses (after `overload`) until the deadline timer fires.
    read_paused: bool,
    /// When the connection is closed unless the peer sends a frame: the
    /// hello deadline until `hello`, then `idle_timeout_s` after the last
    /// frame.
    idle_deadline: Instant,
    /// The last request other than a heartbeat, or frame written from the
    /// outbox: `park_after_s` later the connection parks.
    last_active: Instant,
}

/// What a connection does after handling one event (`Session::take_turn`).
enum Turn {
    Go,
    /// Let the other connections on this worker run first.
    Yield,
    /// Stop reading for this long; replies and pushes still go out.
    PauseReading(Duration),
}

impl<B: Backend> Session<B> {
    /// Notes a frame from the peer: the idle deadline moves; `active` (not
    /// a heartbeat) also puts off parking.
    fn heard_from(&mut self, active: bool) {
        if self.user.is_none() {
            // Until hello, only the hello deadline counts.
            return;
        }
        let now = Instant::now();
        self.idle_deadline = now + Duration::from_secs(self.shared.config.idle_timeout_s.into());
        if active {
            self.last_active = now;
        }
    }

    /// When the connection parks if nothing happens first; `None` if it
    /// never does (not logged in, or parking is off).
    fn park_at(&self) -> Option<Instant> {
        let after = self.shared.config.park_after_s;
        (self.user.is_some() && after > 0 && self.shared.parking.is_some())
            .then(|| self.last_active + Duration::from_secs(after.into()))
    }

    /// What the deadline timer must wake the connection for next.
    fn wake_at(&self) -> Instant {
        self.park_at().map_or(self.idle_deadline, |at| at.min(self.idle_deadline))
    }

    /// The largest frame body the peer may send now: a stranger gets room
    /// for a hello only.
    fn frame_bytes_max(&self) -> usize {
        if self.user.is_some() {
            FRAME_BYTES_MAX
        } else {
            HELLO_FRAME_BYTES_MAX
        }
    }

    /// Writes frames from the outbox, settling the in-flight record of each
    /// reply. A `Close` from the engine (e.g. too many devices) is written
    /// and ends the connection.
    async fn write_outbox<I: FrameIo>(&mut self, io: &mut I, mut batch: VecDeque<ServerFrame>) -> Option<End> {
        let batch = batch.make_contiguous();
        let mut closing = false;
        let mut upto = batch.len();
        for (i, frame) in batch.iter().enumerate() {
            match frame {
                ServerFrame::Reply { id, reply } => {
                    self.settle(*id, reply);
                    self.note_load(reply);
                }
                ServerFrame::Push(_) => {}
                ServerFrame::Close { code, .. } => {
                    tracing::debug!(code = code.as_str(), "engine closed connection");
                    closing = true;
                    upto = i + 1;
                    break;
                }
            }
        }
        if let Err(end) = self.write(io, &batch[..upto]).await {
            return Some(end);
        }
        closing.then_some(End::Quiet)
    }

    /// Fairness and flow control between connections on one worker, after
    /// every event: a connection that keeps many requests coming lets the
    /// others run every `FRAMES_PER_TURN_MAX` events (a connection that only
    /// pings is then answered after a few frames of each busy one, not after
    /// all they have queued); and one that was just told `overload` reads
    /// nothing for a moment (`OVERLOAD_PAUSE_MIN_MS`, doubling while the
    /// engine's answers stay `overload`, up to `OVERLOAD_PAUSE_MAX_MS`), so
    /// that, over capacity, the server spends its time on the work it can
    /// do rather than on reading and refusing more. Only reading pauses.
    fn take_turn(&mut self) -> Turn {
        // Refusals that arrive while reading pauses answer requests read
        // before it: the pause already stands for them.
        if std::mem::take(&mut self.answered_overload) && !self.read_paused {
            self.overload_pause_ms =
                (self.overload_pause_ms.saturating_mul(2)).clamp(OVERLOAD_PAUSE_MIN_MS, OVERLOAD_PAUSE_MAX_MS);
            self.frames_this_turn = 0;
            self.shared.hot_counters.overload_read_pauses.increment(1);
            return Turn::PauseReading(Duration::from_millis(self.overload_pause_ms.into()));
        }
        self.frames_this_turn += 1;
        if self.frames_this_turn >= FRAMES_PER_TURN_MAX {
            self.frames_this_turn = 0;
            return Turn::Yield;
        }
        Turn::Go
    }

    /// Notes what the engine's answer says about load: `overload` starts or
    /// lengthens the pause before this connection is read again; any other
    /// answer of the engine ends it. (Answers the gateway makes itself —
    /// pongs, shakes answered inline — say nothing about the engine's load.)
    fn note_load(&mut self, reply: &Reply) {
        if is_overload(reply) {
            self.answered_overload = true;
        } else {
            self.overload_pause_ms = 0;
        }
    }

    /// Records the latency and result of a reply the engine sent.
    fn settle(&mut self, id: u64, reply: &Reply) {
        let Some(pos) = self.inflight.iter().position(|r| r.id == id) else {
            // Not ours to count (the engine answers each request once).
            return;
        };
        let done = self.inflight.swap_remove(pos);
        if self.inflight.is_empty() {
            // An idle connection keeps no request records.
            self.inflight = Vec::new();
        }
        self.shared.hot_counters.record_latency(done.op, done.started.elapsed().as_secs_f64());
        count_request(&self.shared.hot_counters, done.op, reply);
    }

    /// Writes frames. A peer that does not read is cut off as a slow
    /// consumer as soon as its outbox overflows meanwhile (replies and
    /// pushes kept coming while it read nothing), or after
    /// `WRITE_TIMEOUT_S` at the latest.
    async fn write<I: FrameIo>(&mut self, io: &mut I, frames: &[ServerFrame]) -> Result<(), End> {
        let mut out = match io.encode(frames) {
            Ok(bytes) => Unsent::new(bytes),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a frame");
                return Err(End::Quiet);
            }
        };
        let mut stalled = pin!(sleep(Duration::from_secs(WRITE_TIMEOUT_S)));
        let rx = &mut self.rx;
        let written = poll_fn(|cx| {
            if let Poll::Ready(done) = out.poll_write_all(cx, io) {
                return Poll::Ready(Written::Done(done));
            }
            if rx.poll_overflow(cx).is_ready() || stalled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Written::Stuck);
            }
            Poll::Pending
        })
        .await;
        match written {
            Written::Done(Ok(())) => Ok(()),
            Written::Done(Err(e)) => {
                tracing::debug!(error = %e, transport = self.transport.as_str(), "write failed");
                Err(End::Quiet)
            }
            Written::Stuck => Err(End::SlowConsumer(out)),
        }
    }

    /// Writes one reply made by the gateway itself.
    async fn reply<I: FrameIo>(&mut self, io: &mut I, id: u64, op: &'static str, reply: Reply) -> Result<(), End> {
        count_request(&self.shared.hot_counters, op, &reply);
        // A refusal made here (the in-flight limit, a shutdown) pauses the
        // reading too; other answers made here do not end a pause.
        self.answered_overload |= is_overload(&reply);
        self.write(io, &[ServerFrame::Reply { id, reply }]).await
    }

    async fn handle<I: FrameIo>(&mut self, io: &mut I, frame: ClientFrame) -> Result<(), End> {
        let ClientFrame { id, req } = frame;
        let op = req.op_name();
        let Some(user) = self.user.map(NonZeroU64::get) else {
            let Request::Hello { token } = req else {
                return Err(fatal(ErrorCode::HelloRequired, "the first request must be hello"));
            };
            return self.hello(io, id, &token).await;
        };
        match req {
            Request::Hello { .. } => Err(fatal(ErrorCode::HelloRequired, "hello was already done on this connection")),
            Request::Ping => self.reply(io, id, op, Reply::Pong).await,
            // Most shakes of a campaign find nothing: answered here, without
            // a trip through the shard's queue and back, and without taking
            // an in-flight slot (counted by `reply`; no latency sample, as
            // there is no queueing to measure).
            req if let Some(reply) = self.shared.engine.answer_inline(user, &req) => {
                self.reply(io, id, op, reply).await
            }
            req if self.inflight.len() >= CONNECTION_INFLIGHT_MAX => {
                let reply = Reply::overload(&req, "too many requests in flight on this connection");
                self.reply(io, id, op, reply).await
            }
            _ if self.inflight.iter().any(|r| r.id == id) => {
                // Two requests with one id would make their replies ambiguous.
                let reply = Reply::error(ErrorCode::InvalidRequest, format!("request id {id} is already in flight"));
                self.reply(io, id, op, reply).await
            }
            req => {
                let Some(registration) = &self.registration else {
                    // `user` is set only once `connect` gave a registration.
                    debug_assert!(false, "a logged-in connection without a registration");
                    return Err(fatal(ErrorCode::Internal, "connection not registered"));
                };
                self.inflight.push(InFlight { id, op, started: Instant::now() });
                let responder = Responder::Client { outbox: self.outbox.clone(), request_id: id };
                self.shared.engine.submit(registration, user, req, responder);
                Ok(())
            }
        }
    }

    async fn hello<I: FrameIo>(&mut self, io: &mut I, id: u64, token: &str) -> Result<(), End> {
        let config = &self.shared.config;
        let now = unix_now();
        let user = match config.signer.authenticate(token, now.as_secs(), config.dev) {
            Ok(user) => user,
            Err(e) => {
                count_request(&self.shared.hot_counters, "hello", &Reply::error(e.code(), ""));
                return Err(fatal(e.code(), e.to_string()));
            }
        };
        // No longer a stranger: its room among those waiting for hello goes
        // to the next, before the welcome is written (a client that has its
        // welcome is no longer waiting).
        self.pending = None;
        let welcome = Reply::Welcome {
            user,
            protocol: PROTOCOL_VERSION,
            heartbeat_s: config.heartbeat_s,
            server_time_ms: now.as_millis() as u64,
        };
        // Welcome goes first, so pending messages queued by `connect` follow it.
        self.reply(io, id, "hello", welcome).await?;
        match self.shared.engine.connect(user, self.outbox.clone()).await {
            Ok(guard) => {
                self.registration = Some(guard);
                // The engine refuses user 0; `None` would only mean not logged in.
                self.user = NonZeroU64::new(user);
                Ok(())
            }
            Err(e) => Err(fatal(e.code(), format!("cannot register connection: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use hongbao_boundary::EngineError;
    use hongbao_proto::{binary, Push, PushBody, FRAME_HEADER_BYTES};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::watch;

    use super::*;
    use crate::{GatewayConfig, TokenSigner};

    /// Answers at once, or (with `held`) keeps every responder unanswered.
    #[derive(Clone, Default)]
    struct FakeEngine {
        held: Option<Arc<Mutex<Vec<Responder>>>>,
        /// The outbox of every connection that said hello, as the push hub
        /// would hold it, and how many of them are still registered.
        registered: Arc<Mutex<Vec<Outbox>>>,
        live: Arc<AtomicUsize>,
    }

    /// Counts a live registration, like the push hub's entry.
    struct Registration(Arc<AtomicUsize>);

    impl Drop for Registration {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl FakeEngine {
        fn outbox(&self) -> Outbox {
            self.registered.lock().unwrap().last().expect("a registered connection").clone()
        }
        fn live(&self) -> usize {
            self.live.load(Ordering::SeqCst)
        }
    }

    impl Backend for FakeEngine {
        type Guard = Registration;
        fn submit(&self, _connection: &Registration, _user: u64, req: Request, responder: Responder) {
            if let Some(held) = &self.held {
                held.lock().unwrap().push(responder);
                return;
            }
            responder.send(match req {
                Request::Open { packet: OVERLOADED_PACKET } => Reply::error(ErrorCode::Overload, "shard queue full"),
                Request::Open { packet } => Reply::Opened { packet, amount_fen: 5, repeat: false, finished: false },
                Request::Shake { .. } => Reply::Shake(ShakeResult::None),
                _ => Reply::error(ErrorCode::NotFound, "nothing here"),
            });
        }
        async fn connect(&self, _user: u64, outbox: Outbox) -> Result<Registration, EngineError> {
            self.registered.lock().unwrap().push(outbox);
            self.live.fetch_add(1, Ordering::SeqCst);
            Ok(Registration(self.live.clone()))
        }
    }

    const SECRET: &str = "a test secret of reasonable length";
    /// Opens of this packet are answered `overload` by the fake engine.
    const OVERLOADED_PACKET: u64 = 13;

    struct Client {
        io: DuplexStream,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Client {
        fn start(engine: FakeEngine) -> Client {
            Client::with_pipe(engine, FRAME_BYTES_MAX)
        }

        /// A client whose end of the connection buffers `pipe_bytes` each way.
        fn with_pipe(engine: FakeEngine, pipe_bytes: usize) -> Client {
            let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let mut config = GatewayConfig::new(addr, addr, TokenSigner::new(SECRET));
            config.dev = true;
            let (shutdown, shutdown_rx) = watch::channel(false);
            let (shared, _done) = Shared::new(config, engine, shutdown_rx, None);
            let (io, server) = tokio::io::duplex(pipe_bytes);
            let task = tokio::spawn(async move {
                Conn::new(TcpIo::new(server), shared, Transport::Tcp, None).serve().await;
            });
            Client { io, shutdown, task }
        }

        async fn send(&mut self, id: u64, req: Request) {
            self.io.write_all(&binary::encode_client(&ClientFrame { id, req })).await.unwrap();
        }

        async fn recv(&mut self) -> ServerFrame {
            let mut header = [0u8; FRAME_HEADER_BYTES];
            self.io.read_exact(&mut header).await.unwrap();
            let len = binary::body_len(&header).unwrap().unwrap();
            let mut body = vec![0; len];
            self.io.read_exact(&mut body).await.unwrap();
            binary::decode_server(&body).unwrap()
        }

        async fn expect_close(mut self, code: ErrorCode) {
            match self.recv().await {
                ServerFrame::Close { code: got, .. } => assert_eq!(got, code),
                other => panic!("expected close {code:?}, got {other:?}"),
            }
            // Then EOF.
            assert_eq!(self.io.read(&mut [0u8; 1]).await.unwrap(), 0);
            self.task.await.unwrap();
        }

        async fn hello(&mut self) {
            self.send(1, Request::Hello { token: "42".into() }).await;
            match self.recv().await {
                ServerFrame::Reply { id: 1, reply: Reply::Welcome { user: 42, protocol, heartbeat_s: 30, .. } } => {
                    assert_eq!(protocol, PROTOCOL_VERSION)
                }
                other => panic!("expected welcome, got {other:?}"),
            }
        }
    }

    /// What a connection that is not parked costs is mostly its task, whose
    /// size is this future's plus ~130 bytes, rounded up to 128: 768 bytes
    /// today (the real engine's guard is 32 bytes, this fake's 8). An
    /// unboxed await or a large new field in the connection loop shows up
    /// here. (The pending-hello place added 8 bytes, a pointer; the read
    /// pause's saved idle deadline 16: tcp 592, ws 648; the idle deadline
    /// and the last activity for parking 40 more: tcp 632, ws 688 now.) A
    /// WebSocket upgrade runs in a task of its own first, for the length of
    /// the handshake only.
    #[tokio::test]
    async fn connection_tasks_stay_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = GatewayConfig::new(addr, addr, TokenSigner::new(SECRET));
        config.dev = true;
        let (_shutdown, shutdown_rx) = watch::channel(false);
        let (shared, _done) = Shared::new(config, FakeEngine::default(), shutdown_rx, None);
        let permits = Arc::new(tokio::sync::Semaphore::new(2));
        let admission = || Admission::new(permits.clone().try_acquire_owned().unwrap(), metrics::gauge!("test"));
        let pending = || shared.pending.admit(addr.ip()).unwrap();
        let tcp = run_tcp(TcpStream::connect(addr).await.unwrap(), shared.clone(), admission(), pending());
        let stream = TcpStream::connect(addr).await.unwrap();
        let ws_conn = Conn::new(WsIo::new(stream), shared.clone(), Transport::Ws, Some(Box::new(pending())));
        let ws = serve(ws_conn, admission());
        let (tcp, ws) = (std::mem::size_of_val(&tcp), std::mem::size_of_val(&ws));
        eprintln!("connection futures: tcp {tcp} bytes, ws {ws} bytes");
        assert!(tcp <= 640 && ws <= 704, "connection futures grew: tcp {tcp} bytes, ws {ws} bytes");
    }

    #[tokio::test]
    async fn hello_then_requests_then_second_hello_is_fatal() {
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        c.send(2, Request::Ping).await;
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 2, reply: Reply::Pong });
        c.send(3, Request::Open { packet: 9 }).await;
        assert_eq!(
            c.recv().await,
            ServerFrame::Reply {
                id: 3,
                reply: Reply::Opened { packet: 9, amount_fen: 5, repeat: false, finished: false }
            }
        );
        c.send(4, Request::Hello { token: "42".into() }).await;
        c.expect_close(ErrorCode::HelloRequired).await;
    }

    #[tokio::test]
    async fn first_request_must_be_hello() {
        let mut c = Client::start(FakeEngine::default());
        c.send(1, Request::Balance).await;
        c.expect_close(ErrorCode::HelloRequired).await;
    }

    #[tokio::test]
    async fn bad_tokens_are_fatal() {
        let mut c = Client::start(FakeEngine::default());
        c.send(1, Request::Hello { token: "v1.42.99.AAAA".into() }).await;
        c.expect_close(ErrorCode::BadToken).await;
        let mut c = Client::start(FakeEngine::default());
        let expired = TokenSigner::new(SECRET).issue(42, 1, 1);
        c.send(1, Request::Hello { token: expired }).await;
        c.expect_close(ErrorCode::TokenExpired).await;
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames_are_fatal() {
        let mut c = Client::start(FakeEngine::default());
        c.io.write_all(&((FRAME_BYTES_MAX + 1) as u32).to_be_bytes()).await.unwrap();
        c.expect_close(ErrorCode::FrameTooLarge).await;
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        c.io.write_all(&[0, 0, 0, 2, 7, 99]).await.unwrap();
        c.expect_close(ErrorCode::UnknownOp).await;
    }

    #[tokio::test(start_paused = true)]
    async fn no_hello_in_time_is_an_idle_timeout() {
        let c = Client::start(FakeEngine::default());
        c.expect_close(ErrorCode::IdleTimeout).await;
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_hello_is_an_idle_timeout() {
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        let started = Instant::now();
        c.expect_close(ErrorCode::IdleTimeout).await;
        assert!(started.elapsed() >= Duration::from_secs(crate::IDLE_TIMEOUT_S_DEFAULT.into()));
    }

    #[tokio::test]
    async fn shutdown_closes_connections() {
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        c.shutdown.send(true).unwrap();
        c.expect_close(ErrorCode::ShuttingDown).await;
    }

    #[tokio::test]
    async fn requests_over_the_in_flight_limit_are_refused_without_submitting() {
        let held = Arc::new(Mutex::new(Vec::new()));
        let mut c = Client::start(FakeEngine { held: Some(held.clone()), ..FakeEngine::default() });
        c.hello().await;
        for id in 0..CONNECTION_INFLIGHT_MAX as u64 {
            c.send(100 + id, Request::Open { packet: 1 }).await;
        }
        c.send(999, Request::Shake { campaign: 0, key: None }).await;
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 999, reply: Reply::Shake(ShakeResult::Overload) });
        c.send(1000, Request::Balance).await;
        match c.recv().await {
            ServerFrame::Reply { id: 1000, reply: Reply::Error { code: ErrorCode::Overload, .. } } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(held.lock().unwrap().len(), CONNECTION_INFLIGHT_MAX);
        // Answering one frees a slot.
        let first = held.lock().unwrap().remove(0);
        first.send(Reply::Balance { balance_fen: 1 });
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 100, reply: Reply::Balance { balance_fen: 1 } });
        c.send(1001, Request::Open { packet: 2 }).await;
        c.send(1002, Request::Ping).await;
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 1002, reply: Reply::Pong });
        assert_eq!(held.lock().unwrap().len(), CONNECTION_INFLIGHT_MAX);
    }

    #[tokio::test]
    async fn before_hello_only_a_hello_sized_frame_is_read() {
        // Announcing more than a hello needs closes at once, from the header.
        let mut c = Client::start(FakeEngine::default());
        c.io.write_all(&((HELLO_FRAME_BYTES_MAX + 1) as u32).to_be_bytes()).await.unwrap();
        c.expect_close(ErrorCode::FrameTooLarge).await;
        // The longest token with the largest id passes.
        let mut c = Client::start(FakeEngine::default());
        let token = TokenSigner::new(SECRET).issue(42, 3600, unix_now().as_secs());
        let token = format!("{token}{}", " ".repeat(hongbao_boundary::TOKEN_BYTES_MAX - token.len()));
        c.send(u64::MAX, Request::Hello { token }).await;
        c.expect_close(ErrorCode::BadToken).await;
        // After hello, frames up to FRAME_BYTES_MAX are read again.
        let mut c = Client::start(FakeEngine::default());
        c.hello().await;
        c.send(2, Request::Hello { token: "7".repeat(FRAME_BYTES_MAX / 2) }).await;
        c.expect_close(ErrorCode::HelloRequired).await;
    }

    fn notice(n: u64) -> ServerFrame {
        ServerFrame::Push(Push { msg: n, body: PushBody::Notice { topic: "t".into(), text: "x".repeat(100) } })
    }

    /// Pushes to a client that reads nothing until its outbox refuses one:
    /// the pipe fills first (the connection waits on its write), then the
    /// outbox. Returns the outbox and when it refused.
    async fn flood_until_refused(engine: &FakeEngine) -> (Outbox, Instant) {
        let outbox = engine.outbox();
        for n in 0.. {
            if !outbox.send(notice(n)) {
                return (outbox, Instant::now());
            }
            assert!(n < 10 * CONNECTION_OUTBOX_FRAMES_MAX as u64, "the outbox never overflowed");
            // Lets the connection write what fits.
            tokio::task::yield_now().await;
        }
        unreachable!()
    }

    /// Bytes each way between a test client and its connection: a few
    /// pushes' worth, so a client that does not read stalls the writes soon.
    const SMALL_PIPE_BYTES: usize = 4096;

    /// After an `overload` answer the connection stops reading for a while
    /// (the clock is paused: only the pause's timer moves it), but what the
    /// engine sends meanwhile goes out at once, and the pause doubles while
    /// the engine keeps answering `overload`.
    #[tokio::test(start_paused = true)]
    async fn overload_pauses_reading_but_not_writing() {
        let engine = FakeEngine::default();
        let mut c = Client::start(engine.clone());
        c.hello().await;
        let overloaded = |id| ServerFrame::Reply { id, reply: Reply::error(ErrorCode::Overload, "shard queue full") };
        for (id, pause_ms) in [(2, OVERLOAD_PAUSE_MIN_MS), (4, 2 * OVERLOAD_PAUSE_MIN_MS)] {
            c.send(id, Request::Open { packet: OVERLOADED_PACKET }).await;
            assert_eq!(c.recv().await, overloaded(id));
            let told = Instant::now();
            c.send(id + 1, Request::Ping).await;
            // A push queued during the pause is written without waiting for it.
            let push =
                ServerFrame::Push(Push { msg: id, body: PushBody::Notice { topic: "t".into(), text: "x".into() } });
            assert!(engine.outbox().send(push.clone()));
            assert_eq!(c.recv().await, push);
            assert_eq!(told.elapsed(), Duration::ZERO, "the push waited for the pause");
            // The ping is read only when the pause ends.
            assert_eq!(c.recv().await, ServerFrame::Reply { id: id + 1, reply: Reply::Pong });
            assert!(told.elapsed() >= Duration::from_millis(pause_ms.into()), "pong after {:?}", told.elapsed());
        }
        // An answer of the engine that is not `overload` ends the doubling.
        c.send(6, Request::Open { packet: 9 }).await;
        assert!(matches!(c.recv().await, ServerFrame::Reply { id: 6, reply: Reply::Opened { .. } }));
        c.send(7, Request::Open { packet: OVERLOADED_PACKET }).await;
        assert_eq!(c.recv().await, overloaded(7));
        let told = Instant::now();
        c.send(8, Request::Ping).await;
        assert_eq!(c.recv().await, ServerFrame::Reply { id: 8, reply: Reply::Pong });
        assert_eq!(told.elapsed(), Duration::from_millis(OVERLOAD_PAUSE_MIN_MS.into()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_is_cut_off_as_soon_as_its_outbox_overflows() {
        let engine = FakeEngine::default();
        let mut c = Client::with_pipe(engine.clone(), SMALL_PIPE_BYTES);
        c.hello().await;
        let (outbox, overflowed) = flood_until_refused(&engine).await;
        // Deliveries stop and the connection is unregistered at once (the
        // clock is paused: only timers move it).
        assert!(outbox.is_closed());
        while engine.live() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let unregistered = overflowed.elapsed();
        // The socket is closed within the slow consumer's bound, though the
        // client still reads nothing: far sooner than a write would time out.
        (&mut c.task).await.unwrap();
        let closed = overflowed.elapsed();
        eprintln!("unregistered after {unregistered:?}, closed after {closed:?}");
        assert!(unregistered <= Duration::from_millis(1), "unregistered {unregistered:?} after the overflow");
        assert!(closed <= Duration::from_millis(SLOW_CONSUMER_CLOSE_MS + 1), "closed {closed:?} after the overflow");
        assert!(closed < Duration::from_secs(WRITE_TIMEOUT_S) / 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_that_reads_in_time_gets_its_close_frame_after_whole_frames() {
        let engine = FakeEngine::default();
        let mut c = Client::with_pipe(engine.clone(), SMALL_PIPE_BYTES);
        c.hello().await;
        flood_until_refused(&engine).await;
        while engine.live() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Reading now lets the write it was cut off in finish, then the close.
        let mut pushes = 0;
        loop {
            match c.recv().await {
                ServerFrame::Push(_) => pushes += 1,
                ServerFrame::Close { code, .. } => {
                    assert_eq!(code, ErrorCode::SlowConsumer);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(pushes > 0);
        assert_eq!(c.io.read(&mut [0u8; 1]).await.unwrap(), 0, "then EOF");
        c.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_overflow_while_not_writing_closes_with_the_close_frame() {
        let engine = FakeEngine::default();
        let mut c = Client::start(engine.clone());
        c.hello().await;
        // Queued faster than the connection runs: the outbox overflows
        // before the connection writes anything.
        let outbox = engine.outbox();
        let sent = (0..).take_while(|n| outbox.send(notice(*n))).count();
        assert_eq!(sent, CONNECTION_OUTBOX_FRAMES_MAX);
        c.expect_close(ErrorCode::SlowConsumer).await;
        assert_eq!(engine.live(), 0);
    }
}
