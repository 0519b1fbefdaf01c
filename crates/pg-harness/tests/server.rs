//! These need PostgreSQL installed (`scripts/test.sh` installs it); without it
//! they fail with the message that says so.

use std::fs;
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use hongbao_pg_harness::{HarnessError, PgOptions, PgServer};

/// Panics with the error's message (not its Debug form), so that a machine
/// without PostgreSQL fails with the NotInstalled text.
fn ok<T>(result: Result<T, HarnessError>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(')')?.1.trim_start().starts_with(|c| c != 'Z' && c != 'X')))
        .unwrap_or(false)
}

fn refuses(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err()
}

#[test]
fn rows_committed_before_kill9_survive_restart() {
    let t = Instant::now();
    let mut pg = ok(PgServer::start());
    let started = t.elapsed();
    let port = pg.port();
    assert_eq!(pg.url(), format!("postgres://hongbao@127.0.0.1:{port}/hongbao"));
    assert_eq!(pg.url_for("other"), format!("postgres://hongbao@127.0.0.1:{port}/other"));
    assert!(pg.is_running());
    assert_eq!(ok(pg.psql("SHOW fsync; SHOW synchronous_commit; SHOW wal_level;")), "on\non\nreplica\n");

    ok(pg.psql("CREATE TABLE t (id int PRIMARY KEY, note text); INSERT INTO t VALUES (1, 'a'), (2, 'b|c');"));
    assert_eq!(ok(pg.psql("SELECT id, note FROM t ORDER BY id")), "1|a\n2|b|c\n");

    let pid = pg.postmaster_pid().expect("postmaster.pid");
    assert!(alive(pid));
    let t = Instant::now();
    ok(pg.kill9());
    let killed = t.elapsed();
    assert!(!alive(pid), "postmaster {pid} survived kill9");
    assert!(!pg.is_running());
    assert!(refuses(port));
    // SIGKILL leaves the pid file behind.
    assert_eq!(pg.postmaster_pid(), Some(pid));
    let err = pg.psql("SELECT 1").unwrap_err();
    assert!(matches!(err, HarnessError::Command { .. }), "{err}");

    let t = Instant::now();
    ok(pg.restart());
    let restarted = t.elapsed();
    assert_eq!(pg.port(), port);
    assert_ne!(pg.postmaster_pid(), Some(pid));
    assert_eq!(ok(pg.psql("SELECT id, note FROM t ORDER BY id")), "1|a\n2|b|c\n");
    let log = fs::read_to_string(pg.log_path()).unwrap();
    assert!(
        log.contains("database system was interrupted") || log.contains("redo starts"),
        "no crash recovery:\n{log}"
    );

    // The restarted server takes writes, and a kill9 right after a commit
    // keeps that commit too. This time the killed postmaster is reaped
    // before the restart (when its adopter reaps at all), so PostgreSQL
    // itself replaces the stale postmaster.pid.
    ok(pg.psql("INSERT INTO t VALUES (3, 'c')"));
    let pid = pg.postmaster_pid().unwrap();
    ok(pg.kill9());
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(20));
    }
    let reaped = t.elapsed();
    assert_eq!(pg.postmaster_pid(), Some(pid));
    ok(pg.restart());
    assert_eq!(ok(pg.psql("SELECT count(*) FROM t")), "3\n");
    eprintln!("start {started:?}, kill9 {killed:?}, restart after kill9 {restarted:?}, reaped after {reaped:?}");
}

#[test]
fn stop_restart_and_drop_leave_nothing_behind() {
    let mut pg = ok(PgServer::start());
    ok(pg.create_database("second"));
    ok(pg.psql_in("second", "CREATE TABLE u (x int); INSERT INTO u VALUES (7);"));

    ok(pg.stop());
    assert!(!pg.is_running());
    assert_eq!(pg.postmaster_pid(), None, "a clean stop removes postmaster.pid");
    ok(pg.stop()); // Stopping a stopped server is nothing.
    assert!(matches!(pg.kill9(), Err(HarnessError::NotRunning { .. })));

    ok(pg.restart());
    ok(pg.restart()); // Restarting a running server stops it first.
    assert_eq!(ok(pg.psql_in("second", "SELECT x FROM u")), "7\n");

    let pid = pg.postmaster_pid().unwrap();
    let port = pg.port();
    let dir = pg.data_dir().parent().unwrap().to_owned();
    assert!(dir.join("server.log").is_file());
    drop(pg);
    assert!(!alive(pid), "drop left postmaster {pid} running");
    assert!(refuses(port));
    assert!(!dir.exists(), "drop left {}", dir.display());
}

#[test]
fn extra_settings_apply_and_a_failed_start_shows_the_log() {
    let pg = ok(PgOptions::new().setting("work_mem", "8MB").setting("cluster_name", "it's").start());
    assert_eq!(ok(pg.psql("SHOW work_mem; SHOW cluster_name;")), "8MB\nit's\n");
    let err = pg.psql("SELECT * FROM missing").unwrap_err();
    assert!(err.to_string().contains("relation \"missing\" does not exist"), "{err}");
    drop(pg);

    let err = PgServer::start_with(PgOptions::new().setting("shared_buffers", "lots")).unwrap_err();
    let HarnessError::Start(ref failure) = err else { panic!("{err}") };
    assert!(failure.log_tail.contains("shared_buffers"), "{err}");
    assert!(err.to_string().contains("pg_ctl") && err.to_string().contains("last lines of"), "{err}");
    assert!(!failure.data_dir.exists(), "a failed start left {}", failure.data_dir.display());

    let err = PgServer::start_with(PgOptions::new().setting("fsync = off\nx", "1")).unwrap_err();
    assert!(matches!(err, HarnessError::Invalid { .. }), "{err}");
}

#[test]
fn synchronous_standby_takes_over_after_primary_kill9() {
    let t = Instant::now();
    let mut primary = ok(PgServer::start());
    ok(primary.psql("CREATE TABLE t (id int PRIMARY KEY)"));
    let standby = ok(PgServer::start_standby(&primary, "standby1"));
    assert_ne!(standby.port(), primary.port());
    assert_eq!(ok(standby.psql("SELECT pg_is_in_recovery()")), "t\n");

    ok(primary.set_synchronous_standby("standby1"));
    ok(primary.wait_for_sync_standby("standby1"));
    // A synchronous commit returns once the standby has the WAL on disk.
    ok(primary.psql("INSERT INTO t VALUES (42)"));
    ok(primary.kill9());

    ok(standby.promote());
    assert_eq!(ok(standby.psql("SELECT id FROM t")), "42\n");
    // The promoted server has no synchronous standby of its own: it commits.
    ok(standby.psql("INSERT INTO t VALUES (43)"));
    assert_eq!(ok(standby.psql("SELECT count(*) FROM t")), "2\n");
    eprintln!("failover test {:?}", t.elapsed());
}
