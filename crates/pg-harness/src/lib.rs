//! Throwaway PostgreSQL servers for tests and benchmarks.
//!
//! This crate owns the life of PostgreSQL servers that exist only for a test
//! or a benchmark run: each [`PgServer`] is initialised (`initdb`) in a fresh
//! temporary directory, listens on a free loopback port and a Unix socket in
//! that directory, and is stopped and deleted when dropped. It can also
//! SIGKILL and restart a server (crash recovery replays the WAL), and make a
//! streaming standby of a server for failover tests.
//!
//! It drives PostgreSQL's own programs (`initdb`, `pg_ctl`, `psql`,
//! `createdb`, `pg_basebackup`) and has no PostgreSQL driver; code under test
//! connects with its own client to [`PgServer::url`].
//!
//! Each server has a superuser `hongbao` (trust authentication, loopback
//! only), a database `hongbao`, UTF-8 with the C locale, and durable settings
//! (`fsync`, `synchronous_commit`, `full_page_writes` on; `wal_level=replica`),
//! so that what a test sees after [`PgServer::kill9`] is what PostgreSQL
//! guarantees. [`PgOptions`] adds settings.
//!
//! What it must not do:
//! - touch a server it did not start: it never connects to, stops or signals
//!   anything but the postmasters it started in its own temporary directories
//!   (in particular not the cluster a distribution package may have created);
//! - be used by the hongbao server itself: it is a dev-dependency for tests
//!   and benchmarks, and depends on no other hongbao crate.
//!
//! The binaries come from `HONGBAO_PG_BIN` if set, else the newest
//! `/usr/lib/postgresql/<N>/bin` (Debian's layout), else `pg_config --bindir`.
//! PostgreSQL refuses to run as root: when the tests run as root, every
//! PostgreSQL program runs as the `postgres` user through `runuser`, and the
//! temporary directory is handed to that user.
//!
//! Every wait is bounded, and failures carry the command line, its exit status
//! and its stderr (and, for a server that does not start, the end of its log).

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The role every server is initialised with (superuser, trust auth).
pub const USER: &str = "hongbao";
/// The database [`PgServer::start`] creates and [`PgServer::url`] names.
pub const DATABASE: &str = "hongbao";
/// Environment variable naming the directory of the PostgreSQL binaries.
pub const BIN_ENV: &str = "HONGBAO_PG_BIN";

/// `pg_ctl -t`: how long `pg_ctl` waits for a start, stop or promotion.
const PG_CTL_WAIT_SECS: u32 = 60;
/// Bound on any one program run (longer than `pg_ctl`'s own wait).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on `psql` and `createdb` runs (a commit waiting for a synchronous
/// standby that is gone would otherwise wait forever).
const SQL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on polling waits (replication state, promotion, process exit).
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Attempts at starting on a fresh port when the chosen one was taken between
/// picking it and the server binding it.
const PORT_ATTEMPTS: usize = 5;
const LOG_TAIL_LINES: usize = 40;

/// The settings file the harness writes into each data directory and
/// includes from `postgresql.conf`.
const HARNESS_CONF: &str = "hongbao-harness.conf";

/// What can go wrong while running a throwaway server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// No PostgreSQL server binaries on this machine.
    #[error(
        "PostgreSQL server binaries not found (Debian package `postgresql`; `scripts/test.sh` installs it); \
         looked at: {searched}"
    )]
    NotInstalled { searched: String },
    /// A program could not be started at all.
    #[error("could not run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    /// A program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: ExitStatus, stderr: String },
    /// `pg_ctl start` failed: the server did not come up.
    #[error("{0}")]
    Start(Box<StartFailure>),
    /// A bounded wait ran out.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
    /// The operation needs a running server.
    #[error("the PostgreSQL server in {data_dir} is not running")]
    NotRunning { data_dir: PathBuf },
    /// A file or directory operation failed.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// A name or setting the harness refuses to pass on.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid { what: &'static str, value: String, reason: &'static str },
    /// The machine is not set up the way the harness needs.
    #[error("{0}")]
    Setup(String),
}

/// Why a server did not start: the `pg_ctl start` run and what the server
/// logged meanwhile.
#[derive(Debug)]
pub struct StartFailure {
    pub data_dir: PathBuf,
    /// The command line.
    pub command: String,
    /// Its exit status (or how long it ran before being killed).
    pub status: String,
    pub stderr: String,
    pub log: PathBuf,
    /// The last lines the server logged during this start.
    pub log_tail: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PostgreSQL server in {} did not start: `{}` failed ({}): {}\n--- last lines of {} ---\n{}",
            self.data_dir.display(),
            self.command,
            self.status,
            self.stderr,
            self.log.display(),
            self.log_tail
        )
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// Extra `postgresql.conf` settings for [`PgServer::start_with`].
///
/// They are written after the harness's own settings, so they override them.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    settings: Vec<(String, String)>,
}

impl PgOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name = 'value'` (the value is quoted for `postgresql.conf`).
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Adds several settings.
    pub fn settings<'a>(mut self, settings: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        self.settings.extend(settings.into_iter().map(|(n, v)| (n.to_owned(), v.to_owned())));
        self
    }

    /// Starts a server with these settings: [`PgServer::start_with`].
    pub fn start(self) -> Result<PgServer, HarnessError> {
        PgServer::start_with(self)
    }
}

/// A throwaway PostgreSQL server in its own temporary directory.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`, SIGKILL if that
/// fails) and deletes the directory.
#[derive(Debug)]
pub struct PgServer {
    runner: Runner,
    /// Holds `data/`, `server.log` and the Unix socket.
    dir: TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    options: PgOptions,
    keep: bool,
}

impl PgServer {
    /// Initialises and starts a server with the harness's settings, and
    /// creates the database [`DATABASE`].
    pub fn start() -> Result<PgServer, HarnessError> {
        Self::start_with(PgOptions::new())
    }

    /// [`PgServer::start`] with extra `postgresql.conf` settings.
    pub fn start_with(options: PgOptions) -> Result<PgServer, HarnessError> {
        for (name, _) in &options.settings {
            check_setting_name(name)?;
        }
        let runner = Runner::detect()?;
        let dir = runner.make_dir()?;
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("server.log");
        let mut server = PgServer { runner, dir, data_dir, log_path, port: 0, options, keep: false };

        let mut initdb = server.runner.pg("initdb", server.dir.path());
        initdb
            .arg("-D")
            .arg(&server.data_dir)
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions"])
            // Only the files initdb writes go unsynced (an OS crash could lose
            // them, a killed server cannot); the running server syncs what it
            // writes (fsync=on).
            .arg("--no-sync");
        server.runner.run(initdb, None, COMMAND_TIMEOUT)?;
        server.append_file(&server.data_dir.join("postgresql.conf"), &format!("\ninclude '{HARNESS_CONF}'\n"))?;

        server.start_on_free_port(&[])?;
        server.create_database(DATABASE)?;
        Ok(server)
    }

    /// Makes a streaming standby of `primary` (`pg_basebackup -R -X stream`)
    /// in a new temporary directory, connecting with `application_name=name`,
    /// and starts it. Returns once the primary's `pg_stat_replication` shows
    /// it streaming. The standby gets the primary's extra settings, and no
    /// synchronous standbys of its own (so it can commit once promoted).
    pub fn start_standby(primary: &PgServer, name: &str) -> Result<PgServer, HarnessError> {
        check_standby_name(name)?;
        if !primary.is_running() {
            return Err(HarnessError::NotRunning { data_dir: primary.data_dir.clone() });
        }
        let runner = primary.runner.clone();
        let dir = runner.make_dir()?;
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("server.log");
        let mut standby =
            PgServer { runner, dir, data_dir, log_path, port: 0, options: primary.options.clone(), keep: false };

        let mut basebackup = standby.runner.pg("pg_basebackup", standby.dir.path());
        basebackup
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string(), "-U", USER, "-D"])
            .arg(&standby.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast"])
            // As with initdb: the copy is not fsynced (up to seconds on a busy
            // disk), the standby server then syncs what it writes. Only an OS
            // crash could lose the copy, and nothing here simulates one.
            .arg("--no-sync");
        standby.runner.run(basebackup, None, COMMAND_TIMEOUT)?;

        // `-R` wrote a primary_conninfo into postgresql.auto.conf, which is
        // read after postgresql.conf: replace it there with one that names
        // the standby, and drop any synchronous_standby_names copied from the
        // primary.
        let auto_conf = standby.data_dir.join("postgresql.auto.conf");
        let old = fs::read_to_string(&auto_conf).map_err(io_err(format!("reading {}", auto_conf.display())))?;
        let mut new = String::new();
        for line in old.lines() {
            let key = line.trim_start();
            if !(key.starts_with("primary_conninfo") || key.starts_with("synchronous_standby_names")) {
                new.push_str(line);
                new.push('\n');
            }
        }
        let conninfo = format!("host=127.0.0.1 port={} user={USER} application_name={name}", primary.port);
        let _ = writeln!(new, "primary_conninfo = {}", conf_quote(&conninfo));
        standby.write_file(&auto_conf, &new)?;

        standby.start_on_free_port(&[("synchronous_standby_names", ""), ("hot_standby", "on")])?;
        let query = format!("SELECT state FROM pg_stat_replication WHERE application_name = '{name}'");
        primary.wait_for_value(&query, "streaming", &format!("standby `{name}` to stream from the primary"))?;
        Ok(standby)
    }

    /// `postgres://hongbao@127.0.0.1:PORT/hongbao`.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// The URL of database `db` on this server (`db` is not escaped).
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (`createdb`).
    pub fn create_database(&self, name: &str) -> Result<(), HarnessError> {
        let mut createdb = self.runner.pg("createdb", self.dir.path());
        createdb.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "--", name]);
        self.runner.run(createdb, None, SQL_TIMEOUT).map(drop)
    }

    /// The TCP port on 127.0.0.1; the same across [`PgServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log (`pg_ctl -l`), appended to across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The pid in `postmaster.pid`, if the file exists. After
    /// [`PgServer::kill9`] the file (and so this pid) is stale.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Whether this server's postmaster is alive.
    pub fn is_running(&self) -> bool {
        self.live_postmaster().is_some()
    }

    /// Runs `sql` as a script with `psql -X -A -t -q -v ON_ERROR_STOP=1` on
    /// the database [`DATABASE`] and returns its stdout: unaligned rows, one
    /// per line, `|` between columns, no headers or command tags.
    pub fn psql(&self, sql: &str) -> Result<String, HarnessError> {
        self.psql_in(DATABASE, sql)
    }

    /// [`PgServer::psql`] on database `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> Result<String, HarnessError> {
        let mut psql = self.runner.pg("psql", self.dir.path());
        psql.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(["-U", USER, "-d", db, "-f", "-"]);
        self.runner.run(psql, Some(sql), SQL_TIMEOUT)
    }

    /// SIGKILLs the postmaster (`kill -KILL`, no shutdown of any kind) and
    /// waits until it and every process it had started are gone and the port
    /// refuses connections, so that [`PgServer::restart`] can reuse the data
    /// directory and the port.
    pub fn kill9(&mut self) -> Result<(), HarnessError> {
        let pid = self.live_postmaster().ok_or_else(|| HarnessError::NotRunning { data_dir: self.data_dir.clone() })?;
        let children = children_of(pid);
        kill_pid(pid)?;
        self.wait_until_gone(pid, &children)
    }

    /// Starts the server again on the same data directory and port (after
    /// [`PgServer::kill9`], with crash recovery); stops it first (`-m fast`)
    /// if it is running.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop()?;
        self.clear_zombie_lock_files()?;
        self.pg_ctl_start()
    }

    /// Stops the server (`pg_ctl stop -m fast`); nothing if it is not running.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(pid) = self.live_postmaster() else { return Ok(()) };
        let children = children_of(pid);
        let mut stop = self.pg_ctl();
        stop.args(["stop", "-m", "fast"]);
        self.runner.run(stop, None, COMMAND_TIMEOUT)?;
        self.wait_until_gone(pid, &children)
    }

    /// Makes `name` the synchronous standby of this server
    /// (`ALTER SYSTEM SET synchronous_standby_names` and a reload). Commits
    /// wait for that standby from then on; see
    /// [`PgServer::wait_for_sync_standby`].
    pub fn set_synchronous_standby(&self, name: &str) -> Result<(), HarnessError> {
        check_standby_name(name)?;
        // ALTER SYSTEM cannot run inside a transaction block: a script of
        // its own, not one multi-statement query.
        self.psql(&format!("ALTER SYSTEM SET synchronous_standby_names = '{name}';\nSELECT pg_reload_conf();"))
            .map(drop)
    }

    /// Waits until this server's `pg_stat_replication` shows standby `name`
    /// in `sync` state.
    pub fn wait_for_sync_standby(&self, name: &str) -> Result<(), HarnessError> {
        check_standby_name(name)?;
        let query = format!("SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'");
        self.wait_for_value(&query, "sync", &format!("standby `{name}` to be synchronous"))
    }

    /// Promotes this standby (`pg_ctl promote -w`) and waits until
    /// `pg_is_in_recovery()` is false.
    pub fn promote(&self) -> Result<(), HarnessError> {
        let mut promote = self.pg_ctl();
        promote.arg("promote");
        self.runner.run(promote, None, COMMAND_TIMEOUT)?;
        self.wait_for_value("SELECT pg_is_in_recovery()", "f", "the promoted server to leave recovery")
    }

    /// Keeps the temporary directory (data and log) when dropped, for
    /// debugging; the server is still stopped. Prints its path on drop.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }

    // ---- internals

    /// `pg_ctl -D <data> -w -t 60` (subcommand to add).
    fn pg_ctl(&self) -> Command {
        let mut pg_ctl = self.runner.pg("pg_ctl", self.dir.path());
        pg_ctl.arg("-D").arg(&self.data_dir).args(["-w", "-t", &PG_CTL_WAIT_SECS.to_string()]);
        pg_ctl
    }

    fn pg_ctl_start(&mut self) -> Result<(), HarnessError> {
        let mut start = self.pg_ctl();
        start.arg("-l").arg(&self.log_path).arg("start");
        let log_start = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        match self.runner.run(start, None, COMMAND_TIMEOUT) {
            Ok(_) => Ok(()),
            Err(HarnessError::Command { command, status, stderr }) => {
                Err(HarnessError::Start(Box::new(StartFailure {
                    data_dir: self.data_dir.clone(),
                    command,
                    status: status.to_string(),
                    stderr,
                    log: self.log_path.clone(),
                    log_tail: log_tail(&self.log_path, log_start),
                })))
            }
            Err(HarnessError::Timeout { what, waited }) => Err(HarnessError::Start(Box::new(StartFailure {
                data_dir: self.data_dir.clone(),
                command: what,
                status: format!("no exit after {waited:?}"),
                stderr: String::new(),
                log: self.log_path.clone(),
                log_tail: log_tail(&self.log_path, log_start),
            }))),
            Err(other) => Err(other),
        }
    }

    /// A postmaster killed with SIGKILL stays a zombie until whatever adopted
    /// it (init, once pg_ctl exited) reaps it, and PostgreSQL takes a pid
    /// that still exists, zombie or not, for a running postmaster: it refuses
    /// to start ("lock file ... already exists") while its lock files name
    /// that pid. Some inits reap late (a second or so here) or never. A
    /// zombie is dead, so once none of its backends holds its shared memory
    /// any more (the check PostgreSQL itself makes of a stale postmaster.pid)
    /// the lock files naming it are stale and go. A reaped postmaster's lock
    /// files are left to PostgreSQL, which replaces them.
    fn clear_zombie_lock_files(&self) -> Result<(), HarnessError> {
        let Some(pid) = self.postmaster_pid() else { return Ok(()) };
        if !is_zombie(pid) || self.old_shared_memory().is_some_and(|(_, attached)| attached) {
            return Ok(());
        }
        let socket_lock = self.dir.path().join(format!(".s.PGSQL.{}.lock", self.port));
        for lock in [socket_lock, self.data_dir.join("postmaster.pid")] {
            let names_pid = fs::read_to_string(&lock)
                .is_ok_and(|text| text.lines().next().and_then(|l| l.trim().parse().ok()) == Some(pid));
            if names_pid {
                fs::remove_file(&lock).map_err(io_err(format!("removing the stale {}", lock.display())))?;
            }
        }
        Ok(())
    }

    /// Writes the harness settings with a freshly picked port and starts;
    /// picks another port if the server could not bind that one.
    fn start_on_free_port(&mut self, extra: &[(&str, &str)]) -> Result<(), HarnessError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = free_port()?;
            self.write_file(&self.data_dir.join(HARNESS_CONF), &self.config(extra))?;
            match self.pg_ctl_start() {
                Err(HarnessError::Start(ref failure))
                    if attempt < PORT_ATTEMPTS
                        && (failure.log_tail.contains("could not bind")
                            || failure.log_tail.contains("could not create any TCP")) =>
                {
                    continue
                }
                result => return result,
            }
        }
    }

    fn config(&self, extra: &[(&str, &str)]) -> String {
        let socket_dir = self.dir.path().to_string_lossy();
        let port = self.port.to_string();
        let base: [(&str, &str); 12] = [
            ("listen_addresses", "127.0.0.1"),
            ("port", port.as_str()),
            ("unix_socket_directories", &*socket_dir),
            ("fsync", "on"),
            ("synchronous_commit", "on"),
            ("full_page_writes", "on"),
            ("wal_level", "replica"),
            ("max_wal_senders", "5"),
            ("max_connections", "60"),
            ("shared_buffers", "128MB"),
            ("logging_collector", "off"),
            ("log_line_prefix", "%m [%p] "),
        ];
        let mut text = String::from("# Written by hongbao-pg-harness; later lines win.\n");
        let own = self.options.settings.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        for (name, value) in base.into_iter().chain(extra.iter().copied()).chain(own) {
            let _ = writeln!(text, "{name} = {}", conf_quote(value));
        }
        text
    }

    /// The postmaster's pid if it is alive and really is this server's.
    fn live_postmaster(&self) -> Option<u32> {
        let pid = self.postmaster_pid()?;
        if !process_alive(pid) {
            return None;
        }
        // A stale postmaster.pid may name a pid the system has reused: the
        // postmaster runs as `postgres -D <our data dir>`.
        match fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(cmdline) => {
                let data_dir = self.data_dir.as_os_str().as_encoded_bytes();
                cmdline.windows(data_dir.len()).any(|w| w == data_dir).then_some(pid)
            }
            Err(_) => None,
        }
    }

    fn wait_until_gone(&self, pid: u32, children: &[u32]) -> Result<(), HarnessError> {
        let what = format!(
            "the postmaster (pid {pid}) of {} and its {} processes to exit and port {} to refuse connections",
            self.data_dir.display(),
            children.len(),
            self.port
        );
        wait_until(&what, POLL_TIMEOUT, || {
            !process_alive(pid) && children.iter().all(|&c| !process_alive(c)) && !port_accepts(self.port)
        })
    }

    /// Polls `query` (one value) until it returns `want`.
    fn wait_for_value(&self, query: &str, want: &str, what: &str) -> Result<(), HarnessError> {
        let mut last;
        let deadline = Instant::now() + POLL_TIMEOUT;
        loop {
            match self.psql(query) {
                Ok(out) if out.trim() == want => return Ok(()),
                Ok(out) => last = format!("last answer {:?}", out.trim()),
                Err(e) => last = format!("last error: {e}"),
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("{what} (`{query}` to return {want:?}; {last})"),
                    waited: POLL_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn write_file(&self, path: &Path, text: &str) -> Result<(), HarnessError> {
        fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))?;
        self.runner.give(path)
    }

    fn append_file(&self, path: &Path, text: &str) -> Result<(), HarnessError> {
        let mut file =
            OpenOptions::new().append(true).open(path).map_err(io_err(format!("opening {}", path.display())))?;
        file.write_all(text.as_bytes()).map_err(io_err(format!("appending to {}", path.display())))?;
        self.runner.give(path)
    }

    /// A postmaster that dies by SIGKILL leaves its small System V shared
    /// memory segment behind (a restart on the same data directory reuses
    /// it); one killed and never restarted would leak it. Line 7 of a stale
    /// postmaster.pid names it; it goes if nothing is attached to it.
    fn remove_stale_shared_memory(&self) {
        if self.live_postmaster().is_some() {
            return;
        }
        if let Some((shmid, false)) = self.old_shared_memory() {
            let _ = Command::new("ipcrm").args(["-m", &shmid]).stdin(Stdio::null()).stderr(Stdio::null()).status();
        }
    }

    /// The System V shared memory segment that postmaster.pid names (line 7:
    /// key and id), if it still exists: its id, and whether any process is
    /// attached to it.
    fn old_shared_memory(&self) -> Option<(String, bool)> {
        let pid_file = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let ids: Vec<&str> = pid_file.lines().nth(6)?.split_whitespace().collect();
        let [key, shmid] = ids[..] else { return None };
        let table = fs::read_to_string("/proc/sysvipc/shm").ok()?;
        // key shmid perms size cpid lpid nattch ...
        table.lines().skip(1).find_map(|row| {
            let row: Vec<&str> = row.split_whitespace().collect();
            (row.len() > 6 && row[0] == key && row[1] == shmid).then(|| (shmid.to_owned(), row[6] != "0"))
        })
    }

    fn kill_on_drop(&self) {
        let Some(pid) = self.live_postmaster() else { return };
        let children = children_of(pid);
        let mut stop = self.pg_ctl();
        stop.args(["stop", "-m", "immediate"]);
        let stopped = self.runner.run(stop, None, COMMAND_TIMEOUT).is_ok() && !self.is_running();
        if !stopped {
            let _ = kill_pid(pid);
        }
        let _ = self.wait_until_gone(pid, &children);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.kill_on_drop();
        self.remove_stale_shared_memory();
        if self.keep {
            self.dir.disable_cleanup(true);
            eprintln!("hongbao-pg-harness: kept {}", self.dir.path().display());
        }
    }
}

/// How PostgreSQL programs are run here: where they are, and as whom.
#[derive(Debug, Clone)]
struct Runner {
    bin_dir: PathBuf,
    /// Set when running as root: the `postgres` user's uid and gid.
    postgres_user: Option<(u32, u32)>,
}

impl Runner {
    fn detect() -> Result<Runner, HarnessError> {
        let bin_dir = find_bin_dir(std::env::var_os(BIN_ENV), Path::new("/usr/lib/postgresql"), "pg_config")?;
        let euid = fs::metadata("/proc/self").map_err(io_err("reading the effective uid from /proc/self"))?.uid();
        let postgres_user = if euid == 0 { Some(postgres_ids()?) } else { None };
        Ok(Runner { bin_dir, postgres_user })
    }

    /// A command for PostgreSQL program `program`, run in `cwd`; through
    /// `runuser -u postgres --` when root.
    fn pg(&self, program: &str, cwd: &Path) -> Command {
        let path = self.bin_dir.join(program);
        let mut command = if self.postgres_user.is_some() {
            // In /usr/sbin, which a PATH may lack.
            let runuser = ["/usr/sbin/runuser", "/sbin/runuser"].into_iter().find(|p| Path::new(p).is_file());
            let mut runuser = Command::new(runuser.unwrap_or("runuser"));
            runuser.args(["-u", "postgres", "--"]).arg(path);
            runuser
        } else {
            Command::new(path)
        };
        command.current_dir(cwd);
        // Connection settings come from the arguments only.
        for (key, _) in std::env::vars_os() {
            if key.as_encoded_bytes().starts_with(b"PG") {
                command.env_remove(key);
            }
        }
        command
    }

    /// A new temporary directory the server's user owns and can reach.
    fn make_dir(&self) -> Result<TempDir, HarnessError> {
        let parent = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix("hongbao-pg-")
            .tempdir_in(&parent)
            .map_err(io_err(format!("creating a temporary directory in {}", parent.display())))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(io_err(format!("setting the mode of {}", dir.path().display())))?;
        if self.postgres_user.is_some() {
            for ancestor in parent.ancestors() {
                let mode = fs::metadata(ancestor).map_err(io_err(format!("reading {}", ancestor.display())))?.mode();
                if mode & 0o001 == 0 {
                    return Err(HarnessError::Setup(format!(
                        "the postgres user cannot reach the temporary directory {}: {} has mode {:o}; \
                         set TMPDIR to a directory everyone can traverse, such as /tmp",
                        parent.display(),
                        ancestor.display(),
                        mode & 0o7777
                    )));
                }
            }
        }
        self.give(dir.path())?;
        Ok(dir)
    }

    /// Hands `path` to the postgres user when running as root.
    fn give(&self, path: &Path) -> Result<(), HarnessError> {
        match self.postgres_user {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(io_err(format!("handing {} to the postgres user", path.display()))),
            None => Ok(()),
        }
    }

    /// Runs `command` with `stdin` as its input, within `timeout`; returns
    /// its stdout, or an error with its stderr if it fails.
    ///
    /// Output goes to anonymous files rather than pipes, so a program that
    /// leaves a process behind holding them (pg_ctl's postmaster) cannot
    /// block the read.
    fn run(&self, mut command: Command, stdin: Option<&str>, timeout: Duration) -> Result<String, HarnessError> {
        let line = command_line(&command);
        let spawn_err = |source| HarnessError::Spawn { command: line.clone(), source };
        let mut out = tempfile::tempfile().map_err(spawn_err)?;
        let mut err = tempfile::tempfile().map_err(spawn_err)?;
        match stdin {
            Some(text) => {
                let mut input = tempfile::tempfile().map_err(spawn_err)?;
                input.write_all(text.as_bytes()).and_then(|()| input.rewind()).map_err(spawn_err)?;
                command.stdin(input);
            }
            None => {
                command.stdin(Stdio::null());
            }
        }
        command.stdout(out.try_clone().map_err(spawn_err)?).stderr(err.try_clone().map_err(spawn_err)?);
        // Its own process group, so a timeout can kill runuser's child too.
        command.process_group(0);
        let mut child = command.spawn().map_err(spawn_err)?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                Ok(None) => {
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{}", child.id())])
                        .stderr(Stdio::null())
                        .status();
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(HarnessError::Timeout { what: format!("`{line}` to finish"), waited: timeout });
                }
                Err(source) => return Err(HarnessError::Spawn { command: line, source }),
            }
        };
        let stdout = read_all(&mut out);
        let stderr = read_all(&mut err);
        if status.success() {
            Ok(stdout)
        } else {
            Err(HarnessError::Command { command: line, status, stderr: stderr.trim_end().to_owned() })
        }
    }
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    let _ = file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_end(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The command as a shell would show it.
fn command_line(command: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c)) {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(command.get_program()).chain(command.get_args()).map(quote).collect::<Vec<_>>().join(" ")
}

/// Where the server binaries are: `env` (`HONGBAO_PG_BIN`) if set, else the
/// newest `<debian_root>/<N>/bin`, else `<pg_config> --bindir`; each must
/// hold `initdb` and `pg_ctl`.
fn find_bin_dir(env: Option<OsString>, debian_root: &Path, pg_config: &str) -> Result<PathBuf, HarnessError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = env.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(HarnessError::NotInstalled {
                searched: format!("{BIN_ENV}={} (no initdb and pg_ctl there)", dir.display()),
            })
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(debian_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| Some((entry.file_name().to_str()?.parse().ok()?, entry.path().join("bin"))))
        .filter(|(_, bin)| has_server(bin))
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let from_pg_config = Command::new(pg_config)
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|dir| has_server(dir));
    from_pg_config.ok_or_else(|| HarnessError::NotInstalled {
        searched: format!("{BIN_ENV} (unset), {}/<N>/bin, `{pg_config} --bindir`", debian_root.display()),
    })
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_ids() -> Result<(u32, u32), HarnessError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres"))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
        .ok_or_else(|| {
            HarnessError::Setup(
                "running as root, which PostgreSQL refuses, and there is no `postgres` user in /etc/passwd \
                 to run it as (the Debian package `postgresql` creates it)"
                    .to_owned(),
            )
        })
}

/// A port on 127.0.0.1 nobody listens on right now.
fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_err("binding 127.0.0.1:0"))?;
    let port = listener.local_addr().map_err(io_err("reading a bound port"))?.port();
    Ok(port)
}

fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_millis(200)).is_ok()
}

/// Whether `pid` exists and is not a zombie (a dead process its parent has
/// not reaped: the postmaster's parent is whatever adopted it).
/// A process's state letter from `/proc/<pid>/stat` (`R`, `S`, `Z`, …),
/// counted after the command name, which may hold spaces; `None` if gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn process_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z' && state != 'X')
}

fn is_zombie(pid: u32) -> bool {
    process_state(pid) == Some('Z')
}

/// The pids whose parent is `pid` (the postmaster's backends and helpers).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // pid (comm) state ppid ...
            let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// SIGKILL through the `kill` program (no unsafe code here).
fn kill_pid(pid: u32) -> Result<(), HarnessError> {
    let mut kill = Command::new("kill");
    kill.args(["-KILL", &pid.to_string()]);
    let line = command_line(&kill);
    let output =
        kill.stdin(Stdio::null()).output().map_err(|source| HarnessError::Spawn { command: line.clone(), source })?;
    if output.status.success() || !process_alive(pid) {
        Ok(())
    } else {
        Err(HarnessError::Command {
            command: line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim_end().to_owned(),
        })
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), HarnessError> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout { what: what.to_owned(), waited: timeout });
        }
        thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

/// The last lines of the log written from byte `from` on.
fn log_tail(path: &Path, from: u64) -> String {
    let mut bytes = Vec::new();
    let read = File::open(path).and_then(|mut f| {
        f.seek(SeekFrom::Start(from))?;
        f.read_to_end(&mut bytes)
    });
    if let Err(e) = read {
        return format!("(could not read {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// `value` as a single-quoted postgresql.conf string.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn check_setting_name(name: &str) -> Result<(), HarnessError> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    ok.then_some(()).ok_or_else(|| HarnessError::Invalid {
        what: "setting name",
        value: name.to_owned(),
        reason: "only ASCII letters, digits, `_` and `.`",
    })
}

/// Standby names go into SQL, conninfo and synchronous_standby_names unquoted.
fn check_standby_name(name: &str) -> Result<(), HarnessError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    ok.then_some(()).ok_or_else(|| HarnessError::Invalid {
        what: "standby name",
        value: name.to_owned(),
        reason: "a lowercase letter, then lowercase letters, digits and `_` (at most 63)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_name_the_package_and_the_script() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_bin_dir(None, empty.path(), "hongbao-no-such-pg_config").unwrap_err();
        assert!(matches!(err, HarnessError::NotInstalled { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(
                "PostgreSQL server binaries not found (Debian package `postgresql`; `scripts/test.sh` installs it)"
            ),
            "{err}"
        );
        let err = find_bin_dir(Some(empty.path().into()), Path::new("/usr/lib/postgresql"), "pg_config").unwrap_err();
        assert!(err.to_string().contains(BIN_ENV), "{err}");
    }

    #[test]
    fn the_newest_debian_version_wins() {
        let root = tempfile::tempdir().unwrap();
        for version in ["9", "15", "100", "16"] {
            let bin = root.path().join(version).join("bin");
            fs::create_dir_all(&bin).unwrap();
            fs::write(bin.join("initdb"), "").unwrap();
            fs::write(bin.join("pg_ctl"), "").unwrap();
        }
        // No pg_ctl: not a server installation.
        fs::create_dir_all(root.path().join("200/bin")).unwrap();
        fs::write(root.path().join("200/bin/initdb"), "").unwrap();
        let found = find_bin_dir(None, root.path(), "hongbao-no-such-pg_config").unwrap();
        assert_eq!(found, root.path().join("100/bin"));
    }

    #[test]
    fn conf_values_and_names_are_quoted_or_refused() {
        assert_eq!(conf_quote("it's"), "'it''s'");
        assert!(check_setting_name("work_mem").is_ok());
        assert!(check_setting_name("a = 1\nfsync").is_err());
        assert!(check_standby_name("standby_1").is_ok());
        assert!(check_standby_name("x'; DROP").is_err());
    }

    #[test]
    fn commands_get_stdin_report_stderr_and_die_at_their_timeout() {
        let runner = Runner { bin_dir: PathBuf::from("/usr/bin"), postgres_user: None };
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(runner.run(runner.pg("cat", dir.path()), Some("a\nb"), COMMAND_TIMEOUT).unwrap(), "a\nb");

        let mut fails = runner.pg("sh", dir.path());
        fails.args(["-c", "echo oops >&2; exit 3"]);
        let err = runner.run(fails, None, COMMAND_TIMEOUT).unwrap_err();
        assert!(matches!(err, HarnessError::Command { .. }), "{err:?}");
        assert!(err.to_string().contains("exit status: 3") && err.to_string().ends_with("oops"), "{err}");

        // The whole process group goes, not just the program run.
        let pid_file = dir.path().join("pid");
        let mut hangs = runner.pg("sh", dir.path());
        hangs.args(["-c", "sleep 30 & echo $! > pid; wait"]);
        let started = Instant::now();
        let err = runner.run(hangs, None, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, HarnessError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("sleep 30"), "{err}");
        let sleeper: u32 = fs::read_to_string(pid_file).unwrap().trim().parse().unwrap();
        wait_until("the orphaned sleep to die", Duration::from_secs(5), || !process_alive(sleeper)).unwrap();
    }

    #[test]
    fn zombies_and_missing_pids_are_not_alive() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
