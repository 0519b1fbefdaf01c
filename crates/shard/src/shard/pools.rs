//! Shake pools: each shard's share of every running campaign, released on
//! the clock, and the shakes that take from them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hongbao_boundary::sync::lock;
use hongbao_boundary::Responder;
use hongbao_core::campaign::ReleaseSchedule;
use hongbao_core::limits::{IDEMPOTENCY_KEY_BYTES_MAX, SHAKE_POOL_MAX};
use hongbao_core::{CampaignId, PacketId, UserId};
use hongbao_proto::{ErrorCode, Reply, ShakeResult};
use hongbao_store::ops::{FindShakeWin, FirstWin, ShakeWin, ShakeWon};
use hongbao_store::OpError;
use tokio::sync::oneshot;

use super::{Completed, ShardState, Unspent};
use crate::checks::{op_error, shake_label};
use crate::types::CampaignLive;

/// One shard's part of a running campaign: its release schedule, and the
/// packets it released that nobody has won yet.
pub(super) struct Pool {
    schedule: ReleaseSchedule,
    /// When this shard started releasing (engine clock, ms).
    started_ms: u64,
    released_count: u64,
    /// Released, not yet won: (packet id, amount).
    ready: VecDeque<(PacketId, i64)>,
    win_cap: Option<u32>,
    /// Wins per user in this campaign, kept only with a win cap.
    wins: HashMap<UserId, u32>,
    live: Arc<CampaignLive>,
    reported_exhausted: bool,
}

impl Pool {
    pub(super) fn ready_len(&self) -> usize {
        self.ready.len()
    }
}

fn won(first: FirstWin) -> ShakeResult {
    ShakeResult::Won { campaign: first.campaign, packet: first.packet, amount_fen: first.amount_fen }
}

fn count_shake(result: &ShakeResult) {
    metrics::counter!("hongbao_shakes_total", "result" => shake_label(result)).increment(1);
}

/// The answer to a shake whose win was handed to the writer: the win, or
/// the first win of its key (and the packet taken goes back).
fn shake_win_committed(
    r: Result<ShakeWon, OpError>,
    taken: FirstWin,
    user: UserId,
    completions: &tokio::sync::mpsc::UnboundedSender<Completed>,
    reply: Responder,
) {
    let unspent = |offer_again| {
        let FirstWin { campaign, packet, amount_fen } = taken;
        let _ = completions.send(Completed::ShakeUnspent(Unspent { campaign, packet, amount_fen, user, offer_again }));
    };
    let result = match r {
        Ok(ShakeWon::Won) => won(taken),
        Ok(ShakeWon::Repeat(first)) => {
            unspent(true);
            won(first)
        }
        // Not paid: the packet is offered again, and the shake may be retried.
        Err(OpError::Storage(_) | OpError::QueueFull) => {
            unspent(true);
            ShakeResult::Overload
        }
        // The packet was won already (a failed commit that reached the
        // disk): not offered again; this shake may be retried.
        Err(OpError::Stale(_)) => {
            unspent(false);
            ShakeResult::Overload
        }
        Err(e) => {
            unspent(true);
            return reply.send(op_error(e).to_reply());
        }
    };
    count_shake(&result);
    reply.send(Reply::Shake(result));
}

/// The answer to a keyed shake that found nothing to take: its key's first
/// win if it has one, else `miss`.
fn keyed_miss_found(r: Result<Option<FirstWin>, OpError>, miss: ShakeResult, reply: Responder) {
    let result = match r {
        Ok(Some(first)) => won(first),
        Ok(None) => miss,
        Err(OpError::QueueFull) => ShakeResult::Overload,
        Err(e) => return reply.send(op_error(e).to_reply()),
    };
    count_shake(&result);
    reply.send(Reply::Shake(result));
}

impl ShardState {
    pub(super) fn start_pool(
        &mut self,
        campaign: CampaignId,
        schedule: ReleaseSchedule,
        started_ms: u64,
        win_cap: Option<u32>,
        wins: HashMap<UserId, u32>,
        live: Arc<CampaignLive>,
    ) {
        let pool = Pool {
            schedule,
            started_ms,
            released_count: 0,
            ready: VecDeque::new(),
            win_cap,
            wins,
            live,
            reported_exhausted: false,
        };
        self.pools.insert(campaign, pool);
        // The first release is due at once.
        self.next_release_ms = self.clock.now_ms();
    }

    pub(super) fn stop_pool(&mut self, campaign: CampaignId, ack: oneshot::Sender<()>) {
        // Wins already handed to the writer stay; unreleased and
        // released-but-unwon money is still in escrow for the close.
        self.pools.remove(&campaign);
        let _ = ack.send(());
    }

    pub(super) fn shake_unspent(&mut self, unspent: Unspent) {
        let Unspent { campaign, packet, amount_fen, user, offer_again } = unspent;
        if let Some(pool) = self.pools.get_mut(&campaign) {
            if offer_again {
                pool.ready.push_front((packet, amount_fen));
                // It is on offer again: the pool is not spent after all, and
                // the campaign must not count this shard as done.
                if std::mem::take(&mut pool.reported_exhausted) {
                    pool.live.exhausted.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if let Some(wins) = pool.wins.get_mut(&user) {
                *wins = wins.saturating_sub(1);
            }
        }
        self.counters.shake_wins.fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) async fn shake(&mut self, user: UserId, campaign: CampaignId, key: Option<String>, reply: Responder) {
        self.counters.shakes.fetch_add(1, Ordering::Relaxed);
        if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > IDEMPOTENCY_KEY_BYTES_MAX) {
            let message = format!("shake key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes");
            return reply.send(Reply::error(ErrorCode::InvalidRequest, message));
        }
        let Some(pool_id) = self.pool_for(campaign) else {
            return self.shake_missed(user, key, ShakeResult::NotRunning, reply);
        };
        let pool = self.pools.get_mut(&pool_id).expect("pool exists");
        let capped = pool.win_cap.is_some_and(|cap| pool.wins.get(&user).copied().unwrap_or(0) >= cap);
        let taken = if capped { None } else { pool.ready.pop_front() };
        let Some((packet, amount_fen)) = taken else {
            // The common answer touches no storage and no other shard.
            return self.shake_missed(user, key, ShakeResult::None, reply);
        };
        if pool.win_cap.is_some() {
            *pool.wins.entry(user).or_insert(0) += 1;
        }
        self.counters.shake_wins.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = &key {
            *self.unsettled_keys.entry((user, key.clone())).or_insert(0) += 1;
        }
        let at_ms = self.clock.now_ms();
        let settled_key = key.clone();
        let op = ShakeWin { campaign: pool_id, packet, user, amount_fen, at_ms, key };
        let taken = FirstWin { campaign: pool_id, packet, amount_fen };
        let completions = self.completions.clone();
        let done = move |r| {
            if let Some(key) = settled_key {
                let _ = completions.send(Completed::KeySettled { user, key });
            }
            shake_win_committed(r, taken, user, &completions, reply)
        };
        self.writer.submit(op, done).await;
    }

    /// A keyed win handed to the writer has been settled.
    pub(super) fn key_settled(&mut self, user: UserId, key: String) {
        let entry = (user, key);
        if let Some(n) = self.unsettled_keys.get_mut(&entry) {
            *n -= 1;
            if *n == 0 {
                self.unsettled_keys.remove(&entry);
            }
        }
    }

    /// The pool a shake for `campaign` (0: any running one) takes from.
    fn pool_for(&self, campaign: CampaignId) -> Option<CampaignId> {
        if campaign != 0 {
            return self.pools.contains_key(&campaign).then_some(campaign);
        }
        // Any running campaign: prefer one with a packet ready.
        let ready = self.pools.iter().find(|(_, p)| !p.ready.is_empty());
        ready.or_else(|| self.pools.iter().next()).map(|(id, _)| *id)
    }

    /// A shake that found nothing to take. A keyed one answers its key's
    /// first win, whatever the pool holds now. Usually that is a read of
    /// committed wins (through the bounded read gate: a flood of keyed shakes
    /// costs the writer nothing). Only while a win of that very key is with
    /// the writer is the lookup queued to the writer, behind that win, so a
    /// retry racing its twin still sees the twin's win; a full writer queue
    /// answers `overload` rather than stall the shard.
    fn shake_missed(&self, user: UserId, key: Option<String>, miss: ShakeResult, reply: Responder) {
        let Some(key) = key else {
            count_shake(&miss);
            return reply.send(Reply::Shake(miss));
        };
        if self.unsettled_keys.contains_key(&(user, key.clone())) {
            self.writer.try_submit(FindShakeWin { user, key }, move |r| keyed_miss_found(r, miss, reply));
            return;
        }
        self.reads.reply_with(reply, Reply::Shake(ShakeResult::Overload), move |reader| {
            let result = match reader.first_shake_win(user, &key) {
                Ok(Some((campaign, packet, amount_fen))) => ShakeResult::Won { campaign, packet, amount_fen },
                Ok(None) => miss,
                Err(e) => return Reply::error(ErrorCode::Internal, e.to_string()),
            };
            count_shake(&result);
            Reply::Shake(result)
        });
    }

    /// Releases what each campaign share owes by now. A pool holding
    /// `SHAKE_POOL_MAX` unwon packets skips the releases due meanwhile
    /// (nobody is shaking): they are not piled up, and their money stays in
    /// escrow until the campaign closes.
    pub(super) fn release(&mut self) {
        let now_ms = self.clock.now_ms();
        let pool_ids: Vec<CampaignId> = self.pools.keys().copied().collect();
        for id in pool_ids {
            self.release_pool(id, now_ms);
            let pool = self.pools.get_mut(&id).expect("pool exists");
            let spent = !pool.schedule.allows(pool.released_count) || lock(&pool.live.budget).exhausted();
            if pool.ready.is_empty() && !pool.reported_exhausted && spent {
                pool.reported_exhausted = true;
                pool.live.exhausted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn release_pool(&mut self, id: CampaignId, now_ms: u64) {
        let pool = self.pools.get_mut(&id).expect("pool exists");
        let due = pool.schedule.due_after(now_ms.saturating_sub(pool.started_ms));
        if pool.released_count >= due || !pool.schedule.allows(pool.released_count) {
            return;
        }
        // The campaign's one budget, locked once for this tick's releases
        // (every shard draws from it: it pays what its rule says, however
        // many shards there are).
        let live = pool.live.clone();
        let mut budget = lock(&live.budget);
        let mut released = 0u64;
        let day = hongbao_core::ids::day_of_unix_ms(now_ms);
        loop {
            let pool = self.pools.get_mut(&id).expect("pool exists");
            if pool.released_count >= due || !pool.schedule.allows(pool.released_count) {
                break;
            }
            if pool.ready.len() >= SHAKE_POOL_MAX {
                // Nobody is shaking: what is due meanwhile is skipped, not
                // piled up; its money stays in escrow until the close.
                pool.released_count = due;
                break;
            }
            let Some(packet) = self.ids.next_id(day) else { break };
            let Some(amount) = budget.release_one(&mut self.rng) else { break };
            let pool = self.pools.get_mut(&id).expect("pool exists");
            pool.ready.push_back((packet, amount));
            pool.released_count += 1;
            released += 1;
        }
        drop(budget);
        live.released.fetch_add(released, Ordering::Relaxed);
        metrics::counter!("hongbao_campaign_released_total").increment(released);
        self.reserve_ids_if_needed(now_ms);
    }
}
