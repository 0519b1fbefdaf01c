//! Crash torture through the binary: `hongbao perf crash` runs cycles of
//! mixed load (deposits, sends, opens, shakes, acks), kills the server with
//! SIGKILL mid-load, audits the dead server's data, restarts it on the same
//! directory and checks that every acknowledged outcome is there exactly
//! once, that retried keyed requests never apply twice, and that expired
//! packets are refunded once. Three cycles here; docs/robustness.md quotes
//! a run of hundreds. Nothing here asserts a speed.

mod common;

use std::path::Path;

use common::hongbao;

/// The numbers before each of `names` in `line` ("12 deposits, 30 sends").
fn counts(line: &str, names: &[&str]) -> Vec<u64> {
    let words: Vec<&str> = line.split([' ', ',', ';', '(']).filter(|w| !w.is_empty()).collect();
    names
        .iter()
        .map(|name| {
            let at = words.iter().position(|w| w == name).unwrap_or_else(|| panic!("no {name} in {line}"));
            words[at - 1].parse().unwrap_or_else(|_| panic!("no count before {name} in {line}"))
        })
        .collect()
}

/// Processes whose command line names `data`: none may outlive the run.
fn processes_using(data: &Path) -> Vec<String> {
    let needle = data.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && !cmdline.contains("perf crash") {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn acknowledged_outcomes_survive_kill_9_cycles() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    torture_passes(&data, &[]);
    // What the run leaves is audited clean by the binary, and no server
    // process still holds it.
    let audit = hongbao().args(["audit", "--data"]).arg(&data).output().unwrap();
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));
    assert_eq!(processes_using(&data), Vec::<String>::new());
}

/// The same cycles with the money on a PostgreSQL server the run starts:
/// hongbao is killed, the database lives on, and whatever hongbao
/// acknowledged is there after each restart (its own audit runs after every
/// kill and after the last, clean stop, with `--store`).
#[test]
fn acknowledged_outcomes_survive_kill_9_cycles_on_postgres() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let stdout = torture_passes(&data, &["--postgres"]);
    assert!(stdout.contains("money on PostgreSQL at postgres://"), "{stdout}");
    assert_eq!(processes_using(&data), Vec::<String>::new());
}

/// Runs three cycles of `hongbao perf crash` (with `extra` flags) on `data`
/// and checks its report; returns what it printed.
fn torture_passes(data: &Path, extra: &[&str]) -> String {
    let out = hongbao()
        .args(["perf", "crash", "--cycles", "3", "--load-ms-min", "400", "--load-ms-max", "1200", "--seed", "20261129"])
        .arg("--data")
        .arg(data)
        .args(extra)
        .output()
        .expect("hongbao perf crash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "crash torture failed:\n{stdout}\n{stderr}");

    // Three cycles, each killed mid-load, audited, restarted and checked.
    let cycles: Vec<&str> = stdout.lines().filter(|l| l.starts_with("cycle ")).collect();
    assert_eq!(cycles.len(), 3, "{stdout}");
    for line in &cycles {
        assert!(line.contains("audit PASS") && line.contains("; PASS ("), "{line}");
    }
    // The load did real work of every kind, and all of it was checked.
    let run = stdout.lines().find(|l| l.starts_with("acknowledged over the run:")).expect("totals");
    let done = counts(run, &["deposits", "sends", "opens", "wins", "acks"]);
    assert!(done.iter().all(|&n| n > 0), "every kind of outcome was acknowledged: {run}");
    let checked = stdout.lines().find(|l| l.starts_with("checked:")).expect("checked totals");
    let seen = counts(checked, &["deposits", "sends", "opens", "wins", "refunds", "acks", "audits"]);
    let pairs = [(seen[0], done[0]), (seen[1], done[1]), (seen[2], done[2]), (seen[3], done[3]), (seen[5], done[4])];
    assert!(pairs.iter().all(|(c, d)| c >= d), "each acknowledged outcome checked: {checked}");
    assert!(seen[4] > 0, "expired packets were refunded and checked: {checked}");
    assert!(stdout.contains("crash: PASS"), "{stdout}");
    stdout
}
