//! The internal link between gateway processes and the process that owns
//! the shards (`hongbao serve --gateways N`).
//!
//! Owns: the link's messages and framing (`wire`), the core's side (accepts
//! gateway links on a Unix socket, registers each remote connection with
//! the engine behind a forwarding outbox, and hands its requests to the
//! engine: `core_side`), and the gateway's side (`RemoteEngine`, the
//! gateway's `Backend` when the engine is in another process:
//! `gateway_side`).
//!
//! Must not: decide any outcome (the engine does), know client framing or
//! tokens (the gateway has authenticated the user before `Connect`), or wait
//! on a slow peer: every queue here is bounded and a full one sheds with
//! `overload`. Pushes, broadcasts and replies reach a connection through its
//! forwarding outbox, so the engine's push hub does not know whether a
//! connection is local or remote.
//!
//! Trust: the socket file is created mode 0600 inside the data directory,
//! and the first message must carry the link key the core gave its
//! gateways (through their environment), so only this server's own gateway
//! processes can speak for users.

pub mod core_side;
#[cfg(fuzzing)]
pub mod fuzz;
pub mod gateway_side;
mod wire;

pub use core_side::{LinkCensus, LinkListener, LinkServer};
pub use gateway_side::{connect_resilient, LinkClient, LinkSupervisor, LinkTarget, RemoteConnection, RemoteEngine};

/// Bounds of the link.
pub mod limits {
    /// Largest message on the link: a client frame or server frame plus a
    /// few bytes of envelope (a push body is bounded by the same limit).
    pub const MESSAGE_BYTES_MAX: usize = hongbao_proto::FRAME_BYTES_MAX + 1024;
    /// Messages queued for one link's writer before new requests (gateway
    /// side) or new frames (core side) are shed. A broadcast to a gateway's
    /// share of connections (at most ~18,000) fits with room to spare.
    pub const QUEUE_MESSAGES_MAX: usize = 65_536;
    /// Time a gateway has to send its `Hello` after connecting.
    pub const HELLO_TIMEOUT_MS: u64 = 5_000;
    /// Bytes read from the socket at a time.
    pub const READ_BUFFER_BYTES: usize = 256 * 1024;
}

/// What can go wrong on a link. Errors end that link (and so that gateway's
/// connections), never the server.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link socket {path}: {source}")]
    Socket { path: std::path::PathBuf, source: std::io::Error },
    #[error("cannot bind the link listener on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot reach the link at {target}: {source}")]
    Connect { target: String, source: std::io::Error },
    #[error("link i/o: {0}")]
    Io(std::io::Error),
    #[error("link message of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("cannot encode a link message: {0}")]
    Encode(String),
    #[error("undecodable link message: {0}")]
    Decode(String),
    #[error("link protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Timeout(String),
}
