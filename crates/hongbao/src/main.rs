//! The `hongbao` binary: parses the command line, sets up logging, and hands
//! over to one module per subcommand. Logs go to stderr; stdout carries only
//! what scripts read (the `HONGBAO_READY` line, audit reports, tokens,
//! `FIGURE` lines).
//!
//! The measuring tools (`demo`, `bench`, `perf` and the hidden `sim-worker`)
//! come with the `tools` feature, on by default; without it the binary is
//! the server alone.

mod audit;
#[cfg(feature = "tools")]
mod bench;
mod cluster;
mod config;
mod gateways;
mod keys;
mod serve;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// jemalloc, not the system allocator, with its background thread: an idle
/// connection is a handful of small blocks, and what a connection frees when
/// it parks (its task, its reactor registration) must go back to the system.
/// jemalloc keeps each size in slabs of its own, so those blocks leave whole
/// pages empty, and its background thread returns pages unused for 10 s.
/// glibc's malloc keeps them as holes among the blocks that stay, and so
/// (as measured) did mimalloc (docs/benchmarks.md, conn-memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "hongbao", version, about = "Red-packet (红包) server: group packets, shake campaigns, push")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: gateway (TCP and WebSocket), engine and admin API.
    Serve(Box<config::ServeArgs>),
    /// Check money conservation on a store: a data directory (SQLite) or a
    /// PostgreSQL database (--store). Exit code 0: pass, 1: violations
    /// found, 2: the data could not be read.
    Audit {
        /// Data directory to audit.
        #[arg(long, env = "HONGBAO_DATA", default_value = config::DATA_DEFAULT, value_name = "DIR")]
        data: PathBuf,
        /// A postgres:// URL to audit instead of the data directory.
        #[arg(long, env = "HONGBAO_STORE", value_name = "URL", hide_env_values = true)]
        store: Option<String>,
        /// Audit a whole cluster instead: every SET's store in this
        /// cluster.toml and the credits in flight between them.
        #[arg(long, value_name = "FILE", conflicts_with = "store")]
        cluster: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move the settled days before a date out of a PostgreSQL store's hot
    /// tables into its archive tables (lookups and the audit still read
    /// them). Days with open packets, today and later days stay.
    Archive {
        /// The PostgreSQL store (postgres:// URL).
        #[arg(long, env = "HONGBAO_STORE", value_name = "URL", hide_env_values = true)]
        store: String,
        /// First day that stays hot (YYYY-MM-DD); at most today.
        #[arg(long, value_name = "DATE")]
        before: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a client token for a user, signed with the data directory's secret.
    Token {
        /// Data directory whose secret.key signs the token.
        #[arg(long, env = "HONGBAO_DATA", default_value = config::DATA_DEFAULT, value_name = "DIR")]
        data: PathBuf,
        /// User id the token is for.
        #[arg(long)]
        user: u64,
        /// Seconds the token stays valid.
        #[arg(long, default_value_t = hongbao_admin::TOKEN_TTL_S_DEFAULT)]
        ttl_s: u64,
        /// Sign with this secret instead of <data>/secret.key.
        #[arg(long, env = "HONGBAO_SECRET", hide_env_values = true)]
        secret: Option<String>,
    },
    /// Reproduce the "10 billion requests" experiment, sized to finish in
    /// about two minutes: a local server, simulated users connecting, shaking
    /// at two rates while a campaign releases packets, a group-packet phase,
    /// then reconciliation, audit and a report (exit code 0 only if every
    /// check passes).
    #[cfg(feature = "tools")]
    Demo {
        /// A small plan that finishes in well under a minute.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        plan: bench::PlanArgs,
        /// A running server or cluster instead of one started here.
        #[command(flatten)]
        remote: bench::RemoteArgs,
    },
    /// The load simulator: the same phases at the reference's scale (as far
    /// as one machine goes), every figure a flag, against a local server or
    /// a running one (--tcp and --admin).
    #[cfg(feature = "tools")]
    Bench {
        #[command(flatten)]
        plan: bench::PlanArgs,
        #[command(flatten)]
        remote: bench::RemoteArgs,
    },
    /// Measure one performance figure (used by bench/run.sh); prints
    /// `FIGURE <name> <value> <unit> [baseline=… ratio=…]` lines.
    #[cfg(feature = "tools")]
    #[command(subcommand)]
    Perf(hongbao_perf::Figure),
    /// One simulator process (started by `bench` and `demo`; JSON lines on
    /// stdin and stdout).
    #[cfg(feature = "tools")]
    #[command(hide = true)]
    SimWorker(bench::WorkerArgs),
    /// One SET of a cluster (cluster.toml): an engine with its own store and
    /// admin API, taking gateway links over TCP; no client listeners.
    Set(cluster::SetArgs),
    /// A cluster gateway: client connections (TCP and WebSocket), each
    /// request routed to the SET that owns it; no store.
    Gateway(cluster::GatewayArgs),
    /// Make the secrets a cluster's processes share (link key, token
    /// secret, admin key) in the directory cluster.toml names, if missing.
    Keys(cluster::ClusterArg),
    /// The cluster admin: one operator API (the paths of `serve`'s admin
    /// API) over every SET's admin API; no store.
    ClusterAdmin(cluster::ClusterAdminArgs),
    /// One extra gateway process (started by `serve --gateways N`; linked
    /// to it over a Unix socket).
    #[command(hide = true)]
    GatewayWorker(gateways::WorkerArgs),
}

/// `hongbao archive`: runs it and prints what moved and what stayed.
fn archive(store: &str, before: &str, json: bool) -> anyhow::Result<()> {
    let location = hongbao_store::StoreLocation::postgres(store)?;
    let report = hongbao_store::archive(&location, before).context("cannot archive")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for day in &report.archived {
        println!(
            "archived {}: {} packets, {} claims, {} shake wins",
            day.date, day.packets, day.claims, day.shake_wins
        );
    }
    for day in &report.kept {
        println!("kept {}: {} packets still open", day.date, day.open_packets);
    }
    if report.archived.is_empty() && report.kept.is_empty() {
        println!("nothing to archive before {}", report.hot_from);
    }
    println!("hot from {}: {}", report.hot_from, report.hot_because);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(default) = cli.command.log_level() {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }

    match cli.command {
        #[cfg(feature = "tools")]
        Command::Demo { quick, plan, remote } => checked(bench::run(bench::Kind::Demo { quick }, plan, remote)),
        #[cfg(feature = "tools")]
        Command::Bench { plan, remote } => checked(bench::run(bench::Kind::Bench, plan, remote)),
        #[cfg(feature = "tools")]
        Command::SimWorker(args) => report(bench::sim_worker(args)),
        #[cfg(feature = "tools")]
        Command::Perf(figure) => report(hongbao_perf::run(figure)),
        Command::Serve(args) => report(serve(*args)),
        Command::GatewayWorker(args) => report(gateways::worker(args)),
        Command::Set(args) => report(cluster::run_set(args)),
        Command::Gateway(args) => report(cluster::run_gateway(args)),
        Command::Keys(arg) => report(cluster::make_keys(arg)),
        Command::ClusterAdmin(args) => report(cluster::run_cluster_admin(args)),
        Command::Audit { data, store, cluster, json } => {
            let audited = match cluster {
                Some(path) => match hongbao_cluster::ClusterFile::load(&path) {
                    Ok(file) => audit::run_cluster(&file, json),
                    Err(e) => {
                        eprintln!("error: cannot audit: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => {
                    hongbao_store::StoreLocation::resolve(store.as_deref(), &data).and_then(|at| audit::run(&at, json))
                }
            };
            match audited {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: cannot audit: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Archive { store, before, json } => report(archive(&store, &before, json)),
        Command::Token { data, user, ttl_s, secret } => {
            report(token::issue(&data, user, ttl_s, secret).map(|t| println!("{t}")).context("cannot issue a token"))
        }
    }
}

impl Command {
    /// The default level of the log on stderr, or `None` for a command that
    /// sets up its own log.
    fn log_level(&self) -> Option<&'static str> {
        #[cfg(feature = "tools")]
        match self {
            // demo and bench send the log of their local server to the report folder.
            Command::Demo { .. } | Command::Bench { .. } => return None,
            // perf prints figures; the engine's start/stop lines would only clutter them.
            Command::Perf(_) => return Some("warn"),
            _ => {}
        }
        Some("info")
    }
}

fn serve(args: config::ServeArgs) -> anyhow::Result<()> {
    let settings = config::Settings::resolve(args)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(serve::run(settings)).context("serve failed")
}

/// Exit code 0 when every check passed, 1 when one failed, 2 on an error.
#[cfg(feature = "tools")]
fn checked(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(2)
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line. Some error types repeat their
/// source in their own message and some do not; a cause already shown is
/// not shown twice.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}
