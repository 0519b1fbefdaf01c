//! `perf cluster`: a cluster on this machine — two `hongbao set` processes
//! (one PostgreSQL database each), three `hongbao gateway` processes, NATS
//! and the cluster admin — against a single-node `serve` on PostgreSQL,
//! measured back to back with the same clients: shakes and opens answered
//! per second through the gateways, the hongbao processes' CPU per
//! operation, and the lag of the credits that cross SETs. The cluster audit
//! must pass at the end.
//!
//! Shakes: a campaign runs on each SET (one per SET, funded there, until a
//! campaign is split over SETs by itself); clients shake "any campaign" in
//! a closed loop, spread over the gateways. Opens: packets of `BLOCK`
//! shares, each sent to a block of users homed on both SETs, so about half
//! the opens credit a user of the other SET; each client opens its queue in
//! a closed loop.
//!
//! Bounded: every phase has a deadline; every process is a child killed by
//! PID on every path; loopback only.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use hongbao_client::{procfs, Admin};
use hongbao_harness::NatsServer;
use hongbao_pg_harness::PgServer;
use serde_json::json;
use tokio::runtime::Runtime;

use crate::overload::lean::{Fleet, Tally, Work};
use crate::overload::setup::{self, post};
use crate::server::{ServerChild, ServerSpec};

const READY: Duration = Duration::from_secs(60);
const WARMUP: Duration = Duration::from_secs(1);
const SETS: u64 = 2;
const GATEWAYS: usize = 3;
/// Requests in flight per client connection in the closed loops.
const WINDOW: u32 = 8;
/// Campaign release rate in all (split evenly over the SETs' campaigns).
const CAMPAIGN_RATE_PER_S: u64 = 1_000;
const FUNDER: u64 = 900_000;
const SHAKERS_FIRST: u64 = 1;
const OPENERS_FIRST: u64 = 200_000;
const SENDERS_FIRST: u64 = 300_000;
/// Opens per second the setup sends packets for (with room to spare).
const OPENS_GUESS_PER_S: u64 = 20_000;

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Seconds each phase is measured (after a second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Shaking clients.
    #[arg(long, default_value_t = 300)]
    shakers: u64,
    /// Opening clients (a multiple of 100: blocks of one packet's shares).
    #[arg(long, default_value_t = 400)]
    openers: u64,
    /// 3 s phases, fewer clients.
    #[arg(long)]
    quick: bool,
}

/// One side's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Measured {
    shakes_per_s: f64,
    shake_cpu_us: f64,
    opens_per_s: f64,
    open_cpu_us: f64,
    /// Wall-clock ms when the open phase began.
    opens_from_ms: u64,
    /// The open phase's paced part (half the closed loop's rate).
    paced: Option<Paced>,
}

/// What the phases drive: client addresses, the admin API to set up
/// through, every SET's own admin API, and the processes whose CPU counts.
struct Target {
    gateways: Vec<SocketAddr>,
    admin: Admin,
    set_admins: Vec<Admin>,
    pids: Vec<u32>,
}

/// The cluster's processes, killed by PID when dropped.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
            crate::server::forget_pid(child.id());
        }
    }
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let (seconds, shakers, openers) =
        if args.quick { (3, 120, 200) } else { (args.seconds.max(1), args.shakers, args.openers) };
    ensure!(openers >= setup::BLOCK && openers % setup::BLOCK == 0, "--openers must be a multiple of {}", setup::BLOCK);
    let window = Duration::from_secs(seconds);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    crate::server::kill_servers_on_signal(&rt);
    let exe = std::env::current_exe().context("own executable")?;
    let pg = PgServer::start().context("PostgreSQL (scripts/test.sh installs it)")?;
    let nats = NatsServer::start().context("nats-server (scripts/test.sh installs it)")?;
    let dir = tempfile::Builder::new().prefix("hongbao-perf-cluster-").tempdir()?;
    for db in ["set0", "set1", "single"] {
        pg.create_database(db)?;
    }
    println!(
        "perf cluster: {SETS} SETs (hongbao set, 2 shards each, one PostgreSQL database each), {GATEWAYS} gateways, \
         NATS JetStream, the cluster admin; then serve --dev on PostgreSQL (4 shards); each measured {seconds} s \
         after {} s of warm-up: {shakers} clients shaking any campaign ({CAMPAIGN_RATE_PER_S} packets/s released in \
         all), {openers} clients opening packets of {} shares sent to blocks of users homed on both SETs; closed \
         loops of {WINDOW} requests in flight per client; CPU = the hongbao processes' (not PostgreSQL's or NATS's)",
        WARMUP.as_secs(),
        setup::BLOCK
    );

    // The cluster.
    let file = write_cluster_file(dir.path(), &pg, &nats)?;
    let keys = Command::new(&exe).args(["keys", "--cluster"]).arg(&file).output()?;
    ensure!(keys.status.success(), "hongbao keys: {}", String::from_utf8_lossy(&keys.stderr));
    let mut processes = Processes(Vec::new());
    let mut set_admins = Vec::new();
    for set in 0..SETS {
        let mut cmd = Command::new(&exe);
        cmd.args(["set", "--cluster"])
            .arg(&file)
            .args(["--set", &set.to_string(), "--config"])
            .arg(dir.path().join("serve.toml"));
        let ready = spawn(&mut processes, &format!("set{set}"), cmd, dir.path())?;
        set_admins.push(Admin::new(addr(&ready, "admin")?, None));
    }
    let mut gateways = Vec::new();
    for g in 0..GATEWAYS {
        let mut cmd = Command::new(&exe);
        cmd.args(["gateway", "--cluster"]).arg(&file).args(["--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0"]);
        let ready = spawn(&mut processes, &format!("gateway{g}"), cmd, dir.path())?;
        ensure!(ready["sets_linked"] == json!(SETS), "gateway {g} linked {} SETs", ready["sets_linked"]);
        gateways.push(addr(&ready, "tcp")?);
    }
    let mut cmd = Command::new(&exe);
    cmd.args(["cluster-admin", "--cluster"]).arg(&file);
    let ready = spawn(&mut processes, "cluster-admin", cmd, dir.path())?;
    let cluster_admin = Admin::new(addr(&ready, "admin")?, None);
    let pids: Vec<u32> = processes.0.iter().filter(|(n, _)| n != "cluster-admin").map(|(_, c)| c.id()).collect();
    let target = Target { gateways, admin: cluster_admin, set_admins, pids };
    let cluster = measure(&rt, &target, shakers, openers, window, Some(&pg))?;
    drained(&pg)?;
    let paced = cluster.paced.context("the open phase's paced part")?;
    let saturated = credit_lags_ms(&pg, cluster.opens_from_ms, paced.from_ms)?;
    let lags = credit_lags_ms(&pg, paced.from_ms, u64::MAX)?;
    let nats_cpu = nats.pid().and_then(procfs::cpu_s).unwrap_or(0.0);
    let audit = Command::new(&exe).args(["audit", "--cluster"]).arg(&file).output()?;
    let audit_passed = audit.status.success();
    drop(processes);

    // The single node, on the same PostgreSQL server.
    let mut spec = ServerSpec::new(dir.path().join("single"), dir.path().join("single.log"));
    spec.args = ["--store", &pg.url_for("single"), "--shards", "4", "--sends-per-s", "0"].map(str::to_owned).to_vec();
    let single = ServerChild::start_spec(&spec)?;
    let target = Target {
        gateways: vec![single.tcp],
        admin: single.admin(),
        set_admins: vec![single.admin()],
        pids: single.pids(),
    };
    let baseline = measure(&rt, &target, shakers, openers, window, None)?;
    drop(single);

    let percentile = |p: f64| lags.get(((lags.len() as f64 * p) as usize).min(lags.len().saturating_sub(1))).copied();
    let (p50, p99) = (percentile(0.5).unwrap_or(0), percentile(0.99).unwrap_or(0));
    let sat = |p: f64| {
        saturated
            .get(((saturated.len() as f64 * p) as usize).min(saturated.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "  credit lag, from the commit on the packet's SET to the one on the opener's: paced at {:.0} opens/s (half \
         the closed loop's; {} opens done in {:.1} s), {} credits: p50 {p50} ms, p99 {p99} ms, max {} ms; in the \
         closed loop (every CPU busy), {} credits: p50 {} ms, p99 {} ms; NATS used {nats_cpu:.1} CPU s in all; \
         cluster audit: {}",
        paced.rate_per_s,
        paced.done,
        seconds as f64 / 2.0,
        lags.len(),
        lags.last().copied().unwrap_or(0),
        saturated.len(),
        sat(0.5),
        sat(0.99),
        if audit_passed { "PASS" } else { "FAIL" }
    );
    crate::figure("cluster-shakes-per-s", cluster.shakes_per_s, "shakes/s", Some(baseline.shakes_per_s));
    crate::figure("cluster-server-cpu-per-shake", cluster.shake_cpu_us, "us", Some(baseline.shake_cpu_us));
    crate::figure("cluster-opens-per-s", cluster.opens_per_s, "opens/s", Some(baseline.opens_per_s));
    crate::figure("cluster-server-cpu-per-open", cluster.open_cpu_us, "us", Some(baseline.open_cpu_us));
    crate::figure("cluster-credit-lag-p50", p50 as f64, "ms", None);
    crate::figure("cluster-credit-lag-p99", p99 as f64, "ms", None);
    ensure!(audit_passed, "the cluster audit failed:\n{}", String::from_utf8_lossy(&audit.stdout));
    Ok(())
}

fn write_cluster_file(dir: &Path, pg: &PgServer, nats: &NatsServer) -> anyhow::Result<std::path::PathBuf> {
    let ports = hongbao_harness::free_ports::<5>()?;
    let at = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let mut text = format!("secrets = \"secrets\"\ndev = true\nnats = \"{}\"\nadmin = \"{}\"\n", nats.url(), at(4));
    for set in 0..SETS as usize {
        text += &format!(
            "[[set]]\nlink = \"{}\"\nadmin = \"{}\"\nstore = \"{}\"\nshards = 2\n",
            at(2 * set),
            at(2 * set + 1),
            pg.url_for(&format!("set{set}"))
        );
    }
    let file = dir.join("cluster.toml");
    std::fs::write(&file, text)?;
    // The open setup sends faster than a person may.
    std::fs::write(dir.join("serve.toml"), "sends_per_s = 0\n")?;
    Ok(file)
}

/// Starts `cmd` (stderr to `<name>.log`), registered to be killed on a signal.
fn spawn(processes: &mut Processes, name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<serde_json::Value> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    cmd.env_remove("HONGBAO_STORE").env("RUST_LOG", "warn").stderr(Stdio::from(log));
    let (child, ready) = hongbao_client::spawn_ready(&mut cmd, READY).map_err(|e| {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        anyhow::anyhow!("{name}: {e}; its log:\n{}", crate::server::tail(&log, 30))
    })?;
    crate::server::register_pid(child.id());
    processes.0.push((name.to_owned(), child));
    Ok(ready)
}

fn addr(ready: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
    ready[key]
        .as_str()
        .with_context(|| format!("no {key} in {ready}"))?
        .parse()
        .with_context(|| format!("{key} in {ready}"))
}

fn cpu_s(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| procfs::cpu_s(*p)).sum()
}

/// The shake phase, then the open phase. With `cluster` (the SETs'
/// databases), the open phase starts once the setup's notices to other SETs
/// have crossed, so the credits of the opens do not queue behind them.
fn measure(
    rt: &Runtime,
    target: &Target,
    shakers: u64,
    openers: u64,
    window: Duration,
    cluster: Option<&PgServer>,
) -> anyhow::Result<Measured> {
    let mut m = Measured::default();
    // A campaign on each SET (funded by a user homed there), all "any campaign" shakes find one.
    let sets = target.set_admins.len() as u64;
    for (set, admin) in target.set_admins.iter().enumerate() {
        let funder = FUNDER + set as u64;
        post(admin, &format!("/v1/accounts/{funder}/deposit"), json!({"amount_fen": 100_000_000, "key": "perf-fund"}))?;
        let created = post(
            admin,
            "/v1/campaigns",
            json!({"funder": funder, "total_fen": 100_000_000, "rule": {"range": {"min_fen": 1, "max_fen": 2}},
                   "rate_per_s": CAMPAIGN_RATE_PER_S / sets, "key": "perf-campaign"}),
        )?;
        let id = created["id"].as_u64().with_context(|| format!("campaign {created}"))?;
        post(admin, &format!("/v1/campaigns/{id}/start"), json!({}))?;
    }
    let shaking: Vec<u64> = (SHAKERS_FIRST..SHAKERS_FIRST + shakers).collect();
    let (per_s, cpu_us, _) =
        closed_loop(rt, target, Work::PlainShake { campaign: 0 }, &shaking, Vec::new(), window, None)?;
    (m.shakes_per_s, m.shake_cpu_us) = (per_s, cpu_us);

    // Packets for the openers, sent through the first gateway.
    let opening: Vec<u64> = (OPENERS_FIRST..OPENERS_FIRST + openers).collect();
    let blocks = setup::blocks(&opening);
    // Enough for the closed loop and the paced half-rate part after it
    // (half as long).
    let per_block = (OPENS_GUESS_PER_S * (window + window / 2 + WARMUP).as_secs()).div_ceil(openers);
    let started = Instant::now();
    let (packets, _) =
        rt.block_on(setup::packets(target.gateways[0], &target.admin, &blocks, per_block, SENDERS_FIRST))?;
    eprintln!(
        "  open setup: {} packets of {} shares in {:.1} s",
        packets.iter().map(Vec::len).sum::<usize>(),
        setup::BLOCK,
        started.elapsed().as_secs_f64()
    );
    let queues = setup::queues(&blocks, &packets);
    if let Some(pg) = cluster {
        drained(pg)?;
    }
    m.opens_from_ms = unix_ms();
    let settle = |rate_per_s: f64| {
        if let Some(pg) = cluster {
            drained(pg)?;
        }
        Ok(Paced { rate_per_s, from_ms: unix_ms(), done: 0 })
    };
    let (per_s, cpu_us, paced) = closed_loop(rt, target, Work::Open, &opening, queues, window, Some(&settle))?;
    (m.opens_per_s, m.open_cpu_us, m.paced) = (per_s, cpu_us, paced);
    Ok(m)
}

/// `users` spread over the target's gateways (user i on gateway i mod n),
/// each keeping `WINDOW` requests in flight; after the warm-up, the useful
/// answers per second over `window` (or until the open queues ran dry) and
/// the server CPU per answer.
fn closed_loop(
    rt: &Runtime,
    target: &Target,
    work: Work,
    users: &[u64],
    queues: Vec<VecDeque<u64>>,
    window: Duration,
    then: Option<&dyn Fn(f64) -> anyhow::Result<Paced>>,
) -> anyhow::Result<(f64, f64, Option<Paced>)> {
    let n = target.gateways.len();
    let tally = Arc::new(Tally::default());
    let mut split: Vec<(Vec<u64>, Vec<VecDeque<u64>>)> = vec![(Vec::new(), Vec::new()); n];
    let mut queues = queues.into_iter();
    for (i, &user) in users.iter().enumerate() {
        split[i % n].0.push(user);
        split[i % n].1.push(queues.next().unwrap_or_default());
    }
    let mut fleets = Vec::with_capacity(n);
    for (g, (users, queues)) in split.into_iter().enumerate() {
        fleets.push(rt.block_on(Fleet::open(target.gateways[g], work, &users, queues, tally.clone()))?);
    }
    for fleet in &fleets {
        fleet.closed_loop(WINDOW);
    }
    let queued: usize = fleets.iter().map(Fleet::queued).sum();
    std::thread::sleep(WARMUP);
    let (before, cpu_before, started) = (tally.counts(), cpu_s(&target.pids), Instant::now());
    let deadline = started + window;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        // Opens: a third of the packets is kept for the paced part.
        let left: usize = fleets.iter().map(Fleet::queued).sum();
        if work == Work::Open && left <= queued / 3 {
            break;
        }
    }
    let (after, cpu_after, elapsed) = (tally.counts(), cpu_s(&target.pids), started.elapsed());
    let done = after.since(&before);
    let useful = done.useful();
    ensure!(useful > 0, "{}: nothing answered ({done:?}, {:?})", work.name(), tally.odd());
    if done.other > 0 {
        eprintln!("  {}: unexpected answers {:?}", work.name(), tally.odd());
    }
    let per_s = useful as f64 / elapsed.as_secs_f64();
    // Then, paced at half the rate just measured, for the lag at a load
    // the machine carries: `then` settles what the closed loop left and
    // says when the paced part began.
    let paced = match then {
        Some(settle) => {
            for fleet in &fleets {
                fleet.idle();
                rt.block_on(fleet.drain(Duration::from_secs(30)));
            }
            let mut paced = settle(per_s / 2.0)?;
            let until = Instant::now() + window / 2;
            let each = paced.rate_per_s / fleets.len() as f64;
            let before = tally.counts();
            rt.block_on(futures_util::future::join_all(fleets.iter().map(|f| f.paced(each, until))));
            paced.done = tally.counts().since(&before).useful();
            Some(paced)
        }
        None => None,
    };
    for fleet in fleets {
        fleet.close();
    }
    Ok((per_s, (cpu_after - cpu_before) * 1e6 / useful as f64, paced))
}

/// The paced part of a phase: its rate, when it began, what it got done.
#[derive(Clone, Copy, Debug)]
struct Paced {
    rate_per_s: f64,
    from_ms: u64,
    done: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Waits (at most a minute) until nothing is left in any SET's outbox and
/// the inboxes stopped growing: every cross-SET message has crossed.
fn drained(pg: &PgServer) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        let mut now = String::new();
        let mut waiting = 0;
        for set in 0..SETS {
            let db = format!("set{set}");
            waiting += pg.psql_in(&db, "SELECT count(*) FROM cross_out WHERE NOT published")?.trim().parse::<u64>()?;
            now += &pg.psql_in(&db, "SELECT count(*) FROM cross_in")?;
        }
        if waiting == 0 && now == last {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "cross-SET messages still moving after a minute ({waiting} unpublished)");
        last = now;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The lag of every cross-SET credit written from `from_ms` to `until_ms`, from its
/// commit on the packet's SET to its commit on the opener's (both
/// wall-clock ms, as each SET's inbox row keeps them), sorted.
fn credit_lags_ms(pg: &PgServer, from_ms: u64, until_ms: u64) -> anyhow::Result<Vec<u64>> {
    let mut lags = Vec::new();
    let until_ms = until_ms.min(i64::MAX as u64);
    for set in 0..SETS {
        let sql = format!(
            "SELECT applied_ms - created_ms FROM cross_in WHERE kind = 'credit' AND created_ms >= {from_ms} \
             AND created_ms < {until_ms}"
        );
        let rows = pg.psql_in(&format!("set{set}"), &sql)?;
        for line in rows.lines().filter(|l| !l.trim().is_empty()) {
            lags.push(line.trim().parse::<i64>().with_context(|| format!("lag {line:?}"))?.max(0) as u64);
        }
    }
    lags.sort_unstable();
    Ok(lags)
}
