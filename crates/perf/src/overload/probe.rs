//! The probe of `perf overload`: a client on a connection of its own that
//! sends a `ping` every `EVERY`, from a thread of its own (not the load's
//! runtime), and keeps each round trip. Pings are sent on schedule whether
//! or not the previous one was answered, so a stall shows as many slow
//! pings, not one (no coordinated omission).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hongbao_client::Client;
use hongbao_proto::{Reply, Request};

/// How often the probe pings.
pub const EVERY: Duration = Duration::from_millis(10);
/// A ping unanswered this long counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(30);

/// Round trips of the pings, sorted, and the pings that got no pong.
#[derive(Debug, Default)]
pub struct Latencies {
    pub us: Vec<u64>,
    pub lost: u64,
}

impl Latencies {
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
    thread: JoinHandle<anyhow::Result<Latencies>>,
}

impl Probe {
    /// Connects as `user` and starts pinging.
    pub fn start(addr: SocketAddr, user: u64) -> anyhow::Result<Probe> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || -> anyhow::Result<Latencies> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let client = match Client::connect_with_token(addr, &user.to_string()).await {
                        Ok((client, Reply::Welcome { .. })) => Arc::new(client),
                        other => {
                            let _ = ready_tx.send(false);
                            bail!("probe connection: {:?}", other.map(|(_, w)| w));
                        }
                    };
                    let _ = ready_tx.send(true);
                    ping(client, s).await
                })
            })
            .context("probe thread")?;
        match ready.recv_timeout(Duration::from_secs(30)) {
            Ok(true) => Ok(Probe { stop, thread }),
            _ => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => bail!("the probe did not connect"),
            },
        }
    }

    /// Stops pinging and returns the round trips.
    pub fn finish(self) -> anyhow::Result<Latencies> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
    }
}

async fn ping(client: Arc<Client>, stop: Arc<AtomicBool>) -> anyhow::Result<Latencies> {
    let got = Arc::new(Mutex::new(Latencies::default()));
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
                Ok(Reply::Pong) => got.us.push(sent.elapsed().as_micros() as u64),
                _ => got.lost += 1,
            }
        });
        while pings.try_join_next().is_some() {}
    }
    while pings.join_next().await.is_some() {}
    let mut got = std::mem::take(&mut *got.lock().unwrap_or_else(|e| e.into_inner()));
    got.us.sort_unstable();
    Ok(got)
}
