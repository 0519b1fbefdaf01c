//! The probe of `perf overload`: `hongbao_client::probe`, pinging every
//! `EVERY` as `PROBE_USER` would, on a connection and a thread of its own.

use std::net::SocketAddr;
use std::time::Duration;

use hongbao_client::probe::{self, ProbeTiming};

pub use hongbao_client::probe::RoundTrips as Latencies;

/// How often the probe pings.
pub const EVERY: Duration = Duration::from_millis(10);
const TIMING: ProbeTiming =
    ProbeTiming { every: EVERY, ping_timeout: Duration::from_secs(30), connect_timeout: Duration::from_secs(30) };

pub struct Probe(probe::Probe);

impl Probe {
    /// Connects as `user` and starts pinging.
    pub fn start(addr: SocketAddr, user: u64) -> anyhow::Result<Probe> {
        Ok(Probe(probe::Probe::start(addr, user.to_string(), TIMING)?))
    }

    /// Stops pinging and returns the round trips.
    pub fn finish(self) -> anyhow::Result<Latencies> {
        Ok(self.0.finish()?)
    }
}
