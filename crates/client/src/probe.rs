//! A ping probe: a client on a connection of its own that sends a `ping`
//! every `every`, from a thread and a runtime of its own (not the load's),
//! and keeps each round trip. Pings go out on schedule whether or not the
//! previous one was answered, so a stall shows as many slow pings, not one
//! (no coordinated omission). `perf overload` and the bench's idle hold use
//! it.
//!
//! Bounded: each ping waits at most its timeout (then it counts as lost), so
//! at most `timeout / every` are in flight; a round trip is 8 bytes kept
//! until `finish` (a probe runs for minutes, not days).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hongbao_proto::{Reply, Request};

use crate::Client;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe thread: {0}")]
    Thread(std::io::Error),
    #[error("probe connection: {0}")]
    Connect(String),
    #[error("the probe thread panicked")]
    Panicked,
}

/// How a probe pings.
#[derive(Clone, Copy, Debug)]
pub struct ProbeTiming {
    pub every: Duration,
    /// A ping unanswered this long counts as lost.
    pub ping_timeout: Duration,
    /// How long connecting and logging in may take.
    pub connect_timeout: Duration,
}

/// Round trips of the pings in microseconds, sorted, and the pings that got
/// no pong.
#[derive(Debug, Default)]
pub struct RoundTrips {
    pub us: Vec<u64>,
    pub lost: u64,
}

impl RoundTrips {
    /// The `q` quantile in milliseconds (NaN without samples).
    pub fn ms(&self, q: f64) -> f64 {
        if self.us.is_empty() {
            return f64::NAN;
        }
        self.us[((self.us.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
    }

    pub fn max_ms(&self) -> f64 {
        self.us.last().map_or(f64::NAN, |&u| u as f64 / 1e3)
    }
}

pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<RoundTrips>,
}

impl Probe {
    /// Connects to `server`, logs in with `token` and starts pinging.
    pub fn start(server: SocketAddr, token: String, timing: ProbeTiming) -> Result<Probe, ProbeError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("runtime: {e}")));
                        return RoundTrips::default();
                    }
                };
                rt.block_on(async move {
                    let login =
                        tokio::time::timeout(timing.connect_timeout, Client::connect_with_token(server, &token));
                    let refused = match login.await {
                        Ok(Ok((client, Reply::Welcome { .. }))) => {
                            let _ = ready_tx.send(Ok(()));
                            return ping(Arc::new(client), s, timing).await;
                        }
                        Ok(Ok((_, other))) => format!("hello answered {other:?}"),
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("no welcome within {:?}", timing.connect_timeout),
                    };
                    let _ = ready_tx.send(Err(refused));
                    RoundTrips::default()
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

    /// Stops pinging, waits for the pings in flight (at most the ping
    /// timeout), closes the connection and returns the round trips.
    pub fn finish(self) -> Result<RoundTrips, ProbeError> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().map_err(|_| ProbeError::Panicked)
    }
}

async fn ping(client: Arc<Client>, stop: Arc<AtomicBool>, timing: ProbeTiming) -> RoundTrips {
    let got = Arc::new(Mutex::new(RoundTrips::default()));
    let mut tick = tokio::time::interval(timing.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pings = tokio::task::JoinSet::new();
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        let (client, got) = (client.clone(), got.clone());
        pings.spawn(async move {
            let sent = Instant::now();
            let pong = client.request_timeout(Request::Ping, timing.ping_timeout).await;
            let mut got = got.lock().unwrap_or_else(|e| e.into_inner());
            match pong {
                Ok(Reply::Pong) => got.us.push(sent.elapsed().as_micros().max(1) as u64),
                _ => got.lost += 1,
            }
        });
        while pings.try_join_next().is_some() {}
    }
    while pings.join_next().await.is_some() {}
    let mut got = std::mem::take(&mut *got.lock().unwrap_or_else(|e| e.into_inner()));
    got.us.sort_unstable();
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_sorted_round_trips() {
        let trips = RoundTrips { us: (1..=100).map(|u| u * 100).collect(), lost: 2 };
        assert!((trips.ms(0.5) - 5.0).abs() < 0.11 && (trips.ms(0.99) - 9.9).abs() < 0.01);
        assert_eq!(trips.max_ms(), 10.0);
        assert!(RoundTrips::default().ms(0.99).is_nan());
    }

    #[test]
    fn a_probe_without_a_server_fails_to_start() {
        // Port 9 on loopback: nothing listens.
        let timing = ProbeTiming {
            every: Duration::from_millis(10),
            ping_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
        };
        let r = Probe::start("127.0.0.1:9".parse().unwrap(), "1".to_owned(), timing);
        assert!(matches!(r, Err(ProbeError::Connect(_))), "{:?}", r.err());
    }
}
