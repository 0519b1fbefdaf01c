//! The run's timeline: one row per elapsed second, the simulator's view next
//! to the server's. The report (CSV, plots) and the checks read only this.

use serde::{Deserialize, Serialize};

use crate::stats::SecondRow;

/// What the server said about one second, from deltas of its cumulative
/// counters (`GET /v1/stats`, `GET /v1/campaigns/{id}`) polled once a second.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerSecond {
    /// Client connections the server held at the poll.
    pub connections: u64,
    /// Shakes the server answered during the second (per second, normalised
    /// by the actual time between polls).
    pub shakes_per_s: f64,
    pub shake_wins_per_s: f64,
    pub opens_per_s: f64,
    /// Campaign packets released during the second.
    pub released_per_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TimelineRow {
    /// Whole seconds since the plan started.
    pub elapsed_s: u64,
    /// `connect`, `shake-1`, `shake-2`, `group`, `drain`.
    pub phase: String,
    /// Shake rate the simulator aimed at in this second.
    pub target_rate: u64,
    /// The simulator's counters for this second, all workers merged.
    pub client: SecondRow,
    /// `None` when the server could not be polled in this second.
    pub server: Option<ServerSecond>,
}
