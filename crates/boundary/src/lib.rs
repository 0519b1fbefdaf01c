//! The boundary between the edge (gateways, the admin API, links to other
//! processes) and the engine (shards, the push hub, storage): the types both
//! sides exchange, in one small crate both depend on.
//!
//! Owns: the request/response seam (`Backend`: what a gateway asks of an
//! engine, wherever that engine runs; `LinkedEngine`: what the engine offers
//! a link to gateways in other processes, shake gates included), where replies and pushes
//! for one connection go (`Outbox`, `Responder`, `FrameSink`), the boundary
//! error (`EngineError`) with its client error code, the shake gate as a
//! remote gateway sees it (`GateView`), client token signing
//! (`TokenSigner`), which the gateway verifies and the admin API issues,
//! and the constant-time comparison of keys a peer presents
//! (`constant_time_eq`).
//!
//! Must not: hold money logic, packet state, SQL, sockets or HTTP. It links
//! no engine and no database, so a gateway process that depends on it alone
//! stays a relay (`cargo tree -p hongbao-gateway -e normal` shows neither
//! `hongbao-shard`, `hongbao-store` nor `rusqlite`).

mod backend;
mod error;
mod gate;
pub mod listen;
pub mod outbox;
pub mod sync;
pub mod token;

pub use backend::{Backend, LinkedEngine};
pub use error::EngineError;
pub use gate::{inline_shake_result, GateState, GateView};
pub use outbox::{FrameSink, Outbox, OutboxReceiver, Overflow, Responder};
pub use token::{constant_time_eq, AuthError, TokenSigner, TOKEN_BYTES_MAX, USER_ID_MAX};
