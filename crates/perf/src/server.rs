//! The server child of the figures: `hongbao serve --dev --gateways N` on
//! loopback port 0, in a temporary data directory (`conn-memory`,
//! `broadcast`) or in one the caller keeps across restarts (`crash`), and
//! optionally pinned to some CPUs (`overload`).
//!
//! With N > 1 the server is several processes: the serve process (which has
//! a gateway of its own) and N-1 gateway children it starts, all listening on
//! the same ports (`SO_REUSEPORT`). Their PIDs come from the `gateway_pids`
//! field of the `HONGBAO_READY` line. Memory is read from every one of them,
//! and stopping (or killing) the server makes sure every one of them is gone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hongbao_client::procfs::{self, Memory};
use hongbao_client::Admin;

use crate::clients::Transport;

/// How long to wait for the ready line (every gateway listening).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the server gets to exit after SIGTERM, and its gateway children
/// after it, before SIGKILL.
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

/// One reading of every server process (`/proc/<pid>/status`), in
/// `ServerChild::pids` order.
#[derive(Clone, Debug)]
pub struct Reading(pub Vec<Memory>);

impl Reading {
    pub fn rss(&self) -> u64 {
        self.0.iter().map(|m| m.rss).sum()
    }
    pub fn anon(&self) -> u64 {
        self.0.iter().map(|m| m.anon).sum()
    }
    pub fn threads(&self) -> u64 {
        self.0.iter().map(|m| m.threads).sum()
    }
}

/// A process this run did not start itself (a gateway child of the server),
/// told apart from a later process that reuses its PID by its start time.
#[derive(Clone, Copy, Debug)]
struct Started {
    pid: u32,
    start_ticks: u64,
}

impl Started {
    fn of(pid: u32) -> anyhow::Result<Started> {
        let stat = procfs::stat(pid).with_context(|| format!("gateway process {pid} is not running"))?;
        Ok(Started { pid, start_ticks: stat.start_ticks })
    }

    /// Still running (a zombie waiting for its parent to reap it is not).
    fn alive(self) -> bool {
        procfs::stat(self.pid).is_some_and(|s| s.start_ticks == self.start_ticks && !s.exited())
    }
}

/// How to start a server child.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// The data directory (created by the server if missing).
    pub data: PathBuf,
    /// Where its stderr goes (appended to: a restarted server adds to it).
    pub log: PathBuf,
    pub gateways: u32,
    /// `--max-connections` of each gateway process.
    pub max_connections: usize,
    /// Further `serve` flags (`--packet-expiry-s 2`, …).
    pub args: Vec<String>,
    /// Runs it under `taskset -c <cpus>` (its gateway children inherit it).
    pub cpus: Option<String>,
}

impl ServerSpec {
    /// A spec for `data`, logging to `log`, with one gateway process.
    pub fn new(data: PathBuf, log: PathBuf) -> ServerSpec {
        ServerSpec { data, log, gateways: 1, max_connections: 18_000, args: Vec::new(), cpus: None }
    }

    fn command(&self) -> anyhow::Result<Command> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut cmd = match &self.cpus {
            Some(cpus) => {
                // taskset execs the server: the child's PID is the server's.
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", cpus]).arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        // The server runs on the data directory given here, whatever store
        // the environment names.
        cmd.env_remove("HONGBAO_STORE");
        cmd.arg("serve")
            .arg("--dev")
            .arg("--data")
            .arg(&self.data)
            .args(["--tcp", "127.0.0.1:0", "--ws", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--max-connections", &self.max_connections.to_string()])
            // Room for a slow machine to open every connection before the
            // first ones idle out; an idle connection's memory is the same.
            .args(["--idle-timeout-s", "600"])
            .args(["--gateways", &self.gateways.to_string()])
            .args(&self.args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HONGBAO_") {
                cmd.env_remove(key);
            }
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).context("server log file")?;
        cmd.env("RUST_LOG", "warn").stderr(Stdio::from(log));
        Ok(cmd)
    }
}

pub struct ServerChild {
    child: Child,
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    admin: SocketAddr,
    gateways: Vec<Started>,
    stopped: bool,
    log: PathBuf,
    /// Removed (with the data and log) when the server is dropped, if the
    /// server made it (`start`); a caller's directory is the caller's.
    _dir: Option<tempfile::TempDir>,
}

impl ServerChild {
    /// Starts the server with `gateways` gateway processes, each holding at
    /// most `max_connections` client connections, in a temporary directory.
    pub fn start(max_connections: usize, gateways: u32, args: &[String]) -> anyhow::Result<ServerChild> {
        let dir = tempfile::Builder::new().prefix("hongbao-perf-").tempdir().context("temporary directory")?;
        let mut spec = ServerSpec::new(dir.path().join("data"), dir.path().join("server.log"));
        spec.gateways = gateways;
        spec.max_connections = max_connections;
        spec.args = args.to_vec();
        let mut server = ServerChild::start_spec(&spec)?;
        server._dir = Some(dir);
        Ok(server)
    }

    /// Starts the server `spec` describes and waits for its ready line.
    pub fn start_spec(spec: &ServerSpec) -> anyhow::Result<ServerChild> {
        let mut cmd = spec.command()?;
        let (child, ready) = match hongbao_client::spawn_server(&mut cmd, READY_TIMEOUT) {
            Ok(started) => started,
            Err(e) => {
                let log = std::fs::read_to_string(&spec.log).unwrap_or_default();
                bail!("{e}; the server's log:\n{}", tail(&log, 40));
            }
        };
        let gateways = spec.gateways;
        let mut server = ServerChild {
            child,
            tcp: ready.tcp,
            ws: ready.ws,
            admin: ready.admin,
            gateways: Vec::new(),
            stopped: false,
            log: spec.log.clone(),
            _dir: None,
        };
        // From here on, a failure stops the server (and what has started) on drop.
        LIVE.register(server.child.id());
        for pid in ready.gateway_pids {
            server.gateways.push(Started::of(pid)?);
            LIVE.register(pid);
        }
        ensure!(
            server.gateways.len() + 1 == gateways as usize,
            "asked for {gateways} gateway processes, the server reports {} besides itself",
            server.gateways.len()
        );
        Ok(server)
    }

    pub fn addr(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Tcp => self.tcp,
            Transport::Ws => self.ws,
        }
    }

    pub fn admin(&self) -> Admin {
        Admin::new(self.admin, None)
    }

    /// The serve process, then its gateway children.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.child.id()).chain(self.gateways.iter().map(|g| g.pid)).collect()
    }

    /// Memory of every server process now.
    pub fn memory(&self) -> anyhow::Result<Reading> {
        self.pids().into_iter().map(memory).collect::<anyhow::Result<_>>().map(Reading)
    }

    /// Socket descriptors each server process holds (listeners and links
    /// included): the difference between two readings shows how the kernel
    /// spread client connections over the gateways.
    pub fn sockets(&self) -> anyhow::Result<Vec<usize>> {
        self.pids().into_iter().map(sockets).collect()
    }

    /// Waits until every server process runs at most its thread count in
    /// `idle` again (or `THREADS_SETTLE_MAX` passes), then `SETTLE`, then
    /// until two readings of the summed RSS half a second apart agree.
    pub fn settled_memory(&self, idle: &Reading) -> anyhow::Result<Reading> {
        let deadline = Instant::now() + THREADS_SETTLE_MAX;
        while Instant::now() < deadline && self.memory()?.0.iter().zip(&idle.0).any(|(m, i)| m.threads > i.threads) {
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(SETTLE);
        let deadline = Instant::now() + SETTLE_MAX;
        let mut last = self.memory()?;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.memory()?;
            let change = (now.rss() as f64 - last.rss() as f64).abs() / last.rss().max(1) as f64;
            if change <= SETTLE_TOLERANCE || Instant::now() >= deadline {
                return Ok(now);
            }
            last = now;
        }
    }

    /// SIGTERM by PID and wait; SIGKILL if it does not exit in time. Then the
    /// gateway children must be gone too (the server ends them); any left
    /// after `STOP_TIMEOUT` are killed by PID.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let server_killed = !terminate(&mut self.child);
        let left = self.end_gateways();
        if server_killed {
            bail!("server {} did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed", self.child.id());
        }
        if !left.is_empty() {
            bail!("gateway processes {left:?} outlived the server by {STOP_TIMEOUT:?}; killed");
        }
        Ok(())
    }

    /// SIGKILL to the serve process by PID: no shutdown path runs. Its
    /// gateway children stop when their link to it breaks; any still there
    /// after `STOP_TIMEOUT` are killed by PID too. Returns once every server
    /// process is gone.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        // `Child::kill` is SIGKILL to this child's PID.
        let _ = self.child.kill();
        self.child.wait().context("reaping the killed server")?;
        let left = self.end_gateways();
        ensure!(left.is_empty(), "gateway processes {left:?} outlived the killed server by {STOP_TIMEOUT:?}; killed");
        Ok(())
    }

    /// Once the serve process is gone: waits up to `STOP_TIMEOUT` for its
    /// gateway children to end, kills by PID any still there, and forgets
    /// every process of this server. Returns the PIDs it had to kill.
    fn end_gateways(&self) -> Vec<u32> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline && self.gateways.iter().any(|g| g.alive()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left: Vec<u32> = self.gateways.iter().filter(|g| g.alive()).map(|g| g.pid).collect();
        for g in self.gateways.iter().filter(|g| g.alive()) {
            kill_started(*g);
        }
        self.forget();
        left
    }

    /// Every process of this server is gone (reaped, or killed by PID).
    fn forget(&self) {
        LIVE.forget(&self.pids());
    }

    /// The server's log so far (stderr of every server process), for error
    /// messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e}");
        }
    }
}

/// The PIDs of every server process this process started and has not seen
/// end: what `kill_servers_on_signal` kills.
struct Live(Mutex<Vec<u32>>);

static LIVE: Live = Live(Mutex::new(Vec::new()));

/// Registers a server process started elsewhere in this crate (a cluster's
/// SETs and gateways) so a signal kills it too; `forget_pid` once it ended.
pub fn register_pid(pid: u32) {
    LIVE.register(pid);
}

pub fn forget_pid(pid: u32) {
    LIVE.forget(&[pid]);
}

impl Live {
    fn register(&self, pid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    }

    fn forget(&self, pids: &[u32]) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| !pids.contains(p));
    }
}

/// On SIGINT or SIGTERM this process would die without running any drop,
/// leaving its server children behind: instead, every server process still
/// running is killed by PID, then this process exits (status 130). Call it
/// once, inside the runtime that should watch.
pub fn kill_servers_on_signal(rt: &tokio::runtime::Runtime) {
    rt.spawn(async {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let pids = std::mem::take(&mut *LIVE.0.lock().unwrap_or_else(|e| e.into_inner()));
        for &pid in &pids {
            signal("-KILL", pid);
        }
        eprintln!("interrupted: killed the server processes this run had started ({pids:?})");
        std::process::exit(130);
    });
}

/// SIGTERM to the child by PID, then SIGKILL if it has not exited within
/// `STOP_TIMEOUT`; reaps it either way. False if it had to be killed.
fn terminate(child: &mut Child) -> bool {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return true;
    }
    signal("-TERM", child.id());
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // `Child::kill` is SIGKILL to this child's PID.
    let _ = child.kill();
    let _ = child.wait();
    false
}

/// SIGKILL to a process this run did not start, if it is still the same one.
fn kill_started(p: Started) {
    if p.alive() {
        signal("-KILL", p.pid);
    }
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).stderr(Stdio::null()).status();
}

fn memory(pid: u32) -> anyhow::Result<Memory> {
    procfs::memory(pid).with_context(|| format!("memory of server process {pid}"))
}

fn sockets(pid: u32) -> anyhow::Result<usize> {
    procfs::socket_fds(pid).with_context(|| format!("open files of {pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_alive_and_a_reused_pid_is_not() {
        let me = Started::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(!Started { start_ticks: me.start_ticks + 1, ..me }.alive());
        assert!(Started::of(u32::MAX).is_err());
    }
}
