//! `hongbao demo`, `hongbao bench` and the hidden `hongbao sim-worker`: the
//! command-line side of the simulator (`hongbao_sim`). Without a server
//! address the bench starts one in this process on a temporary embedded
//! store, stops it after the run and audits its data. Built with the `tools`
//! feature only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use hongbao_boundary::TokenSigner;
use hongbao_shard::StoreLocation;
use hongbao_sim::bench::{self, Check, Plan, ServerTarget, ShakeStep, Summary, WorkerLauncher};
use hongbao_sim::worker::{self, WorkerConfig};

use crate::config::{ServeArgs, Settings};
use crate::serve;

/// Every figure of the plan; each overrides the chosen base plan.
#[derive(Debug, Default, clap::Args)]
pub struct PlanArgs {
    /// Simulated users (each one connection)
    #[arg(long)]
    pub users: Option<u64>,
    /// New connections per second during the connect phase
    #[arg(long, value_name = "PER_S")]
    pub connect_rate: Option<u64>,
    /// Shakes per second in phase 2
    #[arg(long, value_name = "PER_S")]
    pub q1: Option<u64>,
    /// Seconds of phase 2
    #[arg(long, value_name = "S")]
    pub q1_s: Option<u64>,
    /// Shakes per second in phase 3
    #[arg(long, value_name = "PER_S")]
    pub q2: Option<u64>,
    /// Seconds of phase 3
    #[arg(long, value_name = "S")]
    pub q2_s: Option<u64>,
    /// All shake phases at once, e.g. `20000:8,40000:8,60000:8` (rate:seconds);
    /// replaces the plan's two (then --q1/--q2 adjust the first two)
    #[arg(long, value_name = "RATE:S,...")]
    pub steps: Option<String>,
    /// Campaign packets released per second during phases 2 and 3
    #[arg(long, value_name = "PER_S")]
    pub campaign_rate: Option<u64>,
    /// Group packets sent in phase 4 (three random users each)
    #[arg(long, value_name = "N")]
    pub group_packets: Option<u64>,
    /// Group packets per second in phase 4
    #[arg(long, value_name = "PER_S")]
    pub group_rate: Option<u64>,
    /// Longest wait for every group share to be opened
    #[arg(long, value_name = "S")]
    pub drain_timeout_s: Option<u64>,
    /// Users per simulator process (a process may hold 20,000 open files)
    #[arg(long, value_name = "N")]
    pub users_per_worker: Option<u64>,
    /// Runtime threads per simulator process
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Seconds between each simulated user's heartbeats; a local server
    /// announces the same and closes a connection after three missed
    /// [default: 30]
    #[arg(long, value_name = "S")]
    pub heartbeat_s: Option<u64>,
    /// Seconds of an idle hold after the connect phase: everyone connected
    /// and heartbeating, nobody shaking; server and simulator memory sampled,
    /// a probe pinging every 100 ms [default: 0, no hold]
    #[arg(long, value_name = "S")]
    pub idle_s: Option<u64>,
    /// Gateway processes of the local server (`serve --gateways`)
    #[arg(long, value_name = "N")]
    pub gateways: Option<u16>,
    /// The local server's `--park-after-s`: seconds of nothing but
    /// heartbeats before a connection parks [default: the server's, 30]
    #[arg(long, value_name = "S")]
    pub park_after_s: Option<u32>,
    /// Report folder [default: ./hongbao-reports/<command>-<unix time>]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Data directory of the local server [default: a temporary directory,
    /// removed afterwards]
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Store of record of the local server (a postgres:// URL), audited
    /// after the run; with --tcp/--admin, the running server's store to
    /// audit [default: SQLite in the data directory]
    #[arg(long, env = "HONGBAO_STORE", value_name = "URL", hide_env_values = true)]
    pub store: Option<String>,
}

impl PlanArgs {
    fn apply(&self, mut p: Plan) -> anyhow::Result<Plan> {
        let set = |field: &mut u64, v: Option<u64>| {
            if let Some(v) = v {
                *field = v;
            }
        };
        set(&mut p.users, self.users);
        set(&mut p.connect_per_s, self.connect_rate);
        if let Some(steps) = &self.steps {
            p.shakes = ShakeStep::parse_list(steps)?;
        }
        for (i, (rate, secs)) in [(self.q1, self.q1_s), (self.q2, self.q2_s)].into_iter().enumerate() {
            if let Some(step) = p.shakes.get_mut(i) {
                set(&mut step.rate, rate);
                set(&mut step.secs, secs);
            }
        }
        set(&mut p.campaign_rate, self.campaign_rate);
        set(&mut p.group_packets, self.group_packets);
        set(&mut p.group_rate, self.group_rate);
        set(&mut p.drain_timeout_s, self.drain_timeout_s);
        set(&mut p.users_per_worker, self.users_per_worker);
        set(&mut p.heartbeat_s, self.heartbeat_s);
        set(&mut p.idle_s, self.idle_s);
        if let Some(t) = self.worker_threads {
            p.worker_threads = t;
        }
        Ok(p)
    }
}

/// A server given by address instead of a local one.
#[derive(Debug, Default, clap::Args)]
pub struct RemoteArgs {
    /// TCP client address of a running server (omit to start one here);
    /// several, comma-separated, spread the users over a cluster's gateways
    #[arg(long, value_name = "ADDR[,ADDR…]", requires = "admin", value_delimiter = ',')]
    pub tcp: Vec<SocketAddr>,
    /// Admin API address of that server
    #[arg(long, value_name = "ADDR", requires = "tcp")]
    pub admin: Option<SocketAddr>,
    /// Admin API key of that server (none for a --dev server)
    #[arg(long, env = "HONGBAO_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Process id of that server, if it runs on this machine: its CPU time
    /// per phase goes into the report (a cluster's processes: several,
    /// comma-separated, summed)
    #[arg(long, value_name = "PID[,PID…]", value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// The cluster's file (cluster.toml): the run ends with `hongbao audit
    /// --cluster` of every SET's store instead of one store's audit
    #[arg(long, value_name = "FILE", conflicts_with_all = ["data", "store"])]
    pub cluster: Option<PathBuf>,
    /// Token secret of that server, to sign the simulated users' tokens
    /// (none for a --dev server, which takes bare user ids)
    #[arg(long, env = "HONGBAO_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
}

/// Arguments of the hidden `sim-worker` command, given by the bench.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long, value_delimiter = ',')]
    server: Vec<SocketAddr>,
    #[arg(long)]
    first: u64,
    #[arg(long)]
    count: u64,
    #[arg(long)]
    users_total: u64,
    #[arg(long)]
    connect_per_s: u64,
    #[arg(long, default_value_t = 30)]
    heartbeat_s: u64,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Loopback address to connect from (one per worker).
    #[arg(long)]
    source: Option<std::net::Ipv4Addr>,
    #[arg(long, env = "HONGBAO_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

/// Simulated users' tokens last the run and then some.
const SIM_TOKEN_TTL_S: u64 = 24 * 3600;

pub fn sim_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let token: Box<dyn Fn(u64) -> String + Send + Sync> = match args.secret {
        Some(secret) => {
            let signer = TokenSigner::new(secret.into_bytes());
            let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            Box::new(move |user| signer.issue(user, SIM_TOKEN_TTL_S, now_s))
        }
        None => Box::new(|user| user.to_string()),
    };
    let config = WorkerConfig {
        servers: args.server,
        first_index: args.first,
        count: args.count,
        users_total: args.users_total,
        connect_per_s: args.connect_per_s,
        heartbeat: Duration::from_secs(args.heartbeat_s.max(1)),
        threads: args.threads,
        source: args.source,
    };
    let stdin = std::io::BufReader::new(std::io::stdin());
    worker::run(config, token, stdin, std::io::stdout().lock()).context("simulator worker failed")
}

/// Which command is running: they differ only in the base plan.
pub enum Kind {
    Demo { quick: bool },
    Bench,
}

/// Runs the plan; `Ok(true)` when every check passed.
pub fn run(kind: Kind, plan_args: PlanArgs, remote: RemoteArgs) -> anyhow::Result<bool> {
    let (base, name) = match kind {
        Kind::Demo { quick: true } => (Plan::quick(), "demo-quick"),
        Kind::Demo { quick: false } => (Plan::demo(), "demo"),
        Kind::Bench => (Plan::reference(), "bench"),
    };
    let plan = plan_args.apply(base)?;
    plan.validate()?;
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let out = plan_args.out.clone().unwrap_or_else(|| PathBuf::from(format!("hongbao-reports/{name}-{now_s}")));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create the report folder {}", out.display()))?;
    let out = std::fs::canonicalize(&out).unwrap_or(out);
    let mut launcher = WorkerLauncher {
        program: std::env::current_exe().context("cannot find the hongbao executable for the workers")?,
        args: vec!["sim-worker".to_owned()],
        env: Vec::new(),
    };

    let summary = match (remote.tcp.first().copied(), remote.admin) {
        (Some(tcp), Some(admin)) => {
            init_logging(None);
            if let Some(secret) = &remote.secret {
                launcher.env.push(("HONGBAO_SECRET".to_owned(), secret.clone()));
            }
            let target = ServerTarget {
                tcp,
                gateways: remote.tcp.clone(),
                admin,
                admin_key: remote.admin_key.clone(),
                pids: remote.server_pid.into_iter().collect(),
            };
            let store = match (&plan_args.store, &plan_args.data) {
                (Some(url), _) => Some(StoreLocation::postgres(url)?),
                (None, Some(data)) => Some(StoreLocation::Sqlite(data.clone())),
                (None, None) => None,
            };
            let cluster = match &remote.cluster {
                Some(path) => Some(hongbao_cluster::ClusterFile::load(path)?),
                None => None,
            };
            let mut finish = move || match (&store, &cluster) {
                (_, Some(cluster)) => vec![cluster_audit_check(cluster)],
                // A read transaction sees one committed state, so a live
                // server's store can be audited while it runs.
                (Some(store), None) => vec![audit_check(store)],
                (None, None) => {
                    eprintln!("note: no --data, --store or --cluster given, so the server's store was not audited");
                    Vec::new()
                }
            };
            bench::run(&plan, &target, &launcher, &out, &mut finish)?
        }
        _ => run_local(&plan, &plan_args, &launcher, &out)?,
    };
    println!("\n{}", bench::summary_table(&summary, &out));
    Ok(summary.pass)
}

/// Starts a server in this process, runs the plan, stops it, audits it.
fn run_local(plan: &Plan, plan_args: &PlanArgs, launcher: &WorkerLauncher, out: &Path) -> anyhow::Result<Summary> {
    init_logging(Some(&out.join("server.log")));
    let data = plan_args.data.as_deref();
    let temp = match data {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("hongbao-demo-").tempdir().context("temporary data directory")?),
    };
    let data =
        data.map(Path::to_path_buf).or_else(|| temp.as_ref().map(|t| t.path().to_path_buf())).expect("one of them");
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    // The server announces the simulated users' heartbeat interval and
    // closes a connection after the same three missed heartbeats as its
    // defaults (90 s for 30 s).
    let heartbeat_s = u32::try_from(plan.heartbeat_s).context("heartbeat interval")?;
    let missed = hongbao_gateway::IDLE_TIMEOUT_S_DEFAULT / hongbao_gateway::HEARTBEAT_S_DEFAULT;
    let args = ServeArgs {
        data: Some(data.clone()),
        store: plan_args.store.clone(),
        dev: Some(true),
        tcp: Some(loopback(0)),
        ws: Some(loopback(0)),
        admin: Some(loopback(0)),
        // Room for every simulated user, whatever the default.
        max_connections: Some((plan.users as usize + 100).max(hongbao_gateway::MAX_CONNECTIONS_DEFAULT)),
        gateways: plan_args.gateways,
        heartbeat_s: Some(heartbeat_s),
        idle_timeout_s: Some(heartbeat_s.saturating_mul(missed)),
        park_after_s: plan_args.park_after_s,
        ..ServeArgs::default()
    };
    let settings = Settings::resolve(args)?;
    let store = match &settings.store {
        StoreLocation::Sqlite(_) => None,
        postgres => Some(postgres.clone()),
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    let recorders = serve::install_metrics().context("cannot install the metrics recorder")?;
    let server = runtime.block_on(serve::start(settings, recorders)).context("cannot start the local server")?;
    let ready = server.ready().clone();
    let tcp = ready.tcp.context("the local server has no client listener")?;
    println!(
        "local server (dev mode, in this process{}): tcp {} admin {} store {}, heartbeat {} s, idle timeout {} s \
         (log: {})",
        match ready.gateway_pids.len() {
            0 => String::new(),
            n => format!(", and {n} gateway processes"),
        },
        tcp,
        ready.admin,
        ready.store,
        heartbeat_s,
        heartbeat_s.saturating_mul(missed),
        out.join("server.log").display()
    );
    // The server runs in this process; the bench's own threads only read
    // pipes and poll once a second, so the process's CPU time is the server's.
    let pids = std::iter::once(std::process::id()).chain(ready.gateway_pids.iter().copied()).collect();
    let target = ServerTarget { tcp, gateways: vec![tcp], admin: ready.admin, admin_key: None, pids };
    let mut server = Some(server);
    let mut finish = || {
        let mut checks = Vec::new();
        if let Some(server) = server.take() {
            let stopped = runtime.block_on(server.shutdown());
            checks.push(Check::new(
                "server shut down cleanly",
                stopped.is_ok(),
                stopped.err().map(|e| e.to_string()).unwrap_or_else(|| "every queued commit written".to_owned()),
            ));
        }
        checks.push(audit_check(&store.clone().unwrap_or_else(|| StoreLocation::Sqlite(ready.data.clone()))));
        checks
    };
    let summary = bench::run(plan, &target, launcher, out, &mut finish);
    if let Some(server) = server {
        let _ = runtime.block_on(server.shutdown());
    }
    drop(temp);
    Ok(summary?)
}

fn audit_check(store: &StoreLocation) -> Check {
    match hongbao_store::audit(store) {
        Ok(report) => {
            let t = &report.totals;
            let detail = if report.passed() {
                format!(
                    "PASS on {}: {} entries, {} packets, {} claims, {} shake wins; money is conserved",
                    store.describe(),
                    t.entries,
                    t.packets,
                    t.claims,
                    t.shake_wins
                )
            } else {
                let first: Vec<String> = report.violations.iter().take(3).map(|v| v.to_string()).collect();
                format!("{} violation(s): {}", report.violations.len(), first.join("; "))
            };
            Check::new("hongbao audit passes", report.passed(), detail)
        }
        Err(e) => Check::new("hongbao audit passes", false, format!("cannot audit {}: {e}", store.describe())),
    }
}

fn cluster_audit_check(file: &hongbao_cluster::ClusterFile) -> Check {
    let name = "hongbao audit --cluster passes";
    match crate::audit::cluster_report(file) {
        Ok((report, _)) if report.passed() => {
            let t = &report.totals;
            let detail = format!(
                "PASS on {} SETs: every SET reconciles, every cross-SET credit matched once; {} fen in flight",
                t.sets, t.in_flight_fen
            );
            Check::new(name, true, detail)
        }
        Ok((report, readings)) => {
            let first: Vec<&str> = report.violations.iter().take(3).map(String::as_str).collect();
            let detail =
                format!("{} violation(s) (read {readings} times): {}", report.violations.len(), first.join("; "));
            Check::new(name, false, detail)
        }
        Err(e) => Check::new(name, false, format!("cannot audit {}: {e}", file.path.display())),
    }
}

/// The server's log goes to a file, so the live view stays readable.
fn init_logging(file: Option<&Path>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match file.and_then(|f| std::fs::File::create(f).ok()) {
        Some(f) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        None => tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init(),
    }
}
