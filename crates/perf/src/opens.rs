//! `hongbao perf opens`: durable opens per second, group commit against a
//! transaction-per-open baseline on the same store, in one run: on the
//! embedded store (SQLite), on a PostgreSQL server this run starts for
//! itself (`--store postgres`), or both (`--store both`, what `bench/run.sh
//! opens-pg` runs).
//!
//! In-process, no sockets: a fresh `Engine` on a temporary data directory
//! (or a fresh database) per mode, packets of 100 shares sent to user lists, then `concurrency`
//! simulated users (one task each, one open in flight each, like a client
//! waiting for its reply) open distinct (packet, user) pairs through
//! `Engine::call`. Every `Opened` reply is sent by the writer's completion,
//! i.e. after the transaction holding the open committed durably (SQLite
//! `synchronous=FULL`; PostgreSQL `fsync=on`, `synchronous_commit=on`). Only
//! the open phase is timed.
//!
//! After each mode the run checks every packet's committed state against the
//! replies (no share paid twice, no user twice, claims ≤ count, shares +
//! remainder = amount, every acknowledged open committed with the amount the
//! client was told), shuts the engine down and runs the full audit. Any
//! failure is an error, not a figure.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hongbao_core::limits::PacketRules;
use hongbao_core::split::SplitKind;
use hongbao_proto::{ErrorCode, Reply, Request, Target};
use hongbao_shard::{CommitMode, Engine, EngineConfig, StoreLocation};

use hongbao_client::procfs;

use crate::figure;

/// Shares per packet: the largest count a packet may have.
const SHARES: u32 = 100;
/// Money per packet, fen.
const PACKET_FEN: i64 = 10_000;
/// Senders the packets are spread over (their ids spread them over shards).
const SENDERS_MAX: usize = 64;
/// First sender id; openers are users 1..=concurrency.
const SENDER_BASE: u64 = 10_000_000;

#[derive(Debug, clap::Args)]
pub struct OpensArgs {
    /// Successful opens to measure with group commit (rounded up to whole
    /// packets of 100 shares).
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    opens: u64,
    /// Opens for the transaction-per-open baseline; it also stops issuing
    /// opens after --baseline-secs.
    #[arg(long, default_value_t = 5_000)]
    baseline_opens: u64,
    /// Time limit of the baseline's open phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    baseline_secs: f64,
    /// Simulated users opening at once (each has one open in flight).
    #[arg(long, default_value_t = 2_000)]
    concurrency: usize,
    /// Eligible users per packet: 100 gives every share exactly one opener;
    /// more makes them race and the late ones get `finished` (at most 500).
    #[arg(long, default_value_t = 100)]
    openers_per_packet: u32,
    /// Engine shards.
    #[arg(long, default_value_t = 4)]
    shards: u16,
    /// Small sizes (50,000 opens, a baseline of 2,000 opens or 3 s, 1,000
    /// users): a few seconds.
    #[arg(long)]
    quick: bool,
    /// Where the temporary data directories go (removed afterwards). Must be
    /// on a real disk: fsync is what is measured.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The store measured: the embedded SQLite, a PostgreSQL server started
    /// for the run (Debian's `postgresql`; in the system's temporary
    /// directory), or both, one after the other.
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreChoice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreChoice {
    Sqlite,
    Postgres,
    Both,
}

/// Where one mode's engine keeps its money.
enum Place<'a> {
    /// A fresh data directory under this one.
    Sqlite(&'a Path),
    /// A fresh database on this server.
    Postgres(&'a hongbao_pg_harness::PgServer),
}

/// One mode's measurement.
struct Measured {
    opened: u64,
    finished_replies: u64,
    /// Seconds spent funding senders and sending packets (not timed).
    setup_secs: f64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    commits: u64,
    committed_ops: u64,
    /// Commit latency percentiles, ms (apply, write and durable commit).
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    /// CPU seconds of the database server's processes during the open
    /// phase (PostgreSQL only).
    server_cpu_s: Option<f64>,
    /// CPU seconds of this process (engine and simulated users) during it.
    own_cpu_s: f64,
}

impl Measured {
    fn per_s(&self) -> f64 {
        self.opened as f64 / self.secs
    }
}

pub fn run(mut args: OpensArgs) -> anyhow::Result<()> {
    if args.quick {
        args.opens = args.opens.min(50_000);
        args.baseline_opens = args.baseline_opens.min(2_000);
        args.baseline_secs = args.baseline_secs.min(3.0);
        args.concurrency = args.concurrency.min(1_000);
    }
    ensure!(args.opens >= 1 && args.baseline_opens >= 1, "--opens and --baseline-opens must be at least 1");
    ensure!(args.baseline_secs > 0.0, "--baseline-secs must be positive");
    ensure!(
        (SHARES..=hongbao_core::limits::PACKET_RECIPIENTS_MAX as u32).contains(&args.openers_per_packet),
        "--openers-per-packet must be between {SHARES} and {}",
        hongbao_core::limits::PACKET_RECIPIENTS_MAX
    );
    ensure!(
        args.concurrency >= args.openers_per_packet as usize,
        "--concurrency must be at least --openers-per-packet ({}) so a packet's openers are distinct users",
        args.openers_per_packet
    );
    let base = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;

    println!(
        "ran: per store, up to {} opens (transaction per open, baseline, ≤ {} s) and then {} opens (group commit) by \
         {} concurrent users in-process ({} shards) on {}, each reply after its durable commit; packets of {SHARES} \
         shares with {} eligible users each, every (packet, user) pair opened once; only the open phase is timed; \
         each run is checked against committed state and audited",
        args.baseline_opens,
        args.baseline_secs,
        args.opens,
        args.concurrency,
        args.shards,
        match args.store {
            StoreChoice::Sqlite =>
                format!("the embedded store (SQLite WAL, synchronous=FULL, data in {})", base.display()),
            StoreChoice::Postgres => "PostgreSQL (fsync=on, synchronous_commit=on)".to_owned(),
            StoreChoice::Both => format!(
                "the embedded store (SQLite WAL, synchronous=FULL, data in {}), then PostgreSQL (fsync=on, \
                 synchronous_commit=on)",
                base.display()
            ),
        },
        args.openers_per_packet,
    );
    if let Ok(fsync) = fsync_p50_ms(&base) {
        println!("disk: one 4 KiB write + fdatasync in {} takes {fsync:.2} ms (median of 50)", base.display());
    }

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if args.store != StoreChoice::Postgres {
        measure_both_modes(&rt, &args, &Place::Sqlite(&base), "")?;
    }
    if args.store != StoreChoice::Sqlite {
        // pg_stat_statements says afterwards where the server's time went.
        let server = hongbao_pg_harness::PgOptions::new()
            .setting("shared_preload_libraries", "pg_stat_statements")
            .setting("pg_stat_statements.track", "all")
            .start()
            .context("starting PostgreSQL for the run")?;
        println!(
            "postgresql: a server of its own on 127.0.0.1:{} (fsync=on, synchronous_commit=on, data in {}), a fresh \
             database per mode",
            server.port(),
            server.data_dir().display()
        );
        measure_both_modes(&rt, &args, &Place::Postgres(&server), "_pg")?;
    }
    Ok(())
}

/// The statements that took most of PostgreSQL's time in `db` since its
/// statistics were last reset, one line each.
fn where_postgres_time_went(server: &hongbao_pg_harness::PgServer, db: &str) -> anyhow::Result<String> {
    let rows = server.psql_in(
        db,
        "SELECT calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 3), rows,
                regexp_replace(left(query, 70), '\\s+', ' ', 'g')
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY total_exec_time DESC LIMIT 8",
    )?;
    let mut text = String::from("  calls | total ms | mean ms | rows | statement\n");
    for line in rows.lines().filter(|l| !l.trim().is_empty()) {
        text.push_str(&format!("  {}\n", line.replace('|', " | ")));
    }
    Ok(text)
}

/// The baseline, then group commit, on one kind of store; prints the
/// figures with `suffix` on their names.
fn measure_both_modes(
    rt: &tokio::runtime::Runtime,
    args: &OpensArgs,
    place: &Place<'_>,
    suffix: &str,
) -> anyhow::Result<()> {
    let per_op = rt.block_on(measure(
        args,
        place,
        Mode::PerOp,
        args.baseline_opens,
        Some(Duration::from_secs_f64(args.baseline_secs)),
    ))?;
    report(&format!("per-op{suffix}"), &per_op);
    let group = rt.block_on(measure(args, place, Mode::Group, args.opens, None))?;
    report(&format!("group commit{suffix}"), &group);

    figure(&format!("opens_per_op{suffix}"), per_op.per_s(), "opens/s", None);
    figure(&format!("opens_group_commit{suffix}"), group.per_s(), "opens/s", Some(per_op.per_s()));
    if group.commits > 0 {
        figure(
            &format!("opens_ops_per_commit{suffix}"),
            group.committed_ops as f64 / group.commits as f64,
            "ops",
            None,
        );
    }
    figure(&format!("opens_per_op_latency_p50{suffix}"), per_op.p50_ms, "ms", None);
    figure(&format!("opens_per_op_latency_p99{suffix}"), per_op.p99_ms, "ms", None);
    figure(&format!("opens_group_commit_latency_p50{suffix}"), group.p50_ms, "ms", None);
    figure(&format!("opens_group_commit_latency_p99{suffix}"), group.p99_ms, "ms", None);
    figure(&format!("opens_commit_latency_p50{suffix}"), group.commit_p50_ms, "ms", None);
    figure(&format!("opens_commit_latency_p99{suffix}"), group.commit_p99_ms, "ms", None);
    Ok(())
}

fn report(name: &str, m: &Measured) {
    let server_cpu = m.server_cpu_s.map(|s| format!(", database server {s:.1} s")).unwrap_or_default();
    println!(
        "{name}: {} opens in {:.2} s = {:.0} opens/s; latency p50 {:.1} ms, p99 {:.1} ms; {} commits of {:.1} ops on \
         average (commit p50 {:.2} ms, p99 {:.2} ms); CPU: this process {:.1} s{server_cpu}{}; checks and audit \
         passed (setup {:.1} s, not timed)",
        m.opened,
        m.secs,
        m.per_s(),
        m.p50_ms,
        m.p99_ms,
        m.commits,
        m.committed_ops as f64 / m.commits.max(1) as f64,
        m.commit_p50_ms,
        m.commit_p99_ms,
        m.own_cpu_s,
        if m.finished_replies > 0 {
            format!("; {} late opens answered `finished`", m.finished_replies)
        } else {
            String::new()
        },
        m.setup_secs,
    );
}

/// What one simulated user saw.
#[derive(Default)]
struct UserLog {
    /// (packet index, amount) of each acknowledged open.
    opened: Vec<(usize, i64)>,
    finished: u64,
    /// Microseconds from the call to the reply, per successful open.
    latencies_us: Vec<u32>,
}

/// How the store commits: the figure and its baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Many operations per transaction and fsync: what `serve` runs.
    Group,
    /// One transaction and one fsync per operation: the baseline.
    PerOp,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Group => "group",
            Mode::PerOp => "per-op",
        }
    }
}

/// A fresh engine on `store` committing in `mode`. The only place that asks
/// the engine for the per-op baseline, which exists for this figure alone.
async fn open_engine(config: EngineConfig, mode: Mode, store: &StoreLocation) -> anyhow::Result<Engine> {
    let engine = match mode {
        Mode::Group => Engine::open_at(config, store).await,
        Mode::PerOp => Engine::open_with_commit_mode(config, CommitMode::PerOp, store).await,
    };
    engine.map_err(|e| anyhow::anyhow!("{e}"))
}

/// One mode's run: a fresh engine, the packets (not timed), the timed open
/// phase, then the checks against committed state and the audit.
async fn measure(
    args: &OpensArgs,
    place: &Place<'_>,
    mode: Mode,
    opens: u64,
    limit: Option<Duration>,
) -> anyhow::Result<Measured> {
    let (store, _dir) = match place {
        Place::Sqlite(base) => {
            let dir = tempfile::Builder::new()
                .prefix(&format!("hongbao-perf-opens-{}-", mode.name()))
                .tempdir_in(base)
                .context("temporary data directory")?;
            (StoreLocation::Sqlite(dir.path().to_owned()), Some(dir))
        }
        Place::Postgres(server) => {
            let db = pg_db(mode);
            server.create_database(&db).context("creating the run's database")?;
            server.psql_in(&db, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")?;
            (StoreLocation::postgres(&server.url_for(&db))?, None)
        }
    };
    let server_pid = match place {
        Place::Postgres(server) => server.postmaster_pid(),
        Place::Sqlite(_) => None,
    };
    // Packets are sent by a few senders as fast as setup can: the send rate
    // limit is not what this measures.
    let packet_rules = PacketRules { sends_per_s: 0, ..PacketRules::default() };
    let config = EngineConfig { shards: args.shards, packet_rules, ..EngineConfig::default() };
    let engine = open_engine(config, mode, &store).await?;

    let setup_start = Instant::now();
    let packets = opens.div_ceil(SHARES as u64) as usize;
    let ids = send_packets(&engine, packets, args).await?;
    let todo = openers(packets, args);
    let setup_secs = setup_start.elapsed().as_secs_f64();

    if let Place::Postgres(server) = place {
        server.psql_in(&pg_db(mode), "SELECT pg_stat_statements_reset()")?;
    }
    let before = engine.stats().await;
    let cpu_before = (own_cpu_s(), server_pid.map(server_cpu_s));
    let start = Instant::now();
    let logs = open_phase(&engine, &ids, todo, limit.map(|l| start + l)).await?;
    let secs = start.elapsed().as_secs_f64();
    let after = engine.stats().await;
    let cpu_after = (own_cpu_s(), server_pid.map(server_cpu_s));
    if let Place::Postgres(server) = place {
        println!("{} on PostgreSQL, where the server's time went in the timed phase:", mode.name());
        print!("{}", where_postgres_time_went(server, &pg_db(mode))?);
    }
    let mut commit_us = engine.recent_commit_us();
    // The writer keeps its latest commits: those of the timed phase are the tail.
    let timed = ((after.commits - before.commits) as usize).min(commit_us.len());
    commit_us.drain(..commit_us.len() - timed);
    commit_us.sort_unstable();
    let commit_pct = |p: f64| {
        commit_us.get(((commit_us.len().max(1) - 1) as f64 * p).round() as usize).map_or(0.0, |us| *us as f64 / 1000.0)
    };

    let outcome = check_committed(&engine, &ids, &logs).await?;
    let shares = packets as u64 * SHARES as u64;
    if limit.is_none() {
        ensure!(outcome.opened == shares, "{} opens for {shares} shares", outcome.opened);
    }
    ensure!(outcome.opened > 0, "no open succeeded");
    engine.shutdown().await;
    drop(engine);
    audit(&store).await?;

    let mut latencies = outcome.latencies_us;
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    Ok(Measured {
        opened: outcome.opened,
        finished_replies: outcome.finished_replies,
        setup_secs,
        secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        commits: after.commits - before.commits,
        committed_ops: after.committed_ops - before.committed_ops,
        commit_p50_ms: commit_pct(0.50),
        commit_p99_ms: commit_pct(0.99),
        server_cpu_s: cpu_after.1.zip(cpu_before.1).map(|(a, b)| a - b),
        own_cpu_s: cpu_after.0 - cpu_before.0,
    })
}

/// Setup: funds the senders and sends `packets` packets of `SHARES` shares,
/// packet i to `openers_per_packet` consecutive users (mod the user count).
/// Returns the packet ids by index.
async fn send_packets(engine: &Engine, packets: usize, args: &OpensArgs) -> anyhow::Result<Arc<[u64]>> {
    let users = args.concurrency as u64;
    let m = args.openers_per_packet as u64;
    let senders = packets.min(SENDERS_MAX);
    let per_sender = packets.div_ceil(senders) as i64;
    let mut setup = Vec::new();
    for s in 0..senders {
        let engine = engine.clone();
        let sender = SENDER_BASE + 1 + s as u64;
        setup.push(tokio::spawn(async move {
            engine
                .deposit(sender, PACKET_FEN * per_sender, &format!("perf-opens-{sender}"))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut sent = Vec::new();
            for i in (s..packets).step_by(senders) {
                let to: Vec<u64> = (0..m).map(|k| (i as u64 * m + k) % users + 1).collect();
                let req = Request::Send {
                    amount_fen: PACKET_FEN,
                    count: SHARES,
                    kind: SplitKind::Lucky,
                    to: Target::Users(to),
                    greeting: "perf".into(),
                    key: format!("p{i}"),
                };
                match engine.call(sender, req).await {
                    Reply::Sent { packet, .. } => sent.push((i, packet)),
                    other => bail!("send failed: {other:?}"),
                }
            }
            anyhow::Ok(sent)
        }));
    }
    let mut ids = vec![0u64; packets];
    for t in setup {
        for (i, id) in t.await?? {
            ids[i] = id;
        }
    }
    Ok(ids.into())
}

/// Each user's packets, in packet order: at any moment about
/// concurrency / openers_per_packet packets are being raced.
fn openers(packets: usize, args: &OpensArgs) -> Vec<Vec<usize>> {
    let (users, m) = (args.concurrency as u64, args.openers_per_packet as u64);
    let mut todo: Vec<Vec<usize>> = vec![Vec::new(); args.concurrency];
    for i in 0..packets {
        for k in 0..m {
            todo[((i as u64 * m + k) % users) as usize].push(i);
        }
    }
    todo
}

/// The timed phase: one task per user, each opening its packets one at a
/// time (one open in flight, like a client waiting for its reply), until
/// done or `deadline`. Returns each user's id and log.
async fn open_phase(
    engine: &Engine,
    ids: &Arc<[u64]>,
    todo: Vec<Vec<usize>>,
    deadline: Option<Instant>,
) -> anyhow::Result<Vec<(u64, UserLog)>> {
    let mut tasks = Vec::with_capacity(todo.len());
    for (u, mine) in todo.into_iter().enumerate() {
        let (engine, ids) = (engine.clone(), ids.clone());
        let user = u as u64 + 1;
        tasks.push(tokio::spawn(async move {
            let mut log = UserLog { latencies_us: Vec::with_capacity(mine.len()), ..UserLog::default() };
            for i in mine {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let t = Instant::now();
                match engine.call(user, Request::Open { packet: ids[i] }).await {
                    Reply::Opened { amount_fen, repeat: false, .. } => {
                        log.latencies_us.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        log.opened.push((i, amount_fen));
                    }
                    Reply::Error { code: ErrorCode::Finished, .. } => log.finished += 1,
                    other => bail!("user {user}, packet {}: unexpected reply {other:?}", ids[i]),
                }
            }
            anyhow::Ok((user, log))
        }));
    }
    let mut logs = Vec::with_capacity(tasks.len());
    for t in tasks {
        logs.push(t.await??);
    }
    Ok(logs)
}

/// What the users were told, once it has been checked against the ledger.
struct Outcome {
    /// Acknowledged opens (distinct packet and user).
    opened: u64,
    finished_replies: u64,
    latencies_us: Vec<u32>,
}

/// Checks every packet's committed state against the replies: no user paid
/// twice, claims ≤ count, shares + remainder = amount, every committed claim
/// is what its user was told, and as many claims as acknowledged opens.
async fn check_committed(engine: &Engine, ids: &[u64], logs: &[(u64, UserLog)]) -> anyhow::Result<Outcome> {
    let mut told: HashMap<(usize, u64), i64> = HashMap::new();
    let mut latencies_us: Vec<u32> = Vec::new();
    let mut finished_replies = 0;
    for (user, log) in logs {
        for &(i, amount) in &log.opened {
            ensure!(told.insert((i, *user), amount).is_none(), "user {user} was paid twice from packet {}", ids[i]);
        }
        finished_replies += log.finished;
        latencies_us.extend_from_slice(&log.latencies_us);
    }
    let opened = told.len() as u64;
    let mut claims_total = 0u64;
    for (i, &id) in ids.iter().enumerate() {
        claims_total += check_packet(engine, i, id, &told).await?;
    }
    ensure!(claims_total == opened, "{claims_total} committed claims but {opened} acknowledged opens");
    Ok(Outcome { opened, finished_replies, latencies_us })
}

/// Checks packet `id` (index `i`); returns its committed claims.
async fn check_packet(engine: &Engine, i: usize, id: u64, told: &HashMap<(usize, u64), i64>) -> anyhow::Result<u64> {
    let d = engine.packet_detail(id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = d.claims.len() as u32;
    ensure!(n <= d.count, "packet {id}: {n} claims for {} shares", d.count);
    let claimed: i64 = d.claims.iter().map(|c| c.amount_fen).sum();
    ensure!(claimed + d.remaining_fen + d.refunded_fen == d.amount_fen, "packet {id} does not add up: {d:?}");
    let distinct: HashSet<u64> = d.claims.iter().map(|c| c.user).collect();
    ensure!(distinct.len() == d.claims.len(), "packet {id}: a user opened twice");
    if n == d.count {
        ensure!(d.status == "finished" && d.remaining_fen == 0, "packet {id}: all shares opened but {d:?}");
    }
    for c in &d.claims {
        ensure!(
            told.get(&(i, c.user)) == Some(&c.amount_fen),
            "packet {id}: committed claim of user {} ({} fen) is not what the user was told",
            c.user,
            c.amount_fen
        );
    }
    Ok(n as u64)
}

/// The database one mode's run uses on the PostgreSQL server.
fn pg_db(mode: Mode) -> String {
    format!("opens_{}", mode.name().replace('-', "_"))
}

/// CPU seconds (user + system) this process has used.
fn own_cpu_s() -> f64 {
    procfs::cpu_s(std::process::id()).unwrap_or(0.0)
}

/// CPU seconds of a PostgreSQL server: its postmaster and every process it
/// started (backends, WAL writer, checkpointer) that is still running.
fn server_cpu_s(postmaster: u32) -> f64 {
    let children: f64 = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(procfs::stat)
                .filter(|stat| stat.ppid == postmaster)
                .map(|stat| stat.cpu_s())
                .sum()
        })
        .unwrap_or(0.0);
    procfs::cpu_s(postmaster).unwrap_or(0.0) + children
}

/// The full audit of a stopped engine's store.
async fn audit(store: &StoreLocation) -> anyhow::Result<()> {
    let store = store.clone();
    let audit = tokio::task::spawn_blocking(move || hongbao_store::audit(&store)).await??;
    ensure!(audit.passed(), "audit failed: {:?}", audit.violations);
    Ok(())
}

/// Median time of a 4 KiB write plus `fdatasync` in `dir`: what one commit
/// costs at least.
fn fsync_p50_ms(dir: &Path) -> std::io::Result<f64> {
    let path = dir.join(format!("hongbao-perf-fsync-{}", std::process::id()));
    let result = time_fsyncs(&path);
    let _ = std::fs::remove_file(&path);
    result
}

fn time_fsyncs(path: &Path) -> std::io::Result<f64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let block = [7u8; 4096];
    let mut times = Vec::with_capacity(50);
    for _ in 0..50 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
