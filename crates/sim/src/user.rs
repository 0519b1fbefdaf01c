//! One simulated user: connect, hello, shake on the clock's schedule, answer
//! pushes with grab and open, count the bench's broadcast, heartbeat,
//! reconnect with backoff after a drop.
//!
//! Kept small because a simulator process holds thousands of them: one task,
//! one socket, a read buffer that starts empty and is shrunk back after a
//! large frame, and a short list of requests in flight (no channels, no
//! per-user timers beyond the one the task sleeps on).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hongbao_client::net::{self, ConnectError, SOURCE_PORTS};
use hongbao_client::{frames, handshake};
use hongbao_proto::{GrabState, PushBody, Reply, Request, ServerFrame, ShakeResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::schedule::{first_heartbeat, next_shake_ms};
use crate::stats::Stats;

/// Requests one user keeps in flight; a shake due while this many are
/// outstanding is skipped and counted as backlogged.
const INFLIGHT_MAX: usize = 8;
/// Read buffers larger than this are shrunk after use.
const BUFFER_KEEP_BYTES: usize = 512;
const BACKOFF_MS_MIN: u64 = 100;
const BACKOFF_MS_MAX: u64 = 5_000;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Topic of the bench's broadcast notice (`POST /v1/broadcast`): a user
/// counts a notice of this topic as the broadcast's receipt, not as a push,
/// so the packet pushes and their grabs stay what they were.
pub const BROADCAST_TOPIC: &str = "hongbao-bench-broadcast";

/// What every user of a process shares.
pub struct Shared {
    /// The gateways; see `WorkerConfig::servers`.
    pub servers: Vec<SocketAddr>,
    pub users_total: u64,
    pub heartbeat: Duration,
    /// Token for a user id (a bare id against a `--dev` server).
    pub token: Box<dyn Fn(u64) -> String + Send + Sync>,
    pub stats: Arc<Stats>,
    /// Address to connect from (`WorkerConfig::source`); user `index`
    /// connects from port `net::SOURCE_PORTS.start + index - first_index`,
    /// the same one on every reconnect.
    pub source: Option<Ipv4Addr>,
    /// The first user index of this process.
    pub first_index: u64,
}

/// A connection to the server; from the worker's own address and the user's
/// own port when there is one (`net::connect_from`: closing it resets the
/// connection, so the port is free again at once for a reconnect or the next
/// run).
async fn open_socket(shared: &Shared, index: u64, server: SocketAddr) -> std::io::Result<TcpStream> {
    let port = u64::from(SOURCE_PORTS.start) + index.saturating_sub(shared.first_index);
    let port = u16::try_from(port).ok().filter(|p| SOURCE_PORTS.contains(p));
    if let (Some(ip), Some(port)) = (shared.source, port) {
        match net::connect_from(server, SocketAddrV4::new(ip, port)).await {
            Ok(stream) => return Ok(stream),
            // Held by another program: let the system choose instead.
            Err(ConnectError::Bind { .. }) => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
    }
    TcpStream::connect(server).await
}

#[derive(Clone, Copy)]
enum Pending {
    Shake,
    Grab(u64),
    Open,
    Other,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn instant_at(unix_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(unix_ms.saturating_sub(now_ms()))
}

enum Ended {
    Stopped,
    Dropped,
}

/// Runs user `index` (user id `index + 1`) until `stop` turns true.
pub async fn run(shared: Arc<Shared>, index: u64, mut rate: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
    let mut attempt: u32 = 0;
    // Each drop moves the user on to the next gateway (a cluster's gateway
    // that died is left at once).
    let mut drops: usize = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let server = shared.servers[(index as usize + drops) % shared.servers.len()];
        match session(&shared, index, server, &mut rate, &mut stop, &mut attempt).await {
            Ended::Stopped => return,
            Ended::Dropped => {
                drops = drops.wrapping_add(1);
                shared.stats.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                let backoff = (BACKOFF_MS_MIN << attempt.min(6)).min(BACKOFF_MS_MAX);
                let jitter = rand::random::<u64>() % (backoff / 2 + 1);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(backoff / 2 + jitter)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    next_id: u64,
    pending: Vec<(u64, Pending, Instant)>,
    last_sent: Instant,
}

impl Conn {
    async fn send(&mut self, req: Request, kind: Pending) -> std::io::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.push((id, kind, Instant::now()));
        self.last_sent = Instant::now();
        self.stream.write_all(&frames::encode(id, req)).await
    }

    /// Pops one complete frame from the buffer, if there is one.
    fn frame(&mut self) -> Result<Option<ServerFrame>, ()> {
        frames::take(&mut self.buf).map_err(drop)
    }

    fn take_pending(&mut self, id: u64) -> Option<(Pending, Instant)> {
        let i = self.pending.iter().position(|p| p.0 == id)?;
        let (_, kind, at) = self.pending.swap_remove(i);
        Some((kind, at))
    }
}

async fn connect(shared: &Shared, index: u64, server: SocketAddr) -> Option<Conn> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, open_socket(shared, index, server)).await.ok()?.ok()?;
    stream.set_nodelay(true).ok()?;
    // The hello is request 1; pushes before the welcome are skipped, and
    // whatever follows it stays in the buffer for `drive`.
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        next_id: handshake::HELLO_ID + 1,
        pending: Vec::new(),
        // The first heartbeat is due `first_heartbeat` from now.
        last_sent: Instant::now()
            .checked_sub(shared.heartbeat.saturating_sub(first_heartbeat(index, shared.heartbeat)))
            .unwrap_or_else(Instant::now),
    };
    let token = (shared.token)(index + 1);
    let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::hello(&mut conn.stream, &mut conn.buf, &token));
    welcome.await.ok()?.ok()?;
    Some(conn)
}

async fn session(
    shared: &Shared,
    index: u64,
    server: SocketAddr,
    rate: &mut watch::Receiver<u64>,
    stop: &mut watch::Receiver<bool>,
    attempt: &mut u32,
) -> Ended {
    let stats = &shared.stats;
    let Some(mut conn) = connect(shared, index, server).await else {
        stats.counters.conn_errors.fetch_add(1, Ordering::Relaxed);
        return Ended::Dropped;
    };
    *attempt = 0;
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let ended = drive(shared, index, &mut conn, rate, stop).await;
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    if matches!(ended, Ended::Dropped) {
        stats.counters.conn_errors.fetch_add(1, Ordering::Relaxed);
    }
    ended
}

async fn drive(
    shared: &Shared,
    index: u64,
    conn: &mut Conn,
    rate: &mut watch::Receiver<u64>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let stats = &shared.stats;
    let c = &stats.counters;
    let mut last_shake_ms = now_ms();
    loop {
        let target = *rate.borrow_and_update();
        let next_shake = next_shake_ms(index, shared.users_total, target, last_shake_ms);
        let heartbeat_at = conn.last_sent + shared.heartbeat;
        tokio::select! {
            read = conn.stream.read_buf(&mut conn.buf) => {
                match read {
                    Ok(0) | Err(_) => return Ended::Dropped,
                    Ok(_) => {}
                }
                loop {
                    let frame = match conn.frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(()) => return Ended::Dropped,
                    };
                    let outcome = match frame {
                        ServerFrame::Reply { id, reply } => handle_reply(stats, index, conn, id, reply).await,
                        ServerFrame::Push(push) => {
                            if matches!(&push.body, PushBody::Notice { topic, .. } if topic == BROADCAST_TOPIC) {
                                stats.record_broadcast(now_ms());
                            } else {
                                c.pushes.fetch_add(1, Ordering::Relaxed);
                            }
                            let mut r = Ok(());
                            if push.msg != 0 {
                                r = conn.send(Request::Ack { msg: push.msg }, Pending::Other).await;
                            }
                            if let (Ok(()), PushBody::PacketReceived { packet, .. }) = (&r, push.body) {
                                c.grabs.fetch_add(1, Ordering::Relaxed);
                                r = conn.send(Request::Grab { packet }, Pending::Grab(packet)).await;
                            }
                            r
                        }
                        ServerFrame::Close { .. } => return Ended::Dropped,
                    };
                    if outcome.is_err() {
                        return Ended::Dropped;
                    }
                }
                if conn.buf.is_empty() && conn.buf.capacity() > BUFFER_KEEP_BYTES {
                    conn.buf = Vec::new();
                }
            }
            _ = tokio::time::sleep_until(instant_at(next_shake.unwrap_or(u64::MAX / 2))), if next_shake.is_some() => {
                last_shake_ms = next_shake.unwrap_or(last_shake_ms);
                if conn.pending.len() >= INFLIGHT_MAX {
                    c.backlogged.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                c.shakes_sent.fetch_add(1, Ordering::Relaxed);
                if conn.send(Request::Shake { campaign: 0, key: None }, Pending::Shake).await.is_err() {
                    return Ended::Dropped;
                }
            }
            _ = tokio::time::sleep_until(heartbeat_at) => {
                if conn.send(Request::Ping, Pending::Other).await.is_err() {
                    return Ended::Dropped;
                }
            }
            _ = rate.changed() => {
                last_shake_ms = now_ms();
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    return Ended::Stopped;
                }
            }
        }
    }
}

async fn handle_reply(stats: &Stats, index: u64, conn: &mut Conn, id: u64, reply: Reply) -> std::io::Result<()> {
    let c = &stats.counters;
    let Some((kind, sent_at)) = conn.take_pending(id) else { return Ok(()) };
    match (kind, reply) {
        (Pending::Shake, Reply::Shake(result)) => {
            stats.record_latency(index, sent_at.elapsed().as_micros() as u64);
            match result {
                ShakeResult::Won { amount_fen, .. } => {
                    c.won.fetch_add(1, Ordering::Relaxed);
                    c.amount_won_fen.fetch_add(amount_fen, Ordering::Relaxed);
                }
                ShakeResult::None => drop(c.none.fetch_add(1, Ordering::Relaxed)),
                ShakeResult::Overload => drop(c.overload.fetch_add(1, Ordering::Relaxed)),
                ShakeResult::NotRunning => drop(c.not_running.fetch_add(1, Ordering::Relaxed)),
            }
        }
        (Pending::Shake, _) => drop(c.shake_errors.fetch_add(1, Ordering::Relaxed)),
        (Pending::Grab(packet), Reply::Grab { state: GrabState::CanOpen, .. }) => {
            conn.send(Request::Open { packet }, Pending::Open).await?;
        }
        (Pending::Open, Reply::Opened { amount_fen, repeat: false, .. }) => {
            c.opens.fetch_add(1, Ordering::Relaxed);
            c.amount_opened_fen.fetch_add(amount_fen, Ordering::Relaxed);
        }
        (Pending::Open, Reply::Error { .. }) => drop(c.open_rejects.fetch_add(1, Ordering::Relaxed)),
        _ => {}
    }
    Ok(())
}
