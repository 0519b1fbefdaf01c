//! A throwaway `nats-server` with JetStream.
//!
//! Runs `nats-server -js -a 127.0.0.1 -p <port> -m <monitor port> -n <name>
//! -sd <dir>/jetstream -l <dir>/nats.log` in a temporary directory. The
//! server name is fixed for the life of a [`NatsServer`] and the store
//! directory kept, so that JetStream streams and their messages survive
//! [`NatsServer::kill9`] and [`NatsServer::restart`].

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::process::{self, Proc, Program, PORT_ATTEMPTS, STOP_GRACE};
use crate::{io_err, HarnessError};

/// Environment variable naming the `nats-server` binary to run.
pub const BIN_ENV: &str = "HONGBAO_NATS_SERVER";

const PROGRAM: Program = Program { name: "nats-server", package: "nats-server", env: BIN_ENV };

/// The monitor request that says the server is ready.
const HEALTH_PATH: &str = "/healthz?js-enabled-only=true";

/// A throwaway NATS server with JetStream, in its own temporary directory.
///
/// Dropping it stops the server (SIGTERM, then SIGKILL after a bounded wait)
/// and deletes the directory.
#[derive(Debug)]
pub struct NatsServer {
    program: PathBuf,
    /// Holds `jetstream/` (the store directory) and `nats.log`.
    dir: TempDir,
    store_dir: PathBuf,
    log_path: PathBuf,
    name: String,
    port: u16,
    monitor_port: u16,
    proc: Proc,
    keep: bool,
}

impl NatsServer {
    /// Starts a server with JetStream on free ports and waits until it is
    /// ready: the client port sends its `INFO` line and the monitor's
    /// `/healthz?js-enabled-only=true` answers 200.
    pub fn start() -> Result<NatsServer, HarnessError> {
        let program = PROGRAM.find()?;
        let dir = tempfile::Builder::new()
            .prefix("hongbao-nats-")
            .tempdir()
            .map_err(io_err("creating a temporary directory for nats-server"))?;
        let name = format!("hongbao-{}", dir.path().file_name().unwrap_or_default().to_string_lossy());
        let mut server = NatsServer {
            program,
            store_dir: dir.path().join("jetstream"),
            log_path: dir.path().join("nats.log"),
            dir,
            name,
            port: 0,
            monitor_port: 0,
            proc: Proc::default(),
            keep: false,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            [server.port, server.monitor_port] = process::free_ports()?;
            match server.launch() {
                Err(HarnessError::Start(failure)) if failure.address_in_use() && attempt < PORT_ATTEMPTS => continue,
                result => return result.map(|()| server),
            }
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port on 127.0.0.1; the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring port on 127.0.0.1; the same across restarts.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The JetStream store directory (`-sd`); the server keeps its data in a
    /// `jetstream/` directory inside it.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's log (`-l`, and its stdout and stderr), appended to across
    /// restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The server name (`-n`), fixed for the life of this value.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's pid while it is running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// SIGKILLs the server (no shutdown of any kind) and waits until it has
    /// exited and its ports refuse connections.
    pub fn kill9(&mut self) -> Result<(), HarnessError> {
        if !self.is_running() {
            return Err(HarnessError::NotRunning { server: "nats-server", dir: self.dir.path().to_path_buf() });
        }
        self.proc.kill9(&[self.port, self.monitor_port])
    }

    /// Stops the server (SIGTERM; SIGKILL if it has not exited after 10 s);
    /// nothing if it is not running.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        self.proc.stop(STOP_GRACE, &[self.port, self.monitor_port])
    }

    /// Starts the server again on the same ports, name and store directory
    /// (after [`NatsServer::kill9`], JetStream recovers its streams from the
    /// store); stops it first if it is running. If another process has taken
    /// one of the ports meanwhile, fails with [`HarnessError::PortTaken`].
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop()?;
        let ports = &[(self.port, "client port"), (self.monitor_port, "monitoring port")];
        process::restart_on("nats-server", ports, || self.launch())
    }

    /// `GET <path>` on the monitoring port (a raw HTTP/1.0 request): the
    /// status code and the body. `path` starts with `/`, such as `/jsz`.
    pub fn monitor_get(&self, path: &str) -> Result<(u16, String), HarnessError> {
        http_get(self.monitor_port, path).map_err(io_err(format!("GET http://127.0.0.1:{}{path}", self.monitor_port)))
    }

    /// Keeps the temporary directory (store and log) when dropped, for
    /// debugging; the server is still stopped. Prints its path on drop.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }

    fn launch(&mut self) -> Result<(), HarnessError> {
        let mut command = Command::new(&self.program);
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor_port.to_string()])
            .args(["-n", &self.name, "-sd"])
            .arg(&self.store_dir)
            .arg("-l")
            .arg(&self.log_path)
            .current_dir(self.dir.path());
        let (port, monitor_port, name) = (self.port, self.monitor_port, self.name.as_str());
        let child = process::spawn_ready("nats-server", command, &self.log_path, |_pid| {
            check_info(port, name)?;
            match http_get(monitor_port, HEALTH_PATH) {
                Ok((200, _)) => Ok(()),
                Ok((status, body)) => Err(format!("GET {HEALTH_PATH} answered {status}: {}", body.trim())),
                Err(e) => Err(format!("GET {HEALTH_PATH} on port {monitor_port}: {e}")),
            }
        })?;
        self.proc.set(child);
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.stop();
        if self.keep {
            self.dir.disable_cleanup(true);
            eprintln!("hongbao-harness: kept {}", self.dir.path().display());
        }
    }
}

/// Whether the client port sends an `INFO {...}` line from the server named
/// `name` (not some other server that took the port).
fn check_info(port: u16, name: &str) -> Result<(), String> {
    let stream = process::probe_connect(port).map_err(|e| format!("connecting to port {port}: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| format!("reading INFO from port {port}: {e}"))?;
    if !line.starts_with("INFO {") {
        return Err(format!("port {port} sent {:?}, not an INFO line", line.trim_end()));
    }
    if !line.contains(&format!("\"server_name\":\"{name}\"")) {
        return Err(format!("port {port} is another server: {}", line.trim_end()));
    }
    Ok(())
}

/// A raw HTTP/1.0 `GET` on 127.0.0.1: the status code and the body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()) {
        return Err(Error::new(ErrorKind::InvalidInput, "the path must start with `/` and hold no spaces"));
    }
    let mut stream = process::probe_connect(port)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
    // HTTP/1.0 without keep-alive: the server closes after the response.
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let bad = || Error::new(ErrorKind::InvalidData, format!("not an HTTP response: {:?}", truncate(&response)));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).filter(|_| head.starts_with("HTTP/"));
    Ok((status.ok_or_else(bad)?, body.to_owned()))
}

fn truncate(text: &str) -> &str {
    text.char_indices().nth(200).map_or(text, |(i, _)| &text[..i])
}
