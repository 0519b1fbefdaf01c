//! Reads of committed state on PostgreSQL, over a few connections of their
//! own. A connection that broke (the server restarted, a failover) is
//! replaced on its next use, so reads recover by themselves with the server.

use std::collections::HashMap;
use std::sync::Mutex;

use hongbao_core::ledger::Account;
use hongbao_core::packet::{Claim, Packet};
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use postgres::{Client, Row};

use super::PgTarget;
use crate::reader::{campaigns_sql, CampaignFields, CampaignRow, CrossOutFields, PacketFields, PACKET_COLUMNS};
use crate::StoreError;

pub(crate) struct PgReader {
    target: PgTarget,
    /// `None` until connected, and again after the connection broke.
    conns: Box<[Mutex<Option<Client>>]>,
}

/// A blocking client closes its connection on drop by running its own
/// small runtime, which may not happen on a thread that drives a tokio
/// runtime: dropped there, the connections are closed on a thread of
/// their own.
impl Drop for PgReader {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            let conns = std::mem::take(&mut self.conns);
            let _ = std::thread::Builder::new().name("hongbao-pg-close".into()).spawn(move || drop(conns));
        }
    }
}

/// A packet by id, hot or archived: the id names its day, and `day = $2`
/// makes each side read one partition (a test reads the plan).
pub(crate) fn packet_by_id_sql() -> String {
    format!("SELECT {PACKET_COLUMNS} FROM all_packets WHERE id = $1 AND day = $2")
}

fn day_of(packet: PacketId) -> i32 {
    super::rows::day_of(packet)
}

fn packet_from_row(r: &Row) -> PacketFields {
    PacketFields {
        id: r.get(0),
        sender: r.get(1),
        kind: r.get(2),
        total_fen: r.get(3),
        count: i64::from(r.get::<_, i32>(4)),
        target: r.get(5),
        group: r.get(6),
        recipients: r.get(7),
        greeting: r.get(8),
        created_ms: r.get(9),
        expires_ms: r.get(10),
        remaining_fen: r.get(11),
        refunded_fen: r.get(12),
        status: r.get(13),
    }
}

impl PgReader {
    pub(crate) fn new(target: PgTarget, connections: usize) -> Result<PgReader, StoreError> {
        assert!(connections > 0);
        // The first connection is made now, so a wrong URL fails at start-up.
        let first = target.connect()?;
        let conns = std::iter::once(Some(first)).chain((1..connections).map(|_| None)).map(Mutex::new).collect();
        Ok(PgReader { target, conns })
    }

    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Runs `read` on a free connection (else the first), connecting it if
    /// needed. A connection the read found broken (the server restarted,
    /// failed over) is replaced and the read tried once more on the new one:
    /// reads change nothing, so a retry is safe.
    fn with<T>(&self, read: impl Fn(&mut Client) -> Result<T, postgres::Error>) -> Result<T, StoreError> {
        let mut guard = self
            .conns
            .iter()
            .find_map(|c| match c.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            })
            .unwrap_or_else(|| self.conns[0].lock().unwrap_or_else(|p| p.into_inner()));
        let mut retried = false;
        loop {
            let reused = guard.as_ref().is_some_and(|c| !c.is_closed());
            if !reused {
                *guard = None;
                *guard = Some(self.target.connect()?);
            }
            let client = guard.as_mut().expect("connected above");
            match read(client) {
                Ok(value) => return Ok(value),
                Err(e) if super::session_lost(&e) || client.is_closed() => {
                    *guard = None;
                    if !reused || retried {
                        return Err(e.into());
                    }
                    retried = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(crate) fn balance(&self, user: UserId) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(c.query_opt("SELECT balance FROM accounts WHERE id = $1", &[&Account::user(user).id()])?
                .map(|r| r.get(0))
                .unwrap_or(0))
        })
    }

    fn claims(c: &mut Client, packet: PacketId) -> Result<Vec<Claim>, postgres::Error> {
        let sql = "SELECT user_id, amount, at_ms FROM all_claims WHERE packet = $1 AND day = $2 ORDER BY seq";
        Ok(c.query(sql, &[&(packet as i64), &day_of(packet)])?
            .iter()
            .map(|r| Claim { user: r.get::<_, i64>(0) as u64, amount_fen: r.get(1), at_ms: r.get::<_, i64>(2) as u64 })
            .collect())
    }

    pub(crate) fn packet(&self, id: PacketId) -> Result<Option<Packet>, StoreError> {
        let found = self.with(|c| {
            let Some(row) = c.query_opt(&packet_by_id_sql(), &[&(id as i64), &day_of(id)])? else { return Ok(None) };
            Ok(Some((packet_from_row(&row), Self::claims(c, id)?)))
        })?;
        let Some((fields, claims)) = found else { return Ok(None) };
        let mut p = fields.into_packet()?;
        p.claims = claims;
        Ok(Some(p))
    }

    pub(crate) fn open_packets(&self) -> Result<Vec<Packet>, StoreError> {
        let (rows, claims) = self.with(|c| {
            let sql = format!("SELECT {PACKET_COLUMNS} FROM packets WHERE status = 'open' ORDER BY id");
            let rows: Vec<PacketFields> = c.query(&sql, &[])?.iter().map(packet_from_row).collect();
            let mut claims: HashMap<PacketId, Vec<Claim>> = HashMap::new();
            let sql = "SELECT c.packet, c.user_id, c.amount, c.at_ms FROM claims c
                       JOIN packets p ON p.id = c.packet AND p.day = c.day
                       WHERE p.status = 'open' ORDER BY c.packet, c.seq";
            for r in c.query(sql, &[])? {
                let claim =
                    Claim { user: r.get::<_, i64>(1) as u64, amount_fen: r.get(2), at_ms: r.get::<_, i64>(3) as u64 };
                claims.entry(r.get::<_, i64>(0) as u64).or_default().push(claim);
            }
            Ok((rows, claims))
        })?;
        let mut claims = claims;
        let mut packets = Vec::with_capacity(rows.len());
        for fields in rows {
            let mut p = fields.into_packet()?;
            p.claims = claims.remove(&p.id).unwrap_or_default();
            p.assert_invariants();
            packets.push(p);
        }
        Ok(packets)
    }

    pub(crate) fn id_marks(&self) -> Result<HashMap<u16, u64>, StoreError> {
        self.with(|c| {
            Ok(c.query("SELECT shard, mark FROM id_marks", &[])?
                .iter()
                .map(|r| (r.get::<_, i32>(0) as u16, r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    pub(crate) fn groups(&self) -> Result<HashMap<GroupId, Vec<UserId>>, StoreError> {
        self.with(|c| {
            let mut groups: HashMap<GroupId, Vec<UserId>> = HashMap::new();
            for r in c.query("SELECT grp, user_id FROM group_members ORDER BY grp, user_id", &[])? {
                groups.entry(r.get::<_, i64>(0) as u64).or_default().push(r.get::<_, i64>(1) as u64);
            }
            Ok(groups)
        })
    }

    pub(crate) fn campaigns(&self, only: Option<CampaignId>) -> Result<Vec<CampaignRow>, StoreError> {
        let fields = self.with(|c| {
            let rows = match only {
                Some(id) => c.query(&campaigns_sql("WHERE c.id = $1", "all_shake_wins"), &[&(id as i64)])?,
                None => c.query(&campaigns_sql("", "all_shake_wins"), &[])?,
            };
            Ok(rows
                .iter()
                .map(|r| CampaignFields {
                    id: r.get(0),
                    funder: r.get(1),
                    total_fen: r.get(2),
                    rule: r.get(3),
                    rate_per_s: r.get(4),
                    win_cap: r.get(5),
                    status: r.get(6),
                    created_ms: r.get(7),
                    won: r.get(8),
                    won_fen: r.get(9),
                    refunded_fen: r.get(10),
                    escrow_fen: r.get(11),
                })
                .collect::<Vec<_>>())
        })?;
        fields.into_iter().map(CampaignFields::into_row).collect()
    }

    pub(crate) fn first_shake_win(
        &self,
        user: UserId,
        key: &str,
    ) -> Result<Option<(CampaignId, PacketId, i64)>, StoreError> {
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT campaign, packet, amount FROM all_shake_keys WHERE user_id = $1 AND idem_key = $2",
                &[&(user as i64), &key],
            )?
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64, r.get(2))))
        })
    }

    pub(crate) fn win_counts(&self, campaign: CampaignId) -> Result<HashMap<UserId, u32>, StoreError> {
        self.with(|c| {
            Ok(c.query(
                "SELECT user_id, count(*) FROM all_shake_wins WHERE campaign = $1 GROUP BY user_id",
                &[&(campaign as i64)],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u32))
            .collect())
        })
    }

    /// System messages first, then user notices, each oldest first
    /// (`'system' < 'user'`): the order of the index `messages_by_user_kind`.
    pub(crate) fn messages(&self, user: UserId, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.with(|c| {
            Ok(c.query(
                "SELECT id, body FROM messages WHERE user_id = $1 ORDER BY kind, id LIMIT $2",
                &[&(user as i64), &(limit as i64)],
            )?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
            .collect())
        })
    }

    /// Unpublished outbox rows, oldest first: the partial index
    /// `cross_out_unpublished` holds exactly these, in this order.
    pub(crate) fn cross_unpublished(&self, limit: usize) -> Result<Vec<CrossOutFields>, StoreError> {
        self.with(|c| {
            Ok(c.query(CROSS_UNPUBLISHED_SQL, &[&(limit as i64)])?
                .iter()
                .map(|r| CrossOutFields {
                    kind: r.get(0),
                    to: i64::from(r.get::<_, i16>(1)),
                    packet: r.get(2),
                    user: r.get(3),
                    amount_fen: r.get(4),
                    body: r.get(5),
                    created_ms: r.get(6),
                })
                .collect())
        })
    }
}

pub(crate) const CROSS_UNPUBLISHED_SQL: &str =
    "SELECT kind, to_set, packet, user_id, amount, body, created_ms FROM cross_out WHERE NOT published ORDER BY id LIMIT $1";
