//! The load simulator behind `hongbao bench` and `hongbao demo`.
//!
//! Owns: simulated users (connect, handshake, heartbeats, reconnects, shakes,
//! grab and open, the bench's broadcast), the clock-coordinated shake
//! schedule, per-second counters and latency histograms, worker processes,
//! the phase plan, memory per connection (server, kernel) and over an idle
//! hold, the idle hold's ping probe, reconciliation against the server's
//! ledger, and the report (JSON, CSV, PNG plots).
//!
//! Must not: reach into the server's crates beyond the protocol and the admin
//! API; it measures the server from outside, as a real client fleet would.

pub mod bench;
pub mod memory;
pub mod probe;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod timeline;
pub mod user;
pub mod worker;
