//! The types the engine's parts share and its callers see. A leaf: it
//! imports nothing else of this crate.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Mutex;

use hongbao_core::campaign::{AmountRule, CampaignBudget, CampaignStatus};
use hongbao_core::limits::PacketRules;
use hongbao_core::sets::{SetId, SetMap};
use hongbao_core::{CampaignId, UserId};
use serde::Serialize;

use crate::clock::Clock;

/// Engine settings; `serve` fills them from flags, environment and TOML.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Number of shards (packet owners). Fixed for the life of a data
    /// directory's packets: ids carry their shard.
    pub shards: u16,
    /// Which SET of the cluster this engine is: it makes packet ids of this
    /// SET only, and serves only the users homed on it. A single node is
    /// SET 0 of 1 (the default), which owns every user.
    pub set: SetMap,
    pub packet_rules: PacketRules,
    /// Where the engine reads the time.
    pub clock: Clock,
    /// Seeds every random draw (shares, releases): the same seed and the
    /// same requests in the same order give the same amounts.
    pub seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: 4,
            set: SetMap::single(),
            packet_rules: PacketRules::default(),
            clock: Clock::system(),
            seed: rand::random(),
        }
    }
}

/// Result of a deposit or withdrawal.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MoneyReceipt {
    // `value_type` here and below: utoipa does not see through type aliases.
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub user: UserId,
    pub amount_fen: i64,
    pub balance_fen: i64,
    /// True when this was a retry and the first result is returned.
    pub repeat: bool,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CampaignInfo {
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub id: CampaignId,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub funder: UserId,
    pub total_fen: i64,
    pub rule: AmountRule,
    pub rate_per_s: u32,
    pub win_cap_per_user: Option<u32>,
    pub status: CampaignStatus,
    pub created_ms: u64,
    /// Packets released since the server started (in memory; not durable).
    pub released: u64,
    pub won: u64,
    pub won_fen: i64,
    pub refunded_fen: i64,
    /// Money still in the campaign's escrow.
    pub escrow_fen: i64,
}

/// A broadcast task's progress.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TaskInfo {
    pub id: u64,
    /// `running`, `stopping`, `done` or `stopped`.
    #[cfg_attr(feature = "openapi", schema(schema_with = task_state_schema))]
    pub state: String,
    pub targets: u64,
    pub delivered: u64,
    pub created_ms: u64,
}

/// `TaskInfo::state` in the OpenAPI document: a string, one of four.
#[cfg(feature = "openapi")]
fn task_state_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(["running", "stopping", "done", "stopped"]))
        .description(Some("`running`, `stopping`, `done` or `stopped`."))
        .build()
}

/// Counters for `/v1/stats` and the dashboard.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, Default)]
pub struct Stats {
    /// This engine's SET (0 on a single node).
    #[cfg_attr(feature = "openapi", schema(value_type = u8))]
    pub set: SetId,
    /// The SETs in the cluster (1 on a single node).
    pub sets: u8,
    pub shards: u16,
    pub connections: u64,
    pub users_online: u64,
    pub packets_in_memory: u64,
    pub campaigns_running: u64,
    pub shakes: u64,
    pub shake_wins: u64,
    pub opens: u64,
    pub commits: u64,
    pub committed_ops: u64,
    pub writer_queue_depth: u64,
    pub shard_queue_depth: u64,
    pub user_balances_fen: i64,
    pub packet_escrow_fen: i64,
    pub campaign_escrow_fen: i64,
    /// What this SET owes the other SETs of its cluster, net: shares of its
    /// packets paid to users homed elsewhere, less the shares of their
    /// packets paid here (0 on a single node). Users + escrows + this =
    /// deposits - withdrawals.
    pub transit_fen: i64,
    pub deposits_minus_withdrawals_fen: i64,
    /// Cross-SET outbox rows the transport has not yet handed to its broker.
    pub cross_backlog: u64,
}

/// Request counters the shards add to and `Engine::stats` reads.
#[derive(Default)]
pub(crate) struct Counters {
    pub shakes: AtomicU64,
    pub shake_wins: AtomicU64,
    pub opens: AtomicU64,
    pub packets_in_memory: AtomicU64,
}

/// A running campaign as its shards share it: the money they all release
/// from, and live counters the engine reads (its status, and when to close
/// it as finished).
pub(crate) struct CampaignLive {
    /// Locked for one release at a time: a few per second per shard.
    pub budget: Mutex<CampaignBudget>,
    pub released: AtomicU64,
    /// Shards that can release nothing more and whose pool is empty.
    pub exhausted: AtomicU32,
}

impl CampaignLive {
    pub fn new(budget: CampaignBudget) -> CampaignLive {
        CampaignLive { budget: Mutex::new(budget), released: AtomicU64::new(0), exhausted: AtomicU32::new(0) }
    }
}
