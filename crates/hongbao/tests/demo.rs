//! `hongbao demo --quick` end to end: a local server, worker processes of
//! simulated users over real sockets, every phase, reconciliation and audit.
//! The summary must say it passed, with real wins and opens behind it: on
//! the embedded default, and on a PostgreSQL server the test starts.

mod common;

use common::hongbao;

#[test]
fn quick_demo_passes_every_check_with_real_traffic() {
    quick_demo_passes(&[]);
}

#[test]
fn quick_demo_on_postgres_passes_every_check() {
    let db = hongbao_pg_harness::PgServer::start().unwrap_or_else(|e| panic!("{e}"));
    let summary = quick_demo_passes(&["--store", &db.url()]);
    let audit = summary["checks"].as_array().unwrap().iter().find(|c| c["name"] == "hongbao audit passes").unwrap();
    assert!(audit["detail"].as_str().unwrap().contains("postgres://"), "{audit}");
}

/// Runs `hongbao demo --quick` with `extra` flags and checks its summary.
fn quick_demo_passes(extra: &[&str]) -> serde_json::Value {
    let out = tempfile::tempdir().unwrap();
    let status = hongbao()
        .args(["demo", "--quick", "--out"])
        .arg(out.path())
        .args(extra)
        .stdin(std::process::Stdio::null())
        .status()
        .expect("hongbao demo runs");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).expect("summary.json written"))
            .unwrap();
    assert!(status.success(), "demo failed: {summary:#}");
    assert_eq!(summary["pass"], true, "{summary:#}");
    let checks = summary["checks"].as_array().unwrap();
    for name in [
        "shake wins reconcile",
        "group opens reconcile",
        "hongbao audit passes",
        "packets released at the campaign rate",
    ] {
        assert!(checks.iter().any(|c| c["name"] == name && c["pass"] == true), "check {name} missing or failed");
    }
    assert!(summary["shake_results"]["won"].as_u64().unwrap() > 0);
    assert!(summary["group_opens"].as_u64().unwrap() > 0);
    assert!(summary["packets_released"].as_u64().unwrap() > 0);
    assert_eq!(summary["group_opens"].as_u64().unwrap(), 3 * summary["group_packets_sent"].as_u64().unwrap());
    for file in ["seconds.csv", "requests.png", "wins.png", "released.png", "latency.png", "connections.png"] {
        let len = std::fs::metadata(out.path().join(file)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{file} written");
    }
    summary
}
