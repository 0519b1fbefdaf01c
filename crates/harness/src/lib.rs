//! Throwaway NATS and Redis servers for tests.
//!
//! This crate owns the life of `nats-server` (with JetStream) and
//! `redis-server` processes that exist only for a test: each [`NatsServer`]
//! and [`RedisServer`] runs the installed binary as a child process of the
//! test, in a fresh temporary directory, on free ports of 127.0.0.1, and is
//! stopped (and its directory deleted) when dropped. It can SIGKILL a server
//! and start it again on the same ports and the same data (the JetStream
//! store directory, Redis's append-only file), for crash tests.
//!
//! It speaks just enough of each protocol to know that a server is ready (the
//! NATS `INFO` line and the monitor's `/healthz` over a raw HTTP/1.0 request;
//! Redis's `PING`) and has no client: code under test connects with its own
//! client (async-nats, redis) to [`NatsServer::url`] or [`RedisServer::url`].
//!
//! What it must not do:
//! - touch a server it did not start: it signals only its own child
//!   processes, and only while they are unreaped children (so their pids
//!   cannot have been reused); it never connects to a default port or to a
//!   service a distribution package may have started;
//! - be used by the hongbao server itself: it is a dev-dependency for tests,
//!   and depends on no other hongbao crate;
//! - skip: a missing binary is an error naming the Debian package and
//!   `scripts/test.sh`, so the tests that need it fail.
//!
//! Ports are picked at random below the kernel's ephemeral port range and
//! checked by binding them: a port a SIGKILLed server released cannot then be
//! taken meanwhile as the local port of some outgoing connection, which would
//! keep a restart from binding it again.
//!
//! The binaries come from `HONGBAO_NATS_SERVER` / `HONGBAO_REDIS_SERVER` (a
//! path) if set, else from `PATH`, else from `/usr/sbin`, `/usr/bin`, `/sbin`
//! or `/bin` (Debian installs `nats-server` in `/usr/sbin`, which a user's
//! `PATH` may lack).
//!
//! SIGTERM goes through the `kill` program (procps: std has no SIGTERM and the
//! workspace forbids unsafe code); SIGKILL through [`std::process::Child::kill`].
//! Every wait is bounded, and failures carry the command line, how the server
//! ended and the last lines of its log.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub mod nats;
mod process;
pub mod redis;

pub use nats::NatsServer;
pub use process::free_ports;
pub use redis::{RedisOptions, RedisServer};

/// What can go wrong while running a throwaway server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// The server binary is not on this machine.
    #[error("{program} not found (Debian package `{package}`; `scripts/test.sh` installs it); looked at: {searched}")]
    NotInstalled { program: &'static str, package: &'static str, searched: String },
    /// A program could not be started at all.
    #[error("could not run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    /// A program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: ExitStatus, stderr: String },
    /// The server did not come up.
    #[error("{0}")]
    Start(Box<StartFailure>),
    /// A restart found one of the server's ports taken by another process.
    #[error("cannot restart {server} on 127.0.0.1 port {ports}: {detail}")]
    PortTaken { server: &'static str, ports: String, detail: String },
    /// A bounded wait ran out.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
    /// The operation needs a running server.
    #[error("the {server} in {dir} is not running")]
    NotRunning { server: &'static str, dir: PathBuf },
    /// A file, directory or socket operation failed.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

/// Why a server did not start: its command line, how it ended, and what it
/// logged meanwhile.
#[derive(Debug)]
pub struct StartFailure {
    /// `nats-server` or `redis-server`.
    pub server: &'static str,
    /// The command line.
    pub command: String,
    /// How it ended: its exit status, or the readiness check that never
    /// passed (the process is then SIGKILLed).
    pub outcome: String,
    /// Whether the process exited by itself.
    pub exited: bool,
    pub log: PathBuf,
    /// The last lines of the log written during this start.
    pub log_tail: String,
}

impl StartFailure {
    /// Whether the server exited because an address it wanted was in use.
    pub fn address_in_use(&self) -> bool {
        self.exited && self.log_tail.to_ascii_lowercase().contains("address already in use")
    }
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} did not start: `{}` {}\n--- last lines of {} ---\n{}",
            self.server,
            self.command,
            self.outcome,
            self.log.display(),
            self.log_tail
        )
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}
