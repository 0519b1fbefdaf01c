//! The idle hold's probe: `hongbao_client::probe`, pinging every `EVERY` on
//! a connection, a thread and a runtime of the bench's own (not the
//! workers'), summed up for the report.

use std::net::SocketAddr;
use std::time::Duration;

use hongbao_client::probe::{Probe as ClientProbe, ProbeTiming, RoundTrips};
use serde::Serialize;

pub use hongbao_client::probe::ProbeError;

/// How often the probe pings.
pub const EVERY: Duration = Duration::from_millis(100);
/// The round trip the server aims at for a ping (DESIGN.md: p99 under 10 ms).
pub const TARGET_P99_MS: f64 = 10.0;
const TIMING: ProbeTiming =
    ProbeTiming { every: EVERY, ping_timeout: Duration::from_secs(10), connect_timeout: Duration::from_secs(30) };

/// The probe's round trips over the hold.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProbeSummary {
    pub every_ms: u64,
    pub pings: u64,
    /// Pings with no pong within the timeout (or cut off by a closed connection).
    pub lost: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub target_p99_ms: f64,
}

impl ProbeSummary {
    fn of(trips: &RoundTrips) -> ProbeSummary {
        let ms = |v: f64| if v.is_nan() { 0.0 } else { v };
        ProbeSummary {
            every_ms: EVERY.as_millis() as u64,
            pings: trips.us.len() as u64 + trips.lost,
            lost: trips.lost,
            p50_ms: ms(trips.ms(0.50)),
            p99_ms: ms(trips.ms(0.99)),
            max_ms: ms(trips.max_ms()),
            target_p99_ms: TARGET_P99_MS,
        }
    }
}

pub struct Probe(ClientProbe);

impl Probe {
    /// Connects to `server`, logs in with `token` and starts pinging.
    pub fn start(server: SocketAddr, token: String) -> Result<Probe, ProbeError> {
        Ok(Probe(ClientProbe::start(server, token, TIMING)?))
    }

    /// Stops pinging, waits for the pings in flight, closes the connection
    /// and sums up the round trips.
    pub fn finish(self) -> Result<ProbeSummary, ProbeError> {
        Ok(ProbeSummary::of(&self.0.finish()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_of_round_trips_and_losses() {
        let trips = RoundTrips { us: (1..=100).map(|u| u * 100).collect(), lost: 2 };
        let s = ProbeSummary::of(&trips);
        assert_eq!((s.pings, s.lost, s.every_ms), (102, 2, 100));
        assert!((s.p99_ms - 9.9).abs() < 0.01 && (s.max_ms - 10.0).abs() < 0.01);
        let none = ProbeSummary::of(&RoundTrips::default());
        assert_eq!((none.pings, none.p99_ms), (0, 0.0));
    }
}
