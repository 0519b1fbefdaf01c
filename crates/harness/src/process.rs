//! What both servers share: finding the binary, free ports, starting a
//! child process and waiting until it is ready, stopping it, log tails.

use std::collections::hash_map::RandomState;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{io_err, HarnessError, StartFailure};

/// Bound on a server becoming ready.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server gets to exit after SIGTERM before it is SIGKILLed.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);
/// Bound on a SIGKILLed process exiting, and on its ports closing.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Attempts at starting on fresh ports when a chosen one was taken between
/// picking it and the server binding it.
pub(crate) const PORT_ATTEMPTS: usize = 5;
/// Bounds on one readiness probe: connecting, and each read or write.
pub(crate) const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
pub(crate) const PROBE_IO_TIMEOUT: Duration = Duration::from_secs(1);
const LOG_TAIL_LINES: usize = 40;
/// Where a server binary is looked for after `PATH`.
const FALLBACK_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// A server program: its file name, the Debian package that has it, and the
/// environment variable that overrides where it is.
#[derive(Debug)]
pub(crate) struct Program {
    pub name: &'static str,
    pub package: &'static str,
    pub env: &'static str,
}

impl Program {
    pub(crate) fn find(&self) -> Result<PathBuf, HarnessError> {
        let fallback: Vec<&Path> = FALLBACK_DIRS.iter().map(Path::new).collect();
        self.find_in(std::env::var_os(self.env), std::env::var_os("PATH"), &fallback)
    }

    /// `env` (the override) if set, else the first executable `name` in the
    /// directories of `path`, then of `fallback`.
    fn find_in(
        &self,
        env: Option<OsString>,
        path: Option<OsString>,
        fallback: &[&Path],
    ) -> Result<PathBuf, HarnessError> {
        let not_installed =
            |searched| HarnessError::NotInstalled { program: self.name, package: self.package, searched };
        if let Some(file) = env.filter(|v| !v.is_empty()) {
            let file = PathBuf::from(file);
            return if is_executable(&file) {
                Ok(file)
            } else {
                Err(not_installed(format!("{}={} (not an executable file)", self.env, file.display())))
            };
        }
        let dirs = path.iter().flat_map(std::env::split_paths).chain(fallback.iter().map(|d| d.to_path_buf()));
        let found = dirs.map(|dir| dir.join(self.name)).find(|file| is_executable(file));
        found.ok_or_else(|| {
            let fallback: Vec<String> = fallback.iter().map(|d| d.display().to_string()).collect();
            not_installed(format!("{} (unset), PATH, {}", self.env, fallback.join(", ")))
        })
    }
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where the kernel picks ephemeral ports (the local ports of outgoing
/// connections, and `bind` to port 0) when `/proc` does not say.
const DEFAULT_EPHEMERAL_LOW: u16 = 32768;
/// The lowest port [`free_ports`] picks: above the servers' default ports
/// (4222, 6222, 8222, 6379), which a service a package started may want.
const LOWEST_PORT: u16 = 20000;
const PICK_ATTEMPTS: usize = 200;

/// `N` distinct ports on 127.0.0.1 that can be bound right now.
///
/// They are picked at random below the kernel's ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), not with `bind` to port 0: a
/// port in that range that a SIGKILLed server has released can be taken
/// meanwhile as the local port of any outgoing connection on the machine,
/// whose TIME_WAIT then keeps the server from binding it again for a minute,
/// and a restart on the same port would fail. Below the range, only a
/// program binding that very port can take it. When the range starts too
/// low to leave room, falls back to port 0.
pub fn free_ports<const N: usize>() -> Result<[u16; N], HarnessError> {
    let high = ephemeral_low().unwrap_or(DEFAULT_EPHEMERAL_LOW);
    if high < LOWEST_PORT.saturating_add(1000) {
        return ephemeral_ports();
    }
    let keys = RandomState::new();
    // Held until all are picked, so that they differ.
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    let mut picked = 0;
    for attempt in 0..PICK_ATTEMPTS {
        if picked == N {
            break;
        }
        let port = LOWEST_PORT + (keys.hash_one(attempt) % u64::from(high - LOWEST_PORT)) as u16;
        // std sets SO_REUSEADDR, as nats-server and redis-server do: what
        // binds here binds for them.
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            listeners.push(listener);
            ports[picked] = port;
            picked += 1;
        }
    }
    if picked < N {
        return Err(HarnessError::Io {
            context: format!("picking {N} free ports on 127.0.0.1 in {LOWEST_PORT}..{high}"),
            source: io::Error::new(io::ErrorKind::AddrInUse, format!("{PICK_ATTEMPTS} random ports tried")),
        });
    }
    Ok(ports)
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> Option<u16> {
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// `N` distinct ports from `bind` to port 0.
fn ephemeral_ports<const N: usize>() -> Result<[u16; N], HarnessError> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_err("binding 127.0.0.1:0"))?;
        *port = listener.local_addr().map_err(io_err("reading a bound port"))?.port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// How long a port must stay unbindable before a restart calls it taken.
///
/// A socket this process closes can stay open a moment longer: a child that
/// another thread is spawning holds copies of every descriptor until its
/// exec closes them (close-on-exec). Not only the harness's own probes:
/// a test's listener, dropped just before a restart, too.
const PORT_SETTLE: Duration = Duration::from_secs(2);
/// Starts of a restarting server that failed to bind, before the port counts
/// as taken.
const RESTART_ATTEMPTS: usize = 3;

/// Fails with [`HarnessError::PortTaken`] if one of `ports` (what each is
/// for) of 127.0.0.1 cannot be bound within [`PORT_SETTLE`].
pub(crate) fn check_ports_free(server: &'static str, ports: &[(u16, &str)]) -> Result<(), HarnessError> {
    let deadline = Instant::now() + PORT_SETTLE;
    for &(port, what) in ports {
        loop {
            match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                Err(e) => {
                    return Err(HarnessError::PortTaken {
                        server,
                        ports: port.to_string(),
                        detail: format!("its {what} is taken by another process (binding it: {e})"),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Starts a server again on its own `ports` with `launch`: fails with
/// [`HarnessError::PortTaken`] if one of them cannot be bound, or the server
/// keeps failing to bind one; never loops for long.
pub(crate) fn restart_on(
    server: &'static str,
    ports: &[(u16, &str)],
    mut launch: impl FnMut() -> Result<(), HarnessError>,
) -> Result<(), HarnessError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        check_ports_free(server, ports)?;
        match launch() {
            Err(HarnessError::Start(failure)) if failure.address_in_use() && attempt < RESTART_ATTEMPTS => {
                thread::sleep(POLL_INTERVAL)
            }
            Err(HarnessError::Start(failure)) if failure.address_in_use() => {
                let ports: Vec<String> = ports.iter().map(|(port, _)| port.to_string()).collect();
                return Err(HarnessError::PortTaken { server, ports: ports.join(" or "), detail: failure.to_string() });
            }
            result => return result,
        }
    }
}

pub(crate) fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), PROBE_CONNECT_TIMEOUT).is_ok()
}

/// A connection for a readiness probe, with bounded reads and writes.
pub(crate) fn probe_connect(port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), PROBE_CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_IO_TIMEOUT))?;
    Ok(stream)
}

/// Runs `command` (stdin from /dev/null, stdout and stderr appended to `log`,
/// which the server also logs to) and polls `ready` with the child's pid
/// until it passes, within [`START_TIMEOUT`]. A server that exits meanwhile,
/// or is not ready in time (it is then SIGKILLed), is a
/// [`HarnessError::Start`] with the end of what it logged.
pub(crate) fn spawn_ready(
    server: &'static str,
    mut command: Command,
    log: &Path,
    mut ready: impl FnMut(u32) -> Result<(), String>,
) -> Result<Child, HarnessError> {
    let line = command_line(&command);
    let log_start = fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let out =
        OpenOptions::new().create(true).append(true).open(log).map_err(io_err(format!("opening {}", log.display())))?;
    let err = out.try_clone().map_err(io_err(format!("opening {}", log.display())))?;
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut child = command.spawn().map_err(|source| HarnessError::Spawn { command: line.clone(), source })?;
    let failure = |outcome: String, exited: bool| {
        HarnessError::Start(Box::new(StartFailure {
            server,
            command: line.clone(),
            outcome,
            exited,
            log: log.to_path_buf(),
            log_tail: log_tail(log, log_start),
        }))
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Err(failure(format!("exited ({status}) before it was ready"), true)),
            Ok(None) => {}
            Err(e) => {
                let _ = kill9(&mut child);
                return Err(failure(format!("could not be waited for: {e}"), false));
            }
        }
        let last = match ready(child.id()) {
            Ok(()) => return Ok(child),
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            let _ = kill9(&mut child);
            return Err(failure(
                format!("was not ready after {START_TIMEOUT:?} (last check: {last}); SIGKILLed"),
                false,
            ));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// A running server process: the child this crate spawned, until it is
/// reaped.
#[derive(Debug, Default)]
pub(crate) struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub(crate) fn set(&mut self, child: Child) {
        self.child = Some(child);
    }

    /// The pid while the process is alive (not a zombie: it may have died by
    /// itself and not been reaped yet).
    pub(crate) fn pid(&self) -> Option<u32> {
        let pid = self.child.as_ref()?.id();
        process_alive(pid).then_some(pid)
    }

    /// SIGTERM, up to `grace` for the process to exit, then SIGKILL; waits
    /// until it has exited and `ports` refuse connections. Nothing if there
    /// is no process.
    pub(crate) fn stop(&mut self, grace: Duration, ports: &[u16]) -> Result<(), HarnessError> {
        self.end(ports, |child| terminate(child, grace))
    }

    /// SIGKILL; waits until the process has exited and `ports` refuse
    /// connections. Nothing if there is no process.
    pub(crate) fn kill9(&mut self, ports: &[u16]) -> Result<(), HarnessError> {
        self.end(ports, kill9)
    }

    fn end(
        &mut self,
        ports: &[u16],
        how: impl FnOnce(&mut Child) -> Result<(), HarnessError>,
    ) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        let result = how(child);
        // Reaped: forget it (a process that would not die is kept, for Drop
        // to try again).
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            self.child = None;
        }
        result?;
        wait_ports_closed(ports)
    }
}

/// SIGTERM through the `kill` program, up to `grace` for the process to
/// exit, then SIGKILL. If `kill` cannot deliver the SIGTERM, the process is
/// SIGKILLed at once and the error returned.
fn terminate(child: &mut Child, grace: Duration) -> Result<(), HarnessError> {
    if child.try_wait().map_err(io_err("waiting for a server process"))?.is_some() {
        return Ok(());
    }
    // The child is not reaped yet, so its pid is still its own.
    let mut kill = Command::new("kill");
    kill.args(["-TERM", "--", &child.id().to_string()]);
    let line = command_line(&kill);
    let sent = match kill.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(HarnessError::Command {
            command: line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim_end().to_owned(),
        }),
        Err(source) => Err(HarnessError::Spawn { command: line, source }),
    };
    if sent.is_ok() && wait_exit(child, grace)? {
        return Ok(());
    }
    kill9(child)?;
    sent
}

/// SIGKILL (`Child::kill`) and a bounded wait for the exit.
fn kill9(child: &mut Child) -> Result<(), HarnessError> {
    child.kill().map_err(io_err(format!("SIGKILLing pid {}", child.id())))?;
    if wait_exit(child, EXIT_TIMEOUT)? {
        Ok(())
    } else {
        Err(HarnessError::Timeout { what: format!("SIGKILLed pid {} to exit", child.id()), waited: EXIT_TIMEOUT })
    }
}

/// Whether `child` exited (and was reaped) within `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> Result<bool, HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().map_err(io_err(format!("waiting for pid {}", child.id())))?.is_some() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

fn wait_ports_closed(ports: &[u16]) -> Result<(), HarnessError> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while let Some(port) = ports.iter().find(|&&p| port_accepts(p)) {
        if Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: format!("port {port} of a stopped server to refuse connections"),
                waited: EXIT_TIMEOUT,
            });
        }
        thread::sleep(POLL_INTERVAL);
    }
    Ok(())
}

/// A process's state letter from `/proc/<pid>/stat` (`R`, `S`, `Z`, …),
/// counted after the command name, which may hold spaces; `None` if gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether `pid` exists and is not a zombie.
pub(crate) fn process_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z' && state != 'X')
}

/// The command as a shell would show it.
pub(crate) fn command_line(command: &Command) -> String {
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

/// The last lines of the log written from byte `from` on.
pub(crate) fn log_tail(path: &Path, from: u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE: Program = Program { name: "hongbao-fake-server", package: "fake-package", env: "HONGBAO_FAKE_SERVER" };

    #[test]
    fn a_missing_binary_names_the_package_and_the_script() {
        let empty = tempfile::tempdir().unwrap();
        let err = FAKE.find_in(None, Some(empty.path().into()), &[empty.path()]).unwrap_err();
        assert!(matches!(err, HarnessError::NotInstalled { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(
                "hongbao-fake-server not found (Debian package `fake-package`; `scripts/test.sh` installs it)"
            ),
            "{err}"
        );
        let err = FAKE.find_in(Some(empty.path().join("nope").into()), None, &[]).unwrap_err();
        assert!(err.to_string().contains("HONGBAO_FAKE_SERVER="), "{err}");
    }

    #[test]
    fn the_override_then_path_then_the_fallback_directories() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let [a, b, c] = [0, 1, 2].map(|i| dirs[i].path());
        let make = |dir: &Path, mode| {
            let file = dir.join(FAKE.name);
            fs::write(&file, "").unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
            file
        };
        // Not executable: skipped.
        make(a, 0o644);
        let in_c = make(c, 0o755);
        let path = std::env::join_paths([a, b]).unwrap();
        assert_eq!(FAKE.find_in(None, Some(path.clone()), &[c]).unwrap(), in_c);
        let in_b = make(b, 0o755);
        assert_eq!(FAKE.find_in(None, Some(path.clone()), &[c]).unwrap(), in_b);
        assert_eq!(FAKE.find_in(Some(in_c.clone().into()), Some(path), &[]).unwrap(), in_c);
    }

    #[test]
    fn stop_escalates_to_sigkill_and_reaps() {
        // Ignores SIGTERM.
        let mut sh = Command::new("sh");
        sh.args(["-c", "trap '' TERM; echo started; while :; do sleep 1; done"]);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let child = spawn_ready("sh", sh, &log, |_| {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("started") {
                Ok(())
            } else {
                Err("no output yet".to_owned())
            }
        })
        .unwrap();
        let pid = child.id();
        let mut proc = Proc::default();
        proc.set(child);
        assert_eq!(proc.pid(), Some(pid));
        proc.stop(Duration::from_millis(300), &[]).unwrap();
        assert_eq!(proc.pid(), None);
        assert!(process_state(pid).is_none(), "pid {pid} still exists");
        // Nothing left to stop.
        proc.stop(STOP_GRACE, &[]).unwrap();
        proc.kill9(&[]).unwrap();
    }

    #[test]
    fn a_server_that_exits_reports_its_status_and_log() {
        let mut sh = Command::new("sh");
        sh.args(["-c", "echo 'bind: Address already in use' >&2; exit 1"]);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        fs::write(&log, "an earlier run\n").unwrap();
        let err = spawn_ready("sh", sh, &log, |_| Err("never".to_owned())).unwrap_err();
        let HarnessError::Start(failure) = &err else { panic!("{err:?}") };
        assert!(failure.exited && failure.address_in_use(), "{failure:?}");
        assert_eq!(failure.log_tail, "bind: Address already in use");
        let text = err.to_string();
        assert!(text.starts_with("sh did not start: `sh -c 'echo"), "{text}");
        assert!(text.contains("exit status: 1"), "{text}");
    }

    #[test]
    fn free_ports_differ_and_taken_ports_are_named() {
        let [a, b, c] = free_ports::<3>().unwrap();
        assert!(a != b && b != c && a != c);
        let high = ephemeral_low().unwrap_or(DEFAULT_EPHEMERAL_LOW);
        assert!([a, b, c].iter().all(|p| (LOWEST_PORT..high).contains(p)), "{a} {b} {c} not below {high}");
        let [d] = ephemeral_ports::<1>().unwrap();
        assert!(d >= high);
        check_ports_free("x", &[(a, "client port")]).unwrap();
        // Held by nobody else (below the ephemeral range), yet perhaps for a
        // moment by a process another test is spawning.
        let listener = (0..100)
            .find_map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, a)).map_err(|_| thread::sleep(POLL_INTERVAL)).ok())
            .unwrap();
        let err = check_ports_free("x", &[(b, "other port"), (a, "client port")]).unwrap_err();
        assert!(err.to_string().starts_with(&format!("cannot restart x on 127.0.0.1 port {a}: its client port")));
        drop(listener);
    }
}
