//! `hongbao perf conn-memory` and `hongbao perf broadcast`: the real server
//! as child processes on loopback (the serve process and, with `--gateways
//! N`, N-1 gateway processes sharing its ports), and client connections from
//! this process plus, past what one process holds, from `perf hold` children
//! (clients.rs).
//!
//! Both are bounded: connections per client process below the open-file
//! limit, connections per gateway below what one gateway process holds, a
//! deadline on every phase, and every process started (server, gateways,
//! client processes) ended by its PID on every path, the temporary data
//! directory removed.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hongbao_client::Admin;
use tokio::runtime::Runtime;

use crate::clients::{unix_ns, Clients, SlowReaders, Spread, Transport, PER_PROCESS_DEFAULT, TOPIC};
use crate::server::{Reading, ServerChild};

/// Connections unless told otherwise: as many as one gateway process holds
/// here (a process may hold at most 20,000 open files).
const CONNECTIONS_DEFAULT: usize = 19_000;
/// `--quick`.
const CONNECTIONS_QUICK: usize = 2_000;
/// Connections per gateway process opened (and held) before the baseline
/// reading, so code pages, runtime slabs and allocator arenas first touched
/// by any connection are not charged to the measured ones.
const WARMUP_PER_GATEWAY: usize = 50;
/// Connections one gateway process may hold when there are several: the
/// server's default, below the open-file limit.
const GATEWAY_CONNECTIONS_MAX: usize = 18_000;
/// Share of the gateways' capacity a run may fill: the kernel spreads
/// connections over `SO_REUSEPORT` listeners by a hash, not evenly, and a
/// full gateway refuses the next connection it is given.
const GATEWAY_FILL_MAX: f64 = 0.95;
/// Bytes of server memory per idle connection the issues ask for: 2 KiB
/// first (issue 4), then 1 KiB (issue 14).
const TARGET_BYTES_PER_CONN: u64 = 1024;
/// Broadcast delivery time the issue asks for.
const TARGET_BROADCAST_MS: f64 = 1000.0;
/// The server's default `--park-after-s`.
const PARK_AFTER_S_DEFAULT: u32 = 30;
/// After `--park-after-s`, time for the last connections to park and for
/// the allocator to give what they freed back to the system (jemalloc's
/// background thread purges pages unused for 10 s).
const PARKING_SLACK: Duration = Duration::from_secs(15);
/// How long the server gets to count every open connection.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the broadcast gets to reach every reader.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transports {
    Tcp,
    Ws,
    Both,
}

/// Where the connections go and come from.
#[derive(Debug, clap::Args)]
pub struct Layout {
    /// Gateway processes of the server (`serve --gateways`), sharing its
    /// ports; the kernel spreads connections over them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    gateways: u32,
    /// Connections each client process holds (this one, then `perf hold`
    /// children, each from its own 127.0.0.x address).
    #[arg(long, default_value_t = PER_PROCESS_DEFAULT as u64, value_parser = clap::value_parser!(u64).range(1..=19_500))]
    clients_per_process: u64,
}

impl Layout {
    fn per_process(&self) -> usize {
        self.clients_per_process as usize
    }

    /// `--max-connections` of each server process for `total` connections.
    fn max_connections(&self, total: usize) -> anyhow::Result<usize> {
        if self.gateways == 1 {
            return Ok(total + 50);
        }
        let capacity = (self.gateways as usize * GATEWAY_CONNECTIONS_MAX) as f64 * GATEWAY_FILL_MAX;
        ensure!(
            total as f64 <= capacity,
            "{total} connections over {} gateway processes of {GATEWAY_CONNECTIONS_MAX} each: more than {:.0} % \
             of their capacity, and the kernel does not spread them evenly; use more --gateways",
            self.gateways,
            GATEWAY_FILL_MAX * 100.0
        );
        Ok(GATEWAY_CONNECTIONS_MAX)
    }

    fn servers(&self) -> String {
        match self.gateways {
            1 => "one server process".to_owned(),
            n => format!("{n} gateway processes"),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ConnMemoryArgs {
    /// Idle connections to open per transport (each a fresh server).
    #[arg(long, default_value_t = CONNECTIONS_DEFAULT)]
    connections: usize,
    /// Which listener to measure.
    #[arg(long, value_enum, default_value = "both")]
    transport: Transports,
    /// 2,000 connections: a quick check. Costs that do not grow with the
    /// connection count (allocator arenas of the threads a burst of hellos
    /// starts) blur the figure by a few hundred bytes at this size.
    #[arg(long)]
    quick: bool,
    /// Runs per transport, each against a fresh server; the figure is the median.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    runs: u32,
    /// The server's `--park-after-s`: the connections are measured awake
    /// (once all are open) and again once they have parked; 0 keeps them
    /// awake (no second reading).
    #[arg(long, default_value_t = PARK_AFTER_S_DEFAULT, value_parser = clap::value_parser!(u32).range(0..=600))]
    park_after_s: u32,
    #[command(flatten)]
    layout: Layout,
}

#[derive(Debug, clap::Args)]
pub struct BroadcastArgs {
    /// TCP connections (hello done) the broadcast goes to.
    #[arg(long, default_value_t = CONNECTIONS_DEFAULT)]
    connections: usize,
    /// 2,000 connections: a quick check.
    #[arg(long)]
    quick: bool,
    /// Fraction of connections that never read; they must not hold up the rest.
    #[arg(long, default_value_t = 0.01)]
    slow: f64,
    /// The server's `--park-after-s`, and broadcast to parked connections:
    /// wait that long (and a few seconds) after connecting. Without it the
    /// broadcast goes to connections still awake (1 s after the last opened).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=600))]
    parked_after_s: Option<u32>,
    #[command(flatten)]
    layout: Layout,
}

// ---- conn-memory ------------------------------------------------------------

pub fn conn_memory(args: ConnMemoryArgs) -> anyhow::Result<()> {
    let n = if args.quick { CONNECTIONS_QUICK } else { args.connections };
    let layout = &args.layout;
    let warmup = WARMUP_PER_GATEWAY * layout.gateways as usize;
    ensure!(warmup < layout.per_process(), "--clients-per-process must leave room for {warmup} warm-up connections");
    layout.max_connections(n + warmup)?;
    let transports: &[Transport] = match args.transport {
        Transports::Tcp => &[Transport::Tcp],
        Transports::Ws => &[Transport::Ws],
        Transports::Both => &[Transport::Tcp, Transport::Ws],
    };
    let rt = runtime()?;
    for &transport in transports {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let m = measure_idle(&rt, transport, n, layout, args.park_after_s)
                .with_context(|| format!("{} run {run}", transport.name()))?;
            eprintln!("{}", run_line(transport, run, &m));
            runs.push(m);
        }
        runs.sort_by_key(|m| m.per_conn());
        report_idle(transport, layout, &runs);
    }
    Ok(())
}

/// One run's readings in detail (stderr), per server process too.
fn run_line(transport: Transport, run: u32, m: &Idle) -> String {
    let awake = match &m.awake {
        Some(awake) => format!("; all awake first: VmRSS {}, {} B/conn", mib(awake.rss()), m.per_conn_of(awake)),
        None => String::new(),
    };
    format!(
        "  {} run {}: {} connections, VmRSS {} -> {} ({} B/conn; anon {} B/conn{}; server threads {} -> {}; \
         per server process, serve first: sockets added [{}], RSS growth [{}])",
        transport.name(),
        run,
        m.n,
        mib(m.before.rss()),
        mib(m.after.rss()),
        m.per_conn(),
        m.anon_per_conn(),
        awake,
        m.before.threads(),
        m.after.threads(),
        list(&m.spread),
        m.after.0.iter().zip(&m.before.0).map(|(a, b)| mib(a.rss.saturating_sub(b.rss))).collect::<Vec<_>>().join(", "),
    )
}

/// The line and the figure of one transport: the median of `runs`, which
/// are sorted by bytes per connection.
fn report_idle(transport: Transport, layout: &Layout, runs: &[Idle]) {
    let median = &runs[runs.len() / 2];
    let all: Vec<String> = runs.iter().map(|m| m.per_conn().to_string()).collect();
    let spread = if layout.gateways > 1 {
        format!(" (sockets added per server process, serve first: {})", list(&median.spread))
    } else {
        String::new()
    };
    let parked = match &median.awake {
        Some(awake) => format!(" (parked; {} B while all were awake)", median.per_conn_of(awake)),
        None => " (never parked)".to_owned(),
    };
    println!(
        "{} idle {} connections (hello done){} on {}{} from {} client process(es): server VmRSS{} {} -> {}, \
         {} B per connection (anonymous memory {} B), target={} B; {} of {} run(s) [{}]{}",
        median.n,
        transport.label(),
        parked,
        layout.servers(),
        spread,
        median.clients,
        if layout.gateways > 1 { " summed over them" } else { "" },
        mib(median.before.rss()),
        mib(median.after.rss()),
        median.per_conn(),
        median.anon_per_conn(),
        TARGET_BYTES_PER_CONN,
        if runs.len() > 1 { "median" } else { "one" },
        runs.len(),
        all.join(", "),
        if median.per_conn() <= TARGET_BYTES_PER_CONN { "" } else { " -- ABOVE TARGET" },
    );
    let name = match layout.gateways {
        1 => format!("conn_memory_{}", transport.name()),
        _ => format!("conn_memory_{}_gateways", transport.name()),
    };
    crate::figure(&name, median.per_conn() as f64, "B/conn", None);
}

/// Memory readings of one run, summed over the server processes.
struct Idle {
    n: usize,
    before: Reading,
    after: Reading,
    /// With parking: the reading once every connection was open, before
    /// they parked (`after` is then the parked reading).
    awake: Option<Reading>,
    /// Sockets each server process gained between the readings.
    spread: Vec<usize>,
    /// Client processes the connections came from.
    clients: usize,
}

impl Idle {
    fn per_conn(&self) -> u64 {
        self.per_conn_of(&self.after)
    }
    fn per_conn_of(&self, reading: &Reading) -> u64 {
        reading.rss().saturating_sub(self.before.rss()) / self.n as u64
    }
    fn anon_per_conn(&self) -> u64 {
        self.after.anon().saturating_sub(self.before.anon()) / self.n as u64
    }
}

fn measure_idle(
    rt: &Runtime,
    transport: Transport,
    n: usize,
    layout: &Layout,
    park_after_s: u32,
) -> anyhow::Result<Idle> {
    let warmup = WARMUP_PER_GATEWAY * layout.gateways as usize;
    let park = vec!["--park-after-s".to_owned(), park_after_s.to_string()];
    let mut server = ServerChild::start(layout.max_connections(n + warmup)?, layout.gateways, &park)?;
    let admin = server.admin();
    let addr = server.addr(transport);
    std::thread::sleep(Duration::from_secs(2));
    let idle = server.memory()?;
    // Warm-up connections stay open through the measurement.
    let users = |first: usize, count: usize| first as u64..(first + count) as u64;
    let warm = Spread {
        transport,
        addr,
        users: users(1, warmup),
        local: warmup,
        per_process: layout.per_process(),
        notices: None,
    };
    let warm = with_log(&server, Clients::open(rt, &warm).context("warm-up connections"))?;
    with_log(&server, wait_for_connections(&admin, warmup))?;
    let before = server.settled_memory(&idle)?;
    let sockets_before = server.sockets()?;
    let measured = Spread {
        transport,
        addr,
        users: users(1 + warmup, n),
        local: layout.per_process() - warmup,
        per_process: layout.per_process(),
        notices: None,
    };
    let held = with_log(&server, Clients::open(rt, &measured))?;
    with_log(&server, wait_for_connections(&admin, warmup + n))?;
    let mut after = server.settled_memory(&idle)?;
    let mut awake = None;
    if park_after_s > 0 {
        // The warm-up connections park too; they were open (and awake) in
        // the baseline reading, so what they give back when parking lowers
        // the figure by at most 50 connections' worth per gateway.
        std::thread::sleep(Duration::from_secs(park_after_s.into()) + PARKING_SLACK);
        awake = Some(std::mem::replace(&mut after, server.settled_memory(&idle)?));
    }
    let spread = server.sockets()?.iter().zip(&sockets_before).map(|(a, b)| a.saturating_sub(*b)).collect();
    let clients = held.processes();
    // Close from the client side first, then stop the server.
    held.close(rt)?;
    warm.close(rt)?;
    server.stop()?;
    Ok(Idle { n, before, after, awake, spread, clients })
}

// ---- broadcast --------------------------------------------------------------

pub fn broadcast(args: BroadcastArgs) -> anyhow::Result<()> {
    let n = if args.quick { CONNECTIONS_QUICK } else { args.connections };
    if !(0.0..1.0).contains(&args.slow) {
        bail!("--slow must be in [0, 1)");
    }
    let layout = &args.layout;
    let slow = SlowReaders { slow: ((n as f64) * args.slow).round() as usize, total: n };
    let rt = runtime()?;
    let park = match args.parked_after_s {
        Some(s) => vec!["--park-after-s".to_owned(), s.to_string()],
        None => Vec::new(),
    };
    let mut server = ServerChild::start(layout.max_connections(n)?, layout.gateways, &park)?;
    let delivery = deliver(&rt, &server, layout, slow, args.parked_after_s)?;
    server.stop()?;
    report_broadcast(layout, slow, &delivery)
}

/// What one broadcast did.
struct Delivery {
    /// Client connections each server process took, serve first.
    per_server: Vec<usize>,
    /// Client processes, and the connections among them that read notices.
    processes: usize,
    readers: usize,
    /// Milliseconds from just before the POST until each reader that got
    /// the notice had it, sorted.
    ms: Vec<f64>,
    /// How long the POST took to answer.
    posted: Duration,
    id: u64,
    /// The broadcast task once it stopped running.
    task: serde_json::Value,
    /// The connections had parked when it was posted.
    parked: bool,
}

/// Opens every connection, waits until the server has them all, posts one
/// broadcast, collects when each reader got it, and closes the clients.
fn deliver(
    rt: &Runtime,
    server: &ServerChild,
    layout: &Layout,
    slow: SlowReaders,
    parked_after_s: Option<u32>,
) -> anyhow::Result<Delivery> {
    let n = slow.total;
    let admin = server.admin();
    let sockets_before = server.sockets()?;
    let spread = Spread {
        transport: Transport::Tcp,
        addr: server.tcp,
        users: 1..1 + n as u64,
        local: layout.per_process(),
        per_process: layout.per_process(),
        notices: Some(slow),
    };
    let mut clients = with_log(server, Clients::open(rt, &spread))?;
    let readers = clients.readers();
    with_log(server, wait_for_connections(&admin, n))?;
    let per_server: Vec<usize> =
        server.sockets()?.iter().zip(&sockets_before).map(|(a, b)| a.saturating_sub(*b)).collect();
    std::thread::sleep(match parked_after_s {
        Some(s) => Duration::from_secs(s.into()) + Duration::from_secs(3),
        None => Duration::from_secs(1),
    });

    // Receipt times are wall-clock, taken in every client process.
    let start_ns = unix_ns();
    let posted = Instant::now();
    let task = admin
        .post("/v1/broadcast", &serde_json::json!({"topic": TOPIC, "text": "新年快乐, perf broadcast"}))
        .map_err(anyhow::Error::msg)?
        .ok()
        .map_err(anyhow::Error::msg)?;
    let posted = posted.elapsed();
    let id = task["id"].as_u64().context("broadcast reply has no task id")?;
    let times = clients.receipts(Instant::now() + DELIVERY_TIMEOUT)?;
    let task = wait_for_task(&admin, id)?;

    let mut ms: Vec<f64> = times.iter().map(|&t| t.saturating_sub(start_ns) as f64 / 1e6).collect();
    ms.sort_by(f64::total_cmp);
    let processes = clients.processes();
    clients.close(rt)?;
    Ok(Delivery { per_server, processes, readers, ms, posted, id, task, parked: parked_after_s.is_some() })
}

/// The broadcast's line, then its figure only if every reader got it and
/// the task ended `done`.
fn report_broadcast(layout: &Layout, slow: SlowReaders, d: &Delivery) -> anyhow::Result<()> {
    let (n, slow_count, processes, expected, id) = (slow.total, slow.slow, d.processes, d.readers, d.id);
    let ms = &d.ms;
    let delivered = ms.len();
    let pct = |q: f64| if ms.is_empty() { f64::NAN } else { ms[((ms.len() - 1) as f64 * q).round() as usize] };
    let max = ms.last().copied().unwrap_or(f64::NAN);
    let spread = if layout.gateways > 1 {
        format!(" (connections per server process, serve first: {})", list(&d.per_server))
    } else {
        String::new()
    };
    let parked = if d.parked { " parked" } else { "" };
    println!(
        "broadcast to {n}{parked} TCP connections on {}{spread} from {processes} client process(es) ({slow_count} slow \
         readers that never read, spread over them): {delivered} of {expected} readers got it; last {max:.1} ms \
         after the POST (p50 {:.1} ms, p99 {:.1} ms, POST answered in {:.1} ms), target={TARGET_BROADCAST_MS} ms; \
         task {id} ended {} with {} of {} delivered",
        layout.servers(),
        pct(0.5),
        pct(0.99),
        d.posted.as_secs_f64() * 1e3,
        d.task["state"].as_str().unwrap_or("?"),
        d.task["delivered"],
        d.task["targets"],
    );
    // No figure for a broadcast that did not reach everyone: the time of
    // those it reached would flatter it.
    if delivered < expected {
        bail!("{} readers did not get the broadcast within {:?}", expected - delivered, DELIVERY_TIMEOUT);
    }
    if d.task["state"] != "done" {
        bail!("the broadcast task ended {} instead of done", d.task["state"]);
    }
    let name = if d.parked { "broadcast_parked_ms" } else { "broadcast_ms" };
    crate::figure(name, max, "ms", None);
    Ok(())
}

/// Polls the broadcast task until it is no longer running.
fn wait_for_task(admin: &Admin, id: u64) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let task =
            admin.get(&format!("/v1/tasks/{id}")).map_err(anyhow::Error::msg)?.ok().map_err(anyhow::Error::msg)?;
        let state = task["state"].as_str().unwrap_or("");
        if !matches!(state, "running" | "stopping") || Instant::now() >= deadline {
            return Ok(task);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- helpers ----------------------------------------------------------------

/// The runtime of a conn-memory or broadcast run: SIGINT/SIGTERM kills the
/// servers it started before this process exits.
fn runtime() -> anyhow::Result<Runtime> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    crate::server::kill_servers_on_signal(&rt);
    Ok(rt)
}

/// Polls GET /v1/stats until the server (all gateways) has `n` registered
/// connections.
fn wait_for_connections(admin: &Admin, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let stats = admin.get("/v1/stats").map_err(anyhow::Error::msg)?.ok().map_err(anyhow::Error::msg)?;
        let now = stats["connections"].as_u64().unwrap_or(0) as usize;
        if now == n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("server reports {now} connections, expected {n}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Adds the end of the server's log to an error: a refused or dropped
/// connection is explained there.
fn with_log<T>(server: &ServerChild, r: anyhow::Result<T>) -> anyhow::Result<T> {
    r.map_err(|e| {
        let log = server.log();
        let lines: Vec<&str> = log.lines().collect();
        anyhow::anyhow!("{e:#}\nthe server's log ends:\n{}", lines[lines.len().saturating_sub(20)..].join("\n"))
    })
}

fn list(v: &[usize]) -> String {
    v.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_capacity_is_checked_before_anything_starts() {
        let layout = Layout { gateways: 6, clients_per_process: PER_PROCESS_DEFAULT as u64 };
        assert_eq!(layout.max_connections(100_300).unwrap(), GATEWAY_CONNECTIONS_MAX);
        assert!(layout.max_connections(103_000).is_err());
        let one = Layout { gateways: 1, clients_per_process: PER_PROCESS_DEFAULT as u64 };
        assert_eq!(one.max_connections(19_050).unwrap(), 19_100);
    }
}
