//! The anomaly detector: per operation with traffic, three signals —
//! requests per second and success ratio ("is the work getting done?"),
//! p99 latency ("are users happy?") — each judged every second against an
//! EWMA band and, once a day of history exists, the same time yesterday;
//! and one rule that needs no statistics: the money must balance.
//!
//! Per (op, signal) a `Detector` keeps an exponentially weighted mean and
//! variance (half-life `half_life_s`). Its band is mean ± `sigmas`·σ, where
//! σ is floored (relative to the mean, and absolute) so that a flat series
//! — a success ratio of exactly 1.0 for an hour has σ = 0 — does not alarm
//! on the first wobble. Count and success ratio alert only below the band
//! (more work done is not an incident), p99 only above it.
//!
//! A value out of band is not learned (it is suspect); `fire_after_s`
//! such seconds in a row fire the alert, `clear_after_s` in band clear it.
//! While firing, the baseline stays frozen so it does not learn the
//! anomaly, for at most `relearn_after_s`: a new level that lasts that long
//! (a campaign ended, traffic moved) is accepted, the alert clears saying
//! so, and the band starts from what the signal did meanwhile.

use std::collections::BTreeMap;

use crate::alerts::{Alert, AlertBook, AlertState, Baseline, Signal};
use crate::series::MinuteHistory;
use crate::snapshot::Snapshot;

/// Every parameter of the detector. `Default` gives the production values;
/// the reason for each is beside it (ARCHITECTURE.md, "Alerts on the work,
/// not the machine", has the arithmetic).
#[derive(Clone, Debug, PartialEq)]
pub struct AlertConfig {
    /// Seconds of a signal learned before it is judged: 120. Two minutes of
    /// a new op's traffic (or of a restarted server) give the mean and the
    /// spread something to stand on; the EWMA is bias-corrected, so its
    /// first minutes are not dragged toward zero.
    pub warmup_s: u32,
    /// Consecutive seconds out of band before an alert fires: 10. A drop to
    /// zero pages ten seconds after it started; a one-second hiccup (a
    /// commit stall, a GC-like pause of a client fleet) never does.
    pub fire_after_s: u32,
    /// Consecutive seconds in band before a firing alert clears: 30. Three
    /// times `fire_after_s`, so a recovering signal that dips again keeps
    /// one alert instead of flapping into many.
    pub clear_after_s: u32,
    /// Width of the band in (floored) standard deviations: 3. With the σ
    /// floors below, a count alert needs the rate under 70% of its usual
    /// level, a ratio alert more than 6% of requests failing.
    pub sigmas: f64,
    /// Half-life of the EWMA, seconds: 300. The baseline is the last
    /// quarter of an hour or so, not the last minute (a few noisy seconds
    /// barely move it), and short against an evening: a steady ramp of
    /// traffic is followed with a lag of ~7 minutes of the ramp, inside the
    /// band.
    pub half_life_s: f64,
    /// Longest a firing alert keeps the baseline frozen, seconds: 600.
    /// Ten minutes at a new level is a new level: the alert clears ("the
    /// new level is accepted") instead of paging all night.
    pub relearn_after_s: u32,
    /// Requests per second below which success ratio and p99 are neither
    /// judged nor learned, and below whose usual level a count is not
    /// judged: 10. At a handful of requests one slow or failed request is
    /// the whole p99 or 20% of the ratio.
    pub min_rate_per_s: f64,
    /// σ floors of the request count: 10% of the mean, at least 1/s.
    pub count_floor: SigmaFloor,
    /// σ floors of the success ratio: 2 points absolute (it lives near 1).
    pub ratio_floor: SigmaFloor,
    /// σ floors of p99 (ms): 25% of the mean (tail latency is noisy), at
    /// least 0.5 ms (sub-millisecond p99s wobble by that much).
    pub p99_floor: SigmaFloor,
    /// Minutes either side of "24 h ago" read for the yesterday baseline: 2
    /// (five minutes around it), so a load that starts a minute later than
    /// yesterday is still "the same time".
    pub yesterday_span_min: u32,
}

/// The least σ a band uses: `max(σ, rel·|mean|, abs)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SigmaFloor {
    pub rel: f64,
    pub abs: f64,
}

impl Default for AlertConfig {
    fn default() -> AlertConfig {
        AlertConfig {
            warmup_s: 120,
            fire_after_s: 10,
            clear_after_s: 30,
            sigmas: 3.0,
            half_life_s: 300.0,
            relearn_after_s: 600,
            min_rate_per_s: 10.0,
            count_floor: SigmaFloor { rel: 0.10, abs: 1.0 },
            ratio_floor: SigmaFloor { rel: 0.0, abs: 0.02 },
            p99_floor: SigmaFloor { rel: 0.25, abs: 0.5 },
            yesterday_span_min: 2,
        }
    }
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid alert setting: {0}")]
pub struct AlertConfigError(String);

impl AlertConfig {
    pub fn validate(&self) -> Result<(), AlertConfigError> {
        let bad = |m: &str| Err(AlertConfigError(m.into()));
        if self.fire_after_s == 0 || self.clear_after_s == 0 {
            return bad("fire_after_s and clear_after_s must be at least 1");
        }
        if !(self.sigmas.is_finite() && self.sigmas > 0.0) {
            return bad("sigmas must be a positive number");
        }
        if !(self.half_life_s.is_finite() && self.half_life_s >= 1.0) {
            return bad("the EWMA half-life must be at least 1 s");
        }
        if self.relearn_after_s < self.fire_after_s {
            return bad("relearn_after_s must be at least fire_after_s");
        }
        if !(self.min_rate_per_s.is_finite() && self.min_rate_per_s >= 0.0) {
            return bad("min_rate_per_s must be 0 or more");
        }
        for f in [self.count_floor, self.ratio_floor, self.p99_floor] {
            if !(f.rel.is_finite() && f.abs.is_finite() && f.rel >= 0.0 && f.abs >= 0.0) {
                return bad("σ floors must be 0 or more");
            }
        }
        Ok(())
    }

    fn floor(&self, signal: Signal) -> SigmaFloor {
        match signal {
            Signal::Count => self.count_floor,
            Signal::SuccessRatio => self.ratio_floor,
            Signal::P99 | Signal::Money => self.p99_floor,
        }
    }

    fn alpha(&self) -> f64 {
        1.0 - 0.5f64.powf(1.0 / self.half_life_s)
    }
}

/// Exponentially weighted mean and variance (West's update). It starts as
/// the plain running mean and variance (each of the first n samples weighs
/// 1/n) and turns exponential once 1/n falls below α (after ~433 samples
/// at the default half-life): a fixed α from the first sample would leave
/// the mean at the first second's value for minutes (α is 0.0023), and
/// the first second of a load is usually a partial one, so the band would
/// sit far from the data and a drop to zero could fall inside it.
#[derive(Clone, Debug)]
struct Ewma {
    alpha: f64,
    /// Samples learned.
    n: u64,
    mean: f64,
    var: f64,
}

impl Ewma {
    fn new(alpha: f64) -> Ewma {
        Ewma { alpha, n: 0, mean: 0.0, var: 0.0 }
    }

    fn learn(&mut self, x: f64) {
        // The (n+1)th sample's weight: 1/(n+1) while that is more than α.
        let weight = self.alpha.max(1.0 / (self.n + 1) as f64);
        let diff = x - self.mean;
        let incr = weight * diff;
        self.mean += incr;
        self.var = (1.0 - weight) * (self.var + diff * incr);
        self.n += 1;
    }

    /// The weights always sum to 1 (the running start), so no correction.
    fn std(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        self.var.max(0.0).sqrt()
    }
}

/// A band and what it was taken from.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Band {
    expected: f64,
    low: f64,
    high: f64,
    baseline: Baseline,
}

/// Which side of the band is an incident.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Low,
    High,
}

impl Band {
    fn around(cfg: &AlertConfig, signal: Signal, mean: f64, std: f64, baseline: Baseline) -> Band {
        let floor = cfg.floor(signal);
        let sigma = std.max(floor.rel * mean.abs()).max(floor.abs);
        let half = cfg.sigmas * sigma;
        Band { expected: mean, low: mean - half, high: mean + half, baseline }
    }

    fn outside(&self, side: Side, x: f64) -> bool {
        match side {
            Side::Low => x < self.low,
            Side::High => x > self.high,
        }
    }
}

struct Firing {
    id: u64,
    fired_ms: u64,
    /// What the signal does while the baseline is frozen, learned from the
    /// first firing second: the new level if it lasts `relearn_after_s`.
    shadow: Ewma,
    in_band_run: u32,
}

/// One (op, signal).
pub(crate) struct Detector {
    op: String,
    signal: Signal,
    baseline: Ewma,
    history: MinuteHistory,
    /// Consecutive seconds out of band (not firing), and when they began.
    out_run: u32,
    out_since_ms: u64,
    firing: Option<Firing>,
}

/// What one second of a detector amounted to, for the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Learning, or in band.
    Quiet,
    /// Out of band, not yet for `fire_after_s`.
    Pending,
    Fired,
    StillFiring,
    Cleared,
    /// Cleared because the new level lasted `relearn_after_s`.
    Relearned,
    /// No value to judge this second.
    NotJudged,
}

impl Detector {
    pub(crate) fn new(op: &str, signal: Signal, cfg: &AlertConfig) -> Detector {
        Detector {
            op: op.to_owned(),
            signal,
            baseline: Ewma::new(cfg.alpha()),
            history: MinuteHistory::new(),
            out_run: 0,
            out_since_ms: 0,
            firing: None,
        }
    }

    fn side(&self) -> Side {
        match self.signal {
            Signal::P99 => Side::High,
            _ => Side::Low,
        }
    }

    /// The yesterday band, once a day of history has the minutes around
    /// `at_ms − 24 h` (at least half of one minute's seconds in them).
    fn yesterday(&self, cfg: &AlertConfig, at_ms: u64) -> Option<Band> {
        let minute = (at_ms / 60_000).checked_sub(24 * 60)?;
        let span = u64::from(cfg.yesterday_span_min);
        let r = self.history.span(minute.saturating_sub(span), minute + span)?;
        (r.n >= 30).then(|| Band::around(cfg, self.signal, r.mean, r.std, Baseline::Yesterday))
    }

    /// Judges one second's value (`None`: nothing to judge, e.g. too few
    /// requests for a ratio) and moves the alert.
    pub(crate) fn observe(
        &mut self,
        cfg: &AlertConfig,
        at_ms: u64,
        value: Option<f64>,
        book: &mut AlertBook,
    ) -> Outcome {
        let Some(x) = value else { return self.not_judged(cfg, at_ms, book) };
        self.history.record(at_ms, x);
        if self.baseline.n < u64::from(cfg.warmup_s) && self.firing.is_none() {
            self.baseline.learn(x);
            return Outcome::Quiet;
        }
        let ewma = Band::around(cfg, self.signal, self.baseline.mean, self.baseline.std(), Baseline::Ewma);
        let side = self.side();
        // A count is judged only where it usually is a real rate.
        let judged = self.signal != Signal::Count || ewma.expected >= cfg.min_rate_per_s;
        let yesterday = self.yesterday(cfg, at_ms);
        let out = judged
            && ewma.outside(side, x)
            && yesterday.is_none_or(|y| {
                y.outside(side, x) && (self.signal != Signal::Count || y.expected >= cfg.min_rate_per_s)
            });
        // Named after the more lenient band: the value is outside even that.
        let band = match yesterday {
            Some(y) if out && lenient(side, &y, &ewma) => y,
            _ => ewma,
        };
        match self.firing.as_mut() {
            None => {
                if !out {
                    self.out_run = 0;
                    self.baseline.learn(x);
                    return Outcome::Quiet;
                }
                if self.out_run == 0 {
                    self.out_since_ms = at_ms;
                }
                self.out_run += 1;
                if self.out_run < cfg.fire_after_s {
                    return Outcome::Pending;
                }
                let alert = self.alert(x, &band);
                let id = book.fire(alert);
                let mut shadow = Ewma::new(cfg.alpha());
                shadow.learn(x);
                self.firing = Some(Firing { id, fired_ms: at_ms, shadow, in_band_run: 0 });
                self.out_run = 0;
                Outcome::Fired
            }
            Some(firing) => {
                firing.shadow.learn(x);
                firing.in_band_run = if out { 0 } else { firing.in_band_run + 1 };
                let id = firing.id;
                if firing.in_band_run >= cfg.clear_after_s {
                    self.firing = None;
                    book.clear(id, at_ms, format!("{} back in band", self.describe_value(x)));
                    self.baseline.learn(x);
                    return Outcome::Cleared;
                }
                if at_ms.saturating_sub(firing.fired_ms) >= u64::from(cfg.relearn_after_s) * 1000 {
                    let held_s = at_ms.saturating_sub(firing.fired_ms) / 1000;
                    let shadow = firing.shadow.clone();
                    self.firing = None;
                    self.baseline = shadow;
                    let message = format!(
                        "{} for {held_s} s: accepted as the new level (baseline relearned)",
                        self.describe_value(x)
                    );
                    book.clear(id, at_ms, message);
                    return Outcome::Relearned;
                }
                if out {
                    book.update(Alert { id, ..self.alert(x, &band) });
                }
                Outcome::StillFiring
            }
        }
    }

    /// No value: a firing alert of a signal that can no longer be judged
    /// (the requests it was about stopped) clears after `clear_after_s`.
    fn not_judged(&mut self, cfg: &AlertConfig, at_ms: u64, book: &mut AlertBook) -> Outcome {
        self.out_run = 0;
        if let Some(firing) = self.firing.as_mut() {
            firing.in_band_run += 1;
            if firing.in_band_run >= cfg.clear_after_s {
                let id = firing.id;
                self.firing = None;
                let message = format!(
                    "{} {}: too few requests to judge (under {}/s)",
                    self.op,
                    self.signal_words(),
                    cfg.min_rate_per_s
                );
                book.clear(id, at_ms, message);
                return Outcome::Cleared;
            }
        }
        Outcome::NotJudged
    }

    fn alert(&self, x: f64, band: &Band) -> Alert {
        Alert {
            id: 0,
            op: self.op.clone(),
            signal: self.signal,
            state: AlertState::Firing,
            severity: self.signal.severity(),
            since_ms: self.out_since_ms,
            cleared_ms: None,
            value: x,
            expected: band.expected,
            low: band.low.max(0.0),
            high: band.high,
            baseline: band.baseline,
            message: self.message(x, band),
        }
    }

    fn signal_words(&self) -> &'static str {
        match self.signal {
            Signal::Count => "requests",
            Signal::SuccessRatio => "success ratio",
            Signal::P99 => "p99",
            Signal::Money => "money",
        }
    }

    fn describe_value(&self, x: f64) -> String {
        match self.signal {
            Signal::Count => format!("{} requests {x:.0}/s", self.op),
            Signal::SuccessRatio => format!("{} success ratio {x:.3}", self.op),
            Signal::P99 | Signal::Money => format!("{} p99 {x:.2} ms", self.op),
        }
    }

    /// e.g. "shake requests 0/s, expected 700–1200/s (EWMA band)".
    fn message(&self, x: f64, band: &Band) -> String {
        let low = band.low.max(0.0);
        let expected = match self.signal {
            Signal::Count => format!("expected {low:.0}–{:.0}/s", band.high),
            Signal::SuccessRatio => format!("expected at least {low:.3}"),
            Signal::P99 | Signal::Money => format!("expected at most {:.2} ms", band.high),
        };
        format!("{}, {expected} ({})", self.describe_value(x), band.baseline.describe())
    }
}

/// Of two bands, is `a` the more lenient on `side`?
fn lenient(side: Side, a: &Band, b: &Band) -> bool {
    match side {
        Side::Low => a.low < b.low,
        Side::High => a.high > b.high,
    }
}

/// Operations with a detector at most: the protocol has about a dozen;
/// what the gateway labels `op` is a fixed set, this only bounds memory
/// (each op's three detectors keep 26 h of minutes: 150 KB).
pub const OPS_WATCHED_MAX: usize = 32;

/// The money rule: fires the second the totals do not balance.
struct MoneyWatch {
    firing: Option<(u64, u32)>,
}

/// Every detector, fed one snapshot a second.
pub(crate) struct Detectors {
    cfg: AlertConfig,
    by_key: BTreeMap<(String, Signal), Detector>,
    ops: usize,
    money: MoneyWatch,
}

impl Detectors {
    pub(crate) fn new(cfg: AlertConfig) -> Detectors {
        Detectors { cfg, by_key: BTreeMap::new(), ops: 0, money: MoneyWatch { firing: None } }
    }

    /// Judges `snapshot`'s second; alerts go into `book`.
    pub(crate) fn observe(&mut self, snapshot: &Snapshot, book: &mut AlertBook) {
        for (op, figures) in &snapshot.ops {
            if figures.count > 0
                && self.ops < OPS_WATCHED_MAX
                && !self.by_key.contains_key(&(op.clone(), Signal::Count))
            {
                self.ops += 1;
                for signal in [Signal::Count, Signal::SuccessRatio, Signal::P99] {
                    self.by_key.insert((op.clone(), signal), Detector::new(op, signal, &self.cfg));
                }
            }
        }
        let min_rate = self.cfg.min_rate_per_s;
        for ((op, signal), detector) in self.by_key.iter_mut() {
            let figures = snapshot.ops.get(op);
            let count = figures.map_or(0, |f| f.count) as f64;
            let value = match signal {
                // An op without requests this second did zero of them.
                Signal::Count => Some(count),
                _ if count < min_rate.max(1.0) => None,
                Signal::SuccessRatio => figures.and_then(|f| f.success_ratio),
                Signal::P99 => figures.and_then(|f| f.p99_ms),
                Signal::Money => None,
            };
            detector.observe(&self.cfg, snapshot.at_ms, value, book);
        }
        self.observe_money(snapshot, book);
    }

    fn observe_money(&mut self, snapshot: &Snapshot, book: &mut AlertBook) {
        let m = &snapshot.money;
        let held = m.user_balances_fen as f64
            + m.packet_escrow_fen as f64
            + m.campaign_escrow_fen as f64
            + m.in_flight_fen as f64;
        let owed = m.deposits_minus_withdrawals_fen as f64;
        let message = format!(
            "money does not balance: balances + escrows + in flight = {held:.0} fen, deposits − withdrawals = {owed:.0} fen"
        );
        match (&mut self.money.firing, m.balanced) {
            (None, true) => {}
            (None, false) => {
                let alert = money_alert(snapshot.at_ms, held, owed, message);
                self.money.firing = Some((book.fire(alert), 0));
            }
            (Some((id, _)), false) => {
                let id = *id;
                self.money.firing = Some((id, 0));
                book.update(Alert { id, ..money_alert(snapshot.at_ms, held, owed, message) });
            }
            (Some((id, balanced_run)), true) => {
                *balanced_run += 1;
                if *balanced_run >= self.cfg.clear_after_s {
                    book.clear(*id, snapshot.at_ms, format!("money balances again: {owed:.0} fen"));
                    self.money.firing = None;
                }
            }
        }
    }
}

/// The money rule's alert: `value` what is held, `expected` (and its
/// zero-width band) what is owed. Its baseline is none of the statistical
/// ones; `ewma` is reported, being the contract's default.
fn money_alert(at_ms: u64, held: f64, owed: f64, message: String) -> Alert {
    Alert {
        id: 0,
        op: "money".into(),
        signal: Signal::Money,
        state: AlertState::Firing,
        severity: Signal::Money.severity(),
        since_ms: at_ms,
        cleared_ms: None,
        value: held,
        expected: owed,
        low: owed,
        high: owed,
        baseline: Baseline::Ewma,
        message,
    }
}

#[cfg(test)]
mod tests;
