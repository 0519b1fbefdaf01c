//! The bench orchestrator: runs the phase plan against a server, collects the
//! simulator's and the server's per-second counters, reconciles them, and
//! writes the report.
//!
//! Plain threads, no async: the users live in worker processes; here there
//! is one thread per worker reading its reports, one polling the server, and
//! the main thread stepping through the phases.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use hongbao_client::{procfs, Admin};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::seq::index::sample;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};

use crate::memory::{self, IdleSample, IdleSummary, KernelReading, KernelSummary, MemorySummary, ServerProcesses};
use crate::probe::{Probe, ProbeSummary};
use crate::report;
use crate::stats::{decode_histogram, LatencySummary, SecondRow};
use crate::timeline::{ServerSecond, TimelineRow};
use crate::user::BROADCAST_TOPIC;
use crate::worker::{Control, WorkerReport};

pub use crate::report::summary_table;

/// Users one worker process holds: below the 20,000 open files a process
/// may have here, with room for the runtime's own descriptors.
pub const USERS_PER_WORKER_DEFAULT: u64 = 15_000;
/// Account ids of the bench's own money, far above the simulated users.
const CAMPAIGN_FUNDER: u64 = 900_000_000_001;
/// The first of the users that send the group packets (see `group_senders`).
const GROUP_SENDER_FIRST: u64 = 900_000_000_100;
/// Group packets one sending user sends per second: half the server's
/// default per-user send rate (`sends_per_s` = 10), so the group phase
/// stays within it with room for timing jitter.
const GROUP_SENDS_PER_USER_PER_S: u64 = 5;
/// Average campaign packet (1 yuan); group packets are 3..=20 yuan.
const CAMPAIGN_PACKET_AVG_FEN: i64 = 100;
const GROUP_PACKET_FEN: std::ops::RangeInclusive<i64> = 300..=2_000;
const GROUP_PACKET_COUNT: u64 = 3;
/// Threads sending group packets through the admin API at once.
const GROUP_SENDERS: u64 = 4;
/// After the shaking stops, answers still in flight get this long.
const SHAKE_SETTLE: Duration = Duration::from_secs(2);
/// Group drain: stop waiting when opens have not moved for this long.
const DRAIN_IDLE: Duration = Duration::from_secs(5);
/// Share of a shake phase's target its median second may miss by.
const SHAKE_RATE_TOLERANCE: f64 = 0.02;
/// Share of the campaign rate the released count may miss by.
const RELEASE_TOLERANCE: f64 = 0.02;
/// The account the idle hold's probe logs in as: the bench's own range,
/// above every simulated user.
const PROBE_USER: u64 = 900_000_000_090;
/// After the connect phase, the server's RSS is read every half second
/// until two readings agree within `SETTLE_TOLERANCE` (at least
/// `SETTLE_MIN`, at most `SETTLE_MAX`): the hellos' burst leaves blocking
/// threads and buffers that go within seconds, and are not what holding
/// the connections costs.
const SETTLE_MIN: Duration = Duration::from_secs(2);
const SETTLE_MAX: Duration = Duration::from_secs(10);
const SETTLE_TOLERANCE: f64 = 0.002;
/// The broadcast gets this long to reach everyone, plus a second per
/// `BROADCAST_WAIT_USERS_PER_S` users: 100,000 connections took ~1 s on this
/// machine (docs/benchmarks.md), so the wait is ~10× what a million need.
const BROADCAST_WAIT_S: u64 = 60;
const BROADCAST_WAIT_USERS_PER_S: u64 = 20_000;
/// Longest heartbeat interval a plan may ask for (the server's idle timeout
/// is three of them, in seconds as a `u32`).
const HEARTBEAT_S_MAX: u64 = 86_400;

/// Every figure of a run. `demo`, `quick` and `reference` are starting points.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub users: u64,
    /// New connections per second, all workers together.
    pub connect_per_s: u64,
    pub connect_timeout_s: u64,
    /// The shake phases in order (`shake-1`, `shake-2`, ...): the reference
    /// has two; a ramp for the highest sustainable rate has more.
    pub shakes: Vec<ShakeStep>,
    /// Campaign packets released per second during both shake phases.
    pub campaign_rate: u64,
    pub group_packets: u64,
    pub group_rate: u64,
    /// Longest wait for the group packets to be opened.
    pub drain_timeout_s: u64,
    pub users_per_worker: u64,
    /// Runtime threads per worker process.
    pub worker_threads: usize,
    /// Seconds between the simulated clients' heartbeats; a local server
    /// announces it and closes a connection after three missed.
    pub heartbeat_s: u64,
    /// Seconds of the idle hold after the connect phase (0: none): everyone
    /// stays connected and heartbeats, nobody shakes; memory and a probe's
    /// pings are measured.
    pub idle_s: u64,
}

impl Plan {
    /// The default of `hongbao demo`: about 90 s on a 2-core machine.
    pub fn demo() -> Plan {
        Plan {
            users: 10_000,
            connect_per_s: 5_000,
            connect_timeout_s: 30,
            shakes: vec![ShakeStep { rate: 15_000, secs: 25 }, ShakeStep { rate: 30_000, secs: 25 }],
            campaign_rate: 200,
            group_packets: 4_000,
            group_rate: 200,
            drain_timeout_s: 20,
            users_per_worker: USERS_PER_WORKER_DEFAULT,
            worker_threads: 1,
            heartbeat_s: 30,
            idle_s: 0,
        }
    }

    /// `--quick`: well under a minute, for CI and for trying it.
    pub fn quick() -> Plan {
        Plan {
            users: 1_000,
            connect_per_s: 2_000,
            shakes: vec![ShakeStep { rate: 2_000, secs: 5 }, ShakeStep { rate: 4_000, secs: 5 }],
            group_packets: 400,
            drain_timeout_s: 15,
            ..Plan::demo()
        }
    }

    /// The reference experiment's shape (DESIGN.md §2), scaled to what one
    /// 2-core machine can hold: `hongbao bench`'s default.
    pub fn reference() -> Plan {
        Plan {
            users: 19_000,
            connect_per_s: 5_000,
            shakes: vec![ShakeStep { rate: 30_000, secs: 60 }, ShakeStep { rate: 60_000, secs: 60 }],
            group_packets: 20_000,
            drain_timeout_s: 60,
            // One thread per worker process: fewer threads than cores keeps
            // context switches down (12 vs 14-15 µs of simulator CPU per
            // shake, and a lower p99, measured at 40-80k/s).
            worker_threads: 1,
            ..Plan::demo()
        }
    }

    /// Wall time of the plan if every phase keeps to its schedule (the
    /// memory settle after connecting counted at its longest, the broadcast
    /// at 2 s).
    pub fn expected_s(&self) -> u64 {
        self.users / self.connect_per_s.max(1)
            + SETTLE_MAX.as_secs()
            + self.idle_s
            + self.shake_s()
            + 2
            + self.group_packets / self.group_rate.max(1)
            + SHAKE_SETTLE.as_secs()
            + 5
    }

    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |what: &str| Err(BenchError::Plan(what.to_owned()));
        if self.users == 0 {
            return bad("users must be at least 1");
        }
        if self.group_packets > 0 && self.users < GROUP_PACKET_COUNT {
            return bad("the group phase needs at least 3 users");
        }
        if self.connect_per_s == 0 || self.group_rate == 0 || self.campaign_rate == 0 {
            return bad("rates must be positive");
        }
        if self.users_per_worker == 0 || self.users_per_worker > 19_000 {
            return bad("users per worker must be 1..=19000 (a process may hold 20,000 open files)");
        }
        if self.heartbeat_s == 0 || self.heartbeat_s > HEARTBEAT_S_MAX {
            return bad(&format!("the heartbeat interval must be 1..={HEARTBEAT_S_MAX} s"));
        }
        Ok(())
    }

    /// Seconds of shaking, all shake phases together.
    pub fn shake_s(&self) -> u64 {
        self.shakes.iter().map(|s| s.secs).sum()
    }

    fn workers(&self) -> u64 {
        self.users.div_ceil(self.users_per_worker)
    }
}

/// One shake phase: `rate` shakes per second for `secs` seconds.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct ShakeStep {
    pub rate: u64,
    pub secs: u64,
}

impl ShakeStep {
    /// Parses `RATE:SECS[,RATE:SECS...]`, e.g. `20000:8,40000:8`.
    pub fn parse_list(text: &str) -> Result<Vec<ShakeStep>, BenchError> {
        let bad = || BenchError::Plan(format!("shake steps are RATE:SECS[,RATE:SECS...], not {text:?}"));
        text.split(',')
            .map(|step| {
                let (rate, secs) = step.trim().split_once(':').ok_or_else(bad)?;
                Ok(ShakeStep { rate: rate.parse().map_err(|_| bad())?, secs: secs.parse().map_err(|_| bad())? })
            })
            .collect()
    }
}

/// The server under test.
#[derive(Clone, Debug)]
pub struct ServerTarget {
    /// The first client address: the probe's, and the one named in the report.
    pub tcp: SocketAddr,
    /// Every client address users are spread over (`tcp` first): a
    /// cluster's gateways, or just `tcp`.
    pub gateways: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub admin_key: Option<String>,
    /// The server's process ids when it runs on this machine (with
    /// several gateway processes, all of them), to report its CPU time per
    /// phase (`/proc/<pid>/stat`, summed); empty when it runs elsewhere.
    pub pids: Vec<u32>,
}

/// How to start a worker process: `program args… --server … --first …`.
#[derive(Clone, Debug)]
pub struct WorkerLauncher {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Environment for the workers (secrets go here, not on the command
    /// line where `ps` shows them).
    pub env: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, pass: bool, detail: String) -> Check {
        Check { name: name.to_owned(), pass, detail }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad plan: {0}")]
    Plan(String),
    #[error("admin API: {0}")]
    Admin(String),
    #[error("worker: {0}")]
    Worker(String),
    #[error("report: {0}")]
    Io(#[from] std::io::Error),
    #[error("report: {0}")]
    Report(#[from] report::ReportError),
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ShakeResults {
    pub won: u64,
    pub none: u64,
    pub overload: u64,
    pub not_running: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub count: u64,
}

impl LatencyMs {
    fn of(h: &Histogram<u64>) -> LatencyMs {
        let s = LatencySummary::of(h);
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyMs { p50: ms(s.p50), p90: ms(s.p90), p99: ms(s.p99), max: ms(s.max), count: s.count }
    }
}

/// One phase as it ran.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseSummary {
    pub name: String,
    pub target_rate: u64,
    pub duration_s: f64,
    /// Median of the per-second answered shakes over the phase's whole seconds.
    pub answered_per_s_median: f64,
    pub latency_ms: LatencyMs,
    /// Shakes answered and `overload` answers during the phase.
    pub shakes_answered: u64,
    pub overload: u64,
    /// CPU time the server process used during the phase (local server, or
    /// `--server-pid`), all of its threads.
    pub server_cpu_s: Option<f64>,
    /// `server_cpu_s` divided by the shakes answered in the phase.
    pub server_cpu_us_per_shake: Option<f64>,
    /// `server_cpu_s` per second of the phase: cores kept busy.
    pub server_cpu_cores: Option<f64>,
    /// The same for the simulator's worker processes together.
    pub sim_cpu_us_per_shake: Option<f64>,
    pub sim_cpu_cores: Option<f64>,
}

/// `summary.json`; every field is described in docs/bench.md.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub pass: bool,
    pub users: u64,
    pub workers: u64,
    pub duration_s: f64,
    pub shakes_sent: u64,
    pub shakes_answered: u64,
    pub shake_results: ShakeResults,
    pub shake_errors: u64,
    pub packets_released: u64,
    pub packets_won: u64,
    pub amount_won_fen: i64,
    pub server_amount_won_fen: i64,
    pub group_packets_sent: u64,
    pub group_opens: u64,
    pub group_amount_opened_fen: i64,
    pub achieved_qps_max: u64,
    pub latency_ms: LatencyMs,
    pub sim_rss_bytes_per_user: u64,
    pub conn_errors: u64,
    pub reconnects: u64,
    /// Seconds from the start of the connect phase until every user was
    /// logged in (or the phase gave up).
    pub connect_s: f64,
    /// Users connected at the end of the idle hold (without one: once the
    /// connect phase settled).
    pub connections_held: u64,
    /// Server and kernel memory per connection.
    pub memory: MemorySummary,
    /// The idle hold, if the plan has one.
    pub idle: Option<IdleSummary>,
    pub broadcast: BroadcastSummary,
    pub phases: Vec<PhaseSummary>,
    pub checks: Vec<Check>,
    pub plan: Plan,
    pub started_unix_ms: u64,
    pub files: Vec<String>,
}

/// The broadcast phase as it ran: one `POST /v1/broadcast` with the topic
/// the simulated users count (`BROADCAST_TOPIC`), then the wait until each
/// connected user has it. Times are wall clock, taken in every worker.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BroadcastSummary {
    /// Unix ms just before the POST.
    pub posted_unix_ms: u64,
    /// How long the POST took to be answered (202).
    pub post_answer_ms: f64,
    /// Users connected when it was posted, and how many got it.
    pub connected: u64,
    pub received: u64,
    /// Milliseconds from the POST until the last receipt; p50 and p99 over
    /// every receipt (`None` without receipts).
    pub last_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The server's broadcast task when the wait ended (`GET /v1/tasks/{id}`):
    /// its state, the connections it started with and those it reached.
    pub task_id: u64,
    pub task_state: String,
    pub task_targets: u64,
    pub task_delivered: u64,
    /// The wait ran out before every connected user had it.
    pub timed_out: bool,
}

/// Delays of the broadcast receipts (`unix ms → users`) after `posted_ms`:
/// (p50, p99, last) in ms, `None` without receipts. Quantiles are the
/// receipt at rank ⌈q × n⌉, exact to the millisecond.
fn receipt_delays(receipts: &BTreeMap<u64, u64>, posted_ms: u64) -> Option<(f64, f64, f64)> {
    let n: u64 = receipts.values().sum();
    let last = *receipts.keys().next_back()?;
    let at_rank = |q: f64| {
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        receipts.iter().find(|(_, users)| {
            seen += **users;
            seen >= rank
        })
    };
    let delay = |at: u64| at.saturating_sub(posted_ms) as f64;
    Some((delay(*at_rank(0.50)?.0), delay(*at_rank(0.99)?.0), delay(last)))
}

/// How many users send the group packets: enough that none sends faster
/// than `GROUP_SENDS_PER_USER_PER_S`, as many real senders would.
fn group_senders(plan: &Plan) -> u64 {
    plan.group_rate.div_ceil(GROUP_SENDS_PER_USER_PER_S).max(1)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What the worker readers and the main thread share.
#[derive(Default)]
struct Collected {
    /// Unix second → merged row and histogram, and how many workers reported
    /// it. No histogram for a second without shakes: one is ~140 KB, and an
    /// idle hold of ten minutes would keep 80 MB of empty ones in this
    /// process, which is the local server's (its RSS is measured).
    seconds: BTreeMap<u64, (SecondRow, Option<Histogram<u64>>, usize)>,
    /// Broadcast receipts of every worker: wall-clock unix ms → users.
    broadcast_receipts: BTreeMap<u64, u64>,
    /// Latest connected count and RSS per worker.
    connected: Vec<i64>,
    rss: Vec<u64>,
    ready_rss: Vec<u64>,
    done: Vec<bool>,
    totals: SecondRow,
    all_latency: Option<Histogram<u64>>,
    failure: Option<String>,
}

impl Collected {
    fn connected(&self) -> i64 {
        self.connected.iter().sum()
    }
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Worker {
    fn send(&mut self, control: &Control) {
        if let Some(stdin) = &mut self.stdin {
            let line = serde_json::to_string(control).expect("controls serialise");
            if writeln!(stdin, "{line}").and_then(|_| stdin.flush()).is_err() {
                self.stdin = None;
            }
        }
    }
}

/// The server's cumulative counters at one instant.
#[derive(Clone, Debug)]
struct ServerSample {
    at_ms: u64,
    connections: u64,
    shakes: u64,
    shake_wins: u64,
    opens: u64,
    released: Option<u64>,
}

/// Phase boundaries as they happened: (start unix ms, name, target rate).
type PhaseLog = Arc<Mutex<Vec<PhaseMark>>>;

/// A phase boundary as it happened.
#[derive(Clone, Debug)]
struct PhaseMark {
    at_ms: u64,
    name: String,
    rate: u64,
    /// The server process's CPU seconds (user + system) at that moment.
    server_cpu_s: Option<f64>,
    /// All simulator worker processes' CPU seconds at that moment.
    sim_cpu_s: Option<f64>,
}

/// Live terminal output: a bar per phase, a line per second.
struct Live {
    multi: MultiProgress,
    bar: Mutex<Option<ProgressBar>>,
}

impl Live {
    fn line(&self, text: &str) {
        self.multi.suspend(|| println!("{text}"));
    }

    fn phase(&self, name: &str, len: u64, unit: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len));
        let template = format!("{{prefix:>9}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{msg}}");
        bar.set_style(ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
        bar.set_prefix(name.to_owned());
        if let Some(old) = self.bar.lock().expect("bar poisoned").replace(bar.clone()) {
            old.finish();
        }
        bar
    }

    fn finish(&self) {
        if let Some(old) = self.bar.lock().expect("bar poisoned").take() {
            old.finish();
        }
    }
}

/// What a run shares between its phases and its threads.
struct Run<'a> {
    plan: &'a Plan,
    admin: Admin,
    /// Unix ms at the start: makes this run's idempotency keys its own.
    run_id: u64,
    started_unix_ms: u64,
    live: Arc<Live>,
    phases: PhaseLog,
    /// The server's processes (CPU time per phase); empty when remote.
    server_pids: Vec<u32>,
    /// The same, with the gateway children found again at each memory
    /// reading.
    server_procs: ServerProcesses,
    /// Where the idle hold's probe connects.
    server_tcp: SocketAddr,
    /// The worker processes, once started.
    worker_pids: Mutex<Vec<u32>>,
    collected: Arc<Mutex<Collected>>,
    /// The server's counters, polled once a second.
    samples: Arc<Mutex<Vec<ServerSample>>>,
    /// The campaign, once created: the poller reads its released count.
    campaign_id: Arc<Mutex<Option<u64>>>,
}

impl Run<'_> {
    fn new<'a>(plan: &'a Plan, server: &ServerTarget) -> Run<'a> {
        let workers_n = plan.workers() as usize;
        Run {
            plan,
            admin: Admin::new(server.admin, server.admin_key.clone()),
            run_id: unix_ms(),
            started_unix_ms: unix_ms(),
            live: Arc::new(Live { multi: MultiProgress::new(), bar: Mutex::new(None) }),
            phases: Arc::default(),
            server_pids: server.pids.clone(),
            server_procs: ServerProcesses { named: server.pids.clone() },
            server_tcp: server.tcp,
            worker_pids: Mutex::default(),
            collected: Arc::new(Mutex::new(Collected {
                connected: vec![0; workers_n],
                rss: vec![0; workers_n],
                ready_rss: vec![0; workers_n],
                done: vec![false; workers_n],
                ..Default::default()
            })),
            samples: Arc::default(),
            campaign_id: Arc::default(),
        }
    }

    /// Records a phase boundary, with the CPU time the server's and the
    /// workers' processes have used so far.
    fn mark(&self, name: &str, rate: u64) {
        let cpu_s = |pids: &[u32]| if pids.is_empty() { None } else { pids.iter().copied().map(procfs::cpu_s).sum() };
        let server_cpu_s = cpu_s(&self.server_pids);
        let worker_pids = self.worker_pids.lock().expect("pids poisoned").clone();
        let sim_cpu_s = cpu_s(&worker_pids);
        self.phases.lock().expect("phases poisoned").push(PhaseMark {
            at_ms: unix_ms(),
            name: name.to_owned(),
            rate,
            server_cpu_s,
            sim_cpu_s,
        })
    }

    /// Why a worker failed, once one has.
    fn failure(&self) -> Option<String> {
        self.collected.lock().expect("collected poisoned").failure.clone()
    }

    /// The server's RSS, all of its processes (not the simulator's, which
    /// are this process's children too when the server runs in it).
    fn server_rss(&self) -> Option<u64> {
        let workers = self.worker_pids.lock().expect("pids poisoned").clone();
        self.server_procs.rss(&workers)
    }

    /// Users connected, as the workers last reported.
    fn connected(&self) -> i64 {
        self.collected.lock().expect("collected poisoned").connected()
    }
}

/// Memory before any user connects: the server's RSS and the kernel's.
struct MemoryBefore {
    server_rss: Option<u64>,
    kernel: Option<KernelReading>,
}

/// Runs `plan` against `server`, writes the report into `out` and returns
/// the summary. `finish` runs after the simulation (e.g. stops the server
/// and audits its data) and adds its checks.
pub fn run(
    plan: &Plan,
    server: &ServerTarget,
    launcher: &WorkerLauncher,
    out: &Path,
    finish: &mut dyn FnMut() -> Vec<Check>,
) -> Result<Summary, BenchError> {
    plan.validate()?;
    std::fs::create_dir_all(out)?;
    let started = Instant::now();
    let run = Run::new(plan, server);
    admin_call(run.admin.get("/health"))?;
    run.live.line(&format!(
        "hongbao bench: {} users in {} worker(s) against {} (admin {}), ~{} s planned",
        plan.users,
        plan.workers(),
        server.tcp,
        server.admin,
        plan.expected_s()
    ));
    fund(&run)?;
    let mut outcome = simulate(&run, server, launcher)?;

    // Reconcile against the server's ledger.
    let collected = run.collected.lock().expect("collected poisoned");
    let totals = collected.totals.clone();
    let (ledger, reconciled) = reconcile(&run, &outcome, &totals)?;
    let mut checks = std::mem::take(&mut outcome.checks);
    checks.extend(reconciled);
    let all_latency = collected.all_latency.clone();
    let rows = timeline(&collected, &run.phases, &run.samples, run.started_unix_ms);
    let phases = summarise_phases(&collected, &rows, &run.phases, run.started_unix_ms);
    drop(collected);
    checks.extend(held_checks(&phases));
    checks.extend(finish());

    let mut files = vec![out.join("seconds.csv")];
    report::write_csv(&files[0], &rows)?;
    files.extend(report::write_plots(out, &rows)?);
    let results = Results { totals, ledger, all_latency, rows, phases, checks };
    let mut summary = summary(&run, started, outcome, results);
    files.push(out.join("summary.json"));
    summary.files = files.iter().map(|f| f.display().to_string()).collect();
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary).expect("summary serialises"))?;
    Ok(summary)
}

/// Money first, so a plan the server cannot fund fails before any load.
fn fund(run: &Run) -> Result<(), BenchError> {
    let plan = run.plan;
    let campaign_packets = plan.campaign_rate * (plan.shake_s() + 10);
    let campaign_fen = campaign_packets as i64 * CAMPAIGN_PACKET_AVG_FEN;
    deposit(&run.admin, CAMPAIGN_FUNDER, campaign_fen, &format!("bench-{}-campaign", run.run_id))?;
    let senders = group_senders(plan);
    let sender_fen = plan.group_packets.div_ceil(senders) as i64 * GROUP_PACKET_FEN.end();
    for sender in 0..senders.min(plan.group_packets) {
        let key = format!("bench-{}-group-{sender}", run.run_id);
        deposit(&run.admin, GROUP_SENDER_FIRST + sender, sender_fen, &key)?;
    }
    Ok(())
}

/// The simulation proper: the phase plan, with the worker processes, the
/// server poller and the live printer around it, all stopped whatever the
/// plan's outcome.
fn simulate(run: &Run, server: &ServerTarget, launcher: &WorkerLauncher) -> Result<PhaseOutcome, BenchError> {
    let workers_n = run.plan.workers() as usize;
    let (second_tx, second_rx) = mpsc::channel::<u64>();
    // Workers start connecting as soon as they run: memory is read before.
    let before = MemoryBefore { server_rss: run.server_rss(), kernel: KernelReading::now() };
    let mut workers = spawn_workers(run.plan, server, launcher, &run.collected, second_tx)?;
    *run.worker_pids.lock().expect("pids poisoned") = workers.iter().map(|w| w.child.id()).collect();
    let stop_poll = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = spawn_poller(run.admin.clone(), run.campaign_id.clone(), run.samples.clone(), stop_poll.clone());
    let (collected, phases, samples) = (run.collected.clone(), run.phases.clone(), run.samples.clone());
    let printer = spawn_printer(second_rx, collected, phases, samples, run.live.clone(), workers_n);

    let result = run_phases(run, &mut workers, &before);
    stop_workers(&mut workers, &run.collected);
    stop_poll.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = poller.join();
    let _ = printer.join();
    run.live.finish();
    let outcome = result?;
    if let Some(failure) = run.failure() {
        return Err(BenchError::Worker(failure));
    }
    Ok(outcome)
}

/// Tells every worker to stop, gives them 20 s to report their last second
/// and exit, then kills (by PID) and reaps any that are left.
fn stop_workers(workers: &mut [Worker], collected: &Mutex<Collected>) {
    for w in workers.iter_mut() {
        w.send(&Control::Stop);
        w.stdin = None;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !collected.lock().expect("collected poisoned").done.iter().all(|d| *d) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers.iter_mut() {
        if matches!(w.child.try_wait(), Ok(None)) {
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }
}

/// The campaign as the server's ledger has it after the run.
struct CampaignLedger {
    won: u64,
    won_fen: i64,
    released: u64,
}

/// The checks against the server's ledger (shake wins, released packets,
/// group packets) and of the simulator's own totals.
fn reconcile(
    run: &Run,
    outcome: &PhaseOutcome,
    totals: &SecondRow,
) -> Result<(CampaignLedger, Vec<Check>), BenchError> {
    let plan = run.plan;
    let mut checks = Vec::new();
    let campaign = admin_call(run.admin.get(&format!("/v1/campaigns/{}", outcome.campaign)))?;
    let ledger = CampaignLedger {
        won: campaign["won"].as_u64().unwrap_or(0),
        won_fen: campaign["won_fen"].as_i64().unwrap_or(0),
        released: campaign["released"].as_u64().unwrap_or(0),
    };
    checks.push(Check::new(
        "shake wins reconcile",
        totals.won == ledger.won && totals.amount_won_fen == ledger.won_fen && ledger.won > 0,
        format!(
            "client saw {} wins / {} fen; the server's ledger holds {} wins / {} fen",
            totals.won, totals.amount_won_fen, ledger.won, ledger.won_fen
        ),
    ));
    let running_s = outcome.campaign_running_ms as f64 / 1000.0;
    let expected = plan.campaign_rate as f64 * running_s;
    let per_second: Vec<f64> = server_seconds(&run.samples.lock().expect("samples poisoned"))
        .values()
        .map(|s| s.released_per_s)
        .filter(|r| *r > 0.0)
        .collect();
    let released = ledger.released;
    checks.push(Check::new(
        "packets released at the campaign rate",
        (released as f64 - expected).abs() <= expected * RELEASE_TOLERANCE + 1.0,
        format!(
            "{released} released in {running_s:.1} s running = {:.1}/s against {}/s (tolerance {}%); per-second median {:.0}",
            released as f64 / running_s.max(0.001),
            plan.campaign_rate,
            RELEASE_TOLERANCE * 100.0,
            median(per_second)
        ),
    ));
    checks.extend(reconcile_groups(&run.admin, &outcome.group_packets, totals)?);
    checks.push(Check::new(
        "every shake answered",
        totals.shakes_answered + totals.shake_errors == totals.shakes_sent && totals.shake_errors == 0,
        format!(
            "{} sent, {} answered, {} errors, {} reconnects",
            totals.shakes_sent, totals.shakes_answered, totals.shake_errors, totals.reconnects
        ),
    ));
    Ok((ledger, checks))
}

/// One check per shake phase: its median second held the target rate, with
/// under 1 % `overload` answers.
fn held_checks(phases: &[PhaseSummary]) -> Vec<Check> {
    phases
        .iter()
        .filter(|p| p.name.starts_with("shake"))
        .map(|p| {
            let overload_share = p.overload as f64 / p.shakes_answered.max(1) as f64;
            Check::new(
                &format!("{} held {}/s", p.name, p.target_rate),
                p.answered_per_s_median >= p.target_rate as f64 * (1.0 - SHAKE_RATE_TOLERANCE) && overload_share < 0.01,
                format!(
                    "median {:.0} answered/s (within {}% of target required), {:.2}% overload (< 1% required)",
                    p.answered_per_s_median,
                    SHAKE_RATE_TOLERANCE * 100.0,
                    overload_share * 100.0
                ),
            )
        })
        .collect()
}

/// Everything the summary reports besides the plan and the phases' outcome.
struct Results {
    totals: SecondRow,
    ledger: CampaignLedger,
    all_latency: Option<Histogram<u64>>,
    rows: Vec<TimelineRow>,
    phases: Vec<PhaseSummary>,
    checks: Vec<Check>,
}

/// `summary.json`'s content (its list of files is filled in by the caller).
fn summary(run: &Run, started: Instant, outcome: PhaseOutcome, r: Results) -> Summary {
    let (plan, totals) = (run.plan, &r.totals);
    Summary {
        pass: r.checks.iter().all(|c| c.pass),
        users: plan.users,
        workers: plan.workers(),
        duration_s: started.elapsed().as_secs_f64(),
        shakes_sent: totals.shakes_sent,
        shakes_answered: totals.shakes_answered,
        shake_results: ShakeResults {
            won: totals.won,
            none: totals.none,
            overload: totals.overload,
            not_running: totals.not_running,
        },
        shake_errors: totals.shake_errors,
        packets_released: r.ledger.released,
        packets_won: r.ledger.won,
        amount_won_fen: totals.amount_won_fen,
        server_amount_won_fen: r.ledger.won_fen,
        group_packets_sent: outcome.group_packets.len() as u64,
        group_opens: totals.opens,
        group_amount_opened_fen: totals.amount_opened_fen,
        achieved_qps_max: r.rows.iter().map(|r| r.client.shakes_answered).max().unwrap_or(0),
        latency_ms: r.all_latency.as_ref().map(LatencyMs::of).unwrap_or_default(),
        sim_rss_bytes_per_user: outcome.rss_per_user,
        conn_errors: totals.conn_errors,
        reconnects: totals.reconnects,
        connect_s: outcome.connect_s,
        connections_held: outcome.connections_held,
        memory: outcome.memory,
        idle: outcome.idle,
        broadcast: outcome.broadcast,
        phases: r.phases,
        checks: r.checks,
        plan: plan.clone(),
        started_unix_ms: run.started_unix_ms,
        files: Vec::new(),
    }
}

fn admin_call(r: Result<hongbao_client::AdminResponse, String>) -> Result<Value, BenchError> {
    r.and_then(|r| r.ok()).map_err(BenchError::Admin)
}

fn deposit(admin: &Admin, user: u64, amount_fen: i64, key: &str) -> Result<(), BenchError> {
    admin_call(admin.post(&format!("/v1/accounts/{user}/deposit"), &json!({"amount_fen": amount_fen, "key": key})))
        .map(drop)
}

fn spawn_workers(
    plan: &Plan,
    server: &ServerTarget,
    launcher: &WorkerLauncher,
    collected: &Arc<Mutex<Collected>>,
    second_tx: mpsc::Sender<u64>,
) -> Result<Vec<Worker>, BenchError> {
    let n = plan.workers();
    let mut workers = Vec::new();
    for w in 0..n {
        let first = w * plan.users / n;
        let count = (w + 1) * plan.users / n - first;
        let mut cmd = Command::new(&launcher.program);
        cmd.args(&launcher.args)
            .envs(launcher.env.iter().map(|(k, v)| (k, v)))
            .args(["--server", &server.gateways.iter().map(SocketAddr::to_string).collect::<Vec<_>>().join(",")])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--users-total", &plan.users.to_string()])
            .args(["--connect-per-s", &(plan.connect_per_s / n).max(1).to_string()])
            .args(["--heartbeat-s", &plan.heartbeat_s.to_string()])
            .args(["--threads", &plan.worker_threads.to_string()])
            .args(worker_source(server.tcp, w).map(|ip| format!("--source={ip}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child =
            cmd.spawn().map_err(|e| BenchError::Worker(format!("cannot start {}: {e}", launcher.program.display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        let (collected, tx) = (collected.clone(), second_tx.clone());
        std::thread::spawn(move || read_worker(w as usize, stdout, collected, tx));
        workers.push(Worker { child, stdin });
    }
    Ok(workers)
}

/// The address worker `w` connects from when the server is on this
/// machine's loopback: 127.0.1.1, 127.0.1.2, … (all of 127.0.0.0/8 is
/// loopback on Linux), so every worker has its own ~22,000 source ports.
fn worker_source(server: SocketAddr, w: u64) -> Option<std::net::Ipv4Addr> {
    match server {
        SocketAddr::V4(v4) if v4.ip().is_loopback() && w < 254 => Some(std::net::Ipv4Addr::new(127, 0, 1, 1 + w as u8)),
        _ => None,
    }
}

fn read_worker(w: usize, stdout: std::process::ChildStdout, collected: Arc<Mutex<Collected>>, tx: mpsc::Sender<u64>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let report: WorkerReport = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                collected.lock().expect("collected poisoned").failure =
                    Some(format!("worker {w} sent an unreadable line ({e}): {line}"));
                continue;
            }
        };
        let mut c = collected.lock().expect("collected poisoned");
        match report {
            WorkerReport::Ready { rss_bytes } => c.ready_rss[w] = rss_bytes,
            WorkerReport::Second { row, histogram, rss_bytes, broadcast_receipts } => {
                let h = decode_histogram(&histogram).filter(|h| !h.is_empty());
                for (at_ms, users) in broadcast_receipts {
                    *c.broadcast_receipts.entry(at_ms).or_insert(0) += u64::from(users);
                }
                c.connected[w] = row.connected;
                c.rss[w] = rss_bytes;
                c.totals.merge(&row);
                if let Some(h) = &h {
                    match &mut c.all_latency {
                        Some(all) => drop(all.add(h)),
                        None => c.all_latency = Some(h.clone()),
                    }
                }
                let second = row.second;
                let entry =
                    c.seconds.entry(second).or_insert_with(|| (SecondRow { second, ..Default::default() }, None, 0));
                match (&mut entry.1, h) {
                    (Some(merged), Some(h)) => drop(merged.add(&h)),
                    (slot @ None, Some(h)) => *slot = Some(h),
                    (_, None) => {}
                }
                entry.0.merge(&row);
                entry.2 += 1;
                drop(c);
                let _ = tx.send(second);
            }
            WorkerReport::Done { .. } => c.done[w] = true,
        }
    }
    let mut c = collected.lock().expect("collected poisoned");
    if !c.done[w] && c.failure.is_none() {
        c.failure = Some(format!("worker {w} exited before it was told to stop"));
    }
    c.done[w] = true;
}

fn empty_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn spawn_poller(
    admin: Admin,
    campaign: Arc<Mutex<Option<u64>>>,
    samples: Arc<Mutex<Vec<ServerSample>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // Poll just after each wall-clock second, as the workers report, so
            // the server's deltas line up with the simulator's seconds.
            let now = unix_ms();
            std::thread::sleep(Duration::from_millis((now / 1000 + 1) * 1000 + 20 - now));
            let Ok(stats) = admin_call(admin.get("/v1/stats")) else { continue };
            let at_ms = unix_ms();
            let id = *campaign.lock().expect("campaign poisoned");
            let released = id.and_then(|id| {
                admin_call(admin.get(&format!("/v1/campaigns/{id}"))).ok().and_then(|c| c["released"].as_u64())
            });
            let n = |k: &str| stats[k].as_u64().unwrap_or(0);
            samples.lock().expect("samples poisoned").push(ServerSample {
                at_ms,
                connections: n("connections"),
                shakes: n("shakes"),
                shake_wins: n("shake_wins"),
                opens: n("opens"),
                released,
            });
        }
    })
}

/// Per-second server figures: the change between consecutive samples,
/// divided by the time between them, filed under the second of their midpoint.
fn server_seconds(samples: &[ServerSample]) -> BTreeMap<u64, ServerSecond> {
    let mut out = BTreeMap::new();
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let dt = (b.at_ms.saturating_sub(a.at_ms)) as f64 / 1000.0;
        if dt <= 0.0 {
            continue;
        }
        let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
        let released = match (a.released, b.released) {
            (Some(x), Some(y)) => rate(x, y),
            _ => 0.0,
        };
        out.insert(
            (a.at_ms + b.at_ms) / 2000,
            ServerSecond {
                connections: b.connections,
                shakes_per_s: rate(a.shakes, b.shakes),
                shake_wins_per_s: rate(a.shake_wins, b.shake_wins),
                opens_per_s: rate(a.opens, b.opens),
                released_per_s: released,
            },
        );
    }
    out
}

fn phase_at(phases: &[PhaseMark], unix_s: u64) -> (String, u64) {
    phases
        .iter()
        .rev()
        .find(|p| p.at_ms / 1000 <= unix_s)
        .map(|p| (p.name.clone(), p.rate))
        .unwrap_or_else(|| ("start".to_owned(), 0))
}

/// Prints one line per completed second (all workers reported it).
fn spawn_printer(
    seconds: mpsc::Receiver<u64>,
    collected: Arc<Mutex<Collected>>,
    phases: PhaseLog,
    samples: Arc<Mutex<Vec<ServerSample>>>,
    live: Arc<Live>,
    workers: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let start_s = unix_ms() / 1000;
        let mut printed = 0u64;
        for second in seconds {
            let c = collected.lock().expect("collected poisoned");
            let Some((row, h, reported)) = c.seconds.get(&second) else { continue };
            if *reported < workers || second <= printed {
                continue;
            }
            printed = second;
            let (phase, target) = phase_at(&phases.lock().expect("phases poisoned"), second);
            let server = samples.lock().expect("samples poisoned").last().map(|s| s.connections).unwrap_or(0);
            let p99 = h.as_ref().map(|h| LatencyMs::of(h).p99).unwrap_or(0.0);
            live.line(&format!(
                "[{:>4}s] {:<9} conn {:>6} (server {:>6})  target {:>6}/s  answered {:>6}/s  wins {:>4}/s  opens {:>4}/s  p99 {:>7.2} ms",
                second.saturating_sub(start_s),
                phase,
                c.connected(),
                server,
                target,
                row.shakes_answered,
                row.won,
                row.opens,
                p99
            ));
        }
    })
}

/// `rate N` typed on the bench's stdin changes the shake target of the
/// current shake phase (the next phase starts at its own planned rate).
struct RateOverride(Arc<Mutex<Option<u64>>>);

impl RateOverride {
    fn from_stdin() -> RateOverride {
        let slot: Arc<Mutex<Option<u64>>> = Arc::default();
        let writer = slot.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { return };
                match parse_rate_command(&line) {
                    Some(rate) => *writer.lock().expect("override poisoned") = Some(rate),
                    None if line.trim().is_empty() => {}
                    None => eprintln!("bench: say `rate N` to change the shake target (got {line:?})"),
                }
            }
        });
        RateOverride(slot)
    }

    fn take(&self) -> Option<u64> {
        self.0.lock().expect("override poisoned").take()
    }
}

fn parse_rate_command(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("rate"), Some(n), None) => n.parse().ok(),
        _ => None,
    }
}

/// (packet id, amount in fen) of each group packet sent.
type GroupPackets = Vec<(u64, i64)>;

struct PhaseOutcome {
    campaign: u64,
    campaign_running_ms: u64,
    group_packets: GroupPackets,
    rss_per_user: u64,
    connect_s: f64,
    connections_held: u64,
    memory: MemorySummary,
    idle: Option<IdleSummary>,
    broadcast: BroadcastSummary,
    checks: Vec<Check>,
}

/// The plan's phases in order: connect (then memory settles), the idle
/// hold, shake (while a campaign releases packets), broadcast, group
/// packets, drain.
fn run_phases(run: &Run, workers: &mut [Worker], before: &MemoryBefore) -> Result<PhaseOutcome, BenchError> {
    let rate_override = RateOverride::from_stdin();
    let mut checks = Vec::new();
    let connected = connect_phase(run)?;
    checks.push(connected.check);
    let mut memory = settle_memory(run, before);
    let mut connections_held = memory.connections;
    let idle = match run.plan.idle_s {
        0 => None,
        _ => {
            let (idle, idle_checks) = idle_phase(run)?;
            checks.extend(idle_checks);
            memory.server_rss_end_of_idle_bytes = idle.samples.last().and_then(|s| s.server_rss_bytes);
            memory.server_rss_bytes_per_conn_end_of_idle =
                match (before.server_rss, memory.server_rss_end_of_idle_bytes) {
                    (Some(b), Some(a)) => Some(memory::per_connection(b, a, memory.connections)),
                    _ => None,
                };
            connections_held = idle.connected_end.max(0) as u64;
            Some(idle)
        }
    };
    let (campaign, campaign_running_ms) = shake_phases(run, workers, &rate_override)?;
    let (broadcast, reached) = broadcast_phase(run)?;
    checks.push(reached);
    let (group_packets, sent) = group_phase(run)?;
    checks.extend(sent);
    drain_phase(run);
    Ok(PhaseOutcome {
        campaign,
        campaign_running_ms,
        group_packets,
        rss_per_user: connected.rss_per_user,
        connect_s: connected.connect_s,
        connections_held,
        memory,
        idle,
        broadcast,
        checks,
    })
}

/// Sends `c` to every worker.
fn tell(workers: &mut [Worker], c: Control) {
    workers.iter_mut().for_each(|w| w.send(&c));
}

/// What the connect phase measured.
struct Connected {
    /// The simulator's memory per connected user.
    rss_per_user: u64,
    /// Seconds until everyone was logged in (or the phase gave up).
    connect_s: f64,
    check: Check,
}

/// Phase 1: connect everyone. The wait is the planned ramp plus
/// `connect_timeout_s` or half the ramp, whichever is longer: a million
/// users at 10,000/s ramp for 100 s, and a machine a little slower than
/// planned needs more than a fixed 30 s to catch up.
fn connect_phase(run: &Run) -> Result<Connected, BenchError> {
    let plan = run.plan;
    run.mark("connect", 0);
    let bar = run.live.phase("connect", plan.users, "users");
    let began = Instant::now();
    let ramp_s = plan.users / plan.connect_per_s;
    let deadline = began + Duration::from_secs(ramp_s + plan.connect_timeout_s.max(ramp_s / 2));
    let mut connected = 0;
    while Instant::now() < deadline {
        if let Some(f) = run.failure() {
            return Err(BenchError::Worker(f));
        }
        connected = run.collected.lock().expect("collected poisoned").connected().max(0) as u64;
        bar.set_position(connected);
        if connected >= plan.users {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let connect_s = began.elapsed().as_secs_f64();
    // One more report so every worker's RSS reflects its connected users.
    std::thread::sleep(Duration::from_millis(1_100));
    let rss_per_user = {
        let c = run.collected.lock().expect("collected poisoned");
        let grown: u64 = c.rss.iter().zip(&c.ready_rss).map(|(now, base)| now.saturating_sub(*base)).sum();
        grown / (c.connected().max(1) as u64)
    };
    let check = Check::new(
        "all users connected",
        connected >= plan.users,
        format!(
            "{connected} of {} users logged in in {connect_s:.1} s; simulator memory {rss_per_user} B per user",
            plan.users
        ),
    );
    Ok(Connected { rss_per_user, connect_s, check })
}

/// After the connect phase: waits for the server's RSS to settle, then
/// reads it and the kernel's memory, against the readings from before.
fn settle_memory(run: &Run, before: &MemoryBefore) -> MemorySummary {
    run.mark("memory", 0);
    let began = Instant::now();
    let mut last = run.server_rss();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = run.server_rss();
        let agree = match (last, now) {
            (Some(a), Some(b)) => (b as f64 - a as f64).abs() <= a as f64 * SETTLE_TOLERANCE,
            // Without the server's processes there is nothing to wait for.
            _ => true,
        };
        last = now;
        if (agree && began.elapsed() >= SETTLE_MIN) || began.elapsed() >= SETTLE_MAX {
            break;
        }
    }
    let connections = run.connected().max(0) as u64;
    let workers = run.worker_pids.lock().expect("pids poisoned").clone();
    let kernel = match (before.kernel, KernelReading::now()) {
        (Some(b), Some(a)) => Some(KernelSummary::of(b, a, connections, hongbao_client::procfs::page_size())),
        _ => None,
    };
    MemorySummary {
        connections,
        server_processes: run.server_procs.pids(&workers).len(),
        server_rss_before_bytes: before.server_rss,
        server_rss_after_connect_bytes: last,
        server_rss_end_of_idle_bytes: None,
        server_rss_bytes_per_conn: match (before.server_rss, last) {
            (Some(b), Some(a)) => Some(memory::per_connection(b, a, connections)),
            _ => None,
        },
        server_rss_bytes_per_conn_end_of_idle: None,
        settle_s: began.elapsed().as_secs_f64(),
        kernel,
    }
}

/// The idle hold: everyone stays connected and heartbeats, nobody shakes.
/// Samples memory (server and simulator) every `memory::sample_every_s`,
/// while a probe connection pings every 100 ms. Returns the hold's summary
/// and its checks: memory flat, everyone still connected, every ping
/// answered.
fn idle_phase(run: &Run) -> Result<(IdleSummary, Vec<Check>), BenchError> {
    let plan = run.plan;
    run.mark("idle", 0);
    let bar = run.live.phase("idle", plan.idle_s, "s");
    let counters = || {
        let c = run.collected.lock().expect("collected poisoned");
        (c.totals.reconnects, c.totals.conn_errors)
    };
    let (reconnects_before, errors_before) = counters();
    let (probe, probe_error) = match Probe::start(run.server_tcp, probe_token(&run.admin)) {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let began = Instant::now();
    let hold = Duration::from_secs(plan.idle_s);
    let every = Duration::from_secs(memory::sample_every_s(plan.idle_s));
    let sample = || {
        let c = run.collected.lock().expect("collected poisoned");
        let (sim_rss_bytes, connected) = (c.rss.iter().sum(), c.connected());
        drop(c);
        IdleSample { at_s: began.elapsed().as_secs_f64(), server_rss_bytes: run.server_rss(), sim_rss_bytes, connected }
    };
    let mut samples = vec![sample()];
    let mut next = every;
    loop {
        if let Some(f) = run.failure() {
            if let Some(p) = probe {
                let _ = p.finish();
            }
            return Err(BenchError::Worker(f));
        }
        let elapsed = began.elapsed();
        if elapsed >= hold {
            break;
        }
        if elapsed >= next {
            samples.push(sample());
            next += every;
        }
        bar.set_position(elapsed.as_secs());
        std::thread::sleep(Duration::from_millis(200).min(hold - elapsed));
    }
    samples.push(sample());
    let (probe, probe_error) = match probe.map(Probe::finish) {
        Some(Ok(summary)) => (Some(summary), probe_error),
        Some(Err(e)) => (None, Some(e.to_string())),
        None => (None, probe_error),
    };
    let (reconnects, errors) = counters();
    let settle_s = memory::settle_s(plan.idle_s);
    let idle = IdleSummary {
        duration_s: began.elapsed().as_secs_f64(),
        server_rss_drift: memory::drift(&samples, settle_s, |s| s.server_rss_bytes),
        sim_rss_drift: memory::drift(&samples, settle_s, |s| Some(s.sim_rss_bytes)),
        connected_end: samples.last().map(|s| s.connected).unwrap_or(0),
        reconnects: reconnects - reconnects_before,
        conn_errors: errors - errors_before,
        samples,
        settle_s,
        probe,
        probe_error,
    };
    let checks = idle_checks(plan, &idle);
    Ok((idle, checks))
}

/// The probe's token: one the server signs (`POST /v1/tokens`), or the bare
/// user id a `--dev` server takes if it will not.
fn probe_token(admin: &Admin) -> String {
    admin_call(admin.post("/v1/tokens", &json!({"user": PROBE_USER, "ttl_s": 86_400})))
        .ok()
        .and_then(|t| t["token"].as_str().map(str::to_owned))
        .unwrap_or_else(|| PROBE_USER.to_string())
}

/// The idle hold's checks. Memory is judged only where the server's
/// processes are known (a local server, or `--server-pid`).
fn idle_checks(plan: &Plan, idle: &IdleSummary) -> Vec<Check> {
    let mut checks = vec![Check::new(
        "every user held through the idle hold",
        idle.connected_end >= plan.users as i64 && idle.reconnects == 0,
        format!(
            "{} of {} users connected at the end of {:.0} s, {} reconnects, {} connection errors (heartbeat every {} s)",
            idle.connected_end, plan.users, idle.duration_s, idle.reconnects, idle.conn_errors, plan.heartbeat_s
        ),
    )];
    if let Some(d) = &idle.server_rss_drift {
        checks.push(Check::new(
            "server memory flat over the idle hold",
            d.flat(),
            format!(
                "server RSS {} -> {} B from {:.0} s to {:.0} s into the hold: {:+} B ({:+.2}%; flat is < {}% and \
                 < {} MiB)",
                d.from_bytes,
                d.to_bytes,
                d.from_s,
                d.to_s,
                d.bytes,
                d.pct,
                memory::FLAT_GROWTH_SHARE_MAX * 100.0,
                memory::FLAT_GROWTH_BYTES_MAX >> 20
            ),
        ));
    }
    let probe_detail = match (&idle.probe, &idle.probe_error) {
        (Some(p), _) => format!(
            "{} pings every {} ms, {} lost; p50 {:.2} ms, p99 {:.2} ms (target {} ms), max {:.2} ms",
            p.pings, p.every_ms, p.lost, p.p50_ms, p.p99_ms, p.target_p99_ms, p.max_ms
        ),
        (None, Some(e)) => e.clone(),
        (None, None) => "no probe".to_owned(),
    };
    checks.push(Check::new(
        "idle probe: every ping answered",
        idle.probe.as_ref().is_some_and(|p: &ProbeSummary| p.lost == 0 && p.pings > 0),
        probe_detail,
    ));
    checks
}

/// After the shake phases: one broadcast (`POST /v1/broadcast`), then wait
/// until every connected user has counted it, or the wait runs out.
fn broadcast_phase(run: &Run) -> Result<(BroadcastSummary, Check), BenchError> {
    let plan = run.plan;
    run.mark("broadcast", 0);
    let connected = run.connected().max(0) as u64;
    let bar = run.live.phase("broadcast", connected, "users");
    let received = || run.collected.lock().expect("collected poisoned").totals.broadcasts;
    let already = received();
    let posted_unix_ms = unix_ms();
    let posted = Instant::now();
    let task = admin_call(run.admin.post(
        "/v1/broadcast",
        &json!({"topic": BROADCAST_TOPIC, "text": format!("hongbao bench {}: 新年快乐", run.run_id)}),
    ))?;
    let post_answer_ms = posted.elapsed().as_secs_f64() * 1e3;
    // A server answers its task; a cluster admin the task of every SET.
    let task_ids: Vec<u64> = match (task["id"].as_u64(), task["tasks"].as_array()) {
        (Some(id), _) => vec![id],
        (None, Some(tasks)) => tasks.iter().filter_map(|t| t["id"].as_u64()).collect(),
        (None, None) => Vec::new(),
    };
    let Some(&task_id) = task_ids.first() else {
        return Err(BenchError::Admin(format!("no task id in {task}")));
    };
    let deadline = posted + Duration::from_secs(BROADCAST_WAIT_S + plan.users / BROADCAST_WAIT_USERS_PER_S);
    let mut got = 0;
    while Instant::now() < deadline {
        if let Some(f) = run.failure() {
            return Err(BenchError::Worker(f));
        }
        got = received() - already;
        bar.set_position(got.min(connected));
        if got >= connected {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Receipts of a worker's last second come with its next report.
    std::thread::sleep(Duration::from_millis(1_100));
    let received = received() - already;
    let tasks = task_ids
        .iter()
        .map(|id| admin_call(run.admin.get(&format!("/v1/tasks/{id}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let sum = |field: &str| tasks.iter().map(|t| t[field].as_u64().unwrap_or(0)).sum::<u64>();
    let mut states: Vec<&str> = tasks.iter().map(|t| t["state"].as_str().unwrap_or("?")).collect();
    states.sort_unstable();
    states.dedup();
    let delays = receipt_delays(&run.collected.lock().expect("collected poisoned").broadcast_receipts, posted_unix_ms);
    let summary = BroadcastSummary {
        posted_unix_ms,
        post_answer_ms,
        connected,
        received,
        last_ms: delays.map(|d| d.2),
        p50_ms: delays.map(|d| d.0),
        p99_ms: delays.map(|d| d.1),
        task_id,
        task_state: states.join("/"),
        task_targets: sum("targets"),
        task_delivered: sum("delivered"),
        timed_out: got < connected,
    };
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".to_owned());
    let check = Check::new(
        "broadcast reached every connection",
        received == connected && connected > 0,
        format!(
            "{received} of {connected} connected users got it; last {} after the POST (p50 {}, p99 {}); server task \
             {task_id} {} with {} of {} delivered",
            ms(summary.last_ms),
            ms(summary.p50_ms),
            ms(summary.p99_ms),
            summary.task_state,
            summary.task_delivered,
            summary.task_targets
        ),
    );
    Ok((summary, check))
}

/// Phases 2 and 3 (and any further shake steps): shake while a campaign
/// releases packets, then let the answers in flight settle and stop the
/// campaign. Returns the campaign and how long it ran, in ms.
fn shake_phases(run: &Run, workers: &mut [Worker], rate_override: &RateOverride) -> Result<(u64, u64), BenchError> {
    let plan = run.plan;
    let campaign_packets = plan.campaign_rate * (plan.shake_s() + 10);
    let created = admin_call(run.admin.post(
        "/v1/campaigns",
        &json!({
            "funder": CAMPAIGN_FUNDER,
            "total_fen": campaign_packets as i64 * CAMPAIGN_PACKET_AVG_FEN,
            "rule": {"count": {"packets": campaign_packets}},
            "rate_per_s": plan.campaign_rate,
            "key": format!("bench-{}-campaign", run.run_id),
        }),
    ))?;
    let campaign = created["id"].as_u64().ok_or_else(|| BenchError::Admin(format!("no campaign id in {created}")))?;
    admin_call(run.admin.post(&format!("/v1/campaigns/{campaign}/start"), &json!({})))?;
    let campaign_started = Instant::now();
    *run.campaign_id.lock().expect("campaign poisoned") = Some(campaign);
    for (i, step) in plan.shakes.iter().enumerate() {
        shake_step(run, workers, rate_override, &format!("shake-{}", i + 1), *step)?;
    }
    run.mark("settle", 0);
    tell(workers, Control::Rate(0));
    std::thread::sleep(SHAKE_SETTLE);
    let campaign_running_ms = campaign_started.elapsed().as_millis() as u64;
    admin_call(run.admin.post(&format!("/v1/campaigns/{campaign}/stop"), &json!({})))?;
    Ok((campaign, campaign_running_ms))
}

/// One shake phase: `step.rate` for `step.secs`, or the rate typed on stdin.
fn shake_step(
    run: &Run,
    workers: &mut [Worker],
    rate_override: &RateOverride,
    name: &str,
    step: ShakeStep,
) -> Result<(), BenchError> {
    let (rate, secs) = (step.rate, step.secs);
    // A `rate N` typed before this phase was meant for another one.
    let _ = rate_override.take();
    run.mark(name, rate);
    tell(workers, Control::Rate(rate));
    let bar = run.live.phase(name, secs, "s");
    bar.set_message(format!("target {rate}/s"));
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if let Some(f) = run.failure() {
            return Err(BenchError::Worker(f));
        }
        if let Some(rate) = rate_override.take() {
            run.mark(name, rate);
            tell(workers, Control::Rate(rate));
            bar.set_message(format!("target {rate}/s (changed from stdin)"));
        }
        std::thread::sleep(Duration::from_millis(200));
        bar.set_position(secs - end.saturating_duration_since(Instant::now()).as_secs());
    }
    Ok(())
}

/// Phase 4: group packets to three random users each, at the planned rate.
/// Returns (packet, amount) of each and the check of the rate.
fn group_phase(run: &Run) -> Result<(GroupPackets, Option<Check>), BenchError> {
    let plan = run.plan;
    run.mark("group", 0);
    let bar = run.live.phase("group", plan.group_packets, "packets");
    // Several senders, each keeping its share of the schedule: one admin
    // call waits for its commit, so a single sender would fall behind the
    // rate on a slow disk or a debug build.
    let began = Instant::now();
    let sent_count = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<Result<GroupPackets, BenchError>> = std::thread::scope(|scope| {
        let senders: Vec<_> = (0..GROUP_SENDERS)
            .map(|sender| {
                let (bar, sent_count) = (&bar, &sent_count);
                scope.spawn(move || send_group_packets(run, sender, began, bar, sent_count))
            })
            .collect();
        senders.into_iter().map(|h| h.join().expect("sender thread panicked")).collect()
    });
    let mut group_packets = Vec::new();
    for r in results {
        group_packets.extend(r?);
    }
    let send_s = began.elapsed().as_secs_f64();
    let check = (plan.group_packets > 0).then(|| {
        Check::new(
            "group packets sent at the planned rate",
            plan.group_packets as f64 / send_s.max(0.001) >= plan.group_rate as f64 * 0.95,
            format!(
                "{} packets in {send_s:.1} s = {:.1}/s (plan {}/s)",
                plan.group_packets,
                plan.group_packets as f64 / send_s.max(0.001),
                plan.group_rate
            ),
        )
    });
    Ok((group_packets, check))
}

/// One sender's share of the group packets: packets `sender`,
/// `sender + GROUP_SENDERS`, …, each at its time on the plan's schedule.
fn send_group_packets(
    run: &Run,
    sender: u64,
    began: Instant,
    bar: &ProgressBar,
    sent_count: &std::sync::atomic::AtomicU64,
) -> Result<GroupPackets, BenchError> {
    let plan = run.plan;
    let mut rng = rand::rng();
    let mut mine = Vec::new();
    for i in (sender..plan.group_packets).step_by(GROUP_SENDERS as usize) {
        let due = began + Duration::from_micros(i * 1_000_000 / plan.group_rate);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let users: Vec<u64> = sample(&mut rng, plan.users as usize, GROUP_PACKET_COUNT as usize)
            .into_iter()
            .map(|i| i as u64 + 1)
            .collect();
        let amount = rng.random_range(GROUP_PACKET_FEN);
        let sent = admin_call(run.admin.post(
            "/v1/packets",
            &json!({
                "sender": GROUP_SENDER_FIRST + i % group_senders(plan), "amount_fen": amount, "count": GROUP_PACKET_COUNT,
                "kind": "lucky", "to": {"users": users}, "greeting": "恭喜发财",
                "key": format!("bench-{}-group-{i}", run.run_id),
            }),
        ))?;
        let packet = sent["packet"].as_u64().ok_or_else(|| BenchError::Admin(format!("no packet id in {sent}")))?;
        mine.push((packet, amount));
        bar.set_position(sent_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
    }
    Ok(mine)
}

/// Phase 5: drain until every share is opened, or opens stop moving.
fn drain_phase(run: &Run) {
    let plan = run.plan;
    run.mark("drain", 0);
    let want = plan.group_packets * GROUP_PACKET_COUNT;
    let bar = run.live.phase("drain", want, "opens");
    let deadline = Instant::now() + Duration::from_secs(plan.drain_timeout_s);
    let (mut last, mut last_change) = (u64::MAX, Instant::now());
    while Instant::now() < deadline {
        let opens = {
            let c = run.collected.lock().expect("collected poisoned");
            c.totals.opens + c.totals.open_rejects
        };
        bar.set_position(opens.min(want));
        if opens >= want || last_change.elapsed() > DRAIN_IDLE {
            break;
        }
        if opens != last {
            (last, last_change) = (opens, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The last second's counters arrive with the next report.
    std::thread::sleep(Duration::from_millis(1_100));
    run.mark("end", 0);
}

fn reconcile_groups(admin: &Admin, packets: &[(u64, i64)], totals: &SecondRow) -> Result<Vec<Check>, BenchError> {
    if packets.is_empty() {
        return Ok(Vec::new());
    }
    let (mut claims, mut claimed_fen, mut settled, mut problems) = (0u64, 0i64, 0u64, Vec::new());
    for (packet, amount) in packets {
        let d = admin_call(admin.get(&format!("/v1/packets/{packet}")))?;
        let list = d["claims"].as_array().cloned().unwrap_or_default();
        let sum: i64 = list.iter().map(|c| c["amount_fen"].as_i64().unwrap_or(0)).sum();
        claims += list.len() as u64;
        claimed_fen += sum;
        let refunded = d["refunded_fen"].as_i64().unwrap_or(0);
        let ok = match d["status"].as_str() {
            Some("finished") => sum == *amount && list.len() as u64 == GROUP_PACKET_COUNT,
            Some("refunded") => sum + refunded == *amount,
            _ => false,
        };
        if ok {
            settled += 1;
        } else if problems.len() < 5 {
            problems.push(format!("packet {packet}: status {} claims {} sum {sum}/{amount}", d["status"], list.len()));
        }
    }
    Ok(vec![
        Check::new(
            "group opens reconcile",
            claims == totals.opens && claimed_fen == totals.amount_opened_fen && claims > 0,
            format!(
                "client saw {} opens / {} fen; the server's ledger holds {claims} claims / {claimed_fen} fen",
                totals.opens, totals.amount_opened_fen
            ),
        ),
        Check::new(
            "every group packet fully opened or refunded",
            settled == packets.len() as u64,
            format!(
                "{settled} of {} settled{}",
                packets.len(),
                if problems.is_empty() { String::new() } else { format!("; e.g. {}", problems.join("; ")) }
            ),
        ),
    ])
}

fn timeline(
    c: &Collected,
    phases: &PhaseLog,
    samples: &Mutex<Vec<ServerSample>>,
    started_unix_ms: u64,
) -> Vec<TimelineRow> {
    let server = server_seconds(&samples.lock().expect("samples poisoned"));
    let phases = phases.lock().expect("phases poisoned");
    let start_s = started_unix_ms / 1000;
    c.seconds
        .iter()
        .filter(|(s, _)| **s >= start_s)
        .map(|(s, (row, h, _))| {
            let (phase, target_rate) = phase_at(&phases, *s);
            let mut client = row.clone();
            client.latency_us = h.as_ref().map(LatencySummary::of).unwrap_or_default();
            TimelineRow { elapsed_s: s - start_s, phase, target_rate, client, server: server.get(s).cloned() }
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn summarise_phases(c: &Collected, rows: &[TimelineRow], phases: &PhaseLog, started_unix_ms: u64) -> Vec<PhaseSummary> {
    let phases = phases.lock().expect("phases poisoned");
    let mut out = Vec::new();
    for (i, mark) in phases.iter().enumerate() {
        let PhaseMark { at_ms: start_ms, name, rate, server_cpu_s, sim_cpu_s } = mark;
        if name == "end" {
            continue;
        }
        let next = phases.get(i + 1);
        let end_ms = next.map(|p| p.at_ms).unwrap_or(*start_ms);
        let cpu_s = match (server_cpu_s, next.and_then(|p| p.server_cpu_s)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let sim_cpu_s = match (sim_cpu_s, next.and_then(|p| p.sim_cpu_s)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        // Whole seconds inside the phase only: the edges are partial.
        let (first, last) = (start_ms.div_ceil(1000), (end_ms / 1000).max(start_ms.div_ceil(1000)));
        let answered: Vec<f64> = rows
            .iter()
            .filter(|r| (first..last).contains(&(started_unix_ms / 1000 + r.elapsed_s)))
            .map(|r| r.client.shakes_answered as f64)
            .collect();
        let mut latency = empty_histogram();
        let whole_phase = || c.seconds.range(start_ms / 1000..end_ms.div_ceil(1000)).map(|(_, (row, _, _))| row);
        let answered_in_phase: u64 = whole_phase().map(|r| r.shakes_answered).sum();
        let overload_in_phase: u64 = whole_phase().map(|r| r.overload).sum();
        for (_, (_, h, _)) in c.seconds.range(first..last) {
            if let Some(h) = h {
                let _ = latency.add(h);
            }
        }
        let duration_s = end_ms.saturating_sub(*start_ms) as f64 / 1000.0;
        // CPU is read at the phase's exact edges, but shakes are counted in
        // whole seconds; the shakes inside the phase are its whole seconds'
        // mean rate times its duration (counting the edge seconds whole
        // would make the CPU per shake read ~10 % low on 10 s phases).
        let mean_rate = if answered.is_empty() { 0.0 } else { answered.iter().sum::<f64>() / answered.len() as f64 };
        let shakes_for_cpu = mean_rate * duration_s;
        out.push(PhaseSummary {
            name: name.clone(),
            target_rate: *rate,
            duration_s,
            answered_per_s_median: median(answered.clone()),
            latency_ms: LatencyMs::of(&latency),
            shakes_answered: answered_in_phase,
            overload: overload_in_phase,
            server_cpu_s: cpu_s,
            server_cpu_us_per_shake: cpu_s.filter(|_| shakes_for_cpu >= 1.0).map(|cpu| cpu * 1e6 / shakes_for_cpu),
            server_cpu_cores: cpu_s.filter(|_| duration_s > 0.0).map(|cpu| cpu / duration_s),
            sim_cpu_us_per_shake: sim_cpu_s.filter(|_| shakes_for_cpu >= 1.0).map(|cpu| cpu * 1e6 / shakes_for_cpu),
            sim_cpu_cores: sim_cpu_s.filter(|_| duration_s > 0.0).map(|cpu| cpu / duration_s),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_valid_and_the_demo_fits_in_two_minutes() {
        for p in [Plan::demo(), Plan::quick(), Plan::reference()] {
            p.validate().unwrap();
        }
        assert!(Plan::demo().expected_s() <= 100, "{}", Plan::demo().expected_s());
        assert!(Plan::quick().expected_s() <= 40, "{}", Plan::quick().expected_s());
        assert!(Plan { users_per_worker: 20_000, ..Plan::demo() }.validate().is_err());
        assert_eq!(Plan { users: 31_000, ..Plan::demo() }.workers(), 3);
    }

    #[test]
    fn server_rates_are_deltas_over_the_time_between_samples() {
        let s = |at_ms, shakes, released| ServerSample {
            at_ms,
            connections: 5,
            shakes,
            shake_wins: 0,
            opens: 0,
            released: Some(released),
        };
        let per = server_seconds(&[s(10_500, 0, 0), s(11_500, 1000, 200), s(13_500, 5000, 600)]);
        assert_eq!(per[&11].shakes_per_s, 1000.0);
        assert_eq!(per[&12].shakes_per_s, 2000.0);
        assert_eq!(per[&12].released_per_s, 200.0);
    }

    #[test]
    fn broadcast_delays_are_exact_quantiles_of_the_receipts() {
        assert_eq!(receipt_delays(&BTreeMap::new(), 1_000), None);
        // 100 users: 50 at +10 ms, 49 at +20 ms, the last one at +900 ms.
        let receipts = BTreeMap::from([(1_010, 50), (1_020, 49), (1_900, 1)]);
        assert_eq!(receipt_delays(&receipts, 1_000), Some((10.0, 20.0, 900.0)));
        // One more late user moves the p99 to it.
        let receipts = BTreeMap::from([(1_010, 50), (1_020, 48), (1_900, 2)]);
        assert_eq!(receipt_delays(&receipts, 1_000), Some((10.0, 900.0, 900.0)));
        assert_eq!(receipt_delays(&BTreeMap::from([(5, 1)]), 1_000), Some((0.0, 0.0, 0.0)));
    }

    #[test]
    fn plans_check_the_heartbeat_and_count_the_idle_hold() {
        assert!(Plan { heartbeat_s: 0, ..Plan::quick() }.validate().is_err());
        assert!(Plan { heartbeat_s: 720, ..Plan::quick() }.validate().is_ok());
        let idle = Plan { idle_s: 600, ..Plan::quick() };
        assert_eq!(idle.expected_s(), Plan::quick().expected_s() + 600);
    }

    #[test]
    fn shake_steps_parse() {
        let steps = ShakeStep::parse_list("20000:8, 40000:10").unwrap();
        assert_eq!(steps, vec![ShakeStep { rate: 20_000, secs: 8 }, ShakeStep { rate: 40_000, secs: 10 }]);
        assert!(ShakeStep::parse_list("20000").is_err());
        assert!(ShakeStep::parse_list("a:1").is_err());
    }

    #[test]
    fn rate_commands_parse() {
        assert_eq!(parse_rate_command("rate 45000"), Some(45_000));
        assert_eq!(parse_rate_command("  rate   7 "), Some(7));
        assert_eq!(parse_rate_command("rate -1"), None);
        assert_eq!(parse_rate_command("rate 5 6"), None);
        assert_eq!(parse_rate_command("speed 5"), None);
    }

    #[test]
    fn phases_are_found_by_second() {
        let m = |at_ms, name: &str, rate| PhaseMark {
            at_ms,
            name: name.to_owned(),
            rate,
            server_cpu_s: None,
            sim_cpu_s: None,
        };
        let log = vec![m(1_000, "connect", 0), m(5_500, "shake-1", 300)];
        assert_eq!(phase_at(&log, 0).0, "start");
        assert_eq!(phase_at(&log, 4), ("connect".to_owned(), 0));
        assert_eq!(phase_at(&log, 5), ("shake-1".to_owned(), 300));
    }
}
