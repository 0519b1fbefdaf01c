//! Time as the engine sees it, passed in through `EngineConfig`.
//!
//! Records carry wall-clock milliseconds (a packet's `expires_ms` must mean
//! the same after a restart), and the engine's timers (expiry, eviction,
//! campaign releases, the finished-campaign check) wait on the same clock:
//! `now_ms` and `sleep_until` are the only ways the engine reads time.
//!
//! The system clock is the wall clock read once, at start, plus tokio's
//! monotonic clock since then; it drifts from the wall clock only by the
//! host's clock corrections while it runs (milliseconds a day, against
//! expiries of hours). A manual clock moves only when told (`advance`), so
//! engine tests decide exactly when an hour has passed and never sleep.
//! (tokio's own paused clock does not fit the engine: it advances by itself
//! whenever every task waits, and the engine's tasks wait on the writer
//! thread for every commit, so it jumped to the next timer, an hour-long
//! expiry, in the middle of a send.)

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct Clock {
    source: Source,
}

#[derive(Clone, Debug)]
enum Source {
    /// Wall-clock milliseconds `epoch_ms` at tokio instant `origin`.
    System { epoch_ms: u64, origin: Instant },
    /// The time is whatever was last sent on this channel.
    Manual(Arc<watch::Sender<u64>>),
}

impl Clock {
    /// The wall clock, read now.
    pub fn system() -> Clock {
        let epoch_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Clock { source: Source::System { epoch_ms, origin: Instant::now() } }
    }

    /// A clock that reads `epoch_ms` until it is advanced.
    pub fn manual(epoch_ms: u64) -> Clock {
        Clock { source: Source::Manual(Arc::new(watch::channel(epoch_ms).0)) }
    }

    /// Wall-clock milliseconds now.
    pub fn now_ms(&self) -> u64 {
        match &self.source {
            Source::System { epoch_ms, origin } => epoch_ms + origin.elapsed().as_millis() as u64,
            Source::Manual(now) => *now.borrow(),
        }
    }

    /// Waits until the clock reads `at_ms` or later. Cancel-safe.
    pub async fn sleep_until(&self, at_ms: u64) {
        match &self.source {
            Source::System { epoch_ms, origin } => {
                let after_origin = Duration::from_millis(at_ms.saturating_sub(*epoch_ms));
                tokio::time::sleep_until(*origin + after_origin).await
            }
            Source::Manual(now) => {
                let mut rx = now.subscribe();
                // The sender lives as long as this clock: it cannot be dropped.
                let _ = rx.wait_for(|now| *now >= at_ms).await;
            }
        }
    }

    /// Moves a manual clock forward.
    ///
    /// Panics on the system clock: only tests move time.
    pub fn advance(&self, by: Duration) {
        match &self.source {
            Source::System { .. } => panic!("the system clock cannot be advanced"),
            Source::Manual(now) => now.send_modify(|ms| *ms += by.as_millis() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_advanced_and_wakes_its_sleepers() {
        let clock = Clock::manual(1_000);
        let sleeper = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.sleep_until(1_500).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(clock.now_ms(), 1_000);
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(499));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(5), sleeper).await.unwrap().unwrap();
        assert_eq!(clock.now_ms(), 1_500);
    }

    #[tokio::test(start_paused = true)]
    async fn the_system_clock_follows_tokio_time() {
        let clock = Clock::system();
        let start = clock.now_ms();
        clock.sleep_until(start + 250).await;
        assert_eq!(clock.now_ms(), start + 250);
    }
}
