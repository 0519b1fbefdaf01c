//! `hongbao serve`: opens the engine, starts the gateway and the admin API,
//! announces the bound addresses, and shuts down in phases.
//!
//! Start-up order matters: the engine opens first because it locks the data
//! directory, so a second server pointed at the same directory fails before
//! it touches the key files or a port. Shutdown runs the other way round:
//! stop taking connections and requests (gateway, admin), then let the engine
//! commit what is queued, so no acknowledged operation is cut off.
//!
//! `start` and `Server::shutdown` are usable in-process (tests, `demo` and
//! `bench`); `run` adds what only the real process does: the global metrics
//! recorder (`install_metrics`), signals, and the `HONGBAO_READY` line.
//!
//! `start` also starts the live sampler (`hongbao-watch`): one snapshot of
//! the work a second, judged by the alert detector, served by the admin API
//! (`/v1/live`, `/v1/alerts`). It stops with the admin API.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hongbao_admin::{AdminConfig, AdminError, AdminLimits};
use hongbao_boundary::{EngineError, TokenSigner};
use hongbao_gateway::{Gateway, GatewayConfig, GatewayError};
use hongbao_shard::{Engine, EngineConfig, StoreLocation};
use hongbao_watch::{GatewayConnections, GatewaysProvider, Live, SamplerConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{SetRole, Settings};
use crate::gateways::Workers;
use crate::keys::{self, KeyError};

/// How long the gateway and the admin API each get to finish in-flight work
/// after the shutdown signal. Past it the engine is shut down anyway: a stuck
/// peer must not keep queued commits from reaching the disk.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
// The admin API bounds its own drain, so its task ends before we give up on it.
const _: () = assert!(hongbao_admin::limits::SHUTDOWN_GRACE_MS < STOP_TIMEOUT.as_millis() as u64);
/// How often the Prometheus recorder drains histograms. The exporter leaves
/// this to the caller; without it histogram memory grows unbounded.
/// A drain costs in proportion to the samples since the last one (one per
/// request answered), so it runs often and on a thread of its own
/// (`MetricsUpkeep`).
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    DataDir(#[from] hongbao_store::StoreError),
    #[error("key file: {0}")]
    Keys(#[from] KeyError),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("gateway: {0}")]
    Gateway(#[from] GatewayError),
    #[error("admin API: {0}")]
    Admin(#[from] AdminError),
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
    #[error("{0}")]
    Alerts(#[from] hongbao_watch::AlertConfigError),
    #[error("cannot start the metrics upkeep thread: {0}")]
    MetricsThread(std::io::Error),
    #[error("cannot listen for signals: {0}")]
    Signal(std::io::Error),
    #[error("a server task failed: {0}")]
    Task(String),
    #[error("gateway link: {0}")]
    Link(#[from] hongbao_link::LinkError),
    #[error("gateway processes: {0}")]
    Workers(#[from] crate::gateways::WorkersError),
    #[error("cross-SET relay: {0}")]
    Relay(String),
}

/// What a started server announces; printed as the `HONGBAO_READY` line.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Ready {
    /// The client listeners; none on a SET of a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws: Option<SocketAddr>,
    /// A SET of a cluster: its number and where it takes gateway links.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub data: PathBuf,
    /// The store of record: the data directory (SQLite), or the PostgreSQL
    /// URL without its password.
    pub store: String,
    pub dev: bool,
    /// The gateway processes besides this one (`--gateways N`: N-1).
    pub gateway_pids: Vec<u32>,
}

/// A running server.
pub struct Server {
    ready: Ready,
    engine: Engine,
    /// This process's gateway; none on a SET, whose gateways link in.
    gateway: Option<Gateway>,
    /// A SET's TCP link listener.
    links: Option<hongbao_link::LinkServer>,
    /// A SET's road to the other SETs (NATS JetStream).
    relay: Option<hongbao_relay::Relay>,
    /// The other gateway processes, if any.
    workers: Option<Workers>,
    admin: JoinHandle<()>,
    /// The live sampler; ends on the shutdown signal.
    sampler: JoinHandle<()>,
    /// `true` tells the gateways, the admin API and the sampler to stop.
    shutdown: watch::Sender<bool>,
    /// Stops with the server (dropped last).
    _metrics_upkeep: MetricsUpkeep,
}

/// Drains the recorder's histograms into their summaries every
/// `METRICS_UPKEEP_INTERVAL`, on a thread of its own. A drain takes time in
/// proportion to the requests answered since the last one; as a task it
/// held the runtime's worker for all of it, and every connection on that
/// worker waited it out (at 600,000 shakes a second and a drain every 5 s:
/// a ping's p99 of 38 ms, where it was a few ms between drains).
struct MetricsUpkeep {
    /// Dropped to stop the thread.
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsUpkeep {
    fn start(prometheus: PrometheusHandle) -> Result<MetricsUpkeep, ServeError> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hongbao-metrics".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(METRICS_UPKEEP_INTERVAL)
                {
                    prometheus.run_upkeep();
                }
            })
            .map_err(ServeError::MetricsThread)?;
        Ok(MetricsUpkeep { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for MetricsUpkeep {
    fn drop(&mut self) {
        drop(self.stop.take());
        // At most one drain's time: the thread sees the channel closed next.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The two recorders every metric goes to: Prometheus's (rendered at
/// `/metrics`) and the watch crate's (read by the live sampler).
#[derive(Clone)]
pub struct Recorders {
    pub prometheus: PrometheusHandle,
    pub watch: std::sync::Arc<hongbao_watch::Registry>,
}

/// Installs the process's metrics recorder: Prometheus's and ours, fanned
/// out (every handle records into both). Once per process.
pub fn install_metrics() -> Result<Recorders, ServeError> {
    let prometheus = PrometheusBuilder::new().build_recorder();
    let handle = prometheus.handle();
    let watch = hongbao_watch::WatchRecorder::new();
    let registry = watch.registry();
    metrics::set_global_recorder(hongbao_watch::fanout(watch, prometheus))
        .map_err(|e| ServeError::Metrics(e.to_string()))?;
    hongbao_watch::preregister();
    Ok(Recorders { prometheus: handle, watch: registry })
}

/// The other gateway processes' connections (`Workers::census`) and their
/// pids in the order they were started, which names them `gateway-1`, ….
type WorkerCensus = (hongbao_link::LinkCensus, Vec<u32>);

/// The live view's entries for the other gateway processes. A child whose
/// link is down (it died) shows no entry.
fn worker_connections((census, pids): &WorkerCensus) -> Vec<GatewayConnections> {
    census
        .read()
        .into_iter()
        .map(|(pid, connections)| {
            let name = match pids.iter().position(|p| *p == pid) {
                Some(i) => format!("gateway-{}", i + 1),
                None => format!("gateway-pid-{pid}"),
            };
            GatewayConnections { name, pid, connections }
        })
        .collect()
}

/// Opens the engine in `settings.data` and starts the gateway, the admin
/// API and the live sampler. On failure everything already started is
/// stopped again.
pub async fn start(settings: Settings, recorders: Recorders) -> Result<Server, ServeError> {
    let data = &settings.data;
    hongbao_store::prepare_data_dir(data)?;
    let data = std::fs::canonicalize(data).unwrap_or_else(|_| data.clone());
    // The wall clock and a fresh seed (logged at start-up).
    let engine_config = EngineConfig {
        shards: settings.shards,
        packet_rules: settings.packet_rules.clone(),
        set: settings.set_role.as_ref().map_or_else(hongbao_core::sets::SetMap::single, |role| role.map),
        ..EngineConfig::default()
    };
    let store = match &settings.store {
        StoreLocation::Sqlite(_) => StoreLocation::Sqlite(data.clone()),
        postgres => postgres.clone(),
    };
    tracing::info!(store = %store.describe(), "opening the store");
    let engine = Engine::open_at(engine_config, &store).await?;
    // The other gateway processes start after the sampler; it finds their
    // census here once they have.
    let census = Arc::new(OnceLock::new());
    let relay_status = Arc::new(OnceLock::new());
    let front = start_front(&settings, &data, engine.clone(), recorders, census.clone(), relay_status.clone()).await;
    let (mut server, gateway_config, secret) = match front {
        Ok(started) => started,
        Err(e) => {
            engine.shutdown().await;
            return Err(e);
        }
    };
    if let Some(SetRole { map, nats: Some(nats_url), .. }) = &settings.set_role {
        let config = hongbao_relay::RelayConfig { nats_url: nats_url.clone(), set: *map, replicas: 1 };
        match hongbao_relay::start(config, server.engine.clone(), server.shutdown.subscribe()).await {
            Ok(relay) => {
                let _ = relay_status.set(relay.status.clone());
                server.relay = Some(relay);
            }
            Err(e) => {
                let _ = server.shutdown().await;
                return Err(ServeError::Relay(e.to_string()));
            }
        }
    }
    let extra = usize::from(settings.gateways) - 1;
    if extra > 0 {
        let stop = server.shutdown.subscribe();
        match Workers::start(extra, &data, &gateway_config, &secret, engine, stop).await {
            Ok(workers) => {
                server.ready.gateway_pids = workers.pids();
                let _ = census.set((workers.census(), workers.pids()));
                server.workers = Some(workers);
            }
            Err(e) => {
                let _ = server.shutdown().await;
                return Err(e.into());
            }
        }
    }
    Ok(server)
}

/// The gateway's settings from the server's.
pub fn gateway_config(settings: &Settings, signer: TokenSigner) -> GatewayConfig {
    GatewayConfig {
        tcp_addr: settings.tcp,
        ws_addr: settings.ws,
        dev: settings.dev,
        signer,
        heartbeat_s: settings.heartbeat_s,
        idle_timeout_s: settings.idle_timeout_s,
        hello_timeout_s: settings.hello_timeout_s,
        max_connections: settings.max_connections,
        max_pending_hello: settings.max_pending_hello,
        max_pending_hello_per_ip: settings.max_pending_hello_per_ip,
        reuse_port: settings.gateways > 1,
        park_after_s: settings.park_after_s,
    }
}

/// Everything after the engine but the other gateway processes: keys, this
/// process's gateway, admin API. Also returns the gateway's config (with the
/// bound ports) and the token secret, which the other gateways need.
async fn start_front(
    settings: &Settings,
    data: &std::path::Path,
    engine: Engine,
    recorders: Recorders,
    census: Arc<OnceLock<WorkerCensus>>,
    relay: Arc<OnceLock<Arc<hongbao_relay::RelayStatus>>>,
) -> Result<(Server, GatewayConfig, String), ServeError> {
    settings.alerts.validate()?;
    let Recorders { prometheus, watch: registry } = recorders;
    // First, so that a failure here leaves nothing else to stop.
    let metrics_upkeep = MetricsUpkeep::start(prometheus.clone())?;
    let secret = match &settings.secret {
        Some(s) => s.clone(),
        None => {
            let path = data.join(keys::SECRET_FILE);
            let (key, created) = keys::load_or_create(&path)?;
            if created {
                tracing::info!(path = %path.display(), "generated a token signing secret; give it to the app server that issues tokens");
            }
            key
        }
    };
    // Dev mode leaves the admin API open unless a key was given explicitly.
    let admin_key = match (&settings.admin_key, settings.dev) {
        (Some(k), _) => Some(k.clone()),
        (None, true) => None,
        (None, false) => {
            let path = data.join(keys::ADMIN_KEY_FILE);
            let (key, created) = keys::load_or_create(&path)?;
            if created {
                tracing::info!(path = %path.display(), "generated an admin API key");
            }
            Some(key)
        }
    };
    let signer = TokenSigner::new(secret.clone().into_bytes());
    let (shutdown, stop_rx) = watch::channel(false);

    let gateway_config = gateway_config(settings, signer.clone());
    // A SET takes its gateways' links instead of clients.
    let (gateway, links) = match &settings.set_role {
        None => (Some(hongbao_gateway::start(gateway_config.clone(), engine.clone(), stop_rx.clone()).await?), None),
        Some(role) => {
            let listener =
                hongbao_link::LinkListener::bind_tcp(role.link_bind, role.link_key.clone(), engine.clone()).await?;
            let link_addr = listener.tcp_addr();
            let links = listener.start(stop_rx.clone());
            let _ = census.set((links.census(), Vec::new()));
            (None, Some((links, link_addr)))
        }
    };
    let gateway_config = match &gateway {
        Some(g) => GatewayConfig { tcp_addr: g.tcp_addr(), ws_addr: g.ws_addr(), ..gateway_config },
        None => gateway_config,
    };

    let limits = AdminLimits { connections_max: settings.admin_connections_max, ..AdminLimits::default() };
    let admin_config = AdminConfig {
        addr: settings.admin,
        api_key: admin_key,
        dev: settings.dev,
        limits,
        // The bound address (port 0 resolved), for the user page.
        ws_addr: gateway.as_ref().map(Gateway::ws_addr),
        // A SET's relay starts after this; `/health` finds it here.
        dependency: settings.set_role.as_ref().and_then(|role| role.nats.as_ref()).map(|_| {
            let relay = relay.clone();
            hongbao_admin::DependencyProbe(Arc::new(move || relay.get().and_then(|status| status.failure())))
        }),
    };
    let live = Live::new();
    let (admin_addr, admin) = match hongbao_admin::start(
        admin_config,
        engine.clone(),
        signer,
        prometheus.clone(),
        live.clone(),
        stop_rx.clone(),
    )
    .await
    {
        Ok(started) => started,
        Err(e) => {
            let _ = shutdown.send(true);
            if let Some(gateway) = gateway {
                if tokio::time::timeout(STOP_TIMEOUT, gateway.wait()).await.is_err() {
                    tracing::warn!("gateway did not stop in time");
                }
            }
            if let Some((links, _)) = links {
                let _ = tokio::time::timeout(STOP_TIMEOUT, links.wait()).await;
            }
            return Err(e.into());
        }
    };

    let gateways: GatewaysProvider = Arc::new(move || census.get().map(worker_connections).unwrap_or_default());
    let sampler_config =
        SamplerConfig { alerts: settings.alerts.clone(), gateways: Some(gateways), ..SamplerConfig::default() };
    let sampler = hongbao_watch::sampler::spawn(
        registry,
        hongbao_admin::EngineFeed(engine.clone()),
        live,
        sampler_config,
        stop_rx,
    );

    let ready = Ready {
        tcp: gateway.as_ref().map(Gateway::tcp_addr),
        ws: gateway.as_ref().map(Gateway::ws_addr),
        set: settings.set_role.as_ref().map(|role| role.map.set()),
        link: links.as_ref().and_then(|(_, addr)| *addr),
        admin: admin_addr,
        data: data.to_owned(),
        store: match &settings.store {
            StoreLocation::Sqlite(_) => data.display().to_string(),
            postgres => postgres.describe(),
        },
        dev: settings.dev,
        gateway_pids: Vec::new(),
    };
    let links = links.map(|(links, _)| links);
    let server = Server {
        ready,
        engine,
        gateway,
        links,
        relay: None,
        workers: None,
        admin,
        sampler,
        shutdown,
        _metrics_upkeep: metrics_upkeep,
    };
    Ok((server, gateway_config, secret))
}

impl Server {
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// Phase 1: tell the gateway and the admin API to stop and wait for them
    /// (bounded by `STOP_TIMEOUT` each). Phase 2: shut the engine down, which
    /// commits whatever is queued. Phase 2 runs even if phase 1 failed.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let Server { engine, gateway, links, relay, workers, mut admin, sampler, shutdown, .. } = self;
        let _ = shutdown.send(true);
        let mut first_error = None;
        // The other gateways close their connections meanwhile.
        if let Some(gateway) = gateway {
            match tokio::time::timeout(STOP_TIMEOUT, gateway.wait()).await {
                Ok(Ok(())) => tracing::info!("gateway stopped"),
                Ok(Err(e)) => first_error = first_error.or(Some(ServeError::Gateway(e))),
                Err(_) => tracing::warn!(timeout_s = STOP_TIMEOUT.as_secs(), "gateway did not stop in time; going on"),
            }
        }
        // A SET's gateways were told `Shutdown`; their links end as they go.
        if let Some(links) = links {
            if tokio::time::timeout(STOP_TIMEOUT, links.wait()).await.is_err() {
                tracing::warn!("gateway links did not end in time; going on");
            }
        }
        if let Some(workers) = workers {
            // Bounded inside: a child that does not stop is killed.
            workers.wait().await;
        }
        match tokio::time::timeout(STOP_TIMEOUT, &mut admin).await {
            Ok(Ok(())) => tracing::info!("admin API stopped"),
            Ok(Err(join)) => first_error = first_error.or(Some(ServeError::Task(join.to_string()))),
            Err(_) => {
                tracing::warn!(timeout_s = STOP_TIMEOUT.as_secs(), "admin API did not stop in time; going on");
                admin.abort();
            }
        }
        // Its applies in progress finish (they are the engine's commits).
        if let Some(relay) = relay {
            if tokio::time::timeout(STOP_TIMEOUT, relay.wait()).await.is_err() {
                tracing::warn!("cross-SET relay did not stop in time; going on");
            }
        }
        // It ends at its next await on the signal; it holds nothing to finish.
        if tokio::time::timeout(STOP_TIMEOUT, sampler).await.is_err() {
            tracing::warn!("live sampler did not stop in time; going on");
        }
        engine.shutdown().await;
        tracing::info!("engine stopped");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The whole `serve` command: runs until SIGINT or SIGTERM, then shuts down.
pub async fn run(settings: Settings) -> Result<(), ServeError> {
    if settings.dev {
        eprintln!(
            "WARNING: DEV MODE. Unauthenticated bare user ids are accepted as tokens and the admin API \
             is open to anyone who can reach it. Never run dev mode where others can connect."
        );
    }
    let recorders = install_metrics()?;
    // Signal handlers go in before the ready line: a supervisor (or a test)
    // may send SIGTERM the moment it reads it.
    let signal = Signal::new().map_err(ServeError::Signal)?;
    let server = start(settings, recorders).await?;
    announce(server.ready());
    let name = signal.recv().await;
    tracing::info!(signal = name, "shutting down");
    server.shutdown().await?;
    tracing::info!("bye");
    Ok(())
}

/// Prints the one machine-readable line on stdout and a human one in the log.
pub fn announce(ready: &Ready) {
    let json = serde_json::to_string(ready).expect("Ready always serialises");
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "HONGBAO_READY {json}").and_then(|_| out.flush()) {
        // Nobody may be reading stdout (a closed pipe); the log line remains.
        tracing::warn!(error = %e, "cannot write the ready line to stdout");
    }
    tracing::info!(tcp = ?ready.tcp, ws = ?ready.ws, set = ?ready.set, link = ?ready.link, admin = %ready.admin, data = %ready.data.display(), dev = ready.dev, gateways = ready.gateway_pids.len() + 1, "hongbao ready");
}

/// SIGINT or SIGTERM, whichever comes first.
pub struct Signal {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signal {
    pub fn new() -> std::io::Result<Signal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signal { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
        }
        #[cfg(not(unix))]
        Ok(Signal {})
    }

    pub async fn recv(self) -> &'static str {
        #[cfg(unix)]
        {
            let Signal { mut int, mut term } = self;
            tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ServeArgs};

    fn settings(data: &std::path::Path, dev: bool) -> Settings {
        let local = || Some("127.0.0.1:0".parse().unwrap());
        let args = ServeArgs {
            data: Some(data.to_owned()),
            dev: Some(dev),
            tcp: local(),
            ws: local(),
            admin: local(),
            ..ServeArgs::default()
        };
        Settings::merge(args, Config::default()).unwrap()
    }

    /// Both recorders, not installed: the tests run several servers in one
    /// process, and what the server records reaches neither.
    fn prometheus() -> Recorders {
        let prometheus = PrometheusBuilder::new().build_recorder().handle();
        Recorders { prometheus, watch: hongbao_watch::WatchRecorder::new().registry() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_are_created_once_and_the_server_stops_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let server = start(settings(tmp.path(), false), prometheus()).await.unwrap();
        let ready = server.ready().clone();
        assert!(ready.tcp.unwrap().port() != 0 && ready.ws.unwrap().port() != 0 && ready.admin.port() != 0);
        let secret = std::fs::read_to_string(tmp.path().join(keys::SECRET_FILE)).unwrap();
        let admin_key = std::fs::read_to_string(tmp.path().join(keys::ADMIN_KEY_FILE)).unwrap();
        server.shutdown().await.unwrap();

        // A restart reuses both keys; the data directory is free again.
        let server = start(settings(tmp.path(), false), prometheus()).await.unwrap();
        assert_eq!(std::fs::read_to_string(tmp.path().join(keys::SECRET_FILE)).unwrap(), secret);
        assert_eq!(std::fs::read_to_string(tmp.path().join(keys::ADMIN_KEY_FILE)).unwrap(), admin_key);
        server.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dev_mode_makes_no_admin_key_and_a_busy_port_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let server = start(settings(tmp.path(), true), prometheus()).await.unwrap();
        assert!(!tmp.path().join(keys::ADMIN_KEY_FILE).exists());
        let busy = server.ready().admin;
        let other = tempfile::tempdir().unwrap();
        let mut s = settings(other.path(), true);
        s.admin = busy;
        assert!(matches!(start(s, prometheus()).await, Err(ServeError::Admin(AdminError::Bind { .. }))));
        server.shutdown().await.unwrap();
    }
}
