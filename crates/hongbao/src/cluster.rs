//! The cluster's processes: `hongbao set` (one SET: an engine with its own
//! store and admin API, taking gateway links over TCP, no clients),
//! `hongbao gateway` (client connections only, routed to the SETs by
//! `hongbao_cluster::ClusterBackend`), `hongbao cluster-admin` (one operator
//! API over every SET's admin API, `hongbao_admin::cluster`), and `hongbao
//! keys` (the cluster's shared secrets, made once before the first start).
//!
//! Every process reads the same `cluster.toml` (`hongbao_cluster::config`).
//! The secrets are made by `hongbao keys` and only read by the others: two
//! processes starting at once must not each invent a different key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use hongbao_boundary::TokenSigner;
use hongbao_cluster::config::{ADMIN_KEY_FILE, LINK_KEY_FILE, TOKEN_SECRET_FILE};
use hongbao_cluster::directory::{self, Refresh};
use hongbao_cluster::{ClusterBackend, ClusterFile, Directory, GatewayEntry};
use hongbao_link::{LinkSupervisor, LinkTarget};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{ServeArgs, SetRole, Settings};
use crate::keys;
use crate::serve::{self, Signal};

/// How long a gateway waits at start for every SET's link before it opens
/// its listeners anyway (a SET that is down is answered `unavailable`).
const LINKS_AT_START: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct ClusterArg {
    /// The cluster file every process of the cluster reads.
    #[arg(long, env = "HONGBAO_CLUSTER", value_name = "FILE")]
    pub cluster: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    #[command(flatten)]
    cluster: ClusterArg,
    /// Which SET this process is (its place in the file, from 0).
    #[arg(long, value_name = "N")]
    set: u8,
    /// Scratch directory (for a PostgreSQL store; a SQLite store's data
    /// directory is the store). Default: `<cluster file dir>/data/set<N>`.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A `serve` config file for the engine's tuning (packet rules, alerts).
    #[arg(long, env = "HONGBAO_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ClusterAdminArgs {
    #[command(flatten)]
    cluster: ClusterArg,
    /// Where the cluster admin API listens. Default: the file's `admin`,
    /// else 127.0.0.1:7080.
    #[arg(long, value_name = "ADDR")]
    addr: Option<SocketAddr>,
}

/// Where the cluster admin listens when neither the flag nor the file says.
const CLUSTER_ADMIN_DEFAULT: &str = "127.0.0.1:7080";

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    cluster: ClusterArg,
    /// Raw TCP client listener (port 0: any free port).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7000")]
    tcp: SocketAddr,
    /// WebSocket client listener.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7001")]
    ws: SocketAddr,
    /// A `serve` config file for the connection settings (heartbeat,
    /// timeouts, connection caps).
    #[arg(long, env = "HONGBAO_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Connections held at once.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// The raw TCP address clients should dial (`host:port`), as the
    /// gateway directory lists it; also the gateway's id there. Default:
    /// the bound `--tcp` address, which must then be a specific one (not
    /// 0.0.0.0) when the cluster file has `redis`.
    #[arg(long, value_name = "ADDR")]
    advertise_tcp: Option<String>,
    /// The WebSocket address clients should dial. Default: the bound
    /// `--ws` address (same rule).
    #[arg(long, value_name = "ADDR")]
    advertise_ws: Option<String>,
}

/// What a gateway tells the directory clients should dial: the flag, else
/// the bound address (`bound`: the real port once listening). `None` with
/// no flag and an unspecified listen address.
fn advertised(flag: Option<&str>, bound: SocketAddr) -> Option<String> {
    match flag {
        Some(addr) => Some(addr.to_owned()),
        None if bound.ip().is_unspecified() => None,
        None => Some(bound.to_string()),
    }
}

/// Refuses, before anything starts, an advertised address that is not
/// `host:port`, or none where the directory needs one.
fn check_advertised(args: &GatewayArgs, redis: bool) -> anyhow::Result<()> {
    for (flag, value, listen) in
        [("--advertise-tcp", &args.advertise_tcp, args.tcp), ("--advertise-ws", &args.advertise_ws, args.ws)]
    {
        match value {
            Some(addr) => {
                let port = addr.rsplit_once(':').map(|(host, port)| (host, port.parse::<u16>()));
                if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                    anyhow::bail!("{flag} {addr:?} is not host:port");
                }
            }
            None if redis && listen.ip().is_unspecified() => anyhow::bail!(
                "the cluster file has `redis` (the gateway directory), and the listen address {listen} \
                 is not one clients can dial: give {flag} host:port"
            ),
            None => {}
        }
    }
    Ok(())
}

fn load(arg: &ClusterArg) -> anyhow::Result<ClusterFile> {
    Ok(ClusterFile::load(&arg.cluster)?)
}

fn secret(file: &ClusterFile, name: &str) -> anyhow::Result<String> {
    let path = file.secret_path(name);
    keys::load(&path).with_context(|| format!("run `hongbao keys --cluster {}` once first", file.path.display()))
}

/// `hongbao keys`: makes the secrets the file's processes share, if missing.
pub fn make_keys(arg: ClusterArg) -> anyhow::Result<()> {
    let file = load(&arg)?;
    std::fs::create_dir_all(&file.secrets).with_context(|| format!("cannot create {}", file.secrets.display()))?;
    for name in [LINK_KEY_FILE, TOKEN_SECRET_FILE, ADMIN_KEY_FILE] {
        let path = file.secret_path(name);
        let (_, created) = keys::load_or_create(&path)?;
        println!("{} {}", if created { "created" } else { "kept" }, path.display());
    }
    Ok(())
}

/// `hongbao set`: one SET, until SIGINT or SIGTERM.
pub fn run_set(args: SetArgs) -> anyhow::Result<()> {
    let file = load(&args.cluster)?;
    let (entry, map) = file.set(args.set)?;
    let postgres = entry.store.starts_with("postgres");
    let data = match (&args.data, postgres) {
        (Some(dir), _) => dir.clone(),
        (None, false) => PathBuf::from(&entry.store),
        (None, true) => file.path.parent().unwrap_or(std::path::Path::new(".")).join(format!("data/set{}", args.set)),
    };
    let serve_args = ServeArgs {
        data: Some(data),
        store: postgres.then(|| entry.store.clone()),
        dev: Some(file.dev),
        admin: Some(entry.admin),
        shards: Some(entry.shards),
        config: args.config,
        secret: Some(secret(&file, TOKEN_SECRET_FILE)?),
        admin_key: if file.dev { None } else { Some(secret(&file, ADMIN_KEY_FILE)?) },
        gateways: Some(1),
        ..ServeArgs::default()
    };
    let mut settings = Settings::resolve(serve_args)?;
    settings.set_role = Some(SetRole {
        map,
        link_bind: entry.link_bind,
        link_key: secret(&file, LINK_KEY_FILE)?,
        nats: file.nats.clone(),
    });
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(serve::run(settings)).context("the SET failed")
}

/// What a started gateway announces (`HONGBAO_READY {json}` on stdout).
#[derive(Debug, Serialize)]
struct GatewayReady {
    role: &'static str,
    tcp: SocketAddr,
    ws: SocketAddr,
    pid: u32,
    /// SETs linked when the listeners opened (the others are dialled on).
    sets_linked: usize,
    sets: usize,
}

/// `hongbao gateway`: client connections routed to the SETs, until SIGINT
/// or SIGTERM. A SET that is down is dialled again and again; a gateway
/// never stops because of one.
pub fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let file = load(&args.cluster)?;
    check_advertised(&args, file.redis.is_some())?;
    let started_ms = directory::now_ms();
    let serve_args = ServeArgs {
        tcp: Some(args.tcp),
        ws: Some(args.ws),
        dev: Some(file.dev),
        config: args.config,
        max_connections: args.max_connections,
        secret: Some(secret(&file, TOKEN_SECRET_FILE)?),
        ..ServeArgs::default()
    };
    let settings = Settings::resolve(serve_args)?;
    let link_key = secret(&file, LINK_KEY_FILE)?;
    let secret = secret(&file, TOKEN_SECRET_FILE)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async move {
        let signal = Signal::new().context("cannot listen for signals")?;
        let mut engines = Vec::with_capacity(file.sets.len());
        let mut links: Vec<LinkSupervisor> = Vec::with_capacity(file.sets.len());
        for entry in &file.sets {
            let name = format!("SET {} at {}", entry.set, entry.link);
            let (engine, link) =
                hongbao_link::connect_resilient(LinkTarget::Tcp(entry.link.clone()), link_key.clone(), name);
            engines.push(engine);
            links.push(link);
        }
        let deadline = tokio::time::Instant::now() + LINKS_AT_START;
        let mut sets_linked = 0;
        for link in &mut links {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            sets_linked += usize::from(link.wait_up(left).await);
        }
        if sets_linked < links.len() {
            tracing::warn!(sets_linked, sets = links.len(), "opening the listeners with SETs unlinked");
        }
        let config = serve::gateway_config(&settings, TokenSigner::new(secret.into_bytes()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let gateway = hongbao_gateway::start(config, ClusterBackend::new(engines), stop_rx).await?;
        let ready = GatewayReady {
            role: "gateway",
            tcp: gateway.tcp_addr(),
            ws: gateway.ws_addr(),
            pid: std::process::id(),
            sets_linked,
            sets: links.len(),
        };
        let registration = match &file.redis {
            Some(url) => {
                let (tcp, ws) = match (
                    advertised(args.advertise_tcp.as_deref(), ready.tcp),
                    advertised(args.advertise_ws.as_deref(), ready.ws),
                ) {
                    (Some(tcp), Some(ws)) => (tcp, ws),
                    _ => anyhow::bail!("no advertised address (checked at start)"),
                };
                let directory = Directory::new(url)?;
                let open = gateway.open_connections();
                let pid = ready.pid;
                let entry = move || GatewayEntry {
                    id: tcp.clone(),
                    tcp: tcp.clone(),
                    ws: ws.clone(),
                    pid,
                    connections: open.get() as u64,
                    started_ms,
                };
                let (stop, rx) = watch::channel(false);
                tracing::info!(id = %entry().id, redis = %url, "registering in the gateway directory");
                let task = tokio::spawn(directory::keep_registered(directory, Refresh::default(), entry, rx));
                Some((stop, task))
            }
            None => None,
        };
        println!("HONGBAO_READY {}", serde_json::to_string(&ready)?);
        tracing::info!(tcp = %ready.tcp, ws = %ready.ws, sets_linked, "gateway ready");
        let name = signal.recv().await;
        tracing::info!(signal = name, "gateway shutting down");
        // Out of the directory first, so clients stop being sent here.
        if let Some((stop, task)) = registration {
            let _ = stop.send(true);
            if tokio::time::timeout(directory::OPERATION_TIMEOUT * 2, task).await.is_err() {
                tracing::warn!("the directory entry was not removed in time; it expires with its TTL");
            }
        }
        let _ = stop_tx.send(true);
        if tokio::time::timeout(STOP_TIMEOUT, gateway.wait()).await.is_err() {
            tracing::warn!("connections did not close in time");
        }
        for link in links {
            link.close().await;
        }
        tracing::info!("bye");
        anyhow::Ok(())
    })
}

/// What a started cluster admin announces (`HONGBAO_READY {json}` on stdout).
#[derive(Debug, Serialize)]
struct ClusterAdminReady {
    role: &'static str,
    admin: SocketAddr,
}

/// `hongbao cluster-admin`: the operator API over every SET, until SIGINT or
/// SIGTERM. It holds no data: a SET that is down is named in the answers
/// that need it, and the others are served.
pub fn run_cluster_admin(args: ClusterAdminArgs) -> anyhow::Result<()> {
    let file = load(&args.cluster)?;
    let addr = match (args.addr, file.admin) {
        (Some(addr), _) | (None, Some(addr)) => addr,
        (None, None) => CLUSTER_ADMIN_DEFAULT.parse().context("the default address")?,
    };
    let api_key = if file.dev { None } else { Some(secret(&file, ADMIN_KEY_FILE)?) };
    let sets = file.sets.iter().map(|entry| entry.admin).collect();
    let mut config = hongbao_admin::cluster::ClusterAdminConfig::new(addr, api_key, file.dev, sets);
    config.redis = file.redis.clone();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async move {
        // Counters only (requests by route, failed SET calls): no
        // histograms, so the recorder needs no upkeep.
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = prometheus.handle();
        metrics::set_global_recorder(prometheus).map_err(|e| anyhow::anyhow!("cannot install metrics: {e}"))?;
        let signal = Signal::new().context("cannot listen for signals")?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (admin, task) = hongbao_admin::cluster::start(config, Some(handle), stop_rx).await?;
        let ready = ClusterAdminReady { role: "cluster-admin", admin };
        println!("HONGBAO_READY {}", serde_json::to_string(&ready)?);
        tracing::info!(%admin, sets = file.sets.len(), "cluster admin ready");
        let name = signal.recv().await;
        tracing::info!(signal = name, "cluster admin shutting down");
        let _ = stop_tx.send(true);
        if tokio::time::timeout(STOP_TIMEOUT, task).await.is_err() {
            tracing::warn!("admin connections did not close in time");
        }
        tracing::info!("bye");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(tcp: &str, advertise_tcp: Option<&str>, advertise_ws: Option<&str>) -> GatewayArgs {
        GatewayArgs {
            cluster: ClusterArg { cluster: PathBuf::from("cluster.toml") },
            tcp: tcp.parse().unwrap(),
            ws: "127.0.0.1:7001".parse().unwrap(),
            config: None,
            max_connections: None,
            advertise_tcp: advertise_tcp.map(str::to_owned),
            advertise_ws: advertise_ws.map(str::to_owned),
        }
    }

    #[test]
    fn an_unspecified_listen_address_needs_an_advertised_one_only_with_a_directory() {
        let err = check_advertised(&args("0.0.0.0:7000", None, None), true).unwrap_err().to_string();
        assert!(err.contains("give --advertise-tcp"), "{err}");
        assert!(check_advertised(&args("0.0.0.0:7000", None, None), false).is_ok());
        assert!(check_advertised(&args("0.0.0.0:7000", Some("gw1.example.com:7000"), None), true).is_ok());
        assert!(check_advertised(&args("127.0.0.1:7000", None, None), true).is_ok());
        for wrong in ["gw1", ":7000", "gw1:0", "gw1:x"] {
            let err = check_advertised(&args("127.0.0.1:7000", Some(wrong), None), true).unwrap_err().to_string();
            assert!(err.contains("is not host:port"), "{wrong}: {err}");
        }
        let bound = "127.0.0.1:41000".parse().unwrap();
        assert_eq!(advertised(None, bound).as_deref(), Some("127.0.0.1:41000"));
        assert_eq!(advertised(Some("gw:1"), bound).as_deref(), Some("gw:1"));
        assert_eq!(advertised(None, "0.0.0.0:7000".parse().unwrap()), None);
    }
}
