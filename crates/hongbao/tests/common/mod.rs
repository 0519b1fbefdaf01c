//! Black-box test support: start the real `hongbao` binary on port 0 in a
//! temporary data directory, learn its addresses from the `HONGBAO_READY`
//! line, and talk to it over real sockets.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[allow(unused_imports)]
pub use hongbao_client::{Admin, Client, ClientError};
use hongbao_proto::Reply;
use serde_json::{json, Value};

pub struct Server {
    pub child: Child,
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub admin_addr: SocketAddr,
    pub data: PathBuf,
    pub admin_key: Option<String>,
    /// Extra gateway processes (`--gateways N`).
    pub gateway_pids: Vec<u32>,
    _tmp: Option<tempfile::TempDir>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hongbao")
}

/// The binary as a command, with no store from the environment: a test
/// says which store it runs on (`HONGBAO_STORE` exported in the shell that
/// runs the tests must not move them to a database).
pub fn hongbao() -> Command {
    let mut command = Command::new(bin());
    command.env_remove("HONGBAO_STORE");
    command
}

impl Server {
    /// A dev-mode server (bare user ids, open admin API) in a fresh directory.
    pub fn dev(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Server::start_in(tmp.path(), true, extra);
        s._tmp = Some(tmp);
        s
    }

    /// The arguments of `hongbao serve` on loopback port 0 with its data
    /// in `data`, then `extra`.
    pub fn serve_args<'a>(data: &'a Path, dev: bool, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "serve",
            "--data",
            data.to_str().unwrap(),
            "--tcp",
            "127.0.0.1:0",
            "--ws",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ];
        if dev {
            args.push("--dev");
        }
        args.extend_from_slice(extra);
        args
    }

    pub fn start_in(data: &Path, dev: bool, extra: &[&str]) -> Server {
        let args = Server::serve_args(data, dev, extra);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data.join("server.log")).unwrap();
        let mut cmd = hongbao();
        cmd.args(&args).env("RUST_LOG", "info").stderr(Stdio::from(log));
        let (child, addrs) = hongbao_client::spawn_server(&mut cmd, Duration::from_secs(60)).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(data.join("server.log")).unwrap_or_default();
            panic!("{e}; log:\n{log}")
        });
        let admin_key =
            if dev { None } else { std::fs::read_to_string(data.join("admin.key")).ok().map(|k| k.trim().to_owned()) };
        Server {
            tcp: addrs.tcp,
            ws: addrs.ws,
            admin_addr: addrs.admin,
            data: data.to_owned(),
            admin_key,
            gateway_pids: addrs.gateway_pids,
            child,
            _tmp: None,
        }
    }

    /// A server the caller spawned itself (`data` is not removed).
    pub fn from_parts(child: Child, addrs: hongbao_client::ServerAddrs, data: &Path) -> Server {
        Server {
            tcp: addrs.tcp,
            ws: addrs.ws,
            admin_addr: addrs.admin,
            data: data.to_owned(),
            admin_key: None,
            gateway_pids: addrs.gateway_pids,
            child,
            _tmp: None,
        }
    }

    pub fn admin(&self) -> Admin {
        Admin::new(self.admin_addr, self.admin_key.clone())
    }

    /// Async admin call (ureq is blocking).
    pub async fn post(&self, path: &str, body: Value) -> hongbao_client::AdminResponse {
        let admin = self.admin();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || admin.post(&path, &body)).await.unwrap().unwrap()
    }

    pub async fn put(&self, path: &str, body: Value) -> hongbao_client::AdminResponse {
        let admin = self.admin();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || admin.put(&path, &body)).await.unwrap().unwrap()
    }

    pub async fn get(&self, path: &str) -> hongbao_client::AdminResponse {
        let admin = self.admin();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || admin.get(&path)).await.unwrap().unwrap()
    }

    pub async fn deposit(&self, user: u64, amount_fen: i64) {
        let key = format!("dep-{user}-{amount_fen}-{}", rand_suffix());
        self.post(&format!("/v1/accounts/{user}/deposit"), json!({"amount_fen": amount_fen, "key": key}))
            .await
            .ok()
            .unwrap();
    }

    /// A logged-in TCP client for `user` (dev mode: the token is the id).
    pub async fn client(&self, user: u64) -> Client {
        let (c, welcome) = Client::connect_with_token(self.tcp, &user.to_string()).await.unwrap();
        assert!(matches!(welcome, Reply::Welcome { user: u, .. } if u == user), "{welcome:?}");
        c
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The extra gateway processes (`--gateways N`) stop when their link
        // to the killed server closes; one still there is killed too (if
        // the pid is still a gateway worker: pids are reused).
        for pid in &self.gateway_pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("gateway-worker") {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).stderr(Stdio::null()).status();
            }
        }
    }
}

/// The value of the first `/metrics` sample of `name` whose labels include
/// every one of `labels`; 0 if there is none.
pub async fn metric(server: &Server, name: &str, labels: &[&str]) -> f64 {
    let body = server.get("/metrics").await.body;
    let text = body.as_str().unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

pub fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u64) << 32
}

/// A dev-mode server storing money in the PostgreSQL database at `url`
/// (its keys and log in a fresh directory).
pub fn dev_on_postgres(url: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--store", url];
    args.extend_from_slice(extra);
    Server::dev(&args)
}

/// Runs `hongbao audit --store URL --json`; returns (passed, report).
pub fn audit_store(url: &str) -> (bool, Value) {
    let out = hongbao().args(["audit", "--store", url, "--json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), report)
}

/// Runs `hongbao audit --data DIR --json`; returns (passed, report).
pub fn audit(data: &Path) -> (bool, Value) {
    let out = hongbao().args(["audit", "--data", data.to_str().unwrap(), "--json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), report)
}

/// Sends a lucky packet of `amount_fen` in `count` shares to `group` and
/// returns its id.
pub async fn send_to_group(sender: &Client, amount_fen: i64, count: u32, group: u64, key: &str) -> u64 {
    use hongbao_proto::{Request, SplitKind, Target};
    let reply = sender
        .request(Request::Send {
            amount_fen,
            count,
            kind: SplitKind::Lucky,
            to: Target::Group(group),
            greeting: key.into(),
            key: key.into(),
        })
        .await
        .unwrap();
    let Reply::Sent { packet, .. } = reply else { panic!("{reply:?}") };
    packet
}

/// The race of one packet: user 1 sends `amount_fen` in `k` shares to a
/// group of 10 × k other members, who all connect and then open it at once
/// (`race_open`'s checks). Returns the packet.
pub async fn race_a_group_packet(server: &Server, k: u32, amount_fen: i64, key: &str) -> u64 {
    let clients = 10 * k as u64;
    server.deposit(1, amount_fen).await;
    let members: Vec<u64> = (1..=clients + 1).collect();
    server.put("/v1/groups/5", json!({"members": members})).await.ok().unwrap();
    let sender = server.client(1).await;
    let packet = send_to_group(&sender, amount_fen, k, 5, key).await;
    // Connect everyone first, then open at once.
    let mut racers = Vec::new();
    for user in 2..=clients + 1 {
        racers.push((user, server.client(user).await));
    }
    race_open(racers, packet, k, amount_fen).await;
    packet
}

/// Every client opens `packet` at the same moment (a barrier). Asserts that
/// exactly `count` of them got a share, the shares sum to `amount_fen`, no
/// user got two, and everyone else was told `finished`. Gives the clients
/// back.
pub async fn race_open(clients: Vec<(u64, Client)>, packet: u64, count: u32, amount_fen: i64) -> Vec<(u64, Client)> {
    use hongbao_proto::{ErrorCode, Request};
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(user, client)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let reply = client.request(Request::Open { packet }).await.unwrap();
                (user, reply, client)
            })
        })
        .collect();
    let mut opened = Vec::new();
    let mut clients = Vec::new();
    for task in tasks {
        let (user, reply, client) = task.await.unwrap();
        match reply {
            Reply::Opened { amount_fen, repeat: false, .. } => opened.push((user, amount_fen)),
            Reply::Error { code: ErrorCode::Finished, .. } => {}
            other => panic!("user {user} got {other:?}"),
        }
        clients.push((user, client));
    }
    assert_eq!(opened.len(), count as usize, "exactly count shares");
    assert_eq!(opened.iter().map(|o| o.1).sum::<i64>(), amount_fen, "the shares sum to the packet");
    let mut users: Vec<u64> = opened.iter().map(|o| o.0).collect();
    users.sort_unstable();
    users.dedup();
    assert_eq!(users.len(), count as usize, "no user opened twice");
    clients
}
