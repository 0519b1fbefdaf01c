//! The accept loop: admits connections under a cap, backs off when accept
//! fails, and shuts down in bounded time.
//!
//! Shutdown, on the signal: stop accepting (the listener is dropped, so new
//! connections are refused), tell every connection (idle ones close at once,
//! busy ones after their answer), wait for them up to `shutdown_grace_ms`,
//! drop whatever is left, and return.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use crate::conn::{self, stopped, ConnShared};
use hongbao_boundary::listen::{is_connection_error, AcceptBackoff, LogLimiter};

/// Serves `listener` until `shutdown` becomes `true` (or its sender is
/// dropped), then ends within about `shutdown_grace_ms`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<ConnShared>, mut shutdown: watch::Receiver<bool>) {
    let limits = shared.limits;
    // A permit per connection, taken before serving it, given back when its
    // task ends.
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    let mut accept_log = LogLimiter::for_accepts();
    let mut over_cap_log = LogLimiter::for_accepts();
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut shutdown) => break,
            Some(ended) = connections.join_next() => {
                report_ended(ended);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                backoff.succeeded();
                stream
            }
            // About one connection only (it was reset before we took it).
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: retrying at once would fail
                // the same way, as often as the loop can turn.
                let pause = backoff.failed();
                metrics::counter!("hongbao_admin_accept_errors_total").increment(1);
                if let Some(suppressed) = accept_log.admit(Instant::now()) {
                    let pause_ms = pause.as_millis() as u64;
                    tracing::warn!(error = %e, pause_ms, suppressed, "admin API: accept failed; pausing before the next try (suppressed = failures not logged since the last line)");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    () = stopped(&mut shutdown) => break,
                }
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                connections.spawn(conn::serve(stream, shared.clone(), permit, shutdown.clone()));
            }
            Err(_) => {
                // Closed at once: no read, no answer; what a connection costs
                // is its descriptor, and this one is given back now.
                drop(stream);
                metrics::counter!("hongbao_admin_connections_rejected_total").increment(1);
                if let Some(suppressed) = over_cap_log.admit(Instant::now()) {
                    let max = limits.connections_max;
                    tracing::warn!(max, suppressed, "admin API: connection cap reached; closing new connections (suppressed = refusals not logged since the last line)");
                }
            }
        }
    }
    drop(listener);
    drain(connections, Duration::from_millis(limits.shutdown_grace_ms)).await;
}

/// Waits for the connections to finish, up to `grace`; then drops the rest.
async fn drain(mut connections: JoinSet<()>, grace: Duration) {
    let all_ended = async {
        while let Some(ended) = connections.join_next().await {
            report_ended(ended);
        }
    };
    if tokio::time::timeout(grace, all_ended).await.is_err() {
        let left = connections.len();
        tracing::warn!(
            left,
            grace_ms = grace.as_millis() as u64,
            "admin API: connections still open after the shutdown grace; dropping them"
        );
        connections.shutdown().await;
    }
}

fn report_ended(ended: Result<(), JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!(error = %e, "admin connection task panicked");
        }
    }
}
