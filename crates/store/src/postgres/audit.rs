//! The audit's feed from a PostgreSQL database: one read-only, repeatable
//! read transaction, so every query sees the same committed state while the
//! server goes on writing.

use hongbao_core::audit::{AuditReport, CrossRows};

use super::PgTarget;
use crate::audit::{audit_queries, cross_queries, AuditNames, Feed};
use crate::StoreError;

pub(crate) fn audit(target: &PgTarget) -> Result<(AuditReport, CrossRows), StoreError> {
    let mut client = target.connect()?;
    let has_schema: bool = client.query_one("SELECT to_regclass('meta') IS NOT NULL", &[])?.get(0);
    if !has_schema {
        return Err(StoreError::Location(target.to_string(), "no hongbao database there".into()));
    }
    let mut tx =
        client.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).read_only(true).start()?;
    let names =
        AuditNames { user: "user_id", packets: "all_packets", claims: "all_claims", shake_wins: "all_shake_wins" };
    let [accounts, entries, packets, claims, campaigns, wins, win_entries] = audit_queries(&names);
    let mut f = Feed::default();
    for r in tx.query(&accounts, &[])? {
        f.account(r.get(0), r.get(1));
    }
    for r in tx.query(&entries, &[])? {
        f.entry(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6))?;
    }
    for r in tx.query(&packets, &[])? {
        let count: i32 = r.get(4);
        f.packet(r.get(0), r.get(1), r.get(2), r.get(3), count.into(), r.get(5), r.get(6), r.get(7), r.get(8))?;
    }
    for r in tx.query(&claims, &[])? {
        f.claim(r.get(0), r.get(1), r.get(2), r.get(3));
    }
    for r in tx.query(&campaigns, &[])? {
        f.campaign(r.get(0), r.get(1), r.get(2), r.get(3))?;
    }
    let [outs, ins] = cross_queries(&names);
    for r in tx.query(&outs, &[])? {
        let to: i16 = r.get(0);
        f.cross_out(to.into(), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6))?;
    }
    for r in tx.query(&ins, &[])? {
        let from: i16 = r.get(0);
        f.cross_in(from.into(), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6))?;
    }
    let mut sums = |sql: &str| tx.query_one(sql, &[]).map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)));
    let report = f.finish(sums(&wins)?, sums(&win_entries)?);
    tx.commit()?;
    Ok(report)
}
