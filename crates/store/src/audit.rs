//! Feeds every stored record to `core::audit::Auditor`.

use std::path::Path;

use hongbao_core::audit::{AuditReport, Auditor, CampaignRecord, EntryKind, EntryRecord, PacketRecord};
use hongbao_core::campaign::CampaignStatus;
use hongbao_core::packet::{Claim, PacketStatus};
use hongbao_core::split::SplitKind;

use crate::{schema, StoreError, DB_FILE};

/// Re-derives every balance and packet in the data directory `dir` and checks
/// every invariant. Read-only, and it reads one consistent snapshot, so it is
/// safe to run against a live server's data.
pub fn audit_dir(dir: &Path) -> Result<AuditReport, StoreError> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Err(StoreError::Missing(dir.to_owned()));
    }
    let conn = schema::connect(&path, true)?;
    // One read transaction: every query sees the same committed state.
    conn.execute_batch("BEGIN")?;
    let mut a = Auditor::default();
    let bad = |what: String| StoreError::Corrupt(what);

    let mut stmt = conn.prepare("SELECT id, balance FROM accounts")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
        let (id, balance) = row?;
        a.account(id, balance);
    }
    let mut stmt =
        conn.prepare("SELECT id, from_account, to_account, amount, kind, reference, user FROM entries ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, Option<i64>>(6)?,
        ))
    })?;
    for row in rows {
        let (id, from, to, amount_fen, kind, reference, user) = row?;
        let kind = EntryKind::parse(&kind).ok_or_else(|| bad(format!("entry {id} has unknown kind {kind}")))?;
        a.entry(EntryRecord {
            id,
            from,
            to,
            amount_fen,
            kind,
            reference: reference as u64,
            user: user.map(|u| u as u64),
        });
    }
    let mut stmt =
        conn.prepare("SELECT id, sender, kind, total, count, remaining, refunded, status, best_luck FROM packets")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, u32>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, String>(7)?,
            r.get::<_, Option<i64>>(8)?,
        ))
    })?;
    for row in rows {
        let (id, sender, kind, total_fen, count, remaining_fen, refunded_fen, status, best_luck) = row?;
        a.packet(PacketRecord {
            id,
            sender,
            kind: SplitKind::parse(&kind).ok_or_else(|| bad(format!("packet {id} has kind {kind}")))?,
            total_fen,
            count,
            remaining_fen,
            refunded_fen,
            status: PacketStatus::parse(&status).ok_or_else(|| bad(format!("packet {id} has status {status}")))?,
            best_luck: best_luck.map(|u| u as u64),
        });
    }
    let mut stmt = conn.prepare("SELECT packet, user, amount, at_ms FROM claims ORDER BY packet, seq")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)?, r.get::<_, i64>(3)? as u64))
    })?;
    for row in rows {
        let (packet, user, amount_fen, at_ms) = row?;
        a.claim(packet, Claim { user, amount_fen, at_ms });
    }
    let mut stmt = conn.prepare("SELECT id, funder, total, status FROM campaigns")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
    })?;
    for row in rows {
        let (id, funder, total_fen, status) = row?;
        let status = CampaignStatus::parse(&status).ok_or_else(|| bad(format!("campaign {id} has status {status}")))?;
        a.campaign(CampaignRecord { id, funder, total_fen, status });
    }
    // Shake wins must match their ledger entries one for one.
    let (wins, win_sum): (i64, i64) =
        conn.query_row("SELECT count(*), coalesce(sum(amount), 0) FROM shake_wins", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let (entries, entry_sum): (i64, i64) =
        conn.query_row("SELECT count(*), coalesce(sum(amount), 0) FROM entries WHERE kind = 'shake_win'", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    conn.execute_batch("COMMIT")?;
    let mut report = a.finish();
    if (wins, win_sum) != (entries, entry_sum) {
        report
            .violations
            .push(format!("shake wins: {wins} rows / {win_sum} fen, ledger entries: {entries} / {entry_sum} fen"));
    }
    Ok(report)
}
