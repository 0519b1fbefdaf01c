//! The real binary on PostgreSQL (`--store postgres://…`), against servers
//! these tests start themselves: the race of one packet, and the database
//! server killed with SIGKILL in the middle of a stream of opens.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hongbao_pg_harness::PgServer;
use hongbao_proto::{ErrorCode, Reply, Request};
use serde_json::json;

fn postgres() -> PgServer {
    PgServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// `(packet, user) → amount` of every claim stored.
fn stored_claims(db: &PgServer) -> BTreeMap<(u64, u64), i64> {
    db.psql("SELECT packet, user_id, amount FROM claims")
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.trim().split('|').collect();
            ((f[0].parse().unwrap(), f[1].parse().unwrap()), f[2].parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_packet_opened_by_ten_times_its_count_on_postgres() {
    const K: u32 = 25;
    let db = postgres();
    let server = dev_on_postgres(&db.url(), &[]);
    race_a_group_packet(&server, K, 20_000, "race-pg").await;
    let claims = stored_claims(&db);
    assert_eq!(claims.len(), K as usize, "one claim row per share, in the database");
    assert_eq!(claims.values().sum::<i64>(), 20_000);
    let (passed, report) = audit_store(&db.url());
    assert!(passed, "{report}");
}

/// What a stream of opens was told: `(packet, user) → amount` of every
/// share a client was told it opened, and the refusals meanwhile.
struct StreamOutcome {
    acknowledged: BTreeMap<(u64, u64), i64>,
    refusals: u32,
    slowest_refusal: Duration,
}

/// `OPENERS` clients each open `PACKETS` group packets one after another,
/// retrying a refused open until it is answered. A third of the way in,
/// `interrupt` runs (it takes the database away and brings it back). Checks
/// on the way that no client is told two amounts for one packet, or twice
/// that it opened one for the first time.
async fn stream_of_opens(server: &Server, interrupt: impl AsyncFnOnce()) -> StreamOutcome {
    const OPENERS: u64 = 40;
    const PACKETS: usize = 30;
    server.deposit(1, 10_000_000).await;
    let members: Vec<u64> = (1..=OPENERS + 1).collect();
    server.put("/v1/groups/5", json!({"members": members})).await.ok().unwrap();
    let sender = server.client(1).await;
    let mut packets = Vec::new();
    for i in 0..PACKETS {
        packets.push(send_to_group(&sender, 4_000, OPENERS as u32, 5, &format!("stream-{i}")).await);
    }
    let answered = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for user in 2..=OPENERS + 1 {
        let client = server.client(user).await;
        let (packets, answered) = (packets.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            // (packet, amount, repeat) of each `opened`; slowest refusal seen.
            let mut opened = Vec::new();
            let mut refused = 0u32;
            let mut slowest_refusal = Duration::ZERO;
            for packet in packets {
                let deadline = Instant::now() + Duration::from_secs(90);
                loop {
                    let asked = Instant::now();
                    let reply = client.request(Request::Open { packet }).await.unwrap();
                    answered.fetch_add(1, Ordering::Relaxed);
                    match reply {
                        Reply::Opened { amount_fen, repeat, .. } => {
                            opened.push((packet, amount_fen, repeat));
                            break;
                        }
                        Reply::Error { code: ErrorCode::Unavailable | ErrorCode::Overload, .. } => {
                            refused += 1;
                            slowest_refusal = slowest_refusal.max(asked.elapsed());
                            assert!(Instant::now() < deadline, "user {user}: packet {packet} never opened");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => panic!("user {user} packet {packet}: {other:?}"),
                    }
                }
            }
            (user, opened, refused, slowest_refusal)
        }));
    }
    while answered.load(Ordering::Relaxed) < OPENERS * PACKETS as u64 / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    interrupt().await;
    let mut outcome = StreamOutcome { acknowledged: BTreeMap::new(), refusals: 0, slowest_refusal: Duration::ZERO };
    let mut first_times: BTreeSet<(u64, u64)> = BTreeSet::new();
    for task in tasks {
        let (user, opened, refused, slowest_refusal) = task.await.unwrap();
        outcome.refusals += refused;
        outcome.slowest_refusal = outcome.slowest_refusal.max(slowest_refusal);
        for (packet, amount, repeat) in opened {
            if let Some(before) = outcome.acknowledged.insert((packet, user), amount) {
                assert_eq!(before, amount, "user {user} was told two amounts for packet {packet}");
            }
            if !repeat {
                assert!(first_times.insert((packet, user)), "user {user} opened packet {packet} twice");
            }
        }
    }
    println!("{} opens refused during the outage; slowest refusal {:?}", outcome.refusals, outcome.slowest_refusal);
    assert_eq!(outcome.acknowledged.len(), OPENERS as usize * PACKETS, "every client opened every packet in the end");
    outcome
}

/// Waits until `/health` is 503 and returns its body.
async fn health_unavailable(server: &Server) -> serde_json::Value {
    let admin = server.admin();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let h = admin.get("/health").unwrap();
            if h.status == 503 {
                return h.body;
            }
            assert!(Instant::now() < deadline, "/health never said 503: {h:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
}

/// Issue 11: PostgreSQL killed with SIGKILL while clients open packets, then
/// restarted. Meanwhile opens are refused quickly with `unavailable`, and
/// `/health` is 503 naming the storage failure; afterwards the server serves
/// again by itself. Every share a client was told it opened is stored once,
/// with that amount; no share is stored that nobody was told of; the audit
/// passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_during_a_stream_of_opens_loses_nothing_acknowledged() {
    let db = std::sync::Mutex::new(postgres());
    let url = db.lock().unwrap().url();
    // The packets are set up as fast as they can be sent.
    let server = dev_on_postgres(&url, &["--sends-per-s", "0"]);
    let outcome = stream_of_opens(&server, async || {
        db.lock().unwrap().kill9().unwrap();
        let health = health_unavailable(&server).await;
        assert_eq!(health["status"], "unavailable", "{health}");
        assert!(health["storage"]["reason"].as_str().is_some_and(|r| r.contains("postgresql")), "{health}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        db.lock().unwrap().restart().unwrap();
    })
    .await;
    assert!(outcome.refusals > 0, "the outage fell in the stream");
    // A refusal is an answer, not a hang (the writer fails fast while storage is down).
    assert!(outcome.slowest_refusal < Duration::from_secs(10), "slowest refusal {:?}", outcome.slowest_refusal);
    let db = db.into_inner().unwrap();
    assert_eq!(stored_claims(&db), outcome.acknowledged, "stored exactly what clients were told, once each");
    let (passed, report) = audit_store(&db.url());
    assert!(passed, "{report}");
}

/// Issue 11: a primary with a synchronous streaming standby; hongbao is
/// given both hosts with `target_session_attrs=read-write`. The primary is
/// killed with SIGKILL in the middle of a stream of opens and the standby
/// promoted: hongbao carries on against the new primary by itself, and
/// everything acknowledged (committed on the primary and, synchronously,
/// received by the standby) is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_synchronous_standby_loses_nothing_acknowledged() {
    let primary = std::sync::Mutex::new(postgres());
    let standby = {
        let p = primary.lock().unwrap();
        let standby = PgServer::start_standby(&p, "standby1").unwrap_or_else(|e| panic!("{e}"));
        p.set_synchronous_standby("standby1").unwrap();
        p.wait_for_sync_standby("standby1").unwrap();
        standby
    };
    let url = format!(
        "postgres://hongbao@127.0.0.1:{},127.0.0.1:{}/hongbao?target_session_attrs=read-write",
        primary.lock().unwrap().port(),
        standby.port()
    );
    let server = dev_on_postgres(&url, &["--sends-per-s", "0"]);
    let outcome = stream_of_opens(&server, async || {
        primary.lock().unwrap().kill9().unwrap();
        health_unavailable(&server).await;
        standby.promote().unwrap();
    })
    .await;
    assert!(outcome.refusals > 0, "the failover fell in the stream");
    assert_eq!(stored_claims(&standby), outcome.acknowledged, "the new primary holds exactly what clients were told");
    let (passed, report) = audit_store(&standby.url());
    assert!(passed, "{report}");
}

/// `hongbao archive` from the command line: a date before any packet moves
/// nothing, a malformed date is refused with the database's reason, and a
/// SQLite store is told archiving needs PostgreSQL.
#[test]
fn the_archive_command_reports_what_it_moved_and_refuses_bad_input() {
    let db = postgres();
    let server = dev_on_postgres(&db.url(), &[]);
    drop(server);
    let run = |args: &[&str]| hongbao().arg("archive").args(args).output().unwrap();
    let nothing = run(&["--store", &db.url(), "--before", "2000-01-01"]);
    assert!(nothing.status.success(), "{nothing:?}");
    assert_eq!(
        String::from_utf8_lossy(&nothing.stdout).trim(),
        "nothing to archive before 2000-01-01\nhot from 2000-01-01: the date asked for"
    );
    let bad = run(&["--store", &db.url(), "--before", "yesterday-ish"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("yesterday-ish"), "{bad:?}");
    let sqlite = run(&["--store", "sqlite:./data", "--before", "2000-01-01"]);
    assert!(!sqlite.status.success());
    assert!(String::from_utf8_lossy(&sqlite.stderr).contains("postgres://"), "{sqlite:?}");
}

/// An idle server notices its database is gone (no request needs to try
/// it first), says so on `/health` and in `/metrics`, and says it is back
/// once the database is, all by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_reports_its_database_down_and_back() {
    let mut db = postgres();
    let server = dev_on_postgres(&db.url(), &[]);
    assert_eq!(server.get("/health").await.status, 200);
    db.kill9().unwrap();
    let health = health_unavailable(&server).await;
    assert!(health["storage"]["reason"].as_str().is_some_and(|r| r.contains("postgresql")), "{health}");
    let metrics = server.get("/metrics").await.body.to_string();
    assert!(metrics.contains("hongbao_storage_up 0"), "{metrics}");
    db.restart().unwrap();
    let admin = server.admin();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin.get("/health").unwrap().status != 200 {
            assert!(Instant::now() < deadline, "/health never came back");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    server.deposit(3, 100).await;
}
