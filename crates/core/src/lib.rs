//! Pure domain model of hongbao: money, ledger rules, split rules, packets,
//! campaigns, packet ids, SETs, what SETs tell each other (`cross`) and the
//! limits that bound everything.
//!
//! Architecture invariant: this crate does no I/O. It knows nothing about
//! sockets, SQL, JSON, threads or clocks; time arrives as plain milliseconds and
//! randomness as a `rand::Rng` argument, so every rule here is deterministic
//! under test and can be property-tested.
//!
//! Money is integer fen (`i64`), and every arithmetic step on money is checked.
//! A broken money invariant inside this crate is a bug and asserts; invalid
//! requests from peers are returned as typed errors.
//!
//! With the optional `openapi` feature (only `hongbao-admin` enables it), the
//! types the admin API shows derive `utoipa::ToSchema`, and `openapi` holds
//! the schemas no type derives; without it no schema code is compiled.

pub mod audit;
pub mod campaign;
pub mod cross;
pub mod ids;
pub mod ledger;
pub mod limits;
pub mod packet;
pub mod sets;
pub mod split;

#[cfg(feature = "openapi")]
pub mod openapi;

/// A user id as issued by the app server. Kept below 2^53 so that it survives
/// a round trip through JSON numbers in browsers.
pub type UserId = u64;
/// A packet id: the SET that made it and its owning shard in the high bits,
/// a per-shard sequence below (`ids`).
pub type PacketId = u64;
pub type GroupId = u64;
pub type CampaignId = u64;

/// Largest user, group or campaign id accepted anywhere (2^53 - 1).
pub const ID_MAX: u64 = (1 << 53) - 1;
