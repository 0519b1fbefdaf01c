//! Reads of committed state: queries for the admin API and clients, and the
//! recovery load at start-up, on whichever store is open. Rows become
//! values here, once for every store.

use std::collections::HashMap;

use hongbao_core::campaign::{AmountRule, CampaignSpec, CampaignStatus};
use hongbao_core::cross::{CrossBody, CrossKind, CrossMessage};
use hongbao_core::packet::{Packet, PacketStatus, Recipients};
use hongbao_core::sets::SetId;
use hongbao_core::split::SplitKind;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};

use crate::postgres::reader::PgReader;
use crate::rows::decode_users;
use crate::sqlite::reader::SqliteReader;
use crate::StoreError;

/// A campaign as stored, with what its entries say so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CampaignRow {
    pub id: CampaignId,
    pub spec: CampaignSpec,
    pub status: CampaignStatus,
    pub created_ms: u64,
    pub won: u64,
    pub won_fen: i64,
    pub refunded_fen: i64,
    pub escrow_fen: i64,
}

/// Money totals by account kind, for stats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MoneyTotals {
    pub user_balances_fen: i64,
    pub packet_escrow_fen: i64,
    pub campaign_escrow_fen: i64,
    pub world_fen: i64,
    /// What this SET owes the other SETs, net (0 on a single node).
    pub transit_fen: i64,
}

/// Reads of committed state over a few connections. Each read takes one
/// free connection; the engine bounds how many reads run at once (no more
/// than there are connections), so a read never waits here for long.
pub struct Reader(Store);

enum Store {
    Sqlite(SqliteReader),
    Postgres(Box<PgReader>),
}

macro_rules! each_store {
    ($self:ident, $r:ident => $e:expr) => {
        match &$self.0 {
            Store::Sqlite($r) => $e,
            Store::Postgres($r) => $e,
        }
    };
}

impl Reader {
    pub(crate) fn sqlite(reader: SqliteReader) -> Reader {
        Reader(Store::Sqlite(reader))
    }

    pub(crate) fn postgres(reader: PgReader) -> Reader {
        Reader(Store::Postgres(Box::new(reader)))
    }

    /// How many reads can run at once.
    pub fn connections(&self) -> usize {
        each_store!(self, r => r.connections())
    }

    /// A user's committed balance (0 if the user never held money).
    pub fn balance(&self, user: UserId) -> Result<i64, StoreError> {
        each_store!(self, r => r.balance(user))
    }

    /// A packet with all its claims, as committed.
    pub fn packet(&self, id: PacketId) -> Result<Option<Packet>, StoreError> {
        each_store!(self, r => r.packet(id))
    }

    /// Every packet still open, with its claims: the shards' state after a restart.
    pub fn open_packets(&self) -> Result<Vec<Packet>, StoreError> {
        each_store!(self, r => r.open_packets())
    }

    /// Each shard's durable packet-id mark.
    pub fn id_marks(&self) -> Result<HashMap<u16, u64>, StoreError> {
        each_store!(self, r => r.id_marks())
    }

    /// Every group's members, sorted.
    pub fn groups(&self) -> Result<HashMap<GroupId, Vec<UserId>>, StoreError> {
        each_store!(self, r => r.groups())
    }

    pub fn campaign(&self, id: CampaignId) -> Result<Option<CampaignRow>, StoreError> {
        each_store!(self, r => Ok(r.campaigns(Some(id))?.pop()))
    }

    pub fn campaigns(&self) -> Result<Vec<CampaignRow>, StoreError> {
        each_store!(self, r => r.campaigns(None))
    }

    /// The first win of a shake key, as committed: (campaign, packet, amount).
    pub fn first_shake_win(&self, user: UserId, key: &str) -> Result<Option<(CampaignId, PacketId, i64)>, StoreError> {
        each_store!(self, r => r.first_shake_win(user, key))
    }

    /// Wins per user in one campaign (for win caps after a restart).
    pub fn win_counts(&self, campaign: CampaignId) -> Result<HashMap<UserId, u32>, StoreError> {
        each_store!(self, r => r.win_counts(campaign))
    }

    /// A user's persistent messages, at most `limit`: system messages first
    /// (a flood of notices from other users cannot hide an operator's
    /// message), each kind oldest first.
    pub fn messages(&self, user: UserId, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        each_store!(self, r => r.messages(user, limit))
    }

    /// The outbox rows not yet marked published, oldest first, at most
    /// `limit`, as messages from SET `from` (this store's SET).
    pub fn cross_unpublished(&self, from: SetId, limit: usize) -> Result<Vec<CrossMessage>, StoreError> {
        let rows = each_store!(self, r => r.cross_unpublished(limit))?;
        rows.into_iter().map(|row| row.into_message(from)).collect()
    }
}

/// An outbox row as stored, before it is checked.
pub(crate) struct CrossOutFields {
    pub kind: String,
    pub to: i64,
    pub packet: i64,
    pub user: i64,
    pub amount_fen: i64,
    pub body: Option<Vec<u8>>,
    pub created_ms: i64,
}

/// The columns `CrossOutFields` reads, in its order.
pub(crate) const CROSS_OUT_COLUMNS: &str = "kind, to_set, packet, user, amount, body, created_ms";

impl CrossOutFields {
    pub(crate) fn into_message(self, from: SetId) -> Result<CrossMessage, StoreError> {
        let what = || format!("outbox row ({}, packet {}, user {})", self.kind, self.packet, self.user);
        let body = match (CrossKind::parse(&self.kind), self.body) {
            (Some(CrossKind::Credit), None) if self.amount_fen > 0 => CrossBody::Credit { amount_fen: self.amount_fen },
            (Some(CrossKind::Notice), Some(body)) => CrossBody::Notice { body },
            (Some(CrossKind::Refund), None) if self.amount_fen > 0 => CrossBody::Refund { amount_fen: self.amount_fen },
            (Some(CrossKind::Fund), Some(body)) => match serde_json::from_slice::<CampaignSpec>(&body) {
                Ok(spec) if spec.total_fen == self.amount_fen => CrossBody::Fund { spec },
                _ => return Err(corrupt(what())),
            },
            _ => return Err(corrupt(what())),
        };
        Ok(CrossMessage {
            from,
            to: SetId::try_from(self.to).map_err(|_| corrupt(what()))?,
            packet: self.packet as u64,
            user: self.user as u64,
            created_ms: self.created_ms as u64,
            body,
        })
    }
}

pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

/// A packet row as stored, before it is checked.
pub(crate) struct PacketFields {
    pub id: i64,
    pub sender: i64,
    pub kind: String,
    pub total_fen: i64,
    pub count: i64,
    pub target: String,
    pub group: Option<i64>,
    pub recipients: Vec<u8>,
    pub greeting: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub remaining_fen: i64,
    pub refunded_fen: i64,
    pub status: String,
}

/// The columns `PacketFields` reads, in its order.
pub(crate) const PACKET_COLUMNS: &str =
    "id, sender, kind, total, count, target, grp, recipients, greeting, created_ms, expires_ms, remaining, refunded, status";

impl PacketFields {
    /// The packet, without its claims; a kind, status or recipient list
    /// this build does not know is reported as corrupt.
    pub(crate) fn into_packet(self) -> Result<Packet, StoreError> {
        let id = self.id as u64;
        let users = decode_users(&self.recipients)?;
        let recipients = match self.target.as_str() {
            "group" => Recipients::Group {
                group: self.group.ok_or_else(|| corrupt(format!("group packet {id} has no group")))? as u64,
                members: users.into_boxed_slice(),
            },
            "user" if users.len() == 1 => Recipients::User(users[0]),
            _ => Recipients::Users(users.into_boxed_slice()),
        };
        let bad = || corrupt(format!("packet {id} has kind/status {}/{}", self.kind, self.status));
        Ok(Packet {
            id,
            sender: self.sender as u64,
            kind: SplitKind::parse(&self.kind).ok_or_else(bad)?,
            total_fen: self.total_fen,
            count: u32::try_from(self.count).map_err(|_| corrupt(format!("packet {id} count {}", self.count)))?,
            recipients,
            greeting: self.greeting,
            created_ms: self.created_ms as u64,
            expires_ms: self.expires_ms as u64,
            remaining_fen: self.remaining_fen,
            refunded_fen: self.refunded_fen,
            claims: Vec::new(),
            status: PacketStatus::parse(&self.status).ok_or_else(bad)?,
        })
    }
}

/// A campaign row with its sums, before it is checked.
pub(crate) struct CampaignFields {
    pub id: i64,
    pub funder: i64,
    pub total_fen: i64,
    pub rule: String,
    pub rate_per_s: i64,
    pub win_cap: Option<i64>,
    pub status: String,
    pub created_ms: i64,
    pub won: i64,
    pub won_fen: i64,
    pub refunded_fen: i64,
    pub escrow_fen: Option<i64>,
}

/// The campaign query both stores run; `{filter}` is empty or `WHERE c.id =
/// <param>`; `wins` is the table (or view) of every shake win.
pub(crate) fn campaigns_sql(filter: &str, wins: &str) -> String {
    format!(
        "SELECT c.id, c.funder, c.total, c.rule, c.rate_per_s, c.win_cap, c.status, c.created_ms,
                (SELECT count(*) FROM {wins} w WHERE w.campaign = c.id),
                CAST((SELECT coalesce(sum(amount), 0) FROM {wins} w WHERE w.campaign = c.id) AS BIGINT),
                CAST((SELECT coalesce(sum(amount), 0) FROM entries e WHERE e.kind IN ('campaign_refund', 'campaign_refund_out') AND e.reference = c.id) AS BIGINT),
                (SELECT balance FROM accounts a WHERE a.id = ((CAST(3 AS BIGINT) << 56) | c.id))
         FROM campaigns c {filter} ORDER BY c.id"
    )
}

impl CampaignFields {
    pub(crate) fn into_row(self) -> Result<CampaignRow, StoreError> {
        let id = self.id as u64;
        let rule: AmountRule =
            serde_json::from_str(&self.rule).map_err(|e| corrupt(format!("campaign {id} rule: {e}")))?;
        let status = CampaignStatus::parse(&self.status)
            .ok_or_else(|| corrupt(format!("campaign {id} status {}", self.status)))?;
        let number = |what: &str, v: i64| u32::try_from(v).map_err(|_| corrupt(format!("campaign {id} {what} {v}")));
        Ok(CampaignRow {
            id,
            spec: CampaignSpec {
                funder: self.funder as u64,
                total_fen: self.total_fen,
                rule,
                rate_per_s: number("rate", self.rate_per_s)?,
                win_cap_per_user: self.win_cap.map(|c| number("win cap", c)).transpose()?,
            },
            status,
            created_ms: self.created_ms as u64,
            won: self.won as u64,
            won_fen: self.won_fen,
            refunded_fen: self.refunded_fen,
            escrow_fen: self.escrow_fen.unwrap_or(0),
        })
    }
}
