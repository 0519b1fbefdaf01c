//! `hongbao perf <figure>`: the measurements behind `bench/run.sh`. Each
//! prints a plain-language line of what it ran and lines of the form
//! `FIGURE <name> <value> <unit> [baseline=<value> ratio=<value>]`.
//!
//! Everything here is bounded in count and time, targets loopback only, and
//! ends the processes it started (by their PID).

mod clients;
mod conns;
mod opens;
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
    /// One client process of conn-memory or broadcast: opens a share of the
    /// connections and holds them (started by them; JSON lines on stdin and
    /// stdout).
    #[command(hide = true)]
    Hold(clients::HoldArgs),
}

pub fn run(figure: Figure) -> anyhow::Result<()> {
    match figure {
        Figure::Opens(args) => opens::run(args),
        Figure::ConnMemory(args) => conns::conn_memory(args),
        Figure::Broadcast(args) => conns::broadcast(args),
        Figure::Hold(args) => clients::hold(args),
    }
}

/// One result line, in the format `bench/run.sh` and docs/benchmarks.md use.
pub fn figure(name: &str, value: f64, unit: &str, baseline: Option<f64>) {
    match baseline {
        Some(b) if b > 0.0 => println!("FIGURE {name} {value:.1} {unit} baseline={b:.1} ratio={:.2}", value / b),
        _ => println!("FIGURE {name} {value:.1} {unit}"),
    }
}
