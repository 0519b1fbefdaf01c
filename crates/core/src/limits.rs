//! Every bound in the system, in one place. Names carry their unit last.
//!
//! Compile-time assertions at the bottom check how the limits relate, so a
//! change that breaks a relation fails the build instead of production.

/// Largest frame body a client may send or receive (binary or WebSocket).
pub const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Frames queued for one connection before it is considered too slow and closed.
pub const CONNECTION_OUTBOX_FRAMES_MAX: usize = 256;
/// Requests one connection may have in flight (sent, not yet answered).
pub const CONNECTION_INFLIGHT_MAX: usize = 64;
/// Requests queued for one shard before new ones are answered OVERLOAD.
pub const SHARD_QUEUE_MAX: usize = 16 * 1024;
/// Operations queued for the group-commit writer; shards wait when it is full.
pub const WRITER_QUEUE_MAX: usize = 32 * 1024;
/// Operations applied in one transaction (one fsync).
pub const COMMIT_BATCH_RECORDS_MAX: usize = 4096;
/// Packet ids a shard reserves durably at a time.
pub const ID_BLOCK_SIZE: u64 = 10_000;
/// Released-but-unclaimed shake packets one shard holds per campaign. While a
/// pool is full (nobody is shaking) the releases due meanwhile are skipped,
/// not queued: their money stays in the campaign's escrow until it closes.
pub const SHAKE_POOL_MAX: usize = 100_000;
/// Members of one group (WeChat's group limit).
pub const GROUP_MEMBERS_MAX: usize = 500;
/// Explicit recipients of one packet.
pub const PACKET_RECIPIENTS_MAX: usize = 500;
/// Greeting text of a packet, in bytes.
pub const GREETING_BYTES_MAX: usize = 256;
/// Idempotency key length in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 64;
/// Notices from other users (a packet was sent to you) kept for one offline
/// user; older ones are dropped first. Counted apart from system messages.
pub const PENDING_MESSAGES_PER_USER_MAX: usize = 1000;
/// System messages (operator pushes, refunds) kept for one offline user;
/// only newer system messages drop older ones, never user traffic.
pub const PENDING_SYSTEM_MESSAGES_PER_USER_MAX: usize = 1000;
/// Undelivered notices one sender may have stored across all recipients: a
/// send that would pass it is refused (`rate_limited`) until they are read.
/// 20 sends to full 500-member groups of offline users.
pub const PENDING_MESSAGES_PER_SENDER_MAX: usize = 10_000;
/// Persistent messages delivered on connect in one go.
pub const MESSAGES_ON_CONNECT_MAX: usize = 200;
/// Largest amount any single request may move (deposits, campaign funds), fen.
/// 10^12 fen = 10 billion yuan: far above any real need, far below overflow.
pub const AMOUNT_FEN_MAX: i64 = 1_000_000_000_000;
/// Shake packets in one campaign.
pub const CAMPAIGN_PACKETS_MAX: u64 = 100_000_000;
/// Release rate of one campaign, packets per second.
pub const CAMPAIGN_RATE_PER_S_MAX: u32 = 1_000_000;
/// Shards per server: the shard number lives in 8 bits of a packet id.
pub const SHARDS_MAX: usize = 256;
/// Devices of one user connected at once to one gateway.
pub const DEVICES_PER_USER_MAX: usize = 8;
/// Reads of storage (packet details, packets no longer in memory, stored
/// messages on connect, admin queries) running at once: the reader threads,
/// one per reader connection, so a flood of reads cannot take the blocking
/// thread pool (it grew to 516 threads) or starve other users' reads.
pub const STORAGE_READS_INFLIGHT_MAX: usize = 4;
/// Reads waiting for a reader; beyond this a read is answered `overload`.
pub const STORAGE_READS_WAITING_MAX: usize = 1024;
/// Cross-SET outbox rows handed out by one `cross_unpublished`, and keys
/// marked published by one `cross_published`: one read and one writer
/// operation stay small whatever the backlog.
pub const CROSS_MESSAGES_PER_CALL_MAX: usize = 4096;
/// A cross-SET notice's body (a stored push), bytes: it becomes a message
/// the user is sent in one frame.
pub const CROSS_NOTICE_BYTES_MAX: usize = FRAME_BYTES_MAX;

const _: () = assert!(CAMPAIGN_PACKETS_MAX <= u32::MAX as u64);
const _: () = assert!(COMMIT_BATCH_RECORDS_MAX <= WRITER_QUEUE_MAX);
const _: () = assert!(CROSS_MESSAGES_PER_CALL_MAX <= COMMIT_BATCH_RECORDS_MAX);
const _: () = assert!(CONNECTION_INFLIGHT_MAX < CONNECTION_OUTBOX_FRAMES_MAX);
const _: () = assert!(PACKET_RECIPIENTS_MAX <= GROUP_MEMBERS_MAX);
const _: () = assert!(MESSAGES_ON_CONNECT_MAX < CONNECTION_OUTBOX_FRAMES_MAX);
// One send to a full group always fits a sender's budget.
const _: () = assert!(GROUP_MEMBERS_MAX <= PENDING_MESSAGES_PER_SENDER_MAX);
// The sum of all amounts the system can hold must stay far from i64 overflow.
const _: () = assert!(AMOUNT_FEN_MAX < i64::MAX / 1_000_000);

/// Configurable rules for group packets (DESIGN.md §3); defaults follow WeChat.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PacketRules {
    /// Largest total of one packet, fen.
    pub amount_fen_max: i64,
    /// Largest number of shares in one packet.
    pub count_max: u32,
    /// Seconds until an unopened remainder is refunded.
    pub expiry_s: u64,
    /// Packets one user may send per second, on average.
    pub sends_per_s: u32,
    /// Packets one user may send at once before the rate applies.
    pub send_burst: u32,
}

impl Default for PacketRules {
    fn default() -> Self {
        // 10 a second with bursts of 20: far above what a person sends, far
        // below a spammer's 1,000 packets in 10 s (issue 9).
        PacketRules { amount_fen_max: 20_000, count_max: 100, expiry_s: 24 * 3600, sends_per_s: 10, send_burst: 20 }
    }
}
