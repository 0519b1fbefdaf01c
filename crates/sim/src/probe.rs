//! The idle hold's probe: one client connection of the bench's own that
//! sends a `ping` every `EVERY` and keeps each round trip, on a thread and a
//! runtime of its own (not the workers'). Pings go out on schedule whether
//! or not the previous one was answered, so a stall shows as many slow
//! pings, not one (no coordinated omission).
//!
//! Bounded: each ping waits at most `PING_TIMEOUT` (then it counts as lost),
//! so at most `PING_TIMEOUT / EVERY` are in flight; round trips go into one
//! HdrHistogram.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use hongbao_client::Client;
use hongbao_proto::{Reply, Request};
use serde::Serialize;

/// How often the probe pings.
pub const EVERY: Duration = Duration::from_millis(100);
/// A ping unanswered this long counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the probe gets to connect and log in.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The round trip the server aims at for a ping (DESIGN.md: p99 under 10 ms).
pub const TARGET_P99_MS: f64 = 10.0;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe thread: {0}")]
    Thread(std::io::Error),
    #[error("probe connection: {0}")]
    Connect(String),
    #[error("the probe thread panicked")]
    Panicked,
}

/// The probe's round trips over the hold.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProbeSummary {
    pub every_ms: u64,
    pub pings: u64,
    /// Pings with no pong within the timeout (or cut off by a closed connection).
    pub lost: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub target_p99_ms: f64,
}

impl ProbeSummary {
    fn of(h: &Histogram<u64>, lost: u64) -> ProbeSummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |q: f64| if h.is_empty() { 0.0 } else { ms(h.value_at_quantile(q)) };
        ProbeSummary {
            every_ms: EVERY.as_millis() as u64,
            pings: h.len() + lost,
            lost,
            p50_ms: q(0.50),
            p99_ms: q(0.99),
            max_ms: if h.is_empty() { 0.0 } else { ms(h.max()) },
            target_p99_ms: TARGET_P99_MS,
        }
    }
}

/// Round trips in microseconds and lost pings, shared by the ping tasks.
struct Got {
    us: Histogram<u64>,
    lost: u64,
}

pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<ProbeSummary>,
}

impl Probe {
    /// Connects to `server`, logs in with `token` and starts pinging.
    pub fn start(server: SocketAddr, token: String) -> Result<Probe, ProbeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-probe".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("runtime: {e}")));
                        return ProbeSummary::default();
                    }
                };
                rt.block_on(async move {
                    let login = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect_with_token(server, &token));
                    let client = match login.await {
                        Ok(Ok((client, Reply::Welcome { .. }))) => Arc::new(client),
                        Ok(Ok((_, other))) => {
                            let _ = ready_tx.send(Err(format!("hello answered {other:?}")));
                            return ProbeSummary::default();
                        }
                        Ok(Err(e)) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return ProbeSummary::default();
                        }
                        Err(_) => {
                            let _ = ready_tx.send(Err(format!("no welcome within {CONNECT_TIMEOUT:?}")));
                            return ProbeSummary::default();
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    ping(client, s).await
                })
            })
            .map_err(ProbeError::Thread)?;
        match ready.recv() {
            Ok(Ok(())) => Ok(Probe { stop, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(ProbeError::Connect(e))
            }
            Err(_) => {
                let _ = thread.join();
                Err(ProbeError::Panicked)
            }
        }
    }

    /// Stops pinging, waits for the pings in flight (at most `PING_TIMEOUT`),
    /// closes the connection and returns the round trips.
    pub fn finish(self) -> Result<ProbeSummary, ProbeError> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().map_err(|_| ProbeError::Panicked)
    }
}

async fn ping(client: Arc<Client>, stop: Arc<AtomicBool>) -> ProbeSummary {
    let histogram = Histogram::new_with_bounds(1, PING_TIMEOUT.as_micros() as u64, 3).expect("valid bounds");
    let got = Arc::new(Mutex::new(Got { us: histogram, lost: 0 }));
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pings = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        let (client, got) = (client.clone(), got.clone());
        pings.spawn(async move {
            let sent = Instant::now();
            let pong = client.request_timeout(Request::Ping, PING_TIMEOUT).await;
            let mut got = got.lock().unwrap_or_else(|e| e.into_inner());
            match pong {
                Ok(Reply::Pong) => got.us.saturating_record(sent.elapsed().as_micros().max(1) as u64),
                _ => got.lost += 1,
            }
        });
        while pings.try_join_next().is_some() {}
    }
    while pings.join_next().await.is_some() {}
    let got = got.lock().unwrap_or_else(|e| e.into_inner());
    ProbeSummary::of(&got.us, got.lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_of_round_trips_and_losses() {
        let mut h = Histogram::new_with_bounds(1, PING_TIMEOUT.as_micros() as u64, 3).unwrap();
        for us in 1..=100 {
            h.record(us * 100).unwrap();
        }
        let s = ProbeSummary::of(&h, 2);
        assert_eq!((s.pings, s.lost, s.every_ms), (102, 2, 100));
        assert!((s.p50_ms - 5.0).abs() < 0.01 && (s.p99_ms - 9.9).abs() < 0.01 && (s.max_ms - 10.0).abs() < 0.01);
        let none = ProbeSummary::of(&Histogram::new(3).unwrap(), 0);
        assert_eq!((none.pings, none.p99_ms), (0, 0.0));
    }

    #[test]
    fn a_probe_without_a_server_fails_to_start() {
        // Port 9 on loopback: nothing listens.
        let r = Probe::start("127.0.0.1:9".parse().unwrap(), "1".to_owned());
        assert!(matches!(r, Err(ProbeError::Connect(_))), "{:?}", r.err());
    }
}
