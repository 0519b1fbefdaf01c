//! Client connections for `conn-memory` and `broadcast`, spread over client
//! processes.
//!
//! One process may hold at most 20,000 open files here, and one source
//! address has ~28,000 ephemeral ports towards one server port (32768–60999),
//! so 100,000 connections need several client processes, each connecting
//! from its own loopback address (all of 127.0.0.0/8 is loopback on Linux).
//! The perf process holds the first share itself (connect() alone, as any
//! client); each further share goes to a `hongbao perf hold` child bound to
//! 127.0.0.2, 127.0.0.3, … (`SourcePorts`). Every connection completes
//! `hello` with a dev token (the user id) before it counts as open.
//!
//! A holder speaks JSON lines. stdout: `{"connected":{...}}` once every
//! connection of its share is open; with `--read-notices`, `{"received":
//! {...}}` once every reader has the notice (or when asked); `{"error":"…"}`
//! before it exits on a failure. stdin: `"report"` (send `received` now,
//! complete or not), `"stop"`. A closed stdin means stop too, so a dying
//! parent never leaves holders behind; the parent also kills and reaps them
//! by PID on every path.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use futures_util::{SinkExt, StreamExt};
use hongbao_client::net::SourcePorts;
use hongbao_client::{frames, handshake, procfs};
use hongbao_proto::{Push, PushBody, ServerFrame};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Connections one client process holds unless told otherwise: below the
/// 20,000 open files a process may hold, with room for everything else.
pub const PER_PROCESS_DEFAULT: usize = 18_000;
/// Files a client process needs besides its connections.
const FDS_SPARE: usize = 100;
/// Connections being set up at once per process (connect, hello, welcome);
/// below the listener's accept backlog even with several processes.
const CONNECT_CONCURRENCY: usize = 256;
/// Time limit of one connection's connect, hello and welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit for every client process to have its whole share open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a holder gets to answer `report`, and to exit after `stop`.
const HOLDER_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Source addresses of holders: 127.0.0.2 up to 127.0.0.254 (each binds
/// `hongbao_client::net::SOURCE_PORTS` on its own).
const HOLDERS_MAX: usize = 253;
/// Topic of the broadcast notice, so other pushes are not mistaken for it.
pub const TOPIC: &str = "bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Tcp,
    Ws,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Ws => "WebSocket",
        }
    }
}

/// Which connections of a broadcast never read: `slow` of the `total`
/// connections of users 1..=total, spread evenly over the user ids (and so
/// over the hub's stripes, the gateways and the client processes).
#[derive(Clone, Copy, Debug)]
pub struct SlowReaders {
    pub slow: usize,
    pub total: usize,
}

impl SlowReaders {
    fn is_slow(self, user: u64) -> bool {
        let i = (user - 1) as usize;
        self.slow > 0 && (i * self.slow / self.total) != ((i + 1) * self.slow / self.total)
    }
}

/// What to open and how to spread it over processes.
#[derive(Debug)]
pub struct Spread {
    pub transport: Transport,
    pub addr: SocketAddr,
    pub users: Range<u64>,
    /// Connections the perf process itself holds (the first users).
    pub local: usize,
    /// Connections each further client process holds.
    pub per_process: usize,
    /// Broadcast: every connection reads notices except these (TCP only).
    /// None: nobody reads, so the server sees idle connections.
    pub notices: Option<SlowReaders>,
}

impl Spread {
    /// The perf process's users, then one range per holder.
    fn shares(&self) -> (Range<u64>, Vec<Range<u64>>) {
        let local_end = (self.users.start + self.local as u64).min(self.users.end);
        let mut rest = Vec::new();
        let mut first = local_end;
        while first < self.users.end {
            let end = (first + self.per_process as u64).min(self.users.end);
            rest.push(first..end);
            first = end;
        }
        (self.users.start..local_end, rest)
    }
}

// ---- one process's share ----------------------------------------------------

/// When each reader got the notice: wall-clock nanoseconds since the Unix
/// epoch (0: not yet), comparable across processes on this machine.
struct Receipts {
    unix_ns: Vec<AtomicU64>,
    received: AtomicUsize,
    all: Notify,
}

impl Receipts {
    fn new(readers: usize) -> Receipts {
        Receipts {
            unix_ns: (0..readers).map(|_| AtomicU64::new(0)).collect(),
            received: AtomicUsize::new(0),
            all: Notify::new(),
        }
    }
    fn complete(&self) -> bool {
        self.received.load(Ordering::Acquire) == self.unix_ns.len()
    }
    fn got(&self) -> Vec<u64> {
        self.unix_ns.iter().map(|t| t.load(Ordering::Acquire)).filter(|&t| t > 0).collect()
    }
}

/// Connections nothing reads from, held only to keep them open.
enum Idle {
    Tcp(Vec<TcpStream>),
    Ws(Vec<WebSocketStream<TcpStream>>),
}

impl Idle {
    fn len(&self) -> usize {
        match self {
            Idle::Tcp(v) => v.len(),
            Idle::Ws(v) => v.len(),
        }
    }
}

/// The connections of one process's share. Drop it inside the runtime.
pub struct Holding {
    idle: Idle,
    readers: Vec<JoinHandle<()>>,
    receipts: Arc<Receipts>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

impl Holding {
    /// Opens `users` from `source` (None: the system's choice).
    async fn open(
        transport: Transport,
        addr: SocketAddr,
        users: Range<u64>,
        source: Option<Ipv4Addr>,
        notices: Option<SlowReaders>,
    ) -> anyhow::Result<Holding> {
        let source = source.map(|ip| Arc::new(SourcePorts::new(ip)));
        let Some(slow) = notices else {
            let idle = match transport {
                Transport::Tcp => Idle::Tcp(open_all(users, move |u| tcp_hello(addr, source.clone(), u)).await?),
                Transport::Ws => Idle::Ws(open_all(users, move |u| ws_hello(addr, source.clone(), u)).await?),
            };
            return Ok(Holding { idle, readers: Vec::new(), receipts: Arc::new(Receipts::new(0)) });
        };
        ensure!(transport == Transport::Tcp, "notices are read over TCP only");
        let first = users.start;
        let streams = open_all(users, move |u| tcp_hello(addr, source.clone(), u)).await?;
        let (mut idle, mut reading) = (Vec::new(), Vec::new());
        for (k, s) in streams.into_iter().enumerate() {
            if slow.is_slow(first + k as u64) {
                idle.push(s);
            } else {
                reading.push(s);
            }
        }
        let receipts = Arc::new(Receipts::new(reading.len()));
        let readers =
            reading.into_iter().enumerate().map(|(i, s)| tokio::spawn(read_notices(i, s, receipts.clone()))).collect();
        Ok(Holding { idle: Idle::Tcp(idle), readers, receipts })
    }

    pub fn connections(&self) -> usize {
        self.idle.len() + self.readers.len()
    }
}

/// Reads frames until the connection ends, recording when the notice came.
/// Reads whatever has arrived into a buffer (one `recv` per notice, not one
/// for the header and one for the body), so the client's own cost, which
/// shares the cores with the server, stays small.
async fn read_notices(i: usize, mut s: TcpStream, receipts: Arc<Receipts>) {
    let mut buf = Vec::new();
    loop {
        while let Some(frame) = frames::take(&mut buf).transpose() {
            let Ok(frame) = frame else { return };
            if let ServerFrame::Push(Push { body: PushBody::Notice { topic, .. }, .. }) = frame {
                if topic == TOPIC && receipts.unix_ns[i].load(Ordering::Relaxed) == 0 {
                    receipts.unix_ns[i].store(unix_ns().max(1), Ordering::Release);
                    if receipts.received.fetch_add(1, Ordering::AcqRel) + 1 == receipts.unix_ns.len() {
                        receipts.all.notify_one();
                    }
                }
            }
        }
        if buf.is_empty() {
            // Nothing held between frames: 18,000 idle readers per process.
            buf = Vec::new();
        }
        buf.reserve(NOTICE_READ_BYTES);
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Room for a notice frame and then some, per read.
const NOTICE_READ_BYTES: usize = 256;

pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
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

/// A connected socket from `source` (None: address and port chosen by the
/// system, `SO_LINGER` 0 all the same). Closing it sends a reset instead of
/// leaving it in TIME_WAIT for a minute: the next run binds the same
/// addresses and ports.
async fn connect(addr: SocketAddr, source: Option<Arc<SourcePorts>>) -> anyhow::Result<TcpStream> {
    if let Some(source) = source {
        return Ok(source.connect(addr).await?);
    }
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_zero_linger()?;
    socket.set_nodelay(true)?;
    socket.connect(addr).await.with_context(|| format!("connect {addr}"))
}

/// Connects and completes the handshake as `user` (a dev token: the bare
/// id), reading nothing past the welcome.
async fn tcp_hello(addr: SocketAddr, source: Option<Arc<SourcePorts>>, user: u64) -> anyhow::Result<TcpStream> {
    let mut s = connect(addr, source).await?;
    let welcome = handshake::hello_exact(&mut s, &user.to_string()).await;
    welcome.and_then(|w| w.for_user(user)).with_context(|| format!("user {user}"))?;
    Ok(s)
}

async fn ws_hello(
    addr: SocketAddr,
    source: Option<Arc<SourcePorts>>,
    user: u64,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let s = connect(addr, source).await?;
    // Small buffers: a process holds up to 18,000 of these.
    let config = WebSocketConfig::default().read_buffer_size(1024).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(format!("ws://{addr}/"), s, Some(config)).await?;
    ws.send(Message::text(serde_json::to_string(&handshake::hello_frame(&user.to_string()))?)).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let welcome = handshake::welcome(serde_json::from_str(text.as_str())?);
                // A push: the welcome is still to come.
                let Some(welcome) = welcome.with_context(|| format!("user {user}"))? else { continue };
                welcome.for_user(user).with_context(|| format!("user {user}"))?;
                return Ok(ws);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => bail!("user {user}: expected a text welcome, got {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("user {user}: closed before welcome"),
        }
    }
}

/// Refuses a connection count one process cannot hold (open-file limit).
pub fn check_fd_room(connections: usize) -> anyhow::Result<()> {
    if let Some(soft) = procfs::open_files_limit().map(|soft| soft as usize) {
        if connections + FDS_SPARE > soft {
            bail!(
                "{connections} connections in one process need about {} open files, but a process may hold {soft} \
                 here; hold at most {} per process (--clients-per-process)",
                connections + FDS_SPARE,
                soft.saturating_sub(FDS_SPARE)
            );
        }
    }
    Ok(())
}

// ---- the holder process (`hongbao perf hold`) -------------------------------

#[derive(Debug, clap::Args)]
pub struct HoldArgs {
    /// Server listener to connect to.
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, value_enum)]
    transport: Transport,
    /// Local address the connections come from (its own ephemeral ports).
    #[arg(long)]
    source: Ipv4Addr,
    /// First user id of this share.
    #[arg(long)]
    first_user: u64,
    /// Connections (users) in this share.
    #[arg(long)]
    count: u64,
    /// Read notices and report when each arrived (broadcast; TCP only).
    #[arg(long, requires = "users_total")]
    read_notices: bool,
    /// Connections of the whole broadcast (users 1..=N) that never read.
    #[arg(long, default_value_t = 0)]
    slow_readers: usize,
    /// Connections of the whole broadcast, over every process.
    #[arg(long)]
    users_total: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HolderReport {
    /// Every connection of the share has completed hello.
    Connected { connections: usize, readers: usize },
    /// When each reader that has the notice got it (wall-clock ns since the
    /// Unix epoch).
    Received { unix_ns: Vec<u64> },
    /// The holder failed and exits.
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HolderControl {
    Report,
    Stop,
}

fn emit(report: &HolderReport) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(report)?)
        .and_then(|_| out.flush())
        .context("stdout (the parent is gone?)")
}

/// `hongbao perf hold`: opens one share, reports, holds it until told to stop.
pub fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let result = hold_share(args);
    if let Err(e) = &result {
        let _ = emit(&HolderReport::Error(format!("{e:#}")));
    }
    result
}

fn hold_share(args: HoldArgs) -> anyhow::Result<()> {
    // Load runs target this machine only.
    anyhow::ensure!(
        args.addr.ip().is_loopback() && args.source.is_loopback(),
        "perf hold connects over loopback only (127.0.0.0/8), not {} from {}",
        args.addr,
        args.source
    );
    check_fd_room(args.count as usize)?;
    let notices = match (args.read_notices, args.users_total) {
        (true, Some(total)) => Some(SlowReaders { slow: args.slow_readers, total }),
        _ => None,
    };
    // One thread: the perf process, the server and the other holders share
    // the machine's two cores.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let (tx, mut control) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<HolderControl>(line.trim()) {
                Ok(c) => drop(tx.send(c)),
                Err(e) => eprintln!("perf hold: ignoring control line {line:?}: {e}"),
            }
        }
        let _ = tx.send(HolderControl::Stop);
    });
    let users = args.first_user..args.first_user + args.count;
    rt.block_on(async move {
        let open = Holding::open(args.transport, args.addr, users, Some(args.source), notices);
        let holding = tokio::select! {
            h = open => h?,
            _ = wait_for_stop(&mut control) => return Ok(()),
        };
        let receipts = holding.receipts.clone();
        emit(&HolderReport::Connected { connections: holding.connections(), readers: receipts.unix_ns.len() })?;
        let report = || HolderReport::Received { unix_ns: receipts.got() };
        // Nothing to wait for without readers: only `report` is answered.
        let mut reported = receipts.unix_ns.is_empty();
        loop {
            tokio::select! {
                c = control.recv() => match c {
                    Some(HolderControl::Report) => emit(&report())?,
                    Some(HolderControl::Stop) | None => break,
                },
                _ = receipts.all.notified(), if !reported => {
                    reported = true;
                    emit(&report())?;
                }
            }
        }
        drop(holding);
        Ok::<_, anyhow::Error>(())
    })
}

async fn wait_for_stop(control: &mut tokio::sync::mpsc::UnboundedReceiver<HolderControl>) {
    while let Some(c) = control.recv().await {
        if matches!(c, HolderControl::Stop) {
            return;
        }
    }
}

// ---- the parent's side ------------------------------------------------------

/// One `hongbao perf hold` child.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    reports: mpsc::Receiver<HolderReport>,
    users: Range<u64>,
    source: Ipv4Addr,
    readers: usize,
}

impl Holder {
    fn spawn(spread: &Spread, users: Range<u64>, source: Ipv4Addr) -> anyhow::Result<Holder> {
        let mut cmd = Command::new(std::env::current_exe().context("own executable")?);
        cmd.args(["perf", "hold", "--transport", spread.transport.name()])
            .args(["--addr", &spread.addr.to_string(), "--source", &source.to_string()])
            .args(["--first-user", &users.start.to_string(), "--count", &(users.end - users.start).to_string()]);
        if let Some(slow) = spread.notices {
            cmd.args(["--read-notices", "--slow-readers", &slow.slow.to_string()])
                .args(["--users-total", &slow.total.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start a client process (perf hold)")?;
        let stdout = child.stdout.take().context("holder stdout")?;
        let (tx, reports) = mpsc::channel();
        // Ends (and drops `tx`) when the holder's stdout closes: it exited.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let report = serde_json::from_str(&line)
                    .unwrap_or_else(|e| HolderReport::Error(format!("unreadable line ({e}): {line}")));
                if tx.send(report).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Holder { child, stdin, reports, users, source, readers: 0 })
    }

    fn name(&self) -> String {
        format!(
            "client process {} (users {}..{} from {})",
            self.child.id(),
            self.users.start,
            self.users.end,
            self.source
        )
    }

    fn send(&mut self, c: &HolderControl) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{}", serde_json::to_string(c)?).and_then(|_| stdin.flush()).with_context(|| self.name())
    }

    /// The next report, or an error if the holder failed, exited or missed `deadline`.
    fn next(&mut self, deadline: Instant) -> anyhow::Result<HolderReport> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.reports.recv_timeout(wait) {
            Ok(HolderReport::Error(e)) => bail!("{}: {e}", self.name()),
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("{}: no report within its time limit", self.name()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait().ok().flatten();
                bail!("{}: exited ({status:?}) without reporting", self.name())
            }
        }
    }

    /// Tells it to stop (closing stdin), waits, kills it by PID if it does
    /// not exit in time, reaps it.
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "{}", serde_json::to_string(&HolderControl::Stop)?);
        }
        let deadline = Instant::now() + HOLDER_ANSWER_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "{} ended with {status}", self.name());
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // `Child::kill` is SIGKILL to this child's PID.
        let _ = self.child.kill();
        self.child.wait()?;
        bail!("{} did not exit within {HOLDER_ANSWER_TIMEOUT:?} of stop; killed", self.name())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Every client connection of a run: the perf process's own share and the
/// holders'. Dropping it (on an error path) kills and reaps the holders;
/// `close` ends them in order.
pub struct Clients {
    local: Holding,
    holders: Vec<Holder>,
}

impl Clients {
    /// Opens every connection of `spread`: holders start first (each
    /// connecting from its own address), then this process opens its share
    /// while they open theirs; returns once every process has its share open.
    pub fn open(rt: &Runtime, spread: &Spread) -> anyhow::Result<Clients> {
        let (local, shares) = spread.shares();
        ensure!(
            shares.len() <= HOLDERS_MAX,
            "{} client processes needed, at most {HOLDERS_MAX} (one loopback address each); \
             raise --clients-per-process",
            shares.len() + 1
        );
        check_fd_room(spread.local.max(spread.per_process))?;
        let mut holders = Vec::with_capacity(shares.len());
        for (k, users) in shares.into_iter().enumerate() {
            holders.push(Holder::spawn(spread, users, Ipv4Addr::new(127, 0, 0, 2 + k as u8))?);
        }
        let local = rt
            .block_on(Holding::open(spread.transport, spread.addr, local, None, spread.notices))
            .context("this process's share of the connections")?;
        let mut clients = Clients { local, holders };
        let deadline = Instant::now() + OPEN_TIMEOUT;
        for h in &mut clients.holders {
            match h.next(deadline)? {
                HolderReport::Connected { connections, readers } => {
                    ensure!(connections as u64 == h.users.end - h.users.start, "{}: {connections} open", h.name());
                    h.readers = readers;
                }
                other => bail!("{}: expected connected, got {other:?}", h.name()),
            }
        }
        Ok(clients)
    }

    /// Client processes, this one included.
    pub fn processes(&self) -> usize {
        1 + self.holders.len()
    }

    /// Connections that read notices, over every process.
    pub fn readers(&self) -> usize {
        self.local.receipts.unix_ns.len() + self.holders.iter().map(|h| h.readers).sum::<usize>()
    }

    /// When each reader got the notice (wall-clock ns since the Unix epoch),
    /// for every reader that had it by `deadline`.
    pub fn receipts(&mut self, deadline: Instant) -> anyhow::Result<Vec<u64>> {
        let mut times = Vec::with_capacity(self.readers());
        // Holders report by themselves once all their readers have it.
        let mut pending: Vec<usize> = (0..self.holders.len()).filter(|&k| self.holders[k].readers > 0).collect();
        while Instant::now() < deadline && !(pending.is_empty() && self.local.receipts.complete()) {
            let mut still = Vec::with_capacity(pending.len());
            for k in pending {
                let h = &mut self.holders[k];
                match h.reports.try_recv() {
                    Ok(HolderReport::Received { unix_ns }) => times.extend(unix_ns),
                    Ok(other) => bail!("{}: expected received, got {other:?}", h.name()),
                    Err(mpsc::TryRecvError::Empty) => still.push(k),
                    Err(mpsc::TryRecvError::Disconnected) => bail!("{}: exited during the broadcast", h.name()),
                }
            }
            pending = still;
            std::thread::sleep(Duration::from_millis(5));
        }
        // The rest are asked for what they have.
        for k in pending {
            let h = &mut self.holders[k];
            h.send(&HolderControl::Report)?;
            match h.next(Instant::now() + HOLDER_ANSWER_TIMEOUT)? {
                HolderReport::Received { unix_ns } => times.extend(unix_ns),
                other => bail!("{}: expected received, got {other:?}", h.name()),
            }
        }
        times.extend(self.local.receipts.got());
        Ok(times)
    }

    /// Closes this process's connections and stops every holder.
    pub fn close(mut self, rt: &Runtime) -> anyhow::Result<()> {
        let mut result = Ok(());
        for h in &mut self.holders {
            if let Err(e) = h.stop() {
                result = Err(e);
            }
        }
        let Clients { local, .. } = self;
        rt.block_on(async move { drop(local) });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(users: Range<u64>, local: usize, per_process: usize) -> Spread {
        let addr = "127.0.0.1:1".parse().unwrap();
        Spread { transport: Transport::Tcp, addr, users, local, per_process, notices: None }
    }

    #[test]
    fn shares_cover_every_user_once() {
        let (local, rest) = spread(51..100_051, 17_950, 18_000).shares();
        assert_eq!(local, 51..18_001);
        assert_eq!(rest.len(), 5);
        assert_eq!(rest[0], 18_001..36_001);
        assert_eq!(rest[4].end, 100_051);
        assert!(rest.windows(2).all(|w| w[0].end == w[1].start));
        // All of it fits here: no client process.
        assert!(spread(1..51, 50, 18_000).shares().1.is_empty());
        assert_eq!(spread(1..601, 200, 200).shares().1, vec![201..401, 401..601]);
    }

    #[test]
    fn slow_readers_are_the_asked_share_spread_evenly() {
        let slow = SlowReaders { slow: 1_000, total: 100_000 };
        let picked: Vec<u64> = (1..=100_000).filter(|&u| slow.is_slow(u)).collect();
        assert_eq!(picked.len(), 1_000);
        assert!(picked.windows(2).all(|w| w[1] - w[0] == 100));
        assert!(!(1..=300).any(|u| SlowReaders { slow: 0, total: 300 }.is_slow(u)));
    }
}
