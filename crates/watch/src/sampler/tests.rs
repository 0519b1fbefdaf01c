//! The sampler on a paused tokio clock: a snapshot a second, built from the
//! recorder's deltas (not its totals) and the engine reading.

use super::*;
use crate::alerts::{AlertState, Signal};
use crate::recorder::WatchRecorder;
use metrics::{Key, Label, Metadata, Recorder};

static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);
const START_MS: u64 = 1_767_139_200_000;

struct Fixed(EngineReading);

impl EngineSource for Fixed {
    async fn read(&self) -> EngineReading {
        self.0.clone()
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
}

fn balanced() -> EngineReading {
    EngineReading {
        connections: 1234,
        campaigns_running: 1,
        writer_queue_depth: 2,
        shard_queue_depth: 3,
        user_balances_fen: 100,
        packet_escrow_fen: 20,
        campaign_escrow_fen: 30,
        in_flight_fen: 0,
        deposits_minus_withdrawals_fen: 150,
        storage_failure: None,
    }
}

fn config() -> SamplerConfig {
    SamplerConfig { clock: Arc::new(TokioClock::starting_at(START_MS)), ..SamplerConfig::default() }
}

/// Waits for the next snapshot (the paused clock jumps to the tick).
async fn next(updates: &mut watch::Receiver<u64>, live: &Live) -> Snapshot {
    updates.changed().await.unwrap();
    live.latest().unwrap().snapshot.clone()
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_a_second_from_the_deltas() {
    let recorder = WatchRecorder::new();
    let shake_none =
        recorder.register_counter(&key("hongbao_requests_total", &[("op", "shake"), ("result", "none")]), &META);
    let shake_overload =
        recorder.register_counter(&key("hongbao_requests_total", &[("op", "shake"), ("result", "overload")]), &META);
    let open_finished =
        recorder.register_counter(&key("hongbao_requests_total", &[("op", "open"), ("result", "finished")]), &META);
    let shake_seconds = recorder.register_histogram(&key("hongbao_request_seconds", &[("op", "shake")]), &META);
    let won = recorder.register_counter(&key("hongbao_shakes_total", &[("result", "won")]), &META);
    let opened = recorder.register_counter(&key("hongbao_opens_total", &[("result", "opened")]), &META);
    let batch = recorder.register_histogram(&key("hongbao_commit_batch_ops", &[]), &META);
    let commit = recorder.register_histogram(&key("hongbao_commit_seconds", &[]), &META);
    let overload = recorder.register_counter(&key("hongbao_overload_total", &[("where", "shard_queue")]), &META);
    let parked = recorder.register_gauge(&key("hongbao_connections_parked", &[]), &META);
    // Before the sampler starts: not the first second's.
    shake_none.increment(10_000);
    shake_seconds.record_many(5.0, 100);

    let live = Live::new();
    let (stop, stopped) = watch::channel(false);
    let task = spawn(recorder.registry(), Fixed(balanced()), live.clone(), config(), stopped);
    let mut updates = live.subscribe();

    shake_none.increment(950);
    shake_overload.increment(50);
    open_finished.increment(12);
    shake_seconds.record_many(0.0002, 900);
    shake_seconds.record_many(0.002, 100);
    won.increment(3);
    opened.increment(12);
    batch.record_many(4.0, 10);
    batch.record(40.0);
    commit.record_many(0.001, 11);
    overload.increment(50);
    parked.set(7.0);
    let s = next(&mut updates, &live).await;
    assert_eq!((s.seq, s.at_ms), (1, START_MS + 1000));
    let shake = &s.ops["shake"];
    assert_eq!((shake.count, shake.ok, shake.success_ratio), (1000, 950, Some(0.95)));
    let (p50, p99) = (shake.p50_ms.unwrap(), shake.p99_ms.unwrap());
    assert!((p50 - 0.2).abs() < 0.01 && (p99 - 2.0).abs() < 0.07, "{p50} {p99}");
    // A refusal such as `finished` is the server doing its work.
    let open = &s.ops["open"];
    assert_eq!((open.count, open.ok, open.p99_ms), (12, 12, None));
    assert_eq!((s.wins_per_s, s.shakes.won, s.opens_per_s), (3, 3, 12));
    assert_eq!(s.commit.commits_per_s, 11);
    assert!((s.commit.batch_ops_mean.unwrap() - 80.0 / 11.0).abs() < 1e-6);
    assert!((s.commit.batch_ops_p99.unwrap() - 40.0).abs() < 1.5);
    assert!((s.commit.p50_ms.unwrap() - 1.0).abs() < 0.04);
    assert_eq!((s.overload_per_s.total, s.overload_per_s.shard_queue), (50, 50));
    assert_eq!((s.connections.total, s.connections.parked), (1234, 7));
    assert_eq!(s.connections.gateways[0].name, "serve");
    assert_eq!((s.queues.writer, s.queues.shard, s.campaigns.running), (2, 3, 1));
    assert!(s.money.balanced && s.storage.up && s.storage.failure.is_none());

    // A quiet second: no ops, no latencies, the next seq and second.
    let s = next(&mut updates, &live).await;
    assert_eq!((s.seq, s.at_ms), (2, START_MS + 2000));
    assert!(s.ops.is_empty() && s.commit.p99_ms.is_none() && s.commit.commits_per_s == 0);
    assert_eq!(s.connections.parked, 7, "a gauge is a level, not a delta");

    // The JSON is the contract's.
    let json: serde_json::Value = serde_json::from_str(&live.latest().unwrap().json).unwrap();
    for field in [
        "seq",
        "at_ms",
        "connections",
        "ops",
        "shakes",
        "wins_per_s",
        "opens_per_s",
        "sends_per_s",
        "commit",
        "queues",
        "overload_per_s",
        "money",
        "storage",
        "campaigns",
        "alerts_firing",
    ] {
        assert!(json.get(field).is_some(), "{field} missing in {json}");
    }
    assert!(json["commit"]["p99_ms"].is_null());

    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(live.latest().unwrap().snapshot.seq, 2, "nothing after shutdown");
}

#[tokio::test(start_paused = true)]
async fn money_that_does_not_balance_pages_at_once() {
    let recorder = WatchRecorder::new();
    let live = Live::new();
    let (stop, stopped) = watch::channel(false);
    let wrong = EngineReading { deposits_minus_withdrawals_fen: 149, ..balanced() };
    let task = spawn(recorder.registry(), Fixed(wrong), live.clone(), config(), stopped);
    let mut updates = live.subscribe();
    let s = next(&mut updates, &live).await;
    assert!(!s.money.balanced);
    assert_eq!(s.alerts_firing, 1);
    let alerts = live.alerts();
    assert_eq!(alerts.len(), 1);
    assert_eq!(
        (alerts[0].signal, alerts[0].state, alerts[0].op.as_str()),
        (Signal::Money, AlertState::Firing, "money")
    );
    assert!(alerts[0].message.contains("150") && alerts[0].message.contains("149"), "{}", alerts[0].message);
    stop.send(true).unwrap();
    task.await.unwrap();
}
