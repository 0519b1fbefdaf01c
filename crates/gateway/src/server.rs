//! Listeners, admission and shutdown.
//!
//! Each listener has one accept loop. A connection is admitted with a permit
//! from a semaphore of `max_connections`, and a place among the connections
//! that have not said `hello` yet (`max_pending_hello` in all,
//! `max_pending_hello_per_ip` from one address), held until `hello`
//! succeeds; over any cap it is told `Close { overload }` and dropped, and
//! counted in `hongbao_connections_rejected_total{reason}`. A stranger
//! therefore never holds more than its share: connections that cannot
//! authenticate cannot take the slots of clients that can, and one address
//! cycling connections cannot take every stranger's. Each admitted connection is one task
//! (`conn`), which holds its permit and the shared state for its whole
//! life: when the last reference to that state is gone, every connection has finished, which is
//! how `Gateway::wait` knows shutdown is complete (as in mini-redis).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hongbao_boundary::Backend;
use hongbao_proto::{binary, ErrorCode, ServerFrame};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::io::Transport;
use crate::limits::{LISTEN_BACKLOG, REJECT_TIMEOUT_S};
use crate::park::Parking;
use crate::shared::{Admission, Shared};
use crate::{conn, ws, GatewayConfig, GatewayError};
use hongbao_boundary::listen::{is_connection_error, AcceptBackoff, LogLimiter};

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    tcp_addr: SocketAddr,
    ws_addr: SocketAddr,
    accept_loops: Vec<JoinHandle<()>>,
    /// Yields `None` once every connection task has ended.
    done_rx: mpsc::Receiver<()>,
    open: OpenConnections,
}

/// How many connections a gateway holds now (admitted, `hello` or not):
/// cheap to clone and to read, for reports such as the cluster's gateway
/// directory. Outlives the `Gateway` it came from.
#[derive(Clone, Debug)]
pub struct OpenConnections {
    permits: Arc<Semaphore>,
    max: usize,
}

impl OpenConnections {
    /// Connections open at this moment.
    pub fn get(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }
}

impl Gateway {
    /// The bound raw TCP address (the real port when 0 was asked for).
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The bound WebSocket address.
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// A live count of the gateway's open connections.
    pub fn open_connections(&self) -> OpenConnections {
        self.open.clone()
    }

    /// Waits until the accept loops have stopped and every connection has
    /// been closed. Returns only after the shutdown signal was sent.
    pub async fn wait(mut self) -> Result<(), GatewayError> {
        for handle in self.accept_loops.drain(..) {
            handle.await?;
        }
        // Every sender clone lives in an accept loop or a connection task.
        let _ = self.done_rx.recv().await;
        Ok(())
    }
}

/// Binds both listeners and starts accepting for `engine`: the engine in
/// this process, or a link to it from a gateway process. Connections close
/// with `shutting_down` once `shutdown` becomes `true`.
pub async fn start<B: Backend>(
    config: GatewayConfig,
    engine: B,
    shutdown: watch::Receiver<bool>,
) -> Result<Gateway, GatewayError> {
    config.validate()?;
    let reuse_port = config.reuse_port;
    let bind = |addr: SocketAddr| async move {
        listen(addr, reuse_port).await.map_err(|source| GatewayError::Bind { addr, source })
    };
    let tcp = bind(config.tcp_addr).await?;
    let ws = bind(config.ws_addr).await?;
    let local = |l: &TcpListener, addr| l.local_addr().map_err(|source| GatewayError::Bind { addr, source });
    let (tcp_addr, ws_addr) = (local(&tcp, config.tcp_addr)?, local(&ws, config.ws_addr)?);
    let parking = if config.park_after_s > 0 {
        Some(Parking::start(tokio::runtime::Handle::current(), shutdown.clone()).map_err(GatewayError::Parking)?)
    } else {
        None
    };
    let (shared, done_rx) = Shared::new(config, engine, shutdown, parking);
    let open = OpenConnections { permits: shared.connections.clone(), max: shared.config.max_connections };
    tracing::info!(%tcp_addr, %ws_addr, dev = shared.config.dev, "gateway listening");
    if shared.config.dev {
        tracing::warn!("dev mode: bare user ids are accepted as tokens");
    }
    let accept_loops = vec![
        tokio::spawn(accept_loop(tcp, Transport::Tcp, shared.clone())),
        tokio::spawn(accept_loop(ws, Transport::Ws, shared)),
    ];
    Ok(Gateway { tcp_addr, ws_addr, accept_loops, done_rx, open })
}

/// Listens on `addr`. With `reuse_port` the socket joins the address's
/// SO_REUSEPORT group: several gateway processes listen on one port and the
/// kernel spreads new connections over them. Without it a second listener
/// on the port is refused, so two unrelated servers cannot share clients.
async fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    if !reuse_port {
        return TcpListener::bind(addr).await;
    }
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop<B: Backend>(listener: TcpListener, transport: Transport, shared: Arc<Shared<B>>) {
    let mut shutdown = shared.shutdown.clone();
    // Made once: each connection task holds a clone (a reference count),
    // not a handle of its own.
    let open = metrics::gauge!("hongbao_connections_open", "transport" => transport.as_str());
    let mut backoff = AcceptBackoff::default();
    let mut accept_log = LogLimiter::for_accepts();
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // A dropped sender also means nobody can tell us to run on.
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // About one connection only (it was reset before we took it).
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning (connections
                // that close will free descriptors), and say so once per
                // interval, not once per try.
                let pause = backoff.failed();
                metrics::counter!("hongbao_accept_errors_total", "transport" => transport.as_str()).increment(1);
                if let Some(suppressed) = accept_log.admit(tokio::time::Instant::now()) {
                    let pause_ms = pause.as_millis() as u64;
                    tracing::warn!(error = %e, transport = transport.as_str(), pause_ms, suppressed, "accept failed; pausing before the next try (suppressed = failures not logged since the last line)");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shutdown.changed() => break,
                }
            }
        };
        backoff.succeeded();
        metrics::counter!("hongbao_connections_accepted_total", "transport" => transport.as_str()).increment(1);
        // Small frames must leave at once; we batch writes ourselves.
        let _ = stream.set_nodelay(true);
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            reject(stream, transport, &shared, "capacity", "server at connection capacity");
            continue;
        };
        let pending = match shared.pending.admit(peer.ip()) {
            Ok(pending) => pending,
            Err(refused) => {
                reject(stream, transport, &shared, refused.as_str(), refused.message());
                continue;
            }
        };
        // One task type per transport, so a raw TCP connection's task is
        // not sized for the WebSocket upgrade.
        let admission = Admission::new(permit, open.clone());
        match transport {
            Transport::Tcp => tokio::spawn(conn::run_tcp(stream, shared.clone(), admission, pending)),
            Transport::Ws => tokio::spawn(conn::run_ws(stream, shared.clone(), admission, pending)),
        };
    }
    tracing::info!(transport = transport.as_str(), "accept loop stopped");
}

/// Tells a connection over a cap (`reason`, the metric label) `overload`,
/// best effort and bounded.
fn reject<B>(stream: TcpStream, transport: Transport, shared: &Shared<B>, reason: &'static str, message: &str) {
    metrics::counter!("hongbao_connections_rejected_total", "transport" => transport.as_str(), "reason" => reason)
        .increment(1);
    let close = ServerFrame::Close { code: ErrorCode::Overload, message: message.into() };
    match transport {
        Transport::Tcp => {
            // A fresh socket's send buffer is empty, so a small frame fits
            // without waiting; if it does not, the peer just sees the close.
            let _ = stream.try_write(&binary::encode_server(&close));
        }
        Transport::Ws => {
            // The WebSocket handshake must be done before a frame can be
            // sent, which takes a task; a second, small semaphore bounds those.
            let Ok(permit) = shared.rejects.clone().try_acquire_owned() else { return };
            tokio::spawn(async move {
                let timeout = Duration::from_secs(REJECT_TIMEOUT_S);
                let _ = tokio::time::timeout(timeout, ws::reject(stream, close)).await;
                drop(permit);
            });
        }
    }
}
