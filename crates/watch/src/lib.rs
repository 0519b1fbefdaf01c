//! The live figures: per-second series of the work the server does, their
//! history, and the anomaly detector that turns them into alerts.
//!
//! Owns: a `metrics::Recorder` of our own (`recorder`) that keeps, for a
//! fixed allow-list of metric names, lock-free counters and latency
//! histograms beside the Prometheus recorder (`recorder::fanout`); the
//! sampler task (`sampler`) that every second turns their deltas and an
//! engine reading into a `Snapshot` (`snapshot`, the shape the dashboard is
//! built on); the last 900 snapshots and 26 hours of per-minute rollups
//! (`series`); the detector (`detector`: EWMA band, same time yesterday,
//! the money rule) and the alerts it raises (`alerts`). The admin API reads
//! all of it through one cloneable handle, `Live`.
//!
//! Must not: touch money, storage or HTTP. It reads the money totals it is
//! given (`EngineReading`, filled by `serve` from the engine) and judges
//! them; it links no engine, no store and no web framework, and nothing it
//! does can change what the server answers. Time comes from tokio's clock
//! (the tick) and a `WallClock` passed in (the `at_ms` stamps), so tests
//! run it on a paused clock.
//!
//! Bounded: at most `recorder::SERIES_MAX` series, `OPS_WATCHED_MAX`
//! operations with detectors, `series::SNAPSHOTS_KEPT` snapshots,
//! `series::MINUTES_KEPT` minutes per signal, `alerts::CLEARED_KEPT`
//! cleared alerts.

pub mod alerts;
pub mod detector;
pub mod recorder;
pub mod sampler;
pub mod series;
pub mod snapshot;

pub use alerts::{Alert, AlertState, Baseline, Severity, Signal};
pub use detector::{AlertConfig, AlertConfigError, SigmaFloor, OPS_WATCHED_MAX};
pub use recorder::{fanout, Registry, WatchRecorder};
pub use sampler::{EngineSource, GatewaysProvider, SamplerConfig, SystemClock, TokioClock, WallClock};
pub use series::{Live, Published, REPLAY_MAX};
pub use snapshot::{EngineReading, GatewayConnections, Snapshot, StorageFailure};

/// Touches, at zero, the series the Prometheus rules and the Grafana
/// dashboard (docs/) read that would otherwise appear only after their
/// first event: a `rate()` over a series that does not exist yet is no
/// data, not zero, and an alert on it stays silent. Call once after the
/// recorder is installed.
pub fn preregister() {
    for result in ["won", "none", "not_running", "overload"] {
        metrics::counter!("hongbao_shakes_total", "result" => result).increment(0);
    }
    for result in ["opened", "rejected"] {
        metrics::counter!("hongbao_opens_total", "result" => result).increment(0);
    }
    for place in ["shard_queue", "storage_reads"] {
        metrics::counter!("hongbao_overload_total", "where" => place).increment(0);
    }
    metrics::counter!("hongbao_packets_sent_total").increment(0);
    metrics::counter!("hongbao_campaign_released_total").increment(0);
    metrics::counter!("hongbao_alerts_fired_total", "op" => "money", "signal" => "money").increment(0);
    metrics::gauge!("hongbao_alerts_firing").set(0.0);
    metrics::counter!("hongbao_watch_series_refused_total").increment(0);
}
