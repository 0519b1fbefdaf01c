//! Storage failures against the real binary: a lock another process holds
//! on the database, and a full disk. The server must say so (`/health` 503,
//! `/metrics`, a documented `unavailable` error, quickly), acknowledge
//! nothing it did not commit, and recover by itself when storage returns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A dev-mode server on `data`, its log in `log_dir` (never on the disk
/// that is made to fill up: a log that cannot be written must not be the
/// failure under test). With `ignore_xfsz` it ignores SIGXFSZ, so a file
/// size limit makes writes fail with EFBIG instead of killing it.
fn start(data: &Path, log_dir: &Path, ignore_xfsz: bool) -> Server {
    let log = std::fs::File::create(log_dir.join("server.log")).unwrap();
    let args = Server::serve_args(data, true, &[]);
    let mut cmd = if ignore_xfsz {
        let mut sh = Command::new("sh");
        sh.env_remove("HONGBAO_STORE");
        sh.arg("-c").arg("trap '' XFSZ; exec \"$0\" \"$@\"").arg(bin()).args(args);
        sh
    } else {
        let mut cmd = hongbao();
        cmd.args(args);
        cmd
    };
    cmd.env("RUST_LOG", "info").stderr(Stdio::from(log));
    let (child, addrs) = hongbao_client::spawn_server(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!("{e}; log:\n{}", std::fs::read_to_string(log_dir.join("server.log")).unwrap_or_default())
    });
    Server::from_parts(child, addrs, data)
}

fn deposit(admin: &Admin, user: u64, amount_fen: i64, key: &str) -> hongbao_client::AdminResponse {
    admin.post(&format!("/v1/accounts/{user}/deposit"), &json!({"amount_fen": amount_fen, "key": key})).unwrap()
}

fn balance(admin: &Admin, user: u64) -> i64 {
    admin.get(&format!("/v1/accounts/{user}")).unwrap().ok().unwrap()["balance_fen"].as_i64().unwrap()
}

fn wait_for_health(admin: &Admin, status: u16, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let health = admin.get("/health").unwrap();
        if health.status == status {
            return health.body;
        }
        assert!(Instant::now() < deadline, "/health never became {status}: {health:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lock_held_elsewhere_for_two_seconds_delays_deposits_and_loses_nothing() {
    let server = Server::dev(&[]);
    let admin = server.admin();
    assert_eq!(deposit(&admin, 1, 100, "before").status, 200);
    // As `BEGIN IMMEDIATE` in the sqlite3 shell would.
    let lock = rusqlite::Connection::open(server.data.join("hongbao.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let during = {
        let admin = server.admin();
        std::thread::spawn(move || (deposit(&admin, 1, 50, "during"), Instant::now()))
    };
    std::thread::sleep(Duration::from_secs(2));
    let released_at = Instant::now();
    lock.execute_batch("COMMIT").unwrap();
    let (response, answered_at) = during.join().unwrap();
    assert_eq!(response.status, 200, "a transient lock is waited out, not failed: {response:?}");
    assert!(answered_at >= released_at, "answered only after the lock was released");
    assert_eq!(admin.get("/health").unwrap().status, 200);
    assert_eq!(balance(&admin, 1), 150);
    drop(server);
}

/// The disk is made full under the running server: a small tmpfs filled up
/// (as root), else a file size limit on the server process (prlimit).
enum FullDisk {
    Tmpfs { mount: PathBuf, filler: PathBuf },
    FileSizeLimit { pid: u32 },
}

impl FullDisk {
    fn fill(&self, data: &Path) {
        match self {
            FullDisk::Tmpfs { mount, filler } => {
                // Leave a few pages: the next commits run out of space.
                let free = fs_free_bytes(mount);
                let size = free.saturating_sub(16 * 1024);
                std::fs::write(filler, vec![0u8; size as usize]).unwrap();
            }
            FullDisk::FileSizeLimit { pid } => {
                let largest = ["hongbao.db", "hongbao.db-wal"]
                    .iter()
                    .filter_map(|f| std::fs::metadata(data.join(f)).ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0);
                prlimit(*pid, &format!("{}:", largest + 8 * 1024));
            }
        }
    }

    fn free(&self) {
        match self {
            FullDisk::Tmpfs { filler, .. } => std::fs::remove_file(filler).unwrap(),
            FullDisk::FileSizeLimit { pid } => prlimit(*pid, "unlimited:"),
        }
    }
}

fn prlimit(pid: u32, fsize: &str) {
    let status = Command::new("prlimit").arg("--pid").arg(pid.to_string()).arg(format!("--fsize={fsize}")).status();
    assert!(status.unwrap().success(), "prlimit --fsize={fsize} failed");
}

fn fs_free_bytes(path: &Path) -> u64 {
    let out = Command::new("df").arg("-B1").arg("--output=avail").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Option<Mounted> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir)
        .output()
        .ok()?;
    out.status.success().then(|| Mounted(dir.to_owned()))
}

/// Issue 9: a full disk used to stop the writer for good while `/health`
/// said ok. Now money-moving requests get `unavailable` quickly, `/health`
/// and `/metrics` say why, nothing unacknowledged appears, and when space
/// returns the server takes deposits again by itself; the audit passes.
#[test]
fn a_full_disk_fails_money_fast_and_recovers_by_itself() {
    let root = tempfile::tempdir().unwrap();
    let (logs, data) = (root.path().join("logs"), root.path().join("data"));
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let mounted = mount_tmpfs(&data, "8m");
    let server = start(&data, &logs, mounted.is_none());
    let disk = match &mounted {
        Some(m) => FullDisk::Tmpfs { mount: m.0.clone(), filler: data.join("filler") },
        None => FullDisk::FileSizeLimit { pid: server.child.id() },
    };
    eprintln!("full disk by {}", if mounted.is_some() { "a filled 8 MiB tmpfs" } else { "a file size limit" });
    let admin = server.admin();
    assert_eq!(deposit(&admin, 1, 1, "first").status, 200);
    disk.fill(&data);

    // Deposits until storage refuses; each one is acknowledged or not.
    let mut acknowledged = 0i64;
    let mut refused = Vec::new();
    for i in 0..2_000 {
        let key = format!("k{i}");
        let r = deposit(&admin, 1, 10, &key);
        match r.status {
            200 => acknowledged += 10,
            503 => {
                assert_eq!(r.body["error"]["code"], "unavailable", "{r:?}");
                refused.push(key);
                if refused.len() == 3 {
                    break;
                }
            }
            other => panic!("deposit {i}: HTTP {other}: {}", r.body),
        }
    }
    assert!(!refused.is_empty(), "storage never filled up");
    let health = wait_for_health(&admin, 503, Duration::from_secs(10));
    assert_eq!(health["status"], "unavailable");
    assert!(health["storage"]["reason"].as_str().is_some_and(|r| !r.is_empty()), "{health}");
    let metrics = admin.get("/metrics").unwrap().body.to_string();
    assert!(metrics.contains("hongbao_storage_up 0"), "{metrics}");
    // Refused without trying storage: an attempt would first wait out the
    // 5 s busy timeout (a bound on behaviour, not a speed figure).
    let started = Instant::now();
    assert_eq!(deposit(&admin, 1, 10, "while-failing").status, 503);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    refused.push("while-failing".into());
    // Reads still work; only what was acknowledged is there.
    assert_eq!(balance(&admin, 1), 1 + acknowledged);

    disk.free();
    wait_for_health(&admin, 200, Duration::from_secs(30));
    for key in &refused {
        assert_eq!(deposit(&admin, 1, 10, key).status, 200, "retry of {key} after recovery");
    }
    assert_eq!(balance(&admin, 1), 1 + acknowledged + 10 * refused.len() as i64, "each deposit exactly once");
    let metrics = admin.get("/metrics").unwrap().body.to_string();
    assert!(metrics.contains("hongbao_storage_up 1"), "{metrics}");
    drop(server);
    let (passed, report) = audit(&data);
    assert!(passed, "{report}");
    drop(mounted);
}
