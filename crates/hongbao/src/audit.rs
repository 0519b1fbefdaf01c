//! `hongbao audit`: proves money conservation on a store, a data directory
//! or a PostgreSQL database (the checks themselves are
//! `hongbao_core::audit`, fed by `hongbao_store`).

use hongbao_store::{AuditReport, StoreError, StoreLocation};
use std::io::Write;

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
