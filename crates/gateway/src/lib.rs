//! The gateway: where client connections end.
//!
//! Owns: the client sockets (raw TCP with binary frames, WebSocket with JSON
//! text or binary frames), framing and decoding, the `hello` handshake
//! (tokens verified with `hongbao_boundary::TokenSigner`), heartbeats and
//! idle timeouts, and the bounds on each connection (frame size, requests in
//! flight, queued replies). It hands every authenticated request to its
//! `Backend` (`hongbao-boundary`) — the engine in the same process, or
//! `hongbao-link`'s remote engine in an extra gateway process (`serve
//! --gateways N`, listeners in one SO_REUSEPORT group) — and writes back
//! whatever comes into the connection's outbox.
//!
//! Must not: hold money logic, packet state or SQL, or link them: it
//! depends on the boundary crate, never on the engine or the store. The
//! gateway never decides an outcome; it only answers `ping`, refuses bad
//! input and sheds load (`overload`) before the engine sees it. Only this
//! crate knows WebSocket and JSON.
//!
//! Layout, read in one direction: `server` (listeners, admission) starts
//! `conn` (one connection's loop), which reads and writes through `io`
//! (raw TCP) and `ws` (WebSocket); those sit on `codec` (frames); `shared`
//! is what every connection task holds.
//!
//! Architecture invariant: peer input never panics the server. Every refusal
//! is a typed error that becomes a `Close { code, message }` frame (fatal) or
//! a `Reply::Error` (not fatal).

mod codec;
mod conn;
#[cfg(fuzzing)]
pub mod fuzz;
mod io;
mod park;
mod server;
mod shared;
mod ws;

use std::net::SocketAddr;

pub use hongbao_boundary::{Backend, TokenSigner};
pub use server::{start, Gateway, OpenConnections};

/// Gateway-only limits. Shared ones (frame size, outbox, in-flight) live in
/// `hongbao_core::limits`.
pub mod limits {
    /// A write to a peer that takes longer than this closes the connection as
    /// a slow consumer; otherwise one stuck reader would pin its task forever.
    pub const WRITE_TIMEOUT_S: u64 = 10;
    /// Frames written to the socket in one go (one syscall, one flush) when
    /// several are queued in the outbox.
    pub const WRITE_BATCH_FRAMES_MAX: usize = 64;
    /// Connections refused over capacity that may be in their WebSocket
    /// handshake at once, just to be told `overload`. Beyond this they are
    /// dropped without a word: telling a flood why costs as much as serving it.
    pub const REJECTS_INFLIGHT_MAX: usize = 64;
    /// How long a refused connection gets to receive its `Close` frame.
    pub const REJECT_TIMEOUT_S: u64 = 2;
    /// Shortest token secret accepted outside dev mode (HMAC-SHA256 wants
    /// at least as many secret bytes as a guess would need to cover).
    pub const TOKEN_SECRET_BYTES_MIN: usize = 16;
    /// Frames one connection handles before it lets the others on its
    /// worker run. A client with one request at a time never reaches it; a
    /// flood of pipelined requests on one connection no longer delays every
    /// other connection by all it has queued (a ping's p99 was 67 ms behind
    /// 256 flooding connections on one core).
    pub const FRAMES_PER_TURN_MAX: u8 = 16;
    /// First pause of a connection's reading after it was told `overload`.
    pub const OVERLOAD_PAUSE_MIN_MS: u16 = 5;
    /// Longest such pause, reached while overloads continue (doubling).
    /// Short against any timeout a client has, long enough that a flood of
    /// pipelined requests cannot keep a saturated server busy refusing it.
    pub const OVERLOAD_PAUSE_MAX_MS: u16 = 160;
    /// Pending connections a listener queues before `accept` takes them: a
    /// reconnect storm arrives faster than one accept loop turns.
    pub const LISTEN_BACKLOG: u32 = 1024;

    /// Largest frame body (binary body, or whole WebSocket message) accepted
    /// before `hello` succeeds. A peer that has not authenticated is nobody
    /// yet: it may make the server buffer one small frame, not 64 KiB (1,900
    /// such peers each holding 65,535 bytes of a frame took 129 MB). A hello
    /// is one token of at most `TOKEN_BYTES_MAX` bytes plus at most
    /// `HELLO_JSON_OVERHEAD_BYTES_MAX` around it (JSON with the largest id;
    /// the binary form needs 13: id varint, variant, length varint); the
    /// rest is slack for whitespace a JSON encoder may add.
    pub const HELLO_FRAME_BYTES_MAX: usize = 2 * TOKEN_BYTES_MAX;
    /// Bytes a hello needs besides its token: the JSON form with the largest id.
    pub const HELLO_JSON_OVERHEAD_BYTES_MAX: usize =
        r#"{"id":18446744073709551615,"req":{"hello":{"token":""}}}"#.len();
    /// Default share of `max_connections` that may be waiting for `hello` at
    /// once (`max_pending_hello = max_connections / this`, but at least
    /// `PENDING_HELLO_DEFAULT_MIN`): the rest stays for authenticated
    /// clients however many strangers connect. A real client is pending for
    /// one round trip, so even a reconnect storm of every client fits
    /// through it in a few turns.
    pub const PENDING_HELLO_SHARE_DIVISOR: usize = 4;
    /// Smallest default `max_pending_hello` (unless `max_connections` is
    /// smaller): a small server still lets a burst of handshakes through.
    pub const PENDING_HELLO_DEFAULT_MIN: usize = 1024;
    /// Default share of `max_pending_hello` one source address (an IPv6 /64)
    /// may hold (`max_pending_hello_per_ip = max_pending_hello / this`, but
    /// at least `PENDING_HELLO_PER_IP_DEFAULT_MIN`): one address cycling
    /// connections leaves at least half the pending room to everyone else.
    pub const PENDING_HELLO_PER_IP_SHARE_DIVISOR: usize = 2;
    /// Smallest default `max_pending_hello_per_ip` (unless
    /// `max_pending_hello` is smaller): many clients share one address
    /// behind a NAT, and a host opening connections in bulk (`hongbao perf`
    /// sets up 256 at a time from each address) may have a few hundred
    /// handshakes under way at once.
    pub const PENDING_HELLO_PER_IP_DEFAULT_MIN: usize = 256;
    /// Capacity below which the table of pending connections per source
    /// address is not shrunk: small enough to be no memory worth giving
    /// back, large enough that a steady trickle of connections does not
    /// shrink and regrow it.
    pub const PENDING_TABLE_SHRINK_MIN: usize = 1024;
    /// How long a slow consumer's close gets: the rest of the write it was
    /// cut off in (so the close frame starts on a frame boundary), the
    /// `Close { slow_consumer }` frame, and the shutdown. A peer that reads
    /// at all frees room in its receive window within a round trip; one
    /// that read nothing while 256 frames queued will not in this time, and
    /// its connection is already unregistered meanwhile.
    pub const SLOW_CONSUMER_CLOSE_MS: u64 = 500;

    use hongbao_boundary::TOKEN_BYTES_MAX;
    use hongbao_core::limits::{CONNECTION_INFLIGHT_MAX, CONNECTION_OUTBOX_FRAMES_MAX, FRAME_BYTES_MAX};
    // The longest genuine hello fits before hello, and is all that does.
    const _: () = assert!(TOKEN_BYTES_MAX + HELLO_JSON_OVERHEAD_BYTES_MAX <= HELLO_FRAME_BYTES_MAX);
    const _: () = assert!(HELLO_FRAME_BYTES_MAX < FRAME_BYTES_MAX / 64);
    // Past the minimums, some room is always left to authenticated clients
    // and to others than the first address.
    const _: () = assert!(PENDING_HELLO_SHARE_DIVISOR >= 2 && PENDING_HELLO_PER_IP_SHARE_DIVISOR >= 2);
    // With the default minimums, one address leaves others a share too.
    const _: () = assert!(PENDING_HELLO_PER_IP_DEFAULT_MIN * 2 < PENDING_HELLO_DEFAULT_MIN);
    // A slow consumer is cut off well before a stuck write would time out.
    const _: () = assert!(SLOW_CONSUMER_CLOSE_MS * 10 <= WRITE_TIMEOUT_S * 1000);
    // A batch never needs more frames than the outbox can hold.
    const _: () = assert!(WRITE_BATCH_FRAMES_MAX <= CONNECTION_OUTBOX_FRAMES_MAX);
    // Every in-flight request's reply must fit in the outbox next to pushes.
    const _: () = assert!(CONNECTION_INFLIGHT_MAX < CONNECTION_OUTBOX_FRAMES_MAX);
}

/// Default seconds between client heartbeats, announced in `Welcome`.
pub const HEARTBEAT_S_DEFAULT: u32 = 30;
/// Default seconds without any frame before a connection is closed: three
/// missed heartbeats.
pub const IDLE_TIMEOUT_S_DEFAULT: u32 = 90;
/// Default seconds of nothing but heartbeats before a connection parks.
/// Long against the gaps between a busy user's requests (a user shaking
/// during a campaign is not parked and woken at every shake), short against
/// the heartbeat interval of an idle phone (minutes), so an evening's idle
/// connections spend most of their time parked.
pub const PARK_AFTER_S_DEFAULT: u32 = 30;
/// Default seconds a new connection has to send `hello`.
pub const HELLO_TIMEOUT_S_DEFAULT: u32 = 10;
/// Default connection cap: a process may hold at most 20,000 file
/// descriptors here, and listeners, the database and logs need some.
pub const MAX_CONNECTIONS_DEFAULT: usize = 18_000;

/// Default cap on connections waiting for `hello`, for a connection cap: a
/// quarter of it (4,500 of the default 18,000), at least 1,024, at most all.
pub fn max_pending_hello_default(max_connections: usize) -> usize {
    (max_connections / limits::PENDING_HELLO_SHARE_DIVISOR).max(limits::PENDING_HELLO_DEFAULT_MIN).min(max_connections)
}

/// Default cap on connections waiting for `hello` from one source address,
/// for a `max_pending_hello`: half of it (2,250 by default), at least 256,
/// at most all.
pub fn max_pending_hello_per_ip_default(max_pending_hello: usize) -> usize {
    (max_pending_hello / limits::PENDING_HELLO_PER_IP_SHARE_DIVISOR)
        .max(limits::PENDING_HELLO_PER_IP_DEFAULT_MIN)
        .min(max_pending_hello)
}

/// Everything `start` needs besides the engine.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Raw TCP (binary frames) listen address; port 0 picks a free port.
    pub tcp_addr: SocketAddr,
    /// WebSocket listen address; port 0 picks a free port.
    pub ws_addr: SocketAddr,
    /// Accept a bare decimal user id as a token. Local runs only.
    pub dev: bool,
    /// Verifies `hello` tokens.
    pub signer: TokenSigner,
    /// Heartbeat interval the client is told to keep.
    pub heartbeat_s: u32,
    /// Seconds without a frame from the client before it is closed.
    pub idle_timeout_s: u32,
    /// Seconds a new connection has to complete `hello` (and, for WebSocket,
    /// the HTTP upgrade before it).
    pub hello_timeout_s: u32,
    /// Connections held at once across both listeners (of this process).
    pub max_connections: usize,
    /// Of those, connections that have not completed `hello` yet (from
    /// accept, WebSocket upgrade included). Over it a new connection is
    /// refused (`overload`): strangers cannot take the slots of clients.
    pub max_pending_hello: usize,
    /// Connections waiting for `hello` from one source address (an IPv6
    /// /64). Behind a proxy every client has the proxy's address: set it
    /// to `max_pending_hello` there.
    pub max_pending_hello_per_ip: usize,
    /// Join the listen ports' SO_REUSEPORT group, shared with the other
    /// gateway processes of this server (`serve --gateways N`).
    pub reuse_port: bool,
    /// Seconds with nothing but heartbeats after which a connection parks:
    /// it gives up its task and its place in tokio's reactor until the
    /// peer, a push or a deadline wakes it (`park`). 0: never.
    pub park_after_s: u32,
}

impl GatewayConfig {
    /// A config with the default timeouts and connection cap.
    pub fn new(tcp_addr: SocketAddr, ws_addr: SocketAddr, signer: TokenSigner) -> GatewayConfig {
        GatewayConfig {
            tcp_addr,
            ws_addr,
            dev: false,
            signer,
            heartbeat_s: HEARTBEAT_S_DEFAULT,
            idle_timeout_s: IDLE_TIMEOUT_S_DEFAULT,
            hello_timeout_s: HELLO_TIMEOUT_S_DEFAULT,
            max_connections: MAX_CONNECTIONS_DEFAULT,
            max_pending_hello: max_pending_hello_default(MAX_CONNECTIONS_DEFAULT),
            max_pending_hello_per_ip: max_pending_hello_per_ip_default(max_pending_hello_default(
                MAX_CONNECTIONS_DEFAULT,
            )),
            reuse_port: false,
            park_after_s: PARK_AFTER_S_DEFAULT,
        }
    }

    fn validate(&self) -> Result<(), GatewayError> {
        let invalid = |m: &str| Err(GatewayError::Config(m.to_string()));
        if self.heartbeat_s == 0 || self.idle_timeout_s == 0 || self.hello_timeout_s == 0 {
            return invalid("heartbeat_s, idle_timeout_s and hello_timeout_s must be positive");
        }
        if self.idle_timeout_s <= self.heartbeat_s {
            return invalid("idle_timeout_s must exceed heartbeat_s, or a well-behaved client is cut off");
        }
        if self.max_connections == 0 || self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return invalid("max_connections out of range");
        }
        if self.max_pending_hello == 0 || self.max_pending_hello > self.max_connections {
            return invalid("max_pending_hello must be between 1 and max_connections");
        }
        if self.max_pending_hello_per_ip == 0 || self.max_pending_hello_per_ip > self.max_pending_hello {
            return invalid("max_pending_hello_per_ip must be between 1 and max_pending_hello");
        }
        if !self.dev && self.signer.secret_len() < limits::TOKEN_SECRET_BYTES_MIN {
            return invalid("token secret too short (at least 16 bytes outside dev mode)");
        }
        Ok(())
    }
}

/// Why the gateway could not start or stopped badly. Errors on one
/// connection never surface here; they close that connection.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid gateway config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("accept loop failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot set up the epoll set for idle connections: {0}")]
    Parking(std::io::Error),
}
