//! A simulator worker process: a slice of the users, driven over stdin and
//! reporting over stdout, one JSON object per line.
//!
//! One process may hold at most 20,000 open files here, so the bench spreads
//! users over several workers (`hongbao sim-worker`). Workers never talk to
//! each other: every user decides from the clock alone when to shake
//! (`schedule`), so the only thing the bench tells them is the target rate.
//!
//! stdin: `{"rate": 30000}` (the new total target, all workers together),
//! `"stop"`. A closed stdin means stop too, so a dying bench never leaves
//! workers behind.
//! stdout: `{"ready": {...}}` once, then `{"second": {...}}` after every whole
//! wall-clock second, then `{"done": {...}}`.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use hongbao_client::procfs;

use crate::stats::{encode_histogram, SecondRow, Stats};
use crate::user::{self, Shared};

/// How long users get to finish in-flight requests after `stop`.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The slice of users one worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The gateways users connect to: user `index` to `servers[index % n]`,
    /// moving on to the next one each time it has to reconnect (a cluster's
    /// gateway that died).
    pub servers: Vec<SocketAddr>,
    /// Users `first_index .. first_index + count` of `users_total`.
    pub first_index: u64,
    pub count: u64,
    pub users_total: u64,
    /// New connections per second this worker opens while ramping up.
    pub connect_per_s: u64,
    pub heartbeat: Duration,
    /// Runtime threads (the bench shares the machine with the server).
    pub threads: usize,
    /// Loopback address this worker's users connect from (one per worker),
    /// each user from a port of its own: from 127.0.0.1 alone, the ephemeral
    /// port range (~28,000 here) would cap a bench's users to one server
    /// port. `None`: the system chooses.
    pub source: Option<std::net::Ipv4Addr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Rate(u64),
    Stop,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerReport {
    /// Started, before any user connects: the process's base memory.
    Ready { rss_bytes: u64 },
    /// The counters of wall-clock second `row.second` (Unix seconds) and its
    /// latency histogram (HdrHistogram V2, hex); the bench's broadcast
    /// notices received since the last report as (wall-clock unix ms, users),
    /// at most one pair per millisecond (absent when none).
    Second {
        row: Box<SecondRow>,
        histogram: String,
        rss_bytes: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        broadcast_receipts: Vec<(u64, u32)>,
    },
    /// Stopped; the last partial second's counters are in a final `Second`.
    Done { rss_bytes: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Resident set size of this process (0 if /proc cannot tell).
fn rss_bytes() -> u64 {
    procfs::rss_bytes(std::process::id()).unwrap_or(0)
}

fn emit(out: &mut impl Write, report: &WorkerReport) -> Result<(), WorkerError> {
    let line = serde_json::to_string(report).expect("reports serialise");
    writeln!(out, "{line}").and_then(|_| out.flush()).map_err(WorkerError::Stdout)
}

/// Runs the worker until `stop` (or end of input) arrives on `control`.
/// `token` makes the handshake token for a user id.
pub fn run(
    config: WorkerConfig,
    token: Box<dyn Fn(u64) -> String + Send + Sync>,
    control: impl BufRead + Send + 'static,
    mut out: impl Write,
) -> Result<(), WorkerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads.max(1))
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    let stats = Arc::new(Stats::default());
    let (rate_tx, rate_rx) = watch::channel(0u64);
    let (stop_tx, stop_rx) = watch::channel(false);
    // stdin is blocking; one plain thread turns lines into watch updates.
    std::thread::spawn(move || read_control(control, rate_tx, stop_tx));

    emit(&mut out, &WorkerReport::Ready { rss_bytes: rss_bytes() })?;
    let shared = Arc::new(Shared {
        servers: config.servers.clone(),
        users_total: config.users_total,
        heartbeat: config.heartbeat,
        token,
        stats: stats.clone(),
        source: config.source,
        first_index: config.first_index,
    });
    runtime.block_on(async move {
        let users = spawn_users(&config, shared, rate_rx, stop_rx.clone());
        report_seconds(&stats, users, stop_rx, &mut out).await
    })
}

/// Turns control lines into watch updates until `stop` or the end of input,
/// then tells everyone to stop.
fn read_control(control: impl BufRead, rate_tx: watch::Sender<u64>, stop_tx: watch::Sender<bool>) {
    for line in control.lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Control>(line.trim()) {
            Ok(Control::Rate(rate)) => drop(rate_tx.send(rate)),
            Ok(Control::Stop) => break,
            Err(e) => eprintln!("sim-worker: ignoring control line {line:?}: {e}"),
        }
    }
    let _ = stop_tx.send(true);
}

/// One task per user, each starting at its turn of the ramp
/// (`connect_per_s`), unless told to stop first.
fn spawn_users(
    config: &WorkerConfig,
    shared: Arc<Shared>,
    rate_rx: watch::Receiver<u64>,
    stop_rx: watch::Receiver<bool>,
) -> tokio::task::JoinSet<()> {
    let mut users = tokio::task::JoinSet::new();
    let started = tokio::time::Instant::now();
    let per_s = config.connect_per_s.max(1);
    for k in 0..config.count {
        let (shared, rate, mut stop) = (shared.clone(), rate_rx.clone(), stop_rx.clone());
        let start_at = started + Duration::from_micros(k * 1_000_000 / per_s);
        let index = config.first_index + k;
        users.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(start_at) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            user::run(shared, index, rate, stop).await;
        });
    }
    users
}

/// Reports every whole wall-clock second until told to stop; then gives the
/// users `STOP_GRACE` to finish, reports the last partial second and `done`.
async fn report_seconds(
    stats: &Stats,
    mut users: tokio::task::JoinSet<()>,
    mut stop: watch::Receiver<bool>,
    out: &mut impl Write,
) -> Result<(), WorkerError> {
    loop {
        // Wake just after each whole wall-clock second, so rows from
        // different workers describe the same second.
        let now = unix_ms();
        let next_second = now / 1000 + 1;
        let wait = Duration::from_millis(next_second * 1000 + 20 - now);
        let stopping = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        if stopping {
            let _ = tokio::time::timeout(STOP_GRACE, async { while users.join_next().await.is_some() {} }).await;
            users.abort_all();
            let rss = rss_bytes();
            emit(out, &second_report(stats, unix_ms() / 1000, rss))?;
            return emit(out, &WorkerReport::Done { rss_bytes: rss });
        }
        emit(out, &second_report(stats, next_second - 1, rss_bytes()))?;
    }
}

/// Takes second `second`'s counters, latencies and broadcast receipts.
fn second_report(stats: &Stats, second: u64, rss_bytes: u64) -> WorkerReport {
    let (row, h) = stats.take(second);
    WorkerReport::Second {
        row: Box::new(row),
        histogram: encode_histogram(&h),
        rss_bytes,
        broadcast_receipts: stats.take_broadcast_receipts(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_parse() {
        assert_eq!(serde_json::from_str::<Control>(r#"{"rate": 30000}"#).unwrap(), Control::Rate(30_000));
        assert_eq!(serde_json::from_str::<Control>(r#""stop""#).unwrap(), Control::Stop);
        assert!(serde_json::from_str::<Control>(r#"{"rate": -1}"#).is_err());
    }

    #[test]
    fn second_reports_carry_receipts_only_when_there_are_some() {
        let stats = Stats::default();
        let quiet = serde_json::to_string(&second_report(&stats, 7, 1)).unwrap();
        assert!(!quiet.contains("broadcast_receipts"), "{quiet}");
        stats.record_broadcast(7_250);
        let line = serde_json::to_string(&second_report(&stats, 7, 1)).unwrap();
        match serde_json::from_str::<WorkerReport>(&line).unwrap() {
            WorkerReport::Second { row, broadcast_receipts, .. } => {
                assert_eq!((row.broadcasts, row.broadcast_last_ms), (1, 7_250));
                assert_eq!(broadcast_receipts, vec![(7_250, 1)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_worker_without_a_server_reports_connection_errors_and_stops_on_eof() {
        // Port 9 on loopback: nothing listens, connects fail at once.
        let config = WorkerConfig {
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            first_index: 0,
            count: 3,
            users_total: 3,
            connect_per_s: 1000,
            heartbeat: Duration::from_secs(30),
            threads: 1,
            // Its own source address: the path every local bench takes.
            source: Some("127.0.1.200".parse().unwrap()),
        };
        let (rx, mut tx) = std::io::pipe().unwrap();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1_300));
            writeln!(tx, "\"stop\"").unwrap();
        });
        let mut out = Vec::new();
        run(config, Box::new(|u| u.to_string()), std::io::BufReader::new(rx), &mut out).unwrap();
        stopper.join().unwrap();
        let reports: Vec<WorkerReport> =
            String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(matches!(reports.first(), Some(WorkerReport::Ready { .. })));
        assert!(matches!(reports.last(), Some(WorkerReport::Done { .. })));
        let errors: u64 = reports
            .iter()
            .map(|r| match r {
                WorkerReport::Second { row, .. } => row.conn_errors,
                _ => 0,
            })
            .sum();
        assert!(errors >= 3, "every user failed to connect at least once: {errors}");
    }
}
