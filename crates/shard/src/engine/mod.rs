//! The control plane: `Engine`, the handle the gateway and the admin API
//! hold. It recovers state at start-up, routes each client request to the
//! shard that owns it (or answers it inline), and runs what is not a
//! packet's: money in and out, groups, campaigns across shards, pushes and
//! stats.
//!
//! The engine is one SET of a cluster (`EngineConfig::set`; a single node is
//! SET 0 of 1). It makes packet ids of its SET only, and refuses what is
//! not its own: a packet id of another SET, and any request by a user homed
//! on another SET but one about a packet of this SET (`checks::foreign_user`,
//! `foreign_packet`). A packet of this SET may be sent to, and opened by,
//! users homed anywhere: what they are owed goes through the cross-SET
//! outbox (`cross`), which the transport between SETs moves.
//!
//! Reads in one direction: this module drives the shards (`crate::shard`),
//! the push hub and the writer; none of them knows it.

mod campaigns;
mod cross;
mod groups;
mod messages;
mod money;
mod requests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hongbao_boundary::{EngineError, GateView};
use hongbao_core::campaign::CampaignStatus;
use hongbao_core::ids::{set_of, shard_of, IdAllocator};
use hongbao_core::limits::{self, ID_BLOCK_SIZE};
use hongbao_core::packet::Packet;
use hongbao_core::sets::SetMap;
use hongbao_core::{CampaignId, GroupId, UserId};
use hongbao_store::ops::{Close, ReserveIds};
use hongbao_store::{Reader, Store, StoreLocation, Writer};
use rand::SeedableRng;
use tokio::sync::{oneshot, watch};

use crate::checks::{op_error, store_error};
use crate::clock::Clock;
use crate::push::PushHub;
use crate::reads::Reads;
use crate::shard::{self, Event, ShardHandle, ShardSetup};
use crate::types::{CampaignLive, Counters, EngineConfig, Stats};

/// The running engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    parts: Arc<Parts>,
}

/// Everything the engine holds, behind one `Arc`.
struct Parts {
    /// Which SET this engine is: what it owns.
    set: SetMap,
    clock: Clock,
    push_hub: Arc<PushHub>,
    shards: Vec<ShardHandle>,
    writer: Writer,
    /// Every read of storage goes through this bounded gate.
    reads: Arc<Reads>,
    /// Group membership; read when a packet is sent, written by the admin API.
    groups: RwLock<HashMap<GroupId, Arc<[UserId]>>>,
    /// Serialises campaign starts and stops.
    campaign_control: tokio::sync::Mutex<()>,
    /// Serialises group changes, so the in-memory map follows commit order.
    group_control: tokio::sync::Mutex<()>,
    live_campaigns: Mutex<HashMap<CampaignId, Arc<CampaignLive>>>,
    /// Release counts of campaigns closed by this process, so their status
    /// still says how many were released (in memory only, like releases).
    closed_released: Mutex<HashMap<CampaignId, u64>>,
    counters: Arc<Counters>,
    shutting_down: AtomicBool,
    gate_changes: Arc<watch::Sender<u64>>,
    /// `hongbao_shakes_total{result=none|not_running}`, made once: the
    /// `counter!` macro looks its labels up in the registry on every call,
    /// which on the busiest path of all was a few percent of server CPU.
    inline_shake_counters: (metrics::Counter, metrics::Counter),
}

/// What recovery read from storage.
struct Recovered {
    marks: HashMap<u16, u64>,
    packets_by_shard: Vec<Vec<Packet>>,
    groups: HashMap<GroupId, Vec<UserId>>,
}

impl Engine {
    /// Opens (or creates) the data directory, recovers every open packet,
    /// expiry timer, running campaign and id block, and starts the shards.
    pub async fn open(config: EngineConfig, data_dir: &std::path::Path) -> Result<Engine, EngineError> {
        Engine::open_at(config, &StoreLocation::Sqlite(data_dir.to_owned())).await
    }

    /// `open` on the store at `location`: SQLite in a data directory, or a
    /// PostgreSQL database.
    pub async fn open_at(config: EngineConfig, location: &StoreLocation) -> Result<Engine, EngineError> {
        let location = location.clone();
        Engine::start(config, move || Store::open_at(&location)).await
    }

    /// `open` with the transaction-per-operation baseline that `hongbao perf
    /// opens` measures group commit against (feature `per-op-baseline`,
    /// which only the measuring tools enable). Durability is the same in
    /// both modes: a reply that reports moved money is sent only after the
    /// transaction holding it has committed.
    #[cfg(any(test, feature = "per-op-baseline"))]
    pub async fn open_with_commit_mode(
        config: EngineConfig,
        commit_mode: hongbao_store::CommitMode,
        location: &StoreLocation,
    ) -> Result<Engine, EngineError> {
        let location = location.clone();
        Engine::start(config, move || Store::open_with(&location, commit_mode)).await
    }

    async fn start(
        config: EngineConfig,
        open_store: impl FnOnce() -> Result<Store, hongbao_store::StoreError> + Send + 'static,
    ) -> Result<Engine, EngineError> {
        if config.shards == 0 || config.shards as usize > limits::SHARDS_MAX {
            return Err(EngineError::Invalid(format!("shards must be between 1 and {}", limits::SHARDS_MAX)));
        }
        // Opening and the recovery reads block (and a PostgreSQL client may
        // not even be used on a runtime thread): both run off the runtime.
        let (shards, set) = (config.shards, config.set);
        let (writer, reader, recovered) = tokio::task::spawn_blocking(move || {
            let Store { writer, reader, writer_thread } = open_store().map_err(store_error)?;
            match recover(&reader, shards, set) {
                Ok(recovered) => Ok((writer, reader, recovered)),
                Err(refused) => {
                    // Let go of the store (its lock) before answering: the
                    // next start, with the configuration fixed, must not
                    // find it held by this one. The writer stops once its
                    // last handle is gone.
                    drop((writer, reader));
                    let _ = writer_thread.join();
                    Err(refused)
                }
            }
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))??;
        tracing::info!(seed = config.seed, "engine random seed (EngineConfig::seed reproduces its draws)");
        let engine = Engine::start_shards(config, writer, Reads::new(Arc::new(reader)), recovered).await?;
        engine.resume_campaigns().await?;
        Ok(engine)
    }

    async fn start_shards(
        config: EngineConfig,
        writer: Writer,
        reads: Arc<Reads>,
        recovered: Recovered,
    ) -> Result<Engine, EngineError> {
        let Recovered { marks, packets_by_shard, groups } = recovered;
        let hub = PushHub::new(config.clock.clone());
        let counters = Arc::new(Counters::default());
        let gate_changes = Arc::new(watch::channel(0u64).0);
        let open_packets: usize = packets_by_shard.iter().map(Vec::len).sum();
        let mut shards = Vec::with_capacity(packets_by_shard.len());
        for (index, packets) in packets_by_shard.into_iter().enumerate() {
            let index = index as u16;
            let today = hongbao_core::ids::day_of_unix_ms(config.clock.now_ms());
            let mark = marks.get(&index).copied().unwrap_or(0);
            let mut ids = IdAllocator::new(config.set.set(), index, mark, ID_BLOCK_SIZE, today);
            // Reserve the first block before taking any request.
            let mark = ids.request_next_block();
            writer.run(ReserveIds { shard: index, mark }).await.map_err(op_error)?;
            ids.extend(mark);
            let setup = ShardSetup {
                index,
                set: config.set,
                ids,
                // Each shard draws from its own stream of the one seed.
                rng: rand::rngs::SmallRng::seed_from_u64(config.seed ^ (u64::from(index) << 48)),
                clock: config.clock.clone(),
                writer: writer.clone(),
                reads: reads.clone(),
                hub: hub.clone(),
                rules: config.packet_rules.clone(),
                counters: counters.clone(),
                gate_changes: gate_changes.clone(),
            };
            shards.push(shard::spawn(setup, packets));
        }
        tracing::info!(
            set = config.set.set(),
            sets = config.set.sets(),
            shards = config.shards,
            open_packets,
            "engine recovered"
        );
        let parts = Parts {
            set: config.set,
            clock: config.clock.clone(),
            push_hub: hub,
            shards,
            writer,
            reads,
            groups: RwLock::new(groups.into_iter().map(|(g, m)| (g, Arc::from(m))).collect()),
            campaign_control: tokio::sync::Mutex::new(()),
            group_control: tokio::sync::Mutex::new(()),
            live_campaigns: Mutex::new(HashMap::new()),
            closed_released: Mutex::new(HashMap::new()),
            counters,
            shutting_down: AtomicBool::new(false),
            gate_changes,
            inline_shake_counters: (
                metrics::counter!("hongbao_shakes_total", "result" => "none"),
                metrics::counter!("hongbao_shakes_total", "result" => "not_running"),
            ),
        };
        Ok(Engine { parts: Arc::new(parts) })
    }

    /// Which SET this engine is, of how many.
    pub fn set(&self) -> SetMap {
        self.parts.set
    }

    fn shard_count(&self) -> u16 {
        self.parts.shards.len() as u16
    }

    /// The shard that takes a user's shakes and sends and holds their
    /// campaign wins (and win caps). The users homed on this SET are
    /// `k · sets + set`, so it is `k` that is spread over the shards:
    /// `user % shards` would leave shards without a user whenever `sets`
    /// and `shards` share a factor (SET 1 of 2 has only odd users; with 4
    /// shards, shards 0 and 2 would get none, and their part of a campaign
    /// would never be won). On a single node `k` is the user id.
    fn user_shard(&self, user: UserId) -> usize {
        hongbao_core::sets::user_shard(user, self.parts.set.sets(), self.parts.shards.len())
    }

    /// Runs a read of committed state off the async threads, through the
    /// bounded gate (`overload` when too many reads are queued).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, hongbao_store::StoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        self.parts.reads.run(f).await
    }

    /// Microseconds each of the writer's latest commits took, oldest first.
    pub fn recent_commit_us(&self) -> Vec<u32> {
        self.parts.writer.stats.recent_commit_us()
    }

    /// What is wrong with storage while it fails (`None`: it works). Money
    /// cannot move meanwhile; it recovers by itself. The writer finds out
    /// when a commit fails, or, idle, when its check of the connection does.
    pub fn storage_failure(&self) -> Option<hongbao_store::StorageFailure> {
        self.parts.writer.failure()
    }

    /// Every shard's gate, and the SET count that with them names a user's
    /// shard (`core::sets::user_shard`), for a gateway in another process.
    pub fn gate_view(&self) -> GateView {
        GateView { gates: self.parts.shards.iter().map(|s| s.gate.state()).collect(), sets: self.parts.set.sets() }
    }

    /// Changes whenever `gate_view` would answer differently.
    pub fn gate_changes(&self) -> watch::Receiver<u64> {
        self.parts.gate_changes.subscribe()
    }

    pub async fn stats(&self) -> Stats {
        let p = &self.parts;
        // Running totals the writer keeps as it commits: no read of storage.
        let totals = p.writer.committed.totals();
        Stats {
            set: p.set.set(),
            sets: p.set.sets(),
            shards: self.shard_count(),
            connections: p.push_hub.connections(),
            users_online: p.push_hub.users_online(),
            packets_in_memory: p.counters.packets_in_memory.load(Ordering::Relaxed),
            campaigns_running: hongbao_boundary::sync::lock(&p.live_campaigns).len() as u64,
            shakes: p.counters.shakes.load(Ordering::Relaxed),
            shake_wins: p.counters.shake_wins.load(Ordering::Relaxed),
            opens: p.counters.opens.load(Ordering::Relaxed),
            commits: p.writer.stats.commits.load(Ordering::Relaxed),
            committed_ops: p.writer.stats.committed_ops.load(Ordering::Relaxed),
            writer_queue_depth: p.writer.queue_depth(),
            shard_queue_depth: p.shards.iter().map(|s| (s.tx.max_capacity() - s.tx.capacity()) as u64).sum(),
            user_balances_fen: totals.user_balances_fen,
            packet_escrow_fen: totals.packet_escrow_fen,
            campaign_escrow_fen: totals.campaign_escrow_fen,
            transit_fen: totals.transit_fen,
            deposits_minus_withdrawals_fen: -totals.world_fen,
            cross_backlog: p.writer.cross_backlog(),
        }
    }

    /// Stops taking requests, lets the writer commit what is queued, and stops.
    pub async fn shutdown(&self) {
        let p = &self.parts;
        if p.shutting_down.swap(true, Ordering::Relaxed) {
            return;
        }
        let _guard = p.campaign_control.lock().await;
        hongbao_boundary::sync::lock(&p.live_campaigns).clear();
        for shard in &p.shards {
            let (ack, done) = oneshot::channel();
            if shard.tx.send(Event::Shutdown { ack }).await.is_ok() {
                let _ = done.await;
            }
        }
        // Everything acknowledged is already committed; closing the writer
        // commits whatever is still queued, so those requests get answers
        // too, and releases the data directory.
        let _ = p.writer.run(Close).await;
        tracing::info!("engine stopped");
    }

    /// After a test moved the clock: every shard fires what is due, then
    /// everything they handed to the writer commits.
    #[cfg(test)]
    pub(crate) async fn catch_up(&self) {
        for shard in &self.parts.shards {
            let (ack, done) = oneshot::channel();
            if shard.tx.send(Event::CatchUp { ack }).await.is_ok() {
                let _ = done.await;
            }
        }
        let _ = self.parts.writer.run(hongbao_store::ops::Barrier).await;
    }

    /// Restarts the pools of every campaign that was running.
    async fn resume_campaigns(&self) -> Result<(), EngineError> {
        for row in self.read(|r| r.campaigns()).await? {
            if row.status == CampaignStatus::Running {
                let _guard = self.parts.campaign_control.lock().await;
                self.run_pools(&row).await?;
                tracing::info!(campaign = row.id, "campaign resumed");
            }
        }
        Ok(())
    }
}

/// Reads what the shards start from: id marks, open packets by shard, and
/// groups. Data of another SET (or of more shards) is refused: its packets
/// would be owned here by no one.
fn recover(reader: &Reader, shards: u16, set: SetMap) -> Result<Recovered, EngineError> {
    let marks = reader.id_marks().map_err(store_error)?;
    let open_packets = reader.open_packets().map_err(store_error)?;
    let groups = reader.groups().map_err(store_error)?;
    if let Some(p) = open_packets.iter().find(|p| !set.owns_packet(p.id)) {
        return Err(EngineError::Invalid(format!(
            "the data has open packets of SET {} (packet {}) but this engine is SET {} of {}; \
             open it as the SET that wrote it",
            set_of(p.id),
            p.id,
            set.set(),
            set.sets()
        )));
    }
    if let Some(p) = open_packets.iter().find(|p| shard_of(p.id) >= shards) {
        return Err(EngineError::Invalid(format!(
            "the data has open packets of shard {} but only {shards} shards are configured; use at least {}",
            shard_of(p.id),
            shard_of(p.id) + 1
        )));
    }
    let mut packets_by_shard: Vec<Vec<Packet>> = (0..shards).map(|_| Vec::new()).collect();
    for p in open_packets {
        packets_by_shard[shard_of(p.id) as usize].push(p);
    }
    Ok(Recovered { marks, packets_by_shard, groups })
}
