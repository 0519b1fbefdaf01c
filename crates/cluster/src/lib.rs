//! The cluster's shape as every process sees it, and the gateway's router.
//!
//! A cluster is SETs (WeChat's unit: a slice of packet ids and of users,
//! with its own engine and its own database; the `hongbao set` process) and
//! gateways (connections only; `hongbao gateway`). This crate owns:
//! - `config`: the cluster file (`cluster.toml`) every process reads — the
//!   SETs in order (a SET's number is its place in the list), where each one
//!   listens for gateway links and its admin API, its store and shards, and
//!   the directory of the cluster's shared secrets;
//! - `router`: `ClusterBackend`, the gateway's `Backend` over one resilient
//!   link per SET, which sends each request to the SET that owns it (a
//!   packet's by its id, everything else by the user's home SET) and
//!   registers each connection for pushes with its home SET only;
//! - `directory`: the gateway directory in Redis (`hb:gateway:<id>` keys
//!   with a TTL), which gateways are alive for clients and operators: the
//!   gateways' refresh task and the cluster admin's listing.
//!
//! Must not: decide any outcome, hold money, packet state or SQL, or link an
//! engine or a store (`cargo tree -p hongbao-cluster -e normal` shows neither
//! `hongbao-shard` nor `hongbao-store`): a gateway that routes stays a relay.
//! Which SET owns what is `hongbao_core::sets`' rule, applied here and
//! checked again by every SET's engine.

pub mod config;
pub mod directory;
pub mod router;

pub use config::{ClusterConfigError, ClusterFile, SetEntry};
pub use directory::{Directory, DirectoryError, GatewayEntry};
pub use router::{ClusterBackend, ClusterConnection};
