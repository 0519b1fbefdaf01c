//! The detector on synthetic series. Each test draws its noise from a seed
//! it prints (`HONGBAO_TEST_SEED=<n>` replays one).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::alerts::Severity;
use crate::snapshot::OpFigures;

/// 2026-01-01 00:00 UTC: days start at midnight, for the yesterday tests.
const T0_MS: u64 = 1_767_225_600_000;
const HOUR_S: u64 = 3600;
const DAY_S: u64 = 24 * HOUR_S;

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("HONGBAO_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("{test}: seed {seed} (HONGBAO_TEST_SEED={seed} replays it)");
    StdRng::seed_from_u64(seed)
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A request rate around `rate`: Poisson noise plus 3% of load wobble.
fn noisy_rate(rng: &mut StdRng, rate: f64) -> f64 {
    (rate + normal(rng) * (rate.sqrt() + 0.03 * rate)).max(0.0).round()
}

/// One detector fed one value a second from `T0_MS`.
struct Run {
    cfg: AlertConfig,
    detector: Detector,
    book: AlertBook,
    /// Seconds fed so far.
    t: u64,
}

impl Run {
    fn new(signal: Signal) -> Run {
        let cfg = AlertConfig::default();
        Run { detector: Detector::new("shake", signal, &cfg), cfg, book: AlertBook::default(), t: 0 }
    }

    fn at_ms(&self) -> u64 {
        T0_MS + self.t * 1000
    }

    fn feed(&mut self, value: f64) -> Outcome {
        self.feed_opt(Some(value))
    }

    fn feed_opt(&mut self, value: Option<f64>) -> Outcome {
        self.t += 1;
        let at_ms = self.at_ms();
        self.detector.observe(&self.cfg, at_ms, value, &mut self.book)
    }

    /// Feeds `seconds` values from `f(second)`; returns the outcomes that
    /// were not quiet, with the second they came at.
    fn run(&mut self, seconds: u64, mut f: impl FnMut(u64) -> f64) -> Vec<(u64, Outcome)> {
        let mut events = Vec::new();
        for _ in 0..seconds {
            let second = self.t;
            let outcome = self.feed(f(second));
            if !matches!(outcome, Outcome::Quiet | Outcome::Pending) {
                events.push((second, outcome));
            }
        }
        events
    }

    fn alerts(&self) -> Vec<Alert> {
        self.book.list()
    }
}

#[test]
fn a_steady_noisy_load_never_alerts() {
    let mut rng = rng("a_steady_noisy_load_never_alerts");
    // Two hours of each signal at its usual noise.
    let mut count = Run::new(Signal::Count);
    let events = count.run(2 * HOUR_S, |_| noisy_rate(&mut rng, 1000.0));
    assert_eq!(events, [], "{:?}", count.alerts());
    // A success ratio of 1.0 with a failure here and there: σ ≈ 0, so only
    // its floor keeps one failed request in a thousand from paging.
    let mut ratio = Run::new(Signal::SuccessRatio);
    let events = ratio.run(2 * HOUR_S, |_| if rng.random_bool(0.02) { 0.99 } else { 1.0 });
    assert_eq!(events, [], "{:?}", ratio.alerts());
    // A p99 around 1.2 ms, wobbling by 15% each second.
    let mut p99 = Run::new(Signal::P99);
    let events = p99.run(2 * HOUR_S, |_| (1.2 * (1.0 + 0.15 * normal(&mut rng))).max(0.1));
    assert_eq!(events, [], "{:?}", p99.alerts());
}

#[test]
fn a_sudden_drop_fires_within_fire_after_s_and_recovery_clears_it() {
    let mut rng = rng("a_sudden_drop_fires_within_fire_after_s_and_recovery_clears_it");
    let mut run = Run::new(Signal::Count);
    assert_eq!(run.run(30 * 60, |_| noisy_rate(&mut rng, 1000.0)), []);
    let drop_at = run.t;
    // Out of band from the first second at zero; fires on the
    // `fire_after_s`-th.
    let events = run.run(60, |_| 0.0);
    let fire_after = u64::from(run.cfg.fire_after_s);
    assert_eq!(events.first(), Some(&(drop_at + fire_after - 1, Outcome::Fired)));
    assert!(events[1..].iter().all(|(_, o)| *o == Outcome::StillFiring), "{events:?}");
    let alerts = run.alerts();
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert_eq!(
        (a.signal, a.state, a.severity, a.baseline),
        (Signal::Count, AlertState::Firing, Severity::Page, Baseline::Ewma)
    );
    assert_eq!(a.since_ms, T0_MS + (drop_at + 1) * 1000, "since the first second out of band");
    assert_eq!(a.value, 0.0);
    // The baseline did not learn the zeros: still ~1000, band ~700–1300.
    assert!((a.expected - 1000.0).abs() < 30.0, "{a:?}");
    assert!((a.low - 0.7 * a.expected).abs() < 20.0 && a.high > a.expected, "{a:?}");
    assert!(
        a.message.starts_with("shake requests 0/s, expected ") && a.message.ends_with("/s (EWMA band)"),
        "{}",
        a.message
    );

    // The load comes back: clears after `clear_after_s` in band.
    let back_at = run.t;
    let events = run.run(60, |_| noisy_rate(&mut rng, 1000.0));
    let clear_after = u64::from(run.cfg.clear_after_s);
    assert_eq!(
        events.iter().find(|(_, o)| *o != Outcome::StillFiring),
        Some(&(back_at + clear_after - 1, Outcome::Cleared))
    );
    let a = &run.alerts()[0];
    assert_eq!(a.state, AlertState::Cleared);
    assert_eq!(a.cleared_ms, Some(T0_MS + (back_at + clear_after) * 1000));
    assert!(a.message.ends_with("back in band"), "{}", a.message);
    // And stays quiet.
    assert_eq!(run.run(10 * 60, |_| noisy_rate(&mut rng, 1000.0)), []);
}

#[test]
fn a_slow_drift_does_not_alert() {
    let mut rng = rng("a_slow_drift_does_not_alert");
    // Down from 1,000/s to 600/s over two hours, then up to 3,000/s over two
    // more: traffic following the evening, never an incident.
    let mut run = Run::new(Signal::Count);
    let down = run.run(2 * HOUR_S, |s| noisy_rate(&mut rng, 1000.0 - 400.0 * s as f64 / 7200.0));
    assert_eq!(down, [], "{:?}", run.alerts());
    let up = run.run(2 * HOUR_S, |s| noisy_rate(&mut rng, 600.0 + 2400.0 * (s - 7200) as f64 / 7200.0));
    assert_eq!(up, [], "{:?}", run.alerts());
    // p99 creeping from 1 ms to 2 ms over an hour.
    let mut p99 = Run::new(Signal::P99);
    let events = p99.run(HOUR_S, |s| (1.0 + s as f64 / 3600.0) * (1.0 + 0.1 * normal(&mut rng)));
    assert_eq!(events, [], "{:?}", p99.alerts());
}

#[test]
fn a_p99_spike_is_a_ticket_and_a_faster_p99_is_nothing() {
    let mut rng = rng("a_p99_spike_is_a_ticket_and_a_faster_p99_is_nothing");
    let mut run = Run::new(Signal::P99);
    let usual = |rng: &mut StdRng| 1.0 * (1.0 + 0.1 * normal(rng));
    assert_eq!(run.run(30 * 60, |_| usual(&mut rng)), []);
    // Faster is not an incident: p99 alerts only above its band.
    assert_eq!(run.run(60, |_| 0.2), []);
    assert_eq!(run.run(10 * 60, |_| usual(&mut rng)), []);
    let spike_at = run.t;
    let events = run.run(20, |_| 6.0);
    assert_eq!(events[0], (spike_at + u64::from(run.cfg.fire_after_s) - 1, Outcome::Fired));
    let a = &run.alerts()[0];
    assert_eq!((a.signal, a.severity, a.state), (Signal::P99, Severity::Ticket, AlertState::Firing));
    assert_eq!(a.value, 6.0);
    assert!(a.high < 2.5 && a.high > 1.5, "band above ~1 ms: {a:?}");
    assert!(a.message.starts_with("shake p99 6.00 ms, expected at most "), "{}", a.message);
}

#[test]
fn a_lasting_new_level_freezes_the_baseline_then_is_relearned() {
    let mut rng = rng("a_lasting_new_level_freezes_the_baseline_then_is_relearned");
    let mut run = Run::new(Signal::Count);
    assert_eq!(run.run(30 * 60, |_| noisy_rate(&mut rng, 1000.0)), []);
    let drop_at = run.t;
    let fire_after = u64::from(run.cfg.fire_after_s);
    let relearn_after = u64::from(run.cfg.relearn_after_s);
    // 400/s from now on. Frozen, the baseline still expects ~1000 after
    // five minutes, so the alert holds.
    let events = run.run(fire_after + 300, |_| noisy_rate(&mut rng, 400.0));
    assert_eq!(events[0], (drop_at + fire_after - 1, Outcome::Fired));
    assert!(events[1..].iter().all(|(_, o)| *o == Outcome::StillFiring));
    let a = &run.alerts()[0];
    assert!((a.expected - 1000.0).abs() < 30.0, "frozen, not learning the anomaly: {a:?}");
    // At `relearn_after_s` after firing, the new level is accepted.
    let events = run.run(relearn_after, |_| noisy_rate(&mut rng, 400.0));
    let fired_second = drop_at + fire_after - 1;
    assert_eq!(events.last(), Some(&(fired_second + relearn_after, Outcome::Relearned)));
    let a = &run.alerts()[0];
    assert_eq!(a.state, AlertState::Cleared);
    assert!(a.message.contains("accepted as the new level"), "{}", a.message);
    // 400/s is now the usual: no new alert, and a drop from it fires again.
    assert_eq!(run.run(30 * 60, |_| noisy_rate(&mut rng, 400.0)), []);
    let events = run.run(fire_after, |_| 0.0);
    assert_eq!(events.last().map(|e| e.1), Some(Outcome::Fired));
    assert!((run.alerts()[0].expected - 400.0).abs() < 20.0, "{:?}", run.alerts()[0]);
}

#[test]
fn the_yesterday_baseline_suppresses_a_drop_that_happened_yesterday_too() {
    let mut rng = rng("the_yesterday_baseline_suppresses_a_drop_that_happened_yesterday_too");
    let mut run = Run::new(Signal::Count);
    // Every evening at 20:00 the load drops to 300/s for five minutes (the
    // show's break); otherwise 1,000/s.
    let break_start = 20 * HOUR_S;
    let break_end = break_start + 300;
    let load = |s: u64, rng: &mut StdRng| {
        let of_day = s % DAY_S;
        noisy_rate(rng, if (break_start..break_end).contains(&of_day) { 300.0 } else { 1000.0 })
    };
    // Day one: no yesterday yet, so the EWMA band judges the break an
    // incident.
    let day_one = run.run(DAY_S, |s| load(s, &mut rng));
    assert!(day_one.iter().any(|(s, o)| *o == Outcome::Fired && (break_start..break_end).contains(&(s % DAY_S))));
    assert!(run.alerts().iter().all(|a| a.baseline == Baseline::Ewma));
    let alerts_day_one = run.alerts().len();
    // Day two: the same break is what yesterday did at this time.
    let day_two = run.run(DAY_S, |s| load(s, &mut rng));
    assert_eq!(day_two, [], "{:?}", &run.alerts()[..run.alerts().len() - alerts_day_one]);
    // A drop at another time of day two is still an incident, judged by
    // both baselines (the alert names the more lenient).
    let events = run.run(60, |_| 300.0);
    assert_eq!(events.first().map(|e| e.1), Some(Outcome::Fired));
    let a = &run.alerts()[0];
    assert_eq!(a.state, AlertState::Firing);
    assert!(a.message.ends_with(&format!("({})", a.baseline.describe())), "{}", a.message);
}

#[test]
fn nothing_is_judged_during_warm_up_or_below_the_minimum_rate() {
    let mut rng = rng("nothing_is_judged_during_warm_up_or_below_the_minimum_rate");
    let mut run = Run::new(Signal::Count);
    // A new op's first two minutes swing wildly: learned, not judged.
    let warmup = u64::from(run.cfg.warmup_s);
    assert_eq!(run.run(warmup, |s| if s % 20 < 10 { 1000.0 } else { 0.0 }), []);
    // An op that usually sees 4 requests a second: its drop to zero is not
    // judged (the minimum rate is 10/s).
    let mut slow = Run::new(Signal::Count);
    assert_eq!(slow.run(30 * 60, |_| noisy_rate(&mut rng, 4.0)), []);
    assert_eq!(slow.run(120, |_| 0.0), []);
    // A ratio or p99 without enough requests is not given a value at all.
    let mut ratio = Run::new(Signal::SuccessRatio);
    for _ in 0..60 {
        assert_eq!(ratio.feed_opt(None), Outcome::NotJudged);
    }
}

#[test]
fn an_op_that_goes_silent_counts_as_zero() {
    let mut rng = rng("an_op_that_goes_silent_counts_as_zero");
    let mut detectors = Detectors::new(AlertConfig::default());
    let mut book = AlertBook::default();
    let snapshot = |t: u64, ops: Vec<(&str, u64)>| Snapshot {
        seq: t,
        at_ms: T0_MS + t * 1000,
        ops: ops
            .into_iter()
            .map(|(op, count)| {
                let figures =
                    OpFigures { count, ok: count, success_ratio: Some(1.0), p50_ms: Some(0.2), p99_ms: Some(1.0) };
                (op.to_owned(), figures)
            })
            .collect(),
        money: crate::snapshot::Money { balanced: true, ..Default::default() },
        ..Snapshot::default()
    };
    for t in 0..1800 {
        let shakes = noisy_rate(&mut rng, 1000.0) as u64;
        detectors.observe(&snapshot(t, vec![("shake", shakes), ("open", 50)]), &mut book);
    }
    assert_eq!(book.firing(), 0);
    // Shakes vanish from the snapshots (no requests at all).
    for t in 1800..1800 + u64::from(detectors.cfg.fire_after_s) {
        detectors.observe(&snapshot(t, vec![("open", 50)]), &mut book);
    }
    let alerts = book.list();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!((alerts[0].op.as_str(), alerts[0].signal), ("shake", Signal::Count));
    // Its ratio and p99 have nothing to judge and do not fire.
    assert!(alerts.iter().all(|a| a.signal == Signal::Count));
}

#[test]
fn a_config_that_cannot_work_is_refused() {
    assert_eq!(AlertConfig::default().validate(), Ok(()));
    let bad = [
        AlertConfig { fire_after_s: 0, ..AlertConfig::default() },
        AlertConfig { sigmas: f64::NAN, ..AlertConfig::default() },
        AlertConfig { half_life_s: 0.0, ..AlertConfig::default() },
        AlertConfig { relearn_after_s: 5, ..AlertConfig::default() },
        AlertConfig { min_rate_per_s: -1.0, ..AlertConfig::default() },
    ];
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?}");
    }
}

/// A load whose first second is a partial one (the clients were still
/// connecting), judged after a short warm-up: the baseline is the load's
/// level, not that first second's, so cutting the load off pages. With a
/// fixed α from the first sample the mean stayed near the first second's
/// value and σ near the ramp, and the band reached below zero.
#[test]
fn a_partial_first_second_does_not_hide_a_drop_to_zero() {
    let mut rng = rng("a_partial_first_second_does_not_hide_a_drop_to_zero");
    let mut run = Run::new(Signal::Count);
    run.cfg.warmup_s = 5;
    run.cfg.fire_after_s = 3;
    assert_eq!(run.feed(90.0), Outcome::Quiet);
    assert!(run.run(12, |_| noisy_rate(&mut rng, 800.0)).is_empty(), "a steady load is quiet");
    let events = run.run(5, |_| 0.0);
    assert_eq!(events.first(), Some(&(15, Outcome::Fired)), "the third second at zero fires: {events:?}");
    let alert = &run.alerts()[0];
    assert!(alert.expected > 600.0 && alert.low > 0.0, "{alert:?}");
}
