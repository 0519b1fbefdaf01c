//! `serve --gateways N`: the N-1 gateway processes besides the serve
//! process's own gateway, and the hidden `gateway-worker` command each runs.
//!
//! The serve process binds the client ports first (SO_REUSEPORT), opens the
//! link socket `<data>/link.sock`, then starts the children with the real
//! ports, the link socket's path and, through their environment, the token
//! secret and a fresh link key. The server is ready (its `HONGBAO_READY`
//! line printed) only once every child is linked and listening.
//!
//! A child ends when the serve process tells it to (shutdown), when the
//! link is lost (the serve process died: no orphan keeps clients connected
//! to nothing), or on SIGTERM. SIGINT is ignored: a Ctrl-C in a terminal
//! reaches the whole process group, and the children must wait for the
//! serve process's orderly shutdown instead of dropping clients first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use hongbao_boundary::TokenSigner;
use hongbao_gateway::GatewayConfig;
use hongbao_link::{LinkListener, LinkServer};
use hongbao_shard::Engine;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::keys;

/// The link socket's file in the data directory.
pub const LINK_SOCKET_FILE: &str = "link.sock";
/// Environment variables through which a child gets its secrets (not its
/// command line, which every user of the machine can read).
const ENV_LINK_KEY: &str = "HONGBAO_LINK_KEY";
const ENV_TOKEN_SECRET: &str = "HONGBAO_GATEWAY_SECRET";
/// How long the children get to link and listen.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting child is checked for having died.
const CHILD_POLL: Duration = Duration::from_millis(100);
/// How long a child gets to close its connections and exit once told to.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the extra gateway processes could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    #[error("{0}")]
    Start(String),
    #[error("link key: {0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("gateway link: {0}")]
    Link(#[from] hongbao_link::LinkError),
}

/// The running children.
pub struct Workers {
    link: LinkServer,
    children: Vec<Child>,
}

impl Workers {
    /// Starts `count` gateway processes sharing `config`'s (bound) ports.
    /// They stop when `stop` turns `true`; `Workers::wait` then reaps them.
    pub async fn start(
        count: usize,
        data: &Path,
        config: &GatewayConfig,
        secret: &str,
        engine: Engine,
        stop: watch::Receiver<bool>,
    ) -> Result<Workers, WorkersError> {
        let key = keys::random_key()?;
        let listener = LinkListener::bind(&data.join(LINK_SOCKET_FILE), key.clone(), engine)?;
        let exe = std::env::current_exe().map_err(|e| WorkersError::Start(format!("cannot find own binary: {e}")))?;
        let mut command = Command::new(exe);
        command
            .arg("gateway-worker")
            .arg("--link")
            .arg(listener.path().expect("a Unix link listener"))
            .args(["--tcp", &config.tcp_addr.to_string(), "--ws", &config.ws_addr.to_string()])
            .args(["--heartbeat-s", &config.heartbeat_s.to_string()])
            .args(["--idle-timeout-s", &config.idle_timeout_s.to_string()])
            .args(["--hello-timeout-s", &config.hello_timeout_s.to_string()])
            .args(["--park-after-s", &config.park_after_s.to_string()])
            .args(["--max-connections", &config.max_connections.to_string()])
            .args(["--max-pending-hello", &config.max_pending_hello.to_string()])
            .args(["--max-pending-hello-per-ip", &config.max_pending_hello_per_ip.to_string()])
            .env(ENV_LINK_KEY, &key)
            .env(ENV_TOKEN_SECRET, secret)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // A child left behind by an error path is killed, not orphaned.
            .kill_on_drop(true);
        if config.dev {
            command.arg("--dev");
        }
        let mut link = listener.start(stop);
        let mut children = Vec::with_capacity(count);
        for _ in 0..count {
            children.push(command.spawn().map_err(|e| WorkersError::Start(format!("cannot start a gateway: {e}")))?);
        }
        let mut listening = 0;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while listening < count {
            if tokio::time::Instant::now() >= deadline {
                return Err(WorkersError::Start(format!(
                    "{listening} of {count} gateway processes listening after {READY_TIMEOUT:?}"
                )));
            }
            if let Some(pid) = link.next_listening(CHILD_POLL).await? {
                tracing::info!(gateway_pid = pid, "gateway process listening");
                listening += 1;
                continue;
            }
            for child in &mut children {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(WorkersError::Start(format!("a gateway process exited while starting: {status}")));
                }
            }
        }
        Ok(Workers { link, children })
    }

    /// The connections each child holds now, by its pid.
    pub fn census(&self) -> hongbao_link::LinkCensus {
        self.link.census()
    }

    /// The children's process ids, in the order they were started.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    /// After the shutdown signal: waits for every child to close its
    /// connections and exit (killing one that takes longer than
    /// `STOP_TIMEOUT`), then for the links to end.
    pub async fn wait(self) {
        let Workers { link, children } = self;
        let stops = children.into_iter().map(|mut child| async move {
            let pid = child.id();
            match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
                Ok(Ok(status)) if status.success() => tracing::info!(gateway_pid = pid, "gateway process stopped"),
                Ok(Ok(status)) => tracing::warn!(gateway_pid = pid, %status, "gateway process ended badly"),
                Ok(Err(e)) => tracing::warn!(gateway_pid = pid, error = %e, "cannot wait for a gateway process"),
                Err(_) => {
                    tracing::warn!(gateway_pid = pid, "gateway process did not stop in time; killing it");
                    let _ = child.kill().await;
                }
            }
        });
        futures_util::future::join_all(stops).await;
        if tokio::time::timeout(STOP_TIMEOUT, link.wait()).await.is_err() {
            tracing::warn!("gateway links did not end in time");
        }
    }
}

/// `hongbao gateway-worker`: one extra gateway process (started by `serve`).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The serve process's link socket.
    #[arg(long)]
    link: PathBuf,
    /// Client ports, already bound by the serve process (SO_REUSEPORT).
    #[arg(long)]
    tcp: SocketAddr,
    #[arg(long)]
    ws: SocketAddr,
    #[arg(long)]
    dev: bool,
    #[arg(long)]
    heartbeat_s: u32,
    #[arg(long)]
    idle_timeout_s: u32,
    #[arg(long)]
    hello_timeout_s: u32,
    #[arg(long)]
    park_after_s: u32,
    #[arg(long)]
    max_connections: usize,
    #[arg(long)]
    max_pending_hello: usize,
    #[arg(long)]
    max_pending_hello_per_ip: usize,
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let key = std::env::var(ENV_LINK_KEY).with_context(|| format!("{ENV_LINK_KEY} is not set"))?;
    let secret = std::env::var(ENV_TOKEN_SECRET).with_context(|| format!("{ENV_TOKEN_SECRET} is not set"))?;
    // One thread: a gateway relays; several of them share the cores
    // without a second scheduler thread each contending for them.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        // Registered only to be ignored (see the module doc).
        let _int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let (engine, mut link) =
            hongbao_link::gateway_side::connect(&hongbao_link::LinkTarget::Unix(args.link.clone()), &key)
                .await
                .context("cannot link to the serve process")?;
        let config = GatewayConfig {
            tcp_addr: args.tcp,
            ws_addr: args.ws,
            dev: args.dev,
            signer: TokenSigner::new(secret.into_bytes()),
            heartbeat_s: args.heartbeat_s,
            idle_timeout_s: args.idle_timeout_s,
            hello_timeout_s: args.hello_timeout_s,
            max_connections: args.max_connections,
            max_pending_hello: args.max_pending_hello,
            max_pending_hello_per_ip: args.max_pending_hello_per_ip,
            reuse_port: true,
            park_after_s: args.park_after_s,
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let gateway = hongbao_gateway::start(config, engine.clone(), stop_rx).await?;
        engine.listening();
        tokio::select! {
            _ = link.ended() => {}
            _ = term.recv() => tracing::info!("SIGTERM"),
        }
        let _ = stop_tx.send(true);
        if tokio::time::timeout(STOP_TIMEOUT, gateway.wait()).await.is_err() {
            tracing::warn!("connections did not close in time");
        }
        // Sends the disconnects of the closed connections, then EOF.
        let _ = tokio::time::timeout(STOP_TIMEOUT, link.close()).await;
        Ok(())
    })
}
