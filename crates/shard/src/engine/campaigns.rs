//! Shake campaigns across shards: created and funded by the writer, split
//! over the shards when started (or resumed), closed exactly once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use hongbao_boundary::sync::lock;
use hongbao_boundary::EngineError;
use hongbao_core::campaign::{AmountRule, CampaignBudget, CampaignSpec, CampaignStatus, ReleaseSchedule};
use hongbao_core::ids::campaign_set;
use hongbao_core::{CampaignId, UserId};
use hongbao_store::ops::{CloseCampaign, CreateCampaign, StartCampaign};
use hongbao_store::CampaignRow;
use tokio::sync::oneshot;

use super::{Engine, Parts};
use crate::checks::{homed_here, op_error, valid_key};
use crate::clock::Clock;
use crate::shard::Event;
use crate::types::{CampaignInfo, CampaignLive};

/// How often a running campaign is checked for having run out, ms.
const FINISH_CHECK_MS: u64 = 100;

impl Engine {
    /// Creates a campaign and moves its total from the funder to its escrow.
    /// The funder must be homed on this SET (their balance is here). On a
    /// cluster the campaign is split over its SETs (`CampaignSpec::split`):
    /// this SET keeps its part, and the same commit sends every other SET
    /// its part's budget through the outbox (`fund`), which creates the part
    /// there, with the same id. The answer is this SET's part.
    pub async fn create_campaign(&self, spec: CampaignSpec, key: &str) -> Result<CampaignInfo, EngineError> {
        spec.validate().map_err(|e| EngineError::Invalid(e.to_string()))?;
        homed_here(spec.funder, self.parts.set)?;
        valid_key(key)?;
        let (set, sets) = (self.parts.set.set(), self.parts.set.sets());
        let parts =
            if sets > 1 { spec.split(sets).map_err(|e| EngineError::Invalid(e.to_string()))? } else { Vec::new() };
        let op = CreateCampaign { spec, key: key.to_owned(), at_ms: self.parts.clock.now_ms(), set, parts };
        let created = self.parts.writer.run(op).await.map_err(op_error)?;
        self.campaign(created.id).await
    }

    pub async fn start_campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        let guard = self.parts.campaign_control.lock().await;
        let row = self.campaign_row(id).await?;
        match row.status {
            CampaignStatus::Running => {}
            CampaignStatus::Created => {
                self.parts.writer.run(StartCampaign { id }).await.map_err(op_error)?;
                self.run_pools(&row).await?;
            }
            closed => return Err(EngineError::Conflict(format!("campaign {id} is {}", closed.as_str()))),
        }
        drop(guard);
        self.campaign(id).await
    }

    /// Stops releasing and returns everything not yet won to the funder.
    pub async fn stop_campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        self.close_campaign(id, CampaignStatus::Stopped).await
    }

    pub async fn campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        let row = self.campaign_row(id).await?;
        Ok(self.campaign_info(&row))
    }

    pub async fn campaigns(&self) -> Result<Vec<CampaignInfo>, EngineError> {
        let rows = self.read(|r| r.campaigns()).await?;
        Ok(rows.iter().map(|r| self.campaign_info(r)).collect())
    }

    async fn campaign_row(&self, id: CampaignId) -> Result<CampaignRow, EngineError> {
        self.read(move |r| r.campaign(id)).await?.ok_or_else(|| EngineError::NotFound(format!("campaign {id}")))
    }

    fn campaign_info(&self, row: &CampaignRow) -> CampaignInfo {
        let live = lock(&self.parts.live_campaigns).get(&row.id).map(|l| l.released.load(Ordering::Relaxed));
        let released = live.or_else(|| lock(&self.parts.closed_released).get(&row.id).copied()).unwrap_or(0);
        CampaignInfo {
            id: row.id,
            funder: row.spec.funder,
            total_fen: row.spec.total_fen,
            rule: row.spec.rule,
            rate_per_s: row.spec.rate_per_s,
            win_cap_per_user: row.spec.win_cap_per_user,
            status: row.status,
            created_ms: row.created_ms,
            released,
            won: row.won,
            won_fen: row.won_fen,
            refunded_fen: row.refunded_fen,
            escrow_fen: row.escrow_fen,
        }
    }

    /// Starts every shard releasing on its part of the schedule, all from
    /// one budget of what is left of the campaign, with a watcher that closes
    /// the campaign once every shard is exhausted. Called with
    /// `campaign_control` held.
    pub(super) async fn run_pools(&self, row: &CampaignRow) -> Result<(), EngineError> {
        let id = row.id;
        let packets_left = match row.spec.rule {
            AmountRule::Count { packets } => Some(packets.saturating_sub(row.won)),
            AmountRule::Range { .. } => None,
        };
        let shards = self.shard_count() as u32;
        let schedules = ReleaseSchedule::for_shards(row.spec.rate_per_s, shards, packets_left);
        let wins_by_shard = self.wins_by_shard(row).await?;
        let live =
            Arc::new(CampaignLive::new(CampaignBudget::new(row.spec.rule, row.escrow_fen, packets_left.unwrap_or(0))));
        lock(&self.parts.live_campaigns).insert(id, live.clone());
        let started_ms = self.parts.clock.now_ms();
        for ((schedule, wins), shard) in schedules.into_iter().zip(wins_by_shard).zip(&self.parts.shards) {
            let win_cap = row.spec.win_cap_per_user;
            let ev = Event::StartPool { campaign: id, schedule, started_ms, win_cap, wins, live: live.clone() };
            shard.tx.send(ev).await.map_err(|_| EngineError::Internal("shard stopped".into()))?;
        }
        let clock = self.parts.clock.clone();
        tokio::spawn(close_when_finished(Arc::downgrade(&self.parts), clock, id, live, shards));
        Ok(())
    }

    /// Each shard's users' wins so far, for win caps (empty without a cap).
    async fn wins_by_shard(&self, row: &CampaignRow) -> Result<Vec<HashMap<UserId, u32>>, EngineError> {
        let mut by_shard: Vec<HashMap<UserId, u32>> = vec![HashMap::new(); self.parts.shards.len()];
        if row.spec.win_cap_per_user.is_some() {
            let id = row.id;
            for (u, n) in self.read(move |r| r.win_counts(id)).await? {
                by_shard[self.user_shard(u)].insert(u, n);
            }
        }
        Ok(by_shard)
    }

    pub(super) async fn close_campaign(
        &self,
        id: CampaignId,
        status: CampaignStatus,
    ) -> Result<CampaignInfo, EngineError> {
        let guard = self.parts.campaign_control.lock().await;
        let row = self.campaign_row(id).await?;
        if row.status.is_closed() {
            drop(guard);
            return self.campaign(id).await;
        }
        // Every shard stops releasing and acknowledges after its last win is
        // queued; the writer is FIFO, so the close commits after every win.
        for shard in &self.parts.shards {
            let (ack, done) = oneshot::channel();
            if shard.tx.send(Event::StopPool { campaign: id, ack }).await.is_ok() {
                let _ = done.await;
            }
        }
        let released = lock(&self.parts.live_campaigns).remove(&id);
        if let Some(live) = released {
            let count = live.released.load(Ordering::Relaxed);
            lock(&self.parts.closed_released).insert(id, count);
        }
        // A part of another SET's campaign refunds through that SET.
        let home = Some(campaign_set(id)).filter(|&h| h != self.parts.set.set());
        let op = CloseCampaign { id, status, at_ms: self.parts.clock.now_ms(), home };
        self.parts.writer.run(op).await.map_err(op_error)?;
        drop(guard);
        self.campaign(id).await
    }
}

/// Closes campaign `id` as finished once all `shards` report their share
/// exhausted; ends early if the campaign is stopped (its `live` replaced or
/// removed) or the engine is gone.
async fn close_when_finished(parts: Weak<Parts>, clock: Clock, id: CampaignId, live: Arc<CampaignLive>, shards: u32) {
    loop {
        clock.sleep_until(clock.now_ms() + FINISH_CHECK_MS).await;
        let Some(parts) = parts.upgrade() else { return };
        let current = lock(&parts.live_campaigns).get(&id).is_some_and(|l| Arc::ptr_eq(l, &live));
        if !current {
            return;
        }
        if live.exhausted.load(Ordering::Relaxed) < shards {
            continue;
        }
        match (Engine { parts }).close_campaign(id, CampaignStatus::Finished).await {
            Ok(info) => {
                tracing::info!(campaign = id, won = info.won, refunded_fen = info.refunded_fen, "campaign finished")
            }
            Err(e) => tracing::warn!(campaign = id, error = %e, "closing a finished campaign failed"),
        }
        return;
    }
}
