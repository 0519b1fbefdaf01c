//! Our `metrics::Recorder`: for a fixed allow-list of names, lock-free
//! counters, gauges and latency histograms the sampler reads every second.
//!
//! It sits beside the Prometheus recorder (`fanout`, `Beside`), never instead of it:
//! the exporter keeps rendering `/metrics` as before, and this one keeps
//! only what the live series need, in a form whose per-second deltas are
//! exact (the exporter's summaries are quantiles over its own window, and
//! its histograms drain on read, so two readers would steal each other's
//! samples).
//!
//! **Recording is lock-free:** a handle is an `Arc` of atomics; a counter
//! increment is one `fetch_add`, a histogram sample two (its bucket and its
//! sum). **Registration** (what the `counter!` macros do on every call
//! whose handle is not kept) is a read lock and a hash lookup, like the
//! exporter's registry; a write lock only the first time a series is seen.
//! **Bounded:** at most `SERIES_MAX` series; registrations past it get a
//! no-op handle and are counted (`Registry::refused`, exported by the
//! sampler as `hongbao_watch_series_refused_total`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};

/// Most distinct (name, labels) series kept. What the allow-list produces
/// on a busy server: ~12 ops × ~6 results of `hongbao_requests_total`, ~12
/// latency histograms, a dozen engine counters — about 100. Twice that
/// leaves room; past it a series is dropped, not the process's memory.
pub const SERIES_MAX: usize = 256;

/// The names this recorder keeps; every other name gets a no-op handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Watched {
    /// `hongbao_requests_total{op,result}` (gateway of the serve process).
    Requests,
    /// `hongbao_request_seconds{op}` (same gateway).
    RequestSeconds,
    /// `hongbao_shakes_total{result}` (engine: every gateway's shakes).
    Shakes,
    /// `hongbao_opens_total{result}`.
    Opens,
    /// `hongbao_packets_sent_total`.
    PacketsSent,
    /// `hongbao_commit_seconds`.
    CommitSeconds,
    /// `hongbao_commit_batch_ops`.
    CommitBatchOps,
    /// `hongbao_overload_total{where}`.
    Overload,
    /// `hongbao_campaign_released_total`.
    CampaignReleased,
    /// `hongbao_connections_parked` (gauge).
    ConnectionsParked,
}

impl Watched {
    /// The allow-list: a name and the kind of metric it must be registered
    /// as (a name registered as another kind is refused).
    pub fn from_name(name: &str) -> Option<(Watched, Kind)> {
        let found = match name {
            "hongbao_requests_total" => (Watched::Requests, Kind::Counter),
            "hongbao_request_seconds" => (Watched::RequestSeconds, Kind::Histogram),
            "hongbao_shakes_total" => (Watched::Shakes, Kind::Counter),
            "hongbao_opens_total" => (Watched::Opens, Kind::Counter),
            "hongbao_packets_sent_total" => (Watched::PacketsSent, Kind::Counter),
            "hongbao_commit_seconds" => (Watched::CommitSeconds, Kind::Histogram),
            "hongbao_commit_batch_ops" => (Watched::CommitBatchOps, Kind::Histogram),
            "hongbao_overload_total" => (Watched::Overload, Kind::Counter),
            "hongbao_campaign_released_total" => (Watched::CampaignReleased, Kind::Counter),
            "hongbao_connections_parked" => (Watched::ConnectionsParked, Kind::Gauge),
            _ => return None,
        };
        Some(found)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One kept series: its name, its labels, its atomics.
pub(crate) struct Series {
    pub(crate) name: Watched,
    /// In the order the code gave them; looked up by name (`label`).
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) cell: Cell,
}

impl Series {
    pub(crate) fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

pub(crate) enum Cell {
    Counter(Arc<CounterCell>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<HistogramCell>),
}

#[derive(Default)]
struct Inner {
    /// Key → index into `series`. Series are only ever appended, so an
    /// index stays valid and the sampler can keep its previous readings by
    /// index.
    index: HashMap<Key, usize>,
    series: Vec<Arc<Series>>,
}

/// What the recorder and the sampler share.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
    refused: AtomicU64,
}

impl Registry {
    /// Registrations refused because `SERIES_MAX` series exist (or a name
    /// came with the wrong kind), since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Every series kept so far, in registration order.
    pub(crate) fn series(&self) -> Vec<Arc<Series>> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).series.clone()
    }

    fn register(&self, key: &Key, kind: Kind) -> Option<Arc<Series>> {
        let (name, expected) = Watched::from_name(key.name())?;
        if expected != kind {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        {
            let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(&i) = inner.index.get(key) {
                return Some(inner.series[i].clone());
            }
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        // Another thread may have added it between the two locks.
        if let Some(&i) = inner.index.get(key) {
            return Some(inner.series[i].clone());
        }
        if inner.series.len() >= SERIES_MAX {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let cell = match kind {
            Kind::Counter => Cell::Counter(Arc::default()),
            Kind::Gauge => Cell::Gauge(Arc::default()),
            Kind::Histogram => Cell::Histogram(Arc::new(HistogramCell::new())),
        };
        let labels = key.labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
        let series = Arc::new(Series { name, labels, cell });
        let i = inner.series.len();
        inner.series.push(series.clone());
        inner.index.insert(key.clone(), i);
        Some(series)
    }
}

/// The recorder to install (through `fanout`, beside Prometheus's).
#[derive(Clone, Default)]
pub struct WatchRecorder {
    registry: Arc<Registry>,
}

impl WatchRecorder {
    pub fn new() -> WatchRecorder {
        WatchRecorder::default()
    }

    /// What the sampler reads.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

impl WatchRecorder {
    /// Our cell for a counter `key`, if its name is watched (and there is
    /// room for it).
    fn counter_cell(&self, key: &Key) -> Option<Arc<CounterCell>> {
        match &self.registry.register(key, Kind::Counter)?.cell {
            Cell::Counter(c) => Some(c.clone()),
            _ => None,
        }
    }

    fn gauge_cell(&self, key: &Key) -> Option<Arc<GaugeCell>> {
        match &self.registry.register(key, Kind::Gauge)?.cell {
            Cell::Gauge(g) => Some(g.clone()),
            _ => None,
        }
    }

    fn histogram_cell(&self, key: &Key) -> Option<Arc<HistogramCell>> {
        match &self.registry.register(key, Kind::Histogram)?.cell {
            Cell::Histogram(h) => Some(h.clone()),
            _ => None,
        }
    }
}

/// Alone (tests); installed, it sits in `Beside`.
impl metrics::Recorder for WatchRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.counter_cell(key).map_or_else(Counter::noop, Counter::from_arc)
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.gauge_cell(key).map_or_else(Gauge::noop, Gauge::from_arc)
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.histogram_cell(key).map_or_else(Histogram::noop, Histogram::from_arc)
    }
}

/// `recorder` and `prometheus` as one recorder: every handle of an
/// allow-listed name records into both, every other handle is Prometheus's
/// own. Install the result with `metrics::set_global_recorder`.
pub fn fanout<R: metrics::Recorder>(recorder: WatchRecorder, prometheus: R) -> Beside<R> {
    Beside { prometheus, watch: recorder, handles: RwLock::default() }
}

/// Handles made once are kept: at most this many keys. The code's label
/// values are fixed sets (ops, results, error codes), about 200 keys in
/// all; past the bound a handle is made afresh on each call, as without
/// the cache.
pub const HANDLES_KEPT_MAX: usize = 4_096;

/// Our recorder beside Prometheus's (`fanout`).
///
/// It keeps the handle it made for each key: a `counter!` call site that
/// keeps no handle (most of them: `hongbao_opens_total` on every open)
/// registers on every call, and a plain fan-out would allocate a new pair
/// of handles each time (two allocations and two frees per open, and a
/// hash lookup in each recorder). Here a second registration is one hash
/// lookup under a read lock and an `Arc` clone, like the exporter's own
/// registry.
pub struct Beside<R> {
    prometheus: R,
    watch: WatchRecorder,
    handles: RwLock<Handles>,
}

#[derive(Default)]
struct Handles {
    counters: HashMap<Key, Counter>,
    gauges: HashMap<Key, Gauge>,
    histograms: HashMap<Key, Histogram>,
}

impl Handles {
    fn len(&self) -> usize {
        self.counters.len() + self.gauges.len() + self.histograms.len()
    }
}

/// One handle of each recorder, recorded into together.
struct Pair<T>(T, T);

impl CounterFn for Pair<Counter> {
    fn increment(&self, value: u64) {
        self.0.increment(value);
        self.1.increment(value);
    }

    fn absolute(&self, value: u64) {
        self.0.absolute(value);
        self.1.absolute(value);
    }
}

impl GaugeFn for Pair<Gauge> {
    fn increment(&self, value: f64) {
        self.0.increment(value);
        self.1.increment(value);
    }

    fn decrement(&self, value: f64) {
        self.0.decrement(value);
        self.1.decrement(value);
    }

    fn set(&self, value: f64) {
        self.0.set(value);
        self.1.set(value);
    }
}

impl HistogramFn for Pair<Histogram> {
    fn record(&self, value: f64) {
        self.0.record(value);
        self.1.record(value);
    }
}

impl<R> Beside<R> {
    /// The kept handle of `key` in the map `get`/`get_mut` choose, or a new
    /// one from `make`, kept while there is room.
    fn handle<T: Clone>(
        &self,
        key: &Key,
        get: fn(&Handles) -> &HashMap<Key, T>,
        get_mut: fn(&mut Handles) -> &mut HashMap<Key, T>,
        make: impl FnOnce() -> T,
    ) -> T {
        if let Some(found) = get(&self.handles.read().unwrap_or_else(PoisonError::into_inner)).get(key) {
            return found.clone();
        }
        let mut handles = self.handles.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = get_mut(&mut handles).get(key) {
            return found.clone();
        }
        let made = make();
        if handles.len() < HANDLES_KEPT_MAX {
            get_mut(&mut handles).insert(key.clone(), made.clone());
        }
        made
    }
}

impl<R: metrics::Recorder> metrics::Recorder for Beside<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_counter(key, unit, description)
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_gauge(key, unit, description)
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.prometheus.describe_histogram(key, unit, description)
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.handle(
            key,
            |h| &h.counters,
            |h| &mut h.counters,
            || {
                let prometheus = self.prometheus.register_counter(key, metadata);
                match self.watch.counter_cell(key) {
                    Some(ours) => Counter::from_arc(Arc::new(Pair(prometheus, Counter::from_arc(ours)))),
                    None => prometheus,
                }
            },
        )
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.handle(
            key,
            |h| &h.gauges,
            |h| &mut h.gauges,
            || {
                let prometheus = self.prometheus.register_gauge(key, metadata);
                match self.watch.gauge_cell(key) {
                    Some(ours) => Gauge::from_arc(Arc::new(Pair(prometheus, Gauge::from_arc(ours)))),
                    None => prometheus,
                }
            },
        )
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.handle(
            key,
            |h| &h.histograms,
            |h| &mut h.histograms,
            || {
                let prometheus = self.prometheus.register_histogram(key, metadata);
                match self.watch.histogram_cell(key) {
                    Some(ours) => Histogram::from_arc(Arc::new(Pair(prometheus, Histogram::from_arc(ours)))),
                    None => prometheus,
                }
            },
        )
    }
}

// ---- cells -----------------------------------------------------------------

#[derive(Default)]
pub(crate) struct CounterCell(AtomicU64);

impl CounterCell {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// An `f64` in an `AtomicU64`'s bits; increments are a compare-and-swap
/// loop (gauges change at connection rate, not request rate).
#[derive(Default)]
pub(crate) struct GaugeCell(AtomicU64);

impl GaugeCell {
    pub(crate) fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn add(&self, delta: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + delta).to_bits()));
    }
}

impl GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.add(value);
    }

    fn decrement(&self, value: f64) {
        self.add(-value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// Log-linear buckets: each power of two is cut into `SUB_BUCKETS` equal
/// parts, so a bucket is at most 1/16 = 6.25% wide relative to its value
/// and its midpoint is within ±3.2% of any sample in it. Covers 2^-24
/// (60 ns, in seconds) to 2^16 (65,536: batch sizes go to 4,096), one
/// bucket below for zero and tiny values, one above for the rest.
const SUB_BITS: u32 = 4;
const SUB_BUCKETS: usize = 1 << SUB_BITS;
const EXP_MIN: i32 = -24;
const EXP_MAX: i32 = 16;
pub(crate) const BUCKETS: usize = 2 + (EXP_MAX - EXP_MIN) as usize * SUB_BUCKETS;
/// Sums are kept in millionths (µs for seconds), as integers, so adding is
/// one `fetch_add`; they wrap, and only differences are ever used.
const SUM_SCALE: f64 = 1e6;

pub(crate) struct HistogramCell {
    buckets: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl HistogramCell {
    fn new() -> HistogramCell {
        HistogramCell { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    /// Copies the cumulative counts into `counts` (len `BUCKETS`) and
    /// returns the cumulative sum in millionths.
    pub(crate) fn read_into(&self, counts: &mut [u64]) -> u64 {
        for (c, b) in counts.iter_mut().zip(self.buckets.iter()) {
            *c = b.load(Ordering::Relaxed);
        }
        self.sum_micros.load(Ordering::Relaxed)
    }
}

impl HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        self.buckets[bucket_of(value)].fetch_add(1, Ordering::Relaxed);
        if value > 0.0 {
            self.sum_micros.fetch_add((value * SUM_SCALE) as u64, Ordering::Relaxed);
        }
    }

    fn record_many(&self, value: f64, count: usize) {
        self.buckets[bucket_of(value)].fetch_add(count as u64, Ordering::Relaxed);
        if value > 0.0 {
            self.sum_micros.fetch_add((value * SUM_SCALE * count as f64) as u64, Ordering::Relaxed);
        }
    }
}

pub(crate) fn bucket_of(value: f64) -> usize {
    // NaN, negative, zero and tiny values share the first bucket.
    if value.is_nan() || value < f64::powi(2.0, EXP_MIN) {
        return 0;
    }
    if value >= f64::powi(2.0, EXP_MAX) {
        return BUCKETS - 1;
    }
    let bits = value.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let sub = ((bits >> (52 - SUB_BITS)) & (SUB_BUCKETS as u64 - 1)) as usize;
    1 + (exp - EXP_MIN) as usize * SUB_BUCKETS + sub
}

/// The middle of a bucket: what a sample in it is reported as.
pub(crate) fn bucket_value(index: usize) -> f64 {
    if index == 0 {
        return 0.0;
    }
    if index >= BUCKETS - 1 {
        return f64::powi(2.0, EXP_MAX);
    }
    let i = index - 1;
    let exp = EXP_MIN + (i / SUB_BUCKETS) as i32;
    let sub = (i % SUB_BUCKETS) as f64;
    f64::powi(2.0, exp) * (1.0 + (sub + 0.5) / SUB_BUCKETS as f64)
}

/// One window's samples of a histogram: bucket counts and their sum.
#[derive(Clone, Debug, Default)]
pub(crate) struct HistogramDelta {
    pub(crate) counts: Vec<u64>,
    pub(crate) sum: f64,
}

impl HistogramDelta {
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another window (or another label set) into this one.
    pub(crate) fn add(&mut self, other: &HistogramDelta) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// The `q` quantile (0 < q ≤ 1), as its bucket's middle; `None` without
    /// samples.
    pub(crate) fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the sample at q, 1-based: p99 of 100 samples is the 99th.
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_value(i));
            }
        }
        None
    }

    pub(crate) fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum / n as f64)
    }
}

/// Keeps the previous cumulative reading of one histogram, to take deltas.
pub(crate) struct HistogramReader {
    previous: Vec<u64>,
    previous_sum: u64,
    scratch: Vec<u64>,
}

impl HistogramReader {
    pub(crate) fn new() -> HistogramReader {
        HistogramReader { previous: vec![0; BUCKETS], previous_sum: 0, scratch: vec![0; BUCKETS] }
    }

    /// The samples since the last call (since the start on the first).
    pub(crate) fn delta(&mut self, cell: &HistogramCell) -> HistogramDelta {
        let sum = cell.read_into(&mut self.scratch);
        let counts = self.scratch.iter().zip(&self.previous).map(|(now, before)| now.wrapping_sub(*before)).collect();
        std::mem::swap(&mut self.previous, &mut self.scratch);
        let sum_delta = sum.wrapping_sub(self.previous_sum);
        self.previous_sum = sum;
        HistogramDelta { counts, sum: sum_delta as f64 / SUM_SCALE }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder;

    static META: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

    #[test]
    fn buckets_are_ordered_and_tight() {
        let mut last = 0;
        let mut v = 1e-7;
        while v < 60_000.0 {
            let b = bucket_of(v);
            assert!(b >= last, "{v}");
            last = b;
            let mid = bucket_value(b);
            assert!((mid - v).abs() / v <= 0.035, "{v} reported as {mid}");
            v *= 1.013;
        }
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(-1.0), 0);
        assert_eq!(bucket_of(f64::NAN), 0);
        assert_eq!(bucket_of(1e9), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_a_known_spread() {
        let cell = HistogramCell::new();
        // 1..=1000 ms.
        for ms in 1..=1000 {
            cell.record(ms as f64 / 1000.0);
        }
        let mut reader = HistogramReader::new();
        let d = reader.delta(&cell);
        assert_eq!(d.count(), 1000);
        let p50 = d.quantile(0.5).unwrap();
        let p99 = d.quantile(0.99).unwrap();
        assert!((p50 - 0.5).abs() < 0.5 * 0.04, "{p50}");
        assert!((p99 - 0.99).abs() < 0.99 * 0.04, "{p99}");
        assert!((d.mean().unwrap() - 0.5005).abs() < 1e-3);
        // The next delta has only what came after.
        cell.record(2.0);
        let d = reader.delta(&cell);
        assert_eq!(d.count(), 1);
        assert!((d.sum - 2.0).abs() < 1e-6);
        assert_eq!(reader.delta(&cell).quantile(0.99), None);
    }

    #[test]
    fn only_watched_names_are_kept_and_the_series_are_bounded() {
        let recorder = WatchRecorder::new();
        let registry = recorder.registry();
        recorder.register_counter(&Key::from_name("hongbao_pushes_total"), &META).increment(5);
        assert!(registry.series().is_empty());
        // The wrong kind for a watched name is refused.
        recorder.register_gauge(&Key::from_name("hongbao_requests_total"), &META).set(1.0);
        assert_eq!(registry.refused(), 1);
        let key =
            |i: usize| Key::from_parts("hongbao_requests_total", vec![metrics::Label::new("op", format!("op{i}"))]);
        for i in 0..SERIES_MAX + 10 {
            recorder.register_counter(&key(i), &META).increment(1);
        }
        // Registering again finds the same series.
        recorder.register_counter(&key(0), &META).increment(1);
        let series = registry.series();
        assert_eq!(series.len(), SERIES_MAX);
        assert_eq!(registry.refused(), 11);
        let Cell::Counter(c) = &series[0].cell else { panic!() };
        assert_eq!(c.get(), 2);
        assert_eq!(series[0].label("op"), Some("op0"));
    }

    #[test]
    fn gauges_add_and_set() {
        let recorder = WatchRecorder::new();
        let g = recorder.register_gauge(&Key::from_name("hongbao_connections_parked"), &META);
        g.increment(3.0);
        g.decrement(1.0);
        let series = recorder.registry().series();
        let Cell::Gauge(cell) = &series[0].cell else { panic!() };
        assert_eq!(cell.get(), 2.0);
        g.set(7.0);
        assert_eq!(cell.get(), 7.0);
    }

    /// Beside Prometheus's recorder: a watched name records into both, any
    /// other only into Prometheus's; a key registered again gets the kept
    /// handle, and the kept handles are bounded.
    #[test]
    fn beside_prometheus_records_into_both_and_keeps_each_handle_once() {
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let rendered = prometheus.handle();
        let watch = WatchRecorder::new();
        let registry = watch.registry();
        let beside = fanout(watch, prometheus);
        let opened = Key::from_parts("hongbao_opens_total", vec![metrics::Label::new("result", "opened")]);
        for _ in 0..3 {
            beside.register_counter(&opened, &META).increment(1);
        }
        beside.register_counter(&Key::from_name("hongbao_pushes_total"), &META).increment(4);
        beside.register_histogram(&Key::from_name("hongbao_commit_seconds"), &META).record(0.002);
        let Cell::Counter(ours) = &registry.series()[0].cell else { panic!() };
        assert_eq!(ours.get(), 3);
        assert_eq!(registry.series().len(), 2, "the pushes are not watched");
        let text = rendered.render();
        assert!(text.contains("hongbao_opens_total{result=\"opened\"} 3"), "{text}");
        assert!(text.contains("hongbao_pushes_total 4"), "{text}");
        assert!(text.contains("hongbao_commit_seconds_count 1"), "{text}");
        assert_eq!(beside.handles.read().unwrap().len(), 3, "one kept handle per key");

        let other = |i: usize| Key::from_parts("hongbao_other_total", vec![metrics::Label::new("n", i.to_string())]);
        for i in 0..HANDLES_KEPT_MAX + 10 {
            beside.register_counter(&other(i), &META).increment(1);
        }
        assert_eq!(beside.handles.read().unwrap().len(), HANDLES_KEPT_MAX);
        beside.register_counter(&other(HANDLES_KEPT_MAX + 5), &META).increment(1);
        let text = rendered.render();
        let past_the_bound = format!("hongbao_other_total{{n=\"{}\"}} 2", HANDLES_KEPT_MAX + 5);
        assert!(text.contains(&past_the_bound), "a handle past the bound still records");
    }
}
