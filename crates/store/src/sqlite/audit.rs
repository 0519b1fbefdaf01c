//! The audit's feed from a SQLite data directory.

use std::path::Path;

use hongbao_core::audit::{AuditReport, CrossRows};
use rusqlite::Connection;

use super::{schema, DB_FILE};
use crate::audit::{audit_queries, cross_queries, AuditNames, Feed};
use crate::StoreError;

/// Every stored record of the data directory `dir`, read in one read
/// transaction (one consistent snapshot), given to the auditor; and the
/// cross-SET rows read.
pub(crate) fn audit_dir(dir: &Path) -> Result<(AuditReport, CrossRows), StoreError> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Err(StoreError::Missing(dir.to_owned()));
    }
    let conn = schema::connect(&path, true)?;
    conn.execute_batch("BEGIN")?;
    let report = feed(&conn)?;
    conn.execute_batch("COMMIT")?;
    Ok(report)
}

fn feed(conn: &Connection) -> Result<(AuditReport, CrossRows), StoreError> {
    let names = AuditNames { user: "user", packets: "packets", claims: "claims", shake_wins: "shake_wins" };
    let [accounts, entries, packets, claims, campaigns, wins, win_entries] = audit_queries(&names);
    let mut f = Feed::default();
    for row in conn.prepare(&accounts)?.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
        let (id, balance) = row?;
        f.account(id, balance);
    }
    let mut stmt = conn.prepare(&entries)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        f.entry(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, &r.get::<_, String>(4)?, r.get(5)?, r.get(6)?)?;
    }
    let mut stmt = conn.prepare(&packets)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let (kind, status): (String, String) = (r.get(2)?, r.get(7)?);
        f.packet(r.get(0)?, r.get(1)?, &kind, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, &status, r.get(8)?)?;
    }
    let mut stmt = conn.prepare(&claims)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        f.claim(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
    }
    let mut stmt = conn.prepare(&campaigns)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        f.campaign(r.get(0)?, r.get(1)?, r.get(2)?, &r.get::<_, String>(3)?)?;
    }
    let [outs, ins] = cross_queries(&names);
    let mut stmt = conn.prepare(&outs)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(1)?;
        f.cross_out(r.get(0)?, &kind, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get::<_, i64>(6)? != 0)?;
    }
    let mut stmt = conn.prepare(&ins)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(1)?;
        f.cross_in(r.get(0)?, &kind, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)?;
    }
    let sums = |sql: &str| conn.query_row(sql, [], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)));
    Ok(f.finish(sums(&wins)?, sums(&win_entries)?))
}
