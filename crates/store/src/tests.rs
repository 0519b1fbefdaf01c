//! Writer, reader and audit against real stores: a SQLite file in a temp
//! directory, and a PostgreSQL server each test starts for itself. One suite:
//! every test of the writer's contract runs on both (`on_both_stores!`).

use hongbao_core::campaign::{AmountRule, CampaignSpec, CampaignStatus};
use hongbao_core::cross::{CrossBody, CrossKind, CrossMessage};
use hongbao_core::ids::make_packet_id;
use hongbao_core::ledger::Account;
use hongbao_core::packet::Recipients;
use hongbao_core::split::SplitKind;

use crate::ops::*;
use crate::*;

/// A store a test runs against, and whatever keeps it alive.
enum TestStore {
    Sqlite(tempfile::TempDir),
    Postgres(hongbao_pg_harness::PgServer),
}

impl TestStore {
    fn sqlite() -> TestStore {
        TestStore::Sqlite(tempfile::tempdir().unwrap())
    }

    fn postgres() -> TestStore {
        TestStore::Postgres(hongbao_pg_harness::PgServer::start().unwrap_or_else(|e| panic!("{e}")))
    }

    fn location(&self) -> StoreLocation {
        match self {
            TestStore::Sqlite(dir) => StoreLocation::Sqlite(dir.path().to_owned()),
            TestStore::Postgres(server) => StoreLocation::postgres(&server.url()).unwrap(),
        }
    }

    fn open(&self) -> Store {
        Store::open_at(&self.location()).unwrap()
    }

    /// Closes a store opened here, and waits until it has let go of its
    /// lock, so the same store can be opened again.
    fn close(store: Store) {
        let Store { writer, reader, writer_thread } = store;
        runtime().block_on(writer.run(Close)).unwrap();
        drop((writer, reader));
        writer_thread.join().unwrap();
    }

    fn audit(&self) -> AuditReport {
        audit(&self.location()).unwrap()
    }

    /// Runs SQL on the store behind the server's back: `sqlite` or
    /// `postgres`, whichever this store speaks.
    fn tamper(&self, sqlite: &str, postgres: &str) {
        match self {
            TestStore::Sqlite(dir) => {
                rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap().execute_batch(sqlite).unwrap();
            }
            TestStore::Postgres(server) => {
                server.psql(postgres).unwrap();
            }
        }
    }
}

/// Each named test, taking a `TestStore`, run once on SQLite and once on
/// PostgreSQL.
macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test]
            fn $test() {
                super::$test(super::TestStore::sqlite())
            })*
        }
        mod on_postgres {
            $(#[test]
            fn $test() {
                super::$test(super::TestStore::postgres())
            })*
        }
    };
}

on_both_stores!(
    money_moves_are_committed_idempotent_and_audited,
    campaigns_fund_win_and_refund_the_rest_once,
    audit_reports_tampering_precisely,
    groups_are_bounded_and_an_over_limit_change_touches_nothing,
    a_full_queue_refuses_at_once_and_queues_nothing,
    opens_committed_together_update_their_packet_as_one_at_a_time_would,
    messages_are_capped_per_user_and_kind_and_acks_free_the_senders_budget,
    uniqueness_lives_in_the_database,
    a_foreign_open_pays_transit_and_writes_its_outbox_credit_in_the_same_commit,
    a_failed_batch_keeps_no_claim_transit_or_outbox_row,
    a_cross_message_is_applied_once,
    the_unpublished_outbox_is_read_through_its_index,
);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn new_packet(id: u64, sender: u64, total_fen: i64, count: u32) -> NewPacket {
    NewPacket {
        id,
        sender,
        kind: SplitKind::Lucky,
        total_fen,
        count,
        recipients: Recipients::users([2, 3, 4]),
        greeting: "hi".into(),
        created_ms: 1,
        expires_ms: 2,
    }
}

fn money_moves_are_committed_idempotent_and_audited(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let deposit = |amount_fen, key: &str| Deposit { user: 1, amount_fen, key: key.into(), at_ms: 1 };
    runtime().block_on(async {
        let dep = w.run(deposit(1000, "d1")).await.unwrap();
        assert_eq!(dep, MoneyMoved { balance_fen: 1000, repeat: false });
        let again = w.run(deposit(1000, "d1")).await.unwrap();
        assert_eq!(again, MoneyMoved { balance_fen: 1000, repeat: true });
        assert_eq!(w.run(deposit(5, "d1")).await, Err(OpError::KeyConflict));
        assert!(matches!(
            w.run(Withdraw { user: 1, amount_fen: 5000, key: "w1".into(), at_ms: 1 }).await,
            Err(OpError::InsufficientFunds { balance_fen: 1000, needed_fen: 5000 })
        ));

        let id = make_packet_id(0, 0, 1);
        let fund = |packet, key: &str, notice| FundPacket { packet, key: key.into(), notice, away: vec![], at_ms: 1 };
        let funded = w.run(fund(new_packet(id, 1, 300, 3), "p1", vec![1])).await.unwrap();
        let Funded::New { messages } = funded else { panic!("{funded:?}") };
        assert_eq!(messages.len(), 3);
        let retry = w.run(fund(new_packet(id + 1, 1, 300, 3), "p1", vec![])).await.unwrap();
        assert!(matches!(retry, Funded::Repeat(ExistingPacket { id: i, .. }) if i == id));

        let open = |user, amount_fen, remaining_before_fen| OpenShare {
            packet: id,
            user,
            amount_fen,
            seq: 0,
            at_ms: 1,
            best_luck: None,
            remaining_before_fen,
            cross_to: None,
        };
        // Decided on a state storage does not have: refused, nothing moves.
        assert!(matches!(w.run(open(2, 100, 250)).await, Err(OpError::Stale(_))));
        assert_eq!(w.run(FindClaim { packet: id, user: 2 }).await.unwrap(), None);
        w.run(open(2, 100, 300)).await.unwrap();
        assert_eq!(w.run(FindClaim { packet: id, user: 2 }).await.unwrap(), Some(100));
        let refunded = w.run(Refund { packet: id, sender: 1, amount_fen: 200, at_ms: 3, notice: vec![2] }).await;
        assert!(matches!(refunded, Ok(Refunded { message: Some(_) })));
        // A second refund finds nothing to refund.
        assert!(w.run(Refund { packet: id, sender: 1, amount_fen: 0, at_ms: 4, notice: vec![] }).await.is_err());
    });
    assert_eq!(store.reader.balance(1).unwrap(), 900);
    assert_eq!(store.reader.balance(2).unwrap(), 100);
    let p = store.reader.packet(make_packet_id(0, 0, 1)).unwrap().unwrap();
    assert_eq!((p.remaining_fen, p.refunded_fen, p.claims.len()), (0, 200, 1));
    let report = at.audit();
    assert!(report.passed(), "{:?}", report.violations);
    assert_eq!(report.totals.deposits_fen, 1000);
}

fn campaigns_fund_win_and_refund_the_rest_once(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    runtime().block_on(async {
        w.run(Deposit { user: 9, amount_fen: 10_000, key: "d".into(), at_ms: 0 }).await.unwrap();
        let spec = CampaignSpec {
            funder: 9,
            total_fen: 5000,
            rule: AmountRule::Count { packets: 10 },
            rate_per_s: 10,
            win_cap_per_user: None,
        };
        let CampaignCreated { id, .. } = w
            .run(CreateCampaign { spec: spec.clone(), key: "c".into(), at_ms: 0, set: 0, parts: vec![] })
            .await
            .unwrap();
        let pk = make_packet_id(0, 1, 5);
        let win = ShakeWin { campaign: id, packet: pk, user: 3, amount_fen: 700, at_ms: 1, key: Some("s1".into()) };
        assert_eq!(w.run(win).await.unwrap(), ShakeWon::Won);
        let retry =
            ShakeWin { campaign: id, packet: pk + 1, user: 3, amount_fen: 50, at_ms: 2, key: Some("s1".into()) };
        let first = FirstWin { campaign: id, packet: pk, amount_fen: 700 };
        assert_eq!(w.run(retry).await.unwrap(), ShakeWon::Repeat(first));
        // The same packet won again (only after a commit that reported
        // failure but reached the disk): refused as a decision; the writer
        // and the next op go on.
        let again = ShakeWin { campaign: id, packet: pk, user: 4, amount_fen: 700, at_ms: 2, key: None };
        assert!(matches!(w.run(again).await, Err(OpError::Stale(_))));
        assert_eq!(w.run(FindShakeWin { user: 3, key: "s1".into() }).await.unwrap(), Some(first));
        assert_eq!(w.run(FindShakeWin { user: 3, key: "s2".into() }).await.unwrap(), None);
        let close = CloseCampaign { id, status: CampaignStatus::Stopped, at_ms: 3, home: None };
        assert_eq!(w.run(close.clone()).await.unwrap(), CampaignClosed { refunded_fen: 4300 });
        assert_eq!(w.run(close).await.unwrap(), CampaignClosed { refunded_fen: 0 });
    });
    let row = store.reader.campaign(1).unwrap().unwrap();
    assert_eq!((row.won, row.won_fen, row.refunded_fen, row.escrow_fen), (1, 700, 4300, 0));
    assert_eq!(store.reader.balance(9).unwrap(), 10_000 - 700);
    assert!(at.audit().passed());
}

fn audit_reports_tampering_precisely(at: TestStore) {
    {
        let store = at.open();
        runtime().block_on(store.writer.run(Deposit { user: 1, amount_fen: 50, key: "d".into(), at_ms: 0 })).unwrap();
    }
    let sql = "UPDATE accounts SET balance = balance + 1 WHERE id = 1";
    at.tamper(sql, sql);
    let report = at.audit();
    assert!(!report.passed());
    assert!(report.violations.iter().any(|v| v.contains("account 1")), "{:?}", report.violations);
}

fn groups_are_bounded_and_an_over_limit_change_touches_nothing(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let change = |change| ChangeGroup { group: 1, change };
    runtime().block_on(async {
        assert_eq!(w.run(change(GroupChange::Replace(vec![3, 1, 2]))).await.unwrap(), vec![1, 2, 3]);
        let too_many: Vec<u64> = (10..1000).collect();
        assert!(w.run(change(GroupChange::Add(too_many))).await.is_err());
        assert_eq!(w.run(change(GroupChange::Remove(vec![2, 7]))).await.unwrap(), vec![1, 3]);
        assert_eq!(w.run(change(GroupChange::Add(vec![2]))).await.unwrap(), vec![1, 2, 3]);
    });
    assert_eq!(store.reader.groups().unwrap()[&1], vec![1, 2, 3]);
}

/// Holds the writer inside a completion until the returned sender is used
/// (or dropped), so that what is submitted meanwhile waits in its queue.
fn hold_writer(w: &Writer) -> std::sync::mpsc::Sender<()> {
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    assert!(w.try_submit(Barrier, move |_| {
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
    }));
    held_rx.recv().unwrap();
    release_tx
}

fn a_full_queue_refuses_at_once_and_queues_nothing(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let release_tx = hold_writer(&w);
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut refused = None;
    for _ in 0..hongbao_core::limits::WRITER_QUEUE_MAX + 1 {
        let (tx, rx) = std::sync::mpsc::channel();
        if !w.try_submit(Barrier, move |r| drop(tx.send(r))) {
            refused = Some(rx.try_recv().expect("told at once"));
            break;
        }
        queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    assert_eq!(refused, Some(Err(OpError::QueueFull)));
    assert_eq!(queued.load(std::sync::atomic::Ordering::Relaxed), hongbao_core::limits::WRITER_QUEUE_MAX);
    release_tx.send(()).unwrap();
    runtime().block_on(w.run(Barrier)).unwrap();
}

fn opens_committed_together_update_their_packet_as_one_at_a_time_would(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let (a, b) = (make_packet_id(0, 0, 1), make_packet_id(0, 0, 2));
    runtime().block_on(async {
        w.run(Deposit { user: 1, amount_fen: 1000, key: "d".into(), at_ms: 0 }).await.unwrap();
        for (id, total, count, key) in [(a, 300, 3, "a"), (b, 100, 2, "b")] {
            let p = new_packet(id, 1, total, count);
            w.run(FundPacket { packet: p, key: key.into(), notice: vec![], away: vec![], at_ms: 0 }).await.unwrap();
        }
    });
    // Hold the writer inside a completion so every op below joins one batch.
    let release_tx = hold_writer(&w);
    let (replies_tx, replies) = std::sync::mpsc::channel::<Result<(), OpError>>();
    let open = |packet, user, amount_fen, seq, best_luck, remaining_before_fen| {
        let tx = replies_tx.clone();
        let op = OpenShare { packet, user, amount_fen, seq, at_ms: 5, best_luck, remaining_before_fen, cross_to: None };
        assert!(w.try_submit(op, move |r| tx.send(r).unwrap()));
    };
    open(a, 2, 100, 0, None, 300);
    open(b, 2, 40, 0, None, 100);
    open(a, 3, 50, 1, None, 200);
    // Reads packet b's row: b's open must be written before it.
    let tx = replies_tx.clone();
    let refund = Refund { packet: b, sender: 1, amount_fen: 60, at_ms: 6, notice: vec![] };
    assert!(w.try_submit(refund, move |r| tx.send(r.map(drop)).unwrap()));
    open(a, 4, 150, 2, Some(4), 150);
    drop(replies_tx);
    let commits = w.stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    release_tx.send(()).unwrap();
    let results: Vec<_> = replies.iter().collect();
    assert_eq!(results, vec![Ok(()); 5]);
    let after = w.stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - commits, 1, "one batch for all five ops");
    let pa = store.reader.packet(a).unwrap().unwrap();
    assert_eq!((pa.remaining_fen, pa.claims.len(), pa.status.as_str()), (0, 3, "finished"));
    let pb = store.reader.packet(b).unwrap().unwrap();
    assert_eq!((pb.remaining_fen, pb.refunded_fen, pb.claims.len(), pb.status.as_str()), (0, 60, 1, "refunded"));
    let report = at.audit();
    assert!(report.passed(), "{:?}", report.violations);
}

/// Holds the database's write lock from another connection (as the sqlite3
/// shell's `BEGIN IMMEDIATE` would) until told to let go.
fn hold_write_lock(dir: &std::path::Path) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _ = release_rx.recv();
        conn.execute_batch("COMMIT").unwrap();
    });
    (release_tx, holder)
}

#[test]
fn a_lock_held_elsewhere_for_a_moment_is_waited_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let w = store.writer.clone();
    let (release, holder) = hold_write_lock(dir.path());
    let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let seen = released.clone();
    let deposit = Deposit { user: 1, amount_fen: 50, key: "d".into(), at_ms: 0 };
    assert!(w.try_submit(deposit, move |r| {
        done_tx.send((r, seen.load(std::sync::atomic::Ordering::SeqCst))).unwrap();
    }));
    // Well inside the busy timeout: the writer waits instead of failing.
    std::thread::sleep(std::time::Duration::from_millis(2_000));
    released.store(true, std::sync::atomic::Ordering::SeqCst);
    release.send(()).unwrap();
    holder.join().unwrap();
    let (result, after_release) = done_rx.recv().unwrap();
    assert_eq!(result, Ok(MoneyMoved { balance_fen: 50, repeat: false }));
    assert!(after_release, "committed only once the other connection let go");
    assert!(!w.is_failing());
    assert_eq!(store.reader.balance(1).unwrap(), 50);
}

/// Issue 9: a storage error used to stop the writer for good while the
/// server kept answering. Now the batch fails, everything after it fails
/// fast while storage does, and the writer comes back by itself.
#[test]
fn a_failing_storage_fails_fast_and_the_writer_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let w = store.writer.clone();
    let rt = runtime();
    rt.block_on(w.run(Deposit { user: 1, amount_fen: 100, key: "before".into(), at_ms: 0 })).unwrap();
    let (release, holder) = hold_write_lock(dir.path());
    // Longer than the busy timeout: this batch fails, none of it applied.
    let failed = rt.block_on(w.run(Deposit { user: 1, amount_fen: 7, key: "during".into(), at_ms: 0 }));
    assert!(matches!(failed, Err(OpError::Storage(_))), "{failed:?}");
    assert!(w.is_failing());
    let failure = w.failure().expect("the failure is reported");
    assert!(failure.reason.contains("locked"), "{failure:?}");
    // Meanwhile every operation is refused at once, not after the timeout.
    let started = std::time::Instant::now();
    let refused = rt.block_on(w.run(Deposit { user: 1, amount_fen: 9, key: "fast".into(), at_ms: 0 }));
    assert!(matches!(refused, Err(OpError::Storage(_))), "{refused:?}");
    assert!(started.elapsed() < std::time::Duration::from_millis(crate::sqlite::schema::BUSY_TIMEOUT_MS / 2));
    release.send(()).unwrap();
    holder.join().unwrap();
    // Recovers by itself within the backoff; nothing of the failed batch stuck.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while w.is_failing() {
        assert!(std::time::Instant::now() < deadline, "the writer never recovered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(w.failure(), None);
    let again = rt.block_on(w.run(Deposit { user: 1, amount_fen: 7, key: "during".into(), at_ms: 0 })).unwrap();
    assert_eq!(again, MoneyMoved { balance_fen: 107, repeat: false }, "the failed deposit never happened");
    assert_eq!(store.reader.balance(1).unwrap(), 107);
    let report = audit_dir(dir.path()).unwrap();
    assert!(report.passed(), "{:?}", report.violations);
}

/// Issue 9: the data directory was created 0755 and the database files
/// 0644. They are private now, also when an older directory was wider.
#[test]
fn the_data_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let fresh = root.path().join("a/b/data");
    {
        let store = Store::open(&fresh).unwrap();
        runtime().block_on(store.writer.run(Deposit { user: 1, amount_fen: 5, key: "d".into(), at_ms: 0 })).unwrap();
        for file in [DB_FILE, "hongbao.db-wal", "hongbao.db-shm", LOCK_FILE] {
            assert_eq!(mode(&fresh.join(file)), 0o600, "{file}");
        }
    }
    assert_eq!(mode(&fresh), 0o700);
    let old = root.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(old.join(DB_FILE), b"").unwrap();
    std::fs::set_permissions(old.join(DB_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(Store::open(&old).unwrap());
    assert_eq!((mode(&old), mode(&old.join(DB_FILE))), (0o700, 0o600));
}

fn messages_are_capped_per_user_and_kind_and_acks_free_the_senders_budget(at: TestStore) {
    use hongbao_core::limits::PENDING_SYSTEM_MESSAGES_PER_USER_MAX as KEPT;
    let rt = runtime();
    let first_ids = {
        let store = at.open();
        let w = store.writer.clone();
        let ids =
            rt.block_on(w.run(StoreMessages { users: vec![7; KEPT + 5], body: b"hi".to_vec(), at_ms: 1 })).unwrap();
        let ids: Vec<u64> = ids.into_iter().map(|(_, id)| id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend");
        let kept = store.reader.messages(7, KEPT * 2).unwrap();
        assert_eq!(kept.len(), KEPT, "the oldest beyond the cap are dropped");
        assert_eq!(kept[0].0, ids[5], "the newest are kept");
        // A user's notice is acked once; a second ack finds nothing.
        rt.block_on(w.run(Deposit { user: 1, amount_fen: 100, key: "d".into(), at_ms: 0 })).unwrap();
        let packet = NewPacket { recipients: Recipients::User(7), ..new_packet(make_packet_id(0, 0, 1), 1, 10, 1) };
        let funded = rt
            .block_on(w.run(FundPacket { packet, key: "p".into(), notice: vec![9], away: vec![], at_ms: 2 }))
            .unwrap();
        let Funded::New { messages } = funded else { panic!("{funded:?}") };
        let notice = messages[0].1;
        let system_first = store.reader.messages(7, 1).unwrap();
        assert_ne!(system_first[0].0, notice, "system messages come first");
        assert!(rt.block_on(w.run(AckMessage { user: 7, msg: notice })).unwrap());
        assert!(!rt.block_on(w.run(AckMessage { user: 7, msg: notice })).unwrap());
        assert!(!rt.block_on(w.run(AckMessage { user: 8, msg: ids[KEPT] })).unwrap(), "another user's id");
        drop(w);
        TestStore::close(store);
        ids
    };
    // After a restart new ids are above every id handed out before.
    let store = at.open();
    let again = rt.block_on(store.writer.run(StoreMessages { users: vec![7], body: vec![], at_ms: 3 })).unwrap();
    assert!(again[0].1 > *first_ids.last().unwrap());
    assert!(at.audit().passed());
    if let TestStore::Postgres(server) = &at {
        // The counts the caps are checked against follow every insert, cut and ack.
        let per_owner = "SELECT user_id, kind, count(*) FROM messages GROUP BY 1, 2 ORDER BY 1, 2";
        let counted = "SELECT user_id, kind, n FROM message_counts WHERE n > 0 ORDER BY 1, 2";
        assert_eq!(server.psql(per_owner).unwrap(), server.psql(counted).unwrap());
    }
}

/// One claim per user and packet is the database's rule, not only the
/// shard's: a claim stored behind the writer's back makes the open that
/// repeats it fail its whole batch, and nothing of that batch is kept.
fn uniqueness_lives_in_the_database(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let rt = runtime();
    let id = make_packet_id(0, 0, 1);
    rt.block_on(async {
        w.run(Deposit { user: 1, amount_fen: 1000, key: "d".into(), at_ms: 0 }).await.unwrap();
        w.run(FundPacket {
            packet: new_packet(id, 1, 300, 3),
            key: "p".into(),
            notice: vec![],
            away: vec![],
            at_ms: 0,
        })
        .await
        .unwrap();
    });
    at.tamper(
        &format!("INSERT INTO claims (packet, user, seq, amount, at_ms) VALUES ({id}, 2, 7, 1, 0)"),
        &format!(
            "INSERT INTO claims (day, packet, user_id, seq, amount, at_ms) VALUES ({}, {id}, 2, 7, 1, 0)",
            hongbao_core::ids::day_of(id)
        ),
    );
    let open = OpenShare {
        packet: id,
        user: 2,
        amount_fen: 100,
        seq: 0,
        at_ms: 1,
        best_luck: None,
        remaining_before_fen: 300,
        cross_to: None,
    };
    let refused = rt.block_on(w.run(open.clone()));
    assert!(matches!(refused, Err(OpError::Storage(_))), "{refused:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while w.is_failing() {
        assert!(std::time::Instant::now() < deadline, "the writer never recovered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(store.reader.balance(2).unwrap(), 0, "nothing of the failed batch was kept");
    assert_eq!(store.reader.packet(id).unwrap().unwrap().remaining_fen, 300);
    rt.block_on(w.run(OpenShare { user: 3, ..open })).unwrap();
    assert_eq!(store.reader.balance(3).unwrap(), 100);
}

/// Two servers never write one PostgreSQL database: the second is refused
/// while the first runs, and gets in once it is gone.
#[test]
fn a_postgres_database_has_one_writer() {
    let at = TestStore::postgres();
    let first = at.open();
    match Store::open_at(&at.location()) {
        Err(StoreError::Locked(what)) => assert!(what.contains("127.0.0.1"), "{what}"),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    TestStore::close(first);
    at.open();
}

/// Issue 11: the PostgreSQL server killed with SIGKILL in the middle of a
/// stream of keyed deposits, then restarted. Every answer told the truth:
/// what was acknowledged is stored exactly once, what was refused is not
/// stored at all (a batch whose COMMIT was cut off was read back before it
/// was answered), and the writer came back by itself.
#[test]
fn a_postgres_server_killed_mid_stream_loses_nothing_acknowledged() {
    let mut at = TestStore::postgres();
    let store = at.open();
    let w = store.writer.clone();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    const DEPOSITS: u64 = 3_000;
    let acked_so_far = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked_counter = acked_so_far.clone();
    let answers = rt.spawn(async move {
        let mut answers = Vec::with_capacity(DEPOSITS as usize);
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..DEPOSITS {
            let (w, acked) = (w.clone(), acked_counter.clone());
            pending.spawn(async move {
                let r =
                    w.run(Deposit { user: 1 + i % 50, amount_fen: 1 + i as i64, key: format!("k{i}"), at_ms: i }).await;
                if r.is_ok() {
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                (i, r)
            });
            if i % 100 == 99 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        while let Some(answer) = pending.join_next().await {
            answers.push(answer.unwrap());
        }
        answers
    });
    while acked_so_far.load(std::sync::atomic::Ordering::Relaxed) < DEPOSITS / 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let TestStore::Postgres(server) = &mut at else { unreachable!() };
    server.kill9().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    server.restart().unwrap();
    let answers = rt.block_on(answers).unwrap();
    let acked: std::collections::BTreeSet<u64> = answers.iter().filter(|(_, r)| r.is_ok()).map(|(i, _)| *i).collect();
    for (i, r) in &answers {
        if let Err(e) = r {
            assert!(matches!(e, OpError::Storage(_)), "deposit {i}: {e:?}");
        }
    }
    assert!(!acked.is_empty() && acked.len() < DEPOSITS as usize, "the kill fell mid-stream: {} acked", acked.len());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.writer.is_failing() {
        assert!(std::time::Instant::now() < deadline, "the writer never recovered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let stored: Vec<u64> = server
        .psql("SELECT substr(key, 2) FROM idempotency WHERE scope = 'deposit' ORDER BY 1")
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let stored_set: std::collections::BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(stored.len(), stored_set.len(), "no deposit stored twice");
    assert_eq!(stored_set, acked, "stored exactly what was acknowledged");
    let expected: i64 = acked.iter().map(|i| 1 + *i as i64).sum();
    let total: i64 = (1..=50).map(|u| store.reader.balance(u).unwrap()).sum();
    assert_eq!(total, expected);
    let report = at.audit();
    assert!(report.passed(), "{:?}", report.violations);
}

/// Wall-clock ms at the start of packet-id day `day`.
fn day_ms(day: u32) -> u64 {
    (hongbao_core::ids::EPOCH_UNIX_DAY + u64::from(day)) * 86_400_000
}

/// The packet ids of `n` packets made on `day` by shard 0.
fn ids_on_day(day: u32, n: u64) -> Vec<u64> {
    (1..=n).map(|i| make_packet_id(0, 0, (u64::from(day) << hongbao_core::ids::DAY_SHIFT) | i)).collect()
}

/// Issue 11: a lookup of a packet (or of its claims) by id reads one
/// partition of one day, however many days and hash partitions exist.
#[test]
fn a_lookup_by_packet_id_reads_one_partition() {
    let at = TestStore::postgres();
    let store = at.open();
    let today = hongbao_core::ids::day_of_unix_ms(crate::unix_ms());
    let mut ids = ids_on_day(today, 3);
    // An id with every SET and shard bit set: its day is still read from
    // the sequence alone.
    let last_set = hongbao_core::sets::SETS_MAX - 1;
    ids.push(make_packet_id(last_set, 255, (u64::from(today) << hongbao_core::ids::DAY_SHIFT) | 1));
    runtime().block_on(async {
        store.writer.run(Deposit { user: 1, amount_fen: 1000, key: "d".into(), at_ms: 0 }).await.unwrap();
        for (i, id) in ids.iter().enumerate() {
            let fund = FundPacket {
                packet: new_packet(*id, 1, 100, 2),
                key: format!("p{i}"),
                notice: vec![],
                away: vec![],
                at_ms: 0,
            };
            store.writer.run(fund).await.unwrap();
        }
    });
    let TestStore::Postgres(server) = &at else { unreachable!() };
    let partitions: usize =
        server.psql("SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE c.relname LIKE 'packets_d%_h%'").unwrap().trim().parse().unwrap();
    assert!(partitions >= 16, "several days of 4 hash partitions each: {partitions}");
    let id = ids[3];
    let day = hongbao_core::ids::day_of(id);
    assert_eq!(day, today);
    let plan = server
        .psql(&format!(
            "PREPARE by_id(bigint, int) AS {}; EXPLAIN (COSTS OFF) EXECUTE by_id({id}, {day});",
            crate::postgres::reader::packet_by_id_sql()
        ))
        .unwrap();
    let is_partition = |w: &&str| {
        w.strip_prefix("packets_d").and_then(|rest| rest.split_once("_h")).is_some_and(|(date, hash)| {
            date.len() == 8 && [date, hash].iter().all(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
        })
    };
    let read: std::collections::BTreeSet<&str> =
        plan.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(is_partition).collect();
    assert_eq!(read.len(), 1, "one partition read:\n{plan}");
    let hash: usize = server
        .psql(&format!("SELECT tableoid::regclass FROM packets WHERE id = {id} AND day = {day}"))
        .unwrap()
        .trim()
        .rsplit("_h")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(read.iter().next().unwrap().ends_with(&format!("_h{hash}")), "the packet's own partition:\n{plan}");
    assert_eq!(store.reader.packet(id).unwrap().unwrap().id, id);
}

/// Issue 11: `archive` moves a settled day out of the hot tables, keeps a
/// day that still has an open packet, never touches today, and everything
/// archived is still read, still keyed, and still in the audit.
#[test]
fn archiving_moves_settled_days_and_the_audit_still_counts_every_fen() {
    let at = TestStore::postgres();
    let store = at.open();
    let w = store.writer.clone();
    let today = hongbao_core::ids::day_of_unix_ms(crate::unix_ms());
    let settled = ids_on_day(today - 10, 1)[0];
    let still_open = ids_on_day(today - 9, 1)[0];
    let todays = ids_on_day(today, 1)[0];
    let rt = runtime();
    rt.block_on(async {
        w.run(Deposit { user: 1, amount_fen: 1000, key: "d".into(), at_ms: 0 }).await.unwrap();
        for (id, key) in [(settled, "settled"), (still_open, "open"), (todays, "today")] {
            w.run(FundPacket {
                packet: new_packet(id, 1, 100, 2),
                key: key.into(),
                notice: vec![],
                away: vec![],
                at_ms: 0,
            })
            .await
            .unwrap();
        }
        let open = |packet, user, amount_fen, seq, best_luck, remaining_before_fen| OpenShare {
            packet,
            user,
            amount_fen,
            seq,
            at_ms: 1,
            best_luck,
            remaining_before_fen,
            cross_to: None,
        };
        w.run(open(settled, 2, 60, 0, None, 100)).await.unwrap();
        w.run(open(settled, 3, 40, 1, Some(2), 40)).await.unwrap();
        let spec = CampaignSpec {
            funder: 1,
            total_fen: 100,
            rule: AmountRule::Count { packets: 1 },
            rate_per_s: 1,
            win_cap_per_user: None,
        };
        let CampaignCreated { id: campaign, .. } = w
            .run(CreateCampaign { spec, key: "c".into(), at_ms: day_ms(today - 10), set: 0, parts: vec![] })
            .await
            .unwrap();
        let won = ids_on_day(today - 10, 2)[1];
        let win = ShakeWin { campaign, packet: won, user: 4, amount_fen: 100, at_ms: 1, key: Some("s".into()) };
        w.run(win).await.unwrap();
    });
    let before = at.audit();
    assert!(before.passed(), "{:?}", before.violations);
    let tomorrow = "2099-01-01";
    // The campaign is still open: its packets may be won later, into their
    // own days, so nothing from its first day on moves.
    let report = archive(&at.location(), tomorrow).unwrap();
    assert!(report.archived.is_empty() && report.hot_because.contains("campaign"), "{report:?}");
    rt.block_on(w.run(CloseCampaign { id: 1, status: CampaignStatus::Stopped, at_ms: 2, home: None })).unwrap();
    let report = archive(&at.location(), tomorrow).unwrap();
    let date = |day: u32| {
        let TestStore::Postgres(server) = &at else { unreachable!() };
        server.psql(&format!("SELECT to_char(DATE '2020-01-01' + {day}, 'YYYY-MM-DD')")).unwrap().trim().to_owned()
    };
    assert_eq!(report.archived, vec![ArchivedDay { date: date(today - 10), packets: 1, claims: 2, shake_wins: 1 }]);
    // Yesterday and today stay whatever date is asked for.
    assert_eq!((report.hot_from.as_str(), report.hot_because.contains("yesterday")), (date(today - 1).as_str(), true));
    assert_eq!(report.kept, vec![KeptDay { date: date(today - 9), open_packets: 1 }]);
    let TestStore::Postgres(server) = &at else { unreachable!() };
    let hot: i64 = server
        .psql(&format!("SELECT count(*) FROM packets WHERE day = {}", today - 10))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cold: i64 = server
        .psql(&format!("SELECT count(*) FROM packets_archive WHERE day = {}", today - 10))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!((hot, cold), (0, 1));
    // Still read, still keyed, still audited.
    let p = store.reader.packet(settled).unwrap().unwrap();
    assert_eq!((p.claims.len(), p.status.as_str()), (2, "finished"));
    rt.block_on(async {
        assert_eq!(w.run(FindClaim { packet: settled, user: 3 }).await.unwrap(), Some(40));
        let again = FundPacket {
            packet: new_packet(todays + 1, 1, 100, 2),
            key: "settled".into(),
            notice: vec![],
            away: vec![],
            at_ms: 0,
        };
        assert!(matches!(w.run(again).await.unwrap(), Funded::Repeat(ExistingPacket { id, .. }) if id == settled));
        let repeat =
            ShakeWin { campaign: 1, packet: todays + 2, user: 4, amount_fen: 1, at_ms: 2, key: Some("s".into()) };
        assert!(matches!(w.run(repeat).await.unwrap(), ShakeWon::Repeat(_)));
        // The hot days go on.
        w.run(Refund { packet: still_open, sender: 1, amount_fen: 100, at_ms: 3, notice: vec![] }).await.unwrap();
    });
    let after = at.audit();
    assert!(after.passed(), "{:?}", after.violations);
    assert_eq!((after.totals.packets, after.totals.claims, after.totals.shake_wins), (3, 2, 1));
    // Again: the refunded day is settled now; today never moves.
    let report = archive(&at.location(), tomorrow).unwrap();
    assert_eq!(report.archived.iter().map(|d| d.date.clone()).collect::<Vec<_>>(), vec![date(today - 9)]);
    assert!(report.kept.is_empty());
    assert!(at.audit().passed());
}

/// This store as SET 0 of 2: user 2 (homed here) sends packet `id` to
/// users 3 (homed on SET 1) and 4; answers the stored message ids.
fn send_across(w: &Writer, rt: &tokio::runtime::Runtime, id: u64) -> Vec<(u64, u64)> {
    rt.block_on(async {
        w.run(Deposit { user: 2, amount_fen: 1000, key: "d".into(), at_ms: 0 }).await.unwrap();
        let packet = NewPacket { recipients: Recipients::users([3, 4]), ..new_packet(id, 2, 300, 2) };
        let fund = FundPacket { packet, key: "p".into(), notice: vec![7, 7], away: vec![(3, 1)], at_ms: 5 };
        match w.run(fund).await.unwrap() {
            Funded::New { messages } => messages,
            other => panic!("{other:?}"),
        }
    })
}

fn foreign_open(id: u64, user: u64, amount_fen: i64, seq: u32, remaining_before_fen: i64) -> OpenShare {
    OpenShare {
        packet: id,
        user,
        amount_fen,
        seq,
        at_ms: 9,
        best_luck: None,
        remaining_before_fen,
        cross_to: (user % 2 == 1).then_some(1),
    }
}

/// A user homed on SET 1 opens a packet of SET 0: the claim, the share
/// paid into SET 1's transit account and the outbox credit commit together
/// (the notice of the send went to the outbox too, not to a stored
/// message); the transport reads them oldest first and marks them
/// published, after which they are not handed out again.
fn a_foreign_open_pays_transit_and_writes_its_outbox_credit_in_the_same_commit(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let rt = runtime();
    let id = make_packet_id(0, 0, 1);
    let messages = send_across(&w, &rt, id);
    assert_eq!(messages.iter().map(|m| m.0).collect::<Vec<_>>(), vec![4], "only the local recipient's message");
    assert_eq!(store.reader.messages(3, 10).unwrap(), vec![], "no message stored here for SET 1's user");
    assert_eq!(w.cross_backlog(), 1);
    rt.block_on(w.run(foreign_open(id, 3, 120, 0, 300))).unwrap();
    assert_eq!(w.cross_backlog(), 2);
    assert_eq!(store.reader.balance(3).unwrap(), 0, "paid on SET 1, not here");
    assert_eq!(w.committed.balance(Account::transit(1)), 120);
    assert_eq!(w.committed.totals().transit_fen, 120);
    assert_eq!(rt.block_on(w.run(FindClaim { packet: id, user: 3 })).unwrap(), Some(120));
    let out = store.reader.cross_unpublished(0, 10).unwrap();
    let notice = CrossMessage {
        from: 0,
        to: 1,
        packet: id,
        user: 3,
        created_ms: 5,
        body: CrossBody::Notice { body: vec![7, 7] },
    };
    let credit = CrossMessage { created_ms: 9, body: CrossBody::Credit { amount_fen: 120 }, ..notice.clone() };
    assert_eq!(out, vec![notice, credit.clone()], "oldest first");
    assert_eq!(store.reader.cross_unpublished(0, 1).unwrap().len(), 1, "at most the limit");
    let (report, rows) = audit_with_cross(&at.location()).unwrap();
    assert!(report.passed(), "{:?}", report.violations);
    assert_eq!(report.totals.transit_by_set, std::collections::BTreeMap::from([(1, 120)]));
    assert_eq!((rows.outs.len(), rows.ins.len()), (2, 0));
    // Published: never handed out again; marking twice marks nothing more.
    let keys = vec![(CrossKind::Notice, id, 3), (CrossKind::Credit, id, 3)];
    assert_eq!(rt.block_on(w.run(MarkCrossPublished { keys: keys.clone() })).unwrap(), 2);
    assert_eq!(rt.block_on(w.run(MarkCrossPublished { keys })).unwrap(), 0);
    assert_eq!(w.cross_backlog(), 0);
    assert_eq!(store.reader.cross_unpublished(0, 10).unwrap(), vec![]);
    // The backlog is read back at start-up.
    drop(w);
    TestStore::close(store);
    let store = at.open();
    assert_eq!(store.writer.cross_backlog(), 0);
    rt.block_on(store.writer.run(foreign_open(id, 4, 100, 1, 180))).unwrap();
    assert_eq!(store.writer.cross_backlog(), 0, "a local open writes no outbox row");
    assert_eq!(store.reader.balance(4).unwrap(), 100);
    let report = at.audit();
    assert!(report.passed(), "{:?}", report.violations);
}

/// A batch that fails keeps nothing of a foreign open: no claim, no money
/// in transit, no outbox row, no backlog.
fn a_failed_batch_keeps_no_claim_transit_or_outbox_row(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let rt = runtime();
    let id = make_packet_id(0, 0, 1);
    send_across(&w, &rt, id);
    rt.block_on(w.run(MarkCrossPublished { keys: vec![(CrossKind::Notice, id, 3)] })).unwrap();
    // A claim of user 4 behind the writer's back: the batch opening for 3
    // and then for 4 fails on it, whole.
    let claim =
        |user: &str| format!("INSERT INTO claims (packet, {user}, seq, amount, at_ms) VALUES ({id}, 4, 7, 1, 0)");
    let day = hongbao_core::ids::day_of(id);
    at.tamper(
        &claim("user"),
        &claim("user_id").replace("(packet,", "(day, packet,").replace("VALUES (", &format!("VALUES ({day}, ")),
    );
    let release = hold_writer(&w);
    let (tx, results) = std::sync::mpsc::channel();
    for op in [foreign_open(id, 3, 120, 0, 300), foreign_open(id, 4, 80, 1, 180)] {
        let tx = tx.clone();
        assert!(w.try_submit(op, move |r| tx.send(r).unwrap()));
    }
    drop(tx);
    release.send(()).unwrap();
    for result in results.iter() {
        assert!(matches!(result, Err(OpError::Storage(_))), "{result:?}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while w.is_failing() {
        assert!(std::time::Instant::now() < deadline, "the writer never recovered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(rt.block_on(w.run(FindClaim { packet: id, user: 3 })).unwrap(), None);
    assert_eq!(w.committed.balance(Account::transit(1)), 0);
    assert_eq!(w.cross_backlog(), 0);
    assert_eq!(store.reader.cross_unpublished(0, 10).unwrap(), vec![]);
    let untamper = "DELETE FROM claims WHERE seq = 7";
    at.tamper(untamper, untamper);
    let (report, rows) = audit_with_cross(&at.location()).unwrap();
    assert!(report.passed(), "{:?}", report.violations);
    assert_eq!((rows.outs.len(), report.totals.transit_fen), (1, 0), "the send's notice only");
    // The open goes through once storage holds the state it was decided on.
    rt.block_on(w.run(foreign_open(id, 3, 120, 0, 300))).unwrap();
    assert_eq!((w.committed.balance(Account::transit(1)), w.cross_backlog()), (120, 1));
}

/// This store as SET 1 of 2: SET 0's credit and notice for user 3 are
/// applied once however often they arrive, in one batch or in several; a
/// copy with another amount is refused.
fn a_cross_message_is_applied_once(at: TestStore) {
    let store = at.open();
    let w = store.writer.clone();
    let rt = runtime();
    let packet = make_packet_id(0, 1, 5);
    let credit =
        CrossMessage { from: 0, to: 1, packet, user: 3, created_ms: 10, body: CrossBody::Credit { amount_fen: 60 } };
    let notice = CrossMessage { body: CrossBody::Notice { body: vec![4, 2] }, ..credit.clone() };
    let apply = |msg: &CrossMessage| ApplyCross { msg: msg.clone(), at_ms: 25 };
    // The same messages twice in one batch: the second of each is a repeat.
    let release = hold_writer(&w);
    let (tx, results) = std::sync::mpsc::channel();
    for msg in [&credit, &notice, &credit, &notice] {
        let tx = tx.clone();
        assert!(w.try_submit(apply(msg), move |r| tx.send(r).unwrap()));
    }
    drop(tx);
    release.send(()).unwrap();
    let results: Vec<CrossApplied> = results.iter().map(Result::unwrap).collect();
    assert_eq!(results.iter().map(|r| r.repeat).collect::<Vec<_>>(), vec![false, false, true, true]);
    assert_eq!(results[0].message, None, "a credit stores no message");
    let stored = results[1].message.expect("a notice's message");
    assert_eq!(store.reader.messages(3, 10).unwrap(), vec![(stored, vec![4, 2])]);
    assert_eq!(store.reader.balance(3).unwrap(), 60);
    assert_eq!(w.committed.balance(Account::transit(0)), -60, "SET 0 owes this SET nothing; it owes SET 0");
    // Again, in a batch of its own.
    let again = rt.block_on(w.run(apply(&credit))).unwrap();
    assert_eq!(again, CrossApplied { repeat: true, message: None });
    // The same key with another amount: corrupt, refused, nothing moves.
    let other = CrossMessage { body: CrossBody::Credit { amount_fen: 61 }, ..credit.clone() };
    let refused = rt.block_on(w.run(apply(&other)));
    assert!(matches!(&refused, Err(OpError::Invalid(m)) if m.contains("corrupt")), "{refused:?}");
    assert_eq!(store.reader.balance(3).unwrap(), 60);
    assert_eq!(store.reader.messages(3, 10).unwrap().len(), 1);
    let (report, rows) = audit_with_cross(&at.location()).unwrap();
    assert!(report.passed(), "{:?}", report.violations);
    assert_eq!(report.totals.transit_by_set, std::collections::BTreeMap::from([(0, -60)]));
    let applied: Vec<(CrossKind, i64, u64, u64)> =
        rows.ins.iter().map(|r| (r.kind, r.amount_fen, r.created_ms, r.applied_ms)).collect();
    assert_eq!(applied.len(), 2);
    assert!(applied.contains(&(CrossKind::Credit, 60, 10, 25)) && applied.contains(&(CrossKind::Notice, 0, 10, 25)));
}

/// The transport's read of unpublished outbox rows goes through the partial
/// index, never a scan of the table (which keeps every row ever written).
fn the_unpublished_outbox_is_read_through_its_index(at: TestStore) {
    drop(at.open());
    let plan = match &at {
        TestStore::Sqlite(dir) => {
            let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
            let sql = format!("EXPLAIN QUERY PLAN {}", crate::sqlite::reader::cross_unpublished_sql());
            let mut stmt = conn.prepare(&sql).unwrap();
            let rows = stmt.query_map([10], |r| r.get::<_, String>(3)).unwrap();
            rows.collect::<rusqlite::Result<Vec<_>>>().unwrap().join("\n")
        }
        TestStore::Postgres(server) => server
            .psql(&format!(
                "SET enable_seqscan = off; PREPARE unpublished(bigint) AS {}; EXPLAIN (COSTS OFF) EXECUTE unpublished(10);",
                crate::postgres::reader::CROSS_UNPUBLISHED_SQL
            ))
            .unwrap(),
    };
    assert!(plan.contains("cross_out_unpublished"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE") && !plan.contains("Sort"), "no sort: the index is in order\n{plan}");
}
