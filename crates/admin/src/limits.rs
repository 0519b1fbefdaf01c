//! Every bound of the admin HTTP server, in one place, with the reason for
//! its value. The timeouts and the connection cap are defaults of
//! `AdminLimits` (so tests can shorten them); the rest are fixed.
//!
//! Who connects here: a few operators and their scripts, one or two
//! Prometheus servers, the bench. None of them needs more than a handful of
//! connections or more than a few milliseconds to send a request, so every
//! bound below is generous for them and short for a peer that holds a
//! connection open without using it (the "slowloris" of issue 9).

/// Largest request body accepted. The biggest legitimate body is a group of
/// `GROUP_MEMBERS_MAX` (500) ids, well under 16 KiB; 64 KiB leaves room for
/// long notices without letting one request buffer megabytes. Bodies are
/// read whole before routing, so this times `ADMIN_CONNECTIONS_MAX` is the
/// most request bodies can hold at once: 64 KiB × 64 = 4 MiB.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Admin connections held at once; one more is closed as soon as it is
/// accepted (`hongbao_admin_connections_rejected_total`). The clients above
/// use fewer than ten. Each connection is a file descriptor taken from the
/// same per-process budget as the gateway's clients (20,000 here, 18,000 of
/// them for `max_connections`), so the cap keeps a flood of admin
/// connections from starving the gateway of descriptors, and it bounds what
/// a peer can hold before the timeouts below catch up with it.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;

/// From accept (or the first byte of a request on a kept-alive connection)
/// to the end of the request head. curl, ureq and Prometheus send the head
/// in one packet, so 10 s is generous even over a congested link; a peer
/// that sends half a head and stops holds a connection for at most this.
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// From the end of the head to the end of the body. At most
/// `BODY_BYTES_MAX` arrives in this time: a client must send at least
/// 13 KiB/s, trivial for any client we have (they send the body with the
/// head). A body that does not arrive in time is answered 408 with
/// `Connection: close`. Shorter than `SHUTDOWN_GRACE_MS`, so a body still
/// arriving when shutdown begins may finish.
pub const BODY_READ_TIMEOUT_MS: u64 = 5_000;

/// From a response handed to the connection to the first byte of the next
/// request: how long a kept-alive connection may sit idle (it also bounds
/// how long a peer may take to read its response). Four scrapes at
/// Prometheus' default 15 s interval, so a scraper keeps one connection;
/// an idle connection is a file descriptor and a slot under the cap.
pub const IDLE_TIMEOUT_MS: u64 = 60_000;

/// After the shutdown signal: how long requests already being served get to
/// finish before their connections are dropped. An admin request is a few
/// engine calls (a commit is milliseconds) after its body, which gets its
/// full `BODY_READ_TIMEOUT_MS`. `serve` waits 10 s for the whole admin API
/// (`STOP_TIMEOUT`, asserted there to be longer) before it goes on without
/// it, so the server task ends on its own first.
pub const SHUTDOWN_GRACE_MS: u64 = 8_000;

/// Largest request head (request line and headers) hyper buffers. The
/// longest legitimate head is a path, a host, an API key and a few
/// standard headers, well under 1 KiB; hyper refuses a bigger head with 431.
/// hyper's own floor for this setting is 8 KiB.
pub const HEADER_BYTES_MAX: usize = 16 * 1024;

/// `/v1/live` streams at once; one more is answered 503 `overload`. A
/// stream is a dashboard tab left open: a few operators' screens, each
/// holding an admin connection for as long as it is open, so the cap keeps
/// most of `ADMIN_CONNECTIONS_MAX` for the API itself. Each stream costs a
/// connection and a small task; the snapshots it sends are shared.
pub const LIVE_STREAMS_MAX: usize = 8;

/// A `: keepalive` comment goes down a live stream after this long without
/// an event (snapshots come every second, so only while the sampler is
/// stalled): proxies and browsers drop connections silent for longer, and
/// it is well inside `IDLE_TIMEOUT_MS`, which a stream's progress renews.
pub const LIVE_KEEPALIVE_MS: u64 = 15_000;

/// The cluster admin (`cluster`): how long one call to a SET's admin API
/// may take, connect, request and whole answer together. A SET answers an
/// admin call in milliseconds (a commit, a read through its gate); 5 s is
/// the time after which the operator is better told "that SET does not
/// answer" than kept waiting. Shorter than `SHUTDOWN_GRACE_MS`, so a request
/// waiting on one SET at shutdown may finish.
pub const SET_CALL_TIMEOUT_MS: u64 = 5_000;

/// The cluster admin's calls to SETs in flight at once, over all SETs; more
/// wait for a place (each waits at most `SET_CALL_TIMEOUT_MS` once it has
/// one). Each is a connection to a SET's admin API, whose own cap is
/// `ADMIN_CONNECTIONS_MAX`: the cluster admin takes at most half of it,
/// leaving the rest to Prometheus and operators who talk to the SET
/// directly. 32 is a whole fan-out over the largest cluster (`SETS_MAX`).
pub const SET_CALLS_MAX: usize = 32;

/// The largest answer read from a SET. The biggest legitimate ones are a
/// packet's detail (100 claims), a group (500 ids) and the task list (128
/// tasks): tens of KiB. An answer past it is an error naming the SET.
pub const SET_ANSWER_BYTES_MAX: usize = 1024 * 1024;

// Relations between the bounds.
const _: () = assert!(ADMIN_CONNECTIONS_MAX >= 1);
// hyper panics below 8 KiB.
const _: () = assert!(HEADER_BYTES_MAX >= 8 * 1024);
const _: () = assert!(HEADER_READ_TIMEOUT_MS >= 1 && BODY_READ_TIMEOUT_MS >= 1 && IDLE_TIMEOUT_MS >= 1);
// A request whose body is still arriving at shutdown may finish.
const _: () = assert!(BODY_READ_TIMEOUT_MS < SHUTDOWN_GRACE_MS);
// Live streams leave most connections to the API.
const _: () = assert!(LIVE_STREAMS_MAX * 4 <= ADMIN_CONNECTIONS_MAX);
// A stream that only sends keep-alives is not idle.
const _: () = assert!(LIVE_KEEPALIVE_MS < IDLE_TIMEOUT_MS);
// A keep-alive connection outlives a Prometheus scrape interval (15 s).
const _: () = assert!(IDLE_TIMEOUT_MS > 15_000);
// A request the cluster admin holds for a SET's answer may finish at shutdown.
const _: () = assert!(SET_CALL_TIMEOUT_MS < SHUTDOWN_GRACE_MS);
// The cluster admin takes at most half of a SET's connections.
const _: () = assert!(SET_CALLS_MAX >= 1 && SET_CALLS_MAX * 2 <= ADMIN_CONNECTIONS_MAX);
