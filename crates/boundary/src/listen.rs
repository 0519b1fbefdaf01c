//! How every listener of the edge (the gateway's client ports, the admin
//! API, the link socket) behaves when `accept` fails: it backs off instead
//! of spinning, and logs a line per interval with a count instead of one per
//! failure. Out of file descriptors, an accept loop that retried every 50 ms
//! and logged each failure wrote 20 lines a second (issue 9).

use std::io;
use std::time::Duration;

use tokio::time::Instant;

/// First pause after a failed `accept` that is not about one connection
/// (out of file descriptors, out of memory); doubled on each further
/// failure. Long enough that a failing accept does not spin a core.
pub const ACCEPT_BACKOFF_MIN_MS: u64 = 10;
/// Longest pause between accept attempts while they keep failing: the delay
/// before a freed descriptor is used again for a new connection.
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;
/// At most one log line per this interval for failed accepts (and one for
/// connections refused over a cap); the line says how many were not logged
/// since the last one. Every one of them is still counted in a metric.
pub const ACCEPT_LOG_INTERVAL_MS: u64 = 10_000;

const _: () = assert!(0 < ACCEPT_BACKOFF_MIN_MS && ACCEPT_BACKOFF_MIN_MS <= ACCEPT_BACKOFF_MAX_MS);
// Several failures fall into one log interval, so the summary says something.
const _: () = assert!(ACCEPT_BACKOFF_MAX_MS < ACCEPT_LOG_INTERVAL_MS);

/// Accept errors that concern one connection only; the next accept works.
pub fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// The pause after each failed accept: `ACCEPT_BACKOFF_MIN_MS`, doubling up
/// to `ACCEPT_BACKOFF_MAX_MS`, back to the start after an accept succeeds.
#[derive(Debug)]
pub struct AcceptBackoff {
    next_ms: u64,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next_ms: ACCEPT_BACKOFF_MIN_MS }
    }
}

impl AcceptBackoff {
    /// The pause before the next try.
    pub fn failed(&mut self) -> Duration {
        let pause_ms = self.next_ms;
        self.next_ms = pause_ms.saturating_mul(2).min(ACCEPT_BACKOFF_MAX_MS);
        Duration::from_millis(pause_ms)
    }

    pub fn succeeded(&mut self) {
        self.next_ms = ACCEPT_BACKOFF_MIN_MS;
    }
}

/// At most one log line per interval for a recurring event.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    /// When the last line was written.
    last: Option<Instant>,
    /// Events since then that were not logged.
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter { interval, last: None, suppressed: 0 }
    }

    /// For accept failures and refusals: one line per `ACCEPT_LOG_INTERVAL_MS`.
    pub fn for_accepts() -> LogLimiter {
        LogLimiter::new(Duration::from_millis(ACCEPT_LOG_INTERVAL_MS))
    }

    /// `Some(n)`: log this event now, saying `n` were left unlogged since
    /// the last line. `None`: stay quiet (it is counted).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
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
        let mut b = AcceptBackoff::default();
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
