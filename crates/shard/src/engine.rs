//! `Engine`: the handle the gateway and the admin API hold.

use std::sync::Arc;

use hongbao_core::campaign::{AmountRule, CampaignSpec, CampaignStatus};
use hongbao_core::limits::PacketRules;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use hongbao_proto::{ErrorCode, PacketDetail, PushBody, Reply, Request, ShakeResult};
use hongbao_store::CommitMode;
use serde::Serialize;

use crate::outbox::Responder;
use crate::push::{PushReceipt, PushTarget};

/// Engine settings; `serve` fills them from flags, environment and TOML.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Number of shards (packet owners). Fixed for the life of a data
    /// directory's packets: ids carry their shard.
    pub shards: u16,
    pub packet_rules: PacketRules,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { shards: 4, packet_rules: PacketRules::default() }
    }
}

/// Errors at the engine boundary; each maps to one client error code and
/// one HTTP status in the admin API.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("insufficient funds: balance {balance_fen} fen, needs {needed_fen} fen")]
    InsufficientFunds { balance_fen: i64, needed_fen: i64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("idempotency key was used for a different request")]
    KeyConflict,
    #[error("server over capacity, retry later")]
    Overload,
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::Invalid(_) => ErrorCode::InvalidRequest,
            EngineError::InsufficientFunds { .. } => ErrorCode::InsufficientFunds,
            EngineError::NotFound(_) => ErrorCode::NotFound,
            EngineError::Conflict(_) => ErrorCode::InvalidRequest,
            EngineError::KeyConflict => ErrorCode::KeyConflict,
            EngineError::Overload => ErrorCode::Overload,
            EngineError::Internal(_) => ErrorCode::Internal,
        }
    }
    pub fn to_reply(&self) -> Reply {
        Reply::error(self.code(), self.to_string())
    }
}

/// Result of a deposit or withdrawal.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MoneyReceipt {
    pub user: UserId,
    pub amount_fen: i64,
    pub balance_fen: i64,
    /// True when this was a retry and the first result is returned.
    pub repeat: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CampaignInfo {
    pub id: CampaignId,
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
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TaskInfo {
    pub id: u64,
    /// `running`, `done` or `stopped`.
    pub state: String,
    pub targets: u64,
    pub delivered: u64,
    pub created_ms: u64,
}

/// Counters for `/v1/stats` and the dashboard.
#[derive(Clone, Debug, Serialize, Default)]
pub struct Stats {
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
    pub deposits_minus_withdrawals_fen: i64,
}

/// The running engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<crate::shard::Inner>,
}

impl Engine {
    /// Answers a plain shake at once, on the caller's thread, when the
    /// user's shard has no packet to give (see `answer_inline` in the shard
    /// module); `None` means: `submit` it.
    pub fn answer_inline(&self, user: UserId, req: &Request) -> Option<Reply> {
        self.inner.answer_inline(user, req)
    }

    /// A copy of every shard's shake gate, for a gateway in another process
    /// to answer shakes with (`GateView::answer`).
    pub fn gate_view(&self) -> crate::GateView {
        self.inner.gate_view()
    }

    /// Changes whenever `gate_view` would answer differently.
    pub fn gate_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.gate_changes()
    }

    /// Counts `n` shakes a remote gateway answered with `result` from its
    /// `GateView`, so the engine's shake counters include them.
    pub fn count_remote_shakes(&self, result: &ShakeResult, n: u64) {
        self.inner.count_inline_shakes(result, n)
    }

    /// Submits a client request on behalf of an authenticated user. Never
    /// waits: a full shard queue answers `Overload` (shakes: `ShakeResult::Overload`).
    /// `Hello` and `Ping` are the gateway's and answered with an error here.
    pub fn submit(&self, user: UserId, req: Request, reply: Responder) {
        self.inner.submit(user, req, reply)
    }

    /// `submit` for in-process callers.
    pub async fn call(&self, user: UserId, req: Request) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(user, req, Responder::Oneshot(tx));
        rx.await.unwrap_or_else(|_| Reply::error(ErrorCode::Internal, "engine stopped"))
    }

    pub async fn deposit(&self, user: UserId, amount_fen: i64, key: &str) -> Result<MoneyReceipt, EngineError> {
        self.inner.move_money(user, amount_fen, key, true).await
    }
    pub async fn withdraw(&self, user: UserId, amount_fen: i64, key: &str) -> Result<MoneyReceipt, EngineError> {
        self.inner.move_money(user, amount_fen, key, false).await
    }
    /// The committed balance.
    pub async fn balance(&self, user: UserId) -> Result<i64, EngineError> {
        self.inner.balance(user).await
    }

    /// Replaces a group's members (at most `GROUP_MEMBERS_MAX`).
    pub async fn set_group(&self, group: GroupId, members: Vec<UserId>) -> Result<Vec<UserId>, EngineError> {
        self.inner.change_group(group, members, Vec::new(), true).await
    }
    pub async fn add_members(&self, group: GroupId, members: Vec<UserId>) -> Result<Vec<UserId>, EngineError> {
        self.inner.change_group(group, members, Vec::new(), false).await
    }
    pub async fn remove_members(&self, group: GroupId, members: Vec<UserId>) -> Result<Vec<UserId>, EngineError> {
        self.inner.change_group(group, Vec::new(), members, false).await
    }
    pub fn group(&self, group: GroupId) -> Option<Vec<UserId>> {
        self.inner.group(group)
    }

    /// Creates a campaign and moves its total from the funder to its escrow.
    pub async fn create_campaign(&self, spec: CampaignSpec, key: &str) -> Result<CampaignInfo, EngineError> {
        self.inner.create_campaign(spec, key).await
    }
    pub async fn start_campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        self.inner.start_campaign(id).await
    }
    /// Stops releasing and returns everything not yet won to the funder.
    pub async fn stop_campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        self.inner.close_campaign(id, CampaignStatus::Stopped).await
    }
    pub async fn campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        self.inner.campaign(id).await
    }
    pub async fn campaigns(&self) -> Result<Vec<CampaignInfo>, EngineError> {
        self.inner.campaigns().await
    }

    /// Committed state of a packet and every claim.
    pub async fn packet_detail(&self, id: PacketId) -> Result<PacketDetail, EngineError> {
        self.inner.packet_detail(id).await
    }

    /// Unicast or multicast. Persistent messages are stored (durably) for
    /// every target and delivered now to those online; transient ones only go
    /// to those online.
    pub async fn push(&self, target: PushTarget, body: PushBody, persistent: bool) -> Result<PushReceipt, EngineError> {
        self.inner.push(target, body, persistent).await
    }
    /// Starts a transient broadcast to everyone online, as a stoppable task.
    pub fn broadcast(&self, body: PushBody) -> TaskInfo {
        self.inner.push_hub.broadcast(body)
    }
    pub fn task(&self, id: u64) -> Option<TaskInfo> {
        self.inner.push_hub.task(id)
    }
    pub fn stop_task(&self, id: u64) -> Option<TaskInfo> {
        self.inner.push_hub.stop_task(id)
    }
    pub fn tasks(&self) -> Vec<TaskInfo> {
        self.inner.push_hub.tasks()
    }

    /// Registers a connection for pushes; the returned guard unregisters it
    /// when dropped. Pending persistent messages are queued to `outbox` first.
    pub async fn connect(&self, user: UserId, outbox: crate::Outbox) -> Result<crate::Connection, EngineError> {
        self.inner.connect(user, outbox).await
    }

    pub async fn stats(&self) -> Stats {
        self.inner.stats().await
    }

    /// Stops taking requests, lets the writer commit what is queued, and stops.
    pub async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

impl Engine {
    /// Opens (or creates) the data directory, recovers every open packet,
    /// expiry timer, running campaign and id block, and starts the shards.
    pub async fn open(config: EngineConfig, data_dir: &std::path::Path) -> Result<Engine, EngineError> {
        Engine::open_with_commit_mode(config, CommitMode::Group, data_dir).await
    }

    /// `open` with a chosen commit mode. Benchmark use only: `hongbao perf
    /// opens` runs `CommitMode::PerOp` (one transaction and one fsync per
    /// operation) as its baseline. `serve` always uses `open`, i.e. group
    /// commit; no flag, variable or TOML key reaches this. Durability is the
    /// same in both modes: a reply that reports moved money is sent only
    /// after the transaction holding it has committed.
    pub async fn open_with_commit_mode(
        config: EngineConfig,
        commit_mode: CommitMode,
        data_dir: &std::path::Path,
    ) -> Result<Engine, EngineError> {
        crate::shard::Inner::open(config, commit_mode, data_dir).await.map(|inner| Engine { inner })
    }
}
