//! Per-second counters and latency histograms of one simulator process.
//!
//! Users bump atomics and record latencies into one of a few striped
//! histograms; once a second the worker swaps everything out into a
//! `SecondRow`. Rows from several workers add up (`SecondRow::merge`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

const STRIPES: usize = 16;
/// Latencies above this are clamped (recorded as the maximum).
const LATENCY_US_MAX: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Counters since the last snapshot (reset by `take`), plus running gauges.
#[derive(Default)]
pub struct Counters {
    pub shakes_sent: AtomicU64,
    pub won: AtomicU64,
    pub none: AtomicU64,
    pub overload: AtomicU64,
    pub not_running: AtomicU64,
    pub shake_errors: AtomicU64,
    pub amount_won_fen: AtomicI64,
    pub pushes: AtomicU64,
    pub grabs: AtomicU64,
    pub opens: AtomicU64,
    pub amount_opened_fen: AtomicI64,
    pub open_rejects: AtomicU64,
    pub conn_errors: AtomicU64,
    pub reconnects: AtomicU64,
    /// Shakes skipped because too many requests were still in flight.
    pub backlogged: AtomicU64,
    /// The bench's broadcast notices received (not counted in `pushes`).
    pub broadcasts: AtomicU64,
    /// Wall-clock unix ms of the latest of them (0: none this second).
    pub broadcast_last_ms: AtomicU64,
}

pub struct Stats {
    pub counters: Counters,
    /// Connections currently logged in (a gauge, never reset).
    pub connected: AtomicI64,
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Broadcast receipts of this second: wall-clock unix ms → users. At
    /// most one entry per millisecond, taken every second: bounded however
    /// many users a process holds.
    broadcast_receipts: Mutex<BTreeMap<u64, u32>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            counters: Counters::default(),
            connected: AtomicI64::new(0),
            latency: (0..STRIPES).map(|_| Mutex::new(histogram())).collect(),
            broadcast_receipts: Mutex::default(),
        }
    }
}

/// One second (or a total) as seen by the simulator.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SecondRow {
    pub second: u64,
    pub connected: i64,
    pub shakes_sent: u64,
    pub shakes_answered: u64,
    pub won: u64,
    pub none: u64,
    pub overload: u64,
    pub not_running: u64,
    pub shake_errors: u64,
    pub amount_won_fen: i64,
    pub pushes: u64,
    pub grabs: u64,
    pub opens: u64,
    pub amount_opened_fen: i64,
    pub open_rejects: u64,
    pub conn_errors: u64,
    pub reconnects: u64,
    pub backlogged: u64,
    /// The bench's broadcast notices received this second, and the wall-clock
    /// unix ms of the latest (0: none; merged rows keep the latest of all).
    #[serde(default)]
    pub broadcasts: u64,
    #[serde(default)]
    pub broadcast_last_ms: u64,
    /// Shake latency of this second, in microseconds.
    #[serde(default)]
    pub latency_us: LatencySummary,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }
}

impl Stats {
    pub fn record_latency(&self, stripe: u64, micros: u64) {
        let mut h = self.latency[(stripe as usize) % STRIPES].lock().expect("histogram poisoned");
        h.saturating_record(micros.clamp(1, LATENCY_US_MAX));
    }

    /// Counts one broadcast notice received at `unix_ms` (wall clock, so
    /// that receipts in different processes compare with the POST's time).
    pub fn record_broadcast(&self, unix_ms: u64) {
        self.counters.broadcasts.fetch_add(1, Ordering::Relaxed);
        self.counters.broadcast_last_ms.fetch_max(unix_ms, Ordering::Relaxed);
        *self.broadcast_receipts.lock().expect("receipts poisoned").entry(unix_ms).or_insert(0) += 1;
    }

    /// Takes the broadcast receipts since the last call: (unix ms, users).
    pub fn take_broadcast_receipts(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.broadcast_receipts.lock().expect("receipts poisoned")).into_iter().collect()
    }

    /// Takes this second's counters and latencies, resetting them.
    pub fn take(&self, second: u64) -> (SecondRow, Histogram<u64>) {
        let c = &self.counters;
        let t = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        let ti = |a: &AtomicI64| a.swap(0, Ordering::Relaxed);
        let mut merged = histogram();
        for stripe in &self.latency {
            let mut h = stripe.lock().expect("histogram poisoned");
            merged.add(&*h).expect("same bounds");
            h.reset();
        }
        let (won, none, overload, not_running) = (t(&c.won), t(&c.none), t(&c.overload), t(&c.not_running));
        let row = SecondRow {
            second,
            connected: self.connected.load(Ordering::Relaxed),
            shakes_sent: t(&c.shakes_sent),
            shakes_answered: won + none + overload + not_running,
            won,
            none,
            overload,
            not_running,
            shake_errors: t(&c.shake_errors),
            amount_won_fen: ti(&c.amount_won_fen),
            pushes: t(&c.pushes),
            grabs: t(&c.grabs),
            opens: t(&c.opens),
            amount_opened_fen: ti(&c.amount_opened_fen),
            open_rejects: t(&c.open_rejects),
            conn_errors: t(&c.conn_errors),
            reconnects: t(&c.reconnects),
            backlogged: t(&c.backlogged),
            broadcasts: t(&c.broadcasts),
            broadcast_last_ms: t(&c.broadcast_last_ms),
            latency_us: LatencySummary::of(&merged),
        };
        (row, merged)
    }
}

impl SecondRow {
    /// Adds another process's row of the same second (latency is merged by the caller).
    pub fn merge(&mut self, o: &SecondRow) {
        self.connected += o.connected;
        self.shakes_sent += o.shakes_sent;
        self.shakes_answered += o.shakes_answered;
        self.won += o.won;
        self.none += o.none;
        self.overload += o.overload;
        self.not_running += o.not_running;
        self.shake_errors += o.shake_errors;
        self.amount_won_fen += o.amount_won_fen;
        self.pushes += o.pushes;
        self.grabs += o.grabs;
        self.opens += o.opens;
        self.amount_opened_fen += o.amount_opened_fen;
        self.open_rejects += o.open_rejects;
        self.conn_errors += o.conn_errors;
        self.reconnects += o.reconnects;
        self.backlogged += o.backlogged;
        self.broadcasts += o.broadcasts;
        self.broadcast_last_ms = self.broadcast_last_ms.max(o.broadcast_last_ms);
    }
}

/// Serialises a histogram for transport between processes (V2 format, hex).
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    use hdrhistogram::serialization::{Serializer, V2Serializer};
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("histogram serialises");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode_histogram(hex: &str) -> Option<Histogram<u64>> {
    use hdrhistogram::serialization::Deserializer;
    let bytes: Option<Vec<u8>> =
        (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect();
    Deserializer::new().deserialize(&mut bytes?.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_resets_and_histograms_travel_between_processes() {
        let s = Stats::default();
        s.counters.won.fetch_add(3, Ordering::Relaxed);
        s.counters.none.fetch_add(2, Ordering::Relaxed);
        for us in [100, 200, 300, 10_000] {
            s.record_latency(us, us);
        }
        let (row, h) = s.take(1);
        assert_eq!((row.won, row.shakes_answered, row.latency_us.count), (3, 5, 4));
        assert_eq!(s.take(2).0.won, 0);
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back.len(), 4);
        assert!(back.max() >= 9_990);
    }

    #[test]
    fn broadcast_receipts_count_keep_the_latest_and_merge() {
        let s = Stats::default();
        for at in [1_000_500, 1_000_200, 1_000_500] {
            s.record_broadcast(at);
        }
        assert_eq!(s.take_broadcast_receipts(), vec![(1_000_200, 1), (1_000_500, 2)]);
        assert!(s.take_broadcast_receipts().is_empty());
        let (mut row, _) = s.take(1);
        assert_eq!((row.broadcasts, row.broadcast_last_ms, row.pushes), (3, 1_000_500, 0));
        let other = SecondRow { broadcasts: 2, broadcast_last_ms: 1_000_900, ..Default::default() };
        row.merge(&other);
        assert_eq!((row.broadcasts, row.broadcast_last_ms), (5, 1_000_900));
        // Rows of workers from before these fields read as none.
        let old: SecondRow = serde_json::from_str(
            r#"{"second":1,"connected":0,"shakes_sent":0,"shakes_answered":0,
            "won":0,"none":0,"overload":0,"not_running":0,"shake_errors":0,"amount_won_fen":0,"pushes":0,"grabs":0,
            "opens":0,"amount_opened_fen":0,"open_rejects":0,"conn_errors":0,"reconnects":0,"backlogged":0}"#,
        )
        .unwrap();
        assert_eq!((old.broadcasts, old.broadcast_last_ms), (0, 0));
    }
}
