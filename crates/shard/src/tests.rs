//! The engine in-process against real stores — a SQLite data directory and
//! a PostgreSQL server each test starts — one suite run on both
//! (`on_both_stores!`): races on one packet, campaigns, expiry, idempotency
//! and recovery after a restart.
//!
//! Time is a manual `Clock`: it moves only when a test advances it, and
//! `Engine::catch_up` then waits until every shard has done what became due
//! and the writer has committed it. No test sleeps for the engine. Every
//! test prints its seed; `HONGBAO_TEST_SEED=<seed>` replays its random draws.

use std::time::Duration;

use hongbao_boundary::EngineError;
use hongbao_core::campaign::{AmountRule, CampaignSpec, CampaignStatus};
use hongbao_core::ids::{make_packet_id, set_of, shard_of};
use hongbao_core::limits::PacketRules;
use hongbao_core::sets::SetMap;
use hongbao_core::split::SplitKind;
use hongbao_proto::{ErrorCode, GrabState, Reply, Request, ShakeResult, Target};

use crate::{Clock, CommitMode, CrossBody, CrossKind, CrossMessage, Engine, EngineConfig, StoreLocation};

/// A fixed date, so records do not depend on when the test ran.
const EPOCH_MS: u64 = 1_800_000_000_000;

/// The seed of this test's random draws: `HONGBAO_TEST_SEED`, or a fresh one.
/// Printed, so a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("HONGBAO_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (HONGBAO_TEST_SEED={seed} replays it)");
    seed
}

/// Three shards, packets that expire after `expiry_s`, a manual clock.
fn config(expiry_s: u64) -> EngineConfig {
    config_with_seed(expiry_s, seed())
}

fn config_with_seed(expiry_s: u64, seed: u64) -> EngineConfig {
    EngineConfig {
        shards: 3,
        set: SetMap::single(),
        packet_rules: PacketRules { expiry_s, ..PacketRules::default() },
        clock: Clock::manual(EPOCH_MS),
        seed,
    }
}

/// Moves the engine's clock on and waits for what became due.
async fn advance(engine: &Engine, config: &EngineConfig, ms: u64) {
    config.clock.advance(Duration::from_millis(ms));
    engine.catch_up().await;
}

/// A campaign whose packets are all won finishes: the shards see their
/// shares spent at their next release tick, the check for a finished
/// campaign runs every 100 ms of the clock, and the close it starts is the
/// engine's own, so this waits for it (boundedly).
async fn finishes(engine: &Engine, config: &EngineConfig, campaign: hongbao_core::CampaignId) {
    advance(engine, config, 10).await;
    config.clock.advance(Duration::from_millis(100));
    let mut status = CampaignStatus::Running;
    for _ in 0..500 {
        status = engine.campaign(campaign).await.unwrap().status;
        if status == CampaignStatus::Finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, CampaignStatus::Finished);
}

fn send(amount_fen: i64, count: u32, to: Target, key: &str) -> Request {
    Request::Send { amount_fen, count, kind: SplitKind::Lucky, to, greeting: "恭喜发财".into(), key: key.into() }
}

async fn sent_packet(engine: &Engine, sender: u64, req: Request) -> u64 {
    match engine.call(sender, req).await {
        Reply::Sent { packet, .. } => packet,
        other => panic!("send failed: {other:?}"),
    }
}

/// The audit of a store (on a thread of its own: a PostgreSQL client may not
/// run on the test's runtime).
fn assert_audit(store: &StoreLocation) {
    let store = store.clone();
    let report = std::thread::spawn(move || hongbao_store::audit(&store)).join().unwrap().unwrap();
    assert!(report.passed(), "audit failed: {:#?}", report.violations);
}

/// The stores a test's engines run on: fresh SQLite data directories, or
/// fresh databases on a PostgreSQL server the test starts for itself.
enum Stores {
    Sqlite(std::sync::Mutex<Vec<tempfile::TempDir>>),
    Postgres(hongbao_pg_harness::PgServer, std::sync::atomic::AtomicU32),
}

impl Stores {
    fn sqlite() -> Stores {
        Stores::Sqlite(std::sync::Mutex::new(Vec::new()))
    }

    fn postgres() -> Stores {
        let server = hongbao_pg_harness::PgServer::start().unwrap_or_else(|e| panic!("{e}"));
        Stores::Postgres(server, std::sync::atomic::AtomicU32::new(0))
    }

    /// A new, empty store (kept until the test ends).
    fn fresh(&self) -> StoreLocation {
        match self {
            Stores::Sqlite(dirs) => {
                let dir = tempfile::tempdir().unwrap();
                let location = StoreLocation::Sqlite(dir.path().to_owned());
                dirs.lock().unwrap().push(dir);
                location
            }
            Stores::Postgres(server, made) => {
                let db = format!("t{}", made.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                server.create_database(&db).unwrap();
                StoreLocation::postgres(&server.url_for(&db)).unwrap()
            }
        }
    }
}

/// Each named test, taking `Stores`, run once on SQLite and once on
/// PostgreSQL: one suite for both stores.
macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Stores::sqlite()).await
            })*
        }
        mod on_postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test(super::Stores::postgres()).await
            })*
        }
    };
}

on_both_stores!(
    one_packet_raced_by_ten_times_its_count_pays_exactly_count_shares,
    the_same_seed_draws_the_same_shares,
    per_op_commit_mode_commits_each_open_alone_and_audits,
    sends_are_validated_idempotent_and_only_recipients_open,
    expired_packets_refund_the_exact_remainder_once_even_across_a_restart,
    campaigns_release_at_their_rate_pay_winners_and_refund_the_rest,
    a_campaign_that_runs_out_finishes_by_itself,
    small_campaigns_pay_exactly_what_their_rule_says_on_any_shard_count,
    packet_ids_are_never_reused_across_restarts,
    a_keyed_shake_retry_returns_the_first_win_and_spends_nothing,
    shakes_with_nothing_to_give_are_answered_inline,
    packet_spam_is_limited_and_never_evicts_system_messages,
    keyed_shakes_that_find_nothing_leave_the_writer_alone,
    group_zero_is_an_invalid_request_not_a_missing_group,
    a_set_serves_its_own_users_as_a_single_node_does,
    a_set_refuses_users_homed_on_another_set,
    a_set_refuses_packets_of_another_set,
    data_of_one_set_reopened_as_another_refuses_to_start,
    a_set_spreads_its_users_over_every_shard_when_sets_and_shards_share_a_factor,
    a_packet_sent_across_sets_pays_each_opener_on_their_own_set_exactly_once,
    one_packet_raced_across_sets_pays_k_shares_and_one_credit_per_foreign_winner,
    a_set_applies_only_messages_meant_for_it,
    a_campaign_across_sets_is_split_funded_won_on_both_and_refunded_once,
);

async fn one_packet_raced_by_ten_times_its_count_pays_exactly_count_shares(stores: Stores) {
    const K: u32 = 20;
    let store = stores.fresh();
    let engine = Engine::open_at(config(3600), &store).await.unwrap();
    engine.deposit(1, 10_000, "d").await.unwrap();
    let members: Vec<u64> = (1..=(10 * K as u64 + 1)).collect();
    engine.set_group(7, members.clone()).await.unwrap();
    let packet = sent_packet(&engine, 1, send(5_000, K, Target::Group(7), "p")).await;

    let mut tasks = Vec::new();
    for user in members.iter().copied().filter(|&u| u != 1) {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move { (user, engine.call(user, Request::Open { packet }).await) }));
    }
    let mut opened = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (user, Reply::Opened { amount_fen, repeat: false, .. }) => opened.push((user, amount_fen)),
            (_, Reply::Error { code: ErrorCode::Finished, .. }) => {}
            (user, other) => panic!("user {user}: unexpected {other:?}"),
        }
    }
    assert_eq!(opened.len(), K as usize, "exactly K opens");
    assert_eq!(opened.iter().map(|o| o.1).sum::<i64>(), 5_000, "shares sum to the packet");
    let mut users: Vec<u64> = opened.iter().map(|o| o.0).collect();
    users.sort();
    users.dedup();
    assert_eq!(users.len(), K as usize, "no user twice");
    let detail = engine.packet_detail(packet).await.unwrap();
    assert_eq!(detail.status, "finished");
    assert_eq!(detail.claims.len(), K as usize);
    assert!(detail.best_luck.is_some());
    // A retry returns the first result.
    let (u, amount) = opened[0];
    assert_eq!(
        engine.call(u, Request::Open { packet }).await,
        Reply::Opened { packet, amount_fen: amount, repeat: true, finished: true }
    );
    engine.shutdown().await;
    assert_audit(&store);
}

async fn the_same_seed_draws_the_same_shares(stores: Stores) {
    let seed = seed();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let store = stores.fresh();
        let engine = Engine::open_at(config_with_seed(3600, seed), &store).await.unwrap();
        engine.deposit(1, 1_000, "d").await.unwrap();
        let openers: Vec<u64> = (2..=7).collect();
        let packet = sent_packet(&engine, 1, send(1_000, 6, Target::Users(openers.clone()), "p")).await;
        let mut shares = Vec::new();
        for user in openers {
            match engine.call(user, Request::Open { packet }).await {
                Reply::Opened { amount_fen, .. } => shares.push(amount_fen),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(shares.iter().sum::<i64>(), 1_000);
        engine.shutdown().await;
        runs.push(shares);
    }
    assert_eq!(runs[0], runs[1], "one seed, one sequence of shares");
}

/// The transaction-per-operation baseline of `hongbao perf opens`: same
/// replies, one commit per operation, and the audit passes.
async fn per_op_commit_mode_commits_each_open_alone_and_audits(stores: Stores) {
    let store = stores.fresh();
    let engine = Engine::open_with_commit_mode(config(3600), CommitMode::PerOp, &store).await.unwrap();
    engine.deposit(1, 1_000, "d").await.unwrap();
    let openers: Vec<u64> = (2..=6).collect();
    let packet = sent_packet(&engine, 1, send(500, 5, Target::Users(openers.clone()), "p")).await;
    let before = engine.stats().await;
    let mut tasks = Vec::new();
    for user in openers {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move { engine.call(user, Request::Open { packet }).await }));
    }
    let mut sum = 0;
    for t in tasks {
        match t.await.unwrap() {
            Reply::Opened { amount_fen, repeat: false, .. } => sum += amount_fen,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sum, 500);
    let after = engine.stats().await;
    assert_eq!(after.committed_ops - before.committed_ops, 5);
    assert_eq!(after.commits - before.commits, 5, "one transaction per open");
    assert_eq!(after.commits, after.committed_ops, "never more than one op per commit");
    let detail = engine.packet_detail(packet).await.unwrap();
    assert_eq!((detail.status.as_str(), detail.claims.len(), detail.remaining_fen), ("finished", 5, 0));
    engine.shutdown().await;
    assert_audit(&store);
}

async fn sends_are_validated_idempotent_and_only_recipients_open(stores: Stores) {
    let store = stores.fresh();
    let engine = Engine::open_at(config(3600), &store).await.unwrap();
    engine.deposit(1, 1_000, "d").await.unwrap();
    let bad = |r: Reply| matches!(r, Reply::Error { code: ErrorCode::InvalidRequest, .. });
    assert!(bad(engine.call(1, send(0, 1, Target::User(2), "a")).await));
    assert!(bad(engine.call(1, send(-5, 1, Target::User(2), "a")).await));
    assert!(bad(engine.call(1, send(3, 5, Target::Users(vec![2, 3]), "a")).await), "count > amount");
    assert!(bad(engine.call(1, send(20_001, 1, Target::User(2), "a")).await), "over the packet limit");
    assert!(bad(engine.call(1, send(i64::MAX, 1, Target::User(2), "a")).await));
    assert!(matches!(
        engine.call(1, send(2_000, 2, Target::Users(vec![2, 3]), "a")).await,
        Reply::Error { code: ErrorCode::InsufficientFunds, .. }
    ));
    assert!(matches!(
        engine.call(1, send(10, 1, Target::Group(99), "a")).await,
        Reply::Error { code: ErrorCode::NotFound, .. }
    ));

    let packet = sent_packet(&engine, 1, send(100, 2, Target::Users(vec![2, 3]), "k1")).await;
    let again = engine.call(1, send(100, 2, Target::Users(vec![2, 3]), "k1")).await;
    assert!(matches!(again, Reply::Sent { packet: p, repeat: true, .. } if p == packet));
    assert!(matches!(
        engine.call(1, send(50, 2, Target::Users(vec![2, 3]), "k1")).await,
        Reply::Error { code: ErrorCode::KeyConflict, .. }
    ));
    eprintln!("stats {:?}", engine.stats().await);
    eprintln!("detail {:?}", engine.packet_detail(packet).await);
    assert_eq!(engine.balance(1).await.unwrap(), 900, "debited once");

    assert_eq!(engine.call(9, Request::Grab { packet }).await, Reply::Grab { packet, state: GrabState::NotEligible });
    assert!(matches!(
        engine.call(9, Request::Open { packet }).await,
        Reply::Error { code: ErrorCode::NotEligible, .. }
    ));
    assert_eq!(engine.call(2, Request::Grab { packet }).await, Reply::Grab { packet, state: GrabState::CanOpen });
    assert!(matches!(
        engine.call(2, Request::Open { packet: packet + 1_000 }).await,
        Reply::Error { code: ErrorCode::NotFound, .. }
    ));
    engine.shutdown().await;
    assert_audit(&store);
}

async fn expired_packets_refund_the_exact_remainder_once_even_across_a_restart(stores: Stores) {
    let store = stores.fresh();
    let packet;
    let opened;
    {
        let engine = Engine::open_at(config(1), &store).await.unwrap();
        engine.deposit(1, 1_000, "d").await.unwrap();
        packet = sent_packet(&engine, 1, send(500, 5, Target::Users(vec![2, 3, 4, 5, 6]), "p")).await;
        opened = match engine.call(2, Request::Open { packet }).await {
            Reply::Opened { amount_fen, .. } => amount_fen,
            other => panic!("{other:?}"),
        };
        // Restart before expiry: the timer must be recovered from storage.
        engine.shutdown().await;
    }
    let config = config(1);
    let engine = Engine::open_at(config.clone(), &store).await.unwrap();
    advance(&engine, &config, 1_500).await;
    let detail = engine.packet_detail(packet).await.unwrap();
    assert_eq!(detail.status, "refunded");
    assert_eq!(detail.refunded_fen, 500 - opened);
    assert_eq!(engine.balance(1).await.unwrap(), 1_000 - opened);
    assert!(matches!(engine.call(3, Request::Open { packet }).await, Reply::Error { code: ErrorCode::Expired, .. }));
    engine.shutdown().await;
    assert_audit(&store);
}

async fn campaigns_release_at_their_rate_pay_winners_and_refund_the_rest(stores: Stores) {
    let store = stores.fresh();
    let config = config(3600);
    let engine = Engine::open_at(config.clone(), &store).await.unwrap();
    engine.deposit(100, 100_000, "d").await.unwrap();
    let spec = CampaignSpec {
        funder: 100,
        total_fen: 50_000,
        rule: AmountRule::Count { packets: 1_000 },
        rate_per_s: 200,
        win_cap_per_user: Some(1),
    };
    let c = engine.create_campaign(spec.clone(), "c1").await.unwrap();
    assert_eq!(engine.create_campaign(spec, "c1").await.unwrap().id, c.id, "idempotent create");

    assert_eq!(engine.balance(100).await.unwrap(), 50_000);
    assert_eq!(engine.call(1, Request::Shake { campaign: 0, key: None }).await, Reply::Shake(ShakeResult::NotRunning));
    // A remote gateway's copy of the gates: closed now, open once started,
    // and a change is announced.
    let plain = Request::Shake { campaign: 0, key: None };
    assert_eq!(engine.gate_view().answer(1, &plain), Some(ShakeResult::NotRunning));
    let mut changes = engine.gate_changes();
    changes.borrow_and_update();
    engine.start_campaign(c.id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), changes.changed()).await.unwrap().unwrap();
    advance(&engine, &config, 500).await;
    let view = engine.gate_view();
    assert!(view.gates.iter().all(|g| g.open), "{view:?}");
    let keyed = Request::Shake { campaign: 0, key: Some("k".into()) };
    assert_eq!(view.answer(1, &keyed), None, "keyed shakes always go to the shard");
    assert_eq!(
        view.answer(1, &Request::Shake { campaign: c.id, key: None }),
        None,
        "a named campaign goes to the shard"
    );
    let mut won = 0i64;
    let mut winners = 0;
    for user in 1..=60u64 {
        for _ in 0..3 {
            match engine.call(user, Request::Shake { campaign: c.id, key: None }).await {
                Reply::Shake(ShakeResult::Won { amount_fen, .. }) => {
                    won += amount_fen;
                    winners += 1;
                }
                Reply::Shake(ShakeResult::None) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(winners > 0 && winners <= 60, "win cap of 1 per user: {winners}");
    let released_before_stop = engine.campaign(c.id).await.unwrap().released;
    let info = engine.stop_campaign(c.id).await.unwrap();
    assert_eq!(info.status, CampaignStatus::Stopped);
    assert_eq!(info.won_fen, won);
    assert_eq!(info.refunded_fen, 50_000 - won);
    assert_eq!(info.released, 100, "200/s for the 0.5 s the clock moved");
    assert!(info.released >= released_before_stop, "a closed campaign keeps its count");
    assert_eq!(engine.campaign(c.id).await.unwrap().released, info.released);

    assert_eq!(engine.balance(100).await.unwrap(), 100_000 - won);
    assert_eq!(
        engine.call(1, Request::Shake { campaign: c.id, key: None }).await,
        Reply::Shake(ShakeResult::NotRunning)
    );
    engine.shutdown().await;
    assert_audit(&store);
}

async fn a_campaign_that_runs_out_finishes_by_itself(stores: Stores) {
    let store = stores.fresh();
    let config = config(3600);
    let engine = Engine::open_at(config.clone(), &store).await.unwrap();
    engine.deposit(100, 1_000, "d").await.unwrap();
    let spec = CampaignSpec {
        funder: 100,
        total_fen: 30,
        rule: AmountRule::Count { packets: 6 },
        rate_per_s: 1_000,
        win_cap_per_user: None,
    };
    let c = engine.create_campaign(spec, "c").await.unwrap();
    engine.start_campaign(c.id).await.unwrap();
    let mut wins = 0;
    for _ in 0..200 {
        for user in 1..=6u64 {
            if let Reply::Shake(ShakeResult::Won { .. }) =
                engine.call(user, Request::Shake { campaign: 0, key: None }).await
            {
                wins += 1;
            }
        }
        if wins == 6 {
            break;
        }
        advance(&engine, &config, 5).await;
    }
    assert_eq!(wins, 6);
    finishes(&engine, &config, c.id).await;
    engine.shutdown().await;
    assert_audit(&store);
}

/// Issue 9: with fewer packets than shards, the budget used to be split per
/// shard first, so a shard with no packet refunded its share and a packet
/// could not be larger than one shard's part.
async fn small_campaigns_pay_exactly_what_their_rule_says_on_any_shard_count(stores: Stores) {
    let cases = [
        (AmountRule::Count { packets: 3 }, 30),
        (AmountRule::Count { packets: 1 }, 1_000),
        (AmountRule::Count { packets: 2 }, 1_000),
        (AmountRule::Range { min_fen: 10, max_fen: 20 }, 30),
        (AmountRule::Range { min_fen: 20, max_fen: 20 }, 20),
    ];
    for shards in [1, 4] {
        for (i, (rule, total_fen)) in cases.into_iter().enumerate() {
            let store = stores.fresh();
            let config = EngineConfig { shards, ..config(3600) };
            let engine = Engine::open_at(config.clone(), &store).await.unwrap();
            engine.deposit(100, total_fen, "d").await.unwrap();
            let spec = CampaignSpec { funder: 100, total_fen, rule, rate_per_s: 1_000, win_cap_per_user: None };
            let c = engine.create_campaign(spec, &format!("c{i}")).await.unwrap();
            engine.start_campaign(c.id).await.unwrap();
            advance(&engine, &config, 1_000).await;
            let mut wins = Vec::new();
            for user in 1..=8u64 {
                for _ in 0..4 {
                    if let Reply::Shake(ShakeResult::Won { amount_fen, .. }) =
                        engine.call(user, Request::Shake { campaign: c.id, key: None }).await
                    {
                        wins.push(amount_fen);
                    }
                }
            }
            let info = engine.stop_campaign(c.id).await.unwrap();
            let case =
                format!("{shards} shards, {rule:?} over {total_fen} fen: won {wins:?}, refunded {}", info.refunded_fen);
            assert_eq!(wins.iter().sum::<i64>() + info.refunded_fen, total_fen, "{case}");
            assert_eq!(info.won_fen, wins.iter().sum::<i64>(), "{case}");
            match rule {
                AmountRule::Count { packets } => {
                    assert_eq!((wins.len() as u64, info.refunded_fen), (packets, 0), "{case}")
                }
                AmountRule::Range { min_fen, max_fen } => {
                    assert!(!wins.is_empty() && wins.iter().all(|&a| (min_fen..=max_fen).contains(&a)), "{case}");
                    assert!(info.refunded_fen < min_fen, "{case}");
                }
            }
            engine.shutdown().await;
            assert_audit(&store);
        }
    }
}

async fn packet_ids_are_never_reused_across_restarts(stores: Stores) {
    let store = stores.fresh();
    let mut seen = std::collections::HashSet::new();
    for round in 0..3 {
        let engine = Engine::open_at(config(3600), &store).await.unwrap();
        engine.deposit(1, 100, &format!("d{round}")).await.unwrap();
        for i in 0..3 {
            let p = sent_packet(&engine, 1, send(1, 1, Target::User(2), &format!("{round}-{i}"))).await;
            assert!(seen.insert(p), "packet id {p} reused");
        }
        engine.shutdown().await;
    }
}

async fn a_keyed_shake_retry_returns_the_first_win_and_spends_nothing(stores: Stores) {
    let store = stores.fresh();
    let config = config(3600);
    let engine = Engine::open_at(config.clone(), &store).await.unwrap();
    engine.deposit(100, 10_000, "d").await.unwrap();
    // 12 packets released at once (3 shards × 4), a cap of 2 wins per user.
    let spec = CampaignSpec {
        funder: 100,
        total_fen: 1_200,
        rule: AmountRule::Count { packets: 12 },
        rate_per_s: 10_000,
        win_cap_per_user: Some(2),
    };
    let c = engine.create_campaign(spec, "keyed").await.unwrap();
    engine.start_campaign(c.id).await.unwrap();
    advance(&engine, &config, 100).await;
    let shake = |key: &str| Request::Shake { campaign: 0, key: Some(key.into()) };
    // Concurrent first tries with one key, before any has won: every one
    // answers the same single win (the losers' packets go back unspent).
    let racing = futures_join(&engine, 3, "k1", 6).await;
    let first = racing[0].clone();
    assert!(matches!(first, Reply::Shake(ShakeResult::Won { .. })), "{first:?}");
    assert!(racing.iter().all(|r| *r == first), "one key, one win: {racing:?}");
    // Sequential retries too.
    assert_eq!(engine.call(3, shake("k1")).await, first);
    // The retries used neither the cap nor the shard's packets: a second key
    // wins, a third is capped (with packets still ready), k1 still answers.
    let second = engine.call(3, shake("k2")).await;
    assert!(matches!(second, Reply::Shake(ShakeResult::Won { .. })), "a second key may win: {second:?}");
    assert_ne!(second, first);
    assert_eq!(engine.call(3, shake("k3")).await, Reply::Shake(ShakeResult::None), "capped at 2");
    assert!(
        matches!(engine.call(6, shake("other")).await, Reply::Shake(ShakeResult::Won { .. })),
        "the shard still has packets after 2 wins: retries spent none"
    );
    assert_eq!(engine.call(3, shake("k1")).await, first, "capped, yet the key answers its win");
    // After the campaign stops, the key still answers its first win.
    let stopped = engine.stop_campaign(c.id).await.unwrap();
    assert_eq!(stopped.won, 3, "three wins, however many retries");
    assert_eq!(engine.call(3, shake("k1")).await, first);
    let Reply::Shake(ShakeResult::Won { amount_fen: a1, .. }) = first else { unreachable!() };
    let Reply::Shake(ShakeResult::Won { amount_fen: a2, .. }) = second else { unreachable!() };
    assert_eq!(engine.balance(3).await.unwrap(), a1 + a2);
    engine.shutdown().await;
    assert_audit(&store);
}

/// `n` concurrent shakes of `user` with the same key.
async fn futures_join(engine: &Engine, user: u64, key: &str, n: usize) -> Vec<Reply> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (engine, key) = (engine.clone(), key.to_owned());
        tasks
            .push(tokio::spawn(async move { engine.call(user, Request::Shake { campaign: 0, key: Some(key) }).await }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn shakes_with_nothing_to_give_are_answered_inline(stores: Stores) {
    let store = stores.fresh();
    let config = config(3600);
    let engine = Engine::open_at(config.clone(), &store).await.unwrap();
    let plain = Request::Shake { campaign: 0, key: None };
    assert_eq!(engine.answer_inline(1, &plain), Some(Reply::Shake(ShakeResult::NotRunning)));
    // Keyed shakes and other requests always go to the shard.
    assert_eq!(engine.answer_inline(1, &Request::Shake { campaign: 0, key: Some("k".into()) }), None);
    assert_eq!(engine.answer_inline(1, &Request::Balance), None);

    engine.deposit(100, 1_000, "d").await.unwrap();
    let spec = CampaignSpec {
        funder: 100,
        total_fen: 30,
        rule: AmountRule::Count { packets: 3 },
        rate_per_s: 1_000,
        win_cap_per_user: None,
    };
    let c = engine.create_campaign(spec, "inline").await.unwrap();
    engine.start_campaign(c.id).await.unwrap();
    advance(&engine, &config, 100).await;
    // One packet is ready in each of the 3 shards: the shard must answer.
    assert_eq!(engine.answer_inline(1, &plain), None);
    assert!(matches!(engine.call(1, plain.clone()).await, Reply::Shake(ShakeResult::Won { .. })));
    // Its shard's pool is empty now (the gate follows within a loop turn).
    engine.catch_up().await;
    assert_eq!(engine.answer_inline(1, &plain), Some(Reply::Shake(ShakeResult::None)));
    assert_eq!(engine.answer_inline(2, &plain), None, "user 2's shard still holds its packet");
    engine.stop_campaign(c.id).await.unwrap();
    engine.catch_up().await;
    assert_eq!(engine.answer_inline(2, &plain), Some(Reply::Shake(ShakeResult::NotRunning)));
    engine.shutdown().await;
    assert_audit(&store);
}

/// Issue 9: storage fails in the middle of a packet being raced. Opens that
/// did not commit are refused (never reported opened), the packet is
/// reloaded from what is committed, and once storage is back the race ends
/// with exactly `count` shares summing to the amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_survive_a_storage_failure_without_a_share_lost_or_paid_twice() {
    const K: u32 = 10;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(config(3600), dir.path()).await.unwrap();
    engine.deposit(1, 10_000, "d").await.unwrap();
    let users: Vec<u64> = (2..=31).collect();
    let packet = sent_packet(&engine, 1, send(1_000, K, Target::Users(users.clone()), "p")).await;
    let mut opened = std::collections::HashMap::new();
    for user in 2..=4u64 {
        let Reply::Opened { amount_fen, .. } = engine.call(user, Request::Open { packet }).await else { panic!() };
        opened.insert(user, amount_fen);
    }
    // Another connection holds the write lock past the busy timeout.
    let lock = rusqlite::Connection::open(dir.path().join(hongbao_store::DB_FILE)).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let racing: Vec<_> = (5..=12u64)
        .map(|user| {
            let engine = engine.clone();
            tokio::spawn(async move { (user, engine.call(user, Request::Open { packet }).await) })
        })
        .collect();
    for task in racing {
        match task.await.unwrap() {
            (_, Reply::Error { code: ErrorCode::Unavailable | ErrorCode::Overload, .. }) => {}
            // Memory counted the shares that were then not committed: the
            // packet looked finished until it was reloaded (advisory only;
            // no money moved, and a retry below is answered for good).
            (_, Reply::Error { code: ErrorCode::Finished, .. }) => {}
            (user, other) => panic!("user {user} while storage fails: {other:?}"),
        }
    }
    assert!(engine.storage_failure().is_some());
    let refused = engine.call(13, Request::Open { packet }).await;
    assert!(matches!(refused, Reply::Error { code: ErrorCode::Unavailable, .. }), "{refused:?}");
    lock.execute_batch("COMMIT").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while engine.storage_failure().is_some() {
        assert!(std::time::Instant::now() < deadline, "storage never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Everyone retries until answered for good.
    for &user in &users {
        for attempt in 0.. {
            match engine.call(user, Request::Open { packet }).await {
                Reply::Opened { amount_fen, .. } => {
                    if let Some(first) = opened.insert(user, amount_fen) {
                        assert_eq!(first, amount_fen, "a repeat answers the first share");
                    }
                    break;
                }
                Reply::Error { code: ErrorCode::Finished, .. } => break,
                Reply::Error { code: ErrorCode::Overload, .. } if attempt < 500 => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => panic!("user {user}: {other:?}"),
            }
        }
    }
    assert_eq!(opened.len(), K as usize, "exactly K opens: {opened:?}");
    assert_eq!(opened.values().sum::<i64>(), 1_000);
    let detail = engine.packet_detail(packet).await.unwrap();
    let committed: std::collections::HashMap<u64, i64> = detail.claims.iter().map(|c| (c.user, c.amount_fen)).collect();
    assert_eq!(committed, opened, "every reply is what storage holds");
    engine.shutdown().await;
    assert_audit(&StoreLocation::Sqlite(dir.path().to_owned()));
}

/// Issue 9: one user sent 1,000 one-fen packets to a victim (and 499 others)
/// in 10 s; the victim's oldest stored message, an operator's notice, was
/// pushed out, and the database grew by 500,000 rows. Now sends are rate
/// limited per sender, user notices never push out system messages, and a
/// sender has a budget of undelivered notices.
async fn packet_spam_is_limited_and_never_evicts_system_messages(stores: Stores) {
    use hongbao_core::limits::{PENDING_MESSAGES_PER_SENDER_MAX, PENDING_MESSAGES_PER_USER_MAX};
    use hongbao_proto::{PushBody, ServerFrame};

    // The rate: a burst, then `sends_per_s`.
    let store = stores.fresh();
    let config = config(3600);
    let rules = config.packet_rules.clone();
    let engine = Engine::open_at(config.clone(), &store).await.unwrap();
    engine.deposit(1, 1_000, "d").await.unwrap();
    for i in 0..rules.send_burst {
        sent_packet(&engine, 1, send(1, 1, Target::User(2), &format!("b{i}"))).await;
    }
    let limited = engine.call(1, send(1, 1, Target::User(2), "over")).await;
    assert!(matches!(limited, Reply::Error { code: ErrorCode::RateLimited, .. }), "{limited:?}");
    advance(&engine, &config, 1_000 / rules.sends_per_s as u64).await;
    sent_packet(&engine, 1, send(1, 1, Target::User(2), "later")).await;
    engine.shutdown().await;

    // Without a rate, a flood of notices to one victim keeps its cap and
    // leaves the operator's message alone; a sender's budget holds.
    let store = stores.fresh();
    let mut config = config.clone();
    config.packet_rules.sends_per_s = 0;
    let engine = Engine::open_at(config, &store).await.unwrap();
    let victim = 9;
    let notice = PushBody::Notice { topic: "ops".into(), text: "maintenance at 02:00".into() };
    engine.push(crate::PushTarget::User(victim), notice.clone(), true).await.unwrap();
    engine.deposit(1, 1_000_000, "d").await.unwrap();
    let spam = (0..=PENDING_MESSAGES_PER_USER_MAX).map(|i| {
        let engine = engine.clone();
        tokio::spawn(async move { engine.call(1, send(1, 1, Target::User(victim), &format!("s{i}"))).await })
    });
    for task in spam.collect::<Vec<_>>() {
        assert!(matches!(task.await.unwrap(), Reply::Sent { .. }));
    }
    let (outbox, mut inbox) = hongbao_boundary::Outbox::new(1_000);
    let _connection = engine.connect(victim, outbox).await.unwrap();
    let Some(ServerFrame::Push(first)) = inbox.try_recv() else { panic!("stored messages are delivered") };
    assert_eq!(first.body, notice, "the operator's message survived and comes first");

    // Another sender fills its budget of undelivered notices.
    engine.deposit(2, 1_000_000, "d2").await.unwrap();
    let group: Vec<u64> = (1_000..1_500).collect();
    let sends = PENDING_MESSAGES_PER_SENDER_MAX / group.len();
    for i in 0..sends {
        sent_packet(&engine, 2, send(100, 100, Target::Users(group.clone()), &format!("g{i}"))).await;
    }
    let over = engine.call(2, send(100, 100, Target::Users(group.clone()), "over")).await;
    assert!(matches!(over, Reply::Error { code: ErrorCode::RateLimited, .. }), "{over:?}");
    // A recipient reads one: room for one more notice.
    let (outbox, mut inbox) = hongbao_boundary::Outbox::new(1_000);
    let _reader = engine.connect(1_000, outbox).await.unwrap();
    let Some(ServerFrame::Push(read)) = inbox.try_recv() else { panic!() };
    assert_eq!(engine.call(1_000, Request::Ack { msg: read.msg }).await, Reply::Acked { msg: read.msg });
    sent_packet(&engine, 2, send(1, 1, Target::User(1_000), "one more")).await;
    engine.shutdown().await;
    assert_audit(&store);
}

/// Issue 9: every keyed shake that found nothing cost a turn of the writer
/// (8 flooding connections took an admin deposit from 1.2 to 144 ms). Its
/// lookup is a bounded read of committed wins now, and the writer is idle.
async fn keyed_shakes_that_find_nothing_leave_the_writer_alone(stores: Stores) {
    let store = stores.fresh();
    let engine = Engine::open_at(config(3600), &store).await.unwrap();
    engine.deposit(100, 1_000, "d").await.unwrap();
    let before = engine.stats().await;
    let shakes = (0..2_000u64).map(|i| {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine.call(1 + i % 40, Request::Shake { campaign: 0, key: Some(format!("k{i}")) }).await
        })
    });
    for task in shakes.collect::<Vec<_>>() {
        match task.await.unwrap() {
            // Beyond the read gate's queue: refused at once, still no writer.
            Reply::Shake(ShakeResult::NotRunning | ShakeResult::Overload) => {}
            other => panic!("{other:?}"),
        }
    }
    let after = engine.stats().await;
    assert_eq!((after.commits, after.committed_ops), (before.commits, before.committed_ops), "no writer turn");
    engine.shutdown().await;
}

/// SET 1 of a cluster of 2: users homed here are the odd ones.
fn set_one_of_two(expiry_s: u64) -> EngineConfig {
    EngineConfig { set: SetMap::new(1, 2).unwrap(), ..config(expiry_s) }
}

/// An `InvalidRequest` reply's message (panics on any other reply).
fn invalid_request(reply: Reply) -> String {
    match reply {
        Reply::Error { code: ErrorCode::InvalidRequest, message } => message,
        other => panic!("expected invalid_request, got {other:?}"),
    }
}

/// An `EngineError::Invalid`'s message (panics on anything else).
fn invalid<T>(result: Result<T, EngineError>) -> String {
    match result {
        Err(EngineError::Invalid(message)) => message,
        Err(other) => panic!("expected EngineError::Invalid, got {other:?}"),
        Ok(_) => panic!("expected EngineError::Invalid, got a success"),
    }
}

async fn a_set_serves_its_own_users_as_a_single_node_does(stores: Stores) {
    let store = stores.fresh();
    let engine = Engine::open_at(set_one_of_two(3600), &store).await.unwrap();
    assert_eq!(engine.set(), SetMap::new(1, 2).unwrap());
    let stats = engine.stats().await;
    assert_eq!((stats.set, stats.sets), (1, 2));
    engine.deposit(1, 1_000, "d").await.unwrap();
    assert_eq!(engine.call(1, Request::Balance).await, Reply::Balance { balance_fen: 1_000 });
    let shake = Request::Shake { campaign: 0, key: None };
    assert_eq!(engine.answer_inline(1, &shake), Some(Reply::Shake(ShakeResult::NotRunning)));
    assert_eq!(engine.call(1, shake).await, Reply::Shake(ShakeResult::NotRunning));
    // Every shard makes ids of SET 1: senders on each of the three shards.
    let mut shards = std::collections::BTreeSet::new();
    for sender in [1, 3, 5] {
        if sender != 1 {
            engine.deposit(sender, 10, &format!("d{sender}")).await.unwrap();
        }
        let packet = sent_packet(&engine, sender, send(4, 2, Target::Users(vec![7, 9]), "p")).await;
        assert_eq!(set_of(packet), 1, "packet {packet}");
        assert!(packet > 1 << 48 && packet < 1 << 53);
        shards.insert(shard_of(packet));
        let opened = engine.call(7, Request::Open { packet }).await;
        assert!(matches!(opened, Reply::Opened { .. }), "{opened:?}");
    }
    assert_eq!(shards.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    engine.shutdown().await;
    assert_audit(&store);
}

async fn a_set_refuses_users_homed_on_another_set(stores: Stores) {
    let store = stores.fresh();
    let engine = Engine::open_at(set_one_of_two(3600), &store).await.unwrap();
    let foreign = "user 2 is homed on SET 0, this is SET 1";
    // The admin API's entry points.
    assert_eq!(invalid(engine.deposit(2, 100, "d").await), foreign);
    assert_eq!(invalid(engine.withdraw(2, 100, "w").await), foreign);
    assert_eq!(invalid(engine.balance(2).await), foreign);
    let spec = CampaignSpec {
        funder: 2,
        total_fen: 100,
        rule: AmountRule::Count { packets: 10 },
        rate_per_s: 10,
        win_cap_per_user: None,
    };
    assert_eq!(invalid(engine.create_campaign(spec, "c").await), foreign);
    let body = hongbao_proto::PushBody::Notice { topic: "t".into(), text: "x".into() };
    let no_push = "cannot push to user 2 is homed on SET 0, this is SET 1";
    assert_eq!(invalid(engine.push(crate::PushTarget::User(2), body.clone(), false).await), no_push);
    assert_eq!(invalid(engine.push(crate::PushTarget::Users(vec![1, 2]), body.clone(), true).await), no_push);
    let (outbox, _frames) = hongbao_boundary::Outbox::new(8);
    assert_eq!(invalid(engine.connect(2, outbox.clone()).await), foreign);
    // Their own users are served: a push to user 1, with a connection.
    let _connection = engine.connect(1, outbox).await.unwrap();
    let receipt = engine.push(crate::PushTarget::Users(vec![1, 3]), body, false).await.unwrap();
    assert_eq!((receipt.targets, receipt.delivered), (2, 1));
    // Client requests: refused whatever they are, before anything is looked up.
    let shake = Request::Shake { campaign: 0, key: None };
    assert_eq!(engine.answer_inline(2, &shake), None, "no answer from this SET's gates");
    assert_eq!(invalid_request(engine.call(2, shake).await), foreign);
    assert_eq!(invalid_request(engine.call(2, Request::Balance).await), foreign);
    assert_eq!(invalid_request(engine.call(2, Request::Ack { msg: 1 }).await), foreign);
    assert_eq!(invalid_request(engine.call(2, send(10, 1, Target::User(3), "s")).await), foreign);
    // Nothing moved.
    let stats = engine.stats().await;
    assert_eq!((stats.commits > 0, stats.user_balances_fen, stats.deposits_minus_withdrawals_fen), (true, 0, 0));
    engine.shutdown().await;
    assert_audit(&store);
}

async fn a_set_refuses_packets_of_another_set(stores: Stores) {
    let store = stores.fresh();
    let engine = Engine::open_at(set_one_of_two(3600), &store).await.unwrap();
    engine.deposit(1, 1_000, "d").await.unwrap();
    // A packet of this SET: its own users open it, exactly as on one node.
    engine.set_group(9, vec![1, 3, 5]).await.unwrap();
    let packet = sent_packet(&engine, 1, send(100, 2, Target::Group(9), "g")).await;
    assert_eq!(set_of(packet), 1);
    assert_eq!(engine.call(3, Request::Grab { packet }).await, Reply::Grab { packet, state: GrabState::CanOpen });
    let opened = |r: Reply| match r {
        Reply::Opened { amount_fen, .. } => amount_fen,
        other => panic!("{other:?}"),
    };
    let paid =
        opened(engine.call(3, Request::Open { packet }).await) + opened(engine.call(5, Request::Open { packet }).await);
    assert_eq!(paid, 100);
    assert!(matches!(engine.call(5, Request::Detail { packet }).await, Reply::Detail(d) if d.packet == packet));
    assert_eq!(engine.packet_detail(packet).await.unwrap().claims.len(), 2);
    // A user of SET 0 asking about it is answered as anyone is: not a
    // recipient, so not eligible.
    assert_eq!(engine.call(2, Request::Grab { packet }).await, Reply::Grab { packet, state: GrabState::NotEligible });
    assert!(matches!(
        engine.call(2, Request::Detail { packet }).await,
        Reply::Error { code: ErrorCode::NotEligible, .. }
    ));

    // A packet id of SET 0 is refused as that, not as a missing packet.
    let of_set_zero = make_packet_id(0, shard_of(packet), packet & hongbao_core::ids::SEQUENCE_MAX);
    let elsewhere = format!("packet {of_set_zero} belongs to SET 0, this is SET 1");
    for req in [
        Request::Grab { packet: of_set_zero },
        Request::Open { packet: of_set_zero },
        Request::Detail { packet: of_set_zero },
    ] {
        assert_eq!(invalid_request(engine.call(3, req).await), elsewhere);
    }
    assert_eq!(invalid(engine.packet_detail(of_set_zero).await), elsewhere);
    // An id of a SET the cluster does not have is simply not found.
    let of_no_set = make_packet_id(7, 0, 1);
    assert!(matches!(
        engine.call(3, Request::Open { packet: of_no_set }).await,
        Reply::Error { code: ErrorCode::NotFound, .. }
    ));
    assert!(matches!(engine.packet_detail(of_no_set).await, Err(EngineError::NotFound(_))));
    assert_eq!(engine.balance(1).await.unwrap(), 900);
    engine.shutdown().await;
    assert_audit(&store);
}

async fn data_of_one_set_reopened_as_another_refuses_to_start(stores: Stores) {
    let store = stores.fresh();
    let packet = {
        let engine = Engine::open_at(set_one_of_two(3600), &store).await.unwrap();
        engine.deposit(1, 100, "d").await.unwrap();
        let packet = sent_packet(&engine, 1, send(10, 1, Target::User(3), "p")).await;
        engine.shutdown().await;
        packet
    };
    let as_set_zero = EngineConfig { set: SetMap::new(0, 2).unwrap(), ..config(3600) };
    let refused = Engine::open_at(as_set_zero, &store).await.err().expect("SET 0 must not adopt SET 1's packets");
    let expected = format!(
        "the data has open packets of SET 1 (packet {packet}) but this engine is SET 0 of 2; open it as the SET that wrote it"
    );
    assert!(matches!(&refused, EngineError::Invalid(m) if *m == expected), "{refused:?}");
    // Nor does a single node: it is SET 0 of 1.
    let single = Engine::open_at(config(3600), &store).await.err().expect("a single node is SET 0");
    assert!(matches!(single, EngineError::Invalid(_)), "{single:?}");
    // As the SET that wrote it, it starts, with its packet.
    let engine = Engine::open_at(set_one_of_two(3600), &store).await.unwrap();
    assert!(matches!(engine.call(3, Request::Open { packet }).await, Reply::Opened { amount_fen: 10, .. }));
    engine.shutdown().await;
    assert_audit(&store);
}

/// SET 1 of 2 has only odd users; with 4 shards, `user % 4` would send
/// them all to shards 1 and 3, and the campaign's packets released on
/// shards 0 and 2 would never be won. Every shard gets users, every packet
/// is won, the campaign finishes by itself, and a remote gateway's copy of
/// the gates picks the same shard as the engine.
async fn a_set_spreads_its_users_over_every_shard_when_sets_and_shards_share_a_factor(stores: Stores) {
    let store = stores.fresh();
    let config = EngineConfig { shards: 4, ..set_one_of_two(3600) };
    let engine = Engine::open_at(config.clone(), &store).await.unwrap();
    // Senders 1, 3, 5, 7 (k = 0..3): one on each shard.
    let mut shards = std::collections::BTreeSet::new();
    for sender in [1u64, 3, 5, 7] {
        engine.deposit(sender, 10, &format!("d{sender}")).await.unwrap();
        shards.insert(shard_of(sent_packet(&engine, sender, send(1, 1, Target::User(9), "p")).await));
    }
    assert_eq!(shards.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3]);

    engine.deposit(101, 1_000, "d").await.unwrap();
    // On a cluster of 2 the campaign is split: this SET's part is half of
    // it, 8 packets of 40 fen (the other half goes to SET 0's outbox).
    let spec = CampaignSpec {
        funder: 101,
        total_fen: 80,
        rule: AmountRule::Count { packets: 16 },
        rate_per_s: 2_000,
        win_cap_per_user: None,
    };
    let c = engine.create_campaign(spec, "c").await.unwrap();
    assert_eq!((c.total_fen, c.rule, c.rate_per_s), (40, AmountRule::Count { packets: 8 }, 1_000));
    engine.start_campaign(c.id).await.unwrap();
    advance(&engine, &config, 100).await;
    let plain = Request::Shake { campaign: 0, key: None };
    let homed: Vec<u64> = (0..16).map(|k| 2 * k + 1).collect();
    for &user in &homed {
        let remote = engine.gate_view().answer(user, &plain).map(Reply::Shake);
        assert_eq!(remote, engine.answer_inline(user, &plain), "user {user}");
    }
    let mut wins = 0;
    for _ in 0..200 {
        for &user in &homed {
            if let Reply::Shake(ShakeResult::Won { .. }) = engine.call(user, plain.clone()).await {
                wins += 1;
            }
        }
        if wins == 8 {
            break;
        }
        advance(&engine, &config, 5).await;
    }
    assert_eq!(wins, 8, "every shard's packets were won");
    finishes(&engine, &config, c.id).await;
    engine.shutdown().await;
    assert_audit(&store);
}

/// Issue 9: `{"group": 0}` answered 404 `not_found`; ids are documented as
/// 1..2^53-1, so it is an invalid request like `users: [0]`.
async fn group_zero_is_an_invalid_request_not_a_missing_group(stores: Stores) {
    let store = stores.fresh();
    let engine = Engine::open_at(config(3600), &store).await.unwrap();
    engine.deposit(1, 100, "d").await.unwrap();
    let body = hongbao_proto::PushBody::Notice { topic: "t".into(), text: "x".into() };
    for group in [0, hongbao_core::ID_MAX + 1] {
        assert!(matches!(
            engine.push(crate::PushTarget::Group(group), body.clone(), false).await,
            Err(EngineError::Invalid(_))
        ));
        assert!(matches!(engine.set_group(group, vec![1]).await, Err(EngineError::Invalid(_))));
        let reply = engine.call(1, send(10, 1, Target::Group(group), "g")).await;
        assert!(matches!(reply, Reply::Error { code: ErrorCode::InvalidRequest, .. }), "{reply:?}");
    }
    let reply = engine.call(1, send(10, 1, Target::Group(5), "g")).await;
    assert!(
        matches!(reply, Reply::Error { code: ErrorCode::NotFound, .. }),
        "a valid id that names no group: {reply:?}"
    );
    engine.shutdown().await;
}

/// SET `set` of a cluster of 2 (SET 0 has the even users, SET 1 the odd).
fn set_of_two(set: u8) -> EngineConfig {
    EngineConfig { set: SetMap::new(set, 2).unwrap(), ..config(3600) }
}

/// Each store's audit and cross-SET rows (SET n is `stores[n]`), and the
/// cluster audit of them all (on a thread of its own: a PostgreSQL client
/// may not run on the test's runtime).
fn cluster_audit(
    stores: &[&StoreLocation],
) -> (hongbao_core::audit::ClusterReport, Vec<(hongbao_store::AuditReport, hongbao_store::CrossRows)>) {
    let stores: Vec<StoreLocation> = stores.iter().map(|s| (*s).clone()).collect();
    let parts = std::thread::spawn(move || {
        stores.iter().map(|s| hongbao_store::audit_with_cross(s).unwrap()).collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    (cluster_of(&parts), parts)
}

fn cluster_of(parts: &[(hongbao_store::AuditReport, hongbao_store::CrossRows)]) -> hongbao_core::audit::ClusterReport {
    let mut auditor = hongbao_core::audit::ClusterAuditor::new(parts.len() as u8);
    for (set, (report, rows)) in parts.iter().enumerate() {
        auditor.add_set(set as u8, report.clone(), rows.clone());
    }
    auditor.finish()
}

fn opened_amount(reply: Reply) -> i64 {
    match reply {
        Reply::Opened { amount_fen, .. } => amount_fen,
        other => panic!("{other:?}"),
    }
}

/// A packet of SET 0 sent to a group with members on both SETs and opened
/// by all of them, through SET 0's engine: users homed on SET 1 are paid
/// on SET 1 once the transport carries SET 0's outbox there, and only once
/// however often it does; their notices are stored and pushed there. The
/// cluster audit passes with the credits in flight, and after.
async fn a_packet_sent_across_sets_pays_each_opener_on_their_own_set_exactly_once(stores: Stores) {
    let (store0, store1) = (stores.fresh(), stores.fresh());
    let zero = Engine::open_at(set_of_two(0), &store0).await.unwrap();
    let one = Engine::open_at(set_of_two(1), &store1).await.unwrap();
    zero.deposit(2, 1_000, "d").await.unwrap();
    one.deposit(1, 50, "d").await.unwrap();
    let members = vec![1, 2, 3, 4, 5, 6];
    zero.set_group(7, members.clone()).await.unwrap();
    let (outbox, mut frames) = hongbao_boundary::Outbox::new(16);
    let _three = one.connect(3, outbox).await.unwrap();
    let packet = sent_packet(&zero, 2, send(600, 6, Target::Group(7), "p")).await;
    assert_eq!(set_of(packet), 0);
    assert_eq!(zero.cross_backlog(), 3, "a notice for each of users 1, 3 and 5");

    let mut shares = std::collections::BTreeMap::new();
    for &user in &members {
        shares.insert(user, opened_amount(zero.call(user, Request::Open { packet }).await));
    }
    assert_eq!(shares.values().sum::<i64>(), 600);
    // A foreign opener's retry is the first answer; nothing more is written.
    assert_eq!(
        zero.call(3, Request::Open { packet }).await,
        Reply::Opened { packet, amount_fen: shares[&3], repeat: true, finished: true }
    );
    assert!(matches!(zero.call(3, Request::Detail { packet }).await, Reply::Detail(d) if d.claims.len() == 6));
    let away: i64 = [1, 3, 5].iter().map(|u| shares[u]).sum();
    assert_eq!(zero.cross_backlog(), 6, "and a credit for each of them");
    assert_eq!(zero.stats().await.transit_fen, away);
    assert_eq!(one.balance(3).await.unwrap(), 0, "not paid on SET 1 yet");

    // Before the transport: the credits are in flight, and the books close.
    let (before, _) = cluster_audit(&[&store0, &store1]);
    assert!(before.passed(), "{:#?}", before.violations);
    let flight = &before.in_flight;
    assert_eq!(flight.len(), 1);
    assert_eq!((flight[0].from, flight[0].to, flight[0].credits, flight[0].notices), (0, 1, 3, 3));
    assert_eq!(flight[0].amount_fen, away);

    // The transport, delivering everything twice: applied once.
    let messages = zero.cross_unpublished(100).await.unwrap();
    assert_eq!(messages.len(), 6);
    assert!(messages.iter().all(|m| (m.from, m.to, m.packet) == (0, 1, packet)));
    for round in 0..2 {
        for m in &messages {
            assert_eq!(one.apply_cross(m.clone()).await.unwrap(), round == 0, "round {round}: {m:?}");
        }
    }
    zero.cross_published(messages.iter().map(CrossMessage::key).collect()).await.unwrap();
    assert_eq!(zero.cross_unpublished(100).await.unwrap(), vec![]);
    assert_eq!(zero.cross_backlog(), 0);
    for user in [1, 3, 5] {
        let before = if user == 1 { 50 } else { 0 };
        assert_eq!(one.balance(user).await.unwrap(), before + shares[&user], "user {user}");
    }
    for user in [2, 4, 6] {
        let sent = if user == 2 { 1_000 - 600 } else { 0 };
        assert_eq!(zero.balance(user).await.unwrap(), sent + shares[&user], "user {user}");
    }
    let (s0, s1) = (zero.stats().await, one.stats().await);
    assert_eq!((s0.transit_fen, s1.transit_fen), (away, -away));
    assert_eq!(
        s1.user_balances_fen + s1.packet_escrow_fen + s1.campaign_escrow_fen + s1.transit_fen,
        s1.deposits_minus_withdrawals_fen
    );
    // User 3 was online on SET 1: the notice was pushed there, stored.
    let pushed: Vec<_> = std::iter::from_fn(|| frames.try_recv()).collect();
    assert!(
        pushed.iter().any(|f| matches!(f, hongbao_proto::ServerFrame::Push(p)
            if p.msg != 0 && matches!(p.body, hongbao_proto::PushBody::PacketReceived { packet: q, sender: 2, .. } if q == packet))),
        "{pushed:?}"
    );
    // User 5 was not: the stored notice comes on connect.
    let (outbox, mut frames) = hongbao_boundary::Outbox::new(16);
    let _five = one.connect(5, outbox).await.unwrap();
    let stored: Vec<_> = std::iter::from_fn(|| frames.try_recv()).collect();
    assert_eq!(stored.len(), 1, "{stored:?}");

    let (after, parts) = cluster_audit(&[&store0, &store1]);
    assert!(after.passed(), "{:#?}", after.violations);
    assert_eq!((after.in_flight.len(), after.totals.in_flight_fen), (0, 0));
    assert_eq!(after.totals.user_balances_fen, 1_050);
    // A tampered row, or a credit applied twice, fails it.
    let mut tampered = parts.clone();
    let credit = tampered[1].1.ins.iter_mut().find(|r| r.kind == CrossKind::Credit).unwrap();
    credit.amount_fen += 1;
    assert!(!cluster_of(&tampered).passed());
    let mut doubled = parts.clone();
    let again = doubled[1].1.ins[0].clone();
    doubled[1].1.ins.push(again);
    let report = cluster_of(&doubled);
    assert!(report.violations.iter().any(|v| v.ends_with("twice")), "{:?}", report.violations);
    let mut lost = parts;
    lost[0].1.outs.retain(|r| r.kind != CrossKind::Credit || r.user != 3);
    assert!(!cluster_of(&lost).passed());
    zero.shutdown().await;
    one.shutdown().await;
    assert_audit(&store0);
    assert_audit(&store1);
}

/// One packet of K shares on SET 0 raced by 10·K members homed on both
/// SETs: exactly K shares, summing to the packet; one outbox credit per
/// foreign winner, of their share, and none for anyone else.
async fn one_packet_raced_across_sets_pays_k_shares_and_one_credit_per_foreign_winner(stores: Stores) {
    const K: u32 = 20;
    let store = stores.fresh();
    let engine = Engine::open_at(set_of_two(0), &store).await.unwrap();
    engine.deposit(2, 10_000, "d").await.unwrap();
    let members: Vec<u64> = (2..=(10 * K as u64 + 2)).collect();
    engine.set_group(7, members.clone()).await.unwrap();
    let packet = sent_packet(&engine, 2, send(5_000, K, Target::Group(7), "p")).await;
    let mut tasks = Vec::new();
    for user in members.iter().copied().filter(|&u| u != 2) {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move { (user, engine.call(user, Request::Open { packet }).await) }));
    }
    let mut opened = std::collections::BTreeMap::new();
    for t in tasks {
        match t.await.unwrap() {
            (user, Reply::Opened { amount_fen, repeat: false, .. }) => {
                assert!(opened.insert(user, amount_fen).is_none())
            }
            (_, Reply::Error { code: ErrorCode::Finished, .. }) => {}
            (user, other) => panic!("user {user}: unexpected {other:?}"),
        }
    }
    assert_eq!(opened.len(), K as usize, "exactly K opens");
    assert_eq!(opened.values().sum::<i64>(), 5_000, "shares sum to the packet");
    // Every winner retries: the first answer, and no second row.
    for (&user, &amount_fen) in &opened {
        assert_eq!(
            engine.call(user, Request::Open { packet }).await,
            Reply::Opened { packet, amount_fen, repeat: true, finished: true }
        );
    }
    let foreign: std::collections::BTreeMap<u64, i64> =
        opened.iter().filter(|(&u, _)| u % 2 == 1).map(|(&u, &a)| (u, a)).collect();
    assert!(!foreign.is_empty() && foreign.len() < K as usize, "winners on both SETs (seed-dependent): {opened:?}");
    let outbox = engine.cross_unpublished(10_000).await.unwrap();
    let credits: std::collections::BTreeMap<u64, i64> = outbox
        .iter()
        .filter_map(|m| match m.body {
            CrossBody::Credit { amount_fen } => Some((m.user, amount_fen)),
            _ => None,
        })
        .collect();
    assert_eq!(credits, foreign, "one credit per foreign winner, of their share");
    let credit_rows = outbox.iter().filter(|m| m.kind() == CrossKind::Credit).count();
    assert_eq!(credit_rows, foreign.len(), "no credit twice");
    let odd_members = members.iter().filter(|&&u| u % 2 == 1).count();
    assert_eq!(outbox.len() - credit_rows, odd_members, "a notice per member homed on SET 1");
    assert_eq!(engine.cross_backlog(), outbox.len() as u64);
    assert_eq!(engine.stats().await.transit_fen, foreign.values().sum::<i64>());
    engine.shutdown().await;
    assert_audit(&store);
}

/// `apply_cross` refuses what is not this SET's to apply, before anything
/// is written; `cross_published` takes only this SET's keys.
async fn a_set_applies_only_messages_meant_for_it(stores: Stores) {
    let store = stores.fresh();
    let one = Engine::open_at(set_of_two(1), &store).await.unwrap();
    let packet = make_packet_id(0, 1, 9);
    let notice = crate::checks::encode_body(&hongbao_proto::PushBody::Notice { topic: "t".into(), text: "x".into() });
    let credit =
        CrossMessage { from: 0, to: 1, packet, user: 3, created_ms: 1, body: CrossBody::Credit { amount_fen: 5 } };
    let refused = [
        ("for SET 0", CrossMessage { to: 0, ..credit.clone() }),
        ("from itself", CrossMessage { from: 1, ..credit.clone() }),
        ("from no SET", CrossMessage { from: 2, ..credit.clone() }),
        ("a user of SET 0", CrossMessage { user: 4, ..credit.clone() }),
        ("a packet of SET 1", CrossMessage { packet: make_packet_id(1, 1, 9), ..credit.clone() }),
        ("no money", CrossMessage { body: CrossBody::Credit { amount_fen: 0 }, ..credit.clone() }),
        ("not a push", CrossMessage { body: CrossBody::Notice { body: vec![0xff; 3] }, ..credit.clone() }),
    ];
    for (why, msg) in refused {
        assert!(matches!(one.apply_cross(msg).await, Err(EngineError::Invalid(_))), "{why}");
    }
    assert!(one.apply_cross(credit.clone()).await.unwrap());
    assert!(one
        .apply_cross(CrossMessage { body: CrossBody::Notice { body: notice }, ..credit.clone() })
        .await
        .unwrap());
    // The same credit with another amount: one of the two is corrupt.
    let other = CrossMessage { body: CrossBody::Credit { amount_fen: 6 }, ..credit.clone() };
    assert!(matches!(one.apply_cross(other).await, Err(EngineError::Invalid(m)) if m.contains("corrupt")));
    assert_eq!(one.balance(3).await.unwrap(), 5);
    assert!(matches!(one.cross_published(vec![credit.key()]).await, Err(EngineError::Invalid(_))), "SET 0's key");
    assert_eq!(one.cross_unpublished(0).await.unwrap(), vec![]);
    one.shutdown().await;
    assert_audit(&store);
    // A single node applies nothing: there is no other SET.
    let single = Engine::open_at(config(3600), &stores.fresh()).await.unwrap();
    assert!(matches!(single.apply_cross(CrossMessage { to: 0, ..credit }).await, Err(EngineError::Invalid(_))));
    assert_eq!(single.cross_backlog(), 0);
    single.shutdown().await;
}

/// Shakes every one of `users` on `engine` for campaign `id` once; answers
/// the sum of what they won and how many won.
async fn shake_all(engine: &Engine, id: u64, users: impl Iterator<Item = u64>) -> (i64, u64) {
    let (mut won, mut winners) = (0, 0);
    for user in users {
        match engine.call(user, Request::Shake { campaign: id, key: None }).await {
            Reply::Shake(ShakeResult::Won { amount_fen, .. }) => {
                won += amount_fen;
                winners += 1;
            }
            Reply::Shake(ShakeResult::None) => {}
            other => panic!("user {user}: {other:?}"),
        }
    }
    (won, winners)
}

/// A campaign of a SET-0 funder on a cluster of 2: SET 0 keeps half of its
/// budget and rate and sends SET 1 the other half through the outbox (the
/// fund creates SET 1's part, with the same id, once however often it is
/// delivered). Both parts run on their own schedules, users of both SETs
/// win, and a stop returns SET 1's unreleased money to the funder on SET 0
/// through a refund, applied once; a second stop refunds nothing. The
/// cluster audit passes with the fund and the refund in flight, and after.
async fn a_campaign_across_sets_is_split_funded_won_on_both_and_refunded_once(stores: Stores) {
    use hongbao_core::ids::campaign_set;
    let (store0, store1) = (stores.fresh(), stores.fresh());
    let (config0, config1) = (set_of_two(0), set_of_two(1));
    let zero = Engine::open_at(config0.clone(), &store0).await.unwrap();
    let one = Engine::open_at(config1.clone(), &store1).await.unwrap();
    zero.deposit(100, 10_000, "d").await.unwrap();
    let spec = CampaignSpec {
        funder: 100,
        total_fen: 1_001,
        rule: AmountRule::Count { packets: 41 },
        rate_per_s: 11,
        win_cap_per_user: Some(1),
    };
    // Refused where a SET would get nothing, and by a SET the funder is not homed on.
    let starving = CampaignSpec { rate_per_s: 1, ..spec.clone() };
    assert!(matches!(zero.create_campaign(starving, "s").await, Err(EngineError::Invalid(e)) if e.contains("rate")));
    assert!(matches!(one.create_campaign(spec.clone(), "c").await, Err(EngineError::Invalid(_))));
    let c = zero.create_campaign(spec.clone(), "c").await.unwrap();
    assert_eq!(zero.create_campaign(spec, "c").await.unwrap().id, c.id, "idempotent create");
    assert_eq!(campaign_set(c.id), 0);
    // Part 0: ⌈1001/2⌉ fen, ⌈41/2⌉ packets, ⌈11/2⌉ per second.
    assert_eq!((c.total_fen, c.rule, c.rate_per_s, c.escrow_fen), (501, AmountRule::Count { packets: 21 }, 6, 501));
    assert_eq!(zero.balance(100).await.unwrap(), 10_000 - 1_001);
    assert!(matches!(one.start_campaign(c.id).await, Err(EngineError::NotFound(_))), "not funded yet");

    let (flying, _) = cluster_audit(&[&store0, &store1]);
    assert!(flying.passed(), "{:#?}", flying.violations);
    assert_eq!(flying.in_flight.len(), 1);
    assert_eq!((flying.in_flight[0].campaign_moves, flying.in_flight[0].amount_fen), (1, 500));

    let funds = zero.cross_unpublished(100).await.unwrap();
    assert_eq!(funds.len(), 1);
    assert_eq!((funds[0].kind(), funds[0].to, funds[0].packet, funds[0].amount_fen()), (CrossKind::Fund, 1, c.id, 500));
    for round in 0..2 {
        assert_eq!(one.apply_cross(funds[0].clone()).await.unwrap(), round == 0, "round {round}");
    }
    zero.cross_published(funds.iter().map(CrossMessage::key).collect()).await.unwrap();
    let part = one.campaign(c.id).await.unwrap();
    assert_eq!(
        (part.funder, part.total_fen, part.rule, part.rate_per_s, part.status, part.escrow_fen),
        (100, 500, AmountRule::Count { packets: 20 }, 5, CampaignStatus::Created, 500)
    );
    assert_eq!(one.campaigns().await.unwrap().len(), 1);

    zero.start_campaign(c.id).await.unwrap();
    one.start_campaign(c.id).await.unwrap();
    advance(&zero, &config0, 1_000).await;
    advance(&one, &config1, 1_000).await;
    let (won0, winners0) = shake_all(&zero, c.id, (2..=80).step_by(2)).await;
    let (won1, winners1) = shake_all(&one, c.id, (1..=79).step_by(2)).await;
    assert_eq!((winners0, winners1), (6, 5), "each part releases its own rate");
    assert!(won0 > 0 && won1 > 0);

    let stopped0 = zero.stop_campaign(c.id).await.unwrap();
    assert_eq!((stopped0.won_fen, stopped0.refunded_fen, stopped0.escrow_fen), (won0, 501 - won0, 0));
    let stopped1 = one.stop_campaign(c.id).await.unwrap();
    assert_eq!((stopped1.won_fen, stopped1.refunded_fen, stopped1.escrow_fen), (won1, 500 - won1, 0));
    assert_eq!(zero.balance(100).await.unwrap(), 10_000 - 1_001 + 501 - won0, "SET 1's part is in flight");
    let (flying, _) = cluster_audit(&[&store0, &store1]);
    assert!(flying.passed(), "{:#?}", flying.violations);
    assert_eq!(flying.totals.in_flight_fen, 500 - won1);

    let refunds = one.cross_unpublished(100).await.unwrap();
    assert_eq!(refunds.len(), 1);
    assert_eq!((refunds[0].kind(), refunds[0].to, refunds[0].user), (CrossKind::Refund, 0, 100));
    for round in 0..2 {
        assert_eq!(zero.apply_cross(refunds[0].clone()).await.unwrap(), round == 0, "round {round}");
    }
    // Refused: a refund for someone who is not the funder, a fund keyed
    // for another SET, of a campaign of another SET than its sender's.
    let not_funder = CrossMessage { user: 102, ..refunds[0].clone() };
    assert!(matches!(zero.apply_cross(not_funder).await, Err(EngineError::Invalid(_))));
    let misaddressed = CrossMessage { user: 0, ..funds[0].clone() };
    assert!(matches!(one.apply_cross(misaddressed).await, Err(EngineError::Invalid(_))));
    let foreign = CrossMessage { packet: hongbao_core::ids::make_campaign_id(1, 9), ..funds[0].clone() };
    assert!(matches!(one.apply_cross(foreign).await, Err(EngineError::Invalid(_))));
    one.cross_published(refunds.iter().map(CrossMessage::key).collect()).await.unwrap();
    // A second stop refunds nothing and writes nothing.
    assert_eq!(one.stop_campaign(c.id).await.unwrap().refunded_fen, 500 - won1);
    assert_eq!(one.cross_unpublished(100).await.unwrap(), vec![]);
    assert_eq!(zero.balance(100).await.unwrap(), 10_000 - won0 - won1);
    let won_total = stopped0.won_fen + stopped1.won_fen;
    assert_eq!(won_total + stopped0.refunded_fen + stopped1.refunded_fen, 1_001);

    let (after, parts) = cluster_audit(&[&store0, &store1]);
    assert!(after.passed(), "{:#?}", after.violations);
    assert_eq!((after.in_flight.len(), after.totals.in_flight_fen, after.totals.escrow_fen), (0, 0, 0));
    // A fund or refund applied with another amount, or written and lost, fails it.
    for kind in [CrossKind::Fund, CrossKind::Refund] {
        let mut tampered = parts.clone();
        let row = tampered.iter_mut().flat_map(|p| p.1.ins.iter_mut()).find(|r| r.kind == kind).unwrap();
        row.amount_fen += 1;
        assert!(!cluster_of(&tampered).passed(), "{kind:?}");
        let mut lost = parts.clone();
        for p in &mut lost {
            p.1.outs.retain(|r| r.kind != kind);
        }
        assert!(!cluster_of(&lost).passed(), "{kind:?}");
    }
    assert_eq!(after.totals.user_balances_fen, 10_000);
    zero.shutdown().await;
    one.shutdown().await;
    assert_audit(&store0);
    assert_audit(&store1);
}
