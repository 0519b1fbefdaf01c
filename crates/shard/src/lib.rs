//! The engine: shards that own packets, shake campaigns, the push hub and
//! group membership, wired to the group-commit writer of `hongbao-store`.
//!
//! Owns: one owner per packet (the shard named in its id), every operation on a
//! packet serialised in that shard's event loop, expiry timers and refunds,
//! each shard's share of running campaigns, per-user win caps, packet-id
//! blocks, and who is online (for push).
//!
//! Must not: know sockets, frames, JSON or HTTP (the gateway and the admin API
//! do), or write SQL (only `hongbao-store` does). No reply that reports moved
//! money leaves this crate before the writer says its record is committed.
//!
//! The boundary with the gateway is a message interface (`Engine::submit` with
//! a `Responder`), so the same engine serves the gateway in its process and,
//! through `hongbao-link`, gateways in other processes: their connections
//! have forwarding outboxes (`Outbox::forwarding`), and `GateView` lets them
//! answer empty shakes themselves.

mod engine;
mod outbox;
mod push;
mod shard;

pub use engine::{CampaignInfo, Engine, EngineConfig, EngineError, MoneyReceipt, Stats, TaskInfo};
/// How the store groups operations into transactions; see `Engine::open_with_commit_mode`.
pub use hongbao_store::CommitMode;
pub use outbox::{FrameSink, Outbox, OutboxReceiver, Responder};
pub use push::{Connection, PushReceipt, PushTarget};
pub use shard::{GateState, GateView};

#[cfg(test)]
mod tests;
