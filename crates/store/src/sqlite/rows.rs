//! `Rows` on SQLite: each read and write is one cached statement of the
//! batch's transaction, carried out at once (an embedded database answers
//! in microseconds; there is no round trip to save).

use std::collections::BTreeSet;

use hongbao_core::campaign::CampaignSpec;
use hongbao_core::cross::CrossKind;
use hongbao_core::ledger::{Account, Transfer};
use hongbao_core::sets::SetId;
use hongbao_core::{CampaignId, GroupId, PacketId, UserId};
use rusqlite::{params, Connection, OptionalExtension};

use crate::ops::{ExistingPacket, FirstWin, NewPacket, OpenShare, ShakeWin};
use crate::rows::{encode_users, target_of, CrossIn, CrossOut, EntryMeta, KeyedCampaign, MessageKind, RowResult, Rows};

/// The batch's open transaction (the writer holds the write lock).
pub(crate) struct SqliteRows<'a> {
    pub tx: &'a Connection,
}

impl Rows for SqliteRows<'_> {
    fn keyed_result(&mut self, scope: &str, key: &str) -> RowResult<Option<(String, String)>> {
        Ok(self
            .tx
            .prepare_cached("SELECT request, result FROM idempotency WHERE scope = ?1 AND key = ?2")?
            .query_row(params![scope, key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    fn insert_keyed_result(&mut self, scope: &str, key: &str, request: &str, result: &str) -> RowResult<()> {
        self.tx
            .prepare_cached("INSERT INTO idempotency (scope, key, request, result) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![scope, key, request, result])?;
        Ok(())
    }

    fn packet_by_key(&mut self, sender: UserId, key: &str) -> RowResult<Option<(ExistingPacket, String)>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT id, total, count, expires_ms, kind FROM packets WHERE sender = ?1 AND idem_key = ?2",
            )?
            .query_row(params![sender as i64, key], |r| {
                Ok((
                    ExistingPacket {
                        id: r.get::<_, i64>(0)? as u64,
                        total_fen: r.get(1)?,
                        count: r.get(2)?,
                        expires_ms: r.get::<_, i64>(3)? as u64,
                    },
                    r.get::<_, String>(4)?,
                ))
            })
            .optional()?)
    }

    fn insert_packet(&mut self, p: &NewPacket, key: &str) -> RowResult<()> {
        let (target, grp) = target_of(&p.recipients);
        self.tx
            .prepare_cached(
                "INSERT INTO packets (id, sender, kind, total, count, target, grp, recipients, greeting, created_ms, expires_ms, remaining, status, idem_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?4, 'open', ?12)",
            )?
            .execute(params![
                p.id as i64,
                p.sender as i64,
                p.kind.as_str(),
                p.total_fen,
                p.count,
                target,
                grp,
                encode_users(p.recipients.list()),
                p.greeting,
                p.created_ms as i64,
                p.expires_ms as i64,
                key
            ])?;
        Ok(())
    }

    fn open_remaining(&mut self, packet: PacketId) -> RowResult<Option<i64>> {
        Ok(self
            .tx
            .prepare_cached("SELECT remaining FROM packets WHERE id = ?1 AND status = 'open'")?
            .query_row(params![packet as i64], |r| r.get::<_, i64>(0))
            .optional()?)
    }

    fn insert_claim(&mut self, op: &OpenShare) -> RowResult<()> {
        self.tx
            .prepare_cached("INSERT INTO claims (packet, user, seq, amount, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![op.packet as i64, op.user as i64, op.seq, op.amount_fen, op.at_ms as i64])?;
        Ok(())
    }

    fn claim_amount(&mut self, packet: PacketId, user: UserId) -> RowResult<Option<i64>> {
        Ok(self
            .tx
            .prepare_cached("SELECT amount FROM claims WHERE packet = ?1 AND user = ?2")?
            .query_row(params![packet as i64, user as i64], |r| r.get(0))
            .optional()?)
    }

    fn write_opens(&mut self, packet: PacketId, taken_fen: i64, finished: Option<UserId>) -> RowResult<()> {
        let status = if finished.is_some() { "finished" } else { "open" };
        let changed = self
            .tx
            .prepare_cached(
                "UPDATE packets SET remaining = remaining - ?2, status = ?3, best_luck = ?4 WHERE id = ?1 AND status = 'open' AND remaining >= ?2",
            )?
            .execute(params![packet as i64, taken_fen, status, finished.map(|u| u as i64)])?;
        assert_eq!(changed, 1, "opens of packet {packet} do not match its stored state");
        Ok(())
    }

    fn refund_packet(&mut self, packet: PacketId, amount_fen: i64) -> RowResult<bool> {
        let changed = self
            .tx
            .prepare_cached(
                "UPDATE packets SET status = 'refunded', refunded = remaining, remaining = 0 WHERE id = ?1 AND status = 'open' AND remaining = ?2",
            )?
            .execute(params![packet as i64, amount_fen])?;
        Ok(changed == 1)
    }

    fn raise_id_mark(&mut self, shard: u16, mark: u64) -> RowResult<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO id_marks (shard, mark) VALUES (?1, ?2) ON CONFLICT (shard) DO UPDATE SET mark = max(mark, excluded.mark)",
            )?
            .execute(params![shard as i64, mark as i64])?;
        Ok(())
    }

    fn campaign_by_key(&mut self, key: &str) -> RowResult<Option<KeyedCampaign>> {
        Ok(self
            .tx
            .prepare_cached("SELECT id, funder, total, rule FROM campaigns WHERE idem_key = ?1")?
            .query_row(params![key], |r| {
                Ok(KeyedCampaign {
                    id: r.get::<_, i64>(0)? as u64,
                    funder: r.get::<_, i64>(1)? as u64,
                    total_fen: r.get(2)?,
                    rule: r.get(3)?,
                })
            })
            .optional()?)
    }

    fn insert_campaign(
        &mut self,
        id: CampaignId,
        spec: &CampaignSpec,
        rule: &str,
        at_ms: u64,
        key: &str,
    ) -> RowResult<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO campaigns (id, funder, total, rule, rate_per_s, win_cap, status, created_ms, idem_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'created', ?7, ?8)",
            )?
            .execute(params![
                id as i64,
                spec.funder as i64,
                spec.total_fen,
                rule,
                spec.rate_per_s,
                spec.win_cap_per_user,
                at_ms as i64,
                key
            ])?;
        Ok(())
    }

    fn start_campaign(&mut self, id: CampaignId) -> RowResult<bool> {
        let n = self
            .tx
            .prepare_cached(
                "UPDATE campaigns SET status = 'running' WHERE id = ?1 AND status NOT IN ('stopped', 'finished')",
            )?
            .execute(params![id as i64])?;
        Ok(n == 1)
    }

    fn campaign_state(&mut self, id: CampaignId) -> RowResult<Option<(UserId, String)>> {
        Ok(self
            .tx
            .prepare_cached("SELECT funder, status FROM campaigns WHERE id = ?1")?
            .query_row(params![id as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .optional()?)
    }

    fn set_campaign_status(&mut self, id: CampaignId, status: &str) -> RowResult<()> {
        self.tx
            .prepare_cached("UPDATE campaigns SET status = ?2 WHERE id = ?1")?
            .execute(params![id as i64, status])?;
        Ok(())
    }

    fn shake_win_by_key(&mut self, user: UserId, key: &str) -> RowResult<Option<FirstWin>> {
        Ok(self
            .tx
            .prepare_cached("SELECT campaign, packet, amount FROM shake_wins WHERE user = ?1 AND idem_key = ?2")?
            .query_row(params![user as i64, key], |r| {
                Ok(FirstWin {
                    campaign: r.get::<_, i64>(0)? as u64,
                    packet: r.get::<_, i64>(1)? as u64,
                    amount_fen: r.get(2)?,
                })
            })
            .optional()?)
    }

    fn packet_won(&mut self, packet: PacketId) -> RowResult<bool> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM shake_wins WHERE packet = ?1")?
            .query_row(params![packet as i64], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn insert_shake_win(&mut self, op: &ShakeWin) -> RowResult<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO shake_wins (packet, campaign, user, amount, at_ms, idem_key) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                op.packet as i64,
                op.campaign as i64,
                op.user as i64,
                op.amount_fen,
                op.at_ms as i64,
                op.key
            ])?;
        Ok(())
    }

    fn insert_message(
        &mut self,
        user: UserId,
        body: &[u8],
        at_ms: u64,
        kind: MessageKind,
        sender: UserId,
    ) -> RowResult<u64> {
        self.tx
            .prepare_cached("INSERT INTO messages (user, body, created_ms, kind, sender) VALUES (?1, ?2, ?3, ?4, ?5)")?
            .execute(params![user as i64, body, at_ms as i64, kind.as_str(), sender as i64])?;
        Ok(self.tx.last_insert_rowid() as u64)
    }

    fn prune_messages(
        &mut self,
        owners: &BTreeSet<(UserId, MessageKind)>,
        kept: impl Fn(MessageKind) -> usize,
    ) -> RowResult<Vec<(MessageKind, UserId)>> {
        let mut stmt = self.tx.prepare_cached(
            "DELETE FROM messages WHERE user = ?1 AND kind = ?2 AND id <= (SELECT id FROM messages WHERE user = ?1 AND kind = ?2 ORDER BY id DESC LIMIT 1 OFFSET ?3) RETURNING sender",
        )?;
        let mut dropped = Vec::new();
        for &(user, kind) in owners {
            let senders = stmt.query_map(params![user as i64, kind.as_str(), kept(kind) as i64], |r| {
                r.get::<_, i64>(0).map(|s| (kind, s as u64))
            })?;
            for sender in senders {
                dropped.push(sender?);
            }
        }
        Ok(dropped)
    }

    fn delete_message(&mut self, id: u64, user: UserId) -> RowResult<Option<(MessageKind, UserId)>> {
        Ok(self
            .tx
            .prepare_cached("DELETE FROM messages WHERE id = ?1 AND user = ?2 RETURNING kind, sender")?
            .query_row(params![id as i64, user as i64], |r| {
                Ok((MessageKind::parse(&r.get::<_, String>(0)?), r.get::<_, i64>(1)? as u64))
            })
            .optional()?)
    }

    fn group_members(&mut self, group: GroupId) -> RowResult<Vec<UserId>> {
        Ok(self
            .tx
            .prepare_cached("SELECT user FROM group_members WHERE grp = ?1")?
            .query_map(params![group as i64], |r| r.get::<_, i64>(0).map(|u| u as u64))?
            .collect::<rusqlite::Result<_>>()?)
    }

    fn replace_group(&mut self, group: GroupId, members: &BTreeSet<UserId>) -> RowResult<()> {
        self.tx.prepare_cached("DELETE FROM group_members WHERE grp = ?1")?.execute(params![group as i64])?;
        let mut insert = self.tx.prepare_cached("INSERT INTO group_members (grp, user) VALUES (?1, ?2)")?;
        for u in members {
            insert.execute(params![group as i64, *u as i64])?;
        }
        Ok(())
    }

    fn insert_cross_out(&mut self, r: &CrossOut<'_>) -> RowResult<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO cross_out (kind, to_set, packet, user, amount, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                r.kind.as_str(),
                r.to,
                r.packet as i64,
                r.user as i64,
                r.amount_fen,
                r.body,
                r.created_ms as i64
            ])?;
        Ok(())
    }

    fn cross_in_amount(
        &mut self,
        from: SetId,
        kind: CrossKind,
        packet: PacketId,
        user: UserId,
    ) -> RowResult<Option<i64>> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT amount FROM cross_in WHERE from_set = ?1 AND kind = ?2 AND packet = ?3 AND user = ?4",
            )?
            .query_row(params![from, kind.as_str(), packet as i64, user as i64], |r| r.get(0))
            .optional()?)
    }

    fn insert_cross_in(&mut self, r: &CrossIn) -> RowResult<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO cross_in (from_set, kind, packet, user, amount, created_ms, applied_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                r.from,
                r.kind.as_str(),
                r.packet as i64,
                r.user as i64,
                r.amount_fen,
                r.created_ms as i64,
                r.applied_ms as i64
            ])?;
        Ok(())
    }

    fn mark_cross_published(&mut self, keys: &[(CrossKind, PacketId, UserId)]) -> RowResult<u64> {
        let mut stmt = self.tx.prepare_cached(
            "UPDATE cross_out SET published = 1 WHERE kind = ?1 AND packet = ?2 AND user = ?3 AND published = 0",
        )?;
        let mut marked = 0;
        for (kind, packet, user) in keys {
            marked += stmt.execute(params![kind.as_str(), *packet as i64, *user as i64])? as u64;
        }
        Ok(marked)
    }

    fn insert_entry(&mut self, t: &Transfer, meta: EntryMeta) -> RowResult<()> {
        let EntryMeta { kind, reference, user, at_ms } = meta;
        self.tx
            .prepare_cached(
                "INSERT INTO entries (from_account, to_account, amount, kind, reference, user, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                t.from.id(),
                t.to.id(),
                t.amount_fen,
                kind.as_str(),
                reference as i64,
                user.map(|u| u as i64),
                at_ms as i64
            ])?;
        Ok(())
    }

    fn write_balances(&mut self, balances: &[(Account, i64)]) -> RowResult<()> {
        let mut stmt = self.tx.prepare_cached(
            "INSERT INTO accounts (id, balance) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET balance = excluded.balance",
        )?;
        for (account, balance) in balances {
            stmt.execute(params![account.id(), balance])?;
        }
        Ok(())
    }
}
