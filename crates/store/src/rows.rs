//! What a store must do with rows inside one batch's transaction, so that
//! the decisions on each operation (`apply.rs`) are written once and hold
//! on every store.
//!
//! Each method is one read or one write of the batch's transaction. A store
//! may carry a write out at once (SQLite) or collect it and write it in
//! bulk later (PostgreSQL), as long as every read sees every write made
//! before it in the batch, and the uniqueness rules (one claim per user and
//! packet, one win per packet and per shake key, one result per
//! idempotency key) are enforced by the database itself: a write that
//! breaks one fails the batch.

use std::collections::BTreeSet;

use hongbao_core::audit::EntryKind;
use hongbao_core::campaign::CampaignSpec;
use hongbao_core::cross::CrossKind;
use hongbao_core::ledger::{Account, Transfer};
use hongbao_core::packet::Recipients;
use hongbao_core::sets::SetId;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};

use crate::ops::{ExistingPacket, FirstWin, NewPacket, OpenShare, ShakeWin};
use crate::StoreError;

/// The storage's verdict on one step: an error fails the whole batch.
pub(crate) type RowResult<T> = Result<T, StoreError>;

/// What a journal entry is for.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryMeta {
    pub kind: EntryKind,
    /// The packet or campaign id (0 for deposits and withdrawals).
    pub reference: u64,
    /// The user an open or a win credits.
    pub user: Option<UserId>,
    pub at_ms: u64,
}

/// A persistent message's kind: which cap it counts toward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum MessageKind {
    /// Another user's notice (a packet's `packet_received`).
    User,
    /// The operator's or the system's (pushes, refunds).
    System,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::User => "user",
            MessageKind::System => "system",
        }
    }

    pub fn parse(s: &str) -> MessageKind {
        if s == "user" {
            MessageKind::User
        } else {
            MessageKind::System
        }
    }
}

/// An outbox row: a message for SET `to`, unique per `(kind, packet, user)`.
pub(crate) struct CrossOut<'a> {
    pub to: SetId,
    pub kind: CrossKind,
    pub packet: PacketId,
    pub user: UserId,
    /// A credit's amount; 0 for a notice.
    pub amount_fen: i64,
    /// A notice's stored push body.
    pub body: Option<&'a [u8]>,
    pub created_ms: u64,
}

/// An inbox row: a message of SET `from` applied here, unique per
/// `(from, kind, packet, user)`.
pub(crate) struct CrossIn {
    pub from: SetId,
    pub kind: CrossKind,
    pub packet: PacketId,
    pub user: UserId,
    pub amount_fen: i64,
    pub created_ms: u64,
    pub applied_ms: u64,
}

/// A campaign row's identity, for a repeated create.
pub(crate) struct KeyedCampaign {
    pub id: CampaignId,
    pub funder: UserId,
    pub total_fen: i64,
    /// The amount rule as stored (JSON).
    pub rule: String,
}

pub(crate) trait Rows {
    /// The stored `(request, result)` of an idempotency key.
    fn keyed_result(&mut self, scope: &str, key: &str) -> RowResult<Option<(String, String)>>;
    fn insert_keyed_result(&mut self, scope: &str, key: &str, request: &str, result: &str) -> RowResult<()>;

    /// The packet a sender's key funded, with its split kind.
    fn packet_by_key(&mut self, sender: UserId, key: &str) -> RowResult<Option<(ExistingPacket, String)>>;
    fn insert_packet(&mut self, packet: &NewPacket, key: &str) -> RowResult<()>;
    /// What is left in a packet that is still open (`None`: not open or absent).
    fn open_remaining(&mut self, packet: PacketId) -> RowResult<Option<i64>>;
    fn insert_claim(&mut self, open: &OpenShare) -> RowResult<()>;
    fn claim_amount(&mut self, packet: PacketId, user: UserId) -> RowResult<Option<i64>>;
    /// Takes `taken_fen` out of an open packet and finishes it when
    /// `finished` names the best luck. The row must be open and hold at
    /// least that much: anything else is a bug (the store asserts it).
    fn write_opens(&mut self, packet: PacketId, taken_fen: i64, finished: Option<UserId>) -> RowResult<()>;
    /// Marks an open packet holding exactly `amount_fen` refunded; false if
    /// no such row.
    fn refund_packet(&mut self, packet: PacketId, amount_fen: i64) -> RowResult<bool>;

    fn raise_id_mark(&mut self, shard: u16, mark: u64) -> RowResult<()>;

    fn campaign_by_key(&mut self, key: &str) -> RowResult<Option<KeyedCampaign>>;
    fn insert_campaign(
        &mut self,
        id: CampaignId,
        spec: &CampaignSpec,
        rule: &str,
        at_ms: u64,
        key: &str,
    ) -> RowResult<()>;
    /// Sets a campaign that is not closed running; false if none.
    fn start_campaign(&mut self, id: CampaignId) -> RowResult<bool>;
    /// A campaign's funder and stored status.
    fn campaign_state(&mut self, id: CampaignId) -> RowResult<Option<(UserId, String)>>;
    fn set_campaign_status(&mut self, id: CampaignId, status: &str) -> RowResult<()>;

    fn shake_win_by_key(&mut self, user: UserId, key: &str) -> RowResult<Option<FirstWin>>;
    fn packet_won(&mut self, packet: PacketId) -> RowResult<bool>;
    fn insert_shake_win(&mut self, win: &ShakeWin) -> RowResult<()>;

    /// Stores a message; answers its id.
    fn insert_message(
        &mut self,
        user: UserId,
        body: &[u8],
        at_ms: u64,
        kind: MessageKind,
        sender: UserId,
    ) -> RowResult<u64>;
    /// Deletes all but the newest `kept` messages of each `(user, kind)`;
    /// answers the kind and sender of each message deleted.
    fn prune_messages(
        &mut self,
        owners: &BTreeSet<(UserId, MessageKind)>,
        kept: impl Fn(MessageKind) -> usize,
    ) -> RowResult<Vec<(MessageKind, UserId)>>;
    /// Deletes a user's message; answers its kind and sender if it existed.
    fn delete_message(&mut self, id: u64, user: UserId) -> RowResult<Option<(MessageKind, UserId)>>;

    fn group_members(&mut self, group: GroupId) -> RowResult<Vec<UserId>>;
    fn replace_group(&mut self, group: GroupId, members: &BTreeSet<UserId>) -> RowResult<()>;

    fn insert_cross_out(&mut self, row: &CrossOut<'_>) -> RowResult<()>;
    /// The amount of an applied inbox message (0 for a notice); `None` if
    /// it was not applied.
    fn cross_in_amount(
        &mut self,
        from: SetId,
        kind: CrossKind,
        packet: PacketId,
        user: UserId,
    ) -> RowResult<Option<i64>>;
    fn insert_cross_in(&mut self, row: &CrossIn) -> RowResult<()>;
    /// Marks outbox rows published; answers how many were not before.
    fn mark_cross_published(&mut self, keys: &[(CrossKind, PacketId, UserId)]) -> RowResult<u64>;

    fn insert_entry(&mut self, transfer: &Transfer, meta: EntryMeta) -> RowResult<()>;
    /// Writes the balances a batch changed (after its last operation).
    fn write_balances(&mut self, balances: &[(Account, i64)]) -> RowResult<()>;
}

/// How a packet row names its recipients: `group`, `users` or `user`, and
/// the group's id.
pub(crate) fn target_of(recipients: &Recipients) -> (&'static str, Option<i64>) {
    match recipients {
        Recipients::Group { group, .. } => ("group", Some(*group as i64)),
        Recipients::Users(_) => ("users", None),
        Recipients::User(_) => ("user", None),
    }
}

/// A packet row's recipient list: sorted little-endian u64 user ids.
pub(crate) fn encode_users(users: &[u64]) -> Vec<u8> {
    users.iter().flat_map(|u| u.to_le_bytes()).collect()
}

pub(crate) fn decode_users(blob: &[u8]) -> Result<Vec<u64>, StoreError> {
    if !blob.len().is_multiple_of(8) {
        return Err(StoreError::Corrupt("recipient list is not a multiple of 8 bytes".into()));
    }
    Ok(blob.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}
