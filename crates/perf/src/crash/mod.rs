//! `hongbao perf crash`: the crash-torture harness. N cycles of: a mixed
//! load against the real server (`load`), kill -9 at a random instant,
//! `hongbao audit` on the dead server's data, restart on the same data
//! directory, then the checks (`check`, and the campaigns and refunds here)
//! that every acknowledged outcome is there exactly once and that retried
//! keyed requests never apply twice. Packets expire after a second or two,
//! so refunds race the kills. A last round re-checks everything the run
//! acknowledged, once every packet is past its expiry, and a clean stop is
//! audited too.
//!
//! Every choice (load length, what each client does, when the campaign is
//! stopped) comes from one seed, printed at the start; `--seed` replays the
//! choices (the interleaving is the scheduler's).
//!
//! Bounded: a time limit on every request and phase, a fixed cast of users,
//! loopback only; the server is killed and started by PID, and on every
//! exit path (errors and panics included: `ServerChild` stops it on drop)
//! no process of the run is left.

mod campaigns;
mod check;
mod load;
mod record;
mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use hongbao_client::{Admin, Client};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::runtime::Runtime;

use crate::server::{ServerChild, ServerSpec};
use load::{Board, Live, RefundNotice, StopAnswer};
use record::{Checked, Outcomes};

/// Cycles of `--quick`, and its loads.
const QUICK_CYCLES: u32 = 5;
const QUICK_LOAD_MS: (u64, u64) = (200, 1_000);
/// How long the restarted server must have run, and a packet been past its
/// expiry, before its refund must be committed.
const REFUND_GRACE_MS: u64 = 1_500;
/// How long a due refund may then take before it is a violation.
const REFUND_WAIT: Duration = Duration::from_secs(10);
/// How long a running campaign may take to release again after a restart.
const RESUME_WAIT: Duration = Duration::from_secs(5);
/// How long the load's tasks get to end once the server is dead (each
/// request has its own limit, `load::REQUEST_TIMEOUT`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to connect every client.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long pending messages get to arrive after a connect.
const PENDING_SETTLE: Duration = Duration::from_millis(200);
/// A sender's balance below this is topped up before a cycle's load.
const SENDER_BALANCE_MIN_FEN: i64 = 300_000;
const SENDER_TOP_UP_FEN: i64 = 1_000_000;
/// A campaign runs for at most this many cycles before the operator stops it.
const CAMPAIGN_CYCLES_MAX: u32 = 4;

#[derive(Debug, clap::Args)]
pub struct CrashArgs {
    /// Kill-and-restart cycles.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    cycles: u32,
    /// Seed of every random choice (printed at the start; replays a run's choices).
    #[arg(long)]
    seed: Option<u64>,
    /// Shortest load before the kill, ms.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    load_ms_min: u64,
    /// Longest load before the kill, ms.
    #[arg(long, default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    load_ms_max: u64,
    /// The server's `--packet-expiry-s`: short, so refunds race the kills.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
    packet_expiry_s: u64,
    /// Gateway processes of the server (`serve --gateways`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
    gateways: u32,
    /// Clients that open packets (users 101, 102, …).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(2..=400))]
    openers: u64,
    /// Data directory, which must not exist yet; kept after the run.
    /// Default: a temporary one, removed after a passing run.
    #[arg(long)]
    data: Option<PathBuf>,
    /// 5 cycles with loads of 0.2–1 s: a smoke check.
    #[arg(long)]
    quick: bool,
    /// The server keeps its money on a PostgreSQL server this run starts
    /// (`--store`; Debian's `postgresql`), which outlives every kill: what
    /// hongbao acknowledged must be there after each restart, as with SQLite.
    #[arg(long)]
    postgres: bool,
}

/// The users of the run and their groups.
#[derive(Clone, Debug)]
pub struct Cast {
    pub senders: Vec<u64>,
    pub openers: Vec<u64>,
    pub shakers: Vec<u64>,
    /// Funds the campaigns.
    pub funder: u64,
    /// (group id, members): every sender and half of the openers each.
    pub groups: Vec<(u64, Vec<u64>)>,
}

impl Cast {
    fn new(openers: u64) -> Cast {
        let senders: Vec<u64> = (1..=4).collect();
        let openers: Vec<u64> = (101..101 + openers).collect();
        let half = openers.len() / 2;
        let groups = [(1, &openers[..half]), (2, &openers[half..])]
            .into_iter()
            .map(|(g, os)| {
                let mut members: Vec<u64> = senders.iter().chain(os).copied().collect();
                members.sort_unstable();
                (g, members)
            })
            .collect();
        Cast { senders, openers, shakers: (201..=208).collect(), funder: 900, groups }
    }

    /// Every user with a connection (the funder has none).
    fn connected(&self) -> Vec<u64> {
        self.senders.iter().chain(&self.openers).chain(&self.shakers).copied().collect()
    }

    /// Everyone a deposit may go to.
    pub fn everyone(&self) -> Vec<u64> {
        let mut all = self.connected();
        all.push(self.funder);
        all
    }
}

/// A packet the run got acknowledged, until its end is checked.
struct Track {
    amount_fen: i64,
    recipients: Arc<Vec<u64>>,
    expires_ms: u64,
    settled: bool,
}

/// A campaign the run created.
struct Campaign {
    id: u64,
    total_fen: i64,
    /// Cycles it ran in.
    cycles: u32,
    stop: StopAnswer,
    /// Stopped or finished, as last seen.
    closed: bool,
}

/// The run's state across cycles.
struct Run {
    /// Dropped first, before the runtime: a load task still running on an
    /// error path ends once the server is gone.
    server: ServerChild,
    rt: Runtime,
    seed: u64,
    spec: ServerSpec,
    /// The PostgreSQL store's URL (`--postgres`); else SQLite in the data directory.
    store: Option<String>,
    cast: Cast,
    load_ms: (u64, u64),
    /// Everything acknowledged and checked so far.
    all: Outcomes,
    packets: BTreeMap<u64, Track>,
    decided: HashSet<(u64, u64)>,
    acked: Arc<HashMap<(u64, u64), u64>>,
    refunds: HashMap<u64, RefundNotice>,
    campaigns: Vec<Campaign>,
    checked: Checked,
    /// When the current server instance was ready (unix ms).
    ready_ms: u64,
}

/// One cycle's line.
struct CycleReport {
    load: Duration,
    acknowledged: String,
    unanswered: String,
    restart: Duration,
    checked: Checked,
    violations: Vec<String>,
    campaign: String,
    took: Duration,
}

pub fn run(args: CrashArgs) -> anyhow::Result<()> {
    let (cycles, load_ms) = if args.quick {
        (QUICK_CYCLES.min(args.cycles), QUICK_LOAD_MS)
    } else {
        (args.cycles, (args.load_ms_min, args.load_ms_max))
    };
    ensure!(load_ms.0 >= 50 && load_ms.0 <= load_ms.1, "--load-ms-min must be at least 50 and at most --load-ms-max");
    let seed = args.seed.unwrap_or_else(|| unix_ms() ^ u64::from(std::process::id()) << 32);
    let (dir, data) = match &args.data {
        Some(d) => {
            ensure!(!d.exists(), "--data {} exists already: the run needs a fresh directory", d.display());
            (None, d.clone())
        }
        None => {
            let dir = tempfile::Builder::new().prefix("hongbao-crash-").tempdir().context("temporary directory")?;
            let data = dir.path().join("data");
            (Some(dir), data)
        }
    };
    let log = data.with_file_name("crash-server.log");
    let mut spec = ServerSpec::new(data.clone(), log.clone());
    spec.gateways = args.gateways;
    spec.args =
        ["--packet-expiry-s", &args.packet_expiry_s.to_string(), "--sends-per-s", "0"].map(String::from).to_vec();
    // Kept for the whole run (the kills hit hongbao, never the database).
    let postgres = if args.postgres {
        Some(hongbao_pg_harness::PgServer::start().context("starting PostgreSQL for the run")?)
    } else {
        None
    };
    let store = postgres.as_ref().map(|db| db.url());
    if let Some(url) = &store {
        spec.args.extend(["--store".to_owned(), url.clone()]);
    }
    println!(
        "crash torture: seed {seed} (--seed {seed} replays its choices), {cycles} cycles of load for {}–{} ms, then \
         kill -9, audit, restart, check; packet expiry {} s; {} gateway process(es); the server runs with \
         --sends-per-s 0 (no per-user send limit: 4 senders send faster than a person may); data {}{}",
        load_ms.0,
        load_ms.1,
        args.packet_expiry_s,
        args.gateways,
        data.display(),
        store.as_ref().map(|url| format!("; money on PostgreSQL at {url}")).unwrap_or_default()
    );
    let started = Instant::now();
    let result = torture(spec, store, Cast::new(args.openers), seed, cycles, load_ms);
    let passed = matches!(result, Ok(true));
    if let Some(dir) = dir {
        if passed {
            drop(dir);
        } else {
            eprintln!("the data directory and the server's log are kept in {}", dir.keep().display());
        }
    }
    println!("crash torture took {:.1} s (seed {seed})", started.elapsed().as_secs_f64());
    match result {
        Ok(true) => Ok(()),
        Ok(false) => bail!("crash torture FAILED (seed {seed}); log: {}", log.display()),
        Err(e) => Err(e.context(format!("crash torture stopped (seed {seed}); log: {}", log.display()))),
    }
}

/// The whole run; `Ok(false)` when it found violations.
fn torture(
    spec: ServerSpec,
    store: Option<String>,
    cast: Cast,
    seed: u64,
    cycles: u32,
    load_ms: (u64, u64),
) -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    crate::server::kill_servers_on_signal(&rt);
    let server = ServerChild::start_spec(&spec)?;
    let mut run = Run {
        server,
        rt,
        seed,
        spec,
        store,
        cast,
        load_ms,
        all: Outcomes::default(),
        packets: BTreeMap::new(),
        decided: HashSet::new(),
        acked: Arc::default(),
        refunds: HashMap::new(),
        campaigns: Vec::new(),
        checked: Checked::default(),
        ready_ms: unix_ms(),
    };
    run.setup()?;
    let mut clients = run.connect()?;
    for k in 1..=cycles {
        let (report, next) = run.cycle(k, clients)?;
        println!("{}", report.line(k, cycles));
        match next {
            Some(next) if report.violations.is_empty() => clients = next,
            _ => return Ok(run.finish(k, &report.violations)),
        }
    }
    let violations = run.final_round(clients)?;
    Ok(run.finish(cycles, &violations))
}

impl CycleReport {
    fn line(&self, k: u32, cycles: u32) -> String {
        format!(
            "cycle {k}/{cycles}: killed after {:.2} s of load; acknowledged {}; unanswered {}; audit PASS; \
             restarted in {:.2} s; checked {}; campaign {}; {} ({:.1} s)",
            self.load.as_secs_f64(),
            self.acknowledged,
            self.unanswered,
            self.restart.as_secs_f64(),
            self.checked.line(),
            self.campaign,
            if self.violations.is_empty() { "PASS".to_owned() } else { format!("FAIL ({})", self.violations.len()) },
            self.took.as_secs_f64()
        )
    }
}

impl Run {
    fn admin(&self) -> Admin {
        self.server.admin()
    }

    /// Groups and the senders' first money.
    fn setup(&mut self) -> anyhow::Result<()> {
        let admin = self.admin();
        for (group, members) in &self.cast.groups {
            admin.put(&format!("/v1/groups/{group}"), &json!({"members": members})).map_err(anyhow::Error::msg)?;
        }
        for sender in self.cast.senders.clone() {
            self.deposit(&admin, sender, SENDER_TOP_UP_FEN, format!("init-{sender}"))?;
        }
        Ok(())
    }

    /// A keyed deposit outside the load (setup, top-ups, campaign funds),
    /// recorded like any acknowledged one.
    fn deposit(&mut self, admin: &Admin, user: u64, amount_fen: i64, key: String) -> anyhow::Result<()> {
        let ask = record::DepositAsk { key, user, amount_fen };
        let body = admin
            .post(&load::deposit_path(user), &load::deposit_body(&ask))
            .map_err(anyhow::Error::msg)?
            .ok()
            .map_err(anyhow::Error::msg)?;
        let balance_fen = body["balance_fen"].as_i64().with_context(|| format!("deposit receipt {body}"))?;
        self.all.deposits.push(record::Receipt { ask, balance_fen });
        Ok(())
    }

    /// A logged-in client for every connected user of the cast.
    fn connect(&self) -> anyhow::Result<HashMap<u64, Client>> {
        let addr = self.server.tcp;
        let users = self.cast.connected();
        self.rt.block_on(async move {
            let connects = users.iter().map(|&u| async move {
                let c = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_with_token(addr, &u.to_string())).await;
                match c {
                    Ok(Ok((client, hongbao_proto::Reply::Welcome { user, .. }))) if user == u => Ok((u, client)),
                    Ok(Ok((_, other))) => bail!("user {u}: hello answered {other:?}"),
                    Ok(Err(e)) => bail!("user {u}: {e}"),
                    Err(_) => bail!("user {u}: no welcome within {CONNECT_TIMEOUT:?}"),
                }
            });
            futures_util::future::join_all(connects).await.into_iter().collect()
        })
    }

    /// One cycle: prepare, load, kill, audit, restart, check.
    /// The clients of the restarted server come back with the report; none
    /// if it did not start again (a violation, in the report).
    fn cycle(
        &mut self,
        k: u32,
        clients: HashMap<u64, Client>,
    ) -> anyhow::Result<(CycleReport, Option<HashMap<u64, Client>>)> {
        let began = Instant::now();
        let mut rng = StdRng::seed_from_u64(mix(self.seed, u64::from(k)));
        let load = Duration::from_millis(rng.random_range(self.load_ms.0..=self.load_ms.1));
        self.top_up(k)?;
        let campaign = self.prepare_campaign(k)?;
        let stop_at = self.plan_stop(&mut rng, load);
        let board = Arc::new(self.board(k, campaign));
        self.load(k, &board, clients, load, campaign.zip(stop_at))?;
        let board = Arc::into_inner(board).context("a load task outlived the cycle")?;
        let stop = *lock(&board.stop);
        if let Some(c) = self.campaigns.last_mut().filter(|c| Some(c.id) == campaign) {
            if c.stop == StopAnswer::NotAsked {
                c.stop = stop;
            }
        }
        let mut out = self.take_board(board);
        let acknowledged = out.acknowledged();
        let unanswered = out.unanswered();
        self.audit(&mut out)?;
        let restarted = Instant::now();
        let started = ServerChild::start_spec(&self.spec);
        let restart = restarted.elapsed();
        let (checked, clients) = match started {
            Ok(server) => {
                self.server = server;
                self.ready_ms = unix_ms();
                let mut clients = self.connect()?;
                (self.check(k, &mut clients, &mut out)?, Some(clients))
            }
            Err(e) => {
                out.violation(format!("the server does not start again on its data: {e:#}"));
                (Checked::default(), None)
            }
        };
        let violations = out.violations.clone();
        let campaign = self.campaign_line();
        self.absorb(out);
        let took = began.elapsed();
        Ok((CycleReport { load, acknowledged, unanswered, restart, checked, violations, campaign, took }, clients))
    }

    fn board(&mut self, k: u32, campaign: Option<u64>) -> Board {
        let now = unix_ms();
        let live = self
            .packets
            .iter()
            .filter(|(_, t)| !t.settled && t.expires_ms + 1_000 > now)
            .map(|(&packet, t)| Live { packet, recipients: t.recipients.clone(), expires_ms: t.expires_ms })
            .collect();
        Board {
            cycle: k,
            cast: self.cast.clone(),
            campaign,
            out: Mutex::default(),
            live: Mutex::new(live),
            decided: Mutex::new(std::mem::take(&mut self.decided)),
            acked_before: self.acked.clone(),
            refunds: Mutex::default(),
            stop: Mutex::new(StopAnswer::NotAsked),
            dead: AtomicBool::new(false),
        }
    }

    /// Runs the load for `load`, kills the server with SIGKILL, and waits
    /// for every task to end.
    fn load(
        &mut self,
        k: u32,
        board: &Arc<Board>,
        mut clients: HashMap<u64, Client>,
        load: Duration,
        stop: Option<(u64, Duration)>,
    ) -> anyhow::Result<()> {
        let seed = mix(self.seed, u64::from(k) << 20);
        let admin = self.admin();
        let _guard = self.rt.enter();
        let mut tasks = Vec::new();
        let mut take = |u: u64| clients.remove(&u).context("a client of the cast is missing");
        for &u in &self.cast.senders {
            tasks.push(tokio::spawn(load::sender(u, take(u)?, board.clone(), seed)));
        }
        for &u in &self.cast.openers {
            tasks.push(tokio::spawn(load::opener(u, take(u)?, board.clone(), seed)));
        }
        for &u in &self.cast.shakers {
            tasks.push(tokio::spawn(load::shaker(u, take(u)?, board.clone(), seed)));
        }
        let b = board.clone();
        let a = admin.clone();
        tasks.push(tokio::task::spawn_blocking(move || load::depositor(a, b, mix(seed, 1))));
        if let Some((campaign, after)) = stop {
            let b = board.clone();
            tasks.push(tokio::task::spawn_blocking(move || load::stopper(admin, b, campaign, after)));
        }
        std::thread::sleep(load);
        // The instant: SIGKILL by PID, in the middle of whatever is in flight.
        self.server.kill9()?;
        board.dead.store(true, Ordering::Release);
        let ended = self.rt.block_on(tokio::time::timeout(DRAIN_TIMEOUT, futures_util::future::join_all(tasks)));
        let ended = ended.map_err(|_| anyhow::anyhow!("the load's tasks did not end within {DRAIN_TIMEOUT:?}"))?;
        for r in ended {
            r.context("a load task panicked")?;
        }
        Ok(())
    }

    /// The cycle's outcomes, and the run's packets, opens tried and refund
    /// notices updated from the board.
    fn take_board(&mut self, board: Board) -> Outcomes {
        let mut out = board.out.into_inner().unwrap_or_else(|e| e.into_inner());
        self.decided = board.decided.into_inner().unwrap_or_else(|e| e.into_inner());
        for s in &out.sends {
            self.track(s);
        }
        for n in board.refunds.into_inner().unwrap_or_else(|e| e.into_inner()) {
            self.refund_notice(n, &mut out);
        }
        out
    }

    fn track(&mut self, s: &record::Sent) {
        let t = Track {
            amount_fen: s.ask.amount_fen,
            recipients: Arc::new(s.ask.recipients.clone()),
            expires_ms: s.expires_ms,
            settled: false,
        };
        self.packets.entry(s.packet).or_insert(t);
    }

    /// A refund notice: at most one message per packet.
    fn refund_notice(&mut self, n: RefundNotice, out: &mut Outcomes) {
        match self.refunds.get(&n.packet) {
            Some(first) if first.msg != n.msg => out.violation(format!(
                "packet {}: two refund notices, message {} ({} fen) and message {} ({} fen)",
                n.packet, first.msg, first.amount_fen, n.msg, n.amount_fen
            )),
            Some(_) => {}
            None => {
                self.refunds.insert(n.packet, n);
            }
        }
    }

    /// `hongbao audit` on the dead server's store (`--data DIR`, or
    /// `--store URL` with `--postgres`).
    fn audit(&mut self, out: &mut Outcomes) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut audit = std::process::Command::new(exe);
        audit.env_remove("HONGBAO_STORE").args(["audit", "--json"]);
        match &self.store {
            Some(url) => audit.args(["--store", url]),
            None => audit.arg("--data").arg(&self.spec.data),
        };
        let run = audit.output().context("running hongbao audit")?;
        let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or(serde_json::Value::Null);
        if !run.status.success() {
            let violations = report["violations"].as_array().cloned().unwrap_or_default();
            out.violation(format!(
                "hongbao audit failed ({}): {} {}",
                run.status,
                serde_json::Value::Array(violations),
                String::from_utf8_lossy(&run.stderr).trim()
            ));
        }
        Ok(())
    }

    fn absorb(&mut self, out: Outcomes) {
        for s in &out.sends {
            self.track(s);
        }
        let acked = Arc::make_mut(&mut self.acked);
        for a in &out.acks {
            acked.insert((a.user, a.msg), a.packet);
        }
        for o in &out.opens {
            self.decided.insert((o.user, o.packet));
        }
        self.all.absorb(out);
    }
}

/// Locks a mutex; a panicked holder only ever left a whole record behind.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mixes two numbers into a seed (splitmix64 of their combination).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
