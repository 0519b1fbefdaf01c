//! `hongbao demo --quick` end to end: a local server, worker processes of
//! simulated users over real sockets, every phase, reconciliation and audit.
//! The summary must say it passed, with real wins and opens behind it: on
//! the embedded default, on a PostgreSQL server the test starts, and with an
//! idle hold on a heartbeat short enough that a user who did not heartbeat
//! would be cut off during it.

mod common;

use common::hongbao;

#[test]
fn quick_demo_passes_every_check_with_real_traffic() {
    quick_demo_passes(&[]);
}

#[test]
fn quick_demo_holds_every_user_through_an_idle_hold_on_a_one_second_heartbeat() {
    // The local server follows --heartbeat-s: it closes a connection after
    // 3 s without a frame, so users that did not heartbeat every second
    // would drop (and reconnect) during the 6 s hold. One short shake phase
    // and no group phase: the other demo tests cover those, and this one
    // runs beside them on the same cores.
    let (status, summary) =
        quick_demo(&["--idle-s", "6", "--heartbeat-s", "1", "--steps", "1000:3", "--group-packets", "0"]);
    assert!(status.success(), "demo failed: {summary:#}");
    assert_eq!(summary["pass"], true, "{summary:#}");
    let checks = summary["checks"].as_array().unwrap();
    for name in [
        "every user held through the idle hold",
        "server memory flat over the idle hold",
        "idle probe: every ping answered",
        "broadcast reached every connection",
        "shake wins reconcile",
        "hongbao audit passes",
    ] {
        assert!(checks.iter().any(|c| c["name"] == name && c["pass"] == true), "check {name} missing or failed");
    }
    let idle = &summary["idle"];
    assert_eq!(idle["connected_end"], summary["users"], "{idle:#}");
    assert_eq!(idle["reconnects"], 0, "{idle:#}");
    assert!(idle["samples"].as_array().unwrap().len() >= 3, "{idle:#}");
    assert!(idle["probe"]["pings"].as_u64().unwrap() > 0, "{idle:#}");
    let memory = &summary["memory"];
    assert!(memory["server_rss_bytes_per_conn"].is_i64(), "{memory:#}");
    assert!(memory["server_rss_bytes_per_conn_end_of_idle"].is_i64(), "{memory:#}");
    // Whole-machine figures (other tests move them): only that they were read.
    assert!(memory["kernel"]["slab_bytes_per_conn"].is_i64(), "{memory:#}");
    assert_eq!(summary["broadcast"]["received"], summary["users"], "{:#}", summary["broadcast"]);
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
    let (status, summary) = quick_demo(extra);
    assert!(status.success(), "demo failed: {summary:#}");
    assert_eq!(summary["pass"], true, "{summary:#}");
    let checks = summary["checks"].as_array().unwrap();
    for name in [
        "shake wins reconcile",
        "group opens reconcile",
        "hongbao audit passes",
        "packets released at the campaign rate",
        "broadcast reached every connection",
    ] {
        assert!(checks.iter().any(|c| c["name"] == name && c["pass"] == true), "check {name} missing or failed");
    }
    assert!(summary["shake_results"]["won"].as_u64().unwrap() > 0);
    assert!(summary["group_opens"].as_u64().unwrap() > 0);
    assert!(summary["packets_released"].as_u64().unwrap() > 0);
    assert_eq!(summary["group_opens"].as_u64().unwrap(), 3 * summary["group_packets_sent"].as_u64().unwrap());
    // Every user got the broadcast once, and the server's task reached them.
    let broadcast = &summary["broadcast"];
    assert_eq!(broadcast["received"], summary["users"], "{broadcast:#}");
    assert_eq!(broadcast["task_delivered"], summary["users"], "{broadcast:#}");
    assert!(broadcast["last_ms"].as_f64().is_some(), "{broadcast:#}");
    summary
}

/// Runs `hongbao demo --quick` with `extra` flags: its exit status and its
/// summary, once the report's files are there.
fn quick_demo(extra: &[&str]) -> (std::process::ExitStatus, serde_json::Value) {
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
    for file in ["seconds.csv", "requests.png", "wins.png", "released.png", "latency.png", "connections.png"] {
        let len = std::fs::metadata(out.path().join(file)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{file} written");
    }
    (status, summary)
}
