//! Feeds every stored record to `core::audit::Auditor`.

use std::path::Path;

use hongbao_core::audit::{AuditReport, Auditor, CampaignRecord, EntryKind, EntryRecord, PacketRecord};
use hongbao_core::campaign::CampaignStatus;
use hongbao_core::packet::{Claim, PacketStatus};
use hongbao_core::split::SplitKind;

use rusqlite::Connection;

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
    feed_accounts(&conn, &mut a)?;
    feed_entries(&conn, &mut a)?;
    feed_packets(&conn, &mut a)?;
    feed_claims(&conn, &mut a)?;
    feed_campaigns(&conn, &mut a)?;
    let wins = shake_wins_against_entries(&conn)?;
    conn.execute_batch("COMMIT")?;
    let mut report = a.finish();
    report.violations.extend(wins);
    Ok(report)
}

fn bad(what: String) -> StoreError {
    StoreError::Corrupt(what)
}

fn feed_accounts(conn: &Connection, a: &mut Auditor) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("SELECT id, balance FROM accounts")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))? {
        let (id, balance) = row?;
        a.account(id, balance);
    }
    Ok(())
}

fn feed_entries(conn: &Connection, a: &mut Auditor) -> Result<(), StoreError> {
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
        let (reference, user) = (reference as u64, user.map(|u| u as u64));
        a.entry(EntryRecord { id, from, to, amount_fen, kind, reference, user });
    }
    Ok(())
}

fn feed_packets(conn: &Connection, a: &mut Auditor) -> Result<(), StoreError> {
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
    Ok(())
}

fn feed_claims(conn: &Connection, a: &mut Auditor) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("SELECT packet, user, amount, at_ms FROM claims ORDER BY packet, seq")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)?, r.get::<_, i64>(3)? as u64))
    })?;
    for row in rows {
        let (packet, user, amount_fen, at_ms) = row?;
        a.claim(packet, Claim { user, amount_fen, at_ms });
    }
    Ok(())
}

fn feed_campaigns(conn: &Connection, a: &mut Auditor) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("SELECT id, funder, total, status FROM campaigns")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
    })?;
    for row in rows {
        let (id, funder, total_fen, status) = row?;
        let status = CampaignStatus::parse(&status).ok_or_else(|| bad(format!("campaign {id} has status {status}")))?;
        a.campaign(CampaignRecord { id, funder, total_fen, status });
    }
    Ok(())
}

/// Shake wins must match their ledger entries one for one.
fn shake_wins_against_entries(conn: &Connection) -> Result<Option<String>, StoreError> {
    let sums = |sql: &str| conn.query_row(sql, [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)));
    let (wins, win_sum) = sums("SELECT count(*), coalesce(sum(amount), 0) FROM shake_wins")?;
    let (entries, entry_sum) = sums("SELECT count(*), coalesce(sum(amount), 0) FROM entries WHERE kind = 'shake_win'")?;
    Ok(((wins, win_sum) != (entries, entry_sum))
        .then(|| format!("shake wins: {wins} rows / {win_sum} fen, ledger entries: {entries} / {entry_sum} fen")))
}
