//! Shard event loops (stub; being implemented).
use std::sync::Arc;

use hongbao_core::campaign::{CampaignSpec, CampaignStatus};
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use hongbao_proto::{PacketDetail, PushBody, Request};

use crate::engine::*;
use crate::outbox::{Outbox, Responder};
use crate::push::{Connection, PushHub, PushReceipt, PushTarget};

pub(crate) struct Inner {
    pub(crate) push_hub: Arc<PushHub>,
}

#[allow(unused_variables)]
impl Inner {
    pub(crate) fn submit(&self, user: UserId, req: Request, reply: Responder) { todo!() }
    pub(crate) async fn move_money(&self, user: UserId, amount_fen: i64, key: &str, deposit: bool) -> Result<MoneyReceipt, EngineError> { todo!() }
    pub(crate) async fn balance(&self, user: UserId) -> Result<i64, EngineError> { todo!() }
    pub(crate) async fn change_group(&self, group: GroupId, add: Vec<UserId>, remove: Vec<UserId>, replace: bool) -> Result<Vec<UserId>, EngineError> { todo!() }
    pub(crate) fn group(&self, group: GroupId) -> Option<Vec<UserId>> { todo!() }
    pub(crate) async fn create_campaign(&self, spec: CampaignSpec, key: &str) -> Result<CampaignInfo, EngineError> { todo!() }
    pub(crate) async fn start_campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> { todo!() }
    pub(crate) async fn close_campaign(&self, id: CampaignId, status: CampaignStatus) -> Result<CampaignInfo, EngineError> { todo!() }
    pub(crate) async fn campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> { todo!() }
    pub(crate) async fn campaigns(&self) -> Result<Vec<CampaignInfo>, EngineError> { todo!() }
    pub(crate) async fn packet_detail(&self, id: PacketId) -> Result<PacketDetail, EngineError> { todo!() }
    pub(crate) async fn push(&self, target: PushTarget, body: PushBody, persistent: bool) -> Result<PushReceipt, EngineError> { todo!() }
    pub(crate) async fn connect(&self, user: UserId, outbox: Outbox) -> Result<Connection, EngineError> { todo!() }
    pub(crate) async fn stats(&self) -> Stats { todo!() }
    pub(crate) async fn shutdown(&self) { todo!() }
}
impl Inner {
    pub(crate) async fn open(config: EngineConfig, data_dir: &std::path::Path) -> Result<Arc<Inner>, EngineError> { let _ = (config, data_dir); todo!() }
}
