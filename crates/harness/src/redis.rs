//! A throwaway `redis-server`.
//!
//! Runs `redis-server --port <port> --bind 127.0.0.1 --dir <dir> --save ''
//! --appendonly yes|no --appendfsync always --daemonize no --logfile
//! <dir>/redis.log` in a temporary directory: no RDB snapshots; with the
//! append-only file, every write is fsynced before it is acknowledged, so
//! that what a test sees after [`RedisServer::kill9`] and
//! [`RedisServer::restart`] is what Redis guarantees.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::process::{self, Proc, Program, PORT_ATTEMPTS, STOP_GRACE};
use crate::{io_err, HarnessError};

/// Environment variable naming the `redis-server` binary to run.
pub const BIN_ENV: &str = "HONGBAO_REDIS_SERVER";

const PROGRAM: Program = Program { name: "redis-server", package: "redis-server", env: BIN_ENV };

/// How [`RedisServer::start_with`] runs the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// `--appendonly yes` (with `--appendfsync always`): writes survive a
    /// SIGKILL. Without it nothing is persisted (`--save ''` too), and a
    /// restart starts empty. On by default.
    pub appendonly: bool,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions { appendonly: true }
    }
}

/// A throwaway Redis server in its own temporary directory.
///
/// Dropping it stops the server (SIGTERM, then SIGKILL after a bounded wait)
/// and deletes the directory.
#[derive(Debug)]
pub struct RedisServer {
    program: PathBuf,
    /// `--dir`: holds `appendonlydir/` and `redis.log`.
    dir: TempDir,
    log_path: PathBuf,
    options: RedisOptions,
    port: u16,
    proc: Proc,
    keep: bool,
}

impl RedisServer {
    /// Starts a server with the default options (append-only file on) and
    /// waits until it answers `PING`.
    pub fn start() -> Result<RedisServer, HarnessError> {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server on a free port and waits until it answers `PING` with
    /// `+PONG` (and `INFO server` names its pid).
    pub fn start_with(options: RedisOptions) -> Result<RedisServer, HarnessError> {
        let program = PROGRAM.find()?;
        let dir = tempfile::Builder::new()
            .prefix("hongbao-redis-")
            .tempdir()
            .map_err(io_err("creating a temporary directory for redis-server"))?;
        let mut server = RedisServer {
            program,
            log_path: dir.path().join("redis.log"),
            dir,
            options,
            port: 0,
            proc: Proc::default(),
            keep: false,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            [server.port] = process::free_ports()?;
            match server.launch() {
                Err(HarnessError::Start(failure)) if failure.address_in_use() && attempt < PORT_ATTEMPTS => continue,
                result => return result.map(|()| server),
            }
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port on 127.0.0.1; the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (`--dir`), which holds the append-only
    /// file; the same across restarts.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log (`--logfile`, and its stdout and stderr), appended to
    /// across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// The server's pid while it is running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// SIGKILLs the server (no shutdown of any kind) and waits until it has
    /// exited and its port refuses connections.
    pub fn kill9(&mut self) -> Result<(), HarnessError> {
        if !self.is_running() {
            return Err(HarnessError::NotRunning { server: "redis-server", dir: self.dir.path().to_path_buf() });
        }
        self.proc.kill9(&[self.port])
    }

    /// Stops the server (SIGTERM; SIGKILL if it has not exited after 10 s);
    /// nothing if it is not running.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        self.proc.stop(STOP_GRACE, &[self.port])
    }

    /// Starts the server again on the same port and directory, with the same
    /// options (after [`RedisServer::kill9`], Redis replays its append-only
    /// file); stops it first if it is running. If another process has taken
    /// the port meanwhile, fails with [`HarnessError::PortTaken`].
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop()?;
        let ports = &[(self.port, "port")];
        process::restart_on("redis-server", ports, || self.launch())
    }

    /// Keeps the temporary directory (data and log) when dropped, for
    /// debugging; the server is still stopped. Prints its path on drop.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let mut command = Command::new(&self.program);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", if self.options.appendonly { "yes" } else { "no" }])
            .args(["--appendfsync", "always", "--daemonize", "no", "--logfile"])
            .arg(&self.log_path)
            .current_dir(self.dir.path());
        let port = self.port;
        let child = process::spawn_ready("redis-server", command, &self.log_path, |pid| check_ready(port, pid))?;
        self.proc.set(child);
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.stop();
        if self.keep {
            self.dir.disable_cleanup(true);
            eprintln!("hongbao-harness: kept {}", self.dir.path().display());
        }
    }
}

/// Whether the server on `port` answers `PING` with `+PONG` (not `-LOADING`
/// while it replays its append-only file) and is process `pid` (not some
/// other server that took the port).
fn check_ready(port: u16, pid: u32) -> Result<(), String> {
    let mut stream = process::probe_connect(port).map_err(|e| format!("connecting to port {port}: {e}"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    stream.write_all(b"*1\r\n$4\r\nPING\r\n").map_err(|e| format!("sending PING: {e}"))?;
    reader.read_line(&mut line).map_err(|e| format!("reading the answer to PING: {e}"))?;
    if line != "+PONG\r\n" {
        return Err(format!("PING answered {:?}", line.trim_end()));
    }
    stream.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").map_err(|e| format!("sending INFO: {e}"))?;
    line.clear();
    reader.read_line(&mut line).map_err(|e| format!("reading the answer to INFO: {e}"))?;
    let len: usize = line
        .strip_prefix('$')
        .and_then(|n| n.trim_end().parse().ok())
        .ok_or_else(|| format!("INFO answered {:?}", line.trim_end()))?;
    let mut info = vec![0; len];
    reader.read_exact(&mut info).map_err(|e| format!("reading INFO: {e}"))?;
    let info = String::from_utf8_lossy(&info);
    if info.lines().any(|l| l == format!("process_id:{pid}")) {
        Ok(())
    } else {
        Err(format!("port {port} is another server than pid {pid}"))
    }
}
