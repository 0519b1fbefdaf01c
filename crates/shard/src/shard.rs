//! Shard event loops and the engine internals behind `Engine`.
//!
//! A shard is one tokio task looping over a closed `Event` enum. It owns its
//! packets, its timers, its share of each running campaign and its id
//! allocator; nothing else touches them, so no lock guards packet state.
//! Money-moving decisions are made here in memory and then handed to the
//! group-commit writer; the reply is sent by the writer's completion, i.e.
//! only after the record is durable. If storage fails the writer stops and
//! nothing more is acknowledged; a restart rebuilds shards from the database.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hongbao_core::campaign::{split_pool, CampaignSpec, CampaignStatus, PoolShare};
use hongbao_core::ids::{shard_of, IdAllocator};
use hongbao_core::limits::{self, ID_BLOCK_SIZE, SHAKE_POOL_MAX, SHARD_QUEUE_MAX};
use hongbao_core::packet::{GrabState, OpenDecision, OpenError, Packet, PacketSpec, PacketStatus, Recipients};
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use hongbao_proto::{ClaimInfo, ErrorCode, PacketDetail, Push, PushBody, Reply, Request, ShakeResult, Target};
use hongbao_store::{CommitMode, NewPacket, Op, OpError, Outcome, Reader, Store, Writer};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::*;
use crate::outbox::{Outbox, Responder};
use crate::push::{Connection, PushHub, PushReceipt, PushTarget};

/// How long a finished or refunded packet stays in memory for cheap repeat
/// answers; after that, questions about it are answered from storage.
const RETAIN_CLOSED_MS: u64 = 60_000;
/// How often shards release campaign packets.
const RELEASE_TICK: Duration = Duration::from_millis(10);
/// Requests a shard handles before it looks at its timers again.
const DRAIN_MAX: usize = 256;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Live counters of a running campaign, shared by its shards.
#[derive(Default)]
struct CampaignLive {
    released: AtomicU64,
    /// Shards whose share can release nothing more and whose pool is empty.
    exhausted: AtomicU32,
}

enum Event {
    Request {
        user: UserId,
        req: Request,
        reply: Responder,
    },
    /// A send whose recipients were resolved (group members snapshotted).
    Send {
        user: UserId,
        send: Box<SendArgs>,
        reply: Responder,
    },
    /// The writer committed a new packet of this shard.
    Funded {
        packet: Box<Packet>,
        messages: Vec<(UserId, u64)>,
        reply: Responder,
    },
    IdsReserved {
        mark: u64,
    },
    /// A keyed shake raced an earlier one with the same key and lost: the
    /// packet it took goes back to the front of the pool, unspent.
    ShakeRepeated {
        campaign: CampaignId,
        packet: PacketId,
        amount_fen: i64,
        user: UserId,
    },
    StartPool {
        campaign: CampaignId,
        share: PoolShare,
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
}

struct SendArgs {
    amount_fen: i64,
    count: u32,
    kind: hongbao_core::split::SplitKind,
    recipients: Recipients,
    greeting: String,
    key: String,
}

struct Pool {
    share: PoolShare,
    started: tokio::time::Instant,
    released_count: u64,
    /// Released, not yet won: (packet id, amount).
    ready: VecDeque<(PacketId, i64)>,
    win_cap: Option<u32>,
    wins: HashMap<UserId, u32>,
    live: Arc<CampaignLive>,
    reported_exhausted: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Expire,
    Evict,
}

struct ShardState {
    index: u16,
    packets: HashMap<PacketId, Packet>,
    timers: BTreeSet<(u64, PacketId, TimerKind)>,
    ids: IdAllocator,
    pools: HashMap<CampaignId, Pool>,
    rng: SmallRng,
    writer: Writer,
    reader: Arc<Reader>,
    hub: Arc<PushHub>,
    completions: mpsc::UnboundedSender<Event>,
    rules: limits::PacketRules,
    counters: Arc<Counters>,
    gate: Arc<ShakeGate>,
    /// Bumped when this shard's gate turns open/closed or ready/empty, for
    /// gateways in other processes that keep a copy (`GateView`).
    gate_changes: Arc<watch::Sender<u64>>,
}

#[derive(Default)]
pub(crate) struct Counters {
    shakes: AtomicU64,
    shake_wins: AtomicU64,
    opens: AtomicU64,
    packets_in_memory: AtomicU64,
}

struct ShardHandle {
    tx: mpsc::Sender<Event>,
    gate: Arc<ShakeGate>,
}

/// What a gateway thread may read without a round trip to the shard: how
/// many campaign pools run in the shard and how many of their packets are
/// ready. Written only by the shard's loop after each turn; a stale read
/// answers as the shake would have been answered a moment earlier, which is
/// all a client can tell apart anyway.
#[derive(Default)]
struct ShakeGate {
    pools: AtomicU64,
    ready: AtomicU64,
}

/// One shard's gate as a remote gateway sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateState {
    /// A campaign pool runs in the shard.
    pub open: bool,
    /// One of its packets is ready to be won.
    pub ready: bool,
}

/// A copy of every shard's gate, kept by a gateway in another process (sent
/// over the link on every change) so it answers the shakes that find
/// nothing without a round trip. Stale by the link's delay at most, which
/// answers as the shake would have been a moment earlier.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateView {
    /// Indexed by shard.
    pub gates: Vec<GateState>,
}

impl GateView {
    /// `Engine::answer_inline` from this copy: `Some` for a plain shake the
    /// user's shard has nothing for; `None`: submit it.
    pub fn answer(&self, user: UserId, req: &Request) -> Option<ShakeResult> {
        let Request::Shake { campaign, key: None } = req else { return None };
        if self.gates.is_empty() {
            return None;
        }
        let gate = self.gates[(user % self.gates.len() as u64) as usize];
        inline_shake_result(*campaign, gate.open, gate.ready)
    }
}

/// The answer to a plain shake for `campaign` (0: any) that the shard need
/// not see: nothing running in the user's shard, or nothing ready for "any".
fn inline_shake_result(campaign: u64, open: bool, ready: bool) -> Option<ShakeResult> {
    if !open {
        Some(ShakeResult::NotRunning)
    } else if campaign == 0 && !ready {
        Some(ShakeResult::None)
    } else {
        None
    }
}

pub(crate) struct Inner {
    pub(crate) push_hub: Arc<PushHub>,
    shards: Vec<ShardHandle>,
    writer: Writer,
    reader: Arc<Reader>,
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

fn shake_label(result: &ShakeResult) -> &'static str {
    match result {
        ShakeResult::Won { .. } => "won",
        ShakeResult::None => "none",
        ShakeResult::Overload => "overload",
        ShakeResult::NotRunning => "not_running",
    }
}

fn encode_body(body: &PushBody) -> Vec<u8> {
    postcard::to_allocvec(body).expect("push bodies serialise")
}

fn op_error(e: OpError) -> EngineError {
    match e {
        OpError::InsufficientFunds { balance_fen, needed_fen } => {
            EngineError::InsufficientFunds { balance_fen, needed_fen }
        }
        OpError::KeyConflict => EngineError::KeyConflict,
        OpError::NotFound(what) => EngineError::NotFound(what),
        OpError::Invalid(msg) => EngineError::Invalid(msg),
        OpError::Storage(msg) => EngineError::Internal(msg),
    }
}

fn store_error(e: hongbao_store::StoreError) -> EngineError {
    EngineError::Internal(e.to_string())
}

fn valid_user(user: UserId) -> Result<(), EngineError> {
    if user == 0 || user > hongbao_core::ID_MAX {
        return Err(EngineError::Invalid(format!("user id {user} is not between 1 and 2^53-1")));
    }
    Ok(())
}

fn valid_key(key: &str) -> Result<(), EngineError> {
    if key.is_empty() || key.len() > limits::IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(EngineError::Invalid(format!(
            "idempotency key must be 1 to {} bytes",
            limits::IDEMPOTENCY_KEY_BYTES_MAX
        )));
    }
    Ok(())
}

fn valid_amount(amount_fen: i64) -> Result<(), EngineError> {
    if amount_fen <= 0 || amount_fen > limits::AMOUNT_FEN_MAX {
        return Err(EngineError::Invalid(format!(
            "amount must be between 1 and {} fen, got {amount_fen}",
            limits::AMOUNT_FEN_MAX
        )));
    }
    Ok(())
}

impl Inner {
    pub(crate) async fn open(
        config: EngineConfig,
        commit_mode: CommitMode,
        data_dir: &std::path::Path,
    ) -> Result<Arc<Inner>, EngineError> {
        if config.shards == 0 || config.shards as usize > limits::SHARDS_MAX {
            return Err(EngineError::Invalid(format!("shards must be between 1 and {}", limits::SHARDS_MAX)));
        }
        let dir = data_dir.to_owned();
        let store = tokio::task::spawn_blocking(move || Store::open_with(&dir, commit_mode))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(store_error)?;
        let Store { writer, reader, writer_thread: _ } = store;
        let reader = Arc::new(reader);
        let marks = reader.id_marks().map_err(store_error)?;
        let open_packets = reader.open_packets().map_err(store_error)?;
        let groups = reader.groups().map_err(store_error)?;
        if let Some(p) = open_packets.iter().find(|p| shard_of(p.id) >= config.shards) {
            return Err(EngineError::Invalid(format!(
                "the data has open packets of shard {} but only {} shards are configured; use at least {}",
                shard_of(p.id),
                config.shards,
                shard_of(p.id) + 1
            )));
        }
        let hub = PushHub::new();
        let counters = Arc::new(Counters::default());
        let mut by_shard: Vec<Vec<Packet>> = (0..config.shards).map(|_| Vec::new()).collect();
        for p in open_packets {
            by_shard[shard_of(p.id) as usize].push(p);
        }
        let recovered: usize = by_shard.iter().map(Vec::len).sum();
        let mut shards = Vec::new();
        let gate_changes = Arc::new(watch::channel(0u64).0);
        for (index, packets) in by_shard.into_iter().enumerate() {
            let index = index as u16;
            let mut ids = IdAllocator::new(index, marks.get(&index).copied().unwrap_or(0), ID_BLOCK_SIZE);
            // Reserve the first block before taking any request.
            let mark = ids.request_next_block();
            writer.run(Op::ReserveIds { shard: index, mark }).await.map_err(op_error)?;
            ids.extend(mark);
            let (tx, rx) = mpsc::channel(SHARD_QUEUE_MAX);
            let (ctx, crx) = mpsc::unbounded_channel();
            let gate = Arc::new(ShakeGate::default());
            let mut state = ShardState {
                index,
                packets: HashMap::new(),
                timers: BTreeSet::new(),
                ids,
                pools: HashMap::new(),
                rng: SmallRng::from_os_rng(),
                writer: writer.clone(),
                reader: reader.clone(),
                hub: hub.clone(),
                completions: ctx,
                rules: config.packet_rules.clone(),
                counters: counters.clone(),
                gate: gate.clone(),
                gate_changes: gate_changes.clone(),
            };
            for p in packets {
                state.adopt(p);
            }
            tokio::spawn(state.run(rx, crx));
            shards.push(ShardHandle { tx, gate });
        }
        tracing::info!(shards = config.shards, open_packets = recovered, "engine recovered");
        let inner = Arc::new(Inner {
            push_hub: hub,
            shards,
            writer,
            reader,
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
        });
        for row in inner.reader.campaigns().map_err(store_error)? {
            if row.status == CampaignStatus::Running {
                let _guard = inner.campaign_control.lock().await;
                inner.run_pools(&row).await?;
                tracing::info!(campaign = row.id, "campaign resumed");
            }
        }
        Ok(inner)
    }

    fn shard_count(&self) -> u16 {
        self.shards.len() as u16
    }

    fn user_shard(&self, user: UserId) -> usize {
        (user % self.shards.len() as u64) as usize
    }

    /// Answers a plain shake on the caller's thread when the user's shard
    /// has nothing to give: no campaign running (`not_running`) or, for "any
    /// campaign", no packet ready (`none`). That is nearly every shake of a
    /// campaign (200 packets/s against tens of thousands of shakes), and it
    /// then costs two atomic loads: no queue, no wake-up of the shard, no
    /// storage. `None`: the shard must decide (`submit`).
    pub(crate) fn answer_inline(&self, user: UserId, req: &Request) -> Option<Reply> {
        let Request::Shake { campaign, key: None } = req else { return None };
        if self.shutting_down.load(Ordering::Relaxed) {
            return None;
        }
        let gate = &self.shards[self.user_shard(user)].gate;
        let open = gate.pools.load(Ordering::Relaxed) > 0;
        let ready = gate.ready.load(Ordering::Relaxed) > 0;
        let result = inline_shake_result(*campaign, open, ready)?;
        self.count_inline_shakes(&result, 1);
        Some(Reply::Shake(result))
    }

    /// Counts shakes answered without the shard: here, or by a gateway in
    /// another process from its `GateView`.
    pub(crate) fn count_inline_shakes(&self, result: &ShakeResult, n: u64) {
        self.counters.shakes.fetch_add(n, Ordering::Relaxed);
        let (none, not_running) = &self.inline_shake_counters;
        if *result == ShakeResult::None { none } else { not_running }.increment(n);
    }

    /// Every shard's gate, for a gateway in another process.
    pub(crate) fn gate_view(&self) -> GateView {
        let gates = self
            .shards
            .iter()
            .map(|s| GateState {
                open: s.gate.pools.load(Ordering::Relaxed) > 0,
                ready: s.gate.ready.load(Ordering::Relaxed) > 0,
            })
            .collect();
        GateView { gates }
    }

    pub(crate) fn gate_changes(&self) -> watch::Receiver<u64> {
        self.gate_changes.subscribe()
    }

    pub(crate) fn submit(&self, user: UserId, req: Request, reply: Responder) {
        if self.shutting_down.load(Ordering::Relaxed) {
            return reply.send(Reply::error(ErrorCode::Overload, "server is shutting down"));
        }
        let shard = match &req {
            Request::Shake { .. } => self.user_shard(user),
            Request::Send { .. } => self.user_shard(user),
            Request::Grab { packet } | Request::Open { packet } => {
                let s = shard_of(*packet) as usize;
                if s >= self.shards.len() || *packet == 0 {
                    return reply.send(Reply::error(ErrorCode::NotFound, format!("packet {packet} not found")));
                }
                s
            }
            Request::Detail { packet } => return self.spawn_detail(user, *packet, reply),
            Request::Balance => {
                let reader = self.reader.clone();
                tokio::task::spawn_blocking(move || {
                    reply.send(match reader.balance(user) {
                        Ok(balance_fen) => Reply::Balance { balance_fen },
                        Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
                    })
                });
                return;
            }
            Request::Ack { msg } => {
                let msg = *msg;
                let writer = self.writer.clone();
                tokio::spawn(async move {
                    let r = writer.run(Op::AckMessage { user, msg }).await;
                    reply.send(match r {
                        Ok(_) => Reply::Acked { msg },
                        Err(e) => op_error(e).to_reply(),
                    })
                });
                return;
            }
            Request::Hello { .. } | Request::Ping => {
                return reply.send(Reply::error(ErrorCode::InvalidRequest, "hello and ping are handled by the gateway"))
            }
        };
        let event = match req {
            Request::Send { amount_fen, count, kind, to, greeting, key } => {
                let recipients = match to {
                    // Resolved here, off the shard: the packet keeps this snapshot.
                    Target::Group(g) => match self.groups.read().expect("groups poisoned").get(&g) {
                        Some(members) if members.binary_search(&user).is_ok() => {
                            Recipients::group(g, members.iter().copied())
                        }
                        Some(_) => {
                            return reply.send(Reply::error(
                                ErrorCode::NotEligible,
                                format!("you are not a member of group {g}"),
                            ))
                        }
                        None => return reply.send(Reply::error(ErrorCode::NotFound, format!("group {g} not found"))),
                    },
                    Target::Users(users) => {
                        if users.len() > limits::PACKET_RECIPIENTS_MAX {
                            let msg = format!("at most {} recipients", limits::PACKET_RECIPIENTS_MAX);
                            return reply.send(Reply::error(ErrorCode::InvalidRequest, msg));
                        }
                        Recipients::users(users)
                    }
                    Target::User(u) => Recipients::User(u),
                };
                let send = Box::new(SendArgs { amount_fen, count, kind, recipients, greeting, key });
                Event::Send { user, send, reply }
            }
            req => Event::Request { user, req, reply },
        };
        match self.shards[shard].tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(e)) | Err(mpsc::error::TrySendError::Closed(e)) => {
                metrics::counter!("hongbao_overload_total", "where" => "shard_queue").increment(1);
                match e {
                    Event::Request { req: Request::Shake { .. }, reply, .. } => {
                        reply.send(Reply::Shake(ShakeResult::Overload))
                    }
                    Event::Request { reply, .. } | Event::Send { reply, .. } => {
                        reply.send(Reply::error(ErrorCode::Overload, "shard queue is full, retry later"))
                    }
                    _ => {}
                }
            }
        }
    }

    fn spawn_detail(&self, user: UserId, packet: PacketId, reply: Responder) {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            reply.send(match reader.packet(packet) {
                Ok(Some(p)) if p.sender == user || p.recipients.contains(user) => Reply::Detail(detail(&p)),
                Ok(Some(_)) => {
                    Reply::error(ErrorCode::NotEligible, "only the sender and recipients may see this packet")
                }
                Ok(None) => Reply::error(ErrorCode::NotFound, format!("packet {packet} not found")),
                Err(e) => Reply::error(ErrorCode::Internal, e.to_string()),
            })
        });
    }

    pub(crate) async fn move_money(
        &self,
        user: UserId,
        amount_fen: i64,
        key: &str,
        deposit: bool,
    ) -> Result<MoneyReceipt, EngineError> {
        valid_user(user)?;
        valid_amount(amount_fen)?;
        valid_key(key)?;
        let key = key.to_owned();
        let op = if deposit { Op::Deposit { user, amount_fen, key } } else { Op::Withdraw { user, amount_fen, key } };
        match self.writer.run(op).await.map_err(op_error)? {
            Outcome::Balance { balance_fen, repeat } => Ok(MoneyReceipt { user, amount_fen, balance_fen, repeat }),
            other => Err(EngineError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, hongbao_store::StoreError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader))
            .await
            .map_err(|e| EngineError::Internal(e.to_string()))?
            .map_err(store_error)
    }

    pub(crate) async fn balance(&self, user: UserId) -> Result<i64, EngineError> {
        valid_user(user)?;
        self.read(move |r| r.balance(user)).await
    }

    pub(crate) async fn change_group(
        &self,
        group: GroupId,
        add: Vec<UserId>,
        remove: Vec<UserId>,
        replace: bool,
    ) -> Result<Vec<UserId>, EngineError> {
        valid_user(group).map_err(|_| EngineError::Invalid(format!("group id {group} is not between 1 and 2^53-1")))?;
        for &u in add.iter().chain(&remove) {
            valid_user(u)?;
        }
        if add.len() > limits::GROUP_MEMBERS_MAX {
            return Err(EngineError::Invalid(format!("a group holds at most {} members", limits::GROUP_MEMBERS_MAX)));
        }
        // The map must change in commit order. Group changes are rare admin
        // calls, so one at a time (not the map's lock: holding that across
        // the commit would block every send); the map then takes the
        // committed list.
        let _one_at_a_time = self.group_control.lock().await;
        match self.writer.run(Op::ChangeGroup { group, add, remove, replace }).await.map_err(op_error)? {
            Outcome::GroupChanged { members } => {
                let mut groups = self.groups.write().expect("groups poisoned");
                if members.is_empty() {
                    groups.remove(&group);
                } else {
                    groups.insert(group, Arc::from(members.clone()));
                }
                Ok(members)
            }
            other => Err(EngineError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    pub(crate) fn group(&self, group: GroupId) -> Option<Vec<UserId>> {
        self.groups.read().expect("groups poisoned").get(&group).map(|m| m.to_vec())
    }

    fn campaign_info(&self, row: &hongbao_store::CampaignRow) -> CampaignInfo {
        let released = self
            .live_campaigns
            .lock()
            .expect("campaigns poisoned")
            .get(&row.id)
            .map(|l| l.released.load(Ordering::Relaxed))
            .or_else(|| self.closed_released.lock().expect("campaigns poisoned").get(&row.id).copied())
            .unwrap_or(0);
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

    pub(crate) async fn campaign(&self, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        let row =
            self.read(move |r| r.campaign(id)).await?.ok_or_else(|| EngineError::NotFound(format!("campaign {id}")))?;
        Ok(self.campaign_info(&row))
    }

    pub(crate) async fn campaigns(&self) -> Result<Vec<CampaignInfo>, EngineError> {
        let rows = self.read(|r| r.campaigns()).await?;
        Ok(rows.iter().map(|r| self.campaign_info(r)).collect())
    }

    pub(crate) async fn create_campaign(&self, spec: CampaignSpec, key: &str) -> Result<CampaignInfo, EngineError> {
        spec.validate().map_err(|e| EngineError::Invalid(e.to_string()))?;
        valid_key(key)?;
        match self
            .writer
            .run(Op::CreateCampaign { spec, key: key.to_owned(), at_ms: now_ms() })
            .await
            .map_err(op_error)?
        {
            Outcome::CampaignCreated { id, .. } => self.campaign(id).await,
            other => Err(EngineError::Internal(format!("unexpected outcome {other:?}"))),
        }
    }

    pub(crate) async fn start_campaign(self: &Arc<Self>, id: CampaignId) -> Result<CampaignInfo, EngineError> {
        let guard = self.campaign_control.lock().await;
        let row =
            self.read(move |r| r.campaign(id)).await?.ok_or_else(|| EngineError::NotFound(format!("campaign {id}")))?;
        match row.status {
            CampaignStatus::Running => {}
            CampaignStatus::Created => {
                self.writer
                    .run(Op::SetCampaignStatus { id, status: CampaignStatus::Running })
                    .await
                    .map_err(op_error)?;
                self.run_pools(&row).await?;
            }
            closed => return Err(EngineError::Conflict(format!("campaign {id} is {}", closed.as_str()))),
        }
        drop(guard);
        self.campaign(id).await
    }

    /// Splits what is left of a campaign over the shards and starts releasing,
    /// with a watcher that closes the campaign once every shard is exhausted.
    async fn run_pools(self: &Arc<Self>, row: &hongbao_store::CampaignRow) -> Result<(), EngineError> {
        let id = row.id;
        let packets_left = match row.spec.rule {
            hongbao_core::campaign::AmountRule::Count { packets } => packets.saturating_sub(row.won),
            hongbao_core::campaign::AmountRule::Range { .. } => 0,
        };
        let shares =
            split_pool(row.spec.rule, row.escrow_fen, packets_left, row.spec.rate_per_s, self.shard_count() as u32);
        let wins = if row.spec.win_cap_per_user.is_some() {
            self.read(move |r| r.win_counts(id)).await?
        } else {
            HashMap::new()
        };
        let mut wins_by_shard: Vec<HashMap<UserId, u32>> = vec![HashMap::new(); self.shards.len()];
        for (u, n) in wins {
            wins_by_shard[self.user_shard(u)].insert(u, n);
        }
        let live = Arc::new(CampaignLive::default());
        self.live_campaigns.lock().expect("campaigns poisoned").insert(id, live.clone());
        for ((share, wins), shard) in shares.into_iter().zip(wins_by_shard).zip(&self.shards) {
            let ev =
                Event::StartPool { campaign: id, share, win_cap: row.spec.win_cap_per_user, wins, live: live.clone() };
            shard.tx.send(ev).await.map_err(|_| EngineError::Internal("shard stopped".into()))?;
        }
        let inner = Arc::downgrade(self);
        let shards = self.shard_count() as u32;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(inner) = inner.upgrade() else { return };
                if !inner
                    .live_campaigns
                    .lock()
                    .expect("campaigns poisoned")
                    .get(&id)
                    .is_some_and(|l| Arc::ptr_eq(l, &live))
                {
                    return;
                }
                if live.exhausted.load(Ordering::Relaxed) >= shards {
                    match inner.close_campaign(id, CampaignStatus::Finished).await {
                        Ok(info) => tracing::info!(
                            campaign = id,
                            won = info.won,
                            refunded_fen = info.refunded_fen,
                            "campaign finished"
                        ),
                        Err(e) => tracing::warn!(campaign = id, error = %e, "closing a finished campaign failed"),
                    }
                    return;
                }
            }
        });
        Ok(())
    }

    pub(crate) async fn close_campaign(
        &self,
        id: CampaignId,
        status: CampaignStatus,
    ) -> Result<CampaignInfo, EngineError> {
        let guard = self.campaign_control.lock().await;
        let row =
            self.read(move |r| r.campaign(id)).await?.ok_or_else(|| EngineError::NotFound(format!("campaign {id}")))?;
        if row.status.is_closed() {
            drop(guard);
            return self.campaign(id).await;
        }
        // Every shard stops releasing and acknowledges after its last win is
        // queued; the writer is FIFO, so the close commits after every win.
        for shard in &self.shards {
            let (ack, done) = oneshot::channel();
            if shard.tx.send(Event::StopPool { campaign: id, ack }).await.is_ok() {
                let _ = done.await;
            }
        }
        let released = self.live_campaigns.lock().expect("campaigns poisoned").remove(&id);
        if let Some(live) = released {
            let count = live.released.load(Ordering::Relaxed);
            self.closed_released.lock().expect("campaigns poisoned").insert(id, count);
        }
        self.writer.run(Op::CloseCampaign { id, status }).await.map_err(op_error)?;
        drop(guard);
        self.campaign(id).await
    }

    pub(crate) async fn packet_detail(&self, id: PacketId) -> Result<PacketDetail, EngineError> {
        let p = self.read(move |r| r.packet(id)).await?.ok_or_else(|| EngineError::NotFound(format!("packet {id}")))?;
        Ok(detail(&p))
    }

    fn target_users(&self, target: &PushTarget) -> Result<Vec<UserId>, EngineError> {
        let users = match target {
            PushTarget::User(u) => vec![*u],
            PushTarget::Users(us) => us.clone(),
            PushTarget::Group(g) => self.group(*g).ok_or_else(|| EngineError::NotFound(format!("group {g}")))?,
        };
        if users.len() > limits::GROUP_MEMBERS_MAX {
            return Err(EngineError::Invalid(format!(
                "at most {} users per push; use a broadcast",
                limits::GROUP_MEMBERS_MAX
            )));
        }
        for &u in &users {
            valid_user(u)?;
        }
        Ok(users)
    }

    pub(crate) async fn push(
        &self,
        target: PushTarget,
        body: PushBody,
        persistent: bool,
    ) -> Result<PushReceipt, EngineError> {
        let users = self.target_users(&target)?;
        let mut receipt = PushReceipt { targets: users.len() as u64, delivered: 0, stored: 0 };
        if persistent {
            let op = Op::StoreMessages { users, body: encode_body(&body), at_ms: now_ms() };
            let Outcome::MessagesStored { ids } = self.writer.run(op).await.map_err(op_error)? else {
                return Err(EngineError::Internal("unexpected outcome".into()));
            };
            receipt.stored = ids.len() as u64;
            for (u, msg) in ids {
                receipt.delivered += self.push_hub.deliver(u, &Push { msg, body: body.clone() }) as u64;
            }
        } else {
            let push = Push { msg: 0, body };
            for u in users {
                receipt.delivered += self.push_hub.deliver(u, &push) as u64;
            }
        }
        Ok(receipt)
    }

    pub(crate) async fn connect(&self, user: UserId, outbox: Outbox) -> Result<Connection, EngineError> {
        valid_user(user)?;
        // Register first so nothing pushed from now on is missed; a message
        // may then arrive twice (live and from storage): clients dedupe by `msg`.
        self.push_hub.register(user, outbox.clone());
        let conn = Connection { hub: self.push_hub.clone(), user, outbox: outbox.clone() };
        let pending = self.read(move |r| r.messages(user, limits::MESSAGES_ON_CONNECT_MAX)).await?;
        for (msg, body) in pending {
            match postcard::from_bytes::<PushBody>(&body) {
                Ok(body) => {
                    outbox.send(hongbao_proto::ServerFrame::Push(Push { msg, body }));
                }
                Err(e) => tracing::warn!(msg, error = %e, "undecodable stored message skipped"),
            }
        }
        Ok(conn)
    }

    pub(crate) async fn stats(&self) -> Stats {
        let totals = self.read(|r| r.totals()).await.unwrap_or_default();
        Stats {
            shards: self.shard_count(),
            connections: self.push_hub.connections(),
            users_online: self.push_hub.users_online(),
            packets_in_memory: self.counters.packets_in_memory.load(Ordering::Relaxed),
            campaigns_running: self.live_campaigns.lock().expect("campaigns poisoned").len() as u64,
            shakes: self.counters.shakes.load(Ordering::Relaxed),
            shake_wins: self.counters.shake_wins.load(Ordering::Relaxed),
            opens: self.counters.opens.load(Ordering::Relaxed),
            commits: self.writer.stats.commits.load(Ordering::Relaxed),
            committed_ops: self.writer.stats.committed_ops.load(Ordering::Relaxed),
            writer_queue_depth: self.writer.queue_depth(),
            shard_queue_depth: self.shards.iter().map(|s| (s.tx.max_capacity() - s.tx.capacity()) as u64).sum(),
            user_balances_fen: totals.user_balances_fen,
            packet_escrow_fen: totals.packet_escrow_fen,
            campaign_escrow_fen: totals.campaign_escrow_fen,
            deposits_minus_withdrawals_fen: -totals.world_fen,
        }
    }

    pub(crate) async fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::Relaxed) {
            return;
        }
        let _guard = self.campaign_control.lock().await;
        self.live_campaigns.lock().expect("campaigns poisoned").clear();
        for shard in &self.shards {
            let (ack, done) = oneshot::channel();
            if shard.tx.send(Event::Shutdown { ack }).await.is_ok() {
                let _ = done.await;
            }
        }
        // Everything acknowledged is already committed; closing the writer
        // commits whatever is still queued, so those requests get answers
        // too, and releases the data directory.
        let _ = self.writer.run(Op::Close).await;
        tracing::info!("engine stopped");
    }
}

fn detail(p: &Packet) -> PacketDetail {
    PacketDetail {
        packet: p.id,
        sender: p.sender,
        kind: p.kind,
        amount_fen: p.total_fen,
        count: p.count,
        remaining_fen: p.remaining_fen,
        refunded_fen: p.refunded_fen,
        status: p.status.as_str().to_owned(),
        greeting: p.greeting.clone(),
        created_ms: p.created_ms,
        expires_ms: p.expires_ms,
        best_luck: if p.status == PacketStatus::Finished { p.best_luck() } else { None },
        claims: p.claims.iter().map(|c| ClaimInfo { user: c.user, amount_fen: c.amount_fen, at_ms: c.at_ms }).collect(),
    }
}

fn open_error_reply(e: OpenError) -> Reply {
    let code = match e {
        OpenError::NotEligible => ErrorCode::NotEligible,
        OpenError::Finished => ErrorCode::Finished,
        OpenError::Expired => ErrorCode::Expired,
    };
    Reply::error(code, e.to_string())
}

impl ShardState {
    async fn run(mut self, mut requests: mpsc::Receiver<Event>, mut completions: mpsc::UnboundedReceiver<Event>) {
        let mut tick = tokio::time::interval(RELEASE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let next_timer = self.timers.first().map(|t| t.0);
            let sleep_for = next_timer.map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            tokio::select! {
                // Completions first: a packet's `Funded` must be in place
                // before any request that learned its id can arrive.
                biased;
                Some(ev) = completions.recv() => self.handle(ev).await,
                ev = requests.recv() => {
                    let Some(ev) = ev else { break };
                    if let Event::Shutdown { ack } = ev {
                        let _ = ack.send(());
                        break;
                    }
                    self.handle(ev).await;
                    for _ in 0..DRAIN_MAX {
                        match requests.try_recv() {
                            Ok(Event::Shutdown { ack }) => {
                                let _ = ack.send(());
                                return;
                            }
                            Ok(ev) => self.handle(ev).await,
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep(sleep_for.unwrap_or_default()), if sleep_for.is_some() => self.fire_timers().await,
                _ = tick.tick(), if !self.pools.is_empty() => self.release().await,
            }
            self.sync_gate();
        }
    }

    /// Publishes the pools' state for `Inner::answer_inline`.
    fn sync_gate(&self) {
        // Store only on change: gateway threads read these on every shake.
        let ready = self.pools.values().map(|p| p.ready.len()).sum::<usize>() as u64;
        let pools = self.pools.len() as u64;
        let old_pools = self.gate.pools.load(Ordering::Relaxed);
        let old_ready = self.gate.ready.load(Ordering::Relaxed);
        if old_pools != pools {
            self.gate.pools.store(pools, Ordering::Relaxed);
        }
        if old_ready != ready {
            self.gate.ready.store(ready, Ordering::Relaxed);
        }
        // Remote copies only tell zero from non-zero.
        if (old_pools > 0) != (pools > 0) || (old_ready > 0) != (ready > 0) {
            self.gate_changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Takes a recovered or newly funded packet into memory with its timers.
    fn adopt(&mut self, p: Packet) {
        debug_assert_eq!(shard_of(p.id), self.index);
        let kind = if p.status == PacketStatus::Open { TimerKind::Expire } else { TimerKind::Evict };
        let at = if kind == TimerKind::Expire { p.expires_ms } else { now_ms() + RETAIN_CLOSED_MS };
        self.timers.insert((at, p.id, kind));
        if self.packets.insert(p.id, p).is_none() {
            self.counters.packets_in_memory.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn submit(&self, op: Op, done: hongbao_store::Done) {
        self.writer.submit(op, done).await
    }

    async fn handle(&mut self, ev: Event) {
        match ev {
            Event::Request { user, req, reply } => match req {
                Request::Shake { campaign, key } => self.shake(user, campaign, key, reply).await,
                Request::Grab { packet } => self.grab(user, packet, reply),
                Request::Open { packet } => self.open(user, packet, reply).await,
                other => {
                    reply.send(Reply::error(ErrorCode::Internal, format!("{} is not a shard request", other.op_name())))
                }
            },
            Event::Send { user, send, reply } => self.send(user, *send, reply).await,
            Event::Funded { packet, messages, reply } => {
                let p = *packet;
                let body = PushBody::PacketReceived {
                    packet: p.id,
                    sender: p.sender,
                    amount_fen: p.total_fen,
                    count: p.count,
                    kind: p.kind,
                    greeting: p.greeting.clone(),
                };
                reply.send(Reply::Sent {
                    packet: p.id,
                    amount_fen: p.total_fen,
                    count: p.count,
                    expires_ms: p.expires_ms,
                    repeat: false,
                });
                for (user, msg) in messages {
                    self.hub.deliver(user, &Push { msg, body: body.clone() });
                }
                metrics::counter!("hongbao_packets_sent_total").increment(1);
                self.adopt(p);
            }
            Event::IdsReserved { mark } => self.ids.extend(mark),
            Event::ShakeRepeated { campaign, packet, amount_fen, user } => {
                if let Some(pool) = self.pools.get_mut(&campaign) {
                    pool.ready.push_front((packet, amount_fen));
                    // It is on offer again: the pool is not spent after all.
                    pool.reported_exhausted = false;
                    if let Some(wins) = pool.wins.get_mut(&user) {
                        *wins = wins.saturating_sub(1);
                    }
                }
                self.counters.shake_wins.fetch_sub(1, Ordering::Relaxed);
            }
            Event::Shutdown { .. } => unreachable!("handled by the loop"),
            Event::StartPool { campaign, share, win_cap, wins, live } => {
                self.pools.insert(
                    campaign,
                    Pool {
                        share,
                        started: tokio::time::Instant::now(),
                        released_count: 0,
                        ready: VecDeque::new(),
                        win_cap,
                        wins,
                        live,
                        reported_exhausted: false,
                    },
                );
            }
            Event::StopPool { campaign, ack } => {
                // Wins already handed to the writer stay; unreleased and
                // released-but-unwon money is still in escrow for the close.
                self.pools.remove(&campaign);
                let _ = ack.send(());
            }
        }
    }

    fn reserve_ids_if_needed(&mut self) {
        if !self.ids.wants_next_block() {
            return;
        }
        let mark = self.ids.request_next_block();
        let completions = self.completions.clone();
        let op = Op::ReserveIds { shard: self.index, mark };
        let done: hongbao_store::Done = Box::new(move |r| {
            if r.is_ok() {
                let _ = completions.send(Event::IdsReserved { mark });
            }
        });
        // Never wait here: if the writer queue is full we simply try again
        // on a later allocation.
        if self.writer.try_submit(op, done).is_err() {
            self.ids.cancel_block_request();
        }
    }

    fn next_id(&mut self) -> Option<PacketId> {
        let id = self.ids.next_id();
        self.reserve_ids_if_needed();
        id
    }

    async fn shake(&mut self, user: UserId, campaign: CampaignId, key: Option<String>, reply: Responder) {
        self.counters.shakes.fetch_add(1, Ordering::Relaxed);
        if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > limits::IDEMPOTENCY_KEY_BYTES_MAX) {
            return reply.send(Reply::error(ErrorCode::InvalidRequest, "shake key must be 1 to 64 bytes"));
        }
        self.take_shake(user, campaign, key, reply).await
    }

    /// A keyed shake that found nothing to take: if its key has won before,
    /// the answer is that first win, whatever the pool holds now. The lookup
    /// is queued behind every win this shard has handed to the writer, so a
    /// concurrent retry sees the win its twin just took. A full writer queue
    /// answers `overload` rather than stall the shard.
    fn answer_keyed_miss(&self, user: UserId, key: String, miss: ShakeResult, reply: Responder) {
        // Shared with the completion so a full queue can still answer.
        let slot = Arc::new(Mutex::new(Some(reply)));
        let taken = slot.clone();
        let take = move || taken.lock().expect("reply slot poisoned").take();
        let done: hongbao_store::Done = Box::new(move |r| {
            let Some(reply) = take() else { return };
            let result = match r {
                Ok(Outcome::ShakeWinFound { first: Some((campaign, packet, amount_fen)) }) => {
                    ShakeResult::Won { campaign, packet, amount_fen }
                }
                Ok(Outcome::ShakeWinFound { first: None }) => miss,
                Ok(other) => {
                    return reply.send(Reply::error(ErrorCode::Internal, format!("unexpected outcome {other:?}")))
                }
                Err(e) => return reply.send(op_error(e).to_reply()),
            };
            metrics::counter!("hongbao_shakes_total", "result" => shake_label(&result)).increment(1);
            reply.send(Reply::Shake(result));
        });
        if self.writer.try_submit(Op::FindShakeWin { user, key }, done).is_err() {
            if let Some(reply) = slot.lock().expect("reply slot poisoned").take() {
                reply.send(Reply::Shake(ShakeResult::Overload));
            }
        }
    }

    /// Takes a released packet for `user`, if one is ready and allowed.
    async fn take_shake(&mut self, user: UserId, campaign: CampaignId, key: Option<String>, reply: Responder) {
        let pool_id = if campaign != 0 {
            self.pools.contains_key(&campaign).then_some(campaign)
        } else {
            // Any running campaign: prefer one with a packet ready.
            self.pools.iter().find(|(_, p)| !p.ready.is_empty()).or_else(|| self.pools.iter().next()).map(|(id, _)| *id)
        };
        let Some(pool_id) = pool_id else {
            if let Some(key) = key {
                return self.answer_keyed_miss(user, key, ShakeResult::NotRunning, reply);
            }
            metrics::counter!("hongbao_shakes_total", "result" => "not_running").increment(1);
            return reply.send(Reply::Shake(ShakeResult::NotRunning));
        };
        let pool = self.pools.get_mut(&pool_id).expect("pool exists");
        let capped = pool.win_cap.is_some_and(|cap| pool.wins.get(&user).copied().unwrap_or(0) >= cap);
        let won = if capped { None } else { pool.ready.pop_front() };
        let Some((packet, amount_fen)) = won else {
            if let Some(key) = key {
                return self.answer_keyed_miss(user, key, ShakeResult::None, reply);
            }
            // The common answer touches no storage and no other shard.
            metrics::counter!("hongbao_shakes_total", "result" => "none").increment(1);
            return reply.send(Reply::Shake(ShakeResult::None));
        };
        if pool.win_cap.is_some() {
            *pool.wins.entry(user).or_insert(0) += 1;
        }
        self.counters.shake_wins.fetch_add(1, Ordering::Relaxed);
        let op = Op::ShakeWin { campaign: pool_id, packet, user, amount_fen, at_ms: now_ms(), key };
        let completions = self.completions.clone();
        self.submit(
            op,
            Box::new(move |r| {
                let (result, label) = match r {
                    Ok(Outcome::ShakeWon { repeat: None }) => {
                        (ShakeResult::Won { campaign: pool_id, packet, amount_fen }, "won")
                    }
                    Ok(Outcome::ShakeWon { repeat: Some((c, p, a)) }) => {
                        let _ = completions.send(Event::ShakeRepeated { campaign: pool_id, packet, amount_fen, user });
                        (ShakeResult::Won { campaign: c, packet: p, amount_fen: a }, "won")
                    }
                    Ok(other) => {
                        return reply.send(Reply::error(ErrorCode::Internal, format!("unexpected outcome {other:?}")))
                    }
                    Err(e) => return reply.send(op_error(e).to_reply()),
                };
                metrics::counter!("hongbao_shakes_total", "result" => label).increment(1);
                reply.send(Reply::Shake(result));
            }),
        )
        .await;
    }

    async fn send(&mut self, user: UserId, send: SendArgs, reply: Responder) {
        let SendArgs { amount_fen, count, kind, recipients, greeting, key } = send;
        if let Err(e) = valid_key(&key) {
            return reply.send(e.to_reply());
        }
        let spec = PacketSpec { sender: user, total_fen: amount_fen, count, kind, recipients, greeting };
        if let Err(e) = spec.validate(&self.rules) {
            return reply.send(Reply::error(ErrorCode::InvalidRequest, e.to_string()));
        }
        let Some(id) = self.next_id() else {
            return reply.send(Reply::error(ErrorCode::Overload, "packet ids are being reserved, retry"));
        };
        let now = now_ms();
        let expires_ms = now + self.rules.expiry_s.saturating_mul(1000);
        let packet = Packet::new(id, spec, now, expires_ms);
        let new = NewPacket {
            id,
            sender: user,
            kind: packet.kind,
            total_fen: packet.total_fen,
            count: packet.count,
            recipients: packet.recipients.clone(),
            greeting: packet.greeting.clone(),
            created_ms: now,
            expires_ms,
        };
        let notice = encode_body(&PushBody::PacketReceived {
            packet: id,
            sender: user,
            amount_fen: packet.total_fen,
            count: packet.count,
            kind: packet.kind,
            greeting: packet.greeting.clone(),
        });
        let completions = self.completions.clone();
        let op = Op::FundPacket { packet: Box::new(new), key, notice };
        self.submit(
            op,
            Box::new(move |r| match r {
                Ok(Outcome::Funded { existing: None, messages }) => {
                    // The shard adopts the packet and then replies, so no
                    // open can arrive before the packet is in place.
                    let _ = completions.send(Event::Funded { packet: Box::new(packet), messages, reply });
                }
                Ok(Outcome::Funded { existing: Some(e), .. }) => reply.send(Reply::Sent {
                    packet: e.id,
                    amount_fen: e.total_fen,
                    count: e.count,
                    expires_ms: e.expires_ms,
                    repeat: true,
                }),
                Ok(other) => reply.send(Reply::error(ErrorCode::Internal, format!("unexpected outcome {other:?}"))),
                Err(e) => reply.send(op_error(e).to_reply()),
            }),
        )
        .await;
    }

    fn grab(&mut self, user: UserId, packet: PacketId, reply: Responder) {
        match self.packets.get(&packet) {
            Some(p) => reply.send(Reply::Grab { packet, state: p.grab(user, now_ms()) }),
            None => self.answer_from_storage(user, packet, false, reply),
        }
    }

    /// Questions about packets no longer (or never) in memory are answered
    /// from committed state, off the shard's loop.
    fn answer_from_storage(&self, user: UserId, packet: PacketId, open: bool, reply: Responder) {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let p = match reader.packet(packet) {
                Ok(Some(p)) => p,
                Ok(None) => return reply.send(Reply::error(ErrorCode::NotFound, format!("packet {packet} not found"))),
                Err(e) => return reply.send(Reply::error(ErrorCode::Internal, e.to_string())),
            };
            // Expiry is judged by status here: an open packet not in memory
            // is being loaded or refunded, and is reported as its row says.
            let state = p.grab(user, if p.status == PacketStatus::Refunded { u64::MAX } else { 0 });
            if !open {
                return reply.send(Reply::Grab { packet, state });
            }
            reply.send(match state {
                GrabState::AlreadyOpened { amount_fen } => {
                    Reply::Opened { packet, amount_fen, repeat: true, finished: p.status == PacketStatus::Finished }
                }
                GrabState::NotEligible => open_error_reply(OpenError::NotEligible),
                GrabState::Finished => open_error_reply(OpenError::Finished),
                GrabState::Expired => open_error_reply(OpenError::Expired),
                GrabState::CanOpen => Reply::error(ErrorCode::Overload, "packet is being loaded, retry"),
            })
        });
    }

    async fn open(&mut self, user: UserId, packet: PacketId, reply: Responder) {
        let now = now_ms();
        let Some(p) = self.packets.get_mut(&packet) else {
            return self.answer_from_storage(user, packet, true, reply);
        };
        let decision = match p.open(user, now, &mut self.rng) {
            Ok(d) => d,
            Err(e) => {
                metrics::counter!("hongbao_opens_total", "result" => "rejected").increment(1);
                return reply.send(open_error_reply(e));
            }
        };
        let finished = p.status == PacketStatus::Finished;
        match decision {
            OpenDecision::Repeat { amount_fen } => {
                // The first open may not be committed yet: a barrier completes
                // only after everything queued before it has committed.
                self.submit(
                    Op::Barrier,
                    Box::new(move |r| match r {
                        Ok(_) => reply.send(Reply::Opened { packet, amount_fen, repeat: true, finished }),
                        Err(e) => reply.send(op_error(e).to_reply()),
                    }),
                )
                .await;
            }
            OpenDecision::New { amount_fen, finished, best_luck } => {
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                let seq = (p.claims.len() - 1) as u32;
                let sender = p.sender;
                let remaining_count = p.remaining_count();
                if finished {
                    self.timers.remove(&(p.expires_ms, packet, TimerKind::Expire));
                    self.timers.insert((now + RETAIN_CLOSED_MS, packet, TimerKind::Evict));
                }
                let hub = self.hub.clone();
                let op = Op::Open { packet, user, amount_fen, seq, at_ms: now, finished: best_luck };
                self.submit(
                    op,
                    Box::new(move |r| {
                        if let Err(e) = r {
                            return reply.send(op_error(e).to_reply());
                        }
                        metrics::counter!("hongbao_opens_total", "result" => "opened").increment(1);
                        reply.send(Reply::Opened { packet, amount_fen, repeat: false, finished });
                        // Sender notifications are transient: the packet detail has them all.
                        hub.deliver(
                            sender,
                            &Push {
                                msg: 0,
                                body: PushBody::PacketOpened { packet, user, amount_fen, remaining_count },
                            },
                        );
                        if let Some(best_luck) = best_luck {
                            hub.deliver(sender, &Push { msg: 0, body: PushBody::PacketFinished { packet, best_luck } });
                        }
                    }),
                )
                .await;
            }
        }
    }

    async fn fire_timers(&mut self) {
        let now = now_ms();
        while let Some(&(at, packet, kind)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match kind {
                TimerKind::Evict => {
                    if self.packets.remove(&packet).is_some() {
                        self.counters.packets_in_memory.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                TimerKind::Expire => {
                    let Some(p) = self.packets.get_mut(&packet) else { continue };
                    let Some(amount_fen) = p.expire(now) else { continue };
                    let sender = p.sender;
                    self.timers.insert((now + RETAIN_CLOSED_MS, packet, TimerKind::Evict));
                    let body = PushBody::PacketRefunded { packet, amount_fen };
                    let notice = encode_body(&body);
                    let hub = self.hub.clone();
                    let op = Op::Refund { packet, sender, amount_fen, at_ms: now, notice };
                    self.submit(
                        op,
                        Box::new(move |r| match r {
                            Ok(Outcome::Refunded { message }) => {
                                metrics::counter!("hongbao_refunds_total").increment(1);
                                if let Some(msg) = message {
                                    hub.deliver(sender, &Push { msg, body });
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::error!(packet, error = %e, "refund failed; it is retried after a restart")
                            }
                        }),
                    )
                    .await;
                }
            }
        }
    }

    /// Releases what each campaign share owes by now.
    async fn release(&mut self) {
        let pool_ids: Vec<CampaignId> = self.pools.keys().copied().collect();
        for id in pool_ids {
            loop {
                let pool = self.pools.get_mut(&id).expect("pool exists");
                let due = pool.share.due_after(pool.started.elapsed().as_millis() as u64);
                if pool.released_count >= due {
                    break;
                }
                if pool.ready.len() >= SHAKE_POOL_MAX {
                    // Nobody is shaking: skip these releases rather than pile them up.
                    pool.released_count = due;
                    break;
                }
                if pool.share.exhausted() {
                    break;
                }
                let Some(packet) = self.ids.next_id() else {
                    self.reserve_ids_if_needed();
                    break;
                };
                let pool = self.pools.get_mut(&id).expect("pool exists");
                let Some(amount) = pool.share.release_one(&mut self.rng) else { break };
                pool.ready.push_back((packet, amount));
                pool.released_count += 1;
                pool.live.released.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("hongbao_campaign_released_total").increment(1);
                self.reserve_ids_if_needed();
            }
            let pool = self.pools.get_mut(&id).expect("pool exists");
            if pool.share.exhausted() && pool.ready.is_empty() && !pool.reported_exhausted {
                pool.reported_exhausted = true;
                pool.live.exhausted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
