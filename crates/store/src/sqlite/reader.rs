//! Reads of committed state on SQLite. Reads never block the writer (WAL).

use std::collections::HashMap;
use std::sync::Mutex;

use hongbao_core::ledger::Account;
use hongbao_core::packet::{Claim, Packet};
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::reader::{
    campaigns_sql, CampaignFields, CampaignRow, CrossOutFields, PacketFields, CROSS_OUT_COLUMNS, PACKET_COLUMNS,
};
use crate::StoreError;

/// Reads of committed state over a few connections. Each read takes one
/// free connection; the engine bounds how many reads run at once (no more
/// than there are connections), so a read never waits here for long.
pub(crate) struct SqliteReader {
    conns: Box<[Mutex<Connection>]>,
}

fn packet_from_row(r: &Row<'_>) -> rusqlite::Result<PacketFields> {
    Ok(PacketFields {
        id: r.get(0)?,
        sender: r.get(1)?,
        kind: r.get(2)?,
        total_fen: r.get(3)?,
        count: r.get(4)?,
        target: r.get(5)?,
        group: r.get(6)?,
        recipients: r.get(7)?,
        greeting: r.get(8)?,
        created_ms: r.get(9)?,
        expires_ms: r.get(10)?,
        remaining_fen: r.get(11)?,
        refunded_fen: r.get(12)?,
        status: r.get(13)?,
    })
}

impl SqliteReader {
    pub(crate) fn new(conns: Vec<Connection>) -> SqliteReader {
        assert!(!conns.is_empty());
        SqliteReader { conns: conns.into_iter().map(Mutex::new).collect() }
    }

    /// How many reads can run at once.
    pub(crate) fn connections(&self) -> usize {
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

    pub(crate) fn balance(&self, user: UserId) -> Result<i64, StoreError> {
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
    pub(crate) fn packet(&self, id: PacketId) -> Result<Option<Packet>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {PACKET_COLUMNS} FROM packets WHERE id = ?1");
        let Some(fields) = conn.prepare_cached(&sql)?.query_row(params![id as i64], packet_from_row).optional()? else {
            return Ok(None);
        };
        let mut p = fields.into_packet()?;
        p.claims = Self::claims(&conn, id)?;
        Ok(Some(p))
    }

    /// Every packet still open, with its claims.
    pub(crate) fn open_packets(&self) -> Result<Vec<Packet>, StoreError> {
        let conn = self.conn();
        let sql = format!("SELECT {PACKET_COLUMNS} FROM packets WHERE status = 'open' ORDER BY id");
        let mut packets: Vec<Packet> = Vec::new();
        for row in conn.prepare(&sql)?.query_map([], packet_from_row)? {
            packets.push(row?.into_packet()?);
        }
        for p in &mut packets {
            p.claims = Self::claims(&conn, p.id)?;
            p.assert_invariants();
        }
        Ok(packets)
    }

    pub(crate) fn id_marks(&self) -> Result<HashMap<u16, u64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT shard, mark FROM id_marks")?;
        let marks = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u16, r.get::<_, i64>(1)? as u64)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(marks)
    }

    pub(crate) fn groups(&self) -> Result<HashMap<GroupId, Vec<UserId>>, StoreError> {
        let conn = self.conn();
        let mut groups: HashMap<GroupId, Vec<UserId>> = HashMap::new();
        let mut stmt = conn.prepare("SELECT grp, user FROM group_members ORDER BY grp, user")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))? {
            let (g, u) = row?;
            groups.entry(g).or_default().push(u);
        }
        Ok(groups)
    }

    /// One campaign (`Some(id)`) or all of them, with their sums.
    pub(crate) fn campaigns(&self, only: Option<CampaignId>) -> Result<Vec<CampaignRow>, StoreError> {
        let conn = self.conn();
        let sql = campaigns_sql(if only.is_some() { "WHERE c.id = ?1" } else { "" }, "shake_wins");
        let mut stmt = conn.prepare(&sql)?;
        let args: Vec<i64> = only.map(|id| id as i64).into_iter().collect();
        let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
            Ok(CampaignFields {
                id: r.get(0)?,
                funder: r.get(1)?,
                total_fen: r.get(2)?,
                rule: r.get(3)?,
                rate_per_s: r.get(4)?,
                win_cap: r.get(5)?,
                status: r.get(6)?,
                created_ms: r.get(7)?,
                won: r.get(8)?,
                won_fen: r.get(9)?,
                refunded_fen: r.get(10)?,
                escrow_fen: r.get(11)?,
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?.into_row()?);
        }
        Ok(out)
    }

    /// The first win of a shake key, as committed: (campaign, packet, amount).
    pub(crate) fn first_shake_win(
        &self,
        user: UserId,
        key: &str,
    ) -> Result<Option<(CampaignId, PacketId, i64)>, StoreError> {
        let first: Option<(i64, i64, i64)> = self
            .conn()
            .prepare_cached("SELECT campaign, packet, amount FROM shake_wins WHERE user = ?1 AND idem_key = ?2")?
            .query_row(params![user as i64, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        Ok(first.map(|(c, p, a)| (c as u64, p as u64, a)))
    }

    /// Wins per user in one campaign (for win caps after a restart).
    pub(crate) fn win_counts(&self, campaign: CampaignId) -> Result<HashMap<UserId, u32>, StoreError> {
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
    pub(crate) fn messages(&self, user: UserId, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        const _: () = assert!(b"system"[0] < b"user"[0]);
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT id, body FROM messages WHERE user = ?1 ORDER BY kind, id LIMIT ?2")?;
        let msgs = stmt
            .query_map(params![user as i64, limit as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(msgs)
    }

    /// Unpublished outbox rows, oldest first: the partial index
    /// `cross_out_unpublished` holds exactly these, in this order.
    pub(crate) fn cross_unpublished(&self, limit: usize) -> Result<Vec<CrossOutFields>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&cross_unpublished_sql())?;
        let rows = stmt
            .query_map(params![limit as i64], |r| {
                Ok(CrossOutFields {
                    kind: r.get(0)?,
                    to: r.get(1)?,
                    packet: r.get(2)?,
                    user: r.get(3)?,
                    amount_fen: r.get(4)?,
                    body: r.get(5)?,
                    created_ms: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}

pub(crate) fn cross_unpublished_sql() -> String {
    format!("SELECT {CROSS_OUT_COLUMNS} FROM cross_out WHERE published = 0 ORDER BY id LIMIT ?1")
}
