//! The shapes of the live contract (docs/api.md, "Live figures"): one
//! `Snapshot` per second and what the sampler reads from the engine to
//! build one. Field names are the contract the dashboard is built on; do
//! not rename them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything the dashboard shows for one second. Every per-second figure
/// covers the second ending at `at_ms`; `null` where that second had no
/// data (a latency without requests).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    /// 1 for the first snapshot after start, then +1 each.
    pub seq: u64,
    /// Unix ms at the end of the second.
    pub at_ms: u64,
    pub connections: Connections,
    /// Per operation with traffic in the second (`shake`, `open`, `grab`,
    /// `send`, `detail`, `balance`, `ack`, `ping`, …). Figures of the serve
    /// process's own gateway: with `--gateways N`, its 1/N share.
    pub ops: BTreeMap<String, OpFigures>,
    /// Shakes per second by result, over every gateway (engine counters).
    pub shakes: Shakes,
    pub wins_per_s: u64,
    pub opens_per_s: u64,
    pub sends_per_s: u64,
    pub commit: Commit,
    pub queues: Queues,
    pub overload_per_s: Overload,
    pub money: Money,
    pub storage: Storage,
    pub campaigns: Campaigns,
    /// Alerts firing at `at_ms` (the detector has judged this second).
    pub alerts_firing: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Connections {
    /// Sum of `gateways`.
    pub total: u64,
    /// Parked connections of the serve process's gateway
    /// (`hongbao_connections_parked`; other gateway processes do not
    /// export theirs).
    pub parked: u64,
    pub gateways: Vec<GatewayConnections>,
}

/// Connections held by one gateway process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GatewayConnections {
    /// `serve` for the serve process's own gateway, `gateway-N` for the others.
    pub name: String,
    pub pid: u32,
    pub connections: u64,
}

/// One operation's second.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OpFigures {
    /// Requests answered.
    pub count: u64,
    /// Of those, the ones the server did: everything but `overload`,
    /// `unavailable`, `internal` and `shutting_down` (a refusal such as
    /// `finished` or `insufficient_funds` is the server doing its work).
    pub ok: u64,
    /// `ok / count`; `null` without requests.
    pub success_ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Shakes {
    pub won: u64,
    pub none: u64,
    pub not_running: u64,
    pub overload: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Commit {
    /// Durable commits (batches) in the second.
    pub commits_per_s: u64,
    /// Ops per commit in the second: mean and p99.
    pub batch_ops_mean: Option<f64>,
    pub batch_ops_p99: Option<f64>,
    /// How long a commit took.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Depths at `at_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Queues {
    /// Ops waiting for the writer.
    pub writer: u64,
    /// Events waiting in the shards' queues, summed.
    pub shard: u64,
}

/// Requests refused `overload` per second, by where the bound was hit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Overload {
    pub total: u64,
    pub shard_queue: u64,
    pub storage_reads: u64,
}

/// The committed money totals at `at_ms`, fen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Money {
    pub user_balances_fen: i64,
    pub packet_escrow_fen: i64,
    pub campaign_escrow_fen: i64,
    /// Money between nodes (0 on one node).
    pub in_flight_fen: i64,
    pub deposits_minus_withdrawals_fen: i64,
    /// balances + packet escrow + campaign escrow + in flight ==
    /// deposits − withdrawals.
    pub balanced: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Storage {
    /// `false` while the store fails (the server answers `unavailable`).
    pub up: bool,
    pub failure: Option<StorageFailure>,
}

/// Why storage fails, as `/health` says it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StorageFailure {
    pub reason: String,
    pub since_ms: u64,
    pub failed_tries: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Campaigns {
    pub running: u64,
    pub released_per_s: u64,
}

/// What the sampler asks of the engine each second: levels and totals the
/// metrics do not carry. Filled by whoever owns the engine (`serve`), so
/// this crate links no engine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineReading {
    /// Client connections over every gateway process.
    pub connections: u64,
    pub campaigns_running: u64,
    pub writer_queue_depth: u64,
    pub shard_queue_depth: u64,
    pub user_balances_fen: i64,
    pub packet_escrow_fen: i64,
    pub campaign_escrow_fen: i64,
    pub in_flight_fen: i64,
    pub deposits_minus_withdrawals_fen: i64,
    pub storage_failure: Option<StorageFailure>,
}

impl EngineReading {
    pub(crate) fn money(&self) -> Money {
        let held = [self.user_balances_fen, self.packet_escrow_fen, self.campaign_escrow_fen, self.in_flight_fen]
            .iter()
            .try_fold(0i64, |sum, v| sum.checked_add(*v));
        Money {
            user_balances_fen: self.user_balances_fen,
            packet_escrow_fen: self.packet_escrow_fen,
            campaign_escrow_fen: self.campaign_escrow_fen,
            in_flight_fen: self.in_flight_fen,
            deposits_minus_withdrawals_fen: self.deposits_minus_withdrawals_fen,
            // An overflowing sum does not balance anything.
            balanced: held == Some(self.deposits_minus_withdrawals_fen),
        }
    }
}
