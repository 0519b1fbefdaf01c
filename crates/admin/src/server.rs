//! The accept loop: admits connections under a cap, backs off when accept
//! fails, and shuts down in bounded time.
//!
//! Shutdown, on the signal: stop accepting (the listener is dropped, so new
//! connections are refused), tell every connection (idle ones close at once,
//! busy ones after their answer), wait for them up to `shutdown_grace_ms`,
//! drop whatever is left, and return.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use crate::conn::{self, ConnShared};
use crate::limits::{ACCEPT_BACKOFF_MAX_MS, ACCEPT_BACKOFF_MIN_MS, ACCEPT_LOG_INTERVAL_MS};

/// Serves `listener` until `shutdown` becomes `true` (or its sender is
/// dropped), then ends within about `shutdown_grace_ms`.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<ConnShared>, mut shutdown: watch::Receiver<bool>) {
    let limits = shared.limits;
    // A permit per connection, taken before serving it, given back when its
    // task ends.
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::new();
    let log_interval = Duration::from_millis(ACCEPT_LOG_INTERVAL_MS);
    let mut accept_log = LogLimiter::new(log_interval);
    let mut over_cap_log = LogLimiter::new(log_interval);
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

/// Returns once `shutdown` says stop, or its sender is gone (nobody is
/// left to say otherwise). Holds no borrow of the value past its return.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
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

/// Accept errors that concern one connection only; the next accept works.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// The pause after each failed accept: `ACCEPT_BACKOFF_MIN_MS`, doubling up
/// to `ACCEPT_BACKOFF_MAX_MS`, back to the start after an accept succeeds.
#[derive(Debug)]
struct AcceptBackoff {
    next_ms: u64,
}

impl AcceptBackoff {
    fn new() -> AcceptBackoff {
        AcceptBackoff { next_ms: ACCEPT_BACKOFF_MIN_MS }
    }

    fn failed(&mut self) -> Duration {
        let pause_ms = self.next_ms;
        self.next_ms = pause_ms.saturating_mul(2).min(ACCEPT_BACKOFF_MAX_MS);
        Duration::from_millis(pause_ms)
    }

    fn succeeded(&mut self) {
        self.next_ms = ACCEPT_BACKOFF_MIN_MS;
    }
}

/// At most one log line per interval for a recurring event.
#[derive(Debug)]
struct LogLimiter {
    interval: Duration,
    /// When the last line was written.
    last: Option<Instant>,
    /// Events since then that were not logged.
    suppressed: u64,
}

impl LogLimiter {
    fn new(interval: Duration) -> LogLimiter {
        LogLimiter { interval, last: None, suppressed: 0 }
    }

    /// `Some(n)`: log this event now, saying `n` were left unlogged since
    /// the last line. `None`: stay quiet (it is counted).
    fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_resets() {
        let mut b = AcceptBackoff::new();
        let pauses: Vec<u64> = (0..10).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1_000, 1_000, 1_000]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(ACCEPT_BACKOFF_MIN_MS));
    }

    #[test]
    fn the_log_limiter_writes_one_line_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut log = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(log.admit(t0), Some(0));
        // 20 a second for 9.95 s: all quiet.
        for i in 1..200 {
            assert_eq!(log.admit(t0 + Duration::from_millis(50 * i)), None);
        }
        assert_eq!(log.admit(t0 + Duration::from_secs(10)), Some(199));
        assert_eq!(log.admit(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.admit(t0 + Duration::from_secs(25)), Some(1));
    }

    #[test]
    fn only_per_connection_errors_skip_the_backoff() {
        assert!(is_connection_error(&io::Error::from(io::ErrorKind::ConnectionAborted)));
        // EMFILE, "Too many open files".
        assert!(!is_connection_error(&io::Error::from_raw_os_error(24)));
    }
}
