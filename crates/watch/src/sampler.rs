//! The sampler: a task that wakes every second (tokio time, so tests run it
//! on a paused clock), turns the recorder's deltas and an engine reading
//! into a `Snapshot`, runs the detectors over it and publishes both to the
//! `Live` handle. It ends when told to shut down.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::detector::{AlertConfig, Detectors};
use crate::recorder::{Cell, HistogramDelta, HistogramReader, Registry, Watched};
use crate::series::Live;
use crate::snapshot::{
    Campaigns, Commit, Connections, EngineReading, GatewayConnections, OpFigures, Overload, Queues, Shakes, Snapshot,
    Storage,
};

/// One snapshot per this.
pub const TICK: Duration = Duration::from_secs(1);

/// `result` labels of `hongbao_requests_total` that mean the server did not
/// do the work: it shed the request, could not reach storage, failed, or
/// was stopping. Every other result (`ok`, a shake's `none`, a refusal such
/// as `finished`) is the server answering as it should.
pub const FAILED_RESULTS: [&str; 4] = ["overload", "unavailable", "internal", "shutting_down"];

/// Where the levels and money totals come from: the engine, through
/// whoever owns it (`serve`), so this crate links none.
pub trait EngineSource: Send + Sync + 'static {
    fn read(&self) -> impl Future<Output = EngineReading> + Send;
}

/// Connections of each gateway process other than the serve process's own
/// (`serve --gateways N`: the N-1 children). The snapshot's first entry,
/// `serve`, is the engine's count of every connection less theirs. `None` in
/// `SamplerConfig`: no other gateway processes.
pub type GatewaysProvider = Arc<dyn Fn() -> Vec<GatewayConnections> + Send + Sync>;

/// Unix time in ms; passed in so tests choose it.
pub trait WallClock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system's clock.
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// A wall clock that follows tokio's clock from a given start: on a paused
/// runtime, it moves only as the test advances time.
pub struct TokioClock {
    start_ms: u64,
    start: Instant,
}

impl TokioClock {
    pub fn starting_at(start_ms: u64) -> TokioClock {
        TokioClock { start_ms, start: Instant::now() }
    }
}

impl WallClock for TokioClock {
    fn now_ms(&self) -> u64 {
        self.start_ms + self.start.elapsed().as_millis() as u64
    }
}

pub struct SamplerConfig {
    pub alerts: AlertConfig,
    pub gateways: Option<GatewaysProvider>,
    pub clock: Arc<dyn WallClock>,
}

impl Default for SamplerConfig {
    fn default() -> SamplerConfig {
        SamplerConfig { alerts: AlertConfig::default(), gateways: None, clock: Arc::new(SystemClock) }
    }
}

/// Starts the sampler. The first snapshot comes one `TICK` later; the task
/// ends when `shutdown` turns `true` (or its sender is dropped).
pub fn spawn<S: EngineSource>(
    registry: Arc<Registry>,
    source: S,
    live: Live,
    config: SamplerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut sampler = Sampler::new(registry, live, config);
    tokio::spawn(async move {
        let start = Instant::now();
        let mut ticks = tokio::time::interval_at(start + TICK, TICK);
        // After a stall (a suspended process), one snapshot for the whole gap.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last = start;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
            // One reading is one committed state (the store changes its
            // money totals once per batch, under one lock), so the money
            // alert may page on it.
            let reading = source.read().await;
            let now = Instant::now();
            sampler.tick(now - last, reading);
            last = now;
        }
        tracing::debug!("live sampler stopped");
    })
}

/// How the sampler remembers a series' last reading.
enum Reader {
    Counter(u64),
    Gauge,
    Histogram(HistogramReader),
}

pub(crate) struct Sampler {
    registry: Arc<Registry>,
    live: Live,
    gateways: Option<GatewaysProvider>,
    clock: Arc<dyn WallClock>,
    /// By series index (series are only appended).
    readers: Vec<Reader>,
    detectors: Detectors,
    seq: u64,
}

/// One window's figures, before they become a snapshot.
#[derive(Default)]
struct Window {
    ops: BTreeMap<String, (u64, u64, HistogramDelta)>,
    shakes: Shakes,
    opens: u64,
    sends: u64,
    released: u64,
    overload: Overload,
    commit_seconds: HistogramDelta,
    batch_ops: HistogramDelta,
    parked: f64,
}

impl Sampler {
    pub(crate) fn new(registry: Arc<Registry>, live: Live, config: SamplerConfig) -> Sampler {
        let mut sampler = Sampler {
            registry,
            live,
            gateways: config.gateways,
            clock: config.clock,
            readers: Vec::new(),
            detectors: Detectors::new(config.alerts),
            seq: 0,
        };
        // What happened before start is not the first second's.
        let _ = sampler.window();
        sampler
    }

    /// Reads every series' change since the last call.
    fn window(&mut self) -> Window {
        let mut w = Window::default();
        for (i, series) in self.registry.series().iter().enumerate() {
            if i == self.readers.len() {
                self.readers.push(match &series.cell {
                    Cell::Counter(_) => Reader::Counter(0),
                    Cell::Gauge(_) => Reader::Gauge,
                    Cell::Histogram(_) => Reader::Histogram(HistogramReader::new()),
                });
            }
            match (&series.cell, &mut self.readers[i]) {
                (Cell::Counter(c), Reader::Counter(previous)) => {
                    let now = c.get();
                    let delta = now.wrapping_sub(*previous);
                    *previous = now;
                    w.add_counter(series.name, |l| series.label(l), delta);
                }
                (Cell::Gauge(g), Reader::Gauge) if series.name == Watched::ConnectionsParked => {
                    w.parked += g.get();
                }
                (Cell::Histogram(h), Reader::Histogram(reader)) => {
                    let delta = reader.delta(h);
                    w.add_histogram(series.name, series.label("op"), &delta);
                }
                // A series' cell never changes kind.
                _ => {}
            }
        }
        w
    }

    /// Builds, judges and publishes the snapshot of the last `elapsed`.
    pub(crate) fn tick(&mut self, elapsed: Duration, reading: EngineReading) {
        let w = self.window();
        let secs = elapsed.as_secs_f64().max(1e-3);
        let per_s = |n: u64| (n as f64 / secs).round() as u64;
        self.seq += 1;
        let ops = w
            .ops
            .iter()
            .filter(|(_, (count, _, _))| *count > 0)
            .map(|(op, (count, ok, latency))| {
                let figures = OpFigures {
                    count: per_s(*count),
                    ok: per_s(*ok),
                    success_ratio: Some(*ok as f64 / *count as f64),
                    p50_ms: latency.quantile(0.5).map(ms),
                    p99_ms: latency.quantile(0.99).map(ms),
                };
                (op.clone(), figures)
            })
            .collect();
        let others = self.gateways.as_ref().map(|provider| provider()).unwrap_or_default();
        let elsewhere: u64 = others.iter().map(|g| g.connections).sum();
        // The two counts are read a moment apart: a connection that moved
        // in between must not make the serve process's count wrap.
        let own = GatewayConnections {
            name: "serve".into(),
            pid: std::process::id(),
            connections: reading.connections.saturating_sub(elsewhere),
        };
        let gateways: Vec<GatewayConnections> = std::iter::once(own).chain(others).collect();
        let shakes = Shakes {
            won: per_s(w.shakes.won),
            none: per_s(w.shakes.none),
            not_running: per_s(w.shakes.not_running),
            overload: per_s(w.shakes.overload),
        };
        let mut snapshot = Snapshot {
            seq: self.seq,
            at_ms: self.clock.now_ms(),
            connections: Connections {
                total: gateways.iter().map(|g| g.connections).sum(),
                parked: w.parked.max(0.0) as u64,
                gateways,
            },
            ops,
            wins_per_s: shakes.won,
            shakes,
            opens_per_s: per_s(w.opens),
            sends_per_s: per_s(w.sends),
            commit: Commit {
                commits_per_s: per_s(w.batch_ops.count()),
                batch_ops_mean: w.batch_ops.mean(),
                batch_ops_p99: w.batch_ops.quantile(0.99),
                p50_ms: w.commit_seconds.quantile(0.5).map(ms),
                p99_ms: w.commit_seconds.quantile(0.99).map(ms),
            },
            queues: Queues { writer: reading.writer_queue_depth, shard: reading.shard_queue_depth },
            overload_per_s: Overload {
                total: per_s(w.overload.total),
                shard_queue: per_s(w.overload.shard_queue),
                storage_reads: per_s(w.overload.storage_reads),
            },
            money: reading.money(),
            storage: Storage { up: reading.storage_failure.is_none(), failure: reading.storage_failure.clone() },
            campaigns: Campaigns { running: reading.campaigns_running, released_per_s: per_s(w.released) },
            alerts_firing: 0,
        };
        let firing = self.live.with_alerts(|book| {
            self.detectors.observe(&snapshot, book);
            book.firing()
        });
        snapshot.alerts_firing = firing as u64;
        metrics::counter!("hongbao_watch_series_refused_total").absolute(self.registry.refused());
        self.live.publish(snapshot);
    }
}

fn ms(seconds: f64) -> f64 {
    // Two decimals of a millisecond (10 µs) are more than the buckets hold.
    (seconds * 100_000.0).round() / 100.0
}

impl Window {
    fn add_counter<'a>(&mut self, name: Watched, label: impl Fn(&str) -> Option<&'a str>, delta: u64) {
        if delta == 0 {
            return;
        }
        match name {
            Watched::Requests => {
                let op = label("op").unwrap_or("unknown");
                let failed = label("result").is_some_and(|r| FAILED_RESULTS.contains(&r));
                let entry = self.ops.entry(op.to_owned()).or_default();
                entry.0 += delta;
                if !failed {
                    entry.1 += delta;
                }
            }
            Watched::Shakes => match label("result") {
                Some("won") => self.shakes.won += delta,
                Some("none") => self.shakes.none += delta,
                Some("not_running") => self.shakes.not_running += delta,
                Some("overload") => self.shakes.overload += delta,
                _ => {}
            },
            Watched::Opens if label("result") == Some("opened") => self.opens += delta,
            Watched::PacketsSent => self.sends += delta,
            Watched::CampaignReleased => self.released += delta,
            Watched::Overload => {
                self.overload.total += delta;
                match label("where") {
                    Some("shard_queue") => self.overload.shard_queue += delta,
                    Some("storage_reads") => self.overload.storage_reads += delta,
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn add_histogram(&mut self, name: Watched, op: Option<&str>, delta: &HistogramDelta) {
        match name {
            Watched::RequestSeconds => {
                self.ops.entry(op.unwrap_or("unknown").to_owned()).or_default().2.add(delta);
            }
            Watched::CommitSeconds => self.commit_seconds.add(delta),
            Watched::CommitBatchOps => self.batch_ops.add(delta),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
