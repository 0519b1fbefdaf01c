//! The engine: shards that own packets, shake campaigns, the push hub and
//! group membership, wired to the group-commit writer of `hongbao-store`.
//!
//! Owns: one owner per packet (the shard named in its id; the engine is one
//! SET of a cluster and owns only its SET's packets and users), every operation on a
//! packet serialised in that shard's event loop, expiry timers and refunds,
//! each shard's share of running campaigns, per-user win caps, packet-id
//! blocks, and who is online (for push).
//!
//! Must not: know sockets, frames, JSON or HTTP (the gateway and the admin API
//! do), or write SQL (only `hongbao-store` does). No reply that reports moved
//! money leaves this crate before the writer says its record is committed.
//!
//! The boundary with the gateway is `hongbao-boundary`'s message interface
//! (`Backend`: `submit` with a `Responder`), so the same engine serves the
//! gateway in its process and, through `hongbao-link`, gateways in other
//! processes: their connections have forwarding outboxes, and the shake
//! gates they copy (`GatePublisher`) let them answer empty shakes themselves.
//!
//! Layout, read in one direction: `engine` (the control plane: recovery,
//! routing, money, groups, campaigns, pushes, stats) drives `shard` (the data
//! plane: one event loop per shard; `packets` and `pools` by concern), and
//! both use the leaves `push`, `gate`, `reads`, `types`, `checks` and `clock`. No
//! module imports one that imports it.
//!
//! Time and randomness come in through `EngineConfig` (`clock`, `seed`), so
//! the engine's tests run on tokio's paused clock with a printed seed.

mod checks;
mod clock;
mod engine;
mod gate;
mod push;
mod reads;
mod shard;
mod types;

pub use clock::Clock;
pub use engine::Engine;
/// What SETs tell each other (the cross-SET transport's wire types).
pub use hongbao_core::cross::{CrossBody, CrossKey, CrossKind, CrossMessage};
pub use hongbao_core::sets::SetId;
/// How the store groups operations into transactions (the benchmark baseline).
#[cfg(any(test, feature = "per-op-baseline"))]
pub use hongbao_store::CommitMode;
pub use hongbao_store::{StorageFailure, StoreLocation};
pub use push::{Connection, PushReceipt, PushTarget};
pub use types::{CampaignInfo, EngineConfig, MoneyReceipt, Stats, TaskInfo};

#[cfg(test)]
mod tests;
