//! The data plane: shard event loops.
//!
//! A shard is one tokio task looping over a closed `Event` enum. It owns its
//! packets, its timers, its share of each running campaign and its id
//! allocator; nothing else touches them, so no lock guards packet state.
//! Money-moving decisions are made here in memory and then handed to the
//! group-commit writer; the reply is sent by the writer's completion, i.e.
//! only after the record is durable. If storage fails the writer stops and
//! nothing more is acknowledged; a restart rebuilds shards from the database.
//!
//! `packets` holds sends, grabs, opens and expiry; `pools` holds the shake
//! pools and their releases; this file the loop and what it dispatches.

mod packets;
mod pools;
mod rate;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use hongbao_boundary::Responder;
use hongbao_core::campaign::ReleaseSchedule;
use hongbao_core::ids::{self, set_of, shard_of, IdAllocator};
use hongbao_core::limits::{self, COMMIT_BATCH_RECORDS_MAX, WRITER_QUEUE_MAX};
use hongbao_core::packet::Packet;
use hongbao_core::sets::SetMap;
use hongbao_core::{CampaignId, PacketId, UserId};
use hongbao_store::Writer;
use rand::rngs::SmallRng;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::gate::ShakeGate;
use crate::push::PushHub;
use crate::reads::Reads;
use crate::types::{CampaignLive, Counters};

pub(crate) use packets::SendArgs;
use pools::Pool;
use rate::SendLimits;

/// How long a finished or refunded packet stays in memory for cheap repeat
/// answers; after that, questions about it are answered from storage.
const RETAIN_CLOSED_MS: u64 = 60_000;
/// How often shards release campaign packets, ms.
const RELEASE_TICK_MS: u64 = 10;
/// Requests a shard handles before it looks at its timers again.
const DRAIN_MAX: usize = 256;
/// How long before midnight (UTC) a shard reserves the next day's first ids.
const RESERVE_TOMORROW_WITHIN_MS: u64 = 60_000;
/// The most writer completions that can wait for a shard at once. Each is
/// the answer to one operation this shard handed to the writer, so they
/// are bounded by what the writer holds (its queue, and the batch it is
/// committing) plus what one turn of the loop submits before it drains
/// them again. That is why the completions channel needs no bound of its
/// own, and why it must not have one: the writer thread would block on a
/// shard that is itself waiting for room in the writer's queue.
const COMPLETIONS_QUEUED_MAX: usize = WRITER_QUEUE_MAX + COMMIT_BATCH_RECORDS_MAX + DRAIN_MAX;

/// What the engine asks of a shard, in its bounded queue.
pub(crate) enum Event {
    Shake {
        user: UserId,
        campaign: CampaignId,
        key: Option<String>,
        reply: Responder,
    },
    Grab {
        user: UserId,
        packet: PacketId,
        reply: Responder,
    },
    Open {
        user: UserId,
        packet: PacketId,
        reply: Responder,
    },
    /// A send whose recipients were resolved (group members snapshotted).
    Send {
        user: UserId,
        send: Box<SendArgs>,
        reply: Responder,
    },
    StartPool {
        campaign: CampaignId,
        schedule: ReleaseSchedule,
        /// When the campaign (re)started: one time for every shard, so that
        /// together they release exactly the campaign's rate.
        started_ms: u64,
        win_cap: Option<u32>,
        wins: HashMap<UserId, u32>,
        live: Arc<CampaignLive>,
    },
    /// Stop releasing; acknowledged once every win of this shard is queued to the writer.
    StopPool {
        campaign: CampaignId,
        ack: oneshot::Sender<()>,
    },
    /// Stop the loop; acknowledged after the last operation is queued.
    Shutdown {
        ack: oneshot::Sender<()>,
    },
    /// Fire every timer and release that is due by the clock now, then
    /// acknowledge (tests that move a manual clock wait on this).
    #[cfg(test)]
    CatchUp {
        ack: oneshot::Sender<()>,
    },
}

/// A campaign packet a shake took and did not pay (`Completed::ShakeUnspent`).
pub(crate) struct Unspent {
    pub(crate) campaign: CampaignId,
    pub(crate) packet: PacketId,
    pub(crate) amount_fen: i64,
    pub(crate) user: UserId,
    /// Back on offer; `false` when storage holds a win of it already.
    pub(crate) offer_again: bool,
}

/// What the writer's completions hand back to the shard, ahead of any
/// request (see `COMPLETIONS_QUEUED_MAX` for why this queue is unbounded).
pub(crate) enum Completed {
    /// The writer committed a new packet of this shard.
    Funded {
        packet: Box<Packet>,
        messages: Vec<(UserId, u64)>,
        reply: Responder,
    },
    IdsReserved {
        mark: u64,
    },
    /// The block of ids asked for was not reserved (storage failed).
    IdsNotReserved,
    /// A shake's win was not paid: the key had won before, or the commit
    /// failed. The packet it took goes back to the front of the pool,
    /// unless it had been won after all.
    ShakeUnspent(Unspent),
    /// A keyed shake's win is settled (committed, repeated or failed).
    KeySettled {
        user: UserId,
        key: String,
    },
    /// A write about this packet failed, so memory may hold what storage
    /// does not: reload it from what is committed.
    Reload {
        packet: PacketId,
    },
    /// Everything handed to the writer before the reload began is settled:
    /// the packet can be read as committed.
    Settled {
        packet: PacketId,
    },
    /// A reload read the packet as committed (`None`: it is not stored).
    Loaded {
        packet: PacketId,
        stored: Option<Box<Packet>>,
    },
    /// A reload could not read storage; it is tried again later.
    LoadFailed {
        packet: PacketId,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Expire,
    Evict,
    /// Read a packet from storage again after a failed reload.
    Reload,
}

/// The engine's handle to one shard.
pub(crate) struct ShardHandle {
    pub tx: mpsc::Sender<Event>,
    pub gate: Arc<ShakeGate>,
}

/// What a shard is started with besides its packets.
pub(crate) struct ShardSetup {
    pub index: u16,
    /// The SET this shard's engine is: opens and sends by or for users
    /// homed elsewhere go through the cross-SET outbox.
    pub set: SetMap,
    pub ids: IdAllocator,
    pub rng: SmallRng,
    pub clock: Clock,
    pub writer: Writer,
    pub reads: Arc<Reads>,
    pub hub: Arc<PushHub>,
    pub rules: limits::PacketRules,
    pub counters: Arc<Counters>,
    pub gate_changes: Arc<watch::Sender<u64>>,
}

/// Starts a shard's loop with its recovered packets.
pub(crate) fn spawn(setup: ShardSetup, packets: Vec<Packet>) -> ShardHandle {
    let (tx, rx) = mpsc::channel(limits::SHARD_QUEUE_MAX);
    let (completions_tx, completions_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(ShakeGate::default());
    let ShardSetup { index, set, ids, rng, clock, writer, reads, hub, rules, counters, gate_changes } = setup;
    let mut state = ShardState {
        index,
        set,
        packets: HashMap::new(),
        timers: BTreeSet::new(),
        ids,
        reloading: HashSet::new(),
        pools: HashMap::new(),
        unsettled_keys: HashMap::new(),
        next_release_ms: 0,
        rng,
        clock,
        writer,
        reads,
        hub,
        completions: completions_tx,
        send_limits: SendLimits::new(rules.sends_per_s, rules.send_burst),
        rules,
        counters,
        gate: gate.clone(),
        gate_changes,
    };
    for p in packets {
        state.adopt(p);
    }
    tokio::spawn(state.run(rx, completions_rx));
    ShardHandle { tx, gate }
}

struct ShardState {
    /// This shard's number: the one in the ids of the packets it owns.
    index: u16,
    /// The SET of this shard's engine.
    set: SetMap,
    packets: HashMap<PacketId, Packet>,
    /// Expiries and evictions by due time.
    timers: BTreeSet<(u64, PacketId, TimerKind)>,
    ids: IdAllocator,
    /// Packets taken out of memory to be read again from storage, after a
    /// write about them failed; requests meanwhile are answered from storage.
    reloading: HashSet<PacketId>,
    pools: HashMap<CampaignId, Pool>,
    /// Keyed shake wins handed to the writer and not yet settled, by (user,
    /// key). Bounded by the writer's queue: one entry per win in it.
    unsettled_keys: HashMap<(UserId, String), u32>,
    /// When the pools release next (each `RELEASE_TICK_MS` while any runs).
    next_release_ms: u64,
    rng: SmallRng,
    clock: Clock,
    writer: Writer,
    /// Reads of storage, through the engine's bounded gate.
    reads: Arc<Reads>,
    hub: Arc<PushHub>,
    completions: mpsc::UnboundedSender<Completed>,
    rules: limits::PacketRules,
    /// Each sender's send rate (`rules.sends_per_s`, `rules.send_burst`).
    send_limits: SendLimits,
    counters: Arc<Counters>,
    gate: Arc<ShakeGate>,
    /// Bumped when this shard's gate turns open/closed or ready/empty, for
    /// gateways in other processes that keep a copy (`GateView`).
    gate_changes: Arc<watch::Sender<u64>>,
}

impl ShardState {
    async fn run(mut self, mut requests: mpsc::Receiver<Event>, mut completions: mpsc::UnboundedReceiver<Completed>) {
        loop {
            let wake_ms = self.next_wake_ms();
            let clock = self.clock.clone();
            debug_assert!(completions.len() <= COMPLETIONS_QUEUED_MAX, "shard {} completions pile up", self.index);
            tokio::select! {
                // Completions first: a packet's `Funded` must be in place
                // before any request that learned its id can arrive.
                biased;
                Some(done) = completions.recv() => self.completed(done).await,
                ev = requests.recv() => {
                    let Some(ev) = ev else { break };
                    if self.handle(ev).await.is_break() {
                        break;
                    }
                    for _ in 0..DRAIN_MAX {
                        // Completions still come first: a completion that
                        // answered a client (a keyed shake's repeat) may have
                        // arrived while this turn ran, and the client's next
                        // request must find its effect in place.
                        while let Ok(done) = completions.try_recv() {
                            self.completed(done).await;
                        }
                        let Ok(ev) = requests.try_recv() else { break };
                        if self.handle(ev).await.is_break() {
                            return;
                        }
                    }
                }
                _ = clock.sleep_until(wake_ms.unwrap_or(u64::MAX)), if wake_ms.is_some() => self.catch_up().await,
            }
            self.sync_gate();
        }
    }

    /// When the loop must wake by itself: the first timer, or the next
    /// release while a pool runs.
    fn next_wake_ms(&self) -> Option<u64> {
        let timer = self.timers.first().map(|t| t.0);
        let release = (!self.pools.is_empty()).then_some(self.next_release_ms);
        timer.into_iter().chain(release).min()
    }

    /// Fires the timers and releases due by now.
    async fn catch_up(&mut self) {
        self.fire_timers().await;
        let now_ms = self.clock.now_ms();
        if !self.pools.is_empty() && now_ms >= self.next_release_ms {
            self.release();
            self.next_release_ms = now_ms + RELEASE_TICK_MS;
        }
    }

    /// Handles one request; `Break` once told to shut down.
    async fn handle(&mut self, ev: Event) -> std::ops::ControlFlow<()> {
        match ev {
            Event::Shake { user, campaign, key, reply } => self.shake(user, campaign, key, reply).await,
            Event::Grab { user, packet, reply } => self.grab(user, packet, reply),
            Event::Open { user, packet, reply } => self.open(user, packet, reply).await,
            Event::Send { user, send, reply } => self.send(user, *send, reply).await,
            Event::StartPool { campaign, schedule, started_ms, win_cap, wins, live } => {
                self.start_pool(campaign, schedule, started_ms, win_cap, wins, live)
            }
            Event::StopPool { campaign, ack } => self.stop_pool(campaign, ack),
            Event::Shutdown { ack } => {
                let _ = ack.send(());
                return std::ops::ControlFlow::Break(());
            }
            #[cfg(test)]
            Event::CatchUp { ack } => {
                self.catch_up().await;
                self.sync_gate();
                let _ = ack.send(());
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    async fn completed(&mut self, done: Completed) {
        match done {
            Completed::Funded { packet, messages, reply } => self.funded(*packet, messages, reply),
            Completed::IdsReserved { mark } => self.ids.extend(mark),
            Completed::IdsNotReserved => self.ids.cancel_block_request(),
            Completed::ShakeUnspent(unspent) => self.shake_unspent(unspent),
            Completed::KeySettled { user, key } => self.key_settled(user, key),
            Completed::Reload { packet } => self.reload(packet).await,
            Completed::Settled { packet } => self.read_back(packet),
            Completed::Loaded { packet, stored } => self.loaded(packet, stored.map(|p| *p)),
            Completed::LoadFailed { packet } => self.load_failed(packet),
        }
    }

    /// Publishes the pools' state for the engine's inline answers.
    fn sync_gate(&self) {
        let ready = self.pools.values().map(Pool::ready_len).sum::<usize>() as u64;
        if self.gate.publish(self.pools.len() as u64, ready) {
            self.gate_changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Takes a recovered or newly funded packet into memory with its timers.
    fn adopt(&mut self, p: Packet) {
        // Only the shard named in a packet's id, of the SET named in it, may
        // own it: every request for the packet is routed there.
        assert_eq!(shard_of(p.id), self.index, "packet {} adopted by the wrong shard", p.id);
        assert_eq!(set_of(p.id), self.ids.set(), "packet {} adopted by the wrong SET", p.id);
        let (at, kind) = match p.status {
            hongbao_core::packet::PacketStatus::Open => (p.expires_ms, TimerKind::Expire),
            _ => (self.clock.now_ms() + RETAIN_CLOSED_MS, TimerKind::Evict),
        };
        self.hold(p, at, kind);
    }

    fn hold(&mut self, p: Packet, at: u64, kind: TimerKind) {
        self.timers.insert((at, p.id, kind));
        if self.packets.insert(p.id, p).is_none() {
            self.counters.packets_in_memory.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Asks for the next block of packet ids when the current one runs low.
    /// Never waits: with the writer's queue full it asks again on a later
    /// allocation.
    /// `now_ms`: the clock, as the caller read it.
    fn reserve_ids_if_needed(&mut self, now_ms: u64) {
        let tomorrow = ids::day_of_unix_ms(now_ms) + 1;
        let mark = if self.ids.wants_next_block() {
            self.ids.request_next_block()
        } else if ids::ms_until_next_day(now_ms) <= RESERVE_TOMORROW_WITHIN_MS && self.ids.wants_block_for_day(tomorrow)
        {
            // A new day's ids start in a range of their own: reserved before
            // midnight, the first packets after it wait for no commit.
            self.ids.request_block_for_day(tomorrow)
        } else {
            return;
        };
        let completions = self.completions.clone();
        let op = hongbao_store::ops::ReserveIds { shard: self.index, mark };
        let queued = self.writer.try_submit(op, move |r| {
            let _ = completions.send(match r {
                Ok(()) => Completed::IdsReserved { mark },
                Err(_) => Completed::IdsNotReserved,
            });
        });
        if !queued {
            self.ids.cancel_block_request();
        }
    }

    fn next_id(&mut self) -> Option<PacketId> {
        let now_ms = self.clock.now_ms();
        let id = self.ids.next_id(ids::day_of_unix_ms(now_ms));
        // Paired with the check in `adopt` and with the routing by `set_of`
        // (gateways) and `shard_of` (the engine): an id names the SET and
        // the shard that made it.
        assert!(
            id.is_none_or(|id| shard_of(id) == self.index && set_of(id) == self.ids.set()),
            "shard {} of SET {} made a foreign id",
            self.index,
            self.ids.set()
        );
        self.reserve_ids_if_needed(now_ms);
        id
    }
}
