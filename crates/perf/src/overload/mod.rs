//! `hongbao perf overload`: the server past its capacity. For each kind of
//! work (plain shakes during a running campaign, keyed shakes, opens of
//! many packets raced by many users), first its capacity on this machine
//! (lean pipelined connections in a closed loop, every answer making room
//! for the next request: the useful answers per second), then a phase
//! offering `--factor` (2) times that rate, paced. During the phase:
//! the server's RSS every second (all its processes), every request and
//! answer counted by kind, and a probe pinging every 10 ms on its own
//! connection. Checks: every request sent is answered (`overload` is an
//! answer) or its connection was closed with a reason, and RSS stays
//! bounded. The probe's p99 against the 10 ms target is reported, not
//! enforced: what bounds it is a finding.
//!
//! The load shares the machine with the server. So that "twice the
//! capacity" can be offered at all, the server runs on one CPU and this
//! process (load and probe) on another (`taskset`), capacity measured under
//! the same pinning.
//!
//! Bounded: every phase has a deadline and a drain limit, the server is
//! a child killed by PID on every path (and on SIGINT/SIGTERM), loopback only.

pub(crate) mod lean;
mod phase;
mod probe;
mod report;
pub(crate) mod setup;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hongbao_client::procfs;
use tokio::runtime::Runtime;

use crate::server::{ServerChild, ServerSpec};
use lean::{Counts, Fleet, Work, WINDOW};
use probe::Latencies;

/// Seconds of closed loop before capacity is counted.
const WARMUP: Duration = Duration::from_secs(1);
/// How long answers to what is in flight may take once a phase stops sending.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// RSS is "bounded" if its peak stays within this share of the level a few
/// seconds in (`RSS_WARM_S`), plus `RSS_SLACK_BYTES`.
const RSS_MARGIN: f64 = 0.25;
const RSS_SLACK_BYTES: u64 = 32 << 20;
const RSS_WARM_S: u64 = 5;
/// The probe's target.
const PROBE_P99_TARGET_MS: f64 = 10.0;
/// User ids of each kind of connection.
const PLAIN_USERS: u64 = 1;
const KEYED_USERS: u64 = 100_001;
const OPEN_USERS: u64 = 200_001;
const SENDERS: u64 = 300_001;
const PROBE_USER: u64 = 999_999;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    ShakePlain,
    ShakeKeyed,
    Open,
}

#[derive(Debug, clap::Args)]
pub struct OverloadArgs {
    /// Seconds of each overload phase.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=600))]
    phase_s: u64,
    /// Seconds of each capacity measurement (after 1 s of warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    capacity_s: u64,
    /// Offered rate over capacity (0.1 to 10).
    #[arg(long, default_value_t = 2.0, value_parser = factor_in_range)]
    factor: f64,
    /// Connections of the shake phases (one user each).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    connections: u64,
    /// Connections (users) of the open phase, in blocks of 100 that race
    /// for the same packets: 2,000 x 64 requests in flight are more than
    /// the shards' and the writer's queues hold.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(100..=10_000))]
    open_users: u64,
    /// Which phases, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "shake-plain,shake-keyed,open")]
    what: Vec<What>,
    /// CPUs of the server (`taskset -c`).
    #[arg(long, default_value = "0")]
    server_cpus: String,
    /// CPUs of this process: the load and the probe.
    #[arg(long, default_value = "1")]
    load_cpus: String,
    /// Open rate the first open packets are sized for (two capacity steps
    /// at this rate); more are sent once the capacity is known.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    open_guess_per_s: u64,
    /// Capacity from closed loops with full windows only, without the steps
    /// at fewer requests in flight (quicker; may read low where the server
    /// sheds load).
    #[arg(long)]
    full_windows_only: bool,
    /// Do not pin (the server and the load then share every CPU).
    #[arg(long)]
    no_pin: bool,
    /// Gateway processes of the server (`serve --gateways`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    gateways: u32,
    /// Phases of 5 s, capacity over 1 s with full windows only, 32
    /// connections, 100 open users.
    #[arg(long)]
    quick: bool,
}

/// The plan, after `--quick`.
struct Plan {
    phase: Duration,
    capacity: Duration,
    factor: f64,
    connections: u64,
    open_users: u64,
    open_guess_per_s: u64,
    /// Capacity from several levels of concurrency, not only full windows.
    sweep: bool,
}

/// The capacity step that answered the most.
struct Capacity {
    per_s: f64,
    counts: Counts,
    /// CPU cores the server and the load used.
    cores: (f64, f64),
    window: u32,
    in_flight: u64,
}

/// One phase's readings.
struct Phase {
    what: &'static str,
    capacity: Capacity,
    offered_per_s: f64,
    during: Counts,
    cores: (f64, f64),
    total: Counts,
    left_in_flight: u64,
    ended: (std::collections::BTreeMap<String, u64>, u64),
    odd: std::collections::BTreeMap<String, u64>,
    /// (seconds into the phase, summed RSS bytes), one a second.
    rss: Vec<(f64, u64)>,
    probe: Latencies,
    /// Threads of the server and of this process during the phase.
    server_threads: Waits,
    load_threads: Waits,
    /// Group commits and the operations in them during the phase.
    commits: Option<(u64, u64)>,
}

pub fn run(args: OverloadArgs) -> anyhow::Result<()> {
    let plan = if args.quick {
        Plan {
            phase: Duration::from_secs(5),
            capacity: Duration::from_secs(1),
            factor: args.factor,
            connections: 32,
            open_users: 100,
            open_guess_per_s: args.open_guess_per_s,
            sweep: false,
        }
    } else {
        Plan {
            phase: Duration::from_secs(args.phase_s),
            capacity: Duration::from_secs(args.capacity_s),
            factor: args.factor,
            connections: args.connections,
            open_users: args.open_users - args.open_users % setup::BLOCK,
            open_guess_per_s: args.open_guess_per_s,
            sweep: !args.full_windows_only,
        }
    };
    let pinned = pin(&args)?;
    // One worker: the load has one CPU.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().context("runtime")?;
    crate::server::kill_servers_on_signal(&rt);
    let dir = tempfile::Builder::new().prefix("hongbao-overload-").tempdir().context("temporary directory")?;
    let mut spec = ServerSpec::new(dir.path().join("data"), dir.path().join("server.log"));
    spec.gateways = args.gateways;
    spec.cpus = pinned.then(|| args.server_cpus.clone());
    // The open phase's setup sends many packets per sender.
    spec.args = vec!["--sends-per-s".into(), "0".into()];
    let mut server = ServerChild::start_spec(&spec)?;
    header(&server, &plan, pinned, args.gateways);
    let mut phases = Vec::new();
    for &what in &args.what {
        let phase = match measure(&rt, &server, &plan, what) {
            Ok(p) => p,
            Err(e) => bail!("{e:#}\nthe server's log ends:\n{}", crate::server::tail(&server.log(), 20)),
        };
        report::report(&phase, plan.factor, plan.phase.as_secs_f64());
        phases.push(phase);
    }
    server.stop()?;
    report::verdict(&phases)
}

/// Pins this process to `--load-cpus` (every thread it has, and so every
/// one it starts); false when not pinning (asked, or one CPU only).
fn pin(args: &OverloadArgs) -> anyhow::Result<bool> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.no_pin || cpus < 2 {
        return Ok(false);
    }
    let me = std::process::id().to_string();
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &args.load_cpus, &me])
        .stdout(std::process::Stdio::null())
        .status()
        .context("taskset (util-linux) pins the load to its CPU")?;
    anyhow::ensure!(status.success(), "taskset -a -p -c {} {me} failed", args.load_cpus);
    Ok(true)
}

fn header(server: &ServerChild, plan: &Plan, pinned: bool, gateways: u32) {
    let cpus = |pid| procfs::cpus_allowed(pid).unwrap_or_else(|| "?".into());
    let pinning = if pinned {
        format!(
            "server pinned to CPU {} (taskset), load generator and probe pinned to CPU {}; capacity measured under the \
             same pinning",
            cpus(server.pids()[0]),
            cpus(std::process::id())
        )
    } else {
        "not pinned: the server and the load share every CPU".to_owned()
    };
    println!(
        "overload: serve --dev on loopback ({gateways} gateway process(es), --sends-per-s 0 for the open setup); \
         {pinning}; shakes during a campaign releasing {} packets/s; lean pipelined connections of up to {WINDOW} \
         requests in flight each; capacity = the most useful answers/s of closed loops at a few levels of \
         concurrency (every window full, then ~512, 4,096, 16,384 and 65,536 in flight in all) over {:.0} s each \
         after {:.0} s of warm-up; then {:.1}x that rate offered for {:.0} s, paced every 5 ms; a probe pings every \
         {} ms on its own connection",
        setup::campaign_rate(),
        plan.capacity.as_secs_f64(),
        WARMUP.as_secs_f64(),
        plan.factor,
        plan.phase.as_secs_f64(),
        probe::EVERY.as_millis()
    );
}

/// Capacity, then the overload phase, of one kind of work.
fn measure(rt: &Runtime, server: &ServerChild, plan: &Plan, what: What) -> anyhow::Result<Phase> {
    let admin = server.admin();
    let (work, users, queues) = match what {
        What::ShakePlain | What::ShakeKeyed => {
            let campaign = shake_campaign(&admin)?;
            let (work, first) = if what == What::ShakePlain {
                (Work::PlainShake { campaign }, PLAIN_USERS)
            } else {
                (Work::KeyedShake { campaign }, KEYED_USERS)
            };
            (work, (first..first + plan.connections).collect::<Vec<u64>>(), Vec::new())
        }
        What::Open => {
            let users: Vec<u64> = (OPEN_USERS..OPEN_USERS + plan.open_users).collect();
            // Enough for the capacity steps at the guessed rate, with half
            // again to spare; more once the capacity is known.
            let steps = phase::windows(plan.open_users as usize, plan.sweep).len() as u64;
            let shares = steps * plan.open_guess_per_s * (plan.capacity + WARMUP).as_secs() * 3 / 2;
            let per_block = shares.div_ceil(plan.open_users);
            let queues = open_setup(rt, server, &users, per_block, SENDERS)?;
            (Work::Open, users, queues)
        }
    };
    let tally = Arc::new(lean::Tally::default());
    let fleet = rt.block_on(Fleet::open(server.tcp, work, &users, queues, tally.clone()))?;
    let capacity = phase::capacity(rt, server, plan, &fleet);
    let (capacity, fleet, ended) = match capacity {
        Ok(c) if work == Work::Open => {
            // Idle connections flooded with the new packets' notices would
            // be cut off as slow consumers: they leave during the setup and
            // come back with what is left of their queues and the new ones.
            let mut queues = fleet.take_queues();
            let ended = fleet.ended();
            fleet.close();
            let more = phase::more_packets(rt, server, plan, &users, &queues, c.per_s)?;
            for (q, more) in queues.iter_mut().zip(more) {
                q.extend(more);
            }
            (c, rt.block_on(Fleet::open(server.tcp, work, &users, queues, tally))?, Some(ended))
        }
        Ok(c) => (c, fleet, None),
        Err(e) => {
            fleet.close();
            return Err(e);
        }
    };
    let result = phase::overload(rt, server, plan, &fleet, capacity, ended);
    fleet.close();
    result
}

/// The campaign of the shake phases: created once, running throughout.
fn shake_campaign(admin: &hongbao_client::Admin) -> anyhow::Result<u64> {
    let list = admin.get("/v1/campaigns").map_err(anyhow::Error::msg)?.ok().map_err(anyhow::Error::msg)?;
    match list.as_array().and_then(|l| l.iter().find(|c| c["status"] == "running")) {
        Some(c) => c["id"].as_u64().context("campaign id"),
        None => setup::campaign(admin),
    }
}

/// Sends the packets of the open phase; returns each user's queue.
fn open_setup(
    rt: &Runtime,
    server: &ServerChild,
    users: &[u64],
    per_block: u64,
    first_sender: u64,
) -> anyhow::Result<Vec<VecDeque<u64>>> {
    let started = Instant::now();
    let blocks = setup::blocks(users);
    let (packets, _) = rt.block_on(setup::packets(server.tcp, &server.admin(), &blocks, per_block, first_sender))?;
    eprintln!(
        "  open setup: {} packets of {} shares to {} blocks of {} users in {:.1} s",
        packets.iter().map(Vec::len).sum::<usize>(),
        setup::BLOCK,
        blocks.len(),
        setup::BLOCK,
        started.elapsed().as_secs_f64()
    );
    Ok(setup::queues(&blocks, &packets))
}

/// Scheduler statistics of every thread of `pids`, by thread id.
fn sched(pids: &[u32]) -> HashMap<u32, (String, procfs::SchedStat)> {
    pids.iter().flat_map(|&p| procfs::thread_schedstats(p)).map(|(tid, name, s)| (tid, (name, s))).collect()
}

/// Per thread name (threads alive at both readings): how many, and the
/// milliseconds per second of `over` they ran and waited runnable for a CPU.
#[derive(Clone, Debug)]
struct Waits(Vec<(String, usize, f64, f64)>);

impl Waits {
    fn between(
        a: &HashMap<u32, (String, procfs::SchedStat)>,
        b: &HashMap<u32, (String, procfs::SchedStat)>,
        over: Duration,
    ) -> Waits {
        let mut by: BTreeMap<String, (usize, u64, u64)> = BTreeMap::new();
        for (tid, (name, after)) in b {
            if let Some((_, before)) = a.get(tid) {
                let d = after.since(before);
                let e = by.entry(name.clone()).or_default();
                *e = (e.0 + 1, e.1 + d.run_ns, e.2 + d.wait_ns);
            }
        }
        let ms_per_s = |ns: u64| ns as f64 / 1e6 / over.as_secs_f64();
        Waits(by.into_iter().map(|(name, (n, run, wait))| (name, n, ms_per_s(run), ms_per_s(wait))).collect())
    }

    fn line(&self) -> String {
        let parts: Vec<String> =
            self.0.iter().map(|(name, n, run, wait)| format!("{name} x{n} ran {run:.0}, waited {wait:.0}")).collect();
        parts.join("; ")
    }
}

/// CPU seconds of the server's processes and of this one.
fn cpu(server: &ServerChild) -> (f64, f64) {
    let s = server.pids().into_iter().filter_map(procfs::cpu_s).sum();
    (s, procfs::cpu_s(std::process::id()).unwrap_or(0.0))
}

fn cores(a: (f64, f64), b: (f64, f64), over: Duration) -> (f64, f64) {
    ((b.0 - a.0) / over.as_secs_f64(), (b.1 - a.1) / over.as_secs_f64())
}

/// `--factor`: bounded, so the offered rate (and the counts derived from
/// it) stay finite and the run stays a run.
fn factor_in_range(text: &str) -> Result<f64, String> {
    let factor: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.1..=10.0).contains(&factor) {
        Ok(factor)
    } else {
        Err(format!("{factor} is not within 0.1 to 10"))
    }
}
