//! `hongbao perf conn-memory` and `hongbao perf broadcast`: the real server
//! as a child process on loopback, many client connections from this one.
//!
//! Both are bounded: a connection count this process can hold (one process
//! may hold at most 20,000 open files here, so ~19,000 connections), a
//! deadline on every phase, and the server child is stopped by its PID
//! (SIGTERM, then SIGKILL if it does not exit) with its temporary data
//! directory removed. Multi-gateway deployments do not exist yet, so the
//! figures are for one server process.

use std::net::SocketAddr;
use std::ops::Range;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hongbao_client::Admin;
use hongbao_proto::{binary, ClientFrame, Push, PushBody, Reply, Request, ServerFrame, FRAME_HEADER_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Connections per transport unless told otherwise: as many as one process
/// can hold here, with room for everything else it has open.
const CONNECTIONS_DEFAULT: usize = 19_000;
/// `--quick`.
const CONNECTIONS_QUICK: usize = 2_000;
/// Connections being set up at once (connect, hello, welcome); below the
/// listener's accept backlog.
const CONNECT_CONCURRENCY: usize = 256;
/// Connections opened (and held) before the baseline reading, so code pages,
/// runtime slabs and allocator arenas first touched by any connection are
/// not charged to the measured ones.
const WARMUP_CONNECTIONS: usize = 50;
/// Files this process needs besides its connections.
const FDS_SPARE: usize = 100;
/// Bytes per idle connection the issue asks for (first target).
const TARGET_BYTES_PER_CONN: u64 = 2048;
/// Broadcast delivery time the issue asks for.
const TARGET_BROADCAST_MS: f64 = 1000.0;
/// Topic of the broadcast notice, so other pushes are not mistaken for it.
const TOPIC: &str = "bench";

/// How long to wait for the server to start and for each phase.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Quiet time before an RSS reading, then how closely two readings half a
/// second apart must agree (or `SETTLE_MAX` passes).
const SETTLE: Duration = Duration::from_secs(2);
const SETTLE_MAX: Duration = Duration::from_secs(10);
const SETTLE_TOLERANCE: f64 = 0.002;
/// How long to wait for the server's extra threads to exit before a reading.
/// Each `hello` reads pending messages on tokio's blocking pool, so a burst
/// of connections starts threads (stacks, allocator arenas) that idle out
/// after 10 s; they are not what an idle connection costs.
const THREADS_SETTLE_MAX: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transports {
    Tcp,
    Ws,
    Both,
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
}

// ---- conn-memory ------------------------------------------------------------

pub fn conn_memory(args: ConnMemoryArgs) -> anyhow::Result<()> {
    let n = if args.quick { CONNECTIONS_QUICK } else { args.connections };
    check_fd_room(n + WARMUP_CONNECTIONS)?;
    let transports: &[Transport] = match args.transport {
        Transports::Tcp => &[Transport::Tcp],
        Transports::Ws => &[Transport::Ws],
        Transports::Both => &[Transport::Tcp, Transport::Ws],
    };
    let rt = runtime()?;
    for &transport in transports {
        let mut runs = Vec::new();
        for run in 0..args.runs {
            let m = measure_idle(&rt, transport, n).with_context(|| format!("{} run {}", transport.name(), run + 1))?;
            eprintln!(
                "  {} run {}: {} connections, VmRSS {} -> {} ({} B/conn; anon {} B/conn; server threads {} -> {})",
                transport.name(),
                run + 1,
                n,
                mib(m.rss_before),
                mib(m.rss_after),
                m.per_conn(),
                m.anon_per_conn(),
                m.threads_before,
                m.threads_after,
            );
            runs.push(m);
        }
        runs.sort_by_key(|m| m.per_conn());
        let median = &runs[runs.len() / 2];
        let all: Vec<String> = runs.iter().map(|m| m.per_conn().to_string()).collect();
        println!(
            "{} idle {} connections (hello done) on one server process: server VmRSS {} -> {}, \
             {} B per connection (anonymous memory {} B), target={} B; {} of {} run(s) [{}]{}",
            n,
            transport.label(),
            mib(median.rss_before),
            mib(median.rss_after),
            median.per_conn(),
            median.anon_per_conn(),
            TARGET_BYTES_PER_CONN,
            if runs.len() > 1 { "median" } else { "one" },
            runs.len(),
            all.join(", "),
            if median.per_conn() <= TARGET_BYTES_PER_CONN { "" } else { " -- ABOVE TARGET" },
        );
        super::figure(&format!("conn_memory_{}", transport.name()), median.per_conn() as f64, "B/conn", None);
    }
    Ok(())
}

/// Memory readings (bytes) of one run.
struct Idle {
    n: usize,
    rss_before: u64,
    rss_after: u64,
    anon_before: u64,
    anon_after: u64,
    threads_before: u64,
    threads_after: u64,
}

impl Idle {
    fn per_conn(&self) -> u64 {
        self.rss_after.saturating_sub(self.rss_before) / self.n as u64
    }
    fn anon_per_conn(&self) -> u64 {
        self.anon_after.saturating_sub(self.anon_before) / self.n as u64
    }
}

fn measure_idle(rt: &Runtime, transport: Transport, n: usize) -> anyhow::Result<Idle> {
    let mut server = ServerChild::start(n + WARMUP_CONNECTIONS + 50)?;
    let admin = server.admin();
    std::thread::sleep(SETTLE);
    let idle_threads = server.memory()?.threads;
    // Warm-up connections stay open through the measurement.
    let warm = rt.block_on(open(transport, server.addr(transport), 1..1 + WARMUP_CONNECTIONS as u64))?;
    wait_for_connections(&admin, WARMUP_CONNECTIONS)?;
    let before = server.settled_memory(idle_threads)?;
    let first = 1 + WARMUP_CONNECTIONS as u64;
    let held = rt.block_on(open(transport, server.addr(transport), first..first + n as u64))?;
    wait_for_connections(&admin, WARMUP_CONNECTIONS + n)?;
    let after = server.settled_memory(idle_threads)?;
    // Close from this side first, then stop the server.
    rt.block_on(async move {
        drop(held);
        drop(warm);
    });
    server.stop()?;
    Ok(Idle {
        n,
        rss_before: before.rss,
        rss_after: after.rss,
        anon_before: before.anon,
        anon_after: after.anon,
        threads_before: before.threads,
        threads_after: after.threads,
    })
}

// ---- broadcast --------------------------------------------------------------

pub fn broadcast(args: BroadcastArgs) -> anyhow::Result<()> {
    let n = if args.quick { CONNECTIONS_QUICK } else { args.connections };
    if !(0.0..1.0).contains(&args.slow) {
        bail!("--slow must be in [0, 1)");
    }
    check_fd_room(n)?;
    let slow_count = ((n as f64) * args.slow).round() as usize;
    // Spread the slow ones evenly over the user ids (and so over the hub's stripes).
    let is_slow = |i: usize| slow_count > 0 && (i * slow_count / n) != ((i + 1) * slow_count / n);
    let rt = runtime()?;
    let mut server = ServerChild::start(n + 100)?;
    let admin = server.admin();

    let base = Instant::now();
    let times: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let received = Arc::new(AtomicUsize::new(0));
    let streams = rt.block_on(open_tcp(server.tcp, 1..1 + n as u64))?;
    let mut slow = Vec::with_capacity(slow_count);
    let mut readers = Vec::with_capacity(n - slow_count);
    rt.block_on(async {
        for (i, stream) in streams.into_iter().enumerate() {
            if is_slow(i) {
                slow.push(stream);
            } else {
                readers.push(tokio::spawn(read_notices(i, stream, base, times.clone(), received.clone())));
            }
        }
    });
    let expected = readers.len();
    wait_for_connections(&admin, n)?;
    std::thread::sleep(Duration::from_secs(1));

    let start = base.elapsed();
    let task = admin
        .post("/v1/broadcast", &serde_json::json!({"topic": TOPIC, "text": "新年快乐, perf broadcast"}))
        .map_err(anyhow::Error::msg)?
        .ok()
        .map_err(anyhow::Error::msg)?;
    let posted = base.elapsed() - start;
    let id = task["id"].as_u64().context("broadcast reply has no task id")?;
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while received.load(Ordering::Acquire) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let task = wait_for_task(&admin, id)?;

    let start_ns = start.as_nanos() as u64;
    let mut ms: Vec<f64> = times
        .iter()
        .map(|t| t.load(Ordering::Acquire))
        .filter(|&t| t > 0)
        .map(|t| t.saturating_sub(start_ns) as f64 / 1e6)
        .collect();
    ms.sort_by(f64::total_cmp);
    let delivered = ms.len();
    let pct = |q: f64| if ms.is_empty() { f64::NAN } else { ms[((ms.len() - 1) as f64 * q).round() as usize] };
    let max = ms.last().copied().unwrap_or(f64::NAN);

    rt.block_on(async move {
        for r in readers {
            r.abort();
        }
        drop(slow);
    });
    server.stop()?;

    println!(
        "broadcast to {n} TCP connections on one server process ({slow_count} slow readers that never read): \
         {delivered} of {expected} readers got it; last {max:.1} ms after the POST (p50 {:.1} ms, p99 {:.1} ms, \
         POST answered in {:.1} ms), target={TARGET_BROADCAST_MS} ms (the goal is 100k connections over several \
         gateways; one process holds at most ~19,000 here, so this is one gateway's share); task {id} ended {} \
         with {} of {} delivered",
        pct(0.5),
        pct(0.99),
        posted.as_secs_f64() * 1e3,
        task["state"].as_str().unwrap_or("?"),
        task["delivered"],
        task["targets"],
    );
    // No figure for a broadcast that did not reach everyone: the time of
    // those it reached would flatter it.
    if delivered < expected {
        bail!("{} readers did not get the broadcast within {:?}", expected - delivered, DELIVERY_TIMEOUT);
    }
    super::figure("broadcast_ms", max, "ms", None);
    Ok(())
}

/// Reads frames until the connection ends, recording when the notice came.
async fn read_notices(
    i: usize,
    mut s: TcpStream,
    base: Instant,
    times: Arc<Vec<AtomicU64>>,
    received: Arc<AtomicUsize>,
) {
    while let Ok(frame) = read_frame(&mut s).await {
        if let ServerFrame::Push(Push { body: PushBody::Notice { topic, .. }, .. }) = frame {
            if topic == TOPIC && times[i].load(Ordering::Relaxed) == 0 {
                times[i].store((base.elapsed().as_nanos() as u64).max(1), Ordering::Release);
                received.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
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

// ---- client connections -----------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Ws,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Ws => "WebSocket",
        }
    }
}

/// Open connections, held only to keep them open. No task per connection:
/// nothing here reads, so the server sees them idle.
#[allow(dead_code)]
enum Held {
    Tcp(Vec<TcpStream>),
    Ws(Vec<WebSocketStream<TcpStream>>),
}

async fn open(transport: Transport, addr: SocketAddr, users: Range<u64>) -> anyhow::Result<Held> {
    Ok(match transport {
        Transport::Tcp => Held::Tcp(open_tcp(addr, users).await?),
        Transport::Ws => Held::Ws(open_all(users, move |user| ws_hello(addr, user)).await?),
    })
}

async fn open_tcp(addr: SocketAddr, users: Range<u64>) -> anyhow::Result<Vec<TcpStream>> {
    open_all(users, move |user| tcp_hello(addr, user)).await
}

/// Runs `hello(user)` for every user, `CONNECT_CONCURRENCY` at a time.
async fn open_all<T, F, Fut>(users: Range<u64>, hello: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut handles = Vec::with_capacity((users.end - users.start) as usize);
    for user in users {
        let permit = permits.clone().acquire_owned().await?;
        let attempt = hello(user);
        handles.push(tokio::spawn(async move {
            let r = tokio::time::timeout(CONNECT_TIMEOUT, attempt).await;
            drop(permit);
            r.map_err(|_| anyhow::anyhow!("user {user}: no welcome within {CONNECT_TIMEOUT:?}"))?
        }));
    }
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

fn hello_frame(user: u64) -> ClientFrame {
    ClientFrame { id: 1, req: Request::Hello { token: user.to_string() } }
}

fn check_welcome(user: u64, frame: ServerFrame) -> anyhow::Result<()> {
    match frame {
        ServerFrame::Reply { reply: Reply::Welcome { user: u, .. }, .. } if u == user => Ok(()),
        other => bail!("user {user}: expected welcome, got {other:?}"),
    }
}

async fn tcp_hello(addr: SocketAddr, user: u64) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.write_all(&binary::encode_client(&hello_frame(user))).await?;
    check_welcome(user, read_frame(&mut s).await?)?;
    Ok(s)
}

async fn read_frame(s: &mut TcpStream) -> anyhow::Result<ServerFrame> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    s.read_exact(&mut header).await?;
    let len = binary::body_len(&header)?.context("short header")?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok(binary::decode_server(&body)?)
}

async fn ws_hello(addr: SocketAddr, user: u64) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    // Small buffers: this side holds up to 19,000 of these.
    let config = WebSocketConfig::default().read_buffer_size(1024).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(format!("ws://{addr}/"), s, Some(config)).await?;
    ws.send(Message::text(serde_json::to_string(&hello_frame(user))?)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                check_welcome(user, serde_json::from_str(text.as_str())?)?;
                return Ok(ws);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => bail!("user {user}: expected a text welcome, got {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("user {user}: closed before welcome"),
        }
    }
}

// ---- the server child -------------------------------------------------------

/// Memory of the server process (bytes), from /proc/<pid>/status.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss: u64,
    anon: u64,
    threads: u64,
}

/// `hongbao serve --dev` on loopback port 0 in a temporary data directory.
struct ServerChild {
    child: Child,
    tcp: SocketAddr,
    ws: SocketAddr,
    admin: SocketAddr,
    stopped: bool,
    /// Removed (with the data and log) when the server is dropped.
    _dir: tempfile::TempDir,
}

impl ServerChild {
    fn start(max_connections: usize) -> anyhow::Result<ServerChild> {
        let dir = tempfile::Builder::new().prefix("hongbao-perf-").tempdir().context("temporary directory")?;
        let data = dir.path().join("data");
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut cmd = Command::new(std::env::current_exe().context("own executable")?);
        cmd.arg("serve")
            .arg("--dev")
            .arg("--data")
            .arg(&data)
            .args(["--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--max-connections", &max_connections.to_string()])
            // Room for a slow machine to open every connection before the
            // first ones idle out; an idle connection's memory is the same.
            .args(["--idle-timeout-s", "600"]);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HONGBAO_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("RUST_LOG", "warn").stderr(Stdio::from(log));
        let (child, addrs) = match hongbao_client::spawn_server(&mut cmd, READY_TIMEOUT) {
            Ok(started) => started,
            Err(e) => {
                let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                bail!("{e}; the server's log:\n{log}");
            }
        };
        Ok(ServerChild { child, tcp: addrs.tcp, ws: addrs.ws, admin: addrs.admin, stopped: false, _dir: dir })
    }

    fn addr(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Tcp => self.tcp,
            Transport::Ws => self.ws,
        }
    }

    fn admin(&self) -> Admin {
        Admin::new(self.admin, None)
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
            let kb: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse()?;
            Ok(kb * 1024)
        };
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no Threads")?;
        Ok(Memory { rss: field("VmRSS:")?, anon: field("RssAnon:")?, threads })
    }

    /// Waits until the server runs at most `threads` threads again (or
    /// `THREADS_SETTLE_MAX` passes), then `SETTLE`, then until two readings
    /// half a second apart agree.
    fn settled_memory(&self, threads: u64) -> anyhow::Result<Memory> {
        let deadline = Instant::now() + THREADS_SETTLE_MAX;
        while self.memory()?.threads > threads && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(SETTLE);
        let deadline = Instant::now() + SETTLE_MAX;
        let mut last = self.memory()?;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.memory()?;
            let change = (now.rss as f64 - last.rss as f64).abs() / last.rss.max(1) as f64;
            if change <= SETTLE_TOLERANCE || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// SIGTERM by PID and wait; SIGKILL if it does not exit in time.
    fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // `Child::kill` is SIGKILL to this child's PID.
        let _ = self.child.kill();
        self.child.wait()?;
        bail!("server {pid} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed")
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e}");
        }
    }
}

// ---- helpers ----------------------------------------------------------------

fn runtime() -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")
}

/// Polls GET /v1/stats until the server has `n` registered connections.
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

/// Refuses a connection count this process cannot hold (open-file limit).
fn check_fd_room(connections: usize) -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft {
        if connections + FDS_SPARE > soft {
            bail!(
                "{connections} connections need about {} open files, but this process may hold {soft}; \
                 use --connections {}",
                connections + FDS_SPARE,
                soft.saturating_sub(FDS_SPARE + WARMUP_CONNECTIONS)
            );
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
