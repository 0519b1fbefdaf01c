//! `hongbao perf` figures run end to end at a small size: they measure real
//! work (commits, sockets) and print `FIGURE` lines that `bench/run.sh`
//! and docs/benchmarks.md rely on. Nothing here asserts a speed.

mod common;

use common::hongbao;

fn perf(args: &[&str]) -> String {
    let out = hongbao().arg("perf").args(args).output().expect("hongbao perf runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "perf {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The value of `FIGURE <name> <value> ...`, which must be there.
fn figure(out: &str, name: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("FIGURE {name} ")))
        .unwrap_or_else(|| panic!("no FIGURE {name} in:\n{out}"));
    line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).expect("a number")
}

/// Bytes per connection of the reading taken with every connection open and
/// awake (`(parked; N B while all were awake)`). At this size it is the
/// figure that shows the tool measures: the parked one is a few hundred
/// bytes a connection, 100–200 KB in all, within the allocator's own swing
/// between readings (its caches flushed or not, about 1 MB), so it may read
/// 0 here; `bench/run.sh conn-memory` measures it at 19,000.
fn awake_bytes_per_conn(out: &str) -> Vec<u64> {
    out.split("(parked; ")
        .skip(1)
        .map(|rest| rest.split(' ').next().and_then(|n| n.parse().ok()).expect("`<n> B while all were awake`"))
        .collect()
}

#[test]
fn opens_compares_group_commit_with_a_commit_per_open() {
    let out = perf(&["opens", "--opens", "2000", "--baseline-opens", "200", "--concurrency", "200"]);
    assert!(figure(&out, "opens_per_op") > 0.0);
    assert!(figure(&out, "opens_group_commit") > 0.0);
    assert!(out.contains("baseline=") && out.contains("ratio="), "{out}");
    // 200 openers at once: the writer must have put several opens in a commit.
    assert!(figure(&out, "opens_ops_per_commit") > 1.0);
}

#[test]
fn conn_memory_and_broadcast_measure_a_real_server() {
    let out = perf(&["conn-memory", "--connections", "300", "--transport", "both"]);
    // The parked figures are printed (`figure` panics on a missing one);
    // their values are not judged at this size (`awake_bytes_per_conn`).
    figure(&out, "conn_memory_tcp");
    figure(&out, "conn_memory_ws");
    let awake = awake_bytes_per_conn(&out);
    assert!(awake.len() == 2 && awake.iter().all(|&b| b > 0), "awake readings {awake:?} in:\n{out}");
    let out = perf(&["broadcast", "--connections", "300"]);
    assert!(figure(&out, "broadcast_ms") > 0.0);
    assert!(out.contains("ended done"), "{out}");
}

/// Connections over 2 gateway processes, held by this perf process and two
/// `perf hold` client processes (200 each, each from its own loopback
/// address): memory is summed over the server's processes, and the broadcast
/// reaches every reader in every client process.
#[test]
fn conn_memory_and_broadcast_span_gateway_and_client_processes() {
    let layout = ["--gateways", "2", "--clients-per-process", "200"];
    let out = perf(&[&["conn-memory", "--connections", "500", "--transport", "tcp"][..], &layout].concat());
    figure(&out, "conn_memory_tcp_gateways");
    let awake = awake_bytes_per_conn(&out);
    assert!(!awake.is_empty() && awake.iter().all(|&b| b > 0), "awake readings {awake:?} in:\n{out}");
    assert!(out.contains("on 2 gateway processes") && out.contains("from 3 client process(es)"), "{out}");
    let out = perf(&[&["broadcast", "--connections", "600"][..], &layout].concat());
    assert!(figure(&out, "broadcast_ms") > 0.0);
    assert!(out.contains("from 3 client process(es)") && out.contains("594 of 594 readers got it"), "{out}");
    assert!(out.contains("ended done with 600 of 600 delivered"), "{out}");
}

/// A tiny overload run in a debug build: each kind of work gets its
/// capacity step and a short phase at twice that rate; the checks come out
/// in their shape (every request answered, RSS read, the probe's pings)
/// and every figure is printed. No speed is asserted.
#[test]
fn overload_answers_every_request_and_prints_its_figures() {
    let out = perf(&[
        "overload",
        "--phase-s",
        "2",
        "--capacity-s",
        "1",
        "--connections",
        "8",
        "--open-users",
        "100",
        "--open-guess-per-s",
        "40000",
        "--full-windows-only",
    ]);
    for what in ["shake_plain", "shake_keyed", "open"] {
        for name in ["capacity", "offered", "sent", "answered", "rss_start", "rss_peak", "rss_end", "probe_p99"] {
            figure(&out, &format!("overload_{what}_{name}"));
        }
        assert!(figure(&out, &format!("overload_{what}_capacity")) > 0.0);
        assert!(figure(&out, &format!("overload_{what}_rss_peak")) > 0.0);
        let answered = out.lines().find(|l| l.starts_with(&format!("{what}: ")) && l.contains(" requests sent over"));
        let answered = answered.unwrap_or_else(|| panic!("no answer count for {what}:\n{out}"));
        assert!(answered.ends_with("-> every request answered"), "{answered}");
        let probe = out.lines().find(|l| l.starts_with(&format!("{what}: probe ping"))).expect("probe line");
        assert!(probe.contains("(0 unanswered)"), "{probe}");
    }
    assert!(out.contains("overload: PASS"), "{out}");
}
