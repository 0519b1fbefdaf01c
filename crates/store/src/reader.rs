//! Reads of committed state: queries for the admin API and clients, and the
//! recovery load at start-up. Reads never block the writer (WAL).

use std::collections::HashMap;
use std::sync::Mutex;

use hongbao_core::campaign::{AmountRule, CampaignSpec, CampaignStatus};
use hongbao_core::ledger::Account;
use hongbao_core::packet::{Claim, Packet, PacketStatus, Recipients};
use hongbao_core::split::SplitKind;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::schema::decode_users;
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
}

/// Reads of committed state over a few connections. Each read takes one
/// free connection; the engine bounds how many reads run at once (no more
/// than there are connections), so a read never waits here for long.
pub struct Reader {
    conns: Box<[Mutex<Connection>]>,
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

const PACKET_COLUMNS: &str =
    "id, sender, kind, total, count, target, grp, recipients, greeting, created_ms, expires_ms, remaining, refunded, status";

fn packet_from_row(r: &Row<'_>) -> rusqlite::Result<(Packet, String)> {
    let recipients_blob: Vec<u8> = r.get(7)?;
    let target: String = r.get(5)?;
    let users = decode_users(&recipients_blob).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let recipients = match target.as_str() {
        "group" => Recipients::Group { group: r.get::<_, i64>(6)? as u64, members: users.into_boxed_slice() },
        "user" if users.len() == 1 => Recipients::User(users[0]),
        _ => Recipients::Users(users.into_boxed_slice()),
    };
    let kind: String = r.get(2)?;
    let status: String = r.get(13)?;
    let packet = Packet {
        id: r.get::<_, i64>(0)? as u64,
        sender: r.get::<_, i64>(1)? as u64,
        kind: SplitKind::parse(&kind).unwrap_or(SplitKind::Lucky),
        total_fen: r.get(3)?,
        count: r.get(4)?,
        recipients,
        greeting: r.get(8)?,
        created_ms: r.get::<_, i64>(9)? as u64,
        expires_ms: r.get::<_, i64>(10)? as u64,
        remaining_fen: r.get(11)?,
        refunded_fen: r.get(12)?,
        claims: Vec::new(),
        status: PacketStatus::parse(&status).unwrap_or(PacketStatus::Open),
    };
    Ok((packet, format!("{kind}/{status}")))
}

impl Reader {
    pub(crate) fn new(conns: Vec<Connection>) -> Reader {
        assert!(!conns.is_empty());
        Reader { conns: conns.into_iter().map(Mutex::new).collect() }
    }

    /// How many reads can run at once.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// A free connection, else (more reads than connections) the first.
    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A poisoned connection is still usable: a statement cut short by a
        // panic is reset when it is next prepared.
        for conn in self.conns.iter() {
            match conn.try_lock() {
                Ok(guard) => return guard,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        self.conns[0].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn balance(&self, user: UserId) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT balance FROM accounts WHERE id = ?1")?
            .query_row(params![Account::user(user).id()], |r| r.get(0))
            .optional()?
            .unwrap_or(0))
    }

    fn claims(conn: &Connection, packet: PacketId) -> Result<Vec<Claim>, StoreError> {
        Ok(conn
            .prepare_cached("SELECT user, amount, at_ms FROM claims WHERE packet = ?1 ORDER BY seq")?
            .query_map(params![packet as i64], |r| {
                Ok(Claim { user: r.get::<_, i64>(0)? as u64, amount_fen: r.get(1)?, at_ms: r.get::<_, i64>(2)? as u64 })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// A packet with all its claims, as committed.
    pub fn packet(&self, id: PacketId) -> Result<Option<Packet>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {PACKET_COLUMNS} FROM packets WHERE id = ?1");
        let Some((mut p, tag)) =
            conn.prepare_cached(&sql)?.query_row(params![id as i64], packet_from_row).optional()?
        else {
            return Ok(None);
        };
        check_tag(&p, &tag)?;
        p.claims = Self::claims(&conn, id)?;
        Ok(Some(p))
    }

    /// Every packet still open, with its claims: the shards' state after a restart.
    pub fn open_packets(&self) -> Result<Vec<Packet>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {PACKET_COLUMNS} FROM packets WHERE status = 'open' ORDER BY id");
        let mut packets: Vec<Packet> = Vec::new();
        for row in conn.prepare(&sql)?.query_map([], packet_from_row)? {
            let (p, tag) = row?;
            check_tag(&p, &tag)?;
            packets.push(p);
        }
        for p in &mut packets {
            p.claims = Self::claims(&conn, p.id)?;
            p.assert_invariants();
        }
        Ok(packets)
    }

    pub fn id_marks(&self) -> Result<HashMap<u16, u64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT shard, mark FROM id_marks")?;
        let marks = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u16, r.get::<_, i64>(1)? as u64)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(marks)
    }

    pub fn groups(&self) -> Result<HashMap<GroupId, Vec<UserId>>, StoreError> {
        let conn = self.conn();
        let mut groups: HashMap<GroupId, Vec<UserId>> = HashMap::new();
        let mut stmt = conn.prepare("SELECT grp, user FROM group_members ORDER BY grp, user")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))? {
            let (g, u) = row?;
            groups.entry(g).or_default().push(u);
        }
        Ok(groups)
    }

    pub fn campaign(&self, id: CampaignId) -> Result<Option<CampaignRow>, StoreError> {
        Ok(self.campaigns_where("WHERE c.id = ?1", params![id as i64])?.pop())
    }

    pub fn campaigns(&self) -> Result<Vec<CampaignRow>, StoreError> {
        self.campaigns_where("", params![])
    }

    fn campaigns_where(&self, filter: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<CampaignRow>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT c.id, c.funder, c.total, c.rule, c.rate_per_s, c.win_cap, c.status, c.created_ms,
                    (SELECT count(*) FROM shake_wins w WHERE w.campaign = c.id),
                    (SELECT coalesce(sum(amount), 0) FROM shake_wins w WHERE w.campaign = c.id),
                    (SELECT coalesce(sum(amount), 0) FROM entries e WHERE e.kind = 'campaign_refund' AND e.reference = c.id),
                    (SELECT balance FROM accounts a WHERE a.id = ((3 << 56) | c.id))
             FROM campaigns c {filter} ORDER BY c.id"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(args, |r| {
            let rule: String = r.get(3)?;
            let status: String = r.get(6)?;
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)?,
                rule,
                r.get::<_, u32>(4)?,
                r.get::<_, Option<u32>>(5)?,
                status,
                r.get::<_, i64>(7)? as u64,
                (
                    r.get::<_, i64>(8)? as u64,
                    r.get::<_, i64>(9)?,
                    r.get::<_, i64>(10)?,
                    r.get::<_, Option<i64>>(11)?.unwrap_or(0),
                ),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                funder,
                total_fen,
                rule,
                rate_per_s,
                win_cap_per_user,
                status,
                created_ms,
                (won, won_fen, refunded_fen, escrow_fen),
            ) = row?;
            let rule: AmountRule =
                serde_json::from_str(&rule).map_err(|e| corrupt(format!("campaign {id} rule: {e}")))?;
            let status =
                CampaignStatus::parse(&status).ok_or_else(|| corrupt(format!("campaign {id} status {status}")))?;
            out.push(CampaignRow {
                id,
                spec: CampaignSpec { funder, total_fen, rule, rate_per_s, win_cap_per_user },
                status,
                created_ms,
                won,
                won_fen,
                refunded_fen,
                escrow_fen,
            });
        }
        Ok(out)
    }

    /// The first win of a shake key, as committed: (campaign, packet, amount).
    pub fn first_shake_win(&self, user: UserId, key: &str) -> Result<Option<(CampaignId, PacketId, i64)>, StoreError> {
        let first: Option<(i64, i64, i64)> = self
            .conn()
            .prepare_cached("SELECT campaign, packet, amount FROM shake_wins WHERE user = ?1 AND idem_key = ?2")?
            .query_row(params![user as i64, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        Ok(first.map(|(c, p, a)| (c as u64, p as u64, a)))
    }

    /// Wins per user in one campaign (for win caps after a restart).
    pub fn win_counts(&self, campaign: CampaignId) -> Result<HashMap<UserId, u32>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT user, count(*) FROM shake_wins WHERE campaign = ?1 GROUP BY user")?;
        let counts = stmt
            .query_map(params![campaign as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, u32>(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(counts)
    }

    /// A user's persistent messages, at most `limit`: system messages first
    /// (a flood of notices from other users cannot hide an operator's
    /// message), each kind oldest first. `'system'` sorts before `'user'`,
    /// so the order is the index's (`messages_by_user_kind`): no sort.
    pub fn messages(&self, user: UserId, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        const _: () = assert!(b"system"[0] < b"user"[0]);
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT id, body FROM messages WHERE user = ?1 ORDER BY kind, id LIMIT ?2")?;
        let msgs = stmt
            .query_map(params![user as i64, limit as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(msgs)
    }
}

fn check_tag(p: &Packet, tag: &str) -> Result<(), StoreError> {
    let (kind, status) = tag.split_once('/').unwrap_or((tag, ""));
    if SplitKind::parse(kind).is_none() || PacketStatus::parse(status).is_none() {
        return Err(corrupt(format!("packet {} has kind/status {tag}", p.id)));
    }
    Ok(())
}
