//! A cluster of separate processes on one machine: two `hongbao set`
//! processes, each with its own PostgreSQL database, and three `hongbao
//! gateway` processes, started from one `cluster.toml` and driven through
//! real sockets. A SET's users are `user % 2`; each test gives its packets
//! and wins to users of the SET that owns them, but for one packet sent to,
//! and opened by, a user of the other SET (whose credit waits in the
//! outbox: the transport between SETs is not run here).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{audit_store, hongbao, race_open, rand_suffix, send_to_group, Admin, Client};
use hongbao_pg_harness::PgServer;
use hongbao_proto::{ErrorCode, PushBody, Reply, Request, ShakeResult, SplitKind, Target};
use serde_json::{json, Value};

const SETS: u64 = 2;
/// Liveness bound on every wait (never a speed assertion).
const PATIENCE: Duration = Duration::from_secs(30);

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Starts `command` with stdout piped and its log in `log`; returns the
/// child and the JSON of its `HONGBAO_READY` line.
fn spawn_ready(mut command: Command, log: &Path) -> (Child, Value) {
    let log_file = std::fs::File::create(log).unwrap();
    let mut child = command.stdout(Stdio::piped()).stderr(log_file).stdin(Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let (Some(json), Some(tx)) = (line.strip_prefix("HONGBAO_READY "), tx.take()) {
                let _ = tx.send(serde_json::from_str::<Value>(json).unwrap());
            }
        }
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(ready) => (child, ready),
        Err(_) => {
            let _ = child.kill();
            panic!("no ready line; log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
        }
    }
}

struct SetProcess {
    child: Child,
    admin: SocketAddr,
    url: String,
}

struct GatewayProcess {
    child: Child,
    tcp: SocketAddr,
}

/// The processes are killed on drop; the database with the directory.
struct Cluster {
    dir: tempfile::TempDir,
    file: PathBuf,
    /// Held for its drop: the server stops with the cluster.
    _pg: PgServer,
    sets: Vec<SetProcess>,
    gateways: Vec<GatewayProcess>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.sets.iter_mut().map(|s| &mut s.child).chain(self.gateways.iter_mut().map(|g| &mut g.child)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    /// Two SETs (one database each on one PostgreSQL server), `gateways` gateways.
    fn start(gateways: usize) -> Cluster {
        let pg = PgServer::start().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("secrets = \"secrets\"\ndev = true\n");
        let mut urls = Vec::new();
        for set in 0..SETS {
            let db = format!("set{set}");
            pg.create_database(&db).unwrap();
            let url = pg.url_for(&db);
            text += &format!(
                "[[set]]\nlink = \"{}\"\nadmin = \"{}\"\nstore = \"{url}\"\nshards = 2\n",
                free_port(),
                free_port()
            );
            urls.push(url);
        }
        let file = dir.path().join("cluster.toml");
        std::fs::write(&file, text).unwrap();
        let keys = hongbao().args(["keys", "--cluster", file.to_str().unwrap()]).output().unwrap();
        assert!(keys.status.success(), "{}", String::from_utf8_lossy(&keys.stderr));
        let mut cluster = Cluster { dir, file, _pg: pg, sets: Vec::new(), gateways: Vec::new() };
        for (set, url) in urls.into_iter().enumerate() {
            let (child, ready) = cluster.spawn_set(set);
            let admin = ready["admin"].as_str().unwrap().parse().unwrap();
            cluster.sets.push(SetProcess { child, admin, url });
        }
        for g in 0..gateways {
            cluster.gateways.push(cluster.spawn_gateway(g));
        }
        cluster
    }

    fn spawn_set(&self, set: usize) -> (Child, Value) {
        let mut command = hongbao();
        command.args(["set", "--cluster", self.file.to_str().unwrap(), "--set", &set.to_string()]);
        let (child, ready) = spawn_ready(command, &self.dir.path().join(format!("set{set}.log")));
        assert_eq!(ready["set"], json!(set), "{ready}");
        (child, ready)
    }

    fn spawn_gateway(&self, g: usize) -> GatewayProcess {
        let mut command = hongbao();
        command.args([
            "gateway",
            "--cluster",
            self.file.to_str().unwrap(),
            "--tcp",
            "127.0.0.1:0",
            "--ws",
            "127.0.0.1:0",
        ]);
        let (child, ready) = spawn_ready(command, &self.dir.path().join(format!("gateway{g}.log")));
        assert_eq!(ready["sets_linked"], json!(SETS), "every SET linked at start: {ready}");
        GatewayProcess { child, tcp: ready["tcp"].as_str().unwrap().parse().unwrap() }
    }

    fn home(user: u64) -> usize {
        (user % SETS) as usize
    }

    fn admin(&self, set: usize) -> Admin {
        Admin::new(self.sets[set].admin, None)
    }

    async fn call(&self, set: usize, method: &'static str, path: &str, body: Value) -> Value {
        let (admin, owned) = (self.admin(set), path.to_owned());
        let response = tokio::task::spawn_blocking(move || match method {
            "POST" => admin.post(&owned, &body),
            "PUT" => admin.put(&owned, &body),
            _ => admin.get(&owned),
        })
        .await
        .unwrap()
        .unwrap();
        response.ok().unwrap_or_else(|e| panic!("{method} {path} on SET {set}: {e}"))
    }

    /// A deposit on the user's home SET.
    async fn deposit(&self, user: u64, amount_fen: i64) {
        let key = format!("dep-{user}-{}", rand_suffix());
        self.call(
            Self::home(user),
            "POST",
            &format!("/v1/accounts/{user}/deposit"),
            json!({"amount_fen": amount_fen, "key": key}),
        )
        .await;
    }

    /// `user` logged in through gateway `g`.
    async fn client(&self, g: usize, user: u64) -> Client {
        let (client, welcome) = Client::connect_with_token(self.gateways[g].tcp, &user.to_string()).await.unwrap();
        assert!(matches!(welcome, Reply::Welcome { user: u, .. } if u == user), "{welcome:?}");
        client
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

async fn balance(client: &Client) -> i64 {
    match client.request(Request::Balance).await.unwrap() {
        Reply::Balance { balance_fen } => balance_fen,
        other => panic!("{other:?}"),
    }
}

/// The race of one packet on each SET, its racers spread over three
/// gateways: exactly K opens each, balances read through other gateways,
/// pushes from a SET reaching its users on every gateway, each database's
/// audit passing; and a packet of one SET opened by a user of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_set_races_its_packets_through_three_gateways_and_audits_clean() {
    const K: u32 = 5;
    const AMOUNT: i64 = 1_000;
    let cluster = Cluster::start(3);
    for set in 0..SETS {
        let sender = 100 + set;
        cluster.deposit(sender, AMOUNT).await;
        // Ten racers a share, all homed on this SET, over the three gateways.
        let members: Vec<u64> = (0..10 * u64::from(K) + 1).map(|i| 1_000 + i * SETS + set).chain([sender]).collect();
        cluster.call(set as usize, "PUT", "/v1/groups/5", json!({"members": members})).await;
        let sending = cluster.client(0, sender).await;
        let packet = send_to_group(&sending, AMOUNT, K, 5, &format!("race-{set}")).await;
        assert_eq!(hongbao_core::ids::set_of(packet), set as u8, "the packet lives on its sender's SET");
        let mut racers = Vec::new();
        for (i, &user) in members.iter().filter(|&&u| u != sender).enumerate() {
            racers.push((user, cluster.client(i % 3, user).await));
        }
        let racers = race_open(racers, packet, K, AMOUNT).await;
        // Each winner's balance, asked through another gateway, is its share.
        let detail = cluster.call(set as usize, "GET", &format!("/v1/packets/{packet}"), Value::Null).await;
        let claims = detail["claims"].as_array().unwrap();
        assert_eq!(claims.len(), K as usize, "{detail}");
        for (i, claim) in claims.iter().enumerate() {
            let user = claim["user"].as_u64().unwrap();
            let other = cluster.client((i + 1) % 3, user).await;
            assert_eq!(balance(&other).await, claim["amount_fen"].as_i64().unwrap());
        }
        // A persistent notice from the SET reaches its users on each gateway.
        let online: Vec<u64> = racers.iter().take(3).map(|(u, _)| *u).collect();
        let pushed = cluster
            .call(
                set as usize,
                "POST",
                "/v1/push",
                json!({"target": {"users": online}, "persistent": true, "topic": "t", "text": "x"}),
            )
            .await;
        assert_eq!(pushed["stored"], json!(3), "{pushed}");
        for (user, mut client) in racers.into_iter().take(3) {
            // The packet's stored `packet_received` came on connect, first.
            loop {
                let push = client.next_push(PATIENCE).await.unwrap_or_else(|| panic!("user {user} got no notice"));
                match push.body {
                    PushBody::Notice { .. } => break,
                    PushBody::PacketReceived { .. } => {}
                    _ => panic!("{push:?}"),
                }
            }
        }
    }

    // Across SETs: a send from SET 0 to a user of SET 1 is taken, and that
    // user opens it through any gateway (routed by the packet's id to SET
    // 0). The share is SET 1's to pay, through the outbox: SET 0's audit
    // finds it in transit, with its outbox row.
    let sender = cluster.client(1, 100).await;
    cluster.deposit(100, 200).await;
    let reply = sender
        .request(Request::Send {
            amount_fen: 100,
            count: 1,
            kind: SplitKind::Lucky,
            to: Target::User(101),
            greeting: "x".into(),
            key: "cross".into(),
        })
        .await
        .unwrap();
    let Reply::Sent { packet: across, .. } = reply else { panic!("{reply:?}") };
    assert_eq!(hongbao_core::ids::set_of(across), 0);
    let visitor = cluster.client(2, 101).await;
    let reply = visitor.request(Request::Open { packet: across }).await.unwrap();
    assert!(matches!(reply, Reply::Opened { amount_fen: 100, repeat: false, .. }), "{reply:?}");
    // Another SET's packet the visitor was not sent: not eligible, as anyone.
    let own = send_to_group(&sender, 100, 1, 5, "own").await;
    let reply = visitor.request(Request::Open { packet: own }).await.unwrap();
    assert!(matches!(reply, Reply::Error { code: ErrorCode::NotEligible, .. }), "{reply:?}");
    // A packet id naming no SET of the cluster is simply not found.
    let reply = visitor.request(Request::Open { packet: 5 << 48 | 1 << 40 | 7 }).await.unwrap();
    assert!(matches!(reply, Reply::Error { code: ErrorCode::NotFound, .. }), "{reply:?}");

    for set in &cluster.sets {
        let (passed, report) = audit_store(&set.url);
        assert!(passed, "{report}");
    }
}

/// A stream of keyed wins on SET 1, whose process is killed with SIGKILL in
/// the middle and started again: its users' requests are answered
/// `unavailable` (not left waiting) while SET 0's users go on; the same
/// connections work again once it is back; and every acknowledged win is in
/// the balances afterwards (a win whose answer was lost is settled by
/// asking again with its key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_killed_mid_stream_answers_unavailable_and_loses_nothing_acknowledged() {
    let mut cluster = Cluster::start(3);
    let funder = 1; // homed on SET 1
    cluster.deposit(funder, 1_000_000).await;
    let campaign = cluster
        .call(1, "POST", "/v1/campaigns", json!({"funder": funder, "total_fen": 1_000_000, "rule": {"range": {"min_fen": 1, "max_fen": 9}}, "rate_per_s": 400, "key": "c"}))
        .await["id"]
        .as_u64()
        .unwrap();
    cluster.call(1, "POST", &format!("/v1/campaigns/{campaign}/start"), json!({})).await;
    let users: Vec<u64> = (0..12).map(|i| 201 + 2 * i).collect();
    let mut clients = Vec::new();
    for (i, &user) in users.iter().enumerate() {
        clients.push((user, cluster.client(i % 3, user).await));
    }
    let bystander = cluster.client(0, 300).await; // homed on SET 0

    // Each shaker shakes with fresh keys until told to stop, and keeps what it
    // was told per key.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(user, client)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut answers: Vec<(String, Reply)> = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("{user}-{n}");
                    n += 1;
                    let reply = client
                        .request_timeout(Request::Shake { campaign, key: Some(key.clone()) }, PATIENCE)
                        .await
                        .unwrap_or_else(|e| panic!("user {user}: no answer to shake {key}: {e}"));
                    answers.push((key, reply));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (user, client, answers)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.sets[1].child.kill().unwrap();
    cluster.sets[1].child.wait().unwrap();
    let killed = Instant::now();
    // SET 0 goes on meanwhile, through the same gateway.
    assert_eq!(balance(&bystander).await, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (child, _) = cluster.spawn_set(1);
    cluster.sets[1].child = child;
    let restarted = killed.elapsed();
    // Shake on until every shaker has been answered by the new process.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = cluster.call(1, "GET", "/v1/stats", Value::Null).await;
        if stats["connections"].as_u64() == Some(users.len() as u64) && stats["shake_wins"].as_u64() > Some(20) {
            break;
        }
        assert!(Instant::now() < deadline, "the gateways never linked the restarted SET again: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut unavailable = 0;
    let mut won_acknowledged = 0;
    for task in tasks {
        let (user, client, answers) = task.await.unwrap();
        let mut expected = 0;
        for (key, reply) in answers {
            let settled = match reply {
                Reply::Shake(ShakeResult::Won { amount_fen, .. }) => {
                    won_acknowledged += 1;
                    Some(amount_fen)
                }
                Reply::Shake(_) => None,
                Reply::Error { code: ErrorCode::Unavailable, .. } => {
                    unavailable += 1;
                    // The answer was lost, not necessarily the win: ask again.
                    match client.request(Request::Shake { campaign, key: Some(key.clone()) }).await.unwrap() {
                        Reply::Shake(ShakeResult::Won { amount_fen, .. }) => Some(amount_fen),
                        _ => None,
                    }
                }
                other => panic!("user {user}, key {key}: {other:?}"),
            };
            expected += settled.unwrap_or(0);
        }
        assert_eq!(balance(&client).await, expected, "user {user}: every acknowledged win, once");
    }
    println!(
        "SET 1 down for {restarted:?}: {unavailable} shakes answered unavailable, {won_acknowledged} wins acknowledged"
    );
    assert!(unavailable > 0, "the shakers met the dead SET");
    assert!(won_acknowledged > 0);
    for set in &cluster.sets {
        let (passed, report) = audit_store(&set.url);
        assert!(passed, "{report}");
    }
    let _ = cluster.log("set1");
}

/// A gateway killed with SIGKILL: its users reconnect through another, and
/// their home SETs reach them there (the dead gateway's registrations are
/// gone); the other gateways' users never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_its_users_move_to_another_and_pushes_follow() {
    let mut cluster = Cluster::start(3);
    let users: Vec<u64> = (10..16).collect();
    let mut clients = Vec::new();
    for (i, &user) in users.iter().enumerate() {
        clients.push((user, i % 3, cluster.client(i % 3, user).await));
    }
    cluster.gateways[1].child.kill().unwrap();
    cluster.gateways[1].child.wait().unwrap();
    let mut moved = Vec::new();
    for (user, g, client) in clients {
        if g == 1 {
            assert!(
                client.wait_closed(PATIENCE).await.is_some() || client.is_closed(),
                "user {user}'s connection ends"
            );
            moved.push((user, cluster.client(2, user).await));
        } else {
            assert_eq!(balance(&client).await, 0, "user {user} on gateway {g} goes on");
            moved.push((user, client));
        }
    }
    // Each SET holds exactly its users' live connections again.
    for set in 0..SETS as usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let stats = cluster.call(set, "GET", "/v1/stats", Value::Null).await;
            if stats["connections"].as_u64() == Some(users.len() as u64 / SETS) {
                break;
            }
            assert!(Instant::now() < deadline, "SET {set} keeps the dead gateway's connections: {stats}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for (user, mut client) in moved {
        let set = Cluster::home(user);
        let pushed = cluster
            .call(set, "POST", "/v1/push", json!({"target": {"user": user}, "topic": "t", "text": "moved"}))
            .await;
        assert_eq!(pushed["delivered"], json!(1), "user {user}: {pushed}");
        assert!(client.next_push(PATIENCE).await.is_some(), "user {user} got the push");
    }
}
