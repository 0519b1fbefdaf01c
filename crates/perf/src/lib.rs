//! The measurements behind `bench/run.sh`: `hongbao perf <figure>`. Each
//! prints a plain-language line of what it ran and lines of the form
//! `FIGURE <name> <value> <unit> [baseline=<value> ratio=<value>]`.
//!
//! Owns: `opens` (durable opens per second in-process against the engine,
//! group commit against the transaction-per-open baseline), `conns`
//! (`conn-memory` and `broadcast` against a real server child, `server`),
//! and the lean client connections those hold, spread over `perf hold`
//! client processes (`clients`). Frames, the handshake, source addresses
//! and `/proc` readings come from `hongbao-client`.
//!
//! Runs inside the `hongbao` binary: it starts that binary again
//! (`std::env::current_exe()`) as the server child (`serve --dev`) and as
//! the `perf hold` client processes, so the binary must offer both.
//!
//! Must not: be linked by the server (the `hongbao` binary links it only
//! with its `tools` feature), or give the server's crates an API that only
//! a benchmark uses (the one call for the per-op baseline is
//! `opens::open_engine`). Everything here is bounded in count and time,
//! targets loopback only, and ends the processes it started (by their PID).
//!
//! Errors are `anyhow`: this crate is the body of a command-line
//! subcommand, and every error it returns is printed for a person, never
//! matched on.

mod clients;
mod cluster;
mod conns;
mod crash;
mod hop;
mod opens;
mod overload;
mod server;

/// The figures `hongbao perf` can measure.
#[derive(Debug, clap::Subcommand)]
pub enum Figure {
    /// Durable opens per second: group commit vs a transaction-per-open baseline.
    Opens(opens::OpensArgs),
    /// Server memory per idle client connection (TCP and WebSocket).
    ConnMemory(conns::ConnMemoryArgs),
    /// Time for one broadcast to reach every connected client.
    Broadcast(conns::BroadcastArgs),
    /// Crash torture: cycles of mixed load, kill -9 at a random instant,
    /// restart on the same data, and checks that every acknowledged outcome
    /// is there exactly once and the audit passes.
    Crash(crash::CrashArgs),
    /// The server at twice its capacity (shakes, keyed shakes, opens):
    /// memory bounded, every request answered, a probe's ping latency.
    Overload(overload::OverloadArgs),
    /// A cluster on this machine (2 SETs on PostgreSQL, 3 gateways, NATS)
    /// against single-node serve, back to back: shakes/s, opens/s, CPU per
    /// operation, cross-SET credit lag.
    Cluster(cluster::ClusterArgs),
    /// One request and its reply between a gateway and a SET: over the link
    /// (TCP) and over NATS request/reply, back to back.
    Hop(hop::HopArgs),
    /// One client process of conn-memory or broadcast: opens a share of the
    /// connections and holds them (started by them; JSON lines on stdin and
    /// stdout).
    #[command(hide = true)]
    Hold(clients::HoldArgs),
}

/// Measures `figure` and prints its lines: the body of `hongbao perf`.
pub fn run(figure: Figure) -> anyhow::Result<()> {
    match figure {
        Figure::Opens(args) => opens::run(args),
        Figure::ConnMemory(args) => conns::conn_memory(args),
        Figure::Broadcast(args) => conns::broadcast(args),
        Figure::Crash(args) => crash::run(args),
        Figure::Overload(args) => overload::run(args),
        Figure::Hold(args) => clients::hold(args),
        Figure::Hop(args) => hop::run(args),
        Figure::Cluster(args) => cluster::run(args),
    }
}

/// One result line, in the format `bench/run.sh` and docs/benchmarks.md use.
fn figure(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    match baseline {
        Some(b) if b > 0.0 => println!("FIGURE {name} {value:.1} {unit} baseline={b:.1} ratio={:.2}", value / b),
        _ => println!("FIGURE {name} {value:.1} {unit}"),
    }
}
