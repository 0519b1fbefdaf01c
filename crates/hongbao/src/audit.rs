//! `hongbao audit`: proves money conservation on a store, a data directory
//! or a PostgreSQL database (the checks themselves are
//! `hongbao_core::audit`, fed by `hongbao_store`).

use hongbao_cluster::ClusterFile;
use hongbao_core::audit::{ClusterAuditor, ClusterReport};
use hongbao_store::{AuditReport, StoreError, StoreLocation};
use std::io::Write;

/// Times a cluster audit is read again when it fails: SETs are read one
/// after another while messages may move between them, so a credit applied
/// between two reads can look unmatched once; a real fault stays.
const CLUSTER_READS_MAX: usize = 3;
/// Pause between two readings of a cluster.
const CLUSTER_REREAD_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// Runs the audit and prints the report (human text, or JSON with `json`).
/// Returns whether it passed; `Err` when the data could not be read at all.
pub fn run(store: &StoreLocation, json: bool) -> Result<bool, StoreError> {
    let report = hongbao_store::audit(store)?;
    let text = if json {
        serde_json::to_string_pretty(&report).expect("an audit report always serialises")
    } else {
        human(&store.describe(), &report)
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout must not turn a failed audit into a pass or vice
    // versa: the exit code is what scripts trust, so write errors are ignored.
    let _ = writeln!(out, "{text}").and_then(|_| out.flush());
    Ok(report.passed())
}

/// `hongbao audit --cluster FILE`: every SET's store and the credits in
/// flight between them. Returns whether it passed.
pub fn run_cluster(file: &ClusterFile, json: bool) -> Result<bool, StoreError> {
    let (report, readings) = cluster_report(file)?;
    let text = if json {
        serde_json::to_string_pretty(&report).expect("a cluster audit report always serialises")
    } else {
        cluster_human(file, &report, readings)
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|_| out.flush());
    Ok(report.passed())
}

/// The cluster's audit, read again (up to `CLUSTER_READS_MAX` times) while
/// it fails; the report and how many readings it took.
pub fn cluster_report(file: &ClusterFile) -> Result<(ClusterReport, usize), StoreError> {
    let mut readings = 0;
    loop {
        readings += 1;
        let report = read_cluster(file)?;
        if report.passed() || readings == CLUSTER_READS_MAX {
            return Ok((report, readings));
        }
        std::thread::sleep(CLUSTER_REREAD_PAUSE);
    }
}

fn read_cluster(file: &ClusterFile) -> Result<ClusterReport, StoreError> {
    let mut auditor = ClusterAuditor::new(file.set_count());
    for entry in &file.sets {
        let location = if entry.store.starts_with("postgres") {
            StoreLocation::postgres(&entry.store)?
        } else {
            StoreLocation::Sqlite(entry.store.clone().into())
        };
        let (report, rows) = hongbao_store::audit_with_cross(&location)?;
        auditor.add_set(entry.set, report, rows);
    }
    Ok(auditor.finish())
}

fn cluster_human(file: &ClusterFile, report: &ClusterReport, readings: usize) -> String {
    let t = &report.totals;
    let mut s = format!("hongbao audit of the cluster {} ({} SETs)\n", file.path.display(), t.sets);
    for set in &report.sets {
        let verdict = if set.passed { "pass" } else { "FAIL" };
        s.push_str(&format!(
            "  SET {:<3} {verdict}  users {}  escrow {}\n",
            set.set,
            fen(set.totals.user_balances_fen),
            fen(set.totals.packet_escrow_fen + set.totals.campaign_escrow_fen)
        ));
    }
    for f in &report.in_flight {
        s.push_str(&format!(
            "  in flight SET {} -> SET {}: {} credit(s) and {} campaign fund(s)/refund(s) carrying {}, {} notice(s)\n",
            f.from,
            f.to,
            f.credits,
            f.campaign_moves,
            fen(f.amount_fen),
            f.notices
        ));
    }
    let rows: [(&str, i64); 5] = [
        ("deposits", t.deposits_fen),
        ("withdrawals", t.withdrawals_fen),
        ("user balances", t.user_balances_fen),
        ("escrow", t.escrow_fen),
        ("in flight", t.in_flight_fen),
    ];
    for (name, value) in rows {
        s.push_str(&format!("  {name:<16} {:>24}\n", fen(value)));
    }
    if report.passed() {
        s.push_str("PASS: every SET reconciles, every cross-SET credit is matched once, and money is conserved");
    } else {
        s.push_str(&format!("FAIL: {} violation(s) (read {readings} times)", report.violations.len()));
        for v in &report.violations {
            s.push_str(&format!("\n  - {v}"));
        }
    }
    s
}

fn human(store: &str, report: &AuditReport) -> String {
    let t = &report.totals;
    let mut s = format!("hongbao audit of {store}\n");
    let rows: [(&str, String); 11] = [
        ("accounts", t.accounts.to_string()),
        ("ledger entries", t.entries.to_string()),
        ("packets", t.packets.to_string()),
        ("claims", t.claims.to_string()),
        ("campaigns", t.campaigns.to_string()),
        ("shake wins", t.shake_wins.to_string()),
        ("deposits", fen(t.deposits_fen)),
        ("withdrawals", fen(t.withdrawals_fen)),
        ("user balances", fen(t.user_balances_fen)),
        ("packet escrow", fen(t.packet_escrow_fen)),
        ("campaign escrow", fen(t.campaign_escrow_fen)),
    ];
    for (name, value) in rows {
        s.push_str(&format!("  {name:<16} {value:>24}\n"));
    }
    // A SET of a cluster: what it owes each other SET (negative: is owed).
    for (peer, owed) in &t.transit_by_set {
        s.push_str(&format!("  {:<16} {:>24}\n", format!("transit SET {peer}"), fen(*owed)));
    }
    if report.passed() {
        s.push_str("PASS: every packet, campaign and balance reconciles; money is conserved");
    } else {
        s.push_str(&format!("FAIL: {} violation(s)", report.violations.len()));
        for v in &report.violations {
            s.push_str(&format!("\n  - {v}"));
        }
    }
    s
}

/// `1234` → `1234 fen (12.34 yuan)`, with integer arithmetic only.
fn fen(amount: i64) -> String {
    let sign = if amount < 0 { "-" } else { "" };
    let abs = amount.unsigned_abs();
    format!("{amount} fen ({sign}{}.{:02} yuan)", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fen_prints_yuan_without_floats() {
        assert_eq!(super::fen(1234), "1234 fen (12.34 yuan)");
        assert_eq!(super::fen(-5), "-5 fen (-0.05 yuan)");
        assert!(super::fen(i64::MIN).starts_with("-9223372036854775808 fen (-92233720368547758.08"));
    }
}
