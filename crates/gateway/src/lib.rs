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
mod server;
mod shared;
mod ws;

use std::net::SocketAddr;

pub use hongbao_boundary::{Backend, TokenSigner};
pub use server::{start, Gateway};

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
    /// Pause after a failed `accept` (usually out of file descriptors), so
    /// the accept loop does not spin while the condition lasts.
    pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;
    /// Pending connections a listener queues before `accept` takes them: a
    /// reconnect storm arrives faster than one accept loop turns.
    pub const LISTEN_BACKLOG: u32 = 1024;

    use hongbao_core::limits::{CONNECTION_INFLIGHT_MAX, CONNECTION_OUTBOX_FRAMES_MAX};
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
/// Default seconds a new connection has to send `hello`.
pub const HELLO_TIMEOUT_S_DEFAULT: u32 = 10;
/// Default connection cap: a process may hold at most 20,000 file
/// descriptors here, and listeners, the database and logs need some.
pub const MAX_CONNECTIONS_DEFAULT: usize = 18_000;

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
    /// Join the listen ports' SO_REUSEPORT group, shared with the other
    /// gateway processes of this server (`serve --gateways N`).
    pub reuse_port: bool,
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
            reuse_port: false,
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
}
