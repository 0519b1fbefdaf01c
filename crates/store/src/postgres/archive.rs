//! `hongbao archive --before DATE`: moves settled days out of the hot
//! tables. A day's partitions of packets, claims and shake wins are
//! detached from the hot tables and attached to the `*_archive` tables, and
//! its idempotency keys move to the archived key tables, in one short
//! transaction per day; lookups and the audit read both sides (`all_*`), so
//! every fen stays accounted for and every key stays answered.
//!
//! A day is moved only when none of its packets is open, and never a day
//! that can still get rows: not today or later, not yesterday (a packet made
//! just before midnight may commit just after it), and not a day since the
//! oldest campaign that is still created or running began (a campaign packet
//! takes its id, and so its day, when it is released, and may be won hours
//! later). Nothing is scanned while the hot tables are locked: each day's
//! bound is a constraint of its own from the start (`hongbao_ensure_day`).

use super::PgTarget;
use crate::StoreError;

/// A day moved to the archive, with what it held.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ArchivedDay {
    pub date: String,
    pub packets: i64,
    pub claims: i64,
    pub shake_wins: i64,
}

/// A day before the cut that stays hot, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeptDay {
    pub date: String,
    pub open_packets: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ArchiveReport {
    pub archived: Vec<ArchivedDay>,
    pub kept: Vec<KeptDay>,
    /// The first day that was not considered (`YYYY-MM-DD`), and why: the
    /// date asked for, or an earlier one that can still get rows.
    pub hot_from: String,
    pub hot_because: String,
}

/// How long archiving waits for the writer to let go of the hot tables
/// before it gives up (it holds them for a few milliseconds per day).
const LOCK_TIMEOUT: &str = "5s";

/// The tables split by day, each with its archive twin.
const DAY_TABLES: [&str; 3] = ["packets", "claims", "shake_wins"];

/// Moves every settled day before `before` (`YYYY-MM-DD`; at most today)
/// from the hot tables to the archive.
pub fn archive(target: &PgTarget, before: &str) -> Result<ArchiveReport, StoreError> {
    let mut client = target.connect()?;
    let has_schema: bool = client.query_one("SELECT to_regclass('meta') IS NOT NULL", &[])?.get(0);
    if !has_schema {
        return Err(StoreError::Location(target.to_string(), "no hongbao database there".into()));
    }
    let bad_date = |e: postgres::Error| StoreError::Location(before.into(), super::describe_error(&e));
    let before_day: i32 =
        client.query_one("SELECT ($1::text::date - DATE '2020-01-01')::int", &[&before]).map_err(bad_date)?.get(0);
    let today = hongbao_core::ids::day_of_unix_ms(crate::unix_ms()) as i32;
    let oldest_campaign: Option<i64> =
        client.query_one("SELECT min(created_ms) FROM campaigns WHERE status IN ('created', 'running')", &[])?.get(0);
    let campaign_day = oldest_campaign.map(|ms| hongbao_core::ids::day_of_unix_ms(ms.max(0) as u64) as i32);
    let mut cut = (before_day, "the date asked for");
    if today - 1 < cut.0 {
        cut = (today - 1, "yesterday and today can still get rows");
    }
    if let Some(day) = campaign_day.filter(|day| *day < cut.0) {
        cut = (day, "a campaign that is still open began then (its packets can be won later)");
    }
    let (cut, because) = cut;
    let days: Vec<(i32, String)> = client
        .query(
            "SELECT (to_date(right(c.relname, 8), 'YYYYMMDD') - DATE '2020-01-01')::int, right(c.relname, 8)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'packets'::regclass ORDER BY 1",
            &[],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .filter(|(day, _)| *day < cut)
        .collect();
    client.batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))?;
    let hot_from: String =
        client.query_one("SELECT to_char(DATE '2020-01-01' + $1::int, 'YYYY-MM-DD')", &[&cut])?.get(0);
    let mut report = ArchiveReport { hot_from, hot_because: because.to_owned(), ..ArchiveReport::default() };
    for (day, date) in days {
        let date_shown = format!("{}-{}-{}", &date[0..4], &date[4..6], &date[6..8]);
        match archive_day(&mut client, day, &date)? {
            Ok(counts) => {
                tracing::info!(date = %date_shown, ?counts, "day archived");
                let (packets, claims, shake_wins) = counts;
                report.archived.push(ArchivedDay { date: date_shown, packets, claims, shake_wins });
            }
            Err(open_packets) => report.kept.push(KeptDay { date: date_shown, open_packets }),
        }
    }
    Ok(report)
}

/// One day in one transaction: the hot tables locked, the day checked to be
/// settled, its partitions moved and its keys with them. `Err(open)` when
/// the day still has open packets (nothing moved).
fn archive_day(
    client: &mut postgres::Client,
    day: i32,
    date: &str,
) -> Result<Result<(i64, i64, i64), i64>, StoreError> {
    let mut tx = client.transaction()?;
    // The writer's next transaction waits; nothing of this day can change meanwhile.
    tx.batch_execute("LOCK TABLE packets, claims, shake_wins, packet_keys, shake_keys IN ACCESS EXCLUSIVE MODE")?;
    let open: i64 = tx.query_one("SELECT count(*) FROM packets WHERE day = $1 AND status = 'open'", &[&day])?.get(0);
    if open > 0 {
        tx.rollback()?;
        return Ok(Err(open));
    }
    let count = |tx: &mut postgres::Transaction<'_>, table: &str| -> Result<i64, postgres::Error> {
        Ok(tx.query_one(&format!("SELECT count(*) FROM {table} WHERE day = $1"), &[&day])?.get(0))
    };
    let counts = (count(&mut tx, "packets")?, count(&mut tx, "claims")?, count(&mut tx, "shake_wins")?);
    for table in DAY_TABLES {
        let part = format!("{table}_d{date}");
        tx.batch_execute(&format!(
            "ALTER TABLE {table} DETACH PARTITION {part};
             ALTER TABLE {table}_archive ATTACH PARTITION {part} FOR VALUES FROM ({day}) TO ({next});",
            next = day + 1
        ))?;
    }
    for keys in ["packet_keys", "shake_keys"] {
        tx.execute(
            &format!(
                "WITH moved AS (DELETE FROM {keys} WHERE day = $1 RETURNING *) INSERT INTO {keys}_archive SELECT * FROM moved"
            ),
            &[&day],
        )?;
    }
    tx.commit()?;
    Ok(Ok(counts))
}
