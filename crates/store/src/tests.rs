//! Writer, reader and audit against a real SQLite file in a temp directory.

use hongbao_core::campaign::{AmountRule, CampaignSpec, CampaignStatus};
use hongbao_core::ids::make_packet_id;
use hongbao_core::packet::Recipients;
use hongbao_core::split::SplitKind;

use crate::*;

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

#[test]
fn money_moves_are_committed_idempotent_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let w = store.writer.clone();
    runtime().block_on(async {
        let dep = w.run(Op::Deposit { user: 1, amount_fen: 1000, key: "d1".into() }).await.unwrap();
        assert_eq!(dep, Outcome::Balance { balance_fen: 1000, repeat: false });
        let again = w.run(Op::Deposit { user: 1, amount_fen: 1000, key: "d1".into() }).await.unwrap();
        assert_eq!(again, Outcome::Balance { balance_fen: 1000, repeat: true });
        assert_eq!(w.run(Op::Deposit { user: 1, amount_fen: 5, key: "d1".into() }).await, Err(OpError::KeyConflict));
        assert!(matches!(
            w.run(Op::Withdraw { user: 1, amount_fen: 5000, key: "w1".into() }).await,
            Err(OpError::InsufficientFunds { balance_fen: 1000, needed_fen: 5000 })
        ));

        let id = make_packet_id(0, 1);
        let funded = w
            .run(Op::FundPacket { packet: Box::new(new_packet(id, 1, 300, 3)), key: "p1".into(), notice: vec![1] })
            .await
            .unwrap();
        let Outcome::Funded { existing: None, messages } = funded else { panic!("{funded:?}") };
        assert_eq!(messages.len(), 3);
        let retry = w
            .run(Op::FundPacket { packet: Box::new(new_packet(id + 1, 1, 300, 3)), key: "p1".into(), notice: vec![] })
            .await
            .unwrap();
        assert!(matches!(retry, Outcome::Funded { existing: Some(ExistingPacket { id: i, .. }), .. } if i == id));

        w.run(Op::Open { packet: id, user: 2, amount_fen: 100, seq: 0, at_ms: 1, finished: None }).await.unwrap();
        w.run(Op::Refund { packet: id, sender: 1, amount_fen: 200, at_ms: 3, notice: vec![2] }).await.unwrap();
        // A second refund finds nothing to refund.
        assert!(w.run(Op::Refund { packet: id, sender: 1, amount_fen: 0, at_ms: 4, notice: vec![] }).await.is_err());
    });
    assert_eq!(store.reader.balance(1).unwrap(), 900);
    assert_eq!(store.reader.balance(2).unwrap(), 100);
    let p = store.reader.packet(make_packet_id(0, 1)).unwrap().unwrap();
    assert_eq!((p.remaining_fen, p.refunded_fen, p.claims.len()), (0, 200, 1));
    let report = audit_dir(dir.path()).unwrap();
    assert!(report.passed(), "{:?}", report.violations);
    assert_eq!(report.totals.deposits_fen, 1000);
}

#[test]
fn campaigns_fund_win_and_refund_the_rest_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let w = store.writer.clone();
    runtime().block_on(async {
        w.run(Op::Deposit { user: 9, amount_fen: 10_000, key: "d".into() }).await.unwrap();
        let spec = CampaignSpec {
            funder: 9,
            total_fen: 5000,
            rule: AmountRule::Count { packets: 10 },
            rate_per_s: 10,
            win_cap_per_user: None,
        };
        let Outcome::CampaignCreated { id, .. } =
            w.run(Op::CreateCampaign { spec: spec.clone(), key: "c".into(), at_ms: 0 }).await.unwrap()
        else {
            panic!()
        };
        let pk = make_packet_id(1, 5);
        let win = Op::ShakeWin { campaign: id, packet: pk, user: 3, amount_fen: 700, at_ms: 1, key: Some("s1".into()) };
        assert_eq!(w.run(win).await.unwrap(), Outcome::ShakeWon { repeat: None });
        let retry =
            Op::ShakeWin { campaign: id, packet: pk + 1, user: 3, amount_fen: 50, at_ms: 2, key: Some("s1".into()) };
        assert_eq!(w.run(retry).await.unwrap(), Outcome::ShakeWon { repeat: Some((id, pk, 700)) });
        let closed = w.run(Op::CloseCampaign { id, status: CampaignStatus::Stopped }).await.unwrap();
        assert_eq!(closed, Outcome::CampaignClosed { refunded_fen: 4300 });
        let twice = w.run(Op::CloseCampaign { id, status: CampaignStatus::Stopped }).await.unwrap();
        assert_eq!(twice, Outcome::CampaignClosed { refunded_fen: 0 });
    });
    let row = store.reader.campaign(1).unwrap().unwrap();
    assert_eq!((row.won, row.won_fen, row.refunded_fen, row.escrow_fen), (1, 700, 4300, 0));
    assert_eq!(store.reader.balance(9).unwrap(), 10_000 - 700);
    assert!(audit_dir(dir.path()).unwrap().passed());
}

#[test]
fn audit_reports_tampering_precisely() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        runtime().block_on(store.writer.run(Op::Deposit { user: 1, amount_fen: 50, key: "d".into() })).unwrap();
    }
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1", []).unwrap();
    let report = audit_dir(dir.path()).unwrap();
    assert!(!report.passed());
    assert!(report.violations.iter().any(|v| v.contains("account 1")), "{:?}", report.violations);
}

#[test]
fn groups_are_bounded_and_an_over_limit_change_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let w = store.writer.clone();
    runtime().block_on(async {
        let r = w.run(Op::ChangeGroup { group: 1, add: vec![3, 1, 2], remove: vec![], replace: true }).await.unwrap();
        assert_eq!(r, Outcome::GroupChanged { members: vec![1, 2, 3] });
        let too_many: Vec<u64> = (10..1000).collect();
        assert!(w.run(Op::ChangeGroup { group: 1, add: too_many, remove: vec![], replace: false }).await.is_err());
    });
    assert_eq!(store.reader.groups().unwrap()[&1], vec![1, 2, 3]);
}

#[test]
fn opens_committed_together_update_their_packet_as_one_at_a_time_would() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let w = store.writer.clone();
    let (a, b) = (make_packet_id(0, 1), make_packet_id(0, 2));
    runtime().block_on(async {
        w.run(Op::Deposit { user: 1, amount_fen: 1000, key: "d".into() }).await.unwrap();
        for (id, total, count, key) in [(a, 300, 3, "a"), (b, 100, 2, "b")] {
            let p = Box::new(new_packet(id, 1, total, count));
            w.run(Op::FundPacket { packet: p, key: key.into(), notice: vec![] }).await.unwrap();
        }
    });
    // Hold the writer inside a completion so every op below joins one batch.
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let hold: Done = Box::new(move |_| {
        held_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    assert!(w.try_submit(Op::Barrier, hold).is_ok());
    held_rx.recv().unwrap();
    let open = |packet, user, amount_fen, seq, finished| Op::Open { packet, user, amount_fen, seq, at_ms: 5, finished };
    let ops = [
        open(a, 2, 100, 0, None),
        open(b, 2, 40, 0, None),
        open(a, 3, 50, 1, None),
        // Reads packet b's row: b's open must be written before it.
        Op::Refund { packet: b, sender: 1, amount_fen: 60, at_ms: 6, notice: vec![] },
        open(a, 4, 150, 2, Some(4)),
    ];
    let mut replies = Vec::new();
    for op in ops {
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(w.try_submit(op, Box::new(move |r| tx.send(r).unwrap())).is_ok());
        replies.push(rx);
    }
    let commits = w.stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    release_tx.send(()).unwrap();
    for rx in replies {
        rx.recv().unwrap().unwrap();
    }
    let after = w.stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - commits, 1, "one batch for all five ops");
    let pa = store.reader.packet(a).unwrap().unwrap();
    assert_eq!((pa.remaining_fen, pa.claims.len(), pa.status.as_str()), (0, 3, "finished"));
    let pb = store.reader.packet(b).unwrap().unwrap();
    assert_eq!((pb.remaining_fen, pb.refunded_fen, pb.claims.len(), pb.status.as_str()), (0, 60, 1, "refunded"));
    let report = audit_dir(dir.path()).unwrap();
    assert!(report.passed(), "{:?}", report.violations);
}
