//! The history: the last `SNAPSHOTS_KEPT` snapshots (what `/v1/live`
//! replays and the dashboard draws), and per-minute rollups of each
//! detector's signal for `MINUTES_KEPT` (the same-time-yesterday baseline).
//! Both are rings: their memory is fixed at start.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::alerts::{Alert, AlertBook};
use crate::snapshot::Snapshot;

/// Snapshots kept: 15 minutes at one a second, ~1.5 KB each as JSON.
pub const SNAPSHOTS_KEPT: usize = 900;

/// Snapshots a new `/v1/live` stream is sent first: the last two minutes,
/// enough to draw a chart at once.
pub const REPLAY_MAX: usize = 120;

/// Per-minute rollups kept per signal: 26 hours, so the minute 24 h ago and
/// its neighbours are there with two hours to spare (a restart loses them:
/// they live in memory).
pub const MINUTES_KEPT: usize = 26 * 60;

/// A snapshot and its JSON, made once for every stream that sends it.
#[derive(Debug)]
pub struct Published {
    pub snapshot: Snapshot,
    pub json: String,
}

struct Shared {
    ring: Mutex<VecDeque<Arc<Published>>>,
    /// The latest `seq` (0 before the first); streams wait on it.
    latest: watch::Sender<u64>,
    alerts: Mutex<AlertBook>,
}

/// The handle the admin API reads (and the sampler writes): cheap to clone.
#[derive(Clone)]
pub struct Live {
    shared: Arc<Shared>,
}

impl Default for Live {
    fn default() -> Live {
        Live::new()
    }
}

impl Live {
    pub fn new() -> Live {
        Live {
            shared: Arc::new(Shared {
                ring: Mutex::new(VecDeque::with_capacity(SNAPSHOTS_KEPT)),
                latest: watch::channel(0).0,
                alerts: Mutex::new(AlertBook::default()),
            }),
        }
    }

    /// The latest snapshot; `None` in the first second after start.
    pub fn latest(&self) -> Option<Arc<Published>> {
        lock(&self.shared.ring).back().cloned()
    }

    /// Up to `max` snapshots with `seq > after` (every kept one if `after`
    /// is 0), oldest first; the newest ones when there are more.
    pub fn since(&self, after: u64, max: usize) -> Vec<Arc<Published>> {
        let ring = lock(&self.shared.ring);
        let newer = ring.iter().filter(|p| p.snapshot.seq > after).count();
        ring.iter().skip(ring.len() - newer).skip(newer.saturating_sub(max)).cloned().collect()
    }

    /// Changes to the latest `seq` whenever a snapshot is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.latest.subscribe()
    }

    /// Firing alerts first (newest first), then the cleared ones kept
    /// (most recently cleared first).
    pub fn alerts(&self) -> Vec<Alert> {
        lock(&self.shared.alerts).list()
    }

    pub(crate) fn with_alerts<T>(&self, f: impl FnOnce(&mut AlertBook) -> T) -> T {
        f(&mut lock(&self.shared.alerts))
    }

    pub(crate) fn publish(&self, snapshot: Snapshot) {
        let seq = snapshot.seq;
        let json = serde_json_line(&snapshot);
        {
            let mut ring = lock(&self.shared.ring);
            if ring.len() == SNAPSHOTS_KEPT {
                ring.pop_front();
            }
            ring.push_back(Arc::new(Published { snapshot, json }));
        }
        self.shared.latest.send_replace(seq);
    }
}

fn serde_json_line(snapshot: &Snapshot) -> String {
    // Plain structs of numbers and strings always serialise; JSON strings
    // escape newlines, so the text is one line, as an SSE `data:` needs.
    serde_json::to_string(snapshot).expect("a snapshot always serialises")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every guarded change is one push or pop; a panic elsewhere leaves the
    // ring whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One minute of a signal: how many seconds had a value, their sum and sum
/// of squares (for the minute's mean and spread).
#[derive(Clone, Copy, Debug, Default)]
struct Minute {
    /// Unix minute this slot holds; a slot with another minute is stale.
    minute: u64,
    n: u32,
    sum: f64,
    sum_sq: f64,
}

/// A signal's per-minute rollups over `MINUTES_KEPT` minutes.
pub(crate) struct MinuteHistory {
    slots: Box<[Minute]>,
}

/// What a span of stored minutes says: the mean of its seconds and their
/// standard deviation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rollup {
    pub(crate) n: u32,
    pub(crate) mean: f64,
    pub(crate) std: f64,
}

impl MinuteHistory {
    pub(crate) fn new() -> MinuteHistory {
        MinuteHistory { slots: vec![Minute { minute: u64::MAX, ..Minute::default() }; MINUTES_KEPT].into() }
    }

    /// Adds one second's value at unix ms `at_ms`.
    pub(crate) fn record(&mut self, at_ms: u64, value: f64) {
        let minute = at_ms / 60_000;
        let slot = &mut self.slots[(minute % MINUTES_KEPT as u64) as usize];
        if slot.minute != minute {
            *slot = Minute { minute, ..Minute::default() };
        }
        slot.n += 1;
        slot.sum += value;
        slot.sum_sq += value * value;
    }

    /// The seconds stored for the minutes `first..=last` (unix minutes), taken together.
    pub(crate) fn span(&self, first: u64, last: u64) -> Option<Rollup> {
        let (mut n, mut sum, mut sum_sq) = (0u32, 0.0, 0.0);
        for minute in first..=last {
            let slot = &self.slots[(minute % MINUTES_KEPT as u64) as usize];
            if slot.minute == minute {
                n += slot.n;
                sum += slot.sum;
                sum_sq += slot.sum_sq;
            }
        }
        if n == 0 {
            return None;
        }
        let mean = sum / f64::from(n);
        let var = (sum_sq / f64::from(n) - mean * mean).max(0.0);
        Some(Rollup { n, mean, std: var.sqrt() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(seq: u64) -> Snapshot {
        Snapshot { seq, at_ms: seq * 1000, ..Snapshot::default() }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_replays_in_order() {
        let live = Live::new();
        assert!(live.latest().is_none());
        for seq in 1..=(SNAPSHOTS_KEPT as u64 + 50) {
            live.publish(snap(seq));
        }
        assert_eq!(live.latest().unwrap().snapshot.seq, SNAPSHOTS_KEPT as u64 + 50);
        let all = live.since(0, usize::MAX);
        assert_eq!(all.len(), SNAPSHOTS_KEPT);
        assert_eq!(all[0].snapshot.seq, 51);
        let replay: Vec<u64> = live.since(0, REPLAY_MAX).iter().map(|p| p.snapshot.seq).collect();
        assert_eq!(replay.len(), REPLAY_MAX);
        assert!(replay.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(*replay.last().unwrap(), SNAPSHOTS_KEPT as u64 + 50);
        let after: Vec<u64> = live.since(SNAPSHOTS_KEPT as u64 + 48, 10).iter().map(|p| p.snapshot.seq).collect();
        assert_eq!(after, [SNAPSHOTS_KEPT as u64 + 49, SNAPSHOTS_KEPT as u64 + 50]);
        assert!(!live.latest().unwrap().json.contains('\n'));
    }

    #[test]
    fn minutes_roll_up_and_expire() {
        let mut h = MinuteHistory::new();
        for s in 0..60 {
            h.record(s * 1000, if s % 2 == 0 { 9.0 } else { 11.0 });
        }
        let r = h.span(0, 0).unwrap();
        assert_eq!(r.n, 60);
        assert!((r.mean - 10.0).abs() < 1e-9 && (r.std - 1.0).abs() < 1e-9);
        // The same slot, MINUTES_KEPT minutes later, replaces the old minute.
        let later = MINUTES_KEPT as u64 * 60_000;
        h.record(later, 3.0);
        assert_eq!(h.span(0, 0), None);
        assert_eq!(h.span(MINUTES_KEPT as u64, MINUTES_KEPT as u64).unwrap().mean, 3.0);
    }
}
