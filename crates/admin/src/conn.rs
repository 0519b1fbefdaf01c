//! One admin connection: hyper's HTTP/1.1 over the socket, with the time
//! bounds hyper does not give, and every request body read before routing.
//!
//! **Deadlines.** A connection is always in one phase (`Phase`) with at most
//! one read deadline. The socket wrapper (`TimedIo`) fails a read or write
//! that is still waiting at the deadline, and hyper then closes the
//! connection. hyper's own `header_read_timeout` is not used: it starts when
//! a connection goes idle, so with it an idle keep-alive connection could
//! never outlive the header timeout; here the header timeout starts at the
//! first byte of a request (or at accept), and idling has its own bound.
//!
//! **Bodies.** hyper closes a connection whose request body was not read to
//! its end when the answer went out, and it decides that after the answer's
//! head (without `Connection: close`) is already written, so the client's
//! next request on it fails (issue 9, item 4: the 400 for a bad path sent
//! before a late body). `ConnService` therefore reads every body, bounded in
//! size and time, before the router sees the request: every answer from a
//! route leaves the connection reusable. The only answers sent with a body
//! unread are this module's own (413, 408, 400 when the body breaks off),
//! and they say `Connection: close`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hongbao_proto::ErrorCode;
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::limits::{BODY_BYTES_MAX, HEADER_BYTES_MAX};
use crate::AdminLimits;

/// What every connection of one server shares.
pub(crate) struct ConnShared {
    pub(crate) router: Router,
    pub(crate) limits: AdminLimits,
    /// Built once: HTTP/1.1 only, keep-alive, a bounded head.
    http: http1::Builder,
}

impl ConnShared {
    pub(crate) fn new(router: Router, limits: AdminLimits) -> ConnShared {
        let mut http = http1::Builder::new();
        // `None`: `TimedIo` measures the header timeout (see the module doc).
        // No hyper timer is set, so hyper starts no timers of its own.
        http.header_read_timeout(None).max_buf_size(HEADER_BYTES_MAX).keep_alive(true);
        ConnShared { router, limits, http }
    }
}

/// Serves one accepted connection to its end. `_permit` is its place under
/// the connection cap, given back when this returns. On the shutdown signal
/// an idle connection closes at once and a busy one after its answer; the
/// server bounds how long it waits for that (`shutdown_grace_ms`).
pub(crate) async fn serve(
    stream: TcpStream,
    shared: Arc<ConnShared>,
    _permit: OwnedSemaphorePermit,
    mut shutdown: watch::Receiver<bool>,
) {
    let _open = OpenGauge::new();
    let clock = Arc::new(ConnClock::new(&shared.limits, Instant::now()));
    let io = TokioIo::new(TimedIo::new(stream, clock.clone()));
    let body_timeout = Duration::from_millis(shared.limits.body_read_timeout_ms);
    let service = ConnService { router: TowerToHyperService::new(shared.router.clone()), clock, body_timeout };
    let conn = shared.http.serve_connection(io, service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        // A peer's doing (a timeout, a reset, a malformed head): not ours to log loudly.
        tracing::debug!(error = %e, "admin connection ended with an error");
    }
}

/// `hongbao_admin_connections_open`, held for a connection's life.
struct OpenGauge;

impl OpenGauge {
    fn new() -> OpenGauge {
        metrics::gauge!("hongbao_admin_connections_open").increment(1.0);
        OpenGauge
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!("hongbao_admin_connections_open").decrement(1.0);
    }
}

// ---- deadlines --------------------------------------------------------------

/// Where a connection is in its request cycle, which decides its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A request head is due: since accept, or since the first byte after an
    /// idle spell. Deadline: `header_read_timeout_ms` from then.
    Head,
    /// A request is being served. Its body is read under the body timeout
    /// (`read_body`); the handler itself has no deadline here (it waits on
    /// the engine, whose queues are bounded).
    Busy,
    /// The answer was handed to hyper; it is being written and the next
    /// request may come. Deadline: `idle_timeout_ms` from then.
    Idle,
}

impl Phase {
    /// The `phase` label of `hongbao_admin_timeouts_total`.
    fn as_str(self) -> &'static str {
        match self {
            Phase::Head => "header",
            Phase::Busy => "busy",
            Phase::Idle => "idle",
        }
    }
}

#[derive(Debug)]
struct ClockState {
    phase: Phase,
    /// `None` while `Busy`.
    deadline: Option<Instant>,
}

/// One connection's phase and deadline, moved by the service (a request
/// starts, its answer is ready) and by the socket (bytes after idling).
/// Shared by the two, which run in the connection's one task, so the lock
/// is never contended.
#[derive(Debug)]
pub(crate) struct ConnClock {
    header_timeout: Duration,
    idle_timeout: Duration,
    state: Mutex<ClockState>,
}

impl ConnClock {
    pub(crate) fn new(limits: &AdminLimits, now: Instant) -> ConnClock {
        let header_timeout = Duration::from_millis(limits.header_read_timeout_ms);
        ConnClock {
            header_timeout,
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            state: Mutex::new(ClockState { phase: Phase::Head, deadline: Some(now + header_timeout) }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ClockState) -> T) -> T {
        // Nothing panics while holding the lock; if something ever did, the
        // state is still two plain values.
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Bytes arrived: after an idle spell they are the next request, whose
    /// head is now due.
    pub(crate) fn bytes_arrived(&self, now: Instant) {
        let header_timeout = self.header_timeout;
        self.with(|s| {
            if s.phase == Phase::Idle {
                *s = ClockState { phase: Phase::Head, deadline: Some(now + header_timeout) };
            }
        });
    }

    /// hyper has a whole head and calls the service.
    pub(crate) fn request_started(&self) {
        self.with(|s| *s = ClockState { phase: Phase::Busy, deadline: None });
    }

    /// The answer is handed to hyper.
    pub(crate) fn answer_ready(&self, now: Instant) {
        let idle_timeout = self.idle_timeout;
        self.with(|s| *s = ClockState { phase: Phase::Idle, deadline: Some(now + idle_timeout) });
    }

    pub(crate) fn deadline(&self) -> Option<(Instant, Phase)> {
        self.with(|s| s.deadline.map(|d| (d, s.phase)))
    }
}

/// The error a read or write gets once the connection's deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("admin connection timed out ({})", .0.as_str())]
pub(crate) struct DeadlinePassed(pub(crate) Phase);

/// The socket, failing reads and writes that wait past the clock's
/// deadline. hyper waits on a read whenever it waits for the peer (a head,
/// the next request, even EOF while it writes), so a deadline is noticed in
/// every phase that has one.
pub(crate) struct TimedIo {
    stream: TcpStream,
    clock: Arc<ConnClock>,
    /// Fires at the clock's deadline; moved when the deadline moves.
    sleep: Pin<Box<Sleep>>,
    /// Set once the deadline passed: every later call fails the same way,
    /// and the timeout is counted once.
    expired: Option<Phase>,
}

impl TimedIo {
    pub(crate) fn new(stream: TcpStream, clock: Arc<ConnClock>) -> TimedIo {
        let first = clock.deadline().map(|(d, _)| d).unwrap_or_else(Instant::now);
        TimedIo { stream, clock, sleep: Box::pin(tokio::time::sleep_until(first)), expired: None }
    }

    fn expired_error(phase: Phase) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, DeadlinePassed(phase))
    }

    /// Ready with an error if the deadline has passed (counting it the
    /// first time); otherwise arms the timer so the task wakes at it.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if let Some(phase) = self.expired {
            return Poll::Ready(Self::expired_error(phase));
        }
        let Some((deadline, phase)) = self.clock.deadline() else { return Poll::Pending };
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        ready!(self.sleep.as_mut().poll(cx));
        self.expired = Some(phase);
        metrics::counter!("hongbao_admin_timeouts_total", "phase" => phase.as_str()).increment(1);
        Poll::Ready(Self::expired_error(phase))
    }

    /// A pending read or write: pending until the deadline, then an error.
    fn pending_until_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        self.poll_deadline(cx).map(Err)
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Checked before reading too: a peer trickling bytes must not keep a
        // head alive by never letting the read go pending.
        if let Poll::Ready(e) = this.poll_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => this.pending_until_deadline(cx),
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.clock.bytes_arrived(Instant::now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.pending_until_deadline(cx),
            done => done,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.pending_until_deadline(cx),
            done => done,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending => this.pending_until_deadline(cx),
            done => done,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

// ---- requests ---------------------------------------------------------------

/// hyper's service for one connection: moves the clock, reads the body,
/// then hands the request to the router.
#[derive(Clone)]
struct ConnService {
    router: TowerToHyperService<Router>,
    clock: Arc<ConnClock>,
    body_timeout: Duration,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.clock.request_started();
        let ConnService { router, clock, body_timeout } = self.clone();
        Box::pin(async move {
            let answer = match read_body(req, body_timeout).await {
                Ok(req) => hyper::service::Service::call(&router, req).await?,
                Err(refused) => refused.into_response(),
            };
            clock.answer_ready(Instant::now());
            if answer.extensions().get::<Streaming>().is_some() {
                return Ok(answer.map(|inner| Body::new(RenewsDeadline { inner, clock })));
            }
            Ok(answer)
        })
    }
}

/// Marks a response whose body is a long-lived stream (`/v1/live`). Once an
/// answer is handed over the connection counts as idle, and its deadline
/// (`idle_timeout_ms`) would close a stream a minute in; for a marked
/// answer every piece of the body renews that deadline instead. A peer that
/// stops reading stops the body (its writes wait), so it is still closed
/// `idle_timeout_ms` after the last piece went out.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Streaming;

/// A streaming body that renews the connection's idle deadline per piece.
struct RenewsDeadline {
    inner: Body,
    clock: Arc<ConnClock>,
}

impl hyper::body::Body for RenewsDeadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.clock.answer_ready(Instant::now());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request body was not read to its end. Each is answered before
/// routing, with `Connection: close` (the rest of the body is unread).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Known from `content-length` before reading, or found while reading.
    #[error("request body larger than {limit_bytes} bytes")]
    TooLarge { limit_bytes: usize },
    #[error("request body not received within {timeout_ms} ms")]
    TimedOut { timeout_ms: u64 },
    /// The body broke off (the peer closed, a bad chunk).
    #[error("cannot read request body: {0}")]
    Read(hyper::Error),
}

impl IntoResponse for BodyError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            BodyError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::InvalidRequest),
            // The code clients already know for "you went quiet for too long".
            BodyError::TimedOut { .. } => (StatusCode::REQUEST_TIMEOUT, ErrorCode::IdleTimeout),
            BodyError::Read(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest),
        };
        let mut response = ApiError::new(status, code, self.to_string()).into_response();
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        // Answered before routing: no route pattern to label it with.
        crate::count_request("-", status);
        response
    }
}

/// The request with its whole body in memory, or why not: at most
/// `BODY_BYTES_MAX` bytes, all within `timeout` from now.
async fn read_body(req: Request<Incoming>, timeout: Duration) -> Result<Request<Body>, BodyError> {
    let (parts, body) = req.into_parts();
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let bytes = tokio::time::timeout(timeout, collect(body, BODY_BYTES_MAX))
        .await
        .map_err(|_| BodyError::TimedOut { timeout_ms })??;
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

async fn collect(mut body: Incoming, limit_bytes: usize) -> Result<Bytes, BodyError> {
    let too_large = BodyError::TooLarge { limit_bytes };
    // `content-length` is known before a byte is read.
    let announced = body.size_hint().lower();
    if announced > limit_bytes as u64 {
        return Err(too_large);
    }
    let mut bytes = Vec::with_capacity(announced as usize);
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else { continue };
        if data.len() > limit_bytes - bytes.len() {
            return Err(too_large);
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Bytes::from(bytes))
}

/// Returns once `shutdown` says stop, or its sender is gone (nobody is
/// left to say otherwise). Holds no borrow of the value past its return.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdminLimits {
        AdminLimits { header_read_timeout_ms: 100, idle_timeout_ms: 1_000, ..AdminLimits::default() }
    }

    #[test]
    fn the_clock_follows_the_request_cycle() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let clock = ConnClock::new(&limits(), t0);
        assert_eq!(clock.deadline(), Some((t0 + ms(100), Phase::Head)));
        // Bytes of the first head do not move its deadline.
        clock.bytes_arrived(t0 + ms(50));
        assert_eq!(clock.deadline(), Some((t0 + ms(100), Phase::Head)));
        clock.request_started();
        assert_eq!(clock.deadline(), None);
        // Body bytes while busy change nothing.
        clock.bytes_arrived(t0 + ms(500));
        assert_eq!(clock.deadline(), None);
        clock.answer_ready(t0 + ms(600));
        assert_eq!(clock.deadline(), Some((t0 + ms(1_600), Phase::Idle)));
        // The next request's first byte starts its header timeout.
        clock.bytes_arrived(t0 + ms(900));
        assert_eq!(clock.deadline(), Some((t0 + ms(1_000), Phase::Head)));
        clock.bytes_arrived(t0 + ms(950));
        assert_eq!(clock.deadline(), Some((t0 + ms(1_000), Phase::Head)));
    }
}
